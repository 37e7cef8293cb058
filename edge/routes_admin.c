/*
 * /admin/users: platform administration of users. The route requires an access token with the admin
 * role; the handler checks the role again in Postgres (a demoted admin's token is also refused by
 * the not-before mark in Redis). Every change is audited by the accounts module, and a change that
 * must end the user's sessions (disable, role change, delete) marks the user's not-before time in
 * Redis so every edge instance refuses their access tokens at once.
 */
#include <stdlib.h>
#include <string.h>

#include "bg/accounts.h"
#include "bg/authstate.h"
#include "bg/err.h"
#include "bg/json.h"
#include "bg/log.h"
#include "bg/pg.h"
#include "bg/redis.h"
#include "bg/timeutil.h"
#include "edge.h"

#define PAGE_MAX 100

typedef struct st_admin_op {
    const bg_config_t *cfg;
    char admin_id[64], request_id[EDGE_REQUEST_ID_LEN + 1], ip[64];
    char *user_id, *name, *locale, *role, *status, *query, *cursor;
    size_t limit;
    int rc;
    bool ends_sessions;
    bg_user_t user;
    bg_user_t *users; /* owned */
    size_t count;
    char next_cursor[256];
    void (*then)(edge_req_t *er, bool stored); /* continuation after a Redis write */
} admin_op_t;

static void op_free(void *p)
{
    admin_op_t *op = p;
    free(op->user_id);
    free(op->name);
    free(op->locale);
    free(op->role);
    free(op->status);
    free(op->query);
    free(op->cursor);
    free(op->users);
    free(op);
}

static admin_op_t *op_new(edge_req_t *er)
{
    admin_op_t *op = bg_calloc(1, sizeof(*op));
    op->cfg = er->thread->server->cfg;
    bg_strlcpy(op->admin_id, er->auth.user_id, sizeof(op->admin_id));
    memcpy(op->request_id, er->request_id, sizeof(op->request_id));
    edge_peer_ip(er, op->ip, sizeof(op->ip));
    if (er->nparams > 0)
        op->user_id = bg_strndup(er->params[0].base, er->params[0].len);
    er->data = op;
    er->data_free = op_free;
    return op;
}

/* Connects and checks that the caller is still an active admin. */
static PGconn *admin_db(admin_op_t *op)
{
    return edge_pg(op->cfg, op->admin_id, &op->rc);
}

static bg_actor_t actor_of(const admin_op_t *op)
{
    bg_actor_t a = {"admin", op->admin_id, op->request_id, op->ip[0] != '\0' ? op->ip : NULL};
    return a;
}

static bool failed(edge_req_t *er, const admin_op_t *op)
{
    if (op->rc == 0 && er->req != NULL)
        return false;
    edge_fail(er, op->rc);
    return true;
}

static void write_user(bg_json_writer_t *w, const bg_user_t *u)
{
    bg_json_write_begin_object(w);
    bg_json_write_field_str(w, "id", u->id);
    bg_json_write_field_str(w, "email", u->email);
    bg_json_write_field_str(w, "name", u->name);
    bg_json_write_field_str(w, "locale", u->locale);
    bg_json_write_field_str(w, "role", u->role);
    bg_json_write_field_str(w, "status", u->status);
    bg_json_write_field_str(w, "organization_id", u->organization_id);
    bg_json_write_field_str(w, "created_at", u->created_at);
    bg_json_write_field_bool(w, "deleted", u->deleted);
    bg_json_write_end_object(w);
}

static void respond_user(edge_req_t *er, const bg_user_t *u)
{
    bg_buf_t out;
    bg_buf_init(&out, 65536);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    write_user(&w, u);
    edge_respond_writer(er, 200, &w, &out);
}

static void sessions_ended(void *ud, int err, const redisReply *reply)
{
    edge_req_t *er = ud;
    admin_op_t *op = er->data;
    bool stored = err == 0 && reply->type == REDIS_REPLY_STATUS;
    if (!stored)
        bg_warn("cannot end the sessions of user %s in Redis", op->user_id);
    op->then(er, stored);
    edge_req_unref(er);
}

/*
 * Every edge instance refuses the user's current access tokens from now on; then(er, stored) runs
 * once Redis has the mark, so the admin's answer means it is in force everywhere.
 */
