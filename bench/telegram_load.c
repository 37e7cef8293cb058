/*
 * telegram_load: the load generator of bench/telegram.sh. Telegram delivers webhooks over
 * HTTP/1.1 with keep-alive (up to max_connections, default 40, at once), one update per request;
 * this client does the same from many connections, each with one request in flight, on one epoll
 * loop. h2load cannot be used: it sends one body over and over, and the webhook answers a repeated
 * update_id without enqueuing it, so every request here carries its own update_id.
 *
 *   telegram_load post HOST PORT PATH SECRET CONNS REQUESTS WARMUP FIRST_ID CHATS
 *   telegram_load get  HOST PORT PATH CONNS REQUESTS WARMUP
 *
 * post: text updates (ids FIRST_ID, FIRST_ID+1, …; chat 1000000 + id mod CHATS) with the secret
 * header; get: GET PATH (/healthz), the ceiling of this client and HTTP/1.1 on this machine.
 * Prints one line on stdout: "rps=… p50_ms=… p99_ms=… requests=…" over the REQUESTS after the
 * WARMUP ones (nearest-rank percentiles of send-to-answer times), and exits 1 when any answer was
 * not 200 or a connection failed. Plain libc, built by bench/telegram.sh with cc.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define OUT_MAX 4096
#define IN_MAX 16384

typedef struct st_conn {
    int fd;
    char out[OUT_MAX];
    size_t out_len, out_off;
    char in[IN_MAX];
    size_t in_len;
    double t0;
    bool busy;
} conn_t;

static const char *g_mode, *g_host, *g_path, *g_secret;
static long long g_next_id, g_chats, g_sent, g_done, g_total, g_warmup, g_failed;
static double *g_lat;

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

static void die(const char *what)
{
    int e = errno;
    fprintf(stderr, "telegram_load: %s (errno %d)\n", what, e);
    exit(1);
}

/* Writes the next request into c->out. */
static void next_request(conn_t *c)
{
    int n;
    if (strcmp(g_mode, "post") == 0) {
        long long id = g_next_id++;
        long long chat = 1000000 + id % g_chats;
        char body[1024];
        int bl = snprintf(body, sizeof(body),
                          "{\"update_id\":%lld,\"message\":{\"message_id\":%lld,\"from\":{\"id\":"
                          "%lld,\"is_bot\":false,\"first_name\":\"Bench\",\"language_code\":\"en\"}"
                          ",\"chat\":{\"id\":%lld,\"first_name\":\"Bench\",\"type\":\"private\"},"
                          "\"date\":1700000000,\"text\":\"hello there\"}}",
                          id, id, chat, chat);
        n = snprintf(c->out, sizeof(c->out),
                     "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     "X-Telegram-Bot-Api-Secret-Token: %s\r\nContent-Length: %d\r\n\r\n%s",
                     g_path, g_host, g_secret, bl, body);
    } else {
        n = snprintf(c->out, sizeof(c->out), "GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", g_path, g_host);
    }
    c->out_len = (size_t)n;
    c->out_off = 0;
    c->in_len = 0;
    c->t0 = now_ms();
    c->busy = true;
    g_sent++;
}

/* Returns the length of a complete response in c->in, 0 when more is needed, -1 when malformed. */
static long response_len(conn_t *c, int *status)
{
    c->in[c->in_len] = '\0';
    char *end = strstr(c->in, "\r\n\r\n");
    if (end == NULL)
        return 0;
    if (sscanf(c->in, "HTTP/1.%*d %d", status) != 1)
        return -1;
    long clen = 0;
    for (char *l = strstr(c->in, "\r\n"); l != NULL && l < end; l = strstr(l + 2, "\r\n"))
        if (strncasecmp(l + 2, "content-length:", 15) == 0)
            clen = strtol(l + 17, NULL, 10);
    long total = (long)(end - c->in) + 4 + clen;
    return (long)c->in_len >= total ? total : 0;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double *v, long long n, double p)
{
    long long i = (long long)((double)n * p + 0.999999);
    if (i < 1)
        i = 1;
    return n > 0 ? v[i - 1] : 0;
}

