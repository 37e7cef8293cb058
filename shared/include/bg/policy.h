/*
 * The policy engine: rate limits, quotas, resource access and feature flags, from the rules in
 * Postgres (table policy_rules) and the plan of the user's subscription, compiled into the Redis
 * hash that the admission script reads (DESIGN.md §3). Edge, workers, bgctl and the admin API use
 * this one module, so a rule means the same everywhere.
 *
 * Rule bodies (JSON objects; unknown fields are refused; a validation error names the field):
 *   rate_limit      {"rpm": 1..100000, "burst": 1..10000}
 *   quota           {"requests": 0..10^12, "tokens"?: 0..10^15, "max_tokens_per_request"?: 0..10^7,
 *                    "concurrency"?: 0..10000}     (0 tokens / max_tokens / concurrency: no limit)
 *   resource_access {"agents"?: [name|"*", …], "models"?: [name|"*", …], "effect": "allow"|"deny"}
 *                    (at least one list; 1..64 names of 1..64 bytes from [A-Za-z0-9._:/@-])
 *   feature_flag    {"flag": name, "enabled": bool, "percentage"?: 0..100}
 *                    (a flag name is [a-z][a-z0-9_.-]{0,63}; without percentage: everyone)
 * Scopes: global (no scope_id), plan (a plan id that exists), organization and user (a uuid).
 *
 * Precedence. A rule applies to a user when it is enabled and its scope is global, the user's plan,
 * one of the user's organizations, or the user. Among the rules of one type that apply (for feature
 * flags: of one flag name; for resource access: that name the resource or "*"):
 *   1. the narrower scope wins: user > organization > plan > global;
 *   2. within one scope, the higher priority wins;
 *   3. then the newest (created_at; ties by id, so the answer never depends on load order).
 * Resource access: the winning level is the narrowest scope and, within it, the highest priority
 * among the matching rules; at that level a deny beats an allow, whatever their age. No matching
 * rule: allowed. So "trial may only use model m" is {"models":["m"],"effect":"allow"} with
 * priority 1 plus {"models":["*"],"effect":"deny"} with priority 0, both scoped to plan trial.
 * Quota fields are taken one by one from the highest-ranked quota rule that sets them ("requests"
 * always comes from the winner), then from the defaults: a user rule raising "requests" keeps the
 * plan rule's "concurrency".
 * A feature flag rule, when one applies, decides its feature (on: enabled and the user falls in its
 * percentage), even a feature the plan lists; features without rules come from the plan.
 *
 * Defaults when no rule applies: requests per window from the plan row (trial 50 a day, daily 100,
 * weekly 1,000, monthly 10,000, yearly 150,000); rpm trial 10, daily 20, weekly 30, monthly 60,
 * yearly 120 (20 for other plans); burst 5; concurrency 2 (trial 1); 4,096 tokens per request; no
 * token quota.
 *
 * Subscriptions (which one and what it grants): the user's live subscription (status other than
 * canceled; there is at most one).
 *   - trialing → "trialing"; active → "active"; paused, canceled, none → "none";
 *   - past_due → "active" until current_period_end (Paddle retries the payment meanwhile);
 *   - a trial that ended (trial_ends_at) or a period that ended (current_period_end) → "none": the
 *     renewal webhook moves the period on, and until it does the user is not served for free;
 *   - a disabled or deleted user → "none".
 * Quota windows: a Paddle subscription's window is its current billing period (a renewal starts a
 * new one). A subscription Paddle does not bill has windows of the plan's period counted from its
 * current_period_start (UTC calendar), the last one cut at current_period_end: the trial (period 1
 * day, 14 days long) gets day windows counted from its start; a complimentary grant of N days gets
 * plan periods from the grant's start. w_anchor is the start of the window that holds the compile
 * time; later windows follow every w_len ms (the script computes w_anchor + floor((now − w_anchor)
 * / w_len) · w_len), and the plan ends at w_until.
 *
 * Plan change mid-period: the change takes effect at once, with the new plan's limit over the
 * subscription's period as the row holds it now (Paddle starts a new billing period on an immediate
 * change). The compiler never touches the counters: usage already counted in the current window
 * stays counted against the new limit (80 of a daily plan's 100 used, then an upgrade that keeps
 * the window: 920 of weekly's 1,000 left; a downgrade below what was used leaves 0, not a fresh
 * count). When the row's period start moved, the window is new and so is its count — the same
 * window `bgctl quota rebuild` counts usage_records in.
 */