static void end_sessions_everywhere(edge_req_t *er, admin_op_t *op, const char *user_id,
                                    void (*then)(edge_req_t *er, bool stored))
{
    const bg_config_t *cfg = er->thread->server->cfg;
    char key[160], now[24], ttl[24];
    op->then = then;
    if (bg_authstate_key_nbf(key, sizeof(key), bg_shard_of(user_id, cfg->shards), user_id) != 0) {
        then(er, false);
        return;
    }
    /* milliseconds, compared with the issue time in a token's jti (a UUIDv7) */
    snprintf(now, sizeof(now), "%lld", (long long)bg_timeutil_wall_ms());
    snprintf(ttl, sizeof(ttl), "%lld", (long long)cfg->access_ttl_s * 2);
    const char *argv[] = {"SET", key, now, "EX", ttl};
    edge_req_ref(er);
    if (bg_redis_async_argv(er->thread->redis, sessions_ended, er, 5, argv, NULL) != 0) {
        edge_req_unref(er);
        then(er, false);
    }
}

/* GET /admin/users?q=&cursor=&limit= */
static void list_work(void *arg)
{
    admin_op_t *op = arg;
    PGconn *c = admin_db(op);
    if (c == NULL)
        return;
    op->users = bg_calloc(op->limit, sizeof(*op->users));
    op->rc = bg_acct_admin_list_users(c, op->query, op->cursor, op->limit, op->users, &op->count,
                                      op->next_cursor, sizeof(op->next_cursor));
}

static void list_done(edge_req_t *er, void *arg)
{
    admin_op_t *op = arg;
    if (failed(er, op))
        return;
    bg_buf_t out;
    bg_buf_init(&out, 4 << 20);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    bg_json_write_begin_object(&w);
    bg_json_write_key(&w, "data");
    bg_json_write_begin_array(&w);
    for (size_t i = 0; i < op->count; i++)
        write_user(&w, &op->users[i]);
    bg_json_write_end_array(&w);
    if (op->next_cursor[0] != '\0')
        bg_json_write_field_str(&w, "next_cursor", op->next_cursor);
    else
        bg_json_write_field_null(&w, "next_cursor");
    bg_json_write_end_object(&w);
    edge_respond_writer(er, 200, &w, &out);
}

static void users_list(edge_req_t *er)
{
    char q[256], cursor[256];
    admin_op_t *op = op_new(er);
    int limit = 50;
    if (!edge_query_limit(er, PAGE_MAX, &limit))
        return;
    op->limit = (size_t)limit;
    if (edge_query(er, "q", q, sizeof(q)) && q[0] != '\0')
        op->query = bg_strdup(q);
    if (edge_query(er, "cursor", cursor, sizeof(cursor)) && cursor[0] != '\0')
        op->cursor = bg_strdup(cursor);
    edge_run(er, list_work, list_done);
}

/* GET /admin/users/{id} */
static void get_work(void *arg)
{
    admin_op_t *op = arg;
    PGconn *c = admin_db(op);
    if (c != NULL)
        op->rc = bg_acct_admin_get_user(c, op->user_id, &op->user);
}

static void get_done(edge_req_t *er, void *arg)
{
    admin_op_t *op = arg;
    if (!failed(er, op))
        respond_user(er, &op->user);
}

static void users_get(edge_req_t *er)
{
    op_new(er);
    edge_run(er, get_work, get_done);
}

/* PUT /admin/users/{id} {name?, locale?, role?, status?} */
static void update_work(void *arg)
{
    admin_op_t *op = arg;
    PGconn *c = admin_db(op);
    if (c == NULL)
        return;
    bg_user_t before;
    if ((op->rc = bg_acct_admin_get_user(c, op->user_id, &before)) != 0)
        return;
    bg_actor_t actor = actor_of(op);
    op->rc = bg_acct_admin_update_user(c, op->user_id, op->name, op->locale, op->role, op->status,
                                       &actor, &op->user);
    op->ends_sessions =
        op->rc == 0 &&
        (strcmp(before.role, op->user.role) != 0 ||
         (strcmp(before.status, op->user.status) != 0 && strcmp(op->user.status, "disabled") == 0));
}

