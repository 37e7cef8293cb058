/*
 * bgctl: the operator's command-line tool (migrations, users, dead letters, configuration).
 *
 * It loads the same configuration as the servers (environment, then .env), so it acts on the stores
 * the servers use, and dispatches to one subcommand group.
 */
#include <stdio.h>
#include <string.h>

#include "bg/config.h"
#include "ctl.h"

static const struct {
    const char *name;
    ctl_main_fn fn;
    const char *usage;
} commands[] = {
    {"migrate", ctl_migrate_main,
     "migrate [status]            apply pending migrations, or list them"},
    {"user", ctl_user_main, "user create --email E --password P [--name N] [--admin]"},
    {"dlq", ctl_dlq_main, "dlq list|replay|purge [--role R] [--id ID|--all]   dead-letter jobs"},
    {"config", ctl_config_main,
     "config [check|example]      print the effective configuration, or a .env template"},
    {"quota", ctl_quota_main,
     "quota rebuild (--user ID|--all) | show (--user ID|--email E)   Redis quota state"},
    {"plan", ctl_plan_main, "plan grant (--email E|--user ID) --plan P --days N [--id UUID]"},
    {"telegram", ctl_telegram_main,
     "telegram bind|set-webhook|delete-webhook|webhook-info [--bot ID] …   Telegram bots"},
    {"billing", ctl_billing_main,
     "billing reconcile [--since T]   repair what Paddle's webhooks missed from its API"},
};

static void usage(FILE *out)
{
    fprintf(out, "usage: bgctl <command> [args]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        fprintf(out, "  %s\n", commands[i].usage);
}

int main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0 ||
        strcmp(argv[1], "help") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
        if (strcmp(argv[1], commands[i].name) == 0) {
            bg_config_t cfg;
            bg_config_load_or_exit(&cfg, "bgctl");
            int rc = commands[i].fn(argc - 1, argv + 1, &cfg);
            bg_config_dispose(&cfg);
            return rc;
        }
    }
    fprintf(stderr, "bgctl: unknown command \"%s\"\n\n", argv[1]);
    usage(stderr);
    return 2;
}
