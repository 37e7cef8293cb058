/*
 * The job-output relay: turns a job's output stream in Redis (bg:{s<N>}:out:<job id>, written by
 * the llm worker, docs/streaming.md) into a Server-Sent Events response.
 *
 * Each loop has one relay: one pub/sub connection (bg/redis_sub.h) subscribed to bg:{s<N>}:out of
 * every shard, and a hash map job id → the streams of that job open on this loop. No Redis
 * connection is held per stream: a notification (the worker PUBLISHes the job id after each
 * append) makes each stream of that job XRANGE, on the loop's ordinary connection, what follows the
 * last entry it relayed. A new stream registers in the map before its first read, so an append
 * between the two only causes one more read; a read while another is in flight is folded into one
 * more read after it. Reads also happen on each heartbeat and after the subscriber (re)connects,
 * so a lost notification delays output but never loses it.
 *
 * SSE ids are the stream's entry ids, so a client resumes with Last-Event-ID on any edge.
 *
 * Sinks (edge_relay_start_sink): the OpenAI-compatible API reads the same events but renders them
 * in OpenAI's shapes, and starts its response only when its sink says so: a job that fails before
 * its first token is then an ordinary JSON error with its own status, and a non-streaming request
 * is one JSON body sent when the job is done. Until then nothing is sent, not even heartbeats.
 *
 * Back-pressure (libh2o 2.2.5): h2o_send is called again only after proceed(); the bytes in flight
 * live in their own buffer until then, and new events collect in a second one capped at
 * EDGE_SSE_BUFFER_MAX. A client that falls that far behind gets its response ended after what
 * fitted, and resumes from its last id. The last chunk (FINAL, after which h2o calls nothing) is
 * copied into the request's pool, which outlives it.
 *
 * Lifetime: a stream is reference-counted. The response holds one reference until h2o calls stop()
 * (the client went away while the response was open) or the FINAL chunk was sent; each read in
 * flight and the heartbeat timer hold one each. After either end the request is never touched
 * again. The stream holds a reference on its edge_req_t until it is freed. The timer's reference
 * goes only in its close callback, which libuv never runs synchronously, so a stream stays valid
 * through any call chain that starts elsewhere (h2o_send calling stop() included).
 */
#include <assert.h>
#include <stdlib.h>
#include <string.h>

#include "bg/err.h"
#include "bg/i18n.h"
#include "bg/id.h"
#include "bg/jobs.h"
#include "bg/json.h"
#include "bg/log.h"
#include "bg/metrics.h"
#include "bg/redis.h"
#include "bg/redis_sub.h"
#include "bg/sse.h"
#include "edge.h"

#define RELAY_BUCKETS 1024
#define READ_COUNT "256"
#define READ_COUNT_N 256
#define RETRY_MS 3000

typedef struct st_edge_stream edge_stream_t;

struct st_edge_relay {
    edge_thread_t *thread; /* borrowed */
    bg_redis_sub_t *sub;   /* owned */
    edge_stream_t *buckets[RELAY_BUCKETS];
};

struct st_edge_stream {
    h2o_generator_t gen; /* first: h2o hands it back to proceed() and stop() */
    edge_relay_t *relay; /* borrowed */
    edge_req_t *er;      /* a reference is held until the stream is freed */
    edge_stream_t *prev, *next;
    unsigned bucket;
    int refs;
    char job_id[BG_UUID_STR_LEN + 1];
    char key[BG_REDIS_KEY_MAX];
    char last_id[BG_JOBS_ENTRY_ID_MAX]; /* "" = nothing relayed yet */
    char request_id[EDGE_REQUEST_ID_LEN + 1];
    const char *locale; /* static (i18n) */
    bg_buf_t pending;   /* events not yet handed to h2o (capped) */
    bg_buf_t inflight;  /* bytes handed to h2o, alive until proceed() */
    uv_timer_t heartbeat;
    bool sending;  /* h2o_send was called and proceed() has not come yet */
    bool reading;  /* an XRANGE is in flight */
    bool again;    /* a notification came during the read */
    bool finished; /* done or error relayed (or the buffer overflowed): end after the flush */
    bool closed;   /* stop() came or FINAL was sent: the request is not ours any more */
    bool started;  /* h2o_start_response was called */
    const edge_relay_sink_t *sink; /* NULL: our own event format */
    void *sink_ud;                 /* the sink's state, freed with the stream */
};

static bg_metrics_gauge_t *m_open;

static unsigned hash_of(const char *s, size_t len)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++) {
        h ^= (uint8_t)s[i];
        h *= 16777619u;
    }
    return h % RELAY_BUCKETS;
}

