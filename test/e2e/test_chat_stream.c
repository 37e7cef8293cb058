/*
 * A chat turn end to end on the edge's side: the real bg-edge over HTTP/2 (h2c, curl) against a
 * private Redis and a migrated database. The llm worker is not started: each test plays it, reading
 * the job the admission script enqueued (bg:{s<N>}:q:llm) and appending to the job's output stream
 * (bg:{s<N>}:out:<job id>) with a PUBLISH after each append, exactly as the contract of
 * docs/streaming.md says. What is checked is what a client sees: the events in order with their
 * ids, the end after done, resuming on any edge without duplicates, 404 for another user's job,
 * cancellation, the 429 of an exhausted quota with its headers and a localized message, the
 * open-streams gauge, and 50 streams at once.
 */
#include <criterion/criterion.h>
#include <curl/curl.h>
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
#include "bg/sse.h"
#include "bgtest.h"
#include "bgtest_adm.h"

#define PASSWORD "Stream-Horse-Battery-42"
#define SHARDS 16
#define MAX_EVENTS 64
#define MAX_JOBS 64

static struct {
    bgt_redis_t redis;
    bgt_pg_t db;
    char dir[256];
    char base[64], base2[64];
    pid_t pid, pid2;
    bg_redis_t *r;
} S;

static pid_t spawn_edge(int port, const char *log)
{
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
                         "BG_JWT_SECRET=0123456789abcdef0123456789abcdef-streams",
                         NULL};
    const char *argv[] = {bgt_bin("bg-edge"), NULL};
    pid_t pid = bgt_spawn(argv, env, log);
    cr_assert(pid > 0);
    char url[128];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/healthz", port);
    cr_assert_eq(bgt_wait_http(url, 200, 10000), 0, "bg-edge did not come up; see %s", log);
    return pid;
}

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
    S.pid = spawn_edge(port, log);
    cr_assert_eq(bg_redis_new(S.redis.url, 3000, &S.r), 0);
}

static void teardown(void)
{
    if (S.pid > 0)
        bgt_stop(S.pid, SIGKILL, 2000);
    if (S.pid2 > 0)
        bgt_stop(S.pid2, SIGKILL, 2000);
    bg_redis_free(S.r);
    bgt_redis_stop(&S.redis);
    bgt_pg_drop(&S.db);
    bgt_rmtree(S.dir);
}

TestSuite(chat_stream, .init = setup, .fini = teardown, .timeout = 240);

/* ---- HTTP ---- */

typedef struct st_call {
    const char *base;
    const char *method;
    char path[256];
    const char *token;
    const char *body;
    const char *extra[3]; /* more "Name: value" headers, NULL-terminated */
    bgt_resp_t resp;
    int rc;
} call_t;

static void call_run(call_t *c)
{
    char url[512], authz[2100];
    const char *headers[8];
    size_t n = 0;
    snprintf(url, sizeof(url), "%s%s", c->base != NULL ? c->base : S.base, c->path);
    if (c->token != NULL) {
        snprintf(authz, sizeof(authz), "Authorization: Bearer %s", c->token);
        headers[n++] = authz;
    }
    if (c->body != NULL)
        headers[n++] = "Content-Type: application/json";
    for (size_t i = 0; i < 3 && c->extra[i] != NULL; i++)
        headers[n++] = c->extra[i];
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

static void get_str(const char *text, const char *const path[], char *out, size_t outlen)
{
    bg_json_doc_t *doc = NULL;
    const char *desc;
    size_t off, len = 0;
    cr_assert_eq(bg_json_parse(text, strlen(text), NULL, &doc, &desc, &off), 0, "%s", text);
    const bg_json_t *v = bg_json_root(doc);
    for (size_t i = 0; path[i] != NULL && v != NULL; i++)
        v = bg_json_find(v, path[i]);
    const char *s = v != NULL ? bg_json_str(v, &len) : NULL;
    cr_assert(s != NULL && len < outlen, "no string %s in %s", path[0], text);
    memcpy(out, s, len);
    out[len] = '\0';
    bg_json_doc_free(doc);
}

typedef struct st_user {
    char id[64];
    char token[2048];
    char conv[64];
    int shard;
} user_t;

/* Registers a user (locale optional) and starts a conversation with the assistant. */
static void new_user(const char *email, const char *locale, user_t *u)
{
    char body[512];
    if (locale != NULL)
        snprintf(body, sizeof(body),
                 "{\"email\":\"%s\",\"password\":\"" PASSWORD "\",\"locale\":\"%s\"}", email,
                 locale);
    else
        snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"" PASSWORD "\"}", email);
    call_t c = {.method = "POST", .path = "/auth/register", .body = body};
    cr_assert_eq(call(&c), 201, "%s", c.resp.body);
    get_str(c.resp.body, (const char *const[]){"access_token", NULL}, u->token, sizeof(u->token));
    get_str(c.resp.body, (const char *const[]){"user", "id", NULL}, u->id, sizeof(u->id));
    bgt_resp_free(&c.resp);
    u->shard = bg_shard_of(u->id, SHARDS);

    call_t a = {.method = "GET", .path = "/agents", .token = u->token};
    cr_assert_eq(call(&a), 200, "%s", a.resp.body);
    bg_json_doc_t *doc = NULL;
    const char *desc;
    size_t off, len = 0;
    cr_assert_eq(bg_json_parse(a.resp.body, a.resp.body_len, NULL, &doc, &desc, &off), 0);
    const bg_json_t *first = bg_json_at(bg_json_find(bg_json_root(doc), "data"), 0);
    const char *agent = bg_json_str(bg_json_find(first, "id"), &len);
    cr_assert(agent != NULL && len < 64, "no agent in %s", a.resp.body);
    snprintf(body, sizeof(body), "{\"agent_id\":\"%.*s\"}", (int)len, agent);
    bg_json_doc_free(doc);
    bgt_resp_free(&a.resp);

    call_t cc = {.method = "POST", .path = "/chat/conversations", .token = u->token, .body = body};
    cr_assert_eq(call(&cc), 201, "%s", cc.resp.body);
    get_str(cc.resp.body, (const char *const[]){"id", NULL}, u->conv, sizeof(u->conv));
    bgt_resp_free(&cc.resp);
}

