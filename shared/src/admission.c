/*
 * Admission control on Redis. See bg/admission.h for the contract and lua/admit.lua,
 * lua/settle.lua for the rules themselves.
 *
 * Design: all the deciding happens in the scripts, so that any number of edge processes see one
 * consistent state and a check and its effect cannot be separated (DESIGN.md §3). This file only
 * names keys, lays out the arguments (the same way for the blocking and the asynchronous client,
 * so both always send the same EVALSHA) and reads the fixed-shape replies back. A reply of any
 * other shape is a protocol error, never a decision: the caller fails closed on it.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/admission.h"
#include "bg/authstate.h"
#include "bg/err.h"
#include "bg/log.h"
#include "bg/timeutil.h"

#define ADMIT_KEYS 9
#define ADMIT_FIXED_ARGS 11
#define SETTLE_KEYS 4
#define REPLY_ELEMENTS 10

static const char *const verdict_names[] = {
    [BG_ADMISSION_OK] = "ok",
    [BG_ADMISSION_NO_STATE] = "no_state",
    [BG_ADMISSION_NO_PLAN] = "no_plan",
    [BG_ADMISSION_FEATURE] = "feature",
    [BG_ADMISSION_RATE_LIMITED] = "rate_limited",
    [BG_ADMISSION_CONCURRENCY] = "concurrency",
    [BG_ADMISSION_QUOTA_EXCEEDED] = "quota_exceeded",
    [BG_ADMISSION_TOO_MANY_TOKENS] = "too_many_tokens",
    [BG_ADMISSION_REVOKED] = "revoked",
};

static const char *const verdict_errors[] = {
    [BG_ADMISSION_OK] = NULL,
    [BG_ADMISSION_NO_STATE] = "service_unavailable",
    [BG_ADMISSION_NO_PLAN] = "payment_required",
    [BG_ADMISSION_FEATURE] = "feature_not_in_plan",
    [BG_ADMISSION_RATE_LIMITED] = "rate_limited",
    [BG_ADMISSION_CONCURRENCY] = "rate_limited",
    [BG_ADMISSION_QUOTA_EXCEEDED] = "quota_exceeded",
    [BG_ADMISSION_TOO_MANY_TOKENS] = "validation_failed",
    [BG_ADMISSION_REVOKED] = "unauthorized",
};

const char *bg_admission_verdict_name(bg_admission_verdict_t v)
{
    if ((size_t)v >= BG_ARRAY_SIZE(verdict_names))
        return "unknown";
    return verdict_names[v];
}

const char *bg_admission_error_code(bg_admission_verdict_t v)
{
    if ((size_t)v >= BG_ARRAY_SIZE(verdict_errors))
        return "internal";
    return verdict_errors[v];
}

/* ---- keys ---- */

/* Writes "bg:{s<shard>}:<what><id>"; returns 0 or BG_ERR_INVALID when it does not fit. */
static int key_of(char *out, size_t outlen, int shard, const char *what, const char *id)
{
    int n = snprintf(out, outlen, "bg:{s%d}:%s%s", shard, what, id);
    if (n < 0 || (size_t)n >= outlen) {
        if (outlen > 0)
            out[0] = '\0';
        return BG_ERR_INVALID;
    }
    return 0;
}

int bg_admission_keys(bg_admission_keys_t *out, int shards, const char *user_id)
{
    if (out == NULL || !bg_str_present(user_id) || shards < 1)
        return BG_ERR_INVALID;
    int s = bg_shard_of(user_id, shards);
    out->shard = s;
    int rc = key_of(out->adm, sizeof(out->adm), s, "adm:", user_id);
    if (rc == 0)
        rc = key_of(out->quota, sizeof(out->quota), s, "quota:", user_id);
    if (rc == 0)
        rc = key_of(out->res, sizeof(out->res), s, "res:", user_id);
    if (rc == 0)
        rc = key_of(out->resd, sizeof(out->resd), s, "resd:", user_id);
    return rc;
}

