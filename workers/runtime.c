/*
 * The consumer-group runtime. See runtime.h for what it promises.
 *
 * Threads, each with its own Redis connection (blocking reads need one of their own):
 *   - one reader per role: XREADGROUP … BLOCK over the role's streams of every shard, as many
 *     entries as there are free handler slots, into a local queue;
 *   - BG_WORKER_CONCURRENCY handlers: take a job, run the role's handler, then acknowledge,
 *     dead-letter or record the failure;
 *   - one reclaimer: keeps the jobs this process holds fresh (XCLAIM JUSTID) and, per role and
 *     shard, runs lua/worker_reclaim.lua, which dead-letters what was delivered too often and
 *     claims what has been idle too long (its jobs join the local queue).
 *
 * One mutex guards the queue, the counts and the table of jobs held. Three condition variables
 * (monotonic clock) wake only who waits for what changed: a queued job wakes one idle handler
 * (jobs_cv), a finished job the readers waiting for room (room_cv), and the rest (threads ending,
 * the stop) wakes the life-cycle waits (cv). One variable for all woke every idle handler for
 * every job read and every job finished: with 128 handlers on two cores that herd cost more CPU
 * than the jobs and delayed the one handler that had work. A signal handler cannot touch the
 * mutex or the variables, so wk_runtime_stop only sets an atomic flag and every wait is bounded
 * (POLL_MS) to notice it.
 *
 * Readers may overshoot capacity when several roles read at once (each sees the same free slots):
 * the local queue then holds at most roles × concurrency jobs. They are still held by this process
 * and kept fresh, and on shutdown they stay pending for another worker, so nothing is lost.
 *
 * The readers read all shards of a role in one XREADGROUP. That needs every stream on one server;
 * on Redis Cluster it would become one read per node (the hiredis 0.14 client has no cluster
 * support either).
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bg/err.h"
#include "bg/jobs.h"
#include "bg/log.h"
#include "bg/metrics.h"
#include "runtime.h"

#define READ_BLOCK_MS 500 /* longest XREADGROUP block: bounds how late a stop is noticed */
#define POLL_MS 200       /* longest condition wait: bounds how late a stop is noticed */
#define RECLAIM_SCAN 100  /* idle pending entries inspected per shard and pass */
#define ROLE_NAME_MAX 32

typedef struct st_job job_t;
struct st_job {
    job_t *next;
    int role; /* index into rt->roles */
    int shard;
    char *id;      /* owned */
    char **names;  /* owned, nfields each */
    char **values; /* owned */
    size_t nfields;
    const char *job_id; /* borrowed from values or id */
    int64_t deliveries;
};

typedef struct st_role_state {
    const wk_role_t *role; /* borrowed */
    void *ud;              /* from role->init */
    bool inited;
    char (*queues)[BG_REDIS_KEY_MAX]; /* owned: stream key per shard */
    _Atomic uint64_t processed, failed, dead, claimed;
    const char *label[1]; /* {role name}: the label values of the per-role metrics */
} role_state_t;

/* Families in the process-wide registry (bg/metrics.h); they live as long as the process. */
typedef struct st_families {
    bg_metrics_counter_t *processed, *failed, *dead, *claimed;
    bg_metrics_histogram_t *duration;
    bg_metrics_gauge_t *in_flight, *queued, *redis_up, *pending, *dead_letters;
} families_t;

/* A job this process holds (queued or running), kept fresh by the reclaimer. */
typedef struct st_held {
    int role;
    int shard;
    char id[BG_JOBS_ENTRY_ID_MAX];
} held_t;

struct wk_runtime {
    const bg_config_t *cfg; /* borrowed */
    role_state_t roles[WK_MAX_ROLES];
    size_t nroles;
    int concurrency;
    char consumer[300];
    families_t m;
    _Atomic int stop; /* set by wk_runtime_stop, possibly from a signal handler */
    _Atomic bool redis_up;

    pthread_mutex_t mu;
    pthread_cond_t cv;      /* life cycle: threads ending, the stop; pauses */
    pthread_cond_t jobs_cv; /* handlers waiting for a queued job */
    pthread_cond_t room_cv; /* readers waiting for a free handler */
    job_t *qhead, *qtail;   /* jobs read, not started */
    int queued;
    int running;
    int handlers_alive;
    int threads_alive;
    held_t *running_jobs; /* [concurrency]; role < 0 marks a free slot */

    pthread_t *handlers; /* [concurrency] */
    pthread_t readers[WK_MAX_ROLES];
    pthread_t reclaimer;
    size_t started_handlers, started_readers;
    bool started_reclaimer;
};

typedef struct st_handler_arg {
    wk_runtime_t *rt;
    int slot;
} handler_arg_t;

typedef struct st_reader_arg {
    wk_runtime_t *rt;
    int role;
} reader_arg_t;

/* ---- small helpers ---- */

static int64_t now_ms(void)
{
    return bg__redis_now_ms();
}

static bool stopping(const wk_runtime_t *rt)
{
    return atomic_load(&rt->stop) != 0;
}

/* Waits on cond (one of the runtime's) for at most ms; the caller holds rt->mu. */
static void wait_on_ms(wk_runtime_t *rt, pthread_cond_t *cond, int64_t ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += (time_t)(ms / 1000);
    ts.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    (void)pthread_cond_timedwait(cond, &rt->mu, &ts);
}

