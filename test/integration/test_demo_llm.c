/*
 * bg-demo-llm, the OpenAI-compatible provider that `make run` and the tests use, as a client sees
 * it over HTTP: the model list, a completion whose text and usage are predictable, a stream that
 * parses the way openai-node parses it and adds up to the same text, the token rate, every "#fail:"
 * directive, and OpenAI's error bodies for bad requests. Each test starts its own server; nothing
 * here needs a database.
 */
#include <criterion/criterion.h>
#include <curl/curl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bg/json.h"
#include "bgtest.h"

/* The paragraph every reply ends with (see test/fakes/demo_llm/README.md). */
static const char LOREM[] =
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut "
    "labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco "
    "laboris nisi ut aliquip ex ea commodo consequat. Duis aute irure dolor in reprehenderit in "
    "voluptate velit esse cillum dolore eu fugiat nulla pariatur. Excepteur sint occaecat "
    "cupidatat "
    "non proident, sunt in culpa qui officia deserunt mollit anim id est laborum.";

typedef struct server {
    pid_t pid;
    int port;
} server_t;

static server_t demo; /* the server of the test: unpaced, no API key */
/* Every process a test starts, so that teardown stops them even when an assertion fails first
 * (a child left running would hold ctest's output pipe open). */
static server_t *servers[8];
static pid_t client_pid;

/*
 * Starts bg-demo-llm with extra arguments (NULL-terminated, may be NULL) and waits until GET
 * /v1/models answers want_status (401 when an API key is required).
 */
static void start_server(server_t *s, const char *const extra[], long want_status)
{
    char port[16];
    const char *argv[16] = {bgt_bin("bg-demo-llm"), "--port", port};
    int n = 3;
    s->port = bgt_free_port();
    snprintf(port, sizeof(port), "%d", s->port);
    for (int i = 0; extra != NULL && extra[i] != NULL && n < 15; i++)
        argv[n++] = extra[i];
    argv[n] = NULL;
    const char *env[] = {"BG_LOG_LEVEL=warn", "BG_LOG_FORMAT=text", NULL};
    s->pid = bgt_spawn(argv, env, NULL);
    cr_assert_gt(s->pid, 0, "cannot start bg-demo-llm");
    for (size_t i = 0; i < sizeof(servers) / sizeof(servers[0]); i++) {
        if (servers[i] == NULL || servers[i] == s) {
            servers[i] = s;
            break;
        }
    }
    char url[128];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/v1/models", s->port);
    cr_assert_eq(bgt_wait_http(url, want_status, 10000), 0, "bg-demo-llm does not answer on %s",
                 url);
}

/* Stops a server with SIGTERM; returns its wait status (0 when it was not running). */
static int stop_server(server_t *s)
{
    int st = 0;
    if (s->pid > 0)
        st = bgt_stop(s->pid, SIGTERM, 5000);
    s->pid = 0;
    return st;
}

static void setup(void)
{
    const char *extra[] = {"--tokens-per-second", "0", NULL};
    start_server(&demo, extra, 200);
}

/*
 * Stops every process the test started. With check (the end of every test), each server must have
 * stayed up and must stop cleanly on SIGTERM: exit status 0, so under ASan no finding either.
 */
static void stop_all(bool check)
{
    if (client_pid > 0)
        bgt_stop(client_pid, SIGKILL, 2000);
    client_pid = 0;
    for (size_t i = 0; i < sizeof(servers) / sizeof(servers[0]); i++) {
        if (servers[i] != NULL) {
            bool running = servers[i]->pid > 0;
            int st = stop_server(servers[i]);
            if (check && running)
                cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0,
                          "bg-demo-llm did not exit cleanly on SIGTERM (status %d, log above)", st);
        }
        servers[i] = NULL;
    }
}

static void teardown(void)
{
    stop_all(false); /* after a failed assertion: no more checks, just no stray processes */
}

TestSuite(demo_llm, .init = setup, .fini = teardown, .timeout = 60);

/* ---- a small client ---- */

typedef struct resp {
    CURLcode rc;
    long status;
    long version;
    char *body; /* owned, NUL-terminated */
    size_t len;
    char headers[8192];
    size_t hlen;
    long long elapsed_ms;
} resp_t;

static size_t on_body(char *p, size_t size, size_t n, void *ud)
{
    resp_t *r = ud;
    size_t len = size * n;
    r->body = realloc(r->body, r->len + len + 1);
    cr_assert_not_null(r->body);
    memcpy(r->body + r->len, p, len);
    r->len += len;
    r->body[r->len] = '\0';
    return len;
}

static size_t on_header(char *p, size_t size, size_t n, void *ud)
{
    resp_t *r = ud;
    size_t len = size * n;
    if (r->hlen + len < sizeof(r->headers)) {
        memcpy(r->headers + r->hlen, p, len);
        r->hlen += len;
        r->headers[r->hlen] = '\0';
    }
    return len;
}

typedef struct req_opts {
    const char *method; /* NULL: POST with a body, GET without */
    const char *auth;   /* Authorization header value, or NULL */
    long timeout_ms;    /* 0: 20 s */
    bool h2c;           /* HTTP/2 with prior knowledge */
} req_opts_t;

