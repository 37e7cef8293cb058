/*
 * Agents and prompts on blocking libpq. See bg/agents.h for the contract.
 *
 * Every statement is parameterised and its SQL compiled in; input only travels as parameters, and
 * JSON that goes into jsonb columns (definitions, params, memory, audit details) is built by the
 * JSON writer, never spliced. Functions that write more than one row run in one transaction and
 * roll back through one clean-up path; `res` is NULL or owned at every goto and cleared there.
 *
 * Version numbers come from max(version) + 1 under a row lock on the prompt (SELECT … FOR UPDATE):
 * two publishers of one prompt queue on that lock instead of racing to the same number, and
 * publishing to different prompts never waits. The primary key (prompt_id, version) would catch a
 * collision anyway; the lock makes one impossible.
 *
 * Values of an agent are checked here before any SQL, so that a refusal names the field as the
 * API shows it; the CHECK constraints of the schema stay as the last word, and the few refusals
 * only the database can make (a prompt or pinned version that does not exist) are mapped back to
 * their field from the constraint name.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "bg/agents.h"
#include "bg/buf.h"
#include "bg/err.h"
#include "bg/id.h"
#include "bg/json.h"
#include "bg/pg.h"
#include "bg/policy.h"
#include "bg/timeutil.h"
#include "bg/validate.h"

/* RFC 3339 UTC text of a timestamptz column, as the API shows times. */
#define TS(col) "to_char((" col ") AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"

/* The columns read_agent() expects, over `agents a`. */
#define AGENT_COLS                                                                                 \
    "a.id, coalesce(a.organization_id::text, ''), a.slug, a.name, a.description, a.model, "        \
    "a.provider, coalesce(a.prompt_id::text, ''), coalesce(a.prompt_version, 0), "                 \
    "coalesce(a.params ->> 'temperature', ''), coalesce(a.params ->> 'max_tokens', ''), "          \
    "a.memory::text, a.cache_enabled, a.cache_ttl_s, array_to_string(a.channels, ','), "           \
    "a.visibility, a.status, " TS("a.created_at") ", " TS("a.updated_at")

/*
 * The columns read_version() expects, over `prompt_versions pv`. A version older than 0006 has no
 * definition: its template is the system template and its defaults become string variables.
 */
#define VERSION_COLS                                                                               \
    "pv.prompt_id, pv.version, coalesce(pv.definition, jsonb_build_object('system', pv.template, " \
    "'variables', (SELECT coalesce(jsonb_agg(jsonb_build_object('name', e.key, 'type', "           \
    "'string') || CASE WHEN jsonb_typeof(e.value) = 'string' THEN jsonb_build_object('default', "  \
    "e.value) ELSE '{}'::jsonb END), '[]'::jsonb) FROM jsonb_each(pv.variables) e)))::text, "      \
    "coalesce(pv.model, ''), pv.params::text, pv.note, " TS("pv.created_at")

/* Audit details and stored definitions are our own JSON; the cap only guards against misuse. */
#define DETAILS_MAX (16 * 1024)
#define DEF_TEXT_MAX (4 * BG_PROMPT_DEF_MAX)

static const char *const channel_names[] = {"web", "telegram", "api"};

/* ---- helpers ---- */

static int verr(bg_prompt_err_t *err, const char *field, const char *reason)
{
    if (err != NULL) {
        (void)bg_strlcpy(err->field, field, sizeof(err->field));
        err->name[0] = '\0';
        err->reason = reason;
    }
    return BG_ERR_INVALID;
}

static void copy_field(const PGresult *res, int row, int col, char *out, size_t outlen)
{
    const char *v = bg_pg_value(res, row, col);
    (void)bg_strlcpy(out, v != NULL ? v : "", outlen);
}

static int64_t int_field(const PGresult *res, int row, int col)
{
    int64_t v = 0;
    if (bg_pg_int64(res, row, col, &v) != 0)
        v = 0;
    return v;
}

/* Who created a row: a user id when the actor is a person, else NULL (created_by is a user FK). */
static const char *creator(const bg_actor_t *actor)
{
    if (actor == NULL || actor->kind == NULL || !bg_id_uuid_is_valid(actor->id))
        return NULL;
    return strcmp(actor->kind, "user") == 0 || strcmp(actor->kind, "admin") == 0 ? actor->id : NULL;
}

unsigned bg_agent_channels_parse(const char *csv)
{
    unsigned bits = 0;
    const char *p = csv;
    while (p != NULL && *p != '\0') {
        const char *comma = strchr(p, ',');
        size_t len = comma != NULL ? (size_t)(comma - p) : strlen(p);
        bool known = false;
        for (size_t i = 0; i < BG_ARRAY_SIZE(channel_names); i++) {
            if (strlen(channel_names[i]) == len && memcmp(p, channel_names[i], len) == 0) {
                bits |= 1u << i;
                known = true;
            }
        }
        if (!known)
            return 0;
        p = comma != NULL ? comma + 1 : NULL;
    }
    return bits;
}

/* Writes the channel names of bits as "web,telegram" into out (fits every combination). */
static void channels_csv(unsigned bits, char out[32])
{
    size_t len = 0;
    out[0] = '\0';
    for (size_t i = 0; i < BG_ARRAY_SIZE(channel_names); i++) {
        if ((bits & (1u << i)) == 0)
            continue;
        int n = snprintf(out + len, 32 - len, "%s%s", len > 0 ? "," : "", channel_names[i]);
        if (n > 0)
            len += (size_t)n;
    }
}

static void read_agent(const PGresult *res, int row, bg_agent_t *a)
{
    memset(a, 0, sizeof(*a));
    copy_field(res, row, 0, a->id, sizeof(a->id));
    copy_field(res, row, 1, a->organization_id, sizeof(a->organization_id));
    copy_field(res, row, 2, a->slug, sizeof(a->slug));
    copy_field(res, row, 3, a->name, sizeof(a->name));
    copy_field(res, row, 4, a->description, sizeof(a->description));
    copy_field(res, row, 5, a->model, sizeof(a->model));
    copy_field(res, row, 6, a->provider, sizeof(a->provider));
    copy_field(res, row, 7, a->prompt_id, sizeof(a->prompt_id));
    a->prompt_version = (int)int_field(res, row, 8);

    const char *t = bg_pg_value(res, row, 9);
    char *end = NULL;
    a->temperature = -1;
    if (t != NULL && t[0] != '\0') {
        double d = strtod(t, &end);
        if (end != t && *end == '\0')
            a->temperature = d;
    }
    const char *mt = bg_pg_value(res, row, 10);
    if (mt != NULL && mt[0] != '\0') {
        long long v = strtoll(mt, &end, 10);
        if (end != mt && *end == '\0' && v > 0)
            a->max_tokens = v;
    }
    const char *mem = bg_pg_value(res, row, 11);
    /* The table's CHECK admits only valid policies; the fallback is its default. */
    if (mem == NULL || bg_prompt_memory_parse_text(mem, strlen(mem), &a->memory, NULL) != 0) {
        a->memory.kind = BG_MEMORY_LAST_TURNS;
        a->memory.limit = 20;
    }
    const char *cache = bg_pg_value(res, row, 12);
    a->cache_enabled = cache != NULL && cache[0] == 't';
    a->cache_ttl_s = (int)int_field(res, row, 13);
    a->channels = bg_agent_channels_parse(bg_pg_value(res, row, 14));
    copy_field(res, row, 15, a->visibility, sizeof(a->visibility));
    copy_field(res, row, 16, a->status, sizeof(a->status));
    copy_field(res, row, 17, a->created_at, sizeof(a->created_at));
    copy_field(res, row, 18, a->updated_at, sizeof(a->updated_at));
}

