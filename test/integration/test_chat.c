/*
 * The chat module on the real schema: conversations with the seeded "assistant" agent and with
 * agents a user may or may not use; pages of conversations and messages walked to the end without
 * duplicates or gaps (both orders, across a byte-budget cut); another user's and deleted
 * conversations not found; user and assistant appends counted on the conversation, the assistant's
 * written once per job; and the history the llm worker loads, bounded by count, bytes and id.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/accounts.h"
#include "bg/chat.h"
#include "bg/err.h"
#include "bg/id.h"
#include "bg/pg.h"
#include "bgtest.h"

#define FAKE_HASH "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g"

static bgt_pg_t db;
static PGconn *conn;
static const bg_actor_t actor = {.kind = "user", .request_id = "req-chat", .ip = "127.0.0.1"};

static void setup(void)
{
    cr_assert_eq(bgt_pg_create(&db, true), 0);
    char err[512];
    cr_assert_eq(bg_pg_connect(db.url, 3, &conn, err, sizeof(err)), 0, "connect: %s", err);
}

static void teardown(void)
{
    PQfinish(conn);
    conn = NULL;
    bgt_pg_drop(&db);
}

TestSuite(chat, .init = setup, .fini = teardown, .timeout = 120);

/* Runs sql with up to 2 parameters; writes the first field of the first row into out. */
static void q(const char *sql, const char *p1, const char *p2, char *out, size_t outlen)
{
    const char *p[] = {p1, p2};
    int n = p2 != NULL ? 2 : p1 != NULL ? 1 : 0;
    PGresult *res;
    int rc = bg_pg_exec(conn, sql, n, n > 0 ? p : NULL, &res);
    cr_assert_eq(rc, 0, "%s: %s", sql, bg_strerror(rc));
    const char *v = PQntuples(res) > 0 && PQnfields(res) > 0 && !PQgetisnull(res, 0, 0)
                        ? PQgetvalue(res, 0, 0)
                        : "";
    if (out != NULL)
        bg_strlcpy(out, v, outlen);
    PQclear(res);
}

static void user(const char *email, char id[BG_ACCT_ID_LEN])
{
    bg_user_t u;
    cr_assert_eq(bg_acct_register(conn, email, FAKE_HASH, "Chat", "en", &actor, &u), 0);
    bg_strlcpy(id, u.id, BG_ACCT_ID_LEN);
}

/* The seeded agent everyone may chat with. */
static void assistant(char id[BG_CHAT_ID_SIZE])
{
    q("SELECT id FROM agents WHERE slug = 'assistant' AND organization_id IS NULL "
      "AND deleted_at IS NULL",
      NULL, NULL, id, BG_CHAT_ID_SIZE);
    cr_assert(id[0] != '\0', "no assistant agent in a migrated database");
}

static void start(const char *uid, const char *agent, const char *title, bg_chat_conversation_t *c)
{
    int rc = bg_chat_create(conn, uid, agent, "web", title, NULL, NULL, c);
    cr_assert_eq(rc, 0, "create: %s", bg_strerror(rc));
}

static int64_t say(const char *uid, const char *conv, const char *content)
{
    int64_t id = 0;
    int rc = bg_chat_append_user(conn, uid, conv, content, NULL, NULL, &id);
    cr_assert_eq(rc, 0, "append: %s", bg_strerror(rc));
    return id;
}

