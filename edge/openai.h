/*
 * The OpenAI-compatible API's wire formats (openai.c), kept apart from the routes so they can be
 * tested and fuzzed without a server: the POST /v1/chat/completions body parsed into what a job
 * needs, OpenAI's error body and the mapping of our error codes onto it, and the completion,
 * chunk and usage shapes of ../shared/PROTOCOLS.md §3.
 */
#ifndef EDGE_OPENAI_H
#define EDGE_OPENAI_H

#include "bg/buf.h"
#include "bg/common.h"

#define EDGE_OAI_MODEL_SIZE 257     /**< a model (an agent's slug or id), bytes + NUL */
#define EDGE_OAI_USER_SIZE 257      /**< the `user` field, bytes + NUL */
#define EDGE_OAI_MESSAGES_MAX 1000  /**< messages in one request */
#define EDGE_OAI_MAX_TOKENS 1000000 /**< largest max_tokens accepted */
#define EDGE_OAI_PARAM_SIZE 64      /**< a parameter path such as "messages[12].content" */
#define EDGE_OAI_ID_SIZE 48         /**< "chatcmpl-" + 32 hex digits + NUL */

/** A parsed chat completion request. */
typedef struct edge_oai_request {
    char model[EDGE_OAI_MODEL_SIZE];
    bool stream;
    bool include_usage; /**< stream_options.include_usage */
    int64_t max_tokens; /**< max_completion_tokens, else max_tokens; 0 when neither */
    double temperature; /**< < 0 when not given */
    char user[EDGE_OAI_USER_SIZE];
    bg_buf_t messages; /**< owned: [{"role","content"}, …] with content always a string */
    size_t nmessages;
} edge_oai_request_t;

/** Why a request was refused: the parameter and the catalogue key suffix of the problem. */
typedef struct edge_oai_error {
    int rc;                          /**< BG_ERR_INVALID, BG_ERR_TOO_LARGE */
    char param[EDGE_OAI_PARAM_SIZE]; /**< "" when the body as a whole is at fault */
    const char *reason; /**< "malformed_json", "missing", "wrong_type", "invalid_value",
                             "out_of_range", "too_long", "unknown_field", "unsupported" */
    int64_t min, max;   /**< out_of_range and too_long bounds */
} edge_oai_error_t;

/**
 * Parses and validates a chat completion body (pure; fuzzed). Returns 0 with *out filled (dispose
 * it), or a negative bg_err with *err describing the first problem (*out then owns nothing).
 * Unknown parameters are refused like OpenAI does; parameters we cannot honour (tools, n > 1,
 * images, audio, JSON response formats) are refused as unsupported rather than silently ignored;
 * sampling knobs without effect here (top_p, stop, penalties, seed, …) are accepted.
 */
BG_MUSTCHECK int edge_oai_parse_request(const char *body, size_t len, edge_oai_request_t *out,
                                        edge_oai_error_t *err);

/** Frees what a parsed request owns; accepts a zeroed one. */
void edge_oai_request_dispose(edge_oai_request_t *r);

/** How one of our error codes (the err.h table, and the job error codes) looks in OpenAI's form. */
typedef struct edge_oai_error_map {
    int status;
    const char *type; /**< "invalid_request_error", "authentication_error", … */
    const char *code; /**< OpenAI's code, NULL for null */
    bool no_retry;    /**< send x-should-retry: false (waiting does not help) */
} edge_oai_error_map_t;

/** Maps code (ours) to OpenAI's status, type and code; unknown codes map like "internal". */
edge_oai_error_map_t edge_oai_map_error(const char *code);

/** Appends {"error":{"message","type","param","code"}}; param and code may be NULL. */
BG_MUSTCHECK int edge_oai_write_error(bg_buf_t *out, const char *message, const char *type,
                                      const char *param, const char *code);

/** What every response of one completion shares. */
typedef struct edge_oai_reply {
    char id[EDGE_OAI_ID_SIZE];
    int64_t created; /**< unix seconds */
    char model[EDGE_OAI_MODEL_SIZE];
} edge_oai_reply_t;

/** Fills r: id "chatcmpl-" + the job id's hex digits, created now, model as requested. */
void edge_oai_reply_init(edge_oai_reply_t *r, const char *job_id, const char *model,
                         int64_t created);

/**
 * Appends one chunk event "data: {…}\n\n": with role "assistant" when first, the content piece
 * (len bytes; none when len is 0 and not first), and finish_reason when not NULL (then the delta
 * is empty).
 */
BG_MUSTCHECK int edge_oai_write_chunk(bg_buf_t *out, const edge_oai_reply_t *r, bool first,
                                      const char *content, size_t len, const char *finish_reason);

/** Appends the usage chunk (choices []) of a stream that asked for it. */
BG_MUSTCHECK int edge_oai_write_usage_chunk(bg_buf_t *out, const edge_oai_reply_t *r,
                                            int64_t prompt_tokens, int64_t completion_tokens);

/** Appends a whole non-streaming completion object. */
BG_MUSTCHECK int edge_oai_write_completion(bg_buf_t *out, const edge_oai_reply_t *r,
                                           const char *content, size_t len,
                                           const char *finish_reason, int64_t prompt_tokens,
                                           int64_t completion_tokens);

/** Maps a job's finish reason (stop, length, canceled) onto OpenAI's (stop, length). */
const char *edge_oai_finish_reason(const char *ours);

#endif
