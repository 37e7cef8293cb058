/*
 * Billing with Paddle: the webhook inbox and applying its events to subscriptions and the ledger
 * (docs/billing.md has the rules in prose).
 *
 * Inbox. The edge verifies a notification's signature, then bg_billing_inbox_put() stores it in
 * webhook_inbox, unique on (provider, event_id): a redelivery stores nothing. The edge enqueues a
 * billing job whenever the event is not processed yet (new, or stored by an earlier delivery whose
 * enqueue or processing did not finish), so a lost job is recovered by Paddle's own retry.
 *
 * Applying. bg_billing_apply() applies one stored event in one Postgres transaction that locks the
 * inbox row and then the user's row, so two workers never apply events of one user at once.
 * Deliveries arrive at least once and out of order; the effects are the same whatever the order:
 *   - a subscription row (keyed by paddle_subscription_id) takes status, plan, flags from the
 *     newest snapshot by occurred_at (last_event_at) and its billing period from the newest
 *     snapshot that carried one (paddle_period_at). An older snapshot changes nothing and is kept
 *     in the inbox with outcome 'stale';
 *   - money and credits are ledger transactions keyed by what they are about, not by the event
 *     that told us: "paddle:payment:<txn>" and "paddle:credits:<txn>" (transaction.paid and
 *     transaction.completed of one transaction post once), "paddle:trial:<sub>:<period start>";
 *   - payment rows are upserted on (provider, provider_payment_id);
 *   - the plan a subscription grants is the dearest per day of the plans its snapshots named for
 *     the current billing period (an upgrade counts at once, a downgrade from the next period),
 *     and a newer snapshot's different plan is the scheduled one (scheduled_plan_id);
 *   - one invoice per transaction (invoices.paddle_transaction_id), its status derived from its
 *     payments, refunds and chargebacks;
 *   - adjustment.created/updated (refund, chargeback) add a payments row and, once approved, a
 *     reversing ledger transaction keyed "paddle:refund:<adjustment>".
 * The user is custom_data.user_id (set at checkout), else the owner of the Paddle subscription or
 * customer already known. A plan is the one whose paddle_price_id is one of the items' prices.
 */
#ifndef BG_BILLING_H
#define BG_BILLING_H

#include <libpq-fe.h>

#include "bg/buf.h"
#include "bg/common.h"

/** Largest notification body stored (Paddle's are a few tens of KiB). */
#define BG_BILLING_BODY_MAX (512 * 1024)
/** Size of an event id buffer (webhook_inbox.event_id: 1..200 characters, plus NUL). */
#define BG_BILLING_EVENT_ID_SIZE 201
/** Most history items one page holds. */
#define BG_BILLING_HISTORY_MAX 100

/** What storing a notification did. */
typedef struct bg_billing_inbox_result {
    bool inserted; /**< first delivery of this event */
    bool pending;  /**< not processed yet: enqueue a billing job */
    char event_id[BG_BILLING_EVENT_ID_SIZE];
} bg_billing_inbox_result_t;

/**
 * Stores a Paddle notification (body: len bytes of JSON) unless its event_id is stored already.
 * Returns 0; BG_ERR_INVALID for a body that is not a JSON object with string event_id and
 * event_type and an RFC 3339 occurred_at; BG_ERR_TOO_LARGE past BG_BILLING_BODY_MAX; or a database
 * error.
 */
BG_MUSTCHECK int bg_billing_inbox_put(PGconn *c, const char *body, size_t len,
                                      bg_billing_inbox_result_t *out);

/** What applying an event did. */
typedef struct bg_billing_result {
    char outcome[12]; /**< "applied", "stale", "recorded", "ignored" */
    char event_type[101];
    char user_id[37]; /**< whose admission state to compile again, "" when none */
    bool already;     /**< processed before; nothing was done now */
    char error[200];  /**< why it failed, for the job's last error and the inbox row */
} bg_billing_result_t;

/**
 * Applies the stored Paddle event event_id (see above) and marks it processed, in one
 * transaction; an event processed before changes nothing (out->already). Returns 0;
 * BG_ERR_NOT_FOUND when no such event is stored; BG_ERR_RETRY when its user is not known yet (a
 * later event may tell); BG_ERR_INVALID when it can never apply (no plan has its price id; a value
 * the database refuses), with out->error; or a database error. The caller compiles out->user_id's
 * admission state again after a 0.
 */
BG_MUSTCHECK int bg_billing_apply(PGconn *c, const char *event_id, bg_billing_result_t *out);

/** Records a failed attempt (attempts + 1, error) on the inbox row. Returns 0 or a database error.
 */
BG_MUSTCHECK int bg_billing_note_failure(PGconn *c, const char *event_id, const char *error);

/** What a user may do about their Paddle subscription. */
typedef struct bg_billing_checkout {
    char price_id[101];        /**< the plan's Paddle price id, "" when none */
    bool purchasable;          /**< active and for sale */
    char customer_id[64];      /**< the user's Paddle customer, "" when none */
    char subscription_id[64];  /**< the user's live Paddle subscription, "" when none */
    bool cancel_at_period_end; /**< that subscription is scheduled to end */
} bg_billing_checkout_t;

/**
 * Reads what a checkout of plan_id (may be NULL: skip the plan) by user_id needs. Returns 0,
 * BG_ERR_NOT_FOUND for an unknown plan, or a database error.
 */
BG_MUSTCHECK int bg_billing_checkout_info(PGconn *c, const char *user_id, const char *plan_id,
                                          bg_billing_checkout_t *out);

