/*
 * /orgs: the organizations a user belongs to and their members. Membership and roles are checked in
 * Postgres by the accounts module; an organization the caller does not belong to answers 404.
 */
#include <string.h>

#include "bg/accounts.h"
#include "bg/err.h"
#include "bg/json.h"
#include "bg/pg.h"
#include "edge.h"

#define MAX_ORGS 200
#define MAX_MEMBERS 500

typedef struct st_org_op {
    const bg_config_t *cfg;
    char user_id[64], request_id[EDGE_REQUEST_ID_LEN + 1], ip[64];
    char *org_id, *member_id, *email, *role, *name;
    int rc;
    const char *what;
    bg_org_t org;
    bg_org_t *orgs;           /* owned */
    bg_org_member_t *members; /* owned */
    size_t count;
} org_op_t;

static void op_free(void *p)
{
    org_op_t *op = p;
    free(op->org_id);
    free(op->member_id);
    free(op->email);
    free(op->role);
    free(op->name);
    free(op->orgs);
    free(op->members);
    free(op);
}

static org_op_t *op_new(edge_req_t *er)
{
    org_op_t *op = bg_calloc(1, sizeof(*op));
    op->cfg = er->thread->server->cfg;
    bg_strlcpy(op->user_id, er->auth.user_id, sizeof(op->user_id));
    memcpy(op->request_id, er->request_id, sizeof(op->request_id));
    edge_peer_ip(er, op->ip, sizeof(op->ip));
    if (er->nparams > 0)
        op->org_id = bg_strndup(er->params[0].base, er->params[0].len);
    if (er->nparams > 1)
        op->member_id = bg_strndup(er->params[1].base, er->params[1].len);
    er->data = op;
    er->data_free = op_free;
    return op;
}

static PGconn *db(org_op_t *op)
{
    return edge_pg(op->cfg, NULL, &op->rc);
}

static bg_actor_t actor_of(const org_op_t *op)
{
    bg_actor_t a = {"user", op->user_id, op->request_id, op->ip[0] != '\0' ? op->ip : NULL};
    return a;
}

static bool failed(edge_req_t *er, const org_op_t *op)
{
    if (op->rc == 0 && er->req != NULL)
        return false;
    if (op->rc == BG_ERR_NOT_FOUND && er->req != NULL && op->what != NULL &&
        strcmp(op->what, "user") == 0) {
        /* the e-mail names nobody (otherwise the organization is not the caller's: plain 404) */
        edge_error(er, "not_found", "{\"reason\":\"unknown_user\"}", NULL, 0);
        return true;
    }
    edge_fail(er, op->rc);
    return true;
}

static void write_org(bg_json_writer_t *w, const bg_org_t *o)
{
    bg_json_write_begin_object(w);
    bg_json_write_field_str(w, "id", o->id);
    bg_json_write_field_str(w, "name", o->name);
    bg_json_write_field_bool(w, "personal", o->personal);
    bg_json_write_field_str(w, "role", o->my_role);
    bg_json_write_end_object(w);
}

/* GET /orgs */
static void list_work(void *arg)
{
    org_op_t *op = arg;
    PGconn *c = db(op);
    if (c == NULL)
        return;
    op->orgs = bg_calloc(MAX_ORGS, sizeof(*op->orgs));
    op->rc = bg_acct_org_list(c, op->user_id, op->orgs, MAX_ORGS, &op->count);
}

static void list_done(edge_req_t *er, void *arg)
{
    org_op_t *op = arg;
    if (failed(er, op))
        return;
    bg_buf_t out;
    bg_buf_init(&out, 1 << 20);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    bg_json_write_begin_object(&w);
    bg_json_write_key(&w, "data");
    bg_json_write_begin_array(&w);
    for (size_t i = 0; i < op->count; i++)
        write_org(&w, &op->orgs[i]);
    bg_json_write_end_array(&w);
    bg_json_write_field_null(&w, "next_cursor");
    bg_json_write_end_object(&w);
    edge_respond_writer(er, 200, &w, &out);
}

static void orgs_list(edge_req_t *er)
{
    op_new(er);
    edge_run(er, list_work, list_done);
}

/* POST /orgs */
static void create_work(void *arg)
{
    org_op_t *op = arg;
    PGconn *c = db(op);
    if (c == NULL)
        return;
    bg_actor_t actor = actor_of(op);
    op->rc = bg_acct_org_create(c, op->user_id, op->name, &actor, &op->org);
}

static void create_done(edge_req_t *er, void *arg)
{
    org_op_t *op = arg;
    if (failed(er, op))
        return;
    bg_buf_t out;
    bg_buf_init(&out, 65536);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    write_org(&w, &op->org);
    edge_respond_writer(er, 201, &w, &out);
}

