/*
 * billing: the cost of taking Paddle's notifications and of posting to the ledger.
 *
 *   bench_billing webhook BASE_URL SECRET [REQUESTS [CONNECTIONS]]
 *   bench_billing ledger DATABASE_URL [POSTINGS [BATCH]]
 *
 * webhook: CONNECTIONS threads (default 8), each with one keep-alive HTTP/1.1 connection, POST
 * REQUESTS (default 20000) distinct signed transaction.completed notifications to
 * BASE_URL/webhooks/paddle (each verified, stored in webhook_inbox and queued by the edge) and
 * time each one. Prints
 *   webhook acks_per_s=<x> p50_ms=<y> p99_ms=<z>
 * (nearest-rank percentiles of the per-request time). Any answer other than 200 "accepted" fails.
 *
 * ledger: POSTINGS (default 20000) balanced payment transactions (two entries, USD, a user's
 * payments account against the system sales account) through bg_ledger_post(), as the billing
 * worker posts them: first one per database transaction ("single"), then BATCH (default 100) per
 * database transaction ("batched"); then the same rows (one ledger_transactions row and two
 * ledger_entries rows per posting, with the same columns) with a plain COPY into two tables made
 * LIKE the ledger's (logged, no constraints, no triggers), in the same run. Prints
 *   ledger single_per_s=<a> batched_per_s=<b> copy_per_s=<c> single_ratio_to_copy=<a/c>
 *     batched_ratio_to_copy=<b/c>
 * The tables it makes are dropped; the postings stay in the (scratch) database.
 */
#include <curl/curl.h>
#include <errno.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bg/buf.h"
#include "bg/err.h"
#include "bg/id.h"
#include "bg/ledger.h"
#include "bg/paddle.h"
#include "bg/pg.h"
#include "bg/timeutil.h"

#define MAX_THREADS 64

static int parse_long(const char *s, long max, long *out)
{
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v <= 0 || v > max)
        return BG_ERR_INVALID;
    *out = v;
    return 0;
}