int bg_admission_key_owner(char *out, size_t outlen, int shard, const char *job_id)
{
    if (out == NULL || outlen == 0 || shard < 0 || !bg_str_present(job_id))
        return BG_ERR_INVALID;
    return key_of(out, outlen, shard, "job:", job_id);
}

int bg_admission_key_marker(char *out, size_t outlen, int shard, const char *job_id)
{
    if (out == NULL || outlen == 0 || shard < 0 || !bg_str_present(job_id))
        return BG_ERR_INVALID;
    return key_of(out, outlen, shard, "stl:", job_id);
}

/* ---- arguments of admit.lua ---- */

typedef struct st_admit_call {
    bg_admission_keys_t keys;
    char stream[BG_REDIS_KEY_MAX];
    char owner[BG_REDIS_KEY_MAX];
    char rev[BG_REDIS_KEY_MAX], nbf[BG_REDIS_KEY_MAX], loc[BG_REDIS_KEY_MAX];
    char issued[24];
    const char *keyv[ADMIT_KEYS];
    char max_tokens[24];
    char key_rpm[24];
    char key_burst[24];
    char ttl[24];
    char maxlen[24];
    const char *argv[ADMIT_FIXED_ARGS + 2 * BG_JOBS_MAX_FIELDS];
    int argc;
} admit_call_t;

static void fmt_i64(char *out, size_t outlen, int64_t v)
{
    snprintf(out, outlen, "%lld", (long long)v);
}

/* Lays out KEYS and ARGV of admit.lua in *call (which the pointers in it refer to). */
static int build_admit(admit_call_t *call, int shards, const bg_admission_req_t *req)
{
    if (req == NULL || !bg_str_present(req->role) || !bg_str_present(req->job_id) ||
        req->key_rpm < 0 || req->max_tokens < 0 || req->reservation_ttl_ms <= 0 ||
        req->stream_maxlen < 1 || req->nfields > BG_JOBS_MAX_FIELDS ||
        (req->nfields > 0 && req->fields == NULL))
        return BG_ERR_INVALID;
    if (req->api_key_id != NULL && req->api_key_id[0] == '\0')
        return BG_ERR_INVALID;
    int rc = bg_admission_keys(&call->keys, shards, req->user_id);
    if (rc != 0)
        return rc;
    if (bg_redis_key_queue(call->stream, sizeof(call->stream), call->keys.shard, req->role) != 0)
        return BG_ERR_INVALID;
    call->keyv[0] = call->keys.adm;
    call->keyv[1] = call->keys.quota;
    call->keyv[2] = call->keys.res;
    call->keyv[3] = call->keys.resd;
    call->keyv[4] = call->stream;
    if (bg_admission_key_owner(call->owner, sizeof(call->owner), call->keys.shard, req->job_id) !=
        0)
        return BG_ERR_INVALID;
    call->keyv[5] = call->owner;
    if (req->session_id != NULL) {
        if (req->session_id[0] == '\0' || req->issued_ms <= 0 ||
            bg_authstate_key_revoked(call->rev, sizeof(call->rev), call->keys.shard,
                                     req->session_id) != 0 ||
            bg_authstate_key_nbf(call->nbf, sizeof(call->nbf), call->keys.shard, req->user_id) !=
                0 ||
            bg_authstate_key_locale(call->loc, sizeof(call->loc), call->keys.shard, req->user_id) !=
                0)
            return BG_ERR_INVALID;
        fmt_i64(call->issued, sizeof(call->issued), req->issued_ms);
        call->keyv[6] = call->rev;
        call->keyv[7] = call->nbf;
        call->keyv[8] = call->loc;
    } else {
        /* not read: keys of the same slot stand in (every key a script may touch is in KEYS) */
        call->issued[0] = '\0';
        call->keyv[6] = call->keys.adm;
        call->keyv[7] = call->keys.adm;
        call->keyv[8] = call->keys.adm;
    }

    fmt_i64(call->max_tokens, sizeof(call->max_tokens), req->max_tokens);
    /* a key limit only exists with a key */
    fmt_i64(call->key_rpm, sizeof(call->key_rpm), req->api_key_id != NULL ? req->key_rpm : 0);
    fmt_i64(call->key_burst, sizeof(call->key_burst), req->key_burst < 1 ? 1 : req->key_burst);
    fmt_i64(call->ttl, sizeof(call->ttl), req->reservation_ttl_ms);
    fmt_i64(call->maxlen, sizeof(call->maxlen), req->stream_maxlen);
    int n = 0;
    call->argv[n++] = req->job_id;
    call->argv[n++] = req->feature != NULL ? req->feature : "";
    call->argv[n++] = call->max_tokens;
    call->argv[n++] = req->api_key_id != NULL ? req->api_key_id : "";
    call->argv[n++] = call->key_rpm;
    call->argv[n++] = call->key_burst;
    call->argv[n++] = call->ttl;
    call->argv[n++] = call->maxlen;
    call->argv[n++] = req->record_owner ? req->user_id : "";
    call->argv[n++] = BG_ADMISSION_OWNER_TTL_S_STR;
    call->argv[n++] = call->issued;
    for (size_t i = 0; i < 2 * req->nfields; i++) {
        if (req->fields[i] == NULL)
            return BG_ERR_INVALID;
        call->argv[n++] = req->fields[i];
    }
    call->argc = n;
    return 0;
}

