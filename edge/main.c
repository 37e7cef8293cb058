/*
 * bg-edge: the HTTP edge. Loads and validates the configuration, prepares the shared modules
 * (catalogues, metrics), then runs the server until SIGTERM/SIGINT.
 */
#include <stdio.h>
#include <stdlib.h>

#include "bg/config.h"
#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/i18n.h"
#include "bg/log.h"
#include "bg/pg.h"
#include "edge.h"

/*
 * Says at start-up whether Postgres answers, so an operator sees a wrong BG_DATABASE_URL at once.
 * The edge starts either way: /readyz answers 503 until Postgres is reachable.
 */
static void probe_postgres(const bg_config_t *cfg)
{
    PGconn *c = NULL;
    char err[256];
    if (bg_pg_connect(cfg->database_url, 1, &c, err, sizeof(err)) != 0) {
        bg_warn("Postgres is not reachable (%s); /readyz answers 503 until it is", err);
        return;
    }
    PQfinish(c);
}

/* Static: the server's loops outlive main's frame until exit (see edge_server_dispose). */
static edge_server_t server;

int edge_routes_auth_init(void);

int main(void)
{
    bg_config_t cfg;
    char err[256];

    bg_config_load_or_exit(&cfg, "edge");
    if (bg_i18n_init(cfg.supported_locales, cfg.default_locale, err, sizeof(err)) != 0) {
        fprintf(stderr, "edge: configuration error: BG_SUPPORTED_LOCALES: %s\n", err);
        bg_config_dispose(&cfg);
        return 2;
    }
    if (bg_crypto_init() != 0 || edge_routes_auth_init() != 0) {
        fprintf(stderr, "edge: cannot initialise the crypto library\n");
        bg_config_dispose(&cfg);
        return 1;
    }
    /* Blocking work (Postgres, password hashing) runs on libuv's pool: size it before any loop. */
    char pool[16];
    snprintf(pool, sizeof(pool), "%lld", (long long)cfg.db_pool_size);
    setenv("UV_THREADPOOL_SIZE", pool, 1); /* NOLINT(concurrency-mt-unsafe): before any thread */
    probe_postgres(&cfg);
    int r = edge_server_init(&server, &cfg);
    if (r != 0) {
        bg_config_dispose(&cfg);
        return r == BG_ERR_CONFIG ? 2 : 1; /* 2: like every other configuration error */
    }
    int rc = edge_server_run(&server);
    edge_server_dispose(&server);
    bg_config_dispose(&cfg);
    return rc;
}
