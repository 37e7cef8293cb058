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

#include <libpq-fe.h>

#include "bg/admission.h"
#include "bg/buf.h"

#include "bg/config.h"
#include "bg/json.h"
#include "bg/jwt.h"
#include "bg/redis.h"
#include "bg/redis_async.h"

#define EDGE_MAX_PARAMS 4
#define EDGE_REQUEST_ID_LEN 32

typedef struct st_edge_server edge_server_t;
typedef struct st_edge_thread edge_thread_t;
typedef struct st_edge_req edge_req_t;
typedef struct st_edge_route edge_route_t;
typedef struct st_edge_relay edge_relay_t;

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
    edge_relay_t *relay;     /**< owned; this loop's job-output relay (sse_relay.c) */
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
    bg_jwt_ring_t *jwt; /**< owned; access-token keys */
    char **origins;     /**< owned; allowed browser origins (BG_CORS_ORIGINS or the public URL's) */
    size_t norigins;
};

/** How a request proved who it is. */
typedef enum edge_auth_mode {
    EDGE_AUTHN_NONE = 0,
    EDGE_AUTHN_BEARER, /**< Authorization: Bearer <access token> */
    EDGE_AUTHN_COOKIE  /**< the bg_at cookie (browser mode: CSRF rules apply) */
} edge_auth_mode_t;

/** The authenticated caller. */
typedef struct st_edge_auth {
    edge_auth_mode_t mode;
    char user_id[64];
    char session_id[64];
    char role[16];
    int shard;
    int64_t issued_ms; /**< when the access token was issued (unix ms) */
    /** the session's revocation state is not read yet: the route's admission script reads it
     * (EDGE_ROUTE_SESSION_IN_ADMISSION); any other answer is replaced by edge_auth_recheck's */
    bool unconfirmed;
    size_t headers_before; /**< response headers set before the handler ran (CORS, …) */
} edge_auth_t;

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
    edge_auth_t auth;
    char locale_buf[16]; /**< the user's own locale, when known */
    char err_param[72];  /**< the parameter an error is about (OpenAI's "param"), "" when none */
    void *body_doc;      /**< owned parsed body (bg_json_doc_t), freed with the context */
    void *data;          /**< handler state; freed by data_free when the last reference goes */
    void (*data_free)(void *data);
};

/* ---- router ---- */

enum {
    EDGE_ROUTE_JSON = 1 << 0, /**< a body, when present, must be application/json */
    /** a signed-in route whose admission script checks the session (bg_admission_req_t
     * session_id): the edge skips its own read of the session state, so the turn is one Redis
     * round trip; any other answer makes the edge read the session and run the handler again
     * (edge_auth_recheck), so it is as if the session had been read first. The handler must
     * have no effect before its admission */
    EDGE_ROUTE_SESSION_IN_ADMISSION = 1 << 1,
};

/** What a route requires of its caller (checked before the handler runs). */
typedef enum edge_route_auth {
    EDGE_PUBLIC = 0, /**< anyone */
    EDGE_USER,       /**< a signed-in user (access token, Bearer or cookie) */
    EDGE_ADMIN,      /**< a signed-in platform admin */
} edge_route_auth_t;

/** A route handler answers (or arranges to answer asynchronously) and returns 0. */
typedef void (*edge_handler_fn)(edge_req_t *er);

struct st_edge_route {
    const char *method;  /**< "GET", "POST", … */
    const char *pattern; /**< "/admin/users/{id}": {x} matches one non-empty segment */
    const char *name;    /**< metrics label; stable and low-cardinality */
    edge_handler_fn fn;
    unsigned flags;
    size_t max_body; /**< 0 = the global BG_MAX_BODY_BYTES */
    edge_route_auth_t auth;
};

/** Every route table the router serves, NULL-terminated (router.c). Tests walk it too. */
extern const edge_route_t *const edge_route_tables[];

