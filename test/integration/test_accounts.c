/*
 * Accounts on the real schema: registration with its organization, billing account and trial;
 * sign-in lookups; refresh-token rotation with reuse detection (also when two refreshes race on
 * two connections); API keys stored as hashes; organizations and their roles; the admin list with
 * search and cursors; disabling and deleting users; and the audit rows each change leaves.
 *
 * Password hashing is not under test here: users get a fixed string the schema accepts.
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/accounts.h"
#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/id.h"
#include "bg/pg.h"
#include "bgtest.h"

#define FAKE_HASH "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g"
#define DAY_S 86400
#define HOUR_S 3600

static bgt_pg_t db;
static PGconn *conn;
static const bg_actor_t actor = {.kind = "user", .request_id = "req-1", .ip = "127.0.0.1"};

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

TestSuite(accounts, .init = setup, .fini = teardown, .timeout = 120);

/* Runs sql with up to 3 parameters; returns the first field of the first row (new string, "" when
 * none). */
static char *q(const char *sql, const char *p1, const char *p2, const char *p3)
{
    const char *p[] = {p1, p2, p3};
    int n = p3 != NULL ? 3 : p2 != NULL ? 2 : p1 != NULL ? 1 : 0;
    PGresult *res;
    int rc = bg_pg_exec(conn, sql, n, n > 0 ? p : NULL, &res);
    cr_assert_eq(rc, 0, "%s: %s", sql, bg_strerror(rc));
    char *v = strdup(PQntuples(res) > 0 && PQnfields(res) > 0 && !PQgetisnull(res, 0, 0)
                         ? PQgetvalue(res, 0, 0)
                         : "");
    PQclear(res);
    return v;
}

/* Asserts that sql (parameters as in q) yields want as its first field. */
static void expect(const char *want, const char *sql, const char *p1, const char *p2,
                   const char *p3)
{
    char *v = q(sql, p1, p2, p3);
    cr_assert_str_eq(v, want, "%s: got \"%s\", want \"%s\"", sql, v, want);
    free(v);
}

/* Number of audit rows with this action about this target. */
static void expect_audit(const char *count, const char *action, const char *target_id)
{
    expect(count, "SELECT count(*) FROM audit_log WHERE action = $1 AND target_id = $2", action,
           target_id, NULL);
}

static bg_user_t reg(const char *email, const char *name)
{
    bg_user_t u;
    int rc = bg_acct_register(conn, email, FAKE_HASH, name, NULL, &actor, &u);
    cr_assert_eq(rc, 0, "register %s: %s", email, bg_strerror(rc));
    return u;
}

static void make_admin(const char *user_id)
{
    free(q("UPDATE users SET role = 'admin' WHERE id = $1", user_id, NULL, NULL));
}

static void start(const char *user_id, char sid[BG_ACCT_ID_LEN], char tok[BG_ACCT_TOKEN_LEN])
{
    int rc = bg_acct_session_start(conn, user_id, "test-agent/1.0", "10.0.0.1", 30 * DAY_S, HOUR_S,
                                   sid, tok);
    cr_assert_eq(rc, 0, "session_start: %s", bg_strerror(rc));
}

/* Refreshes tok; returns the result and the reason, new token in next. */
static int refresh(const char *tok, char next[BG_ACCT_TOKEN_LEN], const char **why)
{
    bg_user_t u;
    char sid[BG_ACCT_ID_LEN];
    return bg_acct_session_refresh(conn, tok, HOUR_S, next, &u, sid, why);
}

static bool is_rfc3339_utc(const char *s)
{
    return strlen(s) == 20 && s[4] == '-' && s[10] == 'T' && s[19] == 'Z';
}

Test(accounts, register_creates_user_organization_billing_account_and_trial)
{
    bg_user_t u;
    cr_assert_eq(bg_acct_register(conn, "Ada@Example.com", FAKE_HASH, "Ada", "ru", &actor, &u), 0);
    cr_assert(bg_id_uuid_is_valid(u.id));
    cr_assert_str_eq(u.email, "Ada@Example.com", "stored as typed");
    cr_assert_str_eq(u.name, "Ada");
    cr_assert_str_eq(u.locale, "ru");
    cr_assert_str_eq(u.role, "user");
    cr_assert_str_eq(u.status, "active");
    cr_assert_not(u.deleted);
    cr_assert(is_rfc3339_utc(u.created_at), "%s", u.created_at);
    cr_assert(bg_id_uuid_is_valid(u.organization_id));

    expect("Ada's workspace|true",
           "SELECT name || '|' || personal FROM organizations "
           "WHERE id = $1 AND owner_id = $2",
           u.organization_id, u.id, NULL);
    expect("owner", "SELECT role FROM memberships WHERE organization_id = $1 AND user_id = $2",
           u.organization_id, u.id, NULL);
    expect("t", "SELECT trial_used_at IS NOT NULL FROM billing_accounts WHERE user_id = $1", u.id,
           NULL, NULL);
    expect("trial|trialing|14 days|true|true",
           "SELECT s.plan_id || '|' || s.status || '|' || "
           "(s.current_period_end - s.current_period_start)::text || '|' || "
           "(s.trial_ends_at = s.current_period_end)::text || '|' || "
           "(s.current_period_start > now() - interval '1 minute')::text "
           "FROM subscriptions s JOIN billing_accounts b ON b.id = s.billing_account_id "
           "WHERE s.user_id = $1 AND b.user_id = $1",
           u.id, NULL, NULL);
    expect("user|trial|req-1|127.0.0.1",
           "SELECT actor_kind || '|' || (details->>'plan') || '|' || request_id || '|' || "
           "host(ip) FROM audit_log WHERE action = 'user.register' AND target_id = $1 "
           "AND actor_id = $1::uuid AND organization_id = $2::uuid",
           u.id, u.organization_id, NULL);

    /* without a name, the workspace is named after the address */
    bg_user_t v = reg("bob@example.org", NULL);
    expect("bob@example.org's workspace", "SELECT name FROM organizations WHERE id = $1",
           v.organization_id, NULL, NULL);
    cr_assert_str_eq(v.locale, "en");
}

