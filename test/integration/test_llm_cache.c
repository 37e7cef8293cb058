/*
 * The caches of the llm path (bg/llm_cache.h) on a private Redis and a migrated database.
 *
 * What a user would notice: a replayed reply is the reply that was stored, whole, and only for as
 * long as the agent says; only deterministic requests of agents that allow it are replayed; an
 * admin's change to an agent or its prompt reaches the replies once the agent TTL has passed (and
 * not a moment later), while a pinned version stays put; and the cache gives every thread the
 * right agent and prompt, however hard the threads churn its slots.
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bg/agents.h"
#include "bg/err.h"
#include "bg/id.h"
#include "bg/llm_cache.h"
#include "bg/pg.h"
#include "bg/prompt.h"
#include "bg/redis.h"
#include "bgtest.h"

static bgt_redis_t srv;
static bg_redis_t *rc_;
static bgt_pg_t db;
static bool have_db;
static PGconn *conn;
static const bg_actor_t admin = {
    .kind = "system", .id = NULL, .request_id = "req-test", .ip = NULL};

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void setup(void)
{
    cr_assert_eq(bgt_redis_start(&srv), 0);
    cr_assert_eq(bg_redis_new(srv.url, 5000, &rc_), 0);
    cr_assert_eq(bgt_pg_create(&db, true), 0);
    have_db = true;
    char err[512];
    cr_assert_eq(bg_pg_connect(db.url, 3, &conn, err, sizeof(err)), 0, "connect: %s", err);
}

static void teardown(void)
{
    PQfinish(conn);
    conn = NULL;
    if (have_db)
        bgt_pg_drop(&db);
    have_db = false;
    bg_redis_free(rc_);
    rc_ = NULL;
    bgt_redis_stop(&srv);
}

TestSuite(llm_cache, .init = setup, .fini = teardown, .timeout = 120);

/* ---- response cache ---- */

Test(llm_cache, the_key_covers_model_messages_and_parameters)
{
    static const char msgs[] = "[{\"role\":\"user\",\"content\":\"hi\"}]";
    static const char other[] = "[{\"role\":\"user\",\"content\":\"hi!\"}]";
    char a[BG_LLM_CACHE_KEY_SIZE], b[BG_LLM_CACHE_KEY_SIZE];
    bg_llm_cache_key(a, "demo-1", msgs, strlen(msgs), 100, 0);
    bg_llm_cache_key(b, "demo-1", msgs, strlen(msgs), 100, 0);
    cr_assert_str_eq(a, b, "the same request has the same key");
    cr_assert_eq(strncmp(a, "bg:cache:llm:", 13), 0, "%s", a);
    cr_assert_eq(strlen(a), 13 + 64);
    cr_assert_eq(strspn(a + 13, "0123456789abcdef"), 64);

    bg_llm_cache_key(b, "demo-vision-1", msgs, strlen(msgs), 100, 0);
    cr_assert_str_neq(a, b, "model");
    bg_llm_cache_key(b, "demo-1", other, strlen(other), 100, 0);
    cr_assert_str_neq(a, b, "messages");
    bg_llm_cache_key(b, "demo-1", msgs, strlen(msgs), 101, 0);
    cr_assert_str_neq(a, b, "max_tokens");
    bg_llm_cache_key(b, "demo-1", msgs, strlen(msgs), 0, 0);
    cr_assert_str_neq(a, b, "max_tokens not sent");
    bg_llm_cache_key(b, "demo-1", msgs, strlen(msgs), 100, 0.5);
    cr_assert_str_neq(a, b, "temperature");
    /* the fields cannot run into each other: "demo-1" + "1…" is not "demo-11" + "…" */
    char c[BG_LLM_CACHE_KEY_SIZE], d[BG_LLM_CACHE_KEY_SIZE];
    bg_llm_cache_key(c, "demo-1", msgs, strlen(msgs), 10, 0);
    bg_llm_cache_key(d, "demo-11", msgs, strlen(msgs), 0, 0);
    cr_assert_str_neq(c, d);
}

