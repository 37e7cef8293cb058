/*
 * `bgctl plan grant` and `bgctl quota rebuild|show` as an operator runs them, on the real schema
 * and a private Redis: a grant is one balanced ledger transaction and is not recorded twice; a
 * Redis that lost everything gets back exactly the usage Postgres knows of; drift is reported.
 */
#include <criterion/criterion.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/err.h"
#include "bg/pg.h"
#include "bg/plans.h"
#include "bg/policy.h"
#include "bg/redis.h"
#include "bgtest.h"

#define SHARDS 16

static bgt_pg_t db;
static bgt_redis_t redis;
static PGconn *conn;
static bg_redis_t *rc_;

static void setup(void)
{
    cr_assert_eq(bgt_pg_create(&db, true), 0);
    cr_assert_eq(bgt_redis_start(&redis), 0);
    char err[512];
    cr_assert_eq(bg_pg_connect(db.url, 3, &conn, err, sizeof(err)), 0, "connect: %s", err);
    cr_assert_eq(bg_redis_new(redis.url, 2000, &rc_), 0);
}

static void teardown(void)
{
    bg_redis_free(rc_);
    rc_ = NULL;
    PQfinish(conn);
    conn = NULL;
    bgt_redis_stop(&redis);
    bgt_pg_drop(&db);
}

TestSuite(bgctl_quota, .init = setup, .fini = teardown);

