/*
 * JSON parsing with limits, typed getters and a writer.
 *
 * The parser drives yajl's event API and builds its own compact tree in the same pass. Each open
 * container has a frame (indexed by depth and reused by siblings) collecting its members in a
 * growable vector; when the container closes, the members are copied into the document's arena as a
 * fixed array, so the tree costs one bump allocation per container and string. Frames exist only up
 * to max_depth, so a deeply nested body is stopped at the first bracket past the limit, having cost
 * that many frames.
 *
 * Duplicate keys are found with a linear scan while an object is small and with an open-addressing
 * table once it has 16 members: a body with 10,000 keys in one object would otherwise cost 50
 * million comparisons. The table is reused by sibling objects; a generation number per slot marks
 * which object filled it, so starting a new object costs nothing however large the previous one
 * was.
 *
 * yajl validates UTF-8 only by shape (it accepts overlong forms and surrogates) and turns a lone \u
 * low surrogate into invalid UTF-8, so every decoded string and key is checked again, strictly.
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <yajl/yajl_parse.h>

#include "bg/err.h"
#include "bg/json.h"

const bg_json_limits_t bg_json_default_limits = {
    .max_bytes = 1024 * 1024,
    .max_depth = 32,
    .max_string = 256 * 1024,
    .max_members = 10000,
    .max_values = 100000,
};

/* Longest number literal accepted: enough for any double written in full (17 digits, sign,
 * exponent) with room to spare, short enough that strtod never sees a megabyte of digits. */
#define NUMBER_MAX_LEN 64
/* Objects with fewer members are checked for duplicate keys by a linear scan. */
#define HASH_MIN_MEMBERS 16

typedef struct bg_json_member bg_json_member_t;

struct bg_json {
    uint8_t type;
    bool flag;  /**< the boolean's value, or "is an integer" for numbers */
    size_t len; /**< string bytes, or member/item count */
    union {
        int64_t i;
        double d;
        const char *s;
        const struct bg_json *items;
        const bg_json_member_t *members;
    } u;
};

typedef struct bg_json_member {
    const char *key; /**< NUL-terminated, in the arena; NULL for array items while building */
    size_t key_len;
    struct bg_json value;
} bg_json_member_t;

typedef struct st_chunk_t {
    struct st_chunk_t *next;
    size_t size;
    size_t used;
    unsigned char data[];
} chunk_t;

struct bg_json_doc {
    struct bg_json root;
    chunk_t *chunks; /**< owned list, newest first */
};

_Static_assert(offsetof(chunk_t, data) % 8 == 0, "arena data must be 8-byte aligned");

/* Returns n bytes, 8-byte aligned, owned by the document. */
static void *arena_alloc(bg_json_doc_t *doc, size_t n)
{
    n = (n + 7) & ~(size_t)7;
    chunk_t *c = doc->chunks;
    if (c == NULL || c->size - c->used < n) {
        size_t size = c == NULL ? 4096 : c->size * 2;
        if (size > 64 * 1024)
            size = 64 * 1024;
        if (size < n)
            size = n;
        c = bg_malloc(sizeof(*c) + size);
        c->size = size;
        c->used = 0;
        c->next = doc->chunks;
        doc->chunks = c;
    }
    void *p = c->data + c->used;
    c->used += n;
    return p;
}

static const char *arena_strndup(bg_json_doc_t *doc, const void *s, size_t len)
{
    char *p = arena_alloc(doc, len + 1);
    if (len > 0)
        memcpy(p, s, len);
    p[len] = '\0';
    return p;
}

void bg_json_doc_free(bg_json_doc_t *doc)
{
    if (doc == NULL)
        return;
    chunk_t *c = doc->chunks;
    while (c != NULL) {
        chunk_t *next = c->next;
        free(c);
        c = next;
    }
    free(doc);
}

/* ---- UTF-8 ---------------------------------------------------------------------------------- */

/* Returns the length of the valid UTF-8 sequence at p (avail bytes left), or 0 when it is invalid.
 */
