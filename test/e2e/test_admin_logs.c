/*
 * GET /admin/logs end to end: the real bg-edge over HTTP/2 (h2c) against a private Redis and a
 * migrated database.
 *
 * The audit kind shows what admins and users really did through the API in the test (a policy
 * created through /admin/policies, a user disabled through /admin/users, a registration), newest
 * first, with the acting admin's e-mail and the request id the action's answer carried; its filters
 * (action, action prefix, actor, target, time) narrow exactly; pages of a few rows cover every row
 * once, even while new rows arrive between pages. Bad filters are 422 naming the parameter (one
 * in Russian), non-admins 403 and nobody 401.
 *
 * The requests kind (suite admin_logs_requests) runs the whole chat stack: a bg-worker with the
 * llm and usage roles and the demo provider (bg-demo-llm). A user's chat turn, sent through
 * POST /chat/conversations/{id}/messages, shows up as the usage worker recorded it.
 */
#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

#include "bg/common.h"
#include "bg/json.h"
#include "bgtest.h"

#define PASSWORD "Logs-Horse-Battery-42"
#define SHARDS 4
#define MAX_ROWS 200

static struct {
    bgt_redis_t redis;
    bgt_pg_t db;
    bool have_db;
    char dir[256], base[64], demo[128];
    pid_t edge, worker, demo_pid;
} S;

static pid_t spawn_logged(const char *const argv[], const char *const env[], const char *name)
{
    char log[400];
    snprintf(log, sizeof(log), "%s/%s.log", S.dir, name);
    pid_t pid = bgt_spawn(argv, env, log);
    cr_assert_gt(pid, 0, "%s did not start", name);
    return pid;
}

/* The settings every binary of the stack shares. */
static int common_env(char vars[][600])
{
    int n = 0;
    snprintf(vars[n++], 600, "BG_REDIS_URL=%s", S.redis.url);
    snprintf(vars[n++], 600, "BG_DATABASE_URL=%s", S.db.url);
    snprintf(vars[n++], 600, "BG_SHARDS=%d", SHARDS);
    snprintf(vars[n++], 600, "BG_ENV_FILE=/nonexistent");
    snprintf(vars[n++], 600, "BG_LOG_FORMAT=text");
    snprintf(vars[n++], 600, "BG_LOG_LEVEL=info");
    snprintf(vars[n++], 600, "BG_JWT_SECRET=0123456789abcdef0123456789abcdef-admin-logs");
    return n;
}

static void start_edge(void)
{
    char vars[16][600];
    const char *env[17];
    int n = common_env(vars);
    int port = bgt_free_port();
    snprintf(vars[n++], 600, "BG_HTTP_PORT=%d", port);
    snprintf(vars[n++], 600, "BG_HTTPS_PORT=0");
    snprintf(vars[n++], 600, "BG_EDGE_THREADS=2");
    for (int i = 0; i < n; i++)
        env[i] = vars[i];
    env[n] = NULL;
    const char *argv[] = {bgt_bin("bg-edge"), NULL};
    S.edge = spawn_logged(argv, env, "edge");
    snprintf(S.base, sizeof(S.base), "http://127.0.0.1:%d", port);
    char url[128];
    snprintf(url, sizeof(url), "%s/healthz", S.base);
    cr_assert_eq(bgt_wait_http(url, 200, 10000), 0, "bg-edge did not come up; see %s", S.dir);
}

static void setup(void)
{
    memset(&S, 0, sizeof(S));
    signal(SIGPIPE, SIG_IGN);
    cr_assert_eq(bgt_pg_create(&S.db, true), 0);
    S.have_db = true;
    cr_assert_eq(bgt_redis_start(&S.redis), 0);
    cr_assert_eq(bgt_tempdir(S.dir, sizeof(S.dir)), 0);
    start_edge();
}

/* The edge plus the demo provider and a worker running the llm and usage roles. */
static void setup_stack(void)
{
    setup();
    int dport = bgt_free_port();
    char dports[16], url[200];
    snprintf(dports, sizeof(dports), "%d", dport);
    const char *dargv[] = {bgt_bin("bg-demo-llm"), "--port", dports,
                           "--tokens-per-second",  "400",    NULL};
    S.demo_pid = spawn_logged(dargv, NULL, "demo");
    snprintf(S.demo, sizeof(S.demo), "http://127.0.0.1:%d/v1", dport);
    snprintf(url, sizeof(url), "%s/models", S.demo);
    cr_assert_eq(bgt_wait_http(url, 200, 10000), 0, "bg-demo-llm does not answer");

    char vars[16][600];
    const char *env[17];
    int n = common_env(vars);
    int wport = bgt_free_port();
    snprintf(vars[n++], 600, "BG_LLM_BASE_URL=%s", S.demo);
    snprintf(vars[n++], 600, "BG_LLM_MODEL=demo-1");
    snprintf(vars[n++], 600, "BG_WORKER_PORT=%d", wport);
    snprintf(vars[n++], 600, "BG_SHUTDOWN_GRACE_MS=3000");
    for (int i = 0; i < n; i++)
        env[i] = vars[i];
    env[n] = NULL;
    const char *wargv[] = {bgt_bin("bg-worker"), "--roles", "llm,usage", NULL};
    S.worker = spawn_logged(wargv, env, "worker");
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/healthz", wport);
    cr_assert_eq(bgt_wait_http(url, 200, 15000), 0, "bg-worker did not come up; see %s", S.dir);
}

