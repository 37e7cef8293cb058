/*
 * The worker runtime end to end, with real Redis, real Postgres and real processes: a worker killed
 * in the middle of a job loses nothing and doubles nothing; a job that keeps failing ends in the
 * dead letters, where bgctl lists and replays it; SIGTERM lets running jobs finish; and bg-worker
 * itself answers its health, readiness and metrics probes.
 */
#include <criterion/criterion.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bg/config.h"
#include "bg/err.h"
#include "bg/jobs.h"
#include "bg/redis.h"
#include "bgtest.h"
#include "runtime.h"

#define SHARDS 4

static bgt_redis_t srv;
static char tmp[256];
static bg_redis_t *rc_;
static pid_t children[16]; /* processes this test started, killed at teardown if still running */
static size_t nchildren;

static pid_t track(pid_t pid)
{
    if (pid > 0 && nchildren < sizeof(children) / sizeof(children[0]))
        children[nchildren++] = pid;
    return pid;
}

static void setup(void)
{
    signal(SIGPIPE, SIG_IGN);
    /* Criterion's sandbox variable would make a child that links libcriterion (the fixture, in
     * some builds) believe it is a test sandbox too, and abort. It was read at start already. */
    unsetenv("BXFI_MAP");
    cr_assert_eq(bgt_redis_start(&srv), 0);
    cr_assert_eq(bgt_tempdir(tmp, sizeof(tmp)), 0);
    cr_assert_eq(bg_redis_new(srv.url, 2000, &rc_), 0);
}

static void teardown(void)
{
    /* a failed assertion leaves workers behind: never let them outlive the test */
    for (size_t i = 0; i < nchildren; i++) {
        int st;
        if (waitpid(children[i], &st, WNOHANG) == 0) {
            kill(children[i], SIGKILL);
            waitpid(children[i], &st, 0);
        }
    }
    nchildren = 0;
    bg_redis_free(rc_);
    rc_ = NULL;
    bgt_redis_stop(&srv);
    if (getenv("BGT_KEEP_LOGS") == NULL)
        bgt_rmtree(tmp);
}

TestSuite(worker_runtime, .init = setup, .fini = teardown, .timeout = 120);

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* ---- helpers ---- */

typedef struct st_worker_env {
    char vars[12][600];
    const char *env[13];
} worker_env_t;

static void worker_env(worker_env_t *e, const char *db_url, int claim_idle_ms, int max_deliveries,
                       int grace_ms)
{
    int n = 0;
    snprintf(e->vars[n++], 600, "BG_REDIS_URL=%s", srv.url);
    snprintf(e->vars[n++], 600, "BG_DATABASE_URL=%s",
             db_url != NULL ? db_url : "postgresql://bg@127.0.0.1:1/none");
    snprintf(e->vars[n++], 600, "BG_SHARDS=%d", SHARDS);
    snprintf(e->vars[n++], 600, "BG_CLAIM_IDLE_MS=%d", claim_idle_ms);
    snprintf(e->vars[n++], 600, "BG_MAX_DELIVERIES=%d", max_deliveries);
    snprintf(e->vars[n++], 600, "BG_SHUTDOWN_GRACE_MS=%d", grace_ms);
    snprintf(e->vars[n++], 600, "BG_WORKER_CONCURRENCY=2");
    snprintf(e->vars[n++], 600, "BG_WORKER_PORT=0");
    snprintf(e->vars[n++], 600, "BG_REDIS_TIMEOUT_MS=1000");
    snprintf(e->vars[n++], 600, "BG_LOG_FORMAT=text");
    snprintf(e->vars[n++], 600, "BG_ENV_FILE=/nonexistent");
    for (int i = 0; i < n; i++)
        e->env[i] = e->vars[i];
    e->env[n] = NULL;
}

static pid_t start_fixture(const worker_env_t *e, const char *roles, const char *name)
{
    char log[400];
    snprintf(log, sizeof(log), "%s/%s.log", tmp, name);
    const char *argv[] = {bgt_bin("../test-bin/wk_fixture"), "--roles", roles, NULL};
    pid_t pid = track(bgt_spawn(argv, e->env, log));
    cr_assert_gt(pid, 0);
    return pid;
}

