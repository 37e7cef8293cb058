/*
 * bg-edge end to end: the real binary against a private Redis and a migrated Postgres database,
 * spoken to over HTTP/1.1, h2c (prior knowledge and Upgrade) and h2 over TLS.
 */
#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bgtest.h"

typedef struct st_edge {
    bgt_redis_t redis;
    bgt_pg_t db;
    char dir[256];
    char log[300];
    int http_port, https_port;
    pid_t pid;
    char base[64], tls_base[64];
} edge_t;

static edge_t E;

static void make_cert(const char *dir)
{
    char key[300], crt[300], out[4096];
    snprintf(key, sizeof(key), "%s/key.pem", dir);
    snprintf(crt, sizeof(crt), "%s/cert.pem", dir);
    const char *argv[] = {"openssl", "req",     "-x509", "-newkey",       "rsa:2048",
                          "-nodes",  "-keyout", key,     "-out",          crt,
                          "-days",   "2",       "-subj", "/CN=localhost", NULL};
    cr_assert_eq(bgt_run(argv, NULL, out, sizeof(out)), 0, "openssl: %s", out);
}

/* Starts bg-edge with the given extra environment (NULL-terminated, may be NULL). */
static pid_t start_edge(edge_t *e, const char *const extra[])
{
    static char env_store[16][600];
    const char *env[32];
    size_t n = 0;
    snprintf(env_store[0], 600, "BG_HTTP_PORT=%d", e->http_port);
    snprintf(env_store[1], 600, "BG_HTTPS_PORT=%d", e->https_port);
    snprintf(env_store[2], 600, "BG_TLS_CERT=%s/cert.pem", e->dir);
    snprintf(env_store[3], 600, "BG_TLS_KEY=%s/key.pem", e->dir);
    snprintf(env_store[4], 600, "BG_REDIS_URL=%s", e->redis.url);
    snprintf(env_store[5], 600, "BG_DATABASE_URL=%s", e->db.url);
    /* getenv() finds the first of duplicates: the caller's variables go first to override */
    for (size_t i = 0; extra != NULL && extra[i] != NULL; i++)
        env[n++] = extra[i];
    for (int i = 0; i < 6; i++)
        env[n++] = env_store[i];
    env[n++] = "BG_ENV_FILE=/nonexistent";
    env[n++] = "BG_EDGE_THREADS=2";
    env[n++] = "BG_LOG_FORMAT=text";
    env[n++] = "BG_LOG_LEVEL=debug";
    env[n++] = "BG_REDIS_TIMEOUT_MS=1500";
    env[n++] = "BG_SHUTDOWN_GRACE_MS=5000";
    env[n++] = "BG_JWT_SECRET=0123456789abcdef0123456789abcdef-test";
    env[n] = NULL;
    const char *argv[] = {bgt_bin("bg-edge"), NULL};
    return bgt_spawn(argv, env, e->log);
}

static void setup(void)
{
    memset(&E, 0, sizeof(E));
    cr_assert_eq(bgt_pg_create(&E.db, true), 0);
    cr_assert_eq(bgt_redis_start(&E.redis), 0);
    cr_assert_eq(bgt_tempdir(E.dir, sizeof(E.dir)), 0);
    snprintf(E.log, sizeof(E.log), "%s/edge.log", E.dir);
    make_cert(E.dir);
    E.http_port = bgt_free_port();
    E.https_port = bgt_free_port();
    snprintf(E.base, sizeof(E.base), "http://127.0.0.1:%d", E.http_port);
    snprintf(E.tls_base, sizeof(E.tls_base), "https://127.0.0.1:%d", E.https_port);
    E.pid = start_edge(&E, NULL);
    char url[128];
    snprintf(url, sizeof(url), "%s/healthz", E.base);
    cr_assert_eq(bgt_wait_http(url, 200, 10000), 0, "bg-edge did not come up; see %s", E.log);
}

static void teardown(void)
{
    if (E.pid > 0)
        bgt_stop(E.pid, SIGKILL, 2000);
    bgt_redis_stop(&E.redis);
    bgt_pg_drop(&E.db);
    bgt_rmtree(E.dir);
}

TestSuite(edge, .init = setup, .fini = teardown, .timeout = 120);

