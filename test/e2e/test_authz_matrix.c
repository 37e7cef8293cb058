/*
 * Authorization matrix of bg-edge: the real binary against a private Redis and a freshly migrated
 * database, spoken to over HTTP/2 (h2c with prior knowledge).
 *
 * Every route of the route tables (edge/routes_*.c) is asked by seven kinds of caller: nobody, a
 * plain user, a member (role member) of an organization someone else owns, that organization's
 * admin, a platform admin, a user a platform admin disabled (through PUT /admin/users/{id}) and a
 * user who signed out. Each answer must be exactly the status of the matrix below: 401 without a
 * usable token (none, or one of a disabled or signed-out session), 403 for non-admins on /admin/…,
 * 404 for an organization the caller is not in, and the route's success status where the caller is
 * allowed. Every request carries the caller's token, public routes included, and a body the route
 * accepts, so that a refusal can only come from authorization.
 *
 * NEW ROUTES MUST BE ADDED TO `matrix` BELOW. authz_routes.every_route_has_a_matrix_row walks the
 * route tables themselves (edge_route_tables: this test links bg_edge_core, so they are at hand)
 * and fails for any route without a row and any row without a route; `known_prefixes` lists the
 * path families this file knows, and a route outside them fails too, as a reminder that a new
 * family needs callers and expectations of its own.
 *
 * The matrix runs route by route (each route for every caller) in the order of `matrix`, which is
 * chosen so that rows changing state come after the rows that need it: POST members before DELETE
 * members, and POST /auth/logout last, since it ends the caller's session.
 *
 * Separate tests cover what a matrix cannot: another user's resources answer 404 (and a plain
 * member's attempt 403), and the admin users API (search, cursor pagination, role and status
 * changes with their audit rows read back from Postgres through libpq, soft deletion).
 */
#include <criterion/criterion.h>
#include <libpq-fe.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bg/common.h"
#include "bg/json.h"
#include "bgtest.h"
#include "edge.h"

#define PASSWORD "Matrix-Horse-Battery-42"

typedef struct st_stack {
    bgt_redis_t redis;
    bgt_pg_t db;
    char dir[256];
    char log[300];
    int port;
    pid_t pid;
    char base[64];
} authz_stack_t;

static authz_stack_t S;

/* A signed-in user as the tests know them. */
typedef struct st_account {
    char id[64];
    char email[128];
    char access[2048];
    char refresh[256];
    char org[64]; /* the personal organization */
} account_t;

/* ---- the stack ---- */

static void setup(void)
{
    memset(&S, 0, sizeof(S));
    cr_assert_eq(bgt_pg_create(&S.db, true), 0);
    cr_assert_eq(bgt_redis_start(&S.redis), 0);
    cr_assert_eq(bgt_tempdir(S.dir, sizeof(S.dir)), 0);
    snprintf(S.log, sizeof(S.log), "%s/edge.log", S.dir);
    S.port = bgt_free_port();
    snprintf(S.base, sizeof(S.base), "http://127.0.0.1:%d", S.port);

    static char env_store[4][600];
    snprintf(env_store[0], 600, "BG_HTTP_PORT=%d", S.port);
    snprintf(env_store[1], 600, "BG_REDIS_URL=%s", S.redis.url);
    snprintf(env_store[2], 600, "BG_DATABASE_URL=%s", S.db.url);
    const char *env[] = {env_store[0], env_store[1], env_store[2], "BG_HTTPS_PORT=0",
                         "BG_ENV_FILE=/nonexistent", "BG_EDGE_THREADS=2", "BG_LOG_FORMAT=text",
                         "BG_LOG_LEVEL=info",
                         "BG_JWT_SECRET=0123456789abcdef0123456789abcdef-authz",
                         /* many sign-ins from one address: the limits are not under test here */
                         "BG_LOGIN_IP_PER_MIN=100000", "BG_LOGIN_FAILURES_MAX=1000", NULL};
    const char *argv[] = {bgt_bin("bg-edge"), NULL};
    S.pid = bgt_spawn(argv, env, S.log);
    cr_assert(S.pid > 0);
    char url[128];
    snprintf(url, sizeof(url), "%s/healthz", S.base);
    cr_assert_eq(bgt_wait_http(url, 200, 10000), 0, "bg-edge did not come up; see %s", S.log);
}

static void teardown(void)
{
    if (S.pid > 0)
        bgt_stop(S.pid, SIGKILL, 2000);
    bgt_redis_stop(&S.redis);
    bgt_pg_drop(&S.db);
    bgt_rmtree(S.dir);
}

TestSuite(authz, .init = setup, .fini = teardown, .timeout = 180);

/* ---- HTTP and JSON helpers ---- */

/* Performs one h2c request with the token (may be NULL) and the JSON body (may be NULL). */
static long call(const char *method, const char *path, const char *token, const char *body,
                 bgt_resp_t *r)
{
    char url[512], authz[2100];
    const char *headers[4];
    size_t n = 0;
    snprintf(url, sizeof(url), "%s%s", S.base, path);
    if (token != NULL && token[0] != '\0') {
        snprintf(authz, sizeof(authz), "Authorization: Bearer %s", token);
        headers[n++] = authz;
    }
    if (body != NULL)
        headers[n++] = "Content-Type: application/json";
    headers[n] = NULL;
    cr_assert_eq(bgt_http(BGT_H2C, method, url, headers, body, body != NULL ? strlen(body) : 0, r),
                 0, "%s %s: %s", method, path, r->error);
    cr_assert_eq(r->version, 2, "%s %s: spoke HTTP/%ld", method, path, r->version);
    return r->status;
}

/* call() that expects want and frees the response. */
static void call_expect(const char *method, const char *path, const char *token, const char *body,
                        long want)
{
    bgt_resp_t r;
    long got = call(method, path, token, body, &r);
    cr_assert_eq(got, want, "%s %s: %ld (expected %ld): %s", method, path, got, want, r.body);
    bgt_resp_free(&r);
}

/* Copies the string at path (keys, NULL-terminated) of a JSON text into out; false if absent. */
static bool json_str(const char *text, const char *const path[], char *out, size_t outlen)
{
    bg_json_doc_t *doc = NULL;
    const char *desc;
    size_t off;
    out[0] = '\0';
    if (bg_json_parse(text, strlen(text), NULL, &doc, &desc, &off) != 0)
        return false;
    const bg_json_t *v = bg_json_root(doc);
    for (size_t i = 0; path[i] != NULL && v != NULL; i++)
        v = bg_json_find(v, path[i]);
    size_t len = 0;
    const char *s = v != NULL ? bg_json_str(v, &len) : NULL;
    bool ok = s != NULL && len < outlen;
    if (ok) {
        memcpy(out, s, len);
        out[len] = '\0';
    }
    bg_json_doc_free(doc);
    return ok;
}