/* Sends one request to s (NULL: the test's server); the caller frees r with resp_free. */
static void request(const server_t *s, const char *path, const char *body, const req_opts_t *o,
                    resp_t *r)
{
    static const req_opts_t none = {0};
    if (o == NULL)
        o = &none;
    if (s == NULL)
        s = &demo;
    memset(r, 0, sizeof(*r));
    char url[256];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d%s", s->port, path);
    CURL *c = curl_easy_init();
    cr_assert_not_null(c);
    struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json");
    char auth[256];
    if (o->auth != NULL) {
        snprintf(auth, sizeof(auth), "Authorization: %s", o->auth);
        h = curl_slist_append(h, auth);
    }
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, o->timeout_ms > 0 ? o->timeout_ms : 20000L);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(c, CURLOPT_HTTP_VERSION,
                     o->h2c ? CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE : CURL_HTTP_VERSION_1_1);
    if (body != NULL) {
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
    }
    if (o->method != NULL)
        curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, o->method);
    long long t0 = bgt_now_ms();
    r->rc = curl_easy_perform(c);
    r->elapsed_ms = bgt_now_ms() - t0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &r->status);
    curl_easy_getinfo(c, CURLINFO_HTTP_VERSION, &r->version);
    curl_slist_free_all(h);
    curl_easy_cleanup(c);
    if (r->body == NULL) {
        r->body = calloc(1, 1);
        cr_assert_not_null(r->body);
    }
}

static void resp_free(resp_t *r)
{
    free(r->body);
    r->body = NULL;
}

/* The value of a response header (case-insensitive name) copied into buf, or NULL. */
static const char *header(const resp_t *r, const char *name, char *buf, size_t buflen)
{
    size_t nl = strlen(name);
    for (const char *line = r->headers; *line != '\0';) {
        const char *eol = strstr(line, "\r\n");
        size_t len = eol != NULL ? (size_t)(eol - line) : strlen(line);
        if (len > nl && line[nl] == ':' && strncasecmp(line, name, nl) == 0) {
            const char *v = line + nl + 1;
            while (*v == ' ')
                v++;
            snprintf(buf, buflen, "%.*s", (int)(line + len - v), v);
            return buf;
        }
        if (eol == NULL)
            break;
        line = eol + 2;
    }
    return NULL;
}

/* A chat request body for one user message (and an optional system message before it). */
static char *chat_body(const char *model, const char *user, const char *extra_fields)
{
    char *b = NULL;
    cr_assert_gt(
        asprintf(&b, "{\"model\":\"%s\",\"messages\":[{\"role\":\"user\",\"content\":\"%s\"}]%s%s}",
                 model, user, extra_fields != NULL ? "," : "",
                 extra_fields != NULL ? extra_fields : ""),
        0);
    return b;
}

static bg_json_doc_t *parse(const char *text, size_t len)
{
    bg_json_doc_t *doc = NULL;
    const char *err = NULL;
    cr_assert_eq(bg_json_parse(text, len, NULL, &doc, &err, NULL), 0, "not JSON (%s): %.*s", err,
                 (int)len, text);
    return doc;
}

static const char *str_at(const bg_json_t *obj, const char *key)
{
    const char *s = NULL;
    cr_assert_eq(bg_json_get_str(obj, key, &s), 0, "no string \"%s\"", key);
    return s;
}

static int64_t int_at(const bg_json_t *obj, const char *key)
{
    int64_t v = -1;
    cr_assert_eq(bg_json_get_int(obj, key, &v), 0, "no integer \"%s\"", key);
    return v;
}

static size_t count_words(const char *s)
{
    size_t n = 0;
    bool in = false;
    for (; *s != '\0'; s++) {
        bool sp = *s == ' ' || *s == '\n' || *s == '\t';
        n += !sp && !in;
        in = !sp;
    }
    return n;
}

/* Checks an OpenAI error body: status, type and (when not NULL) param and code. */
static void assert_error(const resp_t *r, long status, const char *type, const char *param,
                         const char *code)
{
    cr_assert_eq(r->status, status, "status %ld, want %ld: %s", r->status, status, r->body);
    char ct[128];
    cr_assert_not_null(header(r, "content-type", ct, sizeof(ct)));
    cr_assert_not_null(strstr(ct, "application/json"), "%s", ct);
    bg_json_doc_t *doc = parse(r->body, r->len);
    const bg_json_t *e = NULL;
    cr_assert_eq(bg_json_get_object(bg_json_root(doc), "error", &e), 0, "%s", r->body);
    cr_assert_gt(strlen(str_at(e, "message")), 0);
    cr_assert_str_eq(str_at(e, "type"), type, "%s", r->body);
    const bg_json_t *p = bg_json_find(e, "param");
    const bg_json_t *c = bg_json_find(e, "code");
    cr_assert(p != NULL && c != NULL, "param and code must be present (null or not): %s", r->body);
    if (param != NULL)
        cr_assert_str_eq(str_at(e, "param"), param, "%s", r->body);
    if (code != NULL)
        cr_assert_str_eq(str_at(e, "code"), code, "%s", r->body);
    bg_json_doc_free(doc);
}

/* ---- SSE, parsed the way openai-node does (PROTOCOLS.md 3.4) ---- */

#define MAX_EVENTS 512

typedef struct sse {
    char *data[MAX_EVENTS]; /* owned: the data of each event, lines joined by \n */
    size_t n;
} sse_t;

