/*
 * Paddle webhook signatures and the Paddle API client (see bg/paddle.h).
 *
 * The header is parsed without copying: pairs separated by ';', each "key=value"; ts is kept as
 * text, because the signed string holds the ts exactly as Paddle wrote it. At most
 * BG_PADDLE_SIG_MAX h1 values and secrets take part, so a hostile header costs bounded HMACs. Each
 * candidate is compared with bg_crypto_equal over the 64 hex digits (an h1 of another length can
 * never match and is skipped without looking at its bytes).
 *
 * The client is libcurl's easy interface, one handle per call: calls are rare (a checkout, a
 * cancellation), run on a pool thread, and must not share state across threads. Retries follow
 * Paddle's guidance: 429 honours Retry-After (capped), 5xx and transport failures back off
 * exponentially with full jitter; anything else is the final answer.
 */
#include "bg/paddle.h"

#include <curl/curl.h>
#include <pthread.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bg/buf.h"
#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/json.h"
#include "bg/log.h"

#define REPLY_MAX (1024 * 1024)
#define RETRY_AFTER_CAP_MS 30000
#define BACKOFF_CAP_MS 10000

void bg_paddle_sign(const char *secret, const char *ts, const char *body, size_t body_len,
                    char out[BG_PADDLE_SIG_HEX_SIZE])
{
    crypto_auth_hmacsha256_state st;
    unsigned char mac[crypto_auth_hmacsha256_BYTES];
    (void)crypto_auth_hmacsha256_init(&st, (const unsigned char *)secret, strlen(secret));
    (void)crypto_auth_hmacsha256_update(&st, (const unsigned char *)ts, strlen(ts));
    (void)crypto_auth_hmacsha256_update(&st, (const unsigned char *)":", 1);
    (void)crypto_auth_hmacsha256_update(&st, (const unsigned char *)body, body_len);
    (void)crypto_auth_hmacsha256_final(&st, mac);
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < sizeof(mac); i++) {
        out[2 * i] = hex[mac[i] >> 4];
        out[2 * i + 1] = hex[mac[i] & 15];
    }
    out[2 * sizeof(mac)] = '\0';
    bg_crypto_wipe(&st, sizeof(st));
}

/* One "key=value" of the header. */
typedef struct st_span {
    const char *p;
    size_t n;
} span_t;

static span_t trim(const char *p, size_t n)
{
    while (n > 0 && (*p == ' ' || *p == '\t')) {
        p++;
        n--;
    }
    while (n > 0 && (p[n - 1] == ' ' || p[n - 1] == '\t'))
        n--;
    return (span_t){p, n};
}

int bg_paddle_verify(const char *header, size_t header_len, const char *body, size_t body_len,
                     const char *secrets, int64_t now_s, int64_t tolerance_s)
{
    if (header == NULL)
        return BG_ERR_INVALID;
    span_t ts = {NULL, 0}, h1[BG_PADDLE_SIG_MAX];
    size_t nh1 = 0;
    size_t i = 0;
    while (i <= header_len) {
        size_t j = i;
        while (j < header_len && header[j] != ';')
            j++;
        span_t part = trim(header + i, j - i);
        const char *eq = part.n > 0 ? memchr(part.p, '=', part.n) : NULL;
        if (eq != NULL) {
            span_t key = trim(part.p, (size_t)(eq - part.p));
            span_t val = trim(eq + 1, part.n - (size_t)(eq - part.p) - 1);
            if (key.n == 2 && memcmp(key.p, "ts", 2) == 0)
                ts = val;
            else if (key.n == 2 && memcmp(key.p, "h1", 2) == 0 && nh1 < BG_PADDLE_SIG_MAX)
                h1[nh1++] = val;
        }
        i = j + 1;
    }
    if (ts.n == 0 || ts.n > 19 || nh1 == 0)
        return BG_ERR_INVALID;
    char tsbuf[24];
    int64_t tsv = 0;
    for (size_t k = 0; k < ts.n; k++) {
        if (ts.p[k] < '0' || ts.p[k] > '9')
            return BG_ERR_INVALID;
        tsv = tsv * 10 + (ts.p[k] - '0');
        tsbuf[k] = ts.p[k];
    }
    tsbuf[ts.n] = '\0';
    int64_t skew = now_s > tsv ? now_s - tsv : tsv - now_s;
    if (skew > tolerance_s)
        return BG_ERR_TIMEOUT;

    bool ok = false;
    int nsecrets = 0;
    const char *s = secrets != NULL ? secrets : "";
    while (*s != '\0' && nsecrets < BG_PADDLE_SIG_MAX) {
        const char *comma = strchr(s, ',');
        size_t len = comma != NULL ? (size_t)(comma - s) : strlen(s);
        span_t sec = trim(s, len);
        s += len + (comma != NULL ? 1 : 0);
        if (sec.n == 0 || sec.n > 512)
            continue;
        char key[513];
        memcpy(key, sec.p, sec.n);
        key[sec.n] = '\0';
        nsecrets++;
        char want[BG_PADDLE_SIG_HEX_SIZE];
        bg_paddle_sign(key, tsbuf, body, body_len, want);
        bg_crypto_wipe(key, sizeof(key));
        for (size_t k = 0; k < nh1; k++) {
            /* no early exit: every pair costs the same whether or not one matched before */
            if (h1[k].n == BG_PADDLE_SIG_HEX_SIZE - 1 && bg_crypto_equal(h1[k].p, want, h1[k].n))
                ok = true;
        }
    }
    return ok ? 0 : BG_ERR_DENIED;
}

