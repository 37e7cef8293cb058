/*
 * bgctl billing reconcile: repairs what Paddle's webhooks missed.
 *
 *   bgctl billing reconcile [--since RFC3339]
 *
 * It lists the subscriptions, the transactions (completed, paid, past_due) and the adjustments
 * (refunds, chargebacks, credits) Paddle holds (GET /subscriptions,
 * GET /transactions?status=…&updated_at[GTE]=…, GET /adjustments; all paginated as Paddle does:
 * meta.pagination.next is the URL of the next page while has_more), and feeds every entity
 * through the path a webhook takes: a synthetic event stored in webhook_inbox, then
 * bg_billing_apply() and the user's admission state written to Redis. The synthetic event is the
 * entity's snapshot as of its updated_at:
 *   event_id    "reconcile:<entity id>:<updated_at>"  (a second run stores nothing new)
 *   event_type  subscription.updated, transaction.completed / .paid / .payment_failed, or
 *               adjustment.updated
 *   occurred_at the entity's updated_at
 * so the apply rules decide as for any delivery: an older snapshot than one applied is stale and
 * changes nothing, money posts once per transaction (its ledger keys name the transaction), and a
 * real webhook arriving later is a newer snapshot of the same state or a duplicate effect. An
 * adjustment's refund posts once too (its ledger key names the adjustment), and a pending one is
 * recorded as pending until a later snapshot says approved.
 *
 * --since narrows the lists to entities updated at or after that time (transactions through
 * Paddle's filter; subscriptions and adjustments here: GET /adjustments has no time filter and
 * orders by id only, so every page is read). Prints one line per event that changed something
 * ("repaired"), then a summary with how many entities each list held; exit status 0, or 1 when
 * Paddle or a store failed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/billing.h"
#include "bg/err.h"
#include "bg/json.h"
#include "bg/paddle.h"
#include "bg/pg.h"
#include "bg/policy.h"
#include "bg/redis.h"
#include "bg/timeutil.h"
#include "ctl.h"

#define PAGE_MAX (4 * 1024 * 1024)
#define PAGES_MAX 10000

typedef struct st_totals {
    long stored, repaired, unchanged, failed;
    long listed[3]; /* entities on the pages of each list (LIST_* below) */
} totals_t;

enum { LIST_SUBSCRIPTIONS, LIST_TRANSACTIONS, LIST_ADJUSTMENTS };

static int usage(void)
{
    fprintf(stderr, "usage: bgctl billing reconcile [--since RFC3339]\n");
    return 2;
}

/*
 * Stores the page's entities of kind ("subscriptions", "transactions" or "adjustments") updated at
 * or after since (NULL: all) as synthetic events, and returns the new event ids (a result the
 * caller clears).
 */
static int store_page(PGconn *c, const bg_buf_t *page, const char *kind, const char *since,
                      PGresult **res)
{
    char *text = bg_strndup(page->base, page->len);
    const char *p[] = {text, kind, since};
    int rc = bg_pg_exec(
        c,
        "WITH l AS (SELECT d, CASE WHEN $2 = 'subscriptions' THEN 'subscription.updated' "
        "  WHEN $2 = 'adjustments' THEN 'adjustment.updated' "
        "  ELSE CASE d ->> 'status' WHEN 'completed' THEN 'transaction.completed' "
        "  WHEN 'paid' THEN 'transaction.paid' WHEN 'past_due' THEN "
        "  'transaction.payment_failed' END END AS t "
        "  FROM jsonb_array_elements(CASE WHEN jsonb_typeof($1::jsonb -> 'data') = 'array' "
        "  THEN $1::jsonb -> 'data' ELSE '[]' END) d "
        "  WHERE jsonb_typeof(d) = 'object' AND d ->> 'id' IS NOT NULL "
        "  AND d ->> 'updated_at' IS NOT NULL "
        "  AND ($3::timestamptz IS NULL OR (d ->> 'updated_at')::timestamptz >= $3::timestamptz)), "
        "e AS (SELECT 'reconcile:' || (d ->> 'id') || ':' || (d ->> 'updated_at') AS id, t, "
        "  d ->> 'updated_at' AS at, d FROM l WHERE t IS NOT NULL) "
        "INSERT INTO webhook_inbox (provider, event_id, event_type, occurred_at, payload) "
        "SELECT 'paddle', e.id, e.t, e.at::timestamptz, jsonb_build_object('event_id', e.id, "
        "'event_type', e.t, 'occurred_at', e.at, 'notification_id', null, 'data', e.d) FROM e "
        "ON CONFLICT (provider, event_id) DO NOTHING RETURNING event_id",
        3, p, res);
    free(text);
    return rc;
}

