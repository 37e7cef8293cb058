/*
 * Notifications: the producer, the sender (SMTP through libcurl, Telegram through bg/telegram.h's
 * client) and the reads behind GET /notifications (see bg/notify.h and docs/notifications.md).
 *
 * The producer is set-based: one statement per page of inbox rows turns applied events into facts
 * (kind, fact key, user, payload) and inserts a row per channel with ON CONFLICT (dedupe_key) DO
 * NOTHING, so the rules that decide what is news live in one place and cannot double anything.
 * Postgres reads the payloads with jsonb operators; values that might not cast (ids, amounts) are
 * checked with a pattern first, so a strange event produces nothing instead of stopping the pass.
 *
 * The sender holds the row lock while it talks to the SMTP server or Telegram: a worker that dies
 * mid-send rolls back, and the row is taken again (at least once; a mail can be sent twice only
 * when the process dies between the server's "250" and the commit).
 */
#include "bg/notify.h"

#include <curl/curl.h>
#include <inttypes.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/i18n.h"
#include "bg/id.h"
#include "bg/json.h"
#include "bg/log.h"
#include "bg/pg.h"
#include "bg/telegram.h"
#include "bg/timeutil.h"

#define MAIL_MAX (256 * 1024)
#define TEXT_MAX (16 * 1024)
#define PARAMS_MAX 16
#define RETRY_MAX_MS (6LL * 3600 * 1000)
#define PACE_SCRIPT "lua/telegram_pace.lua"
#define PACE_WAIT_MAX_MS 5000
/* The telegram role's pacers (role_telegram.c): a chat about once a second, a bot about 30/s. */
#define CHAT_INTERVAL_MS 1000
#define BOT_INTERVAL_MS 34
#define BOT_BURST 30

/* ---- producing ---- */

/* The channels of one user u (a users row in scope): web always, email when there is an address,
 * telegram through the newest private chat with an active bot that is not blocked. */
#define CHANNELS                                                                                   \
    "CROSS JOIN LATERAL (SELECT 'web'::text AS channel, '{}'::jsonb AS extra "                     \
    "  UNION ALL SELECT 'email', '{}'::jsonb WHERE u.email IS NOT NULL "                           \
    "  UNION ALL (SELECT 'telegram', jsonb_build_object('bot_id', tc.bot_id::text, "               \
    "    'chat_id', tc.chat_id::text) FROM telegram_accounts ta "                                  \
    "    JOIN telegram_chats tc ON tc.telegram_user_id = ta.telegram_user_id "                     \
    "    JOIN telegram_bots b ON b.id = tc.bot_id AND b.status = 'active' "                        \
    "    WHERE ta.user_id = u.id AND tc.type = 'private' AND tc.blocked_at IS NULL "               \
    "    ORDER BY tc.updated_at DESC LIMIT 1)) ch "

/* A fact key kept short enough for dedupe_key (200) with the channel appended. */
#define FACT_KEY(expr)                                                                             \
    "CASE WHEN length(" expr ") > 180 THEN 'h:' || md5(" expr ") ELSE " expr " END"

#define INSERT_ROWS                                                                                \
    "INSERT INTO notifications (user_id, channel, kind, dedupe_key, locale, payload, status, "     \
    "  sent_at) "

#define ROW_VALUES                                                                                 \
    "CASE ch.channel WHEN 'web' THEN 'sent' ELSE 'pending' END, "                                  \
    "CASE ch.channel WHEN 'web' THEN now() END "

/*
 * One page of the inbox after ($1, $2), at most $3 rows: inserts the rows of its facts and
 * returns the page's size, its last key and the rows inserted.
 */
