/*
 * Who is calling, and may they: access tokens, the shared revocation state, browser cookies with
 * their CSRF rules, and CORS.
 *
 * Two modes. Header mode (API clients): "Authorization: Bearer <access token>"; no cookies are
 * read, so CSRF cannot apply. Browser mode: the access token in the HttpOnly cookie bg_at; every
 * state-changing request must then come from an allowed Origin and carry X-CSRF-Token equal to the
 * bg_csrf cookie (double submit: a foreign site can make the browser send cookies but cannot read
 * them). Independently of mode, a state-changing request whose Origin is foreign is refused.
 *
 * An access token is verified on the loop (an HMAC: microseconds), then one MGET on the loop's
 * Redis connection reads the session's revocation mark, the user's not-before time and locale, all
 * under the user's shard tag. Redis not answering means 503: revocation cannot be checked, so
 * nothing is let through (fail closed). A route flagged EDGE_ROUTE_SESSION_IN_ADMISSION (the web
 * chat turn) leaves that read to its admission script, which checks the same keys first; any
 * other answer of such a route goes through edge_auth_recheck, which reads the session and runs
 * the handler again, so it is given as if the session had been read first.
 */
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <arpa/inet.h>

#include "bg/authstate.h"
#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/i18n.h"
#include "bg/id.h"
#include "bg/log.h"
#include "bg/redis.h"
#include "bg/timeutil.h"
#include "edge.h"

/* "scheme://host[:port]" of a URL, lower-cased, written into out. */
static void origin_of(const char *url, char *out, size_t outlen)
{
    const char *p = strstr(url, "://");
    size_t n = strlen(url);
    if (p != NULL) {
        const char *slash = strchr(p + 3, '/');
        if (slash != NULL)
            n = (size_t)(slash - url);
    }
    if (n >= outlen)
        n = outlen - 1;
    for (size_t i = 0; i < n; i++) {
        char c = url[i];
        out[i] = (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
    }
    out[n] = '\0';
}

int edge_auth_init(edge_server_t *s)
{
    const bg_config_t *cfg = s->cfg;
    char err[256];
    if (!bg_str_present(cfg->jwt_keys) && !bg_str_present(cfg->jwt_secret)) {
        bg_error("BG_JWT_SECRET or BG_JWT_KEYS: expected an access-token signing key (make run "
                 "generates one in .data/jwt_secret)");
        return BG_ERR_CONFIG;
    }
    if (bg_jwt_ring_new(cfg->jwt_keys, cfg->jwt_secret, &s->jwt, err, sizeof(err)) != 0) {
        bg_error("%s: %s", bg_str_present(cfg->jwt_keys) ? "BG_JWT_KEYS" : "BG_JWT_SECRET", err);
        return BG_ERR_CONFIG;
    }
    const char *list = bg_str_present(cfg->cors_origins) ? cfg->cors_origins : cfg->public_url;
    const char *p = list;
    while (*p != '\0') {
        const char *comma = strchr(p, ',');
        size_t len = comma != NULL ? (size_t)(comma - p) : strlen(p);
        while (len > 0 && *p == ' ') {
            p++;
            len--;
        }
        while (len > 0 && p[len - 1] == ' ')
            len--;
        if (len > 0) {
            char *item = bg_strndup(p, len);
            char origin[256];
            origin_of(item, origin, sizeof(origin));
            free(item);
            s->origins = bg_realloc(s->origins, (s->norigins + 1) * sizeof(char *));
            s->origins[s->norigins++] = bg_strdup(origin);
        }
        if (comma == NULL)
            break;
        p = comma + 1;
    }
    return 0;
}

void edge_auth_dispose(edge_server_t *s)
{
    bg_jwt_ring_free(s->jwt);
    s->jwt = NULL;
    for (size_t i = 0; i < s->norigins; i++)
        free(s->origins[i]);
    free(s->origins);
    s->origins = NULL;
    s->norigins = 0;
}

/* ---- small request helpers ---- */

bool edge_is_state_changing(const edge_req_t *er)
{
    h2o_iovec_t m = er->req->method;
    return !(h2o_memis(m.base, m.len, H2O_STRLIT("GET")) ||
             h2o_memis(m.base, m.len, H2O_STRLIT("HEAD")) ||
             h2o_memis(m.base, m.len, H2O_STRLIT("OPTIONS")));
}

void edge_peer_ip(const edge_req_t *er, char *out, size_t outlen)
{
    struct sockaddr_storage ss;
    out[0] = '\0';
    if (er->req == NULL || er->req->conn->callbacks->get_peername == NULL)
        return;
    socklen_t len = er->req->conn->callbacks->get_peername(er->req->conn, (struct sockaddr *)&ss);
    if (len == 0)
        return;
    if (ss.ss_family == AF_INET)
        inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, out, (socklen_t)outlen);
    else if (ss.ss_family == AF_INET6)
        inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, out, (socklen_t)outlen);
}