/* Runs a query expected to return at most one agent row into out. */
static int one_agent(PGconn *c, const char *sql, int n, const char *const *params, bg_agent_t *out)
{
    PGresult *res;
    int rc = bg_pg_exec(c, sql, n, params, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) == 0) {
        PQclear(res);
        return BG_ERR_NOT_FOUND;
    }
    if (out != NULL)
        read_agent(res, 0, out);
    PQclear(res);
    return 0;
}

/* ---- reading agents ---- */

void bg_agent_list_dispose(bg_agent_list_t *list)
{
    if (list == NULL)
        return;
    free(list->items);
    list->items = NULL;
    list->count = 0;
}

int bg_agents_list(PGconn *c, const char *user_id, bool all, bg_agent_list_t *out)
{
    out->items = NULL;
    out->count = 0;
    if (user_id != NULL && !bg_id_uuid_is_valid(user_id))
        user_id = NULL; /* an unknown caller sees what everyone sees */
    const char *p[] = {user_id};
    PGresult *res;
    int rc;
    if (all) {
        rc = bg_pg_exec(c,
                        "SELECT " AGENT_COLS " FROM agents a WHERE a.deleted_at IS NULL "
                        "ORDER BY a.name, a.id LIMIT 1000",
                        0, NULL, &res);
    } else {
        /*
         * public: everyone; organization: the organization's members; private: whoever made it.
         */
        rc = bg_pg_exec(c,
                        "SELECT " AGENT_COLS " FROM agents a "
                        "WHERE a.deleted_at IS NULL AND a.status = 'active' "
                        "AND (a.visibility = 'public' OR ($1::uuid IS NOT NULL AND ("
                        "(a.visibility = 'organization' AND a.organization_id IN "
                        "(SELECT m.organization_id FROM memberships m WHERE m.user_id = $1::uuid)) "
                        "OR (a.visibility = 'private' AND a.created_by = $1::uuid)))) "
                        "ORDER BY a.name, a.id LIMIT 1000",
                        1, p, &res);
    }
    if (rc != 0)
        return rc;
    int n = PQntuples(res);
    if (n > 0) {
        out->items = bg_calloc((size_t)n, sizeof(*out->items));
        for (int i = 0; i < n; i++)
            read_agent(res, i, &out->items[i]);
        out->count = (size_t)n;
    }
    PQclear(res);
    return 0;
}

int bg_agents_get(PGconn *c, const char *agent_id, bg_agent_t *out)
{
    if (!bg_id_uuid_is_valid(agent_id))
        return BG_ERR_NOT_FOUND;
    const char *p[] = {agent_id};
    return one_agent(c,
                     "SELECT " AGENT_COLS " FROM agents a WHERE a.id = $1 AND a.deleted_at IS NULL",
                     1, p, out);
}

int bg_agents_get_by_slug(PGconn *c, const char *organization_id, const char *slug, bg_agent_t *out)
{
    if (organization_id != NULL && !bg_id_uuid_is_valid(organization_id))
        return BG_ERR_NOT_FOUND;
    if (slug == NULL)
        return BG_ERR_NOT_FOUND;
    const char *p[] = {organization_id, slug};
    return one_agent(c,
                     "SELECT " AGENT_COLS " FROM agents a "
                     "WHERE a.organization_id IS NOT DISTINCT FROM $1::uuid AND a.slug = $2 "
                     "AND a.deleted_at IS NULL",
                     2, p, out);
}

/* ---- what a user may use ---- */

/*
 * Who may see an agent, over `agents a` with the user as $1 (NULL: nobody in particular), the same
 * rule GET /agents and bg_chat_create apply: public for everyone, organization for its members,
 * private for whoever made it. Only active, live agents are ever usable.
 */
#define USABLE_WHERE                                                                               \
    "a.deleted_at IS NULL AND a.status = 'active' AND (a.visibility = 'public' OR "                \
    "($1::uuid IS NOT NULL AND ((a.visibility = 'organization' AND a.organization_id IN "          \
    "(SELECT m.organization_id FROM memberships m WHERE m.user_id = $1::uuid)) "                   \
    "OR (a.visibility = 'private' AND a.created_by = $1::uuid))))"

/*
 * The policy subject of a user and the resource rules that apply to it. The plan is the one the
 * admission state uses (bg_policy_compile_user decides whether the subscription is live), so a
 * plan-scoped rule reaches exactly the users whose requests that plan admits.
 */
typedef struct st_access {
    bg_admission_state_t state;
    char **orgs; /* owned array of owned lower-case uuid texts */
    size_t norgs;
    bg_policy_subject_t subj; /* borrows state and orgs */
    bg_policy_set_t *set;     /* owned */
} st_access_t;

static void access_dispose(st_access_t *ac)
{
    for (size_t i = 0; i < ac->norgs; i++)
        free(ac->orgs[i]);
    free(ac->orgs);
    ac->orgs = NULL;
    ac->norgs = 0;
    bg_policy_set_free(ac->set);
    ac->set = NULL;
}