static const char page_sql[] =
    "WITH page AS (SELECT i.id, i.event_type, coalesce(i.outcome, '') AS outcome, i.processed_at, "
    "  CASE WHEN jsonb_typeof(i.payload -> 'data') = 'object' THEN i.payload -> 'data' "
    "    ELSE '{}'::jsonb END AS d "
    "  FROM webhook_inbox i WHERE i.provider = 'paddle' AND i.processed_at IS NOT NULL "
    "  AND (i.processed_at, i.id) > ($1::timestamptz, $2::bigint) "
    "  ORDER BY i.processed_at, i.id LIMIT $3::int), "
    "fact AS (SELECT p.d, "
    "  CASE p.event_type WHEN 'transaction.completed' THEN 'payment_succeeded' "
    "    WHEN 'transaction.payment_failed' THEN 'payment_failed' "
    "    WHEN 'subscription.canceled' THEN 'subscription_canceled' "
    "    ELSE 'subscription_renewed' END AS kind, "
    "  CASE p.event_type WHEN 'transaction.completed' THEN 'payment_succeeded:' || (p.d ->> 'id') "
    "    WHEN 'transaction.payment_failed' THEN 'payment_failed:inbox:' || p.id "
    "    WHEN 'subscription.canceled' THEN 'subscription_canceled:' || (p.d ->> 'id') "
    "    ELSE 'subscription_renewed:' || (p.d ->> 'id') || ':' || "
    "      (p.d -> 'current_billing_period' ->> 'starts_at') END AS fact, "
    "  CASE WHEN p.event_type LIKE 'subscription.%' THEN p.d ->> 'id' "
    "    ELSE p.d ->> 'subscription_id' END AS sub_id "
    "  FROM page p WHERE "
    "  (p.event_type = 'transaction.completed' AND p.outcome IN ('applied', 'recorded') "
    "    AND p.d ->> 'id' IS NOT NULL) "
    "  OR (p.event_type = 'transaction.payment_failed' AND p.outcome IN ('applied', 'recorded')) "
    "  OR (p.event_type = 'subscription.canceled' AND p.outcome = 'applied' "
    "    AND p.d ->> 'id' IS NOT NULL) "
    /* renewed: an active snapshot whose billing period starts later than one seen before */
    "  OR (p.event_type = 'subscription.updated' AND p.outcome = 'applied' "
    "    AND p.d ->> 'status' = 'active' "
    "    AND p.d -> 'current_billing_period' ->> 'starts_at' IS NOT NULL "
    "    AND EXISTS (SELECT 1 FROM webhook_inbox o WHERE o.provider = 'paddle' "
    "      AND o.event_type LIKE 'subscription.%' AND o.payload -> 'data' ->> 'id' = p.d ->> 'id' "
    "      AND o.payload -> 'data' -> 'current_billing_period' ->> 'starts_at' "
    "        < p.d -> 'current_billing_period' ->> 'starts_at'))), "
    /* the user as the billing worker finds it: custom_data, the subscription, the customer */
    "who AS (SELECT f.*, (SELECT x.uid FROM ("
    "    SELECT 1 AS o, u.id AS uid FROM users u WHERE u.deleted_at IS NULL AND u.id = CASE "
    "      WHEN f.d -> 'custom_data' ->> 'user_id' ~* "
    "        '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' "
    "      THEN (f.d -> 'custom_data' ->> 'user_id')::uuid END "
    "    UNION ALL SELECT 2, s.user_id FROM subscriptions s "
    "      WHERE s.paddle_subscription_id = f.sub_id "
    "    UNION ALL SELECT 3, b.user_id FROM billing_accounts b "
    "      WHERE b.paddle_customer_id = f.d ->> 'customer_id' AND b.user_id IS NOT NULL) x "
    "    ORDER BY x.o LIMIT 1) AS user_id FROM fact f), "
    "facts AS (SELECT w.user_id, w.kind, " FACT_KEY(
        "w.fact") " AS fact, jsonb_build_object("
                  "  'amount', CASE WHEN w.d -> 'details' -> 'totals' ->> 'grand_total' ~ "
                  "'^[0-9]{1,15}$' "
                  "    THEN to_char((w.d -> 'details' -> 'totals' ->> 'grand_total')::numeric / "
                  "100, "
                  "      'FM999999999999990.00') ELSE '' END, "
                  "  'currency', coalesce(w.d ->> 'currency_code', "
                  "    w.d -> 'details' -> 'totals' ->> 'currency_code', ''), "
                  "  'plan', coalesce((SELECT pl.name FROM subscriptions s JOIN plans pl ON pl.id "
                  "= s.plan_id "
                  "      WHERE s.paddle_subscription_id = w.sub_id), "
                  "    (SELECT pl.name FROM plans pl "
                  "      WHERE pl.paddle_price_id = w.d -> 'items' -> 0 -> 'price' ->> 'id'), ''), "
                  "  'date', left(coalesce(w.d -> 'current_billing_period' ->> 'ends_at', "
                  "    w.d -> 'billing_period' ->> 'ends_at', w.d ->> 'canceled_at', ''), 10)) AS "
                  "payload "
                  "  FROM who w WHERE w.user_id IS NOT NULL AND w.fact IS NOT NULL), "
                  "ins AS (" INSERT_ROWS
                  "SELECT f.user_id, ch.channel, f.kind, f.fact || ':' || ch.channel, "
                  "  u.locale, f.payload || ch.extra, " ROW_VALUES "FROM facts f "
                  "  JOIN users u ON u.id = f.user_id AND u.deleted_at IS NULL " CHANNELS
                  "  ON CONFLICT (dedupe_key) DO NOTHING RETURNING 1) "
                  "SELECT (SELECT count(*) FROM page), "
                  "  (SELECT processed_at::text FROM page ORDER BY processed_at DESC, id DESC "
                  "LIMIT 1), "
                  "  (SELECT id FROM page ORDER BY processed_at DESC, id DESC LIMIT 1), "
                  "  (SELECT count(*) FROM ins)";

/* Trials ending within $1 seconds: one fact per subscription and end date. */
static const char trial_sql[] =
    "WITH t AS (SELECT s.id, s.user_id, s.plan_id, "
    "  to_char(s.trial_ends_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day FROM subscriptions s "
    "  WHERE s.status = 'trialing' AND s.trial_ends_at > now() "
    "  AND s.trial_ends_at <= now() + make_interval(secs => $1::double precision)) " INSERT_ROWS
    "SELECT t.user_id, ch.channel, 'trial_ending', "
    "  'trial_ending:' || t.id || ':' || t.day || ':' || ch.channel, u.locale, "
    "  jsonb_build_object('date', t.day, 'plan', coalesce(pl.name, t.plan_id)) || "
    "ch.extra, " ROW_VALUES "FROM t JOIN users u ON u.id = t.user_id AND u.deleted_at IS NULL "
    "LEFT JOIN plans pl ON pl.id = t.plan_id " CHANNELS "ON CONFLICT (dedupe_key) DO NOTHING";

static int64_t count_of(PGresult *res, int col)
{
    int64_t v = 0;
    if (bg_pg_int64(res, 0, col, &v) != 0)
        v = 0;
    return v;
}

