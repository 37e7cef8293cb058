/*
 * Applying Paddle events (see bg/billing.h and docs/billing.md).
 *
 * Postgres reads the payload: every field is taken with jsonb operators from the stored inbox row
 * inside the statement that uses it, so nothing is parsed twice and a value Postgres cannot cast
 * (a malformed timestamp) is a 22xxx error, which bg_pg_exec turns into BG_ERR_INVALID and the job
 * into a dead letter with its reason.
 *
 * Order independence comes from two clocks on the subscription row, from ledger keys that name
 * the thing paid for (see bg/billing.h), and from values derived from sets rather than copied
 * from the latest event: the plan a period grants (the dearest per day of the plans its snapshots
 * named, subscription_period_plans), an invoice's status (from its payments and refunds), a
 * payment's status (the furthest one seen). An event therefore commutes with every other event of
 * its subscription, which test/integration/test_billing_replay.c checks by applying a recorded
 * sequence, every event twice, in 100 seeded random orders.
 */
#include "bg/billing.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/err.h"
#include "bg/id.h"
#include "bg/ledger.h"
#include "bg/log.h"
#include "bg/pg.h"
#include "bg/timeutil.h"

/* The payload's data object and the event time, for statements that take the inbox row id as $1. */
#define EV_FROM                                                                                    \
    " FROM webhook_inbox i, LATERAL (SELECT i.payload -> 'data' AS d) x WHERE i.id = $1::bigint "

static void copy(char *dst, size_t len, const PGresult *res, int row, int col)
{
    const char *v = bg_pg_value(res, row, col);
    (void)bg_strlcpy(dst, v != NULL ? v : "", len);
}

int bg_billing_account_of(PGconn *c, const char *user_id, char id[37])
{
    const char *p[] = {user_id};
    PGresult *res;
    int rc = bg_pg_exec(c,
                        "WITH ins AS (INSERT INTO billing_accounts (user_id) VALUES ($1::uuid) "
                        "  ON CONFLICT (user_id) DO NOTHING RETURNING id) "
                        "SELECT id FROM ins UNION ALL "
                        "SELECT id FROM billing_accounts WHERE user_id = $1::uuid LIMIT 1",
                        1, p, &res);
    if (rc != 0)
        return rc;
    copy(id, 37, res, 0, 0);
    PQclear(res);
    return 0;
}

int bg_billing_inbox_put(PGconn *c, const char *body, size_t len, bg_billing_inbox_result_t *out)
{
    memset(out, 0, sizeof(*out));
    if (len > BG_BILLING_BODY_MAX)
        return BG_ERR_TOO_LARGE;
    if (len == 0 || memchr(body, '\0', len) != NULL)
        return BG_ERR_INVALID;
    char *text = bg_strndup(body, len);
    const char *p[] = {text};
    PGresult *res;
    /* NOT NULL and CHECK constraints refuse a missing id or type: 23xxx → BG_ERR_INVALID */
    int rc = bg_pg_exec(
        c,
        "WITH v AS (SELECT $1::jsonb AS p), "
        "ins AS (INSERT INTO webhook_inbox (provider, event_id, event_type, occurred_at, payload) "
        "  SELECT 'paddle', "
        "  CASE WHEN jsonb_typeof(p -> 'event_id') = 'string' THEN p ->> 'event_id' END, "
        "  CASE WHEN jsonb_typeof(p -> 'event_type') = 'string' THEN p ->> 'event_type' END, "
        "  (p ->> 'occurred_at')::timestamptz, p FROM v "
        "  WHERE jsonb_typeof(p) = 'object' AND p ->> 'occurred_at' IS NOT NULL "
        "  ON CONFLICT (provider, event_id) DO NOTHING RETURNING event_id) "
        /* the statement's snapshot does not see ins: column 3 is about an earlier delivery */
        "SELECT (SELECT event_id FROM ins), v.p ->> 'event_id', "
        "  (SELECT w.processed_at IS NULL FROM webhook_inbox w WHERE w.provider = 'paddle' "
        "   AND w.event_id = v.p ->> 'event_id') FROM v",
        1, p, &res);
    free(text);
    if (rc != 0)
        return rc;
    const char *inserted = bg_pg_value(res, 0, 0), *pending = bg_pg_value(res, 0, 2);
    if (inserted != NULL) {
        out->inserted = out->pending = true;
        (void)bg_strlcpy(out->event_id, inserted, sizeof(out->event_id));
    } else if (pending != NULL) {
        out->pending = strcmp(pending, "t") == 0;
        copy(out->event_id, sizeof(out->event_id), res, 0, 1);
    }
    PQclear(res);
    return out->event_id[0] != '\0' ? 0 : BG_ERR_INVALID;
}

int bg_billing_note_failure(PGconn *c, const char *event_id, const char *error)
{
    const char *p[] = {event_id, error != NULL ? error : ""};
    return bg_pg_run(c,
                     "UPDATE webhook_inbox SET attempts = attempts + 1, error = left($2, 500) "
                     "WHERE provider = 'paddle' AND event_id = $1 AND processed_at IS NULL",
                     2, p);
}

/* ---- applying ---- */

/* What the apply steps share. */
typedef struct st_event {
    char inbox_id[24];
    char type[101];
    bool processed;
    char outcome[12];
    int64_t occurred_ms;
    char entity_id[101];   /* data.id: sub_… or txn_… */
    char status[32];       /* data.status */
    char custom_user[64];  /* data.custom_data.user_id */
    char customer_id[101]; /* data.customer_id */
    char sub_id[101];      /* the subscription: data.id or data.subscription_id */
    bool has_period;       /* current_billing_period (subscription) or billing_period (txn) */
    char period_start[64];
    int64_t period_start_ms;
    char total[24]; /* data.details.totals.grand_total, minor units */
    char currency[8];
    int64_t billed_ms; /* data.billed_at, or the event time */
    char user_id[37];
    char account_id[37];
    char plan_id[33], price_id[101];
    int64_t requests; /* the plan's request limit */
} event_t;

static int load_event(PGconn *c, const char *event_id, event_t *e)
{
    const char *p[] = {event_id};
    PGresult *res;
    int rc = bg_pg_exec(
        c,
        "SELECT i.id, i.event_type, i.processed_at IS NOT NULL, coalesce(i.outcome, ''), "
        "  floor(extract(epoch FROM i.occurred_at) * 1000)::bigint, d ->> 'id', d ->> 'status', "
        "  d -> 'custom_data' ->> 'user_id', d ->> 'customer_id', "
        "  CASE WHEN i.event_type LIKE 'subscription.%' THEN d ->> 'id' "
        "    ELSE d ->> 'subscription_id' END, "
        "  coalesce(d -> 'current_billing_period', d -> 'billing_period') ->> 'starts_at', "
        "  d -> 'details' -> 'totals' ->> 'grand_total', d ->> 'currency_code', "
        "  floor(extract(epoch FROM coalesce((d ->> 'billed_at')::timestamptz, i.occurred_at)) "
        "    * 1000)::bigint "
        "FROM webhook_inbox i, LATERAL (SELECT CASE WHEN jsonb_typeof(i.payload -> 'data') = "
        "  'object' THEN i.payload -> 'data' ELSE '{}'::jsonb END AS d) x "
        "WHERE i.provider = 'paddle' AND i.event_id = $1 FOR UPDATE OF i",
        1, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) == 0) {
        PQclear(res);
        return BG_ERR_NOT_FOUND;
    }
    copy(e->inbox_id, sizeof(e->inbox_id), res, 0, 0);
    copy(e->type, sizeof(e->type), res, 0, 1);
    e->processed = strcmp(PQgetvalue(res, 0, 2), "t") == 0;
    copy(e->outcome, sizeof(e->outcome), res, 0, 3);
    if (bg_pg_int64(res, 0, 4, &e->occurred_ms) != 0)
        e->occurred_ms = 0;
    copy(e->entity_id, sizeof(e->entity_id), res, 0, 5);
    copy(e->status, sizeof(e->status), res, 0, 6);
    copy(e->custom_user, sizeof(e->custom_user), res, 0, 7);
    copy(e->customer_id, sizeof(e->customer_id), res, 0, 8);
    copy(e->sub_id, sizeof(e->sub_id), res, 0, 9);
    copy(e->period_start, sizeof(e->period_start), res, 0, 10);
    copy(e->total, sizeof(e->total), res, 0, 11);
    copy(e->currency, sizeof(e->currency), res, 0, 12);
    if (bg_pg_int64(res, 0, 13, &e->billed_ms) != 0)
        e->billed_ms = e->occurred_ms;
    PQclear(res);
    e->has_period = e->period_start[0] != '\0';
    if (e->has_period && bg_timeutil_parse_rfc3339(e->period_start, strlen(e->period_start),
                                                   &e->period_start_ms) != 0)
        return BG_ERR_INVALID;
    return 0;
}

