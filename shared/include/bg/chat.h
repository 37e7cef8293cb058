/*
 * Web chat storage on blocking libpq: a user's conversations with agents (create, list, read,
 * rename, soft delete) and their messages (pages for the client, user and assistant appends, and
 * the history the llm worker puts into a prompt). Shared by the edge (on its thread pool) and the
 * llm worker.
 *
 * Ownership is checked in every query: a conversation of another user, a deleted one and a
 * malformed id are all BG_ERR_NOT_FOUND, so callers answer 404 without telling them apart.
 *
 * Lists use keyset pagination with opaque cursors (base64url of the last row's sort key), so a page
 * costs the same wherever it starts and rows added meanwhile never shift later pages. Conversations
 * come most recently active first (updated_at, which every append and rename touches, then id);
 * messages by id, oldest or newest first. A cursor this module did not make is BG_ERR_INVALID.
 *
 * An assistant reply is written once per job: the schema keeps (job_id, role) unique, so a
 * redelivered job finds the row its first delivery wrote and gets the same id back.
 *
 * Every function takes a connection it does not own; those that write more than one row run in a
 * transaction of their own (so the connection must not be inside one). Errors: BG_ERR_NOT_FOUND,
 * BG_ERR_INVALID (a value refused: a title or a content out of bounds, a bad cursor or limit),
 * BG_ERR_DENIED (the caller's access check refused the agent), BG_ERR_CONFLICT (a job id already
 * used in another conversation), BG_ERR_UNAVAILABLE (Postgres down), other bg_pg_exec() codes.
 */
#ifndef BG_CHAT_H
#define BG_CHAT_H

#include <libpq-fe.h>

#include "bg/common.h"

#define BG_CHAT_ID_SIZE 37         /**< uuid text + NUL */
#define BG_CHAT_TITLE_MAX 200      /**< characters of a title */
#define BG_CHAT_TITLE_SIZE 801     /**< 200 characters of up to 4 bytes + NUL */
#define BG_CHAT_NAME_SIZE 801      /**< agents.name: 200 characters + NUL */
#define BG_CHAT_TIME_SIZE 32       /**< RFC 3339 UTC text */
#define BG_CHAT_MODEL_SIZE 257     /**< model names, bytes + NUL */
#define BG_CHAT_CONTENT_MAX 200000 /**< characters of one message (the schema's limit) */
#define BG_CHAT_CURSOR_SIZE 128    /**< every cursor this module makes fits, NUL included */
#define BG_CHAT_PAGE_MAX 100       /**< most rows one page holds */
#define BG_CHAT_PAGE_DEFAULT 20
/** A message page stops early (after at least one message) once its contents pass this. */
#define BG_CHAT_PAGE_BYTES (4u << 20)
#define BG_CHAT_HISTORY_MAX 1000 /**< most messages one history holds */

/** A conversation as the API shows it. */
typedef struct bg_chat_conversation {
    char id[BG_CHAT_ID_SIZE];
    char agent_id[BG_CHAT_ID_SIZE];
    char agent_name[BG_CHAT_NAME_SIZE];
    char channel[16]; /**< "web", "telegram", "api" */
    char title[BG_CHAT_TITLE_SIZE];
    int64_t message_count;
    char last_message_at[BG_CHAT_TIME_SIZE]; /**< "" before the first message */
    char created_at[BG_CHAT_TIME_SIZE];
    char updated_at[BG_CHAT_TIME_SIZE];
} bg_chat_conversation_t;

/** One message. */
typedef struct bg_chat_message {
    int64_t id;
    char role[16];   /**< "system", "user", "assistant", "tool" */
    char status[16]; /**< "pending", "streaming", "complete", "failed", "canceled" */
    char *content;   /**< owned, NUL-terminated */
    size_t content_len;
    char model[BG_CHAT_MODEL_SIZE]; /**< "" when not recorded */
    int64_t prompt_tokens;          /**< < 0 when not recorded */
    int64_t completion_tokens;      /**< < 0 when not recorded */
    char created_at[BG_CHAT_TIME_SIZE];
} bg_chat_message_t;

