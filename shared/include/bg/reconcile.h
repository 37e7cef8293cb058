/*
 * The quota reconciler: compares every active user's Redis quota counter and admission state
 * with what Postgres says (the same computation as `bgctl quota show`), and reports drift as
 * Prometheus gauges and one warning log line per drifting user. It reports; it never fixes:
 * Redis is a cache of Postgres (DESIGN.md §3, §4) and the repair is `bgctl quota rebuild`, which
 * an operator runs knowing that requests in flight at that moment are not counted.
 *
 * Who is compared: every user with a live subscription (status other than canceled), in pages of
 * user ids. For each: the admission state compiled from Postgres now, and the requests that count
 * in the current quota window (usage records with status ok or canceled, as bg_policy_usage_count
 * counts them — the same requests the ledger debits one credit each for), against the Redis
 * admission hash (status, plan, q_limit) and quota hash (used, when its win is the current window).
 * A user drifts when the counters differ, the admission hash is missing while Postgres grants a
 * plan, or status, plan or limit differ.
 *
 * Requests settle in Postgres a moment before Redis (the usage worker records, then settles), so a
 * counter can differ for a few milliseconds during traffic. A user who drifts is therefore looked
 * at a second time after BG_RECONCILE_RECHECK_MS, and reported only when the second look drifts
 * too (with the second look's values).
 *
 * Running it. bg_reconciler_start() runs a pass every BG_RECONCILE_INTERVAL_S seconds on a thread
 * of bg-worker. One worker at a time across the deployment: a pass runs only after SET
 * bg:reconcile:lock <owner> NX PX <0.9 × interval> succeeds, and the lock is extended after every
 * page while the pass lasts, so with N workers there is about one pass per interval. The pass
 * stores its figures in the hash bg:reconcile:last; workers that did not get the lock read them and
 * export the same gauges, so every worker's /metrics shows the latest pass:
 *   bg_quota_drift_users, bg_quota_drift_requests, bg_quota_reconcile_checked_users,
 *   bg_quota_reconcile_errors, bg_quota_reconcile_last_run_timestamp_seconds.
 */
#ifndef BG_RECONCILE_H
#define BG_RECONCILE_H

#include <libpq-fe.h>
#include <stdatomic.h>

#include "bg/common.h"
#include "bg/config.h"
#include "bg/redis.h"

#define BG_RECONCILE_LOCK_KEY "bg:reconcile:lock"
#define BG_RECONCILE_RESULT_KEY "bg:reconcile:last"
/** Delay of the second look at a drifting user (see above). */
#define BG_RECONCILE_RECHECK_MS 250
/** Users per page of a pass (the lock is extended between pages). */
#define BG_RECONCILE_PAGE 200

/** One user compared. */
typedef struct bg_reconcile_user {
    char user_id[37];
    char pg_status[12], redis_status[12]; /**< redis_status "" when the hash is missing */
    char pg_plan[33], redis_plan[33];
    bool state_missing;            /**< Postgres grants a plan, Redis has no admission hash */
    int64_t pg_limit, redis_limit; /**< requests per window */
    int64_t pg_used, redis_used;   /**< requests counted in the current window */
    int64_t window_start_ms;       /**< the current window as Postgres computes it */
} bg_reconcile_user_t;

/**
 * Compares user_id at now_ms into *out (no second look). Returns 0, BG_ERR_NOT_FOUND for an
 * unknown user, a database error, or a Redis transport error.
 */
BG_MUSTCHECK int bg_reconcile_user(PGconn *c, bg_redis_t *r, int shards, const char *user_id,
                                   int64_t now_ms, bg_reconcile_user_t *out);

/** Returns true when the comparison shows drift (see above). */
bool bg_reconcile_user_drifts(const bg_reconcile_user_t *u);

/** Figures of one pass. */
typedef struct bg_reconcile_result {
    int64_t checked;        /**< users compared */
    int64_t drift_users;    /**< users reported as drifting */
    int64_t drift_requests; /**< sum over them of |Redis used − Postgres used| */
    int64_t errors;         /**< users that could not be compared */
    int64_t finished_ms;    /**< unix ms at the end of the pass */
} bg_reconcile_result_t;

/** How a pass runs. */
typedef struct bg_reconcile_opts {
    int shards;
    int64_t recheck_ms;      /**< delay of the second look; 0 reports the first look */
    const char *lock_token;  /**< NULL, or the lock's value: extended per page, lost → stop */
    int64_t lock_ttl_ms;     /**< with lock_token */
    const atomic_bool *stop; /**< NULL, or a flag that ends the pass between users */
} bg_reconcile_opts_t;

/**
 * Runs one pass over every user with a live subscription, logging one warning per drifting user
 * ("reconcile: quota drift user=… redis_used=… postgres_used=… …"). Returns 0 with *out filled,
 * BG_ERR_CONFLICT when the lock was lost, BG_ERR_CLOSED when stopped (out holds what was done),
 * or a database error when users cannot be listed.
 */
BG_MUSTCHECK int bg_reconcile_pass(PGconn *c, bg_redis_t *r, const bg_reconcile_opts_t *o,
                                   bg_reconcile_result_t *out);

/** Sets the gauges (registered on first use) to the figures of res. */
void bg_reconcile_publish(const bg_reconcile_result_t *res);

/** Stores res in bg:reconcile:last. Returns 0 or a Redis error. */
BG_MUSTCHECK int bg_reconcile_store(bg_redis_t *r, const bg_reconcile_result_t *res);

/** Reads bg:reconcile:last into *out. Returns 0, BG_ERR_NOT_FOUND when none, or a Redis error. */
BG_MUSTCHECK int bg_reconcile_load(bg_redis_t *r, bg_reconcile_result_t *out);

/**
 * Takes the lock (SET NX PX) with value token; *held says whether this call got it. Returns 0 or
 * a Redis error.
 */
BG_MUSTCHECK int bg_reconcile_lock(bg_redis_t *r, const char *token, int64_t ttl_ms, bool *held);

/**
 * Extends the lock to ttl_ms from now if it still holds token (one script); *held says whether it
 * did. Returns 0 or a Redis error.
 */
BG_MUSTCHECK int bg_reconcile_lock_extend(bg_redis_t *r, const char *token, int64_t ttl_ms,
                                          bool *held);

/** A running reconciler (a thread). */
typedef struct bg_reconciler bg_reconciler_t;

/**
 * Starts the reconciler of cfg (borrowed: must outlive it; BG_RECONCILE_INTERVAL_S,
 * BG_REDIS_URL, BG_REDIS_TIMEOUT_MS, BG_DATABASE_URL, BG_SHARDS) with owner (copied) as the
 * lock's value. The first pass comes one interval after the start. Returns 0 with *out owned
 * (NULL when the interval is 0: disabled), BG_ERR_INVALID for a bad Redis URL, or BG_ERR_IO when
 * the thread cannot start.
 */
BG_MUSTCHECK int bg_reconciler_start(const bg_config_t *cfg, const char *owner,
                                     bg_reconciler_t **out);

/** Stops the thread (a pass in progress ends after its current user) and frees; accepts NULL. */
void bg_reconciler_stop(bg_reconciler_t *rec);

#endif
