/*
 * GET /admin/stats: the platform at a glance, for the admin page's "Statistics" — users (total,
 * active and new in the last 7 days), live subscriptions by plan and status, requests and tokens
 * today and for each of the last 30 days (UTC, from the usage_daily rollup, which a trigger keeps
 * in step with usage_records), and the revenue the ledger recorded in the last 30 days, in minor
 * units per currency (what the system `sales` accounts gave out: a refund posted against them
 * lowers it).
 *
 * The whole answer is one statement, so its parts come from one snapshot and always agree; Postgres
 * builds the JSON (like bg_usage_summary), and the edge only wraps it. It runs on the thread pool
 * with this thread's blocking connection, after checking in Postgres that the caller is still an
 * active admin (the route already required the admin role in the token).
 */
#include <stdlib.h>
#include <string.h>

#include "bg/err.h"
#include "bg/pg.h"
#include "edge.h"

/* The answer is a few KiB (30 days, a handful of plans and currencies); the cap is generous. */
#define STATS_MAX_BYTES (1u << 20)

typedef struct st_stats_op {
    const bg_config_t *cfg;
    char admin_id[64];
    int rc;
    bg_buf_t body; /* the JSON object, owned */
} stats_op_t;

static void op_free(void *p)
{
    stats_op_t *op = p;
    if (op == NULL)
        return;
    bg_buf_dispose(&op->body);
    free(op);
}

/*
 * Active users: signed in or made a request in the last 7 days (days counted in UTC, today
 * included). Subscriptions: the live ones (not canceled) and those canceled in the last 30 days,
 * so a cancellation wave shows. The by_day series has all 30 days, zero-filled, oldest first.
 */
static const char STATS_SQL[] =
    "WITH d AS (SELECT (now() AT TIME ZONE 'UTC')::date AS today), "
    "days AS (SELECT g::date AS day FROM d, generate_series(d.today - 29, d.today, "
    "interval '1 day') g), "
    "u AS (SELECT day, sum(requests) AS requests, sum(errors) AS errors, "
    "sum(prompt_tokens + completion_tokens) AS tokens FROM usage_daily, d "
    "WHERE day >= d.today - 29 GROUP BY day), "
    "series AS (SELECT days.day, coalesce(u.requests, 0)::bigint AS requests, "
    "coalesce(u.errors, 0)::bigint AS errors, coalesce(u.tokens, 0)::bigint AS tokens "
    "FROM days LEFT JOIN u USING (day)) "
    "SELECT json_build_object("
    "'generated_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), "
    "'users', (SELECT json_build_object('total', count(*), "
    "'active_7d', count(*) FILTER (WHERE x.last_login_at >= now() - interval '7 days' OR "
    "EXISTS (SELECT 1 FROM usage_daily ud WHERE ud.user_id = x.id AND ud.day >= d.today - 6)), "
    "'new_7d', count(*) FILTER (WHERE x.created_at >= now() - interval '7 days'), "
    "'disabled', count(*) FILTER (WHERE x.status = 'disabled')) "
    "FROM users x, d WHERE x.deleted_at IS NULL), "
    "'subscriptions', coalesce((SELECT json_agg(s ORDER BY s.plan, s.status) FROM "
    "(SELECT plan_id AS plan, status, count(*) AS count FROM subscriptions WHERE status <> "
    "'canceled' OR canceled_at >= now() - interval '30 days' GROUP BY plan_id, status) s), '[]'), "
    "'usage', json_build_object("
    "'today', (SELECT json_build_object('requests', requests, 'errors', errors, 'tokens', tokens) "
    "FROM series, d WHERE series.day = d.today), "
    "'last_30_days', (SELECT json_build_object('requests', coalesce(sum(requests), 0), "
    "'errors', coalesce(sum(errors), 0), 'tokens', coalesce(sum(tokens), 0)) FROM series), "
    "'by_day', (SELECT json_agg(json_build_object('date', to_char(day, 'YYYY-MM-DD'), "
    "'requests', requests, 'errors', errors, 'tokens', tokens) ORDER BY day) FROM series)), "
    "'revenue', coalesce((SELECT json_agg(r ORDER BY r.currency) FROM "
    "(SELECT e.unit AS currency, (-sum(e.amount))::bigint AS amount_minor, "
    "count(DISTINCT e.transaction_id) AS transactions FROM ledger_entries e "
    "JOIN ledger_accounts a ON a.id = e.account_id "
    "JOIN ledger_transactions t ON t.id = e.transaction_id "
    "WHERE a.owner_type = 'system' AND a.purpose = 'sales' AND e.unit <> 'request' "
    "AND t.effective_at >= now() - interval '30 days' GROUP BY e.unit) r), '[]'))::text";

static void stats_work(void *arg)
{
    stats_op_t *op = arg;
    PGconn *c = edge_pg(op->cfg, op->admin_id, &op->rc);
    if (c == NULL)
        return;
    PGresult *res;
    op->rc = bg_pg_exec(c, STATS_SQL, 0, NULL, &res);
    if (op->rc != 0)
        return;
    const char *json = PQntuples(res) == 1 ? PQgetvalue(res, 0, 0) : NULL;
    if (json == NULL || json[0] != '{')
        op->rc = BG_ERR_PROTOCOL;
    else
        op->rc = bg_buf_puts(&op->body, json);
    PQclear(res);
}

static void stats_done(edge_req_t *er, void *arg)
{
    stats_op_t *op = arg;
    if (er->req == NULL)
        return;
    if (op->rc != 0) {
        edge_fail(er, op->rc);
        return;
    }
    edge_add_header(er, "cache-control", "no-store");
    edge_respond_json(er, 200, &op->body);
}

static void stats_get(edge_req_t *er)
{
    stats_op_t *op = bg_calloc(1, sizeof(*op));
    er->data = op;
    er->data_free = op_free;
    op->cfg = er->thread->server->cfg;
    bg_strlcpy(op->admin_id, er->auth.user_id, sizeof(op->admin_id));
    bg_buf_init(&op->body, STATS_MAX_BYTES);
    edge_run(er, stats_work, stats_done);
}

const edge_route_t edge_routes_admin_stats[] = {
    {"GET", "/admin/stats", "admin_stats", stats_get, 0, 0, EDGE_ADMIN},
    {NULL, NULL, NULL, NULL, 0, 0, EDGE_PUBLIC},
};