/* ---- stream lifetime ---- */

static void stream_hold(edge_stream_t *s)
{
    s->refs++;
}

static void stream_release(edge_stream_t *s)
{
    if (--s->refs > 0)
        return;
    bg_buf_dispose(&s->pending);
    bg_buf_dispose(&s->inflight);
    if (s->sink != NULL && s->sink->free != NULL)
        s->sink->free(s->sink_ud);
    edge_req_unref(s->er);
    free(s);
}

static void on_heartbeat_closed(uv_handle_t *h)
{
    stream_release(h->data);
}

/* Ends the stream's hold on the request: unregisters, stops the heartbeat, drops the response's
 * reference. The caller must not touch the request after this. */
static void stream_close(edge_stream_t *s)
{
    if (s->closed)
        return;
    s->closed = true;
    edge_relay_t *r = s->relay;
    if (s->prev != NULL)
        s->prev->next = s->next;
    else
        r->buckets[s->bucket] = s->next;
    if (s->next != NULL)
        s->next->prev = s->prev;
    s->prev = s->next = NULL;
    bg_metrics_gauge_add(m_open, NULL, -1);
    uv_timer_stop(&s->heartbeat);
    uv_close((uv_handle_t *)&s->heartbeat, on_heartbeat_closed);
    /* the response's reference; the timer's, dropped only in its close callback, keeps s alive */
    assert(s->refs > 1);
    s->refs--;
}

/* ---- sending ---- */

/* Sends the response's status and headers (those added to the request so far, and ours). */
static void stream_start(edge_stream_t *s, int status, const char *content_type)
{
    h2o_req_t *req = s->er->req;
    s->started = true;
    req->res.status = status;
    req->res.reason = "OK";
    edge_add_header(s->er, "x-request-id", s->er->request_id);
    edge_add_header(s->er, "x-content-type-options", "nosniff");
    edge_add_header(s->er, "content-type", content_type);
    edge_add_header(s->er, "cache-control", "no-store");
    if (strncmp(content_type, "text/event-stream", 17) == 0)
        edge_add_header(s->er, "x-accel-buffering", "no");
    h2o_start_response(req, &s->gen);
}

/* A deferred response that must end before its sink started it (shutdown, a client too far
 * behind): the sink renders how it ends. */
static void stream_abort_deferred(edge_stream_t *s)
{
    edge_relay_start_t st = {0};
    bg_buf_reset(&s->pending);
    s->sink->abort(s->sink_ud, s->er, &s->pending, &st);
    stream_start(s, st.status != 0 ? st.status : 503,
                 st.content_type != NULL ? st.content_type : "application/json; charset=utf-8");
}

/* Hands what is pending to h2o when it may take more; ends the response once finished. */
static void stream_flush(edge_stream_t *s)
{
    if (s->closed || s->sending)
        return;
    h2o_req_t *req = s->er->req;
    if (req == NULL) {
        /* h2o disposed the request without stop(): nothing more can be sent */
        stream_close(s);
        return;
    }
    if (!s->started) {
        if (!s->finished)
            return; /* the sink has not started the response yet: nothing may be sent */
        stream_abort_deferred(s);
    }
    if (s->finished) {
        /* no proceed() follows a FINAL chunk: its bytes go into the pool, which outlives it */
        h2o_iovec_t b = h2o_iovec_init(NULL, 0);
        if (s->pending.len > 0)
            b = h2o_strdup(&req->pool, s->pending.base, s->pending.len);
        bg_buf_reset(&s->pending);
        h2o_send(req, &b, b.len > 0 ? 1 : 0, H2O_SEND_STATE_FINAL);
        stream_close(s);
        return;
    }
    if (s->pending.len == 0)
        return; /* never a zero-length IN_PROGRESS chunk */
    bg_buf_t t = s->inflight;
    s->inflight = s->pending;
    s->pending = t;
    bg_buf_reset(&s->pending);
    h2o_iovec_t b = h2o_iovec_init(s->inflight.base, s->inflight.len);
    s->sending = true;
    h2o_send(req, &b, 1, H2O_SEND_STATE_IN_PROGRESS);
}

static void on_proceed(h2o_generator_t *self, h2o_req_t *req)
{
    (void)req;
    edge_stream_t *s = (edge_stream_t *)self;
    s->sending = false;
    bg_buf_reset(&s->inflight);
    stream_flush(s);
}

static void on_stop(h2o_generator_t *self, h2o_req_t *req)
{
    (void)req;
    edge_stream_t *s = (edge_stream_t *)self;
    bg_debug("stream of job %s: client went away (%s)", s->job_id, s->request_id);
    stream_close(s);
}

