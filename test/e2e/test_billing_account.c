/*
 * GET /billing/account end to end: the real bg-edge against a private Redis and a migrated
 * database. The answer comes from the compiled admission state in Redis, so these tests check that
 * a new user sees the trial, that a plan grant shows up, that a flushed Redis is compiled again
 * from Postgres, and that a Redis that is down is a 503 rather than a guess.
 */
#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "bg/common.h"
#include "bg/json.h"
#include "bg/timeutil.h"
#include "bgtest.h"

#define PASSWORD "Billing-Horse-Battery-42"

static struct {
    bgt_redis_t redis;
    bgt_pg_t db;
    char dir[256], log[300], base[64];
    int port;
    pid_t pid;
} S;

static void setup(void)
{
    memset(&S, 0, sizeof(S));
    cr_assert_eq(bgt_pg_create(&S.db, true), 0);
    cr_assert_eq(bgt_redis_start(&S.redis), 0);
    cr_assert_eq(bgt_tempdir(S.dir, sizeof(S.dir)), 0);
    snprintf(S.log, sizeof(S.log), "%s/edge.log", S.dir);
    S.port = bgt_free_port();
    snprintf(S.base, sizeof(S.base), "http://127.0.0.1:%d", S.port);
    static char env_store[3][600];
    snprintf(env_store[0], 600, "BG_HTTP_PORT=%d", S.port);
    snprintf(env_store[1], 600, "BG_REDIS_URL=%s", S.redis.url);
    snprintf(env_store[2], 600, "BG_DATABASE_URL=%s", S.db.url);
    const char *env[] = {env_store[0],
                         env_store[1],
                         env_store[2],
                         "BG_HTTPS_PORT=0",
                         "BG_ENV_FILE=/nonexistent",
                         "BG_EDGE_THREADS=2",
                         "BG_LOG_FORMAT=text",
                         "BG_LOG_LEVEL=info",
                         "BG_REDIS_TIMEOUT_MS=1500",
                         "BG_JWT_SECRET=0123456789abcdef0123456789abcdef-billing",
                         NULL};
    const char *argv[] = {bgt_bin("bg-edge"), NULL};
    S.pid = bgt_spawn(argv, env, S.log);
    cr_assert(S.pid > 0);
    char url[128];
    snprintf(url, sizeof(url), "%s/healthz", S.base);
    cr_assert_eq(bgt_wait_http(url, 200, 10000), 0, "bg-edge did not come up; see %s", S.log);
}

static void teardown(void)
{
    if (S.pid > 0)
        bgt_stop(S.pid, SIGKILL, 2000);
    bgt_redis_stop(&S.redis);
    bgt_pg_drop(&S.db);
    bgt_rmtree(S.dir);
}

TestSuite(billing_account, .init = setup, .fini = teardown, .timeout = 120);

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

static bool is_null(const char *text, const char *const path[])
{
    bg_json_doc_t *doc;
    const bg_json_t *v = json_at(text, &doc, path);
    bool null = v != NULL && bg_json_type(v) == BG_JSON_NULL;
    bg_json_doc_free(doc);
    return null;
}

static void register_user(const char *email, char *token, size_t tokenlen)
{
    char body[512];
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"" PASSWORD "\"}", email);
    bgt_resp_t r;
    long st = call("POST", "/auth/register", NULL, body, &r);
    cr_assert_eq(st, 201, "register: %ld %s", st, r.body);
    get_str(r.body, (const char *const[]){"access_token", NULL}, token, tokenlen);
    bgt_resp_free(&r);
}

static void account(const char *token, bgt_resp_t *r)
{
    long st = call("GET", "/billing/account", token, NULL, r);
    cr_assert_eq(st, 200, "GET /billing/account: %ld %s", st, r->body);
}

static int64_t time_of(const char *text, const char *const path[])
{
    char t[64];
    get_str(text, path, t, sizeof(t));
    int64_t ms = 0;
    cr_assert_eq(bg_timeutil_parse_rfc3339(t, strlen(t), &ms), 0, "not RFC 3339: %s", t);
    return ms;
}

Test(billing_account, new_user_sees_the_trial_with_its_daily_quota)
{
    char token[2048];
    register_user("trial@billing.example", token, sizeof(token));
    bgt_resp_t r;
    account(token, &r);
    char plan[64], status[32];
    get_str(r.body, (const char *const[]){"plan", NULL}, plan, sizeof(plan));
    get_str(r.body, (const char *const[]){"status", NULL}, status, sizeof(status));
    cr_expect_str_eq(plan, "trial");
    cr_expect_str_eq(status, "trialing");
    cr_expect_eq(get_int(r.body, (const char *const[]){"quota", "limit", NULL}), 50, "%s", r.body);
    cr_expect_eq(get_int(r.body, (const char *const[]){"quota", "remaining", NULL}), 50, "%s",
                 r.body);
    int64_t now = bg_timeutil_wall_ms();
    int64_t reset = time_of(r.body, (const char *const[]){"quota", "reset_at", NULL});
    cr_expect(reset > now - 1000 && reset <= now + 86400000 + 1000, "reset_at %lld: %s",
              (long long)reset, r.body);
    int64_t trial_end = time_of(r.body, (const char *const[]){"trial_ends_at", NULL});
    cr_expect(trial_end > now + 13LL * 86400000, "trial ends too soon: %s", r.body);
    int64_t start = time_of(r.body, (const char *const[]){"period", "start", NULL});
    int64_t end = time_of(r.body, (const char *const[]){"period", "end", NULL});
    cr_expect(start <= now + 1000 && end > now && end == reset, "period: %s", r.body);
    cr_expect(strstr(r.body, "\"limits\":{\"rpm\":10,") != NULL, "trial rpm 10: %s", r.body);
    bgt_resp_free(&r);
}