static long long redis_int(const char *fmt, const char *a, const char *b)
{
    redisReply *reply = NULL;
    int rc = bg_redis_command(rc_, &reply, fmt, a, b);
    cr_assert_eq(rc, 0, "%s", bg_strerror(rc));
    long long v = reply->type == REDIS_REPLY_INTEGER ? reply->integer : -1;
    freeReplyObject(reply);
    return v;
}

static long long pending_count(const char *stream, const char *group)
{
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_command(rc_, &reply, "XPENDING %s %s", stream, group), 0);
    long long v = -1;
    if (reply->type == REDIS_REPLY_ARRAY && reply->elements >= 1)
        v = reply->element[0]->integer;
    freeReplyObject(reply);
    return v;
}

/* Number of connections blocked in XREADGROUP: workers that are reading (a consumer shows in
 * XINFO only once it has been served an entry). */
static int readers_blocked(void)
{
    redisReply *reply = NULL;
    if (bg_redis_command(rc_, &reply, "CLIENT LIST") != 0)
        return 0;
    int n = 0;
    const char *p = reply->str;
    while (p != NULL) {
        p = strstr(p, "cmd=xreadgroup");
        if (p != NULL) {
            n++;
            p++;
        }
    }
    freeReplyObject(reply);
    return n;
}

static void enqueue(const char *role, const char *job_id, const char *const *fields, size_t n,
                    int *shard_out, char *stream, size_t streamlen)
{
    int shard = bg_shard_of("user-1", SHARDS);
    bg_job_spec_t job = {shard, role, job_id, n, fields, 10000};
    char id[BG_JOBS_ENTRY_ID_MAX];
    cr_assert_eq(bg_jobs_enqueue(rc_, &job, id, sizeof(id)), 0);
    cr_assert_neq(id[0], '\0');
    if (shard_out != NULL)
        *shard_out = shard;
    if (stream != NULL)
        cr_assert_eq(bg_redis_key_queue(stream, streamlen, shard, role), 0);
}

static long long pg_count(const char *url, const char *sql, const char *param)
{
    PGconn *c = PQconnectdb(url);
    cr_assert_eq(PQstatus(c), CONNECTION_OK, "%s", PQerrorMessage(c));
    const char *params[] = {param};
    PGresult *res = PQexecParams(c, sql, param != NULL ? 1 : 0, NULL, params, NULL, NULL, 0);
    long long v = -1;
    if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1)
        v = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    PQclear(res);
    PQfinish(c);
    return v;
}

/* Polls pg_count until it is at least want; returns the last value. */
static long long pg_wait(const char *url, const char *sql, const char *param, long long want,
                         int timeout_ms)
{
    long long deadline = bgt_now_ms() + timeout_ms, v;
    for (;;) {
        v = pg_count(url, sql, param);
        if (v >= want || bgt_now_ms() > deadline)
            return v;
        sleep_ms(50);
    }
}

static bool exited_zero(int status)
{
    return status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

/* ---- scenarios ---- */

Test(worker_runtime, job_of_a_killed_worker_completes_elsewhere_exactly_once)
{
    bgt_pg_t db;
    cr_assert_eq(bgt_pg_create(&db, false), 0);
    worker_env_t e;
    worker_env(&e, db.url, 500, 5, 10000);
    pid_t w[2] = {start_fixture(&e, "effect", "w0"), start_fixture(&e, "effect", "w1")};

    char stream[BG_REDIS_KEY_MAX];
    int shard = bg_shard_of("user-1", SHARDS);
    cr_assert_eq(bg_redis_key_queue(stream, sizeof(stream), shard, "effect"), 0);
    long long deadline = bgt_now_ms() + 15000;
    while (readers_blocked() < 2) {
        cr_assert_lt(bgt_now_ms(), deadline, "the two workers did not start reading");
        sleep_ms(50);
    }

    const char *fields[] = {"sleep_ms", "3000"};
    enqueue("effect", "job-kill-1", fields, 1, NULL, NULL, 0);
    cr_assert_eq(
        pg_wait(db.url, "SELECT count(*) FROM wk_runs WHERE job_id = $1", "job-kill-1", 1, 10000),
        1, "no worker started the job");

    /* the consumer holding the job is "host:pid" */
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_command(rc_, &reply, "XPENDING %s effect - + 10", stream), 0);
    cr_assert_eq(reply->elements, 1);
    const char *consumer = reply->element[0]->element[1]->str;
    pid_t victim = (pid_t)strtol(strrchr(consumer, ':') + 1, NULL, 10);
    freeReplyObject(reply);
    cr_assert(victim == w[0] || victim == w[1], "pending on an unknown consumer");
    pid_t survivor = victim == w[0] ? w[1] : w[0];
    kill(victim, SIGKILL);
    bgt_wait(victim, 5000);

    char spid[16];
    snprintf(spid, sizeof(spid), "%d", (int)survivor);
    cr_assert_eq(pg_wait(db.url, "SELECT count(*) FROM wk_effects WHERE job_id = 'job-kill-1'",
                         NULL, 1, 20000),
                 1, "the job never completed on the other worker");
    cr_assert_eq(pg_count(db.url, "SELECT count(*) FROM wk_effects WHERE pid = $1::int", spid), 1,
                 "the effect was made by the surviving worker");
    cr_assert_eq(pg_count(db.url, "SELECT count(*) FROM wk_runs WHERE job_id = 'job-kill-1'", NULL),
                 2, "the job ran once on each worker");
    cr_assert_eq(pg_count(db.url, "SELECT max(delivery) FROM wk_runs", NULL), 2);

    deadline = bgt_now_ms() + 5000;
    while (pending_count(stream, "effect") != 0) {
        cr_assert_lt(bgt_now_ms(), deadline, "the job was not acknowledged");
        sleep_ms(50);
    }
    cr_assert(exited_zero(bgt_stop(survivor, SIGTERM, 10000)));
    cr_assert_eq(pg_count(db.url, "SELECT count(*) FROM wk_effects", NULL), 1);
    bgt_pg_drop(&db);
}

