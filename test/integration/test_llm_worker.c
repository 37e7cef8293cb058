/*
 * The llm role end to end: real bg-worker processes (--roles llm,usage) against the demo provider
 * (bg-demo-llm), a private Redis and a migrated database. Each job is set up the way the edge does
 * it: a user with a trial plan whose admission state is compiled into Redis, a conversation with
 * the default "assistant" agent, the stored user message, and the job admitted by the real
 * admission script (so the usage worker settles a real reservation).
 *
 * What a user would notice: the text streamed is the text stored; one reply and one usage record
 * per request whatever happens to the worker; a canceled reply keeps its text and is billed; a
 * provider failure shows an error, stores nothing and costs nothing. API jobs (channel "api")
 * stream their reply the same way from the agent's system prompt and the request's own messages,
 * in order, and store nothing. Identical deterministic turns of a caching agent are answered from
 * the response cache, without the provider; an agent's change reaches jobs once its cache TTL
 * (5 s) has passed.
 */
#include <criterion/criterion.h>
#include <libpq-fe.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bg/admission.h"
#include "bg/agents.h"
#include "bg/chat.h"
#include "bg/convseq.h"
#include "bg/err.h"
#include "bg/id.h"
#include "bg/jobout.h"
#include "bg/json.h"
#include "bg/llm_cache.h"
#include "bg/pg.h"
#include "bg/policy.h"
#include "bg/redis.h"
#include "bg/timeutil.h"
#include "bgtest.h"
#include "ctx_cache.h"

#define SHARDS 4
#define DAY_MS 86400000LL
#define MAX_EVENTS 4096

static bgt_redis_t srv;
static char tmp[256];
static bg_redis_t *rc_;
static bgt_pg_t db;
static bool have_db;
static PGconn *conn;
static pid_t demo_pid;
static char demo_url[128];
static pid_t children[8];
static size_t nchildren;
static int worker_port; /* BG_WORKER_PORT of the next worker started (0: no health endpoint) */

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void setup(void)
{
    signal(SIGPIPE, SIG_IGN);
    unsetenv("BXFI_MAP");
    cr_assert_eq(bgt_redis_start(&srv), 0);
    cr_assert_eq(bgt_tempdir(tmp, sizeof(tmp)), 0);
    cr_assert_eq(bg_redis_new(srv.url, 5000, &rc_), 0);
    cr_assert_eq(bgt_pg_create(&db, true), 0);
    have_db = true;
    char err[512];
    cr_assert_eq(bg_pg_connect(db.url, 3, &conn, err, sizeof(err)), 0, "connect: %s", err);

    int port = bgt_free_port();
    char ports[16], log[400];
    snprintf(ports, sizeof(ports), "%d", port);
    snprintf(log, sizeof(log), "%s/demo.log", tmp);
    const char *argv[] = {bgt_bin("bg-demo-llm"), "--port", ports,
                          "--tokens-per-second",  "400",    NULL};
    demo_pid = bgt_spawn(argv, NULL, log);
    cr_assert_gt(demo_pid, 0, "bg-demo-llm did not start");
    snprintf(demo_url, sizeof(demo_url), "http://127.0.0.1:%d/v1", port);
    char models[200];
    snprintf(models, sizeof(models), "%s/models", demo_url);
    cr_assert_eq(bgt_wait_http(models, 200, 10000), 0, "bg-demo-llm does not answer");
}

static void teardown(void)
{
    for (size_t i = 0; i < nchildren; i++) {
        int st;
        if (waitpid(children[i], &st, WNOHANG) == 0) {
            kill(children[i], SIGKILL);
            waitpid(children[i], &st, 0);
        }
    }
    nchildren = 0;
    if (demo_pid > 0)
        bgt_stop(demo_pid, SIGTERM, 3000);
    demo_pid = 0;
    PQfinish(conn);
    conn = NULL;
    if (have_db)
        bgt_pg_drop(&db);
    have_db = false;
    bg_redis_free(rc_);
    rc_ = NULL;
    bgt_redis_stop(&srv);
    if (getenv("BGT_KEEP_LOGS") == NULL)
        bgt_rmtree(tmp);
}

TestSuite(llm_worker, .init = setup, .fini = teardown, .timeout = 240);

/* ---- worker processes ---- */

static pid_t start_worker(const char *name, int claim_idle_ms)
{
    char vars[16][600];
    const char *env[17];
    int n = 0;
    snprintf(vars[n++], 600, "BG_REDIS_URL=%s", srv.url);
    snprintf(vars[n++], 600, "BG_DATABASE_URL=%s", db.url);
    snprintf(vars[n++], 600, "BG_SHARDS=%d", SHARDS);
    snprintf(vars[n++], 600, "BG_CLAIM_IDLE_MS=%d", claim_idle_ms);
    snprintf(vars[n++], 600, "BG_MAX_DELIVERIES=5");
    snprintf(vars[n++], 600, "BG_SHUTDOWN_GRACE_MS=5000");
    snprintf(vars[n++], 600, "BG_WORKER_CONCURRENCY=2");
    snprintf(vars[n++], 600, "BG_WORKER_PORT=%d", worker_port);
    snprintf(vars[n++], 600, "BG_REDIS_TIMEOUT_MS=2000");
    snprintf(vars[n++], 600, "BG_LOG_FORMAT=text");
    snprintf(vars[n++], 600, "BG_ENV_FILE=/nonexistent");
    snprintf(vars[n++], 600, "BG_LLM_BASE_URL=%s", demo_url);
    snprintf(vars[n++], 600, "BG_LLM_MODEL=demo-1");
    /* short enough that a hung provider ends a test in seconds */
    snprintf(vars[n++], 600, "BG_LLM_FIRST_TOKEN_TIMEOUT_MS=3000");
    snprintf(vars[n++], 600, "BG_LLM_IDLE_TIMEOUT_MS=5000");
    for (int i = 0; i < n; i++)
        env[i] = vars[i];
    env[n] = NULL;
    char log[400];
    snprintf(log, sizeof(log), "%s/%s.log", tmp, name);
    const char *argv[] = {bgt_bin("bg-worker"), "--roles", "llm,usage", NULL};
    pid_t pid = bgt_spawn(argv, env, log);
    cr_assert_gt(pid, 0);
    if (nchildren < BG_ARRAY_SIZE(children))
        children[nchildren++] = pid;
    return pid;
}

/* ---- Postgres ---- */

/* Runs sql; copies the first field of the first row into out ("" when none or NULL). */
static void pg_value(const char *sql, int n, const char *const *params, char *out, size_t outlen)
{
    PGresult *res;
    int rc = bg_pg_exec(conn, sql, n, params, &res);
    cr_assert_eq(rc, 0, "%s: %s", sql, bg_strerror(rc));
    snprintf(out, outlen, "%s",
             PQntuples(res) > 0 && !PQgetisnull(res, 0, 0) ? PQgetvalue(res, 0, 0) : "");
    PQclear(res);
}

static long long pg_int1(const char *sql, const char *param)
{
    char v[64];
    const char *p[] = {param};
    pg_value(sql, 1, p, v, sizeof(v));
    return v[0] != '\0' ? strtoll(v, NULL, 10) : -1;
}

/* A user with a billing account and a running trial (50 requests a day), compiled into Redis. */
static void make_user(char uid[40])
{
    char email[64];
    snprintf(email, sizeof(email), "llm-%lld@example.com", (long long)bgt_now_ms());
    const char *p[] = {email};
    pg_value("WITH u AS (INSERT INTO users (email, name) VALUES ($1, 'Ada') RETURNING id), "
             "o AS (INSERT INTO organizations (name, personal, owner_id) "
             "  SELECT 'ws', true, id FROM u RETURNING id, owner_id), "
             "m AS (INSERT INTO memberships (organization_id, user_id, role) "
             "  SELECT id, owner_id, 'owner' FROM o), "
             "b AS (INSERT INTO billing_accounts (user_id) SELECT id FROM u) "
             "SELECT id FROM u",
             1, p, uid, 40);
    const char *s[] = {uid};
    char id[64];
    pg_value("INSERT INTO subscriptions (billing_account_id, user_id, plan_id, status, "
             "current_period_start, current_period_end, trial_ends_at) "
             "SELECT b.id, $1, 'trial', 'trialing', now() - interval '1 hour', "
             "now() + interval '14 days', now() + interval '14 days' "
             "FROM billing_accounts b WHERE b.user_id = $1 RETURNING id",
             1, s, id, sizeof(id));
    cr_assert_neq(id[0], '\0');
    bg_admission_state_t st;
    int rc = bg_policy_compile_user(conn, uid, bg_timeutil_wall_ms(), &st);
    cr_assert_eq(rc, 0, "compile: %s", bg_strerror(rc));
    rc = bg_policy_state_write(rc_, SHARDS, &st);
    cr_assert_eq(rc, 0, "state write: %s", bg_strerror(rc));
}

/* ---- one job ---- */