/* ---- playing the worker ---- */

static redisReply *redis(const char *fmt, const char *a, const char *b, const char *c,
                         const char *d)
{
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_command(S.r, &reply, fmt, a, b, c, d), 0, "redis: %s", fmt);
    return reply;
}

typedef struct st_job {
    char job_id[64];
    char user_id[64];
    char conversation_id[64];
    char agent_id[64];
    char content[64];
    char channel[16];
    char locale[16];
} job_t;

static void take_field(const redisReply *fields, const char *name, char *out, size_t outlen)
{
    out[0] = '\0';
    for (size_t i = 0; i + 1 < fields->elements; i += 2) {
        if (strcmp(fields->element[i]->str, name) == 0)
            snprintf(out, outlen, "%s", fields->element[i + 1]->str);
    }
}

/* Waits until the llm queue of shard holds more than `seen` jobs; reads them (from `seen` on)
 * into jobs and returns how many there are now. */
static size_t wait_jobs(int shard, size_t seen, size_t want, job_t *jobs)
{
    char key[128];
    snprintf(key, sizeof(key), "bg:{s%d}:q:llm", shard);
    long long deadline = bgt_now_ms() + 20000;
    for (;;) {
        redisReply *r = redis("XRANGE %s - +", key, NULL, NULL, NULL);
        size_t n = r->elements;
        if (n >= seen + want) {
            for (size_t i = seen; i < n && i - seen < MAX_JOBS; i++) {
                const redisReply *f = r->element[i]->element[1];
                job_t *j = &jobs[i - seen];
                take_field(f, "job_id", j->job_id, sizeof(j->job_id));
                take_field(f, "user_id", j->user_id, sizeof(j->user_id));
                take_field(f, "conversation_id", j->conversation_id, sizeof(j->conversation_id));
                take_field(f, "agent_id", j->agent_id, sizeof(j->agent_id));
                take_field(f, "content", j->content, sizeof(j->content));
                take_field(f, "channel", j->channel, sizeof(j->channel));
                take_field(f, "locale", j->locale, sizeof(j->locale));
            }
            freeReplyObject(r);
            return n;
        }
        freeReplyObject(r);
        cr_assert(bgt_now_ms() < deadline, "only %zu jobs in %s, want %zu", n, key, seen + want);
        usleep(20 * 1000);
    }
}

/* Appends one event to a job's output and announces it; writes the entry id into id. */
static void emit(int shard, const char *job_id, const char *type, const char *data, char *id,
                 size_t idlen)
{
    char key[128], chan[64];
    snprintf(key, sizeof(key), "bg:{s%d}:out:%s", shard, job_id);
    snprintf(chan, sizeof(chan), "bg:{s%d}:out", shard);
    redisReply *r = redis("XADD %s * type %s data %s", key, type, data, NULL);
    cr_assert_eq(r->type, REDIS_REPLY_STRING);
    if (id != NULL)
        snprintf(id, idlen, "%s", r->str);
    freeReplyObject(r);
    r = redis("PUBLISH %s %s", chan, job_id, NULL, NULL);
    freeReplyObject(r);
}

/* ---- reading an event stream ---- */

typedef struct st_events {
    size_t n;
    char id[MAX_EVENTS][48];
    char type[MAX_EVENTS][16];
    char *data[MAX_EVENTS];
} events_t;

static int on_event(void *ud, const bg_sse_event_t *ev)
{
    events_t *e = ud;
    cr_assert_lt(e->n, MAX_EVENTS);
    snprintf(e->id[e->n], sizeof(e->id[0]), "%s", ev->id);
    snprintf(e->type[e->n], sizeof(e->type[0]), "%s", ev->event);
    e->data[e->n] = bg_strndup(ev->data, ev->data_len);
    e->n++;
    return 0;
}

