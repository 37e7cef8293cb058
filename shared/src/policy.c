/*
 * The policy engine (see bg/policy.h for the rules it implements).
 *
 * Design. Rules are validated once, when they are parsed (admin API writes and loads from
 * Postgres go through the same bg_policy_rule_parse), into a flat struct; evaluation is then plain
 * comparisons over an array, with no JSON and no allocation. A set holds rules for any subjects and
 * filters by scope at evaluation time, so a process may keep one set of every enabled rule and
 * reload it on NOTIFY bg_policy_rules, or load just one user's rules as the compiler does.
 *
 * The compiler reads Postgres (subscription and plan, organizations, rules) and produces the
 * admission hash; the calendar arithmetic of windows (months differ in length) is done by Postgres
 * on intervals, so a grant of several months of the monthly plan gets calendar months like a Paddle
 * subscription does. Redis gets the state with DEL + HSET inside MULTI/EXEC (blocking client) or
 * one complete HSET (async client).
 */
#include "bg/policy.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "bg/err.h"
#include "bg/id.h"
#include "bg/log.h"
#include "bg/pg.h"

#define DAY_MS INT64_C(86400000)

/* ---- names ---- */

static const char *const type_names[] = {"rate_limit", "quota", "resource_access", "feature_flag"};
static const char *const scope_names[] = {"global", "plan", "organization", "user"};

int bg_policy_type_parse(const char *s, bg_policy_type_t *out)
{
    for (size_t i = 0; s != NULL && i < BG_ARRAY_SIZE(type_names); i++) {
        if (strcmp(s, type_names[i]) == 0) {
            *out = (bg_policy_type_t)i;
            return 0;
        }
    }
    return BG_ERR_INVALID;
}

int bg_policy_scope_parse(const char *s, bg_policy_scope_t *out)
{
    for (size_t i = 0; s != NULL && i < BG_ARRAY_SIZE(scope_names); i++) {
        if (strcmp(s, scope_names[i]) == 0) {
            *out = (bg_policy_scope_t)i;
            return 0;
        }
    }
    return BG_ERR_INVALID;
}

const char *bg_policy_type_name(bg_policy_type_t type)
{
    return (size_t)type < BG_ARRAY_SIZE(type_names) ? type_names[type] : "unknown";
}

const char *bg_policy_scope_name(bg_policy_scope_t scope)
{
    return (size_t)scope < BG_ARRAY_SIZE(scope_names) ? scope_names[scope] : "unknown";
}

/* ---- validation ---- */

void bg_policy_rule_dispose(bg_policy_rule_t *rule)
{
    if (rule == NULL)
        return;
    free(rule->agents);
    free(rule->models);
    rule->agents = NULL;
    rule->models = NULL;
}

static int verr(bg_policy_verr_t *err, const char *field, const char *reason)
{
    if (err != NULL) {
        (void)bg_strlcpy(err->field, field, sizeof(err->field));
        err->reason = reason;
    }
    return BG_ERR_INVALID;
}

/*
 * Reads integer member key of body into *out, within [lo, hi]. An absent (or null) optional member
 * leaves *out at -1. Returns 0 or BG_ERR_INVALID with *err set.
 */
static int get_bounded(const bg_json_t *body, const char *key, bool required, int64_t lo,
                       int64_t hi, const char *reason, int64_t *out, bg_policy_verr_t *err)
{
    int64_t v;
    int rc = bg_json_get_int(body, key, &v);
    if (rc == BG_ERR_NOT_FOUND) {
        if (required)
            return verr(err, key, "is required");
        *out = -1;
        return 0;
    }
    if (rc != 0 || v < lo || v > hi)
        return verr(err, key, reason);
    *out = v;
    return 0;
}

/* A flag name: [a-z][a-z0-9_.-]{0,63}. */
static bool flag_name_ok(const char *s, size_t len)
{
    if (len == 0 || len >= BG_POLICY_FLAG_SIZE || s[0] < 'a' || s[0] > 'z')
        return false;
    for (size_t i = 1; i < len; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '-'))
            return false;
    }
    return true;
}

/* An agent or model name: 1..64 bytes of [A-Za-z0-9._:/@-], or "*". No comma: lists are joined. */
static bool resource_name_ok(const char *s, size_t len)
{
    if (len == 1 && s[0] == '*')
        return true;
    if (len == 0 || len > BG_POLICY_NAME_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              strchr("._:/@-", c) != NULL))
            return false;
    }
    return true;
}

/*
 * Reads the list member key ("agents" or "models") into *out as ",a,b," (owned), or leaves it NULL
 * when absent. Returns 0 or BG_ERR_INVALID with *err naming the member or the bad item.
 */
static int get_list(const bg_json_t *body, const char *key, char **out, bg_policy_verr_t *err)
{
    const bg_json_t *arr;
    int rc = bg_json_get_array(body, key, &arr);
    if (rc == BG_ERR_NOT_FOUND)
        return 0;
    if (rc != 0)
        return verr(err, key, "must be an array of names");
    size_t n = bg_json_len(arr);
    if (n == 0)
        return verr(err, key, "must list at least one name");
    if (n > BG_POLICY_LIST_MAX)
        return verr(err, key, "lists more than 64 names");
    char *list = bg_malloc(n * (BG_POLICY_NAME_MAX + 1) + 2);
    size_t pos = 0;
    list[pos++] = ',';
    for (size_t i = 0; i < n; i++) {
        size_t len;
        const char *s = bg_json_str(bg_json_at(arr, i), &len);
        if (s == NULL || !resource_name_ok(s, len)) {
            free(list);
            char field[48];
            snprintf(field, sizeof(field), "%s[%zu]", key, i);
            return verr(
                err, field,
                "must be \"*\" or a name of 1 to 64 characters from A-Z a-z 0-9 . _ : / @ -");
        }
        memcpy(list + pos, s, len);
        pos += len;
        list[pos++] = ',';
    }
    list[pos] = '\0';
    *out = list;
    return 0;
}