#ifndef BG_POLICY_H
#define BG_POLICY_H

#include <libpq-fe.h>

#include "bg/common.h"
#include "bg/json.h"
#include "bg/redis.h"
#include "bg/redis_async.h"

#define BG_POLICY_ID_SIZE 37         /**< uuid text + NUL */
#define BG_POLICY_PLAN_SIZE 33       /**< plans.id: 32 characters + NUL */
#define BG_POLICY_FLAG_SIZE 65       /**< flag name: 64 characters + NUL */
#define BG_POLICY_FEATURES_SIZE 2048 /**< ",a,b," of one user, NUL included */
#define BG_POLICY_LIST_MAX 64        /**< names in one agents or models list */
#define BG_POLICY_NAME_MAX 64        /**< bytes of one agent or model name */
#define BG_POLICY_BODY_MAX 16384     /**< bytes of a rule body */
#define BG_POLICY_RULES_MAX 10000    /**< rules in one set (the applicable rules of one user) */

/* Defaults (see above). */
#define BG_POLICY_DEFAULT_BURST 5
#define BG_POLICY_DEFAULT_CONCURRENCY 2
#define BG_POLICY_TRIAL_CONCURRENCY 1
#define BG_POLICY_DEFAULT_TOKEN_CAP 4096
#define BG_POLICY_DEFAULT_RPM 20

typedef enum bg_policy_type {
    BG_POLICY_RATE_LIMIT = 0,
    BG_POLICY_QUOTA,
    BG_POLICY_RESOURCE_ACCESS,
    BG_POLICY_FEATURE_FLAG
} bg_policy_type_t;

/** Scopes, in order of precedence (a larger value wins). */
typedef enum bg_policy_scope {
    BG_POLICY_GLOBAL = 0,
    BG_POLICY_PLAN,
    BG_POLICY_ORGANIZATION,
    BG_POLICY_USER
} bg_policy_scope_t;

typedef enum bg_policy_resource { BG_POLICY_AGENT = 0, BG_POLICY_MODEL } bg_policy_resource_t;

/** Where a rule is invalid, for the admin API's 422. */
typedef struct bg_policy_verr {
    char field[48];     /**< "rpm", "agents[2]", "scope_id", "type", "body", … */
    const char *reason; /**< static English text: "must be an integer from 1 to 100000" */
} bg_policy_verr_t;

/** One parsed, valid rule. */
typedef struct bg_policy_rule {
    char id[BG_POLICY_ID_SIZE]; /**< "" for a rule that is not stored */
    bg_policy_type_t type;
    bg_policy_scope_t scope;
    char scope_id[BG_POLICY_ID_SIZE]; /**< plan id or lower-case uuid; "" for global */
    int32_t priority;
    int64_t created_ms; /**< for "newest wins" */
    /* rate_limit */
    int64_t rpm, burst;
    /* quota; -1 where the body does not set the field */
    int64_t requests, tokens, max_tokens_per_request, concurrency;
    /* resource_access */
    bool deny;
    char *agents; /**< owned; ",a,b," or NULL when the body has no agents */
    char *models; /**< owned; likewise */
    /* feature_flag */
    char flag[BG_POLICY_FLAG_SIZE];
    bool enabled;
    int percentage; /**< 100 when the body has none */
} bg_policy_rule_t;

/** Frees what a rule owns (its lists); the rule may be parsed into again. Accepts NULL. */
void bg_policy_rule_dispose(bg_policy_rule_t *rule);

/** Parses "rate_limit" … into *out. Returns 0 or BG_ERR_INVALID. */
BG_MUSTCHECK int bg_policy_type_parse(const char *s, bg_policy_type_t *out);
/** Parses "global" … "user" into *out. Returns 0 or BG_ERR_INVALID. */
BG_MUSTCHECK int bg_policy_scope_parse(const char *s, bg_policy_scope_t *out);
/** Returns the text form of a type or scope (static). */
const char *bg_policy_type_name(bg_policy_type_t type);
const char *bg_policy_scope_name(bg_policy_scope_t scope);