typedef struct st_turn {
    char uid[40];
    char conv[BG_CHAT_ID_SIZE];
    char agent[BG_AGENT_ID_SIZE];
    char job[40];
    int shard;
} turn_t;

/* Admits a job with these fields (pairs), as the edge does. */
static void admit(const turn_t *t, const char *const *fields, size_t nfields)
{
    bg_admission_req_t req = {.user_id = t->uid,
                              .role = "llm",
                              .job_id = t->job,
                              .nfields = nfields,
                              .fields = fields,
                              .reservation_ttl_ms = 600000,
                              .stream_maxlen = 100000};
    bg_admission_decision_t d;
    int rc = bg_admission_admit(rc_, SHARDS, &req, &d);
    cr_assert_eq(rc, 0, "admit: %s", bg_strerror(rc));
    cr_assert_eq(d.verdict, BG_ADMISSION_OK, "%s", bg_admission_verdict_name(d.verdict));
}

/* Opens a conversation of a new user with agent_id (NULL: the default agent) and admits the job
 * of a turn saying content. stored false: as the edge does it, the job carries the message and
 * the worker stores it; stored true: as the Telegram channel does it, the message is stored
 * first and the job names it. */
static void submit_turn(turn_t *t, const char *agent_id, const char *content, bool stored)
{
    make_user(t->uid);
    if (agent_id != NULL) {
        snprintf(t->agent, sizeof(t->agent), "%s", agent_id);
    } else {
        bg_agent_t *agent = malloc(sizeof(*agent));
        cr_assert_eq(bg_agents_get_by_slug(conn, NULL, "assistant", agent), 0);
        snprintf(t->agent, sizeof(t->agent), "%s", agent->id);
        free(agent);
    }
    bg_chat_conversation_t conv;
    int rc = bg_chat_create(conn, t->uid, t->agent, "web", NULL, NULL, NULL, &conv);
    cr_assert_eq(rc, 0, "create: %s", bg_strerror(rc));
    snprintf(t->conv, sizeof(t->conv), "%s", conv.id);
    bg_id_uuid_v7_str(t->job);
    t->shard = bg_shard_of(t->uid, SHARDS);
    if (!stored) {
        const char *fields[] = {
            "user_id", t->uid,  "conversation_id", t->conv,       "agent_id",    t->agent,
            "content", content, "request_id",      "req-of-turn", "channel",     "web",
            "locale",  "en",    "max_tokens",      "0",           "temperature", ""};
        admit(t, fields, BG_ARRAY_SIZE(fields) / 2);
        return;
    }
    int64_t mid = 0;
    rc = bg_chat_append_user(conn, t->uid, t->conv, content, t->job, NULL, &mid);
    cr_assert_eq(rc, 0, "append: %s", bg_strerror(rc));
    char mids[24];
    snprintf(mids, sizeof(mids), "%lld", (long long)mid);
    const char *fields[] = {
        "user_id",    t->uid, "conversation_id", t->conv, "agent_id",    t->agent,
        "message_id", mids,   "channel",         "web",   "locale",      "en",
        "user_name",  "Ada",  "max_tokens",      "0",     "temperature", ""};
    admit(t, fields, BG_ARRAY_SIZE(fields) / 2);
}

static void submit_to(turn_t *t, const char *agent_id, const char *content)
{
    submit_turn(t, agent_id, content, false);
}

/* As the Telegram channel sends a photo: the message stored first, the image in the job. */
static void submit_image(turn_t *t, const char *agent_id, const char *caption, const char *image)
{
    make_user(t->uid);
    snprintf(t->agent, sizeof(t->agent), "%s", agent_id);
    bg_chat_conversation_t conv;
    int rc = bg_chat_create(conn, t->uid, t->agent, "web", NULL, NULL, NULL, &conv);
    cr_assert_eq(rc, 0, "create: %s", bg_strerror(rc));
    snprintf(t->conv, sizeof(t->conv), "%s", conv.id);
    bg_id_uuid_v7_str(t->job);
    t->shard = bg_shard_of(t->uid, SHARDS);
    int64_t mid = 0;
    rc = bg_chat_append_user(conn, t->uid, t->conv, caption, t->job, NULL, &mid);
    cr_assert_eq(rc, 0, "append: %s", bg_strerror(rc));
    char mids[24];
    snprintf(mids, sizeof(mids), "%lld", (long long)mid);
    const char *fields[] = {
        "user_id",    t->uid, "conversation_id", t->conv,    "agent_id",  t->agent,
        "message_id", mids,   "channel",         "telegram", "locale",    "en",
        "max_tokens", "0",    "temperature",     "",         "image_url", image};
    admit(t, fields, BG_ARRAY_SIZE(fields) / 2);
}

static void submit(turn_t *t, const char *content)
{
    submit_to(t, NULL, content);
}

/* Admits an API job (channel "api") of a new user on agent_id (NULL: the default agent) with the
 * request's messages (a JSON array text) and temperature ("" : the agent's). */
static void submit_api(turn_t *t, const char *agent_id, const char *messages,
                       const char *temperature)
{
    make_user(t->uid);
    if (agent_id != NULL) {
        snprintf(t->agent, sizeof(t->agent), "%s", agent_id);
    } else {
        bg_agent_t *agent = malloc(sizeof(*agent));
        cr_assert_eq(bg_agents_get_by_slug(conn, NULL, "assistant", agent), 0);
        snprintf(t->agent, sizeof(t->agent), "%s", agent->id);
        free(agent);
    }
    t->conv[0] = '\0';
    bg_id_uuid_v7_str(t->job);
    t->shard = bg_shard_of(t->uid, SHARDS);
    const char *fields[] = {"user_id",     t->uid,      "agent_id",  t->agent, "channel",    "api",
                            "locale",      "en",        "user_name", "Ada",    "max_tokens", "0",
                            "temperature", temperature, "messages",  messages};
    admit(t, fields, BG_ARRAY_SIZE(fields) / 2);
}

/* ---- the output stream ---- */

typedef struct st_events {
    size_t n;
    char type[MAX_EVENTS][16];
    char *data[MAX_EVENTS]; /* owned */
} events_t;

static void events_free(events_t *ev)
{
    for (size_t i = 0; i < ev->n; i++)
        free(ev->data[i]);
    ev->n = 0;
}

static void read_events(const turn_t *t, events_t *ev)
{
    events_free(ev);
    char key[BG_REDIS_KEY_MAX];
    cr_assert_eq(bg_jobout_key_stream(key, sizeof(key), t->shard, t->job), 0);
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_command(rc_, &reply, "XRANGE %s - +", key), 0);
    cr_assert_eq(reply->type, REDIS_REPLY_ARRAY);
    for (size_t i = 0; i < reply->elements && ev->n < MAX_EVENTS; i++) {
        const redisReply *f = reply->element[i]->element[1];
        const char *type = "", *data = "";
        for (size_t k = 0; k + 1 < f->elements; k += 2) {
            if (strcmp(f->element[k]->str, "type") == 0)
                type = f->element[k + 1]->str;
            else if (strcmp(f->element[k]->str, "data") == 0)
                data = f->element[k + 1]->str;
        }
        snprintf(ev->type[ev->n], 16, "%s", type);
        ev->data[ev->n] = strdup(data);
        ev->n++;
    }
    freeReplyObject(reply);
}

static size_t count_type(const events_t *ev, const char *type)
{
    size_t n = 0;
    for (size_t i = 0; i < ev->n; i++)
        n += strcmp(ev->type[i], type) == 0;
    return n;
}

static bool is_over(const events_t *ev)
{
    return ev->n > 0 &&
           (strcmp(ev->type[ev->n - 1], "done") == 0 || strcmp(ev->type[ev->n - 1], "error") == 0);
}

static void wait_over(const turn_t *t, events_t *ev, int timeout_ms)
{
    long long deadline = bgt_now_ms() + timeout_ms;
    for (;;) {
        read_events(t, ev);
        if (is_over(ev))
            return;
        cr_assert_lt(bgt_now_ms(), deadline, "job %s did not end (%zu events)", t->job, ev->n);
        sleep_ms(25);
    }
}

static void wait_first_delta(const turn_t *t, events_t *ev, int timeout_ms)
{
    long long deadline = bgt_now_ms() + timeout_ms;
    for (;;) {
        read_events(t, ev);
        if (count_type(ev, "delta") > 0)
            return;
        cr_assert_lt(bgt_now_ms(), deadline, "job %s showed no text", t->job);
        sleep_ms(20);
    }
}