static size_t utf8_seq(const unsigned char *p, size_t avail)
{
    unsigned c = p[0];
    size_t n;
    uint32_t cp;
    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf) {
        n = 1;
        cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
        n = 2;
        cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        n = 3;
        cp = c & 0x07;
    } else {
        return 0;
    }
    if (avail <= n)
        return 0;
    for (size_t i = 1; i <= n; i++) {
        if ((p[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (p[i] & 0x3f);
    }
    if (n == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff)))
        return 0;
    if (n == 3 && (cp < 0x10000 || cp > 0x10ffff))
        return 0;
    return n + 1;
}

bool bg_json_utf8_is_valid(const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < len) {
        if (p[i] < 0x80) {
            i++;
            continue;
        }
        size_t n = utf8_seq(p + i, len - i);
        if (n == 0)
            return false;
        i += n;
    }
    return true;
}

/* ---- parser --------------------------------------------------------------------------------- */

typedef struct st_frame_t {
    bool is_object;
    size_t n;
    size_t cap;
    bg_json_member_t *items; /**< owned, reused by later containers at this depth */
    uint64_t *slots;         /**< owned: (generation << 32) | member index */
    size_t nslots;           /**< power of two, or 0 */
    uint32_t gen;            /**< generation of the current object */
    size_t hashed;           /**< members of the current object entered into slots */
    const char *key;         /**< pending key of an object, in the arena */
    size_t key_len;
} frame_t;

typedef struct st_parser_t {
    bg_json_limits_t lim;
    bg_json_doc_t *doc;
    frame_t *frames; /**< owned, nframes allocated */
    size_t nframes;
    size_t depth;
    size_t values;
    int err;
    const char *desc;
} parser_t;

/* Records the first error and tells yajl to stop (callbacks return 0 to cancel). */
static int fail(parser_t *p, int err, const char *desc)
{
    if (p->err == 0) {
        p->err = err;
        p->desc = desc;
    }
    return 0;
}

static int add_value(parser_t *p, const struct bg_json *v)
{
    if (++p->values > p->lim.max_values)
        return fail(p, BG_ERR_TOO_LARGE, "too many values in the document");
    if (p->depth == 0) {
        p->doc->root = *v;
        return 1;
    }
    frame_t *f = &p->frames[p->depth - 1];
    if (f->n >= p->lim.max_members)
        return fail(p, BG_ERR_TOO_LARGE, "too many members in an object or array");
    if (f->n == f->cap) {
        f->cap = f->cap == 0 ? 16 : f->cap * 2;
        f->items = bg_realloc(f->items, f->cap * sizeof(*f->items));
    }
    bg_json_member_t *m = &f->items[f->n++];
    m->key = f->is_object ? f->key : NULL;
    m->key_len = f->is_object ? f->key_len : 0;
    m->value = *v;
    return 1;
}

static int check_string(parser_t *p, const unsigned char *s, size_t len)
{
    if (len > p->lim.max_string)
        return fail(p, BG_ERR_TOO_LARGE, "string longer than the limit");
    if (memchr(s, '\0', len) != NULL)
        return fail(p, BG_ERR_INVALID, "string contains U+0000");
    if (!bg_json_utf8_is_valid((const char *)s, len))
        return fail(p, BG_ERR_INVALID, "invalid UTF-8 in a string");
    return 1;
}

static int on_null(void *ctx)
{
    struct bg_json v = {.type = BG_JSON_NULL};
    return add_value(ctx, &v);
}

static int on_boolean(void *ctx, int b)
{
    struct bg_json v = {.type = BG_JSON_BOOL, .flag = b != 0};
    return add_value(ctx, &v);
}

