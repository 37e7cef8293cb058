/*
 * Applies the compiled-in migrations (see migrate.h for the contract).
 *
 * The sequence is: read and check the embedded files (names, order, checksums); take the advisory
 * lock; make sure schema_migrations exists (only under the lock: two CREATE TABLE IF NOT EXISTS can
 * still collide in the catalogue); compare what the database recorded with what the binary carries,
 * refusing before any change when they disagree; then run each pending file and record it in one
 * transaction. statement_timeout is lifted for the duration (a migration may legitimately build an
 * index for minutes, and waiting for another migrator's lock is not a stuck statement) and put back
 * afterwards, because the connection may be reused by the caller.
 *
 * Statements inside a file run through the simple query protocol (several statements per call);
 * that is safe only because the text is ours, compiled in, never input.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/log.h"
#include "bg/migrate.h"
#include "bg/pg.h"
#include "bg/resource.h"

#define PREFIX "migrations/"

typedef struct st_mig {
    char version[16];
    char name[64];
    char checksum[BG_CRYPTO_SHA256_HEX_LEN];
    const bg_resource_t *res; /* borrowed, static */
    bool applied;
    char applied_at[40];
} mig_t;

static const char create_table_sql[] =
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version text PRIMARY KEY,"
    " name text NOT NULL,"
    " checksum text NOT NULL CHECK (checksum ~ '^[0-9a-f]{64}$'),"
    " applied_at timestamptz NOT NULL DEFAULT now())";

/* Splits "migrations/0001_core.sql" into version and name; returns false when it does not fit. */
static bool parse_name(const char *path, mig_t *m)
{
    const char *base = path + strlen(PREFIX);
    size_t len = strlen(base);
    if (len < 5 || strcmp(base + len - 4, ".sql") != 0)
        return false;
    size_t digits = strspn(base, "0123456789");
    if (digits == 0 || digits >= sizeof(m->version) || base[digits] != '_')
        return false;
    const char *name = base + digits + 1;
    size_t nlen = (size_t)(base + len - 4 - name);
    if (nlen == 0 || nlen >= sizeof(m->name) ||
        strspn(name, "abcdefghijklmnopqrstuvwxyz0123456789_") < nlen)
        return false;
    memcpy(m->version, base, digits);
    m->version[digits] = '\0';
    memcpy(m->name, name, nlen);
    m->name[nlen] = '\0';
    return true;
}

/* Builds the list of embedded migrations (*out owned by the caller, free()). */
static int load_embedded(mig_t **out, size_t *n, char *err, size_t errlen)
{
    size_t count;
    const bg_resource_t *res = bg_resource_list(PREFIX, &count);
    mig_t *m = bg_calloc(count, sizeof(*m));
    for (size_t i = 0; i < count; i++) {
        if (!parse_name(res[i].name, &m[i])) {
            snprintf(err, errlen, "embedded file %s is not named NNNN_name.sql", res[i].name);
            free(m);
            return BG_ERR_INVALID;
        }
        /* Versions compare as text in the table, so they must sort the same way as numbers do. */
        if (i > 0 && (strlen(m[i].version) != strlen(m[0].version) ||
                      strcmp(m[i - 1].version, m[i].version) >= 0)) {
            snprintf(err, errlen,
                     "migration %s: version %s is duplicated or not zero-padded like %s",
                     res[i].name, m[i].version, m[0].version);
            free(m);
            return BG_ERR_INVALID;
        }
        m[i].res = &res[i];
        bg_crypto_sha256_hex(res[i].data, res[i].len, m[i].checksum);
    }
    *out = m;
    *n = count;
    return 0;
}

/*
 * Reads schema_migrations (when it exists) and marks the embedded migrations applied. Returns
 * BG_ERR_CHECKSUM when a row disagrees with the binary. *pending gets the number not applied.
 */
static int compare_with_db(PGconn *c, mig_t *m, size_t n, int *pending, char *err, size_t errlen)
{
    PGresult *res;
    int rc = bg_pg_exec(c, "SELECT to_regclass('schema_migrations') IS NOT NULL", 0, NULL, &res);
    if (rc != 0) {
        snprintf(err, errlen, "cannot read the migration state: %s", bg_strerror(rc));
        return rc;
    }
    bool exists = strcmp(PQgetvalue(res, 0, 0), "t") == 0;
    PQclear(res);
    *pending = (int)n;
    if (!exists)
        return 0;

    rc = bg_pg_exec(c,
                    "SELECT version, checksum, applied_at FROM schema_migrations ORDER BY version",
                    0, NULL, &res);
    if (rc != 0) {
        snprintf(err, errlen, "cannot read schema_migrations: %s", bg_strerror(rc));
        return rc;
    }
    for (int r = 0; r < PQntuples(res); r++) {
        const char *version = PQgetvalue(res, r, 0);
        const char *sum = PQgetvalue(res, r, 1);
        mig_t *found = NULL;
        for (size_t i = 0; i < n && found == NULL; i++) {
            if (strcmp(m[i].version, version) == 0)
                found = &m[i];
        }
        if (found == NULL) {
            snprintf(err, errlen,
                     "the database has migration %s, which this binary does not carry: it is older "
                     "than the schema; deploy the newer binary",
                     version);
            rc = BG_ERR_CHECKSUM;
            break;
        }
        if (strcmp(found->checksum, sum) != 0) {
            snprintf(err, errlen,
                     "migration %s was changed after it was applied (checksum %.12s… in the "
                     "database, %.12s… in this binary); revert the edit and add a new migration",
                     found->res->name, sum, found->checksum);
            rc = BG_ERR_CHECKSUM;
            break;
        }
        found->applied = true;
        (void)bg_strlcpy(found->applied_at, PQgetvalue(res, r, 2), sizeof(found->applied_at));
        (*pending)--;
    }
    PQclear(res);
    return rc;
}

