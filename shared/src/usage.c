/*
 * Usage events (see bg/usage.h): the field layout both sides agree on, its validation, and the
 * llm worker's way to emit one.
 *
 * Validation is the same function for both sides, so an event the llm worker manages to emit is an
 * event the usage worker accepts; the parser only turns strings into the struct and then calls it.
 * Numbers are strict decimal (no sign, no spaces, no leading '+'), bounded to what the database
 * columns hold, so a malformed event is refused here (dead letters) rather than by a constraint
 * inside a transaction.
 */
#include "bg/usage.h"

#include <stdio.h>
#include <string.h>

#include "bg/err.h"
#include "bg/id.h"
#include "bg/jobs.h"
#include "bg/pg.h"

#define INT32_COLUMN_MAX 2147483647LL
/* 9999-12-31: beyond it the timestamp is garbage, not a time */
#define OCCURRED_AT_MAX 253402300799999LL

static bool one_of(const char *s, const char *const *set)
{
    if (s == NULL)
        return false;
    for (size_t i = 0; set[i] != NULL; i++) {
        if (strcmp(s, set[i]) == 0)
            return true;
    }
    return false;
}

static const char *const channels[] = {"web", "telegram", "api", NULL};
static const char *const sources[] = {"provider", "estimated", NULL};
static const char *const statuses[] = {"ok", "error", "canceled", "timeout", NULL};

static bool error_class_is_valid(const char *s)
{
    size_t n = strlen(s);
    if (n > BG_USAGE_ERROR_CLASS_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_' || ch == '.' ||
              ch == '-'))
            return false;
    }
    return true;
}

static int bad(const char **err_desc, const char *what)
{
    if (err_desc != NULL)
        *err_desc = what;
    return BG_ERR_INVALID;
}

int bg_usage_event_check(const bg_usage_event_t *ev, const char **err_desc)
{
    if (err_desc != NULL)
        *err_desc = NULL;
    if (!bg_str_present(ev->request_id) || strlen(ev->request_id) > BG_USAGE_REQUEST_ID_MAX)
        return bad(err_desc, "job_id: missing or longer than 200 bytes");
    if (ev->user_id == NULL || !bg_id_uuid_is_valid(ev->user_id))
        return bad(err_desc, "user_id: not a uuid");
    if (bg_str_present(ev->organization_id) && !bg_id_uuid_is_valid(ev->organization_id))
        return bad(err_desc, "organization_id: not a uuid");
    if (bg_str_present(ev->agent_id) && !bg_id_uuid_is_valid(ev->agent_id))
        return bad(err_desc, "agent_id: not a uuid");
    if (!one_of(ev->channel, channels))
        return bad(err_desc, "channel: not web, telegram or api");
    if (ev->model != NULL && strlen(ev->model) > BG_USAGE_MODEL_MAX)
        return bad(err_desc, "model: longer than 200 bytes");
    if (ev->prompt_tokens < 0 || ev->prompt_tokens > INT32_COLUMN_MAX)
        return bad(err_desc, "prompt_tokens: out of range");
    if (ev->completion_tokens < 0 || ev->completion_tokens > INT32_COLUMN_MAX)
        return bad(err_desc, "completion_tokens: out of range");
    if (!one_of(ev->token_source, sources))
        return bad(err_desc, "token_source: not provider or estimated");
    if (ev->latency_ms > INT32_COLUMN_MAX)
        return bad(err_desc, "latency_ms: out of range");
    if (ev->ttft_ms > INT32_COLUMN_MAX)
        return bad(err_desc, "ttft_ms: out of range");
    if (!one_of(ev->status, statuses))
        return bad(err_desc, "status: not ok, error, canceled or timeout");
    if (ev->error_class != NULL && !error_class_is_valid(ev->error_class))
        return bad(err_desc, "error_class: not [a-z0-9_.-]{0,64}");
    if (ev->outcome != BG_ADMISSION_USE && ev->outcome != BG_ADMISSION_REFUND)
        return bad(err_desc, "outcome: not use or refund");
    if (ev->occurred_at_ms <= 0 || ev->occurred_at_ms > OCCURRED_AT_MAX)
        return bad(err_desc, "occurred_at: not a unix time in ms");
    return 0;
}

bool bg_usage_event_is_charged(const bg_usage_event_t *ev)
{
    return ev->outcome == BG_ADMISSION_USE &&
           (strcmp(ev->status, "ok") == 0 || strcmp(ev->status, "canceled") == 0);
}

const char *bg_usage_event_error_class(const bg_usage_event_t *ev)
{
    if (strcmp(ev->status, "ok") == 0)
        return NULL;
    return bg_str_present(ev->error_class) ? ev->error_class : ev->status;
}

/* Strict non-negative decimal of at most 18 digits (no overflow possible). */
static bool parse_count(const char *s, int64_t *out)
{
    size_t n = s != NULL ? strlen(s) : 0;
    if (n == 0 || n > 18)
        return false;
    int64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return true;
}

