/*
 * Streaming OpenAI-compatible chat client on libcurl's multi interface and libuv. See bg/llm.h for
 * the contract.
 *
 * Design. The standard libuv integration: curl tells us which sockets to watch (on_socket, one
 * uv_poll_t each) and when to wake it (on_curl_timer, one uv_timer_t for the client); libuv tells
 * curl what happened through curl_multi_socket_action(), after which finished transfers are
 * collected from curl_multi_info_read(). The body of a transfer goes through the SSE parser, whose
 * events are parsed as chunks and turned into deltas on the spot.
 *
 * A call is a small state machine: WAIT (its timer runs until the next attempt starts; every
 * attempt, the first included, starts from that timer so that bg_llm_stream() never calls back and
 * never touches curl from inside a curl callback) → RUNNING (an easy handle is in the multi) →
 * either WAIT again (a retry) or DONE. One uv timer per call serves every deadline of the call
 * (next attempt, first token or idle, total, cancel drain): arm() points it at the nearest one and
 * on_call_timer() works out which has passed. An attempt ends in one place, conclude(), whatever
 * ended it (curl, a chunk, a timer), and a call ends in one place, finish(), which calls on_done
 * exactly once and frees the call in its timer's close callback.
 *
 * Re-entrancy: user callbacks run inside curl callbacks (on_delta) or while the multi handle's
 * message queue is being read (on_done), where tearing the multi down would pull the floor away.
 * Every entry point from libuv therefore brackets its work with enter()/leave(); bg_llm_free() in
 * a callback only marks the client closing, and leave() tears it down once the outermost callback
 * has returned. The client's memory goes in the close callback of its last handle.
 */
#include <curl/curl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bg/buf.h"
#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/json.h"
#include "bg/llm.h"
#include "bg/log.h"
#include "bg/sse.h"

#define REQUEST_MAX_BYTES (4u * 1024u * 1024u)
#define ERRBODY_MAX_BYTES 8192u
#define SSE_MAX_LINE (1024u * 1024u)
#define SSE_MAX_DATA (1024u * 1024u)
#define STOP 1 /* value an SSE callback returns to stop reading */
/* After [DONE], how long the rest of the body (the chunked encoding's end) may take to arrive */
#define DONE_GRACE_MS 1000

typedef struct st_sock sock_t;
typedef struct bg_llm_call call_t;

struct st_sock {
    uv_poll_t poll;
    bg_llm_t *llm;
    curl_socket_t fd;
    sock_t *prev, *next;
};

typedef struct st_provider {
    char *url;                  /* owned: base URL + "/chat/completions" */
    struct curl_slist *headers; /* owned; holds the key, wiped before it is freed */
} provider_t;

struct bg_llm {
    uv_loop_t *loop; /* borrowed */
    CURLM *multi;
    uv_timer_t timer; /* curl's timeout */
    provider_t prov[2];
    int nprov;
    bg_llm_config_t cfg; /* durations and sizes with defaults applied; its strings are unused */
    call_t *calls;       /* calls not finished yet */
    sock_t *socks;
    unsigned handles; /* open uv handles of the client itself (timer and polls) */
    int depth;        /* nesting of callbacks from libuv */
    bool closing;     /* bg_llm_free was called */
    bool torn_down;
};

typedef enum call_state { CS_WAIT, CS_RUNNING, CS_DONE } call_state_t;

struct bg_llm_call {
    call_t *prev, *next;
    bg_llm_t *llm;
    const bg_llm_callbacks_t *cb; /* borrowed */
    void *ud;
    char *body; /* owned: the request body, sent by every attempt */
    size_t body_len;
    size_t prompt_bytes;
    uv_timer_t timer;
    call_state_t state;
    int provider;
    unsigned attempts;
    unsigned primary_retries;
    unsigned connects; /* connections the attempts opened (CURLINFO_NUM_CONNECTS) */
    uint64_t t_start, total_deadline, start_at, progress_deadline, drain_deadline;
    bool canceled;
    bool first_token;
    uint64_t ttft_ms;
    uint64_t chars; /* characters of generated text received, delivered or not */
    size_t delivered;
    bool usage_seen;
    bg_llm_usage_t usage;
    char finish_reason[32];
    char detail[160];

    /* the current attempt */
    CURL *easy;
    bg_sse_parser_t sse;
    bg_buf_t errbody; /* the start of a non-2xx body, for its error message */
    long http_status;
    double retry_after_ms; /* from retry-after-ms; < 0: none */
    double retry_after_s;  /* from retry-after; < 0: none */
    size_t body_bytes;
    bool finish_seen, done_seen;
    bool cut;               /* stop reading at once (a cancel's drain got its usage) */
    bg_llm_error_t att_err; /* set by a chunk that ended the attempt */
    int att_status;
    bool att_retriable;
    char curl_err[CURL_ERROR_SIZE];
};

static void on_call_timer(uv_timer_t *t);
static void teardown(bg_llm_t *llm);

const char *bg_llm_error_name(bg_llm_error_t e)
{
    switch (e) {
    case BG_LLM_OK:
        return "none";
    case BG_LLM_ERR_TIMEOUT_CONNECT:
        return "timeout_connect";
    case BG_LLM_ERR_TIMEOUT_FIRST_TOKEN:
        return "timeout_first_token";
    case BG_LLM_ERR_TIMEOUT_IDLE:
        return "timeout_idle";
    case BG_LLM_ERR_TIMEOUT_TOTAL:
        return "timeout_total";
    case BG_LLM_ERR_RATE_LIMITED:
        return "rate_limited";
    case BG_LLM_ERR_SERVER_ERROR:
        return "server_error";
    case BG_LLM_ERR_CLIENT_ERROR:
        return "client_error";
    case BG_LLM_ERR_CONNECTION:
        return "connection";
    case BG_LLM_ERR_MALFORMED:
        return "malformed";
    case BG_LLM_ERR_CUT:
        return "cut";
    case BG_LLM_ERR_CANCELED:
        return "canceled";
    }
    return "unknown";
}