h2o_iovec_t edge_cookie(const edge_req_t *er, const char *name)
{
    size_t nl = strlen(name);
    if (er->req == NULL)
        return h2o_iovec_init(NULL, 0);
    /* HTTP/2 may split cookies over several headers */
    for (ssize_t i = -1; (i = h2o_find_header(&er->req->headers, H2O_TOKEN_COOKIE, i)) != -1;) {
        h2o_iovec_t v = er->req->headers.entries[i].value;
        size_t pos = 0;
        while (pos < v.len) {
            while (pos < v.len && (v.base[pos] == ' ' || v.base[pos] == ';'))
                pos++;
            size_t start = pos;
            while (pos < v.len && v.base[pos] != ';')
                pos++;
            size_t len = pos - start;
            if (len > nl && memcmp(v.base + start, name, nl) == 0 && v.base[start + nl] == '=')
                return h2o_iovec_init(v.base + start + nl + 1, len - nl - 1);
        }
    }
    return h2o_iovec_init(NULL, 0);
}

void edge_set_cookie(edge_req_t *er, const char *name, const char *value, const char *path,
                     const char *same_site, int64_t max_age_s, bool http_only)
{
    char line[1024];
    snprintf(line, sizeof(line), "%s=%s; Path=%s; Max-Age=%lld; Secure; SameSite=%s%s", name,
             max_age_s > 0 ? value : "", path, (long long)max_age_s, same_site,
             http_only ? "; HttpOnly" : "");
    edge_add_header(er, "set-cookie", line);
}

/* ---- origins and CORS ---- */

static bool origin_allowed(const edge_req_t *er, h2o_iovec_t origin)
{
    const edge_server_t *s = er->thread->server;
    for (size_t i = 0; i < s->norigins; i++) {
        if (strlen(s->origins[i]) == origin.len &&
            strncasecmp(s->origins[i], origin.base, origin.len) == 0)
            return true;
    }
    /* same origin as the request itself */
    const h2o_req_t *req = er->req;
    char self[300];
    int n = snprintf(self, sizeof(self), "%.*s://%.*s", (int)req->scheme->name.len,
                     req->scheme->name.base, (int)req->authority.len, req->authority.base);
    return n > 0 && (size_t)n == origin.len && strncasecmp(self, origin.base, origin.len) == 0;
}

bool edge_cors(edge_req_t *er)
{
    h2o_iovec_t origin = edge_req_header(er, "origin");
    edge_add_header(er, "vary", "Origin");
    bool allowed = origin.base != NULL && origin_allowed(er, origin);
    if (allowed) {
        char o[300];
        snprintf(o, sizeof(o), "%.*s", (int)(origin.len < 299 ? origin.len : 299), origin.base);
        edge_add_header(er, "access-control-allow-origin", o);
        edge_add_header(er, "access-control-allow-credentials", "true");
        edge_add_header(
            er, "access-control-expose-headers",
            "x-request-id, x-job-id, content-location, retry-after, x-ratelimit-limit-requests, "
            "x-ratelimit-remaining-requests, x-ratelimit-reset-requests, x-quota-limit, "
            "x-quota-remaining, x-quota-reset");
    }
    h2o_iovec_t m = er->req->method;
    bool preflight = h2o_memis(m.base, m.len, H2O_STRLIT("OPTIONS")) &&
                     edge_req_header(er, "access-control-request-method").base != NULL;
    if (!preflight)
        return false;
    if (!allowed) {
        edge_error(er, "origin_not_allowed", NULL, NULL, 0);
        return true;
    }
    edge_add_header(er, "access-control-allow-methods", "GET, POST, PUT, PATCH, DELETE, OPTIONS");
    edge_add_header(er, "access-control-allow-headers",
                    "authorization, content-type, x-csrf-token, x-request-id, prefer, "
                    "last-event-id, accept-language");
    edge_add_header(er, "access-control-max-age", "600");
    edge_respond(er, 204, NULL, NULL, 0);
    return true;
}

/* ---- authentication ---- */

