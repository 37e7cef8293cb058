/*
 * Agents and prompts on the real migrations: a fresh database serves the ready agent "assistant"
 * with its published prompt; publishing adds versions while the old ones stay as they were (the
 * database refuses to change them); agents that follow the latest version move with it while
 * pinned ones do not; a rollback publishes a copy; agents are created, changed and deleted with an
 * audit row for each change, and refused values name their field.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/agents.h"
#include "bg/err.h"
#include "bg/json.h"
#include "bg/pg.h"
#include "bg/prompt.h"
#include "bgtest.h"

static bgt_pg_t db;
static PGconn *conn;
static const bg_actor_t admin = {
    .kind = "system", .id = NULL, .request_id = "req-test", .ip = NULL};

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

TestSuite(agents, .init = setup, .fini = teardown);

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

static void q_is(const char *want, const char *sql, int n, const char *const *params)
{
    char *v = q(sql, n, params);
    cr_assert_str_eq(v, want, "%s", sql);
    free(v);
}

static bg_prompt_t *def(const char *json)
{
    bg_prompt_t *p;
    bg_prompt_err_t e;
    int rc = bg_prompt_parse(json, strlen(json), &p, &e);
    cr_assert_eq(rc, 0, "%s: %s %s", json, e.field, e.reason);
    return p;
}

/* The system template of a loaded version. */
static char *system_of(const bg_prompt_version_t *v)
{
    bg_prompt_t *p = def(v->definition);
    char *s = strdup(bg_prompt_system(p));
    bg_prompt_free(p);
    return s;
}

static char *create_prompt(const char *system)
{
    char json[512];
    snprintf(json, sizeof(json), "{\"system\":\"%s\"}", system);
    bg_prompt_t *p = def(json);
    char id[BG_AGENT_ID_SIZE];
    cr_assert_eq(bg_prompts_create(conn, NULL, "test prompt", "for tests", p, &admin, id), 0);
    bg_prompt_free(p);
    return strdup(id);
}

static int publish(const char *prompt_id, const char *system)
{
    char json[512];
    snprintf(json, sizeof(json), "{\"system\":\"%s\"}", system);
    bg_prompt_t *p = def(json);
    int version = 0;
    int rc = bg_prompts_publish(conn, prompt_id, p, NULL, "{\"temperature\":0.2}", "a change",
                                &admin, &version);
    cr_assert_eq(rc, 0, "publish: %s", bg_strerror(rc));
    bg_prompt_free(p);
    return version;
}

static int audit_count(const char *action, const char *target_id)
{
    const char *p[] = {action, target_id};
    char *n = q("SELECT count(*) FROM audit_log WHERE action = $1 AND target_id = $2", 2, p);
    int v = (int)strtol(n, NULL, 10);
    free(n);
    return v;
}

Test(agents, fresh_database_has_the_assistant)
{
    bg_agent_t a;
    cr_assert_eq(bg_agents_get_by_slug(conn, NULL, "assistant", &a), 0);
    cr_assert_str_eq(a.name, "Assistant");
    cr_assert_str_eq(a.organization_id, "");
    cr_assert_str_eq(a.model, "", "the deployment's BG_LLM_MODEL");
    cr_assert_str_eq(a.visibility, "public");
    cr_assert_str_eq(a.status, "active");
    cr_assert_float_eq(a.temperature, 0.7, 1e-9);
    cr_assert_eq(a.max_tokens, 1024);
    cr_assert_eq(a.memory.kind, BG_MEMORY_LAST_TURNS);
    cr_assert_eq(a.memory.limit, 20);
    cr_assert_eq(a.channels, BG_AGENT_CHANNEL_ALL, "web, Telegram and the API (0008)");
    cr_assert_eq(a.cache_enabled, false);
    cr_assert_eq(a.prompt_version, 0, "follows the latest published version");

    /* a new user (no organization) sees it at once */
    bg_agent_list_t list;
    cr_assert_eq(bg_agents_list(conn, NULL, false, &list), 0);
    cr_assert_eq(list.count, 1);
    cr_assert_str_eq(list.items[0].slug, "assistant");
    bg_agent_list_dispose(&list);

    /* its published prompt renders with the user's name and locale */
    bg_prompt_version_t v;
    cr_assert_eq(bg_agents_resolve_prompt(conn, a.id, &v), 0);
    cr_assert_eq(v.version, 1);
    bg_prompt_t *p = def(v.definition);
    bg_buf_t out;
    bg_buf_init(&out, 1 << 20);
    bg_prompt_builtins_t b = {
        .user_name = "Ada", .locale = "es", .channel = "web", .date = "2024-05-01"};
    cr_assert_eq(bg_prompt_render(p, NULL, &b, NULL, 0, "hola", 4, &out, NULL), 0);
    cr_assert_not_null(strstr(out.base, "Ada"), "%s", out.base);
    cr_assert_not_null(strstr(out.base, "locale es"), "%s", out.base);
    cr_assert_not_null(strstr(out.base, "{\"role\":\"user\",\"content\":\"hola\"}"), "%s",
                       out.base);
    bg_buf_dispose(&out);
    bg_prompt_free(p);
    bg_prompt_version_dispose(&v);

    /* the seed is idempotent: running it again changes nothing */
    char sql[] = "INSERT INTO agents (id, slug, name) VALUES "
                 "('00000000-0000-4000-8000-00000000a550', 'assistant', 'Again') "
                 "ON CONFLICT DO NOTHING";
    cr_assert_eq(bg_pg_run(conn, sql, 0, NULL), 0);
    q_is("1", "SELECT count(*) FROM agents WHERE slug = 'assistant'", 0, NULL);
}

