/*
 * Test support implementation. See bgtest.h.
 */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bgtest.h"

extern char **environ;

long long bgt_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};
    nanosleep(&ts, NULL);
}

/* Binds port on 127.0.0.1 (0: the kernel's choice) and lets it go; returns it, or -1 when taken. */
static int probe_port(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons((uint16_t)port);
    socklen_t len = sizeof(a);
    int got = -1;
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        got = ntohs(a.sin_port);
    close(fd);
    return got;
}

/*
 * A port below Linux's ephemeral range (32768-60999), so that the outgoing connections of
 * everything else running (clients of Redis, Postgres, the edge), which take their local ports from
 * that range, cannot land on it before the server meant for it binds it. Each process takes its
 * ports in turn from a block of 32 of its own (by its pid, one of 399 blocks from 20000), so two
 * test processes picking at the same moment do not pick the same port; the bind check skips one in
 * use, and the kernel picks when the block is full.
 */
int bgt_free_port(void)
{
    static int next;
    int base = 20000 + (int)(getpid() % 399) * 32;
    for (int i = 0; i < 32; i++) {
        int port = probe_port(base + (next++ % 32));
        if (port > 0)
            return port;
    }
    return probe_port(0);
}

const char *bgt_bin(const char *name)
{
    static _Thread_local char path[4][512];
    static _Thread_local int next;
    char *p = path[next++ % 4];
    snprintf(p, 512, "%s/%s", BGT_BIN_DIR, name);
    return p;
}

int bgt_tempdir(char *out, size_t outlen)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(out, outlen, "%s/bgt.XXXXXX", tmp != NULL ? tmp : "/tmp");
    return mkdtemp(out) != NULL ? 0 : -1;
}

void bgt_rmtree(const char *path)
{
    if (path == NULL || path[0] == '\0')
        return;
    const char *argv[] = {"rm", "-rf", path, NULL};
    char out[64];
    (void)bgt_run(argv, NULL, out, sizeof(out));
}

static char **build_env(const char *const extra[])
{
    size_t n = 0, m = 0;
    while (environ[n] != NULL)
        n++;
    while (extra != NULL && extra[m] != NULL)
        m++;
    char **env = calloc(n + m + 1, sizeof(char *));
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        /* drop variables that extra overrides */
        const char *eq = strchr(environ[i], '=');
        size_t nl = eq != NULL ? (size_t)(eq - environ[i]) : strlen(environ[i]);
        bool overridden = false;
        for (size_t j = 0; j < m; j++) {
            if (strncmp(extra[j], environ[i], nl) == 0 && extra[j][nl] == '=')
                overridden = true;
        }
        if (!overridden)
            env[k++] = environ[i];
    }
    for (size_t j = 0; j < m; j++)
        env[k++] = (char *)extra[j];
    env[k] = NULL;
    return env;
}

pid_t bgt_spawn(const char *const argv[], const char *const env[], const char *log_path)
{
    char **envp = build_env(env);
    pid_t pid = fork();
    if (pid == 0) {
        if (log_path != NULL) {
            int fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND, 0644);
            if (fd >= 0) {
                dup2(fd, 1);
                dup2(fd, 2);
                close(fd);
            }
        }
        int devnull = open("/dev/null", O_RDONLY);
        if (devnull >= 0) {
            dup2(devnull, 0);
            close(devnull);
        }
        execve(argv[0], (char *const *)argv, envp);
        execvpe(argv[0], (char *const *)argv, envp);
        _exit(127);
    }
    free(envp);
    return pid;
}

int bgt_wait(pid_t pid, int timeout_ms)
{
    long long deadline = bgt_now_ms() + timeout_ms;
    for (;;) {
        int status;
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid)
            return status;
        if (r < 0)
            return -1;
        if (bgt_now_ms() >= deadline)
            return -1;
        sleep_ms(10);
    }
}

int bgt_stop(pid_t pid, int sig, int timeout_ms)
{
    if (pid <= 0)
        return -1;
    kill(pid, sig);
    int st = bgt_wait(pid, timeout_ms);
    if (st == -1) {
        kill(pid, SIGKILL);
        st = bgt_wait(pid, 5000);
    }
    return st;
}

int bgt_run(const char *const argv[], const char *const env[], char *out, size_t outlen)
{
    int fds[2];
    if (pipe(fds) != 0)
        return -1;
    char **envp = build_env(env);
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        dup2(fds[1], 1);
        dup2(fds[1], 2);
        close(fds[1]);
        execve(argv[0], (char *const *)argv, envp);
        execvpe(argv[0], (char *const *)argv, envp);
        _exit(127);
    }
    free(envp);
    close(fds[1]);
    size_t len = 0;
    for (;;) {
        char chunk[4096];
        ssize_t n = read(fds[0], chunk, sizeof(chunk));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        size_t take = (size_t)n;
        if (outlen > 0 && len + take > outlen - 1)
            take = outlen - 1 - len;
        memcpy(out + len, chunk, take);
        len += take;
    }
    if (outlen > 0)
        out[len] = '\0';
    close(fds[0]);
    int status;
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status))
        return -1;
    return WEXITSTATUS(status);
}