/* ---- entry bracketing ------------------------------------------------------------------------ */

static void enter(bg_llm_t *llm)
{
    llm->depth++;
}

static void leave(bg_llm_t *llm)
{
    if (--llm->depth == 0 && llm->closing && !llm->torn_down)
        teardown(llm);
}

static void release_handle(bg_llm_t *llm)
{
    if (--llm->handles == 0 && llm->torn_down)
        free(llm);
}

/* ---- curl socket and timer hooks ------------------------------------------------------------- */

static void check_multi_info(bg_llm_t *llm);

static void on_sock_closed(uv_handle_t *h)
{
    sock_t *sk = h->data;
    bg_llm_t *llm = sk->llm;
    free(sk);
    release_handle(llm);
}

static void close_sock(sock_t *sk)
{
    bg_llm_t *llm = sk->llm;
    if (sk->prev != NULL)
        sk->prev->next = sk->next;
    else
        llm->socks = sk->next;
    if (sk->next != NULL)
        sk->next->prev = sk->prev;
    uv_poll_stop(&sk->poll);
    uv_close((uv_handle_t *)&sk->poll, on_sock_closed);
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    sock_t *sk = h->data;
    bg_llm_t *llm = sk->llm;
    int flags = 0;
    if (status < 0)
        flags = CURL_CSELECT_ERR | CURL_CSELECT_IN | CURL_CSELECT_OUT;
    if (events & UV_READABLE)
        flags |= CURL_CSELECT_IN;
    if (events & UV_WRITABLE)
        flags |= CURL_CSELECT_OUT;
    enter(llm);
    int running = 0;
    (void)curl_multi_socket_action(llm->multi, sk->fd, flags, &running);
    check_multi_info(llm);
    leave(llm);
}

static int on_socket(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
    (void)easy;
    bg_llm_t *llm = userp;
    sock_t *sk = socketp;
    if (what == CURL_POLL_REMOVE) {
        if (sk != NULL) {
            close_sock(sk);
            (void)curl_multi_assign(llm->multi, s, NULL);
        }
        return 0;
    }
    if (sk == NULL) {
        sk = bg_calloc(1, sizeof(*sk));
        if (uv_poll_init_socket(llm->loop, &sk->poll, s) != 0) {
            free(sk);
            return -1;
        }
        sk->poll.data = sk;
        sk->llm = llm;
        sk->fd = s;
        sk->next = llm->socks;
        if (llm->socks != NULL)
            llm->socks->prev = sk;
        llm->socks = sk;
        llm->handles++;
        (void)curl_multi_assign(llm->multi, s, sk);
    }
    int events = 0;
    if (what & CURL_POLL_IN)
        events |= UV_READABLE;
    if (what & CURL_POLL_OUT)
        events |= UV_WRITABLE;
    return uv_poll_start(&sk->poll, events, on_poll) == 0 ? 0 : -1;
}

