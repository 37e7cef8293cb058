/*
 * docs/openapi.json against the code: every route of the edge's route tables is documented (same
 * path pattern, lower-case method), nothing documented is missing from the tables, every path
 * parameter of a pattern is declared, and the Error schema's code enum is exactly the API error
 * table of err.c. Adding a route or an error code without documenting it fails here, and so does
 * documenting one that is gone.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "bg/err.h"
#include "bg/json.h"
#include "edge.h"

#define DOC_PATH BGT_SOURCE_DIR "/docs/openapi.json"
#define DOC_MAX_BYTES (4u << 20)

/* The members of a path item that are operations (the others: summary, parameters, servers, …). */
static const char *const http_methods[] = {"get",     "put",  "post",  "delete",
                                           "options", "head", "patch", "trace"};

static bg_json_doc_t *doc;

static void load(void)
{
    FILE *f = fopen(DOC_PATH, "rb");
    cr_assert_not_null(f, "cannot open %s", DOC_PATH);
    char *text = malloc(DOC_MAX_BYTES + 1);
    cr_assert_not_null(text);
    size_t len = fread(text, 1, DOC_MAX_BYTES + 1, f);
    cr_assert_eq(ferror(f), 0, "cannot read %s", DOC_PATH);
    (void)fclose(f);
    cr_assert_leq(len, DOC_MAX_BYTES, "%s is larger than %u bytes", DOC_PATH, DOC_MAX_BYTES);

    const bg_json_limits_t limits = {.max_bytes = DOC_MAX_BYTES,
                                     .max_depth = 64,
                                     .max_string = 64 * 1024,
                                     .max_members = 10000,
                                     .max_values = 1000000};
    const char *desc = "";
    size_t off = 0;
    int r = bg_json_parse(text, len, &limits, &doc, &desc, &off);
    free(text);
    cr_assert_eq(r, 0, "%s: %s at byte %zu", DOC_PATH, desc, off);
    cr_assert(bg_json_is_object(bg_json_root(doc)), "%s is not a JSON object", DOC_PATH);
}

static void unload(void)
{
    bg_json_doc_free(doc);
    doc = NULL;
}

TestSuite(openapi, .init = load, .fini = unload);

/* Follows keys (NULL-terminated) from the root; fails the test when one is missing. */
static const bg_json_t *at(const char *const keys[])
{
    const bg_json_t *v = bg_json_root(doc);
    for (size_t i = 0; keys[i] != NULL; i++) {
        v = bg_json_find(v, keys[i]);
        cr_assert_not_null(v, "the document has no member \"%s\" (step %zu)", keys[i], i);
    }
    return v;
}

static const bg_json_t *paths(void)
{
    const bg_json_t *p = at((const char *const[]){"paths", NULL});
    cr_assert(bg_json_is_object(p), "paths is not an object");
    return p;
}

static void lower(const char *s, char *out, size_t outlen)
{
    size_t i = 0;
    for (; s[i] != '\0' && i + 1 < outlen; i++)
        out[i] = (s[i] >= 'A' && s[i] <= 'Z') ? (char)(s[i] - 'A' + 'a') : s[i];
    out[i] = '\0';
}

static bool is_http_method(const char *key)
{
    for (size_t i = 0; i < BG_ARRAY_SIZE(http_methods); i++) {
        if (strcmp(key, http_methods[i]) == 0)
            return true;
    }
    return false;
}

/* The route with this pattern and (lower-case) method, or NULL. */
static const edge_route_t *find_route(const char *pattern, const char *method)
{
    for (size_t t = 0; edge_route_tables[t] != NULL; t++) {
        for (const edge_route_t *r = edge_route_tables[t]; r->pattern != NULL; r++) {
            char m[16];
            lower(r->method, m, sizeof(m));
            if (strcmp(r->pattern, pattern) == 0 && strcmp(m, method) == 0)
                return r;
        }
    }
    return NULL;
}

/* Resolves a local "#/components/parameters/<name>" reference; other values are returned as is. */
static const bg_json_t *resolve(const bg_json_t *v)
{
    static const char prefix[] = "#/components/parameters/";
    const char *ref = bg_json_str(bg_json_find(v, "$ref"), NULL);
    if (ref == NULL)
        return v;
    cr_assert_eq(strncmp(ref, prefix, sizeof(prefix) - 1), 0, "unexpected $ref %s", ref);
    const bg_json_t *p =
        at((const char *const[]){"components", "parameters", ref + sizeof(prefix) - 1, NULL});
    return p;
}

/* True when operation op declares path parameter name (inline or through a reference). */
static bool declares_path_param(const bg_json_t *op, const char *name, size_t name_len)
{
    const bg_json_t *params = bg_json_find(op, "parameters");
    for (size_t i = 0; i < bg_json_len(params); i++) {
        const bg_json_t *p = resolve(bg_json_at(params, i));
        const char *in = bg_json_str(bg_json_find(p, "in"), NULL);
        size_t len = 0;
        const char *n = bg_json_str(bg_json_find(p, "name"), &len);
        bool required = false;
        if (in != NULL && strcmp(in, "path") == 0 && n != NULL && len == name_len &&
            memcmp(n, name, len) == 0 && bg_json_bool(bg_json_find(p, "required"), &required))
            return required;
    }
    return false;
}

