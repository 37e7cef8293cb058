/*
 * A conversation's write sequence in Redis: a number that moves whenever a message is stored in
 * the conversation, so that a copy of its history taken at one value is known to be the history
 * while the value has not moved (the llm worker's context cache, workers/ctx_cache.h).
 *
 * Key, under the conversation's user's shard tag {s<N>} (N = bg_shard_of(user id, BG_SHARDS)):
 *   bg:{s<N>}:convseq:<conversation id>   an integer; its TTL (BG_CONVSEQ_TTL_S) renewed on each
 *                                         bump
 *
 * The rule for writers: whoever stores a message in a conversation bumps its sequence after the
 * insert has committed (bg_convseq_bump), also when the message was there already (a job delivered
 * again), so that the value never stays put across a write. A reader that sees value v, then
 * finds v again later, knows that every message committed before the first read is in what it
 * read then, and that none was bumped since.
 *
 * A missing key (never written, expired, or lost with Redis) is unknown, never a value: the first
 * bump after it starts the sequence at a random point (SET NX), so a value seen before the loss is
 * not met again by chance.
 *
 * Every function uses the blocking client (bg/redis.h) and returns its transport errors
 * (BG_ERR_UNAVAILABLE, BG_ERR_TIMEOUT), or BG_ERR_PROTOCOL when Redis answers with an error.
 */
#ifndef BG_CONVSEQ_H
#define BG_CONVSEQ_H

#include <stdbool.h>
#include <stdint.h>

#include "bg/common.h"
#include "bg/redis.h"

/** Seconds a sequence lives after its last bump. */
#define BG_CONVSEQ_TTL_S 86400

/** Writes "bg:{s<shard>}:convseq:<conversation id>". Returns 0, or BG_ERR_INVALID for a
 *  conversation id that is not a UUID (out is then ""). */
BG_MUSTCHECK int bg_convseq_key(char *out, size_t outlen, int shard, const char *conversation_id);

/** Reads the sequence, first starting it at a random point (SET NX) when there is none, in the
 *  same round trip: a reader keeps what it reads under the value, so even a conversation's first
 *  turn has one. *known is false (and *seq 0) only when the reply was not a number. */
BG_MUSTCHECK int bg_convseq_read(bg_redis_t *r, int shard, const char *conversation_id,
                                 int64_t *seq, bool *known);

/** Moves the sequence on by one after a write (one round trip) and renews its TTL; *seq (may be
 *  NULL) gets the new value. */
BG_MUSTCHECK int bg_convseq_bump(bg_redis_t *r, int shard, const char *conversation_id,
                                 int64_t *seq);

#endif
