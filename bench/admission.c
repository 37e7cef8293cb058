/*
 * admission: the cost of admitting a chat request (lua/admit.lua) and of settling it
 * (lua/settle.lua) on a real Redis.
 *
 *   bench_admission REDIS_URL [ADMITS [THREADS]]
 *
 * Every thread plays an edge process with its own connection and its own user (a full plan: rate
 * limits of the user and of an API key, a feature, a tokens cap, a token quota, a concurrency cap)
 * and runs rounds: 16 admits (16 generations in flight, so the script sees live reservations),
 * then the 16 settles. The threads admit at the same time and settle at the same time, so the
 * server's per-command statistics (INFO commandstats, read between the phases) separate the
 * admit script from the settle script. Prints one line:
 *
 *   admission evalsha_per_admit=<x> script_us_per_call=<y> admits_per_s=<z> settle_us_per_call=<s>
 *
 * evalsha_per_admit is EVALSHA calls during the admit phases over admits (1 is the design: one
 * round trip); script_us_per_call is cmdstat_evalsha usec_per_call over those phases (time inside
 * Redis, the shared resource every edge contends for); admits_per_s is admits over the wall time
 * of the admit phases, all threads together. Keys are removed at the end. Exits non-zero when any
 * admit is not admitted or any call fails.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bg/admission.h"
#include "bg/err.h"
#include "bg/policy.h"
#include "bg/redis.h"
#include "bg/timeutil.h"

#define DEFAULT_ADMITS 100000
#define DEFAULT_THREADS 4
#define MAX_THREADS 64
#define IN_FLIGHT 16
#define SHARDS 16
#define ROLE "bench"

typedef struct st_worker {
    const char *url;
    int index;
    long rounds;
    char user[64];
    pthread_barrier_t *phase;
    long failures;
    char first_error[160];
} worker_t;

static int parse_long(const char *s, long max, long *out)
{
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v <= 0 || v > max)
        return BG_ERR_INVALID;
    *out = v;
    return 0;
}

static void fail(worker_t *w, const char *what, const char *detail)
{
    if (w->failures++ == 0)
        snprintf(w->first_error, sizeof(w->first_error), "%s: %s", what, detail);
}

static void *worker_main(void *arg)
{
    worker_t *w = arg;
    bg_redis_t *r = NULL;
    if (bg_redis_new(w->url, 5000, &r) != 0)
        fail(w, "client", "bad url");
    static const char *const fields[] = {"conversation_id", "c-123456", "agent_id", "a-42",
                                         "channel",         "api",      "model",    "demo"};
    char job[IN_FLIGHT][BG_REDIS_KEY_MAX];
    bg_admission_req_t req = {.user_id = w->user,
                              .api_key_id = "bench-key",
                              .key_rpm = 60000000,
                              .key_burst = 1000000,
                              .feature = "chat",
                              .max_tokens = 256,
                              .role = ROLE,
                              .nfields = 4,
                              .fields = fields,
                              .reservation_ttl_ms = 120000,
                              .stream_maxlen = 10000};
    for (long round = 0; round < w->rounds; round++) {
        pthread_barrier_wait(w->phase); /* admit phase starts */
        for (int i = 0; i < IN_FLIGHT; i++) {
            snprintf(job[i], sizeof(job[i]), "%s-%ld-%d", w->user, round, i);
            req.job_id = job[i];
            bg_admission_decision_t d;
            int rc = r != NULL ? bg_admission_admit(r, SHARDS, &req, &d) : BG_ERR_INVALID;
            if (rc != 0)
                fail(w, "admit", bg_strerror(rc));
            else if (d.verdict != BG_ADMISSION_OK)
                fail(w, "admit denied", bg_admission_verdict_name(d.verdict));
        }
        pthread_barrier_wait(w->phase); /* admit phase done */
        pthread_barrier_wait(w->phase); /* settle phase starts */
        for (int i = 0; i < IN_FLIGHT; i++) {
            bg_admission_settle_result_t res;
            int rc = r != NULL ? bg_admission_settle(r, SHARDS, w->user, job[i], BG_ADMISSION_USE,
                                                     200, &res, NULL)
                               : BG_ERR_INVALID;
            if (rc != 0)
                fail(w, "settle", bg_strerror(rc));
            else if (res != BG_ADMISSION_SETTLED)
                fail(w, "settle", "not settled");
        }
        pthread_barrier_wait(w->phase); /* settle phase done */
    }
    bg_redis_free(r);
    return NULL;
}

