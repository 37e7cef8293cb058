/*
 * Message catalogues and locale negotiation.
 *
 * Each supported locale's catalogue is parsed from the embedded locales/<locale>.json with the JSON
 * module (its limits guard against a broken file as they guard against a hostile body) and indexed
 * by a sorted array of keys; lookups are binary searches into memory that is constant after init,
 * which is why nothing but the "warn once" set needs a lock.
 *
 * Accept-Language is read as RFC 9110 describes it: comma-separated language ranges with optional
 * q-values. At most 32 ranges are considered, which is more than any browser sends; the header is
 * client input, so no part of it is trusted to be short or well-formed.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "bg/err.h"
#include "bg/i18n.h"
#include "bg/json.h"
#include "bg/log.h"
#include "bg/resource.h"

#define TAG_MAX 16
#define MAX_LOCALES 64
#define MAX_RANGES 32
#define WARN_SLOTS 256

typedef struct st_entry_t {
    const char *key;  /**< borrowed from the catalogue's document */
    const char *text; /**< borrowed from the catalogue's document */
} entry_t;

typedef struct st_catalogue_t {
    char tag[TAG_MAX];
    bg_json_doc_t *doc; /**< owned */
    entry_t *entries;   /**< owned, sorted by key */
    size_t n;
} catalogue_t;

static catalogue_t *catalogues; /* owned, ncatalogues, in configured order */
static size_t ncatalogues;
static size_t default_index;
static char *supported_list; /* owned, normalised csv */

static pthread_mutex_t warn_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t warned[WARN_SLOTS];
static size_t nwarned;

/* Returns true the first time it sees (what, a, b), so each problem is logged once; after
 * WARN_SLOTS distinct problems it stops logging rather than grow. */
static bool first_time(const char *what, const char *a, const char *b)
{
    uint64_t h = 1469598103934665603ULL;
    const char *parts[] = {what, a != NULL ? a : "", b != NULL ? b : ""};
    for (size_t i = 0; i < BG_ARRAY_SIZE(parts); i++) {
        const unsigned char *s = (const unsigned char *)parts[i];
        do {
            h ^= *s;
            h *= 1099511628211ULL;
        } while (*s++ != '\0');
    }
    bool first = true;
    pthread_mutex_lock(&warn_lock);
    for (size_t i = 0; i < nwarned && first; i++)
        first = warned[i] != h;
    if (first && nwarned < WARN_SLOTS)
        warned[nwarned++] = h;
    else
        first = false;
    pthread_mutex_unlock(&warn_lock);
    return first;
}

static int entry_cmp(const void *a, const void *b)
{
    return strcmp(((const entry_t *)a)->key, ((const entry_t *)b)->key);
}

