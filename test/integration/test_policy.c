/*
 * The admission state compiled from the real schema, seeded plans and policy rules: what a trial
 * user, a subscriber, a user whose payment failed and one who canceled may do, how rules override
 * the defaults, and the exact hash the admission script reads from Redis.
 */
#include <criterion/criterion.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/err.h"
#include "bg/pg.h"
#include "bg/policy.h"
#include "bg/redis.h"
#include "bg/timeutil.h"
#include "bgtest.h"

#define DAY INT64_C(86400000)
#define SHARDS 16

static bgt_pg_t db;
static PGconn *conn;
static int64_t now;

static void setup(void)
{
    cr_assert_eq(bgt_pg_create(&db, true), 0);
    char err[512];
    cr_assert_eq(bg_pg_connect(db.url, 3, &conn, err, sizeof(err)), 0, "connect: %s", err);
    now = bg_timeutil_wall_ms();
}

static void teardown(void)
{
    PQfinish(conn);
    conn = NULL;
    bgt_pg_drop(&db);
}

TestSuite(policy_compile, .init = setup, .fini = teardown);

/* Runs sql; returns the first field of the first row (new string, "" when none). */
static char *q(const char *sql, int n, const char *const *params)
{
    PGresult *res;
    int rc = bg_pg_exec(conn, sql, n, params, &res);
    cr_assert_eq(rc, 0, "%s: %s", sql, bg_strerror(rc));
    char *v = strdup(PQntuples(res) > 0 && PQnfields(res) > 0 && !PQgetisnull(res, 0, 0)
                         ? PQgetvalue(res, 0, 0)
                         : "");
    PQclear(res);
    return v;
}

/* Makes a user with a personal organization and a billing account; returns the id (new string). */
static char *make_user(const char *email)
{
    const char *p[] = {email};
    char *id = q("WITH u AS (INSERT INTO users (email) VALUES ($1) RETURNING id), "
                 "o AS (INSERT INTO organizations (name, personal, owner_id) "
                 "  SELECT 'ws', true, id FROM u RETURNING id, owner_id), "
                 "m AS (INSERT INTO memberships (organization_id, user_id, role) "
                 "  SELECT id, owner_id, 'owner' FROM o), "
                 "b AS (INSERT INTO billing_accounts (user_id) SELECT id FROM u) "
                 "SELECT id FROM u",
                 1, p);
    return id;
}

static char *org_of(const char *user)
{
    const char *p[] = {user};
    return q("SELECT organization_id FROM memberships WHERE user_id = $1", 1, p);
}

/*
 * Inserts a subscription; times in unix ms; trial_end < 0 for none; paddle gives it Paddle ids.
 * Returns its id (new string).
 */
static char *make_sub(const char *user, const char *plan, const char *status, int64_t start,
                      int64_t end, int64_t trial_end, bool paddle)
{
    char s[24], e[24], t[24];
    snprintf(s, sizeof(s), "%" PRId64, start);
    snprintf(e, sizeof(e), "%" PRId64, end);
    snprintf(t, sizeof(t), "%" PRId64, trial_end);
    const char *p[] = {user, plan, status, s, e, trial_end >= 0 ? t : NULL, paddle ? "t" : "f"};
    return q("INSERT INTO subscriptions (billing_account_id, user_id, plan_id, status, "
             "current_period_start, current_period_end, trial_ends_at, canceled_at, "
             "paddle_subscription_id) "
             "SELECT b.id, $1, $2, $3, "
             "'epoch'::timestamptz + $4::bigint * interval '1 ms', "
             "'epoch'::timestamptz + $5::bigint * interval '1 ms', "
             "'epoch'::timestamptz + $6::bigint * interval '1 ms', "
             "CASE WHEN $3 = 'canceled' THEN now() END, "
             "CASE WHEN $7::boolean THEN 'sub_' || md5(random()::text) END "
             "FROM billing_accounts b WHERE b.user_id = $1 RETURNING id",
             7, p);
}

static void rule(const char *type, const char *scope, const char *scope_id, const char *body,
                 int priority)
{
    char prio[16];
    snprintf(prio, sizeof(prio), "%d", priority);
    const char *p[] = {type, scope, scope_id, body, prio};
    free(q("INSERT INTO policy_rules (type, scope, scope_id, body, priority) "
           "VALUES ($1, $2, $3, $4::jsonb, $5::int) RETURNING id",
           5, p));
}

static bg_admission_state_t compile(const char *user, int64_t at)
{
    bg_admission_state_t st;
    int rc = bg_policy_compile_user(conn, user, at, &st);
    cr_assert_eq(rc, 0, "compile: %s", bg_strerror(rc));
    return st;
}

