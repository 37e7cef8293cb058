/*
 * Small pieces every route handler needs: answering a failed operation, starting thread-pool work,
 * answering with a JSON writer, and the pool thread's Postgres connection.
 */
#include "bg/accounts.h"
#include "bg/err.h"
#include "bg/pg.h"
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