static void teardown(void)
{
    /* the service ends cleanly: a crash or a sanitizer report at exit fails the test */
    pid_t ours[] = {S.worker, S.edge};
    const char *names[] = {"bg-worker", "bg-edge"};
    for (size_t i = 0; i < BG_ARRAY_SIZE(ours); i++) {
        if (ours[i] <= 0)
            continue;
        int st = bgt_stop(ours[i], SIGTERM, 15000);
        cr_expect(WIFEXITED(st) && WEXITSTATUS(st) == 0, "%s ended with status %d; see %s",
                  names[i], st, S.dir);
    }
    if (S.demo_pid > 0)
        bgt_stop(S.demo_pid, SIGKILL, 3000);
    bgt_redis_stop(&S.redis);
    if (S.have_db)
        bgt_pg_drop(&S.db);
    if (getenv("BGT_KEEP_LOGS") == NULL)
        bgt_rmtree(S.dir);
    else
        fprintf(stderr, "logs kept in %s\n", S.dir);
}

TestSuite(admin_logs, .init = setup, .fini = teardown, .timeout = 120);
TestSuite(admin_logs_requests, .init = setup_stack, .fini = teardown, .timeout = 180);

/* ---- HTTP and JSON ---- */

/* One h2c request with the token (may be NULL), the JSON body (may be NULL) and an extra header
 * (may be NULL). */
static long call_h(const char *method, const char *path, const char *token, const char *body,
                   const char *header, bgt_resp_t *r)
{
    char url[2048], authz[2100];
    const char *headers[4];
    size_t n = 0;
    snprintf(url, sizeof(url), "%s%s", S.base, path);
    if (token != NULL) {
        snprintf(authz, sizeof(authz), "Authorization: Bearer %s", token);
        headers[n++] = authz;
    }
    if (body != NULL)
        headers[n++] = "Content-Type: application/json";
    if (header != NULL)
        headers[n++] = header;
    headers[n] = NULL;
    cr_assert_eq(bgt_http(BGT_H2C, method, url, headers, body, body != NULL ? strlen(body) : 0, r),
                 0, "%s %s: %s", method, path, r->error);
    return r->status;
}

/* call_h() expecting want; returns the body (owned). */
static char *expect(const char *method, const char *path, const char *token, const char *body,
                    long want)
{
    bgt_resp_t r;
    long got = call_h(method, path, token, body, NULL, &r);
    cr_assert_eq(got, want, "%s %s: %ld (expected %ld): %s", method, path, got, want, r.body);
    char *text = strdup(r.body != NULL ? r.body : "");
    bgt_resp_free(&r);
    cr_assert_not_null(text);
    return text;
}

static const bg_json_t *parse(const char *text, bg_json_doc_t **doc)
{
    const char *desc;
    size_t off;
    *doc = NULL;
    cr_assert_eq(bg_json_parse(text, strlen(text), NULL, doc, &desc, &off), 0, "not JSON: %s",
                 text);
    return bg_json_root(*doc);
}

/* Copies string member key of v into out ("" when null or absent). */
static void str_of(const bg_json_t *v, const char *key, char *out, size_t outlen)
{
    size_t len = 0;
    const char *s = bg_json_str(bg_json_find(v, key), &len);
    out[0] = '\0';
    if (s == NULL)
        return;
    cr_assert_lt(len, outlen, "%s too long", key);
    memcpy(out, s, len);
    out[len] = '\0';
}

static int64_t int_of(const bg_json_t *v, const char *key)
{
    int64_t n = -1;
    cr_assert(bg_json_int(bg_json_find(v, key), &n), "no integer %s", key);
    return n;
}

/* A signed-in account. */
typedef struct st_account {
    char id[64], email[128], token[2048];
} account_t;