static int on_number(void *ctx, const char *s, size_t len)
{
    parser_t *p = ctx;
    char text[NUMBER_MAX_LEN + 1];
    if (len > NUMBER_MAX_LEN)
        return fail(p, BG_ERR_TOO_LARGE, "number literal longer than 64 bytes");
    memcpy(text, s, len);
    text[len] = '\0';
    struct bg_json v = {.type = BG_JSON_NUMBER};
    if (strpbrk(text, ".eE") == NULL) {
        errno = 0;
        char *end;
        long long i = strtoll(text, &end, 10);
        if (errno == 0 && *end == '\0') {
            v.flag = true;
            v.u.i = i;
            return add_value(p, &v);
        }
        /* Past int64_t: still a valid JSON number, kept as a double. */
    }
    char *end;
    double d = strtod(text, &end);
    if (*end != '\0' || !isfinite(d))
        return fail(p, BG_ERR_INVALID, "number out of range");
    v.u.d = d;
    return add_value(p, &v);
}

static int on_string(void *ctx, const unsigned char *s, size_t len)
{
    parser_t *p = ctx;
    if (!check_string(p, s, len))
        return 0;
    struct bg_json v = {.type = BG_JSON_STRING, .len = len};
    v.u.s = arena_strndup(p->doc, s, len);
    return add_value(p, &v);
}

static int start_container(parser_t *p, bool is_object)
{
    if (p->depth >= p->lim.max_depth)
        return fail(p, BG_ERR_DEPTH, "nesting deeper than the limit");
    if (p->depth == p->nframes) {
        size_t n = p->nframes == 0 ? 8 : p->nframes * 2;
        p->frames = bg_realloc(p->frames, n * sizeof(*p->frames));
        memset(p->frames + p->nframes, 0, (n - p->nframes) * sizeof(*p->frames));
        p->nframes = n;
    }
    frame_t *f = &p->frames[p->depth++];
    f->is_object = is_object;
    f->n = 0;
    f->hashed = 0;
    f->key = NULL;
    f->key_len = 0;
    if (++f->gen == 0) {
        /* Wrapped after 2^32 objects at this depth: old slots could look current, so clear them. */
        if (f->slots != NULL)
            memset(f->slots, 0, f->nslots * sizeof(*f->slots));
        f->gen = 1;
    }
    return 1;
}

static int end_container(parser_t *p)
{
    frame_t *f = &p->frames[p->depth - 1];
    struct bg_json v = {.type = f->is_object ? BG_JSON_OBJECT : BG_JSON_ARRAY, .len = f->n};
    if (f->is_object) {
        bg_json_member_t *m = arena_alloc(p->doc, f->n * sizeof(*m));
        if (f->n > 0)
            memcpy(m, f->items, f->n * sizeof(*m));
        v.u.members = m;
    } else {
        struct bg_json *items = arena_alloc(p->doc, f->n * sizeof(*items));
        for (size_t i = 0; i < f->n; i++)
            items[i] = f->items[i].value;
        v.u.items = items;
    }
    p->depth--;
    return add_value(p, &v);
}

static int on_start_map(void *ctx)
{
    return start_container(ctx, true);
}

static int on_start_array(void *ctx)
{
    return start_container(ctx, false);
}

static int on_end(void *ctx)
{
    return end_container(ctx);
}

static uint64_t hash_bytes(const unsigned char *s, size_t len)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < len; i++) {
        h ^= s[i];
        h *= 1099511628211ULL;
    }
    return h;
}

static void slot_insert(frame_t *f, size_t idx)
{
    size_t mask = f->nslots - 1;
    size_t i = hash_bytes((const unsigned char *)f->items[idx].key, f->items[idx].key_len) & mask;
    while ((uint32_t)(f->slots[i] >> 32) == f->gen)
        i = (i + 1) & mask;
    f->slots[i] = ((uint64_t)f->gen << 32) | (uint32_t)idx;
}

