/*
 * The request pipeline: every request enters through edge_dispatch(), which gives it an id and a
 * locale, finds its route, enforces the route's body and media-type rules, and calls the handler.
 * The response helpers here are the only way handlers answer, so every response carries the request
 * id and the security headers, and every error has the one error body.
 *
 * Accounting happens when h2o disposes the request's pool (the request is over, whatever way it
 * ended): the in-flight count drops and the request counter and latency histogram are updated with
 * the final status.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "bg/err.h"
#include "bg/i18n.h"
#include "bg/id.h"
#include "bg/json.h"
#include "bg/log.h"
#include "bg/metrics.h"
#include "bg/timeutil.h"
#include "edge.h"
#include "openai.h"

static bg_metrics_counter_t *m_requests;
static bg_metrics_histogram_t *m_latency;

void edge_request_metrics_init(void);
void edge_request_metrics_init(void)
{
    static const char *const counter_labels[] = {"route", "method", "status", NULL};
    static const char *const hist_labels[] = {"route", NULL};
    m_requests = bg_metrics_counter("bg_http_requests_total",
                                    "HTTP requests by route, method and status", counter_labels);
    m_latency = bg_metrics_histogram("bg_http_request_duration_seconds",
                                     "Time from request start to the end of its response",
                                     hist_labels, NULL, 0);
}

void edge_req_ref(edge_req_t *er)
{
    er->refs++;
}

void edge_req_unref(edge_req_t *er)
{
    if (--er->refs > 0)
        return;
    if (er->data_free != NULL)
        er->data_free(er->data);
    bg_json_doc_free(er->body_doc);
    free(er);
}

/* Called by h2o when the request's pool goes away: the request is over. */
static void on_pool_dispose(void *p)
{
    edge_req_t *er = *(edge_req_t **)p;
    h2o_req_t *req = er->req;
    int status = req->res.status != 0 ? req->res.status : 499; /* 499: client went away first */
    char status_s[8];
    snprintf(status_s, sizeof(status_s), "%d", status);
    const char *route = er->route != NULL ? er->route->name : "unmatched";
    char method[16];
    snprintf(method, sizeof(method), "%.*s", (int)(req->method.len < 15 ? req->method.len : 15),
             req->method.base);
    const char *labels[] = {route, method, status_s};
    bg_metrics_counter_add(m_requests, labels, 1);
    const char *hlabels[] = {route};
    bg_metrics_histogram_observe(m_latency, hlabels,
                                 (double)((int64_t)bg_timeutil_mono_us() - er->start_us) / 1e6);
    if (status >= 500)
        bg_warn("%s %.*s -> %d (%s)", method, (int)req->path.len, req->path.base, status,
                er->request_id);
    else
        bg_debug("%s %.*s -> %d (%s)", method, (int)req->path.len, req->path.base, status,
                 er->request_id);
    atomic_fetch_sub(&er->thread->inflight, 1);
    er->req = NULL;
    edge_req_unref(er);
}