Test(policy_compile, trial_user_gets_50_a_day_in_day_windows_from_the_start)
{
    char *u = make_user("trial@example.com");
    int64_t start = now - 3 * DAY - 3600 * 1000 - 123;
    free(make_sub(u, "trial", "trialing", start, start + 14 * DAY, start + 14 * DAY, false));
    bg_admission_state_t st = compile(u, now);
    cr_assert_str_eq(st.status, "trialing");
    cr_assert_str_eq(st.plan, "trial");
    cr_assert_eq(st.limits.q_limit, 50);
    cr_assert_eq(st.w_len, DAY);
    cr_assert_eq(st.w_anchor, start + 3 * DAY, "the fourth day of the trial");
    cr_assert_eq(st.w_until, start + 14 * DAY);
    cr_assert_eq(st.limits.rpm, 10);
    cr_assert_eq(st.limits.burst, 5);
    cr_assert_eq(st.limits.conc, 1);
    cr_assert_eq(st.limits.tok_cap, 4096);
    cr_assert_eq(st.limits.tq_limit, 0);
    cr_assert_str_eq(st.limits.features, ",email_support,");
    cr_assert_eq(st.v, now);

    /* the next day is a new window; after day 14 the trial is over */
    st = compile(u, start + 4 * DAY);
    cr_assert_eq(st.w_anchor, start + 4 * DAY);
    st = compile(u, start + 14 * DAY);
    cr_assert_str_eq(st.status, "none");
    cr_assert_eq(st.limits.q_limit, 0);
    free(u);
}

Test(policy_compile, monthly_subscriber_window_is_the_billing_period)
{
    char *u = make_user("monthly@example.com");
    int64_t start = now - 10 * DAY;
    int64_t end = start + 31 * DAY;
    free(make_sub(u, "monthly", "active", start, end, -1, true));
    bg_admission_state_t st = compile(u, now);
    cr_assert_str_eq(st.status, "active");
    cr_assert_str_eq(st.plan, "monthly");
    cr_assert_eq(st.limits.q_limit, 10000);
    cr_assert_eq(st.w_anchor, start);
    cr_assert_eq(st.w_len, end - start, "a 31-day month is one window");
    cr_assert_eq(st.w_until, end);
    cr_assert_eq(st.limits.rpm, 60);
    cr_assert_eq(st.limits.conc, 2);
    cr_assert_str_eq(st.limits.features,
                     ",email_support,chat_support,priority_support,api_access,");
    /* the renewal has not arrived: the period is over, no free service */
    st = compile(u, end);
    cr_assert_str_eq(st.status, "none");
    free(u);
}

Test(policy_compile, past_due_keeps_access_until_the_period_ends)
{
    char *u = make_user("late@example.com");
    int64_t start = now - 20 * DAY;
    int64_t end = start + 30 * DAY;
    free(make_sub(u, "weekly", "past_due", start, end, -1, true));
    bg_admission_state_t st = compile(u, now);
    cr_assert_str_eq(st.status, "active");
    cr_assert_eq(st.limits.q_limit, 1000);
    cr_assert_eq(st.w_until, end);
    st = compile(u, end + 1);
    cr_assert_str_eq(st.status, "none");
    cr_assert_eq(st.limits.q_limit, 0);
    cr_assert_leq(st.w_until, end + 1);
    free(u);
}

Test(policy_compile, canceled_paused_and_no_subscription_give_none)
{
    char *u = make_user("gone@example.com");
    bg_admission_state_t st = compile(u, now);
    cr_assert_str_eq(st.status, "none", "no subscription at all");
    cr_assert_str_eq(st.plan, "");
    cr_assert_geq(st.limits.burst, 1);

    free(make_sub(u, "monthly", "canceled", now - DAY, now + 29 * DAY, -1, true));
    st = compile(u, now);
    cr_assert_str_eq(st.status, "none");
    cr_assert_str_eq(st.plan, "monthly");
    cr_assert_eq(st.limits.q_limit, 0);
    cr_assert_str_eq(st.limits.features, ",", "no plan features without a plan");

    char *v = make_user("paused@example.com");
    free(make_sub(v, "yearly", "paused", now - DAY, now + 300 * DAY, -1, true));
    st = compile(v, now);
    cr_assert_str_eq(st.status, "none");

    cr_assert_eq(bg_policy_compile_user(conn, "0190a0b0-0000-7000-8000-000000000999", now, &st),
                 BG_ERR_NOT_FOUND);
    cr_assert_eq(bg_policy_compile_user(conn, "nope", now, &st), BG_ERR_NOT_FOUND);
    free(u);
    free(v);
}

