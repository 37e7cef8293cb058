/*
 * Buying through Paddle: POST /billing/subscribe (a checkout), POST /billing/cancel and
 * /billing/resume (a cancellation at the end of the paid period, and taking it back), and GET
 * /billing/history (payments, refunds and request credits from the ledger).
 *
 * The Paddle calls are blocking libcurl calls (bg/paddle.h) on the thread pool, never on a loop:
 * the client gets the checkout URL in the same answer, and the pool keeps the loops free while
 * Paddle takes its time (retries on 429 and 5xx included). Nothing here changes a subscription
 * row: Paddle tells us what happened through its webhooks (routes_webhooks_paddle.c), which the
 * billing worker applies in order; so a cancellation answered here shows up in /billing/account
 * once subscription.updated arrives.
 *
 * Refusals, in the order they are checked: a malformed body (422); Paddle not configured
 * (BG_PADDLE_API_KEY unset: 503 billing_unavailable, which tells the operator what is missing);
 * an unknown plan (422 on "plan"); a plan that is not for sale or has no Paddle price id (422
 * plan_not_purchasable); a live Paddle subscription already (409 conflict, reason
 * already_subscribed: a plan change goes through Paddle's subscription, not a second checkout).
 */
#include <stdlib.h>
#include <string.h>

#include "bg/billing.h"
#include "bg/err.h"
#include "bg/json.h"
#include "bg/log.h"
#include "bg/paddle.h"
#include "bg/pg.h"
#include "edge.h"

enum { OP_SUBSCRIBE, OP_CANCEL, OP_RESUME };

typedef struct st_pay_op {
    const bg_config_t *cfg;
    int kind;
    char user_id[64];
    char plan_id[40];
    bg_billing_checkout_t info;
    bg_paddle_reply_t reply;
    int rc;
    const char *refusal; /* static: why the request is refused before Paddle is called */
    /* history */
    char *cursor; /* owned */
    int limit;
    bg_buf_t page;
} pay_op_t;

static void op_free(void *p)
{
    pay_op_t *op = p;
    if (op == NULL)
        return;
    free(op->cursor);
    bg_buf_dispose(&op->page);
    free(op);
}

static pay_op_t *op_new(edge_req_t *er, int kind)
{
    pay_op_t *op = bg_calloc(1, sizeof(*op));
    op->cfg = er->thread->server->cfg;
    op->kind = kind;
    (void)bg_strlcpy(op->user_id, er->auth.user_id, sizeof(op->user_id));
    bg_buf_init(&op->page, 1 << 20);
    er->data = op;
    er->data_free = op_free;
    return op;
}

static bg_paddle_api_t api_of(const bg_config_t *cfg)
{
    return (bg_paddle_api_t){.base_url = cfg->paddle_api_url, .api_key = cfg->paddle_api_key};
}

static bool paddle_configured(edge_req_t *er)
{
    bg_paddle_api_t api = api_of(er->thread->server->cfg);
    if (bg_paddle_api_configured(&api))
        return true;
    edge_error(er, "billing_unavailable", "{\"reason\":\"paddle_not_configured\"}", NULL, 0);
    return false;
}

static void pay_work(void *arg)
{
    pay_op_t *op = arg;
    PGconn *c = edge_pg(op->cfg, NULL, &op->rc);
    if (c == NULL)
        return;
    op->rc = bg_billing_checkout_info(c, op->user_id, op->kind == OP_SUBSCRIBE ? op->plan_id : NULL,
                                      &op->info);
    if (op->rc != 0)
        return;
    bg_paddle_api_t api = api_of(op->cfg);
    switch (op->kind) {
    case OP_SUBSCRIBE:
        if (op->info.price_id[0] == '\0' || !op->info.purchasable) {
            op->refusal = "plan_not_purchasable";
            return;
        }
        if (op->info.subscription_id[0] != '\0') {
            op->refusal = "already_subscribed";
            return;
        }
        op->rc = bg_paddle_create_transaction(
            &api, op->info.price_id, op->user_id,
            op->info.customer_id[0] != '\0' ? op->info.customer_id : NULL, &op->reply);
        break;
    case OP_CANCEL:
    case OP_RESUME:
        if (op->info.subscription_id[0] == '\0') {
            op->refusal = "no_paddle_subscription";
            return;
        }
        op->rc = op->kind == OP_CANCEL
                     ? bg_paddle_cancel_subscription(&api, op->info.subscription_id, &op->reply)
                     : bg_paddle_resume_subscription(&api, op->info.subscription_id, &op->reply);
        break;
    default:
        op->rc = BG_ERR_INVALID;
    }
}

