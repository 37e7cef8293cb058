/*
 * Redis pub/sub subscriber on libuv. See bg/redis_sub.h for the contract.
 *
 * Design. A small state machine like the command client's (redis_async.c): WAIT (a timer runs until
 * the next attempt) → CONNECTING → HANDSHAKE (AUTH when the URL has a password, then one SUBSCRIBE
 * naming every channel) → READY once the server confirmed each channel. Any failure goes back to
 * WAIT with a doubling, jittered backoff; the timer bounds CONNECTING and HANDSHAKE. SELECT is not
 * sent: pub/sub channels do not belong to a database.
 *
 * A subscribed connection carries no replies of ours that could time out, so a dead peer is found
 * by TCP keep-alive, which is switched on for every connection.
 *
 * hiredis keeps the SUBSCRIBE callback per channel and calls it for the confirmation, for each
 * message and, with a NULL reply, when the context goes away. Every hiredis callback finds the
 * subscriber through ac->data, which is cleared before the subscriber lets a context go, so late
 * callbacks of an old context find nobody listening. Replies are hiredis' to free.
 *
 * The context is driven from the loop by the command client's event hooks
 * (bg_redis_async_attach).
 */
#include <hiredis/async.h>
#include <stdlib.h>
#include <string.h>

#include "bg/err.h"
#include "bg/log.h"
#include "bg/redis.h"
#include "bg/redis_async.h"
#include "bg/redis_sub.h"

#define BACKOFF_BASE_MS 50
#define BACKOFF_CAP_MS 2000

typedef enum state {
    ST_WAIT,
    ST_CONNECTING,
    ST_HANDSHAKE,
    ST_READY,
    ST_CLOSED,
} state_t;

struct bg_redis_sub {
    uv_loop_t *loop;       /* borrowed */
    redisAsyncContext *ac; /* NULL in WAIT and CLOSED; hiredis owns and frees it */
    state_t state;
    bg_redis_url_t url;
    int64_t timeout_ms;
    uv_timer_t timer; /* reconnect delay or connect/handshake deadline */
    unsigned failures;
    size_t confirmed; /* channels the server confirmed on this connection */
    char **channels;  /* owned */
    size_t nchannels;
    bg_redis_sub_cb cb;
    void *ud; /* borrowed, handed to cb */
    char desc[160];
};

static void start_connect(bg_redis_sub_t *s);
static void schedule_reconnect(bg_redis_sub_t *s);

/* ---- connection ---- */

static void failed(bg_redis_sub_t *s, const char *why)
{
    if (s->failures == 0)
        bg_warn("redis subscriber %s: %s; reconnecting with backoff", s->desc, why);
    else
        bg_debug("redis subscriber %s: %s", s->desc, why);
}

/* Lets the current context go (hiredis fails its callbacks; they find ac->data NULL) and waits. */
static void drop_connection(bg_redis_sub_t *s)
{
    redisAsyncContext *ac = s->ac;
    s->ac = NULL;
    uv_timer_stop(&s->timer);
    if (ac != NULL) {
        ac->data = NULL;
        redisAsyncFree(ac); /* deferred by hiredis when called from one of its callbacks */
    }
    schedule_reconnect(s);
}

static bool is_str(const redisReply *r, const char *s)
{
    return r->type == REDIS_REPLY_STRING && r->len == strlen(s) && memcmp(r->str, s, r->len) == 0;
}

static void on_message(redisAsyncContext *ac, void *reply_, void *privdata)
{
    (void)privdata;
    bg_redis_sub_t *s = ac->data;
    const redisReply *r = reply_;
    if (s == NULL || r == NULL || s->state == ST_CLOSED)
        return; /* a context we let go, or going away: on_disconnect reconnects */
    if (r->type == REDIS_REPLY_ERROR) {
        failed(s, r->str);
        drop_connection(s);
        return;
    }
    if (r->type != REDIS_REPLY_ARRAY || r->elements < 3)
        return;
    const redisReply *kind = r->element[0], *chan = r->element[1], *payload = r->element[2];
    if (is_str(kind, "message") && chan->type == REDIS_REPLY_STRING &&
        payload->type == REDIS_REPLY_STRING) {
        if (s->state == ST_READY)
            s->cb(s->ud, chan->str, chan->len, payload->str, payload->len);
        return;
    }
    if (is_str(kind, "subscribe") && s->state == ST_HANDSHAKE && ++s->confirmed == s->nchannels) {
        uv_timer_stop(&s->timer);
        s->state = ST_READY;
        if (s->failures > 0)
            bg_info("redis subscriber %s: subscribed again", s->desc);
        s->failures = 0;
        /* whatever was published while we were not listening is lost: let the caller catch up */
        s->cb(s->ud, NULL, 0, NULL, 0);
    }
}

static void subscribe(bg_redis_sub_t *s)
{
    size_t argc = s->nchannels + 1;
    const char **argv = bg_malloc(argc * sizeof(*argv));
    argv[0] = "SUBSCRIBE";
    for (size_t i = 0; i < s->nchannels; i++)
        argv[i + 1] = s->channels[i];
    int st = redisAsyncCommandArgv(s->ac, on_message, NULL, (int)argc, argv, NULL);
    free(argv);
    if (st != REDIS_OK) {
        failed(s, "cannot send SUBSCRIBE");
        drop_connection(s);
    }
}