static void get_field(const char *text, const char *const path[], char *out, size_t outlen)
{
    cr_assert(json_str(text, path, out, outlen), "no %s in %s", path[0], text);
}

/* Fills a from a register/login/refresh answer. */
static void take_session(account_t *a, const char *body)
{
    get_field(body, (const char *const[]){"access_token", NULL}, a->access, sizeof(a->access));
    get_field(body, (const char *const[]){"refresh_token", NULL}, a->refresh, sizeof(a->refresh));
    get_field(body, (const char *const[]){"user", "id", NULL}, a->id, sizeof(a->id));
    get_field(body, (const char *const[]){"user", "organization_id", NULL}, a->org, sizeof(a->org));
}

/* Registers email (with PASSWORD) and fills a. */
static void register_user(account_t *a, const char *email)
{
    char body[512];
    memset(a, 0, sizeof(*a));
    bg_strlcpy(a->email, email, sizeof(a->email));
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"" PASSWORD "\"}", email);
    bgt_resp_t r;
    long st = call("POST", "/auth/register", NULL, body, &r);
    cr_assert_eq(st, 201, "register %s: %ld %s", email, st, r.body);
    take_session(a, r.body);
    bgt_resp_free(&r);
}

/* Signs in as email; returns the status, and fills a on 200. */
static long sign_in(account_t *a, const char *email)
{
    char body[512];
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"" PASSWORD "\"}", email);
    bgt_resp_t r;
    long st = call("POST", "/auth/login", NULL, body, &r);
    if (st == 200) {
        bg_strlcpy(a->email, email, sizeof(a->email));
        take_session(a, r.body);
    }
    bgt_resp_free(&r);
    return st;
}

/* Makes a platform admin with bgctl, as an operator would, and signs in as them. */
static void make_admin(account_t *a, const char *email)
{
    char env_url[600], out[4096];
    snprintf(env_url, sizeof(env_url), "BG_DATABASE_URL=%s", S.db.url);
    const char *env[] = {env_url, "BG_LOG_LEVEL=warn", "BG_ENV_FILE=/nonexistent", NULL};
    const char *argv[] = {bgt_bin("bgctl"), "user",   "create", "--admin", "--email", email,
                          "--password",     PASSWORD, NULL};
    cr_assert_eq(bgt_run(argv, env, out, sizeof(out)), 0, "bgctl user create --admin: %s", out);
    memset(a, 0, sizeof(*a));
    cr_assert_eq(sign_in(a, email), 200, "the admin cannot sign in");
}

/* Creates an API key named name for a; writes its id into id. */
static void create_key(const account_t *a, const char *name, char *id, size_t idlen)
{
    char body[256];
    snprintf(body, sizeof(body), "{\"name\":\"%s\"}", name);
    bgt_resp_t r;
    long st = call("POST", "/auth/api-keys", a->access, body, &r);
    cr_assert_eq(st, 201, "create key: %ld %s", st, r.body);
    get_field(r.body, (const char *const[]){"id", NULL}, id, idlen);
    bgt_resp_free(&r);
}

/* Creates an organization owned by a; writes its id into id. */
static void create_org(const account_t *a, const char *name, char *id, size_t idlen)
{
    char body[256];
    snprintf(body, sizeof(body), "{\"name\":\"%s\"}", name);
    bgt_resp_t r;
    long st = call("POST", "/orgs", a->access, body, &r);
    cr_assert_eq(st, 201, "create org: %ld %s", st, r.body);
    get_field(r.body, (const char *const[]){"id", NULL}, id, idlen);
    bgt_resp_free(&r);
}

static void add_member(const account_t *by, const char *org, const char *email, const char *role)
{
    char path[160], body[256];
    snprintf(path, sizeof(path), "/orgs/%s/members", org);
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"role\":\"%s\"}", email, role);
    call_expect("POST", path, by->access, body, 204);
}

/* The error code an error answer must carry for status (the one error format). */
static const char *code_for(long status)
{
    switch (status) {
    case 401:
        return "unauthorized";
    case 403:
        return "forbidden";
    case 404:
        return "not_found";
    default:
        return NULL;
    }
}

static bool has_code(const char *body, const char *code)
{
    char got[64];
    return json_str(body, (const char *const[]){"error", "code", NULL}, got, sizeof(got)) &&
           strcmp(got, code) == 0;
}

/* ---- the matrix ---- */

enum { C_ANON, C_USER, C_MEMBER, C_ORG_ADMIN, C_ADMIN, C_DISABLED, C_LOGGED_OUT, N_CALLERS };

static const char *const caller_names[N_CALLERS] = {
    "anonymous",      "plain user",    "org member",     "org admin",
    "platform admin", "disabled user", "signed-out user"};

/* Expectations by caller, in the order of the enum above. */
/* clang-format off */
#define ANYONE(s) {s, s, s, s, s, s, s}
#define SIGNED_IN(s) {401, s, s, s, s, 401, 401}
#define ADMIN_ONLY(s) {401, 403, 403, 403, s, 401, 401}
/* a route of the organization: not a member 404, a plain member 403, its admin s */
#define ORG_MANAGE(s) {401, 404, 403, s, 404, 401, 401}
/*
 * agents and prompts of the organization: its admin and platform admins. By these rows every
 * signed-in caller owns an organization of its own (the POST /orgs row), so the plain user and the
 * member manage agents too, just not the organization's: 404, as for anything of another
 * organization. (A user who manages nothing gets 403: test/e2e/test_agents_api.c.)
 */
#define ORG_AGENTS(s) {401, 404, 404, s, s, 401, 401}
/* clang-format on */

typedef struct st_row {
    const char *method;
    const char *pattern; /* exactly as in the route table */
    /*
     * The request: placeholders {org} (the organization), {member} and {member_email} (a user the
     * org admin adds and removes), {key} (an API key of the caller's own), {user} (a user the
     * admin reads and renames), {victim} (a user the admin deletes), {uniq} (unique per request),
     * {login_email}, {refresh} (a live refresh token), {password}, {agent} (the seeded assistant)
     * {conv} (a conversation of the caller's own), {oagent} and {oprompt} (an agent and a prompt of
     * the organization) and {del_agent} (an agent of the organization the caller deletes).
     */
    const char *path;
    const char *body; /* NULL: no body */
    long expect[N_CALLERS];
} row_t;