/* Loads the subject of user_id (NULL: anonymous, global rules only) and its rules into ac. */
static int access_load(PGconn *c, const char *user_id, st_access_t *ac)
{
    memset(ac, 0, sizeof(*ac));
    bool live = false;
    if (user_id != NULL) {
        int rc = bg_policy_compile_user(c, user_id, bg_timeutil_wall_ms(), &ac->state);
        if (rc == BG_ERR_NOT_FOUND)
            user_id = NULL;
        else if (rc != 0)
            return rc;
        else
            live = strcmp(ac->state.status, "none") != 0;
    }
    if (user_id != NULL) {
        const char *p[] = {user_id};
        PGresult *res;
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
            ac->orgs = bg_calloc((size_t)rows, sizeof(char *));
            for (int i = 0; i < rows; i++)
                ac->orgs[i] = bg_strdup(PQgetvalue(res, i, 0));
            ac->norgs = (size_t)rows;
        }
        PQclear(res);
    }
    ac->subj.user_id = user_id != NULL ? ac->state.user_id : NULL;
    ac->subj.plan_id = live ? ac->state.plan : NULL;
    ac->subj.org_ids = (const char *const *)ac->orgs;
    ac->subj.norgs = ac->norgs;
    int rc = bg_policy_set_load(c, &ac->subj, &ac->set);
    if (rc != 0)
        access_dispose(ac);
    return rc;
}

/* Returns whether the rules of ac let its user use agent a (by slug or id, and by its model). */
static bool access_allows(const st_access_t *ac, const bg_agent_t *a)
{
    if (!bg_policy_allows_resource(ac->set, &ac->subj, BG_POLICY_AGENT, a->slug, a->id))
        return false;
    /* "" is the deployment's model: no rule can name it, only "*" reaches it */
    return bg_policy_allows_resource(ac->set, &ac->subj, BG_POLICY_MODEL,
                                     a->model[0] != '\0' ? a->model : NULL, NULL);
}

static bool on_channel(const bg_agent_t *a, unsigned channel)
{
    return channel == 0 || (a->channels & channel) != 0;
}

int bg_agents_list_usable(PGconn *c, const char *user_id, unsigned channel, bg_agent_list_t *out)
{
    out->items = NULL;
    out->count = 0;
    if (user_id != NULL && !bg_id_uuid_is_valid(user_id))
        user_id = NULL;
    bg_agent_list_t all;
    int rc = bg_agents_list(c, user_id, false, &all);
    if (rc != 0)
        return rc;
    st_access_t ac;
    rc = access_load(c, user_id, &ac);
    if (rc != 0) {
        bg_agent_list_dispose(&all);
        return rc;
    }
    size_t kept = 0;
    for (size_t i = 0; i < all.count; i++) {
        const bg_agent_t *a = &all.items[i];
        if (!on_channel(a, channel) || !access_allows(&ac, a))
            continue;
        if (kept != i)
            all.items[kept] = *a;
        kept++;
    }
    access_dispose(&ac);
    if (kept == 0) {
        bg_agent_list_dispose(&all);
        return 0;
    }
    out->items = all.items;
    out->count = kept;
    return 0;
}

int bg_agents_get_usable(PGconn *c, const char *user_id, const char *id_or_slug, unsigned channel,
                         bg_agent_t *out)
{
    if (id_or_slug == NULL || id_or_slug[0] == '\0')
        return BG_ERR_NOT_FOUND;
    if (user_id != NULL && !bg_id_uuid_is_valid(user_id))
        user_id = NULL;
    const char *p[] = {user_id, id_or_slug};
    int rc = BG_ERR_NOT_FOUND;
    if (bg_id_uuid_is_valid(id_or_slug))
        rc = one_agent(
            c, "SELECT " AGENT_COLS " FROM agents a WHERE a.id = $2::uuid AND " USABLE_WHERE, 2, p,
            out);
    /* A slug may look like a uuid; an organization's agent is nearer the user than a system one. */
    if (rc == BG_ERR_NOT_FOUND)
        rc = one_agent(c,
                       "SELECT " AGENT_COLS " FROM agents a WHERE a.slug = $2 AND " USABLE_WHERE
                       " AND (a.organization_id IS NULL OR ($1::uuid IS NOT NULL AND "
                       "a.organization_id IN (SELECT m.organization_id FROM memberships m "
                       "WHERE m.user_id = $1::uuid))) "
                       "ORDER BY a.organization_id IS NULL, a.created_at, a.id LIMIT 1",
                       2, p, out);
    if (rc != 0)
        return rc;
    if (!on_channel(out, channel))
        return BG_ERR_DENIED;
    st_access_t ac;
    rc = access_load(c, user_id, &ac);
    if (rc != 0)
        return rc;
    bool allowed = access_allows(&ac, out);
    access_dispose(&ac);
    return allowed ? 0 : BG_ERR_DENIED;
}

/* ---- prompts and who manages them ---- */

#define PROMPT_COLS                                                                                \
    "p.id, coalesce(p.organization_id::text, ''), p.name, p.description, "                         \
    "coalesce(p.current_version, 0), " TS("p.created_at") ", " TS("p.updated_at")

static void read_prompt(const PGresult *res, int row, bg_prompt_info_t *p)
{
    memset(p, 0, sizeof(*p));
    copy_field(res, row, 0, p->id, sizeof(p->id));
    copy_field(res, row, 1, p->organization_id, sizeof(p->organization_id));
    copy_field(res, row, 2, p->name, sizeof(p->name));
    copy_field(res, row, 3, p->description, sizeof(p->description));
    p->current_version = (int)int_field(res, row, 4);
    copy_field(res, row, 5, p->created_at, sizeof(p->created_at));
    copy_field(res, row, 6, p->updated_at, sizeof(p->updated_at));
}

void bg_prompt_list_dispose(bg_prompt_list_t *list)
{
    if (list == NULL)
        return;
    free(list->items);
    list->items = NULL;
    list->count = 0;
}

int bg_prompts_get(PGconn *c, const char *prompt_id, bg_prompt_info_t *out)
{
    if (!bg_id_uuid_is_valid(prompt_id))
        return BG_ERR_NOT_FOUND;
    const char *p[] = {prompt_id};
    PGresult *res;
    int rc = bg_pg_exec(c,
                        "SELECT " PROMPT_COLS " FROM prompts p WHERE p.id = $1 "
                        "AND p.deleted_at IS NULL",
                        1, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) == 0)
        rc = BG_ERR_NOT_FOUND;
    else
        read_prompt(res, 0, out);
    PQclear(res);
    return rc;
}

int bg_prompts_list(PGconn *c, bg_prompt_list_t *out)
{
    out->items = NULL;
    out->count = 0;
    PGresult *res;
    int rc = bg_pg_exec(c,
                        "SELECT " PROMPT_COLS " FROM prompts p WHERE p.deleted_at IS NULL "
                        "ORDER BY p.name, p.id LIMIT 1000",
                        0, NULL, &res);
    if (rc != 0)
        return rc;
    int n = PQntuples(res);
    if (n > 0) {
        out->items = bg_calloc((size_t)n, sizeof(*out->items));
        for (int i = 0; i < n; i++)
            read_prompt(res, i, &out->items[i]);
        out->count = (size_t)n;
    }
    PQclear(res);
    return 0;
}

