/*
 * The accounts API end to end: the real bg-edge binary (sometimes two of them sharing one Redis and
 * one database) spoken to over h2c, the way a client or a browser would.
 *
 * Each test gets its own Redis, its own migrated database and one edge (BG_LOGIN_FAILURES_MAX=3, a
 * generous per-IP limit); tests that need a second instance or other limits start it next to the
 * first. Tokens are forged by hand (base64url + HMAC-SHA256 from libsodium) and with bg_jwt_sign so
 * that each refusal is shown to be a refusal of exactly one defect: a hand-made token with every
 * claim right is accepted first, so the forging itself is known to work.
 */
#include <criterion/criterion.h>
#include <signal.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bg/json.h"
#include "bg/jwt.h"
#include "bgtest.h"

#define SECRET "0123456789abcdef0123456789abcdef-auth-e2e"
#define OTHER_SECRET "fedcba9876543210fedcba9876543210-forged!!"
#define ALLOWED_ORIGIN "https://app.example.com"
#define FOREIGN_ORIGIN "https://evil.example.net"
#define PASSWORD "correct horse battery 42"
#define ACCESS_TTL 600
#define MAX_EDGES 3

typedef struct st_edge {
    pid_t pid;
    int port;
    char base[64];
    char log[300];
} edge_t;

typedef struct st_fixture {
    bgt_redis_t redis;
    bgt_pg_t db;
    char dir[256];
    edge_t edges[MAX_EDGES];
    size_t nedges;
    bool keep_logs; /* an edge failed: its log stays for reading */
} fixture_t;

static fixture_t F;

/* Starts one more bg-edge on the shared Redis and database; extra overrides the defaults. */
static edge_t *start_edge(const char *const extra[])
{
    cr_assert(F.nedges < MAX_EDGES);
    edge_t *e = &F.edges[F.nedges];
    memset(e, 0, sizeof(*e));
    e->port = bgt_free_port();
    snprintf(e->base, sizeof(e->base), "http://127.0.0.1:%d", e->port);
    snprintf(e->log, sizeof(e->log), "%s/edge%zu.log", F.dir, F.nedges);
    char port[32], redis[200], db[600];
    snprintf(port, sizeof(port), "BG_HTTP_PORT=%d", e->port);
    snprintf(redis, sizeof(redis), "BG_REDIS_URL=%s", F.redis.url);
    snprintf(db, sizeof(db), "BG_DATABASE_URL=%s", F.db.url);
    const char *env[40];
    size_t n = 0;
    /* getenv() finds the first of duplicates: the caller's variables go first to override */
    for (size_t i = 0; extra != NULL && extra[i] != NULL && n < 16; i++)
        env[n++] = extra[i];
    env[n++] = port;
    env[n++] = "BG_HTTPS_PORT=0";
    env[n++] = redis;
    env[n++] = db;
    env[n++] = "BG_ENV_FILE=/nonexistent";
    env[n++] = "BG_JWT_SECRET=" SECRET;
    env[n++] = "BG_CORS_ORIGINS=" ALLOWED_ORIGIN;
    env[n++] = "BG_LOGIN_FAILURES_MAX=3";
    env[n++] = "BG_LOGIN_IP_PER_MIN=1000";
    env[n++] = "BG_ACCESS_TTL_S=600";
    env[n++] = "BG_EDGE_THREADS=2";
    env[n++] = "BG_LOG_FORMAT=text";
    env[n++] = "BG_LOG_LEVEL=debug";
    env[n++] = "BG_SHUTDOWN_GRACE_MS=2000";
    env[n] = NULL;
    const char *argv[] = {bgt_bin("bg-edge"), NULL};
    e->pid = bgt_spawn(argv, env, e->log);
    cr_assert(e->pid > 0, "cannot start bg-edge");
    F.nedges++;
    char url[128];
    snprintf(url, sizeof(url), "%s/healthz", e->base);
    cr_assert_eq(bgt_wait_http(url, 200, 15000), 0, "bg-edge did not come up; see %s", e->log);
    return e;
}

static void setup(void)
{
    memset(&F, 0, sizeof(F));
    cr_assert_eq(bgt_pg_create(&F.db, true), 0);
    cr_assert_eq(bgt_redis_start(&F.redis), 0);
    cr_assert_eq(bgt_tempdir(F.dir, sizeof(F.dir)), 0);
    (void)start_edge(NULL);
}

/*
 * Ends every edge with SIGTERM and asserts a clean exit: nothing crashed, and in an ASan build the
 * sanitizers found nothing at exit. Called at the end of each test (asserts in .fini do not count).
 */
static void stop_edges_cleanly(void)
{
    for (size_t i = 0; i < F.nedges; i++) {
        int st = bgt_stop(F.edges[i].pid, SIGTERM, 8000);
        F.edges[i].pid = 0;
        if (st == -1 || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
            F.keep_logs = true;
        cr_assert(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0,
                  "bg-edge %zu did not exit cleanly (status %d); see %s", i, st, F.edges[i].log);
    }
}

static void teardown(void)
{
    for (size_t i = 0; i < F.nedges; i++) {
        if (F.edges[i].pid > 0)
            bgt_stop(F.edges[i].pid, SIGKILL, 2000);
    }
    bgt_redis_stop(&F.redis);
    bgt_pg_drop(&F.db);
    if (!F.keep_logs)
        bgt_rmtree(F.dir);
}

TestSuite(auth, .init = setup, .fini = teardown, .timeout = 90);

static const char *base(void)
{
    return F.edges[0].base;
}

/* ---- HTTP ---- */

/*
 * One request over h2c. bearer (may be NULL) becomes an Authorization header; a body is sent as
 * application/json unless extra names another Content-Type. No answer here may be a 5xx.
 */
static void http_n(const char *at, const char *method, const char *path, const char *bearer,
                   const char *const extra[], const char *body, size_t body_len, bgt_resp_t *r)
{
    const char *h[24];
    size_t n = 0;
    bool has_type = false;
    for (size_t i = 0; extra != NULL && extra[i] != NULL && n < 20; i++) {
        has_type = has_type || strncasecmp(extra[i], "content-type:", 13) == 0;
        h[n++] = extra[i];
    }
    static _Thread_local char authz[2 * BG_JWT_MAX_TOKEN];
    if (bearer != NULL) {
        snprintf(authz, sizeof(authz), "Authorization: Bearer %s", bearer);
        h[n++] = authz;
    }
    if (body != NULL && !has_type)
        h[n++] = "Content-Type: application/json";
    h[n] = NULL;
    char url[512];
    snprintf(url, sizeof(url), "%s%s", at, path);
    cr_assert_eq(bgt_http(BGT_H2C, method, url, h, body, body_len, r), 0, "%s %s: %s", method, url,
                 r->error);
    cr_assert_eq(r->version, 2, "%s %s spoke HTTP/%ld", method, url, r->version);
    cr_assert(r->status >= 200 && r->status < 500, "%s %s answered %ld: %s", method, path,
              r->status, r->body);
}

static void http(const char *at, const char *method, const char *path, const char *bearer,
                 const char *const extra[], const char *body, bgt_resp_t *r)
{
    http_n(at, method, path, bearer, extra, body, body != NULL ? strlen(body) : 0, r);
}

static bool alive(const edge_t *e)
{
    int st;
    if (waitpid(e->pid, &st, WNOHANG) != 0)
        return false;
    char url[128];
    snprintf(url, sizeof(url), "%s/healthz", e->base);
    return bgt_wait_http(url, 200, 3000) == 0;
}

/* ---- JSON of responses ---- */

/* Walks a dotted path ("error.details.fields.0.code") from the root of r's body. */
static const bg_json_t *walk(const bg_json_doc_t *doc, const char *path)
{
    const bg_json_t *v = bg_json_root(doc);
    const char *p = path;
    while (v != NULL && *p != '\0') {
        const char *dot = strchr(p, '.');
        size_t len = dot != NULL ? (size_t)(dot - p) : strlen(p);
        char seg[64];
        snprintf(seg, sizeof(seg), "%.*s", (int)len, p);
        if (bg_json_is_array(v)) {
            char *end = NULL;
            unsigned long i = strtoul(seg, &end, 10);
            v = end != seg && *end == '\0' ? bg_json_at(v, i) : NULL;
        } else if (bg_json_is_object(v)) {
            v = bg_json_find(v, seg);
        } else {
            v = NULL;
        }
        p = dot != NULL ? dot + 1 : p + len;
    }
    return v;
}

static bg_json_doc_t *parse(const bgt_resp_t *r)
{
    bg_json_doc_t *doc = NULL;
    const char *desc = NULL;
    if (bg_json_parse(r->body, r->body_len, &bg_json_default_limits, &doc, &desc, NULL) != 0)
        return NULL;
    return doc;
}

/* The string at path copied into buf, or "" when the body has none (so asserts can print it). */
static const char *jstr(const bgt_resp_t *r, const char *path, char *buf, size_t buflen)
{
    buf[0] = '\0';
    bg_json_doc_t *doc = parse(r);
    if (doc == NULL)
        return buf;
    const char *s = bg_json_str(walk(doc, path), NULL);
    if (s != NULL)
        snprintf(buf, buflen, "%s", s);
    bg_json_doc_free(doc);
    return buf;
}

static bool jhas(const bgt_resp_t *r, const char *path)
{
    bg_json_doc_t *doc = parse(r);
    bool has = doc != NULL && walk(doc, path) != NULL;
    bg_json_doc_free(doc);
    return has;
}

static int64_t jint(const bgt_resp_t *r, const char *path)
{
    bg_json_doc_t *doc = parse(r);
    int64_t v = -1;
    if (doc != NULL && !bg_json_int(walk(doc, path), &v))
        v = -1;
    bg_json_doc_free(doc);
    return v;
}

/*
 * The expect_* checks are macros around these so that a failure names the line of the test, not
 * the helper's.
 */
#define expect_error(r, status, code) expect_error_at(__LINE__, r, status, code)
#define expect_field(r, field, reason) expect_field_at(__LINE__, r, field, reason)
#define expect_401_reason(r, reason) expect_401_reason_at(__LINE__, r, reason)

/* Checks the one error format: status, code, a non-empty message and a request id. */
static void expect_error_at(int line, const bgt_resp_t *r, long status, const char *code)
{
    char buf[4096];
    cr_assert_eq(r->status, status, "line %d: expected %ld %s, got %ld: %s", line, status, code,
                 r->status, r->body);
    cr_assert_str_eq(jstr(r, "error.code", buf, sizeof(buf)), code, "%s", r->body);
    cr_assert_str_neq(jstr(r, "error.message", buf, sizeof(buf)), "", "%s", r->body);
    cr_assert_str_neq(jstr(r, "error.request_id", buf, sizeof(buf)), "", "%s", r->body);
    char ct[128];
    cr_assert_not_null(bgt_resp_header(r, "content-type", ct, sizeof(ct)), "%s", r->body);
    cr_assert(strstr(ct, "application/json") != NULL, "content-type %s", ct);
}

/* A 422 naming field and reason in details.fields[0]. */
static void expect_field_at(int line, const bgt_resp_t *r, const char *field, const char *reason)
{
    char buf[512];
    expect_error_at(line, r, 422, "validation_failed");
    cr_assert_str_eq(jstr(r, "error.details.fields.0.field", buf, sizeof(buf)), field,
                     "line %d: %s", line, r->body);
    cr_assert_str_eq(jstr(r, "error.details.fields.0.code", buf, sizeof(buf)), reason,
                     "line %d: %s", line, r->body);
}

/* A 401 whose details.reason is reason. */
static void expect_401_reason_at(int line, const bgt_resp_t *r, const char *reason)
{
    char buf[128];
    expect_error_at(line, r, 401, "unauthorized");
    cr_assert_str_eq(jstr(r, "error.details.reason", buf, sizeof(buf)), reason, "line %d: %s", line,
                     r->body);
}

/*
 * The message of key in the locale's catalogue (locales/<locale>.json of the source tree) with
 * {field} replaced, so that language checks compare with what translators wrote.
 */
static void catalog(const char *locale, const char *key, const char *field, char *out,
                    size_t outlen)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/locales/%s.json", BGT_SOURCE_DIR, locale);
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "cannot open %s", path);
    static char text[65536];
    size_t n = fread(text, 1, sizeof(text) - 1, f);
    (void)fclose(f);
    text[n] = '\0';
    bgt_resp_t file = {.body = text, .body_len = n};
    bg_json_doc_t *doc = parse(&file);
    cr_assert_not_null(doc, "%s is not JSON", path);
    const char *msg = bg_json_str(bg_json_find(bg_json_root(doc), key), NULL);
    cr_assert_not_null(msg, "%s has no %s", path, key);
    const char *ph = strstr(msg, "{field}");
    if (ph != NULL && field != NULL)
        snprintf(out, outlen, "%.*s%s%s", (int)(ph - msg), msg, field, ph + 7);
    else
        snprintf(out, outlen, "%s", msg);
    bg_json_doc_free(doc);
}

