/*
 * Route matching.
 *
 * Route tables are small and static, so matching is a linear scan comparing segment by segment; a
 * "{name}" segment matches any one non-empty segment and is captured. A path that matches some
 * route under another method is reported so the caller can answer 405 instead of 404. The web
 * client's table (routes_web.c) is tried only when no API route knows the path.
 */
#include <string.h>

#include "edge.h"

const edge_route_t *const edge_route_tables[] = {
    edge_routes_ops,
    edge_routes_auth,
    edge_routes_orgs,
    edge_routes_admin,
    edge_routes_billing,
    edge_routes_policies,
    edge_routes_plans,
    edge_routes_chat,
    edge_routes_stream,
    edge_routes_openai,
    edge_routes_agents,
    edge_routes_telegram,
    edge_routes_checkout,
    edge_routes_paddle,
    edge_routes_usage,
    edge_routes_admin_stats,
    /* one per line: a comment here stops clang-format packing the list into columns */
    edge_routes_admin_logs,
    edge_routes_link,
    edge_routes_notify,
    NULL,
};

/* Matches path against pattern; on success fills params. */
static bool match(const char *pattern, const char *path, size_t path_len, h2o_iovec_t *params,
                  size_t *nparams)
{
    const char *p = pattern;
    size_t i = 0, n = 0;
    while (*p != '\0' && i < path_len) {
        if (*p == '{') {
            const char *close = strchr(p, '}');
            size_t start = i;
            while (i < path_len && path[i] != '/')
                i++;
            if (i == start || n == EDGE_MAX_PARAMS || close == NULL)
                return false;
            params[n++] = h2o_iovec_init(path + start, i - start);
            p = close + 1;
            continue;
        }
        if (*p != path[i])
            return false;
        p++;
        i++;
    }
    if (*p != '\0' || i != path_len)
        return false;
    *nparams = n;
    return true;
}

/* Scans one table: the route, or NULL (*method_mismatch set when only the method differs). */
static const edge_route_t *match_table(const edge_route_t *table, const char *method,
                                       size_t method_len, const char *path, size_t path_len,
                                       h2o_iovec_t *params, size_t *nparams, bool *method_mismatch)
{
    for (const edge_route_t *r = table; r->pattern != NULL; r++) {
        h2o_iovec_t tmp[EDGE_MAX_PARAMS];
        size_t ntmp = 0;
        if (!match(r->pattern, path, path_len, tmp, &ntmp))
            continue;
        bool same_method =
            strlen(r->method) == method_len && memcmp(r->method, method, method_len) == 0;
        /* HEAD is answered by GET routes (h2o drops the body) */
        if (!same_method && method_len == 4 && memcmp(method, "HEAD", 4) == 0 &&
            strcmp(r->method, "GET") == 0)
            same_method = true;
        if (!same_method) {
            *method_mismatch = true;
            continue;
        }
        memcpy(params, tmp, sizeof(tmp[0]) * ntmp);
        *nparams = ntmp;
        return r;
    }
    return NULL;
}

const edge_route_t *edge_router_match(const char *method, size_t method_len, const char *path,
                                      size_t path_len, h2o_iovec_t *params, size_t *nparams,
                                      bool *method_mismatch)
{
    *method_mismatch = false;
    /* "/x/" and "/x" name the same resource */
    if (path_len > 1 && path[path_len - 1] == '/')
        path_len--;
    for (size_t t = 0; edge_route_tables[t] != NULL; t++) {
        const edge_route_t *r = match_table(edge_route_tables[t], method, method_len, path,
                                            path_len, params, nparams, method_mismatch);
        if (r != NULL)
            return r;
    }
    /* the web client last, so that it can never shadow an API route */
    if (*method_mismatch)
        return NULL;
    return match_table(edge_routes_web, method, method_len, path, path_len, params, nparams,
                       method_mismatch);
}
