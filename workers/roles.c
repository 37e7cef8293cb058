/*
 * The role table. Adding a role is adding its line here (and its files under workers/).
 */
#include <string.h>

#include "role_billing.h"
#include "role_llm.h"
#include "role_notify.h"
#include "role_telegram.h"
#include "role_usage.h"
#include "roles.h"

/* clang-format off */
static const wk_role_t registry[] = {
    {"llm", wk_llm_handle, wk_llm_init, wk_llm_dispose, wk_llm_thread_dispose, wk_llm_thread_warm},
    {"telegram", wk_telegram_handle, wk_telegram_init, wk_telegram_dispose,
     wk_telegram_thread_dispose, NULL},
    {"usage", wk_usage_handle, wk_usage_init, wk_usage_dispose, wk_usage_thread_dispose, NULL},
    {"billing", wk_billing_handle, wk_billing_init, wk_billing_dispose, NULL, NULL},
    {"notify", wk_notify_handle, wk_notify_init, wk_notify_dispose, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL, NULL} /* end of table */
};
/* clang-format on */

const wk_role_t *wk_roles_all(size_t *count)
{
    *count = BG_ARRAY_SIZE(registry) - 1;
    return registry;
}

const wk_role_t *wk_roles_find(const char *name)
{
    for (size_t i = 0; registry[i].name != NULL; i++) {
        if (strcmp(registry[i].name, name) == 0)
            return &registry[i];
    }
    return NULL;
}