/* ---- replies ---- */

static bool reply_is_string(const redisReply *r)
{
    return r != NULL && (r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS) &&
           r->str != NULL;
}

static int reply_int(const redisReply *r, int64_t *out)
{
    if (r == NULL || r->type != REDIS_REPLY_INTEGER)
        return BG_ERR_PROTOCOL;
    *out = (int64_t)r->integer;
    return 0;
}

/* Reads the 9-element reply of admit.lua into *d. Returns 0 or BG_ERR_PROTOCOL. */
static int parse_decision(const redisReply *reply, bg_admission_decision_t *d)
{
    memset(d, 0, sizeof(*d));
    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY || reply->elements != REPLY_ELEMENTS ||
        !reply_is_string(reply->element[0]) || !reply_is_string(reply->element[8]) ||
        !reply_is_string(reply->element[9]))
        return BG_ERR_PROTOCOL;
    size_t v = 0;
    while (v < BG_ARRAY_SIZE(verdict_names) &&
           strcmp(verdict_names[v], reply->element[0]->str) != 0)
        v++;
    if (v == BG_ARRAY_SIZE(verdict_names))
        return BG_ERR_PROTOCOL;
    d->verdict = (bg_admission_verdict_t)v;
    int64_t *fields[] = {&d->q_limit,      &d->q_remaining, &d->q_reset_ms,    &d->rl_limit,
                         &d->rl_remaining, &d->rl_reset_ms, &d->retry_after_ms};
    for (size_t i = 0; i < BG_ARRAY_SIZE(fields); i++) {
        if (reply_int(reply->element[1 + i], fields[i]) != 0) {
            memset(d, 0, sizeof(*d));
            return BG_ERR_PROTOCOL;
        }
    }
    const redisReply *id = reply->element[8];
    if ((d->verdict == BG_ADMISSION_OK) != (id->len > 0) || id->len >= sizeof(d->entry_id)) {
        memset(d, 0, sizeof(*d));
        return BG_ERR_PROTOCOL;
    }
    memcpy(d->entry_id, id->str, id->len);
    d->entry_id[id->len] = '\0';
    const redisReply *loc = reply->element[9];
    if (loc->len < sizeof(d->locale)) {
        memcpy(d->locale, loc->str, loc->len);
        d->locale[loc->len] = '\0';
    }
    return 0;
}

/* ---- blocking ---- */