Test(agents, publish_increments_and_old_versions_stay)
{
    char *pid = create_prompt("You are v1.");
    cr_assert_eq(audit_count("prompt.create", pid), 1);
    cr_assert_eq(publish(pid, "You are v2."), 2);
    cr_assert_eq(publish(pid, "You are v3."), 3);
    cr_assert_eq(audit_count("prompt.publish", pid), 2);

    int versions[8];
    size_t n;
    cr_assert_eq(bg_prompts_list_versions(conn, pid, versions, 8, &n), 0);
    cr_assert_eq(n, 3);
    cr_assert_eq(versions[0], 3);
    cr_assert_eq(versions[2], 1);

    bg_prompt_version_t v;
    cr_assert_eq(bg_prompts_get_version(conn, pid, 0, &v), 0);
    cr_assert_eq(v.version, 3, "the newest is current");
    cr_assert_str_eq(v.note, "a change");
    bg_prompt_version_dispose(&v);
    cr_assert_eq(bg_prompts_get_version(conn, pid, 1, &v), 0);
    char *s = system_of(&v);
    cr_assert_str_eq(s, "You are v1.");
    free(s);
    bg_prompt_version_dispose(&v);
    cr_assert_eq(bg_prompts_get_version(conn, pid, 9, &v), BG_ERR_NOT_FOUND);

    /* the database refuses to change or remove a version */
    const char *p[] = {pid};
    cr_assert_eq(bg_pg_run(conn,
                           "UPDATE prompt_versions SET definition = '{\"system\":\"evil\"}' "
                           "WHERE prompt_id = $1 AND version = 1",
                           1, p),
                 BG_ERR_INVALID);
    cr_assert_eq(bg_pg_run(conn, "DELETE FROM prompt_versions WHERE prompt_id = $1", 1, p),
                 BG_ERR_INVALID);
    q_is("You are v1.",
         "SELECT definition ->> 'system' FROM prompt_versions WHERE prompt_id = $1 AND version = 1",
         1, p);
    q_is("You are v1.", "SELECT template FROM prompt_versions WHERE prompt_id = $1 AND version = 1",
         1, p);

    /* an unknown prompt cannot be published to */
    bg_prompt_t *d = def("{\"system\":\"x\"}");
    int version = -1;
    cr_assert_eq(bg_prompts_publish(conn, "00000000-0000-4000-8000-000000000000", d, NULL, NULL,
                                    NULL, &admin, &version),
                 BG_ERR_NOT_FOUND);
    cr_assert_eq(version, 0);
    bg_prompt_free(d);
    free(pid);
}