Test(chat, create_read_rename_delete)
{
    char uid[BG_ACCT_ID_LEN], agent[BG_CHAT_ID_SIZE];
    user("crud@chat.example", uid);
    assistant(agent);

    bg_chat_conversation_t c, got;
    start(uid, agent, NULL, &c);
    cr_assert(bg_id_uuid_is_valid(c.id));
    cr_assert_str_eq(c.agent_id, agent);
    cr_assert_str_eq(c.agent_name, "Assistant");
    cr_assert_str_eq(c.title, "");
    cr_assert_str_eq(c.channel, "web");
    cr_assert_eq(c.message_count, 0);
    cr_assert_str_eq(c.last_message_at, "");
    cr_assert_eq(strlen(c.created_at), 20, "RFC 3339 UTC: %s", c.created_at);

    /* the prompt version in force is recorded */
    char v[16];
    q("SELECT prompt_version FROM conversations WHERE id = $1", c.id, NULL, v, sizeof(v));
    cr_assert_str_eq(v, "1");

    cr_assert_eq(bg_chat_get(conn, uid, c.id, &got), 0);
    cr_assert_str_eq(got.id, c.id);

    cr_assert_eq(bg_chat_rename(conn, uid, c.id, "Trip to Kraków ✈", &got), 0);
    cr_assert_str_eq(got.title, "Trip to Kraków ✈");
    cr_assert_eq(bg_chat_rename(conn, uid, c.id, "", &got), BG_ERR_INVALID);
    char long_title[BG_CHAT_TITLE_MAX * 2 + 2];
    memset(long_title, 'x', BG_CHAT_TITLE_MAX + 1);
    long_title[BG_CHAT_TITLE_MAX + 1] = '\0';
    cr_assert_eq(bg_chat_rename(conn, uid, c.id, long_title, &got), BG_ERR_INVALID);
    long_title[BG_CHAT_TITLE_MAX] = '\0';
    cr_assert_eq(bg_chat_rename(conn, uid, c.id, long_title, &got), 0);

    cr_assert_eq(bg_chat_delete(conn, uid, c.id), 0);
    cr_assert_eq(bg_chat_get(conn, uid, c.id, &got), BG_ERR_NOT_FOUND);
    cr_assert_eq(bg_chat_delete(conn, uid, c.id), BG_ERR_NOT_FOUND);
    cr_assert_eq(bg_chat_rename(conn, uid, c.id, "again", &got), BG_ERR_NOT_FOUND);
    int64_t mid;
    cr_assert_eq(bg_chat_append_user(conn, uid, c.id, "hello?", NULL, NULL, &mid),
                 BG_ERR_NOT_FOUND);
    bg_chat_conversation_t page[4];
    size_t n;
    char next[BG_CHAT_CURSOR_SIZE];
    cr_assert_eq(bg_chat_list(conn, uid, NULL, 4, page, &n, next), 0);
    cr_assert_eq(n, 0, "a deleted conversation is listed");
    /* soft: the row is still there for usage records */
    q("SELECT count(*) FROM conversations WHERE id = $1 AND deleted_at IS NOT NULL", c.id, NULL, v,
      sizeof(v));
    cr_assert_str_eq(v, "1");
}

Test(chat, agents_the_user_may_not_use_are_not_found)
{
    char uid[BG_ACCT_ID_LEN], other[BG_ACCT_ID_LEN], agent[BG_CHAT_ID_SIZE];
    user("owner@chat.example", uid);
    user("other@chat.example", other);
    assistant(agent);
    bg_chat_conversation_t c;

    /* a private agent of other's */
    char priv[BG_CHAT_ID_SIZE];
    q("INSERT INTO agents (slug, name, visibility, created_by) VALUES ('mine', 'Mine', "
      "'private', $1) RETURNING id",
      other, NULL, priv, sizeof(priv));
    cr_assert_eq(bg_chat_create(conn, uid, priv, "web", NULL, NULL, NULL, &c), BG_ERR_NOT_FOUND);
    cr_assert_eq(bg_chat_create(conn, other, priv, "web", NULL, NULL, NULL, &c), 0);

    /* not open to the channel, disabled, deleted, unknown, malformed */
    char webonly[BG_CHAT_ID_SIZE];
    q("INSERT INTO agents (slug, name, visibility, channels) VALUES ('webonly', 'Web only', "
      "'public', ARRAY['web']) RETURNING id",
      NULL, NULL, webonly, sizeof(webonly));
    cr_assert_eq(bg_chat_create(conn, uid, webonly, "telegram", NULL, NULL, NULL, &c),
                 BG_ERR_NOT_FOUND);
    cr_assert_eq(bg_chat_create(conn, uid, agent, "sms", NULL, NULL, NULL, &c), BG_ERR_INVALID);
    char off[BG_CHAT_ID_SIZE];
    q("INSERT INTO agents (slug, name, visibility, status) VALUES ('off', 'Off', 'public', "
      "'disabled') RETURNING id",
      NULL, NULL, off, sizeof(off));
    cr_assert_eq(bg_chat_create(conn, uid, off, "web", NULL, NULL, NULL, &c), BG_ERR_NOT_FOUND);
    cr_assert_eq(bg_chat_create(conn, uid, "00000000-0000-4000-8000-000000000001", "web", NULL,
                                NULL, NULL, &c),
                 BG_ERR_NOT_FOUND);
    cr_assert_eq(bg_chat_create(conn, uid, "assistant", "web", NULL, NULL, NULL, &c),
                 BG_ERR_NOT_FOUND);
    char none[8];
    q("SELECT count(*) FROM conversations WHERE user_id = $1", uid, NULL, none, sizeof(none));
    cr_assert_str_eq(none, "0");
}

