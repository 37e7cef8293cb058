/*
 * Admission control (lua/admit.lua, lua/settle.lua, bg/admission.h) on a real redis-server, with
 * the config hashes written by hand the way the plan compiler writes them.
 *
 * The exactness tests fire 2000 admits from 8 threads, each with its own connection, the way many
 * edge processes would, and check that exactly as many pass as the quota, the burst or the
 * concurrency cap allows, 20 times over with different users, limits and interleavings. The
 * "writes nothing" tests compare a DUMP of every key (and its expiry) before and after a denial.
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <uv.h>

#include "bg/admission.h"
#include "bg/authstate.h"
#include "bg/err.h"
#include "bg/policy.h"
#include "bg/redis.h"
#include "bg/redis_async.h"
#include "bg/timeutil.h"
#include "bgtest.h"
#include "bgtest_adm.h"

#define SHARDS 16
#define DAY_MS 86400000LL
#define THREADS 8
#define PER_THREAD 250
#define ATTEMPTS (THREADS * PER_THREAD)
#define SEEDS 20

static bgt_redis_t srv;

static void setup(void)
{
    signal(SIGPIPE, SIG_IGN);
    cr_assert_eq(bgt_redis_start(&srv), 0, "redis-server did not start");
}

static void teardown(void)
{
    bgt_redis_stop(&srv);
}

TestSuite(admission, .init = setup, .fini = teardown, .timeout = 240);

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static bg_redis_t *client(void)
{
    bg_redis_t *r = NULL;
    cr_assert_eq(bg_redis_new(srv.url, 5000, &r), 0);
    return r;
}

/* ---- state written by hand ---- */

typedef struct st_cfg {
    const char *status;
    long long q_limit, w_anchor, w_len, w_until;
    long long rpm, burst, conc, tok_cap, tq_limit;
    const char *features;
} cfg_t;

/* An active plan: 100 requests a day, the day started a second ago, a month left, no limits. */
static cfg_t cfg_default(void)
{
    long long now = bg_timeutil_wall_ms();
    cfg_t c = {.status = "active",
               .q_limit = 100,
               .w_anchor = now - 1000,
               .w_len = DAY_MS,
               .w_until = now + 30 * DAY_MS,
               .rpm = 0,
               .burst = 1,
               .conc = 0,
               .tok_cap = 0,
               .tq_limit = 0,
               .features = ",chat,api,"};
    return c;
}

static bg_admission_keys_t keys_of(const char *uid)
{
    bg_admission_keys_t k;
    cr_assert_eq(bg_admission_keys(&k, SHARDS, uid), 0);
    return k;
}

static void stream_of(const char *uid, char *out, size_t outlen)
{
    cr_assert_eq(bg_redis_key_queue(out, outlen, bg_shard_of(uid, SHARDS), "llm"), 0);
}

static void cmd_ok(bg_redis_t *r, int argc, const char *const *argv)
{
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_argv(r, argc, argv, NULL, &reply), 0);
    cr_assert_neq(reply->type, REDIS_REPLY_ERROR, "%s: %s", argv[0], reply->str);
    freeReplyObject(reply);
}

/* Writes the config as the plan compiler does: bg_policy_state_write (the fields and "pk"). */
static void put_config(bg_redis_t *r, const char *uid, const cfg_t *c)
{
    bg_admission_state_t st;
    memset(&st, 0, sizeof(st));
    bg_strlcpy(st.user_id, uid, sizeof(st.user_id));
    bg_strlcpy(st.status, c->status, sizeof(st.status));
    bg_strlcpy(st.plan, "monthly", sizeof(st.plan));
    st.w_anchor = c->w_anchor;
    st.w_len = c->w_len;
    st.w_until = c->w_until;
    st.limits = (bg_policy_limits_t){.q_limit = c->q_limit,
                                     .tq_limit = c->tq_limit,
                                     .rpm = c->rpm,
                                     .burst = c->burst,
                                     .conc = c->conc,
                                     .tok_cap = c->tok_cap};
    bg_strlcpy(st.limits.features, c->features, sizeof(st.limits.features));
    st.v = bg_timeutil_wall_ms();
    cr_assert_eq(bg_policy_state_write(r, SHARDS, &st), 0);
}

/* Changes one number of the config (bgt_adm_set: read back, changed, written by the compiler's
 * writer). */
static void put_field(bg_redis_t *r, const char *uid, const char *field, long long value)
{
    cr_assert_eq(bgt_adm_set(r, SHARDS, uid, field, value), 0, "%s of %s", field, uid);
}

/* Writes the quota hash: used requests in the window starting at win. */
static void put_used(bg_redis_t *r, const char *uid, long long win, long long used)
{
    bg_admission_keys_t k = keys_of(uid);
    char w[24], u[24];
    snprintf(w, sizeof(w), "%lld", win);
    snprintf(u, sizeof(u), "%lld", used);
    const char *argv[] = {"HSET", k.quota, "win", w, "used", u, "tused", "0"};
    cmd_ok(r, 8, argv);
}

static long long get_int(bg_redis_t *r, const char *fmt, const char *key, const char *field)
{
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_command(r, &reply, fmt, key, field), 0);
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

static long long hget(bg_redis_t *r, const char *key, const char *field)
{
    return get_int(r, "HGET %s %s", key, field);
}

static long long zcard(bg_redis_t *r, const char *key)
{
    return get_int(r, "ZCARD %s%s", key, "");
}

static long long xlen(bg_redis_t *r, const char *key)
{
    return get_int(r, "XLEN %s%s", key, "");
}

static bool hexists(bg_redis_t *r, const char *key, const char *field)
{
    return get_int(r, "HEXISTS %s %s", key, field) == 1;
}

/* ---- admitting ---- */

typedef struct st_ask {
    const char *key; /* API key id or NULL */
    long long key_rpm, key_burst;
    const char *feature;
    long long max_tokens;
    long long ttl_ms; /* 0: a minute */
} ask_t;

static const char *const job_fields[] = {"conversation_id", "c-42", "agent_id", "a-7"};

static int admit(bg_redis_t *r, const char *uid, const char *job, const ask_t *a,
                 bg_admission_decision_t *d)
{
    ask_t none = {0};
    if (a == NULL)
        a = &none;
    bg_admission_req_t req = {.user_id = uid,
                              .api_key_id = a->key,
                              .key_rpm = a->key_rpm,
                              .key_burst = a->key_burst,
                              .feature = a->feature,
                              .max_tokens = a->max_tokens,
                              .role = "llm",
                              .job_id = job,
                              .nfields = 2,
                              .fields = job_fields,
                              .reservation_ttl_ms = a->ttl_ms > 0 ? a->ttl_ms : 60000,
                              .stream_maxlen = 100000,
                              /* as the chat route: a denial must not write this either */
                              .record_owner = true};
    return bg_admission_admit(r, SHARDS, &req, d);
}

/* Admits and checks the verdict; returns the decision. */
static bg_admission_decision_t expect(bg_redis_t *r, const char *uid, const char *job,
                                      const ask_t *a, bg_admission_verdict_t want)
{
    bg_admission_decision_t d;
    int rc = admit(r, uid, job, a, &d);
    cr_assert_eq(rc, 0, "admit %s: %s", job, bg_strerror(rc));
    cr_assert_eq(d.verdict, want, "admit %s: %s, expected %s", job,
                 bg_admission_verdict_name(d.verdict), bg_admission_verdict_name(want));
    return d;
}

static bg_admission_settle_result_t settle(bg_redis_t *r, const char *uid, const char *job,
                                           bg_admission_outcome_t outcome, long long tokens,
                                           int64_t *used)
{
    bg_admission_settle_result_t res = BG_ADMISSION_SETTLE_UNKNOWN;
    int rc = bg_admission_settle(r, SHARDS, uid, job, outcome, tokens, &res, used);
    cr_assert_eq(rc, 0, "settle %s: %s", job, bg_strerror(rc));
    return res;
}

/* ---- snapshots: every key, its serialized value and its absolute expiry ---- */