/** The tables of route groups; each edge/routes_*.c defines one. NULL-pattern terminated. */
extern const edge_route_t edge_routes_ops[];
extern const edge_route_t edge_routes_auth[];
extern const edge_route_t edge_routes_orgs[];
extern const edge_route_t edge_routes_admin[];
extern const edge_route_t edge_routes_billing[];
extern const edge_route_t edge_routes_policies[];
extern const edge_route_t edge_routes_plans[];
extern const edge_route_t edge_routes_chat[];
extern const edge_route_t edge_routes_stream[];
extern const edge_route_t edge_routes_agents[];
extern const edge_route_t edge_routes_openai[];
extern const edge_route_t edge_routes_usage[];
/** GET /admin/stats (routes_admin_stats.c). */
extern const edge_route_t edge_routes_admin_stats[];
/** GET /admin/logs: the audit log and the request log (routes_admin_logs.c). */
extern const edge_route_t edge_routes_admin_logs[];
/** Paddle checkout, cancel, resume and the billing history (routes_billing_paddle.c). */
extern const edge_route_t edge_routes_checkout[];
/** POST /webhooks/paddle (routes_webhooks_paddle.c). */
extern const edge_route_t edge_routes_paddle[];
extern const edge_route_t edge_routes_telegram[];
/** GET /notifications, POST /notifications/read (routes_notifications.c). */
extern const edge_route_t edge_routes_notify[];
/** POST /auth/telegram/link-code (routes_link.c). */
extern const edge_route_t edge_routes_link[];
/**
 * The web client's pages and assets (routes_web.c). Not in edge_route_tables: the router tries it
 * only when no API route matches the path, and it is not part of the API contract.
 */
extern const edge_route_t edge_routes_web[];

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

/**
 * Copies the URL-decoded value of query parameter name into out (NUL-terminated). Returns true when
 * the parameter is present and fits (a value that does not fit counts as absent).
 */
bool edge_query(const edge_req_t *er, const char *name, char *out, size_t outlen);

/**
 * Reads the ?limit of a list route into *limit (left as the caller's default when absent). A
 * value that is not an integer from 1 to max is answered 422 (limit out_of_range, with min and
 * max) and returns false.
 */
bool edge_query_limit(edge_req_t *er, int max, int *limit);

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

/* ---- authentication, cookies, CORS, CSRF (auth.c) ---- */

/**
 * For a request whose session is not confirmed yet (er->auth.unconfirmed) that is about to be
 * answered otherwise than by admission: drops that answer, reads the session's state as for any
 * route, and answers 401 (revoked), 503 (Redis cannot answer) or runs the route's handler again
 * with the session confirmed and the user's locale known. edge_respond calls it.
 */
void edge_auth_recheck(edge_req_t *er);

/** Loads the key ring and the allowed origins. Returns 0 or BG_ERR_CONFIG (logged). */
BG_MUSTCHECK int edge_auth_init(edge_server_t *s);
/** Frees what edge_auth_init took. */
void edge_auth_dispose(edge_server_t *s);

/**
 * Applies CORS to the response (Vary: Origin always; Access-Control-Allow-* for allowed origins)
 * and answers preflight requests. Returns true when the request was answered (preflight or
 * refused).
 */
bool edge_cors(edge_req_t *er);

/**
 * Runs the route's checks that need the caller: for EDGE_USER/EDGE_ADMIN it verifies the access
 * token, asks Redis whether its session was revoked (and the user's locale), and applies the CSRF
 * rules of cookie mode; for any state-changing request it refuses a foreign Origin. Then calls the
 * route's handler, or answers with the error. Asynchronous (holds a reference on er meanwhile).
 */
void edge_auth_run(edge_req_t *er);

/** Returns true when a browser-mode request carries a valid CSRF token from an allowed Origin. */
bool edge_csrf_ok(const edge_req_t *er);

/** Returns the value of cookie name, or an empty iovec. */
h2o_iovec_t edge_cookie(const edge_req_t *er, const char *name);

/** Adds a Set-Cookie header (HttpOnly unless readable; Secure; SameSite as given; max_age_s 0 =
 * delete). */
void edge_set_cookie(edge_req_t *er, const char *name, const char *value, const char *path,
                     const char *same_site, int64_t max_age_s, bool http_only);

/** Returns true for methods that change state (POST, PUT, PATCH, DELETE). */
bool edge_is_state_changing(const edge_req_t *er);

/** The client's address as text (from the connection), written into out. */
void edge_peer_ip(const edge_req_t *er, char *out, size_t outlen);

/* ---- request bodies (body.c) ---- */

typedef enum edge_field_type {
    EDGE_F_STR,
    EDGE_F_INT,
    EDGE_F_BOOL,
    EDGE_F_STR_ARRAY /**< an array of strings, each checked like a string field */
} edge_field_type_t;
typedef enum edge_field_check {
    EDGE_CHECK_NONE,
    EDGE_CHECK_EMAIL,
    EDGE_CHECK_PASSWORD,
    EDGE_CHECK_LOCALE, /**< a supported locale */
    EDGE_CHECK_UUID,
} edge_field_check_t;

