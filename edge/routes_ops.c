/*
 * Operations endpoints: /healthz (the process answers), /readyz (it can serve: Redis and Postgres
 * reachable, migrations current, not shutting down) and /metrics (Prometheus text).
 *
 * /readyz runs its two checks at once: a PING on the loop's own Redis connection and, on the thread
 * pool, a Postgres round trip that also compares the applied migrations with the embedded ones. The
 * response waits for both.
 */
#include <string.h>

#include "bg/err.h"
#include "bg/log.h"
#include "bg/metrics.h"
#include "bg/migrate.h"
#include "bg/pg.h"
#include "bg/resource.h"
#include "bg/timeutil.h"
#include "edge.h"

static void healthz(edge_req_t *er)
{
    edge_add_header(er, "cache-control", "no-store");
    edge_respond(er, 200, "application/json", BG_STRLIT("{\"status\":\"ok\"}"));
}

typedef struct st_ready {
    int pending;
    const char *redis; /* static strings: "ok" or the problem */
    const char *postgres;
    const char *migrations;
    char *database_url; /* owned copy for the pool thread */
} ready_t;

static void ready_free(void *p)
{
    ready_t *st = p;
    free(st->database_url);
    free(st);
}

static void ready_finish(edge_req_t *er)
{
    ready_t *st = er->data;
    if (--st->pending > 0 || er->req == NULL)
        return;
    bool ok = strcmp(st->redis, "ok") == 0 && strcmp(st->postgres, "ok") == 0 &&
              strcmp(st->migrations, "current") == 0;
    char checks[256];
    snprintf(checks, sizeof(checks),
             "{\"checks\":{\"redis\":\"%s\",\"postgres\":\"%s\",\"migrations\":\"%s\"}}", st->redis,
             st->postgres, st->migrations);
    edge_add_header(er, "cache-control", "no-store");
    if (ok) {
        char body[300];
        int n = snprintf(body, sizeof(body), "{\"status\":\"ready\",%s", checks + 1);
        edge_respond(er, 200, "application/json", body, (size_t)n);
    } else {
        edge_error(er, "service_unavailable", checks, NULL, 1);
    }
}

static void ready_redis_done(void *ud, int err, const redisReply *reply)
{
    edge_req_t *er = ud;
    ready_t *st = er->data;
    if (err != 0)
        st->redis = err == BG_ERR_TIMEOUT ? "timeout" : "unreachable";
    else if (reply->type == REDIS_REPLY_ERROR)
        st->redis = "error";
    else
        st->redis = "ok";
    ready_finish(er);
    edge_req_unref(er);
}

/* On the thread pool: one connection per pool thread, reused across checks. */
static void ready_pg_work(void *arg)
{
    ready_t *st = arg;
    PGconn *c = bg_pg_thread_conn(st->database_url);
    if (c == NULL) {
        st->postgres = "unreachable";
        st->migrations = "unknown";
        return;
    }
    int pending = 0;
    char err[256];
    int r = bg_migrate_status(c, &pending, err, sizeof(err));
    if (r == BG_ERR_UNAVAILABLE) {
        st->postgres = "unreachable";
        st->migrations = "unknown";
        return;
    }
    st->postgres = "ok";
    if (r == BG_ERR_CHECKSUM)
        st->migrations = "mismatch";
    else if (r != 0)
        st->migrations = "unknown";
    else
        st->migrations = pending == 0 ? "current" : "pending";
}

static void ready_pg_done(edge_req_t *er, void *arg)
{
    (void)arg;
    ready_finish(er);
}

static void readyz(edge_req_t *er)
{
    edge_server_t *s = er->thread->server;
    if (atomic_load(&s->shutting_down)) {
        edge_error(er, "shutting_down", NULL, NULL, 1);
        return;
    }
    ready_t *st = bg_calloc(1, sizeof(*st));
    st->pending = 2;
    st->redis = st->postgres = st->migrations = "unknown";
    st->database_url = bg_strdup(s->cfg->database_url);
    er->data = st;
    er->data_free = ready_free;

    const char *ping[] = {"PING"};
    edge_req_ref(er);
    if (bg_redis_async_argv(er->thread->redis, ready_redis_done, er, 1, ping, NULL) != 0) {
        edge_req_unref(er);
        st->redis = "unreachable";
        st->pending--;
    }
    if (edge_blocking(er, ready_pg_work, ready_pg_done, st) != 0) {
        st->postgres = "unreachable";
        st->pending--;
    }
    if (st->pending == 0) {
        st->pending = 1;
        ready_finish(er);
    }
}

static void metrics(edge_req_t *er)
{
    static bg_metrics_gauge_t *inflight, *streams, *uptime;
    edge_server_t *s = er->thread->server;
    if (inflight == NULL) {
        /* registration is idempotent and thread-safe, so racing loops get the same families */
        inflight = bg_metrics_gauge("bg_http_requests_in_flight", "Requests being served", NULL);
        streams = bg_metrics_gauge("bg_sse_streams_open", "Open Server-Sent Events streams", NULL);
        uptime = bg_metrics_gauge("bg_uptime_seconds", "Seconds since bg-edge started", NULL);
        (void)streams;
    }
    int total = 0;
    for (int i = 0; i < s->nthreads; i++)
        total += atomic_load(&s->threads[i].inflight);
    bg_metrics_gauge_set(inflight, NULL, total);
    bg_metrics_gauge_set(uptime, NULL, (double)(bg_timeutil_wall_ms() - s->started_at_ms) / 1000.0);

    bg_buf_t out;
    bg_buf_init(&out, 16 * 1024 * 1024);
    if (bg_metrics_render(&out) != 0) {
        bg_buf_dispose(&out);
        edge_error(er, "internal", NULL, NULL, 0);
        return;
    }
    edge_respond(er, 200, "text/plain; version=0.0.4; charset=utf-8", out.base, out.len);
    bg_buf_dispose(&out);
}

/* The API contract, compiled in from docs/openapi.json. */
static void openapi(edge_req_t *er)
{
    const bg_resource_t *doc = bg_resource_find("docs/openapi.json");
    if (doc == NULL) {
        edge_error(er, "not_found", NULL, NULL, 0);
        return;
    }
    edge_add_header(er, "cache-control", "public, max-age=300");
    edge_respond(er, 200, "application/json", doc->data, doc->len);
}

const edge_route_t edge_routes_ops[] = {
    {"GET", "/healthz", "healthz", healthz, 0, 0, EDGE_PUBLIC},
    {"GET", "/readyz", "readyz", readyz, 0, 0, EDGE_PUBLIC},
    {"GET", "/metrics", "metrics", metrics, 0, 0, EDGE_PUBLIC},
    {"GET", "/openapi.json", "openapi", openapi, 0, 0, EDGE_PUBLIC},
    {NULL, NULL, NULL, NULL, 0, 0, EDGE_PUBLIC},
};
