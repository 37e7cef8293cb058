/*
 * Admission over HTTP: the acceptance tests of the admission path on a real route, against FOUR
 * bg-edge processes (one event loop each) sharing one private Redis and one migrated database.
 * Each burst is 2,000 concurrent POST /chat/conversations/{id}/messages with Prefer: respond-async
 * from one user, spread over the four edges by a seeded shuffle, sent with libcurl multi over
 * HTTP/2 (h2c): one connection per edge, up to 500 concurrent streams each. What is checked:
 *   - quota: exactly the requests left are admitted (202), every other one is 429 quota_exceeded,
 *     the stream holds exactly the admitted jobs, and x-quota-remaining counts down once per
 *     admitted request (each value exactly once), over 20 seeds;
 *   - rate limit: a burst of B with no refill during the test admits exactly B;
 *   - concurrency: a cap of C with nothing settled admits exactly C;
 *   - Redis killed: 503 with Retry-After; Redis back empty on the same port, `bgctl quota rebuild
 *     --all` restores the remaining count from usage_records, GET /billing/account shows it, and
 *     exactly that many more requests are admitted.
 * The compiled admission state (bg:{sN}:adm:<uid>) is compiled by a first turn, then overwritten by
 * hand between bursts, with the quota counters, reservations, rate state and job stream reset.
 */
#include <criterion/criterion.h>
#include <curl/curl.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bg/common.h"
#include "bg/json.h"
#include "bg/redis.h"
#include "bgtest.h"
#include "bgtest_adm.h"

#define PASSWORD "Admission-Horse-Battery-42"
#define SHARDS 16
#define EDGES 4
#define BURST 2000
#define SEEDS 20
#define BODY_MAX 512

static struct {
    bgt_redis_t redis;
    bgt_pg_t db;
    char dir[256];
    char base[EDGES][64];
    pid_t pid[EDGES];
    bg_redis_t *r;
} S;

static pid_t spawn_edge(int port, const char *log)
{
    char env_store[3][600];
    snprintf(env_store[0], 600, "BG_HTTP_PORT=%d", port);
    snprintf(env_store[1], 600, "BG_REDIS_URL=%s", S.redis.url);
    snprintf(env_store[2], 600, "BG_DATABASE_URL=%s", S.db.url);
    const char *env[] = {env_store[0],
                         env_store[1],
                         env_store[2],
                         "BG_HTTPS_PORT=0",
                         "BG_ENV_FILE=/nonexistent",
                         "BG_EDGE_THREADS=1",
                         "BG_MAX_STREAMS_PER_CONN=500",
                         "BG_LOG_FORMAT=text",
                         "BG_LOG_LEVEL=warn",
                         "BG_REDIS_TIMEOUT_MS=1500",
                         "BG_JWT_SECRET=0123456789abcdef0123456789abcdef-admission",
                         NULL};
    const char *argv[] = {bgt_bin("bg-edge"), NULL};
    pid_t pid = bgt_spawn(argv, env, log);
    cr_assert(pid > 0);
    return pid;
}

static void setup(void)
{
    memset(&S, 0, sizeof(S));
    cr_assert_eq(curl_global_init(CURL_GLOBAL_DEFAULT), CURLE_OK);
    cr_assert_eq(bgt_pg_create(&S.db, true), 0);
    cr_assert_eq(bgt_redis_start(&S.redis), 0);
    cr_assert_eq(bgt_tempdir(S.dir, sizeof(S.dir)), 0);
    for (int i = 0; i < EDGES; i++) {
        char log[300];
        snprintf(log, sizeof(log), "%s/edge%d.log", S.dir, i);
        int port = bgt_free_port();
        snprintf(S.base[i], sizeof(S.base[i]), "http://127.0.0.1:%d", port);
        S.pid[i] = spawn_edge(port, log);
    }
    for (int i = 0; i < EDGES; i++) {
        char url[128];
        snprintf(url, sizeof(url), "%s/healthz", S.base[i]);
        cr_assert_eq(bgt_wait_http(url, 200, 15000), 0,
                     "bg-edge %d did not come up; see %s/edge%d.log", i, S.dir, i);
    }
    cr_assert_eq(bg_redis_new(S.redis.url, 5000, &S.r), 0);
}

static void teardown(void)
{
    for (int i = 0; i < EDGES; i++) {
        if (S.pid[i] > 0)
            bgt_stop(S.pid[i], SIGKILL, 2000);
    }
    bg_redis_free(S.r);
    bgt_redis_stop(&S.redis);
    bgt_pg_drop(&S.db);
    bgt_rmtree(S.dir);
    curl_global_cleanup();
}

