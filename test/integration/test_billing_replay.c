/*
 * Replaying a recorded Paddle event sequence in random orders: the billing worker's effects
 * (bg_billing_apply) must not depend on the order or the number of deliveries.
 *
 * The sequence is one customer's year, built from the SDK fixtures in test/fixtures/paddle/ (the
 * shapes of ../shared/fixtures/paddle) with ids, statuses, prices and periods set per event:
 * checkout (transaction.completed, subscription.created, subscription.activated), a renewal, a
 * failed renewal (updated(active) → payment_failed → updated(past_due) → past_due) paid later, a
 * refund of the first renewal (adjustment.created pending, adjustment.updated approved), a plan
 * change from monthly to yearly, a cancellation scheduled for the period end and the cancellation
 * itself. Every event is delivered twice (stored through the inbox as the edge does,
 * then applied as the worker does), in 100 seeded random orders. Each run has its own user and its
 * own Paddle ids, so all runs share one database; what is compared is the normalized result:
 * the subscription row, the entitlements the policy compiler derives from it, and the user's
 * Paddle ledger transactions. They must be identical in every run and equal to the expected
 * values, and the whole ledger must balance.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/billing.h"
#include "bg/err.h"
#include "bg/pg.h"
#include "bg/plans.h"
#include "bg/policy.h"
#include "bg/timeutil.h"
#include "bgtest.h"

#define FIXTURES BGT_SOURCE_DIR "/test/fixtures/paddle/"
#define PRICE_MONTHLY "pri_01gsz8x8sawmvhz1pv30nge1ke" /* the fixtures' own price */
#define PRICE_YEARLY "pri_01gsz8z1q1n00f12qt82y31smh"
#define RUNS 100

static bgt_pg_t db;
static PGconn *conn;
static char *sub_tmpl, *txn_tmpl;

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "cannot open %s", path);
    char *buf = calloc(1, 65536);
    size_t n = fread(buf, 1, 65535, f);
    (void)fclose(f);
    cr_assert(n > 0);
    return buf;
}

static void setup(void)
{
    cr_assert_eq(bgt_pg_create(&db, true), 0);
    char err[512];
    cr_assert_eq(bg_pg_connect(db.url, 3, &conn, err, sizeof(err)), 0, "connect: %s", err);
    cr_assert_eq(
        bg_pg_run(conn,
                  "UPDATE plans SET paddle_price_id = CASE id WHEN 'monthly' THEN '" PRICE_MONTHLY
                  "' ELSE '" PRICE_YEARLY "' END, paddle_price_source = 'admin' "
                  "WHERE id IN ('monthly', 'yearly')",
                  0, NULL),
        0);
    sub_tmpl = slurp(FIXTURES "subscription.created.json");
    txn_tmpl = slurp(FIXTURES "transaction.completed.json");
}

static void teardown(void)
{
    free(sub_tmpl);
    free(txn_tmpl);
    PQfinish(conn);
    conn = NULL;
    bgt_pg_drop(&db);
}

TestSuite(billing_replay, .init = setup, .fini = teardown, .timeout = 600);

/* Runs sql; returns the first field of the first row as a new string ("" for NULL). */
static char *q(const char *sql, int n, const char *const *params)
{
    PGresult *res;
    int rc = bg_pg_exec(conn, sql, n, params, &res);
    cr_assert_eq(rc, 0, "query failed (%s): %s", bg_strerror(rc), sql);
    const char *v = PQntuples(res) > 0 ? bg_pg_value(res, 0, 0) : NULL;
    char *out = strdup(v != NULL ? v : "");
    PQclear(res);
    return out;
}

/* One event of the sequence; the ids get the run's tag. */
typedef struct st_ev {
    const char *type;
    const char *occurred;
    bool txn;
    const char *status;
    const char *price;
    const char *ps, *pe; /* billing period, NULL for none */
    const char *txn_no;  /* transactions: which one ("1".."4") */
    const char *total;
    const char *sched; /* subscriptions: scheduled_change JSON or NULL */
    const char *canceled_at;
    bool failed;
    const char *adj; /* adjustments: the status ("pending_approval", "approved"), else NULL */
} ev_t;