static void get(int mode, const char *base, const char *path, const char *const headers[],
                bgt_resp_t *r)
{
    char url[256];
    snprintf(url, sizeof(url), "%s%s", base, path);
    cr_assert_eq(bgt_http(mode, "GET", url, headers, NULL, 0, r), 0, "%s: %s", url, r->error);
}

Test(edge, healthz_answers_over_every_protocol)
{
    struct {
        int mode;
        long version;
        const char *name;
    } cases[] = {{BGT_H1, 1, "HTTP/1.1"},
                 {BGT_H2C, 2, "h2c prior knowledge"},
                 {BGT_H2C_UPGRADE, 2, "h2c Upgrade"},
                 {BGT_H2_TLS, 2, "h2 over TLS"}};
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        bgt_resp_t r;
        get(cases[i].mode, cases[i].mode == BGT_H2_TLS ? E.tls_base : E.base, "/healthz", NULL, &r);
        cr_expect_eq(r.status, 200, "%s: status %ld", cases[i].name, r.status);
        cr_expect_eq(r.version, cases[i].version, "%s: spoke HTTP/%ld", cases[i].name, r.version);
        cr_expect(strstr(r.body, "\"ok\"") != NULL, "%s: %s", cases[i].name, r.body);
        char rid[64];
        cr_expect_not_null(bgt_resp_header(&r, "x-request-id", rid, sizeof(rid)),
                           "%s: no x-request-id", cases[i].name);
        bgt_resp_free(&r);
    }
}

Test(edge, request_id_from_the_client_is_kept)
{
    const char *h[] = {"X-Request-Id: trace-abc-123456", NULL};
    bgt_resp_t r;
    get(BGT_H2C, E.base, "/healthz", h, &r);
    char rid[64];
    cr_assert_str_eq(bgt_resp_header(&r, "x-request-id", rid, sizeof(rid)), "trace-abc-123456");
    bgt_resp_free(&r);
    const char *bad[] = {"X-Request-Id: <script>", NULL};
    get(BGT_H2C, E.base, "/healthz", bad, &r);
    cr_assert_str_neq(bgt_resp_header(&r, "x-request-id", rid, sizeof(rid)), "<script>");
    bgt_resp_free(&r);
}

