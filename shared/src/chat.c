/*
 * Conversations and messages (bg/chat.h).
 *
 * Every statement names the owner in its WHERE clause, so no code path can hand out another user's
 * row by forgetting a check afterwards. Appends lock the conversation row (SELECT … FOR UPDATE)
 * before inserting: that serialises writers of one conversation, so message ids grow in the order
 * the counters on the conversation were bumped, and a delete cannot slip between the check and the
 * insert.
 *
 * Cursors are base64url of a short text of our own ("c|<updated_at µs>|<uuid>" for conversations,
 * "a|<id>" or "d|<id>" for messages in either order) and are parsed and checked here before they
 * reach SQL, so a forged one is BG_ERR_INVALID and never a database error. Message pages and
 * histories are cut to a byte budget in SQL (a running sum over the page's rows), so large contents
 * past the budget never leave the server.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/chat.h"
#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/id.h"
#include "bg/json.h"
#include "bg/pg.h"
#include "bg/timeutil.h"
#include "bg/validate.h"

/* RFC 3339 UTC text of a timestamptz column, as the API shows times. */
#define TS(col) "to_char((" col ") AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
/* The same with microseconds: exact, for keyset cursors. */
#define TS_US(col) "to_char((" col ") AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"

/* The columns read_conversation() expects, over `conversations c JOIN agents a`, then the cursor
 * key (updated_at with microseconds). */
#define CONV_COLS                                                                                  \
    "c.id, c.agent_id, a.name, c.channel, c.title, c.message_count, coalesce(" TS(                 \
        "c.last_message_at") ", ''), " TS("c.created_at") ", " TS("c.updated_at") ", " TS_US("c."  \
                                                                                             "upd" \
                                                                                             "ate" \
                                                                                             "d_"  \
                                                                                             "at")
#define CONV_NCOLS 9
#define CONV_FROM " FROM conversations c JOIN agents a ON a.id = c.agent_id "

/* The columns read_message() expects, over a row source `t`. */
#define MSG_COLS                                                                                   \
    "t.id, t.role, t.status, t.content, coalesce(t.model, ''), t.prompt_tokens, "                  \
    "t.completion_tokens, " TS("t.created_at")
/* What the inner selects take from `messages m` for MSG_COLS. */
#define MSG_INNER                                                                                  \
    "m.id, m.role, m.status, m.content, m.model, m.prompt_tokens, m.completion_tokens, "           \
    "m.created_at"

/* Decoded cursors: "c|" + 27 characters of time + "|" + 36 of uuid; "a|" + a bigint. */
#define CURSOR_RAW_MAX 72

static const char *text(const PGresult *res, int row, int col)
{
    const char *v = bg_pg_value(res, row, col);
    return v != NULL ? v : "";
}

static void copy(char *dst, size_t size, const PGresult *res, int row, int col)
{
    /* every column read here is bounded by the schema to fit its buffer */
    (void)bg_strlcpy(dst, text(res, row, col), size);
}

/* An integer column; fallback when it is NULL. */
static int64_t int_or(const PGresult *res, int row, int col, int64_t fallback)
{
    int64_t v;
    return bg_pg_int64(res, row, col, &v) == 0 ? v : fallback;
}

static void read_conversation(const PGresult *res, int row, bg_chat_conversation_t *o)
{
    memset(o, 0, sizeof(*o));
    copy(o->id, sizeof(o->id), res, row, 0);
    copy(o->agent_id, sizeof(o->agent_id), res, row, 1);
    copy(o->agent_name, sizeof(o->agent_name), res, row, 2);
    copy(o->channel, sizeof(o->channel), res, row, 3);
    copy(o->title, sizeof(o->title), res, row, 4);
    o->message_count = int_or(res, row, 5, 0);
    copy(o->last_message_at, sizeof(o->last_message_at), res, row, 6);
    copy(o->created_at, sizeof(o->created_at), res, row, 7);
    copy(o->updated_at, sizeof(o->updated_at), res, row, 8);
}