/* ---- Redis ---- */

int bgt_redis_start(bgt_redis_t *r)
{
    memset(r, 0, sizeof(*r));
    if (bgt_tempdir(r->dir, sizeof(r->dir)) != 0)
        return -1;
    for (int attempt = 0; attempt < 5; attempt++) {
        r->port = bgt_free_port();
        char port[16];
        snprintf(port, sizeof(port), "%d", r->port);
        const char *argv[] = {"redis-server",
                              "--port",
                              port,
                              "--bind",
                              "127.0.0.1",
                              "--dir",
                              r->dir,
                              "--save",
                              "",
                              "--appendonly",
                              "no",
                              "--protected-mode",
                              "no",
                              "--loglevel",
                              "warning",
                              NULL};
        char log[300];
        snprintf(log, sizeof(log), "%s/redis.log", r->dir);
        r->pid = bgt_spawn(argv, NULL, log);
        snprintf(r->url, sizeof(r->url), "redis://127.0.0.1:%d/0", r->port);
        long long deadline = bgt_now_ms() + 5000;
        while (bgt_now_ms() < deadline) {
            const char *ping[] = {"redis-cli", "-p", port, "ping", NULL};
            char out[64];
            if (bgt_run(ping, NULL, out, sizeof(out)) == 0 && strstr(out, "PONG") != NULL)
                return 0;
            int st;
            if (waitpid(r->pid, &st, WNOHANG) == r->pid)
                break; /* port taken: try another */
            sleep_ms(20);
        }
        bgt_stop(r->pid, SIGKILL, 1000);
    }
    return -1;
}

void bgt_redis_stop(bgt_redis_t *r)
{
    if (r->pid > 0) {
        kill(r->pid, SIGCONT);
        bgt_stop(r->pid, SIGTERM, 3000);
        r->pid = 0;
    }
    bgt_rmtree(r->dir);
    r->dir[0] = '\0';
}

void bgt_redis_pause(bgt_redis_t *r, bool paused)
{
    if (r->pid > 0)
        kill(r->pid, paused ? SIGSTOP : SIGCONT);
}

/* ---- Postgres ---- */

/* Writes base with its database name replaced by dbname into out. */
static void url_with_db(const char *base, const char *dbname, char *out, size_t outlen)
{
    const char *hostpart = strstr(base, "://");
    hostpart = hostpart != NULL ? hostpart + 3 : base;
    const char *slash = strchr(hostpart, '/');
    const char *query = strchr(hostpart, '?');
    size_t prefix = slash != NULL   ? (size_t)(slash - base)
                    : query != NULL ? (size_t)(query - base)
                                    : strlen(base);
    snprintf(out, outlen, "%.*s/%s%s", (int)prefix, base, dbname, query != NULL ? query : "");
}

static int admin_exec(const char *sql)
{
    const char *admin = getenv("BG_TEST_DATABASE_URL");
    PGconn *c = PQconnectdb(admin);
    int rc = -1;
    if (PQstatus(c) == CONNECTION_OK) {
        PGresult *res = PQexec(c, sql);
        rc = PQresultStatus(res) == PGRES_COMMAND_OK ? 0 : -1;
        if (rc != 0)
            fprintf(stderr, "bgtest: %s: %s", sql, PQerrorMessage(c));
        PQclear(res);
    } else {
        fprintf(stderr, "bgtest: cannot connect to BG_TEST_DATABASE_URL: %s", PQerrorMessage(c));
    }
    PQfinish(c);
    return rc;
}

int bgt_pg_create(bgt_pg_t *db, bool migrate)
{
    const char *admin = getenv("BG_TEST_DATABASE_URL");
    memset(db, 0, sizeof(*db));
    if (admin == NULL || admin[0] == '\0')
        cr_skip_test("BG_TEST_DATABASE_URL is not set (run through make test)");
    static unsigned counter;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    snprintf(db->name, sizeof(db->name), "bgt_%d_%u_%ld", (int)getpid(), counter++,
             ts.tv_nsec % 100000);
    char sql[160];
    snprintf(sql, sizeof(sql), "CREATE DATABASE %s", db->name);
    if (admin_exec(sql) != 0)
        return -1;
    url_with_db(admin, db->name, db->url, sizeof(db->url));
    if (migrate) {
        char env_url[600];
        snprintf(env_url, sizeof(env_url), "BG_DATABASE_URL=%s", db->url);
        const char *env[] = {env_url, "BG_LOG_LEVEL=warn", NULL};
        const char *argv[] = {bgt_bin("bgctl"), "migrate", NULL};
        char out[4096];
        int st = bgt_run(argv, env, out, sizeof(out));
        if (st != 0) {
            fprintf(stderr, "bgtest: bgctl migrate failed (%d): %s\n", st, out);
            return -1;
        }
    }
    return 0;
}

