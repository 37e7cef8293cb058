/*
 * Billing with Paddle end to end: the real bg-edge and a bg-worker with the billing role, a private
 * Redis, a migrated database and test/fakes/paddle/fake_paddle.c standing in for the Paddle API.
 *
 * Webhooks: a signed notification is stored once (a redelivery answers 200 "duplicate"), applied by
 * the worker, and the user's /billing/account follows (plan, status, quota of the billing period);
 * an unsigned, wrongly signed or stale one is 401 and leaves nothing in the inbox. Checkout: POST
 * /billing/subscribe calls Paddle with the plan's price id and the user's id in custom_data,
 * retries through 429 and 500, and refuses a plan without a price id. History and cancellation
 * follow.
 */
#include <criterion/criterion.h>
#include <libpq-fe.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bg/common.h"
#include "bg/json.h"
#include "bg/paddle.h"
#include "bg/timeutil.h"
#include "bgtest.h"

#define PASSWORD "Paddle-Horse-Battery-42"
#define SECRET "pdl_ntfset_01hv8x0000000000000000000_AbCdEfGhIjKlMnOpQrStUvWxYz012345"
#define API_KEY "pdl_sdbx_apikey_fake_0123456789"
#define PRICE_MONTHLY "pri_01gsz8x8sawmvhz1pv30nge1ke"

static struct {
    bgt_redis_t redis;
    bgt_pg_t db;
    PGconn *pg;
    char dir[256], base[64], fake[64], calls[300];
    pid_t edge, worker, fake_pid;
} S;

static pid_t spawn_logged(const char *const argv[], const char *const env[], const char *name)
{
    char log[400];
    snprintf(log, sizeof(log), "%s/%s.log", S.dir, name);
    pid_t pid = bgt_spawn(argv, env, log);
    cr_assert(pid > 0, "cannot start %s", name);
    return pid;
}

static void setup(void)
{
    memset(&S, 0, sizeof(S));
    cr_assert_eq(bgt_pg_create(&S.db, true), 0);
    cr_assert_eq(bgt_redis_start(&S.redis), 0);
    cr_assert_eq(bgt_tempdir(S.dir, sizeof(S.dir)), 0);
    S.pg = PQconnectdb(S.db.url);
    cr_assert_eq(PQstatus(S.pg), CONNECTION_OK);
    PGresult *res = PQexec(S.pg, "UPDATE plans SET paddle_price_id = '" PRICE_MONTHLY
                                 "', paddle_price_source = 'admin' WHERE id = 'monthly'");
    cr_assert_eq(PQresultStatus(res), PGRES_COMMAND_OK);
    PQclear(res);

    int fport = bgt_free_port();
    char fports[16];
    snprintf(fports, sizeof(fports), "%d", fport);
    snprintf(S.calls, sizeof(S.calls), "%s/paddle_calls.log", S.dir);
    snprintf(S.fake, sizeof(S.fake), "http://127.0.0.1:%d", fport);
    const char *fargv[] = {bgt_bin("bg-fake-paddle"), fports, S.calls, API_KEY, NULL};
    S.fake_pid = spawn_logged(fargv, NULL, "fake_paddle");
    char health[128];
    snprintf(health, sizeof(health), "%s/__health", S.fake);
    int up = bgt_wait_http(health, 200, 10000);
    cr_assert_eq(up, 0, "fake_paddle does not answer (wait status %d)", bgt_wait(S.fake_pid, 0));

    static char vars[12][600];
    int port = bgt_free_port();
    snprintf(vars[0], 600, "BG_HTTP_PORT=%d", port);
    snprintf(vars[1], 600, "BG_REDIS_URL=%s", S.redis.url);
    snprintf(vars[2], 600, "BG_DATABASE_URL=%s", S.db.url);
    snprintf(vars[3], 600, "BG_PADDLE_API_URL=%s", S.fake);
    snprintf(vars[4], 600, "BG_PADDLE_WEBHOOK_SECRETS=pdl_ntfset_old_one, " SECRET);
    const char *env[] = {vars[0],
                         vars[1],
                         vars[2],
                         vars[3],
                         vars[4],
                         "BG_PADDLE_API_KEY=" API_KEY,
                         "BG_HTTPS_PORT=0",
                         "BG_ENV_FILE=/nonexistent",
                         "BG_EDGE_THREADS=2",
                         "BG_LOG_FORMAT=text",
                         "BG_WORKER_PORT=0",
                         "BG_JWT_SECRET=0123456789abcdef0123456789abcdef-paddle",
                         NULL};
    const char *eargv[] = {bgt_bin("bg-edge"), NULL};
    S.edge = spawn_logged(eargv, env, "edge");
    const char *wargv[] = {bgt_bin("bg-worker"), "--roles", "billing", NULL};
    S.worker = spawn_logged(wargv, env, "worker");
    snprintf(S.base, sizeof(S.base), "http://127.0.0.1:%d", port);
    char url[128];
    snprintf(url, sizeof(url), "%s/healthz", S.base);
    cr_assert_eq(bgt_wait_http(url, 200, 10000), 0, "bg-edge did not come up; see %s", S.dir);
}