static const edge_field_t create_fields[] = {
    {"name", EDGE_F_STR, true, 1, 200, EDGE_CHECK_NONE},
};

static void orgs_create(edge_req_t *er)
{
    edge_values_t v;
    if (!edge_body(er, create_fields, BG_ARRAY_SIZE(create_fields), &v))
        return;
    org_op_t *op = op_new(er);
    op->name = bg_strdup(v.str[0]);
    edge_run(er, create_work, create_done);
}

/* GET /orgs/{id} */
static void get_work(void *arg)
{
    org_op_t *op = arg;
    PGconn *c = db(op);
    if (c == NULL)
        return;
    op->members = bg_calloc(MAX_MEMBERS, sizeof(*op->members));
    op->rc =
        bg_acct_org_get(c, op->user_id, op->org_id, &op->org, op->members, MAX_MEMBERS, &op->count);
}

static void get_done(edge_req_t *er, void *arg)
{
    org_op_t *op = arg;
    if (failed(er, op))
        return;
    bg_buf_t out;
    bg_buf_init(&out, 1 << 20);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    bg_json_write_begin_object(&w);
    bg_json_write_field_str(&w, "id", op->org.id);
    bg_json_write_field_str(&w, "name", op->org.name);
    bg_json_write_field_bool(&w, "personal", op->org.personal);
    bg_json_write_field_str(&w, "role", op->org.my_role);
    bg_json_write_key(&w, "members");
    bg_json_write_begin_array(&w);
    for (size_t i = 0; i < op->count; i++) {
        bg_json_write_begin_object(&w);
        bg_json_write_field_str(&w, "user_id", op->members[i].user_id);
        bg_json_write_field_str(&w, "email", op->members[i].email);
        bg_json_write_field_str(&w, "name", op->members[i].name);
        bg_json_write_field_str(&w, "role", op->members[i].role);
        bg_json_write_end_object(&w);
    }
    bg_json_write_end_array(&w);
    bg_json_write_end_object(&w);
    edge_respond_writer(er, 200, &w, &out);
}

static void orgs_get(edge_req_t *er)
{
    op_new(er);
    edge_run(er, get_work, get_done);
}

/* POST /orgs/{id}/members {email, role} */
static void member_set_work(void *arg)
{
    org_op_t *op = arg;
    PGconn *c = db(op);
    if (c == NULL)
        return;
    bg_actor_t actor = actor_of(op);
    op->rc =
        bg_acct_org_set_member(c, op->user_id, op->org_id, op->email, op->role, &actor, &op->what);
}

static void member_done(edge_req_t *er, void *arg)
{
    org_op_t *op = arg;
    if (failed(er, op))
        return;
    edge_respond(er, 204, NULL, NULL, 0);
}

static const edge_field_t member_fields[] = {
    {"email", EDGE_F_STR, true, 3, 254, EDGE_CHECK_EMAIL},
    {"role", EDGE_F_STR, true, 1, 16, EDGE_CHECK_NONE},
};

static void members_set(edge_req_t *er)
{
    edge_values_t v;
    if (!edge_body(er, member_fields, BG_ARRAY_SIZE(member_fields), &v))
        return;
    if (strcmp(v.str[1], "admin") != 0 && strcmp(v.str[1], "member") != 0) {
        edge_invalid_field(er, "role", "invalid_value", NULL);
        return;
    }
    org_op_t *op = op_new(er);
    op->email = bg_strdup(v.str[0]);
    op->role = bg_strdup(v.str[1]);
    edge_run(er, member_set_work, member_done);
}

/* DELETE /orgs/{id}/members/{user_id} */
static void member_remove_work(void *arg)
{
    org_op_t *op = arg;
    PGconn *c = db(op);
    if (c == NULL)
        return;
    bg_actor_t actor = actor_of(op);
    op->rc = bg_acct_org_remove_member(c, op->user_id, op->org_id, op->member_id, &actor);
}

static void members_remove(edge_req_t *er)
{
    op_new(er);
    edge_run(er, member_remove_work, member_done);
}

const edge_route_t edge_routes_orgs[] = {
    {"GET", "/orgs", "orgs", orgs_list, 0, 0, EDGE_USER},
    {"POST", "/orgs", "orgs", orgs_create, EDGE_ROUTE_JSON, 16384, EDGE_USER},
    {"GET", "/orgs/{id}", "org", orgs_get, 0, 0, EDGE_USER},
    {"POST", "/orgs/{id}/members", "org_members", members_set, EDGE_ROUTE_JSON, 16384, EDGE_USER},
    {"DELETE", "/orgs/{id}/members/{user_id}", "org_member", members_remove, 0, 0, EDGE_USER},
    {NULL, NULL, NULL, NULL, 0, 0, EDGE_PUBLIC},
};
