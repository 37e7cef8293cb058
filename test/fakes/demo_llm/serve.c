/*
 * The HTTP side of bg-demo-llm: routing, authentication, OpenAI error bodies, the non-stream answer
 * and the SSE stream, all on one libuv loop.
 *
 * Every request gets a demo_req_t in its h2o pool; the pool's dispose callback is the one place
 * that releases what the request holds (the parsed chat, the buffers, the timer), whatever way the
 * request ended: answered, cut, or abandoned by the client.
 *
 * A stream is a small state machine paced by two things: a uv timer (token i is due at start +
 * delay + i × interval, so the rate holds however long the writes take) and h2o's proceed() (libh2o
 * 2.2.5 takes the next h2o_send only after proceed(), and the bytes handed over must stay alive
 * until then). Bytes produced go to `pending`; a send moves them to `inflight`, which h2o owns
 * until proceed() hands it back. An in-progress send is never empty: a zero-length one corrupts
 * HTTP/1.1 chunking.
 *
 * The failure directives act at token boundaries: cut=N ends the response with
 * H2O_SEND_STATE_ERROR after N content tokens (HTTP/1.1: the connection closes without the last
 * chunk; HTTP/2: the stream is reset), stall=N simply stops sending, error=N sends OpenAI's
 * in-stream error event and ends the stream without [DONE], malformed=N slips a broken `data:` line
 * in and goes on.
 *
 * "Until the client goes away" needs help on HTTP/1.1: libh2o stops reading a connection while a
 * request is being answered, so a client that hangs up on a silent request (hang, stall) goes
 * unnoticed and the request would live as long as the process. Such requests therefore peek at
 * their socket every WATCH_MS and end themselves on EOF. Over HTTP/2 h2o keeps reading and notices
 * on its own. The sockets are ours (main.c accepts them through demo_conn_new), which is how a
 * request finds its file descriptor: by the peer address h2o reports.
 */
#include <assert.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "bg/buf.h"
#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/id.h"
#include "bg/json.h"
#include "bg/log.h"
#include "bg/timeutil.h"
#include "demo_llm.h"

/* Models' "created": fixed, so the listing is deterministic. */
#define MODELS_CREATED 1700000000
/* Cap of one response or of the bytes pending on one stream (the reply text is a few KiB). */
#define OUT_MAX (1024 * 1024)
/* How often a silent HTTP/1.1 request checks whether its client is still there. */
#define WATCH_MS 200
/* How long a cut waits for what was sent to leave (see cut()). */
#define CUT_DELAY_MS 50

static const demo_options_t *opts;
static int inflight;
static h2o_linklist_t conns = {&conns, &conns}; /* every accepted connection (demo_conn_t) */

typedef struct st_demo_conn {
    uv_tcp_t tcp; /* first: libuv and h2o hand the handle back to demo_conn_closed */
    h2o_linklist_t link;
} demo_conn_t;

uv_tcp_t *demo_conn_new(uv_loop_t *loop)
{
    demo_conn_t *c = bg_calloc(1, sizeof(*c)); /* the link must start unlinked */
    uv_tcp_init(loop, &c->tcp);
    h2o_linklist_insert(&conns, &c->link);
    return &c->tcp;
}

void demo_conn_closed(uv_handle_t *handle)
{
    demo_conn_t *c = (demo_conn_t *)handle;
    h2o_linklist_unlink(&c->link);
    free(c);
}

typedef struct st_demo_req {
    h2o_generator_t super; /* first: h2o hands it back to proceed() and stop() */
    h2o_req_t *req;        /* borrowed; the pool this lives in is the request's */
    uint64_t start_us;
    int64_t created;
    char id[BG_REQUEST_ID_LEN + 1];
    char completion_id[BG_REQUEST_ID_LEN + 16];
    demo_chat_t chat;  /* owned */
    uv_timer_t *timer; /* owned; closed (and freed) when the request goes away */
    bg_buf_t pending;  /* produced, not yet handed to h2o */
    bg_buf_t inflight; /* handed to h2o; must stay untouched until proceed() */
    int64_t interval_us;
    int64_t delay_us;
    size_t next;  /* index of the next content token */
    int fd;       /* the HTTP/1.1 connection's socket while watched, else -1 */
    bool started; /* h2o_start_response was called */
    bool sending; /* waiting for proceed() */
    bool done;    /* FINAL or ERROR handed over, or the client went away */
    bool malformed_sent;
    bool cut_pending; /* non-stream cut: the next proceed() ends the response with an error */
    bool cutting;     /* the response ends with an error when the timer fires */
    bool lingering;   /* linger: [DONE] is out, the body never ends */
} demo_req_t;