static bool dlq_entry(const char *dlq, char *job_id, size_t jlen, long long *deliveries,
                      char *error, size_t elen)
{
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_command(rc_, &reply, "XRANGE %s - +", dlq), 0);
    bool found = reply->type == REDIS_REPLY_ARRAY && reply->elements == 1;
    if (found) {
        const redisReply *f = reply->element[0]->element[1];
        for (size_t i = 0; i + 1 < f->elements; i += 2) {
            const char *k = f->element[i]->str, *v = f->element[i + 1]->str;
            if (strcmp(k, "job_id") == 0)
                snprintf(job_id, jlen, "%s", v);
            else if (strcmp(k, "dlq_deliveries") == 0)
                *deliveries = strtoll(v, NULL, 10);
            else if (strcmp(k, "dlq_error") == 0)
                snprintf(error, elen, "%s", v);
        }
    }
    freeReplyObject(reply);
    return found;
}

static void wait_dlq(const char *dlq, long long want, int timeout_ms)
{
    long long deadline = bgt_now_ms() + timeout_ms;
    while (redis_int("XLEN %s", dlq, NULL) < want) {
        cr_assert_lt(bgt_now_ms(), deadline, "nothing reached %s", dlq);
        sleep_ms(50);
    }
}

Test(worker_runtime, failing_job_is_dead_lettered_then_listed_and_replayed)
{
    worker_env_t e;
    worker_env(&e, NULL, 200, 3, 5000);
    pid_t w = start_fixture(&e, "fail", "w");
    int shard;
    char stream[BG_REDIS_KEY_MAX], dlq[BG_REDIS_KEY_MAX];
    enqueue("fail", "job-fail-1", NULL, 0, &shard, stream, sizeof(stream));
    cr_assert_eq(bg_redis_key_dlq(dlq, sizeof(dlq), shard, "fail"), 0);
    wait_dlq(dlq, 1, 20000);

    char job_id[64] = "", error[256] = "";
    long long deliveries = 0;
    cr_assert(dlq_entry(dlq, job_id, sizeof(job_id), &deliveries, error, sizeof(error)));
    cr_assert_str_eq(job_id, "job-fail-1");
    cr_assert_eq(deliveries, 3, "moved after BG_MAX_DELIVERIES deliveries, not %lld", deliveries);
    cr_assert_not_null(strstr(error, "always fails"), "last error: %s", error);
    cr_assert_eq(pending_count(stream, "fail"), 0, "a dead letter is no longer pending");
    cr_assert(exited_zero(bgt_stop(w, SIGTERM, 10000)));

    char url[200];
    snprintf(url, sizeof(url), "BG_REDIS_URL=%s", srv.url);
    const char *env[] = {url, "BG_SHARDS=4", "BG_ENV_FILE=/nonexistent", NULL};
    char out[8192];
    const char *list[] = {bgt_bin("bgctl"), "dlq", "list", "--role", "fail", NULL};
    cr_assert_eq(bgt_run(list, env, out, sizeof(out)), 0, "%s", out);
    cr_assert_not_null(strstr(out, "job-fail-1"), "%s", out);
    cr_assert_not_null(strstr(out, "always fails"), "%s", out);
    cr_assert_not_null(strstr(out, "1 dead letter(s)"), "%s", out);
    const char *list_all[] = {bgt_bin("bgctl"), "dlq", "list", NULL};
    cr_assert_eq(bgt_run(list_all, env, out, sizeof(out)), 0, "%s", out);
    cr_assert_not_null(strstr(out, "job-fail-1"), "list without --role finds it too: %s", out);

    const char *replay[] = {bgt_bin("bgctl"), "dlq", "replay", "--role", "fail", "--all", NULL};
    cr_assert_eq(bgt_run(replay, env, out, sizeof(out)), 0, "%s", out);
    cr_assert_not_null(strstr(out, "1 job(s) replayed"), "%s", out);
    cr_assert_eq(redis_int("XLEN %s", dlq, NULL), 0, "the dead letter is gone");

    /* back on its stream as a new entry, with its own fields only */
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_command(rc_, &reply, "XREVRANGE %s + - COUNT 1", stream), 0);
    cr_assert_eq(reply->elements, 1);
    const redisReply *f = reply->element[0]->element[1];
    cr_assert_eq(f->elements, 2);
    cr_assert_str_eq(f->element[0]->str, "job_id");
    cr_assert_str_eq(f->element[1]->str, "job-fail-1");
    freeReplyObject(reply);

    /* a worker runs it again with a fresh delivery count, until it is dead again */
    w = start_fixture(&e, "fail", "w-again");
    wait_dlq(dlq, 1, 20000);
    cr_assert(dlq_entry(dlq, job_id, sizeof(job_id), &deliveries, error, sizeof(error)));
    cr_assert_eq(deliveries, 3);
    cr_assert(exited_zero(bgt_stop(w, SIGTERM, 10000)));

    const char *usage[] = {bgt_bin("bgctl"), "dlq", "replay", "--all", NULL};
    cr_assert_eq(bgt_run(usage, env, out, sizeof(out)), 2, "replay needs --role: %s", out);
    const char *purge[] = {bgt_bin("bgctl"), "dlq", "purge", "--all", NULL};
    cr_assert_eq(bgt_run(purge, env, out, sizeof(out)), 0, "%s", out);
    cr_assert_not_null(strstr(out, "1 dead letter(s) purged"), "%s", out);
    cr_assert_eq(redis_int("XLEN %s", dlq, NULL), 0);
}

