/*
 * The "telegram" role of bg-worker: handles the updates the edge accepted from Telegram's webhook
 * (edge/routes_telegram.c, docs/telegram.md). One job is one update, with the fields bot (the
 * bot's slug), chat (the key its updates are ordered by), seq (its number within that chat),
 * update_id and update (the Update as Telegram sent it).
 *
 * The role maps the sender to a platform user (provisioning a new one with the trial), answers the
 * commands (/start, /help, /new, /usage, /locale), admits text messages like the web chat does
 * (same script, same quota) and enqueues their turn for the llm role, then relays the turn's output
 * into the chat: typing actions while it runs, one message edited about once a second, the whole
 * text at the end (split past 4,096 characters). Outgoing calls are paced per chat and per bot in
 * Redis and retried on 429 (retry_after) and 5xx.
 */
#ifndef WK_ROLE_TELEGRAM_H
#define WK_ROLE_TELEGRAM_H

#include "runtime.h"

/**
 * Reads BG_DATABASE_URL, BG_SHARDS, BG_STREAM_MAXLEN, BG_TELEGRAM_API_URL, the locales and, for
 * the quick start, BG_TELEGRAM_BOT_TOKEN and BG_TELEGRAM_WEBHOOK_SECRET (which bind that bot to the
 * agent "assistant") from cfg (borrowed; copied). Returns 0 with the role's owned state in *ud, or
 * BG_ERR_CONFIG.
 */
BG_MUSTCHECK int wk_telegram_init(const bg_config_t *cfg, void **ud);

/** Frees the state of wk_telegram_init; accepts NULL. */
void wk_telegram_dispose(void *ud);

/** Frees a handler thread's state: its Bot API client. */
void wk_telegram_thread_dispose(void *thread_state, void *ud);

/**
 * Handles one update, after every earlier update of its chat (waiting for them up to a minute).
 * Returns 0 once the update was handled (replied to, ignored by rule, or refused by Telegram for
 * good), BG_ERR_INVALID for a malformed job, another error when Postgres, Redis or Telegram failed
 * on the way (the job is delivered again).
 */
BG_MUSTCHECK int wk_telegram_handle(wk_job_t *job, void *ud);

#endif
