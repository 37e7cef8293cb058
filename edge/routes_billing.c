/*
 * /billing/account: the caller's plan, its state and what is left of the quota, as the admission
 * script sees them (DESIGN.md §5).
 *
 * The answer comes from Redis, not Postgres: the user's compiled admission hash, the quota hash of
 * the current window and the live reservations, read with three commands written back to back on
 * the loop's connection (they share the user's hash tag, so they go to one server in one round
 * trip). What the user sees is therefore exactly what the next chat request will be admitted
 * against. When the admission hash is missing (a flushed or new Redis), it is compiled from
 * Postgres on the thread pool and written back with the single-command HSET form before the
 * answer, so the next request finds it too. Redis down means 503: there is no Postgres fallback
 * for the counters, which live only in Redis.
 *
 * remaining = limit − used − held, where used counts only when the quota hash belongs to the
 * current window (the script resets it lazily on the next admission) and held counts reservations
 * whose expiry is still ahead, as lua/admit.lua does.
 *
 * scheduled_change (a cancellation or a downgrade at the period end), next_bill (when a live Paddle
 * subscription renews, at what price) and payment_method (of the last captured payment) are what
 * Redis does not have: they are read from Postgres on the pool after the Redis reads (or with the
 * compile). When Postgres cannot answer they are left out (null) rather than failing the account.
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "bg/admission.h"
#include "bg/billing.h"
#include "bg/err.h"
#include "bg/json.h"
#include "bg/log.h"
#include "bg/pg.h"
#include "bg/policy.h"
#include "bg/timeutil.h"
#include "edge.h"

/* The three reads of one request. */
enum { READ_ADM, READ_QUOTA, READ_HELD, READ_COUNT };

typedef struct st_account_op {
    const bg_config_t *cfg;
    char user_id[64];
    int pending;   /* replies still to come */
    int read_err;  /* the first transport error of the reads, 0 when none */
    bool have_adm; /* the admission hash was there and usable */
    bg_admission_state_t state;
    bool have_quota;
    int64_t q_win, q_used;
    int64_t held;
    /* compile on the pool */
    int rc;
    bg_billing_scheduled_t sched; /* a change scheduled for the period end (Postgres) */
    bg_billing_outlook_t outlook; /* the next bill and the payment method (Postgres) */
} account_op_t;

static void op_free(void *p)
{
    free(p);
}

static bool parse_i64(const char *s, size_t len, int64_t *out)
{
    char buf[32];
    if (len == 0 || len >= sizeof(buf))
        return false;
    memcpy(buf, s, len);
    buf[len] = '\0';
    char *end;
    long long v = strtoll(buf, &end, 10);
    if (*end != '\0')
        return false;
    *out = (int64_t)v;
    return true;
}

/* Copies the admission hash of an HGETALL reply into op->state; false when it is not usable. */
static bool take_adm(account_op_t *op, const redisReply *reply)
{
    bg_admission_state_t *s = &op->state;
    bool has_status = false, has_limit = false, has_anchor = false, has_len = false;
    if (reply->type != REDIS_REPLY_ARRAY)
        return false;
    for (size_t i = 0; i + 1 < reply->elements; i += 2) {
        const redisReply *k = reply->element[i], *v = reply->element[i + 1];
        if (k->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING)
            continue;
        const char *name = k->str;
        int64_t *num = NULL;
        bool *mark = NULL;
        if (strcmp(name, "status") == 0) {
            has_status = v->len < sizeof(s->status);
            if (has_status) {
                memcpy(s->status, v->str, v->len);
                s->status[v->len] = '\0';
            }
        } else if (strcmp(name, "plan") == 0) {
            if (v->len < sizeof(s->plan)) {
                memcpy(s->plan, v->str, v->len);
                s->plan[v->len] = '\0';
            }
        } else if (strcmp(name, "features") == 0) {
            if (v->len < sizeof(s->limits.features)) {
                memcpy(s->limits.features, v->str, v->len);
                s->limits.features[v->len] = '\0';
            }
        } else if (strcmp(name, "q_limit") == 0) {
            num = &s->limits.q_limit;
            mark = &has_limit;
        } else if (strcmp(name, "w_anchor") == 0) {
            num = &s->w_anchor;
            mark = &has_anchor;
        } else if (strcmp(name, "w_len") == 0) {
            num = &s->w_len;
            mark = &has_len;
        } else if (strcmp(name, "w_until") == 0) {
            num = &s->w_until;
        } else if (strcmp(name, "rpm") == 0) {
            num = &s->limits.rpm;
        } else if (strcmp(name, "burst") == 0) {
            num = &s->limits.burst;
        } else if (strcmp(name, "conc") == 0) {
            num = &s->limits.conc;
        } else if (strcmp(name, "tok_cap") == 0) {
            num = &s->limits.tok_cap;
        } else if (strcmp(name, "tq_limit") == 0) {
            num = &s->limits.tq_limit;
        } else if (strcmp(name, "v") == 0) {
            num = &s->v;
        }
        if (num != NULL) {
            bool ok = parse_i64(v->str, v->len, num);
            if (mark != NULL)
                *mark = ok;
        }
    }
    /* the same test as lua/admit.lua: without these the script would rebuild the state too */
    return has_status && has_limit && has_anchor && has_len && s->w_len > 0;
}

