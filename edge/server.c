/*
 * Listeners, TLS, event loops and graceful shutdown.
 *
 * The main thread opens the listening sockets once (so a second server on the same port fails
 * loudly instead of silently sharing it), then starts one thread per loop; every loop accepts from
 * the same sockets. Signals are blocked in the loop threads and taken by the main thread with
 * sigwait().
 *
 * Shutdown on SIGTERM/SIGINT: each loop closes its listeners, asks h2o to wind its connections down
 * (GOAWAY on HTTP/2, no more keep-alive on HTTP/1.1), and stops once its in-flight requests are
 * done. The main thread waits at most BG_SHUTDOWN_GRACE_MS for that, then stops the loops
 * regardless. A second signal stops them at once.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "bg/err.h"
#include "bg/log.h"
#include "bg/timeutil.h"
#include "edge.h"

edge_server_t *edge_the_server;

int edge_dispatch(h2o_handler_t *self, h2o_req_t *req);

static int open_listener(const char *address, int port, int *out)
{
    struct sockaddr_in6 a6;
    struct sockaddr_in a4;
    struct sockaddr *sa;
    socklen_t salen;
    int family;

    memset(&a4, 0, sizeof(a4));
    memset(&a6, 0, sizeof(a6));
    if (inet_pton(AF_INET, address, &a4.sin_addr) == 1) {
        a4.sin_family = AF_INET;
        a4.sin_port = htons((uint16_t)port);
        sa = (struct sockaddr *)&a4;
        salen = sizeof(a4);
        family = AF_INET;
    } else if (inet_pton(AF_INET6, address, &a6.sin6_addr) == 1) {
        a6.sin6_family = AF_INET6;
        a6.sin6_port = htons((uint16_t)port);
        sa = (struct sockaddr *)&a6;
        salen = sizeof(a6);
        family = AF_INET6;
    } else {
        bg_error("BG_BIND_ADDRESS=\"%s\": expected an IPv4 or IPv6 address", address);
        return BG_ERR_CONFIG;
    }
    int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return BG_ERR_IO;
    int on = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on)) != 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on)) != 0)
        goto err_close;
    if (bind(fd, sa, salen) != 0) {
        char msg[128];
        bg_error("cannot listen on %s:%d: %s", address, port, strerror_r(errno, msg, sizeof(msg)));
        goto err_close;
    }
    if (listen(fd, SOMAXCONN) != 0)
        goto err_close;
    *out = fd;
    return 0;

err_close:
    close(fd);
    return BG_ERR_IO;
}

static int setup_tls(edge_server_t *s)
{
    const bg_config_t *cfg = s->cfg;
    if (cfg->https_port == 0)
        return 0;
    if (cfg->tls_cert == NULL) {
        bg_warn(
            "BG_TLS_CERT and BG_TLS_KEY are not set: the TLS listener (BG_HTTPS_PORT=%d) is off",
            cfg->https_port);
        return 0;
    }
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (ctx == NULL)
        return BG_ERR_IO;
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION |
                                 SSL_OP_CIPHER_SERVER_PREFERENCE);
    if (SSL_CTX_use_certificate_chain_file(ctx, cfg->tls_cert) != 1) {
        bg_error("BG_TLS_CERT=\"%s\": expected a readable PEM certificate chain", cfg->tls_cert);
        goto err_free;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, cfg->tls_key, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        bg_error("BG_TLS_KEY=\"%s\": expected the PEM private key of BG_TLS_CERT", cfg->tls_key);
        goto err_free;
    }
    h2o_ssl_register_alpn_protocols(ctx, h2o_http2_alpn_protocols);
    s->ssl_ctx = ctx;
    return 0;

err_free:
    SSL_CTX_free(ctx);
    return BG_ERR_CONFIG;
}

int edge_server_init(edge_server_t *s, const bg_config_t *cfg)
{
    int r;

    memset(s, 0, sizeof(*s));
    s->cfg = cfg;
    s->fd_http = s->fd_https = -1;
    s->started_at_ms = bg_timeutil_wall_ms();
    edge_the_server = s;

    h2o_config_init(&s->globalconf);
    s->globalconf.server_name = h2o_iovec_init(H2O_STRLIT("bot-generic"));
    s->globalconf.max_request_entity_size = (size_t)cfg->max_body_bytes;
    s->globalconf.http1.upgrade_to_http2 = 1;
    s->globalconf.http2.max_concurrent_requests_per_connection = (size_t)cfg->max_streams_per_conn;
    s->globalconf.http2.graceful_shutdown_timeout = (uint64_t)cfg->shutdown_grace_ms;
    s->hostconf =
        h2o_config_register_host(&s->globalconf, h2o_iovec_init(H2O_STRLIT("default")), 65535);
    h2o_pathconf_t *path = h2o_config_register_path(s->hostconf, "/", 0);
    h2o_handler_t *handler = h2o_create_handler(path, sizeof(*handler));
    handler->on_req = edge_dispatch;

    if ((r = edge_auth_init(s)) != 0)
        goto err_dispose;
    if ((r = setup_tls(s)) != 0)
        goto err_dispose;
    if ((r = open_listener(cfg->bind_address, cfg->http_port, &s->fd_http)) != 0)
        goto err_dispose;
    if (s->ssl_ctx != NULL &&
        (r = open_listener(cfg->bind_address, cfg->https_port, &s->fd_https)) != 0)
        goto err_dispose;

    s->nthreads = cfg->edge_threads > 0 ? cfg->edge_threads : (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (s->nthreads < 1)
        s->nthreads = 1;
    s->threads = bg_calloc((size_t)s->nthreads, sizeof(edge_thread_t));
    return 0;

err_dispose:
    edge_server_dispose(s);
    return r;
}

/* ---- per-loop ---- */

