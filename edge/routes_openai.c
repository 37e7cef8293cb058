/*
 * The OpenAI-compatible API (docs/api.md, ../shared/PROTOCOLS.md §3): POST /v1/chat/completions,
 * GET /v1/models and GET /v1/models/{model}, for API keys ("Authorization: Bearer bgk_…").
 *
 * A model is an agent the key's user may use on the API channel (bg_agents_get_usable), named by
 * its slug or id; the agent's system prompt comes first and the request's messages follow. A
 * completion is a job like a web chat turn: one admission call (feature api_access, the key's own
 * rate limit) enqueues it with the messages in the job, the llm worker generates it, and the job's
 * output is relayed through a sink (edge_relay_start_sink) that renders OpenAI's shapes:
 * - streaming: chunks with the role first, content pieces, the finish_reason chunk, the usage
 *   chunk when stream_options.include_usage asked for it, then "data: [DONE]";
 * - not streaming: one chat.completion object when the job is done.
 * The response starts only with the job's first output, so a job that fails before its first token
 * is an ordinary error response with its own status (502 provider error, 504 timeout), which
 * OpenAI's clients know how to retry. A failure after output started is an error event with no
 * [DONE] after it, as OpenAI does. A job redelivered after a worker died starts over ("reset"):
 * a non-streaming answer simply drops the partial text; a stream that already sent text cannot
 * take it back and ends with an error, and the client retries.
 *
 * Every error here is in OpenAI's body (request.c renders /v1 errors that way), with
 * x-should-retry: false where waiting does not help (quota, plan, invalid requests). The key is
 * checked in Postgres on every request, so a revoked key stops working at once.
 */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "bg/accounts.h"
#include "bg/agents.h"
#include "bg/channel.h"
#include "bg/err.h"
#include "bg/i18n.h"
#include "bg/id.h"
#include "bg/jobout.h"
#include "bg/json.h"
#include "bg/log.h"
#include "bg/timeutil.h"
#include "edge.h"
#include "openai.h"

/* Bodies of a completion request: up to a few hundred thousand characters of conversation. */
#define COMPLETION_BODY_MAX (2u * 1024u * 1024u)
/* A non-streaming reply is collected up to this (the worker cuts replies well below it). */
#define REPLY_COLLECT_MAX (4u * 1024u * 1024u)
/* The plans that include the API (named in the feature_not_in_plan message). */
#define API_PLANS "monthly, yearly"

typedef struct st_oai_op {
    const bg_config_t *cfg;
    char key[BG_ACCT_TOKEN_LEN]; /* the presented key (secret: wiped) */
    char model[EDGE_OAI_MODEL_SIZE];
    bool list; /* GET /v1/models */
    int stage; /* what failed: 1 the key, 2 the model */
    int rc;
    bg_user_t user;
    bg_api_key_t api_key;
    bg_agent_t *agent;      /* owned */
    bg_agent_list_t agents; /* owned */
    edge_oai_request_t req; /* owned */
    char job_id[BG_UUID_STR_LEN + 1];
    bg_turn_t turn;
    bg_turn_job_t job; /* the job and its admission, pointing into this op */
    int shard;
} oai_op_t;

static void op_free(void *p)
{
    oai_op_t *op = p;
    if (op == NULL)
        return;
    explicit_bzero(op->key, sizeof(op->key));
    free(op->agent);
    bg_agent_list_dispose(&op->agents);
    edge_oai_request_dispose(&op->req);
    free(op);
}

/* Answers 401 in OpenAI's words, localized. */
static void invalid_key(edge_req_t *er)
{
    edge_error(er, "invalid_api_key", NULL, NULL, 0);
}

/* Takes the key from "Authorization: Bearer <key>"; answers 401 and returns NULL without one. */
static oai_op_t *op_new(edge_req_t *er)
{
    h2o_iovec_t authz = edge_req_header(er, "authorization");
    if (authz.len < 8 || strncasecmp(authz.base, "Bearer ", 7) != 0 ||
        authz.len - 7 >= BG_ACCT_TOKEN_LEN) {
        invalid_key(er);
        return NULL;
    }
    oai_op_t *op = bg_calloc(1, sizeof(*op));
    er->data = op;
    er->data_free = op_free;
    op->cfg = er->thread->server->cfg;
    memcpy(op->key, authz.base + 7, authz.len - 7);
    return op;
}

