/*
 * The registry of worker roles: what `bg-worker --roles` can name.
 *
 * Each role is one line of the table in roles.c (name, handler, init, dispose, thread_dispose; see
 * wk_role_t in runtime.h). The handlers of llm, telegram, usage and billing land there as they are
 * written; until then the table is empty and bg-worker serves health and metrics only.
 */
#ifndef WK_ROLES_H
#define WK_ROLES_H

#include "runtime.h"

/** Returns the registered roles (static, in table order) and their number through *count. */
const wk_role_t *wk_roles_all(size_t *count);

/** Returns the registered role called name, or NULL. */
const wk_role_t *wk_roles_find(const char *name);

#endif