/** A list of messages. */
typedef struct bg_chat_message_list {
    bg_chat_message_t *items; /**< owned; count of them */
    size_t count;
} bg_chat_message_list_t;

/** Frees the items of a list and their contents (the list may be reused); accepts NULL. */
void bg_chat_message_list_dispose(bg_chat_message_list_t *list);

/**
 * Decides whether user_id may start a conversation with agent_id (resource_access policies, plans,
 * …). Called on the pool thread after the agent was found live, active, visible to the user and
 * open to the channel. ctx is the caller's.
 */
typedef bool (*bg_chat_allow_fn)(void *ctx, const char *user_id, const char *agent_id);

/**
 * Starts a conversation of user_id with agent_id on channel ("web", "telegram", "api"), titled
 * title (NULL or "": untitled; else 1..BG_CHAT_TITLE_MAX characters). The agent must be live,
 * active, open to the channel and visible to the user (public, of one of the user's organizations,
 * or the user's own private one), else BG_ERR_NOT_FOUND; then allow (NULL: everyone may) decides,
 * BG_ERR_DENIED when it refuses. The conversation records the prompt version in force. Fills out.
 */
BG_MUSTCHECK int bg_chat_create(PGconn *c, const char *user_id, const char *agent_id,
                                const char *channel, const char *title, bg_chat_allow_fn allow,
                                void *allow_ctx, bg_chat_conversation_t *out);

/**
 * Lists the user's live conversations, most recently active first: at most limit
 * (1..BG_CHAT_PAGE_MAX) after cursor (NULL or "": the first page) into out. next_cursor
 * (BG_CHAT_CURSOR_SIZE bytes) receives the cursor of the next page, "" on the last one.
 */
BG_MUSTCHECK int bg_chat_list(PGconn *c, const char *user_id, const char *cursor, size_t limit,
                              bg_chat_conversation_t *out, size_t *count,
                              char next_cursor[BG_CHAT_CURSOR_SIZE]);

/** Loads one live conversation of the user. */
BG_MUSTCHECK int bg_chat_get(PGconn *c, const char *user_id, const char *conversation_id,
                             bg_chat_conversation_t *out);

/** Renames a live conversation of the user (title: 1..BG_CHAT_TITLE_MAX characters); fills out. */
BG_MUSTCHECK int bg_chat_rename(PGconn *c, const char *user_id, const char *conversation_id,
                                const char *title, bg_chat_conversation_t *out);

/**
 * Deletes a live conversation of the user. Soft (deleted_at): it vanishes from every list and read,
 * while usage records may still name it. Deleting it again is BG_ERR_NOT_FOUND.
 */
BG_MUSTCHECK int bg_chat_delete(PGconn *c, const char *user_id, const char *conversation_id);

/**
 * Lists messages of a live conversation of the user by id, oldest first (newest_first false) or
 * newest first: at most limit (1..BG_CHAT_PAGE_MAX) after cursor (NULL or "": the first page), and
 * fewer when their contents pass BG_CHAT_PAGE_BYTES. A cursor is tied to the order it was made
 * for (the other order's cursor is BG_ERR_INVALID). *out is emptied first; dispose it after
 * success.
 */
BG_MUSTCHECK int bg_chat_messages(PGconn *c, const char *user_id, const char *conversation_id,
                                  const char *cursor, size_t limit, bool newest_first,
                                  bg_chat_message_list_t *out,
                                  char next_cursor[BG_CHAT_CURSOR_SIZE]);

/**
 * Appends a user message (content: 1..BG_CHAT_CONTENT_MAX characters) to a live conversation of
 * user_id and counts it on the conversation. job_id (the job it starts) and request_id may be NULL.
 * A job id already carried by a user message is BG_ERR_CONFLICT. Sets *message_id.
 */
BG_MUSTCHECK int bg_chat_append_user(PGconn *c, const char *user_id, const char *conversation_id,
                                     const char *content, const char *job_id,
                                     const char *request_id, int64_t *message_id);

/** What bg_chat_post_user found and wrote. */
typedef struct bg_chat_posted {
    int64_t message_id;                /**< the stored user message */
    char agent_id[BG_CHAT_ID_SIZE];    /**< the conversation's agent */
    char user_name[BG_CHAT_NAME_SIZE]; /**< the user's display name ("" when none) */
} bg_chat_posted_t;

