/*
 * Accounts on blocking libpq. See bg/accounts.h for the contract.
 *
 * Every statement is parameterised; the SQL text is compiled in, input only ever travels as a
 * parameter, and audit details are JSON built by the writer, so no input is ever spliced into SQL
 * or JSON text. A function that writes more than one row runs in one transaction: it either commits
 * everything or, on any error, rolls back through one clean-up label, with the PGresult it holds
 * cleared there (`res` is NULL or owned at every goto).
 *
 * Refresh-token rotation is the delicate part. Two refreshes with one token must not both win, and
 * a used token must revoke its family even when it loses a race. Every write to a family (rotation,
 * reuse detection, logout, disabling or deleting the user) first locks the auth_sessions row (the
 * family), then touches its refresh_tokens rows; a refresh reads the presented token's state only
 * once it holds that lock, so the second of two concurrent refreshes sees the first one's used_at
 * and is treated as reuse. Taking the session lock before any token lock also keeps these paths
 * free of lock-order deadlocks.
 *
 * Sessions are started under a FOR SHARE lock on the user row, which an UPDATE of the user (admin
 * disable or delete, which revoke every session) waits for and conflicts with: a session can
 * therefore never be created for a user who is being disabled and escape the revocation.
 *
 * Ids that are not canonical uuid text are refused with BG_ERR_NOT_FOUND before any query: a path
 * id like "123" is as unknown as a well-formed one, and Postgres would otherwise answer 22P02.
 */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/accounts.h"
#include "bg/buf.h"
#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/id.h"
#include "bg/json.h"
#include "bg/log.h"
#include "bg/pg.h"
#include "bg/timeutil.h"

/* Random bytes behind a refresh token or an API key: 256 bits, 43 characters of base64url. */
#define SECRET_BYTES 32
#define API_KEY_PREFIX "bgk_"
/* Characters of an API key kept in clear to tell keys apart: "bgk_" and 8 random ones. */
#define API_KEY_SHOWN 12
/* Longest admin search text, in bytes; longer queries are refused rather than cut. */
#define SEARCH_MAX 254
/* Audit details are small objects of our own making; the cap only guards against misuse. */
#define DETAILS_MAX (16 * 1024)
/* Most users one admin list page may hold. */
#define LIST_MAX 1000
/* A decoded admin list cursor: "<created_at with microseconds>|<uuid>". */
#define CURSOR_RAW_MAX 70

/* RFC 3339 UTC text of a timestamptz column, as the API shows times. */
#define TS(col) "to_char((" col ") AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
/* The same with microseconds: exact, for keyset cursors. */
#define TS_US(col) "to_char((" col ") AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"

/* The columns read_user() expects, over `users u` joined with USER_JOIN. */
#define USER_COLS                                                                                  \
    "u.id, coalesce(u.email, ''), u.name, u.locale, u.role, u.status, coalesce(po.id::text, "      \
    "''), " TS("u.created_at") ", u.deleted_at IS NOT NULL"
#define USER_NCOLS 9
#define USER_JOIN " LEFT JOIN organizations po ON po.owner_id = u.id AND po.personal"

/* The columns read_key() expects, over `api_keys k`. */
#define KEY_COLS                                                                                   \
    "k.id, k.name, k.prefix, array_to_string(k.scopes, ','), " TS(                                 \
        "k.created_at") ", coalesce(" TS("k.last_used_at") ", '')"
#define KEY_NCOLS 6

/* ---- small helpers ---- */

/* Clears *res (which may be NULL) and forgets it, so clean-up labels can clear unconditionally. */
static void clear(PGresult **res)
{
    PQclear(*res);
    *res = NULL;
}

/* Text of a field, "" for SQL NULL (borrowed from res). */
static const char *text(const PGresult *res, int row, int col)
{
    const char *v = bg_pg_value(res, row, col);
    return v != NULL ? v : "";
}

static void copy(char *dst, size_t size, const PGresult *res, int row, int col)
{
    /* Buffers are sized for the longest value the schema accepts (see accounts.h). */
    (void)bg_strlcpy(dst, text(res, row, col), size);
}

static bool flag(const PGresult *res, int row, int col)
{
    return strcmp(text(res, row, col), "t") == 0;
}

static void read_user(const PGresult *res, int row, int col, bg_user_t *out)
{
    memset(out, 0, sizeof(*out));
    copy(out->id, sizeof(out->id), res, row, col);
    copy(out->email, sizeof(out->email), res, row, col + 1);
    copy(out->name, sizeof(out->name), res, row, col + 2);
    copy(out->locale, sizeof(out->locale), res, row, col + 3);
    copy(out->role, sizeof(out->role), res, row, col + 4);
    copy(out->status, sizeof(out->status), res, row, col + 5);
    copy(out->organization_id, sizeof(out->organization_id), res, row, col + 6);
    copy(out->created_at, sizeof(out->created_at), res, row, col + 7);
    out->deleted = flag(res, row, col + 8);
}

static void read_key(const PGresult *res, int row, int col, bg_api_key_t *out)
{
    memset(out, 0, sizeof(*out));
    copy(out->id, sizeof(out->id), res, row, col);
    copy(out->name, sizeof(out->name), res, row, col + 1);
    copy(out->prefix, sizeof(out->prefix), res, row, col + 2);
    copy(out->scopes, sizeof(out->scopes), res, row, col + 3);
    copy(out->created_at, sizeof(out->created_at), res, row, col + 4);
    copy(out->last_used_at, sizeof(out->last_used_at), res, row, col + 5);
}

static void set_str(const char **p, const char *v)
{
    if (p != NULL)
        *p = v;
}

/* Returns ip when it is a textual IPv4 or IPv6 address, else NULL (stored as SQL NULL): a bad
 * address from a proxy header must not make the action it describes fail. */
static const char *ip_or_null(const char *ip)
{
    unsigned char addr[sizeof(struct in6_addr)];
    if (ip == NULL)
        return NULL;
    if (inet_pton(AF_INET, ip, addr) == 1 || inet_pton(AF_INET6, ip, addr) == 1)
        return ip;
    return NULL;
}

/* True when s looks like a secret we issued: present and shorter than our buffers. */
static bool secret_plausible(const char *s)
{
    return s != NULL && s[0] != '\0' && strnlen(s, BG_ACCT_TOKEN_LEN) < BG_ACCT_TOKEN_LEN;
}

/*
 * Makes a new secret, prefix followed by SECRET_BYTES of base64url, into out, and its SHA-256 hex
 * into hash. Returns 0 or BG_ERR_TOO_LARGE (cannot happen with our sizes).
 */
static int new_secret(const char *prefix, char out[BG_ACCT_TOKEN_LEN],
                      char hash[BG_CRYPTO_SHA256_HEX_LEN])
{
    size_t plen = strlen(prefix);
    if (plen >= BG_ACCT_TOKEN_LEN)
        return BG_ERR_TOO_LARGE;
    memcpy(out, prefix, plen);
    int rc = bg_crypto_random_token(SECRET_BYTES, out + plen, BG_ACCT_TOKEN_LEN - plen);
    if (rc != 0) {
        out[0] = '\0';
        return rc;
    }
    bg_crypto_sha256_hex(out, strlen(out), hash);
    return 0;
}

/* ---- audit ---- */

/* A JSON object under construction, for audit details. */
typedef struct st_details {
    bg_buf_t buf;
    bg_json_writer_t w;
} details_t;