int bg_agents_manager_load(PGconn *c, const char *user_id, bg_agent_manager_t *out)
{
    memset(out, 0, sizeof(*out));
    if (!bg_id_uuid_is_valid(user_id))
        return 0;
    const char *p[] = {user_id};
    PGresult *res;
    /* Row 0 says whether the user is a platform admin; the others are the organizations. */
    int rc = bg_pg_exec(c,
                        "SELECT 'admin', NULL FROM users u WHERE u.id = $1::uuid "
                        "AND u.role = 'admin' AND u.status = 'active' AND u.deleted_at IS NULL "
                        "UNION ALL (SELECT 'org', m.organization_id::text FROM memberships m "
                        "JOIN organizations o ON o.id = m.organization_id "
                        "JOIN users u ON u.id = m.user_id "
                        "WHERE m.user_id = $1::uuid AND m.role IN ('owner', 'admin') "
                        "AND NOT o.personal AND o.deleted_at IS NULL "
                        "AND u.status = 'active' AND u.deleted_at IS NULL ORDER BY 2 LIMIT 1000)",
                        1, p, &res);
    if (rc != 0)
        return rc;
    int n = PQntuples(res);
    if (n > 0)
        out->orgs = bg_calloc((size_t)n, sizeof(*out->orgs));
    for (int i = 0; i < n; i++) {
        if (strcmp(PQgetvalue(res, i, 0), "admin") == 0)
            out->platform_admin = true;
        else
            copy_field(res, i, 1, out->orgs[out->norgs++], BG_AGENT_ID_SIZE);
    }
    PQclear(res);
    return 0;
}

void bg_agents_manager_dispose(bg_agent_manager_t *m)
{
    if (m == NULL)
        return;
    free(m->orgs);
    m->orgs = NULL;
    m->norgs = 0;
}

bool bg_agents_manager_is_any(const bg_agent_manager_t *m)
{
    return m->platform_admin || m->norgs > 0;
}

bool bg_agents_manager_may(const bg_agent_manager_t *m, const char *organization_id)
{
    if (m->platform_admin)
        return true;
    if (organization_id == NULL || organization_id[0] == '\0')
        return false;
    for (size_t i = 0; i < m->norgs; i++) {
        if (strcasecmp(m->orgs[i], organization_id) == 0)
            return true;
    }
    return false;
}

/* ---- prompt versions ---- */

void bg_prompt_version_dispose(bg_prompt_version_t *v)
{
    if (v == NULL)
        return;
    free(v->definition);
    free(v->params);
    free(v->note);
    v->definition = NULL;
    v->params = NULL;
    v->note = NULL;
}

/* Runs a query expected to return at most one version row into out. */
static int one_version(PGconn *c, const char *sql, int n, const char *const *params,
                       bg_prompt_version_t *out)
{
    memset(out, 0, sizeof(*out));
    PGresult *res;
    int rc = bg_pg_exec(c, sql, n, params, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) == 0) {
        PQclear(res);
        return BG_ERR_NOT_FOUND;
    }
    copy_field(res, 0, 0, out->prompt_id, sizeof(out->prompt_id));
    out->version = (int)int_field(res, 0, 1);
    out->definition = bg_strdup(bg_pg_value(res, 0, 2));
    copy_field(res, 0, 3, out->model, sizeof(out->model));
    out->params = bg_strdup(bg_pg_value(res, 0, 4));
    out->note = bg_strdup(bg_pg_value(res, 0, 5));
    copy_field(res, 0, 6, out->created_at, sizeof(out->created_at));
    PQclear(res);
    return 0;
}

int bg_prompts_get_version(PGconn *c, const char *prompt_id, int version, bg_prompt_version_t *out)
{
    memset(out, 0, sizeof(*out));
    if (!bg_id_uuid_is_valid(prompt_id) || version < 0)
        return BG_ERR_NOT_FOUND;
    char v[16];
    (void)snprintf(v, sizeof(v), "%d", version);
    const char *p[] = {prompt_id, v};
    return one_version(c,
                       "SELECT " VERSION_COLS " FROM prompt_versions pv "
                       "JOIN prompts p ON p.id = pv.prompt_id "
                       "WHERE pv.prompt_id = $1 AND p.deleted_at IS NULL AND pv.version = "
                       "CASE WHEN $2::int = 0 THEN p.current_version ELSE $2::int END",
                       2, p, out);
}

int bg_agents_resolve_prompt(PGconn *c, const char *agent_id, bg_prompt_version_t *out)
{
    memset(out, 0, sizeof(*out));
    if (!bg_id_uuid_is_valid(agent_id))
        return BG_ERR_NOT_FOUND;
    const char *p[] = {agent_id};
    /* A deleted prompt still serves the agents that use it: its versions are history. */
    return one_version(c,
                       "SELECT " VERSION_COLS " FROM agents a "
                       "JOIN prompts p ON p.id = a.prompt_id "
                       "JOIN prompt_versions pv ON pv.prompt_id = a.prompt_id "
                       "AND pv.version = coalesce(a.prompt_version, p.current_version) "
                       "WHERE a.id = $1 AND a.deleted_at IS NULL",
                       1, p, out);
}

int bg_prompts_list_versions(PGconn *c, const char *prompt_id, int *versions, size_t max,
                             size_t *count)
{
    *count = 0;
    if (!bg_id_uuid_is_valid(prompt_id))
        return BG_ERR_NOT_FOUND;
    char lim[24];
    (void)snprintf(lim, sizeof(lim), "%zu", max);
    const char *p[] = {prompt_id, lim};
    PGresult *res;
    int rc = bg_pg_exec(c,
                        "SELECT pv.version FROM prompt_versions pv JOIN prompts p "
                        "ON p.id = pv.prompt_id WHERE pv.prompt_id = $1 AND p.deleted_at IS NULL "
                        "ORDER BY pv.version DESC LIMIT $2::bigint",
                        2, p, &res);
    if (rc != 0)
        return rc;
    int n = PQntuples(res);
    for (int i = 0; i < n && (size_t)i < max; i++)
        versions[i] = (int)int_field(res, i, 0);
    *count = (size_t)n;
    PQclear(res);
    return 0;
}

/* The texts stored with a version: definition, legacy defaults. */
typedef struct st_def_text {
    bg_buf_t def;
    bg_buf_t defaults;
} st_def_text_t;

static int def_text_build(st_def_text_t *t, const bg_prompt_t *def)
{
    bg_buf_init(&t->def, DEF_TEXT_MAX);
    bg_buf_init(&t->defaults, DEF_TEXT_MAX);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &t->def);
    bg_prompt_write_json(def, &w);
    int rc = bg_json_write_finish(&w);
    if (rc != 0)
        return rc;
    bg_json_writer_init(&w, &t->defaults);
    bg_prompt_write_defaults(def, &w);
    return bg_json_write_finish(&w);
}