Test(accounts, duplicate_email_in_another_case_is_a_conflict)
{
    bg_user_t u = reg("dup@example.com", "First");
    bg_user_t again;
    cr_assert_eq(
        bg_acct_register(conn, "DUP@Example.COM", FAKE_HASH, "Second", NULL, &actor, &again),
        BG_ERR_CONFLICT);
    cr_assert_eq(PQtransactionStatus(conn), PQTRANS_IDLE, "rolled back cleanly");
    expect("1", "SELECT count(*) FROM users", NULL, NULL, NULL);
    expect("1", "SELECT count(*) FROM organizations", NULL, NULL, NULL);
    expect("1", "SELECT count(*) FROM subscriptions", NULL, NULL, NULL);
    expect("1", "SELECT count(*) FROM audit_log", NULL, NULL, NULL);
    bg_user_t got;
    cr_assert_eq(bg_acct_get_user(conn, u.id, &got), 0);
    cr_assert_str_eq(got.name, "First");

    /* what the database refuses is invalid input, not a conflict */
    cr_assert_eq(bg_acct_register(conn, "x@example.com", "plaintext", NULL, NULL, &actor, &again),
                 BG_ERR_INVALID);
    cr_assert_eq(
        bg_acct_register(conn, "y@example.com", FAKE_HASH, NULL, "not a locale", &actor, &again),
        BG_ERR_INVALID);
    expect("1", "SELECT count(*) FROM users", NULL, NULL, NULL);
}

Test(accounts, find_for_login_and_get_user)
{
    bg_user_t u = reg("Login@Example.com", "Lou");
    bg_user_t got;
    char hash[BG_CRYPTO_PWHASH_LEN];
    cr_assert_eq(bg_acct_find_for_login(conn, "login@EXAMPLE.com", &got, hash, sizeof(hash)), 0);
    cr_assert_str_eq(got.id, u.id);
    cr_assert_str_eq(hash, FAKE_HASH);
    cr_assert_str_eq(got.organization_id, u.organization_id);
    char small[8];
    cr_assert_eq(bg_acct_find_for_login(conn, "login@example.com", &got, small, sizeof(small)),
                 BG_ERR_TOO_LARGE);
    cr_assert_eq(bg_acct_find_for_login(conn, "nobody@example.com", &got, hash, sizeof(hash)),
                 BG_ERR_NOT_FOUND);

    cr_assert_eq(bg_acct_get_user(conn, u.id, &got), 0);
    cr_assert_str_eq(got.email, "Login@Example.com");
    cr_assert_eq(bg_acct_get_user(conn, "123", &got), BG_ERR_NOT_FOUND);
    cr_assert_eq(bg_acct_get_user(conn, "00000000-0000-0000-0000-000000000000", &got),
                 BG_ERR_NOT_FOUND);
    cr_assert_eq(bg_acct_get_user(conn, "'; DROP TABLE users; --", &got), BG_ERR_NOT_FOUND);

    cr_assert_eq(bg_acct_touch_login(conn, u.id), 0);
    expect("t", "SELECT last_login_at IS NOT NULL FROM users WHERE id = $1", u.id, NULL, NULL);
    cr_assert_eq(bg_acct_touch_login(conn, "00000000-0000-0000-0000-000000000000"),
                 BG_ERR_NOT_FOUND);
}

Test(accounts, profile_update_changes_only_what_is_given)
{
    bg_user_t u = reg("prof@example.com", "Old Name");
    bg_user_t got;
    cr_assert_eq(bg_acct_update_profile(conn, u.id, "Новое имя", NULL, &got), 0);
    cr_assert_str_eq(got.name, "Новое имя");
    cr_assert_str_eq(got.locale, "en");
    cr_assert_eq(bg_acct_update_profile(conn, u.id, NULL, "es", &got), 0);
    cr_assert_str_eq(got.name, "Новое имя");
    cr_assert_str_eq(got.locale, "es");

    /* a refused value changes nothing */
    cr_assert_eq(bg_acct_update_profile(conn, u.id, "X", "??", &got), BG_ERR_INVALID);
    cr_assert_eq(bg_acct_get_user(conn, u.id, &got), 0);
    cr_assert_str_eq(got.name, "Новое имя");
    cr_assert_str_eq(got.locale, "es");

    /* 200 characters of Cyrillic (400 bytes) come back whole */
    char longname[401] = "";
    for (int i = 0; i < 200; i++)
        memcpy(longname + 2 * i, "ж", 2);
    longname[400] = '\0';
    cr_assert_eq(bg_acct_update_profile(conn, u.id, longname, NULL, &got), 0);
    cr_assert_str_eq(got.name, longname);

    expect("3",
           "SELECT count(*) FROM audit_log WHERE action = 'user.update' AND target_id = $1 "
           "AND actor_id = $1::uuid",
           u.id, NULL, NULL);
    cr_assert_eq(bg_acct_update_profile(conn, "nope", "x", NULL, &got), BG_ERR_NOT_FOUND);
}