/* wait_on_ms on the life-cycle condition. */
static void wait_ms(wk_runtime_t *rt, int64_t ms)
{
    wait_on_ms(rt, &rt->cv, ms);
}

/* Sleeps up to ms, returning early when a stop was asked for. */
static void pause_ms(wk_runtime_t *rt, int64_t ms)
{
    int64_t deadline = now_ms() + ms;
    pthread_mutex_lock(&rt->mu);
    for (int64_t left = ms; left > 0 && !stopping(rt); left = deadline - now_ms())
        wait_ms(rt, left < POLL_MS ? left : POLL_MS);
    pthread_mutex_unlock(&rt->mu);
}

static void job_free(job_t *j)
{
    if (j == NULL)
        return;
    for (size_t i = 0; i < j->nfields; i++) {
        free(j->names[i]);
        free(j->values[i]);
    }
    free(j->names);
    free(j->values);
    free(j->id);
    free(j);
}

static bool is_str(const redisReply *r)
{
    return r != NULL && (r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS);
}

/* Builds a job from a stream entry [id, [name, value, …]]; returns NULL when it is malformed. */
static job_t *job_from_entry(int role, int shard, const redisReply *entry, int64_t deliveries)
{
    if (entry == NULL || entry->type != REDIS_REPLY_ARRAY || entry->elements < 2 ||
        !is_str(entry->element[0]) || entry->element[1]->type != REDIS_REPLY_ARRAY)
        return NULL;
    const redisReply *fields = entry->element[1];
    size_t n = fields->elements / 2;
    job_t *j = bg_calloc(1, sizeof(*j));
    j->role = role;
    j->shard = shard;
    j->deliveries = deliveries;
    j->id = bg_strndup(entry->element[0]->str, entry->element[0]->len);
    j->names = bg_calloc(n, sizeof(char *));
    j->values = bg_calloc(n, sizeof(char *));
    for (size_t i = 0; i < n; i++) {
        const redisReply *k = fields->element[2 * i], *v = fields->element[2 * i + 1];
        if (!is_str(k) || !is_str(v)) {
            job_free(j);
            return NULL;
        }
        j->names[i] = bg_strndup(k->str, k->len);
        j->values[i] = bg_strndup(v->str, v->len);
        j->nfields = i + 1;
        if (j->job_id == NULL && strcmp(j->names[i], BG_JOBS_FIELD_ID) == 0)
            j->job_id = j->values[i];
    }
    if (j->job_id == NULL)
        j->job_id = j->id;
    return j;
}

/* Appends jobs to the local queue; the caller holds rt->mu. */
static void enqueue_locked(wk_runtime_t *rt, job_t *j)
{
    j->next = NULL;
    if (rt->qtail != NULL)
        rt->qtail->next = j;
    else
        rt->qhead = j;
    rt->qtail = j;
    rt->queued++;
}

static void set_redis_up(wk_runtime_t *rt, bool up, int err, const char *what)
{
    bool was = atomic_exchange(&rt->redis_up, up);
    if (was && !up)
        bg_warn("worker: Redis %s: %s; retrying with backoff", what, bg_strerror(err));
    else if (!was && up)
        bg_info("worker: Redis reachable");
}

const char *wk_job_field(const wk_job_t *job, const char *name)
{
    for (size_t i = 0; i < job->nfields; i++) {
        if (strcmp(job->names[i], name) == 0)
            return job->values[i];
    }
    return NULL;
}

/* ---- reader ---- */

/* Creates the role's group on every shard stream (from the start of the stream, so jobs enqueued
 * before any worker ever ran are not skipped). Returns 0 or the transport error. */
static int ensure_groups(wk_runtime_t *rt, bg_redis_t *r, int role)
{
    role_state_t *rs = &rt->roles[role];
    for (int s = 0; s < rt->cfg->shards; s++) {
        const char *argv[] = {"XGROUP", "CREATE", rs->queues[s], rs->role->name, "0", "MKSTREAM"};
        redisReply *reply = NULL;
        int rc = bg_redis_argv(r, 6, argv, NULL, &reply);
        if (rc != 0)
            return rc;
        if (reply->type == REDIS_REPLY_ERROR && !bg_redis_reply_is_error(reply, "BUSYGROUP"))
            bg_error("worker: XGROUP CREATE %s: %s", rs->queues[s], reply->str);
        freeReplyObject(reply);
    }
    return 0;
}

static int64_t retry_delay(const bg_redis_t *r)
{
    int64_t d = bg_redis_retry_in_ms(r);
    return d < 100 ? 100 : d;
}

