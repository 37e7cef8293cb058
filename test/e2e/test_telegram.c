/*
 * The Telegram channel end to end: the real bg-edge (webhook), a real bg-worker with the roles
 * telegram, llm and usage, the demo provider (bg-demo-llm) and a fake Bot API
 * (test/fixtures/fake_telegram.c, which records every call the bot makes and can answer 429 with
 * retry_after, 5xx or 403 on demand), a private Redis and a migrated database. The bot is the
 * quick-start one (BG_TELEGRAM_BOT_TOKEN, BG_TELEGRAM_WEBHOOK_SECRET), bound to the assistant.
 *
 * What a Telegram user (or Telegram itself) would notice: the webhook's secret is enforced; a
 * repeated update gets one reply; the webhook answers at once while a slow reply is typed and
 * streamed; 429s on edits neither lose the final text nor make the bot exceed about one message
 * or edit a second in a chat; every fixture of real payloads is accepted and handled (callback
 * queries answered, media told what is supported, edits ignored); a Russian-speaking newcomer is
 * answered in Russian; Telegram turns draw on the quota of the platform user they map to.
 */
#include <criterion/criterion.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bg/admission.h"
#include "bg/err.h"
#include "bg/json.h"
#include "bg/pg.h"
#include "bg/policy.h"
#include "bg/redis.h"
#include "bg/timeutil.h"
#include "bgtest.h"
#include "bgtest_telegram.h"

#define SHARDS 4
#define SLUG "123456"
#define TOKEN SLUG ":TEST-token_abc"
#define SECRET "hook-Secret_42"
#define MAX_CALLS 4096

static struct {
    bgt_redis_t redis;
    bgt_pg_t db;
    bool have_db;
    char dir[256];
    char base[64];
    char fake[64];
    char demo[128];
    char calls_path[320];
    pid_t edge, worker, demo_pid, fake_pid;
    bg_redis_t *r;
    PGconn *pg;
} S;

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static pid_t spawn_logged(const char *const argv[], const char *const env[], const char *name)
{
    char log[400];
    snprintf(log, sizeof(log), "%s/%s.log", S.dir, name);
    pid_t pid = bgt_spawn(argv, env, log);
    cr_assert_gt(pid, 0, "%s did not start", name);
    return pid;
}

/* The settings every binary of the stack shares. */
static void common_env(char vars[][600], int *n)
{
    snprintf(vars[(*n)++], 600, "BG_REDIS_URL=%s", S.redis.url);
    snprintf(vars[(*n)++], 600, "BG_DATABASE_URL=%s", S.db.url);
    snprintf(vars[(*n)++], 600, "BG_SHARDS=%d", SHARDS);
    snprintf(vars[(*n)++], 600, "BG_ENV_FILE=/nonexistent");
    snprintf(vars[(*n)++], 600, "BG_LOG_FORMAT=text");
    snprintf(vars[(*n)++], 600, "BG_TELEGRAM_BOT_TOKEN=" TOKEN);
    snprintf(vars[(*n)++], 600, "BG_TELEGRAM_WEBHOOK_SECRET=" SECRET);
    snprintf(vars[(*n)++], 600, "BG_TELEGRAM_API_URL=%s", S.fake);
    snprintf(vars[(*n)++], 600, "BG_REDIS_TIMEOUT_MS=3000");
    snprintf(vars[(*n)++], 600, "BG_JWT_SECRET=0123456789abcdef0123456789abcdef-telegram");
}

/* What the bot sent (the fake's log; test/support/bgtest_telegram.h). */
static bgt_tg_call_t calls[MAX_CALLS];

/* Where the waits look: set up with the service. */
static bgt_tg_watch_t W;

