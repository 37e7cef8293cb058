/*
 * /auth: registration, sign-in, token refresh, sign-out, profile, locale and API keys.
 *
 * Every handler follows the same shape: parse and check the body on the loop, ask Redis what only
 * Redis knows (attempt counters), do the Postgres work and the password hashing on the thread pool,
 * then answer on the loop. The operation's inputs are copied into an op_t before the pool sees
 * them; the pool never touches the request.
 *
 * Sign-in answers the same 401 for an unknown e-mail and a wrong password, and spends the same time
 * on both: an unknown e-mail is verified against a dummy hash made at start-up.
 */
#include <string.h>

#include "bg/accounts.h"
#include "bg/authstate.h"
#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/i18n.h"
#include "bg/json.h"
#include "bg/log.h"
#include "bg/pg.h"
#include "bg/redis.h"
#include "bg/timeutil.h"
#include "bg/validate.h"
#include "edge.h"

#define MAX_KEYS 100

/** One operation's inputs and results; owned by the request context (er->data). */
typedef struct st_op {
    const bg_config_t *cfg; /* borrowed, constant */
    char *email, *password, *name, *locale, *token, *user_agent, *key_id, *scopes;
    char ip[64];
    char request_id[EDGE_REQUEST_ID_LEN + 1];
    char user_id[64], session_id[64];
    bool cookie_mode;
    /* results */
    int rc;
    const char *why;
    bg_user_t user;
    char refresh[BG_ACCT_TOKEN_LEN];
    char key[BG_ACCT_TOKEN_LEN];
    bg_api_key_t keys[MAX_KEYS];
    size_t nkeys;
    bg_plan_summary_t plan;
    void (*then)(edge_req_t *er, bool stored); /* continuation after a Redis write */
} op_t;

static char dummy_hash[256];

static void op_free(void *p)
{
    op_t *op = p;
    if (op->password != NULL)
        bg_crypto_wipe(op->password, strlen(op->password));
    free(op->email);
    free(op->password);
    free(op->name);
    free(op->locale);
    if (op->token != NULL)
        bg_crypto_wipe(op->token, strlen(op->token));
    free(op->token);
    free(op->user_agent);
    free(op->key_id);
    free(op->scopes);
    bg_crypto_wipe(op->refresh, sizeof(op->refresh));
    bg_crypto_wipe(op->key, sizeof(op->key));
    free(op);
}

static op_t *op_new(edge_req_t *er)
{
    op_t *op = bg_calloc(1, sizeof(*op));
    op->cfg = er->thread->server->cfg;
    memcpy(op->request_id, er->request_id, sizeof(op->request_id));
    edge_peer_ip(er, op->ip, sizeof(op->ip));
    bg_strlcpy(op->user_id, er->auth.user_id, sizeof(op->user_id));
    bg_strlcpy(op->session_id, er->auth.session_id, sizeof(op->session_id));
    er->data = op;
    er->data_free = op_free;
    return op;
}

static bg_actor_t actor_of(const op_t *op)
{
    bg_actor_t a = {"user", op->user_id[0] != '\0' ? op->user_id : NULL, op->request_id,
                    op->ip[0] != '\0' ? op->ip : NULL};
    return a;
}

static PGconn *db(op_t *op)
{
    return edge_pg(op->cfg, NULL, &op->rc);
}

static void ignore_reply(void *ud, int err, const redisReply *reply)
{
    (void)ud;
    (void)err;
    (void)reply;
}

static void write_user_fields(bg_json_writer_t *w, const bg_user_t *u)
{
    bg_json_write_field_str(w, "id", u->id);
    bg_json_write_field_str(w, "email", u->email);
    bg_json_write_field_str(w, "name", u->name);
    bg_json_write_field_str(w, "locale", u->locale);
    bg_json_write_field_str(w, "role", u->role);
    bg_json_write_field_str(w, "status", u->status);
    bg_json_write_field_str(w, "organization_id", u->organization_id);
    bg_json_write_field_str(w, "created_at", u->created_at);
}

static void write_user(bg_json_writer_t *w, const bg_user_t *u)
{
    bg_json_write_begin_object(w);
    write_user_fields(w, u);
    bg_json_write_end_object(w);
}

static void remember_locale(edge_req_t *er, const char *user_id, const char *locale)
{
    int shard = bg_shard_of(user_id, er->thread->server->cfg->shards);
    char key[160];
    if (bg_authstate_key_locale(key, sizeof(key), shard, user_id) != 0)
        return;
    const char *argv[] = {"SET", key, locale, "EX", "2592000"};
    if (bg_redis_async_argv(er->thread->redis, ignore_reply, NULL, 5, argv, NULL) != 0)
        bg_warn("cannot remember the locale of a user in Redis");
    if (bg_i18n_is_supported(locale))
        er->locale = bg_i18n_negotiate(locale, NULL);
}

