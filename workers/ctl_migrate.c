/*
 * bgctl migrate: applies the migrations compiled into this binary (`bgctl migrate`) or lists them
 * with their state (`bgctl migrate status`, exit 0 when the schema is current, 1 when migrations
 * are pending or the database disagrees with the binary).
 *
 * Connecting retries for a while: in a deployment the migration job often starts together with the
 * database and should wait for it rather than fail the rollout.
 *
 * After the migrations, the Paddle price ids of the environment (BG_PADDLE_PRICE_*) are applied
 * to the plans (bg_plans_apply_price_config: an id an admin set is kept and reported instead).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/err.h"
#include "bg/migrate.h"
#include "bg/pg.h"
#include "bg/plans.h"
#include "ctl.h"

#define CONNECT_ATTEMPTS 8
#define MAX_LISTED 512

static int connect_db(const bg_config_t *cfg, PGconn **c)
{
    char err[512];
    bg_pg_setup(
        &(bg_pg_settings_t){.application_name = "bgctl migrate", .statement_timeout_ms = -1});
    if (bg_pg_connect(cfg->database_url, CONNECT_ATTEMPTS, c, err, sizeof(err)) != 0) {
        fprintf(stderr, "bgctl migrate: cannot connect to the database: %s\n", err);
        return 1;
    }
    return 0;
}

static int cmd_status(PGconn *c)
{
    bg_migration_info_t *list = bg_calloc(MAX_LISTED, sizeof(*list));
    size_t n;
    char err[512];
    int status = 1;
    if (bg_migrate_list(c, list, MAX_LISTED, &n, err, sizeof(err)) != 0) {
        fprintf(stderr, "bgctl migrate status: %s\n", err);
        goto done;
    }
    int pending = 0;
    for (size_t i = 0; i < n && i < MAX_LISTED; i++) {
        printf("%-6s %-24s %s\n", list[i].version, list[i].name,
               list[i].applied ? list[i].applied_at : "pending");
        if (!list[i].applied)
            pending++;
    }
    if (pending == 0) {
        printf("database is up to date (%zu migrations)\n", n);
        status = 0;
    } else {
        printf("%d of %zu migrations pending; run `bgctl migrate`\n", pending, n);
    }
done:
    free(list);
    return status;
}

static int cmd_apply(PGconn *c)
{
    /* Listed first only to name what gets applied; the apply itself re-checks under its lock. */
    bg_migration_info_t *list = bg_calloc(MAX_LISTED, sizeof(*list));
    size_t n = 0;
    char err[512];
    int status = 1;
    if (bg_migrate_list(c, list, MAX_LISTED, &n, err, sizeof(err)) != 0) {
        fprintf(stderr, "bgctl migrate: %s\n", err);
        goto done;
    }
    int applied;
    int rc = bg_migrate_apply(c, &applied, err, sizeof(err));
    int shown = 0;
    for (size_t i = 0; i < n && i < MAX_LISTED && shown < applied; i++) {
        if (!list[i].applied) {
            printf("applied %s\n", list[i].file);
            shown++;
        }
    }
    if (rc != 0) {
        fprintf(stderr, "bgctl migrate: %s\n", err);
        goto done;
    }
    if (applied == 0)
        printf("database is up to date\n");
    else
        printf("applied %d migration%s; database is up to date\n", applied,
               applied == 1 ? "" : "s");
    status = 0;
done:
    free(list);
    return status;
}

int ctl_migrate_main(int argc, char **argv, const bg_config_t *cfg)
{
    bool status_only = false;
    if (argc == 2 && strcmp(argv[1], "status") == 0) {
        status_only = true;
    } else if (argc != 1) {
        fprintf(stderr, "usage: bgctl migrate [status]\n");
        return 2;
    }
    PGconn *c;
    if (connect_db(cfg, &c) != 0)
        return 1;
    int status = status_only ? cmd_status(c) : cmd_apply(c);
    if (!status_only && status == 0) {
        bg_plans_price_report_t rep;
        int rc = bg_plans_apply_price_config(c, cfg, &rep);
        if (rc != 0) {
            fprintf(stderr, "bgctl migrate: cannot apply the Paddle price ids: %s\n",
                    bg_strerror(rc));
            status = 1;
        } else if (rep.applied + rep.kept + rep.failed > 0) {
            printf("Paddle price ids from the environment: %d applied, %d kept off by an admin's "
                   "id, %d refused\n",
                   rep.applied, rep.kept, rep.failed);
            status = rep.failed > 0 ? 1 : 0;
        }
    }
    PQfinish(c);
    return status;
}