/* Applies one stored synthetic event and writes its user's admission state; prints a repair. */
static void apply_one(PGconn *c, bg_redis_t *r, const bg_config_t *cfg, const char *event_id,
                      totals_t *t)
{
    bg_billing_result_t res;
    int rc = bg_billing_apply(c, event_id, &res);
    if (rc != 0) {
        t->failed++;
        fprintf(stderr, "bgctl billing: %s: %s (%s)\n", event_id, bg_strerror(rc),
                res.error[0] != '\0' ? res.error : "not applied");
        if (bg_billing_note_failure(c, event_id, res.error) != 0)
            fprintf(stderr, "bgctl billing: cannot note the failure of %s\n", event_id);
        return;
    }
    if (strcmp(res.outcome, "applied") != 0) {
        t->unchanged++;
        return;
    }
    t->repaired++;
    printf("repaired %s %s (user %s)\n", res.event_type, event_id + strlen("reconcile:"),
           res.user_id[0] != '\0' ? res.user_id : "-");
    if (res.user_id[0] == '\0' || r == NULL)
        return;
    bg_admission_state_t st;
    rc = bg_policy_compile_user(c, res.user_id, bg_timeutil_wall_ms(), &st);
    if (rc == 0)
        rc = bg_policy_state_write(r, cfg->shards, &st);
    if (rc != 0 && rc != BG_ERR_NOT_FOUND)
        fprintf(stderr,
                "bgctl billing: user %s: admission state not written (%s); run bgctl quota "
                "rebuild --user %s\n",
                res.user_id, bg_strerror(rc), res.user_id);
}

/* Returns the path and query of an absolute URL ("https://host/x?y" → "/x?y"), NULL if none. */
static const char *path_of(const char *url)
{
    const char *p = strstr(url, "://");
    return p != NULL ? strchr(p + 3, '/') : NULL;
}

/*
 * Reads meta.pagination: the next page's path into next ("" when this was the last page), and adds
 * the number of entities in data to *listed.
 */
static int next_page(const bg_buf_t *page, char *next, size_t nextlen, long *listed)
{
    next[0] = '\0';
    bg_json_doc_t *doc = NULL;
    const char *desc;
    if (bg_json_parse(page->base, page->len, NULL, &doc, &desc, NULL) != 0)
        return BG_ERR_PROTOCOL;
    const bg_json_t *data = bg_json_find(bg_json_root(doc), "data");
    if (data != NULL && bg_json_is_array(data))
        *listed += (long)bg_json_len(data);
    const bg_json_t *pg = bg_json_find(bg_json_root(doc), "meta");
    pg = pg != NULL ? bg_json_find(pg, "pagination") : NULL;
    const bg_json_t *more = pg != NULL ? bg_json_find(pg, "has_more") : NULL;
    const bg_json_t *url = pg != NULL ? bg_json_find(pg, "next") : NULL;
    bool has_more = false;
    size_t len = 0;
    const char *s = url != NULL ? bg_json_str(url, &len) : NULL;
    int rc = 0;
    if (more != NULL && bg_json_bool(more, &has_more) && has_more) {
        char *u = s != NULL ? bg_strndup(s, len) : NULL;
        const char *path = u != NULL ? path_of(u) : NULL;
        if (path == NULL || !bg_strlcpy(next, path, nextlen))
            rc = BG_ERR_PROTOCOL;
        free(u);
    }
    bg_json_doc_free(doc);
    return rc;
}

