/*
 * GET /admin/logs: what happened on the platform, for platform admins. Two kinds of rows:
 *
 *   ?kind=audit     (default) the audit log (audit_log): who did what to what, newest first, with
 *                   the actor's e-mail when the actor is a person;
 *   ?kind=requests  one row per LLM request (usage_records): who asked, through which channel and
 *                   agent, how it ended, tokens and timings, newest first.
 *
 * Filters and the cursor are checked here on the loop, so that every bad one is a 422 naming the
 * parameter before any work is queued; the query then runs on the thread pool with that thread's
 * blocking connection, after checking in Postgres that the caller is still an active admin (the
 * route already required the admin role in the token). Postgres builds each row's JSON, as for the
 * billing lists, and the page is written here.
 *
 * Pagination is keyset on (time, id), newest first, so that pages stay stable while new rows
 * arrive: the cursor is the base64url of "<kind>|<time with microseconds>|<id>" of the last row
 * shown, and the next page is what sorts strictly after it. The time bound is repeated as a plain
 * range condition so that the time indexes (audit_log_time_idx, the BRIN index of usage_records)
 * start at the cursor instead of skipping what earlier pages showed. A cursor made for the other
 * kind is refused: its id would name another table's row.
 */
#include <stdlib.h>
#include <string.h>

#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/id.h"
#include "bg/pg.h"
#include "bg/timeutil.h"
#include "edge.h"

/* Most rows on a page, and the default. */
#define LOGS_PAGE_MAX 100
#define LOGS_PAGE_DEFAULT 50
/* A page is at most 100 rows, each with its (small, capped) audit details: generous. */
#define LOGS_MAX_BYTES (4u << 20)
/* A decoded cursor: "a|YYYY-MM-DDTHH:MM:SS.ffffffZ|<bigint>" fits easily. */
#define CURSOR_RAW_MAX 64
/* 0001-01-01T00:00:00Z in unix ms: Postgres has no year 0, so earlier times are refused here. */
#define TIME_MIN_MS (-62135596800000LL)
/* Longest text filter (target_type, target_id: audit rows' own texts are short). */
#define TEXT_FILTER_MAX 200

typedef enum logs_kind { LOGS_AUDIT = 1, LOGS_REQUESTS = 2 } logs_kind_t;

/* The filters, in the order of the statements' parameters $1… */
enum {
    F_ACTOR,  /* audit: actor_id */
    F_ACTION, /* audit: exact action, or a prefix ending in '.' */
    F_TARGET_TYPE,
    F_TARGET_ID,
    F_USER, /* requests: user_id */
    F_STATUS,
    F_CHANNEL,
    F_AGENT,
    F_SINCE, /* both: inclusive lower bound */
    F_UNTIL, /* both: exclusive upper bound */
    F_COUNT
};

typedef enum filter_check {
    CHECK_UUID,
    CHECK_TIME,
    CHECK_ACTION,
    CHECK_TEXT,
    CHECK_ENUM,
} filter_check_t;

typedef struct st_filter {
    const char *name;
    unsigned kinds; /* the kinds it applies to (logs_kind_t bits) */
    filter_check_t check;
    const char *allowed; /* CHECK_ENUM: the values, comma-separated (shown as is in the message) */
} filter_t;

static const filter_t filters[F_COUNT] = {
    [F_ACTOR] = {"actor", LOGS_AUDIT, CHECK_UUID, NULL},
    [F_ACTION] = {"action", LOGS_AUDIT, CHECK_ACTION, NULL},
    [F_TARGET_TYPE] = {"target_type", LOGS_AUDIT, CHECK_TEXT, NULL},
    [F_TARGET_ID] = {"target_id", LOGS_AUDIT, CHECK_TEXT, NULL},
    [F_USER] = {"user", LOGS_REQUESTS, CHECK_UUID, NULL},
    [F_STATUS] = {"status", LOGS_REQUESTS, CHECK_ENUM, "ok, error, canceled, timeout"},
    [F_CHANNEL] = {"channel", LOGS_REQUESTS, CHECK_ENUM, "web, telegram, api"},
    [F_AGENT] = {"agent", LOGS_REQUESTS, CHECK_UUID, NULL},
    [F_SINCE] = {"since", LOGS_AUDIT | LOGS_REQUESTS, CHECK_TIME, NULL},
    [F_UNTIL] = {"until", LOGS_AUDIT | LOGS_REQUESTS, CHECK_TIME, NULL},
};