static int produce_inbox(PGconn *c, int64_t *created)
{
    /* where to start: the cursor, less the overlap (see bg/notify.h) */
    char overlap[16];
    snprintf(overlap, sizeof(overlap), "%d", BG_NOTIFY_OVERLAP_S);
    const char *cp[] = {BG_NOTIFY_CURSOR, overlap};
    PGresult *res;
    int rc = bg_pg_exec(c,
                        "WITH ins AS (INSERT INTO notification_cursors (name, position_at) "
                        "  VALUES ($1, now()) ON CONFLICT (name) DO NOTHING "
                        "  RETURNING position_at, position_id) "
                        "SELECT (position_at - make_interval(secs => $2::int))::text, 0 FROM ins "
                        "UNION ALL SELECT (position_at - make_interval(secs => $2::int))::text, 0 "
                        "  FROM notification_cursors WHERE name = $1",
                        2, cp, &res);
    if (rc != 0)
        return rc;
    char at[64], id[24] = "0";
    (void)bg_strlcpy(at, PQntuples(res) > 0 ? bg_pg_value(res, 0, 0) : "now", sizeof(at));
    PQclear(res);

    char limit[16];
    snprintf(limit, sizeof(limit), "%d", BG_NOTIFY_PAGE);
    bool moved = false;
    for (;;) {
        const char *pp[] = {at, id, limit};
        rc = bg_pg_exec(c, page_sql, 3, pp, &res);
        if (rc != 0)
            return rc;
        int64_t n = count_of(res, 0);
        if (n > 0) {
            (void)bg_strlcpy(at, bg_pg_value(res, 0, 1), sizeof(at));
            (void)bg_strlcpy(id, bg_pg_value(res, 0, 2), sizeof(id));
            moved = true;
        }
        *created += count_of(res, 3);
        PQclear(res);
        if (n < BG_NOTIFY_PAGE)
            break;
    }
    if (!moved)
        return 0;
    const char *up[] = {BG_NOTIFY_CURSOR, at, id};
    return bg_pg_run(c,
                     "UPDATE notification_cursors SET position_at = $2::timestamptz, "
                     "position_id = $3::bigint WHERE name = $1 "
                     "AND (position_at, position_id) < ($2::timestamptz, $3::bigint)",
                     3, up);
}

int bg_notify_produce(PGconn *c, int64_t *created)
{
    int64_t n = 0;
    int rc = produce_inbox(c, &n);
    if (rc == 0) {
        char notice[16];
        snprintf(notice, sizeof(notice), "%d", BG_NOTIFY_TRIAL_NOTICE_S);
        const char *tp[] = {notice};
        PGresult *res;
        rc = bg_pg_exec(c, trial_sql, 1, tp, &res);
        if (rc == 0) {
            const char *t = PQcmdTuples(res);
            n += t != NULL ? strtoll(t, NULL, 10) : 0;
            PQclear(res);
        }
    }
    if (created != NULL)
        *created = n;
    if (n > 0)
        bg_info("notify: %" PRId64 " notification(s) produced", n);
    return rc;
}

/* ---- rendering ---- */

int bg_notify_render(const char *locale, const char *kind, const char *payload, bg_buf_t *title,
                     bg_buf_t *body)
{
    bg_json_doc_t *doc = NULL;
    const char *err_desc = NULL;
    int rc = bg_json_parse(payload, strlen(payload), NULL, &doc, &err_desc, NULL);
    if (rc != 0)
        return BG_ERR_INVALID;
    const bg_json_t *root = bg_json_root(doc);
    if (!bg_json_is_object(root)) {
        bg_json_doc_free(doc);
        return BG_ERR_INVALID;
    }
    const char *params[2 * PARAMS_MAX + 1];
    size_t np = 0;
    for (size_t i = 0; i < bg_json_len(root) && np < 2 * PARAMS_MAX; i++) {
        const char *key = NULL;
        const bg_json_t *v = bg_json_member(root, i, &key);
        const char *s = bg_json_str(v, NULL);
        if (s == NULL)
            continue;
        params[np++] = key;
        params[np++] = s;
    }
    params[np] = NULL;
    char key[96];
    snprintf(key, sizeof(key), "notify.%s.title", kind);
    rc = bg_i18n_format(title, locale, key, params);
    snprintf(key, sizeof(key), "notify.%s.body", kind);
    if (rc == 0)
        rc = bg_i18n_format(body, locale, key, params);
    bg_json_doc_free(doc);
    return rc;
}

/* ---- mail ---- */

/* A plain address: one '@' with text on both sides, no spaces, brackets, quotes or controls. */
static bool plain_address(const char *s)
{
    if (s == NULL)
        return false;
    size_t len = strlen(s), ats = 0, at = 0;
    if (len < 3 || len > 254)
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch <= 0x20 || ch == 0x7f || strchr("<>()[]\\,;:\"", ch) != NULL)
            return false;
        if (ch == '@') {
            ats++;
            at = i;
        }
    }
    return ats == 1 && at > 0 && at < len - 1;
}

/* Appends len bytes as base64 (standard alphabet, padded). */
static int put_b64(bg_buf_t *out, const void *p, size_t len)
{
    size_t cap = sodium_base64_ENCODED_LEN(len, sodium_base64_VARIANT_ORIGINAL);
    char *tmp = bg_malloc(cap);
    (void)sodium_bin2base64(tmp, cap, p, len, sodium_base64_VARIANT_ORIGINAL);
    int rc = bg_buf_puts(out, tmp);
    free(tmp);
    return rc;
}

/* The length of a prefix of s (len bytes) of at most max bytes that ends on a character. */
static size_t utf8_cut(const char *s, size_t len, size_t max)
{
    if (len <= max)
        return len;
    size_t n = max;
    while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80)
        n--;
    return n > 0 ? n : max;
}

/* Subject: RFC 2047 "B" encoded words of at most 45 bytes each (60 characters encoded), folded. */
static int put_subject(bg_buf_t *out, const char *subject)
{
    int rc = bg_buf_puts(out, "Subject:");
    size_t len = strlen(subject);
    const char *p = subject;
    do {
        size_t n = utf8_cut(p, len, 45);
        rc |= bg_buf_puts(out, p == subject ? " =?UTF-8?B?" : "\r\n =?UTF-8?B?");
        rc |= put_b64(out, p, n);
        rc |= bg_buf_puts(out, "?=");
        p += n;
        len -= n;
    } while (len > 0);
    return rc | bg_buf_puts(out, "\r\n");
}

