/*
 * A conversation's write sequence (see bg/convseq.h).
 *
 * The bump is three commands in one pipeline: SET NX of a random start (only when the key is
 * missing), INCR, EXPIRE; the reader's bg_convseq_read two (SET NX, GET). They need not be atomic:
 * the value only has to move, and two writers bumping at once each move it.
 */
#include "bg/convseq.h"

#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/err.h"
#include "bg/id.h"

/* Random starts lie in [2^40, 2^52): far from 0, and far from INCR's limit. */
#define START_MIN (1LL << 40)
#define START_SPAN ((1LL << 52) - (1LL << 40))

int bg_convseq_key(char *out, size_t outlen, int shard, const char *conversation_id)
{
    if (outlen > 0)
        out[0] = '\0';
    if (conversation_id == NULL || !bg_id_uuid_is_valid(conversation_id))
        return BG_ERR_INVALID;
    int n = snprintf(out, outlen, "bg:{s%d}:convseq:%s", shard, conversation_id);
    if (n < 0 || (size_t)n >= outlen) {
        if (outlen > 0)
            out[0] = '\0';
        return BG_ERR_INVALID;
    }
    return 0;
}

/* Parses a whole decimal reply value. */
static bool parse_seq(const char *s, size_t len, int64_t *out)
{
    if (len == 0 || len > 19)
        return false;
    int64_t v = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return true;
}

/* Runs, in one round trip, SET NX of a random start (only a missing key takes it), then cmd (GET
 * or INCR) and, with renew, EXPIRE; *reply gets cmd's reply (owned) on 0. */
static int after_start(bg_redis_t *r, int shard, const char *conversation_id, const char *cmd,
                       bool renew, redisReply **reply)
{
    *reply = NULL;
    char key[BG_REDIS_KEY_MAX];
    if (bg_convseq_key(key, sizeof(key), shard, conversation_id) != 0)
        return BG_ERR_INVALID;
    uint64_t draw = 0;
    randombytes_buf(&draw, sizeof(draw));
    char start[24], ttl[24];
    snprintf(start, sizeof(start), "%lld", (long long)(START_MIN + (int64_t)(draw % START_SPAN)));
    snprintf(ttl, sizeof(ttl), "%d", BG_CONVSEQ_TTL_S);
    const char *set[] = {"SET", key, start, "NX", "EX", ttl};
    const char *then[] = {cmd, key};
    const char *expire[] = {"EXPIRE", key, ttl};
    const bg_redis_cmd_t cmds[] = {{6, set, NULL}, {2, then, NULL}, {3, expire, NULL}};
    redisReply *replies[BG_ARRAY_SIZE(cmds)];
    size_t n = renew ? 3 : 2;
    int rc = bg_redis_pipeline(r, n, cmds, replies);
    if (rc != 0)
        return rc;
    *reply = replies[1];
    freeReplyObject(replies[0]);
    if (renew)
        freeReplyObject(replies[2]);
    return 0;
}

int bg_convseq_read(bg_redis_t *r, int shard, const char *conversation_id, int64_t *seq,
                    bool *known)
{
    *seq = 0;
    *known = false;
    redisReply *reply = NULL;
    int rc = after_start(r, shard, conversation_id, "GET", false, &reply);
    if (rc != 0)
        return rc;
    if (reply->type == REDIS_REPLY_ERROR)
        rc = BG_ERR_PROTOCOL;
    else if (reply->type == REDIS_REPLY_STRING)
        *known = parse_seq(reply->str, reply->len, seq);
    freeReplyObject(reply);
    return rc;
}

int bg_convseq_bump(bg_redis_t *r, int shard, const char *conversation_id, int64_t *seq)
{
    if (seq != NULL)
        *seq = 0;
    redisReply *reply = NULL;
    int rc = after_start(r, shard, conversation_id, "INCR", true, &reply);
    if (rc != 0)
        return rc;
    if (reply->type != REDIS_REPLY_INTEGER)
        rc = BG_ERR_PROTOCOL;
    else if (seq != NULL)
        *seq = reply->integer;
    freeReplyObject(reply);
    return rc;
}