static void details_begin(details_t *d)
{
    bg_buf_init(&d->buf, DETAILS_MAX);
    bg_json_writer_init(&d->w, &d->buf);
    bg_json_write_begin_object(&d->w);
}

/* Closes the object; returns 0 with the text in d->buf.base, or the writer's error. */
static int details_end(details_t *d)
{
    bg_json_write_end_object(&d->w);
    return bg_json_write_finish(&d->w);
}

static void details_dispose(details_t *d)
{
    bg_buf_dispose(&d->buf);
}

/* Appends an audit row; org_id (may be NULL) is the organization it concerns. */
static int audit(PGconn *c, const bg_actor_t *actor, const char *action, const char *target_type,
                 const char *target_id, const char *org_id, const char *details_json)
{
    const char *kind = actor != NULL && actor->kind != NULL ? actor->kind : "system";
    const char *actor_id = actor != NULL && bg_id_uuid_is_valid(actor->id) ? actor->id : NULL;
    const char *request_id = actor != NULL ? actor->request_id : NULL;
    const char *ip = actor != NULL ? ip_or_null(actor->ip) : NULL;
    const char *p[] = {kind,        actor_id,  action,
                       target_type, target_id, bg_id_uuid_is_valid(org_id) ? org_id : NULL,
                       request_id,  ip,        details_json};
    return bg_pg_run(c,
                     "INSERT INTO audit_log (actor_kind, actor_id, action, target_type, target_id, "
                     "organization_id, request_id, ip, details) "
                     "VALUES ($1, $2, $3, $4, $5, $6, $7, $8::inet, coalesce($9::jsonb, '{}'))",
                     9, p);
}

int bg_acct_audit(PGconn *c, const bg_actor_t *actor, const char *action, const char *target_type,
                  const char *target_id, const char *details_json)
{
    return audit(c, actor, action, target_type, target_id, NULL, details_json);
}

/* Builds details with one string member and appends the audit row. */
static int audit1(PGconn *c, const bg_actor_t *actor, const char *action, const char *target_type,
                  const char *target_id, const char *org_id, const char *key, const char *value)
{
    details_t d;
    details_begin(&d);
    bg_json_write_field_str(&d.w, key, value);
    int rc = details_end(&d);
    if (rc == 0)
        rc = audit(c, actor, action, target_type, target_id, org_id, d.buf.base);
    details_dispose(&d);
    return rc;
}

/* ---- sessions (internal) ---- */

/*
 * Revokes the live sessions of a user (by_user) or one session (else), and all their tokens, with
 * reason. Sessions are updated (locked) before their tokens, as everywhere in this file.
 */
static int revoke_sessions(PGconn *c, bool by_user, const char *id, const char *reason)
{
    const char *p[] = {id, reason};
    return bg_pg_run(c,
                     by_user ? "WITH s AS (UPDATE auth_sessions SET revoked_at = now(), "
                               "revoked_reason = $2 WHERE user_id = $1 AND revoked_at IS NULL "
                               "RETURNING id) "
                               "UPDATE refresh_tokens t SET revoked_at = now() FROM s "
                               "WHERE t.session_id = s.id AND t.revoked_at IS NULL"
                             : "WITH s AS (UPDATE auth_sessions SET revoked_at = now(), "
                               "revoked_reason = $2 WHERE id = $1 AND revoked_at IS NULL "
                               "RETURNING id) "
                               "UPDATE refresh_tokens t SET revoked_at = now() FROM s "
                               "WHERE t.session_id = s.id AND t.revoked_at IS NULL",
                     2, p);
}

/* ---- users ---- */

/* Loads the user with id; only a live one unless deleted_too. NOT_FOUND when there is none. */
static int load_user(PGconn *c, const char *user_id, bool deleted_too, bg_user_t *out)
{
    PGresult *res;
    const char *p[] = {user_id};
    int rc =
        bg_pg_exec(c,
                   deleted_too ? "SELECT " USER_COLS " FROM users u" USER_JOIN " WHERE u.id = $1"
                               : "SELECT " USER_COLS " FROM users u" USER_JOIN
                                 " WHERE u.id = $1 AND u.deleted_at IS NULL",
                   1, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) != 1) {
        PQclear(res);
        return BG_ERR_NOT_FOUND;
    }
    read_user(res, 0, 0, out);
    PQclear(res);
    return 0;
}

int bg_acct_register(PGconn *c, const char *email, const char *password_hash, const char *name,
                     const char *locale, const bg_actor_t *actor, bg_user_t *out)
{
    if (email == NULL || password_hash == NULL || out == NULL)
        return BG_ERR_INVALID;
    const char *nm = name != NULL ? name : "";
    char days[16];
    snprintf(days, sizeof(days), "%d", BG_ACCT_TRIAL_DAYS);

    PGresult *res = NULL;
    details_t d;
    details_begin(&d);
    int rc = bg_pg_begin(c);
    if (rc != 0)
        goto err_details;
    const char *up[] = {email, password_hash, nm, locale != NULL ? locale : "en"};
    rc = bg_pg_exec(c,
                    "INSERT INTO users (email, password_hash, name, locale) "
                    "VALUES ($1, $2, $3, $4) RETURNING id",
                    4, up, &res);
    if (rc != 0)
        goto err_rollback;
    char user_id[BG_ACCT_ID_LEN];
    copy(user_id, sizeof(user_id), res, 0, 0);
    clear(&res);

    /*
     * The personal organization, the owner membership, the billing account (its trial marked as
     * used) and the trial subscription, in one statement. The name is cut to leave room for the
     * suffix within the 200 characters an organization name may have.
     */
    const char *op[] = {user_id, email, nm, days};
    rc = bg_pg_exec(
        c,
        "WITH o AS (INSERT INTO organizations (name, personal, owner_id) "
        "  VALUES (left(CASE WHEN $3 = '' THEN $2 ELSE $3 END, 188) || '''s workspace', true, $1) "
        "  RETURNING id), "
        "m AS (INSERT INTO memberships (organization_id, user_id, role) "
        "  SELECT id, $1, 'owner' FROM o), "
        "b AS (INSERT INTO billing_accounts (user_id, trial_used_at) VALUES ($1, now()) "
        "  RETURNING id), "
        "s AS (INSERT INTO subscriptions (billing_account_id, user_id, plan_id, status, "
        "  current_period_start, current_period_end, trial_ends_at) "
        "  SELECT b.id, $1, 'trial', 'trialing', now(), now() + make_interval(days => $4::int), "
        "  now() + make_interval(days => $4::int) FROM b RETURNING " TS(
            "trial_ends_at") ") "
                             "SELECT o.id, s.* FROM o, s",
        4, op, &res);
    if (rc != 0)
        goto err_rollback;
    char org_id[BG_ACCT_ID_LEN];
    copy(org_id, sizeof(org_id), res, 0, 0);
    bg_json_write_field_str(&d.w, "locale", up[3]);
    bg_json_write_field_str(&d.w, "plan", "trial");
    bg_json_write_field_str(&d.w, "trial_ends_at", text(res, 0, 1));
    clear(&res);
    rc = details_end(&d);
    if (rc != 0)
        goto err_rollback;

    /* The person registering is the actor, whatever the caller knew of them. */
    bg_actor_t who = actor != NULL ? *actor : (bg_actor_t){.kind = "user"};
    if (who.id == NULL)
        who.id = user_id;
    rc = audit(c, &who, "user.register", "user", user_id, org_id, d.buf.base);
    if (rc != 0)
        goto err_rollback;
    rc = load_user(c, user_id, false, out);
    if (rc != 0)
        goto err_rollback;
    rc = bg_pg_commit(c);
    details_dispose(&d);
    return rc;

err_rollback:
    clear(&res);
    bg_pg_rollback(c);
err_details:
    details_dispose(&d);
    return rc;
}

