/*
 * The "llm" role of bg-worker: runs one chat turn per job (docs/streaming.md). It loads the agent
 * and its prompt version (cached in process, bg/llm_cache.h) and the conversation's history,
 * renders the prompt, streams the reply from the provider (or replays it from the response cache)
 * into the job's output stream (bg/jobout.h), stores the assistant message once per job, and emits
 * the job's one usage event (bg/usage.h).
 *
 * A job is a stream entry with the fields user_id, agent_id, channel ("web", "telegram", "api"),
 * locale, user_name, max_tokens ("0": the agent's) and temperature ("": the agent's), plus either
 * conversation_id and message_id (the stored user message), or, for channel "api", messages: a
 * JSON array [{"role": "system"|"developer"|"user"|"assistant", "content": "<text>"}, ...] that
 * follows the agent prompt's system message and examples. Its "done" event carries
 * {"message_id" (web only), "finish_reason", "model", "usage", "cached", "quota"}.
 */
#ifndef WK_ROLE_LLM_H
#define WK_ROLE_LLM_H

#include "runtime.h"

/**
 * Reads BG_DATABASE_URL, BG_SHARDS, BG_LLM_BASE_URL, BG_LLM_API_KEY, BG_LLM_FALLBACK_BASE_URL and
 * BG_LLM_MODEL from cfg (borrowed; copied). Returns 0 with the role's owned state in *ud, or
 * BG_ERR_CONFIG when the database or the provider is not configured.
 */
BG_MUSTCHECK int wk_llm_init(const bg_config_t *cfg, void **ud);

/** Frees the state of wk_llm_init; accepts NULL. */
void wk_llm_dispose(void *ud);

/** Frees a handler thread's state: its provider client and its loop. */
void wk_llm_thread_dispose(void *thread_state, void *ud);
/** wk_role_t.thread_warm: the provider client and the Postgres connection of a handler thread. */
void wk_llm_thread_warm(void **thread_state, void *ud);

/**
 * Runs one chat turn. Returns 0 once the job is over for good: a reply stored (web), billed and
 * "done" appended, or an "error" event appended and the request refunded (a provider failure, or a
 * job that cannot succeed: unknown conversation or agent, a prompt that does not render, an API
 * job on a prompt that needs variables: "invalid_request").
 * BG_ERR_INVALID for a job without a usable user id, channel or job id (the dead letters keep it);
 * another error when Postgres or Redis failed on the way (the job is delivered again and starts
 * over with a "reset" event, or only finishes when its reply is stored already).
 */
BG_MUSTCHECK int wk_llm_handle(wk_job_t *job, void *ud);

#endif
