/*
 * Blocking PostgreSQL helpers (libpq) for workers, bgctl and the edge's thread pool.
 *
 * One connection belongs to one thread at a time (DESIGN.md §4): a worker thread or a pool thread
 * keeps its own through bg_pg_thread_conn(), which reconnects lazily after the server went away.
 * Queries are parameterised only (PQexecParams, text format); there is no function here that takes
 * SQL and input together as one string. Failures come back as bg_err codes chosen from the
 * SQLSTATE, so callers can tell "the database is down" (BG_ERR_UNAVAILABLE → 503) from "that email
 * is taken" (BG_ERR_CONFLICT → 409) without parsing messages. Logs carry the SQLSTATE, the
 * constraint and the server's primary message, never parameter values, connection URLs with
 * passwords, or data values quoted by the server (messages of SQLSTATE class 22 quote input, so
 * they are not logged).
 */
#ifndef BG_PG_H
#define BG_PG_H

#include <libpq-fe.h>

#include "bg/buf.h"
#include "bg/common.h"

/** Process-wide connection settings; see bg_pg_setup(). */
typedef struct bg_pg_settings {
    const char *application_name; /**< shown in pg_stat_activity; copied; NULL keeps the current */
    int64_t statement_timeout_ms; /**< per statement; 0 means no timeout; < 0 keeps the current */
    int connect_timeout_s; /**< per connection attempt (libpq connect_timeout); ≤ 0 keeps */
} bg_pg_settings_t;

/**
 * Sets the settings every later connection of this process uses (defaults: application_name
 * "bot-generic", statement_timeout 30 s, connect_timeout 5 s). Call it once at start, before any
 * thread connects; it is not synchronised with bg_pg_connect().
 */
void bg_pg_setup(const bg_pg_settings_t *settings);

/**
 * Connects to url (a postgresql:// URI or key=value string), trying up to attempts (≥ 1) times with
 * exponential backoff and full jitter between tries (100 ms doubling, capped at 5 s), and applies
 * application_name and statement_timeout. On success returns 0 and *out is an owned connection
 * (PQfinish it). On failure returns BG_ERR_UNAVAILABLE (server unreachable or refusing), or
 * BG_ERR_INVALID (url does not parse), *out is NULL, and err holds libpq's reason with the password
 * masked out, prefixed by host:port/dbname.
 */
BG_MUSTCHECK int bg_pg_connect(const char *url, int attempts, PGconn **out, char *err,
                               size_t errlen);

/**
 * Writes a form of url that is safe to log into out: host, port and database only, no user or
 * password ("127.0.0.1:5432/bg"). Writes "(invalid database URL)" when url does not parse.
 */
void bg_pg_describe_url(const char *url, char *out, size_t outlen);

/**
 * Returns this thread's connection to url (borrowed: valid until bg_pg_thread_close() or the thread
 * ends), connecting first when there is none, when the one there is CONNECTION_BAD, or when it was
 * made for another url. Tries once; returns NULL (and logs why) when the server cannot be reached.
 * A connection left inside a transaction block by an earlier failure is rolled back first.
 */
PGconn *bg_pg_thread_conn(const char *url);

/** Closes this thread's connection, if any. Also happens automatically when the thread exits. */
void bg_pg_thread_close(void);

/** The parts of a server error a caller may act on. message may quote input: do not log it. */
typedef struct bg_pg_error {
    char sqlstate[6];    /**< five characters, "" when the connection failed */
    char constraint[64]; /**< violated constraint, "" when none */
    char message[256];   /**< server's primary message (or libpq's), cut to fit */
} bg_pg_error_t;

/**
 * Runs one parameterised statement (PQexecParams, text parameters and results). params holds
 * nparams NUL-terminated strings or NULL for SQL NULL. Returns 0 and *out, owned by the caller
 * (PQclear), for a command or a query that succeeded. Otherwise *out is NULL and the result is one
 * of: BG_ERR_UNAVAILABLE (connection lost or server shutting down, SQLSTATE class 08/57P0x),
 * BG_ERR_CONFLICT (23505 unique_violation), BG_ERR_INVALID (other 23xxx integrity or 22xxx data
 * errors), BG_ERR_TIMEOUT (57014, statement_timeout), BG_ERR_RETRY (40001 serialization failure,
 * 40P01 deadlock), BG_ERR_IO for anything else. The error is logged (debug level for conflicts,
 * which callers usually expect); pass e to bg_pg_exec_ex() to receive its details.
 */
