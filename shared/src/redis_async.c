/*
 * Asynchronous Redis client on libuv. See bg/redis_async.h for the contract.
 *
 * Design. The client is a small state machine: WAIT (a timer runs until the next connection
 * attempt) → CONNECTING (non-blocking connect, bounded by the same timer) → HANDSHAKE (AUTH,
 * SELECT) → READY. Any failure goes back to WAIT with a backoff that doubles up to a cap, with
 * jitter so that many edges do not reconnect in step. Commands are accepted in READY only: outside
 * it they fail at once, which is what lets the edge fail closed (503) instead of queueing behind a
 * dead connection.
 *
 * Each command is a cmd_t with its own uv timer, because hiredis 0.14 has no timeouts. A cmd is
 * referenced from two places that end independently: hiredis holds it as privdata until it calls
 * on_reply (with the reply, or with NULL when the context goes away), and the timer handle lives
 * until libuv's close callback. The cmd is freed only when both have let go (maybe_release). The
 * user's callback runs once, guarded by cmd->done, whichever of reply, timeout, disconnect or free
 * comes first; what comes later only releases memory.
 *
 * Re-entrancy: user callbacks may send commands or free the client. hiredis defers freeing a
 * context while it runs a callback (REDIS_IN_CALLBACK), and this client never frees its own memory
 * synchronously either (the struct goes in the close callback of its timer), so a callback that
 * frees the client leaves every pointer on the stack valid until control returns to the loop.
 * Before this client gives up a context it clears ac->data, so the hiredis callbacks that still
 * fire for that context (disconnect, handshake replies) see that nobody listens.
 *
 * The event hooks are our own rather than hiredis' adapters/libuv.h: on a socket error (a reset
 * connection) libuv stops the poll handle and reports only an error status, which that adapter
 * ignores, so hiredis never reads, never sees the error, and the pending commands hang until
 * their timeouts while the connection looks alive. Here an error status makes hiredis read. And
 * commands are written at the end of the loop turn that queued them, not on a writable event (see
 * the hooks below).
 */
#include <assert.h>
#include <hiredis/async.h>
#include <stdlib.h>
#include <string.h>

#include "bg/err.h"
#include "bg/log.h"
#include "bg/redis.h"
#include "bg/redis_async.h"
#include "bg/resource.h"

#define BACKOFF_BASE_MS 50
#define BACKOFF_CAP_MS 2000

typedef enum state {
    ST_WAIT,       /* not connected; timer runs until the next attempt */
    ST_CONNECTING, /* connect(2) in progress; timer is the deadline */
    ST_HANDSHAKE,  /* AUTH / SELECT sent; timer is the deadline */
    ST_READY,
    ST_CLOSED /* bg_redis_async_free was called */
} state_t;

typedef struct st_cmd cmd_t;

struct bg_redis_async {
    uv_loop_t *loop;       /* borrowed */
    redisAsyncContext *ac; /* NULL in WAIT and CLOSED; hiredis owns and frees it */
    state_t state;
    bg_redis_url_t url;
    int64_t timeout_ms;
    uv_timer_t timer; /* reconnect delay or connect/handshake deadline */
    unsigned failures;
    int handshake_left;
    uint64_t reads; /* replies received on the current connection (stall detection) */
    cmd_t *head;    /* commands whose callback has not run yet */
    char desc[160];
};

struct st_cmd {
    cmd_t *prev, *next;
    bg_redis_async_t *owner; /* NULL once the callback ran */
    bg_redis_async_cb cb;
    void *ud;
    uv_timer_t timer;
    bool done;       /* the user's callback ran (or is running) */
    bool in_hiredis; /* hiredis still holds this cmd as privdata */
    bool timer_open; /* the timer handle is not closed yet */
    bool retried;    /* the NOSCRIPT reload was done */
    uint64_t reads_at_send;
    const bg_resource_t *script; /* for the NOSCRIPT reload; NULL for plain commands */
    char *evalsha;               /* owned: the formatted EVALSHA, to send again */
    size_t evalsha_len;
};

static void start_connect(bg_redis_async_t *c);
static void schedule_reconnect(bg_redis_async_t *c);

/* ---- event hooks (hiredis <-> libuv) ---- */

typedef struct st_uv_events {
    redisAsyncContext *ac; /* NULL once hiredis cleaned up */
    uv_poll_t poll;
    uv_prepare_t prepare; /* flushes output produced before the loop polls... */
    uv_check_t check;     /* ...and output produced by what the poll ran */
    int events;           /* what poll watches */
    bool want_write;      /* hiredis has output to send: flushed at this loop turn's end */
    bool flushing;        /* inside flush(): a write interest now means the socket is full */
    int open;             /* handles not closed yet; the struct goes with the last */
} uv_events_t;

