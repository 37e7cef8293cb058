/*
 * Job output (docs/streaming.md): the replayable stream of events one chat job produces, its
 * notification channel and its cancel flag. The llm worker writes here; the edge reads the same
 * keys (bg_jobout_key_*) to relay a job to its clients.
 *
 * Keys, all under the user's shard tag {s<N>} (N = bg_shard_of(user id, BG_SHARDS)):
 *   bg:{s<N>}:out:<job id>     the output stream; entries have the fields type and data, where
 *                              type is delta | reset | done | error and data a JSON text;
 *                              its TTL (BG_JOBOUT_TTL_S) is renewed on each write
 *   bg:{s<N>}:out              the shard's pub/sub channel; the message is the job id, published
 *                              after each append
 *   bg:{s<N>}:cancel:<job id>  set by the edge to ask the worker to stop the job
 *
 * Event data:
 *   delta  {"text": "…"}              text to append to what the client shows
 *   reset  {}                         a redelivered job starts over: drop what was shown
 *   done   {"message_id", "finish_reason", "model", "cached", "usage", "quota"}   the last event
 *          of a reply (message_id only when a message was stored: not for API jobs)
 *   error  {"code", "retryable"}      the last event of a failed job
 *
 * Deltas are batched by the writer (bg_jobout_batch_t): at most one append per
 * BG_JOBOUT_BATCH_MS, or sooner when BG_JOBOUT_BATCH_DELTAS pieces are waiting, so a fast provider
 * does not cost one Redis write and one notification per token.
 *
 * Every function uses the blocking client (bg/redis.h) and returns its transport errors
 * (BG_ERR_UNAVAILABLE, BG_ERR_TIMEOUT), or BG_ERR_PROTOCOL when Redis answers with an error.
 */
#ifndef BG_JOBOUT_H
#define BG_JOBOUT_H

#include "bg/buf.h"
#include "bg/common.h"
#include "bg/redis.h"

/** Seconds an output stream lives after its last write. */
#define BG_JOBOUT_TTL_S 3600
/** Longest wait between two delta appends while text is waiting. */
#define BG_JOBOUT_BATCH_MS 50
/** Pieces of text that make a delta append happen at once. */
#define BG_JOBOUT_BATCH_DELTAS 64
/** Longest job id the keys take (the rest of BG_REDIS_KEY_MAX is the prefix and the tag). */
#define BG_JOBOUT_JOB_ID_MAX 96

/** Event types. */
#define BG_JOBOUT_DELTA "delta"
#define BG_JOBOUT_RESET "reset"
#define BG_JOBOUT_DONE "done"
#define BG_JOBOUT_ERROR "error"

/** Writes the output stream key "bg:{s<shard>}:out:<job id>". Returns 0, or BG_ERR_INVALID for an
 *  empty or too long job id (out is then ""). */
BG_MUSTCHECK int bg_jobout_key_stream(char *out, size_t outlen, int shard, const char *job_id);
/** Writes the shard's notification channel "bg:{s<shard>}:out". Returns 0 or BG_ERR_TOO_LARGE. */
BG_MUSTCHECK int bg_jobout_key_channel(char *out, size_t outlen, int shard);
/** Writes the cancel flag key "bg:{s<shard>}:cancel:<job id>". Returns as bg_jobout_key_stream. */
BG_MUSTCHECK int bg_jobout_key_cancel(char *out, size_t outlen, int shard, const char *job_id);

/**
 * Appends one event (type, and data: a JSON text of data_len bytes, borrowed) to the job's output
 * stream, renews its TTL and publishes the job id on the shard's channel. entry_id (may be NULL;
 * BG_REDIS_KEY_MAX bytes) receives the new entry's id. Returns 0 or an error (see the top); an
 * error after the XADD leaves the event appended (a reader polling, or the next notification,
 * still finds it).
 */
BG_MUSTCHECK int bg_jobout_append(bg_redis_t *r, int shard, const char *job_id, const char *type,
                                  const char *data, size_t data_len, char *entry_id);

/** Appends an "error" event {"code": code, "retryable": retryable}. Returns as bg_jobout_append. */
BG_MUSTCHECK int bg_jobout_append_error(bg_redis_t *r, int shard, const char *job_id,
                                        const char *code, bool retryable);

/**
 * Finds the type of the job's last event: writes it into type (16 bytes; "" when the stream is
 * empty or gone). A job whose last event is "done" or "error" is over. Returns 0 or an error.
 */
BG_MUSTCHECK int bg_jobout_last_type(bg_redis_t *r, int shard, const char *job_id, char type[16]);

/** Sets *canceled to whether the job's cancel flag is set. Returns 0 or an error. */
BG_MUSTCHECK int bg_jobout_is_canceled(bg_redis_t *r, int shard, const char *job_id,
                                       bool *canceled);

/** Sets the job's cancel flag for ttl_s seconds (the edge's side; tests). Returns 0 or an error. */
BG_MUSTCHECK int bg_jobout_cancel(bg_redis_t *r, int shard, const char *job_id, int64_t ttl_s);

/** Text waiting to be appended as one delta. Embedded; _init/_dispose. */
typedef struct bg_jobout_batch {
    bg_buf_t text;          /**< the pieces since the last flush */
    size_t pieces;          /**< how many */
    uint64_t last_flush_ms; /**< monotonic ms of the last flush (or of init) */
} bg_jobout_batch_t;

/** Starts an empty batch. */
void bg_jobout_batch_init(bg_jobout_batch_t *b);
/** Frees the batch's text. */
void bg_jobout_batch_dispose(bg_jobout_batch_t *b);
/** Drops whatever is waiting (a job that starts over). */
void bg_jobout_batch_reset(bg_jobout_batch_t *b);

/**
 * Adds a piece of text (len bytes, borrowed). Returns true when the batch should be flushed now
 * (BG_JOBOUT_BATCH_DELTAS pieces are waiting).
 */
bool bg_jobout_batch_add(bg_jobout_batch_t *b, const char *text, size_t len);

/** Returns true when text is waiting and BG_JOBOUT_BATCH_MS passed since the last flush. */
bool bg_jobout_batch_is_due(const bg_jobout_batch_t *b, uint64_t now_ms);

/** Returns true when text is waiting. */
static inline bool bg_jobout_batch_has_text(const bg_jobout_batch_t *b)
{
    return b->pieces > 0;
}

/**
 * Appends what is waiting as one "delta" event and empties the batch; does nothing when nothing
 * waits. On error the text stays in the batch for the next flush. With canceled (may be NULL),
 * also reads the job's cancel flag in the same round trip (false when nothing was appended).
 * Returns as bg_jobout_append.
 */
BG_MUSTCHECK int bg_jobout_batch_flush(bg_jobout_batch_t *b, bg_redis_t *r, int shard,
                                       const char *job_id, bool *canceled);

#endif