BG_MUSTCHECK int bg_pg_exec(PGconn *c, const char *sql, int nparams, const char *const *params,
                            PGresult **out);

/** bg_pg_exec() that also fills *e (when not NULL) on failure; e is zeroed on success. */
BG_MUSTCHECK int bg_pg_exec_ex(PGconn *c, const char *sql, int nparams, const char *const *params,
                               PGresult **out, bg_pg_error_t *e);

/**
 * bg_pg_exec() as a prepared statement of the connection: the first run on a connection prepares
 * sql (PQprepare, under a name derived from its text), later runs only execute it (no parse, no
 * planning until Postgres's plan cache decides to replan). For the hot paths' fixed statements
 * only: each distinct text stays prepared on every connection that ran it, so sql must be one of
 * a bounded set (compiled-in text, never built from input). A connection that lost its statements
 * (reset, or another session behind the same pointer) or whose plan no longer fits the schema is
 * prepared again, once, transparently. Returns and logs as bg_pg_exec().
 */
BG_MUSTCHECK int bg_pg_exec_prep(PGconn *c, const char *sql, int nparams, const char *const *params,
                                 PGresult **out);

/** bg_pg_exec() for statements whose result is not needed (the result is cleared). */
BG_MUSTCHECK int bg_pg_run(PGconn *c, const char *sql, int nparams, const char *const *params);

/** BEGIN. Returns 0 or an error as bg_pg_exec(). */
BG_MUSTCHECK int bg_pg_begin(PGconn *c);

/**
 * COMMIT. Deferred constraints are checked here, so a commit can fail with BG_ERR_INVALID or
 * BG_ERR_CONFLICT; the transaction is then rolled back by the server. Also fails (BG_ERR_IO) when
 * the transaction had already failed: the server turns such a COMMIT into a ROLLBACK.
 */
BG_MUSTCHECK int bg_pg_commit(PGconn *c);

/** bg_pg_commit() that also reports the server's error details into *e (may be NULL). */
BG_MUSTCHECK int bg_pg_commit_ex(PGconn *c, bg_pg_error_t *e);

/**
 * ROLLBACK, for clean-up paths: never fails in a way the caller can act on, so it returns nothing.
 * Does nothing when no transaction is open.
 */
void bg_pg_rollback(PGconn *c);

/** Returns the SQLSTATE of a failed result ("" for NULL or a successful one). Borrowed from res. */
const char *bg_pg_sqlstate(const PGresult *res);

/** Maps a SQLSTATE to the bg_err code bg_pg_exec() returns for it (BG_ERR_IO when unknown). */
int bg_pg_err_from_sqlstate(const char *sqlstate);

/**
 * Returns the text of a result field, or NULL when it is SQL NULL or outside the result. Borrowed
 * from res.
 */
const char *bg_pg_value(const PGresult *res, int row, int col);

/**
 * Parses an integer field. Returns 0, BG_ERR_NOT_FOUND for SQL NULL or no such field, or
 * BG_ERR_INVALID when the text is not a 64-bit integer.
 */
BG_MUSTCHECK int bg_pg_int64(const PGresult *res, int row, int col, int64_t *out);

/**
 * Writes a page of a list, {"data":[…],"next_cursor":…}, from the rows of res: column 1 holds each
 * item's JSON text, column 0 its position; the query fetched one row more than limit, and that
 * extra row only says that a next page exists, which starts after the last row shown. The next
 * cursor is that row's position as it is (tag '\0') or, with a tag, "<tag>|<position>" in
 * base64url (a cursor one kind of list refuses from another). Returns 0, BG_ERR_TOO_LARGE, or
 * BG_ERR_IO when the position is too long for a cursor.
 */
BG_MUSTCHECK int bg_pg_write_page(const PGresult *res, int limit, char tag, bg_buf_t *out);

/**
 * Runs trusted SQL text that may hold several statements (simple query protocol, no parameters).
 * For compiled-in SQL only (migrations): never for anything that contains input. Errors as
 * bg_pg_exec_ex().
 */
BG_MUSTCHECK int bg__pg_exec_script(PGconn *c, const char *sql, bg_pg_error_t *e);

#endif
