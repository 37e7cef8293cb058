/*
 * The OpenAI-compatible API on the edge's side: the real bg-edge over HTTP/2 (h2c, curl) against
 * a private Redis and a migrated database. Like test_chat_stream.c, each test plays the llm worker:
 * it reads the job the admission script enqueued and appends the job's output events, so what is
 * checked is exactly the edge's part: API keys, the plan feature, models, request validation in
 * OpenAI's error body, the job it enqueues (channel api, the messages normalized), and how job
 * events become OpenAI's completion, chunks, usage chunk, [DONE] and errors with their statuses.
 * The whole path with the real worker and the official openai client is test/node/openai.test.mjs.
 */
#include <criterion/criterion.h>
#include <hiredis/hiredis.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bg/common.h"
#include "bg/json.h"
#include "bg/redis.h"
#include "bgtest.h"
#include "bgtest_adm.h"

#define PASSWORD "Openai-Horse-Battery-42"
#define SHARDS 16

static struct {
    bgt_redis_t redis;
    bgt_pg_t db;
    char dir[256];
    char base[64];
    pid_t pid;
    bg_redis_t *r;
} S;

static void setup(void)
{
    memset(&S, 0, sizeof(S));
    cr_assert_eq(bgt_pg_create(&S.db, true), 0);
    cr_assert_eq(bgt_redis_start(&S.redis), 0);
    cr_assert_eq(bgt_tempdir(S.dir, sizeof(S.dir)), 0);
    char log[300];
    snprintf(log, sizeof(log), "%s/edge.log", S.dir);
    int port = bgt_free_port();
    snprintf(S.base, sizeof(S.base), "http://127.0.0.1:%d", port);
    static char env_store[3][600];
    snprintf(env_store[0], 600, "BG_HTTP_PORT=%d", port);
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
                         "BG_JWT_SECRET=0123456789abcdef0123456789abcdef-openai",
                         NULL};
    const char *argv[] = {bgt_bin("bg-edge"), NULL};
    S.pid = bgt_spawn(argv, env, log);
    cr_assert(S.pid > 0);
    char url[128];
    snprintf(url, sizeof(url), "%s/healthz", S.base);
    cr_assert_eq(bgt_wait_http(url, 200, 10000), 0, "bg-edge did not come up; see %s", log);
    cr_assert_eq(bg_redis_new(S.redis.url, 3000, &S.r), 0);
}

static void teardown(void)
{
    if (S.pid > 0)
        bgt_stop(S.pid, SIGKILL, 2000);
    bg_redis_free(S.r);
    bgt_redis_stop(&S.redis);
    bgt_pg_drop(&S.db);
    bgt_rmtree(S.dir);
}

TestSuite(openai_api, .init = setup, .fini = teardown, .timeout = 240);

/* ---- HTTP ---- */

typedef struct st_call {
    const char *method;
    char path[256];
    const char *token; /* access token or API key */
    const char *body;
    bgt_resp_t resp;
    int rc;
} call_t;

static void call_run(call_t *c)
{
    char url[512], authz[2100];
    const char *headers[4];
    size_t n = 0;
    snprintf(url, sizeof(url), "%s%s", S.base, c->path);
    if (c->token != NULL) {
        snprintf(authz, sizeof(authz), "Authorization: Bearer %s", c->token);
        headers[n++] = authz;
    }
    if (c->body != NULL)
        headers[n++] = "Content-Type: application/json";
    headers[n] = NULL;
    c->rc = bgt_http(BGT_H2C, c->method, url, headers, c->body,
                     c->body != NULL ? strlen(c->body) : 0, &c->resp);
}

static void *call_thread(void *arg)
{
    call_run(arg);
    return NULL;
}

static long call(call_t *c)
{
    call_run(c);
    cr_assert_eq(c->rc, 0, "%s %s: %s", c->method, c->path, c->resp.error);
    return c->resp.status;
}

static bg_json_doc_t *parse(const char *text, size_t len)
{
    bg_json_doc_t *doc = NULL;
    const char *desc;
    size_t off;
    cr_assert_eq(bg_json_parse(text, len, NULL, &doc, &desc, &off), 0, "not JSON: %.*s", (int)len,
                 text);
    return doc;
}

