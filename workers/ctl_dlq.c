/*
 * bgctl dlq: the dead-letter streams of the workers (bg:{s<N>}:dlq:<role>, see runtime.h).
 *
 *   bgctl dlq list [--role R]                    one line per dead letter
 *   bgctl dlq replay --role R (--id ID | --all)  back onto the job stream, delivery count afresh
 *   bgctl dlq purge [--role R] (--id ID | --all) delete them
 *
 * With --role the role's stream on every shard is used; without it the dead-letter streams are
 * found with SCAN (so roles no longer registered, or only known to a test, are seen too). Each
 * replay is one Lua script per entry (lua/dlq_replay.lua): a crash halfway leaves every entry
 * either still dead or back on its stream, never both or neither.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/err.h"
#include "bg/redis.h"
#include "ctl.h"

#define PAGE 200

typedef struct st_dlq_key {
    int shard;
    char role[64];
    char key[BG_REDIS_KEY_MAX];
} dlq_key_t;

typedef struct st_opts {
    const char *role;
    const char *id;
    bool all;
} opts_t;

static int usage(void)
{
    fprintf(stderr, "usage: bgctl dlq list [--role R]\n"
                    "       bgctl dlq replay --role R (--id ID | --all)\n"
                    "       bgctl dlq purge [--role R] (--id ID | --all)\n");
    return 2;
}

static const char *field(const redisReply *fields, const char *name)
{
    for (size_t i = 0; i + 1 < fields->elements; i += 2) {
        if (fields->element[i]->type == REDIS_REPLY_STRING &&
            strcmp(fields->element[i]->str, name) == 0 &&
            fields->element[i + 1]->type == REDIS_REPLY_STRING)
            return fields->element[i + 1]->str;
    }
    return NULL;
}

/* Parses "bg:{s<N>}:dlq:<role>"; returns false for any other key. */
static bool parse_key(const char *key, dlq_key_t *out)
{
    static const char prefix[] = "bg:{s";
    if (strncmp(key, prefix, sizeof(prefix) - 1) != 0)
        return false;
    const char *p = key + sizeof(prefix) - 1;
    char *end = NULL;
    long shard = strtol(p, &end, 10);
    if (end == p || shard < 0 || shard > 100000 || strncmp(end, "}:dlq:", 6) != 0)
        return false;
    const char *role = end + 6;
    if (role[0] == '\0' || !bg_strlcpy(out->role, role, sizeof(out->role)) ||
        !bg_strlcpy(out->key, key, sizeof(out->key)))
        return false;
    out->shard = (int)shard;
    return true;
}

/* Collects the dead-letter streams to work on into *keys (owned); returns 0 or an error. */
static int find_keys(bg_redis_t *r, const bg_config_t *cfg, const char *role, dlq_key_t **keys,
                     size_t *n)
{
    *keys = NULL;
    *n = 0;
    if (role != NULL) {
        *keys = bg_calloc((size_t)cfg->shards, sizeof(**keys));
        for (int s = 0; s < cfg->shards; s++) {
            dlq_key_t *k = &(*keys)[s];
            k->shard = s;
            if (!bg_strlcpy(k->role, role, sizeof(k->role)) ||
                bg_redis_key_dlq(k->key, sizeof(k->key), s, role) != 0) {
                free(*keys);
                *keys = NULL;
                return BG_ERR_INVALID;
            }
        }
        *n = (size_t)cfg->shards;
        return 0;
    }
    char cursor[32] = "0";
    size_t cap = 0;
    do {
        redisReply *reply = NULL;
        int rc = bg_redis_command(r, &reply, "SCAN %s MATCH bg:{s*}:dlq:* COUNT 1000 TYPE stream",
                                  cursor);
        if (rc != 0) {
            free(*keys);
            *keys = NULL;
            *n = 0;
            return rc;
        }
        if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 2 ||
            reply->element[0]->type != REDIS_REPLY_STRING ||
            reply->element[1]->type != REDIS_REPLY_ARRAY) {
            freeReplyObject(reply);
            free(*keys);
            *keys = NULL;
            *n = 0;
            return BG_ERR_PROTOCOL;
        }
        (void)bg_strlcpy(cursor, reply->element[0]->str, sizeof(cursor));
        const redisReply *list = reply->element[1];
        for (size_t i = 0; i < list->elements; i++) {
            dlq_key_t k;
            if (list->element[i]->type != REDIS_REPLY_STRING ||
                !parse_key(list->element[i]->str, &k))
                continue;
            if (*n == cap) {
                cap = cap == 0 ? 16 : 2 * cap;
                *keys = bg_realloc(*keys, cap * sizeof(**keys));
            }
            (*keys)[(*n)++] = k;
        }
        freeReplyObject(reply);
    } while (strcmp(cursor, "0") != 0);
    return 0;
}

