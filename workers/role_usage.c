/*
 * The usage role: one usage event (bg/usage.h) in, exactly one usage_records row, at most one
 * ledger transaction and one settled reservation out, however often the event is delivered.
 *
 * Exactly once in effect (DESIGN.md §7): the row and the ledger debit commit in ONE Postgres
 * transaction, and the debit is posted only when this transaction inserted the row (INSERT … ON
 * CONFLICT (request_id) DO NOTHING RETURNING id). A redelivery, or a second worker racing on the
 * same event, finds the row (or waits for the first transaction on the unique index and then finds
 * it) and posts nothing; the ledger's own idempotency key "usage:<request id>" is a second lock on
 * the same door. The usage_daily rollup is a trigger on the insert, so it counts once as well.
 *
 * The Redis settle comes after the commit: if it fails (Redis down), the handler returns
 * BG_ERR_RETRY and the job stays pending; the next delivery finds the row, skips the ledger, and
 * settles again, which lua/settle.lua makes idempotent per job ("duplicate" when settled already,
 * "unknown" when the reservation lapsed). The reverse order could settle a job whose record then
 * fails to commit. A crash between the commit and the settle leaves the reservation held until the
 * job is reclaimed (BG_CLAIM_IDLE_MS), or at worst until it lapses.
 *
 * One event per transaction, not multi-row batches: the runtime hands a handler one job, and XACKs
 * it when the handler returns, so a batch would have to be drained and acknowledged by the handler
 * behind the runtime's back (its claim refresh, delivery counts and dead-lettering would not see
 * those entries), or held across handler calls (an event's effect would not be durable when its
 * handler returns 0). Concurrency comes from BG_WORKER_CONCURRENCY threads and from more worker
 * processes instead; each event costs five short round trips (BEGIN, INSERT, the user's account,
 * the ledger post as one statement, COMMIT), the system account being cached per thread.
 * test_usage_worker.c prints the measured rate: 200–500 events/s per process of 4 threads on a
 * busy 2-CPU test machine, one user (whose transactions queue on their usage_daily row) or eight.
 */
#include "role_usage.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/admission.h"
#include "bg/err.h"
#include "bg/json.h"
#include "bg/ledger.h"
#include "bg/log.h"
#include "bg/pg.h"
#include "bg/usage.h"

typedef struct st_usage_role {
    char *database_url; /* owned */
    int shards;
} usage_role_t;

/* Per handler thread: ids of accounts that exist for good (committed; the ledger never deletes). */
typedef struct st_usage_thread {
    char consumed[BG_LEDGER_ID_LEN + 1]; /* the system 'consumed' account, "" until known */
} usage_thread_t;

int wk_usage_init(const bg_config_t *cfg, void **ud)
{
    if (!bg_str_present(cfg->database_url)) {
        bg_error("usage: BG_DATABASE_URL is not set");
        return BG_ERR_CONFIG;
    }
    usage_role_t *u = bg_calloc(1, sizeof(*u));
    u->database_url = bg_strdup(cfg->database_url);
    u->shards = cfg->shards;
    *ud = u;
    return 0;
}

void wk_usage_dispose(void *ud)
{
    usage_role_t *u = ud;
    if (u == NULL)
        return;
    free(u->database_url);
    free(u);
}

void wk_usage_thread_dispose(void *thread_state, void *ud)
{
    (void)ud;
    free(thread_state);
}

/* The ledger transaction's metadata: what a statement line needs without a join. */
static int metadata(const bg_usage_event_t *ev, const char *record_id, bg_buf_t *out)
{
    bg_json_writer_t w;
    bg_json_writer_init(&w, out);
    bg_json_write_begin_object(&w);
    bg_json_write_field_str(&w, "request_id", ev->request_id);
    bg_json_write_key(&w, "usage_record_id");
    bg_json_write_int(&w, strtoll(record_id, NULL, 10));
    bg_json_write_field_str(&w, "channel", ev->channel);
    bg_json_write_field_str(&w, "model", ev->model);
    bg_json_write_field_str(&w, "status", ev->status);
    bg_json_write_end_object(&w);
    int rc = bg_json_write_finish(&w);
    if (rc == 0)
        rc = bg_buf_putc(out, '\0') == 0 ? 0 : BG_ERR_TOO_LARGE;
    return rc;
}

