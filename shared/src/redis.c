/*
 * Blocking Redis client, shard function and key names. See bg/redis.h for the contract.
 *
 * Design: the client keeps at most one hiredis context. Any transport failure (EOF, reset, a read
 * that outlived the deadline) frees the context, because hiredis gives no way to resynchronise a
 * connection whose reply is still in flight: a late reply would be read as the answer to the next
 * command. Reconnecting is lazy, on the next call: the first attempt after a working connection
 * broke is immediate (a restarted server is back at once), consecutive failed attempts are spaced
 * by an exponential backoff with jitter, and calls inside the backoff fail at once. Nothing here
 * sleeps, so a caller never blocks longer than one connect or one command deadline.
 *
 * The shard hash is FNV-1a (32 bit): short, stable across platforms and releases, and simple to
 * reimplement in another language (a test pins its values). Changing it would move every user to
 * another shard, which needs a migration of Redis state.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bg/err.h"
#include "bg/log.h"
#include "bg/redis.h"
#include "bg/resource.h"

#define BACKOFF_BASE_MS 100
#define BACKOFF_CAP_MS 5000

struct bg_redis {
    bg_redis_url_t url;
    int64_t timeout_ms;
    redisContext *c;         /* owned; NULL while disconnected */
    unsigned failures;       /* consecutive failed connection attempts */
    int64_t next_attempt_ms; /* no connection attempt before this (monotonic) */
    char desc[160];          /* host:port/db, for log lines */
};

int64_t bg__redis_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* xorshift64*, one state per thread: jitter needs no quality, only independence between workers. */
static uint64_t jitter_next(void)
{
    static _Thread_local uint64_t state;
    if (state == 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        state = ((uint64_t)ts.tv_nsec << 20) ^ (uint64_t)ts.tv_sec ^ ((uint64_t)getpid() << 40) ^
                (uint64_t)(uintptr_t)&state;
        if (state == 0)
            state = 0x9E3779B97F4A7C15ull;
    }
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return state * 0x2545F4914F6CDD1Dull;
}

int64_t bg__redis_backoff_ms(unsigned attempt, int64_t base_ms, int64_t cap_ms)
{
    int64_t delay = base_ms;
    for (unsigned i = 0; i < attempt && delay < cap_ms; i++)
        delay *= 2;
    if (delay > cap_ms)
        delay = cap_ms;
    int64_t half = delay / 2;
    return half + (int64_t)(jitter_next() % (uint64_t)(delay - half + 1));
}

/* ---- URL ---- */

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Returns an owned, percent-decoded copy of s[0..n), or NULL when an escape is malformed. */
static char *pct_decode(const char *s, size_t n)
{
    char *out = bg_malloc(n + 1);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '%') {
            int hi = i + 1 < n ? hexval(s[i + 1]) : -1;
            int lo = i + 2 < n ? hexval(s[i + 2]) : -1;
            /* %00 would cut the C string short: refuse it rather than authenticate with less */
            if (hi < 0 || lo < 0 || (hi == 0 && lo == 0)) {
                free(out);
                return NULL;
            }
            out[k++] = (char)(hi * 16 + lo);
            i += 2;
        } else {
            out[k++] = s[i];
        }
    }
    out[k] = '\0';
    return out;
}

/* Parses a decimal number of at most 9 digits within [min, max]; returns 0 or BG_ERR_INVALID. */
static int parse_uint(const char *s, size_t n, long min, long max, long *out)
{
    if (n == 0 || n > 9)
        return BG_ERR_INVALID;
    long v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return BG_ERR_INVALID;
        v = v * 10 + (s[i] - '0');
    }
    if (v < min || v > max)
        return BG_ERR_INVALID;
    *out = v;
    return 0;
}