/* An optional count: empty means unknown (-1). */
static bool parse_optional_count(const char *s, int64_t *out)
{
    if (s != NULL && s[0] == '\0') {
        *out = -1;
        return true;
    }
    return parse_count(s, out);
}

int bg_usage_event_parse(size_t nfields, const char *const *names, const char *const *values,
                         bg_usage_event_t *out, const char **err_desc)
{
    memset(out, 0, sizeof(*out));
    if (err_desc != NULL)
        *err_desc = NULL;
    enum {
        F_JOB,
        F_USER,
        F_ORG,
        F_AGENT,
        F_CHANNEL,
        F_MODEL,
        F_PROMPT,
        F_COMPLETION,
        F_SOURCE,
        F_LATENCY,
        F_TTFT,
        F_STATUS,
        F_ERROR,
        F_CACHE,
        F_OUTCOME,
        F_AT,
        F_COUNT
    };
    static const char *const known[F_COUNT] = {
        [F_JOB] = BG_JOBS_FIELD_ID,   [F_USER] = "user_id",
        [F_ORG] = "organization_id",  [F_AGENT] = "agent_id",
        [F_CHANNEL] = "channel",      [F_MODEL] = "model",
        [F_PROMPT] = "prompt_tokens", [F_COMPLETION] = "completion_tokens",
        [F_SOURCE] = "token_source",  [F_LATENCY] = "latency_ms",
        [F_TTFT] = "ttft_ms",         [F_STATUS] = "status",
        [F_ERROR] = "error_class",    [F_CACHE] = "cache_hit",
        [F_OUTCOME] = "outcome",      [F_AT] = "occurred_at"};
    const char *v[F_COUNT] = {0};
    for (size_t i = 0; i < nfields; i++) {
        for (size_t k = 0; k < F_COUNT; k++) {
            if (names[i] != NULL && strcmp(names[i], known[k]) == 0) {
                v[k] = values[i];
                break;
            }
        }
    }
    /* Optional fields may be absent as well as empty: the llm worker may leave them out. */
    static const bool optional[F_COUNT] = {[F_ORG] = true,     [F_AGENT] = true, [F_MODEL] = true,
                                           [F_LATENCY] = true, [F_TTFT] = true,  [F_ERROR] = true};
    for (size_t k = 0; k < F_COUNT; k++) {
        if (v[k] == NULL && !optional[k])
            return bad(err_desc, "a required field is missing");
        if (v[k] == NULL)
            v[k] = "";
    }
    out->request_id = v[F_JOB];
    out->user_id = v[F_USER];
    out->organization_id = v[F_ORG][0] != '\0' ? v[F_ORG] : NULL;
    out->agent_id = v[F_AGENT][0] != '\0' ? v[F_AGENT] : NULL;
    out->channel = v[F_CHANNEL];
    out->model = v[F_MODEL];
    out->token_source = v[F_SOURCE];
    out->status = v[F_STATUS];
    out->error_class = v[F_ERROR][0] != '\0' ? v[F_ERROR] : NULL;
    if (!parse_count(v[F_PROMPT], &out->prompt_tokens))
        return bad(err_desc, "prompt_tokens: not a count");
    if (!parse_count(v[F_COMPLETION], &out->completion_tokens))
        return bad(err_desc, "completion_tokens: not a count");
    if (!parse_optional_count(v[F_LATENCY], &out->latency_ms))
        return bad(err_desc, "latency_ms: not a count");
    if (!parse_optional_count(v[F_TTFT], &out->ttft_ms))
        return bad(err_desc, "ttft_ms: not a count");
    if (strcmp(v[F_CACHE], "0") != 0 && strcmp(v[F_CACHE], "1") != 0)
        return bad(err_desc, "cache_hit: not 0 or 1");
    out->cache_hit = v[F_CACHE][0] == '1';
    if (strcmp(v[F_OUTCOME], "use") == 0)
        out->outcome = BG_ADMISSION_USE;
    else if (strcmp(v[F_OUTCOME], "refund") == 0)
        out->outcome = BG_ADMISSION_REFUND;
    else
        return bad(err_desc, "outcome: not use or refund");
    if (!parse_count(v[F_AT], &out->occurred_at_ms))
        return bad(err_desc, "occurred_at: not a unix time in ms");
    return bg_usage_event_check(out, err_desc);
}

