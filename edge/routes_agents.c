/*
 * /admin/agents and /admin/prompts: managing agents and their versioned prompts, and previewing
 * what a prompt renders to without calling a model.
 *
 * Who may do what is decided on the pool thread from Postgres (bg_agents_manager_load), not from
 * the token: platform admins manage everything; owners and admins of an organization manage that
 * organization's agents and prompts. The routes therefore only require a signed-in user, and a
 * caller who manages nothing gets 403 on every one of them. Another organization's agent or prompt
 * answers 404, as if it did not exist. System prompts (no organization) are readable by every
 * manager, because organization agents may use them, but only platform admins change them (403).
 *
 * Bodies are parsed here with every field's type checked, so a bad value is a 422 naming it; the
 * values themselves (slug syntax, ranges, the prompt definition's schema) are checked by the agents
 * and prompt modules, and their refusals are mapped back to the field they name. Rendering is
 * strict: a missing required variable or an unknown one is a 422 whose field is
 * "variables.<name>". Every change is audited by the agents module with the caller as actor.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/accounts.h"
#include "bg/agents.h"
#include "bg/err.h"
#include "bg/id.h"
#include "bg/json.h"
#include "bg/pg.h"
#include "bg/prompt.h"
#include "bg/validate.h"
#include "edge.h"

#define LIST_CAP (32u << 20)
#define ONE_CAP (4u << 20)
#define PROMPT_BODY_MAX (BG_PROMPT_DEF_MAX + 64 * 1024)
#define AGENT_BODY_MAX 65536
#define PARAMS_MAX 16384
#define VERSIONS_MAX 1000

/* What went wrong, when rc is BG_ERR_INVALID or BG_ERR_CONFLICT. */
typedef enum st_err_kind {
    ERR_NONE = 0,
    ERR_FIELD,  /* field and reason (a catalogue suffix) set by this file */
    ERR_MODULE, /* perr from the agents or prompt module: field as the API names it */
    ERR_RENDER, /* perr from rendering: field is a variable's name */
} err_kind_t;

typedef struct st_agents_op {
    const bg_config_t *cfg;
    char user_id[64], request_id[EDGE_REQUEST_ID_LEN + 1], ip[64];
    const char *locale; /* static, from i18n */
    char *id;           /* owned; the path's {id} */
    int rc;
    err_kind_t err_kind;
    const char *err_field, *err_reason; /* ERR_FIELD: static strings */
    bg_prompt_err_t perr;
    bool platform_admin;
    /* input */
    bg_agent_spec_t spec; /* strings borrowed from er->body_doc (alive until done) */
    bg_memory_policy_t memory;
    bg_prompt_t *def;            /* owned */
    char *name, *description;    /* owned (prompts) */
    char *org_id;                /* owned; the organization a new agent or prompt belongs to */
    char *model, *params, *note; /* owned (publish) */
    int version;                 /* rollback source, preview version, or ?version= (0: current) */
    const bg_json_t *vars;       /* borrowed from er->body_doc */
    const char *message;         /* borrowed from er->body_doc */
    size_t message_len;
    /* output */
    bg_agent_t agent;
    bg_agent_list_t agents;
    bg_prompt_info_t prompt;
    bg_prompt_list_t prompts;
    bg_prompt_version_t pv;
    int versions[VERSIONS_MAX];
    size_t nversions;
    bg_buf_t rendered;
} agents_op_t;

static void op_free(void *p)
{
    agents_op_t *op = p;
    free(op->id);
    bg_prompt_free(op->def);
    free(op->name);
    free(op->description);
    free(op->org_id);
    free(op->model);
    free(op->params);
    free(op->note);
    bg_agent_list_dispose(&op->agents);
    bg_prompt_list_dispose(&op->prompts);
    bg_prompt_version_dispose(&op->pv);
    bg_buf_dispose(&op->rendered);
    free(op);
}

static agents_op_t *op_new(edge_req_t *er)
{
    agents_op_t *op = bg_calloc(1, sizeof(*op));
    op->cfg = er->thread->server->cfg;
    bg_strlcpy(op->user_id, er->auth.user_id, sizeof(op->user_id));
    memcpy(op->request_id, er->request_id, sizeof(op->request_id));
    edge_peer_ip(er, op->ip, sizeof(op->ip));
    op->locale = er->locale;
    if (er->nparams > 0)
        op->id = bg_strndup(er->params[0].base, er->params[0].len);
    bg_agent_spec_init(&op->spec);
    bg_buf_init(&op->rendered, BG_PROMPT_OUTPUT_MAX + 1);
    er->data = op;
    er->data_free = op_free;
    return op;
}

static bg_actor_t actor_of(const agents_op_t *op)
{
    bg_actor_t a = {op->platform_admin ? "admin" : "user", op->user_id, op->request_id,
                    op->ip[0] != '\0' ? op->ip : NULL};
    return a;
}

static void field_error(agents_op_t *op, int rc, const char *field, const char *reason)
{
    op->rc = rc;
    op->err_kind = ERR_FIELD;
    op->err_field = field;
    op->err_reason = reason;
}

/*
 * On the pool: the connection, with what the caller manages loaded into mgr (dispose it). NULL
 * with op->rc set when Postgres is down or the caller manages nothing (BG_ERR_DENIED).
 */
static PGconn *manager_db(agents_op_t *op, bg_agent_manager_t *mgr)
{
    memset(mgr, 0, sizeof(*mgr));
    PGconn *c = edge_pg(op->cfg, NULL, &op->rc);
    if (c == NULL)
        return NULL;
    if ((op->rc = bg_agents_manager_load(c, op->user_id, mgr)) != 0)
        return NULL;
    op->platform_admin = mgr->platform_admin;
    if (!bg_agents_manager_is_any(mgr)) {
        op->rc = BG_ERR_DENIED;
        return NULL;
    }
    return c;
}

