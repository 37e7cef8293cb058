/*
 * The plan catalogue over HTTP: GET /billing/plans (anyone: the pricing page), GET /admin/plans
 * and PUT /admin/plans/{id} (platform admins edit the catalogue), and POST /admin/users/{id}/plan
 * (a complimentary plan, the same grant as `bgctl plan grant`). The rules live in bg/plans.h; this
 * file parses, checks the caller, calls it and answers.
 *
 * Propagation. The admission script reads each user's compiled state from Redis and never looks at
 * Postgres, so a plan edit that moves admission (requests, period, features) is compiled into the
 * state of every user whose live subscription has the plan before the answer leaves (on the pool
 * thread, with a blocking Redis client kept per pool thread, as /admin/policies does); a grant
 * compiles its user's state likewise. Every edge reads the same Redis, so the change holds
 * everywhere when the answer arrives. A user whose recompile failed keeps the old state (logged;
 * the answer counts them in "recompile_failed") until `bgctl quota rebuild` or the next change.
 */
#include <stdlib.h>
#include <string.h>

#include "bg/accounts.h"
#include "bg/err.h"
#include "bg/id.h"
#include "bg/json.h"
#include "bg/log.h"
#include "bg/pg.h"
#include "bg/plans.h"
#include "bg/policy.h"
#include "bg/redis.h"
#include "bg/timeutil.h"
#include "edge.h"

typedef struct st_plans_op {
    const bg_config_t *cfg;
    char admin_id[64], request_id[EDGE_REQUEST_ID_LEN + 1], ip[64];
    char *id; /* owned; the path's plan or user id */
    /* PUT /admin/plans/{id} */
    bg_plan_update_t update;
    char *name, *currency, *period, *paddle_price_id; /* owned; what update points at */
    char **features;                                  /* owned array of owned strings */
    bg_plan_t *before, *after;                        /* owned */
    bg_plans_verr_t verr;
    int64_t recompiled, recompile_failed;
    /* lists */
    bg_plan_t *plans; /* owned */
    size_t count;
    /* POST /admin/users/{id}/plan */
    char *plan_id, *sub_id; /* owned */
    int days;
    bg_plan_grant_result_t grant;
    bg_admission_state_t state;
    bool state_written;
    int rc;
} plans_op_t;

static void op_free(void *p)
{
    plans_op_t *op = p;
    free(op->id);
    free(op->name);
    free(op->currency);
    free(op->period);
    free(op->paddle_price_id);
    for (size_t i = 0; op->features != NULL && i < op->update.nfeatures; i++)
        free(op->features[i]);
    free(op->features);
    free(op->before);
    free(op->plans);
    free(op->plan_id);
    free(op->sub_id);
    free(op);
}