static void on_auth(redisAsyncContext *ac, void *reply_, void *privdata)
{
    (void)privdata;
    bg_redis_sub_t *s = ac->data;
    const redisReply *r = reply_;
    if (s == NULL || r == NULL || s->state != ST_HANDSHAKE)
        return;
    if (r->type == REDIS_REPLY_ERROR) {
        char why[200];
        snprintf(why, sizeof(why), "AUTH refused: %s", r->str);
        failed(s, why);
        drop_connection(s);
        return;
    }
    subscribe(s);
}

static void on_connect(const redisAsyncContext *cac, int status)
{
    bg_redis_sub_t *s = cac->data;
    if (s == NULL)
        return;
    if (status != REDIS_OK) {
        /* hiredis frees the context right after this callback, without a disconnect callback */
        failed(s, cac->errstr);
        s->ac = NULL;
        uv_timer_stop(&s->timer);
        schedule_reconnect(s);
        return;
    }
    s->state = ST_HANDSHAKE;
    s->confirmed = 0;
    if (redisEnableKeepAlive(&s->ac->c) != REDIS_OK)
        bg_debug("redis subscriber %s: cannot enable TCP keep-alive", s->desc);
    if (s->url.password != NULL) {
        const char *argv[3] = {"AUTH", s->url.user, s->url.password};
        int argc = 3;
        if (s->url.user == NULL) {
            argv[1] = s->url.password;
            argc = 2;
        }
        if (redisAsyncCommandArgv(s->ac, on_auth, NULL, argc, argv, NULL) != REDIS_OK) {
            failed(s, "cannot send AUTH");
            drop_connection(s);
        }
        return;
    }
    subscribe(s);
}

static void on_disconnect(const redisAsyncContext *cac, int status)
{
    (void)status;
    bg_redis_sub_t *s = cac->data;
    if (s == NULL)
        return;
    s->ac = NULL;
    if (s->state == ST_CLOSED)
        return;
    failed(s, cac->errstr[0] != '\0' ? cac->errstr : "connection closed");
    uv_timer_stop(&s->timer);
    schedule_reconnect(s);
}

static void on_timer(uv_timer_t *t)
{
    bg_redis_sub_t *s = t->data;
    switch (s->state) {
    case ST_WAIT:
        start_connect(s);
        break;
    case ST_CONNECTING:
    case ST_HANDSHAKE:
        failed(s, "connection attempt timed out");
        drop_connection(s);
        break;
    default:
        break;
    }
}

static void schedule_reconnect(bg_redis_sub_t *s)
{
    if (s->state == ST_CLOSED)
        return;
    s->state = ST_WAIT;
    int64_t delay = bg__redis_backoff_ms(s->failures, BACKOFF_BASE_MS, BACKOFF_CAP_MS);
    s->failures++;
    uv_timer_start(&s->timer, on_timer, (uint64_t)delay, 0);
}

static void start_connect(bg_redis_sub_t *s)
{
    s->state = ST_CONNECTING;
    redisAsyncContext *ac = redisAsyncConnect(s->url.host, s->url.port);
    if (ac == NULL) {
        failed(s, "cannot allocate a connection");
        schedule_reconnect(s);
        return;
    }
    if (ac->err != 0) {
        failed(s, ac->errstr);
        redisAsyncFree(ac);
        schedule_reconnect(s);
        return;
    }
    if (bg_redis_async_attach(ac, s->loop) != 0) {
        failed(s, "cannot attach to the event loop");
        redisAsyncFree(ac);
        schedule_reconnect(s);
        return;
    }
    ac->data = s;
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    s->ac = ac;
    uv_timer_start(&s->timer, on_timer, (uint64_t)s->timeout_ms, 0);
}

bg_redis_sub_t *bg_redis_sub_new(uv_loop_t *loop, const char *url, int64_t timeout_ms,
                                 const char *const *channels, size_t nchannels, bg_redis_sub_cb cb,
                                 void *ud)
{
    if (loop == NULL || timeout_ms <= 0 || channels == NULL || nchannels == 0 || cb == NULL)
        return NULL;
    bg_redis_sub_t *s = bg_calloc(1, sizeof(*s));
    if (bg_redis_url_parse(url, &s->url) != 0) {
        free(s);
        return NULL;
    }
    s->loop = loop;
    s->timeout_ms = timeout_ms;
    s->cb = cb;
    s->ud = ud;
    s->channels = bg_calloc(nchannels, sizeof(*s->channels));
    for (size_t i = 0; i < nchannels; i++)
        s->channels[i] = bg_strdup(channels[i]);
    s->nchannels = nchannels;
    snprintf(s->desc, sizeof(s->desc), "%s:%d", s->url.host, s->url.port);
    uv_timer_init(loop, &s->timer);
    s->timer.data = s;
    start_connect(s);
    return s;
}

bool bg_redis_sub_ready(const bg_redis_sub_t *s)
{
    return s != NULL && s->state == ST_READY;
}

static void on_closed(uv_handle_t *h)
{
    bg_redis_sub_t *s = h->data;
    for (size_t i = 0; i < s->nchannels; i++)
        free(s->channels[i]);
    free(s->channels);
    bg_redis_url_dispose(&s->url);
    free(s);
}

void bg_redis_sub_free(bg_redis_sub_t *s)
{
    if (s == NULL || s->state == ST_CLOSED)
        return;
    s->state = ST_CLOSED;
    redisAsyncContext *ac = s->ac;
    s->ac = NULL;
    if (ac != NULL) {
        ac->data = NULL;
        redisAsyncFree(ac);
    }
    uv_timer_stop(&s->timer);
    uv_close((uv_handle_t *)&s->timer, on_closed);
}