static void setup(void)
{
    memset(&S, 0, sizeof(S));
    signal(SIGPIPE, SIG_IGN);
    /* fake_telegram links Criterion too: it must not take itself for a test worker */
    unsetenv("BXFI_MAP");
    cr_assert_eq(bgt_pg_create(&S.db, true), 0);
    S.have_db = true;
    cr_assert_eq(bgt_redis_start(&S.redis), 0);
    cr_assert_eq(bgt_tempdir(S.dir, sizeof(S.dir)), 0);
    cr_assert_eq(bg_redis_new(S.redis.url, 5000, &S.r), 0);
    char err[256];
    cr_assert_eq(bg_pg_connect(S.db.url, 3, &S.pg, err, sizeof(err)), 0, "%s", err);

    /* the fake Bot API */
    int fport = bgt_free_port();
    char fports[16];
    snprintf(fports, sizeof(fports), "%d", fport);
    snprintf(S.calls_path, sizeof(S.calls_path), "%s/calls.jsonl", S.dir);
    W = (bgt_tg_watch_t){
        .calls_path = S.calls_path, .pg = S.pg, .slug = SLUG, .calls = calls, .max = MAX_CALLS};
    snprintf(S.fake, sizeof(S.fake), "http://127.0.0.1:%d", fport);
    const char *fargv[] = {
        bgt_bin("../test-bin/fake_telegram"), "--port", fports, "--log", S.calls_path, NULL};
    S.fake_pid = spawn_logged(fargv, NULL, "fake_telegram");
    char url[200];
    snprintf(url, sizeof(url), "%s/bot" TOKEN "/getMe", S.fake);
    if (bgt_wait_http(url, 200, 10000) != 0) {
        int st = bgt_wait(S.fake_pid, 10);
        cr_assert_fail("fake_telegram does not answer (%s: status %d)", fargv[0], st);
    }

    /* the demo provider */
    int dport = bgt_free_port();
    char dports[16];
    snprintf(dports, sizeof(dports), "%d", dport);
    const char *dargv[] = {bgt_bin("bg-demo-llm"), "--port", dports,
                           "--tokens-per-second",  "400",    NULL};
    S.demo_pid = spawn_logged(dargv, NULL, "demo");
    snprintf(S.demo, sizeof(S.demo), "http://127.0.0.1:%d/v1", dport);
    snprintf(url, sizeof(url), "%s/models", S.demo);
    cr_assert_eq(bgt_wait_http(url, 200, 10000), 0, "bg-demo-llm does not answer");

    /* the edge */
    char vars[24][600];
    const char *env[25];
    int n = 0;
    common_env(vars, &n);
    int port = bgt_free_port();
    snprintf(vars[n++], 600, "BG_HTTP_PORT=%d", port);
    snprintf(vars[n++], 600, "BG_HTTPS_PORT=0");
    snprintf(vars[n++], 600, "BG_EDGE_THREADS=2");
    for (int i = 0; i < n; i++)
        env[i] = vars[i];
    env[n] = NULL;
    const char *eargv[] = {bgt_bin("bg-edge"), NULL};
    S.edge = spawn_logged(eargv, env, "edge");
    snprintf(S.base, sizeof(S.base), "http://127.0.0.1:%d", port);
    snprintf(url, sizeof(url), "%s/healthz", S.base);
    cr_assert_eq(bgt_wait_http(url, 200, 10000), 0, "bg-edge did not come up");

    /* the worker */
    n = 0;
    common_env(vars, &n);
    snprintf(vars[n++], 600, "BG_LLM_BASE_URL=%s", S.demo);
    snprintf(vars[n++], 600, "BG_LLM_MODEL=demo-1");
    snprintf(vars[n++], 600, "BG_WORKER_CONCURRENCY=8");
    int wport = bgt_free_port();
    snprintf(vars[n++], 600, "BG_WORKER_PORT=%d", wport);
    snprintf(vars[n++], 600, "BG_CLAIM_IDLE_MS=30000");
    snprintf(vars[n++], 600, "BG_SHUTDOWN_GRACE_MS=3000");
    for (int i = 0; i < n; i++)
        env[i] = vars[i];
    env[n] = NULL;
    const char *wargv[] = {bgt_bin("bg-worker"), "--roles", "telegram,llm,usage", NULL};
    S.worker = spawn_logged(wargv, env, "worker");
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/healthz", wport);
    cr_assert_eq(bgt_wait_http(url, 200, 15000), 0, "bg-worker did not come up");
}