typedef struct st_logs_op {
    const bg_config_t *cfg;
    char admin_id[64];
    logs_kind_t kind;
    int limit;
    char *value[F_COUNT]; /* owned; NULL when the filter is not given */
    bool action_prefix;   /* value[F_ACTION] ends in '.': match actions that start with it */
    char after_ts[40];    /* the cursor's row, "" for the first page */
    char after_id[24];
    int rc;
    bg_buf_t body; /* the answer, owned */
} logs_op_t;

static void op_free(void *p)
{
    logs_op_t *op = p;
    if (op == NULL)
        return;
    for (int i = 0; i < F_COUNT; i++)
        free(op->value[i]);
    bg_buf_dispose(&op->body);
    free(op);
}

/* ---- the statements ---- */

/* RFC 3339 UTC as the API shows times, and with microseconds for the cursor (exact). */
#define TS(col) "to_char((" col ") AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
#define TS_US(col) "to_char((" col ") AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"

/*
 * Parameters: $1 actor, $2 action (exact), $3 action prefix, $4 target_type, $5 target_id,
 * $6 since, $7 until, $8/$9 the cursor's time and id, $10 the row limit. The actor's e-mail is
 * shown for people only (a user or an admin acting); a deleted user's is gone (null).
 */
static const char AUDIT_SQL[] = "SELECT " TS_US(
    "a.occurred_at") " || '|' || a.id, json_build_object("
                     "'id', a.id::text, 'occurred_at', " TS(
                         "a.occurred_at") ", "
                                          "'actor_kind', a.actor_kind, 'actor_id', a.actor_id, "
                                          "'actor_email', u.email, "
                                          "'action', a.action, 'target_type', a.target_type, "
                                          "'target_id', a.target_id, "
                                          "'organization_id', a.organization_id, 'request_id', "
                                          "a.request_id, 'ip', host(a.ip), "
                                          "'details', a.details)::text "
                                          "FROM audit_log a LEFT JOIN users u ON u.id = a.actor_id "
                                          "  AND a.actor_kind IN ('user', 'admin') "
                                          "WHERE ($1::uuid IS NULL OR a.actor_id = $1::uuid) "
                                          "AND ($2::text IS NULL OR a.action = $2) "
                                          "AND ($3::text IS NULL OR starts_with(a.action, $3)) "
                                          "AND ($4::text IS NULL OR a.target_type = $4) "
                                          "AND ($5::text IS NULL OR a.target_id = $5) "
                                          "AND ($6::timestamptz IS NULL OR a.occurred_at >= "
                                          "$6::timestamptz) "
                                          "AND ($7::timestamptz IS NULL OR a.occurred_at < "
                                          "$7::timestamptz) "
                                          "AND ($8::timestamptz IS NULL OR (a.occurred_at <= "
                                          "$8::timestamptz "
                                          "  AND (a.occurred_at, a.id) < ($8::timestamptz, "
                                          "$9::bigint))) "
                                          "ORDER BY a.occurred_at DESC, a.id DESC LIMIT $10::int";

/*
 * Parameters: $1 user, $2 status, $3 channel, $4 agent, $5 since, $6 until, $7/$8 the cursor's
 * time and id, $9 the row limit. The record's time is when the request ended.
 */