static bool deny_all(void *ctx, const char *user_id, const char *agent_id)
{
    int *calls = ctx;
    (*calls)++;
    return user_id[0] == '\0' && agent_id[0] == '\0';
}

Test(chat, the_callers_access_check_decides_last)
{
    char uid[BG_ACCT_ID_LEN], agent[BG_CHAT_ID_SIZE];
    user("policy@chat.example", uid);
    assistant(agent);
    bg_chat_conversation_t c;
    int calls = 0;
    cr_assert_eq(bg_chat_create(conn, uid, agent, "web", NULL, deny_all, &calls, &c),
                 BG_ERR_DENIED);
    cr_assert_eq(calls, 1);
    /* it is not asked about agents the user may not see anyway */
    cr_assert_eq(bg_chat_create(conn, uid, "00000000-0000-4000-8000-000000000001", "web", NULL,
                                deny_all, &calls, &c),
                 BG_ERR_NOT_FOUND);
    cr_assert_eq(calls, 1);
}

Test(chat, another_users_conversation_is_not_found)
{
    char a[BG_ACCT_ID_LEN], b[BG_ACCT_ID_LEN], agent[BG_CHAT_ID_SIZE];
    user("a@chat.example", a);
    user("b@chat.example", b);
    assistant(agent);
    bg_chat_conversation_t c, got;
    start(a, agent, "A's", &c);
    say(a, c.id, "private words");

    cr_assert_eq(bg_chat_get(conn, b, c.id, &got), BG_ERR_NOT_FOUND);
    cr_assert_eq(bg_chat_rename(conn, b, c.id, "mine now", &got), BG_ERR_NOT_FOUND);
    cr_assert_eq(bg_chat_delete(conn, b, c.id), BG_ERR_NOT_FOUND);
    int64_t mid;
    cr_assert_eq(bg_chat_append_user(conn, b, c.id, "hi", NULL, NULL, &mid), BG_ERR_NOT_FOUND);
    bg_chat_message_list_t msgs;
    char next[BG_CHAT_CURSOR_SIZE];
    cr_assert_eq(bg_chat_messages(conn, b, c.id, NULL, 10, false, &msgs, next), BG_ERR_NOT_FOUND);
    bg_chat_conversation_t page[4];
    size_t n;
    cr_assert_eq(bg_chat_list(conn, b, NULL, 4, page, &n, next), 0);
    cr_assert_eq(n, 0);
    cr_assert_eq(bg_chat_get(conn, a, "not-a-uuid", &got), BG_ERR_NOT_FOUND);

    /* nothing of b's attempts touched it */
    cr_assert_eq(bg_chat_get(conn, a, c.id, &got), 0);
    cr_assert_str_eq(got.title, "A's");
    cr_assert_eq(got.message_count, 1);
}

#define NCONV 23