static void take_quota(account_op_t *op, const redisReply *reply)
{
    if (reply->type != REDIS_REPLY_ARRAY)
        return;
    bool has_win = false;
    for (size_t i = 0; i + 1 < reply->elements; i += 2) {
        const redisReply *k = reply->element[i], *v = reply->element[i + 1];
        if (k->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING)
            continue;
        if (strcmp(k->str, "win") == 0)
            has_win = parse_i64(v->str, v->len, &op->q_win);
        else if (strcmp(k->str, "used") == 0 && !parse_i64(v->str, v->len, &op->q_used))
            op->q_used = 0;
    }
    op->have_quota = has_win;
}

static void write_time(bg_json_writer_t *w, const char *key, int64_t ms)
{
    char t[40];
    if (bg_timeutil_format_rfc3339(t, sizeof(t), ms, false) == 0)
        bg_json_write_field_str(w, key, t);
    else
        bg_json_write_field_null(w, key);
}

/* Writes ",a,b," as ["a","b"]. */
static void write_features(bg_json_writer_t *w, const char *features)
{
    bg_json_write_key(w, "features");
    bg_json_write_begin_array(w);
    const char *p = features;
    while (*p != '\0') {
        while (*p == ',')
            p++;
        const char *end = strchr(p, ',');
        size_t len = end != NULL ? (size_t)(end - p) : strlen(p);
        if (len > 0)
            bg_json_write_strn(w, p, len);
        p += len;
    }
    bg_json_write_end_array(w);
}

