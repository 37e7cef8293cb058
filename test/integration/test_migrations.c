/*
 * Migrations on a real Postgres: they apply to an empty database, a second run changes nothing, an
 * edited or unknown migration stops everything, and status tells an operator (and /readyz) where
 * the schema stands. Both the library (bg_migrate_*) and the operator's command (bgctl migrate) are
 * used.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "bg/err.h"
#include "bg/migrate.h"
#include "bg/pg.h"
#include "bg/resource.h"
#include "bgtest.h"

static PGconn *db_connect(const bgt_pg_t *db)
{
    PGconn *c;
    char err[512];
    cr_assert_eq(bg_pg_connect(db->url, 3, &c, err, sizeof(err)), 0, "connect: %s", err);
    return c;
}

static int embedded_count(void)
{
    size_t n;
    (void)bg_resource_list("migrations/", &n);
    return (int)n;
}

/* Runs one SQL statement without parameters and returns the first field as a new string. */
static char *query1(PGconn *c, const char *sql)
{
    PGresult *res;
    cr_assert_eq(bg_pg_exec(c, sql, 0, NULL, &res), 0, "%s", sql);
    cr_assert_eq(PQntuples(res), 1, "%s", sql);
    char *v = strdup(PQgetisnull(res, 0, 0) ? "(null)" : PQgetvalue(res, 0, 0));
    PQclear(res);
    return v;
}

static int bgctl(const bgt_pg_t *db, const char *arg, char *out, size_t outlen)
{
    char env_url[600];
    snprintf(env_url, sizeof(env_url), "BG_DATABASE_URL=%s", db->url);
    const char *env[] = {env_url, "BG_LOG_LEVEL=warn", NULL};
    const char *argv[] = {bgt_bin("bgctl"), "migrate", arg, NULL};
    return bgt_run(argv, env, out, outlen);
}