static void parse_events(const bgt_resp_t *r, events_t *e)
{
    memset(e, 0, sizeof(*e));
    char ct[128];
    cr_assert_not_null(bgt_resp_header(r, "content-type", ct, sizeof(ct)));
    cr_assert(strncmp(ct, "text/event-stream", 17) == 0, "content-type %s", ct);
    bg_sse_parser_t p;
    bg_sse_parser_init(&p, NULL, on_event, e);
    cr_assert_eq(bg_sse_feed(&p, r->body, r->body_len), 0);
    cr_assert_not(bg_sse_finish(&p), "the stream ended inside an event: %s", r->body);
    bg_sse_parser_dispose(&p);
}

static void events_free(events_t *e)
{
    for (size_t i = 0; i < e->n; i++)
        free(e->data[i]);
}

/* ---- metrics ---- */

static double streams_open(const char *base)
{
    call_t c = {.base = base, .method = "GET", .path = "/metrics"};
    cr_assert_eq(call(&c), 200);
    const char *line = strstr(c.resp.body, "\nbg_sse_streams_open ");
    double v = line != NULL ? strtod(line + strlen("\nbg_sse_streams_open "), NULL) : 0;
    bgt_resp_free(&c.resp);
    return v;
}

static void wait_streams_open(const char *base, double want)
{
    long long deadline = bgt_now_ms() + 10000;
    while (streams_open(base) != want) {
        cr_assert(bgt_now_ms() < deadline, "bg_sse_streams_open is %g, want %g", streams_open(base),
                  want);
        usleep(20 * 1000);
    }
}

/* Gives the user room for many turns (the state is compiled by the first turn). */
static void generous_limits(const user_t *u)
{
    /* through the compiler's writer, so the script's packed copy agrees (bgtest_adm.h) */
    cr_assert_eq(bgt_adm_set(S.r, SHARDS, u->id, "q_limit", 100000), 0);
    cr_assert_eq(bgt_adm_set(S.r, SHARDS, u->id, "rpm", 100000), 0);
    cr_assert_eq(bgt_adm_set(S.r, SHARDS, u->id, "burst", 10000), 0);
    cr_assert_eq(bgt_adm_set(S.r, SHARDS, u->id, "conc", 1000), 0);
    /* the theoretical arrival time the plan's own rate limit left (seconds ahead) goes too */
    char key[160];
    snprintf(key, sizeof(key), "bg:{s%d}:quota:%s", u->shard, u->id);
    redisReply *r = redis("HDEL %s tat", key, NULL, NULL, NULL);
    freeReplyObject(r);
}

static void post_message(call_t *c, const user_t *u, const char *content, bool async)
{
    static char bodies[MAX_JOBS][256];
    static int next;
    char *body = bodies[next++ % MAX_JOBS];
    snprintf(body, 256, "{\"content\":\"%s\"}", content);
    memset(c, 0, sizeof(*c));
    c->method = "POST";
    snprintf(c->path, sizeof(c->path), "/chat/conversations/%s/messages", u->conv);
    c->token = u->token;
    c->body = body;
    if (async)
        c->extra[0] = "Prefer: respond-async";
}

/* ---- tests ---- */

Test(chat_stream, a_posted_message_streams_the_workers_output_until_done)
{
    user_t u;
    new_user("stream@chat.example", NULL, &u);
    call_t c;
    post_message(&c, &u, "Hello there", false);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, call_thread, &c), 0);

    job_t job;
    wait_jobs(u.shard, 0, 1, &job);
    cr_expect_str_eq(job.user_id, u.id);
    cr_expect_str_eq(job.conversation_id, u.conv);
    cr_expect_str_eq(job.channel, "web");
    cr_expect(job.agent_id[0] != '\0' && job.locale[0] != '\0');
    /* the job carries the message: the worker stores it (nothing in Postgres on the edge's path) */
    cr_expect_str_eq(job.content, "Hello there");
    wait_streams_open(S.base, 1);

    char ids[4][48];
    emit(u.shard, job.job_id, "delta", "{\"text\":\"Hel\"}", ids[0], 48);
    emit(u.shard, job.job_id, "delta", "{\"text\":\"lo!\"}", ids[1], 48);
    emit(u.shard, job.job_id, "delta", "{\"text\":\" Bye\"}", ids[2], 48);
    emit(u.shard, job.job_id, "done",
         "{\"message_id\":\"7\",\"finish_reason\":\"stop\",\"usage\":{\"prompt_tokens\":3},"
         "\"quota\":{\"limit\":50,\"remaining\":49,\"reset_at\":\"2030-01-01T00:00:00Z\"}}",
         ids[3], 48);
    cr_assert_eq(pthread_join(t, NULL), 0);
    cr_assert_eq(c.rc, 0, "%s", c.resp.error);
    cr_assert_eq(c.resp.status, 200, "%s", c.resp.body);
    cr_expect_eq(c.resp.version, 2);
    char h[64];
    cr_expect_not_null(bgt_resp_header(&c.resp, "x-quota-remaining", h, sizeof(h)));
    cr_expect_not_null(bgt_resp_header(&c.resp, "x-ratelimit-limit-requests", h, sizeof(h)));

    events_t e;
    parse_events(&c.resp, &e);
    cr_assert_eq(e.n, 4, "%s", c.resp.body);
    const char *types[] = {"delta", "delta", "delta", "done"};
    for (size_t i = 0; i < 4; i++) {
        cr_expect_str_eq(e.type[i], types[i]);
        cr_expect_str_eq(e.id[i], ids[i]);
    }
    cr_expect_str_eq(e.data[0], "{\"text\":\"Hel\"}");
    cr_expect(strstr(e.data[3], "\"finish_reason\":\"stop\"") != NULL, "%s", e.data[3]);
    events_free(&e);
    bgt_resp_free(&c.resp);
    wait_streams_open(S.base, 0);
}

