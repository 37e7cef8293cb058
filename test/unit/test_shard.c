/*
 * Shards, key names and redis:// URLs: the parts of the Redis layer that must never change by
 * accident (a changed hash moves every user to another shard) or that operators type by hand.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "bg/err.h"
#include "bg/redis.h"

Test(shard, hash_is_fnv1a_and_pinned)
{
    /* published FNV-1a 32-bit test vectors: another language can reproduce the shard */
    cr_assert_eq(bg_shard_hash(""), 0x811c9dc5u);
    cr_assert_eq(bg_shard_hash("a"), 0xe40c292cu);
    cr_assert_eq(bg_shard_hash("foobar"), 0xbf9cf968u);
}

Test(shard, same_user_same_shard_for_given_count)
{
    cr_assert_eq(bg_shard_of("user-42", 16), 11);
    cr_assert_eq(bg_shard_of("0b7e1c2a-8f8e-4b5e-9d6c-1f2a3b4c5d6e", 16), 5);
    cr_assert_eq(bg_shard_of("0b7e1c2a-8f8e-4b5e-9d6c-1f2a3b4c5d6e", 1024), 485);
    cr_assert_eq(bg_shard_of("anyone", 1), 0);
}

Test(shard, spreads_users_evenly)
{
    int counts[16] = {0};
    for (int i = 0; i < 16000; i++) {
        char id[32];
        snprintf(id, sizeof(id), "user-%d", i);
        int s = bg_shard_of(id, 16);
        cr_assert(s >= 0 && s < 16, "shard %d out of range", s);
        counts[s]++;
    }
    for (int s = 0; s < 16; s++)
        cr_assert(counts[s] > 800 && counts[s] < 1200, "shard %d got %d of 16000", s, counts[s]);
}

Test(shard, tag_and_keys_share_the_hash_tag)
{
    char tag[16], q[BG_REDIS_KEY_MAX], dlq[BG_REDIS_KEY_MAX], errs[BG_REDIS_KEY_MAX];
    cr_assert_eq(bg_shard_tag(tag, sizeof(tag), 7), 0);
    cr_assert_str_eq(tag, "{s7}");
    cr_assert_eq(bg_redis_key_queue(q, sizeof(q), 7, "llm"), 0);
    cr_assert_str_eq(q, "bg:{s7}:q:llm");
    cr_assert_eq(bg_redis_key_dlq(dlq, sizeof(dlq), 12, "usage"), 0);
    cr_assert_str_eq(dlq, "bg:{s12}:dlq:usage");
    cr_assert_eq(bg_redis_key_errors(errs, sizeof(errs), 0, "billing"), 0);
    cr_assert_str_eq(errs, "bg:{s0}:qerr:billing");
}

Test(shard, key_that_does_not_fit_is_refused_not_cut)
{
    char small[8];
    cr_assert_eq(bg_redis_key_queue(small, sizeof(small), 3, "telegram"), BG_ERR_TOO_LARGE);
    cr_assert_str_eq(small, "");
    cr_assert_eq(bg_shard_tag(small, 4, 100), BG_ERR_TOO_LARGE);
}

Test(redis_url, full_form_with_user_password_and_db)
{
    bg_redis_url_t u;
    cr_assert_eq(bg_redis_url_parse("redis://app:p%40ss@cache.internal:6380/3", &u), 0);
    cr_assert_str_eq(u.host, "cache.internal");
    cr_assert_eq(u.port, 6380);
    cr_assert_str_eq(u.user, "app");
    cr_assert_str_eq(u.password, "p@ss");
    cr_assert_eq(u.db, 3);
    bg_redis_url_dispose(&u);
}

Test(redis_url, defaults_and_password_only)
{
    bg_redis_url_t u;
    cr_assert_eq(bg_redis_url_parse("redis://127.0.0.1", &u), 0);
    cr_assert_eq(u.port, 6379);
    cr_assert_eq(u.db, 0);
    cr_assert_null(u.user);
    cr_assert_null(u.password);
    bg_redis_url_dispose(&u);

    cr_assert_eq(bg_redis_url_parse("redis://:secret@[::1]:7000/", &u), 0);
    cr_assert_str_eq(u.host, "::1");
    cr_assert_eq(u.port, 7000);
    cr_assert_null(u.user);
    cr_assert_str_eq(u.password, "secret");
    bg_redis_url_dispose(&u);
}

Test(redis_url, malformed_urls_are_refused)
{
    const char *bad[] = {"http://127.0.0.1:6379", "redis://",       "redis://h:0",
                         "redis://h:65536",       "redis://h:12ab", "redis://h/x",
                         "redis://h/1?timeout=3", "redis://:%zz@h", "redis://:%00@h",
                         "redis://[::1"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        bg_redis_url_t u;
        cr_assert_eq(bg_redis_url_parse(bad[i], &u), BG_ERR_INVALID, "accepted %s", bad[i]);
        cr_assert_null(u.host);
    }
}
