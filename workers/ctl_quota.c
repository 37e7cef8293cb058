/*
 * bgctl quota: the Redis admission state and quota counters of users, against Postgres.
 *
 *   bgctl quota rebuild (--user ID | --all)
 *   bgctl quota show (--user ID | --email E)
 *
 * Redis is a cache of Postgres (DESIGN.md §3): after a FLUSHALL, a failover without persistence, or
 * a change the edge missed, `rebuild` compiles each user's admission hash again (bg/policy.h) and
 * sets the quota counters of the current window from usage_records: used = requests charged (status
 * ok or canceled), tused = their tokens. Requests in flight at that moment (admitted, no usage
 * record yet) are not counted: run it when traffic is low, or accept that many extra requests.
 *
 * `show` prints the limit, usage, remaining requests and reset time as Redis has them and as
 * Postgres computes them, and lists every difference. It exits 1 when there is drift, so a cron job
 * can alert on it. A small positive difference in "used" during traffic is expected (Redis counts a
 * request when it is admitted, Postgres when its usage is recorded).
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/err.h"
#include "bg/id.h"
#include "bg/pg.h"
#include "bg/policy.h"
#include "bg/redis.h"
#include "bg/timeutil.h"
#include "ctl.h"

static const char usage_text[] = "usage: bgctl quota rebuild (--user ID | --all)\n"
                                 "       bgctl quota show (--user ID | --email E)\n";

#define BATCH 500

typedef struct st_opts {
    const char *user;  /* borrowed from argv */
    const char *email; /* borrowed from argv */
    bool all;
} opts_t;

static int parse_args(int argc, char **argv, const char *cmd, opts_t *o)
{
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        bool has_value = i + 1 < argc;
        if (strcmp(a, "--user") == 0 && has_value) {
            o->user = argv[++i];
        } else if (strcmp(a, "--email") == 0 && has_value) {
            o->email = argv[++i];
        } else if (strcmp(a, "--all") == 0) {
            o->all = true;
        } else {
            fprintf(stderr, "bgctl quota %s: unknown option or missing value: %s\n%s", cmd, a,
                    usage_text);
            return 2;
        }
    }
    return 0;
}

/* Connects to both stores. Returns 0, or 1 after saying why. */
static int connect_stores(const bg_config_t *cfg, PGconn **c, bg_redis_t **r)
{
    char err[512];
    *r = NULL;
    if (bg_pg_connect(cfg->database_url, 3, c, err, sizeof(err)) != 0) {
        fprintf(stderr, "bgctl quota: cannot connect to Postgres: %s\n", err);
        return 1;
    }
    int rc = bg_redis_new(cfg->redis_url, cfg->redis_timeout_ms, r);
    if (rc == 0)
        rc = bg_redis_connect(*r);
    if (rc != 0) {
        fprintf(stderr, "bgctl quota: cannot connect to Redis: %s\n", bg_strerror(rc));
        bg_redis_free(*r);
        *r = NULL;
        PQfinish(*c);
        *c = NULL;
        return 1;
    }
    return 0;
}

static void fmt_time(char out[BG_RFC3339_BUFSIZE], int64_t ms)
{
    if (bg_timeutil_format_rfc3339(out, BG_RFC3339_BUFSIZE, ms, false) != 0)
        (void)bg_strlcpy(out, "?", BG_RFC3339_BUFSIZE);
}

/* Recompiles one user's state and counters and writes them. Returns 0 or a bg_err. */
static int rebuild_one(PGconn *c, bg_redis_t *r, int shards, const char *user_id)
{
    int64_t now = bg_timeutil_wall_ms();
    bg_admission_state_t st;
    int rc = bg_policy_compile_user(c, user_id, now, &st);
    if (rc != 0)
        return rc;
    int64_t win = bg_policy_window_start(&st, now);
    int64_t end = bg_policy_window_end(&st, now);
    int64_t used, tused;
    rc = bg_policy_usage_count(c, st.user_id, win, end > now ? end : now + 1, &used, &tused);
    if (rc != 0)
        return rc;
    rc = bg_policy_state_write(r, shards, &st);
    if (rc == 0)
        rc = bg_policy_quota_write(r, shards, st.user_id, win, used, tused);
    if (rc != 0)
        return rc;
    char from[BG_RFC3339_BUFSIZE], to[BG_RFC3339_BUFSIZE];
    fmt_time(from, win);
    fmt_time(to, end);
    printf("rebuilt %s: status=%s plan=%s limit=%" PRId64 " used=%" PRId64 " tokens=%" PRId64
           " window=%s..%s shard=%d\n",
           st.user_id, st.status, st.plan[0] != '\0' ? st.plan : "-", st.limits.q_limit, used,
           tused, from, to, bg_shard_of(st.user_id, shards));
    return 0;
}

