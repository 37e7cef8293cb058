/*
 * bgctl config: prints every configuration variable with its effective value (secrets masked), so an
 * operator can see what the servers will use. Loading already validated everything; "check" only
 * confirms it.
 */
#include <stdio.h>
#include <string.h>

#include "ctl.h"

int ctl_config_main(int argc, char **argv, const bg_config_t *cfg)
{
    if (argc > 1 && strcmp(argv[1], "check") == 0) {
        printf("configuration is valid\n");
        return 0;
    }
    if (argc > 1) {
        fprintf(stderr, "usage: bgctl config [check]\n");
        return 2;
    }
    size_t n;
    const bg_config_var_t *vars = bg_config_vars(&n);
    for (size_t i = 0; i < n; i++) {
        const char *field = (const char *)cfg + vars[i].offset;
        switch (vars[i].type) {
        case BG_CFG_STR:
        case BG_CFG_URL:
        case BG_CFG_LOCALES: {
            const char *v = *(char *const *)(const void *)field;
            if (v == NULL)
                printf("%s=\n", vars[i].name);
            else if (vars[i].flags & BG_CFG_SECRET)
                printf("%s=(set, hidden)\n", vars[i].name);
            else
                printf("%s=%s\n", vars[i].name, v);
            break;
        }
        case BG_CFG_INT:
            printf("%s=%lld\n", vars[i].name, (long long)*(const int64_t *)(const void *)field);
            break;
        case BG_CFG_PORT:
            printf("%s=%d\n", vars[i].name, *(const int *)(const void *)field);
            break;
        case BG_CFG_ENUM: {
            int idx = *(const int *)(const void *)field;
            const char *p = vars[i].choices;
            for (int k = 0; k < idx && p != NULL; k++) {
                p = strchr(p, '|');
                if (p != NULL)
                    p++;
            }
            size_t len = p != NULL ? strcspn(p, "|") : 0;
            printf("%s=%.*s\n", vars[i].name, (int)len, p != NULL ? p : "");
            break;
        }
        }
    }
    return 0;
}
