/*
 * The "usage" role of bg-worker: writes each usage event (bg/usage.h) to Postgres exactly once,
 * debits the request credit in the ledger and settles the quota reservation in Redis.
 */
#ifndef WK_ROLE_USAGE_H
#define WK_ROLE_USAGE_H

#include "runtime.h"

/** Reads BG_DATABASE_URL and BG_SHARDS from cfg (borrowed); *ud is the role's owned state. */
BG_MUSTCHECK int wk_usage_init(const bg_config_t *cfg, void **ud);

/** Frees the state of wk_usage_init; accepts NULL. */
void wk_usage_dispose(void *ud);

/** Frees a handler thread's state (its cached account ids). */
void wk_usage_thread_dispose(void *thread_state, void *ud);

/**
 * Handles one usage event: 0 once the record (and its ledger transaction, when charged) is
 * committed and the reservation settled; BG_ERR_INVALID for a malformed event or one the database
 * refuses for good (an unknown user); another error for a transient failure (retried).
 */
BG_MUSTCHECK int wk_usage_handle(wk_job_t *job, void *ud);

#endif
