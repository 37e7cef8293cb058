/*
 * The web client: the files of web/ (and the message catalogues of locales/), compiled into the
 * binary like the migrations, served as a single-page application.
 *
 * Caching follows the usual split. The HTML page is small and names everything else, so it is
 * revalidated on every load (Cache-Control: no-cache with a strong ETag: a 304 costs one round
 * trip). Everything else lives under /assets/<build>/, where <build> is a hash of the contents of
 * every web file and catalogue: a change to any of them gives a new page naming new URLs, so the
 * assets themselves can be cached for a year as immutable. One hash for the whole set (rather than
 * one per file) keeps the JavaScript modules' relative imports working without a bundler. A
 * request for another build's assets is a 404: its URLs would otherwise be cached for a year with
 * content they did not name.
 *
 * The page is built once per process (the first request builds it under pthread_once): the
 * placeholder {{ASSETS}} in web/index.html becomes /assets/<build>. The HTML carries a strict
 * Content Security Policy: scripts, styles and connections from this origin only, no inline code,
 * no framing.
 *
 * The client routes (/chat, /login, …) answer with the same page, so a reload or a shared link
 * opens the right view. These routes live in edge_routes_web, which the router consults only when
 * no API route matches (router.c), so the client can never shadow the API; they are not part of the
 * API contract (docs/openapi.json, the authorization matrix), which is why they are not in
 * edge_route_tables.
 */
#include <pthread.h>
#include <string.h>

#include <sodium.h>

#include "bg/log.h"
#include "bg/resource.h"
#include "edge.h"

#define BUILD_HASH_BYTES 8
#define MAX_ASSETS 64

static const char csp[] = "default-src 'self'; script-src 'self'; style-src 'self'; "
                          "connect-src 'self'; img-src 'self' data:; font-src 'self'; "
                          "object-src 'none'; frame-ancestors 'none'; base-uri 'none'; "
                          "form-action 'self'";

typedef struct st_asset {
    const char *name; /**< the name under /assets/<build>/ (borrowed: static) */
    const char *data; /**< borrowed: the embedded resource */
    size_t len;
    const char *content_type; /**< static string */
    char etag[40];            /**< quoted */
} asset_t;

/* Built once (pthread_once), read-only afterwards. */
static struct {
    char build[BUILD_HASH_BYTES * 2 + 1];
    char *index; /**< owned: web/index.html with the asset prefix filled in */
    size_t index_len;
    char index_etag[40];
    asset_t assets[MAX_ASSETS];
    size_t nassets;
} site;
static pthread_once_t site_once = PTHREAD_ONCE_INIT;

static const char *content_type_of(const char *name)
{
    static const struct {
        const char *ext;
        const char *type;
    } types[] = {
        {".js", "text/javascript; charset=utf-8"},
        {".mjs", "text/javascript; charset=utf-8"},
        {".css", "text/css; charset=utf-8"},
        {".json", "application/json; charset=utf-8"},
        {".svg", "image/svg+xml"},
        {".png", "image/png"},
        {".html", "text/html; charset=utf-8"},
        {".webmanifest", "application/manifest+json"},
    };
    const char *dot = strrchr(name, '.');
    if (dot == NULL)
        return "application/octet-stream";
    for (size_t i = 0; i < BG_ARRAY_SIZE(types); i++) {
        if (strcmp(dot, types[i].ext) == 0)
            return types[i].type;
    }
    return "application/octet-stream";
}

/* A strong ETag: the quoted hex of a 16-byte BLAKE2b hash of the bytes. */
static void etag_of(const char *data, size_t len, char *out, size_t outlen)
{
    unsigned char h[16];
    char hex[33];
    (void)crypto_generichash(h, sizeof(h), (const unsigned char *)data, len, NULL, 0);
    (void)sodium_bin2hex(hex, sizeof(hex), h, sizeof(h));
    snprintf(out, outlen, "\"%s\"", hex);
}

static void add_asset(const char *name, const bg_resource_t *r)
{
    if (site.nassets == MAX_ASSETS) {
        bg_error("web: more than %d assets; %s is not served", MAX_ASSETS, name);
        return;
    }
    asset_t *a = &site.assets[site.nassets++];
    a->name = name;
    a->data = r->data;
    a->len = r->len;
    a->content_type = content_type_of(name);
    etag_of(r->data, r->len, a->etag, sizeof(a->etag));
}

/* Fills {{ASSETS}} in the page with the asset prefix (every occurrence). */
static void build_index(const bg_resource_t *page)
{
    static const char mark[] = "{{ASSETS}}";
    char prefix[64];
    int plen = snprintf(prefix, sizeof(prefix), "/assets/%s", site.build);
    size_t count = 0;
    for (const char *p = strstr(page->data, mark); p != NULL; p = strstr(p + 1, mark))
        count++;
    size_t cap = page->len + count * (size_t)plen + 1;
    site.index = bg_malloc(cap);
    size_t n = 0;
    const char *src = page->data;
    for (const char *p = strstr(src, mark); p != NULL; p = strstr(src, mark)) {
        memcpy(site.index + n, src, (size_t)(p - src));
        n += (size_t)(p - src);
        memcpy(site.index + n, prefix, (size_t)plen);
        n += (size_t)plen;
        src = p + sizeof(mark) - 1;
    }
    size_t rest = page->len - (size_t)(src - page->data);
    memcpy(site.index + n, src, rest);
    n += rest;
    site.index[n] = '\0';
    site.index_len = n;
    etag_of(site.index, n, site.index_etag, sizeof(site.index_etag));
}

