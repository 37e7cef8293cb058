/*
 * Blocking Redis client (hiredis 0.14) for worker threads and bgctl, plus the shard and key helpers
 * every process uses.
 *
 * A bg_redis_t is one connection owned by one thread. It connects lazily from a redis:// URL
 * (AUTH and SELECT from the URL), gives every command a deadline (BG_REDIS_TIMEOUT_MS through
 * redisSetTimeout) and, after a connection error, reconnects on a later call with exponential
 * backoff and jitter: while the backoff runs, calls fail at once with BG_ERR_UNAVAILABLE instead of
 * hanging, so a caller's loop stays responsive and Redis is not hammered. A command that fails on
 * the wire is never re-sent here (it may have been executed); the caller decides.
 *
 * Replies: a call that returns 0 hands over an owned reply (freeReplyObject it). A reply may be an
 * error reply of the server (type REDIS_REPLY_ERROR); the return code reports transport problems
 * only, since an error reply is an answer (WRONGTYPE, a script's own error, …).
 *
 * Scripts live in lua/ and are compiled into the binary; bg_redis_script() runs them by SHA1 and
 * loads the embedded text once when the server does not know it (after a restart or SCRIPT FLUSH).
 *
 * Keys (DESIGN.md §3): everything of one user lives under the hash tag of the user's shard,
 * "{s<N>}" with N = bg_shard_of(user id, BG_SHARDS); job streams are bg:{s<N>}:q:<role>.
 */
#ifndef BG_REDIS_H
#define BG_REDIS_H

#include <hiredis/hiredis.h>

#include "bg/common.h"

/** Longest key or hash tag the helpers below produce (role names are short identifiers). */
#define BG_REDIS_KEY_MAX 128

/** A parsed redis:// URL. */
typedef struct bg_redis_url {
    char *host;     /**< owned */
    int port;       /**< 6379 when absent */
    char *user;     /**< owned; NULL when absent (AUTH with the password only) */
    char *password; /**< owned, secret; NULL when absent */
    int db;         /**< 0 when absent */
} bg_redis_url_t;

/**
 * Parses redis://[[user]:password@]host[:port][/db] (percent-escapes in user and password are
 * decoded; an IPv6 host goes in brackets). Returns 0 and fills out (bg_redis_url_dispose frees it),
 * or BG_ERR_INVALID and leaves out empty.
 */
BG_MUSTCHECK int bg_redis_url_parse(const char *url, bg_redis_url_t *out);
/** Frees the strings of a parsed URL (the password is wiped first). */
void bg_redis_url_dispose(bg_redis_url_t *u);

/** One blocking connection; not thread-safe (one per thread). */
typedef struct bg_redis bg_redis_t;

/**
 * Creates a client for url with a per-command deadline of timeout_ms (> 0). Does not connect: the
 * first command does (see bg_redis_connect to check at start-up). Returns 0 and an owned client in
 * *out, or BG_ERR_INVALID when url does not parse.
 */
BG_MUSTCHECK int bg_redis_new(const char *url, int64_t timeout_ms, bg_redis_t **out);
/** Closes the connection and frees the client; accepts NULL. */
void bg_redis_free(bg_redis_t *r);

/**
 * Makes sure the client is connected (connecting, authenticating and selecting the database when
 * it is not). Returns 0; BG_ERR_UNAVAILABLE when Redis cannot be reached, or the backoff after a
 * failure has not yet passed; BG_ERR_DENIED when AUTH or SELECT is refused.
 */
BG_MUSTCHECK int bg_redis_connect(bg_redis_t *r);

/** Returns true while the client holds a connection that has not failed. */
bool bg_redis_is_connected(const bg_redis_t *r);

/**
 * Milliseconds until the next connection attempt is allowed (0 when connected or allowed now). A
 * loop that got BG_ERR_UNAVAILABLE can sleep this long before trying again.
 */
int64_t bg_redis_retry_in_ms(const bg_redis_t *r);

/** Returns "host:port/db" for log lines (no credentials); static per client, borrowed. */
const char *bg_redis_describe(const bg_redis_t *r);

/**
 * Runs one command given in hiredis' format language ("SET %s %b", key, val, len). On 0, *out holds
 * the owned reply (may be an error reply); out may be NULL to discard it. Returns
 * BG_ERR_UNAVAILABLE (no connection, or it broke), BG_ERR_TIMEOUT (no answer within the deadline:
 * the connection is dropped, since the late answer would desynchronise it), BG_ERR_DENIED (AUTH
 * refused). *out is NULL on every error.
 */
BG_MUSTCHECK int bg_redis_command(bg_redis_t *r, redisReply **out, const char *fmt, ...);

