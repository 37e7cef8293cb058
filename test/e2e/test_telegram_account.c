/*
 * The Telegram account end to end (docs/telegram.md): /link joining a Telegram user to a web
 * account, /profile, /plans with a Paddle checkout link, and photos sent to an agent whose model
 * accepts images. The same stack as test_telegram.c (real bg-edge and bg-worker with the roles
 * telegram, llm and usage, bg-demo-llm, the fake Bot API) plus bg-fake-paddle.
 *
 * What a user would notice: a code from the web joins their Telegram chat to their account, so
 * web and Telegram requests draw on one quota; wrong, used, expired and group-typed codes are
 * refused in their language; /profile and /plans tell the truth and a plan button gives a
 * checkout link (or says online payment is off); the quota message carries the plans; a photo
 * reaches an image model as a data URL and files over Telegram's 20 MB are refused, whether the
 * update, getFile or the download says so.
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
#include "bg/telegram.h"
#include "bg/timeutil.h"
#include "bgtest.h"
#include "bgtest_telegram.h"

#define SHARDS 4
#define SLUG "123456"
#define TOKEN SLUG ":TEST-token_abc"
#define SECRET "hook-Secret_42"
#define MAX_CALLS 4096
#define PASSWORD "Link-Horse-Battery-42"
#define PADDLE_KEY "pdl_sdbx_apikey_telegram"
#define PRICE_MONTHLY "pri_01tgmonthly"
#define ASSISTANT "00000000-0000-4000-8000-00000000a550"

static struct {
    bgt_redis_t redis;
    bgt_pg_t db;
    bool have_db;
    char dir[256];
    char base[64];
    char fake[64];
    char demo[128];
    char calls_path[320];
    pid_t edge, worker, demo_pid, fake_pid, paddle_pid;
    char paddle[64];
    char paddle_calls[320];
    bool no_paddle; /* start the worker without Paddle (online payment off) */
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
    bool no_paddle = S.no_paddle;
    memset(&S, 0, sizeof(S));
    S.no_paddle = no_paddle;
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

    /* Paddle, with a price for the monthly plan */
    PGresult *pres = PQexec(S.pg, "UPDATE plans SET paddle_price_id = '" PRICE_MONTHLY
                                  "', paddle_price_source = 'admin' WHERE id = 'monthly'");
    cr_assert_eq(PQresultStatus(pres), PGRES_COMMAND_OK);
    PQclear(pres);
    int pport = bgt_free_port();
    char pports[16];
    snprintf(pports, sizeof(pports), "%d", pport);
    snprintf(S.paddle_calls, sizeof(S.paddle_calls), "%s/paddle_calls.log", S.dir);
    snprintf(S.paddle, sizeof(S.paddle), "http://127.0.0.1:%d", pport);
    const char *pargv[] = {bgt_bin("bg-fake-paddle"), pports, S.paddle_calls, PADDLE_KEY, NULL};
    S.paddle_pid = spawn_logged(pargv, NULL, "fake_paddle");
    snprintf(url, sizeof(url), "%s/__health", S.paddle);
    cr_assert_eq(bgt_wait_http(url, 200, 10000), 0, "fake_paddle does not answer");

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
    if (!S.no_paddle) {
        snprintf(vars[n++], 600, "BG_PADDLE_API_URL=%s", S.paddle);
        snprintf(vars[n++], 600, "BG_PADDLE_API_KEY=" PADDLE_KEY);
    }
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
    pid_t fakes[] = {S.demo_pid, S.fake_pid, S.paddle_pid};
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

TestSuite(telegram_account, .init = setup, .fini = teardown, .timeout = 300);

/* Criterion runs the suite's .init before a test's own: the service it started goes, and a
 * second one without Paddle replaces it (else the first one's processes and clients would leak). */
static void setup_no_paddle(void)
{
    teardown();
    S.no_paddle = true;
    setup();
}

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