static void teardown(void)
{
    /* the service ends cleanly: a crash or a sanitizer report at exit fails the test */
    pid_t ours[] = {S.worker, S.edge};
    const char *names[] = {"bg-worker", "bg-edge"};
    for (size_t i = 0; i < sizeof(ours) / sizeof(ours[0]); i++) {
        if (ours[i] <= 0)
            continue;
        int st = bgt_stop(ours[i], SIGTERM, 15000);
        cr_expect(WIFEXITED(st) && WEXITSTATUS(st) == 0, "%s ended with status %d; see %s",
                  names[i], st, S.dir);
    }
    pid_t fakes[] = {S.demo_pid, S.fake_pid};
    for (size_t i = 0; i < sizeof(fakes) / sizeof(fakes[0]); i++)
        if (fakes[i] > 0)
            bgt_stop(fakes[i], SIGKILL, 3000);
    PQfinish(S.pg);
    bg_redis_free(S.r);
    bgt_redis_stop(&S.redis);
    if (S.have_db)
        bgt_pg_drop(&S.db);
    if (getenv("BGT_KEEP_LOGS") == NULL)
        bgt_rmtree(S.dir);
    else
        fprintf(stderr, "logs kept in %s\n", S.dir);
}

TestSuite(telegram, .init = setup, .fini = teardown, .timeout = 300);

/* ---- the webhook ---- */

typedef struct st_post {
    const char *body;
    const char *secret; /* NULL: no header */
    const char *slug;
    const char *content_type;
    long status;
    long long ms;
} post_t;

static void post_run(post_t *p)
{
    char url[256], sh[400], ct[128];
    snprintf(url, sizeof(url), "%s/webhooks/telegram/%s", S.base, p->slug != NULL ? p->slug : SLUG);
    const char *headers[3];
    size_t n = 0;
    snprintf(ct, sizeof(ct), "Content-Type: %s",
             p->content_type != NULL ? p->content_type : "application/json");
    headers[n++] = ct;
    if (p->secret != NULL) {
        snprintf(sh, sizeof(sh), "X-Telegram-Bot-Api-Secret-Token: %s", p->secret);
        headers[n++] = sh;
    }
    headers[n] = NULL;
    bgt_resp_t r;
    long long t0 = bgt_now_ms();
    int rc = bgt_http(BGT_H1, "POST", url, headers, p->body, strlen(p->body), &r);
    p->ms = bgt_now_ms() - t0;
    p->status = rc == 0 ? r.status : 0;
    bgt_resp_free(&r);
}

static void *post_thread(void *arg)
{
    post_run(arg);
    return NULL;
}

/* Posts an update with the right secret; asserts 200 and returns the time it took. */
static long long post(const char *body)
{
    post_t p = {.body = body, .secret = SECRET};
    post_run(&p);
    cr_assert_eq(p.status, 200, "webhook answered %ld for %.200s", p.status, body);
    return p.ms;
}

static void fail_next(const char *method, long status, long retry_after, long count_)
{
    char url[200], body[256];
    snprintf(url, sizeof(url), "%s/control/fail", S.fake);
    snprintf(body, sizeof(body),
             "{\"method\":\"%s\",\"status\":%ld,\"retry_after\":%ld,\"count\":%ld}", method, status,
             retry_after, count_);
    const char *h[] = {"Content-Type: application/json", NULL};
    bgt_resp_t r;
    cr_assert_eq(bgt_http(BGT_H1, "POST", url, h, body, strlen(body), &r), 0);
    cr_assert_eq(r.status, 200);
    bgt_resp_free(&r);
}