/* The catalogue suffix for a module's reason text (bg_prompt_err_t.reason). */
static const char *reason_code(const char *reason)
{
    if (reason == NULL)
        return "invalid_value";
    if (strcmp(reason, "is required") == 0)
        return "missing";
    if (strncmp(reason, "is not a known field", 20) == 0 ||
        strcmp(reason, "is not a declared variable") == 0)
        return "unknown_field";
    static const char *const types[] = {"must be a string",  "must be a number",
                                        "must be a boolean", "must be an object",
                                        "must be an array",  "must be a JSON object"};
    for (size_t i = 0; i < BG_ARRAY_SIZE(types); i++) {
        if (strcmp(reason, types[i]) == 0)
            return "wrong_type";
    }
    return "invalid_value";
}

/* Answers a failed operation; returns false when there is nothing to answer for. */
static bool failed(edge_req_t *er, const agents_op_t *op)
{
    if (op->rc == 0 && er->req != NULL)
        return false;
    if (er->req == NULL)
        return true;
    if (op->err_kind == ERR_FIELD && (op->rc == BG_ERR_INVALID || op->rc == BG_ERR_NOT_FOUND)) {
        edge_invalid_field(er, op->err_field, op->err_reason, NULL);
        return true;
    }
    if (op->err_kind == ERR_MODULE && op->rc == BG_ERR_CONFLICT) {
        char details[192];
        snprintf(details, sizeof(details), "{\"field\":\"%s\",\"reason\":\"taken\"}",
                 op->perr.field[0] != '\0' ? op->perr.field : "slug");
        edge_error(er, "conflict", details, NULL, 0);
        return true;
    }
    if ((op->err_kind == ERR_MODULE && op->rc == BG_ERR_INVALID) ||
        (op->err_kind == ERR_RENDER && op->rc == BG_ERR_INVALID)) {
        char field[128];
        const char *f = op->perr.field[0] != '\0' ? op->perr.field : "body";
        if (op->err_kind == ERR_RENDER)
            snprintf(field, sizeof(field), "variables.%s", f);
        else
            bg_strlcpy(field, f, sizeof(field));
        edge_invalid_field(er, field, reason_code(op->perr.reason), NULL);
        return true;
    }
    edge_fail(er, op->rc);
    return true;
}

/* ---- writing answers ---- */

static void write_str_or_null(bg_json_writer_t *w, const char *key, const char *s)
{
    if (s[0] != '\0')
        bg_json_write_field_str(w, key, s);
    else
        bg_json_write_field_null(w, key);
}

static void write_agent(bg_json_writer_t *w, const bg_agent_t *a)
{
    bg_json_write_begin_object(w);
    bg_json_write_field_str(w, "id", a->id);
    write_str_or_null(w, "organization_id", a->organization_id);
    bg_json_write_field_str(w, "slug", a->slug);
    bg_json_write_field_str(w, "name", a->name);
    bg_json_write_field_str(w, "description", a->description);
    bg_json_write_field_str(w, "model", a->model);
    bg_json_write_field_str(w, "provider", a->provider);
    write_str_or_null(w, "prompt_id", a->prompt_id);
    if (a->prompt_version > 0)
        bg_json_write_field_int(w, "prompt_version", a->prompt_version);
    else
        bg_json_write_field_null(w, "prompt_version");
    bg_json_write_key(w, "temperature");
    if (a->temperature >= 0)
        bg_json_write_double(w, a->temperature);
    else
        bg_json_write_null(w);
    if (a->max_tokens > 0)
        bg_json_write_field_int(w, "max_tokens", a->max_tokens);
    else
        bg_json_write_field_null(w, "max_tokens");
    bg_json_write_key(w, "memory");
    bg_prompt_memory_write(&a->memory, w);
    bg_json_write_field_bool(w, "cache_enabled", a->cache_enabled);
    bg_json_write_field_int(w, "cache_ttl_s", a->cache_ttl_s);
    bg_json_write_key(w, "channels");
    bg_json_write_begin_array(w);
    static const char *const names[] = {"web", "telegram", "api"};
    for (size_t i = 0; i < BG_ARRAY_SIZE(names); i++) {
        if ((a->channels & (1u << i)) != 0)
            bg_json_write_str(w, names[i]);
    }
    bg_json_write_end_array(w);
    bg_json_write_field_str(w, "visibility", a->visibility);
    bg_json_write_field_str(w, "status", a->status);
    bg_json_write_field_str(w, "created_at", a->created_at);
    bg_json_write_field_str(w, "updated_at", a->updated_at);
    bg_json_write_end_object(w);
}

static void respond_agent(edge_req_t *er, int status, const bg_agent_t *a)
{
    bg_buf_t out;
    bg_buf_init(&out, ONE_CAP);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    write_agent(&w, a);
    edge_respond_writer(er, status, &w, &out);
}

/* Writes stored JSON text (our own) as a nested value; {} if it does not parse. */
static void write_json_text(bg_json_writer_t *w, const char *text)
{
    bg_json_doc_t *doc = NULL;
    const char *desc;
    size_t off;
    if (text != NULL && bg_json_parse(text, strlen(text), NULL, &doc, &desc, &off) == 0) {
        bg_json_write_value(w, bg_json_root(doc));
    } else {
        bg_json_write_begin_object(w);
        bg_json_write_end_object(w);
    }
    bg_json_doc_free(doc);
}

/* Writes the members of a prompt object (the caller opens and closes it). */
static void write_prompt_fields(bg_json_writer_t *w, const bg_prompt_info_t *p)
{
    bg_json_write_field_str(w, "id", p->id);
    write_str_or_null(w, "organization_id", p->organization_id);
    bg_json_write_field_str(w, "name", p->name);
    bg_json_write_field_str(w, "description", p->description);
    if (p->current_version > 0)
        bg_json_write_field_int(w, "current_version", p->current_version);
    else
        bg_json_write_field_null(w, "current_version");
    bg_json_write_field_str(w, "created_at", p->created_at);
    bg_json_write_field_str(w, "updated_at", p->updated_at);
}