/* On the pool: the key's user, then the agent the model names (or the list of them). */
static void resolve_work(void *arg)
{
    oai_op_t *op = arg;
    PGconn *c = edge_pg(op->cfg, NULL, &op->rc);
    if (c == NULL)
        return;
    op->stage = 1;
    op->rc = bg_acct_api_key_verify(c, op->key, &op->user, &op->api_key);
    if (op->rc != 0)
        return;
    op->stage = 2;
    if (op->list) {
        op->rc = bg_agents_list_usable(c, op->user.id, BG_AGENT_CHANNEL_API, &op->agents);
        return;
    }
    op->agent = bg_malloc(sizeof(*op->agent));
    op->rc = bg_agents_get_usable(c, op->user.id, op->model, BG_AGENT_CHANNEL_API, op->agent);
}

/* Answers a failed resolve_work; returns true when it did. Also adopts the user's locale. */
static bool resolve_failed(edge_req_t *er, oai_op_t *op)
{
    if (op->rc == 0 || op->stage == 2) {
        bg_strlcpy(er->locale_buf, op->user.locale, sizeof(er->locale_buf));
        if (bg_i18n_is_supported(er->locale_buf))
            er->locale = bg_i18n_negotiate(er->locale_buf, NULL);
    }
    if (op->rc == 0)
        return false;
    if (op->stage == 1 && op->rc == BG_ERR_DENIED) {
        invalid_key(er);
    } else if (op->stage == 2 && op->rc == BG_ERR_NOT_FOUND) {
        const char *params[] = {"model", op->model, NULL};
        bg_strlcpy(er->err_param, "model", sizeof(er->err_param));
        edge_error(er, "model_not_found", NULL, params, 0);
    } else if (op->stage == 2 && op->rc == BG_ERR_DENIED) {
        const char *params[] = {"model", op->model, NULL};
        bg_strlcpy(er->err_param, "model", sizeof(er->err_param));
        edge_error(er, "model_not_allowed", NULL, params, 0);
    } else {
        edge_fail(er, op->rc);
    }
    return true;
}

/* ---- the relay sink: a job's events in OpenAI's shapes ---- */

typedef struct st_oai_sink {
    edge_oai_reply_t reply;
    bool stream;
    bool include_usage;
    bool sent_first; /* the role chunk went out */
    bg_buf_t text;   /* not streaming: the reply so far */
    const char *locale;
} oai_sink_t;

static void sink_free(void *ud)
{
    oai_sink_t *k = ud;
    bg_buf_dispose(&k->text);
    free(k);
}

/* The "text" of a delta event; NULL when the event is not one we wrote. */
static const char *delta_text(bg_json_doc_t **doc, const char *data, size_t len, size_t *tlen)
{
    const char *desc;
    size_t off;
    if (bg_json_parse(data, len, NULL, doc, &desc, &off) != 0)
        return NULL;
    const bg_json_t *t = bg_json_find(bg_json_root(*doc), "text");
    return t != NULL ? bg_json_str(t, tlen) : NULL;
}

/* What a done event says. */
typedef struct st_oai_done {
    char finish_reason[16];
    int64_t prompt_tokens, completion_tokens;
} oai_done_t;

static void parse_done(const char *data, size_t len, oai_done_t *d)
{
    memset(d, 0, sizeof(*d));
    bg_strlcpy(d->finish_reason, "stop", sizeof(d->finish_reason));
    bg_json_doc_t *doc = NULL;
    const char *desc;
    size_t off;
    if (bg_json_parse(data, len, NULL, &doc, &desc, &off) != 0)
        return;
    const bg_json_t *root = bg_json_root(doc);
    const char *fr = NULL;
    if (bg_json_get_str(root, "finish_reason", &fr) == 0 && fr != NULL)
        bg_strlcpy(d->finish_reason, edge_oai_finish_reason(fr), sizeof(d->finish_reason));
    const bg_json_t *usage = bg_json_find(root, "usage");
    if (usage != NULL) {
        if (bg_json_get_int(usage, "prompt_tokens", &d->prompt_tokens) != 0)
            d->prompt_tokens = 0;
        if (bg_json_get_int(usage, "completion_tokens", &d->completion_tokens) != 0)
            d->completion_tokens = 0;
    }
    bg_json_doc_free(doc);
}

