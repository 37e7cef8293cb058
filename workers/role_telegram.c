/*
 * The "telegram" role (role_telegram.h, docs/telegram.md).
 *
 * Order within a chat. The edge numbers each accepted update within its chat (seq) and puts every
 * update of a chat on one shard stream; handlers of that stream still run on several threads, so a
 * handler first waits until the chat's "done" counter (bg:{s<N>}:tg:done:<bot>:<chat>) reaches
 * seq − 1, and raises it to seq when it has finished. A redelivered update whose seq is done
 * already was handled: it is acknowledged without a second reply. A predecessor that never
 * finishes (dead-lettered) holds its chat up for ORDER_WAIT_MS at most. The done counter lives
 * shorter than the edge's seq counter, so it can never be ahead of a counter that restarted.
 *
 * A chat turn is the web's: the user message is stored in the chat's conversation (channel
 * "telegram"), the same admission script admits it against the same quota and enqueues the llm
 * job (its id is the update's job id, so a redelivery finds its stored message and, through the
 * marker bg:{s<N>}:tg:adm:<job id>, its admitted job instead of admitting it twice). Then the
 * handler follows the job's output (bg_turn_follow, bg/channel.h: the channel interface every
 * channel goes through, the job and its admission included) and shows it: "typing" every
 * TYPING_EVERY_MS, the text so far as one message edited when the chat's pacer allows (about once a
 * second), and at the end the whole text, always: an edit that fails becomes a new message, text
 * past 4,096 characters continues in more messages cut on paragraph, line or sentence boundaries.
 *
 * Pacing and retries. Every Bot API call takes a slot from the bot's pacer (about 30 a second) and
 * every message or edit one from the chat's (one a second); both are Lua GCRA limiters in Redis, so
 * all workers share them. A 429 pushes the chat's pacer back by retry_after; 5xx and transport
 * errors are retried with backoff; a 403 (the user blocked the bot) marks the chat blocked and
 * ends the update. Intermediate edits never wait: one that finds its chat paced is skipped, the
 * next one carries more text anyway.
 *
 * Rules for what is not a chat turn: commands are answered in every chat; plain text only in
 * private chats (in groups the bot answers commands only); a photo is a chat turn with the photo
 * as image input when the bot's agent accepts images (agents.accepts_images: fetched with getFile
 * and downloaded within Telegram's 20 MB, then passed as a data URL in the job's image_url); a
 * text file (.txt, .md, .csv, .json, source code…: bg_tg_is_text_file) of up to 64 KB of UTF-8 is
 * a chat turn whose message is the caption and the file's text in a code fence; other photos,
 * documents, voice, audio and video get a localized note of what the bot reads;
 * edited messages are ignored without a reply (the answer to the original stands); channel posts,
 * messages of bots and kinds the bot does not handle are ignored. Every callback query is
 * answered (answerCallbackQuery), even one whose message is inaccessible, since the client shows
 * a spinner until then.
 *
 * Account commands: /profile and /usage read the state the admission script counts; /plans shows
 * the plans on sale as an inline keyboard, and a chosen plan gets a Paddle checkout link made as
 * POST /billing/subscribe makes it (or a localized "online payment is not available" when
 * BG_PADDLE_API_KEY is unset); the quota, no-plan and feature refusals carry the same keyboard.
 * /link <code> joins the Telegram user to a web account (bg_tg_link); failed attempts are counted
 * per Telegram user (bg:{s<N>}:tg:linkfail:<id>, LINK_FAIL_MAX an hour) against guessing.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bg/accounts.h"
#include "bg/admission.h"
#include "bg/billing.h"
#include "bg/channel.h"
#include "bg/chat.h"
#include "bg/convseq.h"
#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/i18n.h"
#include "bg/jobout.h"
#include "bg/json.h"
#include "bg/log.h"
#include "bg/paddle.h"
#include "bg/pg.h"
#include "bg/plans.h"
#include "bg/policy.h"
#include "bg/redis.h"
#include "bg/telegram.h"
#include "bg/timeutil.h"
#include "role_telegram.h"

/* The default agent (migrations/0006) the quick-start bot serves. */
#define DEFAULT_AGENT_ID "00000000-0000-4000-8000-00000000a550"
#define PACE_SCRIPT "lua/telegram_pace.lua"
/* How long an update waits for the earlier ones of its chat. */
#define ORDER_WAIT_MS 60000
/* The done counter's life: shorter than the seq counter's week (see the top). */
#define DONE_TTL_S "518400"
#define TYPING_EVERY_MS 4000
#define CHAT_INTERVAL_MS 1000
#define BOT_INTERVAL_MS 34
#define BOT_BURST 30
/* How long a reply may take to finish before the chat is told it failed. */
#define REPLY_TIMEOUT_MS (10 * 60 * 1000)
/* How often a followed reply's chat is looked after: typing, a paced edit tried again. */
#define FOLLOW_TICK_MS 500
/* Attempts of one Bot API call (429s and 5xx), and the longest 429 wait honoured. */
#define CALL_ATTEMPTS 8
#define RETRY_AFTER_MAX_S 60
#define REPLY_MAX (512 * 1024)
/* Failed /link attempts a Telegram user may make in LINK_FAIL_WINDOW_S (guessing codes). */
#define LINK_FAIL_MAX 10
#define LINK_FAIL_WINDOW_S "3600"

typedef struct st_tg_role {
    char *database_url; /* owned */
    char *api_url;      /* owned */
    char *default_locale;
    char *config_slug; /* owned; the quick-start bot's slug, NULL when none */
    char *config_token;
    char *config_secret;
    char *paddle_api_url; /* owned; checkout links (/plans) */
    char *paddle_api_key; /* owned; secret, wiped on free; NULL: online payment is off */
    int shards;
    int64_t stream_maxlen;
} tg_role_t;

/* Per handler thread: the client of the last bot it talked to. */
typedef struct st_tg_thread {
    char slug[BG_TG_SLUG_SIZE];
    bg_tg_client_t *client;
} tg_thread_t;

/* One update being handled. */
typedef struct st_tg_ctx {
    tg_role_t *role;
    wk_job_t *job;
    PGconn *pg;
    bg_tg_bot_t bot;
    bg_tg_client_t *client; /* borrowed from the thread */
    bg_tg_update_t u;
    bg_tg_identity_t who;
    char locale[16];
    bool blocked; /* Telegram answered 403: send nothing more */
} tg_ctx_t;