static long long llm_queue_len(int shard)
{
    char key[64];
    snprintf(key, sizeof(key), "bg:{s%d}:q:llm", shard);
    redisReply *r = redis("XLEN %s", key, NULL, NULL, NULL);
    long long n = r->integer;
    freeReplyObject(r);
    return n;
}

Test(chat_stream, a_turn_is_one_redis_round_trip_and_a_revoked_session_gets_401_first)
{
    user_t u;
    new_user("session@chat.example", "ru", &u);

    /* the first turn compiles the user's admission state from Postgres (bg/policy.h) */
    call_t c;
    post_message(&c, &u, "First", true);
    cr_assert_eq(call(&c), 202, "%s", c.resp.body);
    bgt_resp_free(&c.resp);
    generous_limits(&u); /* no worker takes the first job: lift the concurrency cap */

    /* an admitted turn: the admission script checks the session, the edge sends nothing else.
     * MONITOR tells the commands clients send from those a script runs ("[0 lua]"). */
    redisContext *mon = redisConnect("127.0.0.1", S.redis.port);
    cr_assert(mon != NULL && mon->err == 0);
    redisReply *ok = redisCommand(mon, "MONITOR");
    cr_assert(ok != NULL && ok->type == REDIS_REPLY_STATUS);
    freeReplyObject(ok);
    post_message(&c, &u, "Hello", true);
    cr_assert_eq(call(&c), 202, "%s", c.resp.body);
    bgt_resp_free(&c.resp);
    redisReply *ping = redis("ECHO %s", "end-of-turn", NULL, NULL, NULL);
    freeReplyObject(ping);
    struct timeval tv = {5, 0};
    redisSetTimeout(mon, tv);
    int sent = 0, scripts = 0, script_mget = 0;
    for (;;) {
        void *line = NULL;
        cr_assert_eq(redisGetReply(mon, &line), REDIS_OK, "MONITOR stopped");
        const char *t = ((redisReply *)line)->str;
        bool from_lua = strstr(t, "[0 lua]") != NULL;
        bool end = strstr(t, "\"end-of-turn\"") != NULL;
        /* the user's own commands: not the edge's periodic reads (policy versions, …) */
        if (!from_lua && !end && strstr(t, u.id) != NULL) {
            cr_log_info("sent: %s", t);
            sent++;
            scripts += strstr(t, "\"EVALSHA\"") != NULL || strstr(t, "\"evalsha\"") != NULL;
        }
        script_mget += from_lua && (strstr(t, "\"MGET\"") != NULL || strstr(t, "\"mget\"") != NULL);
        freeReplyObject(line);
        if (end)
            break;
    }
    redisFree(mon);
    cr_assert_eq(sent, 1, "one command sent for the turn, not %d", sent);
    cr_assert_eq(scripts, 1, "and it is the admission script");
    cr_assert_eq(script_mget, 1, "which read the session state itself");

    /* any other answer is given as if the session had been read first: in the user's language,
     * with the headers set before the handler (CORS, for a browser on the same origin) */
    post_message(&c, &u, "", false);
    char origin[160], hv[200];
    snprintf(origin, sizeof(origin), "Origin: %s", S.base);
    c.extra[0] = origin;
    cr_assert_eq(call(&c), 422, "%s", c.resp.body);
    char msg[512];
    get_str(c.resp.body, (const char *const[]){"error", "message", NULL}, msg, sizeof(msg));
    cr_assert((unsigned char)msg[0] >= 0xD0, "in Russian, the user's locale: %s", msg);
    cr_assert_not_null(bgt_resp_header(&c.resp, "access-control-allow-origin", hv, sizeof(hv)),
                       "%s", c.resp.headers);
    cr_assert_str_eq(hv, S.base);
    bgt_resp_free(&c.resp);
    call_t f = {.method = "POST", .token = u.token, .body = "{\"content\":\"Hi\"}"};
    snprintf(f.path, sizeof(f.path),
             "/chat/conversations/0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b/messages");
    cr_assert_eq(call(&f), 404, "%s", f.resp.body);
    bgt_resp_free(&f.resp);

    /* signed out: 401 before anything else, and nothing admitted */
    call_t out = {.method = "POST", .path = "/auth/logout", .token = u.token, .body = "{}"};
    long st = call(&out);
    cr_assert(st == 200 || st == 204, "logout: %ld %s", st, out.resp.body);
    bgt_resp_free(&out.resp);
    long long queued = llm_queue_len(u.shard);
    post_message(&c, &u, "Still there?", false);
    cr_assert_eq(call(&c), 401, "%s", c.resp.body);
    cr_assert(strstr(c.resp.body, "session_revoked") != NULL, "%s", c.resp.body);
    bgt_resp_free(&c.resp);
    cr_assert_eq(llm_queue_len(u.shard), queued, "a revoked session admits nothing");
    post_message(&c, &u, "", false);
    cr_assert_eq(call(&c), 401, "not the 422 of a live session: %s", c.resp.body);
    bgt_resp_free(&c.resp);
    cr_assert_eq(call(&f), 401, "not the 404 of a live session: %s", f.resp.body);
    bgt_resp_free(&f.resp);
}