/*
 * Calls fn for every entry of the stream key, oldest first, a page at a time. fn returns 0 to go
 * on. Returns 0 or the first error.
 */
typedef int (*entry_fn)(bg_redis_t *r, const dlq_key_t *k, const char *id, const redisReply *fields,
                        void *ud);

static int each_entry(bg_redis_t *r, const dlq_key_t *k, entry_fn fn, void *ud)
{
    char start[64] = "-";
    for (;;) {
        redisReply *reply = NULL;
        int rc = bg_redis_command(r, &reply, "XRANGE %s %s + COUNT %d", k->key, start, PAGE);
        if (rc != 0)
            return rc;
        if (reply->type != REDIS_REPLY_ARRAY) {
            freeReplyObject(reply);
            return BG_ERR_PROTOCOL;
        }
        size_t got = reply->elements;
        for (size_t i = 0; i < got && rc == 0; i++) {
            const redisReply *e = reply->element[i];
            if (e->type != REDIS_REPLY_ARRAY || e->elements < 2 ||
                e->element[0]->type != REDIS_REPLY_STRING ||
                e->element[1]->type != REDIS_REPLY_ARRAY)
                continue;
            rc = fn(r, k, e->element[0]->str, e->element[1], ud);
            snprintf(start, sizeof(start), "(%s", e->element[0]->str);
        }
        freeReplyObject(reply);
        if (rc != 0 || got < PAGE)
            return rc;
    }
}

/* ---- list ---- */

static int print_entry(bg_redis_t *r, const dlq_key_t *k, const char *id, const redisReply *fields,
                       void *ud)
{
    (void)r;
    size_t *count = ud;
    const char *job_id = field(fields, "job_id");
    const char *role = field(fields, "dlq_role");
    const char *deliveries = field(fields, "dlq_deliveries");
    const char *error = field(fields, "dlq_error");
    printf("%d\t%s\t%s\t%s\t%s\t%s\n", k->shard, id, job_id != NULL ? job_id : "-",
           role != NULL ? role : k->role, deliveries != NULL ? deliveries : "-",
           bg_str_present(error) ? error : "-");
    (*count)++;
    return 0;
}

static int cmd_list(bg_redis_t *r, const dlq_key_t *keys, size_t n)
{
    size_t count = 0;
    printf("SHARD\tID\tJOB_ID\tROLE\tDELIVERIES\tERROR\n");
    for (size_t i = 0; i < n; i++) {
        int rc = each_entry(r, &keys[i], print_entry, &count);
        if (rc != 0) {
            fprintf(stderr, "bgctl: reading %s: %s\n", keys[i].key, bg_strerror(rc));
            return 1;
        }
    }
    printf("%zu dead letter(s)\n", count);
    return 0;
}

/* ---- replay ---- */

typedef struct st_replay {
    const bg_config_t *cfg;
    size_t done;
    int failed;
} replay_t;

/* Replays one entry; returns 0 (replayed), BG_ERR_NOT_FOUND, or an error. */
static int replay_one(bg_redis_t *r, const dlq_key_t *k, const char *id, const bg_config_t *cfg,
                      const char *job_id)
{
    char queue[BG_REDIS_KEY_MAX], maxlen[24];
    if (bg_redis_key_queue(queue, sizeof(queue), k->shard, k->role) != 0)
        return BG_ERR_INVALID;
    snprintf(maxlen, sizeof(maxlen), "%lld", (long long)cfg->stream_maxlen);
    const char *keys[] = {k->key, queue};
    const char *args[] = {id, maxlen};
    redisReply *reply = NULL;
    int rc = bg_redis_script(r, "lua/dlq_replay.lua", 2, keys, 2, args, &reply);
    if (rc != 0)
        return rc;
    if (reply->type == REDIS_REPLY_NIL) {
        rc = BG_ERR_NOT_FOUND;
    } else if (reply->type == REDIS_REPLY_STRING) {
        printf("replayed %s%s%s -> %s %s\n", id, job_id != NULL ? " job " : "",
               job_id != NULL ? job_id : "", queue, reply->str);
    } else {
        fprintf(stderr, "bgctl: replaying %s: %s\n", id,
                reply->type == REDIS_REPLY_ERROR ? reply->str : "unexpected reply");
        rc = BG_ERR_PROTOCOL;
    }
    freeReplyObject(reply);
    return rc;
}

static int replay_entry(bg_redis_t *r, const dlq_key_t *k, const char *id, const redisReply *fields,
                        void *ud)
{
    replay_t *st = ud;
    int rc = replay_one(r, k, id, st->cfg, field(fields, "job_id"));
    if (rc == 0)
        st->done++;
    else if (rc == BG_ERR_PROTOCOL)
        st->failed++; /* this entry is broken; the others may be fine */
    else if (rc != BG_ERR_NOT_FOUND)
        return rc; /* Redis went away: stop */
    return 0;
}