static void pay_done(edge_req_t *er, void *arg)
{
    pay_op_t *op = arg;
    if (er->req == NULL)
        return;
    if (op->rc == BG_ERR_NOT_FOUND && op->kind == OP_SUBSCRIBE) {
        edge_invalid_field(er, "plan", "invalid_value", NULL);
        return;
    }
    if (op->refusal != NULL && strcmp(op->refusal, "plan_not_purchasable") == 0) {
        const char *params[] = {"plan", op->plan_id, NULL};
        edge_error(er, "plan_not_purchasable", "{\"field\":\"plan\"}", params, 0);
        return;
    }
    if (op->refusal != NULL) {
        char details[80];
        snprintf(details, sizeof(details), "{\"reason\":\"%s\"}", op->refusal);
        edge_error(er, "conflict", details, NULL, 0);
        return;
    }
    if (op->rc == BG_ERR_CONFIG || op->rc == BG_ERR_INVALID || op->rc == BG_ERR_PROTOCOL ||
        op->rc == BG_ERR_UNAVAILABLE) {
        /* Paddle refused (a misconfigured price or key) or kept failing: not the user's fault */
        bg_warn("billing %s: Paddle call failed: %s (HTTP %ld after %d attempts, %s)",
                er->request_id, bg_strerror(op->rc), op->reply.status, op->reply.attempts,
                op->reply.error_code[0] != '\0' ? op->reply.error_code : "no error code");
        char details[128];
        snprintf(details, sizeof(details), "{\"reason\":\"%s\"}",
                 op->rc == BG_ERR_UNAVAILABLE ? "paddle_unavailable" : "paddle_refused");
        edge_error(er, "billing_unavailable", details, NULL, op->rc == BG_ERR_UNAVAILABLE ? 30 : 0);
        return;
    }
    if (op->rc != 0) {
        edge_fail(er, op->rc);
        return;
    }
    bg_buf_t out;
    bg_buf_init(&out, 8192);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    bg_json_write_begin_object(&w);
    if (op->kind == OP_SUBSCRIBE) {
        bg_json_write_field_str(&w, "transaction_id", op->reply.id);
        if (op->reply.checkout_url[0] != '\0')
            bg_json_write_field_str(&w, "checkout_url", op->reply.checkout_url);
        else
            bg_json_write_field_null(&w, "checkout_url");
        bg_json_write_field_str(&w, "plan", op->plan_id);
    } else {
        bg_json_write_field_str(&w, "subscription_id", op->info.subscription_id);
        bg_json_write_field_bool(&w, "cancel_at_period_end", op->kind == OP_CANCEL);
    }
    bg_json_write_end_object(&w);
    edge_respond_writer(er, op->kind == OP_SUBSCRIBE ? 201 : 200, &w, &out);
}

static const edge_field_t subscribe_fields[] = {
    {"plan", EDGE_F_STR, true, 1, 32, EDGE_CHECK_NONE},
};

/* POST /billing/subscribe */
static void subscribe_post(edge_req_t *er)
{
    edge_values_t v;
    if (!edge_body(er, subscribe_fields, BG_ARRAY_SIZE(subscribe_fields), &v))
        return;
    if (!paddle_configured(er))
        return;
    pay_op_t *op = op_new(er, OP_SUBSCRIBE);
    (void)bg_strlcpy(op->plan_id, v.str[0], sizeof(op->plan_id));
    edge_run(er, pay_work, pay_done);
}

/* POST /billing/cancel */
static void cancel_post(edge_req_t *er)
{
    if (!paddle_configured(er))
        return;
    (void)op_new(er, OP_CANCEL);
    edge_run(er, pay_work, pay_done);
}

/* POST /billing/resume */
static void resume_post(edge_req_t *er)
{
    if (!paddle_configured(er))
        return;
    (void)op_new(er, OP_RESUME);
    edge_run(er, pay_work, pay_done);
}

/* ---- GET /billing/history ---- */

static void history_work(void *arg)
{
    pay_op_t *op = arg;
    PGconn *c = edge_pg(op->cfg, NULL, &op->rc);
    if (c == NULL)
        return;
    op->rc = bg_billing_history(c, op->user_id, op->cursor, op->limit, &op->page);
}

static void history_done(edge_req_t *er, void *arg)
{
    pay_op_t *op = arg;
    if (er->req == NULL)
        return;
    if (op->rc == BG_ERR_INVALID) {
        edge_invalid_field(er, "cursor", "invalid_value", NULL);
        return;
    }
    if (op->rc != 0) {
        edge_fail(er, op->rc);
        return;
    }
    edge_add_header(er, "cache-control", "no-store");
    edge_respond_json(er, 200, &op->page);
}

static void history_get(edge_req_t *er)
{
    pay_op_t *op = op_new(er, 0);
    op->limit = 50;
    char limit[16], cursor[64];
    if (edge_query(er, "limit", limit, sizeof(limit))) {
        char *end;
        long n = strtol(limit, &end, 10);
        if (end == limit || *end != '\0' || n < 1 || n > BG_BILLING_HISTORY_MAX) {
            char max[8];
            snprintf(max, sizeof(max), "%d", BG_BILLING_HISTORY_MAX);
            const char *params[] = {"min", "1", "max", max, NULL};
            edge_invalid_field(er, "limit", "out_of_range", params);
            return;
        }
        op->limit = (int)n;
    }
    if (edge_query(er, "cursor", cursor, sizeof(cursor)) && cursor[0] != '\0')
        op->cursor = bg_strdup(cursor);
    edge_run(er, history_work, history_done);
}

const edge_route_t edge_routes_checkout[] = {
    {"POST", "/billing/subscribe", "billing_subscribe", subscribe_post, EDGE_ROUTE_JSON, 0,
     EDGE_USER},
    {"POST", "/billing/cancel", "billing_cancel", cancel_post, EDGE_ROUTE_JSON, 0, EDGE_USER},
    {"POST", "/billing/resume", "billing_resume", resume_post, EDGE_ROUTE_JSON, 0, EDGE_USER},
    {"GET", "/billing/history", "billing_history", history_get, 0, 0, EDGE_USER},
    {NULL, NULL, NULL, NULL, 0, 0, EDGE_PUBLIC},
};
