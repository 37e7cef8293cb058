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
 * handler reads the job's output stream (bg/jobout.h) with XREAD on its own connection and shows
 * it: "typing" every TYPING_EVERY_MS, the text so far as one message edited when the chat's pacer
 * allows (about once a second), and at the end the whole text, always: an edit that fails becomes
 * a new message, text past 4,096 characters continues in more messages cut on paragraph, line or
 * sentence boundaries.
 *
 * Pacing and retries. Every Bot API call takes a slot from the bot's pacer (about 30 a second) and
 * every message or edit one from the chat's (one a second); both are Lua GCRA limiters in Redis, so
 * all workers share them. A 429 pushes the chat's pacer back by retry_after; 5xx and transport
 * errors are retried with backoff; a 403 (the user blocked the bot) marks the chat blocked and
 * ends the update. Intermediate edits never wait: one that finds its chat paced is skipped, the
 * next one carries more text anyway.
 *
 * Rules for what is not a chat turn: commands are answered in every chat; plain text only in
 * private chats (in groups the bot answers commands only); photos, documents, voice, audio and
 * video get a localized note that only text is read; edited messages are ignored without a reply
 * (the answer to the original stands); channel posts, messages of bots and kinds the bot does not
 * handle are ignored. Every callback query is answered (answerCallbackQuery), even one whose
 * message is inaccessible, since the client shows a spinner until then.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bg/accounts.h"
#include "bg/admission.h"
#include "bg/chat.h"
#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/i18n.h"
#include "bg/jobout.h"
#include "bg/json.h"
#include "bg/log.h"
#include "bg/pg.h"
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
#define XREAD_BLOCK_MS 500
/* Attempts of one Bot API call (429s and 5xx), and the longest 429 wait honoured. */
#define CALL_ATTEMPTS 8
#define RETRY_AFTER_MAX_S 60
#define RESERVATION_TTL_MS (15 * 60 * 1000)
#define REPLY_MAX (512 * 1024)

