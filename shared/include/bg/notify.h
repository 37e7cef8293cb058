/*
 * Notifications (docs/notifications.md): payment succeeded, payment failed, subscription renewed,
 * subscription canceled and trial ending, in the app, by mail and by Telegram, each sent once.
 *
 * Producing. Notifications are derived from durable facts, never from the code path that made
 * them: bg_notify_produce() reads the Paddle events the billing worker applied (webhook_inbox rows
 * with processed_at set, past a cursor in notification_cursors) and the trials that end within
 * the notice period, and inserts one notifications row per fact and channel: "web" always, "email"
 * when the user has an address, "telegram" when the user has a private chat with an active bot
 * that is not blocked. Each row's dedupe_key is "<fact>:<channel>" (for instance
 * "payment_succeeded:txn_…:email", "trial_ending:<subscription>:<YYYY-MM-DD>:web"), unique in the
 * table, so producing again, a redelivered event or two workers producing at once insert nothing
 * more. Each pass re-reads the last BG_NOTIFY_OVERLAP_S seconds before the cursor, since an inbox
 * row's processed_at is its transaction's start and a slow transaction becomes visible after a
 * quicker one that started later.
 *
 * Sending. bg_notify_send_due() takes due pending rows one at a time (FOR UPDATE SKIP LOCKED, so
 * any number of workers share the queue), sends it and records the outcome in the same
 * transaction: 'sent'; 'pending' again with send_after pushed back (retry_ms × 2^attempts, with
 * jitter) after a transient failure (SMTP 4xx, a connection failure, Telegram 429 or 5xx);
 * 'failed' after a permanent one (SMTP 5xx, Telegram 400) or after max_attempts attempts;
 * 'skipped' when the channel cannot carry it (no SMTP server configured, the user has no address
 * any more, the chat is blocked). Web rows are stored 'sent': the app shows them.
 *
 * Rendering. A row stores its kind, its locale (the user's at the time) and the facts as payload
 * (amount, currency, plan, date); the title and body are the catalogue messages
 * "notify.<kind>.title" and "notify.<kind>.body" with the payload as parameters.
 */
#ifndef BG_NOTIFY_H
#define BG_NOTIFY_H

#include <libpq-fe.h>

#include "bg/buf.h"
#include "bg/common.h"
#include "bg/redis.h"

/** The producer's inbox cursor (notification_cursors.name). */
#define BG_NOTIFY_CURSOR "paddle_inbox"
/** Seconds before the cursor each producer pass reads again (see above). */
#define BG_NOTIFY_OVERLAP_S 120
/** Inbox rows per page of a producer pass. */
#define BG_NOTIFY_PAGE 200
/** How long before a trial's end it is announced. */
#define BG_NOTIFY_TRIAL_NOTICE_S (3 * 86400)
/** Most notifications one page of GET /notifications holds. */
#define BG_NOTIFY_LIST_MAX 100
/** Most ids one POST /notifications/read names. */
#define BG_NOTIFY_READ_IDS_MAX 100

/** How the sender reaches people. Every pointer is borrowed. */
typedef struct bg_notify_opts {
    const char *smtp_url;         /**< smtp:// or smtps://; NULL: mail rows are skipped */
    const char *smtp_user;        /**< may be NULL */
    const char *smtp_password;    /**< may be NULL; secret */
    const char *mail_from;        /**< sender address; NULL: mail rows are skipped */
    const char *telegram_api_url; /**< Bot API base URL */
    const char *public_url;       /**< for the mail footer */
    int64_t timeout_ms;           /**< per SMTP session or Bot API call */
    int64_t retry_ms;             /**< first retry delay; doubles with each attempt */
    int max_attempts;             /**< attempts before a row fails */
    bg_redis_t *redis; /**< Telegram pacers (shared with the telegram role); may be NULL */
} bg_notify_opts_t;

/** What a send pass did. */
typedef struct bg_notify_counts {
    int64_t sent, retried, failed, skipped;
} bg_notify_counts_t;

/**
 * Runs one producer pass at now (the inbox past the cursor, then trials ending within
 * BG_NOTIFY_TRIAL_NOTICE_S of now) and advances the cursor. *created (may be NULL) gets the
 * number of rows inserted. Returns 0 or a database error.
 */
BG_MUSTCHECK int bg_notify_produce(PGconn *c, int64_t *created);

/**
 * Sends the pending rows due when the call starts, at most max of them, as described at the top
 * (a row retried during the call waits for the next call).
 * Returns 0 (whatever the sends' outcomes, counted in *out, which may be NULL) or a database
 * error.
 */
BG_MUSTCHECK int bg_notify_send_due(PGconn *c, const bg_notify_opts_t *o, int max,
                                    bg_notify_counts_t *out);

/**
 * Appends the title and the body of a notification of kind with payload (a JSON object text) in
 * locale to title and body. Returns 0, BG_ERR_INVALID for a payload that is not a JSON object, or
 * BG_ERR_TOO_LARGE.
 */
BG_MUSTCHECK int bg_notify_render(const char *locale, const char *kind, const char *payload,
                                  bg_buf_t *title, bg_buf_t *body);

/**
 * Writes a complete RFC 5322 mail into out: Date (at now_ms), Message-ID (random, at the sender's
 * domain), From, To, a Subject in RFC 2047 UTF-8 encoded words, MIME text/plain UTF-8 in base64.
 * Returns 0, BG_ERR_INVALID when from or to is not a plain address (no spaces, angle brackets or
 * line breaks; one '@'), or BG_ERR_TOO_LARGE.
 */
BG_MUSTCHECK int bg_notify_mail_build(const char *from, const char *to, const char *subject,
                                      const char *text, int64_t now_ms, bg_buf_t *out);

/**
 * Writes the user's in-app notifications as {"data":[{"id","kind","title","body","created_at",
 * "read_at"}],"next_cursor","unread"} into out, newest first, rendered in locale: at most limit
 * (1..BG_NOTIFY_LIST_MAX) after cursor (NULL: the first page), only unread ones when unread_only.
 * Returns 0, BG_ERR_INVALID for a malformed cursor, or a database error.
 */
BG_MUSTCHECK int bg_notify_list(PGconn *c, const char *user_id, const char *locale,
                                const char *cursor, int limit, bool unread_only, bg_buf_t *out);

/**
 * Marks the user's in-app notifications read: the n ids (UUID texts) or, with all, every unread
 * one. Ids of other users' notifications, or already read, change nothing. *updated gets the
 * number marked now. Returns 0 or a database error.
 */
BG_MUSTCHECK int bg_notify_mark_read(PGconn *c, const char *user_id, const char *const ids[],
                                     size_t n, bool all, int64_t *updated);

#endif
