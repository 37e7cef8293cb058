/*
 * Blocking libpq helpers: connecting with retry, a per-thread connection, parameterised execution
 * with errors mapped from SQLSTATE, and transactions.
 *
 * Connecting. Settings that the URL may legitimately carry (application_name, connect_timeout) are
 * passed to PQconnectdbParams *before* the expanded URL, so the URL wins; statement_timeout is set
 * with set_config() after connecting because the URL's `options`, if any, would otherwise replace
 * ours wholesale. libpq's messages rarely quote the password, but a malformed URL can make them
 * quote any part of it, so every message leaving this file has the password masked, and URL syntax
 * errors are reported without libpq's text.
 *
 * Retrying. Attempts are spaced by "full jitter" backoff (a random delay up to 100 ms · 2^n,
 * capped): when a database restarts, every worker reconnects at once, and jitter keeps them from
 * arriving in lock step.
 *
 * Per-thread connections live in a pthread key whose destructor closes them, so a pool thread that
 * exits does not leak its connection, and a thread never sees another thread's connection.
 */
#include <errno.h>
#include <pthread.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/log.h"
#include "bg/pg.h"

#define BACKOFF_BASE_MS 100
#define BACKOFF_CAP_MS 5000

static char app_name[64] = "bot-generic";
static int64_t statement_timeout_ms = 30000;
static int connect_timeout_s = 5;