typedef struct st_snap {
    char *text; /* owned */
    size_t len;
} snap_t;

static void snap_add(snap_t *s, const void *p, size_t n)
{
    s->text = bg_realloc(s->text, s->len + n + 1);
    memcpy(s->text + s->len, p, n);
    s->len += n;
    s->text[s->len] = '\0';
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static snap_t snapshot(bg_redis_t *r)
{
    snap_t s = {0};
    redisReply *keys = NULL;
    cr_assert_eq(bg_redis_command(r, &keys, "KEYS *"), 0);
    cr_assert_eq(keys->type, REDIS_REPLY_ARRAY);
    char **names = bg_calloc(keys->elements + 1, sizeof(*names));
    for (size_t i = 0; i < keys->elements; i++)
        names[i] = keys->element[i]->str;
    qsort(names, keys->elements, sizeof(*names), cmp_str);
    for (size_t i = 0; i < keys->elements; i++) {
        redisReply *dump = NULL, *exp = NULL;
        cr_assert_eq(bg_redis_command(r, &dump, "DUMP %s", names[i]), 0);
        cr_assert_eq(bg_redis_command(r, &exp, "PEXPIRETIME %s", names[i]), 0);
        char head[300];
        int n = snprintf(head, sizeof(head), "\n%s expires %lld: ", names[i], exp->integer);
        snap_add(&s, head, (size_t)n);
        snap_add(&s, dump->str, dump->len);
        freeReplyObject(dump);
        freeReplyObject(exp);
    }
    free(names);
    freeReplyObject(keys);
    return s;
}

static void assert_same(snap_t *before, snap_t *after, const char *what)
{
    cr_assert_eq(before->len, after->len, "%s changed the data set", what);
    cr_assert(before->len == 0 || memcmp(before->text, after->text, before->len) == 0,
              "%s changed the data set", what);
    free(after->text);
    after->text = NULL;
    after->len = 0;
}

/* ---- simple behaviour ---- */

Test(admission, admits_reserves_and_enqueues_the_job)
{
    bg_redis_t *r = client();
    cfg_t c = cfg_default();
    put_config(r, "u-1", &c);
    bg_admission_keys_t k = keys_of("u-1");
    char stream[BG_REDIS_KEY_MAX];
    stream_of("u-1", stream, sizeof(stream));

    bg_admission_decision_t d = expect(r, "u-1", "job-1", NULL, BG_ADMISSION_OK);
    cr_assert_eq(d.q_limit, 100);
    cr_assert_eq(d.q_remaining, 99);
    cr_assert_eq(d.q_reset_ms, c.w_anchor + DAY_MS);
    cr_assert_eq(d.rl_limit, 0, "no rate limit configured");
    cr_assert_eq(d.retry_after_ms, 0);
    cr_assert_neq(d.entry_id[0], '\0');

    /* reserved: in the zset (expiring in about a minute) and in the details */
    cr_assert_eq(zcard(r, k.res), 1);
    long long expiry = get_int(r, "ZSCORE %s %s", k.res, "job-1");
    long long now = bg_timeutil_wall_ms();
    cr_assert(expiry > now + 55000 && expiry <= now + 60000, "expiry %lld now %lld", expiry, now);
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_command(r, &reply, "HGET %s %s", k.resd, "job-1"), 0);
    char want[64];
    snprintf(want, sizeof(want), "%lld|0", c.w_anchor);
    cr_assert_str_eq(reply->str, want);
    freeReplyObject(reply);
    /* used counts at settle, not at admit; the window was written */
    cr_assert_eq(hget(r, k.quota, "used"), 0);
    cr_assert_eq(hget(r, k.quota, "win"), c.w_anchor);

    /* exactly one stream entry, with job_id first and the caller's fields */
    cr_assert_eq(xlen(r, stream), 1);
    cr_assert_eq(bg_redis_command(r, &reply, "XRANGE %s - +", stream), 0);
    cr_assert_eq(reply->elements, 1);
    redisReply *e = reply->element[0];
    cr_assert_str_eq(e->element[0]->str, d.entry_id);
    cr_assert_eq(e->element[1]->elements, 6);
    const char *fields[] = {"job_id", "job-1", "conversation_id", "c-42", "agent_id", "a-7"};
    for (size_t i = 0; i < 6; i++)
        cr_assert_str_eq(e->element[1]->element[i]->str, fields[i]);
    freeReplyObject(reply);

    /* the job's owner, recorded in the same step for /chat/jobs/{id}/stream and cancel */
    char owner[BG_REDIS_KEY_MAX];
    cr_assert_eq(bg_admission_key_owner(owner, sizeof(owner), k.shard, "job-1"), 0);
    cr_assert_eq(bg_redis_command(r, &reply, "GET %s", owner), 0);
    cr_assert_eq(reply->type, REDIS_REPLY_STRING);
    cr_assert_str_eq(reply->str, "u-1");
    freeReplyObject(reply);
    long long owner_ttl = get_int(r, "TTL %s", owner, "");
    cr_assert(owner_ttl > BG_ADMISSION_OWNER_TTL_S - 10 && owner_ttl <= BG_ADMISSION_OWNER_TTL_S,
              "ttl %lld", owner_ttl);

    d = expect(r, "u-1", "job-2", NULL, BG_ADMISSION_OK);
    cr_assert_eq(d.q_remaining, 98, "the first reservation is held");
    cr_assert_eq(xlen(r, stream), 2);
    bg_redis_free(r);
}

Test(admission, quota_reset_never_after_the_plan_end)
{
    bg_redis_t *r = client();
    cfg_t c = cfg_default();
    c.w_until = c.w_anchor + 3600000;
    put_config(r, "u-end", &c);
    bg_admission_decision_t d = expect(r, "u-end", "j", NULL, BG_ADMISSION_OK);
    cr_assert_eq(d.q_reset_ms, c.w_until);
    bg_redis_free(r);
}

Test(admission, missing_config_is_no_state)
{
    bg_redis_t *r = client();
    snap_t before = snapshot(r);
    bg_admission_decision_t d = expect(r, "nobody", "j", NULL, BG_ADMISSION_NO_STATE);
    cr_assert_eq(d.q_limit, 0);
    cr_assert_eq(d.entry_id[0], '\0');
    snap_t after = snapshot(r);
    assert_same(&before, &after, "no_state");
    free(before.text);
    cr_assert_str_eq(bg_admission_error_code(d.verdict), "service_unavailable");
    bg_redis_free(r);
}

Test(admission, plan_over_or_missing_is_no_plan)
{
    bg_redis_t *r = client();
    cfg_t c = cfg_default();
    c.w_until = bg_timeutil_wall_ms() - 1;
    put_config(r, "u-exp", &c);
    expect(r, "u-exp", "j1", NULL, BG_ADMISSION_NO_PLAN);

    c = cfg_default();
    c.status = "none";
    put_config(r, "u-none", &c);
    expect(r, "u-none", "j2", NULL, BG_ADMISSION_NO_PLAN);

    c.status = "trialing";
    put_config(r, "u-trial", &c);
    expect(r, "u-trial", "j3", NULL, BG_ADMISSION_OK);

    /* the plan ends while in use: at w_until it is over */
    put_field(r, "u-trial", "w_until", bg_timeutil_wall_ms());
    bg_admission_decision_t d = expect(r, "u-trial", "j4", NULL, BG_ADMISSION_NO_PLAN);
    cr_assert_str_eq(bg_admission_error_code(d.verdict), "payment_required");
    cr_assert_eq(bg_admission_retry_after_s(&d), 0);
    bg_redis_free(r);
}