/*
 * Writes. hiredis asks for a write (addWrite) after every command it queues; watching the socket
 * for writability to send it costs two epoll_ctl calls per command and a whole loop turn of delay.
 * Once connected, a socket can take a command at once, so the output is flushed instead at the
 * end of the loop turn that queued it (uv_check after the poll's callbacks, uv_prepare before the
 * poll for what timers queued), several commands in one write. Only while connecting (hiredis
 * learns of the connection from the first writable event) or when the socket's buffer is full
 * does a write wait for the poll.
 */
static void on_poll(uv_poll_t *h, int status, int events)
{
    uv_events_t *p = h->data;
    /* On an error libuv reports no events: read (or write) anyway so that hiredis meets it. */
    int ev = status < 0 ? (p->events != 0 ? p->events : UV_READABLE) : events;
    if (p->ac != NULL && (ev & UV_READABLE))
        redisAsyncHandleRead(p->ac);
    if (p->ac != NULL && (ev & UV_WRITABLE))
        redisAsyncHandleWrite(p->ac);
}

static void set_events(uv_events_t *p, int events)
{
    if (events == p->events)
        return;
    p->events = events;
    if (events != 0)
        uv_poll_start(&p->poll, events, on_poll);
    else
        uv_poll_stop(&p->poll);
}

static void flush(uv_events_t *p)
{
    if (p->ac == NULL || !p->want_write)
        return;
    p->want_write = false;
    p->flushing = true;
    redisAsyncHandleWrite(p->ac); /* may end the context: p stays until its handles close */
    p->flushing = false;
}

static void on_prepare(uv_prepare_t *h)
{
    flush(h->data);
}

static void on_check(uv_check_t *h)
{
    flush(h->data);
}

static void ev_add_read(void *data)
{
    uv_events_t *p = data;
    set_events(p, p->events | UV_READABLE);
}

static void ev_del_read(void *data)
{
    uv_events_t *p = data;
    set_events(p, p->events & ~UV_READABLE);
}

static void ev_add_write(void *data)
{
    uv_events_t *p = data;
    if (p->flushing || p->ac == NULL || !(p->ac->c.flags & REDIS_CONNECTED))
        set_events(p, p->events | UV_WRITABLE);
    else
        p->want_write = true;
}

static void ev_del_write(void *data)
{
    uv_events_t *p = data;
    p->want_write = false;
    set_events(p, p->events & ~UV_WRITABLE);
}

static void on_handle_closed(uv_handle_t *h)
{
    uv_events_t *p = h->data;
    if (--p->open == 0)
        free(p);
}

static void ev_cleanup(void *data)
{
    uv_events_t *p = data;
    p->ac = NULL; /* hiredis frees the context right after this */
    p->want_write = false;
    uv_close((uv_handle_t *)&p->poll, on_handle_closed);
    uv_close((uv_handle_t *)&p->prepare, on_handle_closed);
    uv_close((uv_handle_t *)&p->check, on_handle_closed);
}

int bg_redis_async_attach(redisAsyncContext *ac, uv_loop_t *loop)
{
    uv_events_t *p = bg_calloc(1, sizeof(*p));
    if (uv_poll_init(loop, &p->poll, ac->c.fd) != 0) {
        free(p);
        return BG_ERR_IO;
    }
    p->ac = ac;
    p->poll.data = p;
    p->prepare.data = p;
    p->check.data = p;
    p->open = 3;
    /* cannot fail on a live loop */
    (void)uv_prepare_init(loop, &p->prepare);
    (void)uv_check_init(loop, &p->check);
    (void)uv_prepare_start(&p->prepare, on_prepare);
    (void)uv_check_start(&p->check, on_check);
    /* they only flush: they must not keep a loop alive on their own */
    uv_unref((uv_handle_t *)&p->prepare);
    uv_unref((uv_handle_t *)&p->check);
    ac->ev.data = p;
    ac->ev.addRead = ev_add_read;
    ac->ev.delRead = ev_del_read;
    ac->ev.addWrite = ev_add_write;
    ac->ev.delWrite = ev_del_write;
    ac->ev.cleanup = ev_cleanup;
    return 0;
}

/* ---- commands ---- */

static void maybe_release(cmd_t *cmd)
{
    if (!cmd->in_hiredis && !cmd->timer_open) {
        free(cmd->evalsha);
        free(cmd);
    }
}

