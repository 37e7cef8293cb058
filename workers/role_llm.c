/*
 * The llm role: one chat turn per job, streamed into the job's output stream (docs/streaming.md,
 * bg/jobout.h), stored once, billed once.
 *
 * Threads: each handler thread owns a libuv loop with one provider client (bg/llm.h) and a timer,
 * its Postgres connection (bg_pg_thread_conn) and the runtime's Redis connection for the thread.
 * A job runs its provider call on that loop, turning the loop until on_done; Redis writes are
 * blocking calls made from the loop's callbacks, which is fine since nothing else shares the loop.
 *
 * Output: deltas go into a batch appended at most every BG_JOBOUT_BATCH_MS (or at once when
 * BG_JOBOUT_BATCH_DELTAS pieces wait). The cancel flag is read after each append, and every
 * CANCEL_POLL_MS while nothing is appended, so a cancel takes effect within a fraction of a second
 * without a GET per token.
 *
 * The end of a job, in this order: the remaining text is appended, the assistant message is stored
 * (keyed by job id), the usage event is emitted, "done" (or "error") is appended, and only then the
 * handler returns 0 for the XACK. Each step is idempotent or checked on redelivery:
 * - "done"/"error" in the output stream means everything before it happened: nothing to do;
 * - an assistant message of this job means the reply was complete and its text fully appended:
 *   emit the usage again (the usage worker keeps one record per job id) and append "done";
 * - otherwise the reply is generated again after a "reset" event, so clients drop the partial text.
 * A failure of Postgres or Redis on the way returns an error: the runtime delivers the job again.
 *
 * Billing: a provider that fails before the first token costs nothing (usage outcome refund,
 * status error). A reply that breaks after some text is stored as failed and recorded with status
 * error (outcome use), which the usage worker does not charge either: provider failures are ours.
 * A canceled reply is stored and charged (status canceled): its tokens were spent.
 *
 * API jobs (channel "api", from POST /v1/chat/completions) carry their messages instead of a
 * conversation: the agent prompt's system message and examples, rendered with the built-ins only,
 * come first, then the request's messages verbatim ("developer" sent as "system"). Nothing is
 * stored, so a redelivered API job always starts over after a "reset". A prompt that needs values
 * for its variables cannot be used there: "invalid_request", refunded.
 *
 * Caches (bg/llm_cache.h): agents and prompt versions come from a per-process cache (an agent for
 * AGENT_TTL_MS, so an admin's change shows within that time; versions, immutable, until pushed
 * out). A deterministic request (temperature 0) of an agent with cache_enabled is looked up in the
 * response cache first; a hit is streamed like a reply (one delta), stored like one, billed as one
 * request with cache_hit set, and its "done" says "cached": true. Only complete replies (stop or
 * length from the provider) are written there, for the agent's cache_ttl_s.
 */
#include "role_llm.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "bg/admission.h"
#include "bg/agents.h"
#include "bg/chat.h"
#include "bg/convseq.h"
#include "bg/err.h"
#include "bg/id.h"
#include "bg/jobout.h"
#include "bg/json.h"
#include "bg/llm.h"
#include "bg/llm_cache.h"
#include "bg/log.h"
#include "bg/metrics.h"
#include "bg/pg.h"
#include "bg/prompt.h"
#include "bg/timeutil.h"
#include "bg/usage.h"
#include "ctx_cache.h"

/* How often the cancel flag is read while no delta is being appended. */
#define CANCEL_POLL_MS 250
/* A reply is cut here (bytes ≥ characters, so the stored text always fits the schema). */
#define REPLY_MAX BG_CHAT_CONTENT_MAX
/* History loaded for a prompt: what fits a rendered prompt at most. */
#define HISTORY_BYTES_MAX BG_PROMPT_OUTPUT_MAX
/* Most loop turns (non-blocking) that stream_start runs to get a call's request out */
#define SEND_TURNS_MAX 64
/* How long an agent row (and the version it resolves to) is reused: an admin's change to an
 * agent, or a new current version of its prompt, reaches the jobs within this time. */
#define AGENT_TTL_MS 5000
/* Slots of the definition cache: agents and parsed prompt versions (bounded memory). */
#define AGENT_SLOTS 256
#define PROMPT_SLOTS 128
/* The messages an API job carries, and the whole array sent for it (the provider client's cap). */
#define API_MESSAGES_MAX (4u << 20)
/* Messages of an API job. */
#define API_MESSAGES_COUNT_MAX 2048
/* The conversation cache (ctx_cache.h): slots, the message text all entries may hold, and how
 * long an entry unused stays usable. */
#define CTX_SLOTS 1024
#define CTX_BYTES_MAX (64u << 20)
#define CTX_TTL_MS (15u * 60u * 1000u)

typedef struct st_llm_role {
    char *database_url;      /* owned */
    char *base_url;          /* owned */
    char *api_key;           /* owned, secret; NULL when none */
    char *fallback_base_url; /* owned; NULL when none */
    char *model;             /* owned: the deployment's default model */
    uint32_t connect_timeout_ms, first_token_timeout_ms, idle_timeout_ms, total_timeout_ms;
    int shards;
    bg_llm_defs_t *defs; /* owned: agents and prompt versions, shared by the handler threads */
    wk_ctx_cache_t *ctx_cache;       /* owned: conversations' context after their last turn here */
    bg_metrics_counter_t *m_context; /* turns' contexts by source: cache, database */
} llm_role_t;

typedef struct st_llm_thread {
    uv_loop_t loop;
    uv_timer_t tick;
    bg_llm_t *llm; /* owned */
} llm_thread_t;

/* One job's fields, borrowed from the job. */
typedef struct st_llm_job {
    wk_job_t *job;
    bg_redis_t *r;
    int shard;
    const char *job_id;
    const char *user_id;
    const char *conversation_id;
    const char *agent_id;
    const char *channel;
    const char *locale;
    const char *user_name;
    const char *content;    /* web: the user's message, stored by this worker (post_user()) */
    const char *request_id; /* web: the edge's request that admitted the turn */
    const char *image_url;  /* an image with the user's message (a data: URL), "" none */
    bg_chat_posted_t posted;
    int64_t message_id;
    /* the conversation's write sequence (bg/convseq.h): when the context was taken (seq_known
     * false: unknown), after the user's message was stored, after the reply was (0: not bumped) */
    bool seq_known;
    int64_t seq0, seq_user, seq_reply;
    bool ctx_cached;      /* the context came from the conversation cache */
    bool name_from_ctx;   /* user_name is the context's (the job named none) */
    int64_t reply_id;     /* the stored reply, 0 when none was stored by this run */
    bool reply_complete;  /* and it is part of the history (status complete) */
    int64_t max_tokens;   /* 0: the agent's */
    double temperature;   /* < 0: the agent's */
    bool api;             /* channel "api": messages instead of a conversation */
    const char *messages; /* api: the request's messages, a JSON array text */
    uint64_t start_ms;    /* monotonic, when the handler took the job */
} llm_job_t;

/* One provider call in progress. */
typedef struct st_llm_run {
    llm_job_t *j;
    llm_thread_t *t;
    bg_llm_call_t *call; /* NULL once on_done ran */
    bg_buf_t text;       /* the whole reply */
    bg_jobout_batch_t batch;
    bool finished;
    bool cancel_asked; /* the user's cancel */
    bool too_long;     /* the reply reached REPLY_MAX */
    bool shown;        /* some text was appended to the output already */
    bool abandoned;    /* its call was given up: deltas that still come are dropped */
    uint64_t last_cancel_check_ms;
    bg_llm_result_t res;
} llm_run_t;

/* How a job ends: what the event, the stored message and the usage event say. */
typedef struct st_llm_end {
    const char *finish_reason; /* "stop", "length", "canceled"; NULL: an error event */
    const char *error_code;    /* the error event's code when finish_reason is NULL */
    bool retryable;
    int64_t message_id; /* the stored assistant message, 0 when none */
    const char *model;
    int64_t prompt_tokens, completion_tokens;
    const char *token_source;
    int64_t latency_ms, ttft_ms; /* < 0: unknown */
    const char *usage_status;    /* "ok", "error", "canceled" */
    const char *error_class;     /* NULL when none */
    bg_admission_outcome_t outcome;
    bool cached; /* served from the response cache */
} llm_end_t;