Test(chat_stream, an_error_event_is_localized_and_ends_the_stream)
{
    user_t u;
    new_user("error@chat.example", "ru", &u);
    call_t c;
    post_message(&c, &u, "Break", false);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, call_thread, &c), 0);
    job_t job;
    wait_jobs(u.shard, 0, 1, &job);
    cr_expect_str_eq(job.locale, "ru");
    emit(u.shard, job.job_id, "delta", "{\"text\":\"x\"}", NULL, 0);
    emit(u.shard, job.job_id, "error", "{\"code\":\"provider_error\",\"retryable\":true}", NULL, 0);
    emit(u.shard, job.job_id, "delta", "{\"text\":\"after\"}", NULL, 0);
    cr_assert_eq(pthread_join(t, NULL), 0);
    cr_assert_eq(c.resp.status, 200, "%s", c.resp.body);
    events_t e;
    parse_events(&c.resp, &e);
    cr_assert_eq(e.n, 2, "%s", c.resp.body);
    cr_expect_str_eq(e.type[1], "error");
    char code[64], msg[512];
    get_str(e.data[1], (const char *const[]){"error", "code", NULL}, code, sizeof(code));
    get_str(e.data[1], (const char *const[]){"error", "message", NULL}, msg, sizeof(msg));
    cr_expect_str_eq(code, "provider_error");
    cr_expect(strstr(msg, "Провайдер") != NULL, "not Russian: %s", msg);
    cr_expect(strstr(e.data[1], "\"retryable\":true") != NULL, "%s", e.data[1]);
    events_free(&e);
    bgt_resp_free(&c.resp);
}

Test(chat_stream, respond_async_then_stream_resume_on_any_edge_and_cancel)
{
    user_t u, other;
    new_user("async@chat.example", NULL, &u);
    new_user("other@chat.example", NULL, &other);
    call_t c;
    post_message(&c, &u, "Later please", true);
    cr_assert_eq(call(&c), 202, "%s", c.resp.body);
    char job_id[64], url[160];
    get_str(c.resp.body, (const char *const[]){"job_id", NULL}, job_id, sizeof(job_id));
    get_str(c.resp.body, (const char *const[]){"stream_url", NULL}, url, sizeof(url));
    char want_url[160];
    snprintf(want_url, sizeof(want_url), "/chat/jobs/%s/stream", job_id);
    cr_expect_str_eq(url, want_url);
    bgt_resp_free(&c.resp);
    job_t job;
    wait_jobs(u.shard, 0, 1, &job);
    cr_expect_str_eq(job.job_id, job_id);

    char ids[4][48];
    emit(u.shard, job_id, "delta", "{\"text\":\"one\"}", ids[0], 48);
    emit(u.shard, job_id, "delta", "{\"text\":\"two\"}", ids[1], 48);

    call_t g = {.method = "GET", .token = u.token};
    snprintf(g.path, sizeof(g.path), "%s", url);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, call_thread, &g), 0);
    wait_streams_open(S.base, 1);
    emit(u.shard, job_id, "delta", "{\"text\":\"three\"}", ids[2], 48);
    emit(u.shard, job_id, "done", "{\"message_id\":\"9\",\"finish_reason\":\"stop\"}", ids[3], 48);
    cr_assert_eq(pthread_join(t, NULL), 0);
    cr_assert_eq(g.resp.status, 200, "%s", g.resp.body);
    events_t e;
    parse_events(&g.resp, &e);
    cr_assert_eq(e.n, 4, "%s", g.resp.body);
    for (size_t i = 0; i < 4; i++)
        cr_expect_str_eq(e.id[i], ids[i]);
    events_free(&e);
    bgt_resp_free(&g.resp);

    /* resume after the first event: only the later ones, once each, on this edge and another */
    char log2[300];
    snprintf(log2, sizeof(log2), "%s/edge2.log", S.dir);
    int port2 = bgt_free_port();
    snprintf(S.base2, sizeof(S.base2), "http://127.0.0.1:%d", port2);
    S.pid2 = spawn_edge(port2, log2);
    const char *bases[] = {S.base, S.base2};
    for (size_t b = 0; b < 2; b++) {
        char last[96];
        snprintf(last, sizeof(last), "Last-Event-ID: %s", ids[0]);
        call_t rsm = {.base = bases[b], .method = "GET", .token = u.token, .extra = {last}};
        snprintf(rsm.path, sizeof(rsm.path), "%s", url);
        cr_assert_eq(call(&rsm), 200, "%s", rsm.resp.body);
        parse_events(&rsm.resp, &e);
        cr_assert_eq(e.n, 3, "edge %zu: %s", b, rsm.resp.body);
        for (size_t i = 0; i < 3; i++)
            cr_expect_str_eq(e.id[i], ids[i + 1]);
        cr_expect_str_eq(e.data[0], "{\"text\":\"two\"}");
        events_free(&e);
        bgt_resp_free(&rsm.resp);
    }
    /* a malformed Last-Event-ID is refused */
    call_t bad = {.method = "GET", .token = u.token, .extra = {"Last-Event-ID: nope"}};
    snprintf(bad.path, sizeof(bad.path), "%s", url);
    cr_expect_eq(call(&bad), 422, "%s", bad.resp.body);
    bgt_resp_free(&bad.resp);

    /* another user's job does not exist for them */
    call_t foreign = {.method = "GET", .token = other.token};
    snprintf(foreign.path, sizeof(foreign.path), "%s", url);
    cr_expect_eq(call(&foreign), 404, "%s", foreign.resp.body);
    bgt_resp_free(&foreign.resp);
    call_t foreign_cancel = {.base = S.base2, .method = "POST", .token = other.token};
    snprintf(foreign_cancel.path, sizeof(foreign_cancel.path), "/chat/jobs/%s/cancel", job_id);
    cr_expect_eq(call(&foreign_cancel), 404, "%s", foreign_cancel.resp.body);
    bgt_resp_free(&foreign_cancel.resp);
    char key[160];
    snprintf(key, sizeof(key), "bg:{s%d}:cancel:%s", u.shard, job_id);
    redisReply *r = redis("EXISTS %s", key, NULL, NULL, NULL);
    cr_expect_eq(r->integer, 0, "another user's cancel set the mark");
    freeReplyObject(r);

    /* the owner cancels: the mark the worker checks, with a TTL */
    call_t cancel = {.base = S.base2, .method = "POST", .token = u.token};
    snprintf(cancel.path, sizeof(cancel.path), "/chat/jobs/%s/cancel", job_id);
    cr_expect_eq(call(&cancel), 202, "%s", cancel.resp.body);
    bgt_resp_free(&cancel.resp);
    r = redis("GET %s", key, NULL, NULL, NULL);
    cr_expect(r->type == REDIS_REPLY_STRING && strcmp(r->str, "1") == 0, "cancel mark missing");
    freeReplyObject(r);
    r = redis("TTL %s", key, NULL, NULL, NULL);
    cr_expect(r->integer > 3500 && r->integer <= 3600, "TTL %lld", r->integer);
    freeReplyObject(r);
}

