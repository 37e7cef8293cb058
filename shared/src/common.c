/*
 * Allocation helpers that abort on out-of-memory, and small string helpers.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bg/common.h"

void bg_oom(size_t size)
{
    /* Write directly: the logger itself may need memory. */
    char line[96];
    int n = snprintf(line, sizeof(line), "fatal: out of memory allocating %zu bytes\n", size);
    if (n > 0) {
        ssize_t w = write(STDERR_FILENO, line, (size_t)n);
        (void)w;
    }
    abort();
}

void *bg_malloc(size_t size)
{
    void *p = malloc(size == 0 ? 1 : size);
    if (p == NULL)
        bg_oom(size);
    return p;
}

void *bg_calloc(size_t n, size_t size)
{
    void *p = calloc(n == 0 ? 1 : n, size == 0 ? 1 : size);
    if (p == NULL)
        bg_oom(n * size);
    return p;
}

void *bg_realloc(void *p, size_t size)
{
    void *q = realloc(p, size == 0 ? 1 : size);
    if (q == NULL)
        bg_oom(size);
    return q;
}

char *bg_strdup(const char *s)
{
    if (s == NULL)
        return NULL;
    return bg_strndup(s, strlen(s));
}

char *bg_strndup(const char *s, size_t n)
{
    size_t len = strnlen(s, n);
    char *p = bg_malloc(len + 1);
    memcpy(p, s, len);
    p[len] = '\0';
    return p;
}

char *bg_asprintf(const char *fmt, ...)
{
    va_list ap;
    char *out = NULL;
    va_start(ap, fmt);
    int n = vasprintf(&out, fmt, ap);
    va_end(ap);
    if (n < 0)
        bg_oom(strlen(fmt));
    return out;
}

bool bg_strlcpy(char *dst, const char *src, size_t dstsize)
{
    if (dstsize == 0)
        return src[0] == '\0';
    size_t n = strnlen(src, dstsize);
    bool fits = n < dstsize;
    if (!fits)
        n = dstsize - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
    return fits;
}