static void sleep_ms(int64_t ms)
{
    if (ms <= 0)
        return;
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

/* ---- set-up ---- */

int wk_telegram_init(const bg_config_t *cfg, void **ud)
{
    if (!bg_str_present(cfg->database_url)) {
        bg_error("telegram: BG_DATABASE_URL is not set");
        return BG_ERR_CONFIG;
    }
    char err[256];
    if (bg_i18n_init(cfg->supported_locales, cfg->default_locale, err, sizeof(err)) != 0) {
        bg_error("telegram: %s", err);
        return BG_ERR_CONFIG;
    }
    tg_role_t *r = bg_calloc(1, sizeof(*r));
    r->database_url = bg_strdup(cfg->database_url);
    r->api_url = bg_strdup(cfg->telegram_api_url);
    r->default_locale = bg_strdup(cfg->default_locale);
    r->shards = cfg->shards;
    r->stream_maxlen = cfg->stream_maxlen;
    if (bg_str_present(cfg->paddle_api_key)) {
        r->paddle_api_url = bg_strdup(cfg->paddle_api_url != NULL ? cfg->paddle_api_url : "");
        r->paddle_api_key = bg_strdup(cfg->paddle_api_key);
    }
    if (bg_str_present(cfg->telegram_bot_token)) {
        char slug[BG_TG_SLUG_SIZE];
        if (bg_tg_token_slug(cfg->telegram_bot_token, slug) != 0 ||
            !bg_tg_secret_is_valid(cfg->telegram_webhook_secret)) {
            bg_error("telegram: BG_TELEGRAM_BOT_TOKEN must look like 123456:ABC… and "
                     "BG_TELEGRAM_WEBHOOK_SECRET be 1-256 characters of A-Z a-z 0-9 _ -");
            wk_telegram_dispose(r);
            return BG_ERR_CONFIG;
        }
        r->config_slug = bg_strdup(slug);
        r->config_token = bg_strdup(cfg->telegram_bot_token);
        r->config_secret = bg_strdup(cfg->telegram_webhook_secret);
        /* bound now when Postgres is up, else on the bot's first update */
        PGconn *c = NULL;
        if (bg_pg_connect(r->database_url, 1, &c, err, sizeof(err)) == 0) {
            int rc = bg_tg_bot_bind(c, r->config_token, r->config_secret, DEFAULT_AGENT_ID, NULL);
            if (rc != 0)
                bg_warn("telegram: cannot bind bot %s yet: %s", slug, bg_strerror(rc));
            else
                bg_info("telegram: bot %s serves the agent assistant", slug);
            PQfinish(c);
        }
    }
    *ud = r;
    return 0;
}

static void free_secret(char *s)
{
    if (s != NULL) {
        bg_crypto_wipe(s, strlen(s));
        free(s);
    }
}

void wk_telegram_dispose(void *ud)
{
    tg_role_t *r = ud;
    if (r == NULL)
        return;
    free(r->database_url);
    free(r->api_url);
    free(r->default_locale);
    free(r->config_slug);
    free_secret(r->config_token);
    free_secret(r->config_secret);
    free(r->paddle_api_url);
    free_secret(r->paddle_api_key);
    free(r);
}

void wk_telegram_thread_dispose(void *thread_state, void *ud)
{
    (void)ud;
    tg_thread_t *t = thread_state;
    if (t == NULL)
        return;
    bg_tg_client_free(t->client);
    free(t);
}

/* ---- localized text ---- */

/* Formats key in the context's locale into out (reset first). */
static void text_of(const tg_ctx_t *x, const char *key, const char *const params[], bg_buf_t *out)
{
    bg_buf_reset(out);
    if (bg_i18n_format(out, x->locale, key, params) != 0 || out->len == 0) {
        bg_buf_reset(out);
        if (bg_buf_puts(out, key) != 0)
            bg_buf_reset(out);
    }
}

static void format_time(int64_t ms, char *out, size_t outlen)
{
    if (bg_timeutil_format_rfc3339(out, outlen, ms, false) != 0) {
        bg_strlcpy(out, "-", outlen);
        return;
    }
    /* "2026-01-02T03:04:05Z" → "2026-01-02 03:04" */
    if (strlen(out) >= 16) {
        out[10] = ' ';
        out[16] = '\0';
    }
}

/* ---- pacing and the Bot API ---- */

/* Asks a pacer; returns the ms to wait (0: go, the call is counted). Redis errors let it go. */
static int64_t pace(tg_ctx_t *x, const char *key, int64_t interval, int64_t burst, int64_t hold)
{
    char now[24], iv[24], bu[24], ho[24];
    snprintf(now, sizeof(now), "%" PRId64, bg_timeutil_wall_ms());
    snprintf(iv, sizeof(iv), "%" PRId64, interval);
    snprintf(bu, sizeof(bu), "%" PRId64, burst);
    snprintf(ho, sizeof(ho), "%" PRId64, hold);
    const char *keys[] = {key};
    const char *args[] = {now, iv, bu, ho};
    redisReply *reply = NULL;
    int rc = bg_redis_script(x->job->redis, PACE_SCRIPT, 1, keys, 4, args, &reply);
    int64_t wait = 0;
    if (rc == 0 && reply->type == REDIS_REPLY_INTEGER)
        wait = reply->integer;
    else
        bg_debug("job %s: pacer unavailable (%s)", x->job->job_id,
                 rc != 0 ? bg_strerror(rc) : "bad reply");
    if (reply != NULL)
        freeReplyObject(reply);
    return wait;
}

static void chat_pacer(const tg_ctx_t *x, char *out, size_t outlen)
{
    snprintf(out, outlen, "bg:tg:pace:%s:%" PRId64, x->bot.slug, x->u.chat_id);
}

/*
 * Takes a slot of the bot's pacer and, when per_chat, of the chat's. With wait false, returns
 * false instead of waiting for the chat's slot.
 */
static bool take_slot(tg_ctx_t *x, bool per_chat, bool wait)
{
    if (per_chat) {
        char key[BG_REDIS_KEY_MAX];
        chat_pacer(x, key, sizeof(key));
        for (;;) {
            int64_t ms = pace(x, key, CHAT_INTERVAL_MS, 1, 0);
            if (ms <= 0)
                break;
            if (!wait)
                return false;
            sleep_ms(ms);
        }
    }
    char key[BG_REDIS_KEY_MAX];
    snprintf(key, sizeof(key), "bg:tg:pace:%s", x->bot.slug);
    for (;;) {
        int64_t ms = pace(x, key, BOT_INTERVAL_MS, BOT_BURST, 0);
        if (ms <= 0)
            return true;
        sleep_ms(ms);
    }
}

/*
 * Calls method with body (a JSON object text). per_chat: the call is a message or an edit of the
 * update's chat (paced per chat); wait false: give up rather than wait for the chat's slot or a
 * 429 (an intermediate edit). Returns 0 when Telegram accepted it (*out filled), BG_ERR_RETRY when
 * skipped (wait false), BG_ERR_DENIED when the bot is blocked (the chat is marked),
 * BG_ERR_INVALID when Telegram refused it for good (out has why), or BG_ERR_UNAVAILABLE after the
 * retries.
 */
static int call(tg_ctx_t *x, const char *method, const char *body, bool per_chat, bool wait,
                bg_tg_result_t *out)
{
    if (x->blocked)
        return BG_ERR_DENIED;
    int64_t backoff = 250;
    for (int attempt = 0; attempt < CALL_ATTEMPTS; attempt++) {
        if (!take_slot(x, per_chat, wait))
            return BG_ERR_RETRY;
        int rc = bg_tg_client_call(x->client, method, body, out);
        if (rc == 0 && out->ok)
            return 0;
        if (rc == 0 && out->error_code == 429) {
            int64_t after = out->retry_after_s > 0 ? out->retry_after_s : 1;
            if (after > RETRY_AFTER_MAX_S)
                after = RETRY_AFTER_MAX_S;
            bg_info("job %s: telegram %s: 429, retry after %" PRId64 " s", x->job->job_id, method,
                    after);
            if (per_chat && x->u.has_chat) {
                char key[BG_REDIS_KEY_MAX];
                chat_pacer(x, key, sizeof(key));
                (void)pace(x, key, CHAT_INTERVAL_MS, 1, after * 1000);
            }
            if (!wait)
                return BG_ERR_RETRY;
            if (!per_chat)
                sleep_ms(after * 1000);
            continue;
        }
        if (rc == 0 && out->error_code == 403) {
            bg_info("job %s: telegram %s: 403 (%s): the chat is blocked", x->job->job_id, method,
                    out->description);
            x->blocked = true;
            if (x->u.has_chat && bg_tg_chat_block(x->pg, x->bot.id, x->u.chat_id) != 0)
                bg_warn("job %s: cannot mark the chat blocked", x->job->job_id);
            return BG_ERR_DENIED;
        }
        if (rc == 0 && out->error_code < 500) {
            if (!bg_tg_is_not_modified(out))
                bg_info("job %s: telegram %s: %" PRId64 " %s", x->job->job_id, method,
                        out->error_code, out->description);
            return BG_ERR_INVALID;
        }
        /* 5xx, a transport error or an answer that is not the Bot API's: back off and retry */
        bg_info("job %s: telegram %s: %s, attempt %d", x->job->job_id, method,
                rc != 0 ? bg_strerror(rc) : "server error", attempt + 1);
        if (!wait)
            return BG_ERR_RETRY;
        sleep_ms(backoff + (int64_t)bg_crypto_random_uniform((uint32_t)backoff / 2 + 1));
        backoff = backoff * 2 > 8000 ? 8000 : backoff * 2;
    }
    return BG_ERR_UNAVAILABLE;
}

/* Starts a method body with the chat (and the topic of the update's message). */
static void body_begin(const tg_ctx_t *x, bg_json_writer_t *w)
{
    bg_json_write_begin_object(w);
    bg_json_write_field_int(w, "chat_id", x->u.chat_id);
    if (x->u.thread_id != 0 && strcmp(x->u.chat_type, "private") != 0)
        bg_json_write_field_int(w, "message_thread_id", x->u.thread_id);
}

/* sendMessage of len bytes of text, with an optional reply_markup (JSON text). */
static int send_text(tg_ctx_t *x, const char *text, size_t len, const char *markup, bool wait,
                     int64_t *message_id)
{
    bg_buf_t out;
    bg_buf_init(&out, REPLY_MAX);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    body_begin(x, &w);
    bg_json_write_key(&w, "text");
    bg_json_write_strn(&w, text, len);
    bg_json_write_end_object(&w);
    int rc = bg_json_write_finish(&w);
    if (rc == 0 && markup != NULL) {
        /* splice the markup in before the closing brace */
        out.len--;
        rc = bg_buf_printf(&out, ",\"reply_markup\":%s}", markup);
    }
    bg_tg_result_t res;
    if (rc == 0)
        rc = call(x, "sendMessage", out.base, true, wait, &res);
    if (rc == 0 && message_id != NULL)
        *message_id = res.message_id;
    bg_buf_dispose(&out);
    return rc;
}

static int edit_text(tg_ctx_t *x, int64_t message_id, const char *text, size_t len, bool wait)
{
    bg_buf_t out;
    bg_buf_init(&out, REPLY_MAX);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    bg_json_write_begin_object(&w);
    bg_json_write_field_int(&w, "chat_id", x->u.chat_id);
    bg_json_write_field_int(&w, "message_id", message_id);
    bg_json_write_key(&w, "text");
    bg_json_write_strn(&w, text, len);
    bg_json_write_end_object(&w);
    int rc = bg_json_write_finish(&w);
    bg_tg_result_t res;
    if (rc == 0) {
        rc = call(x, "editMessageText", out.base, true, wait, &res);
        if (rc == BG_ERR_INVALID && bg_tg_is_not_modified(&res))
            rc = 0;
    }
    bg_buf_dispose(&out);
    return rc;
}

static void typing(tg_ctx_t *x)
{
    bg_buf_t out;
    bg_buf_init(&out, 4096);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    body_begin(x, &w);
    bg_json_write_field_str(&w, "action", "typing");
    bg_json_write_end_object(&w);
    bg_tg_result_t res;
    if (bg_json_write_finish(&w) == 0)
        (void)call(x, "sendChatAction", out.base, false, false, &res);
    bg_buf_dispose(&out);
}

/* Sends a localized message; returns as call() (BG_ERR_DENIED and BG_ERR_INVALID end quietly). */
static int say(tg_ctx_t *x, const char *key, const char *const params[], const char *markup)
{
    bg_buf_t text;
    bg_buf_init(&text, 65536);
    text_of(x, key, params, &text);
    int rc = send_text(x, text.base, text.len, markup, true, NULL);
    bg_buf_dispose(&text);
    return rc == BG_ERR_DENIED || rc == BG_ERR_INVALID ? 0 : rc;
}

/* Delivers the whole of text: the first piece into message_id (or a new message), the rest new. */
static int deliver(tg_ctx_t *x, const char *text, size_t len, int64_t message_id)
{
    size_t off = 0;
    bool first = true;
    while (off < len) {
        size_t n = bg_tg_split(text + off, len - off, BG_TG_TEXT_MAX);
        int rc = BG_ERR_INVALID;
        if (first && message_id != 0)
            rc = edit_text(x, message_id, text + off, n, true);
        if (rc != 0 && rc != BG_ERR_DENIED)
            rc = send_text(x, text + off, n, NULL, true, NULL);
        if (rc == BG_ERR_DENIED || rc == BG_ERR_INVALID)
            return 0; /* blocked, or refused for good: nothing more can be shown */
        if (rc != 0)
            return rc;
        off += n;
        /* leading line breaks of the next piece would show as empty lines */
        while (off < len && (text[off] == '\n' || text[off] == ' '))
            off++;
        first = false;
    }
    return 0;
}

/* ---- order within a chat ---- */

static void done_key(const wk_job_t *job, const char *slug, const char *chat, char *out,
                     size_t outlen)
{
    snprintf(out, outlen, "bg:{s%d}:tg:done:%s:%s", job->shard, slug, chat);
}

/* Reads the chat's done counter into *done (0 when none). */
static int read_done(wk_job_t *job, const char *key, int64_t *done)
{
    redisReply *reply = NULL;
    const char *argv[] = {"GET", key};
    int rc = bg_redis_argv(job->redis, 2, argv, NULL, &reply);
    if (rc != 0)
        return rc;
    *done = 0;
    if (reply->type == REDIS_REPLY_STRING)
        *done = strtoll(reply->str, NULL, 10);
    else if (reply->type == REDIS_REPLY_ERROR)
        rc = BG_ERR_PROTOCOL;
    freeReplyObject(reply);
    return rc;
}

/*
 * Waits for the chat's turn of seq. Returns 0 to go on, BG_ERR_CONFLICT when seq was handled
 * already, or a Redis error.
 */
static int wait_turn(wk_job_t *job, const char *key, int64_t seq)
{
    uint64_t deadline = bg_timeutil_mono_ms() + ORDER_WAIT_MS;
    for (;;) {
        int64_t done = 0;
        int rc = read_done(job, key, &done);
        if (rc != 0)
            return rc;
        if (done >= seq)
            return BG_ERR_CONFLICT;
        if (done >= seq - 1)
            return 0;
        if (bg_timeutil_mono_ms() >= deadline) {
            bg_warn("job %s: update %" PRId64 " of its chat waited %d ms for %" PRId64
                    " to finish; going on",
                    job->job_id, seq, ORDER_WAIT_MS, done + 1);
            return 0;
        }
        sleep_ms(20);
    }
}

static int mark_done(wk_job_t *job, const char *key, int64_t seq)
{
    int64_t done = 0;
    int rc = read_done(job, key, &done);
    if (rc != 0 || done >= seq)
        return rc;
    char v[24];
    snprintf(v, sizeof(v), "%" PRId64, seq);
    const char *argv[] = {"SET", key, v, "EX", DONE_TTL_S};
    redisReply *reply = NULL;
    rc = bg_redis_argv(job->redis, 5, argv, NULL, &reply);
    if (reply != NULL)
        freeReplyObject(reply);
    return rc;
}

/* ---- commands ---- */

/* What the admission script holds for the user now: the compiled state, requests left, reset. */
typedef struct st_quota_now {
    bg_admission_state_t st;
    bool live; /* a plan (or trial) in force */
    int64_t remaining;
    int64_t reset_ms;
} quota_now_t;

static int quota_now(tg_ctx_t *x, quota_now_t *q)
{
    memset(q, 0, sizeof(*q));
    int64_t now = bg_timeutil_wall_ms();
    int rc = bg_policy_compile_user(x->pg, x->who.user_id, now, &q->st);
    if (rc != 0)
        return rc;
    q->live = (strcmp(q->st.status, "active") == 0 || strcmp(q->st.status, "trialing") == 0) &&
              !(q->st.w_until > 0 && now >= q->st.w_until);
    if (!q->live)
        return 0;
    /* what the admission script counts: used in this window, and reservations still held */
    bg_admission_keys_t keys;
    rc = bg_admission_keys(&keys, x->role->shards, x->who.user_id);
    if (rc != 0)
        return rc;
    int64_t win = bg_policy_window_start(&q->st, now);
    int64_t used = 0, held = 0;
    redisReply *reply = NULL;
    const char *hq[] = {"HMGET", keys.quota, "win", "used"};
    rc = bg_redis_argv(x->job->redis, 4, hq, NULL, &reply);
    if (rc != 0)
        return rc;
    if (reply->type == REDIS_REPLY_ARRAY && reply->elements == 2 &&
        reply->element[0]->type == REDIS_REPLY_STRING &&
        reply->element[1]->type == REDIS_REPLY_STRING &&
        strtoll(reply->element[0]->str, NULL, 10) == win)
        used = strtoll(reply->element[1]->str, NULL, 10);
    freeReplyObject(reply);
    const char *h[] = {"HVALS", keys.res};
    rc = bg_redis_argv(x->job->redis, 2, h, NULL, &reply);
    if (rc != 0)
        return rc;
    for (size_t i = 0; reply->type == REDIS_REPLY_ARRAY && i < reply->elements; i++)
        if (reply->element[i]->type == REDIS_REPLY_STRING &&
            strtoll(reply->element[i]->str, NULL, 10) > now)
            held++;
    freeReplyObject(reply);
    q->remaining = q->st.limits.q_limit - used - held;
    if (q->remaining < 0)
        q->remaining = 0;
    q->reset_ms = bg_policy_window_end(&q->st, now);
    return 0;
}

/*
 * Writes the inline keyboard of the plans on sale (what GET /billing/plans lists), one button a
 * row with callback data "plan:<id>", into markup. Leaves markup empty when none is on sale.
 */
static int plans_markup(tg_ctx_t *x, bg_buf_t *markup)
{
    bg_buf_reset(markup);
    bg_plan_t *plans = bg_calloc(BG_PLANS_LIST_MAX, sizeof(*plans));
    size_t n = 0;
    int rc = bg_plans_list(x->pg, true, plans, BG_PLANS_LIST_MAX, &n);
    if (rc != 0 || n == 0)
        goto out;
    bg_json_writer_t w;
    bg_json_writer_init(&w, markup);
    bg_json_write_begin_object(&w);
    bg_json_write_key(&w, "inline_keyboard");
    bg_json_write_begin_array(&w);
    bg_buf_t label;
    bg_buf_init(&label, 1024);
    for (size_t i = 0; i < n; i++) {
        const bg_plan_t *p = &plans[i];
        char price[48], requests[24], data[48];
        snprintf(price, sizeof(price), "%" PRId64 ".%02" PRId64, p->price_minor / 100,
                 p->price_minor % 100);
        snprintf(requests, sizeof(requests), "%" PRId64, p->requests);
        snprintf(data, sizeof(data), "plan:%s", p->id);
        char pkey[64];
        snprintf(pkey, sizeof(pkey), "telegram.period_%s", p->period);
        const char *period = bg_i18n_text(x->locale, pkey);
        const char *params[] = {
            "name",      p->name,    "price",  price,    "currency",
            p->currency, "requests", requests, "period", period != NULL ? period : p->period,
            NULL};
        text_of(x, "telegram.plan_button", params, &label);
        bg_json_write_begin_array(&w);
        bg_json_write_begin_object(&w);
        bg_json_write_field_str(&w, "text", label.base);
        bg_json_write_field_str(&w, "callback_data", data);
        bg_json_write_end_object(&w);
        bg_json_write_end_array(&w);
    }
    bg_buf_dispose(&label);
    bg_json_write_end_array(&w);
    bg_json_write_end_object(&w);
    rc = bg_json_write_finish(&w);
    if (rc != 0)
        bg_buf_reset(markup);
out:
    free(plans);
    return rc;
}

/* say() with the plans keyboard under the message (none when nothing is on sale). */
static int say_with_plans(tg_ctx_t *x, const char *key, const char *const params[])
{
    bg_buf_t markup;
    bg_buf_init(&markup, 64 * 1024);
    int rc = plans_markup(x, &markup);
    if (rc == 0)
        rc = say(x, key, params, markup.len > 0 ? markup.base : NULL);
    bg_buf_dispose(&markup);
    return rc;
}

static int cmd_usage(tg_ctx_t *x)
{
    quota_now_t *q = bg_calloc(1, sizeof(*q));
    int rc = quota_now(x, q);
    if (rc == 0 && !q->live)
        rc = say_with_plans(x, "telegram.no_plan", NULL);
    else if (rc == 0) {
        char rem[24], lim[24], reset[40];
        snprintf(rem, sizeof(rem), "%" PRId64, q->remaining);
        snprintf(lim, sizeof(lim), "%" PRId64, q->st.limits.q_limit);
        format_time(q->reset_ms, reset, sizeof(reset));
        const char *params[] = {"plan", q->st.plan, "remaining", rem, "limit",
                                lim,    "reset",    reset,       NULL};
        rc = say(x, "telegram.usage", params, NULL);
    }
    free(q);
    return rc;
}

static int cmd_profile(tg_ctx_t *x)
{
    bg_tg_profile_t prof;
    int rc = bg_tg_profile_get(x->pg, x->who.user_id, &prof);
    if (rc != 0)
        return rc;
    quota_now_t *q = bg_calloc(1, sizeof(*q));
    rc = quota_now(x, q);
    if (rc != 0) {
        free(q);
        return rc;
    }
    char rem[24], lim[24], reset[40], skey[40];
    snprintf(rem, sizeof(rem), "%" PRId64, q->live ? q->remaining : 0);
    snprintf(lim, sizeof(lim), "%" PRId64, q->live ? q->st.limits.q_limit : 0);
    if (q->live)
        format_time(q->reset_ms, reset, sizeof(reset));
    else
        bg_strlcpy(reset, "-", sizeof(reset));
    snprintf(skey, sizeof(skey), "telegram.status_%s", q->live ? q->st.status : "none");
    const char *status = bg_i18n_text(x->locale, skey);
    const char *linked =
        bg_i18n_text(x->locale, prof.has_web_login ? "telegram.yes" : "telegram.no");
    const char *lname = bg_i18n_text(x->locale, "telegram.locale_name");
    /* the plan's name as the catalogue has it (its id when the plan is gone) */
    bg_plan_t *plan = bg_calloc(1, sizeof(*plan));
    const char *plan_name = "-";
    if (q->live && q->st.plan[0] != '\0')
        plan_name = bg_plans_get(x->pg, q->st.plan, plan) == 0 ? plan->name : q->st.plan;
    const char *params[] = {"name",      prof.name,
                            "plan",      plan_name,
                            "status",    status != NULL ? status : q->st.status,
                            "remaining", rem,
                            "limit",     lim,
                            "reset",     reset,
                            "locale",    lname != NULL ? lname : x->locale,
                            "linked",    linked != NULL ? linked : "-",
                            NULL};
    rc = say(x, "telegram.profile", params, NULL);
    free(plan);
    free(q);
    return rc;
}

static int cmd_plans(tg_ctx_t *x)
{
    bg_buf_t markup;
    bg_buf_init(&markup, 64 * 1024);
    int rc = plans_markup(x, &markup);
    if (rc == 0)
        rc = markup.len > 0 ? say(x, "telegram.plans_choose", NULL, markup.base)
                            : say(x, "telegram.plans_none", NULL, NULL);
    bg_buf_dispose(&markup);
    return rc;
}

/* The text after the command ("/link@bot  AB12 CD34" → "AB12 CD34"), or "". */
static const char *command_args(const tg_ctx_t *x)
{
    const char *t = x->u.text != NULL ? x->u.text : "";
    t += strcspn(t, " \n\t");
    while (*t == ' ' || *t == '\n' || *t == '\t')
        t++;
    return t;
}

/* The key counting a Telegram user's failed /link attempts. */
static void link_fail_key(const tg_ctx_t *x, char *out, size_t outlen)
{
    char tg[24];
    snprintf(tg, sizeof(tg), "%" PRId64, x->u.from_id);
    snprintf(out, outlen, "bg:{s%d}:tg:linkfail:%s", bg_shard_of(tg, x->role->shards), tg);
}

static int64_t link_failures(tg_ctx_t *x, bool add)
{
    char key[BG_REDIS_KEY_MAX];
    link_fail_key(x, key, sizeof(key));
    redisReply *r = NULL;
    int64_t n = 0;
    const char *get[] = {"GET", key};
    const char *incr[] = {"INCR", key};
    if (bg_redis_argv(x->job->redis, 2, add ? incr : get, NULL, &r) == 0) {
        if (r->type == REDIS_REPLY_INTEGER)
            n = r->integer;
        else if (r->type == REDIS_REPLY_STRING)
            n = strtoll(r->str, NULL, 10);
        freeReplyObject(r);
    }
    if (add && n == 1) {
        const char *ex[] = {"EXPIRE", key, LINK_FAIL_WINDOW_S};
        if (bg_redis_argv(x->job->redis, 3, ex, NULL, &r) == 0)
            freeReplyObject(r);
    }
    return n;
}

static int cmd_link(tg_ctx_t *x)
{
    /* a code typed in a group would be seen by everyone there */
    if (strcmp(x->u.chat_type, "private") != 0)
        return say(x, "telegram.link_private", NULL, NULL);
    const char *code = command_args(x);
    if (code[0] == '\0')
        return say(x, "telegram.link_how", NULL, NULL);
    if (link_failures(x, false) >= LINK_FAIL_MAX)
        return say(x, "telegram.link_too_many", NULL, NULL);
    bg_tg_link_result_t res;
    int rc = bg_tg_link(x->pg, x->u.from_id, code, &res);
    if (rc != 0)
        return rc;
    const char *key = "telegram.link_invalid";
    switch (res.outcome) {
    case BG_TG_LINK_DONE: {
        bg_info("job %s: Telegram user linked to user %s (previous user %s %s, %" PRId64
                " conversations moved)",
                x->job->job_id, res.user_id, res.old_user_id, res.retired ? "retired" : "kept",
                res.moved);
        /* from now on the bot speaks the account's language */
        bg_strlcpy(x->locale, bg_i18n_negotiate(res.locale, NULL), sizeof(x->locale));
        const char *params[] = {"name", res.name, NULL};
        return say(x, "telegram.link_done", params, NULL);
    }
    case BG_TG_LINK_ALREADY:
        return say(x, "telegram.link_already", NULL, NULL);
    case BG_TG_LINK_TAKEN:
        return say(x, "telegram.link_taken", NULL, NULL);
    case BG_TG_LINK_EXPIRED:
        key = "telegram.link_expired";
        break;
    case BG_TG_LINK_USED:
        key = "telegram.link_used";
        break;
    case BG_TG_LINK_UNKNOWN:
        break;
    }
    (void)link_failures(x, true);
    return say(x, key, NULL, NULL);
}

static int cmd_locale(tg_ctx_t *x)
{
    bg_buf_t markup;
    bg_buf_init(&markup, 4096);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &markup);
    bg_json_write_begin_object(&w);
    bg_json_write_key(&w, "inline_keyboard");
    bg_json_write_begin_array(&w);
    bg_json_write_begin_array(&w);
    const char *list = bg_i18n_supported();
    while (*list != '\0') {
        char loc[16];
        size_t n = strcspn(list, ",");
        snprintf(loc, sizeof(loc), "%.*s", (int)(n < 15 ? n : 15), list);
        list += n;
        if (*list == ',')
            list++;
        const char *name = bg_i18n_text(loc, "telegram.locale_name");
        char data[32];
        snprintf(data, sizeof(data), "locale:%s", loc);
        bg_json_write_begin_object(&w);
        bg_json_write_field_str(&w, "text", name != NULL ? name : loc);
        bg_json_write_field_str(&w, "callback_data", data);
        bg_json_write_end_object(&w);
    }
    bg_json_write_end_array(&w);
    bg_json_write_end_array(&w);
    bg_json_write_end_object(&w);
    int rc = bg_json_write_finish(&w);
    if (rc == 0)
        rc = say(x, "telegram.locale_choose", NULL, markup.base);
    bg_buf_dispose(&markup);
    return rc;
}

