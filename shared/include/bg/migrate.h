/*
 * Schema migrations: the numbered SQL files of migrations/, compiled into the binary.
 *
 * A migration "migrations/0003_billing.sql" has version "0003" and name "billing". The table
 * schema_migrations records every applied version with the SHA-256 of the file's bytes. Applying
 * takes a session advisory lock, so concurrent runs (several pods starting) serialise and the later
 * ones find nothing to do; each pending file then runs in its own transaction together with the row
 * that records it, so a failed migration leaves no trace and the next run retries it.
 *
 * Applied migrations are immutable: when the checksum recorded for a version differs from the file
 * this binary carries, or the database holds a version this binary does not know (an older binary
 * against a newer schema), nothing is applied and the call fails with BG_ERR_CHECKSUM and a message
 * naming the file. Changes go into a new file.
 */
#ifndef BG_MIGRATE_H
#define BG_MIGRATE_H

#include <libpq-fe.h>

#include "bg/common.h"

/** The advisory-lock key held while migrating ("bgmigrat" in ASCII). */
#define BG_MIGRATE_LOCK_KEY INT64_C(0x62676d6967726174)

/**
 * Applies every pending migration in version order. Returns 0 and the number applied through
 * *applied (0 when the database was current). On failure returns BG_ERR_CHECKSUM (an applied
 * migration was edited, or the database is newer than this binary), BG_ERR_INVALID (an embedded
 * file name does not follow NNNN_name.sql, or a migration's SQL failed: err names the file and
 * quotes the server's message), or an error of bg_pg_exec(); err holds a one-line explanation.
 * Migrations applied before a failure stay applied (*applied counts them). c must not be inside a
 * transaction.
 */
BG_MUSTCHECK int bg_migrate_apply(PGconn *c, int *applied, char *err, size_t errlen);

/**
 * Checks the database against the embedded migrations without changing anything (for /readyz and
 * `bgctl migrate status`). Returns 0 with the number of migrations not yet applied in *pending (0:
 * the schema is current), or the errors of bg_migrate_apply() (BG_ERR_CHECKSUM for an edited or
 * unknown migration) with err explaining.
 */
BG_MUSTCHECK int bg_migrate_status(PGconn *c, int *pending, char *err, size_t errlen);

/** One embedded migration and its state in a database, for listings. */
typedef struct bg_migration_info {
    char version[16];
    char name[64];
    char file[128];    /**< "migrations/0001_core.sql" */
    char checksum[65]; /**< SHA-256 hex of the embedded file */
    bool applied;
    char applied_at[40]; /**< timestamptz text when applied, else "" */
} bg_migration_info_t;

/**
 * Lists the embedded migrations with their state in the database: fills up to max entries of out
 * and sets *count to the number of embedded migrations. Returns 0, or the errors of
 * bg_migrate_status().
 */
BG_MUSTCHECK int bg_migrate_list(PGconn *c, bg_migration_info_t *out, size_t max, size_t *count,
                                 char *err, size_t errlen);

#endif
