/*
 * The web chat's REST side: GET /agents (what the caller may chat with) and /chat/conversations
 * with their messages. The storage rules, ownership included, live in the chat module (bg/chat.h);
 * a conversation of someone else, a deleted one and a malformed id all answer 404. Query parameters
 * and bodies are checked here first, so a bad value is a 422 naming it and never reaches Postgres.
 * Posting a message (which streams the reply) is not here.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/agents.h"
#include "bg/chat.h"
#include "bg/err.h"
#include "bg/json.h"
#include "bg/pg.h"
#include "edge.h"

/* Response buffers: a page of conversations is small; a page of messages holds up to
 * BG_CHAT_PAGE_BYTES of content plus one message, which escaping may make six times larger. */
#define CONV_PAGE_CAP (1u << 20)
#define MSG_PAGE_CAP ((size_t)BG_CHAT_PAGE_BYTES * 8)
#define AGENTS_CAP (16u << 20)

typedef struct st_chat_op {
    const bg_config_t *cfg;
    char user_id[64];
    char *conv_id;  /* owned; the path's {id} */
    char *agent_id; /* owned */
    char *title;    /* owned */
    char *cursor;   /* owned */
    size_t limit;
    bool newest_first;
    int rc;
    bg_chat_conversation_t conv;
    bg_chat_conversation_t *convs; /* owned */
    size_t count;
    bg_chat_message_list_t messages;
    bg_agent_list_t agents;
    char next_cursor[BG_CHAT_CURSOR_SIZE];
} chat_op_t;

static void op_free(void *p)
{
    chat_op_t *op = p;
    free(op->conv_id);
    free(op->agent_id);
    free(op->title);
    free(op->cursor);
    free(op->convs);
    bg_chat_message_list_dispose(&op->messages);
    bg_agent_list_dispose(&op->agents);
    free(op);
}

static chat_op_t *op_new(edge_req_t *er)
{
    chat_op_t *op = bg_calloc(1, sizeof(*op));
    op->cfg = er->thread->server->cfg;
    bg_strlcpy(op->user_id, er->auth.user_id, sizeof(op->user_id));
    if (er->nparams > 0)
        op->conv_id = bg_strndup(er->params[0].base, er->params[0].len);
    op->limit = BG_CHAT_PAGE_DEFAULT;
    er->data = op;
    er->data_free = op_free;
    return op;
}

static PGconn *db(chat_op_t *op)
{
    return edge_pg(op->cfg, NULL, &op->rc);
}

/* Answers a failed operation; BG_ERR_INVALID from a list is the cursor (the rest was checked). */
static bool failed(edge_req_t *er, const chat_op_t *op, const char *invalid_field)
{
    if (op->rc == 0 && er->req != NULL)
        return false;
    if (op->rc == BG_ERR_INVALID && er->req != NULL && invalid_field != NULL)
        edge_invalid_field(er, invalid_field, "invalid_value", NULL);
    else
        edge_fail(er, op->rc);
    return true;
}

static void write_time_or_null(bg_json_writer_t *w, const char *key, const char *t)
{
    if (t[0] != '\0')
        bg_json_write_field_str(w, key, t);
    else
        bg_json_write_field_null(w, key);
}

static void write_conversation(bg_json_writer_t *w, const bg_chat_conversation_t *c)
{
    bg_json_write_begin_object(w);
    bg_json_write_field_str(w, "id", c->id);
    bg_json_write_field_str(w, "agent_id", c->agent_id);
    bg_json_write_field_str(w, "agent_name", c->agent_name);
    bg_json_write_field_str(w, "title", c->title);
    bg_json_write_field_str(w, "channel", c->channel);
    bg_json_write_field_int(w, "message_count", c->message_count);
    write_time_or_null(w, "last_message_at", c->last_message_at);
    bg_json_write_field_str(w, "created_at", c->created_at);
    bg_json_write_field_str(w, "updated_at", c->updated_at);
    bg_json_write_end_object(w);
}