int demo_serve_inflight(void)
{
    return inflight;
}

static void on_timer_closed(uv_handle_t *h)
{
    free(h);
}

/* The request is over: release everything it holds. */
static void on_dispose(void *p)
{
    demo_req_t *dr = p;
    inflight--;
    if (dr->timer != NULL) {
        uv_timer_stop(dr->timer);
        dr->timer->data = NULL;
        uv_close((uv_handle_t *)dr->timer, on_timer_closed);
        dr->timer = NULL;
    }
    demo_chat_dispose(&dr->chat);
    bg_buf_dispose(&dr->pending);
    bg_buf_dispose(&dr->inflight);
}

static void add_header(demo_req_t *dr, const char *name, const char *value)
{
    h2o_req_t *req = dr->req;
    h2o_iovec_t v = h2o_strdup(&req->pool, value, SIZE_MAX);
    h2o_add_header_by_str(&req->pool, &req->res.headers, name, strlen(name), 1, NULL, v.base,
                          v.len);
}

/* The HTTP/1.1 reason phrase (h2 has none); only people reading `curl -i` care. */
static const char *reason(int status)
{
    switch (status) {
    case 200:
        return "OK";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 413:
        return "Payload Too Large";
    case 429:
        return "Too Many Requests";
    case 500:
        return "Internal Server Error";
    case 502:
        return "Bad Gateway";
    case 503:
        return "Service Unavailable";
    default:
        return status < 500 ? "Client Error" : "Server Error";
    }
}

static void start_headers(demo_req_t *dr, int status, const char *content_type)
{
    h2o_req_t *req = dr->req;
    char ms[24];
    req->res.status = status;
    req->res.reason = reason(status);
    add_header(dr, "content-type", content_type);
    add_header(dr, "x-request-id", dr->id);
    add_header(dr, "openai-version", "2020-10-01");
    snprintf(ms, sizeof(ms), "%llu",
             (unsigned long long)((bg_timeutil_mono_us() - dr->start_us) / 1000));
    add_header(dr, "openai-processing-ms", ms);
}

/* Answers with a whole body (copied into the request's pool). */
static void respond(demo_req_t *dr, int status, const char *content_type, const char *body,
                    size_t len)
{
    static h2o_generator_t generator = {NULL, NULL};
    h2o_req_t *req = dr->req;
    start_headers(dr, status, content_type);
    req->res.content_length = len;
    h2o_iovec_t b = h2o_strdup(&req->pool, body, len);
    dr->done = true;
    dr->started = true;
    h2o_start_response(req, &generator);
    h2o_send(req, &b, 1, H2O_SEND_STATE_FINAL);
}

static void respond_json(demo_req_t *dr, int status, bg_buf_t *buf)
{
    respond(dr, status, "application/json", buf->base != NULL ? buf->base : "", buf->len);
}

static void write_error(bg_json_writer_t *w, const demo_error_t *e)
{
    bg_json_write_begin_object(w);
    bg_json_write_key(w, "error");
    bg_json_write_begin_object(w);
    bg_json_write_field_str(w, "message", e->message);
    bg_json_write_field_str(w, "type", e->type);
    bg_json_write_field_str(w, "param", e->param[0] != '\0' ? e->param : NULL);
    bg_json_write_field_str(w, "code", e->code);
    bg_json_write_end_object(w);
    bg_json_write_end_object(w);
}

