/*
 * A Redis pub/sub subscriber on a libuv loop (hiredis 0.14 async SUBSCRIBE), for bg-edge: one
 * connection per loop, subscribed to a fixed set of channels, that reconnects with backoff and
 * subscribes again on its own.
 *
 * Pub/sub delivers at most once: whatever is published while the connection is down is lost. So
 * each time the subscription is (re)established the callback is told so (channel NULL), and the
 * caller re-reads whatever it follows from the replayable source (for the edge: the job output
 * streams).
 *
 * Call every function from the loop's thread. Messages are borrowed for the duration of the
 * callback only (hiredis frees asynchronous replies itself).
 */
#ifndef BG_REDIS_SUB_H
#define BG_REDIS_SUB_H

#include <uv.h>

#include "bg/common.h"

typedef struct bg_redis_sub bg_redis_sub_t;

/**
 * Called once per message with its channel and payload (borrowed, NUL-terminated as well as
 * measured), and with channel NULL (payload NULL, lengths 0) each time every channel is
 * subscribed again after a (re)connection: notifications may have been lost before that point.
 */
typedef void (*bg_redis_sub_cb)(void *ud, const char *channel, size_t channel_len,
                                const char *payload, size_t payload_len);

/**
 * Creates a subscriber on loop (borrowed; must outlive it) for the nchannels (≥ 1) channels
 * (copied) and starts connecting to url; timeout_ms (> 0) bounds each connection attempt. cb(ud, …)
 * runs from the loop. Returns the owned subscriber, or NULL when url does not parse or an argument
 * is bad.
 */
bg_redis_sub_t *bg_redis_sub_new(uv_loop_t *loop, const char *url, int64_t timeout_ms,
                                 const char *const *channels, size_t nchannels, bg_redis_sub_cb cb,
                                 void *ud);

/** Returns true while every channel is subscribed. */
bool bg_redis_sub_ready(const bg_redis_sub_t *s);

/**
 * Frees the subscriber; accepts NULL. The callback never runs after this. Memory of its handles is
 * released by the loop's close callbacks. May be called from the callback.
 */
void bg_redis_sub_free(bg_redis_sub_t *s);

#endif
