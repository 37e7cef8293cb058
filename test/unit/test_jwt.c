/*
 * Unit tests of bg/jwt.h: the JWT attack suite.
 *
 * Tokens an attacker would send are forged by hand here (base64url(header).base64url(payload).
 * base64url(MAC)) with libsodium's HMACs, so each attack is a real, correctly encoded token that
 * differs from a good one in exactly the way under test. Every refusal asserts the exact reason,
 * so a token refused for the wrong reason (a "malformed" where "alg" was meant) fails the test.
 * A control test checks that the forging helper itself makes tokens that verify.
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <sodium.h>
#include <stdio.h>
#include <string.h>

#include "bg/err.h"
#include "bg/id.h"
#include "bg/jwt.h"

#define SECRET_A "secret-A-0123456789abcdefghijklmnopqrstuv"
#define SECRET_B "secret-B-0123456789abcdefghijklmnopqrstuv"
#define SECRET_OLD "secret-old-0123456789abcdefghijklmnopqrst"
#define SECRET_NEW "secret-new-0123456789abcdefghijklmnopqrst"
#define NOW INT64_C(1700000000)
#define TTL 900
#define HDR_A "{\"alg\":\"HS256\",\"kid\":\"a\",\"typ\":\"JWT\"}"
#define B64 sodium_base64_VARIANT_URLSAFE_NO_PADDING

typedef enum mac { MAC_NONE, MAC_HS256, MAC_HS512 } mac_t;

static bg_jwt_ring_t *ring_of(const char *keys)
{
    bg_jwt_ring_t *ring = NULL;
    char err[256];
    cr_assert_eq(bg_jwt_ring_new(keys, NULL, &ring, err, sizeof(err)), 0, "ring: %s", err);
    return ring;
}

static void b64url(const void *data, size_t len, char *out, size_t outlen)
{
    cr_assert_geq(outlen, sodium_base64_ENCODED_LEN(len, B64));
    sodium_bin2base64(out, outlen, data, len, B64);
}

/* Writes h.p.base64url(mac), h and p being base64url text already; MAC_NONE leaves "h.p.". */
static void forge_raw(char *out, size_t outlen, const char *h, const char *p, mac_t mac,
                      const char *secret)
{
    int n = snprintf(out, outlen, "%s.%s.", h, p);
    cr_assert(n > 0 && (size_t)n < outlen);
    /* the MAC covers "h.p", not the dot that follows */
    size_t signed_len = (size_t)n - 1;
    unsigned char sig[crypto_auth_hmacsha512_BYTES];
    size_t siglen = 0;
    if (mac == MAC_HS256) {
        crypto_auth_hmacsha256_state st;
        crypto_auth_hmacsha256_init(&st, (const unsigned char *)secret, strlen(secret));
        crypto_auth_hmacsha256_update(&st, (const unsigned char *)out, signed_len);
        crypto_auth_hmacsha256_final(&st, sig);
        siglen = crypto_auth_hmacsha256_BYTES;
    } else if (mac == MAC_HS512) {
        crypto_auth_hmacsha512_state st;
        crypto_auth_hmacsha512_init(&st, (const unsigned char *)secret, strlen(secret));
        crypto_auth_hmacsha512_update(&st, (const unsigned char *)out, signed_len);
        crypto_auth_hmacsha512_final(&st, sig);
        siglen = crypto_auth_hmacsha512_BYTES;
    }
    if (siglen > 0)
        b64url(sig, siglen, out + n, outlen - (size_t)n);
}

/* Writes base64url(header).base64url(payload).base64url(mac) with the given MAC and secret. */
static void forge(char *out, size_t outlen, const char *header, const char *payload, mac_t mac,
                  const char *secret)
{
    char h[1024], p[8192];
    b64url(header, strlen(header), h, sizeof(h));
    b64url(payload, strlen(payload), p, sizeof(p));
    forge_raw(out, outlen, h, p, mac, secret);
}

static const char b64url_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/* The base64url character whose 6-bit value differs from c's in the lowest bit only. */
static char flip_low_bit(char c)
{
    const char *at = strchr(b64url_alphabet, c);
    cr_assert(at != NULL && c != '\0');
    return b64url_alphabet[(at - b64url_alphabet) ^ 1];
}

/*
 * Writes the claims of a good access token issued at NOW, with claim `name` replaced by the JSON
 * text `value` (NULL: left out; name NULL: nothing replaced). `extra` (may be NULL) is appended as
 * further members.
 */
static void payload_with(char *out, size_t outlen, const char *name, const char *value,
                         const char *extra)
{
    static const char *const base[][2] = {
        {"iss", "\"bot-generic\""},
        {"aud", "\"bot-generic-api\""},
        {"sub", "\"0190f5c2-7c1e-7a3b-9d4e-000000000001\""},
        {"sid", "\"0190f5c2-7c1e-7a3b-9d4e-000000000002\""},
        {"role", "\"user\""},
        {"typ", "\"access\""},
        {"jti", "\"0190f5c2-7c1e-7a3b-9d4e-000000000003\""},
        {"iat", "1700000000"},
        {"nbf", "1700000000"},
        {"exp", "1700000900"},
    };
    size_t used = 0;
    out[used++] = '{';
    for (size_t i = 0; i < sizeof(base) / sizeof(base[0]); i++) {
        const char *v = base[i][1];
        if (name != NULL && strcmp(name, base[i][0]) == 0)
            v = value;
        if (v == NULL)
            continue;
        int n =
            snprintf(out + used, outlen - used, "%s\"%s\":%s", used > 1 ? "," : "", base[i][0], v);
        cr_assert(n > 0 && (size_t)n < outlen - used);
        used += (size_t)n;
    }
    int n = snprintf(out + used, outlen - used, "%s%s}", extra != NULL ? "," : "",
                     extra != NULL ? extra : "");
    cr_assert(n > 0 && (size_t)n < outlen - used);
}

/* Verifies token with ring at now and asserts it is refused for exactly `reason`. */
static void assert_refused(const bg_jwt_ring_t *ring, const char *token, int64_t now,
                           const char *reason)
{
    bg_jwt_claims_t c;
    const char *why = NULL;
    int rc = bg_jwt_verify(ring, token, strlen(token), now, &c, &why);
    cr_assert_eq(rc, BG_ERR_DENIED, "expected refusal (%s), got %d", reason, rc);
    cr_assert_not_null(why);
    cr_assert_str_eq(why, reason);
    /* a refused token leaves nothing behind that a careless caller could use */
    cr_assert_eq(c.sub[0], '\0');
    cr_assert_eq(c.kid[0], '\0');
    cr_assert_eq(c.exp, 0);
}