static void on_multi_timeout(uv_timer_t *t)
{
    bg_llm_t *llm = t->data;
    enter(llm);
    int running = 0;
    (void)curl_multi_socket_action(llm->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_multi_info(llm);
    leave(llm);
}

static int on_curl_timer(CURLM *multi, long timeout_ms, void *userp)
{
    (void)multi;
    bg_llm_t *llm = userp;
    if (llm->torn_down)
        return 0;
    if (timeout_ms < 0)
        uv_timer_stop(&llm->timer);
    else
        uv_timer_start(&llm->timer, on_multi_timeout, (uint64_t)timeout_ms, 0);
    return 0;
}

/* ---- calls: timers, finishing ---------------------------------------------------------------- */

static uint64_t now_ms(const call_t *c)
{
    return uv_now(c->llm->loop);
}

/* Points the call's timer at its nearest deadline. */
static void arm(call_t *c)
{
    uint64_t due = c->total_deadline;
    if (c->state == CS_WAIT) {
        if (c->canceled || c->start_at < due)
            due = c->canceled ? 0 : c->start_at;
    } else if (c->state == CS_RUNNING) {
        if (c->canceled && c->drain_deadline < due)
            due = c->drain_deadline;
        if (!c->canceled && c->progress_deadline != 0 && c->progress_deadline < due)
            due = c->progress_deadline;
    }
    uint64_t now = now_ms(c);
    uv_timer_start(&c->timer, on_call_timer, due > now ? due - now : 0, 0);
}

static void on_call_closed(uv_handle_t *h)
{
    call_t *c = h->data;
    free(c->body);
    free(c);
}

/* Removes the current attempt's transfer, if any. */
static void end_attempt(call_t *c)
{
    if (c->easy != NULL) {
        long n = 0;
        if (curl_easy_getinfo(c->easy, CURLINFO_NUM_CONNECTS, &n) == CURLE_OK && n > 0)
            c->connects += (unsigned)n;
        (void)curl_multi_remove_handle(c->llm->multi, c->easy);
        curl_easy_cleanup(c->easy);
        c->easy = NULL;
        bg_sse_parser_dispose(&c->sse);
        bg_buf_dispose(&c->errbody);
    }
}

static uint64_t div_ceil4(uint64_t n)
{
    return (n + 3) / 4;
}

/* Ends the call: on_done once, then the call's memory goes with its timer. */
static void finish(call_t *c, bg_llm_error_t e, int status)
{
    bg_llm_t *llm = c->llm;
    end_attempt(c);
    c->state = CS_DONE;
    if (c->prev != NULL)
        c->prev->next = c->next;
    else
        llm->calls = c->next;
    if (c->next != NULL)
        c->next->prev = c->prev;
    uv_timer_stop(&c->timer);

    bg_llm_result_t res;
    memset(&res, 0, sizeof(res));
    res.status = status;
    res.error = e;
    res.http_status = c->http_status;
    memcpy(res.finish_reason, c->finish_reason, sizeof(res.finish_reason));
    if (c->usage_seen) {
        res.usage = c->usage;
        res.usage.source = BG_LLM_USAGE_PROVIDER;
    } else {
        res.usage.prompt_tokens = div_ceil4(c->prompt_bytes);
        res.usage.completion_tokens = div_ceil4(c->chars);
        res.usage.source = BG_LLM_USAGE_ESTIMATED;
    }
    res.retries = c->attempts > 0 ? c->attempts - 1 : 0;
    res.connects = c->connects;
    res.provider = c->provider == 0 ? BG_LLM_PRIMARY : BG_LLM_FALLBACK;
    res.first_token = c->first_token;
    res.text_bytes = c->delivered;
    res.ttft_ms = c->ttft_ms;
    res.latency_ms = now_ms(c) - c->t_start;
    if (e != BG_LLM_OK && c->detail[0] == '\0')
        (void)bg_strlcpy(c->detail, bg_llm_error_name(e), sizeof(c->detail));
    memcpy(res.detail, c->detail, sizeof(res.detail));

    if (e != BG_LLM_OK && e != BG_LLM_ERR_CANCELED)
        bg_info("llm: call ended: %s (http %ld, %u retries, %s)", bg_llm_error_name(e),
                c->http_status, res.retries, c->provider == 0 ? "primary" : "fallback");
    uv_close((uv_handle_t *)&c->timer, on_call_closed);
    c->cb->on_done(c->ud, &res);
}

static uint64_t backoff_ms(const bg_llm_t *llm, unsigned retry)
{
    uint64_t exp = llm->cfg.backoff_base_ms;
    for (unsigned i = 0; i < retry && exp < llm->cfg.backoff_cap_ms; i++)
        exp *= 2;
    if (exp > llm->cfg.backoff_cap_ms)
        exp = llm->cfg.backoff_cap_ms;
    /* full jitter: anywhere in [0, exp], so that many workers do not come back in step */
    return bg_crypto_random_uniform((uint32_t)exp + 1);
}

/* The delay a 429 or 503 asked for, capped; < 0 when it asked for none. */
static int64_t retry_after(const call_t *c)
{
    double ms = -1;
    if (c->retry_after_ms >= 0)
        ms = c->retry_after_ms;
    else if (c->retry_after_s >= 0)
        ms = c->retry_after_s * 1000.0;
    if (ms < 0)
        return -1;
    if (ms > c->llm->cfg.retry_after_cap_ms)
        ms = c->llm->cfg.retry_after_cap_ms;
    return (int64_t)ceil(ms);
}

/* Ends the current attempt with outcome e, then retries, falls back or finishes the call. */
static void conclude(call_t *c, bg_llm_error_t e, int status, bool retriable)
{
    bg_llm_t *llm = c->llm;
    int64_t ra = retry_after(c);
    end_attempt(c);
    if (c->canceled) {
        finish(c, BG_LLM_ERR_CANCELED, 0);
        return;
    }
    if (e == BG_LLM_OK || !retriable || c->first_token) {
        finish(c, e, status);
        return;
    }
    uint64_t now = now_ms(c);
    if (c->provider == 0 && c->primary_retries < (unsigned)llm->cfg.max_retries) {
        uint64_t delay = ra >= 0 ? (uint64_t)ra : backoff_ms(llm, c->primary_retries);
        if (now + delay >= c->total_deadline) {
            finish(c, e, status);
            return;
        }
        c->primary_retries++;
        bg_debug("llm: attempt %u failed (%s), retrying in %llu ms", c->attempts,
                 bg_llm_error_name(e), (unsigned long long)delay);
        c->start_at = now + delay;
    } else if (c->provider == 0 && llm->nprov == 2) {
        bg_debug("llm: primary failed (%s), trying the fallback", bg_llm_error_name(e));
        c->provider = 1;
        c->start_at = now;
    } else {
        finish(c, e, status);
        return;
    }
    c->state = CS_WAIT;
    arm(c);
}

/* ---- the body of a transfer ------------------------------------------------------------------ */

/* Ends the attempt from inside a curl callback: conclude() runs when curl reports the transfer. */
static int stop_attempt(call_t *c, bg_llm_error_t e, int status, bool retriable, const char *why)
{
    c->att_err = e;
    c->att_status = status;
    c->att_retriable = retriable;
    (void)bg_strlcpy(c->detail, why, sizeof(c->detail));
    return STOP;
}

static uint64_t utf8_chars(const char *s, size_t len)
{
    uint64_t n = 0;
    for (size_t i = 0; i < len; i++)
        n += ((unsigned char)s[i] & 0xC0) != 0x80;
    return n;
}

static bool null_or_absent(const bg_json_t *v)
{
    return v == NULL || bg_json_type(v) == BG_JSON_NULL;
}

/* Reads the usage object of a chunk; false when it is not a usage object. */
static bool read_usage(call_t *c, const bg_json_t *u)
{
    int64_t p = 0, q = 0;
    if (!bg_json_is_object(u) || bg_json_get_int(u, "prompt_tokens", &p) != 0 ||
        bg_json_get_int(u, "completion_tokens", &q) != 0 || p < 0 || q < 0)
        return false;
    c->usage.prompt_tokens = (uint64_t)p;
    c->usage.completion_tokens = (uint64_t)q;
    c->usage_seen = true;
    return true;
}

/* Handles one chunk (a parsed data event). Returns 0 to read on, STOP to end the attempt. */
static int handle_chunk(call_t *c, const bg_json_t *root)
{
    const bg_json_t *err = bg_json_find(root, "error");
    if (!null_or_absent(err)) {
        const char *msg = NULL;
        if (bg_json_is_object(err) && bg_json_get_str(err, "message", &msg) == 0)
            return stop_attempt(c, BG_LLM_ERR_SERVER_ERROR, BG_ERR_UNAVAILABLE, true, msg);
        return stop_attempt(c, BG_LLM_ERR_SERVER_ERROR, BG_ERR_UNAVAILABLE, true,
                            "error event in the stream");
    }
    const bg_json_t *choices = bg_json_find(root, "choices");
    if (!bg_json_is_array(choices))
        return stop_attempt(c, BG_LLM_ERR_MALFORMED, BG_ERR_PROTOCOL, false,
                            "chunk without a choices array");
    const bg_json_t *usage = bg_json_find(root, "usage");
    if (!null_or_absent(usage) && !read_usage(c, usage))
        return stop_attempt(c, BG_LLM_ERR_MALFORMED, BG_ERR_PROTOCOL, false, "bad usage object");

    const char *text = NULL;
    size_t text_len = 0;
    for (size_t i = 0; i < bg_json_len(choices); i++) {
        const bg_json_t *ch = bg_json_at(choices, i);
        int64_t index = 0;
        if (!bg_json_is_object(ch))
            return stop_attempt(c, BG_LLM_ERR_MALFORMED, BG_ERR_PROTOCOL, false,
                                "choice is not an object");
        int rc = bg_json_get_int(ch, "index", &index);
        if (rc == BG_ERR_INVALID)
            return stop_attempt(c, BG_LLM_ERR_MALFORMED, BG_ERR_PROTOCOL, false,
                                "bad choice index");
        if (index != 0)
            continue; /* n is 1: other choices are not ours */
        const bg_json_t *delta = bg_json_find(ch, "delta");
        if (!null_or_absent(delta)) {
            if (!bg_json_is_object(delta))
                return stop_attempt(c, BG_LLM_ERR_MALFORMED, BG_ERR_PROTOCOL, false,
                                    "delta is not an object");
            rc = bg_json_get_strn(delta, "content", &text, &text_len);
            if (rc == BG_ERR_INVALID)
                return stop_attempt(c, BG_LLM_ERR_MALFORMED, BG_ERR_PROTOCOL, false,
                                    "content is not a string");
        }
        const char *fr = NULL;
        rc = bg_json_get_str(ch, "finish_reason", &fr);
        if (rc == BG_ERR_INVALID)
            return stop_attempt(c, BG_LLM_ERR_MALFORMED, BG_ERR_PROTOCOL, false,
                                "finish_reason is not a string");
        if (rc == 0) {
            (void)bg_strlcpy(c->finish_reason, fr, sizeof(c->finish_reason));
            c->finish_seen = true;
        }
    }

    uint64_t now = now_ms(c);
    if (text != NULL && text_len > 0) {
        c->chars += utf8_chars(text, text_len);
        if (!c->first_token) {
            c->first_token = true;
            c->ttft_ms = now - c->t_start;
        }
        if (!c->canceled && c->cb->on_delta != NULL) {
            c->delivered += text_len;
            c->cb->on_delta(c->ud, text, text_len);
            if (c->llm->closing)
                return STOP;
        }
    }
    if (c->first_token)
        c->progress_deadline = now + c->llm->cfg.idle_timeout_ms;
    if (c->canceled && c->usage_seen) {
        /* what the drain was for has come: no need to wait for [DONE] */
        c->done_seen = true;
        c->cut = true;
        return STOP;
    }
    arm(c);
    return 0;
}

static int on_event(void *ud, const bg_sse_event_t *ev)
{
    call_t *c = ud;
    if (c->done_seen)
        return 0; /* nothing after [DONE] counts */
    if (ev->event_len == 5 && memcmp(ev->event, "error", 5) == 0)
        return stop_attempt(c, BG_LLM_ERR_SERVER_ERROR, BG_ERR_UNAVAILABLE, true,
                            "error event in the stream");
    if (ev->data_len == 6 && memcmp(ev->data, "[DONE]", 6) == 0) {
        /* the call is over; the transfer is read to its end (the chunked body's last chunk
         * follows at once) so that the connection stays reusable for the next call, within
         * DONE_GRACE_MS */
        c->done_seen = true;
        c->progress_deadline = now_ms(c) + DONE_GRACE_MS;
        arm(c);
        return 0;
    }
    bg_json_limits_t lim = bg_json_default_limits;
    lim.max_bytes = SSE_MAX_DATA;
    bg_json_doc_t *doc = NULL;
    const char *desc = NULL;
    if (bg_json_parse(ev->data, ev->data_len, &lim, &doc, &desc, NULL) != 0)
        return stop_attempt(c, BG_LLM_ERR_MALFORMED, BG_ERR_PROTOCOL, false, "chunk is not JSON");
    const bg_json_t *root = bg_json_root(doc);
    int rc = bg_json_is_object(root) ? handle_chunk(c, root)
                                     : stop_attempt(c, BG_LLM_ERR_MALFORMED, BG_ERR_PROTOCOL, false,
                                                    "chunk is not an object");
    bg_json_doc_free(doc);
    return rc;
}

static size_t on_write(char *ptr, size_t size, size_t nmemb, void *ud)
{
    call_t *c = ud;
    size_t len = size * nmemb;
    if (c->llm->closing || c->att_err != BG_LLM_OK || c->cut)
        return 0;
    if (c->done_seen)
        return len; /* the rest of the body, read and dropped */
    if (c->http_status == 0)
        (void)curl_easy_getinfo(c->easy, CURLINFO_RESPONSE_CODE, &c->http_status);
    c->body_bytes += len;
    if (c->body_bytes > c->llm->cfg.max_response_bytes) {
        (void)stop_attempt(c, BG_LLM_ERR_MALFORMED, BG_ERR_TOO_LARGE, false,
                           "response over its size cap");
        return 0;
    }
    if (c->http_status < 200 || c->http_status > 299) {
        /* keep the start of an error body for its message; the rest is read and dropped */
        size_t room = c->errbody.max - c->errbody.len;
        if (bg_buf_append(&c->errbody, ptr, len < room ? len : room) != 0)
            return 0;
        return len;
    }
    int rc = bg_sse_feed(&c->sse, ptr, len);
    if (rc == BG_ERR_TOO_LARGE)
        (void)stop_attempt(c, BG_LLM_ERR_MALFORMED, BG_ERR_TOO_LARGE, false,
                           "stream line or event over its cap");
    return rc == 0 ? len : 0;
}

/* Header names are case-insensitive; returns the value after "name:" or NULL. */
static const char *header_value(const char *line, size_t len, const char *name, size_t *vlen)
{
    size_t n = strlen(name);
    if (len <= n || strncasecmp(line, name, n) != 0 || line[n] != ':')
        return NULL;
    const char *v = line + n + 1;
    const char *end = line + len;
    while (v < end && (*v == ' ' || *v == '\t'))
        v++;
    while (end > v && (end[-1] == '\r' || end[-1] == '\n' || end[-1] == ' '))
        end--;
    *vlen = (size_t)(end - v);
    return v;
}

static size_t on_header(char *buf, size_t size, size_t nmemb, void *ud)
{
    call_t *c = ud;
    size_t len = size * nmemb;
    if (len >= 5 && memcmp(buf, "HTTP/", 5) == 0) {
        /* a new response (after a 100 Continue, say): forget what the last one said */
        c->retry_after_ms = -1;
        c->retry_after_s = -1;
        c->http_status = 0;
        return len;
    }
    size_t vlen = 0;
    char tmp[64];
    const char *v = header_value(buf, len, "retry-after-ms", &vlen);
    if (v != NULL && vlen < sizeof(tmp)) {
        memcpy(tmp, v, vlen);
        tmp[vlen] = '\0';
        char *end = NULL;
        double ms = strtod(tmp, &end);
        if (end != tmp && *end == '\0' && ms >= 0 && isfinite(ms))
            c->retry_after_ms = ms;
        return len;
    }
    v = header_value(buf, len, "retry-after", &vlen);
    if (v != NULL && vlen < sizeof(tmp)) {
        memcpy(tmp, v, vlen);
        tmp[vlen] = '\0';
        char *end = NULL;
        long s = strtol(tmp, &end, 10);
        if (end != tmp && *end == '\0' && s >= 0) {
            c->retry_after_s = (double)s;
        } else {
            time_t when = curl_getdate(tmp, NULL);
            time_t now = time(NULL);
            if (when != (time_t)-1)
                c->retry_after_s = when > now ? (double)(when - now) : 0;
        }
    }
    return len;
}

/* ---- attempts -------------------------------------------------------------------------------- */

static int start_attempt(call_t *c)
{
    bg_llm_t *llm = c->llm;
    const provider_t *p = &llm->prov[c->provider];
    CURL *e = curl_easy_init();
    if (e == NULL)
        return BG_ERR_IO;
    c->easy = e;
    bg_sse_limits_t lim = {.max_line = SSE_MAX_LINE, .max_data = SSE_MAX_DATA};
    bg_sse_parser_init(&c->sse, &lim, on_event, c);
    bg_buf_init(&c->errbody, ERRBODY_MAX_BYTES);
    c->http_status = 0;
    c->retry_after_ms = -1;
    c->retry_after_s = -1;
    c->body_bytes = 0;
    c->finish_seen = false;
    c->done_seen = false;
    c->cut = false;
    c->att_err = BG_LLM_OK;
    c->att_status = 0;
    c->att_retriable = false;
    c->curl_err[0] = '\0';
    c->detail[0] = '\0';

    CURLcode rc = CURLE_OK;
#define SETOPT(opt, val)                                                                           \
    do {                                                                                           \
        if (rc == CURLE_OK)                                                                        \
            rc = curl_easy_setopt(e, opt, val);                                                    \
    } while (0)
    SETOPT(CURLOPT_URL, p->url);
    SETOPT(CURLOPT_HTTPHEADER, p->headers);
    SETOPT(CURLOPT_POST, 1L);
    SETOPT(CURLOPT_POSTFIELDS, c->body);
    SETOPT(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)c->body_len);
    SETOPT(CURLOPT_WRITEFUNCTION, on_write);
    SETOPT(CURLOPT_WRITEDATA, c);
    SETOPT(CURLOPT_HEADERFUNCTION, on_header);
    SETOPT(CURLOPT_HEADERDATA, c);
    SETOPT(CURLOPT_PRIVATE, c);
    SETOPT(CURLOPT_ERRORBUFFER, c->curl_err);
    SETOPT(CURLOPT_CONNECTTIMEOUT_MS, (long)llm->cfg.connect_timeout_ms);
    SETOPT(CURLOPT_NOSIGNAL, 1L);
    SETOPT(CURLOPT_TCP_KEEPALIVE, 1L);
    SETOPT(CURLOPT_PROTOCOLS_STR, "http,https");
    SETOPT(CURLOPT_FOLLOWLOCATION, 0L);
#undef SETOPT
    if (rc != CURLE_OK || curl_multi_add_handle(llm->multi, e) != CURLM_OK) {
        curl_easy_cleanup(e);
        c->easy = NULL;
        bg_sse_parser_dispose(&c->sse);
        bg_buf_dispose(&c->errbody);
        return BG_ERR_IO;
    }
    c->attempts++;
    c->state = CS_RUNNING;
    c->progress_deadline = now_ms(c) + llm->cfg.first_token_timeout_ms;
    arm(c);
    return 0;
}