static void read_message(const PGresult *res, int row, bg_chat_message_t *m)
{
    memset(m, 0, sizeof(*m));
    m->id = int_or(res, row, 0, 0);
    copy(m->role, sizeof(m->role), res, row, 1);
    copy(m->status, sizeof(m->status), res, row, 2);
    m->content_len = (size_t)PQgetlength(res, row, 3);
    m->content = bg_strndup(text(res, row, 3), m->content_len);
    copy(m->model, sizeof(m->model), res, row, 4);
    m->prompt_tokens = int_or(res, row, 5, -1);
    m->completion_tokens = int_or(res, row, 6, -1);
    copy(m->created_at, sizeof(m->created_at), res, row, 7);
}

void bg_chat_message_list_dispose(bg_chat_message_list_t *list)
{
    if (list == NULL)
        return;
    for (size_t i = 0; i < list->count; i++)
        free(list->items[i].content);
    free(list->items);
    list->items = NULL;
    list->count = 0;
}

/* Fills list with every row of res (MSG_COLS first). */
static void read_messages(const PGresult *res, int rows, bg_chat_message_list_t *list)
{
    if (rows <= 0)
        return;
    list->items = bg_calloc((size_t)rows, sizeof(*list->items));
    for (int i = 0; i < rows; i++)
        read_message(res, i, &list->items[i]);
    list->count = (size_t)rows;
}

/* ---- cursors ---- */

/* Splits a conversation cursor into its checked time and id (pointing into raw). */
static int conv_cursor_parse(const char *cursor, char raw[CURSOR_RAW_MAX + 1], const char **ts,
                             const char **id)
{
    if (bg_crypto_b64url_decode_str(cursor, raw, CURSOR_RAW_MAX + 1) != 0 ||
        strncmp(raw, "c|", 2) != 0)
        return BG_ERR_INVALID;
    char *bar = strchr(raw + 2, '|');
    if (bar == NULL)
        return BG_ERR_INVALID;
    *bar = '\0';
    int64_t ms;
    if (bg_timeutil_parse_rfc3339(raw + 2, strlen(raw + 2), &ms) != 0 ||
        !bg_id_uuid_is_valid(bar + 1))
        return BG_ERR_INVALID;
    *ts = raw + 2;
    *id = bar + 1;
    return 0;
}

/* Parses a message cursor made for the order (tag 'a' or 'd'); writes the id's digits to out. */
static int msg_cursor_parse(const char *cursor, char tag, char out[24])
{
    char raw[CURSOR_RAW_MAX + 1];
    if (bg_crypto_b64url_decode_str(cursor, raw, sizeof(raw)) != 0 || raw[0] != tag ||
        raw[1] != '|')
        return BG_ERR_INVALID;
    const char *digits = raw + 2;
    size_t n = strlen(digits);
    if (n == 0 || n > 18)
        return BG_ERR_INVALID;
    for (size_t i = 0; i < n; i++)
        if (digits[i] < '0' || digits[i] > '9')
            return BG_ERR_INVALID;
    memcpy(out, digits, n + 1);
    return 0;
}

/* ---- checks ---- */

/* A title: valid UTF-8 of 1..BG_CHAT_TITLE_MAX characters. */
static bool title_ok(const char *title)
{
    if (title == NULL || title[0] == '\0')
        return false;
    size_t len = strnlen(title, BG_CHAT_TITLE_SIZE);
    return len < BG_CHAT_TITLE_SIZE && bg_json_utf8_is_valid(title, len) &&
           bg_utf8_chars(title) <= BG_CHAT_TITLE_MAX;
}

/* Message content: valid UTF-8 of at most BG_CHAT_CONTENT_MAX characters, non-empty if asked. */
static bool content_ok(const char *content, bool may_be_empty)
{
    if (content == NULL || (!may_be_empty && content[0] == '\0'))
        return false;
    size_t len = strnlen(content, (size_t)BG_CHAT_CONTENT_MAX * 4 + 1);
    return len <= (size_t)BG_CHAT_CONTENT_MAX * 4 && bg_json_utf8_is_valid(content, len) &&
           bg_utf8_chars(content) <= BG_CHAT_CONTENT_MAX;
}

static bool channel_ok(const char *channel)
{
    return channel != NULL && (strcmp(channel, "web") == 0 || strcmp(channel, "telegram") == 0 ||
                               strcmp(channel, "api") == 0);
}

/* ---- conversations ---- */

