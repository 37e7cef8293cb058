/* Placeholder until this subcommand group lands. */
#include <stdio.h>

#include "ctl.h"

int ctl_migrate_main(int argc, char **argv, const bg_config_t *cfg)
{
    (void)argc;
    (void)argv;
    (void)cfg;
    fprintf(stderr, "bgctl: not available yet\n");
    return 1;
}