static const row_t matrix[] = {
    {"GET", "/healthz", "/healthz", NULL, ANYONE(200)},
    {"GET", "/readyz", "/readyz", NULL, ANYONE(200)},
    {"GET", "/metrics", "/metrics", NULL, ANYONE(200)},
    {"GET", "/openapi.json", "/openapi.json", NULL, ANYONE(200)},
    {"POST", "/auth/register", "/auth/register",
     "{\"email\":\"reg-{uniq}@matrix.example\",\"password\":\"{password}\"}", ANYONE(201)},
    {"POST", "/auth/login", "/auth/login",
     "{\"email\":\"{login_email}\",\"password\":\"{password}\"}", ANYONE(200)},
    {"POST", "/auth/refresh", "/auth/refresh", "{\"refresh_token\":\"{refresh}\"}", ANYONE(200)},
    {"GET", "/auth/profile", "/auth/profile", NULL, SIGNED_IN(200)},
    {"PUT", "/auth/profile", "/auth/profile", "{\"name\":\"Matrix {uniq}\"}", SIGNED_IN(200)},
    {"PUT", "/auth/locale", "/auth/locale", "{\"locale\":\"en\"}", SIGNED_IN(200)},
    {"GET", "/auth/api-keys", "/auth/api-keys", NULL, SIGNED_IN(200)},
    {"POST", "/auth/api-keys", "/auth/api-keys", "{\"name\":\"matrix {uniq}\"}", SIGNED_IN(201)},
    {"DELETE", "/auth/api-keys/{id}", "/auth/api-keys/{key}", NULL, SIGNED_IN(204)},
    {"POST", "/auth/telegram/link-code", "/auth/telegram/link-code", NULL, SIGNED_IN(201)},
    {"GET", "/orgs", "/orgs", NULL, SIGNED_IN(200)},
    {"POST", "/orgs", "/orgs", "{\"name\":\"Org {uniq}\"}", SIGNED_IN(201)},
    {"GET", "/orgs/{id}", "/orgs/{org}", NULL, {401, 404, 200, 200, 404, 401, 401}},
    {"POST", "/orgs/{id}/members", "/orgs/{org}/members",
     "{\"email\":\"{member_email}\",\"role\":\"member\"}", ORG_MANAGE(204)},
    {"DELETE", "/orgs/{id}/members/{user_id}", "/orgs/{org}/members/{member}", NULL,
     ORG_MANAGE(204)},
    {"GET", "/admin/users", "/admin/users", NULL, ADMIN_ONLY(200)},
    {"GET", "/admin/users/{id}", "/admin/users/{user}", NULL, ADMIN_ONLY(200)},
    {"PUT", "/admin/users/{id}", "/admin/users/{user}", "{\"name\":\"Renamed {uniq}\"}",
     ADMIN_ONLY(200)},
    {"DELETE", "/admin/users/{id}", "/admin/users/{victim}", NULL, ADMIN_ONLY(204)},
    {"GET", "/admin/stats", "/admin/stats", NULL, ADMIN_ONLY(200)},
    {"GET", "/admin/logs", "/admin/logs", NULL, ADMIN_ONLY(200)},
    {"GET", "/billing/account", "/billing/account", NULL, SIGNED_IN(200)},
    {"GET", "/billing/usage", "/billing/usage", NULL, SIGNED_IN(200)},
    {"GET", "/billing/plans", "/billing/plans", NULL, ANYONE(200)},
    {"GET", "/billing/history", "/billing/history", NULL, SIGNED_IN(200)},
    {"GET", "/notifications", "/notifications", NULL, SIGNED_IN(200)},
    {"POST", "/notifications/read", "/notifications/read", "{\"all\":true}", SIGNED_IN(200)},
    /* this stack has no BG_PADDLE_API_KEY: signed-in callers get 503 billing_unavailable */
    {"POST", "/billing/subscribe", "/billing/subscribe", "{\"plan\":\"monthly\"}", SIGNED_IN(503)},
    {"POST", "/billing/cancel", "/billing/cancel", NULL, SIGNED_IN(503)},
    {"POST", "/billing/resume", "/billing/resume", NULL, SIGNED_IN(503)},
    {"POST", "/billing/change", "/billing/change", "{\"plan\":\"yearly\"}", SIGNED_IN(503)},
    {"POST", "/billing/payment", "/billing/payment", NULL, SIGNED_IN(503)},
    {"GET", "/billing/invoices", "/billing/invoices", NULL, SIGNED_IN(200)},
    /* nobody here has invoices: no one sees an invoice that is not theirs */
    {"GET", "/billing/invoices/{id}", "/billing/invoices/00000000-0000-4000-8000-000000000007",
     NULL, SIGNED_IN(404)},
    {"GET", "/billing/invoices/{id}/html",
     "/billing/invoices/00000000-0000-4000-8000-000000000007/html", NULL, SIGNED_IN(404)},
    {"GET", "/admin/plans", "/admin/plans", NULL, ADMIN_ONLY(200)},
    {"PUT", "/admin/plans/{id}", "/admin/plans/weekly", "{\"name\":\"Weekly {uniq}\"}",
     ADMIN_ONLY(200)},
    {"POST", "/admin/users/{id}/plan", "/admin/users/{user}/plan",
     "{\"plan\":\"monthly\",\"days\":30}", ADMIN_ONLY(201)},
    {"GET", "/admin/policies", "/admin/policies", NULL, ADMIN_ONLY(200)},
    {"POST", "/admin/policies", "/admin/policies",
     "{\"type\":\"rate_limit\",\"scope\":\"global\",\"body\":{\"rpm\":1000,\"burst\":100}}",
     ADMIN_ONLY(201)},
    {"GET", "/admin/policies/{id}", "/admin/policies/{policy}", NULL, ADMIN_ONLY(200)},
    {"PUT", "/admin/policies/{id}", "/admin/policies/{policy}",
     "{\"type\":\"rate_limit\",\"scope\":\"global\",\"body\":{\"rpm\":900,\"burst\":90}}",
     ADMIN_ONLY(200)},
    {"DELETE", "/admin/policies/{id}", "/admin/policies/{policy}", NULL, ADMIN_ONLY(204)},
    {"GET", "/admin/agents", "/admin/agents", NULL, SIGNED_IN(200)},
    {"POST", "/admin/agents", "/admin/agents",
     "{\"organization_id\":\"{org}\",\"slug\":\"m-{uniq}\",\"name\":\"Matrix {uniq}\"}",
     ORG_AGENTS(201)},
    {"GET", "/admin/agents/{id}", "/admin/agents/{oagent}", NULL, ORG_AGENTS(200)},
    {"PUT", "/admin/agents/{id}", "/admin/agents/{oagent}", "{\"name\":\"Renamed {uniq}\"}",
     ORG_AGENTS(200)},
    {"POST", "/admin/agents/{id}/preview", "/admin/agents/{oagent}/preview",
     "{\"message\":\"hi {uniq}\"}", ORG_AGENTS(200)},
    {"DELETE", "/admin/agents/{id}", "/admin/agents/{del_agent}", NULL, ORG_AGENTS(204)},
    {"GET", "/admin/prompts", "/admin/prompts", NULL, SIGNED_IN(200)},
    {"POST", "/admin/prompts", "/admin/prompts",
     "{\"organization_id\":\"{org}\",\"name\":\"P {uniq}\",\"definition\":{\"system\":\"S\"}}",
     ORG_AGENTS(201)},
    {"GET", "/admin/prompts/{id}", "/admin/prompts/{oprompt}", NULL, ORG_AGENTS(200)},
    {"POST", "/admin/prompts/{id}/versions", "/admin/prompts/{oprompt}/versions",
     "{\"definition\":{\"system\":\"v{uniq}\"}}", ORG_AGENTS(201)},
    {"POST", "/admin/prompts/{id}/rollback", "/admin/prompts/{oprompt}/rollback", "{\"version\":1}",
     ORG_AGENTS(200)},
    {"POST", "/admin/prompts/{id}/preview", "/admin/prompts/{oprompt}/preview",
     "{\"message\":\"hi {uniq}\"}", ORG_AGENTS(200)},
    {"GET", "/agents", "/agents", NULL, SIGNED_IN(200)},
    {"GET", "/chat/conversations", "/chat/conversations", NULL, SIGNED_IN(200)},
    {"POST", "/chat/conversations", "/chat/conversations",
     "{\"agent_id\":\"{agent}\",\"title\":\"Matrix {uniq}\"}", SIGNED_IN(201)},
    {"GET", "/chat/conversations/{id}", "/chat/conversations/{conv}", NULL, SIGNED_IN(200)},
    {"PATCH", "/chat/conversations/{id}", "/chat/conversations/{conv}",
     "{\"title\":\"Renamed {uniq}\"}", SIGNED_IN(200)},
    {"GET", "/chat/conversations/{id}/messages", "/chat/conversations/{conv}/messages", NULL,
     SIGNED_IN(200)},
    /* an empty message: authorization is checked first, then the body (a real turn would stream) */
    {"POST", "/chat/conversations/{id}/messages", "/chat/conversations/{conv}/messages",
     "{\"content\":\"\"}", SIGNED_IN(422)},
    /* nobody's job: 404 for everyone signed in, like another user's */
    {"GET", "/chat/jobs/{id}/stream", "/chat/jobs/01890a5d-ac96-774b-bcce-b302099a8057/stream",
     NULL, SIGNED_IN(404)},
    {"POST", "/chat/jobs/{id}/cancel", "/chat/jobs/01890a5d-ac96-774b-bcce-b302099a8057/cancel",
     NULL, SIGNED_IN(404)},
    /* after the other rows of the conversation: it deletes it */
    {"DELETE", "/chat/conversations/{id}", "/chat/conversations/{conv}", NULL, SIGNED_IN(204)},
    /*
     * The OpenAI-compatible API takes API keys, never access tokens: every caller here presents
     * an access token (or none), so each gets 401 invalid_api_key in OpenAI's error body. Keys,
     * plans and models are tested in test/e2e/test_openai_api.c.
     */
    {"GET", "/v1/models", "/v1/models", NULL, ANYONE(401)},
    {"GET", "/v1/models/{model}", "/v1/models/assistant", NULL, ANYONE(401)},
    {"POST", "/v1/chat/completions", "/v1/chat/completions",
     "{\"model\":\"assistant\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}",
     ANYONE(401)},
    /*
     * Telegram's webhook takes no user token: it is proven by the bot's secret header, which no
     * caller here sends, so everyone gets the 401 of a missing secret (test/e2e/test_telegram.c
     * covers the secret itself).
     */
    {"POST", "/webhooks/telegram/{bot}", "/webhooks/telegram/123456", "{\"update_id\":1}",
     ANYONE(401)},
    /*
     * Paddle's webhook takes no user token: it is proven by the Paddle-Signature header, which no
     * caller here sends, so everyone gets 401 invalid_signature (test/e2e/test_billing_paddle.c
     * covers signed, forged and stale notifications).
     */
    {"POST", "/webhooks/paddle", "/webhooks/paddle", "{}", ANYONE(401)},
    /* last: it ends the caller's session (the access token names it) */
    {"POST", "/auth/logout", "/auth/logout", "{}", ANYONE(204)},
};

