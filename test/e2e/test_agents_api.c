/*
 * /admin/agents, /admin/prompts and what they change for users, end to end on the real bg-edge, a
 * private Redis and a migrated database: a platform admin creates a prompt with typed variables,
 * publishes a second version, creates an agent pinned to version 1 and one following the latest,
 * previews both (a missing or unknown variable is a 422 naming it), rolls back, changes and
 * deletes, with audit rows read back through libpq. Organization admins manage their own
 * organization's agents and nobody else's (404); a user who manages nothing gets 403. A
 * resource_access rule made through POST /admin/policies hides an agent from GET /agents and
 * refuses a conversation with it (403 agent_not_allowed), for the users it applies to only.
 */
#include <criterion/criterion.h>
#include <libpq-fe.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bg/common.h"
#include "bg/json.h"
#include "bgtest.h"

#define PASSWORD "Agents-Horse-Battery-42"

static struct {
    bgt_redis_t redis;
    bgt_pg_t db;
    char dir[256], log[2][300], bases[2][64];
    int ports[2];
    pid_t pids[2];
    const char *base; /* the edge call() speaks to */
} S;

static pid_t start_edge(int i)
{
    static char env_store[2][3][600];
    snprintf(env_store[i][0], 600, "BG_HTTP_PORT=%d", S.ports[i]);
    snprintf(env_store[i][1], 600, "BG_REDIS_URL=%s", S.redis.url);
    snprintf(env_store[i][2], 600, "BG_DATABASE_URL=%s", S.db.url);
    const char *env[] = {env_store[i][0],
                         env_store[i][1],
                         env_store[i][2],
                         "BG_HTTPS_PORT=0",
                         "BG_ENV_FILE=/nonexistent",
                         "BG_EDGE_THREADS=2",
                         "BG_LOG_FORMAT=text",
                         "BG_LOG_LEVEL=info",
                         "BG_JWT_SECRET=0123456789abcdef0123456789abcdef-agentsapi",
                         NULL};
    const char *argv[] = {bgt_bin("bg-edge"), NULL};
    return bgt_spawn(argv, env, S.log[i]);
}

static void setup(void)
{
    memset(&S, 0, sizeof(S));
    cr_assert_eq(bgt_pg_create(&S.db, true), 0);
    cr_assert_eq(bgt_redis_start(&S.redis), 0);
    cr_assert_eq(bgt_tempdir(S.dir, sizeof(S.dir)), 0);
    for (int i = 0; i < 1; i++) {
        snprintf(S.log[i], sizeof(S.log[i]), "%s/edge%d.log", S.dir, i);
        S.ports[i] = bgt_free_port();
        snprintf(S.bases[i], sizeof(S.bases[i]), "http://127.0.0.1:%d", S.ports[i]);
        S.pids[i] = start_edge(i);
        cr_assert(S.pids[i] > 0);
        char url[200];
        snprintf(url, sizeof(url), "%s/healthz", S.bases[i]);
        cr_assert_eq(bgt_wait_http(url, 200, 10000), 0, "bg-edge %d did not come up; see %s", i,
                     S.log[i]);
    }
    S.base = S.bases[0];
}

static void teardown(void)
{
    for (int i = 0; i < 2; i++)
        if (S.pids[i] > 0)
            bgt_stop(S.pids[i], SIGKILL, 2000);
    bgt_redis_stop(&S.redis);
    bgt_pg_drop(&S.db);
    bgt_rmtree(S.dir);
}

TestSuite(agents_api, .init = setup, .fini = teardown, .timeout = 120);

static long call(const char *method, const char *path, const char *token, const char *body,
                 bgt_resp_t *r)
{
    char url[512], authz[2100];
    const char *headers[3];
    size_t n = 0;
    snprintf(url, sizeof(url), "%s%s", S.base, path);
    if (token != NULL) {
        snprintf(authz, sizeof(authz), "Authorization: Bearer %s", token);
        headers[n++] = authz;
    }
    if (body != NULL)
        headers[n++] = "Content-Type: application/json";
    headers[n] = NULL;
    cr_assert_eq(bgt_http(BGT_H2C, method, url, headers, body, body != NULL ? strlen(body) : 0, r),
                 0, "%s %s: %s", method, path, r->error);
    return r->status;
}