/* A prompt with one version in full and the numbers of all its versions, newest first. */
static void respond_prompt_detail(edge_req_t *er, int status, const agents_op_t *op)
{
    bg_buf_t out;
    bg_buf_init(&out, ONE_CAP);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    bg_json_write_begin_object(&w);
    write_prompt_fields(&w, &op->prompt);
    bg_json_write_key(&w, "version");
    bg_json_write_begin_object(&w);
    bg_json_write_field_int(&w, "version", op->pv.version);
    bg_json_write_key(&w, "definition");
    write_json_text(&w, op->pv.definition);
    write_str_or_null(&w, "model", op->pv.model);
    bg_json_write_key(&w, "params");
    write_json_text(&w, op->pv.params);
    bg_json_write_field_str(&w, "note", op->pv.note != NULL ? op->pv.note : "");
    bg_json_write_field_str(&w, "created_at", op->pv.created_at);
    bg_json_write_end_object(&w);
    bg_json_write_key(&w, "versions");
    bg_json_write_begin_array(&w);
    for (size_t i = 0; i < op->nversions && i < VERSIONS_MAX; i++)
        bg_json_write_int(&w, op->versions[i]);
    bg_json_write_end_array(&w);
    bg_json_write_end_object(&w);
    edge_respond_writer(er, status, &w, &out);
}

/* ---- reading bodies ---- */

/* Parses the request's JSON object body (kept in er->body_doc); answers and returns NULL if bad. */
static const bg_json_t *body_root(edge_req_t *er, const char *const *known, size_t nknown)
{
    h2o_req_t *req = er->req;
    bg_json_doc_t *doc = NULL;
    const char *desc;
    size_t off = 0;
    const char *text = req->entity.base != NULL ? req->entity.base : "";
    bg_json_limits_t lim = bg_json_default_limits;
    lim.max_bytes = PROMPT_BODY_MAX;
    int rc = req->entity.len == 0 ? bg_json_parse("{}", 2, &lim, &doc, &desc, &off)
                                  : bg_json_parse(text, req->entity.len, &lim, &doc, &desc, &off);
    if (rc != 0) {
        if (rc == BG_ERR_TOO_LARGE) {
            edge_error(er, "payload_too_large", NULL, NULL, 0);
            return NULL;
        }
        char details[64];
        snprintf(details, sizeof(details), "{\"offset\":%zu}", off);
        edge_error(er, "malformed_json", details, NULL, 0);
        return NULL;
    }
    er->body_doc = doc;
    const bg_json_t *root = bg_json_root(doc);
    if (!bg_json_is_object(root)) {
        edge_error(er, "malformed_json", NULL, NULL, 0);
        return NULL;
    }
    for (size_t i = 0; i < bg_json_len(root); i++) {
        const char *key;
        (void)bg_json_member(root, i, &key);
        bool ok = false;
        for (size_t k = 0; k < nknown && !ok; k++)
            ok = strcmp(key, known[k]) == 0;
        if (!ok) {
            edge_invalid_field(er, key, "unknown_field", NULL);
            return NULL;
        }
    }
    return root;
}

/*
 * Reads string member key: *out stays NULL when absent (or null with nullable, then *was_null).
 * Answers 422 and returns false for another type, or a required member that is absent.
 */
static bool get_str(edge_req_t *er, const bg_json_t *root, const char *key, bool required,
                    const char **out, bool *was_null)
{
    *out = NULL;
    if (was_null != NULL)
        *was_null = false;
    const bg_json_t *v = bg_json_find(root, key);
    if (v == NULL || (was_null != NULL && bg_json_type(v) == BG_JSON_NULL)) {
        if (v != NULL)
            *was_null = true;
        if (required) {
            edge_invalid_field(er, key, "missing", NULL);
            return false;
        }
        return true;
    }
    size_t len;
    if ((*out = bg_json_str(v, &len)) == NULL) {
        edge_invalid_field(er, key, "wrong_type", NULL);
        return false;
    }
    return true;
}

/* Reads an integer member in [min, max] into *out (unchanged when absent or null). */
static bool get_int(edge_req_t *er, const bg_json_t *root, const char *key, int64_t min,
                    int64_t max, int64_t *out)
{
    const bg_json_t *v = bg_json_find(root, key);
    if (v == NULL || bg_json_type(v) == BG_JSON_NULL)
        return true;
    int64_t n;
    if (!bg_json_int(v, &n) || n < min || n > max) {
        char lo[24], hi[24];
        snprintf(lo, sizeof(lo), "%lld", (long long)min);
        snprintf(hi, sizeof(hi), "%lld", (long long)max);
        const char *params[] = {"min", lo, "max", hi, NULL};
        edge_invalid_field(er, key,
                           bg_json_type(v) == BG_JSON_NUMBER ? "out_of_range" : "wrong_type",
                           bg_json_type(v) == BG_JSON_NUMBER ? params : NULL);
        return false;
    }
    *out = n;
    return true;
}

/* ---- agents ---- */

static const char *const agent_fields[] = {
    "organization_id", "slug",           "name",        "description", "model",  "provider",
    "prompt_id",       "prompt_version", "temperature", "max_tokens",  "memory", "cache_enabled",
    "cache_ttl_s",     "channels",       "visibility",  "status"};

