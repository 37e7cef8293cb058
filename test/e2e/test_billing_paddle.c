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
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/socket.h>
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

/* The request credits transaction txn granted the user, and those taken back since (positive). */
static long credits_granted(const char *txn)
{
    char sql[512];
    snprintf(sql, sizeof(sql),
             "SELECT coalesce(sum(e.amount), 0) FROM ledger_entries e JOIN ledger_transactions t "
             "ON t.id = e.transaction_id JOIN ledger_accounts a ON a.id = e.account_id AND "
             "a.owner_type = 'user' WHERE t.idempotency_key = 'paddle:credits:%s'",
             txn);
    return count(sql);
}

static long credits_taken_back(const char *txn)
{
    char sql[512];
    snprintf(sql, sizeof(sql),
             "SELECT coalesce(-sum(e.amount), 0) FROM ledger_entries e JOIN ledger_transactions t "
             "ON t.id = e.transaction_id JOIN ledger_accounts a ON a.id = e.account_id AND "
             "a.owner_type = 'user' AND a.purpose = 'credits' WHERE t.kind = "
             "'grant.refund.paddle' AND t.metadata ->> 'paddle_transaction_id' = '%s'",
             txn);
    return count(sql);
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

/* ---- plan changes, payments, invoices, refunds (issue #7) ---- */

#define PRICE_WEEKLY "pri_01h1weekly0000000000000000"
#define PRICE_YEARLY "pri_01h1yearly0000000000000000"

/* Prices for the weekly and yearly plans too (per day: weekly 4.99/7 > monthly 19.99/30 >
 * yearly 199.99/365). */
static void price_all_plans(void)
{
    PGresult *res =
        PQexec(S.pg, "UPDATE plans SET paddle_price_id = CASE id WHEN 'weekly' THEN '" PRICE_WEEKLY
                     "' ELSE '" PRICE_YEARLY "' END, "
                     "paddle_price_source = 'admin' WHERE id IN ('weekly', 'yearly')");
    cr_assert_eq(PQresultStatus(res), PGRES_COMMAND_OK, "%s", PQerrorMessage(S.pg));
    PQclear(res);
}

/* One billing period for every snapshot of a test: [now − 1 day, now + 29 days). */
static char PS[40], PE[40];

static void fix_period(void)
{
    int64_t now = bg_timeutil_wall_ms();
    rfc3339(now - 86400000LL, PS, sizeof(PS));
    rfc3339(now + 29LL * 86400000LL, PE, sizeof(PE));
}

/* A subscription snapshot of sub at price in the fixed period. */
static char *snap(const char *evt, const char *type, const char *status, const char *user,
                  const char *sub, const char *price, int64_t occurred_ms)
{
    char occ[40];
    rfc3339(occurred_ms, occ, sizeof(occ));
    return bg_asprintf(
        "{\"event_id\":\"%s\",\"event_type\":\"%s\",\"occurred_at\":\"%s\",\"notification_id\":"
        "\"ntf_%s\",\"data\":{\"id\":\"%s\",\"items\":[{\"price\":{\"id\":\"%s\"},\"status\":"
        "\"active\",\"quantity\":1,\"recurring\":true,\"trial_dates\":null}],\"status\":\"%s\","
        "\"paused_at\":null,\"canceled_at\":null,\"customer_id\":\"ctm_%s\",\"custom_data\":"
        "{\"user_id\":\"%s\"},\"currency_code\":\"USD\",\"collection_mode\":\"automatic\","
        "\"scheduled_change\":null,\"current_billing_period\":{\"starts_at\":\"%s\",\"ends_at\":"
        "\"%s\"},\"next_billed_at\":\"%s\"}}",
        evt, type, occ, evt, sub, price, status, sub, user, PS, PE, PE);
}

/* A transaction.completed of txn (invoice number inv, may hold markup) for total cents. */
static char *paid_txn(const char *evt, const char *user, const char *sub, const char *txn,
                      const char *inv, const char *total, const char *tax)
{
    char occ[40];
    rfc3339(bg_timeutil_wall_ms(), occ, sizeof(occ));
    return bg_asprintf(
        "{\"event_id\":\"%s\",\"event_type\":\"transaction.completed\",\"occurred_at\":\"%s\","
        "\"notification_id\":\"ntf_%s\",\"data\":{\"id\":\"%s\",\"status\":\"completed\","
        "\"origin\":\"web\",\"subscription_id\":\"%s\",\"customer_id\":\"ctm_%s\",\"custom_data\":"
        "{\"user_id\":\"%s\"},\"currency_code\":\"USD\",\"invoice_number\":\"%s\",\"items\":[{"
        "\"price\":{\"id\":\"" PRICE_MONTHLY "\"},\"quantity\":1}],\"details\":{\"totals\":{"
        "\"subtotal\":\"1999\",\"tax\":\"%s\",\"total\":\"%s\",\"grand_total\":\"%s\","
        "\"currency_code\":\"USD\"}},\"payments\":[{\"amount\":\"%s\",\"status\":\"captured\","
        "\"method_details\":{\"type\":\"card\",\"card\":{\"type\":\"visa\",\"last4\":\"4242\"}}}],"
        "\"billed_at\":\"%s\",\"billing_period\":{"
        "\"starts_at\":\"%s\",\"ends_at\":\"%s\"}}}",
        evt, occ, evt, txn, sub, sub, user, inv, tax, total, total, total, occ, PS, PE);
}

/* An adjustment (refund or chargeback) of txn for total cents in status. */
static char *adjustment(const char *evt, const char *type, const char *adj, const char *action,
                        const char *status, const char *sub, const char *txn, const char *total)
{
    char occ[40];
    rfc3339(bg_timeutil_wall_ms(), occ, sizeof(occ));
    return bg_asprintf(
        "{\"event_id\":\"%s\",\"event_type\":\"%s\",\"occurred_at\":\"%s\",\"notification_id\":"
        "\"ntf_%s\",\"data\":{\"id\":\"%s\",\"action\":\"%s\",\"type\":\"full\",\"status\":\"%s\","
        "\"reason\":\"requested by customer\",\"currency_code\":\"USD\",\"transaction_id\":\"%s\","
        "\"subscription_id\":\"%s\",\"customer_id\":\"ctm_%s\",\"items\":[],\"totals\":{"
        "\"subtotal\":\"%s\",\"tax\":\"0\",\"total\":\"%s\",\"fee\":\"0\",\"earnings\":\"0\","
        "\"currency_code\":\"USD\"},\"created_at\":\"%s\",\"updated_at\":\"%s\"}}",
        evt, type, occ, evt, adj, action, status, txn, sub, sub, total, total, occ, occ);
}

static void deliver_ok(const char *body)
{
    bgt_resp_t r;
    cr_assert_eq(deliver(body, SECRET, 0, &r), 200, "%s", r.body);
    bgt_resp_free(&r);
}

/* Waits until every stored event is processed. */
static void wait_processed(void)
{
    long long until = bgt_now_ms() + 15000;
    while (count("SELECT count(*) FROM webhook_inbox WHERE processed_at IS NULL") > 0) {
        cr_assert(bgt_now_ms() < until, "events left unprocessed (logs in %s)", S.dir);
        usleep(50000);
    }
}

static char *read_calls(void)
{
    static char calls[32768];
    FILE *f = fopen(S.calls, "r");
    cr_assert_not_null(f);
    size_t n = fread(calls, 1, sizeof(calls) - 1, f);
    calls[n] = '\0';
    (void)fclose(f);
    return calls;
}

static void get_str(const char *body, const char *const path[], char *out, size_t outlen)
{
    cr_assert(json_get(body, path, out, outlen), "%s has no %s", body, path[0]);
}

Test(billing_paddle, upgrade_now_downgrade_at_period_end_then_cancel_and_resume)
{
    price_all_plans();
    fix_period();
    char token[2048], user[64];
    register_user("changer@paddle.example", token, sizeof(token), user, sizeof(user));
    bgt_resp_t r;
    /* no Paddle subscription yet */
    cr_assert_eq(call("POST", "/billing/change", token, NULL, "{\"plan\":\"weekly\"}", &r), 409,
                 "%s", r.body);
    cr_expect(strstr(r.body, "no_paddle_subscription") != NULL, "%s", r.body);
    bgt_resp_free(&r);

    cr_assert_eq(call("POST", "/billing/subscribe", token, NULL, "{\"plan\":\"monthly\"}", &r), 201,
                 "%s", r.body);
    bgt_resp_free(&r);
    int64_t t0 = bg_timeutil_wall_ms() - 60000;
    char *e1 =
        snap("evt_chg_1", "subscription.created", "active", user, "sub_chg", PRICE_MONTHLY, t0);
    deliver_ok(e1);
    wait_plan(token, "monthly", &r);
    bgt_resp_free(&r);

    /* same plan, unknown plan */
    cr_assert_eq(call("POST", "/billing/change", token, NULL, "{\"plan\":\"monthly\"}", &r), 409,
                 "%s", r.body);
    cr_expect(strstr(r.body, "same_plan") != NULL, "%s", r.body);
    bgt_resp_free(&r);
    cr_assert_eq(call("POST", "/billing/change", token, NULL, "{\"plan\":\"platinum\"}", &r), 422,
                 "%s", r.body);
    bgt_resp_free(&r);

    /* upgrade: weekly costs more per day, billed now with proration */
    cr_assert_eq(call("POST", "/billing/change", token, NULL, "{\"plan\":\"weekly\"}", &r), 200,
                 "%s", r.body);
    char v[64];
    get_str(r.body, (const char *const[]){"effective", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, "now");
    get_str(r.body, (const char *const[]){"subscription_id", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, "sub_chg");
    bgt_resp_free(&r);
    cr_expect(strstr(read_calls(),
                     "PATCH /subscriptions/sub_chg 200 1 {\"items\":[{\"price_id\":\"" PRICE_WEEKLY
                     "\",\"quantity\":1}],\"proration_billing_mode\":\"prorated_immediately\"}") !=
                  NULL,
              "%s", read_calls());
    char *e2 = snap("evt_chg_2", "subscription.updated", "active", user, "sub_chg", PRICE_WEEKLY,
                    t0 + 10000);
    deliver_ok(e2);
    wait_plan(token, "weekly", &r);
    cr_expect(strstr(r.body, "\"scheduled_change\":null") != NULL, "%s", r.body);
    bgt_resp_free(&r);

    /* downgrade: yearly costs less per day, from the next period; weekly is kept until then */
    cr_assert_eq(call("POST", "/billing/change", token, NULL, "{\"plan\":\"yearly\"}", &r), 200,
                 "%s", r.body);
    get_str(r.body, (const char *const[]){"effective", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, "period_end");
    get_str(r.body, (const char *const[]){"effective_at", NULL}, v, sizeof(v));
    cr_expect(strncmp(v, PE, 19) == 0, "effective_at %s, period end %s", v, PE);
    bgt_resp_free(&r);
    cr_expect(strstr(read_calls(), "PATCH /subscriptions/sub_chg 200 1 {\"items\":[{\"price_id\":"
                                   "\"" PRICE_YEARLY "\",\"quantity\":1}],\"proration_billing_"
                                   "mode\":\"full_next_billing_period\"}") != NULL,
              "%s", read_calls());
    char *e3 = snap("evt_chg_3", "subscription.updated", "active", user, "sub_chg", PRICE_YEARLY,
                    t0 + 20000);
    deliver_ok(e3);
    wait_processed();
    cr_assert_eq(call("GET", "/billing/account", token, NULL, NULL, &r), 200, "%s", r.body);
    get_str(r.body, (const char *const[]){"plan", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, "weekly", "the plan paid for is kept until the period ends");
    get_str(r.body, (const char *const[]){"scheduled_change", "action", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, "change_plan");
    get_str(r.body, (const char *const[]){"scheduled_change", "plan", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, "yearly");
    get_str(r.body, (const char *const[]){"scheduled_change", "effective_at", NULL}, v, sizeof(v));
    cr_expect(strncmp(v, PE, 19) == 0, "%s vs %s", v, PE);
    get_str(r.body, (const char *const[]){"quota", "limit", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, "1000", "weekly's quota still");
    /* the next bill: at the period end, at the price of the plan that follows */
    get_str(r.body, (const char *const[]){"next_bill", "plan", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, "yearly");
    get_str(r.body, (const char *const[]){"next_bill", "at", NULL}, v, sizeof(v));
    cr_expect(strncmp(v, PE, 19) == 0, "%s vs %s", v, PE);
    get_str(r.body, (const char *const[]){"next_bill", "amount", "amount", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, "19999");
    cr_expect(strstr(r.body, "\"payment_method\":null") != NULL, "nothing paid yet: %s", r.body);
    bgt_resp_free(&r);

    /* a delivery of the older (weekly) snapshot changes nothing */
    deliver_ok(e2);
    wait_processed();

    /* cancel at the period end and take it back */
    cr_assert_eq(call("POST", "/billing/cancel", token, NULL, NULL, &r), 200, "%s", r.body);
    bgt_resp_free(&r);
    cr_assert_eq(call("POST", "/billing/resume", token, NULL, NULL, &r), 200, "%s", r.body);
    bgt_resp_free(&r);
    const char *calls = read_calls();
    cr_expect(strstr(calls, "POST /subscriptions/sub_chg/cancel 200 1 "
                            "{\"effective_from\":\"next_billing_period\"}") != NULL,
              "%s", calls);
    cr_expect(strstr(calls, "PATCH /subscriptions/sub_chg 200 1 {\"scheduled_change\":null}") !=
                  NULL,
              "%s", calls);
    cr_expect_eq(count("SELECT count(*) FROM subscriptions WHERE paddle_subscription_id = "
                       "'sub_chg' AND plan_id = 'weekly' AND scheduled_plan_id = 'yearly'"),
                 1);

    /* the renewal: a new period billed at the yearly price, which it grants; nothing scheduled */
    char ps[40], pe[40];
    memcpy(ps, PS, sizeof(ps));
    memcpy(pe, PE, sizeof(pe));
    memcpy(PS, pe, sizeof(PS));
    rfc3339(bg_timeutil_wall_ms() + 394LL * 86400000LL, PE, sizeof(PE));
    char *e4 = snap("evt_chg_4", "subscription.updated", "active", user, "sub_chg", PRICE_YEARLY,
                    t0 + 30000);
    memcpy(PS, ps, sizeof(PS));
    memcpy(PE, pe, sizeof(PE));
    deliver_ok(e4);
    wait_processed();
    cr_expect_eq(count("SELECT count(*) FROM subscriptions WHERE paddle_subscription_id = "
                       "'sub_chg' AND plan_id = 'yearly' AND scheduled_plan_id IS NULL "
                       "AND scheduled_change_at IS NULL"),
                 1, "the renewal grants the plan scheduled");
    free(e4);
    free(e1);
    free(e2);
    free(e3);
}

Test(billing_paddle, payment_returns_the_checkout_of_what_is_owed)
{
    fix_period();
    char token[2048], user[64], token2[2048], user2[64];
    register_user("payer@paddle.example", token, sizeof(token), user, sizeof(user));
    register_user("other@paddle.example", token2, sizeof(token2), user2, sizeof(user2));
    bgt_resp_t r;
    /* nothing at all */
    cr_assert_eq(call("POST", "/billing/payment", token, NULL, NULL, &r), 409, "%s", r.body);
    bgt_resp_free(&r);
    int64_t t0 = bg_timeutil_wall_ms() - 60000;
    char *e1 =
        snap("evt_pay_1", "subscription.created", "active", user, "sub_pay", PRICE_MONTHLY, t0);
    deliver_ok(e1);
    wait_plan(token, "monthly", &r);
    bgt_resp_free(&r);
    /* active: nothing owed */
    cr_assert_eq(call("POST", "/billing/payment", token, NULL, "{}", &r), 409, "%s", r.body);
    cr_expect(strstr(r.body, "nothing_owed") != NULL, "%s", r.body);
    bgt_resp_free(&r);
    char *e2 = snap("evt_pay_2", "subscription.past_due", "past_due", user, "sub_pay",
                    PRICE_MONTHLY, t0 + 1000);
    deliver_ok(e2);
    wait_processed();
    char v[256];
    /* the account says a payment is owed, while the plan (and its quota) is kept */
    cr_assert_eq(call("GET", "/billing/account", token, NULL, NULL, &r), 200, "%s", r.body);
    get_str(r.body, (const char *const[]){"status", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, "past_due");
    get_str(r.body, (const char *const[]){"plan", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, "monthly");
    bgt_resp_free(&r);
    cr_assert_eq(call("POST", "/billing/payment", token, NULL, "{}", &r), 200, "%s", r.body);
    get_str(r.body, (const char *const[]){"transaction_id", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, "txn_due_sub_pay");
    get_str(r.body, (const char *const[]){"checkout_url", NULL}, v, sizeof(v));
    cr_expect(strstr(v, "txn_due_sub_pay") != NULL, "%s", v);
    bgt_resp_free(&r);
    cr_expect(strstr(read_calls(),
                     "GET /subscriptions/sub_pay/update-payment-method-transaction 200 1") != NULL,
              "%s", read_calls());

    /* a transaction by id: the caller's open checkout; someone else's or an unknown one is 404 */
    cr_assert_eq(call("POST", "/billing/subscribe", token2, NULL, "{\"plan\":\"monthly\"}", &r),
                 201, "%s", r.body);
    char theirs[64];
    get_str(r.body, (const char *const[]){"transaction_id", NULL}, theirs, sizeof(theirs));
    bgt_resp_free(&r);
    char body[160];
    snprintf(body, sizeof(body), "{\"transaction_id\":\"%s\"}", theirs);
    cr_assert_eq(call("POST", "/billing/payment", token, NULL, body, &r), 404, "%s", r.body);
    cr_expect(strstr(r.body, "not_found") != NULL, "%s", r.body);
    bgt_resp_free(&r);
    cr_assert_eq(call("POST", "/billing/payment", token2, NULL, body, &r), 200, "%s", r.body);
    get_str(r.body, (const char *const[]){"transaction_id", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, theirs);
    bgt_resp_free(&r);
    cr_assert_eq(call("POST", "/billing/payment", token, NULL,
                      "{\"transaction_id\":\"txn_nobody_knows\"}", &r),
                 404, "%s", r.body);
    bgt_resp_free(&r);
    /* the caller's own, but paid already */
    char url[200], seed[200];
    snprintf(url, sizeof(url), "%s/__txn", S.fake);
    snprintf(seed, sizeof(seed), "txn_paid_1 completed %s", user);
    cr_assert_eq(bgt_http(BGT_H1, "POST", url, NULL, seed, strlen(seed), &r), 0);
    bgt_resp_free(&r);
    cr_assert_eq(
        call("POST", "/billing/payment", token, NULL, "{\"transaction_id\":\"txn_paid_1\"}", &r),
        409, "%s", r.body);
    cr_expect(strstr(r.body, "nothing_owed") != NULL, "%s", r.body);
    bgt_resp_free(&r);
    free(e1);
    free(e2);
}

Test(billing_paddle, invoices_list_json_and_printable_html_then_a_refund)
{
    fix_period();
    char token[2048], user[64], token2[2048], user2[64];
    bgt_resp_t r;
    long st = call(
        "POST", "/auth/register", NULL, NULL,
        "{\"email\":\"inv@paddle.example\",\"password\":\"" PASSWORD "\",\"locale\":\"ru\"}", &r);
    cr_assert_eq(st, 201, "%s", r.body);
    cr_assert(json_get(r.body, (const char *const[]){"access_token", NULL}, token, sizeof(token)));
    cr_assert(json_get(r.body, (const char *const[]){"user", "id", NULL}, user, sizeof(user)));
    bgt_resp_free(&r);
    register_user("nosy@paddle.example", token2, sizeof(token2), user2, sizeof(user2));

    char *t1 =
        paid_txn("evt_inv_1", user, "sub_inv", "txn_inv_1", "<b>325&10566</b>", "123456", "0");
    char *t2 = paid_txn("evt_inv_2", user, "sub_inv", "txn_inv_2", "325-10567", "2199", "200");
    deliver_ok(t1);
    deliver_ok(t2);
    deliver_ok(t1);
    wait_processed();
    cr_assert_eq(call("GET", "/billing/invoices?limit=1", token, NULL, NULL, &r), 200, "%s",
                 r.body);
    char id[64], v[256], cursor[64];
    get_str(r.body, (const char *const[]){"next_cursor", NULL}, cursor, sizeof(cursor));
    cr_expect(strstr(r.body, "\"total_minor\": ") != NULL, "%s", r.body);
    bgt_resp_free(&r);
    char path[200];
    snprintf(path, sizeof(path), "/billing/invoices?limit=1&cursor=%s", cursor);
    cr_assert_eq(call("GET", path, token, NULL, NULL, &r), 200, "%s", r.body);
    cr_expect(strstr(r.body, "\"next_cursor\":null") != NULL, "%s", r.body);
    bgt_resp_free(&r);
    cr_assert_eq(call("GET", "/billing/invoices", token, NULL, NULL, &r), 200, "%s", r.body);
    cr_expect_eq(count("SELECT count(*) FROM invoices"), 2, "one invoice per transaction");
    bgt_resp_free(&r);
    /* the account names the card the payments came from */
    cr_assert_eq(call("GET", "/billing/account", token, NULL, NULL, &r), 200, "%s", r.body);
    get_str(r.body, (const char *const[]){"payment_method", "type", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, "card");
    get_str(r.body, (const char *const[]){"payment_method", "brand", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, "visa");
    get_str(r.body, (const char *const[]){"payment_method", "last4", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, "4242");
    bgt_resp_free(&r);

    PGresult *res = PQexec(S.pg, "SELECT id FROM invoices WHERE paddle_transaction_id = "
                                 "'txn_inv_1'");
    cr_assert_eq(PQntuples(res), 1);
    snprintf(id, sizeof(id), "%s", PQgetvalue(res, 0, 0));
    PQclear(res);
    snprintf(path, sizeof(path), "/billing/invoices/%s", id);
    cr_assert_eq(call("GET", path, token, NULL, NULL, &r), 200, "%s", r.body);
    get_str(r.body, (const char *const[]){"status", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, "paid");
    get_str(r.body, (const char *const[]){"number", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, "<b>325&10566</b>");
    get_str(r.body, (const char *const[]){"total_minor", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, "123456");
    get_str(r.body, (const char *const[]){"currency", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, "USD");
    get_str(r.body, (const char *const[]){"plan", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, "monthly");
    get_str(r.body, (const char *const[]){"html_url", NULL}, v, sizeof(v));
    char want[200];
    snprintf(want, sizeof(want), "/billing/invoices/%s/html", id);
    cr_expect_str_eq(v, want);
    bgt_resp_free(&r);
    /* someone else's invoice, or no invoice at all: 404 */
    cr_assert_eq(call("GET", path, token2, NULL, NULL, &r), 404, "%s", r.body);
    bgt_resp_free(&r);
    cr_assert_eq(call("GET", want, token2, NULL, NULL, &r), 404, "%s", r.body);
    bgt_resp_free(&r);
    cr_assert_eq(call("GET", "/billing/invoices/not-a-uuid", token, NULL, NULL, &r), 404, "%s",
                 r.body);
    bgt_resp_free(&r);

    /* the printable page, in the user's language, every value escaped, with its own CSP */
    cr_assert_eq(call("GET", want, token, NULL, NULL, &r), 200, "%s", r.body);
    char h[512];
    cr_expect_str_eq(bgt_resp_header(&r, "content-type", h, sizeof(h)), "text/html; charset=utf-8");
    const char *csp = bgt_resp_header(&r, "content-security-policy", h, sizeof(h));
    cr_assert_not_null(csp);
    cr_expect(strncmp(csp, "default-src 'none'; style-src 'nonce-", 37) == 0, "%s", csp);
    cr_expect(strstr(r.body, "<style nonce=\"") != NULL && strstr(r.body, "@media print") != NULL,
              "%s", r.body);
    cr_expect(strstr(r.body, "<script") == NULL, "%s", r.body);
    cr_expect(strstr(r.body, "&lt;b&gt;325&amp;10566&lt;/b&gt;") != NULL &&
                  strstr(r.body, "<b>325") == NULL,
              "%s", r.body);
    cr_expect(strstr(r.body, "Счёт") != NULL && strstr(r.body, "Оплачен") != NULL, "%s", r.body);
    cr_expect(strstr(r.body, "1\xc2\xa0"
                             "234,56 USD") != NULL,
              "amounts in Russian form: %s", r.body);
    bgt_resp_free(&r);

    /* a full refund: approved adjustment → the invoice is refunded, history shows it, once */
    char *a1 = adjustment("evt_adj_1", "adjustment.created", "adj_inv_1", "refund",
                          "pending_approval", "sub_inv", "txn_inv_1", "123456");
    char *a2 = adjustment("evt_adj_2", "adjustment.updated", "adj_inv_1", "refund", "approved",
                          "sub_inv", "txn_inv_1", "123456");
    deliver_ok(a2);
    deliver_ok(a1);
    deliver_ok(a2);
    wait_processed();
    snprintf(path, sizeof(path), "/billing/invoices/%s", id);
    cr_assert_eq(call("GET", path, token, NULL, NULL, &r), 200, "%s", r.body);
    get_str(r.body, (const char *const[]){"status", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, "refunded");
    bgt_resp_free(&r);
    cr_assert_eq(call("GET", "/billing/history", token, NULL, NULL, &r), 200, "%s", r.body);
    cr_expect(strstr(r.body, "\"type\": \"refund\"") != NULL &&
                  strstr(r.body, "\"amount\": -123456") != NULL &&
                  strstr(r.body, "\"kind\": \"grant.refund.paddle\"") != NULL,
              "%s", r.body);
    bgt_resp_free(&r);
    cr_expect_eq(count("SELECT count(*) FROM ledger_transactions WHERE kind = 'refund.paddle'"), 1);
    cr_expect_eq(count("SELECT count(*) FROM payments WHERE kind = 'refund' AND status = "
                       "'succeeded'"),
                 1);
    /* the requests the refunded payment granted are taken back, all of them, once */
    long granted = credits_granted("txn_inv_1");
    cr_expect_gt(granted, 0, "the paid period granted requests");
    cr_expect_eq(credits_taken_back("txn_inv_1"), granted);
    cr_expect_eq(credits_taken_back("txn_inv_2"), 0, "the other payment keeps its requests");
    cr_expect_eq(
        count("SELECT count(*) FROM ledger_transactions WHERE kind = 'grant.refund.paddle'"), 1);
    cr_expect_eq(count("SELECT count(*) FROM (SELECT transaction_id FROM ledger_entries GROUP BY "
                       "transaction_id, unit HAVING sum(amount) <> 0) u"),
                 0, "every ledger transaction balances");
    free(t1);
    free(t2);
    free(a1);
    free(a2);
}

/* ---- bgctl billing reconcile ---- */

static char *sub_entity(const char *user, const char *sub, const char *updated)
{
    return bg_asprintf(
        "{\"id\":\"%s\",\"status\":\"active\",\"items\":[{\"price\":{\"id\":\"" PRICE_MONTHLY
        "\"},\"status\":\"active\",\"quantity\":1,\"recurring\":true,\"trial_dates\":null}],"
        "\"customer_id\":\"ctm_%s\",\"custom_data\":{\"user_id\":\"%s\"},\"currency_code\":\"USD\","
        "\"collection_mode\":\"automatic\",\"scheduled_change\":null,\"paused_at\":null,"
        "\"canceled_at\":null,\"current_billing_period\":{\"starts_at\":\"%s\",\"ends_at\":\"%s\"},"
        "\"next_billed_at\":\"%s\",\"updated_at\":\"%s\"}",
        sub, sub, user, PS, PE, PE, updated);
}

static char *txn_entity(const char *user, const char *sub, const char *txn, const char *updated)
{
    return bg_asprintf(
        "{\"id\":\"%s\",\"status\":\"completed\",\"origin\":\"web\",\"subscription_id\":\"%s\","
        "\"customer_id\":\"ctm_%s\",\"custom_data\":{\"user_id\":\"%s\"},\"currency_code\":\"USD\","
        "\"invoice_number\":\"inv-%s\",\"items\":[{\"price\":{\"id\":\"" PRICE_MONTHLY
        "\"},\"quantity\":1}],\"details\":{\"totals\":{\"subtotal\":\"1999\",\"tax\":\"0\","
        "\"total\":\"1999\",\"grand_total\":\"1999\",\"currency_code\":\"USD\"}},\"payments\":[{"
        "\"amount\":\"1999\",\"status\":\"captured\",\"method_details\":{\"type\":\"card\"}}],"
        "\"billed_at\":\"%s\",\"billing_period\":{\"starts_at\":\"%s\",\"ends_at\":\"%s\"},"
        "\"updated_at\":\"%s\"}",
        txn, sub, sub, user, txn, updated, PS, PE, updated);
}

/* The webhook Paddle would have sent for entity: occurred a second after its updated_at. */
static char *wrap(const char *evt, const char *type, int64_t updated_ms, const char *entity)
{
    char occ[40];
    rfc3339(updated_ms + 1000, occ, sizeof(occ));
    return bg_asprintf("{\"event_id\":\"%s\",\"event_type\":\"%s\",\"occurred_at\":\"%s\","
                       "\"notification_id\":\"ntf_%s\",\"data\":%s}",
                       evt, type, occ, evt, entity);
}

static void fake_put(const char *path, const char *body)
{
    char url[200];
    snprintf(url, sizeof(url), "%s%s", S.fake, path);
    bgt_resp_t r;
    cr_assert_eq(bgt_http(BGT_H1, "POST", url, NULL, body, strlen(body), &r), 0);
    cr_assert_eq(r.status, 200);
    bgt_resp_free(&r);
}

/* Runs bgctl billing reconcile [--since since]; returns its exit status, its output in out. */
static int reconcile_run_since(const char *since, char *out, size_t outlen)
{
    static char vars[4][600];
    snprintf(vars[0], 600, "BG_REDIS_URL=%s", S.redis.url);
    snprintf(vars[1], 600, "BG_DATABASE_URL=%s", S.db.url);
    snprintf(vars[2], 600, "BG_PADDLE_API_URL=%s", S.fake);
    const char *env[] = {vars[0],
                         vars[1],
                         vars[2],
                         "BG_PADDLE_API_KEY=" API_KEY,
                         "BG_ENV_FILE=/nonexistent",
                         "BG_LOG_FORMAT=text",
                         NULL};
    const char *argv[] = {
        bgt_bin("bgctl"), "billing", "reconcile", since != NULL ? "--since" : NULL, since, NULL};
    return bgt_run(argv, env, out, outlen);
}

static int reconcile_run(char *out, size_t outlen)
{
    return reconcile_run_since(NULL, out, outlen);
}

/* The user's subscription, ledger and invoices, without ids. */
static char *state_of(const char *user)
{
    const char *p[] = {user};
    PGresult *res = PQexecParams(
        S.pg,
        "SELECT (SELECT string_agg(concat_ws(' ', plan_id, status, current_period_start, "
        "current_period_end, cancel_at_period_end, scheduled_plan_id), ';') FROM subscriptions "
        "WHERE user_id = $1::uuid AND paddle_subscription_id IS NOT NULL) || ' | ' || "
        "(SELECT string_agg(concat_ws(' ', t.kind, e.unit, e.amount), ';' ORDER BY t.kind, e.unit, "
        "e.amount) FROM ledger_transactions t JOIN ledger_entries e ON e.transaction_id = t.id "
        "WHERE t.user_id = $1::uuid AND t.kind LIKE '%.paddle') || ' | ' || "
        "(SELECT string_agg(concat_ws(' ', v.status, v.total_minor, v.period_start, "
        "v.plan_id), ';') FROM invoices v JOIN billing_accounts b ON b.id = v.billing_account_id "
        "WHERE b.user_id = $1::uuid)",
        1, NULL, p, NULL, NULL, 0);
    cr_assert_eq(PQresultStatus(res), PGRES_TUPLES_OK, "%s", PQerrorMessage(S.pg));
    char *s = strdup(PQgetisnull(res, 0, 0) ? "(none)" : PQgetvalue(res, 0, 0));
    PQclear(res);
    return s;
}

Test(billing_paddle, reconcile_repairs_missed_webhooks_like_the_webhook_path_and_only_once)
{
    fix_period();
    char ta[2048], ua[64], tb[2048], ub[64];
    register_user("webhooked@paddle.example", ta, sizeof(ta), ua, sizeof(ua));
    register_user("missed@paddle.example", tb, sizeof(tb), ub, sizeof(ub));
    int64_t upd_ms = bg_timeutil_wall_ms() - 120000;
    char upd[40];
    rfc3339(upd_ms, upd, sizeof(upd));

    /* A: Paddle's webhooks arrived */
    char *sa = sub_entity(ua, "sub_rec_a", upd),
         *xa = txn_entity(ua, "sub_rec_a", "txn_rec_a", upd);
    char *wa = wrap("evt_rec_a1", "subscription.created", upd_ms, sa);
    char *wx = wrap("evt_rec_a2", "transaction.completed", upd_ms, xa);
    deliver_ok(wa);
    deliver_ok(wx);
    wait_processed();
    /* B: the same purchase, whose webhooks never came; Paddle's API has both users' */
    char *sb = sub_entity(ub, "sub_rec_b", upd),
         *xb = txn_entity(ub, "sub_rec_b", "txn_rec_b", upd);
    fake_put("/__sub", sa);
    fake_put("/__sub", sb);
    fake_put("/__txn_entity", xa);
    fake_put("/__txn_entity", xb);
    char *before_b = state_of(ub);
    cr_expect_str_eq(before_b, "(none)");

    char out[8192];
    int st = reconcile_run(out, sizeof(out));
    cr_assert_eq(st, 0, "bgctl billing reconcile: %d\n%s", st, out);
    cr_expect(strstr(out, "repaired subscription.updated sub_rec_b:") != NULL, "%s", out);
    cr_expect(strstr(out, "repaired transaction.completed txn_rec_b:") != NULL, "%s", out);
    cr_expect(strstr(out, "repaired subscription.updated sub_rec_a") == NULL &&
                  strstr(out, "repaired transaction.completed txn_rec_a") == NULL,
              "what the webhooks brought is not repaired again: %s", out);
    cr_expect(strstr(out, "4 new snapshots, 2 repaired, 2 already known, 0 failed") != NULL, "%s",
              out);
    /* Paddle's lists were walked page by page (one entity a page in the fake) */
    const char *calls = read_calls();
    cr_expect(strstr(calls, "GET /subscriptions?after=sub_rec_a&per_page=1 200") != NULL, "%s",
              calls);
    cr_expect(strstr(calls, "GET /transactions?after=txn_rec_a&per_page=1 200") != NULL, "%s",
              calls);

    /* B now equals A, as the webhooks would have made it, and /billing/account follows */
    char *state_a = state_of(ua), *state_b = state_of(ub);
    cr_expect_str_eq(state_b, state_a);
    cr_expect(strstr(state_b, "monthly active") != NULL && strstr(state_b, "payment.paddle USD") &&
                  strstr(state_b, "paid 1999"),
              "%s", state_b);
    bgt_resp_t r;
    wait_plan(tb, "monthly", &r);
    bgt_resp_free(&r);

    /* a second run changes nothing */
    long ledger = count("SELECT count(*) FROM ledger_entries");
    st = reconcile_run(out, sizeof(out));
    cr_assert_eq(st, 0, "%s", out);
    cr_expect(strstr(out, "0 new snapshots, 0 repaired") != NULL &&
                  strstr(out, "repaired ") == NULL,
              "%s", out);
    cr_expect_eq(count("SELECT count(*) FROM ledger_entries"), ledger);

    /* Paddle's late webhooks for B: a newer snapshot of the same state, a payment posted once */
    char *wb = wrap("evt_rec_b1", "subscription.created", upd_ms, sb);
    char *wbx = wrap("evt_rec_b2", "transaction.completed", upd_ms, xb);
    deliver_ok(wb);
    deliver_ok(wbx);
    wait_processed();
    cr_expect_eq(count("SELECT count(*) FROM ledger_entries"), ledger);
    char *after_b = state_of(ub);
    cr_expect_str_eq(after_b, state_a);
    free(sa);
    free(xa);
    free(wa);
    free(wx);
    free(sb);
    free(xb);
    free(wb);
    free(wbx);
    free(before_b);
    free(state_a);
    free(state_b);
    free(after_b);
}

/* An adjustment entity as GET /adjustments lists it: action on txn for total cents in status. */
static char *adj_entity(const char *adj, const char *action, const char *status, const char *sub,
                        const char *txn, const char *total, const char *created,
                        const char *updated)
{
    return bg_asprintf(
        "{\"id\":\"%s\",\"action\":\"%s\",\"type\":\"partial\",\"transaction_id\":\"%s\","
        "\"subscription_id\":\"%s\",\"customer_id\":\"ctm_%s\",\"reason\":\"requested by "
        "customer\",\"credit_applied_to_balance\":null,\"currency_code\":\"USD\",\"status\":\"%s\","
        "\"items\":[{\"id\":\"adjitm_%s\",\"item_id\":\"txnitm_%s\",\"type\":\"partial\","
        "\"amount\":\"%s\",\"proration\":null,\"totals\":{\"subtotal\":\"%s\",\"tax\":\"0\","
        "\"total\":\"%s\"}}],\"totals\":{\"subtotal\":\"%s\",\"tax\":\"0\",\"total\":\"%s\","
        "\"fee\":\"0\",\"earnings\":\"%s\",\"currency_code\":\"USD\"},\"payout_totals\":{"
        "\"subtotal\":\"%s\",\"tax\":\"0\",\"total\":\"%s\",\"fee\":\"0\",\"earnings\":\"%s\","
        "\"currency_code\":\"USD\"},\"tax_rates_used\":[],\"created_at\":\"%s\","
        "\"updated_at\":\"%s\"}",
        adj, action, txn, sub, sub, status, adj, txn, total, total, total, total, total, total,
        total, total, total, created, updated);
}

/* The status of the invoice of txn as GET /billing/invoices/{id} answers it. */
static void invoice_status(const char *token, const char *txn, char *out, size_t outlen)
{
    const char *p[] = {txn};
    PGresult *res = PQexecParams(S.pg, "SELECT id FROM invoices WHERE paddle_transaction_id = $1",
                                 1, NULL, p, NULL, NULL, 0);
    cr_assert_eq(PQntuples(res), 1, "no invoice of %s", txn);
    char path[128];
    snprintf(path, sizeof(path), "/billing/invoices/%s", PQgetvalue(res, 0, 0));
    PQclear(res);
    bgt_resp_t r;
    cr_assert_eq(call("GET", path, token, NULL, NULL, &r), 200, "%s", r.body);
    get_str(r.body, (const char *const[]){"status", NULL}, out, outlen);
    bgt_resp_free(&r);
}

Test(billing_paddle, reconcile_lists_adjustments_posts_a_missed_refund_once_and_records_pending)
{
    fix_period();
    char token[2048], user[64];
    register_user("refunded@paddle.example", token, sizeof(token), user, sizeof(user));
    int64_t now = bg_timeutil_wall_ms();
    char t0[40], t1[40], t2[40];
    rfc3339(now - 600000, t0, sizeof(t0));
    rfc3339(now - 300000, t1, sizeof(t1));
    rfc3339(now - 60000, t2, sizeof(t2));
    /* the purchase's webhooks arrived: an active subscription and a paid invoice of 19.99 */
    char *ws = snap("evt_radj_1", "subscription.created", "active", user, "sub_radj", PRICE_MONTHLY,
                    now - 900000);
    char *wt = paid_txn("evt_radj_2", user, "sub_radj", "txn_radj", "inv-radj", "1999", "0");
    deliver_ok(ws);
    deliver_ok(wt);
    wait_processed();
    char v[64];
    invoice_status(token, "txn_radj", v, sizeof(v));
    cr_assert_str_eq(v, "paid");
    long ledger0 = count("SELECT count(*) FROM ledger_entries");

    /* the adjustments' webhooks never came: an approved partial refund, a pending one, a credit */
    char *aa =
        adj_entity("adj_radj_a", "refund", "approved", "sub_radj", "txn_radj", "1499", t0, t1);
    char *ab = adj_entity("adj_radj_b", "refund", "pending_approval", "sub_radj", "txn_radj", "500",
                          t1, t1);
    char *ac =
        adj_entity("adj_radj_c", "credit", "approved", "sub_radj", "txn_radj", "100", t0, t0);
    fake_put("/__adj", aa);
    fake_put("/__adj", ab);
    fake_put("/__adj", ac);

    /* --since after all of them: the list is read (no time filter at Paddle), nothing is stored */
    char later[40];
    rfc3339(now + 3600000, later, sizeof(later));
    char out[8192];
    int st = reconcile_run_since(later, out, sizeof(out));
    cr_assert_eq(st, 0, "%s", out);
    cr_expect(strstr(out, "reconcile: 0 new snapshots, 0 repaired, 0 already known, 0 failed; "
                          "listed 0 subscriptions, 0 transactions, 3 adjustments") != NULL,
              "%s", out);
    cr_expect_eq(count("SELECT count(*) FROM ledger_entries"), ledger0);

    /* Paddle answers the first page 429 (Retry-After) then 503: the reconciler waits and retries */
    fake_put("/__fail", "/adjustments 429,503");
    st = reconcile_run(out, sizeof(out));
    cr_assert_eq(st, 0, "bgctl billing reconcile: %d\n%s", st, out);
    cr_expect(strstr(out, "repaired adjustment.updated adj_radj_a:") != NULL, "%s", out);
    cr_expect(strstr(out, "repaired adjustment.updated adj_radj_b") == NULL &&
                  strstr(out, "repaired adjustment.updated adj_radj_c") == NULL,
              "a pending refund and a credit post nothing: %s", out);
    cr_expect(strstr(out, "reconcile: 3 new snapshots, 1 repaired, 2 already known, 0 failed; "
                          "listed 0 subscriptions, 0 transactions, 3 adjustments") != NULL,
              "%s", out);
    const char *calls = read_calls();
    cr_expect(strstr(calls, "GET /adjustments?order_by=id%5BASC%5D&per_page=50 429") != NULL &&
                  strstr(calls, "GET /adjustments?order_by=id%5BASC%5D&per_page=50 503") != NULL &&
                  strstr(calls, "GET /adjustments?order_by=id%5BASC%5D&per_page=50 200") != NULL,
              "%s", calls);
    cr_expect(strstr(calls, "GET /adjustments?after=adj_radj_a&per_page=1 200") != NULL &&
                  strstr(calls, "GET /adjustments?after=adj_radj_b&per_page=1 200") != NULL,
              "every page was read: %s", calls);

    /* the approved refund: one reversing ledger transaction; the pending one only recorded */
    cr_expect_eq(count("SELECT count(*) FROM ledger_transactions WHERE kind = 'refund.paddle'"), 1);
    cr_expect_eq(count("SELECT count(*) FROM ledger_entries e JOIN ledger_transactions t ON "
                       "t.id = e.transaction_id WHERE t.kind = 'refund.paddle' AND e.amount = "
                       "-1499 AND e.unit = 'USD'"),
                 1);
    cr_expect_eq(count("SELECT count(*) FROM payments WHERE provider_payment_id = 'adj_radj_a' "
                       "AND kind = 'refund' AND status = 'succeeded' AND amount_minor = 1499"),
                 1);
    cr_expect_eq(count("SELECT count(*) FROM payments WHERE provider_payment_id = 'adj_radj_b' "
                       "AND kind = 'refund' AND status = 'pending' AND amount_minor = 500"),
                 1);
    cr_expect_eq(count("SELECT count(*) FROM payments WHERE provider_payment_id = 'adj_radj_c'"),
                 0);
    cr_expect_eq(count("SELECT count(*) FROM (SELECT transaction_id FROM ledger_entries GROUP BY "
                       "transaction_id, unit HAVING sum(amount) <> 0) u"),
                 0, "every ledger transaction balances");
    /* 14.99 of 19.99 refunded: as many of the period's requests are taken back (rounded down) */
    long granted = credits_granted("txn_radj");
    cr_expect_gt(granted, 0, "the paid period granted requests");
    cr_expect_eq(credits_taken_back("txn_radj"), granted * 1499 / 1999);
    /* 14.99 of 19.99 refunded: the invoice stays paid; the history shows the refund */
    invoice_status(token, "txn_radj", v, sizeof(v));
    cr_expect_str_eq(v, "paid");
    bgt_resp_t r;
    cr_assert_eq(call("GET", "/billing/history", token, NULL, NULL, &r), 200, "%s", r.body);
    cr_expect(strstr(r.body, "\"type\": \"refund\"") != NULL &&
                  strstr(r.body, "\"amount\": -1499") != NULL,
              "%s", r.body);
    bgt_resp_free(&r);

    /* a second run posts nothing */
    long ledger1 = count("SELECT count(*) FROM ledger_entries");
    st = reconcile_run(out, sizeof(out));
    cr_assert_eq(st, 0, "%s", out);
    cr_expect(strstr(out, "0 new snapshots, 0 repaired") != NULL &&
                  strstr(out, "repaired ") == NULL,
              "%s", out);
    cr_expect_eq(count("SELECT count(*) FROM ledger_entries"), ledger1);

    /* Paddle approves the pending refund (its webhook missed too): the next run posts it, once */
    char *ab2 =
        adj_entity("adj_radj_b", "refund", "approved", "sub_radj", "txn_radj", "500", t1, t2);
    fake_put("/__adj", ab2);
    st = reconcile_run(out, sizeof(out));
    cr_assert_eq(st, 0, "%s", out);
    char want[256];
    snprintf(want, sizeof(want), "repaired adjustment.updated adj_radj_b:%s (user %s)", t2, user);
    cr_expect(strstr(out, want) != NULL, "%s", out);
    cr_expect(strstr(out, "reconcile: 1 new snapshots, 1 repaired, 0 already known, 0 failed") !=
                  NULL,
              "%s", out);
    cr_expect_eq(count("SELECT count(*) FROM ledger_transactions WHERE kind = 'refund.paddle'"), 2);
    cr_expect_eq(count("SELECT count(*) FROM payments WHERE provider_payment_id = 'adj_radj_b' "
                       "AND status = 'succeeded'"),
                 1);
    invoice_status(token, "txn_radj", v, sizeof(v));
    cr_expect_str_eq(v, "refunded", "14.99 + 5.00 refunded of 19.99");
    /* and with the rest refunded, the rest of the requests: all of them in total, no more */
    cr_expect_eq(credits_taken_back("txn_radj"), granted);

    /* Paddle's late webhooks for both refunds change nothing */
    long ledger2 = count("SELECT count(*) FROM ledger_entries");
    char *la = adjustment("evt_radj_3", "adjustment.updated", "adj_radj_a", "refund", "approved",
                          "sub_radj", "txn_radj", "1499");
    char *lb = adjustment("evt_radj_4", "adjustment.updated", "adj_radj_b", "refund", "approved",
                          "sub_radj", "txn_radj", "500");
    deliver_ok(la);
    deliver_ok(lb);
    wait_processed();
    cr_expect_eq(count("SELECT count(*) FROM ledger_entries"), ledger2);
    cr_expect_eq(count("SELECT count(*) FROM ledger_transactions WHERE kind = 'refund.paddle'"), 2);
    cr_expect_eq(credits_taken_back("txn_radj"), granted);
    cr_expect_eq(count("SELECT count(*) FROM (SELECT transaction_id FROM ledger_entries GROUP BY "
                       "transaction_id, unit HAVING sum(amount) <> 0) u"),
                 0, "every ledger transaction balances");
    free(ws);
    free(wt);
    free(aa);
    free(ab);
    free(ac);
    free(ab2);
    free(la);
    free(lb);
}

/* ---- Postgres going away, a billing worker killed ---- */

/*
 * A TCP proxy between the edge and Postgres that the test can cut (every connection closed and
 * no new one accepted) and restore on the same port: Postgres "down" for that edge only, since
 * the test stack's Postgres is shared.
 */
typedef struct st_pgproxy {
    int port;
    char host[64];
    int upstream_port;
    int lfd;
    atomic_bool cut;
    pthread_t thread;
    pthread_mutex_t lock;
    int fds[64]; /* open client and upstream sockets, -1 when free */
} pgproxy_t;

static pgproxy_t PX;

static void px_track(int fd, bool add)
{
    pthread_mutex_lock(&PX.lock);
    for (size_t i = 0; i < 64; i++) {
        if (add && PX.fds[i] < 0) {
            PX.fds[i] = fd;
            break;
        }
        if (!add && PX.fds[i] == fd) {
            PX.fds[i] = -1;
            break;
        }
    }
    pthread_mutex_unlock(&PX.lock);
}

static void *px_pump(void *arg)
{
    int *pair = arg;
    int a = pair[0], b = pair[1];
    free(pair);
    struct pollfd p[2] = {{.fd = a, .events = POLLIN}, {.fd = b, .events = POLLIN}};
    char buf[16384];
    for (;;) {
        if (poll(p, 2, 200) < 0 || atomic_load(&PX.cut))
            break;
        int i = (p[0].revents & (POLLIN | POLLHUP | POLLERR))   ? 0
                : (p[1].revents & (POLLIN | POLLHUP | POLLERR)) ? 1
                                                                : -1;
        if (i < 0)
            continue;
        ssize_t n = read(p[i].fd, buf, sizeof(buf));
        if (n <= 0 || write(p[1 - i].fd, buf, (size_t)n) != n)
            break;
    }
    px_track(a, false);
    px_track(b, false);
    close(a);
    close(b);
    return NULL;
}

static int px_listen(void)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    (void)setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)PX.port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    cr_assert_eq(bind(s, (struct sockaddr *)&a, sizeof(a)), 0, "proxy bind");
    cr_assert_eq(listen(s, 64), 0);
    return s;
}

static void *px_accept(void *arg)
{
    (void)arg;
    for (;;) {
        int c = accept(PX.lfd, NULL, NULL);
        if (c < 0)
            return NULL; /* the listener was closed: cut */
        int u = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET,
                                .sin_port = htons((uint16_t)PX.upstream_port)};
        inet_pton(AF_INET, PX.host, &a.sin_addr);
        if (atomic_load(&PX.cut) || connect(u, (struct sockaddr *)&a, sizeof(a)) != 0) {
            close(c);
            close(u);
            continue;
        }
        px_track(c, true);
        px_track(u, true);
        int *pair = malloc(2 * sizeof(int));
        pair[0] = c;
        pair[1] = u;
        pthread_t t;
        pthread_create(&t, NULL, px_pump, pair);
        pthread_detach(t);
    }
}

static void px_start(void)
{
    atomic_store(&PX.cut, false);
    PX.lfd = px_listen();
    pthread_create(&PX.thread, NULL, px_accept, NULL);
}

/* Postgres goes away: the listener closes and every proxied connection is shut. */
static void px_cut(void)
{
    atomic_store(&PX.cut, true);
    shutdown(PX.lfd, SHUT_RDWR);
    close(PX.lfd);
    pthread_join(PX.thread, NULL);
    pthread_mutex_lock(&PX.lock);
    for (size_t i = 0; i < 64; i++)
        if (PX.fds[i] >= 0)
            shutdown(PX.fds[i], SHUT_RDWR);
    pthread_mutex_unlock(&PX.lock);
}

/* Writes S.db.url with its host:port replaced by the proxy's; fills PX's upstream. */
static void px_url(char *out, size_t outlen)
{
    const char *at = strchr(S.db.url, '@');
    const char *h = at != NULL ? at + 1 : strstr(S.db.url, "://") + 3;
    const char *colon = strchr(h, ':'), *slash = strchr(h, '/');
    cr_assert(colon != NULL && slash != NULL && colon < slash, "url %s", S.db.url);
    snprintf(PX.host, sizeof(PX.host), "%.*s", (int)(colon - h), h);
    if (strcmp(PX.host, "localhost") == 0)
        snprintf(PX.host, sizeof(PX.host), "127.0.0.1");
    PX.upstream_port = (int)strtol(colon + 1, NULL, 10);
    snprintf(out, outlen, "%.*s127.0.0.1:%d%s", (int)(h - S.db.url), S.db.url, PX.port, slash);
}

static long deliver_to(const char *base, const char *body, bgt_resp_t *r)
{
    char tss[24], h1[BG_PADDLE_SIG_HEX_SIZE], sig[300], url[200];
    snprintf(tss, sizeof(tss), "%lld", (long long)time(NULL));
    bg_paddle_sign(SECRET, tss, body, strlen(body), h1);
    snprintf(sig, sizeof(sig), "Paddle-Signature: ts=%s;h1=%s", tss, h1);
    snprintf(url, sizeof(url), "%s/webhooks/paddle", base);
    const char *headers[] = {sig, "Content-Type: application/json", NULL};
    cr_assert_eq(bgt_http(BGT_H1, "POST", url, headers, body, strlen(body), r), 0, "%s", r->error);
    return r->status;
}

Test(billing_paddle, postgres_down_webhooks_answer_503_and_each_event_applies_once_after)
{
    fix_period();
    char token[2048], user[64];
    register_user("pgdown@paddle.example", token, sizeof(token), user, sizeof(user));
    memset(&PX, 0, sizeof(PX));
    pthread_mutex_init(&PX.lock, NULL);
    for (size_t i = 0; i < 64; i++)
        PX.fds[i] = -1;
    PX.port = bgt_free_port();
    char dburl[600];
    px_url(dburl, sizeof(dburl));
    px_start();

    /* a second edge whose Postgres is behind the proxy */
    static char vars[6][700];
    int port = bgt_free_port();
    snprintf(vars[0], 700, "BG_HTTP_PORT=%d", port);
    snprintf(vars[1], 700, "BG_REDIS_URL=%s", S.redis.url);
    snprintf(vars[2], 700, "BG_DATABASE_URL=%s", dburl);
    snprintf(vars[3], 700, "BG_PADDLE_API_URL=%s", S.fake);
    const char *env[] = {vars[0],
                         vars[1],
                         vars[2],
                         vars[3],
                         "BG_PADDLE_WEBHOOK_SECRETS=" SECRET,
                         "BG_PADDLE_API_KEY=" API_KEY,
                         "BG_HTTPS_PORT=0",
                         "BG_ENV_FILE=/nonexistent",
                         "BG_EDGE_THREADS=1",
                         "BG_LOG_FORMAT=text",
                         "BG_JWT_SECRET=0123456789abcdef0123456789abcdef-paddle",
                         NULL};
    const char *eargv[] = {bgt_bin("bg-edge"), NULL};
    pid_t edge2 = spawn_logged(eargv, env, "edge_pgproxy");
    char base[64], url[128];
    snprintf(base, sizeof(base), "http://127.0.0.1:%d", port);
    snprintf(url, sizeof(url), "%s/healthz", base);
    cr_assert_eq(bgt_wait_http(url, 200, 10000), 0, "edge behind the proxy did not come up");

    char *sub = snap("evt_pgd_1", "subscription.created", "active", user, "sub_pgd", PRICE_MONTHLY,
                     bg_timeutil_wall_ms() - 1000);
    char *txn = paid_txn("evt_pgd_2", user, "sub_pgd", "txn_pgd", "pgd-1", "1999", "0");
    bgt_resp_t r;
    cr_assert_eq(deliver_to(base, sub, &r), 200, "%s", r.body);
    bgt_resp_free(&r);

    px_cut();
    /* Postgres is gone: Paddle is told to come back (503, Retry-After), nothing is stored */
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(deliver_to(base, txn, &r), 503, "%s", r.body);
        char h[64];
        cr_expect_not_null(bgt_resp_header(&r, "retry-after", h, sizeof(h)));
        bgt_resp_free(&r);
    }
    cr_expect_eq(count("SELECT count(*) FROM webhook_inbox WHERE event_id = 'evt_pgd_2'"), 0);

    /* it is back: Paddle's next retry is taken, applied once; later retries are duplicates */
    px_start();
    long long until = bgt_now_ms() + 15000;
    long st;
    while ((st = deliver_to(base, txn, &r)) != 200 && bgt_now_ms() < until) {
        bgt_resp_free(&r);
        usleep(200000); /* the edge reconnects on the next request */
    }
    cr_assert_eq(st, 200, "%s", r.body);
    cr_expect(strstr(r.body, "accepted") != NULL, "%s", r.body);
    bgt_resp_free(&r);
    wait_processed();
    /* another pool thread may still hold a connection from before the cut: its first use fails
     * (503 again, Paddle retries), the next one reconnects */
    until = bgt_now_ms() + 15000;
    while ((st = deliver_to(base, txn, &r)) != 200 && bgt_now_ms() < until) {
        bgt_resp_free(&r);
        usleep(200000);
    }
    cr_assert_eq(st, 200, "%s", r.body);
    cr_expect(strstr(r.body, "duplicate") != NULL, "%s", r.body);
    bgt_resp_free(&r);
    cr_expect_eq(count("SELECT count(*) FROM webhook_inbox WHERE event_id = 'evt_pgd_2' "
                       "AND processed_at IS NOT NULL"),
                 1);
    cr_expect_eq(count("SELECT count(*) FROM ledger_transactions WHERE idempotency_key = "
                       "'paddle:payment:txn_pgd'"),
                 1, "the payment is posted once");
    wait_plan(token, "monthly", &r);
    bgt_resp_free(&r);
    bgt_stop(edge2, SIGKILL, 3000);
    px_cut();
    free(sub);
    free(txn);
}

Test(billing_paddle, a_billing_worker_killed_mid_batch_loses_and_doubles_nothing)
{
    fix_period();
    enum { N = 40 };
    char token[2048], user[64];
    register_user("sigkill@paddle.example", token, sizeof(token), user, sizeof(user));
    /* the worker holds still while the batch is queued */
    cr_assert_eq(kill(S.worker, SIGSTOP), 0);
    bgt_resp_t r;
    for (int i = 0; i < N; i++) {
        char evt[32], txn[32], inv[32];
        snprintf(evt, sizeof(evt), "evt_kill_%02d", i);
        snprintf(txn, sizeof(txn), "txn_kill_%02d", i);
        snprintf(inv, sizeof(inv), "kill-%02d", i);
        char *t = paid_txn(evt, user, "sub_kill", txn, inv, "1999", "0");
        cr_assert_eq(deliver(t, SECRET, 0, &r), 200, "%s", r.body);
        bgt_resp_free(&r);
        free(t);
    }
    cr_assert_eq(kill(S.worker, SIGCONT), 0);
    long done = 0;
    long long until = bgt_now_ms() + 15000;
    while ((done = count("SELECT count(*) FROM webhook_inbox WHERE event_id LIKE 'evt\\_kill\\_%' "
                         "AND processed_at IS NOT NULL")) < 3 &&
           bgt_now_ms() < until)
        usleep(1000);
    cr_assert_eq(kill(S.worker, SIGKILL), 0);
    bgt_wait(S.worker, 5000);
    cr_log_info("killed the billing worker after %ld of %d events", done, N);
    cr_expect(done < N, "the kill came mid-batch (%ld of %d done)", done, N);

    /* a new worker takes over the dead one's jobs once they have been idle a second */
    static char vars[3][600];
    snprintf(vars[0], 600, "BG_REDIS_URL=%s", S.redis.url);
    snprintf(vars[1], 600, "BG_DATABASE_URL=%s", S.db.url);
    const char *env[] = {vars[0],
                         vars[1],
                         "BG_ENV_FILE=/nonexistent",
                         "BG_WORKER_PORT=0",
                         "BG_CLAIM_IDLE_MS=1000",
                         "BG_LOG_FORMAT=text",
                         NULL};
    const char *wargv[] = {bgt_bin("bg-worker"), "--roles", "billing", NULL};
    S.worker = spawn_logged(wargv, env, "worker2");
    until = bgt_now_ms() + 30000;
    while (count("SELECT count(*) FROM webhook_inbox WHERE event_id LIKE 'evt\\_kill\\_%' AND "
                 "processed_at IS NOT NULL") < N) {
        cr_assert(bgt_now_ms() < until, "events left unprocessed after the restart (logs in %s)",
                  S.dir);
        usleep(50000);
    }
    cr_expect_eq(count("SELECT count(*) FROM ledger_transactions WHERE idempotency_key LIKE "
                       "'paddle:payment:txn\\_kill\\_%'"),
                 N, "one payment per transaction: none lost, none doubled");
    cr_expect_eq(count("SELECT count(*) FROM payments WHERE provider_payment_id LIKE "
                       "'txn\\_kill\\_%'"),
                 N);
    cr_expect_eq(count("SELECT count(*) FROM invoices WHERE number LIKE 'kill-%' AND status = "
                       "'paid'"),
                 N);
    cr_expect_eq(count("SELECT coalesce(sum(e.amount), 0) FROM ledger_entries e JOIN "
                       "ledger_accounts a ON a.id = e.account_id AND a.owner_type = 'user' "
                       "JOIN ledger_transactions t ON t.id = e.transaction_id AND "
                       "t.kind = 'payment.paddle' WHERE a.owner_id = (SELECT id FROM users WHERE "
                       "email = 'sigkill@paddle.example')"),
                 N * 1999L, "the user's payments add up to the batch");
}
