/*
 * The Telegram channel's shared pieces (docs/telegram.md): parsing a webhook Update into the few
 * facts the bot acts on, the webhook secret check, splitting long replies, a blocking Bot API
 * client (libcurl), and the Postgres side of bots, Telegram identities and chats.
 *
 * Who uses what: the edge parses an update only to deduplicate and route it (update_id, the chat)
 * and checks the secret; the telegram worker parses it fully, maps the sender to a platform user,
 * keeps the chat's conversation and talks to the Bot API; bgctl manages webhooks with the client.
 *
 * A bot is addressed by its slug, the numeric id before ':' in its token, which is also the last
 * segment of its webhook path (/webhooks/telegram/{bot}). Its token is a credential: nothing here
 * logs it, and the client keeps its copy wiped on free. Only the SHA-256 of a webhook secret is
 * stored; the presented secret is hashed and the hashes compared in constant time.
 */
#ifndef BG_TELEGRAM_H
#define BG_TELEGRAM_H

#include <libpq-fe.h>

#include "bg/buf.h"
#include "bg/common.h"

/** Longest text of one message, in UTF-16 code units as Telegram counts them. */
#define BG_TG_TEXT_MAX 4096
/** Longest slug (a bot's numeric id) plus its NUL. */
#define BG_TG_SLUG_SIZE 24
/** Longest token we accept plus its NUL (real ones are about 46 characters). */
#define BG_TG_TOKEN_SIZE 128
/** Longest text of an incoming message we keep (Telegram's own limit is 4096). */
#define BG_TG_IN_TEXT_MAX 16384

/** What an update carries. */
typedef enum bg_tg_kind {
    BG_TG_OTHER = 0,    /**< a kind the bot does not handle (inline query, chat member, …) */
    BG_TG_MESSAGE,      /**< message */
    BG_TG_EDITED,       /**< edited_message */
    BG_TG_CALLBACK,     /**< callback_query */
    BG_TG_CHANNEL_POST, /**< channel_post or edited_channel_post */
} bg_tg_kind_t;

/** What a message holds. */
typedef enum bg_tg_content {
    BG_TG_NONE = 0, /**< nothing the bot handles (sticker, location, service message, …) */
    BG_TG_TEXT,     /**< plain text */
    BG_TG_COMMAND,  /**< text starting with a bot command (/start, /help@bot …) */
    BG_TG_PHOTO,
    BG_TG_DOCUMENT,
    BG_TG_VOICE,
    BG_TG_AUDIO,
    BG_TG_VIDEO,
} bg_tg_content_t;

/** The facts of one update the bot acts on. Embedded; bg_tg_update_dispose frees text. */
typedef struct bg_tg_update {
    int64_t update_id;
    bg_tg_kind_t kind;
    bool has_chat; /**< a chat is known (a callback on an inline message has none) */
    int64_t chat_id;
    char chat_type[16]; /**< private | group | supergroup | channel */
    bool has_from;
    int64_t from_id;
    bool from_is_bot;
    char first_name[256];
    char username[64];
    char language_code[16]; /**< "" when absent or null */
    int64_t message_id;     /**< the message (or the callback's message); 0 when none */
    int64_t thread_id;      /**< message_thread_id; 0 when none */
    bg_tg_content_t content;
    char *text;                /**< owned; the text or caption, NUL-terminated; NULL when none */
    char command[33];          /**< BG_TG_COMMAND: the command without '/' and "@bot", lower case */
    char callback_id[128];     /**< BG_TG_CALLBACK: the query's id */
    char callback_data[65];    /**< BG_TG_CALLBACK: its data ("" when none) */
    bool message_inaccessible; /**< BG_TG_CALLBACK: its message has date 0 */
    char file_id[256];         /**< photo (largest size), document, voice…: its file_id */
    int64_t file_size;         /**< its file_size; 0 when absent */
    char mime_type[128];       /**< its mime_type ("image/jpeg" for a photo); "" when absent */
    char file_name[256];       /**< a document's file_name (cut to fit); "" when absent */
} bg_tg_update_t;

/**
 * Parses one Update (len bytes of JSON, borrowed) into out. Unknown fields and kinds are tolerated
 * (kind BG_TG_OTHER). Returns 0, or BG_ERR_INVALID (with *err_desc, static) for text that is not
 * a JSON object or lacks a non-negative integer update_id, BG_ERR_TOO_LARGE / BG_ERR_DEPTH as
 * bg_json_parse. out is zeroed first and needs bg_tg_update_dispose after 0.
 */
BG_MUSTCHECK int bg_tg_update_parse(const char *json, size_t len, bg_tg_update_t *out,
                                    const char **err_desc);

/** Frees what bg_tg_update_parse allocated; accepts a zeroed update. */
void bg_tg_update_dispose(bg_tg_update_t *u);

