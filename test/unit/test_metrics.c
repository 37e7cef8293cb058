/*
 * Metrics: what a Prometheus server scrapes must parse, add up and stay bounded.
 */
#include <pthread.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <criterion/criterion.h>

#include "bg/err.h"
#include "bg/metrics.h"

static char *render(void)
{
    bg_buf_t b;
    bg_buf_init(&b, 16 * 1024 * 1024);
    cr_assert_eq(bg_metrics_render(&b), 0);
    return bg_buf_steal(&b, NULL);
}

static bool has_line(const char *text, const char *line)
{
    size_t n = strlen(line);
    for (const char *p = text; (p = strstr(p, line)) != NULL; p++) {
        if ((p == text || p[-1] == '\n') && p[n] == '\n')
            return true;
    }
    return false;
}

/*
 * Checks the text format 0.0.4 line by line: HELP and TYPE once per family and before its samples,
 * samples well-formed and belonging to the family declared last (with _bucket, _sum and _count for
 * histograms), le labels on buckets only.
 */
static void assert_valid_exposition(const char *text)
{
    regex_t help, type, sample;
    const char *name = "[a-zA-Z_:][a-zA-Z0-9_:]*";
    const char *label = "[a-zA-Z_][a-zA-Z0-9_]*=\"([^\"\\\\\n]|\\\\[\\\\\"n])*\"";
    char re[1024];
    snprintf(re, sizeof(re), "^# HELP (%s) ([^\\\\]|\\\\[\\\\n])*$", name);
    cr_assert_eq(regcomp(&help, re, REG_EXTENDED), 0);
    snprintf(re, sizeof(re), "^# TYPE (%s) (counter|gauge|histogram|summary|untyped)$", name);
    cr_assert_eq(regcomp(&type, re, REG_EXTENDED), 0);
    snprintf(re, sizeof(re),
             "^(%s)(\\{%s(,%s)*\\})? (NaN|[+-]Inf|[-+]?[0-9]+(\\.[0-9]+)?(e[-+][0-9]+)?)$", name,
             label, label);
    cr_assert_eq(regcomp(&sample, re, REG_EXTENDED), 0);

    char family[256] = "", kind[32] = "";
    char seen[64][256];
    size_t nseen = 0;
    char *copy = strdup(text);
    char *save = NULL;
    cr_assert(strlen(text) > 0 && text[strlen(text) - 1] == '\n', "ends with a newline");
    for (char *line = strtok_r(copy, "\n", &save); line != NULL;
         line = strtok_r(NULL, "\n", &save)) {
        regmatch_t m[3];
        if (strncmp(line, "# HELP ", 7) == 0) {
            cr_assert_eq(regexec(&help, line, 3, m, 0), 0, "bad HELP line: %s", line);
            int len = (int)(m[1].rm_eo - m[1].rm_so);
            snprintf(family, sizeof(family), "%.*s", len, line + m[1].rm_so);
            for (size_t i = 0; i < nseen; i++)
                cr_assert_str_neq(seen[i], family, "family %s appears twice", family);
            cr_assert_lt(nseen, 64);
            snprintf(seen[nseen++], sizeof(seen[0]), "%s", family);
            kind[0] = '\0';
        } else if (strncmp(line, "# TYPE ", 7) == 0) {
            cr_assert_eq(regexec(&type, line, 3, m, 0), 0, "bad TYPE line: %s", line);
            cr_assert_eq(strncmp(line + 7, family, strlen(family)), 0, "TYPE after its HELP");
            snprintf(kind, sizeof(kind), "%s", line + 8 + strlen(family));
        } else {
            cr_assert_eq(regexec(&sample, line, 3, m, 0), 0, "bad sample line: %s", line);
            cr_assert_neq(kind[0], '\0', "sample before its TYPE: %s", line);
            size_t flen = strlen(family);
            const char *rest = line + flen;
            cr_assert_eq(strncmp(line, family, flen), 0, "sample %s outside family %s", line,
                         family);
            bool bucket = strncmp(rest, "_bucket", 7) == 0;
            if (strcmp(kind, "histogram") == 0) {
                cr_assert(bucket || strncmp(rest, "_sum", 4) == 0 ||
                              strncmp(rest, "_count", 6) == 0,
                          "%s", line);
                cr_assert_eq(strstr(line, "le=\"") != NULL, bucket, "le only on buckets: %s", line);
            } else {
                cr_assert(rest[0] == '{' || rest[0] == ' ', "%s", line);
            }
        }
    }
    free(copy);
    regfree(&help);
    regfree(&type);
    regfree(&sample);
}