/* The value at path (keys) of a JSON text, or NULL (doc owned by the caller). */
static const bg_json_t *json_at(const char *text, bg_json_doc_t **doc, const char *const path[])
{
    const char *desc;
    size_t off;
    *doc = NULL;
    if (bg_json_parse(text, strlen(text), NULL, doc, &desc, &off) != 0)
        return NULL;
    const bg_json_t *v = bg_json_root(*doc);
    for (size_t i = 0; path[i] != NULL && v != NULL; i++)
        v = bg_json_find(v, path[i]);
    return v;
}

static void get_str(const char *text, const char *const path[], char *out, size_t outlen)
{
    bg_json_doc_t *doc;
    const bg_json_t *v = json_at(text, &doc, path);
    size_t len = 0;
    const char *s = v != NULL ? bg_json_str(v, &len) : NULL;
    cr_assert(s != NULL && len < outlen, "no string %s in %s", path[0], text);
    memcpy(out, s, len);
    out[len] = '\0';
    bg_json_doc_free(doc);
}

static int64_t get_int(const char *text, const char *const path[])
{
    bg_json_doc_t *doc;
    const bg_json_t *v = json_at(text, &doc, path);
    int64_t n = 0;
    cr_assert(v != NULL && bg_json_int(v, &n), "no integer %s in %s", path[0], text);
    bg_json_doc_free(doc);
    return n;
}

/* Registers email; fills token and id. */
static void register_user(const char *email, char *token, size_t tokenlen, char *id, size_t idlen)
{
    char body[512];
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"" PASSWORD "\"}", email);
    bgt_resp_t r;
    long st = call("POST", "/auth/register", NULL, body, &r);
    cr_assert_eq(st, 201, "register: %ld %s", st, r.body);
    get_str(r.body, (const char *const[]){"access_token", NULL}, token, tokenlen);
    get_str(r.body, (const char *const[]){"user", "id", NULL}, id, idlen);
    bgt_resp_free(&r);
}

/* Makes a platform admin with bgctl and signs in; fills token. */
static void make_admin(const char *email, char *token, size_t tokenlen)
{
    char env_url[600], out[4096];
    snprintf(env_url, sizeof(env_url), "BG_DATABASE_URL=%s", S.db.url);
    const char *env[] = {env_url, "BG_LOG_LEVEL=warn", "BG_ENV_FILE=/nonexistent", NULL};
    const char *argv[] = {bgt_bin("bgctl"), "user",   "create", "--admin", "--email", email,
                          "--password",     PASSWORD, NULL};
    cr_assert_eq(bgt_run(argv, env, out, sizeof(out)), 0, "bgctl user create --admin: %s", out);
    char body[512];
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"" PASSWORD "\"}", email);
    bgt_resp_t r;
    long st = call("POST", "/auth/login", NULL, body, &r);
    cr_assert_eq(st, 200, "admin login: %ld %s", st, r.body);
    get_str(r.body, (const char *const[]){"access_token", NULL}, token, tokenlen);
    bgt_resp_free(&r);
}

/* Expects 422 validation_failed naming field. */
static void expect_invalid(const char *method, const char *path, const char *token,
                           const char *body, const char *field)
{
    bgt_resp_t r;
    long st = call(method, path, token, body, &r);
    cr_expect_eq(st, 422, "%s: %ld %s", body, st, r.body);
    char got[128] = "";
    bg_json_doc_t *doc;
    const bg_json_t *fields =
        json_at(r.body, &doc, (const char *const[]){"error", "details", "fields", NULL});
    const bg_json_t *f0 = fields != NULL ? bg_json_at(fields, 0) : NULL;
    const bg_json_t *name = f0 != NULL ? bg_json_find(f0, "field") : NULL;
    size_t len = 0;
    const char *s = name != NULL ? bg_json_str(name, &len) : NULL;
    if (s != NULL && len < sizeof(got)) {
        memcpy(got, s, len);
        got[len] = '\0';
    }
    bg_json_doc_free(doc);
    cr_expect_str_eq(got, field, "%s: %s", body, r.body);
    bgt_resp_free(&r);
}