/* Copies the provider's error message (from a JSON error body) into the detail, when there is one.
 */
static void error_detail(call_t *c)
{
    bg_json_doc_t *doc = NULL;
    const char *desc = NULL;
    snprintf(c->detail, sizeof(c->detail), "http %ld", c->http_status);
    if (c->errbody.len == 0 ||
        bg_json_parse(c->errbody.base, c->errbody.len, NULL, &doc, &desc, NULL) != 0)
        return;
    const bg_json_t *err = bg_json_find(bg_json_root(doc), "error");
    const char *msg = NULL;
    if (bg_json_is_object(err) && bg_json_get_str(err, "message", &msg) == 0)
        snprintf(c->detail, sizeof(c->detail), "http %ld: %s", c->http_status, msg);
    bg_json_doc_free(doc);
}

/* A transfer ended (curl says so): decide what it came to. */
static void transfer_done(call_t *c, CURLcode code)
{
    if (c->att_err != BG_LLM_OK) {
        conclude(c, c->att_err, c->att_status, c->att_retriable);
        return;
    }
    if (c->done_seen) {
        conclude(c, BG_LLM_OK, 0, false);
        return;
    }
    if (c->http_status == 0)
        (void)curl_easy_getinfo(c->easy, CURLINFO_RESPONSE_CODE, &c->http_status);
    long st = c->http_status;
    if (st == 0) {
        (void)bg_strlcpy(c->detail, c->curl_err[0] != '\0' ? c->curl_err : curl_easy_strerror(code),
                         sizeof(c->detail));
        switch (code) {
        case CURLE_OPERATION_TIMEDOUT: /* only the connect timeout is curl's */
            conclude(c, BG_LLM_ERR_TIMEOUT_CONNECT, BG_ERR_TIMEOUT, true);
            return;
        case CURLE_COULDNT_CONNECT:
        case CURLE_COULDNT_RESOLVE_HOST:
        case CURLE_COULDNT_RESOLVE_PROXY:
        case CURLE_SEND_ERROR:
        case CURLE_RECV_ERROR:
        case CURLE_GOT_NOTHING:
        case CURLE_PARTIAL_FILE:
        case CURLE_SSL_CONNECT_ERROR:
            conclude(c, BG_LLM_ERR_CONNECTION, BG_ERR_UNAVAILABLE, true);
            return;
        default:
            conclude(c, BG_LLM_ERR_CONNECTION, BG_ERR_UNAVAILABLE, false);
            return;
        }
    }
    if (st < 200 || st > 299) {
        error_detail(c);
        if (st == 429)
            conclude(c, BG_LLM_ERR_RATE_LIMITED, BG_ERR_RETRY, true);
        else if (st >= 500)
            conclude(c, BG_LLM_ERR_SERVER_ERROR, BG_ERR_UNAVAILABLE, true);
        else
            conclude(c, BG_LLM_ERR_CLIENT_ERROR, BG_ERR_INVALID, st == 408 || st == 409);
        return;
    }
    if (c->finish_seen) {
        conclude(c, BG_LLM_OK, 0, false);
        return;
    }
    /* 2xx, and the stream ended without [DONE] or a finish_reason: cut short. Before any token it
     * is a broken connection as far as the caller can tell, so it may be retried. */
    snprintf(c->detail, sizeof(c->detail), "stream ended early%s%s", code != CURLE_OK ? ": " : "",
             code != CURLE_OK ? curl_easy_strerror(code) : "");
    conclude(c, BG_LLM_ERR_CUT, BG_ERR_PROTOCOL, true);
}