static void def_text_dispose(st_def_text_t *t)
{
    bg_buf_dispose(&t->def);
    bg_buf_dispose(&t->defaults);
}

/* Audits action on a prompt with details {"version": version[, "from": from]}. */
static int audit_prompt(PGconn *c, const bg_actor_t *actor, const char *action,
                        const char *prompt_id, int version, int from)
{
    char details[64];
    if (from > 0)
        (void)snprintf(details, sizeof(details), "{\"version\":%d,\"from\":%d}", version, from);
    else
        (void)snprintf(details, sizeof(details), "{\"version\":%d}", version);
    return bg_acct_audit(c, actor, action, "prompt", prompt_id, details);
}

/* Inserts version (text) of a prompt from def; the caller holds a transaction. */
static int insert_version(PGconn *c, const char *prompt_id, const st_def_text_t *t,
                          const bg_prompt_t *def, const char *model, const char *params_json,
                          const char *note, const bg_actor_t *actor, int *version)
{
    const char *p[] = {
        prompt_id, bg_prompt_system(def), t->defaults.base, t->def.base, model, params_json,
        note,      creator(actor)};
    PGresult *res;
    int rc = bg_pg_exec(c,
                        "INSERT INTO prompt_versions (prompt_id, version, template, variables, "
                        "definition, model, params, note, created_by) "
                        "SELECT $1, coalesce(max(version), 0) + 1, $2, $3::jsonb, $4::jsonb, "
                        "nullif($5, ''), coalesce($6::jsonb, '{}'), coalesce($7, ''), $8::uuid "
                        "FROM prompt_versions WHERE prompt_id = $1 RETURNING version",
                        8, p, &res);
    if (rc != 0)
        return rc;
    *version = (int)int_field(res, 0, 0);
    PQclear(res);
    return 0;
}

/* Locks a live prompt row for the rest of the transaction. */
static int lock_prompt(PGconn *c, const char *prompt_id)
{
    const char *p[] = {prompt_id};
    PGresult *res;
    int rc = bg_pg_exec(c, "SELECT 1 FROM prompts WHERE id = $1 AND deleted_at IS NULL FOR UPDATE",
                        1, p, &res);
    if (rc != 0)
        return rc;
    rc = PQntuples(res) == 1 ? 0 : BG_ERR_NOT_FOUND;
    PQclear(res);
    return rc;
}

static int set_current(PGconn *c, const char *prompt_id, int version)
{
    char v[16];
    (void)snprintf(v, sizeof(v), "%d", version);
    const char *p[] = {prompt_id, v};
    return bg_pg_run(c, "UPDATE prompts SET current_version = $2::int WHERE id = $1", 2, p);
}

int bg_prompts_create(PGconn *c, const char *organization_id, const char *name,
                      const char *description, const bg_prompt_t *def, const bg_actor_t *actor,
                      char prompt_id[BG_AGENT_ID_SIZE])
{
    prompt_id[0] = '\0';
    if (organization_id != NULL && !bg_id_uuid_is_valid(organization_id))
        return BG_ERR_NOT_FOUND;
    st_def_text_t t;
    int rc = def_text_build(&t, def);
    if (rc != 0)
        goto err_dispose;
    rc = bg_pg_begin(c);
    if (rc != 0)
        goto err_dispose;
    const char *p[] = {organization_id, name, description, creator(actor)};
    PGresult *res;
    /* current_version 1 before version 1 exists: that foreign key is checked at COMMIT. */
    rc = bg_pg_exec(c,
                    "INSERT INTO prompts (organization_id, name, description, current_version, "
                    "created_by) VALUES ($1::uuid, $2, coalesce($3, ''), 1, $4::uuid) RETURNING id",
                    4, p, &res);
    if (rc != 0)
        goto err_rollback;
    copy_field(res, 0, 0, prompt_id, BG_AGENT_ID_SIZE);
    PQclear(res);
    int version = 0;
    rc = insert_version(c, prompt_id, &t, def, NULL, NULL, NULL, actor, &version);
    if (rc == 0)
        rc = audit_prompt(c, actor, "prompt.create", prompt_id, version, 0);
    if (rc == 0)
        rc = bg_pg_commit(c);
    if (rc != 0)
        goto err_rollback;
    def_text_dispose(&t);
    return 0;

err_rollback:
    bg_pg_rollback(c);
    prompt_id[0] = '\0';
err_dispose:
    def_text_dispose(&t);
    return rc;
}

int bg_prompts_publish(PGconn *c, const char *prompt_id, const bg_prompt_t *def, const char *model,
                       const char *params_json, const char *note, const bg_actor_t *actor,
                       int *version)
{
    *version = 0;
    if (!bg_id_uuid_is_valid(prompt_id))
        return BG_ERR_NOT_FOUND;
    st_def_text_t t;
    int rc = def_text_build(&t, def);
    if (rc != 0)
        goto err_dispose;
    rc = bg_pg_begin(c);
    if (rc != 0)
        goto err_dispose;
    rc = lock_prompt(c, prompt_id);
    if (rc == 0)
        rc = insert_version(c, prompt_id, &t, def, model, params_json, note, actor, version);
    if (rc == 0)
        rc = set_current(c, prompt_id, *version);
    if (rc == 0)
        rc = audit_prompt(c, actor, "prompt.publish", prompt_id, *version, 0);
    if (rc == 0)
        rc = bg_pg_commit(c);
    if (rc != 0)
        goto err_rollback;
    def_text_dispose(&t);
    return 0;

err_rollback:
    bg_pg_rollback(c);
    *version = 0;
err_dispose:
    def_text_dispose(&t);
    return rc;
}

