/*
 * Validation of e-mail addresses and new passwords.
 *
 * The password rules follow NIST SP 800-63B: length first, a block list of the passwords attackers
 * try first, and no composition rules (they make passwords harder to remember, not to guess).
 */
#include <string.h>
#include <strings.h>

#include "bg/validate.h"

bool bg_validate_email(const char *e)
{
    size_t len = strlen(e);
    if (len < 3 || len > 254)
        return false;
    const char *at = strchr(e, '@');
    if (at == NULL || strchr(at + 1, '@') != NULL)
        return false;
    size_t local = (size_t)(at - e);
    const char *domain = at + 1;
    size_t dlen = strlen(domain);
    if (local == 0 || local > 64 || dlen < 3 || strchr(domain, '.') == NULL)
        return false;
    if (e[0] == '.' || e[local - 1] == '.' || domain[0] == '.' || domain[0] == '-' ||
        domain[dlen - 1] == '.' || domain[dlen - 1] == '-' || strstr(e, "..") != NULL)
        return false;
    for (const unsigned char *p = (const unsigned char *)e; *p != '\0'; p++) {
        if (*p <= 0x20 || *p == 0x7f || strchr("\"(),:;<>[\\]", *p) != NULL)
            return false;
    }
    /* domain labels: letters, digits, hyphens, or UTF-8 bytes of an internationalised name */
    for (const unsigned char *p = (const unsigned char *)domain; *p != '\0'; p++) {
        bool ok = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
                  (*p >= '0' && *p <= '9') || *p == '-' || *p == '.' || *p >= 0x80;
        if (!ok)
            return false;
    }
    return true;
}

size_t bg_utf8_chars(const char *s)
{
    size_t n = 0;
    for (const unsigned char *p = (const unsigned char *)s; *p != '\0'; p++) {
        if ((*p & 0xC0) != 0x80)
            n++;
    }
    return n;
}

/* The first passwords every credential-stuffing list tries (all at least 10 characters long). */
static const char *const common_passwords[] = {
    "1234567890",  "12345678910",  "123456789a",  "0123456789",    "1q2w3e4r5t",  "1qaz2wsx3edc",
    "aaaaaaaaaa",  "abc1234567",   "abcdefghij",  "iloveyou12",    "password01",  "password12",
    "password123", "password1234", "passw0rd123", "qwerty1234",    "qwerty12345", "qwertyuiop",
    "qwertyuiop1", "letmein123",   "welcome123",  "administrator", "changeme123", "trustno1234",
    "football123", "monkey12345",  "dragon12345", "sunshine123",   "princess123", "zaq12wsxcde",
};

const char *bg_validate_password(const char *password, const char *email)
{
    size_t bytes = strlen(password);
    if (bytes > BG_PASSWORD_MAX_BYTES)
        return "too_long";
    if (bg_utf8_chars(password) < BG_PASSWORD_MIN_CHARS)
        return "too_short";
    for (size_t i = 0; i < BG_ARRAY_SIZE(common_passwords); i++) {
        if (strcasecmp(password, common_passwords[i]) == 0)
            return "common";
    }
    bool same = true;
    for (size_t i = 1; i < bytes && same; i++)
        same = password[i] == password[0];
    if (same)
        return "common";
    if (email != NULL && email[0] != '\0') {
        const char *at = strchr(email, '@');
        size_t local = at != NULL ? (size_t)(at - email) : strlen(email);
        if (strcasecmp(password, email) == 0 ||
            (local == bytes && strncasecmp(password, email, local) == 0))
            return "matches_email";
    }
    return NULL;
}