static int64_t now_us(void)
{
    struct timespec t;
    (void)clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

/* ---- webhook ---- */

typedef struct st_client {
    const char *base, *secret;
    int index;
    long from, count;
    int64_t *lat_us; /* borrowed: this client's slice */
    long failures;
    char first_error[200];
} client_t;

static size_t sink(char *p, size_t size, size_t n, void *ud)
{
    bg_buf_t *b = ud;
    /* a reply past the cap is cut: only its start is looked at */
    if (bg_buf_append(b, p, size * n) != 0)
        return size * n;
    return size * n;
}

static void *client_run(void *arg)
{
    client_t *cl = arg;
    CURL *h = curl_easy_init();
    char url[512];
    snprintf(url, sizeof(url), "%s/webhooks/paddle", cl->base);
    bg_buf_t reply;
    bg_buf_init(&reply, 65536);
    char occurred[40];
    if (bg_timeutil_format_rfc3339(occurred, sizeof(occurred), bg_timeutil_wall_ms(), true) != 0)
        (void)bg_strlcpy(occurred, "2026-01-01T00:00:00.000Z", sizeof(occurred));
    for (long i = 0; i < cl->count && h != NULL; i++) {
        long n = cl->from + i;
        char *body = bg_asprintf(
            "{\"event_id\":\"evt_bench_%d_%ld_%ld\",\"event_type\":\"transaction.completed\","
            "\"occurred_at\":\"%s\",\"notification_id\":\"ntf_bench_%ld\",\"data\":{\"id\":"
            "\"txn_bench_%d_%ld\",\"status\":\"completed\",\"origin\":\"web\",\"subscription_id\":"
            "null,\"customer_id\":\"ctm_bench\",\"custom_data\":null,\"currency_code\":\"USD\","
            "\"items\":[{\"price\":{\"id\":\"pri_bench\"},\"quantity\":1}],\"details\":{\"totals\":"
            "{\"subtotal\":\"1999\",\"tax\":\"0\",\"total\":\"1999\",\"grand_total\":\"1999\","
            "\"currency_code\":\"USD\"}},\"payments\":[{\"amount\":\"1999\",\"status\":"
            "\"captured\"}],\"billed_at\":\"%s\"}}",
            (int)getpid(), n, (long)cl->index, occurred, n, (int)getpid(), n, occurred);
        char ts[24], h1[BG_PADDLE_SIG_HEX_SIZE], sig[200];
        snprintf(ts, sizeof(ts), "%lld", (long long)time(NULL));
        bg_paddle_sign(cl->secret, ts, body, strlen(body), h1);
        snprintf(sig, sizeof(sig), "Paddle-Signature: ts=%s;h1=%s", ts, h1);
        struct curl_slist *hd = curl_slist_append(NULL, sig);
        hd = curl_slist_append(hd, "Content-Type: application/json");
        bg_buf_reset(&reply);
        (void)curl_easy_setopt(h, CURLOPT_URL, url);
        (void)curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
        (void)curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
        (void)curl_easy_setopt(h, CURLOPT_HTTPHEADER, hd);
        (void)curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, sink);
        (void)curl_easy_setopt(h, CURLOPT_WRITEDATA, &reply);
        (void)curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
        int64_t t0 = now_us();
        CURLcode cc = curl_easy_perform(h);
        cl->lat_us[i] = now_us() - t0;
        long status = 0;
        if (cc == CURLE_OK)
            (void)curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
        bool ok = status == 200 && reply.len > 0 && memmem(reply.base, reply.len, "accepted", 8);
        if (!ok && cl->failures++ == 0)
            snprintf(cl->first_error, sizeof(cl->first_error), "HTTP %ld %s: %.*s", status,
                     curl_easy_strerror(cc), (int)(reply.len < 120 ? reply.len : 120),
                     reply.base != NULL ? reply.base : "");
        curl_slist_free_all(hd);
        free(body);
    }
    if (h == NULL)
        cl->failures = cl->count;
    bg_buf_dispose(&reply);
    curl_easy_cleanup(h);
    return NULL;
}

static int webhook(int argc, char **argv)
{
    long requests = 20000, conns = 8;
    if (argc < 4 || (argc > 4 && parse_long(argv[4], 100000000, &requests) != 0) ||
        (argc > 5 && parse_long(argv[5], MAX_THREADS, &conns) != 0))
        return 2;
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0)
        return 1;
    int64_t *lat = calloc((size_t)requests, sizeof(*lat));
    client_t cl[MAX_THREADS];
    pthread_t th[MAX_THREADS];
    long per = requests / conns, extra = requests % conns, from = 0;
    int64_t t0 = now_us();
    for (long i = 0; i < conns; i++) {
        long n = per + (i < extra ? 1 : 0);
        cl[i] = (client_t){.base = argv[2],
                           .secret = argv[3],
                           .index = (int)i,
                           .from = from,
                           .count = n,
                           .lat_us = lat + from};
        from += n;
        if (pthread_create(&th[i], NULL, client_run, &cl[i]) != 0)
            return 1;
    }
    long failures = 0;
    for (long i = 0; i < conns; i++) {
        (void)pthread_join(th[i], NULL);
        if (cl[i].failures > 0 && failures == 0)
            fprintf(stderr, "bench_billing: %s\n", cl[i].first_error);
        failures += cl[i].failures;
    }
    double secs = (double)(now_us() - t0) / 1e6;
    qsort(lat, (size_t)requests, sizeof(*lat), cmp_i64);
    long p50 = (requests * 50 + 99) / 100 - 1, p99 = (requests * 99 + 99) / 100 - 1;
    if (failures == 0)
        printf("webhook acks_per_s=%.0f p50_ms=%.3f p99_ms=%.3f\n", (double)requests / secs,
               (double)lat[p50] / 1000.0, (double)lat[p99] / 1000.0);
    else
        fprintf(stderr, "bench_billing: %ld of %ld notifications not accepted\n", failures,
                requests);
    free(lat);
    curl_global_cleanup();
    return failures == 0 ? 0 : 1;
}