/* Turns an XREADGROUP reply [[key, [entry, …]], …] into queued jobs; returns how many. */
static int take_read(wk_runtime_t *rt, int role, const redisReply *reply)
{
    if (reply->type != REDIS_REPLY_ARRAY)
        return 0;
    role_state_t *rs = &rt->roles[role];
    int got = 0;
    for (size_t i = 0; i < reply->elements; i++) {
        const redisReply *stream = reply->element[i];
        if (stream->type != REDIS_REPLY_ARRAY || stream->elements < 2 ||
            !is_str(stream->element[0]) || stream->element[1]->type != REDIS_REPLY_ARRAY)
            continue;
        int shard = -1;
        for (int s = 0; s < rt->cfg->shards && shard < 0; s++) {
            if (strcmp(rs->queues[s], stream->element[0]->str) == 0)
                shard = s;
        }
        if (shard < 0)
            continue;
        const redisReply *entries = stream->element[1];
        for (size_t k = 0; k < entries->elements; k++) {
            job_t *j = job_from_entry(role, shard, entries->element[k], 1);
            if (j == NULL) {
                bg_warn("worker: skipping a malformed entry on %s", rs->queues[shard]);
                continue;
            }
            pthread_mutex_lock(&rt->mu);
            enqueue_locked(rt, j);
            pthread_cond_signal(&rt->jobs_cv);
            pthread_mutex_unlock(&rt->mu);
            got++;
        }
    }
    return got;
}

static void *reader_main(void *arg_)
{
    reader_arg_t *arg = arg_;
    wk_runtime_t *rt = arg->rt;
    int role = arg->role;
    free(arg);
    role_state_t *rs = &rt->roles[role];
    int shards = rt->cfg->shards;
    bg_redis_t *r = NULL;
    if (bg_redis_new(rt->cfg->redis_url, rt->cfg->redis_timeout_ms, &r) != 0)
        goto out; /* cannot happen: the URL was checked by wk_runtime_new */

    int argc = 9 + 2 * shards;
    const char **argv = bg_calloc((size_t)argc, sizeof(*argv));
    char count[16], block[16];
    snprintf(block, sizeof(block), "%d", READ_BLOCK_MS);
    argv[0] = "XREADGROUP";
    argv[1] = "GROUP";
    argv[2] = rs->role->name;
    argv[3] = rt->consumer;
    argv[4] = "COUNT";
    argv[5] = count;
    argv[6] = "BLOCK";
    argv[7] = block;
    argv[8] = "STREAMS";
    for (int s = 0; s < shards; s++) {
        argv[9 + s] = rs->queues[s];
        argv[9 + shards + s] = ">";
    }

    bool groups_ok = false;
    while (!stopping(rt)) {
        if (!groups_ok) {
            int rc = ensure_groups(rt, r, role);
            if (rc != 0) {
                set_redis_up(rt, false, rc, "cannot create the consumer groups");
                pause_ms(rt, retry_delay(r));
                continue;
            }
            groups_ok = true;
        }
        pthread_mutex_lock(&rt->mu);
        while (!stopping(rt) && rt->queued + rt->running >= rt->concurrency)
            wait_on_ms(rt, &rt->room_cv, POLL_MS);
        int room = rt->concurrency - rt->queued - rt->running;
        pthread_mutex_unlock(&rt->mu);
        if (stopping(rt))
            break;
        snprintf(count, sizeof(count), "%d", room);
        redisReply *reply = NULL;
        int rc = bg_redis_argv_block(r, READ_BLOCK_MS, argc, argv, NULL, &reply);
        if (rc != 0) {
            set_redis_up(rt, false, rc, "cannot read jobs");
            pause_ms(rt, retry_delay(r));
            continue;
        }
        set_redis_up(rt, true, 0, NULL);
        if (bg_redis_reply_is_error(reply, "NOGROUP")) {
            /* the streams or groups went away (a Redis restart without persistence) */
            bg_warn("worker: role %s: %s; creating the groups again", rs->role->name, reply->str);
            groups_ok = false;
        } else if (reply->type == REDIS_REPLY_ERROR) {
            bg_error("worker: XREADGROUP for role %s: %s", rs->role->name, reply->str);
            freeReplyObject(reply);
            pause_ms(rt, 1000);
            continue;
        } else {
            (void)take_read(rt, role, reply);
        }
        freeReplyObject(reply);
    }
    free(argv);
    bg_redis_free(r);
out:
    pthread_mutex_lock(&rt->mu);
    rt->threads_alive--;
    pthread_cond_broadcast(&rt->cv);
    pthread_mutex_unlock(&rt->mu);
    return NULL;
}

/* ---- handlers ---- */

static void errors_key(const wk_runtime_t *rt, const job_t *j, char *out, size_t outlen)
{
    if (bg_redis_key_errors(out, outlen, j->shard, rt->roles[j->role].role->name) != 0)
        out[0] = '\0';
}

static void ack(wk_runtime_t *rt, bg_redis_t *r, const job_t *j)
{
    role_state_t *rs = &rt->roles[j->role];
    const char *argv[] = {"XACK", rs->queues[j->shard], rs->role->name, j->id};
    redisReply *reply = NULL;
    int rc = bg_redis_argv(r, 4, argv, NULL, &reply);
    if (rc != 0) {
        /* The job stays pending and runs again later; its handler is idempotent. */
        bg_warn("worker: XACK %s failed (%s): the job will be delivered again", j->id,
                bg_strerror(rc));
        return;
    }
    freeReplyObject(reply);
    if (j->deliveries > 1) {
        /* only a job that was delivered before can have a recorded error */
        char key[BG_REDIS_KEY_MAX];
        errors_key(rt, j, key, sizeof(key));
        const char *hdel[] = {"HDEL", key, j->id};
        if (bg_redis_argv(r, 3, hdel, NULL, NULL) != 0)
            bg_debug("worker: HDEL of the last error of %s failed", j->id);
    }
}