/* Reads an agent body into op->spec; answers and returns false on a bad field. */
static bool take_agent(edge_req_t *er, agents_op_t *op, bool creating)
{
    /* PUT cannot move an agent to another organization: organization_id is create-only */
    const bg_json_t *root =
        body_root(er, creating ? agent_fields : agent_fields + 1,
                  creating ? BG_ARRAY_SIZE(agent_fields) : BG_ARRAY_SIZE(agent_fields) - 1);
    if (root == NULL)
        return false;
    bg_agent_spec_t *s = &op->spec;
    bool null_org = false, null_prompt = false;
    const char *org = NULL;
    if (creating && !get_str(er, root, "organization_id", false, &org, &null_org))
        return false;
    if (org != NULL && !bg_id_uuid_is_valid(org)) {
        edge_invalid_field(er, "organization_id", "invalid_value", NULL);
        return false;
    }
    op->org_id = org != NULL ? bg_strdup(org) : NULL;
    if (!get_str(er, root, "slug", creating, &s->slug, NULL) ||
        !get_str(er, root, "name", creating, &s->name, NULL) ||
        !get_str(er, root, "description", false, &s->description, NULL) ||
        !get_str(er, root, "model", false, &s->model, NULL) ||
        !get_str(er, root, "provider", false, &s->provider, NULL) ||
        !get_str(er, root, "prompt_id", false, &s->prompt_id, &null_prompt) ||
        !get_str(er, root, "visibility", false, &s->visibility, NULL) ||
        !get_str(er, root, "status", false, &s->status, NULL))
        return false;
    if (null_prompt)
        s->prompt_id = ""; /* null removes the prompt */
    if (s->prompt_id != NULL && s->prompt_id[0] != '\0' && !bg_id_uuid_is_valid(s->prompt_id)) {
        edge_invalid_field(er, "prompt_id", "invalid_value", NULL);
        return false;
    }
    /* prompt_version: a number pins it; null (or 0) follows the prompt's current version */
    const bg_json_t *pv = bg_json_find(root, "prompt_version");
    if (pv != NULL && bg_json_type(pv) == BG_JSON_NULL) {
        s->prompt_version = 0;
    } else {
        int64_t v = -1;
        if (!get_int(er, root, "prompt_version", 0, INT32_MAX, &v))
            return false;
        s->prompt_version = (int)v;
    }
    const bg_json_t *t = bg_json_find(root, "temperature");
    if (t != NULL) {
        double d;
        if (!bg_json_double(t, &d)) {
            edge_invalid_field(er, "temperature", "wrong_type", NULL);
            return false;
        }
        if (!(d >= 0 && d <= 2)) {
            const char *params[] = {"min", "0", "max", "2", NULL};
            edge_invalid_field(er, "temperature", "out_of_range", params);
            return false;
        }
        s->temperature = d;
    }
    int64_t n = 0;
    if (!get_int(er, root, "max_tokens", 1, BG_AGENT_MAX_TOKENS_MAX, &n))
        return false;
    s->max_tokens = n;
    n = 0;
    if (!get_int(er, root, "cache_ttl_s", 1, BG_AGENT_CACHE_TTL_MAX, &n))
        return false;
    s->cache_ttl_s = (int)n;
    const bg_json_t *ce = bg_json_find(root, "cache_enabled");
    if (ce != NULL) {
        bool b;
        if (!bg_json_bool(ce, &b)) {
            edge_invalid_field(er, "cache_enabled", "wrong_type", NULL);
            return false;
        }
        s->cache_enabled = b ? 1 : 0;
    }
    const bg_json_t *mem = bg_json_find(root, "memory");
    if (mem != NULL) {
        bg_prompt_err_t e = {0};
        if (bg_prompt_memory_parse(mem, &op->memory, &e) != 0) {
            edge_invalid_field(er, e.field[0] != '\0' ? e.field : "memory", reason_code(e.reason),
                               NULL);
            return false;
        }
        s->memory = &op->memory;
    }
    const bg_json_t *ch = bg_json_find(root, "channels");
    if (ch != NULL) {
        if (!bg_json_is_array(ch) || bg_json_len(ch) == 0) {
            edge_invalid_field(er, "channels",
                               bg_json_is_array(ch) ? "invalid_value" : "wrong_type", NULL);
            return false;
        }
        unsigned bits = 0;
        for (size_t i = 0; i < bg_json_len(ch); i++) {
            size_t len;
            const char *name = bg_json_str(bg_json_at(ch, i), &len);
            unsigned bit = name != NULL && strlen(name) == len ? bg_agent_channels_parse(name) : 0;
            if (bit == 0 || strchr(name, ',') != NULL) {
                edge_invalid_field(er, "channels", "invalid_value", NULL);
                return false;
            }
            bits |= bit;
        }
        s->channels = bits;
    }
    return true;
}

/* Loads agent op->id if the caller manages it (else BG_ERR_NOT_FOUND). */
static int load_managed_agent(agents_op_t *op, PGconn *c, const bg_agent_manager_t *mgr)
{
    int rc = bg_agents_get(c, op->id, &op->agent);
    if (rc == 0 && !bg_agents_manager_may(mgr, op->agent.organization_id))
        rc = BG_ERR_NOT_FOUND;
    return rc;
}

/* GET /admin/agents */
static void agents_list_work(void *arg)
{
    agents_op_t *op = arg;
    bg_agent_manager_t mgr;
    PGconn *c = manager_db(op, &mgr);
    if (c != NULL && (op->rc = bg_agents_list(c, NULL, true, &op->agents)) == 0) {
        size_t kept = 0;
        for (size_t i = 0; i < op->agents.count; i++) {
            if (!bg_agents_manager_may(&mgr, op->agents.items[i].organization_id))
                continue;
            if (kept != i)
                op->agents.items[kept] = op->agents.items[i];
            kept++;
        }
        op->agents.count = kept;
    }
    bg_agents_manager_dispose(&mgr);
}

static void agents_list_done(edge_req_t *er, void *arg)
{
    agents_op_t *op = arg;
    if (failed(er, op))
        return;
    bg_buf_t out;
    bg_buf_init(&out, LIST_CAP);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    bg_json_write_begin_object(&w);
    bg_json_write_key(&w, "data");
    bg_json_write_begin_array(&w);
    for (size_t i = 0; i < op->agents.count; i++)
        write_agent(&w, &op->agents.items[i]);
    bg_json_write_end_array(&w);
    bg_json_write_field_null(&w, "next_cursor");
    bg_json_write_end_object(&w);
    edge_respond_writer(er, 200, &w, &out);
}