/* Returns true when the current object of f already has the key. */
static bool has_key(frame_t *f, const unsigned char *key, size_t len)
{
    if (f->n < HASH_MIN_MEMBERS) {
        for (size_t i = 0; i < f->n; i++) {
            if (f->items[i].key_len == len && memcmp(f->items[i].key, key, len) == 0)
                return true;
        }
        return false;
    }
    if ((f->n + 1) * 2 > f->nslots) {
        size_t n = f->nslots == 0 ? 64 : f->nslots;
        while ((f->n + 1) * 2 > n)
            n *= 2;
        free(f->slots);
        f->slots = bg_calloc(n, sizeof(*f->slots));
        f->nslots = n;
        f->hashed = 0;
    }
    while (f->hashed < f->n)
        slot_insert(f, f->hashed++);
    size_t mask = f->nslots - 1;
    for (size_t i = hash_bytes(key, len) & mask; (uint32_t)(f->slots[i] >> 32) == f->gen;
         i = (i + 1) & mask) {
        const bg_json_member_t *m = &f->items[(uint32_t)f->slots[i]];
        if (m->key_len == len && memcmp(m->key, key, len) == 0)
            return true;
    }
    return false;
}

static int on_map_key(void *ctx, const unsigned char *key, size_t len)
{
    parser_t *p = ctx;
    if (!check_string(p, key, len))
        return 0;
    frame_t *f = &p->frames[p->depth - 1];
    if (f->n >= p->lim.max_members)
        return fail(p, BG_ERR_TOO_LARGE, "too many members in an object or array");
    if (has_key(f, key, len))
        return fail(p, BG_ERR_INVALID, "duplicate key");
    f->key = arena_strndup(p->doc, key, len);
    f->key_len = len;
    return 1;
}

static const yajl_callbacks callbacks = {
    .yajl_null = on_null,
    .yajl_boolean = on_boolean,
    .yajl_number = on_number,
    .yajl_string = on_string,
    .yajl_start_map = on_start_map,
    .yajl_map_key = on_map_key,
    .yajl_end_map = on_end,
    .yajl_start_array = on_start_array,
    .yajl_end_array = on_end,
};

/* yajl describes its errors only as allocated text; map the ones a client can cause to static ones.
 */
static const char *yajl_desc(yajl_handle yh, bool at_end)
{
    const char *desc = "invalid JSON syntax";
    unsigned char *msg = yajl_get_error(yh, 0, NULL, 0);
    if (msg == NULL)
        return desc;
    const char *m = (const char *)msg;
    if (strstr(m, "UTF8") != NULL)
        desc = "invalid UTF-8 in a string";
    else if (strstr(m, "trailing garbage") != NULL)
        desc = "unexpected data after the JSON value";
    else if (at_end || strstr(m, "premature EOF") != NULL)
        desc = "unexpected end of input";
    yajl_free_error(yh, msg);
    return desc;
}

static bool is_blank(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\n' && s[i] != '\r')
            return false;
    }
    return true;
}

static size_t pick(size_t v, size_t def)
{
    return v != 0 ? v : def;
}

/* Reports an error found before yajl was involved. */
static int refuse(int err, const char *desc, size_t offset, const char **err_desc,
                  size_t *err_offset)
{
    if (err_desc != NULL)
        *err_desc = desc;
    if (err_offset != NULL)
        *err_offset = offset;
    return err;
}