Test(worker_runtime, permanently_invalid_job_is_dead_lettered_at_once)
{
    worker_env_t e;
    worker_env(&e, NULL, 60000, 5, 5000);
    pid_t w = start_fixture(&e, "fail", "w");
    int shard;
    char stream[BG_REDIS_KEY_MAX], dlq[BG_REDIS_KEY_MAX];
    const char *fields[] = {"permanent", "1"};
    enqueue("fail", "job-bad-1", fields, 1, &shard, stream, sizeof(stream));
    cr_assert_eq(bg_redis_key_dlq(dlq, sizeof(dlq), shard, "fail"), 0);
    /* BG_CLAIM_IDLE_MS is a minute: only the handler's verdict can move it this fast */
    wait_dlq(dlq, 1, 5000);
    char job_id[64] = "", error[256] = "";
    long long deliveries = 0;
    cr_assert(dlq_entry(dlq, job_id, sizeof(job_id), &deliveries, error, sizeof(error)));
    cr_assert_str_eq(job_id, "job-bad-1");
    cr_assert_eq(deliveries, 1);
    cr_assert_not_null(strstr(error, "malformed on purpose"), "%s", error);
    cr_assert_eq(pending_count(stream, "fail"), 0);
    cr_assert(exited_zero(bgt_stop(w, SIGTERM, 10000)));
}