Test(chat_stream, an_exhausted_quota_is_429_with_headers_and_a_localized_message)
{
    user_t u;
    new_user("quota@chat.example", "ru", &u);
    call_t c;
    post_message(&c, &u, "First", true);
    cr_assert_eq(call(&c), 202, "%s", c.resp.body); /* compiles the state (no_state → compile) */
    bgt_resp_free(&c.resp);
    cr_assert_eq(bgt_adm_set(S.r, SHARDS, u.id, "q_limit", 1), 0);
    cr_assert_eq(bgt_adm_set(S.r, SHARDS, u.id, "conc", 100), 0);

    /* the message speaks the user's language (their locale is ru) */
    post_message(&c, &u, "Second", false);
    cr_assert_eq(call(&c), 429, "%s", c.resp.body);
    char h[64], code[64], msg[512];
    get_str(c.resp.body, (const char *const[]){"error", "code", NULL}, code, sizeof(code));
    get_str(c.resp.body, (const char *const[]){"error", "message", NULL}, msg, sizeof(msg));
    cr_expect_str_eq(code, "quota_exceeded");
    cr_expect(strstr(msg, "тариф") != NULL, "not Russian: %s", msg);
    cr_expect_not_null(bgt_resp_header(&c.resp, "retry-after", h, sizeof(h)));
    cr_expect(strtol(h, NULL, 10) > 0, "Retry-After %s", h);
    cr_expect_not_null(bgt_resp_header(&c.resp, "x-quota-limit", h, sizeof(h)));
    cr_expect_str_eq(h, "1");
    cr_expect_not_null(bgt_resp_header(&c.resp, "x-quota-remaining", h, sizeof(h)));
    cr_expect_str_eq(h, "0");
    cr_expect_not_null(bgt_resp_header(&c.resp, "x-quota-reset", h, sizeof(h)));
    bgt_resp_free(&c.resp);
    /* a denial enqueues nothing */
    job_t jobs[2];
    cr_expect_eq(wait_jobs(u.shard, 0, 1, jobs), 1);
}

static size_t discard(char *p, size_t size, size_t n, void *ud)
{
    (void)p;
    (void)ud;
    return size * n;
}