/* Answers from op->state and the counters. */
static void respond_account(edge_req_t *er, const account_op_t *op)
{
    const bg_admission_state_t *s = &op->state;
    int64_t now = bg_timeutil_wall_ms();
    /* a plan that has ended is no plan, whatever the hash's status says (lua/admit.lua agrees) */
    bool live = (strcmp(s->status, "active") == 0 || strcmp(s->status, "trialing") == 0) &&
                !(s->w_until > 0 && now >= s->w_until);

    bg_buf_t out;
    bg_buf_init(&out, 16384);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    bg_json_write_begin_object(&w);
    if (live && s->plan[0] != '\0')
        bg_json_write_field_str(&w, "plan", s->plan);
    else
        bg_json_write_field_null(&w, "plan");
    /* past_due keeps the plan (admission says active) while Paddle retries the payment: the
     * account says so, so that the client can offer to pay (POST /billing/payment) */
    bool past_due = live && strcmp(op->outlook.sub_status, "past_due") == 0;
    bg_json_write_field_str(&w, "status", past_due ? "past_due" : live ? s->status : "none");
    if (live && strcmp(s->status, "trialing") == 0 && s->w_until > 0)
        write_time(&w, "trial_ends_at", s->w_until);
    else
        bg_json_write_field_null(&w, "trial_ends_at");

    int64_t win = live ? bg_policy_window_start(s, now) : 0;
    int64_t win_end = live ? bg_policy_window_end(s, now) : 0;
    bg_json_write_key(&w, "period");
    bg_json_write_begin_object(&w);
    if (live) {
        write_time(&w, "start", win);
        write_time(&w, "end", win_end);
    } else {
        bg_json_write_field_null(&w, "start");
        bg_json_write_field_null(&w, "end");
    }
    bg_json_write_end_object(&w);

    int64_t limit = live ? s->limits.q_limit : 0;
    int64_t used = op->have_quota && op->q_win == win ? op->q_used : 0;
    int64_t remaining = limit - used - op->held;
    bg_json_write_key(&w, "quota");
    bg_json_write_begin_object(&w);
    bg_json_write_field_int(&w, "limit", limit);
    bg_json_write_field_int(&w, "remaining", remaining > 0 ? remaining : 0);
    if (live)
        write_time(&w, "reset_at", win_end);
    else
        bg_json_write_field_null(&w, "reset_at");
    bg_json_write_end_object(&w);

    write_features(&w, live ? s->limits.features : "");
    bg_json_write_key(&w, "limits");
    bg_json_write_begin_object(&w);
    bg_json_write_field_int(&w, "rpm", live ? s->limits.rpm : 0);
    bg_json_write_field_int(&w, "concurrency", live ? s->limits.conc : 0);
    bg_json_write_field_int(&w, "max_tokens_per_request", live ? s->limits.tok_cap : 0);
    bg_json_write_end_object(&w);
    bg_json_write_key(&w, "scheduled_change");
    if (live && op->sched.action[0] != '\0') {
        bg_json_write_begin_object(&w);
        bg_json_write_field_str(&w, "action", op->sched.action);
        if (op->sched.plan[0] != '\0')
            bg_json_write_field_str(&w, "plan", op->sched.plan);
        else
            bg_json_write_field_null(&w, "plan");
        bg_json_write_field_str(&w, "effective_at", op->sched.effective_at);
        bg_json_write_end_object(&w);
    } else {
        bg_json_write_null(&w);
    }
    const bg_billing_outlook_t *o = &op->outlook;
    bg_json_write_key(&w, "next_bill");
    if (live && o->next_bill) {
        bg_json_write_begin_object(&w);
        bg_json_write_field_str(&w, "at", o->next_bill_at);
        bg_json_write_field_str(&w, "plan", o->plan);
        bg_json_write_key(&w, "amount");
        bg_json_write_begin_object(&w);
        bg_json_write_field_int(&w, "amount", o->amount_minor);
        bg_json_write_field_str(&w, "currency", o->currency);
        bg_json_write_end_object(&w);
        bg_json_write_end_object(&w);
    } else {
        bg_json_write_null(&w);
    }
    bg_json_write_key(&w, "payment_method");
    if (o->method) {
        bg_json_write_begin_object(&w);
        bg_json_write_field_str(&w, "type", o->method_type);
        if (o->card_brand[0] != '\0')
            bg_json_write_field_str(&w, "brand", o->card_brand);
        else
            bg_json_write_field_null(&w, "brand");
        if (o->card_last4[0] != '\0')
            bg_json_write_field_str(&w, "last4", o->card_last4);
        else
            bg_json_write_field_null(&w, "last4");
        bg_json_write_end_object(&w);
    } else {
        bg_json_write_null(&w);
    }
    bg_json_write_end_object(&w);
    if (bg_json_write_finish(&w) != 0)
        edge_error(er, "internal", NULL, NULL, 0);
    else
        edge_respond_json(er, 200, &out);
    bg_buf_dispose(&out);
}

/* ---- compiling a missing state ---- */

static void compile_work(void *arg)
{
    account_op_t *op = arg;
    PGconn *c = bg_pg_thread_conn(op->cfg->database_url);
    if (c == NULL) {
        op->rc = BG_ERR_UNAVAILABLE;
        return;
    }
    op->rc = bg_policy_compile_user(c, op->user_id, bg_timeutil_wall_ms(), &op->state);
    if (op->rc == 0 && bg_billing_scheduled(c, op->user_id, &op->sched) != 0)
        memset(&op->sched, 0, sizeof(op->sched));
    if (op->rc == 0 && bg_billing_outlook(c, op->user_id, &op->outlook) != 0)
        memset(&op->outlook, 0, sizeof(op->outlook));
}

/*
 * The scheduled change (a cancellation or a plan change at the period end) lives in Postgres only:
 * one read on the pool. Postgres down leaves it out (null) rather than failing the account.
 */
static void sched_work(void *arg)
{
    account_op_t *op = arg;
    PGconn *c = bg_pg_thread_conn(op->cfg->database_url);
    if (c == NULL || bg_billing_scheduled(c, op->user_id, &op->sched) != 0)
        memset(&op->sched, 0, sizeof(op->sched));
    if (c == NULL || bg_billing_outlook(c, op->user_id, &op->outlook) != 0)
        memset(&op->outlook, 0, sizeof(op->outlook));
}

static void sched_done(edge_req_t *er, void *arg)
{
    if (er->req != NULL)
        respond_account(er, arg);
}

static void state_written(void *ud, int err, const redisReply *reply)
{
    edge_req_t *er = ud;
    account_op_t *op = er->data;
    if (er->req != NULL) {
        if (err != 0 || reply->type == REDIS_REPLY_ERROR)
            edge_error(er, "service_unavailable", NULL, NULL, 1);
        else
            respond_account(er, op);
    }
    edge_req_unref(er);
}