static int command(tg_ctx_t *x)
{
    const char *c = x->u.command;
    const char *name_params[] = {"name", x->who.name, NULL};
    if (strcmp(c, "start") == 0)
        return say(x, "telegram.start", name_params, NULL);
    if (strcmp(c, "help") == 0)
        return say(x, "telegram.help", NULL, NULL);
    if (strcmp(c, "new") == 0) {
        char conv[37];
        int rc = bg_tg_chat_conversation(x->pg, &x->bot, &x->u, x->who.user_id, true, conv);
        if (rc != 0)
            return rc == BG_ERR_NOT_FOUND ? say(x, "telegram.error", NULL, NULL) : rc;
        return say(x, "telegram.new", NULL, NULL);
    }
    if (strcmp(c, "usage") == 0)
        return cmd_usage(x);
    if (strcmp(c, "profile") == 0)
        return cmd_profile(x);
    if (strcmp(c, "plans") == 0)
        return cmd_plans(x);
    if (strcmp(c, "link") == 0)
        return cmd_link(x);
    if (strcmp(c, "locale") == 0 || strcmp(c, "language") == 0)
        return cmd_locale(x);
    return say(x, "telegram.unknown_command", NULL, NULL);
}

/*
 * A plan chosen on the keyboard: a checkout link made as POST /billing/subscribe makes it (a
 * Paddle transaction for the plan's price with custom_data.user_id), or a localized refusal.
 */