int bg_admission_admit(bg_redis_t *r, int shards, const bg_admission_req_t *req,
                       bg_admission_decision_t *out)
{
    if (out == NULL)
        return BG_ERR_INVALID;
    memset(out, 0, sizeof(*out));
    if (r == NULL)
        return BG_ERR_INVALID;
    admit_call_t *call = bg_malloc(sizeof(*call));
    int rc = build_admit(call, shards, req);
    if (rc != 0)
        goto out_free_call;
    redisReply *reply = NULL;
    rc = bg_redis_script(r, BG_ADMISSION_ADMIT_SCRIPT, ADMIT_KEYS, call->keyv, call->argc,
                         call->argv, &reply);
    if (rc != 0)
        goto out_free_call;
    rc = parse_decision(reply, out);
    if (rc != 0 && reply->type == REDIS_REPLY_ERROR)
        bg_error("admission: admit of job %s failed: %s", req->job_id, reply->str);
    freeReplyObject(reply);
out_free_call:
    free(call);
    return rc;
}

int bg_admission_settle(bg_redis_t *r, int shards, const char *user_id, const char *job_id,
                        bg_admission_outcome_t outcome, int64_t real_tokens,
                        bg_admission_settle_result_t *result, int64_t *used_after)
{
    if (used_after != NULL)
        *used_after = 0;
    if (r == NULL || result == NULL || real_tokens < 0 ||
        (outcome != BG_ADMISSION_USE && outcome != BG_ADMISSION_REFUND))
        return BG_ERR_INVALID;
    bg_admission_keys_t keys;
    char marker[BG_REDIS_KEY_MAX];
    int rc = bg_admission_keys(&keys, shards, user_id);
    if (rc != 0 || bg_admission_key_marker(marker, sizeof(marker), keys.shard, job_id) != 0)
        return BG_ERR_INVALID;
    const char *keyv[SETTLE_KEYS] = {keys.quota, keys.res, keys.resd, marker};
    char tokens[24];
    fmt_i64(tokens, sizeof(tokens), real_tokens);
    const char *argv[] = {job_id, outcome == BG_ADMISSION_USE ? "use" : "refund", tokens};
    redisReply *reply = NULL;
    rc = bg_redis_script(r, BG_ADMISSION_SETTLE_SCRIPT, SETTLE_KEYS, keyv, 3, argv, &reply);
    if (rc != 0)
        return rc;
    int64_t used = 0;
    rc = BG_ERR_PROTOCOL;
    if (reply->type == REDIS_REPLY_ARRAY && reply->elements == 2 &&
        reply_is_string(reply->element[0]) && reply_int(reply->element[1], &used) == 0) {
        const char *s = reply->element[0]->str;
        rc = 0;
        if (strcmp(s, "settled") == 0)
            *result = BG_ADMISSION_SETTLED;
        else if (strcmp(s, "duplicate") == 0)
            *result = BG_ADMISSION_SETTLE_DUPLICATE;
        else if (strcmp(s, "unknown") == 0)
            *result = BG_ADMISSION_SETTLE_UNKNOWN;
        else
            rc = BG_ERR_PROTOCOL;
    } else if (reply->type == REDIS_REPLY_ERROR) {
        bg_error("admission: settle of job %s failed: %s", job_id, reply->str);
    }
    if (rc == 0 && used_after != NULL)
        *used_after = used;
    freeReplyObject(reply);
    return rc;
}

/* ---- asynchronous ---- */

typedef struct st_async_admit {
    bg_admission_cb cb;
    void *ud;
} async_admit_t;

static void on_admit_reply(void *ud, int err, const redisReply *reply)
{
    async_admit_t *a = ud;
    bg_admission_cb cb = a->cb;
    void *cb_ud = a->ud;
    /* freed first: the callback may free the client or start another admit */
    free(a);
    if (err != 0) {
        cb(cb_ud, err, NULL);
        return;
    }
    bg_admission_decision_t d;
    int rc = parse_decision(reply, &d);
    if (rc != 0) {
        if (reply->type == REDIS_REPLY_ERROR)
            bg_error("admission: admit failed: %s", reply->str);
        cb(cb_ud, rc, NULL);
        return;
    }
    cb(cb_ud, 0, &d);
}