static void record_error(wk_runtime_t *rt, bg_redis_t *r, const job_t *j, int rc,
                         const char *detail)
{
    char key[BG_REDIS_KEY_MAX], msg[320];
    errors_key(rt, j, key, sizeof(key));
    snprintf(msg, sizeof(msg), "%s%s%s", bg_strerror(rc), detail[0] != '\0' ? ": " : "", detail);
    const char *argv[] = {"HSET", key, j->id, msg};
    if (bg_redis_argv(r, 4, argv, NULL, NULL) != 0)
        bg_debug("worker: could not record the error of %s", j->id);
}

static void dead_letter(wk_runtime_t *rt, bg_redis_t *r, const job_t *j, const char *detail)
{
    role_state_t *rs = &rt->roles[j->role];
    char dlq[BG_REDIS_KEY_MAX], errs[BG_REDIS_KEY_MAX], maxlen[24], deliveries[24], msg[320];
    if (bg_redis_key_dlq(dlq, sizeof(dlq), j->shard, rs->role->name) != 0)
        return;
    errors_key(rt, j, errs, sizeof(errs));
    snprintf(maxlen, sizeof(maxlen), "%lld", (long long)rt->cfg->stream_maxlen);
    snprintf(deliveries, sizeof(deliveries), "%lld", (long long)j->deliveries);
    snprintf(msg, sizeof(msg), "%s%s%s", bg_strerror(BG_ERR_INVALID), detail[0] != '\0' ? ": " : "",
             detail);
    size_t nargs = 3 + 2 * j->nfields + 8;
    const char **args = bg_calloc(nargs, sizeof(*args));
    size_t n = 0;
    args[n++] = rs->role->name;
    args[n++] = j->id;
    args[n++] = maxlen;
    for (size_t i = 0; i < j->nfields; i++) {
        args[n++] = j->names[i];
        args[n++] = j->values[i];
    }
    args[n++] = "dlq_role";
    args[n++] = rs->role->name;
    args[n++] = "dlq_id";
    args[n++] = j->id;
    args[n++] = "dlq_deliveries";
    args[n++] = deliveries;
    args[n++] = "dlq_error";
    args[n++] = msg;
    const char *keys[] = {rs->queues[j->shard], dlq, errs};
    redisReply *reply = NULL;
    int rc = bg_redis_script(r, "lua/worker_dead.lua", 3, keys, (int)n, args, &reply);
    free(args);
    if (rc != 0) {
        bg_warn("worker: dead-lettering %s failed (%s): it will be delivered again", j->id,
                bg_strerror(rc));
        return;
    }
    if (reply->type == REDIS_REPLY_INTEGER && reply->integer == 1) {
        atomic_fetch_add(&rs->dead, 1);
        bg_metrics_counter_inc(rt->m.dead, rs->label);
        bg_warn("worker: job %s (%s) is invalid: moved to %s", j->job_id, j->id, dlq);
    } else if (reply->type == REDIS_REPLY_ERROR) {
        bg_error("worker: lua/worker_dead.lua: %s", reply->str);
    }
    freeReplyObject(reply);
}

static void run_job(wk_runtime_t *rt, bg_redis_t *r, job_t *j, void **thread_states)
{
    role_state_t *rs = &rt->roles[j->role];
    wk_job_t job = {
        .role = rs->role->name,
        .shard = j->shard,
        .id = j->id,
        .job_id = j->job_id,
        .nfields = j->nfields,
        .names = (const char *const *)j->names,
        .values = (const char *const *)j->values,
        .deliveries = j->deliveries,
        .redis = r,
        .thread_state = &thread_states[j->role],
    };
    bg_log_set_context(j->job_id);
    int64_t t0 = now_ms();
    int rc = rs->role->handler(&job, rs->ud);
    double seconds = (double)(now_ms() - t0) / 1000.0;
    job.error[sizeof(job.error) - 1] = '\0';
    const char *outcome = rc == 0 ? "ok" : rc == BG_ERR_INVALID ? "invalid" : "retry";
    const char *labels[] = {rs->role->name, outcome};
    bg_metrics_histogram_observe(rt->m.duration, labels, seconds);
    if (rc == 0) {
        ack(rt, r, j);
        atomic_fetch_add(&rs->processed, 1);
        bg_metrics_counter_inc(rt->m.processed, rs->label);
        bg_debug("worker: %s job done in %.3f s", rs->role->name, seconds);
    } else if (rc == BG_ERR_INVALID) {
        atomic_fetch_add(&rs->failed, 1);
        bg_metrics_counter_inc(rt->m.failed, rs->label);
        dead_letter(rt, r, j, job.error);
    } else {
        atomic_fetch_add(&rs->failed, 1);
        bg_metrics_counter_inc(rt->m.failed, rs->label);
        bg_warn("worker: %s job failed (delivery %lld): %s%s%s", rs->role->name,
                (long long)j->deliveries, bg_strerror(rc), job.error[0] != '\0' ? ": " : "",
                job.error);
        record_error(rt, r, j, rc, job.error);
    }
    bg_log_set_context(NULL);
}