/**
 * Checks a rule body (a parsed JSON value) for type and, when out is not NULL, fills the type's
 * fields of *out (out->type too; other fields untouched; lists allocated: bg_policy_rule_dispose).
 * Returns 0, or BG_ERR_INVALID with *err naming the first bad field and why (an unknown field
 * first, then the type's fields in the order listed above; a list item as "agents[2]").
 */
BG_MUSTCHECK int bg_policy_body_validate(bg_policy_type_t type, const bg_json_t *body,
                                         bg_policy_rule_t *out, bg_policy_verr_t *err);

/**
 * Checks the shape of a scope id: none for global, a plan id ([a-z][a-z0-9_]{0,31}) for plan, a
 * uuid for organization and user (copied lower-case into out->scope_id when out is not NULL).
 * Returns 0 or BG_ERR_INVALID with err->field "scope_id".
 */
BG_MUSTCHECK int bg_policy_scope_validate(bg_policy_scope_t scope, const char *scope_id,
                                          bg_policy_rule_t *out, bg_policy_verr_t *err);

/**
 * As bg_policy_scope_validate, and for a plan scope also checks that the plan exists. Returns 0,
 * BG_ERR_INVALID (err filled), or a database error.
 */
BG_MUSTCHECK int bg_policy_scope_check(PGconn *c, bg_policy_scope_t scope, const char *scope_id,
                                       bg_policy_verr_t *err);

/**
 * Parses a whole rule: type and scope names, scope id (may be NULL) and body text (len bytes, at
 * most BG_POLICY_BODY_MAX). On 0, *out is a valid rule (dispose it); its id, priority and
 * created_ms are zero for the caller to set. BG_ERR_INVALID with *err otherwise (field "body" for
 * JSON that does not parse or is not an object; *out then owns nothing).
 */
BG_MUSTCHECK int bg_policy_rule_parse(const char *type, const char *scope, const char *scope_id,
                                      const char *body, size_t len, bg_policy_rule_t *out,
                                      bg_policy_verr_t *err);

/**
 * Orders two rules of one type by precedence: > 0 when a wins over b, < 0 when b wins, 0 only for
 * the same rule (scope, then priority, then created_ms, then id).
 */
int bg_policy_rule_cmp(const bg_policy_rule_t *a, const bg_policy_rule_t *b);

/** Who a decision is about. Strings are borrowed. */
typedef struct bg_policy_subject {
    const char *user_id;
    const char *plan_id;        /**< NULL or "" when the user has no plan */
    const char *const *org_ids; /**< the user's organizations (lower-case uuids) */
    size_t norgs;
    const char *plan_features; /**< comma-separated features of the plan, or NULL */
} bg_policy_subject_t;

/** Returns true when rule is enabled for subj by its scope. */
bool bg_policy_rule_applies(const bg_policy_rule_t *rule, const bg_policy_subject_t *subj);

/** A set of rules (any subjects); owns them. Not synchronised: share it read-only. */
typedef struct bg_policy_set bg_policy_set_t;

/** Returns a new, empty set (owned; bg_policy_set_free). */
bg_policy_set_t *bg_policy_set_new(void);
/** Frees a set and its rules; accepts NULL. */
void bg_policy_set_free(bg_policy_set_t *set);
/**
 * Adds a rule; consumes it (its lists move into the set; *rule owns nothing afterwards, also on
 * error). Returns 0 or BG_ERR_TOO_LARGE past BG_POLICY_RULES_MAX rules.
 */
BG_MUSTCHECK int bg_policy_set_add(bg_policy_set_t *set, bg_policy_rule_t *rule);
/** Returns the number of rules in the set. */
size_t bg_policy_set_count(const bg_policy_set_t *set);

/**
 * Loads the enabled rules that apply to subj (all enabled rules when subj is NULL) into a new set
 * *out (owned). Rows whose body no longer validates are skipped with a warning, so one bad row does
 * not lock users out. The BG_POLICY_RULES_MAX rules of highest precedence are kept (warned about).
 * Returns 0 or a database error (*out NULL).
 */
BG_MUSTCHECK int bg_policy_set_load(PGconn *c, const bg_policy_subject_t *subj,
                                    bg_policy_set_t **out);