static int validate_rate_limit(const bg_json_t *body, bg_policy_rule_t *r, bg_policy_verr_t *err)
{
    static const char *const allowed[] = {"rpm", "burst", NULL};
    const char *unknown;
    if (bg_json_check_fields(body, allowed, &unknown) != 0)
        return verr(err, unknown, "is not a field of a rate_limit rule");
    int rc = get_bounded(body, "rpm", true, 1, 100000, "must be an integer from 1 to 100000",
                         &r->rpm, err);
    if (rc == 0)
        rc = get_bounded(body, "burst", true, 1, 10000, "must be an integer from 1 to 10000",
                         &r->burst, err);
    return rc;
}

static int validate_quota(const bg_json_t *body, bg_policy_rule_t *r, bg_policy_verr_t *err)
{
    static const char *const allowed[] = {"requests", "tokens", "max_tokens_per_request",
                                          "concurrency", NULL};
    const char *unknown;
    if (bg_json_check_fields(body, allowed, &unknown) != 0)
        return verr(err, unknown, "is not a field of a quota rule");
    int rc = get_bounded(body, "requests", true, 0, INT64_C(1000000000000),
                         "must be an integer from 0 to 10^12", &r->requests, err);
    if (rc == 0)
        rc = get_bounded(body, "tokens", false, 0, INT64_C(1000000000000000),
                         "must be an integer from 0 (no limit) to 10^15", &r->tokens, err);
    if (rc == 0)
        rc = get_bounded(body, "max_tokens_per_request", false, 0, 10000000,
                         "must be an integer from 0 (no cap) to 10000000",
                         &r->max_tokens_per_request, err);
    if (rc == 0)
        rc = get_bounded(body, "concurrency", false, 0, 10000,
                         "must be an integer from 0 (unlimited) to 10000", &r->concurrency, err);
    return rc;
}

static int validate_resource_access(const bg_json_t *body, bg_policy_rule_t *r,
                                    bg_policy_verr_t *err)
{
    static const char *const allowed[] = {"agents", "models", "effect", NULL};
    const char *unknown;
    if (bg_json_check_fields(body, allowed, &unknown) != 0)
        return verr(err, unknown, "is not a field of a resource_access rule");
    const char *effect;
    int rc = bg_json_get_str(body, "effect", &effect);
    if (rc == BG_ERR_NOT_FOUND)
        return verr(err, "effect", "is required");
    if (rc != 0 || (strcmp(effect, "allow") != 0 && strcmp(effect, "deny") != 0))
        return verr(err, "effect", "must be \"allow\" or \"deny\"");
    char *agents = NULL;
    char *models = NULL;
    rc = get_list(body, "agents", &agents, err);
    if (rc == 0)
        rc = get_list(body, "models", &models, err);
    if (rc == 0 && agents == NULL && models == NULL)
        rc = verr(err, "agents", "a resource_access rule lists agents, models or both");
    if (rc != 0) {
        free(agents);
        free(models);
        return rc;
    }
    r->deny = strcmp(effect, "deny") == 0;
    r->agents = agents;
    r->models = models;
    return 0;
}

static int validate_feature_flag(const bg_json_t *body, bg_policy_rule_t *r, bg_policy_verr_t *err)
{
    static const char *const allowed[] = {"flag", "enabled", "percentage", NULL};
    const char *unknown;
    if (bg_json_check_fields(body, allowed, &unknown) != 0)
        return verr(err, unknown, "is not a field of a feature_flag rule");
    const char *flag;
    size_t len;
    int rc = bg_json_get_strn(body, "flag", &flag, &len);
    if (rc == BG_ERR_NOT_FOUND)
        return verr(err, "flag", "is required");
    if (rc != 0 || !flag_name_ok(flag, len))
        return verr(err, "flag",
                    "must be a name of 1 to 64 characters from a-z 0-9 _ . - "
                    "starting with a letter");
    bool enabled;
    rc = bg_json_get_bool(body, "enabled", &enabled);
    if (rc == BG_ERR_NOT_FOUND)
        return verr(err, "enabled", "is required");
    if (rc != 0)
        return verr(err, "enabled", "must be true or false");
    int64_t pct;
    rc = get_bounded(body, "percentage", false, 0, 100, "must be an integer from 0 to 100", &pct,
                     err);
    if (rc != 0)
        return rc;
    memcpy(r->flag, flag, len);
    r->flag[len] = '\0';
    r->enabled = enabled;
    r->percentage = pct < 0 ? 100 : (int)pct;
    return 0;
}

int bg_policy_body_validate(bg_policy_type_t type, const bg_json_t *body, bg_policy_rule_t *out,
                            bg_policy_verr_t *err)
{
    if (!bg_json_is_object(body))
        return verr(err, "body", "must be a JSON object");
    bg_policy_rule_t scratch;
    memset(&scratch, 0, sizeof(scratch));
    bg_policy_rule_t *r = out != NULL ? out : &scratch;
    r->type = type;
    int rc;
    switch (type) {
    case BG_POLICY_RATE_LIMIT:
        rc = validate_rate_limit(body, r, err);
        break;
    case BG_POLICY_QUOTA:
        rc = validate_quota(body, r, err);
        break;
    case BG_POLICY_RESOURCE_ACCESS:
        rc = validate_resource_access(body, r, err);
        break;
    case BG_POLICY_FEATURE_FLAG:
        rc = validate_feature_flag(body, r, err);
        break;
    default:
        rc = verr(err, "type", "must be rate_limit, quota, resource_access or feature_flag");
        break;
    }
    bg_policy_rule_dispose(&scratch);
    return rc;
}

static bool plan_id_ok(const char *s)
{
    size_t len = strlen(s);
    if (len == 0 || len >= BG_POLICY_PLAN_SIZE || s[0] < 'a' || s[0] > 'z')
        return false;
    for (size_t i = 1; i < len; i++) {
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= '0' && s[i] <= '9') || s[i] == '_'))
            return false;
    }
    return true;
}

