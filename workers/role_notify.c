/*
 * The notify role. Notifications come from durable facts (the webhook inbox, the subscriptions),
 * not from jobs, so the role's work is periodic: one thread per process runs a pass every
 * BG_NOTIFY_INTERVAL_MS, which produces the rows of new facts and then sends the due ones until
 * none is left (bg_notify_produce, bg_notify_send_due). Any number of processes may run the role:
 * producing is idempotent on dedupe keys and sending takes rows with SKIP LOCKED.
 *
 * A job on the role's stream only wakes the thread for an early pass, so whoever changes billing
 * can make a notification go out at once; the handler never touches Postgres itself.
 *
 * The thread has its own Postgres connection (bg_pg_thread_conn) and its own Redis client, used
 * only for the Telegram pacers the telegram role shares; without Redis, sends are not paced.
 */
#include "role_notify.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/i18n.h"
#include "bg/log.h"
#include "bg/notify.h"
#include "bg/pg.h"
#include "bg/redis.h"

/* Rows one pass sends before it produces again (the rest go in the next pass). */
#define SEND_BATCH 200
#define SEND_STEP 10
#define SMTP_TIMEOUT_MS 30000
#define FIRST_PASS_DELAY_MS 500

typedef struct st_notify_role {
    char *database_url; /* owned */
    char *redis_url;    /* owned */
    char *smtp_url, *smtp_user, *smtp_password, *mail_from, *telegram_api_url, *public_url;
    int64_t redis_timeout_ms;
    int64_t interval_ms;
    bg_notify_opts_t opts; /* points into the strings above */
    pthread_t thread;
    bool started;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    bool stop; /* under lock */
    bool kick; /* under lock: a job asked for a pass */
} notify_role_t;

static char *dup_or_null(const char *s)
{
    return bg_str_present(s) ? bg_strdup(s) : NULL;
}

static bool stopping(notify_role_t *n)
{
    pthread_mutex_lock(&n->lock);
    bool stop = n->stop;
    pthread_mutex_unlock(&n->lock);
    return stop;
}

static void pass(notify_role_t *n)
{
    PGconn *c = bg_pg_thread_conn(n->database_url);
    if (c == NULL) {
        bg_warn("notify: database unavailable; next pass in %lld ms", (long long)n->interval_ms);
        return;
    }
    int64_t created = 0;
    int rc = bg_notify_produce(c, &created);
    if (rc != 0)
        bg_warn("notify: producing failed: %s", bg_strerror(rc));
    /* small batches, so that a shutdown waits for one send at most, not for a whole queue */
    bg_notify_counts_t total = {0};
    for (int done = 0; done < SEND_BATCH && !stopping(n);) {
        bg_notify_counts_t c1;
        rc = bg_notify_send_due(c, &n->opts, SEND_STEP, &c1);
        if (rc != 0) {
            bg_warn("notify: sending failed: %s", bg_strerror(rc));
            break;
        }
        int64_t handled = c1.sent + c1.retried + c1.failed + c1.skipped;
        total.sent += c1.sent;
        total.retried += c1.retried;
        total.failed += c1.failed;
        total.skipped += c1.skipped;
        done += (int)handled;
        if (handled < SEND_STEP)
            break;
    }
    if (total.sent + total.retried + total.failed + total.skipped > 0)
        bg_info("notify: sent %lld, retrying %lld, failed %lld, skipped %lld",
                (long long)total.sent, (long long)total.retried, (long long)total.failed,
                (long long)total.skipped);
}

