/*
 * The plan catalogue, Paddle price ids from configuration, and complimentary plan grants with their
 * ledger record (see bg/plans.h).
 *
 * Catalogue edits are one UPDATE whose parameters are NULL for absent fields, after the row is
 * locked and read, so the audit row holds the exact before and after and two admins editing one
 * plan queue up. Periods are offered by name (day, week, month, year) and stored as intervals:
 * the policy compiler counts windows with the interval, so a name maps to exactly one of them.
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

#include "bg/billing.h"
#include "bg/buf.h"
#include "bg/err.h"
#include "bg/id.h"
#include "bg/json.h"
#include "bg/log.h"
#include "bg/pg.h"
#include "bg/policy.h"
#include "bg/policy_admin.h"
#include "bg/timeutil.h"
#include "bg/validate.h"

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
    char account[37];
    rc = bg_billing_account_of(c, out->user_id, account);
    if (rc != 0)
        return rc;

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

/* ---- the catalogue ---- */

static const struct {
    const char *name, *interval;
} periods[] = {{"day", "1 day"}, {"week", "7 days"}, {"month", "1 month"}, {"year", "1 year"}};

const char *bg_plans_period_interval(const char *period)
{
    for (size_t i = 0; period != NULL && i < BG_ARRAY_SIZE(periods); i++)
        if (strcmp(period, periods[i].name) == 0)
            return periods[i].interval;
    return NULL;
}

bool bg_plans_price_id_is_valid(const char *s)
{
    size_t n = s != NULL ? strlen(s) : 0;
    if (n == 0 || n >= BG_PLANS_PRICE_ID_SIZE)
        return false;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                  (ch >= '0' && ch <= '9') || ch == '_' || ch == '-';
        if (!ok)
            return false;
    }
    return true;
}