static void take_session(account_t *a, const char *text)
{
    bg_json_doc_t *doc;
    const bg_json_t *root = parse(text, &doc);
    str_of(root, "access_token", a->token, sizeof(a->token));
    str_of(bg_json_find(root, "user"), "id", a->id, sizeof(a->id));
    cr_assert(a->token[0] != '\0' && a->id[0] != '\0', "%s", text);
    bg_json_doc_free(doc);
}

static void register_user(account_t *a, const char *email)
{
    char body[512];
    memset(a, 0, sizeof(*a));
    bg_strlcpy(a->email, email, sizeof(a->email));
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"" PASSWORD "\"}", email);
    char *text = expect("POST", "/auth/register", NULL, body, 201);
    take_session(a, text);
    free(text);
}

/* Makes a platform admin with bgctl and signs in. */
static void make_admin(account_t *a, const char *email)
{
    char env_url[600], out[4096], body[512];
    memset(a, 0, sizeof(*a));
    bg_strlcpy(a->email, email, sizeof(a->email));
    snprintf(env_url, sizeof(env_url), "BG_DATABASE_URL=%s", S.db.url);
    const char *env[] = {env_url, "BG_LOG_LEVEL=warn", "BG_ENV_FILE=/nonexistent", NULL};
    const char *argv[] = {bgt_bin("bgctl"), "user",   "create", "--admin", "--email", email,
                          "--password",     PASSWORD, NULL};
    cr_assert_eq(bgt_run(argv, env, out, sizeof(out)), 0, "bgctl user create --admin: %s", out);
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"" PASSWORD "\"}", email);
    char *text = expect("POST", "/auth/login", NULL, body, 200);
    take_session(a, text);
    free(text);
}

/* Creates a policy rule named name through the API; returns the x-request-id of the answer. */
static void create_policy(const account_t *admin, const char *name, char *id, char *request_id)
{
    char body[512];
    snprintf(body, sizeof(body),
             "{\"type\":\"rate_limit\",\"scope\":\"plan\",\"scope_id\":\"trial\",\"name\":\"%s\","
             "\"body\":{\"rpm\":30,\"burst\":5}}",
             name);
    bgt_resp_t r;
    long st = call_h("POST", "/admin/policies", admin->token, body, NULL, &r);
    cr_assert_eq(st, 201, "create policy: %ld %s", st, r.body);
    bg_json_doc_t *doc;
    str_of(parse(r.body, &doc), "id", id, 64);
    bg_json_doc_free(doc);
    if (request_id != NULL)
        cr_assert_not_null(bgt_resp_header(&r, "x-request-id", request_id, 64));
    bgt_resp_free(&r);
}

/* One page of rows: the rows' texts (ids or request ids, by key) and the next cursor. */
typedef struct st_page {
    size_t n;
    char keys[MAX_ROWS][64];
    char actions[MAX_ROWS][64];
    char next[256];
} page_t;

/* GETs path (a /admin/logs URL) as admin, expecting 200, and reads the page: each row's key. */
static void get_page(const account_t *admin, const char *path, const char *key, page_t *p)
{
    char *text = expect("GET", path, admin->token, NULL, 200);
    bg_json_doc_t *doc;
    const bg_json_t *root = parse(text, &doc);
    const bg_json_t *data = bg_json_find(root, "data");
    cr_assert(bg_json_is_array(data), "%s", text);
    memset(p, 0, sizeof(*p));
    p->n = bg_json_len(data);
    cr_assert_leq(p->n, MAX_ROWS);
    for (size_t i = 0; i < p->n; i++) {
        str_of(bg_json_at(data, i), key, p->keys[i], sizeof(p->keys[i]));
        str_of(bg_json_at(data, i), "action", p->actions[i], sizeof(p->actions[i]));
    }
    const bg_json_t *next = bg_json_find(root, "next_cursor");
    cr_assert_not_null(next, "no next_cursor: %s", text);
    str_of(root, "next_cursor", p->next, sizeof(p->next));
    cr_assert(p->next[0] != '\0' || bg_json_type(next) == BG_JSON_NULL, "%s", text);
    bg_json_doc_free(doc);
    free(text);
}

/* Finds the row with "key": value in a page's JSON text; returns its index or -1. */
static long find_row(const bg_json_t *data, const char *key, const char *value)
{
    for (size_t i = 0; i < bg_json_len(data); i++) {
        char v[256];
        str_of(bg_json_at(data, i), key, v, sizeof(v));
        if (strcmp(v, value) == 0)
            return (long)i;
    }
    return -1;
}

