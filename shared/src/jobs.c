/*
 * Enqueueing jobs. See bg/jobs.h.
 *
 * Both variants build the same XADD, so the edge and the workers cannot disagree on the layout of
 * an entry: XADD <stream> MAXLEN ~ <maxlen> * job_id <id> <name> <value> …
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/err.h"
#include "bg/jobs.h"

#define FIXED_ARGS 8

typedef struct st_xadd {
    char key[BG_REDIS_KEY_MAX];
    char maxlen[24];
    const char *argv[FIXED_ARGS + 2 * BG_JOBS_MAX_FIELDS];
    int argc;
} xadd_t;

static int build(const bg_job_spec_t *job, xadd_t *x)
{
    if (job == NULL || !bg_str_present(job->role) || !bg_str_present(job->job_id) ||
        job->shard < 0 || job->maxlen < 1 || job->nfields > BG_JOBS_MAX_FIELDS ||
        (job->nfields > 0 && job->fields == NULL))
        return BG_ERR_INVALID;
    if (bg_redis_key_queue(x->key, sizeof(x->key), job->shard, job->role) != 0)
        return BG_ERR_INVALID;
    snprintf(x->maxlen, sizeof(x->maxlen), "%lld", (long long)job->maxlen);
    int n = 0;
    x->argv[n++] = "XADD";
    x->argv[n++] = x->key;
    x->argv[n++] = "MAXLEN";
    x->argv[n++] = "~";
    x->argv[n++] = x->maxlen;
    x->argv[n++] = "*";
    x->argv[n++] = BG_JOBS_FIELD_ID;
    x->argv[n++] = job->job_id;
    for (size_t i = 0; i < 2 * job->nfields; i++) {
        if (job->fields[i] == NULL)
            return BG_ERR_INVALID;
        x->argv[n++] = job->fields[i];
    }
    x->argc = n;
    return 0;
}

int bg_jobs_enqueue(bg_redis_t *r, const bg_job_spec_t *job, char *entry_id, size_t entry_id_len)
{
    if (entry_id != NULL && entry_id_len > 0)
        entry_id[0] = '\0';
    xadd_t x;
    int rc = build(job, &x);
    if (rc != 0)
        return rc;
    redisReply *reply = NULL;
    rc = bg_redis_argv(r, x.argc, x.argv, NULL, &reply);
    if (rc != 0)
        return rc;
    if (reply->type != REDIS_REPLY_STRING) {
        freeReplyObject(reply);
        return BG_ERR_PROTOCOL;
    }
    if (entry_id != NULL && entry_id_len > 0)
        (void)bg_strlcpy(entry_id, reply->str, entry_id_len);
    freeReplyObject(reply);
    return 0;
}

int bg_jobs_enqueue_async(bg_redis_async_t *c, const bg_job_spec_t *job, bg_redis_async_cb cb,
                          void *ud)
{
    xadd_t x;
    int rc = build(job, &x);
    if (rc != 0)
        return rc;
    return bg_redis_async_argv(c, cb, ud, x.argc, x.argv, NULL);
}
