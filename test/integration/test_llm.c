/*
 * The streaming LLM client against the bundled demo provider (bg-demo-llm): deltas and usage,
 * retries with retry-after, the fallback, each timeout, cut and malformed streams, cancel with the
 * provider's usage, many streams on one loop, and free with calls in flight. Every test ends with
 * nothing left open on its loop.
 */
#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "bg/err.h"
#include "bg/llm.h"
#include "bg/timeutil.h"
#include "bgtest.h"

static pid_t demo_pid;
static char demo_url[128];

static void setup(void)
{
    signal(SIGPIPE, SIG_IGN);
    int port = bgt_free_port();
    char ports[16];
    snprintf(ports, sizeof(ports), "%d", port);
    const char *argv[] = {bgt_bin("bg-demo-llm"), "--port", ports, NULL};
    demo_pid = bgt_spawn(argv, NULL, NULL);
    cr_assert_gt(demo_pid, 0, "bg-demo-llm did not start");
    snprintf(demo_url, sizeof(demo_url), "http://127.0.0.1:%d/v1", port);
    char models[160];
    snprintf(models, sizeof(models), "%s/models", demo_url);
    cr_assert_eq(bgt_wait_http(models, 200, 10000), 0, "bg-demo-llm does not answer");
}

static void teardown(void)
{
    if (demo_pid > 0)
        bgt_stop(demo_pid, SIGTERM, 3000);
}

TestSuite(llm, .init = setup, .fini = teardown, .timeout = 60);

/* What one call saw. */
typedef struct seen {
    char text[16384];
    size_t len;
    int deltas;
    int deltas_after_cancel;
    int done;
    bg_llm_result_t res;
    int cancel_after; /* cancel in the delta callback after this many deltas; 0: never */
    bg_llm_call_t *call;
    bool canceled;
    bg_llm_t *free_from_delta; /* free the client from the first delta */
} seen_t;

static void on_delta(void *ud, const char *text, size_t len)
{
    seen_t *s = ud;
    cr_assert_eq(s->done, 0, "delta after done");
    cr_assert_eq(text[len], '\0');
    if (s->canceled)
        s->deltas_after_cancel++;
    s->deltas++;
    if (s->len + len < sizeof(s->text)) {
        memcpy(s->text + s->len, text, len);
        s->len += len;
        s->text[s->len] = '\0';
    }
    if (s->cancel_after > 0 && s->deltas == s->cancel_after) {
        s->canceled = true;
        bg_llm_cancel(s->call);
        bg_llm_cancel(s->call); /* twice is harmless */
    }
    if (s->free_from_delta != NULL) {
        bg_llm_t *llm = s->free_from_delta;
        s->free_from_delta = NULL;
        bg_llm_free(llm);
    }
}

static void on_done(void *ud, const bg_llm_result_t *res)
{
    seen_t *s = ud;
    s->done++;
    s->res = *res;
}

static const bg_llm_callbacks_t cbs = {.on_delta = on_delta, .on_done = on_done};

static bg_llm_config_t base_config(void)
{
    bg_llm_config_t cfg = {
        .base_url = demo_url,
        .api_key = "sk-test",
        .connect_timeout_ms = 2000,
        .first_token_timeout_ms = 5000,
        .idle_timeout_ms = 5000,
        .total_timeout_ms = 30000,
        .max_retries = 2,
        .backoff_base_ms = 20,
        .backoff_cap_ms = 100,
    };
    return cfg;
}

/* A messages array with one user message (content must be JSON-safe). */
static const char *messages(const char *content)
{
    static char buf[512];
    snprintf(buf, sizeof(buf),
             "[{\"role\":\"system\",\"content\":\"Be brief.\"},"
             "{\"role\":\"user\",\"content\":\"%s\"}]",
             content);
    return buf;
}

static bg_llm_call_t *start(bg_llm_t *llm, const char *content, seen_t *s)
{
    bg_llm_request_t req = {.model = "demo-1",
                            .messages_json = messages(content),
                            .temperature = 0.5,
                            .include_usage = true};
    bg_llm_call_t *call = NULL;
    cr_assert_eq(bg_llm_stream(llm, &req, &cbs, s, &call), 0);
    cr_assert_not_null(call);
    s->call = call;
    return call;
}

/* Frees the client (when not freed yet), runs the loop dry and checks that nothing was left. */
static void finish_loop(uv_loop_t *loop, bg_llm_t *llm)
{
    bg_llm_free(llm);
    cr_assert_eq(uv_run(loop, UV_RUN_DEFAULT), 0);
    cr_assert_eq(uv_loop_close(loop), 0, "handles left open on the loop");
}

