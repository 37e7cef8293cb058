/*
 * /admin/policies: platform admins manage the policy rules (bg/policy.h says what they mean). The
 * route requires an admin token and the handler checks the role again in Postgres, like
 * /admin/users. Rules are validated by the policy module itself, so the API refuses exactly what
 * the engine could not use, naming the field ("body.rpm", "scope_id").
 *
 * Propagation. The admission script reads each user's compiled state from Redis and never looks at
 * Postgres, so a changed rule takes effect for a user only when that user's state is compiled
 * again. Right after a change (still on the pool thread, before the answer) the users the rule's
 * scope reaches — before and after an update — are recompiled page by page and written with the
 * blocking client's MULTI/DEL/HSET/EXEC, on a connection kept per pool thread. Every edge instance
 * reads the same Redis, so the change holds everywhere as soon as the answer leaves; the answer
 * reports how many users were recompiled ("recompiled", or the x-policy-recompiled header of a
 * 204). A user whose recompile failed keeps the old state until the next change or plan event;
 * that is logged, and the change itself stands.
 */
#include <stdlib.h>
#include <string.h>

#include "bg/accounts.h"
#include "bg/err.h"
#include "bg/id.h"
#include "bg/json.h"
#include "bg/log.h"
#include "bg/pg.h"
#include "bg/policy.h"
#include "bg/policy_admin.h"
#include "bg/redis.h"
#include "bg/timeutil.h"
#include "edge.h"

#define PAGE 200

typedef struct st_policy_op {
    const bg_config_t *cfg;
    char admin_id[64], request_id[EDGE_REQUEST_ID_LEN + 1], ip[64];
    char *id;                      /* owned; the path's rule id */
    char *type, *scope, *scope_id; /* owned; filters or input */
    char *name, *body;             /* owned; input */
    int32_t priority;
    bool enabled;
    int rc;
    bg_policy_verr_t verr; /* when rc is BG_ERR_INVALID */
    bg_policy_row_t row;
    bg_policy_row_t *rows; /* owned; a list */
    size_t count;
    int64_t recompiled;
} policy_op_t;

static void op_free(void *p)
{
    policy_op_t *op = p;
    free(op->id);
    free(op->type);
    free(op->scope);
    free(op->scope_id);
    free(op->name);
    free(op->body);
    bg_policy_row_dispose(&op->row);
    for (size_t i = 0; op->rows != NULL && i < op->count; i++)
        bg_policy_row_dispose(&op->rows[i]);
    free(op->rows);
    free(op);
}

static policy_op_t *op_new(edge_req_t *er)
{
    policy_op_t *op = bg_calloc(1, sizeof(*op));
    op->cfg = er->thread->server->cfg;
    bg_strlcpy(op->admin_id, er->auth.user_id, sizeof(op->admin_id));
    memcpy(op->request_id, er->request_id, sizeof(op->request_id));
    edge_peer_ip(er, op->ip, sizeof(op->ip));
    if (er->nparams > 0)
        op->id = bg_strndup(er->params[0].base, er->params[0].len);
    er->data = op;
    er->data_free = op_free;
    return op;
}

static bg_actor_t actor_of(const policy_op_t *op)
{
    bg_actor_t a = {"admin", op->admin_id, op->request_id, op->ip[0] != '\0' ? op->ip : NULL};
    return a;
}

/* Connects and checks that the caller is still an active admin. */
static PGconn *admin_db(policy_op_t *op)
{
    return edge_pg(op->cfg, op->admin_id, &op->rc);
}