static void on_cmd_timer_closed(uv_handle_t *h)
{
    cmd_t *cmd = h->data;
    cmd->timer_open = false;
    maybe_release(cmd);
}

/* Marks cmd finished: takes it off its client's list and closes its timer. The caller then runs
 * the user's callback. The memory stays until hiredis and libuv have both let go. */
static void detach(cmd_t *cmd)
{
    cmd->done = true;
    bg_redis_async_t *c = cmd->owner;
    if (c != NULL) {
        if (cmd->prev != NULL)
            cmd->prev->next = cmd->next;
        else
            c->head = cmd->next;
        if (cmd->next != NULL)
            cmd->next->prev = cmd->prev;
        cmd->prev = cmd->next = NULL;
        cmd->owner = NULL;
    }
    uv_timer_stop(&cmd->timer);
    uv_close((uv_handle_t *)&cmd->timer, on_cmd_timer_closed);
}

/*
 * Gives up the current context: hiredis runs the callbacks still pending on it with a NULL reply
 * (→ BG_ERR_UNAVAILABLE), then the client waits to reconnect.
 */
static void drop_connection(bg_redis_async_t *c)
{
    redisAsyncContext *ac = c->ac;
    if (ac == NULL)
        return;
    c->ac = NULL;
    c->state = ST_WAIT;
    ac->data = NULL;
    uv_timer_stop(&c->timer);
    redisAsyncFree(ac);
    if (c->state != ST_CLOSED)
        schedule_reconnect(c);
}

/* Sends the script text and the EVALSHA again after NOSCRIPT; returns 0 or BG_ERR_UNAVAILABLE. */
static int reload_script(bg_redis_async_t *c, cmd_t *cmd)
{
    const char *argv[3] = {"SCRIPT", "LOAD", cmd->script->data};
    size_t lens[3] = {6, 4, cmd->script->len};
    char *load = NULL;
    long len = bg__redis_format(&load, 3, argv, lens);
    if (len < 0)
        return BG_ERR_UNAVAILABLE;
    /* No callback for the load: its reply is not needed, the EVALSHA after it tells the outcome. */
    int st = redisAsyncFormattedCommand(c->ac, NULL, NULL, load, (size_t)len);
    free(load);
    return st == REDIS_OK ? 0 : BG_ERR_UNAVAILABLE;
}

static void on_reply(redisAsyncContext *ac, void *reply_, void *privdata)
{
    cmd_t *cmd = privdata;
    redisReply *reply = reply_;
    cmd->in_hiredis = false;
    if (!cmd->done) {
        bg_redis_async_t *c = cmd->owner;
        assert(c != NULL);
        if (reply != NULL) {
            c->reads++;
            if (cmd->script != NULL && !cmd->retried && c->ac == ac && c->state == ST_READY &&
                bg_redis_reply_is_error(reply, "NOSCRIPT") && reload_script(c, cmd) == 0 &&
                redisAsyncFormattedCommand(ac, on_reply, cmd, cmd->evalsha, cmd->evalsha_len) ==
                    REDIS_OK) {
                cmd->in_hiredis = true;
                cmd->retried = true;
                cmd->reads_at_send = c->reads;
                return;
            }
        } else if (c->ac == ac && c->state == ST_READY) {
            /* The context is going away (hiredis is failing its callbacks): refuse new commands
             * from here on; on_disconnect schedules the reconnection. */
            c->state = ST_WAIT;
        }
        detach(cmd);
        cmd->cb(cmd->ud, reply != NULL ? 0 : BG_ERR_UNAVAILABLE, reply);
    }
    maybe_release(cmd);
}

static void on_cmd_timeout(uv_timer_t *t)
{
    cmd_t *cmd = t->data;
    if (cmd->done)
        return;
    bg_redis_async_t *c = cmd->owner;
    bool stalled = c->state == ST_READY && c->ac != NULL && c->reads == cmd->reads_at_send;
    detach(cmd);
    if (stalled) {
        /* Nothing came back since this command went out: the connection (or the server) is
         * stuck. Replacing it makes the next commands fail fast instead of timing out too. */
        bg_warn("redis %s: no reply within %lld ms; reconnecting", c->desc,
                (long long)c->timeout_ms);
        drop_connection(c);
    }
    cmd->cb(cmd->ud, BG_ERR_TIMEOUT, NULL);
}

