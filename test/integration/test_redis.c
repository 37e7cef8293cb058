/*
 * The Redis clients against a real redis-server: commands, scripts reloaded after SCRIPT FLUSH,
 * deadlines when the server stops answering, reconnection after a restart, failing fast while it
 * is down, and (async) every callback exactly once, whatever ends the command, with nothing left
 * open on the loop.
 */
#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "bg/err.h"
#include "bg/redis.h"
#include "bg/redis_async.h"
#include "bgtest.h"

static bgt_redis_t srv;

static void setup(void)
{
    signal(SIGPIPE, SIG_IGN);
    cr_assert_eq(bgt_redis_start(&srv), 0, "redis-server did not start");
}

static void teardown(void)
{
    bgt_redis_stop(&srv);
}

TestSuite(redis, .init = setup, .fini = teardown, .timeout = 60);
TestSuite(redis_async, .init = setup, .fini = teardown, .timeout = 60);

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Stops the server and starts it again on the same port (an empty data set, like a crash). */
static void restart_server(void)
{
    kill(srv.pid, SIGCONT);
    bgt_stop(srv.pid, SIGTERM, 3000);
    char port[16];
    snprintf(port, sizeof(port), "%d", srv.port);
    const char *argv[] = {"redis-server", "--port",     port,      "--bind", "127.0.0.1",
                          "--dir",        srv.dir,      "--save",  "",       "--appendonly",
                          "no",           "--loglevel", "warning", NULL};
    char log[300];
    snprintf(log, sizeof(log), "%s/redis.log", srv.dir);
    srv.pid = bgt_spawn(argv, NULL, log);
    cr_assert_gt(srv.pid, 0);
    long long deadline = bgt_now_ms() + 5000;
    for (;;) {
        const char *ping[] = {"redis-cli", "-p", port, "ping", NULL};
        char out[64];
        if (bgt_run(ping, NULL, out, sizeof(out)) == 0 && strstr(out, "PONG") != NULL)
            return;
        cr_assert_lt(bgt_now_ms(), deadline, "redis-server did not come back");
        sleep_ms(20);
    }
}

static bg_redis_t *client(int64_t timeout_ms)
{
    bg_redis_t *r = NULL;
    cr_assert_eq(bg_redis_new(srv.url, timeout_ms, &r), 0);
    return r;
}

/* ---- blocking client ---- */

Test(redis, commands_round_trip_binary_values_and_error_replies)
{
    bg_redis_t *r = client(1000);
    const char *set[] = {"SET", "k", "a\0b"};
    size_t lens[] = {3, 1, 3};
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_argv(r, 3, set, lens, &reply), 0);
    cr_assert_eq(reply->type, REDIS_REPLY_STATUS);
    freeReplyObject(reply);

    cr_assert_eq(bg_redis_command(r, &reply, "GET %s", "k"), 0);
    cr_assert_eq(reply->type, REDIS_REPLY_STRING);
    cr_assert_eq(reply->len, 3);
    cr_assert_eq(memcmp(reply->str, "a\0b", 3), 0);
    freeReplyObject(reply);

    /* an error reply is an answer, not a transport failure */
    cr_assert_eq(bg_redis_command(r, &reply, "LPUSH %s x", "k"), 0);
    cr_assert(bg_redis_reply_is_error(reply, "WRONGTYPE"));
    freeReplyObject(reply);
    cr_assert(bg_redis_is_connected(r));
    bg_redis_free(r);
}

