/*
 * Accounts: users, sign-in sessions with rotating refresh tokens, API keys, organizations and
 * memberships, platform administration, and the audit log. Business rules on blocking libpq, shared
 * by the edge (on its thread pool) and bgctl.
 *
 * Every function takes a connection it does not own and runs in its own transaction where it writes
 * more than one row. Errors: BG_ERR_NOT_FOUND (no such row, or a row of someone else: callers
 * answer 404 for both), BG_ERR_CONFLICT (duplicate email), BG_ERR_DENIED (bad credentials, revoked,
 * reused, expired, not allowed), BG_ERR_INVALID (input the database refused), BG_ERR_UNAVAILABLE
 * (Postgres down). Secrets (refresh tokens, API keys) are generated here, returned once, and stored
 * only as SHA-256.
 */
#ifndef BG_ACCOUNTS_H
#define BG_ACCOUNTS_H

#include <libpq-fe.h>

#include "bg/common.h"

#define BG_ACCT_ID_LEN 37    /**< uuid text + NUL */
#define BG_ACCT_TOKEN_LEN 64 /**< refresh token / API key text buffers (NUL included) */
#define BG_ACCT_TRIAL_DAYS 14
/*
 * Text buffers sized for the longest value the schema accepts: its limits count characters, and a
 * character takes up to 4 bytes in UTF-8, so nothing stored is ever cut when it is read back.
 */
#define BG_ACCT_EMAIL_SIZE 1017   /**< users.email: 254 characters */
#define BG_ACCT_NAME_SIZE 801     /**< users.name, organizations.name: 200 characters */
#define BG_ACCT_KEY_NAME_SIZE 401 /**< api_keys.name: 100 characters */
#define BG_ACCT_SCOPES_MAX 255    /**< bytes of the comma-separated scopes of an API key */
#define BG_ACCT_CURSOR_LEN 96     /**< an admin list cursor, NUL included */

/** A user as the API shows it. */
typedef struct bg_user {
    char id[BG_ACCT_ID_LEN];
    char email[BG_ACCT_EMAIL_SIZE]; /**< "" for accounts without one (other channels) */
    char name[BG_ACCT_NAME_SIZE];
    char locale[16];
    char role[8];                         /**< "user" | "admin" */
    char status[16];                      /**< "active" | "disabled" */
    char organization_id[BG_ACCT_ID_LEN]; /**< the personal organization */
    char created_at[40];                  /**< RFC 3339 UTC */
    bool deleted;
} bg_user_t;

/** Who did something, for the audit log. */
typedef struct bg_actor {
    const char *kind; /**< "user", "admin", "system", "api_key" */
    const char *id;   /**< user id or NULL */
    const char *request_id;
    const char *ip; /**< textual address or NULL */
} bg_actor_t;

/* ---- users ---- */

/**
 * Registers a user: the user row (password_hash from bg_crypto_password_hash), a personal
 * organization with the user as owner, a billing account, and the 14-day trial subscription (plan
 * "trial", once per account). All in one transaction, audited as "user.register".
 * BG_ERR_CONFLICT when the email (case-insensitively) is taken.
 */
BG_MUSTCHECK int bg_acct_register(PGconn *c, const char *email, const char *password_hash,
                                  const char *name, const char *locale, const bg_actor_t *actor,
                                  bg_user_t *out);

/**
 * Finds a live (not deleted) user by email for sign-in; copies the stored password hash into hash
 * ("" for an account without a password). BG_ERR_NOT_FOUND when there is none, BG_ERR_TOO_LARGE
 * when the hash does not fit hashlen (BG_CRYPTO_PWHASH_LEN always does). Disabled users are found
 * too: the caller refuses them by status.
 */
BG_MUSTCHECK int bg_acct_find_for_login(PGconn *c, const char *email, bg_user_t *out, char *hash,
                                        size_t hashlen);

/** Loads a live user by id. BG_ERR_NOT_FOUND for unknown or deleted ids (and malformed ones). */
BG_MUSTCHECK int bg_acct_get_user(PGconn *c, const char *user_id, bg_user_t *out);

/**
 * Updates name and/or locale (NULL = unchanged) of the user; returns the new row. Audited as
 * "user.update" with the user as actor.
 */
BG_MUSTCHECK int bg_acct_update_profile(PGconn *c, const char *user_id, const char *name,
                                        const char *locale, bg_user_t *out);

/** Records a successful sign-in (last_login_at). */
BG_MUSTCHECK int bg_acct_touch_login(PGconn *c, const char *user_id);