int bg_acct_find_for_login(PGconn *c, const char *email, bg_user_t *out, char *hash, size_t hashlen)
{
    if (email == NULL || out == NULL || hash == NULL || hashlen == 0)
        return BG_ERR_INVALID;
    hash[0] = '\0';
    PGresult *res;
    const char *p[] = {email};
    int rc = bg_pg_exec(c,
                        "SELECT " USER_COLS ", coalesce(u.password_hash, '') FROM users u" USER_JOIN
                        " WHERE lower(u.email) = lower($1) AND u.deleted_at IS NULL",
                        1, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) != 1) {
        PQclear(res);
        return BG_ERR_NOT_FOUND;
    }
    read_user(res, 0, 0, out);
    /* A hash that does not fit would fail verification in a way nobody could explain. */
    if (!bg_strlcpy(hash, text(res, 0, USER_NCOLS), hashlen)) {
        bg_crypto_wipe(hash, hashlen);
        rc = BG_ERR_TOO_LARGE;
    }
    PQclear(res);
    return rc;
}

int bg_acct_get_user(PGconn *c, const char *user_id, bg_user_t *out)
{
    if (!bg_id_uuid_is_valid(user_id))
        return BG_ERR_NOT_FOUND;
    return load_user(c, user_id, false, out);
}

int bg_acct_plan_summary(PGconn *c, const char *user_id, bg_plan_summary_t *out)
{
    memset(out, 0, sizeof(*out));
    bg_strlcpy(out->status, "none", sizeof(out->status));
    if (!bg_id_uuid_is_valid(user_id))
        return BG_ERR_NOT_FOUND;
    PGresult *res = NULL;
    const char *p[] = {user_id};
    int rc = bg_pg_exec(
        c,
        "SELECT s.plan_id, p.name, s.status, "
        "coalesce(to_char(s.trial_ends_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), "
        "''), "
        "to_char(s.current_period_end AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') "
        "FROM subscriptions s JOIN plans p ON p.id = s.plan_id "
        "WHERE s.user_id = $1 AND s.status <> 'canceled' ORDER BY s.created_at DESC LIMIT 1",
        1, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) == 1) {
        copy(out->plan, sizeof(out->plan), res, 0, 0);
        copy(out->name, sizeof(out->name), res, 0, 1);
        copy(out->status, sizeof(out->status), res, 0, 2);
        copy(out->trial_ends_at, sizeof(out->trial_ends_at), res, 0, 3);
        copy(out->period_end, sizeof(out->period_end), res, 0, 4);
    }
    clear(&res);
    return 0;
}

int bg_acct_update_profile(PGconn *c, const char *user_id, const char *name, const char *locale,
                           bg_user_t *out)
{
    if (!bg_id_uuid_is_valid(user_id))
        return BG_ERR_NOT_FOUND;
    PGresult *res = NULL;
    details_t d;
    details_begin(&d);
    int rc = bg_pg_begin(c);
    if (rc != 0)
        goto err_details;
    const char *p[] = {user_id, name, locale};
    rc = bg_pg_exec(c,
                    "WITH u AS (UPDATE users SET name = coalesce($2, name), "
                    "locale = coalesce($3, locale) WHERE id = $1 AND deleted_at IS NULL "
                    "RETURNING *) SELECT " USER_COLS " FROM u" USER_JOIN,
                    3, p, &res);
    if (rc != 0)
        goto err_rollback;
    if (PQntuples(res) != 1) {
        rc = BG_ERR_NOT_FOUND;
        goto err_rollback;
    }
    read_user(res, 0, 0, out);
    clear(&res);
    if (name != NULL)
        bg_json_write_field_str(&d.w, "name", name);
    if (locale != NULL)
        bg_json_write_field_str(&d.w, "locale", locale);
    rc = details_end(&d);
    if (rc != 0)
        goto err_rollback;
    if (name != NULL || locale != NULL) {
        bg_actor_t self = {.kind = "user", .id = user_id};
        rc = audit(c, &self, "user.update", "user", user_id, NULL, d.buf.base);
        if (rc != 0)
            goto err_rollback;
    }
    rc = bg_pg_commit(c);
    details_dispose(&d);
    return rc;

err_rollback:
    clear(&res);
    bg_pg_rollback(c);
err_details:
    details_dispose(&d);
    return rc;
}

int bg_acct_touch_login(PGconn *c, const char *user_id)
{
    if (!bg_id_uuid_is_valid(user_id))
        return BG_ERR_NOT_FOUND;
    PGresult *res;
    const char *p[] = {user_id};
    int rc =
        bg_pg_exec(c, "UPDATE users SET last_login_at = now() WHERE id = $1 AND deleted_at IS NULL",
                   1, p, &res);
    if (rc != 0)
        return rc;
    rc = strcmp(PQcmdTuples(res), "1") == 0 ? 0 : BG_ERR_NOT_FOUND;
    PQclear(res);
    return rc;
}

/* ---- sessions and refresh tokens ---- */

int bg_acct_session_start(PGconn *c, const char *user_id, const char *user_agent, const char *ip,
                          int64_t ttl_s, int64_t token_ttl_s, char session_id[BG_ACCT_ID_LEN],
                          char token[BG_ACCT_TOKEN_LEN])
{
    token[0] = '\0';
    session_id[0] = '\0';
    if (!bg_id_uuid_is_valid(user_id))
        return BG_ERR_NOT_FOUND;
    if (ttl_s <= 0 || token_ttl_s <= 0)
        return BG_ERR_INVALID;
    char secret[BG_ACCT_TOKEN_LEN], hash[BG_CRYPTO_SHA256_HEX_LEN];
    int rc = new_secret("", secret, hash);
    if (rc != 0)
        return rc;
    char ttl[24], token_ttl[24];
    snprintf(ttl, sizeof(ttl), "%lld", (long long)ttl_s);
    snprintf(token_ttl, sizeof(token_ttl), "%lld", (long long)token_ttl_s);

    PGresult *res = NULL;
    rc = bg_pg_begin(c);
    if (rc != 0)
        goto err_wipe;
    /* FOR SHARE: an admin disabling this user now waits for us, then revokes what we made. */
    const char *up[] = {user_id};
    rc = bg_pg_exec(c, "SELECT status FROM users WHERE id = $1 AND deleted_at IS NULL FOR SHARE", 1,
                    up, &res);
    if (rc != 0)
        goto err_rollback;
    if (PQntuples(res) != 1) {
        rc = BG_ERR_NOT_FOUND;
        goto err_rollback;
    }
    if (strcmp(text(res, 0, 0), "active") != 0) {
        rc = BG_ERR_DENIED;
        goto err_rollback;
    }
    clear(&res);

    const char *p[] = {user_id, user_agent, ip_or_null(ip), ttl, hash, token_ttl};
    rc = bg_pg_exec(c,
                    "WITH s AS (INSERT INTO auth_sessions (user_id, user_agent, ip, expires_at) "
                    "  VALUES ($1, left($2, 512), $3::inet, now() + $4::bigint * interval '1 s') "
                    "  RETURNING id, expires_at) "
                    "INSERT INTO refresh_tokens (session_id, token_hash, expires_at) "
                    "SELECT s.id, $5, least(now() + $6::bigint * interval '1 s', s.expires_at) "
                    "FROM s RETURNING session_id",
                    6, p, &res);
    if (rc != 0)
        goto err_rollback;
    char sid[BG_ACCT_ID_LEN];
    copy(sid, sizeof(sid), res, 0, 0);
    clear(&res);
    rc = bg_pg_commit(c);
    if (rc != 0)
        goto err_wipe;
    (void)bg_strlcpy(session_id, sid, BG_ACCT_ID_LEN);
    (void)bg_strlcpy(token, secret, BG_ACCT_TOKEN_LEN);
    bg_crypto_wipe(secret, sizeof(secret));
    return 0;

err_rollback:
    clear(&res);
    bg_pg_rollback(c);
err_wipe:
    bg_crypto_wipe(secret, sizeof(secret));
    return rc;
}