/* Path families this file has callers and expectations for. */
static const char *const known_prefixes[] = {
    "/healthz",         "/readyz",       "/metrics", "/openapi.json",
    "/auth/",           "/orgs",         "/admin/",  "/billing/",
    "/agents",          "/chat/",        "/v1/",     "/webhooks/telegram/",
    "/webhooks/paddle", "/notifications"};

/* What the placeholders stand for during a run of the matrix. */
typedef struct st_world {
    account_t caller[N_CALLERS]; /* C_ANON stays empty */
    char key[N_CALLERS][64];     /* an API key of each caller's own */
    char org[64];
    account_t member; /* added and removed by the org admin */
    account_t login_user;
    char refresh[256]; /* the login user's live refresh token (rotated by every refresh) */
    char user[64];     /* read and renamed by the admin */
    char victim[64];   /* deleted by the admin */
    char policy[64];   /* a policy rule the admin reads, changes and deletes */
    char agent[64];    /* the seeded assistant, which everyone may chat with */
    char oagent[64];   /* an agent of the organization (with oprompt) */
    char oprompt[64];  /* a prompt of the organization */
    char del_agent[N_CALLERS][64]; /* an agent of the organization each manager deletes */
    /* a conversation of each caller's own */
    char conv[N_CALLERS][64];
} world_t;

/* The value of placeholder name ("{org}" without braces, len characters), or NULL. */
static const char *placeholder(const world_t *w, int caller, const char *uniq, const char *name,
                               size_t len)
{
    const struct {
        const char *name;
        const char *value;
    } values[] = {
        {"org", w->org},
        {"member", w->member.id},
        {"member_email", w->member.email},
        {"key", w->key[caller]},
        {"user", w->user},
        {"victim", w->victim},
        {"uniq", uniq},
        {"login_email", w->login_user.email},
        {"refresh", w->refresh},
        {"password", PASSWORD},
        {"policy", w->policy},
        {"agent", w->agent},
        {"conv", w->conv[caller]},
        {"oagent", w->oagent},
        {"oprompt", w->oprompt},
        {"del_agent", w->del_agent[caller]},
    };
    for (size_t i = 0; i < sizeof(values) / sizeof(values[0]); i++)
        if (strlen(values[i].name) == len && strncmp(values[i].name, name, len) == 0)
            return values[i].value;
    return NULL;
}