/* ---- role and thread state ---- */

static char *dup_or_null(const char *s)
{
    return bg_str_present(s) ? bg_strdup(s) : NULL;
}

int wk_llm_init(const bg_config_t *cfg, void **ud)
{
    if (!bg_str_present(cfg->database_url)) {
        bg_error("llm: BG_DATABASE_URL is not set");
        return BG_ERR_CONFIG;
    }
    if (!bg_str_present(cfg->llm_base_url)) {
        bg_error("llm: BG_LLM_BASE_URL is not set");
        return BG_ERR_CONFIG;
    }
    llm_role_t *l = bg_calloc(1, sizeof(*l));
    l->database_url = bg_strdup(cfg->database_url);
    l->base_url = bg_strdup(cfg->llm_base_url);
    l->api_key = dup_or_null(cfg->llm_api_key);
    l->fallback_base_url = dup_or_null(cfg->llm_fallback_base_url);
    l->model = bg_strdup(bg_str_present(cfg->llm_model) ? cfg->llm_model : "demo-1");
    l->shards = cfg->shards;
    l->connect_timeout_ms = (uint32_t)cfg->llm_connect_timeout_ms;
    l->first_token_timeout_ms = (uint32_t)cfg->llm_first_token_timeout_ms;
    l->idle_timeout_ms = (uint32_t)cfg->llm_idle_timeout_ms;
    l->total_timeout_ms = (uint32_t)cfg->llm_total_timeout_ms;
    l->defs = bg_llm_defs_new(AGENT_TTL_MS, AGENT_SLOTS, PROMPT_SLOTS);
    l->ctx_cache = wk_ctx_cache_new(CTX_SLOTS, CTX_BYTES_MAX, CTX_TTL_MS);
    static const char *const source[] = {"source", NULL};
    l->m_context = bg_metrics_counter("bg_llm_context_total",
                                      "Chat turns by where their conversation was read from: "
                                      "cache (the worker's conversation cache) or database.",
                                      source);
    *ud = l;
    return 0;
}

void wk_llm_dispose(void *ud)
{
    llm_role_t *l = ud;
    if (l == NULL)
        return;
    free(l->database_url);
    free(l->base_url);
    if (l->api_key != NULL) {
        explicit_bzero(l->api_key, strlen(l->api_key));
        free(l->api_key);
    }
    free(l->fallback_base_url);
    free(l->model);
    bg_llm_defs_free(l->defs);
    wk_ctx_cache_free(l->ctx_cache);
    free(l);
}

void wk_llm_thread_dispose(void *thread_state, void *ud)
{
    (void)ud;
    llm_thread_t *t = thread_state;
    bg_llm_free(t->llm);
    uv_close((uv_handle_t *)&t->tick, NULL);
    /* the client's handles close asynchronously too: run until nothing is left */
    (void)uv_run(&t->loop, UV_RUN_DEFAULT);
    if (uv_loop_close(&t->loop) != 0)
        bg_warn("llm: a handle was left open on the loop");
    free(t);
}

static int thread_state(const llm_role_t *l, void **slot, llm_thread_t **out)
{
    if (*slot != NULL) {
        *out = *slot;
        return 0;
    }
    llm_thread_t *t = bg_calloc(1, sizeof(*t));
    if (uv_loop_init(&t->loop) != 0) {
        free(t);
        return BG_ERR_IO;
    }
    (void)uv_timer_init(&t->loop, &t->tick);
    const bg_llm_config_t cfg = {.base_url = l->base_url,
                                 .api_key = l->api_key,
                                 .fallback_base_url = l->fallback_base_url,
                                 /* no key of its own in the configuration: never the primary's */
                                 .fallback_api_key = NULL,
                                 .connect_timeout_ms = l->connect_timeout_ms,
                                 .first_token_timeout_ms = l->first_token_timeout_ms,
                                 .idle_timeout_ms = l->idle_timeout_ms,
                                 .total_timeout_ms = l->total_timeout_ms,
                                 .max_retries = -1,
                                 .cancel_drain_ms = 10000};
    int rc = bg_llm_new(&t->loop, &cfg, &t->llm);
    if (rc != 0) {
        uv_close((uv_handle_t *)&t->tick, NULL);
        (void)uv_run(&t->loop, UV_RUN_DEFAULT);
        (void)uv_loop_close(&t->loop);
        free(t);
        return rc;
    }
    *slot = t;
    *out = t;
    return 0;
}

void wk_llm_thread_warm(void **slot, void *ud)
{
    const llm_role_t *l = ud;
    llm_thread_t *t = NULL;
    int rc = thread_state(l, slot, &t);
    if (rc != 0)
        bg_warn("llm: provider client not ready: %s", bg_strerror(rc));
    /* the connection stays the thread's (bg_pg_thread_conn); a failure is retried by the job */
    (void)bg_pg_thread_conn(l->database_url);
}

/* ---- the job's fields ---- */

static bool is_channel(const char *s)
{
    return s != NULL &&
           (strcmp(s, "web") == 0 || strcmp(s, "telegram") == 0 || strcmp(s, "api") == 0);
}

static const char *field_or_empty(const wk_job_t *job, const char *name)
{
    const char *v = wk_job_field(job, name);
    return v != NULL ? v : "";
}

/* Parses the fields a usage event and the output need; BG_ERR_INVALID when they are unusable. The
 * others are checked where they are used (a bad one ends the job as "internal"). */
static int parse_job(wk_job_t *job, const llm_role_t *l, llm_job_t *j)
{
    memset(j, 0, sizeof(*j));
    j->job = job;
    j->r = job->redis;
    j->job_id = job->job_id;
    j->user_id = field_or_empty(job, "user_id");
    j->channel = field_or_empty(job, "channel");
    if (!bg_id_uuid_is_valid(j->user_id) || !is_channel(j->channel) || j->job_id == NULL ||
        j->job_id[0] == '\0' || strlen(j->job_id) > BG_JOBOUT_JOB_ID_MAX)
        return BG_ERR_INVALID;
    j->shard = bg_shard_of(j->user_id, l->shards);
    j->conversation_id = field_or_empty(job, "conversation_id");
    j->agent_id = field_or_empty(job, "agent_id");
    j->locale = field_or_empty(job, "locale");
    j->user_name = field_or_empty(job, "user_name");
    j->content = field_or_empty(job, "content");
    j->request_id = field_or_empty(job, "request_id");
    j->image_url = field_or_empty(job, "image_url");
    j->api = strcmp(j->channel, "api") == 0;
    j->messages = field_or_empty(job, "messages");
    j->start_ms = bg_timeutil_mono_ms();

    const char *mid = field_or_empty(job, "message_id");
    char *end = NULL;
    errno = 0;
    long long v = strtoll(mid, &end, 10);
    j->message_id = (errno == 0 && end != mid && *end == '\0' && v > 0) ? (int64_t)v : 0;

    const char *mt = field_or_empty(job, "max_tokens");
    errno = 0;
    v = strtoll(mt, &end, 10);
    if (errno == 0 && end != mt && *end == '\0' && v > 0)
        j->max_tokens = v > BG_AGENT_MAX_TOKENS_MAX ? BG_AGENT_MAX_TOKENS_MAX : (int64_t)v;

    const char *temp = field_or_empty(job, "temperature");
    j->temperature = -1;
    errno = 0;
    double d = strtod(temp, &end);
    if (temp[0] != '\0' && errno == 0 && end != temp && *end == '\0' && d >= 0 && d <= 2)
        j->temperature = d;
    return 0;
}

/* ---- the end of a job ---- */

/* Reads the user's quota as the admission script computes it; *known false when there is no
 * compiled state. */
