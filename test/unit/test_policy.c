/*
 * The policy engine without a database: rule validation (every refusal names the field an admin
 * must fix), the precedence of scopes, priorities and age, defaults per plan, percentage rollouts,
 * and resource access with deny and allow.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "bg/err.h"
#include "bg/id.h"
#include "bg/policy.h"

#define USER "0190a0b0-0000-7000-8000-000000000001"
#define OTHER_USER "0190a0b0-0000-7000-8000-000000000002"
#define ORG "0190a0b0-0000-7000-8000-0000000000aa"
#define OTHER_ORG "0190a0b0-0000-7000-8000-0000000000bb"

static const char *const orgs[] = {ORG};

static bg_policy_subject_t subject(const char *plan)
{
    return (bg_policy_subject_t){.user_id = USER,
                                 .plan_id = plan,
                                 .org_ids = orgs,
                                 .norgs = 1,
                                 .plan_features = "email_support,api_access"};
}

/* Parses a rule (asserting it is valid) and adds it to set with priority and age. */
static void add(bg_policy_set_t *set, const char *type, const char *scope, const char *scope_id,
                const char *body, int priority, int64_t created_ms)
{
    static int seq;
    bg_policy_rule_t r;
    bg_policy_verr_t e = {0};
    int rc = bg_policy_rule_parse(type, scope, scope_id, body, strlen(body), &r, &e);
    cr_assert_eq(rc, 0, "%s %s: %s %s", type, body, e.field, e.reason ? e.reason : "");
    r.priority = priority;
    r.created_ms = created_ms;
    snprintf(r.id, sizeof(r.id), "00000000-0000-7000-8000-%012d", ++seq);
    cr_assert_eq(bg_policy_set_add(set, &r), 0);
}

/* Returns the field a refused rule names ("" when it was accepted). */
static const char *refused_field(const char *type, const char *scope, const char *scope_id,
                                 const char *body)
{
    static bg_policy_verr_t e;
    memset(&e, 0, sizeof(e));
    bg_policy_rule_t r;
    int rc = bg_policy_rule_parse(type, scope, scope_id, body, strlen(body), &r, &e);
    if (rc == 0) {
        bg_policy_rule_dispose(&r);
        return "";
    }
    cr_assert_eq(rc, BG_ERR_INVALID);
    cr_assert_not_null(e.reason, "a refusal says why (%s)", e.field);
    return e.field;
}