static void teardown(void)
{
    pid_t pids[] = {S.worker, S.edge, S.fake_pid};
    for (size_t i = 0; i < sizeof(pids) / sizeof(pids[0]); i++)
        if (pids[i] > 0)
            bgt_stop(pids[i], SIGKILL, 3000);
    PQfinish(S.pg);
    bgt_redis_stop(&S.redis);
    bgt_pg_drop(&S.db);
    if (getenv("BGT_KEEP_LOGS") == NULL)
        bgt_rmtree(S.dir);
    else
        fprintf(stderr, "logs kept in %s\n", S.dir);
}

TestSuite(billing_paddle, .init = setup, .fini = teardown, .timeout = 180);

/* ---- helpers ---- */

static long call(const char *method, const char *path, const char *token, const char *sig,
                 const char *body, bgt_resp_t *r)
{
    char url[512], authz[2100], sigh[300];
    const char *headers[4];
    size_t n = 0;
    snprintf(url, sizeof(url), "%s%s", S.base, path);
    if (token != NULL) {
        snprintf(authz, sizeof(authz), "Authorization: Bearer %s", token);
        headers[n++] = authz;
    }
    if (sig != NULL) {
        snprintf(sigh, sizeof(sigh), "Paddle-Signature: %s", sig);
        headers[n++] = sigh;
    }
    if (body != NULL)
        headers[n++] = "Content-Type: application/json";
    headers[n] = NULL;
    cr_assert_eq(bgt_http(BGT_H2C, method, url, headers, body, body != NULL ? strlen(body) : 0, r),
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
    int64_t num;
    bool ok = true;
    if (s != NULL && len < outlen) {
        memcpy(out, s, len);
        out[len] = '\0';
    } else if (v != NULL && bg_json_int(v, &num)) {
        snprintf(out, outlen, "%lld", (long long)num);
    } else {
        ok = false;
    }
    bg_json_doc_free(doc);
    return ok;
}

/* Registers a user; writes the access token and the user id. */
static void register_user(const char *email, char *token, size_t tlen, char *id, size_t idlen)
{
    char body[256];
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"" PASSWORD "\"}", email);
    bgt_resp_t r;
    long st = call("POST", "/auth/register", NULL, NULL, body, &r);
    cr_assert_eq(st, 201, "register: %ld %s", st, r.body);
    cr_assert(json_get(r.body, (const char *const[]){"access_token", NULL}, token, tlen));
    cr_assert(json_get(r.body, (const char *const[]){"user", "id", NULL}, id, idlen));
    bgt_resp_free(&r);
}

static long count(const char *sql)
{
    PGresult *res = PQexec(S.pg, sql);
    cr_assert_eq(PQresultStatus(res), PGRES_TUPLES_OK, "%s: %s", sql, PQerrorMessage(S.pg));
    long n = strtol(PQgetvalue(res, 0, 0), NULL, 10);
    PQclear(res);
    return n;
}

static void rfc3339(int64_t ms, char *out, size_t outlen)
{
    cr_assert_eq(bg_timeutil_format_rfc3339(out, outlen, ms, true), 0);
}