static void write_message(bg_json_writer_t *w, const bg_chat_message_t *m)
{
    char id[24];
    snprintf(id, sizeof(id), "%lld", (long long)m->id);
    bg_json_write_begin_object(w);
    bg_json_write_field_str(w, "id", id);
    bg_json_write_field_str(w, "role", m->role);
    bg_json_write_key(w, "content");
    bg_json_write_strn(w, m->content, m->content_len);
    bg_json_write_field_str(w, "status", m->status);
    bg_json_write_field_str(w, "created_at", m->created_at);
    if (m->model[0] != '\0')
        bg_json_write_field_str(w, "model", m->model);
    else
        bg_json_write_field_null(w, "model");
    if (m->prompt_tokens >= 0 || m->completion_tokens >= 0) {
        bg_json_write_key(w, "usage");
        bg_json_write_begin_object(w);
        bg_json_write_field_int(w, "prompt_tokens", m->prompt_tokens >= 0 ? m->prompt_tokens : 0);
        bg_json_write_field_int(w, "completion_tokens",
                                m->completion_tokens >= 0 ? m->completion_tokens : 0);
        bg_json_write_end_object(w);
    } else {
        bg_json_write_field_null(w, "usage");
    }
    bg_json_write_end_object(w);
}

static void write_next_cursor(bg_json_writer_t *w, const char *cursor)
{
    if (cursor[0] != '\0')
        bg_json_write_field_str(w, "next_cursor", cursor);
    else
        bg_json_write_field_null(w, "next_cursor");
}

/*
 * Reads ?limit= and ?cursor= into op; answers 422 and returns false for a limit outside
 * 1..BG_CHAT_PAGE_MAX. The module refuses a cursor it did not make (then list_done answers).
 */
static bool page_params(edge_req_t *er, chat_op_t *op)
{
    char cursor[1024];
    int limit = (int)op->limit;
    if (!edge_query_limit(er, BG_CHAT_PAGE_MAX, &limit))
        return false;
    op->limit = (size_t)limit;
    if (edge_query(er, "cursor", cursor, sizeof(cursor)) && cursor[0] != '\0')
        op->cursor = bg_strdup(cursor);
    return true;
}

/* GET /agents */
static void agents_work(void *arg)
{
    chat_op_t *op = arg;
    PGconn *c = db(op);
    if (c != NULL)
        op->rc = bg_agents_list_usable(c, op->user_id, BG_AGENT_CHANNEL_WEB, &op->agents);
}

static void agents_done(edge_req_t *er, void *arg)
{
    chat_op_t *op = arg;
    if (failed(er, op, NULL))
        return;
    const char *fallback_model = op->cfg->llm_model != NULL ? op->cfg->llm_model : "";
    bg_buf_t out;
    bg_buf_init(&out, AGENTS_CAP);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    bg_json_write_begin_object(&w);
    bg_json_write_key(&w, "data");
    bg_json_write_begin_array(&w);
    for (size_t i = 0; i < op->agents.count; i++) {
        const bg_agent_t *a = &op->agents.items[i];
        bg_json_write_begin_object(&w);
        bg_json_write_field_str(&w, "id", a->id);
        bg_json_write_field_str(&w, "slug", a->slug);
        bg_json_write_field_str(&w, "name", a->name);
        bg_json_write_field_str(&w, "description", a->description);
        /* "" in the table means the deployment's model: show which one that is */
        bg_json_write_field_str(&w, "model", a->model[0] != '\0' ? a->model : fallback_model);
        bg_json_write_end_object(&w);
    }
    bg_json_write_end_array(&w);
    bg_json_write_field_null(&w, "next_cursor");
    bg_json_write_end_object(&w);
    edge_respond_writer(er, 200, &w, &out);
}

static void agents_list(edge_req_t *er)
{
    op_new(er);
    edge_run(er, agents_work, agents_done);
}

/* POST /chat/conversations {agent_id, title?} */

/* What the chat module's allow hook needs: the pool thread's connection and where to leave why. */
typedef struct st_allow_ctx {
    PGconn *c;
    int rc;
} allow_ctx_t;

/* Whether this user may use the agent on the web (resource_access policies, its channels). */
static bool allow_agent(void *ctx, const char *user_id, const char *agent_id)
{
    allow_ctx_t *a = ctx;
    bg_agent_t agent;
    a->rc = bg_agents_get_usable(a->c, user_id, agent_id, BG_AGENT_CHANNEL_WEB, &agent);
    return a->rc == 0;
}