static void assert_accepted(const bg_jwt_ring_t *ring, const char *token, int64_t now,
                            bg_jwt_claims_t *c)
{
    const char *why = "unset";
    int rc = bg_jwt_verify(ring, token, strlen(token), now, c, &why);
    cr_assert_eq(rc, 0, "refused: %s", why != NULL ? why : "(null)");
    cr_assert_null(why);
}

/* Forges a token with header h and the good claims except `name`=`value`, signed HS256 by key A. */
static void forge_claim(char *out, size_t outlen, const char *name, const char *value)
{
    char p[2048];
    payload_with(p, sizeof(p), name, value, NULL);
    forge(out, outlen, HDR_A, p, MAC_HS256, SECRET_A);
}

/* Decodes the first (header) or second (payload) segment of a token into out. */
static void segment_json(const char *token, int which, char *out, size_t outlen)
{
    const char *start = token;
    for (int i = 0; i < which; i++)
        start = strchr(start, '.') + 1;
    const char *end = strchr(start, '.');
    size_t n = 0;
    cr_assert_eq(sodium_base642bin((unsigned char *)out, outlen - 1, start, (size_t)(end - start),
                                   NULL, &n, NULL, B64),
                 0);
    out[n] = '\0';
}

/* --- good tokens ------------------------------------------------------------------------- */

Test(jwt, valid_token_round_trips_with_all_claims)
{
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    char tok[BG_JWT_MAX_TOKEN];
    cr_assert_eq(bg_jwt_sign(ring, "user-1", "session-1", "admin", NOW, TTL, tok, sizeof(tok)), 0);
    bg_jwt_claims_t c;
    assert_accepted(ring, tok, NOW, &c);
    cr_assert_str_eq(c.sub, "user-1");
    cr_assert_str_eq(c.sid, "session-1");
    cr_assert_str_eq(c.role, "admin");
    cr_assert_str_eq(c.kid, "a");
    cr_assert_eq(c.iat, NOW);
    cr_assert_eq(c.nbf, NOW);
    cr_assert_eq(c.exp, NOW + TTL);
    bg_uuid_t jti;
    cr_assert_eq(bg_id_uuid_parse(c.jti, strlen(c.jti), &jti), 0, "jti: %s", c.jti);
    cr_assert_eq(bg_id_uuid_version(&jti), 7);

    /* the header names the key and the type; the payload says it is an access token */
    char json[1024];
    segment_json(tok, 0, json, sizeof(json));
    cr_assert_not_null(strstr(json, "\"alg\":\"HS256\""), "header: %s", json);
    cr_assert_not_null(strstr(json, "\"kid\":\"a\""), "header: %s", json);
    cr_assert_not_null(strstr(json, "\"typ\":\"JWT\""), "header: %s", json);
    segment_json(tok, 1, json, sizeof(json));
    cr_assert_not_null(strstr(json, "\"typ\":\"access\""), "payload: %s", json);
    cr_assert_not_null(strstr(json, "\"iss\":\"bot-generic\""), "payload: %s", json);
    cr_assert_not_null(strstr(json, "\"aud\":\"bot-generic-api\""), "payload: %s", json);
    cr_assert_null(strstr(json, SECRET_A));
    bg_jwt_ring_free(ring);
}

Test(jwt, every_token_gets_a_fresh_jti)
{
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    char t1[BG_JWT_MAX_TOKEN], t2[BG_JWT_MAX_TOKEN];
    cr_assert_eq(bg_jwt_sign(ring, "u", "s", "user", NOW, TTL, t1, sizeof(t1)), 0);
    cr_assert_eq(bg_jwt_sign(ring, "u", "s", "user", NOW, TTL, t2, sizeof(t2)), 0);
    bg_jwt_claims_t c1, c2;
    assert_accepted(ring, t1, NOW, &c1);
    assert_accepted(ring, t2, NOW, &c2);
    cr_assert_str_neq(c1.jti, c2.jti);
    cr_assert_str_neq(t1, t2);
    bg_jwt_ring_free(ring);
}

Test(jwt, hand_forged_token_with_the_right_key_verifies)
{
    /* control: the forging helper makes good tokens, so the refusals below are about the attack */
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    char tok[BG_JWT_MAX_TOKEN + 64];
    forge_claim(tok, sizeof(tok), NULL, NULL);
    bg_jwt_claims_t c;
    assert_accepted(ring, tok, NOW, &c);
    cr_assert_str_eq(c.sub, "0190f5c2-7c1e-7a3b-9d4e-000000000001");
    cr_assert_str_eq(c.role, "user");
    cr_assert_str_eq(c.kid, "a");
    bg_jwt_ring_free(ring);
}

Test(jwt, token_is_read_for_len_bytes_only)
{
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    char tok[BG_JWT_MAX_TOKEN + 16];
    cr_assert_eq(bg_jwt_sign(ring, "u", "s", "user", NOW, TTL, tok, sizeof(tok)), 0);
    size_t len = strlen(tok);
    /* not NUL-terminated: what follows len must not matter */
    memcpy(tok + len, "garbage", 8);
    bg_jwt_claims_t c;
    const char *why = NULL;
    cr_assert_eq(bg_jwt_verify(ring, tok, len, NOW, &c, &why), 0, "%s", why);
    /* one byte short cuts the signature */
    cr_assert_eq(bg_jwt_verify(ring, tok, len - 1, NOW, &c, &why), BG_ERR_DENIED);
    cr_assert_str_eq(why, "signature");
    bg_jwt_ring_free(ring);
}

Test(jwt, audience_may_be_an_array_that_contains_ours)
{
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    char tok[BG_JWT_MAX_TOKEN + 64];
    bg_jwt_claims_t c;
    forge_claim(tok, sizeof(tok), "aud", "[\"other\",\"bot-generic-api\"]");
    assert_accepted(ring, tok, NOW, &c);
    forge_claim(tok, sizeof(tok), "aud", "[\"other\"]");
    assert_refused(ring, tok, NOW, "audience");
    forge_claim(tok, sizeof(tok), "aud", "[]");
    assert_refused(ring, tok, NOW, "claims");
    forge_claim(tok, sizeof(tok), "aud", "[\"bot-generic-api\",7]");
    assert_refused(ring, tok, NOW, "claims");
    bg_jwt_ring_free(ring);
}