int bg_chat_get(PGconn *c, const char *user_id, const char *conversation_id,
                bg_chat_conversation_t *out)
{
    if (!bg_id_uuid_is_valid(user_id) || !bg_id_uuid_is_valid(conversation_id))
        return BG_ERR_NOT_FOUND;
    const char *p[] = {conversation_id, user_id};
    PGresult *res;
    int rc =
        bg_pg_exec_prep(c,
                        "SELECT " CONV_COLS CONV_FROM
                        "WHERE c.id = $1::uuid AND c.user_id = $2::uuid AND c.deleted_at IS NULL",
                        2, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) == 1)
        read_conversation(res, 0, out);
    else
        rc = BG_ERR_NOT_FOUND;
    PQclear(res);
    return rc;
}

int bg_chat_create(PGconn *c, const char *user_id, const char *agent_id, const char *channel,
                   const char *title, bg_chat_allow_fn allow, void *allow_ctx,
                   bg_chat_conversation_t *out)
{
    if (!bg_id_uuid_is_valid(user_id) || !bg_id_uuid_is_valid(agent_id))
        return BG_ERR_NOT_FOUND;
    if (!channel_ok(channel) || (bg_str_present(title) && !title_ok(title)))
        return BG_ERR_INVALID;

    /*
     * The agent as this user may see it (the same rules as GET /agents), with the prompt version
     * in force now: the conversation keeps it even when the prompt moves on.
     */
    const char *pa[] = {agent_id, user_id, channel};
    PGresult *res;
    int rc = bg_pg_exec_prep(
        c,
        "SELECT a.organization_id, a.prompt_id, coalesce(a.prompt_version, p.current_version) "
        "FROM agents a LEFT JOIN prompts p ON p.id = a.prompt_id "
        "WHERE a.id = $1::uuid AND a.deleted_at IS NULL AND a.status = 'active' "
        "AND $3 = ANY (a.channels) "
        "AND (a.visibility = 'public' "
        "  OR (a.visibility = 'organization' AND a.organization_id IN "
        "      (SELECT m.organization_id FROM memberships m WHERE m.user_id = $2::uuid)) "
        "  OR (a.visibility = 'private' AND a.created_by = $2::uuid))",
        3, pa, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) != 1) {
        PQclear(res);
        return BG_ERR_NOT_FOUND;
    }
    char org[BG_CHAT_ID_SIZE], prompt[BG_CHAT_ID_SIZE], version[16];
    copy(org, sizeof(org), res, 0, 0);
    copy(prompt, sizeof(prompt), res, 0, 1);
    copy(version, sizeof(version), res, 0, 2);
    PQclear(res);
    if (allow != NULL && !allow(allow_ctx, user_id, agent_id))
        return BG_ERR_DENIED;

    /* a prompt without a version to pin (none published) is recorded as no prompt at all */
    bool pinned = prompt[0] != '\0' && version[0] != '\0';
    char id[BG_UUID_STR_LEN + 1];
    bg_id_uuid_v7_str(id);
    const char *pi[] = {id,
                        user_id,
                        org[0] != '\0' ? org : NULL,
                        agent_id,
                        channel,
                        bg_str_present(title) ? title : "",
                        pinned ? prompt : NULL,
                        pinned ? version : NULL};
    rc = bg_pg_run(c,
                   "INSERT INTO conversations (id, user_id, organization_id, agent_id, channel, "
                   "title, prompt_id, prompt_version) VALUES ($1::uuid, $2::uuid, $3::uuid, "
                   "$4::uuid, $5, $6, $7::uuid, $8::integer)",
                   8, pi);
    if (rc != 0)
        return rc;
    return bg_chat_get(c, user_id, id, out);
}