static int read_quota(const llm_job_t *j, const llm_role_t *l, bool *known, int64_t *limit,
                      int64_t *remaining, int64_t *reset_ms)
{
    *known = false;
    bg_admission_keys_t k;
    if (bg_admission_keys(&k, l->shards, j->user_id) != 0)
        return 0;
    redisReply *adm = NULL, *quota = NULL, *held = NULL;
    int rc = bg_redis_command(j->r, &adm, "HMGET %s q_limit w_anchor w_len w_until", k.adm);
    if (rc == 0)
        rc = bg_redis_command(j->r, &quota, "HMGET %s win used", k.quota);
    int64_t now = bg_timeutil_wall_ms();
    char now_s[32];
    snprintf(now_s, sizeof(now_s), "(%lld", (long long)now);
    if (rc == 0)
        rc = bg_redis_command(j->r, &held, "ZCOUNT %s %s +inf", k.res, now_s);
    if (rc == 0 && adm->type == REDIS_REPLY_ARRAY && adm->elements == 4 &&
        quota->type == REDIS_REPLY_ARRAY && quota->elements == 2 &&
        held->type == REDIS_REPLY_INTEGER) {
        int64_t v[4] = {0, 0, 0, 0};
        bool have = true;
        for (size_t i = 0; i < 4; i++) {
            if (adm->element[i]->type == REDIS_REPLY_STRING)
                v[i] = strtoll(adm->element[i]->str, NULL, 10);
            else if (i < 3)
                have = false;
        }
        if (have && v[2] > 0) {
            int64_t win = v[1] + ((now - v[1]) / v[2]) * v[2];
            int64_t reset = win + v[2];
            if (v[3] > 0 && reset > v[3])
                reset = v[3];
            int64_t used = 0;
            if (quota->element[0]->type == REDIS_REPLY_STRING &&
                strtoll(quota->element[0]->str, NULL, 10) == win &&
                quota->element[1]->type == REDIS_REPLY_STRING)
                used = strtoll(quota->element[1]->str, NULL, 10);
            int64_t left = v[0] - used - held->integer;
            *limit = v[0];
            *remaining = left > 0 ? left : 0;
            *reset_ms = reset;
            *known = true;
        }
    }
    if (adm != NULL)
        freeReplyObject(adm);
    if (quota != NULL)
        freeReplyObject(quota);
    if (held != NULL)
        freeReplyObject(held);
    return rc;
}

static int append_done(const llm_job_t *j, const llm_role_t *l, const llm_end_t *e)
{
    bool known = false;
    int64_t limit = 0, remaining = 0, reset_ms = 0;
    int rc = read_quota(j, l, &known, &limit, &remaining, &reset_ms);
    if (rc != 0)
        return rc;
    char mid[24], reset_at[40] = "";
    snprintf(mid, sizeof(mid), "%lld", (long long)e->message_id);
    if (known && bg_timeutil_format_rfc3339(reset_at, sizeof(reset_at), reset_ms, false) != 0)
        known = false;

    bg_buf_t data;
    bg_buf_init(&data, 4096);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &data);
    bg_json_write_begin_object(&w);
    if (e->message_id > 0)
        bg_json_write_field_str(&w, "message_id", mid);
    bg_json_write_field_str(&w, "finish_reason", e->finish_reason);
    bg_json_write_field_str(&w, "model", e->model != NULL ? e->model : "");
    bg_json_write_key(&w, "usage");
    bg_json_write_begin_object(&w);
    bg_json_write_field_int(&w, "prompt_tokens", e->prompt_tokens);
    bg_json_write_field_int(&w, "completion_tokens", e->completion_tokens);
    bg_json_write_field_str(&w, "source", e->token_source);
    bg_json_write_end_object(&w);
    bg_json_write_field_bool(&w, "cached", e->cached);
    if (known) {
        bg_json_write_key(&w, "quota");
        bg_json_write_begin_object(&w);
        bg_json_write_field_int(&w, "limit", limit);
        bg_json_write_field_int(&w, "remaining", remaining);
        bg_json_write_field_str(&w, "reset_at", reset_at);
        bg_json_write_end_object(&w);
    }
    bg_json_write_end_object(&w);
    rc = bg_json_write_finish(&w);
    if (rc == 0)
        rc = bg_jobout_append(j->r, j->shard, j->job_id, BG_JOBOUT_DONE, data.base, data.len, NULL);
    bg_buf_dispose(&data);
    return rc;
}

/*
 * Settles the job's reservation as soon as its usage event is out, rather than when the usage
 * worker gets to the event: otherwise the user's next turn, sent the moment "done" arrives, finds
 * this one still holding a concurrency slot (a spurious 429), and the quota "done" reports would be
 * one behind. The usage worker settles again after its commit and finds it settled ("duplicate"),
 * so a job is still settled exactly once; if this settle fails, that later one does it. The price:
 * an event the usage worker can never record (dead-lettered) leaves the request counted in Redis
 * without its ledger debit, which the reconciler reports as drift.
 */
static void settle_now(const llm_job_t *j, const llm_role_t *l, const bg_usage_event_t *ev)
{
    bg_admission_settle_result_t result = BG_ADMISSION_SETTLE_UNKNOWN;
    int rc =
        bg_admission_settle(j->r, l->shards, j->user_id, j->job_id,
                            bg_usage_event_is_charged(ev) ? BG_ADMISSION_USE : BG_ADMISSION_REFUND,
                            ev->prompt_tokens + ev->completion_tokens, &result, NULL);
    if (rc != 0)
        bg_warn("llm: job %s: early settle failed (%s); the usage worker settles it", j->job_id,
                bg_strerror(rc));
}

/* Emits the usage event, settles, then appends "done" or "error". 0, or an error to retry. */
static int finish(const llm_job_t *j, const llm_role_t *l, const llm_end_t *e)
{
    const bg_usage_event_t ev = {
        .request_id = j->job_id,
        .user_id = j->user_id,
        .organization_id = NULL,
        .agent_id = bg_id_uuid_is_valid(j->agent_id) ? j->agent_id : NULL,
        .channel = j->channel,
        .model = e->model,
        .prompt_tokens = e->prompt_tokens,
        .completion_tokens = e->completion_tokens,
        .token_source = e->token_source,
        .latency_ms = e->latency_ms,
        .ttft_ms = e->ttft_ms,
        .status = e->usage_status,
        .error_class = e->error_class,
        .cache_hit = e->cached,
        .outcome = e->outcome,
        .occurred_at_ms = bg_timeutil_wall_ms(),
    };
    int rc = bg_usage_emit(j->r, l->shards, &ev);
    if (rc != 0) {
        snprintf(j->job->error, sizeof(j->job->error), "usage not emitted: %s", bg_strerror(rc));
        return rc == BG_ERR_INVALID ? BG_ERR_INVALID : BG_ERR_RETRY;
    }
    settle_now(j, l, &ev);
    if (e->finish_reason != NULL)
        rc = append_done(j, l, e);
    else
        rc = bg_jobout_append_error(j->r, j->shard, j->job_id, e->error_code, e->retryable);
    if (rc != 0) {
        snprintf(j->job->error, sizeof(j->job->error), "final event not appended: %s",
                 bg_strerror(rc));
        return BG_ERR_RETRY;
    }
    return 0;
}

/* A job that cannot succeed: an error event with code (not retryable) and a refund. */
static int fail_job(const llm_job_t *j, const llm_role_t *l, const char *code, const char *why)
{
    bg_warn("llm: job %s cannot run: %s", j->job_id, why);
    const llm_end_t e = {.error_code = code,
                         .retryable = false,
                         .model = l->model,
                         .token_source = "estimated",
                         .latency_ms = -1,
                         .ttft_ms = -1,
                         .usage_status = "error",
                         .error_class = code,
                         .outcome = BG_ADMISSION_REFUND};
    int rc = finish(j, l, &e);
    if (rc == 0)
        snprintf(j->job->error, sizeof(j->job->error), "%s", why);
    return rc;
}

/* A job that cannot succeed through no fault of the request (unknown conversation, agent, user
 * message; a prompt that does not render): an "internal" error and a refund. */
static int fail_internal(const llm_job_t *j, const llm_role_t *l, const char *why)
{
    return fail_job(j, l, "internal", why);
}

/* ---- redelivery ---- */