int bg_usage_emit(bg_redis_t *r, int shards, const bg_usage_event_t *ev)
{
    if (shards < 1 || bg_usage_event_check(ev, NULL) != 0)
        return BG_ERR_INVALID;
    char prompt[24], completion[24], latency[24] = "", ttft[24] = "", at[24];
    snprintf(prompt, sizeof(prompt), "%lld", (long long)ev->prompt_tokens);
    snprintf(completion, sizeof(completion), "%lld", (long long)ev->completion_tokens);
    if (ev->latency_ms >= 0)
        snprintf(latency, sizeof(latency), "%lld", (long long)ev->latency_ms);
    if (ev->ttft_ms >= 0)
        snprintf(ttft, sizeof(ttft), "%lld", (long long)ev->ttft_ms);
    snprintf(at, sizeof(at), "%lld", (long long)ev->occurred_at_ms);
    const char *fields[] = {
        "user_id",
        ev->user_id,
        "organization_id",
        ev->organization_id != NULL ? ev->organization_id : "",
        "agent_id",
        ev->agent_id != NULL ? ev->agent_id : "",
        "channel",
        ev->channel,
        "model",
        ev->model != NULL ? ev->model : "",
        "prompt_tokens",
        prompt,
        "completion_tokens",
        completion,
        "token_source",
        ev->token_source,
        "latency_ms",
        latency,
        "ttft_ms",
        ttft,
        "status",
        ev->status,
        "error_class",
        ev->error_class != NULL ? ev->error_class : "",
        "cache_hit",
        ev->cache_hit ? "1" : "0",
        "outcome",
        ev->outcome == BG_ADMISSION_USE ? "use" : "refund",
        "occurred_at",
        at,
    };
    bg_job_spec_t job = {.shard = bg_shard_of(ev->user_id, shards),
                         .role = BG_USAGE_ROLE,
                         .job_id = ev->request_id,
                         .nfields = BG_ARRAY_SIZE(fields) / 2,
                         .fields = fields,
                         .maxlen = BG_USAGE_STREAM_MAXLEN};
    return bg_jobs_enqueue(r, &job, NULL, 0);
}

/* ---- summaries ---- */

int bg_usage_summary(PGconn *c, const char *user_id, int64_t from_ms, int64_t to_ms, bg_buf_t *out)
{
    if (!bg_id_uuid_is_valid(user_id) || from_ms < 0 || to_ms < from_ms)
        return BG_ERR_INVALID;
    char from[24], to[24];
    snprintf(from, sizeof(from), "%lld", (long long)from_ms);
    snprintf(to, sizeof(to), "%lld", (long long)to_ms);
    const char *p[] = {user_id, from, to};
    PGresult *res;
    /* one statement, one snapshot: totals and the three breakdowns always agree */
    int rc = bg_pg_exec(
        c,
        "WITH r AS (SELECT (created_at AT TIME ZONE 'UTC')::date AS day, agent_id, channel, "
        "requests_charged, prompt_tokens + completion_tokens AS tokens, prompt_tokens, "
        "completion_tokens, cache_hit FROM usage_records WHERE user_id = $1::uuid "
        "AND created_at >= to_timestamp($2::bigint / 1000.0) "
        "AND created_at < to_timestamp($3::bigint / 1000.0)) "
        "SELECT json_build_object("
        "'totals', (SELECT json_build_object('requests', count(*), 'requests_charged', "
        "coalesce(sum(requests_charged), 0), 'prompt_tokens', coalesce(sum(prompt_tokens), 0), "
        "'completion_tokens', coalesce(sum(completion_tokens), 0), 'cache_hits', "
        "count(*) FILTER (WHERE cache_hit)) FROM r), "
        "'by_day', coalesce((SELECT json_agg(x ORDER BY x.date) FROM (SELECT to_char(day, "
        "'YYYY-MM-DD') AS date, count(*) AS requests, sum(requests_charged) AS requests_charged, "
        "sum(tokens) AS tokens FROM r GROUP BY day) x), '[]'), "
        "'by_agent', coalesce((SELECT json_agg(x ORDER BY x.requests DESC, x.name) FROM (SELECT "
        "r.agent_id, coalesce(a.name, '') AS name, coalesce(a.slug, '') AS slug, count(*) AS "
        "requests, sum(r.requests_charged) AS requests_charged, sum(r.tokens) AS tokens FROM r "
        "LEFT JOIN agents a ON a.id = r.agent_id GROUP BY r.agent_id, a.name, a.slug) x), '[]'), "
        "'by_channel', coalesce((SELECT json_agg(x ORDER BY x.channel) FROM (SELECT channel, "
        "count(*) AS requests, sum(requests_charged) AS requests_charged, sum(tokens) AS tokens "
        "FROM r GROUP BY channel) x), '[]'))::text",
        3, p, &res);
    if (rc != 0)
        return rc;
    const char *json = PQntuples(res) == 1 ? PQgetvalue(res, 0, 0) : NULL;
    size_t len = json != NULL ? strlen(json) : 0;
    /* drop the object's braces: the caller puts these members beside its own */
    if (len < 2 || json[0] != '{' || json[len - 1] != '}')
        rc = BG_ERR_PROTOCOL;
    else
        rc = bg_buf_append(out, json + 1, len - 2);
    PQclear(res);
    return rc;
}