/* --- algorithm ---------------------------------------------------------------------------- */

Test(jwt, alg_none_with_an_empty_signature_is_refused)
{
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    char p[2048], tok[BG_JWT_MAX_TOKEN + 64];
    payload_with(p, sizeof(p), NULL, NULL, NULL);
    forge(tok, sizeof(tok), "{\"alg\":\"none\",\"kid\":\"a\"}", p, MAC_NONE, NULL);
    cr_assert_eq(tok[strlen(tok) - 1], '.');
    assert_refused(ring, tok, NOW, "alg");
    forge(tok, sizeof(tok), "{\"alg\":\"none\"}", p, MAC_NONE, NULL);
    assert_refused(ring, tok, NOW, "alg");
    forge(tok, sizeof(tok), "{\"alg\":\"None\",\"kid\":\"a\",\"typ\":\"JWT\"}", p, MAC_NONE, NULL);
    assert_refused(ring, tok, NOW, "alg");
    bg_jwt_ring_free(ring);
}

Test(jwt, alg_none_with_a_valid_looking_signature_is_refused)
{
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    char p[2048], tok[BG_JWT_MAX_TOKEN + 64];
    payload_with(p, sizeof(p), NULL, NULL, NULL);
    /* the MAC is even correct for the key: "none" must be refused before anyone looks at it */
    forge(tok, sizeof(tok), "{\"alg\":\"none\",\"kid\":\"a\",\"typ\":\"JWT\"}", p, MAC_HS256,
          SECRET_A);
    assert_refused(ring, tok, NOW, "alg");
    bg_jwt_ring_free(ring);
}

Test(jwt, alg_hs512_is_refused_even_when_correctly_signed)
{
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    char p[2048], tok[BG_JWT_MAX_TOKEN + 64];
    payload_with(p, sizeof(p), NULL, NULL, NULL);
    forge(tok, sizeof(tok), "{\"alg\":\"HS512\",\"kid\":\"a\",\"typ\":\"JWT\"}", p, MAC_HS512,
          SECRET_A);
    assert_refused(ring, tok, NOW, "alg");
    /* an HS256 MAC under an HS512 label is no better */
    forge(tok, sizeof(tok), "{\"alg\":\"HS512\",\"kid\":\"a\",\"typ\":\"JWT\"}", p, MAC_HS256,
          SECRET_A);
    assert_refused(ring, tok, NOW, "alg");
    bg_jwt_ring_free(ring);
}

Test(jwt, alg_rs256_key_confusion_is_refused)
{
    /* the classic confusion: an HMAC made with what the verifier holds, labelled RS256 */
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    char p[2048], tok[BG_JWT_MAX_TOKEN + 64];
    payload_with(p, sizeof(p), NULL, NULL, NULL);
    forge(tok, sizeof(tok), "{\"alg\":\"RS256\",\"kid\":\"a\",\"typ\":\"JWT\"}", p, MAC_HS256,
          SECRET_A);
    assert_refused(ring, tok, NOW, "alg");
    forge(tok, sizeof(tok), "{\"alg\":\"ES256\",\"kid\":\"a\",\"typ\":\"JWT\"}", p, MAC_HS256,
          SECRET_A);
    assert_refused(ring, tok, NOW, "alg");
    bg_jwt_ring_free(ring);
}

Test(jwt, alg_missing_or_not_exactly_hs256_is_refused)
{
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    static const char *const headers[] = {
        "{\"kid\":\"a\",\"typ\":\"JWT\"}",
        "{\"alg\":\"hs256\",\"kid\":\"a\",\"typ\":\"JWT\"}",
        "{\"alg\":\"HS256 \",\"kid\":\"a\",\"typ\":\"JWT\"}",
        "{\"alg\":\"\",\"kid\":\"a\",\"typ\":\"JWT\"}",
        "{\"alg\":null,\"kid\":\"a\",\"typ\":\"JWT\"}",
        "{\"alg\":256,\"kid\":\"a\",\"typ\":\"JWT\"}",
        "{\"alg\":true,\"kid\":\"a\",\"typ\":\"JWT\"}",
    };
    char p[2048], tok[BG_JWT_MAX_TOKEN + 64];
    payload_with(p, sizeof(p), NULL, NULL, NULL);
    for (size_t i = 0; i < sizeof(headers) / sizeof(headers[0]); i++) {
        forge(tok, sizeof(tok), headers[i], p, MAC_HS256, SECRET_A);
        bg_jwt_claims_t c;
        const char *why = NULL;
        cr_assert_eq(bg_jwt_verify(ring, tok, strlen(tok), NOW, &c, &why), BG_ERR_DENIED, "%s",
                     headers[i]);
        cr_assert_str_eq(why, "alg", "%s", headers[i]);
    }
    bg_jwt_ring_free(ring);
}

/* --- key ids and rotation ----------------------------------------------------------------- */

Test(jwt, missing_or_unknown_kid_is_refused)
{
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    char p[2048], tok[BG_JWT_MAX_TOKEN + 64];
    payload_with(p, sizeof(p), NULL, NULL, NULL);
    forge(tok, sizeof(tok), "{\"alg\":\"HS256\",\"typ\":\"JWT\"}", p, MAC_HS256, SECRET_A);
    assert_refused(ring, tok, NOW, "kid");
    forge(tok, sizeof(tok), "{\"alg\":\"HS256\",\"kid\":\"b\",\"typ\":\"JWT\"}", p, MAC_HS256,
          SECRET_A);
    assert_refused(ring, tok, NOW, "kid");
    forge(tok, sizeof(tok), "{\"alg\":\"HS256\",\"kid\":\"\",\"typ\":\"JWT\"}", p, MAC_HS256,
          SECRET_A);
    assert_refused(ring, tok, NOW, "kid");
    forge(tok, sizeof(tok), "{\"alg\":\"HS256\",\"kid\":1,\"typ\":\"JWT\"}", p, MAC_HS256,
          SECRET_A);
    assert_refused(ring, tok, NOW, "kid");
    forge(tok, sizeof(tok), "{\"alg\":\"HS256\",\"kid\":\"../a\",\"typ\":\"JWT\"}", p, MAC_HS256,
          SECRET_A);
    assert_refused(ring, tok, NOW, "kid");
    bg_jwt_ring_free(ring);
}

