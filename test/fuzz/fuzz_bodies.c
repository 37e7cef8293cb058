/*
 * libFuzzer target for request bodies: edge_body_validate() (edge/body.c) with the field specs of
 * the /auth routes, and the bounded JSON parser under the limits the edge gives it.
 *
 * Each input is validated against every spec. A body that passes must hold exactly what the spec
 * promises: required fields present, strings NUL-terminated with a length in characters inside the
 * bounds, e-mails and locales that pass their checks, arrays no longer than allowed. A refusal must
 * name one of the three documented codes, a field and a reason for validation failures, and hand
 * back a document only for an unknown field (whose name lives in it). Any breach aborts, which
 * libFuzzer reports as a crash; ASan and UBSan catch the rest.
 *
 * The specs below mirror edge/routes_auth.c (register, login, PUT /auth/profile, POST
 * /auth/api-keys); keep them in step when those change.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/err.h"
#include "bg/i18n.h"
#include "bg/json.h"
#include "bg/validate.h"
#include "edge.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const edge_field_t register_fields[] = {
    {"email", EDGE_F_STR, true, 3, 254, EDGE_CHECK_EMAIL},
    {"password", EDGE_F_STR, true, 1, 1024, EDGE_CHECK_PASSWORD},
    {"name", EDGE_F_STR, false, 0, 200, EDGE_CHECK_NONE},
    {"locale", EDGE_F_STR, false, 2, 15, EDGE_CHECK_LOCALE},
    {"mode", EDGE_F_STR, false, 1, 16, EDGE_CHECK_NONE},
};

static const edge_field_t login_fields[] = {
    {"email", EDGE_F_STR, true, 1, 254, EDGE_CHECK_NONE},
    {"password", EDGE_F_STR, true, 1, 1024, EDGE_CHECK_NONE},
    {"mode", EDGE_F_STR, false, 1, 16, EDGE_CHECK_NONE},
};

static const edge_field_t profile_fields[] = {
    {"name", EDGE_F_STR, false, 0, 200, EDGE_CHECK_NONE},
    {"locale", EDGE_F_STR, false, 2, 15, EDGE_CHECK_LOCALE},
};

static const edge_field_t key_fields[] = {
    {"name", EDGE_F_STR, true, 1, 100, EDGE_CHECK_NONE},
    {"scopes", EDGE_F_STR_ARRAY, false, 0, 8, EDGE_CHECK_NONE},
};

static const struct {
    const edge_field_t *fields;
    size_t n;
} specs[] = {
    {register_fields, sizeof(register_fields) / sizeof(register_fields[0])},
    {login_fields, sizeof(login_fields) / sizeof(login_fields[0])},
    {profile_fields, sizeof(profile_fields) / sizeof(profile_fields[0])},
    {key_fields, sizeof(key_fields) / sizeof(key_fields[0])},
};

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    char err[256];
    /* the edge's default locales: EDGE_CHECK_LOCALE asks the catalogues */
    if (bg_i18n_init("en,ru,es", "en", err, sizeof(err)) != 0) {
        fprintf(stderr, "fuzz_bodies: i18n: %s\n", err);
        abort();
    }
    return 0;
}

/* Checks what a successful validation promises about one field. */
static void check_accepted(const edge_field_t *f, size_t k, const edge_values_t *v)
{
    if (f->required && !v->present[k])
        abort();
    if (!v->present[k]) {
        if (v->str[k] != NULL || v->arr[k] != NULL)
            abort();
        return;
    }
    switch (f->type) {
    case EDGE_F_STR: {
        const char *s = v->str[k];
        if (s == NULL)
            abort();
        size_t chars = bg_utf8_chars(s);
        if ((f->max_len > 0 && chars > f->max_len) || chars < f->min_len)
            abort();
        if (f->check == EDGE_CHECK_EMAIL && !bg_validate_email(s))
            abort();
        if (f->check == EDGE_CHECK_LOCALE && !bg_i18n_is_supported(s))
            abort();
        if (f->check == EDGE_CHECK_PASSWORD)
            (void)bg_validate_password(s, v->str[0]); /* what the register handler does next */
        break;
    }
    case EDGE_F_STR_ARRAY: {
        const bg_json_t *a = v->arr[k];
        if (a == NULL || !bg_json_is_array(a) || (f->max_len > 0 && bg_json_len(a) > f->max_len))
            abort();
        for (size_t i = 0; i < bg_json_len(a); i++) {
            size_t len;
            const char *s = bg_json_str(bg_json_at(a, i), &len);
            if (s == NULL || len == 0 || len > 64 || strlen(s) != len)
                abort();
        }
        break;
    }
    case EDGE_F_INT:
    case EDGE_F_BOOL:
        break;
    }
}

static void validate_against(const char *body, size_t size, const edge_field_t *fields, size_t n)
{
    void *doc = (void *)&doc; /* must be overwritten */
    edge_values_t values;
    edge_body_error_t err;
    int r = edge_body_validate(body, size, fields, n, &doc, &values, &err);
    if (r == 0) {
        if (doc == NULL)
            abort();
        for (size_t k = 0; k < n; k++)
            check_accepted(&fields[k], k, &values);
        bg_json_doc_free(doc);
        return;
    }
    if (r > 0 || err.code == NULL)
        abort();
    if (strcmp(err.code, "validation_failed") == 0) {
        if (err.field == NULL || err.reason == NULL)
            abort();
        bool unknown = strcmp(err.reason, "unknown_field") == 0;
        if (unknown != (doc != NULL))
            abort();
        if (!unknown) {
            /* the field at fault is one of the spec's */
            bool declared = false;
            for (size_t k = 0; k < n && !declared; k++)
                declared = strcmp(fields[k].name, err.field) == 0;
            if (!declared)
                abort();
        }
    } else if (strcmp(err.code, "malformed_json") == 0 ||
               strcmp(err.code, "payload_too_large") == 0) {
        if (doc != NULL || (size > 0 && err.offset > size))
            abort();
    } else {
        abort();
    }
    bg_json_doc_free(doc);
}

/* The parser alone under the edge's body limits with the /auth routes' 16 KiB cap. */
static void parse_like_the_edge(const char *body, size_t size)
{
    static const bg_json_limits_t limits = {
        .max_bytes = 16384, .max_depth = 8, .max_string = 0, .max_members = 64, .max_values = 4096};
    bg_json_doc_t *doc = NULL;
    const char *desc = NULL;
    size_t offset = 0;
    int r = bg_json_parse(body, size, &limits, &doc, &desc, &offset);
    if (r != 0) {
        if (doc != NULL || desc == NULL || offset > size ||
            (r != BG_ERR_INVALID && r != BG_ERR_TOO_LARGE && r != BG_ERR_DEPTH))
            abort();
        return;
    }
    if (size > limits.max_bytes || bg_json_root(doc) == NULL)
        abort();
    bg_json_doc_free(doc);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* a copy of exactly size bytes, so ASan sees any read past the end */
    char *body = malloc(size > 0 ? size : 1);
    if (body == NULL)
        return 0;
    if (size > 0)
        memcpy(body, data, size);
    for (size_t i = 0; i < sizeof(specs) / sizeof(specs[0]); i++)
        validate_against(body, size, specs[i].fields, specs[i].n);
    parse_like_the_edge(body, size);
    free(body);
    return 0;
}