static void agents_list(edge_req_t *er)
{
    op_new(er);
    edge_run(er, agents_list_work, agents_list_done);
}

/* GET /admin/agents/{id} */
static void agents_get_work(void *arg)
{
    agents_op_t *op = arg;
    bg_agent_manager_t mgr;
    PGconn *c = manager_db(op, &mgr);
    if (c != NULL)
        op->rc = load_managed_agent(op, c, &mgr);
    bg_agents_manager_dispose(&mgr);
}

static void agent_done(edge_req_t *er, void *arg)
{
    agents_op_t *op = arg;
    if (!failed(er, op))
        respond_agent(er, 200, &op->agent);
}

static void agents_get(edge_req_t *er)
{
    op_new(er);
    edge_run(er, agents_get_work, agent_done);
}

/* POST /admin/agents */
static void agents_create_work(void *arg)
{
    agents_op_t *op = arg;
    bg_agent_manager_t mgr;
    PGconn *c = manager_db(op, &mgr);
    if (c == NULL)
        goto out;
    if (op->org_id == NULL && !mgr.platform_admin) {
        /* only platform admins make system agents: an organization admin must say which */
        field_error(op, BG_ERR_INVALID, "organization_id", "missing");
        goto out;
    }
    if (!bg_agents_manager_may(&mgr, op->org_id)) {
        op->rc = BG_ERR_NOT_FOUND;
        goto out;
    }
    op->spec.organization_id = op->org_id;
    bg_actor_t actor = actor_of(op);
    op->rc = bg_agents_create(c, &op->spec, &actor, &op->agent, &op->perr);
    op->err_kind = ERR_MODULE;
out:
    bg_agents_manager_dispose(&mgr);
}

static void agents_create_done(edge_req_t *er, void *arg)
{
    agents_op_t *op = arg;
    if (!failed(er, op))
        respond_agent(er, 201, &op->agent);
}

static void agents_create(edge_req_t *er)
{
    agents_op_t *op = op_new(er);
    if (take_agent(er, op, true))
        edge_run(er, agents_create_work, agents_create_done);
}

/* PUT /admin/agents/{id} */
static void agents_update_work(void *arg)
{
    agents_op_t *op = arg;
    bg_agent_manager_t mgr;
    PGconn *c = manager_db(op, &mgr);
    if (c != NULL && (op->rc = load_managed_agent(op, c, &mgr)) == 0) {
        bg_actor_t actor = actor_of(op);
        op->rc = bg_agents_update(c, op->id, &op->spec, &actor, &op->agent, &op->perr);
        op->err_kind = ERR_MODULE;
    }
    bg_agents_manager_dispose(&mgr);
}

static void agents_update(edge_req_t *er)
{
    agents_op_t *op = op_new(er);
    if (take_agent(er, op, false))
        edge_run(er, agents_update_work, agent_done);
}

/* DELETE /admin/agents/{id} */
static void agents_delete_work(void *arg)
{
    agents_op_t *op = arg;
    bg_agent_manager_t mgr;
    PGconn *c = manager_db(op, &mgr);
    if (c != NULL && (op->rc = load_managed_agent(op, c, &mgr)) == 0) {
        bg_actor_t actor = actor_of(op);
        op->rc = bg_agents_delete(c, op->id, &actor);
    }
    bg_agents_manager_dispose(&mgr);
}

static void no_content_done(edge_req_t *er, void *arg)
{
    agents_op_t *op = arg;
    if (!failed(er, op))
        edge_respond(er, 204, NULL, NULL, 0);
}

static void agents_delete(edge_req_t *er)
{
    op_new(er);
    edge_run(er, agents_delete_work, no_content_done);
}

/* ---- previews ---- */

static const char *const preview_fields[] = {"variables", "message", "version"};

/* Reads a preview body into op; answers and returns false on a bad field. */
static bool take_preview(edge_req_t *er, agents_op_t *op)
{
    const bg_json_t *root = body_root(er, preview_fields, BG_ARRAY_SIZE(preview_fields));
    if (root == NULL)
        return false;
    const bg_json_t *vars = bg_json_find(root, "variables");
    if (vars != NULL && bg_json_type(vars) != BG_JSON_NULL && !bg_json_is_object(vars)) {
        edge_invalid_field(er, "variables", "wrong_type", NULL);
        return false;
    }
    op->vars = vars != NULL && bg_json_is_object(vars) ? vars : NULL;
    const char *msg = NULL;
    if (!get_str(er, root, "message", false, &msg, NULL))
        return false;
    if (msg != NULL) {
        size_t len;
        op->message = bg_json_str(bg_json_find(root, "message"), &len);
        op->message_len = len;
    }
    int64_t v = 0;
    if (!get_int(er, root, "version", 1, INT32_MAX, &v))
        return false;
    op->version = (int)v;
    return true;
}

/*
 * Renders op->pv (a loaded version) with op's variables and message into op->rendered; sets rc and
 * the error. The built-ins are the caller's: name, the request's locale, the web channel, today.
 */
static void render_version(agents_op_t *op, PGconn *c)
{
    bg_prompt_t *p = NULL;
    bg_prompt_err_t e = {0};
    if (op->pv.definition == NULL ||
        bg_prompt_parse(op->pv.definition, strlen(op->pv.definition), &p, &e) != 0) {
        op->rc = BG_ERR_PROTOCOL; /* a stored version that no longer parses: ours, a 500 */
        return;
    }
    bg_user_t u;
    const char *user_name = "";
    if (bg_acct_get_user(c, op->user_id, &u) == 0)
        user_name = u.name;
    const bg_prompt_builtins_t b = {
        .user_name = user_name, .locale = op->locale, .channel = "web", .date = NULL};
    op->rc = bg_prompt_render(p, op->vars, &b, NULL, 0, op->message, op->message_len, &op->rendered,
                              &op->perr);
    op->err_kind = ERR_RENDER;
    bg_prompt_free(p);
}