static void update_answer(edge_req_t *er, bool stored)
{
    admin_op_t *op = er->data;
    if (er->req == NULL)
        return;
    if (!stored)
        edge_error(er, "service_unavailable", NULL, NULL, 1); /* the PUT is safe to repeat */
    else
        respond_user(er, &op->user);
}

static void update_done(edge_req_t *er, void *arg)
{
    admin_op_t *op = arg;
    if (op->rc == 0 && op->ends_sessions)
        end_sessions_everywhere(er, op, op->user.id, update_answer);
    else if (!failed(er, op))
        respond_user(er, &op->user);
}

static const edge_field_t update_fields[] = {
    {"name", EDGE_F_STR, false, 0, 200, EDGE_CHECK_NONE},
    {"locale", EDGE_F_STR, false, 2, 15, EDGE_CHECK_LOCALE},
    {"role", EDGE_F_STR, false, 1, 16, EDGE_CHECK_NONE},
    {"status", EDGE_F_STR, false, 1, 16, EDGE_CHECK_NONE},
};

static void users_update(edge_req_t *er)
{
    edge_values_t v;
    if (!edge_body(er, update_fields, BG_ARRAY_SIZE(update_fields), &v))
        return;
    if (v.present[2] && strcmp(v.str[2], "user") != 0 && strcmp(v.str[2], "admin") != 0) {
        edge_invalid_field(er, "role", "invalid_value", NULL);
        return;
    }
    if (v.present[3] && strcmp(v.str[3], "active") != 0 && strcmp(v.str[3], "disabled") != 0) {
        edge_invalid_field(er, "status", "invalid_value", NULL);
        return;
    }
    admin_op_t *op = op_new(er);
    if (strcmp(op->user_id, op->admin_id) == 0 &&
        ((v.present[2] && strcmp(v.str[2], "admin") != 0) ||
         (v.present[3] && strcmp(v.str[3], "active") != 0))) {
        /* an admin cannot lock themselves out */
        edge_error(er, "conflict", "{\"reason\":\"cannot_demote_self\"}", NULL, 0);
        return;
    }
    op->name = v.present[0] ? bg_strdup(v.str[0]) : NULL;
    op->locale = v.present[1] ? bg_strdup(v.str[1]) : NULL;
    op->role = v.present[2] ? bg_strdup(v.str[2]) : NULL;
    op->status = v.present[3] ? bg_strdup(v.str[3]) : NULL;
    edge_run(er, update_work, update_done);
}

/* DELETE /admin/users/{id}: soft delete */
static void delete_work(void *arg)
{
    admin_op_t *op = arg;
    PGconn *c = admin_db(op);
    if (c == NULL)
        return;
    bg_actor_t actor = actor_of(op);
    op->rc = bg_acct_admin_delete_user(c, op->user_id, &actor);
}

static void delete_answer(edge_req_t *er, bool stored)
{
    if (er->req == NULL)
        return;
    if (!stored)
        edge_error(er, "service_unavailable", NULL, NULL, 1);
    else
        edge_respond(er, 204, NULL, NULL, 0);
}

static void delete_done(edge_req_t *er, void *arg)
{
    admin_op_t *op = arg;
    if (op->rc == 0)
        end_sessions_everywhere(er, op, op->user_id, delete_answer);
    else
        (void)failed(er, op);
}

static void users_delete(edge_req_t *er)
{
    admin_op_t *op = op_new(er);
    if (strcmp(op->user_id, op->admin_id) == 0) {
        edge_error(er, "conflict", "{\"reason\":\"cannot_delete_self\"}", NULL, 0);
        return;
    }
    edge_run(er, delete_work, delete_done);
}

const edge_route_t edge_routes_admin[] = {
    {"GET", "/admin/users", "admin_users", users_list, 0, 0, EDGE_ADMIN},
    {"GET", "/admin/users/{id}", "admin_user", users_get, 0, 0, EDGE_ADMIN},
    {"PUT", "/admin/users/{id}", "admin_user", users_update, EDGE_ROUTE_JSON, 16384, EDGE_ADMIN},
    {"DELETE", "/admin/users/{id}", "admin_user", users_delete, 0, 0, EDGE_ADMIN},
    {NULL, NULL, NULL, NULL, 0, 0, EDGE_PUBLIC},
};