/* Queues a formatted command; consumes evalsha (owned) when script is set. */
static int submit(bg_redis_async_t *c, bg_redis_async_cb cb, void *ud, char *formatted, size_t len,
                  const bg_resource_t *script)
{
    cmd_t *cmd = bg_calloc(1, sizeof(*cmd));
    cmd->cb = cb;
    cmd->ud = ud;
    cmd->script = script;
    if (script != NULL) {
        cmd->evalsha = formatted;
        cmd->evalsha_len = len;
    }
    if (redisAsyncFormattedCommand(c->ac, on_reply, cmd, formatted, len) != REDIS_OK) {
        free(cmd->evalsha);
        free(cmd);
        return BG_ERR_UNAVAILABLE;
    }
    cmd->in_hiredis = true;
    cmd->owner = c;
    cmd->reads_at_send = c->reads;
    cmd->next = c->head;
    if (c->head != NULL)
        c->head->prev = cmd;
    c->head = cmd;
    uv_timer_init(c->loop, &cmd->timer);
    cmd->timer.data = cmd;
    cmd->timer_open = true;
    uv_timer_start(&cmd->timer, on_cmd_timeout, (uint64_t)c->timeout_ms, 0);
    return 0;
}

static int check_ready(const bg_redis_async_t *c)
{
    if (c->state == ST_CLOSED)
        return BG_ERR_CLOSED;
    if (c->state != ST_READY || c->ac == NULL)
        return BG_ERR_UNAVAILABLE;
    return 0;
}

int bg_redis_async_argv(bg_redis_async_t *c, bg_redis_async_cb cb, void *ud, int argc,
                        const char **argv, const size_t *lens)
{
    if (c == NULL || cb == NULL || argc < 1 || argv == NULL)
        return BG_ERR_INVALID;
    int rc = check_ready(c);
    if (rc != 0)
        return rc;
    char *formatted = NULL;
    long len = bg__redis_format(&formatted, argc, argv, lens);
    if (len < 0)
        return BG_ERR_INVALID;
    rc = submit(c, cb, ud, formatted, (size_t)len, NULL);
    free(formatted);
    return rc;
}

int bg_redis_async_script(bg_redis_async_t *c, bg_redis_async_cb cb, void *ud, const char *name,
                          int nkeys, const char *const *keys, int nargs, const char *const *args)
{
    if (c == NULL || cb == NULL || nkeys < 0 || nargs < 0)
        return BG_ERR_INVALID;
    char sha[41];
    const bg_resource_t *res = bg__redis_script_find(name, sha);
    if (res == NULL)
        return BG_ERR_NOT_FOUND;
    int rc = check_ready(c);
    if (rc != 0)
        return rc;
    char *formatted = NULL;
    long len = bg__redis_format_evalsha(&formatted, sha, nkeys, keys, nargs, args);
    if (len < 0)
        return BG_ERR_INVALID;
    /* formatted is kept by the cmd for a NOSCRIPT retry, or freed by submit on failure */
    return submit(c, cb, ud, formatted, (size_t)len, res);
}

/* ---- connection ---- */

static void become_ready(bg_redis_async_t *c)
{
    uv_timer_stop(&c->timer);
    c->state = ST_READY;
    c->reads = 0;
    if (c->failures > 0)
        bg_info("redis %s: connected", c->desc);
    c->failures = 0;
}

static void connect_failed(bg_redis_async_t *c, const char *why)
{
    if (c->failures == 0)
        bg_warn("redis %s: %s; reconnecting with backoff", c->desc, why);
    else
        bg_debug("redis %s: %s", c->desc, why);
}

static void on_handshake(redisAsyncContext *ac, void *reply_, void *privdata)
{
    (void)privdata;
    bg_redis_async_t *c = ac->data;
    redisReply *reply = reply_;
    if (c == NULL || reply == NULL)
        return; /* the context is going away; whoever let it go reconnects */
    if (reply->type == REDIS_REPLY_ERROR) {
        char why[200];
        snprintf(why, sizeof(why), "AUTH/SELECT refused: %s", reply->str);
        connect_failed(c, why);
        drop_connection(c); /* hiredis frees the context once this callback returns */
        return;
    }
    if (--c->handshake_left == 0)
        become_ready(c);
}