h2o_iovec_t edge_req_header(const edge_req_t *er, const char *name)
{
    if (er->req == NULL)
        return h2o_iovec_init(NULL, 0);
    ssize_t i = h2o_find_header_by_str(&er->req->headers, name, strlen(name), -1);
    if (i < 0)
        return h2o_iovec_init(NULL, 0);
    return er->req->headers.entries[i].value;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

bool edge_query(const edge_req_t *er, const char *name, char *out, size_t outlen)
{
    if (er->req == NULL || er->req->query_at == SIZE_MAX || outlen == 0)
        return false;
    const char *q = er->req->path.base + er->req->query_at + 1;
    const char *end = er->req->path.base + er->req->path.len;
    size_t nl = strlen(name);
    while (q < end) {
        const char *amp = memchr(q, '&', (size_t)(end - q));
        const char *stop = amp != NULL ? amp : end;
        const char *eq = memchr(q, '=', (size_t)(stop - q));
        const char *kend = eq != NULL ? eq : stop;
        if ((size_t)(kend - q) == nl && memcmp(q, name, nl) == 0) {
            size_t n = 0;
            for (const char *p = eq != NULL ? eq + 1 : stop; p < stop; p++) {
                char c = *p;
                if (c == '+') {
                    c = ' ';
                } else if (c == '%' && stop - p >= 3 && hexval(p[1]) >= 0 && hexval(p[2]) >= 0) {
                    c = (char)(hexval(p[1]) * 16 + hexval(p[2]));
                    p += 2;
                }
                if (n + 1 >= outlen || c == '\0')
                    return false;
                out[n++] = c;
            }
            out[n] = '\0';
            return true;
        }
        q = stop + 1;
    }
    return false;
}

bool edge_query_limit(edge_req_t *er, int max, int *limit)
{
    char v[16];
    if (!edge_query(er, "limit", v, sizeof(v)))
        return true;
    char *end;
    long n = strtol(v, &end, 10);
    if (end == v || *end != '\0' || n < 1 || n > max) {
        char maxs[16];
        snprintf(maxs, sizeof(maxs), "%d", max);
        const char *params[] = {"min", "1", "max", maxs, NULL};
        edge_invalid_field(er, "limit", "out_of_range", params);
        return false;
    }
    *limit = (int)n;
    return true;
}

void edge_add_header(edge_req_t *er, const char *name, const char *value)
{
    if (er->req == NULL)
        return;
    h2o_req_t *req = er->req;
    h2o_iovec_t v = h2o_strdup(&req->pool, value, SIZE_MAX);
    h2o_add_header_by_str(&req->pool, &req->res.headers, name, strlen(name), 1, NULL, v.base,
                          v.len);
}

/* A request id from the client (or a load balancer) is kept when it looks like one. */
static bool acceptable_request_id(h2o_iovec_t v)
{
    if (v.len < 8 || v.len > EDGE_REQUEST_ID_LEN)
        return false;
    for (size_t i = 0; i < v.len; i++) {
        char c = v.base[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_' || c == '.'))
            return false;
    }
    return true;
}

static void add_common_headers(edge_req_t *er)
{
    h2o_req_t *req = er->req;
    h2o_add_header_by_str(&req->pool, &req->res.headers, H2O_STRLIT("x-request-id"), 0, NULL,
                          er->request_id, strlen(er->request_id));
    h2o_add_header_by_str(&req->pool, &req->res.headers, H2O_STRLIT("x-content-type-options"), 0,
                          NULL, H2O_STRLIT("nosniff"));
}

void edge_respond(edge_req_t *er, int status, const char *content_type, const char *body,
                  size_t len)
{
    static h2o_generator_t generator = {NULL, NULL};
    h2o_req_t *req = er->req;
    if (req == NULL)
        return;
    if (er->auth.unconfirmed) {
        edge_auth_recheck(er); /* the answer comes from the handler's second run */
        return;
    }
    req->res.status = status;
    req->res.reason = "OK"; /* HTTP/1.1 reason phrases carry no meaning; h2 has none */
    add_common_headers(er);
    if (content_type != NULL)
        h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE, NULL, content_type,
                       strlen(content_type));
    req->res.content_length = len;
    h2o_iovec_t b = h2o_strdup(&req->pool, body != NULL ? body : "", len);
    h2o_start_response(req, &generator);
    h2o_send(req, &b, 1, H2O_SEND_STATE_FINAL);
}

void edge_respond_json(edge_req_t *er, int status, bg_buf_t *buf)
{
    edge_respond(er, status, "application/json; charset=utf-8", buf->base, buf->len);
    bg_buf_reset(buf);
}

bool edge_is_openai(const edge_req_t *er)
{
    if (er->req == NULL)
        return false;
    h2o_iovec_t p = er->req->path_normalized;
    return p.len >= 3 && memcmp(p.base, "/v1", 3) == 0 && (p.len == 3 || p.base[3] == '/');
}

/* The error of an OpenAI-compatible route, in OpenAI's shape (PROTOCOLS.md §3.5). */
static void openai_error(edge_req_t *er, const char *code, const char *message, int retry_after_s)
{
    edge_oai_error_map_t m = edge_oai_map_error(code);
    bg_buf_t body;
    bg_buf_init(&body, 16384);
    if (edge_oai_write_error(&body, message, m.type, er->err_param, m.code) != 0) {
        bg_buf_reset(&body);
        if (edge_oai_write_error(&body, "", m.type, NULL, m.code) != 0)
            bg_error("cannot render the error body of %s", code);
    }
    if (retry_after_s > 0) {
        char ra[16];
        snprintf(ra, sizeof(ra), "%d", retry_after_s);
        edge_add_header(er, "retry-after", ra);
    }
    /* OpenAI's clients retry 429 and 5xx unless told not to; waiting does not lift these */
    edge_add_header(er, "x-should-retry", m.no_retry ? "false" : "true");
    edge_add_header(er, "cache-control", "no-store");
    edge_respond_json(er, m.status, &body);
    bg_buf_dispose(&body);
}

void edge_error_msg(edge_req_t *er, const char *code, const char *message, const char *details_json,
                    int retry_after_s)
{
    if (edge_is_openai(er)) {
        openai_error(er, code, message, retry_after_s);
        return;
    }
    const bg_api_error_t *e = bg_api_error_find(code);
    if (e == NULL) {
        bg_error("unknown API error code \"%s\"", code);
        e = bg_api_error_find("internal");
    }
    bg_buf_t body;
    bg_buf_init(&body, 16384);
    if (message == NULL)
        message = "";
    int r = bg_buf_puts(&body, "{\"error\":{\"code\":");
    r |= bg_buf_json_str(&body, e->code, strlen(e->code));
    r |= bg_buf_puts(&body, ",\"message\":");
    r |= bg_buf_json_str(&body, message, strlen(message));
    r |= bg_buf_puts(&body, ",\"request_id\":");
    r |= bg_buf_json_str(&body, er->request_id, strlen(er->request_id));
    if (details_json != NULL) {
        r |= bg_buf_puts(&body, ",\"details\":");
        r |= bg_buf_puts(&body, details_json);
    }
    r |= bg_buf_puts(&body, "}}");
    if (r != 0) {
        /* only oversized details can get here: answer without them */
        bg_buf_reset(&body);
        if (bg_buf_printf(&body, "{\"error\":{\"code\":\"%s\",\"request_id\":\"%s\"}}", e->code,
                          er->request_id) != 0)
            bg_error("cannot render the error body of %s", e->code);
    }
    if (retry_after_s > 0) {
        char ra[16];
        snprintf(ra, sizeof(ra), "%d", retry_after_s);
        edge_add_header(er, "retry-after", ra);
    }
    edge_add_header(er, "cache-control", "no-store");
    edge_respond_json(er, e->status, &body);
    bg_buf_dispose(&body);
}

void edge_error(edge_req_t *er, const char *code, const char *details_json,
                const char *const params[], int retry_after_s)
{
    const bg_api_error_t *e = bg_api_error_find(code);
    char own_key[96];
    const char *key = e != NULL ? e->msg_key : "error.internal";
    if (e == NULL && edge_is_openai(er)) {
        /* codes of the OpenAI-compatible routes only (model_not_found, …) */
        snprintf(own_key, sizeof(own_key), "error.%s", code);
        key = own_key;
    }
    /* messages of 429 and 503 may name the wait: add it to the caller's parameters */
    const char *all[16];
    size_t n = 0;
    for (; params != NULL && params[n] != NULL && n < BG_ARRAY_SIZE(all) - 3; n++)
        all[n] = params[n];
    char ra[16];
    if (retry_after_s > 0) {
        snprintf(ra, sizeof(ra), "%d", retry_after_s);
        all[n++] = "retry_after";
        all[n++] = ra;
    }
    all[n] = NULL;
    bg_buf_t msg;
    bg_buf_init(&msg, 4096);
    if (bg_i18n_format(&msg, er->locale, key, all) != 0)
        bg_buf_reset(&msg);
    edge_error_msg(er, code, msg.base, details_json, retry_after_s);
    bg_buf_dispose(&msg);
}

/* ---- blocking work on the thread pool ---- */

typedef struct st_blocking {
    uv_work_t work;
    edge_req_t *er;
    edge_work_fn fn;
    edge_done_fn done;
    void *arg;
} blocking_t;

static void blocking_run(uv_work_t *w)
{
    blocking_t *b = w->data;
    b->fn(b->arg);
}

static void blocking_after(uv_work_t *w, int status)
{
    blocking_t *b = w->data;
    (void)status; /* UV_ECANCELED only at loop shutdown; done() still releases what arg holds */
    b->done(b->er, b->arg);
    edge_req_unref(b->er);
    free(b);
}

int edge_blocking(edge_req_t *er, edge_work_fn work, edge_done_fn done, void *arg)
{
    blocking_t *b = bg_calloc(1, sizeof(*b));
    b->er = er;
    b->fn = work;
    b->done = done;
    b->arg = arg;
    b->work.data = b;
    if (uv_queue_work(&er->thread->loop, &b->work, blocking_run, blocking_after) != 0) {
        free(b);
        return BG_ERR_UNAVAILABLE;
    }
    edge_req_ref(er);
    return 0;
}

/* ---- dispatch ---- */

static bool media_type_is_json(h2o_iovec_t ct)
{
    static const char json[] = "application/json";
    if (ct.len < sizeof(json) - 1 || strncasecmp(ct.base, json, sizeof(json) - 1) != 0)
        return false;
    return ct.len == sizeof(json) - 1 || ct.base[sizeof(json) - 1] == ';' ||
           ct.base[sizeof(json) - 1] == ' ';
}

static edge_thread_t *thread_of(h2o_req_t *req)
{
    return (edge_thread_t *)(void *)((char *)req->conn->ctx - offsetof(edge_thread_t, ctx));
}

/* Entry point of every request (registered as the only h2o handler, on "/"). */
int edge_dispatch(h2o_handler_t *self, h2o_req_t *req);
int edge_dispatch(h2o_handler_t *self, h2o_req_t *req)
{
    (void)self;
    edge_thread_t *thread = thread_of(req);
    edge_req_t *er = bg_calloc(1, sizeof(*er));
    er->req = req;
    er->thread = thread;
    er->refs = 1; /* held by the pool link below */
    er->start_us = (int64_t)bg_timeutil_mono_us();
    edge_req_t **link = h2o_mem_alloc_shared(&req->pool, sizeof(*link), on_pool_dispose);
    *link = er;
    atomic_fetch_add(&thread->inflight, 1);

    h2o_iovec_t rid = edge_req_header(er, "x-request-id");
    if (acceptable_request_id(rid))
        memcpy(er->request_id, rid.base, rid.len);
    else
        bg_id_request(er->request_id);

    h2o_iovec_t al = edge_req_header(er, "accept-language");
    char al_buf[256];
    snprintf(al_buf, sizeof(al_buf), "%.*s", (int)(al.len < 255 ? al.len : 255),
             al.base != NULL ? al.base : "");
    er->locale = bg_i18n_negotiate(NULL, al_buf);

    if (atomic_load(&thread->server->shutting_down) && thread->draining) {
        /* connections opened before the listeners closed can still send; tell them to go */
        edge_error(er, "shutting_down", NULL, NULL, 1);
        return 0;
    }

    if (edge_cors(er))
        return 0;

    bool method_mismatch;
    const char *path = req->path_normalized.base;
    size_t path_len = req->path_normalized.len;
    er->route = edge_router_match(req->method.base, req->method.len, path, path_len, er->params,
                                  &er->nparams, &method_mismatch);
    if (er->route == NULL) {
        edge_error(er, method_mismatch ? "method_not_allowed" : "not_found", NULL, NULL, 0);
        return 0;
    }
    size_t max_body = er->route->max_body != 0 ? er->route->max_body
                                               : (size_t)thread->server->cfg->max_body_bytes;
    if (req->entity.len > max_body) {
        char max_s[24], details[64];
        snprintf(max_s, sizeof(max_s), "%zu", max_body);
        snprintf(details, sizeof(details), "{\"max_bytes\":%zu}", max_body);
        const char *params[] = {"max_bytes", max_s, NULL};
        edge_error(er, "payload_too_large", details, params, 0);
        return 0;
    }
    if ((er->route->flags & EDGE_ROUTE_JSON) != 0 && req->entity.base != NULL &&
        !media_type_is_json(edge_req_header(er, "content-type"))) {
        edge_error(er, "unsupported_media_type", NULL, NULL, 0);
        return 0;
    }
    edge_auth_run(er);
    return 0;
}
