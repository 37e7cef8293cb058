/*
 * The channel interface (bg/channel.h) on a real Redis and a migrated Postgres: a turn laid out
 * as the llm job every channel sends, admitted against the user's one quota (compiled from
 * Postgres the first time), refused in a way each channel can word, and its reply followed from
 * the job's output as a channel shows it: the text as it grows, a worker's restart (reset)
 * clearing it, the end, an error's code, the typing ticks, a stop, a timeout.
 */
#include <criterion/criterion.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bg/channel.h"
#include "bg/err.h"
#include "bg/id.h"
#include "bg/jobout.h"
#include "bg/pg.h"
#include "bg/redis.h"
#include "bgtest.h"
#include "bgtest_adm.h"

#define SHARDS 4

static bgt_redis_t srv;
static bg_redis_t *rc_;
static bgt_pg_t db;
static bool have_db;
static PGconn *conn;

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
    if (conn != NULL)
        PQfinish(conn);
    if (have_db)
        bgt_pg_drop(&db);
    bg_redis_free(rc_);
    bgt_redis_stop(&srv);
}

TestSuite(channel, .init = setup, .fini = teardown, .timeout = 120);

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* A user with the 14-day trial (50 requests a day), nothing compiled into Redis yet. */
static void trial_user(const char *email, char uid[40])
{
    const char *p[] = {email};
    PGresult *res = NULL;
    int rc = bg_pg_exec(conn,
                        "WITH u AS (INSERT INTO users (email, name) VALUES ($1, 'Ada') RETURNING "
                        "id), b AS (INSERT INTO billing_accounts (user_id) SELECT id FROM u "
                        "RETURNING id, user_id) INSERT INTO subscriptions (billing_account_id, "
                        "user_id, plan_id, status, current_period_start, current_period_end, "
                        "trial_ends_at) SELECT id, user_id, 'trial', 'trialing', now() - interval "
                        "'1 hour', now() + interval '14 days', now() + interval '14 days' FROM b "
                        "RETURNING user_id",
                        1, p, &res);
    cr_assert_eq(rc, 0, "%s", bg_strerror(rc));
    snprintf(uid, 40, "%s", PQgetvalue(res, 0, 0));
    PQclear(res);
}

static const char *field(const bg_turn_job_t *j, const char *name)
{
    for (size_t i = 0; i < j->admission.nfields; i++) {
        if (strcmp(j->fields[2 * i], name) == 0)
            return j->fields[2 * i + 1];
    }
    return NULL;
}

/* ---- the job every channel sends ---- */

Test(channel, a_turn_is_laid_out_as_the_llm_workers_job)
{
    bg_turn_t web = {.channel = "web",
                     .user_id = "u-1",
                     .locale = "ru",
                     .job_id = "job-1",
                     .request_id = "req-1",
                     .agent_id = "a-1",
                     .conversation_id = "c-1",
                     .content = "Привет",
                     .temperature = -1,
                     .record_owner = true};
    bg_turn_job_t j;
    cr_assert_eq(bg_turn_prepare(&web, 1000, &j), 0);
    cr_expect_str_eq(field(&j, "channel"), "web");
    cr_expect_str_eq(field(&j, "content"), "Привет", "the worker stores the message");
    cr_expect_null(field(&j, "message_id"));
    cr_expect_str_eq(field(&j, "conversation_id"), "c-1");
    cr_expect_str_eq(field(&j, "locale"), "ru");
    cr_expect_str_eq(field(&j, "request_id"), "req-1");
    cr_expect_str_eq(field(&j, "temperature"), "", "the agent's temperature");
    cr_expect_str_eq(field(&j, "max_tokens"), "0", "the agent's limit");
    cr_expect(j.admission.record_owner);
    cr_expect_str_eq(j.admission.job_id, "job-1");
    cr_expect_eq(j.admission.reservation_ttl_ms, BG_TURN_RESERVATION_TTL_MS);

    bg_turn_t tg = {.channel = "telegram",
                    .user_id = "u-2",
                    .user_name = "Бо",
                    .job_id = "job-2",
                    .agent_id = "a-1",
                    .conversation_id = "c-2",
                    .message_id = 42,
                    .image_url = "data:image/png;base64,AAAA",
                    .temperature = 0.25};
    cr_assert_eq(bg_turn_prepare(&tg, 1000, &j), 0);
    cr_expect_str_eq(field(&j, "message_id"), "42", "a message the channel stored itself");
    cr_expect_null(field(&j, "content"));
    cr_expect_str_eq(field(&j, "image_url"), "data:image/png;base64,AAAA");
    cr_expect_str_eq(field(&j, "temperature"), "0.25");
    cr_expect_str_eq(field(&j, "user_name"), "Бо");
    cr_expect_not(j.admission.record_owner);

    bg_turn_t api = {.channel = "api",
                     .user_id = "u-3",
                     .job_id = "job-3",
                     .agent_id = "a-1",
                     .messages = "[{\"role\":\"user\",\"content\":\"hi\"}]",
                     .max_tokens = 300,
                     .temperature = -1,
                     .feature = "api_access",
                     .api_key_id = "k-1"};
    cr_assert_eq(bg_turn_prepare(&api, 1000, &j), 0);
    cr_expect_null(field(&j, "conversation_id"));
    cr_expect_str_eq(field(&j, "messages"), "[{\"role\":\"user\",\"content\":\"hi\"}]");
    cr_expect_str_eq(j.admission.feature, "api_access");
    cr_expect_str_eq(j.admission.api_key_id, "k-1");
    cr_expect_eq(j.admission.max_tokens, 300, "reserved against a token quota");

    /* nothing to answer, or nobody speaking: refused before Redis */
    bg_turn_t bad = web;
    bad.content = "";
    cr_expect_eq(bg_turn_prepare(&bad, 1000, &j), BG_ERR_INVALID);
    bad = web;
    bad.user_id = NULL;
    cr_expect_eq(bg_turn_prepare(&bad, 1000, &j), BG_ERR_INVALID);
    bad = api;
    bad.messages = NULL;
    cr_expect_eq(bg_turn_prepare(&bad, 1000, &j), BG_ERR_INVALID);
    bad = web;
    bad.agent_id = "";
    cr_expect_eq(bg_turn_prepare(&bad, 1000, &j), BG_ERR_INVALID);
}