#define P1 "2024-04-12T10:18:47.635628Z", "2024-05-12T10:18:47.635628Z"
#define P2 "2024-05-12T10:18:47.635628Z", "2024-06-12T10:18:47.635628Z"
#define P3 "2024-06-12T10:18:47.635628Z", "2024-07-12T10:18:47.635628Z"
#define P4 "2024-06-20T12:00:00.000000Z", "2025-06-20T12:00:00.000000Z"

static const ev_t seq[] = {
    /* checkout */
    {"transaction.completed", "2024-04-12T10:18:50.136524Z", true, "completed", PRICE_MONTHLY, P1,
     "1", "1999", NULL, NULL, false},
    {"subscription.created", "2024-04-12T10:18:51.100000Z", false, "active", PRICE_MONTHLY, P1,
     NULL, NULL, NULL, NULL, false},
    {"subscription.activated", "2024-04-12T10:18:51.200000Z", false, "active", PRICE_MONTHLY, P1,
     NULL, NULL, NULL, NULL, false},
    /* renewal */
    {"transaction.completed", "2024-05-12T10:18:50.000000Z", true, "completed", PRICE_MONTHLY, P2,
     "2", "1999", NULL, NULL, false},
    {"subscription.updated", "2024-05-12T10:18:51.000000Z", false, "active", PRICE_MONTHLY, P2,
     NULL, NULL, NULL, NULL, false},
    /* the renewal is refunded in full: an adjustment, pending, then approved */
    {"adjustment.created", "2024-05-20T08:00:00.000000Z", false, "refund", NULL, NULL, NULL, "2",
     "1999", NULL, NULL, false, "pending_approval"},
    {"adjustment.updated", "2024-05-21T09:00:00.000000Z", false, "refund", NULL, NULL, NULL, "2",
     "1999", NULL, NULL, false, "approved"},
    /* failed renewal, paid two days later */
    {"subscription.updated", "2024-06-12T10:18:49.000000Z", false, "active", PRICE_MONTHLY, P3,
     NULL, NULL, NULL, NULL, false},
    {"transaction.payment_failed", "2024-06-12T10:18:50.000000Z", true, "ready", PRICE_MONTHLY, P3,
     "3", "1999", NULL, NULL, true},
    {"subscription.updated", "2024-06-12T10:18:51.000000Z", false, "past_due", PRICE_MONTHLY, P3,
     NULL, NULL, NULL, NULL, false},
    {"subscription.past_due", "2024-06-12T10:18:52.000000Z", false, "past_due", PRICE_MONTHLY, P3,
     NULL, NULL, NULL, NULL, false},
    {"transaction.completed", "2024-06-14T09:00:00.000000Z", true, "completed", PRICE_MONTHLY, P3,
     "3", "1999", NULL, NULL, false},
    {"subscription.updated", "2024-06-14T09:00:01.000000Z", false, "active", PRICE_MONTHLY, P3,
     NULL, NULL, NULL, NULL, false},
    /* plan change to yearly, billed at once with a new period */
    {"subscription.updated", "2024-06-20T12:00:02.000000Z", false, "active", PRICE_YEARLY, P4, NULL,
     NULL, NULL, NULL, false},
    {"transaction.paid", "2024-06-20T12:00:01.000000Z", true, "paid", PRICE_YEARLY, P4, "4",
     "19999", NULL, NULL, false},
    {"transaction.completed", "2024-06-20T12:00:03.000000Z", true, "completed", PRICE_YEARLY, P4,
     "4", "19999", NULL, NULL, false},
    /* cancellation at the period end */
    {"subscription.updated", "2024-07-01T08:00:00.000000Z", false, "active", PRICE_YEARLY, P4, NULL,
     NULL,
     "{\"action\":\"cancel\",\"effective_at\":\"2025-06-20T12:00:00.000000Z\",\"resume_at\":null}",
     NULL, false},
    {"subscription.canceled", "2025-06-20T12:00:01.000000Z", false, "canceled", PRICE_YEARLY, NULL,
     NULL, NULL, NULL, NULL, "2025-06-20T12:00:00.000000Z", false},
};
#define NSEQ (sizeof(seq) / sizeof(seq[0]))

