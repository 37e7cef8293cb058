/*
 * Plans: the catalogue (table plans: data, not code) and complimentary grants.
 *
 * The catalogue. Each plan has a name, a price (minor units of a currency), a request limit per
 * period, features and a Paddle price id. Admins edit it (PUT /admin/plans/{id}); GET
 * /billing/plans shows the active, purchasable plans. A change that moves admission (requests,
 * period, features) reaches users only when their admission state is compiled again:
 * bg_plans_recompile() does that for every user whose live subscription has the plan; the edge
 * calls it before it answers the change. Existing subscribers keep an inactive plan.
 *
 * Paddle price ids from configuration (BG_PADDLE_PRICE_DAILY|WEEKLY|MONTHLY|YEARLY). Sandbox and
 * live prices differ, so the ids come from the environment; bg_plans_apply_price_config() copies
 * them into the rows (bgctl migrate runs it after the migrations). The column paddle_price_source
 * (0007) says who set an id: 'config' ids follow configuration on every run; an id an admin set
 * ('admin') is never overwritten by configuration, and a differing configured value is reported
 * (a warning naming the variable) instead. An admin who sets the id to null hands the plan back to
 * configuration. An admin PUT that repeats the current id changes nothing, so echoing a GET back
 * does not take a plan away from configuration.
 *
 * Grants. A grant gives a user plan P for N days: a subscription with status active, period now ..
 * now + N days and no Paddle ids, replacing the user's live subscription (which is canceled in the
 * same transaction; one live subscription per user). Its quota follows the policy engine's window
 * rule (bg/policy.h): P's request limit per P's period, counted from the grant's start.
 *
 * Ledger: the grant is one balanced transaction in unit 'request', idempotency key
 * "grant:<subscription id>", kind 'grant.plan': +R on the user's 'credits' account and −R on the
 * system 'grants' account, R = the plan's request limit × the number of quota windows in the
 * period. Both accounts are found or created (their natural key is unique). Recording twice for
 * one subscription records once.
 *
 * Idempotency of the whole grant: the caller may choose the new subscription's id (an admin API
 * request may pass one, bgctl --id); a grant whose subscription already exists changes nothing and
 * reports created = false. Redis is not touched by bg_plans_grant: the caller recompiles the
 * user's admission state (bg_policy_compile_user + bg_policy_state_write) after a grant.
 */
#ifndef BG_PLANS_H
#define BG_PLANS_H

#include <libpq-fe.h>

#include "bg/accounts.h"
#include "bg/common.h"
#include "bg/config.h"
#include "bg/redis.h"

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

/* ---- the catalogue ---- */

#define BG_PLANS_LIST_MAX 64              /**< plans one listing returns */
#define BG_PLANS_FEATURES_MAX 32          /**< features of one plan */
#define BG_PLANS_FEATURE_SIZE 65          /**< a feature name: [a-z][a-z0-9_]{0,63} + NUL */
#define BG_PLANS_NAME_MAX 100             /**< characters of a name */
#define BG_PLANS_PRICE_MAX 100000000000LL /**< minor units */
#define BG_PLANS_REQUESTS_MAX 1000000000000LL
#define BG_PLANS_PRICE_ID_SIZE 101 /**< a Paddle price id: [A-Za-z0-9_-]{1,100} + NUL */

/** A plan row as the API shows it. */
typedef struct bg_plan {
    char id[33];
    char name[4 * BG_PLANS_NAME_MAX + 1]; /**< UTF-8 */
    int64_t price_minor;
    char currency[4];
    int64_t requests;  /**< request limit per period */
    char period[32];   /**< "day", "week", "month", "year", or the interval's text for others */
    char duration[32]; /**< "" for a plan that renews; else the interval ("14 days") */
    char features[BG_PLANS_FEATURES_MAX][BG_PLANS_FEATURE_SIZE];
    size_t nfeatures;
    bool api_access, purchasable, active;
    char paddle_price_id[BG_PLANS_PRICE_ID_SIZE]; /**< "" when none */
    char paddle_price_source[8];                  /**< "config", "admin" or "" */
    int32_t sort_order;
    char created_at[40], updated_at[40]; /**< RFC 3339 UTC */
} bg_plan_t;

/** Where an edit is invalid, for the admin API's 422 (or 409 for a taken price id). */
typedef struct bg_plans_verr {
    char field[48];     /**< "name", "price.amount", "features[2]", "paddle_price_id", … */
    const char *reason; /**< catalogue suffix: "missing", "out_of_range", "invalid_value", … */
} bg_plans_verr_t;