int bg_chat_list(PGconn *c, const char *user_id, const char *cursor, size_t limit,
                 bg_chat_conversation_t *out, size_t *count, char next_cursor[BG_CHAT_CURSOR_SIZE])
{
    *count = 0;
    next_cursor[0] = '\0';
    if (limit < 1 || limit > BG_CHAT_PAGE_MAX)
        return BG_ERR_INVALID;
    char raw[CURSOR_RAW_MAX + 1];
    const char *after_ts = NULL, *after_id = NULL;
    if (bg_str_present(cursor) && conv_cursor_parse(cursor, raw, &after_ts, &after_id) != 0)
        return BG_ERR_INVALID;
    if (!bg_id_uuid_is_valid(user_id))
        return 0; /* nobody owns anything */

    char lim[24];
    /* One row more than asked tells whether there is a next page. */
    snprintf(lim, sizeof(lim), "%zu", limit + 1);
    const char *p[] = {user_id, after_ts, after_id, lim};
    PGresult *res;
    int rc = bg_pg_exec_prep(c,
                             "SELECT " CONV_COLS CONV_FROM
                             "WHERE c.user_id = $1::uuid AND c.deleted_at IS NULL "
                             "AND ($2::timestamptz IS NULL "
                             "  OR (c.updated_at, c.id) < ($2::timestamptz, $3::uuid)) "
                             "ORDER BY c.updated_at DESC, c.id DESC LIMIT $4::bigint",
                             4, p, &res);
    if (rc != 0)
        return rc;
    size_t n = (size_t)PQntuples(res);
    size_t shown = n < limit ? n : limit;
    for (size_t i = 0; i < shown; i++)
        read_conversation(res, (int)i, &out[i]);
    if (n > limit) {
        char last[CURSOR_RAW_MAX + 1];
        int len = snprintf(last, sizeof(last), "c|%s|%s", text(res, (int)shown - 1, CONV_NCOLS),
                           text(res, (int)shown - 1, 0));
        if (len < 0 || (size_t)len >= sizeof(last))
            rc = BG_ERR_IO;
        else
            rc = bg_crypto_b64url_encode(last, (size_t)len, next_cursor, BG_CHAT_CURSOR_SIZE);
    }
    PQclear(res);
    if (rc == 0)
        *count = shown;
    else
        next_cursor[0] = '\0';
    return rc;
}

int bg_chat_rename(PGconn *c, const char *user_id, const char *conversation_id, const char *title,
                   bg_chat_conversation_t *out)
{
    if (!bg_id_uuid_is_valid(user_id) || !bg_id_uuid_is_valid(conversation_id))
        return BG_ERR_NOT_FOUND;
    if (!title_ok(title))
        return BG_ERR_INVALID;
    const char *p[] = {conversation_id, user_id, title};
    PGresult *res;
    int rc = bg_pg_exec_prep(c,
                             "UPDATE conversations SET title = $3 WHERE id = $1::uuid "
                             "AND user_id = $2::uuid AND deleted_at IS NULL RETURNING id",
                             3, p, &res);
    if (rc != 0)
        return rc;
    bool found = PQntuples(res) == 1;
    PQclear(res);
    if (!found)
        return BG_ERR_NOT_FOUND;
    return bg_chat_get(c, user_id, conversation_id, out);
}

int bg_chat_delete(PGconn *c, const char *user_id, const char *conversation_id)
{
    if (!bg_id_uuid_is_valid(user_id) || !bg_id_uuid_is_valid(conversation_id))
        return BG_ERR_NOT_FOUND;
    const char *p[] = {conversation_id, user_id};
    PGresult *res;
    int rc = bg_pg_exec_prep(c,
                             "UPDATE conversations SET deleted_at = now() WHERE id = $1::uuid "
                             "AND user_id = $2::uuid AND deleted_at IS NULL RETURNING id",
                             2, p, &res);
    if (rc != 0)
        return rc;
    rc = PQntuples(res) == 1 ? 0 : BG_ERR_NOT_FOUND;
    PQclear(res);
    return rc;
}

/* ---- messages ---- */

/*
 * A page of messages after a cursor, cut at limit rows and at a byte budget: the inner select takes
 * the rows, the middle one adds how many bytes of content come before each (a running sum) and
 * how many rows the inner one found, and the outer one keeps the rows that start within the
 * budget, so the first always comes. $1 conversation, $2 after id or NULL, $3 rows, $4 budget.
 */
#define PAGE_SQL(cmp, dir)                                                                         \
    "SELECT " MSG_COLS ", t.found FROM (SELECT s.*, count(*) OVER () AS found, "                   \
    "sum(octet_length(s.content)) OVER (ORDER BY s.id " dir " ROWS UNBOUNDED PRECEDING) "          \
    "- octet_length(s.content) AS before FROM (SELECT " MSG_INNER " FROM messages m "              \
    "WHERE m.conversation_id = $1::uuid AND ($2::bigint IS NULL OR m.id " cmp " $2::bigint) "      \
    "ORDER BY m.id " dir " LIMIT $3::bigint) s) t WHERE t.before < $4::bigint ORDER BY t.id " dir