Test(admission, feature_gating)
{
    bg_redis_t *r = client();
    cfg_t c = cfg_default();
    put_config(r, "u-f", &c);
    ask_t a = {.feature = "chat"};
    expect(r, "u-f", "j1", &a, BG_ADMISSION_OK);
    a.feature = "api";
    expect(r, "u-f", "j2", &a, BG_ADMISSION_OK);
    a.feature = "";
    expect(r, "u-f", "j3", &a, BG_ADMISSION_OK);
    a.feature = "images";
    bg_admission_decision_t d = expect(r, "u-f", "j4", &a, BG_ADMISSION_FEATURE);
    cr_assert_eq(d.q_remaining, 97, "a denial reports the quota as it stands");
    a.feature = "cha";
    expect(r, "u-f", "j5", &a, BG_ADMISSION_FEATURE);
    a.feature = "chat,api";
    expect(r, "u-f", "j6", &a, BG_ADMISSION_FEATURE);
    put_config(r, "u-f",
               &(cfg_t){.status = "active",
                        .q_limit = 10,
                        .w_anchor = c.w_anchor,
                        .w_len = DAY_MS,
                        .w_until = c.w_until,
                        .burst = 1,
                        .features = ",,"});
    a.feature = "chat";
    expect(r, "u-f", "j7", &a, BG_ADMISSION_FEATURE);
    bg_redis_free(r);
}

Test(admission, refund_frees_the_reservation)
{
    bg_redis_t *r = client();
    cfg_t c = cfg_default();
    c.q_limit = 1;
    put_config(r, "u-r", &c);
    bg_admission_keys_t k = keys_of("u-r");
    expect(r, "u-r", "j1", NULL, BG_ADMISSION_OK);
    bg_admission_decision_t d = expect(r, "u-r", "j2", NULL, BG_ADMISSION_QUOTA_EXCEEDED);
    cr_assert_eq(d.q_remaining, 0);
    cr_assert_eq(d.retry_after_ms, 1000, "a held reservation may free soon: retry shortly");
    int64_t used = -1;
    cr_assert_eq(settle(r, "u-r", "j1", BG_ADMISSION_REFUND, 0, &used), BG_ADMISSION_SETTLED);
    cr_assert_eq(used, 0);
    cr_assert_eq(zcard(r, k.res), 0);
    cr_assert_not(hexists(r, k.resd, "j1"));
    cr_assert_eq(settle(r, "u-r", "j1", BG_ADMISSION_USE, 10, &used), BG_ADMISSION_SETTLE_DUPLICATE,
                 "a refunded job cannot be used afterwards");
    cr_assert_eq(used, 0);
    d = expect(r, "u-r", "j3", NULL, BG_ADMISSION_OK);
    cr_assert_eq(d.q_remaining, 0);
    bg_redis_free(r);
}

Test(admission, settle_use_counts_once)
{
    bg_redis_t *r = client();
    cfg_t c = cfg_default();
    c.q_limit = 3;
    put_config(r, "u-s", &c);
    bg_admission_keys_t k = keys_of("u-s");
    expect(r, "u-s", "j1", NULL, BG_ADMISSION_OK);
    int64_t used = -1;
    cr_assert_eq(settle(r, "u-s", "j1", BG_ADMISSION_USE, 120, &used), BG_ADMISSION_SETTLED);
    cr_assert_eq(used, 1);
    cr_assert_eq(settle(r, "u-s", "j1", BG_ADMISSION_USE, 120, &used),
                 BG_ADMISSION_SETTLE_DUPLICATE);
    cr_assert_eq(used, 1);
    cr_assert_eq(settle(r, "u-s", "j1", BG_ADMISSION_REFUND, 0, &used),
                 BG_ADMISSION_SETTLE_DUPLICATE);
    cr_assert_eq(hget(r, k.quota, "used"), 1);
    cr_assert_eq(hget(r, k.quota, "tused"), 120);
    cr_assert_eq(zcard(r, k.res), 0);
    char marker[BG_REDIS_KEY_MAX];
    cr_assert_eq(bg_admission_key_marker(marker, sizeof(marker), k.shard, "j1"), 0);
    long long ttl = get_int(r, "TTL %s%s", marker, "");
    cr_assert(ttl > 86000 && ttl <= 86400, "marker ttl %lld", ttl);

    bg_admission_decision_t d = expect(r, "u-s", "j2", NULL, BG_ADMISSION_OK);
    cr_assert_eq(d.q_remaining, 1, "3 - 1 used - 1 held");
    cr_assert_eq(settle(r, "u-s", "never-admitted", BG_ADMISSION_USE, 1, &used),
                 BG_ADMISSION_SETTLE_UNKNOWN);
    cr_assert_eq(used, 1, "an unknown job counts nothing");
    expect(r, "u-s", "j3", NULL, BG_ADMISSION_OK);
    cr_assert_eq(settle(r, "u-s", "j2", BG_ADMISSION_USE, 0, &used), BG_ADMISSION_SETTLED);
    cr_assert_eq(settle(r, "u-s", "j3", BG_ADMISSION_USE, 0, &used), BG_ADMISSION_SETTLED);
    cr_assert_eq(used, 3);
    d = expect(r, "u-s", "j4", NULL, BG_ADMISSION_QUOTA_EXCEEDED);
    long long to_reset = c.w_anchor + DAY_MS - bg_timeutil_wall_ms();
    cr_assert(d.retry_after_ms > to_reset - 5000 && d.retry_after_ms <= to_reset + 5000,
              "used up: retry when the window ends (%lld, %lld)", (long long)d.retry_after_ms,
              to_reset);
    cr_assert_eq(bg_admission_retry_after_s(&d), (d.retry_after_ms + 999) / 1000);
    cr_assert_eq(bg_admission_settle(r, SHARDS, "u-s", "j2", BG_ADMISSION_USE, -1,
                                     &(bg_admission_settle_result_t){0}, NULL),
                 BG_ERR_INVALID);
    bg_redis_free(r);
}

Test(admission, expired_reservation_frees_quota_and_concurrency)
{
    bg_redis_t *r = client();
    cfg_t c = cfg_default();
    c.q_limit = 1;
    c.conc = 1;
    put_config(r, "u-x", &c);
    bg_admission_keys_t k = keys_of("u-x");
    ask_t a = {.ttl_ms = 100};
    expect(r, "u-x", "lost", &a, BG_ADMISSION_OK);
    bg_admission_decision_t d = expect(r, "u-x", "j2", &a, BG_ADMISSION_CONCURRENCY);
    cr_assert_str_eq(bg_admission_error_code(d.verdict), "rate_limited");
    sleep_ms(150);
    /* the lost job's reservation lapsed: the slot and the request are free again */
    d = expect(r, "u-x", "j3", &a, BG_ADMISSION_OK);
    cr_assert_eq(d.q_remaining, 0);
    cr_assert_not(hexists(r, k.resd, "lost"), "the lapsed reservation was purged");
    cr_assert_eq(zcard(r, k.res), 1);
    int64_t used = -1;
    cr_assert_eq(settle(r, "u-x", "lost", BG_ADMISSION_USE, 5, &used), BG_ADMISSION_SETTLE_UNKNOWN,
                 "a purged reservation was refunded");
    cr_assert_eq(used, 0);

    /* a reservation past its expiry but not purged yet still settles, once */
    sleep_ms(150);
    cr_assert(hexists(r, k.resd, "j3"));
    cr_assert_eq(settle(r, "u-x", "j3", BG_ADMISSION_USE, 5, &used), BG_ADMISSION_SETTLED);
    cr_assert_eq(used, 1);
    cr_assert_eq(settle(r, "u-x", "j3", BG_ADMISSION_USE, 5, &used), BG_ADMISSION_SETTLE_DUPLICATE);
    cr_assert_eq(used, 1);
    expect(r, "u-x", "j4", &a, BG_ADMISSION_QUOTA_EXCEEDED);
    bg_redis_free(r);
}

Test(admission, settle_purges_lapsed_reservations)
{
    bg_redis_t *r = client();
    cfg_t c = cfg_default();
    put_config(r, "u-p", &c);
    bg_admission_keys_t k = keys_of("u-p");
    ask_t a = {.ttl_ms = 50};
    expect(r, "u-p", "a", &a, BG_ADMISSION_OK);
    expect(r, "u-p", "b", &a, BG_ADMISSION_OK);
    a.ttl_ms = 60000;
    expect(r, "u-p", "c", &a, BG_ADMISSION_OK);
    sleep_ms(100);
    cr_assert_eq(settle(r, "u-p", "c", BG_ADMISSION_USE, 0, NULL), BG_ADMISSION_SETTLED);
    cr_assert_eq(zcard(r, k.res), 0);
    cr_assert_eq(get_int(r, "HLEN %s%s", k.resd, ""), 0);
    bg_redis_free(r);
}