/* One call with the given config and message, run to its end. */
static void run_one(const bg_llm_config_t *cfg, const char *content, seen_t *s)
{
    uv_loop_t loop;
    cr_assert_eq(uv_loop_init(&loop), 0);
    bg_llm_t *llm = NULL;
    cr_assert_eq(bg_llm_new(&loop, cfg, &llm), 0);
    start(llm, content, s);
    cr_assert_eq(s->done, 0, "no callback from inside bg_llm_stream");
    (void)uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(s->done, 1, "done exactly once");
    finish_loop(&loop, llm);
}

Test(llm, stream_delivers_all_deltas_and_provider_usage)
{
    bg_llm_config_t cfg = base_config();
    seen_t s = {0};
    run_one(&cfg, "hello there", &s);
    cr_assert_eq(s.res.error, BG_LLM_OK, "error %s: %s", bg_llm_error_name(s.res.error),
                 s.res.detail);
    cr_assert_eq(s.res.status, 0);
    cr_assert_eq(s.res.http_status, 200);
    cr_assert_str_eq(s.res.finish_reason, "stop");
    cr_assert(strncmp(s.text, "Echo: hello there", 17) == 0, "text: %s", s.text);
    cr_assert_gt(s.deltas, 5);
    cr_assert_eq(s.res.text_bytes, s.len);
    cr_assert(s.res.first_token);
    cr_assert_eq(s.res.usage.source, BG_LLM_USAGE_PROVIDER);
    /* the demo counts one completion token per delta it sends, prompt tokens as words */
    cr_assert_eq(s.res.usage.completion_tokens, (uint64_t)s.deltas);
    cr_assert_eq(s.res.usage.prompt_tokens, 4);
    cr_assert_eq(s.res.retries, 0);
    cr_assert_eq(s.res.provider, BG_LLM_PRIMARY);
    cr_assert_leq(s.res.ttft_ms, s.res.latency_ms);
}

Test(llm, without_include_usage_the_count_is_estimated)
{
    uv_loop_t loop;
    cr_assert_eq(uv_loop_init(&loop), 0);
    bg_llm_config_t cfg = base_config();
    bg_llm_t *llm = NULL;
    cr_assert_eq(bg_llm_new(&loop, &cfg, &llm), 0);
    seen_t s = {0};
    bg_llm_request_t req = {.model = "demo-1", .messages_json = messages("hi"), .temperature = -1};
    cr_assert_eq(bg_llm_stream(llm, &req, &cbs, &s, NULL), 0);
    (void)uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(s.done, 1);
    cr_assert_eq(s.res.error, BG_LLM_OK, "%s", s.res.detail);
    cr_assert_eq(s.res.usage.source, BG_LLM_USAGE_ESTIMATED);
    cr_assert_eq(s.res.usage.completion_tokens, (s.len + 3) / 4, "ASCII text: chars are bytes");
    finish_loop(&loop, llm);
}

Test(llm, dead_primary_is_retried_then_fallback_serves)
{
    bg_llm_config_t cfg = base_config();
    char dead[128];
    snprintf(dead, sizeof(dead), "http://127.0.0.1:%d/v1", bgt_free_port());
    cfg.base_url = dead;
    cfg.api_key = "sk-primary";
    cfg.fallback_base_url = demo_url;
    cfg.fallback_api_key = "sk-fallback";
    seen_t s = {0};
    run_one(&cfg, "fall back", &s);
    cr_assert_eq(s.res.error, BG_LLM_OK, "error %s: %s", bg_llm_error_name(s.res.error),
                 s.res.detail);
    cr_assert_eq(s.res.provider, BG_LLM_FALLBACK);
    cr_assert_eq(s.res.retries, 3, "two retries on the primary, then the fallback once");
    cr_assert(strncmp(s.text, "Echo: fall back", 15) == 0);
}

Test(llm, server_error_is_retried_and_reported)
{
    bg_llm_config_t cfg = base_config();
    cfg.fallback_base_url = demo_url;
    seen_t s = {0};
    run_one(&cfg, "please #fail:500", &s);
    cr_assert_eq(s.res.error, BG_LLM_ERR_SERVER_ERROR, "%s", bg_llm_error_name(s.res.error));
    cr_assert_eq(s.res.status, BG_ERR_UNAVAILABLE);
    cr_assert_eq(s.res.http_status, 500);
    cr_assert_eq(s.res.retries, 3);
    cr_assert_eq(s.res.provider, BG_LLM_FALLBACK);
    cr_assert_not(s.res.first_token, "nothing delivered: the caller refunds");
    cr_assert_eq(s.deltas, 0);
    cr_assert(strstr(s.res.detail, "http 500") != NULL, "detail: %s", s.res.detail);
    cr_assert(strstr(s.res.detail, "sk-test") == NULL);
}