Test(billing_account, a_plan_grant_shows_up)
{
    char token[2048];
    register_user("grant@billing.example", token, sizeof(token));
    bgt_resp_t r;
    account(token, &r);
    bgt_resp_free(&r);

    char env_url[600], out[4096];
    snprintf(env_url, sizeof(env_url), "BG_DATABASE_URL=%s", S.db.url);
    char env_redis[300];
    snprintf(env_redis, sizeof(env_redis), "BG_REDIS_URL=%s", S.redis.url);
    const char *env[] = {env_url, env_redis, "BG_LOG_LEVEL=warn", "BG_ENV_FILE=/nonexistent", NULL};
    const char *argv[] = {bgt_bin("bgctl"), "plan",    "grant",  "--email", "grant@billing.example",
                          "--plan",         "monthly", "--days", "30",      NULL};
    cr_assert_eq(bgt_run(argv, env, out, sizeof(out)), 0, "bgctl plan grant: %s", out);

    account(token, &r);
    char plan[64], status[32];
    get_str(r.body, (const char *const[]){"plan", NULL}, plan, sizeof(plan));
    get_str(r.body, (const char *const[]){"status", NULL}, status, sizeof(status));
    cr_expect_str_eq(plan, "monthly", "%s", r.body);
    cr_expect_str_eq(status, "active", "%s", r.body);
    cr_expect_eq(get_int(r.body, (const char *const[]){"quota", "limit", NULL}), 10000, "%s",
                 r.body);
    cr_expect(is_null(r.body, (const char *const[]){"trial_ends_at", NULL}), "%s", r.body);
    bgt_resp_free(&r);
}

static void redis_cli(const char *cmd)
{
    char port[16], out[1024];
    snprintf(port, sizeof(port), "%d", S.redis.port);
    const char *argv[] = {"redis-cli", "-p", port, cmd, NULL};
    cr_assert_eq(bgt_run(argv, NULL, out, sizeof(out)), 0, "redis-cli %s: %s", cmd, out);
}

Test(billing_account, a_flushed_redis_is_compiled_again_from_postgres)
{
    char token[2048];
    register_user("flush@billing.example", token, sizeof(token));
    bgt_resp_t r;
    account(token, &r);
    bgt_resp_free(&r);
    redis_cli("FLUSHALL");
    /* the session check reads Redis too; an empty Redis must not lock the user out */
    account(token, &r);
    cr_expect(strstr(r.body, "\"status\":\"trialing\"") != NULL, "%s", r.body);
    cr_expect_eq(get_int(r.body, (const char *const[]){"quota", "limit", NULL}), 50, "%s", r.body);
    bgt_resp_free(&r);
    /* and the state is back in Redis for the admission script */
    char port[16], out[4096];
    snprintf(port, sizeof(port), "%d", S.redis.port);
    const char *argv[] = {"redis-cli", "-p", port, "--scan", "--pattern", "bg:*:adm:*", NULL};
    cr_assert_eq(bgt_run(argv, NULL, out, sizeof(out)), 0);
    cr_expect(strstr(out, ":adm:") != NULL, "no admission hash after the answer: %s", out);
}

Test(billing_account, redis_down_is_503)
{
    char token[2048];
    register_user("down@billing.example", token, sizeof(token));
    bgt_redis_stop(&S.redis);
    bgt_resp_t r;
    long st = call("GET", "/billing/account", token, NULL, &r);
    cr_expect_eq(st, 503, "%ld %s", st, r.body);
    cr_expect(strstr(r.body, "\"code\":\"service_unavailable\"") != NULL, "%s", r.body);
    bgt_resp_free(&r);
}

Test(billing_account, needs_a_signed_in_user)
{
    bgt_resp_t r;
    long st = call("GET", "/billing/account", NULL, NULL, &r);
    cr_expect_eq(st, 401, "%ld %s", st, r.body);
    bgt_resp_free(&r);
}

/* Runs sql on the test's database (params: NULL-terminated). */
static void sql(const char *text, const char *const params[])
{
    PGconn *c = PQconnectdb(S.db.url);
    cr_assert_eq(PQstatus(c), CONNECTION_OK, "%s", PQerrorMessage(c));
    int n = 0;
    while (params != NULL && params[n] != NULL)
        n++;
    PGresult *res = PQexecParams(c, text, n, NULL, params, NULL, NULL, 0);
    cr_assert(PQresultStatus(res) == PGRES_COMMAND_OK || PQresultStatus(res) == PGRES_TUPLES_OK,
              "%s: %s", text, PQerrorMessage(c));
    PQclear(res);
    PQfinish(c);
}