Test(agents, follow_latest_versus_pinned)
{
    char *pid = create_prompt("v1");
    bg_agent_spec_t s;
    bg_agent_spec_init(&s);
    s.slug = "follower";
    s.name = "Follower";
    s.prompt_id = pid;
    bg_agent_t follower, pinned;
    bg_prompt_err_t e;
    cr_assert_eq(bg_agents_create(conn, &s, &admin, &follower, &e), 0, "%s %s", e.field, e.reason);
    s.slug = "pinned";
    s.name = "Pinned";
    s.prompt_version = 1;
    cr_assert_eq(bg_agents_create(conn, &s, &admin, &pinned, &e), 0, "%s %s", e.field, e.reason);
    cr_assert_eq(pinned.prompt_version, 1);

    cr_assert_eq(publish(pid, "v2"), 2);
    bg_prompt_version_t v;
    cr_assert_eq(bg_agents_resolve_prompt(conn, follower.id, &v), 0);
    cr_assert_eq(v.version, 2);
    char *sys = system_of(&v);
    cr_assert_str_eq(sys, "v2");
    free(sys);
    cr_assert_str_eq(v.params, "{\"temperature\": 0.2}");
    bg_prompt_version_dispose(&v);
    cr_assert_eq(bg_agents_resolve_prompt(conn, pinned.id, &v), 0);
    cr_assert_eq(v.version, 1, "a pinned agent stays on its version");
    bg_prompt_version_dispose(&v);

    /* pinning a version that does not exist is refused, naming the field */
    bg_agent_spec_t u;
    bg_agent_spec_init(&u);
    u.prompt_version = 7;
    bg_agent_t after;
    cr_assert_eq(bg_agents_update(conn, pinned.id, &u, &admin, &after, &e), BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "prompt_version");
    /* unpinning makes it follow */
    u.prompt_version = 0;
    cr_assert_eq(bg_agents_update(conn, pinned.id, &u, &admin, &after, &e), 0);
    cr_assert_eq(after.prompt_version, 0);
    cr_assert_eq(bg_agents_resolve_prompt(conn, pinned.id, &v), 0);
    cr_assert_eq(v.version, 2);
    bg_prompt_version_dispose(&v);

    /* an agent without a prompt has nothing to resolve */
    bg_agent_spec_t bare;
    bg_agent_spec_init(&bare);
    bare.slug = "bare";
    bare.name = "Bare";
    bg_agent_t b;
    cr_assert_eq(bg_agents_create(conn, &bare, &admin, &b, &e), 0);
    cr_assert_eq(bg_agents_resolve_prompt(conn, b.id, &v), BG_ERR_NOT_FOUND);
    free(pid);
}

Test(agents, rollback_publishes_a_copy)
{
    char *pid = create_prompt("first");
    cr_assert_eq(publish(pid, "second"), 2);
    int version = 0;
    cr_assert_eq(bg_prompts_rollback(conn, pid, 1, &admin, &version), 0);
    cr_assert_eq(version, 3, "a rollback is a new version, history only grows");
    bg_prompt_version_t v;
    cr_assert_eq(bg_prompts_get_version(conn, pid, 0, &v), 0);
    cr_assert_eq(v.version, 3);
    char *s = system_of(&v);
    cr_assert_str_eq(s, "first");
    free(s);
    cr_assert_str_eq(v.note, "rollback to v1");
    bg_prompt_version_dispose(&v);
    /* version 2 is still there, untouched */
    cr_assert_eq(bg_prompts_get_version(conn, pid, 2, &v), 0);
    s = system_of(&v);
    cr_assert_str_eq(s, "second");
    free(s);
    bg_prompt_version_dispose(&v);
    cr_assert_eq(audit_count("prompt.rollback", pid), 1);
    const char *p[] = {pid};
    q_is("{\"from\": 1, \"version\": 3}",
         "SELECT details::text FROM audit_log WHERE action = 'prompt.rollback' AND target_id = $1",
         1, p);

    cr_assert_eq(bg_prompts_rollback(conn, pid, 9, &admin, &version), BG_ERR_NOT_FOUND);
    cr_assert_eq(version, 0);
    q_is("3", "SELECT current_version FROM prompts WHERE id = $1", 1, p);
    free(pid);
}