/* The text a client shows at the end: the deltas after the last reset. */
static char *shown_text(const events_t *ev)
{
    bg_buf_t b;
    bg_buf_init(&b, 4u << 20);
    for (size_t i = 0; i < ev->n; i++) {
        if (strcmp(ev->type[i], "reset") == 0) {
            bg_buf_reset(&b);
        } else if (strcmp(ev->type[i], "delta") == 0) {
            bg_json_doc_t *doc = NULL;
            cr_assert_eq(bg_json_parse(ev->data[i], strlen(ev->data[i]), NULL, &doc, NULL, NULL), 0,
                         "%s", ev->data[i]);
            const char *s = NULL;
            size_t len = 0;
            cr_assert_eq(bg_json_get_strn(bg_json_root(doc), "text", &s, &len), 0);
            cr_assert_eq(bg_buf_append(&b, s, len), 0);
            bg_json_doc_free(doc);
        }
    }
    cr_assert_eq(bg_buf_putc(&b, '\0'), 0);
    char *s = bg_buf_steal(&b, NULL);
    bg_buf_dispose(&b);
    return s;
}

/* Parses the last event's data. */
static bg_json_doc_t *last_data(const events_t *ev)
{
    bg_json_doc_t *doc = NULL;
    cr_assert_eq(
        bg_json_parse(ev->data[ev->n - 1], strlen(ev->data[ev->n - 1]), NULL, &doc, NULL, NULL), 0);
    return doc;
}

static void stored_reply(const turn_t *t, char *content, size_t len, char status[16])
{
    const char *p[] = {t->job};
    pg_value("SELECT content FROM messages WHERE job_id = $1 AND role = 'assistant'", 1, p, content,
             len);
    pg_value("SELECT status FROM messages WHERE job_id = $1 AND role = 'assistant'", 1, p, status,
             16);
}

static bool settled(const turn_t *t)
{
    char marker[BG_REDIS_KEY_MAX];
    cr_assert_eq(bg_admission_key_marker(marker, sizeof(marker), t->shard, t->job), 0);
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_command(rc_, &reply, "EXISTS %s", marker), 0);
    bool yes = reply->type == REDIS_REPLY_INTEGER && reply->integer == 1;
    freeReplyObject(reply);
    return yes;
}

/* Waits for the usage worker: the record written and the reservation settled. */
static void wait_billed(const turn_t *t)
{
    long long deadline = bgt_now_ms() + 20000;
    while (pg_int1("SELECT count(*) FROM usage_records WHERE request_id = $1", t->job) < 1 ||
           !settled(t)) {
        cr_assert_lt(bgt_now_ms(), deadline, "job %s was not billed", t->job);
        sleep_ms(25);
    }
}

static long long quota_used(const turn_t *t)
{
    char key[BG_REDIS_KEY_MAX];
    cr_assert_eq(bg_policy_key_quota(key, sizeof(key), SHARDS, t->uid), 0);
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_command(rc_, &reply, "HGET %s used", key), 0);
    long long v = reply->type == REDIS_REPLY_STRING ? strtoll(reply->str, NULL, 10) : 0;
    freeReplyObject(reply);
    return v;
}

/* ---- tests ---- */

Test(llm_worker, a_reply_streams_what_is_stored_and_is_billed_once)
{
    pid_t worker = start_worker("w1", 5000);
    turn_t t;
    submit(&t, "Hello there, tell me something.");
    events_t *ev = calloc(1, sizeof(*ev));
    wait_over(&t, ev, 30000);

    cr_assert_eq(count_type(ev, "done"), 1);
    cr_assert_eq(count_type(ev, "reset"), 0);
    cr_assert_eq(count_type(ev, "error"), 0);
    char *shown = shown_text(ev);
    cr_assert(strncmp(shown, "Echo: Hello there, tell me something.", 37) == 0, "%s", shown);

    char content[8192], status[16];
    stored_reply(&t, content, sizeof(content), status);
    cr_assert_str_eq(shown, content);
    cr_assert_str_eq(status, "complete");

    bg_json_doc_t *doc = last_data(ev);
    const bg_json_t *done = bg_json_root(doc), *usage = NULL, *quota = NULL;
    const char *fr = NULL, *src = NULL, *mid = NULL, *reset_at = NULL;
    int64_t pt = 0, ct = 0, limit = 0, remaining = -1;
    cr_assert_eq(bg_json_get_str(done, "finish_reason", &fr), 0);
    cr_assert_str_eq(fr, "stop");
    const char *model = NULL;
    bool cached = true;
    cr_assert_eq(bg_json_get_str(done, "model", &model), 0);
    cr_assert_str_eq(model, "demo-1");
    cr_assert_eq(bg_json_get_bool(done, "cached", &cached), 0);
    cr_assert_not(cached, "the default agent does not cache");
    cr_assert_eq(bg_json_get_str(done, "message_id", &mid), 0);
    const char *p[] = {t.job};
    char want_mid[32];
    pg_value("SELECT id FROM messages WHERE job_id = $1 AND role = 'assistant'", 1, p, want_mid,
             sizeof(want_mid));
    cr_assert_str_eq(mid, want_mid);
    cr_assert_eq(bg_json_get_object(done, "usage", &usage), 0);
    cr_assert_eq(bg_json_get_str(usage, "source", &src), 0);
    cr_assert_str_eq(src, "provider");
    cr_assert_eq(bg_json_get_int(usage, "prompt_tokens", &pt), 0);
    cr_assert_eq(bg_json_get_int(usage, "completion_tokens", &ct), 0);
    cr_assert_gt(pt, 0);
    cr_assert_gt(ct, 10);
    cr_assert_eq(bg_json_get_object(done, "quota", &quota), 0);
    cr_assert_eq(bg_json_get_int(quota, "limit", &limit), 0);
    cr_assert_eq(bg_json_get_int(quota, "remaining", &remaining), 0);
    cr_assert_eq(bg_json_get_str(quota, "reset_at", &reset_at), 0);
    cr_assert_eq(limit, 50);
    cr_assert_eq(remaining, 49, "this request counts against the quota");
    int64_t reset_ms = 0;
    cr_assert_eq(bg_timeutil_parse_rfc3339(reset_at, strlen(reset_at), &reset_ms), 0);
    cr_assert_gt(reset_ms, bg_timeutil_wall_ms());
    /* batched: far fewer appends than tokens */
    cr_assert_lt((int64_t)count_type(ev, "delta"), ct);

    wait_billed(&t);
    cr_assert_eq(pg_int1("SELECT count(*) FROM usage_records WHERE request_id = $1 AND "
                         "status = 'ok' AND requests_charged = 1 AND completion_tokens = "
                         "(SELECT completion_tokens FROM messages WHERE job_id = $1 "
                         "AND role = 'assistant')",
                         t.job),
                 1);
    cr_assert_eq(quota_used(&t), 1);
    /* a clean stop closes the threads' provider clients and loops */
    int st = bgt_stop(worker, SIGTERM, 10000);
    cr_assert(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "worker exit status %d", st);
    bg_json_doc_free(doc);
    free(shown);
    events_free(ev);
    free(ev);
}

Test(llm_worker, a_canceled_reply_keeps_its_text_and_is_billed)
{
    start_worker("w1", 5000);
    turn_t t;
    submit(&t, "Stop me soon #fail:slow=100");
    events_t *ev = calloc(1, sizeof(*ev));
    wait_first_delta(&t, ev, 20000);
    cr_assert_eq(bg_jobout_cancel(rc_, t.shard, t.job, 600), 0);
    wait_over(&t, ev, 20000);

    cr_assert_eq(count_type(ev, "done"), 1);
    bg_json_doc_t *doc = last_data(ev);
    const char *fr = NULL;
    const bg_json_t *usage = NULL;
    int64_t ct = 0;
    cr_assert_eq(bg_json_get_str(bg_json_root(doc), "finish_reason", &fr), 0);
    cr_assert_str_eq(fr, "canceled");
    cr_assert_eq(bg_json_get_object(bg_json_root(doc), "usage", &usage), 0);
    cr_assert_eq(bg_json_get_int(usage, "completion_tokens", &ct), 0);
    /* the provider's own count (bg_llm_cancel reads on to its usage): at least what was shown */
    cr_assert_gt(ct, 0);

    char *shown = shown_text(ev);
    char content[8192], status[16];
    stored_reply(&t, content, sizeof(content), status);
    cr_assert_str_eq(status, "canceled");
    cr_assert_str_eq(shown, content);
    cr_assert_gt(strlen(content), 0);
    cr_assert(strstr(content, "laborum") == NULL, "the whole reply came: %s", content);

    wait_billed(&t);
    cr_assert_eq(pg_int1("SELECT count(*) FROM usage_records WHERE request_id = $1 AND "
                         "status = 'canceled' AND requests_charged = 1",
                         t.job),
                 1);
    cr_assert_eq(quota_used(&t), 1);
    bg_json_doc_free(doc);
    free(shown);
    events_free(ev);
    free(ev);
}