/* ---- ledger ---- */

static int run_sql(PGconn *c, const char *sql)
{
    return bg_pg_run(c, sql, 0, NULL);
}

/* Posts postings [from, from + n) in database transactions of batch postings each. */
static int post_range(PGconn *c, const char *tag, long from, long n, long batch, const char *user,
                      const char *acc_user, const char *acc_sys)
{
    const bg_ledger_entry_t entries[] = {{acc_user, "USD", 1999}, {acc_sys, "USD", -1999}};
    int rc = 0;
    for (long i = 0; i < n && rc == 0; i += batch) {
        rc = bg_pg_begin(c);
        for (long j = i; j < i + batch && j < n && rc == 0; j++) {
            char key[96];
            snprintf(key, sizeof(key), "bench:%s:%d:%ld", tag, (int)getpid(), from + j);
            const bg_ledger_tx_t tx = {.idempotency_key = key,
                                       .kind = "payment.paddle",
                                       .description = "Payment through Paddle",
                                       .user_id = user,
                                       .metadata_json = "{\"paddle_transaction_id\":\"txn_b\"}",
                                       .nentries = 2,
                                       .entries = entries};
            bool posted = false;
            rc = bg_ledger_post(c, &tx, &posted, NULL);
            if (rc == 0 && !posted)
                rc = BG_ERR_CONFLICT;
        }
        if (rc == 0)
            rc = bg_pg_commit(c);
        else
            bg_pg_rollback(c);
    }
    return rc;
}

/* COPYs the rows of n postings into the LIKE tables; returns 0 or an error. */
static int copy_rows(PGconn *c, long n, const char *user, const char *acc_user, const char *acc_sys)
{
    static const char *const sql[] = {
        "COPY bench_copy_tx (id, idempotency_key, kind, description, user_id, metadata, "
        "effective_at) FROM STDIN",
        "COPY bench_copy_entries (transaction_id, account_id, unit, amount) FROM STDIN"};
    char(*ids)[BG_UUID_STR_LEN + 1] = calloc((size_t)n, sizeof(*ids));
    for (long i = 0; i < n; i++)
        bg_id_uuid_v7_str(ids[i]);
    int rc = 0;
    for (int t = 0; t < 2 && rc == 0; t++) {
        PGresult *res = PQexec(c, sql[t]);
        bool ok = PQresultStatus(res) == PGRES_COPY_IN;
        PQclear(res);
        if (!ok) {
            rc = BG_ERR_IO;
            break;
        }
        char line[512];
        for (long i = 0; i < n && rc == 0; i++) {
            int len;
            if (t == 0) {
                len = snprintf(line, sizeof(line),
                               "%s\tbench:copy:%d:%ld\tpayment.paddle\tPayment through Paddle\t%s\t"
                               "{\"paddle_transaction_id\": \"txn_b\"}\t2026-01-01 00:00:00+00\n",
                               ids[i], (int)getpid(), i, user);
            } else {
                len = snprintf(line, sizeof(line), "%s\t%s\tUSD\t1999\n%s\t%s\tUSD\t-1999\n",
                               ids[i], acc_user, ids[i], acc_sys);
            }
            if (PQputCopyData(c, line, len) != 1)
                rc = BG_ERR_IO;
        }
        if (PQputCopyEnd(c, rc == 0 ? NULL : "aborted") != 1)
            rc = BG_ERR_IO;
        res = PQgetResult(c);
        if (PQresultStatus(res) != PGRES_COMMAND_OK) {
            fprintf(stderr, "bench_billing: COPY: %s", PQerrorMessage(c));
            rc = BG_ERR_IO;
        }
        PQclear(res);
        while ((res = PQgetResult(c)) != NULL)
            PQclear(res);
    }
    free(ids);
    return rc;
}