/** One field of a JSON object body. */
typedef struct st_edge_field {
    const char *name;
    edge_field_type_t type;
    bool required;
    size_t min_len, max_len; /**< characters (UTF-8 code points) for strings */
    edge_field_check_t check;
} edge_field_t;

#define EDGE_MAX_FIELDS 12

/** Parsed values, indexed like the field specs; strings point into the parsed document. */
typedef struct st_edge_values {
    bool present[EDGE_MAX_FIELDS];
    const char *str[EDGE_MAX_FIELDS];
    int64_t num[EDGE_MAX_FIELDS];
    bool flag[EDGE_MAX_FIELDS];
    const void *arr[EDGE_MAX_FIELDS]; /**< EDGE_F_STR_ARRAY: the bg_json_t array */
} edge_values_t;

/** Why a body was refused: an API error code and, for validation, the field and its problem. */
typedef struct st_edge_body_error {
    const char *code;   /**< "malformed_json", "payload_too_large", "validation_failed" */
    const char *field;  /**< the field at fault (validation) */
    const char *reason; /**< catalogue key suffix: "missing", "wrong_type", "unknown_field", … */
    size_t offset;      /**< malformed_json: byte offset */
    size_t limit;       /**< too_long / too_short: the bound */
} edge_body_error_t;

/**
 * Parses and validates a JSON object body against fields (pure: no request, no I/O; fuzzed).
 * Returns 0 with *doc owned by the caller (bg_json_doc_free) and values filled, or a negative
 * bg_err with *err describing the first problem. An empty body counts as {}.
 */
BG_MUSTCHECK int edge_body_validate(const char *body, size_t len, const edge_field_t *fields,
                                    size_t nfields, void **doc, edge_values_t *values,
                                    edge_body_error_t *err);

/**
 * edge_body_validate on the request's body; on failure answers with the localized error and returns
 * false. The document lives as long as the request context.
 */
bool edge_body(edge_req_t *er, const edge_field_t *fields, size_t nfields, edge_values_t *values);

/** Answers 422 validation_failed for one field with reason (a catalogue suffix) and params. */
void edge_invalid_field(edge_req_t *er, const char *field, const char *reason,
                        const char *const params[]);

/** Returns true for the OpenAI-compatible routes (/v1/…), whose errors take OpenAI's shape. */
bool edge_is_openai(const edge_req_t *er);

/** edge_error with a message already formatted (and localized) by the caller. */
void edge_error_msg(edge_req_t *er, const char *code, const char *message, const char *details_json,
                    int retry_after_s);

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

/* ---- handler helpers (handler.c) ---- */

/**
 * Answers a failed operation: BG_ERR_NOT_FOUND → 404, BG_ERR_DENIED → 403, BG_ERR_CONFLICT → 409,
 * Postgres or Redis unavailable, timed out or busy → 503 with Retry-After, anything else by
 * bg_api_error_code_for(). No-op when the request is gone.
 */
void edge_fail(edge_req_t *er, int rc);

/** Runs work on the thread pool with er->data as its argument, or answers 503. */
void edge_run(edge_req_t *er, edge_work_fn work, edge_done_fn done);

/** Finishes w (writing into out) and answers with it (500 if the writer failed); disposes out. */
void edge_respond_writer(edge_req_t *er, int status, bg_json_writer_t *w, bg_buf_t *out);

/**
 * On the pool: this thread's Postgres connection, or NULL with *rc = BG_ERR_UNAVAILABLE. With
 * admin_id, also requires that user to be a live, active platform admin (*rc = BG_ERR_DENIED).
 */
PGconn *edge_pg(const bg_config_t *cfg, const char *admin_id, int *rc);

/**
 * On the pool: this thread's blocking Redis client (bg/redis.h; made on first use, kept for the
 * thread's life), for work that writes Redis after Postgres (recompiling admission states), or
 * NULL when it cannot be made.
 */
bg_redis_t *edge_pool_redis(const bg_config_t *cfg);

/* ---- admission (admit.c) ---- */

/** Called with the admission script's decision (admitted or denied, never "no state"). */
typedef void (*edge_admit_cb)(edge_req_t *er, void *arg, const bg_admission_decision_t *d);

/**
 * Admits req (borrowed until cb: a retry sends it again) in one EVALSHA; a user with no compiled
 * admission state is compiled from Postgres and admitted once more. cb runs on er's loop while the
 * request is still there; otherwise (Redis or Postgres down: 503, the user gone: 401, the client
 * gone: nothing) the answer is given here and cb never runs.
 */
void edge_admit(edge_req_t *er, const bg_admission_req_t *req, edge_admit_cb cb, void *arg);

