/*
 * The plan catalogue end to end: bg-edge on a private Redis and a freshly migrated database.
 * GET /billing/plans shows the product plan's four paid plans; an admin's edit is validated (422
 * naming the field), audited, and reaches admission at once (the limit /billing/account reads from
 * the compiled state); a complimentary grant through the API is the same ledger-recorded grant as
 * `bgctl plan grant`; Paddle price ids from the environment are applied by `bgctl migrate` but
 * never overwrite an id an admin set.
 */
#include <criterion/criterion.h>
#include <libpq-fe.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bg/common.h"
#include "bg/json.h"
#include "bgtest.h"

#define PASSWORD "Plans-Horse-Battery-42"

static struct {
    bgt_redis_t redis;
    bgt_pg_t db;
    char dir[256], log[300], base[64];
    int port;
    pid_t pid;
} S;

static void setup(void)
{
    memset(&S, 0, sizeof(S));
    cr_assert_eq(bgt_pg_create(&S.db, true), 0);
    cr_assert_eq(bgt_redis_start(&S.redis), 0);
    cr_assert_eq(bgt_tempdir(S.dir, sizeof(S.dir)), 0);
    snprintf(S.log, sizeof(S.log), "%s/edge.log", S.dir);
    S.port = bgt_free_port();
    snprintf(S.base, sizeof(S.base), "http://127.0.0.1:%d", S.port);
    static char env_store[3][600];
    snprintf(env_store[0], 600, "BG_HTTP_PORT=%d", S.port);
    snprintf(env_store[1], 600, "BG_REDIS_URL=%s", S.redis.url);
    snprintf(env_store[2], 600, "BG_DATABASE_URL=%s", S.db.url);
    const char *env[] = {env_store[0],
                         env_store[1],
                         env_store[2],
                         "BG_HTTPS_PORT=0",
                         "BG_ENV_FILE=/nonexistent",
                         "BG_EDGE_THREADS=2",
                         "BG_LOG_FORMAT=text",
                         "BG_LOG_LEVEL=info",
                         "BG_JWT_SECRET=0123456789abcdef0123456789abcdef-plans",
                         NULL};
    const char *argv[] = {bgt_bin("bg-edge"), NULL};
    S.pid = bgt_spawn(argv, env, S.log);
    cr_assert(S.pid > 0);
    char url[128];
    snprintf(url, sizeof(url), "%s/healthz", S.base);
    cr_assert_eq(bgt_wait_http(url, 200, 10000), 0, "bg-edge did not come up; see %s", S.log);
}

static void teardown(void)
{
    if (S.pid > 0)
        bgt_stop(S.pid, SIGKILL, 2000);
    bgt_redis_stop(&S.redis);
    bgt_pg_drop(&S.db);
    bgt_rmtree(S.dir);
}

TestSuite(plans_admin, .init = setup, .fini = teardown, .timeout = 120);

static long call(const char *method, const char *path, const char *token, const char *body,
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
    cr_assert_eq(bgt_http(BGT_H2C, method, url, headers, body, body != NULL ? strlen(body) : 0, r),
                 0, "%s %s: %s", method, path, r->error);
    return r->status;
}

/* The value at path (keys; a key "#3" is array index 3) of a JSON text (doc owned by caller). */
static const bg_json_t *json_at(const char *text, bg_json_doc_t **doc, const char *const path[])
{
    const char *desc;
    size_t off;
    *doc = NULL;
    if (bg_json_parse(text, strlen(text), NULL, doc, &desc, &off) != 0)
        return NULL;
    const bg_json_t *v = bg_json_root(*doc);
    for (size_t i = 0; path[i] != NULL && v != NULL; i++)
        v = path[i][0] == '#' ? bg_json_at(v, strtoul(path[i] + 1, NULL, 10))
                              : bg_json_find(v, path[i]);
    return v;
}