/* Counts audit rows of action about target (an agent or a prompt). */
static long audit_rows(const char *action, const char *target)
{
    PGconn *c = PQconnectdb(S.db.url);
    cr_assert_eq(PQstatus(c), CONNECTION_OK, "%s", PQerrorMessage(c));
    const char *p[] = {action, target};
    PGresult *res = PQexecParams(c,
                                 "SELECT count(*) FROM audit_log WHERE action = $1 AND "
                                 "target_id = $2 AND actor_id IS NOT NULL",
                                 2, NULL, p, NULL, NULL, 0);
    cr_assert_eq(PQresultStatus(res), PGRES_TUPLES_OK, "%s", PQerrorMessage(c));
    long n = strtol(PQgetvalue(res, 0, 0), NULL, 10);
    PQclear(res);
    PQfinish(c);
    return n;
}

/* Calls and expects status; returns the body (caller frees). */
static char *expect(const char *method, const char *path, const char *token, const char *body,
                    long status)
{
    bgt_resp_t r;
    long st = call(method, path, token, body, &r);
    cr_assert_eq(st, status, "%s %s %s: %ld %s", method, path, body != NULL ? body : "", st,
                 r.body != NULL ? r.body : "");
    char *out = strdup(r.body != NULL ? r.body : "");
    bgt_resp_free(&r);
    return out;
}

/* The error code and details.reason of an error body must be code and reason (NULL: any). */
static void expect_error(const char *body, const char *code, const char *reason)
{
    char got[64];
    get_str(body, (const char *const[]){"error", "code", NULL}, got, sizeof(got));
    cr_assert_str_eq(got, code, "%s", body);
    if (reason != NULL) {
        get_str(body, (const char *const[]){"error", "details", "reason", NULL}, got, sizeof(got));
        cr_assert_str_eq(got, reason, "%s", body);
    }
}

/* The first field error's code of a 422 body. */
static void expect_field_code(const char *body, const char *code)
{
    bg_json_doc_t *doc;
    const bg_json_t *fields =
        json_at(body, &doc, (const char *const[]){"error", "details", "fields", NULL});
    const bg_json_t *c = fields != NULL ? bg_json_find(bg_json_at(fields, 0), "code") : NULL;
    size_t len = 0;
    const char *s = c != NULL ? bg_json_str(c, &len) : NULL;
    cr_assert(s != NULL && strlen(code) == len && memcmp(s, code, len) == 0, "want %s: %s", code,
              body);
    bg_json_doc_free(doc);
}

/* The content of message i of a preview answer (into out). */
static void message_content(const char *body, size_t i, char *out, size_t outlen)
{
    bg_json_doc_t *doc;
    const bg_json_t *msgs = json_at(body, &doc, (const char *const[]){"messages", NULL});
    cr_assert(msgs != NULL && bg_json_len(msgs) > i, "no message %zu in %s", i, body);
    size_t len = 0;
    const char *s = bg_json_str(bg_json_find(bg_json_at(msgs, i), "content"), &len);
    cr_assert(s != NULL && len < outlen, "%s", body);
    memcpy(out, s, len);
    out[len] = '\0';
    bg_json_doc_free(doc);
}

/* Whether a list answer ({"data":[…]}) has an item whose key is value. */
static bool list_has(const char *body, const char *key, const char *value)
{
    bg_json_doc_t *doc;
    const bg_json_t *data = json_at(body, &doc, (const char *const[]){"data", NULL});
    cr_assert_not_null(data, "%s", body);
    bool found = false;
    for (size_t i = 0; i < bg_json_len(data) && !found; i++) {
        size_t len = 0;
        const char *s = bg_json_str(bg_json_find(bg_json_at(data, i), key), &len);
        found = s != NULL && strlen(value) == len && memcmp(s, value, len) == 0;
    }
    bg_json_doc_free(doc);
    return found;
}

