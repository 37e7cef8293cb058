/*
 * Paddle Billing: webhook signatures and the few API calls the service makes
 * (../shared/PROTOCOLS.md §1).
 *
 * Signatures. Paddle signs every notification with HMAC-SHA256 over "<ts>:<raw body>" and sends
 * `Paddle-Signature: ts=<unix seconds>;h1=<hex>[;h1=<hex>…]`. During a secret rotation it sends one
 * h1 per secret, and an operator may configure several secrets (BG_PADDLE_WEBHOOK_SECRETS,
 * comma-separated), so a request is genuine when ANY configured secret gives ANY h1. Keys other
 * than ts and h1 (h2=…) are ignored, as the Node SDK does. Every comparison is constant-time. The
 * timestamp must lie within a tolerance of now in either direction: a captured request replayed
 * later is refused (and a replay inside the window changes nothing: the inbox dedupes on
 * event_id).
 *
 * The API client is blocking (libcurl easy): callers run it off any event loop (the edge's thread
 * pool). A call is retried on 429 (after Retry-After when given) and on 5xx or transport failures,
 * with exponential backoff and full jitter, up to max_attempts; 4xx other than 429 is final. The
 * answer of a refused call (Paddle's {"error":{"type","code","detail"}}) is kept in
 * bg_paddle_reply_t.error_code for the caller to log; the API key is never logged.
 */
#ifndef BG_PADDLE_H
#define BG_PADDLE_H

#include "bg/buf.h"
#include "bg/common.h"

/** Default tolerance of a signature's timestamp, in seconds (either direction; clock skew). */
#define BG_PADDLE_SIG_TOLERANCE_S 300
/** Most h1 values and secrets looked at (more are ignored: a bound on the work of one request). */
#define BG_PADDLE_SIG_MAX 8
/** Size of a lower-case hex HMAC-SHA256 plus its NUL. */
#define BG_PADDLE_SIG_HEX_SIZE 65

/**
 * Writes the h1 of (secret, ts text, body) into out: hex(HMAC-SHA256(secret, ts ":" body)). For
 * tests and the fake Paddle.
 */
void bg_paddle_sign(const char *secret, const char *ts, const char *body, size_t body_len,
                    char out[BG_PADDLE_SIG_HEX_SIZE]);

/**
 * Verifies a Paddle-Signature header (header_len bytes, need not be NUL-terminated) over the raw
 * body against the comma-separated secrets (blanks around each are trimmed) at now_s. Returns 0
 * when some secret signs some h1; BG_ERR_INVALID for a header without ts or h1 or with a ts that
 * is not a number; BG_ERR_TIMEOUT when |now_s − ts| > tolerance_s; BG_ERR_DENIED when no pair
 * matches or no secret is configured.
 */
BG_MUSTCHECK int bg_paddle_verify(const char *header, size_t header_len, const char *body,
                                  size_t body_len, const char *secrets, int64_t now_s,
                                  int64_t tolerance_s);

/** Where and how to call the Paddle API. Strings are borrowed. */
typedef struct bg_paddle_api {
    const char *base_url;    /**< "https://sandbox-api.paddle.com" (no trailing slash needed) */
    const char *api_key;     /**< Bearer key; NULL or "": not configured */
    int max_attempts;        /**< ≥ 1; 0 means 4 */
    int64_t backoff_base_ms; /**< first backoff; 0 means 200 */
    int64_t timeout_ms;      /**< per attempt; 0 means 10000 */
} bg_paddle_api_t;

/** What a call answered. */
typedef struct bg_paddle_reply {
    long status;         /**< HTTP status of the last attempt, 0 when none arrived */
    int attempts;        /**< attempts made */
    char error_code[64]; /**< Paddle's error.code of a refused call, "" otherwise */
    char id[64];         /**< data.id of a successful call ("txn_…", "sub_…"), "" otherwise */
    char checkout_url[1024];  /**< data.checkout.url of a transaction, "" when none */
    char state[32];           /**< data.status ("past_due", "completed", …), "" when none */
    char user_id[64];         /**< data.custom_data.user_id, "" when none */
    char customer_id[64];     /**< data.customer_id, "" when none */
    char subscription_id[64]; /**< data.subscription_id of a transaction, "" when none */
} bg_paddle_reply_t;