Test(agents, legacy_versions_read_as_definitions)
{
    /* a version written before 0006 (template and defaults only) still renders */
    char *pid = q("INSERT INTO prompts (name) VALUES ('old') RETURNING id", 0, NULL);
    const char *p[] = {pid};
    cr_assert_eq(bg_pg_run(conn,
                           "INSERT INTO prompt_versions (prompt_id, version, template, variables) "
                           "VALUES ($1, 1, 'Speak like a {{style}}.', '{\"style\": \"pirate\"}')",
                           1, p),
                 0);
    cr_assert_eq(bg_pg_run(conn, "UPDATE prompts SET current_version = 1 WHERE id = $1", 1, p), 0);
    bg_prompt_version_t v;
    cr_assert_eq(bg_prompts_get_version(conn, pid, 0, &v), 0);
    bg_prompt_t *d = def(v.definition);
    bg_buf_t out;
    bg_buf_init(&out, 4096);
    cr_assert_eq(bg_prompt_render(d, NULL, NULL, NULL, 0, "ahoy", 4, &out, NULL), 0);
    cr_assert_not_null(strstr(out.base, "Speak like a pirate."), "%s", out.base);
    bg_buf_dispose(&out);
    bg_prompt_free(d);
    bg_prompt_version_dispose(&v);
    free(pid);
}

