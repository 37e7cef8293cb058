/*
 * Structured logging to stderr, one line per event, as JSON (for collectors) or text (for people).
 *
 * The level is checked before any argument is formatted, so a disabled debug line costs one branch.
 * Each thread carries a context id (the request or job being handled) that rides along on every
 * line it logs; set it when work starts and clear it when it ends. Never pass secrets to these
 * functions.
 */
#ifndef BG_LOG_H
#define BG_LOG_H

#include "bg/common.h"

typedef enum bg_log_level {
    BG_LOG_DEBUG = 0,
    BG_LOG_INFO = 1,
    BG_LOG_WARN = 2,
    BG_LOG_ERROR = 3,
    BG_LOG_OFF = 4
} bg_log_level_t;

typedef enum bg_log_format { BG_LOG_FORMAT_JSON = 0, BG_LOG_FORMAT_TEXT = 1 } bg_log_format_t;

/** The current threshold; read by bg_log() before formatting. */
extern bg_log_level_t bg__log_level;

/** Sets the threshold, the output format and the component name printed on every line. */
void bg_log_setup(bg_log_level_t level, bg_log_format_t format, const char *component);

/** Parses "debug|info|warn|error|off"; returns 0 or BG_ERR_INVALID. */
BG_MUSTCHECK int bg_log_level_parse(const char *s, bg_log_level_t *out);

/** Sets this thread's context id (request or job id), copied; NULL clears it. */
void bg_log_set_context(const char *id);

/** Returns this thread's context id, or "" when none is set. The pointer is valid until the next
 * set. */
const char *bg_log_context(void);

/** Writes one line; use the bg_log() macro, which checks the level first. */
void bg__log_write(bg_log_level_t level, const char *file, int line, const char *fmt, ...)
    BG_PRINTF(4, 5);

/** Returns true when lines of this level are written. */
static inline bool bg_log_enabled(bg_log_level_t level)
{
    return level >= bg__log_level;
}

#define bg_log(level, ...)                                                                         \
    do {                                                                                           \
        if (bg_log_enabled(level))                                                                 \
            bg__log_write((level), __FILE__, __LINE__, __VA_ARGS__);                               \
    } while (0)

#define bg_debug(...) bg_log(BG_LOG_DEBUG, __VA_ARGS__)
#define bg_info(...) bg_log(BG_LOG_INFO, __VA_ARGS__)
#define bg_warn(...) bg_log(BG_LOG_WARN, __VA_ARGS__)
#define bg_error(...) bg_log(BG_LOG_ERROR, __VA_ARGS__)

#endif