/** Limits and features of one user, what the admission hash carries besides status and window. */
typedef struct bg_policy_limits {
    int64_t q_limit;  /**< requests per window */
    int64_t tq_limit; /**< tokens per window, 0 = none */
    int64_t rpm;      /**< requests per minute, 0 = unlimited */
    int64_t burst;    /**< ≥ 1 */
    int64_t conc;     /**< concurrent generations, 0 = unlimited */
    int64_t tok_cap;  /**< tokens per request, 0 = none */
    /** ",a,b," ("," when none): the plan's features in its order, then flags on by name */
    char features[BG_POLICY_FEATURES_SIZE];
} bg_policy_limits_t;

/** Returns the default requests per minute of a plan (unknown plans and NULL: 20). */
int64_t bg_policy_default_rpm(const char *plan_id);

/**
 * Fills *out with the defaults for plan_id (NULL: no plan) whose row allows plan_limit requests per
 * window, and the plan's features (comma-separated, may be NULL).
 */
void bg_policy_defaults(const char *plan_id, int64_t plan_limit, const char *plan_features,
                        bg_policy_limits_t *out);

/**
 * Applies the rules of set that apply to subj over *io (normally filled by bg_policy_defaults):
 * rate limit, quota fields and feature flags (see precedence above).
 */
void bg_policy_evaluate(const bg_policy_set_t *set, const bg_policy_subject_t *subj,
                        bg_policy_limits_t *io);

/**
 * Returns the rollout bucket of (flag, user) in [0, 100): the splitmix64 finaliser of the 64-bit
 * FNV-1a hash of "<flag>:<user_id>", mod 100. Stable across processes, versions and languages; a
 * user is in a rollout of p percent when the bucket is < p, so raising p only adds users.
 */
unsigned bg_policy_rollout_bucket(const char *flag, const char *user_id);

/**
 * Returns whether the feature flag is on for subj: decided by the winning flag rule (enabled and,
 * with a percentage, the user's bucket below it) when one applies; otherwise whether
 * subj->plan_features lists it.
 */
bool bg_policy_flag_enabled(const bg_policy_set_t *set, const bg_policy_subject_t *subj,
                            const char *flag);

/**
 * Returns whether subj may use the agent or model called name (alias, when not NULL, is a second
 * name of the same thing — an agent's id next to its slug — and a rule naming either matches). See
 * the resource access rule above; no matching rule allows.
 */
bool bg_policy_allows_resource(const bg_policy_set_t *set, const bg_policy_subject_t *subj,
                               bg_policy_resource_t kind, const char *name, const char *alias);

/* ---- the compiled admission state ---- */

/** The admission hash of one user, bg:{s<N>}:adm:<uid>, and what it was compiled from. */
typedef struct bg_admission_state {
    char user_id[BG_POLICY_ID_SIZE];
    char status[12];                /**< "active" | "trialing" | "none" */
    char plan[BG_POLICY_PLAN_SIZE]; /**< "" when the user never had a plan */
    int64_t w_anchor;               /**< start of the current window, unix ms */
    int64_t w_len;                  /**< window length, ms (> 0) */
    int64_t w_until;                /**< the plan ends then, unix ms */
    bg_policy_limits_t limits;      /**< q_limit, tq_limit, rpm, burst, conc, tok_cap, features */
    int64_t v;                      /**< compile time, unix ms */
    /* not written to Redis */
    char subscription_id[BG_POLICY_ID_SIZE]; /**< "" when none */
    char sub_status[12];                     /**< the row's status, "" when none */
} bg_admission_state_t;

/**
 * Compiles the admission state of user_id at now_ms: the live subscription and its plan, the
 * user's organizations and the enabled rules that apply (see the rules above). A "none" state has
 * q_limit 0 and w_until ≤ now_ms, so a script that looks at either denies too. Returns 0,
 * BG_ERR_NOT_FOUND for an unknown user (or a malformed id), or a database error.
 */
BG_MUSTCHECK int bg_policy_compile_user(PGconn *c, const char *user_id, int64_t now_ms,
                                        bg_admission_state_t *out);

/** Returns the start of the quota window that holds now_ms (w_anchor + k·w_len, k ≥ 0). */
int64_t bg_policy_window_start(const bg_admission_state_t *s, int64_t now_ms);
/** Returns the end of that window: its start + w_len, but never after w_until. */
int64_t bg_policy_window_end(const bg_admission_state_t *s, int64_t now_ms);