void bg_pg_setup(const bg_pg_settings_t *s)
{
    if (s->application_name != NULL)
        (void)bg_strlcpy(app_name, s->application_name, sizeof(app_name));
    if (s->statement_timeout_ms >= 0)
        statement_timeout_ms = s->statement_timeout_ms;
    if (s->connect_timeout_s > 0)
        connect_timeout_s = s->connect_timeout_s;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* Returns the value of keyword in parsed connection options (borrowed), or NULL. */
static const char *conninfo_get(const PQconninfoOption *opts, const char *keyword)
{
    for (const PQconninfoOption *o = opts; o != NULL && o->keyword != NULL; o++) {
        if (strcmp(o->keyword, keyword) == 0)
            return bg_str_present(o->val) ? o->val : NULL;
    }
    return NULL;
}

void bg_pg_describe_url(const char *url, char *out, size_t outlen)
{
    char *perr = NULL;
    PQconninfoOption *opts = PQconninfoParse(url, &perr);
    PQfreemem(perr);
    if (opts == NULL) {
        (void)bg_strlcpy(out, "(invalid database URL)", outlen);
        return;
    }
    const char *host = conninfo_get(opts, "host");
    if (host == NULL)
        host = conninfo_get(opts, "hostaddr");
    const char *port = conninfo_get(opts, "port");
    const char *db = conninfo_get(opts, "dbname");
    snprintf(out, outlen, "%s:%s/%s", host != NULL ? host : "localhost",
             port != NULL ? port : "5432", db != NULL ? db : "(default)");
    PQconninfoFree(opts);
}

/*
 * Copies msg into out on one line, with every occurrence of secret replaced by "***".
 * Short secrets are masked too: a false positive costs a confusing message, a miss leaks a
 * password.
 */
static void copy_masked(char *out, size_t outlen, const char *msg, const char *secret)
{
    size_t slen = secret != NULL ? strlen(secret) : 0;
    size_t o = 0;
    if (outlen == 0)
        return;
    for (const char *p = msg; *p != '\0' && o + 1 < outlen;) {
        if (secret != NULL && slen > 0 && strncmp(p, secret, slen) == 0) {
            for (const char *m = "***"; *m != '\0' && o + 1 < outlen; m++)
                out[o++] = *m;
            p += slen;
            continue;
        }
        /* libpq's messages span lines ("…\n\tIs the server running…"): keep them on one. */
        if (*p == '\n' || *p == '\t' || *p == '\r') {
            if (o > 0 && out[o - 1] != ' ')
                out[o++] = ' ';
            p++;
            continue;
        }
        out[o++] = *p++;
    }
    while (o > 0 && (out[o - 1] == '\n' || out[o - 1] == '\r' || out[o - 1] == ' '))
        o--;
    out[o] = '\0';
}

/*
 * Server notices (NOTICE, WARNING from migrations and triggers) would go to stderr through libpq's
 * default processor, bypassing the log format; route them into the log.
 */
static void on_notice(void *arg, const char *message)
{
    (void)arg;
    bg_debug("postgres notice: %s", message);
}

/* Applies the per-session settings that cannot go into the connection parameters. */
static int apply_session_settings(PGconn *c)
{
    if (statement_timeout_ms < 0)
        return 0;
    char v[32];
    snprintf(v, sizeof(v), "%lld", (long long)statement_timeout_ms);
    const char *params[] = {v};
    return bg_pg_run(c, "SELECT set_config('statement_timeout', $1, false)", 1, params);
}

int bg_pg_connect(const char *url, int attempts, PGconn **out, char *err, size_t errlen)
{
    *out = NULL;
    if (errlen > 0)
        err[0] = '\0';
    char *perr = NULL;
    PQconninfoOption *opts = PQconninfoParse(url, &perr);
    PQfreemem(perr);
    if (opts == NULL) {
        /* libpq's text could quote a fragment of the password: say only what is wrong. */
        snprintf(err, errlen,
                 "the database URL does not parse (expected postgresql://user:password@"
                 "host:port/dbname or key=value pairs)");
        return BG_ERR_INVALID;
    }
    char *password = bg_strdup(conninfo_get(opts, "password"));
    PQconninfoFree(opts);

    char where[256];
    bg_pg_describe_url(url, where, sizeof(where));
    char timeout[16];
    snprintf(timeout, sizeof(timeout), "%d", connect_timeout_s);
    /* Ours first so that the URL may override them (see the top of this file). */
    const char *const keys[] = {"application_name", "connect_timeout", "dbname", NULL};
    const char *const vals[] = {app_name, timeout, url, NULL};

    if (attempts < 1)
        attempts = 1;
    int rc = BG_ERR_UNAVAILABLE;
    for (int i = 0; i < attempts; i++) {
        if (i > 0) {
            long cap = BACKOFF_BASE_MS << (i - 1 < 6 ? i - 1 : 6);
            if (cap > BACKOFF_CAP_MS)
                cap = BACKOFF_CAP_MS;
            sleep_ms((long)bg_crypto_random_uniform((uint32_t)cap + 1));
        }
        PGconn *c = PQconnectdbParams(keys, vals, 1);
        if (c != NULL && PQstatus(c) == CONNECTION_OK) {
            (void)PQsetNoticeProcessor(c, on_notice, NULL);
            rc = apply_session_settings(c);
            if (rc == 0) {
                *out = c;
                goto done;
            }
            snprintf(err, errlen, "%s: could not apply session settings: %s", where,
                     bg_strerror(rc));
            PQfinish(c);
            continue;
        }
        char msg[512];
        copy_masked(msg, sizeof(msg), c != NULL ? PQerrorMessage(c) : "out of memory", password);
        snprintf(err, errlen, "%.64s: %.400s", where, msg);
        PQfinish(c);
        bg_warn("postgres %s: connection attempt %d/%d failed: %s", where, i + 1, attempts, msg);
        rc = BG_ERR_UNAVAILABLE;
    }
done:
    if (password != NULL) {
        bg_crypto_wipe(password, strlen(password));
        free(password);
    }
    return rc;
}

/* ---- per-thread connection ---- */

typedef struct st_thread_conn {
    PGconn *conn; /* owned */
    char *url;    /* owned */
} thread_conn_t;

static pthread_key_t thread_key;
static pthread_once_t thread_key_once = PTHREAD_ONCE_INIT;

static void thread_conn_free(void *p)
{
    thread_conn_t *t = p;
    if (t == NULL)
        return;
    PQfinish(t->conn);
    free(t->url);
    free(t);
}

static void make_thread_key(void)
{
    if (pthread_key_create(&thread_key, thread_conn_free) != 0) {
        bg_error("pthread_key_create failed");
        abort();
    }
}

PGconn *bg_pg_thread_conn(const char *url)
{
    (void)pthread_once(&thread_key_once, make_thread_key);
    thread_conn_t *t = pthread_getspecific(thread_key);
    if (t == NULL) {
        t = bg_calloc(1, sizeof(*t));
        if (pthread_setspecific(thread_key, t) != 0) {
            free(t);
            return NULL;
        }
    }
    if (t->conn != NULL && PQstatus(t->conn) == CONNECTION_OK && strcmp(t->url, url) == 0) {
        switch (PQtransactionStatus(t->conn)) {
        case PQTRANS_IDLE:
            return t->conn;
        case PQTRANS_INTRANS:
        case PQTRANS_INERROR:
            /* An earlier user bailed out without rolling back: start it clean. */
            bg_pg_rollback(t->conn);
            if (PQtransactionStatus(t->conn) == PQTRANS_IDLE)
                return t->conn;
            break;
        case PQTRANS_ACTIVE:
        case PQTRANS_UNKNOWN:
            break;
        }
    }
    PQfinish(t->conn);
    t->conn = NULL;
    free(t->url);
    t->url = NULL;

    char err[512];
    PGconn *c;
    if (bg_pg_connect(url, 1, &c, err, sizeof(err)) != 0) {
        bg_error("postgres: %s", err);
        return NULL;
    }
    t->conn = c;
    t->url = bg_strdup(url);
    return c;
}

void bg_pg_thread_close(void)
{
    (void)pthread_once(&thread_key_once, make_thread_key);
    thread_conn_t *t = pthread_getspecific(thread_key);
    if (t == NULL)
        return;
    (void)pthread_setspecific(thread_key, NULL);
    thread_conn_free(t);
}

/* ---- execution ---- */

int bg_pg_err_from_sqlstate(const char *s)
{
    if (s == NULL || strlen(s) != 5)
        return BG_ERR_IO;
    if (strcmp(s, "23505") == 0)
        return BG_ERR_CONFLICT;
    if (strncmp(s, "23", 2) == 0 || strncmp(s, "22", 2) == 0)
        return BG_ERR_INVALID;
    /* 08: connection exceptions; 53: out of resources (too many connections); 57P0x: shutting down
     */
    if (strncmp(s, "08", 2) == 0 || strncmp(s, "53", 2) == 0 || strncmp(s, "57P0", 4) == 0)
        return BG_ERR_UNAVAILABLE;
    if (strcmp(s, "57014") == 0)
        return BG_ERR_TIMEOUT;
    if (strcmp(s, "40001") == 0 || strcmp(s, "40P01") == 0 || strcmp(s, "55P03") == 0)
        return BG_ERR_RETRY;
    return BG_ERR_IO;
}

const char *bg_pg_sqlstate(const PGresult *res)
{
    if (res == NULL)
        return "";
    const char *s = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    return s != NULL ? s : "";
}

/* Writes the start of sql on one line into out: statements are constant text, safe to log. */
static void sql_excerpt(const char *sql, char *out, size_t outlen)
{
    size_t o = 0;
    bool space = false;
    for (const char *p = sql; *p != '\0' && o + 1 < outlen; p++) {
        bool ws = *p == ' ' || *p == '\n' || *p == '\t' || *p == '\r';
        if (ws) {
            space = o > 0;
            continue;
        }
        if (space && o + 2 < outlen)
            out[o++] = ' ';
        space = false;
        out[o++] = *p;
    }
    out[o] = '\0';
}

/* Classifies a failed result, fills e, logs it, and returns the bg_err code. Does not clear res. */
static int fail(PGconn *c, const PGresult *res, const char *sql, bg_pg_error_t *e)
{
    bg_pg_error_t local;
    if (e == NULL)
        e = &local;
    memset(e, 0, sizeof(*e));
    const char *state = bg_pg_sqlstate(res);
    const char *cons = res != NULL ? PQresultErrorField(res, PG_DIAG_CONSTRAINT_NAME) : NULL;
    const char *prim = res != NULL ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    (void)bg_strlcpy(e->sqlstate, state, sizeof(e->sqlstate));
    (void)bg_strlcpy(e->constraint, cons != NULL ? cons : "", sizeof(e->constraint));
    copy_masked(e->message, sizeof(e->message), prim != NULL ? prim : PQerrorMessage(c), NULL);

    int rc;
    if (PQstatus(c) == CONNECTION_BAD)
        rc = BG_ERR_UNAVAILABLE;
    else if (state[0] == '\0')
        rc = PQresultStatus(res) == PGRES_EMPTY_QUERY ? BG_ERR_INVALID : BG_ERR_IO;
    else
        rc = bg_pg_err_from_sqlstate(state);

    bg_log_level_t level = rc == BG_ERR_CONFLICT                        ? BG_LOG_DEBUG
                           : rc == BG_ERR_INVALID || rc == BG_ERR_RETRY ? BG_LOG_WARN
                                                                        : BG_LOG_ERROR;
    if (bg_log_enabled(level)) {
        char stmt[96];
        sql_excerpt(sql, stmt, sizeof(stmt));
        /* Data errors (class 22) quote the offending input in their message: leave it out. */
        bool quotes_input = strncmp(state, "22", 2) == 0;
        bg_log(level, "postgres: %s (SQLSTATE %s%s%s) in \"%s\"",
               quotes_input ? "invalid data" : e->message, state[0] != '\0' ? state : "none",
               e->constraint[0] != '\0' ? ", constraint " : "", e->constraint, stmt);
    }
    return rc;
}

int bg_pg_exec_ex(PGconn *c, const char *sql, int nparams, const char *const *params,
                  PGresult **out, bg_pg_error_t *e)
{
    *out = NULL;
    PGresult *res = PQexecParams(c, sql, nparams, NULL, params, NULL, NULL, 0);
    ExecStatusType st = PQresultStatus(res);
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) {
        if (e != NULL)
            memset(e, 0, sizeof(*e));
        *out = res;
        return 0;
    }
    int rc = fail(c, res, sql, e);
    PQclear(res);
    return rc;
}