Test(worker_runtime, sigterm_lets_the_running_job_finish)
{
    bgt_pg_t db;
    cr_assert_eq(bgt_pg_create(&db, false), 0);
    worker_env_t e;
    worker_env(&e, db.url, 500, 5, 10000);
    pid_t w = start_fixture(&e, "effect", "w");
    char stream[BG_REDIS_KEY_MAX];
    const char *fields[] = {"sleep_ms", "1500"};
    enqueue("effect", "job-grace-1", fields, 1, NULL, stream, sizeof(stream));
    cr_assert_eq(
        pg_wait(db.url, "SELECT count(*) FROM wk_runs WHERE job_id = $1", "job-grace-1", 1, 15000),
        1);
    long long t0 = bgt_now_ms();
    kill(w, SIGTERM);
    int st = bgt_wait(w, 10000);
    cr_assert(exited_zero(st), "exit status %d", st);
    cr_assert_lt(bgt_now_ms() - t0, 5000);
    cr_assert_eq(
        pg_count(db.url, "SELECT count(*) FROM wk_effects WHERE job_id = $1", "job-grace-1"), 1,
        "the job finished before the worker exited");
    cr_assert_eq(pending_count(stream, "effect"), 0, "and was acknowledged");
    bgt_pg_drop(&db);
}

Test(worker_runtime, job_outliving_the_grace_period_stays_pending_for_another_worker)
{
    bgt_pg_t db;
    cr_assert_eq(bgt_pg_create(&db, false), 0);
    worker_env_t e;
    worker_env(&e, db.url, 500, 5, 300);
    pid_t w = start_fixture(&e, "effect", "w");
    char stream[BG_REDIS_KEY_MAX];
    const char *fields[] = {"sleep_ms", "4000"};
    enqueue("effect", "job-long-1", fields, 1, NULL, stream, sizeof(stream));
    cr_assert_eq(
        pg_wait(db.url, "SELECT count(*) FROM wk_runs WHERE job_id = $1", "job-long-1", 1, 15000),
        1);
    long long t0 = bgt_now_ms();
    kill(w, SIGTERM);
    int st = bgt_wait(w, 10000);
    cr_assert(exited_zero(st), "exit status %d", st);
    cr_assert_lt(bgt_now_ms() - t0, 3000, "the worker waited past its grace period");
    cr_assert_eq(pg_count(db.url, "SELECT count(*) FROM wk_effects", NULL), 0);
    cr_assert_eq(pending_count(stream, "effect"), 1, "the unfinished job is still pending");

    worker_env(&e, db.url, 500, 5, 10000);
    w = start_fixture(&e, "effect", "w-next");
    cr_assert_eq(pg_wait(db.url, "SELECT count(*) FROM wk_effects WHERE job_id = $1", "job-long-1",
                         1, 20000),
                 1, "another worker finished it");
    cr_assert(exited_zero(bgt_stop(w, SIGTERM, 10000)));
    bgt_pg_drop(&db);
}

/* ---- in process: counters ---- */

static int count_handle(wk_job_t *job, void *ud)
{
    (void)ud;
    const char *v = wk_job_field(job, "n");
    return v != NULL && strcmp(v, "odd") == 0 ? BG_ERR_RETRY : 0;
}

static void *run_thread(void *rt)
{
    static int rc;
    rc = wk_runtime_run(rt);
    return &rc;
}

/* The configuration of an in-process runtime on the test's Redis (concurrency 0: the default). */
static void runtime_config(bg_config_t *cfg, int concurrency)
{
    char err[256], n[16];
    setenv("BG_REDIS_URL", srv.url, 1);
    setenv("BG_SHARDS", "4", 1);
    setenv("BG_CLAIM_IDLE_MS", "60000", 1);
    setenv("BG_ENV_FILE", "/nonexistent", 1);
    snprintf(n, sizeof(n), "%d", concurrency);
    if (concurrency > 0)
        setenv("BG_WORKER_CONCURRENCY", n, 1);
    cr_assert_eq(bg_config_load(cfg, NULL, err, sizeof(err)), 0, "%s", err);
    unsetenv("BG_WORKER_CONCURRENCY");
}

/* Stops an in-process runtime run on thread t, checks that it ended well, and frees it. */
static void runtime_end(wk_runtime_t *rt, pthread_t t, bg_config_t *cfg)
{
    wk_runtime_stop(rt);
    void *ret = NULL;
    pthread_join(t, &ret);
    cr_assert_eq(*(int *)ret, 0);
    wk_runtime_free(rt);
    bg_config_dispose(cfg);
}