Test(metrics, render_is_valid_text_format)
{
    static const char *const labels[] = {"route", "status", NULL};
    bg_metrics_counter_t *c =
        bg_metrics_counter("bg_http_requests_total", "HTTP requests.", labels);
    bg_metrics_gauge_t *g = bg_metrics_gauge("bg_queue_depth", "Jobs waiting.", NULL);
    bg_metrics_histogram_t *h =
        bg_metrics_histogram("bg_http_request_duration_seconds", "Latency.", labels, NULL, 0);
    bg_metrics_histogram_t *empty =
        bg_metrics_histogram("bg_unused_seconds", "Never observed.", labels, NULL, 0);
    cr_assert_not_null(c);
    cr_assert_not_null(g);
    cr_assert_not_null(h);
    cr_assert_not_null(empty);
    bg_metrics_counter_inc(c, (const char *const[]){"/auth/login", "200"});
    bg_metrics_counter_add(c, (const char *const[]){"/auth/login", "401"}, 2);
    bg_metrics_gauge_set(g, NULL, 12.5);
    bg_metrics_histogram_observe(h, (const char *const[]){"/auth/login", "200"}, 0.012);
    char *text = render();
    assert_valid_exposition(text);
    cr_assert(has_line(text, "# TYPE bg_http_requests_total counter"));
    cr_assert(has_line(text, "bg_http_requests_total{route=\"/auth/login\",status=\"200\"} 1"));
    cr_assert(has_line(text, "bg_http_requests_total{route=\"/auth/login\",status=\"401\"} 2"));
    cr_assert(has_line(text, "bg_queue_depth 12.5"));
    cr_assert(has_line(
        text, "bg_http_request_duration_seconds_bucket{route=\"/auth/login\",status=\"200\","
              "le=\"+Inf\"} 1"));
    cr_assert(has_line(text, "# TYPE process_open_fds gauge"));
    free(text);
}

Test(metrics, histogram_buckets_are_cumulative)
{
    static const double bounds[] = {1, 2, 5};
    bg_metrics_histogram_t *h = bg_metrics_histogram("bg_size", "Sizes.", NULL, bounds, 3);
    cr_assert_not_null(h);
    static const double obs[] = {0.5, 1, 1.5, 3, 10};
    for (size_t i = 0; i < 5; i++)
        bg_metrics_histogram_observe(h, NULL, obs[i]);
    char *text = render();
    assert_valid_exposition(text);
    cr_assert(has_line(text, "bg_size_bucket{le=\"1\"} 2"), "upper bounds are inclusive\n%s", text);
    cr_assert(has_line(text, "bg_size_bucket{le=\"2\"} 3"));
    cr_assert(has_line(text, "bg_size_bucket{le=\"5\"} 4"));
    cr_assert(has_line(text, "bg_size_bucket{le=\"+Inf\"} 5"));
    cr_assert(has_line(text, "bg_size_sum 16"));
    cr_assert(has_line(text, "bg_size_count 5"));
    free(text);

    bg_metrics_histogram_t *lat =
        bg_metrics_histogram("bg_latency_seconds", "Latency.", NULL, NULL, 0);
    bg_metrics_histogram_observe(lat, NULL, 0.3);
    text = render();
    cr_assert(has_line(text, "bg_latency_seconds_bucket{le=\"0.005\"} 0"));
    cr_assert(has_line(text, "bg_latency_seconds_bucket{le=\"0.25\"} 0"));
    cr_assert(has_line(text, "bg_latency_seconds_bucket{le=\"0.5\"} 1"));
    cr_assert(has_line(text, "bg_latency_seconds_bucket{le=\"120\"} 1"));
    free(text);
}

