/*
 * The configuration table and its loader.
 *
 * Loading is three steps: read the optional .env file into a small list (it never overrides the
 * real environment), look every variable of the table up, then parse and check each value against
 * its type and bounds. The first failure is reported with the variable's name, the value's problem
 * and what was expected; nothing is half-applied.
 */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/config.h"
#include "bg/err.h"

#define OFF(field) offsetof(bg_config_t, field)
#define NOLIM 0, 0

/* clang-format off */
static const bg_config_var_t vars[] = {
    {"BG_HTTP_PORT", BG_CFG_PORT, "8080", 1, 65535, NULL, OFF(http_port), 0,
     "HTTP/1.1 and h2c (prior knowledge and Upgrade) listener port"},
    {"BG_HTTPS_PORT", BG_CFG_PORT, "8443", 0, 65535, NULL, OFF(https_port), 0,
     "TLS listener port (ALPN h2, http/1.1); 0 disables it"},
    {"BG_BIND_ADDRESS", BG_CFG_STR, "127.0.0.1", NOLIM, NULL, OFF(bind_address), 0,
     "address the listeners bind to (0.0.0.0 for all IPv4 interfaces)"},
    {"BG_TLS_CERT", BG_CFG_STR, NULL, NOLIM, NULL, OFF(tls_cert), 0,
     "PEM certificate (chain) for the TLS listener; make run generates a dev one"},
    {"BG_TLS_KEY", BG_CFG_STR, NULL, NOLIM, NULL, OFF(tls_key), BG_CFG_SECRET,
     "PEM private key for BG_TLS_CERT"},
    {"BG_PUBLIC_URL", BG_CFG_URL, "http://127.0.0.1:8080", NOLIM, "http|https", OFF(public_url), 0,
     "external base URL, used in links and webhook addresses"},
    {"BG_EDGE_THREADS", BG_CFG_PORT, "0", 0, 256, NULL, OFF(edge_threads), 0,
     "event loops of bg-edge; 0 means one per CPU core"},
    {"BG_MAX_BODY_BYTES", BG_CFG_INT, "1048576", 1024, 64 * 1024 * 1024, NULL, OFF(max_body_bytes), 0,
     "largest request body bg-edge accepts, in bytes"},
    {"BG_SHUTDOWN_GRACE_MS", BG_CFG_INT, "10000", 0, 600000, NULL, OFF(shutdown_grace_ms), 0,
     "how long in-flight requests and jobs may run after SIGTERM, in milliseconds"},
    {"BG_MAX_STREAMS_PER_CONN", BG_CFG_INT, "100", 1, 1000, NULL, OFF(max_streams_per_conn), 0,
     "concurrent HTTP/2 requests per connection"},
    {"BG_WEB_ROOT", BG_CFG_STR, "", NOLIM, NULL, OFF(web_root), 0,
     "directory of the built web client; empty means the one in the source tree"},
    {"BG_REDIS_URL", BG_CFG_URL, "redis://127.0.0.1:6379/0", NOLIM, "redis", OFF(redis_url), BG_CFG_SECRET,
     "Redis, redis://[:password@]host:port[/db]; make run starts one under .data/"},
    {"BG_DATABASE_URL", BG_CFG_URL, "postgresql://bg@127.0.0.1:5432/bg", NOLIM, "postgresql|postgres",
     OFF(database_url), BG_CFG_SECRET,
     "PostgreSQL connection URI; make run starts one under .data/"},
    {"BG_REDIS_TIMEOUT_MS", BG_CFG_INT, "2000", 10, 60000, NULL, OFF(redis_timeout_ms), 0,
     "deadline of one Redis command, in milliseconds"},
    {"BG_DB_POOL_SIZE", BG_CFG_INT, "4", 1, 256, NULL, OFF(db_pool_size), 0,
     "threads (each with one Postgres connection) for blocking work in bg-edge"},
    {"BG_SHARDS", BG_CFG_PORT, "16", 1, 1024, NULL, OFF(shards), 0,
     "Redis shard count (hash tags {s<N>}); changing it needs a migration of Redis state"},
    {"BG_JWT_SECRET", BG_CFG_STR, NULL, NOLIM, NULL, OFF(jwt_secret), BG_CFG_SECRET,
     "HS256 access-token secret (at least 32 bytes); make run generates one"},
    {"BG_JWT_KEYS", BG_CFG_STR, NULL, NOLIM, NULL, OFF(jwt_keys), BG_CFG_SECRET,
     "key ring for rotation, kid:secret,kid:secret (the first signs); overrides BG_JWT_SECRET"},
    {"BG_ACCESS_TTL_S", BG_CFG_INT, "900", 60, 86400, NULL, OFF(access_ttl_s), 0,
     "lifetime of an access token (JWT), in seconds"},
    {"BG_REFRESH_TTL_S", BG_CFG_INT, "2592000", 300, 31536000, NULL, OFF(refresh_ttl_s), 0,
     "lifetime of one refresh token, in seconds; each use rotates it"},
    {"BG_SESSION_TTL_S", BG_CFG_INT, "7776000", 300, 63072000, NULL, OFF(session_ttl_s), 0,
     "absolute lifetime of a sign-in session whatever its rotations, in seconds"},
    {"BG_LOGIN_IP_PER_MIN", BG_CFG_INT, "30", 1, 100000, NULL, OFF(login_ip_per_min), 0,
     "sign-in and registration attempts allowed per client address per minute"},
    {"BG_LOGIN_FAILURES_MAX", BG_CFG_INT, "10", 1, 1000, NULL, OFF(login_failures_max), 0,
     "failed sign-ins allowed per account per 15 minutes before it is locked for the rest of them"},
    {"BG_LLM_BASE_URL", BG_CFG_URL, NULL, NOLIM, "http|https", OFF(llm_base_url), 0,
     "OpenAI-compatible provider base URL (…/v1); make run uses the bundled demo provider"},
    {"BG_LLM_API_KEY", BG_CFG_STR, NULL, NOLIM, NULL, OFF(llm_api_key), BG_CFG_SECRET,
     "API key of the provider"},
    {"BG_LLM_MODEL", BG_CFG_STR, "demo-1", NOLIM, NULL, OFF(llm_model), 0,
     "default model name sent to the provider"},
    {"BG_LLM_FALLBACK_BASE_URL", BG_CFG_URL, NULL, NOLIM, "http|https", OFF(llm_fallback_base_url), 0,
     "provider used when the first one fails before the first token"},
    {"BG_LLM_CONNECT_TIMEOUT_MS", BG_CFG_INT, "10000", 100, 600000, NULL,
     OFF(llm_connect_timeout_ms), 0, "deadline to connect to the provider, in ms"},
    {"BG_LLM_FIRST_TOKEN_TIMEOUT_MS", BG_CFG_INT, "60000", 100, 3600000, NULL,
     OFF(llm_first_token_timeout_ms), 0,
     "deadline from the request to the provider's first token, in ms (a failure before it is "
     "retried, then refunded)"},
    {"BG_LLM_IDLE_TIMEOUT_MS", BG_CFG_INT, "30000", 100, 3600000, NULL, OFF(llm_idle_timeout_ms),
     0, "longest silence between two tokens of a reply, in ms"},
    {"BG_LLM_TOTAL_TIMEOUT_MS", BG_CFG_INT, "600000", 1000, 86400000, NULL,
     OFF(llm_total_timeout_ms), 0, "longest time one reply may take, in ms"},
    {"BG_TELEGRAM_API_URL", BG_CFG_URL, "https://api.telegram.org", NOLIM, "http|https",
     OFF(telegram_api_url), 0, "Telegram Bot API base URL"},
    {"BG_TELEGRAM_BOT_TOKEN", BG_CFG_STR, NULL, NOLIM, NULL, OFF(telegram_bot_token), BG_CFG_SECRET,
     "quick start: bot token bound to the default assistant agent"},
    {"BG_TELEGRAM_WEBHOOK_SECRET", BG_CFG_STR, NULL, NOLIM, NULL, OFF(telegram_webhook_secret),
     BG_CFG_SECRET, "quick start: secret token Telegram sends with each webhook"},
    {"BG_PADDLE_API_URL", BG_CFG_URL, "https://sandbox-api.paddle.com", NOLIM, "http|https",
     OFF(paddle_api_url), 0, "Paddle API base URL (sandbox by default)"},
    {"BG_PADDLE_API_KEY", BG_CFG_STR, NULL, NOLIM, NULL, OFF(paddle_api_key), BG_CFG_SECRET,
     "Paddle API key"},
    {"BG_PADDLE_WEBHOOK_SECRETS", BG_CFG_STR, NULL, NOLIM, NULL, OFF(paddle_webhook_secrets),
     BG_CFG_SECRET, "Paddle notification secrets, comma-separated (several during rotation)"},
    {"BG_PADDLE_PRICE_DAILY", BG_CFG_STR, NULL, NOLIM, NULL, OFF(paddle_price_daily), 0,
     "Paddle price id of the daily plan; bgctl migrate applies it unless an admin set another"},
    {"BG_PADDLE_PRICE_WEEKLY", BG_CFG_STR, NULL, NOLIM, NULL, OFF(paddle_price_weekly), 0,
     "Paddle price id of the weekly plan (applied like BG_PADDLE_PRICE_DAILY)"},
    {"BG_PADDLE_PRICE_MONTHLY", BG_CFG_STR, NULL, NOLIM, NULL, OFF(paddle_price_monthly), 0,
     "Paddle price id of the monthly plan (applied like BG_PADDLE_PRICE_DAILY)"},
    {"BG_PADDLE_PRICE_YEARLY", BG_CFG_STR, NULL, NOLIM, NULL, OFF(paddle_price_yearly), 0,
     "Paddle price id of the yearly plan (applied like BG_PADDLE_PRICE_DAILY)"},
    {"BG_SMTP_URL", BG_CFG_URL, NULL, NOLIM, "smtp|smtps", OFF(smtp_url), BG_CFG_SECRET,
     "SMTP server for notification mail, smtp[s]://user:pass@host:port; unset turns mail off"},
    {"BG_MAIL_FROM", BG_CFG_STR, NULL, NOLIM, NULL, OFF(mail_from), 0,
     "sender address of notification mail"},
    {"BG_SMTP_USER", BG_CFG_STR, NULL, NOLIM, NULL, OFF(smtp_user), 0,
     "SMTP user name, when not in BG_SMTP_URL; with it, smtp:// requires STARTTLS"},
    {"BG_SMTP_PASSWORD", BG_CFG_STR, NULL, NOLIM, NULL, OFF(smtp_password), BG_CFG_SECRET,
     "SMTP password for BG_SMTP_USER"},
    {"BG_CORS_ORIGINS", BG_CFG_STR, NULL, NOLIM, NULL, OFF(cors_origins), 0,
     "browser origins allowed by CORS, comma-separated; unset means the public URL's origin"},
    {"BG_SUPPORTED_LOCALES", BG_CFG_LOCALES, "en,ru,es", NOLIM, NULL, OFF(supported_locales), 0,
     "locales offered to users, comma-separated; each needs locales/<tag>.json"},
    {"BG_DEFAULT_LOCALE", BG_CFG_STR, "en", NOLIM, NULL, OFF(default_locale), 0,
     "locale used when neither the user nor Accept-Language picks a supported one"},
    {"BG_MAX_DELIVERIES", BG_CFG_INT, "5", 1, 1000, NULL, OFF(max_deliveries), 0,
     "deliveries of a job before it moves to the dead-letter stream"},
    {"BG_CLAIM_IDLE_MS", BG_CFG_INT, "30000", 100, 86400000, NULL, OFF(claim_idle_ms), 0,
     "a pending job idle this long (its worker died or failed) is claimed by another worker"},
    {"BG_WORKER_CONCURRENCY", BG_CFG_INT, "4", 1, 256, NULL, OFF(worker_concurrency), 0,
     "jobs one bg-worker process handles at once"},
    {"BG_WORKER_PORT", BG_CFG_PORT, "9100", 0, 65535, NULL, OFF(worker_port), 0,
     "bg-worker health and metrics port (/healthz, /readyz, /metrics); 0 disables it"},
    {"BG_STREAM_MAXLEN", BG_CFG_INT, "100000", 1000, 100000000, NULL, OFF(stream_maxlen), 0,
     "approximate length job streams are trimmed to"},
    {"BG_RECONCILE_INTERVAL_S", BG_CFG_INT, "300", 0, 86400, NULL, OFF(reconcile_interval_s), 0,
     "seconds between quota reconciler passes (Redis counters against Postgres); 0 disables"},
    {"BG_NOTIFY_INTERVAL_MS", BG_CFG_INT, "10000", 50, 3600000, NULL, OFF(notify_interval_ms), 0,
     "notify role: ms between passes that derive notifications and send the due ones"},
    {"BG_NOTIFY_RETRY_MS", BG_CFG_INT, "60000", 10, 86400000, NULL, OFF(notify_retry_ms), 0,
     "notify role: delay before the first retry of a mail or Telegram message; doubles each time"},
    {"BG_NOTIFY_MAX_ATTEMPTS", BG_CFG_INT, "8", 1, 100, NULL, OFF(notify_max_attempts), 0,
     "notify role: attempts of one mail or Telegram message before it is marked failed"},
    {"BG_LOG_LEVEL", BG_CFG_ENUM, "info", NOLIM, "debug|info|warn|error|off", OFF(log_level), 0,
     "lowest level logged"},
    {"BG_LOG_FORMAT", BG_CFG_ENUM, "json", NOLIM, "json|text", OFF(log_format), 0,
     "log line format"},
};
/* clang-format on */