Test(worker_runtime, metrics_count_processed_and_failed_jobs_per_role)
{
    bg_config_t cfg;
    runtime_config(&cfg, 0);
    static const wk_role_t role = {"count", count_handle, NULL, NULL, NULL};
    const wk_role_t *roles[] = {&role};
    wk_runtime_t *rt = NULL;
    cr_assert_eq(wk_runtime_new(&cfg, roles, 1, &rt), 0);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, run_thread, rt), 0);
    for (int i = 0; i < 5; i++) {
        char id[32];
        snprintf(id, sizeof(id), "count-%d", i);
        const char *fields[] = {"n", i == 2 ? "odd" : "even"};
        bg_job_spec_t job = {i % SHARDS, "count", id, 1, fields, 10000};
        cr_assert_eq(bg_jobs_enqueue(rc_, &job, NULL, 0), 0);
    }
    wk_metrics_t m;
    long long deadline = bgt_now_ms() + 10000;
    do {
        sleep_ms(20);
        wk_runtime_metrics(rt, &m);
    } while (m.roles[0].processed + m.roles[0].failed < 5 && bgt_now_ms() < deadline);
    cr_assert_eq(m.nroles, 1);
    cr_assert_eq(m.roles[0].processed, 4);
    cr_assert_eq(m.roles[0].failed, 1);

    bg_buf_t b;
    bg_buf_init(&b, 65536);
    cr_assert_eq(wk_runtime_metrics_text(rt, &b), 0);
    cr_assert_not_null(strstr(b.base, "bg_worker_jobs_processed_total{role=\"count\"} 4\n"), "%s",
                       b.base);
    cr_assert_not_null(strstr(b.base, "bg_worker_jobs_failed_total{role=\"count\"} 1\n"));
    cr_assert_not_null(strstr(b.base, "# TYPE bg_worker_jobs_in_flight gauge\n"));
    cr_assert_not_null(
        strstr(b.base, "bg_worker_job_duration_seconds_count{role=\"count\",outcome=\"ok\"} 4\n"),
        "%s", b.base);
    bg_buf_dispose(&b);

    runtime_end(rt, t, &cfg);
}

/* ---- in process: each handler thread is warmed before its first job ---- */

static atomic_int warm_calls, warm_jobs, cold_jobs;

static void warm_thread(void **thread_state, void *ud)
{
    (void)ud;
    cr_assert_null(*thread_state, "warmed once per thread");
    *thread_state = bg_strdup("warm");
    atomic_fetch_add(&warm_calls, 1);
}

static void warm_dispose(void *thread_state, void *ud)
{
    (void)ud;
    free(thread_state);
}

static int warm_handle(wk_job_t *job, void *ud)
{
    (void)ud;
    bool warm = *job->thread_state != NULL && strcmp(*job->thread_state, "warm") == 0;
    atomic_fetch_add(warm ? &warm_jobs : &cold_jobs, 1);
    return 0;
}

Test(worker_runtime, every_handler_thread_is_warmed_before_its_first_job)
{
    bg_config_t cfg;
    runtime_config(&cfg, 6);
    static const wk_role_t role = {"warm", warm_handle, NULL, NULL, warm_dispose, warm_thread};
    const wk_role_t *roles[] = {&role};
    wk_runtime_t *rt = NULL;
    cr_assert_eq(wk_runtime_new(&cfg, roles, 1, &rt), 0);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, run_thread, rt), 0);
    /* all six threads are warmed without a job: a worker that has not had any is ready */
    long long deadline = bgt_now_ms() + 10000;
    while (atomic_load(&warm_calls) < 6 && bgt_now_ms() < deadline)
        sleep_ms(10);
    cr_assert_eq(atomic_load(&warm_calls), 6, "each handler thread warmed once");
    for (int i = 0; i < 20; i++) {
        char id[32];
        snprintf(id, sizeof(id), "warm-%d", i);
        const char *fields[] = {"n", "1"};
        bg_job_spec_t job = {i % SHARDS, "warm", id, 1, fields, 10000};
        cr_assert_eq(bg_jobs_enqueue(rc_, &job, NULL, 0), 0);
    }
    deadline = bgt_now_ms() + 10000;
    while (atomic_load(&warm_jobs) + atomic_load(&cold_jobs) < 20 && bgt_now_ms() < deadline)
        sleep_ms(10);
    cr_assert_eq(atomic_load(&warm_jobs), 20, "every job ran on a warmed thread");
    cr_assert_eq(atomic_load(&cold_jobs), 0);
    cr_assert_eq(atomic_load(&warm_calls), 6, "and no thread was warmed twice");
    runtime_end(rt, t, &cfg);
}