Test(llm_worker, a_provider_error_stores_nothing_and_is_refunded)
{
    start_worker("w1", 5000);
    turn_t t;
    submit(&t, "Break please #fail:500");
    events_t *ev = calloc(1, sizeof(*ev));
    wait_over(&t, ev, 30000);

    cr_assert_eq(count_type(ev, "delta"), 0);
    cr_assert_str_eq(ev->type[ev->n - 1], "error");
    bg_json_doc_t *doc = last_data(ev);
    const char *code = NULL;
    bool retryable = false;
    cr_assert_eq(bg_json_get_str(bg_json_root(doc), "code", &code), 0);
    cr_assert_str_eq(code, "provider_error");
    cr_assert_eq(bg_json_get_bool(bg_json_root(doc), "retryable", &retryable), 0);
    cr_assert(retryable);

    wait_billed(&t);
    cr_assert_eq(
        pg_int1("SELECT count(*) FROM messages WHERE job_id = $1 AND role = 'assistant'", t.job),
        0);
    cr_assert_eq(pg_int1("SELECT count(*) FROM usage_records WHERE request_id = $1 AND "
                         "status = 'error' AND requests_charged = 0",
                         t.job),
                 1);
    cr_assert_eq(quota_used(&t), 0, "a failed request costs no quota");
    bg_json_doc_free(doc);
    events_free(ev);
    free(ev);
}

Test(llm_worker, provider_failures_end_as_documented_with_usage_and_quota)
{
    start_worker("w1", 5000);
    /* before the first token: an error, nothing stored, refunded; after some text: the partial
     * reply stored as failed, recorded with estimated tokens, not charged (provider failures are
     * ours), and the quota given back either way */
    static const struct {
        const char *content;
        bool text;
        const char *code;
    } cases[] = {
        {"Limit me #fail:429", false, "rate_limited"},
        {"Wait for me #fail:hang", false, "provider_timeout"},
        {"Cut me short #fail:cut=3", true, "provider_error"},
        {"Garble me #fail:malformed=2", true, "provider_error"},
    };
    for (size_t i = 0; i < BG_ARRAY_SIZE(cases); i++) {
        turn_t t;
        submit(&t, cases[i].content);
        events_t *ev = calloc(1, sizeof(*ev));
        wait_over(&t, ev, 60000);
        cr_assert_str_eq(ev->type[ev->n - 1], "error", "%s", cases[i].content);
        cr_expect(strstr(ev->data[ev->n - 1], cases[i].code) != NULL, "%s: %s", cases[i].content,
                  ev->data[ev->n - 1]);
        if (cases[i].text)
            cr_expect_gt(count_type(ev, "delta"), 0, "%s: the text came first", cases[i].content);
        else
            cr_expect_eq(count_type(ev, "delta"), 0, "%s", cases[i].content);

        wait_billed(&t);
        cr_expect_eq(pg_int1("SELECT count(*) FROM messages WHERE job_id = $1 AND role = "
                             "'assistant' AND status = 'failed' AND length(content) > 0",
                             t.job),
                     cases[i].text ? 1 : 0, "%s: the partial reply is kept", cases[i].content);
        cr_expect_eq(pg_int1("SELECT count(*) FROM usage_records WHERE request_id = $1 AND "
                             "status = 'error' AND requests_charged = 0",
                             t.job),
                     1, "%s: one uncharged usage record", cases[i].content);
        if (cases[i].text)
            cr_expect_eq(pg_int1("SELECT count(*) FROM usage_records WHERE request_id = $1 AND "
                                 "token_source = 'estimated' AND completion_tokens > 0",
                                 t.job),
                         1, "%s: a count never silently zero", cases[i].content);
        cr_expect_eq(quota_used(&t), 0, "%s: costs no quota", cases[i].content);
        events_free(ev);
        free(ev);
    }
}

Test(llm_worker, an_unknown_conversation_ends_as_internal_and_is_refunded)
{
    start_worker("w1", 5000);
    turn_t t;
    submit_turn(&t, NULL, "Hello", true);
    /* the conversation vanishes between admission and the worker */
    const char *p[] = {t.conv};
    char v[8];
    pg_value("UPDATE conversations SET deleted_at = now() WHERE id = $1 RETURNING 1", 1, p, v,
             sizeof(v));
    events_t *ev = calloc(1, sizeof(*ev));
    wait_over(&t, ev, 30000);
    cr_assert_str_eq(ev->type[ev->n - 1], "error");
    cr_assert(strstr(ev->data[ev->n - 1], "\"internal\"") != NULL, "%s", ev->data[ev->n - 1]);
    wait_billed(&t);
    cr_assert_eq(pg_int1("SELECT count(*) FROM usage_records WHERE request_id = $1 AND "
                         "requests_charged = 0",
                         t.job),
                 1);
    events_free(ev);
    free(ev);
}

Test(llm_worker, a_turn_stores_the_users_message_once_before_the_reply)
{
    start_worker("w1", 5000);
    turn_t t;
    submit(&t, "Remember this line.");
    events_t *ev = calloc(1, sizeof(*ev));
    wait_over(&t, ev, 30000);
    cr_assert_str_eq(ev->type[ev->n - 1], "done", "%s", ev->data[ev->n - 1]);
    const char *p[] = {t.job};
    char v[256];
    pg_value("SELECT content || '|' || coalesce(request_id, '') FROM messages WHERE job_id = $1 "
             "AND role = 'user'",
             1, p, v, sizeof(v));
    cr_assert_str_eq(v, "Remember this line.|req-of-turn");
    /* the conversation reads: the user's message, then the reply, counted once each */
    const char *pc[] = {t.conv};
    pg_value("SELECT string_agg(role, ',' ORDER BY id) || '|' || (SELECT message_count FROM "
             "conversations WHERE id = $1::uuid) FROM messages WHERE conversation_id = $1::uuid",
             1, pc, v, sizeof(v));
    cr_assert_str_eq(v, "user,assistant|2");
    events_free(ev);
    free(ev);
}

/* Counts the places needle occurs in hay. */
static int occurrences(const char *hay, const char *needle)
{
    int n = 0;
    for (const char *p = strstr(hay, needle); p != NULL; p = strstr(p + 1, needle))
        n++;
    return n;
}

/* Admits the next turn of t's conversation under a new job id, as the edge does. */
static void submit_next(turn_t *t, const char *content)
{
    bg_id_uuid_v7_str(t->job);
    const char *fields[] = {
        "user_id", t->uid,  "conversation_id", t->conv,       "agent_id",    t->agent,
        "content", content, "request_id",      "req-of-turn", "channel",     "web",
        "locale",  "en",    "max_tokens",      "0",           "temperature", ""};
    admit(t, fields, BG_ARRAY_SIZE(fields) / 2);
}

Test(llm_worker, a_turn_is_rendered_with_the_conversation_before_it_and_its_message_once)
{
    start_worker("w1", 5000);
    turn_t t;
    submit(&t, "Name a colour.");
    events_t *ev = calloc(1, sizeof(*ev));
    wait_over(&t, ev, 30000);
    cr_assert_str_eq(ev->type[ev->n - 1], "done", "%s", ev->data[ev->n - 1]);
    char *first = shown_text(ev);
    events_free(ev);

    /* the next turn: the provider gets the first question and its reply, then this message */
    submit_next(&t, "And another? #echo:messages");
    memset(ev, 0, sizeof(*ev));
    wait_over(&t, ev, 30000);
    cr_assert_str_eq(ev->type[ev->n - 1], "done", "%s", ev->data[ev->n - 1]);
    char *shown = shown_text(ev);
    char want[512];
    snprintf(want, sizeof(want), "user: Name a colour. | assistant: %.40s", first);
    cr_assert(strstr(shown, want) != NULL, "the earlier turn comes first: %s", shown);
    cr_assert_eq(occurrences(shown, "And another?"), 1, "the user's message once: %s", shown);
    cr_assert(strstr(shown, "And another?") > strstr(shown, "Name a colour."), "%s", shown);
    free(shown);
    events_free(ev);

    /* a job delivered again after its first run stored the message: still once, stored once */
    bg_id_uuid_v7_str(t.job);
    bg_chat_posted_t posted;
    cr_assert_eq(
        bg_chat_post_user(conn, t.uid, t.conv, "Once more #echo:messages", t.job, NULL, &posted),
        0);
    const char *fields[] = {"user_id",    t.uid,   "conversation_id", t.conv,
                            "agent_id",   t.agent, "content",         "Once more #echo:messages",
                            "channel",    "web",   "locale",          "en",
                            "max_tokens", "0",     "temperature",     ""};
    admit(&t, fields, BG_ARRAY_SIZE(fields) / 2);
    memset(ev, 0, sizeof(*ev));
    wait_over(&t, ev, 30000);
    cr_assert_str_eq(ev->type[ev->n - 1], "done", "%s", ev->data[ev->n - 1]);
    shown = shown_text(ev);
    cr_assert_eq(occurrences(shown, "Once more"), 1, "the stored message once: %s", shown);
    cr_assert(strstr(shown, "And another?") != NULL, "with the turns before it: %s", shown);
    cr_assert_eq(
        pg_int1("SELECT count(*) FROM messages WHERE job_id = $1 AND role = 'user'", t.job), 1,
        "stored once");
    const char *pc[] = {t.conv};
    char v[128];
    pg_value("SELECT string_agg(role, ',' ORDER BY id) || '|' || (SELECT message_count FROM "
             "conversations WHERE id = $1::uuid) FROM messages WHERE conversation_id = $1::uuid",
             1, pc, v, sizeof(v));
    cr_assert_str_eq(v, "user,assistant,user,assistant,user,assistant|6");
    free(shown);
    free(first);
    events_free(ev);
    free(ev);
}

