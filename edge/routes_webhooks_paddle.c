/*
 * POST /webhooks/paddle: Paddle's notifications in, acknowledged in milliseconds (DESIGN.md §7).
 *
 * The signature is checked on the loop, before anything else touches the body: it is one HMAC per
 * configured secret over bytes already in memory, cheaper than a trip to the thread pool, and a
 * request that fails it must leave no trace (401, nothing stored, nothing enqueued). A genuine
 * notification is stored in webhook_inbox on the pool (bg_billing_inbox_put: unique event_id, so
 * a redelivery stores nothing), then a billing job carrying only the event id is XADDed on the
 * loop's Redis connection. Events are not admitted (they cost the user nothing), so the plain jobs
 * API is used instead of the admission script.
 *
 * What Paddle sees: 200 once the event is stored and, when it still needs processing, enqueued.
 * A duplicate of a processed event is 200 at once. When Postgres or Redis cannot take it the
 * answer is 503, so Paddle delivers again later (its retries last hours in sandbox and days live);
 * a stored event whose enqueue failed is enqueued by that redelivery, since it is still pending.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bg/billing.h"
#include "bg/err.h"
#include "bg/jobs.h"
#include "bg/log.h"
#include "bg/paddle.h"
#include "bg/pg.h"
#include "bg/redis.h"
#include "edge.h"

typedef struct st_paddle_op {
    const bg_config_t *cfg;
    char *body; /* owned copy of the raw body */
    size_t len;
    bg_billing_inbox_result_t res;
    char job_id[BG_BILLING_EVENT_ID_SIZE + 8];
    int rc;
} paddle_op_t;

static void op_free(void *p)
{
    paddle_op_t *op = p;
    if (op == NULL)
        return;
    free(op->body);
    free(op);
}

static void respond_ok(edge_req_t *er, bool duplicate)
{
    static const char accepted[] = "{\"status\":\"accepted\"}";
    static const char dup[] = "{\"status\":\"duplicate\"}";
    if (duplicate)
        edge_respond(er, 200, "application/json", dup, sizeof(dup) - 1);
    else
        edge_respond(er, 200, "application/json", accepted, sizeof(accepted) - 1);
}

static void enqueued(void *ud, int err, const redisReply *reply)
{
    edge_req_t *er = ud;
    paddle_op_t *op = er->data;
    if (er->req != NULL) {
        if (err != 0 || reply == NULL || reply->type == REDIS_REPLY_ERROR) {
            bg_warn("paddle webhook %s: event %s stored, not enqueued (%s); Paddle will retry",
                    er->request_id, op->res.event_id, err != 0 ? bg_strerror(err) : "refused");
            edge_error(er, "service_unavailable", NULL, NULL, 5);
        } else {
            respond_ok(er, !op->res.inserted);
        }
    }
    edge_req_unref(er);
}

static void inbox_work(void *arg)
{
    paddle_op_t *op = arg;
    PGconn *c = edge_pg(op->cfg, NULL, &op->rc);
    if (c == NULL)
        return;
    op->rc = bg_billing_inbox_put(c, op->body, op->len, &op->res);
}

static void inbox_done(edge_req_t *er, void *arg)
{
    paddle_op_t *op = arg;
    if (er->req == NULL)
        return;
    if (op->rc == BG_ERR_INVALID) {
        edge_error(er, "bad_request", "{\"reason\":\"not_a_paddle_event\"}", NULL, 0);
        return;
    }
    if (op->rc != 0) {
        edge_fail(er, op->rc);
        return;
    }
    if (!op->res.pending) {
        respond_ok(er, true);
        return;
    }
    snprintf(op->job_id, sizeof(op->job_id), "paddle:%s", op->res.event_id);
    const char *fields[] = {"provider", "paddle", "event_id", op->res.event_id};
    const bg_job_spec_t spec = {.shard = bg_shard_of(op->res.event_id, op->cfg->shards),
                                .role = "billing",
                                .job_id = op->job_id,
                                .nfields = 2,
                                .fields = fields,
                                .maxlen = op->cfg->stream_maxlen};
    edge_req_ref(er);
    if (bg_jobs_enqueue_async(er->thread->redis, &spec, enqueued, er) != 0) {
        edge_req_unref(er);
        edge_error(er, "service_unavailable", NULL, NULL, 5);
    }
}

/* POST /webhooks/paddle */
static void paddle_webhook(edge_req_t *er)
{
    const bg_config_t *cfg = er->thread->server->cfg;
    h2o_iovec_t sig = edge_req_header(er, "paddle-signature");
    const char *body = er->req->entity.base != NULL ? er->req->entity.base : "";
    size_t len = er->req->entity.base != NULL ? er->req->entity.len : 0;
    int rc = bg_paddle_verify(sig.base, sig.len, body, len, cfg->paddle_webhook_secrets,
                              (int64_t)time(NULL), BG_PADDLE_SIG_TOLERANCE_S);
    if (rc != 0) {
        const char *reason = sig.base == NULL                               ? "signature_missing"
                             : rc == BG_ERR_INVALID                         ? "signature_malformed"
                             : rc == BG_ERR_TIMEOUT                         ? "signature_expired"
                             : !bg_str_present(cfg->paddle_webhook_secrets) ? "no_secret_configured"
                                                                            : "signature_mismatch";
        bg_warn("paddle webhook %s refused: %s", er->request_id, reason);
        char details[64];
        snprintf(details, sizeof(details), "{\"reason\":\"%s\"}", reason);
        edge_error(er, "invalid_signature", details, NULL, 0);
        return;
    }
    paddle_op_t *op = bg_calloc(1, sizeof(*op));
    op->cfg = cfg;
    op->body = bg_malloc(len + 1);
    memcpy(op->body, body, len);
    op->body[len] = '\0';
    op->len = len;
    er->data = op;
    er->data_free = op_free;
    edge_run(er, inbox_work, inbox_done);
}

const edge_route_t edge_routes_paddle[] = {
    {"POST", "/webhooks/paddle", "webhook_paddle", paddle_webhook, 0, BG_BILLING_BODY_MAX,
     EDGE_PUBLIC},
    {NULL, NULL, NULL, NULL, 0, 0, EDGE_PUBLIC},
};