Test(admission, a_new_window_resets_used)
{
    bg_redis_t *r = client();
    cfg_t c = cfg_default();
    c.q_limit = 3;
    put_config(r, "u-w", &c);
    bg_admission_keys_t k = keys_of("u-w");
    expect(r, "u-w", "j1", NULL, BG_ADMISSION_OK);
    cr_assert_eq(settle(r, "u-w", "j1", BG_ADMISSION_USE, 0, NULL), BG_ADMISSION_SETTLED);
    expect(r, "u-w", "j2", NULL, BG_ADMISSION_OK);
    cr_assert_eq(settle(r, "u-w", "j2", BG_ADMISSION_USE, 0, NULL), BG_ADMISSION_SETTLED);
    expect(r, "u-w", "j3", NULL, BG_ADMISSION_OK); /* stays reserved in the old window */
    bg_admission_decision_t d = expect(r, "u-w", "j4", NULL, BG_ADMISSION_QUOTA_EXCEEDED);
    cr_assert_eq(d.q_remaining, 0);
    cr_assert_eq(d.retry_after_ms, 1000, "a held reservation may free soon");
    cr_assert_eq(hget(r, k.quota, "used"), 2);

    /* a renewal: the anchor moves back by half a window, so the current window starts earlier */
    long long anchor = c.w_anchor - DAY_MS / 2;
    put_field(r, "u-w", "w_anchor", anchor);
    d = expect(r, "u-w", "j5", NULL, BG_ADMISSION_OK);
    cr_assert_eq(d.q_remaining, 1, "3 - 0 used - 2 held (j3 from the old window, j5)");
    cr_assert_eq(d.q_reset_ms, anchor + DAY_MS);
    cr_assert_eq(hget(r, k.quota, "win"), anchor);
    cr_assert_eq(hget(r, k.quota, "used"), 0);

    /* j3 counts in its own window, which is over: not in the new one */
    int64_t used = -1;
    cr_assert_eq(settle(r, "u-w", "j3", BG_ADMISSION_USE, 0, &used), BG_ADMISSION_SETTLED);
    cr_assert_eq(used, 0);
    cr_assert_eq(settle(r, "u-w", "j5", BG_ADMISSION_USE, 0, &used), BG_ADMISSION_SETTLED);
    cr_assert_eq(used, 1);
    expect(r, "u-w", "j6", NULL, BG_ADMISSION_OK);
    d = expect(r, "u-w", "j7", NULL, BG_ADMISSION_OK);
    cr_assert_eq(d.q_remaining, 0);
    expect(r, "u-w", "j8", NULL, BG_ADMISSION_QUOTA_EXCEEDED);
    bg_redis_free(r);
}

Test(admission, used_counts_in_the_window_recorded_until_the_next_admit)
{
    bg_redis_t *r = client();
    cfg_t c = cfg_default();
    c.q_limit = 5;
    put_config(r, "u-lw", &c);
    bg_admission_keys_t k = keys_of("u-lw");
    expect(r, "u-lw", "j1", NULL, BG_ADMISSION_OK);
    /* the window turns while j1 runs, and no admit has rewritten the quota hash yet */
    put_field(r, "u-lw", "w_anchor", c.w_anchor - DAY_MS / 2);
    int64_t used = -1;
    cr_assert_eq(settle(r, "u-lw", "j1", BG_ADMISSION_USE, 0, &used), BG_ADMISSION_SETTLED);
    cr_assert_eq(used, 1, "counted in the old window, which the hash still holds");
    bg_admission_decision_t d = expect(r, "u-lw", "j2", NULL, BG_ADMISSION_OK);
    cr_assert_eq(d.q_remaining, 4, "the new window starts from zero");
    cr_assert_eq(hget(r, k.quota, "used"), 0);
    bg_redis_free(r);
}

Test(admission, tokens_cap_and_token_quota)
{
    bg_redis_t *r = client();
    cfg_t c = cfg_default();
    c.tok_cap = 4000;
    c.tq_limit = 5000;
    put_config(r, "u-t", &c);
    bg_admission_keys_t k = keys_of("u-t");

    ask_t a = {.max_tokens = 4001};
    bg_admission_decision_t d = expect(r, "u-t", "j0", &a, BG_ADMISSION_TOO_MANY_TOKENS);
    cr_assert_str_eq(bg_admission_error_code(d.verdict), "validation_failed");
    a.max_tokens = 3000;
    expect(r, "u-t", "j1", &a, BG_ADMISSION_OK);
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_command(r, &reply, "HGET %s %s", k.resd, "j1"), 0);
    char want[64];
    snprintf(want, sizeof(want), "%lld|3000", c.w_anchor);
    cr_assert_str_eq(reply->str, want);
    freeReplyObject(reply);
    /* 3000 held + 3000 asked > 5000 */
    d = expect(r, "u-t", "j2", &a, BG_ADMISSION_QUOTA_EXCEEDED);
    cr_assert_eq(d.retry_after_ms, 1000, "held tokens may free soon");
    a.max_tokens = 2000;
    expect(r, "u-t", "j3", &a, BG_ADMISSION_OK);
    /* full now: 5000 held */
    a.max_tokens = 1;
    expect(r, "u-t", "j4", &a, BG_ADMISSION_QUOTA_EXCEEDED);

    /* j1 used only 1200 of its 3000: 1800 come back */
    int64_t used = -1;
    cr_assert_eq(settle(r, "u-t", "j1", BG_ADMISSION_USE, 1200, &used), BG_ADMISSION_SETTLED);
    cr_assert_eq(hget(r, k.quota, "tused"), 1200);
    a.max_tokens = 1800;
    expect(r, "u-t", "j5", &a, BG_ADMISSION_OK);
    a.max_tokens = 1;
    expect(r, "u-t", "j6", &a, BG_ADMISSION_QUOTA_EXCEEDED);
    cr_assert_eq(settle(r, "u-t", "j3", BG_ADMISSION_REFUND, 0, &used), BG_ADMISSION_SETTLED);
    cr_assert_eq(settle(r, "u-t", "j5", BG_ADMISSION_USE, 1800, &used), BG_ADMISSION_SETTLED);
    /* 3000 used: without max tokens, the per-request cap (4000) is reserved, which does not fit */
    a.max_tokens = 0;
    expect(r, "u-t", "j7", &a, BG_ADMISSION_QUOTA_EXCEEDED);
    a.max_tokens = 2000;
    expect(r, "u-t", "j8", &a, BG_ADMISSION_OK);
    cr_assert_eq(settle(r, "u-t", "j8", BG_ADMISSION_USE, 2000, &used), BG_ADMISSION_SETTLED);
    a.max_tokens = 1;
    d = expect(r, "u-t", "j9", &a, BG_ADMISSION_QUOTA_EXCEEDED);
    cr_assert_gt(d.retry_after_ms, 60000, "token quota used up: wait for the reset");
    cr_assert_eq(hget(r, k.quota, "used"), 3);

    /* without a token quota nothing is reserved and only the cap applies */
    put_field(r, "u-t", "tq_limit", 0);
    a.max_tokens = 4000;
    expect(r, "u-t", "j10", &a, BG_ADMISSION_OK);
    cr_assert_eq(bg_redis_command(r, &reply, "HGET %s %s", k.resd, "j10"), 0);
    snprintf(want, sizeof(want), "%lld|0", c.w_anchor);
    cr_assert_str_eq(reply->str, want);
    freeReplyObject(reply);
    bg_redis_free(r);
}