static void create_work(void *arg)
{
    chat_op_t *op = arg;
    PGconn *c = db(op);
    if (c == NULL)
        return;
    allow_ctx_t allow = {c, 0};
    op->rc = bg_chat_create(c, op->user_id, op->agent_id, "web", op->title, allow_agent, &allow,
                            &op->conv);
    /* a refusal is the policy's; a database failure while deciding is not a 403 */
    if (op->rc == BG_ERR_DENIED && allow.rc != BG_ERR_DENIED && allow.rc != 0)
        op->rc = allow.rc;
}

static void conv_done(edge_req_t *er, chat_op_t *op, int status)
{
    bg_buf_t out;
    bg_buf_init(&out, CONV_PAGE_CAP);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    write_conversation(&w, &op->conv);
    edge_respond_writer(er, status, &w, &out);
}

static void create_done(edge_req_t *er, void *arg)
{
    chat_op_t *op = arg;
    if (op->rc == BG_ERR_NOT_FOUND && er->req != NULL) {
        /* no such agent, or not one this user may use: say which thing was not found */
        edge_error(er, "not_found", "{\"field\":\"agent_id\",\"reason\":\"unknown_agent\"}", NULL,
                   0);
        return;
    }
    if (op->rc == BG_ERR_DENIED && er->req != NULL) {
        /* the agent exists for this user, but a resource_access policy keeps it from them */
        edge_error(er, "forbidden", "{\"field\":\"agent_id\",\"reason\":\"agent_not_allowed\"}",
                   NULL, 0);
        return;
    }
    if (failed(er, op, "title"))
        return;
    /* its first turn, usually a moment away, then needs no Postgres on this edge */
    edge_conv_remember(op->conv.id, op->user_id, op->conv.agent_id);
    conv_done(er, op, 201);
}

static const edge_field_t create_fields[] = {
    {"agent_id", EDGE_F_STR, true, 1, 64, EDGE_CHECK_UUID},
    {"title", EDGE_F_STR, false, 1, BG_CHAT_TITLE_MAX, EDGE_CHECK_NONE},
};

static void conversations_create(edge_req_t *er)
{
    edge_values_t v;
    if (!edge_body(er, create_fields, BG_ARRAY_SIZE(create_fields), &v))
        return;
    /* copied before op_new(), which GCC's -Wdangling-pointer cannot follow at -O3 */
    char *agent_id = bg_strdup(v.str[0]);
    char *title = v.present[1] ? bg_strdup(v.str[1]) : NULL;
    chat_op_t *op = op_new(er);
    op->agent_id = agent_id;
    op->title = title;
    edge_run(er, create_work, create_done);
}

/* GET /chat/conversations?cursor=&limit= */
static void list_work(void *arg)
{
    chat_op_t *op = arg;
    PGconn *c = db(op);
    if (c == NULL)
        return;
    op->convs = bg_calloc(op->limit, sizeof(*op->convs));
    op->rc =
        bg_chat_list(c, op->user_id, op->cursor, op->limit, op->convs, &op->count, op->next_cursor);
}

static void list_done(edge_req_t *er, void *arg)
{
    chat_op_t *op = arg;
    if (failed(er, op, "cursor"))
        return;
    bg_buf_t out;
    bg_buf_init(&out, CONV_PAGE_CAP);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    bg_json_write_begin_object(&w);
    bg_json_write_key(&w, "data");
    bg_json_write_begin_array(&w);
    for (size_t i = 0; i < op->count; i++)
        write_conversation(&w, &op->convs[i]);
    bg_json_write_end_array(&w);
    write_next_cursor(&w, op->next_cursor);
    bg_json_write_end_object(&w);
    edge_respond_writer(er, 200, &w, &out);
}

static void conversations_list(edge_req_t *er)
{
    chat_op_t *op = op_new(er);
    if (!page_params(er, op))
        return;
    edge_run(er, list_work, list_done);
}

/* GET /chat/conversations/{id} */
static void get_work(void *arg)
{
    chat_op_t *op = arg;
    PGconn *c = db(op);
    if (c != NULL)
        op->rc = bg_chat_get(c, op->user_id, op->conv_id, &op->conv);
}

static void get_done(edge_req_t *er, void *arg)
{
    chat_op_t *op = arg;
    if (failed(er, op, NULL))
        return;
    conv_done(er, op, 200);
}

static void conversations_get(edge_req_t *er)
{
    op_new(er);
    edge_run(er, get_work, get_done);
}