/* What a refresh found, read under the session lock. */
typedef struct st_refresh_state {
    char token_id[BG_ACCT_ID_LEN];
    bool session_revoked, session_expired;
    bool token_used, token_revoked, token_expired;
} refresh_state_t;

/*
 * Chooses the refusal for a presented token, or NULL when it may be rotated. "reuse" means the
 * token was used before and its family must be revoked. The user is checked first: a disabled
 * account is the reason worth telling, whatever became of the session.
 */
static const char *refresh_verdict(const bg_user_t *u, const refresh_state_t *st)
{
    if (u->deleted)
        return "revoked";
    if (strcmp(u->status, "active") != 0)
        return "user_disabled";
    if (st->session_revoked)
        return "revoked";
    if (st->session_expired)
        return "expired";
    if (st->token_used)
        return "reuse";
    if (st->token_revoked)
        return "revoked";
    if (st->token_expired)
        return "expired";
    return NULL;
}

int bg_acct_session_refresh(PGconn *c, const char *token, int64_t token_ttl_s,
                            char new_token[BG_ACCT_TOKEN_LEN], bg_user_t *user,
                            char session_id[BG_ACCT_ID_LEN], const char **why)
{
    new_token[0] = '\0';
    session_id[0] = '\0';
    set_str(why, NULL);
    if (token_ttl_s <= 0)
        return BG_ERR_INVALID;
    if (!secret_plausible(token)) {
        set_str(why, "unknown");
        return BG_ERR_DENIED;
    }
    char hash[BG_CRYPTO_SHA256_HEX_LEN];
    bg_crypto_sha256_hex(token, strlen(token), hash);
    char secret[BG_ACCT_TOKEN_LEN], secret_hash[BG_CRYPTO_SHA256_HEX_LEN];
    int rc = new_secret("", secret, secret_hash);
    if (rc != 0)
        return rc;
    char token_ttl[24];
    snprintf(token_ttl, sizeof(token_ttl), "%lld", (long long)token_ttl_s);

    const char *verdict = "unknown";
    char sid[BG_ACCT_ID_LEN];
    bg_user_t u;
    refresh_state_t st = {0};
    PGresult *res = NULL;
    rc = bg_pg_begin(c);
    if (rc != 0)
        goto err_wipe;
    const char *hp[] = {hash};
    rc = bg_pg_exec(c, "SELECT session_id FROM refresh_tokens WHERE token_hash = $1", 1, hp, &res);
    if (rc != 0)
        goto err_rollback;
    if (PQntuples(res) != 1)
        goto err_denied;
    copy(sid, sizeof(sid), res, 0, 0);
    clear(&res);

    /* The family lock: concurrent refreshes, reuse detection and revocations queue here. */
    const char *sp[] = {sid};
    rc = bg_pg_exec(c,
                    "SELECT " USER_COLS ", s.revoked_at IS NOT NULL, s.expires_at <= now() "
                    "FROM auth_sessions s JOIN users u ON u.id = s.user_id" USER_JOIN
                    " WHERE s.id = $1 FOR UPDATE OF s",
                    1, sp, &res);
    if (rc != 0)
        goto err_rollback;
    if (PQntuples(res) != 1)
        goto err_denied;
    read_user(res, 0, 0, &u);
    st.session_revoked = flag(res, 0, USER_NCOLS);
    st.session_expired = flag(res, 0, USER_NCOLS + 1);
    clear(&res);

    /* A statement started after the lock was granted: it sees what the previous holder wrote. */
    rc = bg_pg_exec(c,
                    "SELECT id, used_at IS NOT NULL, revoked_at IS NOT NULL, expires_at <= now() "
                    "FROM refresh_tokens WHERE token_hash = $1",
                    1, hp, &res);
    if (rc != 0)
        goto err_rollback;
    if (PQntuples(res) != 1)
        goto err_denied;
    copy(st.token_id, sizeof(st.token_id), res, 0, 0);
    st.token_used = flag(res, 0, 1);
    st.token_revoked = flag(res, 0, 2);
    st.token_expired = flag(res, 0, 3);
    clear(&res);

    verdict = refresh_verdict(&u, &st);
    if (verdict != NULL && strcmp(verdict, "reuse") == 0) {
        /*
         * RFC 9700 §4.14.2: a used token presented again means that it leaked (or a client raced
         * itself); either way nobody can tell the holder from the thief, so the family goes.
         */
        rc = revoke_sessions(c, false, sid, "reuse_detected");
        if (rc == 0)
            rc = audit1(c, &(bg_actor_t){.kind = "system"}, "session.reuse_detected", "session",
                        sid, NULL, "user_id", u.id);
        if (rc == 0)
            rc = bg_pg_commit(c);
        if (rc != 0)
            goto err_rollback;
        bg_warn("refresh token reuse: session %s of user %s revoked", sid, u.id);
        set_str(why, verdict);
        bg_crypto_wipe(secret, sizeof(secret));
        return BG_ERR_DENIED;
    }
    if (verdict != NULL)
        goto err_denied;

    const char *rp[] = {st.token_id, sid, secret_hash, token_ttl};
    rc = bg_pg_exec(c,
                    "WITH used AS (UPDATE refresh_tokens SET used_at = now() WHERE id = $1), "
                    "s AS (UPDATE auth_sessions SET last_used_at = now() WHERE id = $2 "
                    "  RETURNING expires_at) "
                    "INSERT INTO refresh_tokens (session_id, token_hash, parent_id, expires_at) "
                    "SELECT $2, $3, $1, least(now() + $4::bigint * interval '1 s', s.expires_at) "
                    "FROM s",
                    4, rp, &res);
    if (rc != 0)
        goto err_rollback;
    clear(&res);
    rc = bg_pg_commit(c);
    if (rc != 0)
        goto err_wipe;
    if (user != NULL)
        *user = u;
    (void)bg_strlcpy(session_id, sid, BG_ACCT_ID_LEN);
    (void)bg_strlcpy(new_token, secret, BG_ACCT_TOKEN_LEN);
    bg_crypto_wipe(secret, sizeof(secret));
    return 0;

err_denied:
    /* Refusals other than reuse change nothing. */
    rc = BG_ERR_DENIED;
    set_str(why, verdict);
err_rollback:
    clear(&res);
    bg_pg_rollback(c);
err_wipe:
    bg_crypto_wipe(secret, sizeof(secret));
    return rc;
}