#define DEF                                                                                        \
    "{\"system\":\"You help with {{topic}} in a {{tone}} tone for {{builtin.user_name}}.\","       \
    "\"user\":\"Q: {{message}}\",\"variables\":[{\"name\":\"topic\",\"type\":\"string\","          \
    "\"required\":true},{\"name\":\"tone\",\"type\":\"enum\",\"values\":[\"calm\",\"brisk\"],"     \
    "\"default\":\"calm\"}]}"
#define DEF2                                                                                       \
    "{\"system\":\"Version two about {{topic}}.\",\"variables\":[{\"name\":\"topic\","             \
    "\"type\":\"string\",\"required\":true}]}"

Test(agents_api, prompts_versions_agents_previews_and_rollback)
{
    char admin[2048], pid[64], pinned[64], follower[64], path[256], text[512], body[1024];
    make_admin("admin@agents.example", admin, sizeof(admin));

    /* a prompt with typed variables; an invalid definition is refused naming its field */
    expect_invalid("POST", "/admin/prompts", admin,
                   "{\"name\":\"Bad\",\"definition\":{\"system\":\"x\",\"variables\":"
                   "[{\"name\":\"when\",\"type\":\"date\"}]}}",
                   "definition.variables[0].type");
    expect_invalid("POST", "/admin/prompts", admin, "{\"name\":\"Bad\"}", "definition");
    char *b =
        expect("POST", "/admin/prompts", admin,
               "{\"name\":\"Helper\",\"description\":\"for tests\",\"definition\":" DEF "}", 201);
    get_str(b, (const char *const[]){"id", NULL}, pid, sizeof(pid));
    cr_assert_eq(get_int(b, (const char *const[]){"current_version", NULL}), 1);
    cr_assert_eq(get_int(b, (const char *const[]){"version", "version", NULL}), 1);
    free(b);

    /* version 2 becomes current; version 1 stays as it was */
    snprintf(path, sizeof(path), "/admin/prompts/%s/versions", pid);
    b = expect("POST", path, admin, "{\"definition\":" DEF2 ",\"note\":\"shorter\"}", 201);
    cr_assert_eq(get_int(b, (const char *const[]){"current_version", NULL}), 2);
    cr_assert(strstr(b, "\"versions\":[2,1]") != NULL, "%s", b);
    free(b);
    snprintf(path, sizeof(path), "/admin/prompts/%s?version=1", pid);
    b = expect("GET", path, admin, NULL, 200);
    get_str(b, (const char *const[]){"version", "definition", "system", NULL}, text, sizeof(text));
    cr_assert(strstr(text, "You help with {{topic}}") != NULL, "%s", b);
    free(b);

    /* one agent pinned to version 1, one following the latest */
    snprintf(body, sizeof(body),
             "{\"slug\":\"helper\",\"name\":\"Helper\",\"prompt_id\":\"%s\",\"prompt_version\":1,"
             "\"visibility\":\"public\",\"temperature\":0.3,\"max_tokens\":500,"
             "\"memory\":{\"token_budget\":2000},\"cache_enabled\":true,\"cache_ttl_s\":60,"
             "\"channels\":[\"web\",\"api\"]}",
             pid);
    b = expect("POST", "/admin/agents", admin, body, 201);
    get_str(b, (const char *const[]){"id", NULL}, pinned, sizeof(pinned));
    cr_assert_eq(get_int(b, (const char *const[]){"prompt_version", NULL}), 1);
    cr_assert_eq(get_int(b, (const char *const[]){"memory", "token_budget", NULL}), 2000);
    cr_assert(strstr(b, "\"channels\":[\"web\",\"api\"]") != NULL, "%s", b);
    cr_assert(strstr(b, "\"organization_id\":null") != NULL, "a system agent: %s", b);
    free(b);
    snprintf(body, sizeof(body),
             "{\"slug\":\"follower\",\"name\":\"Follower\",\"prompt_id\":\"%s\","
             "\"visibility\":\"public\"}",
             pid);
    b = expect("POST", "/admin/agents", admin, body, 201);
    get_str(b, (const char *const[]){"id", NULL}, follower, sizeof(follower));
    cr_assert(strstr(b, "\"prompt_version\":null") != NULL, "follows: %s", b);
    free(b);
    b = expect("POST", "/admin/agents", admin, body, 409);
    expect_error(b, "conflict", "taken");
    free(b);
    expect_invalid("POST", "/admin/agents", admin, "{\"slug\":\"Bad Slug\",\"name\":\"x\"}",
                   "slug");
    expect_invalid("POST", "/admin/agents", admin,
                   "{\"slug\":\"t\",\"name\":\"x\",\"temperature\":3}", "temperature");
    expect_invalid("POST", "/admin/agents", admin,
                   "{\"slug\":\"t\",\"name\":\"x\",\"channels\":[\"fax\"]}", "channels");
    expect_invalid("POST", "/admin/agents", admin,
                   "{\"slug\":\"t\",\"name\":\"x\",\"memory\":{\"last_turns\":5000}}",
                   "memory.last_turns");

    /* previews render without a model: the pinned agent version 1, the follower version 2 */
    snprintf(path, sizeof(path), "/admin/agents/%s/preview", pinned);
    b = expect("POST", path, admin, "{\"variables\":{\"topic\":\"tea\"},\"message\":\"hi\"}", 200);
    cr_assert_eq(get_int(b, (const char *const[]){"version", NULL}), 1);
    message_content(b, 0, text, sizeof(text));
    cr_assert(strncmp(text, "You help with tea in a calm tone for ", 37) == 0, "%s", b);
    message_content(b, 1, text, sizeof(text));
    cr_assert_str_eq(text, "Q: hi");
    free(b);
    snprintf(path, sizeof(path), "/admin/agents/%s/preview", follower);
    b = expect("POST", path, admin, "{\"variables\":{\"topic\":\"tea\"},\"message\":\"hi\"}", 200);
    cr_assert_eq(get_int(b, (const char *const[]){"version", NULL}), 2);
    message_content(b, 0, text, sizeof(text));
    cr_assert_str_eq(text, "Version two about tea.");
    free(b);

    /* strict rendering: a missing required variable and an unknown one are 422 naming them */
    snprintf(path, sizeof(path), "/admin/agents/%s/preview", pinned);
    b = expect("POST", path, admin, "{\"message\":\"hi\"}", 422);
    expect_field_code(b, "missing");
    cr_assert(strstr(b, "\"field\":\"variables.topic\"") != NULL, "%s", b);
    free(b);
    expect_invalid("POST", path, admin, "{\"variables\":{\"topic\":\"tea\",\"colour\":\"red\"}}",
                   "variables.colour");
    expect_invalid("POST", path, admin, "{\"variables\":{\"topic\":\"tea\",\"tone\":\"loud\"}}",
                   "variables.tone");
    snprintf(path, sizeof(path), "/admin/prompts/%s/preview", pid);
    b = expect("POST", path, admin, "{\"variables\":{\"topic\":\"cats\"},\"version\":1}", 200);
    message_content(b, 0, text, sizeof(text));
    cr_assert(strncmp(text, "You help with cats", 18) == 0, "%s", b);
    free(b);

    /* rollback publishes version 1 again as version 3: the follower moves, the pin does not */
    snprintf(path, sizeof(path), "/admin/prompts/%s/rollback", pid);
    expect_invalid("POST", path, admin, "{\"version\":9}", "version");
    b = expect("POST", path, admin, "{\"version\":1}", 200);
    cr_assert_eq(get_int(b, (const char *const[]){"current_version", NULL}), 3);
    cr_assert(strstr(b, "\"versions\":[3,2,1]") != NULL, "%s", b);
    free(b);
    snprintf(path, sizeof(path), "/admin/agents/%s/preview", follower);
    b = expect("POST", path, admin, "{\"variables\":{\"topic\":\"tea\"}}", 200);
    cr_assert_eq(get_int(b, (const char *const[]){"version", NULL}), 3);
    message_content(b, 0, text, sizeof(text));
    cr_assert(strncmp(text, "You help with tea", 17) == 0, "%s", b);
    free(b);

    /* update: unpin and rename; refusals name the field */
    snprintf(path, sizeof(path), "/admin/agents/%s", pinned);
    b = expect("PUT", path, admin, "{\"prompt_version\":null,\"name\":\"Helper Two\"}", 200);
    cr_assert(strstr(b, "\"prompt_version\":null") != NULL, "%s", b);
    get_str(b, (const char *const[]){"name", NULL}, text, sizeof(text));
    cr_assert_str_eq(text, "Helper Two");
    free(b);
    expect_invalid("PUT", path, admin, "{\"prompt_version\":7}", "prompt_version");
    expect_invalid("PUT", path, admin, "{\"organization_id\":null}", "organization_id");
    b = expect("PUT", path, admin, "{\"slug\":\"follower\"}", 409);
    free(b);
    b = expect("GET", "/admin/agents", admin, NULL, 200);
    cr_assert(list_has(b, "slug", "helper") && list_has(b, "slug", "assistant"), "%s", b);
    free(b);

    /* delete: gone for the API, its slug free again */
    snprintf(path, sizeof(path), "/admin/agents/%s", follower);
    free(expect("DELETE", path, admin, NULL, 204));
    free(expect("GET", path, admin, NULL, 404));
    free(expect("DELETE", path, admin, NULL, 404));

    cr_assert_eq(audit_rows("prompt.create", pid), 1);
    cr_assert_eq(audit_rows("prompt.publish", pid), 1);
    cr_assert_eq(audit_rows("prompt.rollback", pid), 1);
    cr_assert_eq(audit_rows("agent.create", pinned), 1);
    cr_assert_eq(audit_rows("agent.update", pinned), 1);
    cr_assert_eq(audit_rows("agent.delete", follower), 1);
}