Test(redis, a_pipeline_answers_each_command_in_order_and_fails_whole)
{
    bg_redis_t *r = client(300);
    const char *set[] = {"SET", "p", "1"};
    const char *push[] = {"LPUSH", "p", "x"};
    const char *incr[] = {"INCR", "p"};
    const char *get[] = {"GET", "p"};
    const bg_redis_cmd_t cmds[] = {
        {3, set, NULL}, {3, push, NULL}, {2, incr, NULL}, {2, get, NULL}};
    redisReply *rep[4];
    cr_assert_eq(bg_redis_pipeline(r, 4, cmds, rep), 0);
    cr_assert_eq(rep[0]->type, REDIS_REPLY_STATUS);
    cr_assert(bg_redis_reply_is_error(rep[1], "WRONGTYPE"), "an error reply is that command's");
    cr_assert_eq(rep[2]->type, REDIS_REPLY_INTEGER);
    cr_assert_eq(rep[2]->integer, 2, "and the next ones still ran, in order");
    cr_assert_str_eq(rep[3]->str, "2");
    for (int i = 0; i < 4; i++)
        freeReplyObject(rep[i]);

    /* no answer: a timeout, no reply kept, and the late answers never read as the next ones */
    bgt_redis_pause(&srv, true);
    int rc = bg_redis_pipeline(r, 4, cmds, rep);
    bgt_redis_pause(&srv, false);
    cr_assert_eq(rc, BG_ERR_TIMEOUT, "got %s", bg_strerror(rc));
    for (int i = 0; i < 4; i++)
        cr_assert_null(rep[i]);
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_command(r, &reply, "ECHO %s", "fresh"), 0);
    cr_assert_str_eq(reply->str, "fresh");
    freeReplyObject(reply);
    bg_redis_free(r);
}

Test(redis, script_is_loaded_again_after_script_flush)
{
    bg_redis_t *r = client(1000);
    char sha[41];
    cr_assert_not_null(bg__redis_script_find("lua/dlq_replay.lua", sha));
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_command(r, &reply, "SCRIPT FLUSH"), 0);
    freeReplyObject(reply);

    const char *keys[] = {"bg:{s0}:dlq:t", "bg:{s0}:q:t"};
    const char *args[] = {"1-1", "1000"};
    cr_assert_eq(bg_redis_script(r, "lua/dlq_replay.lua", 2, keys, 2, args, &reply), 0);
    cr_assert_eq(reply->type, REDIS_REPLY_NIL, "type %d (%s)", reply->type,
                 reply->type == REDIS_REPLY_ERROR ? reply->str : "");
    freeReplyObject(reply);

    cr_assert_eq(bg_redis_command(r, &reply, "SCRIPT EXISTS %s", sha), 0);
    cr_assert_eq(reply->type, REDIS_REPLY_ARRAY);
    cr_assert_eq(reply->element[0]->integer, 1, "the script is cached on the server again");
    freeReplyObject(reply);

    cr_assert_eq(bg_redis_script(r, "lua/no_such_script.lua", 0, NULL, 0, NULL, &reply),
                 BG_ERR_NOT_FOUND);
    cr_assert_null(reply);
    bg_redis_free(r);
}

Test(redis, paused_server_gives_timeout_then_recovers)
{
    bg_redis_t *r = client(300);
    cr_assert_eq(bg_redis_command(r, NULL, "PING"), 0);
    bgt_redis_pause(&srv, true);
    long long t0 = bgt_now_ms();
    redisReply *reply = NULL;
    int rc = bg_redis_command(r, &reply, "PING");
    long long took = bgt_now_ms() - t0;
    bgt_redis_pause(&srv, false);
    cr_assert_eq(rc, BG_ERR_TIMEOUT, "got %s", bg_strerror(rc));
    cr_assert_null(reply);
    cr_assert(took >= 250 && took < 2000, "timed out after %lld ms", took);

    /* the late PONG must not be read as the answer to the next command */
    cr_assert_eq(bg_redis_command(r, &reply, "ECHO %s", "fresh"), 0);
    cr_assert_str_eq(reply->str, "fresh");
    freeReplyObject(reply);
    bg_redis_free(r);
}

Test(redis, blocking_read_waits_longer_than_the_command_timeout)
{
    bg_redis_t *r = client(200);
    const char *argv[] = {"BLPOP", "nothing", "1"};
    redisReply *reply = NULL;
    long long t0 = bgt_now_ms();
    cr_assert_eq(bg_redis_argv_block(r, 1000, 3, argv, NULL, &reply), 0);
    cr_assert_eq(reply->type, REDIS_REPLY_NIL);
    cr_assert_geq(bgt_now_ms() - t0, 900);
    freeReplyObject(reply);
    /* and the normal deadline is back afterwards */
    cr_assert_eq(bg_redis_command(r, NULL, "PING"), 0);
    bg_redis_free(r);
}

