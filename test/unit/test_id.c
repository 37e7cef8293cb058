/*
 * Ids: UUIDv7 order, layout and uniqueness (also across threads), strict parsing of path ids, and
 * request ids.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <criterion/criterion.h>

#include "bg/err.h"
#include "bg/id.h"

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

Test(id, uuid_v7_strictly_increases_across_100k_ids)
{
    enum { N = 100000 };
    bg_uuid_t prev, cur;
    char prev_s[BG_UUID_STR_LEN + 1], cur_s[BG_UUID_STR_LEN + 1];
    bg_id_uuid_v7(&prev);
    bg_id_uuid_format(&prev, prev_s);
    for (int i = 0; i < N; i++) {
        bg_id_uuid_v7(&cur);
        bg_id_uuid_format(&cur, cur_s);
        cr_assert_lt(memcmp(prev.b, cur.b, 16), 0, "id %d not after the one before", i);
        cr_assert_lt(strcmp(prev_s, cur_s), 0, "text forms sort the same way");
        prev = cur;
        memcpy(prev_s, cur_s, sizeof(prev_s));
    }
}

Test(id, uuid_v7_has_version_variant_and_time)
{
    int64_t before = now_ms();
    bg_uuid_t u;
    bg_id_uuid_v7(&u);
    int64_t after = now_ms();
    cr_assert_eq(bg_id_uuid_version(&u), 7);
    cr_assert_eq(u.b[6] >> 4, 7);
    cr_assert_eq(u.b[8] & 0xc0, 0x80, "RFC 9562 variant bits 10");
    cr_assert_geq(bg_id_uuid_v7_ms(&u), before);
    cr_assert_leq(bg_id_uuid_v7_ms(&u), after + 1);

    char s[BG_UUID_STR_LEN + 1];
    bg_id_uuid_format(&u, s);
    cr_assert_eq(strlen(s), 36);
    cr_assert_eq(s[14], '7');
    cr_assert(strchr("89ab", s[19]) != NULL);
    bg_uuid_t back;
    cr_assert_eq(bg_id_uuid_parse(s, strlen(s), &back), 0);
    cr_assert_eq(memcmp(back.b, u.b, 16), 0);
}

enum { THREADS = 4, PER_THREAD = 25000 };

static void *make_ids(void *arg)
{
    bg_uuid_t *out = arg;
    for (int i = 0; i < PER_THREAD; i++)
        bg_id_uuid_v7(&out[i]);
    return NULL;
}

static int cmp_uuid(const void *a, const void *b)
{
    return memcmp(a, b, 16);
}

Test(id, uuid_v7_is_unique_and_ordered_across_threads)
{
    bg_uuid_t *ids = calloc(THREADS * PER_THREAD, sizeof(*ids));
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++)
        cr_assert_eq(pthread_create(&t[i], NULL, make_ids, ids + i * PER_THREAD), 0);
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
    for (int i = 0; i < THREADS; i++) {
        for (int j = 1; j < PER_THREAD; j++)
            cr_assert_lt(cmp_uuid(&ids[i * PER_THREAD + j - 1], &ids[i * PER_THREAD + j]), 0);
    }
    qsort(ids, THREADS * PER_THREAD, sizeof(*ids), cmp_uuid);
    for (int i = 1; i < THREADS * PER_THREAD; i++)
        cr_assert_neq(cmp_uuid(&ids[i - 1], &ids[i]), 0, "duplicate id");
    free(ids);
}

Test(id, uuid_parse_accepts_only_the_canonical_form)
{
    bg_uuid_t u;
    cr_assert_eq(bg_id_uuid_parse("0190a6d2-7c3e-7b1a-9f00-0123456789ab", 36, &u), 0);
    cr_assert_eq(u.b[0], 0x01);
    cr_assert_eq(u.b[15], 0xab);
    cr_assert_eq(bg_id_uuid_parse("0190A6D2-7C3E-7B1A-9F00-0123456789AB", 36, &u), 0, "upper case");
    cr_assert(bg_id_uuid_is_valid("00000000-0000-0000-0000-000000000000"));
    static const char *const bad[] = {
        "",
        "0190a6d2-7c3e-7b1a-9f00-0123456789a",     /* short */
        "0190a6d2-7c3e-7b1a-9f00-0123456789abc",   /* long */
        "0190a6d27c3e7b1a9f000123456789ab",        /* no hyphens */
        "0190a6d2-7c3e-7b1a-9f000-123456789ab",    /* hyphen moved */
        "0190a6d2-7c3e-7b1a-9f00-0123456789ag",    /* not hex */
        "{0190a6d2-7c3e-7b1a-9f00-0123456789ab}",  /* braces */
        "0190a6d2-7c3e-7b1a-9f00-0123456789a\n",   /* control */
        "1; DROP TABLE users; --xxxxxxxxxxxxxxxx", /* what a path may hold */
        "0190a6d2 7c3e-7b1a-9f00-0123456789ab",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        cr_assert_eq(bg_id_uuid_parse(bad[i], strlen(bad[i]), &u), BG_ERR_INVALID, "%s", bad[i]);
        cr_assert_not(bg_id_uuid_is_valid(bad[i]), "%s", bad[i]);
    }
    cr_assert_not(bg_id_uuid_is_valid(NULL));
    cr_assert_eq(bg_id_uuid_parse("0190a6d2-7c3e-7b1a-9f00-0123456789ab", 35, &u), BG_ERR_INVALID,
                 "the length given is the length checked");
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(a, b);
}

Test(id, request_ids_are_short_safe_and_unique)
{
    enum { N = 20000 };
    char(*ids)[BG_REQUEST_ID_LEN + 1] = calloc(N, sizeof(*ids));
    for (int i = 0; i < N; i++) {
        bg_id_request(ids[i]);
        cr_assert_eq(strlen(ids[i]), BG_REQUEST_ID_LEN);
        cr_assert_eq(strspn(ids[i], "0123456789ABCDEFGHJKMNPQRSTVWXYZ"), BG_REQUEST_ID_LEN, "%s",
                     ids[i]);
        cr_assert(bg_id_request_is_valid(ids[i]));
    }
    qsort(ids, N, sizeof(*ids), cmp_str);
    for (int i = 1; i < N; i++)
        cr_assert_neq(strcmp(ids[i - 1], ids[i]), 0, "duplicate request id %s", ids[i]);
    free(ids);
}

Test(id, request_id_validation_guards_headers_and_logs)
{
    cr_assert(bg_id_request_is_valid("abc-DEF_1.2"));
    cr_assert_not(bg_id_request_is_valid(""));
    cr_assert_not(bg_id_request_is_valid(NULL));
    cr_assert_not(bg_id_request_is_valid("a b"));
    cr_assert_not(bg_id_request_is_valid("a\r\nSet-Cookie: x"));
    cr_assert_not(bg_id_request_is_valid("\"quoted\""));
    char longest[66];
    memset(longest, 'a', sizeof(longest) - 1);
    longest[64] = '\0';
    cr_assert(bg_id_request_is_valid(longest));
    longest[64] = 'a';
    longest[65] = '\0';
    cr_assert_not(bg_id_request_is_valid(longest), "65 characters");
}
