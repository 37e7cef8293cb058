/*
 * bg/pg.h against a real server: errors keep passwords out, failures map to the codes the edge
 * turns into statuses (down → unavailable, duplicate → conflict, bad data → invalid, slow →
 * timeout), a failed COMMIT is reported, and the per-thread connection heals after the server drops
 * it.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/err.h"
#include "bg/pg.h"
#include "bgtest.h"

Test(pg, unreachable_server_is_unavailable_and_the_error_hides_the_password)
{
    char url[256];
    snprintf(url, sizeof(url), "postgresql://bg:Sup3rSecretPw@127.0.0.1:%d/nowhere",
             bgt_free_port());
    PGconn *c = (PGconn *)1;
    char err[512];
    long long t0 = bgt_now_ms();
    cr_assert_eq(bg_pg_connect(url, 3, &c, err, sizeof(err)), BG_ERR_UNAVAILABLE);
    cr_assert_null(c);
    cr_assert_lt(bgt_now_ms() - t0, 5000, "backoff between 3 attempts stays short");
    cr_assert_not_null(strstr(err, "127.0.0.1"), "%s", err);
    cr_assert_null(strstr(err, "Sup3rSecretPw"), "%s", err);
}

Test(pg, malformed_url_is_invalid_without_quoting_it)
{
    PGconn *c;
    char err[512];
    cr_assert_eq(bg_pg_connect("postgresql://bg:pa%zzword@127.0.0.1/x", 1, &c, err, sizeof(err)),
                 BG_ERR_INVALID);
    cr_assert_null(strstr(err, "pa%zz"), "%s", err);
    cr_assert_neq(err[0], '\0');
    char d[128];
    bg_pg_describe_url("postgresql://bg:secret@db.internal:6543/app", d, sizeof(d));
    cr_assert_str_eq(d, "db.internal:6543/app");
}

Test(pg, settings_are_applied_and_slow_statements_time_out)
{
    bgt_pg_t db;
    cr_assert_eq(bgt_pg_create(&db, false), 0);
    bg_pg_setup(&(bg_pg_settings_t){.application_name = "bg-test", .statement_timeout_ms = 200});
    PGconn *c;
    char err[512];
    cr_assert_eq(bg_pg_connect(db.url, 1, &c, err, sizeof(err)), 0, "%s", err);
    PGresult *res;
    cr_assert_eq(bg_pg_exec(c, "SELECT current_setting('application_name')", 0, NULL, &res), 0);
    cr_assert_str_eq(bg_pg_value(res, 0, 0), "bg-test");
    PQclear(res);
    cr_assert_eq(bg_pg_exec(c, "SELECT pg_sleep(2)", 0, NULL, &res), BG_ERR_TIMEOUT);
    cr_assert_null(res);
    PQfinish(c);
    bgt_pg_drop(&db);
}

Test(pg, errors_map_to_what_callers_act_on)
{
    bgt_pg_t db;
    cr_assert_eq(bgt_pg_create(&db, false), 0);
    PGconn *c;
    char err[512];
    cr_assert_eq(bg_pg_connect(db.url, 1, &c, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(bg_pg_run(c, "CREATE TABLE t (k text PRIMARY KEY, n int CHECK (n > 0))", 0, NULL),
                 0);
    const char *p1[] = {"a", "1"};
    cr_assert_eq(bg_pg_run(c, "INSERT INTO t VALUES ($1, $2)", 2, p1), 0);
    bg_pg_error_t e;
    PGresult *res;
    cr_assert_eq(bg_pg_exec_ex(c, "INSERT INTO t VALUES ($1, $2)", 2, p1, &res, &e),
                 BG_ERR_CONFLICT);
    cr_assert_str_eq(e.sqlstate, "23505");
    cr_assert_str_eq(e.constraint, "t_pkey");
    const char *p2[] = {"b", "-1"};
    cr_assert_eq(bg_pg_run(c, "INSERT INTO t VALUES ($1, $2)", 2, p2), BG_ERR_INVALID);
    const char *p3[] = {"c", "not a number"};
    cr_assert_eq(bg_pg_run(c, "INSERT INTO t VALUES ($1, $2)", 2, p3), BG_ERR_INVALID);
    cr_assert_eq(bg_pg_run(c, "SELEC 1", 0, NULL), BG_ERR_IO);
    /* a NULL parameter is SQL NULL, and values come back typed through helpers */
    const char *p4[] = {"d", NULL};
    cr_assert_eq(bg_pg_run(c, "INSERT INTO t VALUES ($1, $2)", 2, p4), 0);
    cr_assert_eq(bg_pg_exec(c, "SELECT n FROM t ORDER BY k", 0, NULL, &res), 0);
    int64_t n = 0;
    cr_assert_eq(bg_pg_int64(res, 0, 0, &n), 0);
    cr_assert_eq(n, 1);
    cr_assert_eq(bg_pg_int64(res, 1, 0, &n), BG_ERR_NOT_FOUND);
    cr_assert_null(bg_pg_value(res, 5, 0));
    PQclear(res);
    cr_assert_eq(bg_pg_err_from_sqlstate("08006"), BG_ERR_UNAVAILABLE);
    cr_assert_eq(bg_pg_err_from_sqlstate("57P01"), BG_ERR_UNAVAILABLE);
    cr_assert_eq(bg_pg_err_from_sqlstate("40001"), BG_ERR_RETRY);
    PQfinish(c);
    bgt_pg_drop(&db);
}