/* A subscription event for user with a billing period around now, as Paddle sends it. */
static char *sub_event(const char *evt, const char *type, const char *status, const char *user,
                       const char *sub, int64_t occurred_ms)
{
    char occ[40], ps[40], pe[40];
    int64_t now = bg_timeutil_wall_ms();
    rfc3339(occurred_ms, occ, sizeof(occ));
    rfc3339(now - 86400000LL, ps, sizeof(ps));
    rfc3339(now + 29LL * 86400000LL, pe, sizeof(pe));
    return bg_asprintf(
        "{\"event_id\":\"%s\",\"event_type\":\"%s\",\"occurred_at\":\"%s\",\"notification_id\":"
        "\"ntf_%s\",\"data\":{\"id\":\"%s\",\"items\":[{\"price\":{\"id\":\"" PRICE_MONTHLY
        "\",\"product_id\":\"pro_01gsz4t5hdjse780zja8vvr7jg\",\"unit_price\":{\"amount\":\"1999\","
        "\"currency_code\":\"USD\"},\"billing_cycle\":{\"interval\":\"month\",\"frequency\":1}},"
        "\"status\":\"active\",\"quantity\":1,\"recurring\":true,\"trial_dates\":null}],\"status\":"
        "\"%s\",\"paused_at\":null,\"canceled_at\":null,\"customer_id\":\"ctm_"
        "01h7hswb86rtps5ggbq7yb"
        "ydcw\",\"custom_data\":{\"user_id\":\"%s\"},\"currency_code\":\"USD\",\"billing_cycle\":"
        "{\"interval\":\"month\",\"frequency\":1},\"collection_mode\":\"automatic\","
        "\"scheduled_change\":null,\"current_billing_period\":{\"starts_at\":\"%s\",\"ends_at\":"
        "\"%s\"},\"next_billed_at\":\"%s\"}}",
        evt, type, occ, evt, sub, status, user, ps, pe, pe);
}

static char *txn_event(const char *evt, const char *user, const char *sub, const char *txn)
{
    char occ[40], ps[40], pe[40];
    int64_t now = bg_timeutil_wall_ms();
    rfc3339(now, occ, sizeof(occ));
    rfc3339(now - 86400000LL, ps, sizeof(ps));
    rfc3339(now + 29LL * 86400000LL, pe, sizeof(pe));
    return bg_asprintf(
        "{\"event_id\":\"%s\",\"event_type\":\"transaction.completed\",\"occurred_at\":\"%s\","
        "\"notification_id\":\"ntf_%s\",\"data\":{\"id\":\"%s\",\"status\":\"completed\","
        "\"origin\":\"web\",\"subscription_id\":\"%s\",\"customer_id\":\"ctm_01h7hswb86rtps5ggb"
        "q7ybydcw\",\"custom_data\":{\"user_id\":\"%s\"},\"currency_code\":\"USD\",\"items\":"
        "[{\"price\":{\"id\":\"" PRICE_MONTHLY "\"},\"quantity\":1}],\"details\":{\"totals\":"
        "{\"subtotal\":\"1999\",\"tax\":\"0\",\"total\":\"1999\",\"grand_total\":\"1999\","
        "\"currency_code\":\"USD\"}},\"payments\":[{\"amount\":\"1999\",\"status\":\"captured\","
        "\"error_code\":null,\"method_details\":{\"type\":\"card\"}}],\"billed_at\":\"%s\","
        "\"billing_period\":{\"starts_at\":\"%s\",\"ends_at\":\"%s\"}}}",
        evt, occ, evt, txn, sub, user, occ, ps, pe);
}

/* POSTs body to the webhook signed with secret at ts (0: now). */
static long deliver(const char *body, const char *secret, int64_t ts, bgt_resp_t *r)
{
    char tss[24], h1[BG_PADDLE_SIG_HEX_SIZE], sig[200];
    snprintf(tss, sizeof(tss), "%lld", (long long)(ts != 0 ? ts : (int64_t)time(NULL)));
    bg_paddle_sign(secret, tss, body, strlen(body), h1);
    snprintf(sig, sizeof(sig), "ts=%s;h1=%s", tss, h1);
    return call("POST", "/webhooks/paddle", NULL, sig, body, r);
}

/* Waits until /billing/account says plan; returns its body (owned by r). */
static void wait_plan(const char *token, const char *plan, bgt_resp_t *r)
{
    long long until = bgt_now_ms() + 15000;
    char got[64] = "";
    for (;;) {
        long st = call("GET", "/billing/account", token, NULL, NULL, r);
        cr_assert_eq(st, 200, "%s", r->body);
        if (json_get(r->body, (const char *const[]){"plan", NULL}, got, sizeof(got)) &&
            strcmp(got, plan) == 0)
            return;
        cr_assert(bgt_now_ms() < until, "plan is still %s: %s (logs in %s)", got, r->body, S.dir);
        bgt_resp_free(r);
        usleep(100000);
    }
}

/* ---- tests ---- */