/* ---- events ---- */

/* Renders an error event's data {"code","retryable"} in the API's error format, localized. */
static int render_error(edge_stream_t *s, bg_buf_t *out, const char *data, size_t len)
{
    char code[64] = "internal";
    bool retryable = false;
    bg_json_doc_t *doc = NULL;
    const char *desc;
    size_t off;
    if (bg_json_parse(data, len, NULL, &doc, &desc, &off) == 0) {
        const bg_json_t *root = bg_json_root(doc);
        const bg_json_t *c = bg_json_find(root, "code");
        size_t clen = 0;
        const char *cs = c != NULL ? bg_json_str(c, &clen) : NULL;
        if (cs != NULL && clen > 0 && clen < sizeof(code)) {
            memcpy(code, cs, clen);
            code[clen] = '\0';
        }
        const bg_json_t *rt = bg_json_find(root, "retryable");
        if (rt == NULL || !bg_json_bool(rt, &retryable))
            retryable = false;
    }
    bg_json_doc_free(doc);
    char key[96];
    snprintf(key, sizeof(key), "error.%s", code);
    if (bg_i18n_text(s->locale, key) == NULL && bg_i18n_text(bg_i18n_default(), key) == NULL)
        snprintf(key, sizeof(key), "error.internal");
    bg_buf_t msg;
    bg_buf_init(&msg, 4096);
    if (bg_i18n_format(&msg, s->locale, key, NULL) != 0)
        bg_buf_reset(&msg);
    int r = bg_buf_puts(out, "{\"error\":{\"code\":");
    r |= bg_buf_json_str(out, code, strlen(code));
    r |= bg_buf_puts(out, ",\"message\":");
    r |= bg_buf_json_str(out, msg.base != NULL ? msg.base : "", msg.len);
    r |= bg_buf_puts(out, ",\"request_id\":");
    r |= bg_buf_json_str(out, s->request_id, strlen(s->request_id));
    r |= bg_buf_printf(out, ",\"details\":{\"retryable\":%s}}}", retryable ? "true" : "false");
    bg_buf_dispose(&msg);
    return r != 0 ? BG_ERR_TOO_LARGE : 0;
}

static const redisReply *field_of(const redisReply *fields, const char *name)
{
    for (size_t i = 0; i + 1 < fields->elements; i += 2) {
        const redisReply *k = fields->element[i];
        if (k->type == REDIS_REPLY_STRING && strcmp(k->str, name) == 0)
            return fields->element[i + 1]->type == REDIS_REPLY_STRING ? fields->element[i + 1]
                                                                      : NULL;
    }
    return NULL;
}

/* Appends one entry as an event; returns 0, or BG_ERR_TOO_LARGE when the buffer is full. */
static int append_entry(edge_stream_t *s, const char *id, const redisReply *fields)
{
    const redisReply *type = field_of(fields, "type");
    const redisReply *data = field_of(fields, "data");
    if (type == NULL)
        return 0; /* not an event of ours: skip it */
    const char *t = type->str;
    bool known = strcmp(t, "delta") == 0 || strcmp(t, "reset") == 0 || strcmp(t, "done") == 0 ||
                 strcmp(t, "error") == 0;
    if (!known)
        return 0;
    const char *d = data != NULL ? data->str : "{}";
    size_t dlen = data != NULL ? data->len : 2;
    int rc;
    if (s->sink != NULL) {
        edge_relay_start_t st = {0};
        bool end = false;
        rc = s->sink->event(s->sink_ud, s->er, t, d, dlen, &s->pending, &st, &end);
        if (rc != 0)
            return rc;
        if (!s->started && st.status != 0)
            stream_start(s, st.status, st.content_type);
        if (end)
            s->finished = true;
        return 0;
    }
    if (strcmp(t, "error") == 0) {
        bg_buf_t e;
        bg_buf_init(&e, 16384);
        rc = render_error(s, &e, d, dlen);
        if (rc == 0)
            rc = bg_sse_write_event(&s->pending, t, id, e.base, e.len);
        bg_buf_dispose(&e);
    } else {
        rc = bg_sse_write_event(&s->pending, t, id, d, dlen);
    }
    if (rc == BG_ERR_INVALID)
        return 0; /* an id we cannot write cannot come from XRANGE; skip rather than stall */
    if (rc != 0)
        return rc;
    if (strcmp(t, "done") == 0 || strcmp(t, "error") == 0)
        s->finished = true;
    return 0;
}