Test(admission, rate_limit_and_retry_after)
{
    bg_redis_t *r = client();
    cfg_t c = cfg_default();
    c.rpm = 60; /* one a second */
    c.burst = 3;
    put_config(r, "u-rl", &c);
    bg_admission_decision_t d = expect(r, "u-rl", "j1", NULL, BG_ADMISSION_OK);
    cr_assert_eq(d.rl_limit, 60);
    cr_assert_eq(d.rl_remaining, 2);
    cr_assert(d.rl_reset_ms > 900 && d.rl_reset_ms <= 1000, "reset %lld", (long long)d.rl_reset_ms);
    expect(r, "u-rl", "j2", NULL, BG_ADMISSION_OK);
    d = expect(r, "u-rl", "j3", NULL, BG_ADMISSION_OK);
    cr_assert_eq(d.rl_remaining, 0);
    d = expect(r, "u-rl", "j4", NULL, BG_ADMISSION_RATE_LIMITED);
    cr_assert_eq(d.rl_remaining, 0);
    cr_assert(d.retry_after_ms > 900 && d.retry_after_ms <= 1000, "retry after %lld",
              (long long)d.retry_after_ms);
    cr_assert_eq(bg_admission_retry_after_s(&d), 1);
    cr_assert_eq(d.q_remaining, 97);
    sleep_ms((int)d.retry_after_ms + 20);
    d = expect(r, "u-rl", "j5", NULL, BG_ADMISSION_OK);
    cr_assert_eq(d.rl_remaining, 0);
    bg_redis_free(r);
}

Test(admission, key_rate_limit_is_independent_of_the_users)
{
    bg_redis_t *r = client();
    cfg_t c = cfg_default();
    c.rpm = 1;
    c.burst = 10;
    put_config(r, "u-k", &c);
    ask_t k1 = {.key = "key-1", .key_rpm = 1, .key_burst = 2};
    ask_t k2 = {.key = "key-2", .key_rpm = 1, .key_burst = 2};
    bg_admission_decision_t d = expect(r, "u-k", "a1", &k1, BG_ADMISSION_OK);
    cr_assert_eq(d.rl_remaining, 1, "the tighter limit, the key's, is reported");
    expect(r, "u-k", "a2", &k1, BG_ADMISSION_OK);
    d = expect(r, "u-k", "a3", &k1, BG_ADMISSION_RATE_LIMITED);
    cr_assert(d.retry_after_ms > 59000, "the key waits a minute: %lld",
              (long long)d.retry_after_ms);
    expect(r, "u-k", "b1", &k2, BG_ADMISSION_OK);
    expect(r, "u-k", "b2", &k2, BG_ADMISSION_OK);
    expect(r, "u-k", "b3", &k2, BG_ADMISSION_RATE_LIMITED);
    /* four passed: the key denial did not take a step of the user's limit, so 6 are left */
    for (int i = 0; i < 6; i++) {
        char job[16];
        snprintf(job, sizeof(job), "n%d", i);
        d = expect(r, "u-k", job, NULL, BG_ADMISSION_OK);
        cr_assert_eq(d.rl_remaining, 5 - i);
    }
    expect(r, "u-k", "n6", NULL, BG_ADMISSION_RATE_LIMITED);
    ask_t k3 = {.key = "key-3", .key_rpm = 100, .key_burst = 100};
    d = expect(r, "u-k", "c1", &k3, BG_ADMISSION_RATE_LIMITED);
    cr_assert_eq(d.rl_limit, 1, "the user's limit denied");
    bg_admission_keys_t k = keys_of("u-k");
    cr_assert_eq(get_int(r, "HEXISTS %s %s", k.quota, "tat:key-3"), 0,
                 "a denial leaves the key's limit untouched");

    /* a key without a limit of its own: only the user's applies */
    put_field(r, "u-k", "rpm", 0);
    ask_t k4 = {.key = "key-4"};
    for (int i = 0; i < 5; i++) {
        char job[16];
        snprintf(job, sizeof(job), "d%d", i);
        expect(r, "u-k", job, &k4, BG_ADMISSION_OK);
    }
    bg_redis_free(r);
}

/* Admits job for uid with the session check left to the script (as the web chat turn does). */
static bg_admission_decision_t expect_session(bg_redis_t *r, const char *uid, const char *sid,
                                              int64_t issued_ms, const char *job,
                                              bg_admission_verdict_t want)
{
    static const char *const fields[] = {"conversation_id", "c-42", "locale", "en"};
    bg_admission_req_t req = {.user_id = uid,
                              .role = "llm",
                              .job_id = job,
                              .nfields = 2,
                              .fields = fields,
                              .reservation_ttl_ms = 60000,
                              .stream_maxlen = 100000,
                              .record_owner = true,
                              .session_id = sid,
                              .issued_ms = issued_ms};
    bg_admission_decision_t d;
    int rc = bg_admission_admit(r, SHARDS, &req, &d);
    cr_assert_eq(rc, 0, "admit %s: %s", job, bg_strerror(rc));
    cr_assert_eq(d.verdict, want, "admit %s: %s, expected %s", job,
                 bg_admission_verdict_name(d.verdict), bg_admission_verdict_name(want));
    return d;
}

Test(admission, the_script_checks_the_session_first_when_asked_and_a_revoked_one_admits_nothing)
{
    bg_redis_t *r = client();
    cfg_t c = cfg_default();
    put_config(r, "u-sess", &c);
    int shard = bg_shard_of("u-sess", SHARDS);
    int64_t issued = bg_timeutil_wall_ms() - 1000;
    char k_rev[160], k_nbf[160], k_loc[160];
    cr_assert_eq(bg_authstate_key_revoked(k_rev, sizeof(k_rev), shard, "s-1"), 0);
    cr_assert_eq(bg_authstate_key_nbf(k_nbf, sizeof(k_nbf), shard, "u-sess"), 0);
    cr_assert_eq(bg_authstate_key_locale(k_loc, sizeof(k_loc), shard, "u-sess"), 0);
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_command(r, &reply, "SET %s ru", k_loc), 0);
    freeReplyObject(reply);

    /* a live session: admitted, the user's locale known and carried by the job */
    bg_admission_decision_t d = expect_session(r, "u-sess", "s-1", issued, "sj1", BG_ADMISSION_OK);
    cr_assert_str_eq(d.locale, "ru");
    char stream[BG_REDIS_KEY_MAX];
    stream_of("u-sess", stream, sizeof(stream));
    cr_assert_eq(bg_redis_command(r, &reply, "XRANGE %s - +", stream), 0);
    cr_assert_eq(reply->elements, 1);
    const redisReply *f = reply->element[0]->element[1];
    bool found = false;
    for (size_t i = 0; i + 1 < f->elements; i += 2) {
        if (strcmp(f->element[i]->str, "locale") == 0) {
            cr_assert_str_eq(f->element[i + 1]->str, "ru", "the remembered locale, not the guess");
            found = true;
        }
    }
    cr_assert(found);
    freeReplyObject(reply);
    /* without the session check (another channel): nothing of it is read or reported */
    d = expect(r, "u-sess", "sj2", NULL, BG_ADMISSION_OK);
    cr_assert_str_eq(d.locale, "");

    /* revoked: denied before anything else, and nothing written at all */
    cr_assert_eq(bg_redis_command(r, &reply, "SET %s 1", k_rev), 0);
    freeReplyObject(reply);
    snap_t before = snapshot(r);
    d = expect_session(r, "u-sess", "s-1", issued, "sj3", BG_ADMISSION_REVOKED);
    cr_assert_str_eq(bg_admission_error_code(d.verdict), "unauthorized");
    cr_assert_eq(d.q_limit, 0, "a revoked session learns nothing of the quota");
    snap_t after = snapshot(r);
    assert_same(&before, &after, "revoked");
    free(before.text);
    free(after.text);
    bg_admission_header_t h[BG_ADMISSION_HEADERS_MAX];
    cr_assert_eq(bg_admission_headers(&d, h), 0, "and no headers");

    /* another session of the user is not revoked; a not-before time after its token is */
    expect_session(r, "u-sess", "s-2", issued, "sj4", BG_ADMISSION_OK);
    char nbf[24];
    snprintf(nbf, sizeof(nbf), "%lld", (long long)(issued + 1));
    cr_assert_eq(bg_redis_command(r, &reply, "SET %s %s", k_nbf, nbf), 0);
    freeReplyObject(reply);
    expect_session(r, "u-sess", "s-2", issued, "sj5", BG_ADMISSION_REVOKED);
    expect_session(r, "u-sess", "s-2", issued + 2, "sj6", BG_ADMISSION_OK);
    bg_redis_free(r);
}