Test(llm_cache, only_deterministic_requests_of_caching_agents_are_cacheable)
{
    cr_assert(bg_llm_cache_is_cacheable(true, 60, 0.0));
    cr_assert_not(bg_llm_cache_is_cacheable(true, 60, 0.2), "sampling: every reply differs");
    cr_assert_not(bg_llm_cache_is_cacheable(true, 60, -1), "the provider's default temperature");
    cr_assert_not(bg_llm_cache_is_cacheable(false, 60, 0.0), "the agent does not allow it");
    cr_assert_not(bg_llm_cache_is_cacheable(true, 0, 0.0), "no TTL");
}

Test(llm_cache, a_stored_reply_comes_back_whole_for_its_ttl)
{
    char key[BG_LLM_CACHE_KEY_SIZE];
    static const char msgs[] = "[{\"role\":\"user\",\"content\":\"tell me\"}]";
    bg_llm_cache_key(key, "demo-1", msgs, strlen(msgs), 0, 0);
    bool found = true;
    bg_llm_cached_t got;
    cr_assert_eq(bg_llm_cache_get(rc_, key, &found, &got), 0);
    cr_assert_not(found, "nothing stored yet");

    char text[] = "Stra\xc3\x9f"
                  "e \"quoted\"\n\ttab \xe2\x9c\x93 done.";
    bg_llm_cached_t v = {.text = text,
                         .text_len = strlen(text),
                         .finish_reason = "length",
                         .prompt_tokens = 12,
                         .completion_tokens = 7,
                         .token_source = "provider"};
    cr_assert_eq(bg_llm_cache_put(rc_, key, &v, 30), 0);
    cr_assert_eq(bg_llm_cache_get(rc_, key, &found, &got), 0);
    cr_assert(found);
    cr_assert_eq(got.text_len, strlen(text));
    cr_assert_eq(memcmp(got.text, text, got.text_len), 0);
    cr_assert_str_eq(got.finish_reason, "length");
    cr_assert_str_eq(got.token_source, "provider");
    cr_assert_eq(got.prompt_tokens, 12);
    cr_assert_eq(got.completion_tokens, 7);
    bg_llm_cached_dispose(&got);

    redisReply *ttl = NULL;
    cr_assert_eq(bg_redis_command(rc_, &ttl, "TTL %s", key), 0);
    cr_assert_eq(ttl->type, REDIS_REPLY_INTEGER);
    cr_assert(ttl->integer > 25 && ttl->integer <= 30, "TTL %lld", (long long)ttl->integer);
    freeReplyObject(ttl);

    /* a one-second entry is gone after that second */
    cr_assert_eq(bg_llm_cache_put(rc_, key, &v, 1), 0);
    sleep_ms(2100);
    cr_assert_eq(bg_llm_cache_get(rc_, key, &found, &got), 0);
    cr_assert_not(found, "expired");
}

Test(llm_cache, only_complete_replies_are_stored)
{
    char key[BG_LLM_CACHE_KEY_SIZE];
    bg_llm_cache_key(key, "demo-1", "[]", 2, 0, 0);
    char text[] = "partial";
    bg_llm_cached_t v = {.text = text,
                         .text_len = strlen(text),
                         .finish_reason = "canceled",
                         .token_source = "provider"};
    cr_assert_eq(bg_llm_cache_put(rc_, key, &v, 30), BG_ERR_INVALID);
    (void)bg_strlcpy(v.finish_reason, "stop", sizeof(v.finish_reason));
    cr_assert_eq(bg_llm_cache_put(rc_, key, &v, 0), BG_ERR_INVALID, "no TTL, no entry");
    (void)bg_strlcpy(v.token_source, "guess", sizeof(v.token_source));
    cr_assert_eq(bg_llm_cache_put(rc_, key, &v, 30), BG_ERR_INVALID);
    bool found = true;
    bg_llm_cached_t got;
    cr_assert_eq(bg_llm_cache_get(rc_, key, &found, &got), 0);
    cr_assert_not(found);
}

Test(llm_cache, a_malformed_entry_is_a_miss_and_is_dropped)
{
    char key[BG_LLM_CACHE_KEY_SIZE];
    bg_llm_cache_key(key, "demo-1", "[1]", 3, 0, 0);
    redisReply *r = NULL;
    cr_assert_eq(bg_redis_command(rc_, &r, "SET %s %s EX 60", key, "{\"text\":\"no fields\"}"), 0);
    freeReplyObject(r);
    bool found = true;
    bg_llm_cached_t got;
    cr_assert_eq(bg_llm_cache_get(rc_, key, &found, &got), 0);
    cr_assert_not(found, "a value without its fields is never replayed");
    cr_assert_eq(bg_redis_command(rc_, &r, "EXISTS %s", key), 0);
    cr_assert_eq(r->integer, 0, "and it is gone, for the next reply to replace");
    freeReplyObject(r);
}