Test(policy_compile, rules_override_defaults_user_over_organization_over_plan)
{
    char *u = make_user("ruled@example.com");
    char *other = make_user("other@example.com");
    free(make_sub(u, "monthly", "active", now - DAY, now + 29 * DAY, -1, true));
    free(make_sub(other, "monthly", "active", now - DAY, now + 29 * DAY, -1, true));
    rule("rate_limit", "global", NULL, "{\"rpm\": 5, \"burst\": 1}", 100);
    rule("rate_limit", "plan", "monthly", "{\"rpm\": 90, \"burst\": 9}", 0);
    rule("quota", "plan", "monthly", "{\"requests\": 20000, \"concurrency\": 4}", 0);
    rule("quota", "plan", "daily", "{\"requests\": 1}", 50);
    bg_admission_state_t st = compile(u, now);
    cr_assert_eq(st.limits.rpm, 90, "the plan rule beats the global one of higher priority");
    cr_assert_eq(st.limits.burst, 9);
    cr_assert_eq(st.limits.q_limit, 20000);
    cr_assert_eq(st.limits.conc, 4);
    cr_assert_eq(st.limits.tok_cap, 4096, "not set by any rule: the default");

    char *org = org_of(u);
    rule("quota", "organization", org, "{\"requests\": 30000, \"tokens\": 5000000}", 0);
    rule("quota", "user", u, "{\"requests\": 500, \"max_tokens_per_request\": 256}", 0);
    rule("rate_limit", "user", u, "{\"rpm\": 1, \"burst\": 1}", 0);
    /* a disabled rule does nothing */
    const char *p[] = {u};
    free(q("INSERT INTO policy_rules (type, scope, scope_id, body, enabled) VALUES "
           "('quota', 'user', $1, '{\"requests\": 7}', false) RETURNING id",
           1, p));
    st = compile(u, now);
    cr_assert_eq(st.limits.q_limit, 500, "the user rule wins");
    cr_assert_eq(st.limits.tok_cap, 256);
    cr_assert_eq(st.limits.tq_limit, 5000000, "tokens from the organization rule");
    cr_assert_eq(st.limits.conc, 4, "concurrency still from the plan rule");
    cr_assert_eq(st.limits.rpm, 1);

    st = compile(other, now);
    cr_assert_eq(st.limits.q_limit, 20000, "another user keeps the plan rule");
    cr_assert_eq(st.limits.rpm, 90);
    free(org);
    free(u);
    free(other);
}

Test(policy_compile, feature_flags_at_0_and_100_percent)
{
    char *u = make_user("flags@example.com");
    free(make_sub(u, "daily", "active", now - 3600000, now + DAY - 3600000, -1, true));
    rule("feature_flag", "global", NULL,
         "{\"flag\": \"beta\", \"enabled\": true, \"percentage\": 0}", 0);
    bg_admission_state_t st = compile(u, now);
    cr_assert_str_eq(st.limits.features, ",email_support,");
    cr_assert_eq(bg_pg_run(conn,
                           "UPDATE policy_rules SET body = '{\"flag\": \"beta\", "
                           "\"enabled\": true, \"percentage\": 100}'",
                           0, NULL),
                 0);
    st = compile(u, now);
    cr_assert_str_eq(st.limits.features, ",email_support,beta,");
    /* a user rule can take a plan feature away, and a plan-targeted flag adds one */
    rule("feature_flag", "user", u, "{\"flag\": \"email_support\", \"enabled\": false}", 0);
    rule("feature_flag", "plan", "daily", "{\"flag\": \"voice\", \"enabled\": true}", 0);
    rule("feature_flag", "plan", "weekly", "{\"flag\": \"video\", \"enabled\": true}", 0);
    st = compile(u, now);
    cr_assert_str_eq(st.limits.features, ",beta,voice,");
    free(u);
}

