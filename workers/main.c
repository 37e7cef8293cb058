/*
 * bg-worker: runs the handlers of one or more roles over the consumer-group runtime, and answers
 * health checks and metrics scrapes on BG_WORKER_PORT.
 *
 *   bg-worker [--roles llm,telegram,usage,billing]
 *
 * Without --roles it runs every registered role. Redis being down at start is not fatal: the
 * worker says so and keeps retrying with backoff, and /readyz answers 503 until Redis answers.
 * SIGTERM or SIGINT stops reading, lets running jobs finish within BG_SHUTDOWN_GRACE_MS and exits
 * 0; jobs not finished stay pending for another worker.
 *
 * Every bg-worker also runs the quota reconciler (bg/reconcile.h) every BG_RECONCILE_INTERVAL_S
 * seconds; a Redis lock makes one worker at a time do a pass, and its gauges appear on /metrics.
 *
 * The HTTP responder is deliberately small: one thread, one connection at a time, a read timeout,
 * a cap on the request head, GET and HEAD only, "Connection: close". Probes and Prometheus need no
 * more, and nothing here is exposed beyond BG_BIND_ADDRESS.
 */
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "bg/buf.h"
#include "bg/config.h"
#include "bg/err.h"
#include "bg/log.h"
#include "bg/reconcile.h"
#include "bg/redis.h"
#include "roles.h"
#include "runtime.h"

#define REQUEST_MAX 8192
#define IO_TIMEOUT_MS 2000
#define METRICS_MAX (1024 * 1024)

typedef struct st_health {
    const bg_config_t *cfg; /* borrowed */
    const wk_runtime_t *rt; /* borrowed */
    int fd;                 /* listening socket, owned */
    bg_redis_t *redis;      /* owned; used by the responder thread only (for /readyz) */
    _Atomic bool stop;
    pthread_t thread;
} health_t;

/* For the signal handler: set before the handler is installed, never cleared while it is. */
static wk_runtime_t *volatile running_rt;

static void on_signal(int sig)
{
    (void)sig;
    if (running_rt != NULL)
        wk_runtime_stop(running_rt);
}

static void usage(FILE *out)
{
    size_t n;
    const wk_role_t *roles = wk_roles_all(&n);
    fprintf(out, "usage: bg-worker [--roles ROLE[,ROLE…]]\n\nroles:");
    for (size_t i = 0; i < n; i++)
        fprintf(out, " %s", roles[i].name);
    fprintf(out, "%s\n", n == 0 ? " (none registered yet)" : "");
}

/* ---- HTTP responder ---- */

static void set_io_timeouts(int fd)
{
    struct timeval tv = {IO_TIMEOUT_MS / 1000, (IO_TIMEOUT_MS % 1000) * 1000};
    (void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    (void)setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

static void write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return; /* the prober went away or stalled: nothing more to do for it */
        p += w;
        n -= (size_t)w;
    }
}

static void respond(int fd, bool head_only, int status, const char *reason, const char *ctype,
                    const char *body, size_t len)
{
    char head[256];
    int n = snprintf(head, sizeof(head),
                     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                     "Cache-Control: no-store\r\nConnection: close\r\n\r\n",
                     status, reason, ctype, len);
    if (n < 0 || (size_t)n >= sizeof(head))
        return;
    write_all(fd, head, (size_t)n);
    if (!head_only)
        write_all(fd, body, len);
}