static void respond_error(demo_req_t *dr, const demo_error_t *e)
{
    bg_buf_t b;
    bg_json_writer_t w;
    bg_buf_init(&b, OUT_MAX);
    bg_json_writer_init(&w, &b);
    write_error(&w, e);
    if (bg_json_write_finish(&w) != 0)
        bg_buf_reset(&b); /* cannot happen with a 512-byte message; answer with no body anyway */
    if (e->status == 429) {
        /* What OpenAI's clients read: retry-after-ms first, then retry-after (seconds). */
        add_header(dr, "retry-after", "1");
        add_header(dr, "retry-after-ms", "1000");
        add_header(dr, "x-ratelimit-limit-requests", "3");
        add_header(dr, "x-ratelimit-remaining-requests", "0");
        add_header(dr, "x-ratelimit-reset-requests", "1s");
    }
    bg_debug("answering %d: %s", e->status, e->message);
    respond_json(dr, e->status, &b);
    bg_buf_dispose(&b);
}

static void respond_simple_error(demo_req_t *dr, int status, const char *code, const char *fmt, ...)
    BG_PRINTF(4, 5);
static void respond_simple_error(demo_req_t *dr, int status, const char *code, const char *fmt, ...)
{
    demo_error_t e = {.status = status, .type = "invalid_request_error", .code = code};
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e.message, sizeof(e.message), fmt, ap);
    va_end(ap);
    respond_error(dr, &e);
}

/* ---- /v1/models ---- */

static void write_model(bg_json_writer_t *w, const demo_model_t *m)
{
    bg_json_write_begin_object(w);
    bg_json_write_field_str(w, "id", m->id);
    bg_json_write_field_str(w, "object", "model");
    bg_json_write_field_int(w, "created", MODELS_CREATED);
    bg_json_write_field_str(w, "owned_by", "bot-generic");
    bg_json_write_end_object(w);
}

static void handle_models(demo_req_t *dr, h2o_iovec_t id)
{
    bg_buf_t b;
    bg_json_writer_t w;
    size_t n;
    const demo_model_t *models = demo_models(&n);

    bg_buf_init(&b, OUT_MAX);
    bg_json_writer_init(&w, &b);
    if (id.len > 0) {
        const demo_model_t *m = demo_model_find(id.base, id.len);
        if (m == NULL) {
            bg_buf_dispose(&b);
            respond_simple_error(dr, 404, "model_not_found", "The model '%.*s' does not exist",
                                 (int)(id.len < 100 ? id.len : 100), id.base);
            return;
        }
        write_model(&w, m);
    } else {
        bg_json_write_begin_object(&w);
        bg_json_write_field_str(&w, "object", "list");
        bg_json_write_key(&w, "data");
        bg_json_write_begin_array(&w);
        for (size_t i = 0; i < n; i++)
            write_model(&w, &models[i]);
        bg_json_write_end_array(&w);
        bg_json_write_end_object(&w);
    }
    if (bg_json_write_finish(&w) != 0)
        bg_buf_reset(&b);
    respond_json(dr, 200, &b);
    bg_buf_dispose(&b);
}

/* ---- chat completions: the pieces of JSON ---- */

static void write_usage(bg_json_writer_t *w, const demo_chat_t *chat)
{
    bg_json_write_key(w, "usage");
    bg_json_write_begin_object(w);
    bg_json_write_field_int(w, "prompt_tokens", chat->prompt_tokens);
    bg_json_write_field_int(w, "completion_tokens", (int64_t)chat->ntokens);
    bg_json_write_field_int(w, "total_tokens", chat->prompt_tokens + (int64_t)chat->ntokens);
    bg_json_write_key(w, "prompt_tokens_details");
    bg_json_write_begin_object(w);
    bg_json_write_field_int(w, "cached_tokens", 0);
    bg_json_write_end_object(w);
    bg_json_write_key(w, "completion_tokens_details");
    bg_json_write_begin_object(w);
    bg_json_write_field_int(w, "reasoning_tokens", 0);
    bg_json_write_end_object(w);
    bg_json_write_end_object(w);
}

/* The members every completion and chunk starts with. */
static void write_head(bg_json_writer_t *w, const demo_req_t *dr, const char *object)
{
    bg_json_write_field_str(w, "id", dr->completion_id);
    bg_json_write_field_str(w, "object", object);
    bg_json_write_field_int(w, "created", dr->created);
    bg_json_write_field_str(w, "model", dr->chat.model);
    bg_json_write_field_str(w, "system_fingerprint", "fp_demo");
}

