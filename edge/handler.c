/*
 * Small pieces every route handler needs: answering a failed operation, starting thread-pool work,
 * answering with a JSON writer, and the pool thread's Postgres connection and Redis client.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "bg/accounts.h"
#include "bg/err.h"
#include "bg/log.h"
#include "bg/pg.h"
#include "bg/redis.h"
#include "edge.h"

void edge_fail(edge_req_t *er, int rc)
{
    if (er->req == NULL)
        return;
    switch (rc) {
    case BG_ERR_NOT_FOUND:
        edge_error(er, "not_found", NULL, NULL, 0);
        break;
    case BG_ERR_DENIED:
        edge_error(er, "forbidden", NULL, NULL, 0);
        break;
    case BG_ERR_CONFLICT:
        edge_error(er, "conflict", NULL, NULL, 0);
        break;
    case BG_ERR_UNAVAILABLE:
    case BG_ERR_TIMEOUT:
    case BG_ERR_RETRY:
        edge_error(er, "service_unavailable", NULL, NULL, 2);
        break;
    default:
        edge_error(er, bg_api_error_code_for(rc), NULL, NULL, 0);
    }
}

void edge_run(edge_req_t *er, edge_work_fn work, edge_done_fn done)
{
    if (edge_blocking(er, work, done, er->data) != 0)
        edge_error(er, "service_unavailable", NULL, NULL, 1);
}

void edge_respond_writer(edge_req_t *er, int status, bg_json_writer_t *w, bg_buf_t *out)
{
    if (bg_json_write_finish(w) != 0) {
        edge_error(er, "internal", NULL, NULL, 0);
    } else {
        edge_add_header(er, "cache-control", "no-store");
        edge_respond_json(er, status, out);
    }
    bg_buf_dispose(out);
}

PGconn *edge_pg(const bg_config_t *cfg, const char *admin_id, int *rc)
{
    PGconn *c = bg_pg_thread_conn(cfg->database_url);
    if (c == NULL) {
        *rc = BG_ERR_UNAVAILABLE;
        return NULL;
    }
    if (admin_id != NULL && (*rc = bg_acct_require_admin(c, admin_id)) != 0)
        return NULL;
    return c;
}

/* ---- the pool thread's blocking Redis client ---- */

typedef struct st_pool_redis {
    bg_redis_t *r; /* owned */
    char *url;     /* owned */
} pool_redis_t;

static pthread_key_t pool_redis_key;
static pthread_once_t pool_redis_once = PTHREAD_ONCE_INIT;

static void pool_redis_free(void *p)
{
    pool_redis_t *t = p;
    if (t == NULL)
        return;
    bg_redis_free(t->r);
    free(t->url);
    free(t);
}

static void pool_redis_key_make(void)
{
    if (pthread_key_create(&pool_redis_key, pool_redis_free) != 0) {
        bg_error("pthread_key_create failed");
        abort();
    }
}

bg_redis_t *edge_pool_redis(const bg_config_t *cfg)
{
    (void)pthread_once(&pool_redis_once, pool_redis_key_make);
    pool_redis_t *t = pthread_getspecific(pool_redis_key);
    if (t != NULL && strcmp(t->url, cfg->redis_url) == 0)
        return t->r;
    if (t != NULL) {
        (void)pthread_setspecific(pool_redis_key, NULL);
        pool_redis_free(t);
    }
    t = bg_calloc(1, sizeof(*t));
    if (bg_redis_new(cfg->redis_url, cfg->redis_timeout_ms, &t->r) != 0 ||
        pthread_setspecific(pool_redis_key, t) != 0) {
        bg_redis_free(t->r);
        free(t);
        return NULL;
    }
    t->url = bg_strdup(cfg->redis_url);
    return t->r;
}