static void preview_done(edge_req_t *er, void *arg)
{
    agents_op_t *op = arg;
    if (failed(er, op))
        return;
    /* The messages are the renderer's JSON text; ids are uuids and need no escaping. */
    bg_buf_t out;
    bg_buf_init(&out, BG_PROMPT_OUTPUT_MAX + 256);
    char head[160];
    snprintf(head, sizeof(head),
             "{\"prompt_id\":\"%s\",\"version\":%d,\"messages\":", op->pv.prompt_id,
             op->pv.version);
    int rc = bg_buf_puts(&out, head);
    if (rc == 0)
        rc = bg_buf_append(&out, op->rendered.base, op->rendered.len);
    if (rc == 0)
        rc = bg_buf_puts(&out, "}");
    if (rc != 0) {
        edge_error(er, "internal", NULL, NULL, 0);
    } else {
        edge_add_header(er, "cache-control", "no-store");
        edge_respond_json(er, 200, &out);
    }
    bg_buf_dispose(&out);
}

/* POST /admin/agents/{id}/preview */
static void agent_preview_work(void *arg)
{
    agents_op_t *op = arg;
    bg_agent_manager_t mgr;
    PGconn *c = manager_db(op, &mgr);
    if (c == NULL || (op->rc = load_managed_agent(op, c, &mgr)) != 0)
        goto out;
    if (op->agent.prompt_id[0] == '\0') {
        /* nothing to render: the agent has no prompt (the worker would refuse it too) */
        field_error(op, BG_ERR_INVALID, "prompt_id", "missing");
        goto out;
    }
    if (op->version > 0)
        op->rc = bg_prompts_get_version(c, op->agent.prompt_id, op->version, &op->pv);
    else
        op->rc = bg_agents_resolve_prompt(c, op->id, &op->pv);
    if (op->rc == BG_ERR_NOT_FOUND) {
        field_error(op, BG_ERR_INVALID, op->version > 0 ? "version" : "prompt_id", "invalid_value");
        goto out;
    }
    if (op->rc == 0)
        render_version(op, c);
out:
    bg_agents_manager_dispose(&mgr);
}

static void agent_preview(edge_req_t *er)
{
    agents_op_t *op = op_new(er);
    if (take_preview(er, op))
        edge_run(er, agent_preview_work, preview_done);
}

/* ---- prompts ---- */

/*
 * Loads prompt op->id: BG_ERR_NOT_FOUND when it is another organization's; with write, also
 * BG_ERR_DENIED for a system prompt when the caller is not a platform admin.
 */
static int load_managed_prompt(agents_op_t *op, PGconn *c, const bg_agent_manager_t *mgr,
                               bool write)
{
    int rc = bg_prompts_get(c, op->id, &op->prompt);
    if (rc != 0)
        return rc;
    if (bg_agents_manager_may(mgr, op->prompt.organization_id))
        return 0;
    if (op->prompt.organization_id[0] == '\0')
        return write ? BG_ERR_DENIED : 0; /* a system prompt: readable, the platform's to change */
    return BG_ERR_NOT_FOUND;
}

/* Loads version op->version (0: current) of op->prompt and the list of version numbers. */
static void load_detail(agents_op_t *op, PGconn *c)
{
    bg_prompt_version_dispose(&op->pv);
    op->rc = bg_prompts_get_version(c, op->prompt.id, op->version, &op->pv);
    if (op->rc == BG_ERR_NOT_FOUND && op->version > 0) {
        field_error(op, BG_ERR_INVALID, "version", "invalid_value");
        return;
    }
    if (op->rc == 0)
        op->rc =
            bg_prompts_list_versions(c, op->prompt.id, op->versions, VERSIONS_MAX, &op->nversions);
}

static void prompt_detail_done(edge_req_t *er, void *arg)
{
    agents_op_t *op = arg;
    if (!failed(er, op))
        respond_prompt_detail(er, 200, op);
}

static void prompt_created_done(edge_req_t *er, void *arg)
{
    agents_op_t *op = arg;
    if (!failed(er, op))
        respond_prompt_detail(er, 201, op);
}

/* GET /admin/prompts */
static void prompts_list_work(void *arg)
{
    agents_op_t *op = arg;
    bg_agent_manager_t mgr;
    PGconn *c = manager_db(op, &mgr);
    if (c != NULL && (op->rc = bg_prompts_list(c, &op->prompts)) == 0) {
        size_t kept = 0;
        for (size_t i = 0; i < op->prompts.count; i++) {
            const bg_prompt_info_t *p = &op->prompts.items[i];
            if (p->organization_id[0] != '\0' && !bg_agents_manager_may(&mgr, p->organization_id))
                continue;
            if (kept != i)
                op->prompts.items[kept] = *p;
            kept++;
        }
        op->prompts.count = kept;
    }
    bg_agents_manager_dispose(&mgr);
}

static void prompts_list_done(edge_req_t *er, void *arg)
{
    agents_op_t *op = arg;
    if (failed(er, op))
        return;
    bg_buf_t out;
    bg_buf_init(&out, LIST_CAP);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    bg_json_write_begin_object(&w);
    bg_json_write_key(&w, "data");
    bg_json_write_begin_array(&w);
    for (size_t i = 0; i < op->prompts.count; i++) {
        bg_json_write_begin_object(&w);
        write_prompt_fields(&w, &op->prompts.items[i]);
        bg_json_write_end_object(&w);
    }
    bg_json_write_end_array(&w);
    bg_json_write_field_null(&w, "next_cursor");
    bg_json_write_end_object(&w);
    edge_respond_writer(er, 200, &w, &out);
}

static void prompts_list(edge_req_t *er)
{
    op_new(er);
    edge_run(er, prompts_list_work, prompts_list_done);
}