/* ---- accounts ---- */

typedef struct st_session {
    char email[128];
    char user_id[64];
    char access[BG_JWT_MAX_TOKEN];
    char refresh[256];
} session_t;

static void unique_email(const char *tag, char *out, size_t outlen)
{
    static unsigned counter;
    snprintf(out, outlen, "%s-%d-%u-%lld@example.com", tag, (int)getpid(), counter++,
             bgt_now_ms() % 100000);
}

static void take_tokens(const bgt_resp_t *r, session_t *s)
{
    char tt[32];
    cr_assert_str_eq(jstr(r, "token_type", tt, sizeof(tt)), "Bearer", "%s", r->body);
    jstr(r, "user.id", s->user_id, sizeof(s->user_id));
    jstr(r, "access_token", s->access, sizeof(s->access));
    jstr(r, "refresh_token", s->refresh, sizeof(s->refresh));
    cr_assert(s->user_id[0] != '\0' && s->access[0] != '\0' && s->refresh[0] != '\0', "%s",
              r->body);
}

/* Registers a fresh user through at (token mode). */
static void register_user(const char *at, const char *tag, session_t *s)
{
    memset(s, 0, sizeof(*s));
    unique_email(tag, s->email, sizeof(s->email));
    char body[512];
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"%s\",\"name\":\"%s\"}", s->email,
             PASSWORD, tag);
    bgt_resp_t r;
    http(at, "POST", "/auth/register", NULL, NULL, body, &r);
    cr_assert_eq(r.status, 201, "register: %s", r.body);
    take_tokens(&r, s);
    bgt_resp_free(&r);
}

static void login_as(const char *at, const char *email, session_t *s)
{
    char body[512];
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"%s\"}", email, PASSWORD);
    bgt_resp_t r;
    http(at, "POST", "/auth/login", NULL, NULL, body, &r);
    cr_assert_eq(r.status, 200, "login: %s", r.body);
    memset(s, 0, sizeof(*s));
    snprintf(s->email, sizeof(s->email), "%s", email);
    take_tokens(&r, s);
    bgt_resp_free(&r);
}

/* GET /auth/profile with a bearer token; returns the status (the response is freed). */
static long profile_status(const char *at, const char *token, char *body_out, size_t outlen)
{
    bgt_resp_t r;
    http(at, "GET", "/auth/profile", token, NULL, NULL, &r);
    long st = r.status;
    if (body_out != NULL)
        snprintf(body_out, outlen, "%s", r.body);
    bgt_resp_free(&r);
    return st;
}

/* ---- 1. the whole flow ---- */