/* Finds the user (custom_data, then what is known of the subscription or customer). */
static int find_user(PGconn *c, event_t *e)
{
    const char *p[] = {bg_id_uuid_is_valid(e->custom_user) ? e->custom_user : NULL,
                       e->sub_id[0] != '\0' ? e->sub_id : NULL,
                       e->customer_id[0] != '\0' ? e->customer_id : NULL};
    PGresult *res;
    int rc = bg_pg_exec(c,
                        "SELECT id FROM (SELECT 1 AS o, id FROM users WHERE id = $1::uuid "
                        "  AND deleted_at IS NULL "
                        "UNION ALL SELECT 2, user_id FROM subscriptions "
                        "  WHERE paddle_subscription_id = $2 "
                        "UNION ALL SELECT 3, user_id FROM billing_accounts "
                        "  WHERE paddle_customer_id = $3 AND user_id IS NOT NULL) u "
                        "ORDER BY o LIMIT 1",
                        3, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) == 0) {
        PQclear(res);
        return BG_ERR_RETRY;
    }
    copy(e->user_id, sizeof(e->user_id), res, 0, 0);
    PQclear(res);
    /* one user's events apply one at a time (and after any grant or plan change of theirs) */
    const char *up[] = {e->user_id};
    rc = bg_pg_run(c, "SELECT 1 FROM users WHERE id = $1::uuid FOR UPDATE", 1, up);
    if (rc != 0)
        return rc;
    rc = bg_billing_account_of(c, e->user_id, e->account_id);
    if (rc != 0)
        return rc;
    if (e->customer_id[0] != '\0') {
        const char *cp[] = {e->account_id, e->customer_id};
        rc = bg_pg_run(c,
                       "UPDATE billing_accounts SET paddle_customer_id = $2 WHERE id = $1::uuid "
                       "AND paddle_customer_id IS NULL AND NOT EXISTS (SELECT 1 FROM "
                       "billing_accounts WHERE paddle_customer_id = $2)",
                       2, cp);
    }
    return rc;
}

/* Finds the plan whose Paddle price is one of the event's items; "" when none. */
static int find_plan(PGconn *c, event_t *e)
{
    const char *p[] = {e->inbox_id};
    PGresult *res;
    int rc = bg_pg_exec(c,
                        "SELECT p.id, p.paddle_price_id, p.request_limit FROM webhook_inbox i, "
                        "LATERAL (SELECT i.payload -> 'data' AS d) x, plans p "
                        "WHERE i.id = $1::bigint AND jsonb_typeof(d -> 'items') = 'array' AND "
                        "EXISTS (SELECT 1 FROM "
                        "jsonb_array_elements(d -> 'items') it WHERE it -> 'price' ->> 'id' = "
                        "p.paddle_price_id) ORDER BY p.sort_order DESC, p.id LIMIT 1",
                        1, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) > 0) {
        copy(e->plan_id, sizeof(e->plan_id), res, 0, 0);
        copy(e->price_id, sizeof(e->price_id), res, 0, 1);
        if (bg_pg_int64(res, 0, 2, &e->requests) != 0)
            e->requests = 0;
    }
    PQclear(res);
    return 0;
}

/* Posts amount of unit from the system account sys_purpose to the user's user_purpose. */
static int post(PGconn *c, const event_t *e, const char *key, const char *kind, const char *desc,
                const char *user_purpose, const char *sys_purpose, const char *unit, int64_t amount,
                int64_t effective_ms, const char *meta, bool *posted)
{
    char user_acc[BG_LEDGER_ID_LEN + 1], sys_acc[BG_LEDGER_ID_LEN + 1];
    int rc = bg_ledger_account(c, "user", e->user_id, user_purpose, unit, user_acc);
    if (rc == 0)
        rc = bg_ledger_account(c, "system", NULL, sys_purpose, unit, sys_acc);
    if (rc != 0)
        return rc;
    const bg_ledger_entry_t entries[] = {{user_acc, unit, amount}, {sys_acc, unit, -amount}};
    const bg_ledger_tx_t tx = {.idempotency_key = key,
                               .kind = kind,
                               .description = desc,
                               .user_id = e->user_id,
                               .metadata_json = meta,
                               .effective_at_ms = effective_ms,
                               .nentries = 2,
                               .entries = entries};
    bool mine = false;
    rc = bg_ledger_post(c, &tx, &mine, NULL);
    if (rc == 0 && mine)
        *posted = true;
    return rc;
}

/* The request credits of one billing period of the event's plan. */
static int post_credits(PGconn *c, const event_t *e, const char *key, bool *posted)
{
    if (e->plan_id[0] == '\0' || e->requests <= 0)
        return 0;
    char *meta = bg_asprintf("{\"plan\":\"%s\",\"paddle_subscription_id\":\"%s\","
                             "\"period_start\":\"%s\"}",
                             e->plan_id, e->sub_id, e->period_start);
    char *desc = bg_asprintf("%s plan: requests for the billing period", e->plan_id);
    int rc = post(c, e, key, "grant.paddle", desc, "credits", "grants", "request", e->requests,
                  e->period_start_ms, meta, posted);
    free(desc);
    free(meta);
    return rc;
}

/* Whether s is a plain JSON-safe id ([A-Za-z0-9_:.-]): metadata is built by hand. */
static bool plain(const char *s)
{
    for (; *s != '\0'; s++) {
        char ch = *s;
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '_' || ch == '-' || ch == ':' || ch == '.' || ch == '+'))
            return false;
    }
    return true;
}

/*
 * Records the snapshot's plan for its billing period, then sets the plan the subscription grants:
 * the dearest per day among the plans of its current period (an upgrade counts at once, a
 * downgrade from the next period), and, while it is live, the newest snapshot's plan as the
 * scheduled one when it differs. Sets *changed when the granted or scheduled plan moved.
 */