/** The user's current plan as the profile shows it. */
typedef struct bg_plan_summary {
    char plan[33]; /**< plan id, "" when the user has no live subscription */
    char name[101];
    char status[16];        /**< trialing | active | past_due | paused | canceled | none */
    char trial_ends_at[40]; /**< RFC 3339 or "" */
    char period_end[40];    /**< RFC 3339 or "" */
} bg_plan_summary_t;

/** Loads the user's live subscription; a user without one gets status "none". */
BG_MUSTCHECK int bg_acct_plan_summary(PGconn *c, const char *user_id, bg_plan_summary_t *out);

/* ---- sessions and refresh tokens (RFC 9700 rotation with reuse detection) ---- */

/**
 * Starts a session (a refresh-token family) for the user, lasting ttl_s at most, and issues its
 * first refresh token into token (BG_ACCT_TOKEN_LEN), valid token_ttl_s (never past the session's
 * end). Fills session_id. BG_ERR_DENIED for a disabled user, BG_ERR_INVALID for a ttl ≤ 0; a user
 * agent is cut to 512 characters and an ip that is no IPv4/IPv6 address is stored as NULL.
 */
BG_MUSTCHECK int bg_acct_session_start(PGconn *c, const char *user_id, const char *user_agent,
                                       const char *ip, int64_t ttl_s, int64_t token_ttl_s,
                                       char session_id[BG_ACCT_ID_LEN],
                                       char token[BG_ACCT_TOKEN_LEN]);

/**
 * Rotates a refresh token: the presented one becomes used and a new one of the same family is
 * written into new_token. The session must be live and the user active. A token that was already
 * used revokes its whole family (reason "reuse_detected") and fails with BG_ERR_DENIED and *why
 * "reuse"; other refusals: "unknown", "expired", "revoked", "user_disabled" (checked first: a
 * disabled or deleted user's tokens say so whatever became of the session). Refusals other than
 * reuse change nothing. On success fills user and session_id and sets *why to NULL; *why is NULL
 * for errors other than BG_ERR_DENIED too. why may be NULL.
 */
BG_MUSTCHECK int bg_acct_session_refresh(PGconn *c, const char *token, int64_t token_ttl_s,
                                         char new_token[BG_ACCT_TOKEN_LEN], bg_user_t *user,
                                         char session_id[BG_ACCT_ID_LEN], const char **why);

/**
 * Revokes a session of the user (reason "logout", "admin", …). Revoking an already revoked session
 * succeeds; a session of another user is BG_ERR_NOT_FOUND.
 */
BG_MUSTCHECK int bg_acct_session_revoke(PGconn *c, const char *user_id, const char *session_id,
                                        const char *reason);

/** Finds the session a refresh token belongs to (for logout by refresh token). */
BG_MUSTCHECK int bg_acct_session_of_token(PGconn *c, const char *token,
                                          char session_id[BG_ACCT_ID_LEN],
                                          char user_id[BG_ACCT_ID_LEN]);

/* ---- API keys ---- */

typedef struct bg_api_key {
    char id[BG_ACCT_ID_LEN];
    char name[BG_ACCT_KEY_NAME_SIZE];
    char prefix[16];                     /**< first characters of the key, shown in lists */
    char scopes[BG_ACCT_SCOPES_MAX + 1]; /**< comma-separated */
    char created_at[40];
    char last_used_at[40]; /**< "" when never used */
} bg_api_key_t;

/**
 * Creates a key named name with scopes (comma-separated, e.g. "chat"), writes the key itself
 * ("bgk_" + random) into key (shown once) and the stored row into out. Audited.
 */
BG_MUSTCHECK int bg_acct_api_key_create(PGconn *c, const char *user_id, const char *name,
                                        const char *scopes, const bg_actor_t *actor,
                                        char key[BG_ACCT_TOKEN_LEN], bg_api_key_t *out);

/** Lists the user's live keys, newest first, at most max; *count is set. */
BG_MUSTCHECK int bg_acct_api_key_list(PGconn *c, const char *user_id, bg_api_key_t *out, size_t max,
                                      size_t *count);

/** Revokes a key of the user; another user's or unknown key is BG_ERR_NOT_FOUND. Audited. */
BG_MUSTCHECK int bg_acct_api_key_revoke(PGconn *c, const char *user_id, const char *key_id,
                                        const bg_actor_t *actor);

/**
 * Resolves a presented key to its live user (active, not deleted) and the key; updates last_used_at
 * (at most once a minute per key). BG_ERR_DENIED when unknown, revoked or the user is disabled.
 */
BG_MUSTCHECK int bg_acct_api_key_verify(PGconn *c, const char *key, bg_user_t *user,
                                        bg_api_key_t *out);