static void *handler_main(void *arg_)
{
    handler_arg_t *arg = arg_;
    wk_runtime_t *rt = arg->rt;
    int slot = arg->slot;
    free(arg);
    void *thread_states[WK_MAX_ROLES] = {0};
    bg_redis_t *r = NULL;
    if (bg_redis_new(rt->cfg->redis_url, rt->cfg->redis_timeout_ms, &r) != 0)
        goto out;
    for (size_t i = 0; i < rt->nroles && !stopping(rt); i++) {
        const wk_role_t *role = rt->roles[i].role;
        if (role->thread_warm != NULL)
            role->thread_warm(&thread_states[i], rt->roles[i].ud);
    }
    for (;;) {
        pthread_mutex_lock(&rt->mu);
        while (!stopping(rt) && rt->qhead == NULL)
            wait_on_ms(rt, &rt->jobs_cv, POLL_MS);
        if (stopping(rt)) {
            /* jobs still queued stay pending in Redis: another worker claims them */
            pthread_mutex_unlock(&rt->mu);
            break;
        }
        job_t *j = rt->qhead;
        rt->qhead = j->next;
        if (rt->qhead == NULL)
            rt->qtail = NULL;
        rt->queued--;
        rt->running++;
        held_t *h = &rt->running_jobs[slot];
        h->role = j->role;
        h->shard = j->shard;
        (void)bg_strlcpy(h->id, j->id, sizeof(h->id));
        pthread_mutex_unlock(&rt->mu);

        run_job(rt, r, j, thread_states);

        pthread_mutex_lock(&rt->mu);
        rt->running--;
        rt->running_jobs[slot].role = -1;
        pthread_cond_broadcast(&rt->room_cv);
        pthread_mutex_unlock(&rt->mu);
        job_free(j);
    }
    bg_redis_free(r);
out:
    for (size_t i = 0; i < rt->nroles; i++) {
        const wk_role_t *role = rt->roles[i].role;
        if (thread_states[i] != NULL && role->thread_dispose != NULL)
            role->thread_dispose(thread_states[i], rt->roles[i].ud);
    }
    pthread_mutex_lock(&rt->mu);
    rt->handlers_alive--;
    rt->threads_alive--;
    pthread_cond_broadcast(&rt->cv);
    pthread_mutex_unlock(&rt->mu);
    return NULL;
}

/* ---- reclaimer ---- */

/* Resets the idle time of every job this process holds, so that no other worker claims a job
 * that is merely slow. XCLAIM with JUSTID does not count as a delivery. */
static void heartbeat(wk_runtime_t *rt, bg_redis_t *r)
{
    pthread_mutex_lock(&rt->mu);
    size_t cap = (size_t)rt->concurrency + (size_t)rt->queued;
    held_t *held = bg_calloc(cap, sizeof(*held));
    size_t n = 0;
    for (int i = 0; i < rt->concurrency && n < cap; i++) {
        if (rt->running_jobs[i].role >= 0)
            held[n++] = rt->running_jobs[i];
    }
    for (job_t *j = rt->qhead; j != NULL && n < cap; j = j->next) {
        held[n].role = j->role;
        held[n].shard = j->shard;
        (void)bg_strlcpy(held[n].id, j->id, sizeof(held[n].id));
        n++;
    }
    pthread_mutex_unlock(&rt->mu);
    for (size_t i = 0; i < n; i++) {
        role_state_t *rs = &rt->roles[held[i].role];
        const char *argv[] = {
            "XCLAIM", rs->queues[held[i].shard], rs->role->name, rt->consumer, "0", held[i].id,
            "JUSTID"};
        if (bg_redis_argv(r, 7, argv, NULL, NULL) != 0)
            break;
    }
    free(held);
}

/*
 * Handles the reply of lua/worker_reclaim.lua: {dead, pending, dead_letters, {id, fields,
 * deliveries}, …}. Adds the stream's pending entries and dead letters to *pending and
 * *dead_letters.
 */
static void take_reclaimed(wk_runtime_t *rt, int role, int shard, const redisReply *reply,
                           long long *pending, long long *dead_letters)
{
    role_state_t *rs = &rt->roles[role];
    if (reply->type == REDIS_REPLY_ERROR) {
        if (!bg_redis_reply_is_error(reply, "NOGROUP")) /* the reader creates it soon */
            bg_error("worker: lua/worker_reclaim.lua on %s: %s", rs->queues[shard], reply->str);
        return;
    }
    if (reply->type != REDIS_REPLY_ARRAY || reply->elements < 3)
        return;
    for (size_t i = 0; i < 3; i++) {
        if (reply->element[i]->type != REDIS_REPLY_INTEGER)
            return;
    }
    long long dead = reply->element[0]->integer;
    *pending += reply->element[1]->integer;
    *dead_letters += reply->element[2]->integer;
    if (dead > 0) {
        atomic_fetch_add(&rs->dead, (uint64_t)dead);
        bg_metrics_counter_add(rt->m.dead, rs->label, (double)dead);
        bg_warn("worker: moved %lld job(s) of role %s to the dead letters after %lld deliveries",
                dead, rs->role->name, (long long)rt->cfg->max_deliveries);
    }
    for (size_t i = 3; i < reply->elements; i++) {
        const redisReply *e = reply->element[i];
        if (e->type != REDIS_REPLY_ARRAY || e->elements < 3 ||
            e->element[2]->type != REDIS_REPLY_INTEGER)
            continue;
        job_t *j = job_from_entry(role, shard, e, e->element[2]->integer);
        if (j == NULL)
            continue;
        atomic_fetch_add(&rs->claimed, 1);
        bg_metrics_counter_inc(rt->m.claimed, rs->label);
        bg_info("worker: claimed %s job %s (delivery %lld)", rs->role->name, j->job_id,
                (long long)j->deliveries);
        pthread_mutex_lock(&rt->mu);
        enqueue_locked(rt, j);
        pthread_cond_signal(&rt->jobs_cv);
        pthread_mutex_unlock(&rt->mu);
    }
}