Test(accounts, refresh_rotates_and_reuse_revokes_the_whole_family)
{
    bg_user_t u = reg("rot@example.com", NULL);
    char sid[BG_ACCT_ID_LEN], t1[BG_ACCT_TOKEN_LEN], t2[BG_ACCT_TOKEN_LEN], t3[BG_ACCT_TOKEN_LEN];
    start(u.id, sid, t1);
    cr_assert(bg_id_uuid_is_valid(sid));
    cr_assert_eq(strlen(t1), 43, "32 random bytes in base64url: %zu", strlen(t1));

    /* only the SHA-256 is stored */
    char h1[BG_CRYPTO_SHA256_HEX_LEN];
    bg_crypto_sha256_hex(t1, strlen(t1), h1);
    expect("1", "SELECT count(*) FROM refresh_tokens WHERE token_hash = $1 AND session_id = $2", h1,
           sid, NULL);
    expect("0", "SELECT count(*) FROM refresh_tokens WHERE token_hash = $1", t1, NULL, NULL);

    bg_user_t who;
    char sid2[BG_ACCT_ID_LEN];
    const char *why = "unset";
    cr_assert_eq(bg_acct_session_refresh(conn, t1, HOUR_S, t2, &who, sid2, &why), 0);
    cr_assert_null(why);
    cr_assert_str_neq(t1, t2);
    cr_assert_str_eq(who.id, u.id);
    cr_assert_str_eq(sid2, sid);
    expect("t", "SELECT used_at IS NOT NULL FROM refresh_tokens WHERE token_hash = $1", h1, NULL,
           NULL);

    /* the old token again: reuse, the family is revoked */
    cr_assert_eq(refresh(t1, t3, &why), BG_ERR_DENIED);
    cr_assert_str_eq(why, "reuse");
    cr_assert_str_eq(t3, "");
    expect("reuse_detected", "SELECT revoked_reason FROM auth_sessions WHERE id = $1", sid, NULL,
           NULL);
    expect("0", "SELECT count(*) FROM refresh_tokens WHERE session_id = $1 AND revoked_at IS NULL",
           sid, NULL, NULL);
    expect_audit("1", "session.reuse_detected", sid);

    /* the new token dies with it, and a replay changes nothing more */
    cr_assert_eq(refresh(t2, t3, &why), BG_ERR_DENIED);
    cr_assert_str_eq(why, "revoked");
    cr_assert_eq(refresh(t1, t3, &why), BG_ERR_DENIED);
    cr_assert_str_eq(why, "revoked");
    expect_audit("1", "session.reuse_detected", sid);

    cr_assert_eq(refresh("not-a-token", t3, &why), BG_ERR_DENIED);
    cr_assert_str_eq(why, "unknown");
    cr_assert_eq(refresh("", t3, &why), BG_ERR_DENIED);
    cr_assert_str_eq(why, "unknown");
    cr_assert_eq(PQtransactionStatus(conn), PQTRANS_IDLE);
}

Test(accounts, a_chain_of_rotations_keeps_working)
{
    bg_user_t u = reg("chain@example.com", NULL);
    char sid[BG_ACCT_ID_LEN], tok[BG_ACCT_TOKEN_LEN], next[BG_ACCT_TOKEN_LEN];
    start(u.id, sid, tok);
    const char *why;
    for (int i = 0; i < 5; i++) {
        cr_assert_eq(refresh(tok, next, &why), 0, "rotation %d", i);
        memcpy(tok, next, sizeof(tok));
    }
    expect("6", "SELECT count(*) FROM refresh_tokens WHERE session_id = $1", sid, NULL, NULL);
    expect("1", "SELECT count(*) FROM refresh_tokens WHERE session_id = $1 AND used_at IS NULL",
           sid, NULL, NULL);
    char user_of[BG_ACCT_ID_LEN], sid_of[BG_ACCT_ID_LEN];
    cr_assert_eq(bg_acct_session_of_token(conn, tok, sid_of, user_of), 0);
    cr_assert_str_eq(sid_of, sid);
    cr_assert_str_eq(user_of, u.id);
    cr_assert_eq(bg_acct_session_of_token(conn, "unknown", sid_of, user_of), BG_ERR_NOT_FOUND);
}

typedef struct racer {
    const char *url;
    const char *token;
    pthread_barrier_t *barrier;
    int rc;
    const char *why;
    char next[BG_ACCT_TOKEN_LEN];
} racer_t;

static void *race(void *arg)
{
    racer_t *r = arg;
    PGconn *c = NULL;
    char err[256];
    r->rc = bg_pg_connect(r->url, 3, &c, err, sizeof(err));
    (void)pthread_barrier_wait(r->barrier);
    if (r->rc == 0) {
        bg_user_t u;
        char sid[BG_ACCT_ID_LEN];
        r->rc = bg_acct_session_refresh(c, r->token, HOUR_S, r->next, &u, sid, &r->why);
    }
    PQfinish(c);
    return NULL;
}