/* ---- organizations ---- */

typedef struct bg_org_member {
    char user_id[BG_ACCT_ID_LEN];
    char email[BG_ACCT_EMAIL_SIZE];
    char name[BG_ACCT_NAME_SIZE];
    char role[8]; /**< owner | admin | member */
} bg_org_member_t;

typedef struct bg_org {
    char id[BG_ACCT_ID_LEN];
    char name[BG_ACCT_NAME_SIZE];
    bool personal;
    char my_role[8]; /**< the caller's role */
} bg_org_t;

/** Lists the organizations the user belongs to, at most max. */
BG_MUSTCHECK int bg_acct_org_list(PGconn *c, const char *user_id, bg_org_t *out, size_t max,
                                  size_t *count);
/** Creates an organization owned by the user. Audited. */
BG_MUSTCHECK int bg_acct_org_create(PGconn *c, const char *user_id, const char *name,
                                    const bg_actor_t *actor, bg_org_t *out);
/** Reads an organization the user belongs to (else BG_ERR_NOT_FOUND) with its members. */
BG_MUSTCHECK int bg_acct_org_get(PGconn *c, const char *user_id, const char *org_id, bg_org_t *out,
                                 bg_org_member_t *members, size_t max, size_t *count);
/**
 * Adds the existing user with email to the organization with role (admin|member), or changes the
 * role of a member. The caller must be owner or admin (an admin cannot make owners or touch the
 * owner): BG_ERR_DENIED otherwise; a non-member caller gets BG_ERR_NOT_FOUND. Unknown email:
 * BG_ERR_NOT_FOUND with *what "user". Audited.
 */
BG_MUSTCHECK int bg_acct_org_set_member(PGconn *c, const char *user_id, const char *org_id,
                                        const char *email, const char *role,
                                        const bg_actor_t *actor, const char **what);
/** Removes a member (owner/admin only; the owner cannot be removed). Audited. */
BG_MUSTCHECK int bg_acct_org_remove_member(PGconn *c, const char *user_id, const char *org_id,
                                           const char *member_id, const bg_actor_t *actor);

/* ---- platform administration ---- */

/**
 * Returns 0 when user_id is a live, active platform admin, BG_ERR_DENIED otherwise (a malformed id
 * included, without a query), or BG_ERR_UNAVAILABLE/… when Postgres cannot answer.
 */
BG_MUSTCHECK int bg_acct_require_admin(PGconn *c, const char *user_id);

/**
 * Lists users (deleted ones included, flagged), newest first, optionally filtered by an email or
 * name substring (case-insensitive; % and _ match themselves), after the opaque cursor (NULL or ""
 * for the first page); fills next_cursor (BG_ACCT_CURSOR_LEN bytes suffice; "" at the end). At most
 * limit (≤ 1000) users go into out. BG_ERR_INVALID for a cursor this function did not make, a
 * query longer than 254 bytes or a larger limit.
 */
BG_MUSTCHECK int bg_acct_admin_list_users(PGconn *c, const char *query, const char *cursor,
                                          size_t limit, bg_user_t *out, size_t *count,
                                          char *next_cursor, size_t cursor_len);
/** Reads any user, deleted ones included. */
BG_MUSTCHECK int bg_acct_admin_get_user(PGconn *c, const char *user_id, bg_user_t *out);
/**
 * Changes name, locale, role ("user"|"admin") and/or status ("active"|"disabled") (NULL =
 * unchanged) of a live user. Disabling revokes every session of the user (reason "user_disabled").
 * Audited as "user.disable" (when it disables) or "user.update", details {"<field>":{"from","to"}}
 * for the fields that changed; nothing is audited when nothing changed. BG_ERR_INVALID for values
 * the schema refuses (nothing is changed then).
 */
BG_MUSTCHECK int bg_acct_admin_update_user(PGconn *c, const char *user_id, const char *name,
                                           const char *locale, const char *role, const char *status,
                                           const bg_actor_t *actor, bg_user_t *out);
/**
 * Soft-deletes a live user (deleted_at, sessions revoked with reason "admin", API keys revoked);
 * the email is free for a new registration afterwards. Audited as "user.delete". Organizations,
 * subscriptions and history are left as they are.
 */
BG_MUSTCHECK int bg_acct_admin_delete_user(PGconn *c, const char *user_id, const bg_actor_t *actor);

/** Appends to the audit log; details_json is a JSON object text or NULL. */
BG_MUSTCHECK int bg_acct_audit(PGconn *c, const bg_actor_t *actor, const char *action,
                               const char *target_type, const char *target_id,
                               const char *details_json);

#endif
