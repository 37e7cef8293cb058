/*
 * A chat turn and its output (docs/streaming.md): POST /chat/conversations/{id}/messages stores
 * the user's message, admits the turn and enqueues its job in one EVALSHA (bg/admission.h), then
 * relays the job's output as Server-Sent Events (sse_relay.c) or, with Prefer: respond-async,
 * answers 202 with the job id and the URL of that stream. GET /chat/jobs/{id}/stream relays (or
 * resumes, from Last-Event-ID) the output of one of the caller's jobs on any edge;
 * POST /chat/jobs/{id}/cancel asks the worker to stop it.
 *
 * Who owns a job: the admission script that admits a turn also writes
 * bg:{s<N>}:job:<job id> = <user id> (an hour, as long as the output stream lives; N being the
 * caller's shard), so an admitted turn is one Redis round trip. A job id with no such
 * key in the caller's shard, or with another user's, is a 404 like any foreign resource: a caller
 * cannot tell another user's job from one that does not exist.
 *
 * Order of a turn. The edge checks that the conversation is a live one of the caller's and learns
 * its agent: from what this process remembers (conv_cache.c) or, the first time, from Postgres on
 * the pool (bg_chat_get). Then admission (edge_admit(), admit.c: Redis down means 503 with
 * Retry-After, since admission fails closed) checks the caller's session, admits and enqueues the
 * job with the user's message in it (the route is EDGE_ROUTE_SESSION_IN_ADMISSION: one Redis
 * round trip in all), and the llm worker stores the message (bg_chat_post_user, once per job)
 * while the provider starts on the reply. So an admitted turn costs the edge no Postgres work at
 * all, and a denied turn writes nothing.
 */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "bg/accounts.h"
#include "bg/admission.h"
#include "bg/channel.h"
#include "bg/chat.h"
#include "bg/err.h"
#include "bg/i18n.h"
#include "bg/id.h"
#include "bg/json.h"
#include "bg/log.h"
#include "bg/pg.h"
#include "bg/policy.h"
#include "bg/redis.h"
#include "bg/timeutil.h"
#include "edge.h"

#define CONTENT_MAX 32000
/* How long a job's cancel mark lives: as long as its output stream (and its owner's key). */
#define JOB_TTL_S BG_ADMISSION_OWNER_TTL_S_STR
typedef struct st_turn_op {
    const bg_config_t *cfg;
    char user_id[64];
    char conv_id[64];
    char *content; /* owned */
    char job_id[BG_UUID_STR_LEN + 1];
    char request_id[EDGE_REQUEST_ID_LEN + 1];
    char locale[16];
    bool respond_async;
    int shard;
    int rc;
    bg_chat_conversation_t conv;
    char agent_id[EDGE_CONV_ID_SIZE];
    bg_turn_t turn;
    bg_turn_job_t job; /* the job and its admission, pointing into this op */
} turn_op_t;

static void turn_free(void *p)
{
    turn_op_t *op = p;
    if (op == NULL)
        return;
    free(op->content);
    free(op);
}

static void job_key(char *out, size_t outlen, int shard, const char *kind, const char *job_id)
{
    snprintf(out, outlen, "bg:{s%d}:%s:%s", shard, kind, job_id);
}

/* ---- POST /chat/conversations/{id}/messages ---- */

static void lookup_work(void *arg)
{
    turn_op_t *op = arg;
    PGconn *c = edge_pg(op->cfg, NULL, &op->rc);
    if (c == NULL)
        return;
    op->rc = bg_chat_get(c, op->user_id, op->conv_id, &op->conv);
    if (op->rc == 0) {
        (void)bg_strlcpy(op->agent_id, op->conv.agent_id, sizeof(op->agent_id));
        edge_conv_remember(op->conv_id, op->user_id, op->agent_id);
    }
}

static void respond_admitted(edge_req_t *er, turn_op_t *op)
{
    char url[96];
    snprintf(url, sizeof(url), "/chat/jobs/%s/stream", op->job_id);
    /* a client that loses this stream resumes at the job's own stream URL */
    edge_add_header(er, "x-job-id", op->job_id);
    if (!op->respond_async) {
        edge_add_header(er, "content-location", url);
        edge_sse_relay_start(er, op->job_id, op->shard, NULL);
        return;
    }
    bg_buf_t out;
    bg_buf_init(&out, 4096);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    bg_json_write_begin_object(&w);
    bg_json_write_field_str(&w, "job_id", op->job_id);
    bg_json_write_field_str(&w, "stream_url", url);
    bg_json_write_end_object(&w);
    edge_add_header(er, "location", url);
    edge_respond_writer(er, 202, &w, &out);
}