Test(accounts, concurrent_refreshes_of_one_token_let_exactly_one_win)
{
    bg_user_t u = reg("race@example.com", NULL);
    for (int round = 0; round < 8; round++) {
        char sid[BG_ACCT_ID_LEN], tok[BG_ACCT_TOKEN_LEN];
        start(u.id, sid, tok);
        pthread_barrier_t barrier;
        cr_assert_eq(pthread_barrier_init(&barrier, NULL, 2), 0);
        racer_t r[2];
        pthread_t th[2];
        for (int i = 0; i < 2; i++) {
            r[i] = (racer_t){.url = db.url, .token = tok, .barrier = &barrier};
            cr_assert_eq(pthread_create(&th[i], NULL, race, &r[i]), 0);
        }
        for (int i = 0; i < 2; i++)
            cr_assert_eq(pthread_join(th[i], NULL), 0);
        (void)pthread_barrier_destroy(&barrier);

        int winner = r[0].rc == 0 ? 0 : 1;
        racer_t *w = &r[winner], *l = &r[1 - winner];
        cr_assert_eq(w->rc, 0, "round %d: one refresh succeeds (%s / %s)", round,
                     bg_strerror(r[0].rc), bg_strerror(r[1].rc));
        cr_assert_eq(l->rc, BG_ERR_DENIED, "round %d: the other is refused: %s", round,
                     bg_strerror(l->rc));
        cr_assert_str_eq(l->why, "reuse");
        /* the loser saw reuse, so the winner's fresh token is dead too */
        const char *why;
        char next[BG_ACCT_TOKEN_LEN];
        cr_assert_eq(refresh(w->next, next, &why), BG_ERR_DENIED);
        cr_assert_str_eq(why, "revoked");
        expect("reuse_detected", "SELECT revoked_reason FROM auth_sessions WHERE id = $1", sid,
               NULL, NULL);
    }
}

Test(accounts, expired_tokens_and_sessions_are_refused)
{
    bg_user_t u = reg("exp@example.com", NULL);
    char sid[BG_ACCT_ID_LEN], tok[BG_ACCT_TOKEN_LEN], next[BG_ACCT_TOKEN_LEN];
    const char *why;
    start(u.id, sid, tok);
    free(q("UPDATE refresh_tokens SET expires_at = now() - interval '1 second' "
           "WHERE session_id = $1",
           sid, NULL, NULL));
    cr_assert_eq(refresh(tok, next, &why), BG_ERR_DENIED);
    cr_assert_str_eq(why, "expired");
    expect("f", "SELECT bool_or(used_at IS NOT NULL) FROM refresh_tokens WHERE session_id = $1",
           sid, NULL, NULL);
    expect("t", "SELECT revoked_at IS NULL FROM auth_sessions WHERE id = $1", sid, NULL, NULL);

    /* the session's absolute end holds whatever the token's own expiry says */
    start(u.id, sid, tok);
    free(q("UPDATE auth_sessions SET expires_at = now() - interval '1 second' WHERE id = $1", sid,
           NULL, NULL));
    cr_assert_eq(refresh(tok, next, &why), BG_ERR_DENIED);
    cr_assert_str_eq(why, "expired");

    /* a token never outlives its session */
    cr_assert_eq(bg_acct_session_start(conn, u.id, NULL, "not an ip", 60, DAY_S, sid, tok), 0);
    expect("t",
           "SELECT t.expires_at <= s.expires_at AND s.ip IS NULL AND s.user_agent IS NULL "
           "FROM refresh_tokens t JOIN auth_sessions s ON s.id = t.session_id WHERE s.id = $1",
           sid, NULL, NULL);
    cr_assert_eq(bg_acct_session_start(conn, u.id, NULL, NULL, 0, DAY_S, sid, tok), BG_ERR_INVALID);
    cr_assert_eq(bg_acct_session_start(conn, "bad", NULL, NULL, 60, 60, sid, tok),
                 BG_ERR_NOT_FOUND);
}

Test(accounts, disabled_user_cannot_refresh_or_start_sessions)
{
    bg_user_t u = reg("dis@example.com", NULL);
    char sid[BG_ACCT_ID_LEN], tok[BG_ACCT_TOKEN_LEN], next[BG_ACCT_TOKEN_LEN];
    const char *why;
    start(u.id, sid, tok);
    /* disabled behind our back (not through admin_update, which also revokes sessions) */
    free(q("UPDATE users SET status = 'disabled' WHERE id = $1", u.id, NULL, NULL));
    cr_assert_eq(refresh(tok, next, &why), BG_ERR_DENIED);
    cr_assert_str_eq(why, "user_disabled");
    cr_assert_eq(bg_acct_session_start(conn, u.id, NULL, NULL, 60, 60, sid, next), BG_ERR_DENIED);
    /* enabled again, the untouched token still works */
    free(q("UPDATE users SET status = 'active' WHERE id = $1", u.id, NULL, NULL));
    cr_assert_eq(refresh(tok, next, &why), 0);
}

Test(accounts, revoke_signs_a_session_out)
{
    bg_user_t u = reg("out@example.com", NULL);
    bg_user_t other = reg("other@example.com", NULL);
    char sid[BG_ACCT_ID_LEN], tok[BG_ACCT_TOKEN_LEN], next[BG_ACCT_TOKEN_LEN];
    const char *why;
    start(u.id, sid, tok);
    cr_assert_eq(bg_acct_session_revoke(conn, other.id, sid, "logout"), BG_ERR_NOT_FOUND);
    cr_assert_eq(refresh(tok, next, &why), 0, "another user's revoke changed nothing");
    memcpy(tok, next, sizeof(tok));

    cr_assert_eq(bg_acct_session_revoke(conn, u.id, sid, "logout"), 0);
    cr_assert_eq(refresh(tok, next, &why), BG_ERR_DENIED);
    cr_assert_str_eq(why, "revoked");
    cr_assert_eq(bg_acct_session_revoke(conn, u.id, sid, "admin"), 0, "idempotent");
    expect("logout", "SELECT revoked_reason FROM auth_sessions WHERE id = $1", sid, NULL, NULL);
    expect("0", "SELECT count(*) FROM refresh_tokens WHERE session_id = $1 AND revoked_at IS NULL",
           sid, NULL, NULL);
    cr_assert_eq(bg_acct_session_revoke(conn, u.id, "x", "logout"), BG_ERR_NOT_FOUND);
    start(u.id, sid, tok);
    cr_assert_eq(bg_acct_session_revoke(conn, u.id, sid, "because"), BG_ERR_INVALID);
}

