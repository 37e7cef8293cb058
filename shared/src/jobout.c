/*
 * Job output (see bg/jobout.h): key names, the append (XADD, EXPIRE, PUBLISH), the cancel flag,
 * and the delta batch.
 *
 * An append is three commands, not a script, sent as one pipeline (one round trip): the order is
 * what matters (the entry exists before anyone is told about it, and Redis runs a connection's
 * commands in order), and each later failure is harmless. A missed EXPIRE is renewed by the
 * next append; a missed PUBLISH is covered by the edge, which reads the stream once after it
 * registers interest and again on the next notification. Keeping them apart also keeps the
 * stream's writes plain commands a replica or a monitor shows as they are.
 *
 * Entries carry no MAXLEN: a client resuming with Last-Event-ID must find every entry since. The
 * batch bounds the entry count instead (one per BG_JOBOUT_BATCH_MS at most, bar full batches), and
 * the TTL removes the stream an hour after its last write.
 */
#include "bg/jobout.h"

#include <stdio.h>
#include <string.h>

#include "bg/err.h"
#include "bg/json.h"
#include "bg/timeutil.h"

/* What one batch may hold: far above a normal 50 ms of text, a bound while Redis is away. */
#define BATCH_TEXT_MAX (4u << 20)

static int job_key(char *out, size_t outlen, int shard, const char *kind, const char *job_id)
{
    if (outlen > 0)
        out[0] = '\0';
    if (job_id == NULL || job_id[0] == '\0' || strlen(job_id) > BG_JOBOUT_JOB_ID_MAX)
        return BG_ERR_INVALID;
    int n = snprintf(out, outlen, "bg:{s%d}:%s:%s", shard, kind, job_id);
    if (n < 0 || (size_t)n >= outlen) {
        if (outlen > 0)
            out[0] = '\0';
        return BG_ERR_INVALID;
    }
    return 0;
}

int bg_jobout_key_stream(char *out, size_t outlen, int shard, const char *job_id)
{
    return job_key(out, outlen, shard, "out", job_id);
}

int bg_jobout_key_cancel(char *out, size_t outlen, int shard, const char *job_id)
{
    return job_key(out, outlen, shard, "cancel", job_id);
}

int bg_jobout_key_channel(char *out, size_t outlen, int shard)
{
    int n = snprintf(out, outlen, "bg:{s%d}:out", shard);
    if (n < 0 || (size_t)n >= outlen) {
        if (outlen > 0)
            out[0] = '\0';
        return BG_ERR_TOO_LARGE;
    }
    return 0;
}

/* Runs one command and maps an error reply to BG_ERR_PROTOCOL; *out (may be NULL) gets the reply
 * (owned) on 0. */
static int command(bg_redis_t *r, int argc, const char *const *argv, const size_t *lens,
                   redisReply **out)
{
    redisReply *reply = NULL;
    int rc = bg_redis_argv(r, argc, argv, lens, &reply);
    if (rc != 0)
        return rc;
    if (reply->type == REDIS_REPLY_ERROR) {
        freeReplyObject(reply);
        return BG_ERR_PROTOCOL;
    }
    if (out != NULL)
        *out = reply;
    else
        freeReplyObject(reply);
    return 0;
}

/* The append, and with canceled (not NULL) the read of the cancel flag, in one round trip. */
static int append(bg_redis_t *r, int shard, const char *job_id, const char *type, const char *data,
                  size_t data_len, char *entry_id, bool *canceled)
{
    char key[BG_REDIS_KEY_MAX], channel[BG_REDIS_KEY_MAX], cancel[BG_REDIS_KEY_MAX];
    if (entry_id != NULL)
        entry_id[0] = '\0';
    if (canceled != NULL)
        *canceled = false;
    if (bg_jobout_key_stream(key, sizeof(key), shard, job_id) != 0 ||
        bg_jobout_key_channel(channel, sizeof(channel), shard) != 0 ||
        bg_jobout_key_cancel(cancel, sizeof(cancel), shard, job_id) != 0)
        return BG_ERR_INVALID;

    char ttl[24];
    snprintf(ttl, sizeof(ttl), "%d", BG_JOBOUT_TTL_S);
    const char *xadd[] = {"XADD", key, "*", "type", type, "data", data};
    const size_t xlens[] = {4, strlen(key), 1, 4, strlen(type), 4, data_len};
    const char *expire[] = {"EXPIRE", key, ttl};
    const char *publish[] = {"PUBLISH", channel, job_id};
    const char *get[] = {"GET", cancel};
    const bg_redis_cmd_t cmds[] = {
        {7, xadd, xlens}, {3, expire, NULL}, {3, publish, NULL}, {2, get, NULL}};
    redisReply *replies[BG_ARRAY_SIZE(cmds)];
    size_t n = canceled != NULL ? 4 : 3;
    int rc = bg_redis_pipeline(r, n, cmds, replies);
    if (rc != 0)
        return rc;
    /* Redis ran them in order: the entry exists before the notification; only its failure
     * counts (a failed EXPIRE is renewed by the next append, a lost notification covered by the
     * edge's reads) */
    if (replies[0]->type == REDIS_REPLY_ERROR)
        rc = BG_ERR_PROTOCOL;
    else if (entry_id != NULL && replies[0]->type == REDIS_REPLY_STRING)
        (void)bg_strlcpy(entry_id, replies[0]->str, BG_REDIS_KEY_MAX);
    if (canceled != NULL)
        *canceled = replies[3]->type == REDIS_REPLY_STRING;
    for (size_t i = 0; i < n; i++)
        freeReplyObject(replies[i]);
    return rc;
}