Test(redis, reconnects_after_server_restart)
{
    bg_redis_t *r = client(500);
    cr_assert_eq(bg_redis_command(r, NULL, "SET %s %s", "before", "1"), 0);
    restart_server();
    /* the first command may fail on the dead connection; the client reconnects on its own */
    long long deadline = bgt_now_ms() + 5000;
    int rc;
    do {
        rc = bg_redis_command(r, NULL, "SET %s %s", "after", "1");
        if (rc != 0)
            sleep_ms(50);
    } while (rc != 0 && bgt_now_ms() < deadline);
    cr_assert_eq(rc, 0, "no reconnection: %s", bg_strerror(rc));
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_command(r, &reply, "GET %s", "after"), 0);
    cr_assert_str_eq(reply->str, "1");
    freeReplyObject(reply);
    bg_redis_free(r);
}

Test(redis, fails_fast_with_backoff_while_down)
{
    bg_redis_t *r = client(1000);
    cr_assert_eq(bg_redis_command(r, NULL, "PING"), 0);
    kill(srv.pid, SIGKILL);
    bgt_wait(srv.pid, 3000);
    srv.pid = 0;
    int rc = bg_redis_command(r, NULL, "PING");
    cr_assert_eq(rc, BG_ERR_UNAVAILABLE, "got %s", bg_strerror(rc));
    /* the reconnection attempt failed too; now calls fail without touching the network */
    rc = bg_redis_command(r, NULL, "PING");
    cr_assert_eq(rc, BG_ERR_UNAVAILABLE);
    cr_assert_gt(bg_redis_retry_in_ms(r), 0);
    long long t0 = bgt_now_ms();
    for (int i = 0; i < 100; i++)
        cr_assert_eq(bg_redis_command(r, NULL, "PING"), BG_ERR_UNAVAILABLE);
    cr_assert_lt(bgt_now_ms() - t0, 100, "calls during the backoff must not block");
    cr_assert_not(bg_redis_is_connected(r));
    bg_redis_free(r);
}

Test(redis, auth_and_db_come_from_the_url)
{
    bg_redis_t *admin = client(1000);
    cr_assert_eq(bg_redis_command(admin, NULL, "CONFIG SET requirepass %s", "s3cret"), 0);
    bg_redis_free(admin);

    char url[200];
    snprintf(url, sizeof(url), "redis://:s3cret@127.0.0.1:%d/2", srv.port);
    bg_redis_t *r = NULL;
    cr_assert_eq(bg_redis_new(url, 1000, &r), 0);
    cr_assert_eq(bg_redis_command(r, NULL, "SET %s %s", "where", "db2"), 0);
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_command(r, &reply, "CLIENT INFO"), 0);
    cr_assert_not_null(strstr(reply->str, " db=2 "), "%s", reply->str);
    freeReplyObject(reply);
    bg_redis_free(r);

    snprintf(url, sizeof(url), "redis://:wrong@127.0.0.1:%d/0", srv.port);
    cr_assert_eq(bg_redis_new(url, 1000, &r), 0);
    cr_assert_eq(bg_redis_connect(r), BG_ERR_DENIED);
    cr_assert_eq(bg_redis_command(r, NULL, "PING"), BG_ERR_UNAVAILABLE, "backoff after refusal");
    bg_redis_free(r);
}

/* ---- async client ---- */

typedef struct st_rec {
    int calls;
    int err;
    int type;
    long long integer;
    char str[512];
    bg_redis_async_t *free_me; /* freed from inside the callback when set */
} rec_t;

static void record(void *ud, int err, const redisReply *reply)
{
    rec_t *rec = ud;
    rec->calls++;
    rec->err = err;
    cr_assert_eq(err == 0, reply != NULL, "reply present exactly when err is 0");
    if (reply != NULL) {
        rec->type = reply->type;
        rec->integer = reply->integer;
        if (reply->str != NULL)
            snprintf(rec->str, sizeof(rec->str), "%s", reply->str);
    }
    if (rec->free_me != NULL) {
        bg_redis_async_t *c = rec->free_me;
        rec->free_me = NULL;
        bg_redis_async_free(c);
    }
}

