/*
 * What the database itself guarantees about the ledger and other invariants, whatever the code that
 * writes to it: transactions balance per unit (checked at COMMIT), entries and transactions cannot
 * be changed or removed, idempotency keys are unique; and emails are unique case-insensitively,
 * prompt versions are immutable, usage is counted once. Run on the real migrations.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/err.h"
#include "bg/pg.h"
#include "bgtest.h"

static bgt_pg_t db;
static PGconn *conn;

static void setup(void)
{
    cr_assert_eq(bgt_pg_create(&db, true), 0);
    char err[512];
    cr_assert_eq(bg_pg_connect(db.url, 3, &conn, err, sizeof(err)), 0, "connect: %s", err);
}

static void teardown(void)
{
    PQfinish(conn);
    conn = NULL;
    bgt_pg_drop(&db);
}

/* Runs sql with params; asserts success; returns the first field of the first row (new string). */
static char *q(const char *sql, int n, const char *const *params)
{
    PGresult *res;
    int rc = bg_pg_exec(conn, sql, n, params, &res);
    cr_assert_eq(rc, 0, "%s: %s", sql, bg_strerror(rc));
    char *v = strdup(PQntuples(res) > 0 && PQnfields(res) > 0 && !PQgetisnull(res, 0, 0)
                         ? PQgetvalue(res, 0, 0)
                         : "");
    PQclear(res);
    return v;
}

/* Runs sql and returns its bg_err result (the result set is dropped). */
static int try(const char *sql, int n, const char *const *params)
{
    return bg_pg_run(conn, sql, n, params);
}

/* Creates a ledger account and returns its id (new string). */
static char *account(const char *owner_type, const char *purpose, const char *unit)
{
    const char *p[] = {owner_type, purpose, unit};
    return q("INSERT INTO ledger_accounts (owner_type, owner_id, purpose, unit) "
             "VALUES ($1, CASE WHEN $1 = 'system' THEN NULL ELSE gen_random_uuid() END, $2, $3) "
             "RETURNING id",
             3, p);
}

static char *begin_tx(const char *key)
{
    cr_assert_eq(bg_pg_begin(conn), 0);
    const char *p[] = {key};
    return q("INSERT INTO ledger_transactions (idempotency_key, kind) VALUES ($1, 'test') "
             "RETURNING id",
             1, p);
}

static void entry(const char *tx, const char *acct, const char *unit, const char *amount)
{
    const char *p[] = {tx, acct, unit, amount};
    int rc = try("INSERT INTO ledger_entries (transaction_id, account_id, unit, amount) "
                 "VALUES ($1, $2, $3, $4)",
                 4, p);
    cr_assert_eq(rc, 0, "entry: %s", bg_strerror(rc));
}

static char *balance(const char *acct)
{
    const char *p[] = {acct};
    return q("SELECT balance FROM ledger_balances WHERE account_id = $1", 1, p);
}

static char *tx_count(const char *key)
{
    const char *p[] = {key};
    return q("SELECT count(*) FROM ledger_transactions WHERE idempotency_key = $1", 1, p);
}

TestSuite(ledger, .init = setup, .fini = teardown);
TestSuite(schema, .init = setup, .fini = teardown);

Test(ledger, balanced_transaction_commits)
{
    char *grants = account("system", "grants", "request");
    char *credits = account("user", "credits", "request");
    char *tx = begin_tx("grant:1");
    entry(tx, credits, "request", "100");
    entry(tx, grants, "request", "-100");
    cr_assert_eq(bg_pg_commit(conn), 0);

    char *b = balance(credits);
    cr_assert_str_eq(b, "100");
    free(b);
    b = balance(grants);
    cr_assert_str_eq(b, "-100");
    free(b);
    free(tx);
    free(grants);
    free(credits);
}