static void stream_read(edge_stream_t *s);

static void on_range(void *ud, int err, const redisReply *reply)
{
    edge_stream_t *s = ud;
    s->reading = false;
    if (err == BG_ERR_CLOSED || s->closed) {
        stream_release(s);
        return;
    }
    size_t got = 0;
    if (err == 0 && reply->type == REDIS_REPLY_ARRAY) {
        got = reply->elements;
        for (size_t i = 0; i < reply->elements && !s->finished; i++) {
            const redisReply *e = reply->element[i];
            if (e->type != REDIS_REPLY_ARRAY || e->elements < 2 ||
                e->element[0]->type != REDIS_REPLY_STRING ||
                e->element[1]->type != REDIS_REPLY_ARRAY ||
                e->element[0]->len >= sizeof(s->last_id))
                continue;
            if (append_entry(s, e->element[0]->str, e->element[1]) != 0) {
                /* the client is too far behind: end here; it resumes from the last id it got */
                bg_warn("stream of job %s: client too slow, %zu bytes buffered; closing (%s)",
                        s->job_id, s->pending.len + s->inflight.len, s->request_id);
                s->finished = true;
                break;
            }
            memcpy(s->last_id, e->element[0]->str, e->element[0]->len + 1);
        }
    } else if (err != 0) {
        /* Redis is unavailable: the heartbeat or the next notification reads again */
        bg_debug("stream of job %s: read failed (%s)", s->job_id, bg_strerror(err));
    }
    stream_flush(s);
    if (!s->closed && !s->finished && (s->again || got >= READ_COUNT_N)) {
        s->again = false;
        stream_read(s);
    }
    stream_release(s);
}

/* XRANGEs what follows the last relayed entry; folds into the read in flight if there is one. */
static void stream_read(edge_stream_t *s)
{
    if (s->closed || s->finished)
        return;
    if (s->reading) {
        s->again = true;
        return;
    }
    char start[BG_JOBS_ENTRY_ID_MAX + 2];
    if (s->last_id[0] != '\0')
        snprintf(start, sizeof(start), "(%s", s->last_id);
    else
        snprintf(start, sizeof(start), "-");
    const char *argv[] = {"XRANGE", s->key, start, "+", "COUNT", READ_COUNT};
    /* the callback never runs from inside the call, so the read's reference can follow it */
    if (bg_redis_async_argv(s->relay->thread->redis, on_range, s, 6, argv, NULL) != 0)
        return;
    stream_hold(s);
    s->reading = true;
}

static void on_heartbeat(uv_timer_t *t)
{
    edge_stream_t *s = t->data;
    if (s->closed)
        return;
    if (s->started && s->pending.len == 0 && !s->sending &&
        bg_sse_write_comment(&s->pending, "hb") != 0)
        bg_debug("stream of job %s: no room for a heartbeat", s->job_id);
    stream_flush(s);
    stream_read(s);
}

/* ---- the relay ---- */

static void on_notify(void *ud, const char *channel, size_t channel_len, const char *payload,
                      size_t payload_len)
{
    edge_relay_t *r = ud;
    (void)channel_len;
    if (channel == NULL) {
        /* (re)subscribed: what was published meanwhile is lost, so every stream reads again */
        for (unsigned b = 0; b < RELAY_BUCKETS; b++) {
            for (edge_stream_t *s = r->buckets[b]; s != NULL; s = s->next)
                stream_read(s);
        }
        return;
    }
    if (payload_len == 0 || payload_len > BG_UUID_STR_LEN)
        return;
    for (edge_stream_t *s = r->buckets[hash_of(payload, payload_len)]; s != NULL; s = s->next) {
        if (strlen(s->job_id) == payload_len && memcmp(s->job_id, payload, payload_len) == 0)
            stream_read(s);
    }
}

edge_relay_t *edge_relay_new(edge_thread_t *t)
{
    m_open = bg_metrics_gauge("bg_sse_streams_open", "Open Server-Sent Events streams", NULL);
    edge_relay_t *r = bg_calloc(1, sizeof(*r));
    r->thread = t;
    const bg_config_t *cfg = t->server->cfg;
    int n = cfg->shards > 0 ? cfg->shards : 1;
    char **names = bg_calloc((size_t)n, sizeof(*names));
    for (int i = 0; i < n; i++) {
        names[i] = bg_malloc(BG_REDIS_KEY_MAX);
        snprintf(names[i], BG_REDIS_KEY_MAX, "bg:{s%d}:out", i);
    }
    r->sub = bg_redis_sub_new(&t->loop, cfg->redis_url, cfg->redis_timeout_ms,
                              (const char *const *)names, (size_t)n, on_notify, r);
    if (r->sub == NULL)
        bg_error("loop %d: cannot create the job-output subscriber", t->index);
    for (int i = 0; i < n; i++)
        free(names[i]);
    free(names);
    return r;
}

