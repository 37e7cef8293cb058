/*
 * The consumer-group runtime of bg-worker: reads the job streams of its roles, runs their handlers
 * on a pool of threads, acknowledges, retries, reclaims and dead-letters.
 *
 * Streams and groups (DESIGN.md §3): a role's jobs are on bg:{s<N>}:q:<role> for every shard N;
 * each role is one consumer group (named after the role) over all those streams, so any number of
 * worker processes share the work. A process is one consumer, named "<host>:<pid>".
 *
 * Delivery is at least once. A job is acknowledged (XACK) only after its handler returned 0; a
 * handler that fails transiently, a worker that crashes or is killed, leaves the job pending, and
 * once it has been idle for BG_CLAIM_IDLE_MS any worker claims it again (XAUTOCLAIM). While a
 * handler runs, its process keeps its jobs fresh (XCLAIM … JUSTID, which does not count as a
 * delivery), so a slow job is not taken over by another worker. A job delivered BG_MAX_DELIVERIES
 * times, or rejected as permanently invalid, moves to the shard's dead-letter stream
 * bg:{s<N>}:dlq:<role> with its fields plus dlq_role, dlq_id, dlq_deliveries and dlq_error, where
 * `bgctl dlq` can list and replay it. Claiming and dead-lettering are one Lua script
 * (lua/worker_reclaim.lua), so two workers never both do it.
 *
 * Shutdown: after wk_runtime_stop() the runtime stops reading and claiming, lets the jobs already
 * running finish within BG_SHUTDOWN_GRACE_MS, and leaves every job not finished pending for
 * another worker.
 */
#ifndef WK_RUNTIME_H
#define WK_RUNTIME_H

#include "bg/buf.h"
#include "bg/config.h"
#include "bg/redis.h"

/** Most roles one process runs. */
#define WK_MAX_ROLES 16

/** One job handed to a handler. Every pointer is borrowed for the duration of the call. */
typedef struct wk_job {
    const char *role;   /**< the role (and group) name */
    int shard;          /**< the shard whose stream holds the job */
    const char *id;     /**< the stream entry id ("1700000000000-0") */
    const char *job_id; /**< the job_id field (the entry id when the job has none) */
    size_t nfields;     /**< field pairs below, job_id included */
    const char *const *names;
    const char *const *values;
    int64_t deliveries;  /**< 1 on the first delivery; grows with every claim */
    bg_redis_t *redis;   /**< this handler thread's own Redis connection */
    void **thread_state; /**< this thread's slot for this role (NULL at first); see wk_role_t */
    char error[256];     /**< the handler may describe a failure here; kept as the last error */
} wk_job_t;

/** Returns the value of a field of the job, or NULL. */
const char *wk_job_field(const wk_job_t *job, const char *name);

/**
 * A handler runs one job and returns:
 *   - 0 when the job's effect is durable (committed to Postgres, …): the job is acknowledged;
 *   - BG_ERR_INVALID when the job can never succeed (malformed): it goes to the dead letters now;
 *   - any other negative bg_err (BG_ERR_RETRY, BG_ERR_UNAVAILABLE, …) for a transient failure: the
 *     job stays pending and is delivered again after BG_CLAIM_IDLE_MS, up to BG_MAX_DELIVERIES.
 *
 * Handlers MUST be idempotent per job id (job->job_id): the same job may run more than once, after
 * a crash between the effect and the acknowledgement, after a claim by another worker, or
 * concurrently in two processes in rare cases. Make the effect conditional on the job id (a unique
 * key and INSERT … ON CONFLICT DO NOTHING in the same transaction, SET NX in Redis).
 *
 * Handlers of one role run on several threads at once with the same ud: shared state must be
 * thread-safe. Per-thread state (a Postgres connection) goes into *job->thread_state.
 */
typedef int (*wk_handler_fn)(wk_job_t *job, void *ud);

