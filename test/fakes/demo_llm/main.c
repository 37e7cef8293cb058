/*
 * bg-demo-llm: a small OpenAI-compatible Chat Completions server for `make run` and the tests.
 *
 *   bg-demo-llm --port N [--bind ADDR] [--tokens-per-second R] [--delay-ms MS] [--api-key KEY]
 *               [--grace-ms MS]
 *
 * It answers GET /v1/models and POST /v1/chat/completions (plain and SSE) with deterministic text
 * at a configurable token rate, and fails on request ("#fail:429", "#fail:cut=3", … in the last
 * user message; see README.md). One thread, one libuv loop, libh2o for HTTP/1.1 and h2c.
 *
 * Shutdown on SIGTERM/SIGINT: the listener closes, h2o winds connections down, and the loop stops
 * once no request is in flight or after --grace-ms (hanging requests never finish on their own). A
 * second signal stops it at once. Logging follows BG_LOG_LEVEL and BG_LOG_FORMAT like the other
 * binaries.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/crypto.h"
#include "bg/log.h"
#include "bg/timeutil.h"
#include "demo_llm.h"

/* Static: h2o's context and the connections still open at exit stay reachable from here. */
static uv_loop_t loop;
static h2o_globalconf_t globalconf;
static h2o_context_t ctx;
static h2o_accept_ctx_t accept_ctx;
static uv_tcp_t listener;
static uv_signal_t sigterm_watcher, sigint_watcher;
static uv_timer_t drain_timer;
static demo_options_t opts;
static bool shutting_down;
static uint64_t drain_deadline_ms;

static void usage(FILE *out)
{
    fprintf(out,
            "usage: bg-demo-llm --port N [--bind ADDR] [--tokens-per-second R] [--delay-ms MS]\n"
            "                   [--api-key KEY] [--grace-ms MS]\n"
            "  --port N               TCP port to listen on (required)\n"
            "  --bind ADDR            IPv4 or IPv6 address (default 127.0.0.1)\n"
            "  --tokens-per-second R  streaming rate (default 50; 0: as fast as possible)\n"
            "  --delay-ms MS          delay before the first token (default 0)\n"
            "  --api-key KEY          require Authorization: Bearer KEY (default: none)\n"
            "  --grace-ms MS          how long shutdown waits for requests (default 2000)\n");
}

static bool parse_num(const char *s, double min, double max, double *out)
{
    char *end;
    errno = 0;
    double d = strtod(s, &end);
    if (errno != 0 || end == s || *end != '\0' || !(d >= min && d <= max))
        return false;
    *out = d;
    return true;
}

/* Returns 0, or 2 (usage error) after saying what is wrong. */
static int parse_args(int argc, char **argv)
{
    opts.bind = "127.0.0.1";
    opts.port = -1;
    opts.tokens_per_second = 50;
    opts.grace_ms = 2000;
    for (int i = 1; i < argc; i++) {
        const char *name = argv[i];
        if (strcmp(name, "--help") == 0 || strcmp(name, "-h") == 0) {
            usage(stdout);
            exit(0); /* NOLINT(concurrency-mt-unsafe): single-threaded at this point */
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "bg-demo-llm: %s: missing value or unknown option\n", name);
            usage(stderr);
            return 2;
        }
        const char *v = argv[++i];
        double d;
        if (strcmp(name, "--port") == 0 && parse_num(v, 1, 65535, &d) && d == (int)d) {
            opts.port = (int)d;
        } else if (strcmp(name, "--bind") == 0) {
            opts.bind = v;
        } else if (strcmp(name, "--tokens-per-second") == 0 && parse_num(v, 0, 1e6, &d)) {
            opts.tokens_per_second = d;
        } else if (strcmp(name, "--delay-ms") == 0 && parse_num(v, 0, 3600000, &d)) {
            opts.delay_ms = (int64_t)d;
        } else if (strcmp(name, "--api-key") == 0 && v[0] != '\0') {
            opts.api_key = v;
        } else if (strcmp(name, "--grace-ms") == 0 && parse_num(v, 0, 3600000, &d)) {
            opts.grace_ms = (int64_t)d;
        } else {
            fprintf(stderr, "bg-demo-llm: %s \"%s\": unknown option or bad value\n", name, v);
            usage(stderr);
            return 2;
        }
    }
    if (opts.port < 0) {
        fprintf(stderr, "bg-demo-llm: --port is required\n");
        usage(stderr);
        return 2;
    }
    return 0;
}

