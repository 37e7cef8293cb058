/*
 * Which agents a user may use, on the real schema and policy rules: what bg_agents_list_usable
 * lists and bg_agents_get_usable loads for the web chat, the OpenAI-compatible API and Telegram.
 * Visibility (public, the user's organizations, the creator's private ones) hides an agent as if
 * it did not exist; a channel the agent is not open to, or a resource_access rule about the agent
 * (by slug or id) or its model, refuses it. Rules follow the engine's precedence: a user's allow
 * beats a global deny, a plan rule reaches only users whose subscription of that plan is live.
 */
#include <criterion/criterion.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/agents.h"
#include "bg/err.h"
#include "bg/pg.h"
#include "bg/timeutil.h"
#include "bgtest.h"

#define ASSISTANT_ID "00000000-0000-4000-8000-00000000a550"
#define DAY INT64_C(86400000)

static bgt_pg_t db;
static PGconn *conn;
static const bg_actor_t sys = {.kind = "system", .id = NULL, .request_id = "req-test", .ip = NULL};

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

TestSuite(agents_access, .init = setup, .fini = teardown);

/* Runs sql; asserts success; returns the first field of the first row (new string, "" if none). */
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

/* Makes a user with a personal organization (owner) and a billing account; returns the id. */
static char *make_user(const char *email)
{
    const char *p[] = {email};
    return q("WITH u AS (INSERT INTO users (email) VALUES ($1) RETURNING id), "
             "o AS (INSERT INTO organizations (name, personal, owner_id) "
             "  SELECT 'ws', true, id FROM u RETURNING id, owner_id), "
             "m AS (INSERT INTO memberships (organization_id, user_id, role) "
             "  SELECT id, owner_id, 'owner' FROM o), "
             "b AS (INSERT INTO billing_accounts (user_id) SELECT id FROM u) "
             "SELECT id FROM u",
             1, p);
}

static char *org_of(const char *user)
{
    const char *p[] = {user};
    return q("SELECT organization_id FROM memberships WHERE user_id = $1", 1, p);
}

/* Gives user a trial subscription of plan "trial" that is live now. */
static void make_trial(const char *user)
{
    int64_t now = bg_timeutil_wall_ms();
    char s[24], e[24];
    snprintf(s, sizeof(s), "%" PRId64, now - DAY);
    snprintf(e, sizeof(e), "%" PRId64, now + 10 * DAY);
    const char *p[] = {user, s, e};
    free(q("INSERT INTO subscriptions (billing_account_id, user_id, plan_id, status, "
           "current_period_start, current_period_end, trial_ends_at) "
           "SELECT b.id, $1, 'trial', 'trialing', "
           "'epoch'::timestamptz + $2::bigint * interval '1 ms', "
           "'epoch'::timestamptz + $3::bigint * interval '1 ms', "
           "'epoch'::timestamptz + $3::bigint * interval '1 ms' "
           "FROM billing_accounts b WHERE b.user_id = $1 RETURNING id",
           3, p));
}

static void rule(const char *scope, const char *scope_id, const char *body, int priority)
{
    char prio[16];
    snprintf(prio, sizeof(prio), "%d", priority);
    const char *p[] = {scope, scope_id, body, prio};
    free(q("INSERT INTO policy_rules (type, scope, scope_id, body, priority) "
           "VALUES ('resource_access', $1, $2, $3::jsonb, $4::int) RETURNING id",
           4, p));
}

/* Creates an active agent; org NULL makes a system agent. Returns it. */
static bg_agent_t make_agent(const char *org, const char *slug, const char *model,
                             const char *visibility, unsigned channels)
{
    bg_agent_spec_t s;
    bg_agent_spec_init(&s);
    s.organization_id = org;
    s.slug = slug;
    s.name = slug;
    s.model = model;
    s.visibility = visibility;
    s.channels = channels;
    bg_agent_t a;
    bg_prompt_err_t e;
    int rc = bg_agents_create(conn, &s, &sys, &a, &e);
    cr_assert_eq(rc, 0, "create %s: %s (%s %s)", slug, bg_strerror(rc), e.field,
                 e.reason != NULL ? e.reason : "");
    return a;
}

