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
 *   PATCH /subscriptions/{id}         200, data {id, status "active", scheduled_change null,
 *                                     items [{price {id}}] (the price_id of the body's items, a
 *                                     plan change, or the last one set)}; a body with items but
 *                                     no proration_billing_mode is 400 invalid_field, as Paddle's
 *   GET   /transactions/{id}          200, data {id, status, custom_data, customer_id,
 *                                     subscription_id, checkout {url}} of a transaction created
 *                                     above (status "ready") or set with POST /__txn; else 404
 *   GET   /subscriptions/{id}/update-payment-method-transaction
 *                                     200, data {id "txn_due_<sub>", status "past_due",
 *                                     subscription_id, checkout {url}}
 * A wrong or missing "Authorization: Bearer API_KEY" gets 403 forbidden, a body without
 * items[0].price_id on /transactions 400 invalid_field, an unknown path 404 not_found.
 *
 *   GET   /subscriptions?…, /transactions?…, /adjustments[?…]
 *                                     the entities set with POST /__sub, /__txn_entity and /__adj
 *                                     (their bodies: Paddle's entity JSON, "id" first; one with the
 *                                     id of an entity set before replaces it, as a later state of
 *                                     that entity), in the order set, one per page as Paddle
 *                                     paginates: meta.pagination {per_page, next (absolute URL with
 *                                     after=<last id>), has_more, estimated_total}; filters other
 *                                     than after are not applied
 * GET /__health answers 200 (for start-up). POST /__txn with "ID STATUS USER_ID" sets a
 * transaction GET /transactions/{id} answers (USER_ID "-" for none).
 * Failures on demand: POST /__fail with a body such as "429,500" makes the next requests answer
 * those statuses in turn (429 carries Retry-After: 1, as Paddle's does) before it answers normally
 * again; a body such as "/adjustments 429,503" does so for the next requests whose path starts
 * with /adjustments only, the others answering normally. Every request is appended to LOGFILE as
 * one line "METHOD PATH STATUS AUTH_OK BODY", so a test can check what was called, how often and
 * with what.
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
static char fail_prefix[128]; /* "" or the path prefix the failures are for */
static int txn_seq;
static const char *self_port;

static void reply(int fd, int status, const char *extra_headers, const char *body);

/* Entities the list endpoints answer (owned JSON texts). */
static char *subs_list[32], *txns_list[32], *adjs_list[32];
static size_t nsubs, ntxns_list, nadjs;

/* Copies the value of the entity's first "id" into id ("" when none). */
static void entity_id(const char *entity, char *id, size_t idlen)
{
    const char *p = strstr(entity, "\"id\":\"");
    size_t il = p != NULL ? strcspn(p + 6, "\"") : 0;
    snprintf(id, idlen, "%.*s", (int)il, p != NULL ? p + 6 : "");
}

/* Adds entity (copied) to list, or replaces the one with its id. */
static void put_entity(char *list[], size_t *n, const char *entity)
{
    char id[128], other[128];
    entity_id(entity, id, sizeof(id));
    for (size_t i = 0; i < *n; i++) {
        entity_id(list[i], other, sizeof(other));
        if (id[0] != '\0' && strcmp(id, other) == 0) {
            free(list[i]);
            list[i] = strdup(entity);
            return;
        }
    }
    if (*n < 32)
        list[(*n)++] = strdup(entity);
}

/* Answers one page (one entity) of list after the id in query (after=…). */
static int list_page(int fd, const char *path, char *const list[], size_t n)
{
    const char *q = strchr(path, '?');
    const char *after = q != NULL ? strstr(q, "after=") : NULL;
    size_t start = 0;
    if (after != NULL) {
        after += 6;
        size_t alen = strcspn(after, "&");
        for (size_t i = 0; i < n; i++) {
            char id[128];
            entity_id(list[i], id, sizeof(id));
            if (strlen(id) == alen && strncmp(id, after, alen) == 0)
                start = i + 1;
        }
    }
    char base[64];
    snprintf(base, sizeof(base), "%.*s", (int)(q != NULL ? (size_t)(q - path) : strlen(path)),
             path);
    size_t cap = 4096 + (start < n ? strlen(list[start]) : 0);
    char *out = malloc(cap);
    char next[256] = "null";
    bool more = start + 1 < n;
    if (start < n) {
        char id[128];
        entity_id(list[start], id, sizeof(id));
        snprintf(next, sizeof(next), "\"http://127.0.0.1:%s%s?after=%s&per_page=1\"", self_port,
                 base, id);
    }
    snprintf(out, cap,
             "{\"data\":[%s],\"meta\":{\"request_id\":\"fake-%d\",\"pagination\":{"
             "\"per_page\":1,\"next\":%s,\"has_more\":%s,\"estimated_total\":%zu}}}",
             start < n ? list[start] : "", txn_seq, next, more ? "true" : "false", n);
    reply(fd, 200, NULL, out);
    free(out);
    return 200;
}

/* Transactions GET /transactions/{id} knows. */
typedef struct {
    char id[64], status[24], user[64];
} txn_t;
static txn_t txns[64];
static size_t ntxns;

static void put_txn(const char *id, const char *status, const char *user)
{
    size_t i = 0;
    while (i < ntxns && strcmp(txns[i].id, id) != 0)
        i++;
    if (i == ntxns) {
        if (ntxns == sizeof(txns) / sizeof(txns[0]))
            return;
        ntxns++;
    }
    snprintf(txns[i].id, sizeof(txns[i].id), "%s", id);
    snprintf(txns[i].status, sizeof(txns[i].status), "%s", status);
    snprintf(txns[i].user, sizeof(txns[i].user), "%s", user);
}

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
        fail_prefix[0] = '\0';
        if (body[0] == '/') {
            size_t pl = strcspn(body, " ");
            snprintf(fail_prefix, sizeof(fail_prefix), "%.*s", (int)pl, body);
            body += pl + (body[pl] == ' ' ? 1 : 0);
        }
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
    if (strcmp(path, "/__txn") == 0) {
        char id[64] = "", st[24] = "", user[64] = "";
        if (sscanf(body, "%63s %23s %63s", id, st, user) == 3)
            put_txn(id, st, strcmp(user, "-") == 0 ? "" : user);
        reply(fd, 200, NULL, "{}");
        return 200;
    }
    if (strcmp(path, "/__sub") == 0 || strcmp(path, "/__txn_entity") == 0 ||
        strcmp(path, "/__adj") == 0) {
        if (strcmp(path, "/__sub") == 0)
            put_entity(subs_list, &nsubs, body);
        else if (strcmp(path, "/__txn_entity") == 0)
            put_entity(txns_list, &ntxns_list, body);
        else
            put_entity(adjs_list, &nadjs, body);
        reply(fd, 200, NULL, "{}");
        return 200;
    }
    if (fail_at < nfails && strncmp(path, fail_prefix, strlen(fail_prefix)) == 0) {
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
        char id[64];
        snprintf(id, sizeof(id), "txn_fake%05d", txn_seq);
        put_txn(id, "ready", user);
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
    if (strcmp(method, "GET") == 0 && strncmp(path, "/subscriptions?", 15) == 0)
        return list_page(fd, path, subs_list, nsubs);
    if (strcmp(method, "GET") == 0 && strncmp(path, "/transactions?", 14) == 0)
        return list_page(fd, path, txns_list, ntxns_list);
    if (strcmp(method, "GET") == 0 &&
        (strcmp(path, "/adjustments") == 0 || strncmp(path, "/adjustments?", 13) == 0))
        return list_page(fd, path, adjs_list, nadjs);
    if (strcmp(method, "GET") == 0 && strncmp(path, "/transactions/", 14) == 0) {
        for (size_t i = 0; i < ntxns; i++) {
            if (strcmp(txns[i].id, path + 14) != 0)
                continue;
            char custom[128] = "null";
            if (txns[i].user[0] != '\0')
                snprintf(custom, sizeof(custom), "{\"user_id\":\"%s\"}", txns[i].user);
            snprintf(out, sizeof(out),
                     "{\"data\":{\"id\":\"%s\",\"status\":\"%s\",\"customer_id\":null,"
                     "\"custom_data\":%s,\"subscription_id\":null,\"currency_code\":\"USD\","
                     "\"checkout\":{\"url\":\"https://checkout.example.com/pay?_ptxn=%s\"}},"
                     "\"meta\":{\"request_id\":\"fake-%d\"}}",
                     txns[i].id, txns[i].status, custom, txns[i].id, txn_seq);
            reply(fd, 200, NULL, out);
            return 200;
        }
        error_reply(fd, 404, "request_error", "not_found", NULL);
        return 404;
    }
    char sub[128];
    static char sub_price[128];
    if (strncmp(path, "/subscriptions/", 15) == 0 && strlen(path) < 100) {
        snprintf(sub, sizeof(sub), "%.127s", path + 15);
        char *slash = strchr(sub, '/');
        bool cancel = slash != NULL && strcmp(slash, "/cancel") == 0;
        bool due = slash != NULL && strcmp(slash, "/update-payment-method-transaction") == 0;
        if (slash != NULL)
            *slash = '\0';
        if (due && strcmp(method, "GET") == 0) {
            snprintf(out, sizeof(out),
                     "{\"data\":{\"id\":\"txn_due_%s\",\"status\":\"past_due\","
                     "\"subscription_id\":\"%s\",\"origin\":\"subscription_recurring\","
                     "\"checkout\":{\"url\":\"https://checkout.example.com/pay?_ptxn=txn_due_%s\"}"
                     "},\"meta\":{\"request_id\":\"fake-%d\"}}",
                     sub, sub, sub, txn_seq);
            reply(fd, 200, NULL, out);
            return 200;
        }
        if (slash == NULL && strcmp(method, "PATCH") == 0 && strstr(body, "\"items\"") != NULL) {
            char mode[64];
            find_str(body, "price_id", sub_price, sizeof(sub_price));
            find_str(body, "proration_billing_mode", mode, sizeof(mode));
            if (sub_price[0] == '\0' || mode[0] == '\0') {
                error_reply(fd, 400, "request_error", "invalid_field", NULL);
                return 400;
            }
        }
        if ((cancel && strcmp(method, "POST") == 0) ||
            (slash == NULL && strcmp(method, "PATCH") == 0)) {
            snprintf(out, sizeof(out),
                     "{\"data\":{\"id\":\"%s\",\"status\":\"active\",\"items\":[{\"price\":"
                     "{\"id\":\"%s\"},\"quantity\":1}],\"scheduled_change\":%s},"
                     "\"meta\":{\"request_id\":\"fake-%d\"}}",
                     sub, sub_price,
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
    self_port = argv[1];
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