typedef struct st_stat {
    long long calls;
    long long usec;
} stat_t;

/* Reads cmdstat_evalsha's calls and usec. Returns 0 or an error. */
static int read_evalsha(bg_redis_t *r, stat_t *out)
{
    redisReply *reply = NULL;
    int rc = bg_redis_command(r, &reply, "INFO commandstats");
    if (rc != 0)
        return rc;
    out->calls = 0;
    out->usec = 0;
    if (reply->type == REDIS_REPLY_STRING) {
        const char *p = strstr(reply->str, "cmdstat_evalsha:calls=");
        if (p != NULL) {
            char *end = NULL;
            out->calls = strtoll(p + strlen("cmdstat_evalsha:calls="), &end, 10);
            const char *u = strstr(end, "usec=");
            if (u != NULL)
                out->usec = strtoll(u + strlen("usec="), NULL, 10);
        }
    } else {
        rc = BG_ERR_PROTOCOL;
    }
    freeReplyObject(reply);
    return rc;
}

/* A full plan for user, written as the plan compiler writes it (bg_policy_state_write). */
static int put_config(bg_redis_t *r, const char *user)
{
    int64_t now = bg_timeutil_wall_ms();
    bg_admission_state_t st;
    memset(&st, 0, sizeof(st));
    bg_strlcpy(st.user_id, user, sizeof(st.user_id));
    bg_strlcpy(st.status, "active", sizeof(st.status));
    bg_strlcpy(st.plan, "monthly", sizeof(st.plan));
    st.w_anchor = now - 1000;
    st.w_len = 86400000;
    st.w_until = now + 30LL * 86400000;
    st.limits = (bg_policy_limits_t){.q_limit = 1000000000,
                                     .tq_limit = 1000000000000,
                                     .rpm = 60000000,
                                     .burst = 1000000,
                                     .conc = 64,
                                     .tok_cap = 4096};
    bg_strlcpy(st.limits.features, ",chat,api,", sizeof(st.limits.features));
    st.v = now;
    return bg_policy_state_write(r, SHARDS, &st);
}

/* Removes what the run left: the users' state (the key's limit with it), the markers, the
 * streams. */
static void clean_up(bg_redis_t *r, const worker_t *w, int threads)
{
    for (int t = 0; t < threads; t++) {
        bg_admission_keys_t k;
        char stream[BG_REDIS_KEY_MAX];
        if (bg_admission_keys(&k, SHARDS, w[t].user) != 0 ||
            bg_redis_key_queue(stream, sizeof(stream), k.shard, ROLE) != 0)
            continue;
        const char *argv[] = {"DEL", k.adm, k.quota, k.res, k.resd, stream};
        redisReply *reply = NULL;
        if (bg_redis_argv(r, (int)BG_ARRAY_SIZE(argv), argv, NULL, &reply) == 0)
            freeReplyObject(reply);
        /* markers expire in a day on their own; a bench server should not keep them that long */
        char pattern[BG_REDIS_KEY_MAX];
        snprintf(pattern, sizeof(pattern), "bg:{s%d}:stl:%s-*", k.shard, w[t].user);
        const char *unlink[] = {"EVAL",
                                "for _, k in ipairs(redis.call('KEYS', ARGV[1])) do "
                                "redis.call('UNLINK', k) end return 0",
                                "0", pattern};
        if (bg_redis_argv(r, 4, unlink, NULL, &reply) == 0)
            freeReplyObject(reply);
    }
}