static void check_multi_info(bg_llm_t *llm)
{
    CURLMsg *msg;
    int left = 0;
    /* once the client is closing, teardown() ends every call with BG_ERR_CLOSED instead */
    while (!llm->closing && (msg = curl_multi_info_read(llm->multi, &left)) != NULL) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        call_t *c = NULL;
        (void)curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&c);
        CURLcode code = msg->data.result;
        if (c != NULL && c->easy == msg->easy_handle)
            transfer_done(c, code);
    }
}

static void on_call_timer(uv_timer_t *t)
{
    call_t *c = t->data;
    bg_llm_t *llm = c->llm;
    if (c->state == CS_DONE || llm->closing)
        return;
    enter(llm);
    uint64_t now = now_ms(c);
    if (c->state == CS_WAIT) {
        if (c->canceled) {
            finish(c, BG_LLM_ERR_CANCELED, 0);
        } else if (now >= c->total_deadline) {
            finish(c, BG_LLM_ERR_TIMEOUT_TOTAL, BG_ERR_TIMEOUT);
        } else if (now >= c->start_at) {
            if (start_attempt(c) != 0) {
                (void)bg_strlcpy(c->detail, "could not start a transfer", sizeof(c->detail));
                finish(c, BG_LLM_ERR_CONNECTION, BG_ERR_IO);
            }
        } else {
            arm(c);
        }
    } else if (now >= c->total_deadline) {
        conclude(c, BG_LLM_ERR_TIMEOUT_TOTAL, BG_ERR_TIMEOUT, false);
    } else if (c->canceled && now >= c->drain_deadline) {
        conclude(c, BG_LLM_ERR_CANCELED, 0, false);
    } else if (c->done_seen && now >= c->progress_deadline) {
        conclude(c, BG_LLM_OK, 0, false); /* [DONE] came; the body did not end: let it go */
    } else if (!c->canceled && now >= c->progress_deadline) {
        conclude(c, c->first_token ? BG_LLM_ERR_TIMEOUT_IDLE : BG_LLM_ERR_TIMEOUT_FIRST_TOKEN,
                 BG_ERR_TIMEOUT, false);
    } else {
        arm(c);
    }
    leave(llm);
}