/* The error code of an error event ("internal" when it has none we know). */
static void parse_error(const char *data, size_t len, char *code, size_t codelen)
{
    bg_strlcpy(code, "internal", codelen);
    bg_json_doc_t *doc = NULL;
    const char *desc;
    size_t off;
    if (bg_json_parse(data, len, NULL, &doc, &desc, &off) != 0)
        return;
    const char *c = NULL;
    if (bg_json_get_str(bg_json_root(doc), "code", &c) == 0 && c != NULL && c[0] != '\0')
        bg_strlcpy(code, c, codelen);
    bg_json_doc_free(doc);
}

/* The localized message of one of our error codes. */
static void error_message(const char *locale, const char *code, bg_buf_t *msg)
{
    char key[96];
    snprintf(key, sizeof(key), "error.%s", code);
    if (bg_i18n_text(locale, key) == NULL && bg_i18n_text(bg_i18n_default(), key) == NULL)
        snprintf(key, sizeof(key), "error.internal");
    const char *params[] = {"retry_after", "1", NULL};
    if (bg_i18n_format(msg, locale, key, params) != 0)
        bg_buf_reset(msg);
}

/* An error before the response started: an ordinary error response with its own status. */
static int start_error(oai_sink_t *k, edge_req_t *er, const char *code, bg_buf_t *out,
                       edge_relay_start_t *start)
{
    edge_oai_error_map_t m = edge_oai_map_error(code);
    bg_buf_t msg;
    bg_buf_init(&msg, 4096);
    error_message(k->locale, code, &msg);
    int rc = edge_oai_write_error(out, msg.base != NULL ? msg.base : "", m.type, NULL, m.code);
    bg_buf_dispose(&msg);
    if (m.status == 429 || m.status == 503)
        edge_add_header(er, "retry-after", "1");
    edge_add_header(er, "x-should-retry", m.no_retry ? "false" : "true");
    start->status = m.status;
    start->content_type = "application/json; charset=utf-8";
    return rc;
}

/* An error after a stream started: an error event, and no [DONE] after it. */
static int stream_error(oai_sink_t *k, const char *code, bg_buf_t *out)
{
    edge_oai_error_map_t m = edge_oai_map_error(code);
    bg_buf_t msg;
    bg_buf_init(&msg, 4096);
    error_message(k->locale, code, &msg);
    size_t mark = out->len;
    int rc = bg_buf_puts(out, "data: ");
    rc |= edge_oai_write_error(out, msg.base != NULL ? msg.base : "", m.type, NULL, m.code);
    rc |= bg_buf_puts(out, "\n\n");
    bg_buf_dispose(&msg);
    if (rc != 0)
        out->len = mark;
    return rc != 0 ? BG_ERR_TOO_LARGE : 0;
}

static void start_stream(edge_relay_start_t *start)
{
    start->status = 200;
    start->content_type = "text/event-stream; charset=utf-8";
}

static int sink_delta(oai_sink_t *k, const char *data, size_t len, bg_buf_t *out,
                      edge_relay_start_t *start)
{
    bg_json_doc_t *doc = NULL;
    size_t tlen = 0;
    const char *text = delta_text(&doc, data, len, &tlen);
    int rc = 0;
    if (text != NULL && tlen > 0) {
        if (!k->stream) {
            rc = bg_buf_append(&k->text, text, tlen);
        } else {
            if (!k->sent_first)
                start_stream(start);
            rc = edge_oai_write_chunk(out, &k->reply, !k->sent_first, text, tlen, NULL);
            k->sent_first = true;
        }
    }
    bg_json_doc_free(doc);
    return rc;
}