int bg_acct_session_revoke(PGconn *c, const char *user_id, const char *session_id,
                           const char *reason)
{
    if (!bg_id_uuid_is_valid(user_id) || !bg_id_uuid_is_valid(session_id))
        return BG_ERR_NOT_FOUND;
    if (reason == NULL)
        return BG_ERR_INVALID;
    PGresult *res = NULL;
    int rc = bg_pg_begin(c);
    if (rc != 0)
        return rc;
    /* Locks the family first; an already revoked session keeps its first reason. */
    const char *p[] = {session_id, user_id};
    rc = bg_pg_exec(c, "SELECT 1 FROM auth_sessions WHERE id = $1 AND user_id = $2 FOR UPDATE", 2,
                    p, &res);
    if (rc != 0)
        goto err_rollback;
    if (PQntuples(res) != 1) {
        rc = BG_ERR_NOT_FOUND;
        goto err_rollback;
    }
    clear(&res);
    rc = revoke_sessions(c, false, session_id, reason);
    if (rc != 0)
        goto err_rollback;
    return bg_pg_commit(c);

err_rollback:
    clear(&res);
    bg_pg_rollback(c);
    return rc;
}

int bg_acct_session_of_token(PGconn *c, const char *token, char session_id[BG_ACCT_ID_LEN],
                             char user_id[BG_ACCT_ID_LEN])
{
    session_id[0] = '\0';
    user_id[0] = '\0';
    if (!secret_plausible(token))
        return BG_ERR_NOT_FOUND;
    char hash[BG_CRYPTO_SHA256_HEX_LEN];
    bg_crypto_sha256_hex(token, strlen(token), hash);
    PGresult *res;
    const char *p[] = {hash};
    int rc = bg_pg_exec(c,
                        "SELECT t.session_id, s.user_id FROM refresh_tokens t "
                        "JOIN auth_sessions s ON s.id = t.session_id WHERE t.token_hash = $1",
                        1, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) != 1) {
        PQclear(res);
        return BG_ERR_NOT_FOUND;
    }
    copy(session_id, BG_ACCT_ID_LEN, res, 0, 0);
    copy(user_id, BG_ACCT_ID_LEN, res, 0, 1);
    PQclear(res);
    return 0;
}

/* ---- API keys ---- */

int bg_acct_api_key_create(PGconn *c, const char *user_id, const char *name, const char *scopes,
                           const bg_actor_t *actor, char key[BG_ACCT_TOKEN_LEN], bg_api_key_t *out)
{
    key[0] = '\0';
    if (!bg_id_uuid_is_valid(user_id))
        return BG_ERR_NOT_FOUND;
    if (name == NULL || (scopes != NULL && strlen(scopes) > BG_ACCT_SCOPES_MAX))
        return BG_ERR_INVALID;
    char secret[BG_ACCT_TOKEN_LEN], hash[BG_CRYPTO_SHA256_HEX_LEN];
    int rc = new_secret(API_KEY_PREFIX, secret, hash);
    if (rc != 0)
        return rc;
    char prefix[API_KEY_SHOWN + 1];
    (void)bg_strlcpy(prefix, secret, sizeof(prefix));

    PGresult *res = NULL;
    details_t d;
    details_begin(&d);
    rc = bg_pg_begin(c);
    if (rc != 0)
        goto err_wipe;
    /* Empty items ("chat,,") are dropped; scopes are free-form here, checked where they are used.
     */
    const char *p[] = {user_id, name, prefix, hash, scopes != NULL ? scopes : ""};
    rc = bg_pg_exec(c,
                    "WITH k AS (INSERT INTO api_keys (user_id, organization_id, name, prefix, "
                    "  key_hash, scopes) "
                    "  SELECT u.id, po.id, $2, $3, $4, "
                    "  array_remove(string_to_array($5, ','), '') "
                    "  FROM users u" USER_JOIN " WHERE u.id = $1 AND u.deleted_at IS NULL "
                    "  RETURNING *) "
                    "SELECT " KEY_COLS ", k.organization_id FROM k",
                    5, p, &res);
    if (rc != 0)
        goto err_rollback;
    if (PQntuples(res) != 1) {
        rc = BG_ERR_NOT_FOUND;
        goto err_rollback;
    }
    read_key(res, 0, 0, out);
    bg_json_write_field_str(&d.w, "name", out->name);
    bg_json_write_field_str(&d.w, "prefix", out->prefix);
    bg_json_write_field_str(&d.w, "scopes", out->scopes);
    char org_id[BG_ACCT_ID_LEN];
    copy(org_id, sizeof(org_id), res, 0, KEY_NCOLS);
    clear(&res);
    rc = details_end(&d);
    if (rc != 0)
        goto err_rollback;
    rc = audit(c, actor, "api_key.create", "api_key", out->id, org_id, d.buf.base);
    if (rc != 0)
        goto err_rollback;
    rc = bg_pg_commit(c);
    if (rc != 0)
        goto err_wipe;
    (void)bg_strlcpy(key, secret, BG_ACCT_TOKEN_LEN);
    bg_crypto_wipe(secret, sizeof(secret));
    details_dispose(&d);
    return 0;

err_rollback:
    clear(&res);
    bg_pg_rollback(c);
err_wipe:
    bg_crypto_wipe(secret, sizeof(secret));
    details_dispose(&d);
    return rc;
}

int bg_acct_api_key_list(PGconn *c, const char *user_id, bg_api_key_t *out, size_t max,
                         size_t *count)
{
    *count = 0;
    if (!bg_id_uuid_is_valid(user_id))
        return BG_ERR_NOT_FOUND;
    if (max == 0)
        return 0;
    char limit[24];
    snprintf(limit, sizeof(limit), "%zu", max);
    PGresult *res;
    const char *p[] = {user_id, limit};
    int rc =
        bg_pg_exec(c,
                   "SELECT " KEY_COLS " FROM api_keys k WHERE k.user_id = $1 "
                   "AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now()) "
                   "ORDER BY k.created_at DESC, k.id DESC LIMIT $2::bigint",
                   2, p, &res);
    if (rc != 0)
        return rc;
    int n = PQntuples(res);
    for (int i = 0; i < n && (size_t)i < max; i++)
        read_key(res, i, 0, &out[i]);
    *count = (size_t)n < max ? (size_t)n : max;
    PQclear(res);
    return 0;
}

int bg_acct_api_key_revoke(PGconn *c, const char *user_id, const char *key_id,
                           const bg_actor_t *actor)
{
    if (!bg_id_uuid_is_valid(user_id) || !bg_id_uuid_is_valid(key_id))
        return BG_ERR_NOT_FOUND;
    PGresult *res = NULL;
    int rc = bg_pg_begin(c);
    if (rc != 0)
        return rc;
    const char *p[] = {key_id, user_id};
    rc = bg_pg_exec(c,
                    "UPDATE api_keys SET revoked_at = now() "
                    "WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL "
                    "RETURNING prefix, organization_id",
                    2, p, &res);
    if (rc != 0)
        goto err_rollback;
    if (PQntuples(res) != 1) {
        rc = BG_ERR_NOT_FOUND;
        goto err_rollback;
    }
    char org_id[BG_ACCT_ID_LEN];
    copy(org_id, sizeof(org_id), res, 0, 1);
    rc = audit1(c, actor, "api_key.revoke", "api_key", key_id, org_id, "prefix", text(res, 0, 0));
    if (rc != 0)
        goto err_rollback;
    clear(&res);
    return bg_pg_commit(c);

err_rollback:
    clear(&res);
    bg_pg_rollback(c);
    return rc;
}