typedef struct st_loop {
    uv_loop_t loop;
    uv_timer_t tick; /* keeps UV_RUN_ONCE from sleeping forever */
} loop_t;

static void on_tick(uv_timer_t *t)
{
    (void)t;
}

static void loop_init(loop_t *l)
{
    cr_assert_eq(uv_loop_init(&l->loop), 0);
    uv_timer_init(&l->loop, &l->tick);
    uv_timer_start(&l->tick, on_tick, 5, 5);
}

/* Runs the loop for ms milliseconds. */
static void run_for(loop_t *l, int ms)
{
    long long deadline = bgt_now_ms() + ms;
    while (bgt_now_ms() < deadline)
        uv_run(&l->loop, UV_RUN_ONCE);
}

/* Runs the loop until *flag is true or ms pass; returns *flag. */
static bool run_until(loop_t *l, const bool *flag, int ms)
{
    long long deadline = bgt_now_ms() + ms;
    while (!*flag && bgt_now_ms() < deadline)
        uv_run(&l->loop, UV_RUN_ONCE);
    return *flag;
}

static bool run_until_calls(loop_t *l, const rec_t *rec, int calls, int ms)
{
    long long deadline = bgt_now_ms() + ms;
    while (rec->calls < calls && bgt_now_ms() < deadline)
        uv_run(&l->loop, UV_RUN_ONCE);
    return rec->calls >= calls;
}

static bool wait_connected(loop_t *l, bg_redis_async_t *c, int ms)
{
    long long deadline = bgt_now_ms() + ms;
    while (!bg_redis_async_connected(c) && bgt_now_ms() < deadline)
        uv_run(&l->loop, UV_RUN_ONCE);
    return bg_redis_async_connected(c);
}

/* Closes the loop and checks that nothing was left open (handles, memory is ASan's part). */
static void loop_close(loop_t *l)
{
    uv_close((uv_handle_t *)&l->tick, NULL);
    uv_run(&l->loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_loop_close(&l->loop), 0, "handles left open on the loop");
}

static int send_cmd(bg_redis_async_t *c, rec_t *rec, const char *a0, const char *a1, const char *a2)
{
    const char *argv[] = {a0, a1, a2};
    int argc = a1 == NULL ? 1 : a2 == NULL ? 2 : 3;
    return bg_redis_async_argv(c, record, rec, argc, argv, NULL);
}

Test(redis_async, commands_run_and_each_callback_runs_once)
{
    loop_t l;
    loop_init(&l);
    bg_redis_async_t *c = bg_redis_async_new(&l.loop, srv.url, 1000);
    cr_assert_not_null(c);
    cr_assert(wait_connected(&l, c, 3000));
    rec_t set = {0}, get = {0}, bad = {0};
    cr_assert_eq(send_cmd(c, &set, "SET", "greeting", "hello"), 0);
    cr_assert_eq(send_cmd(c, &get, "GET", "greeting", NULL), 0);
    cr_assert_eq(send_cmd(c, &bad, "NOSUCHCOMMAND", NULL, NULL), 0);
    cr_assert(run_until_calls(&l, &bad, 1, 3000));
    run_for(&l, 50);
    cr_assert_eq(set.calls, 1);
    cr_assert_eq(set.err, 0);
    cr_assert_eq(get.calls, 1);
    cr_assert_str_eq(get.str, "hello");
    cr_assert_eq(bad.calls, 1);
    cr_assert_eq(bad.err, 0);
    cr_assert_eq(bad.type, REDIS_REPLY_ERROR);
    cr_assert_eq(bg_redis_async_argv(c, record, &set, 0, NULL, NULL), BG_ERR_INVALID);
    bg_redis_async_free(c);
    loop_close(&l);
}