/* Expands the placeholders of tmpl into out; a '{' not followed by a letter is JSON. */
static void expand(const world_t *w, int caller, int uniq, const char *tmpl, char *out,
                   size_t outlen)
{
    char num[16];
    snprintf(num, sizeof(num), "%d", uniq);
    size_t n = 0;
    for (const char *p = tmpl; *p != '\0';) {
        const char *val = p;
        size_t vlen = 1, skip = 1;
        if (p[0] == '{' && p[1] >= 'a' && p[1] <= 'z') {
            const char *end = strchr(p, '}');
            cr_assert_not_null(end, "unterminated placeholder in %s", tmpl);
            val = placeholder(w, caller, num, p + 1, (size_t)(end - p - 1));
            cr_assert_not_null(val, "unknown placeholder in %s", tmpl);
            vlen = strlen(val);
            skip = (size_t)(end - p + 1);
        }
        cr_assert(n + vlen < outlen, "expansion of %s too long", tmpl);
        memcpy(out + n, val, vlen);
        n += vlen;
        p += skip;
    }
    out[n] = '\0';
}

/* Builds the world: the callers in their states, the organization, the users acted on. */
static void build_world(world_t *w)
{
    account_t owner;
    memset(w, 0, sizeof(*w));
    register_user(&owner, "owner@matrix.example");
    create_org(&owner, "Acme", w->org, sizeof(w->org));

    register_user(&w->caller[C_USER], "user@matrix.example");
    register_user(&w->caller[C_MEMBER], "member@matrix.example");
    register_user(&w->caller[C_ORG_ADMIN], "orgadmin@matrix.example");
    register_user(&w->caller[C_DISABLED], "disabled@matrix.example");
    register_user(&w->caller[C_LOGGED_OUT], "signedout@matrix.example");
    make_admin(&w->caller[C_ADMIN], "admin@matrix.example");
    add_member(&owner, w->org, w->caller[C_MEMBER].email, "member");
    add_member(&owner, w->org, w->caller[C_ORG_ADMIN].email, "admin");

    register_user(&w->member, "target@matrix.example");
    register_user(&w->login_user, "login@matrix.example");
    bg_strlcpy(w->refresh, w->login_user.refresh, sizeof(w->refresh));
    bg_strlcpy(w->user, w->caller[C_USER].id, sizeof(w->user));
    account_t victim;
    register_user(&victim, "victim@matrix.example");
    bg_strlcpy(w->victim, victim.id, sizeof(w->victim));

    /* every caller with an account has a key of its own; nobody's is a key that does not exist */
    snprintf(w->key[C_ANON], sizeof(w->key[C_ANON]), "00000000-0000-4000-8000-000000000000");
    for (int c = C_USER; c < N_CALLERS; c++)
        create_key(&w->caller[c], "own", w->key[c], sizeof(w->key[c]));

    /* a policy rule for the /admin/policies/{id} rows */
    {
        bgt_resp_t pr;
        long pst = call(
            "POST", "/admin/policies", w->caller[C_ADMIN].access,
            "{\"type\":\"rate_limit\",\"scope\":\"global\",\"body\":{\"rpm\":1000,\"burst\":100}}",
            &pr);
        cr_assert_eq(pst, 201, "create policy: %ld %s", pst, pr.body);
        get_field(pr.body, (const char *const[]){"id", NULL}, w->policy, sizeof(w->policy));
        bgt_resp_free(&pr);
    }

    /* the organization admin makes a prompt and agents of the organization for the /admin/agents
     * and /admin/prompts rows; each manager deletes an agent of its own, the others are refused
     * before the agent is looked up */
    {
        char body[512];
        bgt_resp_t pr;
        snprintf(body, sizeof(body),
                 "{\"organization_id\":\"%s\",\"name\":\"Matrix prompt\","
                 "\"definition\":{\"system\":\"Hello {{builtin.user_name}}\"}}",
                 w->org);
        long pst = call("POST", "/admin/prompts", w->caller[C_ORG_ADMIN].access, body, &pr);
        cr_assert_eq(pst, 201, "create prompt: %ld %s", pst, pr.body);
        get_field(pr.body, (const char *const[]){"id", NULL}, w->oprompt, sizeof(w->oprompt));
        bgt_resp_free(&pr);
        const char *slugs[] = {"matrix-agent", "matrix-del-1", "matrix-del-2"};
        char ids[3][64];
        for (int i = 0; i < 3; i++) {
            snprintf(body, sizeof(body),
                     "{\"organization_id\":\"%s\",\"slug\":\"%s\",\"name\":\"Matrix\","
                     "\"prompt_id\":\"%s\"}",
                     w->org, slugs[i], w->oprompt);
            long ast = call("POST", "/admin/agents", w->caller[C_ORG_ADMIN].access, body, &pr);
            cr_assert_eq(ast, 201, "create agent: %ld %s", ast, pr.body);
            get_field(pr.body, (const char *const[]){"id", NULL}, ids[i], sizeof(ids[i]));
            bgt_resp_free(&pr);
        }
        bg_strlcpy(w->oagent, ids[0], sizeof(w->oagent));
        for (int c = 0; c < N_CALLERS; c++)
            bg_strlcpy(w->del_agent[c], ids[0], sizeof(w->del_agent[c]));
        bg_strlcpy(w->del_agent[C_ORG_ADMIN], ids[1], sizeof(w->del_agent[C_ORG_ADMIN]));
        bg_strlcpy(w->del_agent[C_ADMIN], ids[2], sizeof(w->del_agent[C_ADMIN]));
    }

    /* a conversation of each caller's own with the assistant, for the /chat/conversations rows */
    {
        bgt_resp_t ar;
        long ast = call("GET", "/agents", w->caller[C_USER].access, NULL, &ar);
        cr_assert_eq(ast, 200, "agents: %ld %s", ast, ar.body);
        bg_json_doc_t *adoc = NULL;
        const char *desc, *aid = NULL;
        size_t off, alen = 0;
        cr_assert_eq(bg_json_parse(ar.body, strlen(ar.body), NULL, &adoc, &desc, &off), 0);
        const bg_json_t *data = bg_json_find(bg_json_root(adoc), "data");
        for (size_t i = 0; i < bg_json_len(data) && aid == NULL; i++) {
            const char *slug = bg_json_str(bg_json_find(bg_json_at(data, i), "slug"), NULL);
            if (slug != NULL && strcmp(slug, "assistant") == 0)
                aid = bg_json_str(bg_json_find(bg_json_at(data, i), "id"), &alen);
        }
        cr_assert(aid != NULL && alen < sizeof(w->agent), "no assistant in %s", ar.body);
        memcpy(w->agent, aid, alen);
        w->agent[alen] = '\0';
        bg_json_doc_free(adoc);
        bgt_resp_free(&ar);
        snprintf(w->conv[C_ANON], sizeof(w->conv[C_ANON]), "00000000-0000-4000-8000-000000000000");
        char cbody[128];
        snprintf(cbody, sizeof(cbody), "{\"agent_id\":\"%s\"}", w->agent);
        for (int c = C_USER; c < N_CALLERS; c++) {
            bgt_resp_t cr;
            long cst = call("POST", "/chat/conversations", w->caller[c].access, cbody, &cr);
            cr_assert_eq(cst, 201, "create conversation: %ld %s", cst, cr.body);
            get_field(cr.body, (const char *const[]){"id", NULL}, w->conv[c], sizeof(w->conv[c]));
            bgt_resp_free(&cr);
        }
    }

    /* then the two whose tokens must stop working */
    char path[160];
    snprintf(path, sizeof(path), "/admin/users/%.63s", w->caller[C_DISABLED].id);
    bgt_resp_t r;
    long st = call("PUT", path, w->caller[C_ADMIN].access, "{\"status\":\"disabled\"}", &r);
    cr_assert_eq(st, 200, "disable: %ld %s", st, r.body);
    cr_assert(strstr(r.body, "\"status\":\"disabled\"") != NULL, "%s", r.body);
    bgt_resp_free(&r);
    call_expect("POST", "/auth/logout", w->caller[C_LOGGED_OUT].access, "{}", 204);
}