/** Writes "bg:{s<N>}:adm:<uid>" into out. Returns 0 or BG_ERR_TOO_LARGE. */
BG_MUSTCHECK int bg_policy_key_adm(char *out, size_t outlen, int shards, const char *user_id);
/** Writes "bg:{s<N>}:quota:<uid>" into out. Returns 0 or BG_ERR_TOO_LARGE. */
BG_MUSTCHECK int bg_policy_key_quota(char *out, size_t outlen, int shards, const char *user_id);

/** Fields of the admission hash, in the order the HSET carries them. */
#define BG_POLICY_STATE_FIELDS 14
/** Arguments of the HSET: "HSET", key, 14 field/value pairs. */
#define BG_POLICY_STATE_ARGC (2 + 2 * BG_POLICY_STATE_FIELDS)
/**
 * Bytes of the field "pk", what lua/admit.lua reads: the same state packed so that one HGET and
 * one struct.unpack replace an 11-field HMGET and nine tonumber()s (27,000 of an admit's 236,000
 * instructions in Redis). q_limit, w_anchor, w_len, w_until, rpm, burst, conc, tok_cap and
 * tq_limit as little-endian IEEE doubles (exact below 2^53), then the status, "\n", the features.
 */
#define BG_POLICY_PK_MAX (9 * 8 + 12 + 1 + BG_POLICY_FEATURES_SIZE)

/** The HSET command of a state, with its own storage (argv points into it). */
typedef struct bg_policy_argv {
    const char *argv[BG_POLICY_STATE_ARGC];
    size_t lens[BG_POLICY_STATE_ARGC];
    int argc;
    char key[BG_REDIS_KEY_MAX];
    char nums[BG_POLICY_STATE_FIELDS][24];
    char pk[BG_POLICY_PK_MAX];
} bg_policy_argv_t;

/**
 * Builds "HSET bg:{s<N>}:adm:<uid> status … v … pk …" into *out (argv points into *out: do not copy
 * it). The HSET sets every field of the format, so it is complete on its own; it is the form for
 * the async client, where a MULTI on the loop's shared connection could trap other commands in a
 * transaction if a later send failed. Returns 0 or BG_ERR_TOO_LARGE.
 */
BG_MUSTCHECK int bg_policy_state_argv(const bg_admission_state_t *s, int shards,
                                      bg_policy_argv_t *out);

/**
 * Writes the state with MULTI, DEL, HSET, EXEC on the blocking client, so the script never sees a
 * half-written hash and fields of older formats disappear. Returns 0, a transport error of
 * bg_redis_command, or BG_ERR_PROTOCOL when Redis answered with an error.
 */
BG_MUSTCHECK int bg_policy_state_write(bg_redis_t *r, int shards, const bg_admission_state_t *s);

/**
 * Sends the HSET of bg_policy_state_argv on the async client; cb as bg_redis_async_argv. Returns as
 * bg_redis_async_argv, or BG_ERR_TOO_LARGE.
 */
BG_MUSTCHECK int bg_policy_state_write_async(bg_redis_async_t *c, int shards,
                                             const bg_admission_state_t *s, bg_redis_async_cb cb,
                                             void *ud);

/* ---- quota counters (what bgctl quota rebuild and the reconciler compare) ---- */

/**
 * Counts the usage of user_id with created_at in [from_ms, to_ms) that counts against the quota:
 * records with status ok or canceled (the user stopped it; the tokens were spent) and
 * requests_charged > 0 (0 marks a refunded request). Errors and timeouts are ours and never count.
 * *used is the sum of requests_charged, *tused the sum of prompt and completion tokens of those
 * records. Returns 0 or a database error.
 */
BG_MUSTCHECK int bg_policy_usage_count(PGconn *c, const char *user_id, int64_t from_ms,
                                       int64_t to_ms, int64_t *used, int64_t *tused);

/** Sets the quota hash of the user to win, used, tused (HSET). Returns as bg_policy_state_write. */
BG_MUSTCHECK int bg_policy_quota_write(bg_redis_t *r, int shards, const char *user_id, int64_t win,
                                       int64_t used, int64_t tused);

#endif