enum chunk_kind { CHUNK_ROLE, CHUNK_CONTENT, CHUNK_FINISH, CHUNK_USAGE };

/* Appends one `data: {chunk}` event to pending. Returns 0 or BG_ERR_TOO_LARGE. */
static int append_chunk(demo_req_t *dr, enum chunk_kind kind, size_t token)
{
    const demo_chat_t *chat = &dr->chat;
    bg_json_writer_t w;
    int r = bg_buf_puts(&dr->pending, "data: ");
    bg_json_writer_init(&w, &dr->pending);
    bg_json_write_begin_object(&w);
    write_head(&w, dr, "chat.completion.chunk");
    bg_json_write_key(&w, "choices");
    bg_json_write_begin_array(&w);
    if (kind != CHUNK_USAGE) {
        bg_json_write_begin_object(&w);
        bg_json_write_field_int(&w, "index", 0);
        bg_json_write_key(&w, "delta");
        bg_json_write_begin_object(&w);
        if (kind == CHUNK_ROLE) {
            bg_json_write_field_str(&w, "role", "assistant");
            bg_json_write_field_str(&w, "content", "");
            bg_json_write_field_null(&w, "refusal");
        } else if (kind == CHUNK_CONTENT) {
            size_t from = demo_chat_token_start(chat, token);
            bg_json_write_key(&w, "content");
            bg_json_write_strn(&w, chat->text + from, chat->token_end[token] - from);
        }
        bg_json_write_end_object(&w);
        bg_json_write_field_null(&w, "logprobs");
        bg_json_write_field_str(&w, "finish_reason",
                                kind == CHUNK_FINISH ? chat->finish_reason : NULL);
        bg_json_write_end_object(&w);
    }
    bg_json_write_end_array(&w);
    if (kind == CHUNK_USAGE)
        write_usage(&w, chat);
    bg_json_write_end_object(&w);
    if (r != 0 || bg_json_write_finish(&w) != 0)
        return BG_ERR_TOO_LARGE;
    return bg_buf_puts(&dr->pending, "\n\n");
}

/* The chat.completion object of a non-stream answer. */
static int write_completion(const demo_req_t *dr, bg_buf_t *b)
{
    const demo_chat_t *chat = &dr->chat;
    bg_json_writer_t w;
    bg_json_writer_init(&w, b);
    bg_json_write_begin_object(&w);
    write_head(&w, dr, "chat.completion");
    bg_json_write_key(&w, "choices");
    bg_json_write_begin_array(&w);
    bg_json_write_begin_object(&w);
    bg_json_write_field_int(&w, "index", 0);
    bg_json_write_key(&w, "message");
    bg_json_write_begin_object(&w);
    bg_json_write_field_str(&w, "role", "assistant");
    bg_json_write_key(&w, "content");
    bg_json_write_strn(&w, chat->text, chat->text_len);
    bg_json_write_field_null(&w, "refusal");
    bg_json_write_end_object(&w);
    bg_json_write_field_null(&w, "logprobs");
    bg_json_write_field_str(&w, "finish_reason", chat->finish_reason);
    bg_json_write_end_object(&w);
    bg_json_write_end_array(&w);
    write_usage(&w, chat);
    bg_json_write_end_object(&w);
    return bg_json_write_finish(&w);
}

/* ---- chat completions: pacing ---- */

static void on_tick(uv_timer_t *timer);

/* Calls cb once due_us (monotonic) has come. */
static void arm_timer(demo_req_t *dr, uint64_t due_us, uv_timer_cb cb)
{
    if (dr->timer == NULL) {
        dr->timer = bg_malloc(sizeof(*dr->timer));
        uv_timer_init(dr->req->conn->ctx->loop, dr->timer);
        dr->timer->data = dr;
    }
    uint64_t now = bg_timeutil_mono_us();
    uint64_t ms = due_us > now ? (due_us - now + 999) / 1000 : 0;
    uv_timer_start(dr->timer, cb, ms, 0);
}