/* Answers a successful register/login/refresh with a new access token and the refresh token. */
static void respond_session(edge_req_t *er, op_t *op, int status)
{
    const bg_config_t *cfg = op->cfg;
    char access[BG_JWT_MAX_TOKEN];
    int64_t now = bg_timeutil_wall_ms() / 1000;
    if (bg_jwt_sign(er->thread->server->jwt, op->user.id, op->session_id, op->user.role, now,
                    cfg->access_ttl_s, access, sizeof(access)) != 0) {
        edge_error(er, "internal", NULL, NULL, 0);
        return;
    }
    remember_locale(er, op->user.id, op->user.locale);

    bg_buf_t out;
    bg_buf_init(&out, 65536);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    bg_json_write_begin_object(&w);
    bg_json_write_key(&w, "user");
    write_user(&w, &op->user);
    if (op->cookie_mode) {
        char csrf[64];
        if (bg_crypto_random_token(32, csrf, sizeof(csrf)) != 0) {
            bg_buf_dispose(&out);
            edge_error(er, "internal", NULL, NULL, 0);
            return;
        }
        edge_set_cookie(er, "bg_at", access, "/", "Lax", cfg->access_ttl_s, true);
        edge_set_cookie(er, "bg_rt", op->refresh, "/auth", "Strict", cfg->refresh_ttl_s, true);
        edge_set_cookie(er, "bg_csrf", csrf, "/", "Lax", cfg->refresh_ttl_s, false);
        bg_json_write_field_str(&w, "token_type", "cookie");
        bg_json_write_field_str(&w, "csrf_token", csrf);
    } else {
        bg_json_write_field_str(&w, "access_token", access);
        bg_json_write_field_str(&w, "refresh_token", op->refresh);
        bg_json_write_field_str(&w, "token_type", "Bearer");
    }
    bg_json_write_field_int(&w, "expires_in", cfg->access_ttl_s);
    bg_json_write_end_object(&w);
    edge_respond_writer(er, status, &w, &out);
    bg_crypto_wipe(access, sizeof(access));
}

static bool mode_is_cookie(edge_req_t *er, const edge_values_t *v, size_t mode_index)
{
    const char *mode = v->present[mode_index] ? v->str[mode_index] : "token";
    if (strcmp(mode, "cookie") != 0 && strcmp(mode, "token") != 0) {
        const char *params[] = {NULL};
        edge_invalid_field(er, "mode", "invalid_value", params);
        return false;
    }
    return true;
}

static bool password_acceptable(edge_req_t *er, const char *password, const char *email)
{
    const char *why = bg_validate_password(password, email);
    if (why == NULL)
        return true;
    char min[8], max[8];
    snprintf(min, sizeof(min), "%d", BG_PASSWORD_MIN_CHARS);
    snprintf(max, sizeof(max), "%d", BG_PASSWORD_MAX_BYTES);
    const char *params[] = {"min", min, "max", max, NULL};
    const char *reason = strcmp(why, "common") == 0          ? "password_common"
                         : strcmp(why, "matches_email") == 0 ? "password_matches_email"
                         : strcmp(why, "too_long") == 0      ? "too_long"
                                                             : "weak_password";
    edge_invalid_field(er, "password", reason, params);
    return false;
}

/* ---- attempt limits ---- */

typedef void (*limit_next_fn)(edge_req_t *er);

static void ip_limit_done(void *ud, int err, const redisReply *reply)
{
    edge_req_t *er = ud;
    if (er->req != NULL) {
        op_t *op = er->data;
        if (err != 0 || reply->type != REDIS_REPLY_ARRAY || reply->elements != 2) {
            edge_error(er, "service_unavailable", NULL, NULL, 1);
        } else if (reply->element[0]->integer > op->cfg->login_ip_per_min) {
            edge_error(er, "rate_limited", NULL, NULL, (int)(reply->element[1]->integer + 1));
        } else {
            limit_next_fn next = (limit_next_fn)op->why; /* stashed continuation */
            op->why = NULL;
            next(er);
        }
    }
    edge_req_unref(er);
}

/* Counts one attempt from the client's address, then continues with next (or answers 429/503). */
static void ip_limit(edge_req_t *er, limit_next_fn next)
{
    op_t *op = er->data;
    char key[128];
    snprintf(key, sizeof(key), "bg:rl:auth:ip:%s", op->ip[0] != '\0' ? op->ip : "unknown");
    const char *keys[] = {key};
    const char *args[] = {"1", "60"};
    op->why = (const char *)(void *)next;
    edge_req_ref(er);
    if (bg_redis_async_script(er->thread->redis, ip_limit_done, er, "lua/counter.lua", 1, keys, 2,
                              args) != 0) {
        edge_req_unref(er);
        edge_error(er, "service_unavailable", NULL, NULL, 1);
    }
}