static void format_date(int64_t now_ms, char *out, size_t outlen)
{
    static const char *const days[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static const char *const months[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                         "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    time_t t = (time_t)(now_ms / 1000);
    struct tm tm;
    if (gmtime_r(&t, &tm) == NULL) {
        (void)bg_strlcpy(out, "Thu, 01 Jan 1970 00:00:00 +0000", outlen);
        return;
    }
    snprintf(out, outlen, "%s, %02d %s %04d %02d:%02d:%02d +0000", days[tm.tm_wday % 7], tm.tm_mday,
             months[tm.tm_mon % 12], tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
}

int bg_notify_mail_build(const char *from, const char *to, const char *subject, const char *text,
                         int64_t now_ms, bg_buf_t *out)
{
    if (!plain_address(from) || !plain_address(to))
        return BG_ERR_INVALID;
    char date[64], rnd[33];
    format_date(now_ms, date, sizeof(date));
    unsigned char raw[16];
    bg_crypto_random_bytes(raw, sizeof(raw));
    for (size_t i = 0; i < sizeof(raw); i++)
        snprintf(rnd + 2 * i, 3, "%02x", raw[i]);
    int rc = bg_buf_printf(out, "Date: %s\r\nMessage-ID: <%s@%s>\r\nFrom: <%s>\r\nTo: <%s>\r\n",
                           date, rnd, strchr(from, '@') + 1, from, to);
    rc |= put_subject(out, subject);
    rc |= bg_buf_puts(out, "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=UTF-8\r\n"
                           "Content-Transfer-Encoding: base64\r\nAuto-Submitted: auto-generated\r\n"
                           "\r\n");
    /* the canonical form of text is CRLF lines; base64 lines of 76 characters */
    bg_buf_t crlf;
    bg_buf_init(&crlf, MAIL_MAX);
    for (const char *p = text; *p != '\0'; p++) {
        if (*p == '\n' && (p == text || p[-1] != '\r'))
            rc |= bg_buf_putc(&crlf, '\r');
        rc |= bg_buf_putc(&crlf, *p);
    }
    for (size_t off = 0; rc == 0 && off < crlf.len; off += 57) {
        size_t n = crlf.len - off < 57 ? crlf.len - off : 57;
        rc |= put_b64(out, crlf.base + off, n);
        rc |= bg_buf_puts(out, "\r\n");
    }
    bg_buf_dispose(&crlf);
    return rc != 0 ? BG_ERR_TOO_LARGE : 0;
}

typedef struct st_upload {
    const char *p;
    size_t left;
} upload_t;

static size_t on_read(char *buf, size_t size, size_t nitems, void *ud)
{
    upload_t *u = ud;
    size_t n = size * nitems < u->left ? size * nitems : u->left;
    memcpy(buf, u->p, n);
    u->p += n;
    u->left -= n;
    return n;
}

static size_t on_discard(char *ptr, size_t size, size_t nmemb, void *ud)
{
    (void)ptr;
    (void)ud;
    return size * nmemb;
}

/*
 * One SMTP session delivering msg to to. Returns 0 when the server accepted it, BG_ERR_RETRY for
 * a transient failure (4xx, connection, timeout), BG_ERR_INVALID for a permanent one (5xx); err
 * says what happened.
 */
static int smtp_send(const bg_notify_opts_t *o, const char *to, const bg_buf_t *msg, char *err,
                     size_t errlen)
{
    CURL *h = curl_easy_init();
    if (h == NULL) {
        snprintf(err, errlen, "cannot create a curl handle");
        return BG_ERR_RETRY;
    }
    char from[300], rcpt_line[300];
    snprintf(from, sizeof(from), "<%s>", o->mail_from);
    snprintf(rcpt_line, sizeof(rcpt_line), "<%s>", to);
    struct curl_slist *rcpt = curl_slist_append(NULL, rcpt_line);
    upload_t up = {msg->base, msg->len};
    char cerr[CURL_ERROR_SIZE] = "";
    bool tls = strncmp(o->smtp_url, "smtps:", 6) == 0;
    bool creds = bg_str_present(o->smtp_user);
    (void)curl_easy_setopt(h, CURLOPT_URL, o->smtp_url);
    (void)curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "smtp,smtps");
    (void)curl_easy_setopt(h, CURLOPT_MAIL_FROM, from);
    (void)curl_easy_setopt(h, CURLOPT_MAIL_RCPT, rcpt);
    (void)curl_easy_setopt(h, CURLOPT_UPLOAD, 1L);
    (void)curl_easy_setopt(h, CURLOPT_READFUNCTION, on_read);
    (void)curl_easy_setopt(h, CURLOPT_READDATA, &up);
    (void)curl_easy_setopt(h, CURLOPT_INFILESIZE_LARGE, (curl_off_t)msg->len);
    (void)curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_discard);
    (void)curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    (void)curl_easy_setopt(h, CURLOPT_ERRORBUFFER, cerr);
    (void)curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)o->timeout_ms);
    (void)curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, (long)(o->timeout_ms / 2 + 1));
    /* smtps:// is TLS from the first byte; on smtp:// STARTTLS is used when the server offers it,
     * and required when there are credentials to send */
    if (!tls)
        (void)curl_easy_setopt(h, CURLOPT_USE_SSL,
                               creds ? (long)CURLUSESSL_ALL : (long)CURLUSESSL_TRY);
    if (creds) {
        (void)curl_easy_setopt(h, CURLOPT_USERNAME, o->smtp_user);
        (void)curl_easy_setopt(h, CURLOPT_PASSWORD,
                               o->smtp_password != NULL ? o->smtp_password : "");
    }
    CURLcode cc = curl_easy_perform(h);
    long code = 0;
    (void)curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
    curl_slist_free_all(rcpt);
    curl_easy_cleanup(h);
    if (cc == CURLE_OK)
        return 0;
    snprintf(err, errlen, "smtp %ld: %s", code, cerr[0] != '\0' ? cerr : curl_easy_strerror(cc));
    if (code >= 500 && code <= 599)
        return BG_ERR_INVALID;
    return BG_ERR_RETRY;
}