int bg_chat_messages(PGconn *c, const char *user_id, const char *conversation_id,
                     const char *cursor, size_t limit, bool newest_first,
                     bg_chat_message_list_t *out, char next_cursor[BG_CHAT_CURSOR_SIZE])
{
    out->items = NULL;
    out->count = 0;
    next_cursor[0] = '\0';
    if (!bg_id_uuid_is_valid(user_id) || !bg_id_uuid_is_valid(conversation_id))
        return BG_ERR_NOT_FOUND;
    const char tag = newest_first ? 'd' : 'a';
    char after[24];
    if (limit < 1 || limit > BG_CHAT_PAGE_MAX ||
        (bg_str_present(cursor) && msg_cursor_parse(cursor, tag, after) != 0))
        return BG_ERR_INVALID;

    const char *pc[] = {conversation_id, user_id};
    PGresult *res;
    int rc =
        bg_pg_exec_prep(c,
                        "SELECT 1 FROM conversations WHERE id = $1::uuid AND user_id = $2::uuid "
                        "AND deleted_at IS NULL",
                        2, pc, &res);
    if (rc != 0)
        return rc;
    bool found = PQntuples(res) == 1;
    PQclear(res);
    if (!found)
        return BG_ERR_NOT_FOUND;

    char lim[24], budget[24];
    snprintf(lim, sizeof(lim), "%zu", limit + 1);
    snprintf(budget, sizeof(budget), "%u", BG_CHAT_PAGE_BYTES);
    const char *p[] = {conversation_id, bg_str_present(cursor) ? after : NULL, lim, budget};
    rc =
        bg_pg_exec_prep(c, newest_first ? PAGE_SQL("<", "DESC") : PAGE_SQL(">", "ASC"), 4, p, &res);
    if (rc != 0)
        return rc;
    int n = PQntuples(res);
    int shown = n < (int)limit ? n : (int)limit;
    /* more rows exist when the inner select found more than the page shows */
    bool more = n > 0 && int_or(res, 0, 8, 0) > shown;
    read_messages(res, shown, out);
    PQclear(res);
    if (more) {
        char last[CURSOR_RAW_MAX + 1];
        int len =
            snprintf(last, sizeof(last), "%c|%lld", tag, (long long)out->items[out->count - 1].id);
        if (len < 0 || (size_t)len >= sizeof(last))
            rc = BG_ERR_IO;
        else
            rc = bg_crypto_b64url_encode(last, (size_t)len, next_cursor, BG_CHAT_CURSOR_SIZE);
        if (rc != 0) {
            bg_chat_message_list_dispose(out);
            next_cursor[0] = '\0';
        }
    }
    return rc;
}

/*
 * Locks a live conversation (of user_id when not NULL) for the rest of the transaction.
 * BG_ERR_NOT_FOUND when there is none.
 */
static int lock_conversation(PGconn *c, const char *conversation_id, const char *user_id)
{
    const char *p[] = {conversation_id, user_id};
    PGresult *res;
    int rc =
        bg_pg_exec_prep(c,
                        "SELECT 1 FROM conversations WHERE id = $1::uuid AND deleted_at IS NULL "
                        "AND ($2::uuid IS NULL OR user_id = $2::uuid) FOR UPDATE",
                        2, p, &res);
    if (rc != 0)
        return rc;
    rc = PQntuples(res) == 1 ? 0 : BG_ERR_NOT_FOUND;
    PQclear(res);
    return rc;
}

/* Counts one new message on the conversation (inside the caller's transaction). */
static int count_message(PGconn *c, const char *conversation_id)
{
    const char *p[] = {conversation_id};
    return bg_pg_run(c,
                     "UPDATE conversations SET message_count = message_count + 1, "
                     "last_message_at = now() WHERE id = $1::uuid",
                     1, p);
}

