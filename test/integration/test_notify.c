/*
 * Notifications from Paddle events and trials to mail, Telegram and the app (bg/notify.h), on a
 * migrated database with test/fakes/smtp (bg-fake-smtp) and test/fixtures/fake_telegram.c standing
 * in for the mail server and the Bot API.
 *
 * The events are the SDK fixtures of test/fixtures/paddle with ids, statuses and periods set,
 * stored through the inbox as the edge stores them and applied with bg_billing_apply as the billing
 * worker does. What a user would notice is checked: exactly one mail, one Telegram message and one
 * in-app notification per fact, in Russian for a Russian user, however often the producer runs and
 * however often an event is delivered; a mail server's 4xx is retried and then the mail goes out;
 * a 5xx fails the mail without a retry; a 4xx that never ends fails it after the attempts; a trial
 * ending within three days is announced once, one ending later not yet.
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <signal.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <unistd.h>

#include "bg/billing.h"
#include "bg/err.h"
#include "bg/i18n.h"
#include "bg/json.h"
#include "bg/notify.h"
#include "bg/pg.h"
#include "bg/plans.h"
#include "bgtest.h"

#define FIXTURES BGT_SOURCE_DIR "/test/fixtures/paddle/"
#define PRICE_MONTHLY "pri_01gsz8x8sawmvhz1pv30nge1ke"
#define BOT_TOKEN "7000001:AAHnotifyTestTokenABCDEFGHIJKLMNOPQRS"
#define AGENT_ID "00000000-0000-4000-8000-00000000a550"
#define CHAT_ID "555000111"

static struct {
    bgt_pg_t db;
    PGconn *pg;
    char dir[256], smtp_dir[300], smtp_url[64], tg_url[64], tg_log[300];
    pid_t smtp_pid, tg_pid;
    char *sub_tmpl, *txn_tmpl;
    bg_notify_opts_t opts;
} S;

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "cannot open %s", path);
    char *buf = calloc(1, 262144);
    size_t n = fread(buf, 1, 262143, f);
    (void)fclose(f);
    cr_assert(n > 0);
    return buf;
}

/* Runs sql; returns the first field of the first row as a new string ("" for NULL or no row). */
static char *q(const char *sql, int n, const char *const *params)
{
    PGresult *res;
    int rc = bg_pg_exec(S.pg, sql, n, params, &res);
    cr_assert_eq(rc, 0, "query failed (%s): %s", bg_strerror(rc), sql);
    const char *v = PQntuples(res) > 0 ? bg_pg_value(res, 0, 0) : NULL;
    char *out = strdup(v != NULL ? v : "");
    PQclear(res);
    return out;
}

static long long qn(const char *sql, int n, const char *const *params)
{
    char *s = q(sql, n, params);
    long long v = strtoll(s, NULL, 10);
    free(s);
    return v;
}

static bool tcp_up(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bool ok = connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
    close(fd);
    return ok;
}

