/*
 * Secrets on top of libsodium: argon2id password hashes, random tokens, SHA-256 and constant-time
 * comparison.
 *
 * libsodium must be initialised once before use (it picks implementations and opens the entropy
 * source); sodium_init() is itself safe to call from several threads, but we still funnel it
 * through pthread_once so a failure is seen the same way by every caller. Failure to initialise
 * means the process has no entropy source: nothing secret can be produced, so the random functions
 * abort rather than hand out predictable bytes.
 */
#include <pthread.h>
#include <sodium.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/log.h"

_Static_assert(BG_CRYPTO_PWHASH_LEN == crypto_pwhash_STRBYTES, "password hash buffer size");
_Static_assert(BG_CRYPTO_SHA256_HEX_LEN == crypto_hash_sha256_BYTES * 2 + 1, "sha-256 hex size");

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static int init_rc;

static void init_sodium(void)
{
    /* 0: initialised now, 1: already initialised by someone else; both are fine. */
    init_rc = sodium_init() < 0 ? BG_ERR_IO : 0;
}

int bg_crypto_init(void)
{
    (void)pthread_once(&init_once, init_sodium);
    if (init_rc != 0)
        bg_error("libsodium could not be initialised");
    return init_rc;
}

/* For the functions that cannot report an error: random bytes without a CSPRNG are not an option.
 */
static void init_or_abort(void)
{
    if (bg_crypto_init() != 0)
        abort();
}

int bg_crypto_password_hash(const char *password, char *out, size_t outlen)
{
    size_t len = strnlen(password, BG_CRYPTO_PASSWORD_MAX + 1);
    if (len > BG_CRYPTO_PASSWORD_MAX || outlen < BG_CRYPTO_PWHASH_LEN)
        return BG_ERR_INVALID;
    int rc = bg_crypto_init();
    if (rc != 0)
        return rc;
    if (crypto_pwhash_str_alg(out, password, len, BG_CRYPTO_PWHASH_OPSLIMIT,
                              BG_CRYPTO_PWHASH_MEMLIMIT, crypto_pwhash_ALG_ARGON2ID13) != 0) {
        /* The only documented failure is running out of memory for the 19 MiB work area. */
        bg_error("argon2id hashing failed (out of memory?)");
        out[0] = '\0';
        return BG_ERR_IO;
    }
    return 0;
}

int bg_crypto_password_verify(const char *hash, const char *password)
{
    size_t len = strnlen(password, BG_CRYPTO_PASSWORD_MAX + 1);
    if (len > BG_CRYPTO_PASSWORD_MAX)
        return BG_ERR_INVALID;
    if (hash == NULL || strnlen(hash, BG_CRYPTO_PWHASH_LEN) >= BG_CRYPTO_PWHASH_LEN)
        return BG_ERR_DENIED;
    int rc = bg_crypto_init();
    if (rc != 0)
        return rc;
    return crypto_pwhash_str_verify(hash, password, len) == 0 ? 0 : BG_ERR_DENIED;
}

bool bg_crypto_password_needs_rehash(const char *hash)
{
    if (hash == NULL || strnlen(hash, BG_CRYPTO_PWHASH_LEN) >= BG_CRYPTO_PWHASH_LEN)
        return true;
    init_or_abort();
    /* 1: other parameters, -1: not an argon2id hash at all; both call for a new hash. */
    return crypto_pwhash_str_needs_rehash(hash, BG_CRYPTO_PWHASH_OPSLIMIT,
                                          BG_CRYPTO_PWHASH_MEMLIMIT) != 0;
}

void bg_crypto_random_bytes(void *buf, size_t n)
{
    init_or_abort();
    randombytes_buf(buf, n);
}

uint32_t bg_crypto_random_uniform(uint32_t upper)
{
    if (upper == 0)
        return 0;
    init_or_abort();
    return randombytes_uniform(upper);
}

int bg_crypto_random_token(size_t bytes, char *out, size_t outlen)
{
    if (outlen > 0)
        out[0] = '\0';
    if (bytes == 0 || bytes > BG_CRYPTO_TOKEN_MAX_BYTES)
        return BG_ERR_INVALID;
    const int variant = sodium_base64_VARIANT_URLSAFE_NO_PADDING;
    if (outlen < sodium_base64_ENCODED_LEN(bytes, variant))
        return BG_ERR_TOO_LARGE;
    unsigned char raw[BG_CRYPTO_TOKEN_MAX_BYTES];
    bg_crypto_random_bytes(raw, bytes);
    sodium_bin2base64(out, outlen, raw, bytes, variant);
    sodium_memzero(raw, bytes);
    return 0;
}