static int rebuild_all(PGconn *c, bg_redis_t *r, int shards)
{
    char after[BG_UUID_STR_LEN + 1] = "00000000-0000-0000-0000-000000000000";
    char limit[16];
    snprintf(limit, sizeof(limit), "%d", BATCH);
    long done = 0, failed = 0;
    for (;;) {
        PGresult *res;
        const char *p[] = {after, limit};
        int rc = bg_pg_exec(c,
                            "SELECT id FROM users WHERE deleted_at IS NULL AND id > $1::uuid "
                            "ORDER BY id LIMIT $2::int",
                            2, p, &res);
        if (rc != 0) {
            fprintf(stderr, "bgctl quota rebuild: cannot list users: %s\n", bg_strerror(rc));
            return 1;
        }
        int rows = PQntuples(res);
        for (int i = 0; i < rows; i++) {
            const char *id = PQgetvalue(res, i, 0);
            rc = rebuild_one(c, r, shards, id);
            if (rc != 0) {
                fprintf(stderr, "bgctl quota rebuild: user %s: %s\n", id, bg_strerror(rc));
                failed++;
            } else {
                done++;
            }
        }
        if (rows > 0)
            (void)bg_strlcpy(after, PQgetvalue(res, rows - 1, 0), sizeof(after));
        PQclear(res);
        if (rows < BATCH)
            break;
    }
    printf("rebuilt %ld user(s), %ld failed\n", done, failed);
    return failed > 0 ? 1 : 0;
}

static int cmd_rebuild(int argc, char **argv, const bg_config_t *cfg)
{
    opts_t o = {0};
    int status = parse_args(argc, argv, "rebuild", &o);
    if (status != 0)
        return status;
    if ((o.user == NULL) == !o.all || o.email != NULL) {
        fprintf(stderr, "bgctl quota rebuild: give one of --user ID or --all\n%s", usage_text);
        return 2;
    }
    if (o.user != NULL && !bg_id_uuid_is_valid(o.user)) {
        fprintf(stderr, "bgctl quota rebuild: \"%s\" is not a user id\n", o.user);
        return 1;
    }
    PGconn *c;
    bg_redis_t *r;
    if (connect_stores(cfg, &c, &r) != 0)
        return 1;
    if (o.all) {
        status = rebuild_all(c, r, cfg->shards);
    } else {
        int rc = rebuild_one(c, r, cfg->shards, o.user);
        if (rc != 0) {
            fprintf(stderr, "bgctl quota rebuild: user %s: %s\n", o.user,
                    rc == BG_ERR_NOT_FOUND ? "no such user" : bg_strerror(rc));
            status = 1;
        }
    }
    bg_redis_free(r);
    PQfinish(c);
    return status;
}

/* ---- show ---- */

/* Returns the value of field in a HGETALL reply (borrowed), or NULL. */
static const char *hfield(const redisReply *h, const char *field)
{
    if (h == NULL || h->type != REDIS_REPLY_ARRAY)
        return NULL;
    for (size_t i = 0; i + 1 < h->elements; i += 2) {
        const redisReply *k = h->element[i];
        const redisReply *v = h->element[i + 1];
        if (k->type == REDIS_REPLY_STRING && v->type == REDIS_REPLY_STRING &&
            strcmp(k->str, field) == 0)
            return v->str;
    }
    return NULL;
}

static int64_t hint(const redisReply *h, const char *field)
{
    const char *s = hfield(h, field);
    if (s == NULL)
        return 0;
    char *end;
    long long v = strtoll(s, &end, 10);
    return end != s && *end == '\0' ? (int64_t)v : 0;
}

/* Finds the live user by email; copies the id. Returns 0, BG_ERR_NOT_FOUND or a database error. */
static int user_by_email(PGconn *c, const char *email, char id[BG_UUID_STR_LEN + 1])
{
    PGresult *res;
    const char *p[] = {email};
    int rc =
        bg_pg_exec(c, "SELECT id FROM users WHERE lower(email) = lower($1) AND deleted_at IS NULL",
                   1, p, &res);
    if (rc != 0)
        return rc;
    rc = PQntuples(res) > 0 ? 0 : BG_ERR_NOT_FOUND;
    if (rc == 0)
        (void)bg_strlcpy(id, PQgetvalue(res, 0, 0), BG_UUID_STR_LEN + 1);
    PQclear(res);
    return rc;
}