int bg_json_parse(const char *text, size_t len, const bg_json_limits_t *limits, bg_json_doc_t **out,
                  const char **err_desc, size_t *err_offset)
{
    const bg_json_limits_t *d = &bg_json_default_limits;
    parser_t p = {.err = 0};
    size_t offset = 0;

    if (limits == NULL)
        limits = d;
    p.lim.max_bytes = pick(limits->max_bytes, d->max_bytes);
    p.lim.max_depth = pick(limits->max_depth, d->max_depth);
    p.lim.max_string = pick(limits->max_string, d->max_string);
    p.lim.max_members = pick(limits->max_members, d->max_members);
    p.lim.max_values = pick(limits->max_values, d->max_values);
    /* Member indexes share a 64-bit slot with the generation. */
    if (p.lim.max_members > UINT32_MAX)
        p.lim.max_members = UINT32_MAX;
    *out = NULL;

    if (len > p.lim.max_bytes)
        return refuse(BG_ERR_TOO_LARGE, "body larger than the limit", p.lim.max_bytes, err_desc,
                      err_offset);
    if (text == NULL || is_blank(text, len))
        return refuse(BG_ERR_INVALID, "empty body", 0, err_desc, err_offset);

    p.doc = bg_calloc(1, sizeof(*p.doc));
    yajl_handle yh = yajl_alloc(&callbacks, NULL, &p);
    if (yh == NULL)
        bg_oom(sizeof(yh));
    /* Explicit although these are yajl's defaults: the checks above and below rely on them. */
    yajl_config(yh, yajl_allow_comments, 0);
    yajl_config(yh, yajl_dont_validate_strings, 0);
    yajl_config(yh, yajl_allow_trailing_garbage, 0);
    yajl_config(yh, yajl_allow_multiple_values, 0);
    yajl_config(yh, yajl_allow_partial_values, 0);

    yajl_status st = yajl_parse(yh, (const unsigned char *)text, len);
    bool at_end = false;
    if (st == yajl_status_ok) {
        /* A top-level number or an unclosed container is only known to end here. */
        at_end = true;
        st = yajl_complete_parse(yh);
    }
    if (st != yajl_status_ok) {
        offset = at_end ? len : yajl_get_bytes_consumed(yh);
        if (st != yajl_status_client_canceled || p.err == 0)
            fail(&p, BG_ERR_INVALID, yajl_desc(yh, at_end));
    }
    yajl_free(yh);
    for (size_t i = 0; i < p.nframes; i++) {
        free(p.frames[i].items);
        free(p.frames[i].slots);
    }
    free(p.frames);
    if (p.err != 0)
        goto err_free_doc;
    *out = p.doc;
    return 0;

err_free_doc:
    bg_json_doc_free(p.doc);
    return refuse(p.err, p.desc, offset, err_desc, err_offset);
}

/* ---- access --------------------------------------------------------------------------------- */

const bg_json_t *bg_json_root(const bg_json_doc_t *doc)
{
    return &doc->root;
}

bg_json_type_t bg_json_type(const bg_json_t *v)
{
    return (bg_json_type_t)v->type;
}

const char *bg_json_type_name(bg_json_type_t type)
{
    switch (type) {
    case BG_JSON_NULL:
        return "null";
    case BG_JSON_BOOL:
        return "boolean";
    case BG_JSON_NUMBER:
        return "number";
    case BG_JSON_STRING:
        return "string";
    case BG_JSON_ARRAY:
        return "array";
    case BG_JSON_OBJECT:
        return "object";
    }
    return "unknown";
}

size_t bg_json_len(const bg_json_t *v)
{
    if (v == NULL || (v->type != BG_JSON_ARRAY && v->type != BG_JSON_OBJECT))
        return 0;
    return v->len;
}

const bg_json_t *bg_json_at(const bg_json_t *v, size_t i)
{
    if (v == NULL || v->type != BG_JSON_ARRAY || i >= v->len)
        return NULL;
    return &v->u.items[i];
}

const bg_json_t *bg_json_member(const bg_json_t *v, size_t i, const char **key)
{
    if (v == NULL || v->type != BG_JSON_OBJECT || i >= v->len)
        return NULL;
    if (key != NULL)
        *key = v->u.members[i].key;
    return &v->u.members[i].value;
}

const bg_json_t *bg_json_find(const bg_json_t *obj, const char *key)
{
    if (obj == NULL || obj->type != BG_JSON_OBJECT)
        return NULL;
    size_t len = strlen(key);
    for (size_t i = 0; i < obj->len; i++) {
        const bg_json_member_t *m = &obj->u.members[i];
        if (m->key_len == len && memcmp(m->key, key, len) == 0)
            return &m->value;
    }
    return NULL;
}

const char *bg_json_str(const bg_json_t *v, size_t *len)
{
    if (v == NULL || v->type != BG_JSON_STRING)
        return NULL;
    if (len != NULL)
        *len = v->len;
    return v->u.s;
}

bool bg_json_int(const bg_json_t *v, int64_t *out)
{
    if (v == NULL || v->type != BG_JSON_NUMBER || !v->flag)
        return false;
    *out = v->u.i;
    return true;
}