/* The event n of run tag as JSON text (new string). */
static char *build(const char *tag, size_t n, const char *user)
{
    const ev_t *e = &seq[n];
    char evt[64], sub[64], ctm[64], txn[64];
    snprintf(evt, sizeof(evt), "evt_%s_%02zu", tag, n);
    snprintf(sub, sizeof(sub), "sub_%s", tag);
    snprintf(ctm, sizeof(ctm), "ctm_%s", tag);
    if (e->adj != NULL) {
        /* Paddle's adjustment: no custom_data; its user is found through the subscription or
         * customer; created_at is the first snapshot's time (the refund's ledger time) */
        snprintf(txn, sizeof(txn), "txn_%s_%s", tag, e->txn_no);
        char adj[64];
        snprintf(adj, sizeof(adj), "adj_%s_%s", tag, e->txn_no);
        const char *p[] = {evt,    e->type, e->occurred, adj, e->status,
                           e->adj, txn,     sub,         ctm, e->total};
        return q("SELECT jsonb_build_object('event_id', $1::text, 'event_type', $2::text, "
                 "'occurred_at', $3::text, 'notification_id', 'ntf_' || $1, 'data', "
                 "jsonb_build_object('id', $4::text, 'action', $5::text, 'type', 'full', "
                 "'status', $6::text, 'reason', 'requested', 'currency_code', 'USD', "
                 "'transaction_id', $7::text, 'subscription_id', $8::text, 'customer_id', "
                 "$9::text, 'items', '[]'::jsonb, 'totals', jsonb_build_object('subtotal', "
                 "$10::text, 'tax', '0', 'total', $10::text, 'fee', '0', 'earnings', '0', "
                 "'currency_code', 'USD'), 'created_at', '2024-05-20T08:00:00.000000Z', "
                 "'updated_at', $3::text))::text",
                 10, p);
    }
    if (!e->txn) {
        const char *p[] = {sub_tmpl, evt,   e->type,  e->occurred,    sub,  e->status, e->price,
                           e->ps,    e->pe, e->sched, e->canceled_at, user, ctm};
        return q("SELECT (t || jsonb_build_object('event_id', $2::text, 'event_type', $3::text, "
                 "'occurred_at', $4::text, 'notification_id', 'ntf_' || $2, 'data', (t -> 'data') "
                 "|| jsonb_build_object('id', $5::text, 'status', $6::text, 'customer_id', "
                 "$13::text, 'custom_data', jsonb_build_object('user_id', $12::text), "
                 "'current_billing_period', CASE WHEN $8::text IS NULL THEN 'null'::jsonb ELSE "
                 "jsonb_build_object('starts_at', $8::text, 'ends_at', $9::text) END, "
                 "'next_billed_at', coalesce(to_jsonb($9::text), 'null'::jsonb), "
                 "'scheduled_change', coalesce($10::jsonb, 'null'::jsonb), "
                 "'canceled_at', coalesce(to_jsonb($11::text), 'null'::jsonb), "
                 "'items', jsonb_set(t -> 'data' -> 'items', '{0,price,id}', to_jsonb($7::text)))))"
                 "::text FROM (SELECT $1::jsonb AS t) s",
                 13, p);
    }
    snprintf(txn, sizeof(txn), "txn_%s_%s", tag, e->txn_no);
    const char *p[] = {txn_tmpl, evt,   e->type, e->occurred, txn,  sub, e->status,
                       e->price, e->ps, e->pe,   e->total,    user, ctm, e->failed ? "t" : "f"};
    return q("SELECT (t || jsonb_build_object('event_id', $2::text, 'event_type', $3::text, "
             "'occurred_at', $4::text, 'notification_id', 'ntf_' || $2, 'data', (t -> 'data') || "
             "jsonb_build_object('id', $5::text, 'subscription_id', $6::text, 'status', $7::text, "
             "'customer_id', $13::text, 'custom_data', jsonb_build_object('user_id', $12::text), "
             "'origin', 'subscription_recurring', 'billed_at', $9::text, "
             "'billing_period', jsonb_build_object('starts_at', $9::text, 'ends_at', $10::text), "
             "'invoice_number', $5::text, "
             "'items', jsonb_set(t -> 'data' -> 'items', '{0,price,id}', to_jsonb($8::text)), "
             "'details', jsonb_set(t -> 'data' -> 'details', '{totals,grand_total}', "
             "  to_jsonb($11::text)), "
             "'payments', CASE WHEN $14::boolean THEN jsonb_build_array(jsonb_build_object("
             "  'amount', $11::text, 'status', 'error', 'error_code', 'declined', "
             "  'payment_attempt_id', $2 || '-attempt', 'created_at', $4::text, "
             "  'captured_at', null, 'method_details', jsonb_build_object('type', 'card'))) "
             "  ELSE t -> 'data' -> 'payments' END)))::text FROM (SELECT $1::jsonb AS t) s",
             14, p);
}

