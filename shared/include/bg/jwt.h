/*
 * Access tokens: JWT (RFC 7519) signed with HMAC-SHA256 from a key ring, on libjwt 1.10 (v1 API).
 *
 * The algorithm is pinned: a token whose header names anything but HS256 (including "none") is
 * refused before its signature is looked at, and the key is chosen by the header's "kid" from the
 * ring, never by the token's algorithm. The first key of the ring signs; every key verifies, so
 * keys rotate by prepending a new one and dropping the old one after the access-token lifetime.
 *
 * Claims of an access token: iss, aud, sub (user id), sid (session id), role (platform role), typ
 * ("access"), iat, nbf, exp, jti. Verification checks all of them against the ring's issuer and
 * audience and the given clock, with a small leeway for clock skew.
 */
#ifndef BG_JWT_H
#define BG_JWT_H

#include "bg/common.h"

#define BG_JWT_MAX_TOKEN 4096 /**< longer tokens are refused unparsed */
#define BG_JWT_LEEWAY_S 30    /**< clock skew allowed on exp, nbf and iat */
#define BG_JWT_ISSUER "bot-generic"
#define BG_JWT_AUDIENCE "bot-generic-api"

typedef struct bg_jwt_ring bg_jwt_ring_t;

/** What an access token says. Strings are NUL-terminated copies. */
typedef struct bg_jwt_claims {
    char sub[64];  /**< user id */
    char sid[64];  /**< session (refresh-token family) id */
    char role[16]; /**< "user" or "admin" */
    char jti[64];
    char kid[32];          /**< key that signed it (filled by verify) */
    int64_t iat, nbf, exp; /**< seconds since the epoch */
} bg_jwt_claims_t;

/**
 * Builds a key ring from BG_JWT_KEYS ("kid:secret,kid:secret", the first signs) or, when keys is
 * NULL or empty, from BG_JWT_SECRET (kid "k0"). Secrets must be at least 32 bytes; kids are 1–31
 * chars of [A-Za-z0-9._-] and unique. Returns 0 with *out owned by the caller, or BG_ERR_CONFIG
 * with err naming the problem (never a secret).
 */
BG_MUSTCHECK int bg_jwt_ring_new(const char *keys, const char *secret, bg_jwt_ring_t **out,
                                 char *err, size_t errlen);
/** Frees a ring (secrets wiped); accepts NULL. */
void bg_jwt_ring_free(bg_jwt_ring_t *ring);
/** The kid of the signing key. */
const char *bg_jwt_ring_signing_kid(const bg_jwt_ring_t *ring);

/**
 * Signs an access token for sub/sid/role valid for ttl_s seconds from now_s (iat = nbf = now_s,
 * exp = now_s + ttl_s, fresh jti). Writes it NUL-terminated into out. Returns 0, BG_ERR_TOO_LARGE
 * (out too small) or BG_ERR_INVALID.
 */
BG_MUSTCHECK int bg_jwt_sign(const bg_jwt_ring_t *ring, const char *sub, const char *sid,
                             const char *role, int64_t now_s, int64_t ttl_s, char *out,
                             size_t outlen);

/**
 * Verifies an access token at time now_s. Returns 0 and fills *claims, or BG_ERR_DENIED with *why
 * set to a static reason for logs and tests: "malformed", "too_long", "alg" (not HS256, e.g. none),
 * "kid" (missing or unknown), "signature", "issuer", "audience", "type", "expired",
 * "not_yet_valid", "claims" (a required claim missing or of the wrong type). Never logs the token.
 * Each thread remembers the last tokens it verified (64, by their exact bytes and the ring), so a
 * client's repeated requests cost a comparison and the check of the times; the answer is the same.
 */
BG_MUSTCHECK int bg_jwt_verify(const bg_jwt_ring_t *ring, const char *token, size_t len,
                               int64_t now_s, bg_jwt_claims_t *claims, const char **why);

#endif