Test(openapi, document_header)
{
    const char *v = bg_json_str(at((const char *const[]){"openapi", NULL}), NULL);
    cr_assert_not_null(v);
    cr_expect_eq(strncmp(v, "3.1.", 4), 0, "openapi is %s, expected 3.1.x", v);
    v = bg_json_str(at((const char *const[]){"info", "version", NULL}), NULL);
    cr_expect_str_eq(v != NULL ? v : "", "0.1.0");
    const bg_json_t *servers = at((const char *const[]){"servers", NULL});
    cr_assert(bg_json_len(servers) > 0, "no servers");
    v = bg_json_str(bg_json_find(bg_json_at(servers, 0), "url"), NULL);
    cr_expect_str_eq(v != NULL ? v : "", "http://127.0.0.1:8080");
    at((const char *const[]){"components", "securitySchemes", "bearerAuth", NULL});
    at((const char *const[]){"components", "securitySchemes", "cookieAuth", NULL});
}

Test(openapi, every_route_is_documented)
{
    const bg_json_t *p = paths();
    size_t routes = 0, missing = 0;
    for (size_t t = 0; edge_route_tables[t] != NULL; t++) {
        for (const edge_route_t *r = edge_route_tables[t]; r->pattern != NULL; r++) {
            char m[16];
            lower(r->method, m, sizeof(m));
            routes++;
            const bg_json_t *item = bg_json_find(p, r->pattern);
            const bg_json_t *op = bg_json_find(item, m);
            cr_expect(bg_json_is_object(op), "%s %s is not in docs/openapi.json", r->method,
                      r->pattern);
            if (!bg_json_is_object(op)) {
                missing++;
                continue;
            }
            /* every {param} of the pattern is a declared, required path parameter */
            for (const char *b = strchr(r->pattern, '{'); b != NULL; b = strchr(b + 1, '{')) {
                const char *e = strchr(b, '}');
                cr_assert_not_null(e, "unterminated parameter in %s", r->pattern);
                cr_expect(declares_path_param(op, b + 1, (size_t)(e - b - 1)),
                          "%s %s: path parameter %.*s is not declared (in: path, required)",
                          r->method, r->pattern, (int)(e - b - 1), b + 1);
            }
        }
    }
    cr_assert_gt(routes, 0, "the route tables are empty");
    cr_assert_eq(missing, 0, "%zu of %zu routes are not documented", missing, routes);
}

Test(openapi, every_documented_operation_is_routed)
{
    const bg_json_t *p = paths();
    size_t stale = 0, ops = 0;
    for (size_t i = 0; i < bg_json_len(p); i++) {
        const char *path;
        const bg_json_t *item = bg_json_member(p, i, &path);
        cr_assert(bg_json_is_object(item), "paths[%s] is not an object", path);
        for (size_t k = 0; k < bg_json_len(item); k++) {
            const char *key;
            (void)bg_json_member(item, k, &key);
            if (!is_http_method(key))
                continue;
            ops++;
            bool routed = find_route(path, key) != NULL;
            cr_expect(routed, "docs/openapi.json documents %s %s, which no route table has", key,
                      path);
            if (!routed)
                stale++;
        }
    }
    cr_assert_gt(ops, 0, "the document has no operations");
    cr_assert_eq(stale, 0, "%zu documented operation(s) are not routed", stale);
}

Test(openapi, error_codes_match_the_api_error_table)
{
    const bg_json_t *codes =
        at((const char *const[]){"components", "schemas", "Error", "properties", "error",
                                 "properties", "code", "enum", NULL});
    cr_assert(bg_json_is_array(codes), "the Error schema's code has no enum array");
    size_t n;
    const bg_api_error_t *table = bg_api_error_table(&n);

    for (size_t i = 0; i < bg_json_len(codes); i++) {
        const char *code = bg_json_str(bg_json_at(codes, i), NULL);
        cr_assert_not_null(code, "enum item %zu is not a string", i);
        cr_expect_not_null(bg_api_error_find(code),
                           "docs/openapi.json lists error code %s, which err.c does not have",
                           code);
        for (size_t j = 0; j < i; j++) {
            const char *other = bg_json_str(bg_json_at(codes, j), NULL);
            cr_expect_str_neq(code, other, "error code %s is listed twice", code);
        }
    }
    for (size_t i = 0; i < n; i++) {
        bool listed = false;
        for (size_t j = 0; j < bg_json_len(codes) && !listed; j++) {
            const char *code = bg_json_str(bg_json_at(codes, j), NULL);
            listed = code != NULL && strcmp(code, table[i].code) == 0;
        }
        cr_expect(listed, "error code %s (err.c) is missing from the Error schema's enum",
                  table[i].code);
    }
    cr_expect_eq(bg_json_len(codes), n, "the enum has %zu codes, err.c %zu", bg_json_len(codes), n);
}
