/*
 * Unit tests of bg/crypto.h: what a user would notice is that their password works and nothing else
 * does, that a stolen database holds no usable secrets, and that tokens cannot be guessed.
 */
#include <criterion/criterion.h>
#include <sodium.h>
#include <string.h>

#include "bg/crypto.h"
#include "bg/err.h"

Test(crypto, password_hash_verifies_only_the_right_password)
{
    char hash[BG_CRYPTO_PWHASH_LEN];
    cr_assert_eq(bg_crypto_password_hash("correct horse battery", hash, sizeof(hash)), 0);
    cr_assert_eq(bg_crypto_password_verify(hash, "correct horse battery"), 0);
    cr_assert_eq(bg_crypto_password_verify(hash, "correct horse batterY"), BG_ERR_DENIED);
    cr_assert_eq(bg_crypto_password_verify(hash, ""), BG_ERR_DENIED);
    /* the hash does not contain the password */
    cr_assert_null(strstr(hash, "correct horse"));
}

Test(crypto, password_hash_is_argon2id_with_owasp_parameters)
{
    char hash[BG_CRYPTO_PWHASH_LEN];
    cr_assert_eq(bg_crypto_password_hash("0123456789", hash, sizeof(hash)), 0);
    cr_assert_eq(strncmp(hash, "$argon2id$v=19$m=19456,t=2,p=1$", 31), 0, "hash: %s", hash);
    cr_assert_not(bg_crypto_password_needs_rehash(hash));
}

Test(crypto, same_password_hashes_differently_each_time)
{
    char a[BG_CRYPTO_PWHASH_LEN], b[BG_CRYPTO_PWHASH_LEN];
    cr_assert_eq(bg_crypto_password_hash("same password!", a, sizeof(a)), 0);
    cr_assert_eq(bg_crypto_password_hash("same password!", b, sizeof(b)), 0);
    cr_assert_str_neq(a, b);
    cr_assert_eq(bg_crypto_password_verify(b, "same password!"), 0);
}

Test(crypto, malformed_or_missing_hash_never_lets_anyone_in)
{
    cr_assert_eq(bg_crypto_password_verify("", "anything at all"), BG_ERR_DENIED);
    cr_assert_eq(bg_crypto_password_verify("$argon2id$garbage", "anything at all"), BG_ERR_DENIED);
    cr_assert_eq(bg_crypto_password_verify(NULL, "anything at all"), BG_ERR_DENIED);
    char huge[300];
    memset(huge, 'x', sizeof(huge) - 1);
    huge[sizeof(huge) - 1] = '\0';
    cr_assert_eq(bg_crypto_password_verify(huge, "anything at all"), BG_ERR_DENIED);
}

Test(crypto, overlong_password_is_refused_before_hashing)
{
    static char pw[BG_CRYPTO_PASSWORD_MAX + 2];
    memset(pw, 'a', sizeof(pw) - 1);
    char hash[BG_CRYPTO_PWHASH_LEN];
    cr_assert_eq(bg_crypto_password_hash(pw, hash, sizeof(hash)), BG_ERR_INVALID);
    cr_assert_eq(bg_crypto_password_verify("$argon2id$x", pw), BG_ERR_INVALID);
    pw[BG_CRYPTO_PASSWORD_MAX] = '\0'; /* exactly the maximum is fine */
    cr_assert_eq(bg_crypto_password_hash(pw, hash, sizeof(hash)), 0);
    cr_assert_eq(bg_crypto_password_verify(hash, pw), 0);
}

Test(crypto, hash_buffer_too_small_is_refused)
{
    char small[64];
    cr_assert_eq(bg_crypto_password_hash("0123456789", small, sizeof(small)), BG_ERR_INVALID);
}

Test(crypto, hashes_made_with_weaker_parameters_need_rehash)
{
    cr_assert_eq(bg_crypto_init(), 0);
    char old[crypto_pwhash_STRBYTES];
    cr_assert_eq(
        crypto_pwhash_str_alg(old, "0123456789", 10, 1, 8192 * 1024, crypto_pwhash_ALG_ARGON2ID13),
        0);
    cr_assert(bg_crypto_password_needs_rehash(old));
    /* still accepted, so the user can sign in and get the hash upgraded */
    cr_assert_eq(bg_crypto_password_verify(old, "0123456789"), 0);
    cr_assert(bg_crypto_password_needs_rehash("not a hash"));
}