/* GET /admin/prompts/{id}?version=N */
static void prompts_get_work(void *arg)
{
    agents_op_t *op = arg;
    bg_agent_manager_t mgr;
    PGconn *c = manager_db(op, &mgr);
    if (c != NULL && (op->rc = load_managed_prompt(op, c, &mgr, false)) == 0)
        load_detail(op, c);
    bg_agents_manager_dispose(&mgr);
}

static void prompts_get(edge_req_t *er)
{
    agents_op_t *op = op_new(er);
    char v[16];
    if (edge_query(er, "version", v, sizeof(v)) && v[0] != '\0') {
        char *end;
        long n = strtol(v, &end, 10);
        if (end == v || *end != '\0' || n < 1 || n > INT32_MAX) {
            edge_invalid_field(er, "version", "invalid_value", NULL);
            return;
        }
        op->version = (int)n;
    }
    edge_run(er, prompts_get_work, prompt_detail_done);
}

/*
 * Parses the "definition" member (required) into op->def; answers 422 naming the definition's
 * field ("definition.variables[0].type") and returns false when it is invalid.
 */
static bool take_definition(edge_req_t *er, agents_op_t *op, const bg_json_t *root)
{
    const bg_json_t *d = bg_json_find(root, "definition");
    if (d == NULL) {
        edge_invalid_field(er, "definition", "missing", NULL);
        return false;
    }
    bg_prompt_err_t e = {0};
    if (bg_prompt_from_json(d, &op->def, &e) != 0) {
        char field[128];
        if (strcmp(e.field, "definition") == 0 || e.field[0] == '\0')
            bg_strlcpy(field, "definition", sizeof(field));
        else
            snprintf(field, sizeof(field), "definition.%s", e.field);
        edge_invalid_field(er, field, reason_code(e.reason), NULL);
        return false;
    }
    return true;
}

/* Checks the length of an optional text member in characters. */
static bool text_ok(edge_req_t *er, const char *key, const char *s, size_t min, size_t max)
{
    if (s == NULL)
        return true;
    size_t n = bg_utf8_chars(s);
    if (n < min || n > max) {
        char lim[24];
        snprintf(lim, sizeof(lim), "%zu", n < min ? min : max);
        const char *params[] = {n < min ? "min" : "max", lim, NULL};
        edge_invalid_field(er, key, n < min ? "too_short" : "too_long", params);
        return false;
    }
    return true;
}

/* POST /admin/prompts */
static void prompts_create_work(void *arg)
{
    agents_op_t *op = arg;
    bg_agent_manager_t mgr;
    PGconn *c = manager_db(op, &mgr);
    if (c == NULL)
        goto out;
    if (op->org_id == NULL && !mgr.platform_admin) {
        field_error(op, BG_ERR_INVALID, "organization_id", "missing");
        goto out;
    }
    if (!bg_agents_manager_may(&mgr, op->org_id)) {
        op->rc = BG_ERR_NOT_FOUND;
        goto out;
    }
    bg_actor_t actor = actor_of(op);
    char id[BG_AGENT_ID_SIZE];
    op->rc = bg_prompts_create(c, op->org_id, op->name, op->description, op->def, &actor, id);
    if (op->rc == BG_ERR_INVALID) {
        /* the fields were checked; what the database refuses is the organization */
        field_error(op, BG_ERR_INVALID, "organization_id", "invalid_value");
        goto out;
    }
    if (op->rc == 0) {
        free(op->id);
        op->id = bg_strdup(id);
        op->rc = bg_prompts_get(c, id, &op->prompt);
    }
    if (op->rc == 0)
        load_detail(op, c);
out:
    bg_agents_manager_dispose(&mgr);
}

static const char *const prompt_fields[] = {"organization_id", "name", "description", "definition"};

static void prompts_create(edge_req_t *er)
{
    agents_op_t *op = op_new(er);
    const bg_json_t *root = body_root(er, prompt_fields, BG_ARRAY_SIZE(prompt_fields));
    if (root == NULL)
        return;
    const char *org = NULL, *name = NULL, *desc = NULL;
    bool null_org;
    if (!get_str(er, root, "organization_id", false, &org, &null_org) ||
        !get_str(er, root, "name", true, &name, NULL) ||
        !get_str(er, root, "description", false, &desc, NULL) ||
        !text_ok(er, "name", name, 1, 200) || !text_ok(er, "description", desc, 0, 2000))
        return;
    if (org != NULL && !bg_id_uuid_is_valid(org)) {
        edge_invalid_field(er, "organization_id", "invalid_value", NULL);
        return;
    }
    if (!take_definition(er, op, root))
        return;
    op->org_id = org != NULL ? bg_strdup(org) : NULL;
    op->name = bg_strdup(name);
    op->description = desc != NULL ? bg_strdup(desc) : NULL;
    edge_run(er, prompts_create_work, prompt_created_done);
}

/* POST /admin/prompts/{id}/versions */
static void prompts_publish_work(void *arg)
{
    agents_op_t *op = arg;
    bg_agent_manager_t mgr;
    PGconn *c = manager_db(op, &mgr);
    if (c == NULL || (op->rc = load_managed_prompt(op, c, &mgr, true)) != 0)
        goto out;
    bg_actor_t actor = actor_of(op);
    int version = 0;
    op->rc =
        bg_prompts_publish(c, op->id, op->def, op->model, op->params, op->note, &actor, &version);
    if (op->rc == 0 && (op->rc = bg_prompts_get(c, op->id, &op->prompt)) == 0) {
        op->version = version;
        load_detail(op, c);
    }
out:
    bg_agents_manager_dispose(&mgr);
}

static const char *const publish_fields[] = {"definition", "model", "params", "note"};