/* When content token i is due. */
static uint64_t token_due(const demo_req_t *dr, size_t i)
{
    return dr->start_us + (uint64_t)dr->delay_us + (uint64_t)i * (uint64_t)dr->interval_us;
}

/*
 * Hands pending to h2o. Nothing of dr may be touched after h2o_send: a FINAL or ERROR send may
 * release the request (and dr with it), and proceed() may run before h2o_send returns.
 */
static void flush(demo_req_t *dr, h2o_send_state_t state)
{
    assert(!dr->sending && !dr->done);
    bg_buf_t t = dr->inflight;
    dr->inflight = dr->pending;
    dr->pending = t;
    bg_buf_reset(&dr->pending);
    h2o_iovec_t iov = h2o_iovec_init(dr->inflight.base, dr->inflight.len);
    if (state == H2O_SEND_STATE_IN_PROGRESS) {
        assert(iov.len > 0);
        dr->sending = true;
    } else {
        dr->done = true;
    }
    h2o_send(dr->req, &iov, iov.len > 0 ? 1 : 0, state);
}

static void on_cut_timer(uv_timer_t *timer)
{
    demo_req_t *dr = timer->data;
    if (dr == NULL || dr->done)
        return;
    dr->done = true;
    h2o_send(dr->req, NULL, 0, H2O_SEND_STATE_ERROR);
}

/*
 * Ends the response abruptly: HTTP/1.1 closes the connection, HTTP/2 resets the stream. The end
 * comes CUT_DELAY_MS later: over HTTP/2, libh2o 2.2.5 calls proceed() once data is queued on the
 * connection, not once it is written, and a reset right away can take the queued frames (even the
 * HEADERS) with it, so the client would not see the tokens the directive promised.
 */
static void cut(demo_req_t *dr)
{
    bg_debug("cutting the response as asked");
    dr->cutting = true;
    arm_timer(dr, bg_timeutil_mono_us() + CUT_DELAY_MS * 1000, on_cut_timer);
}

static void append_or_cut(demo_req_t *dr, int r)
{
    if (r != 0) {
        bg_error("an event did not fit the stream buffer; cutting the stream");
        cut(dr);
    }
}

/* Finds the socket of an HTTP/1.1 request among ours; -1 when not found (or HTTP/2). */
static int find_fd(h2o_req_t *req)
{
    struct sockaddr_storage peer, ours;
    if (req->version >= 0x200)
        return -1;
    socklen_t len = req->conn->callbacks->get_peername(req->conn, (struct sockaddr *)&peer);
    if (len == 0)
        return -1;
    for (h2o_linklist_t *l = conns.next; l != &conns; l = l->next) {
        demo_conn_t *c = H2O_STRUCT_FROM_MEMBER(demo_conn_t, link, l);
        int n = sizeof(ours);
        uv_os_fd_t fd;
        if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ours, &n) == 0 && n == (int)len &&
            memcmp(&ours, &peer, len) == 0 && uv_fileno((uv_handle_t *)&c->tcp, &fd) == 0)
            return fd;
    }
    return -1;
}

static void on_watch(uv_timer_t *timer)
{
    demo_req_t *dr = timer->data;
    if (dr == NULL || dr->done)
        return;
    char c;
    ssize_t n = recv(dr->fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n > 0 || (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)))
        return;
    bg_log_set_context(dr->id);
    bg_debug("the client went away from a silent request");
    uv_timer_stop(timer);
    if (!dr->started) {
        dr->req->res.status = 500;
        dr->req->res.reason = reason(500);
        dr->started = true;
        h2o_start_response(dr->req, &dr->super);
    }
    dr->done = true;
    bg_log_set_context(NULL);
    h2o_send(dr->req, NULL, 0, H2O_SEND_STATE_ERROR); /* h2o closes the connection */
}

/* The request will send nothing more: over HTTP/1.1, watch for the client hanging up. */
static void go_silent(demo_req_t *dr)
{
    dr->fd = find_fd(dr->req);
    if (dr->fd < 0)
        return;
    if (dr->timer == NULL) {
        dr->timer = bg_malloc(sizeof(*dr->timer));
        uv_timer_init(dr->req->conn->ctx->loop, dr->timer);
        dr->timer->data = dr;
    }
    uv_timer_start(dr->timer, on_watch, WATCH_MS, WATCH_MS);
}