static int checkout(tg_ctx_t *x, const char *plan_id)
{
    const bg_paddle_api_t api = {.base_url = x->role->paddle_api_url,
                                 .api_key = x->role->paddle_api_key};
    if (!bg_paddle_api_configured(&api))
        return say(x, "telegram.payment_unavailable", NULL, NULL);
    bg_billing_checkout_t info;
    int rc = bg_billing_checkout_info(x->pg, x->who.user_id, plan_id, &info);
    if (rc == BG_ERR_NOT_FOUND)
        return say(x, "telegram.plan_not_purchasable", NULL, NULL);
    if (rc != 0)
        return rc;
    if (info.price_id[0] == '\0' || !info.purchasable)
        return say(x, "telegram.plan_not_purchasable", NULL, NULL);
    if (info.subscription_id[0] != '\0')
        return say(x, "telegram.already_subscribed", NULL, NULL);
    bg_paddle_reply_t reply;
    rc =
        bg_paddle_create_transaction(&api, info.price_id, x->who.user_id,
                                     info.customer_id[0] != '\0' ? info.customer_id : NULL, &reply);
    if (rc != 0 || reply.checkout_url[0] == '\0') {
        bg_warn("job %s: Paddle checkout failed: %s (HTTP %ld after %d attempts, %s)",
                x->job->job_id, rc != 0 ? bg_strerror(rc) : "no checkout url", reply.status,
                reply.attempts, reply.error_code[0] != '\0' ? reply.error_code : "no error code");
        return say(x, "telegram.payment_failed", NULL, NULL);
    }
    bg_buf_t markup, label;
    bg_buf_init(&markup, 4096);
    bg_buf_init(&label, 1024);
    text_of(x, "telegram.pay_button", NULL, &label);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &markup);
    bg_json_write_begin_object(&w);
    bg_json_write_key(&w, "inline_keyboard");
    bg_json_write_begin_array(&w);
    bg_json_write_begin_array(&w);
    bg_json_write_begin_object(&w);
    bg_json_write_field_str(&w, "text", label.base);
    bg_json_write_field_str(&w, "url", reply.checkout_url);
    bg_json_write_end_object(&w);
    bg_json_write_end_array(&w);
    bg_json_write_end_array(&w);
    bg_json_write_end_object(&w);
    rc = bg_json_write_finish(&w);
    const char *params[] = {"plan", plan_id, "url", reply.checkout_url, NULL};
    if (rc == 0)
        rc = say(x, "telegram.checkout", params, markup.base);
    bg_buf_dispose(&label);
    bg_buf_dispose(&markup);
    return rc;
}