Test(llm, client_error_is_not_retried)
{
    bg_llm_config_t cfg = base_config();
    seen_t s = {0};
    run_one(&cfg, "please #fail:400", &s);
    cr_assert_eq(s.res.error, BG_LLM_ERR_CLIENT_ERROR, "%s", bg_llm_error_name(s.res.error));
    cr_assert_eq(s.res.http_status, 400);
    cr_assert_eq(s.res.retries, 0);
}

Test(llm, rate_limit_honours_retry_after)
{
    bg_llm_config_t cfg = base_config();
    cfg.max_retries = 1;
    cfg.backoff_base_ms = 1;
    cfg.backoff_cap_ms = 1;
    seen_t s = {0};
    run_one(&cfg, "busy #fail:429", &s);
    cr_assert_eq(s.res.error, BG_LLM_ERR_RATE_LIMITED, "%s", bg_llm_error_name(s.res.error));
    cr_assert_eq(s.res.status, BG_ERR_RETRY);
    cr_assert_eq(s.res.http_status, 429);
    cr_assert_eq(s.res.retries, 1);
    cr_assert_geq(s.res.latency_ms, 990, "waited retry-after: 1 (took %llu ms)",
                  (unsigned long long)s.res.latency_ms);
    cr_assert_lt(s.res.latency_ms, 5000);
}

Test(llm, retry_after_is_capped)
{
    bg_llm_config_t cfg = base_config();
    cfg.max_retries = 1;
    cfg.retry_after_cap_ms = 100;
    seen_t s = {0};
    run_one(&cfg, "busy #fail:429", &s);
    cr_assert_eq(s.res.retries, 1);
    cr_assert_lt(s.res.latency_ms, 900, "took %llu ms", (unsigned long long)s.res.latency_ms);
}

Test(llm, hang_ends_with_first_token_timeout)
{
    bg_llm_config_t cfg = base_config();
    cfg.first_token_timeout_ms = 400;
    seen_t s = {0};
    run_one(&cfg, "wait #fail:hang", &s);
    cr_assert_eq(s.res.error, BG_LLM_ERR_TIMEOUT_FIRST_TOKEN, "%s", bg_llm_error_name(s.res.error));
    cr_assert_eq(s.res.status, BG_ERR_TIMEOUT);
    cr_assert_eq(s.res.retries, 0);
    cr_assert_geq(s.res.latency_ms, 390);
    cr_assert_lt(s.res.latency_ms, 3000);
}

Test(llm, total_timeout_bounds_the_call)
{
    bg_llm_config_t cfg = base_config();
    cfg.total_timeout_ms = 300;
    seen_t s = {0};
    run_one(&cfg, "wait #fail:hang", &s);
    cr_assert_eq(s.res.error, BG_LLM_ERR_TIMEOUT_TOTAL, "%s", bg_llm_error_name(s.res.error));
}

Test(llm, slow_tokens_end_with_idle_timeout)
{
    bg_llm_config_t cfg = base_config();
    cfg.idle_timeout_ms = 300;
    seen_t s = {0};
    run_one(&cfg, "slowly #fail:slow=1000", &s);
    cr_assert_eq(s.res.error, BG_LLM_ERR_TIMEOUT_IDLE, "%s", bg_llm_error_name(s.res.error));
    cr_assert(s.res.first_token);
    cr_assert_geq(s.deltas, 1);
    cr_assert_eq(s.res.retries, 0, "never retried after a delta");
    cr_assert_eq(s.res.usage.source, BG_LLM_USAGE_ESTIMATED);
    cr_assert_eq(s.res.usage.completion_tokens, (s.len + 3) / 4);
}

Test(llm, cut_stream_keeps_the_partial_text)
{
    bg_llm_config_t cfg = base_config();
    seen_t s = {0};
    run_one(&cfg, "partial #fail:cut=3", &s);
    cr_assert_eq(s.res.error, BG_LLM_ERR_CUT, "%s: %s", bg_llm_error_name(s.res.error),
                 s.res.detail);
    cr_assert_eq(s.res.status, BG_ERR_PROTOCOL);
    cr_assert_eq(s.deltas, 3);
    cr_assert(strncmp(s.text, "Echo: ", 6) == 0, "text: %s", s.text);
    cr_assert_eq(s.res.retries, 0);
    cr_assert(s.res.first_token);
    cr_assert_eq(s.res.usage.source, BG_LLM_USAGE_ESTIMATED);
}