/* Returns the slugs of the agents user may use on channel, as "a,b," (caller frees). */
static char *usable(const char *user, unsigned channel)
{
    bg_agent_list_t list;
    int rc = bg_agents_list_usable(conn, user, channel, &list);
    cr_assert_eq(rc, 0, "list_usable: %s", bg_strerror(rc));
    size_t cap = 16 + list.count * BG_AGENT_SLUG_SIZE, len = 0;
    char *out = calloc(1, cap);
    for (size_t i = 0; i < list.count; i++)
        len += (size_t)snprintf(out + len, cap - len, "%s,", list.items[i].slug);
    bg_agent_list_dispose(&list);
    return out;
}

static void usable_is(const char *want, const char *user, unsigned channel)
{
    char *got = usable(user, channel);
    cr_assert_str_eq(got, want, "usable on channel %u", channel);
    free(got);
}

static int get(const char *user, const char *id_or_slug, unsigned channel, bg_agent_t *out)
{
    bg_agent_t tmp;
    return bg_agents_get_usable(conn, user, id_or_slug, channel, out != NULL ? out : &tmp);
}

Test(agents_access, new_user_may_use_the_assistant_and_agents_open_to_the_channel)
{
    char *u = make_user("new@example.com");
    usable_is("assistant,", u, BG_AGENT_CHANNEL_WEB);
    usable_is("assistant,", u, BG_AGENT_CHANNEL_API);
    usable_is("assistant,", NULL, BG_AGENT_CHANNEL_WEB);
    make_agent(NULL, "webby", NULL, "public", BG_AGENT_CHANNEL_WEB);
    usable_is("assistant,webby,", u, BG_AGENT_CHANNEL_WEB);
    usable_is("assistant,webby,", u, 0);
    usable_is("assistant,", u, BG_AGENT_CHANNEL_API);
    usable_is("assistant,", u, BG_AGENT_CHANNEL_TELEGRAM);

    bg_agent_t a;
    cr_assert_eq(get(u, "assistant", BG_AGENT_CHANNEL_WEB, &a), 0);
    cr_assert_str_eq(a.id, ASSISTANT_ID);
    cr_assert_str_eq(a.name, "Assistant");
    cr_assert_eq(get(u, ASSISTANT_ID, BG_AGENT_CHANNEL_WEB, &a), 0);
    cr_assert_str_eq(a.slug, "assistant");
    cr_assert_eq(get(u, "webby", BG_AGENT_CHANNEL_API, NULL), BG_ERR_DENIED,
                 "open to the web only");
    cr_assert_eq(get(u, "webby", BG_AGENT_CHANNEL_WEB, NULL), 0);
    cr_assert_eq(get(u, "nobody", BG_AGENT_CHANNEL_WEB, NULL), BG_ERR_NOT_FOUND);
    cr_assert_eq(get(u, "00000000-0000-4000-8000-000000000000", 0, NULL), BG_ERR_NOT_FOUND);
    cr_assert_eq(get(u, "", 0, NULL), BG_ERR_NOT_FOUND);
    free(u);
}