/* Posts an update with the right secret; asserts 200 and returns the time it took. */
static long long post(const char *body)
{
    post_t p = {.body = body, .secret = SECRET};
    post_run(&p);
    cr_assert_eq(p.status, 200, "webhook answered %ld for %.200s", p.status, body);
    return p.ms;
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

/* ---- the web side ---- */

static long api(const char *method, const char *path, const char *token, const char *body,
                bgt_resp_t *r)
{
    char url[512], authz[2100];
    const char *headers[3];
    size_t n = 0;
    snprintf(url, sizeof(url), "%s%s", S.base, path);
    if (token != NULL) {
        snprintf(authz, sizeof(authz), "Authorization: Bearer %s", token);
        headers[n++] = authz;
    }
    if (body != NULL)
        headers[n++] = "Content-Type: application/json";
    headers[n] = NULL;
    cr_assert_eq(bgt_http(BGT_H1, method, url, headers, body, body != NULL ? strlen(body) : 0, r),
                 0, "%s %s: %s", method, path, r->error);
    return r->status;
}

static bool json_get(const char *text, const char *const path[], char *out, size_t outlen)
{
    bg_json_doc_t *doc = NULL;
    const char *desc;
    out[0] = '\0';
    if (text == NULL || bg_json_parse(text, strlen(text), NULL, &doc, &desc, NULL) != 0)
        return false;
    const bg_json_t *v = bg_json_root(doc);
    for (size_t i = 0; path[i] != NULL && v != NULL; i++)
        v = bg_json_find(v, path[i]);
    size_t len = 0;
    const char *s = v != NULL ? bg_json_str(v, &len) : NULL;
    bool ok = s != NULL && len < outlen;
    if (ok) {
        memcpy(out, s, len);
        out[len] = '\0';
    }
    bg_json_doc_free(doc);
    return ok;
}

static void register_user(const char *email, const char *name, char *token, size_t tlen, char *id,
                          size_t idlen)
{
    char body[256];
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"" PASSWORD "\",\"name\":\"%s\"}",
             email, name);
    bgt_resp_t r;
    long st = api("POST", "/auth/register", NULL, body, &r);
    cr_assert_eq(st, 201, "register: %ld %s", st, r.body);
    cr_assert(json_get(r.body, (const char *const[]){"access_token", NULL}, token, tlen));
    cr_assert(json_get(r.body, (const char *const[]){"user", "id", NULL}, id, idlen));
    bgt_resp_free(&r);
}

/* POST /auth/telegram/link-code; checks the answer's shape and returns the code. */
static void link_code(const char *token, char code[16])
{
    bgt_resp_t r;
    long long t0 = bg_timeutil_wall_ms();
    long st = api("POST", "/auth/telegram/link-code", token, NULL, &r);
    cr_assert_eq(st, 201, "link-code: %ld %s", st, r.body);
    char command[64], expires[64];
    cr_assert(json_get(r.body, (const char *const[]){"code", NULL}, code, 16), "%s", r.body);
    cr_assert(json_get(r.body, (const char *const[]){"command", NULL}, command, sizeof(command)));
    cr_assert(
        json_get(r.body, (const char *const[]){"expires_at", NULL}, expires, sizeof(expires)));
    cr_expect_eq(strlen(code), 8, "code %s", code);
    cr_expect_eq(strspn(code, "23456789ABCDEFGHJKMNPQRSTUVWXYZ"), 8, "code %s", code);
    char want[32];
    snprintf(want, sizeof(want), "/link %s", code);
    cr_expect_str_eq(command, want);
    int64_t exp_ms = 0;
    cr_assert_eq(bg_timeutil_parse_rfc3339(expires, strlen(expires), &exp_ms), 0, "%s", expires);
    cr_expect(exp_ms > t0 + 9 * 60 * 1000 && exp_ms < t0 + 11 * 60 * 1000, "expires_at %s",
              expires);
    char cc[64];
    cr_expect(bgt_resp_header(&r, "cache-control", cc, sizeof(cc)) != NULL &&
                  strcmp(cc, "no-store") == 0,
              "the code may be cached");
    bgt_resp_free(&r);
}