/* ---- bg-worker itself ---- */

Test(worker_runtime, bg_worker_rejects_an_unknown_role_by_name)
{
    char out[2048];
    const char *argv[] = {bgt_bin("bg-worker"), "--roles", "nosuchrole", NULL};
    cr_assert_eq(bgt_run(argv, NULL, out, sizeof(out)), 2);
    cr_assert_not_null(strstr(out, "unknown role \"nosuchrole\""), "%s", out);
}

Test(worker_runtime, bg_worker_serves_health_readiness_and_metrics)
{
    int port = bgt_free_port();
    char vars[4][300];
    snprintf(vars[0], sizeof(vars[0]), "BG_REDIS_URL=%s", srv.url);
    snprintf(vars[1], sizeof(vars[1]), "BG_WORKER_PORT=%d", port);
    snprintf(vars[2], sizeof(vars[2]), "BG_REDIS_TIMEOUT_MS=500");
    snprintf(vars[3], sizeof(vars[3]), "BG_ENV_FILE=/nonexistent");
    const char *env[] = {vars[0], vars[1], vars[2], vars[3], NULL};
    char log[400];
    snprintf(log, sizeof(log), "%s/bg-worker.log", tmp);
    /* the usage role needs nothing but the stores (the llm role also needs a provider) */
    const char *argv[] = {bgt_bin("bg-worker"), "--roles", "usage", NULL};
    pid_t w = track(bgt_spawn(argv, env, log));
    char base[64];
    snprintf(base, sizeof(base), "http://127.0.0.1:%d", port);
    char url[128];
    snprintf(url, sizeof(url), "%s/healthz", base);
    cr_assert_eq(bgt_wait_http(url, 200, 10000), 0, "no /healthz");

    bgt_resp_t resp;
    cr_assert_eq(bgt_http(BGT_H1, "GET", url, NULL, NULL, 0, &resp), 0);
    cr_assert_str_eq(resp.body, "ok");
    bgt_resp_free(&resp);
    snprintf(url, sizeof(url), "%s/metrics", base);
    cr_assert_eq(bgt_http(BGT_H1, "GET", url, NULL, NULL, 0, &resp), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_not_null(strstr(resp.body, "bg_worker_jobs_in_flight 0"), "%s", resp.body);
    bgt_resp_free(&resp);
    snprintf(url, sizeof(url), "%s/nope", base);
    cr_assert_eq(bgt_http(BGT_H1, "GET", url, NULL, NULL, 0, &resp), 0);
    cr_assert_eq(resp.status, 404);
    bgt_resp_free(&resp);
    snprintf(url, sizeof(url), "%s/readyz", base);
    cr_assert_eq(bgt_wait_http(url, 200, 5000), 0, "not ready with Redis up");

    /* Redis goes away: not ready, still healthy; it comes back: ready again */
    bgt_redis_pause(&srv, true);
    cr_assert_eq(bgt_http(BGT_H1, "GET", url, NULL, NULL, 0, &resp), 0);
    cr_assert_eq(resp.status, 503);
    bgt_resp_free(&resp);
    snprintf(url, sizeof(url), "%s/healthz", base);
    cr_assert_eq(bgt_http(BGT_H1, "GET", url, NULL, NULL, 0, &resp), 0);
    cr_assert_eq(resp.status, 200);
    bgt_resp_free(&resp);
    bgt_redis_pause(&srv, false);
    snprintf(url, sizeof(url), "%s/readyz", base);
    cr_assert_eq(bgt_wait_http(url, 200, 10000), 0, "not ready again after Redis came back");

    cr_assert(exited_zero(bgt_stop(w, SIGTERM, 10000)));
}

Test(worker_runtime, bg_worker_keeps_running_while_redis_is_down)
{
    int port = bgt_free_port();
    char vars[4][300];
    snprintf(vars[0], sizeof(vars[0]), "BG_REDIS_URL=redis://127.0.0.1:%d/0", bgt_free_port());
    snprintf(vars[1], sizeof(vars[1]), "BG_WORKER_PORT=%d", port);
    snprintf(vars[2], sizeof(vars[2]), "BG_ENV_FILE=/nonexistent");
    snprintf(vars[3], sizeof(vars[3]), "BG_LOG_FORMAT=text");
    const char *env[] = {vars[0], vars[1], vars[2], vars[3], NULL};
    char log[400];
    snprintf(log, sizeof(log), "%s/bg-worker.log", tmp);
    /* the usage role needs nothing but the stores (the llm role also needs a provider) */
    const char *argv[] = {bgt_bin("bg-worker"), "--roles", "usage", NULL};
    pid_t w = track(bgt_spawn(argv, env, log));
    char url[128];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/readyz", port);
    cr_assert_eq(bgt_wait_http(url, 503, 10000), 0, "not answering 503 while Redis is down");
    cr_assert_eq(bgt_wait(w, 300), -1, "the worker must not exit");
    cr_assert(exited_zero(bgt_stop(w, SIGTERM, 10000)));
    FILE *f = fopen(log, "r");
    cr_assert_not_null(f);
    char text[8192];
    size_t n = fread(text, 1, sizeof(text) - 1, f);
    text[n] = '\0';
    fclose(f);
    cr_assert_not_null(strstr(text, "not reachable"), "%s", text);
}

/* Runs a command and fails the test on an error reply. */
static void redis_ok(const char *fmt, const char *a, const char *b)
{
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_command(rc_, &reply, fmt, a, b), 0);
    cr_assert_neq(reply->type, REDIS_REPLY_ERROR, "%s: %s", fmt, reply->str);
    freeReplyObject(reply);
}