Test(auth, register_login_profile_and_a_locale_change_that_localizes_later_errors)
{
    char email[128], body[512], buf[512];
    unique_email("flow", email, sizeof(email));
    snprintf(body, sizeof(body),
             "{\"email\":\"%s\",\"password\":\"%s\",\"name\":\"Ada Lovelace\",\"locale\":\"en\"}",
             email, PASSWORD);
    bgt_resp_t r;
    http(base(), "POST", "/auth/register", NULL, NULL, body, &r);
    cr_assert_eq(r.status, 201, "%s", r.body);
    session_t reg;
    take_tokens(&r, &reg);
    cr_assert_str_eq(jstr(&r, "user.email", buf, sizeof(buf)), email, "%s", r.body);
    cr_assert_str_eq(jstr(&r, "user.name", buf, sizeof(buf)), "Ada Lovelace", "%s", r.body);
    cr_assert_str_eq(jstr(&r, "user.locale", buf, sizeof(buf)), "en", "%s", r.body);
    cr_assert_str_eq(jstr(&r, "user.role", buf, sizeof(buf)), "user", "%s", r.body);
    cr_assert_str_eq(jstr(&r, "user.status", buf, sizeof(buf)), "active", "%s", r.body);
    cr_assert(jhas(&r, "user.created_at") && jhas(&r, "user.organization_id"), "%s", r.body);
    cr_assert_eq(jint(&r, "expires_in"), ACCESS_TTL, "%s", r.body);
    cr_assert(strstr(r.body, PASSWORD) == NULL, "the password came back: %s", r.body);
    cr_assert_str_eq(bgt_resp_header(&r, "cache-control", buf, sizeof(buf)), "no-store");
    bgt_resp_free(&r);

    session_t s;
    login_as(base(), email, &s);
    cr_assert_str_eq(s.user_id, reg.user_id);
    cr_assert_str_neq(s.refresh, reg.refresh);

    http(base(), "GET", "/auth/profile", s.access, NULL, NULL, &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert_str_eq(jstr(&r, "id", buf, sizeof(buf)), s.user_id, "%s", r.body);
    cr_assert_str_eq(jstr(&r, "email", buf, sizeof(buf)), email, "%s", r.body);
    cr_assert_str_eq(jstr(&r, "locale", buf, sizeof(buf)), "en", "%s", r.body);
    bgt_resp_free(&r);

    /* an error of an authenticated route, in English first */
    char en_msg[512], en_404[512], api_key_path[96], want[512];
    http(base(), "PUT", "/auth/profile", s.access, NULL, "{\"name\":5}", &r);
    expect_field(&r, "name", "wrong_type");
    catalog("en", "error.validation.wrong_type", "name", want, sizeof(want));
    cr_assert_str_eq(jstr(&r, "error.message", en_msg, sizeof(en_msg)), want, "%s", r.body);
    bgt_resp_free(&r);
    snprintf(api_key_path, sizeof(api_key_path),
             "/auth/api-keys/0190f5a0-0000-7000-8000-000000000000");
    http(base(), "DELETE", api_key_path, s.access, NULL, NULL, &r);
    expect_error(&r, 404, "not_found");
    jstr(&r, "error.message", en_404, sizeof(en_404));
    bgt_resp_free(&r);

    http(base(), "PUT", "/auth/locale", s.access, NULL, "{\"locale\":\"fr\"}", &r);
    expect_field(&r, "locale", "unsupported_locale");
    jstr(&r, "error.message", buf, sizeof(buf));
    cr_assert(strstr(buf, "en") != NULL && strstr(buf, "ru") != NULL && strstr(buf, "es") != NULL,
              "the supported locales are not listed: %s", r.body);
    bgt_resp_free(&r);

    http(base(), "PUT", "/auth/locale", s.access, NULL, "{\"locale\":\"ru\"}", &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert_str_eq(jstr(&r, "locale", buf, sizeof(buf)), "ru", "%s", r.body);
    cr_assert_str_eq(jstr(&r, "id", buf, sizeof(buf)), s.user_id, "%s", r.body);
    bgt_resp_free(&r);

    /* the same mistakes now answer in Russian, without any Accept-Language */
    http(base(), "PUT", "/auth/profile", s.access, NULL, "{\"name\":5}", &r);
    expect_field(&r, "name", "wrong_type");
    jstr(&r, "error.message", buf, sizeof(buf));
    cr_assert_str_neq(buf, en_msg, "still English after the change to ru: %s", r.body);
    catalog("ru", "error.validation.wrong_type", "name", want, sizeof(want));
    cr_assert_str_eq(buf, want, "%s", r.body);
    bgt_resp_free(&r);
    http(base(), "DELETE", api_key_path, s.access, NULL, NULL, &r);
    expect_error(&r, 404, "not_found");
    jstr(&r, "error.message", buf, sizeof(buf));
    cr_assert_str_neq(buf, en_404, "404 still in English after the change to ru: %s", r.body);
    bgt_resp_free(&r);

    /* the choice is stored: the profile and the next sign-in say ru */
    http(base(), "GET", "/auth/profile", s.access, NULL, NULL, &r);
    cr_assert_str_eq(jstr(&r, "locale", buf, sizeof(buf)), "ru", "%s", r.body);
    bgt_resp_free(&r);
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"%s\"}", email, PASSWORD);
    http(base(), "POST", "/auth/login", NULL, NULL, body, &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert_str_eq(jstr(&r, "user.locale", buf, sizeof(buf)), "ru", "%s", r.body);
    bgt_resp_free(&r);

    /* and PUT /auth/profile changes name and locale */
    http(base(), "PUT", "/auth/profile", s.access, NULL, "{\"name\":\"Ada K.\",\"locale\":\"es\"}",
         &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert_str_eq(jstr(&r, "name", buf, sizeof(buf)), "Ada K.", "%s", r.body);
    cr_assert_str_eq(jstr(&r, "locale", buf, sizeof(buf)), "es", "%s", r.body);
    bgt_resp_free(&r);
    stop_edges_cleanly();
}

Test(auth, refresh_rotates_and_reuse_of_a_spent_token_kills_the_family_on_every_edge)
{
    edge_t *other = start_edge(NULL);
    session_t first, s;
    register_user(base(), "rotate", &first);
    login_as(base(), first.email, &s);

    char body[512], buf[BG_JWT_MAX_TOKEN];
    snprintf(body, sizeof(body), "{\"refresh_token\":\"%s\"}", s.refresh);
    bgt_resp_t r;
    http(base(), "POST", "/auth/refresh", NULL, NULL, body, &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    session_t rotated;
    take_tokens(&r, &rotated);
    cr_assert_str_eq(rotated.user_id, s.user_id);
    cr_assert_str_neq(rotated.refresh, s.refresh, "the refresh token was not rotated");
    cr_assert_str_neq(rotated.access, s.access);
    cr_assert_str_eq(jstr(&r, "user.email", buf, sizeof(buf)), first.email, "%s", r.body);
    bgt_resp_free(&r);

    /* the new access token works everywhere; the old one too, until the session ends */
    cr_assert_eq(profile_status(base(), rotated.access, buf, sizeof(buf)), 200, "%s", buf);
    cr_assert_eq(profile_status(other->base, rotated.access, buf, sizeof(buf)), 200, "%s", buf);
    cr_assert_eq(profile_status(base(), s.access, buf, sizeof(buf)), 200, "%s", buf);

    /* the spent token again: a thief or a replay, so the whole family dies */
    http(other->base, "POST", "/auth/refresh", NULL, NULL, body, &r);
    expect_401_reason(&r, "refresh_token_reuse");
    bgt_resp_free(&r);

    snprintf(body, sizeof(body), "{\"refresh_token\":\"%s\"}", rotated.refresh);
    http(base(), "POST", "/auth/refresh", NULL, NULL, body, &r);
    expect_error(&r, 401, "unauthorized");
    cr_assert(strstr(r.body, "access_token") == NULL, "%s", r.body);
    bgt_resp_free(&r);

    for (size_t i = 0; i < F.nedges; i++) {
        http(F.edges[i].base, "GET", "/auth/profile", rotated.access, NULL, NULL, &r);
        expect_401_reason(&r, "session_revoked");
        bgt_resp_free(&r);
        http(F.edges[i].base, "GET", "/auth/profile", s.access, NULL, NULL, &r);
        expect_401_reason(&r, "session_revoked");
        bgt_resp_free(&r);
    }
    /* another session of the same user is not part of that family */
    cr_assert_eq(profile_status(other->base, first.access, buf, sizeof(buf)), 200, "%s", buf);
    snprintf(body, sizeof(body), "{\"refresh_token\":\"%s\"}", first.refresh);
    http(other->base, "POST", "/auth/refresh", NULL, NULL, body, &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    bgt_resp_free(&r);

    /* a refresh token nobody issued */
    http(base(), "POST", "/auth/refresh", NULL, NULL,
         "{\"refresh_token\":\"rt_definitely_not_a_token_we_issued_0000000000\"}", &r);
    expect_error(&r, 401, "unauthorized");
    bgt_resp_free(&r);
    http(base(), "POST", "/auth/refresh", NULL, NULL, "{}", &r);
    expect_field(&r, "refresh_token", "missing");
    bgt_resp_free(&r);
    stop_edges_cleanly();
}

Test(auth, logout_is_honoured_by_a_second_edge_sharing_redis_and_postgres)
{
    edge_t *other = start_edge(NULL);
    session_t reg, s;
    register_user(base(), "logout", &reg);
    login_as(base(), reg.email, &s);

    char buf[4096];
    /* the second instance accepts the token before the sign-out... */
    cr_assert_eq(profile_status(other->base, s.access, buf, sizeof(buf)), 200, "%s", buf);

    bgt_resp_t r;
    http(base(), "POST", "/auth/logout", s.access, NULL, "{}", &r);
    cr_assert_eq(r.status, 204, "%s", r.body);
    cr_assert_eq(r.body_len, 0, "%s", r.body);
    bgt_resp_free(&r);

    /* ...and refuses it after, though it never saw the sign-out */
    http(other->base, "GET", "/auth/profile", s.access, NULL, NULL, &r);
    expect_401_reason(&r, "session_revoked");
    bgt_resp_free(&r);
    http(base(), "GET", "/auth/profile", s.access, NULL, NULL, &r);
    expect_401_reason(&r, "session_revoked");
    bgt_resp_free(&r);
    /* the session's refresh token is dead too */
    char body[512];
    snprintf(body, sizeof(body), "{\"refresh_token\":\"%s\"}", s.refresh);
    http(other->base, "POST", "/auth/refresh", NULL, NULL, body, &r);
    expect_error(&r, 401, "unauthorized");
    bgt_resp_free(&r);

    /* signing out of one session leaves the others alone */
    cr_assert_eq(profile_status(other->base, reg.access, buf, sizeof(buf)), 200, "%s", buf);

    /* sign-out by refresh token alone (no access token) */
    session_t t;
    login_as(other->base, reg.email, &t);
    cr_assert_eq(profile_status(base(), t.access, buf, sizeof(buf)), 200, "%s", buf);
    snprintf(body, sizeof(body), "{\"refresh_token\":\"%s\"}", t.refresh);
    http(other->base, "POST", "/auth/logout", NULL, NULL, body, &r);
    cr_assert_eq(r.status, 204, "%s", r.body);
    bgt_resp_free(&r);
    http(base(), "GET", "/auth/profile", t.access, NULL, NULL, &r);
    expect_401_reason(&r, "session_revoked");
    bgt_resp_free(&r);
    stop_edges_cleanly();
}

/* ---- 2. bad input ---- */

typedef struct st_bad_case {
    const char *body;
    long status;
    const char *code;
    const char *field;  /* details.fields[0].field for a 422, else NULL */
    const char *reason; /* details.fields[0].code */
} bad_case_t;

Test(auth, registration_refuses_bad_input_with_the_right_status_and_code)
{
    char dup[128];
    unique_email("taken", dup, sizeof(dup));
    /* a 1 to 200-character name is fine, 201 is not; characters, not bytes, are counted */
    char name200[1024], name201[256], body_ok[1536], body_201[768], body_dup[512];
    size_t k = 0;
    for (int i = 0; i < 200; i++) {
        name200[k++] = '\xd1'; /* U+044F, two bytes in UTF-8 */
        name200[k++] = '\x8f';
    }
    name200[k] = '\0';
    memset(name201, 'n', 201);
    name201[201] = '\0';
    snprintf(body_ok, sizeof(body_ok), "{\"email\":\"%s\",\"password\":\"%s\",\"name\":\"%s\"}",
             dup, PASSWORD, name200);
    snprintf(body_201, sizeof(body_201),
             "{\"email\":\"n201@example.com\",\"password\":\"%s\",\"name\":\"%s\"}", PASSWORD,
             name201);

    bgt_resp_t r;
    http(base(), "POST", "/auth/register", NULL, NULL, body_ok, &r);
    cr_assert_eq(r.status, 201, "200 two-byte characters were refused: %s", r.body);
    bgt_resp_free(&r);

    /* the same address in other letters is the same account */
    char upper[128];
    snprintf(upper, sizeof(upper), "%s", dup);
    for (char *p = upper; *p != '\0' && *p != '@'; p++)
        *p = (*p >= 'a' && *p <= 'z') ? (char)(*p - 'a' + 'A') : *p;
    snprintf(body_dup, sizeof(body_dup), "{\"email\":\"%s\",\"password\":\"%s\"}", upper, PASSWORD);

    const bad_case_t cases[] = {
        {"{\"email\":", 400, "malformed_json", NULL, NULL},
        {"{\"email\":\"a@example.com\",}", 400, "malformed_json", NULL, NULL},
        {"[\"a@example.com\"]", 400, "malformed_json", NULL, NULL},
        {"not json at all", 400, "malformed_json", NULL, NULL},
        {"{\"email\":[[[[[[[[[[1]]]]]]]]]]}", 400, "malformed_json", NULL, NULL},
        {"{\"email\":\"a@example.com\",\"email\":\"b@example.com\",\"password\":\"" PASSWORD "\"}",
         400, "malformed_json", NULL, NULL},
        {"{}", 422, "validation_failed", "email", "missing"},
        {"{\"password\":\"" PASSWORD "\"}", 422, "validation_failed", "email", "missing"},
        {"{\"email\":null,\"password\":\"" PASSWORD "\"}", 422, "validation_failed", "email",
         "missing"},
        {"{\"email\":\"a@example.com\"}", 422, "validation_failed", "password", "missing"},
        {"{\"email\":5,\"password\":\"" PASSWORD "\"}", 422, "validation_failed", "email",
         "wrong_type"},
        {"{\"email\":[\"a@example.com\"],\"password\":\"" PASSWORD "\"}", 422, "validation_failed",
         "email", "wrong_type"},
        {"{\"email\":\"a@example.com\",\"password\":12345678901}", 422, "validation_failed",
         "password", "wrong_type"},
        {"{\"email\":\"a@example.com\",\"password\":\"" PASSWORD "\",\"name\":true}", 422,
         "validation_failed", "name", "wrong_type"},
        {"{\"emial\":\"a@example.com\",\"password\":\"" PASSWORD "\"}", 422, "validation_failed",
         "emial", "unknown_field"},
        {"{\"email\":\"a@example.com\",\"password\":\"" PASSWORD "\",\"role\":\"admin\"}", 422,
         "validation_failed", "role", "unknown_field"},
        {body_201, 422, "validation_failed", "name", "too_long"},
        {"{\"email\":\"no-at-sign.example.com\",\"password\":\"" PASSWORD "\"}", 422,
         "validation_failed", "email", "invalid_email"},
        {"{\"email\":\"a@localhost\",\"password\":\"" PASSWORD "\"}", 422, "validation_failed",
         "email", "invalid_email"},
        {"{\"email\":\"a b@example.com\",\"password\":\"" PASSWORD "\"}", 422, "validation_failed",
         "email", "invalid_email"},
        {"{\"email\":\"a@@example.com\",\"password\":\"" PASSWORD "\"}", 422, "validation_failed",
         "email", "invalid_email"},
        {"{\"email\":\"a@example..com\",\"password\":\"" PASSWORD "\"}", 422, "validation_failed",
         "email", "invalid_email"},
        {"{\"email\":\"a@example.com\",\"password\":\"short1\"}", 422, "validation_failed",
         "password", "weak_password"},
        {"{\"email\":\"a@example.com\",\"password\":\"password123\"}", 422, "validation_failed",
         "password", "password_common"},
        {"{\"email\":\"a@example.com\",\"password\":\"QWERTYUIOP\"}", 422, "validation_failed",
         "password", "password_common"},
        {"{\"email\":\"a@example.com\",\"password\":\"zzzzzzzzzzzz\"}", 422, "validation_failed",
         "password", "password_common"},
        {"{\"email\":\"longlocalpart@example.com\",\"password\":\"LongLocalPart\"}", 422,
         "validation_failed", "password", "password_matches_email"},
        {"{\"email\":\"a@example.com\",\"password\":\"" PASSWORD "\",\"locale\":\"fr\"}", 422,
         "validation_failed", "locale", "unsupported_locale"},
        {"{\"email\":\"a@example.com\",\"password\":\"" PASSWORD "\",\"mode\":\"jwt\"}", 422,
         "validation_failed", "mode", "invalid_value"},
        {body_dup, 409, "email_taken", NULL, NULL},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const bad_case_t *c = &cases[i];
        http(base(), "POST", "/auth/register", NULL, NULL, c->body, &r);
        cr_expect_eq(r.status, c->status, "case %zu %.80s: expected %ld, got %ld: %s", i, c->body,
                     c->status, r.status, r.body);
        if (r.status == c->status) {
            char buf[512];
            cr_expect_str_eq(jstr(&r, "error.code", buf, sizeof(buf)), c->code, "case %zu: %s", i,
                             r.body);
            cr_expect_str_neq(jstr(&r, "error.message", buf, sizeof(buf)), "", "case %zu: %s", i,
                              r.body);
            if (c->field != NULL) {
                cr_expect_str_eq(jstr(&r, "error.details.fields.0.field", buf, sizeof(buf)),
                                 c->field, "case %zu: %s", i, r.body);
                cr_expect_str_eq(jstr(&r, "error.details.fields.0.code", buf, sizeof(buf)),
                                 c->reason, "case %zu: %s", i, r.body);
            }
        }
        bgt_resp_free(&r);
    }
    /* none of the refused ones made an account: the first body is still free to register */
    http(base(), "POST", "/auth/register", NULL, NULL,
         "{\"email\":\"a@example.com\",\"password\":\"" PASSWORD "\"}", &r);
    cr_assert_eq(r.status, 201, "%s", r.body);
    bgt_resp_free(&r);
    cr_assert(alive(&F.edges[0]), "bg-edge died; see %s", F.edges[0].log);
    stop_edges_cleanly();
}

Test(auth, content_type_and_body_size_limits)
{
    const char *ok = "{\"email\":\"ct@example.com\",\"password\":\"" PASSWORD "\"}";
    const char *text[] = {"Content-Type: text/plain", NULL};
    const char *form[] = {"Content-Type: application/x-www-form-urlencoded", NULL};
    const char *jsonp[] = {"Content-Type: application/jsonp", NULL};
    bgt_resp_t r;
    http(base(), "POST", "/auth/register", NULL, text, ok, &r);
    expect_error(&r, 415, "unsupported_media_type");
    bgt_resp_free(&r);
    http(base(), "POST", "/auth/login", NULL, form, ok, &r);
    expect_error(&r, 415, "unsupported_media_type");
    bgt_resp_free(&r);
    http(base(), "POST", "/auth/register", NULL, jsonp, ok, &r);
    expect_error(&r, 415, "unsupported_media_type");
    bgt_resp_free(&r);

    /* exactly 16 KiB is read (and refused for its oversized name); one byte more is not read */
    size_t cap = 16384;
    char *big = malloc(cap + 2);
    cr_assert_not_null(big);
    int head = snprintf(big, cap, "{\"email\":\"big@example.com\",\"password\":\"%s\",\"name\":\"",
                        PASSWORD);
    memset(big + head, 'x', cap - (size_t)head - 2);
    memcpy(big + cap - 2, "\"}", 3);
    cr_assert_eq(strlen(big), cap);
    http_n(base(), "POST", "/auth/register", NULL, NULL, big, cap, &r);
    expect_field(&r, "name", "too_long");
    bgt_resp_free(&r);
    memset(big + head, 'x', cap - (size_t)head - 1);
    memcpy(big + cap - 1, "\"}", 3);
    cr_assert_eq(strlen(big), cap + 1);
    http_n(base(), "POST", "/auth/register", NULL, NULL, big, cap + 1, &r);
    expect_error(&r, 413, "payload_too_large");
    bgt_resp_free(&r);
    free(big);

    /* a charset parameter is still JSON */
    const char *utf8[] = {"Content-Type: application/json; charset=utf-8", NULL};
    http(base(), "POST", "/auth/register", NULL, utf8, ok, &r);
    cr_assert_eq(r.status, 201, "%s", r.body);
    bgt_resp_free(&r);
    cr_assert(alive(&F.edges[0]), "bg-edge died; see %s", F.edges[0].log);
    stop_edges_cleanly();
}

Test(auth, validation_messages_follow_accept_language)
{
    const char *body = "{\"password\":\"" PASSWORD "\"}";
    const char *es[] = {"Accept-Language: es-ES,es;q=0.9,en;q=0.3", NULL};
    char en_msg[512], want[512], buf[512];
    bgt_resp_t r;
    http(base(), "POST", "/auth/register", NULL, NULL, body, &r);
    expect_field(&r, "email", "missing");
    catalog("en", "error.validation.missing", "email", want, sizeof(want));
    cr_assert_str_eq(jstr(&r, "error.message", en_msg, sizeof(en_msg)), want, "%s", r.body);
    bgt_resp_free(&r);
    http(base(), "POST", "/auth/register", NULL, es, body, &r);
    expect_field(&r, "email", "missing");
    catalog("es", "error.validation.missing", "email", want, sizeof(want));
    cr_assert_str_neq(want, en_msg);
    cr_assert_str_eq(jstr(&r, "error.message", buf, sizeof(buf)), want, "%s", r.body);
    cr_assert_str_eq(jstr(&r, "error.details.fields.0.message", buf, sizeof(buf)), want, "%s",
                     r.body);
    bgt_resp_free(&r);
    /* errors that are not about a field too */
    http(base(), "POST", "/auth/login", NULL, es, "{\"email\":", &r);
    expect_error(&r, 400, "malformed_json");
    catalog("es", "error.malformed_json", NULL, want, sizeof(want));
    cr_assert_str_eq(jstr(&r, "error.message", buf, sizeof(buf)), want, "%s", r.body);
    bgt_resp_free(&r);
    const char *ru[] = {"Accept-Language: ru", NULL};
    http(base(), "POST", "/auth/login", NULL, ru,
         "{\"email\":\"nobody@example.com\",\"password\":\"" PASSWORD "\"}", &r);
    expect_error(&r, 401, "invalid_credentials");
    catalog("ru", "error.invalid_credentials", NULL, want, sizeof(want));
    cr_assert_str_eq(jstr(&r, "error.message", buf, sizeof(buf)), want, "%s", r.body);
    bgt_resp_free(&r);
    /* an unsupported language falls back to English */
    const char *fr[] = {"Accept-Language: fr-FR,fr;q=0.9", NULL};
    http(base(), "POST", "/auth/register", NULL, fr, body, &r);
    expect_field(&r, "email", "missing");
    cr_assert_str_eq(jstr(&r, "error.message", buf, sizeof(buf)), en_msg, "%s", r.body);
    bgt_resp_free(&r);
    cr_assert(alive(&F.edges[0]), "bg-edge died; see %s", F.edges[0].log);
    stop_edges_cleanly();
}

Test(auth, other_routes_refuse_bad_input_too)
{
    session_t s;
    register_user(base(), "routes", &s);
    bgt_resp_t r;
    struct {
        const char *method, *path, *body;
        long status;
        const char *code, *field, *reason;
    } cases[] = {
        {"POST", "/auth/login", "{\"email\":\"a@example.com\"}", 422, "validation_failed",
         "password", "missing"},
        {"POST", "/auth/login", "{\"email\":\"a@example.com\",\"password\":1}", 422,
         "validation_failed", "password", "wrong_type"},
        {"POST", "/auth/login",
         "{\"email\":\"a@example.com\",\"password\":\"x\",\"remember\":true}", 422,
         "validation_failed", "remember", "unknown_field"},
        {"POST", "/auth/login", "{\"email\":\"a@example.com\",\"password\":\"x\",\"mode\":\"jwt\"}",
         422, "validation_failed", "mode", "invalid_value"},
        {"POST", "/auth/refresh", "{\"refresh_token\":42}", 422, "validation_failed",
         "refresh_token", "wrong_type"},
        {"PUT", "/auth/profile", "{\"name\":5}", 422, "validation_failed", "name", "wrong_type"},
        {"PUT", "/auth/profile", "{\"email\":\"x@example.com\"}", 422, "validation_failed", "email",
         "unknown_field"},
        {"PUT", "/auth/profile", "{\"name\":", 400, "malformed_json", NULL, NULL},
        {"PUT", "/auth/locale", "{}", 422, "validation_failed", "locale", "missing"},
        {"PUT", "/auth/locale", "{\"locale\":\"xx-YY\"}", 422, "validation_failed", "locale",
         "unsupported_locale"},
        {"POST", "/auth/api-keys", "{}", 422, "validation_failed", "name", "missing"},
        {"POST", "/auth/api-keys", "{\"name\":\"k\",\"scopes\":[\"admin\"]}", 422,
         "validation_failed", "scopes", "invalid_value"},
        {"POST", "/auth/api-keys", "{\"name\":\"k\",\"scopes\":\"chat\"}", 422, "validation_failed",
         "scopes", "wrong_type"},
    };
    char longname[256];
    memset(longname, 'n', 201);
    longname[201] = '\0';
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        http(base(), cases[i].method, cases[i].path, s.access, NULL, cases[i].body, &r);
        if (cases[i].field != NULL) {
            expect_field(&r, cases[i].field, cases[i].reason);
        } else {
            expect_error(&r, cases[i].status, cases[i].code);
        }
        bgt_resp_free(&r);
    }
    char body[512];
    snprintf(body, sizeof(body), "{\"name\":\"%s\"}", longname);
    http(base(), "PUT", "/auth/profile", s.access, NULL, body, &r);
    expect_field(&r, "name", "too_long");
    bgt_resp_free(&r);
    /* nothing of it changed the profile */
    http(base(), "GET", "/auth/profile", s.access, NULL, NULL, &r);
    char buf[256];
    cr_assert_str_eq(jstr(&r, "name", buf, sizeof(buf)), "routes", "%s", r.body);
    cr_assert_str_eq(jstr(&r, "locale", buf, sizeof(buf)), "en", "%s", r.body);
    bgt_resp_free(&r);
    cr_assert(alive(&F.edges[0]), "bg-edge died; see %s", F.edges[0].log);
    stop_edges_cleanly();
}

/* ---- 3. sign-in limits ---- */

/*
 * The pause of a person retyping a password. The edge counts a failure after it has answered
 * (see concurrent_wrong_passwords_cannot_exceed_the_failure_limit), so back-to-back attempts can
 * overtake their own count; these tests are about the lock, not that race.
 */
static void retype_pause(void)
{
    struct timespec ts = {0, 150 * 1000 * 1000};
    nanosleep(&ts, NULL);
}

/* The body of a response with its request id blanked, for comparing two error bodies. */
static void without_request_id(const char *body, char *out, size_t outlen)
{
    const char *rid = strstr(body, "\"request_id\":\"");
    if (rid == NULL) {
        snprintf(out, outlen, "%s", body);
        return;
    }
    const char *end = strchr(rid + 14, '"');
    snprintf(out, outlen, "%.*s\"request_id\":\"\"%s", (int)(rid - body), body,
             end != NULL ? end + 1 : "");
}

Test(auth, unknown_account_and_wrong_password_look_the_same_and_failures_lock_the_account)
{
    session_t s;
    register_user(base(), "locked", &s);
    char body[512], unknown[128], a[1024], b[1024];
    unique_email("nobody", unknown, sizeof(unknown));
    bgt_resp_t r1, r2, r;

    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"%s\"}", unknown, PASSWORD);
    http(base(), "POST", "/auth/login", NULL, NULL, body, &r1);
    expect_error(&r1, 401, "invalid_credentials");
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"wrong %s\"}", s.email, PASSWORD);
    http(base(), "POST", "/auth/login", NULL, NULL, body, &r2);
    expect_error(&r2, 401, "invalid_credentials");
    without_request_id(r1.body, a, sizeof(a));
    without_request_id(r2.body, b, sizeof(b));
    cr_assert_str_eq(a, b, "the answers tell the accounts apart");
    cr_assert(!jhas(&r1, "error.details") && !jhas(&r2, "error.details"), "%s", r2.body);
    char h1[64], h2[64];
    cr_assert_null(bgt_resp_header(&r1, "retry-after", h1, sizeof(h1)));
    cr_assert_null(bgt_resp_header(&r2, "retry-after", h2, sizeof(h2)));
    bgt_resp_free(&r1);
    bgt_resp_free(&r2);
    retype_pause();

    /* two more failures (three in all), the last in other letters: the same account */
    for (int i = 0; i < 2; i++) {
        char upper[128];
        snprintf(upper, sizeof(upper), "%s", s.email);
        if (i == 1)
            upper[0] = (char)(upper[0] - 'a' + 'A');
        snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"wrong %d\"}", upper, i);
        http(base(), "POST", "/auth/login", NULL, NULL, body, &r);
        expect_error(&r, 401, "invalid_credentials");
        bgt_resp_free(&r);
        retype_pause();
    }
    /* locked now, even with the right password */
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"%s\"}", s.email, PASSWORD);
    http(base(), "POST", "/auth/login", NULL, NULL, body, &r);
    expect_error(&r, 429, "rate_limited");
    char ra[32];
    cr_assert_not_null(bgt_resp_header(&r, "retry-after", ra, sizeof(ra)), "no Retry-After");
    long wait_s = strtol(ra, NULL, 10);
    cr_assert(wait_s > 0 && wait_s <= 901, "Retry-After: %s", ra);
    cr_assert(strstr(r.body, "access_token") == NULL, "%s", r.body);
    bgt_resp_free(&r);

    /* the lock is on that account, not on the address the attempts came from */
    session_t other;
    register_user(base(), "unlocked", &other);
    session_t again;
    login_as(base(), other.email, &again);
    /* and an access token issued before the lock still works */
    char buf[2048];
    cr_assert_eq(profile_status(base(), s.access, buf, sizeof(buf)), 200, "%s", buf);
    stop_edges_cleanly();
}

