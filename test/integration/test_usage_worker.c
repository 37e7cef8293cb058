/*
 * The usage role end to end: real bg-worker processes (--roles usage) on a private Redis and a
 * migrated database. Usage events are emitted the way the llm worker emits them (bg_usage_emit);
 * reservations are made first by the real admission script, so settling is checked on real state.
 *
 * What a user would notice: a request shows up once in their usage and costs one request credit,
 * however often its event is delivered, whichever worker dies on the way; a refunded request costs
 * nothing and frees its quota; a malformed event is kept in the dead letters, not lost or retried
 * forever.
 */
#include <criterion/criterion.h>
#include <libpq-fe.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bg/admission.h"
#include "bg/err.h"
#include "bg/jobs.h"
#include "bg/policy.h"
#include "bg/redis.h"
#include "bg/timeutil.h"
#include "bg/usage.h"
#include "bgtest.h"

#define SHARDS 4
#define DAY_MS 86400000LL

static bgt_redis_t srv;
static char tmp[256];
static bg_redis_t *rc_;
static bgt_pg_t db;
static bool have_db;
static pid_t children[16];
static size_t nchildren;

static void setup(void)
{
    signal(SIGPIPE, SIG_IGN);
    unsetenv("BXFI_MAP");
    cr_assert_eq(bgt_redis_start(&srv), 0);
    cr_assert_eq(bgt_tempdir(tmp, sizeof(tmp)), 0);
    cr_assert_eq(bg_redis_new(srv.url, 5000, &rc_), 0);
}

static void teardown(void)
{
    for (size_t i = 0; i < nchildren; i++) {
        int st;
        if (waitpid(children[i], &st, WNOHANG) == 0) {
            kill(children[i], SIGKILL);
            waitpid(children[i], &st, 0);
        }
    }
    nchildren = 0;
    if (have_db)
        bgt_pg_drop(&db);
    have_db = false;
    bg_redis_free(rc_);
    rc_ = NULL;
    bgt_redis_stop(&srv);
    if (getenv("BGT_KEEP_LOGS") == NULL)
        bgt_rmtree(tmp);
}

TestSuite(usage_worker, .init = setup, .fini = teardown, .timeout = 180);

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void create_db(void)
{
    cr_assert_eq(bgt_pg_create(&db, true), 0);
    have_db = true;
}

/* ---- worker processes ---- */

typedef struct st_worker_env {
    char vars[12][600];
    const char *env[13];
} worker_env_t;

static void worker_env(worker_env_t *e, int concurrency)
{
    int n = 0;
    snprintf(e->vars[n++], 600, "BG_REDIS_URL=%s", srv.url);
    snprintf(e->vars[n++], 600, "BG_DATABASE_URL=%s", db.url);
    snprintf(e->vars[n++], 600, "BG_SHARDS=%d", SHARDS);
    snprintf(e->vars[n++], 600, "BG_CLAIM_IDLE_MS=400");
    snprintf(e->vars[n++], 600, "BG_MAX_DELIVERIES=5");
    snprintf(e->vars[n++], 600, "BG_SHUTDOWN_GRACE_MS=5000");
    snprintf(e->vars[n++], 600, "BG_WORKER_CONCURRENCY=%d", concurrency);
    snprintf(e->vars[n++], 600, "BG_WORKER_PORT=0");
    snprintf(e->vars[n++], 600, "BG_REDIS_TIMEOUT_MS=2000");
    snprintf(e->vars[n++], 600, "BG_LOG_FORMAT=text");
    snprintf(e->vars[n++], 600, "BG_ENV_FILE=/nonexistent");
    for (int i = 0; i < n; i++)
        e->env[i] = e->vars[i];
    e->env[n] = NULL;
}

static pid_t start_worker(int concurrency, const char *name)
{
    worker_env_t e;
    worker_env(&e, concurrency);
    char log[400];
    snprintf(log, sizeof(log), "%s/%s.log", tmp, name);
    const char *argv[] = {bgt_bin("bg-worker"), "--roles", "usage", NULL};
    pid_t pid = bgt_spawn(argv, e.env, log);
    cr_assert_gt(pid, 0);
    if (nchildren < BG_ARRAY_SIZE(children))
        children[nchildren++] = pid;
    return pid;
}

static void stop_worker(pid_t pid)
{
    int st = bgt_stop(pid, SIGTERM, 10000);
    cr_assert(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "worker exit status %d", st);
}