/* ---- public API ------------------------------------------------------------------------------ */

static int provider_init(provider_t *p, const char *base, const char *key)
{
    size_t n = strlen(base);
    while (n > 0 && base[n - 1] == '/')
        n--;
    if (n == 0 || (strncmp(base, "http://", 7) != 0 && strncmp(base, "https://", 8) != 0))
        return BG_ERR_CONFIG;
    p->url = bg_asprintf("%.*s/chat/completions", (int)n, base);
    struct curl_slist *h = NULL;
    const char *fixed[] = {"Content-Type: application/json", "Accept: text/event-stream",
                           "Expect:"};
    for (size_t i = 0; i < BG_ARRAY_SIZE(fixed); i++) {
        struct curl_slist *nh = curl_slist_append(h, fixed[i]);
        if (nh == NULL)
            bg_oom(0);
        h = nh;
    }
    if (bg_str_present(key)) {
        char *auth = bg_asprintf("Authorization: Bearer %s", key);
        struct curl_slist *nh = curl_slist_append(h, auth);
        explicit_bzero(auth, strlen(auth));
        free(auth);
        if (nh == NULL)
            bg_oom(0);
        h = nh;
    }
    p->headers = h;
    return 0;
}

static void provider_dispose(provider_t *p)
{
    free(p->url);
    p->url = NULL;
    for (struct curl_slist *h = p->headers; h != NULL; h = h->next)
        explicit_bzero(h->data, strlen(h->data)); /* the key must not linger in freed memory */
    curl_slist_free_all(p->headers);
    p->headers = NULL;
}