/* ---- admission ---- */

Test(channel, a_turn_is_admitted_against_the_users_one_quota_and_compiled_when_new)
{
    char uid[40];
    trial_user("channel@example.com", uid);
    char job_id[BG_UUID_STR_LEN + 1];
    bg_id_uuid_v7_str(job_id);
    bg_turn_t t = {.channel = "telegram",
                   .user_id = uid,
                   .job_id = job_id,
                   .agent_id = "a-1",
                   .conversation_id = "c-1",
                   .content = "hello",
                   .temperature = -1};
    bg_turn_job_t j;
    cr_assert_eq(bg_turn_prepare(&t, 1000, &j), 0);
    bg_admission_decision_t d;
    /* Redis knows nothing of this user yet: compiled from Postgres, then admitted */
    cr_assert_eq(bg_turn_admit(rc_, conn, SHARDS, &j, &d), 0);
    cr_assert_eq(d.verdict, BG_ADMISSION_OK, "%s", bg_admission_verdict_name(d.verdict));
    cr_expect_eq(d.q_limit, 50, "the trial's 50 a day");
    cr_expect_eq(d.q_remaining, 49);
    cr_expect_eq(bg_turn_refusal(d.verdict), BG_REFUSAL_NONE);

    /* the job is in the user's llm stream with the message */
    char stream[BG_REDIS_KEY_MAX];
    cr_assert_eq(bg_redis_key_queue(stream, sizeof(stream), bg_shard_of(uid, SHARDS), "llm"), 0);
    redisReply *r = NULL;
    cr_assert_eq(bg_redis_command(rc_, &r, "XRANGE %s - +", stream), 0);
    cr_assert_eq(r->elements, 1);
    bool found = false;
    const redisReply *f = r->element[0]->element[1];
    for (size_t k = 0; k + 1 < f->elements; k += 2)
        found = found || (strcmp(f->element[k]->str, "content") == 0 &&
                          strcmp(f->element[k + 1]->str, "hello") == 0);
    freeReplyObject(r);
    cr_expect(found, "the job carries the message");

    /* the quota spent (the first turn holds the only request; no concurrency cap in the way): a
     * refusal each channel words with the plans */
    cr_assert_eq(bgt_adm_set(rc_, SHARDS, uid, "q_limit", 1), 0);
    cr_assert_eq(bgt_adm_set(rc_, SHARDS, uid, "conc", 0), 0);
    bg_id_uuid_v7_str(job_id);
    cr_assert_eq(bg_turn_prepare(&t, 1000, &j), 0);
    cr_assert_eq(bg_turn_admit(rc_, conn, SHARDS, &j, &d), 0);
    cr_expect_eq(d.verdict, BG_ADMISSION_QUOTA_EXCEEDED);
    cr_expect_eq(bg_turn_refusal(d.verdict), BG_REFUSAL_QUOTA);
    cr_expect_eq(bg_turn_refusal(BG_ADMISSION_CONCURRENCY), BG_REFUSAL_RATE);
    cr_expect_eq(bg_turn_refusal(BG_ADMISSION_NO_PLAN), BG_REFUSAL_NO_PLAN);
    cr_expect_eq(bg_turn_refusal(BG_ADMISSION_FEATURE), BG_REFUSAL_FEATURE);
}

/* ---- following a reply ---- */

