/*
 * i18n: which language a reply is in, what happens when a translation is missing, and how
 * placeholders are filled.
 */
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "bg/err.h"
#include "bg/i18n.h"

static void init_shipped(void)
{
    char err[256] = "";
    cr_assert_eq(bg_i18n_init("en,ru,es", "en", err, sizeof(err)), 0, "%s", err);
}

static void fini(void)
{
    bg_i18n_dispose();
}

/* Formats into a fresh buffer; the caller frees the result. */
static char *fmt(const char *locale, const char *key, const char *const params[])
{
    bg_buf_t b;
    bg_buf_init(&b, 4096);
    cr_assert_eq(bg_i18n_format(&b, locale, key, params), 0);
    return bg_buf_steal(&b, NULL);
}

static void assert_fmt(const char *locale, const char *key, const char *const params[],
                       const char *want)
{
    char *got = fmt(locale, key, params);
    cr_assert_str_eq(got, want);
    free(got);
}

TestSuite(i18n, .fini = fini);

Test(i18n, init_loads_the_supported_locales)
{
    char err[256] = "";
    cr_assert_eq(bg_i18n_init(" en , ru,es,ru ", "ru", err, sizeof(err)), 0, "%s", err);
    cr_assert_str_eq(bg_i18n_supported(), "en,ru,es");
    cr_assert_str_eq(bg_i18n_default(), "ru");
    cr_assert(bg_i18n_is_supported("es"));
    cr_assert(bg_i18n_is_supported("RU"));
    cr_assert_not(bg_i18n_is_supported("de"));
    cr_assert_not(bg_i18n_is_supported(NULL));
}

Test(i18n, init_fails_naming_the_locale_without_catalogue)
{
    char err[256] = "";
    cr_assert_eq(bg_i18n_init("en,fr", "en", err, sizeof(err)), BG_ERR_CONFIG);
    cr_assert(strstr(err, "\"fr\"") != NULL, "%s", err);
    cr_assert_eq(bg_i18n_init("en,ru", "de", err, sizeof(err)), BG_ERR_CONFIG);
    cr_assert(strstr(err, "BG_DEFAULT_LOCALE") != NULL && strstr(err, "de") != NULL, "%s", err);
    cr_assert_eq(bg_i18n_init("", "en", err, sizeof(err)), BG_ERR_CONFIG);
    cr_assert_eq(bg_i18n_init("en,../etc", "en", err, sizeof(err)), BG_ERR_CONFIG);
    cr_assert(strstr(err, "../etc") != NULL, "%s", err);
}

Test(i18n, negotiation_prefers_the_user_setting_then_accept_language)
{
    init_shipped();
    cr_assert_str_eq(bg_i18n_negotiate(NULL, NULL), "en");
    cr_assert_str_eq(bg_i18n_negotiate("ru", "es"), "ru", "the user's setting wins");
    cr_assert_str_eq(bg_i18n_negotiate("ru-RU", NULL), "ru");
    cr_assert_str_eq(bg_i18n_negotiate("de", "es"), "es", "unsupported setting is skipped");
    cr_assert_str_eq(bg_i18n_negotiate("", "es-MX"), "es");
    cr_assert_str_eq(bg_i18n_negotiate(NULL, "ru-RU,ru;q=0.9,en-US;q=0.8,en;q=0.7"), "ru");
    cr_assert_str_eq(bg_i18n_negotiate(NULL, "de-DE, es;q=0.5, ru;q=0.8"), "ru", "by q-value");
    cr_assert_str_eq(bg_i18n_negotiate(NULL, "es;q=0.8, ru;q=0.8"), "es", "ties keep order");
    cr_assert_str_eq(bg_i18n_negotiate(NULL, "EN-gb"), "en", "case-insensitive");
    cr_assert_str_eq(bg_i18n_negotiate(NULL, "fr, de"), "en", "nothing matches: the default");
    cr_assert_str_eq(bg_i18n_negotiate(NULL, "fr, *;q=0.1"), "en", "the wildcard is the default");
    cr_assert_str_eq(bg_i18n_negotiate(NULL, "en;q=0, *"), "ru", "q=0 excludes, even from *");
    cr_assert_str_eq(bg_i18n_negotiate(NULL, "ru;q=0"), "en");
    cr_assert_str_eq(bg_i18n_negotiate(NULL, "ru;q=abc, es;q=0.1"), "es", "bad q is ignored");
    cr_assert_str_eq(bg_i18n_negotiate(NULL, "ru;q=1.5, es;q=0.1"), "es", "q above 1 too");
    cr_assert_str_eq(bg_i18n_negotiate(NULL, ";;;,,,q=, ;q=1"), "en");
    cr_assert_str_eq(bg_i18n_negotiate(NULL, ""), "en");
}