static void compile_done(edge_req_t *er, void *arg)
{
    account_op_t *op = arg;
    if (er->req == NULL)
        return;
    if (op->rc == BG_ERR_NOT_FOUND) {
        /* the token outlived its user (deleted meanwhile) */
        edge_error(er, "unauthorized", NULL, NULL, 0);
        return;
    }
    if (op->rc != 0) {
        edge_error(er, "service_unavailable", NULL, NULL, 2);
        return;
    }
    edge_req_ref(er);
    if (bg_policy_state_write_async(er->thread->redis, op->cfg->shards, &op->state, state_written,
                                    er) != 0) {
        edge_req_unref(er);
        edge_error(er, "service_unavailable", NULL, NULL, 1);
    }
}

/* ---- the reads ---- */

static void reads_complete(edge_req_t *er, account_op_t *op)
{
    if (er->req == NULL)
        return;
    if (op->read_err != 0) {
        edge_error(er, "service_unavailable", NULL, NULL, 1);
        return;
    }
    if (op->have_adm) {
        if (edge_blocking(er, sched_work, sched_done, op) != 0)
            respond_account(er, op);
        return;
    }
    memset(&op->state, 0, sizeof(op->state));
    if (edge_blocking(er, compile_work, compile_done, op) != 0)
        edge_error(er, "service_unavailable", NULL, NULL, 1);
}

static void read_done(edge_req_t *er, int which, int err, const redisReply *reply)
{
    account_op_t *op = er->data;
    if (err != 0 && op->read_err == 0)
        op->read_err = err;
    else if (err == 0 && reply->type == REDIS_REPLY_ERROR && op->read_err == 0)
        op->read_err = BG_ERR_PROTOCOL;
    else if (err == 0) {
        switch (which) {
        case READ_ADM:
            op->have_adm = take_adm(op, reply);
            break;
        case READ_QUOTA:
            take_quota(op, reply);
            break;
        default:
            op->held = reply->type == REDIS_REPLY_INTEGER ? (int64_t)reply->integer : 0;
        }
    }
    if (--op->pending == 0)
        reads_complete(er, op);
    edge_req_unref(er);
}

static void adm_read(void *ud, int err, const redisReply *reply)
{
    read_done(ud, READ_ADM, err, reply);
}

static void quota_read(void *ud, int err, const redisReply *reply)
{
    read_done(ud, READ_QUOTA, err, reply);
}

static void held_read(void *ud, int err, const redisReply *reply)
{
    read_done(ud, READ_HELD, err, reply);
}

/* GET /billing/account */
static void account_get(edge_req_t *er)
{
    const bg_config_t *cfg = er->thread->server->cfg;
    bg_admission_keys_t keys;
    if (bg_admission_keys(&keys, cfg->shards, er->auth.user_id) != 0) {
        edge_error(er, "unauthorized", NULL, NULL, 0);
        return;
    }
    account_op_t *op = bg_calloc(1, sizeof(*op));
    op->cfg = cfg;
    bg_strlcpy(op->user_id, er->auth.user_id, sizeof(op->user_id));
    er->data = op;
    er->data_free = op_free;

    char now[24];
    snprintf(now, sizeof(now), "(%" PRId64, bg_timeutil_wall_ms());
    const char *adm[] = {"HGETALL", keys.adm};
    const char *quota[] = {"HGETALL", keys.quota};
    const char *held[] = {"ZCOUNT", keys.res, now, "+inf"};
    struct {
        bg_redis_async_cb cb;
        int argc;
        const char **argv;
    } reads[READ_COUNT] = {{adm_read, 2, adm}, {quota_read, 2, quota}, {held_read, 4, held}};

    /*
     * The three go out back to back and are written together; the replies come back in order.
     * Hold a reference for the whole batch so a reply cannot complete it before the last send.
     */
    edge_req_ref(er);
    op->pending = 1;
    for (int i = 0; i < READ_COUNT; i++) {
        edge_req_ref(er);
        op->pending++;
        int rc = bg_redis_async_argv(er->thread->redis, reads[i].cb, er, reads[i].argc,
                                     reads[i].argv, NULL);
        if (rc != 0) {
            op->pending--;
            edge_req_unref(er);
            if (op->read_err == 0)
                op->read_err = rc;
            break;
        }
    }
    if (--op->pending == 0)
        reads_complete(er, op);
    edge_req_unref(er);
}

const edge_route_t edge_routes_billing[] = {
    {"GET", "/billing/account", "billing_account", account_get, 0, 0, EDGE_USER},
    {NULL, NULL, NULL, NULL, 0, 0, EDGE_PUBLIC},
};