/* A locale tag: 2–3 letters, then subtags of 1–8 letters or digits after '-'. */
static bool valid_tag(const char *s, size_t len)
{
    size_t i = 0;
    while (i < len && ((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z')))
        i++;
    if (i < 2 || i > 3 || len >= TAG_MAX)
        return false;
    while (i < len) {
        if (s[i++] != '-')
            return false;
        size_t start = i;
        while (i < len && ((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') ||
                           (s[i] >= '0' && s[i] <= '9')))
            i++;
        if (i == start || i - start > 8)
            return false;
    }
    return true;
}

static void catalogue_dispose(catalogue_t *c)
{
    free(c->entries);
    bg_json_doc_free(c->doc);
    memset(c, 0, sizeof(*c));
}

static int catalogue_load(catalogue_t *c, const char *tag, const char *text, size_t len, char *err,
                          size_t errlen)
{
    const char *desc = NULL;
    size_t offset = 0;
    bg_strlcpy(c->tag, tag, sizeof(c->tag));
    if (bg_json_parse(text, len, NULL, &c->doc, &desc, &offset) != 0) {
        snprintf(err, errlen, "catalogue of locale \"%s\" is not valid JSON: %s at byte %zu", tag,
                 desc, offset);
        return BG_ERR_CONFIG;
    }
    const bg_json_t *root = bg_json_root(c->doc);
    if (!bg_json_is_object(root)) {
        snprintf(err, errlen, "catalogue of locale \"%s\" is not a JSON object", tag);
        goto err_free_doc;
    }
    c->n = bg_json_len(root);
    c->entries = bg_calloc(c->n, sizeof(*c->entries));
    for (size_t i = 0; i < c->n; i++) {
        const bg_json_t *v = bg_json_member(root, i, &c->entries[i].key);
        c->entries[i].text = bg_json_str(v, NULL);
        if (c->entries[i].text == NULL) {
            snprintf(err, errlen, "catalogue of locale \"%s\": \"%s\" is not a string", tag,
                     c->entries[i].key);
            goto err_free_entries;
        }
    }
    qsort(c->entries, c->n, sizeof(*c->entries), entry_cmp);
    return 0;

err_free_entries:
    free(c->entries);
    c->entries = NULL;
err_free_doc:
    bg_json_doc_free(c->doc);
    c->doc = NULL;
    return BG_ERR_CONFIG;
}

void bg_i18n_dispose(void)
{
    for (size_t i = 0; i < ncatalogues; i++)
        catalogue_dispose(&catalogues[i]);
    free(catalogues);
    catalogues = NULL;
    ncatalogues = 0;
    default_index = 0;
    free(supported_list);
    supported_list = NULL;
}

int bg__i18n_load(const char *const tags[], const char *const texts[], const size_t lens[],
                  size_t n, const char *default_locale, char *err, size_t errlen)
{
    if (n == 0 || n > MAX_LOCALES) {
        snprintf(err, errlen, "BG_SUPPORTED_LOCALES: between 1 and %d locales needed", MAX_LOCALES);
        return BG_ERR_CONFIG;
    }
    catalogue_t *cats = bg_calloc(n, sizeof(*cats));
    bg_buf_t list;
    bg_buf_init(&list, (TAG_MAX + 1) * MAX_LOCALES);
    size_t loaded = 0;
    size_t def = n;

    for (; loaded < n; loaded++) {
        if (!valid_tag(tags[loaded], strlen(tags[loaded]))) {
            snprintf(err, errlen, "BG_SUPPORTED_LOCALES: \"%s\" is not a locale tag", tags[loaded]);
            goto err_dispose;
        }
        if (catalogue_load(&cats[loaded], tags[loaded], texts[loaded], lens[loaded], err, errlen) !=
            0)
            goto err_dispose;
        /* The cap fits MAX_LOCALES tags of TAG_MAX bytes and their commas. */
        if ((loaded > 0 && bg_buf_putc(&list, ',') != 0) || bg_buf_puts(&list, tags[loaded]) != 0)
            goto err_dispose;
        if (default_locale != NULL && strcasecmp(tags[loaded], default_locale) == 0)
            def = loaded;
    }
    if (def == n) {
        snprintf(err, errlen, "BG_DEFAULT_LOCALE: \"%s\" is not in BG_SUPPORTED_LOCALES (%s)",
                 default_locale != NULL ? default_locale : "", list.base);
        goto err_dispose;
    }
    bg_i18n_dispose();
    catalogues = cats;
    ncatalogues = n;
    default_index = def;
    supported_list = bg_buf_steal(&list, NULL);
    return 0;

err_dispose:
    for (size_t i = 0; i < loaded; i++)
        catalogue_dispose(&cats[i]);
    free(cats);
    bg_buf_dispose(&list);
    return BG_ERR_CONFIG;
}

int bg_i18n_init(const char *supported_csv, const char *default_locale, char *err, size_t errlen)
{
    char tags[MAX_LOCALES][TAG_MAX];
    const char *tag_ptrs[MAX_LOCALES];
    const char *texts[MAX_LOCALES];
    size_t lens[MAX_LOCALES];
    size_t n = 0;
    const char *p = supported_csv != NULL ? supported_csv : "";

    while (*p != '\0') {
        while (*p == ' ' || *p == ',')
            p++;
        const char *start = p;
        while (*p != '\0' && *p != ',')
            p++;
        const char *end = p;
        while (end > start && end[-1] == ' ')
            end--;
        if (end == start)
            continue;
        size_t len = (size_t)(end - start);
        if (!valid_tag(start, len)) {
            snprintf(err, errlen, "BG_SUPPORTED_LOCALES: \"%.*s\" is not a locale tag",
                     (int)(len > 32 ? 32 : len), start);
            return BG_ERR_CONFIG;
        }
        bool dup = false;
        for (size_t i = 0; i < n && !dup; i++)
            dup = strlen(tags[i]) == len && strncasecmp(tags[i], start, len) == 0;
        if (dup)
            continue;
        if (n == MAX_LOCALES) {
            snprintf(err, errlen, "BG_SUPPORTED_LOCALES: more than %d locales", MAX_LOCALES);
            return BG_ERR_CONFIG;
        }
        memcpy(tags[n], start, len);
        tags[n][len] = '\0';
        char name[TAG_MAX + 16];
        snprintf(name, sizeof(name), "locales/%s.json", tags[n]);
        const bg_resource_t *res = bg_resource_find(name);
        if (res == NULL) {
            snprintf(err, errlen, "locale \"%s\" is supported but has no catalogue (%s)", tags[n],
                     name);
            return BG_ERR_CONFIG;
        }
        tag_ptrs[n] = tags[n];
        texts[n] = res->data;
        lens[n] = res->len;
        n++;
    }
    if (n == 0) {
        snprintf(err, errlen, "BG_SUPPORTED_LOCALES: no locale given");
        return BG_ERR_CONFIG;
    }
    return bg__i18n_load(tag_ptrs, texts, lens, n, default_locale, err, errlen);
}

/* Returns the catalogue of exactly this tag (case-insensitive, first len bytes), or NULL. */
static const catalogue_t *find_exact(const char *tag, size_t len)
{
    for (size_t i = 0; i < ncatalogues; i++) {
        if (strlen(catalogues[i].tag) == len && strncasecmp(catalogues[i].tag, tag, len) == 0)
            return &catalogues[i];
    }
    return NULL;
}

/* Returns the catalogue for a language range: exact, else the same primary language. */
static const catalogue_t *find_match(const char *tag, size_t len)
{
    const catalogue_t *c = find_exact(tag, len);
    if (c != NULL)
        return c;
    size_t plen = 0;
    while (plen < len && tag[plen] != '-' && tag[plen] != '_')
        plen++;
    for (size_t i = 0; i < ncatalogues; i++) {
        const char *t = catalogues[i].tag;
        size_t tlen = strcspn(t, "-");
        if (tlen == plen && strncasecmp(t, tag, plen) == 0)
            return &catalogues[i];
    }
    return NULL;
}

typedef struct st_range_t {
    const char *tag;
    size_t len;
    int q; /**< thousandths */
} range_t;

/* Parses "q=0.8" style weights; returns thousandths, or -1 when malformed. */
static int parse_q(const char *s, size_t len)
{
    if (len == 0 || len > 5 || (s[0] != '0' && s[0] != '1'))
        return -1;
    int q = (s[0] - '0') * 1000;
    if (len == 1)
        return q;
    if (s[1] != '.')
        return -1;
    int scale = 100;
    for (size_t i = 2; i < len; i++, scale /= 10) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        q += (s[i] - '0') * scale;
    }
    return q > 1000 ? -1 : q;
}

static size_t parse_ranges(const char *header, range_t *out, size_t max)
{
    size_t n = 0;
    const char *p = header;
    while (*p != '\0' && n < max) {
        const char *item = p;
        while (*p != '\0' && *p != ',')
            p++;
        const char *item_end = p;
        if (*p == ',')
            p++;
        while (item < item_end && (*item == ' ' || *item == '\t'))
            item++;
        const char *tag_end = item;
        while (tag_end < item_end && *tag_end != ';' && *tag_end != ' ' && *tag_end != '\t')
            tag_end++;
        if (tag_end == item)
            continue;
        int q = 1000;
        for (const char *s = tag_end; s < item_end; s++) {
            if (*s != ';')
                continue;
            s++;
            while (s < item_end && (*s == ' ' || *s == '\t'))
                s++;
            if (item_end - s >= 2 && (s[0] == 'q' || s[0] == 'Q') && s[1] == '=') {
                const char *v = s + 2, *e = v;
                while (e < item_end && *e != ';' && *e != ' ' && *e != '\t')
                    e++;
                q = parse_q(v, (size_t)(e - v));
            }
        }
        if (q < 0)
            continue;
        out[n].tag = item;
        out[n].len = (size_t)(tag_end - item);
        out[n].q = q;
        n++;
    }
    return n;
}

const char *bg_i18n_negotiate(const char *user_locale, const char *accept_language)
{
    if (ncatalogues == 0)
        return "en";
    if (bg_str_present(user_locale)) {
        const catalogue_t *c = find_match(user_locale, strlen(user_locale));
        if (c != NULL)
            return c->tag;
    }
    if (accept_language == NULL)
        return catalogues[default_index].tag;

    range_t ranges[MAX_RANGES];
    size_t n = parse_ranges(accept_language, ranges, MAX_RANGES);
    /* q=0 means "not this one": collect those first so a wildcard or a later range cannot pick it.
     */
    bool excluded[MAX_LOCALES] = {false};
    for (size_t i = 0; i < n; i++) {
        if (ranges[i].q != 0)
            continue;
        const catalogue_t *c = find_exact(ranges[i].tag, ranges[i].len);
        if (c != NULL)
            excluded[c - catalogues] = true;
    }
    const catalogue_t *best = NULL;
    int best_q = 0;
    for (size_t i = 0; i < n; i++) {
        if (ranges[i].q <= best_q)
            continue;
        const catalogue_t *c = NULL;
        if (ranges[i].len == 1 && ranges[i].tag[0] == '*') {
            c = &catalogues[default_index];
            for (size_t j = 0; excluded[c - catalogues] && j < ncatalogues; j++)
                c = &catalogues[j];
        } else {
            c = find_match(ranges[i].tag, ranges[i].len);
        }
        if (c != NULL && !excluded[c - catalogues]) {
            best = c;
            best_q = ranges[i].q;
        }
    }
    return best != NULL ? best->tag : catalogues[default_index].tag;
}

bool bg_i18n_is_supported(const char *locale)
{
    return locale != NULL && find_exact(locale, strlen(locale)) != NULL;
}

const char *bg_i18n_supported(void)
{
    return supported_list != NULL ? supported_list : "";
}

const char *bg_i18n_default(void)
{
    return ncatalogues > 0 ? catalogues[default_index].tag : "en";
}

static const char *lookup(const catalogue_t *c, const char *key)
{
    entry_t probe = {.key = key};
    const entry_t *e = bsearch(&probe, c->entries, c->n, sizeof(*c->entries), entry_cmp);
    return e != NULL ? e->text : NULL;
}

const char *bg_i18n_text(const char *locale, const char *key)
{
    if (locale == NULL || key == NULL)
        return NULL;
    const catalogue_t *c = find_exact(locale, strlen(locale));
    return c != NULL ? lookup(c, key) : NULL;
}

static bool is_name_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

static const char *param_value(const char *const params[], const char *name, size_t len)
{
    for (size_t i = 0; params != NULL && params[i] != NULL && params[i + 1] != NULL; i += 2) {
        if (strlen(params[i]) == len && memcmp(params[i], name, len) == 0)
            return params[i + 1];
    }
    return NULL;
}

/* Appends text with its {placeholders} replaced; an unknown one stays as written. */
static int substitute(bg_buf_t *out, const char *key, const char *text, const char *const params[])
{
    int r = 0;
    const char *p = text;
    while (*p != '\0' && r == 0) {
        const char *open = strchr(p, '{');
        if (open == NULL) {
            r = bg_buf_puts(out, p);
            break;
        }
        const char *name = open + 1, *close = name;
        while (is_name_char(*close))
            close++;
        if (*close != '}' || close == name) {
            r = bg_buf_append(out, p, (size_t)(name - p));
            p = name;
            continue;
        }
        r = bg_buf_append(out, p, (size_t)(open - p));
        const char *value = param_value(params, name, (size_t)(close - name));
        if (value == NULL) {
            if (first_time("param", key, name))
                bg_warn("i18n: message \"%s\" has placeholder {%.*s} but no such parameter", key,
                        (int)(close - name), name);
        }
        if (r == 0)
            r = value != NULL ? bg_buf_puts(out, value)
                              : bg_buf_append(out, open, (size_t)(close + 1 - open));
        p = close + 1;
    }
    return r;
}

int bg_i18n_format(bg_buf_t *out, const char *locale, const char *key, const char *const params[])
{
    const catalogue_t *c = NULL;
    const char *text = NULL;
    if (ncatalogues > 0) {
        c = locale != NULL ? find_exact(locale, strlen(locale)) : NULL;
        if (c == NULL)
            c = &catalogues[default_index];
        text = lookup(c, key);
        if (text == NULL && c != &catalogues[default_index]) {
            if (first_time("locale", c->tag, key))
                bg_warn("i18n: \"%s\" has no translation in %s; using %s", key, c->tag,
                        catalogues[default_index].tag);
            text = lookup(&catalogues[default_index], key);
        }
    }
    if (text == NULL) {
        if (first_time("key", key, NULL))
            bg_warn("i18n: no catalogue has the key \"%s\"", key);
        text = key;
    }
    size_t start = out->len;
    int r = substitute(out, key, text, params);
    if (r != 0) {
        out->len = start;
        if (out->base != NULL)
            out->base[start] = '\0';
    }
    return r;
}