static int settle_plan(PGconn *c, const event_t *e, bool *changed)
{
    const char *p[] = {e->sub_id, e->inbox_id, e->plan_id};
    int rc = 0;
    if (e->has_period)
        rc = bg_pg_run(c,
                       "INSERT INTO subscription_period_plans (subscription_id, period_start, "
                       "plan_id) SELECT s.id, (d -> 'current_billing_period' ->> 'starts_at')"
                       "::timestamptz, $3 FROM subscriptions s, webhook_inbox i, LATERAL (SELECT "
                       "i.payload -> 'data' AS d) x WHERE s.paddle_subscription_id = $1 "
                       "AND i.id = $2::bigint ON CONFLICT DO NOTHING",
                       3, p);
    if (rc != 0)
        return rc;
    PGresult *res;
    rc = bg_pg_exec(
        c,
        "WITH g0 AS (SELECT s2.id, s2.plan_id AS old_plan, s2.scheduled_plan_id AS old_next, "
        "  coalesce((SELECT pp.plan_id FROM subscription_period_plans pp JOIN plans p "
        "    ON p.id = pp.plan_id WHERE pp.subscription_id = s2.id "
        "    AND pp.period_start = s2.current_period_start "
        "    ORDER BY p.price_minor::numeric / extract(epoch FROM p.period) DESC, p.id LIMIT 1), "
        "    np.id, s2.plan_id) AS plan, np.id AS newest, s2.status "
        "  FROM subscriptions s2 LEFT JOIN plans np ON np.paddle_price_id = s2.paddle_price_id "
        "  WHERE s2.paddle_subscription_id = $1), "
        "g AS (SELECT id, old_plan, old_next, plan, CASE WHEN status <> 'canceled' "
        "  AND newest IS NOT NULL AND newest <> plan THEN newest END AS next FROM g0) "
        "UPDATE subscriptions s SET plan_id = g.plan, scheduled_plan_id = g.next, "
        "scheduled_change_at = CASE WHEN g.next IS NOT NULL THEN s.current_period_end END "
        "FROM g WHERE s.id = g.id "
        "RETURNING g.old_plan IS DISTINCT FROM g.plan OR g.old_next IS DISTINCT FROM g.next",
        1, p, &res);
    if (rc != 0)
        return rc;
    *changed = PQntuples(res) > 0 && strcmp(PQgetvalue(res, 0, 0), "t") == 0;
    PQclear(res);
    return 0;
}

static int apply_subscription(PGconn *c, event_t *e, bg_billing_result_t *out)
{
    if (e->plan_id[0] == '\0') {
        snprintf(out->error, sizeof(out->error),
                 "no plan has a Paddle price id of this subscription's items");
        return BG_ERR_INVALID;
    }
    const char *sp[] = {e->sub_id, e->inbox_id};
    PGresult *res;
    int rc = bg_pg_exec(c,
                        "SELECT s.id, s.last_event_at IS NULL OR s.last_event_at < i.occurred_at "
                        "FROM subscriptions s, webhook_inbox i WHERE s.paddle_subscription_id = $1 "
                        "AND i.id = $2::bigint FOR UPDATE OF s",
                        2, sp, &res);
    if (rc != 0)
        return rc;
    bool exists = PQntuples(res) > 0;
    char row_id[37] = "";
    bool newer = true;
    if (exists) {
        copy(row_id, sizeof(row_id), res, 0, 0);
        newer = strcmp(PQgetvalue(res, 0, 1), "t") == 0;
    }
    PQclear(res);
    bool live = strcmp(e->status, "canceled") != 0;
    if ((newer && live) || !exists) {
        /*
         * One live subscription per user: a live one replaces any other. The first event of a
         * Paddle subscription, whatever its status, ends a complimentary one (a trial, a grant):
         * the user bought, and an order where the cancellation is seen first must end the same.
         */
        const char *cp[] = {e->user_id, row_id[0] != '\0' ? row_id : NULL, live ? "f" : "t"};
        rc = bg_pg_run(c,
                       "UPDATE subscriptions SET status = 'canceled', canceled_at = now() "
                       "WHERE user_id = $1::uuid AND status <> 'canceled' "
                       "AND id IS DISTINCT FROM $2::uuid "
                       "AND NOT ($3::boolean AND paddle_subscription_id IS NOT NULL)",
                       3, cp);
        if (rc != 0)
            return rc;
    }
    const char *ip[] = {e->inbox_id, e->account_id, e->user_id, e->plan_id, e->price_id, row_id};
    bool changed = false;
    if (!exists) {
        rc = bg_pg_run(
            c,
            "INSERT INTO subscriptions (billing_account_id, user_id, plan_id, status, "
            "current_period_start, current_period_end, trial_ends_at, cancel_at_period_end, "
            "canceled_at, paused_at, paddle_subscription_id, paddle_customer_id, last_event_at, "
            "paddle_period_at, paddle_price_id) SELECT $2::uuid, $3::uuid, $4, d ->> 'status', "
            "coalesce((d -> 'current_billing_period' ->> 'starts_at')::timestamptz, "
            "i.occurred_at), "
            "coalesce((d -> 'current_billing_period' ->> 'ends_at')::timestamptz, "
            "  i.occurred_at + interval '1 second'), "
            "CASE WHEN d ->> 'status' = 'trialing' THEN "
            "  (d -> 'items' -> 0 -> 'trial_dates' ->> 'ends_at')::timestamptz END, "
            "coalesce(d -> 'scheduled_change' ->> 'action' = 'cancel', false), "
            "CASE WHEN d ->> 'status' = 'canceled' THEN "
            "  coalesce((d ->> 'canceled_at')::timestamptz, i.occurred_at) END, "
            "(d ->> 'paused_at')::timestamptz, d ->> 'id', d ->> 'customer_id', i.occurred_at, "
            "CASE WHEN d -> 'current_billing_period' ->> 'starts_at' IS NOT NULL "
            "  THEN i.occurred_at END, $5" EV_FROM,
            5, ip);
        if (rc != 0)
            return rc;
        changed = true;
    } else {
        if (newer) {
            rc = bg_pg_run(
                c,
                "UPDATE subscriptions s SET plan_id = $4, status = d ->> 'status', "
                "trial_ends_at = CASE WHEN d ->> 'status' = 'trialing' THEN "
                "  (d -> 'items' -> 0 -> 'trial_dates' ->> 'ends_at')::timestamptz END, "
                "cancel_at_period_end = coalesce(d -> 'scheduled_change' ->> 'action' = 'cancel', "
                "  false), "
                "canceled_at = CASE WHEN d ->> 'status' = 'canceled' THEN "
                "  coalesce((d ->> 'canceled_at')::timestamptz, i.occurred_at) END, "
                "paused_at = (d ->> 'paused_at')::timestamptz, "
                "paddle_customer_id = coalesce(d ->> 'customer_id', s.paddle_customer_id), "
                "last_event_at = i.occurred_at, paddle_price_id = $5 "
                "FROM webhook_inbox i, LATERAL (SELECT i.payload -> 'data' AS d) x "
                "WHERE i.id = $1::bigint AND s.id = $6::uuid AND $2::uuid IS NOT NULL "
                "AND $3::uuid IS NOT NULL",
                6, ip);
            if (rc != 0)
                return rc;
            changed = true;
        }
        /* the period has its own clock: a canceled snapshot (no period) never hides an older
         * snapshot's period */
        const char *pp[] = {e->inbox_id, row_id};
        rc = bg_pg_exec(
            c,
            "UPDATE subscriptions s SET "
            "current_period_start = (d -> 'current_billing_period' ->> 'starts_at')::timestamptz, "
            "current_period_end = (d -> 'current_billing_period' ->> 'ends_at')::timestamptz, "
            "paddle_period_at = i.occurred_at "
            "FROM webhook_inbox i, LATERAL (SELECT i.payload -> 'data' AS d) x "
            "WHERE i.id = $1::bigint AND s.id = $2::uuid "
            "AND d -> 'current_billing_period' ->> 'starts_at' IS NOT NULL "
            "AND (s.paddle_period_at IS NULL OR s.paddle_period_at < i.occurred_at) RETURNING s.id",
            2, pp, &res);
        if (rc != 0)
            return rc;
        if (PQntuples(res) > 0)
            changed = true;
        PQclear(res);
    }
    bool settled = false;
    rc = settle_plan(c, e, &settled);
    if (rc != 0)
        return rc;
    changed = changed || settled;
    bool posted = false;
    if (strcmp(e->status, "trialing") == 0 && e->has_period && plain(e->sub_id) &&
        plain(e->period_start)) {
        char key[200];
        snprintf(key, sizeof(key), "paddle:trial:%s:%s", e->sub_id, e->period_start);
        rc = post_credits(c, e, key, &posted);
        if (rc != 0)
            return rc;
    }
    (void)bg_strlcpy(out->outcome, changed || posted ? "applied" : "stale", sizeof(out->outcome));
    return 0;
}