/* One pass over every role and shard; returns 0 or the transport error that ended it. */
static int reclaim_pass(wk_runtime_t *rt, bg_redis_t *r)
{
    char idle[24], maxd[24], maxlen[24], scan[16], claim[16];
    snprintf(idle, sizeof(idle), "%lld", (long long)rt->cfg->claim_idle_ms);
    snprintf(maxd, sizeof(maxd), "%lld", (long long)rt->cfg->max_deliveries);
    snprintf(maxlen, sizeof(maxlen), "%lld", (long long)rt->cfg->stream_maxlen);
    snprintf(scan, sizeof(scan), "%d", RECLAIM_SCAN);
    for (size_t role = 0; role < rt->nroles; role++) {
        role_state_t *rs = &rt->roles[role];
        long long pending = 0, dead_letters = 0;
        int s;
        for (s = 0; s < rt->cfg->shards && !stopping(rt); s++) {
            pthread_mutex_lock(&rt->mu);
            int room = rt->concurrency - rt->queued - rt->running;
            pthread_mutex_unlock(&rt->mu);
            snprintf(claim, sizeof(claim), "%d", room > 0 ? room : 0);
            char dlq[BG_REDIS_KEY_MAX], errs[BG_REDIS_KEY_MAX];
            if (bg_redis_key_dlq(dlq, sizeof(dlq), s, rs->role->name) != 0 ||
                bg_redis_key_errors(errs, sizeof(errs), s, rs->role->name) != 0)
                continue;
            const char *keys[] = {rs->queues[s], dlq, errs};
            const char *args[] = {rs->role->name, rt->consumer,   idle,   claim,
                                  maxd,           rs->role->name, maxlen, scan};
            redisReply *reply = NULL;
            int rc = bg_redis_script(r, "lua/worker_reclaim.lua", 3, keys, 8, args, &reply);
            if (rc != 0)
                return rc;
            take_reclaimed(rt, (int)role, s, reply, &pending, &dead_letters);
            freeReplyObject(reply);
        }
        if (s == rt->cfg->shards) {
            /* totals over every shard: a partial pass would under-report */
            bg_metrics_gauge_set(rt->m.pending, rs->label, (double)pending);
            bg_metrics_gauge_set(rt->m.dead_letters, rs->label, (double)dead_letters);
        }
    }
    return 0;
}

static void *reclaimer_main(void *arg)
{
    wk_runtime_t *rt = arg;
    bg_redis_t *r = NULL;
    int64_t tick = rt->cfg->claim_idle_ms / 3;
    if (tick < 20)
        tick = 20;
    if (bg_redis_new(rt->cfg->redis_url, rt->cfg->redis_timeout_ms, &r) != 0)
        goto out;
    for (;;) {
        heartbeat(rt, r);
        if (!stopping(rt)) {
            int rc = reclaim_pass(rt, r);
            if (rc != 0)
                bg_debug("worker: reclaim pass stopped: %s", bg_strerror(rc));
        }
        /* After a stop, keep the running jobs fresh until their handlers are done. */
        int64_t until = now_ms() + tick;
        pthread_mutex_lock(&rt->mu);
        bool done = stopping(rt) && rt->handlers_alive == 0;
        for (int64_t left = tick; !done && left > 0; left = until - now_ms()) {
            wait_ms(rt, left < POLL_MS ? left : POLL_MS);
            done = stopping(rt) && rt->handlers_alive == 0;
        }
        pthread_mutex_unlock(&rt->mu);
        if (done)
            break;
    }
    bg_redis_free(r);
out:
    pthread_mutex_lock(&rt->mu);
    rt->threads_alive--;
    pthread_cond_broadcast(&rt->cv);
    pthread_mutex_unlock(&rt->mu);
    return NULL;
}

/* ---- life cycle ---- */

static void register_metrics(families_t *m)
{
    static const char *const role[] = {"role", NULL};
    static const char *const role_outcome[] = {"role", "outcome", NULL};
    m->processed = bg_metrics_counter("bg_worker_jobs_processed_total",
                                      "Jobs whose handler succeeded and were acknowledged.", role);
    m->failed = bg_metrics_counter("bg_worker_jobs_failed_total",
                                   "Jobs whose handler returned an error.", role);
    m->dead = bg_metrics_counter("bg_worker_jobs_dead_lettered_total",
                                 "Jobs moved to the dead-letter stream by this process.", role);
    m->claimed = bg_metrics_counter("bg_worker_jobs_claimed_total",
                                    "Pending jobs claimed after being idle too long.", role);
    m->duration =
        bg_metrics_histogram("bg_worker_job_duration_seconds",
                             "Time spent in job handlers, by outcome.", role_outcome, NULL, 0);
    m->in_flight =
        bg_metrics_gauge("bg_worker_jobs_in_flight", "Jobs whose handler is running.", NULL);
    m->queued =
        bg_metrics_gauge("bg_worker_jobs_queued", "Jobs read and waiting for a handler.", NULL);
    m->redis_up = bg_metrics_gauge("bg_worker_redis_up",
                                   "Whether the last read of jobs from Redis worked.", NULL);
    m->pending =
        bg_metrics_gauge("bg_worker_jobs_pending",
                         "Entries pending in the role's consumer group, all shards.", role);
    m->dead_letters = bg_metrics_gauge(
        "bg_worker_dead_letters", "Entries in the role's dead-letter streams, all shards.", role);
}