static void account_key(const char *email, char *out, size_t outlen)
{
    char lower[256];
    size_t n = strlen(email);
    if (n >= sizeof(lower))
        n = sizeof(lower) - 1;
    for (size_t i = 0; i < n; i++)
        lower[i] = (email[i] >= 'A' && email[i] <= 'Z') ? (char)(email[i] + 32) : email[i];
    lower[n] = '\0';
    char hex[BG_CRYPTO_SHA256_HEX_LEN];
    bg_crypto_sha256_hex(lower, n, hex);
    snprintf(out, outlen, "bg:rl:auth:acct:%s", hex);
}

/* ---- register ---- */

static void register_work(void *arg)
{
    op_t *op = arg;
    char hash[256];
    if ((op->rc = bg_crypto_password_hash(op->password, hash, sizeof(hash))) != 0)
        return;
    PGconn *c = db(op);
    if (c == NULL)
        return;
    bg_actor_t actor = actor_of(op);
    if ((op->rc = bg_acct_register(c, op->email, hash, op->name != NULL ? op->name : "", op->locale,
                                   &actor, &op->user)) != 0)
        return;
    op->rc = bg_acct_session_start(c, op->user.id, op->user_agent, op->ip[0] ? op->ip : NULL,
                                   op->cfg->session_ttl_s, op->cfg->refresh_ttl_s, op->session_id,
                                   op->refresh);
}

static void register_done(edge_req_t *er, void *arg)
{
    op_t *op = arg;
    if (er->req == NULL)
        return;
    if (op->rc == BG_ERR_CONFLICT)
        edge_error(er, "email_taken", NULL, NULL, 0);
    else if (op->rc != 0)
        edge_fail(er, op->rc);
    else
        respond_session(er, op, 201);
}

static void register_continue(edge_req_t *er)
{
    if (edge_blocking(er, register_work, register_done, er->data) != 0)
        edge_error(er, "service_unavailable", NULL, NULL, 1);
}

static const edge_field_t register_fields[] = {
    {"email", EDGE_F_STR, true, 3, 254, EDGE_CHECK_EMAIL},
    {"password", EDGE_F_STR, true, 1, 1024, EDGE_CHECK_PASSWORD},
    {"name", EDGE_F_STR, false, 0, 200, EDGE_CHECK_NONE},
    {"locale", EDGE_F_STR, false, 2, 15, EDGE_CHECK_LOCALE},
    {"mode", EDGE_F_STR, false, 1, 16, EDGE_CHECK_NONE},
};

static void auth_register(edge_req_t *er)
{
    edge_values_t v;
    if (!edge_body(er, register_fields, BG_ARRAY_SIZE(register_fields), &v) ||
        !mode_is_cookie(er, &v, 4) || !password_acceptable(er, v.str[1], v.str[0]))
        return;
    op_t *op = op_new(er);
    op->email = bg_strdup(v.str[0]);
    op->password = bg_strdup(v.str[1]);
    op->name = bg_strdup(v.present[2] ? v.str[2] : "");
    op->locale = bg_strdup(v.present[3] ? v.str[3] : er->locale);
    op->cookie_mode = v.present[4] && strcmp(v.str[4], "cookie") == 0;
    h2o_iovec_t ua = edge_req_header(er, "user-agent");
    op->user_agent = bg_strndup(ua.base != NULL ? ua.base : "", ua.len < 512 ? ua.len : 512);
    ip_limit(er, register_continue);
}

/* ---- login ---- */

static void login_work(void *arg)
{
    op_t *op = arg;
    char hash[256];
    PGconn *c = db(op);
    if (c == NULL)
        return;
    int found = bg_acct_find_for_login(c, op->email, &op->user, hash, sizeof(hash));
    if (found != 0 && found != BG_ERR_NOT_FOUND) {
        op->rc = found;
        return;
    }
    /* the same work whether or not the account exists */
    int ok = bg_crypto_password_verify(found == 0 ? hash : dummy_hash, op->password);
    if (found != 0 || ok != 0) {
        op->rc = BG_ERR_DENIED;
        op->why = "credentials";
        return;
    }
    if (strcmp(op->user.status, "active") != 0) {
        op->rc = BG_ERR_DENIED;
        op->why = "disabled";
        return;
    }
    if (bg_acct_touch_login(c, op->user.id) != 0)
        bg_warn("cannot record the sign-in time of user %s", op->user.id);
    op->rc = bg_acct_session_start(c, op->user.id, op->user_agent, op->ip[0] ? op->ip : NULL,
                                   op->cfg->session_ttl_s, op->cfg->refresh_ttl_s, op->session_id,
                                   op->refresh);
}