Test(jwt, rotation_keeps_old_tokens_valid_and_signs_with_the_new_key)
{
    bg_jwt_ring_t *before = ring_of("old:" SECRET_OLD);
    bg_jwt_ring_t *during = ring_of("new:" SECRET_NEW ",old:" SECRET_OLD);
    bg_jwt_ring_t *after = ring_of("new:" SECRET_NEW);
    cr_assert_str_eq(bg_jwt_ring_signing_kid(before), "old");
    cr_assert_str_eq(bg_jwt_ring_signing_kid(during), "new");

    char old_tok[BG_JWT_MAX_TOKEN], new_tok[BG_JWT_MAX_TOKEN];
    cr_assert_eq(bg_jwt_sign(before, "u", "s", "user", NOW, TTL, old_tok, sizeof(old_tok)), 0);
    cr_assert_eq(bg_jwt_sign(during, "u", "s", "user", NOW, TTL, new_tok, sizeof(new_tok)), 0);

    bg_jwt_claims_t c;
    assert_accepted(during, old_tok, NOW, &c);
    cr_assert_str_eq(c.kid, "old");
    assert_accepted(during, new_tok, NOW, &c);
    cr_assert_str_eq(c.kid, "new");
    char header[256];
    segment_json(new_tok, 0, header, sizeof(header));
    cr_assert_not_null(strstr(header, "\"kid\":\"new\""), "header: %s", header);

    /* once the old key is dropped its tokens stop working, and new ones go on */
    assert_refused(after, old_tok, NOW, "kid");
    assert_accepted(after, new_tok, NOW, &c);
    /* a ring that has not learnt the new key yet does not take its tokens */
    assert_refused(before, new_tok, NOW, "kid");
    bg_jwt_ring_free(before);
    bg_jwt_ring_free(during);
    bg_jwt_ring_free(after);
}

Test(jwt, signature_of_another_key_under_the_right_kid_is_refused)
{
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A ",b:" SECRET_B);
    char tok[BG_JWT_MAX_TOKEN + 64], p[2048];
    payload_with(p, sizeof(p), NULL, NULL, NULL);
    /* key b is in the ring, but the header says a: the key must follow the kid */
    forge(tok, sizeof(tok), HDR_A, p, MAC_HS256, SECRET_B);
    assert_refused(ring, tok, NOW, "signature");
    forge(tok, sizeof(tok), HDR_A, p, MAC_HS256, "some-other-secret-0123456789abcdefgh");
    assert_refused(ring, tok, NOW, "signature");
    bg_jwt_ring_free(ring);
}

/* --- claims ------------------------------------------------------------------------------- */

Test(jwt, wrong_issuer_audience_or_type_is_refused)
{
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    char tok[BG_JWT_MAX_TOKEN + 64];
    forge_claim(tok, sizeof(tok), "aud", "\"other-api\"");
    assert_refused(ring, tok, NOW, "audience");
    forge_claim(tok, sizeof(tok), "iss", "\"someone-else\"");
    assert_refused(ring, tok, NOW, "issuer");
    forge_claim(tok, sizeof(tok), "typ", "\"refresh\"");
    assert_refused(ring, tok, NOW, "type");
    forge_claim(tok, sizeof(tok), "typ", NULL);
    assert_refused(ring, tok, NOW, "claims");
    forge_claim(tok, sizeof(tok), "iss", NULL);
    assert_refused(ring, tok, NOW, "claims");
    forge_claim(tok, sizeof(tok), "aud", NULL);
    assert_refused(ring, tok, NOW, "claims");
    bg_jwt_ring_free(ring);
}

Test(jwt, expired_token_is_refused_after_the_leeway)
{
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    char tok[BG_JWT_MAX_TOKEN];
    cr_assert_eq(bg_jwt_sign(ring, "u", "s", "user", NOW, TTL, tok, sizeof(tok)), 0);
    bg_jwt_claims_t c;
    assert_accepted(ring, tok, NOW + TTL - 1, &c);
    /* clock skew: a server a little ahead still takes it */
    assert_accepted(ring, tok, NOW + TTL + BG_JWT_LEEWAY_S - 1, &c);
    assert_refused(ring, tok, NOW + TTL + BG_JWT_LEEWAY_S, "expired");
    assert_refused(ring, tok, NOW + 86400, "expired");
    bg_jwt_ring_free(ring);
}

Test(jwt, token_not_yet_valid_is_refused_beyond_the_leeway)
{
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    char tok[BG_JWT_MAX_TOKEN];
    cr_assert_eq(bg_jwt_sign(ring, "u", "s", "user", NOW, TTL, tok, sizeof(tok)), 0);
    bg_jwt_claims_t c;
    /* a server a little behind the signer still takes it */
    assert_accepted(ring, tok, NOW - BG_JWT_LEEWAY_S, &c);
    assert_refused(ring, tok, NOW - BG_JWT_LEEWAY_S - 1, "not_yet_valid");

    char forged[BG_JWT_MAX_TOKEN + 64];
    forge_claim(forged, sizeof(forged), "nbf", "1700000600");
    assert_refused(ring, forged, NOW, "not_yet_valid");
    assert_accepted(ring, forged, NOW + 600 - BG_JWT_LEEWAY_S, &c);
    /* issued in the far future: not a token this issuer made */
    forge_claim(forged, sizeof(forged), "iat", "1800000000");
    assert_refused(ring, forged, NOW, "not_yet_valid");
    bg_jwt_ring_free(ring);
}