int bg_jobout_append(bg_redis_t *r, int shard, const char *job_id, const char *type,
                     const char *data, size_t data_len, char *entry_id)
{
    return append(r, shard, job_id, type, data, data_len, entry_id, NULL);
}

int bg_jobout_append_error(bg_redis_t *r, int shard, const char *job_id, const char *code,
                           bool retryable)
{
    bg_buf_t data;
    bg_buf_init(&data, 1024);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &data);
    bg_json_write_begin_object(&w);
    bg_json_write_field_str(&w, "code", code);
    bg_json_write_field_bool(&w, "retryable", retryable);
    bg_json_write_end_object(&w);
    int rc = bg_json_write_finish(&w);
    if (rc == 0)
        rc = bg_jobout_append(r, shard, job_id, BG_JOBOUT_ERROR, data.base, data.len, NULL);
    bg_buf_dispose(&data);
    return rc;
}

int bg_jobout_last_type(bg_redis_t *r, int shard, const char *job_id, char type[16])
{
    char key[BG_REDIS_KEY_MAX];
    type[0] = '\0';
    if (bg_jobout_key_stream(key, sizeof(key), shard, job_id) != 0)
        return BG_ERR_INVALID;
    const char *argv[] = {"XREVRANGE", key, "+", "-", "COUNT", "1"};
    redisReply *reply = NULL;
    int rc = command(r, 6, argv, NULL, &reply);
    if (rc != 0)
        return rc;
    /* [[id, [field, value, …]]] */
    if (reply->type == REDIS_REPLY_ARRAY && reply->elements == 1 &&
        reply->element[0]->type == REDIS_REPLY_ARRAY && reply->element[0]->elements == 2) {
        const redisReply *fields = reply->element[0]->element[1];
        for (size_t i = 0; fields->type == REDIS_REPLY_ARRAY && i + 1 < fields->elements; i += 2) {
            const redisReply *name = fields->element[i], *value = fields->element[i + 1];
            if (name->type == REDIS_REPLY_STRING && value->type == REDIS_REPLY_STRING &&
                strcmp(name->str, "type") == 0) {
                (void)bg_strlcpy(type, value->str, 16);
                break;
            }
        }
    }
    freeReplyObject(reply);
    return 0;
}

int bg_jobout_is_canceled(bg_redis_t *r, int shard, const char *job_id, bool *canceled)
{
    char key[BG_REDIS_KEY_MAX];
    *canceled = false;
    if (bg_jobout_key_cancel(key, sizeof(key), shard, job_id) != 0)
        return BG_ERR_INVALID;
    const char *argv[] = {"GET", key};
    redisReply *reply = NULL;
    int rc = command(r, 2, argv, NULL, &reply);
    if (rc != 0)
        return rc;
    *canceled = reply->type == REDIS_REPLY_STRING;
    freeReplyObject(reply);
    return 0;
}

int bg_jobout_cancel(bg_redis_t *r, int shard, const char *job_id, int64_t ttl_s)
{
    char key[BG_REDIS_KEY_MAX], ttl[24];
    if (bg_jobout_key_cancel(key, sizeof(key), shard, job_id) != 0 || ttl_s <= 0)
        return BG_ERR_INVALID;
    snprintf(ttl, sizeof(ttl), "%lld", (long long)ttl_s);
    const char *argv[] = {"SET", key, "1", "EX", ttl};
    return command(r, 5, argv, NULL, NULL);
}

void bg_jobout_batch_init(bg_jobout_batch_t *b)
{
    bg_buf_init(&b->text, BATCH_TEXT_MAX);
    b->pieces = 0;
    b->last_flush_ms = bg_timeutil_mono_ms();
}

void bg_jobout_batch_dispose(bg_jobout_batch_t *b)
{
    bg_buf_dispose(&b->text);
    b->pieces = 0;
}

void bg_jobout_batch_reset(bg_jobout_batch_t *b)
{
    bg_buf_reset(&b->text);
    b->pieces = 0;
}

bool bg_jobout_batch_add(bg_jobout_batch_t *b, const char *text, size_t len)
{
    /* past the cap (Redis away for long) the text is still counted, so the caller keeps flushing;
     * the reply itself is kept whole by the caller */
    if (bg_buf_append(&b->text, text, len) == 0 || b->pieces == 0)
        b->pieces++;
    return b->pieces >= BG_JOBOUT_BATCH_DELTAS;
}

bool bg_jobout_batch_is_due(const bg_jobout_batch_t *b, uint64_t now_ms)
{
    return b->pieces > 0 && now_ms - b->last_flush_ms >= BG_JOBOUT_BATCH_MS;
}

int bg_jobout_batch_flush(bg_jobout_batch_t *b, bg_redis_t *r, int shard, const char *job_id,
                          bool *canceled)
{
    if (canceled != NULL)
        *canceled = false;
    if (b->pieces == 0)
        return 0;
    bg_buf_t data;
    bg_buf_init(&data, BATCH_TEXT_MAX * 6 + 64);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &data);
    bg_json_write_begin_object(&w);
    bg_json_write_key(&w, "text");
    bg_json_write_strn(&w, b->text.base != NULL ? b->text.base : "", b->text.len);
    bg_json_write_end_object(&w);
    int rc = bg_json_write_finish(&w);
    if (rc == 0)
        rc = append(r, shard, job_id, BG_JOBOUT_DELTA, data.base, data.len, NULL, canceled);
    bg_buf_dispose(&data);
    if (rc == 0) {
        bg_jobout_batch_reset(b);
        b->last_flush_ms = bg_timeutil_mono_ms();
    }
    return rc;
}