static void login_done(edge_req_t *er, void *arg)
{
    op_t *op = arg;
    char key[128];
    account_key(op->email, key, sizeof(key));
    /* the attempt was counted before the password was checked; a success clears the count */
    if (op->rc == 0) {
        const char *argv[] = {"DEL", key};
        if (bg_redis_async_argv(er->thread->redis, ignore_reply, NULL, 2, argv, NULL) != 0)
            bg_warn("cannot reset the failed sign-in counter");
    }
    if (er->req == NULL)
        return;
    if (op->rc == BG_ERR_DENIED)
        edge_error(er,
                   strcmp(op->why, "disabled") == 0 ? "account_disabled" : "invalid_credentials",
                   NULL, NULL, 0);
    else if (op->rc != 0)
        edge_fail(er, op->rc);
    else
        respond_session(er, op, 200);
}

static void account_limit_done(void *ud, int err, const redisReply *reply)
{
    edge_req_t *er = ud;
    if (er->req != NULL) {
        op_t *op = er->data;
        bool valid = err == 0 && reply->type == REDIS_REPLY_ARRAY && reply->elements == 2;
        if (valid && reply->element[0]->integer > op->cfg->login_failures_max)
            edge_error(er, "rate_limited", NULL, NULL, (int)(reply->element[1]->integer + 1));
        else if (!valid || edge_blocking(er, login_work, login_done, op) != 0)
            edge_error(er, "service_unavailable", NULL, NULL, 1);
    }
    edge_req_unref(er);
}

static void login_continue(edge_req_t *er)
{
    op_t *op = er->data;
    char key[128];
    account_key(op->email, key, sizeof(key));
    const char *keys[] = {key};
    /*
     * Count the attempt before checking the password, so that guesses sent in parallel cannot all
     * pass a check that only a finished failure would update.
     */
    const char *args[] = {"1", "900"};
    edge_req_ref(er);
    if (bg_redis_async_script(er->thread->redis, account_limit_done, er, "lua/counter.lua", 1, keys,
                              2, args) != 0) {
        edge_req_unref(er);
        edge_error(er, "service_unavailable", NULL, NULL, 1);
    }
}

static const edge_field_t login_fields[] = {
    {"email", EDGE_F_STR, true, 1, 254, EDGE_CHECK_NONE},
    {"password", EDGE_F_STR, true, 1, 1024, EDGE_CHECK_NONE},
    {"mode", EDGE_F_STR, false, 1, 16, EDGE_CHECK_NONE},
};

static void auth_login(edge_req_t *er)
{
    edge_values_t v;
    if (!edge_body(er, login_fields, BG_ARRAY_SIZE(login_fields), &v) || !mode_is_cookie(er, &v, 2))
        return;
    op_t *op = op_new(er);
    op->email = bg_strdup(v.str[0]);
    op->password = bg_strdup(v.str[1]);
    op->cookie_mode = v.present[2] && strcmp(v.str[2], "cookie") == 0;
    h2o_iovec_t ua = edge_req_header(er, "user-agent");
    op->user_agent = bg_strndup(ua.base != NULL ? ua.base : "", ua.len < 512 ? ua.len : 512);
    ip_limit(er, login_continue);
}

/* ---- refresh ---- */

typedef void (*then_fn)(edge_req_t *er, bool stored);

static void revoked_stored(void *ud, int err, const redisReply *reply)
{
    edge_req_t *er = ud;
    op_t *op = er->data;
    bool stored = err == 0 && reply->type == REDIS_REPLY_STATUS;
    if (!stored)
        bg_warn("cannot mark session %s revoked in Redis", op->session_id);
    op->then(er, stored);
    edge_req_unref(er);
}

/*
 * Marks the session revoked for every edge instance, then calls then(er, stored). The answer waits
 * for Redis: once a client is told it signed out, no edge may accept the session's tokens.
 */
static void revoke_in_redis(edge_req_t *er, op_t *op, then_fn then)
{
    const bg_config_t *cfg = er->thread->server->cfg;
    char key[160], ttl[24];
    op->then = then;
    if (bg_authstate_key_revoked(key, sizeof(key), bg_shard_of(op->user_id, cfg->shards),
                                 op->session_id) != 0) {
        then(er, false);
        return;
    }
    /* twice the access-token lifetime: no token of the session can outlive that */
    snprintf(ttl, sizeof(ttl), "%lld", (long long)cfg->access_ttl_s * 2);
    const char *argv[] = {"SET", key, "1", "EX", ttl};
    edge_req_ref(er);
    if (bg_redis_async_argv(er->thread->redis, revoked_stored, er, 5, argv, NULL) != 0) {
        edge_req_unref(er);
        then(er, false);
    }
}