static bool feature_is_valid(const char *s)
{
    size_t n = s != NULL ? strlen(s) : 0;
    if (n == 0 || n >= BG_PLANS_FEATURE_SIZE || s[0] < 'a' || s[0] > 'z')
        return false;
    for (size_t i = 1; i < n; i++) {
        char ch = s[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_'))
            return false;
    }
    return true;
}

static int verr(bg_plans_verr_t *err, const char *field, const char *reason)
{
    if (err != NULL) {
        (void)bg_strlcpy(err->field, field, sizeof(err->field));
        err->reason = reason;
    }
    return BG_ERR_INVALID;
}

int bg_plans_update_validate(const bg_plan_update_t *u, bg_plans_verr_t *err)
{
    if (u->name != NULL) {
        size_t chars = bg_utf8_chars(u->name);
        if (chars == 0)
            return verr(err, "name", "too_short");
        if (chars > BG_PLANS_NAME_MAX)
            return verr(err, "name", "too_long");
    }
    if (u->has_price) {
        if (u->price_minor < 0 || u->price_minor > BG_PLANS_PRICE_MAX)
            return verr(err, "price.amount", "out_of_range");
        const char *cur = u->currency;
        if (cur != NULL && !(strlen(cur) == 3 && cur[0] >= 'A' && cur[0] <= 'Z' && cur[1] >= 'A' &&
                             cur[1] <= 'Z' && cur[2] >= 'A' && cur[2] <= 'Z'))
            return verr(err, "price.currency", "invalid_value");
    }
    if (u->has_requests && (u->requests < 1 || u->requests > BG_PLANS_REQUESTS_MAX))
        return verr(err, "requests", "out_of_range");
    if (u->period != NULL && bg_plans_period_interval(u->period) == NULL)
        return verr(err, "period", "invalid_value");
    if (u->has_features) {
        if (u->nfeatures > BG_PLANS_FEATURES_MAX)
            return verr(err, "features", "invalid_value");
        for (size_t i = 0; i < u->nfeatures; i++) {
            char field[32];
            snprintf(field, sizeof(field), "features[%zu]", i);
            if (!feature_is_valid(u->features[i]))
                return verr(err, field, "invalid_value");
            for (size_t k = 0; k < i; k++)
                if (strcmp(u->features[k], u->features[i]) == 0)
                    return verr(err, field, "invalid_value");
        }
    }
    if (u->has_paddle_price_id && u->paddle_price_id != NULL &&
        !bg_plans_price_id_is_valid(u->paddle_price_id))
        return verr(err, "paddle_price_id", "invalid_value");
    return 0;
}

#define PLAN_COLS                                                                                  \
    "id, name, price_minor, currency, request_limit, "                                             \
    "CASE period::text WHEN '1 day' THEN 'day' WHEN '7 days' THEN 'week' "                         \
    "  WHEN '1 mon' THEN 'month' WHEN '1 year' THEN 'year' ELSE period::text END, "                \
    "coalesce(duration::text, ''), array_to_string(features, ','), api_access, purchasable, "      \
    "active, coalesce(paddle_price_id, ''), coalesce(paddle_price_source, ''), sort_order, "       \
    "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), "                   \
    "to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"

static bool is_true(const PGresult *res, int row, int col)
{
    const char *v = bg_pg_value(res, row, col);
    return v != NULL && v[0] == 't';
}

/* An integer field, 0 when NULL or not a number (the columns are NOT NULL integers). */
static int64_t int_value(const PGresult *res, int row, int col)
{
    int64_t v = 0;
    return bg_pg_int64(res, row, col, &v) == 0 ? v : 0;
}

static void take_plan(const PGresult *res, int row, bg_plan_t *p)
{
    memset(p, 0, sizeof(*p));
    copy_value(p->id, sizeof(p->id), res, row, 0);
    copy_value(p->name, sizeof(p->name), res, row, 1);
    p->price_minor = int_value(res, row, 2);
    copy_value(p->currency, sizeof(p->currency), res, row, 3);
    p->requests = int_value(res, row, 4);
    copy_value(p->period, sizeof(p->period), res, row, 5);
    copy_value(p->duration, sizeof(p->duration), res, row, 6);
    const char *f = bg_pg_value(res, row, 7);
    while (f != NULL && *f != '\0' && p->nfeatures < BG_PLANS_FEATURES_MAX) {
        size_t len = strcspn(f, ",");
        if (len > 0 && len < BG_PLANS_FEATURE_SIZE) {
            memcpy(p->features[p->nfeatures], f, len);
            p->features[p->nfeatures++][len] = '\0';
        }
        f += len;
        if (*f == ',')
            f++;
    }
    p->api_access = is_true(res, row, 8);
    p->purchasable = is_true(res, row, 9);
    p->active = is_true(res, row, 10);
    copy_value(p->paddle_price_id, sizeof(p->paddle_price_id), res, row, 11);
    copy_value(p->paddle_price_source, sizeof(p->paddle_price_source), res, row, 12);
    p->sort_order = (int32_t)int_value(res, row, 13);
    copy_value(p->created_at, sizeof(p->created_at), res, row, 14);
    copy_value(p->updated_at, sizeof(p->updated_at), res, row, 15);
}

int bg_plans_list(PGconn *c, bool public_only, bg_plan_t *out, size_t max, size_t *count)
{
    *count = 0;
    PGresult *res;
    int rc =
        bg_pg_exec(c,
                   public_only ? "SELECT " PLAN_COLS " FROM plans WHERE active AND purchasable "
                                 "ORDER BY sort_order, id"
                               : "SELECT " PLAN_COLS " FROM plans ORDER BY sort_order, id",
                   0, NULL, &res);
    if (rc != 0)
        return rc;
    int rows = PQntuples(res);
    for (int i = 0; i < rows && *count < max; i++)
        take_plan(res, i, &out[(*count)++]);
    PQclear(res);
    return 0;
}

int bg_plans_get(PGconn *c, const char *id, bg_plan_t *out)
{
    PGresult *res;
    const char *p[] = {id};
    int rc = bg_pg_exec(c, "SELECT " PLAN_COLS " FROM plans WHERE id = $1", 1, p, &res);
    if (rc != 0)
        return rc;
    rc = PQntuples(res) == 1 ? 0 : BG_ERR_NOT_FOUND;
    if (rc == 0)
        take_plan(res, 0, out);
    PQclear(res);
    return rc;
}

static bool same_features(const bg_plan_t *a, const bg_plan_t *b)
{
    if (a->nfeatures != b->nfeatures)
        return false;
    for (size_t i = 0; i < a->nfeatures; i++)
        if (strcmp(a->features[i], b->features[i]) != 0)
            return false;
    return true;
}

bool bg_plans_admission_changed(const bg_plan_t *before, const bg_plan_t *after)
{
    return before->requests != after->requests || strcmp(before->period, after->period) != 0 ||
           !same_features(before, after);
}

/* Writes the editable fields of p as one object under key. */
static void write_audit_plan(bg_json_writer_t *w, const char *key, const bg_plan_t *p)
{
    bg_json_write_key(w, key);
    bg_json_write_begin_object(w);
    bg_json_write_field_str(w, "name", p->name);
    bg_json_write_field_int(w, "price_minor", p->price_minor);
    bg_json_write_field_str(w, "currency", p->currency);
    bg_json_write_field_int(w, "requests", p->requests);
    bg_json_write_field_str(w, "period", p->period);
    bg_json_write_key(w, "features");
    bg_json_write_begin_array(w);
    for (size_t i = 0; i < p->nfeatures; i++)
        bg_json_write_str(w, p->features[i]);
    bg_json_write_end_array(w);
    if (p->paddle_price_id[0] != '\0')
        bg_json_write_field_str(w, "paddle_price_id", p->paddle_price_id);
    else
        bg_json_write_field_null(w, "paddle_price_id");
    bg_json_write_field_bool(w, "active", p->active);
    bg_json_write_end_object(w);
}

static int audit_plan(PGconn *c, const bg_actor_t *actor, const char *action,
                      const bg_plan_t *before, const bg_plan_t *after)
{
    bg_buf_t buf;
    bg_buf_init(&buf, 65536);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &buf);
    bg_json_write_begin_object(&w);
    write_audit_plan(&w, "before", before);
    write_audit_plan(&w, "after", after);
    bg_json_write_end_object(&w);
    int rc = bg_json_write_finish(&w);
    const bg_actor_t sys = {.kind = "system"};
    if (rc == 0)
        rc = bg_acct_audit(c, actor != NULL && actor->kind != NULL ? actor : &sys, action, "plan",
                           after->id, buf.base);
    bg_buf_dispose(&buf);
    return rc;
}

