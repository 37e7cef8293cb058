/*
 * GET /billing/usage: what the caller used in one quota window, for the plans page and its charts:
 * totals, by day (UTC), by agent and by channel, from usage_records (one statement: the parts
 * always agree). ?period=current (the default) is the window that holds now, the one the quota
 * counts; ?period=previous the one before it. The window is the plan's (a paid plan's billing
 * period, the trial's day), from the same compiled state admission uses; a user without a plan
 * gets the last 30 days.
 */
#include <stdlib.h>
#include <string.h>

#include "bg/err.h"
#include "bg/pg.h"
#include "bg/policy.h"
#include "bg/timeutil.h"
#include "bg/usage.h"
#include "edge.h"

#define NO_PLAN_SPAN_MS (30LL * 86400000LL)

typedef struct st_usage_op {
    const bg_config_t *cfg;
    char user_id[64];
    bool previous;
    int rc;
    int64_t from_ms, to_ms;
    bg_buf_t body; /* the summary's members */
} usage_op_t;

static void op_free(void *p)
{
    usage_op_t *op = p;
    if (op == NULL)
        return;
    bg_buf_dispose(&op->body);
    free(op);
}

/* The window [from, to) the request names, from the user's compiled state. */
static void pick_window(usage_op_t *op, const bg_admission_state_t *s, int64_t now)
{
    bool live = strcmp(s->status, "none") != 0 && s->w_len > 0 && s->w_until > now;
    if (!live) {
        op->to_ms = op->previous ? now - NO_PLAN_SPAN_MS : now;
        op->from_ms = op->to_ms - NO_PLAN_SPAN_MS;
        return;
    }
    op->from_ms = bg_policy_window_start(s, now);
    op->to_ms = bg_policy_window_end(s, now);
    if (op->previous) {
        op->to_ms = op->from_ms;
        op->from_ms = op->from_ms - s->w_len;
    }
    if (op->from_ms < 0)
        op->from_ms = 0;
}

static void usage_work(void *arg)
{
    usage_op_t *op = arg;
    PGconn *c = edge_pg(op->cfg, NULL, &op->rc);
    if (c == NULL)
        return;
    int64_t now = bg_timeutil_wall_ms();
    bg_admission_state_t *s = bg_calloc(1, sizeof(*s));
    op->rc = bg_policy_compile_user(c, op->user_id, now, s);
    if (op->rc == 0) {
        pick_window(op, s, now);
        op->rc = bg_usage_summary(c, op->user_id, op->from_ms, op->to_ms, &op->body);
    }
    free(s);
}

static void put_time(bg_buf_t *out, const char *key, int64_t ms, int *rc)
{
    char t[BG_RFC3339_BUFSIZE];
    if (bg_timeutil_format_rfc3339(t, sizeof(t), ms, false) != 0)
        t[0] = '\0';
    *rc |= bg_buf_printf(out, "\"%s\":\"%s\"", key, t);
}

static void usage_done(edge_req_t *er, void *arg)
{
    usage_op_t *op = arg;
    if (er->req == NULL)
        return;
    if (op->rc == BG_ERR_NOT_FOUND) {
        edge_error(er, "unauthorized", NULL, NULL, 0); /* the token outlived its user */
        return;
    }
    if (op->rc != 0) {
        edge_fail(er, op->rc);
        return;
    }
    bg_buf_t out;
    bg_buf_init(&out, op->body.len + 4096);
    int rc = bg_buf_puts(&out, "{\"period\":{");
    put_time(&out, "start", op->from_ms, &rc);
    rc |= bg_buf_puts(&out, ",");
    put_time(&out, "end", op->to_ms, &rc);
    rc |= bg_buf_printf(&out, ",\"which\":\"%s\"},", op->previous ? "previous" : "current");
    rc |= bg_buf_append(&out, op->body.base, op->body.len);
    rc |= bg_buf_puts(&out, "}");
    if (rc != 0)
        edge_error(er, "internal", NULL, NULL, 0);
    else
        edge_respond_json(er, 200, &out);
    bg_buf_dispose(&out);
}

static void usage_get(edge_req_t *er)
{
    char period[16] = "current";
    if (edge_query(er, "period", period, sizeof(period)) && strcmp(period, "current") != 0 &&
        strcmp(period, "previous") != 0) {
        edge_invalid_field(er, "period", "invalid_value", NULL);
        return;
    }
    usage_op_t *op = bg_calloc(1, sizeof(*op));
    er->data = op;
    er->data_free = op_free;
    op->cfg = er->thread->server->cfg;
    bg_strlcpy(op->user_id, er->auth.user_id, sizeof(op->user_id));
    op->previous = strcmp(period, "previous") == 0;
    bg_buf_init(&op->body, 4u * 1024u * 1024u);
    edge_run(er, usage_work, usage_done);
}

const edge_route_t edge_routes_usage[] = {
    {"GET", "/billing/usage", "billing_usage", usage_get, 0, 0, EDGE_USER},
    {NULL, NULL, NULL, NULL, 0, 0, EDGE_PUBLIC},
};