/* The stored reply of this job, if any: 0 with *found. */
static int stored_reply(PGconn *c, const char *job_id, bool *found, int64_t *id, char *status,
                        char *model, int64_t *prompt_tokens, int64_t *completion_tokens)
{
    *found = false;
    const char *p[] = {job_id};
    PGresult *res;
    int rc = bg_pg_exec(c,
                        "SELECT id, status, coalesce(model, ''), coalesce(prompt_tokens, 0), "
                        "coalesce(completion_tokens, 0) FROM messages "
                        "WHERE job_id = $1 AND role = 'assistant'",
                        1, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) == 1 && bg_pg_int64(res, 0, 0, id) == 0 &&
        bg_pg_int64(res, 0, 3, prompt_tokens) == 0 &&
        bg_pg_int64(res, 0, 4, completion_tokens) == 0) {
        (void)bg_strlcpy(status, bg_pg_value(res, 0, 1), 16);
        (void)bg_strlcpy(model, bg_pg_value(res, 0, 2), BG_CHAT_MODEL_SIZE);
        *found = true;
    }
    PQclear(res);
    return 0;
}

/* Finishes a job whose reply was stored by an earlier delivery that died before "done". */
static int finish_stored(const llm_job_t *j, const llm_role_t *l, int64_t id, const char *status,
                         const char *model, int64_t prompt_tokens, int64_t completion_tokens)
{
    bool failed = strcmp(status, "failed") == 0, canceled = strcmp(status, "canceled") == 0;
    const llm_end_t e = {.finish_reason = failed     ? NULL
                                          : canceled ? "canceled"
                                                     : "stop",
                         .error_code = "provider_error",
                         .retryable = true,
                         .message_id = id,
                         .model = model,
                         .prompt_tokens = prompt_tokens,
                         .completion_tokens = completion_tokens,
                         /* the stored tokens are the provider's or our estimate; the stored
                          * message does not say which, and the usage is recorded already unless
                          * the crash came right before the emit */
                         .token_source = "provider",
                         .latency_ms = -1,
                         .ttft_ms = -1,
                         .usage_status = failed     ? "error"
                                         : canceled ? "canceled"
                                                    : "ok",
                         .error_class = failed ? "provider_error" : NULL,
                         .outcome = BG_ADMISSION_USE};
    return finish(j, l, &e);
}

/* ---- streaming ---- */

/* The user asked to stop: what was generated is kept and billed (conclude). */
static void cancel_asked(llm_run_t *run)
{
    if (run->cancel_asked || run->call == NULL)
        return;
    run->cancel_asked = true;
    bg_llm_cancel(run->call);
}

static void check_cancel(llm_run_t *run)
{
    run->last_cancel_check_ms = bg_timeutil_mono_ms();
    bool canceled = false;
    if (run->cancel_asked || run->call == NULL ||
        bg_jobout_is_canceled(run->j->r, run->j->shard, run->j->job_id, &canceled) != 0 ||
        !canceled)
        return;
    cancel_asked(run);
}

/* Appends the batch, reading the cancel flag in the same round trip. */
static void flush(llm_run_t *run)
{
    bool canceled = false;
    int rc = bg_jobout_batch_flush(&run->batch, run->j->r, run->j->shard, run->j->job_id,
                                   run->cancel_asked ? NULL : &canceled);
    if (rc != 0) {
        /* the text stays in the batch; the end of the job flushes it or fails the job */
        bg_warn("llm: job %s: output not appended: %s", run->j->job_id, bg_strerror(rc));
        return;
    }
    run->shown = true;
    run->last_cancel_check_ms = bg_timeutil_mono_ms();
    if (canceled)
        cancel_asked(run);
}

static void on_delta(void *ud, const char *text, size_t len)
{
    llm_run_t *run = ud;
    if (run->cancel_asked || run->too_long || run->abandoned)
        return;
    if (run->text.len + len > REPLY_MAX || bg_buf_append(&run->text, text, len) != 0) {
        /* whole deltas only, so the stored text never ends inside a character */
        run->too_long = true;
        if (run->call != NULL)
            bg_llm_cancel(run->call);
        return;
    }
    /* the first text goes out at once (it is what the user waits for); the rest in batches */
    if (bg_jobout_batch_add(&run->batch, text, len) || !run->shown)
        flush(run);
}

static void on_done(void *ud, const bg_llm_result_t *res)
{
    llm_run_t *run = ud;
    run->res = *res;
    run->call = NULL;
    run->finished = true;
    uv_timer_stop(&run->t->tick);
}

static void on_tick(uv_timer_t *timer)
{
    llm_run_t *run = timer->data;
    uint64_t now = bg_timeutil_mono_ms();
    if (bg_jobout_batch_is_due(&run->batch, now))
        flush(run);
    else if (now - run->last_cancel_check_ms >= CANCEL_POLL_MS)
        check_cancel(run);
}

static const char *error_code(bg_llm_error_t e, bool *retryable)
{
    *retryable = true;
    switch (e) {
    case BG_LLM_ERR_TIMEOUT_CONNECT:
    case BG_LLM_ERR_TIMEOUT_FIRST_TOKEN:
    case BG_LLM_ERR_TIMEOUT_IDLE:
    case BG_LLM_ERR_TIMEOUT_TOTAL:
        return "provider_timeout";
    case BG_LLM_ERR_RATE_LIMITED:
        return "rate_limited";
    case BG_LLM_ERR_CLIENT_ERROR:
        *retryable = false;
        return "provider_error";
    default:
        return "provider_error";
    }
}

/* Starts the provider call and sends its request (the loop's first turns start the transfer and,
 * on a connection kept alive, write the request). Returns 0 or an error of bg_llm_stream
 * (nothing was called). */
static int stream_start(llm_run_t *run, const char *model, const char *messages, double temperature,
                        int64_t max_tokens)
{
    const bg_llm_request_t req = {.model = model,
                                  .messages_json = messages,
                                  .temperature = temperature,
                                  .max_tokens = (uint32_t)max_tokens,
                                  .user = run->j->user_id,
                                  .include_usage = true};
    static const bg_llm_callbacks_t cb = {on_delta, on_done};
    run->t->tick.data = run;
    run->last_cancel_check_ms = bg_timeutil_mono_ms();
    int rc = bg_llm_stream(run->t->llm, &req, &cb, run, &run->call);
    if (rc != 0)
        return rc;
    (void)uv_timer_start(&run->t->tick, on_tick, BG_JOBOUT_BATCH_MS, BG_JOBOUT_BATCH_MS);
    /* without blocking: a few turns of the loop connect (on a new connection) and write it */
    for (int i = 0; i < SEND_TURNS_MAX && !run->finished && !bg_llm_sent(run->call); i++)
        (void)uv_run(&run->t->loop, UV_RUN_NOWAIT);
    return 0;
}

/* Runs the started call to its end (run->res says how it ended). */
static void stream_wait(llm_run_t *run)
{
    while (!run->finished)
        (void)uv_run(&run->t->loop, UV_RUN_ONCE);
    uv_timer_stop(&run->t->tick);
}

/* Where a reply that may be cached goes: its key and TTL; key[0] == '\0' when it is not cached. */
typedef struct st_cache_slot {
    char key[BG_LLM_CACHE_KEY_SIZE];
    int ttl_s;
} cache_slot_t;

/* Stores a complete reply in the response cache. A failure only costs a later miss. */
static void cache_store(const llm_job_t *j, const cache_slot_t *cs, const llm_end_t *e,
                        const bg_buf_t *text)
{
    if (cs->key[0] == '\0' || text->len > BG_LLM_CACHE_TEXT_MAX)
        return;
    bg_llm_cached_t v = {.text = text->base,
                         .text_len = text->len,
                         .prompt_tokens = e->prompt_tokens,
                         .completion_tokens = e->completion_tokens};
    (void)bg_strlcpy(v.finish_reason, e->finish_reason, sizeof(v.finish_reason));
    (void)bg_strlcpy(v.token_source, e->token_source, sizeof(v.token_source));
    int rc = bg_llm_cache_put(j->r, cs->key, &v, cs->ttl_s);
    if (rc != 0)
        bg_warn("llm: job %s: reply not cached: %s", j->job_id, bg_strerror(rc));
}