/**
 * Writes the slug of a token ("123456:ABC…" → "123456") into out (BG_TG_SLUG_SIZE). Returns 0, or
 * BG_ERR_INVALID when the token is not digits, ':' and a non-empty secret part.
 */
BG_MUSTCHECK int bg_tg_token_slug(const char *token, char out[BG_TG_SLUG_SIZE]);

/** Returns true when slug looks like a bot id (1..20 digits). */
bool bg_tg_slug_is_valid(const char *s, size_t len);

/**
 * Returns true when a webhook secret (len bytes as presented, borrowed) hashes to secret_hash (64
 * hex digits). Constant time in the secret's content.
 */
bool bg_tg_secret_matches(const char *secret, size_t len, const char *secret_hash);

/** Returns true when s is a valid webhook secret: 1..256 characters of A-Z a-z 0-9 _ -. */
bool bg_tg_secret_is_valid(const char *s);

/**
 * Returns the length in bytes of the first piece of text (len bytes of UTF-8) to send as one
 * message of at most max_units UTF-16 code units: all of it when it fits, else cut at the last
 * paragraph break, line break, sentence end or space in the second half of what fits, or at the
 * last whole character. Never 0 for non-empty text; never splits a UTF-8 sequence.
 */
size_t bg_tg_split(const char *text, size_t len, size_t max_units);

/** Counts the UTF-16 code units of len bytes of UTF-8 (4-byte sequences count 2). */
size_t bg_tg_utf16_len(const char *text, size_t len);

/* ---- the Bot API client ---- */

typedef struct bg_tg_client bg_tg_client_t;

/**
 * Creates a client for the bot with token (copied; wiped on free) at api_url
 * (BG_TELEGRAM_API_URL, copied); each call gives up after timeout_ms. Returns 0 and an owned
 * client, or BG_ERR_INVALID for a bad token or URL.
 */
BG_MUSTCHECK int bg_tg_client_new(const char *api_url, const char *token, int64_t timeout_ms,
                                  bg_tg_client_t **out);

/** Frees the client; accepts NULL. */
void bg_tg_client_free(bg_tg_client_t *c);

/** What one Bot API call answered. */
typedef struct bg_tg_result {
    long http_status;      /**< the HTTP status */
    bool ok;               /**< "ok": true */
    int64_t error_code;    /**< the body's error_code (else the HTTP status) when not ok */
    char description[256]; /**< the body's description when not ok */
    int64_t retry_after_s; /**< parameters.retry_after, 0 when absent */
    int64_t message_id;    /**< result.message_id when the result is a Message, else 0 */
    int64_t chat_id;       /**< result.chat.id when the result is a Message, else 0 */
} bg_tg_result_t;

/**
 * POSTs body (a JSON object text, borrowed) to <api_url>/bot<token>/<method> once. Returns 0 when
 * Telegram answered (ok or not: see out), BG_ERR_TIMEOUT or BG_ERR_UNAVAILABLE when it did not,
 * BG_ERR_PROTOCOL for an answer that is not the Bot API's JSON (out->http_status is set).
 */
BG_MUSTCHECK int bg_tg_client_call(bg_tg_client_t *c, const char *method, const char *body,
                                   bg_tg_result_t *out);

/**
 * As bg_tg_client_call; when Telegram answered ok, also appends its "result" as JSON text to
 * result_json (may be NULL).
 */
BG_MUSTCHECK int bg_tg_client_call_ex(bg_tg_client_t *c, const char *method, const char *body,
                                      bg_tg_result_t *out, bg_buf_t *result_json);

/** Returns true when an error answer of editMessageText means the text is already shown. */
bool bg_tg_is_not_modified(const bg_tg_result_t *r);

/* ---- bots, identities, chats (Postgres) ---- */

/** A bot served by this deployment. */
typedef struct bg_tg_bot {
    char id[37];                  /**< telegram_bots.id */
    char slug[BG_TG_SLUG_SIZE];   /**< the bot's numeric id */
    char agent_id[37];            /**< the agent it serves */
    char token[BG_TG_TOKEN_SIZE]; /**< secret: never log it */
    char secret_hash[65];         /**< SHA-256 hex of the webhook secret */
    bool active;
} bg_tg_bot_t;

/** Loads the bot of slug (active or not). BG_ERR_NOT_FOUND when there is none. */
BG_MUSTCHECK int bg_tg_bot_get(PGconn *c, const char *slug, bg_tg_bot_t *out);

/**
 * Binds the bot of token (its slug is derived) to agent_id with webhook secret secret (hashed),
 * creating or updating the row and making it active. Fills out (may be NULL). BG_ERR_INVALID for a
 * bad token or secret, BG_ERR_NOT_FOUND for an unknown agent.
 */