Test(chat, conversation_pages_have_no_duplicates_or_gaps)
{
    char uid[BG_ACCT_ID_LEN], agent[BG_CHAT_ID_SIZE];
    user("pages@chat.example", uid);
    assistant(agent);
    char ids[NCONV][BG_CHAT_ID_SIZE];
    for (int i = 0; i < NCONV; i++) {
        bg_chat_conversation_t c;
        char title[32];
        snprintf(title, sizeof(title), "c%02d", i);
        start(uid, agent, title, &c);
        bg_strlcpy(ids[i], c.id, sizeof(ids[i]));
    }
    /* equal activity times too: ties are broken by id, not lost between pages */
    q("UPDATE conversations SET updated_at = '2026-01-01T00:00:00Z' WHERE user_id = $1 AND "
      "title IN ('c03', 'c04', 'c05', 'c06')",
      uid, NULL, NULL, 0);
    /* activity moves a conversation to the front */
    say(uid, ids[0], "bump");

    bool seen[NCONV] = {false};
    size_t total = 0, pages = 0;
    char cursor[BG_CHAT_CURSOR_SIZE] = "", next[BG_CHAT_CURSOR_SIZE];
    char prev_updated[BG_CHAT_TIME_SIZE] = "9999";
    do {
        bg_chat_conversation_t page[5];
        size_t n;
        cr_assert_eq(bg_chat_list(conn, uid, cursor, 5, page, &n, next), 0);
        cr_assert(n == 5 || next[0] == '\0', "a short page with a next cursor");
        if (pages == 0)
            cr_assert_str_eq(page[0].id, ids[0], "the most recently active is not first");
        for (size_t i = 0; i < n; i++) {
            int k = -1;
            for (int j = 0; j < NCONV; j++)
                if (strcmp(ids[j], page[i].id) == 0)
                    k = j;
            cr_assert(k >= 0, "a conversation of nobody's");
            cr_assert_not(seen[k], "%s listed twice", page[i].title);
            seen[k] = true;
            cr_assert(strcmp(page[i].updated_at, prev_updated) <= 0, "not newest first");
            bg_strlcpy(prev_updated, page[i].updated_at, sizeof(prev_updated));
        }
        total += n;
        pages++;
        bg_strlcpy(cursor, next, sizeof(cursor));
    } while (cursor[0] != '\0');
    cr_assert_eq(total, NCONV);
    cr_assert_eq(pages, (NCONV + 4) / 5);

    /* forged and foreign cursors, limits out of range */
    bg_chat_conversation_t page[5];
    size_t n;
    cr_assert_eq(bg_chat_list(conn, uid, "not*base64", 5, page, &n, next), BG_ERR_INVALID);
    cr_assert_eq(bg_chat_list(conn, uid, "YXwxMjM", 5, page, &n, next), BG_ERR_INVALID); /* a|123 */
    cr_assert_eq(bg_chat_list(conn, uid, NULL, 0, page, &n, next), BG_ERR_INVALID);
    cr_assert_eq(bg_chat_list(conn, uid, NULL, BG_CHAT_PAGE_MAX + 1, page, &n, next),
                 BG_ERR_INVALID);
}

/* Walks every page of messages in one order; checks ids strictly monotonic and returns the count.
 */
static size_t walk_messages(const char *uid, const char *conv, size_t limit, bool newest_first,
                            int64_t *first, int64_t *last)
{
    char cursor[BG_CHAT_CURSOR_SIZE] = "", next[BG_CHAT_CURSOR_SIZE];
    size_t total = 0;
    int64_t prev = newest_first ? INT64_MAX : 0;
    do {
        bg_chat_message_list_t page;
        int rc = bg_chat_messages(conn, uid, conv, cursor, limit, newest_first, &page, next);
        cr_assert_eq(rc, 0, "messages: %s", bg_strerror(rc));
        cr_assert(page.count > 0 || next[0] == '\0', "an empty page with a next cursor");
        for (size_t i = 0; i < page.count; i++) {
            int64_t id = page.items[i].id;
            cr_assert(newest_first ? id < prev : id > prev, "order broken or a duplicate");
            if (total == 0 && i == 0)
                *first = id;
            *last = id;
            prev = id;
            cr_assert_eq(page.items[i].content_len, strlen(page.items[i].content));
        }
        total += page.count;
        bg_chat_message_list_dispose(&page);
        bg_strlcpy(cursor, next, sizeof(cursor));
    } while (cursor[0] != '\0');
    return total;
}