Test(crypto, random_token_is_base64url_of_the_requested_size)
{
    char a[64], b[64];
    cr_assert_eq(bg_crypto_random_token(32, a, sizeof(a)), 0);
    cr_assert_eq(bg_crypto_random_token(32, b, sizeof(b)), 0);
    cr_assert_eq(strlen(a), 43); /* 256 bits, no padding */
    cr_assert_eq(strspn(a, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"),
                 strlen(a));
    cr_assert_str_neq(a, b);
}

Test(crypto, random_token_refuses_bad_sizes)
{
    char out[44];
    cr_assert_eq(bg_crypto_random_token(32, out, 43), BG_ERR_TOO_LARGE);
    cr_assert_str_eq(out, "");
    cr_assert_eq(bg_crypto_random_token(32, out, sizeof(out)), 0);
    cr_assert_eq(bg_crypto_random_token(0, out, sizeof(out)), BG_ERR_INVALID);
    cr_assert_eq(bg_crypto_random_token(BG_CRYPTO_TOKEN_MAX_BYTES + 1, out, sizeof(out)),
                 BG_ERR_INVALID);
}

Test(crypto, sha256_hex_matches_known_vectors)
{
    char hex[BG_CRYPTO_SHA256_HEX_LEN];
    bg_crypto_sha256_hex("", 0, hex);
    cr_assert_str_eq(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    bg_crypto_sha256_hex("abc", 3, hex);
    cr_assert_str_eq(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

Test(crypto, equal_compares_secrets)
{
    cr_assert(bg_crypto_equal("secret-token", "secret-token", 12));
    cr_assert_not(bg_crypto_equal("secret-token", "secret-tokeN", 12));
    cr_assert(bg_crypto_str_equal("abc", "abc"));
    cr_assert_not(bg_crypto_str_equal("abc", "abcd"));
    cr_assert_not(bg_crypto_str_equal("abcd", "abc"));
    cr_assert_not(bg_crypto_str_equal("abc", "abd"));
    cr_assert_not(bg_crypto_str_equal(NULL, "abc"));
    cr_assert(bg_crypto_str_equal("", ""));
}

Test(crypto, random_uniform_stays_in_range)
{
    for (int i = 0; i < 1000; i++)
        cr_assert_lt(bg_crypto_random_uniform(7), 7u);
    cr_assert_eq(bg_crypto_random_uniform(0), 0u);
}

Test(crypto, b64url_round_trips_cursor_text_and_refuses_forgeries)
{
    const char *text = "2026-11-26T12:00:00.123456Z|0190a0b0-0000-7000-8000-00000000c0de";
    char enc[128], dec[128];
    cr_assert_eq(bg_crypto_b64url_encode(text, strlen(text), enc, sizeof(enc)), 0);
    cr_assert(strpbrk(enc, "+/=") == NULL, "not base64url without padding: %s", enc);
    cr_assert_eq(bg_crypto_b64url_decode_str(enc, dec, sizeof(dec)), 0);
    cr_assert_str_eq(dec, text);
    /* too small an output buffer, on either side */
    cr_assert_eq(bg_crypto_b64url_encode(text, strlen(text), enc, 10), BG_ERR_TOO_LARGE);
    cr_assert_eq(bg_crypto_b64url_encode(text, strlen(text), enc, sizeof(enc)), 0);
    cr_assert_eq(bg_crypto_b64url_decode_str(enc, dec, 10), BG_ERR_INVALID);
    /* forged or damaged input */
    cr_assert_eq(bg_crypto_b64url_decode_str("", dec, sizeof(dec)), BG_ERR_INVALID);
    cr_assert_eq(bg_crypto_b64url_decode_str("a", dec, sizeof(dec)), BG_ERR_INVALID);
    cr_assert_eq(bg_crypto_b64url_decode_str("ab+c", dec, sizeof(dec)), BG_ERR_INVALID);
    cr_assert_eq(bg_crypto_b64url_decode_str("YWJj==", dec, sizeof(dec)), BG_ERR_INVALID);
    cr_assert_eq(bg_crypto_b64url_decode_str("AAAA", dec, sizeof(dec)), BG_ERR_INVALID,
                 "a decoded NUL must be refused");
}

/* The table-driven decoder accepts exactly what libsodium's strict one does, with the same bytes:
 * every length 0..12 of characters drawn from the alphabet and a few outsiders, 200,000 draws. */
Test(crypto, b64url_decode_agrees_with_libsodium)
{
    static const char chars[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_AQgw+/=. ";
    unsigned char mine[16], theirs[16];
    char in[16];
    size_t accepted = 0;
    for (int round = 0; round < 200000; round++) {
        size_t len = randombytes_uniform(13);
        for (size_t i = 0; i < len; i++)
            in[i] = chars[randombytes_uniform(sizeof(chars) - 1)];
        size_t n1 = 0, n2 = 0;
        const char *end = NULL;
        int rc = bg_crypto_b64url_decode(in, len, mine, sizeof(mine), &n1);
        int src = sodium_base642bin(theirs, sizeof(theirs), in, len, NULL, &n2, &end,
                                    sodium_base64_VARIANT_URLSAFE_NO_PADDING);
        bool sodium_ok = src == 0 && end == in + len;
        cr_assert_eq(rc == 0, sodium_ok, "'%.*s': ours %d, libsodium %d", (int)len, in, rc, src);
        if (rc == 0) {
            accepted++;
            cr_assert_eq(n1, n2, "'%.*s'", (int)len, in);
            cr_assert_eq(memcmp(mine, theirs, n1), 0, "'%.*s'", (int)len, in);
        } else {
            cr_assert_eq(n1, 0);
        }
    }
    cr_expect_gt(accepted, 1000, "the draw hardly reached valid inputs (%zu)", accepted);
    /* too small an output is refused, not cut */
    size_t n = 0;
    cr_expect_eq(bg_crypto_b64url_decode("YWJjZA", 6, mine, 3, &n), BG_ERR_INVALID);
    cr_expect_eq(n, 0);
    cr_expect_eq(bg_crypto_b64url_decode("YWJjZA", 6, mine, 4, &n), 0);
    cr_expect_eq(n, 4);
    cr_expect_eq(memcmp(mine, "abcd", 4), 0);
}