static void on_connect(const redisAsyncContext *cac, int status)
{
    bg_redis_async_t *c = cac->data;
    if (c == NULL)
        return;
    if (status != REDIS_OK) {
        /* hiredis frees the context right after this callback, without a disconnect callback */
        connect_failed(c, cac->errstr);
        c->ac = NULL;
        uv_timer_stop(&c->timer);
        schedule_reconnect(c);
        return;
    }
    c->state = ST_HANDSHAKE;
    c->handshake_left = 0;
    if (c->url.password != NULL) {
        const char *argv[3] = {"AUTH", c->url.user, c->url.password};
        int argc = 3;
        if (c->url.user == NULL) {
            argv[1] = c->url.password;
            argc = 2;
        }
        if (redisAsyncCommandArgv(c->ac, on_handshake, NULL, argc, argv, NULL) == REDIS_OK)
            c->handshake_left++;
    }
    if (c->url.db != 0) {
        char db[16];
        snprintf(db, sizeof(db), "%d", c->url.db);
        const char *argv[2] = {"SELECT", db};
        if (redisAsyncCommandArgv(c->ac, on_handshake, NULL, 2, argv, NULL) == REDIS_OK)
            c->handshake_left++;
    }
    if (c->handshake_left == 0)
        become_ready(c);
}

static void on_disconnect(const redisAsyncContext *cac, int status)
{
    (void)status;
    bg_redis_async_t *c = cac->data;
    if (c == NULL)
        return;
    c->ac = NULL;
    if (c->state == ST_CLOSED)
        return;
    connect_failed(c, cac->errstr[0] != '\0' ? cac->errstr : "connection closed");
    c->state = ST_WAIT;
    schedule_reconnect(c);
}

static void on_timer(uv_timer_t *t)
{
    bg_redis_async_t *c = t->data;
    switch (c->state) {
    case ST_WAIT:
        start_connect(c);
        break;
    case ST_CONNECTING:
    case ST_HANDSHAKE:
        connect_failed(c, "connection attempt timed out");
        drop_connection(c);
        break;
    default:
        break;
    }
}

static void schedule_reconnect(bg_redis_async_t *c)
{
    if (c->state == ST_CLOSED)
        return;
    c->state = ST_WAIT;
    int64_t delay = bg__redis_backoff_ms(c->failures, BACKOFF_BASE_MS, BACKOFF_CAP_MS);
    c->failures++;
    uv_timer_start(&c->timer, on_timer, (uint64_t)delay, 0);
}

static void start_connect(bg_redis_async_t *c)
{
    c->state = ST_CONNECTING;
    redisAsyncContext *ac = redisAsyncConnect(c->url.host, c->url.port);
    if (ac == NULL) {
        connect_failed(c, "cannot allocate a connection");
        schedule_reconnect(c);
        return;
    }
    if (ac->err != 0) {
        connect_failed(c, ac->errstr);
        redisAsyncFree(ac);
        schedule_reconnect(c);
        return;
    }
    if (bg_redis_async_attach(ac, c->loop) != 0) {
        connect_failed(c, "cannot attach to the event loop");
        redisAsyncFree(ac);
        schedule_reconnect(c);
        return;
    }
    ac->data = c;
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    c->ac = ac;
    uv_timer_start(&c->timer, on_timer, (uint64_t)c->timeout_ms, 0);
}

bg_redis_async_t *bg_redis_async_new(uv_loop_t *loop, const char *url, int64_t timeout_ms)
{
    if (loop == NULL || timeout_ms <= 0)
        return NULL;
    bg_redis_async_t *c = bg_calloc(1, sizeof(*c));
    if (bg_redis_url_parse(url, &c->url) != 0) {
        free(c);
        return NULL;
    }
    c->loop = loop;
    c->timeout_ms = timeout_ms;
    snprintf(c->desc, sizeof(c->desc), "%s:%d/%d", c->url.host, c->url.port, c->url.db);
    uv_timer_init(loop, &c->timer);
    c->timer.data = c;
    start_connect(c);
    return c;
}

bool bg_redis_async_connected(const bg_redis_async_t *c)
{
    return c != NULL && c->state == ST_READY && c->ac != NULL;
}

static void on_client_closed(uv_handle_t *h)
{
    bg_redis_async_t *c = h->data;
    bg_redis_url_dispose(&c->url);
    free(c);
}

void bg_redis_async_free(bg_redis_async_t *c)
{
    if (c == NULL || c->state == ST_CLOSED)
        return;
    c->state = ST_CLOSED;
    while (c->head != NULL) {
        cmd_t *cmd = c->head;
        detach(cmd);
        cmd->cb(cmd->ud, BG_ERR_CLOSED, NULL);
    }
    redisAsyncContext *ac = c->ac;
    c->ac = NULL;
    if (ac != NULL) {
        ac->data = NULL;
        /* Deferred by hiredis when we are inside one of its callbacks; the callbacks it still runs
         * find their commands done and only release them. */
        redisAsyncFree(ac);
    }
    uv_timer_stop(&c->timer);
    uv_close((uv_handle_t *)&c->timer, on_client_closed);
}