int bg_redis_url_parse(const char *url, bg_redis_url_t *out)
{
    static const char scheme[] = "redis://";
    memset(out, 0, sizeof(*out));
    if (url == NULL || strncmp(url, scheme, sizeof(scheme) - 1) != 0)
        return BG_ERR_INVALID;
    const char *auth = url + sizeof(scheme) - 1;
    size_t alen = strcspn(auth, "/?#");
    const char *rest = auth + alen;
    long port = 6379, db = 0;

    /* userinfo: the last '@' separates it, since a password may contain '@' percent-encoded only */
    const char *at = NULL;
    for (const char *p = auth; p < auth + alen; p++) {
        if (*p == '@')
            at = p;
    }
    const char *host = auth;
    if (at != NULL) {
        const char *colon = memchr(auth, ':', (size_t)(at - auth));
        if (colon != NULL) {
            if (colon > auth) {
                out->user = pct_decode(auth, (size_t)(colon - auth));
                if (out->user == NULL)
                    goto err_free;
            }
            out->password = pct_decode(colon + 1, (size_t)(at - colon - 1));
        } else {
            /* "redis://secret@host": a bare userinfo is the password (Redis before ACL users) */
            out->password = pct_decode(auth, (size_t)(at - auth));
        }
        if (out->password == NULL)
            goto err_free;
        if (out->password[0] == '\0') {
            free(out->password);
            out->password = NULL;
        }
        host = at + 1;
    }
    const char *hend = auth + alen;
    const char *portp = NULL;
    if (*host == '[') {
        const char *close = memchr(host, ']', (size_t)(hend - host));
        if (close == NULL || close == host + 1)
            goto err_free;
        out->host = bg_strndup(host + 1, (size_t)(close - host - 1));
        if (close + 1 < hend) {
            if (close[1] != ':')
                goto err_free;
            portp = close + 2;
        }
    } else {
        const char *colon = memchr(host, ':', (size_t)(hend - host));
        const char *e = colon != NULL ? colon : hend;
        if (e == host)
            goto err_free;
        out->host = bg_strndup(host, (size_t)(e - host));
        if (colon != NULL)
            portp = colon + 1;
    }
    if (portp != NULL && parse_uint(portp, (size_t)(hend - portp), 1, 65535, &port) != 0)
        goto err_free;
    if (*rest == '/') {
        size_t dlen = strcspn(rest + 1, "?#");
        if (dlen > 0 && parse_uint(rest + 1, dlen, 0, 1000000, &db) != 0)
            goto err_free;
        rest += 1 + dlen;
    }
    if (*rest != '\0')
        goto err_free; /* query strings and fragments carry nothing this client understands */
    out->port = (int)port;
    out->db = (int)db;
    return 0;

err_free:
    bg_redis_url_dispose(out);
    return BG_ERR_INVALID;
}

void bg_redis_url_dispose(bg_redis_url_t *u)
{
    if (u->password != NULL) {
        /* volatile stores so the wipe of a secret is not optimised away before free */
        volatile char *p = u->password;
        while (*p != '\0')
            *p++ = '\0';
    }
    free(u->host);
    free(u->user);
    free(u->password);
    memset(u, 0, sizeof(*u));
}

/* ---- scripts ---- */

const bg_resource_t *bg__redis_script_find(const char *name, char sha[41])
{
    const bg_resource_t *res = bg_resource_find(name);
    sha[0] = '\0';
    if (res == NULL)
        return NULL;
    /* hashed by the build (scripts/embed.cmake): hashing admit.lua's 16 KB on every call was a
     * quarter of the edge's CPU for an admitted request */
    memcpy(sha, res->sha1, 41);
    return res;
}

/* Writes v in decimal at p; returns the end. */
static char *put_uint(char *p, size_t v)
{
    char tmp[24];
    size_t n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v > 0);
    while (n > 0)
        *p++ = tmp[--n];
    return p;
}

static size_t uint_digits(size_t v)
{
    size_t n = 1;
    while (v >= 10) {
        v /= 10;
        n++;
    }
    return n;
}

long bg__redis_format(char **out, int argc, const char *const *argv, const size_t *lens)
{
    *out = NULL;
    if (argc < 1 || argv == NULL)
        return -1;
    /* "*<argc>\r\n", then "$<len>\r\n<bytes>\r\n" per argument */
    size_t total = 1 + uint_digits((size_t)argc) + 2;
    for (int i = 0; i < argc; i++) {
        size_t len = lens != NULL ? lens[i] : strlen(argv[i]);
        total += 1 + uint_digits(len) + 2 + len + 2;
    }
    char *buf = bg_malloc(total + 1);
    char *p = buf;
    *p++ = '*';
    p = put_uint(p, (size_t)argc);
    *p++ = '\r';
    *p++ = '\n';
    for (int i = 0; i < argc; i++) {
        size_t len = lens != NULL ? lens[i] : strlen(argv[i]);
        *p++ = '$';
        p = put_uint(p, len);
        *p++ = '\r';
        *p++ = '\n';
        if (len > 0)
            memcpy(p, argv[i], len);
        p += len;
        *p++ = '\r';
        *p++ = '\n';
    }
    *p = '\0';
    *out = buf;
    return (long)total;
}

/* ---- client ---- */

