/*
 * Complimentary plan grants and their ledger record (see bg/plans.h).
 *
 * The grant runs in one transaction that first locks the user's row, so two grants for one user
 * (bgctl and the admin API at once) queue up instead of racing on the one-live-subscription index.
 * The ledger record is a separate function because it is idempotent on its own (unique
 * idempotency key "grant:<subscription id>", INSERT … ON CONFLICT DO NOTHING): a grant retried with
 * the same subscription id, or a repair job, can call it again without counting twice.
 */
#include "bg/plans.h"

#include <stdio.h>
#include <string.h>

#include "bg/err.h"
#include "bg/id.h"
#include "bg/log.h"
#include "bg/pg.h"

static void copy_value(char *dst, size_t len, const PGresult *res, int row, int col)
{
    const char *v = bg_pg_value(res, row, col);
    (void)bg_strlcpy(dst, v != NULL ? v : "", len);
}

/* Finds or creates the ledger account (owner, purpose, 'request') and copies its id into id. */
static int ledger_account(PGconn *c, const char *owner_type, const char *owner_id,
                          const char *purpose, char id[37])
{
    const char *p[] = {owner_type, owner_id, purpose};
    int rc = bg_pg_run(c,
                       "INSERT INTO ledger_accounts (owner_type, owner_id, purpose, unit) "
                       "VALUES ($1, $2::uuid, $3, 'request') "
                       "ON CONFLICT (owner_type, owner_id, purpose, unit) DO NOTHING",
                       3, p);
    if (rc != 0)
        return rc;
    PGresult *res;
    rc = bg_pg_exec(c,
                    "SELECT id FROM ledger_accounts WHERE owner_type = $1 "
                    "AND owner_id IS NOT DISTINCT FROM $2::uuid AND purpose = $3 "
                    "AND unit = 'request'",
                    3, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) != 1)
        rc = BG_ERR_PROTOCOL;
    else
        copy_value(id, 37, res, 0, 0);
    PQclear(res);
    return rc;
}

/*
 * Records the grant of subscription_id inside the caller's transaction. The amount is the plan's
 * request limit times the quota windows of the period (plan periods from its start, the last one
 * cut at its end), computed on calendar intervals like the policy compiler's windows.
 */
static int record_in_tx(PGconn *c, const char *subscription_id, bool *recorded, char *tx_id,
                        int64_t *requests)
{
    *recorded = false;
    PGresult *res;
    const char *sp[] = {subscription_id};
    int rc = bg_pg_exec(
        c,
        "SELECT s.user_id, s.plan_id, p.request_limit * (SELECT count(*) FROM generate_series(0, "
        "  ceil(extract(epoch FROM s.current_period_end - s.current_period_start) / "
        "  extract(epoch FROM p.period))::bigint + 2) AS k "
        "  WHERE (s.current_period_start AT TIME ZONE 'UTC') + k * p.period "
        "    < (s.current_period_end AT TIME ZONE 'UTC')), "
        "  extract(day FROM s.current_period_end - s.current_period_start)::int "
        "FROM subscriptions s JOIN plans p ON p.id = s.plan_id WHERE s.id = $1::uuid",
        1, sp, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) == 0) {
        PQclear(res);
        return BG_ERR_NOT_FOUND;
    }
    char user_id[37], plan_id[40], amount[24], neg[26], days[16];
    copy_value(user_id, sizeof(user_id), res, 0, 0);
    copy_value(plan_id, sizeof(plan_id), res, 0, 1);
    copy_value(amount, sizeof(amount), res, 0, 2);
    copy_value(days, sizeof(days), res, 0, 3);
    int64_t n = 0;
    if (bg_pg_int64(res, 0, 2, &n) != 0 || n <= 0) {
        PQclear(res);
        return BG_ERR_PROTOCOL; /* plans.request_limit > 0, so a period holds at least one */
    }
    PQclear(res);
    if (requests != NULL)
        *requests = n;
    snprintf(neg, sizeof(neg), "-%s", amount);

    char credits[37], grants[37];
    rc = ledger_account(c, "user", user_id, "credits", credits);
    if (rc == 0)
        rc = ledger_account(c, "system", NULL, "grants", grants);
    if (rc != 0)
        return rc;

    const char *tp[] = {subscription_id, user_id, plan_id, days, amount};
    rc = bg_pg_exec(c,
                    "INSERT INTO ledger_transactions (idempotency_key, kind, description, "
                    "user_id, metadata) VALUES ('grant:' || $1, 'grant.plan', "
                    "'complimentary ' || $3 || ' plan for ' || $4 || ' days', $2::uuid, "
                    "jsonb_build_object('subscription_id', $1::text, 'plan', $3::text, "
                    "'days', $4::int, 'requests', $5::bigint)) "
                    "ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
                    5, tp, &res);
    if (rc != 0)
        return rc;
    char tx[37] = "";
    if (PQntuples(res) == 1) {
        copy_value(tx, sizeof(tx), res, 0, 0);
        *recorded = true;
    }
    PQclear(res);
    if (!*recorded) {
        rc = bg_pg_exec(c,
                        "SELECT id FROM ledger_transactions WHERE idempotency_key = 'grant:' || $1",
                        1, sp, &res);
        if (rc != 0)
            return rc;
        copy_value(tx, sizeof(tx), res, 0, 0);
        PQclear(res);
    } else {
        const char *ep[] = {tx, credits, amount, grants, neg};
        rc = bg_pg_run(c,
                       "INSERT INTO ledger_entries (transaction_id, account_id, unit, amount) "
                       "VALUES ($1::uuid, $2::uuid, 'request', $3::bigint), "
                       "($1::uuid, $4::uuid, 'request', $5::bigint)",
                       5, ep);
        if (rc != 0)
            return rc;
    }
    if (tx_id != NULL)
        (void)bg_strlcpy(tx_id, tx, 37);
    return 0;
}