/* Reads the request head (up to the blank line); returns its length, or -1 / -2 (too large). */
static ssize_t read_head(int fd, char *buf, size_t cap)
{
    size_t len = 0;
    while (len < cap - 1) {
        ssize_t r = recv(fd, buf + len, cap - 1 - len, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        len += (size_t)r;
        buf[len] = '\0';
        if (strstr(buf, "\r\n\r\n") != NULL || strstr(buf, "\n\n") != NULL)
            return (ssize_t)len;
    }
    return -2;
}

static void serve(health_t *h, int fd)
{
    static const char text[] = "text/plain; charset=utf-8";
    char req[REQUEST_MAX];
    ssize_t n = read_head(fd, req, sizeof(req));
    if (n == -2) {
        respond(fd, false, 431, "Request Header Fields Too Large", text, BG_STRLIT("too large\n"));
        return;
    }
    if (n < 0)
        return;
    size_t mlen = strcspn(req, " ");
    const char *path = req + mlen;
    if (*path != ' ') {
        respond(fd, false, 400, "Bad Request", text, BG_STRLIT("bad request\n"));
        return;
    }
    path++;
    size_t plen = strcspn(path, " ?\r\n");
    bool get = mlen == 3 && memcmp(req, "GET", 3) == 0;
    bool head = mlen == 4 && memcmp(req, "HEAD", 4) == 0;
    if (!get && !head) {
        respond(fd, false, 405, "Method Not Allowed", text, BG_STRLIT("method not allowed\n"));
        return;
    }
    if (plen == 8 && memcmp(path, "/healthz", 8) == 0) {
        respond(fd, head, 200, "OK", text, BG_STRLIT("ok"));
    } else if (plen == 7 && memcmp(path, "/readyz", 7) == 0) {
        redisReply *reply = NULL;
        int rc = bg_redis_command(h->redis, &reply, "PING");
        bool up = rc == 0 && reply->type == REDIS_REPLY_STATUS;
        if (reply != NULL)
            freeReplyObject(reply);
        if (up)
            respond(fd, head, 200, "OK", text, BG_STRLIT("ready"));
        else
            respond(fd, head, 503, "Service Unavailable", text, BG_STRLIT("redis unavailable"));
    } else if (plen == 8 && memcmp(path, "/metrics", 8) == 0) {
        bg_buf_t b;
        bg_buf_init(&b, METRICS_MAX);
        if (wk_runtime_metrics_text(h->rt, &b) == 0)
            respond(fd, head, 200, "OK", "text/plain; version=0.0.4; charset=utf-8",
                    b.base != NULL ? b.base : "", b.len);
        else
            respond(fd, head, 500, "Internal Server Error", text, BG_STRLIT("metrics too large\n"));
        bg_buf_dispose(&b);
    } else {
        respond(fd, head, 404, "Not Found", text, BG_STRLIT("not found\n"));
    }
}

static void *health_main(void *arg)
{
    health_t *h = arg;
    while (!atomic_load(&h->stop)) {
        struct pollfd p = {h->fd, POLLIN, 0};
        int r = poll(&p, 1, 200);
        if (r <= 0)
            continue;
        int fd = accept4(h->fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0)
            continue;
        set_io_timeouts(fd);
        serve(h, fd);
        close(fd);
    }
    return NULL;
}

/* Binds BG_BIND_ADDRESS:BG_WORKER_PORT and starts the responder. Returns 0 or BG_ERR_IO. */
static int health_start(health_t *h, const bg_config_t *cfg, const wk_runtime_t *rt)
{
    memset(h, 0, sizeof(*h));
    h->cfg = cfg;
    h->rt = rt;
    h->fd = -1;
    atomic_init(&h->stop, false);
    char port[16];
    snprintf(port, sizeof(port), "%d", cfg->worker_port);
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    int gai = getaddrinfo(cfg->bind_address, port, &hints, &res);
    if (gai != 0) {
        bg_error("worker: cannot resolve BG_BIND_ADDRESS %s: %s", cfg->bind_address,
                 gai_strerror(gai));
        return BG_ERR_IO;
    }
    int err = 0;
    for (struct addrinfo *a = res; a != NULL && h->fd < 0; a = a->ai_next) {
        int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0)
            continue;
        int one = 1;
        (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && listen(fd, 16) == 0) {
            h->fd = fd;
        } else {
            err = errno;
            close(fd);
        }
    }
    freeaddrinfo(res);
    if (h->fd < 0) {
        char buf[128];
        bg_error("worker: cannot listen on %s:%d (BG_WORKER_PORT): %s", cfg->bind_address,
                 cfg->worker_port, strerror_r(err, buf, sizeof(buf)));
        return BG_ERR_IO;
    }
    if (bg_redis_new(cfg->redis_url, cfg->redis_timeout_ms, &h->redis) != 0 ||
        pthread_create(&h->thread, NULL, health_main, h) != 0) {
        bg_error("worker: cannot start the health responder");
        bg_redis_free(h->redis);
        close(h->fd);
        h->fd = -1;
        return BG_ERR_IO;
    }
    bg_info("worker: health and metrics on http://%s:%d", cfg->bind_address, cfg->worker_port);
    return 0;
}