Test(agents_access, organization_agents_are_for_members_only)
{
    char *alice = make_user("alice@example.com");
    char *bob = make_user("bob@example.com");
    char *org = org_of(alice);
    bg_agent_t team = make_agent(org, "team-bot", NULL, "organization",
                                 BG_AGENT_CHANNEL_WEB | BG_AGENT_CHANNEL_API);
    make_agent(org, "secret", NULL, "private", BG_AGENT_CHANNEL_WEB);

    usable_is("assistant,team-bot,", alice, BG_AGENT_CHANNEL_WEB);
    usable_is("assistant,team-bot,", alice, BG_AGENT_CHANNEL_API);
    usable_is("assistant,", bob, BG_AGENT_CHANNEL_WEB);

    cr_assert_eq(get(alice, "team-bot", BG_AGENT_CHANNEL_API, NULL), 0);
    cr_assert_eq(get(bob, "team-bot", BG_AGENT_CHANNEL_WEB, NULL), BG_ERR_NOT_FOUND,
                 "another organization's slug names nothing for bob");
    cr_assert_eq(get(bob, team.id, BG_AGENT_CHANNEL_WEB, NULL), BG_ERR_NOT_FOUND,
                 "nor does its id");
    cr_assert_eq(get(alice, "secret", BG_AGENT_CHANNEL_WEB, NULL), BG_ERR_NOT_FOUND,
                 "a private agent is its creator's (here: nobody's)");

    /* an organization's agent of the same slug as a system agent is the one its members get */
    bg_agent_t mine =
        make_agent(org, "assistant", "org-model", "organization", BG_AGENT_CHANNEL_WEB);
    bg_agent_t a;
    cr_assert_eq(get(alice, "assistant", BG_AGENT_CHANNEL_WEB, &a), 0);
    cr_assert_str_eq(a.id, mine.id);
    cr_assert_eq(get(bob, "assistant", BG_AGENT_CHANNEL_WEB, &a), 0);
    cr_assert_str_eq(a.id, ASSISTANT_ID);

    /* disabled agents are gone from the user's point of view */
    bg_agent_spec_t s;
    bg_agent_spec_init(&s);
    s.status = "disabled";
    bg_agent_t upd;
    cr_assert_eq(bg_agents_update(conn, team.id, &s, &sys, &upd, NULL), 0);
    cr_assert_eq(get(alice, team.id, 0, NULL), BG_ERR_NOT_FOUND);
    usable_is("assistant,assistant,", alice, BG_AGENT_CHANNEL_WEB);
    free(alice);
    free(bob);
    free(org);
}

Test(agents_access, resource_rules_on_agents_by_slug_or_id)
{
    char *alice = make_user("alice@example.com");
    char *bob = make_user("bob@example.com");
    char *org = org_of(alice);
    bg_agent_t helper = make_agent(NULL, "helper", NULL, "public", BG_AGENT_CHANNEL_WEB);
    usable_is("assistant,helper,", bob, BG_AGENT_CHANNEL_WEB);

    /* a global deny by slug hides the assistant from everyone and refuses it */
    rule("global", NULL, "{\"agents\":[\"assistant\"],\"effect\":\"deny\"}", 0);
    usable_is("helper,", bob, BG_AGENT_CHANNEL_WEB);
    usable_is("helper,", NULL, BG_AGENT_CHANNEL_WEB);
    cr_assert_eq(get(bob, "assistant", BG_AGENT_CHANNEL_WEB, NULL), BG_ERR_DENIED);
    cr_assert_eq(get(bob, ASSISTANT_ID, BG_AGENT_CHANNEL_WEB, NULL), BG_ERR_DENIED);

    /* an organization's allow is narrower than the global deny: its members get it back */
    char body[256];
    rule("organization", org, "{\"agents\":[\"assistant\"],\"effect\":\"allow\"}", 0);
    usable_is("assistant,helper,", alice, BG_AGENT_CHANNEL_WEB);
    cr_assert_eq(get(alice, "assistant", BG_AGENT_CHANNEL_WEB, NULL), 0);
    usable_is("helper,", bob, BG_AGENT_CHANNEL_WEB);

    /* a rule naming the id (not the slug) reaches the agent too; a user rule beats the org's */
    snprintf(body, sizeof(body), "{\"agents\":[\"%s\"],\"effect\":\"deny\"}", helper.id);
    rule("user", bob, body, 0);
    usable_is("", bob, BG_AGENT_CHANNEL_WEB);
    cr_assert_eq(get(bob, "helper", BG_AGENT_CHANNEL_WEB, NULL), BG_ERR_DENIED);
    usable_is("assistant,helper,", alice, BG_AGENT_CHANNEL_WEB);
    rule("user", alice, "{\"agents\":[\"*\"],\"effect\":\"deny\"}", 0);
    usable_is("", alice, BG_AGENT_CHANNEL_WEB);
    free(alice);
    free(bob);
    free(org);
}

