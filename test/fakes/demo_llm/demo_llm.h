/*
 * bg-demo-llm internals: the part that knows OpenAI's Chat Completions request and builds the reply
 * (chat.c, no HTTP in it), and the part that serves it over libh2o (serve.c).
 *
 * A request is parsed and validated once into a demo_chat_t, which then holds everything the answer
 * needs: the model, the stream options, the failure directives of the last user message, the prompt
 * token count and the whole reply text cut into "tokens". A token is a word and the whitespace
 * after it, so the concatenation of the tokens is the reply text byte for byte, and a stream that
 * sends one token per chunk reassembles into exactly the non-stream content.
 */
#ifndef DEMO_LLM_H
#define DEMO_LLM_H

#include <uv.h>

#include <h2o.h>

#include "bg/common.h"

/** Models the demo serves; `vision` models accept image_url content parts. */
typedef struct demo_model {
    const char *id;
    bool vision;
} demo_model_t;

/** The models, in the order GET /v1/models lists them; `count` receives the length. */
const demo_model_t *demo_models(size_t *count);
/** Returns the model with this id (len bytes), or NULL. */
const demo_model_t *demo_model_find(const char *id, size_t len);

/** Failure directives ("#fail:…") found in the last user message; -1 means "off". */
typedef struct demo_fail {
    int status;              /**< answer with this status and an OpenAI error body; 0: off */
    bool hang;               /**< accept and never answer */
    int64_t cut_after;       /**< stream this many content tokens, then drop the connection */
    int64_t malformed_after; /**< after this many tokens, send `data: {not json` and go on */
    int64_t stall_after;     /**< after this many tokens, send nothing more, keep the connection */
    int64_t error_after;     /**< after this many tokens, send an error event and end the stream */
    int64_t slow_ms;         /**< delay per token for this request, overriding the server's rate */
    bool linger; /**< stream to [DONE], then neither end the body nor close (HTTP/1.1: no last
                    chunk) until the client goes away */
} demo_fail_t;

/** An OpenAI error to answer with: {"error":{"message","type","param","code"}}. */
typedef struct demo_error {
    int status;
    char message[512];
    const char *type; /**< static */
    char param[96];   /**< "" for null */
    const char *code; /**< static, or NULL for null */
} demo_error_t;

/** A validated chat completion request and its reply. */
typedef struct demo_chat {
    char *model; /**< owned; the model id as requested */
    bool stream;
    bool include_usage;
    int64_t max_tokens; /**< 0: no limit */
    demo_fail_t fail;
    int64_t prompt_tokens;
    char *text; /**< owned; the reply, already cut to max_tokens */
    size_t text_len;
    size_t *token_end; /**< owned; token i is text[token_end[i-1] (or 0) .. token_end[i]) */
    size_t ntokens;
    const char *finish_reason; /**< static: "stop" or "length" */
} demo_chat_t;

/**
 * Parses and validates a request body of len bytes as OpenAI does. Returns 0 with *chat filled (the
 * caller disposes it with demo_chat_dispose), or -1 with *err describing the 400/404/413 to answer;
 * *chat is then empty and needs no dispose (disposing it is harmless).
 */
BG_MUSTCHECK int demo_chat_parse(const char *body, size_t len, demo_chat_t *chat,
                                 demo_error_t *err);
/** Frees what a parsed request owns; accepts a zeroed struct. */
void demo_chat_dispose(demo_chat_t *chat);

/** Returns the byte offset where token i starts. */
static inline size_t demo_chat_token_start(const demo_chat_t *chat, size_t i)
{
    return i == 0 ? 0 : chat->token_end[i - 1];
}

/** Fills *err for an HTTP status a "#fail:NNN" directive asked for (message, type, code). */
void demo_error_for_status(int status, const char *model, demo_error_t *err);

/** Server options, constant once the loop runs. */
typedef struct demo_options {
    const char *bind; /**< borrowed from argv */
    int port;
    double tokens_per_second; /**< 0: as fast as the connection takes them */
    int64_t delay_ms;         /**< before the first content token */
    const char *api_key;      /**< borrowed from argv; NULL: no authentication */
    int64_t grace_ms;         /**< how long shutdown waits for requests in flight */
} demo_options_t;

/**
 * Makes an initialised TCP handle for an incoming connection (owned by the caller until handed to
 * h2o). Close it with demo_conn_closed as the close callback: that is how the server keeps the list
 * it finds a request's socket in.
 */
uv_tcp_t *demo_conn_new(uv_loop_t *loop);
/** The close callback of handles from demo_conn_new: forgets and frees the connection. */
void demo_conn_closed(uv_handle_t *handle);

/** Sets up the h2o configuration and the request handler; opts (borrowed) must outlive the loop. */
void demo_serve_init(h2o_globalconf_t *conf, const demo_options_t *opts);
/** Returns the number of requests whose memory h2o has not released yet. */
int demo_serve_inflight(void);

#endif
