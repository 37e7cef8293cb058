/*
 * The channel interface (bg/channel.h): a turn laid out as the llm job and its admission, the
 * blocking admission with its one recovery, and following a reply's output.
 */
#include "bg/channel.h"

#include <stdio.h>
#include <string.h>

#include "bg/err.h"
#include "bg/jobout.h"
#include "bg/jobs.h"
#include "bg/json.h"
#include "bg/log.h"
#include "bg/policy.h"
#include "bg/timeutil.h"

/* How long one XREAD waits for more output while following a reply. */
#define FOLLOW_BLOCK_MS 500
/* Entries one XREAD takes. */
#define FOLLOW_COUNT "256"

static bool present(const char *s)
{
    return s != NULL && s[0] != '\0';
}

/* Appends a field to out's job; n counts pairs. */
static void put(bg_turn_job_t *out, size_t *n, const char *name, const char *value)
{
    out->fields[2 * *n] = name;
    out->fields[2 * *n + 1] = value;
    (*n)++;
}

int bg_turn_prepare(const bg_turn_t *t, int64_t stream_maxlen, bg_turn_job_t *out)
{
    memset(out, 0, sizeof(*out));
    bool conversation = present(t->conversation_id) && (present(t->content) || t->message_id > 0);
    bool stateless = !present(t->conversation_id) && present(t->messages);
    if (!present(t->channel) || !present(t->user_id) || !present(t->job_id) ||
        !present(t->agent_id) || !(conversation || stateless) || t->max_tokens < 0 ||
        stream_maxlen < 1)
        return BG_ERR_INVALID;

    size_t n = 0;
    put(out, &n, "user_id", t->user_id);
    put(out, &n, "agent_id", t->agent_id);
    put(out, &n, "channel", t->channel);
    put(out, &n, "locale", present(t->locale) ? t->locale : "");
    if (conversation) {
        put(out, &n, "conversation_id", t->conversation_id);
        if (t->message_id > 0) {
            snprintf(out->message_id, sizeof(out->message_id), "%lld", (long long)t->message_id);
            put(out, &n, "message_id", out->message_id);
        } else {
            put(out, &n, "content", t->content);
        }
    } else {
        put(out, &n, "messages", t->messages);
    }
    if (present(t->user_name))
        put(out, &n, "user_name", t->user_name);
    if (present(t->request_id))
        put(out, &n, "request_id", t->request_id);
    snprintf(out->max_tokens, sizeof(out->max_tokens), "%lld", (long long)t->max_tokens);
    put(out, &n, "max_tokens", out->max_tokens);
    if (t->temperature >= 0)
        snprintf(out->temperature, sizeof(out->temperature), "%.4g", t->temperature);
    put(out, &n, "temperature", out->temperature);
    if (present(t->image_url))
        put(out, &n, "image_url", t->image_url);

    out->admission = (bg_admission_req_t){
        .user_id = t->user_id,
        .api_key_id = present(t->api_key_id) ? t->api_key_id : NULL,
        .key_rpm = t->key_rpm,
        .key_burst = t->key_burst,
        .feature = present(t->feature) ? t->feature : "",
        .max_tokens = t->max_tokens,
        .role = "llm",
        .job_id = t->job_id,
        .nfields = n,
        .fields = out->fields,
        .reservation_ttl_ms = BG_TURN_RESERVATION_TTL_MS,
        .stream_maxlen = stream_maxlen,
        .record_owner = t->record_owner,
    };
    return 0;
}

int bg_turn_admit(bg_redis_t *r, PGconn *pg, int shards, const bg_turn_job_t *job,
                  bg_admission_decision_t *d)
{
    for (int attempt = 0; attempt < 2; attempt++) {
        int rc = bg_admission_admit(r, shards, &job->admission, d);
        if (rc != 0)
            return rc;
        if (d->verdict != BG_ADMISSION_NO_STATE)
            return 0;
        /* a new user, or a flushed Redis: compile the state from Postgres, as the edge does */
        bg_admission_state_t st;
        rc = bg_policy_compile_user(pg, job->admission.user_id, bg_timeutil_wall_ms(), &st);
        if (rc == 0)
            rc = bg_policy_state_write(r, shards, &st);
        if (rc != 0)
            return rc;
    }
    /* compiled and written, yet still no state: Redis is losing writes */
    return BG_ERR_UNAVAILABLE;
}

bg_refusal_t bg_turn_refusal(bg_admission_verdict_t v)
{
    switch (v) {
    case BG_ADMISSION_OK:
        return BG_REFUSAL_NONE;
    case BG_ADMISSION_QUOTA_EXCEEDED:
        return BG_REFUSAL_QUOTA;
    case BG_ADMISSION_RATE_LIMITED:
    case BG_ADMISSION_CONCURRENCY:
        return BG_REFUSAL_RATE;
    case BG_ADMISSION_NO_PLAN:
        return BG_REFUSAL_NO_PLAN;
    case BG_ADMISSION_FEATURE:
        return BG_REFUSAL_FEATURE;
    case BG_ADMISSION_TOO_MANY_TOKENS:
        return BG_REFUSAL_TOO_LONG;
    case BG_ADMISSION_NO_STATE:
    case BG_ADMISSION_REVOKED: /* channels that check sessions themselves never ask the script */
        break;
    }
    return BG_REFUSAL_UNAVAILABLE;
}

/* ---- following a reply ---- */

