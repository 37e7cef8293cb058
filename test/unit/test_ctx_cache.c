/*
 * The llm worker's conversation cache (workers/ctx_cache.h): an entry is used only at the
 * sequence value it was stored at, for its own user, while fresh; it is a copy both ways; memory is
 * capped; histories are bounded as bg_chat_context bounds them (compared with Postgres itself in
 * integration/test_llm_worker.c).
 */
#include <criterion/criterion.h>
#include <string.h>
#include <time.h>

#include "ctx_cache.h"

#define CONV "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
#define CONV2 "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5c"
#define USER "0190a1b2-c3d4-7e5f-8a9b-aaaaaaaaaaaa"
#define OTHER "0190a1b2-c3d4-7e5f-8a9b-bbbbbbbbbbbb"

static void context_of(bg_chat_context_t *ctx, const char *name, int turns)
{
    memset(ctx, 0, sizeof(*ctx));
    snprintf(ctx->agent_id, sizeof(ctx->agent_id), "0190a1b2-c3d4-7e5f-8a9b-cccccccccccc");
    snprintf(ctx->user_name, sizeof(ctx->user_name), "%s", name);
    for (int i = 0; i < turns; i++) {
        char text[64];
        snprintf(text, sizeof(text), "question %d", i);
        wk_ctx_history_push(&ctx->history, 2 * i + 1, "user", text, strlen(text));
        snprintf(text, sizeof(text), "answer %d", i);
        wk_ctx_history_push(&ctx->history, 2 * i + 2, "assistant", text, strlen(text));
    }
}

Test(ctx_cache, an_entry_is_used_only_at_its_sequence_and_for_its_user)
{
    wk_ctx_cache_t *cc = wk_ctx_cache_new(16, 1 << 20, 60000);
    bg_chat_context_t ctx, got;
    context_of(&ctx, "Ada", 2);
    wk_ctx_cache_put(cc, CONV, USER, 41, &ctx);

    cr_assert(wk_ctx_cache_get(cc, CONV, USER, 41, &got));
    cr_assert_str_eq(got.user_name, "Ada");
    cr_assert_str_eq(got.agent_id, ctx.agent_id);
    cr_assert_eq(got.history.count, 4);
    cr_assert_str_eq(got.history.items[3].content, "answer 1");
    cr_assert_str_eq(got.history.items[3].role, "assistant");
    cr_assert_eq(got.history.items[3].id, 4);
    /* a copy: changing it changes nothing kept */
    got.history.items[0].content[0] = 'X';
    bg_chat_context_dispose(&got);
    cr_assert(wk_ctx_cache_get(cc, CONV, USER, 41, &got));
    cr_assert_str_eq(got.history.items[0].content, "question 0");
    bg_chat_context_dispose(&got);

    cr_assert_not(wk_ctx_cache_get(cc, CONV, USER, 42, &got), "the sequence moved: a miss");
    cr_assert_eq(got.history.count, 0);
    cr_assert_not(wk_ctx_cache_get(cc, CONV, USER, 40, &got));
    cr_assert_not(wk_ctx_cache_get(cc, CONV, OTHER, 41, &got), "another user's is never given");
    cr_assert_not(wk_ctx_cache_get(cc, CONV2, USER, 41, &got), "nor another conversation's");

    /* the entry kept is a copy of what was put */
    ctx.history.items[1].content[0] = 'Y';
    cr_assert(wk_ctx_cache_get(cc, CONV, USER, 41, &got));
    cr_assert_str_eq(got.history.items[1].content, "answer 0");
    bg_chat_context_dispose(&got);

    wk_ctx_cache_drop(cc, CONV);
    cr_assert_not(wk_ctx_cache_get(cc, CONV, USER, 41, &got), "dropped");
    bg_chat_context_dispose(&ctx);
    wk_ctx_cache_free(cc);
}

Test(ctx_cache, a_newer_state_replaces_the_old_one_and_idle_entries_expire)
{
    wk_ctx_cache_t *cc = wk_ctx_cache_new(16, 1 << 20, 150);
    bg_chat_context_t ctx, got;
    context_of(&ctx, "Ada", 1);
    wk_ctx_cache_put(cc, CONV, USER, 7, &ctx);
    bg_chat_context_dispose(&ctx);
    context_of(&ctx, "Ada", 2);
    wk_ctx_cache_put(cc, CONV, USER, 9, &ctx);
    bg_chat_context_dispose(&ctx);
    cr_assert_not(wk_ctx_cache_get(cc, CONV, USER, 7, &got), "the old state is gone");
    cr_assert(wk_ctx_cache_get(cc, CONV, USER, 9, &got));
    cr_assert_eq(got.history.count, 4);
    bg_chat_context_dispose(&got);

    struct timespec ts = {0, 300 * 1000000L};
    nanosleep(&ts, NULL);
    cr_assert_not(wk_ctx_cache_get(cc, CONV, USER, 9, &got), "unused past its TTL: a miss");
    wk_ctx_cache_free(cc);
}

Test(ctx_cache, the_bytes_held_are_capped)
{
    /* 40 bytes in all: one two-turn history (36 bytes) fits, a second does not */
    wk_ctx_cache_t *cc = wk_ctx_cache_new(16, 40, 60000);
    bg_chat_context_t ctx, got;
    context_of(&ctx, "Ada", 2);
    wk_ctx_cache_put(cc, CONV, USER, 1, &ctx);
    wk_ctx_cache_put(cc, CONV2, USER, 1, &ctx);
    cr_assert(wk_ctx_cache_get(cc, CONV, USER, 1, &got));
    bg_chat_context_dispose(&got);
    cr_assert_not(wk_ctx_cache_get(cc, CONV2, USER, 1, &got), "over the cap: not kept");
    /* the first one's bytes are given back when it is replaced or dropped */
    wk_ctx_cache_drop(cc, CONV);
    wk_ctx_cache_put(cc, CONV2, USER, 1, &ctx);
    cr_assert(wk_ctx_cache_get(cc, CONV2, USER, 1, &got));
    bg_chat_context_dispose(&got);
    bg_chat_context_dispose(&ctx);
    wk_ctx_cache_free(cc);
}

Test(ctx_cache, a_history_keeps_its_newest_messages_within_both_bounds)
{
    bg_chat_context_t ctx;
    context_of(&ctx, "Ada", 3); /* q0 a0 q1 a1 q2 a2: 10, 8, 10, 8, 10, 8 bytes */
    wk_ctx_history_trim(&ctx.history, 1000, 0);
    cr_assert_eq(ctx.history.count, 6, "no bound reached");
    wk_ctx_history_trim(&ctx.history, 5, 0);
    cr_assert_eq(ctx.history.count, 5);
    cr_assert_str_eq(ctx.history.items[0].content, "answer 0", "the oldest went first");
    wk_ctx_history_trim(&ctx.history, 1000, 36);
    cr_assert_eq(ctx.history.count, 4, "8+10+8+10 = 36 bytes fit, one more does not");
    cr_assert_str_eq(ctx.history.items[0].content, "question 1");
    wk_ctx_history_trim(&ctx.history, 1000, 7);
    cr_assert_eq(ctx.history.count, 0, "the newest alone is too large: nothing");
    bg_chat_context_dispose(&ctx);
}