Test(admission, a_denial_writes_nothing)
{
    bg_redis_t *r = client();
    cfg_t c = cfg_default();
    c.q_limit = 3;
    c.rpm = 1;
    c.burst = 4;
    c.conc = 2;
    c.tok_cap = 1000;
    c.tq_limit = 1500;
    put_config(r, "u-d", &c);
    ask_t a = {.max_tokens = 1000, .key = "kk", .key_rpm = 1, .key_burst = 5};
    expect(r, "u-d", "j1", &a, BG_ADMISSION_OK);
    /* state an admitting call would write: a lapsed reservation to purge, an old window */
    ask_t shortlived = {.ttl_ms = 30, .max_tokens = 100};
    expect(r, "u-d", "lapsed", &shortlived, BG_ADMISSION_OK);
    put_used(r, "u-d", c.w_anchor - DAY_MS, 7);
    sleep_ms(60);
    snap_t before = snapshot(r);

    struct {
        ask_t ask;
        bg_admission_verdict_t want;
    } cases[] = {
        {{.feature = "images"}, BG_ADMISSION_FEATURE},
        {{.max_tokens = 1001}, BG_ADMISSION_TOO_MANY_TOKENS},
        /* tokens: j1 holds 1000 of 1500 (the lapsed 100 no longer count) */
        {{.max_tokens = 501}, BG_ADMISSION_QUOTA_EXCEEDED},
        /* the key's limit, while the user's has steps left */
        {{.key = "kk", .key_rpm = 1, .key_burst = 1, .max_tokens = 10}, BG_ADMISSION_RATE_LIMITED},
    };
    for (size_t i = 0; i < BG_ARRAY_SIZE(cases); i++) {
        char job[16];
        snprintf(job, sizeof(job), "deny%zu", i);
        expect(r, "u-d", job, &cases[i].ask, cases[i].want);
        snap_t after = snapshot(r);
        assert_same(&before, &after, bg_admission_verdict_name(cases[i].want));
    }

    /* concurrency: two live reservations (j1, j2) with conc 2; the user's rate has a step left */
    ask_t small = {.max_tokens = 10};
    expect(r, "u-d", "j2", &small, BG_ADMISSION_OK);
    free(before.text);
    before = snapshot(r);
    expect(r, "u-d", "deny-c", &small, BG_ADMISSION_CONCURRENCY);
    snap_t after = snapshot(r);
    assert_same(&before, &after, "concurrency");

    /* requests: 1 used (j1) + 2 held (j2, j3) of 3; rate off so that the quota check is reached */
    cr_assert_eq(settle(r, "u-d", "j1", BG_ADMISSION_USE, 10, NULL), BG_ADMISSION_SETTLED);
    expect(r, "u-d", "j3", &small, BG_ADMISSION_OK);
    put_field(r, "u-d", "conc", 0);
    put_field(r, "u-d", "rpm", 0);
    free(before.text);
    before = snapshot(r);
    expect(r, "u-d", "deny-q", &small, BG_ADMISSION_QUOTA_EXCEEDED);
    after = snapshot(r);
    assert_same(&before, &after, "quota_exceeded");

    /* the user's rate limit: its burst of 4 went to j1, lapsed, j2 and j3 */
    put_field(r, "u-d", "rpm", 1);
    put_field(r, "u-d", "q_limit", 100);
    free(before.text);
    before = snapshot(r);
    expect(r, "u-d", "deny-r", &small, BG_ADMISSION_RATE_LIMITED);
    after = snapshot(r);
    assert_same(&before, &after, "rate_limited");

    put_field(r, "u-d", "w_until", bg_timeutil_wall_ms() - 1);
    free(before.text);
    before = snapshot(r);
    expect(r, "u-d", "deny-p", &small, BG_ADMISSION_NO_PLAN);
    after = snapshot(r);
    assert_same(&before, &after, "no_plan");
    free(before.text);
    bg_redis_free(r);
}

Test(admission, a_reused_job_id_is_refused_without_writes)
{
    bg_redis_t *r = client();
    cfg_t c = cfg_default();
    put_config(r, "u-dup", &c);
    expect(r, "u-dup", "same", NULL, BG_ADMISSION_OK);
    snap_t before = snapshot(r);
    bg_admission_decision_t d;
    cr_assert_eq(admit(r, "u-dup", "same", NULL, &d), BG_ERR_PROTOCOL);
    cr_assert_eq(d.verdict, BG_ADMISSION_OK);
    cr_assert_eq(d.entry_id[0], '\0');
    snap_t after = snapshot(r);
    assert_same(&before, &after, "a reused job id");
    free(before.text);
    bg_redis_free(r);
}

Test(admission, bad_requests_are_refused_before_redis)
{
    bg_redis_t *r = client();
    bg_admission_decision_t d;
    bg_admission_req_t req = {.user_id = "u",
                              .role = "llm",
                              .job_id = "j",
                              .reservation_ttl_ms = 1000,
                              .stream_maxlen = 10};
    bg_admission_req_t bad = req;
    bad.user_id = "";
    cr_assert_eq(bg_admission_admit(r, SHARDS, &bad, &d), BG_ERR_INVALID);
    bad = req;
    bad.job_id = NULL;
    cr_assert_eq(bg_admission_admit(r, SHARDS, &bad, &d), BG_ERR_INVALID);
    bad = req;
    bad.reservation_ttl_ms = 0;
    cr_assert_eq(bg_admission_admit(r, SHARDS, &bad, &d), BG_ERR_INVALID);
    bad = req;
    bad.api_key_id = "";
    cr_assert_eq(bg_admission_admit(r, SHARDS, &bad, &d), BG_ERR_INVALID);
    bad = req;
    bad.nfields = BG_JOBS_MAX_FIELDS + 1;
    bad.fields = job_fields;
    cr_assert_eq(bg_admission_admit(r, SHARDS, &bad, &d), BG_ERR_INVALID);
    char longid[200];
    memset(longid, 'x', sizeof(longid) - 1);
    longid[sizeof(longid) - 1] = '\0';
    bad = req;
    bad.user_id = longid;
    cr_assert_eq(bg_admission_admit(r, SHARDS, &bad, &d), BG_ERR_INVALID);
    cr_assert_eq(bg_admission_admit(r, 0, &req, &d), BG_ERR_INVALID);
    bg_redis_free(r);
}

Test(admission, redis_down_fails_closed)
{
    bg_redis_t *r = client();
    cfg_t c = cfg_default();
    put_config(r, "u-down", &c);
    bgt_redis_pause(&srv, true);
    bg_redis_t *slow = NULL;
    cr_assert_eq(bg_redis_new(srv.url, 200, &slow), 0);
    bg_admission_decision_t d;
    int rc = admit(slow, "u-down", "j", NULL, &d);
    bgt_redis_pause(&srv, false);
    cr_assert(rc == BG_ERR_TIMEOUT || rc == BG_ERR_UNAVAILABLE, "got %s", bg_strerror(rc));
    cr_assert_eq(d.verdict, BG_ADMISSION_OK);
    cr_assert_eq(d.entry_id[0], '\0', "no decision without Redis");
    bg_redis_free(slow);
    bg_redis_free(r);
}

/* ---- exactness under concurrency ---- */

typedef struct st_race {
    const char *uid;
    int seed;
    int thread;
    ask_t ask;
    pthread_barrier_t *start;
    int counts[8]; /* per verdict */
    int errors;
} race_t;

static unsigned next_rand(unsigned *s)
{
    *s = *s * 1103515245u + 12345u;
    return (*s >> 16) & 0x7fff;
}