Test(pg, commit_of_a_failed_transaction_is_reported)
{
    bgt_pg_t db;
    cr_assert_eq(bgt_pg_create(&db, false), 0);
    PGconn *c;
    char err[512];
    cr_assert_eq(bg_pg_connect(db.url, 1, &c, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(bg_pg_run(c, "CREATE TABLE t (n int)", 0, NULL), 0);
    cr_assert_eq(bg_pg_begin(c), 0);
    cr_assert_eq(bg_pg_run(c, "INSERT INTO t VALUES (1)", 0, NULL), 0);
    cr_assert_neq(bg_pg_run(c, "SELECT 1/0", 0, NULL), 0);
    cr_assert_neq(bg_pg_commit(c), 0, "COMMIT of a failed transaction must not look successful");
    PGresult *res;
    cr_assert_eq(bg_pg_exec(c, "SELECT count(*) FROM t", 0, NULL, &res), 0);
    cr_assert_str_eq(PQgetvalue(res, 0, 0), "0");
    PQclear(res);
    PQfinish(c);
    bgt_pg_drop(&db);
}

Test(pg, thread_connection_heals_after_the_server_drops_it)
{
    bgt_pg_t db;
    cr_assert_eq(bgt_pg_create(&db, false), 0);
    PGconn *c = bg_pg_thread_conn(db.url);
    cr_assert_not_null(c);
    cr_assert_eq(bg_pg_thread_conn(db.url), c, "the same connection is reused");

    /* an abandoned transaction is rolled back before the connection is handed out again */
    cr_assert_eq(bg_pg_begin(c), 0);
    cr_assert_eq(bg_pg_thread_conn(db.url), c);
    cr_assert_eq(PQtransactionStatus(c), PQTRANS_IDLE);

    /* the server drops it (restart, failover): the next query fails as unavailable... */
    PGconn *admin;
    char err[512];
    cr_assert_eq(bg_pg_connect(db.url, 1, &admin, err, sizeof(err)), 0, "%s", err);
    char pid[16];
    snprintf(pid, sizeof(pid), "%d", PQbackendPID(c));
    const char *p[] = {pid};
    cr_assert_eq(bg_pg_run(admin, "SELECT pg_terminate_backend($1::int)", 1, p), 0);
    PQfinish(admin);
    cr_assert_eq(bg_pg_run(c, "SELECT 1", 0, NULL), BG_ERR_UNAVAILABLE);

    /* ...and the thread's next call gets a working connection */
    PGconn *again = bg_pg_thread_conn(db.url);
    cr_assert_not_null(again);
    cr_assert_eq(bg_pg_run(again, "SELECT 1", 0, NULL), 0);
    bg_pg_thread_close();
    bgt_pg_drop(&db);
}

Test(pg, thread_connection_is_null_when_the_server_is_down)
{
    char url[128];
    snprintf(url, sizeof(url), "postgresql://bg@127.0.0.1:%d/x", bgt_free_port());
    cr_assert_null(bg_pg_thread_conn(url));
    bg_pg_thread_close();
}

/* How many statements the session has prepared with this text. */
static int prepared_count(PGconn *c, const char *sql)
{
    const char *p[] = {sql};
    PGresult *res;
    cr_assert_eq(bg_pg_exec(c, "SELECT count(*) FROM pg_prepared_statements WHERE statement = $1",
                            1, p, &res),
                 0);
    int n = (int)strtol(bg_pg_value(res, 0, 0), NULL, 10);
    PQclear(res);
    return n;
}

Test(pg, prepared_statements_are_prepared_once_and_heal_when_lost_or_stale)
{
    bgt_pg_t db;
    cr_assert_eq(bgt_pg_create(&db, false), 0);
    PGconn *c;
    char err[512];
    cr_assert_eq(bg_pg_connect(db.url, 1, &c, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(bg_pg_run(c, "CREATE TABLE t (id int PRIMARY KEY, v text)", 0, NULL), 0);
    static const char ins[] = "INSERT INTO t (id, v) VALUES ($1::int, $2) RETURNING v";
    static const char sel[] = "SELECT * FROM t WHERE id = $1::int";
    for (int i = 1; i <= 5; i++) {
        char id[8], v[8];
        snprintf(id, sizeof(id), "%d", i);
        snprintf(v, sizeof(v), "v%d", i);
        const char *p[] = {id, v};
        PGresult *res;
        cr_assert_eq(bg_pg_exec_prep(c, ins, 2, p, &res), 0);
        cr_assert_str_eq(bg_pg_value(res, 0, 0), v);
        PQclear(res);
    }
    cr_assert_eq(prepared_count(c, ins), 1, "five runs, one statement prepared");

    /* errors map as bg_pg_exec's */
    const char *dup[] = {"1", "again"};
    PGresult *res;
    cr_assert_eq(bg_pg_exec_prep(c, ins, 2, dup, &res), BG_ERR_CONFLICT);
    cr_assert_null(res);

    /* the session lost its statements (as after a reset): prepared again on the next run */
    cr_assert_eq(bg_pg_run(c, "DEALLOCATE ALL", 0, NULL), 0);
    const char *p6[] = {"6", "v6"};
    cr_assert_eq(bg_pg_exec_prep(c, ins, 2, p6, &res), 0, "healed");
    PQclear(res);
    cr_assert_eq(prepared_count(c, ins), 1);

    /* a migration changed the table a SELECT * reads: the plan is made afresh */
    const char *p1[] = {"1"};
    cr_assert_eq(bg_pg_exec_prep(c, sel, 1, p1, &res), 0);
    cr_assert_eq(PQnfields(res), 2);
    PQclear(res);
    cr_assert_eq(bg_pg_run(c, "ALTER TABLE t ADD COLUMN w text DEFAULT 'new'", 0, NULL), 0);
    cr_assert_eq(bg_pg_exec_prep(c, sel, 1, p1, &res), 0, "the stale plan was replaced");
    cr_assert_eq(PQnfields(res), 3);
    cr_assert_str_eq(bg_pg_value(res, 0, 2), "new");
    PQclear(res);

    /* inside a transaction a lost statement fails that transaction only; the next one works */
    cr_assert_eq(bg_pg_run(c, "DEALLOCATE ALL", 0, NULL), 0);
    cr_assert_eq(bg_pg_begin(c), 0);
    int rc = bg_pg_exec_prep(c, sel, 1, p1, &res);
    bg_pg_rollback(c);
    cr_assert_eq(bg_pg_begin(c), 0);
    cr_assert_eq(bg_pg_exec_prep(c, sel, 1, p1, &res), 0, "after %s", bg_strerror(rc));
    PQclear(res);
    cr_assert_eq(bg_pg_commit(c), 0);
    PQfinish(c);
    bgt_pg_drop(&db);
}