static void prompts_publish(edge_req_t *er)
{
    agents_op_t *op = op_new(er);
    const bg_json_t *root = body_root(er, publish_fields, BG_ARRAY_SIZE(publish_fields));
    if (root == NULL)
        return;
    const char *model = NULL, *note = NULL;
    if (!get_str(er, root, "model", false, &model, NULL) ||
        !get_str(er, root, "note", false, &note, NULL) || !text_ok(er, "note", note, 0, 2000))
        return;
    if (model != NULL && strlen(model) >= BG_AGENT_MODEL_SIZE) {
        const char *params[] = {"max", "256", NULL};
        edge_invalid_field(er, "model", "too_long", params);
        return;
    }
    const bg_json_t *params = bg_json_find(root, "params");
    if (params != NULL && !bg_json_is_object(params)) {
        edge_invalid_field(er, "params", "wrong_type", NULL);
        return;
    }
    if (!take_definition(er, op, root))
        return;
    if (params != NULL) {
        bg_buf_t text;
        bg_buf_init(&text, PARAMS_MAX);
        bg_json_writer_t w;
        bg_json_writer_init(&w, &text);
        bg_json_write_value(&w, params);
        if (bg_json_write_finish(&w) != 0) {
            bg_buf_dispose(&text);
            edge_invalid_field(er, "params", "invalid_value", NULL);
            return;
        }
        op->params = bg_strndup(text.base, text.len);
        bg_buf_dispose(&text);
    }
    op->model = model != NULL ? bg_strdup(model) : NULL;
    op->note = note != NULL ? bg_strdup(note) : NULL;
    edge_run(er, prompts_publish_work, prompt_created_done);
}

/* POST /admin/prompts/{id}/rollback {"version"} */
static void prompts_rollback_work(void *arg)
{
    agents_op_t *op = arg;
    bg_agent_manager_t mgr;
    PGconn *c = manager_db(op, &mgr);
    if (c == NULL || (op->rc = load_managed_prompt(op, c, &mgr, true)) != 0)
        goto out;
    bg_actor_t actor = actor_of(op);
    int version = 0;
    op->rc = bg_prompts_rollback(c, op->id, op->version, &actor, &version);
    if (op->rc == BG_ERR_NOT_FOUND) {
        field_error(op, BG_ERR_INVALID, "version", "invalid_value");
        goto out;
    }
    if (op->rc == 0 && (op->rc = bg_prompts_get(c, op->id, &op->prompt)) == 0) {
        op->version = version;
        load_detail(op, c);
    }
out:
    bg_agents_manager_dispose(&mgr);
}

static const char *const rollback_fields[] = {"version"};

static void prompts_rollback(edge_req_t *er)
{
    agents_op_t *op = op_new(er);
    const bg_json_t *root = body_root(er, rollback_fields, BG_ARRAY_SIZE(rollback_fields));
    if (root == NULL)
        return;
    if (bg_json_find(root, "version") == NULL) {
        edge_invalid_field(er, "version", "missing", NULL);
        return;
    }
    int64_t v = 0;
    if (!get_int(er, root, "version", 1, INT32_MAX, &v))
        return;
    op->version = (int)v;
    edge_run(er, prompts_rollback_work, prompt_detail_done);
}

/* POST /admin/prompts/{id}/preview */
static void prompt_preview_work(void *arg)
{
    agents_op_t *op = arg;
    bg_agent_manager_t mgr;
    PGconn *c = manager_db(op, &mgr);
    if (c == NULL || (op->rc = load_managed_prompt(op, c, &mgr, false)) != 0)
        goto out;
    op->rc = bg_prompts_get_version(c, op->id, op->version, &op->pv);
    if (op->rc == BG_ERR_NOT_FOUND && op->version > 0) {
        field_error(op, BG_ERR_INVALID, "version", "invalid_value");
        goto out;
    }
    if (op->rc == 0)
        render_version(op, c);
out:
    bg_agents_manager_dispose(&mgr);
}

static void prompt_preview(edge_req_t *er)
{
    agents_op_t *op = op_new(er);
    if (take_preview(er, op))
        edge_run(er, prompt_preview_work, preview_done);
}

const edge_route_t edge_routes_agents[] = {
    {"GET", "/admin/agents", "admin_agents", agents_list, 0, 0, EDGE_USER},
    {"POST", "/admin/agents", "admin_agents", agents_create, EDGE_ROUTE_JSON, AGENT_BODY_MAX,
     EDGE_USER},
    {"GET", "/admin/agents/{id}", "admin_agent", agents_get, 0, 0, EDGE_USER},
    {"PUT", "/admin/agents/{id}", "admin_agent", agents_update, EDGE_ROUTE_JSON, AGENT_BODY_MAX,
     EDGE_USER},
    {"DELETE", "/admin/agents/{id}", "admin_agent", agents_delete, 0, 0, EDGE_USER},
    {"POST", "/admin/agents/{id}/preview", "admin_agent_preview", agent_preview, EDGE_ROUTE_JSON,
     AGENT_BODY_MAX, EDGE_USER},
    {"GET", "/admin/prompts", "admin_prompts", prompts_list, 0, 0, EDGE_USER},
    {"POST", "/admin/prompts", "admin_prompts", prompts_create, EDGE_ROUTE_JSON, PROMPT_BODY_MAX,
     EDGE_USER},
    {"GET", "/admin/prompts/{id}", "admin_prompt", prompts_get, 0, 0, EDGE_USER},
    {"POST", "/admin/prompts/{id}/versions", "admin_prompt_versions", prompts_publish,
     EDGE_ROUTE_JSON, PROMPT_BODY_MAX, EDGE_USER},
    {"POST", "/admin/prompts/{id}/rollback", "admin_prompt_rollback", prompts_rollback,
     EDGE_ROUTE_JSON, 16384, EDGE_USER},
    {"POST", "/admin/prompts/{id}/preview", "admin_prompt_preview", prompt_preview, EDGE_ROUTE_JSON,
     AGENT_BODY_MAX, EDGE_USER},
    {NULL, NULL, NULL, NULL, 0, 0, EDGE_PUBLIC},
};