/* ---- telegram ---- */

/* Takes a slot of pacer key; returns the ms to wait (0: go). Without Redis, or when it fails, go.
 */
static int64_t pace(bg_redis_t *r, const char *key, int64_t interval, int64_t burst, int64_t hold)
{
    if (r == NULL)
        return 0;
    char now[24], iv[24], bu[24], ho[24];
    snprintf(now, sizeof(now), "%" PRId64, bg_timeutil_wall_ms());
    snprintf(iv, sizeof(iv), "%" PRId64, interval);
    snprintf(bu, sizeof(bu), "%" PRId64, burst);
    snprintf(ho, sizeof(ho), "%" PRId64, hold);
    const char *keys[] = {key};
    const char *args[] = {now, iv, bu, ho};
    redisReply *reply = NULL;
    int rc = bg_redis_script(r, PACE_SCRIPT, 1, keys, 4, args, &reply);
    int64_t wait = 0;
    if (reply != NULL) {
        if (rc == 0 && reply->type == REDIS_REPLY_INTEGER)
            wait = reply->integer;
        freeReplyObject(reply);
    }
    return wait;
}

static void sleep_ms(int64_t ms)
{
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

/* Waits for the chat's and the bot's pacers, at most PACE_WAIT_MAX_MS in all; false when paced. */
static bool take_slot(bg_redis_t *r, const char *slug, const char *chat)
{
    char key[160];
    int64_t waited = 0;
    snprintf(key, sizeof(key), "bg:tg:pace:%s:%s", slug, chat);
    for (int64_t ms; (ms = pace(r, key, CHAT_INTERVAL_MS, 1, 0)) > 0;) {
        if (waited + ms > PACE_WAIT_MAX_MS)
            return false;
        sleep_ms(ms);
        waited += ms;
    }
    snprintf(key, sizeof(key), "bg:tg:pace:%s", slug);
    for (int64_t ms; (ms = pace(r, key, BOT_INTERVAL_MS, BOT_BURST, 0)) > 0;) {
        if (waited + ms > PACE_WAIT_MAX_MS)
            return false;
        sleep_ms(ms);
        waited += ms;
    }
    return true;
}

/*
 * sendMessage of text to the row's chat through its bot. Returns 0 when sent, BG_ERR_DENIED when
 * the chat is blocked or the bot gone (skipped), BG_ERR_RETRY for a transient failure (with
 * *retry_ms when Telegram said how long to wait), BG_ERR_INVALID when Telegram refused it for good.
 */
static int tg_send(PGconn *c, const bg_notify_opts_t *o, const char *bot_id, const char *chat,
                   const char *text, int64_t *retry_ms, char *err, size_t errlen)
{
    const char *p[] = {bot_id, chat};
    PGresult *res;
    int rc = bg_pg_exec(c,
                        "SELECT b.token, b.slug, tc.blocked_at IS NOT NULL FROM telegram_bots b "
                        "JOIN telegram_chats tc ON tc.bot_id = b.id AND tc.chat_id = $2::bigint "
                        "WHERE b.id = $1::uuid AND b.status = 'active'",
                        2, p, &res);
    if (rc != 0) {
        snprintf(err, errlen, "database: %s", bg_strerror(rc));
        return rc == BG_ERR_INVALID ? BG_ERR_DENIED : BG_ERR_RETRY;
    }
    if (PQntuples(res) == 0 || strcmp(bg_pg_value(res, 0, 2), "t") == 0) {
        snprintf(err, errlen,
                 PQntuples(res) == 0 ? "the bot or the chat is gone" : "the chat is blocked");
        PQclear(res);
        return BG_ERR_DENIED;
    }
    char token[BG_TG_TOKEN_SIZE], slug[BG_TG_SLUG_SIZE + 48];
    (void)bg_strlcpy(token, bg_pg_value(res, 0, 0), sizeof(token));
    (void)bg_strlcpy(slug, bg_pg_value(res, 0, 1), sizeof(slug));
    PQclear(res);
    bg_tg_client_t *cl = NULL;
    rc = bg_tg_client_new(o->telegram_api_url, token, o->timeout_ms, &cl);
    bg_crypto_wipe(token, sizeof(token));
    if (rc != 0) {
        snprintf(err, errlen, "cannot make a Bot API client");
        return BG_ERR_INVALID;
    }
    if (!take_slot(o->redis, slug, chat)) {
        bg_tg_client_free(cl);
        snprintf(err, errlen, "paced");
        *retry_ms = CHAT_INTERVAL_MS;
        return BG_ERR_RETRY;
    }
    bg_buf_t body;
    bg_buf_init(&body, TEXT_MAX * 2);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &body);
    bg_json_write_begin_object(&w);
    bg_json_write_key(&w, "chat_id");
    bg_json_write_int(&w, strtoll(chat, NULL, 10));
    size_t len = strlen(text);
    bg_json_write_key(&w, "text");
    bg_json_write_strn(&w, text, bg_tg_split(text, len, BG_TG_TEXT_MAX));
    bg_json_write_end_object(&w);
    bg_tg_result_t r;
    memset(&r, 0, sizeof(r));
    rc = bg_json_write_finish(&w);
    if (rc == 0)
        rc = bg_tg_client_call(cl, "sendMessage", body.base, &r);
    bg_buf_dispose(&body);
    bg_tg_client_free(cl);
    if (rc != 0) {
        snprintf(err, errlen, "telegram: %s", bg_strerror(rc));
        return BG_ERR_RETRY;
    }
    if (r.ok)
        return 0;
    snprintf(err, errlen, "telegram %" PRId64 ": %s", r.error_code, r.description);
    if (r.error_code == 429) {
        int64_t after = r.retry_after_s > 0 ? r.retry_after_s : 1;
        char key[160];
        snprintf(key, sizeof(key), "bg:tg:pace:%s:%s", slug, chat);
        (void)pace(o->redis, key, CHAT_INTERVAL_MS, 1, after * 1000);
        *retry_ms = after * 1000;
        return BG_ERR_RETRY;
    }
    if (r.error_code == 403) {
        if (bg_tg_chat_block(c, bot_id, strtoll(chat, NULL, 10)) != 0)
            bg_warn("notify: cannot mark chat %s of bot %s blocked", chat, bot_id);
        return BG_ERR_DENIED;
    }
    return r.error_code >= 500 ? BG_ERR_RETRY : BG_ERR_INVALID;
}