/* Moves the conversation's write sequence on after this job stored a message in it; *seq gets the
 * new value, or 0 when Redis could not be told (the conversation cache then keeps nothing of
 * this turn). */
static void bump_sequence(llm_job_t *j, int64_t *seq)
{
    int rc = bg_convseq_bump(j->r, j->shard, j->conversation_id, seq);
    if (rc != 0) {
        *seq = 0;
        bg_warn("llm: job %s: conversation sequence not moved: %s", j->job_id, bg_strerror(rc));
    }
}

/* Stores the assistant message of a web job, then finishes. Returns as finish(). */
static int store_and_finish(llm_job_t *j, const llm_role_t *l, PGconn *c, llm_end_t *e,
                            const char *status, const bg_buf_t *text)
{
    if (j->api)
        return finish(j, l, e);
    const bg_chat_reply_t reply = {.job_id = j->job_id,
                                   .content = text->base != NULL ? text->base : "",
                                   .status = status,
                                   .model = e->model,
                                   .request_id = j->job_id,
                                   .error_class = e->error_class,
                                   .prompt_tokens = e->prompt_tokens,
                                   .completion_tokens = e->completion_tokens};
    bool created = false;
    int rc = bg_chat_append_assistant(c, j->conversation_id, &reply, &e->message_id, &created);
    if (rc == 0) {
        bump_sequence(j, &j->seq_reply);
        if (created) {
            j->reply_id = e->message_id;
            j->reply_complete = status == NULL;
        }
    }
    if (rc == BG_ERR_NOT_FOUND || rc == BG_ERR_CONFLICT || rc == BG_ERR_INVALID) {
        /* the conversation went away meanwhile (or refuses the reply): the tokens were spent */
        bg_warn("llm: job %s: reply not stored: %s", j->job_id, bg_strerror(rc));
        e->finish_reason = NULL;
        e->error_code = "internal";
        e->retryable = false;
        return finish(j, l, e);
    }
    if (rc != 0) {
        snprintf(j->job->error, sizeof(j->job->error), "reply not stored: %s", bg_strerror(rc));
        return rc;
    }
    return finish(j, l, e);
}

/* Stores the reply and finishes the job after the provider call ended. */
static int conclude(llm_run_t *run, const llm_role_t *l, PGconn *c, const char *model,
                    const cache_slot_t *cs)
{
    llm_job_t *j = run->j;
    const bg_llm_result_t *res = &run->res;
    bool user_canceled = run->cancel_asked && res->error == BG_LLM_ERR_CANCELED;
    bool ok = res->error == BG_LLM_OK || (res->error == BG_LLM_ERR_CANCELED && res->status == 0);
    llm_end_t e = {.model = model,
                   .prompt_tokens = (int64_t)res->usage.prompt_tokens,
                   .completion_tokens = (int64_t)res->usage.completion_tokens,
                   .token_source =
                       res->usage.source == BG_LLM_USAGE_PROVIDER ? "provider" : "estimated",
                   .latency_ms = (int64_t)res->latency_ms,
                   .ttft_ms = res->first_token ? (int64_t)res->ttft_ms : -1,
                   .outcome = BG_ADMISSION_USE};

    if (!ok && !res->first_token) {
        /* nothing generated: nothing stored, nothing charged */
        bg_info("llm: job %s: provider failed: %s (%s)", j->job_id, bg_llm_error_name(res->error),
                res->detail);
        e.error_code = error_code(res->error, &e.retryable);
        e.usage_status = "error";
        e.error_class = bg_llm_error_name(res->error);
        e.outcome = BG_ADMISSION_REFUND;
        return finish(j, l, &e);
    }

    /* everything shown must be in the stream before the reply counts as stored */
    int rc = bg_jobout_batch_flush(&run->batch, j->r, j->shard, j->job_id, NULL);
    if (rc != 0) {
        snprintf(j->job->error, sizeof(j->job->error), "output not appended: %s", bg_strerror(rc));
        return BG_ERR_RETRY;
    }

    const char *status = NULL;
    bool complete = false;
    if (!ok) {
        bg_info("llm: job %s: provider failed mid-reply: %s (%s)", j->job_id,
                bg_llm_error_name(res->error), res->detail);
        status = "failed";
        e.error_code = error_code(res->error, &e.retryable);
        e.usage_status = "error";
        e.error_class = bg_llm_error_name(res->error);
    } else if (run->too_long) {
        e.finish_reason = "length";
        e.usage_status = "ok";
    } else if (user_canceled) {
        status = "canceled";
        e.finish_reason = "canceled";
        e.usage_status = "canceled";
    } else {
        e.finish_reason = strcmp(res->finish_reason, "length") == 0 ? "length" : "stop";
        e.usage_status = "ok";
        complete = res->error == BG_LLM_OK;
    }
    if (complete)
        cache_store(j, cs, &e, &run->text);
    return store_and_finish(j, l, c, &e, status, &run->text);
}

/* Answers a job from the response cache: the text as one delta, then stored and finished like a
 * reply, billed as a request with cache_hit. */
static int serve_cached(llm_run_t *run, const llm_role_t *l, PGconn *c, const char *model,
                        const bg_llm_cached_t *v)
{
    llm_job_t *j = run->j;
    if (v->text_len > 0) {
        (void)bg_jobout_batch_add(&run->batch, v->text, v->text_len);
        int rc = bg_jobout_batch_flush(&run->batch, j->r, j->shard, j->job_id, NULL);
        if (rc != 0) {
            snprintf(j->job->error, sizeof(j->job->error), "output not appended: %s",
                     bg_strerror(rc));
            return BG_ERR_RETRY;
        }
    }
    int64_t took = (int64_t)(bg_timeutil_mono_ms() - j->start_ms);
    llm_end_t e = {.finish_reason = v->finish_reason,
                   .model = model,
                   .prompt_tokens = v->prompt_tokens,
                   .completion_tokens = v->completion_tokens,
                   .token_source = v->token_source,
                   .latency_ms = took,
                   .ttft_ms = took,
                   .usage_status = "ok",
                   .outcome = BG_ADMISSION_USE,
                   .cached = true};
    const bg_buf_t text = {.base = v->text, .len = v->text_len};
    return store_and_finish(j, l, c, &e, NULL, &text);
}

/*
 * Renders a web job's prompt: the agent's memory policy over the earlier messages of the
 * conversation (prior, oldest first), then the user's message. Returns 0 with *ended false to go
 * on; with *ended true the job is over and the result is the handler's (a failure event was
 * appended).
 */
static int render_web(llm_job_t *j, const llm_role_t *l, const bg_agent_t *agent,
                      const bg_prompt_t *prompt, const bg_prompt_builtins_t *b,
                      const bg_chat_message_list_t *prior, const char *user, size_t user_len,
                      bg_buf_t *messages, bool *ended)
{
    *ended = true;
    size_t n = prior->count;
    bg_prompt_msg_t *msgs = bg_calloc(n + 1, sizeof(*msgs));
    for (size_t i = 0; i < n; i++)
        msgs[i] = (bg_prompt_msg_t){prior->items[i].role, prior->items[i].content,
                                    prior->items[i].content_len};
    size_t keep = bg_prompt_memory_keep(&agent->memory, msgs, n);
    bg_prompt_err_t perr = {0};
    int rc =
        bg_prompt_render(prompt, NULL, b, msgs + (n - keep), keep, user, user_len, messages, &perr);
    free(msgs);
    if (rc != 0) {
        snprintf(j->job->error, sizeof(j->job->error), "render: %s %s", perr.field,
                 perr.reason != NULL ? perr.reason : "");
        return fail_internal(j, l, "the prompt does not render");
    }
    *ended = false;
    return 0;
}

/* Maps a failed read of the conversation to the job's end: the handler's result. */
static int history_failed(llm_job_t *j, const llm_role_t *l, int rc)
{
    snprintf(j->job->error, sizeof(j->job->error), "database: %s", bg_strerror(rc));
    return rc == BG_ERR_INVALID ? fail_internal(j, l, "the database refused a value of the job")
                                : BG_ERR_UNAVAILABLE;
}