/* ---- the API client ---- */

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static bool curl_ready;

static void curl_setup(void)
{
    curl_ready = curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK;
}

bool bg_paddle_api_configured(const bg_paddle_api_t *api)
{
    return api != NULL && bg_str_present(api->api_key) && bg_str_present(api->base_url);
}

static size_t on_body(char *p, size_t size, size_t n, void *ud)
{
    bg_buf_t *b = ud;
    return bg_buf_append(b, p, size * n) == 0 ? size * n : 0;
}

typedef struct st_attempt {
    long status;
    int64_t retry_after_ms; /* from Retry-After, -1 when absent */
} attempt_t;

static size_t on_header(char *p, size_t size, size_t n, void *ud)
{
    attempt_t *a = ud;
    size_t len = size * n;
    static const char name[] = "retry-after:";
    if (len > sizeof(name) - 1 && strncasecmp(p, name, sizeof(name) - 1) == 0) {
        char v[32];
        size_t vl = len - (sizeof(name) - 1);
        if (vl >= sizeof(v))
            vl = sizeof(v) - 1;
        memcpy(v, p + sizeof(name) - 1, vl);
        v[vl] = '\0';
        char *end;
        long secs = strtol(v, &end, 10);
        if (end != v && secs >= 0)
            a->retry_after_ms = (int64_t)secs * 1000;
    }
    return len;
}

static void sleep_ms(int64_t ms)
{
    struct timespec t = {.tv_sec = (time_t)(ms / 1000), .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&t, &t) != 0) {
    }
}

/* Copies the string at path (keys, NULL-terminated) of v into out; "" when absent. */
static void copy_path(const bg_json_t *v, const char *const path[], char *out, size_t outlen)
{
    for (size_t i = 0; path[i] != NULL && v != NULL; i++)
        v = bg_json_is_object(v) ? bg_json_find(v, path[i]) : NULL;
    size_t len = 0;
    const char *s = v != NULL ? bg_json_str(v, &len) : NULL;
    if (s == NULL || len >= outlen)
        len = 0;
    if (s != NULL)
        memcpy(out, s, len);
    out[len] = '\0';
}

static void take_reply(const bg_buf_t *b, bg_paddle_reply_t *out)
{
    bg_json_doc_t *doc = NULL;
    const char *desc;
    if (b->len == 0 || bg_json_parse(b->base, b->len, NULL, &doc, &desc, NULL) != 0)
        return;
    const bg_json_t *root = bg_json_root(doc);
    copy_path(root, (const char *const[]){"error", "code", NULL}, out->error_code,
              sizeof(out->error_code));
    copy_path(root, (const char *const[]){"data", "id", NULL}, out->id, sizeof(out->id));
    copy_path(root, (const char *const[]){"data", "checkout", "url", NULL}, out->checkout_url,
              sizeof(out->checkout_url));
    copy_path(root, (const char *const[]){"data", "status", NULL}, out->state, sizeof(out->state));
    copy_path(root, (const char *const[]){"data", "custom_data", "user_id", NULL}, out->user_id,
              sizeof(out->user_id));
    copy_path(root, (const char *const[]){"data", "customer_id", NULL}, out->customer_id,
              sizeof(out->customer_id));
    copy_path(root, (const char *const[]){"data", "subscription_id", NULL}, out->subscription_id,
              sizeof(out->subscription_id));
    bg_json_doc_free(doc);
}

/*
 * One call with retries. body may be NULL (no body). keep: when not NULL, a successful answer is
 * appended to it and needs no data.id (a list).
 */