static void on_accept(uv_stream_t *listener, int status)
{
    if (status != 0)
        return;
    edge_thread_t *t = listener->data;
    uv_tcp_t *conn = bg_malloc(sizeof(*conn));
    uv_tcp_init(listener->loop, conn);
    if (uv_accept(listener, (uv_stream_t *)conn) != 0) {
        /* another loop took it */
        uv_close((uv_handle_t *)conn, (uv_close_cb)free);
        return;
    }
    uv_tcp_nodelay(conn, 1);
    h2o_socket_t *sock = h2o_uv_socket_create((uv_stream_t *)conn, (uv_close_cb)free);
    bool tls = listener == (uv_stream_t *)&t->listen_https;
    h2o_accept(tls ? &t->accept_https : &t->accept_http, sock);
}

static int start_listener(edge_thread_t *t, uv_tcp_t *handle, int fd)
{
    int dupfd = dup(fd);
    if (dupfd < 0)
        return BG_ERR_IO;
    uv_tcp_init(&t->loop, handle);
    handle->data = t;
    if (uv_tcp_open(handle, dupfd) != 0 ||
        uv_listen((uv_stream_t *)handle, SOMAXCONN, on_accept) != 0) {
        bg_error("loop %d: cannot start accepting", t->index);
        return BG_ERR_IO;
    }
    return 0;
}

static void on_drain_tick(uv_timer_t *timer)
{
    edge_thread_t *t = timer->data;
    if (atomic_load(&t->inflight) == 0 || atomic_load(&t->server->force_stop))
        uv_stop(&t->loop);
}

/* Runs on the loop when the main thread asks for shutdown. */
static void on_wakeup(uv_async_t *async)
{
    edge_thread_t *t = async->data;
    if (atomic_load(&t->server->force_stop)) {
        uv_stop(&t->loop);
        return;
    }
    if (t->draining)
        return;
    t->draining = true;
    uv_close((uv_handle_t *)&t->listen_http, NULL);
    if (t->has_https)
        uv_close((uv_handle_t *)&t->listen_https, NULL);
    h2o_context_request_shutdown(&t->ctx);
    /* a job's stream could outlive the grace period: end it, the client resumes elsewhere */
    edge_relay_drain(t->relay);
    uv_timer_init(&t->loop, &t->drain_timer);
    t->drain_timer.data = t;
    uv_timer_start(&t->drain_timer, on_drain_tick, 0, 20);
}

void edge_request_metrics_init(void);

static void thread_main(void *arg)
{
    edge_thread_t *t = arg;
    edge_server_t *s = t->server;

    bg_info("loop %d started", t->index);
    uv_run(&t->loop, UV_RUN_DEFAULT);
    bg_info("loop %d stopped with %d requests in flight", t->index, atomic_load(&t->inflight));
    atomic_fetch_add(&s->stopped_loops, 1);
}