/* Recompiles every user scope/scope_id reaches; adds to op->recompiled. */
static void recompile_scope(policy_op_t *op, PGconn *c, const char *scope, const char *scope_id)
{
    bg_redis_t *r = edge_pool_redis(op->cfg);
    if (r == NULL) {
        bg_warn("policy change %s: no Redis client to recompile with", op->request_id);
        return;
    }
    char(*ids)[BG_POLICY_ID_SIZE] = bg_calloc(PAGE, sizeof(*ids));
    char after[BG_POLICY_ID_SIZE] = "";
    size_t n;
    do {
        if (bg_policy_admin_affected(c, scope, scope_id[0] != '\0' ? scope_id : NULL, after, ids,
                                     PAGE, &n) != 0) {
            bg_warn("policy change %s: cannot list the users of scope %s", op->request_id, scope);
            break;
        }
        for (size_t i = 0; i < n; i++) {
            bg_admission_state_t st;
            int rc = bg_policy_compile_user(c, ids[i], bg_timeutil_wall_ms(), &st);
            if (rc == 0)
                rc = bg_policy_state_write(r, op->cfg->shards, &st);
            if (rc == 0)
                op->recompiled++;
            else if (rc != BG_ERR_NOT_FOUND)
                bg_warn("policy change %s: user %s not recompiled: %s", op->request_id, ids[i],
                        bg_strerror(rc));
        }
        if (n > 0)
            bg_strlcpy(after, ids[n - 1], sizeof(after));
    } while (n == PAGE);
    free(ids);
}

/* Recompiles the users of the rule's scope before and (when different) after a change. */
static void propagate(policy_op_t *op, PGconn *c, const bg_policy_row_t *before,
                      const bg_policy_row_t *after)
{
    if (before != NULL)
        recompile_scope(op, c, before->scope, before->scope_id);
    if (after != NULL && (before == NULL || strcmp(before->scope, after->scope) != 0 ||
                          strcmp(before->scope_id, after->scope_id) != 0))
        recompile_scope(op, c, after->scope, after->scope_id);
}

/* ---- answers ---- */

static bool failed(edge_req_t *er, const policy_op_t *op)
{
    if (op->rc == 0 && er->req != NULL)
        return false;
    if (op->rc == BG_ERR_INVALID && er->req != NULL)
        edge_invalid_field(er, op->verr.field[0] != '\0' ? op->verr.field : "body", "invalid_value",
                           NULL);
    else
        edge_fail(er, op->rc);
    return true;
}

static void write_row(bg_json_writer_t *w, const bg_policy_row_t *row, const bg_json_t *body)
{
    bg_json_write_begin_object(w);
    bg_json_write_field_str(w, "id", row->id);
    bg_json_write_field_str(w, "type", row->type);
    bg_json_write_field_str(w, "scope", row->scope);
    if (row->scope_id[0] != '\0')
        bg_json_write_field_str(w, "scope_id", row->scope_id);
    else
        bg_json_write_field_null(w, "scope_id");
    bg_json_write_field_str(w, "name", row->name);
    bg_json_write_key(w, "body");
    if (body != NULL) {
        bg_json_write_value(w, body);
    } else {
        bg_json_write_begin_object(w);
        bg_json_write_end_object(w);
    }
    bg_json_write_field_int(w, "priority", row->priority);
    bg_json_write_field_bool(w, "enabled", row->enabled);
    bg_json_write_field_str(w, "created_at", row->created_at);
    bg_json_write_field_str(w, "updated_at", row->updated_at);
}

/* Writes one rule object (the stored body parsed back, so it nests as JSON). */
static void write_rule(bg_json_writer_t *w, const bg_policy_row_t *row, int64_t recompiled)
{
    bg_json_doc_t *doc = NULL;
    const char *desc;
    size_t off;
    const bg_json_t *body = NULL;
    if (row->body != NULL &&
        bg_json_parse(row->body, strlen(row->body), NULL, &doc, &desc, &off) == 0)
        body = bg_json_root(doc);
    write_row(w, row, body);
    if (recompiled >= 0)
        bg_json_write_field_int(w, "recompiled", recompiled);
    bg_json_write_end_object(w);
    bg_json_doc_free(doc);
}

static void respond_rule(edge_req_t *er, int status, const bg_policy_row_t *row, int64_t recompiled)
{
    bg_buf_t out;
    bg_buf_init(&out, 65536);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    write_rule(&w, row, recompiled);
    if (bg_json_write_finish(&w) != 0)
        edge_error(er, "internal", NULL, NULL, 0);
    else
        edge_respond_json(er, status, &out);
    bg_buf_dispose(&out);
}

/* ---- GET /admin/policies?type=&scope= ---- */

static void list_work(void *arg)
{
    policy_op_t *op = arg;
    PGconn *c = admin_db(op);
    if (c == NULL)
        return;
    op->rows = bg_calloc(BG_POLICY_ADMIN_LIST_MAX, sizeof(*op->rows));
    op->rc = bg_policy_admin_list(c, op->type, op->scope, op->rows, BG_POLICY_ADMIN_LIST_MAX,
                                  &op->count);
}

