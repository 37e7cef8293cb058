/*
 * bg-edge: the HTTP edge. Loads and validates the configuration, prepares the shared modules
 * (catalogues, metrics), then runs the server until SIGTERM/SIGINT.
 */
#include <stdio.h>
#include <stdlib.h>

#include "bg/config.h"
#include "bg/i18n.h"
#include "bg/log.h"
#include "edge.h"

int main(void)
{
    bg_config_t cfg;
    edge_server_t server;
    char err[256];

    bg_config_load_or_exit(&cfg, "edge");
    if (bg_i18n_init(cfg.supported_locales, cfg.default_locale, err, sizeof(err)) != 0) {
        fprintf(stderr, "edge: configuration error: BG_SUPPORTED_LOCALES: %s\n", err);
        bg_config_dispose(&cfg);
        return 2;
    }
    if (edge_server_init(&server, &cfg) != 0) {
        bg_config_dispose(&cfg);
        return 1;
    }
    int rc = edge_server_run(&server);
    edge_server_dispose(&server);
    bg_config_dispose(&cfg);
    return rc;
}