Test(llm_worker, a_turn_whose_conversation_was_deleted_meanwhile_is_not_found_and_refunded)
{
    turn_t t;
    submit(&t, "Anyone there?");
    /* deleted through another edge after this one admitted the turn */
    const char *p[] = {t.conv};
    char v[8];
    pg_value("UPDATE conversations SET deleted_at = now() WHERE id = $1 RETURNING 1", 1, p, v,
             sizeof(v));
    start_worker("w1", 5000);
    events_t *ev = calloc(1, sizeof(*ev));
    wait_over(&t, ev, 30000);
    cr_assert_str_eq(ev->type[ev->n - 1], "error");
    cr_assert(strstr(ev->data[ev->n - 1], "\"not_found\"") != NULL, "%s", ev->data[ev->n - 1]);
    wait_billed(&t);
    cr_assert_eq(pg_int1("SELECT count(*) FROM usage_records WHERE request_id = $1 AND "
                         "requests_charged = 0",
                         t.job),
                 1, "refunded");
    cr_assert_eq(pg_int1("SELECT count(*) FROM messages WHERE job_id = $1", t.job), 0,
                 "nothing stored in a deleted conversation");
    cr_assert_eq(quota_used(&t), 0);
    events_free(ev);
    free(ev);
}

Test(llm_worker, a_worker_killed_mid_reply_is_replaced_and_the_reply_exists_once)
{
    pid_t first = start_worker("w1", 800);
    turn_t t;
    submit(&t, "Survive this #fail:slow=40");
    events_t *ev = calloc(1, sizeof(*ev));
    wait_first_delta(&t, ev, 20000);
    cr_assert_eq(kill(first, SIGKILL), 0);
    int st;
    cr_assert_eq(waitpid(first, &st, 0), first);
    start_worker("w2", 800);
    wait_over(&t, ev, 60000);

    cr_assert_geq(count_type(ev, "reset"), 1, "the new worker started over");
    cr_assert_eq(count_type(ev, "done"), 1);
    char *shown = shown_text(ev);
    char content[8192], status[16];
    stored_reply(&t, content, sizeof(content), status);
    cr_assert_str_eq(status, "complete");
    cr_assert_str_eq(shown, content);
    cr_assert(strncmp(content, "Echo: Survive this", 18) == 0, "%s", content);
    cr_assert(strstr(content, "laborum.") != NULL, "the reply is complete: %s", content);
    /* exactly once: the text is not repeated */
    cr_assert_eq(strstr(content + 1, "Echo:"), NULL);

    wait_billed(&t);
    sleep_ms(1500); /* a late duplicate would show up by now */
    cr_assert_eq(
        pg_int1("SELECT count(*) FROM messages WHERE job_id = $1 AND role = 'assistant'", t.job),
        1);
    cr_assert_eq(
        pg_int1("SELECT count(*) FROM messages WHERE job_id = $1 AND role = 'user'", t.job), 1,
        "the user's message, stored by the first worker, is not stored again by the second");
    cr_assert_eq(pg_int1("SELECT count(*) FROM usage_records WHERE request_id = $1", t.job), 1);
    cr_assert_eq(quota_used(&t), 1);
    free(shown);
    events_free(ev);
    free(ev);
}

/* ---- agents of the tests ---- */

static const bg_actor_t admin = {
    .kind = "system", .id = NULL, .request_id = "req-test", .ip = NULL};

typedef struct st_agent_opts {
    const char *definition; /* the prompt's JSON */
    double temperature;     /* < 0: not set */
    bool cache;
    int cache_ttl_s;
    const char *model; /* NULL: the deployment's */
} agent_opts_t;

/* Creates a prompt and a system agent following it; writes the agent's id. */
static void create_agent(const char *slug, const agent_opts_t *o, char id[BG_AGENT_ID_SIZE])
{
    bg_prompt_t *p = NULL;
    bg_prompt_err_t e = {0};
    cr_assert_eq(bg_prompt_parse(o->definition, strlen(o->definition), &p, &e), 0, "%s %s", e.field,
                 e.reason != NULL ? e.reason : "");
    char pid[BG_AGENT_ID_SIZE];
    cr_assert_eq(bg_prompts_create(conn, NULL, slug, "test", p, &admin, pid), 0);
    bg_prompt_free(p);
    bg_agent_spec_t s;
    bg_agent_spec_init(&s);
    s.slug = slug;
    s.name = slug;
    s.prompt_id = pid;
    s.prompt_version = 0;
    s.temperature = o->temperature;
    s.cache_enabled = o->cache ? 1 : 0;
    s.cache_ttl_s = o->cache_ttl_s;
    s.model = o->model;
    s.channels = BG_AGENT_CHANNEL_ALL;
    s.visibility = "public"; /* users may open conversations with it */
    bg_agent_t *a = malloc(sizeof(*a));
    cr_assert_eq(bg_agents_create(conn, &s, &admin, a, &e), 0, "%s %s", e.field,
                 e.reason != NULL ? e.reason : "");
    snprintf(id, BG_AGENT_ID_SIZE, "%s", a->id);
    free(a);
}

/* A string member of the last event's data ("" when absent). */
static void last_str(const events_t *ev, const char *key, char *out, size_t outlen)
{
    bg_json_doc_t *doc = last_data(ev);
    const char *v = NULL;
    snprintf(out, outlen, "%s", bg_json_get_str(bg_json_root(doc), key, &v) == 0 ? v : "");
    bg_json_doc_free(doc);
}

static bool last_cached(const events_t *ev)
{
    bg_json_doc_t *doc = last_data(ev);
    bool cached = false;
    cr_assert_eq(bg_json_get_bool(bg_json_root(doc), "cached", &cached), 0, "%s",
                 ev->data[ev->n - 1]);
    bg_json_doc_free(doc);
    return cached;
}

/* The response cache keys now in Redis. */
static long long cache_keys(long long *ttl)
{
    redisReply *reply = NULL;
    cr_assert_eq(bg_redis_command(rc_, &reply, "KEYS %s*", BG_LLM_CACHE_PREFIX), 0);
    cr_assert_eq(reply->type, REDIS_REPLY_ARRAY);
    long long n = (long long)reply->elements;
    if (ttl != NULL && n > 0) {
        redisReply *t = NULL;
        cr_assert_eq(bg_redis_command(rc_, &t, "TTL %s", reply->element[0]->str), 0);
        *ttl = t->integer;
        freeReplyObject(t);
    }
    freeReplyObject(reply);
    return n;
}

/* Runs one web turn to its end on agent_id; returns the events (caller frees). */
static events_t *web_turn(turn_t *t, const char *agent_id, const char *content)
{
    submit_to(t, agent_id, content);
    events_t *ev = calloc(1, sizeof(*ev));
    wait_over(t, ev, 30000);
    return ev;
}

static void stop_provider(void)
{
    bgt_stop(demo_pid, SIGTERM, 3000);
    demo_pid = 0;
}

/* ---- API jobs ---- */

Test(llm_worker, an_api_job_streams_its_reply_and_ends_with_model_and_usage)
{
    start_worker("w1", 5000);
    turn_t t;
    submit_api(&t, NULL, "[{\"role\":\"user\",\"content\":\"Hello from the API\"}]", "");
    events_t *ev = calloc(1, sizeof(*ev));
    wait_over(&t, ev, 30000);

    cr_assert_eq(count_type(ev, "error"), 0, "%s", ev->data[ev->n - 1]);
    cr_assert_eq(count_type(ev, "done"), 1);
    cr_assert_gt(count_type(ev, "delta"), 0);
    char *shown = shown_text(ev);
    cr_assert(strncmp(shown, "Echo: Hello from the API. Lorem", 31) == 0, "%s", shown);
    cr_assert(strstr(shown, "laborum.") != NULL, "the whole reply: %s", shown);

    bg_json_doc_t *doc = last_data(ev);
    const bg_json_t *done = bg_json_root(doc), *usage = NULL;
    const char *fr = NULL, *model = NULL, *src = NULL, *mid = NULL;
    int64_t pt = 0, ct = 0;
    bool cached = true;
    cr_assert_eq(bg_json_get_str(done, "finish_reason", &fr), 0);
    cr_assert_str_eq(fr, "stop");
    cr_assert_eq(bg_json_get_str(done, "model", &model), 0);
    cr_assert_str_eq(model, "demo-1");
    cr_assert_eq(bg_json_get_bool(done, "cached", &cached), 0);
    cr_assert_not(cached);
    cr_assert(bg_json_get_str(done, "message_id", &mid) != 0 || mid[0] == '\0',
              "an API reply is no stored message");
    cr_assert_eq(bg_json_get_object(done, "usage", &usage), 0);
    cr_assert_eq(bg_json_get_int(usage, "prompt_tokens", &pt), 0);
    cr_assert_eq(bg_json_get_int(usage, "completion_tokens", &ct), 0);
    cr_assert_eq(bg_json_get_str(usage, "source", &src), 0);
    cr_assert_str_eq(src, "provider");
    /* the default agent's system prompt came first: far more words than the request's four */
    cr_assert_gt(pt, 20);
    cr_assert_gt(ct, 60);

    wait_billed(&t);
    cr_assert_eq(pg_int1("SELECT count(*) FROM usage_records WHERE request_id = $1 AND "
                         "channel = 'api' AND status = 'ok' AND requests_charged = 1 AND "
                         "model = 'demo-1' AND NOT cache_hit",
                         t.job),
                 1);
    cr_assert_eq(pg_int1("SELECT count(*) FROM messages WHERE job_id = $1", t.job), 0,
                 "nothing stored");
    cr_assert_eq(quota_used(&t), 1);
    bg_json_doc_free(doc);
    free(shown);
    events_free(ev);
    free(ev);
}