static int sink_done(oai_sink_t *k, const char *data, size_t len, bg_buf_t *out,
                     edge_relay_start_t *start)
{
    oai_done_t d;
    parse_done(data, len, &d);
    if (!k->stream) {
        start->status = 200;
        start->content_type = "application/json; charset=utf-8";
        return edge_oai_write_completion(out, &k->reply, k->text.base, k->text.len, d.finish_reason,
                                         d.prompt_tokens, d.completion_tokens);
    }
    int rc = 0;
    if (!k->sent_first) {
        start_stream(start);
        rc = edge_oai_write_chunk(out, &k->reply, true, "", 0, NULL);
        k->sent_first = true;
    }
    if (rc == 0)
        rc = edge_oai_write_chunk(out, &k->reply, false, NULL, 0, d.finish_reason);
    if (rc == 0 && k->include_usage)
        rc = edge_oai_write_usage_chunk(out, &k->reply, d.prompt_tokens, d.completion_tokens);
    if (rc == 0 && bg_buf_puts(out, "data: [DONE]\n\n") != 0)
        rc = BG_ERR_TOO_LARGE;
    return rc;
}

static int sink_event(void *ud, edge_req_t *er, const char *type, const char *data, size_t len,
                      bg_buf_t *out, edge_relay_start_t *start, bool *end)
{
    oai_sink_t *k = ud;
    if (strcmp(type, BG_JOBOUT_DELTA) == 0)
        return sink_delta(k, data, len, out, start);
    if (strcmp(type, BG_JOBOUT_RESET) == 0) {
        if (!k->stream || !k->sent_first) {
            bg_buf_reset(&k->text); /* nothing shown yet: the reply simply starts over */
            return 0;
        }
        *end = true;
        return stream_error(k, "provider_error", out);
    }
    if (strcmp(type, BG_JOBOUT_DONE) == 0) {
        *end = true;
        return sink_done(k, data, len, out, start);
    }
    if (strcmp(type, BG_JOBOUT_ERROR) == 0) {
        char code[64];
        parse_error(data, len, code, sizeof(code));
        *end = true;
        if (k->stream && k->sent_first)
            return stream_error(k, code, out);
        return start_error(k, er, code, out, start);
    }
    return 0;
}

static void sink_abort(void *ud, edge_req_t *er, bg_buf_t *out, edge_relay_start_t *start)
{
    oai_sink_t *k = ud;
    if (start_error(k, er, "service_unavailable", out, start) != 0)
        bg_buf_reset(out);
}

static const edge_relay_sink_t oai_sink = {sink_event, sink_abort, sink_free};

/* ---- POST /v1/chat/completions ---- */

static void admitted(edge_req_t *er, void *arg, const bg_admission_decision_t *d)
{
    oai_op_t *op = arg;
    edge_admission_headers(er, d);
    if (d->verdict != BG_ADMISSION_OK) {
        const char *params[] = {"plans", API_PLANS, NULL};
        edge_error(er, bg_admission_error_code(d->verdict), NULL,
                   d->verdict == BG_ADMISSION_FEATURE ? params : NULL,
                   (int)bg_admission_retry_after_s(d));
        return;
    }
    oai_sink_t *k = bg_calloc(1, sizeof(*k));
    edge_oai_reply_init(&k->reply, op->job_id, op->req.model, bg_timeutil_wall_ms() / 1000);
    k->stream = op->req.stream;
    k->include_usage = op->req.include_usage;
    k->locale = er->locale;
    bg_buf_init(&k->text, REPLY_COLLECT_MAX);
    edge_relay_start_sink(er, op->job_id, op->shard, &oai_sink, k);
}

static void completion_resolved(edge_req_t *er, void *arg)
{
    oai_op_t *op = arg;
    if (er->req == NULL || resolve_failed(er, op))
        return;
    bg_id_uuid_v7_str(op->job_id);
    op->shard = bg_shard_of(op->user.id, op->cfg->shards);
    op->turn = (bg_turn_t){
        .channel = "api",
        .user_id = op->user.id,
        .user_name = op->user.name,
        .locale = er->locale,
        .job_id = op->job_id,
        .agent_id = op->agent->id,
        .messages = op->req.messages.base,
        .max_tokens = op->req.max_tokens,
        .temperature = op->req.temperature,
        .feature = "api_access",
        .api_key_id = op->api_key.id,
    };
    int rc = bg_turn_prepare(&op->turn, op->cfg->stream_maxlen, &op->job);
    if (rc != 0) {
        edge_fail(er, rc);
        return;
    }
    edge_admit(er, &op->job.admission, admitted, op);
}

