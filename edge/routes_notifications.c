/*
 * In-app notifications (bg/notify.h, docs/notifications.md):
 *
 *   GET  /notifications?limit&cursor&unread=1 → {"data":[{"id","kind","title","body","created_at",
 *        "read_at"}],"next_cursor","unread"}, newest first, title and body in the caller's locale;
 *   POST /notifications/read {"ids":[…]} or {"all":true} → {"updated":n}.
 *
 * Only the caller's own "web" rows are read or marked: another user's id is not an error (it
 * cannot be told from one that does not exist), it just marks nothing. The notify worker writes
 * the rows; these routes never send anything.
 */
#include <stdlib.h>
#include <string.h>

#include "bg/err.h"
#include "bg/id.h"
#include "bg/notify.h"
#include "bg/pg.h"
#include "edge.h"

#define LIST_DEFAULT 20

typedef struct st_notify_op {
    const bg_config_t *cfg;
    char user_id[64];
    char locale[16];
    char *cursor; /* owned; NULL: the first page */
    int limit;
    bool unread_only;
    bool all;
    const char **ids; /* owned array; the strings are borrowed from the request's body document */
    size_t nids;
    int64_t updated;
    int rc;
    bg_buf_t page;
} notify_op_t;

static void op_free(void *p)
{
    notify_op_t *op = p;
    if (op == NULL)
        return;
    free(op->cursor);
    free(op->ids);
    bg_buf_dispose(&op->page);
    free(op);
}

static notify_op_t *op_new(edge_req_t *er)
{
    notify_op_t *op = bg_calloc(1, sizeof(*op));
    er->data = op;
    er->data_free = op_free;
    op->cfg = er->thread->server->cfg;
    (void)bg_strlcpy(op->user_id, er->auth.user_id, sizeof(op->user_id));
    (void)bg_strlcpy(op->locale, er->locale != NULL ? er->locale : "en", sizeof(op->locale));
    bg_buf_init(&op->page, 1024u * 1024u);
    return op;
}

static void list_work(void *arg)
{
    notify_op_t *op = arg;
    PGconn *c = edge_pg(op->cfg, NULL, &op->rc);
    if (c == NULL)
        return;
    op->rc = bg_notify_list(c, op->user_id, op->locale, op->cursor, op->limit, op->unread_only,
                            &op->page);
}

static void list_done(edge_req_t *er, void *arg)
{
    notify_op_t *op = arg;
    if (er->req == NULL)
        return;
    if (op->rc == BG_ERR_INVALID) {
        edge_invalid_field(er, "cursor", "invalid_value", NULL);
        return;
    }
    if (op->rc != 0) {
        edge_fail(er, op->rc);
        return;
    }
    edge_add_header(er, "cache-control", "no-store");
    edge_respond_json(er, 200, &op->page);
}

static void list_get(edge_req_t *er)
{
    char cursor[96], unread[8];
    int n = LIST_DEFAULT;
    if (!edge_query_limit(er, BG_NOTIFY_LIST_MAX, &n))
        return;
    bool unread_only = false;
    if (edge_query(er, "unread", unread, sizeof(unread))) {
        if (strcmp(unread, "1") == 0 || strcmp(unread, "true") == 0) {
            unread_only = true;
        } else if (strcmp(unread, "0") != 0 && strcmp(unread, "false") != 0) {
            edge_invalid_field(er, "unread", "invalid_value", NULL);
            return;
        }
    }
    notify_op_t *op = op_new(er);
    op->limit = n;
    op->unread_only = unread_only;
    if (edge_query(er, "cursor", cursor, sizeof(cursor)) && cursor[0] != '\0')
        op->cursor = bg_strdup(cursor);
    edge_run(er, list_work, list_done);
}

static void read_work(void *arg)
{
    notify_op_t *op = arg;
    PGconn *c = edge_pg(op->cfg, NULL, &op->rc);
    if (c == NULL)
        return;
    op->rc = bg_notify_mark_read(c, op->user_id, op->ids, op->nids, op->all, &op->updated);
}

static void read_done(edge_req_t *er, void *arg)
{
    notify_op_t *op = arg;
    if (er->req == NULL)
        return;
    if (op->rc != 0) {
        edge_fail(er, op->rc);
        return;
    }
    bg_buf_t out;
    bg_buf_init(&out, 64);
    if (bg_buf_printf(&out, "{\"updated\":%lld}", (long long)op->updated) != 0) {
        bg_buf_dispose(&out);
        edge_error(er, "internal", NULL, NULL, 0);
        return;
    }
    edge_respond_json(er, 200, &out);
    bg_buf_dispose(&out);
}

static void read_post(edge_req_t *er)
{
    static const edge_field_t fields[] = {
        {"ids", EDGE_F_STR_ARRAY, false, 0, BG_NOTIFY_READ_IDS_MAX, EDGE_CHECK_NONE},
        {"all", EDGE_F_BOOL, false, 0, 0, EDGE_CHECK_NONE},
    };
    edge_values_t v;
    if (!edge_body(er, fields, BG_ARRAY_SIZE(fields), &v))
        return;
    bool all = v.present[1] && v.flag[1];
    if (!v.present[0] && !all) {
        edge_invalid_field(er, "ids", "missing", NULL);
        return;
    }
    if (v.present[0] && all) {
        edge_invalid_field(er, "all", "invalid_value", NULL);
        return;
    }
    const bg_json_t *arr = v.arr[0];
    size_t n = arr != NULL ? bg_json_len(arr) : 0;
    const char **ids = n > 0 ? bg_calloc(n, sizeof(*ids)) : NULL;
    for (size_t i = 0; i < n; i++) {
        ids[i] = bg_json_str(bg_json_at(arr, i), NULL);
        if (ids[i] == NULL || !bg_id_uuid_is_valid(ids[i])) {
            free(ids);
            edge_invalid_field(er, "ids", "invalid_value", NULL);
            return;
        }
    }
    notify_op_t *op = op_new(er);
    op->all = all;
    op->ids = ids;
    op->nids = n;
    edge_run(er, read_work, read_done);
}

const edge_route_t edge_routes_notify[] = {
    {"GET", "/notifications", "notifications_list", list_get, 0, 0, EDGE_USER},
    {"POST", "/notifications/read", "notifications_read", read_post, EDGE_ROUTE_JSON, 0, EDGE_USER},
    {NULL, NULL, NULL, NULL, 0, 0, EDGE_PUBLIC},
};