/*
 * Sets the invoice of transaction txn's status from what is known: past_due until paid, refunded
 * once the approved refunds and chargebacks reach its total, else paid.
 */
static int refresh_invoice(PGconn *c, const char *txn)
{
    const char *p[] = {txn};
    return bg_pg_run(c,
                     "UPDATE invoices v SET status = CASE WHEN v.paid_at IS NULL THEN 'past_due' "
                     "WHEN v.total_minor > 0 AND coalesce(r.back, 0) >= v.total_minor "
                     "THEN 'refunded' ELSE 'paid' END "
                     "FROM (SELECT sum(amount_minor) AS back FROM payments WHERE "
                     "paddle_transaction_id = $1 AND kind IN ('refund', 'chargeback') "
                     "AND status = 'succeeded') r WHERE v.paddle_transaction_id = $1",
                     1, p);
}

/*
 * Takes back the request credits that transaction txn granted, in the proportion of its payment
 * that approved refunds and chargebacks returned: floor(granted × returned / paid) in all, never
 * more than the grant, posted per adjustment (kind grant.refund.paddle, key
 * paddle:credits-back:<adjustment>, at the adjustment's time): − on the user's credits account, +
 * on the system grants account. Runs when an adjustment is approved and when the transaction is
 * booked, so the outcome does not depend on which webhook came first: the adjustments without a
 * posting are taken in the order they were made, each bringing the total taken back to what the
 * adjustments posted and those made up to it returned. A transaction that granted nothing (no
 * billing period) or is not booked yet takes nothing back.
 */
static int take_back_credits(PGconn *c, const event_t *e, const char *txn, bool *posted)
{
    const char *p[] = {e->user_id, txn};
    PGresult *res;
    int rc = bg_pg_exec(
        c,
        "WITH l AS (SELECT coalesce(sum(le.amount) FILTER (WHERE a.purpose = 'credits' AND "
        "    t.idempotency_key = 'paddle:credits:' || $2), 0)::bigint AS granted, "
        "  coalesce(sum(le.amount) FILTER (WHERE a.purpose = 'payments' AND "
        "    t.idempotency_key = 'paddle:payment:' || $2), 0)::bigint AS paid, "
        "  coalesce(-sum(le.amount) FILTER (WHERE a.purpose = 'credits' AND "
        "    t.kind = 'grant.refund.paddle'), 0)::bigint AS back "
        "  FROM ledger_transactions t JOIN ledger_entries le ON le.transaction_id = t.id "
        "  JOIN ledger_accounts a ON a.id = le.account_id AND a.owner_type = 'user' "
        "    AND a.owner_id = $1::uuid "
        "  WHERE t.user_id = $1::uuid AND (t.idempotency_key IN ('paddle:credits:' || $2, "
        "    'paddle:payment:' || $2) OR (t.kind = 'grant.refund.paddle' AND "
        "    t.metadata ->> 'paddle_transaction_id' = $2))) "
        "SELECT l.granted, l.paid, l.back, p.provider_payment_id, p.amount_minor, "
        "  floor(extract(epoch FROM p.occurred_at) * 1000)::bigint, "
        "  EXISTS (SELECT 1 FROM ledger_transactions x "
        "    WHERE x.idempotency_key = 'paddle:credits-back:' || p.provider_payment_id) "
        "FROM l LEFT JOIN payments p ON p.paddle_transaction_id = $2 "
        "  AND p.kind IN ('refund', 'chargeback') AND p.status = 'succeeded' "
        "ORDER BY p.occurred_at, p.provider_payment_id",
        2, p, &res);
    if (rc != 0)
        return rc;
    int64_t granted = 0, paid = 0, back = 0, returned = 0;
    int n = PQntuples(res);
    if (n < 1 || bg_pg_int64(res, 0, 0, &granted) != 0 || bg_pg_int64(res, 0, 1, &paid) != 0 ||
        bg_pg_int64(res, 0, 2, &back) != 0)
        rc = BG_ERR_PROTOCOL;
    /* what the adjustments already posted returned counts first */
    for (int i = 0; rc == 0 && i < n; i++) {
        int64_t amount = 0;
        if (!PQgetisnull(res, i, 3) && strcmp(PQgetvalue(res, i, 6), "t") == 0 &&
            bg_pg_int64(res, i, 4, &amount) == 0)
            returned += amount;
    }
    for (int i = 0; rc == 0 && granted > 0 && paid > 0 && i < n; i++) {
        int64_t amount = 0, at_ms = 0;
        const char *adj = PQgetvalue(res, i, 3);
        if (PQgetisnull(res, i, 3) || strcmp(PQgetvalue(res, i, 6), "t") == 0 || !plain(adj) ||
            bg_pg_int64(res, i, 4, &amount) != 0 || bg_pg_int64(res, i, 5, &at_ms) != 0)
            continue;
        returned += amount;
        /* at most 150,000 credits times a payment in minor units: far from overflowing */
        int64_t due = granted * (returned < paid ? returned : paid) / paid - back;
        if (due <= 0)
            continue;
        char key[200];
        snprintf(key, sizeof(key), "paddle:credits-back:%s", adj);
        char *meta = bg_asprintf("{\"paddle_transaction_id\":\"%s\",\"paddle_adjustment_id\":"
                                 "\"%s\",\"plan\":\"%s\"}",
                                 txn, adj, e->plan_id);
        rc = post(c, e, key, "grant.refund.paddle", "Requests of a refunded payment taken back",
                  "credits", "grants", "request", -due, at_ms, meta, posted);
        free(meta);
        back += due;
    }
    PQclear(res);
    return rc;
}

/*
 * The invoice of the event's transaction, one per transaction: Paddle's invoice_number, the
 * totals of details.totals, the billing period, issued at billed_at, paid at the first successful
 * event's time. Every field is a function of the set of events (the earliest time, the first
 * number), so redeliveries and order change nothing.
 */
static int put_invoice(PGconn *c, const event_t *e, bool failed)
{
    const char *p[] = {e->inbox_id, e->account_id, failed ? "f" : "t", e->plan_id};
    int rc = bg_pg_run(
        c,
        "INSERT INTO invoices (billing_account_id, subscription_id, number, paddle_transaction_id, "
        "status, currency, subtotal_minor, tax_minor, total_minor, period_start, period_end, "
        "issued_at, paid_at, plan_id) "
        "SELECT $2::uuid, (SELECT id FROM subscriptions WHERE paddle_subscription_id = "
        "  d ->> 'subscription_id'), nullif(d ->> 'invoice_number', ''), d ->> 'id', "
        "CASE WHEN $3::boolean THEN 'paid' ELSE 'past_due' END, "
        "coalesce(d ->> 'currency_code', 'USD'), "
        "coalesce(nullif(d -> 'details' -> 'totals' ->> 'subtotal', '')::bigint, 0), "
        "coalesce(nullif(d -> 'details' -> 'totals' ->> 'tax', '')::bigint, 0), "
        "coalesce(nullif(d -> 'details' -> 'totals' ->> 'grand_total', '')::bigint, 0), "
        "(d -> 'billing_period' ->> 'starts_at')::timestamptz, "
        "(d -> 'billing_period' ->> 'ends_at')::timestamptz, "
        "coalesce((d ->> 'billed_at')::timestamptz, i.occurred_at), "
        "CASE WHEN $3::boolean THEN i.occurred_at END, nullif($4, '')" EV_FROM
        "ON CONFLICT (paddle_transaction_id) DO UPDATE SET "
        "number = coalesce(invoices.number, excluded.number), "
        "subscription_id = coalesce(invoices.subscription_id, excluded.subscription_id), "
        "plan_id = coalesce(invoices.plan_id, excluded.plan_id), "
        "issued_at = least(invoices.issued_at, excluded.issued_at), "
        "paid_at = least(invoices.paid_at, excluded.paid_at), "
        "period_start = coalesce(invoices.period_start, excluded.period_start), "
        "period_end = coalesce(invoices.period_end, excluded.period_end), "
        /* the totals of a paid snapshot are final */
        "subtotal_minor = CASE WHEN $3::boolean THEN excluded.subtotal_minor "
        "  ELSE invoices.subtotal_minor END, "
        "tax_minor = CASE WHEN $3::boolean THEN excluded.tax_minor ELSE invoices.tax_minor END, "
        "total_minor = CASE WHEN $3::boolean THEN excluded.total_minor "
        "  ELSE invoices.total_minor END",
        4, p);
    return rc != 0 ? rc : refresh_invoice(c, e->entity_id);
}