static bool valid_role_name(const char *s)
{
    size_t n = s != NULL ? strlen(s) : 0;
    if (n == 0 || n > ROLE_NAME_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-'))
            return false;
    }
    return true;
}

int wk_runtime_new(const bg_config_t *cfg, const wk_role_t *const *roles, size_t nroles,
                   wk_runtime_t **out)
{
    *out = NULL;
    if (nroles > WK_MAX_ROLES || cfg->shards < 1 || cfg->worker_concurrency < 1)
        return BG_ERR_INVALID;
    bg_redis_t *probe = NULL;
    if (bg_redis_new(cfg->redis_url, cfg->redis_timeout_ms, &probe) != 0) {
        bg_error("worker: BG_REDIS_URL is not a valid redis:// URL");
        return BG_ERR_INVALID;
    }
    bg_redis_free(probe);
    for (size_t i = 0; i < nroles; i++) {
        if (!valid_role_name(roles[i]->name) || roles[i]->handler == NULL) {
            bg_error("worker: role %zu has an invalid name or no handler", i);
            return BG_ERR_INVALID;
        }
        for (size_t k = 0; k < i; k++) {
            if (strcmp(roles[i]->name, roles[k]->name) == 0) {
                bg_error("worker: role %s given twice", roles[i]->name);
                return BG_ERR_INVALID;
            }
        }
    }

    wk_runtime_t *rt = bg_calloc(1, sizeof(*rt));
    rt->cfg = cfg;
    rt->concurrency = (int)cfg->worker_concurrency;
    register_metrics(&rt->m);
    atomic_init(&rt->stop, 0);
    atomic_init(&rt->redis_up, true);
    char host[256];
    if (gethostname(host, sizeof(host)) != 0)
        (void)bg_strlcpy(host, "localhost", sizeof(host));
    host[sizeof(host) - 1] = '\0';
    snprintf(rt->consumer, sizeof(rt->consumer), "%s:%ld", host, (long)getpid());

    pthread_mutex_init(&rt->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&rt->cv, &ca);
    pthread_cond_init(&rt->jobs_cv, &ca);
    pthread_cond_init(&rt->room_cv, &ca);
    pthread_condattr_destroy(&ca);
    rt->running_jobs = bg_calloc((size_t)rt->concurrency, sizeof(held_t));
    for (int i = 0; i < rt->concurrency; i++)
        rt->running_jobs[i].role = -1;
    rt->handlers = bg_calloc((size_t)rt->concurrency, sizeof(pthread_t));

    int rc = 0;
    rt->nroles = nroles;
    for (size_t i = 0; i < nroles; i++) {
        role_state_t *rs = &rt->roles[i];
        rs->role = roles[i];
        rs->label[0] = roles[i]->name;
        rs->queues = bg_calloc((size_t)cfg->shards, sizeof(*rs->queues));
        for (int s = 0; s < cfg->shards; s++) {
            if (bg_redis_key_queue(rs->queues[s], sizeof(rs->queues[s]), s, roles[i]->name) != 0)
                rc = BG_ERR_INVALID;
        }
        atomic_init(&rs->processed, 0);
        atomic_init(&rs->failed, 0);
        atomic_init(&rs->dead, 0);
        atomic_init(&rs->claimed, 0);
        if (rc == 0 && roles[i]->init != NULL) {
            rc = roles[i]->init(cfg, &rs->ud);
            if (rc != 0)
                bg_error("worker: role %s failed to start: %s", roles[i]->name, bg_strerror(rc));
        }
        if (rc != 0)
            break;
        rs->inited = true;
    }
    if (rc != 0) {
        wk_runtime_free(rt);
        return rc;
    }
    *out = rt;
    return 0;
}

void wk_runtime_stop(wk_runtime_t *rt)
{
    atomic_store(&rt->stop, 1);
}

const char *wk_runtime_consumer(const wk_runtime_t *rt)
{
    return rt->consumer;
}

static bool start_thread(pthread_t *t, void *(*fn)(void *), void *arg)
{
    int e = pthread_create(t, NULL, fn, arg);
    if (e != 0) {
        char buf[128];
        bg_error("worker: cannot start a thread: %s", strerror_r(e, buf, sizeof(buf)));
        return false;
    }
    return true;
}