enum { THREADS = 4, ITERATIONS = 100000 };

static void *hammer(void *arg)
{
    (void)arg;
    static const char *const labels[] = {"kind", NULL};
    bg_metrics_counter_t *c = bg_metrics_counter("bg_jobs_total", "Jobs.", labels);
    bg_metrics_gauge_t *g = bg_metrics_gauge("bg_inflight", "In flight.", NULL);
    bg_metrics_histogram_t *h = bg_metrics_histogram("bg_work_seconds", "Work.", labels, NULL, 0);
    static const char *const kinds[] = {"a", "b", "c", "d"};
    for (int i = 0; i < ITERATIONS; i++) {
        const char *v[] = {kinds[i % 4]};
        bg_metrics_counter_inc(c, v);
        bg_metrics_gauge_add(g, NULL, 1);
        bg_metrics_gauge_add(g, NULL, -0.5);
        bg_metrics_histogram_observe(h, v, 0.25);
    }
    return NULL;
}

Test(metrics, concurrent_updates_from_four_threads_add_up_exactly)
{
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++)
        cr_assert_eq(pthread_create(&t[i], NULL, hammer, NULL), 0);
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
    char *text = render();
    assert_valid_exposition(text);
    char want[128];
    static const char *const kinds[] = {"a", "b", "c", "d"};
    for (int k = 0; k < 4; k++) {
        snprintf(want, sizeof(want), "bg_jobs_total{kind=\"%s\"} %d", kinds[k],
                 THREADS * ITERATIONS / 4);
        cr_assert(has_line(text, want), "missing: %s", want);
        snprintf(want, sizeof(want), "bg_work_seconds_count{kind=\"%s\"} %d", kinds[k],
                 THREADS * ITERATIONS / 4);
        cr_assert(has_line(text, want), "missing: %s", want);
        snprintf(want, sizeof(want), "bg_work_seconds_sum{kind=\"%s\"} %d", kinds[k],
                 THREADS * ITERATIONS / 16);
        cr_assert(has_line(text, want), "missing: %s", want);
    }
    snprintf(want, sizeof(want), "bg_inflight %d", THREADS * ITERATIONS / 2);
    cr_assert(has_line(text, want), "missing: %s", want);
    free(text);
}

Test(metrics, label_values_and_help_are_escaped)
{
    static const char *const labels[] = {"path", NULL};
    bg_metrics_counter_t *c =
        bg_metrics_counter("bg_odd_total", "Help with \\ backslash\nand newline.", labels);
    bg_metrics_counter_inc(c, (const char *const[]){"a\"b\\c\nd"});
    bg_metrics_counter_inc(c, (const char *const[]){"bad\xff utf8"});
    bg_metrics_counter_inc(c, (const char *const[]){NULL});
    char *text = render();
    assert_valid_exposition(text);
    cr_assert(has_line(text, "# HELP bg_odd_total Help with \\\\ backslash\\nand newline."), "%s",
              text);
    cr_assert(has_line(text, "bg_odd_total{path=\"a\\\"b\\\\c\\nd\"} 1"), "%s", text);
    cr_assert(has_line(text, "bg_odd_total{path=\"bad? utf8\"} 1"), "%s", text);
    cr_assert(has_line(text, "bg_odd_total{path=\"\"} 1"));
    free(text);
}

