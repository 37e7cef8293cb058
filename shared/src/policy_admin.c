/*
 * The rows behind /admin/policies (see bg/policy_admin.h). Every write runs in one transaction with
 * its audit row, so the log never mentions a change that did not happen. Rows are read back with
 * one column list (ROW_COLS) so every function fills a bg_policy_row_t the same way.
 */
#include <stdlib.h>
#include <string.h>

#include "bg/err.h"
#include "bg/id.h"
#include "bg/json.h"
#include "bg/pg.h"
#include "bg/policy_admin.h"

#define ROW_COLS                                                                                   \
    "id::text, type, scope, coalesce(scope_id, ''), name, body::text, priority, enabled, "         \
    "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), "                   \
    "to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"

void bg_policy_row_dispose(bg_policy_row_t *row)
{
    if (row == NULL)
        return;
    free(row->body);
    row->body = NULL;
}

static void copy(char *out, size_t outlen, const PGresult *res, int row, int col)
{
    const char *v = bg_pg_value(res, row, col);
    bg_strlcpy(out, v != NULL ? v : "", outlen);
}

static void take_row(const PGresult *res, int i, bg_policy_row_t *out)
{
    memset(out, 0, sizeof(*out));
    copy(out->id, sizeof(out->id), res, i, 0);
    copy(out->type, sizeof(out->type), res, i, 1);
    copy(out->scope, sizeof(out->scope), res, i, 2);
    copy(out->scope_id, sizeof(out->scope_id), res, i, 3);
    copy(out->name, sizeof(out->name), res, i, 4);
    const char *body = bg_pg_value(res, i, 5);
    out->body = bg_strdup(body != NULL ? body : "{}");
    int64_t prio = 0;
    if (bg_pg_int64(res, i, 6, &prio) == 0)
        out->priority = (int32_t)prio;
    const char *en = bg_pg_value(res, i, 7);
    out->enabled = en != NULL && en[0] == 't';
    copy(out->created_at, sizeof(out->created_at), res, i, 8);
    copy(out->updated_at, sizeof(out->updated_at), res, i, 9);
}

/* Runs a statement returning at most one row of ROW_COLS into out; BG_ERR_NOT_FOUND for none. */
static int one_row(PGconn *c, const char *sql, int n, const char *const *p, bg_policy_row_t *out)
{
    PGresult *res;
    int rc = bg_pg_exec(c, sql, n, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) == 0) {
        PQclear(res);
        return BG_ERR_NOT_FOUND;
    }
    if (out != NULL)
        take_row(res, 0, out);
    PQclear(res);
    return 0;
}

int bg_policy_admin_scope_exists(PGconn *c, const bg_policy_input_t *in, bg_policy_verr_t *err)
{
    const char *sql;
    if (strcmp(in->scope, "plan") == 0)
        sql = "SELECT 1 FROM plans WHERE id = $1";
    else if (strcmp(in->scope, "user") == 0)
        sql = "SELECT 1 FROM users WHERE id = $1::uuid AND deleted_at IS NULL";
    else if (strcmp(in->scope, "organization") == 0)
        sql = "SELECT 1 FROM organizations WHERE id = $1::uuid";
    else
        return 0;
    bool shaped = in->scope_id != NULL &&
                  (strcmp(in->scope, "plan") == 0 || bg_id_uuid_is_valid(in->scope_id));
    bool found = false;
    if (shaped) {
        PGresult *res;
        const char *p[] = {in->scope_id};
        int rc = bg_pg_exec(c, sql, 1, p, &res);
        if (rc != 0)
            return rc;
        found = PQntuples(res) > 0;
        PQclear(res);
    }
    if (found)
        return 0;
    bg_strlcpy(err->field, "scope_id", sizeof(err->field));
    err->reason = "names nothing that exists";
    return BG_ERR_INVALID;
}