/* The string at path in text ("" when absent or not a string). */
static void get_str(const char *text, const char *const path[], char *out, size_t outlen)
{
    bg_json_doc_t *doc = parse(text, strlen(text));
    const bg_json_t *v = bg_json_root(doc);
    for (size_t i = 0; path[i] != NULL && v != NULL; i++)
        v = bg_json_find(v, path[i]);
    size_t len = 0;
    const char *s = v != NULL ? bg_json_str(v, &len) : NULL;
    out[0] = '\0';
    if (s != NULL && len < outlen) {
        memcpy(out, s, len);
        out[len] = '\0';
    }
    bg_json_doc_free(doc);
}

static int64_t get_int(const char *text, const char *const path[])
{
    bg_json_doc_t *doc = parse(text, strlen(text));
    const bg_json_t *v = bg_json_root(doc);
    for (size_t i = 0; path[i] != NULL && v != NULL; i++)
        v = bg_json_find(v, path[i]);
    int64_t n = -1;
    if (v == NULL || !bg_json_int(v, &n))
        n = -1;
    bg_json_doc_free(doc);
    return n;
}

/* Checks an OpenAI error body: status, type, code and param (NULL: null). */
static void expect_oai_error(const call_t *c, long status, const char *type, const char *code,
                             const char *param)
{
    cr_expect_eq(c->resp.status, status, "status %ld, want %ld: %s", c->resp.status, status,
                 c->resp.body);
    char v[256];
    get_str(c->resp.body, (const char *const[]){"error", "type", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, type, "type in %s", c->resp.body);
    get_str(c->resp.body, (const char *const[]){"error", "code", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, code != NULL ? code : "", "code in %s", c->resp.body);
    get_str(c->resp.body, (const char *const[]){"error", "param", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, param != NULL ? param : "", "param in %s", c->resp.body);
    get_str(c->resp.body, (const char *const[]){"error", "message", NULL}, v, sizeof(v));
    cr_expect(v[0] != '\0', "no message in %s", c->resp.body);
    char h[64];
    cr_expect_not_null(bgt_resp_header(&c->resp, "x-request-id", h, sizeof(h)));
}

/* ---- users ---- */

typedef struct st_user {
    char id[64];
    char token[2048];
    char key[128];
    int shard;
} user_t;

static void bgctl(const char *const args[])
{
    char env_db[600], env_redis[300], out[4096];
    snprintf(env_db, sizeof(env_db), "BG_DATABASE_URL=%s", S.db.url);
    snprintf(env_redis, sizeof(env_redis), "BG_REDIS_URL=%s", S.redis.url);
    const char *env[] = {env_db, env_redis, "BG_LOG_LEVEL=warn", "BG_ENV_FILE=/nonexistent", NULL};
    const char *argv[12] = {bgt_bin("bgctl")};
    for (size_t i = 0; args[i] != NULL && i < 10; i++)
        argv[i + 1] = args[i];
    cr_assert_eq(bgt_run(argv, env, out, sizeof(out)), 0, "bgctl %s: %s", args[0], out);
}

/* Registers a user and creates an API key; with plan, grants it for 30 days. */
static void new_user(const char *email, const char *locale, const char *plan, user_t *u)
{
    char body[512];
    snprintf(body, sizeof(body),
             "{\"email\":\"%s\",\"password\":\"" PASSWORD "\",\"locale\":\"%s\"}", email, locale);
    call_t c = {.method = "POST", .path = "/auth/register", .body = body};
    cr_assert_eq(call(&c), 201, "%s", c.resp.body);
    get_str(c.resp.body, (const char *const[]){"access_token", NULL}, u->token, sizeof(u->token));
    get_str(c.resp.body, (const char *const[]){"user", "id", NULL}, u->id, sizeof(u->id));
    bgt_resp_free(&c.resp);
    u->shard = bg_shard_of(u->id, SHARDS);

    call_t k = {.method = "POST",
                .path = "/auth/api-keys",
                .token = u->token,
                .body = "{\"name\":\"tests\"}"};
    cr_assert_eq(call(&k), 201, "%s", k.resp.body);
    get_str(k.resp.body, (const char *const[]){"key", NULL}, u->key, sizeof(u->key));
    cr_assert(u->key[0] != '\0', "%s", k.resp.body);
    bgt_resp_free(&k.resp);
    if (plan != NULL)
        bgctl((const char *const[]){"plan", "grant", "--user", u->id, "--plan", plan, "--days",
                                    "30", NULL});
}

/* ---- playing the worker ---- */

typedef struct st_job {
    char job_id[64];
    char channel[16];
    char agent_id[64];
    char max_tokens[24];
    char temperature[24];
    char locale[16];
    char messages[4096];
} job_t;

static void take_field(const redisReply *fields, const char *name, char *out, size_t outlen)
{
    out[0] = '\0';
    for (size_t i = 0; i + 1 < fields->elements; i += 2) {
        if (strcmp(fields->element[i]->str, name) == 0)
            snprintf(out, outlen, "%s", fields->element[i + 1]->str);
    }
}

/* Waits for the (seen + 1)-th job in the user's llm queue and reads it. */
static void wait_job(const user_t *u, size_t seen, job_t *j)
{
    char key[128];
    snprintf(key, sizeof(key), "bg:{s%d}:q:llm", u->shard);
    long long deadline = bgt_now_ms() + 20000;
    for (;;) {
        redisReply *r = NULL;
        cr_assert_eq(bg_redis_command(S.r, &r, "XRANGE %s - +", key), 0);
        if (r->elements > seen) {
            const redisReply *f = r->element[seen]->element[1];
            take_field(f, "job_id", j->job_id, sizeof(j->job_id));
            take_field(f, "channel", j->channel, sizeof(j->channel));
            take_field(f, "agent_id", j->agent_id, sizeof(j->agent_id));
            take_field(f, "max_tokens", j->max_tokens, sizeof(j->max_tokens));
            take_field(f, "temperature", j->temperature, sizeof(j->temperature));
            take_field(f, "locale", j->locale, sizeof(j->locale));
            take_field(f, "messages", j->messages, sizeof(j->messages));
            freeReplyObject(r);
            return;
        }
        freeReplyObject(r);
        cr_assert(bgt_now_ms() < deadline, "no job %zu in %s", seen + 1, key);
        usleep(20 * 1000);
    }
}

static void emit(const user_t *u, const char *job_id, const char *type, const char *data)
{
    char key[128], chan[64];
    snprintf(key, sizeof(key), "bg:{s%d}:out:%s", u->shard, job_id);
    snprintf(chan, sizeof(chan), "bg:{s%d}:out", u->shard);
    redisReply *r = NULL;
    cr_assert_eq(bg_redis_command(S.r, &r, "XADD %s * type %s data %s", key, type, data), 0);
    cr_assert_eq(r->type, REDIS_REPLY_STRING);
    freeReplyObject(r);
    cr_assert_eq(bg_redis_command(S.r, &r, "PUBLISH %s %s", chan, job_id), 0);
    freeReplyObject(r);
}

#define DONE_DATA                                                                                  \
    "{\"message_id\":\"\",\"finish_reason\":\"stop\",\"model\":\"demo-1\",\"cached\":false,"       \
    "\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":2,\"source\":\"provider\"}}"

/* Starts c in a thread (it blocks until the response ends). */
static pthread_t start(call_t *c)
{
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, call_thread, c), 0);
    return t;
}

static void finish(pthread_t t, call_t *c)
{
    pthread_join(t, NULL);
    cr_assert_eq(c->rc, 0, "%s: %s", c->path, c->resp.error);
}

/* ---- tests ---- */

Test(openai_api, keys_are_required_and_checked_in_openais_error_shape)
{
    call_t c = {.method = "GET", .path = "/v1/models"};
    call(&c);
    expect_oai_error(&c, 401, "invalid_request_error", "invalid_api_key", NULL);
    bgt_resp_free(&c.resp);

    call_t bad = {.method = "GET", .path = "/v1/models", .token = "bgk_not-a-real-key"};
    call(&bad);
    expect_oai_error(&bad, 401, "invalid_request_error", "invalid_api_key", NULL);
    bgt_resp_free(&bad.resp);

    /* an access token is not an API key */
    user_t u;
    new_user("keys@openai.example", "en", NULL, &u);
    call_t jwt = {.method = "GET", .path = "/v1/models", .token = u.token};
    call(&jwt);
    expect_oai_error(&jwt, 401, "invalid_request_error", "invalid_api_key", NULL);
    bgt_resp_free(&jwt.resp);

    /* unknown /v1 paths speak OpenAI's shape too */
    call_t nf = {.method = "GET", .path = "/v1/nothing", .token = u.key};
    call(&nf);
    cr_expect_eq(nf.resp.status, 404);
    char type[64];
    get_str(nf.resp.body, (const char *const[]){"error", "type", NULL}, type, sizeof(type));
    cr_expect_str_eq(type, "invalid_request_error", "%s", nf.resp.body);
    bgt_resp_free(&nf.resp);

    /* a revoked key stops working at once */
    call_t list = {.method = "GET", .path = "/auth/api-keys", .token = u.token};
    cr_assert_eq(call(&list), 200);
    char key_id[64];
    bg_json_doc_t *doc = parse(list.resp.body, list.resp.body_len);
    const bg_json_t *first = bg_json_at(bg_json_find(bg_json_root(doc), "data"), 0);
    size_t len = 0;
    const char *id = bg_json_str(bg_json_find(first, "id"), &len);
    cr_assert(id != NULL && len < sizeof(key_id));
    memcpy(key_id, id, len);
    key_id[len] = '\0';
    bg_json_doc_free(doc);
    bgt_resp_free(&list.resp);
    call_t ok = {.method = "GET", .path = "/v1/models", .token = u.key};
    cr_expect_eq(call(&ok), 200, "%s", ok.resp.body);
    bgt_resp_free(&ok.resp);
    call_t del = {.method = "DELETE", .token = u.token};
    snprintf(del.path, sizeof(del.path), "/auth/api-keys/%s", key_id);
    cr_assert_eq(call(&del), 204, "%s", del.resp.body);
    bgt_resp_free(&del.resp);
    call_t gone = {.method = "GET", .path = "/v1/models", .token = u.key};
    call(&gone);
    expect_oai_error(&gone, 401, "invalid_request_error", "invalid_api_key", NULL);
    bgt_resp_free(&gone.resp);
}

Test(openai_api, models_are_the_agents_the_key_may_use)
{
    user_t u;
    new_user("models@openai.example", "en", "monthly", &u);
    call_t c = {.method = "GET", .path = "/v1/models", .token = u.key};
    cr_assert_eq(call(&c), 200, "%s", c.resp.body);
    char object[32], id[64];
    get_str(c.resp.body, (const char *const[]){"object", NULL}, object, sizeof(object));
    cr_expect_str_eq(object, "list");
    cr_expect(strstr(c.resp.body, "\"id\":\"assistant\"") != NULL, "%s", c.resp.body);
    cr_expect(strstr(c.resp.body, "\"object\":\"model\"") != NULL, "%s", c.resp.body);
    bgt_resp_free(&c.resp);

    call_t one = {.method = "GET", .path = "/v1/models/assistant", .token = u.key};
    cr_assert_eq(call(&one), 200, "%s", one.resp.body);
    get_str(one.resp.body, (const char *const[]){"id", NULL}, id, sizeof(id));
    cr_expect_str_eq(id, "assistant");
    cr_expect_gt(get_int(one.resp.body, (const char *const[]){"created", NULL}), 1600000000);
    bgt_resp_free(&one.resp);

    call_t none = {.method = "GET", .path = "/v1/models/no-such-model", .token = u.key};
    call(&none);
    expect_oai_error(&none, 404, "invalid_request_error", "model_not_found", "model");
    cr_expect(strstr(none.resp.body, "no-such-model") != NULL, "%s", none.resp.body);
    bgt_resp_free(&none.resp);
}

Test(openai_api, bad_requests_are_400_naming_the_parameter)
{
    user_t u;
    new_user("bad@openai.example", "en", "monthly", &u);
    static const struct {
        const char *body;
        const char *param;
    } cases[] = {
        {"{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", "model"},
        {"{\"model\":\"assistant\"}", "messages"},
        {"{\"model\":\"assistant\",\"messages\":[]}", "messages"},
        {"{\"model\":\"assistant\",\"messages\":[{\"role\":\"wizard\",\"content\":\"hi\"}]}",
         "messages[0].role"},
        {"{\"model\":\"assistant\",\"messages\":[{\"role\":\"user\"}]}", "messages[0].content"},
        {"{\"model\":\"assistant\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
         "\"image_url\",\"image_url\":{\"url\":\"x\"}}]}]}",
         "messages[0].content[0]"},
        {"{\"model\":\"assistant\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],"
         "\"temperature\":3}",
         "temperature"},
        {"{\"model\":\"assistant\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],"
         "\"max_tokens\":0}",
         "max_tokens"},
        {"{\"model\":\"assistant\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],"
         "\"stream_options\":{\"include_usage\":true}}",
         "stream_options"},
        {"{\"model\":\"assistant\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],"
         "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}]}",
         "tools"},
        {"{\"model\":\"assistant\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],"
         "\"n\":2}",
         "n"},
        {"{\"model\":\"assistant\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],"
         "\"frobnicate\":1}",
         "frobnicate"},
    };
    for (size_t i = 0; i < BG_ARRAY_SIZE(cases); i++) {
        call_t c = {.method = "POST",
                    .path = "/v1/chat/completions",
                    .token = u.key,
                    .body = cases[i].body};
        call(&c);
        expect_oai_error(&c, 400, "invalid_request_error", "invalid_value", cases[i].param);
        char h[16];
        cr_expect_not_null(bgt_resp_header(&c.resp, "x-should-retry", h, sizeof(h)));
        cr_expect_str_eq(h, "false");
        bgt_resp_free(&c.resp);
    }
    call_t m = {.method = "POST", .path = "/v1/chat/completions", .token = u.key, .body = "{oops"};
    call(&m);
    expect_oai_error(&m, 400, "invalid_request_error", NULL, NULL);
    bgt_resp_free(&m.resp);

    /* nothing was enqueued by any of them */
    char key[128];
    snprintf(key, sizeof(key), "bg:{s%d}:q:llm", u.shard);
    redisReply *r = NULL;
    cr_assert_eq(bg_redis_command(S.r, &r, "XLEN %s", key), 0);
    cr_expect_eq(r->integer, 0);
    freeReplyObject(r);
}

Test(openai_api, a_plan_without_api_access_gets_403)
{
    user_t u;
    new_user("trial@openai.example", "es", NULL, &u); /* the trial has no API access */
    call_t c = {.method = "POST",
                .path = "/v1/chat/completions",
                .token = u.key,
                .body = "{\"model\":\"assistant\",\"messages\":[{\"role\":\"user\",\"content\":"
                        "\"hola\"}]}"};
    call(&c);
    expect_oai_error(&c, 403, "permission_error", "feature_not_in_plan", NULL);
    char msg[512], h[16];
    get_str(c.resp.body, (const char *const[]){"error", "message", NULL}, msg, sizeof(msg));
    cr_expect(strstr(msg, "monthly") != NULL, "the plans that help are named: %s", msg);
    cr_expect(strstr(msg, "This feature") == NULL, "in the user's language (es): %s", msg);
    cr_expect_not_null(bgt_resp_header(&c.resp, "x-should-retry", h, sizeof(h)));
    cr_expect_str_eq(h, "false");
    bgt_resp_free(&c.resp);
}

Test(openai_api, a_completion_is_one_job_and_one_json_answer)
{
    user_t u;
    new_user("json@openai.example", "en", "monthly", &u);
    call_t c = {.method = "POST",
                .path = "/v1/chat/completions",
                .token = u.key,
                .body = "{\"model\":\"assistant\",\"messages\":[{\"role\":\"developer\","
                        "\"content\":\"Be brief.\"},{\"role\":\"user\",\"content\":[{\"type\":"
                        "\"text\",\"text\":\"Hello\"},{\"type\":\"text\",\"text\":\"there\"}]}],"
                        "\"max_completion_tokens\":64,\"max_tokens\":9,\"temperature\":0,"
                        "\"user\":\"u-1\",\"top_p\":1}"};
    pthread_t t = start(&c);
    job_t j;
    wait_job(&u, 0, &j);
    cr_expect_str_eq(j.channel, "api");
    cr_expect_str_eq(j.max_tokens, "64", "max_completion_tokens wins over max_tokens");
    cr_expect_str_eq(j.temperature, "0");
    cr_expect_str_eq(j.messages, "[{\"role\":\"developer\",\"content\":\"Be brief.\"},"
                                 "{\"role\":\"user\",\"content\":\"Hello\\nthere\"}]");
    cr_expect(j.agent_id[0] != '\0');
    emit(&u, j.job_id, "delta", "{\"text\":\"Hi \"}");
    emit(&u, j.job_id, "delta", "{\"text\":\"you\"}");
    emit(&u, j.job_id, "done", DONE_DATA);
    finish(t, &c);

    cr_assert_eq(c.resp.status, 200, "%s", c.resp.body);
    char v[256], hex[40];
    get_str(c.resp.body, (const char *const[]){"object", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, "chat.completion");
    get_str(c.resp.body, (const char *const[]){"model", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, "assistant");
    get_str(c.resp.body, (const char *const[]){"id", NULL}, v, sizeof(v));
    size_t n = 0;
    for (const char *p = j.job_id; *p != '\0'; p++) {
        if (*p != '-')
            hex[n++] = *p;
    }
    hex[n] = '\0';
    cr_expect(strncmp(v, "chatcmpl-", 9) == 0 && strcmp(v + 9, hex) == 0, "id %s", v);
    cr_expect(strstr(c.resp.body, "\"message\":{\"role\":\"assistant\",\"content\":\"Hi you\"") !=
                  NULL,
              "%s", c.resp.body);
    cr_expect(strstr(c.resp.body, "\"finish_reason\":\"stop\"") != NULL, "%s", c.resp.body);
    cr_expect_eq(get_int(c.resp.body, (const char *const[]){"usage", "prompt_tokens", NULL}), 11);
    cr_expect_eq(get_int(c.resp.body, (const char *const[]){"usage", "completion_tokens", NULL}),
                 2);
    cr_expect_eq(get_int(c.resp.body, (const char *const[]){"usage", "total_tokens", NULL}), 13);
    char h[128];
    cr_expect_not_null(bgt_resp_header(&c.resp, "content-type", h, sizeof(h)));
    cr_expect(strncmp(h, "application/json", 16) == 0, "%s", h);
    cr_expect_not_null(bgt_resp_header(&c.resp, "x-request-id", h, sizeof(h)));
    cr_expect_not_null(bgt_resp_header(&c.resp, "x-ratelimit-remaining-requests", h, sizeof(h)));
    cr_expect_not_null(bgt_resp_header(&c.resp, "x-quota-remaining", h, sizeof(h)));
    cr_expect_str_eq(h, "9999", "one of the monthly plan's 10,000 requests is used");
    bgt_resp_free(&c.resp);
}

Test(openai_api, a_stream_is_chunks_usage_and_done)
{
    user_t u;
    new_user("stream@openai.example", "en", "yearly", &u);
    call_t c = {.method = "POST",
                .path = "/v1/chat/completions",
                .token = u.key,
                .body = "{\"model\":\"assistant\",\"messages\":[{\"role\":\"user\",\"content\":"
                        "\"Hi\"}],\"stream\":true,\"stream_options\":{\"include_usage\":true}}"};
    pthread_t t = start(&c);
    job_t j;
    wait_job(&u, 0, &j);
    emit(&u, j.job_id, "delta", "{\"text\":\"Hel\"}");
    emit(&u, j.job_id, "delta", "{\"text\":\"lo\"}");
    emit(&u, j.job_id, "done", DONE_DATA);
    finish(t, &c);
    cr_assert_eq(c.resp.status, 200, "%s", c.resp.body);
    char h[128];
    cr_expect_not_null(bgt_resp_header(&c.resp, "content-type", h, sizeof(h)));
    cr_expect(strncmp(h, "text/event-stream", 17) == 0, "%s", h);

    /* data: lines only, every chunk parses, the text is assembled once, the end is [DONE] */
    char text[256] = "";
    size_t text_len = 0;
    int roles = 0, finishes = 0, usages = 0, events = 0;
    bool done = false;
    char *copy = bg_strndup(c.resp.body, c.resp.body_len);
    for (char *line = copy, *next; line != NULL; line = next) {
        char *nl = strchr(line, '\n');
        next = nl != NULL ? nl + 1 : NULL;
        if (nl != NULL)
            *nl = '\0';
        if (line[0] == ':' || line[0] == '\0')
            continue;
        cr_assert(strncmp(line, "data: ", 6) == 0, "not a data line: %s", line);
        cr_expect_not(done, "nothing after [DONE]: %s", line);
        if (strcmp(line + 6, "[DONE]") == 0) {
            done = true;
            continue;
        }
        events++;
        bg_json_doc_t *doc = parse(line + 6, strlen(line + 6));
        const bg_json_t *root = bg_json_root(doc);
        const char *s = NULL;
        cr_expect_eq(bg_json_get_str(root, "object", &s), 0);
        cr_expect_str_eq(s, "chat.completion.chunk");
        const bg_json_t *choices = bg_json_find(root, "choices");
        if (bg_json_len(choices) == 0) {
            usages++;
            int64_t total = 0;
            cr_expect_eq(bg_json_get_int(bg_json_find(root, "usage"), "total_tokens", &total), 0);
            cr_expect_eq(total, 13);
        } else {
            const bg_json_t *ch = bg_json_at(choices, 0);
            const bg_json_t *delta = bg_json_find(ch, "delta");
            if (bg_json_find(delta, "role") != NULL)
                roles++;
            size_t len = 0;
            const bg_json_t *content = bg_json_find(delta, "content");
            const char *piece = content != NULL ? bg_json_str(content, &len) : NULL;
            if (piece != NULL && text_len + len < sizeof(text)) {
                memcpy(text + text_len, piece, len);
                text_len += len;
                text[text_len] = '\0';
            }
            const bg_json_t *fr = bg_json_find(ch, "finish_reason");
            if (fr != NULL && bg_json_str(fr, &len) != NULL)
                finishes++;
        }
        bg_json_doc_free(doc);
    }
    free(copy);
    cr_expect_str_eq(text, "Hello");
    cr_expect_eq(roles, 1, "the role comes once, first");
    cr_expect_eq(finishes, 1);
    cr_expect_eq(usages, 1);
    cr_expect_eq(events, 4, "role+Hel, lo, finish, usage: %s", c.resp.body);
    cr_expect(done, "ends with data: [DONE]: %s", c.resp.body);
    bgt_resp_free(&c.resp);
}

Test(openai_api, failures_before_output_are_error_responses_and_after_it_error_events)
{
    user_t u;
    new_user("fail@openai.example", "en", "monthly", &u);
    /* the test settles nothing, so the concurrency cap would count every job as running */
    cr_assert_eq(bgt_adm_set(S.r, SHARDS, u.id, "conc", 100), 0);
    const char *ns = "{\"model\":\"assistant\",\"messages\":[{\"role\":\"user\",\"content\":"
                     "\"x\"}]}";
    const char *st = "{\"model\":\"assistant\",\"messages\":[{\"role\":\"user\",\"content\":"
                     "\"x\"}],\"stream\":true}";

    /* the provider failed before any token: 502, retryable */
    call_t a = {.method = "POST", .path = "/v1/chat/completions", .token = u.key, .body = st};
    pthread_t t = start(&a);
    job_t j;
    wait_job(&u, 0, &j);
    emit(&u, j.job_id, "error", "{\"code\":\"provider_error\",\"retryable\":true}");
    finish(t, &a);
    expect_oai_error(&a, 502, "server_error", "provider_error", NULL);
    char h[16];
    cr_expect_not_null(bgt_resp_header(&a.resp, "x-should-retry", h, sizeof(h)));
    cr_expect_str_eq(h, "true");
    bgt_resp_free(&a.resp);

    /* a timeout: 504 */
    call_t b = {.method = "POST", .path = "/v1/chat/completions", .token = u.key, .body = ns};
    t = start(&b);
    wait_job(&u, 1, &j);
    emit(&u, j.job_id, "error", "{\"code\":\"provider_timeout\",\"retryable\":true}");
    finish(t, &b);
    expect_oai_error(&b, 504, "server_error", "provider_timeout", NULL);
    bgt_resp_free(&b.resp);

    /* after output started: an error event and no [DONE] */
    call_t c = {.method = "POST", .path = "/v1/chat/completions", .token = u.key, .body = st};
    t = start(&c);
    wait_job(&u, 2, &j);
    emit(&u, j.job_id, "delta", "{\"text\":\"partial\"}");
    emit(&u, j.job_id, "error", "{\"code\":\"provider_error\",\"retryable\":true}");
    finish(t, &c);
    cr_expect_eq(c.resp.status, 200);
    cr_expect(strstr(c.resp.body, "partial") != NULL, "%s", c.resp.body);
    cr_expect(strstr(c.resp.body, "data: {\"error\":{") != NULL, "%s", c.resp.body);
    cr_expect(strstr(c.resp.body, "[DONE]") == NULL, "%s", c.resp.body);
    bgt_resp_free(&c.resp);

    /* a redelivered job starts over: the JSON answer has only the complete reply */
    call_t d = {.method = "POST", .path = "/v1/chat/completions", .token = u.key, .body = ns};
    t = start(&d);
    wait_job(&u, 3, &j);
    emit(&u, j.job_id, "delta", "{\"text\":\"Half a rep\"}");
    emit(&u, j.job_id, "reset", "{}");
    emit(&u, j.job_id, "delta", "{\"text\":\"The whole reply\"}");
    emit(&u, j.job_id, "done", DONE_DATA);
    finish(t, &d);
    cr_assert_eq(d.resp.status, 200, "%s", d.resp.body);
    cr_expect(strstr(d.resp.body, "\"content\":\"The whole reply\"") != NULL, "%s", d.resp.body);
    cr_expect(strstr(d.resp.body, "Half") == NULL, "%s", d.resp.body);
    bgt_resp_free(&d.resp);
}

Test(openai_api, an_exhausted_quota_is_429_insufficient_quota_in_the_users_language)
{
    user_t u;
    new_user("quota@openai.example", "ru", "monthly", &u);
    cr_assert_eq(bgt_adm_set(S.r, SHARDS, u.id, "q_limit", 0), 0);
    call_t c = {.method = "POST",
                .path = "/v1/chat/completions",
                .token = u.key,
                .body = "{\"model\":\"assistant\",\"messages\":[{\"role\":\"user\",\"content\":"
                        "\"x\"}]}"};
    call(&c);
    expect_oai_error(&c, 429, "insufficient_quota", "insufficient_quota", NULL);
    char msg[512], h[64];
    get_str(c.resp.body, (const char *const[]){"error", "message", NULL}, msg, sizeof(msg));
    cr_expect(strstr(msg, "You have used") == NULL, "in Russian: %s", msg);
    cr_expect_not_null(bgt_resp_header(&c.resp, "x-should-retry", h, sizeof(h)));
    cr_expect_str_eq(h, "false", "the client must not retry a spent quota");
    cr_expect_not_null(bgt_resp_header(&c.resp, "retry-after", h, sizeof(h)));
    cr_expect_not_null(bgt_resp_header(&c.resp, "x-quota-remaining", h, sizeof(h)));
    cr_expect_str_eq(h, "0");
    bgt_resp_free(&c.resp);
}