/* The string at path, copied into out; "" for null, "(absent)" when missing. */
static void get_str(const char *text, const char *const path[], char *out, size_t outlen)
{
    bg_json_doc_t *doc;
    const bg_json_t *v = json_at(text, &doc, path);
    size_t len = 0;
    const char *s = v != NULL ? bg_json_str(v, &len) : NULL;
    if (v != NULL && bg_json_type(v) == BG_JSON_NULL)
        out[0] = '\0';
    else if (s != NULL && len < outlen)
        snprintf(out, outlen, "%.*s", (int)len, s);
    else
        snprintf(out, outlen, "(absent)");
    bg_json_doc_free(doc);
}

static int64_t get_int(const char *text, const char *const path[])
{
    bg_json_doc_t *doc;
    const bg_json_t *v = json_at(text, &doc, path);
    int64_t n = 0;
    cr_assert(v != NULL && bg_json_int(v, &n), "no integer %s in %s", path[0], text);
    bg_json_doc_free(doc);
    return n;
}

static void register_user(const char *email, char *token, size_t tokenlen, char *id, size_t idlen)
{
    char body[512];
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"" PASSWORD "\"}", email);
    bgt_resp_t r;
    long st = call("POST", "/auth/register", NULL, body, &r);
    cr_assert_eq(st, 201, "register: %ld %s", st, r.body);
    get_str(r.body, (const char *const[]){"access_token", NULL}, token, tokenlen);
    get_str(r.body, (const char *const[]){"user", "id", NULL}, id, idlen);
    bgt_resp_free(&r);
}

/* Runs bgctl with args (NULL-terminated) and extra env (may be NULL); output in out. */
static int bgctl(char *out, size_t outlen, const char *const extra[], const char *const args[])
{
    char env_url[600];
    snprintf(env_url, sizeof(env_url), "BG_DATABASE_URL=%s", S.db.url);
    char env_redis[200];
    snprintf(env_redis, sizeof(env_redis), "BG_REDIS_URL=%s", S.redis.url);
    const char *env[16] = {env_url, env_redis, "BG_LOG_LEVEL=warn", "BG_LOG_FORMAT=text",
                           "BG_ENV_FILE=/nonexistent"};
    size_t n = 5;
    for (size_t i = 0; extra != NULL && extra[i] != NULL && n < 15; i++)
        env[n++] = extra[i];
    env[n] = NULL;
    const char *argv[16] = {bgt_bin("bgctl")};
    size_t a = 1;
    for (size_t i = 0; args[i] != NULL && a < 15; i++)
        argv[a++] = args[i];
    argv[a] = NULL;
    return bgt_run(argv, env, out, outlen);
}

static void make_admin(const char *email, char *token, size_t tokenlen)
{
    char out[4096];
    cr_assert_eq(bgctl(out, sizeof(out), NULL,
                       (const char *const[]){"user", "create", "--admin", "--email", email,
                                             "--password", PASSWORD, NULL}),
                 0, "bgctl user create --admin: %s", out);
    char body[512];
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"" PASSWORD "\"}", email);
    bgt_resp_t r;
    long st = call("POST", "/auth/login", NULL, body, &r);
    cr_assert_eq(st, 200, "admin login: %ld %s", st, r.body);
    get_str(r.body, (const char *const[]){"access_token", NULL}, token, tokenlen);
    bgt_resp_free(&r);
}

static void expect_invalid(const char *method, const char *path, const char *token,
                           const char *body, const char *field)
{
    bgt_resp_t r;
    long st = call(method, path, token, body, &r);
    cr_expect_eq(st, 422, "%s: %ld %s", body, st, r.body);
    char got[128];
    get_str(r.body, (const char *const[]){"error", "details", "fields", "#0", "field", NULL}, got,
            sizeof(got));
    cr_expect_str_eq(got, field, "%s: %s", body, r.body);
    bgt_resp_free(&r);
}