static int callback(tg_ctx_t *x)
{
    const char *data = x->u.callback_data;
    const char *toast_key = NULL;
    if (strncmp(data, "locale:", 7) == 0 && bg_i18n_is_supported(data + 7) && x->u.has_from) {
        bg_user_t user;
        int rc = bg_acct_update_profile(x->pg, x->who.user_id, NULL, data + 7, &user);
        if (rc != 0)
            return rc;
        bg_strlcpy(x->locale, bg_i18n_negotiate(data + 7, NULL), sizeof(x->locale));
        toast_key = "telegram.locale_set";
    }
    bg_buf_t text, out;
    bg_buf_init(&text, 4096);
    bg_buf_init(&out, 8192);
    if (toast_key != NULL)
        text_of(x, toast_key, NULL, &text);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    bg_json_write_begin_object(&w);
    bg_json_write_field_str(&w, "callback_query_id", x->u.callback_id);
    if (text.len > 0)
        bg_json_write_field_str(&w, "text", text.base);
    bg_json_write_end_object(&w);
    bg_tg_result_t res;
    int rc = bg_json_write_finish(&w);
    if (rc == 0)
        rc = call(x, "answerCallbackQuery", out.base, false, true, &res);
    /* an old or unknown query is refused for good; there is nothing else to do about it */
    if (rc == BG_ERR_INVALID || rc == BG_ERR_DENIED)
        rc = 0;
    /* the keyboard's message now says what was chosen, when it can still be edited */
    if (rc == 0 && toast_key != NULL && x->u.has_chat && !x->u.message_inaccessible &&
        x->u.message_id != 0) {
        int erc = edit_text(x, x->u.message_id, text.base, text.len, true);
        rc = erc == BG_ERR_INVALID || erc == BG_ERR_DENIED ? 0 : erc;
    }
    /* a plan chosen: the spinner stopped above, the checkout link follows in the chat */
    if (rc == 0 && strncmp(data, "plan:", 5) == 0 && data[5] != '\0' && x->u.has_chat &&
        !x->blocked)
        rc = checkout(x, data + 5);
    bg_buf_dispose(&text);
    bg_buf_dispose(&out);
    return rc;
}

