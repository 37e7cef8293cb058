/*
 * A growable byte buffer with a hard size cap.
 *
 * Every buffer whose size a peer controls is a bg_buf_t with a cap: appending past the cap fails
 * with BG_ERR_TOO_LARGE and leaves the buffer as it was, so a caller can answer 413 instead of
 * growing without bound. The contents are always NUL-terminated (the terminator is not counted in
 * len), so a buffer of text can be handed to C string functions.
 */
#ifndef BG_BUF_H
#define BG_BUF_H

#include <stdarg.h>

#include "bg/common.h"

typedef struct bg_buf {
    char *base; /**< owned; NULL until the first append */
    size_t len; /**< bytes used, excluding the terminator */
    size_t cap; /**< bytes allocated */
    size_t max; /**< hard cap on len */
} bg_buf_t;

/** Initialises an empty buffer that may hold at most max bytes. */
void bg_buf_init(bg_buf_t *b, size_t max);
/** Frees the contents; the buffer may be initialised again. */
void bg_buf_dispose(bg_buf_t *b);
/** Empties the buffer, keeping its allocation. */
void bg_buf_reset(bg_buf_t *b);

/** Appends n bytes. Returns 0 or BG_ERR_TOO_LARGE (nothing appended). */
BG_MUSTCHECK int bg_buf_append(bg_buf_t *b, const void *p, size_t n);
/** Appends a C string. */
BG_MUSTCHECK int bg_buf_puts(bg_buf_t *b, const char *s);
/** Appends one byte. */
BG_MUSTCHECK int bg_buf_putc(bg_buf_t *b, char c);
/** Appends formatted text. Returns 0 or BG_ERR_TOO_LARGE (nothing appended). */
BG_MUSTCHECK int bg_buf_printf(bg_buf_t *b, const char *fmt, ...) BG_PRINTF(2, 3);
BG_MUSTCHECK int bg_buf_vprintf(bg_buf_t *b, const char *fmt, va_list ap) BG_PRINTF(2, 0);

/** Appends s as a JSON string literal (quotes included), escaping as RFC 8259 requires. */
BG_MUSTCHECK int bg_buf_json_str(bg_buf_t *b, const char *s, size_t n);

/** Takes the contents out of the buffer: the caller owns the result (never NULL), the buffer is
 * empty. */
char *bg_buf_steal(bg_buf_t *b, size_t *len);

#endif