Test(ledger, unbalanced_transaction_is_refused_at_commit)
{
    char *grants = account("system", "grants", "request");
    char *credits = account("user", "credits", "request");
    char *tx = begin_tx("grant:bad");
    /* each insert is accepted: the check is deferred to COMMIT */
    entry(tx, credits, "request", "100");
    entry(tx, grants, "request", "-99");
    bg_pg_error_t e;
    cr_assert_eq(bg_pg_commit_ex(conn, &e), BG_ERR_INVALID);
    cr_assert_str_eq(e.sqlstate, "23514");
    cr_assert_str_eq(e.constraint, "ledger_transaction_balanced");
    cr_assert_not_null(strstr(e.message, "unbalanced"), "%s", e.message);

    /* nothing of it was kept, and the connection goes on */
    cr_assert_eq(PQtransactionStatus(conn), PQTRANS_IDLE);
    char *n = tx_count("grant:bad");
    cr_assert_str_eq(n, "0");
    free(n);
    char *b = balance(credits);
    cr_assert_str_eq(b, "0");
    free(b);
    free(tx);
    free(grants);
    free(credits);
}

Test(ledger, balance_is_per_unit)
{
    char *cash = account("system", "paddle_clearing", "USD");
    char *revenue = account("system", "revenue", "USD");
    char *grants = account("system", "grants", "request");
    char *credits = account("user", "credits", "request");
    /* USD balances, request credits do not: the sums must not be mixed across units */
    char *tx = begin_tx("payment:1");
    entry(tx, cash, "USD", "1999");
    entry(tx, revenue, "USD", "-1999");
    entry(tx, credits, "request", "10000");
    entry(tx, grants, "request", "-9000");
    entry(tx, revenue, "USD", "-1000"); /* makes the total over all units zero */
    bg_pg_error_t e;
    cr_assert_eq(bg_pg_commit_ex(conn, &e), BG_ERR_INVALID);
    cr_assert(strstr(e.message, "request") != NULL || strstr(e.message, "USD") != NULL, "%s",
              e.message);
    char *n = tx_count("payment:1");
    cr_assert_str_eq(n, "0");
    free(n);

    /* the same with both units balanced goes through */
    free(tx);
    tx = begin_tx("payment:2");
    entry(tx, cash, "USD", "1999");
    entry(tx, revenue, "USD", "-1999");
    entry(tx, credits, "request", "10000");
    entry(tx, grants, "request", "-10000");
    cr_assert_eq(bg_pg_commit(conn), 0);
    char *b = balance(credits);
    cr_assert_str_eq(b, "10000");
    free(b);
    free(tx);
    free(cash);
    free(revenue);
    free(grants);
    free(credits);
}

Test(ledger, transaction_needs_at_least_two_entries)
{
    free(begin_tx("empty"));
    cr_assert_eq(bg_pg_commit(conn), BG_ERR_INVALID);
    char *n = tx_count("empty");
    cr_assert_str_eq(n, "0");
    free(n);
}

Test(ledger, entry_unit_must_be_its_accounts_unit)
{
    char *credits = account("user", "credits", "request");
    char *tx = begin_tx("unit-mismatch");
    const char *p[] = {tx, credits};
    cr_assert_eq(try("INSERT INTO ledger_entries (transaction_id, account_id, unit, amount) "
                     "VALUES ($1, $2, 'USD', 5)",
                     2, p),
                 BG_ERR_INVALID);
    bg_pg_rollback(conn);
    free(tx);
    tx = begin_tx("zero-amount");
    p[0] = tx;
    cr_assert_eq(try("INSERT INTO ledger_entries (transaction_id, account_id, unit, amount) "
                     "VALUES ($1, $2, 'request', 0)",
                     2, p),
                 BG_ERR_INVALID, "a zero amount is refused");
    bg_pg_rollback(conn);
    free(tx);
    free(credits);
}

