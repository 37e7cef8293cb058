/*
 * bgctl subcommands. Each lives in its own ctl_<group>.c and is dispatched by bgctl.c.
 *
 * A subcommand receives the arguments after its group name (argv[0] is the group name) and the
 * loaded configuration, prints what it did to stdout and problems to stderr, and returns the
 * process exit status: 0 success, 1 failure, 2 usage error.
 */
#ifndef WK_CTL_H
#define WK_CTL_H

#include "bg/config.h"

typedef int (*ctl_main_fn)(int argc, char **argv, const bg_config_t *cfg);

/** bgctl migrate [status] */
int ctl_migrate_main(int argc, char **argv, const bg_config_t *cfg);
/** bgctl user create --email E --password P [--name N] [--admin] */
int ctl_user_main(int argc, char **argv, const bg_config_t *cfg);
/** bgctl dlq list|replay|purge [--role R] [--id ID|--all] */
int ctl_dlq_main(int argc, char **argv, const bg_config_t *cfg);
/** bgctl config [check] */
int ctl_config_main(int argc, char **argv, const bg_config_t *cfg);
/** bgctl quota rebuild (--user ID|--all) | show (--user ID|--email E) */
int ctl_quota_main(int argc, char **argv, const bg_config_t *cfg);
/** bgctl plan grant (--email E|--user ID) --plan P --days N [--id UUID] */
int ctl_plan_main(int argc, char **argv, const bg_config_t *cfg);
/** bgctl telegram bind|set-webhook|delete-webhook|webhook-info (ctl_telegram.c) */
int ctl_telegram_main(int argc, char **argv, const bg_config_t *cfg);
/** bgctl billing reconcile [--since T] (ctl_billing.c) */
int ctl_billing_main(int argc, char **argv, const bg_config_t *cfg);

#endif