/* ---- Postgres ---- */

static PGconn *pg(void)
{
    PGconn *c = PQconnectdb(db.url);
    cr_assert_eq(PQstatus(c), CONNECTION_OK, "%s", PQerrorMessage(c));
    return c;
}

/* Runs a query returning one value; copies it into out (NULL → ""). */
static void pg_value(const char *sql, const char *param, char *out, size_t outlen)
{
    PGconn *c = pg();
    const char *params[] = {param};
    PGresult *res = PQexecParams(c, sql, param != NULL ? 1 : 0, NULL, params, NULL, NULL, 0);
    cr_assert_eq(PQresultStatus(res), PGRES_TUPLES_OK, "%s: %s", sql, PQerrorMessage(c));
    cr_assert_eq(PQntuples(res), 1, "%s", sql);
    snprintf(out, outlen, "%s", PQgetisnull(res, 0, 0) ? "" : PQgetvalue(res, 0, 0));
    PQclear(res);
    PQfinish(c);
}

static long long pg_int(const char *sql, const char *param)
{
    char v[64];
    pg_value(sql, param, v, sizeof(v));
    return v[0] != '\0' ? strtoll(v, NULL, 10) : -1;
}

static long long pg_wait(const char *sql, const char *param, long long want, int timeout_ms)
{
    long long deadline = bgt_now_ms() + timeout_ms, v;
    for (;;) {
        v = pg_int(sql, param);
        if (v >= want || bgt_now_ms() > deadline)
            return v;
        sleep_ms(25);
    }
}

static void create_user(char id[37])
{
    pg_value("INSERT INTO users (name) VALUES ('usage test') RETURNING id", NULL, id, 37);
}

/* ---- Redis ---- */

static long long redis_int(const char *fmt, const char *a, const char *b)
{
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_command(rc_, &reply, fmt, a, b), 0);
    long long v = -1;
    if (reply->type == REDIS_REPLY_INTEGER)
        v = reply->integer;
    else if (reply->type == REDIS_REPLY_STRING)
        v = strtoll(reply->str, NULL, 10);
    else if (reply->type == REDIS_REPLY_NIL)
        v = 0;
    freeReplyObject(reply);
    return v;
}

/* True when the usage group of every shard has read everything and has nothing pending. */
static bool drained(void)
{
    for (int s = 0; s < SHARDS; s++) {
        char stream[BG_REDIS_KEY_MAX];
        cr_assert_eq(bg_redis_key_queue(stream, sizeof(stream), s, "usage"), 0);
        redisReply *last = NULL, *groups = NULL;
        cr_assert_eq(bg_redis_command(rc_, &last, "XREVRANGE %s + - COUNT 1", stream), 0);
        if (last->type != REDIS_REPLY_ARRAY || last->elements == 0) {
            freeReplyObject(last);
            continue;
        }
        cr_assert_eq(bg_redis_command(rc_, &groups, "XINFO GROUPS %s", stream), 0);
        bool ok = false;
        for (size_t g = 0; groups->type == REDIS_REPLY_ARRAY && g < groups->elements; g++) {
            const redisReply *info = groups->element[g];
            const char *name = NULL, *delivered = NULL;
            long long pending = -1;
            for (size_t i = 0; i + 1 < info->elements; i += 2) {
                const char *k = info->element[i]->str;
                const redisReply *v = info->element[i + 1];
                if (strcmp(k, "name") == 0)
                    name = v->str;
                else if (strcmp(k, "pending") == 0)
                    pending = v->integer;
                else if (strcmp(k, "last-delivered-id") == 0)
                    delivered = v->str;
            }
            if (name != NULL && strcmp(name, "usage") == 0)
                ok = pending == 0 && delivered != NULL &&
                     strcmp(delivered, last->element[0]->element[0]->str) == 0;
        }
        freeReplyObject(groups);
        freeReplyObject(last);
        if (!ok)
            return false;
    }
    return true;
}

static void wait_drained(int timeout_ms)
{
    long long deadline = bgt_now_ms() + timeout_ms;
    while (!drained()) {
        cr_assert_lt(bgt_now_ms(), deadline, "the usage streams were not drained");
        sleep_ms(25);
    }
}