/* Registers a user who then creates a team organization; fills token, user id and org id. */
static void make_org_owner(const char *email, const char *org_name, char *token, size_t tokenlen,
                           char *org, size_t orglen)
{
    char uid[64], body[256];
    register_user(email, token, tokenlen, uid, sizeof(uid));
    snprintf(body, sizeof(body), "{\"name\":\"%s\"}", org_name);
    char *b = expect("POST", "/orgs", token, body, 201);
    get_str(b, (const char *const[]){"id", NULL}, org, orglen);
    free(b);
}

Test(agents_api, organization_admins_manage_their_own_only)
{
    char alice[2048], bob[2048], plain[2048], member[2048], uid[64];
    char org_a[64], org_b[64], agent[64], prompt[64], path[256], body[1024];
    make_org_owner("alice@agents.example", "Alpha", alice, sizeof(alice), org_a, sizeof(org_a));
    make_org_owner("bob@agents.example", "Beta", bob, sizeof(bob), org_b, sizeof(org_b));
    register_user("plain@agents.example", plain, sizeof(plain), uid, sizeof(uid));
    register_user("member@agents.example", member, sizeof(member), uid, sizeof(uid));
    snprintf(path, sizeof(path), "/orgs/%s/members", org_a);
    free(expect("POST", path, alice, "{\"email\":\"member@agents.example\",\"role\":\"member\"}",
                204));

    /* alice makes a prompt and an agent of Alpha; she must say which organization */
    expect_invalid("POST", "/admin/agents", alice, "{\"slug\":\"a\",\"name\":\"A\"}",
                   "organization_id");
    snprintf(body, sizeof(body), "{\"organization_id\":\"%s\",\"slug\":\"a\",\"name\":\"A\"}",
             org_b);
    free(expect("POST", "/admin/agents", alice, body, 404));
    snprintf(body, sizeof(body),
             "{\"organization_id\":\"%s\",\"name\":\"Alpha prompt\",\"definition\":"
             "{\"system\":\"Alpha helps {{builtin.user_name}}.\"}}",
             org_a);
    char *b = expect("POST", "/admin/prompts", alice, body, 201);
    get_str(b, (const char *const[]){"id", NULL}, prompt, sizeof(prompt));
    free(b);
    snprintf(body, sizeof(body),
             "{\"organization_id\":\"%s\",\"slug\":\"alpha-bot\",\"name\":\"Alpha bot\","
             "\"prompt_id\":\"%s\",\"visibility\":\"organization\"}",
             org_a, prompt);
    b = expect("POST", "/admin/agents", alice, body, 201);
    get_str(b, (const char *const[]){"id", NULL}, agent, sizeof(agent));
    free(b);
    b = expect("GET", "/admin/agents", alice, NULL, 200);
    cr_assert(list_has(b, "id", agent), "%s", b);
    cr_assert(!list_has(b, "slug", "assistant"), "system agents are the platform's: %s", b);
    free(b);

    /* the members of Alpha may chat with it; others do not see it */
    b = expect("GET", "/agents", member, NULL, 200);
    cr_assert(list_has(b, "id", agent), "%s", b);
    free(b);
    b = expect("GET", "/agents", plain, NULL, 200);
    cr_assert(!list_has(b, "id", agent), "%s", b);
    free(b);

    /* bob, admin of another organization: Alpha's agent and prompt do not exist for him */
    snprintf(path, sizeof(path), "/admin/agents/%s", agent);
    free(expect("GET", path, bob, NULL, 404));
    free(expect("PUT", path, bob, "{\"name\":\"Mine now\"}", 404));
    free(expect("DELETE", path, bob, NULL, 404));
    snprintf(path, sizeof(path), "/admin/agents/%s/preview", agent);
    free(expect("POST", path, bob, "{}", 404));
    snprintf(path, sizeof(path), "/admin/prompts/%s", prompt);
    free(expect("GET", path, bob, NULL, 404));
    snprintf(path, sizeof(path), "/admin/prompts/%s/versions", prompt);
    free(expect("POST", path, bob, "{\"definition\":{\"system\":\"x\"}}", 404));
    b = expect("GET", "/admin/agents", bob, NULL, 200);
    cr_assert(!list_has(b, "id", agent), "%s", b);
    free(b);

    /* system prompts: readable by organization admins, changed by platform admins only */
    b = expect("GET", "/admin/prompts", alice, NULL, 200);
    cr_assert(list_has(b, "id", prompt) && list_has(b, "name", "assistant"), "%s", b);
    free(b);
    free(expect("POST", "/admin/prompts/00000000-0000-4000-8000-00000000a551/versions", alice,
                "{\"definition\":{\"system\":\"hijacked\"}}", 403));

    /* a user who manages nothing, and a plain member: 403 everywhere */
    free(expect("GET", "/admin/agents", plain, NULL, 403));
    free(expect("GET", "/admin/prompts", member, NULL, 403));
    snprintf(path, sizeof(path), "/admin/agents/%s", agent);
    free(expect("GET", path, member, NULL, 403));
    free(expect("DELETE", path, plain, NULL, 403));
    snprintf(body, sizeof(body), "{\"organization_id\":\"%s\",\"slug\":\"m\",\"name\":\"M\"}",
             org_a);
    free(expect("POST", "/admin/agents", member, body, 403));

    /* alice changes and deletes her agent; audited with her as actor */
    free(expect("PUT", path, alice, "{\"status\":\"disabled\"}", 200));
    b = expect("GET", "/agents", member, NULL, 200);
    cr_assert(!list_has(b, "id", agent), "a disabled agent is not offered: %s", b);
    free(b);
    free(expect("DELETE", path, alice, NULL, 204));
    cr_assert_eq(audit_rows("agent.create", agent), 1);
    cr_assert_eq(audit_rows("agent.update", agent), 1);
    cr_assert_eq(audit_rows("agent.delete", agent), 1);
}

