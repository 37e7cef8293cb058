/*
 * Asynchronous Redis client on a libuv loop (hiredis 0.14 with its libuv adapter), for bg-edge.
 *
 * One client is one connection, driven by the loop that created it: call every function from that
 * loop's thread. The client connects on its own (AUTH and SELECT from the URL), and after the
 * connection breaks reconnects with exponential backoff and jitter. While it is not connected every
 * command fails at once with BG_ERR_UNAVAILABLE, so the edge can answer 503 without waiting.
 *
 * Callback contract (libuv's): a function that returns an error never calls its callback;
 * otherwise the callback runs exactly once, from the loop, with one of
 *   - 0 and the reply (possibly an error reply of the server, type REDIS_REPLY_ERROR);
 *   - BG_ERR_TIMEOUT when no reply came within the client's timeout (hiredis 0.14 has no timeouts:
 *     each command arms its own timer; a reply that arrives later is dropped). A timeout with no
 *     byte read from the server since the command was sent means the connection is stuck: it is
 *     dropped and re-established, and the other commands on it fail with BG_ERR_UNAVAILABLE;
 *   - BG_ERR_UNAVAILABLE when the connection broke before the reply came;
 *   - BG_ERR_CLOSED when the client was freed first.
 * The reply is borrowed: it is valid only during the callback and is never freed by the caller
 * (hiredis frees asynchronous replies itself).
 */
#ifndef BG_REDIS_ASYNC_H
#define BG_REDIS_ASYNC_H

#include <hiredis/hiredis.h>
#include <uv.h>

#include "bg/common.h"

typedef struct bg_redis_async bg_redis_async_t;

struct redisAsyncContext;

/**
 * Drives a hiredis asynchronous context from a libuv loop (a uv_poll on its socket, freed when
 * hiredis cleans the context up). Shared by this client and the pub/sub subscriber
 * (bg/redis_sub.h). Returns 0 or BG_ERR_IO.
 */
BG_MUSTCHECK int bg_redis_async_attach(struct redisAsyncContext *ac, uv_loop_t *loop);

/**
 * Callback of one command. err is 0 or a negative bg_err (see above); reply is borrowed, non-NULL
 * exactly when err is 0, and must not be freed.
 */
typedef void (*bg_redis_async_cb)(void *ud, int err, const redisReply *reply);

/**
 * Creates a client on loop (borrowed; must outlive the client) and starts connecting to url;
 * timeout_ms (> 0) bounds each command and each connection attempt. Returns the owned client, or
 * NULL when url does not parse or timeout_ms is not positive. The client is not connected on
 * return: commands fail with BG_ERR_UNAVAILABLE until bg_redis_async_connected() is true.
 */
bg_redis_async_t *bg_redis_async_new(uv_loop_t *loop, const char *url, int64_t timeout_ms);

/**
 * Frees the client; accepts NULL. Callbacks of pending commands run before it returns, with
 * BG_ERR_CLOSED (they may not use the client any more; calls on it from there fail). The memory
 * of the client and its handles is released by the loop's close callbacks: run the loop once more
 * before closing it. May be called from a callback of this client.
 */
void bg_redis_async_free(bg_redis_async_t *c);

/** Returns true when commands can be sent (connected and authenticated). */
bool bg_redis_async_connected(const bg_redis_async_t *c);

/**
 * Sends one command (argc ≥ 1; lens may be NULL for C strings; the arguments are copied). Returns
 * 0 (cb will run once, see above), BG_ERR_UNAVAILABLE when not connected, BG_ERR_CLOSED after free,
 * or BG_ERR_INVALID for bad arguments.
 */
BG_MUSTCHECK int bg_redis_async_argv(bg_redis_async_t *c, bg_redis_async_cb cb, void *ud, int argc,
                                     const char **argv, const size_t *lens);

/**
 * Runs the embedded script name ("lua/admit.lua") with EVALSHA; when the server answers NOSCRIPT,
 * loads the embedded text and sends the EVALSHA once more (the timeout covers both). keys and args
 * are C strings, copied. Returns as bg_redis_async_argv, or BG_ERR_NOT_FOUND for an unknown script.
 */
BG_MUSTCHECK int bg_redis_async_script(bg_redis_async_t *c, bg_redis_async_cb cb, void *ud,
                                       const char *name, int nkeys, const char *const *keys,
                                       int nargs, const char *const *args);

#endif