/* −1 request credit from the user's credits account to the system 'consumed' account. */
static int debit(PGconn *c, const usage_thread_t *t, const bg_usage_event_t *ev,
                 const char *record_id, char consumed[BG_LEDGER_ID_LEN + 1])
{
    char credits[BG_LEDGER_ID_LEN + 1];
    int rc = bg_ledger_account(c, "user", ev->user_id, "credits", BG_LEDGER_UNIT_REQUEST, credits);
    if (rc != 0)
        return rc;
    if (t->consumed[0] != '\0') {
        memcpy(consumed, t->consumed, BG_LEDGER_ID_LEN + 1);
    } else {
        rc = bg_ledger_account(c, "system", NULL, "consumed", BG_LEDGER_UNIT_REQUEST, consumed);
        if (rc != 0)
            return rc;
    }
    char key[sizeof("usage:") + BG_USAGE_REQUEST_ID_MAX];
    snprintf(key, sizeof(key), "usage:%s", ev->request_id);
    bg_buf_t meta;
    bg_buf_init(&meta, 4096);
    rc = metadata(ev, record_id, &meta);
    if (rc == 0) {
        const bg_ledger_entry_t entries[] = {{credits, BG_LEDGER_UNIT_REQUEST, -1},
                                             {consumed, BG_LEDGER_UNIT_REQUEST, 1}};
        const bg_ledger_tx_t tx = {.idempotency_key = key,
                                   .kind = "usage.settle",
                                   .description = "LLM request",
                                   .user_id = ev->user_id,
                                   .metadata_json = meta.base,
                                   .effective_at_ms = ev->occurred_at_ms,
                                   .nentries = 2,
                                   .entries = entries};
        rc = bg_ledger_post(c, &tx, NULL, NULL);
    }
    bg_buf_dispose(&meta);
    return rc;
}

/* Inserts the record unless it exists; *record_id is "" when it existed. */
static int insert_record(PGconn *c, const bg_usage_event_t *ev, bool charged, char record_id[24])
{
    char prompt[24], completion[24], latency[24], ttft[24], at[24];
    snprintf(prompt, sizeof(prompt), "%lld", (long long)ev->prompt_tokens);
    snprintf(completion, sizeof(completion), "%lld", (long long)ev->completion_tokens);
    snprintf(latency, sizeof(latency), "%lld", (long long)ev->latency_ms);
    snprintf(ttft, sizeof(ttft), "%lld", (long long)ev->ttft_ms);
    snprintf(at, sizeof(at), "%lld", (long long)ev->occurred_at_ms);
    const char *p[] = {ev->request_id,
                       ev->user_id,
                       ev->organization_id,
                       ev->agent_id,
                       ev->channel,
                       ev->model,
                       prompt,
                       completion,
                       ev->token_source,
                       ev->latency_ms >= 0 ? latency : NULL,
                       ev->ttft_ms >= 0 ? ttft : NULL,
                       ev->status,
                       bg_usage_event_error_class(ev),
                       ev->cache_hit ? "true" : "false",
                       charged ? "1" : "0",
                       at};
    PGresult *res;
    int rc = bg_pg_exec_prep(
        c,
        "INSERT INTO usage_records (request_id, user_id, organization_id, agent_id, channel, "
        "model, prompt_tokens, completion_tokens, token_source, latency_ms, ttft_ms, status, "
        "error_class, cache_hit, requests_charged, created_at) VALUES ($1, $2::uuid, $3::uuid, "
        "$4::uuid, $5, $6, $7::int, $8::int, $9, $10::int, $11::int, $12, $13, $14::boolean, "
        "$15::int, to_timestamp($16::bigint / 1000.0)) "
        "ON CONFLICT (request_id) DO NOTHING RETURNING id",
        16, p, &res);
    if (rc != 0)
        return rc;
    const char *id = PQntuples(res) == 1 ? bg_pg_value(res, 0, 0) : NULL;
    (void)bg_strlcpy(record_id, id != NULL ? id : "", 24);
    PQclear(res);
    return 0;
}