int bg_prompts_rollback(PGconn *c, const char *prompt_id, int from, const bg_actor_t *actor,
                        int *version)
{
    *version = 0;
    if (!bg_id_uuid_is_valid(prompt_id) || from < 1)
        return BG_ERR_NOT_FOUND;
    int rc = bg_pg_begin(c);
    if (rc != 0)
        return rc;
    rc = lock_prompt(c, prompt_id);
    if (rc != 0)
        goto err_rollback;
    char f[16];
    (void)snprintf(f, sizeof(f), "%d", from);
    const char *p[] = {prompt_id, f, creator(actor)};
    PGresult *res;
    rc = bg_pg_exec(c,
                    "INSERT INTO prompt_versions (prompt_id, version, template, variables, "
                    "definition, model, params, note, created_by) "
                    "SELECT pv.prompt_id, (SELECT max(version) + 1 FROM prompt_versions "
                    "WHERE prompt_id = $1), pv.template, pv.variables, pv.definition, pv.model, "
                    "pv.params, 'rollback to v' || pv.version, $3::uuid "
                    "FROM prompt_versions pv WHERE pv.prompt_id = $1 AND pv.version = $2::int "
                    "RETURNING version",
                    3, p, &res);
    if (rc != 0)
        goto err_rollback;
    if (PQntuples(res) == 0) {
        PQclear(res);
        rc = BG_ERR_NOT_FOUND;
        goto err_rollback;
    }
    *version = (int)int_field(res, 0, 0);
    PQclear(res);
    rc = set_current(c, prompt_id, *version);
    if (rc == 0)
        rc = audit_prompt(c, actor, "prompt.rollback", prompt_id, *version, from);
    if (rc == 0)
        rc = bg_pg_commit(c);
    if (rc != 0)
        goto err_rollback;
    return 0;

err_rollback:
    bg_pg_rollback(c);
    *version = 0;
    return rc;
}

/* ---- agents: writing ---- */

void bg_agent_spec_init(bg_agent_spec_t *spec)
{
    memset(spec, 0, sizeof(*spec));
    spec->prompt_version = -1;
    spec->temperature = -1;
    spec->max_tokens = 0;
    spec->cache_enabled = -1;
    spec->cache_ttl_s = 0;
    spec->channels = 0;
}

/* [a-z0-9][a-z0-9-]{0,62} */
static bool slug_ok(const char *s)
{
    size_t len = strlen(s);
    if (len == 0 || len > 63 || s[0] == '-')
        return false;
    for (size_t i = 0; i < len; i++) {
        char ch = s[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '-'))
            return false;
    }
    return true;
}

/* [a-z0-9_.-]{0,64} */
static bool provider_ok(const char *s)
{
    size_t len = strlen(s);
    if (len > 64)
        return false;
    for (size_t i = 0; i < len; i++) {
        char ch = s[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_' || ch == '.' ||
              ch == '-'))
            return false;
    }
    return true;
}

static bool one_of(const char *s, const char *a, const char *b, const char *c)
{
    return strcmp(s, a) == 0 || strcmp(s, b) == 0 || (c != NULL && strcmp(s, c) == 0);
}

/* Checks the fields spec sets; creating: slug and name are required. */
static int check_spec(const bg_agent_spec_t *s, bool creating, bg_prompt_err_t *err)
{
    if (creating && s->organization_id != NULL && !bg_id_uuid_is_valid(s->organization_id))
        return verr(err, "organization_id", "must be a uuid");
    if (creating && s->slug == NULL)
        return verr(err, "slug", "is required");
    if (s->slug != NULL && !slug_ok(s->slug))
        return verr(err, "slug", "must match [a-z0-9][a-z0-9-]{0,62}");
    if (creating && s->name == NULL)
        return verr(err, "name", "is required");
    if (s->name != NULL && (s->name[0] == '\0' || bg_utf8_chars(s->name) > 200))
        return verr(err, "name", "must have 1 to 200 characters");
    if (s->description != NULL && bg_utf8_chars(s->description) > 2000)
        return verr(err, "description", "must have at most 2000 characters");
    if (s->model != NULL && strlen(s->model) >= BG_AGENT_MODEL_SIZE)
        return verr(err, "model", "must have at most 256 bytes");
    if (s->provider != NULL && !provider_ok(s->provider))
        return verr(err, "provider", "must match [a-z0-9_.-]{0,64}");
    if (s->prompt_id != NULL && s->prompt_id[0] != '\0' && !bg_id_uuid_is_valid(s->prompt_id))
        return verr(err, "prompt_id", "must be a uuid");
    if (s->prompt_version > 0 && s->prompt_id != NULL && s->prompt_id[0] == '\0')
        return verr(err, "prompt_version", "needs a prompt");
    if (s->temperature >= 0 && !(s->temperature <= 2.0))
        return verr(err, "temperature", "must be a number from 0 to 2");
    if (isnan(s->temperature))
        return verr(err, "temperature", "must be a number from 0 to 2");
    if (s->max_tokens > BG_AGENT_MAX_TOKENS_MAX)
        return verr(err, "max_tokens", "must be an integer from 1 to 1000000");
    if (s->memory != NULL) {
        const bg_memory_policy_t *m = s->memory;
        if (m->kind == BG_MEMORY_LAST_TURNS) {
            if (m->limit < 0 || m->limit > BG_PROMPT_LAST_TURNS_MAX)
                return verr(err, "memory.last_turns", "must be an integer from 0 to 1000");
        } else if (m->kind == BG_MEMORY_TOKEN_BUDGET) {
            if (m->limit < 1 || m->limit > BG_PROMPT_TOKEN_BUDGET_MAX)
                return verr(err, "memory.token_budget", "must be an integer from 1 to 10000000");
        } else {
            return verr(err, "memory", "must be last_turns or token_budget");
        }
    }
    if (s->cache_enabled > 1)
        return verr(err, "cache_enabled", "must be a boolean");
    if (s->cache_ttl_s > BG_AGENT_CACHE_TTL_MAX)
        return verr(err, "cache_ttl_s", "must be an integer from 1 to 2592000");
    if ((s->channels & ~(unsigned)BG_AGENT_CHANNEL_ALL) != 0)
        return verr(err, "channels", "must be web, telegram or api");
    if (s->visibility != NULL && !one_of(s->visibility, "private", "organization", "public"))
        return verr(err, "visibility", "must be private, organization or public");
    if (s->status != NULL && !one_of(s->status, "active", "disabled", NULL))
        return verr(err, "status", "must be active or disabled");
    return 0;
}

/*
 * Checks that prompt_id is a live prompt the agent may use: a system prompt, or one of the agent's
 * organization (org_id NULL: a system agent, which may use system prompts only).
 */
static int check_prompt_owner(PGconn *c, const char *prompt_id, const char *org_id,
                              bg_prompt_err_t *err)
{
    const char *p[] = {prompt_id, org_id};
    PGresult *res;
    int rc = bg_pg_exec(c,
                        "SELECT 1 FROM prompts WHERE id = $1 AND deleted_at IS NULL "
                        "AND (organization_id IS NULL OR organization_id = $2::uuid)",
                        2, p, &res);
    if (rc != 0)
        return rc;
    rc = PQntuples(res) == 1 ? 0 : verr(err, "prompt_id", "is not a prompt this agent may use");
    PQclear(res);
    return rc;
}