Test(metrics, label_explosion_goes_to_one_overflow_series)
{
    static const char *const labels[] = {"user", "route", NULL};
    bg_metrics_counter_t *c = bg_metrics_counter("bg_by_user_total", "Per user.", labels);
    cr_assert_eq(bg_metrics_max_children(), 10000, "the default cap");
    for (int i = 0; i < 10050; i++) {
        char user[16];
        snprintf(user, sizeof(user), "u%d", i);
        bg_metrics_counter_inc(c, (const char *const[]){user, "/x"});
    }
    /* An existing series still counts as itself. */
    bg_metrics_counter_inc(c, (const char *const[]){"u7", "/x"});
    char *text = render();
    size_t series = 0;
    for (const char *p = text; (p = strstr(p, "\nbg_by_user_total{")) != NULL; p++)
        series++;
    cr_assert_eq(series, 10001, "10,000 series plus the overflow one");
    cr_assert(has_line(text, "bg_by_user_total{user=\"overflow\",route=\"overflow\"} 50"));
    cr_assert(has_line(text, "bg_by_user_total{user=\"u7\",route=\"/x\"} 2"));
    free(text);

    bg_metrics_set_max_children(2);
    static const char *const one[] = {"k", NULL};
    bg_metrics_gauge_t *g = bg_metrics_gauge("bg_small", "Small cap.", one);
    bg_metrics_gauge_set(g, (const char *const[]){"x"}, 1);
    bg_metrics_gauge_set(g, (const char *const[]){"y"}, 2);
    bg_metrics_gauge_set(g, (const char *const[]){"z"}, 3);
    text = render();
    cr_assert(has_line(text, "bg_small{k=\"overflow\"} 3"));
    cr_assert_null(strstr(text, "bg_small{k=\"z\"}"));
    free(text);
}

Test(metrics, registration_is_idempotent_and_checked)
{
    static const char *const labels[] = {"a", NULL};
    static const char *const other[] = {"b", NULL};
    static const char *const reserved[] = {"__a", NULL};
    static const char *const le[] = {"le", NULL};
    bg_metrics_counter_t *c = bg_metrics_counter("bg_twice_total", "Twice.", labels);
    cr_assert_not_null(c);
    cr_assert_eq(bg_metrics_counter("bg_twice_total", "Twice.", labels), c);
    cr_assert_null(bg_metrics_counter("bg_twice_total", "Twice.", other), "other labels");
    cr_assert_null(bg_metrics_gauge("bg_twice_total", "Twice.", labels), "other type");
    cr_assert_null(bg_metrics_counter("9bad", "x", NULL));
    cr_assert_null(bg_metrics_counter("bad-name", "x", NULL));
    cr_assert_null(bg_metrics_counter("bg_ok", "x", reserved));
    cr_assert_null(bg_metrics_histogram("bg_h", "x", le, NULL, 0));
    static const double unordered[] = {1, 1};
    cr_assert_null(bg_metrics_histogram("bg_h2", "x", NULL, unordered, 2));
    /* Updates through a failed registration are no-ops, not crashes. */
    bg_metrics_counter_inc(NULL, NULL);
    bg_metrics_gauge_set(NULL, NULL, 1);
    bg_metrics_histogram_observe(NULL, NULL, 1);
    bg_metrics_counter_add(c, (const char *const[]){"x"}, -5);
    char *text = render();
    cr_assert_null(strstr(text, "bg_twice_total{a=\"x\"} -5"), "counters never go down");
    free(text);
}

Test(metrics, process_metrics_come_from_proc)
{
    char *text = render();
    assert_valid_exposition(text);
    const char *p = strstr(text, "\nprocess_resident_memory_bytes ");
    cr_assert_not_null(p);
    cr_assert_gt(strtod(p + 31, NULL), 1024 * 1024);
    p = strstr(text, "\nprocess_open_fds ");
    cr_assert_not_null(p);
    cr_assert_geq(strtod(p + 18, NULL), 3);
    p = strstr(text, "\nprocess_start_time_seconds ");
    cr_assert_not_null(p);
    double start = strtod(p + 28, NULL);
    cr_assert_leq(start, (double)time(NULL) + 1);
    cr_assert_geq(start, (double)time(NULL) - 3600);
    free(text);
}

Test(metrics, render_respects_the_buffer_cap)
{
    bg_metrics_counter_t *c = bg_metrics_counter("bg_cap_total", "Cap.", NULL);
    bg_metrics_counter_inc(c, NULL);
    bg_buf_t b;
    bg_buf_init(&b, 64);
    cr_assert_eq(bg_buf_puts(&b, "keep"), 0);
    cr_assert_eq(bg_metrics_render(&b), BG_ERR_TOO_LARGE);
    cr_assert_str_eq(b.base, "keep");
    bg_buf_dispose(&b);
}