/* Runs one migration and records it, in one transaction. */
static int apply_one(PGconn *c, const mig_t *m, char *err, size_t errlen)
{
    bg_pg_error_t e;
    int rc = bg_pg_begin(c);
    if (rc != 0)
        goto err_report;
    rc = bg__pg_exec_script(c, m->res->data, &e);
    if (rc != 0) {
        bg_pg_rollback(c);
        snprintf(err, errlen, "migration %s failed: %s (SQLSTATE %s)", m->res->name, e.message,
                 e.sqlstate[0] != '\0' ? e.sqlstate : "none");
        /* A broken migration is a defect of the binary, not of the database. */
        return rc == BG_ERR_UNAVAILABLE ? rc : BG_ERR_INVALID;
    }
    const char *params[] = {m->version, m->name, m->checksum};
    rc = bg_pg_run(c, "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                   3, params);
    if (rc != 0)
        goto err_rollback;
    rc = bg_pg_commit_ex(c, &e);
    if (rc != 0) {
        snprintf(err, errlen, "migration %s failed at commit: %s (SQLSTATE %s)", m->res->name,
                 e.message, e.sqlstate[0] != '\0' ? e.sqlstate : "none");
        return rc;
    }
    return 0;

err_rollback:
    bg_pg_rollback(c);
err_report:
    snprintf(err, errlen, "migration %s: %s", m->res->name, bg_strerror(rc));
    return rc;
}

int bg_migrate_apply(PGconn *c, int *applied, char *err, size_t errlen)
{
    *applied = 0;
    if (errlen > 0)
        err[0] = '\0';
    mig_t *m;
    size_t n;
    int rc = load_embedded(&m, &n, err, errlen);
    if (rc != 0)
        return rc;

    /* Remember the caller's statement_timeout, then lift it (see the top of the file). */
    PGresult *res;
    rc = bg_pg_exec(c,
                    "SELECT current_setting('statement_timeout'), "
                    "set_config('statement_timeout', '0', false)",
                    0, NULL, &res);
    if (rc != 0) {
        snprintf(err, errlen, "cannot prepare the session: %s", bg_strerror(rc));
        goto err_free;
    }
    char saved_timeout[32];
    (void)bg_strlcpy(saved_timeout, PQgetvalue(res, 0, 0), sizeof(saved_timeout));
    PQclear(res);

    char key[24];
    snprintf(key, sizeof(key), "%lld", (long long)BG_MIGRATE_LOCK_KEY);
    const char *kp[] = {key};
    rc = bg_pg_run(c, "SELECT pg_advisory_lock($1::bigint)", 1, kp);
    if (rc != 0) {
        snprintf(err, errlen, "cannot take the migration lock: %s", bg_strerror(rc));
        goto err_restore;
    }
    rc = bg_pg_run(c, create_table_sql, 0, NULL);
    if (rc != 0) {
        snprintf(err, errlen, "cannot create schema_migrations: %s", bg_strerror(rc));
        goto err_unlock;
    }
    int pending;
    rc = compare_with_db(c, m, n, &pending, err, errlen);
    if (rc != 0)
        goto err_unlock;
    for (size_t i = 0; i < n; i++) {
        if (m[i].applied)
            continue;
        rc = apply_one(c, &m[i], err, errlen);
        if (rc != 0)
            goto err_unlock;
        (*applied)++;
        bg_info("applied migration %s", m[i].res->name);
    }

err_unlock:
    /* Also released when the session ends; unlocking here lets a reused connection go on. */
    if (bg_pg_run(c, "SELECT pg_advisory_unlock($1::bigint)", 1, kp) != 0)
        bg_warn("could not release the migration lock; it goes with the session");
err_restore : {
    const char *tp[] = {saved_timeout};
    if (bg_pg_run(c, "SELECT set_config('statement_timeout', $1, false)", 1, tp) != 0)
        bg_warn("could not restore statement_timeout after migrating");
}
err_free:
    free(m);
    return rc;
}

int bg_migrate_list(PGconn *c, bg_migration_info_t *out, size_t max, size_t *count, char *err,
                    size_t errlen)
{
    *count = 0;
    if (errlen > 0)
        err[0] = '\0';
    mig_t *m;
    size_t n;
    int rc = load_embedded(&m, &n, err, errlen);
    if (rc != 0)
        return rc;
    int pending;
    rc = compare_with_db(c, m, n, &pending, err, errlen);
    if (rc == 0) {
        for (size_t i = 0; i < n && i < max; i++) {
            bg_migration_info_t *o = &out[i];
            memset(o, 0, sizeof(*o));
            (void)bg_strlcpy(o->version, m[i].version, sizeof(o->version));
            (void)bg_strlcpy(o->name, m[i].name, sizeof(o->name));
            (void)bg_strlcpy(o->file, m[i].res->name, sizeof(o->file));
            (void)bg_strlcpy(o->checksum, m[i].checksum, sizeof(o->checksum));
            o->applied = m[i].applied;
            (void)bg_strlcpy(o->applied_at, m[i].applied_at, sizeof(o->applied_at));
        }
        *count = n;
    }
    free(m);
    return rc;
}

int bg_migrate_status(PGconn *c, int *pending, char *err, size_t errlen)
{
    *pending = 0;
    if (errlen > 0)
        err[0] = '\0';
    mig_t *m;
    size_t n;
    int rc = load_embedded(&m, &n, err, errlen);
    if (rc != 0)
        return rc;
    rc = compare_with_db(c, m, n, pending, err, errlen);
    free(m);
    return rc;
}
