/*
 * Notifications end to end: the real bg-edge and a bg-worker running only the notify role, a
 * private Redis, a migrated database and bg-fake-smtp (test/fakes/smtp) as the mail server.
 *
 * A Russian user registers (the trial starts); when the trial is moved to end tomorrow, the worker
 * on its own announces it: one mail with a Russian subject, and one in-app notification that
 * GET /notifications shows in Russian. The list pages with cursors, filters unread ones and
 * refuses malformed parameters with 422; POST /notifications/read marks the caller's own
 * notifications only (another user's id marks nothing) and answers how many it marked.
 */
#include <criterion/criterion.h>
#include <libpq-fe.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bg/common.h"
#include "bg/json.h"
#include "bgtest.h"

#define PASSWORD "Notify-Horse-Battery-42"

static struct {
    bgt_redis_t redis;
    bgt_pg_t db;
    PGconn *pg;
    char dir[256], smtp_dir[300], base[64];
    pid_t edge, worker, smtp;
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
    snprintf(S.smtp_dir, sizeof(S.smtp_dir), "%s/smtp", S.dir);
    cr_assert_eq(mkdir(S.smtp_dir, 0700), 0);
    int sport = bgt_free_port();
    char sports[16];
    snprintf(sports, sizeof(sports), "%d", sport);
    const char *sargv[] = {bgt_bin("bg-fake-smtp"), sports, S.smtp_dir, NULL};
    S.smtp = spawn_logged(sargv, NULL, "fake_smtp");

    static char vars[6][600];
    int port = bgt_free_port();
    snprintf(vars[0], 600, "BG_HTTP_PORT=%d", port);
    snprintf(vars[1], 600, "BG_REDIS_URL=%s", S.redis.url);
    snprintf(vars[2], 600, "BG_DATABASE_URL=%s", S.db.url);
    snprintf(vars[3], 600, "BG_SMTP_URL=smtp://127.0.0.1:%d", sport);
    const char *env[] = {vars[0],
                         vars[1],
                         vars[2],
                         vars[3],
                         "BG_MAIL_FROM=notify@bot.test",
                         "BG_NOTIFY_INTERVAL_MS=200",
                         "BG_NOTIFY_RETRY_MS=100",
                         "BG_HTTPS_PORT=0",
                         "BG_ENV_FILE=/nonexistent",
                         "BG_EDGE_THREADS=2",
                         "BG_LOG_FORMAT=text",
                         "BG_WORKER_PORT=0",
                         "BG_JWT_SECRET=0123456789abcdef0123456789abcdef-notify",
                         NULL};
    const char *eargv[] = {bgt_bin("bg-edge"), NULL};
    S.edge = spawn_logged(eargv, env, "edge");
    const char *wargv[] = {bgt_bin("bg-worker"), "--roles", "notify", NULL};
    S.worker = spawn_logged(wargv, env, "worker");
    snprintf(S.base, sizeof(S.base), "http://127.0.0.1:%d", port);
    char url[128];
    snprintf(url, sizeof(url), "%s/healthz", S.base);
    cr_assert_eq(bgt_wait_http(url, 200, 10000), 0, "bg-edge did not come up; see %s", S.dir);
}

static void teardown(void)
{
    pid_t pids[] = {S.worker, S.edge, S.smtp};
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

TestSuite(notifications, .init = setup, .fini = teardown, .timeout = 120);

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

/* Calls and frees the response; returns the status and copies the body into out (may be NULL). */
static long call_s(const char *method, const char *path, const char *token, const char *body,
                   char *out, size_t outlen)
{
    bgt_resp_t r;
    long st = call(method, path, token, body, &r);
    if (out != NULL)
        snprintf(out, outlen, "%s", r.body != NULL ? r.body : "");
    bgt_resp_free(&r);
    return st;
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
    } else if (v != NULL && bg_json_type(v) == BG_JSON_NULL) {
        snprintf(out, outlen, "null");
    } else {
        ok = false;
    }
    bg_json_doc_free(doc);
    return ok;
}

/* The number of items of the page's data and the item i's field into out. */
static size_t page_item(const char *text, size_t i, const char *field, char *out, size_t outlen)
{
    bg_json_doc_t *doc = NULL;
    const char *desc;
    out[0] = '\0';
    cr_assert_eq(bg_json_parse(text, strlen(text), NULL, &doc, &desc, NULL), 0, "%s", text);
    const bg_json_t *data = bg_json_find(bg_json_root(doc), "data");
    cr_assert(bg_json_is_array(data), "%s", text);
    size_t n = bg_json_len(data);
    if (i < n && field != NULL) {
        const char *s = bg_json_str(bg_json_find(bg_json_at(data, i), field), NULL);
        snprintf(out, outlen, "%s", s != NULL ? s : "null");
    }
    bg_json_doc_free(doc);
    return n;
}

