/*
 * The web chat's REST API end to end: the real bg-edge over HTTP/2 (h2c) against a private Redis
 * and a migrated database. A user finds the seeded assistant in GET /agents, starts conversations
 * with it, lists them page by page, reads, renames and deletes one and reads its (empty) messages;
 * another user gets 404 for all of it; and bad input is a 422 naming the field, never a 500.
 */
#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/common.h"
#include "bg/json.h"
#include "bgtest.h"

#define PASSWORD "Chat-Horse-Battery-42"

static struct {
    bgt_redis_t redis;
    bgt_pg_t db;
    char dir[256], log[300], base[64];
    int port;
    pid_t pid;
} S;

static void setup(void)
{
    memset(&S, 0, sizeof(S));
    cr_assert_eq(bgt_pg_create(&S.db, true), 0);
    cr_assert_eq(bgt_redis_start(&S.redis), 0);
    cr_assert_eq(bgt_tempdir(S.dir, sizeof(S.dir)), 0);
    snprintf(S.log, sizeof(S.log), "%s/edge.log", S.dir);
    S.port = bgt_free_port();
    snprintf(S.base, sizeof(S.base), "http://127.0.0.1:%d", S.port);
    static char env_store[3][600];
    snprintf(env_store[0], 600, "BG_HTTP_PORT=%d", S.port);
    snprintf(env_store[1], 600, "BG_REDIS_URL=%s", S.redis.url);
    snprintf(env_store[2], 600, "BG_DATABASE_URL=%s", S.db.url);
    const char *env[] = {env_store[0],
                         env_store[1],
                         env_store[2],
                         "BG_HTTPS_PORT=0",
                         "BG_ENV_FILE=/nonexistent",
                         "BG_EDGE_THREADS=2",
                         "BG_LOG_FORMAT=text",
                         "BG_LOG_LEVEL=info",
                         "BG_JWT_SECRET=0123456789abcdef0123456789abcdef-chat-api",
                         NULL};
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

TestSuite(chat_api, .init = setup, .fini = teardown, .timeout = 120);

/* One h2c request with the token (may be NULL) and the JSON body (may be NULL). */
static long call(const char *method, const char *path, const char *token, const char *body,
                 bgt_resp_t *r)
{
    char url[1024], authz[2100];
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
    cr_assert_eq(r->version, 2, "%s %s: spoke HTTP/%ld", method, path, r->version);
    return r->status;
}

/* call() expecting want; returns the body (owned) for further checks. */
static char *expect(const char *method, const char *path, const char *token, const char *body,
                    long want)
{
    bgt_resp_t r;
    long got = call(method, path, token, body, &r);
    cr_assert_eq(got, want, "%s %s: %ld (expected %ld): %s", method, path, got, want, r.body);
    char *text = strdup(r.body != NULL ? r.body : "");
    bgt_resp_free(&r);
    cr_assert_not_null(text);
    return text;
}

/* call() expecting a 422 naming field (details.fields[0].field). */
static void expect_invalid(const char *method, const char *path, const char *token,
                           const char *body, const char *field)
{
    char *text = expect(method, path, token, body, 422);
    char want[96];
    snprintf(want, sizeof(want), "\"field\":\"%s\"", field);
    cr_expect(strstr(text, "\"code\":\"validation_failed\"") != NULL, "%s", text);
    cr_expect(strstr(text, want) != NULL, "%s %s: no %s in %s", method, path, want, text);
    free(text);
}

static void expect_not_found(const char *method, const char *path, const char *token,
                             const char *body)
{
    char *text = expect(method, path, token, body, 404);
    cr_expect(strstr(text, "\"code\":\"not_found\"") != NULL, "%s", text);
    free(text);
}

static const bg_json_t *parse(const char *text, bg_json_doc_t **doc)
{
    const char *desc;
    size_t off;
    *doc = NULL;
    cr_assert_eq(bg_json_parse(text, strlen(text), NULL, doc, &desc, &off), 0, "not JSON: %s",
                 text);
    return bg_json_root(*doc);
}

/* Copies string member key of object v into out; fails the test when absent. */
static void str_of(const bg_json_t *v, const char *key, char *out, size_t outlen)
{
    size_t len = 0;
    const char *s = bg_json_str(bg_json_find(v, key), &len);
    cr_assert(s != NULL && len < outlen, "no string %s", key);
    memcpy(out, s, len);
    out[len] = '\0';
}

static void register_user(const char *email, char *token, size_t tokenlen)
{
    char body[512];
    snprintf(body, sizeof(body), "{\"email\":\"%s\",\"password\":\"" PASSWORD "\"}", email);
    char *text = expect("POST", "/auth/register", NULL, body, 201);
    bg_json_doc_t *doc;
    str_of(parse(text, &doc), "access_token", token, tokenlen);
    bg_json_doc_free(doc);
    free(text);
}

/* The assistant's id from GET /agents. */
static void assistant_id(const char *token, char id[64])
{
    char *text = expect("GET", "/agents", token, NULL, 200);
    bg_json_doc_t *doc;
    const bg_json_t *data = bg_json_find(parse(text, &doc), "data");
    id[0] = '\0';
    for (size_t i = 0; i < bg_json_len(data); i++) {
        char slug[64];
        str_of(bg_json_at(data, i), "slug", slug, sizeof(slug));
        if (strcmp(slug, "assistant") == 0) {
            str_of(bg_json_at(data, i), "id", id, 64);
            char name[64], model[256];
            str_of(bg_json_at(data, i), "name", name, sizeof(name));
            str_of(bg_json_at(data, i), "model", model, sizeof(model));
            cr_expect_str_eq(name, "Assistant");
            cr_expect(bg_json_find(bg_json_at(data, i), "description") != NULL, "%s", text);
        }
    }
    cr_assert(id[0] != '\0', "no assistant in %s", text);
    cr_assert(bg_json_find(bg_json_root(doc), "next_cursor") != NULL, "%s", text);
    bg_json_doc_free(doc);
    free(text);
}

/* Starts a conversation (title may be NULL); writes its id. */
static void start(const char *token, const char *agent, const char *title, char id[64])
{
    char body[512];
    if (title != NULL)
        snprintf(body, sizeof(body), "{\"agent_id\":\"%s\",\"title\":\"%s\"}", agent, title);
    else
        snprintf(body, sizeof(body), "{\"agent_id\":\"%s\"}", agent);
    char *text = expect("POST", "/chat/conversations", token, body, 201);
    bg_json_doc_t *doc;
    const bg_json_t *root = parse(text, &doc);
    str_of(root, "id", id, 64);
    char got_agent[64], got_title[256], created[64];
    str_of(root, "agent_id", got_agent, sizeof(got_agent));
    str_of(root, "title", got_title, sizeof(got_title));
    str_of(root, "created_at", created, sizeof(created));
    cr_expect_str_eq(got_agent, agent);
    cr_expect_str_eq(got_title, title != NULL ? title : "");
    cr_expect(strlen(created) == 20 && created[19] == 'Z', "not RFC 3339 UTC: %s", created);
    bg_json_doc_free(doc);
    free(text);
}

Test(chat_api, create_list_read_rename_delete)
{
    char token[2048], agent[64], a[64], b[64], path[256];
    register_user("crud@chat.example", token, sizeof(token));
    assistant_id(token, agent);
    start(token, agent, "First", a);
    start(token, agent, NULL, b);

    /* newest activity first: b, then a */
    char *text = expect("GET", "/chat/conversations", token, NULL, 200);
    bg_json_doc_t *doc;
    const bg_json_t *root = parse(text, &doc);
    const bg_json_t *data = bg_json_find(root, "data");
    cr_assert_eq(bg_json_len(data), 2, "%s", text);
    char id[64];
    str_of(bg_json_at(data, 0), "id", id, sizeof(id));
    cr_expect_str_eq(id, b);
    str_of(bg_json_at(data, 1), "id", id, sizeof(id));
    cr_expect_str_eq(id, a);
    cr_expect_eq(bg_json_type(bg_json_find(root, "next_cursor")), BG_JSON_NULL, "%s", text);
    bg_json_doc_free(doc);
    free(text);

    snprintf(path, sizeof(path), "/chat/conversations/%s", a);
    text = expect("GET", path, token, NULL, 200);
    cr_expect(strstr(text, "\"title\":\"First\"") != NULL, "%s", text);
    cr_expect(strstr(text, "\"message_count\":0") != NULL, "%s", text);
    cr_expect(strstr(text, "\"last_message_at\":null") != NULL, "%s", text);
    free(text);

    text = expect("PATCH", path, token, "{\"title\":\"Renamed ✓\"}", 200);
    cr_expect(strstr(text, "\"title\":\"Renamed ✓\"") != NULL, "%s", text);
    free(text);
    text = expect("GET", path, token, NULL, 200);
    cr_expect(strstr(text, "\"title\":\"Renamed ✓\"") != NULL, "%s", text);
    free(text);

    snprintf(path, sizeof(path), "/chat/conversations/%s/messages", a);
    text = expect("GET", path, token, NULL, 200);
    cr_expect_str_eq(text, "{\"data\":[],\"next_cursor\":null}");
    free(text);
    snprintf(path, sizeof(path), "/chat/conversations/%s/messages?order=desc&limit=5", a);
    text = expect("GET", path, token, NULL, 200);
    cr_expect_str_eq(text, "{\"data\":[],\"next_cursor\":null}");
    free(text);

    snprintf(path, sizeof(path), "/chat/conversations/%s", a);
    free(expect("DELETE", path, token, NULL, 204));
    expect_not_found("GET", path, token, NULL);
    expect_not_found("DELETE", path, token, NULL);
    expect_not_found("PATCH", path, token, "{\"title\":\"back\"}");
    snprintf(path, sizeof(path), "/chat/conversations/%s/messages", a);
    expect_not_found("GET", path, token, NULL);

    text = expect("GET", "/chat/conversations", token, NULL, 200);
    cr_expect(strstr(text, a) == NULL && strstr(text, b) != NULL, "%s", text);
    free(text);
}

Test(chat_api, pages_cover_every_conversation_once)
{
    char token[2048], agent[64], ids[7][64];
    register_user("pages@chat.example", token, sizeof(token));
    assistant_id(token, agent);
    for (int i = 0; i < 7; i++)
        start(token, agent, NULL, ids[i]);

    bool seen[7] = {false};
    int total = 0, pages = 0;
    char cursor[256] = "";
    do {
        char path[512];
        snprintf(path, sizeof(path), "/chat/conversations?limit=3%s%s", cursor[0] ? "&cursor=" : "",
                 cursor);
        char *text = expect("GET", path, token, NULL, 200);
        bg_json_doc_t *doc;
        const bg_json_t *root = parse(text, &doc);
        const bg_json_t *data = bg_json_find(root, "data");
        cr_assert_leq(bg_json_len(data), 3);
        for (size_t i = 0; i < bg_json_len(data); i++) {
            char id[64];
            str_of(bg_json_at(data, i), "id", id, sizeof(id));
            int k = -1;
            for (int j = 0; j < 7; j++)
                if (strcmp(ids[j], id) == 0)
                    k = j;
            cr_assert(k >= 0 && !seen[k], "unknown or repeated %s", id);
            seen[k] = true;
            total++;
        }
        size_t len = 0;
        const char *next = bg_json_str(bg_json_find(root, "next_cursor"), &len);
        cr_assert(next == NULL || len < sizeof(cursor));
        if (next != NULL)
            memcpy(cursor, next, len + 1);
        else
            cursor[0] = '\0';
        bg_json_doc_free(doc);
        free(text);
        pages++;
    } while (cursor[0] != '\0' && pages < 10);
    cr_expect_eq(total, 7);
    cr_expect_eq(pages, 3);
}

Test(chat_api, another_users_conversation_is_404)
{
    char alice[2048], bob[2048], agent[64], conv[64], path[256];
    register_user("alice@chat.example", alice, sizeof(alice));
    register_user("bob@chat.example", bob, sizeof(bob));
    assistant_id(alice, agent);
    start(alice, agent, "Secret plans", conv);

    snprintf(path, sizeof(path), "/chat/conversations/%s", conv);
    expect_not_found("GET", path, bob, NULL);
    expect_not_found("PATCH", path, bob, "{\"title\":\"Mine\"}");
    expect_not_found("DELETE", path, bob, NULL);
    snprintf(path, sizeof(path), "/chat/conversations/%s/messages", conv);
    expect_not_found("GET", path, bob, NULL);
    char *text = expect("GET", "/chat/conversations", bob, NULL, 200);
    cr_expect_str_eq(text, "{\"data\":[],\"next_cursor\":null}");
    free(text);

    /* malformed ids are plain 404s too */
    expect_not_found("GET", "/chat/conversations/not-a-uuid", alice, NULL);
    expect_not_found("DELETE", "/chat/conversations/123", alice, NULL);
    expect_not_found("GET", "/chat/conversations/%27%3B--/messages", alice, NULL);

    /* untouched */
    snprintf(path, sizeof(path), "/chat/conversations/%s", conv);
    text = expect("GET", path, alice, NULL, 200);
    cr_expect(strstr(text, "\"title\":\"Secret plans\"") != NULL, "%s", text);
    free(text);

    /* and nobody at all is 401 */
    free(expect("GET", path, NULL, NULL, 401));
    free(expect("GET", "/agents", NULL, NULL, 401));
}

Test(chat_api, bad_input_is_422_naming_the_field)
{
    char token[2048], agent[64], conv[64], path[256], body[1024];
    register_user("invalid@chat.example", token, sizeof(token));
    assistant_id(token, agent);
    start(token, agent, NULL, conv);

    expect_invalid("POST", "/chat/conversations", token, "{}", "agent_id");
    expect_invalid("POST", "/chat/conversations", token, "{\"agent_id\":\"assistant\"}",
                   "agent_id");
    expect_invalid("POST", "/chat/conversations", token, "{\"agent_id\":42}", "agent_id");
    snprintf(body, sizeof(body), "{\"agent_id\":\"%s\",\"title\":\"\"}", agent);
    expect_invalid("POST", "/chat/conversations", token, body, "title");
    char title[256];
    memset(title, 'x', 201);
    title[201] = '\0';
    snprintf(body, sizeof(body), "{\"agent_id\":\"%s\",\"title\":\"%s\"}", agent, title);
    expect_invalid("POST", "/chat/conversations", token, body, "title");
    snprintf(body, sizeof(body), "{\"agent_id\":\"%s\",\"model\":\"x\"}", agent);
    expect_invalid("POST", "/chat/conversations", token, body, "model");
    /* a well-formed id of no agent */
    char *text = expect("POST", "/chat/conversations", token,
                        "{\"agent_id\":\"00000000-0000-4000-8000-000000000001\"}", 404);
    cr_expect(strstr(text, "\"field\":\"agent_id\"") != NULL, "%s", text);
    free(text);
    free(expect("POST", "/chat/conversations", token, "{\"agent_id\":", 400));

    snprintf(path, sizeof(path), "/chat/conversations/%s", conv);
    expect_invalid("PATCH", path, token, "{}", "title");
    expect_invalid("PATCH", path, token, "{\"title\":\"\"}", "title");
    snprintf(body, sizeof(body), "{\"title\":\"%s\"}", title);
    expect_invalid("PATCH", path, token, body, "title");

    expect_invalid("GET", "/chat/conversations?limit=0", token, NULL, "limit");
    expect_invalid("GET", "/chat/conversations?limit=101", token, NULL, "limit");
    expect_invalid("GET", "/chat/conversations?limit=ten", token, NULL, "limit");
    expect_invalid("GET", "/chat/conversations?cursor=bm90LWEtY3Vyc29y", token, NULL, "cursor");
    expect_invalid("GET", "/chat/conversations?cursor=%25%25%25", token, NULL, "cursor");
    snprintf(path, sizeof(path), "/chat/conversations/%s/messages?order=sideways", conv);
    expect_invalid("GET", path, token, NULL, "order");
    snprintf(path, sizeof(path), "/chat/conversations/%s/messages?limit=-1", conv);
    expect_invalid("GET", path, token, NULL, "limit");
    snprintf(path, sizeof(path), "/chat/conversations/%s/messages?cursor=YXwx&order=desc", conv);
    expect_invalid("GET", path, token, NULL, "cursor"); /* "a|1": made for the other order */

    /* nothing was created by all that */
    text = expect("GET", "/chat/conversations", token, NULL, 200);
    bg_json_doc_t *doc;
    cr_expect_eq(bg_json_len(bg_json_find(parse(text, &doc), "data")), 1, "%s", text);
    bg_json_doc_free(doc);
    free(text);
}
