/*
 * A conversation's write sequence (bg/convseq.h) on a real Redis: unknown until the first bump,
 * which starts it at a random point; each bump moves it by one and renews its TTL; a lost key
 * starts again somewhere else, so an old value does not come back.
 */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "bg/convseq.h"
#include "bg/err.h"
#include "bg/redis.h"
#include "bgtest.h"

static bgt_redis_t srv;
static bg_redis_t *r;

static void setup(void)
{
    cr_assert_eq(bgt_redis_start(&srv), 0, "redis-server did not start");
    cr_assert_eq(bg_redis_new(srv.url, 2000, &r), 0);
}

static void teardown(void)
{
    bg_redis_free(r);
    bgt_redis_stop(&srv);
}

TestSuite(convseq, .init = setup, .fini = teardown, .timeout = 60);

#define CONV "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"

static long long ttl_of(const char *key)
{
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_command(r, &reply, "TTL %s", key), 0);
    long long v = reply->integer;
    freeReplyObject(reply);
    return v;
}

/* What the key holds now, read without starting it: *known false when there is none. */
static void peek(int shard, const char *conv, int64_t *seq, bool *known)
{
    char key[BG_REDIS_KEY_MAX];
    *seq = 0;
    *known = false;
    cr_assert_eq(bg_convseq_key(key, sizeof(key), shard, conv), 0);
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_command(r, &reply, "GET %s", key), 0);
    if (reply->type == REDIS_REPLY_STRING) {
        *seq = strtoll(reply->str, NULL, 10);
        *known = true;
    }
    freeReplyObject(reply);
}

Test(convseq, a_sequence_is_unknown_until_bumped_then_moves_by_one)
{
    int64_t seq = -1, a = 0, b = 0;
    bool known = true;
    peek(3, CONV, &seq, &known);
    cr_assert_not(known, "never written: unknown");
    cr_assert_eq(seq, 0);

    cr_assert_eq(bg_convseq_bump(r, 3, CONV, &a), 0);
    cr_assert_geq(a, 1LL << 40, "a fresh sequence starts far from 0: %lld", (long long)a);
    peek(3, CONV, &seq, &known);
    cr_assert(known);
    cr_assert_eq(seq, a);
    cr_assert_eq(bg_convseq_bump(r, 3, CONV, &b), 0);
    cr_assert_eq(b, a + 1);
    cr_assert_eq(bg_convseq_bump(r, 3, CONV, NULL), 0);
    peek(3, CONV, &seq, &known);
    cr_assert_eq(seq, a + 2);

    char key[BG_REDIS_KEY_MAX];
    cr_assert_eq(bg_convseq_key(key, sizeof(key), 3, CONV), 0);
    cr_assert_str_eq(key, "bg:{s3}:convseq:" CONV);
    long long ttl = ttl_of(key);
    cr_assert(ttl > BG_CONVSEQ_TTL_S - 10 && ttl <= BG_CONVSEQ_TTL_S, "%lld", ttl);
    /* another shard's key is another sequence */
    peek(4, CONV, &seq, &known);
    cr_assert_not(known);
}

Test(convseq, a_reader_starts_a_missing_sequence_and_leaves_a_present_one)
{
    int64_t first = 0, again = 0, bumped = 0;
    bool known = false;
    cr_assert_eq(bg_convseq_read(r, 5, CONV, &first, &known), 0);
    cr_assert(known, "started by the read");
    cr_assert_geq(first, 1LL << 40);
    cr_assert_eq(bg_convseq_read(r, 5, CONV, &again, &known), 0);
    cr_assert(known);
    cr_assert_eq(again, first, "a second read leaves it as it is");
    cr_assert_eq(bg_convseq_bump(r, 5, CONV, &bumped), 0);
    cr_assert_eq(bumped, first + 1, "a bump moves on from where the read started it");
    cr_assert_eq(bg_convseq_read(r, 5, CONV, &again, &known), 0);
    cr_assert_eq(again, first + 1);
    char key[BG_REDIS_KEY_MAX];
    cr_assert_eq(bg_convseq_key(key, sizeof(key), 5, CONV), 0);
    cr_assert_gt(ttl_of(key), BG_CONVSEQ_TTL_S - 10, "the started key expires");
    cr_assert_eq(bg_convseq_read(r, 5, "nope", &again, &known), BG_ERR_INVALID);
    cr_assert_not(known);
}

Test(convseq, a_lost_sequence_starts_again_elsewhere)
{
    int64_t first = 0, again = 0;
    char key[BG_REDIS_KEY_MAX];
    cr_assert_eq(bg_convseq_key(key, sizeof(key), 0, CONV), 0);
    /* 20 losses: no restart meets a value an earlier sequence had */
    int64_t seen[20];
    for (int i = 0; i < 20; i++) {
        cr_assert_eq(bg_convseq_bump(r, 0, CONV, &first), 0);
        cr_assert_eq(bg_convseq_bump(r, 0, CONV, &again), 0);
        cr_assert_eq(again, first + 1);
        for (int k = 0; k < i; k++)
            cr_assert(first != seen[k] && first != seen[k] + 1, "a restart met an old value");
        seen[i] = first;
        redisReply *reply = NULL;
        cr_assert_eq(bg_redis_command(r, &reply, "DEL %s", key), 0);
        freeReplyObject(reply);
    }
}

Test(convseq, a_conversation_id_that_is_not_a_uuid_is_refused)
{
    int64_t seq = 0;
    bool known = false;
    char key[BG_REDIS_KEY_MAX];
    cr_assert_eq(bg_convseq_key(key, sizeof(key), 0, "x}:y"), BG_ERR_INVALID);
    cr_assert_str_eq(key, "");
    cr_assert_eq(bg_convseq_read(r, 0, "", &seq, &known), BG_ERR_INVALID);
    cr_assert_eq(bg_convseq_bump(r, 0, "not-a-uuid", NULL), BG_ERR_INVALID);
}