/* The platform user a Telegram user maps to ("" while none). */
static void user_of(long long tg_user, char *out, size_t outlen)
{
    char id[24];
    snprintf(id, sizeof(id), "%lld", tg_user);
    const char *p[] = {id};
    PGresult *res = NULL;
    cr_assert_eq(bg_pg_exec(S.pg,
                            "SELECT user_id FROM telegram_accounts WHERE telegram_user_id = $1", 1,
                            p, &res),
                 0);
    snprintf(out, outlen, "%s", PQntuples(res) == 1 ? PQgetvalue(res, 0, 0) : "");
    PQclear(res);
}

/* ---- tests ---- */

Test(telegram, webhook_checks_the_secret_and_the_body)
{
    post_t p = {.body = "{\"update_id\":1}"};
    post_run(&p);
    cr_expect_eq(p.status, 401, "no secret: %ld", p.status);
    p = (post_t){.body = "{\"update_id\":1}", .secret = "wrong-secret"};
    post_run(&p);
    cr_expect_eq(p.status, 403, "wrong secret: %ld", p.status);
    p = (post_t){.body = "{\"update_id\":1}", .secret = SECRET, .slug = "999"};
    post_run(&p);
    cr_expect_eq(p.status, 403, "unknown bot: %ld", p.status);
    p = (post_t){.body = "update_id=1", .secret = SECRET, .content_type = "text/plain"};
    post_run(&p);
    cr_expect_eq(p.status, 415, "not JSON: %ld", p.status);
    p = (post_t){.body = "{\"update_id\":", .secret = SECRET};
    post_run(&p);
    cr_expect_eq(p.status, 400, "malformed: %ld", p.status);
    p = (post_t){.body = "{\"message\":{}}", .secret = SECRET};
    post_run(&p);
    cr_expect_eq(p.status, 400, "no update_id: %ld", p.status);
    p = (post_t){.body = "{\"update_id\":1}", .secret = SECRET};
    post_run(&p);
    cr_expect_eq(p.status, 200, "right secret: %ld", p.status);
}

Test(telegram, a_repeated_update_gets_one_reply)
{
    char body[1024];
    long long uid = 700001;
    bgt_tg_text_update(body, sizeof(body), 5000, uid, "en", "What is the capital of France?");
    post_t p[5];
    pthread_t t[5];
    for (int i = 0; i < 5; i++) {
        p[i] = (post_t){.body = body, .secret = SECRET};
        cr_assert_eq(pthread_create(&t[i], NULL, post_thread, &p[i]), 0);
    }
    for (int i = 0; i < 5; i++) {
        pthread_join(t[i], NULL);
        cr_expect_eq(p[i].status, 200, "delivery %d answered %ld", i, p[i].status);
    }
    char reply[8192];
    size_t n = bgt_tg_wait_reply(&W, 5000, uid, reply, sizeof(reply), 30000);
    cr_expect(strstr(reply, "Echo: What is the capital of France?") != NULL, "%s", reply);
    /* a little longer, in case a second job were on its way */
    sleep_ms(1500);
    bgt_tg_free_calls(calls, n);
    n = bgt_tg_read_calls(&W, calls, MAX_CALLS);
    cr_expect_eq(bgt_tg_count(calls, n, "sendMessage", uid, 0), 1, "%zu messages for one update",
                 bgt_tg_count(calls, n, "sendMessage", uid, 0));
    const char *p1[] = {"tg-" SLUG "-5000"};
    PGresult *res = NULL;
    cr_assert_eq(bg_pg_exec(S.pg, "SELECT count(*) FROM messages WHERE job_id = $1", 1, p1, &res),
                 0);
    cr_expect_str_eq(PQgetvalue(res, 0, 0), "2", "one user message and one reply");
    PQclear(res);
    bgt_tg_free_calls(calls, n);
}