int bg_acct_api_key_verify(PGconn *c, const char *key, bg_user_t *user, bg_api_key_t *out)
{
    if (!secret_plausible(key) || strncmp(key, API_KEY_PREFIX, strlen(API_KEY_PREFIX)) != 0)
        return BG_ERR_DENIED;
    char hash[BG_CRYPTO_SHA256_HEX_LEN];
    bg_crypto_sha256_hex(key, strlen(key), hash);
    PGresult *res;
    const char *p[] = {hash};
    int rc = bg_pg_exec(c,
                        "SELECT " USER_COLS ", " KEY_COLS " FROM api_keys k "
                        "JOIN users u ON u.id = k.user_id" USER_JOIN
                        " WHERE k.key_hash = $1 AND k.revoked_at IS NULL "
                        "AND (k.expires_at IS NULL OR k.expires_at > now()) "
                        "AND u.deleted_at IS NULL AND u.status = 'active'",
                        1, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) != 1) {
        PQclear(res);
        return BG_ERR_DENIED;
    }
    read_user(res, 0, 0, user);
    read_key(res, 0, USER_NCOLS, out);
    PQclear(res);

    /* At most one write per key and minute, however busy the key: a hot key is not a hot row. */
    const char *kp[] = {out->id};
    rc = bg_pg_run(c,
                   "UPDATE api_keys SET last_used_at = now() WHERE id = $1 "
                   "AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
                   1, kp);
    if (rc != 0)
        bg_warn("api key %s: last_used_at not updated: %s", out->id, bg_strerror(rc));
    return 0;
}

/* ---- organizations ---- */

static void read_org(const PGresult *res, int row, bg_org_t *out)
{
    memset(out, 0, sizeof(*out));
    copy(out->id, sizeof(out->id), res, row, 0);
    copy(out->name, sizeof(out->name), res, row, 1);
    out->personal = flag(res, row, 2);
    copy(out->my_role, sizeof(out->my_role), res, row, 3);
}

int bg_acct_org_list(PGconn *c, const char *user_id, bg_org_t *out, size_t max, size_t *count)
{
    *count = 0;
    if (!bg_id_uuid_is_valid(user_id))
        return BG_ERR_NOT_FOUND;
    if (max == 0)
        return 0;
    char limit[24];
    snprintf(limit, sizeof(limit), "%zu", max);
    PGresult *res;
    const char *p[] = {user_id, limit};
    int rc = bg_pg_exec(c,
                        "SELECT o.id, o.name, o.personal, m.role FROM memberships m "
                        "JOIN organizations o ON o.id = m.organization_id "
                        "WHERE m.user_id = $1 AND o.deleted_at IS NULL "
                        "ORDER BY o.personal DESC, o.created_at, o.id LIMIT $2::bigint",
                        2, p, &res);
    if (rc != 0)
        return rc;
    int n = PQntuples(res);
    for (int i = 0; i < n && (size_t)i < max; i++)
        read_org(res, i, &out[i]);
    *count = (size_t)n < max ? (size_t)n : max;
    PQclear(res);
    return 0;
}

int bg_acct_org_create(PGconn *c, const char *user_id, const char *name, const bg_actor_t *actor,
                       bg_org_t *out)
{
    if (!bg_id_uuid_is_valid(user_id))
        return BG_ERR_NOT_FOUND;
    if (name == NULL)
        return BG_ERR_INVALID;
    PGresult *res = NULL;
    int rc = bg_pg_begin(c);
    if (rc != 0)
        return rc;
    const char *p[] = {user_id, name};
    rc = bg_pg_exec(c,
                    "WITH o AS (INSERT INTO organizations (name, owner_id) "
                    "  SELECT $2, id FROM users WHERE id = $1 AND deleted_at IS NULL "
                    "  RETURNING id, name, personal), "
                    "m AS (INSERT INTO memberships (organization_id, user_id, role) "
                    "  SELECT id, $1, 'owner' FROM o) "
                    "SELECT o.id, o.name, o.personal, 'owner' FROM o",
                    2, p, &res);
    if (rc != 0)
        goto err_rollback;
    if (PQntuples(res) != 1) {
        rc = BG_ERR_NOT_FOUND;
        goto err_rollback;
    }
    read_org(res, 0, out);
    clear(&res);
    rc = audit1(c, actor, "org.create", "organization", out->id, out->id, "name", out->name);
    if (rc != 0)
        goto err_rollback;
    return bg_pg_commit(c);

err_rollback:
    clear(&res);
    bg_pg_rollback(c);
    return rc;
}

/*
 * Reads the caller's role in a live organization into role (8 bytes). With lock, the organization
 * row is locked so that membership changes in it happen one at a time (NO KEY UPDATE: inserting a
 * membership's foreign key elsewhere is not blocked). BG_ERR_NOT_FOUND when the organization does
 * not exist or the caller is no member.
 */
static int caller_role(PGconn *c, const char *user_id, const char *org_id, bool lock, char role[8])
{
    PGresult *res;
    const char *p[] = {org_id, user_id};
    int rc = bg_pg_exec(c,
                        lock ? "SELECT m.role FROM organizations o "
                               "JOIN memberships m ON m.organization_id = o.id AND m.user_id = $2 "
                               "WHERE o.id = $1 AND o.deleted_at IS NULL FOR NO KEY UPDATE OF o"
                             : "SELECT m.role FROM organizations o "
                               "JOIN memberships m ON m.organization_id = o.id AND m.user_id = $2 "
                               "WHERE o.id = $1 AND o.deleted_at IS NULL",
                        2, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) != 1) {
        PQclear(res);
        return BG_ERR_NOT_FOUND;
    }
    copy(role, 8, res, 0, 0);
    PQclear(res);
    return 0;
}

int bg_acct_org_get(PGconn *c, const char *user_id, const char *org_id, bg_org_t *out,
                    bg_org_member_t *members, size_t max, size_t *count)
{
    if (count != NULL)
        *count = 0;
    if (!bg_id_uuid_is_valid(user_id) || !bg_id_uuid_is_valid(org_id))
        return BG_ERR_NOT_FOUND;
    PGresult *res;
    const char *p[] = {org_id, user_id};
    int rc = bg_pg_exec(c,
                        "SELECT o.id, o.name, o.personal, m.role FROM organizations o "
                        "JOIN memberships m ON m.organization_id = o.id AND m.user_id = $2 "
                        "WHERE o.id = $1 AND o.deleted_at IS NULL",
                        2, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) != 1) {
        PQclear(res);
        return BG_ERR_NOT_FOUND;
    }
    read_org(res, 0, out);
    PQclear(res);
    if (members == NULL || max == 0 || count == NULL)
        return 0;

    char limit[24];
    snprintf(limit, sizeof(limit), "%zu", max);
    const char *mp[] = {org_id, limit};
    rc = bg_pg_exec(c,
                    "SELECT u.id, coalesce(u.email, ''), u.name, m.role FROM memberships m "
                    "JOIN users u ON u.id = m.user_id "
                    "WHERE m.organization_id = $1 AND u.deleted_at IS NULL "
                    "ORDER BY CASE m.role WHEN 'owner' THEN 0 WHEN 'admin' THEN 1 ELSE 2 END, "
                    "m.created_at, u.id LIMIT $2::bigint",
                    2, mp, &res);
    if (rc != 0)
        return rc;
    int n = PQntuples(res);
    for (int i = 0; i < n && (size_t)i < max; i++) {
        bg_org_member_t *m = &members[i];
        memset(m, 0, sizeof(*m));
        copy(m->user_id, sizeof(m->user_id), res, i, 0);
        copy(m->email, sizeof(m->email), res, i, 1);
        copy(m->name, sizeof(m->name), res, i, 2);
        copy(m->role, sizeof(m->role), res, i, 3);
    }
    *count = (size_t)n < max ? (size_t)n : max;
    PQclear(res);
    return 0;
}