typedef struct st_writer {
    int shard;
    char job_id[BG_UUID_STR_LEN + 1];
    const char *const *events; /* type, data, …, NULL */
    int gap_ms;
} writer_t;

static void *write_events(void *arg)
{
    writer_t *w = arg;
    bg_redis_t *r = NULL;
    if (bg_redis_new(srv.url, 5000, &r) != 0)
        return NULL;
    for (size_t i = 0; w->events[i] != NULL; i += 2) {
        sleep_ms(w->gap_ms);
        if (bg_jobout_append(r, w->shard, w->job_id, w->events[i], w->events[i + 1],
                             strlen(w->events[i + 1]), NULL) != 0)
            break; /* the follower then times out, and the test says so */
    }
    bg_redis_free(r);
    return NULL;
}

typedef struct st_seen {
    int texts;
    int ticks;
    char last[256];
    int stop_after; /* on_text returns false at this call (0: never) */
} seen_t;

static bool on_text(void *ctx, const char *text, size_t len)
{
    seen_t *s = ctx;
    s->texts++;
    snprintf(s->last, sizeof(s->last), "%.*s", (int)len, text);
    return s->stop_after == 0 || s->texts < s->stop_after;
}

static bool on_tick(void *ctx)
{
    ((seen_t *)ctx)->ticks++;
    return true;
}

static bg_turn_end_t follow(const char *const *events, int gap_ms, int64_t timeout_ms, seen_t *s,
                            char *text_out, size_t text_len, char *code)
{
    writer_t w = {.shard = 2, .events = events, .gap_ms = gap_ms};
    bg_id_uuid_v7_str(w.job_id);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, write_events, &w), 0);
    bg_turn_sink_t sink = {.ctx = s, .on_text = on_text, .on_tick = on_tick, .tick_ms = 100};
    bg_buf_t text;
    bg_buf_init(&text, 1 << 20);
    bg_turn_end_t end;
    int rc = bg_turn_follow(rc_, 2, w.job_id, &sink, timeout_ms, &text, &end, code);
    cr_assert_eq(pthread_join(t, NULL), 0);
    cr_assert_eq(rc, 0, "%s", bg_strerror(rc));
    snprintf(text_out, text_len, "%.*s", (int)text.len, text.len > 0 ? text.base : "");
    bg_buf_dispose(&text);
    return end;
}

Test(channel, a_followed_reply_grows_starts_over_on_reset_and_ends_complete)
{
    const char *events[] = {"delta", "{\"text\":\"Hel\"}",
                            "delta", "{\"text\":\"lo\"}",
                            "reset", "{}",
                            "delta", "{\"text\":\"Hello, \"}",
                            "delta", "{\"text\":\"world\"}",
                            "done",  "{\"finish_reason\":\"stop\"}",
                            NULL};
    seen_t s = {0};
    char text[256], code[BG_ERR_CODE_SIZE] = "";
    bg_turn_end_t end = follow(events, 150, 10000, &s, text, sizeof(text), code);
    cr_expect_eq(end, BG_TURN_DONE);
    cr_expect_str_eq(text, "Hello, world", "the text after the worker started over, once");
    cr_expect_geq(s.texts, 2, "the sink saw the text grow (%d)", s.texts);
    cr_expect_geq(s.ticks, 3, "typing ticks while waiting (%d)", s.ticks);
}

Test(channel, a_failed_reply_keeps_its_text_and_names_the_error)
{
    const char *events[] = {"delta", "{\"text\":\"Part\"}", "error",
                            "{\"code\":\"provider_error\",\"retryable\":true}", NULL};
    seen_t s = {0};
    char text[256], code[BG_ERR_CODE_SIZE] = "";
    cr_expect_eq(follow(events, 50, 10000, &s, text, sizeof(text), code), BG_TURN_FAILED);
    cr_expect_str_eq(text, "Part");
    cr_expect_str_eq(code, "provider_error");
}

Test(channel, a_sink_can_stop_following_and_a_silent_job_times_out)
{
    const char *events[] = {"delta", "{\"text\":\"a\"}", "delta", "{\"text\":\"b\"}", "done", "{}",
                            NULL};
    seen_t s = {.stop_after = 1};
    char text[256], code[BG_ERR_CODE_SIZE] = "";
    cr_expect_eq(follow(events, 200, 10000, &s, text, sizeof(text), code), BG_TURN_STOPPED);
    cr_expect_eq(s.texts, 1);

    const char *none[] = {NULL};
    seen_t quiet = {0};
    long long t0 = bgt_now_ms();
    cr_expect_eq(follow(none, 0, 700, &quiet, text, sizeof(text), code), BG_TURN_TIMED_OUT);
    long long took = bgt_now_ms() - t0;
    cr_expect(took >= 600 && took < 3000, "timed out after %lld ms", took);
    cr_expect_str_eq(text, "");
}