static void cmd_ok(int argc, const char *const *argv)
{
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_argv(rc_, argc, argv, NULL, &reply), 0);
    cr_assert_neq(reply->type, REDIS_REPLY_ERROR, "%s: %s", argv[0], reply->str);
    freeReplyObject(reply);
}

/* An active plan for uid: 10000 requests a day, no rate or concurrency limits. */
static void put_config(const char *uid)
{
    /* as the plan compiler writes it (the fields and the script's packed copy) */
    long long now = bg_timeutil_wall_ms();
    bg_admission_state_t st;
    memset(&st, 0, sizeof(st));
    bg_strlcpy(st.user_id, uid, sizeof(st.user_id));
    bg_strlcpy(st.status, "active", sizeof(st.status));
    bg_strlcpy(st.plan, "monthly", sizeof(st.plan));
    st.w_anchor = now - 1000;
    st.w_len = DAY_MS;
    st.w_until = now + 30 * DAY_MS;
    st.limits = (bg_policy_limits_t){.q_limit = 10000, .burst = 1};
    bg_strlcpy(st.limits.features, ",chat,api,", sizeof(st.limits.features));
    st.v = now;
    cr_assert_eq(bg_policy_state_write(rc_, SHARDS, &st), 0);
}

/* Reserves quota for job (as the edge does before the llm job runs). */
static void admit(const char *uid, const char *job)
{
    static const char *const fields[] = {"conversation_id", "c-1"};
    bg_admission_req_t req = {.user_id = uid,
                              .role = "llm",
                              .job_id = job,
                              .nfields = 1,
                              .fields = fields,
                              .reservation_ttl_ms = 600000,
                              .stream_maxlen = 100000};
    bg_admission_decision_t d;
    int rc = bg_admission_admit(rc_, SHARDS, &req, &d);
    cr_assert_eq(rc, 0, "%s", bg_strerror(rc));
    cr_assert_eq(d.verdict, BG_ADMISSION_OK, "%s", bg_admission_verdict_name(d.verdict));
}

static bg_admission_keys_t keys_of(const char *uid)
{
    bg_admission_keys_t k;
    cr_assert_eq(bg_admission_keys(&k, SHARDS, uid), 0);
    return k;
}

/* ---- events ---- */

static bg_usage_event_t event(const char *request_id, const char *uid)
{
    bg_usage_event_t ev = {.request_id = request_id,
                           .user_id = uid,
                           .organization_id = NULL,
                           .agent_id = "0190a0b0-0000-7000-8000-000000000001",
                           .channel = "web",
                           .model = "demo-1",
                           .prompt_tokens = 120,
                           .completion_tokens = 30,
                           .token_source = "provider",
                           .latency_ms = 900,
                           .ttft_ms = 150,
                           .status = "ok",
                           .error_class = NULL,
                           .cache_hit = false,
                           .outcome = BG_ADMISSION_USE,
                           .occurred_at_ms = bg_timeutil_wall_ms()};
    return ev;
}

static void emit(const bg_usage_event_t *ev)
{
    int rc = bg_usage_emit(rc_, SHARDS, ev);
    cr_assert_eq(rc, 0, "emit %s: %s", ev->request_id, bg_strerror(rc));
}

/* The request balance of uid's credits account, or of the system 'consumed' account (uid NULL). */
static long long balance(const char *uid)
{
    if (uid == NULL)
        return pg_int("SELECT coalesce(sum(balance), 0) FROM ledger_balances WHERE "
                      "owner_type = 'system' AND purpose = 'consumed' AND unit = 'request'",
                      NULL);
    return pg_int("SELECT coalesce(sum(balance), 0) FROM ledger_balances WHERE "
                  "owner_type = 'user' AND owner_id = $1::uuid AND purpose = 'credits' "
                  "AND unit = 'request'",
                  uid);
}

/* ---- scenarios ---- */