/* Reads a member's role into role (8 bytes), "" when the user is no member. */
static int member_role(PGconn *c, const char *org_id, const char *user_id, char role[8])
{
    PGresult *res;
    const char *p[] = {org_id, user_id};
    int rc = bg_pg_exec(
        c, "SELECT role FROM memberships WHERE organization_id = $1 AND user_id = $2", 2, p, &res);
    if (rc != 0)
        return rc;
    role[0] = '\0';
    if (PQntuples(res) == 1)
        copy(role, 8, res, 0, 0);
    PQclear(res);
    return 0;
}

static bool can_manage(const char *role)
{
    return strcmp(role, "owner") == 0 || strcmp(role, "admin") == 0;
}

int bg_acct_org_set_member(PGconn *c, const char *user_id, const char *org_id, const char *email,
                           const char *role, const bg_actor_t *actor, const char **what)
{
    set_str(what, NULL);
    if (!bg_id_uuid_is_valid(user_id) || !bg_id_uuid_is_valid(org_id)) {
        set_str(what, "organization");
        return BG_ERR_NOT_FOUND;
    }
    if (email == NULL || role == NULL ||
        (strcmp(role, "owner") != 0 && strcmp(role, "admin") != 0 && strcmp(role, "member") != 0))
        return BG_ERR_INVALID;

    PGresult *res = NULL;
    details_t d;
    details_begin(&d);
    int rc = bg_pg_begin(c);
    if (rc != 0)
        goto err_details;
    char mine[8];
    rc = caller_role(c, user_id, org_id, true, mine);
    if (rc == BG_ERR_NOT_FOUND)
        set_str(what, "organization");
    if (rc != 0)
        goto err_rollback;
    /* Ownership is not handed over here: an organization has exactly its one owner. */
    if (!can_manage(mine) || strcmp(role, "owner") == 0) {
        rc = BG_ERR_DENIED;
        goto err_rollback;
    }
    const char *ep[] = {email};
    rc = bg_pg_exec(c, "SELECT id FROM users WHERE lower(email) = lower($1) AND deleted_at IS NULL",
                    1, ep, &res);
    if (rc != 0)
        goto err_rollback;
    if (PQntuples(res) != 1) {
        set_str(what, "user");
        rc = BG_ERR_NOT_FOUND;
        goto err_rollback;
    }
    char target[BG_ACCT_ID_LEN];
    copy(target, sizeof(target), res, 0, 0);
    clear(&res);
    char before[8];
    rc = member_role(c, org_id, target, before);
    if (rc != 0)
        goto err_rollback;
    if (strcmp(before, "owner") == 0) {
        rc = BG_ERR_DENIED;
        goto err_rollback;
    }
    const char *mp[] = {org_id, target, role};
    rc = bg_pg_run(c,
                   "INSERT INTO memberships (organization_id, user_id, role) VALUES ($1, $2, $3) "
                   "ON CONFLICT (organization_id, user_id) DO UPDATE SET role = EXCLUDED.role",
                   3, mp);
    if (rc != 0)
        goto err_rollback;
    bg_json_write_field_str(&d.w, "user_id", target);
    bg_json_write_field_str(&d.w, "role", role);
    if (before[0] != '\0')
        bg_json_write_field_str(&d.w, "previous_role", before);
    rc = details_end(&d);
    if (rc != 0)
        goto err_rollback;
    rc = audit(c, actor, "org.member.set", "organization", org_id, org_id, d.buf.base);
    if (rc != 0)
        goto err_rollback;
    rc = bg_pg_commit(c);
    details_dispose(&d);
    return rc;

err_rollback:
    clear(&res);
    bg_pg_rollback(c);
err_details:
    details_dispose(&d);
    return rc;
}

int bg_acct_org_remove_member(PGconn *c, const char *user_id, const char *org_id,
                              const char *member_id, const bg_actor_t *actor)
{
    if (!bg_id_uuid_is_valid(user_id) || !bg_id_uuid_is_valid(org_id) ||
        !bg_id_uuid_is_valid(member_id))
        return BG_ERR_NOT_FOUND;
    int rc = bg_pg_begin(c);
    if (rc != 0)
        return rc;
    char mine[8], theirs[8];
    rc = caller_role(c, user_id, org_id, true, mine);
    if (rc != 0)
        goto err_rollback;
    if (!can_manage(mine)) {
        rc = BG_ERR_DENIED;
        goto err_rollback;
    }
    rc = member_role(c, org_id, member_id, theirs);
    if (rc != 0)
        goto err_rollback;
    if (theirs[0] == '\0') {
        rc = BG_ERR_NOT_FOUND;
        goto err_rollback;
    }
    if (strcmp(theirs, "owner") == 0) {
        rc = BG_ERR_DENIED;
        goto err_rollback;
    }
    const char *p[] = {org_id, member_id};
    rc = bg_pg_run(c, "DELETE FROM memberships WHERE organization_id = $1 AND user_id = $2", 2, p);
    if (rc != 0)
        goto err_rollback;
    rc =
        audit1(c, actor, "org.member.remove", "organization", org_id, org_id, "user_id", member_id);
    if (rc != 0)
        goto err_rollback;
    return bg_pg_commit(c);

err_rollback:
    bg_pg_rollback(c);
    return rc;
}

/* ---- platform administration ---- */

int bg_acct_require_admin(PGconn *c, const char *user_id)
{
    if (!bg_id_uuid_is_valid(user_id))
        return BG_ERR_DENIED;
    PGresult *res;
    const char *p[] = {user_id};
    int rc = bg_pg_exec(c,
                        "SELECT 1 FROM users WHERE id = $1 AND deleted_at IS NULL "
                        "AND status = 'active' AND role = 'admin'",
                        1, p, &res);
    if (rc != 0)
        return rc;
    rc = PQntuples(res) == 1 ? 0 : BG_ERR_DENIED;
    PQclear(res);
    return rc;
}

/*
 * Splits an admin list cursor into its created_at (RFC 3339 with microseconds) and id, both
 * checked, so that a forged cursor is a 400 and never a database error.
 */
static int cursor_parse(const char *cursor, char raw[CURSOR_RAW_MAX + 1], const char **ts,
                        const char **id)
{
    if (bg_crypto_b64url_decode_str(cursor, raw, CURSOR_RAW_MAX + 1) != 0)
        return BG_ERR_INVALID;
    char *bar = strchr(raw, '|');
    if (bar == NULL)
        return BG_ERR_INVALID;
    *bar = '\0';
    int64_t ms;
    if (bg_timeutil_parse_rfc3339(raw, strlen(raw), &ms) != 0 || !bg_id_uuid_is_valid(bar + 1))
        return BG_ERR_INVALID;
    *ts = raw;
    *id = bar + 1;
    return 0;
}

/* Writes query as an ILIKE pattern matching it anywhere, its wildcards and escapes taken
 * literally, into a buffer the caller owns (free). */
static char *like_pattern(const char *query)
{
    size_t len = strlen(query);
    char *pat = bg_malloc(2 * len + 3);
    size_t o = 0;
    pat[o++] = '%';
    for (size_t i = 0; i < len; i++) {
        if (query[i] == '%' || query[i] == '_' || query[i] == '\\')
            pat[o++] = '\\';
        pat[o++] = query[i];
    }
    pat[o++] = '%';
    pat[o] = '\0';
    return pat;
}