/* Expects a 422 naming param for GET path; returns the message (owned). */
static char *expect_invalid_h(const account_t *admin, const char *path, const char *param,
                              const char *header)
{
    bgt_resp_t r;
    long st = call_h("GET", path, admin->token, NULL, header, &r);
    cr_expect_eq(st, 422, "%s: %ld %s", path, st, r.body);
    bg_json_doc_t *doc;
    const bg_json_t *err = bg_json_find(parse(r.body, &doc), "error");
    char code[64], field[64], message[512];
    str_of(err, "code", code, sizeof(code));
    str_of(err, "message", message, sizeof(message));
    const bg_json_t *fields = bg_json_find(bg_json_find(err, "details"), "fields");
    str_of(bg_json_at(fields, 0), "field", field, sizeof(field));
    cr_expect_str_eq(code, "validation_failed", "%s: %s", path, r.body);
    cr_expect_str_eq(field, param, "%s: %s", path, r.body);
    bg_json_doc_free(doc);
    bgt_resp_free(&r);
    char *m = strdup(message);
    cr_assert_not_null(m);
    return m;
}

static void expect_invalid(const account_t *admin, const char *path, const char *param)
{
    free(expect_invalid_h(admin, path, param, NULL));
}

/* ---- the audit kind ---- */

Test(admin_logs, audit_rows_of_real_actions_with_their_actor)
{
    account_t admin, user;
    make_admin(&admin, "boss@logs.example");
    register_user(&user, "plain@logs.example");
    char policy[64], policy_rid[64], path[512];
    create_policy(&admin, "logs rpm", policy, policy_rid);

    /* the admin disables the user */
    snprintf(path, sizeof(path), "/admin/users/%s", user.id);
    bgt_resp_t r;
    long st = call_h("PUT", path, admin.token, "{\"status\":\"disabled\"}", NULL, &r);
    cr_assert_eq(st, 200, "disable: %ld %s", st, r.body);
    char disable_rid[64];
    cr_assert_not_null(bgt_resp_header(&r, "x-request-id", disable_rid, sizeof(disable_rid)));
    bgt_resp_free(&r);

    /* newest first: the disabling, then the policy, then the registration */
    char *text = expect("GET", "/admin/logs", admin.token, NULL, 200);
    bg_json_doc_t *doc;
    const bg_json_t *root = parse(text, &doc);
    const bg_json_t *data = bg_json_find(root, "data");
    cr_expect_eq(bg_json_type(bg_json_find(root, "next_cursor")), BG_JSON_NULL, "%s", text);
    long dis = find_row(data, "action", "user.disable");
    long pol = find_row(data, "action", "policy.create");
    long reg = find_row(data, "action", "user.register");
    cr_assert(dis == 0 && pol > dis && reg > pol, "order %ld %ld %ld: %s", dis, pol, reg, text);

    const bg_json_t *row = bg_json_at(data, (size_t)dis);
    char v[256];
    str_of(row, "actor_kind", v, sizeof(v));
    cr_expect_str_eq(v, "admin");
    str_of(row, "actor_id", v, sizeof(v));
    cr_expect_str_eq(v, admin.id);
    str_of(row, "actor_email", v, sizeof(v));
    cr_expect_str_eq(v, "boss@logs.example");
    str_of(row, "target_type", v, sizeof(v));
    cr_expect_str_eq(v, "user");
    str_of(row, "target_id", v, sizeof(v));
    cr_expect_str_eq(v, user.id);
    str_of(row, "request_id", v, sizeof(v));
    cr_expect_str_eq(v, disable_rid, "the row names the request that did it");
    str_of(row, "ip", v, sizeof(v));
    cr_expect_str_eq(v, "127.0.0.1");
    str_of(row, "occurred_at", v, sizeof(v));
    cr_expect(strlen(v) == 20 && v[10] == 'T' && v[19] == 'Z', "not RFC 3339 UTC: %s", v);
    str_of(row, "id", v, sizeof(v));
    cr_expect(v[0] != '\0', "ids are strings: %s", text);
    cr_expect(bg_json_is_object(bg_json_find(row, "details")), "%s", text);

    row = bg_json_at(data, (size_t)pol);
    str_of(row, "target_id", v, sizeof(v));
    cr_expect_str_eq(v, policy);
    str_of(row, "actor_email", v, sizeof(v));
    cr_expect_str_eq(v, "boss@logs.example");
    str_of(row, "request_id", v, sizeof(v));
    cr_expect_str_eq(v, policy_rid);

    /* a user acting on themselves: the user's own e-mail */
    row = bg_json_at(data, (size_t)reg);
    str_of(row, "actor_email", v, sizeof(v));
    cr_expect_str_eq(v, "plain@logs.example");
    /* bgctl acts as the system: no actor, no e-mail */
    long made = find_row(data, "action", "user.create");
    cr_assert_geq(made, 0, "%s", text);
    cr_expect_eq(bg_json_type(bg_json_find(bg_json_at(data, (size_t)made), "actor_email")),
                 BG_JSON_NULL, "%s", text);
    cr_expect_eq(bg_json_type(bg_json_find(bg_json_at(data, (size_t)made), "actor_id")),
                 BG_JSON_NULL, "%s", text);
    bg_json_doc_free(doc);
    free(text);

    /* ?kind=audit is the default spelled out */
    text = expect("GET", "/admin/logs?kind=audit", admin.token, NULL, 200);
    cr_expect(strstr(text, disable_rid) != NULL, "%s", text);
    free(text);
}