/* The Postgres half: record and debit in one transaction. *inserted tells whether this call
 * wrote the record. */
static int record(PGconn *c, usage_thread_t *t, const bg_usage_event_t *ev, bool charged,
                  bool *inserted)
{
    *inserted = false;
    int rc = bg_pg_begin(c);
    if (rc != 0)
        return rc;
    char record_id[24], consumed[BG_LEDGER_ID_LEN + 1] = "";
    rc = insert_record(c, ev, charged, record_id);
    if (rc == 0 && record_id[0] != '\0' && charged)
        rc = debit(c, t, ev, record_id, consumed);
    if (rc != 0) {
        bg_pg_rollback(c);
        return rc;
    }
    rc = bg_pg_commit(c);
    if (rc != 0)
        return rc;
    *inserted = record_id[0] != '\0';
    /* only now, committed, is the account sure to exist for the next transactions */
    if (consumed[0] != '\0')
        memcpy(t->consumed, consumed, sizeof(consumed));
    return 0;
}

int wk_usage_handle(wk_job_t *job, void *ud)
{
    const usage_role_t *u = ud;
    bg_usage_event_t ev;
    const char *why = NULL;
    if (bg_usage_event_parse(job->nfields, job->names, job->values, &ev, &why) != 0) {
        snprintf(job->error, sizeof(job->error), "malformed usage event: %s",
                 why != NULL ? why : "?");
        return BG_ERR_INVALID;
    }
    usage_thread_t *t = *job->thread_state;
    if (t == NULL) {
        t = bg_calloc(1, sizeof(*t));
        *job->thread_state = t;
    }
    PGconn *c = bg_pg_thread_conn(u->database_url);
    if (c == NULL) {
        snprintf(job->error, sizeof(job->error), "database unavailable");
        return BG_ERR_UNAVAILABLE;
    }
    bool charged = bg_usage_event_is_charged(&ev), inserted = false;
    int rc = record(c, t, &ev, charged, &inserted);
    if (rc == BG_ERR_INVALID) {
        /* 23xxx/22xxx: an unknown user (foreign key) or a value a constraint refuses; retrying
         * cannot help, the dead letters keep it for an operator */
        snprintf(job->error, sizeof(job->error), "usage record refused by the database");
        return BG_ERR_INVALID;
    }
    if (rc != 0) {
        snprintf(job->error, sizeof(job->error), "usage record not written: %s", bg_strerror(rc));
        return rc;
    }

    bg_admission_settle_result_t result = BG_ADMISSION_SETTLE_UNKNOWN;
    rc = bg_admission_settle(job->redis, u->shards, ev.user_id, ev.request_id,
                             charged ? BG_ADMISSION_USE : BG_ADMISSION_REFUND,
                             ev.prompt_tokens + ev.completion_tokens, &result, NULL);
    if (rc != 0) {
        snprintf(job->error, sizeof(job->error), "recorded, settle failed: %s", bg_strerror(rc));
        return rc == BG_ERR_INVALID ? BG_ERR_INVALID : BG_ERR_RETRY;
    }
    bg_debug("usage: %s %s (%s, %s), settle %s", ev.request_id,
             inserted ? "recorded" : "was recorded before", ev.status,
             charged ? "charged" : "refunded",
             result == BG_ADMISSION_SETTLED            ? "done"
             : result == BG_ADMISSION_SETTLE_DUPLICATE ? "duplicate"
                                                       : "unknown");
    return 0;
}
