/*
 * Paddle-Signature verification (bg_paddle_verify) against the Paddle SDKs' published test vectors
 * (../shared/PROTOCOLS.md §1.3, from paddle-node-sdk's webhooks-validator tests), plus secret
 * rotation (several secrets, several h1) and the tolerance in both directions.
 *
 * The SDKs' own tolerance is 5 s; the vectors are checked with that tolerance so that "valid at
 * 00:00:05, invalid at 00:00:06" means what it means there.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "bg/err.h"
#include "bg/paddle.h"

#define TS 1698796800 /* 2023-11-01T00:00:00Z */
#define N1_HEADER                                                                                  \
    "ts=1698796800;h1=a300428748dce5c70e4da19bffd60769591ea969c99dea3105d0ec9612cf43f9"
#define N1_BODY "{\"data\": [\"1\", \"2\"]}"
#define N2_HEADER                                                                                  \
    "ts=1698796800;h1=28981e941fae76e53db32f3d2a83cb69db41476595e84e1970a1b5d98f62b261;h1="        \
    "28981e941fae76e53db32f3d2a83cb69db41476595e84e1970a1b5d98f62b261;h2=RANDOM_HASH"
#define N2_BODY "{\"data\": \"value\"}"

static int verify(const char *header, const char *body, const char *secrets, int64_t now,
                  int64_t tolerance)
{
    return bg_paddle_verify(header, header != NULL ? strlen(header) : 0, body, strlen(body),
                            secrets, now, tolerance);
}

Test(paddle_signature, n1_is_valid_for_five_seconds_and_not_after)
{
    for (int64_t t = TS; t <= TS + 5; t++)
        cr_expect_eq(verify(N1_HEADER, N1_BODY, "VALID_SECRET", t, 5), 0, "at ts+%lld",
                     (long long)(t - TS));
    cr_expect_eq(verify(N1_HEADER, N1_BODY, "VALID_SECRET", TS + 6, 5), BG_ERR_TIMEOUT);
}

Test(paddle_signature, n1_signature_is_the_hmac_of_ts_colon_body)
{
    char h1[BG_PADDLE_SIG_HEX_SIZE];
    bg_paddle_sign("VALID_SECRET", "1698796800", N1_BODY, strlen(N1_BODY), h1);
    cr_expect_str_eq(h1, "a300428748dce5c70e4da19bffd60769591ea969c99dea3105d0ec9612cf43f9");
}

Test(paddle_signature, n2_repeated_h1_and_unknown_h2_are_accepted)
{
    cr_expect_eq(verify(N2_HEADER, N2_BODY, "VALID_SECRET", TS + 1, 5), 0);
}

Test(paddle_signature, n3_another_secret_is_refused)
{
    cr_expect_eq(verify(N1_HEADER, N1_BODY, "INVALID_VALID_SECRET", TS, 5), BG_ERR_DENIED);
}

Test(paddle_signature, n4_a_reformatted_body_is_refused)
{
    cr_expect_eq(verify(N1_HEADER, "{ \"data\": [ \"1\", \"2\" ]}", "VALID_SECRET", TS, 5),
                 BG_ERR_DENIED);
    /* one more space, as the node SDK's "has more space" case */
    cr_expect_eq(verify(N1_HEADER, "{\"data\": [\"1\",  \"2\"]}", "VALID_SECRET", TS, 5),
                 BG_ERR_DENIED);
}

Test(paddle_signature, n5_a_changed_ts_is_refused)
{
    const char *h = "ts=9876;h1=a300428748dce5c70e4da19bffd60769591ea969c99dea3105d0ec9612cf43f9";
    /* stale at the vector's time … */
    cr_expect_eq(verify(h, N1_BODY, "VALID_SECRET", TS, 5), BG_ERR_TIMEOUT);
    /* … and not signed by that ts even when the clock agrees with it */
    cr_expect_eq(verify(h, N1_BODY, "VALID_SECRET", 9876, 5), BG_ERR_DENIED);
}