static void sse_parse(const char *body, sse_t *out)
{
    memset(out, 0, sizeof(*out));
    const char *p = body;
    while (*p != '\0') {
        const char *end = strstr(p, "\n\n");
        size_t elen = end != NULL ? (size_t)(end - p) : strlen(p);
        char *data = NULL;
        size_t dlen = 0;
        for (const char *line = p; line < p + elen;) {
            const char *nl = memchr(line, '\n', (size_t)(p + elen - line));
            size_t llen = nl != NULL ? (size_t)(nl - line) : (size_t)(p + elen - line);
            cr_assert(llen == 0 || line[0] == ':' || strncmp(line, "data:", 5) == 0,
                      "a line that is neither data nor comment: %.*s", (int)llen, line);
            if (llen >= 5 && strncmp(line, "data:", 5) == 0) {
                const char *v = line + 5 + (llen > 5 && line[5] == ' ');
                size_t vlen = (size_t)(line + llen - v);
                data = realloc(data, dlen + vlen + 2);
                cr_assert_not_null(data);
                if (dlen > 0)
                    data[dlen++] = '\n';
                memcpy(data + dlen, v, vlen);
                dlen += vlen;
                data[dlen] = '\0';
            }
            line += llen + 1;
        }
        if (data != NULL) {
            cr_assert_lt(out->n, MAX_EVENTS);
            out->data[out->n++] = data;
        }
        if (end == NULL)
            break;
        p = end + 2;
    }
}

static void sse_free(sse_t *s)
{
    for (size_t i = 0; i < s->n; i++)
        free(s->data[i]);
    s->n = 0;
}

/* What a stream added up to. */
typedef struct summary {
    bool role_first;        /* the first chunk's delta has role "assistant" */
    char content[8192];     /* the content deltas, concatenated */
    size_t content_chunks;  /* chunks with a non-empty content delta */
    char finish_reason[32]; /* "" when no chunk had one */
    int64_t prompt_tokens;  /* from the usage chunk; -1 without one */
    int64_t completion_tokens;
    int64_t total_tokens;
    bool done_last;   /* the last event is [DONE] */
    size_t malformed; /* events that were not JSON */
    bool error_event; /* an event carried {"error":…} */
    bool same_id;     /* id, created and model were the same in every chunk */
} summary_t;

static void summarize(const sse_t *s, summary_t *sum)
{
    memset(sum, 0, sizeof(*sum));
    sum->prompt_tokens = sum->completion_tokens = sum->total_tokens = -1;
    sum->same_id = true;
    char id[128] = "";
    int64_t created = -1;
    for (size_t i = 0; i < s->n; i++) {
        const char *d = s->data[i];
        if (strcmp(d, "[DONE]") == 0) {
            sum->done_last = i + 1 == s->n;
            continue;
        }
        bg_json_doc_t *doc = NULL;
        const char *err;
        if (bg_json_parse(d, strlen(d), NULL, &doc, &err, NULL) != 0) {
            sum->malformed++;
            continue;
        }
        const bg_json_t *root = bg_json_root(doc);
        if (bg_json_find(root, "error") != NULL) {
            sum->error_event = true;
            bg_json_doc_free(doc);
            continue;
        }
        cr_assert_str_eq(str_at(root, "object"), "chat.completion.chunk");
        if (id[0] == '\0') {
            snprintf(id, sizeof(id), "%s", str_at(root, "id"));
            created = int_at(root, "created");
        }
        sum->same_id = sum->same_id && strcmp(id, str_at(root, "id")) == 0 &&
                       created == int_at(root, "created") &&
                       strcmp(str_at(root, "model"), "demo-1") == 0;
        const bg_json_t *choices = NULL;
        cr_assert_eq(bg_json_get_array(root, "choices", &choices), 0, "%s", d);
        const bg_json_t *usage = bg_json_find(root, "usage");
        if (usage != NULL && bg_json_type(usage) != BG_JSON_NULL) {
            cr_assert_eq(bg_json_len(choices), 0, "the usage chunk has choices: []: %s", d);
            sum->prompt_tokens = int_at(usage, "prompt_tokens");
            sum->completion_tokens = int_at(usage, "completion_tokens");
            sum->total_tokens = int_at(usage, "total_tokens");
        }
        if (bg_json_len(choices) == 1) {
            const bg_json_t *c = bg_json_at(choices, 0);
            const bg_json_t *delta = NULL;
            cr_assert_eq(bg_json_get_object(c, "delta", &delta), 0, "%s", d);
            const char *role = NULL;
            if (i == 0)
                sum->role_first =
                    bg_json_get_str(delta, "role", &role) == 0 && strcmp(role, "assistant") == 0;
            const char *content = NULL;
            if (bg_json_get_str(delta, "content", &content) == 0 && content[0] != '\0') {
                cr_assert_lt(strlen(sum->content) + strlen(content), sizeof(sum->content));
                strncat(sum->content, content, sizeof(sum->content) - strlen(sum->content) - 1);
                sum->content_chunks++;
            }
            const char *fr = NULL;
            if (bg_json_get_str(c, "finish_reason", &fr) == 0) {
                cr_assert_eq(sum->finish_reason[0], '\0', "two chunks with a finish_reason");
                snprintf(sum->finish_reason, sizeof(sum->finish_reason), "%s", fr);
            }
        }
        bg_json_doc_free(doc);
    }
}

/* Streams a request and summarizes it; the response stays in *r for further checks. */
static void stream(const server_t *s, const char *body, const req_opts_t *o, resp_t *r,
                   summary_t *sum)
{
    request(s, "/v1/chat/completions", body, o, r);
    sse_t events;
    sse_parse(r->body, &events);
    summarize(&events, sum);
    sse_free(&events);
}

/* ---- models ---- */

