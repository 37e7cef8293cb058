/*
 * A streaming client for OpenAI-compatible chat completions (POST {base}/chat/completions with
 * "stream":true) on libcurl's multi interface, driven by a libuv loop: many generations run
 * concurrently on one loop, each reporting its text as it arrives and ending with one result.
 *
 * What a call does, in order:
 * - it sends the request to the primary provider; a connection error, a connect timeout, a 408,
 *   409, 429 or 5xx, or a stream that breaks before its first token, is retried up to max_retries
 *   times with exponential backoff and full jitter (a retry-after-ms / retry-after header sets the
 *   delay instead, capped), then tried once on the fallback provider when one is configured;
 * - nothing is retried once a delta was delivered: the caller has shown text to someone;
 * - timeouts: connect (curl), first token (from the start of each attempt to the first content
 *   delta), idle (between data events after the first token) and total (the whole call, retries
 *   and waits included);
 * - a data event that is not JSON, or JSON without the chunk's shape, ends the call as malformed;
 *   a stream that ends without "[DONE]" or a finish_reason ends it as cut, the text so far having
 *   been delivered;
 * - usage is the provider's final usage chunk when one came (include_usage), else an estimate
 *   (ceil(characters / 4) for the completion, ceil(bytes of messages / 4) for the prompt), marked
 *   as such.
 *
 * Callbacks run on the loop's thread, from libuv callbacks only: never from inside bg_llm_stream()
 * or bg_llm_cancel(). Contract: a function that returns an error never calls a callback; otherwise
 * on_done is called exactly once per call, after which the call pointer is dead. on_delta may call
 * bg_llm_cancel() and on_done may start new calls; any callback may call bg_llm_free().
 *
 * Never logged: the API keys, the messages, the generated text.
 */
#ifndef BG_LLM_H
#define BG_LLM_H

#include <uv.h>

#include "bg/common.h"

/** Retries on the primary when the config leaves max_retries negative. */
#define BG_LLM_DEFAULT_MAX_RETRIES 2

/** Client configuration; strings are copied by bg_llm_new. A zero duration or size takes the
 * default named beside it. */
typedef struct bg_llm_config {
    const char *base_url; /**< e.g. "https://api.openai.com/v1" (required) */
    const char *api_key;  /**< sent as a Bearer token; NULL or "": no Authorization header */
    const char *fallback_base_url;   /**< NULL or "": no fallback */
    const char *fallback_api_key;    /**< the fallback's own key (never the primary's) */
    uint32_t connect_timeout_ms;     /**< 10 s */
    uint32_t first_token_timeout_ms; /**< 60 s */
    uint32_t idle_timeout_ms;        /**< 30 s */
    uint32_t total_timeout_ms;       /**< 10 min */
    int max_retries;                 /**< retries on the primary; < 0: BG_LLM_DEFAULT_MAX_RETRIES */
    uint32_t backoff_base_ms;        /**< 500 ms, doubled per retry */
    uint32_t backoff_cap_ms;         /**< 8 s */
    uint32_t retry_after_cap_ms;     /**< 60 s: longest wait a retry-after header may ask for */
    uint32_t cancel_drain_ms;        /**< 30 s: how long a canceled call reads on for usage */
    size_t max_response_bytes;       /**< 8 MiB per attempt; past it the call ends as malformed */
} bg_llm_config_t;

/** One chat completion request. Pointers are borrowed for the duration of bg_llm_stream() only. */
typedef struct bg_llm_request {
    const char *model;         /**< required */
    const char *messages_json; /**< a JSON array of messages, sent as is (after validation) */
    size_t messages_len;       /**< 0: strlen(messages_json) */
    double temperature;        /**< < 0: not sent */
    uint32_t max_tokens;       /**< 0: not sent */
    const char *user;          /**< NULL: not sent */
    bool include_usage;        /**< ask for the final usage chunk (stream_options.include_usage) */
} bg_llm_request_t;

/** Why a call ended. */
typedef enum bg_llm_error {
    BG_LLM_OK = 0,
    BG_LLM_ERR_TIMEOUT_CONNECT,
    BG_LLM_ERR_TIMEOUT_FIRST_TOKEN,
    BG_LLM_ERR_TIMEOUT_IDLE,
    BG_LLM_ERR_TIMEOUT_TOTAL,
    BG_LLM_ERR_RATE_LIMITED, /**< 429 */
    BG_LLM_ERR_SERVER_ERROR, /**< 5xx, or an error event inside the stream */
    BG_LLM_ERR_CLIENT_ERROR, /**< other 4xx or 3xx: our request or key is wrong; never retried */
    BG_LLM_ERR_CONNECTION,   /**< could not connect, or the connection broke before any token */
    BG_LLM_ERR_MALFORMED,    /**< a chunk that is not what the protocol says, or too much of it */
    BG_LLM_ERR_CUT,          /**< the stream ended without [DONE] or a finish_reason */
    BG_LLM_ERR_CANCELED      /**< bg_llm_cancel(), or bg_llm_free() with the call in flight */
} bg_llm_error_t;

/** Returns "none", "timeout_connect", …, "canceled". */
const char *bg_llm_error_name(bg_llm_error_t e);