static int thread_init(edge_server_t *s, edge_thread_t *t, int index)
{
    int r;
    t->server = s;
    t->index = index;
    atomic_init(&t->inflight, 0);
    if (uv_loop_init(&t->loop) != 0)
        return BG_ERR_IO;
    h2o_context_init(&t->ctx, &t->loop, &s->globalconf);
    t->accept_http.ctx = &t->ctx;
    t->accept_http.hosts = s->globalconf.hosts;
    t->accept_https = t->accept_http;
    t->accept_https.ssl_ctx = s->ssl_ctx;
    if ((r = start_listener(t, &t->listen_http, s->fd_http)) != 0)
        return r;
    if (s->ssl_ctx != NULL) {
        if ((r = start_listener(t, &t->listen_https, s->fd_https)) != 0)
            return r;
        t->has_https = true;
    }
    uv_async_init(&t->loop, &t->wakeup, on_wakeup);
    t->wakeup.data = t;
    t->redis = bg_redis_async_new(&t->loop, s->cfg->redis_url, s->cfg->redis_timeout_ms);
    t->relay = edge_relay_new(t);
    return 0;
}

/*
 * Releases what the loop's own code holds. The loop itself, its h2o context and any connection
 * still open are left as they are: libh2o 2.2.5 cannot tear a context down while connections are
 * open (h2o_timeout_dispose asserts that no timer is pending), and the process is about to exit.
 * They stay reachable from the server, so LeakSanitizer does not count them.
 */
static void thread_dispose(edge_thread_t *t)
{
    if (t->server == NULL)
        return;
    bg_redis_async_free(t->redis); /* pending relay reads end with BG_ERR_CLOSED first */
    t->redis = NULL;
    edge_relay_free(t->relay);
    t->relay = NULL;
}

int edge_server_run(edge_server_t *s)
{
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN); /* NOLINT(cert-err33-c): the previous handler is of no use */

    edge_request_metrics_init();
    int started = 0;
    for (int i = 0; i < s->nthreads; i++) {
        if (thread_init(s, &s->threads[i], i) != 0)
            break;
        if (uv_thread_create(&s->threads[i].tid, thread_main, &s->threads[i]) != 0)
            break;
        started++;
    }
    if (started < s->nthreads) {
        bg_error("could only start %d of %d event loops", started, s->nthreads);
        atomic_store(&s->force_stop, true);
    } else {
        bg_info("listening on http://%s:%d (HTTP/1.1, h2c)%s with %d event loops",
                s->cfg->bind_address, s->cfg->http_port,
                s->ssl_ctx != NULL ? " and TLS (h2, HTTP/1.1)" : "", s->nthreads);
        if (s->ssl_ctx != NULL)
            bg_info("listening on https://%s:%d", s->cfg->bind_address, s->cfg->https_port);
        int sig = 0;
        sigwait(&sigs, &sig);
        bg_info("received %s: draining (at most %lld ms)", sig == SIGTERM ? "SIGTERM" : "SIGINT",
                (long long)s->cfg->shutdown_grace_ms);
    }

    atomic_store(&s->shutting_down, true);
    for (int i = 0; i < started; i++)
        uv_async_send(&s->threads[i].wakeup);

    /* Wait for the loops to drain, a second signal, or the grace period. */
    int64_t deadline = (int64_t)bg_timeutil_mono_us() + s->cfg->shutdown_grace_ms * 1000;
    while (atomic_load(&s->stopped_loops) < started) {
        struct timespec tick = {0, 50 * 1000 * 1000};
        siginfo_t info;
        bool again = sigtimedwait(&sigs, &info, &tick) > 0;
        if ((again || (int64_t)bg_timeutil_mono_us() >= deadline) && !atomic_load(&s->force_stop)) {
            bg_warn("%s: stopping with requests still in flight",
                    again ? "second signal" : "grace period over");
            atomic_store(&s->force_stop, true);
            for (int k = 0; k < started; k++)
                uv_async_send(&s->threads[k].wakeup);
        }
    }
    for (int i = 0; i < started; i++)
        uv_thread_join(&s->threads[i].tid);
    for (int i = 0; i < started; i++)
        thread_dispose(&s->threads[i]);
    bg_info("stopped");
    return started < s->nthreads ? 1 : 0;
}

void edge_server_dispose(edge_server_t *s)
{
    edge_auth_dispose(s);
    if (s->fd_http >= 0)
        close(s->fd_http);
    if (s->fd_https >= 0)
        close(s->fd_https);
    s->fd_http = s->fd_https = -1;
    if (s->threads != NULL)
        return; /* loops ran: their state stays until exit (see thread_dispose) */
    if (s->ssl_ctx != NULL)
        SSL_CTX_free(s->ssl_ctx);
    s->ssl_ctx = NULL;
    h2o_config_dispose(&s->globalconf);
}