/* A web chat turn of the user, through to its end. */
static void web_turn(const char *token, const char *text)
{
    bgt_resp_t r;
    char body[256], conv[64], path[128];
    long st = api("POST", "/chat/conversations", token, "{\"agent_id\":\"" ASSISTANT "\"}", &r);
    cr_assert_eq(st, 201, "conversation: %ld %s", st, r.body);
    cr_assert(json_get(r.body, (const char *const[]){"id", NULL}, conv, sizeof(conv)));
    bgt_resp_free(&r);
    snprintf(path, sizeof(path), "/chat/conversations/%s/messages", conv);
    snprintf(body, sizeof(body), "{\"content\":\"%s\"}", text);
    st = api("POST", path, token, body, &r);
    cr_assert_eq(st, 200, "message: %ld %s", st, r.body);
    cr_expect(strstr(r.body, "event: done") != NULL, "the web turn did not end: %s", r.body);
    bgt_resp_free(&r);
}

/* The "used" counter of the user's quota, once it reaches want (or the last value seen). */
static long long quota_used(const char *user, long long want)
{
    bg_admission_keys_t keys;
    cr_assert_eq(bg_admission_keys(&keys, SHARDS, user), 0);
    long long used = -1;
    for (long long until = bgt_now_ms() + 15000; bgt_now_ms() < until; sleep_ms(100)) {
        redisReply *r = NULL;
        const char *argv[] = {"HGET", keys.quota, "used"};
        cr_assert_eq(bg_redis_argv(S.r, 3, argv, NULL, &r), 0);
        used = r->type == REDIS_REPLY_STRING ? strtoll(r->str, NULL, 10) : -1;
        freeReplyObject(r);
        if (used == want)
            break;
    }
    return used;
}

static long long sql_count(const char *sql, const char *param)
{
    const char *p[] = {param};
    PGresult *res = NULL;
    cr_assert_eq(bg_pg_exec(S.pg, sql, param != NULL ? 1 : 0, p, &res), 0, "%s", sql);
    long long n = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    PQclear(res);
    return n;
}

/* Sends text from Telegram user uid and waits for the chat's want-th message; returns its text. */
static char *tg_say(long long update_id, long long uid, const char *lang, const char *text,
                    size_t want)
{
    char body[2048];
    bgt_tg_text_update(body, sizeof(body), update_id, uid, lang, text);
    post(body);
    size_t n = bgt_tg_wait_calls(&W, "sendMessage", uid, want, 30000);
    const char *t = NULL;
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (strcmp(calls[i].method, "sendMessage") == 0 && calls[i].chat_id == uid &&
            calls[i].status == 200 && ++k == want)
            t = calls[i].text;
    char *out = strdup(t != NULL ? t : "");
    bgt_tg_free_calls(calls, n);
    return out;
}

static bool file_contains(const char *path, const char *needle)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return false;
    static char line[1 << 20];
    bool found = false;
    while (!found && fgets(line, sizeof(line), f) != NULL)
        found = strstr(line, needle) != NULL;
    fclose(f);
    return found;
}

/* ---- tests ---- */