static void *thread_main(void *arg)
{
    notify_role_t *n = arg;
    bg_redis_t *redis = NULL;
    if (bg_redis_new(n->redis_url, n->redis_timeout_ms, &redis) != 0)
        bg_warn("notify: no Redis client: Telegram messages are not paced");
    n->opts.redis = redis;
    /* The first pass waits a moment: the roles' inits run one after another, and one that comes
     * after this one may load the catalogues again (the telegram role does), which must not
     * happen under a pass that is rendering. */
    bool first = true;
    for (;;) {
        if (first) {
            struct timespec ts = {0, FIRST_PASS_DELAY_MS * 1000000L};
            while (nanosleep(&ts, &ts) != 0) {
            }
            first = false;
        }
        pass(n);
        pthread_mutex_lock(&n->lock);
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += (time_t)(n->interval_ms / 1000);
        until.tv_nsec += (long)(n->interval_ms % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        while (!n->stop && !n->kick) {
            if (pthread_cond_timedwait(&n->wake, &n->lock, &until) != 0)
                break;
        }
        bool stop = n->stop;
        n->kick = false;
        pthread_mutex_unlock(&n->lock);
        if (stop)
            break;
    }
    n->opts.redis = NULL;
    bg_redis_free(redis);
    bg_pg_thread_close();
    return NULL;
}

int wk_notify_init(const bg_config_t *cfg, void **ud)
{
    if (!bg_str_present(cfg->database_url)) {
        bg_error("notify: BG_DATABASE_URL is not set");
        return BG_ERR_CONFIG;
    }
    if (bg_str_present(cfg->smtp_url) && !bg_str_present(cfg->mail_from)) {
        bg_error("notify: BG_SMTP_URL is set but BG_MAIL_FROM is not: mail needs a sender");
        return BG_ERR_CONFIG;
    }
    /* The catalogues may be loaded already (the telegram role loads them too); loading them again
     * would free strings another role's init has no use for yet, but there is no need. */
    if (bg_i18n_text(cfg->default_locale, "notify.mail.footer") == NULL) {
        char err[256];
        if (bg_i18n_init(cfg->supported_locales, cfg->default_locale, err, sizeof(err)) != 0) {
            bg_error("notify: %s", err);
            return BG_ERR_CONFIG;
        }
    }
    notify_role_t *n = bg_calloc(1, sizeof(*n));
    n->database_url = bg_strdup(cfg->database_url);
    n->redis_url = bg_strdup(cfg->redis_url);
    n->smtp_url = dup_or_null(cfg->smtp_url);
    n->smtp_user = dup_or_null(cfg->smtp_user);
    n->smtp_password = dup_or_null(cfg->smtp_password);
    n->mail_from = dup_or_null(cfg->mail_from);
    n->telegram_api_url = bg_strdup(cfg->telegram_api_url);
    n->public_url = bg_strdup(cfg->public_url);
    n->redis_timeout_ms = cfg->redis_timeout_ms;
    n->interval_ms = cfg->notify_interval_ms;
    n->opts = (bg_notify_opts_t){
        .smtp_url = n->smtp_url,
        .smtp_user = n->smtp_user,
        .smtp_password = n->smtp_password,
        .mail_from = n->mail_from,
        .telegram_api_url = n->telegram_api_url,
        .public_url = n->public_url,
        .timeout_ms = SMTP_TIMEOUT_MS,
        .retry_ms = cfg->notify_retry_ms,
        .max_attempts = (int)cfg->notify_max_attempts,
    };
    pthread_mutex_init(&n->lock, NULL);
    pthread_cond_init(&n->wake, NULL);
    if (pthread_create(&n->thread, NULL, thread_main, n) != 0) {
        bg_error("notify: cannot start the pass thread");
        wk_notify_dispose(n);
        return BG_ERR_IO;
    }
    n->started = true;
    if (n->smtp_url == NULL)
        bg_info("notify: BG_SMTP_URL is not set: mail notifications are skipped");
    *ud = n;
    return 0;
}

void wk_notify_dispose(void *ud)
{
    notify_role_t *n = ud;
    if (n == NULL)
        return;
    if (n->started) {
        pthread_mutex_lock(&n->lock);
        n->stop = true;
        pthread_cond_signal(&n->wake);
        pthread_mutex_unlock(&n->lock);
        pthread_join(n->thread, NULL);
    }
    pthread_cond_destroy(&n->wake);
    pthread_mutex_destroy(&n->lock);
    free(n->database_url);
    free(n->redis_url);
    free(n->smtp_url);
    free(n->smtp_user);
    if (n->smtp_password != NULL)
        bg_crypto_wipe(n->smtp_password, strlen(n->smtp_password));
    free(n->smtp_password);
    free(n->mail_from);
    free(n->telegram_api_url);
    free(n->public_url);
    free(n);
}

int wk_notify_handle(wk_job_t *job, void *ud)
{
    (void)job;
    notify_role_t *n = ud;
    pthread_mutex_lock(&n->lock);
    n->kick = true;
    pthread_cond_signal(&n->wake);
    pthread_mutex_unlock(&n->lock);
    return 0;
}
