/*
 * POST /webhooks/telegram/{bot}: Telegram's webhook (docs/telegram.md). {bot} is the bot's slug,
 * its numeric id (the digits before ':' in its token).
 *
 * Acknowledge fast, work later (DESIGN.md §7): the handler checks the secret, parses just enough of
 * the update to route it, and runs one script (lua/telegram_accept.lua) that marks the update_id
 * seen for a day (Telegram keeps an update at most that long), numbers the update within its chat
 * and XADDs it to the telegram job stream, atomically; then it answers 200. It never waits for a
 * model: the telegram worker does everything else. A repeated delivery, however concurrent, finds
 * the mark and is answered 200 without a second job.
 *
 * The secret (X-Telegram-Bot-Api-Secret-Token): missing → 401, wrong → 403, compared as SHA-256
 * hashes in constant time; an unknown or disabled bot is a 403 like a wrong secret, so a caller
 * cannot probe which bots exist. The quick-start bot of BG_TELEGRAM_BOT_TOKEN and
 * BG_TELEGRAM_WEBHOOK_SECRET is checked against the configuration on the loop; any other bot is
 * looked up in telegram_bots on the pool.
 *
 * Routing: the update goes to the shard of its chat (or of its sender when it has no chat), so
 * every update of one chat is on one stream and numbered by one counter, which is what lets the
 * worker handle a chat's updates in order while chats run in parallel.
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/log.h"
#include "bg/pg.h"
#include "bg/redis.h"
#include "bg/telegram.h"
#include "edge.h"

#define SECRET_HEADER "x-telegram-bot-api-secret-token"
/* Telegram's updates are small; a long text with entities stays far below this. */
#define UPDATE_MAX_BYTES (256 * 1024)

typedef struct st_tg_op {
    const bg_config_t *cfg;
    char slug[BG_TG_SLUG_SIZE];
    char *secret; /* owned: the presented secret, wiped on free */
    size_t secret_len;
    char *body; /* owned copy of the update */
    size_t body_len;
    int rc;
    bool secret_ok;
} tg_op_t;

static void op_free(void *p)
{
    tg_op_t *op = p;
    if (op == NULL)
        return;
    if (op->secret != NULL) {
        bg_crypto_wipe(op->secret, op->secret_len);
        free(op->secret);
    }
    free(op->body);
    free(op);
}

static void accepted(void *ud, int err, const redisReply *reply)
{
    edge_req_t *er = ud;
    if (er->req != NULL) {
        if (err != 0 || reply->type != REDIS_REPLY_INTEGER) {
            bg_warn("telegram webhook: cannot enqueue (%s)",
                    err != 0 ? bg_strerror(err)
                             : (reply->type == REDIS_REPLY_ERROR ? reply->str : "bad reply"));
            edge_error(er, "service_unavailable", NULL, NULL, 1);
        } else {
            edge_respond(er, 200, "application/json", BG_STRLIT("{\"ok\":true}"));
        }
    }
    edge_req_unref(er);
}

/* The secret is right: parse, deduplicate and enqueue. */
static void accept_update(edge_req_t *er, tg_op_t *op)
{
    bg_tg_update_t u;
    const char *desc = NULL;
    int rc = bg_tg_update_parse(op->body, op->body_len, &u, &desc);
    if (rc != 0) {
        edge_error(er, rc == BG_ERR_TOO_LARGE ? "payload_too_large" : "bad_request", NULL, NULL, 0);
        return;
    }
    /* the key that orders updates: the chat, else the sender, else the bot alone */
    char order[32];
    if (u.has_chat)
        snprintf(order, sizeof(order), "%" PRId64, u.chat_id);
    else if (u.has_from)
        snprintf(order, sizeof(order), "u%" PRId64, u.from_id);
    else
        snprintf(order, sizeof(order), "none");
    char update_id[24];
    snprintf(update_id, sizeof(update_id), "%" PRId64, u.update_id);
    bg_tg_update_dispose(&u);

    char route[64];
    snprintf(route, sizeof(route), "%s:%s", op->slug, order);
    int shard = bg_shard_of(route, op->cfg->shards);
    char seen[BG_REDIS_KEY_MAX], stream[BG_REDIS_KEY_MAX], seq[BG_REDIS_KEY_MAX];
    snprintf(seen, sizeof(seen), "bg:{s%d}:tg:seen:%s:%s", shard, op->slug, update_id);
    snprintf(seq, sizeof(seq), "bg:{s%d}:tg:seq:%s:%s", shard, op->slug, order);
    if (bg_redis_key_queue(stream, sizeof(stream), shard, "telegram") != 0) {
        edge_error(er, "internal", NULL, NULL, 0);
        return;
    }
    char maxlen[24], job_id[64];
    snprintf(maxlen, sizeof(maxlen), "%" PRId64, op->cfg->stream_maxlen);
    snprintf(job_id, sizeof(job_id), "tg-%s-%s", op->slug, update_id);
    const char *keys[] = {seen, stream, seq};
    const char *args[] = {maxlen, job_id, op->slug, order, update_id, op->body};
    edge_req_ref(er);
    if (bg_redis_async_script(er->thread->redis, accepted, er, "lua/telegram_accept.lua", 3, keys,
                              6, args) != 0) {
        edge_req_unref(er);
        edge_error(er, "service_unavailable", NULL, NULL, 1);
    }
}