Test(accounts, api_keys_are_shown_once_and_stored_as_hashes)
{
    bg_user_t u = reg("keys@example.com", NULL);
    bg_user_t other = reg("keys2@example.com", NULL);
    char key[BG_ACCT_TOKEN_LEN];
    bg_api_key_t k;
    cr_assert_eq(bg_acct_api_key_create(conn, u.id, "laptop", "chat,,models", &actor, key, &k), 0);
    cr_assert_eq(strncmp(key, "bgk_", 4), 0, "%s", k.prefix);
    cr_assert_eq(strlen(key), 4 + 43);
    cr_assert_eq(strlen(k.prefix), 12);
    cr_assert_eq(strncmp(key, k.prefix, 12), 0);
    cr_assert_str_eq(k.name, "laptop");
    cr_assert_str_eq(k.scopes, "chat,models");
    cr_assert_str_eq(k.last_used_at, "");
    cr_assert(is_rfc3339_utc(k.created_at));

    char h[BG_CRYPTO_SHA256_HEX_LEN];
    bg_crypto_sha256_hex(key, strlen(key), h);
    expect("1", "SELECT count(*) FROM api_keys WHERE key_hash = $1 AND id = $2", h, k.id, NULL);
    expect("0", "SELECT count(*) FROM api_keys WHERE key_hash = $1 OR prefix = $1 OR name = $1",
           key, NULL, NULL);
    expect("0", "SELECT count(*) FROM audit_log WHERE details::text LIKE '%' || $1 || '%'", key,
           NULL, NULL);
    expect_audit("1", "api_key.create", k.id);

    bg_api_key_t list[4];
    size_t n;
    cr_assert_eq(bg_acct_api_key_list(conn, u.id, list, 4, &n), 0);
    cr_assert_eq(n, 1);
    cr_assert_str_eq(list[0].id, k.id);
    cr_assert_eq(bg_acct_api_key_list(conn, other.id, list, 4, &n), 0);
    cr_assert_eq(n, 0);

    bg_user_t who;
    bg_api_key_t used;
    cr_assert_eq(bg_acct_api_key_verify(conn, key, &who, &used), 0);
    cr_assert_str_eq(who.id, u.id);
    cr_assert_str_eq(used.id, k.id);
    char *first = q("SELECT last_used_at::text FROM api_keys WHERE id = $1", k.id, NULL, NULL);
    cr_assert_str_neq(first, "");
    /* within a minute, no second write */
    cr_assert_eq(bg_acct_api_key_verify(conn, key, &who, &used), 0);
    expect(first, "SELECT last_used_at::text FROM api_keys WHERE id = $1", k.id, NULL, NULL);
    free(first);
    free(q("UPDATE api_keys SET last_used_at = now() - interval '2 minutes' WHERE id = $1", k.id,
           NULL, NULL));
    cr_assert_eq(bg_acct_api_key_verify(conn, key, &who, &used), 0);
    expect("t", "SELECT last_used_at > now() - interval '1 minute' FROM api_keys WHERE id = $1",
           k.id, NULL, NULL);

    /* another user cannot revoke it; its owner can, and then it opens nothing */
    cr_assert_eq(bg_acct_api_key_revoke(conn, other.id, k.id, &actor), BG_ERR_NOT_FOUND);
    cr_assert_eq(bg_acct_api_key_verify(conn, key, &who, &used), 0);
    cr_assert_eq(bg_acct_api_key_revoke(conn, u.id, k.id, &actor), 0);
    cr_assert_eq(bg_acct_api_key_verify(conn, key, &who, &used), BG_ERR_DENIED);
    cr_assert_eq(bg_acct_api_key_list(conn, u.id, list, 4, &n), 0);
    cr_assert_eq(n, 0);
    cr_assert_eq(bg_acct_api_key_revoke(conn, u.id, k.id, &actor), BG_ERR_NOT_FOUND);
    cr_assert_eq(bg_acct_api_key_revoke(conn, u.id, "12", &actor), BG_ERR_NOT_FOUND);
    expect_audit("1", "api_key.revoke", k.id);

    cr_assert_eq(bg_acct_api_key_verify(conn, "bgk_forged", &who, &used), BG_ERR_DENIED);
    cr_assert_eq(bg_acct_api_key_verify(conn, "sk-something", &who, &used), BG_ERR_DENIED);
    cr_assert_eq(bg_acct_api_key_create(conn, u.id, "", NULL, &actor, key, &k), BG_ERR_INVALID);
    cr_assert_str_eq(key, "");

    /* a disabled owner's key opens nothing either */
    cr_assert_eq(bg_acct_api_key_create(conn, u.id, "second", "chat", &actor, key, &k), 0);
    free(q("UPDATE users SET status = 'disabled' WHERE id = $1", u.id, NULL, NULL));
    cr_assert_eq(bg_acct_api_key_verify(conn, key, &who, &used), BG_ERR_DENIED);
}

