/*
 * Capped growable buffers. Growth doubles the allocation, but never beyond max + 1 (the
 * terminator).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/buf.h"
#include "bg/err.h"

void bg_buf_init(bg_buf_t *b, size_t max)
{
    b->base = NULL;
    b->len = 0;
    b->cap = 0;
    b->max = max;
}

void bg_buf_dispose(bg_buf_t *b)
{
    free(b->base);
    b->base = NULL;
    b->len = 0;
    b->cap = 0;
}

void bg_buf_reset(bg_buf_t *b)
{
    b->len = 0;
    if (b->base != NULL)
        b->base[0] = '\0';
}

/* Makes room for n more bytes plus the terminator; fails when the cap would be passed. */
static int reserve(bg_buf_t *b, size_t n)
{
    if (n > b->max || b->len > b->max - n)
        return BG_ERR_TOO_LARGE;
    size_t need = b->len + n + 1;
    if (need <= b->cap)
        return 0;
    size_t cap = b->cap < 64 ? 64 : b->cap;
    while (cap < need)
        cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    if (cap > b->max + 1)
        cap = b->max + 1;
    b->base = bg_realloc(b->base, cap);
    b->cap = cap;
    return 0;
}

int bg_buf_append(bg_buf_t *b, const void *p, size_t n)
{
    int r = reserve(b, n);
    if (r != 0)
        return r;
    if (n > 0)
        memcpy(b->base + b->len, p, n);
    b->len += n;
    b->base[b->len] = '\0';
    return 0;
}

int bg_buf_puts(bg_buf_t *b, const char *s)
{
    return bg_buf_append(b, s, strlen(s));
}

int bg_buf_putc(bg_buf_t *b, char c)
{
    return bg_buf_append(b, &c, 1);
}

int bg_buf_vprintf(bg_buf_t *b, const char *fmt, va_list ap)
{
    va_list ap2;
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap2);
    va_end(ap2);
    if (n < 0)
        return BG_ERR_INVALID;
    int r = reserve(b, (size_t)n);
    if (r != 0)
        return r;
    vsnprintf(b->base + b->len, (size_t)n + 1, fmt, ap);
    b->len += (size_t)n;
    return 0;
}

int bg_buf_printf(bg_buf_t *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int r = bg_buf_vprintf(b, fmt, ap);
    va_end(ap);
    return r;
}

int bg_buf_json_str(bg_buf_t *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    size_t start = b->len;
    int r = bg_buf_putc(b, '"');
    for (size_t i = 0; r == 0 && i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        switch (c) {
        case '"':
            r = bg_buf_append(b, "\\\"", 2);
            break;
        case '\\':
            r = bg_buf_append(b, "\\\\", 2);
            break;
        case '\n':
            r = bg_buf_append(b, "\\n", 2);
            break;
        case '\r':
            r = bg_buf_append(b, "\\r", 2);
            break;
        case '\t':
            r = bg_buf_append(b, "\\t", 2);
            break;
        default:
            if (c < 0x20) {
                char esc[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 0xf]};
                r = bg_buf_append(b, esc, sizeof(esc));
            } else {
                r = bg_buf_putc(b, (char)c);
            }
        }
    }
    if (r == 0)
        r = bg_buf_putc(b, '"');
    if (r != 0) {
        /* Leave the buffer as it was: a half-written literal is worse than none. */
        b->len = start;
        if (b->base != NULL)
            b->base[start] = '\0';
    }
    return r;
}

char *bg_buf_steal(bg_buf_t *b, size_t *len)
{
    char *p = b->base != NULL ? b->base : bg_strdup("");
    if (len != NULL)
        *len = b->len;
    b->base = NULL;
    b->len = 0;
    b->cap = 0;
    return p;
}