Test(agents, crud_with_audit)
{
    char *org = q("WITH u AS (INSERT INTO users (email) VALUES ('o@example.com') RETURNING id) "
                  "INSERT INTO organizations (name, owner_id) SELECT 'Org', id FROM u RETURNING id",
                  0, NULL);
    bg_memory_policy_t mem = {BG_MEMORY_TOKEN_BUDGET, 3000};
    bg_agent_spec_t s;
    bg_agent_spec_init(&s);
    s.organization_id = org;
    s.slug = "helper";
    s.name = "Helper";
    s.description = "Helps.";
    s.model = "gpt-test";
    s.provider = "openai";
    s.temperature = 0.3;
    s.max_tokens = 512;
    s.memory = &mem;
    s.cache_enabled = 1;
    s.cache_ttl_s = 600;
    s.channels = BG_AGENT_CHANNEL_WEB | BG_AGENT_CHANNEL_TELEGRAM;
    s.visibility = "organization";
    bg_agent_t a;
    bg_prompt_err_t e;
    cr_assert_eq(bg_agents_create(conn, &s, &admin, &a, &e), 0, "%s %s", e.field, e.reason);
    cr_assert_str_eq(a.organization_id, org);
    cr_assert_str_eq(a.model, "gpt-test");
    cr_assert_str_eq(a.provider, "openai");
    cr_assert_float_eq(a.temperature, 0.3, 1e-9);
    cr_assert_eq(a.max_tokens, 512);
    cr_assert_eq(a.memory.kind, BG_MEMORY_TOKEN_BUDGET);
    cr_assert_eq(a.memory.limit, 3000);
    cr_assert_eq(a.cache_enabled, true);
    cr_assert_eq(a.cache_ttl_s, 600);
    cr_assert_eq(a.channels, BG_AGENT_CHANNEL_WEB | BG_AGENT_CHANNEL_TELEGRAM);
    cr_assert_eq(audit_count("agent.create", a.id), 1);
    const char *p[] = {a.id};
    q_is("req-test", "SELECT request_id FROM audit_log WHERE target_id = $1", 1, p);

    /* the same slug in the same organization is taken; in another one it is free */
    bg_agent_t dup;
    cr_assert_eq(bg_agents_create(conn, &s, &admin, &dup, &e), BG_ERR_CONFLICT);
    cr_assert_str_eq(e.field, "slug");
    s.organization_id = NULL;
    s.visibility = NULL;
    cr_assert_eq(bg_agents_create(conn, &s, &admin, &dup, &e), 0);

    /* organization agents are listed for members only */
    bg_agent_list_t list;
    cr_assert_eq(bg_agents_list(conn, NULL, false, &list), 0);
    for (size_t i = 0; i < list.count; i++)
        cr_assert_str_neq(list.items[i].id, a.id);
    bg_agent_list_dispose(&list);
    char *owner = q("SELECT owner_id FROM organizations WHERE id = $1", 1, (const char *[]){org});
    const char *m[] = {org, owner};
    cr_assert_eq(bg_pg_run(conn,
                           "INSERT INTO memberships (organization_id, user_id, role) "
                           "VALUES ($1, $2, 'owner')",
                           2, m),
                 0);
    cr_assert_eq(bg_agents_list(conn, owner, false, &list), 0);
    bool seen = false;
    for (size_t i = 0; i < list.count; i++)
        seen = seen || strcmp(list.items[i].id, a.id) == 0;
    cr_assert(seen, "a member sees the organization's agent");
    bg_agent_list_dispose(&list);

    /* update: only the fields given change, and the audit names them */
    bg_agent_spec_t u;
    bg_agent_spec_init(&u);
    u.name = "Helper Two";
    u.temperature = 1.1;
    bg_agent_t b;
    cr_assert_eq(bg_agents_update(conn, a.id, &u, &admin, &b, &e), 0, "%s %s", e.field, e.reason);
    cr_assert_str_eq(b.name, "Helper Two");
    cr_assert_float_eq(b.temperature, 1.1, 1e-9);
    cr_assert_eq(b.max_tokens, 512, "params not given are kept");
    cr_assert_str_eq(b.description, "Helps.");
    cr_assert_eq(b.memory.limit, 3000);
    q_is("{\"fields\": [\"name\", \"temperature\"]}",
         "SELECT details::text FROM audit_log WHERE action = 'agent.update' AND target_id = $1", 1,
         p);

    /* bad values are refused before any write, naming the field */
    bg_agent_spec_init(&u);
    u.temperature = 2.5;
    cr_assert_eq(bg_agents_update(conn, a.id, &u, &admin, &b, &e), BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "temperature");
    bg_agent_spec_init(&u);
    u.slug = "Not A Slug";
    cr_assert_eq(bg_agents_update(conn, a.id, &u, &admin, &b, &e), BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "slug");
    bg_memory_policy_t badmem = {BG_MEMORY_LAST_TURNS, 5000};
    bg_agent_spec_init(&u);
    u.memory = &badmem;
    cr_assert_eq(bg_agents_update(conn, a.id, &u, &admin, &b, &e), BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "memory.last_turns");
    bg_agent_spec_init(&u);
    u.prompt_id = "00000000-0000-4000-8000-000000000000";
    cr_assert_eq(bg_agents_update(conn, a.id, &u, &admin, &b, &e), BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "prompt_id");
    cr_assert_eq(audit_count("agent.update", a.id), 1, "refusals are not audited");

    /* a spec that sets nothing writes nothing */
    bg_agent_spec_init(&u);
    cr_assert_eq(bg_agents_update(conn, a.id, &u, &admin, &b, &e), 0);
    cr_assert_eq(audit_count("agent.update", a.id), 1);

    /* delete is soft: gone for the API, kept for history, slug free again */
    cr_assert_eq(bg_agents_delete(conn, a.id, &admin), 0);
    cr_assert_eq(bg_agents_get(conn, a.id, &b), BG_ERR_NOT_FOUND);
    cr_assert_eq(bg_agents_delete(conn, a.id, &admin), BG_ERR_NOT_FOUND);
    cr_assert_eq(bg_agents_update(conn, a.id, &u, &admin, &b, &e), BG_ERR_NOT_FOUND);
    q_is("1", "SELECT count(*) FROM agents WHERE id = $1 AND deleted_at IS NOT NULL", 1, p);
    cr_assert_eq(audit_count("agent.delete", a.id), 1);
    s.organization_id = org;
    cr_assert_eq(bg_agents_create(conn, &s, &admin, &dup, &e), 0, "the slug is free again");

    cr_assert_eq(bg_agents_get(conn, "not-a-uuid", &b), BG_ERR_NOT_FOUND);
    free(owner);
    free(org);
}

Test(agents, schema_refuses_bad_memory_and_channels)
{
    cr_assert_eq(bg_pg_run(conn,
                           "INSERT INTO agents (slug, name, memory) "
                           "VALUES ('m1', 'M', '{\"last_turns\": 5, \"token_budget\": 9}')",
                           0, NULL),
                 BG_ERR_INVALID);
    cr_assert_eq(bg_pg_run(conn,
                           "INSERT INTO agents (slug, name, memory) "
                           "VALUES ('m2', 'M', '{\"last_turns\": \"many\"}')",
                           0, NULL),
                 BG_ERR_INVALID);
    cr_assert_eq(bg_pg_run(conn,
                           "INSERT INTO agents (slug, name, channels) VALUES ('m3', 'M', '{fax}')",
                           0, NULL),
                 BG_ERR_INVALID);
    cr_assert_eq(bg_pg_run(conn,
                           "INSERT INTO agents (slug, name, memory) "
                           "VALUES ('m4', 'M', '{\"token_budget\": 2000}')",
                           0, NULL),
                 0);
}