/* Produces the stream's next step; runs when no send is in flight. */
static void stream_step(demo_req_t *dr)
{
    const demo_chat_t *chat = &dr->chat;
    const demo_fail_t *f = &chat->fail;
    int64_t i = (int64_t)dr->next;

    if (dr->lingering) {
        bg_debug("[DONE] sent; lingering without ending the body as asked");
        go_silent(dr); /* the request ends when the client goes away */
        return;
    }
    if (f->cut_after == i) {
        cut(dr);
        return;
    }
    if (f->stall_after == i) {
        bg_debug("stalling the stream after %lld tokens as asked", (long long)i);
        go_silent(dr); /* nothing more, ever; the request ends when the client goes away */
        return;
    }
    if (f->error_after == i) {
        demo_error_t e;
        demo_error_for_status(500, chat->model, &e);
        bg_json_writer_t w;
        int r = bg_buf_puts(&dr->pending, "data: ");
        bg_json_writer_init(&w, &dr->pending);
        write_error(&w, &e);
        if (r != 0 || bg_json_write_finish(&w) != 0 || bg_buf_puts(&dr->pending, "\n\n") != 0) {
            append_or_cut(dr, BG_ERR_TOO_LARGE);
            return;
        }
        flush(dr, H2O_SEND_STATE_FINAL);
        return;
    }
    if (f->malformed_after == i && !dr->malformed_sent) {
        dr->malformed_sent = true;
        if (bg_buf_puts(&dr->pending, "data: {not json\n\n") != 0) {
            append_or_cut(dr, BG_ERR_TOO_LARGE);
            return;
        }
    }
    if (dr->next < chat->ntokens) {
        uint64_t due = token_due(dr, dr->next);
        if (bg_timeutil_mono_us() < due) {
            if (dr->pending.len > 0)
                flush(dr, H2O_SEND_STATE_IN_PROGRESS);
            else
                arm_timer(dr, due, on_tick);
            return;
        }
        size_t token = dr->next++;
        int r = append_chunk(dr, CHUNK_CONTENT, token);
        if (r != 0) {
            append_or_cut(dr, r);
            return;
        }
        flush(dr, H2O_SEND_STATE_IN_PROGRESS);
        return;
    }
    int r = append_chunk(dr, CHUNK_FINISH, 0);
    if (r == 0 && chat->include_usage)
        r = append_chunk(dr, CHUNK_USAGE, 0);
    if (r == 0)
        r = bg_buf_puts(&dr->pending, "data: [DONE]\n\n");
    if (r != 0) {
        append_or_cut(dr, r);
        return;
    }
    if (f->linger) {
        dr->lingering = true; /* the next step, after proceed(), goes silent */
        flush(dr, H2O_SEND_STATE_IN_PROGRESS);
        return;
    }
    flush(dr, H2O_SEND_STATE_FINAL);
}

/* A non-stream answer comes whole, once the whole reply would have been generated. */
static void nonstream_step(demo_req_t *dr)
{
    const demo_chat_t *chat = &dr->chat;
    const demo_fail_t *f = &chat->fail;

    if (f->stall_after >= 0) {
        go_silent(dr); /* headers never come: for a non-stream request a stall is a hang */
        return;
    }
    uint64_t due = token_due(dr, chat->ntokens);
    if (bg_timeutil_mono_us() < due) {
        arm_timer(dr, due, on_tick);
        return;
    }
    if (f->error_after >= 0) {
        demo_error_t e;
        demo_error_for_status(500, chat->model, &e);
        respond_error(dr, &e);
        return;
    }
    if (f->malformed_after >= 0) {
        respond(dr, 200, "application/json", BG_STRLIT("{not json"));
        return;
    }
    bg_buf_t b;
    bg_buf_init(&b, OUT_MAX);
    if (write_completion(dr, &b) != 0) {
        bg_buf_dispose(&b);
        respond_simple_error(dr, 500, NULL, "The reply does not fit the demo provider's buffer.");
        return;
    }
    if (f->cut_after < 0) {
        respond_json(dr, 200, &b);
        bg_buf_dispose(&b);
        return;
    }
    /* Announce the whole body, send half of it, then drop the connection. */
    h2o_req_t *req = dr->req;
    start_headers(dr, 200, "application/json");
    req->res.content_length = b.len;
    bg_buf_dispose(&dr->inflight);
    dr->inflight = b; /* owned by dr from here on, alive until the request goes away */
    dr->cut_pending = true;
    dr->sending = true;
    dr->started = true;
    h2o_iovec_t half = h2o_iovec_init(dr->inflight.base, dr->inflight.len / 2);
    h2o_start_response(req, &dr->super);
    h2o_send(req, &half, 1, H2O_SEND_STATE_IN_PROGRESS);
}