Test(telegram, the_webhook_answers_at_once_while_a_slow_reply_is_typed)
{
    char body[1024];
    long long uid = 700002;
    /* about 11 s of streaming */
    bgt_tg_text_update(body, sizeof(body), 5100, uid, "en", "Tell me a story #fail:slow=150");
    long long ms = post(body);
    cr_expect_lt(ms, 100, "the webhook took %lld ms", ms);
    char reply[8192];
    size_t n = bgt_tg_wait_reply(&W, 5100, uid, reply, sizeof(reply), 60000);
    cr_expect_geq(bgt_tg_count(calls, n, "sendChatAction", uid, 200), 2,
                  "typing is sent every ~4 s of a long reply: %zu",
                  bgt_tg_count(calls, n, "sendChatAction", uid, 200));
    cr_expect_geq(bgt_tg_count(calls, n, "editMessageText", uid, 200), 2,
                  "the text grows in the chat while it is generated: %zu edits",
                  bgt_tg_count(calls, n, "editMessageText", uid, 200));
    /* another update while the first still streams: the webhook does not wait either */
    bgt_tg_text_update(body, sizeof(body), 5101, uid + 1, "en", "hi");
    ms = post(body);
    cr_expect_lt(ms, 100, "the webhook took %lld ms", ms);
    bgt_tg_free_calls(calls, n);
}

Test(telegram, rate_limits_and_429s_do_not_lose_the_final_text)
{
    char body[1024];
    long long uid = 700003;
    fail_next("editMessageText", 429, 1, 3);
    fail_next("sendChatAction", 502, 0, 1);
    bgt_tg_text_update(body, sizeof(body), 5200, uid, "en", "Explain rate limits #fail:slow=60");
    post(body);
    char reply[8192];
    size_t n = bgt_tg_wait_reply(&W, 5200, uid, reply, sizeof(reply), 60000);
    cr_expect_geq(bgt_tg_count(calls, n, "editMessageText", uid, 429), 1, "no 429 was met");
    /* no two messages or edits of the chat within ~1 s of each other (a little clock slack) */
    long long prev = 0;
    size_t msgs = 0;
    for (size_t i = 0; i < n; i++) {
        if (calls[i].chat_id != uid || (strcmp(calls[i].method, "sendMessage") != 0 &&
                                        strcmp(calls[i].method, "editMessageText") != 0))
            continue;
        if (msgs++ > 0)
            cr_expect_geq(calls[i].t - prev, 900, "%s %lld ms after the previous one",
                          calls[i].method, calls[i].t - prev);
        prev = calls[i].t;
    }
    cr_expect_geq(msgs, 3, "the reply was shown in %zu steps", msgs);
    bgt_tg_free_calls(calls, n);
}

