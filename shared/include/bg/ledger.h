/*
 * The double-entry ledger (DESIGN.md §4, migrations/0003_billing.sql), from the writer's side: find
 * or create accounts by their natural key, and post a balanced transaction once per idempotency
 * key.
 *
 * Every function here runs inside the caller's database transaction (bg_pg_begin … bg_pg_commit),
 * so the ledger record commits or rolls back with the effect it records (a usage row, a
 * subscription). The database checks the balance again at COMMIT (a deferred constraint trigger);
 * the checks here only turn a programming mistake into BG_ERR_INVALID before a round trip.
 *
 * Accounts: one unit each (an ISO 4217 currency, amounts in minor units, or "request" for request
 * credits), owned by a user, an organization, or the system (owner id NULL). The natural key
 * (owner_type, owner_id, purpose, unit) is unique, so find-or-create is race-free.
 *
 * Idempotency: a transaction carries a unique idempotency key (a Paddle event id, "usage:<job id>",
 * "grant:<subscription id>"). Posting a key that exists already writes nothing and reports
 * posted = false with the existing transaction's id: a redelivered event never counts twice.
 */
#ifndef BG_LEDGER_H
#define BG_LEDGER_H

#include <libpq-fe.h>

#include "bg/common.h"

/** Length of an id (a uuid in text form) without its NUL. */
#define BG_LEDGER_ID_LEN 36
/** Most entries one transaction may have. */
#define BG_LEDGER_MAX_ENTRIES 16
/** The unit of request credits. */
#define BG_LEDGER_UNIT_REQUEST "request"

/**
 * Finds or creates the account (owner_type, owner_id, purpose, unit) and writes its id into id.
 * owner_type is "system" (owner_id NULL), "user" or "organization" (owner_id a uuid); purpose
 * matches ^[a-z][a-z0-9_]{0,31}$ ("credits", "consumed", "grants", …); unit is "request" or a
 * currency code. Inside the caller's transaction. Returns 0; BG_ERR_INVALID when the database
 * refuses the key (a malformed uuid, purpose or unit); or a database error of bg_pg_exec().
 */
BG_MUSTCHECK int bg_ledger_account(PGconn *c, const char *owner_type, const char *owner_id,
                                   const char *purpose, const char *unit,
                                   char id[BG_LEDGER_ID_LEN + 1]);

/** One entry of a transaction. Strings are borrowed. */
typedef struct bg_ledger_entry {
    const char *account_id; /**< an id from bg_ledger_account() */
    const char *unit;       /**< the account's unit */
    int64_t amount;         /**< signed, non-zero */
} bg_ledger_entry_t;

/** A transaction to post. Strings are borrowed for the duration of the call. */
typedef struct bg_ledger_tx {
    const char *idempotency_key; /**< 1 .. 200 bytes, unique over the whole ledger */
    const char *kind;            /**< ^[a-z][a-z0-9_.]{0,63}$: "usage.settle", "grant.plan", … */
    const char *description;     /**< ≤ 500 bytes; NULL for "" */
    const char *user_id;         /**< whom it concerns (a uuid), or NULL */
    const char *metadata_json;   /**< a JSON object as text, or NULL for {} */
    int64_t effective_at_ms;     /**< unix ms when it counts; 0 for now */
    size_t nentries;             /**< 2 .. BG_LEDGER_MAX_ENTRIES */
    const bg_ledger_entry_t *entries;
} bg_ledger_tx_t;

/**
 * Returns whether tx is well formed: key, kind and entries present, amounts non-zero, and the
 * amounts of every unit summing to zero.
 */
bool bg_ledger_tx_is_balanced(const bg_ledger_tx_t *tx);

/**
 * Posts tx inside the caller's transaction unless its idempotency key was posted before. Sets
 * *posted (may be NULL) to whether this call wrote it, and tx_id (may be NULL) to the id of the
 * transaction, new or existing. Returns 0; BG_ERR_INVALID for a transaction that is not balanced
 * or that the database refuses (bad kind, unknown account, metadata not an object); or a database
 * error of bg_pg_exec() (the caller rolls back).
 */
BG_MUSTCHECK int bg_ledger_post(PGconn *c, const bg_ledger_tx_t *tx, bool *posted,
                                char tx_id[BG_LEDGER_ID_LEN + 1]);

#endif