Test(llm_worker, an_api_job_sends_the_system_prompt_then_the_request_messages_in_order)
{
    char agent[BG_AGENT_ID_SIZE];
    const agent_opts_t o = {
        .definition = "{\"system\":\"Be brief, {{builtin.user_name}} on {{builtin.channel}}.\","
                      "\"examples\":[{\"user\":\"Ex Q\",\"assistant\":\"Ex A\"}],"
                      "\"user\":\"Wrapped: {{message}}\"}",
        .temperature = 0.5,
        .cache_ttl_s = 60};
    create_agent("ordered", &o, agent);
    start_worker("w1", 5000);
    turn_t t;
    submit_api(&t, agent,
               "[{\"role\":\"developer\",\"content\":\"Rule one\"},"
               "{\"role\":\"user\",\"content\":\"First\"},"
               "{\"role\":\"assistant\",\"content\":\"Reply\"},"
               "{\"role\":\"system\",\"content\":\"Rule two\"},"
               "{\"role\":\"user\",\"content\":\"Last #echo:messages\"}]",
               "");
    events_t *ev = calloc(1, sizeof(*ev));
    wait_over(&t, ev, 30000);
    cr_assert_eq(count_type(ev, "done"), 1, "%s", ev->data[ev->n - 1]);
    char *shown = shown_text(ev);
    /* the prompt's user template wraps web messages only: the request's messages go verbatim,
     * and a developer message reaches the provider as a system one */
    static const char want[] = "Echo: system: Be brief, Ada on api. | user: Ex Q | assistant: Ex A "
                               "| system: Rule one | user: First | assistant: Reply | system: "
                               "Rule two | user: Last #echo:messages. Lorem ipsum";
    cr_assert(strncmp(shown, want, strlen(want)) == 0, "%s", shown);
    free(shown);
    events_free(ev);
    free(ev);
}

Test(llm_worker, an_api_job_on_a_prompt_that_needs_variables_is_refused_and_refunded)
{
    char agent[BG_AGENT_ID_SIZE];
    const agent_opts_t o = {
        .definition = "{\"system\":\"Talk about {{topic}}.\",\"variables\":[{\"name\":\"topic\","
                      "\"type\":\"string\",\"required\":true}]}",
        .temperature = 0.5};
    create_agent("needs-vars", &o, agent);
    start_worker("w1", 5000);
    turn_t t;
    submit_api(&t, agent, "[{\"role\":\"user\",\"content\":\"Hi\"}]", "");
    events_t *ev = calloc(1, sizeof(*ev));
    wait_over(&t, ev, 30000);

    cr_assert_eq(count_type(ev, "delta"), 0);
    cr_assert_str_eq(ev->type[ev->n - 1], "error");
    bg_json_doc_t *doc = last_data(ev);
    const char *code = NULL;
    bool retryable = true;
    cr_assert_eq(bg_json_get_str(bg_json_root(doc), "code", &code), 0);
    cr_assert_str_eq(code, "invalid_request");
    cr_assert_eq(bg_json_get_bool(bg_json_root(doc), "retryable", &retryable), 0);
    cr_assert_not(retryable, "the same request fails the same way");

    wait_billed(&t);
    cr_assert_eq(pg_int1("SELECT count(*) FROM usage_records WHERE request_id = $1 AND "
                         "channel = 'api' AND requests_charged = 0",
                         t.job),
                 1);
    cr_assert_eq(quota_used(&t), 0, "a refused request costs no quota");
    bg_json_doc_free(doc);
    events_free(ev);
    free(ev);
}

Test(llm_worker, an_api_job_whose_worker_dies_starts_over_and_is_billed_once)
{
    pid_t first = start_worker("w1", 800);
    turn_t t;
    submit_api(&t, NULL, "[{\"role\":\"user\",\"content\":\"Survive this #fail:slow=40\"}]", "");
    events_t *ev = calloc(1, sizeof(*ev));
    wait_first_delta(&t, ev, 20000);
    cr_assert_eq(kill(first, SIGKILL), 0);
    int st;
    cr_assert_eq(waitpid(first, &st, 0), first);
    start_worker("w2", 800);
    wait_over(&t, ev, 60000);

    cr_assert_geq(count_type(ev, "reset"), 1, "the new worker started over");
    cr_assert_eq(count_type(ev, "done"), 1);
    char *shown = shown_text(ev);
    cr_assert(strncmp(shown, "Echo: Survive this", 18) == 0, "%s", shown);
    cr_assert(strstr(shown, "laborum.") != NULL, "the reply is complete: %s", shown);
    cr_assert_eq(strstr(shown + 1, "Echo:"), NULL, "the text is not repeated: %s", shown);

    wait_billed(&t);
    sleep_ms(1500); /* a late duplicate would show up by now */
    cr_assert_eq(pg_int1("SELECT count(*) FROM usage_records WHERE request_id = $1", t.job), 1);
    cr_assert_eq(quota_used(&t), 1);
    free(shown);
    events_free(ev);
    free(ev);
}

/* ---- response cache ---- */

Test(llm_worker, identical_deterministic_turns_are_answered_from_the_cache)
{
    char agent[BG_AGENT_ID_SIZE];
    const agent_opts_t o = {.definition = "{\"system\":\"Answer briefly.\"}",
                            .temperature = 0,
                            .cache = true,
                            .cache_ttl_s = 600};
    create_agent("cached", &o, agent);
    start_worker("w1", 5000);
    turn_t t1, t2;
    events_t *ev1 = web_turn(&t1, agent, "What are your opening hours?");
    cr_assert_eq(count_type(ev1, "done"), 1, "%s", ev1->data[ev1->n - 1]);
    cr_assert_not(last_cached(ev1));
    char *first = shown_text(ev1);
    long long ttl = 0;
    cr_assert_eq(cache_keys(&ttl), 1, "the complete reply was cached");
    cr_assert(ttl > 590 && ttl <= 600, "the agent's TTL: %lld", ttl);

    /* from here on the provider cannot answer: only the cache can */
    stop_provider();
    events_t *ev2 = web_turn(&t2, agent, "What are your opening hours?");
    cr_assert_eq(count_type(ev2, "done"), 1, "%s", ev2->data[ev2->n - 1]);
    cr_assert(last_cached(ev2));
    char *second = shown_text(ev2);
    cr_assert_str_eq(second, first);
    char content[8192], status[16];
    stored_reply(&t2, content, sizeof(content), status);
    cr_assert_str_eq(content, first, "a cached reply is stored like any other");
    cr_assert_str_eq(status, "complete");

    wait_billed(&t2);
    cr_assert_eq(pg_int1("SELECT count(*) FROM usage_records WHERE request_id = $1 AND "
                         "cache_hit AND status = 'ok' AND requests_charged = 1",
                         t2.job),
                 1);
    /* billed with the tokens of the reply it replays */
    cr_assert_eq(
        pg_int1("SELECT completion_tokens FROM usage_records WHERE request_id = $1", t2.job),
        pg_int1("SELECT completion_tokens FROM messages WHERE job_id = $1 AND "
                "role = 'assistant'",
                t1.job));
    cr_assert_eq(quota_used(&t2), 1, "a cached reply still counts against the quota");
    wait_billed(&t1);
    cr_assert_eq(
        pg_int1("SELECT count(*) FROM usage_records WHERE request_id = $1 AND NOT cache_hit",
                t1.job),
        1);

    /* an API request that renders to the same messages is the same request */
    turn_t t3;
    submit_api(&t3, agent, "[{\"role\":\"user\",\"content\":\"What are your opening hours?\"}]",
               "0");
    events_t *ev3 = calloc(1, sizeof(*ev3));
    wait_over(&t3, ev3, 30000);
    cr_assert_eq(count_type(ev3, "done"), 1, "%s", ev3->data[ev3->n - 1]);
    cr_assert(last_cached(ev3));
    char *third = shown_text(ev3);
    cr_assert_str_eq(third, first);
    wait_billed(&t3);
    cr_assert_eq(pg_int1("SELECT count(*) FROM usage_records WHERE request_id = $1 AND "
                         "cache_hit AND channel = 'api'",
                         t3.job),
                 1);
    free(first);
    free(second);
    free(third);
    events_free(ev1);
    events_free(ev2);
    events_free(ev3);
    free(ev1);
    free(ev2);
    free(ev3);
}