/** As bg_redis_command, with the arguments as an array (lens may be NULL for C strings). */
BG_MUSTCHECK int bg_redis_argv(bg_redis_t *r, int argc, const char *const *argv, const size_t *lens,
                               redisReply **out);

/** One command of a pipeline (bg_redis_pipeline): argc arguments, lens NULL for C strings. */
typedef struct bg_redis_cmd {
    int argc;
    const char *const *argv;
    const size_t *lens;
} bg_redis_cmd_t;

/**
 * Sends n commands at once and reads their n replies (one round trip; Redis runs them in order,
 * though not atomically: another client's commands may come between them). On 0, replies[i] holds
 * each owned reply (any may be an error reply); on an error (as bg_redis_argv's) every replies[i]
 * is NULL and the connection is dropped, so some of the commands may have run.
 */
BG_MUSTCHECK int bg_redis_pipeline(bg_redis_t *r, size_t n, const bg_redis_cmd_t *cmds,
                                   redisReply **replies);

/**
 * As bg_redis_argv, for a command that blocks on the server up to block_ms (XREADGROUP … BLOCK,
 * BLPOP): the deadline of this call is block_ms plus the client's timeout. Blocking commands
 * belong on a connection of their own (DESIGN.md §3).
 */
BG_MUSTCHECK int bg_redis_argv_block(bg_redis_t *r, int64_t block_ms, int argc,
                                     const char *const *argv, const size_t *lens, redisReply **out);

/**
 * Runs the embedded script name ("lua/admit.lua") with EVALSHA; when the server answers NOSCRIPT,
 * loads the embedded text (SCRIPT LOAD) and retries once. keys and args are C strings. Returns as
 * bg_redis_argv, or BG_ERR_NOT_FOUND when no script of that name is compiled in.
 */
BG_MUSTCHECK int bg_redis_script(bg_redis_t *r, const char *name, int nkeys,
                                 const char *const *keys, int nargs, const char *const *args,
                                 redisReply **out);

/** Returns true when reply is an error reply whose message starts with prefix ("" for any). */
bool bg_redis_reply_is_error(const redisReply *reply, const char *prefix);

/* ---- shards and keys ---- */

/** The stable 32-bit hash of the shard function (FNV-1a over the bytes of s). */
uint32_t bg_shard_hash(const char *s);

/** Returns the shard of a user: bg_shard_hash(user_id) mod shards, in [0, shards). shards ≥ 1. */
int bg_shard_of(const char *user_id, int shards);

/** Writes the hash tag "{s<shard>}" into out. Returns 0, or BG_ERR_TOO_LARGE (out is then ""). */
BG_MUSTCHECK int bg_shard_tag(char *out, size_t outlen, int shard);

/** Writes the job stream of a role in a shard, "bg:{s<N>}:q:<role>". Returns as bg_shard_tag. */
BG_MUSTCHECK int bg_redis_key_queue(char *out, size_t outlen, int shard, const char *role);
/** Writes the dead-letter stream, "bg:{s<N>}:dlq:<role>". Returns as bg_shard_tag. */
BG_MUSTCHECK int bg_redis_key_dlq(char *out, size_t outlen, int shard, const char *role);
/**
 * Writes the hash of last errors of a role's pending jobs, "bg:{s<N>}:qerr:<role>" (field: stream
 * entry id). Returns as bg_shard_tag.
 */
BG_MUSTCHECK int bg_redis_key_errors(char *out, size_t outlen, int shard, const char *role);

/* ---- internals shared with redis_async.c ---- */

/**
 * Finds the embedded script name and writes its SHA1 (40 hex digits and a NUL, computed by the
 * build) into sha. Returns the resource (static) or NULL.
 */
const struct bg_resource *bg__redis_script_find(const char *name, char sha[41]);

/**
 * Formats a command as RESP (an array of bulk strings, what redisFormatCommandArgv writes) into
 * *out, allocated with malloc (the caller frees it), in one pass without printf. lens NULL: the
 * arguments are NUL-terminated. Returns the length, or -1 for argc < 1.
 */
long bg__redis_format(char **out, int argc, const char *const *argv, const size_t *lens);

/**
 * Formats "EVALSHA sha nkeys keys… args…" with bg__redis_format (NUL-terminated keys and args).
 * Returns the length, or -1 for a negative count.
 */
long bg__redis_format_evalsha(char **out, const char *sha, int nkeys, const char *const *keys,
                              int nargs, const char *const *args);

/**
 * Returns a reconnect delay for the attempt-th consecutive failure (0-based): base doubling up to
 * cap, with jitter drawn from [delay/2, delay].
 */
int64_t bg__redis_backoff_ms(unsigned attempt, int64_t base_ms, int64_t cap_ms);

/** Milliseconds of a monotonic clock. */
int64_t bg__redis_now_ms(void);

#endif