Test(llm, malformed_chunk_ends_the_call)
{
    bg_llm_config_t cfg = base_config();
    seen_t s = {0};
    run_one(&cfg, "broken #fail:malformed=2", &s);
    cr_assert_eq(s.res.error, BG_LLM_ERR_MALFORMED, "%s", bg_llm_error_name(s.res.error));
    cr_assert_eq(s.res.status, BG_ERR_PROTOCOL);
    cr_assert_eq(s.deltas, 2);
    cr_assert_eq(s.res.retries, 0);
}

Test(llm, error_event_mid_stream_is_a_server_error)
{
    bg_llm_config_t cfg = base_config();
    seen_t s = {0};
    run_one(&cfg, "oops #fail:error=2", &s);
    cr_assert_eq(s.res.error, BG_LLM_ERR_SERVER_ERROR, "%s", bg_llm_error_name(s.res.error));
    cr_assert_eq(s.deltas, 2);
    cr_assert_eq(s.res.retries, 0, "never retried after a delta");
}

Test(llm, cancel_stops_deltas_and_keeps_provider_usage)
{
    bg_llm_config_t cfg = base_config();
    seen_t s = {.cancel_after = 3};
    run_one(&cfg, "long answer #fail:slow=10", &s);
    cr_assert_eq(s.res.error, BG_LLM_ERR_CANCELED, "%s", bg_llm_error_name(s.res.error));
    cr_assert_eq(s.res.status, 0);
    cr_assert_eq(s.deltas, 3);
    cr_assert_eq(s.deltas_after_cancel, 0);
    cr_assert_eq(s.res.usage.source, BG_LLM_USAGE_PROVIDER, "usage read to the end");
    cr_assert_gt(s.res.usage.completion_tokens, 3, "the provider generated the whole answer");
}

Test(llm, cancel_of_a_hung_call_ends_at_the_drain_bound)
{
    bg_llm_config_t cfg = base_config();
    cfg.cancel_drain_ms = 300;
    cfg.first_token_timeout_ms = 20000;
    uv_loop_t loop;
    cr_assert_eq(uv_loop_init(&loop), 0);
    bg_llm_t *llm = NULL;
    cr_assert_eq(bg_llm_new(&loop, &cfg, &llm), 0);
    seen_t s = {0};
    bg_llm_call_t *call = start(llm, "wait #fail:hang", &s);
    for (int i = 0; i < 20; i++)
        (void)uv_run(&loop, UV_RUN_NOWAIT);
    bg_llm_cancel(call);
    cr_assert_eq(s.done, 0, "no callback from inside bg_llm_cancel");
    (void)uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(s.done, 1);
    cr_assert_eq(s.res.error, BG_LLM_ERR_CANCELED);
    cr_assert_eq(s.res.usage.source, BG_LLM_USAGE_ESTIMATED);
    cr_assert_lt(s.res.latency_ms, 5000);
    finish_loop(&loop, llm);
}

Test(llm, abort_ends_at_once_even_when_a_cancel_would_drain)
{
    bg_llm_config_t cfg = base_config();
    cfg.cancel_drain_ms = 20000; /* a cancel would wait this long for the hung provider */
    cfg.first_token_timeout_ms = 20000;
    uv_loop_t loop;
    cr_assert_eq(uv_loop_init(&loop), 0);
    bg_llm_t *llm = NULL;
    cr_assert_eq(bg_llm_new(&loop, &cfg, &llm), 0);
    seen_t s = {0};
    bg_llm_call_t *call = start(llm, "wait #fail:hang", &s);
    for (int i = 0; i < 20; i++)
        (void)uv_run(&loop, UV_RUN_NOWAIT);
    bg_llm_cancel(call); /* draining... */
    bg_llm_abort(call);  /* ...cut short */
    bg_llm_abort(call);  /* twice is harmless */
    cr_assert_eq(s.done, 0, "no callback from inside bg_llm_abort");
    uint64_t t0 = bg_timeutil_mono_ms();
    (void)uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(s.done, 1);
    cr_assert_eq(s.res.error, BG_LLM_ERR_CANCELED);
    cr_assert_eq(s.res.usage.source, BG_LLM_USAGE_ESTIMATED);
    cr_assert_lt(bg_timeutil_mono_ms() - t0, 2000, "ended without the 20 s drain");
    finish_loop(&loop, llm);
}