/* Maps a refusal of the database to the field it is about. */
static int db_refusal(int rc, const bg_pg_error_t *e, bg_prompt_err_t *err)
{
    if (rc == BG_ERR_CONFLICT) {
        (void)verr(err, "slug", "is taken");
        return BG_ERR_CONFLICT;
    }
    if (rc != BG_ERR_INVALID)
        return rc;
    if (strstr(e->constraint, "prompt_version") != NULL ||
        strcmp(e->constraint, "agents_check") == 0)
        return verr(err, "prompt_version", "is not a version of the agent's prompt");
    if (strstr(e->constraint, "prompt_id") != NULL)
        return verr(err, "prompt_id", "is not a prompt");
    if (strstr(e->constraint, "organization") != NULL)
        return verr(err, "organization_id", "is not an organization");
    return verr(err, "agent", "was refused by the database");
}

/* The params object for the fields spec sets ("{}" when none) into buf. */
static int params_json(const bg_agent_spec_t *s, bg_buf_t *buf)
{
    bg_json_writer_t w;
    bg_json_writer_init(&w, buf);
    bg_json_write_begin_object(&w);
    if (s->temperature >= 0) {
        bg_json_write_key(&w, "temperature");
        bg_json_write_double(&w, s->temperature);
    }
    if (s->max_tokens > 0)
        bg_json_write_field_int(&w, "max_tokens", s->max_tokens);
    bg_json_write_end_object(&w);
    return bg_json_write_finish(&w);
}

static int memory_json(const bg_memory_policy_t *m, bg_buf_t *buf)
{
    bg_json_writer_t w;
    bg_json_writer_init(&w, buf);
    bg_prompt_memory_write(m, &w);
    return bg_json_write_finish(&w);
}

/* Text parameters of an agent write shared by create and update. */
typedef struct st_agent_params {
    bg_buf_t params, memory;
    char version[16], cache[8], ttl[16], channels[32];
} st_agent_params_t;

static int agent_params_build(st_agent_params_t *ap, const bg_agent_spec_t *s)
{
    bg_buf_init(&ap->params, 256);
    bg_buf_init(&ap->memory, 256);
    ap->version[0] = ap->cache[0] = ap->ttl[0] = ap->channels[0] = '\0';
    int rc = params_json(s, &ap->params);
    if (rc == 0 && s->memory != NULL)
        rc = memory_json(s->memory, &ap->memory);
    if (s->prompt_version >= 0)
        (void)snprintf(ap->version, sizeof(ap->version), "%d", s->prompt_version);
    else if (s->prompt_id != NULL)
        (void)bg_strlcpy(ap->version, "0", sizeof(ap->version)); /* a new prompt: follow it */
    if (s->cache_enabled >= 0)
        (void)bg_strlcpy(ap->cache, s->cache_enabled > 0 ? "true" : "false", sizeof(ap->cache));
    if (s->cache_ttl_s > 0)
        (void)snprintf(ap->ttl, sizeof(ap->ttl), "%d", s->cache_ttl_s);
    if (s->channels != 0)
        channels_csv(s->channels, ap->channels);
    return rc;
}

static void agent_params_dispose(st_agent_params_t *ap)
{
    bg_buf_dispose(&ap->params);
    bg_buf_dispose(&ap->memory);
}

static const char *nonempty(const char *s)
{
    return s != NULL && s[0] != '\0' ? s : NULL;
}

/* Audits action on an agent with one string detail. */
static int audit_agent(PGconn *c, const bg_actor_t *actor, const char *action, const bg_agent_t *a,
                       const char *details)
{
    return bg_acct_audit(c, actor, action, "agent", a->id, details);
}

int bg_agents_create(PGconn *c, const bg_agent_spec_t *spec, const bg_actor_t *actor,
                     bg_agent_t *out, bg_prompt_err_t *err)
{
    int rc = check_spec(spec, true, err);
    if (rc != 0)
        return rc;
    st_agent_params_t ap;
    rc = agent_params_build(&ap, spec);
    if (rc != 0)
        goto err_dispose;
    const char *prompt_id = nonempty(spec->prompt_id);
    if (prompt_id != NULL) {
        rc = check_prompt_owner(c, prompt_id, spec->organization_id, err);
        if (rc != 0)
            goto err_dispose;
    }
    rc = bg_pg_begin(c);
    if (rc != 0)
        goto err_dispose;
    const char *p[] = {spec->organization_id,
                       spec->slug,
                       spec->name,
                       spec->description,
                       spec->model,
                       spec->provider,
                       prompt_id,
                       nonempty(ap.version),
                       ap.params.base,
                       spec->memory != NULL ? ap.memory.base : NULL,
                       nonempty(ap.cache),
                       nonempty(ap.ttl),
                       nonempty(ap.channels),
                       spec->visibility,
                       spec->status,
                       creator(actor)};
    PGresult *res;
    bg_pg_error_t e;
    rc = bg_pg_exec_ex(c,
                       "INSERT INTO agents AS a (organization_id, slug, name, description, model, "
                       "provider, prompt_id, prompt_version, params, memory, cache_enabled, "
                       "cache_ttl_s, channels, visibility, status, created_by) "
                       "VALUES ($1::uuid, $2, $3, coalesce($4, ''), coalesce($5, ''), "
                       "coalesce($6, ''), $7::uuid, nullif($8::int, 0), $9::jsonb, "
                       "coalesce($10::jsonb, '{\"last_turns\": 20}'), "
                       "coalesce($11::boolean, false), coalesce($12::int, 3600), "
                       "coalesce(string_to_array($13, ','), '{web}'), "
                       "coalesce($14, 'private'), coalesce($15, 'active'), $16::uuid) "
                       "RETURNING " AGENT_COLS,
                       16, p, &res, &e);
    if (rc != 0) {
        rc = db_refusal(rc, &e, err);
        goto err_rollback;
    }
    read_agent(res, 0, out);
    PQclear(res);
    {
        char details[160];
        (void)snprintf(details, sizeof(details), "{\"slug\":\"%s\"}", out->slug);
        rc = audit_agent(c, actor, "agent.create", out, details);
    }
    if (rc == 0)
        rc = bg_pg_commit(c);
    if (rc != 0)
        goto err_rollback;
    agent_params_dispose(&ap);
    return 0;

err_rollback:
    bg_pg_rollback(c);
err_dispose:
    agent_params_dispose(&ap);
    return rc;
}