Test(policy, validation_names_the_field)
{
    static const struct {
        const char *type, *scope, *scope_id, *body, *field;
    } cases[] = {
        {"rate_limit", "global", NULL, "{\"rpm\":0,\"burst\":1}", "rpm"},
        {"rate_limit", "global", NULL, "{\"rpm\":100001,\"burst\":1}", "rpm"},
        {"rate_limit", "global", NULL, "{\"rpm\":\"10\",\"burst\":1}", "rpm"},
        {"rate_limit", "global", NULL, "{\"rpm\":10}", "burst"},
        {"rate_limit", "global", NULL, "{\"rpm\":10,\"burst\":10001}", "burst"},
        {"rate_limit", "global", NULL, "{\"rpm\":10,\"burst\":1,\"window_s\":60}", "window_s"},
        {"quota", "global", NULL, "{}", "requests"},
        {"quota", "global", NULL, "{\"requests\":-1}", "requests"},
        {"quota", "global", NULL, "{\"requests\":1.5}", "requests"},
        {"quota", "global", NULL, "{\"requests\":5,\"tokens\":-2}", "tokens"},
        {"quota", "global", NULL, "{\"requests\":5,\"max_tokens_per_request\":\"x\"}",
         "max_tokens_per_request"},
        {"quota", "global", NULL, "{\"requests\":5,\"concurrency\":10001}", "concurrency"},
        {"quota", "global", NULL, "{\"requests\":5,\"limit\":1}", "limit"},
        {"resource_access", "global", NULL, "{\"agents\":[\"a\"]}", "effect"},
        {"resource_access", "global", NULL, "{\"agents\":[\"a\"],\"effect\":\"maybe\"}", "effect"},
        {"resource_access", "global", NULL, "{\"effect\":\"allow\"}", "agents"},
        {"resource_access", "global", NULL, "{\"effect\":\"allow\",\"agents\":[]}", "agents"},
        {"resource_access", "global", NULL, "{\"effect\":\"allow\",\"agents\":\"a\"}", "agents"},
        {"resource_access", "global", NULL,
         "{\"effect\":\"deny\",\"models\":[\"gpt-4o\",\"bad,name\"]}", "models[1]"},
        {"resource_access", "global", NULL, "{\"effect\":\"deny\",\"models\":[\"ok\",7]}",
         "models[1]"},
        {"resource_access", "global", NULL, "{\"effect\":\"deny\",\"tools\":[\"x\"]}", "tools"},
        {"feature_flag", "global", NULL, "{\"enabled\":true}", "flag"},
        {"feature_flag", "global", NULL, "{\"flag\":\"Beta\",\"enabled\":true}", "flag"},
        {"feature_flag", "global", NULL, "{\"flag\":\"beta\"}", "enabled"},
        {"feature_flag", "global", NULL, "{\"flag\":\"beta\",\"enabled\":1}", "enabled"},
        {"feature_flag", "global", NULL, "{\"flag\":\"beta\",\"enabled\":true,\"percentage\":101}",
         "percentage"},
        {"feature_flag", "global", NULL, "{\"flag\":\"beta\",\"enabled\":true,\"on\":true}", "on"},
        {"quota", "global", NULL, "[1]", "body"},
        {"quota", "global", NULL, "{\"requests\":", "body"},
        {"quota", "global", NULL, "{\"requests\":1,\"x\":{\"y\":{\"z\":{}}}}", "body"},
        {"limit", "global", NULL, "{\"requests\":1}", "type"},
        {"quota", "team", NULL, "{\"requests\":1}", "scope"},
        {"quota", "global", "monthly", "{\"requests\":1}", "scope_id"},
        {"quota", "plan", NULL, "{\"requests\":1}", "scope_id"},
        {"quota", "plan", "Monthly!", "{\"requests\":1}", "scope_id"},
        {"quota", "user", "42", "{\"requests\":1}", "scope_id"},
        {"quota", "organization", "not-a-uuid", "{\"requests\":1}", "scope_id"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const char *f =
            refused_field(cases[i].type, cases[i].scope, cases[i].scope_id, cases[i].body);
        cr_expect_str_eq(f, cases[i].field, "case %zu (%s %s): named \"%s\"", i, cases[i].type,
                         cases[i].body, f);
    }
}

Test(policy, valid_rules_parse_into_their_fields)
{
    bg_policy_rule_t r;
    bg_policy_verr_t e;
    const char *b = "{\"requests\":100,\"tokens\":5000,\"concurrency\":0}";
    cr_assert_eq(bg_policy_rule_parse("quota", "user", "0190A0B0-0000-7000-8000-000000000001", b,
                                      strlen(b), &r, &e),
                 0);
    cr_assert_eq(r.type, BG_POLICY_QUOTA);
    cr_assert_eq(r.scope, BG_POLICY_USER);
    cr_assert_str_eq(r.scope_id, USER, "uuids are kept lower-case");
    cr_assert_eq(r.requests, 100);
    cr_assert_eq(r.tokens, 5000);
    cr_assert_eq(r.concurrency, 0);
    cr_assert_eq(r.max_tokens_per_request, -1, "absent optional fields are -1");
    bg_policy_rule_dispose(&r);

    b = "{\"agents\":[\"support-bot\",\"*\"],\"models\":[\"openai/gpt-4o:2024\"],"
        "\"effect\":\"deny\"}";
    cr_assert_eq(bg_policy_rule_parse("resource_access", "plan", "trial", b, strlen(b), &r, &e), 0);
    cr_assert(r.deny);
    cr_assert_str_eq(r.agents, ",support-bot,*,");
    cr_assert_str_eq(r.models, ",openai/gpt-4o:2024,");
    bg_policy_rule_dispose(&r);

    b = "{\"flag\":\"new_ui\",\"enabled\":true}";
    cr_assert_eq(bg_policy_rule_parse("feature_flag", "global", NULL, b, strlen(b), &r, &e), 0);
    cr_assert_str_eq(r.flag, "new_ui");
    cr_assert_eq(r.percentage, 100, "no percentage: everyone");
    bg_policy_rule_dispose(&r);
}

Test(policy, defaults_per_plan)
{
    bg_policy_limits_t l;
    bg_policy_defaults("trial", 50, "email_support", &l);
    cr_assert_eq(l.q_limit, 50);
    cr_assert_eq(l.rpm, 10);
    cr_assert_eq(l.burst, 5);
    cr_assert_eq(l.conc, 1);
    cr_assert_eq(l.tok_cap, 4096);
    cr_assert_eq(l.tq_limit, 0);
    cr_assert_str_eq(l.features, ",email_support,");
    static const struct {
        const char *plan;
        int64_t rpm;
    } rpm[] = {{"daily", 20}, {"weekly", 30}, {"monthly", 60}, {"yearly", 120}, {"custom", 20}};
    for (size_t i = 0; i < sizeof(rpm) / sizeof(rpm[0]); i++) {
        bg_policy_defaults(rpm[i].plan, 100, NULL, &l);
        cr_expect_eq(l.rpm, rpm[i].rpm, "%s", rpm[i].plan);
        cr_expect_eq(l.conc, 2, "%s", rpm[i].plan);
    }
    cr_assert_str_eq(l.features, ",", "no features: just the separators");
}

/* The rate limit that wins among rules with the given scopes, priorities and ages. */
Test(policy, precedence_matrix)
{
    static const struct {
        const char *scope_a, *id_a;
        int prio_a;
        int64_t age_a;
        const char *scope_b, *id_b;
        int prio_b;
        int64_t age_b;
        bool a_wins;
    } m[] = {
        /* narrower scope wins, whatever the priority and age */
        {"plan", "monthly", 0, 1, "global", NULL, 100, 2, true},
        {"organization", ORG, 0, 1, "plan", "monthly", 100, 2, true},
        {"user", USER, 0, 1, "organization", ORG, 100, 2, true},
        {"user", USER, -5, 1, "global", NULL, 5, 9, true},
        /* same scope: priority, then newest */
        {"plan", "monthly", 5, 1, "plan", "monthly", 1, 2, true},
        {"global", NULL, 1, 1, "global", NULL, 5, 2, false},
        {"organization", ORG, 3, 2, "organization", ORG, 3, 1, true},
        {"user", USER, 3, 1, "user", USER, 3, 2, false},
        /* rules of other subjects do not apply at all */
        {"user", OTHER_USER, 9, 9, "global", NULL, 0, 1, false},
        {"plan", "daily", 9, 9, "global", NULL, 0, 1, false},
        {"organization", OTHER_ORG, 9, 9, "plan", "monthly", 0, 1, false},
    };
    for (size_t i = 0; i < sizeof(m) / sizeof(m[0]); i++) {
        bg_policy_set_t *set = bg_policy_set_new();
        add(set, "rate_limit", m[i].scope_a, m[i].id_a, "{\"rpm\":111,\"burst\":1}", m[i].prio_a,
            m[i].age_a);
        add(set, "rate_limit", m[i].scope_b, m[i].id_b, "{\"rpm\":222,\"burst\":2}", m[i].prio_b,
            m[i].age_b);
        bg_policy_subject_t s = subject("monthly");
        bg_policy_limits_t l;
        bg_policy_defaults("monthly", 10000, NULL, &l);
        bg_policy_evaluate(set, &s, &l);
        cr_expect_eq(l.rpm, m[i].a_wins ? 111 : 222, "case %zu", i);
        cr_expect_eq(l.burst, m[i].a_wins ? 1 : 2, "case %zu", i);
        bg_policy_set_free(set);
    }
}

Test(policy, no_rule_keeps_defaults_and_quota_fields_merge_by_rank)
{
    bg_policy_set_t *set = bg_policy_set_new();
    bg_policy_subject_t s = subject("monthly");
    bg_policy_limits_t l;
    bg_policy_defaults("monthly", 10000, s.plan_features, &l);
    bg_policy_evaluate(set, &s, &l);
    cr_assert_eq(l.q_limit, 10000);
    cr_assert_eq(l.rpm, 60);

    add(set, "quota", "global", NULL, "{\"requests\":1,\"max_tokens_per_request\":1000}", 0, 1);
    add(set, "quota", "plan", "monthly", "{\"requests\":20000,\"concurrency\":4}", 0, 1);
    add(set, "quota", "user", USER, "{\"requests\":50000,\"tokens\":900000}", 0, 1);
    bg_policy_defaults("monthly", 10000, s.plan_features, &l);
    bg_policy_evaluate(set, &s, &l);
    cr_assert_eq(l.q_limit, 50000, "requests from the user rule");
    cr_assert_eq(l.tq_limit, 900000);
    cr_assert_eq(l.conc, 4, "concurrency from the plan rule the user rule does not override");
    cr_assert_eq(l.tok_cap, 1000, "token cap from the global rule");
    cr_assert_eq(l.rpm, 60, "no rate_limit rule: the plan's default");
    bg_policy_set_free(set);
}

Test(policy, rollout_bucket_is_stable_and_even)
{
    unsigned b = bg_policy_rollout_bucket("beta", USER);
    cr_assert_lt(b, 100u);
    for (int i = 0; i < 10; i++)
        cr_assert_eq(bg_policy_rollout_bucket("beta", USER), b);
    /* the same users in another flag fall elsewhere: rollouts are independent */
    int same = 0, in10 = 0, in30 = 0, in30_not_in50 = 0;
    for (int i = 0; i < 10000; i++) {
        char id[BG_UUID_STR_LEN + 1];
        bg_id_uuid_v7_str(id);
        unsigned x = bg_policy_rollout_bucket("beta", id);
        unsigned y = bg_policy_rollout_bucket("gamma", id);
        cr_assert_eq(bg_policy_rollout_bucket("beta", id), x, "stable for %s", id);
        same += x == y;
        in10 += x < 10;
        in30 += x < 30;
        in30_not_in50 += x < 30 && !(x < 50);
    }
    cr_expect(in10 >= 850 && in10 <= 1150, "10 %%: %d of 10000", in10);
    cr_expect(in30 >= 2800 && in30 <= 3200, "30 %%: %d of 10000", in30);
    cr_expect_eq(in30_not_in50, 0, "raising the percentage only adds users");
    cr_expect_lt(same, 300, "two flags share buckets for about 1 %% of users, got %d", same);
}

Test(policy, feature_flags_at_0_and_100_percent_and_targeting)
{
    bg_policy_subject_t s = subject("monthly");
    bg_policy_set_t *set = bg_policy_set_new();
    add(set, "feature_flag", "global", NULL,
        "{\"flag\":\"beta\",\"enabled\":true,\"percentage\":0}", 0, 1);
    cr_assert_not(bg_policy_flag_enabled(set, &s, "beta"));
    add(set, "feature_flag", "global", NULL,
        "{\"flag\":\"beta\",\"enabled\":true,\"percentage\":100}", 0, 2);
    cr_assert(bg_policy_flag_enabled(set, &s, "beta"), "the newer rule at 100 %% wins");
    /* targeting: the user's organization switches it off for its members only */
    add(set, "feature_flag", "organization", ORG, "{\"flag\":\"beta\",\"enabled\":false}", 0, 1);
    cr_assert_not(bg_policy_flag_enabled(set, &s, "beta"));
    bg_policy_subject_t outsider = {.user_id = OTHER_USER, .plan_id = "monthly"};
    cr_assert(bg_policy_flag_enabled(set, &outsider, "beta"));
    /* plan features count without a rule, and a rule can take one away from one user */
    cr_assert(bg_policy_flag_enabled(set, &s, "api_access"));
    cr_assert_not(bg_policy_flag_enabled(set, &s, "phone_support"));
    add(set, "feature_flag", "user", USER, "{\"flag\":\"api_access\",\"enabled\":false}", 0, 1);
    cr_assert_not(bg_policy_flag_enabled(set, &s, "api_access"));

    bg_policy_limits_t l;
    bg_policy_defaults("monthly", 10000, s.plan_features, &l);
    bg_policy_evaluate(set, &s, &l);
    cr_assert_str_eq(l.features, ",email_support,");
    bg_policy_defaults("monthly", 10000, "email_support,api_access", &l);
    bg_policy_evaluate(set, &outsider, &l);
    cr_assert_str_eq(l.features, ",email_support,api_access,beta,");
    bg_policy_set_free(set);
}

Test(policy, percentage_rollout_through_rules_matches_the_bucket)
{
    bg_policy_set_t *set = bg_policy_set_new();
    add(set, "feature_flag", "plan", "monthly",
        "{\"flag\":\"new_ui\",\"enabled\":true,\"percentage\":25}", 0, 1);
    int on = 0;
    for (int i = 0; i < 10000; i++) {
        char id[BG_UUID_STR_LEN + 1];
        bg_id_uuid_v7_str(id);
        bg_policy_subject_t s = {.user_id = id, .plan_id = "monthly"};
        bool e = bg_policy_flag_enabled(set, &s, "new_ui");
        cr_assert_eq(e, bg_policy_rollout_bucket("new_ui", id) < 25);
        on += e;
        s.plan_id = "daily";
        cr_assert_not(bg_policy_flag_enabled(set, &s, "new_ui"), "targeted at monthly only");
    }
    cr_expect(on >= 2300 && on <= 2700, "25 %%: %d of 10000", on);
    bg_policy_set_free(set);
}

Test(policy, resource_access_deny_and_allow)
{
    bg_policy_subject_t s = subject("trial");
    bg_policy_set_t *set = bg_policy_set_new();
    cr_assert(bg_policy_allows_resource(set, &s, BG_POLICY_MODEL, "gpt-4o", NULL),
              "no rule: allowed");

    /* an allow-list for the trial: only mini, by priority over a deny of everything */
    add(set, "resource_access", "plan", "trial", "{\"models\":[\"*\"],\"effect\":\"deny\"}", 0, 1);
    add(set, "resource_access", "plan", "trial",
        "{\"models\":[\"gpt-4o-mini\"],\"effect\":\"allow\"}", 1, 1);
    cr_assert(bg_policy_allows_resource(set, &s, BG_POLICY_MODEL, "gpt-4o-mini", NULL));
    cr_assert_not(bg_policy_allows_resource(set, &s, BG_POLICY_MODEL, "gpt-4o", NULL));
    cr_assert(bg_policy_allows_resource(set, &s, BG_POLICY_AGENT, "gpt-4o", NULL),
              "model rules say nothing about agents");
    bg_policy_subject_t monthly = subject("monthly");
    cr_assert(bg_policy_allows_resource(set, &monthly, BG_POLICY_MODEL, "gpt-4o", NULL),
              "the trial's rules do not touch other plans");

    /* at one level (scope and priority) a deny beats an allow, even an older deny */
    add(set, "resource_access", "plan", "trial",
        "{\"models\":[\"gpt-4o-mini\"],\"effect\":\"deny\"}", 1, 0);
    cr_assert_not(bg_policy_allows_resource(set, &s, BG_POLICY_MODEL, "gpt-4o-mini", NULL));

    /* a narrower scope wins over a deny of a wider one */
    add(set, "resource_access", "user", USER, "{\"models\":[\"gpt-4o-mini\"],\"effect\":\"allow\"}",
        0, 1);
    cr_assert(bg_policy_allows_resource(set, &s, BG_POLICY_MODEL, "gpt-4o-mini", NULL));
    cr_assert_not(bg_policy_allows_resource(set, &s, BG_POLICY_MODEL, "o1", NULL));

    /* agents by slug or id: a rule naming either matches */
    add(set, "resource_access", "organization", ORG,
        "{\"agents\":[\"0190a0b0-0000-7000-8000-00000000a9e7\"],\"effect\":\"deny\"}", 0, 1);
    cr_assert_not(bg_policy_allows_resource(set, &s, BG_POLICY_AGENT, "support-bot",
                                            "0190a0b0-0000-7000-8000-00000000a9e7"));
    cr_assert(bg_policy_allows_resource(set, &s, BG_POLICY_AGENT, "other-bot",
                                        "0190a0b0-0000-7000-8000-00000000a9e8"));
    bg_policy_set_free(set);
}

Test(policy, rule_cmp_orders_scope_priority_age_id)
{
    bg_policy_rule_t a = {.scope = BG_POLICY_PLAN, .priority = 0, .created_ms = 5};
    bg_policy_rule_t b = a;
    cr_assert_eq(bg_policy_rule_cmp(&a, &b), 0);
    b.created_ms = 6;
    cr_assert_lt(bg_policy_rule_cmp(&a, &b), 0);
    a.priority = 1;
    cr_assert_gt(bg_policy_rule_cmp(&a, &b), 0);
    b.scope = BG_POLICY_USER;
    cr_assert_lt(bg_policy_rule_cmp(&a, &b), 0);
    b = a;
    (void)bg_strlcpy(b.id, "b", sizeof(b.id));
    (void)bg_strlcpy(a.id, "a", sizeof(a.id));
    cr_assert_lt(bg_policy_rule_cmp(&a, &b), 0, "a tie of everything else is broken by id");
}

Test(policy, keys_use_the_users_shard)
{
    char key[BG_REDIS_KEY_MAX];
    cr_assert_eq(bg_policy_key_adm(key, sizeof(key), 16, USER), 0);
    char want[BG_REDIS_KEY_MAX];
    snprintf(want, sizeof(want), "bg:{s%d}:adm:%s", bg_shard_of(USER, 16), USER);
    cr_assert_str_eq(key, want);
    cr_assert_eq(bg_policy_key_quota(key, sizeof(key), 16, USER), 0);
    snprintf(want, sizeof(want), "bg:{s%d}:quota:%s", bg_shard_of(USER, 16), USER);
    cr_assert_str_eq(key, want);
    cr_assert_eq(bg_policy_key_adm(key, 10, 16, USER), BG_ERR_TOO_LARGE);
}

Test(policy, window_arithmetic)
{
    bg_admission_state_t s = {.w_anchor = 1000, .w_len = 100, .w_until = 1350};
    cr_assert_eq(bg_policy_window_start(&s, 1000), 1000);
    cr_assert_eq(bg_policy_window_start(&s, 1099), 1000);
    cr_assert_eq(bg_policy_window_start(&s, 1100), 1100);
    cr_assert_eq(bg_policy_window_end(&s, 1250), 1300);
    cr_assert_eq(bg_policy_window_end(&s, 1320), 1350, "the last window ends with the plan");
}