typedef enum bg_llm_usage_source {
    BG_LLM_USAGE_PROVIDER = 0, /**< the provider's usage chunk */
    BG_LLM_USAGE_ESTIMATED = 1 /**< no usage chunk arrived: counted here */
} bg_llm_usage_source_t;

typedef struct bg_llm_usage {
    uint64_t prompt_tokens;
    uint64_t completion_tokens;
    bg_llm_usage_source_t source;
} bg_llm_usage_t;

typedef enum bg_llm_provider { BG_LLM_PRIMARY = 0, BG_LLM_FALLBACK = 1 } bg_llm_provider_t;

/** The outcome of a call, handed to on_done (borrowed for the callback's duration). */
typedef struct bg_llm_result {
    /** 0 when error is BG_LLM_OK or BG_LLM_ERR_CANCELED by bg_llm_cancel(); else BG_ERR_TIMEOUT,
     * BG_ERR_RETRY (rate limited), BG_ERR_UNAVAILABLE (server or connection), BG_ERR_INVALID
     * (client error), BG_ERR_PROTOCOL (malformed or cut), BG_ERR_TOO_LARGE (response over its cap)
     * or BG_ERR_CLOSED (bg_llm_free). */
    int status;
    bg_llm_error_t error;
    long http_status;       /**< of the last attempt; 0 when no response arrived */
    char finish_reason[32]; /**< "stop", "length", …; "" when none came */
    bg_llm_usage_t usage;
    unsigned retries;           /**< attempts after the first (the fallback's included) */
    unsigned connects;          /**< connections its attempts opened (0: it reused a kept one) */
    bg_llm_provider_t provider; /**< who served the last attempt */
    bool first_token;           /**< a delta was delivered (then nothing was retried) */
    size_t text_bytes;          /**< bytes of text delivered through on_delta */
    uint64_t ttft_ms;           /**< call start to the first delta; 0 when none */
    uint64_t latency_ms;        /**< call start to the end */
    char detail[160];           /**< a short description of the error for logs; no secrets */
} bg_llm_result_t;

typedef struct bg_llm_callbacks {
    /** A piece of generated text (borrowed, NUL-terminated, len bytes). May be NULL. */
    void (*on_delta)(void *ud, const char *text, size_t len);
    /** The end of the call; called exactly once. Required. */
    void (*on_done)(void *ud, const bg_llm_result_t *res);
} bg_llm_callbacks_t;

typedef struct bg_llm bg_llm_t;
typedef struct bg_llm_call bg_llm_call_t;

/**
 * Creates a client on loop (borrowed; must outlive the client's handles, see bg_llm_free).
 * Returns 0 with *out set (owned; bg_llm_free), BG_ERR_CONFIG when base_url is missing or not
 * http(s), or BG_ERR_IO when libcurl cannot be set up.
 */
BG_MUSTCHECK int bg_llm_new(uv_loop_t *loop, const bg_llm_config_t *cfg, bg_llm_t **out);

/**
 * Frees the client; accepts NULL. Every call still in flight gets on_done with status
 * BG_ERR_CLOSED (error BG_LLM_ERR_CANCELED) before this returns, or, when called from inside one of
 * this client's callbacks, as soon as that callback returns. The client's handles close
 * asynchronously: run the loop until it has nothing left before uv_loop_close().
 */
void bg_llm_free(bg_llm_t *llm);

/**
 * Starts one streaming call. cb is borrowed (must outlive the call); ud is handed to it. On
 * success returns 0 and sets *out (may be NULL) to the call, valid until on_done returns. Returns
 * BG_ERR_INVALID when model is missing or messages is not a JSON array, BG_ERR_TOO_LARGE when the
 * request would be larger than 4 MiB, or BG_ERR_CLOSED when the client is being freed; callbacks
 * are then never called.
 */
BG_MUSTCHECK int bg_llm_stream(bg_llm_t *llm, const bg_llm_request_t *req,
                               const bg_llm_callbacks_t *cb, void *ud, bg_llm_call_t **out);

/**
 * Stops delivering deltas to the caller. A call whose request is out keeps reading the stream
 * until the provider's usage chunk (or [DONE]) for at most cancel_drain_ms, so usage comes from
 * the provider; otherwise it ends at once. Either way on_done follows, from the loop, with error
 * BG_LLM_ERR_CANCELED and status 0. Canceling twice is harmless.
 */
void bg_llm_cancel(bg_llm_call_t *call);

/**
 * Whether the call's current attempt has written its request (the provider is working on it);
 * false while it waits to start or to connect, and once it is over. For a caller that runs the
 * loop just until the request is out and then does other work (role_llm: storing the user's
 * message while the provider starts on the reply).
 */
bool bg_llm_sent(const bg_llm_call_t *call);

/**
 * Ends a call at once, without reading on for the provider's usage: for a job that turned out not
 * to be wanted after its call started (its conversation is gone). on_done follows from the loop as
 * after bg_llm_cancel(); its usage is what arrived so far (estimated when none did). Aborting a
 * canceled call cuts its drain short; aborting twice is harmless.
 */
void bg_llm_abort(bg_llm_call_t *call);

#endif