typedef struct st_tg_role {
    char *database_url; /* owned */
    char *api_url;      /* owned */
    char *default_locale;
    char *config_slug; /* owned; the quick-start bot's slug, NULL when none */
    char *config_token;
    char *config_secret;
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

static int cmd_usage(tg_ctx_t *x)
{
    bg_admission_state_t st;
    int64_t now = bg_timeutil_wall_ms();
    int rc = bg_policy_compile_user(x->pg, x->who.user_id, now, &st);
    if (rc != 0)
        return rc;
    bool live = (strcmp(st.status, "active") == 0 || strcmp(st.status, "trialing") == 0) &&
                !(st.w_until > 0 && now >= st.w_until);
    if (!live)
        return say(x, "telegram.no_plan", NULL, NULL);
    /* what the admission script counts: used in this window, and reservations still held */
    bg_admission_keys_t keys;
    rc = bg_admission_keys(&keys, x->role->shards, x->who.user_id, NULL);
    if (rc != 0)
        return rc;
    int64_t win = bg_policy_window_start(&st, now);
    int64_t used = 0, held = 0;
    redisReply *reply = NULL;
    const char *q[] = {"HMGET", keys.quota, "win", "used"};
    rc = bg_redis_argv(x->job->redis, 4, q, NULL, &reply);
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
    int64_t remaining = st.limits.q_limit - used - held;
    char rem[24], lim[24], reset[40];
    snprintf(rem, sizeof(rem), "%" PRId64, remaining > 0 ? remaining : 0);
    snprintf(lim, sizeof(lim), "%" PRId64, st.limits.q_limit);
    format_time(bg_policy_window_end(&st, now), reset, sizeof(reset));
    const char *params[] = {"plan", st.plan, "remaining", rem, "limit", lim, "reset", reset, NULL};
    return say(x, "telegram.usage", params, NULL);
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
    if (strcmp(c, "locale") == 0 || strcmp(c, "language") == 0)
        return cmd_locale(x);
    return say(x, "telegram.unknown_command", NULL, NULL);
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

/* Admits the turn; on 0, *d has the decision (never "no state"). */
static int admit(tg_ctx_t *x, const char *conv_id, int64_t mid, bg_admission_decision_t *d)
{
    char message_id[24];
    snprintf(message_id, sizeof(message_id), "%" PRId64, mid);
    const char *fields[] = {
        "user_id",    x->who.user_id, "conversation_id", conv_id,    "agent_id",    x->bot.agent_id,
        "message_id", message_id,     "channel",         "telegram", "locale",      x->locale,
        "user_name",  x->who.name,    "max_tokens",      "0",        "temperature", ""};
    bg_admission_req_t req = {
        .user_id = x->who.user_id,
        .feature = "",
        .role = "llm",
        .job_id = x->job->job_id,
        .nfields = BG_ARRAY_SIZE(fields) / 2,
        .fields = fields,
        .reservation_ttl_ms = RESERVATION_TTL_MS,
        .stream_maxlen = x->role->stream_maxlen,
    };
    for (int attempt = 0; attempt < 2; attempt++) {
        int rc = bg_admission_admit(x->job->redis, x->role->shards, &req, d);
        if (rc != 0)
            return rc;
        if (d->verdict != BG_ADMISSION_NO_STATE)
            return 0;
        /* a new user, or a flushed Redis: compile the state from Postgres, as the edge does */
        bg_admission_state_t st;
        rc = bg_policy_compile_user(x->pg, x->who.user_id, bg_timeutil_wall_ms(), &st);
        if (rc == 0)
            rc = bg_policy_state_write(x->job->redis, x->role->shards, &st);
        if (rc != 0)
            return rc;
    }
    return BG_ERR_UNAVAILABLE;
}

static int denied(tg_ctx_t *x, const bg_admission_decision_t *d)
{
    char reset[40];
    format_time(d->q_reset_ms, reset, sizeof(reset));
    const char *params[] = {"reset", reset, NULL};
    switch (d->verdict) {
    case BG_ADMISSION_QUOTA_EXCEEDED:
        return say(x, "telegram.quota_exceeded", params, NULL);
    case BG_ADMISSION_RATE_LIMITED:
    case BG_ADMISSION_CONCURRENCY:
        return say(x, "telegram.rate_limited", NULL, NULL);
    case BG_ADMISSION_NO_PLAN:
    case BG_ADMISSION_FEATURE:
    case BG_ADMISSION_TOO_MANY_TOKENS:
    case BG_ADMISSION_NO_STATE:
    case BG_ADMISSION_OK:
        break;
    }
    return say(x, "telegram.no_plan", NULL, NULL);
}

/* Reads the text of a delta's data ({"text": "…"}) onto text. */
static void add_delta(const char *data, size_t len, bg_buf_t *text)
{
    bg_json_doc_t *doc = NULL;
    const char *desc = NULL;
    if (bg_json_parse(data, len, NULL, &doc, &desc, NULL) != 0)
        return;
    const char *s = NULL;
    size_t n = 0;
    if (bg_json_get_strn(bg_json_root(doc), "text", &s, &n) == 0 && bg_buf_append(text, s, n) != 0)
        bg_warn("reply longer than %d bytes: cut", REPLY_MAX);
    bg_json_doc_free(doc);
}

/* Relays the output of the admitted turn into the chat. */
static int relay(tg_ctx_t *x)
{
    int shard = bg_shard_of(x->who.user_id, x->role->shards);
    char key[BG_REDIS_KEY_MAX];
    int rc = bg_jobout_key_stream(key, sizeof(key), shard, x->job->job_id);
    if (rc != 0)
        return rc;
    char last[BG_JOBS_ENTRY_ID_MAX] = "0-0";
    bg_buf_t text;
    bg_buf_init(&text, REPLY_MAX);
    int64_t message_id = 0;
    size_t shown = 0; /* bytes of text the message shows */
    uint64_t last_typing = 0;
    uint64_t deadline = bg_timeutil_mono_ms() + REPLY_TIMEOUT_MS;
    bool over = false, failed = false;
    while (!over && !x->blocked) {
        uint64_t now = bg_timeutil_mono_ms();
        if (now >= deadline) {
            bg_warn("job %s: no end of the reply after %d ms", x->job->job_id, REPLY_TIMEOUT_MS);
            failed = true;
            break;
        }
        if (now - last_typing >= TYPING_EVERY_MS) {
            typing(x);
            last_typing = now;
        }
        const char *argv[] = {"XREAD", "COUNT", "256", "BLOCK", "500", "STREAMS", key, last};
        redisReply *reply = NULL;
        rc = bg_redis_argv_block(x->job->redis, XREAD_BLOCK_MS, 8, argv, NULL, &reply);
        if (rc != 0)
            goto out;
        /* [[key, [[id, [field, value, …]], …]]] or nil on timeout */
        if (reply->type == REDIS_REPLY_ARRAY && reply->elements == 1 &&
            reply->element[0]->type == REDIS_REPLY_ARRAY && reply->element[0]->elements == 2) {
            const redisReply *entries = reply->element[0]->element[1];
            for (size_t i = 0; entries->type == REDIS_REPLY_ARRAY && i < entries->elements; i++) {
                const redisReply *e = entries->element[i];
                if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 ||
                    e->element[0]->type != REDIS_REPLY_STRING)
                    continue;
                bg_strlcpy(last, e->element[0]->str, sizeof(last));
                const redisReply *f = e->element[1];
                const char *type = NULL, *data = NULL;
                size_t data_len = 0;
                for (size_t k = 0; f->type == REDIS_REPLY_ARRAY && k + 1 < f->elements; k += 2) {
                    if (f->element[k]->type != REDIS_REPLY_STRING ||
                        f->element[k + 1]->type != REDIS_REPLY_STRING)
                        continue;
                    if (strcmp(f->element[k]->str, "type") == 0)
                        type = f->element[k + 1]->str;
                    else if (strcmp(f->element[k]->str, "data") == 0) {
                        data = f->element[k + 1]->str;
                        data_len = f->element[k + 1]->len;
                    }
                }
                if (type == NULL)
                    continue;
                if (strcmp(type, BG_JOBOUT_DELTA) == 0 && data != NULL)
                    add_delta(data, data_len, &text);
                else if (strcmp(type, BG_JOBOUT_RESET) == 0)
                    bg_buf_reset(&text);
                else if (strcmp(type, BG_JOBOUT_DONE) == 0)
                    over = true;
                else if (strcmp(type, BG_JOBOUT_ERROR) == 0)
                    over = failed = true;
            }
        }
        freeReplyObject(reply);
        if (over || text.len == 0 || text.len == shown)
            continue;
        /* the text so far, as far as one message holds it; skipped when the chat is paced */
        size_t n = bg_tg_split(text.base, text.len, BG_TG_TEXT_MAX);
        if (n == shown)
            continue;
        bool first = message_id == 0;
        int src = first ? send_text(x, text.base, n, NULL, false, &message_id)
                        : edit_text(x, message_id, text.base, n, false);
        if (src == 0) {
            shown = n;
            /* a new message clears the typing status (an edit does not) */
            if (first)
                last_typing = bg_timeutil_mono_ms();
        }
    }
    if (x->blocked) {
        rc = 0;
        goto out;
    }
    if (failed) {
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
    rc = deliver(x, text.base, text.len, message_id);
out:
    bg_buf_dispose(&text);
    return rc;
}

static int turn(tg_ctx_t *x)
{
    char conv[37];
    int rc = bg_tg_chat_conversation(x->pg, &x->bot, &x->u, x->who.user_id, false, conv);
    if (rc == BG_ERR_NOT_FOUND)
        return say(x, "telegram.error", NULL, NULL); /* the agent is not open to Telegram */
    if (rc != 0)
        return rc;
    int64_t mid = 0;
    rc = bg_chat_append_user(x->pg, x->who.user_id, conv, x->u.text, x->job->job_id, NULL, &mid);
    if (rc == BG_ERR_CONFLICT)
        rc = stored_message(x, &mid); /* a redelivery: the message is there */
    if (rc == BG_ERR_INVALID)
        return say(x, "telegram.error", NULL, NULL);
    if (rc != 0)
        return rc;

    /* admitted before (a redelivery)? then only its output is missing */
    int ushard = bg_shard_of(x->who.user_id, x->role->shards);
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
        rc = admit(x, conv, mid, &d);
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
        return turn(x);
    case BG_TG_PHOTO:
    case BG_TG_DOCUMENT:
    case BG_TG_VOICE:
    case BG_TG_AUDIO:
    case BG_TG_VIDEO:
        return say(x, "telegram.unsupported_media", NULL, NULL);
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
