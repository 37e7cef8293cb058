/*
 * Checks of values people type, shared by the API and bgctl so both accept and refuse the same
 * things.
 */
#ifndef BG_VALIDATE_H
#define BG_VALIDATE_H

#include "bg/common.h"

#define BG_PASSWORD_MIN_CHARS 10
#define BG_PASSWORD_MAX_BYTES 1024

/**
 * A pragmatic check of an e-mail address as people type it: RFC 5321 sizes, one '@', a dotted
 * domain, no spaces or control characters. Deliverability is proven by mail, not by syntax.
 */
bool bg_validate_email(const char *email);

/** Counts characters (UTF-8 code points) of a NUL-terminated string. */
size_t bg_utf8_chars(const char *s);

/**
 * Checks a new password: at least BG_PASSWORD_MIN_CHARS characters, at most BG_PASSWORD_MAX_BYTES
 * bytes, not one of the most common passwords, not one repeated character, and not the e-mail
 * address (or its local part) when email is given. Returns NULL when acceptable, else a static
 * reason: "too_short", "too_long", "common", "matches_email".
 */
const char *bg_validate_password(const char *password, const char *email);

#endif