Test(authz, every_route_answers_every_caller_as_the_matrix_says, .timeout = 240)
{
    world_t *w = calloc(1, sizeof(*w));
    cr_assert_not_null(w);
    build_world(w);

    size_t failures = 0;
    for (size_t i = 0; i < sizeof(matrix) / sizeof(matrix[0]); i++) {
        const row_t *row = &matrix[i];
        for (int c = 0; c < N_CALLERS; c++) {
            int uniq = (int)i * 100 + c;
            char path[512], body[1024];
            expand(w, c, uniq, row->path, path, sizeof(path));
            if (row->body != NULL)
                expand(w, c, uniq, row->body, body, sizeof(body));
            bgt_resp_t r;
            long want = row->expect[c];
            long got =
                call(row->method, path, w->caller[c].access, row->body != NULL ? body : NULL, &r);
            /* /v1 errors are OpenAI's, whose 401 code is invalid_api_key */
            bool openai = strncmp(row->pattern, "/v1/", 4) == 0;
            const char *code = !openai ? code_for(want) : want == 401 ? "invalid_api_key" : NULL;
            /* a Paddle notification proves itself by its signature, not by a user */
            if (strcmp(row->pattern, "/webhooks/paddle") == 0 && want == 401)
                code = "invalid_signature";
            bool ok = got == want && (code == NULL || has_code(r.body, code));
            cr_expect(ok, "%s %s as %s: %ld (expected %ld%s%s): %.300s", row->method, row->pattern,
                      caller_names[c], got, want, code != NULL ? " " : "", code != NULL ? code : "",
                      r.body);
            failures += !ok;
            /* the refresh token rotates: the next caller presents the new one */
            if (strcmp(row->pattern, "/auth/refresh") == 0 && got == 200)
                get_field(r.body, (const char *const[]){"refresh_token", NULL}, w->refresh,
                          sizeof(w->refresh));
            bgt_resp_free(&r);
        }
    }
    cr_log_info("authz matrix: %zu rows x %d callers, %zu mismatches",
                sizeof(matrix) / sizeof(matrix[0]), N_CALLERS, failures);
    free(w);
}

/* ---- the matrix covers the route tables ---- */

static bool in_matrix(const edge_route_t *route)
{
    for (size_t i = 0; i < sizeof(matrix) / sizeof(matrix[0]); i++)
        if (strcmp(matrix[i].method, route->method) == 0 &&
            strcmp(matrix[i].pattern, route->pattern) == 0)
            return true;
    return false;
}

Test(authz_routes, every_route_has_a_matrix_row)
{
    size_t routes = 0;
    /* every table the router serves, so a new table is covered without touching this test */
    for (size_t t = 0; edge_route_tables[t] != NULL; t++) {
        for (const edge_route_t *r = edge_route_tables[t]; r->pattern != NULL; r++) {
            routes++;
            cr_expect(in_matrix(r),
                      "%s %s has no row in test/e2e/test_authz_matrix.c: add one with the "
                      "status every caller must get",
                      r->method, r->pattern);
            bool known = false;
            for (size_t k = 0; k < sizeof(known_prefixes) / sizeof(known_prefixes[0]); k++)
                known =
                    known || strncmp(r->pattern, known_prefixes[k], strlen(known_prefixes[k])) == 0;
            cr_expect(known, "%s %s: a path family the authorization matrix does not know",
                      r->method, r->pattern);
        }
    }
    /* and no row tests a route that is gone */
    for (size_t i = 0; i < sizeof(matrix) / sizeof(matrix[0]); i++) {
        bool found = false;
        for (size_t t = 0; edge_route_tables[t] != NULL && !found; t++)
            for (const edge_route_t *r = edge_route_tables[t]; r->pattern != NULL && !found; r++)
                found = strcmp(matrix[i].method, r->method) == 0 &&
                        strcmp(matrix[i].pattern, r->pattern) == 0;
        cr_expect(found, "matrix row %s %s matches no route", matrix[i].method, matrix[i].pattern);
    }
    cr_expect_eq(routes, sizeof(matrix) / sizeof(matrix[0]), "%zu routes, %zu matrix rows", routes,
                 sizeof(matrix) / sizeof(matrix[0]));
}

/* ---- another user's resources ---- */