const bg_config_var_t *bg_config_vars(size_t *count)
{
    *count = BG_ARRAY_SIZE(vars);
    return vars;
}

typedef struct st_dotenv {
    char **names;  /* owned */
    char **values; /* owned */
    size_t n;
} dotenv_t;

static void dotenv_dispose(dotenv_t *d)
{
    for (size_t i = 0; i < d->n; i++) {
        free(d->names[i]);
        free(d->values[i]);
    }
    free(d->names);
    free(d->values);
}

static char *trim(char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r' || s[n - 1] == '\n'))
        s[--n] = '\0';
    return s;
}

/*
 * Reads KEY=VALUE lines (with optional "export ", comments and single or double quotes around the
 * value). A missing file is not an error; a line that is not an assignment is.
 */
static int dotenv_read(dotenv_t *d, const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return 0;
    char line[4096];
    int lineno = 0;
    int r = 0;
    while (fgets(line, sizeof(line), f) != NULL) {
        lineno++;
        char *s = trim(line);
        if (*s == '\0' || *s == '#')
            continue;
        if (strncmp(s, "export ", 7) == 0)
            s = trim(s + 7);
        char *eq = strchr(s, '=');
        if (eq == NULL || eq == s) {
            snprintf(err, errlen, "%s:%d: expected NAME=value", path, lineno);
            r = BG_ERR_CONFIG;
            break;
        }
        *eq = '\0';
        char *name = trim(s);
        char *value = trim(eq + 1);
        size_t vl = strlen(value);
        if (vl >= 2 && (value[0] == '"' || value[0] == '\'') && value[vl - 1] == value[0]) {
            value[vl - 1] = '\0';
            value++;
        }
        d->names = bg_realloc(d->names, (d->n + 1) * sizeof(char *));
        d->values = bg_realloc(d->values, (d->n + 1) * sizeof(char *));
        d->names[d->n] = bg_strdup(name);
        d->values[d->n] = bg_strdup(value);
        d->n++;
    }
    if (fclose(f) != 0 && r == 0) {
        snprintf(err, errlen, "%s: read error", path);
        r = BG_ERR_CONFIG;
    }
    return r;
}

