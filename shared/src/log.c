/*
 * Structured logging.
 *
 * Each line is formatted into a stack buffer and written with one write(2), so lines from different
 * threads never interleave. JSON lines carry ts, level, component, the thread's context id and the
 * message; text lines carry the same fields for a terminal. Messages longer than the buffer are cut
 * and marked, never spilled across lines.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bg/buf.h"
#include "bg/err.h"
#include "bg/log.h"

bg_log_level_t bg__log_level = BG_LOG_INFO;
static bg_log_format_t log_format = BG_LOG_FORMAT_JSON;
static char log_component[32] = "bg";
static _Thread_local char log_ctx[80];

static const char *const level_names[] = {"debug", "info", "warn", "error", "off"};

void bg_log_setup(bg_log_level_t level, bg_log_format_t format, const char *component)
{
    bg__log_level = level;
    log_format = format;
    if (component != NULL)
        bg_strlcpy(log_component, component, sizeof(log_component));
}

int bg_log_level_parse(const char *s, bg_log_level_t *out)
{
    for (size_t i = 0; i < BG_ARRAY_SIZE(level_names); i++) {
        if (strcmp(s, level_names[i]) == 0) {
            *out = (bg_log_level_t)i;
            return 0;
        }
    }
    return BG_ERR_INVALID;
}

void bg_log_set_context(const char *id)
{
    if (id == NULL)
        log_ctx[0] = '\0';
    else
        bg_strlcpy(log_ctx, id, sizeof(log_ctx));
}

const char *bg_log_context(void)
{
    return log_ctx;
}

/* Appends s as the inside of a JSON string; stops silently when the buffer is full. */
static void put_json_chars(char *out, size_t cap, size_t *len, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    for (; *s != '\0'; s++) {
        unsigned char c = (unsigned char)*s;
        char esc[7];
        size_t n = 0;
        if (c == '"' || c == '\\') {
            esc[n++] = '\\';
            esc[n++] = (char)c;
        } else if (c == '\n') {
            esc[n++] = '\\';
            esc[n++] = 'n';
        } else if (c < 0x20) {
            memcpy(esc, "\\u00", 4);
            n = 4;
            esc[n++] = hex[c >> 4];
            esc[n++] = hex[c & 0xf];
        } else {
            esc[n++] = (char)c;
        }
        if (*len + n >= cap)
            return;
        memcpy(out + *len, esc, n);
        *len += n;
    }
}

static void put_raw(char *out, size_t cap, size_t *len, const char *s)
{
    size_t n = strlen(s);
    if (*len + n >= cap)
        n = cap - *len - 1;
    memcpy(out + *len, s, n);
    *len += n;
}

void bg__log_write(bg_log_level_t level, const char *file, int line, const char *fmt, ...)
{
    char msg[2048];
    char out[4096];
    size_t len = 0;
    va_list ap;

    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (n < 0)
        bg_strlcpy(msg, "(unformattable log message)", sizeof(msg));
    else if ((size_t)n >= sizeof(msg))
        memcpy(msg + sizeof(msg) - 5, "...", 4);

    struct timespec ts;
    struct tm tm;
    char when[64];
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    snprintf(when, sizeof(when), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
             (long)(ts.tv_nsec / 1000000) % 1000);

    const char *base = strrchr(file, '/');
    base = base != NULL ? base + 1 : file;
    char src[96];
    snprintf(src, sizeof(src), "%s:%d", base, line);

    if (log_format == BG_LOG_FORMAT_JSON) {
        put_raw(out, sizeof(out), &len, "{\"ts\":\"");
        put_raw(out, sizeof(out), &len, when);
        put_raw(out, sizeof(out), &len, "\",\"level\":\"");
        put_raw(out, sizeof(out), &len, level_names[level]);
        put_raw(out, sizeof(out), &len, "\",\"component\":\"");
        put_json_chars(out, sizeof(out), &len, log_component);
        if (log_ctx[0] != '\0') {
            put_raw(out, sizeof(out), &len, "\",\"ctx\":\"");
            put_json_chars(out, sizeof(out), &len, log_ctx);
        }
        put_raw(out, sizeof(out), &len, "\",\"src\":\"");
        put_json_chars(out, sizeof(out), &len, src);
        put_raw(out, sizeof(out), &len, "\",\"msg\":\"");
        put_json_chars(out, sizeof(out), &len, msg);
        put_raw(out, sizeof(out), &len, "\"}\n");
    } else {
        put_raw(out, sizeof(out), &len, when);
        put_raw(out, sizeof(out), &len, " ");
        put_raw(out, sizeof(out), &len, level_names[level]);
        put_raw(out, sizeof(out), &len, " ");
        put_raw(out, sizeof(out), &len, log_component);
        if (log_ctx[0] != '\0') {
            put_raw(out, sizeof(out), &len, " [");
            put_raw(out, sizeof(out), &len, log_ctx);
            put_raw(out, sizeof(out), &len, "]");
        }
        put_raw(out, sizeof(out), &len, " ");
        put_raw(out, sizeof(out), &len, msg);
        put_raw(out, sizeof(out), &len, " (");
        put_raw(out, sizeof(out), &len, src);
        put_raw(out, sizeof(out), &len, ")\n");
    }
    if (len == 0 || out[len - 1] != '\n') {
        /* Cut by the buffer: end the line anyway so the next one starts clean. */
        if (len >= sizeof(out) - 1)
            len = sizeof(out) - 2;
        out[len++] = '\n';
    }
    ssize_t w = write(STDERR_FILENO, out, len);
    (void)w;
}