int bg_policy_admin_list(PGconn *c, const char *type, const char *scope, bg_policy_row_t *out,
                         size_t max, size_t *count)
{
    *count = 0;
    char lim[24];
    snprintf(lim, sizeof(lim), "%zu", max);
    const char *p[] = {type, scope, lim};
    PGresult *res;
    int rc =
        bg_pg_exec(c,
                   "SELECT " ROW_COLS " FROM policy_rules "
                   "WHERE ($1::text IS NULL OR type = $1) AND ($2::text IS NULL OR scope = $2) "
                   "ORDER BY created_at DESC, id DESC LIMIT $3::int",
                   3, p, &res);
    if (rc != 0)
        return rc;
    int n = PQntuples(res);
    for (int i = 0; i < n && (size_t)i < max; i++)
        take_row(res, i, &out[(*count)++]);
    PQclear(res);
    return 0;
}

int bg_policy_admin_get(PGconn *c, const char *id, bg_policy_row_t *out)
{
    if (!bg_id_uuid_is_valid(id))
        return BG_ERR_NOT_FOUND;
    const char *p[] = {id};
    return one_row(c, "SELECT " ROW_COLS " FROM policy_rules WHERE id = $1::uuid", 1, p, out);
}

/* The audit details of a change: the rule's scope (and, for an update, the one it had). */
static int audit_change(PGconn *c, const bg_actor_t *actor, const char *action,
                        const bg_policy_row_t *before, const bg_policy_row_t *after)
{
    bg_buf_t buf;
    bg_buf_init(&buf, 65536);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &buf);
    bg_json_write_begin_object(&w);
    const bg_policy_row_t *rows[] = {before, after};
    const char *keys[] = {"before", "after"};
    for (size_t i = 0; i < 2; i++) {
        if (rows[i] == NULL)
            continue;
        bg_json_write_key(&w, keys[i]);
        bg_json_write_begin_object(&w);
        bg_json_write_field_str(&w, "type", rows[i]->type);
        bg_json_write_field_str(&w, "scope", rows[i]->scope);
        bg_json_write_field_str(&w, "scope_id", rows[i]->scope_id);
        bg_json_write_field_int(&w, "priority", rows[i]->priority);
        bg_json_write_field_bool(&w, "enabled", rows[i]->enabled);
        bg_json_write_end_object(&w);
    }
    bg_json_write_end_object(&w);
    int rc = bg_json_write_finish(&w);
    const bg_policy_row_t *row = after != NULL ? after : before;
    if (rc == 0)
        rc = bg_acct_audit(c, actor, action, "policy_rule", row->id, buf.base);
    bg_buf_dispose(&buf);
    return rc;
}

int bg_policy_admin_create(PGconn *c, const bg_policy_input_t *in, const bg_actor_t *actor,
                           bg_policy_row_t *out)
{
    char prio[16];
    snprintf(prio, sizeof(prio), "%d", (int)in->priority);
    const char *by = actor != NULL && bg_id_uuid_is_valid(actor->id) ? actor->id : NULL;
    const char *p[] = {in->type,
                       in->scope,
                       in->scope_id,
                       in->name != NULL ? in->name : "",
                       in->body,
                       prio,
                       in->enabled ? "true" : "false",
                       by};
    int rc = bg_pg_begin(c);
    if (rc != 0)
        return rc;
    rc = one_row(c,
                 "INSERT INTO policy_rules (type, scope, scope_id, name, body, priority, enabled, "
                 "created_by) VALUES ($1, $2, $3, $4, $5::jsonb, $6::int, $7::boolean, $8::uuid) "
                 "RETURNING " ROW_COLS,
                 8, p, out);
    if (rc == 0) {
        rc = audit_change(c, actor, "policy.create", NULL, out);
        if (rc != 0)
            bg_policy_row_dispose(out);
    }
    if (rc == 0 && (rc = bg_pg_commit(c)) != 0)
        bg_policy_row_dispose(out);
    if (rc != 0)
        bg_pg_rollback(c);
    return rc;
}

