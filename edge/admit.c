/*
 * Admission from a route handler: one EVALSHA of the admission script (bg/admission.h) on the
 * loop's Redis connection, and the one recovery every route needs. A user without a compiled
 * admission state (a new or flushed Redis) is compiled from Postgres on the pool, written to
 * Redis, and admitted once more; a second "no state" is a 503 like Redis being down, since
 * admission fails closed.
 *
 * The caller's request (the fields of the job included) must stay alive until the callback, since
 * a retry sends it again: it normally lives in er->data, which outlives every reference on er.
 */
#include <stdlib.h>
#include <string.h>

#include "bg/admission.h"
#include "bg/err.h"
#include "bg/log.h"
#include "bg/pg.h"
#include "bg/policy.h"
#include "bg/timeutil.h"
#include "edge.h"

typedef struct st_admit_op {
    edge_req_t *er; /* a reference is held while the op lives */
    const bg_admission_req_t *req;
    edge_admit_cb cb;
    void *arg;
    bool retried;
    int rc;
    bg_admission_state_t state;
} admit_op_t;

static void admit_free(admit_op_t *op)
{
    edge_req_unref(op->er);
    free(op);
}

/* Ends the op with an answer of 503 (the callback is not called). */
static void admit_unavailable(admit_op_t *op, int retry_after_s)
{
    edge_error(op->er, "service_unavailable", NULL, NULL, retry_after_s);
    admit_free(op);
}

static int admit_send(admit_op_t *op);

static void compile_work(void *arg)
{
    admit_op_t *op = arg;
    PGconn *c = edge_pg(op->er->thread->server->cfg, NULL, &op->rc);
    if (c != NULL)
        op->rc = bg_policy_compile_user(c, op->req->user_id, bg_timeutil_wall_ms(), &op->state);
}

static void state_written(void *ud, int err, const redisReply *reply)
{
    admit_op_t *op = ud;
    if (op->er->req == NULL) {
        admit_free(op);
        return;
    }
    if (err != 0 || reply->type == REDIS_REPLY_ERROR) {
        admit_unavailable(op, 1);
        return;
    }
    if (admit_send(op) != 0)
        admit_unavailable(op, 1);
}

static void compile_done(edge_req_t *er, void *arg)
{
    admit_op_t *op = arg;
    if (er->req == NULL) {
        admit_free(op);
        return;
    }
    if (op->rc == BG_ERR_NOT_FOUND) {
        /* the credentials outlived their user */
        edge_error(er, "unauthorized", NULL, NULL, 0);
        admit_free(op);
        return;
    }
    if (op->rc != 0) {
        admit_unavailable(op, 2);
        return;
    }
    if (bg_policy_state_write_async(er->thread->redis, er->thread->server->cfg->shards, &op->state,
                                    state_written, op) != 0)
        admit_unavailable(op, 1);
}

static void admitted(void *ud, int err, const bg_admission_decision_t *d)
{
    admit_op_t *op = ud;
    edge_req_t *er = op->er;
    if (er->req == NULL) {
        admit_free(op);
        return;
    }
    if (err != 0) {
        admit_unavailable(op, 1);
        return;
    }
    if (d->verdict == BG_ADMISSION_NO_STATE) {
        if (op->retried) {
            admit_unavailable(op, 1);
            return;
        }
        op->retried = true;
        memset(&op->state, 0, sizeof(op->state));
        if (edge_blocking(er, compile_work, compile_done, op) != 0)
            admit_unavailable(op, 1);
        return;
    }
    op->cb(er, op->arg, d);
    admit_free(op);
}

static int admit_send(admit_op_t *op)
{
    edge_req_t *er = op->er;
    return bg_admission_admit_async(er->thread->redis, er->thread->server->cfg->shards, op->req,
                                    admitted, op);
}

void edge_admit(edge_req_t *er, const bg_admission_req_t *req, edge_admit_cb cb, void *arg)
{
    admit_op_t *op = bg_calloc(1, sizeof(*op));
    op->er = er;
    edge_req_ref(er);
    op->req = req;
    op->cb = cb;
    op->arg = arg;
    if (admit_send(op) != 0)
        admit_unavailable(op, 1);
}

void edge_admission_headers(edge_req_t *er, const bg_admission_decision_t *d)
{
    bg_admission_header_t h[BG_ADMISSION_HEADERS_MAX];
    size_t n = bg_admission_headers(d, h);
    for (size_t i = 0; i < n; i++) {
        if (strcmp(h[i].name, "retry-after") != 0) /* edge_error adds it */
            edge_add_header(er, h[i].name, h[i].value);
    }
}
