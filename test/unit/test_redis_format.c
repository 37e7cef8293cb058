/*
 * The RESP formatter every Redis command goes out through (bg__redis_format): byte for byte what
 * hiredis's redisFormatCommandArgv writes, for empty, binary and NUL-holding arguments, lengths
 * across digit boundaries and long argument lists; lens NULL reads NUL-terminated strings.
 */
#include <criterion/criterion.h>
#include <hiredis/hiredis.h>
#include <sodium.h>
#include <stdlib.h>
#include <string.h>

#include "bg/redis.h"

static void same_as_hiredis(int argc, const char *const *argv, const size_t *lens)
{
    char *mine = NULL, *theirs = NULL;
    long n1 = bg__redis_format(&mine, argc, argv, lens);
    int n2 = redisFormatCommandArgv(&theirs, argc, (const char **)argv, lens);
    cr_assert_gt(n1, 0);
    cr_assert_eq(n1, n2, "argc %d: %ld bytes, hiredis %d", argc, n1, n2);
    cr_assert_eq(memcmp(mine, theirs, (size_t)n1), 0, "argc %d", argc);
    free(mine);
    redisFreeCommand(theirs);
}

Test(redis_format, is_what_hiredis_writes)
{
    const char *a[] = {"EVALSHA", "0123456789abcdef0123456789abcdef01234567",
                       "2",       "",
                       "k",       "value with spaces\r\n"};
    same_as_hiredis(6, a, NULL);
    /* binary, with NULs, by length */
    static const char bin[] = {'a', '\0', 'b', '\r', '\n', '\xff'};
    const char *b[] = {"SET", "key", bin};
    size_t blens[] = {3, 3, sizeof(bin)};
    same_as_hiredis(3, b, blens);
    /* lengths across digit boundaries: 0, 9, 10, 99, 100, 9999, 10000, 100000 */
    static char big[100001];
    memset(big, 'x', sizeof(big) - 1);
    const size_t sizes[] = {0, 9, 10, 99, 100, 9999, 10000, 100000};
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        const char *c[] = {"APPEND", "k", big};
        size_t clens[] = {6, 1, sizes[i]};
        same_as_hiredis(3, c, clens);
    }
    /* random argument lists of up to 40 arguments of up to 300 random bytes */
    static char pool[40][300];
    const char *argv[40];
    size_t lens[40];
    for (int round = 0; round < 2000; round++) {
        int argc = 1 + (int)randombytes_uniform(40);
        for (int i = 0; i < argc; i++) {
            lens[i] = randombytes_uniform(300);
            randombytes_buf(pool[i], lens[i]);
            argv[i] = pool[i];
        }
        same_as_hiredis(argc, argv, lens);
    }
    char *out = (char *)1;
    cr_expect_eq(bg__redis_format(&out, 0, argv, lens), -1);
    cr_expect_null(out);
}