static void setup(void)
{
    memset(&S, 0, sizeof(S));
    signal(SIGPIPE, SIG_IGN);
    unsetenv("BXFI_MAP"); /* fake_telegram links Criterion: it must not take itself for a test */
    cr_assert_eq(bgt_pg_create(&S.db, true), 0);
    char err[512];
    cr_assert_eq(bg_pg_connect(S.db.url, 3, &S.pg, err, sizeof(err)), 0, "connect: %s", err);
    cr_assert_eq(bg_pg_run(S.pg,
                           "UPDATE plans SET paddle_price_id = '" PRICE_MONTHLY
                           "', paddle_price_source = 'admin' WHERE id = 'monthly'",
                           0, NULL),
                 0);
    cr_assert_eq(bg_i18n_init("en,ru,es", "en", err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(bgt_tempdir(S.dir, sizeof(S.dir)), 0);

    snprintf(S.smtp_dir, sizeof(S.smtp_dir), "%s/smtp", S.dir);
    cr_assert_eq(mkdir(S.smtp_dir, 0700), 0);
    int sport = bgt_free_port();
    char sports[16], log[400];
    snprintf(sports, sizeof(sports), "%d", sport);
    snprintf(S.smtp_url, sizeof(S.smtp_url), "smtp://127.0.0.1:%d/bot.test", sport);
    snprintf(log, sizeof(log), "%s/fake_smtp.log", S.dir);
    const char *sargv[] = {bgt_bin("bg-fake-smtp"), sports, S.smtp_dir, NULL};
    S.smtp_pid = bgt_spawn(sargv, NULL, log);
    cr_assert(S.smtp_pid > 0);

    int tport = bgt_free_port();
    char tports[16];
    snprintf(tports, sizeof(tports), "%d", tport);
    snprintf(S.tg_url, sizeof(S.tg_url), "http://127.0.0.1:%d", tport);
    snprintf(S.tg_log, sizeof(S.tg_log), "%s/calls.jsonl", S.dir);
    snprintf(log, sizeof(log), "%s/fake_telegram.log", S.dir);
    const char *targv[] = {
        bgt_bin("../test-bin/fake_telegram"), "--port", tports, "--log", S.tg_log, NULL};
    S.tg_pid = bgt_spawn(targv, NULL, log);
    cr_assert(S.tg_pid > 0);
    char url[200];
    snprintf(url, sizeof(url), "%s/bot%s/getMe", S.tg_url, BOT_TOKEN);
    cr_assert_eq(bgt_wait_http(url, 200, 10000), 0, "fake_telegram does not answer");
    long long t0 = bgt_now_ms();
    while (!tcp_up(sport) && bgt_now_ms() - t0 < 10000)
        usleep(20000);
    cr_assert(tcp_up(sport), "bg-fake-smtp does not answer");

    S.sub_tmpl = slurp(FIXTURES "subscription.created.json");
    S.txn_tmpl = slurp(FIXTURES "transaction.completed.json");
    S.opts = (bg_notify_opts_t){.smtp_url = S.smtp_url,
                                .mail_from = "billing@bot.test",
                                .telegram_api_url = S.tg_url,
                                .public_url = "https://bot.test",
                                .timeout_ms = 5000,
                                .retry_ms = 10,
                                .max_attempts = 3};
}

static void teardown(void)
{
    if (S.smtp_pid > 0)
        bgt_stop(S.smtp_pid, SIGKILL, 3000);
    if (S.tg_pid > 0)
        bgt_stop(S.tg_pid, SIGKILL, 3000);
    free(S.sub_tmpl);
    free(S.txn_tmpl);
    PQfinish(S.pg);
    bgt_pg_drop(&S.db);
    bg_i18n_dispose();
    if (getenv("BGT_KEEP_LOGS") == NULL)
        bgt_rmtree(S.dir);
    else
        fprintf(stderr, "logs kept in %s\n", S.dir);
}

TestSuite(notify, .init = setup, .fini = teardown, .timeout = 120);

/* ---- helpers ---- */

static char *new_user(const char *email, const char *locale)
{
    const char *p[] = {email, locale};
    return q("INSERT INTO users (email, locale) VALUES ($1, $2) RETURNING id", 2, p);
}

/* Links user to a private chat with an active bot (as /start and /link would). */
static void link_telegram(const char *user)
{
    char *bot = q("INSERT INTO telegram_bots (agent_id, slug, token, webhook_secret_hash) "
                  "VALUES ('" AGENT_ID "', '7000001', '" BOT_TOKEN "', repeat('a', 64)) "
                  "RETURNING id",
                  0, NULL);
    const char *p[] = {user, bot};
    cr_assert_eq(bg_pg_run(S.pg,
                           "WITH a AS (INSERT INTO telegram_accounts (telegram_user_id, user_id) "
                           "  VALUES (" CHAT_ID ", $1::uuid) RETURNING telegram_user_id) "
                           "INSERT INTO telegram_chats (bot_id, chat_id, type, telegram_user_id) "
                           "SELECT $2::uuid, " CHAT_ID ", 'private', telegram_user_id FROM a",
                           2, p),
                 0);
    free(bot);
}

#define P1 "2026-04-12T10:18:47.635628Z", "2026-05-12T10:18:47.635628Z"
#define P2 "2026-05-12T10:18:47.635628Z", "2026-06-12T10:18:47.635628Z"

/* A subscription event of sub for user (period ps..pe, or none when ps is NULL). */
static char *sub_event(const char *evt, const char *type, const char *occurred, const char *sub,
                       const char *status, const char *ps, const char *pe, const char *user)
{
    const char *p[] = {
        S.sub_tmpl, evt, type, occurred, sub,
        status,     ps,  pe,   user,     strcmp(status, "canceled") == 0 ? occurred : NULL};
    return q("SELECT (t || jsonb_build_object('event_id', $2::text, 'event_type', $3::text, "
             "'occurred_at', $4::text, 'data', (t -> 'data') || jsonb_build_object('id', $5::text, "
             "'status', $6::text, 'customer_id', 'ctm_' || $5, "
             "'custom_data', jsonb_build_object('user_id', $9::text), "
             "'current_billing_period', CASE WHEN $7::text IS NULL THEN 'null'::jsonb ELSE "
             "jsonb_build_object('starts_at', $7::text, 'ends_at', $8::text) END, "
             "'scheduled_change', 'null'::jsonb, "
             "'canceled_at', coalesce(to_jsonb($10::text), 'null'::jsonb), "
             "'items', jsonb_set(t -> 'data' -> 'items', '{0,price,id}', to_jsonb('" PRICE_MONTHLY
             "'::text)))))::text FROM (SELECT $1::jsonb AS t) s",
             10, p);
}

/* A transaction event of txn (subscription sub) for user; failed: a declined payment. */
static char *txn_event(const char *evt, const char *type, const char *occurred, const char *txn,
                       const char *sub, const char *total, const char *ps, const char *pe,
                       const char *user, bool failed)
{
    const char *p[] = {S.txn_tmpl,
                       evt,
                       type,
                       occurred,
                       txn,
                       sub,
                       ps,
                       pe,
                       total,
                       user,
                       failed ? "payment_failed" : "completed"};
    return q(
        "SELECT (t || jsonb_build_object('event_id', $2::text, 'event_type', $3::text, "
        "'occurred_at', $4::text, 'data', (t -> 'data') || jsonb_build_object('id', $5::text, "
        "'subscription_id', $6::text, 'status', $11::text, 'customer_id', 'ctm_' || $6, "
        "'custom_data', jsonb_build_object('user_id', $10::text), "
        "'origin', 'subscription_recurring', 'billed_at', $7::text, "
        "'invoice_number', $5 || '-inv', 'invoice_id', 'inv_' || $5, "
        "'billing_period', jsonb_build_object('starts_at', $7::text, 'ends_at', $8::text), "
        "'items', jsonb_set(t -> 'data' -> 'items', '{0,price,id}', to_jsonb('" PRICE_MONTHLY
        "'::text)), 'details', jsonb_set(t -> 'data' -> 'details', '{totals,grand_total}', "
        "to_jsonb($9::text)), 'payments', jsonb_build_array(jsonb_build_object("
        "'amount', $9::text, 'status', CASE WHEN $11 = 'completed' THEN 'captured' ELSE "
        "'error' END, 'error_code', CASE WHEN $11 = 'completed' THEN NULL ELSE 'declined' END, "
        "'payment_attempt_id', $5 || '-attempt', 'created_at', $4::text, 'captured_at', "
        "CASE WHEN $11 = 'completed' THEN $4::text END, "
        "'method_details', jsonb_build_object('type', 'card'))))))::text "
        "FROM (SELECT $1::jsonb AS t) s",
        11, p);
}

/* Stores an event through the inbox (as the edge does) and applies it (as the worker does). */
static void deliver(const char *json)
{
    bg_billing_inbox_result_t in;
    int rc = bg_billing_inbox_put(S.pg, json, strlen(json), &in);
    cr_assert_eq(rc, 0, "inbox: %s", bg_strerror(rc));
    bg_billing_result_t res;
    rc = bg_billing_apply(S.pg, in.event_id, &res);
    cr_assert_eq(rc, 0, "apply %s: %s (%s)", in.event_id, bg_strerror(rc), res.error);
}

static int64_t produce(void)
{
    int64_t n = -1;
    cr_assert_eq(bg_notify_produce(S.pg, &n), 0);
    return n;
}

static bg_notify_counts_t send_due(void)
{
    bg_notify_counts_t c;
    cr_assert_eq(bg_notify_send_due(S.pg, &S.opts, 100, &c), 0);
    return c;
}

/* The messages the fake SMTP server accepted, in order; returns their number. */
static int mails(char *out[], int max)
{
    int n = 0;
    for (int i = 1; i <= max; i++) {
        char path[400];
        snprintf(path, sizeof(path), "%s/msg-%04d.eml", S.smtp_dir, i);
        if (access(path, F_OK) != 0)
            break;
        if (out != NULL)
            out[n] = slurp(path);
        n++;
    }
    return n;
}

/* Decodes the Subject's RFC 2047 encoded words into out. */
static void subject_of(const char *mail, char *out, size_t outlen)
{
    out[0] = '\0';
    const char *p = strstr(mail, "\r\nSubject:");
    cr_assert_not_null(p, "no Subject in %s", mail);
    p += 10;
    size_t len = 0;
    for (;;) {
        const char *w = strstr(p, "=?UTF-8?B?");
        const char *eol = strstr(p, "\r\n");
        if (w == NULL || (eol != NULL && w > eol && eol[2] != ' '))
            break;
        w += 10;
        const char *end = strstr(w, "?=");
        cr_assert_not_null(end);
        cr_assert(end - w + 12 <= 75, "an encoded word is longer than 75 characters");
        size_t bin_len = 0;
        cr_assert_eq(sodium_base642bin((unsigned char *)out + len, outlen - len - 1, w,
                                       (size_t)(end - w), NULL, &bin_len, NULL,
                                       sodium_base64_VARIANT_ORIGINAL),
                     0);
        len += bin_len;
        p = end + 2;
    }
    out[len] = '\0';
}

/* Decodes the base64 body into out. */
static void body_of(const char *mail, char *out, size_t outlen)
{
    const char *p = strstr(mail, "\r\n\r\n");
    cr_assert_not_null(p);
    size_t bin_len = 0;
    cr_assert_eq(sodium_base642bin((unsigned char *)out, outlen - 1, p + 4, strlen(p + 4), "\r\n",
                                   &bin_len, NULL, sodium_base64_VARIANT_ORIGINAL),
                 0);
    out[bin_len] = '\0';
}

static int count_lines_with(const char *path, const char *needle)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return 0;
    char line[65536];
    int n = 0;
    while (fgets(line, sizeof(line), f) != NULL)
        n += strstr(line, needle) != NULL;
    (void)fclose(f);
    return n;
}

static bool file_has(const char *path, const char *needle)
{
    return count_lines_with(path, needle) > 0;
}

static void write_control(const char *text)
{
    char path[400];
    snprintf(path, sizeof(path), "%s/control", S.smtp_dir);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs(text, f);
    (void)fclose(f);
}

/* ---- tests ---- */

Test(notify, one_mail_one_telegram_message_and_one_in_app_notification_per_fact_in_russian)
{
    char *user = new_user("ivan@example.test", "ru");
    link_telegram(user);
    const char *sub = "sub_notify_ru";
    char *ev[8];
    size_t n = 0;
    ev[n++] = txn_event("evt_n_01", "transaction.completed", "2026-04-12T10:18:50.000000Z",
                        "txn_n_1", sub, "1999", P1, user, false);
    ev[n++] = sub_event("evt_n_02", "subscription.created", "2026-04-12T10:18:51.000000Z", sub,
                        "active", P1, user);
    /* the same payment told twice by Paddle under another event id: still one fact */
    ev[n++] = txn_event("evt_n_03", "transaction.completed", "2026-04-12T10:18:52.000000Z",
                        "txn_n_1", sub, "1999", P1, user, false);
    ev[n++] = sub_event("evt_n_04", "subscription.updated", "2026-05-12T10:18:51.000000Z", sub,
                        "active", P2, user);
    ev[n++] = txn_event("evt_n_05", "transaction.payment_failed", "2026-06-12T10:18:50.000000Z",
                        "txn_n_2", sub, "1999", "2026-06-12T10:18:47.635628Z",
                        "2026-07-12T10:18:47.635628Z", user, true);
    ev[n++] = sub_event("evt_n_06", "subscription.canceled", "2026-06-20T10:00:00.000000Z", sub,
                        "canceled", NULL, NULL, user);
    for (size_t i = 0; i < n; i++) {
        deliver(ev[i]);
        deliver(ev[i]); /* every event delivered twice */
    }

    int64_t first = produce();
    cr_expect_eq(first, 12, "4 facts × 3 channels, got %lld", (long long)first);
    cr_expect_eq(produce(), 0, "a second pass produces nothing");
    bg_notify_counts_t c = send_due();
    cr_expect_eq(c.sent, 8, "4 mails and 4 Telegram messages sent, got %lld", (long long)c.sent);
    /* a redelivered event after the cursor passed it, and more passes: still nothing new */
    deliver(ev[0]);
    cr_expect_eq(produce(), 0);
    c = send_due();
    cr_expect_eq(c.sent + c.retried + c.failed + c.skipped, 0);

    char *m[16];
    int nm = mails(m, 16);
    cr_assert_eq(nm, 4, "one mail per fact, got %d", nm);
    const char *want[] = {"Платёж получен", "Подписка продлена", "Платёж не прошёл",
                          "Подписка отменена"};
    bool seen[4] = {false};
    for (int i = 0; i < nm; i++) {
        cr_expect(strstr(m[i], "X-Fake-Rcpt-To: <ivan@example.test>") != NULL);
        cr_expect(strstr(m[i], "\r\nFrom: <billing@bot.test>\r\n") != NULL);
        cr_expect(strstr(m[i], "\r\nTo: <ivan@example.test>\r\n") != NULL);
        cr_expect(strstr(m[i], "\r\nDate: ") != NULL && strstr(m[i], "\r\nMessage-ID: <") != NULL);
        cr_expect(strstr(m[i], "Content-Type: text/plain; charset=UTF-8") != NULL);
        char subj[512], body[4096];
        subject_of(m[i], subj, sizeof(subj));
        body_of(m[i], body, sizeof(body));
        for (int k = 0; k < 4; k++)
            if (strcmp(subj, want[k]) == 0) {
                cr_expect(!seen[k], "two mails say \"%s\"", subj);
                seen[k] = true;
            }
        if (strcmp(subj, want[0]) == 0)
            cr_expect(strstr(body, "Мы получили ваш платёж 19.99 USD") != NULL, "body: %s", body);
        if (strcmp(subj, want[1]) == 0)
            cr_expect(strstr(body, "продлён до 2026-06-12") != NULL, "body: %s", body);
        cr_expect(strstr(body, "https://bot.test") != NULL, "the footer names the site");
        free(m[i]);
    }
    for (int k = 0; k < 4; k++)
        cr_expect(seen[k], "no mail says \"%s\"", want[k]);

    cr_expect_eq(count_lines_with(S.tg_log, "\"sendMessage\""), 4);
    for (int k = 0; k < 4; k++)
        cr_expect_eq(count_lines_with(S.tg_log, want[k]), 1, "one Telegram message \"%s\"",
                     want[k]);
    cr_expect(file_has(S.tg_log, "\"chat_id\":" CHAT_ID));

    bg_buf_t page;
    bg_buf_init(&page, 1 << 20);
    cr_assert_eq(bg_notify_list(S.pg, user, "ru", NULL, 50, false, &page), 0);
    bg_json_doc_t *doc = NULL;
    const char *ed;
    cr_assert_eq(bg_json_parse(page.base, page.len, NULL, &doc, &ed, NULL), 0);
    const bg_json_t *data = bg_json_find(bg_json_root(doc), "data");
    cr_assert_eq(bg_json_len(data), 4, "%s", page.base);
    int64_t unread = -1;
    cr_expect_eq(bg_json_get_int(bg_json_root(doc), "unread", &unread), 0);
    cr_expect_eq(unread, 4);
    for (int k = 0; k < 4; k++)
        cr_expect(strstr(page.base, want[k]) != NULL, "in-app \"%s\" missing: %s", want[k],
                  page.base);
    bg_json_doc_free(doc);
    bg_buf_dispose(&page);

    const char *up[] = {user};
    cr_expect_eq(qn("SELECT count(*) FROM notifications WHERE user_id = $1::uuid AND "
                    "(channel = 'web' OR status = 'sent') AND locale = 'ru'",
                    1, up),
                 12);
    for (size_t i = 0; i < n; i++)
        free(ev[i]);
    free(user);
}

Test(notify, smtp_4xx_is_retried_then_the_mail_goes_out_once)
{
    char *user = new_user("retry@example.test", "en");
    char *ev = txn_event("evt_r_01", "transaction.completed", "2026-04-12T10:18:50.000000Z",
                         "txn_r_1", "sub_r", "2500", P1, user, false);
    deliver(ev);
    write_control("mail 451 1\n");
    cr_assert_eq(produce(), 2); /* web and email: no Telegram chat */
    bg_notify_counts_t c = send_due();
    cr_expect_eq(c.retried, 1);
    cr_expect_eq(mails(NULL, 4), 0, "nothing delivered yet");
    const char *up[] = {user};
    char *st = q("SELECT status || ' ' || attempts || ' ' || coalesce(last_error, '') FROM "
                 "notifications WHERE user_id = $1::uuid AND channel = 'email'",
                 1, up);
    cr_expect(strncmp(st, "pending 1 smtp 451", 18) == 0, "after a 451: %s", st);
    free(st);
    usleep(200 * 1000); /* retry_ms is 10 ms (with jitter) */
    c = send_due();
    cr_expect_eq(c.sent, 1);
    char *m[4];
    cr_assert_eq(mails(m, 4), 1);
    char subj[256];
    subject_of(m[0], subj, sizeof(subj));
    cr_expect_str_eq(subj, "Payment received");
    free(m[0]);
    st = q("SELECT status || ' ' || attempts FROM notifications WHERE user_id = $1::uuid AND "
           "channel = 'email'",
           1, up);
    cr_expect_str_eq(st, "sent 2");
    free(st);
    char attempts[400];
    snprintf(attempts, sizeof(attempts), "%s/attempts.log", S.smtp_dir);
    cr_expect_eq(count_lines_with(attempts, "mail 451"), 1);
    cr_expect_eq(count_lines_with(attempts, "data 250"), 1);
    free(ev);
    free(user);
}

Test(notify, smtp_5xx_fails_the_mail_and_a_4xx_that_never_ends_fails_it_after_the_attempts)
{
    char *user = new_user("bounce@example.test", "es");
    char *ev = txn_event("evt_f_01", "transaction.completed", "2026-04-12T10:18:50.000000Z",
                         "txn_f_1", "sub_f", "2500", P1, user, false);
    deliver(ev);
    write_control("data 554 1\n");
    cr_assert_eq(produce(), 2);
    bg_notify_counts_t c = send_due();
    cr_expect_eq(c.failed, 1);
    usleep(100 * 1000);
    c = send_due();
    cr_expect_eq(c.sent + c.retried + c.failed, 0, "a failed mail is not tried again");
    cr_expect_eq(mails(NULL, 4), 0);
    const char *up[] = {user};
    char *st = q("SELECT status || ' ' || attempts || ' ' || coalesce(last_error, '') FROM "
                 "notifications WHERE user_id = $1::uuid AND channel = 'email'",
                 1, up);
    cr_expect(strncmp(st, "failed 1 smtp 554", 17) == 0, "after a 554: %s", st);
    free(st);

    /* another payment, and a server that answers 421 for ever: failed after max_attempts (3) */
    char *ev2 = txn_event("evt_f_02", "transaction.completed", "2026-05-12T10:18:50.000000Z",
                          "txn_f_2", "sub_f", "2500", P2, user, false);
    deliver(ev2);
    write_control("mail 421 100\n");
    cr_assert_eq(produce(), 2);
    for (int i = 0; i < 10; i++) {
        (void)send_due();
        usleep(150 * 1000);
    }
    st = q("SELECT status || ' ' || attempts FROM notifications WHERE user_id = $1::uuid AND "
           "channel = 'email' AND dedupe_key LIKE 'payment_succeeded:txn_f_2:%'",
           1, up);
    cr_expect_str_eq(st, "failed 3");
    free(st);
    cr_expect_eq(mails(NULL, 4), 0);
    free(ev);
    free(ev2);
    free(user);
}

Test(notify, a_trial_ending_within_three_days_is_announced_once)
{
    char *soon = new_user("soon@example.test", "en");
    char *later = new_user("later@example.test", "en");
    bg_plan_grant_t g = {.user_id = soon, .plan_id = "trial", .days = 2};
    bg_plan_grant_result_t gr;
    cr_assert_eq(bg_plans_grant(S.pg, &g, NULL, &gr), 0);
    g.user_id = later;
    g.days = 10;
    cr_assert_eq(bg_plans_grant(S.pg, &g, NULL, &gr), 0);
    /* grants of the trial plan are trials: make sure both rows say so */
    cr_assert_eq(bg_pg_run(S.pg,
                           "UPDATE subscriptions SET status = 'trialing', "
                           "trial_ends_at = current_period_end WHERE plan_id = 'trial'",
                           0, NULL),
                 0);
    cr_expect_eq(produce(), 2, "web and email for the trial ending in 2 days");
    cr_expect_eq(produce(), 0);
    bg_notify_counts_t c = send_due();
    cr_expect_eq(c.sent, 1);
    char *m[4];
    cr_assert_eq(mails(m, 4), 1);
    char subj[256], body[2048];
    subject_of(m[0], subj, sizeof(subj));
    body_of(m[0], body, sizeof(body));
    cr_expect_str_eq(subj, "Your trial ends soon");
    cr_expect(strstr(m[0], "X-Fake-Rcpt-To: <soon@example.test>") != NULL);
    const char *sp[] = {soon};
    char *day = q("SELECT to_char(trial_ends_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') FROM "
                  "subscriptions WHERE user_id = $1::uuid",
                  1, sp);
    cr_expect(strstr(body, day) != NULL, "the body names the end date %s: %s", day, body);
    char *key = q("SELECT dedupe_key FROM notifications WHERE user_id = $1::uuid AND "
                  "channel = 'web'",
                  1, sp);
    cr_expect(strncmp(key, "trial_ending:", 13) == 0 && strstr(key, day) != NULL, "key %s", key);
    free(key);
    free(day);
    free(m[0]);
    const char *lp[] = {later};
    cr_expect_eq(qn("SELECT count(*) FROM notifications WHERE user_id = $1::uuid", 1, lp), 0);
    free(soon);
    free(later);
}

Test(notify, without_an_smtp_server_mail_is_skipped_and_the_app_still_shows_it)
{
    char *user = new_user("nomail@example.test", "en");
    char *ev = txn_event("evt_s_01", "transaction.completed", "2026-04-12T10:18:50.000000Z",
                         "txn_s_1", "sub_s", "900", P1, user, false);
    deliver(ev);
    cr_assert_eq(produce(), 2);
    S.opts.smtp_url = NULL;
    bg_notify_counts_t c = send_due();
    cr_expect_eq(c.skipped, 1);
    const char *up[] = {user};
    char *st = q("SELECT string_agg(channel || ':' || status, ',' ORDER BY channel) FROM "
                 "notifications WHERE user_id = $1::uuid",
                 1, up);
    cr_expect_str_eq(st, "email:skipped,web:sent");
    free(st);
    free(ev);
    free(user);
}

Test(notify, a_mail_is_rfc5322_and_refuses_header_injection)
{
    bg_buf_t out;
    bg_buf_init(&out, 1 << 20);
    const char *subject = "Ваш бесплатный пробный период заканчивается очень скоро, правда";
    cr_assert_eq(bg_notify_mail_build("a@b.test", "c@d.test", subject, "line one\nline two\n",
                                      1700000000000LL, &out),
                 0);
    cr_expect(strstr(out.base, "Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n") != NULL, "%s",
              out.base);
    cr_expect(strstr(out.base, "@b.test>\r\n") != NULL);
    cr_expect(strstr(out.base, "MIME-Version: 1.0\r\n") != NULL);
    cr_expect(strstr(out.base, "Content-Transfer-Encoding: base64\r\n") != NULL);
    for (size_t i = 0; i < out.len; i++)
        if (out.base[i] == '\n')
            cr_assert(i > 0 && out.base[i - 1] == '\r', "a bare LF at %zu", i);
    char subj[512];
    subject_of(out.base, subj, sizeof(subj));
    cr_expect_str_eq(subj, subject);
    char body[256];
    body_of(out.base, body, sizeof(body));
    cr_expect_str_eq(body, "line one\r\nline two\r\n");
    bg_buf_reset(&out);
    cr_expect_eq(
        bg_notify_mail_build("a@b.test", "x@y.test\r\nBcc: z@evil.test", "s", "t", 0, &out),
        BG_ERR_INVALID);
    cr_expect_eq(bg_notify_mail_build("a@b.test", "<x@y.test>", "s", "t", 0, &out), BG_ERR_INVALID);
    bg_buf_dispose(&out);
}

Test(notify, a_telegram_403_marks_the_chat_blocked_and_the_message_is_skipped)
{
    char *user = new_user(NULL, "en");
    link_telegram(user);
    char url[200];
    snprintf(url, sizeof(url), "%s/control/fail", S.tg_url);
    const char *fail = "{\"method\":\"sendMessage\",\"status\":403,\"count\":1}";
    const char *h[] = {"Content-Type: application/json", NULL};
    bgt_resp_t r;
    cr_assert_eq(bgt_http(BGT_H1, "POST", url, h, fail, strlen(fail), &r), 0);
    bgt_resp_free(&r);
    char *ev = txn_event("evt_b_01", "transaction.completed", "2026-04-12T10:18:50.000000Z",
                         "txn_b_1", "sub_b", "500", P1, user, false);
    deliver(ev);
    cr_assert_eq(produce(), 2, "web and telegram: the user has no e-mail address");
    bg_notify_counts_t c = send_due();
    cr_expect_eq(c.skipped, 1);
    const char *up[] = {user};
    char *st = q("SELECT status FROM notifications WHERE user_id = $1::uuid AND "
                 "channel = 'telegram'",
                 1, up);
    cr_expect_str_eq(st, "skipped");
    free(st);
    cr_expect_eq(qn("SELECT count(*) FROM telegram_chats WHERE chat_id = " CHAT_ID
                    " AND blocked_at IS NOT NULL",
                    0, NULL),
                 1, "the chat is marked blocked");
    /* a later fact finds no unblocked chat: no Telegram row at all */
    char *ev2 = txn_event("evt_b_02", "transaction.completed", "2026-05-12T10:18:50.000000Z",
                          "txn_b_2", "sub_b", "500", P2, user, false);
    deliver(ev2);
    cr_expect_eq(produce(), 1, "only the in-app notification");
    free(ev);
    free(ev2);
    free(user);
}