int bg_policy_scope_validate(bg_policy_scope_t scope, const char *scope_id, bg_policy_rule_t *out,
                             bg_policy_verr_t *err)
{
    bool present = bg_str_present(scope_id);
    switch (scope) {
    case BG_POLICY_GLOBAL:
        if (present)
            return verr(err, "scope_id", "must be absent for a global rule");
        break;
    case BG_POLICY_PLAN:
        if (!present || !plan_id_ok(scope_id))
            return verr(err, "scope_id", "must be a plan id");
        break;
    case BG_POLICY_ORGANIZATION:
    case BG_POLICY_USER:
        if (!present || !bg_id_uuid_is_valid(scope_id))
            return verr(err, "scope_id", "must be a uuid");
        break;
    default:
        return verr(err, "scope", "must be global, plan, organization or user");
    }
    if (out != NULL) {
        out->scope = scope;
        out->scope_id[0] = '\0';
        if (present) {
            size_t i = 0;
            for (; scope_id[i] != '\0' && i + 1 < sizeof(out->scope_id); i++) {
                char c = scope_id[i];
                out->scope_id[i] = (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
            }
            out->scope_id[i] = '\0';
        }
    }
    return 0;
}

int bg_policy_scope_check(PGconn *c, bg_policy_scope_t scope, const char *scope_id,
                          bg_policy_verr_t *err)
{
    int rc = bg_policy_scope_validate(scope, scope_id, NULL, err);
    if (rc != 0 || scope != BG_POLICY_PLAN)
        return rc;
    PGresult *res;
    const char *p[] = {scope_id};
    rc = bg_pg_exec(c, "SELECT 1 FROM plans WHERE id = $1", 1, p, &res);
    if (rc != 0)
        return rc;
    bool found = PQntuples(res) > 0;
    PQclear(res);
    return found ? 0 : verr(err, "scope_id", "names no plan");
}

int bg_policy_rule_parse(const char *type, const char *scope, const char *scope_id,
                         const char *body, size_t len, bg_policy_rule_t *out, bg_policy_verr_t *err)
{
    memset(out, 0, sizeof(*out));
    bg_policy_type_t t;
    bg_policy_scope_t s;
    if (bg_policy_type_parse(type, &t) != 0)
        return verr(err, "type", "must be rate_limit, quota, resource_access or feature_flag");
    if (bg_policy_scope_parse(scope, &s) != 0)
        return verr(err, "scope", "must be global, plan, organization or user");
    int rc = bg_policy_scope_validate(s, scope_id, out, err);
    if (rc != 0)
        return rc;
    if (body == NULL || len > BG_POLICY_BODY_MAX)
        return verr(err, "body", "must be a JSON object of at most 16384 bytes");
    static const bg_json_limits_t limits = {.max_bytes = BG_POLICY_BODY_MAX,
                                            .max_depth = 3,
                                            .max_string = 256,
                                            .max_members = BG_POLICY_LIST_MAX,
                                            .max_values = 256};
    bg_json_doc_t *doc;
    const char *desc;
    rc = bg_json_parse(body, len, &limits, &doc, &desc, NULL);
    if (rc != 0)
        return verr(err, "body", "must be a JSON object within the limits of a rule");
    rc = bg_policy_body_validate(t, bg_json_root(doc), out, err);
    bg_json_doc_free(doc);
    if (rc != 0)
        bg_policy_rule_dispose(out);
    return rc;
}

int bg_policy_rule_cmp(const bg_policy_rule_t *a, const bg_policy_rule_t *b)
{
    if (a->scope != b->scope)
        return a->scope > b->scope ? 1 : -1;
    if (a->priority != b->priority)
        return a->priority > b->priority ? 1 : -1;
    if (a->created_ms != b->created_ms)
        return a->created_ms > b->created_ms ? 1 : -1;
    int c = strcmp(a->id, b->id);
    return c > 0 ? 1 : (c < 0 ? -1 : 0);
}

bool bg_policy_rule_applies(const bg_policy_rule_t *rule, const bg_policy_subject_t *subj)
{
    switch (rule->scope) {
    case BG_POLICY_GLOBAL:
        return true;
    case BG_POLICY_PLAN:
        return bg_str_present(subj->plan_id) && strcmp(subj->plan_id, rule->scope_id) == 0;
    case BG_POLICY_ORGANIZATION:
        for (size_t i = 0; i < subj->norgs; i++) {
            if (subj->org_ids[i] != NULL && strcasecmp(subj->org_ids[i], rule->scope_id) == 0)
                return true;
        }
        return false;
    case BG_POLICY_USER:
        return subj->user_id != NULL && strcasecmp(subj->user_id, rule->scope_id) == 0;
    }
    return false;
}

/* ---- sets ---- */

struct bg_policy_set {
    bg_policy_rule_t *rules; /* owned, with what each owns */
    size_t n, cap;
};

bg_policy_set_t *bg_policy_set_new(void)
{
    return bg_calloc(1, sizeof(bg_policy_set_t));
}

void bg_policy_set_free(bg_policy_set_t *set)
{
    if (set == NULL)
        return;
    for (size_t i = 0; i < set->n; i++)
        bg_policy_rule_dispose(&set->rules[i]);
    free(set->rules);
    free(set);
}

int bg_policy_set_add(bg_policy_set_t *set, bg_policy_rule_t *rule)
{
    if (set->n >= BG_POLICY_RULES_MAX) {
        bg_policy_rule_dispose(rule);
        return BG_ERR_TOO_LARGE;
    }
    if (set->n == set->cap) {
        set->cap = set->cap == 0 ? 16 : set->cap * 2;
        set->rules = bg_realloc(set->rules, set->cap * sizeof(*set->rules));
    }
    set->rules[set->n++] = *rule;
    rule->agents = NULL;
    rule->models = NULL;
    return 0;
}

size_t bg_policy_set_count(const bg_policy_set_t *set)
{
    return set->n;
}

/* Writes the organization ids as a Postgres text[] literal ("{a,b}"); they are uuids. */
static char *org_array(const bg_policy_subject_t *subj)
{
    size_t n = 0;
    for (size_t i = 0; i < subj->norgs; i++) {
        if (bg_id_uuid_is_valid(subj->org_ids[i]))
            n++;
    }
    char *out = bg_malloc(n * (BG_UUID_STR_LEN + 1) + 3);
    size_t pos = 0;
    out[pos++] = '{';
    for (size_t i = 0; i < subj->norgs; i++) {
        if (!bg_id_uuid_is_valid(subj->org_ids[i]))
            continue;
        if (pos > 1)
            out[pos++] = ',';
        for (const char *s = subj->org_ids[i]; *s != '\0'; s++)
            out[pos++] = (*s >= 'A' && *s <= 'Z') ? (char)(*s - 'A' + 'a') : *s;
    }
    out[pos++] = '}';
    out[pos] = '\0';
    return out;
}

int bg_policy_set_load(PGconn *c, const bg_policy_subject_t *subj, bg_policy_set_t **out)
{
    *out = NULL;
    char limit[24];
    snprintf(limit, sizeof(limit), "%d", BG_POLICY_RULES_MAX + 1);
    char *orgs = subj != NULL ? org_array(subj) : bg_strdup("{}");
    const char *p[] = {subj == NULL ? "t" : "f",
                       subj != NULL && bg_str_present(subj->plan_id) ? subj->plan_id : NULL, orgs,
                       subj != NULL && bg_id_uuid_is_valid(subj->user_id) ? subj->user_id : NULL,
                       limit};
    PGresult *res;
    /* Highest precedence first, so a cut at the cap drops only rules that could not win. */
    int rc = bg_pg_exec(
        c,
        "SELECT id, type, scope, scope_id, priority, "
        "floor(extract(epoch FROM created_at) * 1000)::bigint, body::text FROM policy_rules "
        "WHERE enabled AND ($1::boolean OR scope = 'global' "
        "  OR (scope = 'plan' AND scope_id = $2) "
        "  OR (scope = 'organization' AND lower(scope_id) = ANY ($3::text[])) "
        "  OR (scope = 'user' AND lower(scope_id) = lower($4))) "
        "ORDER BY CASE scope WHEN 'user' THEN 3 WHEN 'organization' THEN 2 WHEN 'plan' THEN 1 "
        "ELSE 0 END DESC, priority DESC, created_at DESC, id DESC LIMIT $5::int",
        5, p, &res);
    free(orgs);
    if (rc != 0)
        return rc;
    bg_policy_set_t *set = bg_policy_set_new();
    int rows = PQntuples(res);
    if (rows > BG_POLICY_RULES_MAX) {
        bg_warn("policy: more than %d rules apply; the ones of lowest precedence are ignored",
                BG_POLICY_RULES_MAX);
        rows = BG_POLICY_RULES_MAX;
    }
    for (int i = 0; i < rows; i++) {
        bg_policy_rule_t rule;
        bg_policy_verr_t e;
        const char *body = PQgetvalue(res, i, 6);
        if (bg_policy_rule_parse(PQgetvalue(res, i, 1), PQgetvalue(res, i, 2),
                                 bg_pg_value(res, i, 3), body, strlen(body), &rule, &e) != 0) {
            bg_warn("policy: rule %s is invalid and ignored: %s %s", PQgetvalue(res, i, 0), e.field,
                    e.reason);
            continue;
        }
        (void)bg_strlcpy(rule.id, PQgetvalue(res, i, 0), sizeof(rule.id));
        int64_t v;
        rule.priority = bg_pg_int64(res, i, 4, &v) == 0 ? (int32_t)v : 0;
        rule.created_ms = bg_pg_int64(res, i, 5, &v) == 0 ? v : 0;
        if (bg_policy_set_add(set, &rule) != 0)
            break; /* cannot happen: rows is capped above */
    }
    PQclear(res);
    *out = set;
    return 0;
}

/* ---- evaluation ---- */

int64_t bg_policy_default_rpm(const char *plan_id)
{
    static const struct {
        const char *plan;
        int64_t rpm;
    } table[] = {{"trial", 10}, {"daily", 20}, {"weekly", 30}, {"monthly", 60}, {"yearly", 120}};
    for (size_t i = 0; plan_id != NULL && i < BG_ARRAY_SIZE(table); i++) {
        if (strcmp(plan_id, table[i].plan) == 0)
            return table[i].rpm;
    }
    return BG_POLICY_DEFAULT_RPM;
}

/* Returns true when the ",a,b," list holds name (len bytes). */
static bool list_has(const char *list, const char *name, size_t len)
{
    if (list == NULL || len == 0)
        return false;
    for (const char *p = strchr(list, ','); p != NULL && p[1] != '\0'; p = strchr(p + 1, ',')) {
        const char *end = strchr(p + 1, ',');
        if (end != NULL && (size_t)(end - p - 1) == len && memcmp(p + 1, name, len) == 0)
            return true;
    }
    return false;
}

/* Adds name to the ",a,b," set features (no-op when present or when it would not fit). */
static void features_add(char *features, const char *name)
{
    size_t len = strlen(name);
    if (list_has(features, name, len))
        return;
    size_t cur = strlen(features);
    if (cur + len + 2 > BG_POLICY_FEATURES_SIZE) {
        bg_warn("policy: too many features; \"%s\" is left out", name);
        return;
    }
    memcpy(features + cur, name, len);
    features[cur + len] = ',';
    features[cur + len + 1] = '\0';
}

/* Removes name from the ",a,b," set features. */
static void features_remove(char *features, const char *name)
{
    size_t len = strlen(name);
    for (char *p = strchr(features, ','); p != NULL && p[1] != '\0'; p = strchr(p + 1, ',')) {
        char *end = strchr(p + 1, ',');
        if (end != NULL && (size_t)(end - p - 1) == len && memcmp(p + 1, name, len) == 0) {
            memmove(p, end, strlen(end) + 1);
            return;
        }
    }
}

void bg_policy_defaults(const char *plan_id, int64_t plan_limit, const char *plan_features,
                        bg_policy_limits_t *out)
{
    memset(out, 0, sizeof(*out));
    bool trial = plan_id != NULL && strcmp(plan_id, "trial") == 0;
    out->q_limit = plan_limit > 0 ? plan_limit : 0;
    out->tq_limit = 0;
    out->rpm = bg_policy_default_rpm(plan_id);
    out->burst = BG_POLICY_DEFAULT_BURST;
    out->conc = trial ? BG_POLICY_TRIAL_CONCURRENCY : BG_POLICY_DEFAULT_CONCURRENCY;
    out->tok_cap = BG_POLICY_DEFAULT_TOKEN_CAP;
    out->features[0] = ',';
    out->features[1] = '\0';
    /* Plan features are names in a text[]; only those that can be flag names are carried. */
    for (const char *p = plan_features; p != NULL && *p != '\0';) {
        size_t len = strcspn(p, ",");
        if (flag_name_ok(p, len)) {
            char name[BG_POLICY_FLAG_SIZE];
            memcpy(name, p, len);
            name[len] = '\0';
            features_add(out->features, name);
        }
        p += len;
        if (*p == ',')
            p++;
    }
}

/* Returns true when the flag rule r turns its feature on for user_id. */
static bool flag_on(const bg_policy_rule_t *r, const char *user_id)
{
    if (!r->enabled || r->percentage <= 0)
        return false;
    if (r->percentage >= 100)
        return true;
    return bg_policy_rollout_bucket(r->flag, user_id != NULL ? user_id : "") <
           (unsigned)r->percentage;
}

/* Returns the winning flag rule for flag among the applicable ones, or NULL. */
static const bg_policy_rule_t *flag_winner(const bg_policy_set_t *set,
                                           const bg_policy_subject_t *subj, const char *flag)
{
    const bg_policy_rule_t *best = NULL;
    for (size_t i = 0; i < set->n; i++) {
        const bg_policy_rule_t *r = &set->rules[i];
        if (r->type != BG_POLICY_FEATURE_FLAG || strcmp(r->flag, flag) != 0 ||
            !bg_policy_rule_applies(r, subj))
            continue;
        if (best == NULL || bg_policy_rule_cmp(r, best) > 0)
            best = r;
    }
    return best;
}

static int cmp_flag_name(const void *a, const void *b)
{
    const bg_policy_rule_t *const *x = a;
    const bg_policy_rule_t *const *y = b;
    return strcmp((*x)->flag, (*y)->flag);
}

void bg_policy_evaluate(const bg_policy_set_t *set, const bg_policy_subject_t *subj,
                        bg_policy_limits_t *io)
{
    const bg_policy_rule_t *rate = NULL;
    const bg_policy_rule_t *quota = NULL, *tokens = NULL, *cap = NULL, *conc = NULL;
    const bg_policy_rule_t **flags = NULL; /* owned array of borrowed winners */
    size_t nflags = 0;
    for (size_t i = 0; i < set->n; i++) {
        const bg_policy_rule_t *r = &set->rules[i];
        if (!bg_policy_rule_applies(r, subj))
            continue;
        if (r->type == BG_POLICY_RATE_LIMIT) {
            if (rate == NULL || bg_policy_rule_cmp(r, rate) > 0)
                rate = r;
        } else if (r->type == BG_POLICY_QUOTA) {
            /* Each field from the highest-ranked rule that sets it. */
            if (quota == NULL || bg_policy_rule_cmp(r, quota) > 0)
                quota = r;
            if (r->tokens >= 0 && (tokens == NULL || bg_policy_rule_cmp(r, tokens) > 0))
                tokens = r;
            if (r->max_tokens_per_request >= 0 && (cap == NULL || bg_policy_rule_cmp(r, cap) > 0))
                cap = r;
            if (r->concurrency >= 0 && (conc == NULL || bg_policy_rule_cmp(r, conc) > 0))
                conc = r;
        } else if (r->type == BG_POLICY_FEATURE_FLAG) {
            /* Decide each flag once, at the rule that wins it. */
            if (flag_winner(set, subj, r->flag) != r)
                continue;
            if (nflags == 0)
                flags = bg_malloc(set->n * sizeof(*flags));
            flags[nflags++] = r;
        }
    }
    /* By name, so the features text does not depend on the order rules were loaded in. */
    if (nflags > 1)
        qsort(flags, nflags, sizeof(*flags), cmp_flag_name);
    for (size_t i = 0; i < nflags; i++) {
        if (flag_on(flags[i], subj->user_id))
            features_add(io->features, flags[i]->flag);
        else
            features_remove(io->features, flags[i]->flag);
    }
    free(flags);
    if (rate != NULL) {
        io->rpm = rate->rpm;
        io->burst = rate->burst;
    }
    if (quota != NULL)
        io->q_limit = quota->requests;
    if (tokens != NULL)
        io->tq_limit = tokens->tokens;
    if (cap != NULL)
        io->tok_cap = cap->max_tokens_per_request;
    if (conc != NULL)
        io->conc = conc->concurrency;
}

unsigned bg_policy_rollout_bucket(const char *flag, const char *user_id)
{
    uint64_t h = UINT64_C(0xcbf29ce484222325);
    const unsigned char *parts[] = {(const unsigned char *)flag, (const unsigned char *)":",
                                    (const unsigned char *)user_id};
    for (size_t i = 0; i < BG_ARRAY_SIZE(parts); i++) {
        for (const unsigned char *p = parts[i]; *p != '\0'; p++) {
            h ^= *p;
            h *= UINT64_C(0x100000001b3);
        }
    }
    /* FNV-1a alone clusters on ids that differ in the last bytes; the finaliser spreads them. */
    h ^= h >> 30;
    h *= UINT64_C(0xbf58476d1ce4e5b9);
    h ^= h >> 27;
    h *= UINT64_C(0x94d049bb133111eb);
    h ^= h >> 31;
    return (unsigned)(h % 100);
}

bool bg_policy_flag_enabled(const bg_policy_set_t *set, const bg_policy_subject_t *subj,
                            const char *flag)
{
    const bg_policy_rule_t *r = set != NULL ? flag_winner(set, subj, flag) : NULL;
    if (r != NULL)
        return flag_on(r, subj->user_id);
    size_t len = strlen(flag);
    for (const char *p = subj->plan_features; p != NULL && *p != '\0';) {
        size_t n = strcspn(p, ",");
        if (n == len && memcmp(p, flag, len) == 0)
            return true;
        p += n;
        if (*p == ',')
            p++;
    }
    return false;
}

/* Returns true when the list names name, alias or "*". */
static bool list_matches(const char *list, const char *name, const char *alias)
{
    return list_has(list, "*", 1) || (name != NULL && list_has(list, name, strlen(name))) ||
           (alias != NULL && list_has(list, alias, strlen(alias)));
}

bool bg_policy_allows_resource(const bg_policy_set_t *set, const bg_policy_subject_t *subj,
                               bg_policy_resource_t kind, const char *name, const char *alias)
{
    if (set == NULL)
        return true;
    const bg_policy_rule_t *level = NULL; /* a rule at the winning (scope, priority) */
    bool deny = false;
    for (size_t i = 0; i < set->n; i++) {
        const bg_policy_rule_t *r = &set->rules[i];
        if (r->type != BG_POLICY_RESOURCE_ACCESS || !bg_policy_rule_applies(r, subj))
            continue;
        if (!list_matches(kind == BG_POLICY_AGENT ? r->agents : r->models, name, alias))
            continue;
        if (level == NULL || r->scope > level->scope ||
            (r->scope == level->scope && r->priority > level->priority)) {
            level = r;
            deny = r->deny;
        } else if (r->scope == level->scope && r->priority == level->priority) {
            deny = deny || r->deny;
        }
    }
    return !deny;
}

/* ---- compiling ---- */

int64_t bg_policy_window_start(const bg_admission_state_t *s, int64_t now_ms)
{
    if (s->w_len <= 0 || now_ms <= s->w_anchor)
        return s->w_anchor;
    return s->w_anchor + (now_ms - s->w_anchor) / s->w_len * s->w_len;
}

int64_t bg_policy_window_end(const bg_admission_state_t *s, int64_t now_ms)
{
    int64_t end = bg_policy_window_start(s, now_ms) + s->w_len;
    return end < s->w_until ? end : s->w_until;
}

static int64_t value_ms(const PGresult *res, int row, int col, int64_t dflt)
{
    int64_t v;
    return bg_pg_int64(res, row, col, &v) == 0 ? v : dflt;
}

/* Loads the user's organizations (lower-case uuid texts) into *ids (owned array of owned strings).
 */
static int load_orgs(PGconn *c, const char *user_id, char ***ids, size_t *n)
{
    *ids = NULL;
    *n = 0;
    PGresult *res;
    const char *p[] = {user_id};
    int rc = bg_pg_exec(c,
                        "SELECT m.organization_id::text FROM memberships m "
                        "JOIN organizations o ON o.id = m.organization_id "
                        "WHERE m.user_id = $1::uuid AND o.deleted_at IS NULL "
                        "ORDER BY 1 LIMIT 1000",
                        1, p, &res);
    if (rc != 0)
        return rc;
    int rows = PQntuples(res);
    if (rows > 0) {
        *ids = bg_calloc((size_t)rows, sizeof(char *));
        for (int i = 0; i < rows; i++)
            (*ids)[i] = bg_strdup(PQgetvalue(res, i, 0));
        *n = (size_t)rows;
    }
    PQclear(res);
    return 0;
}

static void free_orgs(char **ids, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(ids[i]);
    free(ids);
}

/*
 * The user, the subscription that decides (the live one, else the newest), its plan, and the quota
 * window holding $2. A Paddle subscription's window is its billing period. Other subscriptions (the
 * trial, grants) have windows of the plan's period counted from current_period_start, on UTC
 * calendar arithmetic (timestamp without time zone, so no DST hour and no dependence on the
 * session's TimeZone), the last one cut at current_period_end. k0 estimates the number of whole
 * periods from the epoch length of the interval (a month counts 30 days there), and the short
 * series around it finds the exact one.
 */
static const char compile_sql[] =
    "WITH t AS (SELECT 'epoch'::timestamptz + $2::bigint * interval '1 millisecond' AS now) "
    "SELECT u.status, u.deleted_at IS NOT NULL, s.id, s.status, s.plan_id, "
    "  floor(extract(epoch FROM s.current_period_start) * 1000)::bigint, "
    "  floor(extract(epoch FROM s.current_period_end) * 1000)::bigint, "
    "  floor(extract(epoch FROM s.trial_ends_at) * 1000)::bigint, "
    "  p.request_limit, array_to_string(p.features, ','), "
    "  floor(extract(epoch FROM w.ws) * 1000)::bigint, "
    "  floor(extract(epoch FROM CASE WHEN s.paddle_subscription_id IS NOT NULL "
    "    THEN s.current_period_end "
    "    ELSE least(((w.ws AT TIME ZONE 'UTC') + p.period) AT TIME ZONE 'UTC', "
    "      s.current_period_end) END) * 1000)::bigint "
    "FROM t CROSS JOIN users u "
    "LEFT JOIN LATERAL (SELECT * FROM subscriptions x WHERE x.user_id = u.id "
    "  ORDER BY (x.status <> 'canceled') DESC, x.created_at DESC, x.id DESC LIMIT 1) s ON true "
    "LEFT JOIN plans p ON p.id = s.plan_id "
    "LEFT JOIN LATERAL (SELECT s.current_period_start AT TIME ZONE 'UTC' AS st, "
    "  t.now AT TIME ZONE 'UTC' AS nw, "
    "  floor(extract(epoch FROM t.now - s.current_period_start) / "
    "  extract(epoch FROM p.period))::bigint AS k0) e ON true "
    "LEFT JOIN LATERAL (SELECT CASE WHEN s.paddle_subscription_id IS NOT NULL "
    "  THEN s.current_period_start "
    "  ELSE coalesce(max(e.st + k * p.period) AT TIME ZONE 'UTC', s.current_period_start) END AS "
    "ws "
    "  FROM generate_series(greatest(0, e.k0 - 2 - e.k0 / 16), greatest(0, e.k0 + 2)) AS k "
    "  WHERE e.st + k * p.period <= e.nw) w ON true "
    "WHERE u.id = $1::uuid";

int bg_policy_compile_user(PGconn *c, const char *user_id, int64_t now_ms,
                           bg_admission_state_t *out)
{
    memset(out, 0, sizeof(*out));
    if (!bg_id_uuid_is_valid(user_id))
        return BG_ERR_NOT_FOUND;
    char now[24];
    snprintf(now, sizeof(now), "%" PRId64, now_ms);
    const char *p[] = {user_id, now};
    PGresult *res;
    int rc = bg_pg_exec(c, compile_sql, 2, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) == 0) {
        PQclear(res);
        return BG_ERR_NOT_FOUND;
    }
    for (size_t i = 0; user_id[i] != '\0' && i + 1 < sizeof(out->user_id); i++) {
        char ch = user_id[i];
        out->user_id[i] = (ch >= 'A' && ch <= 'Z') ? (char)(ch - 'A' + 'a') : ch;
    }
    bool user_ok =
        strcmp(PQgetvalue(res, 0, 0), "active") == 0 && strcmp(PQgetvalue(res, 0, 1), "f") == 0;
    bool has_sub = !PQgetisnull(res, 0, 2);
    const char *status = "none";
    int64_t limit = 0;
    char features[BG_POLICY_FEATURES_SIZE] = "";
    out->w_anchor = now_ms;
    out->w_len = DAY_MS;
    out->w_until = now_ms;
    if (has_sub) {
        (void)bg_strlcpy(out->subscription_id, PQgetvalue(res, 0, 2), sizeof(out->subscription_id));
        (void)bg_strlcpy(out->sub_status, PQgetvalue(res, 0, 3), sizeof(out->sub_status));
        (void)bg_strlcpy(out->plan, PQgetvalue(res, 0, 4), sizeof(out->plan));
        int64_t period_end = value_ms(res, 0, 6, now_ms);
        int64_t trial_end = value_ms(res, 0, 7, INT64_MAX);
        limit = value_ms(res, 0, 8, 0);
        (void)bg_strlcpy(features, PQgetvalue(res, 0, 9), sizeof(features));
        int64_t ws = value_ms(res, 0, 10, now_ms);
        int64_t we = value_ms(res, 0, 11, ws);
        out->w_anchor = ws;
        out->w_len = we > ws ? we - ws : DAY_MS;
        out->w_until = period_end;
        const char *st = out->sub_status;
        if (strcmp(st, "trialing") == 0) {
            if (trial_end < out->w_until)
                out->w_until = trial_end;
            status = "trialing";
        } else if (strcmp(st, "active") == 0 || strcmp(st, "past_due") == 0) {
            /* past_due: Paddle is retrying the payment; access lasts until the period ends. */
            status = "active";
        }
        if (now_ms >= out->w_until || now_ms < value_ms(res, 0, 5, now_ms))
            status = "none";
    }
    PQclear(res);
    if (!user_ok)
        status = "none";
    (void)bg_strlcpy(out->status, status, sizeof(out->status));
    bool live = strcmp(status, "none") != 0;

    char **orgs;
    size_t norgs;
    rc = load_orgs(c, out->user_id, &orgs, &norgs);
    if (rc != 0)
        return rc;
    bg_policy_subject_t subj = {.user_id = out->user_id,
                                .plan_id = live ? out->plan : NULL,
                                .org_ids = (const char *const *)orgs,
                                .norgs = norgs,
                                .plan_features = live ? features : NULL};
    bg_policy_set_t *set;
    rc = bg_policy_set_load(c, &subj, &set);
    if (rc != 0) {
        free_orgs(orgs, norgs);
        return rc;
    }
    bg_policy_defaults(subj.plan_id, live ? limit : 0, subj.plan_features, &out->limits);
    bg_policy_evaluate(set, &subj, &out->limits);
    bg_policy_set_free(set);
    free_orgs(orgs, norgs);
    if (!live) {
        /* Nothing to admit: say so in every field the script might look at. */
        out->limits.q_limit = 0;
        if (out->w_until > now_ms)
            out->w_until = now_ms;
    }
    if (out->limits.burst < 1)
        out->limits.burst = 1;
    out->v = now_ms;
    return 0;
}