/**
 * A chat turn's Postgres work in ONE statement (one round trip, one commit): checks that the
 * conversation is a live one of user_id and that the user is active, appends the user message
 * (as bg_chat_append_user), counts it, and returns the conversation's agent and the user's name.
 * Once per job: when job_id's user message is in this conversation already (the job was delivered
 * again), nothing is written and out describes that message.
 * BG_ERR_NOT_FOUND when the conversation is not the user's (or is gone) or the user is disabled or
 * deleted; BG_ERR_INVALID for content out of bounds; BG_ERR_CONFLICT for a job id in use elsewhere.
 */
BG_MUSTCHECK int bg_chat_post_user(PGconn *c, const char *user_id, const char *conversation_id,
                                   const char *content, const char *job_id, const char *request_id,
                                   bg_chat_posted_t *out);

/** What an assistant reply cost and how it ended. */
typedef struct bg_chat_reply {
    const char *job_id;      /**< required: the reply is written once per job */
    const char *content;     /**< 0..BG_CHAT_CONTENT_MAX characters ("" for a failed reply) */
    const char *status;      /**< NULL: "complete"; or "failed", "canceled" */
    const char *model;       /**< may be NULL */
    const char *request_id;  /**< may be NULL */
    const char *error_class; /**< may be NULL */
    int64_t prompt_tokens;   /**< < 0: not recorded */
    int64_t completion_tokens;
} bg_chat_reply_t;

/**
 * Writes the assistant reply of reply->job_id to a live conversation (the worker's side: no user
 * check) and counts it, once: when the job's reply exists already, nothing changes, *message_id is
 * that reply's and *created false. A job whose reply is in another conversation is BG_ERR_CONFLICT.
 * created may be NULL.
 */
BG_MUSTCHECK int bg_chat_append_assistant(PGconn *c, const char *conversation_id,
                                          const bg_chat_reply_t *reply, int64_t *message_id,
                                          bool *created);

/** What a turn's prompt needs before its user message is stored (bg_chat_context). */
typedef struct bg_chat_context {
    char agent_id[BG_CHAT_ID_SIZE];    /**< the conversation's agent */
    char user_name[BG_CHAT_NAME_SIZE]; /**< the user's display name ("" when none) */
    bg_chat_message_list_t history;    /**< as bg_chat_history, before the turn's message */
} bg_chat_context_t;

/**
 * Reads, in one statement, what the llm worker renders a turn with before it stores the turn's
 * user message (bg_chat_post_user, which it runs while the provider works on the reply): the
 * conversation's agent, the user's name, and the history as bg_chat_history gives it (max_messages,
 * max_bytes alike) of the messages before job_id's user message: all of them while that message
 * is not stored, those before it when it is (the job was delivered again). The turn's own message
 * is never in it. BG_ERR_NOT_FOUND when the conversation is not a live one of user_id or the user
 * is disabled or deleted. Dispose out->history after success (bg_chat_context_dispose).
 */
BG_MUSTCHECK int bg_chat_context(PGconn *c, const char *user_id, const char *conversation_id,
                                 const char *job_id, size_t max_messages, size_t max_bytes,
                                 bg_chat_context_t *out);

/** Frees what bg_chat_context gave; accepts NULL. */
void bg_chat_context_dispose(bg_chat_context_t *ctx);

/**
 * Loads the history the llm worker sends with a prompt: the newest complete messages of a live
 * conversation with id ≤ upto_id (0: all), at most max_messages (1..BG_CHAT_HISTORY_MAX) of them
 * and, when max_bytes > 0, no more than max_bytes of content together (the newest that fit: an
 * older message never comes without the newer ones). Oldest first into *out (emptied first;
 * dispose it after success). Failed, canceled and unfinished messages are left out.
 */
BG_MUSTCHECK int bg_chat_history(PGconn *c, const char *conversation_id, int64_t upto_id,
                                 size_t max_messages, size_t max_bytes,
                                 bg_chat_message_list_t *out);

#endif