Test(usage_worker, event_becomes_one_record_and_one_balanced_debit)
{
    create_db();
    char uid[37];
    create_user(uid);
    put_config(uid);
    admit(uid, "req-1");
    pid_t w = start_worker(2, "w");

    bg_usage_event_t ev = event("req-1", uid);
    ev.occurred_at_ms = bg_timeutil_wall_ms() - DAY_MS; /* written late: counts on its own day */
    emit(&ev);
    cr_assert_eq(pg_wait("SELECT count(*) FROM usage_records", NULL, 1, 15000), 1);
    wait_drained(10000);

    char v[256];
    pg_value("SELECT concat_ws('|', user_id, channel, model, prompt_tokens, completion_tokens, "
             "token_source, latency_ms, ttft_ms, status, coalesce(error_class, '-'), cache_hit, "
             "requests_charged, agent_id, coalesce(organization_id::text, '-')) "
             "FROM usage_records WHERE request_id = $1",
             "req-1", v, sizeof(v));
    char want[256];
    snprintf(want, sizeof(want),
             "%s|web|demo-1|120|30|provider|900|150|ok|-|f|1|"
             "0190a0b0-0000-7000-8000-000000000001|-",
             uid);
    cr_assert_str_eq(v, want);

    cr_assert_eq(pg_int("SELECT count(*) FROM ledger_transactions WHERE idempotency_key = "
                        "'usage:req-1' AND kind = 'usage.settle' AND user_id = $1::uuid",
                        uid),
                 1);
    cr_assert_eq(pg_int("SELECT count(*) FROM ledger_entries", NULL), 2);
    cr_assert_eq(pg_int("SELECT sum(amount) FROM ledger_entries", NULL), 0, "balanced");
    cr_assert_eq(balance(uid), -1, "one request credit debited");
    cr_assert_eq(balance(NULL), 1);
    cr_assert_eq(pg_int("SELECT count(*) FROM ledger_transactions WHERE metadata->>'request_id' "
                        "= 'req-1' AND effective_at < now() - interval '23 hours'",
                        NULL),
                 1, "effective when the request happened");

    /* the rollup: one request on the day the request happened */
    pg_value("SELECT concat_ws('|', day = (now() AT TIME ZONE 'UTC' - interval '1 day')::date, "
             "requests, errors, requests_charged, prompt_tokens, completion_tokens, "
             "estimated_tokens, latency_ms_sum, ttft_ms_sum) FROM usage_daily",
             NULL, v, sizeof(v));
    cr_assert_str_eq(v, "t|1|0|1|120|30|0|900|150");

    /* the reservation became use, with the real tokens */
    bg_admission_keys_t k = keys_of(uid);
    cr_assert_eq(redis_int("ZCARD %s%s", k.res, ""), 0, "no reservation left");
    cr_assert_eq(redis_int("HGET %s %s", k.quota, "used"), 1);
    cr_assert_eq(redis_int("HGET %s %s", k.quota, "tused"), 150);
    stop_worker(w);
}

Test(usage_worker, same_event_five_times_counts_once)
{
    create_db();
    char uid[37];
    create_user(uid);
    put_config(uid);
    admit(uid, "req-dup");
    bg_usage_event_t ev = event("req-dup", uid);
    ev.token_source = "estimated";
    ev.cache_hit = true;
    for (int i = 0; i < 5; i++)
        emit(&ev);
    /* two processes of two threads each: duplicates also race each other */
    pid_t w[2] = {start_worker(2, "w0"), start_worker(2, "w1")};
    wait_drained(15000);

    cr_assert_eq(pg_int("SELECT count(*) FROM usage_records", NULL), 1);
    cr_assert_eq(pg_int("SELECT count(*) FROM ledger_transactions", NULL), 1);
    cr_assert_eq(pg_int("SELECT count(*) FROM ledger_entries", NULL), 2);
    cr_assert_eq(balance(uid), -1);
    char v[128];
    pg_value("SELECT concat_ws('|', sum(requests), sum(requests_charged), sum(estimated_tokens), "
             "sum(cache_hits)) FROM usage_daily",
             NULL, v, sizeof(v));
    cr_assert_str_eq(v, "1|1|150|1", "the daily rollup counts the request once");
    bg_admission_keys_t k = keys_of(uid);
    cr_assert_eq(redis_int("HGET %s %s", k.quota, "used"), 1, "the quota counts it once");
    cr_assert_eq(redis_int("ZCARD %s%s", k.res, ""), 0);
    stop_worker(w[0]);
    stop_worker(w[1]);
}