Test(auth, a_disabled_account_cannot_sign_in_and_its_tokens_die_on_every_edge)
{
    edge_t *other = start_edge(NULL);
    /* an operator makes an admin with bgctl; the admin disables a user through the API */
    char admin_email[128], db_env[600], out[4096];
    unique_email("admin", admin_email, sizeof(admin_email));
    snprintf(db_env, sizeof(db_env), "BG_DATABASE_URL=%s", F.db.url);
    const char *env[] = {db_env, "BG_ENV_FILE=/nonexistent", "BG_LOG_LEVEL=warn", NULL};
    const char *argv[] = {bgt_bin("bgctl"), "user",   "create",  "--email", admin_email,
                          "--password",     PASSWORD, "--admin", NULL};
    cr_assert_eq(bgt_run(argv, env, out, sizeof(out)), 0, "bgctl: %s", out);
    session_t admin, u, s;
    login_as(base(), admin_email, &admin);
    register_user(base(), "disabled", &u);
    login_as(base(), u.email, &s);
    cr_assert_eq(profile_status(other->base, s.access, out, sizeof(out)), 200, "%s", out);

    char path[128], buf[128], body[512];
    snprintf(path, sizeof(path), "/admin/users/%s", u.user_id);
    bgt_resp_t r;
    http(base(), "PUT", path, admin.access, NULL, "{\"status\":\"disabled\"}", &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert_str_eq(jstr(&r, "status", buf, sizeof(buf)), "disabled", "%s", r.body);
    bgt_resp_free(&r);

    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"%s\"}", u.email, PASSWORD);
    http(other->base, "POST", "/auth/login", NULL, NULL, body, &r);
    expect_error(&r, 403, "account_disabled");
    cr_assert(strstr(r.body, "access_token") == NULL, "%s", r.body);
    bgt_resp_free(&r);
    /* without the password nothing is told about the account */
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"not %s\"}", u.email, PASSWORD);
    http(other->base, "POST", "/auth/login", NULL, NULL, body, &r);
    expect_error(&r, 401, "invalid_credentials");
    bgt_resp_free(&r);
    /* the tokens it had are refused everywhere, its refresh tokens too */
    for (size_t i = 0; i < F.nedges; i++) {
        http(F.edges[i].base, "GET", "/auth/profile", s.access, NULL, NULL, &r);
        expect_401_reason(&r, "session_revoked");
        bgt_resp_free(&r);
    }
    snprintf(body, sizeof(body), "{\"refresh_token\":\"%s\"}", u.refresh);
    http(other->base, "POST", "/auth/refresh", NULL, NULL, body, &r);
    expect_error(&r, 401, "unauthorized");
    bgt_resp_free(&r);
    /* the admin was not affected */
    cr_assert_eq(profile_status(other->base, admin.access, out, sizeof(out)), 200, "%s", out);
    stop_edges_cleanly();
}