Test(chat_stream, a_client_that_goes_away_closes_its_stream_but_not_the_job)
{
    user_t u;
    new_user("gone@chat.example", NULL, &u);
    call_t c;
    post_message(&c, &u, "I will leave", true);
    cr_assert_eq(call(&c), 202, "%s", c.resp.body);
    char job_id[64];
    get_str(c.resp.body, (const char *const[]){"job_id", NULL}, job_id, sizeof(job_id));
    bgt_resp_free(&c.resp);

    /* a client that gives up after 700 ms, in the middle of the stream */
    char url[256], authz[2100];
    snprintf(url, sizeof(url), "%s/chat/jobs/%s/stream", S.base, job_id);
    snprintf(authz, sizeof(authz), "Authorization: Bearer %s", u.token);
    CURL *h = curl_easy_init();
    cr_assert_not_null(h);
    struct curl_slist *hl = curl_slist_append(NULL, authz);
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hl);
    curl_easy_setopt(h, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 700L);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, discard);
    emit(u.shard, job_id, "delta", "{\"text\":\"partial\"}", NULL, 0);
    CURLcode rc = curl_easy_perform(h);
    cr_expect_eq(rc, CURLE_OPERATION_TIMEDOUT, "%s", curl_easy_strerror(rc));
    curl_easy_cleanup(h);
    curl_slist_free_all(hl);
    wait_streams_open(S.base, 0);

    /* the job's output is still there: the client resumes and gets all of it */
    emit(u.shard, job_id, "done", "{\"finish_reason\":\"stop\"}", NULL, 0);
    call_t g = {.method = "GET", .token = u.token};
    snprintf(g.path, sizeof(g.path), "/chat/jobs/%s/stream", job_id);
    cr_assert_eq(call(&g), 200, "%s", g.resp.body);
    events_t e;
    parse_events(&g.resp, &e);
    cr_expect_eq(e.n, 2, "%s", g.resp.body);
    events_free(&e);
    bgt_resp_free(&g.resp);
}

Test(chat_stream, output_past_the_stream_buffer_ends_the_response_and_resumes)
{
    user_t u;
    new_user("slow@chat.example", NULL, &u);
    call_t c;
    post_message(&c, &u, "Flood me", true);
    cr_assert_eq(call(&c), 202, "%s", c.resp.body);
    char job_id[64];
    get_str(c.resp.body, (const char *const[]){"job_id", NULL}, job_id, sizeof(job_id));
    bgt_resp_free(&c.resp);
    /* 8 MiB of output at once, far past the 256 KiB buffer and h2's windows */
    static char big[64 * 1024 + 32];
    memcpy(big, "{\"text\":\"", 9);
    memset(big + 9, 'x', 64 * 1024);
    memcpy(big + 9 + 64 * 1024, "\"}", 3);
    enum { CHUNKS = 128 };
    for (int i = 0; i < CHUNKS; i++)
        emit(u.shard, job_id, "delta", big, NULL, 0);
    emit(u.shard, job_id, "done", "{\"finish_reason\":\"stop\"}", NULL, 0);

    /* reading it all takes several responses, each ending early, none losing or repeating */
    char last[64] = "";
    size_t deltas = 0;
    bool done = false;
    for (int round = 0; round < CHUNKS + 2 && !done; round++) {
        char hdr[96];
        snprintf(hdr, sizeof(hdr), "Last-Event-ID: %s", last);
        call_t g = {.method = "GET", .token = u.token, .extra = {last[0] != '\0' ? hdr : NULL}};
        snprintf(g.path, sizeof(g.path), "/chat/jobs/%s/stream", job_id);
        cr_assert_eq(call(&g), 200, "%s", g.resp.error);
        events_t e;
        parse_events(&g.resp, &e);
        for (size_t i = 0; i < e.n; i++) {
            if (strcmp(e.type[i], "delta") == 0)
                deltas++;
            done = done || strcmp(e.type[i], "done") == 0;
            snprintf(last, sizeof(last), "%s", e.id[i]);
        }
        cr_assert(e.n > 0, "a response without events");
        events_free(&e);
        bgt_resp_free(&g.resp);
        if (round == 0)
            cr_expect_not(done, "8 MiB came through one response: the buffer is not bounded");
    }
    cr_expect(done);
    cr_expect_eq(deltas, CHUNKS);
    wait_streams_open(S.base, 0);
}

/* Subscribers of the edge's loops on the channel of shard 0 (each loop subscribes to every shard).
 */
static long long subscribers(void)
{
    redisReply *r = redis("PUBSUB NUMSUB %s", "bg:{s0}:out", NULL, NULL, NULL);
    long long n = r->elements == 2 ? r->element[1]->integer : -1;
    freeReplyObject(r);
    return n;
}