static void refresh_work(void *arg)
{
    op_t *op = arg;
    PGconn *c = db(op);
    if (c == NULL)
        return;
    op->rc = bg_acct_session_refresh(c, op->token, op->cfg->refresh_ttl_s, op->refresh, &op->user,
                                     op->session_id, &op->why);
    if (op->rc == BG_ERR_DENIED && op->why != NULL && strcmp(op->why, "reuse") == 0) {
        /* the family is revoked in Postgres; the edge tells Redis so its access tokens die too */
        if (bg_acct_session_of_token(c, op->token, op->session_id, op->user_id) != 0)
            op->session_id[0] = '\0';
    }
}

static void refresh_answer(edge_req_t *er, bool stored)
{
    op_t *op = er->data;
    (void)stored; /* a reused token is refused either way; Postgres already revoked the family */
    if (er->req == NULL)
        return;
    if (op->rc == BG_ERR_DENIED) {
        char details[96];
        snprintf(details, sizeof(details), "{\"reason\":\"refresh_token_%s\"}",
                 op->why != NULL ? op->why : "invalid");
        if (op->cookie_mode) {
            edge_set_cookie(er, "bg_at", "", "/", "Lax", 0, true);
            edge_set_cookie(er, "bg_rt", "", "/auth", "Strict", 0, true);
        }
        edge_error(er, "unauthorized", details, NULL, 0);
    } else if (op->rc != 0) {
        edge_fail(er, op->rc);
    } else {
        respond_session(er, op, 200);
    }
}

static void refresh_done(edge_req_t *er, void *arg)
{
    op_t *op = arg;
    if (op->rc == BG_ERR_DENIED && op->session_id[0] != '\0' && op->user_id[0] != '\0')
        revoke_in_redis(er, op, refresh_answer);
    else
        refresh_answer(er, true);
}

static const edge_field_t refresh_fields[] = {
    {"refresh_token", EDGE_F_STR, false, 1, 256, EDGE_CHECK_NONE},
    {"mode", EDGE_F_STR, false, 1, 16, EDGE_CHECK_NONE},
};

/* The refresh token of a body field or, in browser mode, of the bg_rt cookie (CSRF-checked). */
static bool take_refresh_token(edge_req_t *er, const edge_values_t *v, op_t *op, bool required)
{
    if (v->present[0]) {
        op->token = bg_strdup(v->str[0]);
        return true;
    }
    h2o_iovec_t cookie = edge_cookie(er, "bg_rt");
    if (cookie.len > 0 && cookie.len <= 256) {
        if (!edge_csrf_ok(er)) {
            edge_error(er, "csrf_failed", NULL, NULL, 0);
            return false;
        }
        op->token = bg_strndup(cookie.base, cookie.len);
        op->cookie_mode = true;
        return true;
    }
    if (required) {
        edge_invalid_field(er, "refresh_token", "missing", NULL);
        return false;
    }
    return true;
}

static void auth_refresh(edge_req_t *er)
{
    edge_values_t v;
    if (!edge_body(er, refresh_fields, BG_ARRAY_SIZE(refresh_fields), &v) ||
        !mode_is_cookie(er, &v, 1))
        return;
    op_t *op = op_new(er);
    op->cookie_mode = v.present[1] && strcmp(v.str[1], "cookie") == 0;
    if (!take_refresh_token(er, &v, op, true))
        return;
    if (edge_blocking(er, refresh_work, refresh_done, op) != 0)
        edge_error(er, "service_unavailable", NULL, NULL, 1);
}

/* ---- logout ---- */

static void logout_work(void *arg)
{
    op_t *op = arg;
    PGconn *c = db(op);
    if (c == NULL)
        return;
    if (op->session_id[0] == '\0' && op->token != NULL &&
        bg_acct_session_of_token(c, op->token, op->session_id, op->user_id) != 0)
        return; /* an unknown refresh token: nothing to sign out of */
    if (op->session_id[0] != '\0')
        op->rc = bg_acct_session_revoke(c, op->user_id, op->session_id, "logout");
}

static void logout_answer(edge_req_t *er, bool stored)
{
    op_t *op = er->data;
    if (er->req == NULL)
        return;
    if (!stored) {
        /* signed out in Postgres, but other edges cannot know yet: let the client retry */
        edge_error(er, "service_unavailable", NULL, NULL, 1);
        return;
    }
    if (op->cookie_mode) {
        edge_set_cookie(er, "bg_at", "", "/", "Lax", 0, true);
        edge_set_cookie(er, "bg_rt", "", "/auth", "Strict", 0, true);
        edge_set_cookie(er, "bg_csrf", "", "/", "Lax", 0, false);
    }
    edge_respond(er, 204, NULL, NULL, 0);
}