/* Reads the text of a delta's data ({"text": "…"}) onto text. */
static void add_delta(const char *data, size_t len, bg_buf_t *text)
{
    bg_json_doc_t *doc = NULL;
    if (bg_json_parse(data, len, NULL, &doc, NULL, NULL) != 0)
        return;
    const char *s = NULL;
    size_t n = 0;
    if (bg_json_get_strn(bg_json_root(doc), "text", &s, &n) == 0 && bg_buf_append(text, s, n) != 0)
        bg_warn("a reply longer than its buffer was cut");
    bg_json_doc_free(doc);
}

/* Copies an error event's code ({"error":{"code":…}} or {"code":…}) into code. */
static void error_code_of(const char *data, size_t len, char *code)
{
    (void)bg_strlcpy(code, "internal", BG_ERR_CODE_SIZE);
    bg_json_doc_t *doc = NULL;
    if (data == NULL || bg_json_parse(data, len, NULL, &doc, NULL, NULL) != 0)
        return;
    const bg_json_t *root = bg_json_root(doc), *err = NULL;
    const char *c = NULL;
    bool nested =
        bg_json_get_object(root, "error", &err) == 0 && bg_json_get_str(err, "code", &c) == 0;
    if (nested || bg_json_get_str(root, "code", &c) == 0)
        (void)bg_strlcpy(code, c, BG_ERR_CODE_SIZE);
    bg_json_doc_free(doc);
}

/* One output entry: its type and data. Returns false for a malformed entry. */
static bool entry_of(const redisReply *e, const char **id, const char **type, const char **data,
                     size_t *data_len)
{
    if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 ||
        e->element[0]->type != REDIS_REPLY_STRING || e->element[1]->type != REDIS_REPLY_ARRAY)
        return false;
    *id = e->element[0]->str;
    *type = NULL;
    *data = NULL;
    *data_len = 0;
    const redisReply *f = e->element[1];
    for (size_t k = 0; k + 1 < f->elements; k += 2) {
        if (f->element[k]->type != REDIS_REPLY_STRING ||
            f->element[k + 1]->type != REDIS_REPLY_STRING)
            continue;
        if (strcmp(f->element[k]->str, "type") == 0) {
            *type = f->element[k + 1]->str;
        } else if (strcmp(f->element[k]->str, "data") == 0) {
            *data = f->element[k + 1]->str;
            *data_len = f->element[k + 1]->len;
        }
    }
    return *type != NULL;
}

int bg_turn_follow(bg_redis_t *r, int shard, const char *job_id, const bg_turn_sink_t *sink,
                   int64_t timeout_ms, bg_buf_t *text, bg_turn_end_t *end, char *error_code)
{
    *end = BG_TURN_TIMED_OUT;
    char key[BG_REDIS_KEY_MAX];
    int rc = bg_jobout_key_stream(key, sizeof(key), shard, job_id);
    if (rc != 0)
        return rc;
    char last[BG_JOBS_ENTRY_ID_MAX] = "0-0";
    uint64_t deadline = bg_timeutil_mono_ms() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0);
    uint64_t last_tick = 0;
    int64_t block = FOLLOW_BLOCK_MS;
    if (sink != NULL && sink->on_tick != NULL && sink->tick_ms > 0 && sink->tick_ms < block)
        block = sink->tick_ms;
    char block_s[24];
    snprintf(block_s, sizeof(block_s), "%lld", (long long)block);

    for (;;) {
        uint64_t now = bg_timeutil_mono_ms();
        if (now >= deadline)
            return 0;
        if (sink != NULL && sink->on_tick != NULL &&
            (last_tick == 0 || now - last_tick >= (uint64_t)sink->tick_ms)) {
            last_tick = now;
            if (!sink->on_tick(sink->ctx)) {
                *end = BG_TURN_STOPPED;
                return 0;
            }
        }
        const char *argv[] = {"XREAD", "COUNT",   FOLLOW_COUNT, "BLOCK",
                              block_s, "STREAMS", key,          last};
        redisReply *reply = NULL;
        rc = bg_redis_argv_block(r, block, 8, argv, NULL, &reply);
        if (rc != 0)
            return rc;
        size_t before = text->len;
        bool changed = false, over = false;
        /* [[key, [[id, [field, value, …]], …]]] or nil on timeout */
        if (reply->type == REDIS_REPLY_ARRAY && reply->elements == 1 &&
            reply->element[0]->type == REDIS_REPLY_ARRAY && reply->element[0]->elements == 2 &&
            reply->element[0]->element[1]->type == REDIS_REPLY_ARRAY) {
            const redisReply *entries = reply->element[0]->element[1];
            for (size_t i = 0; i < entries->elements && !over; i++) {
                const char *id, *type, *data;
                size_t data_len;
                if (!entry_of(entries->element[i], &id, &type, &data, &data_len))
                    continue;
                (void)bg_strlcpy(last, id, sizeof(last));
                if (strcmp(type, BG_JOBOUT_DELTA) == 0 && data != NULL) {
                    add_delta(data, data_len, text);
                } else if (strcmp(type, BG_JOBOUT_RESET) == 0) {
                    bg_buf_reset(text);
                    changed = true;
                } else if (strcmp(type, BG_JOBOUT_DONE) == 0) {
                    *end = BG_TURN_DONE;
                    over = true;
                } else if (strcmp(type, BG_JOBOUT_ERROR) == 0) {
                    *end = BG_TURN_FAILED;
                    if (error_code != NULL)
                        error_code_of(data, data_len, error_code);
                    over = true;
                }
            }
        }
        freeReplyObject(reply);
        changed = changed || text->len != before;
        if (over)
            return 0;
        if (changed && sink != NULL && sink->on_text != NULL &&
            !sink->on_text(sink->ctx, text->base, text->len)) {
            *end = BG_TURN_STOPPED;
            return 0;
        }
    }
}
