/*
 * The shipped catalogues (each locales/<locale>.json, as compiled into the binary): every locale
 * has exactly the keys of en.json with the same placeholders, every API error has a message
 * everywhere, and the files stay sorted. Adding a key to one locale only, or dropping a placeholder
 * in a translation, fails here.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "bg/err.h"
#include "bg/i18n.h"
#include "bg/json.h"
#include "bg/resource.h"

static bg_json_doc_t *load(const bg_resource_t *res)
{
    bg_json_doc_t *doc;
    const char *desc = "";
    size_t off = 0;
    cr_assert_eq(bg_json_parse(res->data, res->len, NULL, &doc, &desc, &off), 0,
                 "%s: %s at byte %zu", res->name, desc, off);
    cr_assert(bg_json_is_object(bg_json_root(doc)), "%s is not an object", res->name);
    return doc;
}

/* Writes the sorted, de-duplicated placeholder names of text as "a,b,c" into out. */
static void placeholders(const char *text, char *out, size_t outlen)
{
    char names[32][64];
    size_t n = 0;
    for (const char *p = strchr(text, '{'); p != NULL; p = strchr(p + 1, '{')) {
        size_t len =
            strspn(p + 1, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_");
        if (len == 0 || p[1 + len] != '}' || len >= sizeof(names[0]) || n == 32)
            continue;
        char name[64];
        memcpy(name, p + 1, len);
        name[len] = '\0';
        size_t i = 0;
        while (i < n && strcmp(names[i], name) < 0)
            i++;
        if (i < n && strcmp(names[i], name) == 0)
            continue;
        memmove(names[i + 1], names[i], (n - i) * sizeof(names[0]));
        memcpy(names[i], name, len + 1);
        n++;
    }
    size_t o = 0;
    out[0] = '\0';
    for (size_t i = 0; i < n; i++)
        o += (size_t)snprintf(out + o, outlen - o, "%s%s", i ? "," : "", names[i]);
}

Test(locales, at_least_en_ru_es_ship)
{
    cr_assert_not_null(bg_resource_find("locales/en.json"));
    cr_assert_not_null(bg_resource_find("locales/ru.json"));
    cr_assert_not_null(bg_resource_find("locales/es.json"));
}

Test(locales, every_catalogue_has_the_keys_and_placeholders_of_en)
{
    bg_json_doc_t *en_doc = load(bg_resource_find("locales/en.json"));
    const bg_json_t *en = bg_json_root(en_doc);
    size_t count;
    const bg_resource_t *res = bg_resource_list("locales/", &count);
    cr_assert_geq(count, 3);
    for (size_t r = 0; r < count; r++) {
        bg_json_doc_t *doc = load(&res[r]);
        const bg_json_t *cat = bg_json_root(doc);
        const char *key;
        for (size_t i = 0; i < bg_json_len(cat); i++) {
            const bg_json_t *v = bg_json_member(cat, i, &key);
            size_t len = 0;
            cr_assert_not_null(bg_json_str(v, &len), "%s: %s is not a string", res[r].name, key);
            cr_assert_gt(len, 0, "%s: %s is empty", res[r].name, key);
            cr_assert_not_null(bg_json_find(en, key), "%s has \"%s\", which en.json lacks",
                               res[r].name, key);
        }
        for (size_t i = 0; i < bg_json_len(en); i++) {
            const bg_json_t *want = bg_json_member(en, i, &key);
            const char *text = bg_json_str(bg_json_find(cat, key), NULL);
            cr_assert_not_null(text, "%s lacks \"%s\"", res[r].name, key);
            char a[512], b[512];
            placeholders(bg_json_str(want, NULL), a, sizeof(a));
            placeholders(text, b, sizeof(b));
            cr_assert_str_eq(b, a, "%s: \"%s\" has placeholders {%s}, en.json has {%s}",
                             res[r].name, key, b, a);
        }
        bg_json_doc_free(doc);
    }
    bg_json_doc_free(en_doc);
}

Test(locales, every_api_error_has_a_message_in_every_catalogue)
{
    size_t nerr, count;
    const bg_api_error_t *errors = bg_api_error_table(&nerr);
    const bg_resource_t *res = bg_resource_list("locales/", &count);
    cr_assert_gt(nerr, 0);
    for (size_t r = 0; r < count; r++) {
        bg_json_doc_t *doc = load(&res[r]);
        for (size_t i = 0; i < nerr; i++) {
            cr_assert_not_null(
                bg_json_str(bg_json_find(bg_json_root(doc), errors[i].msg_key), NULL),
                "%s has no message for %s (code %s)", res[r].name, errors[i].msg_key,
                errors[i].code);
        }
        bg_json_doc_free(doc);
    }
}

Test(locales, validation_messages_exist)
{
    static const char *const keys[] = {
        "error.validation.missing",
        "error.validation.wrong_type",
        "error.validation.unknown_field",
        "error.validation.too_long",
        "error.validation.invalid_email",
        "error.validation.weak_password",
        "error.validation.unsupported_locale",
    };
    bg_json_doc_t *doc = load(bg_resource_find("locales/en.json"));
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
        cr_assert_not_null(bg_json_find(bg_json_root(doc), keys[i]), "%s", keys[i]);
    char ph[128];
    placeholders(
        bg_json_str(bg_json_find(bg_json_root(doc), "error.validation.unsupported_locale"), NULL),
        ph, sizeof(ph));
    cr_assert_str_eq(ph, "supported");
    bg_json_doc_free(doc);
}

Test(locales, catalogue_keys_are_sorted)
{
    size_t count;
    const bg_resource_t *res = bg_resource_list("locales/", &count);
    for (size_t r = 0; r < count; r++) {
        bg_json_doc_t *doc = load(&res[r]);
        const bg_json_t *cat = bg_json_root(doc);
        const char *prev = NULL, *key;
        for (size_t i = 0; i < bg_json_len(cat); i++) {
            bg_json_member(cat, i, &key);
            if (prev != NULL)
                cr_assert_lt(strcmp(prev, key), 0, "%s: \"%s\" comes after \"%s\"", res[r].name,
                             key, prev);
            prev = key;
        }
        bg_json_doc_free(doc);
    }
}

Test(locales, every_shipped_locale_loads)
{
    size_t count;
    const bg_resource_t *res = bg_resource_list("locales/", &count);
    char csv[512] = "";
    size_t o = 0;
    for (size_t r = 0; r < count; r++) {
        const char *name = res[r].name + strlen("locales/");
        int len = (int)(strcspn(name, "."));
        o += (size_t)snprintf(csv + o, sizeof(csv) - o, "%s%.*s", r ? "," : "", len, name);
    }
    char err[256] = "";
    cr_assert_eq(bg_i18n_init(csv, "en", err, sizeof(err)), 0, "%s", err);
    bg_i18n_dispose();
}
