/*
 * Access tokens: HS256 JWTs from a key ring, signed with libjwt 1.10 (v1 API) and verified here.
 *
 * libjwt trusts the token's header to choose the algorithm, which is the root of the classic JWT
 * attacks ("alg":"none", or an RS256 public key used as an HMAC secret). So verification never lets
 * anything choose: the token's shape is checked by hand (two dots, base64url only, a length cap),
 * the header is decoded and parsed here with tight limits, anything whose "alg" is not exactly
 * "HS256" is refused, and only then is the HMAC-SHA256 of "<header>.<payload>" computed, with the
 * one key the header's "kid" names, and compared in constant time with the signature (decoded
 * strictly, so each token has one valid spelling). The HMAC is libsodium's: libjwt's jwt_decode()
 * decodes and parses the token a second time (libb64, jansson, a dozen allocations) and has
 * OpenSSL 3 look the HMAC up on every call, which made it about 40 % of the edge's CPU for an
 * admitted chat turn (perf, bench/admission_http.sh). Tokens libjwt signs are verified here in
 * every test, so the two implementations are checked against each other.
 *
 * Claims are read from the payload once the signature holds, with our own parser rather than
 * libjwt's getters: jwt_get_grant_int() answers 0 for a string, a float or a missing claim alike,
 * and a token must be refused when exp is "tomorrow", not read as the epoch. Our parser also
 * refuses duplicate keys, so a payload cannot mean two things.
 *
 * The ring lives in memory from sodium_malloc(): guard pages around it, kept out of core dumps and
 * swap where the system allows, and made read-only once built. Being immutable it needs no lock;
 * signing builds its own libjwt object and verification keeps its state on the stack, so both are
 * safe from any number of threads.
 */
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jwt.h>
#include <sodium.h>

#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/id.h"
#include "bg/json.h"
#include "bg/jwt.h"

_Static_assert(sizeof(long) == sizeof(int64_t), "libjwt takes times as long");

#define MAX_KEYS 8
#define MIN_SECRET 32
#define MAX_SECRET 512
#define KID_MAX 31
/* An HMAC-SHA256 is 32 bytes: 43 characters of unpadded base64url. */
#define SIG_B64_LEN 43
/* Our headers are ~50 bytes; anything near this size is not one of ours. */
#define HEADER_B64_MAX 512
#define HEADER_MAX ((HEADER_B64_MAX / 4) * 3)
#define PAYLOAD_MAX ((BG_JWT_MAX_TOKEN / 4) * 3)

typedef struct ring_key {
    char kid[KID_MAX + 1];
    size_t len;
    unsigned char secret[MAX_SECRET];
} ring_key_t;

struct bg_jwt_ring {
    size_t n;
    uint64_t serial;           /**< unique per ring in the process (the verified-token cache's) */
    ring_key_t keys[MAX_KEYS]; /**< keys[0] signs */
};

static atomic_uint_fast64_t ring_serials;

/* sodium_malloc() places the block at the end of its pages, so its alignment is that of the size.
 */
#define RING_ALLOC_SIZE ((sizeof(bg_jwt_ring_t) + 15) & ~(size_t)15)

static const bg_json_limits_t header_limits = {
    .max_bytes = HEADER_MAX,
    .max_depth = 1,
    .max_string = 64,
    .max_members = 8,
    .max_values = 9,
};

static const bg_json_limits_t payload_limits = {
    .max_bytes = PAYLOAD_MAX,
    .max_depth = 2, /* aud may be an array of strings */
    .max_string = 256,
    .max_members = 32,
    .max_values = 64,
};

static bool is_b64url(char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_';
}

static bool is_kid_char(char c)
{
    return is_b64url(c) || c == '.';
}

static bool kid_is_valid(const char *s, size_t len)
{
    if (len == 0 || len > KID_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        if (!is_kid_char(s[i]))
            return false;
    }
    return true;
}

/* Writes a configuration error into err (which may be NULL or empty) and returns BG_ERR_CONFIG. */
static int config_error(char *err, size_t errlen, const char *fmt, ...) BG_PRINTF(3, 4);