/* ---- sending ---- */

typedef struct st_row {
    char id[37];
    char channel[16];
    char kind[64];
    char locale[16];
    char *payload; /* owned */
    int64_t attempts;
    char email[256];
} row_t;

static const char *payload_str(const char *payload, const char *key, char *out, size_t outlen)
{
    out[0] = '\0';
    bg_json_doc_t *doc = NULL;
    const char *err_desc = NULL;
    if (bg_json_parse(payload, strlen(payload), NULL, &doc, &err_desc, NULL) != 0)
        return out;
    const char *s = NULL;
    if (bg_json_get_str(bg_json_root(doc), key, &s) == 0)
        (void)bg_strlcpy(out, s, outlen);
    bg_json_doc_free(doc);
    return out;
}

/* Sends one row; returns the row's new status and fills err and *retry_ms. */
static const char *send_row(PGconn *c, const bg_notify_opts_t *o, const row_t *row,
                            int64_t *retry_ms, char *err, size_t errlen)
{
    bg_buf_t title, body;
    bg_buf_init(&title, TEXT_MAX);
    bg_buf_init(&body, TEXT_MAX);
    const char *status = "failed";
    int rc = bg_notify_render(row->locale, row->kind, row->payload, &title, &body);
    if (rc != 0) {
        snprintf(err, errlen, "cannot render: %s", bg_strerror(rc));
        goto out;
    }
    if (strcmp(row->channel, "email") == 0) {
        if (!bg_str_present(o->smtp_url) || !bg_str_present(o->mail_from)) {
            snprintf(err, errlen, "mail is off (no BG_SMTP_URL)");
            status = "skipped";
            goto out;
        }
        if (row->email[0] == '\0') {
            snprintf(err, errlen, "the user has no e-mail address");
            status = "skipped";
            goto out;
        }
        bg_buf_t text, msg;
        bg_buf_init(&text, TEXT_MAX * 2);
        bg_buf_init(&msg, MAIL_MAX);
        const char *fp[] = {"url", o->public_url != NULL ? o->public_url : "", NULL};
        rc = bg_buf_printf(&text, "%s\n\n", body.base != NULL ? body.base : "");
        rc |= bg_i18n_format(&text, row->locale, "notify.mail.footer", fp);
        rc |= bg_buf_puts(&text, "\n");
        if (rc == 0)
            rc =
                bg_notify_mail_build(o->mail_from, row->email, title.base != NULL ? title.base : "",
                                     text.base, bg_timeutil_wall_ms(), &msg);
        if (rc != 0) {
            snprintf(err, errlen, "cannot build the mail: %s", bg_strerror(rc));
        } else {
            rc = smtp_send(o, row->email, &msg, err, errlen);
            status = rc == 0 ? "sent" : rc == BG_ERR_RETRY ? "pending" : "failed";
        }
        bg_buf_dispose(&text);
        bg_buf_dispose(&msg);
    } else if (strcmp(row->channel, "telegram") == 0) {
        char bot[64], chat[32];
        payload_str(row->payload, "bot_id", bot, sizeof(bot));
        payload_str(row->payload, "chat_id", chat, sizeof(chat));
        if (!bg_id_uuid_is_valid(bot) || chat[0] == '\0') {
            snprintf(err, errlen, "no chat to send to");
            status = "skipped";
            goto out;
        }
        bg_buf_t text;
        bg_buf_init(&text, TEXT_MAX * 2);
        rc = bg_buf_printf(&text, "%s\n\n%s", title.base != NULL ? title.base : "",
                           body.base != NULL ? body.base : "");
        if (rc == 0) {
            rc = tg_send(c, o, bot, chat, text.base, retry_ms, err, errlen);
            status = rc == 0               ? "sent"
                     : rc == BG_ERR_RETRY  ? "pending"
                     : rc == BG_ERR_DENIED ? "skipped"
                                           : "failed";
        }
        bg_buf_dispose(&text);
    } else {
        status = "sent";
    }
out:
    bg_buf_dispose(&title);
    bg_buf_dispose(&body);
    return status;
}

/* Takes one due row, sends it and records the outcome. Returns 1 when a row was handled, 0 when
 * none is due, or a database error. */