/*
 * Builds the text[] literal of the features ({a,b}) with its NUL; names are [a-z0-9_] (checked),
 * so nothing needs quoting. Returns 0 or BG_ERR_TOO_LARGE.
 */
static int features_literal(const bg_plan_update_t *u, bg_buf_t *out)
{
    int rc = bg_buf_append(out, "{", 1);
    for (size_t i = 0; i < u->nfeatures && rc == 0; i++) {
        if (i > 0)
            rc = bg_buf_append(out, ",", 1);
        if (rc == 0)
            rc = bg_buf_append(out, u->features[i], strlen(u->features[i]));
    }
    return rc == 0 ? bg_buf_append(out, "}", 2) : rc;
}

int bg_plans_update(PGconn *c, const char *id, const bg_plan_update_t *u, const bg_actor_t *actor,
                    bg_plan_t *before, bg_plan_t *after, bg_plans_verr_t *err)
{
    int rc = bg_plans_update_validate(u, err);
    if (rc != 0)
        return rc;
    bg_plan_t *old = bg_calloc(2, sizeof(*old));
    bg_plan_t *new = old + 1;
    char price[24], requests[24];
    snprintf(price, sizeof(price), "%lld", (long long)u->price_minor);
    snprintf(requests, sizeof(requests), "%lld", (long long)u->requests);
    bg_buf_t feats;
    bg_buf_init(&feats, 8192);
    if (u->has_features && features_literal(u, &feats) != 0) {
        bg_buf_dispose(&feats);
        free(old);
        return verr(err, "features", "invalid_value");
    }
    const char *p[] = {id,
                       u->name,
                       u->has_price ? price : NULL,
                       u->has_price ? u->currency : NULL,
                       u->has_requests ? requests : NULL,
                       u->period != NULL ? bg_plans_period_interval(u->period) : NULL,
                       u->has_features ? "true" : "false",
                       u->has_features ? feats.base : NULL,
                       u->has_paddle_price_id ? "true" : "false",
                       u->has_paddle_price_id ? u->paddle_price_id : NULL,
                       u->has_active ? (u->active ? "true" : "false") : NULL};
    PGresult *res = NULL;
    bg_pg_error_t pe;
    rc = bg_pg_begin(c);
    if (rc != 0)
        goto out;
    const char *ip[] = {id};
    rc = bg_pg_exec(c, "SELECT " PLAN_COLS " FROM plans WHERE id = $1 FOR UPDATE", 1, ip, &res);
    if (rc != 0)
        goto err_rollback;
    if (PQntuples(res) != 1) {
        rc = BG_ERR_NOT_FOUND;
        goto err_clear;
    }
    take_plan(res, 0, old);
    PQclear(res);
    res = NULL;
    rc = bg_pg_exec_ex(
        c,
        "UPDATE plans SET name = coalesce($2, name), "
        "price_minor = coalesce($3::bigint, price_minor), currency = coalesce($4, currency), "
        "request_limit = coalesce($5::bigint, request_limit), "
        "period = coalesce($6::interval, period), "
        "features = CASE WHEN $7::boolean THEN $8::text[] ELSE features END, "
        "api_access = CASE WHEN $7::boolean THEN 'api_access' = ANY ($8::text[]) "
        "  ELSE api_access END, "
        "paddle_price_source = CASE WHEN NOT $9::boolean THEN paddle_price_source "
        "  WHEN $10::text IS NULL THEN NULL "
        "  WHEN $10::text IS NOT DISTINCT FROM paddle_price_id THEN paddle_price_source "
        "  ELSE 'admin' END, "
        "paddle_price_id = CASE WHEN $9::boolean THEN $10::text ELSE paddle_price_id END, "
        "active = coalesce($11::boolean, active) "
        "WHERE id = $1 RETURNING " PLAN_COLS,
        11, p, &res, &pe);
    if (rc == BG_ERR_CONFLICT) {
        (void)verr(err, "paddle_price_id", "taken");
        goto err_rollback;
    }
    if (rc != 0)
        goto err_rollback;
    take_plan(res, 0, new);
    PQclear(res);
    res = NULL;
    rc = audit_plan(c, actor, "plan.update", old, new);
    if (rc != 0)
        goto err_rollback;
    rc = bg_pg_commit(c);
    if (rc != 0)
        goto out;
    if (before != NULL)
        *before = *old;
    if (after != NULL)
        *after = *new;
    bg_info("plans: plan %s updated (requests %lld, period %s, price %lld %s, active %d)", new->id,
            (long long)new->requests, new->period, (long long)new->price_minor, new->currency,
            new->active);
    goto out;

err_clear:
    PQclear(res);
err_rollback:
    bg_pg_rollback(c);
out:
    bg_buf_dispose(&feats);
    free(old);
    return rc;
}

