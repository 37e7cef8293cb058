/*
 * Common definitions for every module of the shared library: attributes, small allocation helpers
 * that abort on out-of-memory, and array-size helpers.
 *
 * Allocation failures of small objects are not recoverable in a service process: the process logs
 * one line and aborts so that its supervisor restarts it, instead of carrying an error path through
 * every caller. Buffers whose size a peer controls never come from here without a cap (see buf.h).
 */
#ifndef BG_COMMON_H
#define BG_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define BG_MUSTCHECK __attribute__((warn_unused_result))
#define BG_PRINTF(fmt, args) __attribute__((format(printf, fmt, args)))
#define BG_NORETURN __attribute__((noreturn))
#define BG_UNUSED __attribute__((unused))

#define BG_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define BG_STRLIT(s) (s), (sizeof(s) - 1)

/** Logs "out of memory" with the size asked for and aborts the process. */
BG_NORETURN void bg_oom(size_t size);

/** malloc that never returns NULL (aborts on failure). The result is owned by the caller. */
void *bg_malloc(size_t size);
/** calloc that never returns NULL. */
void *bg_calloc(size_t n, size_t size);
/** realloc that never returns NULL. */
void *bg_realloc(void *p, size_t size);
/** strdup that never returns NULL; NULL in gives NULL out. */
char *bg_strdup(const char *s);
/** strndup that never returns NULL; copies at most n bytes and terminates the copy. */
char *bg_strndup(const char *s, size_t n);

/**
 * Formats into a newly allocated string (vasprintf that aborts on out-of-memory). The result is
 * owned by the caller.
 */
char *bg_asprintf(const char *fmt, ...) BG_PRINTF(1, 2);

/** Copies src into dst of size dstsize, always terminating; returns true when nothing was cut. */
bool bg_strlcpy(char *dst, const char *src, size_t dstsize);

/** Returns true when s is a non-NULL, non-empty string. */
static inline bool bg_str_present(const char *s)
{
    return s != NULL && s[0] != '\0';
}

#endif
