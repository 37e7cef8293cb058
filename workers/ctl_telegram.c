/*
 * bgctl telegram: binds Telegram bots to agents and manages their webhooks (docs/telegram.md).
 *
 *   bgctl telegram bind [--token T] [--secret S] [--agent ID]
 *   bgctl telegram set-webhook --bot ID [--secret S] [--url URL] [--drop-pending]
 *   bgctl telegram delete-webhook --bot ID [--drop-pending]
 *   bgctl telegram webhook-info --bot ID
 *
 * bind stores the bot (its token, the SHA-256 of the webhook secret) and the agent it serves (the
 * default assistant unless --agent); --token and --secret default to BG_TELEGRAM_BOT_TOKEN and
 * BG_TELEGRAM_WEBHOOK_SECRET, which keeps the token out of the process list. set-webhook tells
 * Telegram where to deliver (BG_PUBLIC_URL/webhooks/telegram/<bot> unless --url) with the secret
 * it must send back; since only the secret's hash is stored, the secret comes from --secret (which
 * also becomes the bot's new secret) or, for the quick-start bot, from BG_TELEGRAM_WEBHOOK_SECRET.
 * The quick-start bot is bound on the way when no worker did it yet. Telegram's answer is printed;
 * its refusals exit 1. The token is never printed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/json.h"
#include "bg/pg.h"
#include "bg/telegram.h"
#include "ctl.h"

#define DEFAULT_AGENT_ID "00000000-0000-4000-8000-00000000a550"

static const char usage_text[] =
    "usage: bgctl telegram bind [--token T] [--secret S] [--agent ID]\n"
    "       bgctl telegram set-webhook --bot ID [--secret S] [--url URL] [--drop-pending]\n"
    "       bgctl telegram delete-webhook --bot ID [--drop-pending]\n"
    "       bgctl telegram webhook-info --bot ID\n";

typedef struct st_args {
    const char *token, *secret, *agent, *bot, *url;
    bool drop_pending;
} args_t;

static int parse_args(int argc, char **argv, args_t *a)
{
    for (int i = 2; i < argc; i++) {
        const char *o = argv[i];
        bool v = i + 1 < argc;
        if (strcmp(o, "--token") == 0 && v)
            a->token = argv[++i];
        else if (strcmp(o, "--secret") == 0 && v)
            a->secret = argv[++i];
        else if (strcmp(o, "--agent") == 0 && v)
            a->agent = argv[++i];
        else if (strcmp(o, "--bot") == 0 && v)
            a->bot = argv[++i];
        else if (strcmp(o, "--url") == 0 && v)
            a->url = argv[++i];
        else if (strcmp(o, "--drop-pending") == 0)
            a->drop_pending = true;
        else {
            fprintf(stderr, "bgctl telegram: unknown option or missing value: %s\n%s", o,
                    usage_text);
            return 2;
        }
    }
    return 0;
}

static PGconn *connect_pg(const bg_config_t *cfg)
{
    char err[256];
    PGconn *c = NULL;
    if (!bg_str_present(cfg->database_url) ||
        bg_pg_connect(cfg->database_url, 3, &c, err, sizeof(err)) != 0) {
        fprintf(stderr, "bgctl telegram: cannot connect to BG_DATABASE_URL\n");
        return NULL;
    }
    return c;
}

static int bind_bot(const args_t *a, const bg_config_t *cfg)
{
    const char *token = a->token != NULL ? a->token : cfg->telegram_bot_token;
    const char *secret = a->secret != NULL ? a->secret : cfg->telegram_webhook_secret;
    if (!bg_str_present(token) || !bg_str_present(secret)) {
        fprintf(stderr, "bgctl telegram bind: a token and a secret are required (--token/--secret "
                        "or BG_TELEGRAM_BOT_TOKEN/BG_TELEGRAM_WEBHOOK_SECRET)\n");
        return 2;
    }
    PGconn *c = connect_pg(cfg);
    if (c == NULL)
        return 1;
    bg_tg_bot_t bot;
    int rc = bg_tg_bot_bind(c, token, secret, a->agent != NULL ? a->agent : DEFAULT_AGENT_ID, &bot);
    PQfinish(c);
    bg_crypto_wipe(bot.token, sizeof(bot.token));
    if (rc == BG_ERR_INVALID) {
        fprintf(stderr, "bgctl telegram bind: the token must look like 123456:ABC… and the secret "
                        "be 1-256 characters of A-Z a-z 0-9 _ -\n");
        return 2;
    }
    if (rc != 0) {
        fprintf(stderr, "bgctl telegram bind: %s\n",
                rc == BG_ERR_NOT_FOUND ? "no such agent" : bg_strerror(rc));
        return 1;
    }
    printf("bot %s serves agent %s\n", bot.slug, bot.agent_id);
    return 0;
}

/* Calls method for the bot and prints Telegram's answer. */
static int bot_call(const bg_config_t *cfg, const bg_tg_bot_t *bot, const char *method,
                    const char *body)
{
    bg_tg_client_t *client = NULL;
    int rc = bg_tg_client_new(cfg->telegram_api_url, bot->token, 30000, &client);
    if (rc != 0) {
        fprintf(stderr, "bgctl telegram: bad token or BG_TELEGRAM_API_URL\n");
        return 1;
    }
    bg_tg_result_t res;
    bg_buf_t out;
    bg_buf_init(&out, 1024 * 1024);
    rc = bg_tg_client_call_ex(client, method, body, &res, &out);
    bg_tg_client_free(client);
    int status = 0;
    if (rc != 0) {
        fprintf(stderr, "bgctl telegram: %s: %s\n", method, bg_strerror(rc));
        status = 1;
    } else if (!res.ok) {
        fprintf(stderr, "bgctl telegram: %s: Telegram answered %lld: %s\n", method,
                (long long)res.error_code, res.description);
        status = 1;
    } else {
        printf("%s\n", out.base != NULL ? out.base : "true");
    }
    bg_buf_dispose(&out);
    return status;
}