static int apply_transaction(PGconn *c, event_t *e, bg_billing_result_t *out)
{
    if (!plain(e->entity_id) || !plain(e->sub_id) || !plain(e->period_start)) {
        snprintf(out->error, sizeof(out->error), "unexpected characters in a Paddle id");
        return BG_ERR_INVALID;
    }
    bool failed = strcmp(e->type, "transaction.payment_failed") == 0;
    const char *pp[] = {e->inbox_id, e->account_id, failed ? "failed" : "succeeded"};
    /* the payment row: one per transaction for a success, one per failed attempt */
    int rc = bg_pg_run(
        c,
        "INSERT INTO payments (billing_account_id, provider_payment_id, kind, status, "
        "amount_minor, currency, method, failure_reason, occurred_at, paddle_transaction_id) "
        "SELECT $2::uuid, CASE WHEN $3 = 'failed' THEN (d ->> 'id') || ':' || "
        "  coalesce(f ->> 'payment_attempt_id', i.event_id) ELSE d ->> 'id' END, 'charge', $3, "
        "coalesce(nullif(d -> 'details' -> 'totals' ->> 'grand_total', '')::bigint, 0), "
        "coalesce(d ->> 'currency_code', 'USD'), "
        "coalesce(f -> 'method_details' ->> 'type', ok -> 'method_details' ->> 'type'), "
        "CASE WHEN $3 = 'failed' THEN f ->> 'error_code' END, "
        "coalesce((d ->> 'billed_at')::timestamptz, i.occurred_at), d ->> 'id' "
        "FROM webhook_inbox i, LATERAL (SELECT i.payload -> 'data' AS d) x, "
        "LATERAL (SELECT (SELECT p FROM jsonb_array_elements(CASE WHEN jsonb_typeof(d -> "
        "  'payments') = 'array' THEN d -> 'payments' ELSE '[]' END) p "
        "  WHERE p ->> 'status' = 'error' LIMIT 1) AS f, "
        "  (SELECT p FROM jsonb_array_elements(CASE WHEN jsonb_typeof(d -> 'payments') = 'array' "
        "  THEN d -> 'payments' ELSE '[]' END) p WHERE p ->> 'status' = 'captured' LIMIT 1) AS ok) "
        "y "
        "WHERE i.id = $1::bigint "
        "ON CONFLICT (provider, provider_payment_id) DO UPDATE SET status = 'succeeded', "
        "  occurred_at = least(payments.occurred_at, excluded.occurred_at) "
        "  WHERE excluded.status = 'succeeded'",
        3, pp);
    if (rc == 0)
        rc = put_invoice(c, e, failed);
    if (rc != 0 || failed) {
        (void)bg_strlcpy(out->outcome, "recorded", sizeof(out->outcome));
        return rc;
    }
    bool posted = false;
    char *end = NULL;
    long long total = e->total[0] != '\0' ? strtoll(e->total, &end, 10) : 0;
    if (e->total[0] != '\0' && (end == NULL || *end != '\0' || total < 0)) {
        snprintf(out->error, sizeof(out->error), "grand_total is not an amount in minor units");
        return BG_ERR_INVALID;
    }
    bool currency_ok = strlen(e->currency) == 3 && plain(e->currency);
    if (total > 0 && currency_ok) {
        char key[200];
        snprintf(key, sizeof(key), "paddle:payment:%s", e->entity_id);
        char *meta = bg_asprintf("{\"paddle_transaction_id\":\"%s\",\"paddle_subscription_id\":"
                                 "\"%s\",\"plan\":\"%s\"}",
                                 e->entity_id, e->sub_id, e->plan_id);
        rc = post(c, e, key, "payment.paddle", "Payment through Paddle", "payments", "sales",
                  e->currency, total, e->billed_ms, meta, &posted);
        free(meta);
        if (rc != 0)
            return rc;
    }
    if (e->has_period && e->sub_id[0] != '\0') {
        char key[200];
        snprintf(key, sizeof(key), "paddle:credits:%s", e->entity_id);
        rc = post_credits(c, e, key, &posted);
        /* refunds approved before this transaction was booked take their credits back now */
        if (rc == 0)
            rc = take_back_credits(c, e, e->entity_id, &posted);
        if (rc != 0)
            return rc;
    }
    (void)bg_strlcpy(out->outcome, posted ? "applied" : "recorded", sizeof(out->outcome));
    return 0;
}

/*
 * A refund or chargeback (a Paddle adjustment): a payments row (kind refund or chargeback, keyed
 * by the adjustment id; its status the furthest one seen: succeeded over canceled over pending)
 * and, once approved, a reversing ledger transaction: −total on the user's payments account, +
 * on the system sales account (kind refund.paddle, key paddle:refund:<adjustment>), and the
 * request credits the transaction granted taken back in proportion (take_back_credits). The
 * transaction's invoice becomes refunded when the approved adjustments reach its total.
 */
static int apply_adjustment(PGconn *c, event_t *e, bg_billing_result_t *out)
{
    const char *p[] = {e->inbox_id, e->account_id};
    PGresult *res;
    int rc = bg_pg_exec(
        c,
        "SELECT d ->> 'action', d ->> 'status', coalesce(d ->> 'transaction_id', ''), "
        "coalesce(d -> 'totals' ->> 'total', ''), coalesce(d ->> 'currency_code', ''), "
        /* created_at, not updated_at: every snapshot of one adjustment posts at one time */
        "floor(extract(epoch FROM coalesce((d ->> 'created_at')::timestamptz, i.occurred_at)) "
        "  * 1000)::bigint" EV_FROM,
        1, p, &res);
    if (rc != 0)
        return rc;
    char action[32] = "", status[32] = "", txn[101] = "", total[24] = "", currency[8] = "";
    int64_t at_ms = e->occurred_ms;
    if (PQntuples(res) > 0) {
        copy(action, sizeof(action), res, 0, 0);
        copy(status, sizeof(status), res, 0, 1);
        copy(txn, sizeof(txn), res, 0, 2);
        copy(total, sizeof(total), res, 0, 3);
        copy(currency, sizeof(currency), res, 0, 4);
        if (bg_pg_int64(res, 0, 5, &at_ms) != 0)
            at_ms = e->occurred_ms;
    }
    PQclear(res);
    bool refund = strcmp(action, "refund") == 0, chargeback = strcmp(action, "chargeback") == 0;
    if (!refund && !chargeback) {
        /* credits, chargeback warnings and reversals move no money we book */
        (void)bg_strlcpy(out->outcome, "recorded", sizeof(out->outcome));
        return 0;
    }
    char *end = NULL;
    long long amount = strtoll(total, &end, 10);
    if (!plain(e->entity_id) || !plain(txn) || total[0] == '\0' || *end != '\0' || amount < 0 ||
        strlen(currency) != 3 || !plain(currency)) {
        snprintf(out->error, sizeof(out->error),
                 "an adjustment without an id, transaction, total or currency");
        return BG_ERR_INVALID;
    }
    rc = bg_pg_run(
        c,
        "INSERT INTO payments (billing_account_id, provider_payment_id, kind, status, "
        "amount_minor, currency, failure_reason, occurred_at, paddle_transaction_id) "
        "SELECT $2::uuid, d ->> 'id', d ->> 'action', CASE d ->> 'status' WHEN 'approved' THEN "
        "'succeeded' WHEN 'pending_approval' THEN 'pending' ELSE 'canceled' END, "
        "(d -> 'totals' ->> 'total')::bigint, d ->> 'currency_code', "
        "CASE WHEN d ->> 'status' NOT IN ('approved', 'pending_approval') THEN d ->> 'status' END, "
        "coalesce((d ->> 'created_at')::timestamptz, i.occurred_at), d ->> 'transaction_id'" EV_FROM
        "ON CONFLICT (provider, provider_payment_id) DO UPDATE SET status = "
        "CASE WHEN 'succeeded' IN (payments.status, excluded.status) THEN 'succeeded' "
        "WHEN 'canceled' IN (payments.status, excluded.status) THEN 'canceled' "
        "ELSE excluded.status END, "
        "failure_reason = coalesce(payments.failure_reason, excluded.failure_reason)",
        2, p);
    if (rc != 0)
        return rc;
    bool posted = false;
    if (strcmp(status, "approved") == 0 && amount > 0) {
        char key[200];
        snprintf(key, sizeof(key), "paddle:refund:%s", e->entity_id);
        char *meta = bg_asprintf("{\"paddle_transaction_id\":\"%s\",\"paddle_adjustment_id\":"
                                 "\"%s\",\"action\":\"%s\",\"plan\":\"%s\"}",
                                 txn, e->entity_id, action, e->plan_id);
        rc = post(c, e, key, "refund.paddle",
                  refund ? "Refund through Paddle" : "Chargeback through Paddle", "payments",
                  "sales", currency, -amount, at_ms, meta, &posted);
        free(meta);
        if (rc == 0)
            rc = take_back_credits(c, e, txn, &posted);
        if (rc != 0)
            return rc;
    }
    rc = refresh_invoice(c, txn);
    (void)bg_strlcpy(out->outcome, posted ? "applied" : "recorded", sizeof(out->outcome));
    return rc;
}