/* ---- definition cache ---- */

static bg_prompt_t *def(const char *json)
{
    bg_prompt_t *p;
    bg_prompt_err_t e;
    int rc = bg_prompt_parse(json, strlen(json), &p, &e);
    cr_assert_eq(rc, 0, "%s: %s %s", json, e.field, e.reason);
    return p;
}

static void create_prompt(const char *system, char id[BG_AGENT_ID_SIZE])
{
    char json[512];
    snprintf(json, sizeof(json), "{\"system\":\"%s\"}", system);
    bg_prompt_t *p = def(json);
    cr_assert_eq(bg_prompts_create(conn, NULL, "test prompt", "for tests", p, &admin, id), 0);
    bg_prompt_free(p);
}

static int publish(const char *prompt_id, const char *system)
{
    char json[512];
    snprintf(json, sizeof(json), "{\"system\":\"%s\"}", system);
    bg_prompt_t *p = def(json);
    int version = 0;
    int rc = bg_prompts_publish(conn, prompt_id, p, NULL, NULL, "a change", &admin, &version);
    cr_assert_eq(rc, 0, "publish: %s", bg_strerror(rc));
    bg_prompt_free(p);
    return version;
}

/* Creates an agent on prompt_id (NULL: none), pinned to pin (0: follows), at temperature. */
static void create_agent(const char *slug, const char *prompt_id, int pin, double temperature,
                         char id[BG_AGENT_ID_SIZE])
{
    bg_agent_spec_t s;
    bg_agent_spec_init(&s);
    s.slug = slug;
    s.name = slug;
    s.prompt_id = prompt_id;
    s.prompt_version = pin;
    s.temperature = temperature;
    bg_agent_t *a = malloc(sizeof(*a));
    bg_prompt_err_t e;
    cr_assert_eq(bg_agents_create(conn, &s, &admin, a, &e), 0, "%s %s", e.field, e.reason);
    snprintf(id, BG_AGENT_ID_SIZE, "%s", a->id);
    free(a);
}

static void set_temperature(const char *agent_id, double t)
{
    bg_agent_spec_t s;
    bg_agent_spec_init(&s);
    s.temperature = t;
    bg_agent_t *a = malloc(sizeof(*a));
    bg_prompt_err_t e;
    cr_assert_eq(bg_agents_update(conn, agent_id, &s, &admin, a, &e), 0, "%s %s", e.field,
                 e.reason);
    free(a);
}

/* Loads agent_id through d and checks what a job would use. */
static void expect(bg_llm_defs_t *d, PGconn *c, const char *agent_id, double temperature,
                   int version, const char *system)
{
    bg_agent_t *a = malloc(sizeof(*a));
    bg_llm_prompt_t *p = NULL;
    int rc = bg_llm_defs_load(d, c, agent_id, a, &p);
    cr_assert_eq(rc, 0, "load: %s", bg_strerror(rc));
    cr_assert_str_eq(a->id, agent_id);
    cr_assert_float_eq(a->temperature, temperature, 1e-9, "temperature %g, want %g", a->temperature,
                       temperature);
    cr_assert_not_null(p);
    cr_assert_eq(bg_llm_prompt_version(p), version);
    cr_assert_str_eq(bg_prompt_system(bg_llm_prompt_def(p)), system);
    bg_llm_prompt_release(p);
    free(a);
}

