/*
 * The quota reconciler (see bg/reconcile.h): a comparison of each active user's Redis state with
 * Postgres, a pass over all of them, the gauges, and the thread that runs a pass per interval
 * under a deployment-wide lock.
 *
 * The per-user comparison is the one `bgctl quota show` prints: the state compiled now from
 * Postgres (bg_policy_compile_user), its current window, and the requests that count in it
 * (bg_policy_usage_count), against the Redis hashes as the admission script would read them. Only
 * reads: nothing here writes a user's keys, so a pass cannot make drift worse.
 *
 * The thread sleeps on a condition variable (monotonic clock) so that a stop is prompt; a pass in
 * progress checks the stop flag between users. Postgres is reached through the thread's own
 * connection (bg_pg_thread_conn), Redis through one blocking client of its own.
 */
#include "bg/reconcile.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bg/err.h"
#include "bg/log.h"
#include "bg/metrics.h"
#include "bg/pg.h"
#include "bg/policy.h"
#include "bg/policy_admin.h"
#include "bg/timeutil.h"

/* ---- one user ---- */

static int64_t reply_int(const redisReply *v)
{
    if (v == NULL || v->type != REDIS_REPLY_STRING)
        return 0;
    char *end;
    long long n = strtoll(v->str, &end, 10);
    return end != v->str && *end == '\0' ? (int64_t)n : 0;
}

static void reply_str(const redisReply *v, char *out, size_t outlen)
{
    out[0] = '\0';
    if (v != NULL && v->type == REDIS_REPLY_STRING && v->len < outlen) {
        memcpy(out, v->str, v->len);
        out[v->len] = '\0';
    }
}

/* HMGET key f1 … fn into *out (owned; an array of n). */
static int hmget(bg_redis_t *r, const char *key, const char *const *fields, int n, redisReply **out)
{
    const char *argv[8] = {"HMGET", key};
    for (int i = 0; i < n && i < 6; i++)
        argv[2 + i] = fields[i];
    int rc = bg_redis_argv(r, 2 + n, argv, NULL, out);
    if (rc == 0 && ((*out)->type != REDIS_REPLY_ARRAY || (*out)->elements != (size_t)n)) {
        freeReplyObject(*out);
        *out = NULL;
        rc = BG_ERR_PROTOCOL;
    }
    return rc;
}

int bg_reconcile_user(PGconn *c, bg_redis_t *r, int shards, const char *user_id, int64_t now_ms,
                      bg_reconcile_user_t *out)
{
    memset(out, 0, sizeof(*out));
    bg_admission_state_t st;
    int rc = bg_policy_compile_user(c, user_id, now_ms, &st);
    if (rc != 0)
        return rc;
    (void)bg_strlcpy(out->user_id, st.user_id, sizeof(out->user_id));
    (void)bg_strlcpy(out->pg_status, st.status, sizeof(out->pg_status));
    (void)bg_strlcpy(out->pg_plan, st.plan, sizeof(out->pg_plan));
    out->pg_limit = st.limits.q_limit;
    bool serves = strcmp(st.status, "none") != 0;
    if (serves) {
        out->window_start_ms = bg_policy_window_start(&st, now_ms);
        int64_t end = bg_policy_window_end(&st, now_ms);
        int64_t tused;
        rc = bg_policy_usage_count(c, st.user_id, out->window_start_ms,
                                   end > now_ms ? end : now_ms + 1, &out->pg_used, &tused);
        if (rc != 0)
            return rc;
    }

    char akey[BG_REDIS_KEY_MAX], qkey[BG_REDIS_KEY_MAX];
    if ((rc = bg_policy_key_adm(akey, sizeof(akey), shards, st.user_id)) != 0 ||
        (rc = bg_policy_key_quota(qkey, sizeof(qkey), shards, st.user_id)) != 0)
        return rc;
    static const char *const afields[] = {"status", "plan", "q_limit"};
    static const char *const qfields[] = {"win", "used"};
    redisReply *adm = NULL, *quota = NULL;
    rc = hmget(r, akey, afields, 3, &adm);
    if (rc == 0)
        rc = hmget(r, qkey, qfields, 2, &quota);
    if (rc != 0) {
        if (adm != NULL)
            freeReplyObject(adm);
        return rc;
    }
    reply_str(adm->element[0], out->redis_status, sizeof(out->redis_status));
    reply_str(adm->element[1], out->redis_plan, sizeof(out->redis_plan));
    out->redis_limit = reply_int(adm->element[2]);
    out->state_missing = serves && out->redis_status[0] == '\0';
    /* a counter of an older window is stale: the script starts the new window at zero */
    if (serves && reply_int(quota->element[0]) == out->window_start_ms)
        out->redis_used = reply_int(quota->element[1]);
    freeReplyObject(adm);
    freeReplyObject(quota);
    return 0;
}

