/*
 * JSON request bodies: parse with the shared bounded parser, then check each declared field (type,
 * presence, length in characters, and a content check such as e-mail or locale). Unknown fields are
 * refused, so a typo in a client ("emial") is a clear 422 instead of a silently ignored value.
 *
 * edge_body_validate() is pure and is the libFuzzer target's entry (test/fuzz/fuzz_bodies.c); the
 * request wrapper turns its error into the one error body with a localized message.
 */
#include <string.h>

#include "bg/err.h"
#include "bg/i18n.h"
#include "bg/id.h"
#include "bg/json.h"
#include "bg/log.h"
#include "bg/validate.h"
#include "edge.h"

static int fail(edge_body_error_t *err, const char *code, const char *field, const char *reason,
                size_t limit)
{
    err->code = code;
    err->field = field;
    err->reason = reason;
    err->limit = limit;
    return BG_ERR_INVALID;
}

static int check_string(const edge_field_t *f, const char *s, size_t len, edge_body_error_t *err)
{
    if (memchr(s, '\0', len) != NULL)
        return fail(err, "validation_failed", f->name, "invalid_value", 0);
    size_t chars = bg_utf8_chars(s);
    if (f->max_len > 0 && chars > f->max_len)
        return fail(err, "validation_failed", f->name, "too_long", f->max_len);
    if (chars < f->min_len)
        return fail(err, "validation_failed", f->name,
                    f->required && chars == 0 ? "missing" : "too_short", f->min_len);
    switch (f->check) {
    case EDGE_CHECK_EMAIL:
        if (!bg_validate_email(s))
            return fail(err, "validation_failed", f->name, "invalid_email", 0);
        break;
    case EDGE_CHECK_PASSWORD:
        /* strength (which may depend on the e-mail) is judged by the handler */
        break;
    case EDGE_CHECK_LOCALE:
        if (!bg_i18n_is_supported(s))
            return fail(err, "validation_failed", f->name, "unsupported_locale", 0);
        break;
    case EDGE_CHECK_UUID:
        if (!bg_id_uuid_is_valid(s))
            return fail(err, "validation_failed", f->name, "invalid_value", 0);
        break;
    case EDGE_CHECK_NONE:
        break;
    }
    return 0;
}

int edge_body_validate(const char *body, size_t len, const edge_field_t *fields, size_t nfields,
                       void **doc_out, edge_values_t *values, edge_body_error_t *err)
{
    static const bg_json_limits_t limits = {
        .max_bytes = 0, .max_depth = 8, .max_string = 0, .max_members = 64, .max_values = 4096};
    bg_json_doc_t *doc = NULL;
    const char *desc = NULL;
    int r;

    memset(values, 0, sizeof(*values));
    memset(err, 0, sizeof(*err));
    *doc_out = NULL;
    assert(nfields <= EDGE_MAX_FIELDS);
    if (len == 0) {
        body = "{}";
        len = 2;
    }
    if ((r = bg_json_parse(body, len, &limits, &doc, &desc, &err->offset)) != 0) {
        err->code = r == BG_ERR_TOO_LARGE ? "payload_too_large" : "malformed_json";
        err->reason = desc;
        return r;
    }
    const bg_json_t *root = bg_json_root(doc);
    if (!bg_json_is_object(root)) {
        err->code = "malformed_json";
        err->reason = "the body must be a JSON object";
        r = BG_ERR_INVALID;
        goto err_free;
    }
    for (size_t i = 0; i < bg_json_len(root); i++) {
        const char *key;
        (void)bg_json_member(root, i, &key);
        bool known = false;
        for (size_t k = 0; k < nfields && !known; k++)
            known = strcmp(fields[k].name, key) == 0;
        if (!known) {
            /* the key lives in the document; keep the document so the caller can name it */
            r = fail(err, "validation_failed", key, "unknown_field", 0);
            *doc_out = doc;
            return r;
        }
    }
    for (size_t k = 0; k < nfields; k++) {
        const edge_field_t *f = &fields[k];
        const bg_json_t *v = bg_json_find(root, f->name);
        if (v == NULL || bg_json_type(v) == BG_JSON_NULL) {
            if (f->required) {
                r = fail(err, "validation_failed", f->name, "missing", 0);
                goto err_free;
            }
            continue;
        }
        switch (f->type) {
        case EDGE_F_STR: {
            size_t slen;
            const char *s = bg_json_str(v, &slen);
            if (s == NULL) {
                r = fail(err, "validation_failed", f->name, "wrong_type", 0);
                goto err_free;
            }
            if ((r = check_string(f, s, slen, err)) != 0)
                goto err_free;
            values->str[k] = s;
            break;
        }
        case EDGE_F_STR_ARRAY:
            if (!bg_json_is_array(v) || (f->max_len > 0 && bg_json_len(v) > f->max_len)) {
                r = fail(err, "validation_failed", f->name,
                         bg_json_is_array(v) ? "too_long" : "wrong_type", f->max_len);
                goto err_free;
            }
            for (size_t i = 0; i < bg_json_len(v); i++) {
                size_t slen;
                const char *s = bg_json_str(bg_json_at(v, i), &slen);
                if (s == NULL || memchr(s, '\0', slen) != NULL || slen == 0 || slen > 64) {
                    r = fail(err, "validation_failed", f->name, "invalid_value", 0);
                    goto err_free;
                }
            }
            values->arr[k] = v;
            break;
        case EDGE_F_INT:
            if (!bg_json_int(v, &values->num[k])) {
                r = fail(err, "validation_failed", f->name, "wrong_type", 0);
                goto err_free;
            }
            break;
        case EDGE_F_BOOL:
            if (!bg_json_bool(v, &values->flag[k])) {
                r = fail(err, "validation_failed", f->name, "wrong_type", 0);
                goto err_free;
            }
            break;
        }
        values->present[k] = true;
    }
    *doc_out = doc;
    return 0;

err_free:
    bg_json_doc_free(doc);
    return r;
}

