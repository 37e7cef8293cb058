/*
 * Clocks and RFC 3339 timestamps.
 *
 * Conversion goes through timegm and gmtime_r, which never consult the local time zone: the process
 * may run with any TZ and still writes and reads UTC. Milliseconds are split off with floor
 * division so that instants before 1970 format correctly too.
 */
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "bg/err.h"
#include "bg/timeutil.h"

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

uint64_t bg_timeutil_mono_ms(void)
{
    return mono_ns() / 1000000u;
}

uint64_t bg_timeutil_mono_us(void)
{
    return mono_ns() / 1000u;
}

int64_t bg_timeutil_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int bg_timeutil_format_rfc3339(char *out, size_t outlen, int64_t unix_ms, bool millis)
{
    int64_t sec = unix_ms / 1000;
    int64_t ms = unix_ms % 1000;
    if (ms < 0) {
        ms += 1000;
        sec--;
    }
    time_t t = (time_t)sec;
    struct tm tm;
    if (gmtime_r(&t, &tm) == NULL || tm.tm_year < -1900 || tm.tm_year > 9999 - 1900)
        return BG_ERR_INVALID;
    int n;
    if (millis)
        n = snprintf(out, outlen, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                     tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)ms);
    else
        n = snprintf(out, outlen, "%04d-%02d-%02dT%02d:%02d:%02dZ", tm.tm_year + 1900,
                     tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
    if (n < 0 || (size_t)n >= outlen) {
        if (outlen > 0)
            out[0] = '\0';
        return BG_ERR_TOO_LARGE;
    }
    return 0;
}

/* Reads exactly n decimal digits at s; returns the value or -1. */
static int digits(const char *s, size_t n)
{
    int v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v;
}

static bool is_leap(int y)
{
    return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
}

static int days_in_month(int y, int m)
{
    static const int days[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    return m == 2 && is_leap(y) ? 29 : days[m - 1];
}

int bg_timeutil_parse_rfc3339(const char *s, size_t len, int64_t *unix_ms)
{
    /* The fixed part: "YYYY-MM-DDTHH:MM:SS" is 19 bytes, then a fraction and a zone. */
    if (s == NULL || len < 20)
        return BG_ERR_INVALID;
    if (s[4] != '-' || s[7] != '-' || s[13] != ':' || s[16] != ':')
        return BG_ERR_INVALID;
    if (s[10] != 'T' && s[10] != 't' && s[10] != ' ')
        return BG_ERR_INVALID;
    int year = digits(s, 4), mon = digits(s + 5, 2), day = digits(s + 8, 2);
    int hour = digits(s + 11, 2), min = digits(s + 14, 2), sec = digits(s + 17, 2);
    if (year < 0 || mon < 1 || mon > 12 || day < 1 || day > days_in_month(year, mon))
        return BG_ERR_INVALID;
    if (hour < 0 || hour > 23 || min < 0 || min > 59 || sec < 0 || sec > 60)
        return BG_ERR_INVALID;

    size_t i = 19;
    int ms = 0;
    if (s[i] == '.') {
        size_t start = ++i;
        while (i < len && s[i] >= '0' && s[i] <= '9') {
            if (i - start < 3)
                ms = ms * 10 + (s[i] - '0');
            i++;
        }
        size_t n = i - start;
        if (n == 0 || n > 9)
            return BG_ERR_INVALID;
        for (; n < 3; n++)
            ms *= 10;
    }

    int offset_min = 0;
    if (i + 1 == len && (s[i] == 'Z' || s[i] == 'z')) {
        offset_min = 0;
    } else if (i + 6 == len && (s[i] == '+' || s[i] == '-') && s[i + 3] == ':') {
        int oh = digits(s + i + 1, 2), om = digits(s + i + 4, 2);
        if (oh < 0 || oh > 23 || om < 0 || om > 59)
            return BG_ERR_INVALID;
        offset_min = (oh * 60 + om) * (s[i] == '-' ? -1 : 1);
    } else {
        return BG_ERR_INVALID;
    }

    struct tm tm = {
        .tm_year = year - 1900,
        .tm_mon = mon - 1,
        .tm_mday = day,
        .tm_hour = hour,
        .tm_min = min,
        .tm_sec = sec,
    };
    /* timegm normalises second 60 into the next minute. */
    time_t t = timegm(&tm);
    *unix_ms = ((int64_t)t - (int64_t)offset_min * 60) * 1000 + ms;
    return 0;
}