Test(telegram_account, link_joins_the_telegram_user_to_the_web_account_and_one_quota)
{
    long long uid = 810001;
    /* a Telegram user with a conversation of their own */
    char body[1024];
    bgt_tg_text_update(body, sizeof(body), 9000, uid, "en", "Remember the word zebra");
    post(body);
    char reply[8192];
    size_t n = bgt_tg_wait_reply(&W, 9000, uid, reply, sizeof(reply), 30000);
    bgt_tg_free_calls(calls, n);
    char tg_user[64];
    user_of(uid, tg_user, sizeof(tg_user));
    cr_assert_neq(tg_user[0], '\0');

    char *t = tg_say(9001, uid, "en", "/link", 2);
    cr_expect(strstr(t, "Link Telegram") != NULL && strstr(t, "/link ABCD2345") != NULL,
              "/link without a code: %s", t);
    free(t);

    char token[2048], web[64], code[16];
    register_user("linker@telegram.example", "Web Linker", token, sizeof(token), web, sizeof(web));
    link_code(token, code);
    t = tg_say(9002, uid, "en", "/link ZZZZ2222", 3);
    cr_expect(strstr(t, "not right") != NULL, "a wrong code: %s", t);
    free(t);

    /* typed in lower case with a space: still the code */
    char cmd[64];
    snprintf(cmd, sizeof(cmd), "/link %.4s %s", code, code + 4);
    for (char *p = cmd + 6; *p != '\0'; p++)
        if (*p >= 'A' && *p <= 'Z')
            *p = (char)(*p - 'A' + 'a');
    t = tg_say(9003, uid, "en", cmd, 4);
    cr_expect(strstr(t, "web account of Web Linker") != NULL, "linked: %s", t);
    free(t);
    char now_user[64];
    user_of(uid, now_user, sizeof(now_user));
    cr_expect_str_eq(now_user, web, "telegram_accounts still points at %s", now_user);
    /* the Telegram-only user is retired into the account: its conversation moved, trial over */
    cr_expect_eq(
        sql_count("SELECT count(*) FROM users WHERE id = $1 AND deleted_at IS NOT NULL", tg_user),
        1, "the Telegram-only user is not retired");
    cr_expect_eq(sql_count("SELECT count(*) FROM subscriptions WHERE user_id = $1 AND status <> "
                           "'canceled'",
                           tg_user),
                 0, "its trial still runs");
    cr_expect_eq(sql_count("SELECT count(*) FROM conversations WHERE user_id = $1 AND channel = "
                           "'telegram'",
                           web),
                 1, "the chat's conversation did not move to the web account");

    t = tg_say(9004, uid, "en", cmd, 5);
    cr_expect(strstr(t, "used already") != NULL, "a used code: %s", t);
    free(t);

    /* one quota: a web turn and a Telegram turn both count on the web account */
    web_turn(token, "from the web");
    cr_expect_eq(quota_used(web, 1), 1, "the web turn is not counted");
    bgt_tg_text_update(body, sizeof(body), 9005, uid, "en", "and from Telegram");
    post(body);
    n = bgt_tg_wait_reply(&W, 9005, uid, reply, sizeof(reply), 30000);
    bgt_tg_free_calls(calls, n);
    cr_expect_eq(quota_used(web, 2), 2, "web and Telegram do not share the quota");
    cr_expect(strstr(reply, "zebra") != NULL || strstr(reply, "Telegram") != NULL, "%s", reply);
    bg_admission_state_t st;
    cr_assert_eq(bg_policy_compile_user(S.pg, web, bg_timeutil_wall_ms(), &st), 0);
    char want[96];
    snprintf(want, sizeof(want), "Requests left: %lld of %lld", (long long)st.limits.q_limit - 2,
             (long long)st.limits.q_limit);
    t = tg_say(9006, uid, "en", "/usage", 7);
    cr_expect(strstr(t, want) != NULL, "/usage: %s (want %s)", t, want);
    free(t);

    /* a new code replaces the old; an expired one is refused */
    char code2[16];
    link_code(token, code2);
    cr_expect_eq(sql_count("SELECT count(*) FROM telegram_link_codes WHERE user_id = $1", web), 1);
    PGresult *res = PQexec(S.pg, "UPDATE telegram_link_codes SET expires_at = now() - interval "
                                 "'1 second'");
    cr_assert_eq(PQresultStatus(res), PGRES_COMMAND_OK);
    PQclear(res);
    snprintf(cmd, sizeof(cmd), "/link %s", code2);
    t = tg_say(9007, uid + 1, "en", cmd, 1);
    cr_expect(strstr(t, "expired") != NULL, "an expired code: %s", t);
    free(t);
}

