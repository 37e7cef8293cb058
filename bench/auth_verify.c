/*
 * auth_verify: the cost of authenticating a request.
 *
 * Every API request verifies an access token on an edge event loop, so its cost bounds the edge's
 * request rate; logins hash and check a password on the thread pool, where argon2id's few tens of
 * milliseconds decide how many logins a core can take. This program signs 1,000 tokens (as many
 * users) and verifies them in turn N times (first argument, default 200000; a thread keeps the
 * last 64 tokens it verified, so these are full verifications), then verifies one token N times
 * (a client's repeated requests, which the thread's cache answers), then hashes and checks a
 * password 20 times each, and prints two lines:
 *
 *   auth_verify us_per_verify=<x> verifies_per_s=<y> us_per_verify_cached=<z>
 *   auth_password hash_ms_p50=<a> verify_ms_p50=<b> verify_ms_p99=<c>
 *
 * Percentiles are nearest-rank over the 20 samples. Exits non-zero when anything fails, so a
 * broken build cannot pass for a fast one.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/jwt.h"
#include "bg/timeutil.h"

#define DEFAULT_VERIFIES 200000
#define PASSWORD_ROUNDS 20
#define BENCH_KEYS "bench:bench-secret-0123456789abcdefghijklmnopqrstuvwxyz"

static int parse_count(const char *s, long *out)
{
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v <= 0)
        return BG_ERR_INVALID;
    *out = v;
    return 0;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile p (0..100) of n sorted samples. */
static double percentile(const double *sorted, size_t n, int p)
{
    size_t rank = ((size_t)p * n + 99) / 100;
    return sorted[rank == 0 ? 0 : rank - 1];
}

#define TOKENS 1000

/* Verifies n tokens from tokens[0..count) in turn; returns the failures and sets *us per call. */
static long verify_all(const bg_jwt_ring_t *ring, char (*tokens)[BG_JWT_MAX_TOKEN], size_t count,
                       long n, int64_t now, double *us)
{
    long failures = 0;
    uint64_t start = bg_timeutil_mono_us();
    for (long i = 0; i < n; i++) {
        const char *t = tokens[(size_t)i % count];
        bg_jwt_claims_t claims;
        const char *why = NULL;
        if (bg_jwt_verify(ring, t, strlen(t), now, &claims, &why) != 0)
            failures++;
    }
    *us = (double)(bg_timeutil_mono_us() - start) / (double)n;
    return failures;
}

static int bench_verify(long n)
{
    bg_jwt_ring_t *ring = NULL;
    char err[256];
    if (bg_jwt_ring_new(BENCH_KEYS, NULL, &ring, err, sizeof(err)) != 0) {
        fprintf(stderr, "auth_verify: %s\n", err);
        return 1;
    }
    int64_t now = bg_timeutil_wall_ms() / 1000;
    static char tokens[TOKENS][BG_JWT_MAX_TOKEN];
    for (int i = 0; i < TOKENS; i++) {
        char sub[64];
        snprintf(sub, sizeof(sub), "0190f5c2-7c1e-7a3b-9d4e-%012d", i);
        int rc = bg_jwt_sign(ring, sub, "0190f5c2-7c1e-7a3b-9d4e-000000000002", "user", now, 900,
                             tokens[i], sizeof(tokens[i]));
        if (rc != 0) {
            fprintf(stderr, "auth_verify: sign failed: %s\n", bg_strerror(rc));
            bg_jwt_ring_free(ring);
            return 1;
        }
    }
    double us = 0, cached_us = 0;
    long failures = verify_all(ring, tokens, TOKENS, n, now, &us);
    failures += verify_all(ring, tokens, 1, n, now, &cached_us);
    bg_jwt_ring_free(ring);
    if (failures != 0) {
        fprintf(stderr, "auth_verify: %ld of %ld verifications failed\n", failures, 2 * n);
        return 1;
    }
    printf("auth_verify us_per_verify=%.3f verifies_per_s=%.0f us_per_verify_cached=%.3f\n", us,
           us > 0 ? 1e6 / us : 0.0, cached_us);
    return 0;
}

static int bench_password(void)
{
    const char *password = "correct horse battery staple";
    double hash_ms[PASSWORD_ROUNDS], verify_ms[PASSWORD_ROUNDS];
    char hash[BG_CRYPTO_PWHASH_LEN];
    for (int i = 0; i < PASSWORD_ROUNDS; i++) {
        uint64_t t0 = bg_timeutil_mono_us();
        int rc = bg_crypto_password_hash(password, hash, sizeof(hash));
        uint64_t t1 = bg_timeutil_mono_us();
        if (rc == 0)
            rc = bg_crypto_password_verify(hash, password);
        uint64_t t2 = bg_timeutil_mono_us();
        if (rc != 0) {
            fprintf(stderr, "auth_password: round %d failed: %s\n", i, bg_strerror(rc));
            return 1;
        }
        hash_ms[i] = (double)(t1 - t0) / 1000.0;
        verify_ms[i] = (double)(t2 - t1) / 1000.0;
    }
    qsort(hash_ms, PASSWORD_ROUNDS, sizeof(hash_ms[0]), cmp_double);
    qsort(verify_ms, PASSWORD_ROUNDS, sizeof(verify_ms[0]), cmp_double);
    printf("auth_password hash_ms_p50=%.2f verify_ms_p50=%.2f verify_ms_p99=%.2f\n",
           percentile(hash_ms, PASSWORD_ROUNDS, 50), percentile(verify_ms, PASSWORD_ROUNDS, 50),
           percentile(verify_ms, PASSWORD_ROUNDS, 99));
    return 0;
}

int main(int argc, char **argv)
{
    long n = DEFAULT_VERIFIES;
    if (argc > 2 || (argc == 2 && parse_count(argv[1], &n) != 0)) {
        fprintf(stderr, "usage: %s [verifications (default %d)]\n", argv[0], DEFAULT_VERIFIES);
        return 2;
    }
    if (bg_crypto_init() != 0) {
        fprintf(stderr, "auth_verify: libsodium could not be initialised\n");
        return 1;
    }
    if (bench_verify(n) != 0)
        return 1;
    (void)fflush(stdout);
    return bench_password();
}