/**
 * An edit: every field is optional (has_* or a non-NULL pointer says it is present). Strings and
 * the features array are borrowed.
 */
typedef struct bg_plan_update {
    const char *name;
    bool has_price;
    int64_t price_minor;
    const char *currency; /**< with has_price; NULL keeps the currency */
    bool has_requests;
    int64_t requests;
    const char *period; /**< "day", "week", "month" or "year" */
    bool has_features;
    const char *const *features;
    size_t nfeatures;
    bool has_paddle_price_id;
    const char *paddle_price_id; /**< NULL: no price id (configuration applies again) */
    bool has_active;
    bool active;
} bg_plan_update_t;

/** Returns the interval text of a period name ("month" → "1 month"), or NULL for another name. */
const char *bg_plans_period_interval(const char *period);

/** Returns true for a well-formed Paddle price id ([A-Za-z0-9_-]{1,100}). */
bool bg_plans_price_id_is_valid(const char *s);

/**
 * Checks an edit without the database: the first bad field into *err (name 1..100 characters;
 * price.amount 0..BG_PLANS_PRICE_MAX; price.currency [A-Z]{3}; requests 1..BG_PLANS_REQUESTS_MAX;
 * period a name above; features at most BG_PLANS_FEATURES_MAX distinct names; paddle_price_id).
 * Returns 0 or BG_ERR_INVALID.
 */
BG_MUSTCHECK int bg_plans_update_validate(const bg_plan_update_t *u, bg_plans_verr_t *err);

/**
 * Lists plans in catalogue order (sort_order, id): every plan, or with public_only the active,
 * purchasable ones (what GET /billing/plans shows). At most max into out. Returns 0 or a database
 * error.
 */
BG_MUSTCHECK int bg_plans_list(PGconn *c, bool public_only, bg_plan_t *out, size_t max,
                               size_t *count);

/** Reads one plan. Returns 0, BG_ERR_NOT_FOUND, or a database error. */
BG_MUSTCHECK int bg_plans_get(PGconn *c, const char *id, bg_plan_t *out);

/**
 * Applies a (validated) edit to plan id in one transaction with its audit row ("plan.update",
 * details {"before":{…},"after":{…}} of the fields that changed). api_access follows the features.
 * A changed, non-null paddle_price_id becomes source 'admin'; null clears the source. Fills before
 * and after (either may be NULL). Returns 0; BG_ERR_INVALID (err filled) for an edit that fails
 * validation; BG_ERR_NOT_FOUND; BG_ERR_CONFLICT (err->field "paddle_price_id") when another plan
 * has that price id; or a database error.
 */
BG_MUSTCHECK int bg_plans_update(PGconn *c, const char *id, const bg_plan_update_t *u,
                                 const bg_actor_t *actor, bg_plan_t *before, bg_plan_t *after,
                                 bg_plans_verr_t *err);

/** Returns true when the change from before to after moves admission (requests, period,
 * features). */
bool bg_plans_admission_changed(const bg_plan_t *before, const bg_plan_t *after);

/**
 * Compiles again the admission state of every user whose live subscription has plan_id and writes
 * it to Redis (blocking client r). Adds the users written to *recompiled and the users that failed
 * (logged) to *failed (either may be NULL). Returns 0, or a database error when the users cannot
 * be listed.
 */
BG_MUSTCHECK int bg_plans_recompile(PGconn *c, bg_redis_t *r, int shards, const char *plan_id,
                                    int64_t *recompiled, int64_t *failed);

/** What bg_plans_apply_price_config did. */
typedef struct bg_plans_price_report {
    int applied; /**< rows whose price id was set from configuration */
    int kept;    /**< configured values not applied because an admin set another id */
    int failed;  /**< configured values refused (malformed, or another plan has the id) */
} bg_plans_price_report_t;

/**
 * Copies the configured Paddle price ids (BG_PADDLE_PRICE_DAILY … _YEARLY; unset ones are skipped)
 * into the plans daily … yearly, following the rule above; logs each change, each value kept off
 * by an admin's id (warning) and each refusal (error, naming the variable). Returns 0 (see report,
 * may be NULL) or a database error.
 */
BG_MUSTCHECK int bg_plans_apply_price_config(PGconn *c, const bg_config_t *cfg,
                                             bg_plans_price_report_t *report);

#endif