Test(redis_async, output_larger_than_the_socket_takes_goes_out_whole_in_order)
{
    loop_t l;
    loop_init(&l);
    bg_redis_async_t *c = bg_redis_async_new(&l.loop, srv.url, 5000);
    cr_assert_not_null(c);
    cr_assert(wait_connected(&l, c, 3000));
    /* 16 MiB in one loop turn: more than the socket buffers take, so the rest of the write waits
     * for the socket to drain; the commands queued behind it come after it, in order */
    size_t big = 16u << 20;
    char *value = malloc(big + 1);
    memset(value, 'v', big);
    value[big] = '\0';
    rec_t set = {0}, len = {0}, after = {0};
    const char *argv[] = {"SET", "big", value};
    const size_t lens[] = {3, 3, big};
    cr_assert_eq(bg_redis_async_argv(c, record, &set, 3, argv, lens), 0);
    cr_assert_eq(send_cmd(c, &len, "STRLEN", "big", NULL), 0);
    cr_assert_eq(send_cmd(c, &after, "ECHO", "after", NULL), 0);
    cr_assert(run_until_calls(&l, &after, 1, 10000));
    cr_assert_eq(set.calls, 1);
    cr_assert_eq(set.err, 0);
    cr_assert_eq(len.integer, (long long)big, "the whole value arrived");
    cr_assert_str_eq(after.str, "after");
    free(value);
    bg_redis_async_free(c);
    loop_close(&l);
}

Test(redis_async, script_is_loaded_again_after_script_flush)
{
    bg_redis_t *r = client(1000);
    cr_assert_eq(bg_redis_command(r, NULL, "XADD %s * job_id j1 dlq_error boom", "bg:{s0}:dlq:t"),
                 0);
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_command(r, &reply, "XRANGE %s - +", "bg:{s0}:dlq:t"), 0);
    char id[64];
    snprintf(id, sizeof(id), "%s", reply->element[0]->element[0]->str);
    freeReplyObject(reply);
    cr_assert_eq(bg_redis_command(r, NULL, "SCRIPT FLUSH"), 0);

    loop_t l;
    loop_init(&l);
    bg_redis_async_t *c = bg_redis_async_new(&l.loop, srv.url, 1000);
    cr_assert(wait_connected(&l, c, 3000));
    rec_t rec = {0};
    const char *keys[] = {"bg:{s0}:dlq:t", "bg:{s0}:q:t"};
    const char *args[] = {id, "1000"};
    cr_assert_eq(bg_redis_async_script(c, record, &rec, "lua/dlq_replay.lua", 2, keys, 2, args), 0);
    cr_assert(run_until_calls(&l, &rec, 1, 3000));
    cr_assert_eq(rec.err, 0);
    cr_assert_eq(rec.type, REDIS_REPLY_STRING, "got type %d: %s", rec.type, rec.str);
    cr_assert_eq(bg_redis_async_script(c, record, &rec, "lua/none.lua", 0, NULL, 0, NULL),
                 BG_ERR_NOT_FOUND);
    run_for(&l, 50);
    cr_assert_eq(rec.calls, 1);

    /* the job went back to its stream, without the dead-letter fields */
    cr_assert_eq(bg_redis_command(r, &reply, "XRANGE %s - +", "bg:{s0}:q:t"), 0);
    cr_assert_eq(reply->elements, 1);
    cr_assert_eq(reply->element[0]->element[1]->elements, 2);
    freeReplyObject(reply);
    bg_redis_free(r);
    bg_redis_async_free(c);
    loop_close(&l);
}

Test(redis_async, paused_server_times_out_with_one_callback)
{
    loop_t l;
    loop_init(&l);
    bg_redis_async_t *c = bg_redis_async_new(&l.loop, srv.url, 300);
    cr_assert(wait_connected(&l, c, 3000));
    bgt_redis_pause(&srv, true);
    rec_t rec = {0};
    long long t0 = bgt_now_ms();
    cr_assert_eq(send_cmd(c, &rec, "PING", NULL, NULL), 0);
    cr_assert(run_until_calls(&l, &rec, 1, 3000));
    long long took = bgt_now_ms() - t0;
    cr_assert_eq(rec.err, BG_ERR_TIMEOUT);
    cr_assert(took >= 250 && took < 2000, "timed out after %lld ms", took);
    /* the server answers late: the answer must go nowhere */
    bgt_redis_pause(&srv, false);
    run_for(&l, 500);
    cr_assert_eq(rec.calls, 1);

    /* and the client is usable again */
    cr_assert(wait_connected(&l, c, 5000));
    rec_t after = {0};
    long long deadline = bgt_now_ms() + 5000;
    while (after.calls == 0 || after.err != 0) {
        cr_assert_lt(bgt_now_ms(), deadline, "no working command after resume");
        after.calls = 0;
        if (send_cmd(c, &after, "ECHO", "back", NULL) == 0)
            run_until_calls(&l, &after, 1, 2000);
        else
            run_for(&l, 50);
    }
    cr_assert_str_eq(after.str, "back");
    bg_redis_async_free(c);
    loop_close(&l);
}

