#include "bgtest_adm.h"

#include <stdlib.h>
#include <string.h>

#include "bg/common.h"
#include "bg/err.h"

int bgt_adm_set(bg_redis_t *r, int shards, const char *user_id, const char *field, long long value)
{
    char key[BG_REDIS_KEY_MAX];
    int rc = bg_policy_key_adm(key, sizeof(key), shards, user_id);
    if (rc != 0)
        return rc;
    static const char *const names[] = {"q_limit", "w_anchor", "w_len",   "w_until",  "rpm",
                                        "burst",   "conc",     "tok_cap", "tq_limit", "v"};
    const char *argv[] = {"HMGET",  key,      "status", "plan",   "features",
                          names[0], names[1], names[2], names[3], names[4],
                          names[5], names[6], names[7], names[8], names[9]};
    redisReply *reply = NULL;
    rc = bg_redis_argv(r, (int)BG_ARRAY_SIZE(argv), argv, NULL, &reply);
    if (rc != 0)
        return rc;
    if (reply->type != REDIS_REPLY_ARRAY || reply->elements != BG_ARRAY_SIZE(argv) - 2 ||
        reply->element[0]->type != REDIS_REPLY_STRING) {
        freeReplyObject(reply);
        return BG_ERR_NOT_FOUND;
    }
    bg_admission_state_t st;
    memset(&st, 0, sizeof(st));
    bg_strlcpy(st.user_id, user_id, sizeof(st.user_id));
    bg_strlcpy(st.status, reply->element[0]->str, sizeof(st.status));
    if (reply->element[1]->type == REDIS_REPLY_STRING)
        bg_strlcpy(st.plan, reply->element[1]->str, sizeof(st.plan));
    if (reply->element[2]->type == REDIS_REPLY_STRING)
        bg_strlcpy(st.limits.features, reply->element[2]->str, sizeof(st.limits.features));
    int64_t *nums[] = {&st.limits.q_limit,  &st.w_anchor,
                       &st.w_len,           &st.w_until,
                       &st.limits.rpm,      &st.limits.burst,
                       &st.limits.conc,     &st.limits.tok_cap,
                       &st.limits.tq_limit, &st.v};
    bool found = false;
    for (size_t i = 0; i < BG_ARRAY_SIZE(names); i++) {
        const redisReply *e = reply->element[3 + i];
        *nums[i] = e->type == REDIS_REPLY_STRING ? strtoll(e->str, NULL, 10) : 0;
        if (strcmp(names[i], field) == 0 && i + 1 < BG_ARRAY_SIZE(names)) {
            *nums[i] = value;
            found = true;
        }
    }
    freeReplyObject(reply);
    if (!found)
        return BG_ERR_NOT_FOUND;
    return bg_policy_state_write(r, shards, &st);
}