Test(chat, message_pages_in_both_orders)
{
    char uid[BG_ACCT_ID_LEN], agent[BG_CHAT_ID_SIZE];
    user("messages@chat.example", uid);
    assistant(agent);
    bg_chat_conversation_t c;
    start(uid, agent, NULL, &c);

    bg_chat_message_list_t page;
    char next[BG_CHAT_CURSOR_SIZE];
    cr_assert_eq(bg_chat_messages(conn, uid, c.id, NULL, 10, false, &page, next), 0);
    cr_assert_eq(page.count, 0);
    cr_assert_str_eq(next, "");

    int64_t ids[17];
    for (int i = 0; i < 17; i++) {
        char text[32];
        snprintf(text, sizeof(text), "message %d", i);
        ids[i] = say(uid, c.id, text);
    }
    int64_t first = 0, last = 0;
    cr_assert_eq(walk_messages(uid, c.id, 4, false, &first, &last), 17);
    cr_assert_eq(first, ids[0]);
    cr_assert_eq(last, ids[16]);
    cr_assert_eq(walk_messages(uid, c.id, 4, true, &first, &last), 17);
    cr_assert_eq(first, ids[16]);
    cr_assert_eq(last, ids[0]);
    cr_assert_eq(walk_messages(uid, c.id, 17, false, &first, &last), 17);

    /* what a page shows */
    cr_assert_eq(bg_chat_messages(conn, uid, c.id, NULL, 1, true, &page, next), 0);
    cr_assert_eq(page.count, 1);
    cr_assert_str_eq(page.items[0].role, "user");
    cr_assert_str_eq(page.items[0].status, "complete");
    cr_assert_str_eq(page.items[0].content, "message 16");
    cr_assert_eq(page.items[0].prompt_tokens, -1);
    cr_assert_neq(next[0], '\0');
    /* a cursor belongs to its order */
    bg_chat_message_list_t other;
    char next2[BG_CHAT_CURSOR_SIZE];
    cr_assert_eq(bg_chat_messages(conn, uid, c.id, next, 1, false, &other, next2), BG_ERR_INVALID);
    bg_chat_message_list_dispose(&page);

    bg_chat_conversation_t got;
    cr_assert_eq(bg_chat_get(conn, uid, c.id, &got), 0);
    cr_assert_eq(got.message_count, 17);
    cr_assert_neq(got.last_message_at[0], '\0');
}

Test(chat, a_page_stops_at_its_byte_budget)
{
    char uid[BG_ACCT_ID_LEN], agent[BG_CHAT_ID_SIZE];
    user("bytes@chat.example", uid);
    assistant(agent);
    bg_chat_conversation_t c;
    start(uid, agent, NULL, &c);
    /* 30 messages of 190 000 bytes: about 5.7 MB, more than one page may carry */
    size_t big = 190000;
    char *text = malloc(big + 1);
    cr_assert_not_null(text);
    memset(text, 'z', big);
    text[big] = '\0';
    for (int i = 0; i < 30; i++)
        say(uid, c.id, text);
    free(text);

    bg_chat_message_list_t page;
    char next[BG_CHAT_CURSOR_SIZE];
    cr_assert_eq(bg_chat_messages(conn, uid, c.id, NULL, 100, false, &page, next), 0);
    cr_assert(page.count >= 1 && page.count < 30, "a page of %zu", page.count);
    cr_assert_leq((page.count - 1) * big, BG_CHAT_PAGE_BYTES);
    cr_assert_neq(next[0], '\0', "the cut page has no next cursor");
    bg_chat_message_list_dispose(&page);
    int64_t first, last;
    cr_assert_eq(walk_messages(uid, c.id, 100, false, &first, &last), 30);
    cr_assert_eq(walk_messages(uid, c.id, 100, true, &first, &last), 30);
}