Test(llm, a_request_is_known_sent_before_any_answer)
{
    bg_llm_config_t cfg = base_config();
    uv_loop_t loop;
    cr_assert_eq(uv_loop_init(&loop), 0);
    bg_llm_t *llm = NULL;
    cr_assert_eq(bg_llm_new(&loop, &cfg, &llm), 0);
    for (int round = 0; round < 2; round++) {
        seen_t s = {0};
        bg_llm_call_t *call = start(llm, "wait #fail:hang", &s);
        cr_assert_not(bg_llm_sent(call), "nothing is sent before the loop runs");
        int turns = 0;
        while (!bg_llm_sent(call) && turns < 1000) {
            (void)uv_run(&loop, UV_RUN_NOWAIT);
            turns++;
        }
        cr_assert(bg_llm_sent(call), "the request went out in %d turns of the loop", turns);
        cr_log_info("request sent after %d turn(s) of the loop", turns);
        cr_assert_eq(s.deltas, 0, "and the hung provider has not answered");
        bg_llm_abort(call);
        while (s.done == 0)
            (void)uv_run(&loop, UV_RUN_ONCE);
        cr_assert_eq(s.res.error, BG_LLM_ERR_CANCELED);
    }
    finish_loop(&loop, llm);
}

Test(llm, calls_one_after_another_reuse_one_connection)
{
    bg_llm_config_t cfg = base_config();
    uv_loop_t loop;
    cr_assert_eq(uv_loop_init(&loop), 0);
    bg_llm_t *llm = NULL;
    cr_assert_eq(bg_llm_new(&loop, &cfg, &llm), 0);
    for (int i = 0; i < 3; i++) {
        seen_t s = {0};
        start(llm, "again and again", &s);
        (void)uv_run(&loop, UV_RUN_DEFAULT);
        cr_assert_eq(s.done, 1);
        cr_assert_eq(s.res.error, BG_LLM_OK, "%s", s.res.detail);
        cr_assert_eq(s.res.usage.source, BG_LLM_USAGE_PROVIDER);
        /* read to the end of the body, not just to [DONE]: the connection stays reusable */
        cr_assert_eq(s.res.connects, i == 0 ? 1u : 0u, "call %d opened %u connection(s)", i,
                     s.res.connects);
    }
    finish_loop(&loop, llm);
}

Test(llm, a_body_that_does_not_end_after_done_ends_the_call_soon_and_well)
{
    bg_llm_config_t cfg = base_config();
    cfg.idle_timeout_ms = 20000; /* what the call would wait without the [DONE] grace */
    seen_t s = {0};
    uint64_t t0 = bg_timeutil_mono_ms();
    run_one(&cfg, "then linger #fail:linger", &s);
    uint64_t took = bg_timeutil_mono_ms() - t0;
    cr_assert_eq(s.res.error, BG_LLM_OK, "%s: %s", bg_llm_error_name(s.res.error), s.res.detail);
    cr_assert_str_eq(s.res.finish_reason, "stop");
    cr_assert_eq(s.res.usage.source, BG_LLM_USAGE_PROVIDER);
    cr_assert(strncmp(s.text, "Echo: then linger", 17) == 0, "text: %s", s.text);
    cr_assert_lt(took, 5000, "ended %llu ms after the start, not at the idle timeout",
                 (unsigned long long)took);
}

Test(llm, hundred_concurrent_streams_on_one_loop)
{
    enum { N = 100 };
    uv_loop_t loop;
    cr_assert_eq(uv_loop_init(&loop), 0);
    bg_llm_config_t cfg = base_config();
    bg_llm_t *llm = NULL;
    cr_assert_eq(bg_llm_new(&loop, &cfg, &llm), 0);
    static seen_t s[N];
    memset(s, 0, sizeof(s));
    for (int i = 0; i < N; i++) {
        char content[64];
        snprintf(content, sizeof(content), "number %d", i);
        start(llm, content, &s[i]);
    }
    (void)uv_run(&loop, UV_RUN_DEFAULT);
    for (int i = 0; i < N; i++) {
        char want[64];
        snprintf(want, sizeof(want), "Echo: number %d.", i);
        cr_assert_eq(s[i].done, 1, "call %d", i);
        cr_assert_eq(s[i].res.error, BG_LLM_OK, "call %d: %s %s", i,
                     bg_llm_error_name(s[i].res.error), s[i].res.detail);
        cr_assert(strncmp(s[i].text, want, strlen(want)) == 0, "call %d: %s", i, s[i].text);
        cr_assert_eq(s[i].res.usage.source, BG_LLM_USAGE_PROVIDER);
    }
    finish_loop(&loop, llm);
}