static void list_done(edge_req_t *er, void *arg)
{
    policy_op_t *op = arg;
    if (failed(er, op))
        return;
    bg_buf_t out;
    bg_buf_init(&out, 32 << 20);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    bg_json_write_begin_object(&w);
    bg_json_write_key(&w, "data");
    bg_json_write_begin_array(&w);
    for (size_t i = 0; i < op->count; i++)
        write_rule(&w, &op->rows[i], -1);
    bg_json_write_end_array(&w);
    bg_json_write_field_null(&w, "next_cursor");
    bg_json_write_end_object(&w);
    if (bg_json_write_finish(&w) != 0)
        edge_error(er, "internal", NULL, NULL, 0);
    else
        edge_respond_json(er, 200, &out);
    bg_buf_dispose(&out);
}

static void policies_list(edge_req_t *er)
{
    char type[32], scope[32];
    bg_policy_type_t t;
    bg_policy_scope_t s;
    bool has_type = edge_query(er, "type", type, sizeof(type)) && type[0] != '\0';
    bool has_scope = edge_query(er, "scope", scope, sizeof(scope)) && scope[0] != '\0';
    if (has_type && bg_policy_type_parse(type, &t) != 0) {
        edge_invalid_field(er, "type", "invalid_value", NULL);
        return;
    }
    if (has_scope && bg_policy_scope_parse(scope, &s) != 0) {
        edge_invalid_field(er, "scope", "invalid_value", NULL);
        return;
    }
    policy_op_t *op = op_new(er);
    op->type = has_type ? bg_strdup(type) : NULL;
    op->scope = has_scope ? bg_strdup(scope) : NULL;
    edge_run(er, list_work, list_done);
}

/* ---- GET /admin/policies/{id} ---- */

static void get_work(void *arg)
{
    policy_op_t *op = arg;
    PGconn *c = admin_db(op);
    if (c != NULL)
        op->rc = bg_policy_admin_get(c, op->id, &op->row);
}

static void get_done(edge_req_t *er, void *arg)
{
    policy_op_t *op = arg;
    if (!failed(er, op))
        respond_rule(er, 200, &op->row, -1);
}

static void policies_get(edge_req_t *er)
{
    op_new(er);
    edge_run(er, get_work, get_done);
}

/* ---- POST /admin/policies and PUT /admin/policies/{id} ---- */

static bg_policy_input_t input_of(const policy_op_t *op)
{
    bg_policy_input_t in = {op->type, op->scope,    op->scope_id, op->name,
                            op->body, op->priority, op->enabled};
    return in;
}

/* Checks what only the database knows (the plan, user or organization of the scope). */
static PGconn *write_db(policy_op_t *op, bg_policy_input_t *in)
{
    PGconn *c = admin_db(op);
    if (c == NULL)
        return NULL;
    *in = input_of(op);
    bg_policy_scope_t scope;
    if (bg_policy_scope_parse(op->scope, &scope) != 0) {
        op->rc = BG_ERR_INVALID;
        return NULL;
    }
    if ((op->rc = bg_policy_scope_check(c, scope, op->scope_id, &op->verr)) != 0 ||
        (op->rc = bg_policy_admin_scope_exists(c, in, &op->verr)) != 0)
        return NULL;
    return c;
}

static void create_work(void *arg)
{
    policy_op_t *op = arg;
    bg_policy_input_t in;
    PGconn *c = write_db(op, &in);
    if (c == NULL)
        return;
    bg_actor_t actor = actor_of(op);
    if ((op->rc = bg_policy_admin_create(c, &in, &actor, &op->row)) == 0)
        propagate(op, c, NULL, &op->row);
}

static void create_done(edge_req_t *er, void *arg)
{
    policy_op_t *op = arg;
    if (!failed(er, op))
        respond_rule(er, 201, &op->row, op->recompiled);
}

static void update_work(void *arg)
{
    policy_op_t *op = arg;
    bg_policy_input_t in;
    PGconn *c = write_db(op, &in);
    if (c == NULL)
        return;
    bg_actor_t actor = actor_of(op);
    bg_policy_row_t before;
    if ((op->rc = bg_policy_admin_update(c, op->id, &in, &actor, &before, &op->row)) != 0)
        return;
    propagate(op, c, &before, &op->row);
    bg_policy_row_dispose(&before);
}