Test(llm_cache, an_agent_change_reaches_jobs_after_the_ttl)
{
    char pid[BG_AGENT_ID_SIZE], aid[BG_AGENT_ID_SIZE];
    create_prompt("v1", pid);
    create_agent("follower", pid, 0, 0.3, aid);
    /* 2 s: the two loads below must fall within it even on a loaded machine under ASan */
    bg_llm_defs_t *d = bg_llm_defs_new(2000, 16, 16);

    expect(d, conn, aid, 0.3, 1, "v1");
    set_temperature(aid, 0.7);
    cr_assert_eq(publish(pid, "v2"), 2);
    long long changed = bgt_now_ms();
    expect(d, conn, aid, 0.3, 1, "v1");
    bg_llm_defs_stats_t st;
    bg_llm_defs_stats(d, &st);
    cr_assert_eq(st.misses, 1);
    cr_assert_eq(st.hits, 1, "the second load did not read Postgres");
    cr_assert_lt(bgt_now_ms() - changed, 2000, "the check above ran within the TTL");

    sleep_ms(2100);
    expect(d, conn, aid, 0.7, 2, "v2");
    bg_llm_defs_stats(d, &st);
    cr_assert_eq(st.misses, 2);
    bg_llm_defs_free(d);
}

Test(llm_cache, a_pinned_agent_keeps_its_version)
{
    char pid[BG_AGENT_ID_SIZE], aid[BG_AGENT_ID_SIZE];
    create_prompt("v1", pid);
    create_agent("pinned", pid, 1, 0.2, aid);
    bg_llm_defs_t *d = bg_llm_defs_new(100, 16, 16);
    expect(d, conn, aid, 0.2, 1, "v1");
    cr_assert_eq(publish(pid, "v2"), 2);
    sleep_ms(150);
    expect(d, conn, aid, 0.2, 1, "v1");
    bg_llm_defs_free(d);
}

Test(llm_cache, unknown_agents_and_agents_without_a_prompt)
{
    bg_llm_defs_t *d = bg_llm_defs_new(5000, 16, 16);
    bg_agent_t *a = malloc(sizeof(*a));
    bg_llm_prompt_t *p = (bg_llm_prompt_t *)a; /* must be reset */
    char id[40];
    bg_id_uuid_v7_str(id);
    cr_assert_eq(bg_llm_defs_load(d, conn, id, a, &p), BG_ERR_NOT_FOUND);
    cr_assert_null(p);
    cr_assert_eq(bg_llm_defs_load(d, conn, "not-a-uuid", a, &p), BG_ERR_NOT_FOUND);

    char bare[BG_AGENT_ID_SIZE];
    create_agent("bare", NULL, 0, 0.5, bare);
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(bg_llm_defs_load(d, conn, bare, a, &p), 0);
        cr_assert_null(p, "no prompt");
        cr_assert_str_eq(a->id, bare);
    }
    /* a deleted agent is gone for good once its entry expires */
    bg_llm_defs_clear(d);
    cr_assert_eq(bg_agents_delete(conn, bare, &admin), 0);
    cr_assert_eq(bg_llm_defs_load(d, conn, bare, a, &p), BG_ERR_NOT_FOUND);
    free(a);
    bg_llm_defs_free(d);
}

Test(llm_cache, a_prompt_pushed_out_stays_valid_for_its_holder)
{
    char p1[BG_AGENT_ID_SIZE], p2[BG_AGENT_ID_SIZE], a1[BG_AGENT_ID_SIZE], a2[BG_AGENT_ID_SIZE];
    create_prompt("first {{builtin.user_name}}", p1);
    create_prompt("second", p2);
    create_agent("one", p1, 0, 0.1, a1);
    create_agent("two", p2, 0, 0.1, a2);
    /* one slot each: loading the second agent pushes the first and its prompt out */
    bg_llm_defs_t *d = bg_llm_defs_new(5000, 1, 1);
    bg_agent_t *a = malloc(sizeof(*a));
    bg_llm_prompt_t *held = NULL, *other = NULL;
    cr_assert_eq(bg_llm_defs_load(d, conn, a1, a, &held), 0);
    cr_assert_eq(bg_llm_defs_load(d, conn, a2, a, &other), 0);
    cr_assert_str_eq(bg_llm_prompt_id(other), p2);
    bg_llm_prompt_release(other);
    /* the cache goes away too: what a thread holds is still whole */
    bg_llm_defs_free(d);

    bg_buf_t out;
    bg_buf_init(&out, 1 << 16);
    const bg_prompt_builtins_t b = {.user_name = "Ada", .date = "2024-01-01"};
    cr_assert_eq(bg_prompt_render(bg_llm_prompt_def(held), NULL, &b, NULL, 0, "hi", 2, &out, NULL),
                 0);
    cr_assert(strstr(out.base, "first Ada") != NULL, "%s", out.base);
    cr_assert_str_eq(bg_llm_prompt_id(held), p1);
    bg_llm_prompt_release(held);
    bg_buf_dispose(&out);
    free(a);
}