bool bg_reconcile_user_drifts(const bg_reconcile_user_t *u)
{
    bool pg_serves = strcmp(u->pg_status, "none") != 0;
    bool redis_serves = u->redis_status[0] != '\0' && strcmp(u->redis_status, "none") != 0;
    if (!pg_serves)
        return redis_serves; /* Redis would admit a user Postgres gives nothing */
    return u->state_missing || strcmp(u->pg_status, u->redis_status) != 0 ||
           strcmp(u->pg_plan, u->redis_plan) != 0 || u->pg_limit != u->redis_limit ||
           u->pg_used != u->redis_used;
}

/* ---- a pass ---- */

static void sleep_ms(int64_t ms)
{
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

static bool stopped(const bg_reconcile_opts_t *o)
{
    return o->stop != NULL && atomic_load(o->stop);
}

/* Compares one user (with the second look) and counts the outcome into out. */
static void check_user(PGconn *c, bg_redis_t *r, const bg_reconcile_opts_t *o, const char *id,
                       bg_reconcile_result_t *out)
{
    bg_reconcile_user_t u;
    int rc = bg_reconcile_user(c, r, o->shards, id, bg_timeutil_wall_ms(), &u);
    if (rc == 0 && bg_reconcile_user_drifts(&u) && o->recheck_ms > 0) {
        sleep_ms(o->recheck_ms);
        rc = bg_reconcile_user(c, r, o->shards, id, bg_timeutil_wall_ms(), &u);
    }
    if (rc == BG_ERR_NOT_FOUND)
        return; /* deleted since it was listed */
    if (rc != 0) {
        bg_warn("reconcile: user %s not compared: %s", id, bg_strerror(rc));
        out->errors++;
        return;
    }
    out->checked++;
    if (!bg_reconcile_user_drifts(&u))
        return;
    int64_t diff = u.redis_used - u.pg_used;
    out->drift_users++;
    out->drift_requests += diff < 0 ? -diff : diff;
    bg_warn("reconcile: quota drift user=%s redis_used=%" PRId64 " postgres_used=%" PRId64
            " redis_limit=%" PRId64 " postgres_limit=%" PRId64
            " redis_status=%s postgres_status=%s redis_plan=%s postgres_plan=%s"
            " window_start_ms=%" PRId64 "; repair with: bgctl quota rebuild --user %s",
            u.user_id, u.redis_used, u.pg_used, u.redis_limit, u.pg_limit,
            u.redis_status[0] != '\0' ? u.redis_status : "(missing)", u.pg_status,
            u.redis_plan[0] != '\0' ? u.redis_plan : "-", u.pg_plan[0] != '\0' ? u.pg_plan : "-",
            u.window_start_ms, u.user_id);
}

int bg_reconcile_pass(PGconn *c, bg_redis_t *r, const bg_reconcile_opts_t *o,
                      bg_reconcile_result_t *out)
{
    memset(out, 0, sizeof(*out));
    char(*ids)[BG_POLICY_ID_SIZE] = bg_calloc(BG_RECONCILE_PAGE, sizeof(*ids));
    char after[BG_POLICY_ID_SIZE] = "";
    size_t n = 0;
    int rc = 0;
    do {
        if (o->lock_token != NULL) {
            bool held = false;
            rc = bg_reconcile_lock_extend(r, o->lock_token, o->lock_ttl_ms, &held);
            if (rc == 0 && !held)
                rc = BG_ERR_CONFLICT;
            if (rc != 0)
                break;
        }
        rc = bg_policy_admin_affected(c, "global", NULL, after, ids, BG_RECONCILE_PAGE, &n);
        if (rc != 0)
            break;
        for (size_t i = 0; i < n && rc == 0; i++) {
            if (stopped(o))
                rc = BG_ERR_CLOSED;
            else
                check_user(c, r, o, ids[i], out);
        }
        if (n > 0)
            (void)bg_strlcpy(after, ids[n - 1], sizeof(after));
    } while (rc == 0 && n == BG_RECONCILE_PAGE);
    free(ids);
    out->finished_ms = bg_timeutil_wall_ms();
    return rc;
}

/* ---- gauges and the stored result ---- */

void bg_reconcile_publish(const bg_reconcile_result_t *res)
{
    bg_metrics_gauge_set(
        bg_metrics_gauge("bg_quota_drift_users",
                         "Users whose Redis quota counter or admission state differs from "
                         "Postgres, in the last reconciler pass.",
                         NULL),
        NULL, (double)res->drift_users);
    bg_metrics_gauge_set(
        bg_metrics_gauge("bg_quota_drift_requests",
                         "Sum over drifting users of |Redis used - Postgres used| requests in the "
                         "current quota window, in the last reconciler pass.",
                         NULL),
        NULL, (double)res->drift_requests);
    bg_metrics_gauge_set(bg_metrics_gauge("bg_quota_reconcile_checked_users",
                                          "Users compared by the last reconciler pass.", NULL),
                         NULL, (double)res->checked);
    bg_metrics_gauge_set(bg_metrics_gauge("bg_quota_reconcile_errors",
                                          "Users the last reconciler pass could not compare.",
                                          NULL),
                         NULL, (double)res->errors);
    bg_metrics_gauge_set(bg_metrics_gauge("bg_quota_reconcile_last_run_timestamp_seconds",
                                          "Unix time at which the last reconciler pass ended.",
                                          NULL),
                         NULL, (double)res->finished_ms / 1000.0);
}

int bg_reconcile_store(bg_redis_t *r, const bg_reconcile_result_t *res)
{
    char v[5][24];
    snprintf(v[0], sizeof(v[0]), "%" PRId64, res->checked);
    snprintf(v[1], sizeof(v[1]), "%" PRId64, res->drift_users);
    snprintf(v[2], sizeof(v[2]), "%" PRId64, res->drift_requests);
    snprintf(v[3], sizeof(v[3]), "%" PRId64, res->errors);
    snprintf(v[4], sizeof(v[4]), "%" PRId64, res->finished_ms);
    const char *argv[] = {"HSET",           BG_RECONCILE_RESULT_KEY,
                          "checked",        v[0],
                          "drift_users",    v[1],
                          "drift_requests", v[2],
                          "errors",         v[3],
                          "finished_ms",    v[4]};
    redisReply *reply = NULL;
    int rc = bg_redis_argv(r, (int)BG_ARRAY_SIZE(argv), argv, NULL, &reply);
    if (rc == 0 && reply->type == REDIS_REPLY_ERROR)
        rc = BG_ERR_PROTOCOL;
    if (reply != NULL)
        freeReplyObject(reply);
    return rc;
}

int bg_reconcile_load(bg_redis_t *r, bg_reconcile_result_t *out)
{
    memset(out, 0, sizeof(*out));
    static const char *const fields[] = {"checked", "drift_users", "drift_requests", "errors",
                                         "finished_ms"};
    redisReply *reply;
    int rc = hmget(r, BG_RECONCILE_RESULT_KEY, fields, 5, &reply);
    if (rc != 0)
        return rc;
    if (reply->element[4]->type != REDIS_REPLY_STRING) {
        freeReplyObject(reply);
        return BG_ERR_NOT_FOUND;
    }
    out->checked = reply_int(reply->element[0]);
    out->drift_users = reply_int(reply->element[1]);
    out->drift_requests = reply_int(reply->element[2]);
    out->errors = reply_int(reply->element[3]);
    out->finished_ms = reply_int(reply->element[4]);
    freeReplyObject(reply);
    return 0;
}

/* ---- the lock ---- */

int bg_reconcile_lock(bg_redis_t *r, const char *token, int64_t ttl_ms, bool *held)
{
    *held = false;
    char ttl[24];
    snprintf(ttl, sizeof(ttl), "%" PRId64, ttl_ms);
    const char *argv[] = {"SET", BG_RECONCILE_LOCK_KEY, token, "NX", "PX", ttl};
    redisReply *reply = NULL;
    int rc = bg_redis_argv(r, (int)BG_ARRAY_SIZE(argv), argv, NULL, &reply);
    if (rc != 0)
        return rc;
    if (reply->type == REDIS_REPLY_ERROR)
        rc = BG_ERR_PROTOCOL;
    else
        *held = reply->type == REDIS_REPLY_STATUS; /* "OK"; a nil reply: someone else has it */
    freeReplyObject(reply);
    return rc;
}

int bg_reconcile_lock_extend(bg_redis_t *r, const char *token, int64_t ttl_ms, bool *held)
{
    /* compare and extend in one step: a lock that expired and went to another worker stays theirs
     */
    static const char script[] = "if redis.call('GET', KEYS[1]) == ARGV[1] then "
                                 "return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0";
    *held = false;
    char ttl[24];
    snprintf(ttl, sizeof(ttl), "%" PRId64, ttl_ms);
    const char *argv[] = {"EVAL", script, "1", BG_RECONCILE_LOCK_KEY, token, ttl};
    redisReply *reply = NULL;
    int rc = bg_redis_argv(r, (int)BG_ARRAY_SIZE(argv), argv, NULL, &reply);
    if (rc != 0)
        return rc;
    if (reply->type == REDIS_REPLY_ERROR)
        rc = BG_ERR_PROTOCOL;
    else
        *held = reply->type == REDIS_REPLY_INTEGER && reply->integer == 1;
    freeReplyObject(reply);
    return rc;
}

/* ---- the thread ---- */

struct bg_reconciler {
    const bg_config_t *cfg; /* borrowed */
    char *owner;            /* owned */
    bg_redis_t *redis;      /* owned; used by the thread only */
    int64_t interval_ms, lock_ttl_ms;
    atomic_bool stop;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t thread;
};

/* One tick: a pass when this process gets the lock, else the figures of the last one. */
static void tick(bg_reconciler_t *rec)
{
    bool held = false;
    int rc = bg_reconcile_lock(rec->redis, rec->owner, rec->lock_ttl_ms, &held);
    if (rc != 0) {
        bg_warn("reconcile: cannot reach Redis for the lock: %s", bg_strerror(rc));
        return;
    }
    bg_reconcile_result_t res;
    if (!held) {
        if (bg_reconcile_load(rec->redis, &res) == 0)
            bg_reconcile_publish(&res);
        return;
    }
    PGconn *c = bg_pg_thread_conn(rec->cfg->database_url);
    if (c == NULL) {
        bg_warn("reconcile: Postgres is not reachable; no pass this time");
        return;
    }
    uint64_t t0 = bg_timeutil_mono_ms();
    const bg_reconcile_opts_t o = {.shards = rec->cfg->shards,
                                   .recheck_ms = BG_RECONCILE_RECHECK_MS,
                                   .lock_token = rec->owner,
                                   .lock_ttl_ms = rec->lock_ttl_ms,
                                   .stop = &rec->stop};
    rc = bg_reconcile_pass(c, rec->redis, &o, &res);
    if (rc != 0) {
        if (rc != BG_ERR_CLOSED)
            bg_warn("reconcile: pass ended early: %s", bg_strerror(rc));
        return; /* a partial pass would understate drift: keep the last complete figures */
    }
    bg_reconcile_publish(&res);
    if ((rc = bg_reconcile_store(rec->redis, &res)) != 0)
        bg_warn("reconcile: cannot store the pass's figures: %s", bg_strerror(rc));
    bg_log(res.drift_users > 0 ? BG_LOG_WARN : BG_LOG_INFO,
           "reconcile: pass compared %" PRId64 " users in %llu ms: %" PRId64 " drifting (%" PRId64
           " requests), %" PRId64 " not compared",
           res.checked, (unsigned long long)(bg_timeutil_mono_ms() - t0), res.drift_users,
           res.drift_requests, res.errors);
}

static void *run(void *arg)
{
    bg_reconciler_t *rec = arg;
    bg_log_set_context("reconcile");
    for (;;) {
        struct timespec deadline;
        (void)clock_gettime(CLOCK_MONOTONIC, &deadline);
        deadline.tv_sec += (time_t)(rec->interval_ms / 1000);
        pthread_mutex_lock(&rec->mu);
        while (!atomic_load(&rec->stop) &&
               pthread_cond_timedwait(&rec->cv, &rec->mu, &deadline) == 0) {
        }
        pthread_mutex_unlock(&rec->mu);
        if (atomic_load(&rec->stop))
            break;
        tick(rec);
    }
    bg_pg_thread_close();
    bg_log_set_context(NULL);
    return NULL;
}

int bg_reconciler_start(const bg_config_t *cfg, const char *owner, bg_reconciler_t **out)
{
    *out = NULL;
    if (cfg->reconcile_interval_s <= 0)
        return 0;
    bg_reconciler_t *rec = bg_calloc(1, sizeof(*rec));
    rec->cfg = cfg;
    rec->interval_ms = cfg->reconcile_interval_s * 1000;
    /* expires a little before the next tick, so the same worker can take it again on time */
    rec->lock_ttl_ms = rec->interval_ms * 9 / 10 > 1000 ? rec->interval_ms * 9 / 10 : 1000;
    atomic_init(&rec->stop, false);
    int rc = bg_redis_new(cfg->redis_url, cfg->redis_timeout_ms, &rec->redis);
    if (rc != 0) {
        free(rec);
        return rc;
    }
    rec->owner = bg_strdup(owner);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&rec->cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&rec->mu, NULL);
    if (pthread_create(&rec->thread, NULL, run, rec) != 0) {
        bg_error("reconcile: cannot start the reconciler thread");
        pthread_cond_destroy(&rec->cv);
        pthread_mutex_destroy(&rec->mu);
        bg_redis_free(rec->redis);
        free(rec->owner);
        free(rec);
        return BG_ERR_IO;
    }
    bg_info("reconcile: quota reconciler every %lld s (one worker at a time, lock %s)",
            (long long)cfg->reconcile_interval_s, BG_RECONCILE_LOCK_KEY);
    *out = rec;
    return 0;
}

void bg_reconciler_stop(bg_reconciler_t *rec)
{
    if (rec == NULL)
        return;
    pthread_mutex_lock(&rec->mu);
    atomic_store(&rec->stop, true);
    pthread_cond_broadcast(&rec->cv);
    pthread_mutex_unlock(&rec->mu);
    pthread_join(rec->thread, NULL);
    pthread_cond_destroy(&rec->cv);
    pthread_mutex_destroy(&rec->mu);
    bg_redis_free(rec->redis);
    free(rec->owner);
    free(rec);
}