/* PATCH /chat/conversations/{id} {title} */
static void rename_work(void *arg)
{
    chat_op_t *op = arg;
    PGconn *c = db(op);
    if (c != NULL)
        op->rc = bg_chat_rename(c, op->user_id, op->conv_id, op->title, &op->conv);
}

static void rename_done(edge_req_t *er, void *arg)
{
    chat_op_t *op = arg;
    if (failed(er, op, "title"))
        return;
    conv_done(er, op, 200);
}

static const edge_field_t rename_fields[] = {
    {"title", EDGE_F_STR, true, 1, BG_CHAT_TITLE_MAX, EDGE_CHECK_NONE},
};

static void conversations_rename(edge_req_t *er)
{
    edge_values_t v;
    if (!edge_body(er, rename_fields, BG_ARRAY_SIZE(rename_fields), &v))
        return;
    chat_op_t *op = op_new(er);
    op->title = bg_strdup(v.str[0]);
    edge_run(er, rename_work, rename_done);
}

/* DELETE /chat/conversations/{id} */
static void delete_work(void *arg)
{
    chat_op_t *op = arg;
    PGconn *c = db(op);
    if (c != NULL)
        op->rc = bg_chat_delete(c, op->user_id, op->conv_id);
    if (op->rc == 0)
        edge_conv_forget(op->conv_id);
}

static void delete_done(edge_req_t *er, void *arg)
{
    chat_op_t *op = arg;
    if (failed(er, op, NULL))
        return;
    edge_respond(er, 204, NULL, NULL, 0);
}

static void conversations_delete(edge_req_t *er)
{
    op_new(er);
    edge_run(er, delete_work, delete_done);
}

/* GET /chat/conversations/{id}/messages?cursor=&limit=&order=asc|desc */
static void messages_work(void *arg)
{
    chat_op_t *op = arg;
    PGconn *c = db(op);
    if (c != NULL)
        op->rc = bg_chat_messages(c, op->user_id, op->conv_id, op->cursor, op->limit,
                                  op->newest_first, &op->messages, op->next_cursor);
}

static void messages_done(edge_req_t *er, void *arg)
{
    chat_op_t *op = arg;
    if (failed(er, op, "cursor"))
        return;
    bg_buf_t out;
    bg_buf_init(&out, MSG_PAGE_CAP);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    bg_json_write_begin_object(&w);
    bg_json_write_key(&w, "data");
    bg_json_write_begin_array(&w);
    for (size_t i = 0; i < op->messages.count; i++)
        write_message(&w, &op->messages.items[i]);
    bg_json_write_end_array(&w);
    write_next_cursor(&w, op->next_cursor);
    bg_json_write_end_object(&w);
    edge_respond_writer(er, 200, &w, &out);
}

static void messages_list(edge_req_t *er)
{
    chat_op_t *op = op_new(er);
    if (!page_params(er, op))
        return;
    char order[64];
    if (edge_query(er, "order", order, sizeof(order)) && order[0] != '\0') {
        if (strcmp(order, "desc") == 0) {
            op->newest_first = true;
        } else if (strcmp(order, "asc") != 0) {
            edge_invalid_field(er, "order", "invalid_value", NULL);
            return;
        }
    }
    edge_run(er, messages_work, messages_done);
}

const edge_route_t edge_routes_chat[] = {
    {"GET", "/agents", "agents", agents_list, 0, 0, EDGE_USER},
    {"GET", "/chat/conversations", "chat_conversations", conversations_list, 0, 0, EDGE_USER},
    {"POST", "/chat/conversations", "chat_conversations", conversations_create, EDGE_ROUTE_JSON,
     16384, EDGE_USER},
    {"GET", "/chat/conversations/{id}", "chat_conversation", conversations_get, 0, 0, EDGE_USER},
    {"PATCH", "/chat/conversations/{id}", "chat_conversation", conversations_rename,
     EDGE_ROUTE_JSON, 16384, EDGE_USER},
    {"DELETE", "/chat/conversations/{id}", "chat_conversation", conversations_delete, 0, 0,
     EDGE_USER},
    {"GET", "/chat/conversations/{id}/messages", "chat_messages", messages_list, 0, 0, EDGE_USER},
    {NULL, NULL, NULL, NULL, 0, 0, EDGE_PUBLIC},
};