static int call_keep(const bg_paddle_api_t *api, const char *method, const char *path,
                     const char *body, bg_paddle_reply_t *out, bg_buf_t *keep)
{
    memset(out, 0, sizeof(*out));
    if (!bg_paddle_api_configured(api))
        return BG_ERR_CONFIG;
    (void)pthread_once(&curl_once, curl_setup);
    if (!curl_ready)
        return BG_ERR_IO;
    int max = api->max_attempts > 0 ? api->max_attempts : 4;
    int64_t base = api->backoff_base_ms > 0 ? api->backoff_base_ms : 200;
    long timeout = (long)(api->timeout_ms > 0 ? api->timeout_ms : 10000);
    size_t blen = strlen(api->base_url);
    while (blen > 0 && api->base_url[blen - 1] == '/')
        blen--;
    char *url = bg_asprintf("%.*s%s", (int)blen, api->base_url, path);
    char *authz = bg_asprintf("Authorization: Bearer %s", api->api_key);
    struct curl_slist *headers = NULL;
    headers = curl_slist_append(headers, authz);
    headers = curl_slist_append(headers, "Content-Type: application/json");
    headers = curl_slist_append(headers, "Accept: application/json");
    int rc = BG_ERR_UNAVAILABLE;
    bg_buf_t reply;
    bg_buf_init(&reply, REPLY_MAX);
    for (int attempt = 1; attempt <= max; attempt++) {
        CURL *h = curl_easy_init();
        if (h == NULL || headers == NULL) {
            curl_easy_cleanup(h);
            rc = BG_ERR_IO;
            break;
        }
        bg_buf_reset(&reply);
        attempt_t a = {0, -1};
        (void)curl_easy_setopt(h, CURLOPT_URL, url);
        (void)curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
        (void)curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers);
        if (body != NULL) {
            (void)curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
            (void)curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
        }
        (void)curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
        (void)curl_easy_setopt(h, CURLOPT_WRITEDATA, &reply);
        (void)curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
        (void)curl_easy_setopt(h, CURLOPT_HEADERDATA, &a);
        (void)curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, timeout);
        (void)curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, timeout < 5000 ? timeout : 5000L);
        (void)curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
        (void)curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
        CURLcode cc = curl_easy_perform(h);
        if (cc == CURLE_OK)
            (void)curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &a.status);
        curl_easy_cleanup(h);
        out->attempts = attempt;
        out->status = cc == CURLE_OK ? a.status : 0;
        bool retry;
        if (cc != CURLE_OK) {
            bg_warn("paddle: %s %s: %s (attempt %d of %d)", method, path, curl_easy_strerror(cc),
                    attempt, max);
            retry = true;
        } else if (a.status >= 200 && a.status < 300) {
            if (keep != NULL) {
                rc = bg_buf_append(keep, reply.base, reply.len) == 0 ? 0 : BG_ERR_TOO_LARGE;
                break;
            }
            take_reply(&reply, out);
            rc = out->id[0] != '\0' ? 0 : BG_ERR_PROTOCOL;
            break;
        } else if (a.status == 429 || a.status >= 500) {
            bg_warn("paddle: %s %s: HTTP %ld (attempt %d of %d)", method, path, a.status, attempt,
                    max);
            retry = true;
        } else {
            take_reply(&reply, out);
            bg_warn("paddle: %s %s refused: HTTP %ld %s", method, path, a.status, out->error_code);
            rc = BG_ERR_INVALID;
            break;
        }
        if (!retry || attempt == max)
            break;
        int64_t cap = base << (attempt - 1 < 10 ? attempt - 1 : 10);
        if (cap > BACKOFF_CAP_MS)
            cap = BACKOFF_CAP_MS;
        int64_t wait = (int64_t)bg_crypto_random_uniform((uint32_t)cap + 1);
        if (a.status == 429 && a.retry_after_ms >= 0)
            wait = a.retry_after_ms < RETRY_AFTER_CAP_MS ? a.retry_after_ms : RETRY_AFTER_CAP_MS;
        sleep_ms(wait);
    }
    bg_buf_dispose(&reply);
    curl_slist_free_all(headers);
    bg_crypto_wipe(authz, strlen(authz));
    free(authz);
    free(url);
    return rc;
}

static int call(const bg_paddle_api_t *api, const char *method, const char *path, const char *body,
                bg_paddle_reply_t *out)
{
    return call_keep(api, method, path, body, out, NULL);
}

/* Returns true for an id Paddle could have made ([A-Za-z0-9_-]{1,100}): safe in a path. */
static bool id_is_safe(const char *s)
{
    size_t n = s != NULL ? strlen(s) : 0;
    if (n == 0 || n > 100)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-'))
            return false;
    }
    return true;
}