typedef struct free_ctx {
    bg_llm_t *llm;
    seen_t *s;
    int n;
} free_ctx_t;

static void free_on_timer(uv_timer_t *t)
{
    free_ctx_t *f = t->data;
    bg_llm_free(f->llm);
    for (int i = 0; i < f->n; i++)
        cr_assert_eq(f->s[i].done, 1, "done before bg_llm_free returns (call %d)", i);
    uv_close((uv_handle_t *)t, NULL);
}

Test(llm, free_with_calls_in_flight_reports_closed_once_each)
{
    enum { N = 5 };
    uv_loop_t loop;
    cr_assert_eq(uv_loop_init(&loop), 0);
    bg_llm_config_t cfg = base_config();
    bg_llm_t *llm = NULL;
    cr_assert_eq(bg_llm_new(&loop, &cfg, &llm), 0);
    seen_t s[N];
    memset(s, 0, sizeof(s));
    for (int i = 0; i < N; i++)
        start(llm, i % 2 == 0 ? "slow #fail:slow=200" : "wait #fail:hang", &s[i]);
    free_ctx_t f = {llm, s, N};
    uv_timer_t t;
    uv_timer_init(&loop, &t);
    t.data = &f;
    uv_timer_start(&t, free_on_timer, 700, 0);
    (void)uv_run(&loop, UV_RUN_DEFAULT);
    for (int i = 0; i < N; i++) {
        cr_assert_eq(s[i].done, 1, "call %d", i);
        cr_assert_eq(s[i].res.status, BG_ERR_CLOSED);
        cr_assert_eq(s[i].res.error, BG_LLM_ERR_CANCELED);
    }
    cr_assert_gt(s[0].deltas, 0, "the slow stream had started");
    cr_assert_eq(uv_loop_close(&loop), 0, "handles left open on the loop");
}

Test(llm, free_from_a_delta_callback_is_deferred_safely)
{
    uv_loop_t loop;
    cr_assert_eq(uv_loop_init(&loop), 0);
    bg_llm_config_t cfg = base_config();
    bg_llm_t *llm = NULL;
    cr_assert_eq(bg_llm_new(&loop, &cfg, &llm), 0);
    seen_t a = {0}, b = {0};
    start(llm, "first", &a);
    start(llm, "second #fail:hang", &b);
    a.free_from_delta = llm;
    (void)uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(a.done, 1);
    cr_assert_eq(b.done, 1);
    cr_assert_eq(a.deltas, 1, "no delta after the client was freed");
    cr_assert_eq(a.res.status, BG_ERR_CLOSED);
    cr_assert_eq(b.res.status, BG_ERR_CLOSED);
    cr_assert_eq(uv_loop_close(&loop), 0, "handles left open on the loop");
}

Test(llm, refused_requests_never_call_back)
{
    uv_loop_t loop;
    cr_assert_eq(uv_loop_init(&loop), 0);
    bg_llm_config_t cfg = base_config();
    bg_llm_t *llm = NULL;
    bg_llm_config_t bad = cfg;
    bad.base_url = "ftp://example.com";
    cr_assert_eq(bg_llm_new(&loop, &bad, &llm), BG_ERR_CONFIG);
    cr_assert_null(llm);
    cr_assert_eq(bg_llm_new(&loop, &cfg, &llm), 0);
    seen_t s = {0};
    bg_llm_request_t req = {.model = "demo-1", .messages_json = "{\"role\":\"user\"}"};
    cr_assert_eq(bg_llm_stream(llm, &req, &cbs, &s, NULL), BG_ERR_INVALID, "not an array");
    req.messages_json = "[{\"role\":";
    cr_assert_eq(bg_llm_stream(llm, &req, &cbs, &s, NULL), BG_ERR_INVALID, "not JSON");
    req.messages_json = "[]";
    req.model = NULL;
    cr_assert_eq(bg_llm_stream(llm, &req, &cbs, &s, NULL), BG_ERR_INVALID, "no model");
    (void)uv_run(&loop, UV_RUN_NOWAIT);
    cr_assert_eq(s.done, 0);
    finish_loop(&loop, llm);
}