/* The object of array key whose member match_key is match (a JSON text, "" when none). */
static int64_t row_int(const char *text, const char *key, const char *match_key, const char *match,
                       const char *field)
{
    bg_json_doc_t *doc;
    const bg_json_t *arr = json_at(text, &doc, (const char *const[]){key, NULL});
    int64_t n = -1;
    for (size_t i = 0; arr != NULL && i < bg_json_len(arr); i++) {
        const bg_json_t *o = bg_json_at(arr, i);
        size_t len = 0;
        const char *s = bg_json_str(bg_json_find(o, match_key), &len);
        if (s != NULL && strlen(match) == len && memcmp(s, match, len) == 0 &&
            !bg_json_int(bg_json_find(o, field), &n))
            n = -1;
    }
    bg_json_doc_free(doc);
    return n;
}

Test(billing_account, usage_is_summed_by_day_agent_and_channel_per_window)
{
    char token[2048], uid[64];
    register_user("usage@billing.example", token, sizeof(token));
    bgt_resp_t r;
    cr_assert_eq(call("GET", "/auth/profile", token, NULL, &r), 200);
    get_str(r.body, (const char *const[]){"id", NULL}, uid, sizeof(uid));
    bgt_resp_free(&r);

    /* this trial day (its window is the day from registration, a moment ago): two web turns and
     * a failed API call, made just now; before it: one Telegram turn */
    const char *const p[] = {uid, NULL};
    sql("INSERT INTO usage_records (request_id, user_id, agent_id, channel, model, prompt_tokens, "
        "completion_tokens, token_source, status, error_class, requests_charged, created_at) "
        "SELECT v.rid, $1::uuid, a.id, v.ch, 'demo-1', v.pt, v.ct, v.src, v.st, v.ec, v.chg, "
        "now() - v.ago FROM agents a, (VALUES "
        "('u-1', 'web', 10, 5, 'provider', 'ok', NULL, 1, interval '0'), "
        "('u-2', 'web', 7, 3, 'provider', 'ok', NULL, 1, interval '-1 second'), "
        "('u-3', 'api', 4, 0, 'estimated', 'error', 'provider_error', 0, interval '-2 seconds'), "
        "('u-4', 'telegram', 1, 1, 'provider', 'ok', NULL, 1, interval '2 hours')) "
        "AS v(rid, ch, pt, ct, src, st, ec, chg, ago) WHERE a.slug = 'assistant' "
        "AND a.organization_id IS NULL",
        p);

    cr_assert_eq(call("GET", "/billing/usage", token, NULL, &r), 200, "%s", r.body);
    const char *const req[] = {"totals", "requests", NULL};
    cr_expect_eq(get_int(r.body, req), 3, "%s", r.body);
    cr_expect_eq(get_int(r.body, (const char *const[]){"totals", "requests_charged", NULL}), 2);
    cr_expect_eq(get_int(r.body, (const char *const[]){"totals", "prompt_tokens", NULL}), 21);
    cr_expect_eq(get_int(r.body, (const char *const[]){"totals", "completion_tokens", NULL}), 8);
    cr_expect_eq(row_int(r.body, "by_channel", "channel", "web", "requests"), 2, "%s", r.body);
    cr_expect_eq(row_int(r.body, "by_channel", "channel", "api", "requests_charged"), 0);
    cr_expect_eq(row_int(r.body, "by_channel", "channel", "telegram", "requests"), -1,
                 "the earlier turn is not in this window: %s", r.body);
    cr_expect_eq(row_int(r.body, "by_agent", "slug", "assistant", "tokens"), 29, "%s", r.body);
    char which[16];
    get_str(r.body, (const char *const[]){"period", "which", NULL}, which, sizeof(which));
    cr_expect_str_eq(which, "current");
    int64_t start = time_of(r.body, (const char *const[]){"period", "start", NULL});
    int64_t end = time_of(r.body, (const char *const[]){"period", "end", NULL});
    cr_expect_eq(end - start, 86400000, "the trial's window is a day");
    bgt_resp_free(&r);

    cr_assert_eq(call("GET", "/billing/usage?period=previous", token, NULL, &r), 200);
    cr_expect_eq(get_int(r.body, req), 1, "%s", r.body);
    cr_expect_eq(row_int(r.body, "by_channel", "channel", "telegram", "tokens"), 2, "%s", r.body);
    cr_expect_eq(time_of(r.body, (const char *const[]){"period", "end", NULL}), start);
    bgt_resp_free(&r);

    cr_expect_eq(call("GET", "/billing/usage?period=forever", token, NULL, &r), 422);
    bgt_resp_free(&r);
    cr_expect_eq(call("GET", "/billing/usage", NULL, NULL, &r), 401);
    bgt_resp_free(&r);
}