Test(edge, readyz_reports_ready_when_redis_postgres_and_migrations_are_fine)
{
    bgt_resp_t r;
    get(BGT_H2C, E.base, "/readyz", NULL, &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert(strstr(r.body, "\"redis\":\"ok\"") != NULL, "%s", r.body);
    cr_assert(strstr(r.body, "\"postgres\":\"ok\"") != NULL, "%s", r.body);
    cr_assert(strstr(r.body, "\"migrations\":\"current\"") != NULL, "%s", r.body);
    bgt_resp_free(&r);
}

Test(edge, readyz_is_503_while_redis_is_down_and_recovers)
{
    int port = E.redis.port;
    bgt_redis_stop(&E.redis);
    bgt_resp_t r;
    get(BGT_H2C, E.base, "/readyz", NULL, &r);
    cr_assert_eq(r.status, 503, "%s", r.body);
    cr_assert(strstr(r.body, "\"code\":\"service_unavailable\"") != NULL, "%s", r.body);
    cr_assert(strstr(r.body, "\"redis\":\"unreachable\"") != NULL, "%s", r.body);
    char ra[16];
    cr_assert_not_null(bgt_resp_header(&r, "retry-after", ra, sizeof(ra)));
    bgt_resp_free(&r);
    (void)port;
}

Test(edge, readyz_times_out_on_a_hung_redis_instead_of_hanging)
{
    bgt_redis_pause(&E.redis, true);
    long long t0 = bgt_now_ms();
    bgt_resp_t r;
    get(BGT_H2C, E.base, "/readyz", NULL, &r);
    long long took = bgt_now_ms() - t0;
    bgt_redis_pause(&E.redis, false);
    cr_assert_eq(r.status, 503, "%s", r.body);
    cr_assert(strstr(r.body, "\"redis\":\"timeout\"") != NULL, "%s", r.body);
    cr_assert(took < 5000, "readyz took %lld ms", took);
    bgt_resp_free(&r);
}

Test(edge, unknown_path_is_a_localized_404_in_the_one_error_format)
{
    bgt_resp_t r;
    get(BGT_H2C, E.base, "/no/such/thing", NULL, &r);
    cr_assert_eq(r.status, 404);
    cr_assert(strstr(r.body, "{\"error\":{\"code\":\"not_found\",\"message\":\"") == r.body, "%s",
              r.body);
    cr_assert(strstr(r.body, "\"request_id\":\"") != NULL, "%s", r.body);
    char en[512];
    snprintf(en, sizeof(en), "%s", r.body);
    bgt_resp_free(&r);

    const char *ru[] = {"Accept-Language: ru-RU,ru;q=0.9,en;q=0.5", NULL};
    get(BGT_H2C, E.base, "/no/such/thing", ru, &r);
    cr_assert_eq(r.status, 404);
    char *msg_ru = strstr(r.body, "\"message\":\"");
    char *msg_en = strstr(en, "\"message\":\"");
    cr_assert(msg_ru != NULL && msg_en != NULL);
    cr_assert(strncmp(msg_ru, msg_en, 40) != 0, "Russian message equals English: %s", r.body);
    bgt_resp_free(&r);
}

Test(edge, wrong_method_is_405)
{
    char url[128];
    snprintf(url, sizeof(url), "%s/healthz", E.base);
    bgt_resp_t r;
    cr_assert_eq(bgt_http(BGT_H2C, "DELETE", url, NULL, NULL, 0, &r), 0);
    cr_assert_eq(r.status, 405);
    cr_assert(strstr(r.body, "\"code\":\"method_not_allowed\"") != NULL, "%s", r.body);
    bgt_resp_free(&r);
}

Test(edge, oversized_body_is_refused_without_harm)
{
    size_t len = 2 * 1024 * 1024; /* the default limit is 1 MiB */
    char *body = malloc(len);
    memset(body, 'a', len);
    char url[128];
    snprintf(url, sizeof(url), "%s/healthz", E.base);
    bgt_resp_t r;
    /* HTTP/1.1: h2o refuses it before our handler with 413 */
    cr_assert_eq(bgt_http(BGT_H1, "POST", url, NULL, body, len, &r), 0, "%s", r.error);
    cr_assert_eq(r.status, 413);
    bgt_resp_free(&r);
    /* HTTP/2: libh2o 2.2.5 resets the stream; the client sees an error, never a 2xx */
    (void)bgt_http(BGT_H2C, "POST", url, NULL, body, len, &r);
    cr_assert(r.status == 0 || r.status == 413, "status %ld", r.status);
    bgt_resp_free(&r);
    free(body);
    /* and the server is still fine */
    get(BGT_H2C, E.base, "/healthz", NULL, &r);
    cr_assert_eq(r.status, 200);
    bgt_resp_free(&r);
}

Test(edge, metrics_count_requests_by_route_and_status)
{
    bgt_resp_t r;
    for (int i = 0; i < 3; i++) {
        get(BGT_H2C, E.base, "/healthz", NULL, &r);
        bgt_resp_free(&r);
    }
    get(BGT_H2C, E.base, "/nope", NULL, &r);
    bgt_resp_free(&r);
    get(BGT_H1, E.base, "/metrics", NULL, &r);
    cr_assert_eq(r.status, 200);
    char ct[128];
    cr_assert(strstr(bgt_resp_header(&r, "content-type", ct, sizeof(ct)), "text/plain") != NULL);
    cr_assert(strstr(r.body,
                     "bg_http_requests_total{route=\"healthz\",method=\"GET\",status=\"200\"} ") !=
                  NULL,
              "%s", r.body);
    cr_assert(
        strstr(r.body,
               "bg_http_requests_total{route=\"unmatched\",method=\"GET\",status=\"404\"} 1") !=
            NULL,
        "%s", r.body);
    cr_assert(
        strstr(r.body, "bg_http_request_duration_seconds_bucket{route=\"healthz\",le=\"+Inf\"}") !=
            NULL,
        "%s", r.body);
    cr_assert(strstr(r.body, "bg_sse_streams_open") != NULL, "%s", r.body);
    bgt_resp_free(&r);
}

Test(edge, sigterm_lets_an_in_flight_request_finish_then_exits_cleanly)
{
    /* a hung Redis keeps /readyz in flight for up to BG_REDIS_TIMEOUT_MS (1.5 s) */
    bgt_redis_pause(&E.redis, true);
    char url[128];
    snprintf(url, sizeof(url), "%s/readyz", E.base);
    pid_t client = fork();
    if (client == 0) {
        bgt_resp_t r;
        int rc = bgt_http(BGT_H2C, "GET", url, NULL, NULL, 0, &r);
        _exit(rc == 0 && r.status == 503 ? 0 : 1);
    }
    usleep(300 * 1000);
    kill(E.pid, SIGTERM);
    int st = bgt_wait(E.pid, 8000);
    E.pid = 0;
    bgt_redis_pause(&E.redis, false);
    cr_assert(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "edge exit status %d", st);
    int cst = bgt_wait(client, 5000);
    cr_assert(cst != -1 && WIFEXITED(cst) && WEXITSTATUS(cst) == 0,
              "the in-flight request did not get its answer");
    /* nothing listens any more */
    bgt_resp_t r;
    snprintf(url, sizeof(url), "%s/healthz", E.base);
    cr_assert_neq(bgt_http(BGT_H1, "GET", url, NULL, NULL, 0, &r), 0);
    bgt_resp_free(&r);
}

Test(edge, malformed_config_stops_with_a_message_naming_the_variable)
{
    const char *env[] = {"BG_ENV_FILE=/nonexistent", "BG_HTTP_PORT=eighty", NULL};
    const char *argv[] = {bgt_bin("bg-edge"), NULL};
    char out[2048];
    int st = bgt_run(argv, env, out, sizeof(out));
    cr_assert_eq(st, 2, "exit %d: %s", st, out);
    cr_assert(strstr(out, "BG_HTTP_PORT") != NULL, "%s", out);
}

Test(edge, a_missing_token_key_stops_with_a_message_naming_the_variable)
{
    const char *argv[] = {bgt_bin("bg-edge"), NULL};
    char port[32], out[4096];
    snprintf(port, sizeof(port), "BG_HTTP_PORT=%d", bgt_free_port());
    const char *env[] = {"BG_ENV_FILE=/nonexistent",
                         port,
                         "BG_HTTPS_PORT=0",
                         "BG_LOG_FORMAT=text",
                         "BG_JWT_SECRET=",
                         "BG_JWT_KEYS=",
                         NULL};
    int st = bgt_run(argv, env, out, sizeof(out));
    cr_assert_eq(st, 2, "exit %d: %s", st, out);
    cr_assert(strstr(out, "BG_JWT_SECRET") != NULL, "%s", out);
}

Test(edge, a_busy_port_stops_with_a_clear_message)
{
    const char *argv[] = {bgt_bin("bg-edge"), NULL};
    char port[32], out[4096];
    snprintf(port, sizeof(port), "BG_HTTP_PORT=%d", E.http_port);
    const char *env[] = {"BG_ENV_FILE=/nonexistent",
                         port,
                         "BG_HTTPS_PORT=0",
                         "BG_LOG_FORMAT=text",
                         "BG_JWT_SECRET=0123456789abcdef0123456789abcdef-test",
                         NULL};
    int st = bgt_run(argv, env, out, sizeof(out));
    cr_assert_eq(st, 1, "exit %d: %s", st, out);
    cr_assert(strstr(out, "cannot listen") != NULL, "%s", out);
}

Test(edge, starts_without_redis_and_postgres_and_reports_not_ready)
{
    bgt_stop(E.pid, SIGTERM, 5000);
    E.pid = 0;
    int dead_redis = bgt_free_port(), dead_pg = bgt_free_port();
    char r_url[64], p_url[128];
    snprintf(r_url, sizeof(r_url), "BG_REDIS_URL=redis://127.0.0.1:%d/0", dead_redis);
    snprintf(p_url, sizeof(p_url), "BG_DATABASE_URL=postgresql://bg@127.0.0.1:%d/bg", dead_pg);
    const char *extra[] = {r_url, p_url, NULL};
    E.pid = start_edge(&E, extra);
    char url[128];
    snprintf(url, sizeof(url), "%s/healthz", E.base);
    cr_assert_eq(bgt_wait_http(url, 200, 10000), 0);
    bgt_resp_t r;
    get(BGT_H2C, E.base, "/readyz", NULL, &r);
    cr_assert_eq(r.status, 503, "%s", r.body);
    cr_assert(strstr(r.body, "\"redis\":\"unreachable\"") != NULL, "%s", r.body);
    cr_assert(strstr(r.body, "\"postgres\":\"unreachable\"") != NULL, "%s", r.body);
    bgt_resp_free(&r);
}