Test(authz, another_users_resources_answer_404)
{
    account_t alice, bob, member, outsider, other;
    register_user(&alice, "alice@owner.example");
    register_user(&bob, "bob@other.example");
    register_user(&member, "member@owner.example");
    register_user(&outsider, "outsider@other.example");
    register_user(&other, "other@owner.example");
    char org[64], path[256];
    create_org(&alice, "Alice Inc", org, sizeof(org));
    add_member(&alice, org, member.email, "member");
    add_member(&alice, org, other.email, "member");

    /* an organization you are not in looks exactly like one that does not exist */
    bgt_resp_t r, none;
    snprintf(path, sizeof(path), "/orgs/%s", org);
    cr_assert_eq(call("GET", path, bob.access, NULL, &r), 404, "%s", r.body);
    cr_assert(has_code(r.body, "not_found"), "%s", r.body);
    cr_assert_eq(call("GET", "/orgs/7d444840-9dc0-41d7-8e5f-bd25a1e43c61", bob.access, NULL, &none),
                 404, "%s", none.body);
    cr_assert(has_code(none.body, "not_found"), "%s", none.body);
    bgt_resp_free(&none);
    bgt_resp_free(&r);
    snprintf(path, sizeof(path), "/orgs/%s", alice.org); /* a personal organization too */
    call_expect("GET", path, bob.access, NULL, 404);
    call_expect("GET", path, alice.access, NULL, 200);

    /* another user's API key: 404, and it stays */
    char key[64];
    create_key(&alice, "alice's", key, sizeof(key));
    snprintf(path, sizeof(path), "/auth/api-keys/%s", key);
    bgt_resp_t del;
    cr_assert_eq(call("DELETE", path, bob.access, NULL, &del), 404, "%s", del.body);
    cr_assert(has_code(del.body, "not_found"), "%s", del.body);
    bgt_resp_free(&del);
    bgt_resp_t list;
    cr_assert_eq(call("GET", "/auth/api-keys", alice.access, NULL, &list), 200);
    cr_assert(strstr(list.body, key) != NULL, "bob's DELETE removed alice's key: %s", list.body);
    bgt_resp_free(&list);
    call_expect("DELETE", path, alice.access, NULL, 204);
    call_expect("DELETE", path, alice.access, NULL, 404); /* gone now */

    /* removing a member: a plain member may not (403), a non-member does not see the org (404) */
    snprintf(path, sizeof(path), "/orgs/%s/members/%s", org, other.id);
    bgt_resp_t rm;
    cr_assert_eq(call("DELETE", path, member.access, NULL, &rm), 403, "%s", rm.body);
    cr_assert(has_code(rm.body, "forbidden"), "%s", rm.body);
    bgt_resp_free(&rm);
    cr_assert_eq(call("DELETE", path, outsider.access, NULL, &rm), 404, "%s", rm.body);
    cr_assert(has_code(rm.body, "not_found"), "%s", rm.body);
    bgt_resp_free(&rm);
    snprintf(path, sizeof(path), "/orgs/%s", org);
    cr_assert_eq(call("GET", path, alice.access, NULL, &rm), 200);
    cr_assert(strstr(rm.body, other.id) != NULL, "the member was removed anyway: %s", rm.body);
    bgt_resp_free(&rm);

    /*
     * Adding a member to an organization one is not in: 404 for the organization, never a hint
     * about the user named (who exists here).
     */
    snprintf(path, sizeof(path), "/orgs/%s/members", org);
    char body[256];
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"role\":\"member\"}", outsider.email);
    bgt_resp_t add;
    cr_assert_eq(call("POST", path, outsider.access, body, &add), 404, "%s", add.body);
    cr_expect(strstr(add.body, "unknown_user") == NULL,
              "POST %s by a non-member names an existing user unknown: %s", path, add.body);
    bgt_resp_free(&add);
    cr_assert_eq(call("POST", path, member.access, body, &add), 403, "%s", add.body);
    bgt_resp_free(&add);
}

/* ---- the admin users API ---- */

static long long audit_count(const char *action, const char *target_id)
{
    PGconn *c = PQconnectdb(S.db.url);
    cr_assert_eq(PQstatus(c), CONNECTION_OK, "%s", PQerrorMessage(c));
    const char *p[] = {action, target_id};
    PGresult *res = PQexecParams(c,
                                 "SELECT count(*) FROM audit_log WHERE action = $1 "
                                 "AND target_type = 'user' AND target_id = $2",
                                 2, NULL, p, NULL, NULL, 0);
    long long n = -1;
    if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1)
        n = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    else
        cr_log_error("audit query: %s", PQerrorMessage(c));
    PQclear(res);
    PQfinish(c);
    return n;
}

/* Waits for the next second of the wall clock: a not-before mark set in this second refuses tokens
 * issued in it (token times have whole seconds). */
static void next_second(void)
{
    struct timespec ts;
    cr_assert_eq(clock_gettime(CLOCK_REALTIME, &ts), 0);
    time_t now = ts.tv_sec;
    do {
        usleep(50 * 1000);
        cr_assert_eq(clock_gettime(CLOCK_REALTIME, &ts), 0);
    } while (ts.tv_sec < now + 1);
}

/* Pages through GET /admin/users?q=…&limit=… and returns the users seen (ids into ids). */
static size_t list_all(const account_t *admin, const char *q, int limit, char ids[][64], size_t max,
                       size_t *pages)
{
    char cursor[256] = "";
    size_t n = 0;
    *pages = 0;
    for (;;) {
        char path[512];
        snprintf(path, sizeof(path), "/admin/users?q=%s&limit=%d%s%s", q, limit,
                 cursor[0] != '\0' ? "&cursor=" : "", cursor);
        bgt_resp_t r;
        cr_assert_eq(call("GET", path, admin->access, NULL, &r), 200, "%s: %s", path, r.body);
        (*pages)++;
        bg_json_doc_t *doc = NULL;
        const char *desc;
        size_t off;
        cr_assert_eq(bg_json_parse(r.body, r.body_len, NULL, &doc, &desc, &off), 0, "%s", r.body);
        const bg_json_t *data = bg_json_find(bg_json_root(doc), "data");
        cr_assert(data != NULL && bg_json_is_array(data), "%s", r.body);
        cr_assert(bg_json_len(data) <= (size_t)limit, "page larger than limit %d: %s", limit,
                  r.body);
        for (size_t i = 0; i < bg_json_len(data); i++) {
            const char *id = bg_json_str(bg_json_find(bg_json_at(data, i), "id"), NULL);
            const char *email = bg_json_str(bg_json_find(bg_json_at(data, i), "email"), NULL);
            cr_assert(id != NULL && email != NULL, "%s", r.body);
            cr_assert(strcasestr(email, q) != NULL, "?q=%s matched %s", q, email);
            for (size_t k = 0; k < n; k++)
                cr_assert_str_neq(ids[k], id, "user %s listed twice across pages", id);
            cr_assert(n < max);
            bg_strlcpy(ids[n++], id, 64);
        }
        const bg_json_t *next = bg_json_find(bg_json_root(doc), "next_cursor");
        cr_assert_not_null(next, "no next_cursor: %s", r.body);
        const char *nc = bg_json_str(next, NULL);
        bool more = nc != NULL && nc[0] != '\0';
        if (more)
            cr_assert(bg_strlcpy(cursor, nc, sizeof(cursor)), "cursor too long: %s", nc);
        bg_json_doc_free(doc);
        bgt_resp_free(&r);
        if (!more)
            break;
        cr_assert(*pages < 20, "pagination does not end");
    }
    return n;
}