/* Reads a hash; *out is the owned reply (NULL on error). */
static int hgetall(bg_redis_t *r, const char *key, redisReply **out)
{
    const char *argv[] = {"HGETALL", key};
    int rc = bg_redis_argv(r, 2, argv, NULL, out);
    if (rc == 0 && (*out)->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(*out);
        *out = NULL;
        return BG_ERR_PROTOCOL;
    }
    return rc;
}

typedef struct st_view {
    const char *status, *plan, *features;
    int64_t limit, used, tused, win, reset, rpm, burst, conc, tok_cap, tq_limit;
} view_t;

static void print_view(const char *source, const view_t *v)
{
    char reset[BG_RFC3339_BUFSIZE], win[BG_RFC3339_BUFSIZE];
    fmt_time(reset, v->reset);
    fmt_time(win, v->win);
    int64_t remaining = v->limit > v->used ? v->limit - v->used : 0;
    printf("%-9s status=%s plan=%s limit=%" PRId64 " used=%" PRId64 " remaining=%" PRId64
           " reset=%s window_start=%s tokens=%" PRId64 " token_limit=%" PRId64 " rpm=%" PRId64
           " burst=%" PRId64 " concurrency=%" PRId64 " max_tokens=%" PRId64 " features=%s\n",
           source, v->status, bg_str_present(v->plan) ? v->plan : "-", v->limit, v->used, remaining,
           reset, win, v->tused, v->tq_limit, v->rpm, v->burst, v->conc, v->tok_cap, v->features);
}

/* Prints one difference; returns 1 when there is one. */
static int diff_int(const char *what, int64_t redis, int64_t pg)
{
    if (redis == pg)
        return 0;
    printf("drift: %s redis=%" PRId64 " postgres=%" PRId64 "\n", what, redis, pg);
    return 1;
}

static int diff_str(const char *what, const char *redis, const char *pg)
{
    if (strcmp(redis, pg) == 0)
        return 0;
    printf("drift: %s redis=%s postgres=%s\n", what, redis, pg);
    return 1;
}