/* Writes {"fields":[…]} naming what spec sets into buf. Returns the number of fields. */
static size_t changed_fields(const bg_agent_spec_t *s, bg_buf_t *buf)
{
    const struct {
        const char *name;
        bool set;
    } f[] = {
        {"slug", s->slug != NULL},
        {"name", s->name != NULL},
        {"description", s->description != NULL},
        {"model", s->model != NULL},
        {"provider", s->provider != NULL},
        {"prompt_id", s->prompt_id != NULL},
        {"prompt_version", s->prompt_version >= 0},
        {"temperature", s->temperature >= 0},
        {"max_tokens", s->max_tokens > 0},
        {"memory", s->memory != NULL},
        {"cache_enabled", s->cache_enabled >= 0},
        {"cache_ttl_s", s->cache_ttl_s > 0},
        {"channels", s->channels != 0},
        {"visibility", s->visibility != NULL},
        {"status", s->status != NULL},
    };
    size_t n = 0;
    bg_json_writer_t w;
    bg_json_writer_init(&w, buf);
    bg_json_write_begin_object(&w);
    bg_json_write_key(&w, "fields");
    bg_json_write_begin_array(&w);
    for (size_t i = 0; i < BG_ARRAY_SIZE(f); i++) {
        if (f[i].set) {
            bg_json_write_str(&w, f[i].name);
            n++;
        }
    }
    bg_json_write_end_array(&w);
    bg_json_write_end_object(&w);
    if (bg_json_write_finish(&w) != 0)
        return 0;
    return n;
}

int bg_agents_update(PGconn *c, const char *agent_id, const bg_agent_spec_t *spec,
                     const bg_actor_t *actor, bg_agent_t *out, bg_prompt_err_t *err)
{
    if (!bg_id_uuid_is_valid(agent_id))
        return BG_ERR_NOT_FOUND;
    int rc = check_spec(spec, false, err);
    if (rc != 0)
        return rc;
    bg_buf_t details;
    bg_buf_init(&details, DETAILS_MAX);
    st_agent_params_t ap;
    rc = agent_params_build(&ap, spec);
    if (rc != 0)
        goto err_dispose;
    if (changed_fields(spec, &details) == 0) {
        rc = bg_agents_get(c, agent_id, out);
        goto out_dispose;
    }
    rc = bg_pg_begin(c);
    if (rc != 0)
        goto err_dispose;
    /* Lock the row and learn its organization, which decides which prompts it may use. */
    const char *pid[] = {agent_id};
    PGresult *res;
    rc = bg_pg_exec(c,
                    "SELECT coalesce(organization_id::text, '') FROM agents "
                    "WHERE id = $1 AND deleted_at IS NULL FOR UPDATE",
                    1, pid, &res);
    if (rc != 0)
        goto err_rollback;
    if (PQntuples(res) == 0) {
        PQclear(res);
        rc = BG_ERR_NOT_FOUND;
        goto err_rollback;
    }
    char org[BG_AGENT_ID_SIZE];
    copy_field(res, 0, 0, org, sizeof(org));
    PQclear(res);
    const char *prompt_id = spec->prompt_id;
    if (nonempty(prompt_id) != NULL) {
        rc = check_prompt_owner(c, prompt_id, nonempty(org), err);
        if (rc != 0)
            goto err_rollback;
    }
    bool params_set = spec->temperature >= 0 || spec->max_tokens > 0;
    const char *p[] = {agent_id,
                       spec->slug,
                       spec->name,
                       spec->description,
                       spec->model,
                       spec->provider,
                       prompt_id,
                       nonempty(ap.version),
                       params_set ? ap.params.base : NULL,
                       spec->memory != NULL ? ap.memory.base : NULL,
                       nonempty(ap.cache),
                       nonempty(ap.ttl),
                       nonempty(ap.channels),
                       spec->visibility,
                       spec->status};
    bg_pg_error_t e;
    rc = bg_pg_exec_ex(
        c,
        "UPDATE agents a SET slug = coalesce($2, a.slug), name = coalesce($3, a.name), "
        "description = coalesce($4, a.description), model = coalesce($5, a.model), "
        "provider = coalesce($6, a.provider), "
        "prompt_id = CASE WHEN $7::text IS NULL THEN a.prompt_id "
        "ELSE nullif($7, '')::uuid END, "
        "prompt_version = CASE WHEN $8::int IS NULL THEN a.prompt_version "
        "ELSE nullif($8::int, 0) END, "
        "params = a.params || coalesce($9::jsonb, '{}'), "
        "memory = coalesce($10::jsonb, a.memory), "
        "cache_enabled = coalesce($11::boolean, a.cache_enabled), "
        "cache_ttl_s = coalesce($12::int, a.cache_ttl_s), "
        "channels = coalesce(string_to_array($13, ','), a.channels), "
        "visibility = coalesce($14, a.visibility), status = coalesce($15, a.status) "
        "WHERE a.id = $1 AND a.deleted_at IS NULL RETURNING " AGENT_COLS,
        15, p, &res, &e);
    if (rc != 0) {
        rc = db_refusal(rc, &e, err);
        goto err_rollback;
    }
    if (PQntuples(res) == 0) {
        PQclear(res);
        rc = BG_ERR_NOT_FOUND;
        goto err_rollback;
    }
    read_agent(res, 0, out);
    PQclear(res);
    rc = audit_agent(c, actor, "agent.update", out, details.base);
    if (rc == 0)
        rc = bg_pg_commit(c);
    if (rc != 0)
        goto err_rollback;
out_dispose:
    agent_params_dispose(&ap);
    bg_buf_dispose(&details);
    return rc;

err_rollback:
    bg_pg_rollback(c);
err_dispose:
    agent_params_dispose(&ap);
    bg_buf_dispose(&details);
    return rc;
}

int bg_agents_delete(PGconn *c, const char *agent_id, const bg_actor_t *actor)
{
    if (!bg_id_uuid_is_valid(agent_id))
        return BG_ERR_NOT_FOUND;
    int rc = bg_pg_begin(c);
    if (rc != 0)
        return rc;
    const char *p[] = {agent_id};
    PGresult *res;
    rc = bg_pg_exec(
        c,
        "UPDATE agents a SET deleted_at = now() WHERE a.id = $1 AND a.deleted_at IS NULL "
        "RETURNING " AGENT_COLS,
        1, p, &res);
    if (rc != 0)
        goto err_rollback;
    if (PQntuples(res) == 0) {
        PQclear(res);
        rc = BG_ERR_NOT_FOUND;
        goto err_rollback;
    }
    bg_agent_t a;
    read_agent(res, 0, &a);
    PQclear(res);
    char details[160];
    (void)snprintf(details, sizeof(details), "{\"slug\":\"%s\"}", a.slug);
    rc = audit_agent(c, actor, "agent.delete", &a, details);
    if (rc == 0)
        rc = bg_pg_commit(c);
    if (rc != 0)
        goto err_rollback;
    return 0;

err_rollback:
    bg_pg_rollback(c);
    return rc;
}