bool bg_json_double(const bg_json_t *v, double *out)
{
    if (v == NULL || v->type != BG_JSON_NUMBER)
        return false;
    *out = v->flag ? (double)v->u.i : v->u.d;
    return true;
}

bool bg_json_bool(const bg_json_t *v, bool *out)
{
    if (v == NULL || v->type != BG_JSON_BOOL)
        return false;
    *out = v->flag;
    return true;
}

/* Finds a member for the getters: 0 with *v, BG_ERR_NOT_FOUND (absent or null), BG_ERR_INVALID. */
static int lookup(const bg_json_t *obj, const char *key, bg_json_type_t want, const bg_json_t **v)
{
    if (obj == NULL || obj->type != BG_JSON_OBJECT)
        return BG_ERR_INVALID;
    const bg_json_t *m = bg_json_find(obj, key);
    if (m == NULL || m->type == BG_JSON_NULL)
        return BG_ERR_NOT_FOUND;
    if (m->type != want)
        return BG_ERR_INVALID;
    *v = m;
    return 0;
}

int bg_json_get_strn(const bg_json_t *obj, const char *key, const char **out, size_t *len)
{
    const bg_json_t *v;
    int r = lookup(obj, key, BG_JSON_STRING, &v);
    if (r != 0)
        return r;
    *out = v->u.s;
    if (len != NULL)
        *len = v->len;
    return 0;
}

int bg_json_get_str(const bg_json_t *obj, const char *key, const char **out)
{
    return bg_json_get_strn(obj, key, out, NULL);
}

int bg_json_get_int(const bg_json_t *obj, const char *key, int64_t *out)
{
    const bg_json_t *v;
    int r = lookup(obj, key, BG_JSON_NUMBER, &v);
    if (r != 0)
        return r;
    return bg_json_int(v, out) ? 0 : BG_ERR_INVALID;
}

int bg_json_get_double(const bg_json_t *obj, const char *key, double *out)
{
    const bg_json_t *v;
    int r = lookup(obj, key, BG_JSON_NUMBER, &v);
    if (r != 0)
        return r;
    return bg_json_double(v, out) ? 0 : BG_ERR_INVALID;
}

int bg_json_get_bool(const bg_json_t *obj, const char *key, bool *out)
{
    const bg_json_t *v;
    int r = lookup(obj, key, BG_JSON_BOOL, &v);
    if (r != 0)
        return r;
    *out = v->flag;
    return 0;
}

int bg_json_get_object(const bg_json_t *obj, const char *key, const bg_json_t **out)
{
    const bg_json_t *v;
    int r = lookup(obj, key, BG_JSON_OBJECT, &v);
    if (r != 0)
        return r;
    *out = v;
    return 0;
}

int bg_json_get_array(const bg_json_t *obj, const char *key, const bg_json_t **out)
{
    const bg_json_t *v;
    int r = lookup(obj, key, BG_JSON_ARRAY, &v);
    if (r != 0)
        return r;
    *out = v;
    return 0;
}

int bg_json_check_fields(const bg_json_t *obj, const char *const allowed[], const char **unknown)
{
    *unknown = NULL;
    if (obj == NULL || obj->type != BG_JSON_OBJECT)
        return BG_ERR_INVALID;
    for (size_t i = 0; i < obj->len; i++) {
        const char *key = obj->u.members[i].key;
        bool ok = false;
        for (size_t j = 0; allowed != NULL && allowed[j] != NULL && !ok; j++)
            ok = strcmp(allowed[j], key) == 0;
        if (!ok) {
            *unknown = key;
            return BG_ERR_INVALID;
        }
    }
    return 0;
}

/* ---- writer --------------------------------------------------------------------------------- */

void bg_json_writer_init(bg_json_writer_t *w, bg_buf_t *out)
{
    memset(w, 0, sizeof(*w));
    w->out = out;
    w->start = out->len;
}

static void put(bg_json_writer_t *w, const void *p, size_t n)
{
    if (w->err == 0)
        w->err = bg_buf_append(w->out, p, n);
}