static void setup_logging(void)
{
    bg_log_level_t level = BG_LOG_INFO;
    const char *l = getenv("BG_LOG_LEVEL"); /* NOLINT(concurrency-mt-unsafe): before any thread */
    if (l != NULL && bg_log_level_parse(l, &level) != 0)
        fprintf(stderr, "bg-demo-llm: BG_LOG_LEVEL=\"%s\" is not debug|info|warn|error|off\n", l);
    const char *f = getenv("BG_LOG_FORMAT"); /* NOLINT(concurrency-mt-unsafe): before any thread */
    bg_log_format_t format =
        f != NULL && strcmp(f, "text") == 0 ? BG_LOG_FORMAT_TEXT : BG_LOG_FORMAT_JSON;
    bg_log_setup(level, format, "demo-llm");
}

static void on_accept(uv_stream_t *server, int status)
{
    if (status != 0)
        return;
    uv_tcp_t *conn = demo_conn_new(server->loop);
    if (uv_accept(server, (uv_stream_t *)conn) != 0) {
        uv_close((uv_handle_t *)conn, demo_conn_closed);
        return;
    }
    uv_tcp_nodelay(conn, 1);
    h2o_socket_t *sock = h2o_uv_socket_create((uv_stream_t *)conn, demo_conn_closed);
    h2o_accept(&accept_ctx, sock);
}

static int start_listener(void)
{
    struct sockaddr_storage addr;
    int r = uv_ip4_addr(opts.bind, opts.port, (struct sockaddr_in *)&addr);
    if (r != 0)
        r = uv_ip6_addr(opts.bind, opts.port, (struct sockaddr_in6 *)&addr);
    if (r != 0) {
        bg_error("--bind \"%s\": expected an IPv4 or IPv6 address", opts.bind);
        return 2;
    }
    uv_tcp_init(&loop, &listener);
    if ((r = uv_tcp_bind(&listener, (const struct sockaddr *)&addr, 0)) != 0 ||
        (r = uv_listen((uv_stream_t *)&listener, SOMAXCONN, on_accept)) != 0) {
        bg_error("cannot listen on %s:%d: %s", opts.bind, opts.port, uv_strerror(r));
        return 1;
    }
    return 0;
}

static void on_drain_tick(uv_timer_t *timer)
{
    (void)timer;
    if (demo_serve_inflight() == 0) {
        uv_stop(&loop);
    } else if (bg_timeutil_mono_ms() >= drain_deadline_ms) {
        bg_warn("grace period over: stopping with %d requests in flight", demo_serve_inflight());
        uv_stop(&loop);
    }
}

static void on_signal(uv_signal_t *watcher, int signum)
{
    (void)watcher;
    if (shutting_down) {
        bg_warn("second signal: stopping now");
        uv_stop(&loop);
        return;
    }
    shutting_down = true;
    bg_info("received %s: stopping (waiting at most %lld ms for %d requests in flight)",
            signum == SIGTERM ? "SIGTERM" : "SIGINT", (long long)opts.grace_ms,
            demo_serve_inflight());
    uv_close((uv_handle_t *)&listener, NULL);
    h2o_context_request_shutdown(&ctx);
    drain_deadline_ms = bg_timeutil_mono_ms() + (uint64_t)opts.grace_ms;
    uv_timer_init(&loop, &drain_timer);
    uv_timer_start(&drain_timer, on_drain_tick, 0, 20);
}

int main(int argc, char **argv)
{
    int r = parse_args(argc, argv);
    if (r != 0)
        return r;
    setup_logging();
    if (bg_crypto_init() != 0) {
        bg_error("cannot initialise libsodium");
        return 1;
    }
    signal(SIGPIPE, SIG_IGN); /* NOLINT(cert-err33-c): the previous handler is of no use */

    if (uv_loop_init(&loop) != 0) {
        bg_error("cannot create the event loop");
        return 1;
    }
    h2o_config_init(&globalconf);
    demo_serve_init(&globalconf, &opts);
    h2o_context_init(&ctx, &loop, &globalconf);
    accept_ctx.ctx = &ctx;
    accept_ctx.hosts = globalconf.hosts;
    if ((r = start_listener()) != 0)
        return r;
    uv_signal_init(&loop, &sigterm_watcher);
    uv_signal_init(&loop, &sigint_watcher);
    uv_signal_start(&sigterm_watcher, on_signal, SIGTERM);
    uv_signal_start(&sigint_watcher, on_signal, SIGINT);

    size_t nmodels;
    const demo_model_t *models = demo_models(&nmodels);
    bg_info("listening on http://%s:%d/v1 (HTTP/1.1, h2c): models %s, %s; %g tokens/s%s, first "
            "token after %lld ms%s",
            opts.bind, opts.port, models[0].id, nmodels > 1 ? models[1].id : "",
            opts.tokens_per_second, opts.tokens_per_second == 0 ? " (unpaced)" : "",
            (long long)opts.delay_ms, opts.api_key != NULL ? "; API key required" : "");
    uv_run(&loop, UV_RUN_DEFAULT);
    bg_info("stopped");
    return 0;
}