/*
 * Wrong passwords sent at once must not buy more guesses than sent one by one: the limit holds
 * however the attempts are timed. Each attempt runs in a child process on its own connection.
 */
Test(auth, concurrent_wrong_passwords_cannot_exceed_the_failure_limit)
{
    session_t s;
    register_user(base(), "burst", &s);
    enum { ATTEMPTS = 8, MAX_FAILURES = 3 };
    char url[128], body[512];
    snprintf(url, sizeof(url), "%s/auth/login", base());
    pid_t kids[ATTEMPTS];
    for (int i = 0; i < ATTEMPTS; i++) {
        snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"guess number %d\"}", s.email,
                 i);
        kids[i] = fork();
        cr_assert(kids[i] >= 0);
        if (kids[i] == 0) {
            const char *h[] = {"Content-Type: application/json", NULL};
            bgt_resp_t r;
            int rc = bgt_http(BGT_H2C, "POST", url, h, body, strlen(body), &r);
            _exit(rc != 0 ? 3 : r.status == 401 ? 0 : r.status == 429 ? 1 : 2);
        }
    }
    int judged = 0, limited = 0;
    for (int i = 0; i < ATTEMPTS; i++) {
        int st = bgt_wait(kids[i], 30000);
        cr_assert(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) <= 1,
                  "attempt %d: neither 401 nor 429 (child status %d)", i, st);
        judged += WEXITSTATUS(st) == 0;
        limited += WEXITSTATUS(st) == 1;
    }
    cr_expect(judged <= MAX_FAILURES,
              "%d of %d simultaneous wrong passwords were checked (401) and %d refused (429), "
              "though BG_LOGIN_FAILURES_MAX is %d",
              judged, ATTEMPTS, limited, MAX_FAILURES);
    /* and the account is locked afterwards */
    bgt_resp_t r;
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"%s\"}", s.email, PASSWORD);
    http(base(), "POST", "/auth/login", NULL, NULL, body, &r);
    expect_error(&r, 429, "rate_limited");
    bgt_resp_free(&r);
    stop_edges_cleanly();
}

Test(auth, a_success_resets_the_failure_count)
{
    session_t s, t;
    register_user(base(), "reset", &s);
    char body[512];
    bgt_resp_t r;
    for (int round = 0; round < 2; round++) {
        for (int i = 0; i < 2; i++) {
            snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"wrong-%d-%d\"}", s.email,
                     round, i);
            http(base(), "POST", "/auth/login", NULL, NULL, body, &r);
            expect_error(&r, 401, "invalid_credentials");
            bgt_resp_free(&r);
            retype_pause();
        }
        /* two failures of three allowed, then a success wipes the count */
        login_as(base(), s.email, &t);
        retype_pause();
    }
    stop_edges_cleanly();
}

Test(auth, too_many_attempts_from_one_address_are_refused)
{
    const char *strict[] = {"BG_LOGIN_IP_PER_MIN=3", NULL};
    edge_t *e = start_edge(strict);
    char body[512], email[128];
    bgt_resp_t r;
    for (int i = 0; i < 3; i++) {
        unique_email("ip", email, sizeof(email));
        snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"%s\"}", email, PASSWORD);
        http(e->base, "POST", "/auth/login", NULL, NULL, body, &r);
        expect_error(&r, 401, "invalid_credentials");
        bgt_resp_free(&r);
    }
    unique_email("ip", email, sizeof(email));
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"%s\"}", email, PASSWORD);
    http(e->base, "POST", "/auth/login", NULL, NULL, body, &r);
    expect_error(&r, 429, "rate_limited");
    char ra[32];
    cr_assert_not_null(bgt_resp_header(&r, "retry-after", ra, sizeof(ra)), "no Retry-After");
    long wait_s = strtol(ra, NULL, 10);
    cr_assert(wait_s > 0 && wait_s <= 61, "Retry-After: %s", ra);
    bgt_resp_free(&r);
    /* registration counts against the same budget */
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"%s\"}", email, PASSWORD);
    http(e->base, "POST", "/auth/register", NULL, NULL, body, &r);
    expect_error(&r, 429, "rate_limited");
    bgt_resp_free(&r);
    stop_edges_cleanly();
}

/* ---- 4. browser (cookie) mode ---- */

/* The Set-Cookie value of cookie name (the whole line after "set-cookie: "), or NULL. */
static const char *set_cookie(const bgt_resp_t *r, const char *name, char *out, size_t outlen)
{
    size_t nl = strlen(name);
    const char *line = r->headers;
    while (line != NULL && *line != '\0') {
        const char *end = strchr(line, '\n');
        size_t ll = end != NULL ? (size_t)(end - line) : strlen(line);
        if (ll > 11 && strncasecmp(line, "set-cookie:", 11) == 0) {
            const char *v = line + 11;
            while (*v == ' ')
                v++;
            size_t vl = (size_t)(line + ll - v);
            while (vl > 0 && (v[vl - 1] == '\r' || v[vl - 1] == ' '))
                vl--;
            if (vl > nl && strncmp(v, name, nl) == 0 && v[nl] == '=') {
                snprintf(out, outlen, "%.*s", (int)vl, v);
                return out;
            }
        }
        line = end != NULL ? end + 1 : NULL;
    }
    return NULL;
}

/* The value part of a Set-Cookie line ("name=value; ..."). */
static void cookie_value(const char *set_cookie_line, char *out, size_t outlen)
{
    const char *eq = strchr(set_cookie_line, '=');
    const char *semi = strchr(set_cookie_line, ';');
    if (eq == NULL) {
        out[0] = '\0';
        return;
    }
    size_t n = semi != NULL && semi > eq ? (size_t)(semi - eq - 1) : strlen(eq + 1);
    snprintf(out, outlen, "%.*s", (int)n, eq + 1);
}

static bool has_attr(const char *line, const char *attr)
{
    size_t al = strlen(attr);
    for (const char *p = strchr(line, ';'); p != NULL; p = strchr(p + 1, ';')) {
        const char *a = p + 1;
        while (*a == ' ')
            a++;
        if (strncasecmp(a, attr, al) == 0 && (a[al] == ';' || a[al] == '\0'))
            return true;
    }
    return false;
}

typedef struct st_cookies {
    char at[BG_JWT_MAX_TOKEN], rt[256], csrf[128];
} cookies_t;