static int ledger(int argc, char **argv)
{
    long n = 20000, batch = 100;
    if (argc < 3 || (argc > 3 && parse_long(argv[3], 10000000, &n) != 0) ||
        (argc > 4 && parse_long(argv[4], 100000, &batch) != 0))
        return 2;
    PGconn *c = NULL;
    char err[512];
    if (bg_pg_connect(argv[2], 3, &c, err, sizeof(err)) != 0) {
        fprintf(stderr, "bench_billing: %s\n", err);
        return 1;
    }
    char email[64], user[BG_UUID_STR_LEN + 1];
    snprintf(email, sizeof(email), "bench-%d@billing.example", (int)getpid());
    const char *ep[] = {email};
    PGresult *res;
    char acc_user[BG_LEDGER_ID_LEN + 1], acc_sys[BG_LEDGER_ID_LEN + 1];
    int rc = bg_pg_exec(c, "INSERT INTO users (email) VALUES ($1) RETURNING id", 1, ep, &res);
    if (rc == 0) {
        (void)bg_strlcpy(user, PQgetvalue(res, 0, 0), sizeof(user));
        PQclear(res);
        rc = bg_ledger_account(c, "user", user, "payments", "USD", acc_user);
    }
    if (rc == 0)
        rc = bg_ledger_account(c, "system", NULL, "sales", "USD", acc_sys);
    if (rc == 0)
        rc = run_sql(c, "DROP TABLE IF EXISTS bench_copy_tx, bench_copy_entries");
    if (rc == 0)
        rc = run_sql(c, "CREATE TABLE bench_copy_tx (LIKE ledger_transactions INCLUDING DEFAULTS)");
    if (rc == 0)
        rc = run_sql(c, "CREATE TABLE bench_copy_entries (LIKE ledger_entries INCLUDING DEFAULTS "
                        "INCLUDING IDENTITY)");
    /* a short warm-up so that plans and caches are there for all three */
    if (rc == 0)
        rc = post_range(c, "warm", 0, 200, 10, user, acc_user, acc_sys);
    int64_t t0 = now_us();
    if (rc == 0)
        rc = post_range(c, "single", 0, n, 1, user, acc_user, acc_sys);
    int64_t t1 = now_us();
    if (rc == 0)
        rc = post_range(c, "batched", 0, n, batch, user, acc_user, acc_sys);
    int64_t t2 = now_us();
    if (rc == 0)
        rc = copy_rows(c, n, user, acc_user, acc_sys);
    int64_t t3 = now_us();
    if (rc == 0) {
        double single = (double)n * 1e6 / (double)(t1 - t0);
        double batched = (double)n * 1e6 / (double)(t2 - t1);
        double copy = (double)n * 1e6 / (double)(t3 - t2);
        printf("ledger single_per_s=%.0f batched_per_s=%.0f copy_per_s=%.0f "
               "single_ratio_to_copy=%.3f batched_ratio_to_copy=%.3f\n",
               single, batched, copy, single / copy, batched / copy);
    } else {
        fprintf(stderr, "bench_billing: ledger: %s\n", bg_strerror(rc));
    }
    (void)run_sql(c, "DROP TABLE IF EXISTS bench_copy_tx, bench_copy_entries");
    PQfinish(c);
    return rc == 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
    int rc = 2;
    if (argc >= 2 && strcmp(argv[1], "webhook") == 0)
        rc = webhook(argc, argv);
    else if (argc >= 2 && strcmp(argv[1], "ledger") == 0)
        rc = ledger(argc, argv);
    if (rc == 2)
        fprintf(stderr, "usage: bench_billing webhook BASE_URL SECRET [REQUESTS [CONNECTIONS]]\n"
                        "       bench_billing ledger DATABASE_URL [POSTINGS [BATCH]]\n");
    return rc;
}