Test(accounts, organizations_and_member_roles)
{
    bg_user_t owner = reg("owner@example.com", "Olga");
    bg_user_t mate = reg("Mate@Example.com", "Max");
    bg_user_t third = reg("third@example.com", "Tim");
    bg_user_t stranger = reg("stranger@example.com", "Sam");
    bg_actor_t as_owner = {.kind = "user", .id = owner.id};

    bg_org_t org;
    cr_assert_eq(bg_acct_org_create(conn, owner.id, "Team", &as_owner, &org), 0);
    cr_assert_str_eq(org.name, "Team");
    cr_assert_not(org.personal);
    cr_assert_str_eq(org.my_role, "owner");
    expect_audit("1", "org.create", org.id);
    cr_assert_eq(bg_acct_org_create(conn, owner.id, "", &as_owner, &org), BG_ERR_INVALID);

    bg_org_t list[4];
    size_t n;
    cr_assert_eq(bg_acct_org_list(conn, owner.id, list, 4, &n), 0);
    cr_assert_eq(n, 2);
    cr_assert(list[0].personal, "the personal workspace comes first");
    cr_assert_str_eq(list[1].id, org.id);

    const char *what;
    cr_assert_eq(bg_acct_org_set_member(conn, owner.id, org.id, "mate@EXAMPLE.com", "member",
                                        &as_owner, &what),
                 0);
    cr_assert_eq(bg_acct_org_list(conn, mate.id, list, 4, &n), 0);
    cr_assert_eq(n, 2);
    cr_assert_str_eq(list[1].id, org.id);
    cr_assert_str_eq(list[1].my_role, "member");

    bg_org_t got;
    bg_org_member_t members[8];
    cr_assert_eq(bg_acct_org_get(conn, mate.id, org.id, &got, members, 8, &n), 0);
    cr_assert_eq(n, 2);
    cr_assert_str_eq(members[0].user_id, owner.id);
    cr_assert_str_eq(members[0].role, "owner");
    cr_assert_str_eq(members[1].email, "Mate@Example.com");
    cr_assert_str_eq(members[1].role, "member");

    /* strangers see nothing, and are told nothing more */
    cr_assert_eq(bg_acct_org_get(conn, stranger.id, org.id, &got, members, 8, &n),
                 BG_ERR_NOT_FOUND);
    cr_assert_eq(bg_acct_org_set_member(conn, stranger.id, org.id, "third@example.com", "member",
                                        NULL, &what),
                 BG_ERR_NOT_FOUND);
    cr_assert_str_eq(what, "organization");
    cr_assert_eq(bg_acct_org_remove_member(conn, stranger.id, org.id, mate.id, NULL),
                 BG_ERR_NOT_FOUND);

    /* a member manages nothing */
    cr_assert_eq(
        bg_acct_org_set_member(conn, mate.id, org.id, "third@example.com", "member", NULL, &what),
        BG_ERR_DENIED);
    cr_assert_eq(bg_acct_org_set_member(conn, owner.id, org.id, "ghost@example.com", "member",
                                        &as_owner, &what),
                 BG_ERR_NOT_FOUND);
    cr_assert_str_eq(what, "user");
    cr_assert_eq(bg_acct_org_set_member(conn, owner.id, org.id, "third@example.com", "boss",
                                        &as_owner, &what),
                 BG_ERR_INVALID);

    /* promoted to admin, mate can add people, but makes no owners and leaves the owner alone */
    cr_assert_eq(bg_acct_org_set_member(conn, owner.id, org.id, "mate@example.com", "admin",
                                        &as_owner, &what),
                 0);
    expect("member",
           "SELECT details->>'previous_role' FROM audit_log "
           "WHERE action = 'org.member.set' AND details->>'role' = 'admin'",
           NULL, NULL, NULL);
    cr_assert_eq(
        bg_acct_org_set_member(conn, mate.id, org.id, "third@example.com", "member", NULL, &what),
        0);
    cr_assert_eq(
        bg_acct_org_set_member(conn, mate.id, org.id, "third@example.com", "owner", NULL, &what),
        BG_ERR_DENIED);
    cr_assert_eq(
        bg_acct_org_set_member(conn, mate.id, org.id, "owner@example.com", "member", NULL, &what),
        BG_ERR_DENIED);
    cr_assert_eq(bg_acct_org_set_member(conn, owner.id, org.id, "owner@example.com", "admin",
                                        &as_owner, &what),
                 BG_ERR_DENIED, "the owner cannot step down to nobody");
    expect("owner", "SELECT role FROM memberships WHERE organization_id = $1 AND user_id = $2",
           org.id, owner.id, NULL);
    expect("member", "SELECT role FROM memberships WHERE organization_id = $1 AND user_id = $2",
           org.id, third.id, NULL);

    /* removal */
    cr_assert_eq(bg_acct_org_remove_member(conn, third.id, org.id, mate.id, NULL), BG_ERR_DENIED);
    cr_assert_eq(bg_acct_org_remove_member(conn, mate.id, org.id, owner.id, NULL), BG_ERR_DENIED);
    cr_assert_eq(bg_acct_org_remove_member(conn, owner.id, org.id, owner.id, NULL), BG_ERR_DENIED);
    cr_assert_eq(bg_acct_org_remove_member(conn, mate.id, org.id, third.id, NULL), 0);
    cr_assert_eq(bg_acct_org_remove_member(conn, mate.id, org.id, third.id, NULL),
                 BG_ERR_NOT_FOUND);
    cr_assert_eq(bg_acct_org_get(conn, third.id, org.id, &got, members, 8, &n), BG_ERR_NOT_FOUND);
    cr_assert_eq(bg_acct_org_get(conn, owner.id, org.id, &got, members, 8, &n), 0);
    cr_assert_eq(n, 2);

    expect("3",
           "SELECT count(*) FROM audit_log WHERE action = 'org.member.set' "
           "AND organization_id = $1::uuid",
           org.id, NULL, NULL);
    expect(third.id, "SELECT details->>'user_id' FROM audit_log WHERE action = 'org.member.remove'",
           NULL, NULL, NULL);
}

