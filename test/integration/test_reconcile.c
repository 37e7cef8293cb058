/*
 * The quota reconciler on the real schema and a private Redis: drift made by changing Redis
 * directly is found, counted in the gauges and named in one warning line per drifting user; users
 * in step are not reported; nothing is repaired. The lock lets one holder at a time. And bg-worker
 * runs it on its own: its /metrics shows the drift and its log names the user.
 */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bg/buf.h"
#include "bg/err.h"
#include "bg/log.h"
#include "bg/metrics.h"
#include "bg/pg.h"
#include "bg/plans.h"
#include "bg/policy.h"
#include "bg/reconcile.h"
#include "bg/redis.h"
#include "bg/timeutil.h"
#include "bgtest.h"

#define SHARDS 16

static bgt_pg_t db;
static bgt_redis_t redis;
static PGconn *conn;
static bg_redis_t *rc_;

static void setup(void)
{
    cr_assert_eq(bgt_pg_create(&db, true), 0);
    cr_assert_eq(bgt_redis_start(&redis), 0);
    char err[512];
    cr_assert_eq(bg_pg_connect(db.url, 3, &conn, err, sizeof(err)), 0, "connect: %s", err);
    cr_assert_eq(bg_redis_new(redis.url, 2000, &rc_), 0);
}

static void teardown(void)
{
    bg_redis_free(rc_);
    rc_ = NULL;
    PQfinish(conn);
    conn = NULL;
    bgt_redis_stop(&redis);
    bgt_pg_drop(&db);
}

TestSuite(reconcile, .init = setup, .fini = teardown, .timeout = 120);

static char *q(const char *sql, int n, const char *const *params)
{
    PGresult *res;
    int rc = bg_pg_exec(conn, sql, n, params, &res);
    cr_assert_eq(rc, 0, "%s: %s", sql, bg_strerror(rc));
    char *v = strdup(PQntuples(res) > 0 && PQnfields(res) > 0 && !PQgetisnull(res, 0, 0)
                         ? PQgetvalue(res, 0, 0)
                         : "");
    PQclear(res);
    return v;
}

/* A user with a complimentary monthly plan, its state and counters in Redis as a rebuild makes
 * them, and `used` charged requests in Postgres. Returns the id (owned). */
static char *user_with_plan(const char *email, int used)
{
    const char *p[] = {email};
    char *id = q("INSERT INTO users (email) VALUES ($1) RETURNING id", 1, p);
    bg_plan_grant_t g = {.user_id = id, .plan_id = "monthly", .days = 30};
    bg_plan_grant_result_t res;
    cr_assert_eq(bg_plans_grant(conn, &g, NULL, &res), 0);
    for (int i = 0; i < used; i++) {
        char req[96];
        snprintf(req, sizeof(req), "%s-%d", email, i);
        const char *up[] = {req, id};
        free(q("INSERT INTO usage_records (request_id, user_id, channel, token_source, status) "
               "VALUES ($1, $2::uuid, 'web', 'provider', 'ok') RETURNING id",
               2, up));
    }
    int64_t now = bg_timeutil_wall_ms();
    bg_admission_state_t st;
    cr_assert_eq(bg_policy_compile_user(conn, id, now, &st), 0);
    cr_assert_eq(bg_policy_state_write(rc_, SHARDS, &st), 0);
    cr_assert_eq(bg_policy_quota_write(rc_, SHARDS, id, bg_policy_window_start(&st, now), used, 0),
                 0);
    return id;
}

static void redis_cmd(const char *fmt, const char *key, const char *arg)
{
    redisReply *r;
    cr_assert_eq(bg_redis_command(rc_, &r, fmt, key, arg), 0);
    cr_assert_neq(r->type, REDIS_REPLY_ERROR, "%s", r->str);
    freeReplyObject(r);
}

static void quota_key(char *out, size_t len, const char *user)
{
    cr_assert_eq(bg_policy_key_quota(out, len, SHARDS, user), 0);
}

