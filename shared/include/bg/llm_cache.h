/*
 * The two caches of the llm path (docs/streaming.md).
 *
 * Response cache, in Redis. A reply is a function of the model, the rendered messages and the
 * sampling parameters only when sampling is off: temperature 0. For an agent that allows it
 * (agents.cache_enabled, cache_ttl_s) such a complete reply is stored under
 *
 *   bg:cache:llm:<sha256 hex>     a JSON text {"text","finish_reason","prompt_tokens",
 *                                 "completion_tokens","token_source"}, EX = the agent's TTL
 *
 * where the digest covers a version tag, the model, max_tokens, temperature and the messages JSON
 * exactly as sent to the provider. The key has no shard tag on purpose: it belongs to no user
 * (two users whose rendered prompts are byte for byte the same get the same reply), and a single
 * GET or SET needs no slot of its own. A cache that cannot answer is a miss, never an error: the
 * provider is the truth.
 *
 * Definition cache, in process memory. Every turn needs its agent row and the prompt version the
 * agent uses; both are read from Postgres on a miss and kept here:
 * - an agent, with the version number it resolved to (its pin, or its prompt's current version),
 *   for ttl_ms: an admin's change shows within that time;
 * - a prompt version, parsed, keyed by (prompt id, version): versions are immutable, so they are
 *   kept until pushed out by another.
 * Both are fixed-size, direct-mapped tables (a slot per hash; a colliding entry replaces the one
 * there) under one mutex, so memory is bounded and there is nothing to sweep. Parsed prompts are
 * reference counted: a version pushed out while a thread renders with it lives until that thread
 * lets go. All functions are thread-safe.
 */
#ifndef BG_LLM_CACHE_H
#define BG_LLM_CACHE_H

#include <libpq-fe.h>

#include "bg/agents.h"
#include "bg/common.h"
#include "bg/prompt.h"
#include "bg/redis.h"

/** Prefix of response cache keys. */
#define BG_LLM_CACHE_PREFIX "bg:cache:llm:"
/** Size of a response cache key: the prefix, 64 hex digits and a NUL. */
#define BG_LLM_CACHE_KEY_SIZE (sizeof(BG_LLM_CACHE_PREFIX) + 64)
/** Longest cached reply text, bytes (larger replies are not cached). */
#define BG_LLM_CACHE_TEXT_MAX (1024u * 1024u)

/* ---- response cache ---- */

/**
 * Returns whether a request may be answered from (and stored in) the response cache: the agent
 * allows it (enabled, ttl_s > 0) and the temperature sent is exactly 0.
 */
bool bg_llm_cache_is_cacheable(bool enabled, int ttl_s, double temperature);

/**
 * Writes the response cache key of a request into key: model (borrowed, not NULL), messages
 * (messages_len bytes of the JSON array sent to the provider), max_tokens (0: not sent) and
 * temperature.
 */
void bg_llm_cache_key(char key[BG_LLM_CACHE_KEY_SIZE], const char *model, const char *messages,
                      size_t messages_len, int64_t max_tokens, double temperature);

/** A cached reply. */
typedef struct bg_llm_cached {
    char *text; /**< owned (NUL-terminated), text_len bytes; NULL for an empty value */
    size_t text_len;
    char finish_reason[16]; /**< "stop" or "length" */
    int64_t prompt_tokens;
    int64_t completion_tokens;
    char token_source[16]; /**< "provider" or "estimated" */
} bg_llm_cached_t;

/** Frees what a cached reply owns; accepts NULL; the struct may be reused. */
void bg_llm_cached_dispose(bg_llm_cached_t *v);

/**
 * Looks key up. Returns 0 with *found, and *out filled (dispose it) when found. A value that does
 * not parse, or has the wrong shape, is a miss (and is deleted). Returns the transport errors of
 * bg_redis_command (the caller treats them as a miss).
 */
BG_MUSTCHECK int bg_llm_cache_get(bg_redis_t *r, const char *key, bool *found,
                                  bg_llm_cached_t *out);

/**
 * Stores v (borrowed) under key for ttl_s (> 0) seconds, replacing what is there. Returns 0,
 * BG_ERR_INVALID (ttl_s ≤ 0, a finish_reason other than stop or length, a token source other than
 * provider or estimated), BG_ERR_TOO_LARGE (text over BG_LLM_CACHE_TEXT_MAX), BG_ERR_PROTOCOL
 * (Redis answered with an error) or a transport error.
 */
BG_MUSTCHECK int bg_llm_cache_put(bg_redis_t *r, const char *key, const bg_llm_cached_t *v,
                                  int ttl_s);

/* ---- definition cache ---- */

/** The definition cache (opaque). */
typedef struct bg_llm_defs bg_llm_defs_t;

/** A parsed prompt version held from the cache (opaque; release it). */
typedef struct bg_llm_prompt bg_llm_prompt_t;

/**
 * Creates a definition cache: agents kept agent_ttl_ms (> 0) in agent_slots slots, prompt versions
 * in prompt_slots slots (both ≥ 1). Returns the owned cache (bg_llm_defs_free).
 */
bg_llm_defs_t *bg_llm_defs_new(uint64_t agent_ttl_ms, size_t agent_slots, size_t prompt_slots);

/** Frees the cache; accepts NULL. Prompts still held stay valid until released. */
void bg_llm_defs_free(bg_llm_defs_t *d);

/**
 * Loads the live agent agent_id into *agent and the prompt version it uses into *prompt (owned
 * reference: bg_llm_prompt_release), from the cache or, on a miss or an expired agent, from
 * Postgres through c (borrowed; the calling thread's connection). Returns 0 (*prompt is NULL when
 * the agent has no prompt), BG_ERR_NOT_FOUND (no such live agent, or a malformed id),
 * BG_ERR_INVALID (the prompt version's definition does not parse: nothing is cached), or another
 * error of bg_pg_exec (Postgres down). *prompt is NULL on every error.
 */
BG_MUSTCHECK int bg_llm_defs_load(bg_llm_defs_t *d, PGconn *c, const char *agent_id,
                                  bg_agent_t *agent, bg_llm_prompt_t **prompt);

/** Counters of a definition cache since it was made. */
typedef struct bg_llm_defs_stats {
    uint64_t hits;   /**< loads answered from memory */
    uint64_t misses; /**< loads that read Postgres */
} bg_llm_defs_stats_t;

/** Copies the counters into out. */
void bg_llm_defs_stats(bg_llm_defs_t *d, bg_llm_defs_stats_t *out);

/** Forgets every entry (tests; an operator's "reload now"). Held prompts stay valid. */
void bg_llm_defs_clear(bg_llm_defs_t *d);

/** Returns the parsed definition of a held prompt version (borrowed from it). */
const bg_prompt_t *bg_llm_prompt_def(const bg_llm_prompt_t *p);
/** Returns the version's model override ("" when none; borrowed). */
const char *bg_llm_prompt_model(const bg_llm_prompt_t *p);
/** Returns the version number. */
int bg_llm_prompt_version(const bg_llm_prompt_t *p);
/** Returns the prompt id (borrowed). */
const char *bg_llm_prompt_id(const bg_llm_prompt_t *p);
/** Lets go of a held prompt version; accepts NULL. */
void bg_llm_prompt_release(bg_llm_prompt_t *p);

#endif