static void *race_thread(void *arg)
{
    race_t *t = arg;
    bg_redis_t *r = NULL;
    if (bg_redis_new(srv.url, 10000, &r) != 0 || bg_redis_connect(r) != 0) {
        t->errors = PER_THREAD;
        pthread_barrier_wait(t->start);
        bg_redis_free(r);
        return NULL;
    }
    /* every thread takes its jobs in an order of its own, and pauses at random points */
    int order[PER_THREAD];
    unsigned s = (unsigned)(t->seed * 7919 + t->thread * 104729 + 1);
    for (int i = 0; i < PER_THREAD; i++)
        order[i] = i;
    for (int i = PER_THREAD - 1; i > 0; i--) {
        int j = (int)(next_rand(&s) % (unsigned)(i + 1));
        int tmp = order[i];
        order[i] = order[j];
        order[j] = tmp;
    }
    pthread_barrier_wait(t->start);
    for (int i = 0; i < PER_THREAD; i++) {
        char job[64];
        snprintf(job, sizeof(job), "s%d-t%d-j%d", t->seed, t->thread, order[i]);
        bg_admission_decision_t d;
        if (admit(r, t->uid, job, &t->ask, &d) != 0) {
            t->errors++;
            continue;
        }
        t->counts[d.verdict]++;
        if (next_rand(&s) % 16 == 0) {
            struct timespec ts = {0, (long)(next_rand(&s) % 200) * 1000L};
            nanosleep(&ts, NULL);
        }
    }
    bg_redis_free(r);
    return NULL;
}

/* Fires ATTEMPTS admits for uid from THREADS threads; sums the verdicts into counts. */
static void race(const char *uid, int seed, const ask_t *ask, int counts[8])
{
    pthread_barrier_t start;
    cr_assert_eq(pthread_barrier_init(&start, NULL, THREADS), 0);
    race_t t[THREADS];
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++) {
        t[i] = (race_t){.uid = uid, .seed = seed, .thread = i, .start = &start};
        if (ask != NULL)
            t[i].ask = *ask;
        cr_assert_eq(pthread_create(&th[i], NULL, race_thread, &t[i]), 0);
    }
    memset(counts, 0, 8 * sizeof(int));
    int errors = 0;
    for (int i = 0; i < THREADS; i++) {
        pthread_join(th[i], NULL);
        errors += t[i].errors;
        for (int v = 0; v < 8; v++)
            counts[v] += t[i].counts[v];
    }
    pthread_barrier_destroy(&start);
    cr_assert_eq(errors, 0, "seed %d: %d admits failed on the wire", seed, errors);
}

/* Limits tried by the seeds: the edges (0, 1, all but one, all) and values in between. */
static int limit_for(int seed)
{
    static const int picks[] = {100, 0, 1, 2, ATTEMPTS - 1, ATTEMPTS, 7, 64, 99, 250};
    if ((size_t)seed < BG_ARRAY_SIZE(picks))
        return picks[seed];
    return 1 + (seed * 151) % (ATTEMPTS - 1);
}

Test(admission, exactly_the_quota_left_is_admitted)
{
    bg_redis_t *r = client();
    for (int seed = 0; seed < SEEDS; seed++) {
        char uid[32];
        snprintf(uid, sizeof(uid), "quota-%d", seed);
        int left = limit_for(seed);
        cfg_t c = cfg_default();
        c.q_limit = 5000;
        c.conc = 0;
        put_config(r, uid, &c);
        put_used(r, uid, c.w_anchor, c.q_limit - left);
        /* streams are per shard, shared with the other users of the shard: count the growth */
        char stream[BG_REDIS_KEY_MAX];
        stream_of(uid, stream, sizeof(stream));
        long long len_before = xlen(r, stream);
        int counts[8];
        race(uid, seed, NULL, counts);
        cr_assert_eq(counts[BG_ADMISSION_OK], left, "seed %d: %d admitted, %d left", seed,
                     counts[BG_ADMISSION_OK], left);
        cr_assert_eq(counts[BG_ADMISSION_QUOTA_EXCEEDED], ATTEMPTS - left);
        bg_admission_keys_t k = keys_of(uid);
        cr_assert_eq(zcard(r, k.res), left);
        cr_assert_eq(hget(r, k.quota, "used"), c.q_limit - left, "admits do not count use");
        cr_assert_eq(xlen(r, stream) - len_before, left, "seed %d: one entry per admit", seed);
    }
    bg_redis_free(r);
}

Test(admission, exactly_the_burst_is_admitted)
{
    bg_redis_t *r = client();
    for (int seed = 0; seed < SEEDS; seed++) {
        char uid[32];
        snprintf(uid, sizeof(uid), "burst-%d", seed);
        int burst = limit_for(seed);
        if (burst < 1)
            burst = 1;
        cfg_t c = cfg_default();
        c.q_limit = 1000000;
        c.rpm = 1; /* nothing comes back within the test */
        c.burst = burst;
        put_config(r, uid, &c);
        int counts[8];
        race(uid, seed, NULL, counts);
        cr_assert_eq(counts[BG_ADMISSION_OK], burst, "seed %d: %d admitted, burst %d", seed,
                     counts[BG_ADMISSION_OK], burst);
        cr_assert_eq(counts[BG_ADMISSION_RATE_LIMITED], ATTEMPTS - burst);
    }
    /* the same through API keys: the key's burst is the tighter one */
    for (int seed = 0; seed < SEEDS; seed++) {
        char uid[32];
        snprintf(uid, sizeof(uid), "kburst-%d", seed);
        int burst = limit_for(seed);
        if (burst < 1)
            burst = 1;
        cfg_t c = cfg_default();
        c.q_limit = 1000000;
        c.rpm = 1;
        c.burst = ATTEMPTS;
        put_config(r, uid, &c);
        char kid[32];
        snprintf(kid, sizeof(kid), "race-key-%d", seed);
        ask_t a = {.key = kid, .key_rpm = 1, .key_burst = burst};
        int counts[8];
        race(uid, seed + 100, &a, counts);
        cr_assert_eq(counts[BG_ADMISSION_OK], burst, "seed %d: %d admitted, key burst %d", seed,
                     counts[BG_ADMISSION_OK], burst);
        cr_assert_eq(counts[BG_ADMISSION_RATE_LIMITED], ATTEMPTS - burst);
        /* and the user's limit took exactly the admitted steps, no more, no fewer */
        c.burst = burst;
        put_config(r, uid, &c);
        expect(r, uid, "after-1", NULL, BG_ADMISSION_RATE_LIMITED);
        c.burst = burst + 1;
        put_config(r, uid, &c);
        bg_admission_decision_t d = expect(r, uid, "after-2", NULL, BG_ADMISSION_OK);
        cr_assert_eq(d.rl_remaining, 0);
    }
    bg_redis_free(r);
}

Test(admission, exactly_the_concurrency_cap_is_admitted)
{
    bg_redis_t *r = client();
    for (int seed = 0; seed < SEEDS; seed++) {
        char uid[32];
        snprintf(uid, sizeof(uid), "conc-%d", seed);
        int cap = limit_for(seed);
        if (cap < 1)
            cap = 1;
        cfg_t c = cfg_default();
        c.q_limit = 1000000;
        c.conc = cap;
        put_config(r, uid, &c);
        int counts[8];
        race(uid, seed, NULL, counts);
        cr_assert_eq(counts[BG_ADMISSION_OK], cap, "seed %d: %d admitted, cap %d", seed,
                     counts[BG_ADMISSION_OK], cap);
        cr_assert_eq(counts[BG_ADMISSION_CONCURRENCY], ATTEMPTS - cap);
        bg_admission_keys_t k = keys_of(uid);
        cr_assert_eq(zcard(r, k.res), cap);
    }
    bg_redis_free(r);
}

/* ---- one round trip ---- */

typedef struct st_stats {
    long long evalsha, eval, xadd, other_writes;
} stats_t;

