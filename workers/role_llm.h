/*
 * The "llm" role of bg-worker: runs one chat turn per job (docs/streaming.md). It loads the agent,
 * its prompt version and the conversation's history, renders the prompt, streams the reply from
 * the provider into the job's output stream (bg/jobout.h), stores the assistant message once per
 * job, and emits the job's one usage event (bg/usage.h).
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

/**
 * Runs one chat turn. Returns 0 once the job is over for good: a reply stored, billed and "done"
 * appended, or an "error" event appended and the request refunded (a provider failure, or a job
 * that cannot succeed: unknown conversation or agent, a prompt that does not render).
 * BG_ERR_INVALID for a job without a usable user id, channel or job id (the dead letters keep it);
 * another error when Postgres or Redis failed on the way (the job is delivered again and starts
 * over with a "reset" event, or only finishes when its reply is stored already).
 */
BG_MUSTCHECK int wk_llm_handle(wk_job_t *job, void *ud);

#endif