Test(policy_compile, plan_change_takes_the_new_limit_over_the_rows_period)
{
    char *u = make_user("change@example.com");
    int64_t start = now - 2 * 3600000;
    char *sub = make_sub(u, "daily", "active", start, start + DAY, -1, true);
    bg_admission_state_t st = compile(u, now);
    cr_assert_eq(st.limits.q_limit, 100);
    cr_assert_eq(st.w_anchor, start);
    /* an upgrade that keeps the period: the same window, the new limit */
    const char *p[] = {sub};
    cr_assert_eq(bg_pg_run(conn, "UPDATE subscriptions SET plan_id = 'weekly' WHERE id = $1", 1, p),
                 0);
    st = compile(u, now);
    cr_assert_eq(st.limits.q_limit, 1000);
    cr_assert_eq(st.w_anchor, start, "usage already counted in this window stays counted");
    /* Paddle starts a new period: the window is the new period */
    cr_assert_eq(bg_pg_run(conn,
                           "UPDATE subscriptions SET plan_id = 'monthly', "
                           "current_period_start = now(), current_period_end = now() + "
                           "interval '1 month' WHERE id = $1",
                           1, p),
                 0);
    st = compile(u, bg_timeutil_wall_ms());
    cr_assert_eq(st.limits.q_limit, 10000);
    cr_assert_gt(st.w_anchor, start);
    cr_assert_gt(st.w_len, 27 * DAY);
    free(sub);
    free(u);
}

Test(policy_compile, grant_of_a_daily_plan_has_day_windows)
{
    char *u = make_user("granted@example.com");
    int64_t start = now - 2 * DAY - 5000;
    free(make_sub(u, "daily", "active", start, start + 30 * DAY, -1, false));
    bg_admission_state_t st = compile(u, now);
    cr_assert_str_eq(st.status, "active");
    cr_assert_eq(st.limits.q_limit, 100);
    cr_assert_eq(st.w_len, DAY);
    cr_assert_eq(st.w_anchor, start + 2 * DAY);
    cr_assert_eq(st.w_until, start + 30 * DAY);
    free(u);
}

/* HGETALL of key as "field=value" lines sorted by field (new string). */
/* The packed copy the admission script reads ("pk", BG_POLICY_PK_MAX): nine little-endian doubles
 * (q_limit, w_anchor, w_len, w_until, rpm, burst, conc, tok_cap, tq_limit), the status, "\n" and
 * the features, decoded here byte by byte. */
static void assert_packed(bg_redis_t *r, const char *key, const bg_admission_state_t *st)
{
    redisReply *reply;
    cr_assert_eq(bg_redis_command(r, &reply, "HGET %s pk", key), 0);
    cr_assert_eq(reply->type, REDIS_REPLY_STRING);
    const unsigned char *p = (const unsigned char *)reply->str;
    const int64_t want[9] = {st->limits.q_limit, st->w_anchor,       st->w_len,
                             st->w_until,        st->limits.rpm,     st->limits.burst,
                             st->limits.conc,    st->limits.tok_cap, st->limits.tq_limit};
    cr_assert_geq(reply->len, 9 * 8 + 1);
    for (int i = 0; i < 9; i++) {
        uint64_t bits = 0;
        for (int b = 0; b < 8; b++)
            bits |= (uint64_t)p[8 * i + b] << (8 * b);
        double d;
        memcpy(&d, &bits, sizeof(d));
        cr_expect_eq((int64_t)d, want[i], "number %d of pk", i);
    }
    char tail[2300];
    snprintf(tail, sizeof(tail), "%s\n%s", st->status, st->limits.features);
    cr_expect_eq(reply->len - 72, strlen(tail));
    cr_expect_eq(memcmp(reply->str + 72, tail, strlen(tail)), 0, "pk's tail: %.*s",
                 (int)(reply->len - 72), reply->str + 72);
    freeReplyObject(reply);
}

static char *hgetall_sorted(bg_redis_t *r, const char *key)
{
    redisReply *reply;
    cr_assert_eq(bg_redis_command(r, &reply, "HGETALL %s", key), 0);
    cr_assert_eq(reply->type, REDIS_REPLY_ARRAY);
    size_t n = reply->elements / 2;
    char **lines = calloc(n + 1, sizeof(char *));
    for (size_t i = 0; i < n; i++) {
        if (strcmp(reply->element[2 * i]->str, "pk") == 0) {
            lines[i] = strdup("pk=(binary)"); /* checked by assert_packed */
            continue;
        }
        size_t len =
            strlen(reply->element[2 * i]->str) + strlen(reply->element[2 * i + 1]->str) + 2;
        lines[i] = malloc(len);
        snprintf(lines[i], len, "%s=%s", reply->element[2 * i]->str,
                 reply->element[2 * i + 1]->str);
    }
    freeReplyObject(reply);
    for (size_t i = 0; i < n; i++) {
        for (size_t j = i + 1; j < n; j++) {
            if (strcmp(lines[j], lines[i]) < 0) {
                char *t = lines[i];
                lines[i] = lines[j];
                lines[j] = t;
            }
        }
    }
    size_t total = 1;
    for (size_t i = 0; i < n; i++)
        total += strlen(lines[i]) + 1;
    char *out = calloc(1, total);
    for (size_t i = 0; i < n; i++) {
        strncat(out, lines[i], total - strlen(out) - 1);
        strncat(out, "\n", total - strlen(out) - 1);
        free(lines[i]);
    }
    free(lines);
    return out;
}