static void lookup_work(void *arg)
{
    tg_op_t *op = arg;
    PGconn *c = edge_pg(op->cfg, NULL, &op->rc);
    if (c == NULL)
        return;
    bg_tg_bot_t bot;
    op->rc = bg_tg_bot_get(c, op->slug, &bot);
    if (op->rc == 0)
        op->secret_ok =
            bot.active && bg_tg_secret_matches(op->secret, op->secret_len, bot.secret_hash);
    else if (op->rc == BG_ERR_NOT_FOUND)
        op->rc = 0;
    bg_crypto_wipe(bot.token, sizeof(bot.token));
}

static void lookup_done(edge_req_t *er, void *arg)
{
    tg_op_t *op = arg;
    if (er->req == NULL)
        return;
    if (op->rc != 0) {
        edge_fail(er, op->rc);
        return;
    }
    if (!op->secret_ok) {
        edge_error(er, "forbidden", NULL, NULL, 0);
        return;
    }
    accept_update(er, op);
}

/* Returns true when slug is the quick-start bot of the configuration. */
static bool is_config_bot(const bg_config_t *cfg, const char *slug)
{
    char own[BG_TG_SLUG_SIZE];
    return bg_str_present(cfg->telegram_bot_token) &&
           bg_str_present(cfg->telegram_webhook_secret) &&
           bg_tg_token_slug(cfg->telegram_bot_token, own) == 0 && strcmp(own, slug) == 0;
}

static void webhook(edge_req_t *er)
{
    h2o_iovec_t secret = edge_req_header(er, SECRET_HEADER);
    if (secret.base == NULL || secret.len == 0) {
        edge_error(er, "unauthorized", NULL, NULL, 0);
        return;
    }
    h2o_iovec_t slug = er->params[0];
    if (!bg_tg_slug_is_valid(slug.base, slug.len) || secret.len > 256) {
        edge_error(er, "forbidden", NULL, NULL, 0);
        return;
    }
    tg_op_t *op = bg_calloc(1, sizeof(*op));
    er->data = op;
    er->data_free = op_free;
    op->cfg = er->thread->server->cfg;
    memcpy(op->slug, slug.base, slug.len);
    op->secret = bg_strndup(secret.base, secret.len);
    op->secret_len = secret.len;
    op->body =
        bg_strndup(er->req->entity.base != NULL ? er->req->entity.base : "", er->req->entity.len);
    op->body_len = er->req->entity.len;

    if (is_config_bot(op->cfg, op->slug)) {
        char hash[BG_CRYPTO_SHA256_HEX_LEN];
        bg_crypto_sha256_hex(op->cfg->telegram_webhook_secret,
                             strlen(op->cfg->telegram_webhook_secret), hash);
        if (!bg_tg_secret_matches(op->secret, op->secret_len, hash)) {
            edge_error(er, "forbidden", NULL, NULL, 0);
            return;
        }
        accept_update(er, op);
        return;
    }
    edge_run(er, lookup_work, lookup_done);
}

const edge_route_t edge_routes_telegram[] = {
    {"POST", "/webhooks/telegram/{bot}", "telegram_webhook", webhook, EDGE_ROUTE_JSON,
     UPDATE_MAX_BYTES, EDGE_PUBLIC},
    {NULL, NULL, NULL, NULL, 0, 0, EDGE_PUBLIC},
};