int main(int argc, char **argv)
{
    long admits = DEFAULT_ADMITS, threads = DEFAULT_THREADS;
    if (argc < 2 || argc > 4 || (argc > 2 && parse_long(argv[2], 100000000, &admits) != 0) ||
        (argc > 3 && parse_long(argv[3], MAX_THREADS, &threads) != 0)) {
        fprintf(stderr, "usage: %s REDIS_URL [ADMITS [THREADS (1-%d)]]\n", argv[0], MAX_THREADS);
        return 2;
    }
    long rounds = admits / (threads * IN_FLIGHT);
    if (rounds < 1)
        rounds = 1;
    bg_redis_t *r = NULL;
    int rc = bg_redis_new(argv[1], 5000, &r);
    if (rc == 0)
        rc = bg_redis_connect(r);
    if (rc != 0) {
        fprintf(stderr, "admission: cannot reach redis: %s\n", bg_strerror(rc));
        bg_redis_free(r);
        return 1;
    }

    worker_t w[MAX_THREADS];
    pthread_barrier_t phase;
    if (pthread_barrier_init(&phase, NULL, (unsigned)threads + 1) != 0) {
        bg_redis_free(r);
        return 1;
    }
    for (int t = 0; t < threads; t++) {
        w[t] = (worker_t){.url = argv[1], .index = t, .rounds = rounds, .phase = &phase};
        snprintf(w[t].user, sizeof(w[t].user), "bench-%d-%d", (int)getpid(), t);
        rc = put_config(r, w[t].user);
        if (rc != 0) {
            fprintf(stderr, "admission: writing the config failed: %s\n", bg_strerror(rc));
            bg_redis_free(r);
            return 1;
        }
    }
    pthread_t th[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        if (pthread_create(&th[t], NULL, worker_main, &w[t]) != 0) {
            fprintf(stderr, "admission: cannot start threads\n");
            return 1;
        }
    }

    stat_t admit = {0}, settle = {0}, s0, s1;
    double admit_s = 0;
    int stat_rc = 0;
    for (long round = 0; round < rounds; round++) {
        stat_rc |= read_evalsha(r, &s0);
        pthread_barrier_wait(&phase);
        uint64_t t0 = bg_timeutil_mono_us();
        pthread_barrier_wait(&phase);
        admit_s += (double)(bg_timeutil_mono_us() - t0) / 1e6;
        stat_rc |= read_evalsha(r, &s1);
        admit.calls += s1.calls - s0.calls;
        admit.usec += s1.usec - s0.usec;
        pthread_barrier_wait(&phase);
        pthread_barrier_wait(&phase);
        stat_rc |= read_evalsha(r, &s0);
        settle.calls += s0.calls - s1.calls;
        settle.usec += s0.usec - s1.usec;
    }
    long failures = 0;
    for (int t = 0; t < threads; t++) {
        pthread_join(th[t], NULL);
        if (w[t].failures > 0)
            fprintf(stderr, "admission: thread %d: %ld failure(s), first %s\n", t, w[t].failures,
                    w[t].first_error);
        failures += w[t].failures;
    }
    pthread_barrier_destroy(&phase);
    clean_up(r, w, (int)threads);
    bg_redis_free(r);
    long done = rounds * threads * IN_FLIGHT;
    if (failures > 0 || stat_rc != 0 || admit.calls <= 0 || settle.calls <= 0) {
        fprintf(stderr, "admission: FAILED (%ld failure(s)%s)\n", failures,
                stat_rc != 0 ? ", INFO commandstats unreadable" : "");
        return 1;
    }
    fprintf(stderr, "admission: %ld admits and settles, %ld thread(s), %d in flight each\n", done,
            threads, IN_FLIGHT);
    printf("admission evalsha_per_admit=%.3f script_us_per_call=%.2f admits_per_s=%.0f "
           "settle_us_per_call=%.2f\n",
           (double)admit.calls / (double)done, (double)admit.usec / (double)admit.calls,
           (double)done / admit_s, (double)settle.usec / (double)settle.calls);
    return 0;
}
