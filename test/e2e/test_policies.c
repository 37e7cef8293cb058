/*
 * /admin/policies end to end: two bg-edge processes on one Redis and one migrated database. CRUD
 * with the policy engine's validation (422 naming the field), audit rows read back through libpq,
 * non-admins refused, and propagation: a rule created through one edge holds for the user on the
 * other edge within 5 seconds, and its deletion is undone as fast.
 */
#include <criterion/criterion.h>
#include <libpq-fe.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bg/common.h"
#include "bg/json.h"
#include "bgtest.h"

#define PASSWORD "Policies-Horse-Battery-42"

static struct {
    bgt_redis_t redis;
    bgt_pg_t db;
    char dir[256], log[2][300], bases[2][64];
    int ports[2];
    pid_t pids[2];
    const char *base; /* the edge call() speaks to */
} S;

static pid_t start_edge(int i)
{
    static char env_store[2][3][600];
    snprintf(env_store[i][0], 600, "BG_HTTP_PORT=%d", S.ports[i]);
    snprintf(env_store[i][1], 600, "BG_REDIS_URL=%s", S.redis.url);
    snprintf(env_store[i][2], 600, "BG_DATABASE_URL=%s", S.db.url);
    const char *env[] = {env_store[i][0],
                         env_store[i][1],
                         env_store[i][2],
                         "BG_HTTPS_PORT=0",
                         "BG_ENV_FILE=/nonexistent",
                         "BG_EDGE_THREADS=2",
                         "BG_LOG_FORMAT=text",
                         "BG_LOG_LEVEL=info",
                         "BG_JWT_SECRET=0123456789abcdef0123456789abcdef-policies",
                         NULL};
    const char *argv[] = {bgt_bin("bg-edge"), NULL};
    return bgt_spawn(argv, env, S.log[i]);
}

static void setup(void)
{
    memset(&S, 0, sizeof(S));
    cr_assert_eq(bgt_pg_create(&S.db, true), 0);
    cr_assert_eq(bgt_redis_start(&S.redis), 0);
    cr_assert_eq(bgt_tempdir(S.dir, sizeof(S.dir)), 0);
    for (int i = 0; i < 2; i++) {
        snprintf(S.log[i], sizeof(S.log[i]), "%s/edge%d.log", S.dir, i);
        S.ports[i] = bgt_free_port();
        snprintf(S.bases[i], sizeof(S.bases[i]), "http://127.0.0.1:%d", S.ports[i]);
        S.pids[i] = start_edge(i);
        cr_assert(S.pids[i] > 0);
        char url[128];
        snprintf(url, sizeof(url), "%s/healthz", S.bases[i]);
        cr_assert_eq(bgt_wait_http(url, 200, 10000), 0, "bg-edge %d did not come up; see %s", i,
                     S.log[i]);
    }
    S.base = S.bases[0];
}

static void teardown(void)
{
    for (int i = 0; i < 2; i++)
        if (S.pids[i] > 0)
            bgt_stop(S.pids[i], SIGKILL, 2000);
    bgt_redis_stop(&S.redis);
    bgt_pg_drop(&S.db);
    bgt_rmtree(S.dir);
}

TestSuite(policies, .init = setup, .fini = teardown, .timeout = 120);

static long call(const char *method, const char *path, const char *token, const char *body,
                 bgt_resp_t *r)
{
    char url[512], authz[2100];
    const char *headers[3];
    size_t n = 0;
    snprintf(url, sizeof(url), "%s%s", S.base, path);
    if (token != NULL) {
        snprintf(authz, sizeof(authz), "Authorization: Bearer %s", token);
        headers[n++] = authz;
    }
    if (body != NULL)
        headers[n++] = "Content-Type: application/json";
    headers[n] = NULL;
    cr_assert_eq(bgt_http(BGT_H2C, method, url, headers, body, body != NULL ? strlen(body) : 0, r),
                 0, "%s %s: %s", method, path, r->error);
    return r->status;
}

/* The value at path (keys) of a JSON text, or NULL (doc owned by the caller). */
static const bg_json_t *json_at(const char *text, bg_json_doc_t **doc, const char *const path[])
{
    const char *desc;
    size_t off;
    *doc = NULL;
    if (bg_json_parse(text, strlen(text), NULL, doc, &desc, &off) != 0)
        return NULL;
    const bg_json_t *v = bg_json_root(*doc);
    for (size_t i = 0; path[i] != NULL && v != NULL; i++)
        v = bg_json_find(v, path[i]);
    return v;
}