Test(i18n, negotiation_survives_a_huge_header)
{
    init_shipped();
    static char header[64 * 1024];
    size_t n = 0;
    /* Leave room for "ru" and its NUL after the last range. */
    while (n + 7 + 3 <= sizeof(header)) {
        memcpy(header + n, "xx;q=1,", 7);
        n += 7;
    }
    memcpy(header + n, "ru", 3);
    cr_assert_str_eq(bg_i18n_negotiate(NULL, header), "en", "only the first 32 ranges count");
}

Test(i18n, placeholders_are_substituted)
{
    init_shipped();
    static const char *const field[] = {"field", "email", NULL};
    assert_fmt("en", "error.validation.missing", field, "The field “email” is required.");
    assert_fmt("ru", "error.validation.missing", field, "Поле «email» обязательно для заполнения.");
    assert_fmt("es", "error.validation.missing", field, "El campo «email» es obligatorio.");
    static const char *const two[] = {"min", "8", "field", "password", NULL};
    assert_fmt("en", "error.validation.too_short", two,
               "The field “password” must be at least 8 characters long.");
    assert_fmt("en", "error.rate_limited", (const char *const[]){"retry_after", "30", NULL},
               "Too many requests. Please try again in 30 s.");
    assert_fmt("ru", "error.validation.unsupported_locale",
               (const char *const[]){"supported", bg_i18n_supported(), NULL},
               "Этот язык не поддерживается. Выберите один из доступных: en,ru,es.");
    /* A parameter without a placeholder is ignored; a placeholder without a parameter stays. */
    assert_fmt("en", "error.validation.missing", NULL, "The field “{field}” is required.");
    assert_fmt(NULL, "error.not_found", field, "The requested resource was not found.");
    assert_fmt("de", "error.not_found", NULL, "The requested resource was not found.");
}

Test(i18n, a_missing_key_falls_back_per_key_then_to_the_key)
{
    static const char *const tags[] = {"en", "ru"};
    static const char *const texts[] = {
        "{\"greeting\":\"Hello, {name}!\",\"only.en\":\"English only\"}",
        "{\"greeting\":\"Привет, {name}!\"}",
    };
    const size_t lens[] = {strlen(texts[0]), strlen(texts[1])};
    char err[256] = "";
    cr_assert_eq(bg__i18n_load(tags, texts, lens, 2, "en", err, sizeof(err)), 0, "%s", err);
    static const char *const name[] = {"name", "Аня", NULL};
    assert_fmt("ru", "greeting", name, "Привет, Аня!");
    assert_fmt("ru", "only.en", NULL, "English only");
    assert_fmt("ru", "nowhere", NULL, "nowhere");
    cr_assert_null(bg_i18n_text("ru", "only.en"), "no fallback in the raw lookup");
    cr_assert_str_eq(bg_i18n_text("en", "only.en"), "English only");
}

Test(i18n, malformed_catalogues_are_refused)
{
    static const char *const tags[] = {"en"};
    char err[256] = "";
    static const char *const bad[] = {"[\"x\"]", "{\"a\":1}", "{\"a\":\"x\",\"a\":\"y\"}", "{"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        const char *texts[] = {bad[i]};
        const size_t lens[] = {strlen(bad[i])};
        cr_assert_eq(bg__i18n_load(tags, texts, lens, 1, "en", err, sizeof(err)), BG_ERR_CONFIG,
                     "%s", bad[i]);
        cr_assert(strstr(err, "\"en\"") != NULL, "%s", err);
    }
}

Test(i18n, format_respects_the_buffer_cap)
{
    init_shipped();
    bg_buf_t b;
    bg_buf_init(&b, 10);
    cr_assert_eq(bg_buf_puts(&b, "x"), 0);
    cr_assert_eq(bg_i18n_format(&b, "en", "error.internal", NULL), BG_ERR_TOO_LARGE);
    cr_assert_str_eq(b.base, "x");
    bg_buf_dispose(&b);
}