Test(chat, an_assistant_reply_is_written_once_per_job)
{
    char uid[BG_ACCT_ID_LEN], agent[BG_CHAT_ID_SIZE];
    user("jobs@chat.example", uid);
    assistant(agent);
    bg_chat_conversation_t c, d;
    start(uid, agent, NULL, &c);
    start(uid, agent, NULL, &d);
    int64_t asked = 0;
    cr_assert_eq(bg_chat_append_user(conn, uid, c.id, "2+2?", "job-1", "req-1", &asked), 0);

    bg_chat_reply_t reply = {.job_id = "job-1",
                             .content = "4",
                             .model = "gpt-test",
                             .request_id = "req-1",
                             .prompt_tokens = 12,
                             .completion_tokens = 1};
    int64_t id1 = 0, id2 = 0;
    bool created = false;
    cr_assert_eq(bg_chat_append_assistant(conn, c.id, &reply, &id1, &created), 0);
    cr_assert(created);
    cr_assert_gt(id1, asked);
    /* a redelivery: same id, nothing new, even with another text */
    reply.content = "four";
    cr_assert_eq(bg_chat_append_assistant(conn, c.id, &reply, &id2, &created), 0);
    cr_assert_not(created);
    cr_assert_eq(id2, id1);
    /* the job is c's: d cannot take it */
    cr_assert_eq(bg_chat_append_assistant(conn, d.id, &reply, &id2, &created), BG_ERR_CONFLICT);

    bg_chat_conversation_t got;
    cr_assert_eq(bg_chat_get(conn, uid, c.id, &got), 0);
    cr_assert_eq(got.message_count, 2);
    cr_assert_eq(bg_chat_get(conn, uid, d.id, &got), 0);
    cr_assert_eq(got.message_count, 0);

    bg_chat_message_list_t page;
    char next[BG_CHAT_CURSOR_SIZE];
    cr_assert_eq(bg_chat_messages(conn, uid, c.id, NULL, 10, false, &page, next), 0);
    cr_assert_eq(page.count, 2);
    cr_assert_str_eq(page.items[1].role, "assistant");
    cr_assert_str_eq(page.items[1].content, "4");
    cr_assert_str_eq(page.items[1].model, "gpt-test");
    cr_assert_eq(page.items[1].prompt_tokens, 12);
    cr_assert_eq(page.items[1].completion_tokens, 1);
    bg_chat_message_list_dispose(&page);

    /* the user message's job id is taken for user messages too */
    cr_assert_eq(bg_chat_append_user(conn, uid, c.id, "again", "job-1", NULL, &asked),
                 BG_ERR_CONFLICT);
    /* replies need a job, and a known status */
    reply.job_id = NULL;
    cr_assert_eq(bg_chat_append_assistant(conn, c.id, &reply, &id2, NULL), BG_ERR_INVALID);
    reply.job_id = "job-2";
    reply.status = "weird";
    cr_assert_eq(bg_chat_append_assistant(conn, c.id, &reply, &id2, NULL), BG_ERR_INVALID);
    /* a deleted conversation takes no reply */
    cr_assert_eq(bg_chat_delete(conn, uid, d.id), 0);
    reply.status = NULL;
    cr_assert_eq(bg_chat_append_assistant(conn, d.id, &reply, &id2, NULL), BG_ERR_NOT_FOUND);
}

Test(chat, history_is_bounded_by_count_bytes_and_id)
{
    char uid[BG_ACCT_ID_LEN], agent[BG_CHAT_ID_SIZE];
    user("history@chat.example", uid);
    assistant(agent);
    bg_chat_conversation_t c;
    start(uid, agent, NULL, &c);
    bg_chat_message_list_t none;
    cr_assert_eq(bg_chat_history(conn, c.id, 0, 100, 0, &none), 0, "a new conversation is found");
    cr_assert_eq(none.count, 0, "and has no history");
    bg_chat_message_list_dispose(&none);
    int64_t ids[10];
    for (int i = 0; i < 10; i++) {
        char text[16];
        /* "m0".."m9": 2 bytes each, "m9 failed" is left out below */
        snprintf(text, sizeof(text), "m%d", i);
        if (i % 2 == 0) {
            ids[i] = say(uid, c.id, text);
        } else {
            char job[16];
            snprintf(job, sizeof(job), "h-%d", i);
            bg_chat_reply_t r = {.job_id = job,
                                 .content = text,
                                 .status = i == 9 ? "failed" : NULL,
                                 .prompt_tokens = -1,
                                 .completion_tokens = -1};
            cr_assert_eq(bg_chat_append_assistant(conn, c.id, &r, &ids[i], NULL), 0);
        }
    }

    bg_chat_message_list_t h;
    cr_assert_eq(bg_chat_history(conn, c.id, 0, 100, 0, &h), 0);
    cr_assert_eq(h.count, 9, "failed replies are not history");
    cr_assert_str_eq(h.items[0].content, "m0");
    cr_assert_str_eq(h.items[8].content, "m8");
    bg_chat_message_list_dispose(&h);

    /* the last 3, oldest first */
    cr_assert_eq(bg_chat_history(conn, c.id, 0, 3, 0, &h), 0);
    cr_assert_eq(h.count, 3);
    cr_assert_str_eq(h.items[0].content, "m6");
    cr_assert_str_eq(h.items[2].content, "m8");
    cr_assert_str_eq(h.items[1].role, "assistant");
    bg_chat_message_list_dispose(&h);

    /* 7 bytes hold the newest 3 messages of 2 bytes, not a 4th */
    cr_assert_eq(bg_chat_history(conn, c.id, 0, 100, 7, &h), 0);
    cr_assert_eq(h.count, 3);
    cr_assert_str_eq(h.items[0].content, "m6");
    bg_chat_message_list_dispose(&h);
    cr_assert_eq(bg_chat_history(conn, c.id, 0, 100, 1, &h), 0);
    cr_assert_eq(h.count, 0, "a message larger than the budget came");

    /* up to a given message: what a redelivered job saw the first time */
    cr_assert_eq(bg_chat_history(conn, c.id, ids[4], 100, 0, &h), 0);
    cr_assert_eq(h.count, 5);
    cr_assert_eq(h.items[4].id, ids[4]);
    bg_chat_message_list_dispose(&h);

    cr_assert_eq(bg_chat_history(conn, c.id, 0, 0, 0, &h), BG_ERR_INVALID);
    cr_assert_eq(bg_chat_history(conn, c.id, 0, BG_CHAT_HISTORY_MAX + 1, 0, &h), BG_ERR_INVALID);
    cr_assert_eq(bg_chat_delete(conn, uid, c.id), 0);
    cr_assert_eq(bg_chat_history(conn, c.id, 0, 10, 0, &h), BG_ERR_NOT_FOUND);
}