Test(jwt, time_claims_must_be_present_integers)
{
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    char tok[BG_JWT_MAX_TOKEN + 64];
    static const char *const cases[][2] = {
        {"exp", NULL},   {"exp", "\"1700000900\""}, {"exp", "1700000900.5"}, {"exp", "1.7000009e9"},
        {"exp", "null"}, {"exp", "true"},           {"nbf", NULL},           {"nbf", "\"now\""},
        {"iat", NULL},   {"iat", "[1700000000]"},   {"exp", "1e19"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        forge_claim(tok, sizeof(tok), cases[i][0], cases[i][1]);
        bg_jwt_claims_t c;
        const char *why = NULL;
        cr_assert_eq(bg_jwt_verify(ring, tok, strlen(tok), NOW, &c, &why), BG_ERR_DENIED, "%s=%s",
                     cases[i][0], cases[i][1] ? cases[i][1] : "(absent)");
        cr_assert_str_eq(why, "claims", "%s=%s", cases[i][0],
                         cases[i][1] ? cases[i][1] : "(absent)");
    }
    /* past 64 bits: correctly signed, and refused by the claims check, not read as anything */
    forge_claim(tok, sizeof(tok), "exp", "99999999999999999999");
    assert_refused(ring, tok, NOW, "claims");
    bg_jwt_ring_free(ring);
}

Test(jwt, identity_claims_must_be_sane_strings)
{
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    char tok[BG_JWT_MAX_TOKEN + 64];
    char long_sub[80];
    /* 64 characters do not fit claims.sub (63 and a NUL) */
    (void)snprintf(long_sub, sizeof(long_sub), "\"%064d\"", 0);
    char long_role[32];
    (void)snprintf(long_role, sizeof(long_role), "\"%016d\"", 0);
    const char *const cases[][2] = {
        {"sub", NULL}, {"sub", "\"\""}, {"sub", "42"},       {"sub", long_sub}, {"sid", NULL},
        {"sid", "{}"}, {"role", NULL},  {"role", long_role}, {"jti", NULL},     {"jti", "false"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        forge_claim(tok, sizeof(tok), cases[i][0], cases[i][1]);
        bg_jwt_claims_t c;
        const char *why = NULL;
        cr_assert_eq(bg_jwt_verify(ring, tok, strlen(tok), NOW, &c, &why), BG_ERR_DENIED, "%s=%s",
                     cases[i][0], cases[i][1] ? cases[i][1] : "(absent)");
        cr_assert_str_eq(why, "claims", "%s=%s", cases[i][0],
                         cases[i][1] ? cases[i][1] : "(absent)");
    }
    /* the longest that fits is taken whole */
    (void)snprintf(long_sub, sizeof(long_sub), "\"%063d\"", 0);
    forge_claim(tok, sizeof(tok), "sub", long_sub);
    bg_jwt_claims_t c;
    assert_accepted(ring, tok, NOW, &c);
    cr_assert_eq(strlen(c.sub), 63);
    bg_jwt_ring_free(ring);
}

Test(jwt, signed_payload_with_duplicate_claims_is_refused)
{
    /* {"role":"user",…,"role":"admin"}: parsers disagree on which wins, so neither does */
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    char p[2048], tok[BG_JWT_MAX_TOKEN + 64];
    payload_with(p, sizeof(p), NULL, NULL, "\"role\":\"admin\"");
    forge(tok, sizeof(tok), HDR_A, p, MAC_HS256, SECRET_A);
    assert_refused(ring, tok, NOW, "claims");
    bg_jwt_ring_free(ring);
}

/* --- tampering ---------------------------------------------------------------------------- */

Test(jwt, tampered_payload_is_refused)
{
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    char tok[BG_JWT_MAX_TOKEN];
    cr_assert_eq(bg_jwt_sign(ring, "u", "s", "user", NOW, TTL, tok, sizeof(tok)), 0);
    char *payload = strchr(tok, '.') + 1;
    char *mid = payload + (strchr(payload, '.') - payload) / 2;
    *mid = *mid == 'A' ? 'B' : 'A';
    assert_refused(ring, tok, NOW, "signature");

    /* a payload that grants admin, spliced onto a real token's header and signature */
    char good[BG_JWT_MAX_TOKEN], forged[BG_JWT_MAX_TOKEN + 64], p[2048];
    cr_assert_eq(bg_jwt_sign(ring, "u", "s", "user", NOW, TTL, good, sizeof(good)), 0);
    payload_with(p, sizeof(p), "role", "\"admin\"", NULL);
    char pb[2048];
    b64url(p, strlen(p), pb, sizeof(pb));
    const char *dot1 = strchr(good, '.'), *dot2 = strrchr(good, '.');
    int n = snprintf(forged, sizeof(forged), "%.*s.%s%s", (int)(dot1 - good), good, pb, dot2);
    cr_assert(n > 0 && (size_t)n < sizeof(forged));
    assert_refused(ring, forged, NOW, "signature");
    bg_jwt_ring_free(ring);
}

Test(jwt, tampered_signature_is_refused)
{
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    char tok[BG_JWT_MAX_TOKEN], orig[BG_JWT_MAX_TOKEN];
    cr_assert_eq(bg_jwt_sign(ring, "u", "s", "user", NOW, TTL, orig, sizeof(orig)), 0);
    size_t len = strlen(orig);
    char *sig = strrchr(orig, '.') + 1;
    size_t at = (size_t)(sig - orig);

    memcpy(tok, orig, len + 1);
    tok[at + 10] = tok[at + 10] == 'x' ? 'y' : 'x';
    assert_refused(ring, tok, NOW, "signature");

    /* the last character carries 4 bits and 2 unused ones: another encoding of "the same" MAC */
    memcpy(tok, orig, len + 1);
    tok[len - 1] = flip_low_bit(tok[len - 1]);
    assert_refused(ring, tok, NOW, "signature");

    /* truncated, extended, emptied */
    memcpy(tok, orig, len + 1);
    tok[len - 1] = '\0';
    assert_refused(ring, tok, NOW, "signature");
    memcpy(tok, orig, len + 1);
    tok[len] = 'A';
    tok[len + 1] = '\0';
    assert_refused(ring, tok, NOW, "signature");
    memcpy(tok, orig, at);
    tok[at] = '\0';
    assert_refused(ring, tok, NOW, "signature");
    bg_jwt_ring_free(ring);
}

/* --- shape -------------------------------------------------------------------------------- */

Test(jwt, garbage_and_wrong_shapes_are_malformed)
{
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    char good[BG_JWT_MAX_TOKEN];
    cr_assert_eq(bg_jwt_sign(ring, "u", "s", "user", NOW, TTL, good, sizeof(good)), 0);
    char tok[BG_JWT_MAX_TOKEN + 64];

    assert_refused(ring, "garbage", NOW, "malformed");
    assert_refused(ring, "", NOW, "malformed");
    assert_refused(ring, "..", NOW, "malformed");
    assert_refused(ring, "a..", NOW, "malformed");
    assert_refused(ring, ".b.", NOW, "malformed");
    bg_jwt_claims_t c;
    const char *why = NULL;
    cr_assert_eq(bg_jwt_verify(ring, NULL, 0, NOW, &c, &why), BG_ERR_DENIED);
    cr_assert_str_eq(why, "malformed");

    /* one segment, two segments, four segments */
    const char *dot1 = strchr(good, '.');
    (void)snprintf(tok, sizeof(tok), "%.*s", (int)(dot1 - good), good);
    assert_refused(ring, tok, NOW, "malformed");
    (void)snprintf(tok, sizeof(tok), "%.*s", (int)(strrchr(good, '.') - good), good);
    assert_refused(ring, tok, NOW, "malformed");
    (void)snprintf(tok, sizeof(tok), "%s.", good);
    assert_refused(ring, tok, NOW, "malformed");
    (void)snprintf(tok, sizeof(tok), "%s.%s", good, strrchr(good, '.') + 1);
    assert_refused(ring, tok, NOW, "malformed");

    /* characters outside base64url: standard base64, padding, whitespace, NUL, UTF-8 */
    static const char bad[] = {'+', '/', '=', ' ', '\n', '\0', '\x80', '"'};
    size_t len = strlen(good);
    for (size_t i = 0; i < sizeof(bad); i++) {
        memcpy(tok, good, len + 1);
        tok[5] = bad[i];
        cr_assert_eq(bg_jwt_verify(ring, tok, len, NOW, &c, &why), BG_ERR_DENIED, "char %d",
                     bad[i]);
        cr_assert_str_eq(why, "malformed", "char %d", bad[i]);
    }
    (void)snprintf(tok, sizeof(tok), " %s", good);
    assert_refused(ring, tok, NOW, "malformed");
    (void)snprintf(tok, sizeof(tok), "Bearer %s", good);
    assert_refused(ring, tok, NOW, "malformed");
    bg_jwt_ring_free(ring);
}

Test(jwt, oversize_token_is_refused_unparsed)
{
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    static char tok[BG_JWT_MAX_TOKEN + 2];
    memset(tok, 'A', BG_JWT_MAX_TOKEN + 1);
    tok[10] = '.';
    tok[20] = '.';
    tok[BG_JWT_MAX_TOKEN + 1] = '\0';
    assert_refused(ring, tok, NOW, "too_long");
    /* refused on its length alone, whatever it holds */
    memset(tok, '%', BG_JWT_MAX_TOKEN + 1);
    assert_refused(ring, tok, NOW, "too_long");
    bg_jwt_ring_free(ring);
}

Test(jwt, token_of_exactly_the_maximum_length_is_read)
{
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    static char tok[BG_JWT_MAX_TOKEN + 256];
    char extra[4096], p[4096], header[128];
    bool found = false;
    /* pad a claim (and the header, since base64 skips lengths) until the token is exactly max */
    for (int hpad = 0; hpad < 3 && !found; hpad++) {
        for (int pad = 2000; pad < 3200 && !found; pad++) {
            (void)snprintf(header, sizeof(header),
                           "{\"alg\":\"HS256\",\"kid\":\"a\",\"typ\":\"JWT\",\"x\":\"%.*s\"}", hpad,
                           "xxx");
            int n = snprintf(extra, sizeof(extra), "\"pad\":[");
            for (int left = pad; left > 0; left -= 200) {
                n += snprintf(extra + n, sizeof(extra) - (size_t)n, "%s\"%0*d\"",
                              left == pad ? "" : ",", left < 200 ? left : 200, 0);
            }
            (void)snprintf(extra + n, sizeof(extra) - (size_t)n, "]");
            payload_with(p, sizeof(p), NULL, NULL, extra);
            forge(tok, sizeof(tok), header, p, MAC_HS256, SECRET_A);
            found = strlen(tok) == BG_JWT_MAX_TOKEN;
        }
    }
    cr_assert(found);
    bg_jwt_claims_t c;
    assert_accepted(ring, tok, NOW, &c);
    bg_jwt_ring_free(ring);
}

Test(jwt, header_that_is_not_a_json_object_is_malformed)
{
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    char p[2048], tok[BG_JWT_MAX_TOKEN + 64];
    payload_with(p, sizeof(p), NULL, NULL, NULL);
    static const char *const headers[] = {
        "not json",
        "[\"HS256\",\"a\"]",
        "\"HS256\"",
        "{\"alg\":\"HS256\",\"kid\":\"a\"",
        "{\"alg\":\"HS256\",\"kid\":\"a\",\"alg\":\"none\"}",
        "{\"alg\":\"none\",\"kid\":\"a\",\"alg\":\"HS256\"}",
        "{\"alg\":\"HS256\",\"kid\":\"a\"} x",
        "{\"alg\":\"HS256\",\"kid\":\"a\",\"jwk\":{\"kty\":\"oct\"}}",
        "{\"alg\":[\"HS256\"],\"kid\":\"a\"}",
        "{\"alg\":\"HS256\",\"kid\":\"a\",\"crit\":[\"exp\"]}",
        "{\"alg\":\"HS256\",\"kid\":\"a\",\"typ\":\"JOSE+JSON\"}",
        "{\"alg\":\"HS256\",\"kid\":\"a\\u0000b\"}",
        "",
    };
    for (size_t i = 0; i < sizeof(headers) / sizeof(headers[0]); i++) {
        forge(tok, sizeof(tok), headers[i], p, MAC_HS256, SECRET_A);
        bg_jwt_claims_t c;
        const char *why = NULL;
        cr_assert_eq(bg_jwt_verify(ring, tok, strlen(tok), NOW, &c, &why), BG_ERR_DENIED, "%s",
                     headers[i]);
        cr_assert_str_eq(why, "malformed", "%s", headers[i]);
    }
    bg_jwt_ring_free(ring);
}

Test(jwt, header_with_non_canonical_base64_is_malformed)
{
    /*
     * A 25-byte header ends in a character with 4 unused bits; setting one gives a second spelling
     * of the same bytes. Correctly signed over that spelling, only a strict decoder refuses it.
     */
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    const char *header = "{\"alg\":\"HS256\",\"kid\":\"a\"}";
    cr_assert_eq(strlen(header) % 3, 1);
    char h[64], pj[2048], p[4096], tok[BG_JWT_MAX_TOKEN + 64];
    b64url(header, strlen(header), h, sizeof(h));
    payload_with(pj, sizeof(pj), NULL, NULL, NULL);
    b64url(pj, strlen(pj), p, sizeof(p));
    forge_raw(tok, sizeof(tok), h, p, MAC_HS256, SECRET_A);
    bg_jwt_claims_t c;
    assert_accepted(ring, tok, NOW, &c);
    h[strlen(h) - 1] = flip_low_bit(h[strlen(h) - 1]);
    forge_raw(tok, sizeof(tok), h, p, MAC_HS256, SECRET_A);
    assert_refused(ring, tok, NOW, "malformed");
    bg_jwt_ring_free(ring);
}

/* --- signing ------------------------------------------------------------------------------ */

Test(jwt, sign_refuses_what_verify_would_refuse)
{
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    char tok[BG_JWT_MAX_TOKEN];
    char s64[65];
    memset(s64, 'x', 64);
    s64[64] = '\0';
    cr_assert_eq(bg_jwt_sign(ring, "", "s", "user", NOW, TTL, tok, sizeof(tok)), BG_ERR_INVALID);
    cr_assert_eq(tok[0], '\0');
    cr_assert_eq(bg_jwt_sign(ring, NULL, "s", "user", NOW, TTL, tok, sizeof(tok)), BG_ERR_INVALID);
    cr_assert_eq(bg_jwt_sign(ring, s64, "s", "user", NOW, TTL, tok, sizeof(tok)), BG_ERR_INVALID);
    cr_assert_eq(bg_jwt_sign(ring, "u", s64, "user", NOW, TTL, tok, sizeof(tok)), BG_ERR_INVALID);
    cr_assert_eq(bg_jwt_sign(ring, "u", "s", "administrator-xyz", NOW, TTL, tok, sizeof(tok)),
                 BG_ERR_INVALID);
    cr_assert_eq(bg_jwt_sign(ring, "u", "s", "user", NOW, 0, tok, sizeof(tok)), BG_ERR_INVALID);
    cr_assert_eq(bg_jwt_sign(ring, "u", "s", "user", NOW, -5, tok, sizeof(tok)), BG_ERR_INVALID);
    cr_assert_eq(bg_jwt_sign(ring, "u", "s", "user", INT64_MAX - 10, TTL, tok, sizeof(tok)),
                 BG_ERR_INVALID);
    s64[63] = '\0';
    cr_assert_eq(bg_jwt_sign(ring, s64, s64, "user", NOW, TTL, tok, sizeof(tok)), 0);
    bg_jwt_claims_t c;
    assert_accepted(ring, tok, NOW, &c);
    cr_assert_str_eq(c.sub, s64);
    bg_jwt_ring_free(ring);
}

Test(jwt, sign_into_a_small_buffer_is_too_large)
{
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    char tok[BG_JWT_MAX_TOKEN];
    cr_assert_eq(bg_jwt_sign(ring, "u", "s", "user", NOW, TTL, tok, sizeof(tok)), 0);
    size_t need = strlen(tok) + 1;
    char small[BG_JWT_MAX_TOKEN];
    memset(small, 'z', sizeof(small));
    cr_assert_eq(bg_jwt_sign(ring, "u", "s", "user", NOW, TTL, small, need - 1), BG_ERR_TOO_LARGE);
    cr_assert_eq(small[0], '\0');
    cr_assert_eq(bg_jwt_sign(ring, "u", "s", "user", NOW, TTL, small, need), 0);
    cr_assert_eq(strlen(small), need - 1);
    bg_jwt_ring_free(ring);
}

/* --- key ring ----------------------------------------------------------------------------- */

static void assert_ring_error(const char *keys, const char *secret, const char *expect,
                              const char *never)
{
    bg_jwt_ring_t *ring = (bg_jwt_ring_t *)&ring; /* must be reset to NULL */
    char err[256];
    cr_assert_eq(bg_jwt_ring_new(keys, secret, &ring, err, sizeof(err)), BG_ERR_CONFIG, "%s",
                 keys ? keys : "(null)");
    cr_assert_null(ring);
    cr_assert_not_null(strstr(err, expect), "error: %s", err);
    if (never != NULL)
        cr_assert_null(strstr(err, never), "error leaks a secret: %s", err);
}

Test(jwt, key_ring_errors_name_the_problem_never_the_secret)
{
    assert_ring_error(NULL, NULL, "no signing key", NULL);
    assert_ring_error("", "", "no signing key", NULL);
    assert_ring_error(NULL, "short-secret-value", "at least 32 bytes", "short-secret-value");
    assert_ring_error("a:short-secret-value", NULL, "entry 1: the secret must be at least 32",
                      "short-secret-value");
    assert_ring_error("a:" SECRET_A ",b:short-secret-value", NULL, "entry 2", "short-secret");
    assert_ring_error("a:" SECRET_A ",a:" SECRET_B, NULL, "entries 1 and 2 have the same kid",
                      "secret-");
    assert_ring_error("bad kid:" SECRET_A, NULL, "entry 1: the kid must be", "secret-");
    assert_ring_error("a/b:" SECRET_A, NULL, "the kid must be", "secret-");
    assert_ring_error(":" SECRET_A, NULL, "the kid must be", "secret-");
    assert_ring_error("k0123456789012345678901234567890:" SECRET_A, NULL, "the kid must be",
                      "secret-");
    /* a forgotten kid: the secret must not come back in the message, not even a part of it */
    assert_ring_error(SECRET_A, NULL, "entry 1 is not kid:secret", "secret-A");
    assert_ring_error("secretpart:short", NULL, "at least", "secretpart");
    assert_ring_error("a:" SECRET_A ",,b:" SECRET_B, NULL, "entry 2 is not kid:secret", "secret-");
    assert_ring_error("a:" SECRET_A ",", NULL, "entry 2 is not kid:secret", "secret-");
    assert_ring_error("a:" SECRET_A ",b:", NULL, "entry 2: the secret must be at least", "secret-");

    char many[1024];
    int n = 0;
    for (int i = 0; i < 9; i++)
        n += snprintf(many + n, sizeof(many) - (size_t)n, "%sk%d:%s", i ? "," : "", i, SECRET_A);
    assert_ring_error(many, NULL, "more than 8 keys", "secret-");

    char huge[700];
    memset(huge, 's', sizeof(huge) - 1);
    huge[sizeof(huge) - 1] = '\0';
    char keys[720];
    (void)snprintf(keys, sizeof(keys), "a:%s", huge);
    assert_ring_error(keys, NULL, "at most", "sssssssss");

    /* err may be absent */
    bg_jwt_ring_t *ring = NULL;
    cr_assert_eq(bg_jwt_ring_new("x", NULL, &ring, NULL, 0), BG_ERR_CONFIG);
    cr_assert_null(ring);
}

Test(jwt, key_ring_from_a_single_secret_or_a_list)
{
    bg_jwt_ring_t *ring = NULL;
    char err[256];
    cr_assert_eq(bg_jwt_ring_new(NULL, SECRET_A, &ring, err, sizeof(err)), 0, "%s", err);
    cr_assert_str_eq(bg_jwt_ring_signing_kid(ring), "k0");
    bg_jwt_ring_free(ring);
    cr_assert_eq(bg_jwt_ring_new("", SECRET_A, &ring, err, sizeof(err)), 0, "%s", err);
    cr_assert_str_eq(bg_jwt_ring_signing_kid(ring), "k0");
    bg_jwt_ring_free(ring);
    /* the list wins over the single secret; secrets may contain ':' */
    cr_assert_eq(bg_jwt_ring_new("k.1-A_z:" SECRET_A ":tail", "ignored", &ring, err, sizeof(err)),
                 0, "%s", err);
    cr_assert_str_eq(bg_jwt_ring_signing_kid(ring), "k.1-A_z");
    char tok[BG_JWT_MAX_TOKEN];
    cr_assert_eq(bg_jwt_sign(ring, "u", "s", "user", NOW, TTL, tok, sizeof(tok)), 0);
    bg_jwt_ring_free(ring);

    /* the secret is all of "SECRET_A:tail": SECRET_A alone does not verify it */
    bg_jwt_ring_t *other = ring_of("k.1-A_z:" SECRET_A);
    assert_refused(other, tok, NOW, "signature");
    bg_jwt_ring_free(other);
    bg_jwt_ring_free(NULL);
}

/* --- threads ------------------------------------------------------------------------------ */

typedef struct worker {
    const bg_jwt_ring_t *ring;
    const char *good, *forged;
    int failures;
} worker_t;

static void *verify_many(void *arg)
{
    worker_t *w = arg;
    for (int i = 0; i < 2000; i++) {
        bg_jwt_claims_t c;
        const char *why = NULL;
        if (bg_jwt_verify(w->ring, w->good, strlen(w->good), NOW, &c, &why) != 0 ||
            strcmp(c.sub, "u") != 0)
            w->failures++;
        if (bg_jwt_verify(w->ring, w->forged, strlen(w->forged), NOW, &c, &why) != BG_ERR_DENIED ||
            strcmp(why, "signature") != 0)
            w->failures++;
    }
    return NULL;
}

Test(jwt, concurrent_verification_from_many_threads)
{
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A ",b:" SECRET_B);
    char good[BG_JWT_MAX_TOKEN], forged[BG_JWT_MAX_TOKEN + 64], p[2048];
    cr_assert_eq(bg_jwt_sign(ring, "u", "s", "user", NOW, TTL, good, sizeof(good)), 0);
    payload_with(p, sizeof(p), NULL, NULL, NULL);
    forge(forged, sizeof(forged), HDR_A, p, MAC_HS256, SECRET_B);
    pthread_t threads[4];
    worker_t workers[4];
    for (int i = 0; i < 4; i++) {
        workers[i] = (worker_t){.ring = ring, .good = good, .forged = forged};
        cr_assert_eq(pthread_create(&threads[i], NULL, verify_many, &workers[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        cr_assert_eq(pthread_join(threads[i], NULL), 0);
        cr_assert_eq(workers[i].failures, 0, "thread %d", i);
    }
    bg_jwt_ring_free(ring);
}

/* --- the thread's cache of verified tokens -------------------------------------------------- */

static void *verify_in_thread(void *arg)
{
    const void *const *a = arg;
    bg_jwt_claims_t c;
    const char *why = NULL;
    intptr_t rc = bg_jwt_verify(a[0], a[1], strlen(a[1]), NOW, &c, &why);
    return (void *)rc;
}

Test(jwt, a_verified_token_is_remembered_only_for_its_exact_bytes_ring_and_times)
{
    bg_jwt_ring_t *ring = ring_of("a:" SECRET_A);
    char tok[BG_JWT_MAX_TOKEN];
    cr_assert_eq(bg_jwt_sign(ring, "user-1", "sess-1", "admin", NOW, TTL, tok, sizeof(tok)), 0);
    bg_jwt_claims_t c1, c2;
    assert_accepted(ring, tok, NOW, &c1);
    assert_accepted(ring, tok, NOW, &c2); /* from the cache: the same claims */
    cr_expect_eq(memcmp(&c1, &c2, sizeof(c1)), 0);
    cr_expect_str_eq(c2.sub, "user-1");
    cr_expect_str_eq(c2.role, "admin");
    cr_expect_str_eq(c2.kid, "a");

    /* the times are checked again on every use */
    assert_refused(ring, tok, NOW + TTL + BG_JWT_LEEWAY_S, "expired");
    assert_refused(ring, tok, NOW - BG_JWT_LEEWAY_S - 1, "not_yet_valid");
    assert_accepted(ring, tok, NOW + 1, &c2);

    /* another payload under the remembered token's header and signature (the same cache slot) */
    char forged[BG_JWT_MAX_TOKEN + 64], p[2048], pb[2048];
    payload_with(p, sizeof(p), "sub", "\"user-2\"", NULL);
    b64url(p, strlen(p), pb, sizeof(pb));
    const char *dot1 = strchr(tok, '.'), *dot2 = strrchr(tok, '.');
    int n = snprintf(forged, sizeof(forged), "%.*s.%s%s", (int)(dot1 - tok), tok, pb, dot2);
    cr_assert(n > 0 && (size_t)n < sizeof(forged));
    assert_refused(ring, forged, NOW, "signature");
    assert_accepted(ring, tok, NOW, &c2);

    /* another ring with the same kid and another secret, made while the first lives and after
     * it is gone (it may take the freed ring's address): neither takes the remembered token */
    bg_jwt_ring_t *other = ring_of("a:" SECRET_B);
    assert_refused(other, tok, NOW, "signature");
    bg_jwt_ring_free(other);
    bg_jwt_ring_free(ring);
    other = ring_of("a:" SECRET_B);
    assert_refused(other, tok, NOW, "signature");

    /* a thread of its own verifies for itself, and is refused the same */
    const void *args[2] = {other, tok};
    pthread_t th;
    void *res = NULL;
    cr_assert_eq(pthread_create(&th, NULL, verify_in_thread, args), 0);
    cr_assert_eq(pthread_join(th, &res), 0);
    cr_expect_eq((intptr_t)res, BG_ERR_DENIED);
    bg_jwt_ring_free(other);
}