/* ---- a chat turn ---- */

/* The id of the user message a job stored before, or 0. */
static int stored_message(tg_ctx_t *x, int64_t *mid)
{
    *mid = 0;
    const char *p[] = {x->job->job_id};
    PGresult *res = NULL;
    int rc = bg_pg_exec(x->pg, "SELECT id FROM messages WHERE job_id = $1 AND role = 'user'", 1, p,
                        &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) == 1)
        *mid = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    PQclear(res);
    return *mid != 0 ? 0 : BG_ERR_NOT_FOUND;
}

/* Admits the turn (bg/channel.h: the web's job and admission); on 0, *d has the decision. */
static int admit(tg_ctx_t *x, const char *conv_id, int64_t mid, const char *image_url,
                 bg_admission_decision_t *d)
{
    const bg_turn_t t = {.channel = "telegram",
                         .user_id = x->who.user_id,
                         .user_name = x->who.name,
                         .locale = x->locale,
                         .job_id = x->job->job_id,
                         .agent_id = x->bot.agent_id,
                         .conversation_id = conv_id,
                         .message_id = mid, /* stored above, with the photo's note */
                         .image_url = image_url,
                         .temperature = -1};
    bg_turn_job_t job;
    int rc = bg_turn_prepare(&t, x->role->stream_maxlen, &job);
    if (rc != 0)
        return rc;
    return bg_turn_admit(x->job->redis, x->pg, x->role->shards, &job, d);
}

static int denied(tg_ctx_t *x, const bg_admission_decision_t *d)
{
    char reset[40];
    format_time(d->q_reset_ms, reset, sizeof(reset));
    const char *params[] = {"reset", reset, NULL};
    switch (bg_turn_refusal(d->verdict)) {
    case BG_REFUSAL_QUOTA:
        return say_with_plans(x, "telegram.quota_exceeded", params);
    case BG_REFUSAL_RATE:
        return say(x, "telegram.rate_limited", NULL, NULL);
    case BG_REFUSAL_FEATURE:
        return say_with_plans(x, "telegram.no_feature", NULL);
    case BG_REFUSAL_NONE:
    case BG_REFUSAL_NO_PLAN:
    case BG_REFUSAL_TOO_LONG:
    case BG_REFUSAL_UNAVAILABLE:
        break;
    }
    return say_with_plans(x, "telegram.no_plan", NULL);
}

/* The chat's view of a reply being followed (bg_turn_follow's sink). */
typedef struct st_tg_follow {
    tg_ctx_t *x;
    const bg_buf_t *text; /* the reply so far */
    int64_t message_id;   /* the message showing it, 0 before the first */
    size_t shown;         /* bytes of text that message shows */
    uint64_t last_typing;
} tg_follow_t;

/* Shows the text so far, as far as one message holds it; skipped (and tried again at the next
 * tick) when the chat is paced. Returns false once the user blocked the bot. */
static bool show_progress(tg_follow_t *f)
{
    tg_ctx_t *x = f->x;
    const bg_buf_t *text = f->text;
    if (x->blocked)
        return false;
    if (text->len == 0 || text->len == f->shown)
        return true;
    size_t n = bg_tg_split(text->base, text->len, BG_TG_TEXT_MAX);
    if (n == f->shown)
        return true;
    bool first = f->message_id == 0;
    int src = first ? send_text(x, text->base, n, NULL, false, &f->message_id)
                    : edit_text(x, f->message_id, text->base, n, false);
    if (src == 0) {
        f->shown = n;
        /* a new message clears the typing status (an edit does not) */
        if (first)
            f->last_typing = bg_timeutil_mono_ms();
    }
    return !x->blocked;
}

static bool follow_text(void *ctx, const char *text, size_t len)
{
    (void)text;
    (void)len;
    return show_progress(ctx);
}

static bool follow_tick(void *ctx)
{
    tg_follow_t *f = ctx;
    uint64_t now = bg_timeutil_mono_ms();
    if (f->last_typing == 0 || now - f->last_typing >= TYPING_EVERY_MS) {
        typing(f->x);
        f->last_typing = now;
    }
    return show_progress(f);
}