static plans_op_t *op_new(edge_req_t *er)
{
    plans_op_t *op = bg_calloc(1, sizeof(*op));
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

static bg_actor_t actor_of(const plans_op_t *op)
{
    bg_actor_t a = {"admin", op->admin_id, op->request_id, op->ip[0] != '\0' ? op->ip : NULL};
    return a;
}

static bool failed(edge_req_t *er, const plans_op_t *op)
{
    if (op->rc == 0 && er->req != NULL)
        return false;
    edge_fail(er, op->rc);
    return true;
}

/* ---- answers ---- */

static void write_price(bg_json_writer_t *w, const bg_plan_t *p)
{
    bg_json_write_key(w, "price");
    bg_json_write_begin_object(w);
    bg_json_write_field_int(w, "amount", p->price_minor);
    bg_json_write_field_str(w, "currency", p->currency);
    bg_json_write_end_object(w);
}

/* Writes the members every plan object has (the public shape of DESIGN.md §5). */
static void write_public(bg_json_writer_t *w, const bg_plan_t *p)
{
    bg_json_write_field_str(w, "id", p->id);
    bg_json_write_field_str(w, "name", p->name);
    write_price(w, p);
    bg_json_write_field_int(w, "requests", p->requests);
    bg_json_write_field_str(w, "period", p->period);
    bg_json_write_key(w, "features");
    bg_json_write_begin_array(w);
    for (size_t i = 0; i < p->nfeatures; i++)
        bg_json_write_str(w, p->features[i]);
    bg_json_write_end_array(w);
    bg_json_write_field_bool(w, "api_access", p->api_access);
}

/* Writes the admin's view of a plan (an open object: the caller closes it). */
static void write_admin(bg_json_writer_t *w, const bg_plan_t *p)
{
    bg_json_write_begin_object(w);
    write_public(w, p);
    if (p->duration[0] != '\0')
        bg_json_write_field_str(w, "duration", p->duration);
    else
        bg_json_write_field_null(w, "duration");
    bg_json_write_field_bool(w, "purchasable", p->purchasable);
    bg_json_write_field_bool(w, "active", p->active);
    if (p->paddle_price_id[0] != '\0') {
        bg_json_write_field_str(w, "paddle_price_id", p->paddle_price_id);
        bg_json_write_field_str(w, "paddle_price_source", p->paddle_price_source);
    } else {
        bg_json_write_field_null(w, "paddle_price_id");
        bg_json_write_field_null(w, "paddle_price_source");
    }
    bg_json_write_field_int(w, "sort_order", p->sort_order);
    bg_json_write_field_str(w, "created_at", p->created_at);
    bg_json_write_field_str(w, "updated_at", p->updated_at);
}

static void respond_list(edge_req_t *er, const plans_op_t *op, bool admin)
{
    bg_buf_t out;
    bg_buf_init(&out, 1 << 20);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    bg_json_write_begin_object(&w);
    bg_json_write_key(&w, "data");
    bg_json_write_begin_array(&w);
    for (size_t i = 0; i < op->count; i++) {
        if (admin) {
            write_admin(&w, &op->plans[i]);
        } else {
            bg_json_write_begin_object(&w);
            write_public(&w, &op->plans[i]);
        }
        bg_json_write_end_object(&w);
    }
    bg_json_write_end_array(&w);
    bg_json_write_field_null(&w, "next_cursor");
    bg_json_write_end_object(&w);
    edge_respond_writer(er, 200, &w, &out);
}

/* ---- GET /billing/plans ---- */

static void list_work_public(void *arg)
{
    plans_op_t *op = arg;
    PGconn *c = edge_pg(op->cfg, NULL, &op->rc);
    if (c == NULL)
        return;
    op->plans = bg_calloc(BG_PLANS_LIST_MAX, sizeof(*op->plans));
    op->rc = bg_plans_list(c, true, op->plans, BG_PLANS_LIST_MAX, &op->count);
}

static void list_done_public(edge_req_t *er, void *arg)
{
    plans_op_t *op = arg;
    if (!failed(er, op))
        respond_list(er, op, false);
}

static void billing_plans(edge_req_t *er)
{
    op_new(er);
    edge_run(er, list_work_public, list_done_public);
}

/* ---- GET /admin/plans ---- */

static void list_work_admin(void *arg)
{
    plans_op_t *op = arg;
    PGconn *c = edge_pg(op->cfg, op->admin_id, &op->rc);
    if (c == NULL)
        return;
    op->plans = bg_calloc(BG_PLANS_LIST_MAX, sizeof(*op->plans));
    op->rc = bg_plans_list(c, false, op->plans, BG_PLANS_LIST_MAX, &op->count);
}

static void list_done_admin(edge_req_t *er, void *arg)
{
    plans_op_t *op = arg;
    if (!failed(er, op))
        respond_list(er, op, true);
}

static void admin_plans_list(edge_req_t *er)
{
    op_new(er);
    edge_run(er, list_work_admin, list_done_admin);
}

/* ---- PUT /admin/plans/{id} ---- */

static void update_work(void *arg)
{
    plans_op_t *op = arg;
    PGconn *c = edge_pg(op->cfg, op->admin_id, &op->rc);
    if (c == NULL)
        return;
    bg_actor_t actor = actor_of(op);
    op->before = bg_calloc(2, sizeof(*op->before));
    op->after = op->before + 1;
    op->rc = bg_plans_update(c, op->id, &op->update, &actor, op->before, op->after, &op->verr);
    if (op->rc != 0 || !bg_plans_admission_changed(op->before, op->after))
        return;
    bg_redis_t *r = edge_pool_redis(op->cfg);
    if (r == NULL) {
        bg_warn("plan change %s: no Redis client to recompile with", op->request_id);
        op->recompile_failed = 1;
        return;
    }
    if (bg_plans_recompile(c, r, op->cfg->shards, op->id, &op->recompiled, &op->recompile_failed) !=
        0) {
        bg_warn("plan change %s: cannot list the users of plan %s", op->request_id, op->id);
        op->recompile_failed++;
    }
}

/* Answers 422 for the field bg_plans refused, with the parameters its message needs. */
static void invalid_plan_field(edge_req_t *er, const bg_plans_verr_t *e)
{
    const char *reason = e->reason != NULL ? e->reason : "invalid_value";
    if (strcmp(e->field, "name") == 0 && strcmp(reason, "too_long") == 0) {
        const char *params[] = {"max", "100", NULL};
        edge_invalid_field(er, e->field, reason, params);
    } else if (strcmp(e->field, "name") == 0 && strcmp(reason, "too_short") == 0) {
        const char *params[] = {"min", "1", NULL};
        edge_invalid_field(er, e->field, reason, params);
    } else if (strcmp(e->field, "price.amount") == 0) {
        const char *params[] = {"min", "0", "max", "100000000000", NULL};
        edge_invalid_field(er, e->field, "out_of_range", params);
    } else if (strcmp(e->field, "requests") == 0) {
        const char *params[] = {"min", "1", "max", "1000000000000", NULL};
        edge_invalid_field(er, e->field, "out_of_range", params);
    } else {
        edge_invalid_field(er, e->field, "invalid_value", NULL);
    }
}

static void update_done(edge_req_t *er, void *arg)
{
    plans_op_t *op = arg;
    if (er->req == NULL)
        return;
    if (op->rc == BG_ERR_INVALID) {
        invalid_plan_field(er, &op->verr);
        return;
    }
    if (op->rc == BG_ERR_CONFLICT) {
        edge_error(er, "conflict", "{\"field\":\"paddle_price_id\",\"reason\":\"taken\"}", NULL, 0);
        return;
    }
    if (failed(er, op))
        return;
    bg_buf_t out;
    bg_buf_init(&out, 1 << 16);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    write_admin(&w, op->after);
    bg_json_write_field_int(&w, "recompiled", op->recompiled);
    bg_json_write_field_int(&w, "recompile_failed", op->recompile_failed);
    bg_json_write_end_object(&w);
    edge_respond_writer(er, 200, &w, &out);
}

static const char *const update_known[] = {"name",     "price",           "requests", "period",
                                           "features", "paddle_price_id", "active"};

/* Copies the string of member key into *dst (owned); answers and returns false on a wrong type. */
static bool take_str(edge_req_t *er, const bg_json_t *root, const char *key, char **dst)
{
    const bg_json_t *v = bg_json_find(root, key);
    if (v == NULL || bg_json_type(v) == BG_JSON_NULL)
        return true;
    size_t len;
    const char *s = bg_json_str(v, &len);
    if (s == NULL || strlen(s) != len) {
        edge_invalid_field(er, key, "wrong_type", NULL);
        return false;
    }
    *dst = bg_strndup(s, len);
    return true;
}

/* Parses price {"amount","currency"?} into op; answers and returns false on error. */
static bool take_price(edge_req_t *er, const bg_json_t *root, plans_op_t *op)
{
    const bg_json_t *price = bg_json_find(root, "price");
    if (price == NULL || bg_json_type(price) == BG_JSON_NULL)
        return true;
    if (!bg_json_is_object(price)) {
        edge_invalid_field(er, "price", "wrong_type", NULL);
        return false;
    }
    for (size_t i = 0; i < bg_json_len(price); i++) {
        const char *key;
        (void)bg_json_member(price, i, &key);
        if (strcmp(key, "amount") != 0 && strcmp(key, "currency") != 0) {
            char field[96];
            snprintf(field, sizeof(field), "price.%.64s", key);
            edge_invalid_field(er, field, "unknown_field", NULL);
            return false;
        }
    }
    const bg_json_t *amount = bg_json_find(price, "amount");
    if (amount == NULL || bg_json_type(amount) == BG_JSON_NULL) {
        edge_invalid_field(er, "price.amount", "missing", NULL);
        return false;
    }
    if (!bg_json_int(amount, &op->update.price_minor)) {
        edge_invalid_field(er, "price.amount", "wrong_type", NULL);
        return false;
    }
    if (!take_str(er, price, "currency", &op->currency))
        return false;
    op->update.has_price = true;
    op->update.currency = op->currency;
    return true;
}

static bool take_features(edge_req_t *er, const bg_json_t *root, plans_op_t *op)
{
    const bg_json_t *f = bg_json_find(root, "features");
    if (f == NULL || bg_json_type(f) == BG_JSON_NULL)
        return true;
    if (!bg_json_is_array(f)) {
        edge_invalid_field(er, "features", "wrong_type", NULL);
        return false;
    }
    size_t n = bg_json_len(f);
    if (n > BG_PLANS_FEATURES_MAX) {
        edge_invalid_field(er, "features", "invalid_value", NULL);
        return false;
    }
    op->features = bg_calloc(n > 0 ? n : 1, sizeof(*op->features));
    for (size_t i = 0; i < n; i++) {
        size_t len;
        const char *s = bg_json_str(bg_json_at(f, i), &len);
        if (s == NULL || strlen(s) != len) {
            char field[32];
            snprintf(field, sizeof(field), "features[%zu]", i);
            edge_invalid_field(er, field, "wrong_type", NULL);
            return false;
        }
        op->features[i] = bg_strndup(s, len);
        op->update.nfeatures = i + 1;
    }
    op->update.has_features = true;
    op->update.features = (const char *const *)op->features;
    return true;
}

/* Parses and checks the body of PUT /admin/plans/{id}; answers and returns false on error. */
static bool take_update(edge_req_t *er, plans_op_t *op)
{
    h2o_req_t *req = er->req;
    bg_json_doc_t *doc = NULL;
    const char *desc;
    size_t off = 0;
    const char *text = req->entity.base != NULL ? req->entity.base : "";
    size_t tlen = req->entity.len;
    if (tlen == 0) {
        text = "{}";
        tlen = 2;
    }
    if (bg_json_parse(text, tlen, NULL, &doc, &desc, &off) != 0) {
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
    for (size_t i = 0; i < bg_json_len(root); i++) {
        const char *key;
        (void)bg_json_member(root, i, &key);
        bool ok = false;
        for (size_t k = 0; k < BG_ARRAY_SIZE(update_known) && !ok; k++)
            ok = strcmp(key, update_known[k]) == 0;
        if (!ok) {
            edge_invalid_field(er, key, "unknown_field", NULL);
            return false;
        }
    }
    if (!take_str(er, root, "name", &op->name) || !take_price(er, root, op))
        return false;
    const bg_json_t *requests = bg_json_find(root, "requests");
    if (requests != NULL && bg_json_type(requests) != BG_JSON_NULL) {
        if (!bg_json_int(requests, &op->update.requests)) {
            edge_invalid_field(er, "requests", "wrong_type", NULL);
            return false;
        }
        op->update.has_requests = true;
    }
    if (!take_str(er, root, "period", &op->period) || !take_features(er, root, op))
        return false;
    /* null is an absent field (the API's rule); "" removes the price id */
    if (!take_str(er, root, "paddle_price_id", &op->paddle_price_id))
        return false;
    if (op->paddle_price_id != NULL) {
        op->update.has_paddle_price_id = true;
        op->update.paddle_price_id = op->paddle_price_id[0] != '\0' ? op->paddle_price_id : NULL;
    }
    const bg_json_t *active = bg_json_find(root, "active");
    if (active != NULL && bg_json_type(active) != BG_JSON_NULL) {
        if (!bg_json_bool(active, &op->update.active)) {
            edge_invalid_field(er, "active", "wrong_type", NULL);
            return false;
        }
        op->update.has_active = true;
    }
    op->update.name = op->name;
    op->update.period = op->period;
    bg_plans_verr_t e = {{0}, NULL};
    if (bg_plans_update_validate(&op->update, &e) != 0) {
        invalid_plan_field(er, &e);
        return false;
    }
    return true;
}

static void admin_plans_update(edge_req_t *er)
{
    plans_op_t *op = op_new(er);
    if (take_update(er, op))
        edge_run(er, update_work, update_done);
}

/* ---- POST /admin/users/{id}/plan ---- */

static void grant_work(void *arg)
{
    plans_op_t *op = arg;
    PGconn *c = edge_pg(op->cfg, op->admin_id, &op->rc);
    if (c == NULL)
        return;
    bg_actor_t actor = actor_of(op);
    bg_plan_grant_t g = {
        .user_id = op->id, .plan_id = op->plan_id, .days = op->days, .subscription_id = op->sub_id};
    op->rc = bg_plans_grant(c, &g, &actor, &op->grant);
    if (op->rc != 0)
        return;
    /* the grant is durable; the new plan counts from the next request once Redis has it */
    int rc = bg_policy_compile_user(c, op->grant.user_id, bg_timeutil_wall_ms(), &op->state);
    bg_redis_t *r = rc == 0 ? edge_pool_redis(op->cfg) : NULL;
    if (r != NULL)
        rc = bg_policy_state_write(r, op->cfg->shards, &op->state);
    op->state_written = r != NULL && rc == 0;
    if (!op->state_written)
        bg_warn("plan grant %s: the grant is recorded but user %s's admission state was not "
                "written (%s); run bgctl quota rebuild --user %s",
                op->request_id, op->grant.user_id, r == NULL ? "no Redis client" : bg_strerror(rc),
                op->grant.user_id);
}

static void grant_done(edge_req_t *er, void *arg)
{
    plans_op_t *op = arg;
    if (er->req == NULL)
        return;
    if (op->rc == BG_ERR_NOT_FOUND && op->grant.what != NULL &&
        strcmp(op->grant.what, "plan") == 0) {
        edge_invalid_field(er, "plan", "invalid_value", NULL);
        return;
    }
    if (op->rc == BG_ERR_CONFLICT) {
        edge_error(er, "conflict", "{\"field\":\"id\",\"reason\":\"subscription_of_another_user\"}",
                   NULL, 0);
        return;
    }
    if (failed(er, op))
        return;
    const bg_plan_grant_result_t *g = &op->grant;
    char from[BG_RFC3339_BUFSIZE], to[BG_RFC3339_BUFSIZE];
    if (bg_timeutil_format_rfc3339(from, sizeof(from), g->period_start_ms, false) != 0)
        from[0] = '\0';
    if (bg_timeutil_format_rfc3339(to, sizeof(to), g->period_end_ms, false) != 0)
        to[0] = '\0';
    bg_buf_t out;
    bg_buf_init(&out, 1 << 16);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    bg_json_write_begin_object(&w);
    bg_json_write_field_str(&w, "subscription_id", g->subscription_id);
    bg_json_write_field_str(&w, "user_id", g->user_id);
    bg_json_write_field_str(&w, "plan", op->plan_id);
    bg_json_write_field_int(&w, "days", op->days);
    bg_json_write_field_str(&w, "status", "active");
    bg_json_write_key(&w, "period");
    bg_json_write_begin_object(&w);
    bg_json_write_field_str(&w, "start", from);
    bg_json_write_field_str(&w, "end", to);
    bg_json_write_end_object(&w);
    bg_json_write_field_int(&w, "requests", g->requests);
    bg_json_write_field_str(&w, "ledger_transaction_id", g->ledger_transaction_id);
    if (g->replaced_id[0] != '\0')
        bg_json_write_field_str(&w, "replaced_subscription_id", g->replaced_id);
    else
        bg_json_write_field_null(&w, "replaced_subscription_id");
    bg_json_write_field_bool(&w, "replaced_paddle", g->replaced_paddle);
    bg_json_write_field_bool(&w, "created", g->created);
    bg_json_write_key(&w, "admission");
    if (op->state_written) {
        bg_json_write_begin_object(&w);
        bg_json_write_field_str(&w, "status", op->state.status);
        bg_json_write_field_str(&w, "plan", op->state.plan);
        bg_json_write_field_int(&w, "limit", op->state.limits.q_limit);
        bg_json_write_end_object(&w);
    } else {
        bg_json_write_null(&w);
    }
    bg_json_write_end_object(&w);
    edge_respond_writer(er, g->created ? 201 : 200, &w, &out);
}

static const edge_field_t grant_fields[] = {
    {"plan", EDGE_F_STR, true, 1, 32, EDGE_CHECK_NONE},
    {"days", EDGE_F_INT, true, 0, 0, EDGE_CHECK_NONE},
    {"id", EDGE_F_STR, false, 36, 36, EDGE_CHECK_UUID},
};

static void admin_user_plan(edge_req_t *er)
{
    edge_values_t v;
    if (!edge_body(er, grant_fields, BG_ARRAY_SIZE(grant_fields), &v))
        return;
    if (v.num[1] < 1 || v.num[1] > BG_PLANS_GRANT_DAYS_MAX) {
        const char *params[] = {"min", "1", "max", "3660", NULL};
        edge_invalid_field(er, "days", "out_of_range", params);
        return;
    }
    plans_op_t *op = op_new(er);
    if (!bg_id_uuid_is_valid(op->id)) {
        edge_error(er, "not_found", NULL, NULL, 0);
        return;
    }
    op->plan_id = bg_strdup(v.str[0]);
    op->days = (int)v.num[1];
    op->sub_id = v.present[2] ? bg_strdup(v.str[2]) : NULL;
    edge_run(er, grant_work, grant_done);
}

const edge_route_t edge_routes_plans[] = {
    {"GET", "/billing/plans", "billing_plans", billing_plans, 0, 0, EDGE_PUBLIC},
    {"GET", "/admin/plans", "admin_plans", admin_plans_list, 0, 0, EDGE_ADMIN},
    {"PUT", "/admin/plans/{id}", "admin_plan", admin_plans_update, EDGE_ROUTE_JSON, 16384,
     EDGE_ADMIN},
    {"POST", "/admin/users/{id}/plan", "admin_user_plan", admin_user_plan, EDGE_ROUTE_JSON, 4096,
     EDGE_ADMIN},
    {NULL, NULL, NULL, NULL, 0, 0, EDGE_PUBLIC},
};
