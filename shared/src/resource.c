/*
 * Lookup in the table of embedded files generated at build time (sorted by name).
 */
#include <string.h>

#include "bg/resource.h"

extern const bg_resource_t bg__resources[];
extern const unsigned bg__resources_count;

const bg_resource_t *bg_resource_find(const char *name)
{
    size_t lo = 0, hi = bg__resources_count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(bg__resources[mid].name, name);
        if (c == 0)
            return &bg__resources[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

const bg_resource_t *bg_resource_list(const char *prefix, size_t *count)
{
    size_t plen = strlen(prefix);
    size_t first = bg__resources_count, n = 0;
    for (size_t i = 0; i < bg__resources_count; i++) {
        if (strncmp(bg__resources[i].name, prefix, plen) == 0) {
            if (first == bg__resources_count)
                first = i;
            n++;
        }
    }
    *count = n;
    return n == 0 ? bg__resources : &bg__resources[first];
}