int bg_acct_admin_list_users(PGconn *c, const char *query, const char *cursor, size_t limit,
                             bg_user_t *out, size_t *count, char *next_cursor, size_t cursor_len)
{
    *count = 0;
    if (next_cursor == NULL || cursor_len == 0)
        return BG_ERR_INVALID;
    next_cursor[0] = '\0';
    if (bg_str_present(query) && strlen(query) > SEARCH_MAX)
        return BG_ERR_INVALID;
    char raw[CURSOR_RAW_MAX + 1];
    const char *after_ts = NULL, *after_id = NULL;
    if (bg_str_present(cursor) && cursor_parse(cursor, raw, &after_ts, &after_id) != 0)
        return BG_ERR_INVALID;
    if (limit > LIST_MAX)
        return BG_ERR_INVALID;
    if (limit == 0)
        return 0;

    char *pattern = bg_str_present(query) ? like_pattern(query) : NULL;
    char lim[24];
    /* One row more than asked tells whether there is a next page. */
    snprintf(lim, sizeof(lim), "%zu", limit + 1);
    PGresult *res;
    const char *p[] = {pattern, after_ts, after_id, lim};
    int rc = bg_pg_exec(
        c,
        "SELECT " USER_COLS ", " TS_US(
            "u.created_at") " FROM users u" USER_JOIN
                            " WHERE ($1::text IS NULL OR u.email ILIKE $1 OR u.name ILIKE $1) "
                            "AND ($2::timestamptz IS NULL "
                            "  OR (u.created_at, u.id) < ($2::timestamptz, $3::uuid)) "
                            "ORDER BY u.created_at DESC, u.id DESC LIMIT $4::bigint",
        4, p, &res);
    free(pattern);
    if (rc != 0)
        return rc;
    size_t n = (size_t)PQntuples(res);
    size_t shown = n < limit ? n : limit;
    for (size_t i = 0; i < shown; i++)
        read_user(res, (int)i, 0, &out[i]);
    *count = shown;
    if (n > limit) {
        char last[CURSOR_RAW_MAX + 1];
        int len = snprintf(last, sizeof(last), "%s|%s", text(res, (int)shown - 1, USER_NCOLS),
                           text(res, (int)shown - 1, 0));
        if (len < 0 || (size_t)len >= sizeof(last))
            rc = BG_ERR_IO;
        else
            rc = bg_crypto_b64url_encode(last, (size_t)len, next_cursor, cursor_len);
    }
    PQclear(res);
    if (rc != 0)
        *count = 0;
    return rc;
}

int bg_acct_admin_get_user(PGconn *c, const char *user_id, bg_user_t *out)
{
    if (!bg_id_uuid_is_valid(user_id))
        return BG_ERR_NOT_FOUND;
    return load_user(c, user_id, true, out);
}

/* Adds {"from": a, "to": b} under key when the values differ; returns whether they did. */
static bool diff(details_t *d, const char *key, const char *a, const char *b)
{
    if (strcmp(a, b) == 0)
        return false;
    bg_json_write_key(&d->w, key);
    bg_json_write_begin_object(&d->w);
    bg_json_write_field_str(&d->w, "from", a);
    bg_json_write_field_str(&d->w, "to", b);
    bg_json_write_end_object(&d->w);
    return true;
}

int bg_acct_admin_update_user(PGconn *c, const char *user_id, const char *name, const char *locale,
                              const char *role, const char *status, const bg_actor_t *actor,
                              bg_user_t *out)
{
    if (!bg_id_uuid_is_valid(user_id))
        return BG_ERR_NOT_FOUND;
    PGresult *res = NULL;
    details_t d;
    details_begin(&d);
    bg_user_t *before = bg_malloc(sizeof(*before));
    int rc = bg_pg_begin(c);
    if (rc != 0)
        goto err_free;
    const char *ip[] = {user_id};
    rc = bg_pg_exec(c,
                    "SELECT " USER_COLS " FROM users u" USER_JOIN
                    " WHERE u.id = $1 AND u.deleted_at IS NULL FOR NO KEY UPDATE OF u",
                    1, ip, &res);
    if (rc != 0)
        goto err_rollback;
    if (PQntuples(res) != 1) {
        rc = BG_ERR_NOT_FOUND;
        goto err_rollback;
    }
    read_user(res, 0, 0, before);
    clear(&res);

    const char *up[] = {user_id, name, locale, role, status};
    rc = bg_pg_exec(c,
                    "WITH u AS (UPDATE users SET name = coalesce($2, name), "
                    "locale = coalesce($3, locale), role = coalesce($4, role), "
                    "status = coalesce($5, status) WHERE id = $1 RETURNING *) "
                    "SELECT " USER_COLS " FROM u" USER_JOIN,
                    5, up, &res);
    if (rc != 0)
        goto err_rollback;
    read_user(res, 0, 0, out);
    clear(&res);

    bool disabled = strcmp(before->status, "active") == 0 && strcmp(out->status, "disabled") == 0;
    if (disabled) {
        rc = revoke_sessions(c, true, user_id, "user_disabled");
        if (rc != 0)
            goto err_rollback;
    }
    bool changed = diff(&d, "name", before->name, out->name);
    changed = diff(&d, "locale", before->locale, out->locale) || changed;
    changed = diff(&d, "role", before->role, out->role) || changed;
    changed = diff(&d, "status", before->status, out->status) || changed;
    rc = details_end(&d);
    if (rc != 0)
        goto err_rollback;
    if (changed) {
        rc = audit(c, actor, disabled ? "user.disable" : "user.update", "user", user_id, NULL,
                   d.buf.base);
        if (rc != 0)
            goto err_rollback;
    }
    rc = bg_pg_commit(c);
    free(before);
    details_dispose(&d);
    return rc;

err_rollback:
    clear(&res);
    bg_pg_rollback(c);
err_free:
    free(before);
    details_dispose(&d);
    return rc;
}

int bg_acct_admin_delete_user(PGconn *c, const char *user_id, const bg_actor_t *actor)
{
    if (!bg_id_uuid_is_valid(user_id))
        return BG_ERR_NOT_FOUND;
    PGresult *res = NULL;
    int rc = bg_pg_begin(c);
    if (rc != 0)
        return rc;
    const char *p[] = {user_id};
    rc = bg_pg_exec(c,
                    "UPDATE users SET deleted_at = now() WHERE id = $1 AND deleted_at IS NULL "
                    "RETURNING id",
                    1, p, &res);
    if (rc != 0)
        goto err_rollback;
    if (PQntuples(res) != 1) {
        rc = BG_ERR_NOT_FOUND;
        goto err_rollback;
    }
    clear(&res);
    rc = revoke_sessions(c, true, user_id, "admin");
    if (rc != 0)
        goto err_rollback;
    rc = bg_pg_exec(c,
                    "UPDATE api_keys SET revoked_at = now() WHERE user_id = $1 "
                    "AND revoked_at IS NULL",
                    1, p, &res);
    if (rc != 0)
        goto err_rollback;
    details_t d;
    details_begin(&d);
    bg_json_write_key(&d.w, "api_keys_revoked");
    bg_json_write_int(&d.w, strtoll(PQcmdTuples(res), NULL, 10));
    rc = details_end(&d);
    if (rc == 0)
        rc = audit(c, actor, "user.delete", "user", user_id, NULL, d.buf.base);
    details_dispose(&d);
    if (rc != 0)
        goto err_rollback;
    clear(&res);
    return bg_pg_commit(c);

err_rollback:
    clear(&res);
    bg_pg_rollback(c);
    return rc;
}
