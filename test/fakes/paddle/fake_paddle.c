/*
 * bg-fake-paddle: a small stand-in for the Paddle Billing API, for the end-to-end tests.
 *
 *   bg-fake-paddle PORT LOGFILE API_KEY
 *
 * Speaks HTTP/1.1 on 127.0.0.1:PORT, one connection at a time, "Connection: close". Answers with
 * Paddle's JSON shapes ({"data":…,"meta":{"request_id"}} and {"error":{"type","code","detail",
 * "documentation_url"},"meta":…}):
 *   POST  /transactions               201, data {id "txn_fake<n>", status "ready", items,
 *                                     custom_data (echoed), checkout {url}}
 *   POST  /subscriptions/{id}/cancel  200, data {id, status "active", scheduled_change cancel}
 *   PATCH /subscriptions/{id}         200, data {id, status "active", scheduled_change null}
 * A wrong or missing "Authorization: Bearer API_KEY" gets 403 forbidden, a body without
 * items[0].price_id on /transactions 400 invalid_field, an unknown path 404 not_found.
 *
 * GET /__health answers 200 (for start-up).
 * Failures on demand: POST /__fail with a body such as "429,500" makes the next requests answer
 * those statuses in turn (429 carries Retry-After: 1, as Paddle's does) before it answers normally
 * again. Every request is appended to LOGFILE as one line "METHOD PATH STATUS AUTH_OK BODY", so a
 * test can check what was called, how often and with what.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define HEAD_MAX 16384
#define BODY_MAX 65536

static int fails[32];
static size_t nfails, fail_at;
static int txn_seq;

static void reply(int fd, int status, const char *extra_headers, const char *body)
{
    const char *reason = status == 200   ? "OK"
                         : status == 201 ? "Created"
                         : status == 400 ? "Bad Request"
                         : status == 403 ? "Forbidden"
                         : status == 404 ? "Not Found"
                         : status == 429 ? "Too Many Requests"
                                         : "Error";
    char head[512];
    int n = snprintf(head, sizeof(head),
                     "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
                     "%sConnection: close\r\n\r\n",
                     status, reason, strlen(body), extra_headers != NULL ? extra_headers : "");
    if (write(fd, head, (size_t)n) < 0 || write(fd, body, strlen(body)) < 0)
        perror("fake_paddle: write");
}

static void error_reply(int fd, int status, const char *type, const char *code, const char *extra)
{
    char body[512];
    snprintf(body, sizeof(body),
             "{\"error\":{\"type\":\"%s\",\"code\":\"%s\",\"detail\":\"fake_paddle says %s\","
             "\"documentation_url\":\"https://developer.paddle.com/v1/errors/shared/%s\"},"
             "\"meta\":{\"request_id\":\"fake-%d\"}}",
             type, code, code, code, txn_seq);
    reply(fd, status, extra, body);
}

/* Copies the JSON string value after "key": in body into out ("" when absent). */
static void find_str(const char *body, const char *key, char *out, size_t outlen)
{
    char pat[64];
    snprintf(pat, sizeof(pat), "\"%s\":\"", key);
    const char *p = strstr(body, pat);
    out[0] = '\0';
    if (p == NULL)
        return;
    p += strlen(pat);
    size_t i = 0;
    while (p[i] != '\0' && p[i] != '"' && i + 1 < outlen) {
        out[i] = p[i];
        i++;
    }
    out[i] = '\0';
}