Test(billing_paddle, a_signed_checkout_is_stored_once_and_gives_the_plan)
{
    char token[2048], user[64];
    register_user("buyer@paddle.example", token, sizeof(token), user, sizeof(user));
    char *txn = txn_event("evt_e2e_txn_1", user, "sub_e2e_1", "txn_e2e_1");
    char *sub = sub_event("evt_e2e_sub_1", "subscription.created", "active", user, "sub_e2e_1",
                          bg_timeutil_wall_ms());
    bgt_resp_t r;
    cr_assert_eq(deliver(txn, SECRET, 0, &r), 200, "%s", r.body);
    cr_expect(strstr(r.body, "accepted") != NULL, "%s", r.body);
    bgt_resp_free(&r);
    /* signed with the other configured secret: rotation */
    cr_assert_eq(deliver(sub, "pdl_ntfset_old_one", 0, &r), 200, "%s", r.body);
    bgt_resp_free(&r);
    /* Paddle delivers again */
    cr_assert_eq(deliver(sub, SECRET, 0, &r), 200, "%s", r.body);
    bgt_resp_free(&r);

    wait_plan(token, "monthly", &r);
    /* the plan shows after the first event is applied; the payment comes with the other one */
    long long until = bgt_now_ms() + 15000;
    while (count("SELECT count(*) FROM webhook_inbox WHERE processed_at IS NOT NULL") < 2 &&
           bgt_now_ms() < until)
        usleep(100000);
    char v[64];
    cr_assert(json_get(r.body, (const char *const[]){"status", NULL}, v, sizeof(v)));
    cr_expect_str_eq(v, "active");
    cr_assert(json_get(r.body, (const char *const[]){"quota", "limit", NULL}, v, sizeof(v)));
    cr_expect_str_eq(v, "10000", "the monthly plan's quota over the billing period");
    bgt_resp_free(&r);
    cr_expect_eq(count("SELECT count(*) FROM webhook_inbox WHERE provider = 'paddle'"), 2);
    cr_expect_eq(count("SELECT count(*) FROM webhook_inbox WHERE processed_at IS NOT NULL"), 2);
    cr_expect_eq(count("SELECT count(*) FROM subscriptions WHERE paddle_subscription_id = "
                       "'sub_e2e_1' AND status = 'active' AND plan_id = 'monthly'"),
                 1);

    /* a duplicate of a processed event: 200 at once, nothing new */
    cr_assert_eq(deliver(sub, SECRET, 0, &r), 200, "%s", r.body);
    cr_expect(strstr(r.body, "duplicate") != NULL, "%s", r.body);
    bgt_resp_free(&r);

    /* the history shows the payment and the period's request credits */
    long st = call("GET", "/billing/history", token, NULL, NULL, &r);
    cr_assert_eq(st, 200, "%s", r.body);
    /* items are jsonb objects as Postgres prints them: "key": value */
    cr_expect(strstr(r.body, "\"type\": \"payment\"") != NULL &&
                  strstr(r.body, "\"amount\": 1999") != NULL,
              "%s", r.body);
    cr_expect(strstr(r.body, "\"type\": \"credit\"") != NULL &&
                  strstr(r.body, "\"amount\": 10000") != NULL,
              "%s", r.body);
    cr_expect(strstr(r.body, "\"paddle_transaction_id\": \"txn_e2e_1\"") != NULL, "%s", r.body);
    bgt_resp_free(&r);

    /* cancellation at the period end goes to Paddle */
    st = call("POST", "/billing/cancel", token, NULL, NULL, &r);
    cr_assert_eq(st, 200, "%s", r.body);
    cr_expect(strstr(r.body, "sub_e2e_1") != NULL, "%s", r.body);
    bgt_resp_free(&r);
    st = call("POST", "/billing/resume", token, NULL, NULL, &r);
    cr_assert_eq(st, 200, "%s", r.body);
    bgt_resp_free(&r);
    char calls[8192] = "";
    FILE *f = fopen(S.calls, "r");
    cr_assert_not_null(f);
    size_t n = fread(calls, 1, sizeof(calls) - 1, f);
    calls[n] = '\0';
    (void)fclose(f);
    cr_expect(strstr(calls, "POST /subscriptions/sub_e2e_1/cancel 200 1 "
                            "{\"effective_from\":\"next_billing_period\"}") != NULL,
              "%s", calls);
    cr_expect(strstr(calls, "PATCH /subscriptions/sub_e2e_1 200 1 {\"scheduled_change\":null}") !=
                  NULL,
              "%s", calls);
    free(txn);
    free(sub);
}