BG_MUSTCHECK int bg_tg_bot_bind(PGconn *c, const char *token, const char *secret,
                                const char *agent_id, bg_tg_bot_t *out);

/** A Telegram user as a platform user. */
typedef struct bg_tg_identity {
    char user_id[37];
    char name[256];
    char locale[16]; /**< the user's locale */
    bool created;    /**< provisioned by this call */
} bg_tg_identity_t;

/**
 * Maps the sender of u (u->has_from) to its platform user, provisioning an unknown one in one
 * transaction: a user without email or password named after the Telegram name, with the locale of
 * language_code when supported (else default_locale), a personal organization, a billing account
 * and the trial subscription (like bg_acct_register), and the telegram_accounts row. Concurrent
 * first contacts of one Telegram user make one user. Returns 0 or a database error.
 */
BG_MUSTCHECK int bg_tg_identity_resolve(PGconn *c, const bg_tg_update_t *u,
                                        const char *default_locale, bg_tg_identity_t *out);

/**
 * Returns in conv_id (37 bytes) the conversation chat_id of bot continues, creating it (channel
 * "telegram", with the bot's agent) when there is none, when it was deleted, or when fresh is true
 * (/new). Records the chat (and clears its blocked mark: the user wrote again). Returns 0,
 * BG_ERR_NOT_FOUND when the agent is not open to Telegram, or a database error.
 */
BG_MUSTCHECK int bg_tg_chat_conversation(PGconn *c, const bg_tg_bot_t *bot, const bg_tg_update_t *u,
                                         const char *user_id, bool fresh, char conv_id[37]);

/**
 * Records the chat of u (u->has_chat) with its type and sender, and clears its blocked mark: the
 * user wrote again. Returns 0 or a database error.
 */
BG_MUSTCHECK int bg_tg_chat_record(PGconn *c, const bg_tg_bot_t *bot, const bg_tg_update_t *u);

/** Marks the chat as blocked (Telegram answered 403). Returns 0 or a database error. */
BG_MUSTCHECK int bg_tg_chat_block(PGconn *c, const char *bot_id, int64_t chat_id);

/** Sets *blocked to whether the chat is marked blocked. Returns 0 or a database error. */
BG_MUSTCHECK int bg_tg_chat_is_blocked(PGconn *c, const char *bot_id, int64_t chat_id,
                                       bool *blocked);

/* ---- /link: joining a Telegram user to a web account ---- */

/** Characters of a link code. */
#define BG_TG_LINK_CODE_LEN 8
/** Size of a link code buffer (plus NUL). */
#define BG_TG_LINK_CODE_SIZE (BG_TG_LINK_CODE_LEN + 1)
/** How long a link code works. */
#define BG_TG_LINK_TTL_MS (10 * 60 * 1000)

/**
 * Makes a new one-time link code for the web user user_id: BG_TG_LINK_CODE_LEN characters of an
 * alphabet without look-alikes (no 0/O, 1/I/L), stored as its SHA-256 for BG_TG_LINK_TTL_MS and
 * replacing the user's previous code. Writes the code into code and its expiry (unix ms) into
 * *expires_ms. Returns 0, BG_ERR_NOT_FOUND when the user is gone, or a database error.
 */
BG_MUSTCHECK int bg_tg_link_code_new(PGconn *c, const char *user_id,
                                     char code[BG_TG_LINK_CODE_SIZE], int64_t *expires_ms);

/**
 * Normalizes a code as typed ("abcd-2345", " ABCD 2345 ") into out: upper case, blanks and dashes
 * dropped. Returns true when the result has the shape of a code.
 */
bool bg_tg_link_code_normalize(const char *typed, char out[BG_TG_LINK_CODE_SIZE]);

/** What bg_tg_link did. */
typedef enum bg_tg_link_outcome {
    BG_TG_LINK_DONE = 0, /**< joined */
    BG_TG_LINK_UNKNOWN,  /**< no such code (or not a code) */
    BG_TG_LINK_EXPIRED,  /**< the code is older than BG_TG_LINK_TTL_MS */
    BG_TG_LINK_USED,     /**< the code was used already */
    BG_TG_LINK_ALREADY,  /**< this Telegram user is that web account already */
    BG_TG_LINK_TAKEN,    /**< the web account has another Telegram user linked */
} bg_tg_link_outcome_t;

/** The result of bg_tg_link. */
typedef struct bg_tg_link_result {
    bg_tg_link_outcome_t outcome;
    char user_id[37];     /**< BG_TG_LINK_DONE/ALREADY: the web account */
    char name[256];       /**< its name */
    char locale[16];      /**< its locale */
    char old_user_id[37]; /**< BG_TG_LINK_DONE: the user the Telegram user was before */
    bool retired;         /**< that user was retired (see bg_tg_link) */
    int64_t moved;        /**< conversations moved to the web account */
} bg_tg_link_result_t;