/* Answers a refused body in OpenAI's words: 400 naming the parameter (413 when too large). */
static void invalid_request(edge_req_t *er, const edge_oai_error_t *e)
{
    if (e->rc == BG_ERR_TOO_LARGE && strcmp(e->reason, "malformed_json") == 0) {
        edge_error(er, "payload_too_large", NULL, NULL, 0);
        return;
    }
    if (strcmp(e->reason, "malformed_json") == 0) {
        edge_error(er, "malformed_json", NULL, NULL, 0);
        return;
    }
    char min[24], max[24];
    snprintf(min, sizeof(min), "%lld", (long long)e->min);
    snprintf(max, sizeof(max), "%lld", (long long)e->max);
    const char *params[] = {"min", min, "max", max, NULL};
    if (e->param[0] == '\0') {
        edge_error(er, "bad_request", NULL, NULL, 0);
        return;
    }
    edge_invalid_field(er, e->param, e->reason, params);
}

static void chat_completions(edge_req_t *er)
{
    oai_op_t *op = op_new(er);
    if (op == NULL)
        return;
    edge_oai_error_t e;
    if (edge_oai_parse_request(er->req->entity.base, er->req->entity.len, &op->req, &e) != 0) {
        invalid_request(er, &e);
        return;
    }
    bg_strlcpy(op->model, op->req.model, sizeof(op->model));
    edge_run(er, resolve_work, completion_resolved);
}

/* ---- GET /v1/models ---- */

static void write_model(bg_json_writer_t *w, const bg_agent_t *a)
{
    int64_t created_ms = 0;
    if (bg_timeutil_parse_rfc3339(a->created_at, strlen(a->created_at), &created_ms) != 0)
        created_ms = 0;
    bg_json_write_begin_object(w);
    bg_json_write_field_str(w, "id", a->slug);
    bg_json_write_field_str(w, "object", "model");
    bg_json_write_field_int(w, "created", created_ms / 1000);
    bg_json_write_field_str(w, "owned_by",
                            a->organization_id[0] != '\0' ? a->organization_id : "bot-generic");
    bg_json_write_field_str(w, "name", a->name);
    bg_json_write_field_str(w, "description", a->description);
    bg_json_write_end_object(w);
}

static void models_resolved(edge_req_t *er, void *arg)
{
    oai_op_t *op = arg;
    if (er->req == NULL || resolve_failed(er, op))
        return;
    bg_buf_t out;
    bg_buf_init(&out, 4u * 1024u * 1024u);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    if (op->list) {
        bg_json_write_begin_object(&w);
        bg_json_write_field_str(&w, "object", "list");
        bg_json_write_key(&w, "data");
        bg_json_write_begin_array(&w);
        for (size_t i = 0; i < op->agents.count; i++)
            write_model(&w, &op->agents.items[i]);
        bg_json_write_end_array(&w);
        bg_json_write_end_object(&w);
    } else {
        write_model(&w, op->agent);
    }
    edge_respond_writer(er, 200, &w, &out);
}

static void models_list(edge_req_t *er)
{
    oai_op_t *op = op_new(er);
    if (op == NULL)
        return;
    op->list = true;
    edge_run(er, resolve_work, models_resolved);
}

static void models_get(edge_req_t *er)
{
    oai_op_t *op = op_new(er);
    if (op == NULL)
        return;
    h2o_iovec_t m = er->params[0];
    if (m.len >= sizeof(op->model)) {
        const char *params[] = {"model", "", NULL};
        edge_error(er, "model_not_found", NULL, params, 0);
        return;
    }
    memcpy(op->model, m.base, m.len);
    op->model[m.len] = '\0';
    edge_run(er, resolve_work, models_resolved);
}

const edge_route_t edge_routes_openai[] = {
    {"POST", "/v1/chat/completions", "openai_chat_completions", chat_completions, EDGE_ROUTE_JSON,
     COMPLETION_BODY_MAX, EDGE_PUBLIC},
    {"GET", "/v1/models", "openai_models", models_list, 0, 0, EDGE_PUBLIC},
    {"GET", "/v1/models/{model}", "openai_model", models_get, 0, 0, EDGE_PUBLIC},
    {NULL, NULL, NULL, NULL, 0, 0, EDGE_PUBLIC},
};
