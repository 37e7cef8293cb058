/*
 * Clocks and RFC 3339 timestamps.
 *
 * Durations and deadlines use the monotonic clock (never steps); timestamps shown to people or
 * stored use the wall clock in milliseconds since the Unix epoch. The API speaks RFC 3339 in UTC
 * ("2024-05-01T12:00:00Z", optionally with milliseconds) and accepts any offset on input.
 */
#ifndef BG_TIMEUTIL_H
#define BG_TIMEUTIL_H

#include "bg/common.h"

/** Buffer size that fits any timestamp bg_timeutil_format_rfc3339 writes, NUL included. */
#define BG_RFC3339_BUFSIZE 32

/** Milliseconds of the monotonic clock (arbitrary origin). */
uint64_t bg_timeutil_mono_ms(void);
/** Microseconds of the monotonic clock (arbitrary origin). */
uint64_t bg_timeutil_mono_us(void);
/** Milliseconds since the Unix epoch (wall clock). */
int64_t bg_timeutil_wall_ms(void);

/**
 * Writes unix_ms as "YYYY-MM-DDTHH:MM:SSZ", or with millis "YYYY-MM-DDTHH:MM:SS.mmmZ", plus a NUL.
 * Returns 0, BG_ERR_TOO_LARGE when outlen is too small (BG_RFC3339_BUFSIZE always suffices), or
 * BG_ERR_INVALID when the year falls outside 0000–9999.
 */
BG_MUSTCHECK int bg_timeutil_format_rfc3339(char *out, size_t outlen, int64_t unix_ms, bool millis);

/**
 * Parses an RFC 3339 date-time of exactly len bytes:
 * "YYYY-MM-DDTHH:MM:SS[.fraction](Z|+hh:mm|-hh:mm)"
 * ('t', 'z' and a space for 'T' accepted; the fraction has 1 to 9 digits, cut to milliseconds;
 * second 60 is accepted and rolls over as a leap second would). Checks the day against the month.
 * Returns 0 with *unix_ms set, or BG_ERR_INVALID.
 */
BG_MUSTCHECK int bg_timeutil_parse_rfc3339(const char *s, size_t len, int64_t *unix_ms);

#endif