void bgt_pg_drop(bgt_pg_t *db)
{
    if (db->name[0] == '\0')
        return;
    char sql[160];
    snprintf(sql, sizeof(sql), "DROP DATABASE IF EXISTS %s WITH (FORCE)", db->name);
    (void)admin_exec(sql);
    db->name[0] = '\0';
}

/* ---- HTTP ---- */

typedef struct st_acc {
    char *p;
    size_t len;
} acc_t;

static size_t acc_write(char *ptr, size_t size, size_t nmemb, void *ud)
{
    acc_t *a = ud;
    size_t n = size * nmemb;
    a->p = realloc(a->p, a->len + n + 1);
    memcpy(a->p + a->len, ptr, n);
    a->len += n;
    a->p[a->len] = '\0';
    return n;
}

int bgt_http(int mode, const char *method, const char *url, const char *const headers[],
             const char *body, size_t body_len, bgt_resp_t *resp)
{
    memset(resp, 0, sizeof(*resp));
    CURL *c = curl_easy_init();
    acc_t b = {NULL, 0}, h = {NULL, 0};
    struct curl_slist *hl = NULL;
    for (size_t i = 0; headers != NULL && headers[i] != NULL; i++)
        hl = curl_slist_append(hl, headers[i]);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, hl);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, acc_write);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, acc_write);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, &h);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 30000L);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, resp->error);
    if (body != NULL) {
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)body_len);
    } else if (strcmp(method, "HEAD") == 0) {
        curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
    }
    switch (mode) {
    case BGT_H2C:
        curl_easy_setopt(c, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE);
        break;
    case BGT_H2C_UPGRADE:
        curl_easy_setopt(c, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2_0);
        break;
    case BGT_H2_TLS:
        curl_easy_setopt(c, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2TLS);
        curl_easy_setopt(c, CURLOPT_SSL_VERIFYPEER, 0L);
        curl_easy_setopt(c, CURLOPT_SSL_VERIFYHOST, 0L);
        break;
    default:
        curl_easy_setopt(c, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
        break;
    }
    CURLcode rc = curl_easy_perform(c);
    if (rc == CURLE_OK) {
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &resp->status);
        long v = 0;
        curl_easy_getinfo(c, CURLINFO_HTTP_VERSION, &v);
        resp->version = v == CURL_HTTP_VERSION_2_0 ? 2 : 1;
    } else if (resp->error[0] == '\0') {
        snprintf(resp->error, sizeof(resp->error), "%s", curl_easy_strerror(rc));
    }
    resp->body = b.p != NULL ? b.p : strdup("");
    resp->body_len = b.len;
    resp->headers = h.p != NULL ? h.p : strdup("");
    curl_slist_free_all(hl);
    curl_easy_cleanup(c);
    return rc == CURLE_OK ? 0 : -1;
}

void bgt_resp_free(bgt_resp_t *resp)
{
    free(resp->body);
    free(resp->headers);
    resp->body = resp->headers = NULL;
}

const char *bgt_resp_header(const bgt_resp_t *resp, const char *name, char *buf, size_t buflen)
{
    size_t nl = strlen(name);
    const char *line = resp->headers;
    while (line != NULL && *line != '\0') {
        const char *end = strchr(line, '\n');
        size_t ll = end != NULL ? (size_t)(end - line) : strlen(line);
        if (ll > nl && strncasecmp(line, name, nl) == 0 && line[nl] == ':') {
            const char *v = line + nl + 1;
            while (*v == ' ')
                v++;
            size_t vl = (size_t)(line + ll - v);
            while (vl > 0 && (v[vl - 1] == '\r' || v[vl - 1] == ' '))
                vl--;
            snprintf(buf, buflen, "%.*s", (int)vl, v);
            return buf;
        }
        line = end != NULL ? end + 1 : NULL;
    }
    return NULL;
}

int bgt_wait_http(const char *url, long want_status, int timeout_ms)
{
    long long deadline = bgt_now_ms() + timeout_ms;
    while (bgt_now_ms() < deadline) {
        bgt_resp_t r;
        int rc = bgt_http(BGT_H1, "GET", url, NULL, NULL, 0, &r);
        long st = r.status;
        bgt_resp_free(&r);
        if (rc == 0 && st == want_status)
            return 0;
        sleep_ms(50);
    }
    return -1;
}