static int show(PGconn *c, bg_redis_t *r, int shards, const char *user_id)
{
    int64_t now = bg_timeutil_wall_ms();
    bg_admission_state_t st;
    int rc = bg_policy_compile_user(c, user_id, now, &st);
    if (rc != 0) {
        fprintf(stderr, "bgctl quota show: %s\n",
                rc == BG_ERR_NOT_FOUND ? "no such user" : bg_strerror(rc));
        return 1;
    }
    view_t pg = {.status = st.status,
                 .plan = st.plan,
                 .features = st.limits.features,
                 .limit = st.limits.q_limit,
                 .win = bg_policy_window_start(&st, now),
                 .reset = bg_policy_window_end(&st, now),
                 .rpm = st.limits.rpm,
                 .burst = st.limits.burst,
                 .conc = st.limits.conc,
                 .tok_cap = st.limits.tok_cap,
                 .tq_limit = st.limits.tq_limit};
    rc = bg_policy_usage_count(c, st.user_id, pg.win, pg.reset > now ? pg.reset : now + 1, &pg.used,
                               &pg.tused);
    if (rc != 0) {
        fprintf(stderr, "bgctl quota show: cannot count usage: %s\n", bg_strerror(rc));
        return 1;
    }

    char akey[BG_REDIS_KEY_MAX], qkey[BG_REDIS_KEY_MAX];
    redisReply *adm = NULL, *quota = NULL;
    rc = bg_policy_key_adm(akey, sizeof(akey), shards, st.user_id);
    if (rc == 0)
        rc = bg_policy_key_quota(qkey, sizeof(qkey), shards, st.user_id);
    if (rc == 0)
        rc = hgetall(r, akey, &adm);
    if (rc == 0)
        rc = hgetall(r, qkey, &quota);
    if (rc != 0) {
        fprintf(stderr, "bgctl quota show: cannot read Redis: %s\n", bg_strerror(rc));
        freeReplyObject(adm);
        return 1;
    }

    printf("user %s shard %d\n", st.user_id, bg_shard_of(st.user_id, shards));
    int drift = 0;
    if (adm->elements == 0) {
        printf("redis     no admission state (%s)\n", akey);
        print_view("postgres", &pg);
        printf("drift: admission state missing in Redis; run bgctl quota rebuild --user %s\n",
               st.user_id);
        drift = 1;
    } else {
        /* What the admission script would see now, from the hash as it is. */
        bg_admission_state_t rs = {.w_anchor = hint(adm, "w_anchor"),
                                   .w_len = hint(adm, "w_len"),
                                   .w_until = hint(adm, "w_until")};
        view_t rv = {.status = hfield(adm, "status") ? hfield(adm, "status") : "",
                     .plan = hfield(adm, "plan") ? hfield(adm, "plan") : "",
                     .features = hfield(adm, "features") ? hfield(adm, "features") : "",
                     .limit = hint(adm, "q_limit"),
                     .win = bg_policy_window_start(&rs, now),
                     .reset = bg_policy_window_end(&rs, now),
                     .rpm = hint(adm, "rpm"),
                     .burst = hint(adm, "burst"),
                     .conc = hint(adm, "conc"),
                     .tok_cap = hint(adm, "tok_cap"),
                     .tq_limit = hint(adm, "tq_limit")};
        /* Counters of an older window are stale: the script starts the new window at zero. */
        bool current = quota->elements > 0 && hint(quota, "win") == rv.win;
        rv.used = current ? hint(quota, "used") : 0;
        rv.tused = current ? hint(quota, "tused") : 0;
        char compiled[BG_RFC3339_BUFSIZE];
        fmt_time(compiled, hint(adm, "v"));
        print_view("redis", &rv);
        print_view("postgres", &pg);
        printf("compiled  %s\n", compiled);
        drift += diff_str("status", rv.status, pg.status);
        drift += diff_str("plan", rv.plan, pg.plan);
        drift += diff_int("limit", rv.limit, pg.limit);
        /* Nothing is admitted without a plan: the window of a "none" state means nothing. */
        if (strcmp(rv.status, "none") != 0 || strcmp(pg.status, "none") != 0) {
            drift += diff_int("window_start", rv.win, pg.win);
            drift += diff_int("reset", rv.reset, pg.reset);
            drift += diff_int("used", rv.used, pg.used);
            drift += diff_int("tokens", rv.tused, pg.tused);
        }
        drift += diff_int("token_limit", rv.tq_limit, pg.tq_limit);
        drift += diff_int("rpm", rv.rpm, pg.rpm);
        drift += diff_int("burst", rv.burst, pg.burst);
        drift += diff_int("concurrency", rv.conc, pg.conc);
        drift += diff_int("max_tokens", rv.tok_cap, pg.tok_cap);
        drift += diff_str("features", rv.features, pg.features);
        if (drift == 0)
            printf("drift: none\n");
    }
    freeReplyObject(adm);
    freeReplyObject(quota);
    return drift > 0 ? 1 : 0;
}

static int cmd_show(int argc, char **argv, const bg_config_t *cfg)
{
    opts_t o = {0};
    int status = parse_args(argc, argv, "show", &o);
    if (status != 0)
        return status;
    if ((o.user == NULL) == (o.email == NULL) || o.all) {
        fprintf(stderr, "bgctl quota show: give one of --user ID or --email E\n%s", usage_text);
        return 2;
    }
    if (o.user != NULL && !bg_id_uuid_is_valid(o.user)) {
        fprintf(stderr, "bgctl quota show: \"%s\" is not a user id\n", o.user);
        return 1;
    }
    PGconn *c;
    bg_redis_t *r;
    if (connect_stores(cfg, &c, &r) != 0)
        return 1;
    char id[BG_UUID_STR_LEN + 1];
    int rc = 0;
    if (o.email != NULL)
        rc = user_by_email(c, o.email, id);
    else
        (void)bg_strlcpy(id, o.user, sizeof(id));
    if (rc != 0) {
        fprintf(stderr, "bgctl quota show: %s\n",
                rc == BG_ERR_NOT_FOUND ? "no user with that email" : bg_strerror(rc));
        status = 1;
    } else {
        status = show(c, r, cfg->shards, id);
    }
    bg_redis_free(r);
    PQfinish(c);
    return status;
}

int ctl_quota_main(int argc, char **argv, const bg_config_t *cfg)
{
    if (argc >= 2 && strcmp(argv[1], "rebuild") == 0)
        return cmd_rebuild(argc, argv, cfg);
    if (argc >= 2 && strcmp(argv[1], "show") == 0)
        return cmd_show(argc, argv, cfg);
    fprintf(stderr, "%s", usage_text);
    return 2;
}