#define RECOMPILE_PAGE 200

int bg_plans_recompile(PGconn *c, bg_redis_t *r, int shards, const char *plan_id,
                       int64_t *recompiled, int64_t *failed)
{
    char(*ids)[BG_POLICY_ID_SIZE] = bg_calloc(RECOMPILE_PAGE, sizeof(*ids));
    char after[BG_POLICY_ID_SIZE] = "";
    size_t n = 0;
    int rc = 0;
    do {
        rc = bg_policy_admin_affected(c, "plan", plan_id, after, ids, RECOMPILE_PAGE, &n);
        if (rc != 0)
            break;
        for (size_t i = 0; i < n; i++) {
            bg_admission_state_t st;
            int urc = bg_policy_compile_user(c, ids[i], bg_timeutil_wall_ms(), &st);
            if (urc == 0)
                urc = bg_policy_state_write(r, shards, &st);
            if (urc == 0) {
                if (recompiled != NULL)
                    (*recompiled)++;
            } else if (urc != BG_ERR_NOT_FOUND) {
                bg_warn("plans: plan %s: user %s not recompiled: %s", plan_id, ids[i],
                        bg_strerror(urc));
                if (failed != NULL)
                    (*failed)++;
            }
        }
        if (n > 0)
            (void)bg_strlcpy(after, ids[n - 1], sizeof(after));
    } while (n == RECOMPILE_PAGE);
    free(ids);
    return rc;
}