static const char REQUESTS_SQL[] = "SELECT " TS_US(
    "r.created_at") " || '|' || r.id, json_build_object("
                    "'request_id', r.request_id, 'occurred_at', " TS(
                        "r.created_at") ", "
                                        "'user_id', r.user_id, 'user_email', u.email, "
                                        "'organization_id', r.organization_id, "
                                        "'agent_id', r.agent_id, 'agent_slug', g.slug, 'channel', "
                                        "r.channel, 'model', r.model, "
                                        "'status', r.status, 'error_class', r.error_class, "
                                        "'prompt_tokens', r.prompt_tokens, "
                                        "'completion_tokens', r.completion_tokens, 'token_source', "
                                        "r.token_source, "
                                        "'latency_ms', r.latency_ms, 'ttft_ms', r.ttft_ms, "
                                        "'cached', r.cache_hit, "
                                        "'requests_charged', r.requests_charged)::text "
                                        "FROM usage_records r LEFT JOIN users u ON u.id = "
                                        "r.user_id "
                                        "LEFT JOIN agents g ON g.id = r.agent_id "
                                        "WHERE ($1::uuid IS NULL OR r.user_id = $1::uuid) "
                                        "AND ($2::text IS NULL OR r.status = $2) "
                                        "AND ($3::text IS NULL OR r.channel = $3) "
                                        "AND ($4::uuid IS NULL OR r.agent_id = $4::uuid) "
                                        "AND ($5::timestamptz IS NULL OR r.created_at >= "
                                        "$5::timestamptz) "
                                        "AND ($6::timestamptz IS NULL OR r.created_at < "
                                        "$6::timestamptz) "
                                        "AND ($7::timestamptz IS NULL OR (r.created_at <= "
                                        "$7::timestamptz "
                                        "  AND (r.created_at, r.id) < ($7::timestamptz, "
                                        "$8::bigint))) "
                                        "ORDER BY r.created_at DESC, r.id DESC LIMIT $9::int";

/* NULL for "", so that an empty cursor part means "no cursor". */
static const char *or_null(const char *s)
{
    return s != NULL && s[0] != '\0' ? s : NULL;
}

static void logs_work(void *arg)
{
    logs_op_t *op = arg;
    PGconn *c = edge_pg(op->cfg, op->admin_id, &op->rc);
    if (c == NULL)
        return;
    char lim[16];
    snprintf(lim, sizeof(lim), "%d", op->limit + 1);
    const char *ts = or_null(op->after_ts), *id = ts != NULL ? op->after_id : NULL;
    PGresult *res;
    if (op->kind == LOGS_AUDIT) {
        const char *action = op->value[F_ACTION];
        const char *p[] = {op->value[F_ACTOR],
                           op->action_prefix ? NULL : action,
                           op->action_prefix ? action : NULL,
                           op->value[F_TARGET_TYPE],
                           op->value[F_TARGET_ID],
                           op->value[F_SINCE],
                           op->value[F_UNTIL],
                           ts,
                           id,
                           lim};
        op->rc = bg_pg_exec(c, AUDIT_SQL, (int)BG_ARRAY_SIZE(p), p, &res);
    } else {
        const char *p[] = {op->value[F_USER],
                           op->value[F_STATUS],
                           op->value[F_CHANNEL],
                           op->value[F_AGENT],
                           op->value[F_SINCE],
                           op->value[F_UNTIL],
                           ts,
                           id,
                           lim};
        op->rc = bg_pg_exec(c, REQUESTS_SQL, (int)BG_ARRAY_SIZE(p), p, &res);
    }
    if (op->rc != 0)
        return;
    op->rc = bg_pg_write_page(res, op->limit, op->kind == LOGS_AUDIT ? 'a' : 'r', &op->body);
    PQclear(res);
}

static void logs_done(edge_req_t *er, void *arg)
{
    logs_op_t *op = arg;
    if (er->req == NULL)
        return;
    if (op->rc != 0) {
        edge_fail(er, op->rc);
        return;
    }
    edge_add_header(er, "cache-control", "no-store");
    edge_respond_json(er, 200, &op->body);
}

/* ---- the query ---- */

/* Returns whether the query string has parameter name at all (edge_query() also says no for a
 * value that does not decode, which must not pass for an absent filter). */
static bool has_param(const edge_req_t *er, const char *name)
{
    if (er->req == NULL || er->req->query_at == SIZE_MAX)
        return false;
    const char *q = er->req->path.base + er->req->query_at + 1;
    const char *end = er->req->path.base + er->req->path.len;
    size_t nl = strlen(name);
    while (q < end) {
        const char *amp = memchr(q, '&', (size_t)(end - q));
        const char *stop = amp != NULL ? amp : end;
        const char *eq = memchr(q, '=', (size_t)(stop - q));
        const char *kend = eq != NULL ? eq : stop;
        if ((size_t)(kend - q) == nl && memcmp(q, name, nl) == 0)
            return true;
        q = stop + 1;
    }
    return false;
}