TestSuite(admission_http, .init = setup, .fini = teardown, .timeout = 500);

/* ---- one request at a time ---- */

static long call(int edge, const char *method, const char *path, const char *token,
                 const char *body, const char *extra, bgt_resp_t *resp)
{
    char url[512], authz[2100];
    const char *headers[5];
    size_t n = 0;
    snprintf(url, sizeof(url), "%s%s", S.base[edge], path);
    if (token != NULL) {
        snprintf(authz, sizeof(authz), "Authorization: Bearer %s", token);
        headers[n++] = authz;
    }
    if (body != NULL)
        headers[n++] = "Content-Type: application/json";
    if (extra != NULL)
        headers[n++] = extra;
    headers[n] = NULL;
    cr_assert_eq(
        bgt_http(BGT_H2C, method, url, headers, body, body != NULL ? strlen(body) : 0, resp), 0,
        "%s %s: %s", method, path, resp->error);
    return resp->status;
}

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

typedef struct st_user {
    char id[64];
    char token[2048];
    char conv[64];
    char path[160]; /* /chat/conversations/<conv>/messages */
    int shard;
} user_t;

/* Registers a user on edge 0 and starts a conversation with the assistant agent. */
static void new_user(const char *email, user_t *u)
{
    char body[512];
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"" PASSWORD "\"}", email);
    bgt_resp_t r;
    cr_assert_eq(call(0, "POST", "/auth/register", NULL, body, NULL, &r), 201, "%s", r.body);
    get_str(r.body, (const char *const[]){"access_token", NULL}, u->token, sizeof(u->token));
    get_str(r.body, (const char *const[]){"user", "id", NULL}, u->id, sizeof(u->id));
    bgt_resp_free(&r);
    u->shard = bg_shard_of(u->id, SHARDS);

    cr_assert_eq(call(0, "GET", "/agents", u->token, NULL, NULL, &r), 200, "%s", r.body);
    char agent[64];
    bg_json_doc_t *doc = NULL;
    const bg_json_t *data = json_at(r.body, &doc, (const char *const[]){"data", NULL});
    size_t len = 0;
    const char *s = bg_json_str(bg_json_find(bg_json_at(data, 0), "id"), &len);
    cr_assert(s != NULL && len < sizeof(agent), "no agent in %s", r.body);
    memcpy(agent, s, len);
    agent[len] = '\0';
    bg_json_doc_free(doc);
    bgt_resp_free(&r);

    snprintf(body, sizeof(body), "{\"agent_id\":\"%s\"}", agent);
    cr_assert_eq(call(0, "POST", "/chat/conversations", u->token, body, NULL, &r), 201, "%s",
                 r.body);
    get_str(r.body, (const char *const[]){"id", NULL}, u->conv, sizeof(u->conv));
    bgt_resp_free(&r);
    snprintf(u->path, sizeof(u->path), "/chat/conversations/%s/messages", u->conv);
}

/* ---- Redis ---- */

/* Runs a command written as printf text; its words are split on spaces (no argument of ours holds
 * one). Fails the test on an error reply. */
static redisReply *redis_v(const char *fmt, va_list ap)
{
    char cmd[1024];
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    const char *argv[16];
    int argc = 0;
    for (char *p = cmd; *p != '\0' && argc < 16;) {
        argv[argc++] = p;
        char *sp = strchr(p, ' ');
        if (sp == NULL)
            break;
        *sp = '\0';
        p = sp + 1;
    }
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_argv(S.r, argc, argv, NULL, &reply), 0, "redis: %s", argv[0]);
    cr_assert(reply->type != REDIS_REPLY_ERROR, "redis: %s: %s", argv[0], reply->str);
    return reply;
}

static redisReply *redis(const char *fmt, ...) BG_PRINTF(1, 2);
static redisReply *redis(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *reply = redis_v(fmt, ap);
    va_end(ap);
    return reply;
}

static long long redis_int(const char *fmt, ...) BG_PRINTF(1, 2);
static long long redis_int(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *reply = redis_v(fmt, ap);
    va_end(ap);
    cr_assert_eq(reply->type, REDIS_REPLY_INTEGER, "%s", fmt);
    long long n = reply->integer;
    freeReplyObject(reply);
    return n;
}

static void key_of(char *out, size_t outlen, const user_t *u, const char *kind)
{
    snprintf(out, outlen, "bg:{s%d}:%s:%s", u->shard, kind, u->id);
}

static void stream_of(char *out, size_t outlen, const user_t *u)
{
    snprintf(out, outlen, "bg:{s%d}:q:llm", u->shard);
}

