/*
 * The "notify" role of bg-worker: derives notifications from what billing recorded and sends them
 * by mail and Telegram (bg/notify.h, docs/notifications.md).
 */
#ifndef WK_ROLE_NOTIFY_H
#define WK_ROLE_NOTIFY_H

#include "runtime.h"

/**
 * Reads BG_DATABASE_URL, BG_REDIS_URL, BG_SMTP_*, BG_MAIL_FROM, BG_TELEGRAM_API_URL and
 * BG_NOTIFY_* from cfg (borrowed; copied) and starts the role's pass thread. Returns 0 with the
 * owned state in *ud, or BG_ERR_CONFIG (no database, or BG_SMTP_URL without BG_MAIL_FROM).
 */
BG_MUSTCHECK int wk_notify_init(const bg_config_t *cfg, void **ud);

/** Stops the pass thread (after the send under way) and frees the state; accepts NULL. */
void wk_notify_dispose(void *ud);

/**
 * A job on the notify stream asks for a pass now (after a billing change, say) instead of at the
 * next interval; its fields are not read. Returns 0.
 */
BG_MUSTCHECK int wk_notify_handle(wk_job_t *job, void *ud);

#endif