static int config_error(char *err, size_t errlen, const char *fmt, ...)
{
    if (err != NULL && errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        (void)vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return BG_ERR_CONFIG;
}

/*
 * Adds key number `index` (1-based, for messages) to the ring. Messages name the entry by its
 * position only: when someone forgets the "kid:" part, what looks like a kid is the start of the
 * secret, so not even the kid may be echoed.
 */
static int add_key(bg_jwt_ring_t *ring, const char *what, size_t index, const char *kid,
                   size_t kid_len, const char *secret, size_t secret_len, char *err, size_t errlen)
{
    if (ring->n == MAX_KEYS)
        return config_error(err, errlen, "%s: more than %d keys", what, MAX_KEYS);
    if (!kid_is_valid(kid, kid_len))
        return config_error(err, errlen,
                            "%s entry %zu: the kid must be 1 to %d characters of [A-Za-z0-9._-]",
                            what, index, KID_MAX);
    if (secret_len < MIN_SECRET)
        return config_error(err, errlen, "%s entry %zu: the secret must be at least %d bytes", what,
                            index, MIN_SECRET);
    if (secret_len > MAX_SECRET)
        return config_error(err, errlen, "%s entry %zu: the secret must be at most %d bytes", what,
                            index, MAX_SECRET);
    for (size_t i = 0; i < ring->n; i++) {
        if (strlen(ring->keys[i].kid) == kid_len && memcmp(ring->keys[i].kid, kid, kid_len) == 0)
            return config_error(err, errlen, "%s entries %zu and %zu have the same kid", what,
                                i + 1, index);
    }
    ring_key_t *k = &ring->keys[ring->n++];
    memcpy(k->kid, kid, kid_len);
    k->kid[kid_len] = '\0';
    memcpy(k->secret, secret, secret_len);
    k->len = secret_len;
    return 0;
}

static int parse_keys(bg_jwt_ring_t *ring, const char *keys, char *err, size_t errlen)
{
    const char *p = keys;
    size_t index = 1;
    for (;;) {
        const char *end = strchr(p, ',');
        if (end == NULL)
            end = p + strlen(p);
        const char *colon = memchr(p, ':', (size_t)(end - p));
        if (colon == NULL)
            return config_error(err, errlen, "BG_JWT_KEYS entry %zu is not kid:secret", index);
        int rc = add_key(ring, "BG_JWT_KEYS", index, p, (size_t)(colon - p), colon + 1,
                         (size_t)(end - colon - 1), err, errlen);
        if (rc != 0)
            return rc;
        if (*end == '\0')
            return 0;
        p = end + 1;
        index++;
    }
}

int bg_jwt_ring_new(const char *keys, const char *secret, bg_jwt_ring_t **out, char *err,
                    size_t errlen)
{
    *out = NULL;
    if (err != NULL && errlen > 0)
        err[0] = '\0';
    if (!bg_str_present(keys) && !bg_str_present(secret))
        return config_error(err, errlen,
                            "no signing key: set BG_JWT_SECRET (at least %d bytes) or BG_JWT_KEYS",
                            MIN_SECRET);
    int rc = bg_crypto_init();
    if (rc != 0)
        return config_error(err, errlen, "libsodium could not be initialised");
    bg_jwt_ring_t *ring = sodium_malloc(RING_ALLOC_SIZE);
    if (ring == NULL)
        bg_oom(RING_ALLOC_SIZE);
    memset(ring, 0, RING_ALLOC_SIZE);
    if (bg_str_present(keys))
        rc = parse_keys(ring, keys, err, errlen);
    else
        rc =
            add_key(ring, "BG_JWT_SECRET", 1, BG_STRLIT("k0"), secret, strlen(secret), err, errlen);
    if (rc != 0) {
        bg_jwt_ring_free(ring);
        return rc;
    }
    ring->serial = atomic_fetch_add(&ring_serials, 1) + 1;
    /* From here on the ring is only read; a stray write faults instead of changing a key. */
    (void)sodium_mprotect_readonly(ring);
    *out = ring;
    return 0;
}

void bg_jwt_ring_free(bg_jwt_ring_t *ring)
{
    if (ring == NULL)
        return;
    /* sodium_free() wipes too; doing it here keeps the promise visible and independent of it. */
    (void)sodium_mprotect_readwrite(ring);
    sodium_memzero(ring, RING_ALLOC_SIZE);
    sodium_free(ring);
}

const char *bg_jwt_ring_signing_kid(const bg_jwt_ring_t *ring)
{
    return ring->keys[0].kid;
}

static const ring_key_t *find_key(const bg_jwt_ring_t *ring, const char *kid, size_t len)
{
    for (size_t i = 0; i < ring->n; i++) {
        const ring_key_t *k = &ring->keys[i];
        if (strlen(k->kid) == len && memcmp(k->kid, kid, len) == 0)
            return k;
    }
    return NULL;
}

/* A claim string we can hand back in a bg_jwt_claims_t field of size cap. */
static bool claim_str_fits(const char *s, size_t cap)
{
    if (s == NULL)
        return false;
    size_t n = strnlen(s, cap);
    return n > 0 && n < cap;
}

int bg_jwt_sign(const bg_jwt_ring_t *ring, const char *sub, const char *sid, const char *role,
                int64_t now_s, int64_t ttl_s, char *out, size_t outlen)
{
    const bg_jwt_claims_t *c = NULL;
    if (outlen > 0)
        out[0] = '\0';
    /* Refuse what verify would refuse, so that every token we hand out can be used. */
    if (!claim_str_fits(sub, sizeof(c->sub)) || !claim_str_fits(sid, sizeof(c->sid)) ||
        !claim_str_fits(role, sizeof(c->role)))
        return BG_ERR_INVALID;
    if (now_s < 0 || ttl_s <= 0 || ttl_s > INT64_MAX - now_s)
        return BG_ERR_INVALID;

    const ring_key_t *key = &ring->keys[0];
    char jti[BG_UUID_STR_LEN + 1];
    bg_id_uuid_v7_str(jti);

    jwt_t *jwt = NULL;
    int rc = jwt_new(&jwt);
    if (rc == 0)
        rc = jwt_set_alg(jwt, JWT_ALG_HS256, key->secret, (int)key->len);
    if (rc == 0)
        rc = jwt_add_header(jwt, "kid", key->kid);
    if (rc == 0)
        rc = jwt_add_header(jwt, "typ", "JWT");
    if (rc == 0)
        rc = jwt_add_grant(jwt, "iss", BG_JWT_ISSUER);
    if (rc == 0)
        rc = jwt_add_grant(jwt, "aud", BG_JWT_AUDIENCE);
    if (rc == 0)
        rc = jwt_add_grant(jwt, "sub", sub);
    if (rc == 0)
        rc = jwt_add_grant(jwt, "sid", sid);
    if (rc == 0)
        rc = jwt_add_grant(jwt, "role", role);
    if (rc == 0)
        rc = jwt_add_grant(jwt, "typ", "access");
    if (rc == 0)
        rc = jwt_add_grant(jwt, "jti", jti);
    if (rc == 0)
        rc = jwt_add_grant_int(jwt, "iat", (long)now_s);
    if (rc == 0)
        rc = jwt_add_grant_int(jwt, "nbf", (long)now_s);
    if (rc == 0)
        rc = jwt_add_grant_int(jwt, "exp", (long)(now_s + ttl_s));
    if (rc != 0) {
        /* Every argument was checked above, so only memory can have run out. */
        jwt_free(jwt);
        bg_oom(0);
    }
    char *token = jwt_encode_str(jwt);
    jwt_free(jwt);
    if (token == NULL)
        bg_oom(0);
    size_t len = strlen(token);
    int ret = 0;
    if (len >= outlen)
        ret = BG_ERR_TOO_LARGE;
    else
        memcpy(out, token, len + 1);
    /* The transient copy is a bearer credential too. */
    bg_crypto_wipe(token, len);
    free(token);
    return ret;
}

/* The three segments of a token; sig may be empty ("alg":"none" tokens end with a dot). */
typedef struct segments {
    const char *header, *payload, *sig;
    size_t header_len, payload_len, sig_len;
} segments_t;

static const char *split(const char *token, size_t len, segments_t *seg)
{
    size_t dots[2], ndots = 0;
    for (size_t i = 0; i < len; i++) {
        if (token[i] == '.') {
            if (ndots == 2)
                return "malformed";
            dots[ndots++] = i;
        } else if (!is_b64url(token[i])) {
            return "malformed";
        }
    }
    if (ndots != 2)
        return "malformed";
    seg->header = token;
    seg->header_len = dots[0];
    seg->payload = token + dots[0] + 1;
    seg->payload_len = dots[1] - dots[0] - 1;
    seg->sig = token + dots[1] + 1;
    seg->sig_len = len - dots[1] - 1;
    if (seg->header_len == 0 || seg->payload_len == 0)
        return "malformed";
    return NULL;
}

/*
 * Decodes unpadded base64url strictly (non-zero trailing bits are refused, so each value has one
 * encoding) and parses the JSON inside under limits. Returns the document (owned) or NULL.
 */
static bg_json_doc_t *decode_json(const char *b64, size_t len, char *scratch, size_t scratch_len,
                                  const bg_json_limits_t *limits)
{
    size_t n = 0;
    if (bg_crypto_b64url_decode(b64, len, scratch, scratch_len, &n) != 0)
        return NULL;
    bg_json_doc_t *doc = NULL;
    const char *desc = NULL;
    if (bg_json_parse(scratch, n, limits, &doc, &desc, NULL) != 0)
        return NULL;
    if (!bg_json_is_object(bg_json_root(doc))) {
        bg_json_doc_free(doc);
        return NULL;
    }
    return doc;
}

/*
 * A header asks for nothing beyond what we do: no "crit" extensions (RFC 7515 §4.1.11: the
 * recipient must understand them, and we understand none), and a "typ", when present, of "JWT".
 */
static bool header_is_plain(const bg_json_t *h)
{
    const char *typ = NULL;
    if (bg_json_find(h, "crit") != NULL)
        return false;
    if (bg_json_find(h, "typ") == NULL)
        return true;
    return bg_json_get_str(h, "typ", &typ) == 0 && strcmp(typ, "JWT") == 0;
}

/* Checks the header before anything else looks at the token, and picks the key it names. */
static const char *check_header(const bg_jwt_ring_t *ring, const segments_t *seg,
                                const ring_key_t **key, char kid_out[KID_MAX + 1])
{
    char scratch[HEADER_MAX];
    if (seg->header_len > HEADER_B64_MAX)
        return "malformed";
    bg_json_doc_t *doc =
        decode_json(seg->header, seg->header_len, scratch, sizeof(scratch), &header_limits);
    if (doc == NULL)
        return "malformed";
    const bg_json_t *h = bg_json_root(doc);
    const char *why = NULL;
    const char *alg = NULL, *kid = NULL;
    size_t kid_len = 0;
    if (bg_json_get_str(h, "alg", &alg) != 0 || strcmp(alg, "HS256") != 0) {
        why = "alg";
    } else if (!header_is_plain(h)) {
        why = "malformed";
    } else if (bg_json_get_strn(h, "kid", &kid, &kid_len) != 0 || !kid_is_valid(kid, kid_len)) {
        why = "kid";
    } else {
        *key = find_key(ring, kid, kid_len);
        if (*key == NULL)
            why = "kid";
        else
            memcpy(kid_out, kid, kid_len + 1);
    }
    bg_json_doc_free(doc);
    return why;
}

/*
 * Checks the signature: the HMAC-SHA256 of "<header>.<payload>" (the token up to its second dot)
 * with the key the header named, against the signature decoded strictly from base64url, compared
 * in constant time.
 */
static const char *check_signature(const ring_key_t *key, const char *token, const segments_t *seg)
{
    unsigned char sig[crypto_auth_hmacsha256_BYTES], mac[crypto_auth_hmacsha256_BYTES];
    size_t n = 0;
    if (seg->sig_len != SIG_B64_LEN ||
        bg_crypto_b64url_decode(seg->sig, seg->sig_len, sig, sizeof(sig), &n) != 0 ||
        n != sizeof(sig))
        return "signature";
    crypto_auth_hmacsha256_state st;
    (void)crypto_auth_hmacsha256_init(&st, key->secret, key->len);
    (void)crypto_auth_hmacsha256_update(&st, (const unsigned char *)token,
                                        seg->header_len + 1 + seg->payload_len);
    (void)crypto_auth_hmacsha256_final(&st, mac);
    sodium_memzero(&st, sizeof(st)); /* it holds the key's pads */
    return sodium_memcmp(mac, sig, sizeof(mac)) == 0 ? NULL : "signature";
}

static bool copy_claim(const bg_json_t *obj, const char *name, char *dst, size_t cap)
{
    const char *s = NULL;
    size_t n = 0;
    if (bg_json_get_strn(obj, name, &s, &n) != 0 || n == 0 || n >= cap)
        return false;
    memcpy(dst, s, n + 1);
    return true;
}

/* aud is a string or, per RFC 7519 §4.1.3, an array of strings; returns -1 when it is neither. */
static int has_audience(const bg_json_t *obj)
{
    const bg_json_t *aud = bg_json_find(obj, "aud");
    const char *s = NULL;
    if (bg_json_get_str(obj, "aud", &s) == 0)
        return strcmp(s, BG_JWT_AUDIENCE) == 0;
    if (!bg_json_is_array(aud) || bg_json_len(aud) == 0)
        return -1;
    int found = 0;
    for (size_t i = 0; i < bg_json_len(aud); i++) {
        s = bg_json_str(bg_json_at(aud, i), NULL);
        if (s == NULL)
            return -1;
        if (strcmp(s, BG_JWT_AUDIENCE) == 0)
            found = 1;
    }
    return found;
}

/* The claims' times against now, with the leeway for clock skew. */
static const char *check_times(const bg_jwt_claims_t *claims, int64_t now_s)
{
    /* Written as now - leeway so that a huge exp cannot overflow the sum. */
    if (now_s - BG_JWT_LEEWAY_S >= claims->exp)
        return "expired";
    if (now_s + BG_JWT_LEEWAY_S < claims->nbf || now_s + BG_JWT_LEEWAY_S < claims->iat)
        return "not_yet_valid";
    return NULL;
}

static const char *check_claims(const bg_json_t *p, int64_t now_s, bg_jwt_claims_t *claims)
{
    const char *iss = NULL, *typ = NULL;
    if (bg_json_get_str(p, "iss", &iss) != 0 || bg_json_get_str(p, "typ", &typ) != 0)
        return "claims";
    int aud = has_audience(p);
    if (aud < 0)
        return "claims";
    if (bg_json_get_int(p, "iat", &claims->iat) != 0 ||
        bg_json_get_int(p, "nbf", &claims->nbf) != 0 ||
        bg_json_get_int(p, "exp", &claims->exp) != 0)
        return "claims";
    if (!copy_claim(p, "sub", claims->sub, sizeof(claims->sub)) ||
        !copy_claim(p, "sid", claims->sid, sizeof(claims->sid)) ||
        !copy_claim(p, "role", claims->role, sizeof(claims->role)) ||
        !copy_claim(p, "jti", claims->jti, sizeof(claims->jti)))
        return "claims";
    if (strcmp(iss, BG_JWT_ISSUER) != 0)
        return "issuer";
    if (aud == 0)
        return "audience";
    /* A refresh or ID token signed with the same key must not pass as an access token. */
    if (strcmp(typ, "access") != 0)
        return "type";
    return check_times(claims, now_s);
}

static const char *verify(const bg_jwt_ring_t *ring, const char *token, size_t len, int64_t now_s,
                          bg_jwt_claims_t *claims)
{
    if (token == NULL || len == 0)
        return "malformed";
    if (len > BG_JWT_MAX_TOKEN)
        return "too_long";
    segments_t seg;
    const char *why = split(token, len, &seg);
    if (why != NULL)
        return why;
    const ring_key_t *key = NULL;
    why = check_header(ring, &seg, &key, claims->kid);
    if (why != NULL)
        return why;
    why = check_signature(key, token, &seg);
    if (why != NULL)
        return why;
    char scratch[PAYLOAD_MAX];
    bg_json_doc_t *doc =
        decode_json(seg.payload, seg.payload_len, scratch, sizeof(scratch), &payload_limits);
    if (doc == NULL) {
        /* signed with our key, yet not a JSON object our parser takes: refused */
        why = "claims";
    } else {
        why = check_claims(bg_json_root(doc), now_s, claims);
        bg_json_doc_free(doc);
    }
    return why;
}

/*
 * Each thread's cache of the tokens it verified. A client sends the same access token with every
 * request for the token's whole life (minutes), and verifying it again (two base64 decodes, two
 * JSON parses, the HMAC) was a quarter of the edge's CPU for an admitted chat turn. An entry holds
 * the token's exact bytes, the serial of the ring that verified it (not its address, which a new
 * ring may reuse) and its claims; a hit needs the whole token to be equal and checks its times
 * again, so it accepts exactly what a full verification would. Only tokens that passed are kept,
 * and only short ones (ours are about 400 bytes). Revocation is not a property of the token: the
 * edge checks the session in Redis on every request, cached or not.
 */
#define CACHE_SLOTS 64
#define CACHE_TOKEN_MAX 1024

typedef struct cache_entry {
    uint64_t serial; /**< 0: empty */
    size_t len;
    char token[CACHE_TOKEN_MAX];
    bg_jwt_claims_t claims;
} cache_entry_t;

static pthread_key_t cache_key;
static pthread_once_t cache_once = PTHREAD_ONCE_INIT;
static bool cache_ok;

/* At a thread's exit: its cache holds bearer tokens, wiped before the memory goes back. */
static void cache_free(void *p)
{
    sodium_memzero(p, CACHE_SLOTS * sizeof(cache_entry_t));
    free(p);
}

static void cache_init(void)
{
    cache_ok = pthread_key_create(&cache_key, cache_free) == 0;
}

/* The calling thread's slot for token (NULL when the cache cannot be had). */
static cache_entry_t *cache_slot(const char *token, size_t len)
{
    (void)pthread_once(&cache_once, cache_init);
    if (!cache_ok)
        return NULL;
    cache_entry_t *c = pthread_getspecific(cache_key);
    if (c == NULL) {
        c = bg_calloc(CACHE_SLOTS, sizeof(*c));
        if (pthread_setspecific(cache_key, c) != 0) {
            free(c);
            return NULL;
        }
    }
    /* the signature's last characters are an HMAC's: as good a hash as any (FNV-1a over 16) */
    uint32_t h = 2166136261u;
    for (size_t i = len > 16 ? len - 16 : 0; i < len; i++)
        h = (h ^ (unsigned char)token[i]) * 16777619u;
    return &c[h % CACHE_SLOTS];
}

int bg_jwt_verify(const bg_jwt_ring_t *ring, const char *token, size_t len, int64_t now_s,
                  bg_jwt_claims_t *claims, const char **why)
{
    memset(claims, 0, sizeof(*claims));
    cache_entry_t *slot =
        token != NULL && len > 0 && len <= CACHE_TOKEN_MAX ? cache_slot(token, len) : NULL;
    const char *reason = NULL;
    if (slot != NULL && slot->serial == ring->serial && slot->len == len &&
        memcmp(slot->token, token, len) == 0) {
        *claims = slot->claims;
        reason = check_times(claims, now_s);
    } else {
        reason = verify(ring, token, len, now_s, claims);
        if (reason == NULL && slot != NULL) {
            slot->serial = ring->serial;
            slot->len = len;
            memcpy(slot->token, token, len);
            slot->claims = *claims;
        }
    }
    if (why != NULL)
        *why = reason;
    if (reason != NULL) {
        /* No half-filled claims for a caller that forgets to check the result. */
        memset(claims, 0, sizeof(*claims));
        return BG_ERR_DENIED;
    }
    return 0;
}