int bg_redis_new(const char *url, int64_t timeout_ms, bg_redis_t **out)
{
    *out = NULL;
    if (timeout_ms <= 0)
        return BG_ERR_INVALID;
    bg_redis_t *r = bg_calloc(1, sizeof(*r));
    if (bg_redis_url_parse(url, &r->url) != 0) {
        free(r);
        return BG_ERR_INVALID;
    }
    r->timeout_ms = timeout_ms;
    snprintf(r->desc, sizeof(r->desc), "%s:%d/%d", r->url.host, r->url.port, r->url.db);
    *out = r;
    return 0;
}

static void drop(bg_redis_t *r)
{
    if (r->c != NULL) {
        redisFree(r->c);
        r->c = NULL;
    }
}

void bg_redis_free(bg_redis_t *r)
{
    if (r == NULL)
        return;
    drop(r);
    bg_redis_url_dispose(&r->url);
    free(r);
}

bool bg_redis_is_connected(const bg_redis_t *r)
{
    return r->c != NULL;
}

int64_t bg_redis_retry_in_ms(const bg_redis_t *r)
{
    if (r->c != NULL)
        return 0;
    int64_t left = r->next_attempt_ms - bg__redis_now_ms();
    return left > 0 ? left : 0;
}

const char *bg_redis_describe(const bg_redis_t *r)
{
    return r->desc;
}

static struct timeval ms_to_tv(int64_t ms)
{
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)((ms % 1000) * 1000)};
    return tv;
}

static void attempt_failed(bg_redis_t *r, const char *why)
{
    int64_t delay = bg__redis_backoff_ms(r->failures, BACKOFF_BASE_MS, BACKOFF_CAP_MS);
    /* The first failure of a streak is worth a warning; the retries that follow are not. */
    if (r->failures == 0)
        bg_warn("redis %s: %s; retrying with backoff", r->desc, why);
    else
        bg_debug("redis %s: %s; next attempt in %lld ms", r->desc, why, (long long)delay);
    r->failures++;
    r->next_attempt_ms = bg__redis_now_ms() + delay;
}

/* Runs AUTH or SELECT on a fresh context; returns 0, BG_ERR_DENIED or BG_ERR_UNAVAILABLE. */
static int handshake_step(bg_redis_t *r, redisContext *c, int argc, const char **argv)
{
    redisReply *reply = redisCommandArgv(c, argc, argv, NULL);
    if (reply == NULL) {
        attempt_failed(r, c->errstr);
        return BG_ERR_UNAVAILABLE;
    }
    int rc = 0;
    if (reply->type == REDIS_REPLY_ERROR) {
        /* The server's message names the problem ("WRONGPASS", "DB index is out of range") and
         * never echoes the password back. */
        char why[200];
        snprintf(why, sizeof(why), "%s refused: %s", argv[0], reply->str);
        attempt_failed(r, why);
        rc = BG_ERR_DENIED;
    }
    freeReplyObject(reply);
    return rc;
}

int bg_redis_connect(bg_redis_t *r)
{
    if (r->c != NULL)
        return 0;
    if (bg__redis_now_ms() < r->next_attempt_ms)
        return BG_ERR_UNAVAILABLE;
    struct timeval tv = ms_to_tv(r->timeout_ms);
    redisContext *c = redisConnectWithTimeout(r->url.host, r->url.port, tv);
    if (c == NULL) {
        attempt_failed(r, "cannot allocate a connection");
        return BG_ERR_UNAVAILABLE;
    }
    if (c->err != 0 || redisSetTimeout(c, tv) != REDIS_OK) {
        attempt_failed(r, c->errstr);
        redisFree(c);
        return BG_ERR_UNAVAILABLE;
    }
    (void)redisEnableKeepAlive(c); /* best effort: only speeds up noticing a dead peer */
    int rc = 0;
    if (r->url.password != NULL) {
        const char *argv[3] = {"AUTH", r->url.user, r->url.password};
        if (r->url.user == NULL) {
            argv[1] = r->url.password;
            rc = handshake_step(r, c, 2, argv);
        } else {
            rc = handshake_step(r, c, 3, argv);
        }
    }
    if (rc == 0 && r->url.db != 0) {
        char db[16];
        snprintf(db, sizeof(db), "%d", r->url.db);
        const char *argv[2] = {"SELECT", db};
        rc = handshake_step(r, c, 2, argv);
    }
    if (rc != 0) {
        redisFree(c);
        return rc;
    }
    if (r->failures > 0)
        bg_info("redis %s: connected again", r->desc);
    r->c = c;
    r->failures = 0;
    r->next_attempt_ms = 0;
    return 0;
}

