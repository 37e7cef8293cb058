/*
 * Usage events: one per LLM request, emitted by the llm worker when the request ends and written to
 * Postgres exactly once by the usage worker (usage_records, unique request id), which also debits
 * the request credit in the ledger and settles the quota reservation (bg/admission.h).
 *
 * An event is a job on the stream of role "usage" in the user's shard, bg:{s<N>}:q:usage, with
 * these fields (all strings, as Redis stores them):
 *
 *   job_id            the request id (the llm job's id): the key of every effect, 1..200 bytes
 *   user_id           uuid
 *   organization_id   uuid, or empty
 *   agent_id          uuid, or empty
 *   channel           web | telegram | api
 *   model             the model that answered, ≤ 200 bytes (may be empty)
 *   prompt_tokens     integer 0 .. 2^31-1
 *   completion_tokens integer 0 .. 2^31-1
 *   token_source      provider | estimated
 *   latency_ms        integer 0 .. 2^31-1, or empty when unknown
 *   ttft_ms           integer 0 .. 2^31-1, or empty when unknown (no token came)
 *   status            ok | error | canceled | timeout
 *   error_class       [a-z0-9_.-]{0,64}; empty when none (ignored when status is ok; when the
 *                     status is not ok and it is empty, the status itself is recorded as the class)
 *   cache_hit         0 | 1
 *   outcome           use | refund (refund: the request failed before generating anything)
 *   occurred_at       unix ms when the request ended (> 0): the record's time, so the daily
 *                     rollup counts it on that day even when it is written later
 *
 * Unknown fields are ignored (a newer llm worker may add some); a missing or malformed known field
 * makes the event invalid (dead letters).
 *
 * Charging: a request is charged (one request credit debited, the reservation settled as used)
 * exactly when outcome is use and status is ok or canceled. Anything else is refunded, in the
 * ledger (nothing posted) and in Redis alike, so the two never disagree.
 */
#ifndef BG_USAGE_H
#define BG_USAGE_H

#include <libpq-fe.h>

#include "bg/admission.h"
#include "bg/buf.h"
#include "bg/common.h"
#include "bg/redis.h"

/** The role (and stream) of usage events. */
#define BG_USAGE_ROLE "usage"
/** Longest request id. */
#define BG_USAGE_REQUEST_ID_MAX 200
/** Longest model name. */
#define BG_USAGE_MODEL_MAX 200
/** Longest error class. */
#define BG_USAGE_ERROR_CLASS_MAX 64
/**
 * Approximate length the usage streams are trimmed at by bg_usage_emit. Far above any backlog
 * (a trimmed event would be lost usage), yet a bound.
 */
#define BG_USAGE_STREAM_MAXLEN 1000000

/** One usage event. Strings are borrowed (from the emitter, or from the job's fields). */
typedef struct bg_usage_event {
    const char *request_id;      /**< non-empty */
    const char *user_id;         /**< uuid */
    const char *organization_id; /**< uuid, or NULL for none */
    const char *agent_id;        /**< uuid, or NULL for none */
    const char *channel;         /**< "web", "telegram", "api" */
    const char *model;           /**< NULL is "" */
    int64_t prompt_tokens;
    int64_t completion_tokens;
    const char *token_source; /**< "provider", "estimated" */
    int64_t latency_ms;       /**< < 0 when unknown */
    int64_t ttft_ms;          /**< < 0 when unknown */
    const char *status;       /**< "ok", "error", "canceled", "timeout" */
    const char *error_class;  /**< NULL or "" when none */
    bool cache_hit;
    bg_admission_outcome_t outcome;
    int64_t occurred_at_ms; /**< unix ms, > 0 */
} bg_usage_event_t;

/**
 * Checks an event as the usage worker will. Returns 0, or BG_ERR_INVALID with *err_desc (may be
 * NULL; static text) naming the first bad field.
 */
BG_MUSTCHECK int bg_usage_event_check(const bg_usage_event_t *ev, const char **err_desc);

/**
 * Parses an event from the fields of a job (nfields pairs of names and values; job_id among them).
 * The strings of *out point into values (borrowed: valid as long as they are). Returns 0, or
 * BG_ERR_INVALID with *err_desc (may be NULL; static text) naming the missing or bad field.
 */
BG_MUSTCHECK int bg_usage_event_parse(size_t nfields, const char *const *names,
                                      const char *const *values, bg_usage_event_t *out,
                                      const char **err_desc);

/** Returns whether the event's request is charged (outcome use, status ok or canceled). */
bool bg_usage_event_is_charged(const bg_usage_event_t *ev);

/** Returns the error class to record: NULL for status ok, else the class or the status. */
const char *bg_usage_event_error_class(const bg_usage_event_t *ev);

/**
 * Enqueues the event on the usage stream of its user's shard among shards (BG_SHARDS), with the
 * blocking client. Returns 0; BG_ERR_INVALID for an event bg_usage_event_check() refuses; or an
 * error of bg_jobs_enqueue (Redis down: the caller retries, the llm job stays unacknowledged).
 */
BG_MUSTCHECK int bg_usage_emit(bg_redis_t *r, int shards, const bg_usage_event_t *ev);

/**
 * A user's usage in [from_ms, to_ms) from usage_records, appended to out as the JSON members
 * "totals" {requests, requests_charged, prompt_tokens, completion_tokens, cache_hits}, "by_day"
 * [{date (UTC), requests, requests_charged, tokens}] by date, "by_agent" [{agent_id, name, slug,
 * requests, requests_charged, tokens}] most used first, and "by_channel" [{channel, requests,
 * requests_charged, tokens}] (no braces: the caller wraps them). One statement on the connection
 * c (blocking libpq). Returns 0, BG_ERR_INVALID for a malformed user id or range, or a database
 * error.
 */
BG_MUSTCHECK int bg_usage_summary(PGconn *c, const char *user_id, int64_t from_ms, int64_t to_ms,
                                  bg_buf_t *out);

#endif