/*
 * Prepared statements: a small direct-mapped table per thread (connections are per thread, see
 * bg_pg_thread_conn) remembers which statement texts are prepared on which connection. A slot
 * holds the connection, a 128-bit BLAKE2b digest of the text and the statement's name, which is
 * the digest in hex: the same text has the same name on every connection and thread, so a slot
 * lost to another text (or a connection used from another thread) only costs a PQprepare that
 * answers 42P05 (it exists), which counts as prepared.
 */
#define PREP_SLOTS 64
#define PREP_DIGEST 16

typedef struct st_prep_slot {
    const PGconn *conn;
    unsigned char digest[PREP_DIGEST];
    char name[4 + 2 * PREP_DIGEST + 1];
} prep_slot_t;

static _Thread_local prep_slot_t prep_slots[PREP_SLOTS];

/* Prepares sql as name on c; a statement of that name already there counts as prepared. */
static int prepare(PGconn *c, const char *name, const char *sql, int nparams, bg_pg_error_t *e)
{
    PGresult *res = PQprepare(c, name, sql, nparams, NULL);
    int rc = 0;
    if (PQresultStatus(res) != PGRES_COMMAND_OK && strcmp(bg_pg_sqlstate(res), "42P05") != 0)
        rc = fail(c, res, sql, e);
    PQclear(res);
    return rc;
}