/* Relays the output of the admitted turn into the chat. */
static int relay(tg_ctx_t *x)
{
    int shard = bg_shard_of(x->who.user_id, x->role->shards);
    bg_buf_t text;
    bg_buf_init(&text, REPLY_MAX);
    tg_follow_t f = {.x = x, .text = &text};
    const bg_turn_sink_t sink = {
        .ctx = &f, .on_text = follow_text, .on_tick = follow_tick, .tick_ms = FOLLOW_TICK_MS};
    bg_turn_end_t end = BG_TURN_TIMED_OUT;
    int rc = bg_turn_follow(x->job->redis, shard, x->job->job_id, &sink, REPLY_TIMEOUT_MS, &text,
                            &end, NULL);
    if (rc != 0)
        goto out;
    if (x->blocked) {
        rc = 0;
        goto out;
    }
    if (end == BG_TURN_TIMED_OUT)
        bg_warn("job %s: no end of the reply after %d ms", x->job->job_id, REPLY_TIMEOUT_MS);
    if (end != BG_TURN_DONE) {
        /* what was generated stays; the note says it is not the whole answer */
        bg_buf_t note;
        bg_buf_init(&note, 4096);
        text_of(x, "telegram.error", NULL, &note);
        if ((text.len > 0 && bg_buf_puts(&text, "\n\n") != 0) ||
            bg_buf_append(&text, note.base, note.len) != 0) {
            bg_buf_reset(&text);
            text_of(x, "telegram.error", NULL, &text);
        }
        bg_buf_dispose(&note);
    } else if (text.len == 0) {
        text_of(x, "telegram.empty_reply", NULL, &text);
    }
    rc = deliver(x, text.base, text.len, f.message_id);
out:
    bg_buf_dispose(&text);
    return rc;
}

/*
 * A chat turn: the message (text, a photo's caption with the photo as image_url, a data URL, or
 * the message a text file made) is stored, admitted and answered. text NULL: the update's text.
 */
static int turn(tg_ctx_t *x, const char *image_url, const char *text)
{
    char conv[37];
    int rc = bg_tg_chat_conversation(x->pg, &x->bot, &x->u, x->who.user_id, false, conv);
    if (rc == BG_ERR_NOT_FOUND)
        return say(x, "telegram.error", NULL, NULL); /* the agent is not open to Telegram */
    if (rc != 0)
        return rc;
    int64_t mid = 0;
    /* a photo without a caption is stored as a note that a photo was sent */
    bg_buf_t note;
    bg_buf_init(&note, 4096);
    const char *content = text != NULL ? text : x->u.text;
    if (content == NULL || content[0] == '\0') {
        text_of(x, "telegram.photo_message", NULL, &note);
        content = note.base;
    }
    rc = bg_chat_append_user(x->pg, x->who.user_id, conv, content, x->job->job_id, NULL, &mid);
    bg_buf_dispose(&note);
    if (rc == BG_ERR_CONFLICT)
        rc = stored_message(x, &mid); /* a redelivery: the message is there */
    if (rc == BG_ERR_INVALID)
        return say(x, "telegram.error", NULL, NULL);
    if (rc != 0)
        return rc;
    /* a message stored (or found stored) moves the conversation's sequence, so that no worker
     * takes its context from a copy made before it (bg/convseq.h); not moved: the job runs again */
    int ushard = bg_shard_of(x->who.user_id, x->role->shards);
    rc = bg_convseq_bump(x->job->redis, ushard, conv, NULL);
    if (rc != 0)
        return rc;

    /* admitted before (a redelivery)? then only its output is missing */
    char marker[BG_REDIS_KEY_MAX];
    snprintf(marker, sizeof(marker), "bg:{s%d}:tg:adm:%s", ushard, x->job->job_id);
    redisReply *r = NULL;
    const char *get[] = {"EXISTS", marker};
    rc = bg_redis_argv(x->job->redis, 2, get, NULL, &r);
    if (rc != 0)
        return rc;
    bool admitted = r->type == REDIS_REPLY_INTEGER && r->integer == 1;
    freeReplyObject(r);
    if (!admitted) {
        bg_admission_decision_t d;
        rc = admit(x, conv, mid, image_url, &d);
        if (rc != 0)
            return rc;
        if (d.verdict != BG_ADMISSION_OK)
            return denied(x, &d);
        const char *set[] = {"SET", marker, "1", "EX", "86400"};
        if (bg_redis_argv(x->job->redis, 5, set, NULL, &r) == 0)
            freeReplyObject(r);
    }
    return relay(x);
}

/* ---- media ---- */

/*
 * Answers a file that could not be had; rc is what fetching or reading it returned: too_large_key
 * (with max) for BG_ERR_TOO_LARGE, unreadable_key (when not NULL) for BG_ERR_INVALID after the
 * download, else that it could not be downloaded.
 */
static int file_refused(tg_ctx_t *x, int rc, const char *too_large_key, const char *max)
{
    if (rc == BG_ERR_TOO_LARGE) {
        const char *params[] = {"max", max, NULL};
        return say(x, too_large_key, params, NULL);
    }
    bg_warn("job %s: cannot fetch the file: %s", x->job->job_id, bg_strerror(rc));
    return say(x, "telegram.file_failed", NULL, NULL);
}

/* The is-Telegram-in-trouble answer of a fetch: the job is retried rather than the user told. */
static bool fetch_retries(int rc)
{
    return rc == BG_ERR_TIMEOUT || rc == BG_ERR_UNAVAILABLE;
}

/*
 * Fetches the update's file into out, at most max bytes: the update's file_size, getFile's and
 * the download's bytes are each held to it. Returns 0; BG_ERR_UNAVAILABLE or BG_ERR_TIMEOUT when
 * Telegram had trouble (fetch_retries); BG_ERR_TOO_LARGE; or another error for a file that cannot
 * be had.
 */
static int fetch_file(tg_ctx_t *x, int64_t max, bg_buf_t *out)
{
    if (x->u.file_id[0] == '\0')
        return BG_ERR_INVALID;
    if (x->u.file_size > max)
        return BG_ERR_TOO_LARGE; /* refused at once, without a call */
    bg_tg_file_t f;
    memset(&f, 0, sizeof(f));
    bg_strlcpy(f.file_id, x->u.file_id, sizeof(f.file_id));
    f.file_size = x->u.file_size;
    (void)take_slot(x, false, true);
    bg_tg_result_t res;
    memset(&res, 0, sizeof(res));
    int rc = bg_tg_client_get_file(x->client, &f, max, &res);
    if (fetch_retries(rc) || (rc == BG_ERR_INVALID && res.error_code >= 429))
        return BG_ERR_UNAVAILABLE;
    if (rc != 0)
        return rc;
    return bg_tg_client_download(x->client, &f, max, out);
}

/* A photo for an agent that takes images: a turn with it as a data URL in the job's image_url. */
static int photo(tg_ctx_t *x)
{
    char max[16];
    snprintf(max, sizeof(max), "%d", BG_TG_FILE_MAX / (1024 * 1024));
    bg_buf_t file, url;
    bg_buf_init(&file, BG_TG_FILE_MAX);
    /* base64 is 4/3 of the bytes, plus the "data:…;base64," head */
    bg_buf_init(&url, BG_TG_FILE_MAX / 3 * 4 + 1024);
    int rc = fetch_file(x, BG_TG_FILE_MAX, &file);
    if (rc == 0) {
        const char *mime =
            strncmp(x->u.mime_type, "image/", 6) == 0 ? x->u.mime_type : "image/jpeg";
        rc = bg_tg_data_url(mime, file.base, file.len, &url);
        bg_buf_dispose(&file); /* the photo's bytes are in the URL now */
        rc =
            rc == 0 ? turn(x, url.base, NULL) : file_refused(x, rc, "telegram.file_too_large", max);
    } else if (!fetch_retries(rc)) {
        rc = file_refused(x, rc, "telegram.file_too_large", max);
    }
    bg_buf_dispose(&file);
    bg_buf_dispose(&url);
    return rc;
}

/*
 * A text file (bg_tg_is_text_file): its text, in a code fence under the caption, is the turn's
 * message, stored like any other, so later turns see it too. Up to BG_TG_TEXT_FILE_MAX bytes of
 * UTF-8; anything else is refused with a note.
 */