/* Every fixture of ../shared/fixtures/telegram (copied into test/fixtures/telegram). */
Test(telegram, every_fixture_is_accepted_and_handled)
{
    static const char *const names[] = {"update_text.json",
                                        "update_photo.json",
                                        "update_document.json",
                                        "update_voice.json",
                                        "update_edited.json",
                                        "update_group_command.json",
                                        "update_callback_inline.json",
                                        "update_callback_inaccessible.json"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        char path[512];
        snprintf(path, sizeof(path), BGT_SOURCE_DIR "/test/fixtures/telegram/%s", names[i]);
        FILE *f = fopen(path, "rb");
        cr_assert_not_null(f, "%s", path);
        static char body[65536];
        size_t len = fread(body, 1, sizeof(body) - 1, f);
        fclose(f);
        while (len > 0 && (body[len - 1] == '\n' || body[len - 1] == '\r'))
            len--;
        body[len] = '\0';
        post(body);
    }
    /* the text message is answered by the model */
    char reply[8192];
    size_t n = bgt_tg_wait_reply(&W, 892252934, 218485655, reply, sizeof(reply), 30000);
    cr_expect(strstr(reply, "hello there") != NULL, "%s", reply);
    bgt_tg_free_calls(calls, n);
    /* both callback queries answered, the inaccessible one too */
    n = bgt_tg_wait_calls(&W, "answerCallbackQuery", 0, 0, 1000);
    long long until = bgt_now_ms() + 20000;
    bool inline_ok = false, inacc_ok = false;
    while (!(inline_ok && inacc_ok) && bgt_now_ms() < until) {
        bgt_tg_free_calls(calls, n);
        n = bgt_tg_read_calls(&W, calls, MAX_CALLS);
        for (size_t i = 0; i < n; i++) {
            if (strcmp(calls[i].method, "answerCallbackQuery") != 0 || calls[i].status != 200)
                continue;
            inline_ok = inline_ok || strcmp(calls[i].callback_id, "id") == 0;
            inacc_ok = inacc_ok || strcmp(calls[i].callback_id, "12345") == 0;
        }
        sleep_ms(100);
    }
    cr_expect(inline_ok, "the inline query was not answered");
    cr_expect(inacc_ok, "the query on an inaccessible message was not answered");
    /* the photo (no language: English) is told what is supported */
    bgt_tg_free_calls(calls, n);
    n = bgt_tg_wait_calls(&W, "sendMessage", 1234567, 1, 20000);
    const char *t = bgt_tg_last_text(calls, n, 1234567);
    cr_expect(t != NULL && strstr(t, "text messages and text files") != NULL, "photo: %s", t);
    /* the document and the voice message (Russian) likewise, in Russian; the edit gets nothing */
    bgt_tg_free_calls(calls, n);
    n = bgt_tg_wait_calls(&W, "sendMessage", 12345678, 2, 20000);
    t = bgt_tg_last_text(calls, n, 12345678);
    cr_expect(t != NULL && strstr(t, "только текстовые") != NULL, "voice: %s", t);
    /* the unknown command in the supergroup is answered there */
    bgt_tg_free_calls(calls, n);
    n = bgt_tg_wait_calls(&W, "sendMessage", -1001293752024LL, 1, 20000);
    t = bgt_tg_last_text(calls, n, -1001293752024LL);
    cr_expect(t != NULL && strstr(t, "/help") != NULL, "group: %s", t);
    sleep_ms(1500);
    bgt_tg_free_calls(calls, n);
    n = bgt_tg_read_calls(&W, calls, MAX_CALLS);
    cr_expect_eq(bgt_tg_count(calls, n, "sendMessage", 12345678, 0), 2,
                 "document and voice get a note each, the edited message nothing: %zu",
                 bgt_tg_count(calls, n, "sendMessage", 12345678, 0));
    bgt_tg_free_calls(calls, n);
}

Test(telegram, a_russian_speaking_newcomer_is_answered_in_russian)
{
    char body[1024];
    long long uid = 700004;
    bgt_tg_text_update(body, sizeof(body), 5300, uid, "ru", "/start");
    post(body);
    size_t n = bgt_tg_wait_calls(&W, "sendMessage", uid, 1, 20000);
    const char *t = bgt_tg_last_text(calls, n, uid);
    cr_expect(t != NULL && strstr(t, "Привет, Tester!") != NULL, "/start: %s", t);
    bgt_tg_free_calls(calls, n);

    bgt_tg_text_update(body, sizeof(body), 5301, uid, "ru", "/help");
    post(body);
    n = bgt_tg_wait_calls(&W, "sendMessage", uid, 2, 20000);
    t = bgt_tg_last_text(calls, n, uid);
    cr_expect(t != NULL && strstr(t, "Команды") != NULL, "/help: %s", t);
    bgt_tg_free_calls(calls, n);

    /* the user was provisioned with the trial and the Russian locale */
    char user[64];
    user_of(uid, user, sizeof(user));
    cr_assert_neq(user[0], '\0', "no platform user for the Telegram user");
    const char *p[] = {user};
    PGresult *res = NULL;
    cr_assert_eq(bg_pg_exec(S.pg,
                            "SELECT u.locale, s.plan_id, s.status FROM users u JOIN subscriptions "
                            "s ON s.user_id = u.id WHERE u.id = $1",
                            1, p, &res),
                 0);
    cr_assert_eq(PQntuples(res), 1);
    cr_expect_str_eq(PQgetvalue(res, 0, 0), "ru");
    cr_expect_str_eq(PQgetvalue(res, 0, 1), "trial");
    cr_expect_str_eq(PQgetvalue(res, 0, 2), "trialing");
    PQclear(res);

    /* the quota spent: the quota message, in Russian */
    bg_admission_state_t st;
    int64_t now = bg_timeutil_wall_ms();
    cr_assert_eq(bg_policy_compile_user(S.pg, user, now, &st), 0);
    cr_assert_eq(bg_policy_state_write(S.r, SHARDS, &st), 0);
    cr_assert_eq(bg_policy_quota_write(S.r, SHARDS, user, bg_policy_window_start(&st, now),
                                       st.limits.q_limit, 0),
                 0);
    bgt_tg_text_update(body, sizeof(body), 5302, uid, "ru", "Сколько будет 2+2?");
    post(body);
    n = bgt_tg_wait_calls(&W, "sendMessage", uid, 3, 20000);
    t = bgt_tg_last_text(calls, n, uid);
    cr_expect(t != NULL && strstr(t, "израсходовали все запросы") != NULL, "quota: %s", t);
    bgt_tg_free_calls(calls, n);
}