/** Returns true when api has a key (and a URL) to call Paddle with. */
bool bg_paddle_api_configured(const bg_paddle_api_t *api);

/**
 * POST /transactions: a transaction for one unit of price_id with custom_data {"user_id"} and,
 * when customer_id is not NULL, for that Paddle customer. Returns 0 (out->id, out->checkout_url);
 * BG_ERR_CONFIG when the API is not configured; BG_ERR_INVALID when Paddle refused the request
 * (4xx: out->status, out->error_code); BG_ERR_UNAVAILABLE when it kept failing (5xx, 429,
 * transport) through every attempt; BG_ERR_PROTOCOL for a success without data.id.
 */
BG_MUSTCHECK int bg_paddle_create_transaction(const bg_paddle_api_t *api, const char *price_id,
                                              const char *user_id, const char *customer_id,
                                              bg_paddle_reply_t *out);

/**
 * POST /subscriptions/{id}/cancel with effective_from next_billing_period: the subscription runs
 * to the end of the period it is paid for. Returns as bg_paddle_create_transaction.
 */
BG_MUSTCHECK int bg_paddle_cancel_subscription(const bg_paddle_api_t *api,
                                               const char *subscription_id, bg_paddle_reply_t *out);

/**
 * PATCH /subscriptions/{id} {"scheduled_change":null}: takes back a cancellation scheduled for the
 * end of the period. Returns as bg_paddle_create_transaction.
 */
BG_MUSTCHECK int bg_paddle_resume_subscription(const bg_paddle_api_t *api,
                                               const char *subscription_id, bg_paddle_reply_t *out);

/** How Paddle bills a change of a subscription's items (its proration_billing_mode). */
typedef enum bg_paddle_proration {
    BG_PADDLE_PRORATED_IMMEDIATELY,     /**< charge the prorated difference now (an upgrade) */
    BG_PADDLE_FULL_NEXT_BILLING_PERIOD, /**< charge the new price from the next renewal */
    BG_PADDLE_DO_NOT_BILL               /**< no charge (taking back a scheduled downgrade) */
} bg_paddle_proration_t;

/**
 * PATCH /subscriptions/{id} {"items":[{"price_id","quantity":1}],"proration_billing_mode"}: the
 * subscription's one item becomes price_id. Returns as bg_paddle_create_transaction.
 */
BG_MUSTCHECK int bg_paddle_change_items(const bg_paddle_api_t *api, const char *subscription_id,
                                        const char *price_id, bg_paddle_proration_t mode,
                                        bg_paddle_reply_t *out);

/**
 * GET /transactions/{id}: the transaction's status, checkout URL and owner (out->status,
 * out->checkout_url, out->user_id, out->customer_id, out->subscription_id). Returns as
 * bg_paddle_create_transaction; BG_ERR_NOT_FOUND when Paddle has no such transaction.
 */
BG_MUSTCHECK int bg_paddle_get_transaction(const bg_paddle_api_t *api, const char *transaction_id,
                                           bg_paddle_reply_t *out);

/**
 * GET /subscriptions/{id}/update-payment-method-transaction: for a past_due subscription, the
 * transaction that is owed (Paddle answers its most recent past_due transaction), with its
 * checkout URL. Returns as bg_paddle_get_transaction.
 */
BG_MUSTCHECK int bg_paddle_payment_transaction(const bg_paddle_api_t *api,
                                               const char *subscription_id, bg_paddle_reply_t *out);

/**
 * GET path (a list: /subscriptions?…, /transactions?…) with retries; the whole answer (at most 4
 * MiB) is appended to body. Returns 0, or as bg_paddle_create_transaction.
 */
BG_MUSTCHECK int bg_paddle_list(const bg_paddle_api_t *api, const char *path, bg_buf_t *body,
                                bg_paddle_reply_t *out);

#endif