static bool is_type(const char *type, const char *const list[])
{
    for (size_t i = 0; list[i] != NULL; i++)
        if (strcmp(type, list[i]) == 0)
            return true;
    return false;
}

static const char *const subscription_types[] = {
    "subscription.created", "subscription.activated", "subscription.trialing",
    "subscription.updated", "subscription.past_due",  "subscription.paused",
    "subscription.resumed", "subscription.canceled",  NULL};
static const char *const transaction_types[] = {"transaction.completed", "transaction.paid",
                                                "transaction.payment_failed", NULL};

static const char *const adjustment_types[] = {"adjustment.created", "adjustment.updated", NULL};

static int apply_in_tx(PGconn *c, const char *event_id, event_t *e, bg_billing_result_t *out)
{
    int rc = load_event(c, event_id, e);
    if (rc == BG_ERR_INVALID)
        snprintf(out->error, sizeof(out->error), "malformed billing period start");
    if (rc != 0)
        return rc;
    (void)bg_strlcpy(out->event_type, e->type, sizeof(out->event_type));
    bool sub = is_type(e->type, subscription_types), txn = is_type(e->type, transaction_types);
    bool adj = is_type(e->type, adjustment_types);
    if (!sub && !txn && !adj) {
        (void)bg_strlcpy(out->outcome, "ignored", sizeof(out->outcome));
    } else {
        rc = find_user(c, e);
        if (rc == BG_ERR_RETRY)
            snprintf(out->error, sizeof(out->error),
                     "no user for this event yet (no custom_data.user_id, unknown subscription "
                     "and customer)");
        if (rc != 0)
            return rc;
        (void)bg_strlcpy(out->user_id, e->user_id, sizeof(out->user_id));
        if (e->processed) {
            out->already = true;
            (void)bg_strlcpy(out->outcome, e->outcome, sizeof(out->outcome));
            return 0;
        }
        rc = find_plan(c, e);
        if (rc == 0)
            rc = sub   ? apply_subscription(c, e, out)
                 : adj ? apply_adjustment(c, e, out)
                       : apply_transaction(c, e, out);
        if (rc != 0)
            return rc;
    }
    if (e->processed) {
        out->already = true;
        (void)bg_strlcpy(out->outcome, e->outcome, sizeof(out->outcome));
        return 0;
    }
    const char *mp[] = {e->inbox_id, out->outcome};
    return bg_pg_run(c,
                     "UPDATE webhook_inbox SET processed_at = now(), outcome = $2, error = NULL, "
                     "attempts = attempts + 1 WHERE id = $1::bigint",
                     2, mp);
}

int bg_billing_apply(PGconn *c, const char *event_id, bg_billing_result_t *out)
{
    memset(out, 0, sizeof(*out));
    event_t *e = bg_calloc(1, sizeof(*e));
    int rc = bg_pg_begin(c);
    if (rc == 0) {
        rc = apply_in_tx(c, event_id, e, out);
        if (rc != 0)
            bg_pg_rollback(c);
        else
            rc = bg_pg_commit(c);
    }
    if (rc == BG_ERR_INVALID && out->error[0] == '\0')
        snprintf(out->error, sizeof(out->error), "the database refused a value of the event");
    if (rc == 0 && !out->already)
        bg_info("billing: %s %s: %s (user %s)", out->event_type, event_id, out->outcome,
                out->user_id[0] != '\0' ? out->user_id : "-");
    free(e);
    return rc;
}

/* ---- reads for the routes ---- */

int bg_billing_checkout_info(PGconn *c, const char *user_id, const char *plan_id,
                             bg_billing_checkout_t *out)
{
    memset(out, 0, sizeof(*out));
    PGresult *res;
    int rc;
    if (plan_id != NULL) {
        const char *pp[] = {plan_id};
        rc = bg_pg_exec(c,
                        "SELECT coalesce(paddle_price_id, ''), active AND purchasable "
                        "FROM plans WHERE id = $1",
                        1, pp, &res);
        if (rc != 0)
            return rc;
        if (PQntuples(res) == 0) {
            PQclear(res);
            return BG_ERR_NOT_FOUND;
        }
        copy(out->price_id, sizeof(out->price_id), res, 0, 0);
        out->purchasable = strcmp(PQgetvalue(res, 0, 1), "t") == 0;
        PQclear(res);
    }
    const char *up[] = {user_id};
    rc = bg_pg_exec(c,
                    "SELECT (SELECT paddle_customer_id FROM billing_accounts WHERE user_id = "
                    "$1::uuid), s.paddle_subscription_id, s.cancel_at_period_end "
                    "FROM (SELECT 1) one LEFT JOIN subscriptions s ON s.user_id = $1::uuid "
                    "AND s.status <> 'canceled' AND s.paddle_subscription_id IS NOT NULL",
                    1, up, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) > 0) {
        copy(out->customer_id, sizeof(out->customer_id), res, 0, 0);
        copy(out->subscription_id, sizeof(out->subscription_id), res, 0, 1);
        const char *v = bg_pg_value(res, 0, 2);
        out->cancel_at_period_end = v != NULL && strcmp(v, "t") == 0;
    }
    PQclear(res);
    return 0;
}

