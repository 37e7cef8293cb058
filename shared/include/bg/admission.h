/*
 * Admission control: one EVALSHA per chat request (lua/admit.lua) checks the user's plan, the
 * feature the route needs, the tokens cap, the rate limits (GCRA, the user's and the API key's),
 * the concurrency cap and the quota (requests, and tokens when a token quota applies), reserves
 * the quota and XADDs the job to the user's shard stream, all atomically; a denial writes nothing.
 * A second script (lua/settle.lua) turns a reservation into use or refunds it, once per job.
 *
 * State (DESIGN.md §3), all under the user's hash tag {s<N>}, N = bg_shard_of(user id, shards):
 *   bg:{s<N>}:adm:<uid>        config hash compiled from Postgres (status, plan, q_limit, w_anchor,
 *                              w_len, w_until, rpm, burst, conc, tok_cap, tq_limit, features)
 *   bg:{s<N>}:quota:<uid>      win, used, tused of the current window (reset lazily), tmax (a
 *                              bound on live reservations' tokens), and the rate limits' TATs (ms):
 *                              tat (the user's), tat:<api key id> (each key's)
 *   bg:{s<N>}:res:<uid>        live reservations, job id -> expiry ms (held = concurrency)
 *   bg:{s<N>}:resd:<uid>       job id -> "<window start>|<reserved tokens>"
 *   bg:{s<N>}:stl:<job id>     settled marker (a day)
 *   bg:{s<N>}:q:<role>         the job stream (bg/jobs.h)
 * Reservations expire (the caller's ttl) so a lost job cannot hold quota forever: past its expiry
 * a reservation stops counting at once and is removed by a later settle of the user's.
 *
 * Fail closed: every function here returns an error when Redis cannot answer, and the caller
 * answers 503 with Retry-After; there is no local fallback.
 */
#ifndef BG_ADMISSION_H
#define BG_ADMISSION_H

#include "bg/common.h"
#include "bg/jobs.h"
#include "bg/redis.h"
#include "bg/redis_async.h"

/** The scripts, as compiled in (bg_redis_script names). */
#define BG_ADMISSION_ADMIT_SCRIPT "lua/admit.lua"
#define BG_ADMISSION_SETTLE_SCRIPT "lua/settle.lua"

/** Most response headers bg_admission_headers writes. */
#define BG_ADMISSION_HEADERS_MAX 7
/** Size of a header value written by bg_admission_headers, NUL included. */
#define BG_ADMISSION_HEADER_VALUE_MAX 40

/** The keys of one user's admission state. */
typedef struct bg_admission_keys {
    int shard;
    char adm[BG_REDIS_KEY_MAX];
    char quota[BG_REDIS_KEY_MAX];
    char res[BG_REDIS_KEY_MAX];
    char resd[BG_REDIS_KEY_MAX];
} bg_admission_keys_t;

/** How long an admitted job's owner is recorded: as long as its output stream lives. */
#define BG_ADMISSION_OWNER_TTL_S 3600
#define BG_ADMISSION_OWNER_TTL_S_STR "3600"

/**
 * The key naming a job's owner, bg:{s<shard>}:job:<job id> (the owner's shard): its value is the
 * owner's user id while the job's output lives. Returns 0 or BG_ERR_INVALID.
 */
BG_MUSTCHECK int bg_admission_key_owner(char *out, size_t outlen, int shard, const char *job_id);

/**
 * Fills out with the keys of user_id (non-empty) in its shard among shards (≥ 1). Returns 0, or
 * BG_ERR_INVALID for a missing id or one too long for a key (out is then unusable).
 */
BG_MUSTCHECK int bg_admission_keys(bg_admission_keys_t *out, int shards, const char *user_id);

/** Writes the settled marker of a job, "bg:{s<shard>}:stl:<job id>". Returns 0 or BG_ERR_INVALID.
 */
BG_MUSTCHECK int bg_admission_key_marker(char *out, size_t outlen, int shard, const char *job_id);