/* ---- Redis ---- */

static int user_key(char *out, size_t outlen, int shards, const char *user_id, const char *kind)
{
    char tag[32];
    if (shards < 1 || user_id == NULL ||
        bg_shard_tag(tag, sizeof(tag), bg_shard_of(user_id, shards)) != 0)
        return BG_ERR_INVALID;
    int n = snprintf(out, outlen, "bg:%s:%s:%s", tag, kind, user_id);
    if (n < 0 || (size_t)n >= outlen) {
        if (outlen > 0)
            out[0] = '\0';
        return BG_ERR_TOO_LARGE;
    }
    return 0;
}

int bg_policy_key_adm(char *out, size_t outlen, int shards, const char *user_id)
{
    return user_key(out, outlen, shards, user_id, "adm");
}

int bg_policy_key_quota(char *out, size_t outlen, int shards, const char *user_id)
{
    return user_key(out, outlen, shards, user_id, "quota");
}

int bg_policy_state_argv(const bg_admission_state_t *s, int shards, bg_policy_argv_t *out)
{
    int rc = bg_policy_key_adm(out->key, sizeof(out->key), shards, s->user_id);
    if (rc != 0)
        return rc;
    const struct {
        const char *name;
        const char *text; /* NULL: the number */
        int64_t num;
    } fields[] = {
        {"status", s->status, 0},
        {"plan", s->plan, 0},
        {"q_limit", NULL, s->limits.q_limit},
        {"w_anchor", NULL, s->w_anchor},
        {"w_len", NULL, s->w_len},
        {"w_until", NULL, s->w_until},
        {"rpm", NULL, s->limits.rpm},
        {"burst", NULL, s->limits.burst},
        {"conc", NULL, s->limits.conc},
        {"tok_cap", NULL, s->limits.tok_cap},
        {"tq_limit", NULL, s->limits.tq_limit},
        {"features", s->limits.features, 0},
        {"v", NULL, s->v},
    };
    int n = 0;
    out->argv[n++] = "HSET";
    out->argv[n++] = out->key;
    /* the readable fields, then "pk" below */
    _Static_assert(BG_ARRAY_SIZE(fields) + 1 == BG_POLICY_STATE_FIELDS, "fields of the HSET");
    for (size_t i = 0; i < BG_ARRAY_SIZE(fields); i++) {
        out->argv[n++] = fields[i].name;
        if (fields[i].text != NULL) {
            out->argv[n++] = fields[i].text;
        } else {
            snprintf(out->nums[i], sizeof(out->nums[i]), "%" PRId64, fields[i].num);
            out->argv[n++] = out->nums[i];
        }
    }
    for (int i = 0; i < n; i++)
        out->lens[i] = strlen(out->argv[i]);
    /* the packed copy the admission script reads (binary: its length is given) */
    const int64_t nums[9] = {s->limits.q_limit, s->w_anchor,       s->w_len,
                             s->w_until,        s->limits.rpm,     s->limits.burst,
                             s->limits.conc,    s->limits.tok_cap, s->limits.tq_limit};
    size_t len = 0;
    for (size_t i = 0; i < BG_ARRAY_SIZE(nums); i++) {
        double d = (double)nums[i];
        uint64_t bits;
        memcpy(&bits, &d, sizeof(bits));
        for (int b = 0; b < 8; b++)
            out->pk[len++] = (char)(unsigned char)(bits >> (8 * b));
    }
    int tail =
        snprintf(out->pk + len, sizeof(out->pk) - len, "%s\n%s", s->status, s->limits.features);
    if (tail < 0 || (size_t)tail >= sizeof(out->pk) - len)
        return BG_ERR_TOO_LARGE;
    out->argv[n] = "pk";
    out->lens[n++] = 2;
    out->argv[n] = out->pk;
    out->lens[n++] = len + (size_t)tail;
    out->argc = n;
    return 0;
}