Test(usage_worker, refund_records_the_error_debits_nothing_and_frees_the_reservation)
{
    create_db();
    char uid[37];
    create_user(uid);
    put_config(uid);
    admit(uid, "req-fail");
    admit(uid, "req-err-partial");
    bg_admission_keys_t k = keys_of(uid);
    cr_assert_eq(redis_int("ZCARD %s%s", k.res, ""), 2, "two reservations held");
    pid_t w = start_worker(2, "w");

    bg_usage_event_t ev = event("req-fail", uid);
    ev.status = "error";
    ev.error_class = "provider_5xx";
    ev.outcome = BG_ADMISSION_REFUND;
    ev.prompt_tokens = 0;
    ev.completion_tokens = 0;
    ev.ttft_ms = -1;
    emit(&ev);
    /* an error after some output: used by the llm worker's account, but status error is not
     * charged, in the ledger and in Redis alike */
    ev = event("req-err-partial", uid);
    ev.status = "error";
    emit(&ev);
    cr_assert_eq(pg_wait("SELECT count(*) FROM usage_records", NULL, 2, 15000), 2);
    wait_drained(10000);

    char v[128];
    pg_value("SELECT concat_ws('|', status, error_class, requests_charged, "
             "coalesce(ttft_ms::text, 'null')) FROM usage_records WHERE request_id = $1",
             "req-fail", v, sizeof(v));
    cr_assert_str_eq(v, "error|provider_5xx|0|null");
    pg_value("SELECT concat_ws('|', status, error_class, requests_charged) FROM usage_records "
             "WHERE request_id = $1",
             "req-err-partial", v, sizeof(v));
    cr_assert_str_eq(v, "error|error|0", "the status stands in for a missing class");
    cr_assert_eq(pg_int("SELECT count(*) FROM ledger_transactions", NULL), 0, "no debit");
    cr_assert_eq(balance(uid), 0);
    pg_value("SELECT concat_ws('|', requests, errors, requests_charged) FROM usage_daily", NULL, v,
             sizeof(v));
    cr_assert_str_eq(v, "2|2|0");
    cr_assert_eq(redis_int("ZCARD %s%s", k.res, ""), 0, "the reservations are freed");
    cr_assert_eq(redis_int("HGET %s %s", k.quota, "used"), 0, "and nothing was used");
    char marker[BG_REDIS_KEY_MAX];
    cr_assert_eq(bg_admission_key_marker(marker, sizeof(marker), k.shard, "req-fail"), 0);
    cr_assert_eq(redis_int("EXISTS %s%s", marker, ""), 1, "settled once for good");
    stop_worker(w);
}

Test(usage_worker, settle_failing_after_the_commit_is_retried_without_a_second_debit)
{
    create_db();
    char uid[37];
    create_user(uid);
    put_config(uid);
    admit(uid, "req-settle");
    bg_admission_keys_t k = keys_of(uid);
    /* scripts refused: the record commits, then the settle (a script) fails */
    const char *deny[] = {"ACL", "SETUSER", "default", "-evalsha", "-eval"};
    cmd_ok(BG_ARRAY_SIZE(deny), deny);
    pid_t w = start_worker(2, "w");
    bg_usage_event_t ev = event("req-settle", uid);
    emit(&ev);
    cr_assert_eq(pg_wait("SELECT count(*) FROM usage_records", NULL, 1, 15000), 1);
    sleep_ms(600); /* past BG_CLAIM_IDLE_MS: delivered again at least once, still failing */
    cr_assert_eq(redis_int("ZCARD %s%s", k.res, ""), 1, "not settled while scripts fail");
    cr_assert_not(drained(), "the job stays pending");

    const char *allow[] = {"ACL", "SETUSER", "default", "+evalsha", "+eval"};
    cmd_ok(BG_ARRAY_SIZE(allow), allow);
    wait_drained(15000);
    cr_assert_eq(redis_int("ZCARD %s%s", k.res, ""), 0, "settled on a later delivery");
    cr_assert_eq(redis_int("HGET %s %s", k.quota, "used"), 1);
    cr_assert_eq(pg_int("SELECT count(*) FROM usage_records", NULL), 1);
    cr_assert_eq(pg_int("SELECT count(*) FROM ledger_transactions", NULL), 1, "debited once");
    cr_assert_eq(balance(uid), -1);
    cr_assert_eq(pg_int("SELECT requests FROM usage_daily", NULL), 1);
    stop_worker(w);
}

#define KILL_EVENTS 200
#define KILL_USERS 4