Test(admin_logs, filters_narrow_exactly)
{
    account_t admin, user;
    make_admin(&admin, "filters@logs.example");
    register_user(&user, "target@logs.example");
    char p1[64], p2[64], path[512];
    create_policy(&admin, "first", p1, NULL);
    create_policy(&admin, "second", p2, NULL);
    snprintf(path, sizeof(path), "/admin/users/%s", user.id);
    free(expect("PUT", path, admin.token, "{\"status\":\"disabled\"}", 200));

    page_t pg;
    /* an action prefix: the two policies and nothing else */
    get_page(&admin, "/admin/logs?action=policy.", "target_id", &pg);
    cr_assert_eq(pg.n, 2);
    cr_expect_str_eq(pg.keys[0], p2);
    cr_expect_str_eq(pg.keys[1], p1);
    /* an exact action */
    get_page(&admin, "/admin/logs?action=user.disable", "target_id", &pg);
    cr_assert_eq(pg.n, 1);
    cr_expect_str_eq(pg.keys[0], user.id);
    /* "user" without the dot is an exact action no row has: no prefix match */
    get_page(&admin, "/admin/logs?action=user", "target_id", &pg);
    cr_expect_eq(pg.n, 0);
    /* a prefix holding LIKE's wildcard matches it literally */
    get_page(&admin, "/admin/logs?action=user_.", "target_id", &pg);
    cr_expect_eq(pg.n, 0);

    /* by actor: the admin's three actions; the user's own registration */
    snprintf(path, sizeof(path), "/admin/logs?actor=%s", admin.id);
    get_page(&admin, path, "target_id", &pg);
    cr_assert_eq(pg.n, 3);
    for (size_t i = 0; i < pg.n; i++)
        cr_expect(strncmp(pg.actions[i], "policy.", 7) == 0 ||
                      strcmp(pg.actions[i], "user.disable") == 0,
                  "%s", pg.actions[i]);
    snprintf(path, sizeof(path), "/admin/logs?actor=%s", user.id);
    get_page(&admin, path, "target_id", &pg);
    cr_assert_eq(pg.n, 1);
    cr_expect_str_eq(pg.actions[0], "user.register");
    /* by target */
    snprintf(path, sizeof(path), "/admin/logs?target_type=user&target_id=%s", user.id);
    get_page(&admin, path, "action", &pg);
    cr_expect_eq(pg.n, 2, "registered and disabled");
    snprintf(path, sizeof(path), "/admin/logs?target_type=policy_rule&target_id=%s", p1);
    get_page(&admin, path, "action", &pg);
    cr_assert_eq(pg.n, 1);
    cr_expect_str_eq(pg.actions[0], "policy.create");

    /* by time: since is inclusive, until exclusive, at the second policy's own time */
    char *text = expect("GET", "/admin/logs?action=policy.create", admin.token, NULL, 200);
    bg_json_doc_t *doc;
    char at[64];
    str_of(bg_json_at(bg_json_find(parse(text, &doc), "data"), 0), "occurred_at", at, sizeof(at));
    bg_json_doc_free(doc);
    free(text);
    cr_assert(at[0] != '\0');
    snprintf(path, sizeof(path), "/admin/logs?action=policy.&since=%s", at);
    get_page(&admin, path, "target_id", &pg);
    cr_expect(pg.n >= 1 && strcmp(pg.keys[0], p2) == 0, "since %s: %zu rows", at, pg.n);
    /* far in the future and far in the past */
    get_page(&admin, "/admin/logs?since=2999-01-01T00:00:00Z", "action", &pg);
    cr_expect_eq(pg.n, 0);
    get_page(&admin, "/admin/logs?until=2000-01-01T00:00:00Z", "action", &pg);
    cr_expect_eq(pg.n, 0);
    /* an offset, percent-encoded or with its '+' read as a space, is the same instant */
    get_page(&admin, "/admin/logs?until=2999-01-01T03:00:00%2B03:00&action=policy.", "action", &pg);
    cr_expect_eq(pg.n, 2);
    get_page(&admin, "/admin/logs?until=2999-01-01T03:00:00+03:00&action=policy.", "action", &pg);
    cr_expect_eq(pg.n, 2);
    /* filters combine */
    snprintf(path, sizeof(path), "/admin/logs?actor=%s&action=user.", admin.id);
    get_page(&admin, path, "action", &pg);
    cr_assert_eq(pg.n, 1);
    cr_expect_str_eq(pg.keys[0], "user.disable");
}

