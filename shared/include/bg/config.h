/*
 * Configuration: the BG_* environment variables, optionally read from a .env file, validated once
 * at start-up and constant afterwards.
 *
 * One table (config.c) names every variable, its type, bounds and default. All three binaries load
 * the same table, so a variable means the same everywhere and .env.example can be checked against
 * it by a test. A value from the environment wins over one from the .env file; a value from neither
 * takes the default. A value that does not parse or is out of bounds stops the binary with a
 * message naming the variable and what it expected.
 */
#ifndef BG_CONFIG_H
#define BG_CONFIG_H

#include "bg/common.h"
#include "bg/log.h"

typedef struct bg_config {
    /* listeners and public address */
    int http_port;                /**< BG_HTTP_PORT */
    int https_port;               /**< BG_HTTPS_PORT; 0 disables the TLS listener */
    char *bind_address;           /**< BG_BIND_ADDRESS */
    char *tls_cert;               /**< BG_TLS_CERT (path) or NULL */
    char *tls_key;                /**< BG_TLS_KEY (path) or NULL */
    char *public_url;             /**< BG_PUBLIC_URL */
    int edge_threads;             /**< BG_EDGE_THREADS; 0 = one per core */
    int64_t max_body_bytes;       /**< BG_MAX_BODY_BYTES */
    int64_t shutdown_grace_ms;    /**< BG_SHUTDOWN_GRACE_MS */
    int64_t max_streams_per_conn; /**< BG_MAX_STREAMS_PER_CONN */
    char *web_root;               /**< BG_WEB_ROOT */
    /* stores */
    char *redis_url;          /**< BG_REDIS_URL */
    char *database_url;       /**< BG_DATABASE_URL */
    int64_t redis_timeout_ms; /**< BG_REDIS_TIMEOUT_MS */
    int64_t db_pool_size;     /**< BG_DB_POOL_SIZE */
    int shards;               /**< BG_SHARDS */
    /* auth */
    char *jwt_secret;           /**< BG_JWT_SECRET (secret) */
    char *jwt_keys;             /**< BG_JWT_KEYS "kid:secret,…" (secret) */
    int64_t access_ttl_s;       /**< BG_ACCESS_TTL_S */
    int64_t refresh_ttl_s;      /**< BG_REFRESH_TTL_S */
    int64_t session_ttl_s;      /**< BG_SESSION_TTL_S */
    int64_t login_ip_per_min;   /**< BG_LOGIN_IP_PER_MIN */
    int64_t login_failures_max; /**< BG_LOGIN_FAILURES_MAX (per account per 15 minutes) */
    /* providers */
    char *llm_base_url;                 /**< BG_LLM_BASE_URL */
    char *llm_api_key;                  /**< BG_LLM_API_KEY (secret) */
    char *llm_model;                    /**< BG_LLM_MODEL */
    char *llm_fallback_base_url;        /**< BG_LLM_FALLBACK_BASE_URL */
    int64_t llm_connect_timeout_ms;     /**< BG_LLM_CONNECT_TIMEOUT_MS */
    int64_t llm_first_token_timeout_ms; /**< BG_LLM_FIRST_TOKEN_TIMEOUT_MS */
    int64_t llm_idle_timeout_ms;        /**< BG_LLM_IDLE_TIMEOUT_MS */
    int64_t llm_total_timeout_ms;       /**< BG_LLM_TOTAL_TIMEOUT_MS */
    char *telegram_api_url;             /**< BG_TELEGRAM_API_URL */
    char *telegram_bot_token;           /**< BG_TELEGRAM_BOT_TOKEN (secret) */
    char *telegram_webhook_secret;      /**< BG_TELEGRAM_WEBHOOK_SECRET (secret) */
    char *paddle_api_url;               /**< BG_PADDLE_API_URL */
    char *paddle_api_key;               /**< BG_PADDLE_API_KEY (secret) */
    char *paddle_webhook_secrets;       /**< BG_PADDLE_WEBHOOK_SECRETS (secret) */
    char *paddle_price_daily;           /**< BG_PADDLE_PRICE_DAILY */
    char *paddle_price_weekly;          /**< BG_PADDLE_PRICE_WEEKLY */
    char *paddle_price_monthly;         /**< BG_PADDLE_PRICE_MONTHLY */
    char *paddle_price_yearly;          /**< BG_PADDLE_PRICE_YEARLY */
    char *smtp_url;                     /**< BG_SMTP_URL (secret: may carry credentials) */
    char *mail_from;                    /**< BG_MAIL_FROM */
    char *smtp_user;                    /**< BG_SMTP_USER */
    char *smtp_password;                /**< BG_SMTP_PASSWORD (secret) */
    /* web and i18n */
    char *cors_origins;      /**< BG_CORS_ORIGINS */
    char *supported_locales; /**< BG_SUPPORTED_LOCALES */
    char *default_locale;    /**< BG_DEFAULT_LOCALE */
    /* workers */
    int64_t max_deliveries;     /**< BG_MAX_DELIVERIES */
    int64_t claim_idle_ms;      /**< BG_CLAIM_IDLE_MS */
    int64_t worker_concurrency; /**< BG_WORKER_CONCURRENCY */
    int worker_port;            /**< BG_WORKER_PORT: health and metrics; 0 disables */
    int64_t stream_maxlen;      /**< BG_STREAM_MAXLEN */

    int64_t reconcile_interval_s; /**< BG_RECONCILE_INTERVAL_S; 0 disables the reconciler */
    int64_t notify_interval_ms;   /**< BG_NOTIFY_INTERVAL_MS */
    int64_t notify_retry_ms;      /**< BG_NOTIFY_RETRY_MS */
    int64_t notify_max_attempts;  /**< BG_NOTIFY_MAX_ATTEMPTS */
    /* logging */
    bg_log_level_t log_level;   /**< BG_LOG_LEVEL */
    bg_log_format_t log_format; /**< BG_LOG_FORMAT */
} bg_config_t;