static void logout_done(edge_req_t *er, void *arg)
{
    op_t *op = arg;
    if (op->rc != 0 && op->rc != BG_ERR_NOT_FOUND) {
        if (er->req != NULL)
            edge_fail(er, op->rc);
        return;
    }
    if (op->rc == 0 && op->session_id[0] != '\0')
        revoke_in_redis(er, op, logout_answer);
    else
        logout_answer(er, true);
}

static const edge_field_t logout_fields[] = {
    {"refresh_token", EDGE_F_STR, false, 1, 256, EDGE_CHECK_NONE},
};

static void auth_logout(edge_req_t *er)
{
    edge_values_t v;
    if (!edge_body(er, logout_fields, BG_ARRAY_SIZE(logout_fields), &v))
        return;
    op_t *op = op_new(er);
    /* the access token names the session; else the refresh token does */
    h2o_iovec_t authz = edge_req_header(er, "authorization");
    h2o_iovec_t token =
        authz.len > 7 ? h2o_iovec_init(authz.base + 7, authz.len - 7) : edge_cookie(er, "bg_at");
    if (authz.len == 0 && (token.len > 0 || edge_cookie(er, "bg_rt").len > 0)) {
        op->cookie_mode = true;
        if (!edge_csrf_ok(er)) {
            edge_error(er, "csrf_failed", NULL, NULL, 0);
            return;
        }
    }
    bg_jwt_claims_t claims;
    const char *why;
    if (token.len > 0 && bg_jwt_verify(er->thread->server->jwt, token.base, token.len,
                                       bg_timeutil_wall_ms() / 1000, &claims, &why) == 0) {
        bg_strlcpy(op->user_id, claims.sub, sizeof(op->user_id));
        bg_strlcpy(op->session_id, claims.sid, sizeof(op->session_id));
    } else if (!take_refresh_token(er, &v, op, false)) {
        return;
    }
    if (op->session_id[0] == '\0' && op->token == NULL) {
        logout_answer(er, true); /* nothing to revoke; still clear the cookies */
        return;
    }
    if (edge_blocking(er, logout_work, logout_done, op) != 0)
        edge_error(er, "service_unavailable", NULL, NULL, 1);
}

/* ---- profile and locale ---- */

static void profile_work(void *arg)
{
    op_t *op = arg;
    PGconn *c = db(op);
    if (c == NULL)
        return;
    if (op->name != NULL || op->locale != NULL)
        op->rc = bg_acct_update_profile(c, op->user_id, op->name, op->locale, &op->user);
    else
        op->rc = bg_acct_get_user(c, op->user_id, &op->user);
    if (op->rc == 0)
        op->rc = bg_acct_plan_summary(c, op->user_id, &op->plan);
}

static void profile_done(edge_req_t *er, void *arg)
{
    op_t *op = arg;
    if (er->req == NULL)
        return;
    if (op->rc != 0) {
        /* a valid token of a user who is gone */
        if (op->rc == BG_ERR_NOT_FOUND)
            edge_error(er, "unauthorized", NULL, NULL, 0);
        else
            edge_fail(er, op->rc);
        return;
    }
    if (op->locale != NULL)
        remember_locale(er, op->user.id, op->user.locale);
    bg_buf_t out;
    bg_buf_init(&out, 65536);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    bg_json_write_begin_object(&w);
    write_user_fields(&w, &op->user);
    bg_json_write_key(&w, "plan");
    bg_json_write_begin_object(&w);
    bg_json_write_field_str(&w, "id", op->plan.plan[0] != '\0' ? op->plan.plan : NULL);
    bg_json_write_field_str(&w, "name", op->plan.name[0] != '\0' ? op->plan.name : NULL);
    bg_json_write_field_str(&w, "status", op->plan.status);
    bg_json_write_field_str(&w, "trial_ends_at",
                            op->plan.trial_ends_at[0] != '\0' ? op->plan.trial_ends_at : NULL);
    bg_json_write_field_str(&w, "period_end",
                            op->plan.period_end[0] != '\0' ? op->plan.period_end : NULL);
    bg_json_write_end_object(&w);
    bg_json_write_end_object(&w);
    edge_respond_writer(er, 200, &w, &out);
}

static void profile_get(edge_req_t *er)
{
    op_t *op = op_new(er);
    if (edge_blocking(er, profile_work, profile_done, op) != 0)
        edge_error(er, "service_unavailable", NULL, NULL, 1);
}