Test(telegram_account, a_web_account_keeps_its_own_telegram_user)
{
    /* a second Telegram user cannot take a web account that has one already */
    long long a = 820001, b = 820002;
    char token[2048], web[64], code[16], cmd[64];
    register_user("taken@telegram.example", "Taken", token, sizeof(token), web, sizeof(web));
    link_code(token, code);
    snprintf(cmd, sizeof(cmd), "/link %s", code);
    char *t = tg_say(9100, a, "ru", cmd, 1);
    /* from now on the bot speaks the account's language (English) */
    cr_expect(strstr(t, "Done!") != NULL, "linked: %s", t);
    free(t);
    link_code(token, code);
    snprintf(cmd, sizeof(cmd), "/link %s", code);
    t = tg_say(9101, b, "es", cmd, 1);
    cr_expect(strstr(t, "otra cuenta de Telegram") != NULL, "taken (in Spanish): %s", t);
    free(t);
    char user_b[64];
    user_of(b, user_b, sizeof(user_b));
    cr_expect(user_b[0] != '\0' && strcmp(user_b, web) != 0, "b was moved: %s", user_b);
    /* a code typed in a group is refused before it is looked at */
    char body[1024];
    snprintf(body, sizeof(body),
             "{\"update_id\":9102,\"message\":{\"message_id\":5,\"from\":{\"id\":%lld,"
             "\"is_bot\":false,\"first_name\":\"B\",\"language_code\":\"en\"},\"chat\":{"
             "\"id\":-100777,\"title\":\"G\",\"type\":\"group\"},\"date\":1700000000,"
             "\"text\":\"/link %s\"}}",
             b, code);
    post(body);
    size_t n = bgt_tg_wait_calls(&W, "sendMessage", -100777, 1, 20000);
    const char *g = bgt_tg_last_text(calls, n, -100777);
    cr_expect(g != NULL && strstr(g, "privado") != NULL, "group: %s", g);
    bgt_tg_free_calls(calls, n);
    user_of(b, user_b, sizeof(user_b));
    cr_expect_str_neq(user_b, web, "a code in a group linked the account");
}

Test(telegram_account, profile_plans_and_a_checkout_link)
{
    long long uid = 830001;
    char *t = tg_say(9200, uid, "en", "/profile", 1);
    cr_expect(strstr(t, "Name: Tester") != NULL, "/profile: %s", t);
    cr_expect(strstr(t, "Plan: Trial (trial)") != NULL, "/profile: %s", t);
    cr_expect(strstr(t, "Linked to a web account: no") != NULL, "/profile: %s", t);
    cr_expect(strstr(t, "Language: English") != NULL, "/profile: %s", t);
    free(t);

    t = tg_say(9201, uid, "en", "/plans", 2);
    cr_expect(strstr(t, "Choose a plan") != NULL, "/plans: %s", t);
    free(t);
    cr_expect(file_contains(S.calls_path, "\"callback_data\":\"plan:monthly\""),
              "no monthly button on the keyboard");

    /* the monthly button: the query is answered and a Paddle checkout link follows */
    char body[1024];
    snprintf(body, sizeof(body),
             "{\"update_id\":9202,\"callback_query\":{\"id\":\"cb-plan-1\",\"from\":{\"id\":%lld,"
             "\"is_bot\":false,\"first_name\":\"Tester\",\"language_code\":\"en\"},"
             "\"message\":{\"message_id\":77,\"chat\":{\"id\":%lld,\"type\":\"private\"},"
             "\"date\":1700000000,\"text\":\"Choose a plan:\"},\"chat_instance\":\"-42\","
             "\"data\":\"plan:monthly\"}}",
             uid, uid);
    post(body);
    size_t n = bgt_tg_wait_calls(&W, "sendMessage", uid, 3, 30000);
    const char *m = bgt_tg_last_text(calls, n, uid);
    cr_expect(m != NULL && strstr(m, "open this link: http") != NULL, "checkout: %s", m);
    cr_expect_eq(bgt_tg_count(calls, n, "answerCallbackQuery", 0, 200), 1,
                 "the plan button's query was not answered");
    bgt_tg_free_calls(calls, n);
    char user[64];
    user_of(uid, user, sizeof(user));
    char needle[128];
    snprintf(needle, sizeof(needle), "\"user_id\":\"%s\"", user);
    cr_expect(file_contains(S.paddle_calls, PRICE_MONTHLY), "Paddle was not asked for the price");
    cr_expect(file_contains(S.paddle_calls, needle), "the checkout is not for the user");

    /* the quota spent: the message carries the plans keyboard */
    bg_admission_state_t st;
    int64_t now = bg_timeutil_wall_ms();
    cr_assert_eq(bg_policy_compile_user(S.pg, user, now, &st), 0);
    cr_assert_eq(bg_policy_state_write(S.r, SHARDS, &st), 0);
    cr_assert_eq(bg_policy_quota_write(S.r, SHARDS, user, bg_policy_window_start(&st, now),
                                       st.limits.q_limit, 0),
                 0);
    FILE *f = fopen(S.calls_path, "w"); /* start the log afresh: only what follows counts */
    cr_assert_not_null(f);
    fclose(f);
    t = tg_say(9203, uid, "en", "One more question", 1);
    cr_expect(strstr(t, "used all the requests") != NULL, "quota: %s", t);
    free(t);
    cr_expect(file_contains(S.calls_path, "\"callback_data\":\"plan:monthly\""),
              "the quota message has no plans keyboard");
}