/**
 * Joins the Telegram user tg_user_id (who has a telegram_accounts row) to the web account of code
 * (normalized, see bg_tg_link_code_normalize), in one transaction that also uses the code up:
 * telegram_accounts.user_id moves to the web account. The user the Telegram identity pointed to
 * before is retired when it was only that (no email, never a plan other than the trial, no
 * payment): its live trial is canceled, its conversations (and so its chats' history) move to
 * the web account, and the user is soft-deleted. Otherwise it keeps its plan and conversations,
 * and the chats of tg_user_id start new conversations for the web account. Refusals leave
 * everything as it was (the code too). Returns 0 with out->outcome, or a database error.
 */
BG_MUSTCHECK int bg_tg_link(PGconn *c, int64_t tg_user_id, const char *code,
                            bg_tg_link_result_t *out);

/** A Telegram user's account as /profile shows it. */
typedef struct bg_tg_profile {
    char name[256];
    char locale[16];
    bool has_web_login; /**< the account has an email (a web account, or one linked to it) */
} bg_tg_profile_t;

/** Reads the profile of user_id. Returns 0, BG_ERR_NOT_FOUND, or a database error. */
BG_MUSTCHECK int bg_tg_profile_get(PGconn *c, const char *user_id, bg_tg_profile_t *out);

/* ---- media ---- */

/** The most a bot may download from the Bot API (Telegram's own limit). */
#define BG_TG_FILE_MAX (20 * 1024 * 1024)

/** A file of a message. */
typedef struct bg_tg_file {
    char file_id[256];
    int64_t file_size; /**< bytes; 0 when Telegram did not say */
    char mime_type[128];
    char file_path[512]; /**< from getFile; "" before */
} bg_tg_file_t;

/**
 * getFile for f->file_id: fills f->file_path (and f->file_size when Telegram gives it). Returns 0,
 * BG_ERR_TOO_LARGE when the file is over max bytes, BG_ERR_INVALID when Telegram refused (see
 * *res), or as bg_tg_client_call.
 */
BG_MUSTCHECK int bg_tg_client_get_file(bg_tg_client_t *c, bg_tg_file_t *f, int64_t max,
                                       bg_tg_result_t *res);

/**
 * Downloads f->file_path from <api_url>/file/bot<token>/<file_path> into out (appended), at most
 * max bytes: a larger Content-Length or body stops the transfer with BG_ERR_TOO_LARGE. Returns 0,
 * BG_ERR_NOT_FOUND when Telegram answers 404, BG_ERR_TIMEOUT, or BG_ERR_UNAVAILABLE.
 */
BG_MUSTCHECK int bg_tg_client_download(bg_tg_client_t *c, const bg_tg_file_t *f, int64_t max,
                                       bg_buf_t *out);

/**
 * Appends "data:<mime>;base64,<len bytes of data, base64 with padding>" to out (an image as
 * OpenAI's image_url content part takes it). Returns 0 or BG_ERR_TOO_LARGE when out is full.
 */
BG_MUSTCHECK int bg_tg_data_url(const char *mime, const void *data, size_t len, bg_buf_t *out);

/** The most bytes of a text file the bot reads into a chat turn. */
#define BG_TG_TEXT_FILE_MAX (64 * 1024)

/**
 * Returns true when a document is a text file the bot reads into the chat: any "text/" mime_type,
 * one of JSON, XML, YAML, TOML, SQL, a shell or a script (with "+json" and "+xml" kinds), or, when
 * the mime_type says nothing (absent or application/octet-stream), a file name ending in a text
 * or source code extension (.txt, .md, .csv, .log, .py, .c, …; any case).
 */
bool bg_tg_is_text_file(const char *mime_type, const char *file_name);

/**
 * Appends the chat message a text file makes to out: the caption (when not NULL or ""), a blank
 * line, the file's name (control characters replaced; "file" when ""), then len bytes of its text
 * in a Markdown code fence longer than any run of backticks in the text. A UTF-8 byte order mark
 * is dropped and CR LF becomes LF. Returns 0, BG_ERR_INVALID when the bytes are not UTF-8 text
 * (invalid UTF-8, or a control character other than tab, line feed, carriage return and form
 * feed), or BG_ERR_TOO_LARGE when out is full.
 */
BG_MUSTCHECK int bg_tg_text_file_message(const char *caption, const char *file_name,
                                         const void *data, size_t len, bg_buf_t *out);

/** Returns whether the agent's model takes images (agents.accepts_images). */
BG_MUSTCHECK int bg_tg_agent_accepts_images(PGconn *c, const char *agent_id, bool *accepts);

#endif