Test(authz, admin_lists_searches_and_pages_users)
{
    account_t admin, u;
    make_admin(&admin, "root@admin.example");
    char email[128];
    for (int i = 0; i < 5; i++) {
        snprintf(email, sizeof(email), "pager-%d@search.example", i);
        register_user(&u, email);
    }
    register_user(&u, "unrelated@else.example");

    char ids[16][64];
    size_t pages;
    size_t n = list_all(&admin, "pager", 2, ids, 16, &pages);
    cr_expect_eq(n, 5, "?q=pager&limit=2 found %zu users", n);
    cr_expect_eq(pages, 3, "5 users at 2 a page took %zu pages", pages);
    n = list_all(&admin, "PAGER-3", 2, ids, 16, &pages); /* case-insensitive */
    cr_expect_eq(n, 1, "?q=PAGER-3 found %zu users", n);
    n = list_all(&admin, "nobody-like-this", 10, ids, 16, &pages);
    cr_expect_eq(n, 0);
    n = list_all(&admin, "example", 100, ids, 16, &pages);
    cr_expect_eq(n, 7, "every user (5 + 1 + the admin) is listed: %zu", n);

    bgt_resp_t r;
    cr_assert_eq(call("GET", "/admin/users?limit=0", admin.access, NULL, &r), 422, "%s", r.body);
    bgt_resp_free(&r);
    cr_assert_eq(call("GET", "/admin/users?cursor=not-a-cursor", admin.access, NULL, &r), 400,
                 "a forged cursor: %s", r.body);
    bgt_resp_free(&r);
}

Test(authz, admin_changes_role_and_status_with_audit_rows)
{
    account_t admin, promoted, disabled, again;
    make_admin(&admin, "root@admin.example");
    register_user(&promoted, "promoted@users.example");
    register_user(&disabled, "disabled@users.example");
    char path[160];

    /* role: the old token (role user) dies, a new sign-in has the admin role */
    call_expect("GET", "/admin/users", promoted.access, NULL, 403);
    snprintf(path, sizeof(path), "/admin/users/%s", promoted.id);
    long long before = audit_count("user.update", promoted.id);
    bgt_resp_t r;
    cr_assert_eq(call("PUT", path, admin.access, "{\"role\":\"admin\"}", &r), 200, "%s", r.body);
    cr_assert(strstr(r.body, "\"role\":\"admin\"") != NULL, "%s", r.body);
    bgt_resp_free(&r);
    cr_expect_eq(audit_count("user.update", promoted.id), before + 1, "no audit row for the role");
    call_expect("GET", "/auth/profile", promoted.access, NULL, 401);
    next_second();
    cr_assert_eq(sign_in(&again, promoted.email), 200);
    call_expect("GET", "/admin/users", again.access, NULL, 200);

    /* status: disabled refuses the old token and sign-in; active again lets them back */
    snprintf(path, sizeof(path), "/admin/users/%s", disabled.id);
    cr_assert_eq(call("PUT", path, admin.access, "{\"status\":\"disabled\"}", &r), 200, "%s",
                 r.body);
    cr_assert(strstr(r.body, "\"status\":\"disabled\"") != NULL, "%s", r.body);
    bgt_resp_free(&r);
    cr_expect_eq(audit_count("user.disable", disabled.id), 1, "no audit row for disabling");
    call_expect("GET", "/auth/profile", disabled.access, NULL, 401);
    char body[320];
    snprintf(body, sizeof(body), "{\"refresh_token\":\"%s\"}", disabled.refresh);
    call_expect("POST", "/auth/refresh", NULL, body, 401);
    cr_assert_eq(sign_in(&again, disabled.email), 403, "a disabled user signed in");
    before = audit_count("user.update", disabled.id);
    call_expect("PUT", path, admin.access, "{\"status\":\"active\"}", 200);
    cr_expect_eq(audit_count("user.update", disabled.id), before + 1, "no audit row for enabling");
    next_second();
    cr_assert_eq(sign_in(&again, disabled.email), 200, "re-enabled user cannot sign in");
    call_expect("GET", "/auth/profile", again.access, NULL, 200);

    /* invalid values and self-lockout */
    call_expect("PUT", path, admin.access, "{\"role\":\"root\"}", 422);
    call_expect("PUT", path, admin.access, "{\"status\":\"gone\"}", 422);
    snprintf(path, sizeof(path), "/admin/users/%s", admin.id);
    call_expect("PUT", path, admin.access, "{\"role\":\"user\"}", 409);
    call_expect("PUT", "/admin/users/6b3c0a0e-4a5e-4e0e-9d44-0f3c9a1d2b7e", admin.access,
                "{\"name\":\"x\"}", 404);
}

/*
 * A role change ends the user's sessions everywhere (a not-before mark in Redis), but the user's
 * next sign-in must work at once: the mark must not refuse the token issued after it, even within
 * the same second.
 */
Test(authz, a_sign_in_right_after_a_role_change_is_accepted)
{
    account_t admin, promoted, again;
    make_admin(&admin, "root@admin.example");
    register_user(&promoted, "promoted@users.example");
    char path[160];
    snprintf(path, sizeof(path), "/admin/users/%s", promoted.id);
    call_expect("PUT", path, admin.access, "{\"role\":\"admin\"}", 200);
    cr_assert_eq(sign_in(&again, promoted.email), 200);
    bgt_resp_t r;
    long st = call("GET", "/admin/users", again.access, NULL, &r);
    cr_expect_eq(st, 200,
                 "GET /admin/users with the token of a sign-in made right after the promotion: "
                 "%ld (expected 200): %s",
                 st, r.body);
    bgt_resp_free(&r);
}

Test(authz, admin_delete_is_a_soft_delete)
{
    account_t admin, gone, tmp;
    make_admin(&admin, "root@admin.example");
    register_user(&gone, "gone@users.example");
    char path[160];
    snprintf(path, sizeof(path), "/admin/users/%s", gone.id);

    call_expect("DELETE", path, admin.access, NULL, 204);
    cr_expect_eq(audit_count("user.delete", gone.id), 1, "no audit row for the deletion");
    cr_assert_eq(sign_in(&tmp, gone.email), 401, "a deleted user signed in");
    call_expect("GET", "/auth/profile", gone.access, NULL, 401);
    char body[320];
    snprintf(body, sizeof(body), "{\"refresh_token\":\"%s\"}", gone.refresh);
    call_expect("POST", "/auth/refresh", NULL, body, 401);

    bgt_resp_t r;
    cr_assert_eq(call("GET", path, admin.access, NULL, &r), 200, "%s", r.body);
    cr_assert(strstr(r.body, "\"deleted\":true") != NULL, "%s", r.body);
    cr_assert(strstr(r.body, gone.email) != NULL, "%s", r.body);
    bgt_resp_free(&r);
    call_expect("DELETE", path, admin.access, NULL, 404); /* already deleted */

    snprintf(path, sizeof(path), "/admin/users/%s", admin.id);
    call_expect("DELETE", path, admin.access, NULL, 409); /* not oneself */
}