/* Walks every page of one list and repairs what it finds. Returns 0 or the first error. */
static int reconcile_list(PGconn *c, bg_redis_t *r, const bg_config_t *cfg, int list,
                          const char *first, const char *since, totals_t *t)
{
    static const char *const kinds[] = {"subscriptions", "transactions", "adjustments"};
    const char *kind = kinds[list];
    bg_paddle_api_t api = {.base_url = cfg->paddle_api_url, .api_key = cfg->paddle_api_key};
    char path[2048];
    (void)bg_strlcpy(path, first, sizeof(path));
    bg_buf_t page;
    bg_buf_init(&page, PAGE_MAX);
    int rc = 0;
    for (int n = 0; n < PAGES_MAX && path[0] != '\0'; n++) {
        bg_buf_reset(&page);
        bg_paddle_reply_t reply;
        rc = bg_paddle_list(&api, path, &page, &reply);
        if (rc != 0) {
            fprintf(stderr, "bgctl billing: GET %s: %s (HTTP %ld %s)\n", path, bg_strerror(rc),
                    reply.status, reply.error_code);
            break;
        }
        PGresult *res;
        rc = store_page(c, &page, kind, since, &res);
        if (rc != 0) {
            fprintf(stderr, "bgctl billing: storing a page of %s: %s\n", kind, bg_strerror(rc));
            break;
        }
        t->stored += PQntuples(res);
        for (int i = 0; i < PQntuples(res); i++)
            apply_one(c, r, cfg, PQgetvalue(res, i, 0), t);
        PQclear(res);
        char next[2048];
        rc = next_page(&page, next, sizeof(next), &t->listed[list]);
        if (rc != 0) {
            fprintf(stderr, "bgctl billing: %s: a page without a usable meta.pagination\n", kind);
            break;
        }
        if (strcmp(next, path) == 0)
            break; /* a page that names itself as the next one would loop */
        (void)bg_strlcpy(path, next, sizeof(path));
    }
    bg_buf_dispose(&page);
    return rc;
}

static int reconcile(int argc, char **argv, const bg_config_t *cfg)
{
    const char *since = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--since") == 0 && i + 1 < argc)
            since = argv[++i];
        else
            return usage();
    }
    int64_t since_ms = 0;
    if (since != NULL && bg_timeutil_parse_rfc3339(since, strlen(since), &since_ms) != 0) {
        fprintf(stderr, "bgctl billing: --since wants an RFC 3339 time, such as "
                        "2026-01-31T00:00:00Z\n");
        return 2;
    }
    bg_paddle_api_t api = {.base_url = cfg->paddle_api_url, .api_key = cfg->paddle_api_key};
    if (!bg_paddle_api_configured(&api)) {
        fprintf(stderr, "bgctl billing: BG_PADDLE_API_KEY is not set\n");
        return 1;
    }
    char err[512];
    PGconn *c = NULL;
    if (bg_pg_connect(cfg->database_url, 3, &c, err, sizeof(err)) != 0) {
        fprintf(stderr, "bgctl billing: cannot connect to Postgres: %s\n", err);
        return 1;
    }
    /* Redis is only told afterwards; without it the rows are still repaired */
    bg_redis_t *r = NULL;
    int rc = bg_redis_new(cfg->redis_url, cfg->redis_timeout_ms, &r);
    if (rc == 0)
        rc = bg_redis_connect(r);
    if (rc != 0) {
        fprintf(stderr, "bgctl billing: Redis unavailable (%s): admission states not written\n",
                bg_strerror(rc));
        bg_redis_free(r);
        r = NULL;
    }
    char since_q[128] = "";
    if (since != NULL) {
        char iso[BG_RFC3339_BUFSIZE];
        if (bg_timeutil_format_rfc3339(iso, sizeof(iso), since_ms, false) == 0)
            snprintf(since_q, sizeof(since_q), "&updated_at%%5BGTE%%5D=%s", iso);
    }
    char txn_path[256];
    snprintf(txn_path, sizeof(txn_path),
             "/transactions?status=completed,paid,past_due&order_by=updated_at%%5BASC%%5D"
             "&per_page=100%s",
             since_q);
    totals_t t = {0};
    rc = reconcile_list(c, r, cfg, LIST_SUBSCRIPTIONS, "/subscriptions?per_page=100", since, &t);
    if (rc == 0)
        rc = reconcile_list(c, r, cfg, LIST_TRANSACTIONS, txn_path, since, &t);
    /* after the transactions, whose invoices refunds update; 50 is Paddle's maximum page here */
    if (rc == 0)
        rc = reconcile_list(c, r, cfg, LIST_ADJUSTMENTS,
                            "/adjustments?order_by=id%5BASC%5D&per_page=50", since, &t);
    printf("reconcile: %ld new snapshots, %ld repaired, %ld already known, %ld failed; listed %ld "
           "subscriptions, %ld transactions, %ld adjustments\n",
           t.stored, t.repaired, t.unchanged, t.failed, t.listed[LIST_SUBSCRIPTIONS],
           t.listed[LIST_TRANSACTIONS], t.listed[LIST_ADJUSTMENTS]);
    bg_redis_free(r);
    PQfinish(c);
    return rc == 0 && t.failed == 0 ? 0 : 1;
}

int ctl_billing_main(int argc, char **argv, const bg_config_t *cfg)
{
    if (argc >= 2 && strcmp(argv[1], "reconcile") == 0)
        return reconcile(argc - 1, argv + 1, cfg);
    return usage();
}