/* A small deterministic generator (xorshift64*), so a failing seed can be replayed. */
static uint64_t next_rand(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ULL;
}

/* The normalized outcome of one run. */
typedef struct st_outcome {
    char *sub;     /* the subscription row */
    char *ledger;  /* the user's Paddle ledger transactions */
    char *inv;     /* the user's invoices */
    char ent[256]; /* entitlements at a fixed time */
} outcome_t;

static void outcome_free(outcome_t *o)
{
    free(o->sub);
    free(o->ledger);
    free(o->inv);
}

/* Runs one delivery order of events [0, nevents) twice each; fills out. */
static void run(int r, size_t nevents, int64_t at_ms, outcome_t *out)
{
    char tag[32], email[64];
    snprintf(tag, sizeof(tag), "r%03d_%zu", r, nevents);
    snprintf(email, sizeof(email), "%s@replay.example", tag);
    const char *ep[] = {email};
    char *user = q("INSERT INTO users (email) VALUES ($1) RETURNING id", 1, ep);
    /* the user is on the trial when they buy: the Paddle subscription replaces it */
    bg_plan_grant_t g = {.user_id = user, .plan_id = "trial", .days = 14};
    bg_plan_grant_result_t gr;
    cr_assert_eq(bg_plans_grant(conn, &g, NULL, &gr), 0);

    char *events[2 * NSEQ];
    size_t n = 0;
    for (size_t i = 0; i < nevents; i++) {
        events[n] = build(tag, i, user);
        events[n + 1] = strdup(events[n]);
        n += 2;
    }
    uint64_t s = 0x9E3779B97F4A7C15ULL ^ (uint64_t)(r + 1) * 0xBF58476D1CE4E5B9ULL;
    for (size_t i = n - 1; i > 0; i--) {
        size_t j = (size_t)(next_rand(&s) % (i + 1));
        char *t = events[i];
        events[i] = events[j];
        events[j] = t;
    }
    /* an event whose user is not known yet (an adjustment before any event naming the user)
     * is retried after the others, as the worker's job retry does */
    size_t retries = 0;
    for (size_t i = 0; i < n; i++) {
        bg_billing_inbox_result_t in;
        int rc = bg_billing_inbox_put(conn, events[i], strlen(events[i]), &in);
        cr_assert_eq(rc, 0, "inbox: %s", bg_strerror(rc));
        bg_billing_result_t res;
        /* the worker may get a job twice, too: apply whether or not the inbox says pending */
        rc = bg_billing_apply(conn, in.event_id, &res);
        if (rc == BG_ERR_RETRY && retries++ < 4 * n) {
            char *again = events[i];
            for (size_t j = i; j + 1 < n; j++)
                events[j] = events[j + 1];
            events[n - 1] = again;
            i--;
            continue;
        }
        cr_assert_eq(rc, 0, "run %d: %s: %s (%s)", r, in.event_id, bg_strerror(rc), res.error);
        cr_assert_str_eq(res.user_id, user, "event %s names the user", in.event_id);
        free(events[i]);
        events[i] = NULL;
    }

    char like[48];
    snprintf(like, sizeof(like), "evt\\_%s\\_%%", tag);
    const char *lp[] = {like};
    char *stored = q("SELECT count(*) || '/' || count(*) FILTER (WHERE processed_at IS NOT NULL) "
                     "FROM webhook_inbox WHERE event_id LIKE $1",
                     1, lp);
    char want[32];
    snprintf(want, sizeof(want), "%zu/%zu", nevents, nevents);
    cr_expect_str_eq(stored, want, "every event stored once and processed");
    free(stored);

    char sub[64];
    snprintf(sub, sizeof(sub), "sub_%s", tag);
    const char *sp[] = {sub};
    out->sub =
        q("SELECT concat_ws(' ', plan_id, status, "
          "to_char(current_period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US'), "
          "to_char(current_period_end AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US'), "
          "'cancel_at_end=' || cancel_at_period_end, 'canceled=' || coalesce(to_char("
          "canceled_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS'), '-'), "
          "'price=' || paddle_price_id, 'live_rows=' || (SELECT count(*) FROM "
          "subscriptions l WHERE l.user_id = s.user_id AND l.status <> 'canceled')) "
          "FROM subscriptions s WHERE paddle_subscription_id = $1",
          1, sp);
    const char *up[] = {user};
    out->ledger = q("SELECT string_agg(concat_ws(' ', t.kind, to_char(t.effective_at AT TIME ZONE "
                    "'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS'), e.unit, e.amount), '; ' ORDER BY "
                    "t.effective_at, t.kind, e.unit, e.amount DESC) FROM ledger_transactions t "
                    "JOIN ledger_entries e ON e.transaction_id = t.id "
                    "WHERE t.user_id = $1::uuid AND t.kind LIKE '%.paddle'",
                    1, up);
    const char *ip[] = {user, tag};
    out->inv = q("SELECT string_agg(concat_ws(' ', replace(v.number, $2, 'T'), v.status, "
                 "v.total_minor, to_char(v.paid_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')), '; ' "
                 "ORDER BY v.number) FROM invoices v JOIN billing_accounts b "
                 "ON b.id = v.billing_account_id WHERE b.user_id = $1::uuid",
                 2, ip);
    bg_admission_state_t st;
    cr_assert_eq(bg_policy_compile_user(conn, user, at_ms, &st), 0);
    snprintf(out->ent, sizeof(out->ent), "%s %s q=%lld anchor=%lld until=%lld", st.status, st.plan,
             (long long)st.limits.q_limit, (long long)(st.status[0] == 'n' ? 0 : st.w_anchor),
             (long long)(st.status[0] == 'n' ? 0 : st.w_until));
    free(user);
}