int bg_billing_history(PGconn *c, const char *user_id, const char *cursor, int limit, bg_buf_t *out)
{
    if (limit < 1 || limit > BG_BILLING_HISTORY_MAX)
        return BG_ERR_INVALID;
    if (cursor != NULL && !bg_id_uuid_is_valid(cursor))
        return BG_ERR_INVALID;
    char lim[16];
    snprintf(lim, sizeof(lim), "%d", limit + 1);
    const char *p[] = {user_id, cursor, lim};
    PGresult *res;
    int rc = bg_pg_exec(
        c,
        "SELECT t.id, jsonb_build_object('id', t.id, 'type', CASE WHEN t.kind LIKE 'payment.%' "
        "  THEN 'payment' WHEN t.kind LIKE 'refund.%' THEN 'refund' ELSE 'credit' END, "
        "  'kind', t.kind, 'description', t.description, 'amount', e.amount, 'unit', e.unit, "
        "  'occurred_at', to_char(t.effective_at AT TIME ZONE 'UTC', "
        "    'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), "
        "  'plan', t.metadata ->> 'plan', "
        "  'paddle_transaction_id', t.metadata ->> 'paddle_transaction_id')::text "
        "FROM ledger_transactions t JOIN ledger_entries e ON e.transaction_id = t.id "
        "JOIN ledger_accounts a ON a.id = e.account_id AND a.owner_type = 'user' "
        "  AND a.owner_id = $1::uuid "
        "WHERE t.user_id = $1::uuid AND (t.kind LIKE 'payment.%' OR t.kind LIKE 'refund.%' "
        "  OR t.kind LIKE 'grant.%') "
        "AND ($2::uuid IS NULL OR (t.effective_at, t.id) < (SELECT effective_at, id FROM "
        "  ledger_transactions WHERE id = $2::uuid)) "
        "ORDER BY t.effective_at DESC, t.id DESC LIMIT $3::int",
        3, p, &res);
    if (rc != 0)
        return rc;
    rc = bg_pg_write_page(res, limit, '\0', out);
    PQclear(res);
    return rc;
}

/* ---- plan changes, payments, invoices ---- */

int bg_billing_change_info(PGconn *c, const char *user_id, const char *plan_id,
                           bg_billing_change_t *out)
{
    memset(out, 0, sizeof(*out));
    const char *p[] = {user_id, plan_id};
    PGresult *res;
    int rc = bg_pg_exec(
        c,
        "SELECT coalesce(np.paddle_price_id, ''), np.active AND np.purchasable, "
        "coalesce(s.paddle_subscription_id, ''), coalesce(s.plan_id, ''), "
        "coalesce(s.scheduled_plan_id, ''), coalesce(np.price_minor::numeric / extract(epoch FROM "
        "np.period) > cp.price_minor::numeric / extract(epoch FROM cp.period), false), "
        "coalesce(to_char(s.current_period_end AT TIME ZONE 'UTC', "
        "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), '') "
        "FROM plans np LEFT JOIN subscriptions s ON s.user_id = $1::uuid "
        "AND s.status <> 'canceled' AND s.paddle_subscription_id IS NOT NULL "
        "LEFT JOIN plans cp ON cp.id = s.plan_id WHERE np.id = $2",
        2, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) == 0) {
        PQclear(res);
        return BG_ERR_NOT_FOUND;
    }
    copy(out->price_id, sizeof(out->price_id), res, 0, 0);
    out->purchasable = strcmp(PQgetvalue(res, 0, 1), "t") == 0;
    copy(out->subscription_id, sizeof(out->subscription_id), res, 0, 2);
    copy(out->current_plan, sizeof(out->current_plan), res, 0, 3);
    copy(out->scheduled_plan, sizeof(out->scheduled_plan), res, 0, 4);
    out->upgrade = strcmp(PQgetvalue(res, 0, 5), "t") == 0;
    copy(out->period_end, sizeof(out->period_end), res, 0, 6);
    PQclear(res);
    return 0;
}

int bg_billing_owns_transaction(PGconn *c, const char *user_id, const char *txn,
                                const char *customer_id, const char *subscription_id)
{
    const char *p[] = {
        user_id, txn, customer_id != NULL && customer_id[0] != '\0' ? customer_id : NULL,
        subscription_id != NULL && subscription_id[0] != '\0' ? subscription_id : NULL};
    PGresult *res;
    int rc = bg_pg_exec(
        c,
        "SELECT EXISTS (SELECT 1 FROM billing_accounts b WHERE b.user_id = $1::uuid AND ("
        "  EXISTS (SELECT 1 FROM invoices v WHERE v.billing_account_id = b.id "
        "    AND v.paddle_transaction_id = $2) "
        "  OR EXISTS (SELECT 1 FROM payments y WHERE y.billing_account_id = b.id "
        "    AND y.paddle_transaction_id = $2) "
        "  OR b.paddle_customer_id = $3 "
        "  OR EXISTS (SELECT 1 FROM subscriptions s WHERE s.user_id = $1::uuid "
        "    AND s.paddle_subscription_id = $4)))",
        4, p, &res);
    if (rc != 0)
        return rc;
    int owns = strcmp(PQgetvalue(res, 0, 0), "t") == 0 ? 1 : 0;
    PQclear(res);
    return owns;
}

int bg_billing_live_subscription(PGconn *c, const char *user_id, char sub[64], bool *past_due)
{
    sub[0] = '\0';
    *past_due = false;
    const char *p[] = {user_id};
    PGresult *res;
    int rc = bg_pg_exec(c,
                        "SELECT paddle_subscription_id, status = 'past_due' FROM subscriptions "
                        "WHERE user_id = $1::uuid AND status <> 'canceled' "
                        "AND paddle_subscription_id IS NOT NULL LIMIT 1",
                        1, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) > 0) {
        copy(sub, 64, res, 0, 0);
        *past_due = strcmp(PQgetvalue(res, 0, 1), "t") == 0;
    }
    PQclear(res);
    return 0;
}

/* The Invoice object of row v (an invoices alias) as jsonb text. */
#define INVOICE_JSON                                                                               \
    "jsonb_build_object('id', v.id, 'number', v.number, 'status', CASE WHEN v.status = 'draft' "   \
    "THEN 'issued' ELSE v.status END, 'plan', v.plan_id, 'currency', v.currency, "                 \
    "'subtotal_minor', v.subtotal_minor, 'tax_minor', v.tax_minor, 'total_minor', "                \
    "v.total_minor, 'period_start', " TS("v.period_start") ", 'period_end', " TS(                  \
        "v.period_end") ", 'issued_at', " TS("v.issued_at") ", 'paid_at', " TS("v.paid_at") ", "   \
                                                                                            "'htm" \
                                                                                            "l_"   \
                                                                                            "url'" \
                                                                                            ", "   \
                                                                                            "'/"   \
                                                                                            "bill" \
                                                                                            "ing/" \
                                                                                            "invo" \
                                                                                            "ices" \
                                                                                            "/' "  \
                                                                                            "|| "  \
                                                                                            "v."   \
                                                                                            "id "  \
                                                                                            "|| "  \
                                                                                            "'/"   \
                                                                                            "html" \
                                                                                            "')::" \
                                                                                            "text"
#define TS(col) "to_char(" col " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"

int bg_billing_invoices(PGconn *c, const char *user_id, const char *cursor, int limit,
                        bg_buf_t *out)
{
    if (limit < 1 || limit > BG_BILLING_INVOICES_MAX)
        return BG_ERR_INVALID;
    if (cursor != NULL && !bg_id_uuid_is_valid(cursor))
        return BG_ERR_INVALID;
    char lim[16];
    snprintf(lim, sizeof(lim), "%d", limit + 1);
    const char *p[] = {user_id, cursor, lim};
    PGresult *res;
    /* newest first by when it was issued; rows with no time yet sort by their creation */
    int rc = bg_pg_exec(c,
                        "SELECT v.id, " INVOICE_JSON " FROM invoices v JOIN billing_accounts b "
                        "ON b.id = v.billing_account_id AND b.user_id = $1::uuid "
                        "WHERE ($2::uuid IS NULL OR (coalesce(v.issued_at, v.created_at), v.id) < "
                        "(SELECT coalesce(issued_at, created_at), id FROM invoices WHERE id = "
                        "$2::uuid)) ORDER BY coalesce(v.issued_at, v.created_at) DESC, v.id DESC "
                        "LIMIT $3::int",
                        3, p, &res);
    if (rc != 0)
        return rc;
    rc = bg_pg_write_page(res, limit, '\0', out);
    PQclear(res);
    return rc;
}