static void update_done(edge_req_t *er, void *arg)
{
    policy_op_t *op = arg;
    if (!failed(er, op))
        respond_rule(er, 200, &op->row, op->recompiled);
}

/* Answers 422 for a rule the policy module refused; fields of the body are "body.<field>". */
static void invalid_rule(edge_req_t *er, const bg_policy_verr_t *verr)
{
    static const char *const top[] = {"type", "scope", "scope_id", "body"};
    char field[64];
    bool is_top = false;
    for (size_t i = 0; i < BG_ARRAY_SIZE(top); i++)
        is_top = is_top || strcmp(verr->field, top[i]) == 0;
    if (is_top)
        bg_strlcpy(field, verr->field, sizeof(field));
    else
        snprintf(field, sizeof(field), "body.%s", verr->field);
    const char *reason = "invalid_value";
    if (verr->reason != NULL && strstr(verr->reason, "is not a field") != NULL)
        reason = "unknown_field";
    else if (verr->reason != NULL && strcmp(verr->reason, "is required") == 0)
        reason = "missing";
    edge_invalid_field(er, field, reason, NULL);
}

static void missing_or_wrong(edge_req_t *er, const char *field, bool present)
{
    edge_invalid_field(er, field, present ? "wrong_type" : "missing", NULL);
}

/* Parses and validates the body of POST and PUT into op; answers and returns false on error. */
static bool take_input(edge_req_t *er, policy_op_t *op)
{
    h2o_req_t *req = er->req;
    bg_json_doc_t *doc = NULL;
    const char *desc;
    size_t off = 0;
    const char *text = req->entity.base != NULL ? req->entity.base : "";
    if (bg_json_parse(text, req->entity.len, NULL, &doc, &desc, &off) != 0) {
        char details[64];
        snprintf(details, sizeof(details), "{\"offset\":%zu}", off);
        edge_error(er, "malformed_json", details, NULL, 0);
        return false;
    }
    er->body_doc = doc;
    const bg_json_t *root = bg_json_root(doc);
    if (!bg_json_is_object(root)) {
        edge_error(er, "malformed_json", NULL, NULL, 0);
        return false;
    }
    static const char *const known[] = {"type", "scope",    "scope_id", "name",
                                        "body", "priority", "enabled"};
    for (size_t i = 0; i < bg_json_len(root); i++) {
        const char *key;
        (void)bg_json_member(root, i, &key);
        bool ok = false;
        for (size_t k = 0; k < BG_ARRAY_SIZE(known) && !ok; k++)
            ok = strcmp(key, known[k]) == 0;
        if (!ok) {
            edge_invalid_field(er, key, "unknown_field", NULL);
            return false;
        }
    }
    const bg_json_t *type = bg_json_find(root, "type"), *scope = bg_json_find(root, "scope");
    const bg_json_t *scope_id = bg_json_find(root, "scope_id"), *name = bg_json_find(root, "name");
    const bg_json_t *body = bg_json_find(root, "body"), *prio = bg_json_find(root, "priority");
    const bg_json_t *enabled = bg_json_find(root, "enabled");
    size_t len;
    const char *type_s = type != NULL ? bg_json_str(type, &len) : NULL;
    const char *scope_s = scope != NULL ? bg_json_str(scope, &len) : NULL;
    if (type_s == NULL) {
        missing_or_wrong(er, "type", type != NULL);
        return false;
    }
    if (scope_s == NULL) {
        missing_or_wrong(er, "scope", scope != NULL);
        return false;
    }
    const char *scope_id_s = NULL;
    if (scope_id != NULL && bg_json_type(scope_id) != BG_JSON_NULL &&
        (scope_id_s = bg_json_str(scope_id, &len)) == NULL) {
        missing_or_wrong(er, "scope_id", true);
        return false;
    }
    const char *name_s = "";
    if (name != NULL && (name_s = bg_json_str(name, &len)) == NULL) {
        missing_or_wrong(er, "name", true);
        return false;
    }
    if (name != NULL && len > 200) {
        const char *params[] = {"max", "200", NULL};
        edge_invalid_field(er, "name", "too_long", params);
        return false;
    }
    if (body == NULL || !bg_json_is_object(body)) {
        missing_or_wrong(er, "body", body != NULL);
        return false;
    }
    int64_t p = 0;
    if (prio != NULL && (!bg_json_int(prio, &p) || p < -1000000 || p > 1000000)) {
        const char *params[] = {"min", "-1000000", "max", "1000000", NULL};
        edge_invalid_field(er, "priority", "out_of_range", params);
        return false;
    }
    bool en = true;
    if (enabled != NULL && !bg_json_bool(enabled, &en)) {
        missing_or_wrong(er, "enabled", true);
        return false;
    }

    bg_buf_t btext;
    bg_buf_init(&btext, BG_POLICY_BODY_MAX + 1);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &btext);
    bg_json_write_value(&w, body);
    bg_policy_verr_t verr = {{0}, NULL};
    bg_policy_rule_t rule;
    memset(&rule, 0, sizeof(rule));
    int rc = bg_json_write_finish(&w);
    if (rc != 0) {
        bg_strlcpy(verr.field, "body", sizeof(verr.field));
        verr.reason = "too large";
    } else {
        rc = bg_policy_rule_parse(type_s, scope_s, scope_id_s, btext.base, btext.len, &rule, &verr);
        if (rc == 0)
            bg_policy_rule_dispose(&rule);
    }
    if (rc != 0) {
        bg_buf_dispose(&btext);
        invalid_rule(er, &verr);
        return false;
    }
    op->type = bg_strdup(type_s);
    op->scope = bg_strdup(scope_s);
    /* the stored scope id is the canonical one the engine matches (lower-case uuids) */
    op->scope_id = scope_id_s != NULL ? bg_strdup(rule.scope_id) : NULL;
    op->name = bg_strdup(name_s);
    op->body = bg_strndup(btext.base, btext.len);
    op->priority = (int32_t)p;
    op->enabled = en;
    bg_buf_dispose(&btext);
    return true;
}