static const edge_field_t profile_fields[] = {
    {"name", EDGE_F_STR, false, 0, 200, EDGE_CHECK_NONE},
    {"locale", EDGE_F_STR, false, 2, 15, EDGE_CHECK_LOCALE},
};

static void profile_put(edge_req_t *er)
{
    edge_values_t v;
    if (!edge_body(er, profile_fields, BG_ARRAY_SIZE(profile_fields), &v))
        return;
    op_t *op = op_new(er);
    op->name = v.present[0] ? bg_strdup(v.str[0]) : NULL;
    op->locale = v.present[1] ? bg_strdup(v.str[1]) : NULL;
    if (edge_blocking(er, profile_work, profile_done, op) != 0)
        edge_error(er, "service_unavailable", NULL, NULL, 1);
}

static const edge_field_t locale_fields[] = {
    {"locale", EDGE_F_STR, true, 2, 15, EDGE_CHECK_LOCALE},
};

static void locale_put(edge_req_t *er)
{
    edge_values_t v;
    if (!edge_body(er, locale_fields, BG_ARRAY_SIZE(locale_fields), &v))
        return;
    op_t *op = op_new(er);
    op->locale = bg_strdup(v.str[0]);
    if (edge_blocking(er, profile_work, profile_done, op) != 0)
        edge_error(er, "service_unavailable", NULL, NULL, 1);
}

/* ---- API keys ---- */

/* Writes a key as the API shows it; secret is the key itself, given only at creation. */
static void write_key(bg_json_writer_t *w, const bg_api_key_t *k, const char *secret)
{
    bg_json_write_begin_object(w);
    bg_json_write_field_str(w, "id", k->id);
    bg_json_write_field_str(w, "name", k->name);
    if (secret != NULL)
        bg_json_write_field_str(w, "key", secret);
    bg_json_write_field_str(w, "prefix", k->prefix);
    bg_json_write_key(w, "scopes");
    bg_json_write_begin_array(w);
    const char *p = k->scopes;
    while (*p != '\0') {
        const char *comma = strchr(p, ',');
        size_t n = comma != NULL ? (size_t)(comma - p) : strlen(p);
        if (n > 0)
            bg_json_write_strn(w, p, n);
        if (comma == NULL)
            break;
        p = comma + 1;
    }
    bg_json_write_end_array(w);
    bg_json_write_field_str(w, "created_at", k->created_at);
    if (k->last_used_at[0] != '\0')
        bg_json_write_field_str(w, "last_used_at", k->last_used_at);
    else
        bg_json_write_field_null(w, "last_used_at");
    bg_json_write_end_object(w);
}

static void keys_list_work(void *arg)
{
    op_t *op = arg;
    PGconn *c = db(op);
    if (c != NULL)
        op->rc = bg_acct_api_key_list(c, op->user_id, op->keys, MAX_KEYS, &op->nkeys);
}

static void keys_list_done(edge_req_t *er, void *arg)
{
    op_t *op = arg;
    if (er->req == NULL)
        return;
    if (op->rc != 0) {
        edge_fail(er, op->rc);
        return;
    }
    bg_buf_t out;
    bg_buf_init(&out, 1 << 20);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    bg_json_write_begin_object(&w);
    bg_json_write_key(&w, "data");
    bg_json_write_begin_array(&w);
    for (size_t i = 0; i < op->nkeys; i++)
        write_key(&w, &op->keys[i], NULL);
    bg_json_write_end_array(&w);
    bg_json_write_field_null(&w, "next_cursor");
    bg_json_write_end_object(&w);
    edge_respond_writer(er, 200, &w, &out);
}

static void keys_list(edge_req_t *er)
{
    op_t *op = op_new(er);
    if (edge_blocking(er, keys_list_work, keys_list_done, op) != 0)
        edge_error(er, "service_unavailable", NULL, NULL, 1);
}

static void keys_create_work(void *arg)
{
    op_t *op = arg;
    PGconn *c = db(op);
    if (c == NULL)
        return;
    bg_actor_t actor = actor_of(op);
    op->rc =
        bg_acct_api_key_create(c, op->user_id, op->name, op->scopes, &actor, op->key, &op->keys[0]);
}

static void keys_create_done(edge_req_t *er, void *arg)
{
    op_t *op = arg;
    if (er->req == NULL)
        return;
    if (op->rc != 0) {
        edge_fail(er, op->rc);
        return;
    }
    bg_buf_t out;
    bg_buf_init(&out, 65536);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    write_key(&w, &op->keys[0], op->key); /* the key itself appears in this response only */
    edge_respond_writer(er, 201, &w, &out);
}

static const char *const known_scopes[] = {"chat", "models"};