int bg_pg_exec_prep(PGconn *c, const char *sql, int nparams, const char *const *params,
                    PGresult **out)
{
    *out = NULL;
    unsigned char digest[PREP_DIGEST];
    (void)crypto_generichash(digest, sizeof(digest), (const unsigned char *)sql, strlen(sql), NULL,
                             0);
    prep_slot_t *slot = &prep_slots[digest[0] % PREP_SLOTS];
    bool known = slot->conn == c && memcmp(slot->digest, digest, sizeof(digest)) == 0;
    if (!known) {
        slot->conn = NULL;
        memcpy(slot->digest, digest, sizeof(digest));
        memcpy(slot->name, "bg_p", 4);
        (void)sodium_bin2hex(slot->name + 4, sizeof(slot->name) - 4, digest, sizeof(digest));
        int rc = prepare(c, slot->name, sql, nparams, NULL);
        if (rc != 0)
            return rc;
        slot->conn = c;
    }
    for (int attempt = 0;; attempt++) {
        PGresult *res = PQexecPrepared(c, slot->name, nparams, params, NULL, NULL, 0);
        ExecStatusType st = PQresultStatus(res);
        if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) {
            *out = res;
            return 0;
        }
        /* 26000: not prepared on this session (a reset connection, or a new one at the same
         * address); 0A000: its cached plan no longer fits the schema (a migration changed a
         * table it reads). Both go away by preparing it afresh, once. */
        const char *state = bg_pg_sqlstate(res);
        bool stale = strcmp(state, "26000") == 0 || strcmp(state, "0A000") == 0;
        if (stale)
            slot->conn = NULL; /* prepared afresh by the next run, at the latest */
        /* inside a transaction the error aborted it: the caller's retry of the transaction
         * prepares it then */
        bool again = stale && attempt == 0 && PQstatus(c) == CONNECTION_OK &&
                     PQtransactionStatus(c) == PQTRANS_IDLE;
        if (!again) {
            int rc = fail(c, res, sql, NULL);
            PQclear(res);
            return rc;
        }
        PQclear(res);
        char dealloc[sizeof(slot->name) + 16];
        snprintf(dealloc, sizeof(dealloc), "DEALLOCATE %s", slot->name);
        PQclear(PQexec(c, dealloc)); /* 26000 when it is not there: nothing to do */
        int rc = prepare(c, slot->name, sql, nparams, NULL);
        if (rc != 0)
            return rc;
        slot->conn = c;
    }
}