/** What the admission script decided. */
typedef enum bg_admission_verdict {
    BG_ADMISSION_OK = 0,          /**< admitted: quota reserved, job enqueued */
    BG_ADMISSION_NO_STATE,        /**< no (usable) config hash: rebuild it from Postgres */
    BG_ADMISSION_NO_PLAN,         /**< no active or trialing plan, or the plan has ended */
    BG_ADMISSION_FEATURE,         /**< the plan lacks the feature the route needs */
    BG_ADMISSION_RATE_LIMITED,    /**< the user's or the API key's rate limit */
    BG_ADMISSION_CONCURRENCY,     /**< as many generations running as the plan allows */
    BG_ADMISSION_QUOTA_EXCEEDED,  /**< no requests (or tokens) left in the window */
    BG_ADMISSION_TOO_MANY_TOKENS, /**< max tokens asked above the plan's per-request cap */
    BG_ADMISSION_REVOKED, /**< the caller's session is revoked (checked when session_id is set) */
} bg_admission_verdict_t;

/** Returns the script's name of a verdict ("ok", "quota_exceeded", …); static. */
const char *bg_admission_verdict_name(bg_admission_verdict_t v);

/**
 * Returns the API error code (err.h table) a denial answers with: "service_unavailable" (503) for
 * no_state, "payment_required" (402), "feature_not_in_plan" (403), "rate_limited" (429, also for
 * concurrency), "quota_exceeded" (429), "validation_failed" (422, too many tokens),
 * "unauthorized" (401, a revoked session); NULL for ok.
 */
const char *bg_admission_error_code(bg_admission_verdict_t v);

/** The decision with the values of the response headers. */
typedef struct bg_admission_decision {
    bg_admission_verdict_t verdict;
    int64_t q_limit;        /**< requests per window; the quota fields are 0 for no_state/no_plan */
    int64_t q_remaining;    /**< requests left in the window, after this one when admitted */
    int64_t q_reset_ms;     /**< unix ms when the window ends (never after the plan's end) */
    int64_t rl_limit;       /**< rpm of the reported rate limit; 0 when none applies */
    int64_t rl_remaining;   /**< requests that may come at once now */
    int64_t rl_reset_ms;    /**< ms until the rate limit is fully replenished */
    int64_t retry_after_ms; /**< on a denial, ms after which trying again may pass; 0 when waiting
                               does not help (no plan, feature, tokens cap) */
    char entry_id[BG_JOBS_ENTRY_ID_MAX]; /**< the job's stream entry when admitted, else "" */
    char locale[16]; /**< the user's remembered locale when the session was checked, else "" */
} bg_admission_decision_t;

/** Returns the Retry-After seconds of a denial (retry_after_ms rounded up), 0 when none applies. */
int64_t bg_admission_retry_after_s(const bg_admission_decision_t *d);

/** One response header. */
typedef struct bg_admission_header {
    const char *name; /**< static, lower case */
    char value[BG_ADMISSION_HEADER_VALUE_MAX];
} bg_admission_header_t;

/**
 * Writes the response headers of a decision into out and returns how many (at most
 * BG_ADMISSION_HEADERS_MAX): x-ratelimit-limit-requests, x-ratelimit-remaining-requests,
 * x-ratelimit-reset-requests (a duration such as "250ms", "1.5s", "6m0s") when a rate limit
 * applies; x-quota-limit, x-quota-remaining, x-quota-reset (RFC 3339 UTC) when a plan applies;
 * retry-after (seconds) on a denial that waiting can lift.
 */
size_t bg_admission_headers(const bg_admission_decision_t *d,
                            bg_admission_header_t out[BG_ADMISSION_HEADERS_MAX]);