static const edge_field_t key_fields[] = {
    {"name", EDGE_F_STR, true, 1, 100, EDGE_CHECK_NONE},
    {"scopes", EDGE_F_STR_ARRAY, false, 0, 8, EDGE_CHECK_NONE},
};

static void keys_create(edge_req_t *er)
{
    edge_values_t v;
    if (!edge_body(er, key_fields, BG_ARRAY_SIZE(key_fields), &v))
        return;
    bg_buf_t scopes;
    bg_buf_init(&scopes, 255);
    if (v.arr[1] != NULL && bg_json_len(v.arr[1]) > 0) {
        for (size_t i = 0; i < bg_json_len(v.arr[1]); i++) {
            const char *s = bg_json_str(bg_json_at(v.arr[1], i), NULL);
            bool known = false;
            for (size_t k = 0; k < BG_ARRAY_SIZE(known_scopes); k++)
                known = known || strcmp(s, known_scopes[k]) == 0;
            if (!known || (scopes.len > 0 && bg_buf_putc(&scopes, ',') != 0) ||
                bg_buf_puts(&scopes, s) != 0) {
                bg_buf_dispose(&scopes);
                edge_invalid_field(er, "scopes", "invalid_value", NULL);
                return;
            }
        }
    } else if (bg_buf_puts(&scopes, "chat,models") != 0) {
        bg_buf_dispose(&scopes);
        edge_error(er, "internal", NULL, NULL, 0);
        return;
    }
    op_t *op = op_new(er);
    op->name = bg_strdup(v.str[0]);
    op->scopes = bg_buf_steal(&scopes, NULL);
    if (edge_blocking(er, keys_create_work, keys_create_done, op) != 0)
        edge_error(er, "service_unavailable", NULL, NULL, 1);
}

static void keys_delete_work(void *arg)
{
    op_t *op = arg;
    PGconn *c = db(op);
    if (c == NULL)
        return;
    bg_actor_t actor = actor_of(op);
    op->rc = bg_acct_api_key_revoke(c, op->user_id, op->key_id, &actor);
}

static void keys_delete_done(edge_req_t *er, void *arg)
{
    op_t *op = arg;
    if (er->req == NULL)
        return;
    if (op->rc != 0)
        edge_fail(er, op->rc);
    else
        edge_respond(er, 204, NULL, NULL, 0);
}

static void keys_delete(edge_req_t *er)
{
    op_t *op = op_new(er);
    op->key_id = bg_strndup(er->params[0].base, er->params[0].len);
    if (edge_blocking(er, keys_delete_work, keys_delete_done, op) != 0)
        edge_error(er, "service_unavailable", NULL, NULL, 1);
}

/** Prepares what sign-in needs before the first request (the dummy hash for unknown accounts). */
int edge_routes_auth_init(void);
int edge_routes_auth_init(void)
{
    char seed[48];
    if (bg_crypto_random_token(24, seed, sizeof(seed)) != 0)
        return BG_ERR_IO;
    return bg_crypto_password_hash(seed, dummy_hash, sizeof(dummy_hash));
}

#define AUTH_BODY 16384

const edge_route_t edge_routes_auth[] = {
    {"POST", "/auth/register", "auth_register", auth_register, EDGE_ROUTE_JSON, AUTH_BODY,
     EDGE_PUBLIC},
    {"POST", "/auth/login", "auth_login", auth_login, EDGE_ROUTE_JSON, AUTH_BODY, EDGE_PUBLIC},
    {"POST", "/auth/refresh", "auth_refresh", auth_refresh, EDGE_ROUTE_JSON, AUTH_BODY,
     EDGE_PUBLIC},
    {"POST", "/auth/logout", "auth_logout", auth_logout, EDGE_ROUTE_JSON, AUTH_BODY, EDGE_PUBLIC},
    {"GET", "/auth/profile", "auth_profile", profile_get, 0, 0, EDGE_USER},
    {"PUT", "/auth/profile", "auth_profile", profile_put, EDGE_ROUTE_JSON, AUTH_BODY, EDGE_USER},
    {"PUT", "/auth/locale", "auth_locale", locale_put, EDGE_ROUTE_JSON, AUTH_BODY, EDGE_USER},
    {"GET", "/auth/api-keys", "auth_api_keys", keys_list, 0, 0, EDGE_USER},
    {"POST", "/auth/api-keys", "auth_api_keys", keys_create, EDGE_ROUTE_JSON, AUTH_BODY, EDGE_USER},
    {"DELETE", "/auth/api-keys/{id}", "auth_api_key", keys_delete, 0, 0, EDGE_USER},
    {NULL, NULL, NULL, NULL, 0, 0, EDGE_PUBLIC},
};