static void build_site(void)
{
    size_t nweb = 0, nloc = 0;
    const bg_resource_t *web = bg_resource_list("web/", &nweb);
    const bg_resource_t *loc = bg_resource_list("locales/", &nloc);

    /* the build hash covers every name and byte the page can reach */
    crypto_generichash_state st;
    (void)crypto_generichash_init(&st, NULL, 0, BUILD_HASH_BYTES);
    const bg_resource_t *groups[] = {web, loc};
    const size_t counts[] = {nweb, nloc};
    for (size_t g = 0; g < 2; g++) {
        for (size_t i = 0; i < counts[g]; i++) {
            const bg_resource_t *r = &groups[g][i];
            (void)crypto_generichash_update(&st, (const unsigned char *)r->name,
                                            strlen(r->name) + 1);
            (void)crypto_generichash_update(&st, (const unsigned char *)r->data, r->len);
        }
    }
    unsigned char h[BUILD_HASH_BYTES];
    (void)crypto_generichash_final(&st, h, sizeof(h));
    (void)sodium_bin2hex(site.build, sizeof(site.build), h, sizeof(h));

    const bg_resource_t *page = NULL;
    for (size_t i = 0; i < nweb; i++) {
        const char *name = web[i].name + strlen("web/");
        if (strcmp(name, "index.html") == 0)
            page = &web[i];
        else if (strchr(name, '/') == NULL)
            add_asset(name, &web[i]);
    }
    /* the catalogues as i18n.<locale>.json: the client's strings are its web.* keys */
    static char loc_names[8][32];
    for (size_t i = 0; i < nloc && i < BG_ARRAY_SIZE(loc_names); i++) {
        const char *base = loc[i].name + strlen("locales/");
        snprintf(loc_names[i], sizeof(loc_names[i]), "i18n.%s", base);
        add_asset(loc_names[i], &loc[i]);
    }
    if (page == NULL) {
        static const bg_resource_t missing = {"web/index.html",
                                              "<!doctype html><title>bot-generic</title>", 40};
        bg_error("web: web/index.html is not embedded; the web client is not available");
        page = &missing;
    }
    build_index(page);
}

/* True when the request's If-None-Match names etag (or is "*"). */
static bool not_modified(edge_req_t *er, const char *etag)
{
    h2o_iovec_t inm = edge_req_header(er, "if-none-match");
    if (inm.len == 0)
        return false;
    size_t elen = strlen(etag);
    for (size_t i = 0; i < inm.len;) {
        while (i < inm.len && (inm.base[i] == ' ' || inm.base[i] == ','))
            i++;
        size_t start = i;
        while (i < inm.len && inm.base[i] != ',')
            i++;
        size_t end = i;
        while (end > start && inm.base[end - 1] == ' ')
            end--;
        const char *tag = inm.base + start;
        size_t tlen = end - start;
        if (tlen >= 2 && memcmp(tag, "W/", 2) == 0) {
            tag += 2;
            tlen -= 2;
        }
        if ((tlen == 1 && tag[0] == '*') || (tlen == elen && memcmp(tag, etag, elen) == 0))
            return true;
    }
    return false;
}

static void send_file(edge_req_t *er, const char *data, size_t len, const char *type,
                      const char *etag, const char *cache_control, bool html)
{
    edge_add_header(er, "etag", etag);
    edge_add_header(er, "cache-control", cache_control);
    if (html) {
        edge_add_header(er, "content-security-policy", csp);
        edge_add_header(er, "referrer-policy", "same-origin");
        edge_add_header(er, "x-frame-options", "DENY");
    }
    if (not_modified(er, etag)) {
        edge_respond(er, 304, NULL, NULL, 0);
        return;
    }
    edge_respond(er, 200, type, data, len);
}

static void page(edge_req_t *er)
{
    (void)pthread_once(&site_once, build_site);
    send_file(er, site.index, site.index_len, "text/html; charset=utf-8", site.index_etag,
              "no-cache", true);
}

static void asset(edge_req_t *er)
{
    (void)pthread_once(&site_once, build_site);
    h2o_iovec_t build = er->params[0], file = er->params[1];
    if (build.len == strlen(site.build) && memcmp(build.base, site.build, build.len) == 0) {
        for (size_t i = 0; i < site.nassets; i++) {
            const asset_t *a = &site.assets[i];
            if (strlen(a->name) == file.len && memcmp(a->name, file.base, file.len) == 0) {
                send_file(er, a->data, a->len, a->content_type, a->etag,
                          "public, max-age=31536000, immutable", false);
                return;
            }
        }
    }
    edge_error(er, "not_found", NULL, NULL, 0);
}

const edge_route_t edge_routes_web[] = {
    {"GET", "/", "web", page, 0, 0, EDGE_PUBLIC},
    {"GET", "/login", "web", page, 0, 0, EDGE_PUBLIC},
    {"GET", "/register", "web", page, 0, 0, EDGE_PUBLIC},
    {"GET", "/chat", "web", page, 0, 0, EDGE_PUBLIC},
    {"GET", "/profile", "web", page, 0, 0, EDGE_PUBLIC},
    {"GET", "/plans", "web", page, 0, 0, EDGE_PUBLIC},
    {"GET", "/keys", "web", page, 0, 0, EDGE_PUBLIC},
    {"GET", "/admin", "web", page, 0, 0, EDGE_PUBLIC},
    {"GET", "/assets/{build}/{file}", "web_asset", asset, 0, 0, EDGE_PUBLIC},
    {NULL, NULL, NULL, NULL, 0, 0, EDGE_PUBLIC},
};