int bg_admission_admit_async(bg_redis_async_t *c, int shards, const bg_admission_req_t *req,
                             bg_admission_cb cb, void *ud)
{
    if (c == NULL || cb == NULL)
        return BG_ERR_INVALID;
    admit_call_t *call = bg_malloc(sizeof(*call));
    int rc = build_admit(call, shards, req);
    if (rc != 0)
        goto out_free_call;
    async_admit_t *a = bg_malloc(sizeof(*a));
    a->cb = cb;
    a->ud = ud;
    /* the client copies keys and arguments, so call can go as soon as this returns */
    rc = bg_redis_async_script(c, on_admit_reply, a, BG_ADMISSION_ADMIT_SCRIPT, ADMIT_KEYS,
                               call->keyv, call->argc, call->argv);
    if (rc != 0)
        free(a);
out_free_call:
    free(call);
    return rc;
}

/* ---- headers ---- */

int64_t bg_admission_retry_after_s(const bg_admission_decision_t *d)
{
    if (d == NULL || d->verdict == BG_ADMISSION_OK || d->retry_after_ms <= 0)
        return 0;
    return (d->retry_after_ms + 999) / 1000;
}

/*
 * Writes a duration the way OpenAI's x-ratelimit-reset-* headers do (Go's time.Duration):
 * "250ms" below a second, else "[<h>h][<m>m]<s>[.<frac>]s" ("1.5s", "6m0s").
 */
static void fmt_duration(char *out, size_t outlen, int64_t ms)
{
    if (ms < 0)
        ms = 0;
    if (ms < 1000) {
        snprintf(out, outlen, "%lldms", (long long)ms);
        return;
    }
    long long h = ms / 3600000, m = ms / 60000 % 60, s = ms / 1000 % 60, frac = ms % 1000;
    char sec[16];
    if (frac == 0) {
        snprintf(sec, sizeof(sec), "%lld", s);
    } else {
        /* trailing zeros go, as in Go: 1.500s is "1.5s" */
        int digits = 3;
        while (frac % 10 == 0) {
            frac /= 10;
            digits--;
        }
        snprintf(sec, sizeof(sec), "%lld.%0*lld", s, digits, frac);
    }
    if (h > 0)
        snprintf(out, outlen, "%lldh%lldm%ss", h, m, sec);
    else if (m > 0)
        snprintf(out, outlen, "%lldm%ss", m, sec);
    else
        snprintf(out, outlen, "%ss", sec);
}

static bg_admission_header_t *add_header(bg_admission_header_t *out, size_t *n, const char *name)
{
    bg_admission_header_t *h = &out[(*n)++];
    h->name = name;
    h->value[0] = '\0';
    return h;
}

size_t bg_admission_headers(const bg_admission_decision_t *d,
                            bg_admission_header_t out[BG_ADMISSION_HEADERS_MAX])
{
    size_t n = 0;
    if (d == NULL || out == NULL)
        return 0;
    bg_admission_header_t *h;
    if (d->rl_limit > 0) {
        h = add_header(out, &n, "x-ratelimit-limit-requests");
        fmt_i64(h->value, sizeof(h->value), d->rl_limit);
        h = add_header(out, &n, "x-ratelimit-remaining-requests");
        fmt_i64(h->value, sizeof(h->value), d->rl_remaining);
        h = add_header(out, &n, "x-ratelimit-reset-requests");
        fmt_duration(h->value, sizeof(h->value), d->rl_reset_ms);
    }
    if (d->verdict != BG_ADMISSION_NO_STATE && d->verdict != BG_ADMISSION_NO_PLAN &&
        d->verdict != BG_ADMISSION_REVOKED) {
        h = add_header(out, &n, "x-quota-limit");
        fmt_i64(h->value, sizeof(h->value), d->q_limit);
        h = add_header(out, &n, "x-quota-remaining");
        fmt_i64(h->value, sizeof(h->value), d->q_remaining);
        h = add_header(out, &n, "x-quota-reset");
        if (bg_timeutil_format_rfc3339(h->value, sizeof(h->value), d->q_reset_ms, false) != 0)
            n--; /* a reset outside years 0000-9999 is a broken config: leave the header out */
    }
    int64_t retry = bg_admission_retry_after_s(d);
    if (retry > 0) {
        h = add_header(out, &n, "retry-after");
        fmt_i64(h->value, sizeof(h->value), retry);
    }
    return n;
}