Test(telegram, telegram_turns_draw_on_the_platform_users_quota)
{
    char body[1024];
    long long uid = 700005;
    bgt_tg_text_update(body, sizeof(body), 5400, uid, "en", "Count me");
    post(body);
    char reply[8192];
    size_t n = bgt_tg_wait_reply(&W, 5400, uid, reply, sizeof(reply), 30000);
    bgt_tg_free_calls(calls, n);
    char user[64];
    user_of(uid, user, sizeof(user));
    cr_assert_neq(user[0], '\0');

    /* the platform user's admission state counts the turn once the usage worker settled it */
    bg_admission_keys_t keys;
    cr_assert_eq(bg_admission_keys(&keys, SHARDS, user), 0);
    long long used = -1;
    for (long long until = bgt_now_ms() + 15000; bgt_now_ms() < until; sleep_ms(100)) {
        redisReply *r = NULL;
        const char *argv[] = {"HGET", keys.quota, "used"};
        cr_assert_eq(bg_redis_argv(S.r, 3, argv, NULL, &r), 0);
        used = r->type == REDIS_REPLY_STRING ? strtoll(r->str, NULL, 10) : -1;
        freeReplyObject(r);
        if (used == 1)
            break;
    }
    cr_expect_eq(used, 1, "the quota of user %s counts %lld requests", user, used);

    /* /usage tells the same state: one request fewer than the plan's limit */
    bg_admission_state_t st;
    cr_assert_eq(bg_policy_compile_user(S.pg, user, bg_timeutil_wall_ms(), &st), 0);
    bgt_tg_text_update(body, sizeof(body), 5401, uid, "en", "/usage");
    post(body);
    n = bgt_tg_wait_calls(&W, "sendMessage", uid, 2, 20000);
    const char *t = bgt_tg_last_text(calls, n, uid);
    char want[128];
    snprintf(want, sizeof(want), "Requests left: %lld of %lld", (long long)st.limits.q_limit - 1,
             (long long)st.limits.q_limit);
    cr_expect(t != NULL && strstr(t, want) != NULL, "/usage: %s (want \"%s\")", t, want);
    bgt_tg_free_calls(calls, n);
}

Test(telegram, a_blocked_bot_stops_and_marks_the_chat)
{
    char body[1024];
    long long uid = 700006;
    fail_next("sendMessage", 403, 0, 1);
    bgt_tg_text_update(body, sizeof(body), 5500, uid, "en", "/help");
    post(body);
    long long until = bgt_now_ms() + 20000;
    char v[8] = "";
    char chat[24];
    snprintf(chat, sizeof(chat), "%lld", uid);
    while (bgt_now_ms() < until && v[0] != 't') {
        const char *p[] = {chat};
        PGresult *res = NULL;
        cr_assert_eq(bg_pg_exec(S.pg,
                                "SELECT blocked_at IS NOT NULL FROM telegram_chats WHERE chat_id = "
                                "$1::bigint",
                                1, p, &res),
                     0);
        snprintf(v, sizeof(v), "%s", PQntuples(res) == 1 ? PQgetvalue(res, 0, 0) : "");
        PQclear(res);
        sleep_ms(100);
    }
    cr_expect_str_eq(v, "t", "the chat is not marked blocked");
}