/** What a plan change needs to know (bg_billing_change_info). */
typedef struct bg_billing_change {
    char price_id[101];       /**< the new plan's Paddle price id, "" when none */
    bool purchasable;         /**< the new plan is active and for sale */
    char subscription_id[64]; /**< the user's live Paddle subscription, "" when none */
    char current_plan[33];    /**< the plan it grants now */
    char scheduled_plan[33];  /**< the plan that follows at the period end, "" when none */
    bool upgrade;             /**< the new plan costs more per day than current_plan */
    char period_end[40];      /**< RFC 3339 end of the current period */
} bg_billing_change_t;

/**
 * Reads what changing user_id's Paddle subscription to plan_id needs. Returns 0,
 * BG_ERR_NOT_FOUND for an unknown plan, or a database error.
 */
BG_MUSTCHECK int bg_billing_change_info(PGconn *c, const char *user_id, const char *plan_id,
                                        bg_billing_change_t *out);

/**
 * Whether Paddle transaction txn belongs to user_id as far as Postgres knows: an invoice or payment
 * of theirs, or of their Paddle customer or subscription (customer_id, subscription_id: what
 * Paddle says, may be ""). Returns 1 (theirs), 0 (not), or a negative database error.
 */
BG_MUSTCHECK int bg_billing_owns_transaction(PGconn *c, const char *user_id, const char *txn,
                                             const char *customer_id, const char *subscription_id);

/** The user's billing account, made when missing (one statement); writes its id. Returns 0 or a
 * database error. */
BG_MUSTCHECK int bg_billing_account_of(PGconn *c, const char *user_id, char id[37]);

/**
 * Reads the user's live Paddle subscription and whether it is past_due. Returns 0 (sub "" when
 * none) or a database error.
 */
BG_MUSTCHECK int bg_billing_live_subscription(PGconn *c, const char *user_id, char sub[64],
                                              bool *past_due);

/** A change of the user's subscription scheduled for the end of its period. */
typedef struct bg_billing_scheduled {
    char action[16];       /**< "cancel", "change_plan", or "" when nothing is scheduled */
    char plan[33];         /**< change_plan: the plan that follows */
    char effective_at[40]; /**< RFC 3339 */
} bg_billing_scheduled_t;

/** Reads the user's scheduled change (action "" when none). Returns 0 or a database error. */
BG_MUSTCHECK int bg_billing_scheduled(PGconn *c, const char *user_id, bg_billing_scheduled_t *out);

/** What /billing/account says of the next payment and the card (or other method) it comes from. */
typedef struct bg_billing_outlook {
    bool next_bill;        /**< a renewal is coming: at, amount_minor, currency, plan are set */
    char next_bill_at[40]; /**< RFC 3339: the end of the current period */
    int64_t amount_minor;  /**< the price of the plan that renews (a scheduled one included) */
    char currency[4];
    char plan[33];
    bool method;          /**< a payment method is known: from the last captured payment */
    char method_type[24]; /**< "card", "paypal", … */
    char card_brand[24];  /**< "visa", … ("" when not a card) */
    char card_last4[8];
    char sub_status[12]; /**< the live subscription's status ("past_due", …), "" when none */
} bg_billing_outlook_t;

/**
 * Reads the user's live subscription's status, the next bill (a live Paddle subscription that is
 * not cancelled at its period end renews then, at the price of the plan that follows) and the
 * payment method of the last captured payment of their invoices. Returns 0 (the flags say what was
 * found) or a database error.
 */
BG_MUSTCHECK int bg_billing_outlook(PGconn *c, const char *user_id, bg_billing_outlook_t *out);

/** Most invoices one page holds. */
#define BG_BILLING_INVOICES_MAX 100

/**
 * Writes the user's invoices page as {"data":[Invoice…],"next_cursor":…} into out, newest first
 * (docs/billing.md has the Invoice object). cursor: NULL or the previous page's next_cursor.
 * Returns 0, BG_ERR_INVALID for a malformed cursor, or a database error.
 */
BG_MUSTCHECK int bg_billing_invoices(PGconn *c, const char *user_id, const char *cursor, int limit,
                                     bg_buf_t *out);

/** One invoice, as the HTML page needs it (strings; "" for null). */
typedef struct bg_billing_invoice {
    char id[37];
    char number[64];
    char status[16];
    char plan[33];
    char plan_name[101];
    char currency[4];
    int64_t subtotal_minor, tax_minor, total_minor;
    int64_t period_start_ms, period_end_ms, issued_ms, paid_ms; /**< 0 when null */
    char email[256]; /**< the billing account's or the user's address */
} bg_billing_invoice_t;

/**
 * Reads invoice id of user_id: its JSON object into json (when not NULL) and its fields into inv
 * (when not NULL). Returns 0; BG_ERR_NOT_FOUND when there is no such invoice of theirs (a
 * malformed id included); or a database error.
 */
BG_MUSTCHECK int bg_billing_invoice(PGconn *c, const char *user_id, const char *id, bg_buf_t *json,
                                    bg_billing_invoice_t *inv);

/**
 * Writes the user's billing history page as {"data":[…],"next_cursor":…} into out: payments,
 * refunds and request credits from the ledger, newest first, at most limit (1..
 * BG_BILLING_HISTORY_MAX) after cursor (NULL: the first page; else the previous page's
 * next_cursor). Returns 0, BG_ERR_INVALID for a malformed cursor, or a database error.
 */
BG_MUSTCHECK int bg_billing_history(PGconn *c, const char *user_id, const char *cursor, int limit,
                                    bg_buf_t *out);

#endif