/*
 * Renders a web job whose user message is stored already (message_id) with the conversation up
 * to it. Returns as render_web; a failed read ends the job too (or is the handler's retry).
 */
static int build_web(llm_job_t *j, const llm_role_t *l, PGconn *c, const bg_agent_t *agent,
                     const bg_prompt_t *prompt, const bg_prompt_builtins_t *b, bg_buf_t *messages,
                     bool *ended)
{
    *ended = true;
    bg_chat_message_list_t history = {0};
    int rc = bg_chat_history(c, j->conversation_id, j->message_id, BG_CHAT_HISTORY_MAX,
                             HISTORY_BYTES_MAX, &history);
    if (rc == BG_ERR_NOT_FOUND)
        return fail_internal(j, l, "unknown conversation");
    if (rc != 0)
        return history_failed(j, l, rc);
    if (history.count == 0 || history.items[history.count - 1].id != j->message_id ||
        strcmp(history.items[history.count - 1].role, "user") != 0) {
        rc = fail_internal(j, l, "the user message is not in the conversation");
    } else {
        const bg_chat_message_t *user = &history.items[history.count - 1];
        history.count--; /* the earlier messages; the user's is rendered last */
        rc = render_web(j, l, agent, prompt, b, &history, user->content, user->content_len,
                        messages, ended);
        history.count++;
    }
    bg_chat_message_list_dispose(&history);
    return rc;
}

/*
 * Gives the turn's image to the model: the last message of the rendered array (the user's) gets
 * OpenAI's content parts, its text and then the image ({"type":"image_url","image_url":{"url"}}).
 * Only channels whose agent accepts images put one in a job (Telegram: agents.accepts_images), so
 * a model that refuses it answers with an error like any provider failure. Returns as build_web.
 */
static int attach_image(llm_job_t *j, const llm_role_t *l, bg_buf_t *messages, bool *ended)
{
    *ended = true;
    static const bg_json_limits_t limits = {.max_bytes = BG_PROMPT_OUTPUT_MAX,
                                            .max_depth = 4,
                                            .max_string = BG_PROMPT_OUTPUT_MAX,
                                            .max_members = BG_CHAT_HISTORY_MAX + 16,
                                            .max_values = (BG_CHAT_HISTORY_MAX + 16) * 8};
    bg_json_doc_t *doc = NULL;
    if (bg_json_parse(messages->base, messages->len, &limits, &doc, NULL, NULL) != 0 ||
        !bg_json_is_array(bg_json_root(doc)) || bg_json_len(bg_json_root(doc)) == 0) {
        bg_json_doc_free(doc);
        return fail_internal(j, l, "the rendered prompt does not parse");
    }
    const bg_json_t *all = bg_json_root(doc);
    size_t n = bg_json_len(all);
    const bg_json_t *last = bg_json_at(all, n - 1);
    const char *role = NULL, *text = NULL;
    size_t text_len = 0;
    if (bg_json_get_str(last, "role", &role) != 0 || strcmp(role, "user") != 0 ||
        bg_json_get_strn(last, "content", &text, &text_len) != 0) {
        bg_json_doc_free(doc);
        return fail_internal(j, l, "the rendered prompt does not end with the user's turn");
    }
    bg_buf_t out;
    bg_buf_init(&out, messages->len + strlen(j->image_url) + 256);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    bg_json_write_begin_array(&w);
    for (size_t i = 0; i + 1 < n; i++)
        bg_json_write_value(&w, bg_json_at(all, i));
    bg_json_write_begin_object(&w);
    bg_json_write_field_str(&w, "role", "user");
    bg_json_write_key(&w, "content");
    bg_json_write_begin_array(&w);
    bg_json_write_begin_object(&w);
    bg_json_write_field_str(&w, "type", "text");
    bg_json_write_key(&w, "text");
    bg_json_write_strn(&w, text, text_len);
    bg_json_write_end_object(&w);
    bg_json_write_begin_object(&w);
    bg_json_write_field_str(&w, "type", "image_url");
    bg_json_write_key(&w, "image_url");
    bg_json_write_begin_object(&w);
    bg_json_write_field_str(&w, "url", j->image_url);
    bg_json_write_end_object(&w);
    bg_json_write_end_object(&w);
    bg_json_write_end_array(&w);
    bg_json_write_end_object(&w);
    bg_json_write_end_array(&w);
    int rc = bg_json_write_finish(&w);
    bg_json_doc_free(doc);
    if (rc != 0) {
        bg_buf_dispose(&out);
        return fail_internal(j, l, "the prompt with its image is too large");
    }
    bg_buf_dispose(messages);
    *messages = out;
    *ended = false;
    return 0;
}

static const char *provider_role(const char *role)
{
    if (strcmp(role, "developer") == 0)
        return "system";
    if (strcmp(role, "system") == 0 || strcmp(role, "user") == 0 || strcmp(role, "assistant") == 0)
        return role;
    return NULL;
}

/*
 * Builds an API job's messages: the prompt's system message and examples, rendered with the
 * built-ins and no variables, then the request's messages in order. Returns as build_web.
 */
static int build_api(llm_job_t *j, const llm_role_t *l, const bg_prompt_t *prompt,
                     const bg_prompt_builtins_t *b, bg_buf_t *messages, bool *ended)
{
    static const bg_json_limits_t limits = {.max_bytes = API_MESSAGES_MAX,
                                            .max_depth = 3,
                                            .max_string = API_MESSAGES_MAX,
                                            .max_members = API_MESSAGES_COUNT_MAX,
                                            .max_values = API_MESSAGES_COUNT_MAX * 8};
    *ended = true;
    bg_json_doc_t *pre_doc = NULL, *req_doc = NULL;
    bg_buf_t pre;
    bg_buf_init(&pre, BG_PROMPT_OUTPUT_MAX);
    bg_prompt_err_t perr = {0};
    int rc = bg_prompt_render(prompt, NULL, b, NULL, 0, "", 0, &pre, &perr);
    if (rc == BG_ERR_INVALID) {
        snprintf(j->job->error, sizeof(j->job->error), "render: %s %s", perr.field,
                 perr.reason != NULL ? perr.reason : "");
        rc = fail_job(j, l, "invalid_request", "the agent's prompt needs variables");
        goto out;
    }
    if (rc != 0 || bg_json_parse(pre.base, pre.len, NULL, &pre_doc, NULL, NULL) != 0 ||
        !bg_json_is_array(bg_json_root(pre_doc)) || bg_json_len(bg_json_root(pre_doc)) == 0) {
        rc = fail_internal(j, l, "the prompt does not render");
        goto out;
    }
    const bg_json_t *req = NULL;
    if (bg_json_parse(j->messages, strlen(j->messages), &limits, &req_doc, NULL, NULL) == 0)
        req = bg_json_root(req_doc);
    if (!bg_json_is_array(req) || bg_json_len(req) == 0) {
        rc = fail_job(j, l, "invalid_request", "the job's messages are no non-empty array");
        goto out;
    }

    bg_json_writer_t w;
    bg_json_writer_init(&w, messages);
    bg_json_write_begin_array(&w);
    /* the rendered array ends with the prompt's user turn, which an API request brings itself */
    const bg_json_t *pv = bg_json_root(pre_doc);
    for (size_t i = 0; i + 1 < bg_json_len(pv); i++)
        bg_json_write_value(&w, bg_json_at(pv, i));
    for (size_t i = 0; i < bg_json_len(req); i++) {
        const bg_json_t *m = bg_json_at(req, i);
        const char *role = NULL, *content = NULL, *as = NULL;
        size_t len = 0;
        if (bg_json_get_str(m, "role", &role) != 0 || (as = provider_role(role)) == NULL ||
            bg_json_get_strn(m, "content", &content, &len) != 0) {
            snprintf(j->job->error, sizeof(j->job->error), "messages[%zu] is malformed", i);
            rc = fail_job(j, l, "invalid_request", "a message of the job is malformed");
            goto out;
        }
        bg_json_write_begin_object(&w);
        bg_json_write_field_str(&w, "role", as);
        bg_json_write_key(&w, "content");
        bg_json_write_strn(&w, content, len);
        bg_json_write_end_object(&w);
    }
    bg_json_write_end_array(&w);
    if (bg_json_write_finish(&w) != 0) {
        rc = fail_job(j, l, "invalid_request", "the messages are too large");
        goto out;
    }
    *ended = false;
    rc = 0;
out:
    bg_json_doc_free(req_doc);
    bg_json_doc_free(pre_doc);
    bg_buf_dispose(&pre);
    return rc;
}