Test(agents_access, model_rules_and_plan_scope)
{
    char *trial = make_user("trial@example.com");
    char *free_user = make_user("free@example.com");
    make_trial(trial);
    make_agent(NULL, "big", "gpt-big", "public", BG_AGENT_CHANNEL_WEB);
    make_agent(NULL, "small", "gpt-small", "public", BG_AGENT_CHANNEL_WEB);
    usable_is("assistant,big,small,", trial, BG_AGENT_CHANNEL_WEB);

    /* "trial may only use gpt-small": allow it above a deny of every model, scoped to the plan */
    rule("plan", "trial", "{\"models\":[\"gpt-small\"],\"effect\":\"allow\"}", 1);
    rule("plan", "trial", "{\"models\":[\"*\"],\"effect\":\"deny\"}", 0);
    usable_is("small,", trial, BG_AGENT_CHANNEL_WEB);
    cr_assert_eq(get(trial, "big", BG_AGENT_CHANNEL_WEB, NULL), BG_ERR_DENIED);
    cr_assert_eq(get(trial, "assistant", BG_AGENT_CHANNEL_WEB, NULL), BG_ERR_DENIED,
                 "the deployment's default model is reached by \"*\"");
    cr_assert_eq(get(trial, "small", BG_AGENT_CHANNEL_WEB, NULL), 0);
    /* a user without a live trial subscription is not on that plan */
    usable_is("assistant,big,small,", free_user, BG_AGENT_CHANNEL_WEB);

    /* a rule naming a model does not reach agents on the default model */
    rule("global", NULL, "{\"models\":[\"gpt-big\"],\"effect\":\"deny\"}", 0);
    usable_is("assistant,small,", free_user, BG_AGENT_CHANNEL_WEB);
    cr_assert_eq(get(free_user, "big", BG_AGENT_CHANNEL_WEB, NULL), BG_ERR_DENIED);
    free(trial);
    free(free_user);
}

Test(agents_access, managers_are_platform_admins_and_team_organization_admins)
{
    char *plain = make_user("plain@example.com");
    char *owner = make_user("owner@example.com");
    char *admin = make_user("admin@example.com");
    const char *pa[] = {admin};
    free(q("UPDATE users SET role = 'admin' WHERE id = $1 RETURNING id", 1, pa));
    const char *po[] = {owner};
    char *team = q("WITH o AS (INSERT INTO organizations (name, owner_id) VALUES ('Team', $1) "
                   "RETURNING id, owner_id), m AS (INSERT INTO memberships (organization_id, "
                   "user_id, role) SELECT id, owner_id, 'owner' FROM o) SELECT id FROM o",
                   1, po);
    char *personal = org_of(plain);

    bg_agent_manager_t m;
    cr_assert_eq(bg_agents_manager_load(conn, plain, &m), 0);
    cr_assert(!bg_agents_manager_is_any(&m), "a personal organization makes nobody a manager");
    cr_assert(!bg_agents_manager_may(&m, personal));
    bg_agents_manager_dispose(&m);

    cr_assert_eq(bg_agents_manager_load(conn, owner, &m), 0);
    cr_assert(bg_agents_manager_is_any(&m));
    cr_assert(!m.platform_admin);
    cr_assert(bg_agents_manager_may(&m, team));
    cr_assert(!bg_agents_manager_may(&m, personal), "another organization");
    cr_assert(!bg_agents_manager_may(&m, NULL), "system agents are the platform's");
    bg_agents_manager_dispose(&m);

    cr_assert_eq(bg_agents_manager_load(conn, admin, &m), 0);
    cr_assert(m.platform_admin);
    cr_assert(bg_agents_manager_may(&m, NULL));
    cr_assert(bg_agents_manager_may(&m, team));
    bg_agents_manager_dispose(&m);
    free(plain);
    free(owner);
    free(admin);
    free(team);
    free(personal);
}