bool edge_csrf_ok(const edge_req_t *er)
{
    h2o_iovec_t origin = edge_req_header(er, "origin");
    if (origin.base == NULL || !origin_allowed(er, origin))
        return false;
    h2o_iovec_t header = edge_req_header(er, "x-csrf-token");
    h2o_iovec_t cookie = edge_cookie(er, "bg_csrf");
    return header.len >= 16 && header.len == cookie.len &&
           bg_crypto_equal(header.base, cookie.base, header.len);
}

static void run_handler(edge_req_t *er)
{
    bg_log_set_context(er->request_id);
    er->route->fn(er);
    bg_log_set_context(NULL);
}

typedef struct st_auth_pending {
    int64_t issued_ms; /* from the jti (a UUIDv7), else iat */
    bool needs_admin;
    bool is_admin;
} auth_pending_t;

/* The keys of the session state one MGET reads: revocation mark, not-before time, locale. */
static int state_keys(const edge_req_t *er, char k_rev[160], char k_nbf[160], char k_loc[160])
{
    if (bg_authstate_key_revoked(k_rev, 160, er->auth.shard, er->auth.session_id) != 0 ||
        bg_authstate_key_nbf(k_nbf, 160, er->auth.shard, er->auth.user_id) != 0 ||
        bg_authstate_key_locale(k_loc, 160, er->auth.shard, er->auth.user_id) != 0)
        return BG_ERR_INVALID;
    return 0;
}

/*
 * Reads an MGET of state_keys into er: the user's locale. Returns "service_unavailable" for a
 * reply that is not one, "unauthorized" when the session was revoked or the token was issued
 * before the user's not-before time, or NULL when the session is live.
 */
static const char *read_state(edge_req_t *er, int err, const redisReply *reply)
{
    if (err != 0 || reply->type != REDIS_REPLY_ARRAY || reply->elements != 3)
        return "service_unavailable";
    const redisReply *rev = reply->element[0], *nbf = reply->element[1], *loc = reply->element[2];
    if (rev->type == REDIS_REPLY_STRING)
        return "unauthorized";
    /* the mark is in milliseconds: a sign-in right after a role change is not caught by it */
    if (nbf->type == REDIS_REPLY_STRING && strtoll(nbf->str, NULL, 10) > er->auth.issued_ms)
        return "unauthorized";
    if (loc->type == REDIS_REPLY_STRING && loc->len < sizeof(er->locale_buf)) {
        memcpy(er->locale_buf, loc->str, loc->len);
        er->locale_buf[loc->len] = '\0';
        if (bg_i18n_is_supported(er->locale_buf))
            er->locale = bg_i18n_negotiate(er->locale_buf, NULL);
    }
    return NULL;
}

static void refuse(edge_req_t *er, const char *code)
{
    if (strcmp(code, "unauthorized") == 0)
        edge_error(er, "unauthorized", "{\"reason\":\"session_revoked\"}", NULL, 0);
    else
        edge_error(er, code, NULL, NULL, 1);
}

static void on_state(void *ud, int err, const redisReply *reply)
{
    edge_req_t *er = ud;
    if (er->req == NULL)
        goto done;
    const char *refused = read_state(er, err, reply);
    auth_pending_t pending = *(auth_pending_t *)er->data;
    free(er->data);
    er->data = NULL;
    er->data_free = NULL;
    if (refused != NULL) {
        refuse(er, refused);
        goto done;
    }
    /* only a live session learns that it lacks the role (a dead one gets 401 above) */
    if (pending.needs_admin && !pending.is_admin) {
        edge_error(er, "forbidden", NULL, NULL, 0);
        goto done;
    }
    run_handler(er);
done:
    edge_req_unref(er);
}