Test(admin_logs, pages_cover_every_row_once_while_rows_arrive)
{
    account_t admin;
    make_admin(&admin, "pages@logs.example");
    enum { N = 11 };
    char ids[N + 3][64];
    for (int i = 0; i < N; i++) {
        char name[32];
        snprintf(name, sizeof(name), "rule %d", i);
        create_policy(&admin, name, ids[i], NULL);
    }

    bool seen[N] = {false};
    int total = 0, pages = 0;
    char path[512], cursor[256] = "";
    do {
        snprintf(path, sizeof(path), "/admin/logs?action=policy.create&limit=3%s%s",
                 cursor[0] != '\0' ? "&cursor=" : "", cursor);
        page_t pg;
        get_page(&admin, path, "target_id", &pg);
        cr_assert_leq(pg.n, 3);
        for (size_t i = 0; i < pg.n; i++) {
            int k = -1;
            for (int j = 0; j < N; j++)
                if (strcmp(ids[j], pg.keys[i]) == 0)
                    k = j;
            /* rows made after the first page sort before it: they never show up further on */
            cr_assert(k >= 0 && !seen[k], "page %d: unknown or repeated %s", pages, pg.keys[i]);
            seen[k] = true;
            total++;
        }
        if (pages < 2)
            create_policy(&admin, "arrives meanwhile", ids[N + pages], NULL);
        bg_strlcpy(cursor, pg.next, sizeof(cursor));
        pages++;
    } while (cursor[0] != '\0' && pages < 10);
    cr_expect_eq(total, N);
    cr_expect_eq(pages, 4);

    /* the first page now starts with the newest rows */
    page_t pg;
    get_page(&admin, "/admin/logs?action=policy.create&limit=2", "target_id", &pg);
    cr_assert_eq(pg.n, 2);
    cr_expect_str_eq(pg.keys[0], ids[N + 1]);
    cr_expect_str_eq(pg.keys[1], ids[N]);
    cr_expect(pg.next[0] != '\0');
    /* a page of exactly what is left ends the list */
    get_page(&admin, "/admin/logs?action=policy.create&limit=13", "target_id", &pg);
    cr_expect_eq(pg.n, 13);
    cr_expect_str_eq(pg.next, "");
}