static const char *lookup(const dotenv_t *d, const char *name)
{
    const char *v = getenv(name); /* NOLINT(concurrency-mt-unsafe): start-up, single-threaded */
    if (v != NULL)
        return v;
    for (size_t i = d->n; i > 0; i--) {
        if (strcmp(d->names[i - 1], name) == 0)
            return d->values[i - 1];
    }
    return NULL;
}

static bool parse_int(const char *s, int64_t *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0')
        return false;
    *out = v;
    return true;
}

/* Returns the index of s in "a|b|c", or -1. */
static int choice_index(const char *choices, const char *s, size_t slen)
{
    int i = 0;
    const char *p = choices;
    while (*p != '\0') {
        const char *bar = strchr(p, '|');
        size_t n = bar != NULL ? (size_t)(bar - p) : strlen(p);
        if (n == slen && strncmp(p, s, n) == 0)
            return i;
        i++;
        if (bar == NULL)
            break;
        p = bar + 1;
    }
    return -1;
}

static bool valid_locale_tag(const char *s, size_t n)
{
    if (n < 2 || n > 8)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (i >= 2 && (c == '-' || (c >= 'A' && c <= 'Z')))))
            return false;
    }
    return true;
}

static int parse_var(const bg_config_var_t *v, const char *value, bg_config_t *cfg, char *err,
                     size_t errlen)
{
    char *field = (char *)cfg + v->offset;
    int64_t n;

    switch (v->type) {
    case BG_CFG_STR:
        *(char **)field = bg_strdup(value);
        return 0;
    case BG_CFG_INT:
    case BG_CFG_PORT:
        if (!parse_int(value, &n) || n < v->min || n > v->max) {
            snprintf(err, errlen, "%s=\"%s\": expected an integer from %lld to %lld", v->name,
                     value, (long long)v->min, (long long)v->max);
            return BG_ERR_CONFIG;
        }
        if (v->type == BG_CFG_PORT)
            *(int *)field = (int)n;
        else
            *(int64_t *)field = n;
        return 0;
    case BG_CFG_URL: {
        const char *colon = strstr(value, "://");
        if (colon == NULL || choice_index(v->choices, value, (size_t)(colon - value)) < 0 ||
            colon[3] == '\0' || strpbrk(value, " \t\r\n") != NULL) {
            snprintf(err, errlen, "%s: expected a URL with scheme %s (scheme://host…)", v->name,
                     v->choices);
            return BG_ERR_CONFIG;
        }
        *(char **)field = bg_strdup(value);
        return 0;
    }
    case BG_CFG_ENUM: {
        int i = choice_index(v->choices, value, strlen(value));
        if (i < 0) {
            snprintf(err, errlen, "%s=\"%s\": expected one of %s", v->name, value, v->choices);
            return BG_ERR_CONFIG;
        }
        *(int *)field = i;
        return 0;
    }
    case BG_CFG_LOCALES: {
        const char *p = value;
        if (*p == '\0') {
            snprintf(err, errlen,
                     "%s: expected a comma-separated list of locale tags such as en,ru", v->name);
            return BG_ERR_CONFIG;
        }
        while (*p != '\0') {
            const char *comma = strchr(p, ',');
            size_t len = comma != NULL ? (size_t)(comma - p) : strlen(p);
            if (!valid_locale_tag(p, len)) {
                snprintf(err, errlen,
                         "%s=\"%s\": expected a comma-separated list of locale tags such as en,ru",
                         v->name, value);
                return BG_ERR_CONFIG;
            }
            if (comma == NULL)
                break;
            p = comma + 1;
        }
        *(char **)field = bg_strdup(value);
        return 0;
    }
    }
    snprintf(err, errlen, "%s: unknown variable type", v->name);
    return BG_ERR_CONFIG;
}