/* Runs one command whose reply must not be an error; the reply is dropped. */
static int run_ok(bg_redis_t *r, int argc, const char *const *argv, const size_t *lens)
{
    redisReply *reply;
    int rc = bg_redis_argv(r, argc, argv, lens, &reply);
    if (rc != 0)
        return rc;
    bool bad = reply == NULL || reply->type == REDIS_REPLY_ERROR || reply->type == REDIS_REPLY_NIL;
    if (bad && reply != NULL && reply->type == REDIS_REPLY_ERROR)
        bg_warn("policy: redis refused %s: %s", argv[0], reply->str);
    freeReplyObject(reply);
    return bad ? BG_ERR_PROTOCOL : 0;
}

int bg_policy_state_write(bg_redis_t *r, int shards, const bg_admission_state_t *s)
{
    bg_policy_argv_t cmd;
    int rc = bg_policy_state_argv(s, shards, &cmd);
    if (rc != 0)
        return rc;
    static const char *const multi[] = {"MULTI"};
    static const char *const exec[] = {"EXEC"};
    static const char *const discard[] = {"DISCARD"};
    const char *del[] = {"DEL", cmd.key};
    rc = run_ok(r, 1, multi, NULL);
    if (rc != 0)
        return rc;
    rc = run_ok(r, 2, del, NULL);
    if (rc == 0)
        rc = run_ok(r, cmd.argc, cmd.argv, cmd.lens);
    if (rc == 0)
        return run_ok(r, 1, exec, NULL);
    if (rc == BG_ERR_PROTOCOL)
        (void)run_ok(r, 1, discard, NULL); /* the connection stays usable */
    return rc;
}