static void get_str(const char *text, const char *const path[], char *out, size_t outlen)
{
    bg_json_doc_t *doc;
    const bg_json_t *v = json_at(text, &doc, path);
    size_t len = 0;
    const char *s = v != NULL ? bg_json_str(v, &len) : NULL;
    cr_assert(s != NULL && len < outlen, "no string %s in %s", path[0], text);
    memcpy(out, s, len);
    out[len] = '\0';
    bg_json_doc_free(doc);
}

static int64_t get_int(const char *text, const char *const path[])
{
    bg_json_doc_t *doc;
    const bg_json_t *v = json_at(text, &doc, path);
    int64_t n = 0;
    cr_assert(v != NULL && bg_json_int(v, &n), "no integer %s in %s", path[0], text);
    bg_json_doc_free(doc);
    return n;
}

/* Registers email; fills token and id. */
static void register_user(const char *email, char *token, size_t tokenlen, char *id, size_t idlen)
{
    char body[512];
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"" PASSWORD "\"}", email);
    bgt_resp_t r;
    long st = call("POST", "/auth/register", NULL, body, &r);
    cr_assert_eq(st, 201, "register: %ld %s", st, r.body);
    get_str(r.body, (const char *const[]){"access_token", NULL}, token, tokenlen);
    get_str(r.body, (const char *const[]){"user", "id", NULL}, id, idlen);
    bgt_resp_free(&r);
}

/* Makes a platform admin with bgctl and signs in; fills token. */
static void make_admin(const char *email, char *token, size_t tokenlen)
{
    char env_url[600], out[4096];
    snprintf(env_url, sizeof(env_url), "BG_DATABASE_URL=%s", S.db.url);
    const char *env[] = {env_url, "BG_LOG_LEVEL=warn", "BG_ENV_FILE=/nonexistent", NULL};
    const char *argv[] = {bgt_bin("bgctl"), "user",   "create", "--admin", "--email", email,
                          "--password",     PASSWORD, NULL};
    cr_assert_eq(bgt_run(argv, env, out, sizeof(out)), 0, "bgctl user create --admin: %s", out);
    char body[512];
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"" PASSWORD "\"}", email);
    bgt_resp_t r;
    long st = call("POST", "/auth/login", NULL, body, &r);
    cr_assert_eq(st, 200, "admin login: %ld %s", st, r.body);
    get_str(r.body, (const char *const[]){"access_token", NULL}, token, tokenlen);
    bgt_resp_free(&r);
}

/* Expects 422 validation_failed naming field. */
static void expect_invalid(const char *method, const char *path, const char *token,
                           const char *body, const char *field)
{
    bgt_resp_t r;
    long st = call(method, path, token, body, &r);
    cr_expect_eq(st, 422, "%s: %ld %s", body, st, r.body);
    char got[128] = "";
    bg_json_doc_t *doc;
    const bg_json_t *fields =
        json_at(r.body, &doc, (const char *const[]){"error", "details", "fields", NULL});
    const bg_json_t *f0 = fields != NULL ? bg_json_at(fields, 0) : NULL;
    const bg_json_t *name = f0 != NULL ? bg_json_find(f0, "field") : NULL;
    size_t len = 0;
    const char *s = name != NULL ? bg_json_str(name, &len) : NULL;
    if (s != NULL && len < sizeof(got)) {
        memcpy(got, s, len);
        got[len] = '\0';
    }
    bg_json_doc_free(doc);
    cr_expect_str_eq(got, field, "%s: %s", body, r.body);
    bgt_resp_free(&r);
}

/* Counts audit rows with action about target id. */
static long audit_rows(const char *action, const char *target)
{
    PGconn *c = PQconnectdb(S.db.url);
    cr_assert_eq(PQstatus(c), CONNECTION_OK, "%s", PQerrorMessage(c));
    const char *p[] = {action, target};
    PGresult *res = PQexecParams(c,
                                 "SELECT count(*) FROM audit_log WHERE action = $1 AND "
                                 "target_type = 'policy_rule' AND target_id = $2 AND "
                                 "actor_kind = 'admin'",
                                 2, NULL, p, NULL, NULL, 0);
    cr_assert_eq(PQresultStatus(res), PGRES_TUPLES_OK, "%s", PQerrorMessage(c));
    long n = strtol(PQgetvalue(res, 0, 0), NULL, 10);
    PQclear(res);
    PQfinish(c);
    return n;
}