/* Checks that need more than one variable. */
static int check_cross(const bg_config_t *cfg, char *err, size_t errlen)
{
    if (!bg_config_list_has(cfg->supported_locales, cfg->default_locale)) {
        snprintf(err, errlen, "BG_DEFAULT_LOCALE=\"%s\": expected one of BG_SUPPORTED_LOCALES (%s)",
                 cfg->default_locale, cfg->supported_locales);
        return BG_ERR_CONFIG;
    }
    if ((cfg->tls_cert == NULL) != (cfg->tls_key == NULL)) {
        snprintf(err, errlen, "%s: expected BG_TLS_CERT and BG_TLS_KEY to be set together",
                 cfg->tls_cert == NULL ? "BG_TLS_CERT" : "BG_TLS_KEY");
        return BG_ERR_CONFIG;
    }
    if (cfg->jwt_secret != NULL && cfg->jwt_keys == NULL && strlen(cfg->jwt_secret) < 32) {
        snprintf(err, errlen, "BG_JWT_SECRET: expected at least 32 bytes");
        return BG_ERR_CONFIG;
    }
    if (cfg->https_port != 0 && cfg->https_port == cfg->http_port) {
        snprintf(err, errlen, "BG_HTTPS_PORT=%d: expected a port other than BG_HTTP_PORT",
                 cfg->https_port);
        return BG_ERR_CONFIG;
    }
    return 0;
}