Test(demo_llm, lists_its_models_like_openai)
{
    resp_t r;
    request(NULL, "/v1/models", NULL, NULL, &r);
    cr_assert_eq(r.rc, CURLE_OK);
    cr_assert_eq(r.status, 200, "%s", r.body);
    bg_json_doc_t *doc = parse(r.body, r.len);
    const bg_json_t *root = bg_json_root(doc);
    cr_assert_str_eq(str_at(root, "object"), "list");
    const bg_json_t *data = NULL;
    cr_assert_eq(bg_json_get_array(root, "data", &data), 0);
    cr_assert_eq(bg_json_len(data), 2);
    const char *want[] = {"demo-1", "demo-vision-1"};
    for (size_t i = 0; i < 2; i++) {
        const bg_json_t *m = bg_json_at(data, i);
        cr_assert_str_eq(str_at(m, "id"), want[i]);
        cr_assert_str_eq(str_at(m, "object"), "model");
        cr_assert_str_eq(str_at(m, "owned_by"), "bot-generic");
        cr_assert_gt(int_at(m, "created"), 0);
    }
    bg_json_doc_free(doc);
    resp_free(&r);

    request(NULL, "/v1/models/demo-vision-1", NULL, NULL, &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert_not_null(strstr(r.body, "\"id\":\"demo-vision-1\""), "%s", r.body);
    resp_free(&r);
    request(NULL, "/v1/models/gpt-5", NULL, NULL, &r);
    assert_error(&r, 404, "invalid_request_error", NULL, "model_not_found");
    resp_free(&r);
    stop_all(true);
}

/* ---- completions ---- */

Test(demo_llm, completion_is_deterministic_with_consistent_usage)
{
    const char *body =
        "{\"model\":\"demo-1\",\"user\":\"u-1\",\"temperature\":0.2,\"messages\":["
        "{\"role\":\"system\",\"content\":\"You are terse.\"},"
        "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"Hello   there,\\n\"},"
        "{\"type\":\"text\",\"text\":\"demo\"}]}]}";
    char want[1024];
    snprintf(want, sizeof(want), "Echo: Hello there, demo. %s", LOREM);
    char first[1024] = "";
    for (int round = 0; round < 2; round++) {
        resp_t r;
        request(NULL, "/v1/chat/completions", body, NULL, &r);
        cr_assert_eq(r.status, 200, "%s", r.body);
        char v[128];
        cr_assert_not_null(header(&r, "content-type", v, sizeof(v)));
        cr_assert_not_null(strstr(v, "application/json"), "%s", v);
        cr_assert_not_null(header(&r, "x-request-id", v, sizeof(v)));
        bg_json_doc_t *doc = parse(r.body, r.len);
        const bg_json_t *root = bg_json_root(doc);
        cr_assert_str_eq(str_at(root, "object"), "chat.completion");
        cr_assert_eq(strncmp(str_at(root, "id"), "chatcmpl-", 9), 0);
        cr_assert_str_eq(str_at(root, "model"), "demo-1");
        cr_assert_gt(int_at(root, "created"), 1700000000);
        const bg_json_t *choices = NULL;
        cr_assert_eq(bg_json_get_array(root, "choices", &choices), 0);
        cr_assert_eq(bg_json_len(choices), 1);
        const bg_json_t *c = bg_json_at(choices, 0);
        cr_assert_eq(int_at(c, "index"), 0);
        cr_assert_str_eq(str_at(c, "finish_reason"), "stop");
        const bg_json_t *msg = NULL;
        cr_assert_eq(bg_json_get_object(c, "message", &msg), 0);
        cr_assert_str_eq(str_at(msg, "role"), "assistant");
        const char *content = str_at(msg, "content");
        cr_assert_str_eq(content, want);
        if (round == 0)
            snprintf(first, sizeof(first), "%s", content);
        else
            cr_assert_str_eq(content, first, "the same request gave another text");
        const bg_json_t *usage = NULL;
        cr_assert_eq(bg_json_get_object(root, "usage", &usage), 0);
        /* words of every message: "You are terse." (3) + "Hello there," "demo" (3) */
        cr_assert_eq(int_at(usage, "prompt_tokens"), 6);
        cr_assert_eq(int_at(usage, "completion_tokens"), (int64_t)count_words(want));
        cr_assert_eq(int_at(usage, "total_tokens"), 6 + (int64_t)count_words(want));
        bg_json_doc_free(doc);
        resp_free(&r);
    }
    stop_all(true);
}

Test(demo_llm, stream_parses_and_adds_up_to_the_completion)
{
    char *plain = chat_body("demo-1", "Stream me a reply", NULL);
    resp_t r;
    request(NULL, "/v1/chat/completions", plain, NULL, &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    bg_json_doc_t *doc = parse(r.body, r.len);
    const bg_json_t *c0 = bg_json_at(bg_json_find(bg_json_root(doc), "choices"), 0);
    char want[1024];
    snprintf(want, sizeof(want), "%s", str_at(bg_json_find(c0, "message"), "content"));
    const bg_json_t *usage = bg_json_find(bg_json_root(doc), "usage");
    int64_t prompt = int_at(usage, "prompt_tokens"),
            completion = int_at(usage, "completion_tokens");
    bg_json_doc_free(doc);
    resp_free(&r);
    free(plain);

    for (int h2 = 0; h2 < 2; h2++) {
        char *body = chat_body("demo-1", "Stream me a reply",
                               "\"stream\":true,\"stream_options\":{\"include_usage\":true}");
        req_opts_t o = {.h2c = h2 == 1};
        summary_t sum;
        stream(NULL, body, &o, &r, &sum);
        cr_assert_eq(r.rc, CURLE_OK, "%s", curl_easy_strerror(r.rc));
        cr_assert_eq(r.version, h2 ? CURL_HTTP_VERSION_2_0 : CURL_HTTP_VERSION_1_1);
        cr_assert_eq(r.status, 200, "%s", r.body);
        char v[128];
        cr_assert_not_null(header(&r, "content-type", v, sizeof(v)));
        cr_assert_not_null(strstr(v, "text/event-stream"), "%s", v);
        cr_assert_not_null(header(&r, "cache-control", v, sizeof(v)));
        cr_assert(sum.role_first, "the first chunk must carry role assistant: %.300s", r.body);
        cr_assert_str_eq(sum.content, want);
        cr_assert_eq((int64_t)sum.content_chunks, completion, "one token per chunk");
        cr_assert_str_eq(sum.finish_reason, "stop");
        cr_assert_eq(sum.prompt_tokens, prompt);
        cr_assert_eq(sum.completion_tokens, completion);
        cr_assert_eq(sum.total_tokens, prompt + completion);
        cr_assert(sum.done_last, "[DONE] must come last");
        cr_assert(sum.same_id, "id, created and model must not change within a stream");
        cr_assert_eq(sum.malformed, 0);
        cr_assert_not(sum.error_event);
        /* The usage chunk is the one right before [DONE]. */
        const char *done = strstr(r.body, "data: [DONE]\n\n");
        cr_assert_not_null(done);
        cr_assert_eq(done + strlen("data: [DONE]\n\n"), r.body + r.len, "nothing after [DONE]");
        resp_free(&r);
        free(body);
    }
    stop_all(true);
}

Test(demo_llm, stream_without_include_usage_has_no_usage_chunk)
{
    char *body = chat_body("demo-1", "hi", "\"stream\":true,\"max_tokens\":4");
    resp_t r;
    summary_t sum;
    stream(NULL, body, NULL, &r, &sum);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert_eq(sum.prompt_tokens, -1, "usage without include_usage");
    cr_assert_null(strstr(r.body, "\"usage\":{"), "%s", r.body);
    cr_assert_eq(sum.content_chunks, 4);
    cr_assert(sum.done_last);
    resp_free(&r);
    free(body);
    stop_all(true);
}

Test(demo_llm, max_tokens_cuts_with_finish_reason_length)
{
    resp_t r;
    char *body = chat_body("demo-1", "Count to ten", "\"max_tokens\":5");
    request(NULL, "/v1/chat/completions", body, NULL, &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    bg_json_doc_t *doc = parse(r.body, r.len);
    const bg_json_t *root = bg_json_root(doc);
    const bg_json_t *c = bg_json_at(bg_json_find(root, "choices"), 0);
    cr_assert_str_eq(str_at(c, "finish_reason"), "length");
    cr_assert_str_eq(str_at(bg_json_find(c, "message"), "content"), "Echo: Count to ten. Lorem ");
    cr_assert_eq(int_at(bg_json_find(root, "usage"), "completion_tokens"), 5);
    bg_json_doc_free(doc);
    resp_free(&r);
    free(body);

    /* max_completion_tokens, the newer name, streamed */
    body = chat_body("demo-1", "Count to ten",
                     "\"max_completion_tokens\":3,\"stream\":true,"
                     "\"stream_options\":{\"include_usage\":true}");
    summary_t sum;
    stream(NULL, body, NULL, &r, &sum);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert_str_eq(sum.content, "Echo: Count to ");
    cr_assert_eq(sum.content_chunks, 3);
    cr_assert_str_eq(sum.finish_reason, "length");
    cr_assert_eq(sum.completion_tokens, 3);
    cr_assert(sum.done_last);
    resp_free(&r);
    free(body);
    stop_all(true);
}

Test(demo_llm, respects_the_token_rate_and_first_token_delay)
{
    static server_t paced, delayed; /* static: teardown may stop them after a failed assertion */
    const char *paced_args[] = {"--tokens-per-second", "100", NULL};
    start_server(&paced, paced_args, 200);
    char *body = chat_body("demo-1", "pace me", "\"stream\":true,\"max_tokens\":20");
    resp_t r;
    summary_t sum;
    stream(&paced, body, NULL, &r, &sum);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert_eq(sum.content_chunks, 20);
    cr_assert(sum.done_last);
    cr_assert_geq(r.elapsed_ms, 150, "20 tokens at 100/s took only %lld ms", r.elapsed_ms);
    cr_assert_lt(r.elapsed_ms, 5000, "20 tokens at 100/s took %lld ms", r.elapsed_ms);
    resp_free(&r);
    /* A non-stream answer takes as long as its tokens would have. */
    free(body);
    body = chat_body("demo-1", "pace me", "\"max_tokens\":20");
    request(&paced, "/v1/chat/completions", body, NULL, &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert_geq(r.elapsed_ms, 150, "took only %lld ms", r.elapsed_ms);
    resp_free(&r);
    cr_assert_eq(stop_server(&paced), 0);

    /* The unpaced server of the suite: the same 20 tokens come at once. */
    free(body);
    body = chat_body("demo-1", "pace me", "\"stream\":true,\"max_tokens\":20");
    stream(NULL, body, NULL, &r, &sum);
    cr_assert_eq(sum.content_chunks, 20);
    cr_assert_lt(r.elapsed_ms, 150, "unpaced, 20 tokens took %lld ms", r.elapsed_ms);
    resp_free(&r);

    const char *delayed_args[] = {"--tokens-per-second", "0", "--delay-ms", "300", NULL};
    start_server(&delayed, delayed_args, 200);
    free(body);
    body = chat_body("demo-1", "wait for it", "\"stream\":true,\"max_tokens\":1");
    stream(&delayed, body, NULL, &r, &sum);
    cr_assert_eq(sum.content_chunks, 1);
    cr_assert_geq(r.elapsed_ms, 290, "the first token came after %lld ms", r.elapsed_ms);
    resp_free(&r);
    cr_assert_eq(stop_server(&delayed), 0);
    free(body);
    stop_all(true);
}

/* ---- failure directives ---- */

Test(demo_llm, fail_429_has_retry_after_and_a_rate_limit_body)
{
    const char *extras[] = {NULL, "\"stream\":true"};
    for (int i = 0; i < 2; i++) {
        char *body = chat_body("demo-1", "please #fail:429", extras[i]);
        resp_t r;
        request(NULL, "/v1/chat/completions", body, NULL, &r);
        assert_error(&r, 429, "requests", NULL, "rate_limit_exceeded");
        char v[64];
        cr_assert_not_null(header(&r, "retry-after", v, sizeof(v)), "no retry-after");
        cr_assert_str_eq(v, "1");
        cr_assert_not_null(header(&r, "retry-after-ms", v, sizeof(v)), "no retry-after-ms");
        cr_assert_str_eq(v, "1000");
        resp_free(&r);
        free(body);
    }
    stop_all(true);
}

Test(demo_llm, fail_500_is_a_server_error)
{
    char *body = chat_body("demo-1", "#fail:500", "\"stream\":true");
    resp_t r;
    request(NULL, "/v1/chat/completions", body, NULL, &r);
    assert_error(&r, 500, "server_error", NULL, NULL);
    resp_free(&r);
    free(body);
    body = chat_body("demo-1", "#fail:503", NULL);
    request(NULL, "/v1/chat/completions", body, NULL, &r);
    assert_error(&r, 503, "server_error", NULL, NULL);
    resp_free(&r);
    free(body);
    /* Only the last user message counts: an old directive in the history does nothing. */
    const char *history = "{\"model\":\"demo-1\",\"messages\":[{\"role\":\"user\",\"content\":"
                          "\"#fail:500\"},{\"role\":\"assistant\",\"content\":\"sorry\"},"
                          "{\"role\":\"user\",\"content\":\"again\"}]}";
    request(NULL, "/v1/chat/completions", history, NULL, &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    resp_free(&r);
    stop_all(true);
}

Test(demo_llm, fail_hang_never_answers_until_the_client_gives_up)
{
    for (int h2 = 0; h2 < 2; h2++) {
        char *body = chat_body("demo-1", "#fail:hang", h2 ? "\"stream\":true" : NULL);
        req_opts_t o = {.timeout_ms = 500, .h2c = h2 == 1};
        resp_t r;
        request(NULL, "/v1/chat/completions", body, &o, &r);
        cr_assert_eq(r.rc, CURLE_OPERATION_TIMEDOUT, "%s", curl_easy_strerror(r.rc));
        cr_assert_eq(r.status, 0, "a status came: %ld", r.status);
        cr_assert_geq(r.elapsed_ms, 450);
        resp_free(&r);
        free(body);
    }
    /* The server (one thread) still answers. */
    resp_t r;
    request(NULL, "/v1/models", NULL, NULL, &r);
    cr_assert_eq(r.status, 200);
    resp_free(&r);
    stop_all(true);
}

Test(demo_llm, fail_stall_stops_a_stream_midway)
{
    char *body = chat_body("demo-1", "#fail:stall=2", "\"stream\":true");
    req_opts_t o = {.timeout_ms = 600};
    resp_t r;
    summary_t sum;
    stream(NULL, body, &o, &r, &sum);
    cr_assert_eq(r.rc, CURLE_OPERATION_TIMEDOUT, "%s", curl_easy_strerror(r.rc));
    cr_assert_eq(r.status, 200);
    cr_assert_eq(sum.content_chunks, 2);
    cr_assert_not(sum.done_last);
    resp_free(&r);
    free(body);
    stop_all(true);
}

Test(demo_llm, fail_cut_ends_the_stream_without_done)
{
    for (int h2 = 0; h2 < 2; h2++) {
        char *body = chat_body("demo-1", "#fail:cut=3",
                               "\"stream\":true,\"stream_options\":{\"include_usage\":true}");
        req_opts_t o = {.h2c = h2 == 1};
        resp_t r;
        summary_t sum;
        stream(NULL, body, &o, &r, &sum);
        cr_assert_eq(r.status, 200);
        cr_assert_neq(r.rc, CURLE_OK, "a cut stream must not end cleanly");
        cr_assert_neq(r.rc, CURLE_OPERATION_TIMEDOUT, "the connection must close, not idle");
        cr_assert(sum.role_first);
        cr_assert_eq(sum.content_chunks, 3);
        cr_assert_str_eq(sum.content, "Echo: #fail:cut=3. Lorem ");
        cr_assert_str_eq(sum.finish_reason, "", "no finish_reason in a cut stream");
        cr_assert_eq(sum.prompt_tokens, -1, "no usage in a cut stream");
        cr_assert_null(strstr(r.body, "[DONE]"));
        resp_free(&r);
        free(body);
    }
    /* Non-stream: the body stops short of its Content-Length. */
    char *body = chat_body("demo-1", "#fail:cut=1", NULL);
    resp_t r;
    request(NULL, "/v1/chat/completions", body, NULL, &r);
    cr_assert_eq(r.rc, CURLE_PARTIAL_FILE, "%s", curl_easy_strerror(r.rc));
    resp_free(&r);
    free(body);
    stop_all(true);
}

Test(demo_llm, fail_malformed_sends_a_broken_event_and_goes_on)
{
    char *body = chat_body("demo-1", "#fail:malformed=2", "\"stream\":true");
    resp_t r;
    summary_t sum;
    stream(NULL, body, NULL, &r, &sum);
    cr_assert_eq(r.rc, CURLE_OK);
    cr_assert_eq(r.status, 200);
    cr_assert_eq(sum.malformed, 1);
    const char *bad = strstr(r.body, "data: {not json\n\n");
    cr_assert_not_null(bad, "%s", r.body);
    /* after the role chunk and two content chunks */
    size_t before = 0;
    for (const char *p = r.body; p < bad; p++)
        before += strncmp(p, "data: {\"id\"", 11) == 0;
    cr_assert_eq(before, 3);
    char want[1024];
    snprintf(want, sizeof(want), "Echo: #fail:malformed=2. %s", LOREM);
    cr_assert_str_eq(sum.content, want);
    cr_assert_str_eq(sum.finish_reason, "stop");
    cr_assert(sum.done_last);
    resp_free(&r);
    free(body);
    stop_all(true);
}

Test(demo_llm, fail_error_sends_an_error_event_without_done)
{
    char *body = chat_body("demo-1", "#fail:error=1", "\"stream\":true");
    resp_t r;
    summary_t sum;
    stream(NULL, body, NULL, &r, &sum);
    cr_assert_eq(r.rc, CURLE_OK);
    cr_assert_eq(r.status, 200);
    cr_assert_eq(sum.content_chunks, 1);
    cr_assert(sum.error_event, "%s", r.body);
    cr_assert_null(strstr(r.body, "[DONE]"));
    resp_free(&r);
    free(body);
    stop_all(true);
}

Test(demo_llm, fail_slow_paces_one_request)
{
    char *body = chat_body("demo-1", "#fail:slow=60", "\"stream\":true,\"max_tokens\":4");
    resp_t r;
    summary_t sum;
    stream(NULL, body, NULL, &r, &sum);
    cr_assert_eq(sum.content_chunks, 4);
    cr_assert(sum.done_last);
    cr_assert_geq(r.elapsed_ms, 170, "4 tokens 60 ms apart took %lld ms", r.elapsed_ms);
    resp_free(&r);
    free(body);
    stop_all(true);
}

/* ---- bad requests ---- */

Test(demo_llm, bad_requests_get_openai_error_bodies)
{
    static const struct {
        const char *body;
        long status;
        const char *param; /* NULL: param is null */
        const char *code;  /* NULL: not checked */
    } cases[] = {
        {"{\"model\":", 400, NULL, NULL},
        {"[]", 400, NULL, NULL},
        {"{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", 400, NULL, NULL},
        {"{\"model\":7,\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", 400, "model",
         "invalid_type"},
        {"{\"model\":\"demo-1\"}", 400, "messages", "missing_required_parameter"},
        {"{\"model\":\"demo-1\",\"messages\":[]}", 400, "messages", "empty_array"},
        {"{\"model\":\"demo-1\",\"messages\":\"hi\"}", 400, "messages", "invalid_type"},
        {"{\"model\":\"demo-1\",\"messages\":[{\"content\":\"x\"}]}", 400, "messages[0].role",
         "missing_required_parameter"},
        {"{\"model\":\"demo-1\",\"messages\":[{\"role\":\"robot\",\"content\":\"x\"}]}", 400,
         "messages[0].role", "invalid_value"},
        {"{\"model\":\"demo-1\",\"messages\":[{\"role\":\"user\",\"content\":{}}]}", 400,
         "messages[0].content", "invalid_type"},
        {"{\"model\":\"demo-1\",\"messages\":[{\"role\":\"user\"}]}", 400, "messages[0].content",
         "missing_required_parameter"},
        {"{\"model\":\"demo-1\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
         "\"stream_options\":{\"include_usage\":true}}",
         400, "stream_options", NULL},
        {"{\"model\":\"demo-1\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
         "\"stream\":\"yes\"}",
         400, "stream", "invalid_type"},
        {"{\"model\":\"demo-1\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
         "\"max_tokens\":0}",
         400, "max_tokens", "integer_below_min_value"},
        {"{\"model\":\"demo-1\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
         "\"max_completion_tokens\":1.5}",
         400, "max_completion_tokens", "invalid_type"},
        {"{\"model\":\"demo-1\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
         "\"temperature\":3}",
         400, "temperature", "decimal_above_max_value"},
        {"{\"model\":\"demo-1\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
         "\"user\":5}",
         400, "user", "invalid_type"},
        {"{\"model\":\"demo-1\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
         "\"frobnicate\":true}",
         400, NULL, NULL},
        {"{\"model\":\"demo-1\",\"messages\":[{\"role\":\"user\",\"content\":\"#fail:sometimes\"}]"
         "}",
         400, "messages", "invalid_value"},
        {"{\"model\":\"demo-1\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
         "\"image_url\",\"image_url\":{\"url\":\"https://example.com/a.png\"}}]}]}",
         400, "messages[0].content[0]", "invalid_value"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        resp_t r;
        request(NULL, "/v1/chat/completions", cases[i].body, NULL, &r);
        cr_assert_eq(r.status, cases[i].status, "case %zu (%s): %ld %s", i, cases[i].body, r.status,
                     r.body);
        assert_error(&r, cases[i].status, "invalid_request_error", cases[i].param, cases[i].code);
        if (cases[i].param == NULL) {
            bg_json_doc_t *doc = parse(r.body, r.len);
            const bg_json_t *p = bg_json_find(bg_json_find(bg_json_root(doc), "error"), "param");
            cr_assert_eq(bg_json_type(p), BG_JSON_NULL, "case %zu: %s", i, r.body);
            bg_json_doc_free(doc);
        }
        resp_free(&r);
    }

    /* The image the text model refused is fine for the vision model, and costs 85 tokens. */
    resp_t r;
    request(NULL, "/v1/chat/completions",
            "{\"model\":\"demo-vision-1\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
            "\"text\",\"text\":\"what is this\"},{\"type\":\"image_url\",\"image_url\":{\"url\":"
            "\"data:image/png;base64,AAAA\"}}]}]}",
            NULL, &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert_not_null(strstr(r.body, "\"prompt_tokens\":88"), "%s", r.body);
    resp_free(&r);

    /* Wrong method and unknown path. */
    req_opts_t get = {.method = "GET"};
    request(NULL, "/v1/chat/completions", NULL, &get, &r);
    assert_error(&r, 405, "invalid_request_error", NULL, NULL);
    resp_free(&r);
    request(NULL, "/v1/embeddings", "{}", NULL, &r);
    assert_error(&r, 404, "invalid_request_error", NULL, NULL);
    resp_free(&r);
    stop_all(true);
}

Test(demo_llm, unknown_model_is_404)
{
    char *body = chat_body("gpt-4o", "hi", "\"stream\":true");
    resp_t r;
    request(NULL, "/v1/chat/completions", body, NULL, &r);
    assert_error(&r, 404, "invalid_request_error", NULL, "model_not_found");
    cr_assert_not_null(strstr(r.body, "gpt-4o"), "%s", r.body);
    resp_free(&r);
    free(body);
    stop_all(true);
}

Test(demo_llm, api_key_is_checked_when_configured)
{
    static server_t keyed;
    const char *args[] = {"--tokens-per-second", "0", "--api-key", "sk-demo-secret", NULL};
    start_server(&keyed, args, 401);
    char *body = chat_body("demo-1", "hi", NULL);
    resp_t r;
    request(&keyed, "/v1/chat/completions", body, NULL, &r);
    assert_error(&r, 401, "invalid_request_error", NULL, NULL);
    resp_free(&r);
    req_opts_t wrong = {.auth = "Bearer sk-demo-secreT"};
    request(&keyed, "/v1/chat/completions", body, &wrong, &r);
    assert_error(&r, 401, "invalid_request_error", NULL, "invalid_api_key");
    cr_assert_null(strstr(r.body, "sk-demo"), "the error must not echo the key: %s", r.body);
    resp_free(&r);
    req_opts_t right = {.auth = "Bearer sk-demo-secret"};
    request(&keyed, "/v1/chat/completions", body, &right, &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    resp_free(&r);
    request(&keyed, "/v1/models", NULL, &right, &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    resp_free(&r);
    free(body);
    cr_assert_eq(stop_server(&keyed), 0);
    stop_all(true);
}

Test(demo_llm, stops_cleanly_on_sigterm_even_with_a_hanging_request)
{
    /* A client that hangs on: the server gives up waiting after its grace period. */
    static server_t s;
    const char *args[] = {"--tokens-per-second", "0", "--grace-ms", "300", NULL};
    start_server(&s, args, 200);
    char port[16];
    snprintf(port, sizeof(port), "%d", s.port);
    char url[128];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/v1/chat/completions", s.port);
    const char *hang = "{\"model\":\"demo-1\",\"messages\":[{\"role\":\"user\","
                       "\"content\":\"#fail:hang\"}]}";
    const char *curl_argv[] = {"curl", "-s", "-m", "10", url, "-d", hang, NULL};
    client_pid = bgt_spawn(curl_argv, NULL, "/dev/null");
    cr_assert_gt(client_pid, 0);
    usleep(300 * 1000); /* let it connect and send its request */
    long long t0 = bgt_now_ms();
    int st = bgt_stop(s.pid, SIGTERM, 5000);
    s.pid = 0;
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit status %d", st);
    cr_assert_lt(bgt_now_ms() - t0, 3000, "shutdown took %lld ms", bgt_now_ms() - t0);
    bgt_stop(client_pid, SIGTERM, 2000);
    client_pid = 0;

    /* The suite's server, idle: it stops at once. */
    t0 = bgt_now_ms();
    st = bgt_stop(demo.pid, SIGINT, 5000);
    demo.pid = 0;
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit status %d", st);
    cr_assert_lt(bgt_now_ms() - t0, 1000, "idle shutdown took %lld ms", bgt_now_ms() - t0);
    stop_all(true);
}

Test(demo_llm, refuses_bad_options)
{
    char out[2048];
    const char *no_port[] = {bgt_bin("bg-demo-llm"), NULL};
    cr_assert_eq(bgt_run(no_port, NULL, out, sizeof(out)), 2, "%s", out);
    cr_assert_not_null(strstr(out, "--port"), "%s", out);
    const char *bad_rate[] = {bgt_bin("bg-demo-llm"), "--port", "1",
                              "--tokens-per-second",  "-1",     NULL};
    cr_assert_eq(bgt_run(bad_rate, NULL, out, sizeof(out)), 2, "%s", out);
    cr_assert_not_null(strstr(out, "--tokens-per-second"), "%s", out);
    stop_all(true);
}