/* Reads the three cookies of a cookie-mode session answer and checks their attributes. */
static void take_cookies(const bgt_resp_t *r, cookies_t *c)
{
    char line[BG_JWT_MAX_TOKEN + 256], buf[256];
    cr_assert_not_null(set_cookie(r, "bg_at", line, sizeof(line)), "no bg_at: %s", r->headers);
    cr_assert(has_attr(line, "HttpOnly") && has_attr(line, "Secure") && has_attr(line, "Path=/"),
              "bg_at: %s", line);
    cr_assert(has_attr(line, "SameSite=Lax") || has_attr(line, "SameSite=Strict"), "bg_at: %s",
              line);
    snprintf(buf, sizeof(buf), "Max-Age=%d", ACCESS_TTL);
    cr_assert(has_attr(line, buf), "bg_at lives as long as the token: %s", line);
    cookie_value(line, c->at, sizeof(c->at));

    cr_assert_not_null(set_cookie(r, "bg_rt", line, sizeof(line)), "no bg_rt: %s", r->headers);
    cr_assert(has_attr(line, "HttpOnly") && has_attr(line, "Secure") &&
                  has_attr(line, "Path=/auth") && has_attr(line, "SameSite=Strict"),
              "bg_rt: %s", line);
    cookie_value(line, c->rt, sizeof(c->rt));

    cr_assert_not_null(set_cookie(r, "bg_csrf", line, sizeof(line)), "no bg_csrf: %s", r->headers);
    cr_assert(!has_attr(line, "HttpOnly"), "scripts must read bg_csrf: %s", line);
    cr_assert(has_attr(line, "Secure") && has_attr(line, "Path=/"), "bg_csrf: %s", line);
    cookie_value(line, c->csrf, sizeof(c->csrf));

    cr_assert(c->at[0] != '\0' && c->rt[0] != '\0' && strlen(c->csrf) >= 16, "%s", r->headers);
    char tt[32], csrf[128];
    cr_assert_str_eq(jstr(r, "token_type", tt, sizeof(tt)), "cookie", "%s", r->body);
    cr_assert_str_eq(jstr(r, "csrf_token", csrf, sizeof(csrf)), c->csrf, "%s", r->body);
    /* the tokens live in HttpOnly cookies only, out of reach of scripts */
    cr_assert(!jhas(r, "access_token") && !jhas(r, "refresh_token"), "%s", r->body);
    cr_assert(strstr(r->body, c->at) == NULL && strstr(r->body, c->rt) == NULL, "%s", r->body);
}