Test(policy_compile, state_write_sets_exactly_the_hash)
{
    bgt_redis_t redis;
    cr_assert_eq(bgt_redis_start(&redis), 0);
    bg_redis_t *r;
    cr_assert_eq(bg_redis_new(redis.url, 2000, &r), 0);

    char *u = make_user("hash@example.com");
    int64_t start = now - 10 * DAY;
    free(make_sub(u, "yearly", "active", start, start + 365 * DAY, -1, true));
    rule("feature_flag", "global", NULL, "{\"flag\": \"beta\", \"enabled\": true}", 0);
    bg_admission_state_t st = compile(u, now);

    char key[BG_REDIS_KEY_MAX];
    cr_assert_eq(bg_policy_key_adm(key, sizeof(key), SHARDS, u), 0);
    char want_key[BG_REDIS_KEY_MAX];
    snprintf(want_key, sizeof(want_key), "bg:{s%d}:adm:%s", bg_shard_of(u, SHARDS), u);
    cr_assert_str_eq(key, want_key);
    /* a field of an older format must go */
    redisReply *reply;
    cr_assert_eq(bg_redis_command(r, &reply, "HSET %s legacy 1 q_limit 3", key), 0);
    freeReplyObject(reply);

    cr_assert_eq(bg_policy_state_write(r, SHARDS, &st), 0);
    char *got = hgetall_sorted(r, key);
    char want[2048];
    snprintf(want, sizeof(want),
             "burst=5\nconc=2\n"
             "features=,email_support,chat_support,priority_support,phone_support,api_access,"
             "advanced_analytics,beta,\n"
             "pk=(binary)\nplan=yearly\nq_limit=150000\nrpm=120\nstatus=active\ntok_cap=4096\n"
             "tq_limit=0\nv=%" PRId64 "\nw_anchor=%" PRId64 "\nw_len=%" PRId64 "\nw_until=%" PRId64
             "\n",
             now, start, 365 * DAY, start + 365 * DAY);
    cr_assert_str_eq(got, want);
    free(got);
    assert_packed(r, key, &st);

    /* the argv form carries the same fields */
    bg_policy_argv_t a;
    cr_assert_eq(bg_policy_state_argv(&st, SHARDS, &a), 0);
    cr_assert_eq(a.argc, BG_POLICY_STATE_ARGC);
    cr_assert_str_eq(a.argv[0], "HSET");
    cr_assert_str_eq(a.argv[1], key);
    cr_assert_eq(bg_redis_argv(r, a.argc, a.argv, a.lens, &reply), 0);
    cr_assert_eq(reply->type, REDIS_REPLY_INTEGER);
    cr_assert_eq(reply->integer, 0, "every field existed already");
    freeReplyObject(reply);

    free(u);
    bg_redis_free(r);
    bgt_redis_stop(&redis);
}

Test(policy_compile, set_load_skips_invalid_rows_and_loads_by_subject)
{
    char *u = make_user("load@example.com");
    rule("quota", "user", u, "{\"requests\": 9}", 0);
    rule("quota", "plan", "monthly", "{\"requests\": 8}", 0);
    /* written around the API: an unknown field; skipped, not fatal */
    free(q("INSERT INTO policy_rules (type, scope, body) VALUES "
           "('rate_limit', 'global', '{\"limit\": 20, \"window_s\": 60}') RETURNING id",
           0, NULL));
    bg_policy_set_t *set;
    bg_policy_subject_t subj = {.user_id = u, .plan_id = "daily"};
    cr_assert_eq(bg_policy_set_load(conn, &subj, &set), 0);
    cr_assert_eq(bg_policy_set_count(set), 1, "only the user's rule applies");
    bg_policy_set_free(set);
    cr_assert_eq(bg_policy_set_load(conn, NULL, &set), 0);
    cr_assert_eq(bg_policy_set_count(set), 2, "every valid enabled rule");
    bg_policy_set_free(set);

    bg_policy_verr_t e;
    cr_assert_eq(bg_policy_scope_check(conn, BG_POLICY_PLAN, "monthly", &e), 0);
    cr_assert_eq(bg_policy_scope_check(conn, BG_POLICY_PLAN, "platinum", &e), BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "scope_id");
    free(u);
}