int bg_policy_state_write_async(bg_redis_async_t *c, int shards, const bg_admission_state_t *s,
                                bg_redis_async_cb cb, void *ud)
{
    bg_policy_argv_t cmd;
    int rc = bg_policy_state_argv(s, shards, &cmd);
    if (rc != 0)
        return rc;
    return bg_redis_async_argv(c, cb, ud, cmd.argc, cmd.argv, cmd.lens);
}

int bg_policy_usage_count(PGconn *c, const char *user_id, int64_t from_ms, int64_t to_ms,
                          int64_t *used, int64_t *tused)
{
    *used = 0;
    *tused = 0;
    char from[24], to[24];
    snprintf(from, sizeof(from), "%" PRId64, from_ms);
    snprintf(to, sizeof(to), "%" PRId64, to_ms);
    const char *p[] = {user_id, from, to};
    PGresult *res;
    int rc =
        bg_pg_exec(c,
                   "SELECT coalesce(sum(requests_charged), 0)::bigint, "
                   "coalesce(sum(prompt_tokens::bigint + completion_tokens), 0)::bigint "
                   "FROM usage_records WHERE user_id = $1::uuid AND status IN ('ok', 'canceled') "
                   "AND requests_charged > 0 "
                   "AND created_at >= 'epoch'::timestamptz + $2::bigint * interval '1 millisecond' "
                   "AND created_at < 'epoch'::timestamptz + $3::bigint * interval '1 millisecond'",
                   3, p, &res);
    if (rc != 0)
        return rc;
    if (bg_pg_int64(res, 0, 0, used) != 0 || bg_pg_int64(res, 0, 1, tused) != 0)
        rc = BG_ERR_PROTOCOL;
    PQclear(res);
    return rc;
}

int bg_policy_quota_write(bg_redis_t *r, int shards, const char *user_id, int64_t win, int64_t used,
                          int64_t tused)
{
    char key[BG_REDIS_KEY_MAX];
    int rc = bg_policy_key_quota(key, sizeof(key), shards, user_id);
    if (rc != 0)
        return rc;
    char w[24], u[24], t[24];
    snprintf(w, sizeof(w), "%" PRId64, win);
    snprintf(u, sizeof(u), "%" PRId64, used);
    snprintf(t, sizeof(t), "%" PRId64, tused);
    const char *argv[] = {"HSET", key, "win", w, "used", u, "tused", t};
    return run_ok(r, (int)BG_ARRAY_SIZE(argv), argv, NULL);
}