Test(chat, a_turns_context_is_what_came_before_its_message_with_the_agent_and_name)
{
    char uid[BG_ACCT_ID_LEN], other[BG_ACCT_ID_LEN], agent[BG_CHAT_ID_SIZE];
    user("context@chat.example", uid);
    user("context-other@chat.example", other);
    assistant(agent);
    bg_chat_conversation_t c;
    start(uid, agent, NULL, &c);

    bg_chat_context_t ctx;
    cr_assert_eq(bg_chat_context(conn, uid, c.id, "job-ctx-1", 100, 0, &ctx), 0);
    cr_expect_str_eq(ctx.agent_id, agent, "the conversation's agent, for the job");
    cr_expect_str_eq(ctx.user_name, "Chat", "and the user's name");
    cr_expect_eq(ctx.history.count, 0, "a new conversation has nothing before the first turn");
    bg_chat_context_dispose(&ctx);

    (void)say(uid, c.id, "first");
    bg_chat_reply_t r = {
        .job_id = "ctx-r1", .content = "reply", .prompt_tokens = -1, .completion_tokens = -1};
    int64_t rid = 0;
    cr_assert_eq(bg_chat_append_assistant(conn, c.id, &r, &rid, NULL), 0);
    cr_assert_eq(bg_chat_context(conn, uid, c.id, "job-ctx-1", 100, 0, &ctx), 0);
    cr_assert_eq(ctx.history.count, 2, "everything while the turn's message is not stored");
    cr_expect_str_eq(ctx.history.items[0].content, "first");
    cr_expect_str_eq(ctx.history.items[1].content, "reply");
    bg_chat_context_dispose(&ctx);

    /* stored (a redelivered job): what came before it only, never the message itself, nor later */
    bg_chat_posted_t p;
    cr_assert_eq(bg_chat_post_user(conn, uid, c.id, "second", "job-ctx-1", NULL, &p), 0);
    (void)say(uid, c.id, "a later turn");
    cr_assert_eq(bg_chat_context(conn, uid, c.id, "job-ctx-1", 100, 0, &ctx), 0);
    cr_assert_eq(ctx.history.count, 2);
    cr_expect_str_eq(ctx.history.items[1].content, "reply");
    bg_chat_context_dispose(&ctx);
    /* bounded like the history: the newest one */
    cr_assert_eq(bg_chat_context(conn, uid, c.id, "job-ctx-9", 1, 0, &ctx), 0);
    cr_assert_eq(ctx.history.count, 1);
    cr_expect_str_eq(ctx.history.items[0].content, "a later turn");
    bg_chat_context_dispose(&ctx);

    /* not the caller's, a disabled user, a deleted conversation: not found */
    cr_expect_eq(bg_chat_context(conn, other, c.id, "job-ctx-2", 100, 0, &ctx), BG_ERR_NOT_FOUND);
    q("UPDATE users SET status = 'disabled' WHERE id = $1", uid, NULL, NULL, 0);
    cr_expect_eq(bg_chat_context(conn, uid, c.id, "job-ctx-2", 100, 0, &ctx), BG_ERR_NOT_FOUND);
    q("UPDATE users SET status = 'active' WHERE id = $1", uid, NULL, NULL, 0);
    cr_expect_eq(bg_chat_context(conn, uid, c.id, "", 100, 0, &ctx), BG_ERR_INVALID);
    cr_assert_eq(bg_chat_delete(conn, uid, c.id), 0);
    cr_expect_eq(bg_chat_context(conn, uid, c.id, "job-ctx-2", 100, 0, &ctx), BG_ERR_NOT_FOUND);
}