/* Collects every page of the admin list for query; returns the number of users seen. */
static size_t list_all(const char *query, size_t limit, char ids[][BG_ACCT_ID_LEN], size_t max,
                       size_t *pages)
{
    char cursor[BG_ACCT_CURSOR_LEN] = "";
    size_t total = 0;
    *pages = 0;
    bg_user_t *page = calloc(limit, sizeof(*page));
    cr_assert_not_null(page);
    do {
        size_t n;
        char next[BG_ACCT_CURSOR_LEN];
        int rc = bg_acct_admin_list_users(conn, query, cursor[0] != '\0' ? cursor : NULL, limit,
                                          page, &n, next, sizeof(next));
        cr_assert_eq(rc, 0, "list: %s", bg_strerror(rc));
        cr_assert_leq(n, limit);
        for (size_t i = 0; i < n; i++) {
            cr_assert_lt(total, max);
            memcpy(ids[total++], page[i].id, BG_ACCT_ID_LEN);
        }
        (*pages)++;
        memcpy(cursor, next, sizeof(cursor));
    } while (cursor[0] != '\0');
    free(page);
    return total;
}

Test(accounts, admin_list_searches_and_pages_with_cursors)
{
    char email[64], name[64];
    for (int i = 0; i < 25; i++) {
        snprintf(email, sizeof(email), "pager%02d@example.com", i);
        snprintf(name, sizeof(name), "Pager %02d", i);
        (void)reg(email, name);
    }
    (void)reg("else@example.com", "100% Real");
    (void)reg("x_y@example.com", "Underscore");
    /* ten users share one creation time: the id breaks the tie, and no page loses or repeats them
     */
    free(q("UPDATE users SET created_at = '2024-01-01T00:00:00Z' "
           "WHERE email LIKE 'pager1%' OR email = 'pager20@example.com'",
           NULL, NULL, NULL));

    static char ids[64][BG_ACCT_ID_LEN];
    size_t pages;
    size_t n = list_all("PAGER", 10, ids, 64, &pages);
    cr_assert_eq(n, 25);
    cr_assert_eq(pages, 3);
    for (size_t i = 0; i < n; i++) {
        for (size_t j = i + 1; j < n; j++)
            cr_assert_str_neq(ids[i], ids[j], "listed twice");
    }
    /* newest first, ties by id descending: the pages put together are the whole ordered list */
    char joined[64 * BG_ACCT_ID_LEN] = "";
    size_t len = 0;
    for (size_t i = 0; i < n; i++)
        len +=
            (size_t)snprintf(joined + len, sizeof(joined) - len, "%s%s", i > 0 ? "," : "", ids[i]);
    expect(joined,
           "SELECT string_agg(id::text, ',' ORDER BY created_at DESC, id DESC) FROM users "
           "WHERE email LIKE 'pager%'",
           NULL, NULL, NULL);

    cr_assert_eq(list_all(NULL, 7, ids, 64, &pages), 27);
    cr_assert_eq(pages, 4);
    cr_assert_eq(list_all("pager", 25, ids, 64, &pages), 25);
    cr_assert_eq(pages, 1, "an exact last page has no next cursor");
    /* wildcards in the search text are literal */
    cr_assert_eq(list_all("%", 10, ids, 64, &pages), 1);
    cr_assert_eq(list_all("_", 10, ids, 64, &pages), 1);
    cr_assert_eq(list_all("x_y", 10, ids, 64, &pages), 1);
    cr_assert_eq(list_all("no such person", 10, ids, 64, &pages), 0);

    bg_user_t page[2];
    char next[BG_ACCT_CURSOR_LEN];
    cr_assert_eq(
        bg_acct_admin_list_users(conn, NULL, "!!not-a-cursor", 2, page, &n, next, sizeof(next)),
        BG_ERR_INVALID);
    cr_assert_eq(bg_acct_admin_list_users(conn, NULL, "YWJj", 2, page, &n, next, sizeof(next)),
                 BG_ERR_INVALID, "base64 of abc: no timestamp, no id");
}