Test(ledger, entries_cannot_be_updated_or_deleted)
{
    char *grants = account("system", "grants", "request");
    char *credits = account("user", "credits", "request");
    char *tx = begin_tx("grant:immutable");
    entry(tx, credits, "request", "100");
    entry(tx, grants, "request", "-100");
    cr_assert_eq(bg_pg_commit(conn), 0);

    const char *p[] = {credits};
    bg_pg_error_t e;
    PGresult *res;
    cr_assert_eq(bg_pg_exec_ex(conn,
                               "UPDATE ledger_entries SET amount = 1000 WHERE account_id = $1", 1,
                               p, &res, &e),
                 BG_ERR_INVALID);
    cr_assert_not_null(strstr(e.message, "append-only"), "%s", e.message);
    cr_assert_eq(try("DELETE FROM ledger_entries WHERE account_id = $1", 1, p), BG_ERR_INVALID);
    cr_assert_eq(try("TRUNCATE ledger_entries", 0, NULL), BG_ERR_INVALID);
    const char *tp[] = {tx};
    cr_assert_eq(try("UPDATE ledger_transactions SET kind = 'other' WHERE id = $1", 1, tp),
                 BG_ERR_INVALID);
    cr_assert_eq(try("DELETE FROM ledger_transactions WHERE id = $1", 1, tp), BG_ERR_INVALID);

    char *b = balance(credits);
    cr_assert_str_eq(b, "100");
    free(b);
    char *n = q("SELECT count(*) FROM ledger_entries", 0, NULL);
    cr_assert_str_eq(n, "2");
    free(n);
    free(tx);
    free(grants);
    free(credits);
}

Test(ledger, duplicate_idempotency_key_is_refused)
{
    char *grants = account("system", "grants", "request");
    char *credits = account("user", "credits", "request");
    char *tx = begin_tx("paddle:evt_01");
    entry(tx, credits, "request", "100");
    entry(tx, grants, "request", "-100");
    cr_assert_eq(bg_pg_commit(conn), 0);

    /* a redelivered event: the plain insert conflicts, the idempotent form inserts nothing */
    cr_assert_eq(try("INSERT INTO ledger_transactions (idempotency_key, kind) "
                     "VALUES ('paddle:evt_01', 'test')",
                     0, NULL),
                 BG_ERR_CONFLICT);
    PGresult *res;
    cr_assert_eq(bg_pg_exec(conn,
                            "INSERT INTO ledger_transactions (idempotency_key, kind) "
                            "VALUES ('paddle:evt_01', 'test') "
                            "ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
                            0, NULL, &res),
                 0);
    cr_assert_eq(PQntuples(res), 0);
    PQclear(res);
    char *b = balance(credits);
    cr_assert_str_eq(b, "100");
    free(b);
    free(tx);
    free(grants);
    free(credits);
}

Test(schema, user_email_is_unique_case_insensitively)
{
    cr_assert_eq(try("INSERT INTO users (email, name) VALUES ('Alice@Example.com', 'A')", 0, NULL),
                 0);
    bg_pg_error_t e;
    PGresult *res;
    cr_assert_eq(bg_pg_exec_ex(conn, "INSERT INTO users (email) VALUES ('alice@example.COM')", 0,
                               NULL, &res, &e),
                 BG_ERR_CONFLICT);
    cr_assert_str_eq(e.constraint, "users_email_key");
    /* found whatever the case */
    char *n =
        q("SELECT count(*) FROM users WHERE lower(email) = lower('ALICE@example.com')", 0, NULL);
    cr_assert_str_eq(n, "1");
    free(n);
    /* a deleted account frees its address */
    cr_assert_eq(
        try("UPDATE users SET deleted_at = now() WHERE email = 'Alice@Example.com'", 0, NULL), 0);
    cr_assert_eq(try("INSERT INTO users (email) VALUES ('alice@example.com')", 0, NULL), 0);
}

Test(schema, user_fields_are_checked)
{
    cr_assert_eq(try("INSERT INTO users (email, role) VALUES ('a@b.co', 'root')", 0, NULL),
                 BG_ERR_INVALID);
    cr_assert_eq(
        try("INSERT INTO users (email, password_hash) VALUES ('a@b.co', 'plain')", 0, NULL),
        BG_ERR_INVALID, "only argon2id hashes are stored");
    char *locale =
        q("INSERT INTO users (email) VALUES ('a@b.co') RETURNING locale || '/' || status "
          "|| '/' || role",
          0, NULL);
    cr_assert_str_eq(locale, "en/active/user");
    free(locale);
}