static int64_t ms(const char *t)
{
    int64_t v = 0;
    cr_assert_eq(bg_timeutil_parse_rfc3339(t, strlen(t), &v), 0);
    return v;
}

/* Runs RUNS orders of the first nevents events; checks they agree and returns the first. */
static void replay(size_t nevents, int64_t at_ms, outcome_t *first)
{
    for (int r = 0; r < RUNS; r++) {
        outcome_t o;
        run(r, nevents, at_ms, &o);
        if (r == 0) {
            *first = o;
            continue;
        }
        cr_assert_str_eq(o.sub, first->sub, "run %d: subscription differs: %s vs %s", r, o.sub,
                         first->sub);
        cr_assert_str_eq(o.ledger, first->ledger, "run %d: ledger differs: %s vs %s", r, o.ledger,
                         first->ledger);
        cr_assert_str_eq(o.ent, first->ent, "run %d: entitlements differ: %s vs %s", r, o.ent,
                         first->ent);
        cr_assert_str_eq(o.inv, first->inv, "run %d: invoices differ: %s vs %s", r, o.inv,
                         first->inv);
        outcome_free(&o);
    }
}

static void expect_ledger_balances(void)
{
    char *bad = q("SELECT count(*) FROM (SELECT unit FROM ledger_entries GROUP BY unit "
                  "HAVING sum(amount) <> 0) u",
                  0, NULL);
    cr_expect_str_eq(bad, "0", "every unit sums to zero over the whole ledger");
    free(bad);
    bad = q("SELECT count(*) FROM (SELECT transaction_id FROM ledger_entries "
            "GROUP BY transaction_id, unit HAVING sum(amount) <> 0) u",
            0, NULL);
    cr_expect_str_eq(bad, "0", "every transaction balances");
    free(bad);
}