int bg_chat_append_user(PGconn *c, const char *user_id, const char *conversation_id,
                        const char *content, const char *job_id, const char *request_id,
                        int64_t *message_id)
{
    if (!bg_id_uuid_is_valid(user_id) || !bg_id_uuid_is_valid(conversation_id))
        return BG_ERR_NOT_FOUND;
    if (!content_ok(content, false))
        return BG_ERR_INVALID;
    int rc = bg_pg_begin(c);
    if (rc != 0)
        return rc;
    rc = lock_conversation(c, conversation_id, user_id);
    if (rc != 0)
        goto err_rollback;
    const char *p[] = {conversation_id, content, job_id, request_id};
    PGresult *res;
    rc = bg_pg_exec_prep(
        c,
        "INSERT INTO messages (conversation_id, role, content, status, job_id, "
        "request_id) VALUES ($1::uuid, 'user', $2, 'complete', $3, $4) RETURNING id",
        4, p, &res);
    if (rc != 0)
        goto err_rollback;
    rc = bg_pg_int64(res, 0, 0, message_id);
    PQclear(res);
    if (rc != 0)
        goto err_rollback;
    rc = count_message(c, conversation_id);
    if (rc != 0)
        goto err_rollback;
    return bg_pg_commit(c);

err_rollback:
    bg_pg_rollback(c);
    return rc;
}

int bg_chat_post_user(PGconn *c, const char *user_id, const char *conversation_id,
                      const char *content, const char *job_id, const char *request_id,
                      bg_chat_posted_t *out)
{
    memset(out, 0, sizeof(*out));
    if (!bg_id_uuid_is_valid(user_id) || !bg_id_uuid_is_valid(conversation_id))
        return BG_ERR_NOT_FOUND;
    if (!content_ok(content, false))
        return BG_ERR_INVALID;
    /* the UPDATE takes the conversation's row lock, which serialises the count as
     * bg_chat_append_user's SELECT … FOR UPDATE does; a missing row or user writes nothing, and
     * a job whose message is stored already (a redelivered job) finds it and writes nothing */
    const char *p[] = {conversation_id, user_id, content, job_id, request_id};
    PGresult *res;
    int rc =
        bg_pg_exec_prep(c,
                        "WITH u AS (SELECT name FROM users WHERE id = $2::uuid "
                        "AND deleted_at IS NULL AND status = 'active'), "
                        "prior AS (SELECT m.id, k.agent_id FROM messages m JOIN conversations k "
                        "ON k.id = m.conversation_id WHERE m.job_id = $4 AND m.role = 'user' "
                        "AND k.id = $1::uuid AND k.user_id = $2::uuid AND k.deleted_at IS NULL), "
                        "conv AS (UPDATE conversations SET message_count = message_count + 1, "
                        "last_message_at = now() WHERE id = $1::uuid AND user_id = $2::uuid "
                        "AND deleted_at IS NULL AND EXISTS (SELECT 1 FROM u) "
                        "AND NOT EXISTS (SELECT 1 FROM prior) RETURNING id, agent_id), "
                        "m AS (INSERT INTO messages (conversation_id, role, content, status, "
                        "job_id, request_id) SELECT id, 'user', $3, 'complete', $4, $5 FROM conv "
                        "RETURNING id) "
                        "SELECT m.id, conv.agent_id, u.name FROM m, conv, u "
                        "UNION ALL SELECT prior.id, prior.agent_id, u.name FROM prior, u",
                        5, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) != 1) {
        PQclear(res);
        return BG_ERR_NOT_FOUND;
    }
    rc = bg_pg_int64(res, 0, 0, &out->message_id);
    copy(out->agent_id, sizeof(out->agent_id), res, 0, 1);
    copy(out->user_name, sizeof(out->user_name), res, 0, 2);
    PQclear(res);
    return rc;
}

/* Finds the assistant reply of job_id: its id and conversation. BG_ERR_NOT_FOUND when none. */
static int find_reply(PGconn *c, const char *job_id, int64_t *id, char conv[BG_CHAT_ID_SIZE])
{
    const char *p[] = {job_id};
    PGresult *res;
    int rc = bg_pg_exec_prep(c,
                             "SELECT id, conversation_id FROM messages WHERE job_id = $1 "
                             "AND role = 'assistant'",
                             1, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) == 1) {
        rc = bg_pg_int64(res, 0, 0, id);
        copy(conv, BG_CHAT_ID_SIZE, res, 0, 1);
    } else {
        rc = BG_ERR_NOT_FOUND;
    }
    PQclear(res);
    return rc;
}