Test(telegram_account, without_paddle_online_payment_is_not_available, .init = setup_no_paddle)
{
    long long uid = 840001;
    char body[1024];
    snprintf(body, sizeof(body),
             "{\"update_id\":9300,\"callback_query\":{\"id\":\"cb-plan-2\",\"from\":{\"id\":%lld,"
             "\"is_bot\":false,\"first_name\":\"Tester\",\"language_code\":\"ru\"},"
             "\"message\":{\"message_id\":78,\"chat\":{\"id\":%lld,\"type\":\"private\"},"
             "\"date\":1700000000,\"text\":\"x\"},\"chat_instance\":\"-43\","
             "\"data\":\"plan:monthly\"}}",
             uid, uid);
    post(body);
    size_t n = bgt_tg_wait_calls(&W, "sendMessage", uid, 1, 30000);
    const char *m = bgt_tg_last_text(calls, n, uid);
    cr_expect(m != NULL && strstr(m, "Онлайн-оплата сейчас недоступна") != NULL, "%s", m);
    cr_expect_eq(bgt_tg_count(calls, n, "answerCallbackQuery", 0, 200), 1);
    bgt_tg_free_calls(calls, n);
}

/* A photo update from uid with file_id and file_size. */
static void photo_update(char *out, size_t outlen, long long update_id, long long uid,
                         const char *file_id, long long size, const char *caption)
{
    snprintf(out, outlen,
             "{\"update_id\":%lld,\"message\":{\"message_id\":%lld,\"from\":{\"id\":%lld,"
             "\"is_bot\":false,\"first_name\":\"Tester\",\"language_code\":\"en\"},\"chat\":{"
             "\"id\":%lld,\"type\":\"private\"},\"date\":1700000000,\"photo\":[{\"file_id\":"
             "\"small-%s\",\"file_unique_id\":\"s1\",\"file_size\":100,\"width\":90,\"height\":90},"
             "{\"file_id\":\"%s\",\"file_unique_id\":\"s2\",\"file_size\":%lld,\"width\":1280,"
             "\"height\":1280}]%s%s%s}}",
             update_id, update_id, uid, uid, file_id, file_id, size,
             caption != NULL ? ",\"caption\":\"" : "", caption != NULL ? caption : "",
             caption != NULL ? "\"" : "");
}