Test(admin_logs, refused_callers_and_bad_filters)
{
    account_t admin, user;
    make_admin(&admin, "strict@logs.example");
    register_user(&user, "nosy@logs.example");

    free(expect("GET", "/admin/logs", NULL, NULL, 401));
    char *text = expect("GET", "/admin/logs", user.token, NULL, 403);
    cr_expect(strstr(text, "\"code\":\"forbidden\"") != NULL, "%s", text);
    free(text);
    free(expect("GET", "/admin/logs?kind=requests", user.token, NULL, 403));

    expect_invalid(&admin, "/admin/logs?kind=everything", "kind");
    expect_invalid(&admin, "/admin/logs?actor=not-a-uuid", "actor");
    expect_invalid(&admin, "/admin/logs?actor=%00", "actor");
    expect_invalid(&admin, "/admin/logs?action=Policy.", "action");
    expect_invalid(&admin, "/admin/logs?action=policy%25", "action");
    expect_invalid(&admin, "/admin/logs?since=yesterday", "since");
    expect_invalid(&admin, "/admin/logs?until=2026-02-30T00:00:00Z", "until");
    expect_invalid(&admin, "/admin/logs?since=0000-01-01T00:00:00Z", "since");
    expect_invalid(&admin, "/admin/logs?since=2026-02-01T00:00:00Z&until=2026-01-01T00:00:00Z",
                   "since");
    expect_invalid(&admin, "/admin/logs?limit=0", "limit");
    expect_invalid(&admin, "/admin/logs?limit=101", "limit");
    expect_invalid(&admin, "/admin/logs?cursor=bm90LWEtY3Vyc29y", "cursor");
    expect_invalid(&admin, "/admin/logs?cursor=%25%25%25", "cursor");
    char target[400], path[512];
    memset(target, 'x', 201);
    target[201] = '\0';
    snprintf(path, sizeof(path), "/admin/logs?target_id=%s", target);
    expect_invalid(&admin, path, "target_id");
    /* a filter of the other kind is refused rather than ignored */
    expect_invalid(&admin, "/admin/logs?status=ok", "status");
    expect_invalid(&admin, "/admin/logs?kind=requests&action=user.", "action");
    expect_invalid(&admin, "/admin/logs?kind=requests&status=fine", "status");
    expect_invalid(&admin, "/admin/logs?kind=requests&channel=fax", "channel");
    expect_invalid(&admin, "/admin/logs?kind=requests&user=42", "user");
    expect_invalid(&admin, "/admin/logs?kind=requests&agent=assistant", "agent");

    /* a cursor made for the audit kind is no cursor of the requests kind */
    for (int i = 0; i < 2; i++)
        create_policy(&admin, i == 0 ? "one" : "two", target, NULL);
    page_t pg;
    get_page(&admin, "/admin/logs?limit=1", "action", &pg);
    cr_assert(pg.next[0] != '\0');
    snprintf(path, sizeof(path), "/admin/logs?kind=requests&cursor=%s", pg.next);
    expect_invalid(&admin, path, "cursor");
    snprintf(path, sizeof(path), "/admin/logs?cursor=%s", pg.next);
    free(expect("GET", path, admin.token, NULL, 200));

    /* in the caller's language: a signed-in user's own, chosen in the profile */
    free(expect("PUT", "/auth/profile", admin.token, "{\"locale\":\"ru\"}", 200));
    char *msg =
        expect_invalid_h(&admin, "/admin/logs?actor=nobody", "actor", "Accept-Language: en");
    cr_expect_str_eq(msg, "Поле «actor» должно содержать UUID.");
    free(msg);
    msg = expect_invalid_h(
        &admin, "/admin/logs?since=2026-02-01T00:00:00Z&until=2026-01-01T00:00:00Z", "since", NULL);
    cr_expect_str_eq(msg, "Значение поля «since» не должно быть позже, чем «until».");
    free(msg);
    free(expect("PUT", "/auth/profile", admin.token, "{\"locale\":\"es\"}", 200));
    msg = expect_invalid_h(&admin, "/admin/logs?kind=all", "kind", NULL);
    cr_expect_str_eq(msg, "El campo «kind» debe ser uno de: audit, requests.");
    free(msg);
    free(expect("PUT", "/auth/profile", admin.token, "{\"locale\":\"en\"}", 200));
    msg = expect_invalid_h(&admin, "/admin/logs?since=2026-01-01", "since", NULL);
    cr_expect(strstr(msg, "RFC 3339") != NULL, "%s", msg);
    free(msg);
}

/* ---- the requests kind ---- */

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