/* The id of the agent with slug in GET /agents, or "" (into out). */
static void agent_id_of(const char *token, const char *slug, char *out, size_t outlen)
{
    char *b = expect("GET", "/agents", token, NULL, 200);
    bg_json_doc_t *doc;
    const bg_json_t *data = json_at(b, &doc, (const char *const[]){"data", NULL});
    out[0] = '\0';
    for (size_t i = 0; data != NULL && i < bg_json_len(data); i++) {
        size_t len = 0;
        const char *s = bg_json_str(bg_json_find(bg_json_at(data, i), "slug"), &len);
        if (s != NULL && strlen(slug) == len && memcmp(s, slug, len) == 0) {
            const char *id = bg_json_str(bg_json_find(bg_json_at(data, i), "id"), &len);
            cr_assert(id != NULL && len < outlen);
            memcpy(out, id, len);
            out[len] = '\0';
        }
    }
    bg_json_doc_free(doc);
    free(b);
}

Test(agents_api, resource_access_policy_hides_and_refuses_an_agent)
{
    char admin[2048], denied[2048], other[2048], uid_denied[64], uid_other[64];
    char assistant[64], id[64], body[512];
    make_admin("admin@agents.example", admin, sizeof(admin));
    register_user("denied@agents.example", denied, sizeof(denied), uid_denied, sizeof(uid_denied));
    register_user("other@agents.example", other, sizeof(other), uid_other, sizeof(uid_other));
    agent_id_of(denied, "assistant", assistant, sizeof(assistant));
    cr_assert_neq(assistant[0], '\0', "a new user sees the assistant");

    /* a deny for one user, by slug */
    snprintf(body, sizeof(body),
             "{\"type\":\"resource_access\",\"scope\":\"user\",\"scope_id\":\"%s\","
             "\"body\":{\"agents\":[\"assistant\"],\"effect\":\"deny\"}}",
             uid_denied);
    free(expect("POST", "/admin/policies", admin, body, 201));
    agent_id_of(denied, "assistant", id, sizeof(id));
    cr_assert_str_eq(id, "", "hidden from GET /agents");
    snprintf(body, sizeof(body), "{\"agent_id\":\"%s\"}", assistant);
    char *b = expect("POST", "/chat/conversations", denied, body, 403);
    expect_error(b, "forbidden", "agent_not_allowed");
    free(b);
    /* the rule is about that user only */
    agent_id_of(other, "assistant", id, sizeof(id));
    cr_assert_str_eq(id, assistant);
    free(expect("POST", "/chat/conversations", other, body, 201));

    /* a deny of a model reaches the agents that use it, for everyone */
    free(expect("POST", "/admin/agents", admin,
                "{\"slug\":\"big\",\"name\":\"Big\",\"model\":\"big-model\","
                "\"visibility\":\"public\"}",
                201));
    agent_id_of(other, "big", id, sizeof(id));
    cr_assert_neq(id[0], '\0', "visible before the rule");
    char big[64];
    bg_strlcpy(big, id, sizeof(big));
    free(expect("POST", "/admin/policies", admin,
                "{\"type\":\"resource_access\",\"scope\":\"global\","
                "\"body\":{\"models\":[\"big-model\"],\"effect\":\"deny\"}}",
                201));
    agent_id_of(other, "big", id, sizeof(id));
    cr_assert_str_eq(id, "", "hidden once its model is denied");
    snprintf(body, sizeof(body), "{\"agent_id\":\"%s\"}", big);
    b = expect("POST", "/chat/conversations", other, body, 403);
    expect_error(b, "forbidden", "agent_not_allowed");
    free(b);
}