/*
 * A reply that did not come (saved_errno: errno when hiredis failed): drops the connection and
 * returns BG_ERR_TIMEOUT for a read that timed out, else BG_ERR_UNAVAILABLE. what names the call
 * in the debug log.
 */
static int reply_lost(bg_redis_t *r, int saved_errno, const char *what)
{
    const redisContext *c = r->c;
    bool timed_out =
        c->err == REDIS_ERR_IO &&
        (saved_errno == EAGAIN || saved_errno == EWOULDBLOCK || saved_errno == ETIMEDOUT);
    bg_debug("redis %s: %s%s", r->desc, timed_out ? what : c->errstr,
             timed_out ? " timed out" : "");
    drop(r);
    return timed_out ? BG_ERR_TIMEOUT : BG_ERR_UNAVAILABLE;
}

/*
 * Sends one formatted command and reads its reply. On a transport error the connection is dropped
 * and the next call reconnects at once (failures stays 0): the common cause is a server restart.
 */
static int exec_formatted(bg_redis_t *r, const char *cmd, size_t len, int64_t block_ms,
                          redisReply **out)
{
    int rc = bg_redis_connect(r);
    if (rc != 0)
        return rc;
    redisContext *c = r->c;
    if (block_ms > 0 && redisSetTimeout(c, ms_to_tv(r->timeout_ms + block_ms)) != REDIS_OK) {
        drop(r);
        return BG_ERR_UNAVAILABLE;
    }
    void *reply = NULL;
    int saved_errno = 0;
    if (redisAppendFormattedCommand(c, cmd, len) != REDIS_OK ||
        redisGetReply(c, &reply) != REDIS_OK)
        saved_errno = errno;
    if (reply == NULL)
        return reply_lost(r, saved_errno, "command");
    if (block_ms > 0 && redisSetTimeout(c, ms_to_tv(r->timeout_ms)) != REDIS_OK)
        drop(r); /* the reply is good; only the next command needs a fresh connection */
    if (out != NULL)
        *out = reply;
    else
        freeReplyObject(reply);
    return 0;
}

int bg_redis_command(bg_redis_t *r, redisReply **out, const char *fmt, ...)
{
    if (out != NULL)
        *out = NULL;
    char *cmd = NULL;
    va_list ap;
    va_start(ap, fmt);
    int len = redisvFormatCommand(&cmd, fmt, ap);
    va_end(ap);
    if (len < 0)
        return BG_ERR_INVALID;
    int rc = exec_formatted(r, cmd, (size_t)len, 0, out);
    redisFreeCommand(cmd);
    return rc;
}

static int exec_argv(bg_redis_t *r, int64_t block_ms, int argc, const char *const *argv,
                     const size_t *lens, redisReply **out)
{
    if (out != NULL)
        *out = NULL;
    if (argc < 1)
        return BG_ERR_INVALID;
    char *cmd = NULL;
    long len = bg__redis_format(&cmd, argc, argv, lens);
    if (len < 0)
        return BG_ERR_INVALID;
    int rc = exec_formatted(r, cmd, (size_t)len, block_ms, out);
    free(cmd);
    return rc;
}

int bg_redis_pipeline(bg_redis_t *r, size_t n, const bg_redis_cmd_t *cmds, redisReply **replies)
{
    for (size_t i = 0; i < n; i++) {
        replies[i] = NULL;
        if (cmds[i].argc < 1)
            return BG_ERR_INVALID;
    }
    int rc = bg_redis_connect(r);
    if (rc != 0)
        return rc;
    redisContext *c = r->c;
    for (size_t i = 0; i < n; i++) {
        char *cmd = NULL;
        long len = bg__redis_format(&cmd, cmds[i].argc, cmds[i].argv, cmds[i].lens);
        int st = len < 0 ? REDIS_ERR : redisAppendFormattedCommand(c, cmd, (size_t)len);
        free(cmd);
        if (st != REDIS_OK) {
            drop(r);
            return BG_ERR_UNAVAILABLE;
        }
    }
    for (size_t i = 0; i < n; i++) {
        void *reply = NULL;
        int saved_errno = 0;
        if (redisGetReply(c, &reply) != REDIS_OK)
            saved_errno = errno;
        if (reply == NULL) {
            for (size_t k = 0; k < i; k++) {
                freeReplyObject(replies[k]);
                replies[k] = NULL;
            }
            return reply_lost(r, saved_errno, "pipeline");
        }
        replies[i] = reply;
    }
    return 0;
}

int bg_redis_argv(bg_redis_t *r, int argc, const char *const *argv, const size_t *lens,
                  redisReply **out)
{
    return exec_argv(r, 0, argc, argv, lens, out);
}