/* The first column of the first row of sql with one parameter, as a new string. */
static char *sql1(const char *sql, const char *param)
{
    PGconn *c = PQconnectdb(S.db.url);
    cr_assert_eq(PQstatus(c), CONNECTION_OK, "%s", PQerrorMessage(c));
    const char *p[] = {param};
    PGresult *res = PQexecParams(c, sql, param != NULL ? 1 : 0, NULL, p, NULL, NULL, 0);
    cr_assert_eq(PQresultStatus(res), PGRES_TUPLES_OK, "%s", PQerrorMessage(c));
    char *v = strdup(PQntuples(res) > 0 ? PQgetvalue(res, 0, 0) : "");
    PQclear(res);
    PQfinish(c);
    return v;
}

static void expect_sql(const char *sql, const char *param, const char *want)
{
    char *v = sql1(sql, param);
    cr_expect_str_eq(v, want, "%s", sql);
    free(v);
}

/* The quota limit /billing/account shows the user (read from the compiled state in Redis). */
static int64_t account_limit(const char *token)
{
    bgt_resp_t r;
    long st = call("GET", "/billing/account", token, NULL, &r);
    cr_assert_eq(st, 200, "%ld %s", st, r.body);
    int64_t n = get_int(r.body, (const char *const[]){"quota", "limit", NULL});
    bgt_resp_free(&r);
    return n;
}

/* The admin listing's plan id, field f, as a string. */
static void admin_field(const char *token, const char *id, const char *f, char *out, size_t len)
{
    bgt_resp_t r;
    long st = call("GET", "/admin/plans", token, NULL, &r);
    cr_assert_eq(st, 200, "%ld %s", st, r.body);
    for (int i = 0; i < 16; i++) {
        char idx[8], got[64];
        snprintf(idx, sizeof(idx), "#%d", i);
        get_str(r.body, (const char *const[]){"data", idx, "id", NULL}, got, sizeof(got));
        if (strcmp(got, id) == 0) {
            get_str(r.body, (const char *const[]){"data", idx, f, NULL}, out, len);
            bgt_resp_free(&r);
            return;
        }
    }
    cr_assert_fail("no plan %s in %s", id, r.body);
}

Test(plans_admin, the_public_catalogue_is_the_product_plan)
{
    bgt_resp_t r;
    long st = call("GET", "/billing/plans", NULL, NULL, &r);
    cr_assert_eq(st, 200, "%ld %s", st, r.body);
    static const struct {
        const char *id, *period;
        int64_t amount, requests;
    } want[] = {{"daily", "day", 99, 100},
                {"weekly", "week", 499, 1000},
                {"monthly", "month", 1999, 10000},
                {"yearly", "year", 19999, 150000}};
    for (size_t i = 0; i < BG_ARRAY_SIZE(want); i++) {
        char idx[8], id[32], period[16], cur[8];
        snprintf(idx, sizeof(idx), "#%zu", i);
        get_str(r.body, (const char *const[]){"data", idx, "id", NULL}, id, sizeof(id));
        cr_expect_str_eq(id, want[i].id, "%s", r.body);
        get_str(r.body, (const char *const[]){"data", idx, "period", NULL}, period, sizeof(period));
        cr_expect_str_eq(period, want[i].period);
        get_str(r.body, (const char *const[]){"data", idx, "price", "currency", NULL}, cur,
                sizeof(cur));
        cr_expect_str_eq(cur, "USD");
        cr_expect_eq(get_int(r.body, (const char *const[]){"data", idx, "price", "amount", NULL}),
                     want[i].amount);
        cr_expect_eq(get_int(r.body, (const char *const[]){"data", idx, "requests", NULL}),
                     want[i].requests);
    }
    char extra[32];
    get_str(r.body, (const char *const[]){"data", "#4", "id", NULL}, extra, sizeof(extra));
    cr_expect_str_eq(extra, "(absent)", "the trial is not for sale: %s", r.body);
    cr_expect_not_null(strstr(r.body, "\"advanced_analytics\""), "%s", r.body);
    cr_expect_null(strstr(r.body, "paddle_price_id"), "the public list shows admin fields");
    bgt_resp_free(&r);
}