/* The turn takes its agent from the context, and its user's name unless the job named one. */
static void take_context(llm_job_t *j, const bg_chat_context_t *ctx)
{
    j->agent_id = ctx->agent_id;
    if (j->user_name[0] == '\0') {
        j->user_name = ctx->user_name;
        j->name_from_ctx = true;
    }
}

/*
 * A web turn whose job carries the user's message (the edge enqueues it without touching
 * Postgres) is rendered from what the conversation held before it (bg_chat_context: the agent,
 * the user's name and the history, one statement) and its message is stored once per job (a
 * redelivered job finds the message of its first run) while the provider works on the reply:
 * the store and its commit are off the path to the first token. Returns 0 with *ended false to go
 * on; with *ended true the job is over, as render_web.
 */
static int load_context(llm_job_t *j, const llm_role_t *l, PGconn *c, bg_chat_context_t *ctx,
                        bool *ended)
{
    *ended = true;
    int rc = bg_chat_context(c, j->user_id, j->conversation_id, j->job_id, BG_CHAT_HISTORY_MAX,
                             HISTORY_BYTES_MAX, ctx);
    if (rc == BG_ERR_NOT_FOUND)
        /* deleted (through another edge, which remembered it a little longer), or its user gone */
        return fail_job(j, l, "not_found", "the conversation is gone");
    if (rc != 0)
        return history_failed(j, l, rc);
    take_context(j, ctx);
    *ended = false;
    return 0;
}

/*
 * The turn's context: from the conversation cache when the conversation's write sequence still
 * has the value its entry was taken at (nothing was stored in it since), else from Postgres. The
 * sequence is read first (and started if the conversation has none yet, so that even its first
 * turn is kept), so that a message stored before the read is either in what Postgres returns or
 * moved the sequence past the value that this turn's entry will be kept under. Returns as
 * load_context.
 */
static int context_for(llm_job_t *j, const llm_role_t *l, PGconn *c, bg_chat_context_t *ctx,
                       bool *ended)
{
    static const char *const from_cache[] = {"cache"}, *const from_db[] = {"database"};
    int rc = bg_convseq_read(j->r, j->shard, j->conversation_id, &j->seq0, &j->seq_known);
    if (rc != 0) {
        j->seq_known = false;
        bg_debug("llm: job %s: conversation sequence unreadable: %s", j->job_id, bg_strerror(rc));
    }
    if (j->seq_known &&
        wk_ctx_cache_get(l->ctx_cache, j->conversation_id, j->user_id, j->seq0, ctx)) {
        bg_metrics_counter_inc(l->m_context, from_cache);
        j->ctx_cached = true;
        take_context(j, ctx);
        *ended = false;
        return 0;
    }
    bg_metrics_counter_inc(l->m_context, from_db);
    return load_context(j, l, c, ctx, ended);
}

/* After a turn that read its context here (context_for) and stored its message: keeps the
 * conversation's state after the turn (that context, the user's message and a complete reply) in
 * the cache under the sequence's new value, when this turn's writes were the only ones since the
 * context was taken; forgets the conversation otherwise. */
static void remember_context(const llm_job_t *j, const llm_role_t *l, bg_chat_context_t *ctx,
                             const bg_buf_t *reply)
{
    int64_t seq = j->seq_user;
    bool alone = j->seq_known && j->message_id > 0 && seq != 0 && seq == j->seq0 + 1;
    if (alone && j->reply_id > 0) {
        alone = j->seq_reply == seq + 1;
        seq = j->seq_reply;
    }
    if (!alone) {
        wk_ctx_cache_drop(l->ctx_cache, j->conversation_id);
        return;
    }
    (void)bg_strlcpy(ctx->agent_id, j->posted.agent_id, sizeof(ctx->agent_id));
    (void)bg_strlcpy(ctx->user_name, j->posted.user_name, sizeof(ctx->user_name));
    wk_ctx_history_push(&ctx->history, j->message_id, "user", j->content, strlen(j->content));
    if (j->reply_id > 0 && j->reply_complete)
        wk_ctx_history_push(&ctx->history, j->reply_id, "assistant",
                            reply->base != NULL ? reply->base : "", reply->len);
    wk_ctx_history_trim(&ctx->history, BG_CHAT_HISTORY_MAX, HISTORY_BYTES_MAX);
    wk_ctx_cache_put(l->ctx_cache, j->conversation_id, j->user_id, seq, ctx);
}

/* A cached context whose agent or user name is no longer the conversation's (post_user read them
 * afresh): an agent changed, or the user renamed themselves. */
static bool context_changed(const llm_job_t *j, const bg_chat_context_t *ctx)
{
    return strcmp(j->posted.agent_id, ctx->agent_id) != 0 ||
           (j->name_from_ctx && strcmp(j->posted.user_name, ctx->user_name) != 0);
}

/* Stores the turn's user message (once per job); sets j->message_id. A bg_chat_post_user error. */
static int store_user(llm_job_t *j, PGconn *c)
{
    int rc = bg_chat_post_user(c, j->user_id, j->conversation_id, j->content, j->job_id,
                               j->request_id[0] != '\0' ? j->request_id : NULL, &j->posted);
    if (rc == 0) {
        j->message_id = j->posted.message_id;
        bump_sequence(j, &j->seq_user);
    }
    return rc;
}

/* store_user, with a failure ending the job as load_context's do. Returns as load_context. */
static int post_user(llm_job_t *j, const llm_role_t *l, PGconn *c, bool *ended)
{
    *ended = true;
    int rc = store_user(j, c);
    if (rc == BG_ERR_NOT_FOUND)
        /* deleted since the context was read */
        return fail_job(j, l, "not_found", "the conversation is gone");
    if (rc == BG_ERR_INVALID || rc == BG_ERR_CONFLICT)
        return fail_internal(j, l, "the database refused the user's message");
    if (rc != 0) {
        snprintf(j->job->error, sizeof(j->job->error), "database: %s", bg_strerror(rc));
        return BG_ERR_UNAVAILABLE;
    }
    *ended = false;
    return 0;
}

/*
 * Loads what the prompt needs, renders it, answers from the cache or streams, and concludes.
 * *again: the turn's context came from the conversation cache and turned out stale when its
 * message was stored (context_changed); its call was abandoned (a delta it showed already is
 * taken back with a reset event), and the caller runs the turn again, from Postgres (the message
 * is stored by then).
 */