/* Reads a numeric field of the compiled state. */
static int64_t state_field(const user_t *u, const char *field)
{
    char key[160];
    key_of(key, sizeof(key), u, "adm");
    redisReply *reply = redis("HGET %s %s", key, field);
    cr_assert_eq(reply->type, REDIS_REPLY_STRING, "no %s in %s", field, key);
    int64_t v = strtoll(reply->str, NULL, 10);
    freeReplyObject(reply);
    return v;
}

/*
 * Makes the user's next burst start from a clean slate: no reservations, no rate state, an empty
 * job stream, and the compiled state's limits set to these (0 rpm or conc: none). used is written
 * as the current window's count, computed as the script does (from Redis's clock).
 */
static void reset_user(const user_t *u, int64_t q_limit, int64_t used, int64_t rpm, int64_t burst,
                       int64_t conc)
{
    char adm[160], quota[160], res[160], resd[160], stream[160];
    key_of(adm, sizeof(adm), u, "adm");
    key_of(quota, sizeof(quota), u, "quota");
    key_of(res, sizeof(res), u, "res");
    key_of(resd, sizeof(resd), u, "resd");
    stream_of(stream, sizeof(stream), u);
    freeReplyObject(redis("DEL %s %s %s %s", quota, res, resd, stream));
    /* through the compiler's writer, so the script's packed copy agrees (bgtest_adm.h) */
    const struct {
        const char *name;
        int64_t value;
    } set[] = {
        {"q_limit", q_limit}, {"rpm", rpm}, {"burst", burst}, {"conc", conc}, {"tq_limit", 0}};
    for (size_t i = 0; i < BG_ARRAY_SIZE(set); i++)
        cr_assert_eq(bgt_adm_set(S.r, SHARDS, u->id, set[i].name, set[i].value), 0, "%s",
                     set[i].name);
    if (used > 0) {
        int64_t anchor = state_field(u, "w_anchor"), len = state_field(u, "w_len");
        redisReply *t = redis("TIME");
        cr_assert_eq(t->type, REDIS_REPLY_ARRAY);
        int64_t now = strtoll(t->element[0]->str, NULL, 10) * 1000 +
                      strtoll(t->element[1]->str, NULL, 10) / 1000;
        freeReplyObject(t);
        int64_t win = anchor + (now - anchor) / len * len;
        cr_assert(win + len - now > 60000, "the quota window ends within a minute; run again");
        freeReplyObject(
            redis("HSET %s win %" PRId64 " used %" PRId64 " tused 0", quota, win, used));
    }
}

/* ---- many requests at once: libcurl multi, HTTP/2 multiplexed ---- */

typedef struct st_xfer {
    CURL *h;
    struct curl_slist *headers;
    char body[BODY_MAX];
    size_t body_len;
    long status;
    long quota_remaining; /* x-quota-remaining, -1 when absent */
    long retry_after;     /* Retry-After, -1 when absent */
    int edge;
} xfer_t;

typedef struct st_tally {
    int admitted; /* 202 */
    int quota;    /* 429 quota_exceeded */
    int rate;     /* 429 rate_limited */
    int payment;  /* 402 */
    int other;    /* anything else, transport failures included */
    int per_edge[EDGES];
    int admitted_per_edge[EDGES];
    char other_sample[256];
    char **job_ids;  /* of the 202s, owned */
    long *remaining; /* x-quota-remaining of the 202s, owned */
    int bad_headers; /* a denial without Retry-After, or a 2xx/429 without x-quota-* */
    int connections; /* opened by the burst */
    int h2;          /* answers over HTTP/2 */
    long long ms;
} tally_t;

static size_t on_body(char *p, size_t size, size_t n, void *ud)
{
    xfer_t *x = ud;
    size_t len = size * n;
    size_t room = BODY_MAX - 1 - x->body_len;
    size_t take = len < room ? len : room;
    memcpy(x->body + x->body_len, p, take);
    x->body_len += take;
    x->body[x->body_len] = '\0';
    return len;
}

static long header_value(const char *line, size_t len, const char *name)
{
    size_t nlen = strlen(name);
    if (len <= nlen + 1 || strncasecmp(line, name, nlen) != 0 || line[nlen] != ':')
        return -2;
    char v[32];
    size_t vlen = len - nlen - 1;
    if (vlen >= sizeof(v))
        vlen = sizeof(v) - 1;
    memcpy(v, line + nlen + 1, vlen);
    v[vlen] = '\0';
    return strtol(v, NULL, 10);
}

