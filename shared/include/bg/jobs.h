/*
 * Job streams: putting a job on the stream of a role, for the edge (async) and for workers and
 * bgctl (blocking).
 *
 * A job is one stream entry on bg:{s<N>}:q:<role>, the shard of the user it belongs to (so an
 * admission script can reserve and enqueue in one slot). Its first field is BG_JOBS_FIELD_ID, the
 * job id every effect of the job is made idempotent on (DESIGN.md §7); the others are the role's
 * own. Streams are trimmed on every XADD (MAXLEN ~ BG_STREAM_MAXLEN), which costs little because
 * Redis trims whole macro nodes only.
 */
#ifndef BG_JOBS_H
#define BG_JOBS_H

#include "bg/common.h"
#include "bg/redis.h"
#include "bg/redis_async.h"

/** Name of the field that carries the job id. */
#define BG_JOBS_FIELD_ID "job_id"
/** Longest stream entry id ("<ms>-<seq>") plus its NUL. */
#define BG_JOBS_ENTRY_ID_MAX 48
/** Most fields (name/value pairs) a job may carry besides its id. */
#define BG_JOBS_MAX_FIELDS 64

/** A job to enqueue; every pointer is borrowed for the duration of the call. */
typedef struct bg_job_spec {
    int shard;                 /**< in [0, BG_SHARDS) */
    const char *role;          /**< "llm", "telegram", … */
    const char *job_id;        /**< non-empty; idempotency key of the job's effects */
    size_t nfields;            /**< pairs in fields, at most BG_JOBS_MAX_FIELDS */
    const char *const *fields; /**< 2 * nfields strings: name, value, name, value, … */
    int64_t maxlen;            /**< approximate trim length of the stream (BG_STREAM_MAXLEN) */
} bg_job_spec_t;

/**
 * Appends the job to its stream. On 0 the new entry's id is written into entry_id (may be NULL; a
 * buffer of BG_JOBS_ENTRY_ID_MAX fits). Returns BG_ERR_INVALID for a bad spec, or the errors of
 * bg_redis_argv; BG_ERR_PROTOCOL when the server refuses the XADD.
 */
BG_MUSTCHECK int bg_jobs_enqueue(bg_redis_t *r, const bg_job_spec_t *job, char *entry_id,
                                 size_t entry_id_len);

/**
 * As bg_jobs_enqueue, on the loop of an asynchronous client: cb gets the XADD reply (the entry id
 * as a string reply, or an error reply). Returns as bg_redis_async_argv, or BG_ERR_INVALID.
 */
BG_MUSTCHECK int bg_jobs_enqueue_async(bg_redis_async_t *c, const bg_job_spec_t *job,
                                       bg_redis_async_cb cb, void *ud);

#endif