typedef enum bg_config_type {
    BG_CFG_STR,
    BG_CFG_INT,    /**< int64_t within [min, max] */
    BG_CFG_PORT,   /**< int within [min, max] */
    BG_CFG_URL,    /**< a URL whose scheme is one of choices ("http|https") */
    BG_CFG_ENUM,   /**< one of choices ("a|b|c"), stored as the index into int */
    BG_CFG_LOCALES /**< comma-separated locale tags ("en,ru") */
} bg_config_type_t;

enum {
    BG_CFG_SECRET = 1 << 0, /**< never printed */
};

/** One row of the configuration table. */
typedef struct bg_config_var {
    const char *name; /**< environment variable */
    bg_config_type_t type;
    const char *def; /**< default as text; NULL: unset unless given */
    int64_t min, max;
    const char *choices;
    size_t offset; /**< into bg_config_t */
    unsigned flags;
    const char *help; /**< one line for .env.example and `bgctl config` */
} bg_config_var_t;

/** Returns the table of variables and its length through *count. */
const bg_config_var_t *bg_config_vars(size_t *count);

/**
 * Loads the configuration from the environment and, when dotenv_path names a readable file, from
 * it. On failure returns BG_ERR_CONFIG and writes a message naming the variable into err. On
 * success cfg is filled and owns its strings (bg_config_dispose frees them).
 */
BG_MUSTCHECK int bg_config_load(bg_config_t *cfg, const char *dotenv_path, char *err,
                                size_t errlen);

/** Frees the strings of a loaded configuration. */
void bg_config_dispose(bg_config_t *cfg);

/**
 * Loads the configuration as bg_config_load does (dotenv from $BG_ENV_FILE, else ./.env), sets up
 * logging for component, and on error prints the message and exits with status 2. For main().
 */
void bg_config_load_or_exit(bg_config_t *cfg, const char *component);

/** Returns true when the comma-separated list contains item (exact, case-sensitive). */
bool bg_config_list_has(const char *list, const char *item);

#endif