/*
 * Reads parameter name into a buffer from the request's pool (as long as the whole query, so that
 * any value fits). Returns the value, NULL when absent or empty, or NULL with *bad set when present
 * but not decodable (a NUL byte).
 */
static const char *param(edge_req_t *er, const char *name, bool *bad)
{
    *bad = false;
    size_t cap = er->req->path.len + 1;
    char *v = h2o_mem_alloc_pool(&er->req->pool, cap);
    if (!edge_query(er, name, v, cap)) {
        *bad = has_param(er, name);
        return NULL;
    }
    return v[0] != '\0' ? v : NULL;
}

/* An audit action, or a prefix of one ending in '.': what the audit_log CHECK allows. */
static bool valid_action(const char *s)
{
    size_t n = strlen(s);
    if (n < 1 || n > 64 || s[0] < 'a' || s[0] > 'z')
        return false;
    for (size_t i = 1; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '.'))
            return false;
    }
    return true;
}

/* Whether v is one of the comma-separated values of allowed. */
static bool one_of(const char *v, const char *allowed)
{
    size_t n = strlen(v);
    for (const char *p = allowed; *p != '\0';) {
        while (*p == ',' || *p == ' ')
            p++;
        size_t len = strcspn(p, ",");
        if (len == n && memcmp(p, v, n) == 0)
            return true;
        p += len;
    }
    return false;
}

/*
 * Parses an RFC 3339 time into unix ms. In a query string '+' means a space, so a zone offset the
 * client did not percent-encode arrives as " hh:mm": taken as the '+' it was (a space can stand
 * for nothing else there).
 */
static int parse_time(const char *s, int64_t *ms)
{
    char t[64];
    size_t n = strlen(s);
    if (n >= sizeof(t))
        return BG_ERR_INVALID;
    memcpy(t, s, n + 1);
    if (n > 6 && t[n - 6] == ' ' && t[n - 3] == ':')
        t[n - 6] = '+';
    if (bg_timeutil_parse_rfc3339(t, n, ms) != 0 || *ms < TIME_MIN_MS)
        return BG_ERR_INVALID;
    return 0;
}

/* Decodes a cursor of kind into op->after_ts and op->after_id; false when it is not one. */
static bool take_cursor(logs_op_t *op, const char *cursor)
{
    char raw[CURSOR_RAW_MAX + 1];
    if (bg_crypto_b64url_decode_str(cursor, raw, sizeof(raw)) != 0)
        return false;
    char want = op->kind == LOGS_AUDIT ? 'a' : 'r';
    if (raw[0] != want || raw[1] != '|')
        return false;
    char *ts = raw + 2, *bar = strchr(ts, '|');
    if (bar == NULL)
        return false;
    *bar = '\0';
    const char *id = bar + 1;
    size_t idlen = strlen(id);
    int64_t ms;
    /* only the spelling bg_pg_write_page() makes: Postgres reads it back exactly */
    if (strlen(ts) != 27 || ts[10] != 'T' || ts[19] != '.' || ts[26] != 'Z' ||
        bg_timeutil_parse_rfc3339(ts, 27, &ms) != 0 || ms < TIME_MIN_MS || idlen < 1 ||
        idlen > 18 || strspn(id, "0123456789") != idlen)
        return false;
    return bg_strlcpy(op->after_ts, ts, sizeof(op->after_ts)) &&
           bg_strlcpy(op->after_id, id, sizeof(op->after_id));
}

