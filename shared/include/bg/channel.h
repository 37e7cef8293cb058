/*
 * bg/channel.h — the one interface every channel a person talks through goes behind.
 *
 * A channel (the web chat, the OpenAI-compatible API, Telegram; next Slack or WhatsApp) does four
 * things of its own and shares the rest:
 *
 *   1. who is speaking: it resolves its sender to a platform user (a session, an API key, a
 *      Telegram account) and the locale everything they read is in;
 *   2. the turn: it fills a bg_turn_t (the agent, the conversation or the request's messages, the
 *      user's message) and bg_turn_prepare() lays out the llm job and its admission request: the
 *      same job for every channel, the same admission script, the same quota;
 *   3. admission: bg_turn_admit() (blocking, for channels served by workers) or the edge's
 *      asynchronous edge_admit() with the prepared request;
 *   4. delivery of the reply: bg_turn_follow() reads the job's output (bg/jobout.h) and hands the
 *      text to the channel's sink as it grows (Telegram edits one message); the edge relays the
 *      same output as Server-Sent Events instead;
 *   5. localization: refusals are classified once (bg_turn_refusal()) and each channel words them
 *      from the catalogues in locales/ in the user's locale.
 *
 * The llm worker (workers/role_llm.c) is the other side of the job fields laid out here.
 */
#ifndef BG_CHANNEL_H
#define BG_CHANNEL_H

#include <libpq-fe.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "bg/admission.h"
#include "bg/buf.h"
#include "bg/common.h"
#include "bg/redis.h"

/** A lost job gives its quota back after this (the worker settles long before). */
#define BG_TURN_RESERVATION_TTL_MS (15 * 60 * 1000)
/** Most fields of a turn's job. */
#define BG_TURN_FIELDS_MAX 14

/** One chat turn, as a channel hands it over. Strings are borrowed; NULL means "none". */
typedef struct bg_turn {
    const char *channel;    /**< "web", "telegram", "api", …: the job's channel */
    const char *user_id;    /**< who is speaking: the platform user */
    const char *user_name;  /**< NULL: the worker reads it */
    const char *locale;     /**< what the user reads is in this language */
    const char *job_id;     /**< the turn's id: every effect of it happens once on it */
    const char *request_id; /**< the request that brought it, for the stored message */
    const char *agent_id;   /**< the agent that answers */
    /** A conversation turn: the conversation, and the user's message either as content (the
     * worker stores it, once per job) or as the id of a message the channel stored itself. */
    const char *conversation_id;
    const char *content;
    int64_t message_id;
    /** A stateless turn (the API): the request's messages, a JSON array. */
    const char *messages;
    const char *image_url; /**< an image input (a data: URL) */
    int64_t max_tokens;    /**< 0: the agent's */
    double temperature;    /**< < 0: the agent's */
    /* admission */
    const char *feature;    /**< the feature the channel needs (e.g. "api_access") */
    const char *api_key_id; /**< the API key the request came with */
    int64_t key_rpm, key_burst;
    bool record_owner; /**< record the job's owner for /chat/jobs/{id}/… (the web) */
} bg_turn_t;

/** A prepared turn: the job's fields and the admission request, pointing into it and the turn. */
typedef struct bg_turn_job {
    char message_id[24];
    char max_tokens[24];
    char temperature[32];
    const char *fields[2 * BG_TURN_FIELDS_MAX];
    bg_admission_req_t admission;
} bg_turn_job_t;

/**
 * Lays out turn t as the llm job and its admission request in *out. t's strings and *out must live
 * until the admission's answer (a retry sends it again). BG_ERR_INVALID for a turn without a
 * user, job, agent, channel or something to answer (a conversation with content or a message
 * id, or messages).
 */
BG_MUSTCHECK int bg_turn_prepare(const bg_turn_t *t, int64_t stream_maxlen, bg_turn_job_t *out);

/**
 * Admits a prepared turn with the blocking client (channels served by workers): one EVALSHA; a
 * user without a compiled admission state (new, or a flushed Redis) is compiled from Postgres and
 * admitted once more. Returns 0 with the decision (never "no state") in *d, or an error (fail
 * closed).
 */
BG_MUSTCHECK int bg_turn_admit(bg_redis_t *r, PGconn *pg, int shards, const bg_turn_job_t *job,
                               bg_admission_decision_t *d);

/** How a refused turn is worded: each channel has its text for each. */
typedef enum {
    BG_REFUSAL_NONE,        /**< admitted */
    BG_REFUSAL_QUOTA,       /**< the quota is spent: say when it resets, offer the plans */
    BG_REFUSAL_RATE,        /**< too fast: say when to try again */
    BG_REFUSAL_NO_PLAN,     /**< no plan or trial: offer the plans */
    BG_REFUSAL_FEATURE,     /**< the plan lacks what the channel needs: offer the plans */
    BG_REFUSAL_TOO_LONG,    /**< the request asks for more than a request may */
    BG_REFUSAL_UNAVAILABLE, /**< admission could not decide: try again later */
} bg_refusal_t;

/** The refusal a decision amounts to. */
bg_refusal_t bg_turn_refusal(bg_admission_verdict_t v);

/** How following a reply ended. */
typedef enum {
    BG_TURN_DONE,      /**< the reply is complete */
    BG_TURN_FAILED,    /**< an error event: *text holds what was generated before it */
    BG_TURN_TIMED_OUT, /**< no end within the timeout */
    BG_TURN_STOPPED,   /**< the sink asked to stop */
} bg_turn_end_t;

/** Where a followed reply goes. Callbacks run on the caller's thread; each may be NULL. */
typedef struct bg_turn_sink {
    void *ctx;
    /** The reply's text so far (all of it), after each read that changed it; returns false to
     * stop following (e.g. the user blocked the bot). */
    bool (*on_text)(void *ctx, const char *text, size_t len);
    /** Called at least every tick_ms while waiting (typing indicators); false stops following. */
    bool (*on_tick)(void *ctx);
    int64_t tick_ms;
} bg_turn_sink_t;

/**
 * Follows the output of job_id (in shard) from its start until its done or error event, or
 * timeout_ms: deltas are appended to *text (a reset clears it: the worker started over), the sink
 * is told as the text grows. *end says how it ended; on BG_TURN_FAILED error_code (may be NULL,
 * BG_ERR_CODE_SIZE bytes) receives the error event's code. Returns 0, or a Redis error.
 */
BG_MUSTCHECK int bg_turn_follow(bg_redis_t *r, int shard, const char *job_id,
                                const bg_turn_sink_t *sink, int64_t timeout_ms, bg_buf_t *text,
                                bg_turn_end_t *end, char *error_code);

/** Size of an error event's code, NUL included. */
#define BG_ERR_CODE_SIZE 64

#endif