/* Runs bgctl with the arguments (NULL-terminated); returns the exit status, output in out. */
static int bgctl(char *out, size_t outlen, const char *const args[])
{
    char env_db[600], env_redis[200];
    snprintf(env_db, sizeof(env_db), "BG_DATABASE_URL=%s", db.url);
    snprintf(env_redis, sizeof(env_redis), "BG_REDIS_URL=%s", redis.url);
    const char *env[] = {env_db, env_redis, "BG_LOG_LEVEL=warn", "BG_SHARDS=16", NULL};
    const char *argv[16] = {bgt_bin("bgctl")};
    int n = 1;
    for (int i = 0; args[i] != NULL && n < 15; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    return bgt_run(argv, env, out, outlen);
}

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

static char *make_user(const char *email)
{
    const char *p[] = {email};
    return q("WITH u AS (INSERT INTO users (email) VALUES ($1) RETURNING id), "
             "o AS (INSERT INTO organizations (name, personal, owner_id) "
             "  SELECT 'ws', true, id FROM u RETURNING id, owner_id), "
             "m AS (INSERT INTO memberships (organization_id, user_id, role) "
             "  SELECT id, owner_id, 'owner' FROM o) "
             "SELECT id FROM u",
             1, p);
}

/* Returns field of the user's hash kind ("adm" or "quota") as a new string ("" when absent). */
static char *hget(const char *kind, const char *user, const char *field)
{
    char key[BG_REDIS_KEY_MAX];
    if (strcmp(kind, "adm") == 0)
        cr_assert_eq(bg_policy_key_adm(key, sizeof(key), SHARDS, user), 0);
    else
        cr_assert_eq(bg_policy_key_quota(key, sizeof(key), SHARDS, user), 0);
    redisReply *reply;
    cr_assert_eq(bg_redis_command(rc_, &reply, "HGET %s %s", key, field), 0);
    char *v = strdup(reply->type == REDIS_REPLY_STRING ? reply->str : "");
    freeReplyObject(reply);
    return v;
}

static void expect_field(const char *kind, const char *user, const char *field, const char *want)
{
    char *v = hget(kind, user, field);
    cr_expect_str_eq(v, want, "%s.%s: %s", kind, field, v);
    free(v);
}

static void expect_q(const char *sql, const char *param, const char *want)
{
    const char *p[] = {param};
    char *v = q(sql, param != NULL ? 1 : 0, param != NULL ? p : NULL);
    cr_expect_str_eq(v, want, "%s", sql);
    free(v);
}

Test(bgctl_quota, plan_grant_records_one_balanced_transaction)
{
    char *u = make_user("Grant@Example.com");
    /* a trial that the grant replaces */
    const char *up[] = {u};
    free(q("WITH b AS (INSERT INTO billing_accounts (user_id) VALUES ($1) RETURNING id) "
           "INSERT INTO subscriptions (billing_account_id, user_id, plan_id, status, "
           "current_period_start, current_period_end, trial_ends_at) SELECT id, $1, 'trial', "
           "'trialing', now(), now() + interval '14 days', now() + interval '14 days' FROM b "
           "RETURNING id",
           1, up));

    char out[4096];
    const char *sub = "0190a0b0-0000-7000-8000-00000000c0de";
    const char *args[] = {"plan",   "grant",  "--email", "grant@example.com",
                          "--plan", "weekly", "--days",  "14",
                          "--id",   sub,      NULL};
    cr_assert_eq(bgctl(out, sizeof(out), args), 0, "%s", out);
    cr_assert_not_null(strstr(out, "granted plan weekly"), "%s", out);
    cr_assert_not_null(strstr(out, "replaced live subscription"), "%s", out);

    expect_q("SELECT status || ' ' || plan_id || ' ' || "
             "extract(day FROM current_period_end - current_period_start) || ' ' || "
             "(paddle_subscription_id IS NULL) FROM subscriptions WHERE id = $1",
             sub, "active weekly 14 true");
    expect_q("SELECT string_agg(plan_id || ':' || status, ',' ORDER BY created_at) "
             "FROM subscriptions WHERE user_id = $1",
             u, "trial:canceled,weekly:active");
    /* one transaction, two entries, balanced, 2 weekly windows × 1,000 */
    const char *key_p = "grant:0190a0b0-0000-7000-8000-00000000c0de";
    expect_q("SELECT count(*) FROM ledger_transactions WHERE idempotency_key = $1", key_p, "1");
    expect_q("SELECT count(*) || ' ' || sum(e.amount) || ' ' || max(e.amount) || ' ' || "
             "bool_and(e.unit = 'request') FROM ledger_entries e JOIN ledger_transactions t "
             "ON t.id = e.transaction_id WHERE t.idempotency_key = $1",
             key_p, "2 0 2000 true");
    expect_q("SELECT balance FROM ledger_balances WHERE owner_id = $1 AND purpose = 'credits'", u,
             "2000");
    expect_q("SELECT balance FROM ledger_balances WHERE owner_type = 'system' "
             "AND purpose = 'grants'",
             NULL, "-2000");
    expect_q("SELECT action || ' ' || (details->>'plan') FROM audit_log WHERE target_id = $1", sub,
             "plan.grant weekly");
    /* and Redis knows at once */
    expect_field("adm", u, "status", "active");
    expect_field("adm", u, "plan", "weekly");
    expect_field("adm", u, "q_limit", "1000");

    /* the same grant again: nothing changes */
    cr_assert_eq(bgctl(out, sizeof(out), args), 0, "%s", out);
    cr_assert_not_null(strstr(out, "already granted"), "%s", out);
    expect_q("SELECT count(*) FROM subscriptions WHERE user_id = $1", u, "2");
    expect_q("SELECT count(*) FROM ledger_transactions WHERE user_id = $1", u, "1");
    bool recorded = true;
    char tx[37];
    cr_assert_eq(bg_plans_grant_record(conn, sub, &recorded, tx), 0);
    cr_assert_not(recorded, "recording the same subscription again records nothing");
    expect_q("SELECT count(*) FROM ledger_entries", NULL, "2");
    expect_q("SELECT balance FROM ledger_balances WHERE owner_id = $1 AND purpose = 'credits'", u,
             "2000");

    /* a second grant is a new subscription and a second transaction; accounts are reused */
    const char *args2[] = {"plan", "grant", "--user", u, "--plan", "daily", "--days", "3", NULL};
    cr_assert_eq(bgctl(out, sizeof(out), args2), 0, "%s", out);
    expect_q("SELECT count(*) FROM ledger_transactions WHERE user_id = $1", u, "2");
    expect_q("SELECT count(*) FROM ledger_accounts", NULL, "2");
    expect_q("SELECT balance FROM ledger_balances WHERE owner_id = $1 AND purpose = 'credits'", u,
             "2300");
    expect_field("adm", u, "plan", "daily");
    free(u);
}

Test(bgctl_quota, plan_grant_refuses_bad_input)
{
    char out[4096];
    char *u = make_user("x@example.com");
    const char *unknown[] = {"plan",   "grant", "--email", "nobody@example.com", "--plan", "daily",
                             "--days", "3",     NULL};
    cr_assert_eq(bgctl(out, sizeof(out), unknown), 1, "%s", out);
    cr_assert_not_null(strstr(out, "no such user"), "%s", out);
    const char *plan[] = {"plan",   "grant", "--email", "x@example.com", "--plan", "platinum",
                          "--days", "3",     NULL};
    cr_assert_eq(bgctl(out, sizeof(out), plan), 1, "%s", out);
    cr_assert_not_null(strstr(out, "no such plan"), "%s", out);
    const char *days[] = {"plan",   "grant", "--email", "x@example.com", "--plan", "daily",
                          "--days", "0",     NULL};
    cr_assert_eq(bgctl(out, sizeof(out), days), 2, "%s", out);
    expect_q("SELECT count(*) FROM subscriptions", NULL, "0");
    expect_q("SELECT count(*) FROM ledger_transactions", NULL, "0");
    free(u);
}

/* Inserts a usage record created ago_ms before now. */
static void usage(const char *user, const char *status, int charged, int tokens, int64_t ago_ms)
{
    static int seq;
    char id[32], c[16], t[16], ago[24];
    snprintf(id, sizeof(id), "job-%d", ++seq);
    snprintf(c, sizeof(c), "%d", charged);
    snprintf(t, sizeof(t), "%d", tokens);
    snprintf(ago, sizeof(ago), "%" PRId64, ago_ms);
    const char *p[] = {id, user, status, c, t, ago};
    free(q("INSERT INTO usage_records (request_id, user_id, channel, prompt_tokens, "
           "completion_tokens, token_source, status, error_class, requests_charged, created_at) "
           "VALUES ($1, $2, 'web', $5::int, 1, 'provider', $3, "
           "CASE WHEN $3 = 'ok' THEN NULL ELSE 'x' END, $4::int, "
           "now() - $6::bigint * interval '1 ms') RETURNING id",
           6, p));
}

Test(bgctl_quota, rebuild_restores_exact_counts_after_flushall)
{
    char *u = make_user("rebuild@example.com");
    char *v = make_user("second@example.com");
    const char *up[] = {u};
    free(q("WITH b AS (INSERT INTO billing_accounts (user_id) VALUES ($1) RETURNING id) "
           "INSERT INTO subscriptions (billing_account_id, user_id, plan_id, status, "
           "current_period_start, current_period_end, paddle_subscription_id) SELECT id, $1, "
           "'monthly', 'active', now() - interval '5 days', now() + interval '25 days', 'sub_1' "
           "FROM b RETURNING id",
           1, up));
    const int64_t h = 3600 * 1000;
    usage(u, "ok", 1, 10, h);          /* counted */
    usage(u, "ok", 1, 20, 2 * h);      /* counted */
    usage(u, "ok", 1, 30, 4 * 24 * h); /* counted: 4 days ago is in the period */
    usage(u, "canceled", 1, 40, h);    /* counted: the user stopped it, tokens were spent */
    usage(u, "error", 1, 50, h);       /* not counted: failed */
    usage(u, "ok", 0, 60, h);          /* refunded */
    usage(u, "ok", 1, 70, 6 * 24 * h); /* before the period */
    usage(v, "ok", 1, 80, h);          /* someone else */

    redisReply *reply;
    cr_assert_eq(bg_redis_command(rc_, &reply, "FLUSHALL"), 0);
    freeReplyObject(reply);

    char out[8192];
    const char *one[] = {"quota", "rebuild", "--user", u, NULL};
    cr_assert_eq(bgctl(out, sizeof(out), one), 0, "%s", out);
    cr_assert_not_null(strstr(out, "used=4"), "%s", out);
    expect_field("quota", u, "used", "4");
    expect_field("quota", u, "tused", "104"); /* (10 + 20 + 30 + 40) prompt + 4 completion */
    char *win = q("SELECT floor(extract(epoch FROM current_period_start) * 1000)::bigint "
                  "FROM subscriptions WHERE user_id = $1",
                  1, up);
    expect_field("quota", u, "win", win);
    expect_field("adm", u, "w_anchor", win);
    expect_field("adm", u, "status", "active");
    expect_field("adm", u, "q_limit", "10000");
    free(win);

    /* Redis and Postgres agree */
    const char *show[] = {"quota", "show", "--email", "REBUILD@example.com", NULL};
    cr_assert_eq(bgctl(out, sizeof(out), show), 0, "%s", out);
    cr_assert_not_null(strstr(out, "drift: none"), "%s", out);
    cr_assert_not_null(strstr(out, "remaining=9996"), "%s", out);

    /* a counter that went wrong is reported, and rebuild --all repairs everyone */
    char key[BG_REDIS_KEY_MAX];
    cr_assert_eq(bg_policy_key_quota(key, sizeof(key), SHARDS, u), 0);
    cr_assert_eq(bg_redis_command(rc_, &reply, "HSET %s used 99", key), 0);
    freeReplyObject(reply);
    cr_assert_eq(bgctl(out, sizeof(out), show), 1, "%s", out);
    cr_assert_not_null(strstr(out, "drift: used redis=99 postgres=4"), "%s", out);

    cr_assert_eq(bg_redis_command(rc_, &reply, "FLUSHALL"), 0);
    freeReplyObject(reply);
    const char *show_v[] = {"quota", "show", "--user", v, NULL};
    cr_assert_eq(bgctl(out, sizeof(out), show_v), 1, "%s", out);
    cr_assert_not_null(strstr(out, "admission state missing"), "%s", out);

    const char *all[] = {"quota", "rebuild", "--all", NULL};
    cr_assert_eq(bgctl(out, sizeof(out), all), 0, "%s", out);
    cr_assert_not_null(strstr(out, "rebuilt 2 user(s), 0 failed"), "%s", out);
    expect_field("quota", u, "used", "4");
    expect_field("adm", v, "status", "none");
    expect_field("quota", v, "used", "0");
    cr_assert_eq(bgctl(out, sizeof(out), show), 0, "%s", out);
    cr_assert_eq(bgctl(out, sizeof(out), show_v), 0, "%s", out);

    const char *bad[] = {"quota", "rebuild", NULL};
    cr_assert_eq(bgctl(out, sizeof(out), bad), 2, "%s", out);
    free(u);
    free(v);
}