Test(llm_worker, sampled_turns_and_agents_without_caching_are_never_replayed)
{
    char sampled[BG_AGENT_ID_SIZE], off[BG_AGENT_ID_SIZE];
    const agent_opts_t so = {.definition = "{\"system\":\"Be creative.\"}",
                             .temperature = 0.8,
                             .cache = true,
                             .cache_ttl_s = 600};
    const agent_opts_t oo = {.definition = "{\"system\":\"Be exact.\"}", .temperature = 0};
    create_agent("sampled", &so, sampled);
    create_agent("uncached", &oo, off);
    start_worker("w1", 5000);
    turn_t t1, t2, t3;
    events_t *ev1 = web_turn(&t1, sampled, "Same question");
    events_t *ev2 = web_turn(&t2, off, "Same question");
    cr_assert_eq(count_type(ev1, "done"), 1);
    cr_assert_eq(count_type(ev2, "done"), 1);
    cr_assert_eq(cache_keys(NULL), 0, "nothing was cached");

    /* an API request asking for temperature 0 on the sampling agent is deterministic, though */
    submit_api(&t3, sampled, "[{\"role\":\"user\",\"content\":\"Same question\"}]", "0");
    events_t *ev3 = calloc(1, sizeof(*ev3));
    wait_over(&t3, ev3, 30000);
    cr_assert_eq(count_type(ev3, "done"), 1);
    cr_assert_not(last_cached(ev3));
    cr_assert_eq(cache_keys(NULL), 1);

    stop_provider();
    turn_t t4;
    events_t *ev4 = web_turn(&t4, off, "Same question");
    cr_assert_str_eq(ev4->type[ev4->n - 1], "error", "not replayed: the provider was needed");
    events_free(ev1);
    events_free(ev2);
    events_free(ev3);
    events_free(ev4);
    free(ev1);
    free(ev2);
    free(ev3);
    free(ev4);
}

/* ---- images ---- */

Test(llm_worker, a_photo_reaches_a_vision_model_as_an_image_part)
{
    char vision[BG_AGENT_ID_SIZE], plain[BG_AGENT_ID_SIZE];
    const agent_opts_t v = {
        .definition = "{\"system\":\"Describe.\"}", .temperature = -1, .model = "demo-vision-1"};
    create_agent("seer", &v, vision);
    const agent_opts_t p = {
        .definition = "{\"system\":\"Describe.\"}", .temperature = -1, .model = "demo-1"};
    create_agent("blind", &p, plain);
    start_worker("w1", 5000);
    /* a 1x1 PNG */
    const char *png =
        "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4"
        "2mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";

    turn_t t;
    submit_image(&t, vision, "What is on this photo?", png);
    events_t *ev = calloc(1, sizeof(*ev));
    wait_over(&t, ev, 30000);
    cr_assert_str_eq(ev->type[ev->n - 1], "done", "%s", ev->data[ev->n - 1]);
    char *shown = shown_text(ev);
    cr_assert(strncmp(shown, "Echo: What is on this photo?", 28) == 0, "%s", shown);
    /* the image was counted by the provider: its tokens are in the prompt's */
    bg_json_doc_t *doc = last_data(ev);
    const bg_json_t *usage = NULL;
    int64_t pt = 0;
    cr_assert_eq(bg_json_get_object(bg_json_root(doc), "usage", &usage), 0);
    cr_assert_eq(bg_json_get_int(usage, "prompt_tokens", &pt), 0);
    cr_assert_geq(pt, 85, "an image costs the demo provider 85 tokens (%lld)", (long long)pt);
    bg_json_doc_free(doc);
    free(shown);

    /* a model without vision refuses the image: an error, nothing charged */
    turn_t u;
    submit_image(&u, plain, "And this one?", png);
    wait_over(&u, ev, 30000);
    cr_assert_str_eq(ev->type[ev->n - 1], "error", "%s", ev->data[ev->n - 1]);
    wait_billed(&u);
    cr_assert_eq(quota_used(&u), 0);
    events_free(ev);
    free(ev);
}

/* ---- the agent cache ---- */

Test(llm_worker, an_agent_change_reaches_jobs_within_the_agent_ttl)
{
    char agent[BG_AGENT_ID_SIZE];
    const agent_opts_t o = {
        .definition = "{\"system\":\"Hi.\"}", .temperature = 0.5, .model = "demo-1"};
    create_agent("changing", &o, agent);
    start_worker("w1", 5000);
    turn_t t1, t2, t3;
    long long loaded = bgt_now_ms();
    events_t *ev1 = web_turn(&t1, agent, "Which model?");
    char model[64];
    last_str(ev1, "model", model, sizeof(model));
    cr_assert_str_eq(model, "demo-1");

    bg_agent_spec_t s;
    bg_agent_spec_init(&s);
    s.model = "demo-vision-1";
    bg_agent_t *a = malloc(sizeof(*a));
    bg_prompt_err_t e;
    cr_assert_eq(bg_agents_update(conn, agent, &s, &admin, a, &e), 0);
    free(a);

    events_t *ev2 = web_turn(&t2, agent, "Which model now?");
    last_str(ev2, "model", model, sizeof(model));
    if (bgt_now_ms() - loaded < 4000)
        cr_assert_str_eq(model, "demo-1", "the agent is reused for its TTL");

    sleep_ms(5200);
    events_t *ev3 = web_turn(&t3, agent, "And now?");
    last_str(ev3, "model", model, sizeof(model));
    cr_assert_str_eq(model, "demo-vision-1", "the change shows once the TTL has passed");
    char content[8192], status[16];
    stored_reply(&t3, content, sizeof(content), status);
    cr_assert_str_eq(status, "complete");
    events_free(ev1);
    events_free(ev2);
    events_free(ev3);
    free(ev1);
    free(ev2);
    free(ev3);
}

/* ---- the conversation cache ---- */

/* The worker's bg_llm_context_total{source} (the worker runs with worker_port set). */
static long long contexts_from(const char *source)
{
    char url[128], want[96];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/metrics", worker_port);
    bgt_resp_t resp;
    cr_assert_eq(bgt_http(BGT_H1, "GET", url, NULL, NULL, 0, &resp), 0, "%s", resp.error);
    cr_assert_eq(resp.status, 200);
    snprintf(want, sizeof(want), "bg_llm_context_total{source=\"%s\"} ", source);
    const char *at = strstr(resp.body, want);
    long long n = at != NULL ? strtoll(at + strlen(want), NULL, 10) : 0;
    bgt_resp_free(&resp);
    return n;
}

static void start_metered_worker(void)
{
    worker_port = bgt_free_port();
    start_worker("w1", 5000);
    char url[128];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/healthz", worker_port);
    cr_assert_eq(bgt_wait_http(url, 200, 10000), 0, "the worker's health endpoint");
}

/* Runs the next turn of t's conversation to its end; returns what it showed (owned). Replies are
 * kept short (10 tokens) so that an echo of the whole conversation fits in its own reply. */
static char *next_turn(turn_t *t, const char *content)
{
    bg_id_uuid_v7_str(t->job);
    bool echo = strstr(content, "#echo:") != NULL;
    const char *fields[] = {"user_id",         t->uid,
                            "conversation_id", t->conv,
                            "agent_id",        t->agent,
                            "content",         content,
                            "request_id",      "req-of-turn",
                            "channel",         "web",
                            "locale",          "en",
                            "max_tokens",      echo ? "4000" : "10",
                            "temperature",     ""};
    admit(t, fields, BG_ARRAY_SIZE(fields) / 2);
    events_t *ev = calloc(1, sizeof(*ev));
    wait_over(t, ev, 30000);
    cr_assert_str_eq(ev->type[ev->n - 1], "done", "%s", ev->data[ev->n - 1]);
    char *shown = shown_text(ev);
    events_free(ev);
    free(ev);
    return shown;
}