static int run_turn(llm_job_t *j, const llm_role_t *l, llm_thread_t *t, PGconn *c, bool *again)
{
    *again = false;
    /* a web turn whose message comes in the job: stored while the provider works (load_context) */
    bool store_later = !j->api && j->message_id == 0 && j->content[0] != '\0' &&
                       bg_id_uuid_is_valid(j->conversation_id);
    bool remember = store_later;
    bg_chat_context_t ctx = {0};
    if (store_later) {
        bool ended = false;
        int rc = context_for(j, l, c, &ctx, &ended);
        if (ended)
            return rc;
    }
    if (!bg_id_uuid_is_valid(j->agent_id) ||
        (!j->api && !store_later &&
         (!bg_id_uuid_is_valid(j->conversation_id) || j->message_id <= 0))) {
        bg_chat_context_dispose(&ctx);
        return fail_internal(j, l, "malformed agent, conversation or message id");
    }

    bg_agent_t *agent = bg_malloc(sizeof(*agent));
    bg_llm_prompt_t *pref = NULL;
    bg_buf_t messages;
    bg_buf_init(&messages, j->api ? API_MESSAGES_MAX : BG_PROMPT_OUTPUT_MAX + 1);
    llm_run_t run = {.j = j, .t = t};
    bg_buf_init(&run.text, REPLY_MAX);
    bg_jobout_batch_init(&run.batch);
    bg_llm_cached_t hit = {0};
    bool ended = false;

    int rc = bg_llm_defs_load(l->defs, c, j->agent_id, agent, &pref);
    if (rc == BG_ERR_NOT_FOUND) {
        rc = fail_internal(j, l, "unknown agent");
        goto out;
    }
    if (rc == BG_ERR_INVALID) {
        rc = fail_internal(j, l, "the prompt version does not parse");
        goto out;
    }
    if (rc != 0) {
        snprintf(j->job->error, sizeof(j->job->error), "database: %s", bg_strerror(rc));
        rc = BG_ERR_UNAVAILABLE;
        goto out;
    }
    if (pref == NULL) {
        rc = fail_internal(j, l, "the agent has no prompt");
        goto out;
    }

    const bg_prompt_builtins_t builtins = {.user_name = j->user_name,
                                           .locale = j->locale[0] != '\0' ? j->locale : NULL,
                                           .channel = j->channel,
                                           .date = NULL};
    const bg_prompt_t *prompt = bg_llm_prompt_def(pref);
    if (j->api)
        rc = build_api(j, l, prompt, &builtins, &messages, &ended);
    else if (store_later)
        rc = render_web(j, l, agent, prompt, &builtins, &ctx.history, j->content,
                        strlen(j->content), &messages, &ended);
    else
        rc = build_web(j, l, c, agent, prompt, &builtins, &messages, &ended);
    if (!ended && !j->api && j->image_url[0] != '\0')
        rc = attach_image(j, l, &messages, &ended);
    if (ended)
        goto out;
    size_t messages_len = messages.len;
    if (bg_buf_putc(&messages, '\0') != 0) {
        rc = fail_internal(j, l, "the prompt is too large");
        goto out;
    }

    const char *vmodel = bg_llm_prompt_model(pref);
    const char *model = vmodel[0] != '\0'         ? vmodel
                        : agent->model[0] != '\0' ? agent->model
                                                  : l->model;
    double temperature = j->temperature >= 0 ? j->temperature : agent->temperature;
    int64_t max_tokens = j->max_tokens > 0 ? j->max_tokens : agent->max_tokens;

    cache_slot_t cs = {.key = "", .ttl_s = agent->cache_ttl_s};
    if (bg_llm_cache_is_cacheable(agent->cache_enabled, agent->cache_ttl_s, temperature)) {
        bg_llm_cache_key(cs.key, model, messages.base, messages_len, max_tokens, temperature);
        bool found = false;
        int crc = bg_llm_cache_get(j->r, cs.key, &found, &hit);
        if (crc != 0)
            bg_warn("llm: job %s: response cache unreadable: %s", j->job_id, bg_strerror(crc));
        if (crc == 0 && found) {
            bg_debug("llm: job %s: answered from the response cache", j->job_id);
            if (store_later) {
                store_later = false;
                rc = post_user(j, l, c, &ended);
                if (ended)
                    goto out;
            }
            rc = serve_cached(&run, l, c, model, &hit);
            goto out;
        }
    }

    rc = stream_start(&run, model, messages.base, temperature, max_tokens);
    if (rc != 0) {
        rc = fail_internal(j, l, "the provider request was refused before sending");
        goto out;
    }
    if (store_later) {
        /* the request is on its way: the user's message is stored while the provider works */
        store_later = false;
        rc = post_user(j, l, c, &ended);
        if (ended) {
            bg_llm_abort(run.call);
            stream_wait(&run);
            goto out;
        }
        if (j->ctx_cached && context_changed(j, &ctx)) {
            bg_info("llm: job %s: the cached conversation changed (agent or user name); starting "
                    "over from the database",
                    j->job_id);
            run.abandoned = true;
            bg_llm_abort(run.call);
            stream_wait(&run);
            /* a provider fast enough to answer while the request went out may have shown a first
             * delta: the client drops it on reset, as after a worker's death */
            if (run.shown &&
                bg_jobout_append(j->r, j->shard, j->job_id, BG_JOBOUT_RESET, "{}", 2, NULL) != 0) {
                snprintf(j->job->error, sizeof(j->job->error), "reset not appended");
                rc = BG_ERR_RETRY;
                goto out;
            }
            wk_ctx_cache_drop(l->ctx_cache, j->conversation_id);
            j->agent_id = j->posted.agent_id;
            if (j->name_from_ctx)
                j->user_name = j->posted.user_name;
            *again = true;
            rc = 0;
            goto out;
        }
    }
    stream_wait(&run);
    rc = conclude(&run, l, c, model, &cs);
    if (remember) {
        if (rc == 0)
            remember_context(j, l, &ctx, &run.text);
        else
            wk_ctx_cache_drop(l->ctx_cache, j->conversation_id);
    }

out:
    if (store_later && rc == 0) {
        /* the job ended before its call (a prompt that does not render, say): the user's message
         * is kept all the same, as if the turn had been stored first */
        int src = store_user(j, c);
        if (src != 0)
            bg_warn("llm: job %s: the user's message was not stored: %s", j->job_id,
                    bg_strerror(src));
    }
    bg_chat_context_dispose(&ctx);
    bg_llm_cached_dispose(&hit);
    bg_jobout_batch_dispose(&run.batch);
    bg_buf_dispose(&run.text);
    bg_buf_dispose(&messages);
    bg_llm_prompt_release(pref);
    free(agent);
    return rc;
}

int wk_llm_handle(wk_job_t *job, void *ud)
{
    const llm_role_t *l = ud;
    llm_job_t j;
    if (parse_job(job, l, &j) != 0) {
        snprintf(job->error, sizeof(job->error), "malformed llm job (user_id, channel, job_id)");
        return BG_ERR_INVALID;
    }
    llm_thread_t *t = NULL;
    int rc = thread_state(l, job->thread_state, &t);
    if (rc != 0) {
        snprintf(job->error, sizeof(job->error), "provider client: %s", bg_strerror(rc));
        return rc == BG_ERR_CONFIG ? BG_ERR_UNAVAILABLE : rc;
    }
    PGconn *c = bg_pg_thread_conn(l->database_url);
    if (c == NULL) {
        snprintf(job->error, sizeof(job->error), "database unavailable");
        return BG_ERR_UNAVAILABLE;
    }

    if (job->deliveries > 1) {
        char last[16];
        rc = bg_jobout_last_type(j.r, j.shard, j.job_id, last);
        if (rc != 0) {
            snprintf(job->error, sizeof(job->error), "output unreadable: %s", bg_strerror(rc));
            return BG_ERR_RETRY;
        }
        if (strcmp(last, BG_JOBOUT_DONE) == 0 || strcmp(last, BG_JOBOUT_ERROR) == 0)
            return 0;
        bool found = false;
        int64_t id = 0, pt = 0, ct = 0;
        char status[16] = "", model[BG_CHAT_MODEL_SIZE] = "";
        /* an API job stores no reply: it always starts over */
        rc = j.api ? 0 : stored_reply(c, j.job_id, &found, &id, status, model, &pt, &ct);
        if (rc != 0) {
            snprintf(job->error, sizeof(job->error), "database: %s", bg_strerror(rc));
            return BG_ERR_UNAVAILABLE;
        }
        if (found)
            return finish_stored(&j, l, id, status, model, pt, ct);
        rc = bg_jobout_append(j.r, j.shard, j.job_id, BG_JOBOUT_RESET, "{}", 2, NULL);
        if (rc != 0) {
            snprintf(job->error, sizeof(job->error), "reset not appended: %s", bg_strerror(rc));
            return BG_ERR_RETRY;
        }
    }
    bool again = false;
    rc = run_turn(&j, l, t, c, &again);
    if (again) /* the message is stored now: the turn reads its conversation from Postgres */
        rc = run_turn(&j, l, t, c, &again);
    return rc;
}