static void register_user(const char *email, const char *locale, char *token, size_t tlen, char *id,
                          size_t idlen)
{
    char body[256], out[4096];
    snprintf(body, sizeof(body),
             "{\"email\":\"%s\",\"password\":\"" PASSWORD "\",\"locale\":\"%s\"}", email, locale);
    long st = call_s("POST", "/auth/register", NULL, body, out, sizeof(out));
    cr_assert_eq(st, 201, "register: %ld %s", st, out);
    cr_assert(json_get(out, (const char *const[]){"access_token", NULL}, token, tlen));
    cr_assert(json_get(out, (const char *const[]){"user", "id", NULL}, id, idlen));
}

static void sql(const char *text, const char *p1)
{
    const char *p[] = {p1};
    PGresult *res = PQexecParams(S.pg, text, p1 != NULL ? 1 : 0, NULL, p, NULL, NULL, 0);
    cr_assert(PQresultStatus(res) == PGRES_COMMAND_OK || PQresultStatus(res) == PGRES_TUPLES_OK,
              "%s: %s", text, PQerrorMessage(S.pg));
    PQclear(res);
}

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return NULL;
    char *buf = calloc(1, 65536);
    size_t n = fread(buf, 1, 65535, f);
    (void)fclose(f);
    buf[n] = '\0';
    return buf;
}

Test(notifications, the_worker_announces_a_trial_ending_by_mail_and_in_the_app_in_russian)
{
    char ta[2048], ida[64], tb[2048], idb[64], out[16384], v[512];
    register_user("olga@example.test", "ru", ta, sizeof(ta), ida, sizeof(ida));
    register_user("bob@example.test", "en", tb, sizeof(tb), idb, sizeof(idb));
    cr_expect_eq(call_s("GET", "/notifications", ta, NULL, out, sizeof(out)), 200);
    cr_expect_eq(page_item(out, 0, NULL, v, sizeof(v)), 0, "nothing yet: %s", out);

    sql("UPDATE subscriptions SET trial_ends_at = now() + interval '1 day', "
        "current_period_end = now() + interval '1 day' WHERE user_id = $1::uuid",
        ida);
    char path[400];
    snprintf(path, sizeof(path), "%s/msg-0001.eml", S.smtp_dir);
    long long t0 = bgt_now_ms();
    while (access(path, F_OK) != 0 && bgt_now_ms() - t0 < 15000)
        usleep(100 * 1000);
    char *mail = slurp(path);
    cr_assert_not_null(mail, "no mail within 15 s; logs in %s", S.dir);
    cr_expect(strstr(mail, "X-Fake-Rcpt-To: <olga@example.test>") != NULL, "%s", mail);
    /* "Пробный период скоро закончится" in UTF-8, base64, split into encoded words */
    cr_expect(strstr(mail, "Subject: =?UTF-8?B?0J/RgNC+0LHQvdGL0Lkg0L/QtdGA0LjQvtC0INGB0LrQvtGA0L4g"
                           "0LfQsNC6?=") != NULL,
              "%s", mail);
    free(mail);
    usleep(600 * 1000); /* a few more passes: still one mail */
    snprintf(path, sizeof(path), "%s/msg-0002.eml", S.smtp_dir);
    cr_expect(access(path, F_OK) != 0, "a second mail was sent");

    cr_assert_eq(call_s("GET", "/notifications", ta, NULL, out, sizeof(out)), 200);
    cr_assert_eq(page_item(out, 0, "title", v, sizeof(v)), 1, "%s", out);
    cr_expect_str_eq(v, "Пробный период скоро закончится");
    page_item(out, 0, "kind", v, sizeof(v));
    cr_expect_str_eq(v, "trial_ending");
    page_item(out, 0, "read_at", v, sizeof(v));
    cr_expect_str_eq(v, "null");
    cr_expect(json_get(out, (const char *const[]){"unread", NULL}, v, sizeof(v)));
    cr_expect_str_eq(v, "1");
    cr_expect_eq(call_s("GET", "/notifications", tb, NULL, out, sizeof(out)), 200);
    cr_expect_eq(page_item(out, 0, NULL, v, sizeof(v)), 0, "Bob sees nothing of Olga's: %s", out);
}