static void health_stop(health_t *h)
{
    if (h->fd < 0)
        return;
    atomic_store(&h->stop, true);
    pthread_join(h->thread, NULL);
    close(h->fd);
    h->fd = -1;
    bg_redis_free(h->redis);
    h->redis = NULL;
}

/* ---- main ---- */

/* Resolves a comma-separated list into roles; returns 0, or 2 after naming what is wrong. */
static int pick_roles(const char *list, const wk_role_t **out, size_t *n)
{
    *n = 0;
    if (list == NULL) {
        size_t count;
        const wk_role_t *all = wk_roles_all(&count);
        for (size_t i = 0; i < count && i < WK_MAX_ROLES; i++)
            out[(*n)++] = &all[i];
        return 0;
    }
    const char *p = list;
    while (*p != '\0') {
        size_t len = strcspn(p, ",");
        char name[64];
        if (len == 0 || len >= sizeof(name)) {
            fprintf(stderr, "bg-worker: bad --roles list \"%s\"\n", list);
            return 2;
        }
        memcpy(name, p, len);
        name[len] = '\0';
        const wk_role_t *role = wk_roles_find(name);
        if (role == NULL) {
            fprintf(stderr, "bg-worker: unknown role \"%s\"\n", name);
            usage(stderr);
            return 2;
        }
        bool dup = false;
        for (size_t i = 0; i < *n; i++)
            dup = dup || out[i] == role;
        if (!dup) {
            if (*n == WK_MAX_ROLES)
                return 2;
            out[(*n)++] = role;
        }
        p += len;
        if (*p == ',')
            p++;
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *roles_arg = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(argv[i], "--roles") == 0 && i + 1 < argc) {
            roles_arg = argv[++i];
        } else if (strncmp(argv[i], "--roles=", 8) == 0) {
            roles_arg = argv[i] + 8;
        } else {
            fprintf(stderr, "bg-worker: unexpected argument \"%s\"\n", argv[i]);
            usage(stderr);
            return 2;
        }
    }
    const wk_role_t *roles[WK_MAX_ROLES];
    size_t nroles = 0;
    int urc = pick_roles(roles_arg, roles, &nroles);
    if (urc != 0)
        return urc;

    bg_config_t cfg;
    bg_config_load_or_exit(&cfg, "bg-worker");
    (void)signal(SIGPIPE, SIG_IGN); /* hiredis writes with write(2): a dead peer must not kill us */

    wk_runtime_t *rt = NULL;
    int rc = wk_runtime_new(&cfg, roles, nroles, &rt);
    if (rc != 0) {
        bg_error("worker: cannot start: %s", bg_strerror(rc));
        bg_config_dispose(&cfg);
        return rc == BG_ERR_CONFIG ? 2 : 1; /* 2: like every other configuration error */
    }
    running_rt = rt;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    health_t health = {.fd = -1};
    if (cfg.worker_port > 0 && health_start(&health, &cfg, rt) != 0) {
        wk_runtime_free(rt);
        bg_config_dispose(&cfg);
        return 1;
    }

    bg_reconciler_t *reconciler = NULL;
    if (bg_reconciler_start(&cfg, wk_runtime_consumer(rt), &reconciler) != 0)
        bg_error("worker: the quota reconciler did not start; the worker runs without it");

    /* A first look at Redis, only to say clearly at start-up when it cannot be reached; the
     * runtime keeps retrying with backoff either way. */
    bg_redis_t *probe = NULL;
    if (bg_redis_new(cfg.redis_url, cfg.redis_timeout_ms, &probe) == 0) {
        if (bg_redis_connect(probe) != 0)
            bg_error("worker: Redis at %s is not reachable; retrying with backoff",
                     bg_redis_describe(probe));
        bg_redis_free(probe);
    }

    rc = wk_runtime_run(rt);
    bg_reconciler_stop(reconciler);
    health_stop(&health);
    if (rc != 0) {
        /* handler threads still run: freeing under them is not an option, and they hold nothing
         * that must be flushed (their jobs stay pending in Redis) */
        (void)fflush(stderr);
        _exit(0);
    }
    (void)signal(SIGTERM,
                 SIG_IGN); /* the runtime is about to go: a late signal must not reach it */
    (void)signal(SIGINT, SIG_IGN);
    running_rt = NULL;
    wk_runtime_free(rt);
    bg_config_dispose(&cfg);
    return 0;
}
