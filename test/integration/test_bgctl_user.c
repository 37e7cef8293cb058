/*
 * `bgctl user create` as an operator runs it: the user it makes can sign in (the stored hash
 * verifies the password) and owns a personal organization; duplicates, weak passwords and bad
 * emails are refused with a message that says why, leaving nothing behind; --if-missing makes
 * seeding idempotent.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/crypto.h"
#include "bg/pg.h"
#include "bgtest.h"

static bgt_pg_t db;
static PGconn *conn;

static void setup(void)
{
    cr_assert_eq(bgt_pg_create(&db, true), 0);
    char err[512];
    cr_assert_eq(bg_pg_connect(db.url, 3, &conn, err, sizeof(err)), 0, "connect: %s", err);
}

static void teardown(void)
{
    PQfinish(conn);
    conn = NULL;
    bgt_pg_drop(&db);
}

TestSuite(bgctl_user, .init = setup, .fini = teardown);

/* Runs bgctl with up to 8 arguments after "user"; returns the exit status, output in out. */
static int bgctl_user(char *out, size_t outlen, const char *const args[])
{
    char env_url[600];
    snprintf(env_url, sizeof(env_url), "BG_DATABASE_URL=%s", db.url);
    const char *env[] = {env_url, "BG_LOG_LEVEL=warn", NULL};
    const char *argv[12] = {bgt_bin("bgctl"), "user"};
    int n = 2;
    for (int i = 0; args[i] != NULL && n < 11; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    return bgt_run(argv, env, out, outlen);
}

static char *q(const char *sql, const char *param)
{
    PGresult *res;
    const char *p[] = {param};
    cr_assert_eq(bg_pg_exec(conn, sql, param != NULL ? 1 : 0, param != NULL ? p : NULL, &res), 0,
                 "%s", sql);
    char *v = strdup(PQntuples(res) > 0 && !PQgetisnull(res, 0, 0) ? PQgetvalue(res, 0, 0) : "");
    PQclear(res);
    return v;
}

static int user_count(void)
{
    char *n = q("SELECT count(*) FROM users", NULL);
    int v = (int)strtol(n, NULL, 10);
    free(n);
    return v;
}

Test(bgctl_user, create_makes_a_user_who_can_sign_in)
{
    char out[4096];
    const char *args[] = {"create", "--email", "Admin@Example.com", "--password", "correct horse 1",
                          "--name", "Ada",     "--admin",           NULL};
    cr_assert_eq(bgctl_user(out, sizeof(out), args), 0, "%s", out);
    cr_assert_not_null(strstr(out, "created admin user"), "%s", out);

    PGresult *res;
    const char *p[] = {"admin@example.com"};
    cr_assert_eq(
        bg_pg_exec(conn,
                   "SELECT id, email, name, role, status, locale, password_hash FROM users "
                   "WHERE lower(email) = lower($1)",
                   1, p, &res),
        0);
    cr_assert_eq(PQntuples(res), 1);
    cr_assert_str_eq(PQgetvalue(res, 0, 1), "Admin@Example.com");
    cr_assert_str_eq(PQgetvalue(res, 0, 2), "Ada");
    cr_assert_str_eq(PQgetvalue(res, 0, 3), "admin");
    cr_assert_str_eq(PQgetvalue(res, 0, 4), "active");
    cr_assert_str_eq(PQgetvalue(res, 0, 5), "en");
    const char *hash = PQgetvalue(res, 0, 6);
    cr_assert_eq(strncmp(hash, "$argon2id$", 10), 0, "%s", hash);
    cr_assert_eq(bg_crypto_password_verify(hash, "correct horse 1"), 0);
    cr_assert_neq(bg_crypto_password_verify(hash, "correct horse 2"), 0);
    cr_assert_null(strstr(out, "correct horse"), "the password is never printed");
    char *id = strdup(PQgetvalue(res, 0, 0));
    PQclear(res);
    cr_assert_not_null(strstr(out, id), "the new id is printed: %s", out);

    /* a personal organization that the user owns; no trial yet */
    char *role =
        q("SELECT m.role FROM memberships m JOIN organizations o ON o.id = m.organization_id "
          "WHERE m.user_id = $1 AND o.personal AND o.owner_id = $1",
          id);
    cr_assert_str_eq(role, "owner");
    free(role);
    char *subs = q("SELECT count(*) FROM subscriptions WHERE user_id = $1", id);
    cr_assert_str_eq(subs, "0");
    free(subs);
    char *audit = q("SELECT action FROM audit_log WHERE target_id = $1", id);
    cr_assert_str_eq(audit, "user.create");
    free(audit);
    free(id);
}

Test(bgctl_user, plain_user_without_name)
{
    char out[4096];
    const char *args[] = {"create", "--email", "bob@example.org", "--password", "0123456789", NULL};
    cr_assert_eq(bgctl_user(out, sizeof(out), args), 0, "%s", out);
    char *role = q("SELECT role || '/' || name FROM users WHERE email = $1", "bob@example.org");
    cr_assert_str_eq(role, "user/");
    free(role);
    char *org = q("SELECT o.name FROM organizations o JOIN users u ON u.id = o.owner_id "
                  "WHERE u.email = $1",
                  "bob@example.org");
    cr_assert_str_eq(org, "bob");
    free(org);
}

Test(bgctl_user, duplicate_email_is_refused)
{
    char out[4096];
    const char *first[] = {"create",     "--email",        "dup@example.com",
                           "--password", "first password", NULL};
    cr_assert_eq(bgctl_user(out, sizeof(out), first), 0, "%s", out);
    const char *again[] = {"create",     "--email",         "DUP@example.com",
                           "--password", "second password", NULL};
    cr_assert_eq(bgctl_user(out, sizeof(out), again), 1, "%s", out);
    cr_assert_not_null(strstr(out, "already exists"), "%s", out);
    cr_assert_eq(user_count(), 1);
    /* the first password still works: nothing was overwritten */
    char *hash = q("SELECT password_hash FROM users WHERE lower(email) = $1", "dup@example.com");
    cr_assert_eq(bg_crypto_password_verify(hash, "first password"), 0);
    free(hash);
}

Test(bgctl_user, if_missing_succeeds_when_the_user_exists)
{
    char out[4096];
    const char *args[] = {"create",        "--email", "seed@example.com", "--password",
                          "seed password", "--admin", "--if-missing",     NULL};
    cr_assert_eq(bgctl_user(out, sizeof(out), args), 0, "%s", out);
    cr_assert_not_null(strstr(out, "created"), "%s", out);
    cr_assert_eq(bgctl_user(out, sizeof(out), args), 0, "%s", out);
    cr_assert_not_null(strstr(out, "already exists"), "%s", out);
    cr_assert_eq(user_count(), 1);
    char *orgs = q("SELECT count(*) FROM organizations", NULL);
    cr_assert_str_eq(orgs, "1");
    free(orgs);
}

Test(bgctl_user, weak_password_is_refused_with_a_clear_message)
{
    char out[4096];
    const char *args[] = {"create", "--email", "weak@example.com", "--password", "short1", NULL};
    cr_assert_eq(bgctl_user(out, sizeof(out), args), 1, "%s", out);
    cr_assert_not_null(strstr(out, "at least 10 characters"), "%s", out);
    /* 9 characters, some of them multi-byte: still too short (characters, not bytes) */
    const char *nine[] = {"create", "--email", "weak@example.com", "--password", "пароль123", NULL};
    cr_assert_eq(bgctl_user(out, sizeof(out), nine), 1, "%s", out);
    cr_assert_eq(user_count(), 0);
}

Test(bgctl_user, invalid_email_is_refused)
{
    static const char *const bad[] = {"no-at-sign",         "two@@example.com", "a@b",
                                      "spa ce@example.com", "@example.com",     "x@.example.com",
                                      "x@example.com."};
    char out[4096];
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        const char *args[] = {"create", "--email", bad[i], "--password", "long enough password",
                              NULL};
        cr_assert_eq(bgctl_user(out, sizeof(out), args), 1, "%s: %s", bad[i], out);
        cr_assert_not_null(strstr(out, "not a valid email"), "%s: %s", bad[i], out);
    }
    cr_assert_eq(user_count(), 0);
}

Test(bgctl_user, missing_arguments_print_usage)
{
    char out[4096];
    const char *args[] = {"create", "--email", "x@example.com", NULL};
    cr_assert_eq(bgctl_user(out, sizeof(out), args), 2, "%s", out);
    cr_assert_not_null(strstr(out, "usage"), "%s", out);
    const char *none[] = {NULL};
    cr_assert_eq(bgctl_user(out, sizeof(out), none), 2, "%s", out);
}