Test(migrations, apply_to_an_empty_database)
{
    bgt_pg_t db;
    cr_assert_eq(bgt_pg_create(&db, false), 0);
    PGconn *c = db_connect(&db);
    int applied = -1;
    char err[512];
    cr_assert_eq(bg_migrate_apply(c, &applied, err, sizeof(err)), 0, "%s", err);
    cr_assert_geq(embedded_count(), 5);
    cr_assert_eq(applied, embedded_count());

    /* every model of the product is there */
    static const char *const tables[] = {"users",
                                         "organizations",
                                         "memberships",
                                         "auth_sessions",
                                         "refresh_tokens",
                                         "api_keys",
                                         "agents",
                                         "prompts",
                                         "prompt_versions",
                                         "conversations",
                                         "messages",
                                         "policy_rules",
                                         "plans",
                                         "subscriptions",
                                         "billing_accounts",
                                         "ledger_accounts",
                                         "ledger_transactions",
                                         "ledger_entries",
                                         "invoices",
                                         "payments",
                                         "webhook_inbox",
                                         "usage_records",
                                         "usage_daily",
                                         "audit_log",
                                         "notifications",
                                         "telegram_bots",
                                         "telegram_accounts",
                                         "telegram_chats"};
    for (size_t i = 0; i < sizeof(tables) / sizeof(tables[0]); i++) {
        const char *p[] = {tables[i]};
        PGresult *res;
        cr_assert_eq(bg_pg_exec(c, "SELECT to_regclass($1) IS NOT NULL", 1, p, &res), 0);
        cr_assert_str_eq(PQgetvalue(res, 0, 0), "t", "table %s is missing", tables[i]);
        PQclear(res);
    }
    int pending = -1;
    cr_assert_eq(bg_migrate_status(c, &pending, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(pending, 0);
    PQfinish(c);
    bgt_pg_drop(&db);
}

Test(migrations, seed_plans_match_the_product_plan)
{
    bgt_pg_t db;
    cr_assert_eq(bgt_pg_create(&db, true), 0);
    PGconn *c = db_connect(&db);
    PGresult *res;
    cr_assert_eq(bg_pg_exec(c,
                            "SELECT id, price_minor, currency, request_limit, period::text, "
                            "coalesce(duration::text, ''), api_access, purchasable, "
                            "array_to_string(features, ',') FROM plans ORDER BY sort_order",
                            0, NULL, &res),
                 0);
    cr_assert_eq(PQntuples(res), 5);
    static const char *const want[5][9] = {
        {"trial", "0", "USD", "50", "1 day", "14 days", "f", "f", "email_support"},
        {"daily", "99", "USD", "100", "1 day", "", "f", "t", "email_support"},
        {"weekly", "499", "USD", "1000", "7 days", "", "f", "t", "email_support,chat_support"},
        {"monthly", "1999", "USD", "10000", "1 mon", "", "t", "t",
         "email_support,chat_support,priority_support,api_access"},
        {"yearly", "19999", "USD", "150000", "1 year", "", "t", "t",
         "email_support,chat_support,priority_support,phone_support,api_access,advanced_analytics"},
    };
    for (int r = 0; r < 5; r++) {
        for (int f = 0; f < 9; f++)
            cr_assert_str_eq(PQgetvalue(res, r, f), want[r][f], "plan %s field %d", want[r][0], f);
    }
    PQclear(res);
    PQfinish(c);
    bgt_pg_drop(&db);
}

Test(migrations, second_run_changes_nothing)
{
    bgt_pg_t db;
    cr_assert_eq(bgt_pg_create(&db, true), 0); /* first run: bgctl migrate */
    PGconn *c = db_connect(&db);
    const char *snapshot_sql =
        "SELECT string_agg(version || ':' || checksum || ':' || applied_at, ',' ORDER BY version) "
        "FROM schema_migrations";
    char *before = query1(c, snapshot_sql);
    char *plans_before = query1(c, "SELECT count(*) FROM plans");

    int applied = -1;
    char err[512];
    cr_assert_eq(bg_migrate_apply(c, &applied, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(applied, 0);
    char out[4096];
    cr_assert_eq(bgctl(&db, NULL, out, sizeof(out)), 0, "%s", out);
    cr_assert_not_null(strstr(out, "database is up to date"), "%s", out);

    char *after = query1(c, snapshot_sql);
    char *plans_after = query1(c, "SELECT count(*) FROM plans");
    cr_assert_str_eq(before, after);
    cr_assert_str_eq(plans_before, plans_after);
    free(before);
    free(after);
    free(plans_before);
    free(plans_after);
    PQfinish(c);
    bgt_pg_drop(&db);
}

Test(migrations, bgctl_names_what_it_applied)
{
    bgt_pg_t db;
    cr_assert_eq(bgt_pg_create(&db, false), 0);
    char out[8192];
    cr_assert_eq(bgctl(&db, NULL, out, sizeof(out)), 0, "%s", out);
    cr_assert_not_null(strstr(out, "applied migrations/0001_core.sql"), "%s", out);
    cr_assert_not_null(strstr(out, "applied migrations/0005_seed_plans.sql"), "%s", out);
    bgt_pg_drop(&db);
}

Test(migrations, edited_migration_is_refused)
{
    bgt_pg_t db;
    cr_assert_eq(bgt_pg_create(&db, true), 0);
    PGconn *c = db_connect(&db);
    /* What the database would hold had 0002 been edited after it was applied. */
    PGresult *res;
    cr_assert_eq(bg_pg_exec(c,
                            "UPDATE schema_migrations SET checksum = repeat('0', 64) "
                            "WHERE version = '0002'",
                            0, NULL, &res),
                 0);
    PQclear(res);

    int applied = -1, pending = -1;
    char err[512];
    cr_assert_eq(bg_migrate_apply(c, &applied, err, sizeof(err)), BG_ERR_CHECKSUM);
    cr_assert_eq(applied, 0);
    cr_assert_not_null(strstr(err, "migrations/0002_agents.sql"), "%s", err);
    cr_assert_eq(bg_migrate_status(c, &pending, err, sizeof(err)), BG_ERR_CHECKSUM);
    cr_assert_not_null(strstr(err, "migrations/0002_agents.sql"), "%s", err);

    char out[4096];
    cr_assert_neq(bgctl(&db, NULL, out, sizeof(out)), 0, "%s", out);
    cr_assert_not_null(strstr(out, "0002_agents.sql"), "%s", out);
    cr_assert_neq(bgctl(&db, "status", out, sizeof(out)), 0, "%s", out);
    cr_assert_not_null(strstr(out, "0002_agents.sql"), "%s", out);

    /* the connection is still usable and not left inside a transaction */
    cr_assert_eq(PQtransactionStatus(c), PQTRANS_IDLE);
    PQfinish(c);
    bgt_pg_drop(&db);
}

Test(migrations, database_newer_than_binary_is_refused)
{
    bgt_pg_t db;
    cr_assert_eq(bgt_pg_create(&db, true), 0);
    PGconn *c = db_connect(&db);
    PGresult *res;
    cr_assert_eq(bg_pg_exec(c,
                            "INSERT INTO schema_migrations (version, name, checksum) "
                            "VALUES ('9999', 'from_the_future', repeat('a', 64))",
                            0, NULL, &res),
                 0);
    PQclear(res);
    int applied = -1;
    char err[512];
    cr_assert_eq(bg_migrate_apply(c, &applied, err, sizeof(err)), BG_ERR_CHECKSUM);
    cr_assert_not_null(strstr(err, "9999"), "%s", err);
    PQfinish(c);
    bgt_pg_drop(&db);
}

Test(migrations, status_reports_pending_then_current)
{
    bgt_pg_t db;
    cr_assert_eq(bgt_pg_create(&db, false), 0);
    PGconn *c = db_connect(&db);
    int pending = -1;
    char err[512];
    cr_assert_eq(bg_migrate_status(c, &pending, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(pending, embedded_count());
    /* status changed nothing */
    char *exists = query1(c, "SELECT to_regclass('schema_migrations') IS NOT NULL");
    cr_assert_str_eq(exists, "f");
    free(exists);

    char out[4096];
    cr_assert_eq(bgctl(&db, "status", out, sizeof(out)), 1, "%s", out);
    cr_assert_not_null(strstr(out, "pending"), "%s", out);

    int applied;
    cr_assert_eq(bg_migrate_apply(c, &applied, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(bg_migrate_status(c, &pending, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(pending, 0);
    cr_assert_eq(bgctl(&db, "status", out, sizeof(out)), 0, "%s", out);
    cr_assert_not_null(strstr(out, "database is up to date"), "%s", out);
    PQfinish(c);
    bgt_pg_drop(&db);
}

Test(migrations, concurrent_runs_apply_each_migration_once)
{
    bgt_pg_t db;
    cr_assert_eq(bgt_pg_create(&db, false), 0);
    char env_url[600];
    snprintf(env_url, sizeof(env_url), "BG_DATABASE_URL=%s", db.url);
    const char *env[] = {env_url, "BG_LOG_LEVEL=warn", NULL};
    const char *argv[] = {bgt_bin("bgctl"), "migrate", NULL};
    pid_t pids[3];
    for (int i = 0; i < 3; i++)
        pids[i] = bgt_spawn(argv, env, "/dev/null");
    for (int i = 0; i < 3; i++) {
        int st = bgt_wait(pids[i], 60000);
        cr_assert(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "bgctl migrate #%d failed", i);
    }
    PGconn *c = db_connect(&db);
    char *n = query1(c, "SELECT count(*) FROM schema_migrations");
    char want[16];
    snprintf(want, sizeof(want), "%d", embedded_count());
    cr_assert_str_eq(n, want);
    free(n);
    char *plans = query1(c, "SELECT count(*) FROM plans");
    cr_assert_str_eq(plans, "5");
    free(plans);
    PQfinish(c);
    bgt_pg_drop(&db);
}

Test(migrations, migrating_releases_its_lock_and_restores_statement_timeout)
{
    bgt_pg_t db;
    cr_assert_eq(bgt_pg_create(&db, true), 0);
    PGconn *c = db_connect(&db);
    PGresult *res;
    cr_assert_eq(bg_pg_exec(c, "SET statement_timeout = '12s'", 0, NULL, &res), 0);
    PQclear(res);
    int applied;
    char err[512];
    cr_assert_eq(bg_migrate_apply(c, &applied, err, sizeof(err)), 0, "%s", err);
    char *t = query1(c, "SHOW statement_timeout");
    cr_assert_str_eq(t, "12s");
    free(t);
    /* the advisory lock was released: another session can take it at once */
    PGconn *other = db_connect(&db);
    char key[24];
    snprintf(key, sizeof(key), "%lld", (long long)BG_MIGRATE_LOCK_KEY);
    const char *kp[] = {key};
    cr_assert_eq(bg_pg_exec(other, "SELECT pg_try_advisory_lock($1::bigint)", 1, kp, &res), 0);
    cr_assert_str_eq(PQgetvalue(res, 0, 0), "t");
    PQclear(res);
    PQfinish(other);
    PQfinish(c);
    bgt_pg_drop(&db);
}