int bg_crypto_b64url_encode(const void *in, size_t len, char *out, size_t outlen)
{
    const int variant = sodium_base64_VARIANT_URLSAFE_NO_PADDING;
    if (outlen < sodium_base64_ENCODED_LEN(len, variant)) {
        if (outlen > 0)
            out[0] = '\0';
        return BG_ERR_TOO_LARGE;
    }
    sodium_bin2base64(out, outlen, in, len, variant);
    return 0;
}

/* The value of a base64url character, 64 for anything else. */
static unsigned char b64url_of(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return (unsigned char)(c - 'A');
    if (c >= 'a' && c <= 'z')
        return (unsigned char)(c - 'a' + 26);
    if (c >= '0' && c <= '9')
        return (unsigned char)(c - '0' + 52);
    if (c == '-')
        return 62;
    if (c == '_')
        return 63;
    return 64;
}

int bg_crypto_b64url_decode(const char *in, size_t len, void *out, size_t outlen, size_t *outn)
{
    *outn = 0;
    if (len % 4 == 1)
        return BG_ERR_INVALID;
    size_t need = len / 4 * 3 + (len % 4 == 0 ? 0 : len % 4 - 1);
    if (need > outlen)
        return BG_ERR_INVALID;
    const unsigned char *p = (const unsigned char *)in;
    unsigned char *o = out;
    size_t i = 0, k = 0;
    for (; i + 4 <= len; i += 4) {
        unsigned a = b64url_of(p[i]), b = b64url_of(p[i + 1]), c = b64url_of(p[i + 2]),
                 d = b64url_of(p[i + 3]);
        if ((a | b | c | d) & 64)
            return BG_ERR_INVALID;
        uint32_t v = a << 18 | b << 12 | c << 6 | d;
        o[k++] = (unsigned char)(v >> 16);
        o[k++] = (unsigned char)(v >> 8);
        o[k++] = (unsigned char)v;
    }
    size_t rest = len - i;
    if (rest > 0) {
        unsigned a = b64url_of(p[i]), b = b64url_of(p[i + 1]);
        unsigned c = rest == 3 ? b64url_of(p[i + 2]) : 0;
        if ((a | b | c) & 64)
            return BG_ERR_INVALID;
        /* the bits past the last whole byte must be zero: one spelling per value */
        if ((rest == 2 && (b & 0x0F) != 0) || (rest == 3 && (c & 0x03) != 0))
            return BG_ERR_INVALID;
        uint32_t v = a << 18 | b << 12 | c << 6;
        o[k++] = (unsigned char)(v >> 16);
        if (rest == 3)
            o[k++] = (unsigned char)(v >> 8);
    }
    *outn = k;
    return 0;
}

int bg_crypto_b64url_decode_str(const char *in, char *out, size_t outlen)
{
    size_t len = strlen(in);
    size_t n = 0;
    if (len == 0 || outlen == 0 || bg_crypto_b64url_decode(in, len, out, outlen - 1, &n) != 0 ||
        memchr(out, '\0', n) != NULL) {
        if (outlen > 0)
            out[0] = '\0';
        return BG_ERR_INVALID;
    }
    out[n] = '\0';
    return 0;
}

void bg_crypto_sha256_hex(const void *data, size_t len, char out[BG_CRYPTO_SHA256_HEX_LEN])
{
    unsigned char digest[crypto_hash_sha256_BYTES];
    init_or_abort();
    crypto_hash_sha256(digest, data, len);
    sodium_bin2hex(out, BG_CRYPTO_SHA256_HEX_LEN, digest, sizeof(digest));
}

bool bg_crypto_equal(const void *a, const void *b, size_t len)
{
    return sodium_memcmp(a, b, len) == 0;
}

bool bg_crypto_str_equal(const char *a, const char *b)
{
    if (a == NULL || b == NULL)
        return false;
    size_t alen = strlen(a), blen = strlen(b);
    /*
     * Compare over the shorter length so we never read past either string, and fold the length
     * comparison in at the end: the time then depends on the lengths only, which are not secret
     * (tokens have fixed lengths).
     */
    size_t n = alen < blen ? alen : blen;
    bool same = sodium_memcmp(a, b, n) == 0;
    return same && alen == blen;
}

void bg_crypto_wipe(void *p, size_t n)
{
    sodium_memzero(p, n);
}
