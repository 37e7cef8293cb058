/*
 * POST /auth/telegram/link-code: a one-time code that joins a Telegram user to the caller's web
 * account (docs/telegram.md, "/link").
 *
 * The signed-in user gets {"code","expires_at","command"}; they send the command ("/link <code>")
 * to the bot, and the telegram worker moves their Telegram identity to this account, so both
 * channels draw on one quota. The code is BG_TG_LINK_CODE_LEN characters without look-alikes,
 * lives ten minutes, works once, and only its SHA-256 is stored (bg_tg_link_code_new); asking
 * again replaces the previous code, so at most one works per user. The answer is no-store: the
 * code is a credential for as long as it lives.
 */
#include <stdlib.h>
#include <string.h>

#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/json.h"
#include "bg/telegram.h"
#include "bg/timeutil.h"
#include "edge.h"

typedef struct st_link_op {
    const bg_config_t *cfg;
    char user_id[64];
    char code[BG_TG_LINK_CODE_SIZE]; /* secret until shown */
    int64_t expires_ms;
    int rc;
} link_op_t;

static void op_free(void *p)
{
    link_op_t *op = p;
    if (op == NULL)
        return;
    bg_crypto_wipe(op->code, sizeof(op->code));
    free(op);
}

static void link_work(void *arg)
{
    link_op_t *op = arg;
    PGconn *c = edge_pg(op->cfg, NULL, &op->rc);
    if (c == NULL)
        return;
    op->rc = bg_tg_link_code_new(c, op->user_id, op->code, &op->expires_ms);
}

static void link_done(edge_req_t *er, void *arg)
{
    link_op_t *op = arg;
    if (er->req == NULL)
        return;
    if (op->rc != 0) {
        /* a user deleted since the token was issued is no longer signed in */
        if (op->rc == BG_ERR_NOT_FOUND)
            edge_error(er, "unauthorized", NULL, NULL, 0);
        else
            edge_fail(er, op->rc);
        return;
    }
    char expires[BG_RFC3339_BUFSIZE], command[32];
    if (bg_timeutil_format_rfc3339(expires, sizeof(expires), op->expires_ms, false) != 0) {
        edge_fail(er, BG_ERR_INVALID);
        return;
    }
    snprintf(command, sizeof(command), "/link %s", op->code);
    bg_buf_t out;
    bg_buf_init(&out, 1024);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    bg_json_write_begin_object(&w);
    bg_json_write_field_str(&w, "code", op->code);
    bg_json_write_field_str(&w, "expires_at", expires);
    bg_json_write_field_str(&w, "command", command);
    bg_json_write_end_object(&w);
    edge_add_header(er, "cache-control", "no-store");
    edge_respond_writer(er, 201, &w, &out);
    bg_crypto_wipe(command, sizeof(command));
}

/* POST /auth/telegram/link-code */
static void link_code_post(edge_req_t *er)
{
    /* no fields; an empty body or {} */
    edge_values_t v;
    if (!edge_body(er, NULL, 0, &v))
        return;
    link_op_t *op = bg_calloc(1, sizeof(*op));
    op->cfg = er->thread->server->cfg;
    (void)bg_strlcpy(op->user_id, er->auth.user_id, sizeof(op->user_id));
    er->data = op;
    er->data_free = op_free;
    edge_run(er, link_work, link_done);
}

const edge_route_t edge_routes_link[] = {
    {"POST", "/auth/telegram/link-code", "auth_telegram_link_code", link_code_post, EDGE_ROUTE_JSON,
     4096, EDGE_USER},
    {NULL, NULL, NULL, NULL, 0, 0, EDGE_PUBLIC},
};