Test(billing_paddle, unsigned_forged_or_stale_notifications_are_refused_and_not_stored)
{
    char *ev =
        sub_event("evt_e2e_forged", "subscription.created", "active",
                  "00000000-0000-0000-0000-000000000000", "sub_forged", bg_timeutil_wall_ms());
    bgt_resp_t r;
    cr_assert_eq(call("POST", "/webhooks/paddle", NULL, NULL, ev, &r), 401, "%s", r.body);
    cr_expect(strstr(r.body, "invalid_signature") != NULL, "%s", r.body);
    bgt_resp_free(&r);
    cr_assert_eq(deliver(ev, "pdl_ntfset_someone_else", 0, &r), 401, "%s", r.body);
    cr_expect(strstr(r.body, "signature_mismatch") != NULL, "%s", r.body);
    bgt_resp_free(&r);
    cr_assert_eq(deliver(ev, SECRET, (int64_t)time(NULL) - 3600, &r), 401, "%s", r.body);
    cr_expect(strstr(r.body, "signature_expired") != NULL, "%s", r.body);
    bgt_resp_free(&r);
    /* a valid signature over other bytes */
    char tss[24], h1[BG_PADDLE_SIG_HEX_SIZE], sig[200];
    snprintf(tss, sizeof(tss), "%lld", (long long)time(NULL));
    bg_paddle_sign(SECRET, tss, "{}", 2, h1);
    snprintf(sig, sizeof(sig), "ts=%s;h1=%s", tss, h1);
    cr_assert_eq(call("POST", "/webhooks/paddle", NULL, sig, ev, &r), 401, "%s", r.body);
    bgt_resp_free(&r);
    cr_expect_eq(count("SELECT count(*) FROM webhook_inbox"), 0, "nothing stored");
    /* signed but not an event */
    cr_assert_eq(deliver("[1,2,3]", SECRET, 0, &r), 400, "%s", r.body);
    bgt_resp_free(&r);
    cr_expect_eq(count("SELECT count(*) FROM webhook_inbox"), 0, "nothing stored");
    free(ev);
}

Test(billing_paddle, subscribe_creates_a_paddle_checkout_through_429_and_500)
{
    char token[2048], user[64];
    register_user("checkout@paddle.example", token, sizeof(token), user, sizeof(user));
    bgt_resp_t r;
    char url[200];
    snprintf(url, sizeof(url), "%s/__fail", S.fake);
    cr_assert_eq(bgt_http(BGT_H1, "POST", url, NULL, "429,500", 7, &r), 0);
    bgt_resp_free(&r);

    long st = call("POST", "/billing/subscribe", token, NULL, "{\"plan\":\"monthly\"}", &r);
    cr_assert_eq(st, 201, "%s", r.body);
    char txn[64], checkout[256];
    cr_assert(json_get(r.body, (const char *const[]){"transaction_id", NULL}, txn, sizeof(txn)),
              "%s", r.body);
    cr_assert(
        json_get(r.body, (const char *const[]){"checkout_url", NULL}, checkout, sizeof(checkout)));
    cr_expect(strncmp(txn, "txn_fake", 8) == 0, "%s", txn);
    cr_expect(strstr(checkout, txn) != NULL, "%s", checkout);
    bgt_resp_free(&r);

    char calls[8192] = "";
    FILE *f = fopen(S.calls, "r");
    cr_assert_not_null(f);
    size_t n = fread(calls, 1, sizeof(calls) - 1, f);
    calls[n] = '\0';
    (void)fclose(f);
    cr_expect(strstr(calls, "POST /transactions 429 1 ") != NULL, "%s", calls);
    cr_expect(strstr(calls, "POST /transactions 500 1 ") != NULL, "%s", calls);
    char want[256];
    snprintf(want, sizeof(want),
             "POST /transactions 201 1 {\"items\":[{\"price_id\":\"" PRICE_MONTHLY
             "\",\"quantity\":1}],\"custom_data\":{\"user_id\":\"%s\"}",
             user);
    cr_expect(strstr(calls, want) != NULL, "%s\nin\n%s", want, calls);

    /* a plan without a Paddle price cannot be bought: a clear, localized refusal */
    st = call("POST", "/billing/subscribe", token, NULL, "{\"plan\":\"weekly\"}", &r);
    cr_assert_eq(st, 422, "%s", r.body);
    cr_expect(strstr(r.body, "plan_not_purchasable") != NULL && strstr(r.body, "weekly") != NULL,
              "%s", r.body);
    bgt_resp_free(&r);
    st = call("POST", "/billing/subscribe", token, NULL, "{\"plan\":\"no_such_plan\"}", &r);
    cr_assert_eq(st, 422, "%s", r.body);
    cr_expect(strstr(r.body, "validation_failed") != NULL, "%s", r.body);
    bgt_resp_free(&r);
    /* nothing live at Paddle to cancel */
    st = call("POST", "/billing/cancel", token, NULL, NULL, &r);
    cr_assert_eq(st, 409, "%s", r.body);
    bgt_resp_free(&r);
}