/* Checks filter i's value v; on a problem answers 422 and returns false. */
static bool check_filter(edge_req_t *er, logs_op_t *op, int i, const char *v, int64_t *ms)
{
    const filter_t *f = &filters[i];
    switch (f->check) {
    case CHECK_UUID:
        if (!bg_id_uuid_is_valid(v)) {
            edge_invalid_field(er, f->name, "invalid_uuid", NULL);
            return false;
        }
        break;
    case CHECK_TIME:
        if (parse_time(v, ms) != 0) {
            edge_invalid_field(er, f->name, "invalid_time", NULL);
            return false;
        }
        break;
    case CHECK_ACTION:
        if (!valid_action(v)) {
            edge_invalid_field(er, f->name, "invalid_value", NULL);
            return false;
        }
        op->action_prefix = v[strlen(v) - 1] == '.';
        break;
    case CHECK_TEXT:
        if (strlen(v) > TEXT_FILTER_MAX) {
            char maxs[16];
            snprintf(maxs, sizeof(maxs), "%d", TEXT_FILTER_MAX);
            const char *params[] = {"max", maxs, NULL};
            edge_invalid_field(er, f->name, "too_long", params);
            return false;
        }
        break;
    case CHECK_ENUM:
        if (!one_of(v, f->allowed)) {
            const char *params[] = {"allowed", f->allowed, NULL};
            edge_invalid_field(er, f->name, "one_of", params);
            return false;
        }
        break;
    }
    return true;
}

/* GET /admin/logs?kind=&limit=&cursor=&<filters> */
static void logs_get(edge_req_t *er)
{
    logs_op_t *op = bg_calloc(1, sizeof(*op));
    er->data = op;
    er->data_free = op_free;
    op->cfg = er->thread->server->cfg;
    bg_strlcpy(op->admin_id, er->auth.user_id, sizeof(op->admin_id));
    bg_buf_init(&op->body, LOGS_MAX_BYTES);

    bool bad;
    const char *kind = param(er, "kind", &bad);
    if (bad || (kind != NULL && strcmp(kind, "audit") != 0 && strcmp(kind, "requests") != 0)) {
        const char *params[] = {"allowed", "audit, requests", NULL};
        edge_invalid_field(er, "kind", "one_of", params);
        return;
    }
    op->kind = kind != NULL && strcmp(kind, "requests") == 0 ? LOGS_REQUESTS : LOGS_AUDIT;
    op->limit = LOGS_PAGE_DEFAULT;
    if (!edge_query_limit(er, LOGS_PAGE_MAX, &op->limit))
        return;

    int64_t since_ms = 0, until_ms = 0;
    for (int i = 0; i < F_COUNT; i++) {
        const filter_t *f = &filters[i];
        const char *v = param(er, f->name, &bad);
        if (bad) {
            edge_invalid_field(er, f->name, "invalid_value", NULL);
            return;
        }
        if (v == NULL)
            continue;
        /* a filter of the other kind would be silently ignored: say so instead */
        if ((f->kinds & op->kind) == 0) {
            edge_invalid_field(er, f->name, "unsupported", NULL);
            return;
        }
        int64_t ms = 0;
        if (!check_filter(er, op, i, v, &ms))
            return;
        if (f->check == CHECK_TIME) {
            /* Postgres gets the time as parsed here (offset applied, cut to milliseconds) */
            char t[BG_RFC3339_BUFSIZE];
            if (bg_timeutil_format_rfc3339(t, sizeof(t), ms, true) != 0) {
                edge_invalid_field(er, f->name, "invalid_time", NULL);
                return;
            }
            *(i == F_SINCE ? &since_ms : &until_ms) = ms;
            op->value[i] = bg_strdup(t);
        } else {
            op->value[i] = bg_strdup(v);
        }
    }
    if (op->value[F_SINCE] != NULL && op->value[F_UNTIL] != NULL && since_ms > until_ms) {
        const char *params[] = {"other", "until", NULL};
        edge_invalid_field(er, "since", "not_after", params);
        return;
    }

    const char *cursor = param(er, "cursor", &bad);
    if (bad || (cursor != NULL && !take_cursor(op, cursor))) {
        edge_invalid_field(er, "cursor", "invalid_value", NULL);
        return;
    }
    edge_run(er, logs_work, logs_done);
}

const edge_route_t edge_routes_admin_logs[] = {
    {"GET", "/admin/logs", "admin_logs", logs_get, 0, 0, EDGE_ADMIN},
    {NULL, NULL, NULL, NULL, 0, 0, EDGE_PUBLIC},
};