Test(redis_async, reconnects_after_server_restart)
{
    loop_t l;
    loop_init(&l);
    bg_redis_async_t *c = bg_redis_async_new(&l.loop, srv.url, 500);
    cr_assert(wait_connected(&l, c, 3000));
    restart_server();
    long long deadline = bgt_now_ms() + 8000;
    rec_t rec = {0};
    while (rec.calls == 0 || rec.err != 0) {
        cr_assert_lt(bgt_now_ms(), deadline, "no reconnection");
        rec.calls = 0;
        if (send_cmd(c, &rec, "SET", "after", "restart") == 0)
            run_until_calls(&l, &rec, 1, 2000);
        else
            run_for(&l, 20);
    }
    cr_assert(bg_redis_async_connected(c));
    bg_redis_async_free(c);
    loop_close(&l);
}

Test(redis_async, fails_fast_while_down_without_calling_back)
{
    loop_t l;
    loop_init(&l);
    bg_redis_async_t *c = bg_redis_async_new(&l.loop, srv.url, 1000);
    cr_assert(wait_connected(&l, c, 3000));
    kill(srv.pid, SIGKILL);
    bgt_wait(srv.pid, 3000);
    srv.pid = 0;
    bool down = false;
    long long deadline = bgt_now_ms() + 3000;
    while (!down && bgt_now_ms() < deadline) {
        uv_run(&l.loop, UV_RUN_ONCE);
        down = !bg_redis_async_connected(c);
    }
    cr_assert(down, "the client did not notice the server went away");
    rec_t rec = {0};
    long long t0 = bgt_now_ms();
    cr_assert_eq(send_cmd(c, &rec, "PING", NULL, NULL), BG_ERR_UNAVAILABLE);
    cr_assert_lt(bgt_now_ms() - t0, 20);
    run_for(&l, 300); /* reconnection attempts go on meanwhile */
    cr_assert_eq(rec.calls, 0, "a function that returns an error never calls its callback");
    cr_assert_eq(send_cmd(c, &rec, "PING", NULL, NULL), BG_ERR_UNAVAILABLE);
    bg_redis_async_free(c);
    loop_close(&l);
}

Test(redis_async, never_connected_client_fails_fast_and_frees_cleanly)
{
    loop_t l;
    loop_init(&l);
    char url[64];
    snprintf(url, sizeof(url), "redis://127.0.0.1:%d/0", bgt_free_port());
    bg_redis_async_t *c = bg_redis_async_new(&l.loop, url, 200);
    cr_assert_not_null(c);
    run_for(&l, 300);
    rec_t rec = {0};
    cr_assert_eq(send_cmd(c, &rec, "PING", NULL, NULL), BG_ERR_UNAVAILABLE);
    cr_assert_null(bg_redis_async_new(&l.loop, "http://nope", 200));
    bg_redis_async_free(c);
    bg_redis_async_free(NULL);
    loop_close(&l);
    cr_assert_eq(rec.calls, 0);
}

Test(redis_async, free_with_pending_commands_calls_each_back_closed)
{
    loop_t l;
    loop_init(&l);
    bg_redis_async_t *c = bg_redis_async_new(&l.loop, srv.url, 2000);
    cr_assert(wait_connected(&l, c, 3000));
    bgt_redis_pause(&srv, true);
    rec_t recs[3] = {{0}};
    for (int i = 0; i < 3; i++)
        cr_assert_eq(send_cmd(c, &recs[i], "PING", NULL, NULL), 0);
    run_for(&l, 50); /* the commands are on the wire */
    bg_redis_async_free(c);
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(recs[i].calls, 1);
        cr_assert_eq(recs[i].err, BG_ERR_CLOSED);
    }
    bgt_redis_pause(&srv, false);
    loop_close(&l);
    for (int i = 0; i < 3; i++)
        cr_assert_eq(recs[i].calls, 1);
}