Test(llm_worker, consecutive_turns_take_their_conversation_from_the_cache_and_see_it_whole)
{
    start_metered_worker();
    turn_t t;
    submit(&t, "Name a colour.");
    events_t *ev = calloc(1, sizeof(*ev));
    wait_over(&t, ev, 30000);
    char *a1 = shown_text(ev);
    events_free(ev);
    free(ev);
    char *a2 = next_turn(&t, "Name a fruit.");
    char *a3 = next_turn(&t, "Name a tree.");
    /* the first turn starts the conversation's sequence and is kept: the second is a hit */
    cr_assert_eq(contexts_from("database"), 1);
    cr_assert_eq(contexts_from("cache"), 2);

    char *echo = next_turn(&t, "All of it? #echo:messages");
    cr_assert_eq(contexts_from("cache"), 3, "the fourth turn from the cache too");
    cr_assert_eq(contexts_from("database"), 1);
    /* every earlier turn, in order, each once, then this message once */
    char want[1024];
    snprintf(want, sizeof(want), "user: Name a colour. | assistant: %.30s", a1);
    cr_assert(strstr(echo, want) != NULL, "%s", echo);
    const char *u2 = strstr(echo, "user: Name a fruit. | assistant: ");
    const char *u3 = strstr(echo, "user: Name a tree. | assistant: ");
    cr_assert(u2 != NULL && u3 != NULL && strstr(echo, want) < u2 && u2 < u3, "%s", echo);
    cr_assert(strncmp(u2 + strlen("user: Name a fruit. | assistant: "), a2, 20) == 0, "%s", echo);
    cr_assert(strncmp(u3 + strlen("user: Name a tree. | assistant: "), a3, 20) == 0, "%s", echo);
    cr_assert_eq(occurrences(echo, "All of it?"), 1, "%s", echo);
    cr_assert_eq(occurrences(echo, "user: Name a fruit."), 1, "%s", echo);
    free(echo);

    /* the same turn read from Postgres (the sequence lost, as after a Redis restart) shows the
     * same transcript up to this turn's own message */
    char key[BG_REDIS_KEY_MAX];
    cr_assert_eq(bg_convseq_key(key, sizeof(key), t.shard, t.conv), 0);
    redisReply *r = NULL;
    cr_assert_eq(bg_redis_command(rc_, &r, "DEL %s", key), 0);
    freeReplyObject(r);
    char *again = next_turn(&t, "Once again? #echo:messages");
    cr_assert_eq(contexts_from("database"), 2, "no sequence: a miss");
    cr_assert(strstr(again, want) != NULL && strstr(again, "All of it? #echo:messages") != NULL,
              "%s", again);
    free(again);
    free(a1);
    free(a2);
    free(a3);
}

/* Starts a metered worker and runs three turns of a new conversation (the first as the edge
 * admits it, the next two with short replies): the second and third come from the cache. */
static void cached_conversation(turn_t *t, const char *first, const char *second, const char *third)
{
    start_metered_worker();
    submit(t, first);
    events_t *ev = calloc(1, sizeof(*ev));
    wait_over(t, ev, 30000);
    events_free(ev);
    free(ev);
    free(next_turn(t, second));
    free(next_turn(t, third));
    cr_assert_eq(contexts_from("cache"), 2, "the conversation is cached");
}

Test(llm_worker, a_message_another_process_stores_is_in_the_next_turn)
{
    turn_t t;
    cached_conversation(&t, "First.", "Second.", "Third.");

    /* stored elsewhere as the Telegram channel does it: the message, then the sequence moved */
    char job[40];
    bg_id_uuid_v7_str(job);
    int64_t mid = 0;
    cr_assert_eq(bg_chat_append_user(conn, t.uid, t.conv, "A note from elsewhere", job, NULL, &mid),
                 0);
    cr_assert_eq(bg_convseq_bump(rc_, t.shard, t.conv, NULL), 0);

    char *echo = next_turn(&t, "What did I say? #echo:messages");
    cr_assert(strstr(echo, "user: A note from elsewhere") != NULL, "%s", echo);
    cr_assert(strstr(echo, "A note from elsewhere") > strstr(echo, "Third."), "%s", echo);
    cr_assert_eq(contexts_from("cache"), 2, "the moved sequence made it a miss");
    cr_assert_eq(contexts_from("database"), 2);
    free(echo);
}

Test(llm_worker, a_renamed_user_is_addressed_by_the_new_name_from_a_cached_conversation)
{
    turn_t t;
    cached_conversation(&t, "Hello.", "Hello again.", "Still here.");
    events_t *ev = calloc(1, sizeof(*ev));

    /* renamed (PATCH /me) between two turns: the sequence does not move for that */
    const char *p[] = {t.uid};
    char v[8];
    pg_value("UPDATE users SET name = 'Grace' WHERE id = $1::uuid RETURNING 1", 1, p, v, sizeof(v));
    submit_next(&t, "Who am I? #echo:messages");
    wait_over(&t, ev, 30000);
    cr_assert_str_eq(ev->type[ev->n - 1], "done", "%s", ev->data[ev->n - 1]);
    /* the demo provider answers at once, so the abandoned call may have shown its first delta:
     * then a reset took it back, and what the client shows is the new reply alone */
    cr_assert_leq(count_type(ev, "reset"), 1);
    cr_assert_eq(count_type(ev, "done"), 1);
    char *echo = shown_text(ev);
    cr_assert(strstr(echo, "The user's name is Grace") != NULL, "%s", echo);
    cr_assert(strstr(echo, "Ada") == NULL, "%s", echo);
    cr_assert_eq(occurrences(echo, "Who am I?"), 1, "the message once: %s", echo);
    cr_assert(strstr(echo, "Still here.") != NULL, "%s", echo);
    cr_assert_eq(contexts_from("cache"), 3, "the turn started from the cache, then over");
    free(echo);
    events_free(ev);
    free(ev);
    /* one reply, one usage record, one request charged */
    cr_assert_eq(
        pg_int1("SELECT count(*) FROM messages WHERE job_id = $1 AND role = 'assistant'", t.job),
        1);
    cr_assert_eq(
        pg_int1("SELECT count(*) FROM messages WHERE job_id = $1 AND role = 'user'", t.job), 1);
    wait_billed(&t);
    cr_assert_eq(pg_int1("SELECT count(*) FROM usage_records WHERE request_id = $1", t.job), 1);
    cr_assert_eq(quota_used(&t), 4);

    /* and the turn after it is cached again, under the new name */
    char *next = next_turn(&t, "And now? #echo:messages");
    cr_assert(strstr(next, "The user's name is Grace") != NULL, "%s", next);
    free(next);
}

Test(llm_worker, a_cached_history_is_bounded_as_postgres_bounds_it)
{
    /* a conversation of 40 messages of 1..300 bytes, some not complete (not in any history) */
    turn_t t;
    make_user(t.uid);
    bg_agent_t *agent = malloc(sizeof(*agent));
    cr_assert_eq(bg_agents_get_by_slug(conn, NULL, "assistant", agent), 0);
    bg_chat_conversation_t conv;
    cr_assert_eq(bg_chat_create(conn, t.uid, agent->id, "web", NULL, NULL, NULL, &conv), 0);
    free(agent);
    unsigned seed = 7;
    for (int i = 0; i < 40; i++) {
        char text[320], job[40];
        size_t len = 1 + (size_t)(rand_r(&seed) % 300);
        memset(text, 'a' + i % 26, len);
        text[len] = '\0';
        bg_id_uuid_v7_str(job);
        int64_t id = 0;
        if (i % 2 == 0) {
            cr_assert_eq(bg_chat_append_user(conn, t.uid, conv.id, text, job, NULL, &id), 0);
        } else {
            const bg_chat_reply_t reply = {.job_id = job,
                                           .content = text,
                                           .status = i % 7 == 1 ? "failed" : NULL,
                                           .prompt_tokens = -1,
                                           .completion_tokens = -1};
            bool created = false;
            cr_assert_eq(bg_chat_append_assistant(conn, conv.id, &reply, &id, &created), 0);
        }
    }
    bg_chat_context_t all;
    cr_assert_eq(bg_chat_context(conn, t.uid, conv.id, "no-job", BG_CHAT_HISTORY_MAX, 0, &all), 0);
    cr_assert_gt(all.history.count, 30);
    const size_t counts[] = {1, 2, 5, 17, 1000};
    const size_t budgets[] = {0, 1, 150, 299, 300, 301, 1000, 2500, 100000};
    for (size_t a = 0; a < BG_ARRAY_SIZE(counts); a++) {
        for (size_t b = 0; b < BG_ARRAY_SIZE(budgets); b++) {
            bg_chat_context_t pg;
            cr_assert_eq(
                bg_chat_context(conn, t.uid, conv.id, "no-job", counts[a], budgets[b], &pg), 0);
            /* the whole history, bounded by the cache's own rule */
            bg_chat_context_t mine;
            memset(&mine, 0, sizeof(mine));
            for (size_t i = 0; i < all.history.count; i++)
                wk_ctx_history_push(&mine.history, all.history.items[i].id,
                                    all.history.items[i].role, all.history.items[i].content,
                                    all.history.items[i].content_len);
            wk_ctx_history_trim(&mine.history, counts[a], budgets[b]);
            cr_assert_eq(mine.history.count, pg.history.count, "%zu messages, %zu bytes", counts[a],
                         budgets[b]);
            for (size_t i = 0; i < pg.history.count; i++)
                cr_assert_eq(mine.history.items[i].id, pg.history.items[i].id);
            bg_chat_context_dispose(&mine);
            bg_chat_context_dispose(&pg);
        }
    }
    bg_chat_context_dispose(&all);
}