Test(auth, cookie_mode_sets_safe_cookies_and_demands_csrf_for_changes)
{
    session_t s;
    register_user(base(), "browser", &s);
    char body[512], buf[512];
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"%s\",\"mode\":\"cookie\"}",
             s.email, PASSWORD);
    bgt_resp_t r;
    const char *origin[] = {"Origin: " ALLOWED_ORIGIN, NULL};
    http(base(), "POST", "/auth/login", NULL, origin, body, &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cookies_t c;
    take_cookies(&r, &c);
    cr_assert_str_eq(jstr(&r, "user.email", buf, sizeof(buf)), s.email, "%s", r.body);
    bgt_resp_free(&r);

    char only_at[BG_JWT_MAX_TOKEN + 32], all[BG_JWT_MAX_TOKEN + 512], csrf_h[160], bad_csrf[160];
    snprintf(only_at, sizeof(only_at), "Cookie: bg_at=%s", c.at);
    snprintf(all, sizeof(all), "Cookie: bg_at=%s; bg_rt=%s; bg_csrf=%s", c.at, c.rt, c.csrf);
    snprintf(csrf_h, sizeof(csrf_h), "X-CSRF-Token: %s", c.csrf);
    /* the right length, one character off */
    snprintf(bad_csrf, sizeof(bad_csrf), "X-CSRF-Token: %s", c.csrf);
    char *last = bad_csrf + strlen(bad_csrf) - 1;
    *last = *last == 'A' ? 'B' : 'A';

    /* reading needs the cookie only */
    const char *read_h[] = {only_at, NULL};
    http(base(), "GET", "/auth/profile", NULL, read_h, NULL, &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert_str_eq(jstr(&r, "email", buf, sizeof(buf)), s.email, "%s", r.body);
    bgt_resp_free(&r);

    const char *change = "{\"name\":\"Cookie Monster\"}";
    const char *no_token[] = {all, "Origin: " ALLOWED_ORIGIN, NULL};
    http(base(), "PUT", "/auth/profile", NULL, no_token, change, &r);
    expect_error(&r, 403, "csrf_failed");
    bgt_resp_free(&r);
    const char *wrong_token[] = {all, bad_csrf, "Origin: " ALLOWED_ORIGIN, NULL};
    http(base(), "PUT", "/auth/profile", NULL, wrong_token, change, &r);
    expect_error(&r, 403, "csrf_failed");
    bgt_resp_free(&r);
    const char *no_origin[] = {all, csrf_h, NULL};
    http(base(), "PUT", "/auth/profile", NULL, no_origin, change, &r);
    expect_error(&r, 403, "csrf_failed");
    bgt_resp_free(&r);
    const char *foreign[] = {all, csrf_h, "Origin: " FOREIGN_ORIGIN, NULL};
    http(base(), "PUT", "/auth/profile", NULL, foreign, change, &r);
    expect_error(&r, 403, "origin_not_allowed");
    bgt_resp_free(&r);
    /* none of that changed anything */
    http(base(), "GET", "/auth/profile", NULL, read_h, NULL, &r);
    cr_assert_str_eq(jstr(&r, "name", buf, sizeof(buf)), "browser", "%s", r.body);
    bgt_resp_free(&r);

    const char *good[] = {all, csrf_h, "Origin: " ALLOWED_ORIGIN, NULL};
    http(base(), "PUT", "/auth/profile", NULL, good, change, &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert_str_eq(jstr(&r, "name", buf, sizeof(buf)), "Cookie Monster", "%s", r.body);
    bgt_resp_free(&r);
    /* the page's own origin is allowed as well */
    char self[128];
    snprintf(self, sizeof(self), "Origin: %s", base());
    const char *same[] = {all, csrf_h, self, NULL};
    http(base(), "PUT", "/auth/profile", NULL, same, "{\"name\":\"Same Origin\"}", &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    bgt_resp_free(&r);

    /* refresh by cookie: CSRF first, then new cookies */
    char rt_cookie[512];
    snprintf(rt_cookie, sizeof(rt_cookie), "Cookie: bg_rt=%s; bg_csrf=%s", c.rt, c.csrf);
    const char *refresh_bad[] = {rt_cookie, "Origin: " ALLOWED_ORIGIN, NULL};
    http(base(), "POST", "/auth/refresh", NULL, refresh_bad, "{}", &r);
    expect_error(&r, 403, "csrf_failed");
    bgt_resp_free(&r);
    const char *refresh_good[] = {rt_cookie, csrf_h, "Origin: " ALLOWED_ORIGIN, NULL};
    http(base(), "POST", "/auth/refresh", NULL, refresh_good, "{}", &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cookies_t n;
    take_cookies(&r, &n);
    cr_assert_str_neq(n.rt, c.rt, "the refresh cookie was not rotated");
    bgt_resp_free(&r);
    snprintf(only_at, sizeof(only_at), "Cookie: bg_at=%s", n.at);
    http(base(), "GET", "/auth/profile", NULL, read_h, NULL, &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    bgt_resp_free(&r);

    /* sign-out by cookie: CSRF again, then every cookie is cleared */
    snprintf(all, sizeof(all), "Cookie: bg_at=%s; bg_rt=%s; bg_csrf=%s", n.at, n.rt, n.csrf);
    snprintf(csrf_h, sizeof(csrf_h), "X-CSRF-Token: %s", n.csrf);
    const char *logout_bad[] = {all, "Origin: " ALLOWED_ORIGIN, NULL};
    http(base(), "POST", "/auth/logout", NULL, logout_bad, "{}", &r);
    expect_error(&r, 403, "csrf_failed");
    bgt_resp_free(&r);
    http(base(), "GET", "/auth/profile", NULL, read_h, NULL, &r);
    cr_assert_eq(r.status, 200, "a refused sign-out signed out: %s", r.body);
    bgt_resp_free(&r);
    const char *logout_good[] = {all, csrf_h, "Origin: " ALLOWED_ORIGIN, NULL};
    http(base(), "POST", "/auth/logout", NULL, logout_good, "{}", &r);
    cr_assert_eq(r.status, 204, "%s", r.body);
    const char *names[] = {"bg_at", "bg_rt", "bg_csrf"};
    for (size_t i = 0; i < 3; i++) {
        char line[512], value[256];
        cr_assert_not_null(set_cookie(&r, names[i], line, sizeof(line)), "%s not cleared: %s",
                           names[i], r.headers);
        cr_assert(has_attr(line, "Max-Age=0"), "%s", line);
        cookie_value(line, value, sizeof(value));
        cr_assert_str_eq(value, "", "%s", line);
    }
    bgt_resp_free(&r);
    http(base(), "GET", "/auth/profile", NULL, read_h, NULL, &r);
    expect_401_reason(&r, "session_revoked");
    bgt_resp_free(&r);
    stop_edges_cleanly();
}

Test(auth, registration_in_cookie_mode_signs_the_browser_in)
{
    char email[128], body[512], buf[256];
    unique_email("cookiereg", email, sizeof(email));
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"%s\",\"mode\":\"cookie\"}",
             email, PASSWORD);
    const char *origin[] = {"Origin: " ALLOWED_ORIGIN, NULL};
    bgt_resp_t r;
    http(base(), "POST", "/auth/register", NULL, origin, body, &r);
    cr_assert_eq(r.status, 201, "%s", r.body);
    cookies_t c;
    take_cookies(&r, &c);
    cr_assert_str_eq(jstr(&r, "user.email", buf, sizeof(buf)), email, "%s", r.body);
    bgt_resp_free(&r);
    char cookie[BG_JWT_MAX_TOKEN + 32];
    snprintf(cookie, sizeof(cookie), "Cookie: bg_at=%s", c.at);
    const char *h[] = {cookie, NULL};
    http(base(), "GET", "/auth/profile", NULL, h, NULL, &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert_str_eq(jstr(&r, "email", buf, sizeof(buf)), email, "%s", r.body);
    bgt_resp_free(&r);
    /* a cookie that is not ours is no session */
    const char *junk[] = {"Cookie: bg_at=junk; bg_csrf=junk", NULL};
    http(base(), "GET", "/auth/profile", NULL, junk, NULL, &r);
    expect_error(&r, 401, "unauthorized");
    bgt_resp_free(&r);
    stop_edges_cleanly();
}

Test(auth, a_bearer_token_needs_no_csrf_token_but_a_foreign_origin_is_refused)
{
    session_t s;
    register_user(base(), "bearer", &s);
    bgt_resp_t r;
    http(base(), "PUT", "/auth/profile", s.access, NULL, "{\"name\":\"API Client\"}", &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    bgt_resp_free(&r);
    const char *foreign[] = {"Origin: " FOREIGN_ORIGIN, NULL};
    http(base(), "PUT", "/auth/profile", s.access, foreign, "{\"name\":\"Evil\"}", &r);
    expect_error(&r, 403, "origin_not_allowed");
    bgt_resp_free(&r);
    char body[512];
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"%s\"}", s.email, PASSWORD);
    http(base(), "POST", "/auth/login", NULL, foreign, body, &r);
    expect_error(&r, 403, "origin_not_allowed");
    bgt_resp_free(&r);
    const char *null_origin[] = {"Origin: null", NULL};
    http(base(), "POST", "/auth/login", NULL, null_origin, body, &r);
    expect_error(&r, 403, "origin_not_allowed");
    bgt_resp_free(&r);
    /* a foreign page may still read what is public: GET is not state-changing */
    http(base(), "GET", "/auth/profile", s.access, foreign, NULL, &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    char buf[128];
    cr_assert_str_eq(jstr(&r, "name", buf, sizeof(buf)), "API Client", "%s", r.body);
    cr_assert_null(bgt_resp_header(&r, "access-control-allow-origin", buf, sizeof(buf)),
                   "a foreign origin may not read the answer");
    bgt_resp_free(&r);
    stop_edges_cleanly();
}

/* ---- 5. CORS ---- */

static bool vary_has_origin(const bgt_resp_t *r)
{
    /* HTTP/2 may carry several vary headers; look at every one */
    for (const char *p = r->headers; p != NULL && *p != '\0';) {
        const char *end = strchr(p, '\n');
        size_t ll = end != NULL ? (size_t)(end - p) : strlen(p);
        if (ll > 5 && strncasecmp(p, "vary:", 5) == 0) {
            for (size_t i = 5; i + 6 <= ll; i++) {
                if (strncasecmp(p + i, "origin", 6) == 0)
                    return true;
            }
        }
        p = end != NULL ? end + 1 : NULL;
    }
    return false;
}

Test(auth, cors_answers_vary_by_origin_and_echo_only_allowed_origins)
{
    session_t s;
    register_user(base(), "cors", &s);
    const char *origins[] = {NULL,
                             ALLOWED_ORIGIN,
                             FOREIGN_ORIGIN,
                             "https://app.example.com.evil.net",
                             "https://app.example.com:8443",
                             "http://app.example.com"};
    struct {
        const char *method, *path;
        bool auth;
        const char *body;
        long allowed_status;
    } routes[] = {
        {"GET", "/healthz", false, NULL, 200},      {"GET", "/auth/profile", true, NULL, 200},
        {"GET", "/auth/profile", false, NULL, 401}, {"GET", "/no/such/route", false, NULL, 404},
        {"POST", "/auth/login", false, "{}", 422},
    };
    for (size_t o = 0; o < sizeof(origins) / sizeof(origins[0]); o++) {
        for (size_t i = 0; i < sizeof(routes) / sizeof(routes[0]); i++) {
            char oh[160];
            snprintf(oh, sizeof(oh), "Origin: %s", origins[o] != NULL ? origins[o] : "");
            const char *h[] = {origins[o] != NULL ? oh : NULL, NULL};
            bgt_resp_t r;
            http(base(), routes[i].method, routes[i].path, routes[i].auth ? s.access : NULL, h,
                 routes[i].body, &r);
            cr_assert(vary_has_origin(&r), "%s %s from %s: no Vary: Origin\n%s", routes[i].method,
                      routes[i].path, origins[o] != NULL ? origins[o] : "(none)", r.headers);
            char acao[256], acac[64];
            const char *got =
                bgt_resp_header(&r, "access-control-allow-origin", acao, sizeof(acao));
            if (o == 1) {
                cr_assert_eq(r.status, routes[i].allowed_status, "%s %s: %s", routes[i].method,
                             routes[i].path, r.body);
                cr_assert_not_null(got, "%s %s: no ACAO for an allowed origin\n%s",
                                   routes[i].method, routes[i].path, r.headers);
                cr_assert_str_eq(acao, ALLOWED_ORIGIN);
                cr_assert_str_eq(
                    bgt_resp_header(&r, "access-control-allow-credentials", acac, sizeof(acac)),
                    "true", "%s", r.headers);
            } else {
                cr_assert_null(got, "%s %s from %s got ACAO %s", routes[i].method, routes[i].path,
                               origins[o] != NULL ? origins[o] : "(none)", acao);
                cr_assert_null(
                    bgt_resp_header(&r, "access-control-allow-credentials", acac, sizeof(acac)),
                    "%s", r.headers);
            }
            bgt_resp_free(&r);
        }
    }
    stop_edges_cleanly();
}

Test(auth, preflight_is_204_for_an_allowed_origin_and_403_for_others)
{
    const char *allowed[] = {"Origin: " ALLOWED_ORIGIN, "Access-Control-Request-Method: PUT",
                             "Access-Control-Request-Headers: content-type, x-csrf-token", NULL};
    bgt_resp_t r;
    http(base(), "OPTIONS", "/auth/profile", NULL, allowed, NULL, &r);
    cr_assert_eq(r.status, 204, "%s\n%s", r.headers, r.body);
    char buf[512];
    cr_assert_str_eq(bgt_resp_header(&r, "access-control-allow-origin", buf, sizeof(buf)),
                     ALLOWED_ORIGIN, "%s", r.headers);
    cr_assert_str_eq(bgt_resp_header(&r, "access-control-allow-credentials", buf, sizeof(buf)),
                     "true", "%s", r.headers);
    cr_assert_not_null(bgt_resp_header(&r, "access-control-allow-methods", buf, sizeof(buf)), "%s",
                       r.headers);
    cr_assert(strstr(buf, "PUT") != NULL && strstr(buf, "POST") != NULL, "methods: %s", buf);
    cr_assert_not_null(bgt_resp_header(&r, "access-control-allow-headers", buf, sizeof(buf)), "%s",
                       r.headers);
    cr_assert(strcasestr(buf, "x-csrf-token") != NULL && strcasestr(buf, "content-type") != NULL &&
                  strcasestr(buf, "authorization") != NULL,
              "headers: %s", buf);
    cr_assert(vary_has_origin(&r), "%s", r.headers);
    bgt_resp_free(&r);

    const char *foreign[] = {"Origin: " FOREIGN_ORIGIN, "Access-Control-Request-Method: POST",
                             NULL};
    http(base(), "OPTIONS", "/auth/login", NULL, foreign, NULL, &r);
    expect_error(&r, 403, "origin_not_allowed");
    cr_assert_null(bgt_resp_header(&r, "access-control-allow-origin", buf, sizeof(buf)), "%s",
                   r.headers);
    cr_assert_null(bgt_resp_header(&r, "access-control-allow-methods", buf, sizeof(buf)), "%s",
                   r.headers);
    cr_assert(vary_has_origin(&r), "%s", r.headers);
    bgt_resp_free(&r);
    stop_edges_cleanly();
}

/* ---- 6. access tokens over HTTP ---- */

static void b64url(const void *bin, size_t len, char *out, size_t outlen)
{
    cr_assert(outlen >= sodium_base64_ENCODED_LEN(len, sodium_base64_VARIANT_URLSAFE_NO_PADDING));
    sodium_bin2base64(out, outlen, bin, len, sodium_base64_VARIANT_URLSAFE_NO_PADDING);
}

/* header.payload[.signature]: HS256 over the first two parts with secret, or an empty signature. */
static void forge(const char *header, const char *payload, const char *secret, char *out,
                  size_t outlen)
{
    char h[512], p[2048], sig[64] = "";
    b64url(header, strlen(header), h, sizeof(h));
    b64url(payload, strlen(payload), p, sizeof(p));
    int n = snprintf(out, outlen, "%s.%s", h, p);
    cr_assert(n > 0 && (size_t)n < outlen);
    if (secret != NULL) {
        unsigned char mac[crypto_auth_hmacsha256_BYTES];
        crypto_auth_hmacsha256_state st;
        crypto_auth_hmacsha256_init(&st, (const unsigned char *)secret, strlen(secret));
        crypto_auth_hmacsha256_update(&st, (const unsigned char *)out, (unsigned long long)n);
        crypto_auth_hmacsha256_final(&st, mac);
        b64url(mac, sizeof(mac), sig, sizeof(sig));
    }
    snprintf(out + n, outlen - (size_t)n, ".%s", sig);
}

/* The claims a real access token carries, for a user and session, with a few of them replaced. */
static void claims_json(char *out, size_t outlen, const char *sub, const char *sid, const char *aud,
                        const char *iss, const char *typ, long long iat, long long exp)
{
    snprintf(out, outlen,
             "{\"iss\":\"%s\",\"aud\":\"%s\",\"sub\":\"%s\",\"sid\":\"%s\",\"role\":\"user\","
             "\"typ\":\"%s\",\"jti\":\"forged-%lld\",\"iat\":%lld,\"nbf\":%lld,\"exp\":%lld}",
             iss, aud, sub, sid, typ, iat, iat, iat, exp);
}

/* Reads sub and sid from a real token's payload. */
static void token_subject(const char *token, char *sub, size_t sublen, char *sid, size_t sidlen)
{
    const char *dot1 = strchr(token, '.');
    cr_assert_not_null(dot1);
    const char *dot2 = strchr(dot1 + 1, '.');
    cr_assert_not_null(dot2);
    unsigned char json[2048];
    size_t n = 0;
    cr_assert_eq(sodium_base642bin(json, sizeof(json) - 1, dot1 + 1, (size_t)(dot2 - dot1 - 1),
                                   NULL, &n, NULL, sodium_base64_VARIANT_URLSAFE_NO_PADDING),
                 0);
    bgt_resp_t fake = {.body = (char *)json, .body_len = n};
    json[n] = '\0';
    jstr(&fake, "sub", sub, sublen);
    jstr(&fake, "sid", sid, sidlen);
    cr_assert(sub[0] != '\0' && sid[0] != '\0', "%s", (char *)json);
}

Test(auth, forged_tampered_expired_and_garbage_tokens_are_401)
{
    cr_assert_geq(sodium_init(), 0);
    session_t s;
    register_user(base(), "jwt", &s);
    char sub[64], sid[64], claims[1024], tok[BG_JWT_MAX_TOKEN + 16], buf[4096];
    token_subject(s.access, sub, sizeof(sub), sid, sizeof(sid));
    cr_assert_str_eq(sub, s.user_id);
    long long now = (long long)time(NULL);
    const char *hs256 = "{\"alg\":\"HS256\",\"kid\":\"k0\",\"typ\":\"JWT\"}";

    /* control: made by hand with every detail right, it is accepted; so each refusal below is
     * the refusal of the one thing changed */
    claims_json(claims, sizeof(claims), sub, sid, BG_JWT_AUDIENCE, BG_JWT_ISSUER, "access", now,
                now + 300);
    forge(hs256, claims, SECRET, tok, sizeof(tok));
    cr_assert_eq(profile_status(base(), tok, buf, sizeof(buf)), 200, "hand-made token: %s", buf);

    struct {
        const char *what, *header, *secret;
        const char *aud, *iss, *typ;
        long long iat, exp;
    } forged[] = {
        {"alg none", "{\"alg\":\"none\",\"typ\":\"JWT\"}", NULL, BG_JWT_AUDIENCE, BG_JWT_ISSUER,
         "access", now, now + 300},
        {"alg none with a kid", "{\"alg\":\"none\",\"kid\":\"k0\"}", NULL, BG_JWT_AUDIENCE,
         BG_JWT_ISSUER, "access", now, now + 300},
        {"alg none signed anyway", "{\"alg\":\"none\",\"kid\":\"k0\"}", SECRET, BG_JWT_AUDIENCE,
         BG_JWT_ISSUER, "access", now, now + 300},
        {"alg HS512", "{\"alg\":\"HS512\",\"kid\":\"k0\"}", SECRET, BG_JWT_AUDIENCE, BG_JWT_ISSUER,
         "access", now, now + 300},
        {"alg in lower case", "{\"alg\":\"hs256\",\"kid\":\"k0\"}", SECRET, BG_JWT_AUDIENCE,
         BG_JWT_ISSUER, "access", now, now + 300},
        {"another key", hs256, OTHER_SECRET, BG_JWT_AUDIENCE, BG_JWT_ISSUER, "access", now,
         now + 300},
        {"unknown kid", "{\"alg\":\"HS256\",\"kid\":\"k1\"}", SECRET, BG_JWT_AUDIENCE,
         BG_JWT_ISSUER, "access", now, now + 300},
        {"no kid", "{\"alg\":\"HS256\",\"typ\":\"JWT\"}", SECRET, BG_JWT_AUDIENCE, BG_JWT_ISSUER,
         "access", now, now + 300},
        {"wrong audience", hs256, SECRET, "someone-else", BG_JWT_ISSUER, "access", now, now + 300},
        {"wrong issuer", hs256, SECRET, BG_JWT_AUDIENCE, "evil-issuer", "access", now, now + 300},
        {"refresh type", hs256, SECRET, BG_JWT_AUDIENCE, BG_JWT_ISSUER, "refresh", now, now + 300},
        {"issued in the future", hs256, SECRET, BG_JWT_AUDIENCE, BG_JWT_ISSUER, "access",
         now + 3600, now + 7200},
    };
    for (size_t i = 0; i < sizeof(forged) / sizeof(forged[0]); i++) {
        claims_json(claims, sizeof(claims), sub, sid, forged[i].aud, forged[i].iss, forged[i].typ,
                    forged[i].iat, forged[i].exp);
        forge(forged[i].header, claims, forged[i].secret, tok, sizeof(tok));
        bgt_resp_t r;
        http(base(), "GET", "/auth/profile", tok, NULL, NULL, &r);
        cr_expect_eq(r.status, 401, "%s: %ld %s", forged[i].what, r.status, r.body);
        cr_expect(strstr(r.body, "\"code\":\"unauthorized\"") != NULL, "%s: %s", forged[i].what,
                  r.body);
        cr_expect(strstr(r.body, s.email) == NULL, "%s: %s", forged[i].what, r.body);
        bgt_resp_free(&r);
    }

    /* expired: by hand past the leeway, and by bg_jwt_sign with the edge's own key an hour ago */
    claims_json(claims, sizeof(claims), sub, sid, BG_JWT_AUDIENCE, BG_JWT_ISSUER, "access",
                now - 3600, now - 120);
    forge(hs256, claims, SECRET, tok, sizeof(tok));
    bgt_resp_t r;
    http(base(), "GET", "/auth/profile", tok, NULL, NULL, &r);
    expect_401_reason(&r, "token_expired");
    bgt_resp_free(&r);
    bg_jwt_ring_t *ring = NULL;
    char err[256];
    cr_assert_eq(bg_jwt_ring_new(NULL, SECRET, &ring, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(bg_jwt_sign(ring, sub, sid, "user", now - 3600, 60, tok, sizeof(tok)), 0);
    http(base(), "GET", "/auth/profile", tok, NULL, NULL, &r);
    expect_401_reason(&r, "token_expired");
    bgt_resp_free(&r);
    /* the same signer, now: accepted (the ring really is the edge's key) */
    cr_assert_eq(bg_jwt_sign(ring, sub, sid, "user", now, 60, tok, sizeof(tok)), 0);
    cr_assert_eq(profile_status(base(), tok, buf, sizeof(buf)), 200, "%s", buf);
    bg_jwt_ring_free(ring);

    /* a real token with its payload changed (role admin) or its signature bent */
    const char *dot1 = strchr(s.access, '.');
    const char *dot2 = strchr(dot1 + 1, '.');
    char p64[2048];
    claims_json(claims, sizeof(claims), sub, sid, BG_JWT_AUDIENCE, BG_JWT_ISSUER, "access", now,
                now + 300);
    char *role = strstr(claims, "\"role\":\"user\"");
    cr_assert_not_null(role);
    memcpy(role, "\"role\":\"root\"", 13);
    b64url(claims, strlen(claims), p64, sizeof(p64));
    snprintf(tok, sizeof(tok), "%.*s.%s%s", (int)(dot1 - s.access), s.access, p64, dot2);
    http(base(), "GET", "/auth/profile", tok, NULL, NULL, &r);
    expect_error(&r, 401, "unauthorized");
    bgt_resp_free(&r);
    snprintf(tok, sizeof(tok), "%s", s.access);
    size_t last = strlen(tok) - 2; /* not the final character, whose low bits are padding */
    tok[last] = tok[last] == 'A' ? 'B' : 'A';
    http(base(), "GET", "/auth/profile", tok, NULL, NULL, &r);
    expect_error(&r, 401, "unauthorized");
    bgt_resp_free(&r);

    /* garbage */
    char huge[BG_JWT_MAX_TOKEN + 200];
    memset(huge, 'a', sizeof(huge) - 1);
    huge[sizeof(huge) - 1] = '\0';
    huge[100] = '.';
    huge[200] = '.';
    const char *garbage[] = {"not-a-jwt", "a.b.c",   "..",         "eyJhbGciOiJIUzI1NiJ9..",
                             huge,        "a.b.c.d", "e30.e30.e30"};
    for (size_t i = 0; i < sizeof(garbage) / sizeof(garbage[0]); i++) {
        http(base(), "GET", "/auth/profile", garbage[i], NULL, NULL, &r);
        expect_error(&r, 401, "unauthorized");
        bgt_resp_free(&r);
    }
    char basic[BG_JWT_MAX_TOKEN + 32];
    snprintf(basic, sizeof(basic), "Authorization: Basic %s", s.access);
    const char *schemes[][2] = {{basic, NULL},
                                {"Authorization: Bearer", NULL},
                                {"Authorization: Bearer ", NULL},
                                {"Authorization: Token x", NULL}};
    for (size_t i = 0; i < sizeof(schemes) / sizeof(schemes[0]); i++) {
        http(base(), "GET", "/auth/profile", NULL, schemes[i], NULL, &r);
        expect_error(&r, 401, "unauthorized");
        bgt_resp_free(&r);
    }
    /* and the real one still works after all that */
    cr_assert_eq(profile_status(base(), s.access, buf, sizeof(buf)), 200, "%s", buf);
    cr_assert(alive(&F.edges[0]), "bg-edge died; see %s", F.edges[0].log);
    stop_edges_cleanly();
}

/* ---- 7. API keys ---- */

Test(auth, api_keys_are_shown_once_listed_without_secret_and_private_to_their_owner)
{
    session_t a, b;
    register_user(base(), "keyowner", &a);
    register_user(base(), "intruder", &b);
    char id[64], key[256], buf[256];
    bgt_resp_t r;
    http(base(), "POST", "/auth/api-keys", a.access, NULL,
         "{\"name\":\"ci runner\",\"scopes\":[\"chat\"]}", &r);
    cr_assert_eq(r.status, 201, "%s", r.body);
    jstr(&r, "id", id, sizeof(id));
    jstr(&r, "key", key, sizeof(key));
    cr_assert(id[0] != '\0' && strlen(key) >= 20, "%s", r.body);
    cr_assert_str_eq(jstr(&r, "name", buf, sizeof(buf)), "ci runner", "%s", r.body);
    cr_assert_str_eq(jstr(&r, "scopes.0", buf, sizeof(buf)), "chat", "%s", r.body);
    cr_assert(!jhas(&r, "scopes.1"), "%s", r.body);
    jstr(&r, "prefix", buf, sizeof(buf));
    cr_assert(buf[0] != '\0' && strncmp(key, buf, strlen(buf)) == 0,
              "the prefix is not the key's start: %s", r.body);
    cr_assert_str_eq(bgt_resp_header(&r, "cache-control", buf, sizeof(buf)), "no-store");
    bgt_resp_free(&r);
    char id2[64];
    http(base(), "POST", "/auth/api-keys", a.access, NULL, "{\"name\":\"default scopes\"}", &r);
    cr_assert_eq(r.status, 201, "%s", r.body);
    jstr(&r, "id", id2, sizeof(id2));
    cr_assert(jhas(&r, "scopes.0") && jhas(&r, "scopes.1"), "%s", r.body);
    bgt_resp_free(&r);

    http(base(), "GET", "/auth/api-keys", a.access, NULL, NULL, &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert(strstr(r.body, key) == NULL, "the list shows the key: %s", r.body);
    cr_assert(!jhas(&r, "data.0.key") && !jhas(&r, "data.1.key"), "%s", r.body);
    cr_assert(jhas(&r, "data.1") && !jhas(&r, "data.2"), "%s", r.body);
    cr_assert(strstr(r.body, id) != NULL && strstr(r.body, id2) != NULL, "%s", r.body);
    bgt_resp_free(&r);

    /* the other user sees none and can delete none */
    http(base(), "GET", "/auth/api-keys", b.access, NULL, NULL, &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert(!jhas(&r, "data.0") && strstr(r.body, id) == NULL, "%s", r.body);
    bgt_resp_free(&r);
    char path[128];
    snprintf(path, sizeof(path), "/auth/api-keys/%s", id);
    http(base(), "DELETE", path, b.access, NULL, NULL, &r);
    expect_error(&r, 404, "not_found");
    bgt_resp_free(&r);
    http(base(), "DELETE", "/auth/api-keys/not-a-uuid", a.access, NULL, NULL, &r);
    expect_error(&r, 404, "not_found");
    bgt_resp_free(&r);
    http(base(), "DELETE", path, NULL, NULL, NULL, &r);
    expect_error(&r, 401, "unauthorized");
    bgt_resp_free(&r);

    /* the owner's key survived all that; the owner deletes it, once */
    http(base(), "GET", "/auth/api-keys", a.access, NULL, NULL, &r);
    cr_assert(strstr(r.body, id) != NULL, "%s", r.body);
    bgt_resp_free(&r);
    http(base(), "DELETE", path, a.access, NULL, NULL, &r);
    cr_assert_eq(r.status, 204, "%s", r.body);
    bgt_resp_free(&r);
    http(base(), "GET", "/auth/api-keys", a.access, NULL, NULL, &r);
    cr_assert(strstr(r.body, id) == NULL && strstr(r.body, id2) != NULL, "%s", r.body);
    bgt_resp_free(&r);
    http(base(), "DELETE", path, a.access, NULL, NULL, &r);
    expect_error(&r, 404, "not_found");
    bgt_resp_free(&r);
    stop_edges_cleanly();
}