int bg_config_load(bg_config_t *cfg, const char *dotenv_path, char *err, size_t errlen)
{
    dotenv_t env = {NULL, NULL, 0};
    int r = 0;

    memset(cfg, 0, sizeof(*cfg));
    if (dotenv_path != NULL && (r = dotenv_read(&env, dotenv_path, err, errlen)) != 0)
        goto err_dispose_env;
    for (size_t i = 0; i < BG_ARRAY_SIZE(vars); i++) {
        const char *value = lookup(&env, vars[i].name);
        if (value != NULL && value[0] == '\0' && vars[i].type != BG_CFG_STR)
            value = NULL; /* VAR= in a .env file means "not set" */
        if (value == NULL)
            value = vars[i].def;
        if (value == NULL)
            continue;
        if ((r = parse_var(&vars[i], value, cfg, err, errlen)) != 0)
            goto err_dispose_cfg;
    }
    if ((r = check_cross(cfg, err, errlen)) != 0)
        goto err_dispose_cfg;
    dotenv_dispose(&env);
    return 0;

err_dispose_cfg:
    bg_config_dispose(cfg);
err_dispose_env:
    dotenv_dispose(&env);
    return r;
}

void bg_config_dispose(bg_config_t *cfg)
{
    for (size_t i = 0; i < BG_ARRAY_SIZE(vars); i++) {
        bg_config_type_t t = vars[i].type;
        if (t == BG_CFG_STR || t == BG_CFG_URL || t == BG_CFG_LOCALES) {
            char **field = (char **)((char *)cfg + vars[i].offset);
            free(*field);
            *field = NULL;
        }
    }
}

void bg_config_load_or_exit(bg_config_t *cfg, const char *component)
{
    char err[512];
    const char *path = getenv("BG_ENV_FILE"); /* NOLINT(concurrency-mt-unsafe): start-up */
    if (path == NULL)
        path = ".env";
    if (bg_config_load(cfg, path, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s: configuration error: %s\n", component, err);
        exit(2); /* NOLINT(concurrency-mt-unsafe): start-up, single-threaded */
    }
    bg_log_setup(cfg->log_level, cfg->log_format, component);
}

bool bg_config_list_has(const char *list, const char *item)
{
    if (list == NULL || item == NULL)
        return false;
    size_t n = strlen(item);
    const char *p = list;
    for (;;) {
        const char *comma = strchr(p, ',');
        size_t len = comma != NULL ? (size_t)(comma - p) : strlen(p);
        while (len > 0 && *p == ' ') {
            p++;
            len--;
        }
        while (len > 0 && p[len - 1] == ' ')
            len--;
        if (len == n && strncmp(p, item, n) == 0)
            return true;
        if (comma == NULL)
            return false;
        p = comma + 1;
    }
}