static int webhook(const char *cmd, const args_t *a, const bg_config_t *cfg)
{
    if (a->bot == NULL || !bg_tg_slug_is_valid(a->bot, strlen(a->bot))) {
        fprintf(stderr, "bgctl telegram %s: --bot <the bot's numeric id> is required\n%s", cmd,
                usage_text);
        return 2;
    }
    PGconn *c = connect_pg(cfg);
    if (c == NULL)
        return 1;
    bg_tg_bot_t bot;
    int rc = bg_tg_bot_get(c, a->bot, &bot);
    char own[BG_TG_SLUG_SIZE];
    bool config_bot = bg_str_present(cfg->telegram_bot_token) &&
                      bg_tg_token_slug(cfg->telegram_bot_token, own) == 0 &&
                      strcmp(own, a->bot) == 0;
    /* the quick-start bot is bound by the first worker; bgctl may come first */
    if (rc == BG_ERR_NOT_FOUND && config_bot)
        rc = bg_tg_bot_bind(c, cfg->telegram_bot_token, cfg->telegram_webhook_secret,
                            DEFAULT_AGENT_ID, &bot);
    if (rc != 0) {
        PQfinish(c);
        fprintf(stderr, "bgctl telegram %s: %s\n", cmd,
                rc == BG_ERR_NOT_FOUND ? "no such bot (bind it first)" : bg_strerror(rc));
        return 1;
    }
    bg_buf_t body;
    bg_buf_init(&body, 8192);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &body);
    bg_json_write_begin_object(&w);
    const char *method = "getWebhookInfo";
    int status = 0;
    if (strcmp(cmd, "set-webhook") == 0) {
        method = "setWebhook";
        const char *secret = a->secret;
        if (secret == NULL && config_bot)
            secret = cfg->telegram_webhook_secret;
        if (secret == NULL || !bg_tg_secret_is_valid(secret)) {
            fprintf(stderr, "bgctl telegram set-webhook: --secret S is required (1-256 "
                            "characters of A-Z a-z 0-9 _ -)\n");
            status = 2;
            goto out;
        }
        /* the edge must accept what Telegram will send */
        if (!bg_tg_secret_matches(secret, strlen(secret), bot.secret_hash) &&
            bg_tg_bot_bind(c, bot.token, secret, bot.agent_id, NULL) != 0) {
            fprintf(stderr, "bgctl telegram set-webhook: cannot store the new secret\n");
            status = 1;
            goto out;
        }
        char *url = a->url != NULL
                        ? bg_strdup(a->url)
                        : bg_asprintf("%s/webhooks/telegram/%s", cfg->public_url, bot.slug);
        bg_json_write_field_str(&w, "url", url);
        free(url);
        bg_json_write_field_str(&w, "secret_token", secret);
        bg_json_write_key(&w, "allowed_updates");
        bg_json_write_begin_array(&w);
        bg_json_write_str(&w, "message");
        bg_json_write_str(&w, "edited_message");
        bg_json_write_str(&w, "callback_query");
        bg_json_write_end_array(&w);
        if (a->drop_pending)
            bg_json_write_field_bool(&w, "drop_pending_updates", true);
    } else if (strcmp(cmd, "delete-webhook") == 0) {
        method = "deleteWebhook";
        if (a->drop_pending)
            bg_json_write_field_bool(&w, "drop_pending_updates", true);
    }
    bg_json_write_end_object(&w);
    if (bg_json_write_finish(&w) != 0) {
        status = 1;
        goto out;
    }
    status = bot_call(cfg, &bot, method, body.base);
out:
    bg_crypto_wipe(body.base, body.len);
    bg_buf_dispose(&body);
    bg_crypto_wipe(bot.token, sizeof(bot.token));
    PQfinish(c);
    return status;
}

int ctl_telegram_main(int argc, char **argv, const bg_config_t *cfg)
{
    if (argc < 2) {
        fprintf(stderr, "%s", usage_text);
        return 2;
    }
    args_t a = {0};
    int rc = parse_args(argc, argv, &a);
    if (rc != 0)
        return rc;
    const char *cmd = argv[1];
    if (strcmp(cmd, "bind") == 0)
        return bind_bot(&a, cfg);
    if (strcmp(cmd, "set-webhook") == 0 || strcmp(cmd, "delete-webhook") == 0 ||
        strcmp(cmd, "webhook-info") == 0)
        return webhook(cmd, &a, cfg);
    fprintf(stderr, "bgctl telegram: unknown command %s\n%s", cmd, usage_text);
    return 2;
}