/* Places the separator a value needs here; returns false when no value may be written. */
static bool value_prefix(bg_json_writer_t *w)
{
    if (w->err != 0)
        return false;
    if (w->depth == 0) {
        if (w->wrote) {
            w->err = BG_ERR_INVALID;
            return false;
        }
        return true;
    }
    uint64_t bit = (uint64_t)1 << (w->depth - 1);
    if (w->in_object & bit) {
        if (!w->after_key) {
            w->err = BG_ERR_INVALID;
            return false;
        }
        w->after_key = false;
        return true;
    }
    if (w->has_items & bit)
        put(w, ",", 1);
    w->has_items |= bit;
    return w->err == 0;
}

static void value_done(bg_json_writer_t *w)
{
    if (w->depth == 0 && w->err == 0)
        w->wrote = true;
}

/* Appends the inside of a string literal: escapes, and U+FFFD for every invalid UTF-8 byte. */
static void put_escaped(bg_json_writer_t *w, const char *s, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *p = (const unsigned char *)s;
    size_t run = 0; /* start of the pending run of bytes that need no escaping */
    size_t i = 0;
    while (i < len && w->err == 0) {
        unsigned char c = p[i];
        if (c >= 0x20 && c != '"' && c != '\\' && c < 0x80) {
            i++;
            continue;
        }
        size_t n = c >= 0x80 ? utf8_seq(p + i, len - i) : 0;
        if (n > 0) {
            i += n;
            continue;
        }
        put(w, p + run, i - run);
        switch (c) {
        case '"':
            put(w, "\\\"", 2);
            break;
        case '\\':
            put(w, "\\\\", 2);
            break;
        case '\n':
            put(w, "\\n", 2);
            break;
        case '\r':
            put(w, "\\r", 2);
            break;
        case '\t':
            put(w, "\\t", 2);
            break;
        default:
            if (c < 0x20) {
                char esc[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 0xf]};
                put(w, esc, sizeof(esc));
            } else {
                put(w, "\xef\xbf\xbd", 3);
            }
        }
        i++;
        run = i;
    }
    put(w, p + run, len - run);
}

static void put_string(bg_json_writer_t *w, const char *s, size_t len)
{
    put(w, "\"", 1);
    put_escaped(w, s, len);
    put(w, "\"", 1);
}

static void begin(bg_json_writer_t *w, bool object)
{
    if (!value_prefix(w))
        return;
    if (w->depth >= BG_JSON_WRITER_MAX_DEPTH) {
        w->err = BG_ERR_TOO_LARGE;
        return;
    }
    uint64_t bit = (uint64_t)1 << w->depth;
    w->depth++;
    if (object)
        w->in_object |= bit;
    else
        w->in_object &= ~bit;
    w->has_items &= ~bit;
    put(w, object ? "{" : "[", 1);
}

static void end(bg_json_writer_t *w, bool object)
{
    if (w->err != 0)
        return;
    if (w->depth == 0 || w->after_key ||
        ((w->in_object >> (w->depth - 1)) & 1) != (uint64_t)object) {
        w->err = BG_ERR_INVALID;
        return;
    }
    w->depth--;
    put(w, object ? "}" : "]", 1);
    value_done(w);
}

void bg_json_write_begin_object(bg_json_writer_t *w)
{
    begin(w, true);
}

void bg_json_write_end_object(bg_json_writer_t *w)
{
    end(w, true);
}

void bg_json_write_begin_array(bg_json_writer_t *w)
{
    begin(w, false);
}

void bg_json_write_end_array(bg_json_writer_t *w)
{
    end(w, false);
}

void bg_json_write_key(bg_json_writer_t *w, const char *key)
{
    if (w->err != 0)
        return;
    uint64_t bit = w->depth > 0 ? (uint64_t)1 << (w->depth - 1) : 0;
    if (w->depth == 0 || !(w->in_object & bit) || w->after_key || key == NULL) {
        w->err = BG_ERR_INVALID;
        return;
    }
    if (w->has_items & bit)
        put(w, ",", 1);
    w->has_items |= bit;
    put_string(w, key, strlen(key));
    put(w, ":", 1);
    w->after_key = true;
}