static int text_file(tg_ctx_t *x)
{
    char max[16];
    snprintf(max, sizeof(max), "%d", BG_TG_TEXT_FILE_MAX / 1024);
    bg_buf_t file, msg;
    bg_buf_init(&file, BG_TG_TEXT_FILE_MAX);
    /* the caption, the name and the fences around at most the file's bytes */
    bg_buf_init(&msg, BG_TG_TEXT_FILE_MAX + BG_TG_IN_TEXT_MAX + 1024);
    int rc = fetch_file(x, BG_TG_TEXT_FILE_MAX, &file);
    if (rc == 0) {
        rc = bg_tg_text_file_message(x->u.text, x->u.file_name, file.base, file.len, &msg);
        if (rc == 0)
            rc = turn(x, NULL, msg.base);
        else if (rc == BG_ERR_INVALID)
            rc = say(x, "telegram.text_file_unreadable", NULL, NULL);
        else
            rc = file_refused(x, rc, "telegram.text_file_too_large", max);
    } else if (!fetch_retries(rc)) {
        rc = file_refused(x, rc, "telegram.text_file_too_large", max);
    }
    bg_buf_dispose(&file);
    bg_buf_dispose(&msg);
    return rc;
}

/*
 * A photo, document, voice message, audio or video. A text file (bg_tg_is_text_file) is read
 * into the turn's message; a photo goes to the model, as a data URL in the job's image_url, when
 * the bot's agent accepts images (agents.accepts_images); everything else gets a localized note
 * of what the bot reads. The 20 MB limit of the Bot API (a text file's is BG_TG_TEXT_FILE_MAX) is
 * checked on the update's file_size, on getFile's, and while downloading.
 */
static int media(tg_ctx_t *x)
{
    if (x->u.content == BG_TG_DOCUMENT && bg_tg_is_text_file(x->u.mime_type, x->u.file_name))
        return text_file(x);
    bool images = false;
    int rc = bg_tg_agent_accepts_images(x->pg, x->bot.agent_id, &images);
    if (rc != 0)
        return rc;
    if (x->u.content != BG_TG_PHOTO || !images)
        return say(x, images ? "telegram.unsupported_media_images" : "telegram.unsupported_media",
                   NULL, NULL);
    return photo(x);
}

/* ---- one update ---- */

/* Finds the bot of the job; binds the quick-start bot when it is not bound yet. */
static int load_bot(tg_ctx_t *x, const char *slug)
{
    int rc = bg_tg_bot_get(x->pg, slug, &x->bot);
    if (rc == BG_ERR_NOT_FOUND && x->role->config_slug != NULL &&
        strcmp(slug, x->role->config_slug) == 0)
        rc = bg_tg_bot_bind(x->pg, x->role->config_token, x->role->config_secret, DEFAULT_AGENT_ID,
                            &x->bot);
    return rc;
}

static int client_for(tg_ctx_t *x)
{
    tg_thread_t *t = *x->job->thread_state;
    if (t == NULL) {
        t = bg_calloc(1, sizeof(*t));
        *x->job->thread_state = t;
    }
    if (t->client == NULL || strcmp(t->slug, x->bot.slug) != 0) {
        bg_tg_client_free(t->client);
        t->client = NULL;
        int rc = bg_tg_client_new(x->role->api_url, x->bot.token, 30000, &t->client);
        if (rc != 0)
            return rc;
        bg_strlcpy(t->slug, x->bot.slug, sizeof(t->slug));
    }
    x->client = t->client;
    return 0;
}

/* Returns true when the bot acts on u (the rules at the top of the file). */
static bool is_for_bot(const bg_tg_update_t *u)
{
    if (u->kind == BG_TG_CALLBACK)
        return u->has_from;
    if (u->kind != BG_TG_MESSAGE || !u->has_chat || !u->has_from || u->from_is_bot ||
        u->content == BG_TG_NONE)
        return false;
    /* in groups the bot answers commands only */
    return u->content == BG_TG_COMMAND || strcmp(u->chat_type, "private") == 0;
}

static int dispatch(tg_ctx_t *x)
{
    const bg_tg_update_t *u = &x->u;
    if (!is_for_bot(u))
        return 0; /* edited messages, channel posts, other kinds: ignored by rule */
    int rc = bg_tg_identity_resolve(x->pg, u, x->role->default_locale, &x->who);
    if (rc != 0)
        return rc;
    bg_strlcpy(x->locale, bg_i18n_negotiate(x->who.locale, NULL), sizeof(x->locale));
    if (x->who.created)
        bg_info("job %s: new user %s from Telegram (locale %s)", x->job->job_id, x->who.user_id,
                x->locale);
    if (u->kind == BG_TG_MESSAGE) {
        rc = bg_tg_chat_record(x->pg, &x->bot, u);
        if (rc != 0)
            return rc;
    }
    rc = client_for(x);
    if (rc != 0)
        return rc;
    if (u->kind == BG_TG_CALLBACK)
        return callback(x);
    switch (u->content) {
    case BG_TG_COMMAND:
        return command(x);
    case BG_TG_TEXT:
        return turn(x, NULL, NULL);
    case BG_TG_PHOTO:
    case BG_TG_DOCUMENT:
    case BG_TG_VOICE:
    case BG_TG_AUDIO:
    case BG_TG_VIDEO:
        return media(x);
    case BG_TG_NONE:
        break;
    }
    return 0;
}

int wk_telegram_handle(wk_job_t *job, void *ud)
{
    tg_role_t *role = ud;
    const char *slug = wk_job_field(job, "bot");
    const char *chat = wk_job_field(job, "chat");
    const char *seq_s = wk_job_field(job, "seq");
    const char *update = wk_job_field(job, "update");
    char *end = NULL;
    int64_t seq = seq_s != NULL ? strtoll(seq_s, &end, 10) : 0;
    if (slug == NULL || !bg_tg_slug_is_valid(slug, strlen(slug)) || chat == NULL ||
        chat[0] == '\0' || strlen(chat) > 32 || update == NULL || seq < 1 || end == NULL ||
        *end != '\0') {
        snprintf(job->error, sizeof(job->error), "malformed telegram job");
        return BG_ERR_INVALID;
    }
    char dkey[BG_REDIS_KEY_MAX];
    done_key(job, slug, chat, dkey, sizeof(dkey));
    int rc = wait_turn(job, dkey, seq);
    if (rc == BG_ERR_CONFLICT)
        return 0; /* handled before: a redelivery after the effect */
    if (rc != 0)
        return rc;

    tg_ctx_t *x = bg_calloc(1, sizeof(*x));
    x->role = role;
    x->job = job;
    bg_strlcpy(x->locale, bg_i18n_default(), sizeof(x->locale));
    const char *desc = NULL;
    rc = bg_tg_update_parse(update, strlen(update), &x->u, &desc);
    if (rc != 0) {
        snprintf(job->error, sizeof(job->error), "bad update: %s", desc);
        rc = BG_ERR_INVALID;
        goto out;
    }
    x->pg = bg_pg_thread_conn(role->database_url);
    if (x->pg == NULL) {
        rc = BG_ERR_UNAVAILABLE;
        goto out_update;
    }
    rc = load_bot(x, slug);
    if (rc == BG_ERR_NOT_FOUND || (rc == 0 && !x->bot.active)) {
        bg_info("job %s: bot %s is unknown or disabled: update dropped", job->job_id, slug);
        rc = 0;
    } else if (rc == 0) {
        rc = dispatch(x);
    }
out_update:
    bg_tg_update_dispose(&x->u);
out:
    bg_crypto_wipe(x->bot.token, sizeof(x->bot.token));
    free(x);
    /* a job that can never succeed does not hold its chat up either */
    if (rc == 0 || rc == BG_ERR_INVALID) {
        int mrc = mark_done(job, dkey, seq);
        if (mrc != 0 && rc == 0)
            rc = mrc;
    }
    if (rc != 0 && rc != BG_ERR_INVALID)
        snprintf(job->error, sizeof(job->error), "%s", bg_strerror(rc));
    return rc;
}