/* Reads a whole file into a new string. */
static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "%s", path);
    char *buf = calloc(1, 1 << 20);
    size_t n = fread(buf, 1, (1 << 20) - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

Test(reconcile, drift_is_counted_logged_and_left_alone)
{
    char *ok = user_with_plan("instep@example.com", 3);
    char *bumped = user_with_plan("bumped@example.com", 3);
    char *lost = user_with_plan("lost@example.com", 2);
    /* someone wrote the counter by hand, and a state vanished (a partial flush) */
    char key[BG_REDIS_KEY_MAX];
    quota_key(key, sizeof(key), bumped);
    redis_cmd("HSET %s used %s", key, "10");
    char akey[BG_REDIS_KEY_MAX];
    cr_assert_eq(bg_policy_key_adm(akey, sizeof(akey), SHARDS, lost), 0);
    redis_cmd("DEL %s%s", akey, "");

    /* the warning lines go to stderr: catch them in a file for the length of the pass */
    char dir[256], path[300];
    cr_assert_eq(bgt_tempdir(dir, sizeof(dir)), 0);
    snprintf(path, sizeof(path), "%s/stderr.log", dir);
    bg_log_setup(BG_LOG_WARN, BG_LOG_FORMAT_TEXT, "test");
    fflush(stderr);
    int saved = dup(2);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    cr_assert(saved >= 0 && fd >= 0);
    dup2(fd, 2);
    close(fd);
    const bg_reconcile_opts_t o = {.shards = SHARDS, .recheck_ms = 50};
    bg_reconcile_result_t res;
    int rc = bg_reconcile_pass(conn, rc_, &o, &res);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    cr_assert_eq(rc, 0, "%s", bg_strerror(rc));

    cr_expect_eq(res.checked, 3);
    cr_expect_eq(res.drift_users, 2);
    cr_expect_eq(res.drift_requests, 7, "|10 - 3| = 7; the lost state's counter is still in step");
    cr_expect_eq(res.errors, 0);

    char *log = slurp(path);
    char want[256];
    snprintf(want, sizeof(want), "quota drift user=%s redis_used=10 postgres_used=3", bumped);
    cr_expect_not_null(strstr(log, want), "no line \"%s\" in:\n%s", want, log);
    snprintf(want, sizeof(want), "quota drift user=%s ", lost);
    cr_expect_not_null(strstr(log, want), "the missing state is not reported:\n%s", log);
    cr_expect_not_null(strstr(log, "redis_status=(missing)"), "%s", log);
    snprintf(want, sizeof(want), "user=%s ", ok);
    cr_expect_null(strstr(log, want), "a user in step is reported:\n%s", log);
    free(log);
    bgt_rmtree(dir);

    bg_reconcile_publish(&res);
    bg_buf_t m;
    bg_buf_init(&m, 1 << 20);
    cr_assert_eq(bg_metrics_render(&m), 0);
    cr_assert_eq(bg_buf_append(&m, "", 1), 0);
    cr_expect_not_null(strstr(m.base, "\nbg_quota_drift_users 2\n"), "%s", m.base);
    cr_expect_not_null(strstr(m.base, "\nbg_quota_drift_requests 7\n"), "%s", m.base);
    cr_expect_not_null(strstr(m.base, "\nbg_quota_reconcile_checked_users 3\n"), "%s", m.base);
    bg_buf_dispose(&m);

    /* it reports, it does not repair */
    redisReply *r;
    cr_assert_eq(bg_redis_command(rc_, &r, "HGET %s used", key), 0);
    cr_expect_str_eq(r->str, "10");
    freeReplyObject(r);
    cr_assert_eq(bg_redis_command(rc_, &r, "EXISTS %s", akey), 0);
    cr_expect_eq(r->integer, 0);
    freeReplyObject(r);

    /* the figures are stored for the workers that did not run the pass */
    cr_assert_eq(bg_reconcile_store(rc_, &res), 0);
    bg_reconcile_result_t back;
    cr_assert_eq(bg_reconcile_load(rc_, &back), 0);
    cr_expect_eq(back.drift_users, 2);
    cr_expect_eq(back.drift_requests, 7);
    cr_expect_eq(back.finished_ms, res.finished_ms);
    free(ok);
    free(bumped);
    free(lost);
}

Test(reconcile, a_counter_of_an_older_window_counts_as_zero)
{
    char *u = user_with_plan("stale@example.com", 0);
    char key[BG_REDIS_KEY_MAX];
    quota_key(key, sizeof(key), u);
    /* used 40 in a window long gone: the script starts the current one at 0, like Postgres */
    redis_cmd("HSET %s win 1000 used %s", key, "40");
    bg_reconcile_user_t cmp;
    cr_assert_eq(bg_reconcile_user(conn, rc_, SHARDS, u, bg_timeutil_wall_ms(), &cmp), 0);
    cr_expect_eq(cmp.redis_used, 0);
    cr_expect_eq(cmp.pg_used, 0);
    cr_expect_eq(cmp.pg_limit, 10000);
    cr_expect_not(bg_reconcile_user_drifts(&cmp));
    free(u);
}

Test(reconcile, one_lock_holder_at_a_time)
{
    bool held;
    cr_assert_eq(bg_reconcile_lock(rc_, "worker-a", 5000, &held), 0);
    cr_expect(held);
    cr_assert_eq(bg_reconcile_lock(rc_, "worker-b", 5000, &held), 0);
    cr_expect_not(held, "a second worker got the lock");
    cr_assert_eq(bg_reconcile_lock_extend(rc_, "worker-b", 60000, &held), 0);
    cr_expect_not(held, "a worker extended a lock it does not hold");
    cr_assert_eq(bg_reconcile_lock_extend(rc_, "worker-a", 60000, &held), 0);
    cr_expect(held);
    redisReply *r;
    cr_assert_eq(bg_redis_command(rc_, &r, "PTTL %s", BG_RECONCILE_LOCK_KEY), 0);
    cr_expect_gt(r->integer, 5000, "the lock was not extended: %lld", r->integer);
    freeReplyObject(r);

    /* a pass whose lock went to someone else stops */
    const bg_reconcile_opts_t o = {.shards = SHARDS, .lock_token = "worker-b", .lock_ttl_ms = 1000};
    bg_reconcile_result_t res;
    cr_expect_eq(bg_reconcile_pass(conn, rc_, &o, &res), BG_ERR_CONFLICT);
}

Test(reconcile, bg_worker_exports_the_drift_and_names_the_user)
{
    char *u = user_with_plan("worker@example.com", 1);
    char key[BG_REDIS_KEY_MAX];
    quota_key(key, sizeof(key), u);
    redis_cmd("HSET %s used %s", key, "6");

    char dir[256], log[300];
    cr_assert_eq(bgt_tempdir(dir, sizeof(dir)), 0);
    snprintf(log, sizeof(log), "%s/worker.log", dir);
    int port = bgt_free_port();
    char e_port[64], e_db[600], e_redis[200];
    snprintf(e_port, sizeof(e_port), "BG_WORKER_PORT=%d", port);
    snprintf(e_db, sizeof(e_db), "BG_DATABASE_URL=%s", db.url);
    snprintf(e_redis, sizeof(e_redis), "BG_REDIS_URL=%s", redis.url);
    const char *env[] = {e_port,
                         e_db,
                         e_redis,
                         "BG_ENV_FILE=/nonexistent",
                         "BG_RECONCILE_INTERVAL_S=1",
                         "BG_LOG_FORMAT=text",
                         "BG_LOG_LEVEL=info",
                         "BG_SHARDS=16",
                         NULL};
    const char *argv[] = {bgt_bin("bg-worker"), "--roles", "usage", NULL};
    pid_t pid = bgt_spawn(argv, env, log);
    cr_assert(pid > 0);
    char url[128];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/metrics", port);
    bool seen = false;
    char last[512] = "";
    for (long long t0 = bgt_now_ms(); !seen && bgt_now_ms() - t0 < 15000;) {
        bgt_resp_t r;
        if (bgt_http(BGT_H1, "GET", url, NULL, NULL, 0, &r) == 0 && r.status == 200) {
            seen = strstr(r.body, "\nbg_quota_drift_users 1\n") != NULL &&
                   strstr(r.body, "\nbg_quota_drift_requests 5\n") != NULL;
            const char *d = strstr(r.body, "bg_quota_drift");
            snprintf(last, sizeof(last), "%.200s", d != NULL ? d : "(no drift gauges yet)");
        }
        bgt_resp_free(&r);
        if (!seen)
            usleep(200 * 1000);
    }
    bgt_stop(pid, SIGTERM, 5000);
    char *text = slurp(log);
    cr_expect(seen, "bg-worker's /metrics never showed the drift; last: %s\nlog:\n%s", last, text);
    char want[256];
    snprintf(want, sizeof(want), "quota drift user=%s redis_used=6 postgres_used=1", u);
    cr_expect_not_null(strstr(text, want), "no line \"%s\" in:\n%s", want, text);
    free(text);
    bgt_rmtree(dir);
    free(u);
}