static int send_one(PGconn *c, const bg_notify_opts_t *o, const char *pass_at,
                    bg_notify_counts_t *counts)
{
    int rc = bg_pg_begin(c);
    if (rc != 0)
        return rc;
    PGresult *res;
    const char *sp[] = {pass_at};
    rc = bg_pg_exec(c,
                    "SELECT n.id, n.channel, n.kind, n.locale, n.payload::text, n.attempts, "
                    "  coalesce(u.email, '') FROM notifications n "
                    "LEFT JOIN users u ON u.id = n.user_id AND u.deleted_at IS NULL "
                    "WHERE n.status = 'pending' AND n.send_after <= $1::timestamptz "
                    "ORDER BY n.send_after LIMIT 1 FOR UPDATE OF n SKIP LOCKED",
                    1, sp, &res);
    if (rc != 0) {
        bg_pg_rollback(c);
        return rc;
    }
    if (PQntuples(res) == 0) {
        PQclear(res);
        bg_pg_rollback(c);
        return 0;
    }
    row_t row;
    memset(&row, 0, sizeof(row));
    (void)bg_strlcpy(row.id, bg_pg_value(res, 0, 0), sizeof(row.id));
    (void)bg_strlcpy(row.channel, bg_pg_value(res, 0, 1), sizeof(row.channel));
    (void)bg_strlcpy(row.kind, bg_pg_value(res, 0, 2), sizeof(row.kind));
    (void)bg_strlcpy(row.locale, bg_pg_value(res, 0, 3), sizeof(row.locale));
    row.payload = bg_strdup(bg_pg_value(res, 0, 4));
    if (bg_pg_int64(res, 0, 5, &row.attempts) != 0)
        row.attempts = 0;
    (void)bg_strlcpy(row.email, bg_pg_value(res, 0, 6), sizeof(row.email));
    PQclear(res);

    char err[300] = "";
    int64_t retry_ms = 0;
    const char *status = send_row(c, o, &row, &retry_ms, err, sizeof(err));
    int64_t attempts = row.attempts + 1;
    if (strcmp(status, "pending") == 0) {
        if (attempts >= o->max_attempts) {
            status = "failed";
        } else {
            int64_t delay = o->retry_ms;
            for (int64_t i = 1; i < attempts && delay < RETRY_MAX_MS; i++)
                delay *= 2;
            if (delay > RETRY_MAX_MS)
                delay = RETRY_MAX_MS;
            delay += (int64_t)bg_crypto_random_uniform((uint32_t)(delay / 4 + 1));
            if (retry_ms > delay)
                retry_ms = retry_ms > RETRY_MAX_MS ? RETRY_MAX_MS : retry_ms;
            else
                retry_ms = delay;
        }
    }
    char delay_s[32];
    snprintf(delay_s, sizeof(delay_s), "%.3f", (double)retry_ms / 1000.0);
    const char *up[] = {row.id, status, err[0] != '\0' ? err : NULL, delay_s};
    rc = bg_pg_run(c,
                   "UPDATE notifications SET status = $2, attempts = attempts + 1, "
                   "last_error = left($3, 500), "
                   "sent_at = CASE WHEN $2 = 'sent' THEN now() END, "
                   "send_after = now() + make_interval(secs => $4::double precision) "
                   "WHERE id = $1::uuid",
                   4, up);
    if (rc == 0)
        rc = bg_pg_commit(c);
    else
        bg_pg_rollback(c);
    if (rc == 0) {
        if (strcmp(status, "sent") == 0)
            counts->sent++;
        else if (strcmp(status, "pending") == 0)
            counts->retried++;
        else if (strcmp(status, "skipped") == 0)
            counts->skipped++;
        else
            counts->failed++;
        if (strcmp(status, "sent") != 0)
            bg_info("notify: %s %s %s: %s (attempt %" PRId64 ")", row.channel, row.kind, row.id,
                    status, attempts);
        bg_debug("notify: %s %s %s: %s", row.channel, row.kind, row.id, err);
    }
    free(row.payload);
    return rc != 0 ? rc : 1;
}

int bg_notify_send_due(PGconn *c, const bg_notify_opts_t *o, int max, bg_notify_counts_t *out)
{
    bg_notify_counts_t counts = {0};
    if (out != NULL)
        *out = counts;
    /* rows due when the pass starts: a row retried during the pass waits for the next one */
    PGresult *res;
    int rc = bg_pg_exec(c, "SELECT now()::text", 0, NULL, &res);
    if (rc != 0)
        return rc;
    char pass_at[64];
    (void)bg_strlcpy(pass_at, bg_pg_value(res, 0, 0), sizeof(pass_at));
    PQclear(res);
    for (int i = 0; i < max; i++) {
        rc = send_one(c, o, pass_at, &counts);
        if (rc <= 0)
            break;
        rc = 0;
    }
    if (out != NULL)
        *out = counts;
    return rc;
}

/* ---- in-app ---- */

/* Parses "<unix µs>_<uuid>" into us (digits) and id. */
static bool parse_cursor(const char *cursor, char us[24], char id[37])
{
    const char *sep = strchr(cursor, '_');
    if (sep == NULL || sep == cursor || (size_t)(sep - cursor) > 18)
        return false;
    for (const char *p = cursor; p < sep; p++)
        if (*p < '0' || *p > '9')
            return false;
    memcpy(us, cursor, (size_t)(sep - cursor));
    us[sep - cursor] = '\0';
    if (!bg_id_uuid_is_valid(sep + 1) || strlen(sep + 1) != 36)
        return false;
    memcpy(id, sep + 1, 37);
    return true;
}

