/*
 * Secrets: password hashing, random tokens, digests and constant-time comparison (libsodium).
 *
 * Passwords are hashed with argon2id at the OWASP baseline (2 passes, 19 MiB, one lane); the
 * encoded hash carries its own parameters, so raising them later only makes
 * bg_crypto_password_needs_rehash() say so for old hashes, which are upgraded at the next
 * successful login. Refresh tokens and API keys are random tokens shown once and stored as SHA-256
 * digests: they carry 256 bits of entropy, so a fast digest is enough and lets the lookup be an
 * index hit. Every comparison of secrets goes through bg_crypto_equal().
 *
 * All functions are thread-safe; libsodium is initialised on first use.
 */
#ifndef BG_CRYPTO_H
#define BG_CRYPTO_H

#include "bg/common.h"

/** argon2id passes (opslimit); OWASP minimum for 19 MiB. */
#define BG_CRYPTO_PWHASH_OPSLIMIT 2
/** argon2id memory in bytes (memlimit). */
#define BG_CRYPTO_PWHASH_MEMLIMIT ((size_t)19 * 1024 * 1024)
/** Size of a buffer for an encoded password hash, terminator included (crypto_pwhash_STRBYTES). */
#define BG_CRYPTO_PWHASH_LEN 128
/** Longest password accepted, in bytes: bounds the work one request can cause. */
#define BG_CRYPTO_PASSWORD_MAX 1024
/** Size of a buffer for a SHA-256 digest in lower-case hex, terminator included. */
#define BG_CRYPTO_SHA256_HEX_LEN 65
/** Most random bytes bg_crypto_random_token() draws. */
#define BG_CRYPTO_TOKEN_MAX_BYTES 256

/** Initialises libsodium (idempotent). Returns 0, or BG_ERR_IO when there is no entropy source. */
BG_MUSTCHECK int bg_crypto_init(void);

/**
 * Hashes a password with argon2id into out (at least BG_CRYPTO_PWHASH_LEN bytes), as the encoded
 * "$argon2id$v=19$m=…,t=…,p=…$salt$hash" string. Takes a few tens of milliseconds of CPU: never
 * call it on an event loop. Returns 0, BG_ERR_INVALID (password longer than BG_CRYPTO_PASSWORD_MAX
 * or out too small), or BG_ERR_IO (out of memory for the hash).
 */
BG_MUSTCHECK int bg_crypto_password_hash(const char *password, char *out, size_t outlen);

/**
 * Checks a password against an encoded hash in constant time. Returns 0 when it matches,
 * BG_ERR_DENIED when it does not or when the hash is malformed (a malformed stored hash must not
 * let anyone in), BG_ERR_INVALID for a password longer than BG_CRYPTO_PASSWORD_MAX.
 */
BG_MUSTCHECK int bg_crypto_password_verify(const char *hash, const char *password);

/** Returns true when hash was made with other than the current parameters, or is malformed. */
bool bg_crypto_password_needs_rehash(const char *hash);

/** Fills buf with n random bytes from the operating system's CSPRNG. */
void bg_crypto_random_bytes(void *buf, size_t n);

/** Returns a uniformly distributed random number in [0, upper) (0 when upper is 0). */
uint32_t bg_crypto_random_uniform(uint32_t upper);

/**
 * Draws bytes random bytes (1..BG_CRYPTO_TOKEN_MAX_BYTES) and writes them base64url-encoded without
 * padding into out, NUL-terminated (32 bytes need 44). Returns 0, BG_ERR_INVALID for a bad byte
 * count, or BG_ERR_TOO_LARGE when out is too small (out is then "").
 */
BG_MUSTCHECK int bg_crypto_random_token(size_t bytes, char *out, size_t outlen);

/** Writes the SHA-256 of len bytes at data into out: 64 lower-case hex digits and a NUL. */
void bg_crypto_sha256_hex(const void *data, size_t len, char out[BG_CRYPTO_SHA256_HEX_LEN]);

/** Compares len bytes of a and b in time that depends only on len. */
bool bg_crypto_equal(const void *a, const void *b, size_t len);

/**
 * Compares two NUL-terminated secrets; the time depends on their lengths only, never on where they
 * differ. Either may be NULL (never equal).
 */
bool bg_crypto_str_equal(const char *a, const char *b);

/** Overwrites n bytes at p with zeros in a way the compiler cannot drop. */
void bg_crypto_wipe(void *p, size_t n);

/**
 * Encodes len bytes as unpadded base64url into out, NUL-terminated. Returns 0, or BG_ERR_TOO_LARGE
 * when out is too small (out is then "").
 */
BG_MUSTCHECK int bg_crypto_b64url_encode(const void *in, size_t len, char *out, size_t outlen);

/**
 * Decodes len bytes of unpadded base64url into out (at most outlen bytes) and sets *outn to the
 * bytes written. Strict: only the alphabet A-Z a-z 0-9 - _, no padding, no length of the form
 * 4k+1, and the unused low bits of the last character zero, so a value has one spelling (what
 * libsodium's decoder accepts, table-driven for speed: not constant-time, so not for secrets).
 * Returns 0, or BG_ERR_INVALID (malformed, or more than outlen bytes; *outn is then 0).
 */
BG_MUSTCHECK int bg_crypto_b64url_decode(const char *in, size_t len, void *out, size_t outlen,
                                         size_t *outn);

/**
 * Decodes unpadded base64url text (such as an opaque cursor) into out as a NUL-terminated string.
 * Returns 0, or BG_ERR_INVALID for an empty or malformed input, a decoded NUL byte, or more than
 * outlen - 1 decoded bytes. Only the canonical spelling of a value is accepted.
 */
BG_MUSTCHECK int bg_crypto_b64url_decode_str(const char *in, char *out, size_t outlen);

#endif