void edge_auth_run(edge_req_t *er)
{
    const edge_route_t *route = er->route;
    edge_server_t *s = er->thread->server;
    bool changing = edge_is_state_changing(er);

    h2o_iovec_t origin = edge_req_header(er, "origin");
    if (changing && origin.base != NULL && !origin_allowed(er, origin)) {
        edge_error(er, "origin_not_allowed", NULL, NULL, 0);
        return;
    }
    if (route->auth == EDGE_PUBLIC) {
        run_handler(er);
        return;
    }

    h2o_iovec_t authz = edge_req_header(er, "authorization");
    h2o_iovec_t token;
    if (authz.base != NULL) {
        if (authz.len < 8 || strncasecmp(authz.base, "Bearer ", 7) != 0) {
            edge_error(er, "unauthorized", NULL, NULL, 0);
            return;
        }
        token = h2o_iovec_init(authz.base + 7, authz.len - 7);
        er->auth.mode = EDGE_AUTHN_BEARER;
    } else {
        token = edge_cookie(er, "bg_at");
        er->auth.mode = EDGE_AUTHN_COOKIE;
    }
    if (token.len == 0) {
        edge_error(er, "unauthorized", NULL, NULL, 0);
        return;
    }
    bg_jwt_claims_t claims;
    const char *why = "malformed";
    if (bg_jwt_verify(s->jwt, token.base, token.len, bg_timeutil_wall_ms() / 1000, &claims, &why) !=
        0) {
        bg_debug("access token refused: %s", why);
        edge_error(er, "unauthorized",
                   strcmp(why, "expired") == 0 ? "{\"reason\":\"token_expired\"}" : NULL, NULL, 0);
        return;
    }
    if (er->auth.mode == EDGE_AUTHN_COOKIE && changing && !edge_csrf_ok(er)) {
        edge_error(er, "csrf_failed", NULL, NULL, 0);
        return;
    }
    bg_strlcpy(er->auth.user_id, claims.sub, sizeof(er->auth.user_id));
    bg_strlcpy(er->auth.session_id, claims.sid, sizeof(er->auth.session_id));
    bg_strlcpy(er->auth.role, claims.role, sizeof(er->auth.role));
    er->auth.shard = bg_shard_of(claims.sub, s->cfg->shards);

    char k_rev[160], k_nbf[160], k_loc[160];
    if (state_keys(er, k_rev, k_nbf, k_loc) != 0) {
        edge_error(er, "unauthorized", NULL, NULL, 0);
        return;
    }
    bg_uuid_t jti;
    er->auth.issued_ms =
        bg_id_uuid_parse(claims.jti, strlen(claims.jti), &jti) == 0 && bg_id_uuid_version(&jti) == 7
            ? bg_id_uuid_v7_ms(&jti)
            : claims.iat * 1000;
    if ((route->flags & EDGE_ROUTE_SESSION_IN_ADMISSION) != 0 && route->auth == EDGE_USER) {
        /* the admission script reads the session state; a response before it waits for it */
        er->auth.unconfirmed = true;
        er->auth.headers_before = er->req->res.headers.size;
        run_handler(er);
        return;
    }
    auth_pending_t *p = bg_malloc(sizeof(*p));
    p->issued_ms = er->auth.issued_ms;
    p->needs_admin = route->auth == EDGE_ADMIN;
    p->is_admin = strcmp(claims.role, "admin") == 0;
    er->data = p;
    er->data_free = free;
    const char *argv[] = {"MGET", k_rev, k_nbf, k_loc};
    edge_req_ref(er);
    if (bg_redis_async_argv(er->thread->redis, on_state, er, 4, argv, NULL) != 0) {
        edge_req_unref(er);
        edge_error(er, "service_unavailable", NULL, NULL, 1);
    }
}

/* The session read of edge_auth_recheck came back: refuse, or run the handler again. */
static void on_recheck(void *ud, int err, const redisReply *reply)
{
    edge_req_t *er = ud;
    if (er->req == NULL)
        goto done;
    const char *refused = read_state(er, err, reply);
    if (refused != NULL) {
        refuse(er, refused);
        goto done;
    }
    /* from the start, with what the first run left gone: its state, its body, its headers */
    if (er->data_free != NULL)
        er->data_free(er->data);
    er->data = NULL;
    er->data_free = NULL;
    bg_json_doc_free(er->body_doc);
    er->body_doc = NULL;
    er->err_param[0] = '\0';
    run_handler(er);
done:
    edge_req_unref(er);
}

void edge_auth_recheck(edge_req_t *er)
{
    er->auth.unconfirmed = false; /* whatever comes next answers for real */
    /* the handler's headers go with its answer; those set before it (CORS) stay */
    if (er->req->res.headers.size > er->auth.headers_before)
        er->req->res.headers.size = er->auth.headers_before;
    char k_rev[160], k_nbf[160], k_loc[160];
    if (state_keys(er, k_rev, k_nbf, k_loc) != 0) {
        edge_error(er, "unauthorized", NULL, NULL, 0);
        return;
    }
    const char *argv[] = {"MGET", k_rev, k_nbf, k_loc};
    edge_req_ref(er);
    if (bg_redis_async_argv(er->thread->redis, on_recheck, er, 4, argv, NULL) != 0) {
        edge_req_unref(er);
        edge_error(er, "service_unavailable", NULL, NULL, 1);
    }
}