/** Adds the decision's x-ratelimit-* and x-quota-* headers (not Retry-After: edge_error adds it).
 */
void edge_admission_headers(edge_req_t *er, const bg_admission_decision_t *d);

/* ---- conversations' owners and agents (conv_cache.c) ---- */

#define EDGE_CONV_ID_SIZE 37 /* uuid text + NUL */

typedef enum {
    EDGE_CONV_UNKNOWN, /* not remembered (or lapsed): ask Postgres */
    EDGE_CONV_OWNED,   /* the user's: agent_id is filled */
    EDGE_CONV_FOREIGN, /* another user's: a 404 like a missing one */
} edge_conv_t;

/** What this process remembers of conv_id for user_id (any thread). */
edge_conv_t edge_conv_lookup(const char *conv_id, const char *user_id,
                             char agent_id[EDGE_CONV_ID_SIZE]);
/** Remembers a live conversation's owner and agent for a minute. */
void edge_conv_remember(const char *conv_id, const char *user_id, const char *agent_id);
/** Forgets conv_id (deleted through this process). */
void edge_conv_forget(const char *conv_id);

/* ---- job output relay (sse_relay.c) ---- */

/** Per-stream buffer cap: a client this far behind is disconnected (it can resume). */
#define EDGE_SSE_BUFFER_MAX (256u * 1024u)
/** Seconds between heartbeat comments on an idle stream. */
#define EDGE_SSE_HEARTBEAT_S 15

/**
 * Creates the relay of loop t: one pub/sub connection subscribed to the job-output channel of every
 * shard, and the map job id → the streams this loop serves. Call on t's thread or before it runs.
 * Returns the owned relay (never NULL: a bad Redis URL was refused at start-up).
 */
edge_relay_t *edge_relay_new(edge_thread_t *t);

/**
 * Ends every open stream of the loop after what it has already read (shutdown): clients resume on
 * another edge instance with Last-Event-ID. Accepts NULL.
 */
void edge_relay_drain(edge_relay_t *r);

/** Frees the relay and its subscriber; accepts NULL. Streams still open are left to h2o. */
void edge_relay_free(edge_relay_t *r);

/**
 * Answers er with 200 text/event-stream relaying the output stream of job_id (a UUID) in shard,
 * from after the entry last_id (NULL or "": from the start) until its done or error event.
 * Response headers added before the call are kept. The stream holds a reference on er until it
 * ends; a client that goes away ends it. No-op when the request is gone.
 */
void edge_sse_relay_start(edge_req_t *er, const char *job_id, int shard, const char *last_id);

/** How a sink starts a response: set status (non-zero) and the content type. */
typedef struct st_edge_relay_start {
    int status;
    const char *content_type; /**< static string */
} edge_relay_start_t;

/**
 * Another shape for a relayed job's output (the OpenAI-compatible API): the relay reads the job's
 * events as for edge_sse_relay_start() and hands each to the sink, which renders what the client
 * gets. The response starts only when the sink says so (so an error before any output can still
 * be an ordinary error response with its own status).
 */
typedef struct st_edge_relay_sink {
    /**
     * Renders one event (type delta|reset|done|error, data a JSON text of len bytes) into out. To
     * start the response, adds its headers to er (edge_add_header) and fills *start; sets *end when
     * the response ends after out. Returns 0, or BG_ERR_TOO_LARGE when out is full (the response
     * then ends).
     */
    int (*event)(void *ud, edge_req_t *er, const char *type, const char *data, size_t len,
                 bg_buf_t *out, edge_relay_start_t *start, bool *end);
    /** The response must end before the sink started it (shutdown, overflow): render how. */
    void (*abort)(void *ud, edge_req_t *er, bg_buf_t *out, edge_relay_start_t *start);
    /** Frees ud (called once, when the stream is freed); may be NULL. */
    void (*free)(void *ud);
} edge_relay_sink_t;

/**
 * Relays job_id's output (from its start) through sink; ud is the sink's state, owned by the
 * stream from here on (also when the request is already gone). Heartbeat comments are sent once
 * the response has started. No-op apart from freeing ud when the request is gone.
 */
void edge_relay_start_sink(edge_req_t *er, const char *job_id, int shard,
                           const edge_relay_sink_t *sink, void *ud);

/** Returns true when s is a stream entry id ("<ms>-<seq>", decimal). */
bool edge_sse_is_entry_id(const char *s);

/** The server of the current process (set by edge_server_init). */
extern edge_server_t *edge_the_server;

#endif