static void step(demo_req_t *dr)
{
    if (dr->sending || dr->done || dr->cutting)
        return;
    bg_log_set_context(dr->id);
    if (dr->chat.stream)
        stream_step(dr);
    else
        nonstream_step(dr);
    bg_log_set_context(NULL);
}

static void on_tick(uv_timer_t *timer)
{
    demo_req_t *dr = timer->data;
    if (dr != NULL)
        step(dr);
}

static void on_proceed(h2o_generator_t *self, h2o_req_t *req)
{
    (void)req;
    demo_req_t *dr = (demo_req_t *)self;
    dr->sending = false;
    if (dr->cut_pending) {
        bg_log_set_context(dr->id);
        cut(dr);
        bg_log_set_context(NULL);
        return;
    }
    step(dr);
}

/* The client went away while the response was going out. */
static void on_stop(h2o_generator_t *self, h2o_req_t *req)
{
    (void)req;
    demo_req_t *dr = (demo_req_t *)self;
    dr->done = true;
    if (dr->timer != NULL)
        uv_timer_stop(dr->timer);
    bg_debug("%s: the client went away", dr->id);
}

static void handle_chat(demo_req_t *dr)
{
    h2o_req_t *req = dr->req;
    demo_error_t e;

    if (demo_chat_parse(req->entity.base != NULL ? req->entity.base : "", req->entity.len,
                        &dr->chat, &e) != 0) {
        respond_error(dr, &e);
        return;
    }
    const demo_fail_t *f = &dr->chat.fail;
    if (f->status != 0) {
        demo_error_for_status(f->status, dr->chat.model, &e);
        respond_error(dr, &e);
        return;
    }
    dr->super.proceed = on_proceed;
    dr->super.stop = on_stop;
    if (f->hang) {
        bg_debug("hanging as asked: no answer until the client goes away");
        go_silent(dr);
        return;
    }
    snprintf(dr->completion_id, sizeof(dr->completion_id), "chatcmpl-%s", dr->id);
    dr->created = bg_timeutil_wall_ms() / 1000;
    dr->delay_us = opts->delay_ms * 1000;
    if (f->slow_ms >= 0)
        dr->interval_us = f->slow_ms * 1000;
    else if (opts->tokens_per_second > 0)
        dr->interval_us = (int64_t)(1e6 / opts->tokens_per_second);
    bg_buf_init(&dr->pending, OUT_MAX);
    bg_buf_init(&dr->inflight, OUT_MAX);
    bg_debug("chat completion: model %s, %s, %lld prompt tokens, %zu completion tokens",
             dr->chat.model, dr->chat.stream ? "stream" : "non-stream",
             (long long)dr->chat.prompt_tokens, dr->chat.ntokens);
    if (!dr->chat.stream) {
        nonstream_step(dr);
        return;
    }
    start_headers(dr, 200, "text/event-stream; charset=utf-8");
    add_header(dr, "cache-control", "no-cache");
    dr->started = true;
    h2o_start_response(req, &dr->super);
    /* The role chunk goes out at once, so the client sees the 200 before the first token. */
    int r = append_chunk(dr, CHUNK_ROLE, 0);
    if (r != 0) {
        append_or_cut(dr, r);
        return;
    }
    flush(dr, H2O_SEND_STATE_IN_PROGRESS);
}

/* ---- routing ---- */