typedef struct st_worker {
    bg_llm_defs_t *d;
    const char *url;
    const char *agents[2];
    const char *systems[2];
    double temps[2];
    int idx;
    int wrong;
    int errors;
    char first_error[300]; /* what the first error was, for the failure message */
} worker_t;

static void *churn(void *arg)
{
    worker_t *w = arg;
    PGconn *c = NULL;
    char err[256];
    /* more connect attempts than usual: the suite runs other tests' databases beside this one */
    if (bg_pg_connect(w->url, 15, &c, err, sizeof(err)) != 0) {
        w->errors++;
        snprintf(w->first_error, sizeof(w->first_error), "connect: %s", err);
        return NULL;
    }
    bg_agent_t *a = malloc(sizeof(*a));
    for (int i = 0; i < 300; i++) {
        int k = (i + w->idx) % 2;
        bg_llm_prompt_t *p = NULL;
        int rc = bg_llm_defs_load(w->d, c, w->agents[k], a, &p);
        if (rc != 0 || p == NULL) {
            if (w->errors++ == 0)
                snprintf(w->first_error, sizeof(w->first_error), "load %d: %s%s", i,
                         bg_strerror(rc), rc == 0 ? " (no prompt)" : "");
            continue;
        }
        if (strcmp(a->id, w->agents[k]) != 0 || a->temperature != w->temps[k] ||
            strcmp(bg_prompt_system(bg_llm_prompt_def(p)), w->systems[k]) != 0)
            w->wrong++;
        bg_llm_prompt_release(p);
        if (i % 50 == 0)
            bg_llm_defs_clear(w->d);
    }
    free(a);
    PQfinish(c);
    return NULL;
}

Test(llm_cache, threads_get_the_right_agent_and_prompt)
{
    char p1[BG_AGENT_ID_SIZE], p2[BG_AGENT_ID_SIZE], a1[BG_AGENT_ID_SIZE], a2[BG_AGENT_ID_SIZE];
    create_prompt("alpha", p1);
    create_prompt("beta", p2);
    create_agent("alpha", p1, 0, 0.1, a1);
    create_agent("beta", p2, 0, 0.2, a2);
    /* a short TTL, periodic clears and one prompt slot: hits, misses, expiry and eviction all
     * race (a TTL long enough that a slow, loaded machine still sees hits between clears) */
    bg_llm_defs_t *d = bg_llm_defs_new(200, 2, 1);
    enum { N = 6 };
    worker_t w[N];
    pthread_t th[N];
    for (int i = 0; i < N; i++) {
        w[i] = (worker_t){.d = d,
                          .url = db.url,
                          .agents = {a1, a2},
                          .systems = {"alpha", "beta"},
                          .temps = {0.1, 0.2},
                          .idx = i};
        cr_assert_eq(pthread_create(&th[i], NULL, churn, &w[i]), 0);
    }
    for (int i = 0; i < N; i++) {
        cr_assert_eq(pthread_join(th[i], NULL), 0);
        cr_assert_eq(w[i].errors, 0, "thread %d: %d errors, the first: %s", i, w[i].errors,
                     w[i].first_error);
        cr_assert_eq(w[i].wrong, 0, "thread %d saw another agent's data", i);
    }
    bg_llm_defs_stats_t st;
    bg_llm_defs_stats(d, &st);
    cr_assert_eq(st.hits + st.misses, (uint64_t)N * 300);
    /* whether the racing threads ever hit depends on the scheduler (one prompt slot, two prompts
     * in turn); after them, the same agent twice in a row is a hit */
    bg_agent_t *a = malloc(sizeof(*a));
    for (int i = 0; i < 2; i++) {
        bg_llm_prompt_t *p = NULL;
        cr_assert_eq(bg_llm_defs_load(d, conn, a1, a, &p), 0);
        bg_llm_prompt_release(p);
    }
    free(a);
    bg_llm_defs_stats_t after;
    bg_llm_defs_stats(d, &after);
    cr_assert_gt(after.hits, st.hits, "the cache answered nothing it had just loaded");
    bg_llm_defs_free(d);
}
