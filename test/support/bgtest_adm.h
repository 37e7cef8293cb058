/*
 * Tests that change a user's compiled admission state (bg:{sN}:adm:<uid>) do it through the plan
 * compiler's own writer, so the packed copy the admission script reads ("pk") always agrees with
 * the readable fields.
 */
#ifndef BGTEST_ADM_H
#define BGTEST_ADM_H

#include "bg/policy.h"
#include "bg/redis.h"

/**
 * Reads the user's state back (status, plan, features and the numbers), sets field (one of
 * q_limit, w_anchor, w_len, w_until, rpm, burst, conc, tok_cap, tq_limit) to value and writes the
 * whole state again with bg_policy_state_write. Returns 0, BG_ERR_NOT_FOUND (no state, or an
 * unknown field) or a Redis error.
 */
int bgt_adm_set(bg_redis_t *r, int shards, const char *user_id, const char *field, long long value);

#endif