Test(chat, a_posted_turn_is_checked_stored_and_counted_in_one_statement)
{
    char uid[BG_ACCT_ID_LEN], other[BG_ACCT_ID_LEN], agent[BG_CHAT_ID_SIZE];
    user("poster@chat.example", uid);
    user("intruder@chat.example", other);
    assistant(agent);
    bg_chat_conversation_t c;
    start(uid, agent, "Posted", &c);

    bg_chat_posted_t p;
    cr_assert_eq(bg_chat_post_user(conn, uid, c.id, "Hello there", "job-posted-1", "req-1", &p), 0);
    cr_expect_gt(p.message_id, 0);
    cr_expect_str_eq(p.agent_id, agent, "the conversation's agent comes back for the job");
    cr_expect_str_eq(p.user_name, "Chat", "and the user's name");
    bg_chat_conversation_t after;
    cr_assert_eq(bg_chat_get(conn, uid, c.id, &after), 0);
    cr_expect_eq(after.message_count, 1);

    /* another user's conversation, a deleted one, a disabled user: not found, nothing written */
    cr_expect_eq(bg_chat_post_user(conn, other, c.id, "Mine now", "job-posted-2", NULL, &p),
                 BG_ERR_NOT_FOUND);
    cr_expect_eq(p.message_id, 0);
    q("UPDATE users SET status = 'disabled' WHERE id = $1", uid, NULL, NULL, 0);
    cr_expect_eq(bg_chat_post_user(conn, uid, c.id, "Still here?", "job-posted-3", NULL, &p),
                 BG_ERR_NOT_FOUND);
    q("UPDATE users SET status = 'active' WHERE id = $1", uid, NULL, NULL, 0);
    cr_expect_eq(bg_chat_post_user(conn, uid, c.id, "", "job-posted-4", NULL, &p), BG_ERR_INVALID);
    /* a job delivered again finds the message of its first run: one message, counted once */
    int64_t first = 0;
    cr_assert_eq(bg_chat_post_user(conn, uid, c.id, "Hello there", "job-posted-1", NULL, &p), 0);
    first = p.message_id;
    cr_assert_eq(bg_chat_post_user(conn, uid, c.id, "Hello there", "job-posted-1", NULL, &p), 0,
                 "a job id starts one turn, however often it is delivered");
    cr_expect_eq(p.message_id, first);
    cr_expect_str_eq(p.agent_id, agent);
    bg_chat_conversation_t other_conv;
    start(uid, agent, "Elsewhere", &other_conv);
    cr_expect_eq(bg_chat_post_user(conn, uid, other_conv.id, "Again", "job-posted-1", NULL, &p),
                 BG_ERR_CONFLICT, "a job id names one turn, in one conversation");
    cr_assert_eq(bg_chat_get(conn, uid, c.id, &after), 0);
    cr_expect_eq(after.message_count, 1, "no refused or repeated post was counted");
    cr_assert_eq(bg_chat_delete(conn, uid, c.id), 0);
    cr_expect_eq(bg_chat_post_user(conn, uid, c.id, "Gone?", "job-posted-5", NULL, &p),
                 BG_ERR_NOT_FOUND);
}
