/*
 * Writing the ledger (see bg/ledger.h).
 *
 * Round trips matter here: the usage worker posts one transaction per LLM request. An account that
 * exists (the common case) costs one SELECT; a new one an INSERT … ON CONFLICT DO NOTHING and, when
 * another transaction created it first, a second SELECT (a fresh statement sees the row the
 * conflicting transaction committed, which the INSERT's own snapshot would not). A transaction and
 * all its entries are one statement: a data-modifying CTE inserts the transaction, and the entries
 * only when it was inserted, from arrays (unnest), so a duplicate key writes nothing at all.
 *
 * The arrays are array literals built here from values checked first (uuids, units of letters
 * only), never from free text, so no quoting is needed; every value still travels as a parameter.
 */
#include "bg/ledger.h"

#include <assert.h>
#include <stdio.h>
#include <string.h>

#include "bg/err.h"
#include "bg/id.h"
#include "bg/pg.h"

static void copy_id(char id[BG_LEDGER_ID_LEN + 1], const PGresult *res)
{
    const char *v = bg_pg_value(res, 0, 0);
    (void)bg_strlcpy(id, v != NULL ? v : "", BG_LEDGER_ID_LEN + 1);
}

/* Runs a query expected to return at most one id; *found tells whether it did. sql is one of this
 * file's fixed statements (prepared once per connection). */
static int select_id(PGconn *c, const char *sql, int n, const char *const *p, bool *found,
                     char id[BG_LEDGER_ID_LEN + 1])
{
    PGresult *res;
    int rc = bg_pg_exec_prep(c, sql, n, p, &res);
    if (rc != 0)
        return rc;
    *found = PQntuples(res) > 0 && bg_pg_value(res, 0, 0) != NULL;
    if (*found)
        copy_id(id, res);
    PQclear(res);
    return 0;
}

int bg_ledger_account(PGconn *c, const char *owner_type, const char *owner_id, const char *purpose,
                      const char *unit, char id[BG_LEDGER_ID_LEN + 1])
{
    static const char find[] = "SELECT id FROM ledger_accounts WHERE owner_type = $1 "
                               "AND owner_id IS NOT DISTINCT FROM $2::uuid AND purpose = $3 "
                               "AND unit = $4";
    if (!bg_str_present(owner_type) || !bg_str_present(purpose) || !bg_str_present(unit))
        return BG_ERR_INVALID;
    if (owner_id != NULL && !bg_id_uuid_is_valid(owner_id))
        return BG_ERR_INVALID;
    const char *p[] = {owner_type, owner_id, purpose, unit};
    bool found = false;
    int rc = select_id(c, find, 4, p, &found, id);
    if (rc != 0 || found)
        return rc;
    rc = select_id(c,
                   "INSERT INTO ledger_accounts (owner_type, owner_id, purpose, unit) "
                   "VALUES ($1, $2::uuid, $3, $4) "
                   "ON CONFLICT (owner_type, owner_id, purpose, unit) DO NOTHING RETURNING id",
                   4, p, &found, id);
    if (rc != 0 || found)
        return rc;
    rc = select_id(c, find, 4, p, &found, id);
    return rc != 0 ? rc : found ? 0 : BG_ERR_PROTOCOL;
}

/* A unit is "request" or three capital letters: safe inside an array literal as it is. */
static bool unit_is_valid(const char *u)
{
    if (u == NULL)
        return false;
    if (strcmp(u, BG_LEDGER_UNIT_REQUEST) == 0)
        return true;
    return strlen(u) == 3 && u[0] >= 'A' && u[0] <= 'Z' && u[1] >= 'A' && u[1] <= 'Z' &&
           u[2] >= 'A' && u[2] <= 'Z';
}

bool bg_ledger_tx_is_balanced(const bg_ledger_tx_t *tx)
{
    if (tx == NULL || !bg_str_present(tx->idempotency_key) || !bg_str_present(tx->kind) ||
        tx->nentries < 2 || tx->nentries > BG_LEDGER_MAX_ENTRIES || tx->entries == NULL)
        return false;
    for (size_t i = 0; i < tx->nentries; i++) {
        const bg_ledger_entry_t *e = &tx->entries[i];
        if (e->amount == 0 || !unit_is_valid(e->unit) || e->account_id == NULL ||
            !bg_id_uuid_is_valid(e->account_id))
            return false;
    }
    /* Per unit: sum the entries of the first occurrence of each unit. Amounts are bounded by the
     * int64 range; the sums are checked for overflow so a huge pair cannot wrap to zero. */
    for (size_t i = 0; i < tx->nentries; i++) {
        bool first = true;
        for (size_t j = 0; j < i; j++)
            first = first && strcmp(tx->entries[j].unit, tx->entries[i].unit) != 0;
        if (!first)
            continue;
        int64_t sum = 0;
        for (size_t j = i; j < tx->nentries; j++) {
            if (strcmp(tx->entries[j].unit, tx->entries[i].unit) != 0)
                continue;
            if (__builtin_add_overflow(sum, tx->entries[j].amount, &sum))
                return false;
        }
        if (sum != 0)
            return false;
    }
    return true;
}