void bg_json_write_strn(bg_json_writer_t *w, const char *s, size_t len)
{
    if (!value_prefix(w))
        return;
    put_string(w, s, len);
    value_done(w);
}

void bg_json_write_str(bg_json_writer_t *w, const char *s)
{
    if (s == NULL)
        bg_json_write_null(w);
    else
        bg_json_write_strn(w, s, strlen(s));
}

static void put_literal(bg_json_writer_t *w, const char *text)
{
    if (!value_prefix(w))
        return;
    put(w, text, strlen(text));
    value_done(w);
}

void bg_json_write_int(bg_json_writer_t *w, int64_t v)
{
    char text[24];
    snprintf(text, sizeof(text), "%" PRId64, v);
    put_literal(w, text);
}

void bg_json_write_double(bg_json_writer_t *w, double v)
{
    char text[32];
    if (!isfinite(v)) {
        put_literal(w, "null");
        return;
    }
    if (v == 0) {
        /* -0 too (an underflow like -1e-999 parses to it): "-0" would read back as the integer 0
         * and write as "0", so a document would not survive a second round trip unchanged */
        put_literal(w, "0");
        return;
    }
    snprintf(text, sizeof(text), "%.15g", v);
    if (strtod(text, NULL) != v)
        snprintf(text, sizeof(text), "%.17g", v);
    put_literal(w, text);
}

void bg_json_write_bool(bg_json_writer_t *w, bool v)
{
    put_literal(w, v ? "true" : "false");
}

void bg_json_write_null(bg_json_writer_t *w)
{
    put_literal(w, "null");
}

void bg_json_write_value(bg_json_writer_t *w, const bg_json_t *v)
{
    switch ((bg_json_type_t)v->type) {
    case BG_JSON_NULL:
        bg_json_write_null(w);
        break;
    case BG_JSON_BOOL:
        bg_json_write_bool(w, v->flag);
        break;
    case BG_JSON_NUMBER:
        if (v->flag)
            bg_json_write_int(w, v->u.i);
        else
            bg_json_write_double(w, v->u.d);
        break;
    case BG_JSON_STRING:
        bg_json_write_strn(w, v->u.s, v->len);
        break;
    case BG_JSON_ARRAY:
        bg_json_write_begin_array(w);
        for (size_t i = 0; i < v->len && w->err == 0; i++)
            bg_json_write_value(w, &v->u.items[i]);
        bg_json_write_end_array(w);
        break;
    case BG_JSON_OBJECT:
        bg_json_write_begin_object(w);
        for (size_t i = 0; i < v->len && w->err == 0; i++) {
            bg_json_write_key(w, v->u.members[i].key);
            bg_json_write_value(w, &v->u.members[i].value);
        }
        bg_json_write_end_object(w);
        break;
    }
}

void bg_json_write_field_str(bg_json_writer_t *w, const char *key, const char *s)
{
    bg_json_write_key(w, key);
    bg_json_write_str(w, s);
}

void bg_json_write_field_int(bg_json_writer_t *w, const char *key, int64_t v)
{
    bg_json_write_key(w, key);
    bg_json_write_int(w, v);
}

void bg_json_write_field_bool(bg_json_writer_t *w, const char *key, bool v)
{
    bg_json_write_key(w, key);
    bg_json_write_bool(w, v);
}

void bg_json_write_field_null(bg_json_writer_t *w, const char *key)
{
    bg_json_write_key(w, key);
    bg_json_write_null(w);
}

int bg_json_write_finish(bg_json_writer_t *w)
{
    if (w->err == 0 && (w->depth != 0 || w->after_key || !w->wrote))
        w->err = BG_ERR_INVALID;
    if (w->err != 0) {
        w->out->len = w->start;
        if (w->out->base != NULL)
            w->out->base[w->start] = '\0';
    }
    return w->err;
}