void edge_relay_drain(edge_relay_t *r)
{
    if (r == NULL)
        return;
    for (unsigned b = 0; b < RELAY_BUCKETS; b++) {
        edge_stream_t *s = r->buckets[b];
        while (s != NULL) {
            edge_stream_t *next = s->next; /* stream_flush may unlink s */
            s->finished = true;
            /* FINAL now, or after the pending proceed(), or after the read in flight */
            if (!s->reading)
                stream_flush(s);
            s = next;
        }
    }
}

void edge_relay_free(edge_relay_t *r)
{
    if (r == NULL)
        return;
    bg_redis_sub_free(r->sub);
    /* open streams stay reachable from their requests (h2o); they must not find the relay */
    for (unsigned b = 0; b < RELAY_BUCKETS; b++) {
        for (edge_stream_t *s = r->buckets[b]; s != NULL; s = s->next)
            s->closed = true;
    }
    free(r);
}

bool edge_sse_is_entry_id(const char *s)
{
    size_t i = 0, digits = 0;
    for (; s[i] >= '0' && s[i] <= '9'; i++)
        digits++;
    if (digits == 0 || digits > 20 || s[i] != '-')
        return false;
    size_t j = i + 1;
    digits = 0;
    for (; s[j] >= '0' && s[j] <= '9'; j++)
        digits++;
    return digits > 0 && digits <= 20 && s[j] == '\0';
}

/* Registers a new stream of job_id and reads what the job wrote so far. */
static edge_stream_t *stream_open(edge_req_t *er, const char *job_id, int shard,
                                  const char *last_id, const edge_relay_sink_t *sink, void *sink_ud)
{
    edge_relay_t *r = er->thread->relay;
    edge_stream_t *s = bg_calloc(1, sizeof(*s));
    s->gen.proceed = on_proceed;
    s->gen.stop = on_stop;
    s->relay = r;
    s->er = er;
    edge_req_ref(er);
    s->refs = 2; /* the response, and the heartbeat timer handle */
    s->sink = sink;
    s->sink_ud = sink_ud;
    bg_strlcpy(s->job_id, job_id, sizeof(s->job_id));
    snprintf(s->key, sizeof(s->key), "bg:{s%d}:out:%s", shard, job_id);
    if (last_id != NULL)
        bg_strlcpy(s->last_id, last_id, sizeof(s->last_id));
    bg_strlcpy(s->request_id, er->request_id, sizeof(s->request_id));
    s->locale = er->locale;
    bg_buf_init(&s->pending, EDGE_SSE_BUFFER_MAX);
    bg_buf_init(&s->inflight, EDGE_SSE_BUFFER_MAX);
    uv_timer_init(&er->thread->loop, &s->heartbeat);
    s->heartbeat.data = s;

    /* registered before the first read, so nothing appended from here on can be missed */
    s->bucket = hash_of(s->job_id, strlen(s->job_id));
    s->next = r->buckets[s->bucket];
    if (s->next != NULL)
        s->next->prev = s;
    r->buckets[s->bucket] = s;
    bg_metrics_gauge_add(m_open, NULL, 1);
    uv_timer_start(&s->heartbeat, on_heartbeat, EDGE_SSE_HEARTBEAT_S * 1000,
                   EDGE_SSE_HEARTBEAT_S * 1000);
    return s;
}

void edge_sse_relay_start(edge_req_t *er, const char *job_id, int shard, const char *last_id)
{
    if (er->req == NULL)
        return;
    edge_stream_t *s = stream_open(er, job_id, shard, last_id, NULL, NULL);
    stream_start(s, 200, "text/event-stream; charset=utf-8");
    /* the first chunk sends the headers at once and tells the client how soon to come back */
    if (bg_sse_write_retry(&s->pending, RETRY_MS) != 0)
        bg_debug("stream of job %s: cannot write the retry hint", s->job_id);
    stream_flush(s);
    stream_read(s);
}

void edge_relay_start_sink(edge_req_t *er, const char *job_id, int shard,
                           const edge_relay_sink_t *sink, void *sink_ud)
{
    if (er->req == NULL) {
        if (sink->free != NULL)
            sink->free(sink_ud);
        return;
    }
    edge_stream_t *s = stream_open(er, job_id, shard, NULL, sink, sink_ud);
    stream_read(s);
}