/* Runs bgctl with the stack's settings; returns its exit status, its output in out. */
static int bgctl(const char *const args[], char *out, size_t outlen)
{
    char vars[16][600];
    const char *env[17];
    int n = 0;
    common_env(vars, &n);
    snprintf(vars[n++], 600, "BG_PUBLIC_URL=https://bot.example.com");
    snprintf(vars[n++], 600, "BG_LOG_LEVEL=warn");
    for (int i = 0; i < n; i++)
        env[i] = vars[i];
    env[n] = NULL;
    const char *argv[12];
    size_t k = 0;
    argv[k++] = bgt_bin("bgctl");
    for (size_t i = 0; args[i] != NULL && k < 11; i++)
        argv[k++] = args[i];
    argv[k] = NULL;
    return bgt_run(argv, env, out, outlen);
}

static bool calls_contain(const char *needle)
{
    FILE *f = fopen(S.calls_path, "r");
    if (f == NULL)
        return false;
    static char line[1 << 20];
    bool found = false;
    while (!found && fgets(line, sizeof(line), f) != NULL)
        found = strstr(line, needle) != NULL;
    fclose(f);
    return found;
}

Test(telegram, bgctl_manages_bots_and_webhooks)
{
    char out[8192];
    const char *set[] = {"telegram", "set-webhook", "--bot", SLUG, "--drop-pending", NULL};
    cr_assert_eq(bgctl(set, out, sizeof(out)), 0, "set-webhook: %s", out);
    cr_expect(calls_contain("\"url\":\"https://bot.example.com/webhooks/telegram/" SLUG "\""),
              "setWebhook did not name the webhook URL");
    cr_expect(calls_contain("\"secret_token\":\"" SECRET "\""),
              "setWebhook did not pass the secret");
    cr_expect(strstr(out, TOKEN) == NULL, "the token was printed: %s", out);

    const char *info[] = {"telegram", "webhook-info", "--bot", SLUG, NULL};
    cr_assert_eq(bgctl(info, out, sizeof(out)), 0, "webhook-info: %s", out);
    cr_expect(strstr(out, "https://bot.example.com/webhooks/telegram/" SLUG) != NULL, "%s", out);

    const char *del[] = {"telegram", "delete-webhook", "--bot", SLUG, NULL};
    cr_assert_eq(bgctl(del, out, sizeof(out)), 0, "delete-webhook: %s", out);
    cr_assert_eq(bgctl(info, out, sizeof(out)), 0, "webhook-info: %s", out);
    cr_expect(strstr(out, "\"url\":\"\"") != NULL, "the webhook is still set: %s", out);

    const char *unknown[] = {"telegram", "set-webhook", "--bot", "999", NULL};
    cr_expect_eq(bgctl(unknown, out, sizeof(out)), 1, "an unknown bot: %s", out);

    /* a second bot, bound from the command line: the edge checks its secret from the table */
    const char *bind[] = {"telegram", "bind",          "--token", "777:second-BOT",
                          "--secret", "second_secret", NULL};
    cr_assert_eq(bgctl(bind, out, sizeof(out)), 0, "bind: %s", out);
    post_t p = {.body = "{\"update_id\":42}", .secret = "second_secret", .slug = "777"};
    post_run(&p);
    cr_expect_eq(p.status, 200, "the bound bot's secret: %ld", p.status);
    p = (post_t){.body = "{\"update_id\":43}", .secret = SECRET, .slug = "777"};
    post_run(&p);
    cr_expect_eq(p.status, 403, "another bot's secret: %ld", p.status);
}
