/*
 * Localisation: message catalogues, locale negotiation and message formatting.
 *
 * Catalogues are the flat JSON objects locales/<locale>.json ({"error.not_found": "…"}), compiled
 * into the binary (see resource.h) and loaded once at start-up for every locale of
 * BG_SUPPORTED_LOCALES. Messages may hold named placeholders, "{field}", filled from the parameters
 * given to bg_i18n_format(). A key missing from a locale falls back to the default locale, then to
 * the key itself, so a forgotten translation degrades to English (or to a visible key), never to an
 * error.
 *
 * bg_i18n_init() is for start-up, before threads; everything else only reads and is thread-safe.
 */
#ifndef BG_I18N_H
#define BG_I18N_H

#include "bg/buf.h"
#include "bg/common.h"

/**
 * Loads the catalogue of every locale in supported_csv ("en,ru,es"; spaces around items ignored)
 * and makes default_locale the fallback. Fails with BG_ERR_CONFIG and a message naming the locale
 * in err when a locale is malformed, has no catalogue or a malformed one (not a flat object of
 * strings), when the list is empty, or when default_locale is not in it. Calling it again replaces
 * the catalogues.
 */
BG_MUSTCHECK int bg_i18n_init(const char *supported_csv, const char *default_locale, char *err,
                              size_t errlen);

/**
 * Loads n catalogues given as JSON texts (texts[i] of lens[i] bytes for locale tags[i]) as
 * bg_i18n_init does from the embedded files. For bg_i18n_init and for tests that need catalogues
 * other than the shipped ones.
 */
BG_MUSTCHECK int bg__i18n_load(const char *const tags[], const char *const texts[],
                               const size_t lens[], size_t n, const char *default_locale, char *err,
                               size_t errlen);

/** Frees the catalogues (for tests and clean exits); strings returned before are no longer valid.
 */
void bg_i18n_dispose(void);

/**
 * Picks the supported locale for a reply: user_locale (the user's setting; may be NULL) when
 * supported, else the best match of accept_language (an Accept-Language header; may be NULL) by
 * q-value, where "ru-RU" also matches "ru", "*" matches the default and q=0 excludes; else the
 * default. Tags compare case-insensitively. Returns a string owned by the module (static until the
 * next init or dispose); before init, "en".
 */
const char *bg_i18n_negotiate(const char *user_locale, const char *accept_language);

/** Returns true when locale (exactly, case-insensitively) is one of the supported locales. */
bool bg_i18n_is_supported(const char *locale);

/** Returns the supported locales as a comma-separated list ("en,ru,es"), in configured order. */
const char *bg_i18n_supported(void);

/** Returns the default locale. */
const char *bg_i18n_default(void);

/**
 * Returns the message for key in locale exactly as in its catalogue (no fallback, no placeholders
 * filled), or NULL when the locale is unsupported or lacks the key. Borrowed, static until dispose.
 */
const char *bg_i18n_text(const char *locale, const char *key);

/**
 * Appends the message for key in locale (NULL or unsupported: the default locale), its placeholders
 * replaced from params ("name", "value", "name", "value", …, NULL; may be NULL). A key missing in
 * the locale comes from the default locale, and when missing there too the key itself is written;
 * each such miss, and each placeholder without a parameter (left as "{name}"), is logged once as a
 * warning. Returns 0, or BG_ERR_TOO_LARGE when out's cap was reached (out is left as it was).
 */
BG_MUSTCHECK int bg_i18n_format(bg_buf_t *out, const char *locale, const char *key,
                                const char *const params[]);

#endif