Test(usage_worker, worker_killed_mid_way_loses_and_doubles_nothing)
{
    create_db();
    char uids[KILL_USERS][37];
    for (int u = 0; u < KILL_USERS; u++) {
        create_user(uids[u]);
        put_config(uids[u]);
    }
    for (int i = 0; i < KILL_EVENTS; i++) {
        char id[32];
        snprintf(id, sizeof(id), "req-k-%03d", i);
        admit(uids[i % KILL_USERS], id);
        bg_usage_event_t ev = event(id, uids[i % KILL_USERS]);
        ev.completion_tokens = i;
        emit(&ev);
    }
    pid_t a = start_worker(4, "a");
    long long got = pg_wait("SELECT count(*) FROM usage_records", NULL, 10, 20000);
    kill(a, SIGKILL);
    cr_assert_neq(bgt_wait(a, 5000), -1);
    got = pg_int("SELECT count(*) FROM usage_records", NULL);
    cr_log_info("usage worker killed after %lld of %d events", got, KILL_EVENTS);
    cr_assert_lt(got, KILL_EVENTS, "the kill came too late to test anything");

    pid_t b = start_worker(4, "b");
    cr_assert_eq(pg_wait("SELECT count(*) FROM usage_records", NULL, KILL_EVENTS, 30000),
                 KILL_EVENTS);
    wait_drained(15000);
    cr_assert_eq(pg_int("SELECT count(*) FROM usage_records", NULL), KILL_EVENTS);
    cr_assert_eq(pg_int("SELECT count(*) FROM ledger_transactions", NULL), KILL_EVENTS);
    cr_assert_eq(pg_int("SELECT count(*) FROM ledger_entries", NULL), 2 * KILL_EVENTS);
    cr_assert_eq(pg_int("SELECT count(*) FROM (SELECT transaction_id FROM ledger_entries "
                        "GROUP BY transaction_id HAVING sum(amount) <> 0) x",
                        NULL),
                 0, "every transaction balanced");
    cr_assert_eq(balance(NULL), KILL_EVENTS);
    cr_assert_eq(pg_int("SELECT sum(requests) FROM usage_daily", NULL), KILL_EVENTS);
    cr_assert_eq(pg_int("SELECT sum(completion_tokens) FROM usage_daily", NULL),
                 KILL_EVENTS * (KILL_EVENTS - 1) / 2);
    for (int u = 0; u < KILL_USERS; u++) {
        bg_admission_keys_t k = keys_of(uids[u]);
        cr_assert_eq(balance(uids[u]), -KILL_EVENTS / KILL_USERS);
        cr_assert_eq(redis_int("ZCARD %s%s", k.res, ""), 0, "all reservations settled");
        cr_assert_eq(redis_int("HGET %s %s", k.quota, "used"), KILL_EVENTS / KILL_USERS);
    }
    stop_worker(b);
}

static void wait_dlq(const char *dlq, long long want)
{
    long long deadline = bgt_now_ms() + 10000;
    while (redis_int("XLEN %s%s", dlq, "") < want) {
        cr_assert_lt(bgt_now_ms(), deadline, "nothing reached %s", dlq);
        sleep_ms(25);
    }
}

/* The dlq_error of the dead letter of job_id, "" when there is none. */
static void dlq_error(const char *dlq, const char *job_id, char *out, size_t outlen)
{
    out[0] = '\0';
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_command(rc_, &reply, "XRANGE %s - +", dlq), 0);
    for (size_t e = 0; e < reply->elements; e++) {
        const redisReply *f = reply->element[e]->element[1];
        const char *id = NULL, *err = NULL;
        for (size_t i = 0; i + 1 < f->elements; i += 2) {
            if (strcmp(f->element[i]->str, "job_id") == 0)
                id = f->element[i + 1]->str;
            else if (strcmp(f->element[i]->str, "dlq_error") == 0)
                err = f->element[i + 1]->str;
        }
        if (id != NULL && err != NULL && strcmp(id, job_id) == 0)
            snprintf(out, outlen, "%s", err);
    }
    freeReplyObject(reply);
}