Test(chat_stream, the_subscriber_comes_back_after_its_connection_is_killed)
{
    user_t u;
    new_user("resub@chat.example", NULL, &u);
    cr_assert_eq(subscribers(), 2, "one subscriber per loop expected");
    call_t c;
    post_message(&c, &u, "Still there?", false);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, call_thread, &c), 0);
    job_t job;
    wait_jobs(u.shard, 0, 1, &job);
    wait_streams_open(S.base, 1);

    redisReply *r = redis("CLIENT KILL TYPE pubsub", NULL, NULL, NULL, NULL);
    freeReplyObject(r);
    /* published while nobody listens: lost for pub/sub, not for the stream */
    emit(u.shard, job.job_id, "delta", "{\"text\":\"during\"}", NULL, 0);
    long long deadline = bgt_now_ms() + 5000;
    while (subscribers() != 2)
        cr_assert(bgt_now_ms() < deadline, "the subscribers did not come back");
    long long t0 = bgt_now_ms();
    emit(u.shard, job.job_id, "done", "{\"finish_reason\":\"stop\"}", NULL, 0);
    cr_assert_eq(pthread_join(t, NULL), 0);
    /* well before a heartbeat (15 s) could have read it */
    cr_expect_lt(bgt_now_ms() - t0, 5000);
    cr_assert_eq(c.resp.status, 200, "%s", c.resp.body);
    events_t e;
    parse_events(&c.resp, &e);
    cr_expect_eq(e.n, 2, "%s", c.resp.body);
    events_free(&e);
    bgt_resp_free(&c.resp);
}

Test(chat_stream, redis_down_is_503)
{
    user_t u;
    new_user("down@chat.example", NULL, &u);
    call_t c;
    post_message(&c, &u, "Anyone?", true);
    bgt_redis_pause(&S.redis, true);
    call_run(&c);
    bgt_redis_pause(&S.redis, false);
    cr_assert_eq(c.rc, 0, "%s", c.resp.error);
    cr_expect_eq(c.resp.status, 503, "%s", c.resp.body);
    char h[32];
    cr_expect_not_null(bgt_resp_header(&c.resp, "retry-after", h, sizeof(h)));
    bgt_resp_free(&c.resp);
}

Test(chat_stream, fifty_concurrent_streams_all_complete)
{
    enum { N = 50 };
    user_t u;
    new_user("fifty@chat.example", NULL, &u);
    call_t first;
    post_message(&first, &u, "warm up", true);
    cr_assert_eq(call(&first), 202, "%s", first.resp.body);
    bgt_resp_free(&first.resp);
    job_t jobs[MAX_JOBS];
    size_t seen = wait_jobs(u.shard, 0, 1, jobs);
    generous_limits(&u);

    static call_t calls[N];
    pthread_t threads[N];
    for (int i = 0; i < N; i++) {
        char content[32];
        snprintf(content, sizeof(content), "turn %d", i);
        post_message(&calls[i], &u, content, false);
        cr_assert_eq(pthread_create(&threads[i], NULL, call_thread, &calls[i]), 0);
    }
    wait_jobs(u.shard, seen, N, jobs);
    wait_streams_open(S.base, N);
    for (int i = 0; i < N; i++) {
        char text[64];
        snprintf(text, sizeof(text), "{\"text\":\"reply %d\"}", i);
        emit(u.shard, jobs[i].job_id, "delta", text, NULL, 0);
        emit(u.shard, jobs[i].job_id, "done", "{\"finish_reason\":\"stop\"}", NULL, 0);
    }
    int complete = 0;
    for (int i = 0; i < N; i++) {
        cr_assert_eq(pthread_join(threads[i], NULL), 0);
        cr_expect_eq(calls[i].rc, 0, "%s", calls[i].resp.error);
        cr_expect_eq(calls[i].resp.status, 200, "%s", calls[i].resp.body);
        if (calls[i].resp.status == 200) {
            events_t e;
            parse_events(&calls[i].resp, &e);
            complete +=
                e.n == 2 && strcmp(e.type[0], "delta") == 0 && strcmp(e.type[1], "done") == 0;
            events_free(&e);
        }
        bgt_resp_free(&calls[i].resp);
    }
    cr_expect_eq(complete, N);
    wait_streams_open(S.base, 0);
}

Test(chat_stream, sigterm_ends_open_streams_at_once_so_clients_resume_elsewhere)
{
    user_t u;
    new_user("drain@chat.example", NULL, &u);
    call_t c;
    post_message(&c, &u, "Hello before a deploy", false);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, call_thread, &c), 0);
    job_t job;
    wait_jobs(u.shard, 0, 1, &job);
    wait_streams_open(S.base, 1);
    char id[48];
    emit(u.shard, job.job_id, "delta", "{\"text\":\"Half a \"}", id, sizeof(id));
    usleep(300 * 1000); /* let the edge relay it */

    /* the job is not done, yet the edge must not hold its drain for it */
    long long t0 = bgt_now_ms();
    kill(S.pid, SIGTERM);
    int st = bgt_wait(S.pid, 8000);
    long long took = bgt_now_ms() - t0;
    S.pid = 0;
    cr_assert(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit status %d", st);
    cr_expect(took < 3000, "the drain waited %lld ms for an open stream", took);
    cr_assert_eq(pthread_join(t, NULL), 0);
    cr_assert_eq(c.resp.status, 200, "%s", c.resp.body);
    events_t e;
    parse_events(&c.resp, &e);
    cr_assert_eq(e.n, 1, "%s", c.resp.body);
    cr_expect_str_eq(e.type[0], "delta");
    cr_expect_str_eq(e.id[0], id); /* the client resumes from here on another edge */
    events_free(&e);
    bgt_resp_free(&c.resp);
}