/* Returns true when the request may go on; answers 401 otherwise. */
static bool authorized(demo_req_t *dr)
{
    if (opts->api_key == NULL)
        return true;
    h2o_req_t *req = dr->req;
    ssize_t i = h2o_find_header(&req->headers, H2O_TOKEN_AUTHORIZATION, -1);
    if (i < 0) {
        respond_simple_error(dr, 401, NULL,
                             "You didn't provide an API key. You need to provide your API key in "
                             "an Authorization header using Bearer auth (i.e. Authorization: "
                             "Bearer YOUR_KEY).");
        return false;
    }
    h2o_iovec_t v = req->headers.entries[i].value;
    static const char bearer[] = "Bearer ";
    bool ok = false;
    if (v.len > sizeof(bearer) - 1 && h2o_memis(v.base, sizeof(bearer) - 1, H2O_STRLIT(bearer))) {
        h2o_iovec_t key =
            h2o_strdup(&req->pool, v.base + sizeof(bearer) - 1, v.len - (sizeof(bearer) - 1));
        ok = bg_crypto_str_equal(key.base, opts->api_key);
    }
    if (!ok)
        respond_simple_error(dr, 401, "invalid_api_key",
                             "Incorrect API key provided. You can find your API key at "
                             "https://platform.openai.com/account/api-keys.");
    return ok;
}

static int on_req(h2o_handler_t *self, h2o_req_t *req)
{
    (void)self;
    demo_req_t *dr = h2o_mem_alloc_shared(&req->pool, sizeof(*dr), on_dispose);
    memset(dr, 0, sizeof(*dr));
    dr->req = req;
    dr->fd = -1;
    dr->start_us = bg_timeutil_mono_us();
    bg_id_request(dr->id);
    inflight++;
    bg_log_set_context(dr->id);

    h2o_iovec_t path = req->path_normalized;
    static const char models[] = "/v1/models";
    static const char chat[] = "/v1/chat/completions";
    bool is_get = h2o_memis(req->method.base, req->method.len, H2O_STRLIT("GET"));
    bool is_post = h2o_memis(req->method.base, req->method.len, H2O_STRLIT("POST"));
    bg_debug("%.*s %.*s", (int)req->method.len, req->method.base, (int)path.len, path.base);

    if (h2o_memis(path.base, path.len, H2O_STRLIT(models)) ||
        (path.len > sizeof(models) && memcmp(path.base, models, sizeof(models) - 1) == 0 &&
         path.base[sizeof(models) - 1] == '/')) {
        if (!is_get)
            respond_simple_error(dr, 405, NULL, "Invalid method for URL (%.*s %.*s)",
                                 (int)req->method.len, req->method.base, (int)path.len, path.base);
        else if (authorized(dr))
            handle_models(dr, path.len > sizeof(models) ? h2o_iovec_init(path.base + sizeof(models),
                                                                         path.len - sizeof(models))
                                                        : h2o_iovec_init(NULL, 0));
    } else if (h2o_memis(path.base, path.len, H2O_STRLIT(chat))) {
        if (!is_post)
            respond_simple_error(dr, 405, NULL, "Invalid method for URL (%.*s %.*s)",
                                 (int)req->method.len, req->method.base, (int)path.len, path.base);
        else if (authorized(dr))
            handle_chat(dr);
    } else {
        respond_simple_error(dr, 404, NULL, "Invalid URL (%.*s %.*s)", (int)req->method.len,
                             req->method.base, (int)(path.len < 200 ? path.len : 200), path.base);
    }
    bg_log_set_context(NULL);
    return 0;
}

void demo_serve_init(h2o_globalconf_t *conf, const demo_options_t *o)
{
    opts = o;
    conf->server_name = h2o_iovec_init(H2O_STRLIT("bg-demo-llm"));
    conf->max_request_entity_size = 4 * 1024 * 1024;
    conf->http1.upgrade_to_http2 = 1;
    conf->http2.graceful_shutdown_timeout = 1000;
    h2o_hostconf_t *host =
        h2o_config_register_host(conf, h2o_iovec_init(H2O_STRLIT("default")), 65535);
    h2o_pathconf_t *path = h2o_config_register_path(host, "/", 0);
    h2o_handler_t *handler = h2o_create_handler(path, sizeof(*handler));
    handler->on_req = on_req;
}
