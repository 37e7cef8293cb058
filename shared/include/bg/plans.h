/*
 * Plans held outside Paddle: complimentary grants by an operator (bgctl plan grant) or an admin
 * (the admin API), with their record in the ledger.
 *
 * A grant gives a user plan P for N days: a subscription with status active, period now .. now + N
 * days and no Paddle ids, replacing the user's live subscription (which is canceled in the same
 * transaction; one live subscription per user). Its quota follows the policy engine's window rule
 * (bg/policy.h): P's request limit per P's period, counted from the grant's start.
 *
 * Ledger: the grant is one balanced transaction in unit 'request', idempotency key
 * "grant:<subscription id>", kind 'grant.plan': +R on the user's 'credits' account and −R on the
 * system 'grants' account, R = the plan's request limit × the number of quota windows in the
 * period. Both accounts are found or created (their natural key is unique). Recording twice for
 * one subscription records once.
 *
 * Idempotency of the whole grant: the caller may choose the new subscription's id (an admin API
 * request passes one per request, bgctl --id); a grant whose subscription already exists changes
 * nothing and reports created = false. Redis is not touched here: the caller recompiles the
 * user's admission state (bg_policy_compile_user + bg_policy_state_write) after a grant.
 */
#ifndef BG_PLANS_H
#define BG_PLANS_H

#include <libpq-fe.h>

#include "bg/accounts.h"
#include "bg/common.h"

#define BG_PLANS_GRANT_DAYS_MAX 3660

/** What to grant. Strings are borrowed. */
typedef struct bg_plan_grant {
    const char *user_id;         /**< the user, or NULL to find them by email */
    const char *email;           /**< used when user_id is NULL (case-insensitive, live users) */
    const char *plan_id;         /**< an existing plan */
    int days;                    /**< 1 .. BG_PLANS_GRANT_DAYS_MAX */
    const char *subscription_id; /**< id of the new subscription (a uuid), or NULL for a new one */
} bg_plan_grant_t;

/** What a grant did. */
typedef struct bg_plan_grant_result {
    char user_id[37];
    char subscription_id[37];
    char ledger_transaction_id[37];
    char replaced_id[37]; /**< the live subscription that was canceled, "" when none */
    bool replaced_paddle; /**< that one was billed by Paddle: cancel it there too */
    bool created;         /**< false: the subscription existed already, nothing changed */
    int64_t requests;     /**< request credits recorded in the ledger */
    int64_t period_start_ms, period_end_ms;
    const char *what; /**< on BG_ERR_NOT_FOUND: "user" or "plan"; static */
} bg_plan_grant_result_t;

/**
 * Grants a plan (see above), in one transaction with its ledger record and an audit row
 * ("plan.grant", actor may be NULL for "system"). Returns 0; BG_ERR_INVALID for days out of range,
 * a malformed id or a missing plan_id; BG_ERR_NOT_FOUND with out->what for an unknown (or deleted)
 * user or plan; BG_ERR_CONFLICT when subscription_id belongs to another user; or a database error.
 */
BG_MUSTCHECK int bg_plans_grant(PGconn *c, const bg_plan_grant_t *grant, const bg_actor_t *actor,
                                bg_plan_grant_result_t *out);

/**
 * Records the ledger transaction of the grant that created subscription_id, unless it is recorded
 * already; in its own transaction. Sets *recorded to whether this call wrote it and tx_id (37
 * bytes, may be NULL) to the transaction's id. Returns 0, BG_ERR_NOT_FOUND for an unknown
 * subscription, or a database error.
 */
BG_MUSTCHECK int bg_plans_grant_record(PGconn *c, const char *subscription_id, bool *recorded,
                                       char *tx_id);

#endif
