/*
 * The "billing" role of bg-worker: applies the Paddle events the edge stored in the webhook inbox
 * (bg/billing.h) and compiles the user's admission state again, so quota windows follow the
 * subscription.
 */
#ifndef WK_ROLE_BILLING_H
#define WK_ROLE_BILLING_H

#include "runtime.h"

/** Reads BG_DATABASE_URL and BG_SHARDS from cfg (borrowed); *ud is the role's owned state. */
BG_MUSTCHECK int wk_billing_init(const bg_config_t *cfg, void **ud);

/** Frees the state of wk_billing_init; accepts NULL. */
void wk_billing_dispose(void *ud);

/**
 * Handles one billing job (fields event_id, provider "paddle"): 0 once the event is applied (or was
 * before) and the user's admission state is written to Redis; BG_ERR_INVALID for a job without an
 * event id, an event that is not stored, or one that can never apply (dead letter); another error
 * for a transient failure, the user not known yet included (retried).
 */
BG_MUSTCHECK int wk_billing_handle(wk_job_t *job, void *ud);

#endif