Test(telegram_account, photos_reach_an_image_model_within_the_20_mb_limit)
{
    /* an agent that accepts images, on the demo provider's vision model */
    PGresult *res = PQexec(S.pg, "UPDATE agents SET accepts_images = true, "
                                 "model = 'demo-vision-1' WHERE id = '" ASSISTANT "'");
    cr_assert_eq(PQresultStatus(res), PGRES_COMMAND_OK);
    PQclear(res);
    sleep_ms(5500); /* the llm worker's agent cache (5 s) may hold the agent as it was */
    long long uid = 850001;
    char body[4096], reply[8192];
    photo_update(body, sizeof(body), 9400, uid, "photo-ok", 2048, "What is on it?");
    post(body);
    size_t n = bgt_tg_wait_reply(&W, 9400, uid, reply, sizeof(reply), 30000);
    bgt_tg_free_calls(calls, n);
    cr_expect(strstr(reply, "What is on it?") != NULL, "%s", reply);
    cr_expect(file_contains(S.calls_path, "\"file_id\":\"photo-ok\""),
              "getFile was not asked for the largest size");
    cr_expect(file_contains(S.calls_path, "\"path\":\"files/photo-ok\""), "no download");
    /* the llm job carries the photo as a data URL (the fake's bytes start like a JPEG: /9j/) */
    char user[64];
    user_of(uid, user, sizeof(user));
    char key[128];
    snprintf(key, sizeof(key), "bg:{s%d}:q:llm", bg_shard_of(user, SHARDS));
    redisReply *r = NULL;
    const char *argv[] = {"XRANGE", key, "-", "+"};
    cr_assert_eq(bg_redis_argv(S.r, 4, argv, NULL, &r), 0);
    bool found = false;
    for (size_t i = 0; r->type == REDIS_REPLY_ARRAY && i < r->elements && !found; i++) {
        const redisReply *fv = r->element[i]->element[1];
        for (size_t k = 0; k + 1 < fv->elements; k += 2)
            if (strcmp(fv->element[k]->str, "image_url") == 0)
                found = strncmp(fv->element[k + 1]->str, "data:image/jpeg;base64,/9j/", 27) == 0;
    }
    freeReplyObject(r);
    cr_expect(found, "no llm job with the photo as image_url in %s", key);

    /* too large: by the update's file_size, by getFile's, and while downloading */
    photo_update(body, sizeof(body), 9401, uid, "photo-huge", 25LL * 1024 * 1024, NULL);
    post(body);
    photo_update(body, sizeof(body), 9402, uid, "photo-big", 4096, NULL);
    post(body);
    photo_update(body, sizeof(body), 9403, uid, "photo-liar", 4096, NULL);
    post(body);
    n = bgt_tg_wait_calls(&W, "sendMessage", uid, 4, 30000);
    size_t large = 0;
    for (size_t i = 0; i < n; i++)
        if (strcmp(calls[i].method, "sendMessage") == 0 && calls[i].chat_id == uid &&
            strstr(calls[i].text, "up to 20 MB") != NULL)
            large++;
    cr_expect_eq(large, 3, "%zu of 3 large photos were refused", large);
    bgt_tg_free_calls(calls, n);
    cr_expect(!file_contains(S.calls_path, "\"file_id\":\"photo-huge\""),
              "a photo over 20 MB by its update was asked for");
    cr_expect(!file_contains(S.calls_path, "\"path\":\"files/photo-big\""),
              "a file over 20 MB by getFile was downloaded");

    /* a voice message: what is supported, images included */
    bgt_tg_text_update(body, sizeof(body), 9404, uid, "en", "x");
    char *v = strstr(body, "\"text\":\"x\"");
    cr_assert_not_null(v);
    snprintf(v, sizeof(body) - (size_t)(v - body),
             "\"voice\":{\"duration\":1,\"mime_type\":\"audio/ogg\",\"file_id\":\"v1\","
             "\"file_unique_id\":\"v1u\",\"file_size\":4321}}}");
    post(body);
    n = bgt_tg_wait_calls(&W, "sendMessage", uid, 5, 30000);
    const char *m = bgt_tg_last_text(calls, n, uid);
    cr_expect(m != NULL && strstr(m, "text files and photos") != NULL, "voice: %s", m);
    bgt_tg_free_calls(calls, n);
}

/* A document update from uid (English): file_id, mime_type, file_name, file_size, a caption. */
static void document_update(char *out, size_t outlen, long long update_id, long long uid,
                            const char *file_id, const char *mime, const char *name, long long size,
                            const char *caption)
{
    snprintf(out, outlen,
             "{\"update_id\":%lld,\"message\":{\"message_id\":%lld,\"from\":{\"id\":%lld,"
             "\"is_bot\":false,\"first_name\":\"Tester\",\"language_code\":\"en\"},\"chat\":{"
             "\"id\":%lld,\"type\":\"private\"},\"date\":1700000000,\"document\":{\"file_name\":"
             "\"%s\",\"mime_type\":\"%s\",\"file_id\":\"%s\",\"file_unique_id\":\"d%lld\","
             "\"file_size\":%lld},\"caption\":\"%s\"}}",
             update_id, update_id, uid, uid, name, mime, file_id, update_id, size, caption);
}