int bg_paddle_create_transaction(const bg_paddle_api_t *api, const char *price_id,
                                 const char *user_id, const char *customer_id,
                                 bg_paddle_reply_t *out)
{
    memset(out, 0, sizeof(*out));
    if (!id_is_safe(price_id) || user_id == NULL ||
        (customer_id != NULL && !id_is_safe(customer_id)))
        return BG_ERR_INVALID;
    bg_buf_t b;
    bg_buf_init(&b, 4096);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &b);
    bg_json_write_begin_object(&w);
    bg_json_write_key(&w, "items");
    bg_json_write_begin_array(&w);
    bg_json_write_begin_object(&w);
    bg_json_write_field_str(&w, "price_id", price_id);
    bg_json_write_field_int(&w, "quantity", 1);
    bg_json_write_end_object(&w);
    bg_json_write_end_array(&w);
    bg_json_write_key(&w, "custom_data");
    bg_json_write_begin_object(&w);
    bg_json_write_field_str(&w, "user_id", user_id);
    bg_json_write_end_object(&w);
    if (customer_id != NULL)
        bg_json_write_field_str(&w, "customer_id", customer_id);
    bg_json_write_field_str(&w, "collection_mode", "automatic");
    bg_json_write_end_object(&w);
    int rc = bg_json_write_finish(&w);
    if (rc == 0)
        rc = bg_buf_putc(&b, '\0');
    if (rc == 0)
        rc = call(api, "POST", "/transactions", b.base, out);
    bg_buf_dispose(&b);
    return rc;
}

int bg_paddle_cancel_subscription(const bg_paddle_api_t *api, const char *subscription_id,
                                  bg_paddle_reply_t *out)
{
    memset(out, 0, sizeof(*out));
    if (!id_is_safe(subscription_id))
        return BG_ERR_INVALID;
    char path[160];
    snprintf(path, sizeof(path), "/subscriptions/%s/cancel", subscription_id);
    return call(api, "POST", path, "{\"effective_from\":\"next_billing_period\"}", out);
}

int bg_paddle_resume_subscription(const bg_paddle_api_t *api, const char *subscription_id,
                                  bg_paddle_reply_t *out)
{
    memset(out, 0, sizeof(*out));
    if (!id_is_safe(subscription_id))
        return BG_ERR_INVALID;
    char path[160];
    snprintf(path, sizeof(path), "/subscriptions/%s", subscription_id);
    return call(api, "PATCH", path, "{\"scheduled_change\":null}", out);
}

int bg_paddle_change_items(const bg_paddle_api_t *api, const char *subscription_id,
                           const char *price_id, bg_paddle_proration_t mode, bg_paddle_reply_t *out)
{
    memset(out, 0, sizeof(*out));
    if (!id_is_safe(subscription_id) || !id_is_safe(price_id))
        return BG_ERR_INVALID;
    static const char *const modes[] = {[BG_PADDLE_PRORATED_IMMEDIATELY] = "prorated_immediately",
                                        [BG_PADDLE_FULL_NEXT_BILLING_PERIOD] =
                                            "full_next_billing_period",
                                        [BG_PADDLE_DO_NOT_BILL] = "do_not_bill"};
    if ((unsigned)mode >= sizeof(modes) / sizeof(modes[0]))
        return BG_ERR_INVALID;
    char path[160], body[320];
    snprintf(path, sizeof(path), "/subscriptions/%s", subscription_id);
    snprintf(body, sizeof(body),
             "{\"items\":[{\"price_id\":\"%s\",\"quantity\":1}],"
             "\"proration_billing_mode\":\"%s\"}",
             price_id, modes[mode]);
    return call(api, "PATCH", path, body, out);
}

/* A GET of one entity: Paddle's 404 is BG_ERR_NOT_FOUND. */
static int get_one(const bg_paddle_api_t *api, const char *path, bg_paddle_reply_t *out)
{
    int rc = call(api, "GET", path, NULL, out);
    if (rc == BG_ERR_INVALID && out->status == 404)
        rc = BG_ERR_NOT_FOUND;
    return rc;
}

int bg_paddle_get_transaction(const bg_paddle_api_t *api, const char *transaction_id,
                              bg_paddle_reply_t *out)
{
    memset(out, 0, sizeof(*out));
    if (!id_is_safe(transaction_id))
        return BG_ERR_NOT_FOUND;
    char path[160];
    snprintf(path, sizeof(path), "/transactions/%s", transaction_id);
    return get_one(api, path, out);
}

int bg_paddle_payment_transaction(const bg_paddle_api_t *api, const char *subscription_id,
                                  bg_paddle_reply_t *out)
{
    memset(out, 0, sizeof(*out));
    if (!id_is_safe(subscription_id))
        return BG_ERR_NOT_FOUND;
    char path[200];
    snprintf(path, sizeof(path), "/subscriptions/%s/update-payment-method-transaction",
             subscription_id);
    return get_one(api, path, out);
}

int bg_paddle_list(const bg_paddle_api_t *api, const char *path, bg_buf_t *body,
                   bg_paddle_reply_t *out)
{
    memset(out, 0, sizeof(*out));
    if (path == NULL || path[0] != '/')
        return BG_ERR_INVALID;
    return call_keep(api, "GET", path, NULL, out, body);
}