static uint32_t or_default(uint32_t v, uint32_t def)
{
    return v != 0 ? v : def;
}

int bg_llm_new(uv_loop_t *loop, const bg_llm_config_t *cfg, bg_llm_t **out)
{
    *out = NULL;
    if (cfg == NULL || cfg->base_url == NULL)
        return BG_ERR_CONFIG;
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
        return BG_ERR_IO;
    bg_llm_t *llm = bg_calloc(1, sizeof(*llm));
    llm->loop = loop;
    llm->cfg.connect_timeout_ms = or_default(cfg->connect_timeout_ms, 10000);
    llm->cfg.first_token_timeout_ms = or_default(cfg->first_token_timeout_ms, 60000);
    llm->cfg.idle_timeout_ms = or_default(cfg->idle_timeout_ms, 30000);
    llm->cfg.total_timeout_ms = or_default(cfg->total_timeout_ms, 600000);
    llm->cfg.max_retries = cfg->max_retries < 0 ? BG_LLM_DEFAULT_MAX_RETRIES : cfg->max_retries;
    llm->cfg.backoff_base_ms = or_default(cfg->backoff_base_ms, 500);
    llm->cfg.backoff_cap_ms = or_default(cfg->backoff_cap_ms, 8000);
    llm->cfg.retry_after_cap_ms = or_default(cfg->retry_after_cap_ms, 60000);
    llm->cfg.cancel_drain_ms = or_default(cfg->cancel_drain_ms, 30000);
    llm->cfg.max_response_bytes =
        cfg->max_response_bytes != 0 ? cfg->max_response_bytes : 8u * 1024u * 1024u;

    int rc = provider_init(&llm->prov[0], cfg->base_url, cfg->api_key);
    if (rc != 0)
        goto err_free;
    llm->nprov = 1;
    if (bg_str_present(cfg->fallback_base_url)) {
        rc = provider_init(&llm->prov[1], cfg->fallback_base_url, cfg->fallback_api_key);
        if (rc != 0)
            goto err_providers;
        llm->nprov = 2;
    }
    rc = BG_ERR_IO;
    llm->multi = curl_multi_init();
    if (llm->multi == NULL)
        goto err_providers;
    if (curl_multi_setopt(llm->multi, CURLMOPT_SOCKETFUNCTION, on_socket) != CURLM_OK ||
        curl_multi_setopt(llm->multi, CURLMOPT_SOCKETDATA, llm) != CURLM_OK ||
        curl_multi_setopt(llm->multi, CURLMOPT_TIMERFUNCTION, on_curl_timer) != CURLM_OK ||
        curl_multi_setopt(llm->multi, CURLMOPT_TIMERDATA, llm) != CURLM_OK)
        goto err_multi;
    if (uv_timer_init(loop, &llm->timer) != 0)
        goto err_multi;
    llm->timer.data = llm;
    llm->handles = 1;
    *out = llm;
    return 0;

err_multi:
    curl_multi_cleanup(llm->multi);
err_providers:
    for (int i = 0; i < 2; i++)
        provider_dispose(&llm->prov[i]);
err_free:
    free(llm);
    return rc;
}