Test(paddle_signature, n6_malformed_headers_are_refused)
{
    cr_expect_eq(verify("invalid_header", N1_BODY, "VALID_SECRET", TS, 5), BG_ERR_INVALID);
    cr_expect_eq(verify("h1=invalid_header", N1_BODY, "VALID_SECRET", TS, 5), BG_ERR_INVALID);
    cr_expect_eq(verify("ts=1234;h2=invalid_header", N1_BODY, "VALID_SECRET", 1234, 5),
                 BG_ERR_INVALID);
    cr_expect_eq(verify("ts=12x4;h1=ab", N1_BODY, "VALID_SECRET", TS, 5), BG_ERR_INVALID);
    cr_expect_eq(verify(NULL, N1_BODY, "VALID_SECRET", TS, 5), BG_ERR_INVALID);
    cr_expect_eq(verify("", N1_BODY, "VALID_SECRET", TS, 5), BG_ERR_INVALID);
}

Test(paddle_signature, any_configured_secret_may_sign_any_h1)
{
    /* rotation: the old and the new secret are both configured, Paddle signs with either */
    cr_expect_eq(verify(N1_HEADER, N1_BODY, "pdl_ntfset_old_secret, VALID_SECRET", TS, 5), 0);
    cr_expect_eq(verify(N1_HEADER, N1_BODY, "VALID_SECRET,pdl_ntfset_new", TS, 5), 0);
    cr_expect_eq(verify(N1_HEADER, N1_BODY, "a,b,c", TS, 5), BG_ERR_DENIED);
    /* two h1 during Paddle's own rotation: the second one is ours */
    char h[256];
    snprintf(h, sizeof(h),
             "ts=1698796800;h1=%064d;h1="
             "a300428748dce5c70e4da19bffd60769591ea969c99dea3105d0ec9612cf43f9",
             0);
    cr_expect_eq(verify(h, N1_BODY, "VALID_SECRET", TS, 5), 0);
}

Test(paddle_signature, no_secret_configured_refuses_everything)
{
    cr_expect_eq(verify(N1_HEADER, N1_BODY, NULL, TS, 5), BG_ERR_DENIED);
    cr_expect_eq(verify(N1_HEADER, N1_BODY, "", TS, 5), BG_ERR_DENIED);
    cr_expect_eq(verify(N1_HEADER, N1_BODY, " , ", TS, 5), BG_ERR_DENIED);
}

Test(paddle_signature, the_tolerance_holds_in_both_directions)
{
    cr_expect_eq(verify(N1_HEADER, N1_BODY, "VALID_SECRET", TS - BG_PADDLE_SIG_TOLERANCE_S,
                        BG_PADDLE_SIG_TOLERANCE_S),
                 0);
    cr_expect_eq(verify(N1_HEADER, N1_BODY, "VALID_SECRET", TS - BG_PADDLE_SIG_TOLERANCE_S - 1,
                        BG_PADDLE_SIG_TOLERANCE_S),
                 BG_ERR_TIMEOUT);
    cr_expect_eq(verify(N1_HEADER, N1_BODY, "VALID_SECRET", TS + BG_PADDLE_SIG_TOLERANCE_S + 1,
                        BG_PADDLE_SIG_TOLERANCE_S),
                 BG_ERR_TIMEOUT);
}

Test(paddle_signature, a_truncated_or_uppercase_h1_never_matches)
{
    cr_expect_eq(
        verify("ts=1698796800;h1=a300428748dce5c70e4da19bffd60769591ea969c99dea3105d0ec9612cf43f",
               N1_BODY, "VALID_SECRET", TS, 5),
        BG_ERR_DENIED);
    cr_expect_eq(
        verify("ts=1698796800;h1=A300428748DCE5C70E4DA19BFFD60769591EA969C99DEA3105D0EC9612CF43F9",
               N1_BODY, "VALID_SECRET", TS, 5),
        BG_ERR_DENIED);
}