int bg_redis_argv_block(bg_redis_t *r, int64_t block_ms, int argc, const char *const *argv,
                        const size_t *lens, redisReply **out)
{
    return exec_argv(r, block_ms > 0 ? block_ms : 0, argc, argv, lens, out);
}

bool bg_redis_reply_is_error(const redisReply *reply, const char *prefix)
{
    return reply != NULL && reply->type == REDIS_REPLY_ERROR && reply->str != NULL &&
           strncmp(reply->str, prefix, strlen(prefix)) == 0;
}

long bg__redis_format_evalsha(char **out, const char *sha, int nkeys, const char *const *keys,
                              int nargs, const char *const *args)
{
    *out = NULL;
    if (nkeys < 0 || nargs < 0)
        return -1;
    char nk[16];
    snprintf(nk, sizeof(nk), "%d", nkeys);
    int argc = 3 + nkeys + nargs;
    const char **argv = bg_malloc((size_t)argc * sizeof(*argv));
    argv[0] = "EVALSHA";
    argv[1] = sha;
    argv[2] = nk;
    for (int i = 0; i < nkeys; i++)
        argv[3 + i] = keys[i];
    for (int i = 0; i < nargs; i++)
        argv[3 + nkeys + i] = args[i];
    long len = bg__redis_format(out, argc, argv, NULL);
    free(argv);
    return len;
}

int bg_redis_script(bg_redis_t *r, const char *name, int nkeys, const char *const *keys, int nargs,
                    const char *const *args, redisReply **out)
{
    if (out != NULL)
        *out = NULL;
    char sha[41];
    const bg_resource_t *res = bg__redis_script_find(name, sha);
    if (res == NULL)
        return BG_ERR_NOT_FOUND;
    char *cmd = NULL;
    long len = bg__redis_format_evalsha(&cmd, sha, nkeys, keys, nargs, args);
    if (len < 0)
        return BG_ERR_INVALID;
    redisReply *reply = NULL;
    int rc = exec_formatted(r, cmd, (size_t)len, 0, &reply);
    if (rc == 0 && bg_redis_reply_is_error(reply, "NOSCRIPT")) {
        freeReplyObject(reply);
        reply = NULL;
        const char *load[3] = {"SCRIPT", "LOAD", res->data};
        size_t lens[3] = {6, 4, res->len};
        redisReply *loaded = NULL;
        rc = bg_redis_argv(r, 3, load, lens, &loaded);
        if (rc == 0 && loaded != NULL && loaded->type == REDIS_REPLY_ERROR)
            bg_error("redis: SCRIPT LOAD %s failed: %s", name, loaded->str);
        if (loaded != NULL)
            freeReplyObject(loaded);
        if (rc == 0)
            rc = exec_formatted(r, cmd, (size_t)len, 0, &reply);
    }
    free(cmd);
    if (rc == 0 && out != NULL)
        *out = reply;
    else if (reply != NULL)
        freeReplyObject(reply);
    return rc;
}

/* ---- shards and keys ---- */

uint32_t bg_shard_hash(const char *s)
{
    uint32_t h = 2166136261u;
    for (const unsigned char *p = (const unsigned char *)s; *p != '\0'; p++) {
        h ^= *p;
        h *= 16777619u;
    }
    return h;
}

int bg_shard_of(const char *user_id, int shards)
{
    if (shards <= 1)
        return 0;
    return (int)(bg_shard_hash(user_id) % (uint32_t)shards);
}

static int key_printf(char *out, size_t outlen, const char *fmt, int shard, const char *role)
{
    int n = snprintf(out, outlen, fmt, shard, role);
    if (n < 0 || (size_t)n >= outlen) {
        if (outlen > 0)
            out[0] = '\0';
        return BG_ERR_TOO_LARGE;
    }
    return 0;
}

int bg_shard_tag(char *out, size_t outlen, int shard)
{
    return key_printf(out, outlen, "{s%d}%s", shard, "");
}

int bg_redis_key_queue(char *out, size_t outlen, int shard, const char *role)
{
    return key_printf(out, outlen, "bg:{s%d}:q:%s", shard, role);
}

int bg_redis_key_dlq(char *out, size_t outlen, int shard, const char *role)
{
    return key_printf(out, outlen, "bg:{s%d}:dlq:%s", shard, role);
}

int bg_redis_key_errors(char *out, size_t outlen, int shard, const char *role)
{
    return key_printf(out, outlen, "bg:{s%d}:qerr:%s", shard, role);
}