Test(plans_admin, an_edit_is_validated_audited_and_reaches_admission)
{
    char admin[2048], user[2048], uid[64];
    make_admin("admin@plans.example", admin, sizeof(admin));
    register_user("buyer@plans.example", user, sizeof(user), uid, sizeof(uid));
    cr_expect_eq(account_limit(user), 50, "a new user is on the trial");

    /* a complimentary monthly plan through the API: a ledger grant, in force at once */
    char path[160], body[256];
    snprintf(path, sizeof(path), "/admin/users/%s/plan", uid);
    bgt_resp_t r;
    long st = call("POST", path, admin, "{\"plan\":\"monthly\",\"days\":30}", &r);
    cr_assert_eq(st, 201, "%ld %s", st, r.body);
    char tx[64], sub[64], replaced[64];
    get_str(r.body, (const char *const[]){"ledger_transaction_id", NULL}, tx, sizeof(tx));
    get_str(r.body, (const char *const[]){"subscription_id", NULL}, sub, sizeof(sub));
    get_str(r.body, (const char *const[]){"replaced_subscription_id", NULL}, replaced,
            sizeof(replaced));
    cr_expect_neq(replaced[0], '\0', "the trial was not replaced: %s", r.body);
    cr_expect_eq(get_int(r.body, (const char *const[]){"admission", "limit", NULL}), 10000);
    bgt_resp_free(&r);
    expect_sql("SELECT kind || ' ' || (SELECT sum(amount) FROM ledger_entries WHERE "
               "transaction_id = t.id) || ' ' || (SELECT max(amount) FROM ledger_entries WHERE "
               "transaction_id = t.id) FROM ledger_transactions t WHERE id = $1::uuid",
               tx, "grant.plan 0 10000");
    expect_sql(
        "SELECT count(*) FROM audit_log WHERE action = 'plan.grant' AND actor_kind = 'admin'", NULL,
        "1");
    cr_expect_eq(account_limit(user), 10000);

    /* validation names the field */
    expect_invalid("PUT", "/admin/plans/monthly", admin, "{\"requests\":0}", "requests");
    expect_invalid("PUT", "/admin/plans/monthly", admin, "{\"requests\":\"many\"}", "requests");
    expect_invalid("PUT", "/admin/plans/monthly", admin, "{\"period\":\"fortnight\"}", "period");
    expect_invalid("PUT", "/admin/plans/monthly", admin, "{\"price\":{\"amount\":-1}}",
                   "price.amount");
    expect_invalid("PUT", "/admin/plans/monthly", admin,
                   "{\"price\":{\"amount\":100,\"currency\":\"usd\"}}", "price.currency");
    expect_invalid("PUT", "/admin/plans/monthly", admin, "{\"price\":{\"currency\":\"EUR\"}}",
                   "price.amount");
    expect_invalid("PUT", "/admin/plans/monthly", admin, "{\"features\":[\"ok\",\"Bad!\"]}",
                   "features[1]");
    expect_invalid("PUT", "/admin/plans/monthly", admin, "{\"name\":\"\"}", "name");
    expect_invalid("PUT", "/admin/plans/monthly", admin, "{\"paddle_price_id\":\"pri bad\"}",
                   "paddle_price_id");
    expect_invalid("PUT", "/admin/plans/monthly", admin, "{\"colour\":\"red\"}", "colour");
    expect_invalid("PUT", "/admin/plans/monthly", admin, "{\"active\":1}", "active");
    st = call("PUT", "/admin/plans/monthly", user, "{\"requests\":5}", &r);
    cr_expect_eq(st, 403, "a user edited a plan: %ld %s", st, r.body);
    bgt_resp_free(&r);
    st = call("PUT", "/admin/plans/nope", admin, "{\"requests\":5}", &r);
    cr_expect_eq(st, 404, "%ld %s", st, r.body);
    bgt_resp_free(&r);
    cr_expect_eq(account_limit(user), 10000, "a refused edit changed admission");

    /* an edit that moves admission is compiled into the subscribers' state before the answer */
    st = call("PUT", "/admin/plans/monthly", admin,
              "{\"requests\":12000,\"price\":{\"amount\":2499},\"name\":\"Monthly Plus\","
              "\"features\":[\"email_support\",\"api_access\"]}",
              &r);
    cr_assert_eq(st, 200, "%ld %s", st, r.body);
    cr_expect_eq(get_int(r.body, (const char *const[]){"recompiled", NULL}), 1, "%s", r.body);
    cr_expect_eq(get_int(r.body, (const char *const[]){"requests", NULL}), 12000);
    bgt_resp_free(&r);
    cr_expect_eq(account_limit(user), 12000, "the new limit did not reach admission");
    expect_sql("SELECT count(*) FROM audit_log WHERE action = 'plan.update' AND target_type = "
               "'plan' AND target_id = 'monthly' AND actor_kind = 'admin' AND "
               "details->'before'->>'requests' = '10000' AND details->'after'->>'requests' = "
               "'12000'",
               NULL, "1");
    st = call("GET", "/billing/plans", NULL, NULL, &r);
    cr_assert_eq(st, 200);
    cr_expect_not_null(strstr(r.body, "\"name\":\"Monthly Plus\""), "%s", r.body);
    cr_expect_not_null(strstr(r.body, "\"amount\":2499"), "%s", r.body);
    bgt_resp_free(&r);

    /* an inactive plan leaves the public catalogue, not the admin's */
    st = call("PUT", "/admin/plans/daily", admin, "{\"active\":false}", &r);
    cr_assert_eq(st, 200, "%ld %s", st, r.body);
    bgt_resp_free(&r);
    st = call("GET", "/billing/plans", NULL, NULL, &r);
    cr_expect_null(strstr(r.body, "\"id\":\"daily\""), "%s", r.body);
    bgt_resp_free(&r);
    char active[16];
    admin_field(admin, "daily", "id", active, sizeof(active));
    cr_expect_str_eq(active, "daily");

    /* grants: an unknown plan or user, days out of range, and a retry with the same id */
    expect_invalid("POST", path, admin, "{\"plan\":\"platinum\",\"days\":3}", "plan");
    expect_invalid("POST", path, admin, "{\"plan\":\"weekly\",\"days\":0}", "days");
    expect_invalid("POST", path, admin, "{\"plan\":\"weekly\"}", "days");
    st = call("POST", "/admin/users/0190a0b0-0000-7000-8000-000000000000/plan", admin,
              "{\"plan\":\"weekly\",\"days\":3}", &r);
    cr_expect_eq(st, 404, "%ld %s", st, r.body);
    bgt_resp_free(&r);
    snprintf(body, sizeof(body),
             "{\"plan\":\"weekly\",\"days\":7,\"id\":\"0190a0b0-0000-7000-8000-0000000000aa\"}");
    st = call("POST", path, admin, body, &r);
    cr_expect_eq(st, 201, "%ld %s", st, r.body);
    bgt_resp_free(&r);
    st = call("POST", path, admin, body, &r);
    cr_expect_eq(st, 200, "a retry granted again: %ld %s", st, r.body);
    cr_expect_not_null(strstr(r.body, "\"created\":false"), "%s", r.body);
    bgt_resp_free(&r);
    expect_sql("SELECT count(*) FROM ledger_transactions WHERE idempotency_key = $1",
               "grant:0190a0b0-0000-7000-8000-0000000000aa", "1");
    cr_expect_eq(account_limit(user), 1000, "the weekly grant is not in force");
    st = call("POST", path, user, "{\"plan\":\"yearly\",\"days\":365}", &r);
    cr_expect_eq(st, 403, "a user granted themselves a plan: %ld %s", st, r.body);
    bgt_resp_free(&r);
}