Test(redis_async, free_from_inside_a_callback)
{
    loop_t l;
    loop_init(&l);
    bg_redis_async_t *c = bg_redis_async_new(&l.loop, srv.url, 2000);
    cr_assert(wait_connected(&l, c, 3000));
    rec_t first = {0}, second = {0}, third = {0};
    first.free_me = c;
    cr_assert_eq(send_cmd(c, &first, "PING", NULL, NULL), 0);
    cr_assert_eq(send_cmd(c, &second, "PING", NULL, NULL), 0);
    cr_assert_eq(send_cmd(c, &third, "PING", NULL, NULL), 0);
    cr_assert(run_until_calls(&l, &third, 1, 3000));
    cr_assert_eq(first.calls, 1);
    cr_assert_eq(first.err, 0);
    /* the replies of the others may have been read in the same batch: they come back as closed */
    cr_assert_eq(second.calls, 1);
    cr_assert_eq(second.err, BG_ERR_CLOSED);
    cr_assert_eq(third.err, BG_ERR_CLOSED);
    loop_close(&l);
}

Test(redis_async, disconnect_with_pending_commands_calls_each_back_unavailable)
{
    loop_t l;
    loop_init(&l);
    bg_redis_async_t *c = bg_redis_async_new(&l.loop, srv.url, 5000);
    cr_assert(wait_connected(&l, c, 3000));
    bgt_redis_pause(&srv, true);
    rec_t recs[3] = {{0}};
    for (int i = 0; i < 3; i++)
        cr_assert_eq(send_cmd(c, &recs[i], "PING", NULL, NULL), 0);
    run_for(&l, 50);
    kill(srv.pid, SIGKILL); /* works on a stopped process: the connection is reset */
    bgt_wait(srv.pid, 3000);
    srv.pid = 0;
    cr_assert(run_until_calls(&l, &recs[2], 1, 3000));
    run_for(&l, 100);
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(recs[i].calls, 1);
        cr_assert_eq(recs[i].err, BG_ERR_UNAVAILABLE, "got %s", bg_strerror(recs[i].err));
    }
    cr_assert_not(bg_redis_async_connected(c));
    bg_redis_async_free(c);
    loop_close(&l);
    for (int i = 0; i < 3; i++)
        cr_assert_eq(recs[i].calls, 1);
}

static void done_flag(void *ud, int err, const redisReply *reply)
{
    (void)err;
    (void)reply;
    *(bool *)ud = true;
}

Test(redis_async, auth_and_db_come_from_the_url)
{
    bg_redis_t *admin = client(1000);
    cr_assert_eq(bg_redis_command(admin, NULL, "CONFIG SET requirepass %s", "s3cret"), 0);
    bg_redis_free(admin);
    loop_t l;
    loop_init(&l);
    char url[200];
    snprintf(url, sizeof(url), "redis://:s3cret@127.0.0.1:%d/3", srv.port);
    bg_redis_async_t *c = bg_redis_async_new(&l.loop, url, 1000);
    cr_assert(wait_connected(&l, c, 3000));
    rec_t rec = {0};
    cr_assert_eq(send_cmd(c, &rec, "CLIENT", "INFO", NULL), 0);
    cr_assert(run_until_calls(&l, &rec, 1, 3000));
    cr_assert_eq(rec.err, 0);
    cr_assert_not_null(strstr(rec.str, " db=3 "), "%s", rec.str);
    bool done = false;
    const char *argv[] = {"PING"};
    cr_assert_eq(bg_redis_async_argv(c, done_flag, &done, 1, argv, NULL), 0);
    cr_assert(run_until(&l, &done, 3000));
    bg_redis_async_free(c);

    /* a wrong password never becomes ready */
    snprintf(url, sizeof(url), "redis://:wrong@127.0.0.1:%d/0", srv.port);
    c = bg_redis_async_new(&l.loop, url, 1000);
    run_for(&l, 300);
    cr_assert_not(bg_redis_async_connected(c));
    bg_redis_async_free(c);
    loop_close(&l);
}