Test(notifications, pages_filters_and_marks_only_the_callers_own_as_read)
{
    char ta[2048], ida[64], tb[2048], idb[64], out[16384], v[512], body[512];
    register_user("ana@example.test", "es", ta, sizeof(ta), ida, sizeof(ida));
    register_user("ben@example.test", "en", tb, sizeof(tb), idb, sizeof(idb));
    sql("INSERT INTO notifications (user_id, channel, kind, dedupe_key, locale, payload, status, "
        "created_at) SELECT $1::uuid, 'web', k, k || ':' || $1, 'es', "
        "'{\"amount\":\"9.99\",\"currency\":\"USD\",\"plan\":\"Monthly\",\"date\":\"2030-01-01\"}',"
        " "
        "'sent', now() - make_interval(mins => o) FROM (VALUES ('payment_succeeded', 2), "
        "('subscription_renewed', 1)) v(k, o)",
        ida);
    sql("INSERT INTO notifications (user_id, channel, kind, dedupe_key, payload, status) "
        "VALUES ($1::uuid, 'web', 'payment_failed', 'pf:' || $1, '{}', 'sent')",
        idb);

    cr_assert_eq(call_s("GET", "/notifications?limit=1", ta, NULL, out, sizeof(out)), 200);
    cr_assert_eq(page_item(out, 0, "title", v, sizeof(v)), 1, "%s", out);
    cr_expect_str_eq(v, "Suscripción renovada", "newest first, in Spanish");
    char cursor[128], id_renewed[64];
    page_item(out, 0, "id", id_renewed, sizeof(id_renewed));
    cr_assert(json_get(out, (const char *const[]){"next_cursor", NULL}, cursor, sizeof(cursor)));
    cr_assert_str_neq(cursor, "null");
    char path[256];
    snprintf(path, sizeof(path), "/notifications?limit=1&cursor=%s", cursor);
    cr_assert_eq(call_s("GET", path, ta, NULL, out, sizeof(out)), 200);
    cr_assert_eq(page_item(out, 0, "body", v, sizeof(v)), 1, "%s", out);
    cr_expect(strstr(v, "9.99 USD") != NULL && strstr(v, "Monthly") != NULL, "%s", v);
    cr_assert(json_get(out, (const char *const[]){"next_cursor", NULL}, cursor, sizeof(cursor)));
    cr_expect_str_eq(cursor, "null");

    cr_expect_eq(call_s("GET", "/notifications?cursor=nonsense", ta, NULL, out, sizeof(out)), 422);
    cr_expect(strstr(out, "\"validation_failed\"") != NULL, "%s", out);
    cr_expect_eq(call_s("GET", "/notifications?limit=0", ta, NULL, NULL, 0), 422);
    cr_expect_eq(call_s("GET", "/notifications?unread=maybe", ta, NULL, NULL, 0), 422);

    /* Ben's notification, named by Ana: nothing marked, and Ben's stays unread */
    char idb_n[64];
    cr_assert_eq(call_s("GET", "/notifications", tb, NULL, out, sizeof(out)), 200);
    cr_assert_eq(page_item(out, 0, "id", idb_n, sizeof(idb_n)), 1);
    snprintf(body, sizeof(body), "{\"ids\":[\"%s\"]}", idb_n);
    cr_expect_eq(call_s("POST", "/notifications/read", ta, body, out, sizeof(out)), 200);
    cr_expect_str_eq(out, "{\"updated\":0}");
    cr_expect_eq(call_s("GET", "/notifications?unread=1", tb, NULL, out, sizeof(out)), 200);
    cr_expect_eq(page_item(out, 0, NULL, v, sizeof(v)), 1);

    snprintf(body, sizeof(body), "{\"ids\":[\"%s\"]}", id_renewed);
    cr_expect_eq(call_s("POST", "/notifications/read", ta, body, out, sizeof(out)), 200);
    cr_expect_str_eq(out, "{\"updated\":1}");
    cr_expect_eq(call_s("POST", "/notifications/read", ta, body, out, sizeof(out)), 200);
    cr_expect_str_eq(out, "{\"updated\":0}", "already read");
    cr_assert_eq(call_s("GET", "/notifications?unread=1", ta, NULL, out, sizeof(out)), 200);
    cr_expect_eq(page_item(out, 0, "kind", v, sizeof(v)), 1, "%s", out);
    cr_expect_str_eq(v, "payment_succeeded");
    cr_expect(json_get(out, (const char *const[]){"unread", NULL}, v, sizeof(v)));
    cr_expect_str_eq(v, "1");
    cr_expect_eq(call_s("POST", "/notifications/read", ta, "{\"all\":true}", out, sizeof(out)),
                 200);
    cr_expect_str_eq(out, "{\"updated\":1}");
    cr_assert_eq(call_s("GET", "/notifications", ta, NULL, out, sizeof(out)), 200);
    cr_expect(json_get(out, (const char *const[]){"unread", NULL}, v, sizeof(v)));
    cr_expect_str_eq(v, "0");
    page_item(out, 0, "read_at", v, sizeof(v));
    cr_expect_str_neq(v, "null");

    cr_expect_eq(
        call_s("POST", "/notifications/read", ta, "{\"ids\":[\"nope\"]}", out, sizeof(out)), 422);
    cr_expect(strstr(out, "\"ids\"") != NULL, "names the field: %s", out);
    cr_expect_eq(call_s("POST", "/notifications/read", ta, "{}", NULL, 0), 422);
    cr_expect_eq(call_s("POST", "/notifications/read", ta, "{\"all\":\"yes\"}", NULL, 0), 422);
    cr_expect_eq(call_s("POST", "/notifications/read", ta, "{\"ids\":[", NULL, 0), 400);
    cr_expect_eq(call_s("POST", "/notifications/read", NULL, "{\"all\":true}", NULL, 0), 401);
}
