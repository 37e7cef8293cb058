/*
 * bg-edge internals shared by its files: the server (listeners, TLS, event loops), the per-request
 * context, the router and the response helpers.
 *
 * The edge runs one libuv event loop per thread (one per core by default), each with its own h2o
 * context and its own Redis connection; a request lives and dies on the loop that accepted it.
 * Blocking work (Postgres, password hashing) runs on libuv's thread pool through edge_blocking(),
 * and its completion comes back to the request's loop.
 *
 * A request handed to a route handler is wrapped in an edge_req_t. The edge_req_t outlives the h2o
 * request when asynchronous work is pending: when the client goes away, h2o frees the request's
 * pool and edge_req_t.req becomes NULL, so a completion that arrives later sees that and only
 * releases its reference.
 */
#ifndef EDGE_H
#define EDGE_H

#include <stdatomic.h>
#include <uv.h>

#include <h2o.h>

#include "bg/buf.h"
#include "bg/config.h"
#include "bg/redis_async.h"

#define EDGE_MAX_PARAMS 4
#define EDGE_REQUEST_ID_LEN 32

typedef struct st_edge_server edge_server_t;
typedef struct st_edge_thread edge_thread_t;
typedef struct st_edge_req edge_req_t;
typedef struct st_edge_route edge_route_t;

/** One event loop and everything bound to it. */
struct st_edge_thread {
    edge_server_t *server; /**< borrowed */
    int index;
    uv_thread_t tid;
    uv_loop_t loop;
    h2o_context_t ctx;
    h2o_accept_ctx_t accept_http;
    h2o_accept_ctx_t accept_https;
    uv_tcp_t listen_http;
    uv_tcp_t listen_https;
    bool has_https;
    uv_async_t wakeup;      /**< the main thread asks for shutdown through this */
    uv_timer_t drain_timer; /**< polls in-flight requests during shutdown */
    bool draining;
    bg_redis_async_t *redis; /**< owned; this loop's Redis connection */
    atomic_int inflight;     /**< requests whose pools are not yet disposed */
};

/** The process-wide server. */
struct st_edge_server {
    const bg_config_t *cfg; /**< borrowed; constant after start-up */
    h2o_globalconf_t globalconf;
    h2o_hostconf_t *hostconf;
    SSL_CTX *ssl_ctx; /**< NULL when the TLS listener is off */
    int fd_http;      /**< listening sockets, shared by every loop */
    int fd_https;
    edge_thread_t *threads; /**< owned array */
    int nthreads;
    atomic_bool shutting_down;
    atomic_bool force_stop;
    atomic_int stopped_loops;
    int64_t started_at_ms;
};

/** Per-request context, reference-counted (see the file comment). Touch only on its loop thread. */
struct st_edge_req {
    h2o_req_t *req;        /**< NULL once h2o disposed the request */
    edge_thread_t *thread; /**< borrowed */
    const edge_route_t *route;
    int refs;
    int64_t start_us;
    char request_id[EDGE_REQUEST_ID_LEN + 1];
    const char *locale;                  /**< negotiated locale (static string from i18n) */
    h2o_iovec_t params[EDGE_MAX_PARAMS]; /**< path parameters, pointing into req->path */
    size_t nparams;
    void *data; /**< handler state; freed by data_free when the last reference goes */
    void (*data_free)(void *data);
};

/* ---- router ---- */

enum {
    EDGE_ROUTE_JSON = 1 << 0, /**< a body, when present, must be application/json */
};

/** A route handler answers (or arranges to answer asynchronously) and returns 0. */
typedef void (*edge_handler_fn)(edge_req_t *er);

struct st_edge_route {
    const char *method;  /**< "GET", "POST", … */
    const char *pattern; /**< "/admin/users/{id}": {x} matches one non-empty segment */
    const char *name;    /**< metrics label; stable and low-cardinality */
    edge_handler_fn fn;
    unsigned flags;
    size_t max_body; /**< 0 = the global BG_MAX_BODY_BYTES */
};

/** The tables of route groups; each edge/routes_*.c defines one. NULL-pattern terminated. */
extern const edge_route_t edge_routes_ops[];

/**
 * Finds the route for method and path; fills params. Returns the route, or NULL with
 * *method_mismatch set when the path exists for another method (→ 405) and cleared when it does not
 * exist (→ 404).
 */
const edge_route_t *edge_router_match(const char *method, size_t method_len, const char *path,
                                      size_t path_len, h2o_iovec_t *params, size_t *nparams,
                                      bool *method_mismatch);

/* ---- server ---- */

/** Prepares listeners, TLS and h2o's configuration. Returns 0 or a negative bg_err (logged). */
BG_MUSTCHECK int edge_server_init(edge_server_t *s, const bg_config_t *cfg);
/** Starts the loops, blocks until SIGTERM/SIGINT and the drain, then returns the exit status. */
int edge_server_run(edge_server_t *s);
/** Releases what init took (after run returned). */
void edge_server_dispose(edge_server_t *s);

/* ---- requests and responses ---- */

/** Takes a reference (for asynchronous work that will come back to this request). */
void edge_req_ref(edge_req_t *er);
/** Drops a reference; the last one frees the context. */
void edge_req_unref(edge_req_t *er);

/** Returns a request header's value, or an empty iovec. */
h2o_iovec_t edge_req_header(const edge_req_t *er, const char *name);

/** Adds a response header (copied into the request's pool). */
void edge_add_header(edge_req_t *er, const char *name, const char *value);

/** Sends a complete response with the body copied. No-op when the request is gone. */
void edge_respond(edge_req_t *er, int status, const char *content_type, const char *body,
                  size_t len);

/** Sends a JSON body taken from buf (buf is reset). */
void edge_respond_json(edge_req_t *er, int status, bg_buf_t *buf);

/**
 * Sends the one error body of the API: code from the API error table, message from the catalogue
 * of the request's locale with params (name, value, …, NULL), optional details (a JSON object text
 * or NULL). 429 and 503 carry Retry-After from retry_after_s when > 0.
 */
void edge_error(edge_req_t *er, const char *code, const char *details_json,
                const char *const params[], int retry_after_s);

/* ---- blocking work ---- */

/** Work run on the thread pool: must not touch the request; reads and writes only its own arg. */
typedef void (*edge_work_fn)(void *arg);
/** Completion on the request's loop; er->req may be NULL when the client went away. */
typedef void (*edge_done_fn)(edge_req_t *er, void *arg);

/**
 * Runs work(arg) on the thread pool, then done(er, arg) on er's loop. Holds a reference on er until
 * done returns. Returns 0, or a negative bg_err (then neither function is called).
 */
BG_MUSTCHECK int edge_blocking(edge_req_t *er, edge_work_fn work, edge_done_fn done, void *arg);

/** The server of the current process (set by edge_server_init). */
extern edge_server_t *edge_the_server;

#endif