static int64_t ms_of(const PGresult *res, int col)
{
    int64_t v = 0;
    if (bg_pg_value(res, 0, col) == NULL || bg_pg_int64(res, 0, col, &v) != 0)
        return 0;
    return v;
}

#define EPOCH_MS(col) "floor(extract(epoch FROM " col ") * 1000)::bigint"

int bg_billing_invoice(PGconn *c, const char *user_id, const char *id, bg_buf_t *json,
                       bg_billing_invoice_t *inv)
{
    if (id == NULL || !bg_id_uuid_is_valid(id))
        return BG_ERR_NOT_FOUND;
    const char *p[] = {user_id, id};
    PGresult *res;
    int rc = bg_pg_exec(
        c,
        "SELECT " INVOICE_JSON ", v.id, coalesce(v.number, ''), v.status, "
        "coalesce(v.plan_id, ''), coalesce(pl.name, ''), v.currency, v.subtotal_minor, "
        "v.tax_minor, v.total_minor, " EPOCH_MS("v.period_start") ", " EPOCH_MS(
            "v.period_end") ", " EPOCH_MS("v.issued_at") ", " EPOCH_MS("v.paid_at") ", "
                                                                                    "coalesce(b."
                                                                                    "email, u."
                                                                                    "email, '') "
                                                                                    "FROM invoices "
                                                                                    "v JOIN "
                                                                                    "billing_"
                                                                                    "accounts b ON "
                                                                                    "b.id = "
                                                                                    "v.billing_"
                                                                                    "account_id "
                                                                                    "AND b.user_id "
                                                                                    "= $1::uuid "
                                                                                    "JOIN users u "
                                                                                    "ON u.id = "
                                                                                    "b.user_id "
                                                                                    "LEFT JOIN "
                                                                                    "plans pl ON "
                                                                                    "pl.id = "
                                                                                    "v.plan_id "
                                                                                    "WHERE v.id = "
                                                                                    "$2::uuid",
        2, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) == 0) {
        PQclear(res);
        return BG_ERR_NOT_FOUND;
    }
    if (json != NULL && bg_buf_puts(json, PQgetvalue(res, 0, 0)) != 0) {
        PQclear(res);
        return BG_ERR_TOO_LARGE;
    }
    if (inv != NULL) {
        memset(inv, 0, sizeof(*inv));
        copy(inv->id, sizeof(inv->id), res, 0, 1);
        copy(inv->number, sizeof(inv->number), res, 0, 2);
        copy(inv->status, sizeof(inv->status), res, 0, 3);
        copy(inv->plan, sizeof(inv->plan), res, 0, 4);
        copy(inv->plan_name, sizeof(inv->plan_name), res, 0, 5);
        copy(inv->currency, sizeof(inv->currency), res, 0, 6);
        inv->subtotal_minor = ms_of(res, 7);
        inv->tax_minor = ms_of(res, 8);
        inv->total_minor = ms_of(res, 9);
        inv->period_start_ms = ms_of(res, 10);
        inv->period_end_ms = ms_of(res, 11);
        inv->issued_ms = ms_of(res, 12);
        inv->paid_ms = ms_of(res, 13);
        copy(inv->email, sizeof(inv->email), res, 0, 14);
        if (strcmp(inv->status, "draft") == 0)
            (void)bg_strlcpy(inv->status, "issued", sizeof(inv->status));
    }
    PQclear(res);
    return 0;
}

int bg_billing_outlook(PGconn *c, const char *user_id, bg_billing_outlook_t *out)
{
    memset(out, 0, sizeof(*out));
    if (!bg_id_uuid_is_valid(user_id))
        return 0;
    const char *p[] = {user_id};
    PGresult *res;
    int rc = bg_pg_exec(c,
                        "SELECT status FROM subscriptions WHERE user_id = $1::uuid "
                        "AND status <> 'canceled' LIMIT 1",
                        1, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) == 1)
        copy(out->sub_status, sizeof(out->sub_status), res, 0, 0);
    PQclear(res);
    /* the renewal: a live Paddle subscription renews at its period end unless it is cancelled
     * then; a downgrade scheduled for that moment is what renews */
    rc = bg_pg_exec(c,
                    "SELECT to_char(s.current_period_end AT TIME ZONE 'UTC', "
                    "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), p.price_minor, p.currency, p.id "
                    "FROM subscriptions s JOIN plans p ON p.id = CASE WHEN "
                    "s.scheduled_plan_id IS NOT NULL AND s.scheduled_change_at <= "
                    "s.current_period_end THEN s.scheduled_plan_id ELSE s.plan_id END "
                    "WHERE s.user_id = $1::uuid AND s.status IN ('active', 'past_due') "
                    "AND s.paddle_subscription_id IS NOT NULL AND NOT s.cancel_at_period_end "
                    "LIMIT 1",
                    1, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) == 1 && bg_pg_int64(res, 0, 1, &out->amount_minor) == 0) {
        copy(out->next_bill_at, sizeof(out->next_bill_at), res, 0, 0);
        copy(out->currency, sizeof(out->currency), res, 0, 2);
        copy(out->plan, sizeof(out->plan), res, 0, 3);
        out->next_bill = true;
    }
    PQclear(res);

    /* the method of the newest captured payment of the user's invoices, as Paddle reported it */
    rc = bg_pg_exec(c,
                    "SELECT coalesce(pm -> 'method_details' ->> 'type', ''), "
                    "coalesce(pm -> 'method_details' -> 'card' ->> 'type', ''), "
                    "coalesce(pm -> 'method_details' -> 'card' ->> 'last4', '') "
                    "FROM invoices i JOIN billing_accounts b ON b.id = i.billing_account_id "
                    "JOIN webhook_inbox w ON w.provider = 'paddle' AND w.event_type IN "
                    "('transaction.completed', 'transaction.paid') "
                    "AND w.payload -> 'data' ->> 'id' = i.paddle_transaction_id "
                    "CROSS JOIN LATERAL jsonb_array_elements(CASE WHEN jsonb_typeof(w.payload -> "
                    "'data' -> 'payments') = 'array' THEN w.payload -> 'data' -> 'payments' ELSE "
                    "'[]' END) pm "
                    "WHERE b.user_id = $1::uuid AND pm ->> 'status' = 'captured' "
                    "ORDER BY w.occurred_at DESC NULLS LAST, w.id DESC LIMIT 1",
                    1, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) == 1 && PQgetlength(res, 0, 0) > 0) {
        copy(out->method_type, sizeof(out->method_type), res, 0, 0);
        copy(out->card_brand, sizeof(out->card_brand), res, 0, 1);
        copy(out->card_last4, sizeof(out->card_last4), res, 0, 2);
        out->method = true;
    }
    PQclear(res);
    return 0;
}

int bg_billing_scheduled(PGconn *c, const char *user_id, bg_billing_scheduled_t *out)
{
    memset(out, 0, sizeof(*out));
    const char *p[] = {user_id};
    PGresult *res;
    /* a scheduled cancellation ends the subscription, so it wins over a plan change */
    int rc = bg_pg_exec(c,
                        "SELECT CASE WHEN cancel_at_period_end THEN 'cancel' ELSE 'change_plan' "
                        "END, CASE WHEN cancel_at_period_end THEN '' ELSE scheduled_plan_id END, "
                        "to_char(CASE WHEN cancel_at_period_end THEN current_period_end "
                        "ELSE scheduled_change_at END AT TIME ZONE 'UTC', "
                        "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') FROM subscriptions "
                        "WHERE user_id = $1::uuid AND status <> 'canceled' "
                        "AND (cancel_at_period_end OR scheduled_plan_id IS NOT NULL) LIMIT 1",
                        1, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) > 0) {
        copy(out->action, sizeof(out->action), res, 0, 0);
        copy(out->plan, sizeof(out->plan), res, 0, 1);
        copy(out->effective_at, sizeof(out->effective_at), res, 0, 2);
    }
    PQclear(res);
    return 0;
}