Test(schema, prompt_versions_are_immutable)
{
    char *prompt = q("INSERT INTO prompts (name) VALUES ('greeter') RETURNING id", 0, NULL);
    const char *p[] = {prompt};
    cr_assert_eq(try("INSERT INTO prompt_versions (prompt_id, version, template) "
                     "VALUES ($1, 1, 'You are kind.')",
                     1, p),
                 0);
    cr_assert_eq(
        try("UPDATE prompt_versions SET template = 'You are rude.' WHERE prompt_id = $1", 1, p),
        BG_ERR_INVALID);
    cr_assert_eq(try("DELETE FROM prompt_versions WHERE prompt_id = $1", 1, p), BG_ERR_INVALID);
    char *t = q("SELECT template FROM prompt_versions WHERE prompt_id = $1", 1, p);
    cr_assert_str_eq(t, "You are kind.");
    free(t);
    /* a prompt's current version must exist (checked at commit) */
    cr_assert_eq(try("UPDATE prompts SET current_version = 1 WHERE id = $1", 1, p), 0);
    cr_assert_eq(try("UPDATE prompts SET current_version = 2 WHERE id = $1", 1, p), BG_ERR_INVALID);
    free(prompt);
}

Test(schema, usage_is_recorded_and_rolled_up_once)
{
    char *user = q("INSERT INTO users (email) VALUES ('u@example.com') RETURNING id", 0, NULL);
    const char *p[] = {user};
    const char *sql =
        "INSERT INTO usage_records (request_id, user_id, channel, model, prompt_tokens, "
        "completion_tokens, token_source, latency_ms, status) "
        "VALUES ('job-1', $1, 'web', 'm', 10, 5, 'provider', 120, 'ok') "
        "ON CONFLICT (request_id) DO NOTHING";
    cr_assert_eq(try(sql, 1, p), 0);
    cr_assert_eq(try(sql, 1, p), 0); /* redelivered */
    char *r = q("SELECT requests || '/' || prompt_tokens || '/' || completion_tokens "
                "FROM usage_daily WHERE user_id = $1",
                1, p);
    cr_assert_str_eq(r, "1/10/5");
    free(r);
    free(user);
}

Test(schema, one_live_subscription_per_user)
{
    char *user = q("INSERT INTO users (email) VALUES ('s@example.com') RETURNING id", 0, NULL);
    const char *p[] = {user};
    char *acct = q("INSERT INTO billing_accounts (user_id) VALUES ($1) RETURNING id", 1, p);
    const char *sp[] = {acct, user};
    const char *sql = "INSERT INTO subscriptions (billing_account_id, user_id, plan_id, status, "
                      "current_period_start, current_period_end) "
                      "VALUES ($1, $2, 'trial', 'trialing', now(), now() + interval '14 days')";
    cr_assert_eq(try(sql, 2, sp), 0);
    cr_assert_eq(try(sql, 2, sp), BG_ERR_CONFLICT);
    /* once the trial is canceled, a paid plan can start */
    cr_assert_eq(try("UPDATE subscriptions SET status = 'canceled', canceled_at = now() "
                     "WHERE user_id = $2 AND billing_account_id = $1",
                     2, sp),
                 0);
    cr_assert_eq(try("INSERT INTO subscriptions (billing_account_id, user_id, plan_id, status, "
                     "current_period_start, current_period_end) "
                     "VALUES ($1, $2, 'gold', 'active', now(), now() + interval '1 day')",
                     2, sp),
                 BG_ERR_INVALID, "unknown plan");
    cr_assert_eq(try("INSERT INTO subscriptions (billing_account_id, user_id, plan_id, status, "
                     "current_period_start, current_period_end) "
                     "VALUES ($1, $2, 'monthly', 'active', now(), now() + interval '1 month')",
                     2, sp),
                 0);
    free(acct);
    free(user);
}

Test(schema, webhook_events_are_recorded_once)
{
    const char *sql = "INSERT INTO webhook_inbox (provider, event_id, event_type, payload) "
                      "VALUES ('paddle', 'evt_1', 'transaction.completed', '{}') "
                      "ON CONFLICT (provider, event_id) DO NOTHING RETURNING id";
    char *first = q(sql, 0, NULL);
    char *second = q(sql, 0, NULL);
    cr_assert_str_neq(first, "");
    cr_assert_str_eq(second, "");
    free(first);
    free(second);
}