static void admitted(edge_req_t *er, void *arg, const bg_admission_decision_t *d)
{
    turn_op_t *op = arg;
    /* the script read the session (EDGE_ROUTE_SESSION_IN_ADMISSION): its answer is final */
    er->auth.unconfirmed = false;
    if (d->verdict == BG_ADMISSION_REVOKED) {
        edge_error(er, "unauthorized", "{\"reason\":\"session_revoked\"}", NULL, 0);
        return;
    }
    if (d->locale[0] != '\0' && bg_i18n_is_supported(d->locale)) {
        bg_strlcpy(er->locale_buf, d->locale, sizeof(er->locale_buf));
        er->locale = bg_i18n_negotiate(er->locale_buf, NULL);
    }
    edge_admission_headers(er, d);
    if (d->verdict != BG_ADMISSION_OK) {
        edge_error(er, bg_admission_error_code(d->verdict), NULL, NULL,
                   (int)bg_admission_retry_after_s(d));
        return;
    }
    respond_admitted(er, op);
}

static void admit(edge_req_t *er, turn_op_t *op)
{
    op->turn = (bg_turn_t){
        .channel = "web",
        .user_id = op->user_id,
        .locale = op->locale,
        .job_id = op->job_id,
        .request_id = op->request_id,
        .agent_id = op->agent_id,
        .conversation_id = op->conv_id,
        .content = op->content, /* the worker stores it */
        .temperature = -1,
        .record_owner = true,
    };
    int rc = bg_turn_prepare(&op->turn, op->cfg->stream_maxlen, &op->job);
    if (rc != 0) {
        edge_fail(er, rc);
        return;
    }
    if (er->auth.unconfirmed) {
        /* one round trip: the script checks the session first (bg_admission_req_t) */
        op->job.admission.session_id = er->auth.session_id;
        op->job.admission.issued_ms = er->auth.issued_ms;
    }
    edge_admit(er, &op->job.admission, admitted, op);
}

static void lookup_done(edge_req_t *er, void *arg)
{
    turn_op_t *op = arg;
    if (er->req == NULL)
        return;
    if (op->rc != 0) {
        edge_fail(er, op->rc);
        return;
    }
    admit(er, op);
}

static bool prefers_async(const edge_req_t *er)
{
    h2o_iovec_t v = edge_req_header(er, "prefer");
    static const char want[] = "respond-async";
    for (size_t i = 0; v.base != NULL && i + sizeof(want) - 1 <= v.len; i++) {
        if (strncasecmp(v.base + i, want, sizeof(want) - 1) == 0)
            return true;
    }
    return false;
}

static const edge_field_t message_fields[] = {
    {"content", EDGE_F_STR, true, 1, CONTENT_MAX, EDGE_CHECK_NONE},
};

static void messages_post(edge_req_t *er)
{
    edge_values_t v;
    if (!edge_body(er, message_fields, BG_ARRAY_SIZE(message_fields), &v))
        return;
    if (er->params[0].len >= sizeof(((turn_op_t *)NULL)->conv_id)) {
        edge_error(er, "not_found", NULL, NULL, 0);
        return;
    }
    turn_op_t *op = bg_calloc(1, sizeof(*op));
    er->data = op;
    er->data_free = turn_free;
    op->cfg = er->thread->server->cfg;
    bg_strlcpy(op->user_id, er->auth.user_id, sizeof(op->user_id));
    memcpy(op->conv_id, er->params[0].base, er->params[0].len);
    op->content = bg_strdup(v.str[0]);
    bg_id_uuid_v7_str(op->job_id);
    bg_strlcpy(op->request_id, er->request_id, sizeof(op->request_id));
    bg_strlcpy(op->locale, er->locale, sizeof(op->locale));
    op->respond_async = prefers_async(er);
    op->shard = bg_shard_of(op->user_id, op->cfg->shards);
    switch (edge_conv_lookup(op->conv_id, op->user_id, op->agent_id)) {
    case EDGE_CONV_OWNED:
        admit(er, op);
        return;
    case EDGE_CONV_FOREIGN:
        edge_error(er, "not_found", NULL, NULL, 0);
        return;
    case EDGE_CONV_UNKNOWN:
        break;
    }
    edge_run(er, lookup_work, lookup_done);
}

/* ---- /chat/jobs/{id}/… ---- */

typedef struct st_job_op {
    char job_id[BG_UUID_STR_LEN + 1];
    char last_id[BG_JOBS_ENTRY_ID_MAX];
    int shard;
    bool cancel;
} job_op_t;

static void job_op_free(void *p)
{
    free(p);
}