int bg_chat_append_assistant(PGconn *c, const char *conversation_id, const bg_chat_reply_t *reply,
                             int64_t *message_id, bool *created)
{
    if (created != NULL)
        *created = false;
    if (!bg_id_uuid_is_valid(conversation_id))
        return BG_ERR_NOT_FOUND;
    const char *status = reply->status != NULL ? reply->status : "complete";
    if (!bg_str_present(reply->job_id) || strlen(reply->job_id) > 128 ||
        !content_ok(reply->content, true) ||
        (strcmp(status, "complete") != 0 && strcmp(status, "failed") != 0 &&
         strcmp(status, "canceled") != 0))
        return BG_ERR_INVALID;

    char pt[24], ct[24];
    snprintf(pt, sizeof(pt), "%lld", (long long)reply->prompt_tokens);
    snprintf(ct, sizeof(ct), "%lld", (long long)reply->completion_tokens);
    int rc = bg_pg_begin(c);
    if (rc != 0)
        return rc;
    rc = lock_conversation(c, conversation_id, NULL);
    if (rc != 0)
        goto err_rollback;
    const char *p[] = {conversation_id,
                       reply->content,
                       status,
                       reply->job_id,
                       reply->request_id,
                       bg_str_present(reply->model) ? reply->model : NULL,
                       reply->prompt_tokens >= 0 ? pt : NULL,
                       reply->completion_tokens >= 0 ? ct : NULL,
                       reply->error_class};
    PGresult *res;
    /* a redelivered job meets its first delivery's row here and inserts nothing */
    rc = bg_pg_exec_prep(c,
                         "INSERT INTO messages (conversation_id, role, content, status, job_id, "
                         "request_id, model, prompt_tokens, completion_tokens, error_class) "
                         "VALUES ($1::uuid, 'assistant', $2, $3, $4, $5, $6, $7::integer, "
                         "$8::integer, $9) ON CONFLICT (job_id, role) WHERE job_id IS NOT NULL "
                         "DO NOTHING RETURNING id",
                         9, p, &res);
    if (rc != 0)
        goto err_rollback;
    bool inserted = PQntuples(res) == 1;
    if (inserted)
        rc = bg_pg_int64(res, 0, 0, message_id);
    PQclear(res);
    if (rc != 0)
        goto err_rollback;
    if (inserted) {
        rc = count_message(c, conversation_id);
    } else {
        char conv[BG_CHAT_ID_SIZE];
        rc = find_reply(c, reply->job_id, message_id, conv);
        /* the job id is another conversation's: a caller's mistake, never overwritten */
        if (rc == 0 && strcmp(conv, conversation_id) != 0)
            rc = BG_ERR_CONFLICT;
        else if (rc == BG_ERR_NOT_FOUND)
            rc = BG_ERR_RETRY; /* the conflicting row vanished meanwhile */
    }
    if (rc != 0)
        goto err_rollback;
    rc = bg_pg_commit(c);
    if (rc == 0 && created != NULL)
        *created = inserted;
    return rc;

err_rollback:
    bg_pg_rollback(c);
    return rc;
}