Test(admin_logs_requests, a_chat_turn_shows_as_the_usage_worker_recorded_it)
{
    account_t admin, user;
    make_admin(&admin, "ops@logs.example");
    register_user(&user, "chatter@logs.example");

    /* the assistant, a conversation and one turn, answered later on the stream */
    char *text = expect("GET", "/agents", user.token, NULL, 200);
    bg_json_doc_t *doc;
    char agent[64] = "";
    const bg_json_t *data = bg_json_find(parse(text, &doc), "data");
    long a = find_row(data, "slug", "assistant");
    cr_assert_geq(a, 0, "%s", text);
    str_of(bg_json_at(data, (size_t)a), "id", agent, sizeof(agent));
    bg_json_doc_free(doc);
    free(text);
    char body[256], conv[64], path[512], job[64];
    snprintf(body, sizeof(body), "{\"agent_id\":\"%s\"}", agent);
    text = expect("POST", "/chat/conversations", user.token, body, 201);
    str_of(parse(text, &doc), "id", conv, sizeof(conv));
    bg_json_doc_free(doc);
    free(text);
    snprintf(path, sizeof(path), "/chat/conversations/%s/messages", conv);
    bgt_resp_t r;
    long st = call_h("POST", path, user.token, "{\"content\":\"Hello there\"}",
                     "Prefer: respond-async", &r);
    cr_assert_eq(st, 202, "%ld %s", st, r.body);
    str_of(parse(r.body, &doc), "job_id", job, sizeof(job));
    bg_json_doc_free(doc);
    bgt_resp_free(&r);
    cr_assert(job[0] != '\0');

    /* the usage worker writes the record once the turn ends */
    snprintf(path, sizeof(path), "/admin/logs?kind=requests&user=%s", user.id);
    text = NULL;
    long long deadline = bgt_now_ms() + 30000;
    for (;;) {
        text = expect("GET", path, admin.token, NULL, 200);
        if (strstr(text, job) != NULL || bgt_now_ms() > deadline)
            break;
        free(text);
        sleep_ms(200);
    }
    const bg_json_t *root = parse(text, &doc);
    data = bg_json_find(root, "data");
    cr_assert_eq(bg_json_len(data), 1, "no usage record for job %s: %s (see %s)", job, text, S.dir);
    const bg_json_t *row = bg_json_at(data, 0);
    char v[256];
    str_of(row, "request_id", v, sizeof(v));
    cr_expect_str_eq(v, job);
    str_of(row, "user_id", v, sizeof(v));
    cr_expect_str_eq(v, user.id);
    str_of(row, "user_email", v, sizeof(v));
    cr_expect_str_eq(v, "chatter@logs.example");
    str_of(row, "agent_id", v, sizeof(v));
    cr_expect_str_eq(v, agent);
    str_of(row, "agent_slug", v, sizeof(v));
    cr_expect_str_eq(v, "assistant");
    str_of(row, "channel", v, sizeof(v));
    cr_expect_str_eq(v, "web");
    str_of(row, "model", v, sizeof(v));
    cr_expect_str_eq(v, "demo-1");
    str_of(row, "status", v, sizeof(v));
    cr_expect_str_eq(v, "ok");
    cr_expect_eq(bg_json_type(bg_json_find(row, "error_class")), BG_JSON_NULL, "%s", text);
    cr_expect_gt(int_of(row, "prompt_tokens"), 0, "%s", text);
    cr_expect_gt(int_of(row, "completion_tokens"), 0, "%s", text);
    cr_expect_geq(int_of(row, "latency_ms"), int_of(row, "ttft_ms"), "%s", text);
    bool cached = true;
    cr_expect(bg_json_bool(bg_json_find(row, "cached"), &cached) && !cached, "%s", text);
    str_of(row, "occurred_at", v, sizeof(v));
    cr_expect(strlen(v) == 20 && v[19] == 'Z', "not RFC 3339 UTC: %s", v);
    cr_expect_eq(bg_json_type(bg_json_find(root, "next_cursor")), BG_JSON_NULL, "%s", text);
    bg_json_doc_free(doc);
    free(text);

    /* the filters of the kind */
    page_t pg;
    get_page(&admin, "/admin/logs?kind=requests", "request_id", &pg);
    cr_assert_eq(pg.n, 1);
    cr_expect_str_eq(pg.keys[0], job);
    get_page(&admin, "/admin/logs?kind=requests&status=ok&channel=web", "request_id", &pg);
    cr_expect_eq(pg.n, 1);
    get_page(&admin, "/admin/logs?kind=requests&status=error", "request_id", &pg);
    cr_expect_eq(pg.n, 0);
    get_page(&admin, "/admin/logs?kind=requests&channel=telegram", "request_id", &pg);
    cr_expect_eq(pg.n, 0);
    snprintf(path, sizeof(path), "/admin/logs?kind=requests&agent=%s", agent);
    get_page(&admin, path, "request_id", &pg);
    cr_expect_eq(pg.n, 1);
    snprintf(path, sizeof(path), "/admin/logs?kind=requests&user=%s", admin.id);
    get_page(&admin, path, "request_id", &pg);
    cr_expect_eq(pg.n, 0);
    get_page(&admin, "/admin/logs?kind=requests&since=2999-01-01T00:00:00Z", "request_id", &pg);
    cr_expect_eq(pg.n, 0);

    /* a second turn: two rows, paged one at a time, newest first */
    snprintf(path, sizeof(path), "/chat/conversations/%s/messages", conv);
    st = call_h("POST", path, user.token, "{\"content\":\"And again\"}", "Prefer: respond-async",
                &r);
    cr_assert_eq(st, 202, "%ld %s", st, r.body);
    char job2[64];
    str_of(parse(r.body, &doc), "job_id", job2, sizeof(job2));
    bg_json_doc_free(doc);
    bgt_resp_free(&r);
    deadline = bgt_now_ms() + 30000;
    do {
        get_page(&admin, "/admin/logs?kind=requests&limit=1", "request_id", &pg);
        if (strcmp(pg.keys[0], job2) != 0)
            sleep_ms(200);
    } while (strcmp(pg.keys[0], job2) != 0 && bgt_now_ms() < deadline);
    cr_assert_str_eq(pg.keys[0], job2);
    cr_assert(pg.next[0] != '\0');
    /* a cursor of the requests kind is no cursor of the audit kind */
    snprintf(path, sizeof(path), "/admin/logs?cursor=%s", pg.next);
    expect_invalid(&admin, path, "cursor");
    snprintf(path, sizeof(path), "/admin/logs?kind=requests&limit=1&cursor=%s", pg.next);
    get_page(&admin, path, "request_id", &pg);
    cr_assert_eq(pg.n, 1);
    cr_expect_str_eq(pg.keys[0], job);
    cr_expect_str_eq(pg.next, "");
}