/* Counts the texts sent to chat that contain needle. */
static size_t texts_with(const bgt_tg_call_t *c, size_t n, long long chat, const char *needle)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (strcmp(c[i].method, "sendMessage") == 0 && c[i].chat_id == chat &&
            strstr(c[i].text, needle) != NULL)
            k++;
    return k;
}

Test(telegram_account, text_files_are_read_into_the_conversation)
{
    long long uid = 850101;
    char body[4096], reply[8192];
    /* a text file with a question: the model gets both, and answers */
    document_update(body, sizeof(body), 9500, uid, "text-notes", "text/plain", "notes.txt", 120,
                    "What does it say?");
    post(body);
    size_t n = bgt_tg_wait_reply(&W, 9500, uid, reply, sizeof(reply), 30000);
    bgt_tg_free_calls(calls, n);
    cr_expect(strstr(reply, "What does it say?") != NULL && strstr(reply, "notes.txt") != NULL &&
                  strstr(reply, "Revenue grew by 42 percent in Lisbon.") != NULL,
              "the model did not get the question and the file: %s", reply);
    cr_expect(file_contains(S.calls_path, "\"path\":\"files/text-notes\""), "no download");
    /* the file is part of the conversation: the stored user message (not only the echo of it)
     * holds it, so a later turn's transcript ("<role>: <text>", blanks collapsed) has it there */
    bgt_tg_text_update(body, sizeof(body), 9501, uid, "en", "#echo:messages and the total?");
    post(body);
    n = bgt_tg_wait_reply(&W, 9501, uid, reply, sizeof(reply), 30000);
    bgt_tg_free_calls(calls, n);
    const char *asked = strstr(reply, "user: What does it say?");
    const char *answered = asked != NULL ? strstr(asked, "assistant:") : NULL;
    const char *text = asked != NULL ? strstr(asked, "Выручка выросла.") : NULL;
    cr_expect(text != NULL && answered != NULL && text < answered,
              "the stored message does not hold the file: %s", reply);

    /* refused with a note, before any call: over 64 KB by the update; by getFile; not UTF-8 text;
     * a PDF is not read at all */
    document_update(body, sizeof(body), 9502, uid, "text-huge", "text/plain", "huge.txt", 100000,
                    "");
    post(body);
    document_update(body, sizeof(body), 9503, uid, "text-big", "text/plain", "big.txt", 1000, "");
    post(body);
    document_update(body, sizeof(body), 9504, uid, "textbin-1", "text/plain", "utf16.txt", 6, "");
    post(body);
    document_update(body, sizeof(body), 9505, uid, "text-pdf", "application/pdf", "paper.pdf", 1000,
                    "Summarize");
    post(body);
    /* 2 replies above, then 4 notes */
    n = bgt_tg_wait_calls(&W, "sendMessage", uid, 6, 30000);
    cr_expect_eq(texts_with(calls, n, uid, "I can read text files up to 64 KB"), 2,
                 "the two large files were not both refused");
    cr_expect_eq(texts_with(calls, n, uid, "could not read this file as text"), 1,
                 "the UTF-16 file was not refused as unreadable");
    cr_expect_eq(texts_with(calls, n, uid, "I can read text messages"), 1,
                 "the PDF did not get the note of what the bot reads");
    bgt_tg_free_calls(calls, n);
    cr_expect(!file_contains(S.calls_path, "\"file_id\":\"text-huge\""),
              "a file over 64 KB by its update was asked for");
    cr_expect(!file_contains(S.calls_path, "\"path\":\"files/text-big\""),
              "a file over 64 KB by getFile was downloaded");
    cr_expect(!file_contains(S.calls_path, "\"file_id\":\"text-pdf\""), "the PDF was fetched");
}