Test(usage_worker, malformed_event_goes_to_the_dead_letters)
{
    create_db();
    char uid[37];
    create_user(uid);
    int shard = bg_shard_of(uid, SHARDS);
    char dlq[BG_REDIS_KEY_MAX];
    cr_assert_eq(bg_redis_key_dlq(dlq, sizeof(dlq), shard, "usage"), 0);

    /* bg_usage_emit refuses it, so it is written the way a broken emitter would */
    const char *fields[] = {"user_id",
                            uid,
                            "channel",
                            "fax",
                            "model",
                            "m",
                            "prompt_tokens",
                            "1",
                            "completion_tokens",
                            "1",
                            "token_source",
                            "provider",
                            "status",
                            "ok",
                            "cache_hit",
                            "0",
                            "outcome",
                            "use",
                            "occurred_at",
                            "1700000000000"};
    bg_job_spec_t job = {shard, "usage", "req-bad", BG_ARRAY_SIZE(fields) / 2, fields, 10000};
    cr_assert_eq(bg_jobs_enqueue(rc_, &job, NULL, 0), 0);
    bg_usage_event_t bad = event("req-bad", uid);
    bad.channel = "fax";
    cr_assert_eq(bg_usage_emit(rc_, SHARDS, &bad), BG_ERR_INVALID, "the emitter checks too");

    /* well formed, but for a user the database does not know */
    bg_usage_event_t ghost = event("req-ghost", "0190a0b0-0000-7000-8000-0000000000ff");
    emit(&ghost);
    int gshard = bg_shard_of(ghost.user_id, SHARDS);
    char gdlq[BG_REDIS_KEY_MAX];
    cr_assert_eq(bg_redis_key_dlq(gdlq, sizeof(gdlq), gshard, "usage"), 0);

    pid_t w = start_worker(2, "w");
    wait_dlq(dlq, 1);
    wait_dlq(gdlq, gshard == shard ? 2 : 1);
    char err[256];
    dlq_error(dlq, "req-bad", err, sizeof(err));
    cr_assert_not_null(strstr(err, "channel"), "dlq_error: %s", err);
    dlq_error(gdlq, "req-ghost", err, sizeof(err));
    cr_assert_not_null(strstr(err, "refused by the database"), "dlq_error: %s", err);
    wait_drained(10000);
    cr_assert_eq(pg_int("SELECT count(*) FROM usage_records", NULL), 0);
    cr_assert_eq(pg_int("SELECT count(*) FROM ledger_transactions", NULL), 0);
    stop_worker(w);
}

#define RATE_EVENTS 600

/* Emits RATE_EVENTS events spread over nusers users (prefix makes their ids unique), and returns
 * the rate at which the running worker records them, from the first row on (process start and
 * connections do not count). */
static double measure(const char *prefix, int nusers, long long before)
{
    char uids[8][37];
    for (int u = 0; u < nusers; u++)
        create_user(uids[u]);
    for (int i = 0; i < RATE_EVENTS; i++) {
        char id[32];
        snprintf(id, sizeof(id), "%s-%04d", prefix, i);
        bg_usage_event_t ev = event(id, uids[i % nusers]);
        emit(&ev);
    }
    cr_assert_geq(pg_wait("SELECT count(*) FROM usage_records", NULL, before + 1, 15000),
                  before + 1);
    long long t0 = bgt_now_ms();
    long long first = pg_int("SELECT count(*) FROM usage_records", NULL) - before;
    cr_assert_eq(pg_wait("SELECT count(*) FROM usage_records", NULL, before + RATE_EVENTS, 60000),
                 before + RATE_EVENTS);
    long long ms = bgt_now_ms() - t0;
    double rate = (double)(RATE_EVENTS - first) * 1000.0 / (double)(ms > 0 ? ms : 1);
    printf("usage worker (4 threads, one transaction per event): %d user(s), %lld events in "
           "%lld ms, %.0f events/s\n",
           nusers, RATE_EVENTS - first, ms, rate);
    (void)fflush(stdout);
    return rate;
}

/* Not a benchmark, but the figures the one-row-per-transaction choice is judged by (see the top of
 * workers/role_usage.c): one user (every transaction updates the same usage_daily row, so they
 * queue on its lock) and eight users. Bounded loosely, so a regression by an order of magnitude
 * fails. */
Test(usage_worker, throughput_of_one_transaction_per_event)
{
    create_db();
    pid_t w = start_worker(4, "w");
    double one = measure("req-one", 1, 0);
    double many = measure("req-many", 8, RATE_EVENTS);
    cr_assert_gt(one, 30.0);
    cr_assert_gt(many, 30.0);
    cr_assert_eq(pg_int("SELECT count(*) FROM ledger_transactions", NULL), 2 * RATE_EVENTS);
    stop_worker(w);
}