static size_t on_header(char *p, size_t size, size_t n, void *ud)
{
    xfer_t *x = ud;
    size_t len = size * n;
    long v = header_value(p, len, "x-quota-remaining");
    if (v != -2)
        x->quota_remaining = v;
    v = header_value(p, len, "retry-after");
    if (v != -2)
        x->retry_after = v;
    return len;
}

/*
 * How many seeded runs of the quota test: SEEDS, or BGT_ADMISSION_SEEDS (the sanitizer pass of
 * make test runs fewer, because the sanitized edges are several times slower).
 */
static uint64_t seeds(void)
{
    const char *v = getenv("BGT_ADMISSION_SEEDS");
    char *end;
    long n = v != NULL ? strtol(v, &end, 10) : 0;
    return v != NULL && *end == '\0' && n > 0 ? (uint64_t)n : SEEDS;
}

/* xorshift64*: the seeded order and spread of a burst */
static uint64_t rng_next(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ULL;
}

/*
 * Sends n POSTs of the user's turn at once. The seed decides which edge each one goes to and the
 * order they are started in: seeds cycle through an even spread, one edge taking half, and two
 * edges only; the order is a Fisher-Yates shuffle.
 */
static void burst(const user_t *u, int n, uint64_t seed, tally_t *t)
{
    memset(t, 0, sizeof(*t));
    t->job_ids = calloc((size_t)n, sizeof(char *));
    t->remaining = calloc((size_t)n, sizeof(long));
    xfer_t *x = calloc((size_t)n, sizeof(xfer_t));
    int *order = calloc((size_t)n, sizeof(int));
    cr_assert(t->job_ids != NULL && t->remaining != NULL && x != NULL && order != NULL);
    uint64_t s = seed * 0x9E3779B97F4A7C15ULL + 1;
    char authz[2100];
    snprintf(authz, sizeof(authz), "Authorization: Bearer %s", u->token);
    static const char body[] = "{\"content\":\"admit me\"}";

    CURLM *m = curl_multi_init();
    cr_assert_not_null(m);
    curl_multi_setopt(m, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
    curl_multi_setopt(m, CURLMOPT_MAX_HOST_CONNECTIONS, 1L);
    curl_multi_setopt(m, CURLMOPT_MAX_CONCURRENT_STREAMS, 500L);
    for (int i = 0; i < n; i++) {
        uint64_t r = rng_next(&s);
        int edge;
        switch (seed % 3) {
        case 0:
            edge = (int)(r % EDGES);
            break;
        case 1:
            edge = r % 2 == 0 ? 0 : 1 + (int)((r >> 8) % (EDGES - 1));
            break;
        default:
            edge = (int)(r % 2) * 2 + (int)(seed % 2);
            break;
        }
        x[i].edge = edge;
        x[i].quota_remaining = -1;
        x[i].retry_after = -1;
        order[i] = i;
    }
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(rng_next(&s) % (uint64_t)(i + 1));
        int tmp = order[i];
        order[i] = order[j];
        order[j] = tmp;
    }
    for (int k = 0; k < n; k++) {
        xfer_t *xi = &x[order[k]];
        char url[512];
        snprintf(url, sizeof(url), "%s%s", S.base[xi->edge], u->path);
        xi->h = curl_easy_init();
        cr_assert_not_null(xi->h);
        xi->headers = curl_slist_append(NULL, authz);
        xi->headers = curl_slist_append(xi->headers, "Content-Type: application/json");
        xi->headers = curl_slist_append(xi->headers, "Prefer: respond-async");
        curl_easy_setopt(xi->h, CURLOPT_URL, url);
        curl_easy_setopt(xi->h, CURLOPT_HTTPHEADER, xi->headers);
        curl_easy_setopt(xi->h, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(xi->h, CURLOPT_POSTFIELDSIZE, (long)(sizeof(body) - 1));
        /* h2c by Upgrade, not prior knowledge: libcurl 7.88.1 (Debian 12) fails every stream but
         * the first on a reused prior-knowledge connection with "Error in the HTTP2 framing
         * layer" (curl/curl#10634, fixed in 8.0). The tally checks every answer came over h2. */
        curl_easy_setopt(xi->h, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2_0);
        curl_easy_setopt(xi->h, CURLOPT_PIPEWAIT, 1L);
        curl_easy_setopt(xi->h, CURLOPT_TIMEOUT_MS, 120000L);
        curl_easy_setopt(xi->h, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(xi->h, CURLOPT_WRITEFUNCTION, on_body);
        curl_easy_setopt(xi->h, CURLOPT_WRITEDATA, xi);
        curl_easy_setopt(xi->h, CURLOPT_HEADERFUNCTION, on_header);
        curl_easy_setopt(xi->h, CURLOPT_HEADERDATA, xi);
        curl_easy_setopt(xi->h, CURLOPT_PRIVATE, xi);
        cr_assert_eq(curl_multi_add_handle(m, xi->h), CURLM_OK);
    }

    long long t0 = bgt_now_ms();
    int running = n;
    while (running > 0) {
        cr_assert_eq(curl_multi_perform(m, &running), CURLM_OK);
        int left;
        CURLMsg *msg;
        while ((msg = curl_multi_info_read(m, &left)) != NULL) {
            if (msg->msg != CURLMSG_DONE)
                continue;
            xfer_t *xi = NULL;
            curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&xi);
            long conns = 0, ver = 0;
            curl_easy_getinfo(msg->easy_handle, CURLINFO_NUM_CONNECTS, &conns);
            curl_easy_getinfo(msg->easy_handle, CURLINFO_HTTP_VERSION, &ver);
            t->connections += (int)conns;
            t->h2 += ver == CURL_HTTP_VERSION_2_0;
            if (msg->data.result == CURLE_OK)
                curl_easy_getinfo(msg->easy_handle, CURLINFO_RESPONSE_CODE, &xi->status);
            else
                snprintf(xi->body, BODY_MAX, "curl: %s", curl_easy_strerror(msg->data.result));
        }
        if (running > 0)
            cr_assert_eq(curl_multi_poll(m, NULL, 0, 1000, NULL), CURLM_OK);
    }
    t->ms = bgt_now_ms() - t0;

    for (int i = 0; i < n; i++) {
        xfer_t *xi = &x[i];
        t->per_edge[xi->edge]++;
        if (xi->status == 202) {
            char id[64];
            get_str(xi->body, (const char *const[]){"job_id", NULL}, id, sizeof(id));
            t->job_ids[t->admitted] = bg_strdup(id);
            t->remaining[t->admitted] = xi->quota_remaining;
            t->admitted++;
            t->admitted_per_edge[xi->edge]++;
            if (xi->quota_remaining < 0)
                t->bad_headers++;
        } else if (xi->status == 429 && strstr(xi->body, "\"code\":\"quota_exceeded\"") != NULL) {
            t->quota++;
            if (xi->retry_after <= 0 || xi->quota_remaining != 0)
                t->bad_headers++;
        } else if (xi->status == 429 && strstr(xi->body, "\"code\":\"rate_limited\"") != NULL) {
            t->rate++;
            if (xi->retry_after <= 0 || xi->quota_remaining < 0)
                t->bad_headers++;
        } else if (xi->status == 402) {
            t->payment++;
        } else {
            if (t->other == 0)
                snprintf(t->other_sample, sizeof(t->other_sample), "%ld %.200s", xi->status,
                         xi->body);
            t->other++;
        }
        curl_multi_remove_handle(m, xi->h);
        curl_easy_cleanup(xi->h);
        curl_slist_free_all(xi->headers);
    }
    curl_multi_cleanup(m);
    free(order);
    free(x);
}

static void tally_free(tally_t *t)
{
    for (int i = 0; i < t->admitted; i++)
        free(t->job_ids[i]);
    free(t->job_ids);
    free(t->remaining);
}

static void log_tally(const char *what, uint64_t seed, const tally_t *t, long long stream_len)
{
    fprintf(stderr,
            "admission_http %s seed=%" PRIu64 " admitted=%d quota_exceeded=%d rate_limited=%d "
            "other=%d stream=%lld connections=%d h2=%d edges=%d/%d/%d/%d "
            "admitted_by_edge=%d/%d/%d/%d ms=%lld\n",
            what, seed, t->admitted, t->quota, t->rate, t->other, stream_len, t->connections, t->h2,
            t->per_edge[0], t->per_edge[1], t->per_edge[2], t->per_edge[3], t->admitted_per_edge[0],
            t->admitted_per_edge[1], t->admitted_per_edge[2], t->admitted_per_edge[3], t->ms);
}

/* The job ids in the user's stream are exactly those of the 202 answers, once each. */
static void expect_stream_is_admitted(const user_t *u, const tally_t *t)
{
    char stream[160];
    stream_of(stream, sizeof(stream), u);
    redisReply *r = redis("XRANGE %s - +", stream);
    cr_assert_eq(r->type, REDIS_REPLY_ARRAY);
    cr_expect_eq((int)r->elements, t->admitted, "stream holds %zu jobs, %d admitted", r->elements,
                 t->admitted);
    int found = 0;
    for (size_t i = 0; i < r->elements; i++) {
        const redisReply *fields = r->element[i]->element[1];
        const char *job = NULL;
        for (size_t f = 0; f + 1 < fields->elements; f += 2) {
            if (strcmp(fields->element[f]->str, "job_id") == 0)
                job = fields->element[f + 1]->str;
        }
        for (int k = 0; job != NULL && k < t->admitted; k++) {
            if (t->job_ids[k] != NULL && strcmp(t->job_ids[k], job) == 0) {
                found++;
                free(t->job_ids[k]);
                t->job_ids[k] = NULL; /* a second entry for the same job would not match */
                break;
            }
        }
    }
    freeReplyObject(r);
    cr_expect_eq(found, t->admitted, "%d of the %d admitted jobs are in the stream", found,
                 t->admitted);
}

/* A first turn compiles the user's admission state from Postgres. */
static void compile_state(const user_t *u)
{
    bgt_resp_t r;
    cr_assert_eq(
        call(0, "POST", u->path, u->token, "{\"content\":\"first\"}", "Prefer: respond-async", &r),
        202, "%s", r.body);
    bgt_resp_free(&r);
    char adm[160];
    key_of(adm, sizeof(adm), u, "adm");
    cr_assert_eq(redis_int("EXISTS %s", adm), 1);
}

/* ---- tests ---- */

Test(admission_http, quota_admits_exactly_what_is_left_over_four_edges)
{
    enum { LEFT = 100 };
    user_t u;
    new_user("quota@admission.example", &u);
    compile_state(&u);
    long long total_ms = 0;
    for (uint64_t seed = 1; seed <= seeds(); seed++) {
        int64_t limit = LEFT + (int64_t)seed * 50; /* used varies, what is left does not */
        reset_user(&u, limit, limit - LEFT, 0, 1, 0);
        tally_t t;
        burst(&u, BURST, seed, &t);
        total_ms += t.ms;
        char stream[160], res[160];
        stream_of(stream, sizeof(stream), &u);
        key_of(res, sizeof(res), &u, "res");
        long long xlen = redis_int("XLEN %s", stream);
        log_tally("quota", seed, &t, xlen);
        cr_expect_eq(t.admitted, LEFT, "seed %" PRIu64 ": %d admitted", seed, t.admitted);
        cr_expect_eq(t.quota, BURST - LEFT, "seed %" PRIu64 ": %d quota_exceeded", seed, t.quota);
        cr_expect_eq(t.other + t.rate + t.payment, 0, "seed %" PRIu64 ": %d others, e.g. %s", seed,
                     t.other + t.rate + t.payment, t.other_sample);
        cr_expect_eq(xlen, LEFT, "seed %" PRIu64 ": %lld jobs in the stream", seed, xlen);
        cr_expect_eq(redis_int("ZCARD %s", res), LEFT, "seed %" PRIu64 ": reservations", seed);
        cr_expect_eq(t.bad_headers, 0, "seed %" PRIu64 ": %d answers without their headers", seed,
                     t.bad_headers);
        /* x-quota-remaining counts down: 99 … 0, each exactly once */
        int seen[LEFT] = {0};
        int distinct = 0;
        for (int i = 0; i < t.admitted; i++) {
            long v = t.remaining[i];
            if (v >= 0 && v < LEFT && seen[v]++ == 0)
                distinct++;
        }
        cr_expect_eq(distinct, LEFT, "seed %" PRIu64 ": %d distinct x-quota-remaining values", seed,
                     distinct);
        expect_stream_is_admitted(&u, &t);
        tally_free(&t);
    }
    fprintf(stderr, "admission_http quota: %d seeds x %d requests in %lld ms of bursts\n", SEEDS,
            BURST, total_ms);
}

Test(admission_http, a_rate_limit_burst_admits_exactly_the_burst)
{
    enum { B = 25, RUNS = 3 };
    user_t u;
    new_user("rate@admission.example", &u);
    compile_state(&u);
    for (uint64_t seed = 101; seed < 101 + RUNS; seed++) {
        /* 1 request a minute: nothing refills during a burst that takes seconds */
        reset_user(&u, 1000000, 0, 1, B, 0);
        tally_t t;
        burst(&u, BURST, seed, &t);
        char stream[160];
        stream_of(stream, sizeof(stream), &u);
        long long xlen = redis_int("XLEN %s", stream);
        log_tally("rate", seed, &t, xlen);
        cr_expect_lt(t.ms, 60000, "the burst took a minute: a token may have refilled");
        cr_expect_eq(t.admitted, B, "seed %" PRIu64 ": %d admitted", seed, t.admitted);
        cr_expect_eq(t.rate, BURST - B, "seed %" PRIu64 ": %d rate_limited", seed, t.rate);
        cr_expect_eq(t.other + t.quota + t.payment, 0, "seed %" PRIu64 ": %d others, e.g. %s", seed,
                     t.other + t.quota + t.payment, t.other_sample);
        cr_expect_eq(t.bad_headers, 0, "seed %" PRIu64 ": %d answers without their headers", seed,
                     t.bad_headers);
        expect_stream_is_admitted(&u, &t);
        tally_free(&t);
    }
}

Test(admission_http, a_concurrency_cap_admits_exactly_the_cap)
{
    enum { C = 7, RUNS = 3 };
    user_t u;
    new_user("conc@admission.example", &u);
    compile_state(&u);
    for (uint64_t seed = 201; seed < 201 + RUNS; seed++) {
        reset_user(&u, 1000000, 0, 0, 1, C);
        tally_t t;
        burst(&u, BURST, seed, &t);
        char stream[160], res[160];
        stream_of(stream, sizeof(stream), &u);
        key_of(res, sizeof(res), &u, "res");
        long long xlen = redis_int("XLEN %s", stream);
        log_tally("concurrency", seed, &t, xlen);
        cr_expect_eq(t.admitted, C, "seed %" PRIu64 ": %d admitted", seed, t.admitted);
        /* the concurrency cap answers as a rate limit (bg_admission_error_code) */
        cr_expect_eq(t.rate, BURST - C, "seed %" PRIu64 ": %d rate_limited", seed, t.rate);
        cr_expect_eq(t.other + t.quota + t.payment, 0, "seed %" PRIu64 ": %d others, e.g. %s", seed,
                     t.other + t.quota + t.payment, t.other_sample);
        cr_expect_eq(redis_int("ZCARD %s", res), C, "seed %" PRIu64 ": reservations", seed);
        expect_stream_is_admitted(&u, &t);
        tally_free(&t);
    }
}

/* ---- Redis lost and rebuilt ---- */

static void psql(const char *sql)
{
    char out[2048];
    const char *argv[] = {"psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", S.db.url, "-c", sql, NULL};
    cr_assert_eq(bgt_run(argv, NULL, out, sizeof(out)), 0, "psql %s: %s", sql, out);
}

/* Starts redis-server again, empty, on the port and directory it had. */
static void redis_restart(void)
{
    char port[16], log[300];
    snprintf(port, sizeof(port), "%d", S.redis.port);
    snprintf(log, sizeof(log), "%s/redis.log", S.redis.dir);
    char rdb[300];
    snprintf(rdb, sizeof(rdb), "%s/dump.rdb", S.redis.dir);
    (void)unlink(rdb);
    const char *argv[] = {"redis-server",
                          "--port",
                          port,
                          "--bind",
                          "127.0.0.1",
                          "--dir",
                          S.redis.dir,
                          "--save",
                          "",
                          "--appendonly",
                          "no",
                          "--protected-mode",
                          "no",
                          "--loglevel",
                          "warning",
                          NULL};
    long long deadline = bgt_now_ms() + 10000;
    for (;;) {
        S.redis.pid = bgt_spawn(argv, NULL, log);
        cr_assert(S.redis.pid > 0);
        long long until = bgt_now_ms() + 2000;
        while (bgt_now_ms() < until) {
            const char *ping[] = {"redis-cli", "-p", port, "ping", NULL};
            char out[64];
            if (bgt_run(ping, NULL, out, sizeof(out)) == 0 && strstr(out, "PONG") != NULL)
                return;
            int st;
            if (waitpid(S.redis.pid, &st, WNOHANG) == S.redis.pid)
                break; /* the port is not free yet */
            usleep(20 * 1000);
        }
        cr_assert(bgt_now_ms() < deadline, "redis-server did not come back on port %s", port);
        usleep(100 * 1000);
    }
}

Test(admission_http, redis_lost_then_rebuilt_from_postgres_restores_exact_counts)
{
    enum { USED = 30, LIMIT = 50, LEFT = LIMIT - USED, POSTS = 200 };
    user_t u;
    new_user("rebuild@admission.example", &u);
    /* rate and concurrency out of the way, the trial's 50 a day decides */
    char sql[1024];
    snprintf(sql, sizeof(sql),
             "INSERT INTO policy_rules (type, scope, scope_id, body) VALUES "
             "('rate_limit', 'user', '%s', '{\"rpm\": 100000, \"burst\": 10000}'), "
             "('quota', 'user', '%s', '{\"requests\": %d, \"concurrency\": 0}')",
             u.id, u.id, LIMIT);
    psql(sql);
    /* 30 requests already charged in the current window (and one refunded, one failed) */
    snprintf(sql, sizeof(sql),
             "INSERT INTO usage_records (request_id, user_id, channel, token_source, status, "
             "error_class, requests_charged) "
             "SELECT 'pre-' || g, '%s'::uuid, 'web', 'provider', 'ok', NULL, 1 "
             "FROM generate_series(1, %d) g "
             "UNION ALL SELECT 'refunded', '%s'::uuid, 'web', 'provider', 'ok', NULL, 0 "
             "UNION ALL SELECT 'failed', '%s'::uuid, 'web', 'provider', 'error', 'provider_5xx', 1",
             u.id, USED, u.id, u.id);
    psql(sql);

    /* Redis dies: admission fails closed, on every edge */
    bgt_stop(S.redis.pid, SIGKILL, 2000);
    S.redis.pid = 0;
    for (int e = 0; e < EDGES; e++) {
        bgt_resp_t r;
        long st = call(e, "POST", u.path, u.token, "{\"content\":\"anyone?\"}",
                       "Prefer: respond-async", &r);
        cr_expect_eq(st, 503, "edge %d: %ld %s", e, st, r.body);
        char h[32];
        const char *ra = bgt_resp_header(&r, "retry-after", h, sizeof(h));
        cr_expect(ra != NULL && strtol(h, NULL, 10) > 0, "edge %d: no Retry-After", e);
        bgt_resp_free(&r);
    }

    /* back, empty, on the same port; the counters come from Postgres */
    redis_restart();
    bg_redis_free(S.r);
    cr_assert_eq(bg_redis_new(S.redis.url, 5000, &S.r), 0);
    char adm[160];
    key_of(adm, sizeof(adm), &u, "adm");
    cr_assert_eq(redis_int("EXISTS %s", adm), 0, "Redis did not come back empty");
    char env_db[600], env_redis[300], out[4096];
    snprintf(env_db, sizeof(env_db), "BG_DATABASE_URL=%s", S.db.url);
    snprintf(env_redis, sizeof(env_redis), "BG_REDIS_URL=%s", S.redis.url);
    const char *env[] = {env_db, env_redis, "BG_LOG_LEVEL=warn", "BG_ENV_FILE=/nonexistent", NULL};
    const char *argv[] = {bgt_bin("bgctl"), "quota", "rebuild", "--all", NULL};
    cr_assert_eq(bgt_run(argv, env, out, sizeof(out)), 0, "bgctl quota rebuild: %s", out);
    char want[128];
    snprintf(want, sizeof(want), "rebuilt %s: status=trialing plan=trial limit=%d used=%d", u.id,
             LIMIT, USED);
    cr_expect(strstr(out, want) != NULL, "bgctl quota rebuild said: %s", out);

    /* every edge sees it (each reconnects on its own; wait for it) */
    for (int e = 0; e < EDGES; e++) {
        bgt_resp_t r;
        long long deadline = bgt_now_ms() + 15000;
        long st;
        while ((st = call(e, "GET", "/billing/account", u.token, NULL, NULL, &r)) == 503 &&
               bgt_now_ms() < deadline) {
            bgt_resp_free(&r);
            usleep(100 * 1000);
        }
        cr_assert_eq(st, 200, "edge %d: %ld %s", e, st, r.body);
        cr_expect_eq(get_int(r.body, (const char *const[]){"quota", "limit", NULL}), LIMIT,
                     "edge %d: %s", e, r.body);
        cr_expect_eq(get_int(r.body, (const char *const[]){"quota", "remaining", NULL}), LEFT,
                     "edge %d: %s", e, r.body);
        bgt_resp_free(&r);
    }

    /* exactly what is left, and no more */
    tally_t t;
    burst(&u, POSTS, 7, &t);
    char stream[160];
    stream_of(stream, sizeof(stream), &u);
    long long xlen = redis_int("XLEN %s", stream);
    log_tally("rebuild", 7, &t, xlen);
    cr_expect_eq(t.admitted, LEFT, "%d admitted", t.admitted);
    cr_expect_eq(t.quota, POSTS - LEFT, "%d quota_exceeded", t.quota);
    cr_expect_eq(t.other + t.rate + t.payment, 0, "%d others, e.g. %s",
                 t.other + t.rate + t.payment, t.other_sample);
    cr_expect_eq(xlen, LEFT, "%lld jobs in the stream", xlen);
    expect_stream_is_admitted(&u, &t);
    tally_free(&t);

    bgt_resp_t r;
    cr_assert_eq(call(1, "GET", "/billing/account", u.token, NULL, NULL, &r), 200, "%s", r.body);
    cr_expect_eq(get_int(r.body, (const char *const[]){"quota", "remaining", NULL}), 0, "%s",
                 r.body);
    bgt_resp_free(&r);
}