Test(policies, crud_validates_audits_and_refuses_non_admins)
{
    char admin[2048], user[2048], uid[64];
    make_admin("admin@policies.example", admin, sizeof(admin));
    register_user("plain@policies.example", user, sizeof(user), uid, sizeof(uid));

    /* validation names the field */
    expect_invalid("POST", "/admin/policies", admin,
                   "{\"type\":\"rate_limit\",\"scope\":\"global\",\"body\":{\"rpm\":10,\"burst\":1,"
                   "\"nope\":1}}",
                   "body.nope");
    expect_invalid(
        "POST", "/admin/policies", admin,
        "{\"type\":\"rate_limit\",\"scope\":\"global\",\"body\":{\"rpm\":0,\"burst\":1}}",
        "body.rpm");
    expect_invalid("POST", "/admin/policies", admin,
                   "{\"type\":\"quota\",\"scope\":\"user\",\"scope_id\":\"not-a-uuid\","
                   "\"body\":{\"requests\":5}}",
                   "scope_id");
    expect_invalid("POST", "/admin/policies", admin,
                   "{\"type\":\"quota\",\"scope\":\"user\",\"scope_id\":"
                   "\"00000000-0000-4000-8000-000000000000\",\"body\":{\"requests\":5}}",
                   "scope_id");
    expect_invalid("POST", "/admin/policies", admin,
                   "{\"type\":\"quota\",\"scope\":\"plan\",\"scope_id\":\"platinum\","
                   "\"body\":{\"requests\":5}}",
                   "scope_id");
    expect_invalid("POST", "/admin/policies", admin,
                   "{\"type\":\"quota\",\"scope\":\"global\",\"body\":{\"requests\":5},\"x\":1}",
                   "x");

    /* non-admins are refused */
    bgt_resp_t r;
    const char *good = "{\"type\":\"rate_limit\",\"scope\":\"plan\",\"scope_id\":\"trial\","
                       "\"name\":\"trial rpm\",\"body\":{\"rpm\":12,\"burst\":3},\"priority\":5}";
    long st = call("POST", "/admin/policies", user, good, &r);
    cr_expect_eq(st, 403, "%ld %s", st, r.body);
    bgt_resp_free(&r);
    st = call("GET", "/admin/policies", user, NULL, &r);
    cr_expect_eq(st, 403, "%ld %s", st, r.body);
    bgt_resp_free(&r);

    /* create, read, list, update, delete */
    st = call("POST", "/admin/policies", admin, good, &r);
    cr_assert_eq(st, 201, "%ld %s", st, r.body);
    char id[64];
    get_str(r.body, (const char *const[]){"id", NULL}, id, sizeof(id));
    cr_expect(strstr(r.body, "\"body\":{\"rpm\":12,\"burst\":3}") != NULL, "%s", r.body);
    cr_expect(get_int(r.body, (const char *const[]){"recompiled", NULL}) >= 1, "%s", r.body);
    bgt_resp_free(&r);

    char path[160];
    snprintf(path, sizeof(path), "/admin/policies/%s", id);
    st = call("GET", path, admin, NULL, &r);
    cr_expect_eq(st, 200, "%ld %s", st, r.body);
    cr_expect(strstr(r.body, "\"scope_id\":\"trial\"") != NULL, "%s", r.body);
    bgt_resp_free(&r);
    st = call("GET", "/admin/policies?type=rate_limit&scope=plan", admin, NULL, &r);
    cr_expect_eq(st, 200, "%ld %s", st, r.body);
    cr_expect(strstr(r.body, id) != NULL, "%s", r.body);
    bgt_resp_free(&r);
    st = call("GET", "/admin/policies?type=quota", admin, NULL, &r);
    cr_expect_eq(st, 200, "%ld %s", st, r.body);
    cr_expect(strstr(r.body, id) == NULL, "filter ignored: %s", r.body);
    bgt_resp_free(&r);
    st = call("GET", "/admin/policies?scope=galaxy", admin, NULL, &r);
    cr_expect_eq(st, 422, "%ld %s", st, r.body);
    bgt_resp_free(&r);

    /* the trial user sees the new rpm at once */
    st = call("GET", "/billing/account", user, NULL, &r);
    cr_expect(strstr(r.body, "\"rpm\":12") != NULL, "%s", r.body);
    bgt_resp_free(&r);

    expect_invalid("PUT", path, admin,
                   "{\"type\":\"rate_limit\",\"scope\":\"plan\",\"scope_id\":\"trial\","
                   "\"body\":{\"rpm\":0,\"burst\":3}}",
                   "body.rpm");
    st = call("PUT", path, admin,
              "{\"type\":\"rate_limit\",\"scope\":\"plan\",\"scope_id\":\"trial\","
              "\"body\":{\"rpm\":15,\"burst\":3},\"enabled\":true}",
              &r);
    cr_expect_eq(st, 200, "%ld %s", st, r.body);
    bgt_resp_free(&r);
    st = call("GET", "/billing/account", user, NULL, &r);
    cr_expect(strstr(r.body, "\"rpm\":15") != NULL, "%s", r.body);
    bgt_resp_free(&r);

    st = call("DELETE", path, user, NULL, &r);
    cr_expect_eq(st, 403, "%ld %s", st, r.body);
    bgt_resp_free(&r);
    st = call("DELETE", path, admin, NULL, &r);
    cr_expect_eq(st, 204, "%ld %s", st, r.body);
    bgt_resp_free(&r);
    st = call("GET", path, admin, NULL, &r);
    cr_expect_eq(st, 404, "%ld %s", st, r.body);
    bgt_resp_free(&r);
    st = call("DELETE", path, admin, NULL, &r);
    cr_expect_eq(st, 404, "%ld %s", st, r.body);
    bgt_resp_free(&r);
    st = call("GET", "/billing/account", user, NULL, &r);
    cr_expect(strstr(r.body, "\"rpm\":10") != NULL, "back to the trial default: %s", r.body);
    bgt_resp_free(&r);

    cr_expect_eq(audit_rows("policy.create", id), 1);
    cr_expect_eq(audit_rows("policy.update", id), 1);
    cr_expect_eq(audit_rows("policy.delete", id), 1);
}