int bg_policy_admin_update(PGconn *c, const char *id, const bg_policy_input_t *in,
                           const bg_actor_t *actor, bg_policy_row_t *before, bg_policy_row_t *out)
{
    if (!bg_id_uuid_is_valid(id))
        return BG_ERR_NOT_FOUND;
    bg_policy_row_t old;
    char prio[16];
    snprintf(prio, sizeof(prio), "%d", (int)in->priority);
    const char *pid[] = {id};
    const char *p[] = {id,
                       in->type,
                       in->scope,
                       in->scope_id,
                       in->name != NULL ? in->name : "",
                       in->body,
                       prio,
                       in->enabled ? "true" : "false"};
    int rc = bg_pg_begin(c);
    if (rc != 0)
        return rc;
    rc = one_row(c, "SELECT " ROW_COLS " FROM policy_rules WHERE id = $1::uuid FOR UPDATE", 1, pid,
                 &old);
    if (rc != 0)
        goto err_rollback;
    rc = one_row(c,
                 "UPDATE policy_rules SET type = $2, scope = $3, scope_id = $4, name = $5, "
                 "body = $6::jsonb, priority = $7::int, enabled = $8::boolean "
                 "WHERE id = $1::uuid RETURNING " ROW_COLS,
                 8, p, out);
    if (rc != 0)
        goto err_old;
    rc = audit_change(c, actor, "policy.update", &old, out);
    if (rc == 0)
        rc = bg_pg_commit(c);
    if (rc != 0) {
        bg_policy_row_dispose(out);
        goto err_old;
    }
    if (before != NULL)
        *before = old;
    else
        bg_policy_row_dispose(&old);
    return 0;

err_old:
    bg_policy_row_dispose(&old);
err_rollback:
    bg_pg_rollback(c);
    return rc;
}

int bg_policy_admin_delete(PGconn *c, const char *id, const bg_actor_t *actor,
                           bg_policy_row_t *before)
{
    if (!bg_id_uuid_is_valid(id))
        return BG_ERR_NOT_FOUND;
    bg_policy_row_t old;
    const char *p[] = {id};
    int rc = bg_pg_begin(c);
    if (rc != 0)
        return rc;
    rc = one_row(c, "DELETE FROM policy_rules WHERE id = $1::uuid RETURNING " ROW_COLS, 1, p, &old);
    if (rc != 0)
        goto err_rollback;
    rc = audit_change(c, actor, "policy.delete", &old, NULL);
    if (rc == 0)
        rc = bg_pg_commit(c);
    if (rc != 0) {
        bg_policy_row_dispose(&old);
        goto err_rollback;
    }
    if (before != NULL)
        *before = old;
    else
        bg_policy_row_dispose(&old);
    return 0;

err_rollback:
    bg_pg_rollback(c);
    return rc;
}

int bg_policy_admin_affected(PGconn *c, const char *scope, const char *scope_id,
                             const char *after_id, char (*ids)[BG_POLICY_ID_SIZE], size_t max,
                             size_t *count)
{
    *count = 0;
    const char *sql;
    if (strcmp(scope, "user") == 0) {
        if (!bg_id_uuid_is_valid(scope_id))
            return 0;
        sql = "SELECT id::text FROM users WHERE id = $1::uuid AND deleted_at IS NULL "
              "AND id::text > $2 ORDER BY 1 LIMIT $3::int";
    } else if (strcmp(scope, "organization") == 0) {
        if (!bg_id_uuid_is_valid(scope_id))
            return 0;
        sql = "SELECT user_id::text FROM memberships WHERE organization_id = $1::uuid "
              "AND user_id::text > $2 ORDER BY 1 LIMIT $3::int";
    } else if (strcmp(scope, "plan") == 0) {
        sql = "SELECT DISTINCT user_id::text FROM subscriptions WHERE plan_id = $1 "
              "AND status <> 'canceled' AND user_id::text > $2 ORDER BY 1 LIMIT $3::int";
    } else {
        scope_id = NULL;
        sql = "SELECT DISTINCT user_id::text FROM subscriptions WHERE ($1::text IS NULL) "
              "AND status <> 'canceled' AND user_id::text > $2 ORDER BY 1 LIMIT $3::int";
    }
    char lim[24];
    snprintf(lim, sizeof(lim), "%zu", max);
    const char *p[] = {scope_id, after_id != NULL ? after_id : "", lim};
    PGresult *res;
    int rc = bg_pg_exec(c, sql, 3, p, &res);
    if (rc != 0)
        return rc;
    int n = PQntuples(res);
    for (int i = 0; i < n && (size_t)i < max; i++)
        copy(ids[(*count)++], BG_POLICY_ID_SIZE, res, i, 0);
    PQclear(res);
    return 0;
}