Test(accounts, admin_disable_revokes_sessions_and_keys_stop_working)
{
    bg_user_t admin = reg("root@example.com", "Root");
    make_admin(admin.id);
    bg_user_t u = reg("victim@example.com", "Vic");
    cr_assert_eq(bg_acct_require_admin(conn, admin.id), 0);
    cr_assert_eq(bg_acct_require_admin(conn, u.id), BG_ERR_DENIED);
    cr_assert_eq(bg_acct_require_admin(conn, "zzz"), BG_ERR_DENIED);
    bg_actor_t as_admin = {.kind = "admin", .id = admin.id, .request_id = "req-adm"};

    char sid1[BG_ACCT_ID_LEN], sid2[BG_ACCT_ID_LEN], t1[BG_ACCT_TOKEN_LEN], t2[BG_ACCT_TOKEN_LEN],
        next[BG_ACCT_TOKEN_LEN];
    start(u.id, sid1, t1);
    start(u.id, sid2, t2);
    bg_user_t out;
    cr_assert_eq(
        bg_acct_admin_update_user(conn, u.id, NULL, NULL, NULL, "disabled", &as_admin, &out), 0);
    cr_assert_str_eq(out.status, "disabled");
    cr_assert_str_eq(out.name, "Vic");
    expect("2",
           "SELECT count(*) FROM auth_sessions WHERE user_id = $1 "
           "AND revoked_reason = 'user_disabled'",
           u.id, NULL, NULL);
    const char *why;
    cr_assert_eq(refresh(t1, next, &why), BG_ERR_DENIED);
    cr_assert_str_eq(why, "user_disabled");
    expect("active|disabled|admin",
           "SELECT (details->'status'->>'from') || '|' || (details->'status'->>'to') || '|' || "
           "actor_kind FROM audit_log WHERE action = 'user.disable' AND target_id = $1 "
           "AND actor_id = $2::uuid",
           u.id, admin.id, NULL);

    /* enabling again does not bring revoked sessions back */
    cr_assert_eq(
        bg_acct_admin_update_user(conn, u.id, "Victor", NULL, "admin", "active", &as_admin, &out),
        0);
    cr_assert_str_eq(out.name, "Victor");
    cr_assert_str_eq(out.role, "admin");
    cr_assert_eq(refresh(t2, next, &why), BG_ERR_DENIED);
    cr_assert_str_eq(why, "revoked");
    expect("Vic|Victor|user|admin",
           "SELECT (details->'name'->>'from') || '|' || (details->'name'->>'to') || '|' || "
           "(details->'role'->>'from') || '|' || (details->'role'->>'to') FROM audit_log "
           "WHERE action = 'user.update' AND target_id = $1",
           u.id, NULL, NULL);

    /* refused values change nothing; nothing changed writes no audit row */
    cr_assert_eq(bg_acct_admin_update_user(conn, u.id, NULL, NULL, "root", NULL, &as_admin, &out),
                 BG_ERR_INVALID);
    cr_assert_eq(bg_acct_admin_update_user(conn, u.id, "Victor", NULL, NULL, NULL, &as_admin, &out),
                 0);
    expect_audit("1", "user.update", u.id);
    cr_assert_eq(bg_acct_admin_update_user(conn, "nope", NULL, NULL, NULL, NULL, &as_admin, &out),
                 BG_ERR_NOT_FOUND);
}

Test(accounts, admin_delete_hides_the_user_and_frees_the_email)
{
    bg_user_t admin = reg("boss@example.com", NULL);
    make_admin(admin.id);
    bg_actor_t as_admin = {.kind = "admin", .id = admin.id};
    bg_user_t u = reg("Gone@Example.com", "Gone");
    char sid[BG_ACCT_ID_LEN], tok[BG_ACCT_TOKEN_LEN], key[BG_ACCT_TOKEN_LEN],
        next[BG_ACCT_TOKEN_LEN];
    start(u.id, sid, tok);
    bg_api_key_t k;
    cr_assert_eq(bg_acct_api_key_create(conn, u.id, "k", "chat", &actor, key, &k), 0);

    cr_assert_eq(bg_acct_admin_delete_user(conn, u.id, &as_admin), 0);
    bg_user_t got;
    char hash[BG_CRYPTO_PWHASH_LEN];
    cr_assert_eq(bg_acct_get_user(conn, u.id, &got), BG_ERR_NOT_FOUND);
    cr_assert_eq(bg_acct_find_for_login(conn, "gone@example.com", &got, hash, sizeof(hash)),
                 BG_ERR_NOT_FOUND);
    cr_assert_eq(bg_acct_admin_get_user(conn, u.id, &got), 0);
    cr_assert(got.deleted);
    cr_assert_str_eq(got.email, "Gone@Example.com");
    const char *why;
    cr_assert_eq(refresh(tok, next, &why), BG_ERR_DENIED);
    cr_assert_str_eq(why, "revoked");
    expect("admin", "SELECT revoked_reason FROM auth_sessions WHERE id = $1", sid, NULL, NULL);
    bg_api_key_t used;
    cr_assert_eq(bg_acct_api_key_verify(conn, key, &got, &used), BG_ERR_DENIED);
    expect("t", "SELECT revoked_at IS NOT NULL FROM api_keys WHERE id = $1", k.id, NULL, NULL);
    cr_assert_eq(bg_acct_update_profile(conn, u.id, "Back", NULL, &got), BG_ERR_NOT_FOUND);
    cr_assert_eq(bg_acct_admin_delete_user(conn, u.id, &as_admin), BG_ERR_NOT_FOUND);
    expect("1",
           "SELECT details->>'api_keys_revoked' FROM audit_log WHERE action = 'user.delete' "
           "AND target_id = $1 AND actor_id = $2::uuid",
           u.id, admin.id, NULL);

    /* the address is free again, for a new account */
    bg_user_t again = reg("gone@example.com", "New");
    cr_assert_str_neq(again.id, u.id);
    cr_assert_eq(bg_acct_find_for_login(conn, "GONE@example.com", &got, hash, sizeof(hash)), 0);
    cr_assert_str_eq(got.id, again.id);

    /* the admin list still shows the deleted account, flagged */
    bg_user_t page[8];
    size_t n;
    char cursor[BG_ACCT_CURSOR_LEN];
    cr_assert_eq(bg_acct_admin_list_users(conn, "gone", NULL, 8, page, &n, cursor, sizeof(cursor)),
                 0);
    cr_assert_eq(n, 2);
    cr_assert_not(page[0].deleted);
    cr_assert(page[1].deleted);
}