int bg_chat_history(PGconn *c, const char *conversation_id, int64_t upto_id, size_t max_messages,
                    size_t max_bytes, bg_chat_message_list_t *out)
{
    out->items = NULL;
    out->count = 0;
    if (!bg_id_uuid_is_valid(conversation_id))
        return BG_ERR_NOT_FOUND;
    if (max_messages < 1 || max_messages > BG_CHAT_HISTORY_MAX || upto_id < 0)
        return BG_ERR_INVALID;
    char upto[24], lim[24], budget[24];
    snprintf(upto, sizeof(upto), "%lld", (long long)upto_id);
    snprintf(lim, sizeof(lim), "%zu", max_messages);
    snprintf(budget, sizeof(budget), "%zu", max_bytes);
    const char *p[] = {conversation_id, upto, lim, budget};
    /*
     * One round trip: the live conversation (no row: not found) joined with its newest rows, with
     * a running sum of their sizes from the newest back: the rows within the budget are then
     * exactly a contiguous run ending at the newest. An empty history is one row of NULLs.
     */
    PGresult *res;
    int rc = bg_pg_exec_prep(
        c,
        "SELECT " MSG_COLS " FROM conversations k LEFT JOIN LATERAL (SELECT * FROM (SELECT s.*, "
        "sum(octet_length(s.content)) OVER (ORDER BY s.id DESC ROWS UNBOUNDED PRECEDING) AS "
        "running FROM (SELECT " MSG_INNER " FROM messages m WHERE m.conversation_id = k.id "
        "AND m.status = 'complete' AND ($2::bigint = 0 OR m.id <= $2::bigint) "
        "ORDER BY m.id DESC LIMIT $3::bigint) s) w WHERE $4::bigint = 0 OR w.running <= "
        "$4::bigint) "
        "t ON true WHERE k.id = $1::uuid AND k.deleted_at IS NULL ORDER BY t.id ASC",
        4, p, &res);
    if (rc != 0)
        return rc;
    int rows = PQntuples(res);
    if (rows == 0)
        rc = BG_ERR_NOT_FOUND;
    else if (!(rows == 1 && PQgetisnull(res, 0, 0)))
        read_messages(res, rows, out);
    PQclear(res);
    return rc;
}

int bg_chat_context(PGconn *c, const char *user_id, const char *conversation_id, const char *job_id,
                    size_t max_messages, size_t max_bytes, bg_chat_context_t *out)
{
    memset(out, 0, sizeof(*out));
    if (!bg_id_uuid_is_valid(user_id) || !bg_id_uuid_is_valid(conversation_id))
        return BG_ERR_NOT_FOUND;
    if (job_id == NULL || job_id[0] == '\0' || max_messages < 1 ||
        max_messages > BG_CHAT_HISTORY_MAX)
        return BG_ERR_INVALID;
    char lim[24], budget[24];
    snprintf(lim, sizeof(lim), "%zu", max_messages);
    snprintf(budget, sizeof(budget), "%zu", max_bytes);
    const char *p[] = {conversation_id, user_id, job_id, lim, budget};
    /*
     * As bg_chat_history, with the conversation's agent and the user's name on every row (columns
     * 8 and 9) and the bound taken from the job's own user message when it is stored (upto = its
     * id, exclusive). An empty history is one row whose message columns are NULL.
     */
    PGresult *res;
    int rc = bg_pg_exec_prep(
        c,
        "SELECT " MSG_COLS ", k.agent_id, coalesce(u.name, '') FROM conversations k "
        "JOIN users u ON u.id = k.user_id AND u.deleted_at IS NULL AND u.status = 'active' "
        "LEFT JOIN LATERAL (SELECT * FROM (SELECT s.*, "
        "sum(octet_length(s.content)) OVER (ORDER BY s.id DESC ROWS UNBOUNDED PRECEDING) AS "
        "running FROM (SELECT " MSG_INNER " FROM messages m WHERE m.conversation_id = k.id "
        "AND m.status = 'complete' AND m.id < coalesce((SELECT x.id FROM messages x "
        "WHERE x.job_id = $3 AND x.role = 'user' AND x.conversation_id = k.id), "
        "9223372036854775807) ORDER BY m.id DESC LIMIT $4::bigint) s) w "
        "WHERE $5::bigint = 0 OR w.running <= $5::bigint) t ON true "
        "WHERE k.id = $1::uuid AND k.user_id = $2::uuid AND k.deleted_at IS NULL "
        "ORDER BY t.id ASC",
        5, p, &res);
    if (rc != 0)
        return rc;
    int rows = PQntuples(res);
    if (rows == 0) {
        rc = BG_ERR_NOT_FOUND;
    } else {
        copy(out->agent_id, sizeof(out->agent_id), res, 0, 8);
        copy(out->user_name, sizeof(out->user_name), res, 0, 9);
        if (!(rows == 1 && PQgetisnull(res, 0, 0)))
            read_messages(res, rows, &out->history);
    }
    PQclear(res);
    return rc;
}

void bg_chat_context_dispose(bg_chat_context_t *ctx)
{
    if (ctx != NULL)
        bg_chat_message_list_dispose(&ctx->history);
}