int main(int argc, char **argv)
{
    if (argc < 2 || (strcmp(argv[1], "post") != 0 && strcmp(argv[1], "get") != 0) ||
        (strcmp(argv[1], "post") == 0 && argc != 11) ||
        (strcmp(argv[1], "get") == 0 && argc != 8)) {
        fprintf(stderr, "usage: telegram_load post HOST PORT PATH SECRET CONNS REQUESTS WARMUP "
                        "FIRST_ID CHATS | get HOST PORT PATH CONNS REQUESTS WARMUP\n");
        return 2;
    }
    g_mode = argv[1];
    g_host = argv[2];
    int port = (int)strtol(argv[3], NULL, 10);
    g_path = argv[4];
    int k = 5;
    g_secret = strcmp(g_mode, "post") == 0 ? argv[k++] : "";
    int nconns = (int)strtol(argv[k++], NULL, 10);
    long long requests = strtoll(argv[k++], NULL, 10);
    g_warmup = strtoll(argv[k++], NULL, 10);
    g_next_id = strcmp(g_mode, "post") == 0 ? strtoll(argv[k++], NULL, 10) : 0;
    g_chats = strcmp(g_mode, "post") == 0 ? strtoll(argv[k++], NULL, 10) : 1;
    if (nconns < 1 || requests < 1 || g_chats < 1)
        return 2;
    g_total = requests + g_warmup;
    g_lat = calloc((size_t)requests, sizeof(double));
    conn_t *conns = calloc((size_t)nconns, sizeof(conn_t));
    int ep = epoll_create1(0);
    if (g_lat == NULL || conns == NULL || ep < 0)
        die("set-up");
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, g_host, &a.sin_addr) != 1)
        die("HOST must be an IPv4 address");
    for (int i = 0; i < nconns; i++) {
        conn_t *c = &conns[i];
        c->fd = socket(AF_INET, SOCK_STREAM, 0);
        int one = 1;
        (void)setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&a, sizeof(a)) != 0)
            die("connect");
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) != 0)
            die("epoll_ctl");
    }
    double start = 0;
    for (int i = 0; i < nconns && g_sent < g_total; i++) {
        next_request(&conns[i]);
        if (write(conns[i].fd, conns[i].out, conns[i].out_len) != (ssize_t)conns[i].out_len)
            die("write");
    }
    if (g_warmup == 0)
        start = now_ms();
    struct epoll_event evs[256];
    while (g_done < g_total) {
        int n = epoll_wait(ep, evs, 256, 10000);
        if (n <= 0) {
            fprintf(stderr, "telegram_load: no answer for 10 s\n");
            return 1;
        }
        for (int e = 0; e < n; e++) {
            conn_t *c = evs[e].data.ptr;
            ssize_t r = read(c->fd, c->in + c->in_len, sizeof(c->in) - 1 - c->in_len);
            if (r <= 0) {
                fprintf(stderr, "telegram_load: a connection closed\n");
                return 1;
            }
            c->in_len += (size_t)r;
            int status = 0;
            long len = response_len(c, &status);
            if (len < 0) {
                fprintf(stderr, "telegram_load: malformed response\n");
                return 1;
            }
            if (len == 0)
                continue;
            double ms = now_ms() - c->t0;
            if (status != 200 && g_failed++ < 5)
                fprintf(stderr, "telegram_load: answer %d\n", status);
            if (g_done >= g_warmup)
                g_lat[g_done - g_warmup] = ms;
            g_done++;
            if (g_done == g_warmup)
                start = now_ms();
            c->busy = false;
            if (g_sent < g_total) {
                next_request(c);
                if (write(c->fd, c->out, c->out_len) != (ssize_t)c->out_len)
                    die("write");
            }
        }
    }
    double secs = (now_ms() - start) / 1000.0;
    for (int i = 0; i < nconns; i++)
        close(conns[i].fd);
    if (g_failed > 0) {
        fprintf(stderr, "telegram_load: %lld answers were not 200\n", g_failed);
        return 1;
    }
    qsort(g_lat, (size_t)requests, sizeof(double), cmp);
    printf("rps=%.0f p50_ms=%.3f p99_ms=%.3f requests=%lld\n", (double)requests / secs,
           pct(g_lat, requests, 0.5), pct(g_lat, requests, 0.99), requests);
    free(g_lat);
    free(conns);
    return 0;
}
