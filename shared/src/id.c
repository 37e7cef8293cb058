/*
 * UUIDv7 and request ids.
 *
 * Monotonicity needs shared state (the last millisecond used and the counter), kept under one
 * mutex: the critical section is a compare and an increment, far shorter than the random-number
 * call made outside it. When the wall clock steps back, ids keep the last millisecond and count on,
 * so order survives NTP corrections; when the 42-bit counter runs out within one millisecond (4
 * trillion ids), the timestamp moves one millisecond ahead of the clock, as RFC 9562 §6.2 allows.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <sodium.h>

#include "bg/err.h"
#include "bg/id.h"
#include "bg/log.h"

#define COUNTER_BITS 42
#define COUNTER_MAX ((UINT64_C(1) << COUNTER_BITS) - 1)
/* A fresh counter starts in the lower half, leaving at least 2^41 increments in its millisecond. */
#define COUNTER_SEED_MASK ((UINT64_C(1) << (COUNTER_BITS - 1)) - 1)

static pthread_once_t sodium_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t v7_lock = PTHREAD_MUTEX_INITIALIZER;
static int64_t v7_last_ms = -1;
static uint64_t v7_counter;

static void init_sodium(void)
{
    if (sodium_init() < 0) {
        bg_error("libsodium failed to initialise: no secure random source");
        abort();
    }
}

static void random_bytes(void *p, size_t n)
{
    pthread_once(&sodium_once, init_sodium);
    randombytes_buf(p, n);
}

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void bg_id_uuid_v7(bg_uuid_t *out)
{
    /* One draw outside the lock: 4 bytes for the tail, 8 for a counter seed used only when a new
     * millisecond starts. */
    uint8_t rnd[12];
    random_bytes(rnd, sizeof(rnd));
    uint64_t seed;
    memcpy(&seed, rnd + 4, sizeof(seed));
    seed &= COUNTER_SEED_MASK;
    int64_t now = wall_ms();

    pthread_mutex_lock(&v7_lock);
    if (now > v7_last_ms) {
        v7_last_ms = now;
        v7_counter = seed;
    } else if (v7_counter < COUNTER_MAX) {
        v7_counter++;
    } else {
        v7_last_ms++;
        v7_counter = seed;
    }
    uint64_t ms = (uint64_t)v7_last_ms;
    uint64_t ctr = v7_counter;
    pthread_mutex_unlock(&v7_lock);

    uint8_t *b = out->b;
    for (int i = 0; i < 6; i++)
        b[i] = (uint8_t)(ms >> (40 - 8 * i));
    b[6] = (uint8_t)(0x70 | ((ctr >> 38) & 0x0f));
    b[7] = (uint8_t)(ctr >> 30);
    b[8] = (uint8_t)(0x80 | ((ctr >> 24) & 0x3f));
    b[9] = (uint8_t)(ctr >> 16);
    b[10] = (uint8_t)(ctr >> 8);
    b[11] = (uint8_t)ctr;
    memcpy(b + 12, rnd, 4);
}

void bg_id_uuid_format(const bg_uuid_t *u, char out[BG_UUID_STR_LEN + 1])
{
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    for (size_t i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            out[o++] = '-';
        out[o++] = hex[u->b[i] >> 4];
        out[o++] = hex[u->b[i] & 0xf];
    }
    out[o] = '\0';
}

void bg_id_uuid_v7_str(char out[BG_UUID_STR_LEN + 1])
{
    bg_uuid_t u = {{0}};
    bg_id_uuid_v7(&u);
    bg_id_uuid_format(&u, out);
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int bg_id_uuid_parse(const char *s, size_t len, bg_uuid_t *out)
{
    bg_uuid_t u;
    size_t n = 0;
    if (s == NULL || len != BG_UUID_STR_LEN)
        return BG_ERR_INVALID;
    for (size_t i = 0; i < len;) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (s[i] != '-')
                return BG_ERR_INVALID;
            i++;
            continue;
        }
        int hi = hex_value(s[i]);
        int lo = hex_value(s[i + 1]);
        if (hi < 0 || lo < 0)
            return BG_ERR_INVALID;
        u.b[n++] = (uint8_t)(hi << 4 | lo);
        i += 2;
    }
    if (out != NULL)
        *out = u;
    return 0;
}

bool bg_id_uuid_is_valid(const char *s)
{
    return s != NULL && bg_id_uuid_parse(s, strnlen(s, BG_UUID_STR_LEN + 1), NULL) == 0;
}

int bg_id_uuid_version(const bg_uuid_t *u)
{
    return u->b[6] >> 4;
}

int64_t bg_id_uuid_v7_ms(const bg_uuid_t *u)
{
    uint64_t ms = 0;
    for (int i = 0; i < 6; i++)
        ms = ms << 8 | u->b[i];
    return (int64_t)ms;
}

void bg_id_request(char out[BG_REQUEST_ID_LEN + 1])
{
    static const char alphabet[] = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    uint8_t rnd[10];
    random_bytes(rnd, sizeof(rnd));
    unsigned __int128 v = (uint64_t)wall_ms() & ((UINT64_C(1) << 48) - 1);
    for (size_t i = 0; i < sizeof(rnd); i++)
        v = v << 8 | rnd[i];
    /* 128 bits in 26 digits of 5 bits: the first digit carries the top 3 bits. */
    for (int i = BG_REQUEST_ID_LEN - 1; i >= 0; i--) {
        out[i] = alphabet[(unsigned)(v & 0x1f)];
        v >>= 5;
    }
    out[BG_REQUEST_ID_LEN] = '\0';
}

bool bg_id_request_is_valid(const char *s)
{
    if (s == NULL)
        return false;
    size_t n = 0;
    for (; s[n] != '\0'; n++) {
        char c = s[n];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '.' || c == '_' || c == '-';
        if (!ok || n >= 64)
            return false;
    }
    return n > 0;
}