static int cmd_replay(bg_redis_t *r, const bg_config_t *cfg, const dlq_key_t *keys, size_t n,
                      const opts_t *o)
{
    replay_t st = {cfg, 0, 0};
    for (size_t i = 0; i < n; i++) {
        int rc;
        if (o->all) {
            rc = each_entry(r, &keys[i], replay_entry, &st);
        } else {
            rc = replay_one(r, &keys[i], o->id, cfg, NULL);
            if (rc == 0)
                st.done++;
            if (rc == BG_ERR_NOT_FOUND)
                rc = 0;
        }
        if (rc != 0) {
            fprintf(stderr, "bgctl: replaying from %s: %s\n", keys[i].key, bg_strerror(rc));
            return 1;
        }
        if (!o->all && st.done > 0)
            break;
    }
    if (!o->all && st.done == 0) {
        fprintf(stderr, "bgctl: no dead letter %s for role %s\n", o->id, o->role);
        return 1;
    }
    printf("%zu job(s) replayed\n", st.done);
    return st.failed > 0 ? 1 : 0;
}

/* ---- purge ---- */

static int cmd_purge(bg_redis_t *r, const dlq_key_t *keys, size_t n, const opts_t *o)
{
    long long removed = 0;
    for (size_t i = 0; i < n; i++) {
        redisReply *reply = NULL;
        int rc;
        if (o->all) {
            /* count first so the operator sees what went */
            rc = bg_redis_command(r, &reply, "XLEN %s", keys[i].key);
            if (rc == 0 && reply->type == REDIS_REPLY_INTEGER)
                removed += reply->integer;
            if (reply != NULL)
                freeReplyObject(reply);
            reply = NULL;
            if (rc == 0)
                rc = bg_redis_command(r, &reply, "DEL %s", keys[i].key);
        } else {
            rc = bg_redis_command(r, &reply, "XDEL %s %s", keys[i].key, o->id);
            if (rc == 0 && reply->type == REDIS_REPLY_INTEGER)
                removed += reply->integer;
        }
        if (reply != NULL)
            freeReplyObject(reply);
        if (rc != 0) {
            fprintf(stderr, "bgctl: purging %s: %s\n", keys[i].key, bg_strerror(rc));
            return 1;
        }
    }
    if (!o->all && removed == 0) {
        fprintf(stderr, "bgctl: no dead letter %s\n", o->id);
        return 1;
    }
    printf("%lld dead letter(s) purged\n", removed);
    return 0;
}

int ctl_dlq_main(int argc, char **argv, const bg_config_t *cfg)
{
    if (argc < 2)
        return usage();
    const char *sub = argv[1];
    opts_t o = {NULL, NULL, false};
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--role") == 0 && i + 1 < argc)
            o.role = argv[++i];
        else if (strcmp(argv[i], "--id") == 0 && i + 1 < argc)
            o.id = argv[++i];
        else if (strcmp(argv[i], "--all") == 0)
            o.all = true;
        else
            return usage();
    }
    bool is_list = strcmp(sub, "list") == 0, is_replay = strcmp(sub, "replay") == 0,
         is_purge = strcmp(sub, "purge") == 0;
    if (!is_list && !is_replay && !is_purge)
        return usage();
    if (is_list && (o.id != NULL || o.all))
        return usage();
    if ((is_replay || is_purge) && (o.id != NULL) == o.all)
        return usage(); /* exactly one of --id and --all */
    if (is_replay && o.role == NULL)
        return usage();

    (void)signal(SIGPIPE, SIG_IGN); /* a Redis connection reset must be an error, not a kill */
    bg_redis_t *r = NULL;
    if (bg_redis_new(cfg->redis_url, cfg->redis_timeout_ms, &r) != 0) {
        fprintf(stderr, "bgctl: BG_REDIS_URL is not a valid redis:// URL\n");
        return 1;
    }
    int rc = bg_redis_connect(r);
    if (rc != 0) {
        fprintf(stderr, "bgctl: cannot reach Redis at %s: %s\n", bg_redis_describe(r),
                bg_strerror(rc));
        bg_redis_free(r);
        return 1;
    }
    dlq_key_t *keys = NULL;
    size_t n = 0;
    rc = find_keys(r, cfg, o.role, &keys, &n);
    int status = 1;
    if (rc != 0)
        fprintf(stderr, "bgctl: finding the dead-letter streams: %s\n", bg_strerror(rc));
    else if (is_list)
        status = cmd_list(r, keys, n);
    else if (is_replay)
        status = cmd_replay(r, cfg, keys, n, &o);
    else
        status = cmd_purge(r, keys, n, &o);
    free(keys);
    bg_redis_free(r);
    return status;
}