static void cancel_set(void *ud, int err, const redisReply *reply)
{
    edge_req_t *er = ud;
    job_op_t *op = er->data;
    if (er->req != NULL) {
        if (err != 0 || reply->type == REDIS_REPLY_ERROR) {
            edge_error(er, "service_unavailable", NULL, NULL, 1);
        } else {
            bg_buf_t out;
            bg_buf_init(&out, 1024);
            bg_json_writer_t w;
            bg_json_writer_init(&w, &out);
            bg_json_write_begin_object(&w);
            bg_json_write_field_str(&w, "job_id", op->job_id);
            bg_json_write_field_str(&w, "status", "cancel_requested");
            bg_json_write_end_object(&w);
            edge_respond_writer(er, 202, &w, &out);
        }
    }
    edge_req_unref(er);
}

static void owner_read(void *ud, int err, const redisReply *reply)
{
    edge_req_t *er = ud;
    job_op_t *op = er->data;
    if (er->req == NULL)
        goto out;
    if (err != 0 || reply->type == REDIS_REPLY_ERROR) {
        edge_error(er, "service_unavailable", NULL, NULL, 1);
        goto out;
    }
    if (reply->type != REDIS_REPLY_STRING || strcmp(reply->str, er->auth.user_id) != 0) {
        edge_error(er, "not_found", NULL, NULL, 0);
        goto out;
    }
    if (!op->cancel) {
        edge_sse_relay_start(er, op->job_id, op->shard, op->last_id);
        goto out;
    }
    char key[BG_REDIS_KEY_MAX];
    job_key(key, sizeof(key), op->shard, "cancel", op->job_id);
    const char *argv[] = {"SET", key, "1", "EX", JOB_TTL_S};
    edge_req_ref(er);
    if (bg_redis_async_argv(er->thread->redis, cancel_set, er, 5, argv, NULL) != 0) {
        edge_req_unref(er);
        edge_error(er, "service_unavailable", NULL, NULL, 1);
    }
out:
    edge_req_unref(er);
}

/* Checks the job is the caller's, then streams it or cancels it. */
static void job_route(edge_req_t *er, bool cancel)
{
    h2o_iovec_t id = er->params[0];
    job_op_t *op = bg_calloc(1, sizeof(*op));
    er->data = op;
    er->data_free = job_op_free;
    op->cancel = cancel;
    if (id.len != BG_UUID_STR_LEN) {
        edge_error(er, "not_found", NULL, NULL, 0);
        return;
    }
    memcpy(op->job_id, id.base, id.len);
    if (!bg_id_uuid_is_valid(op->job_id)) {
        edge_error(er, "not_found", NULL, NULL, 0);
        return;
    }
    if (!cancel) {
        h2o_iovec_t last = edge_req_header(er, "last-event-id");
        if (last.len > 0) {
            if (last.len >= sizeof(op->last_id)) {
                edge_invalid_field(er, "Last-Event-ID", "invalid_value", NULL);
                return;
            }
            memcpy(op->last_id, last.base, last.len);
            if (!edge_sse_is_entry_id(op->last_id)) {
                edge_invalid_field(er, "Last-Event-ID", "invalid_value", NULL);
                return;
            }
        }
    }
    op->shard = bg_shard_of(er->auth.user_id, er->thread->server->cfg->shards);
    char key[BG_REDIS_KEY_MAX];
    if (bg_admission_key_owner(key, sizeof(key), op->shard, op->job_id) != 0) {
        edge_error(er, "not_found", NULL, NULL, 0);
        return;
    }
    const char *argv[] = {"GET", key};
    edge_req_ref(er);
    if (bg_redis_async_argv(er->thread->redis, owner_read, er, 2, argv, NULL) != 0) {
        edge_req_unref(er);
        edge_error(er, "service_unavailable", NULL, NULL, 1);
    }
}

static void job_stream(edge_req_t *er)
{
    job_route(er, false);
}

static void job_cancel(edge_req_t *er)
{
    job_route(er, true);
}

const edge_route_t edge_routes_stream[] = {
    {"POST", "/chat/conversations/{id}/messages", "chat_messages_post", messages_post,
     EDGE_ROUTE_JSON | EDGE_ROUTE_SESSION_IN_ADMISSION, 262144, EDGE_USER},
    {"GET", "/chat/jobs/{id}/stream", "chat_job_stream", job_stream, 0, 0, EDGE_USER},
    {"POST", "/chat/jobs/{id}/cancel", "chat_job_cancel", job_cancel, 0, 0, EDGE_USER},
    {NULL, NULL, NULL, NULL, 0, 0, EDGE_PUBLIC},
};
