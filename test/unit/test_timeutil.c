/*
 * Clocks and RFC 3339: what the API writes and what it accepts, whatever the process's time zone.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <criterion/criterion.h>

#include "bg/err.h"
#include "bg/timeutil.h"

static int64_t parse(const char *s)
{
    int64_t ms = 0;
    cr_assert_eq(bg_timeutil_parse_rfc3339(s, strlen(s), &ms), 0, "%s should parse", s);
    return ms;
}

static void assert_format(int64_t ms, bool millis, const char *want)
{
    char buf[BG_RFC3339_BUFSIZE];
    cr_assert_eq(bg_timeutil_format_rfc3339(buf, sizeof(buf), ms, millis), 0);
    cr_assert_str_eq(buf, want);
}

Test(timeutil, formats_utc_with_and_without_milliseconds)
{
    assert_format(0, false, "1970-01-01T00:00:00Z");
    assert_format(0, true, "1970-01-01T00:00:00.000Z");
    assert_format(1714564800123, false, "2024-05-01T12:00:00Z");
    assert_format(1714564800123, true, "2024-05-01T12:00:00.123Z");
    assert_format(-1, true, "1969-12-31T23:59:59.999Z");
    assert_format(951782400000, false, "2000-02-29T00:00:00Z");
    assert_format(253402300799999, true, "9999-12-31T23:59:59.999Z");
}

Test(timeutil, format_refuses_small_buffers_and_far_years)
{
    char buf[20];
    cr_assert_eq(bg_timeutil_format_rfc3339(buf, sizeof(buf), 0, false), BG_ERR_TOO_LARGE,
                 "20 bytes leave no room for the NUL");
    cr_assert_eq(bg_timeutil_format_rfc3339(buf, sizeof(buf), 0, true), BG_ERR_TOO_LARGE);
    char big[BG_RFC3339_BUFSIZE];
    cr_assert_eq(bg_timeutil_format_rfc3339(big, sizeof(big), 253402300800000, false),
                 BG_ERR_INVALID, "year 10000");
}

Test(timeutil, parses_zulu_offsets_and_fractions)
{
    cr_assert_eq(parse("2024-05-01T12:00:00Z"), 1714564800000);
    cr_assert_eq(parse("2024-05-01t12:00:00z"), 1714564800000);
    cr_assert_eq(parse("2024-05-01 12:00:00Z"), 1714564800000);
    cr_assert_eq(parse("2024-05-01T14:00:00+02:00"), 1714564800000);
    cr_assert_eq(parse("2024-05-01T06:30:00-05:30"), 1714564800000);
    cr_assert_eq(parse("2024-05-01T12:00:00-00:00"), 1714564800000);
    cr_assert_eq(parse("2024-05-01T12:00:00.5Z"), 1714564800500);
    cr_assert_eq(parse("2024-05-01T12:00:00.123Z"), 1714564800123);
    cr_assert_eq(parse("2024-05-01T12:00:00.123987654Z"), 1714564800123, "cut to milliseconds");
    cr_assert_eq(parse("1969-12-31T23:59:59.999Z"), -1);
    cr_assert_eq(parse("2024-02-29T00:00:00Z"), 1709164800000, "leap day");
    cr_assert_eq(parse("2016-12-31T23:59:60Z"), 1483228800000, "leap second rolls over");
}

Test(timeutil, parse_refuses_what_is_not_rfc3339)
{
    static const char *const bad[] = {
        "",
        "2024-05-01",
        "2024-05-01T12:00:00", /* no zone */
        "2024-05-01T12:00Z",   /* no seconds */
        "2024-5-01T12:00:00Z",
        "2024-05-01T12:00:00.Z", /* empty fraction */
        "2024-05-01T12:00:00.1234567890Z",
        "2024-05-01T12:00:00ZZ",
        "2024-05-01T12:00:00+0200",
        "2024-05-01T12:00:00+24:00",
        "2024-05-01T12:00:00+02:60",
        "2024-13-01T12:00:00Z",
        "2024-00-01T12:00:00Z",
        "2023-02-29T12:00:00Z", /* not a leap year */
        "2024-04-31T12:00:00Z",
        "2024-05-01T24:00:00Z",
        "2024-05-01T12:60:00Z",
        "2024-05-01T12:00:61Z",
        "2024-05-01X12:00:00Z",
        "+2024-05-01T12:00:00Z",
        "2024-05-01T12:00:00 Z",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int64_t ms = 42;
        cr_assert_eq(bg_timeutil_parse_rfc3339(bad[i], strlen(bad[i]), &ms), BG_ERR_INVALID,
                     "\"%s\" should be refused", bad[i]);
    }
    int64_t ms;
    cr_assert_eq(bg_timeutil_parse_rfc3339("2024-05-01T12:00:00Zjunk", 20, &ms), 0,
                 "exactly len bytes are read");
}

Test(timeutil, round_trips_and_ignores_the_local_time_zone)
{
    setenv("TZ", "America/St_Johns", 1);
    tzset();
    char buf[BG_RFC3339_BUFSIZE];
    for (int64_t ms = -86400000LL * 400; ms < 4102444800000LL; ms += 86400000LL * 37 + 3723456) {
        cr_assert_eq(bg_timeutil_format_rfc3339(buf, sizeof(buf), ms, true), 0);
        cr_assert_eq(parse(buf), ms, "%s", buf);
    }
    assert_format(1714564800123, true, "2024-05-01T12:00:00.123Z");
}

Test(timeutil, clocks_advance)
{
    int64_t wall = bg_timeutil_wall_ms();
    int64_t t = (int64_t)time(NULL) * 1000;
    cr_assert_leq(llabs(wall - t), 2000);
    uint64_t ms0 = bg_timeutil_mono_ms(), us0 = bg_timeutil_mono_us();
    usleep(20 * 1000);
    uint64_t ms1 = bg_timeutil_mono_ms(), us1 = bg_timeutil_mono_us();
    cr_assert_geq(ms1 - ms0, 19);
    cr_assert_geq(us1 - us0, 19000);
    cr_assert_lt(us1 - us0, 5000000);
}