int bg_pg_exec(PGconn *c, const char *sql, int nparams, const char *const *params, PGresult **out)
{
    return bg_pg_exec_ex(c, sql, nparams, params, out, NULL);
}

int bg_pg_run(PGconn *c, const char *sql, int nparams, const char *const *params)
{
    PGresult *res;
    int rc = bg_pg_exec(c, sql, nparams, params, &res);
    PQclear(res);
    return rc;
}

int bg__pg_exec_script(PGconn *c, const char *sql, bg_pg_error_t *e)
{
    /* PQexec: the only way to send several statements at once; sql is compiled-in text. */
    PGresult *res = PQexec(c, sql);
    ExecStatusType st = PQresultStatus(res);
    int rc = 0;
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK || st == PGRES_EMPTY_QUERY) {
        if (e != NULL)
            memset(e, 0, sizeof(*e));
    } else {
        rc = fail(c, res, sql, e);
    }
    PQclear(res);
    return rc;
}

int bg_pg_begin(PGconn *c)
{
    return bg_pg_run(c, "BEGIN", 0, NULL);
}

int bg_pg_commit_ex(PGconn *c, bg_pg_error_t *e)
{
    PGresult *res;
    int rc = bg_pg_exec_ex(c, "COMMIT", 0, NULL, &res, e);
    if (rc != 0)
        return rc;
    /* COMMIT of a failed transaction "succeeds" as a ROLLBACK: nothing was saved. */
    bool rolled_back = strcmp(PQcmdStatus(res), "ROLLBACK") == 0;
    PQclear(res);
    if (rolled_back) {
        if (e != NULL) {
            memset(e, 0, sizeof(*e));
            (void)bg_strlcpy(e->message, "the transaction had failed and was rolled back",
                             sizeof(e->message));
        }
        bg_warn("postgres: COMMIT of a failed transaction rolled it back");
        return BG_ERR_IO;
    }
    return 0;
}

int bg_pg_commit(PGconn *c)
{
    return bg_pg_commit_ex(c, NULL);
}

void bg_pg_rollback(PGconn *c)
{
    if (c == NULL || PQstatus(c) != CONNECTION_OK)
        return;
    PGTransactionStatusType ts = PQtransactionStatus(c);
    if (ts != PQTRANS_INTRANS && ts != PQTRANS_INERROR)
        return;
    PGresult *res = PQexec(c, "ROLLBACK");
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
        bg_warn("postgres: ROLLBACK failed: %s", msg != NULL ? msg : "no message");
    }
    PQclear(res);
}

const char *bg_pg_value(const PGresult *res, int row, int col)
{
    if (res == NULL || row < 0 || col < 0 || row >= PQntuples(res) || col >= PQnfields(res) ||
        PQgetisnull(res, row, col))
        return NULL;
    return PQgetvalue(res, row, col);
}

int bg_pg_int64(const PGresult *res, int row, int col, int64_t *out)
{
    const char *v = bg_pg_value(res, row, col);
    if (v == NULL)
        return BG_ERR_NOT_FOUND;
    char *end;
    errno = 0;
    long long n = strtoll(v, &end, 10);
    if (errno != 0 || end == v || *end != '\0')
        return BG_ERR_INVALID;
    *out = n;
    return 0;
}

int bg_pg_write_page(const PGresult *res, int limit, char tag, bg_buf_t *out)
{
    int n = PQntuples(res);
    bool more = n > limit;
    if (more)
        n = limit;
    int rc = bg_buf_puts(out, "{\"data\":[");
    for (int i = 0; i < n && rc == 0; i++) {
        if (i > 0)
            rc = bg_buf_putc(out, ',');
        if (rc == 0)
            rc = bg_buf_puts(out, PQgetvalue(res, i, 1));
    }
    if (rc != 0)
        return BG_ERR_TOO_LARGE;
    if (!more)
        return bg_buf_puts(out, "],\"next_cursor\":null}") != 0 ? BG_ERR_TOO_LARGE : 0;
    const char *last = PQgetvalue(res, n - 1, 0);
    char raw[128], cursor[256];
    if (tag != '\0') {
        int len = snprintf(raw, sizeof(raw), "%c|%s", tag, last);
        if (len < 0 || (size_t)len >= sizeof(raw) ||
            bg_crypto_b64url_encode(raw, (size_t)len, cursor, sizeof(cursor)) != 0)
            return BG_ERR_IO;
        last = cursor;
    }
    return bg_buf_printf(out, "],\"next_cursor\":\"%s\"}", last) != 0 ? BG_ERR_TOO_LARGE : 0;
}
