/*
 * The billing role: one job per Paddle event, whose payload waits in webhook_inbox (the edge stored
 * it before it answered Paddle). The job carries only the event id, so a redelivered or replayed
 * job reads the one stored copy, and the stream holds no customer data.
 *
 * Order of effects, as in the usage role: Postgres first (bg_billing_apply commits the
 * subscription, payment and ledger changes and marks the event processed, in one transaction),
 * then Redis (the user's admission state compiled from the new rows). A Redis failure returns
 * BG_ERR_RETRY: the next delivery finds the event processed, changes nothing in Postgres and
 * writes Redis again. The compile reads the rows as they are, not the event, so whichever event
 * of a user comes last writes the state of all of them.
 *
 * An event whose user is not known yet (no custom_data.user_id, a subscription not seen yet) is
 * retried: the event that names the user usually arrives seconds later, and after
 * BG_MAX_DELIVERIES the job waits in the dead letters for `bgctl dlq replay`. The failure is noted
 * on the inbox row (attempts, error) either way.
 */
#include "role_billing.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/billing.h"
#include "bg/err.h"
#include "bg/log.h"
#include "bg/pg.h"
#include "bg/policy.h"
#include "bg/timeutil.h"

typedef struct st_billing_role {
    char *database_url; /* owned */
    int shards;
} billing_role_t;

int wk_billing_init(const bg_config_t *cfg, void **ud)
{
    if (!bg_str_present(cfg->database_url)) {
        bg_error("billing: BG_DATABASE_URL is not set");
        return BG_ERR_CONFIG;
    }
    billing_role_t *b = bg_calloc(1, sizeof(*b));
    b->database_url = bg_strdup(cfg->database_url);
    b->shards = cfg->shards;
    *ud = b;
    return 0;
}

void wk_billing_dispose(void *ud)
{
    billing_role_t *b = ud;
    if (b == NULL)
        return;
    free(b->database_url);
    free(b);
}

int wk_billing_handle(wk_job_t *job, void *ud)
{
    const billing_role_t *b = ud;
    const char *event_id = wk_job_field(job, "event_id");
    const char *provider = wk_job_field(job, "provider");
    if (!bg_str_present(event_id) || strlen(event_id) >= BG_BILLING_EVENT_ID_SIZE ||
        (provider != NULL && strcmp(provider, "paddle") != 0)) {
        snprintf(job->error, sizeof(job->error), "billing job without a Paddle event id");
        return BG_ERR_INVALID;
    }
    PGconn *c = bg_pg_thread_conn(b->database_url);
    if (c == NULL) {
        snprintf(job->error, sizeof(job->error), "database unavailable");
        return BG_ERR_UNAVAILABLE;
    }
    bg_billing_result_t res;
    int rc = bg_billing_apply(c, event_id, &res);
    if (rc != 0) {
        snprintf(job->error, sizeof(job->error), "%s: %s", bg_strerror(rc),
                 res.error[0] != '\0' ? res.error : "not applied");
        if (rc != BG_ERR_NOT_FOUND && bg_billing_note_failure(c, event_id, job->error) != 0)
            bg_warn("billing: cannot note the failure of event %s", event_id);
        if (rc == BG_ERR_NOT_FOUND)
            return BG_ERR_INVALID; /* nothing stored under that id: retrying cannot help */
        return rc;
    }
    if (res.user_id[0] == '\0')
        return 0;
    bg_admission_state_t st;
    rc = bg_policy_compile_user(c, res.user_id, bg_timeutil_wall_ms(), &st);
    if (rc == 0)
        rc = bg_policy_state_write(job->redis, b->shards, &st);
    if (rc != 0) {
        snprintf(job->error, sizeof(job->error), "applied; admission state not written: %s",
                 bg_strerror(rc));
        return rc == BG_ERR_NOT_FOUND ? 0 : BG_ERR_RETRY; /* a deleted user has no state */
    }
    bg_debug("billing: %s %s, user %s now %s on %s", res.event_type, event_id, res.user_id,
             st.status, st.plan);
    return 0;
}