/** A role: a name and a handler, plus optional set-up and tear-down. */
typedef struct wk_role {
    const char *name;      /**< stream and group name: [a-z0-9_-]+ */
    wk_handler_fn handler; /**< required */
    /** Called once at start (may be NULL). Returns 0 and the role's state in *ud, or an error
     *  (the worker does not start). */
    int (*init)(const bg_config_t *cfg, void **ud);
    /** Frees the state made by init (may be NULL). */
    void (*dispose)(void *ud);
    /** Frees a thread's *thread_state when the thread ends (may be NULL; called only when it is
     *  not NULL). */
    void (*thread_dispose)(void *thread_state, void *ud);
    /** Called once on each handler thread before it takes its first job (may be NULL): opens
     *  what the thread's first job would otherwise open (its Postgres connection, a client), so
     *  that the first jobs after a start or a scale-up do not pay for it. It may leave state in
     *  *thread_state as the handler would. A failure is no error: the job opens it again. */
    void (*thread_warm)(void **thread_state, void *ud);
} wk_role_t;

/** Counters of one role, since start. */
typedef struct wk_role_metrics {
    const char *role;       /**< borrowed from the role */
    uint64_t processed;     /**< handler returned 0 */
    uint64_t failed;        /**< handler returned an error */
    uint64_t dead_lettered; /**< moved to the dead letters by this process */
    uint64_t claimed;       /**< taken over from another consumer (or from ourselves) */
} wk_role_metrics_t;

/** A snapshot of the runtime's counters. */
typedef struct wk_metrics {
    size_t nroles;
    wk_role_metrics_t roles[WK_MAX_ROLES];
    int64_t in_flight; /**< handlers running now */
    int64_t queued;    /**< jobs read but not started */
    bool redis_up;     /**< the last Redis call of the readers succeeded */
} wk_metrics_t;

typedef struct wk_runtime wk_runtime_t;

/**
 * Creates a runtime for roles (borrowed: roles[i] must outlive the runtime; nroles may be 0) with
 * the settings of cfg (borrowed, likewise): BG_REDIS_URL, BG_REDIS_TIMEOUT_MS, BG_SHARDS,
 * BG_WORKER_CONCURRENCY, BG_CLAIM_IDLE_MS, BG_MAX_DELIVERIES, BG_STREAM_MAXLEN,
 * BG_SHUTDOWN_GRACE_MS. Calls each role's init. Returns 0 and an owned runtime, BG_ERR_INVALID for
 * a bad role (name, duplicate, too many), or the error of a role's init.
 */
BG_MUSTCHECK int wk_runtime_new(const bg_config_t *cfg, const wk_role_t *const *roles,
                                size_t nroles, wk_runtime_t **out);

/**
 * Runs until wk_runtime_stop(): starts the reader, reclaim and handler threads, then shuts down as
 * described at the top. Redis being unreachable is not an error: the threads log it and retry with
 * backoff. Returns 0 after a clean shutdown, or BG_ERR_TIMEOUT when jobs were still running when
 * the grace period ended (their threads are abandoned: exit the process soon).
 */
BG_MUSTCHECK int wk_runtime_run(wk_runtime_t *rt);

/** Asks wk_runtime_run to shut down. Async-signal-safe; may be called from any thread. */
void wk_runtime_stop(wk_runtime_t *rt);

/** Frees the runtime after wk_runtime_run returned 0 (or was never called); accepts NULL. */
void wk_runtime_free(wk_runtime_t *rt);

/** The consumer name of this process ("host:pid"), borrowed. */
const char *wk_runtime_consumer(const wk_runtime_t *rt);

/** Copies the counters into out. Thread-safe. */
void wk_runtime_metrics(const wk_runtime_t *rt, wk_metrics_t *out);

/**
 * Appends the process's metrics registry (bg/metrics.h) in the Prometheus text format to out, after
 * refreshing the runtime's gauges. The runtime's families: bg_worker_jobs_processed_total,
 * bg_worker_jobs_failed_total, bg_worker_jobs_dead_lettered_total, bg_worker_jobs_claimed_total,
 * bg_worker_jobs_pending, bg_worker_dead_letters (label role; pending and dead letters are totals
 * over all shards, refreshed by each reclaim pass), bg_worker_job_duration_seconds (labels role,
 * outcome = ok|retry|invalid), bg_worker_jobs_in_flight, bg_worker_jobs_queued,
 * bg_worker_redis_up. Returns 0 or BG_ERR_TOO_LARGE.
 */
BG_MUSTCHECK int wk_runtime_metrics_text(const wk_runtime_t *rt, bg_buf_t *out);

#endif
