/*
 * The llm worker's conversation cache: what a turn needs of its conversation (its agent, the
 * user's name and the history before the turn's message, as bg_chat_context reads them), kept in
 * memory after a turn so that the next turn of the same conversation starts its provider call
 * without a Postgres read first.
 *
 * An entry is the conversation's state at one value of its write sequence (bg/convseq.h). A turn
 * uses it only when the sequence still has that value: nothing was stored in the conversation
 * since, by this process or any other. So the cache is never wrong about the history, and with
 * several worker processes each one's entries simply miss when another process took the last turn.
 * Two things the sequence does not cover are checked when the turn stores its message (which
 * returns the conversation's agent and the user's name): a renamed user, or a conversation that
 * changed agent, makes the turn start over from Postgres (role_llm.c).
 *
 * Bounded: a fixed number of slots (a conversation's slot is given by its id), entries idle for
 * longer than the TTL are not used, and the history bytes held in all are capped. Thread-safe;
 * every function copies in or out.
 */
#ifndef WK_CTX_CACHE_H
#define WK_CTX_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "bg/chat.h"

typedef struct wk_ctx_cache wk_ctx_cache_t;

/** A cache of `slots` entries holding at most bytes_max bytes of message text in all; an entry
 *  not used for ttl_ms is a miss. */
wk_ctx_cache_t *wk_ctx_cache_new(size_t slots, size_t bytes_max, uint64_t ttl_ms);
void wk_ctx_cache_free(wk_ctx_cache_t *cc);

/** On a hit (an entry of this conversation and user, at sequence seq) copies it into *out (to be
 *  disposed with bg_chat_context_dispose) and returns true; *out is left empty otherwise. */
bool wk_ctx_cache_get(wk_ctx_cache_t *cc, const char *conversation_id, const char *user_id,
                      int64_t seq, bg_chat_context_t *out);

/** Stores a copy of ctx as the conversation's state at sequence seq, in place of what its slot
 *  held. Too large for what is left of the byte cap: the slot is emptied instead. */
void wk_ctx_cache_put(wk_ctx_cache_t *cc, const char *conversation_id, const char *user_id,
                      int64_t seq, const bg_chat_context_t *ctx);

/** Forgets the conversation's entry, if it holds one. */
void wk_ctx_cache_drop(wk_ctx_cache_t *cc, const char *conversation_id);

/** Appends a copy of a complete message to a history. */
void wk_ctx_history_push(bg_chat_message_list_t *h, int64_t id, const char *role,
                         const char *content, size_t content_len);

/** Bounds a history as bg_chat_context does: its newest max_messages, then the newest of those
 *  whose contents add up to at most max_bytes (0: no byte bound). */
void wk_ctx_history_trim(bg_chat_message_list_t *h, size_t max_messages, size_t max_bytes);

#endif