/*
 * lua/worker_reclaim.lua itself: an entry that has had its deliveries but is not among the idle
 * entries the scan inspects (it sees `scan` of them) is buried when the claim reaches it, with the
 * deliveries it had, and never handed out a fourth time.
 */
Test(worker_runtime, the_reclaim_script_buries_what_its_scan_missed_instead_of_running_it_again)
{
    const char *stream = "bg:{s0}:q:scan", *dlq = "bg:{s0}:dlq:scan", *errs = "bg:{s0}:qerr:scan";
    redis_ok("DEL %s %s", stream, dlq);
    redis_ok("XGROUP CREATE %s scan $ MKSTREAM", stream, NULL);
    redis_ok("XADD %s 1-1 job_id a", stream, NULL);
    redis_ok("XADD %s 1-2 job_id b", stream, NULL);
    /* three deliveries each: read once, then claimed twice */
    redis_ok("XREADGROUP GROUP scan c1 COUNT 10 STREAMS %s >", stream, NULL);
    for (int i = 0; i < 2; i++)
        redis_ok("XCLAIM %s scan c1 0 1-1 1-2", stream, NULL);
    sleep_ms(20);
    /* the scan sees one idle entry (ARGV[8] = 1); the claim takes both */
    const char *keys[] = {stream, dlq, errs};
    const char *args[] = {"scan", "c2", "10", "10", "3", "scan", "1000", "1"};
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_script(rc_, "lua/worker_reclaim.lua", 3, keys, 8, args, &reply), 0);
    cr_assert_eq(reply->type, REDIS_REPLY_ARRAY, "%s",
                 reply->type == REDIS_REPLY_ERROR ? reply->str : "");
    cr_expect_eq(reply->element[0]->integer, 2, "both buried");
    cr_expect_eq(reply->element[1]->integer, 0, "nothing pending");
    cr_expect_eq(reply->element[2]->integer, 2, "two dead letters");
    cr_expect_eq(reply->elements, 3, "nothing handed out again");
    freeReplyObject(reply);
    cr_assert_eq(bg_redis_command(rc_, &reply, "XRANGE %s - +", dlq), 0);
    cr_assert_eq(reply->elements, 2);
    for (size_t i = 0; i < reply->elements; i++) {
        const redisReply *f = reply->element[i]->element[1];
        const char *d = NULL;
        for (size_t k = 0; k + 1 < f->elements; k += 2)
            if (strcmp(f->element[k]->str, "dlq_deliveries") == 0)
                d = f->element[k + 1]->str;
        cr_expect(d != NULL && strcmp(d, "3") == 0, "dead letter %zu: %s deliveries", i,
                  d != NULL ? d : "(none)");
    }
    freeReplyObject(reply);
    redis_ok("DEL %s %s", stream, dlq);
}