#define LEDGER_ALL                                                                                 \
    "grant.paddle 2024-04-12T10:18:47 request 10000; grant.paddle 2024-04-12T10:18:47 request "    \
    "-10000; payment.paddle 2024-04-12T10:18:47 USD 1999; payment.paddle 2024-04-12T10:18:47 USD " \
    "-1999; grant.paddle 2024-05-12T10:18:47 request 10000; grant.paddle 2024-05-12T10:18:47 "     \
    "request -10000; payment.paddle 2024-05-12T10:18:47 USD 1999; payment.paddle "                 \
    "2024-05-12T10:18:47 USD -1999; grant.refund.paddle 2024-05-20T08:00:00 request 10000; "       \
    "grant.refund.paddle 2024-05-20T08:00:00 request -10000; "                                     \
    "refund.paddle 2024-05-20T08:00:00 USD 1999; refund.paddle "                                   \
    "2024-05-20T08:00:00 USD -1999; grant.paddle 2024-06-12T10:18:47 request 10000; grant.paddle " \
    "2024-06-12T10:18:47 request -10000; payment.paddle 2024-06-12T10:18:47 USD 1999; "            \
    "payment.paddle 2024-06-12T10:18:47 USD -1999; grant.paddle 2024-06-20T12:00:00 request "      \
    "150000; grant.paddle 2024-06-20T12:00:00 request -150000; payment.paddle "                    \
    "2024-06-20T12:00:00 "                                                                         \
    "USD 19999; payment.paddle 2024-06-20T12:00:00 USD -19999"

Test(billing_replay, every_order_of_every_duplicated_event_ends_the_same)
{
    outcome_t o;
    replay(NSEQ, ms("2025-07-01T00:00:00Z"), &o);
    cr_expect_str_eq(o.sub, "yearly canceled 2024-06-20T12:00:00.000000 2025-06-20T12:00:00.000000 "
                            "cancel_at_end=false canceled=2025-06-20T12:00:00 price=" PRICE_YEARLY
                            " live_rows=0");
    cr_expect_str_eq(o.ent, "none yearly q=0 anchor=0 until=0");
    cr_expect_str_eq(o.ledger, LEDGER_ALL);
    /* the failed renewal (3) was paid two days later; the refunded one (2) is refunded, and the
     * 10,000 requests its period granted are taken back at the refund's time, in every order */
    cr_expect_str_eq(o.inv, "txn_T_1 paid 1999 2024-04-12; txn_T_2 refunded 1999 2024-05-12; "
                            "txn_T_3 paid 1999 2024-06-14; txn_T_4 paid 19999 2024-06-20");
    outcome_free(&o);
    expect_ledger_balances();
}

Test(billing_replay, before_the_cancellation_the_yearly_plan_is_live_in_every_order)
{
    /* every event but the final subscription.canceled: the plan change and the scheduled
     * cancellation are the newest snapshots */
    outcome_t o;
    replay(NSEQ - 1, ms("2024-07-02T00:00:00Z"), &o);
    cr_expect_str_eq(o.sub, "yearly active 2024-06-20T12:00:00.000000 2025-06-20T12:00:00.000000 "
                            "cancel_at_end=true canceled=- price=" PRICE_YEARLY " live_rows=1");
    char want[256];
    snprintf(want, sizeof(want), "active yearly q=150000 anchor=%lld until=%lld",
             (long long)ms("2024-06-20T12:00:00Z"), (long long)ms("2025-06-20T12:00:00Z"));
    cr_expect_str_eq(o.ent, want);
    cr_expect_str_eq(o.ledger, LEDGER_ALL);
    outcome_free(&o);
    expect_ledger_balances();
}
