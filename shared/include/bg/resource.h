/*
 * Files compiled into the binaries: migrations/, lua/ and locales/.
 *
 * Embedding them means a deployed binary always carries the migrations, scripts and catalogues it
 * was built and tested with; there is no search path to get wrong. The build generates the table
 * from the source tree (scripts/embed.cmake), sorted by name.
 */
#ifndef BG_RESOURCE_H
#define BG_RESOURCE_H

#include "bg/common.h"

typedef struct bg_resource {
    const char *name; /**< path relative to the source root, e.g. "migrations/0001_core.sql" */
    const char *data; /**< contents, NUL-terminated (the NUL is not counted in len) */
    size_t len;
    const char
        *sha1; /**< the contents' SHA-1 in 40 lower-case hex digits (a script's Redis name) */
} bg_resource_t;

/** Returns the resource with this exact name, or NULL. */
const bg_resource_t *bg_resource_find(const char *name);

/**
 * Returns the resources whose names start with prefix, in name order, through *count; the pointer
 * points into the sorted table (borrowed, static).
 */
const bg_resource_t *bg_resource_list(const char *prefix, size_t *count);

#endif