/* Room for an array literal of BG_LEDGER_MAX_ENTRIES uuids (or amounts of 20 digits), commas,
 * braces and the NUL. */
#define ARRAY_LITERAL_MAX (BG_LEDGER_MAX_ENTRIES * (BG_LEDGER_ID_LEN + 1) + 3)

/* Writes "{a,b,…}" of the entries' account ids, units or amounts (which = 0, 1, 2) into out. The
 * values were checked by bg_ledger_tx_is_balanced, so they fit and need no quoting. */
static void array_literal(char out[ARRAY_LITERAL_MAX], const bg_ledger_tx_t *tx, int which)
{
    size_t len = 0;
    out[len++] = '{';
    for (size_t i = 0; i < tx->nentries; i++) {
        const bg_ledger_entry_t *e = &tx->entries[i];
        char n[24];
        const char *v = n;
        if (which == 0)
            v = e->account_id;
        else if (which == 1)
            v = e->unit;
        else
            snprintf(n, sizeof(n), "%lld", (long long)e->amount);
        int w = snprintf(out + len, ARRAY_LITERAL_MAX - 1 - len, "%s%s", i > 0 ? "," : "", v);
        assert(w > 0 && (size_t)w < ARRAY_LITERAL_MAX - 1 - len);
        len += (size_t)w;
    }
    out[len++] = '}';
    out[len] = '\0';
}

int bg_ledger_post(PGconn *c, const bg_ledger_tx_t *tx, bool *posted,
                   char tx_id[BG_LEDGER_ID_LEN + 1])
{
    if (posted != NULL)
        *posted = false;
    if (!bg_ledger_tx_is_balanced(tx))
        return BG_ERR_INVALID;
    char eff[24];
    if (tx->effective_at_ms > 0)
        snprintf(eff, sizeof(eff), "%lld", (long long)tx->effective_at_ms);
    char arr[3][ARRAY_LITERAL_MAX];
    for (int i = 0; i < 3; i++)
        array_literal(arr[i], tx, i);
    const char *p[] = {tx->idempotency_key,
                       tx->kind,
                       tx->description != NULL ? tx->description : "",
                       tx->user_id,
                       tx->metadata_json != NULL ? tx->metadata_json : "{}",
                       tx->effective_at_ms > 0 ? eff : NULL,
                       arr[0],
                       arr[1],
                       arr[2]};
    bool found = false;
    char id[BG_LEDGER_ID_LEN + 1] = "";
    int rc = select_id(
        c,
        "WITH tx AS (INSERT INTO ledger_transactions (idempotency_key, kind, description, "
        "  user_id, metadata, effective_at) VALUES ($1, $2, $3, $4::uuid, $5::jsonb, "
        "  coalesce(to_timestamp($6::bigint / 1000.0), now())) "
        "  ON CONFLICT (idempotency_key) DO NOTHING RETURNING id), "
        "ent AS (INSERT INTO ledger_entries (transaction_id, account_id, unit, amount) "
        "  SELECT tx.id, e.a, e.u, e.m FROM tx, "
        "  unnest($7::uuid[], $8::text[], $9::bigint[]) AS e(a, u, m)) "
        "SELECT id FROM tx",
        9, p, &found, id);
    if (rc != 0)
        return rc;
    if (!found) {
        const char *kp[] = {tx->idempotency_key};
        rc = select_id(c, "SELECT id FROM ledger_transactions WHERE idempotency_key = $1", 1, kp,
                       &found, id);
        if (rc != 0)
            return rc;
        if (!found)
            return BG_ERR_PROTOCOL; /* a conflict on a key that is not there */
    } else if (posted != NULL) {
        *posted = true;
    }
    if (tx_id != NULL)
        (void)bg_strlcpy(tx_id, id, BG_LEDGER_ID_LEN + 1);
    return 0;
}