int bg_notify_list(PGconn *c, const char *user_id, const char *locale, const char *cursor,
                   int limit, bool unread_only, bg_buf_t *out)
{
    char us[24] = "", cid[37] = "";
    if (cursor != NULL && !parse_cursor(cursor, us, cid))
        return BG_ERR_INVALID;
    if (limit < 1 || limit > BG_NOTIFY_LIST_MAX)
        return BG_ERR_INVALID;
    char lim[16];
    snprintf(lim, sizeof(lim), "%d", limit + 1);
    const char *p[] = {user_id, cursor != NULL ? us : NULL, cursor != NULL ? cid : NULL,
                       unread_only ? "t" : "f", lim};
    PGresult *res;
    int rc = bg_pg_exec(
        c,
        "SELECT n.id, n.kind, n.payload::text, "
        "  to_char(n.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), "
        "  to_char(n.read_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), "
        "  (extract(epoch FROM n.created_at) * 1000000)::bigint, "
        "  (SELECT count(*) FROM notifications x WHERE x.user_id = $1::uuid "
        "    AND x.channel = 'web' AND x.read_at IS NULL) "
        "FROM notifications n WHERE n.user_id = $1::uuid AND n.channel = 'web' "
        "AND ($2::bigint IS NULL OR (n.created_at, n.id) < "
        "  ('epoch'::timestamptz + $2::bigint * interval '1 microsecond', $3::uuid)) "
        "AND (NOT $4::boolean OR n.read_at IS NULL) "
        "ORDER BY n.created_at DESC, n.id DESC LIMIT $5::int",
        5, p, &res);
    if (rc != 0)
        return rc;
    int n = PQntuples(res);
    int64_t unread = 0;
    if (n == 0) {
        /* the count comes with the rows; an empty page asks for it alone */
        PQclear(res);
        const char *up[] = {user_id};
        rc = bg_pg_exec(c,
                        "SELECT count(*) FROM notifications WHERE user_id = $1::uuid "
                        "AND channel = 'web' AND read_at IS NULL",
                        1, up, &res);
        if (rc != 0)
            return rc;
        unread = count_of(res, 0);
        PQclear(res);
        res = NULL;
    } else {
        unread = count_of(res, 6);
    }
    bg_json_writer_t w;
    bg_json_writer_init(&w, out);
    bg_json_write_begin_object(&w);
    bg_json_write_key(&w, "data");
    bg_json_write_begin_array(&w);
    int shown = n > limit ? limit : n;
    bg_buf_t title, body;
    bg_buf_init(&title, TEXT_MAX);
    bg_buf_init(&body, TEXT_MAX);
    for (int i = 0; i < shown; i++) {
        bg_buf_reset(&title);
        bg_buf_reset(&body);
        if (bg_notify_render(locale, bg_pg_value(res, i, 1), bg_pg_value(res, i, 2), &title,
                             &body) != 0) {
            bg_buf_reset(&title);
            bg_buf_reset(&body);
        }
        bg_json_write_begin_object(&w);
        bg_json_write_field_str(&w, "id", bg_pg_value(res, i, 0));
        bg_json_write_field_str(&w, "kind", bg_pg_value(res, i, 1));
        bg_json_write_key(&w, "title");
        bg_json_write_strn(&w, title.base != NULL ? title.base : "", title.len);
        bg_json_write_key(&w, "body");
        bg_json_write_strn(&w, body.base != NULL ? body.base : "", body.len);
        bg_json_write_field_str(&w, "created_at", bg_pg_value(res, i, 3));
        if (PQgetisnull(res, i, 4))
            bg_json_write_field_null(&w, "read_at");
        else
            bg_json_write_field_str(&w, "read_at", bg_pg_value(res, i, 4));
        bg_json_write_end_object(&w);
    }
    bg_buf_dispose(&title);
    bg_buf_dispose(&body);
    bg_json_write_end_array(&w);
    if (n > limit) {
        char next[64];
        snprintf(next, sizeof(next), "%s_%s", bg_pg_value(res, limit - 1, 5),
                 bg_pg_value(res, limit - 1, 0));
        bg_json_write_field_str(&w, "next_cursor", next);
    } else {
        bg_json_write_field_null(&w, "next_cursor");
    }
    bg_json_write_field_int(&w, "unread", unread);
    bg_json_write_end_object(&w);
    if (res != NULL)
        PQclear(res);
    return bg_json_write_finish(&w);
}

int bg_notify_mark_read(PGconn *c, const char *user_id, const char *const ids[], size_t n, bool all,
                        int64_t *updated)
{
    *updated = 0;
    if (!all && n == 0)
        return 0;
    bg_buf_t arr;
    bg_buf_init(&arr, 64 * (BG_NOTIFY_READ_IDS_MAX + 1));
    int rc = bg_buf_putc(&arr, '{');
    for (size_t i = 0; i < n && rc == 0; i++) {
        if (!bg_id_uuid_is_valid(ids[i])) {
            bg_buf_dispose(&arr);
            return BG_ERR_INVALID;
        }
        rc = bg_buf_printf(&arr, "%s%s", i > 0 ? "," : "", ids[i]);
    }
    rc |= bg_buf_putc(&arr, '}');
    if (rc != 0) {
        bg_buf_dispose(&arr);
        return BG_ERR_TOO_LARGE;
    }
    const char *p[] = {user_id, all ? "t" : "f", arr.base};
    PGresult *res;
    rc = bg_pg_exec(c,
                    "UPDATE notifications SET read_at = now() WHERE user_id = $1::uuid "
                    "AND channel = 'web' AND read_at IS NULL "
                    "AND ($2::boolean OR id = ANY ($3::uuid[]))",
                    3, p, &res);
    bg_buf_dispose(&arr);
    if (rc != 0)
        return rc;
    const char *t = PQcmdTuples(res);
    *updated = t != NULL ? strtoll(t, NULL, 10) : 0;
    PQclear(res);
    return 0;
}