static void policies_create(edge_req_t *er)
{
    policy_op_t *op = op_new(er);
    if (take_input(er, op))
        edge_run(er, create_work, create_done);
}

static void policies_update(edge_req_t *er)
{
    policy_op_t *op = op_new(er);
    if (!bg_id_uuid_is_valid(op->id)) {
        edge_error(er, "not_found", NULL, NULL, 0);
        return;
    }
    if (take_input(er, op))
        edge_run(er, update_work, update_done);
}

/* ---- DELETE /admin/policies/{id} ---- */

static void delete_work(void *arg)
{
    policy_op_t *op = arg;
    PGconn *c = admin_db(op);
    if (c == NULL)
        return;
    bg_actor_t actor = actor_of(op);
    if ((op->rc = bg_policy_admin_delete(c, op->id, &actor, &op->row)) == 0)
        propagate(op, c, &op->row, NULL);
}

static void delete_done(edge_req_t *er, void *arg)
{
    policy_op_t *op = arg;
    if (failed(er, op))
        return;
    char n[24];
    snprintf(n, sizeof(n), "%lld", (long long)op->recompiled);
    edge_add_header(er, "x-policy-recompiled", n);
    edge_respond(er, 204, NULL, NULL, 0);
}

static void policies_delete(edge_req_t *er)
{
    op_new(er);
    edge_run(er, delete_work, delete_done);
}

const edge_route_t edge_routes_policies[] = {
    {"GET", "/admin/policies", "admin_policies", policies_list, 0, 0, EDGE_ADMIN},
    {"POST", "/admin/policies", "admin_policies", policies_create, EDGE_ROUTE_JSON, 65536,
     EDGE_ADMIN},
    {"GET", "/admin/policies/{id}", "admin_policy", policies_get, 0, 0, EDGE_ADMIN},
    {"PUT", "/admin/policies/{id}", "admin_policy", policies_update, EDGE_ROUTE_JSON, 65536,
     EDGE_ADMIN},
    {"DELETE", "/admin/policies/{id}", "admin_policy", policies_delete, 0, 0, EDGE_ADMIN},
    {NULL, NULL, NULL, NULL, 0, 0, EDGE_PUBLIC},
};