int wk_runtime_run(wk_runtime_t *rt)
{
    if (rt->nroles == 0)
        bg_info("worker: no roles registered: serving health and metrics only");
    else
        bg_info("worker %s: %zu role(s), %d handler thread(s), %d shard(s)", rt->consumer,
                rt->nroles, rt->concurrency, rt->cfg->shards);

    if (rt->nroles > 0) {
        /* threads_alive counts every started thread; set before they start so none can see 0 */
        pthread_mutex_lock(&rt->mu);
        rt->threads_alive = rt->concurrency + (int)rt->nroles + 1;
        rt->handlers_alive = rt->concurrency;
        pthread_mutex_unlock(&rt->mu);
        bool ok = true;
        for (int i = 0; i < rt->concurrency && ok; i++) {
            handler_arg_t *a = bg_malloc(sizeof(*a));
            a->rt = rt;
            a->slot = i;
            ok = start_thread(&rt->handlers[i], handler_main, a);
            if (ok)
                rt->started_handlers++;
            else
                free(a);
        }
        for (size_t i = 0; i < rt->nroles && ok; i++) {
            reader_arg_t *a = bg_malloc(sizeof(*a));
            a->rt = rt;
            a->role = (int)i;
            ok = start_thread(&rt->readers[i], reader_main, a);
            if (ok)
                rt->started_readers++;
            else
                free(a);
        }
        if (ok)
            ok = start_thread(&rt->reclaimer, reclaimer_main, rt);
        rt->started_reclaimer = ok;
        if (!ok) {
            /* account for the threads that never started, then shut down the others */
            pthread_mutex_lock(&rt->mu);
            int missing = rt->concurrency - (int)rt->started_handlers;
            rt->handlers_alive -= missing;
            rt->threads_alive -= missing + (int)(rt->nroles - rt->started_readers) + 1;
            pthread_mutex_unlock(&rt->mu);
            wk_runtime_stop(rt);
        }
    }

    pthread_mutex_lock(&rt->mu);
    while (!stopping(rt))
        wait_ms(rt, POLL_MS);
    int64_t grace = rt->cfg->shutdown_grace_ms;
    bg_info("worker: stopping; %d job(s) running, waiting up to %lld ms", rt->running,
            (long long)grace);
    pthread_cond_broadcast(&rt->cv);
    pthread_cond_broadcast(&rt->jobs_cv);
    pthread_cond_broadcast(&rt->room_cv);
    int64_t deadline = now_ms() + grace;
    for (int64_t left = grace; rt->threads_alive > 0 && left > 0; left = deadline - now_ms())
        wait_ms(rt, left < POLL_MS ? left : POLL_MS);
    int alive = rt->threads_alive, running = rt->running;
    pthread_mutex_unlock(&rt->mu);
    if (alive > 0) {
        bg_warn("worker: %d job(s) still running after %lld ms: leaving them pending", running,
                (long long)grace);
        return BG_ERR_TIMEOUT;
    }
    for (size_t i = 0; i < rt->started_handlers; i++)
        pthread_join(rt->handlers[i], NULL);
    for (size_t i = 0; i < rt->started_readers; i++)
        pthread_join(rt->readers[i], NULL);
    if (rt->started_reclaimer)
        pthread_join(rt->reclaimer, NULL);
    rt->started_handlers = rt->started_readers = 0;
    rt->started_reclaimer = false;
    bg_info("worker: stopped");
    return 0;
}

void wk_runtime_free(wk_runtime_t *rt)
{
    if (rt == NULL)
        return;
    while (rt->qhead != NULL) {
        job_t *j = rt->qhead;
        rt->qhead = j->next;
        job_free(j);
    }
    for (size_t i = 0; i < rt->nroles; i++) {
        role_state_t *rs = &rt->roles[i];
        if (rs->inited && rs->role->dispose != NULL)
            rs->role->dispose(rs->ud);
        free(rs->queues);
    }
    free(rt->running_jobs);
    free(rt->handlers);
    pthread_cond_destroy(&rt->cv);
    pthread_cond_destroy(&rt->jobs_cv);
    pthread_cond_destroy(&rt->room_cv);
    pthread_mutex_destroy(&rt->mu);
    free(rt);
}

/* ---- metrics ---- */

void wk_runtime_metrics(const wk_runtime_t *rt, wk_metrics_t *out)
{
    wk_runtime_t *mrt = (wk_runtime_t *)rt; /* the mutex is the only thing written */
    memset(out, 0, sizeof(*out));
    out->nroles = rt->nroles;
    for (size_t i = 0; i < rt->nroles; i++) {
        const role_state_t *rs = &rt->roles[i];
        out->roles[i].role = rs->role->name;
        out->roles[i].processed = atomic_load(&rs->processed);
        out->roles[i].failed = atomic_load(&rs->failed);
        out->roles[i].dead_lettered = atomic_load(&rs->dead);
        out->roles[i].claimed = atomic_load(&rs->claimed);
    }
    pthread_mutex_lock(&mrt->mu);
    out->in_flight = rt->running;
    out->queued = rt->queued;
    pthread_mutex_unlock(&mrt->mu);
    out->redis_up = atomic_load(&rt->redis_up);
}

int wk_runtime_metrics_text(const wk_runtime_t *rt, bg_buf_t *out)
{
    wk_metrics_t m;
    wk_runtime_metrics(rt, &m);
    /* gauges of the moment are set when scraped; the counters are kept up to date as jobs end */
    bg_metrics_gauge_set(rt->m.in_flight, NULL, (double)m.in_flight);
    bg_metrics_gauge_set(rt->m.queued, NULL, (double)m.queued);
    bg_metrics_gauge_set(rt->m.redis_up, NULL, m.redis_up ? 1.0 : 0.0);
    return bg_metrics_render(out);
}