void edge_invalid_field(edge_req_t *er, const char *field, const char *reason,
                        const char *const params[])
{
    char key[96];
    snprintf(key, sizeof(key), "error.validation.%s", reason);
    /* an unknown field's name comes from the client: echo at most 64 bytes of it, on a UTF-8
     * boundary, so the answer stays small */
    char shown[72];
    size_t flen = strlen(field);
    if (flen > 64) {
        size_t cut = 64;
        while (cut > 0 && ((unsigned char)field[cut] & 0xC0) == 0x80)
            cut--;
        snprintf(shown, sizeof(shown), "%.*s…", (int)cut, field);
        field = shown;
    }
    const char *all[16];
    size_t n = 0;
    all[n++] = "field";
    all[n++] = field;
    for (size_t i = 0; params != NULL && params[i] != NULL && n < BG_ARRAY_SIZE(all) - 1; i++)
        all[n++] = params[i];
    all[n] = NULL;

    bg_strlcpy(er->err_param, field, sizeof(er->err_param));
    bg_buf_t msg, details;
    bg_buf_init(&msg, 2048);
    bg_buf_init(&details, 4096);
    if (bg_i18n_format(&msg, er->locale, key, all) != 0)
        bg_buf_reset(&msg);
    int r = bg_buf_puts(&details, "{\"fields\":[{\"field\":");
    r |= bg_buf_json_str(&details, field, strlen(field));
    r |= bg_buf_puts(&details, ",\"code\":");
    r |= bg_buf_json_str(&details, reason, strlen(reason));
    r |= bg_buf_puts(&details, ",\"message\":");
    r |= bg_buf_json_str(&details, msg.base != NULL ? msg.base : "", msg.len);
    r |= bg_buf_puts(&details, "}]}");
    /* the top-level message is the field's own, which says more than "validation failed" */
    edge_error_msg(er, "validation_failed", msg.base, r == 0 ? details.base : NULL, 0);
    bg_buf_dispose(&msg);
    bg_buf_dispose(&details);
}

bool edge_body(edge_req_t *er, const edge_field_t *fields, size_t nfields, edge_values_t *values)
{
    edge_body_error_t e;
    void *doc = NULL;
    h2o_req_t *req = er->req;
    int r =
        edge_body_validate(req->entity.base, req->entity.len, fields, nfields, &doc, values, &e);
    if (r == 0) {
        er->body_doc = doc;
        return true;
    }
    if (strcmp(e.code, "validation_failed") == 0) {
        char limit[24];
        snprintf(limit, sizeof(limit), "%zu", e.limit);
        const char *params[] = {"max", limit, "min", limit, "supported", bg_i18n_supported(), NULL};
        edge_invalid_field(er, e.field, e.reason, params);
    } else if (strcmp(e.code, "payload_too_large") == 0) {
        edge_error(er, "payload_too_large", NULL, NULL, 0);
    } else {
        char details[64];
        snprintf(details, sizeof(details), "{\"offset\":%zu}", e.offset);
        edge_error(er, "malformed_json", details, NULL, 0);
    }
    bg_json_doc_free(doc);
    return false;
}