int bg_plans_grant_record(PGconn *c, const char *subscription_id, bool *recorded, char *tx_id)
{
    *recorded = false;
    if (!bg_id_uuid_is_valid(subscription_id))
        return BG_ERR_NOT_FOUND;
    int rc = bg_pg_begin(c);
    if (rc != 0)
        return rc;
    rc = record_in_tx(c, subscription_id, recorded, tx_id, NULL);
    if (rc != 0) {
        bg_pg_rollback(c);
        *recorded = false;
        return rc;
    }
    rc = bg_pg_commit(c);
    if (rc != 0)
        *recorded = false;
    return rc;
}

/* Locks the live user named by g and copies the id into out->user_id. */
static int lock_user(PGconn *c, const bg_plan_grant_t *g, bg_plan_grant_result_t *out)
{
    PGresult *res;
    const char *p[] = {g->user_id != NULL ? g->user_id : g->email};
    int rc = bg_pg_exec(c,
                        g->user_id != NULL
                            ? "SELECT id FROM users WHERE id = $1::uuid AND deleted_at IS NULL "
                              "FOR UPDATE"
                            : "SELECT id FROM users WHERE lower(email) = lower($1) "
                              "AND deleted_at IS NULL FOR UPDATE",
                        1, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) == 0) {
        PQclear(res);
        out->what = "user";
        return BG_ERR_NOT_FOUND;
    }
    copy_value(out->user_id, sizeof(out->user_id), res, 0, 0);
    PQclear(res);
    return 0;
}

/* Reads the period of subscription s into out. */
static int read_period(PGconn *c, const char *s, bg_plan_grant_result_t *out)
{
    PGresult *res;
    const char *p[] = {s};
    int rc = bg_pg_exec(c,
                        "SELECT floor(extract(epoch FROM current_period_start) * 1000)::bigint, "
                        "floor(extract(epoch FROM current_period_end) * 1000)::bigint "
                        "FROM subscriptions WHERE id = $1::uuid",
                        1, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) == 0 || bg_pg_int64(res, 0, 0, &out->period_start_ms) != 0 ||
        bg_pg_int64(res, 0, 1, &out->period_end_ms) != 0)
        rc = BG_ERR_PROTOCOL;
    PQclear(res);
    return rc;
}

/*
 * The grant's writes after the user is locked: a subscription that exists already ends here;
 * otherwise the billing account, the replacement of the live subscription, the new one, the ledger
 * record and the audit row.
 */