static void on_timer_closed(uv_handle_t *h)
{
    release_handle(h->data);
}

static void teardown(bg_llm_t *llm)
{
    llm->torn_down = true;
    llm->depth++; /* on_done below may call into the client: keep leave() from recursing */
    while (llm->calls != NULL)
        finish(llm->calls, BG_LLM_ERR_CANCELED, BG_ERR_CLOSED);
    curl_multi_cleanup(llm->multi);
    llm->multi = NULL;
    while (llm->socks != NULL)
        close_sock(llm->socks);
    for (int i = 0; i < 2; i++)
        provider_dispose(&llm->prov[i]);
    llm->depth--;
    uv_timer_stop(&llm->timer);
    /* release_handle() frees the client when this last close callback has run */
    uv_close((uv_handle_t *)&llm->timer, on_timer_closed);
}

void bg_llm_free(bg_llm_t *llm)
{
    if (llm == NULL || llm->closing)
        return;
    llm->closing = true;
    if (llm->depth == 0)
        teardown(llm);
}

int bg_llm_stream(bg_llm_t *llm, const bg_llm_request_t *req, const bg_llm_callbacks_t *cb,
                  void *ud, bg_llm_call_t **out)
{
    if (out != NULL)
        *out = NULL;
    if (llm->closing)
        return BG_ERR_CLOSED;
    if (req == NULL || cb == NULL || cb->on_done == NULL || !bg_str_present(req->model) ||
        req->messages_json == NULL)
        return BG_ERR_INVALID;
    size_t mlen = req->messages_len != 0 ? req->messages_len : strlen(req->messages_json);
    bg_json_limits_t lim = bg_json_default_limits;
    lim.max_bytes = REQUEST_MAX_BYTES;
    lim.max_string = REQUEST_MAX_BYTES;
    bg_json_doc_t *doc = NULL;
    const char *desc = NULL;
    int rc = bg_json_parse(req->messages_json, mlen, &lim, &doc, &desc, NULL);
    if (rc != 0)
        return rc == BG_ERR_TOO_LARGE ? BG_ERR_TOO_LARGE : BG_ERR_INVALID;
    if (!bg_json_is_array(bg_json_root(doc)) || bg_json_len(bg_json_root(doc)) == 0) {
        bg_json_doc_free(doc);
        return BG_ERR_INVALID;
    }

    bg_buf_t body;
    bg_buf_init(&body, REQUEST_MAX_BYTES);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &body);
    bg_json_write_begin_object(&w);
    bg_json_write_field_str(&w, "model", req->model);
    bg_json_write_key(&w, "messages");
    bg_json_write_value(&w, bg_json_root(doc));
    bg_json_write_field_bool(&w, "stream", true);
    if (req->include_usage) {
        bg_json_write_key(&w, "stream_options");
        bg_json_write_begin_object(&w);
        bg_json_write_field_bool(&w, "include_usage", true);
        bg_json_write_end_object(&w);
    }
    if (req->temperature >= 0) {
        bg_json_write_key(&w, "temperature");
        bg_json_write_double(&w, req->temperature);
    }
    if (req->max_tokens > 0)
        bg_json_write_field_int(&w, "max_tokens", req->max_tokens);
    if (req->user != NULL)
        bg_json_write_field_str(&w, "user", req->user);
    bg_json_write_end_object(&w);
    rc = bg_json_write_finish(&w);
    bg_json_doc_free(doc);
    if (rc != 0) {
        bg_buf_dispose(&body);
        return rc == BG_ERR_TOO_LARGE ? BG_ERR_TOO_LARGE : BG_ERR_INVALID;
    }

    call_t *c = bg_calloc(1, sizeof(*c));
    c->llm = llm;
    c->cb = cb;
    c->ud = ud;
    c->body = bg_buf_steal(&body, &c->body_len);
    c->prompt_bytes = mlen;
    if (uv_timer_init(llm->loop, &c->timer) != 0) {
        free(c->body);
        free(c);
        return BG_ERR_IO;
    }
    c->timer.data = c;
    c->state = CS_WAIT;
    /* the loop may have been idle since its last call: its cached clock would date the call
     * (and its deadlines, its latency and time to first token) back to then */
    uv_update_time(llm->loop);
    c->t_start = uv_now(llm->loop);
    c->total_deadline = c->t_start + llm->cfg.total_timeout_ms;
    c->start_at = c->t_start;
    c->next = llm->calls;
    if (llm->calls != NULL)
        llm->calls->prev = c;
    llm->calls = c;
    arm(c);
    if (out != NULL)
        *out = c;
    return 0;
}

void bg_llm_cancel(bg_llm_call_t *call)
{
    if (call == NULL || call->state == CS_DONE || call->canceled)
        return;
    call->canceled = true;
    call->drain_deadline = now_ms(call) + call->llm->cfg.cancel_drain_ms;
    arm(call);
}

bool bg_llm_sent(const bg_llm_call_t *call)
{
    if (call == NULL || call->state != CS_RUNNING || call->easy == NULL)
        return false;
    long size = 0;
    return curl_easy_getinfo(call->easy, CURLINFO_REQUEST_SIZE, &size) == CURLE_OK && size > 0;
}

void bg_llm_abort(bg_llm_call_t *call)
{
    if (call == NULL || call->state == CS_DONE)
        return;
    /* a cancel without the drain: the deadline is now (shortening a cancel's drain, too) */
    call->canceled = true;
    call->drain_deadline = now_ms(call);
    arm(call);
}