static int handle(int fd, const char *method, const char *path, bool auth_ok, const char *body)
{
    if (strcmp(path, "/__health") == 0) {
        reply(fd, 200, NULL, "{}");
        return 200;
    }
    if (strcmp(path, "/__fail") == 0) {
        nfails = fail_at = 0;
        for (const char *p = body; *p != '\0' && nfails < 32;) {
            char *end;
            long v = strtol(p, &end, 10);
            if (end == p)
                break;
            fails[nfails++] = (int)v;
            p = *end == ',' ? end + 1 : end;
        }
        reply(fd, 200, NULL, "{}");
        return 200;
    }
    if (fail_at < nfails) {
        int st = fails[fail_at++];
        if (st == 429)
            error_reply(fd, 429, "request_error", "too_many_requests", "Retry-After: 1\r\n");
        else
            error_reply(fd, st, "api_error", "internal_error", NULL);
        return st;
    }
    if (!auth_ok) {
        error_reply(fd, 403, "request_error", "forbidden", NULL);
        return 403;
    }
    char out[4096];
    if (strcmp(method, "POST") == 0 && strcmp(path, "/transactions") == 0) {
        char price[128], user[64];
        find_str(body, "price_id", price, sizeof(price));
        find_str(body, "user_id", user, sizeof(user));
        if (price[0] == '\0') {
            error_reply(fd, 400, "request_error", "invalid_field", NULL);
            return 400;
        }
        txn_seq++;
        snprintf(out, sizeof(out),
                 "{\"data\":{\"id\":\"txn_fake%05d\",\"status\":\"ready\",\"customer_id\":null,"
                 "\"address_id\":null,\"business_id\":null,\"custom_data\":{\"user_id\":\"%s\"},"
                 "\"origin\":\"api\",\"collection_mode\":\"automatic\",\"subscription_id\":null,"
                 "\"currency_code\":\"USD\",\"items\":[{\"price\":{\"id\":\"%s\"},\"quantity\":1}],"
                 "\"checkout\":{\"url\":\"https://checkout.example.com/pay?_ptxn=txn_fake%05d\"}},"
                 "\"meta\":{\"request_id\":\"fake-%d\"}}",
                 txn_seq, user, price, txn_seq, txn_seq);
        reply(fd, 201, NULL, out);
        return 201;
    }
    char sub[128];
    if (strncmp(path, "/subscriptions/", 15) == 0 && strlen(path) < 100) {
        snprintf(sub, sizeof(sub), "%.127s", path + 15);
        char *slash = strchr(sub, '/');
        bool cancel = slash != NULL && strcmp(slash, "/cancel") == 0;
        if (slash != NULL)
            *slash = '\0';
        if ((cancel && strcmp(method, "POST") == 0) ||
            (slash == NULL && strcmp(method, "PATCH") == 0)) {
            snprintf(out, sizeof(out),
                     "{\"data\":{\"id\":\"%s\",\"status\":\"active\",\"scheduled_change\":%s},"
                     "\"meta\":{\"request_id\":\"fake-%d\"}}",
                     sub,
                     cancel ? "{\"action\":\"cancel\",\"effective_at\":\"2030-01-01T00:00:00Z\","
                              "\"resume_at\":null}"
                            : "null",
                     txn_seq);
            reply(fd, 200, NULL, out);
            return 200;
        }
    }
    error_reply(fd, 404, "request_error", "not_found", NULL);
    return 404;
}

static void serve(int fd, FILE *log, const char *api_key)
{
    char *buf = malloc(HEAD_MAX + BODY_MAX + 1);
    size_t len = 0;
    char *body = NULL;
    size_t need = 0;
    while (len < HEAD_MAX + BODY_MAX) {
        ssize_t n = read(fd, buf + len, HEAD_MAX + BODY_MAX - len);
        if (n <= 0)
            break;
        len += (size_t)n;
        buf[len] = '\0';
        if (body == NULL) {
            char *end = strstr(buf, "\r\n\r\n");
            if (end == NULL)
                continue;
            body = end + 4;
            const char *cl = strcasestr(buf, "\r\ncontent-length:");
            need = cl != NULL ? (size_t)strtoul(cl + 17, NULL, 10) : 0;
        }
        if ((size_t)(buf + len - body) >= need)
            break;
    }
    if (body == NULL) {
        free(buf);
        return;
    }
    body[need] = '\0';
    char method[16] = "", path[512] = "";
    if (sscanf(buf, "%15s %511s", method, path) != 2) {
        free(buf);
        return;
    }
    char want[600];
    snprintf(want, sizeof(want), "\r\nauthorization: bearer %s\r\n", api_key);
    bool auth_ok = strcasestr(buf, want) != NULL;
    int st = handle(fd, method, path, auth_ok, body);
    fprintf(log, "%s %s %d %d %s\n", method, path, st, auth_ok ? 1 : 0, body);
    fflush(log);
    free(buf);
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: fake_paddle PORT LOGFILE API_KEY\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    FILE *log = fopen(argv[2], "a");
    if (log == NULL) {
        perror("fake_paddle: log");
        return 1;
    }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    (void)setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)strtol(argv[1], NULL, 10)),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(s, (struct sockaddr *)&a, sizeof(a)) != 0 || listen(s, 16) != 0) {
        perror("fake_paddle: listen");
        return 1;
    }
    for (;;) {
        int fd = accept(s, NULL, NULL);
        if (fd < 0)
            continue;
        serve(fd, log, argv[3]);
        close(fd);
    }
}
