/*
 * The web client as the edge serves it (edge/routes_web.c, edge/router.c), without a server: the
 * client's routes never shadow an API route, and everything the page needs is compiled in — every
 * file web/index.html names and every module a module imports is an embedded resource (a missing
 * one is a blank page for the user, and no browser test would say which file is missing).
 */
#include <stdio.h>
#include <string.h>

#include <criterion/criterion.h>

#include "bg/resource.h"
#include "edge.h"

static bool is_web_route(const edge_route_t *r)
{
    for (const edge_route_t *w = edge_routes_web; w->pattern != NULL; w++) {
        if (w == r)
            return true;
    }
    return false;
}

/* A concrete path for a pattern: every {param} becomes "p1". */
static void concrete(const char *pattern, char *out, size_t outlen)
{
    size_t n = 0;
    for (const char *p = pattern; *p != '\0' && n + 3 < outlen; p++) {
        if (*p == '{') {
            const char *close = strchr(p, '}');
            cr_assert_not_null(close, "unterminated parameter in %s", pattern);
            memcpy(out + n, "p1", 2);
            n += 2;
            p = close;
        } else {
            out[n++] = *p;
        }
    }
    out[n] = '\0';
}

static const edge_route_t *route_for(const char *method, const char *path, bool *mismatch)
{
    h2o_iovec_t params[EDGE_MAX_PARAMS];
    size_t nparams = 0;
    return edge_router_match(method, strlen(method), path, strlen(path), params, &nparams,
                             mismatch);
}

Test(web, api_routes_are_never_shadowed)
{
    size_t checked = 0;
    for (size_t t = 0; edge_route_tables[t] != NULL; t++) {
        for (const edge_route_t *r = edge_route_tables[t]; r->pattern != NULL; r++) {
            char path[256];
            bool mismatch;
            concrete(r->pattern, path, sizeof(path));
            const edge_route_t *got = route_for(r->method, path, &mismatch);
            cr_assert_not_null(got, "%s %s matches nothing", r->method, path);
            cr_expect(!is_web_route(got), "%s %s is answered by the web client", r->method, path);
            checked++;
        }
    }
    cr_assert_gt(checked, 10);
}

Test(web, client_routes_and_assets_are_matched_last)
{
    bool mismatch;
    const char *pages[] = {"/",        "/login", "/register", "/chat",
                           "/profile", "/plans", "/keys",     "/admin"};
    for (size_t i = 0; i < BG_ARRAY_SIZE(pages); i++) {
        const edge_route_t *r = route_for("GET", pages[i], &mismatch);
        cr_assert_not_null(r, "GET %s", pages[i]);
        cr_expect_str_eq(r->name, "web", "GET %s", pages[i]);
        cr_expect_not_null(route_for("HEAD", pages[i], &mismatch), "HEAD %s", pages[i]);
    }
    const edge_route_t *r = route_for("GET", "/assets/0123abcd/app.js", &mismatch);
    cr_assert_not_null(r);
    cr_expect_str_eq(r->name, "web_asset");

    /* the client's paths are read-only; paths the client does not know stay 404 */
    cr_expect_null(route_for("POST", "/chat", &mismatch));
    cr_expect(mismatch, "POST /chat is a 405, not a 404");
    cr_expect_null(route_for("GET", "/assets/app.js", &mismatch));
    cr_expect(!mismatch);
    cr_expect_null(route_for("GET", "/assets/a/b/c.js", &mismatch));
    cr_expect_null(route_for("GET", "/chat/nonexistent", &mismatch));
    cr_expect(!mismatch);
    /* an API path under a client path is the API's */
    r = route_for("GET", "/chat/conversations", &mismatch);
    cr_assert_not_null(r);
    cr_expect(!is_web_route(r));
}

/* True when "web/<name>" (name of len bytes) is embedded. */
static bool embedded(const char *name, size_t len)
{
    char full[128];
    snprintf(full, sizeof(full), "web/%.*s", (int)len, name);
    return bg_resource_find(full) != NULL;
}

Test(web, the_page_names_only_embedded_files)
{
    const bg_resource_t *page = bg_resource_find("web/index.html");
    cr_assert_not_null(page, "web/index.html is not embedded");
    static const char mark[] = "{{ASSETS}}/";
    size_t n = 0;
    for (const char *p = strstr(page->data, mark); p != NULL; p = strstr(p + 1, mark)) {
        const char *name = p + sizeof(mark) - 1;
        size_t len = strcspn(name, "\"' >");
        cr_expect(embedded(name, len), "index.html names %.*s, which is not embedded", (int)len,
                  name);
        n++;
    }
    cr_expect_geq(n, 2, "the page loads its script and style sheet from the assets");
    cr_expect_null(strstr(page->data, "<script>"), "no inline script (the CSP forbids it)");
    cr_expect_null(strstr(page->data, "style=\""), "no inline style (the CSP forbids it)");
}

Test(web, every_imported_module_is_embedded)
{
    size_t count = 0, imports = 0;
    const bg_resource_t *files = bg_resource_list("web/", &count);
    cr_assert_gt(count, 0);
    for (size_t i = 0; i < count; i++) {
        const char *name = files[i].name;
        size_t nl = strlen(name);
        if (nl < 3 || strcmp(name + nl - 3, ".js") != 0)
            continue;
        static const char from[] = "from './";
        for (const char *p = strstr(files[i].data, from); p != NULL; p = strstr(p + 1, from)) {
            const char *target = p + sizeof(from) - 1;
            size_t len = strcspn(target, "'");
            cr_expect(embedded(target, len), "%s imports ./%.*s, which is not embedded", name,
                      (int)len, target);
            imports++;
        }
    }
    cr_expect_gt(imports, 3);
}
