/*
 * Identifiers: UUIDv7 for stored objects and short request ids.
 *
 * UUIDv7 (RFC 9562) starts with the Unix time in milliseconds, so ids sort by creation time and
 * index well in Postgres. Ids made by one process are strictly increasing, even within one
 * millisecond or when the wall clock steps back: the 12 bits of rand_a and the first 30 bits of
 * rand_b form a counter (RFC 9562 §6.2, method 1) seeded randomly at each new millisecond; the
 * remaining 32 bits are fresh random. Randomness comes from libsodium.
 *
 * Request ids are 26 characters of Crockford base32 (the ULID alphabet): 48 bits of milliseconds
 * and 80 random bits. They are URL- and header-safe, sort by time, and collide with negligible
 * probability.
 */
#ifndef BG_ID_H
#define BG_ID_H

#include "bg/common.h"

/** Length of the text form of a UUID ("xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"), without the NUL. */
#define BG_UUID_STR_LEN 36
/** Length of a request id, without the NUL. */
#define BG_REQUEST_ID_LEN 26

typedef struct bg_uuid {
    uint8_t b[16]; /**< network byte order */
} bg_uuid_t;

/**
 * Makes a new UUIDv7, greater than every one this process made before. Thread-safe. Aborts with a
 * log line when libsodium cannot be initialised (no secure randomness: nothing sensible to fall
 * back to).
 */
void bg_id_uuid_v7(bg_uuid_t *out);

/** Writes the lower-case text form and a NUL into out (BG_UUID_STR_LEN + 1 bytes). */
void bg_id_uuid_format(const bg_uuid_t *u, char out[BG_UUID_STR_LEN + 1]);

/** Makes a new UUIDv7 and writes its text form into out, for the common case. */
void bg_id_uuid_v7_str(char out[BG_UUID_STR_LEN + 1]);

/**
 * Parses the canonical text form (8-4-4-4-12 hex digits, either case; exactly len bytes, no braces,
 * no "urn:uuid:"). Returns 0 (filling out when not NULL) or BG_ERR_INVALID. Any version is
 * accepted: this is what a path id is checked with before it reaches Postgres.
 */
BG_MUSTCHECK int bg_id_uuid_parse(const char *s, size_t len, bg_uuid_t *out);

/** Returns true when s (NUL-terminated, may be NULL) is a UUID in canonical text form. */
bool bg_id_uuid_is_valid(const char *s);

/** Returns the version field (7 for bg_id_uuid_v7). */
int bg_id_uuid_version(const bg_uuid_t *u);

/** Returns the Unix time in milliseconds stored in a UUIDv7. */
int64_t bg_id_uuid_v7_ms(const bg_uuid_t *u);

/** Writes a new request id and a NUL into out (BG_REQUEST_ID_LEN + 1 bytes). Thread-safe. */
void bg_id_request(char out[BG_REQUEST_ID_LEN + 1]);

/**
 * Returns true when s is acceptable as a request id coming from a trusted proxy: 1 to 64 characters
 * from [A-Za-z0-9._-] (so it is safe in headers, logs and JSON without escaping).
 */
bool bg_id_request_is_valid(const char *s);

#endif