/* Polls GET /billing/account of token on the second edge until quota.limit is want (5 s). */
static void expect_limit_soon(const char *token, int64_t want)
{
    int64_t got = -1;
    long long t0 = bgt_now_ms();
    S.base = S.bases[1];
    while (bgt_now_ms() - t0 < 5000) {
        bgt_resp_t r;
        long st = call("GET", "/billing/account", token, NULL, &r);
        cr_assert_eq(st, 200, "%ld %s", st, r.body);
        got = get_int(r.body, (const char *const[]){"quota", "limit", NULL});
        bgt_resp_free(&r);
        if (got == want)
            break;
        usleep(100 * 1000);
    }
    S.base = S.bases[0];
    cr_expect_eq(got, want, "the second edge shows limit %lld, expected %lld within 5 s",
                 (long long)got, (long long)want);
}

Test(policies, a_change_holds_on_another_edge_within_five_seconds)
{
    char admin[2048], user[2048], uid[64];
    make_admin("admin2@policies.example", admin, sizeof(admin));
    register_user("quota@policies.example", user, sizeof(user), uid, sizeof(uid));
    expect_limit_soon(user, 50);

    char body[512];
    snprintf(
        body, sizeof(body),
        "{\"type\":\"quota\",\"scope\":\"user\",\"scope_id\":\"%s\",\"body\":{\"requests\":7}}",
        uid);
    bgt_resp_t r;
    long st = call("POST", "/admin/policies", admin, body, &r);
    cr_assert_eq(st, 201, "%ld %s", st, r.body);
    char id[64];
    get_str(r.body, (const char *const[]){"id", NULL}, id, sizeof(id));
    cr_expect_eq(get_int(r.body, (const char *const[]){"recompiled", NULL}), 1, "%s", r.body);
    bgt_resp_free(&r);
    expect_limit_soon(user, 7);

    char path[160];
    snprintf(path, sizeof(path), "/admin/policies/%s", id);
    st = call("DELETE", path, admin, NULL, &r);
    cr_assert_eq(st, 204, "%ld %s", st, r.body);
    bgt_resp_free(&r);
    expect_limit_soon(user, 50);
}
