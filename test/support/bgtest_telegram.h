/*
 * Helpers of the Telegram e2e tests: what the bot sent, read from the fake Bot API's call log
 * (test/fixtures/fake_telegram.c), the replies the service stored, and waits on both.
 */
#ifndef BGTEST_TELEGRAM_H
#define BGTEST_TELEGRAM_H

#include <libpq-fe.h>
#include <stddef.h>

/** One Bot API call the fake recorded. */
typedef struct bgt_tg_call {
    long long t;
    char method[32];
    long status;
    long long chat_id;
    char *text; /**< owned; "" when none */
    char callback_id[64];
} bgt_tg_call_t;

/** Where a test's bot leaves its traces. */
typedef struct bgt_tg_watch {
    const char *calls_path; /**< the fake's call log */
    PGconn *pg;             /**< the service's database */
    const char *slug;       /**< the bot's slug: its jobs are tg-<slug>-<update id> */
    bgt_tg_call_t *calls;   /**< where the waits read the calls (max of them) */
    size_t max;
} bgt_tg_watch_t;

/** Writes a private text message update from user in lang. */
void bgt_tg_text_update(char *out, size_t outlen, long long update_id, long long user,
                        const char *lang, const char *text);
/** Reads up to max calls of the log into out; free them with bgt_tg_free_calls. */
size_t bgt_tg_read_calls(const bgt_tg_watch_t *w, bgt_tg_call_t *out, size_t max);
void bgt_tg_free_calls(bgt_tg_call_t *c, size_t n);
/** Counts the calls of method (NULL: any message or edit) to chat answered with status (0: any). */
size_t bgt_tg_count(const bgt_tg_call_t *c, size_t n, const char *method, long long chat,
                    long status);
/** The text the chat shows last: the latest accepted sendMessage or editMessageText. */
const char *bgt_tg_last_text(const bgt_tg_call_t *c, size_t n, long long chat);
/** The assistant's stored reply to update_id ("" while there is none). */
void bgt_tg_stored_reply(const bgt_tg_watch_t *w, long long update_id, char *out, size_t outlen);
/** Waits until the chat shows the stored reply of update_id; returns the calls read last (in
 * w->calls). */
size_t bgt_tg_wait_reply(const bgt_tg_watch_t *w, long long update_id, long long chat, char *reply,
                         size_t replylen, int timeout_ms);
/** Waits until at least want calls of method reach chat; returns the calls read last. */
size_t bgt_tg_wait_calls(const bgt_tg_watch_t *w, const char *method, long long chat, size_t want,
                         int timeout_ms);

#endif