/** One request to admit; every pointer is borrowed for the duration of the call. */
typedef struct bg_admission_req {
    const char *user_id;    /**< non-empty */
    const char *api_key_id; /**< the API key the request came with, or NULL */
    int64_t key_rpm;        /**< the key's requests per minute; 0 = no key limit */
    int64_t key_burst;      /**< the key's burst (values below 1 count as 1) */
    const char *feature;    /**< the feature the route needs; NULL or "" for none */
    int64_t max_tokens;     /**< max tokens the request asks for; 0 = none given */
    const char *role;       /**< the stream the job goes to ("llm") */
    const char *job_id; /**< non-empty, unique; the key every effect of the job is made once on */
    size_t nfields;     /**< pairs in fields, at most BG_JOBS_MAX_FIELDS */
    const char *const *fields;  /**< 2 * nfields strings: name, value, …; job_id is added */
    int64_t reservation_ttl_ms; /**< > 0: after this the reservation lapses (a lost job) */
    int64_t stream_maxlen;      /**< approximate trim length of the stream (BG_STREAM_MAXLEN) */
    /** also record, in the same step, user_id as the job's owner (bg_admission_key_owner) for
     * BG_ADMISSION_OWNER_TTL_S: who may read the job's output and cancel it */
    bool record_owner;
    /** the caller's session, when the script is to check it (bg/authstate.h: revocation mark and
     * the user's not-before time) instead of the caller: first, so that a revoked session is
     * denied (BG_ADMISSION_REVOKED) before anything else and admits nothing; the decision then
     * also carries the user's remembered locale. NULL: the caller checked it (or has none) */
    const char *session_id;
    int64_t issued_ms; /**< with session_id: when its access token was issued (unix ms) */
} bg_admission_req_t;

/**
 * Admits one request with the blocking client, in one EVALSHA; shards is BG_SHARDS. Returns 0 with
 * the decision in *out (admitted or denied), BG_ERR_INVALID for a bad request, BG_ERR_PROTOCOL when
 * the server answers with an error or an unexpected reply, or the transport errors of
 * bg_redis_script (fail closed: answer 503). *out is zeroed on every error.
 */
BG_MUSTCHECK int bg_admission_admit(bg_redis_t *r, int shards, const bg_admission_req_t *req,
                                    bg_admission_decision_t *out);

/**
 * Callback of bg_admission_admit_async: err is 0 or an error as bg_admission_admit returns; d is
 * borrowed (valid during the callback only), non-NULL exactly when err is 0.
 */
typedef void (*bg_admission_cb)(void *ud, int err, const bg_admission_decision_t *d);

/**
 * As bg_admission_admit on the loop of an asynchronous client (the edge). Returns 0 and cb runs
 * exactly once later, or an error (BG_ERR_INVALID, or as bg_redis_async_script) and cb never runs.
 * req is copied; nothing of it needs to outlive the call.
 */
BG_MUSTCHECK int bg_admission_admit_async(bg_redis_async_t *c, int shards,
                                          const bg_admission_req_t *req, bg_admission_cb cb,
                                          void *ud);

/** How a job's reservation ends. */
typedef enum bg_admission_outcome {
    BG_ADMISSION_USE = 0, /**< the job ran: one request and its real tokens are used */
    BG_ADMISSION_REFUND,  /**< the job did not run (failed before the provider, cancelled) */
} bg_admission_outcome_t;

/** What a settle did. */
typedef enum bg_admission_settle_result {
    BG_ADMISSION_SETTLED = 0,      /**< the reservation was turned into use or refunded */
    BG_ADMISSION_SETTLE_DUPLICATE, /**< the job was settled before; nothing changed */
    BG_ADMISSION_SETTLE_UNKNOWN,   /**< no reservation of that job (lapsed and purged, refunding it)
                                    */
} bg_admission_settle_result_t;

/**
 * Settles the reservation of job_id of user_id (the usage worker calls it once the usage is
 * durable; repeating it is harmless). real_tokens ≥ 0. On 0, *result tells what happened and
 * *used_after (may be NULL) the requests used in the window the quota hash holds. Returns as
 * bg_admission_admit.
 */
BG_MUSTCHECK int bg_admission_settle(bg_redis_t *r, int shards, const char *user_id,
                                     const char *job_id, bg_admission_outcome_t outcome,
                                     int64_t real_tokens, bg_admission_settle_result_t *result,
                                     int64_t *used_after);

#endif