static long long stat_calls(const char *info, const char *cmd)
{
    char pat[64];
    snprintf(pat, sizeof(pat), "cmdstat_%s:calls=", cmd);
    const char *p = strstr(info, pat);
    return p == NULL ? 0 : strtoll(p + strlen(pat), NULL, 10);
}

Test(admission, one_evalsha_per_admit)
{
    bg_redis_t *r = client();
    cfg_t c = cfg_default();
    c.q_limit = 30;
    put_config(r, "u-one", &c);
    /* load the script first, so that a NOSCRIPT round is not counted */
    expect(r, "u-one", "warm", NULL, BG_ADMISSION_OK);
    cmd_ok(r, 2, (const char *const[]){"CONFIG", "RESETSTAT"});
    int ok = 0;
    for (int i = 0; i < 50; i++) {
        char job[16];
        snprintf(job, sizeof(job), "j%d", i);
        bg_admission_decision_t d;
        cr_assert_eq(admit(r, "u-one", job, NULL, &d), 0);
        ok += d.verdict == BG_ADMISSION_OK;
    }
    cr_assert_eq(ok, 29);
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_command(r, &reply, "INFO commandstats"), 0);
    cr_assert_eq(stat_calls(reply->str, "evalsha"), 50, "%s", reply->str);
    cr_assert_eq(stat_calls(reply->str, "eval"), 0);
    cr_assert_eq(stat_calls(reply->str, "script|load"), 0);
    cr_assert_eq(stat_calls(reply->str, "xadd"), 29, "XADD only for admitted requests");
    freeReplyObject(reply);
    bg_redis_free(r);
}

/* ---- asynchronous client ---- */

typedef struct st_arec {
    int calls;
    int err;
    bg_admission_decision_t d;
} arec_t;

static void on_decision(void *ud, int err, const bg_admission_decision_t *d)
{
    arec_t *a = ud;
    a->calls++;
    a->err = err;
    if (d != NULL)
        a->d = *d;
}

static void on_tick(uv_timer_t *t)
{
    (void)t;
}

Test(admission, async_admit_parses_the_decision)
{
    bg_redis_t *r = client();
    cfg_t c = cfg_default();
    c.q_limit = 1;
    c.rpm = 30;
    c.burst = 5;
    put_config(r, "u-async", &c);

    uv_loop_t loop;
    cr_assert_eq(uv_loop_init(&loop), 0);
    uv_timer_t tick;
    uv_timer_init(&loop, &tick);
    uv_timer_start(&tick, on_tick, 5, 5);
    bg_redis_async_t *ac = bg_redis_async_new(&loop, srv.url, 2000);
    cr_assert_not_null(ac);
    long long deadline = bgt_now_ms() + 3000;
    while (!bg_redis_async_connected(ac) && bgt_now_ms() < deadline)
        uv_run(&loop, UV_RUN_ONCE);
    cr_assert(bg_redis_async_connected(ac));
    /* the first EVALSHA meets NOSCRIPT and loads the script */
    cmd_ok(r, 2, (const char *const[]){"SCRIPT", "FLUSH"});

    bg_admission_req_t req = {.user_id = "u-async",
                              .role = "llm",
                              .job_id = "a1",
                              .nfields = 2,
                              .fields = job_fields,
                              .reservation_ttl_ms = 60000,
                              .stream_maxlen = 1000};
    arec_t first = {0}, second = {0}, bad = {0};
    cr_assert_eq(bg_admission_admit_async(ac, SHARDS, &req, on_decision, &first), 0);
    req.job_id = "a2";
    cr_assert_eq(bg_admission_admit_async(ac, SHARDS, &req, on_decision, &second), 0);
    req.job_id = "";
    cr_assert_eq(bg_admission_admit_async(ac, SHARDS, &req, on_decision, &bad), BG_ERR_INVALID);
    deadline = bgt_now_ms() + 3000;
    while (second.calls == 0 && bgt_now_ms() < deadline)
        uv_run(&loop, UV_RUN_ONCE);
    cr_assert_eq(first.calls, 1);
    cr_assert_eq(first.err, 0);
    cr_assert_eq(first.d.verdict, BG_ADMISSION_OK);
    cr_assert_neq(first.d.entry_id[0], '\0');
    cr_assert_eq(first.d.rl_limit, 30);
    cr_assert_eq(first.d.rl_remaining, 4);
    cr_assert_eq(second.calls, 1);
    cr_assert_eq(second.err, 0);
    cr_assert_eq(second.d.verdict, BG_ADMISSION_QUOTA_EXCEEDED);
    cr_assert_eq(second.d.rl_remaining, 4, "the denial did not take a rate step");
    cr_assert_eq(bad.calls, 0, "an error return never calls back");

    /* a script error reaches the callback as a protocol error, once */
    put_field(r, "u-async", "q_limit", 10);
    req.job_id = "a1";
    arec_t dup = {0};
    cr_assert_eq(bg_admission_admit_async(ac, SHARDS, &req, on_decision, &dup), 0);
    deadline = bgt_now_ms() + 3000;
    while (dup.calls == 0 && bgt_now_ms() < deadline)
        uv_run(&loop, UV_RUN_ONCE);
    cr_assert_eq(dup.calls, 1);
    cr_assert_eq(dup.err, BG_ERR_PROTOCOL);

    /* freeing the client with an admit in flight: one callback, BG_ERR_CLOSED */
    req.job_id = "a3";
    arec_t closed = {0};
    cr_assert_eq(bg_admission_admit_async(ac, SHARDS, &req, on_decision, &closed), 0);
    bg_redis_async_free(ac);
    cr_assert_eq(closed.calls, 1);
    cr_assert_eq(closed.err, BG_ERR_CLOSED);

    uv_close((uv_handle_t *)&tick, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_loop_close(&loop), 0, "handles left open on the loop");
    bg_redis_free(r);
}

/* ---- response headers ---- */

static const char *header(const bg_admission_header_t *h, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(h[i].name, name) == 0)
            return h[i].value;
    return NULL;
}

Test(admission, response_headers)
{
    bg_admission_header_t h[BG_ADMISSION_HEADERS_MAX];
    bg_admission_decision_t d = {.verdict = BG_ADMISSION_OK,
                                 .q_limit = 100,
                                 .q_remaining = 42,
                                 .q_reset_ms = 1714564800000LL,
                                 .rl_limit = 60,
                                 .rl_remaining = 9,
                                 .rl_reset_ms = 1500};
    size_t n = bg_admission_headers(&d, h);
    cr_assert_eq(n, 6);
    cr_assert_str_eq(header(h, n, "x-ratelimit-limit-requests"), "60");
    cr_assert_str_eq(header(h, n, "x-ratelimit-remaining-requests"), "9");
    cr_assert_str_eq(header(h, n, "x-ratelimit-reset-requests"), "1.5s");
    cr_assert_str_eq(header(h, n, "x-quota-limit"), "100");
    cr_assert_str_eq(header(h, n, "x-quota-remaining"), "42");
    cr_assert_str_eq(header(h, n, "x-quota-reset"), "2024-05-01T12:00:00Z");
    cr_assert_null(header(h, n, "retry-after"));

    d.rl_reset_ms = 360000;
    n = bg_admission_headers(&d, h);
    cr_assert_str_eq(header(h, n, "x-ratelimit-reset-requests"), "6m0s");
    d.rl_reset_ms = 20;
    n = bg_admission_headers(&d, h);
    cr_assert_str_eq(header(h, n, "x-ratelimit-reset-requests"), "20ms");
    d.rl_reset_ms = 3600000 + 61250;
    n = bg_admission_headers(&d, h);
    cr_assert_str_eq(header(h, n, "x-ratelimit-reset-requests"), "1h1m1.25s");

    d.verdict = BG_ADMISSION_RATE_LIMITED;
    d.retry_after_ms = 1001;
    n = bg_admission_headers(&d, h);
    cr_assert_str_eq(header(h, n, "retry-after"), "2");
    cr_assert_eq(n, 7);

    bg_admission_decision_t none = {.verdict = BG_ADMISSION_NO_PLAN};
    cr_assert_eq(bg_admission_headers(&none, h), 0);
}