Test(plans_admin, configured_price_ids_never_overwrite_an_admins)
{
    char admin[2048], out[8192], v[128];
    make_admin("prices@plans.example", admin, sizeof(admin));
    const char *migrate[] = {"migrate", NULL};
    const char *first[] = {"BG_PADDLE_PRICE_MONTHLY=pri_conf_m1",
                           "BG_PADDLE_PRICE_YEARLY=pri_conf_y1", NULL};
    cr_assert_eq(bgctl(out, sizeof(out), first, migrate), 0, "%s", out);
    cr_expect_not_null(strstr(out, "2 applied"), "%s", out);
    admin_field(admin, "monthly", "paddle_price_id", v, sizeof(v));
    cr_expect_str_eq(v, "pri_conf_m1");
    admin_field(admin, "monthly", "paddle_price_source", v, sizeof(v));
    cr_expect_str_eq(v, "config");
    admin_field(admin, "weekly", "paddle_price_id", v, sizeof(v));
    cr_expect_str_eq(v, "", "an unset variable gave weekly an id");

    /* echoing the configured id back keeps it configuration's */
    bgt_resp_t r;
    long st =
        call("PUT", "/admin/plans/yearly", admin, "{\"paddle_price_id\":\"pri_conf_y1\"}", &r);
    cr_assert_eq(st, 200, "%ld %s", st, r.body);
    bgt_resp_free(&r);
    /* an admin sets monthly's own id; another plan's id is taken */
    st = call("PUT", "/admin/plans/monthly", admin, "{\"paddle_price_id\":\"pri_admin_m\"}", &r);
    cr_assert_eq(st, 200, "%ld %s", st, r.body);
    get_str(r.body, (const char *const[]){"paddle_price_source", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, "admin");
    bgt_resp_free(&r);
    st = call("PUT", "/admin/plans/weekly", admin, "{\"paddle_price_id\":\"pri_conf_y1\"}", &r);
    cr_expect_eq(st, 409, "%ld %s", st, r.body);
    bgt_resp_free(&r);

    /* the next deployment changes both variables: configuration moves yearly, not monthly */
    const char *second[] = {"BG_PADDLE_PRICE_MONTHLY=pri_conf_m2",
                            "BG_PADDLE_PRICE_YEARLY=pri_conf_y2", NULL};
    cr_assert_eq(bgctl(out, sizeof(out), second, migrate), 0, "%s", out);
    cr_expect_not_null(strstr(out, "1 applied, 1 kept"), "%s", out);
    cr_expect_not_null(strstr(out, "BG_PADDLE_PRICE_MONTHLY=pri_conf_m2 not applied"), "%s", out);
    admin_field(admin, "monthly", "paddle_price_id", v, sizeof(v));
    cr_expect_str_eq(v, "pri_admin_m", "configuration overwrote the admin's id");
    admin_field(admin, "yearly", "paddle_price_id", v, sizeof(v));
    cr_expect_str_eq(v, "pri_conf_y2");

    /* clearing the id hands the plan back to configuration */
    st = call("PUT", "/admin/plans/monthly", admin, "{\"paddle_price_id\":\"\"}", &r);
    cr_assert_eq(st, 200, "%ld %s", st, r.body);
    get_str(r.body, (const char *const[]){"paddle_price_id", NULL}, v, sizeof(v));
    cr_expect_str_eq(v, "");
    bgt_resp_free(&r);
    cr_assert_eq(bgctl(out, sizeof(out), second, migrate), 0, "%s", out);
    admin_field(admin, "monthly", "paddle_price_id", v, sizeof(v));
    cr_expect_str_eq(v, "pri_conf_m2");

    /* a malformed value is refused by name, and bgctl migrate says so with its status */
    const char *bad[] = {"BG_PADDLE_PRICE_DAILY=pri with spaces", NULL};
    cr_expect_eq(bgctl(out, sizeof(out), bad, migrate), 1, "%s", out);
    cr_expect_not_null(strstr(out, "BG_PADDLE_PRICE_DAILY"), "%s", out);
    admin_field(admin, "daily", "paddle_price_id", v, sizeof(v));
    cr_expect_str_eq(v, "");
}