static int grant_in_tx(PGconn *c, const bg_plan_grant_t *g, const bg_actor_t *actor,
                       const char *sub_id, bg_plan_grant_result_t *out)
{
    PGresult *res;
    const char *sp[] = {sub_id};
    int rc = bg_pg_exec(c, "SELECT user_id FROM subscriptions WHERE id = $1::uuid", 1, sp, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) > 0) {
        bool mine = strcmp(PQgetvalue(res, 0, 0), out->user_id) == 0;
        PQclear(res);
        if (!mine)
            return BG_ERR_CONFLICT;
        bool recorded;
        rc = record_in_tx(c, sub_id, &recorded, out->ledger_transaction_id, &out->requests);
        return rc != 0 ? rc : read_period(c, sub_id, out);
    }
    PQclear(res);

    const char *pp[] = {g->plan_id};
    rc = bg_pg_exec(c, "SELECT 1 FROM plans WHERE id = $1", 1, pp, &res);
    if (rc != 0)
        return rc;
    bool plan_found = PQntuples(res) > 0;
    PQclear(res);
    if (!plan_found) {
        out->what = "plan";
        return BG_ERR_NOT_FOUND;
    }

    const char *up[] = {out->user_id};
    rc = bg_pg_exec(c,
                    "WITH ins AS (INSERT INTO billing_accounts (user_id) VALUES ($1::uuid) "
                    "  ON CONFLICT (user_id) DO NOTHING RETURNING id) "
                    "SELECT id FROM ins UNION ALL "
                    "SELECT id FROM billing_accounts WHERE user_id = $1::uuid LIMIT 1",
                    1, up, &res);
    if (rc != 0)
        return rc;
    char account[37];
    copy_value(account, sizeof(account), res, 0, 0);
    PQclear(res);

    rc = bg_pg_exec(c,
                    "UPDATE subscriptions SET status = 'canceled', canceled_at = now() "
                    "WHERE user_id = $1::uuid AND status <> 'canceled' "
                    "RETURNING id, paddle_subscription_id IS NOT NULL",
                    1, up, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) > 0) {
        copy_value(out->replaced_id, sizeof(out->replaced_id), res, 0, 0);
        out->replaced_paddle = strcmp(PQgetvalue(res, 0, 1), "t") == 0;
    }
    PQclear(res);

    char days[16];
    snprintf(days, sizeof(days), "%d", g->days);
    const char *ip[] = {sub_id, account, out->user_id, g->plan_id, days};
    rc = bg_pg_run(c,
                   "INSERT INTO subscriptions (id, billing_account_id, user_id, plan_id, status, "
                   "current_period_start, current_period_end) VALUES ($1::uuid, $2::uuid, "
                   "$3::uuid, $4, 'active', now(), now() + make_interval(days => $5::int))",
                   5, ip);
    if (rc != 0)
        return rc;
    bool recorded;
    rc = record_in_tx(c, sub_id, &recorded, out->ledger_transaction_id, &out->requests);
    if (rc != 0)
        return rc;
    rc = read_period(c, sub_id, out);
    if (rc != 0)
        return rc;

    char requests[24];
    snprintf(requests, sizeof(requests), "%lld", (long long)out->requests);
    const bg_actor_t sys = {.kind = "system"};
    const bg_actor_t *a = actor != NULL && actor->kind != NULL ? actor : &sys;
    const char *ap[] = {
        a->kind,       a->id,        sub_id,
        a->request_id, a->ip,        g->plan_id,
        days,          out->user_id, out->replaced_id[0] != '\0' ? out->replaced_id : NULL,
        requests};
    rc = bg_pg_run(c,
                   "INSERT INTO audit_log (actor_kind, actor_id, action, target_type, target_id, "
                   "request_id, ip, details) VALUES ($1, $2::uuid, 'plan.grant', 'subscription', "
                   "$3, $4, $5::inet, jsonb_build_object('plan', $6::text, 'days', $7::int, "
                   "'user_id', $8::text, 'replaced', $9::text, 'requests', $10::bigint))",
                   10, ap);
    if (rc == 0)
        out->created = true;
    return rc;
}

int bg_plans_grant(PGconn *c, const bg_plan_grant_t *g, const bg_actor_t *actor,
                   bg_plan_grant_result_t *out)
{
    memset(out, 0, sizeof(*out));
    if (g->days < 1 || g->days > BG_PLANS_GRANT_DAYS_MAX || !bg_str_present(g->plan_id) ||
        (g->user_id == NULL && !bg_str_present(g->email)))
        return BG_ERR_INVALID;
    if (g->user_id != NULL && !bg_id_uuid_is_valid(g->user_id)) {
        out->what = "user";
        return BG_ERR_NOT_FOUND;
    }
    if (g->subscription_id != NULL && !bg_id_uuid_is_valid(g->subscription_id))
        return BG_ERR_INVALID;
    char sub_id[BG_UUID_STR_LEN + 1];
    if (g->subscription_id != NULL) {
        for (size_t i = 0; i <= BG_UUID_STR_LEN; i++) {
            char ch = g->subscription_id[i];
            sub_id[i] = (ch >= 'A' && ch <= 'Z') ? (char)(ch - 'A' + 'a') : ch;
        }
    } else {
        bg_id_uuid_v7_str(sub_id);
    }

    int rc = bg_pg_begin(c);
    if (rc != 0)
        return rc;
    rc = lock_user(c, g, out);
    if (rc == 0)
        rc = grant_in_tx(c, g, actor, sub_id, out);
    if (rc != 0) {
        bg_pg_rollback(c);
        out->created = false;
        return rc;
    }
    rc = bg_pg_commit(c);
    if (rc != 0) {
        out->created = false;
        return rc;
    }
    (void)bg_strlcpy(out->subscription_id, sub_id, sizeof(out->subscription_id));
    if (out->created)
        bg_info("plans: granted %s for %d days to user %s (subscription %s, %lld requests)",
                g->plan_id, g->days, out->user_id, sub_id, (long long)out->requests);
    return 0;
}