/* Applies one configured price id (see bg/plans.h); counts into rep. */
static int apply_price(PGconn *c, const char *var, const char *plan_id, const char *value,
                       bg_plans_price_report_t *rep)
{
    if (!bg_plans_price_id_is_valid(value)) {
        bg_error("%s: \"%s\" is not a Paddle price id ([A-Za-z0-9_-], 1 to 100 characters); "
                 "plan %s keeps its price id",
                 var, value, plan_id);
        rep->failed++;
        return 0;
    }
    int rc = bg_pg_begin(c);
    if (rc != 0)
        return rc;
    PGresult *res;
    const char *p[] = {plan_id, value};
    rc = bg_pg_exec(c, "SELECT " PLAN_COLS " FROM plans WHERE id = $1 FOR UPDATE", 1, p, &res);
    if (rc != 0)
        goto err_rollback;
    if (PQntuples(res) != 1) {
        PQclear(res);
        bg_warn("%s is set but there is no plan %s", var, plan_id);
        bg_pg_rollback(c);
        return 0;
    }
    bg_plan_t *old = bg_calloc(2, sizeof(*old));
    bg_plan_t *new = old + 1;
    take_plan(res, 0, old);
    PQclear(res);
    if (strcmp(old->paddle_price_id, value) == 0) {
        /* nothing to do; an admin who set this very id keeps it as theirs */
        bg_pg_rollback(c);
        free(old);
        return 0;
    }
    if (strcmp(old->paddle_price_source, "admin") == 0) {
        bg_warn("%s=%s not applied: plan %s has the price id %s set by an admin; set it to null "
                "through PUT /admin/plans/%s to hand the plan back to configuration",
                var, value, plan_id, old->paddle_price_id, plan_id);
        rep->kept++;
        bg_pg_rollback(c);
        free(old);
        return 0;
    }
    rc = bg_pg_exec(c,
                    "UPDATE plans SET paddle_price_id = $2, paddle_price_source = 'config' "
                    "WHERE id = $1 RETURNING " PLAN_COLS,
                    2, p, &res);
    if (rc == BG_ERR_CONFLICT) {
        bg_error("%s=%s not applied: another plan has that price id", var, value);
        rep->failed++;
        bg_pg_rollback(c);
        free(old);
        return 0;
    }
    if (rc == 0) {
        take_plan(res, 0, new);
        PQclear(res);
        rc = audit_plan(c, NULL, "plan.price_config", old, new);
    }
    if (rc == 0)
        rc = bg_pg_commit(c);
    free(old);
    if (rc != 0)
        goto err_rollback;
    bg_info("plans: plan %s has the Paddle price id %s from %s", plan_id, value, var);
    rep->applied++;
    return 0;

err_rollback:
    bg_pg_rollback(c);
    return rc;
}

int bg_plans_apply_price_config(PGconn *c, const bg_config_t *cfg, bg_plans_price_report_t *report)
{
    const struct {
        const char *var, *plan, *value;
    } prices[] = {{"BG_PADDLE_PRICE_DAILY", "daily", cfg->paddle_price_daily},
                  {"BG_PADDLE_PRICE_WEEKLY", "weekly", cfg->paddle_price_weekly},
                  {"BG_PADDLE_PRICE_MONTHLY", "monthly", cfg->paddle_price_monthly},
                  {"BG_PADDLE_PRICE_YEARLY", "yearly", cfg->paddle_price_yearly}};
    bg_plans_price_report_t rep = {0};
    int rc = 0;
    for (size_t i = 0; i < BG_ARRAY_SIZE(prices) && rc == 0; i++)
        if (bg_str_present(prices[i].value))
            rc = apply_price(c, prices[i].var, prices[i].plan, prices[i].value, &rep);
    if (report != NULL)
        *report = rep;
    return rc;
}
