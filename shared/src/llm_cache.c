/*
 * The response cache (Redis) and the definition cache (process memory) of the llm path; see
 * bg/llm_cache.h for what each keeps and for how long.
 *
 * Response key: SHA-256 over "bg-llm-cache-v1", the model, max_tokens and temperature, each ended
 * by a NUL, then the messages JSON. The fields before the messages cannot hold a NUL, so no two
 * requests share a digest input. The version tag changes when the value's shape does, which turns
 * every old entry into a miss instead of a misread.
 *
 * Definition cache: two arrays of slots, each slot an owned entry or NULL, indexed by an FNV-1a
 * hash of the key. A miss is read from Postgres outside the lock (two threads missing on the same
 * agent both read, and the second store wins: both read the same rows), so the mutex is only held
 * for copies and pointer swaps. An agent entry copies the whole bg_agent_t out (a few KB), which is
 * far cheaper than a round trip. A prompt entry is shared by reference: its count (atomic) is the
 * table's reference plus one per holder, and whoever drops it to zero frees it. A holder's count
 * is only ever taken under the mutex while the table still holds its own, so it never rises
 * from zero; dropping one needs no lock, which lets a prompt outlive its cache.
 */
#include "bg/llm_cache.h"

#include <pthread.h>
#include <sodium.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/err.h"
#include "bg/json.h"
#include "bg/log.h"
#include "bg/timeutil.h"

#define KEY_VERSION "bg-llm-cache-v1"
/* A cached value's JSON: the text escaped (up to 6 bytes per byte) and a few short fields. */
#define VALUE_MAX (BG_LLM_CACHE_TEXT_MAX * 6 + 1024)

/* ---- response cache ---- */

bool bg_llm_cache_is_cacheable(bool enabled, int ttl_s, double temperature)
{
    /* exactly zero: any other temperature samples, and a sample is no answer to replay */
    return enabled && ttl_s > 0 && temperature == 0.0;
}

void bg_llm_cache_key(char key[BG_LLM_CACHE_KEY_SIZE], const char *model, const char *messages,
                      size_t messages_len, int64_t max_tokens, double temperature)
{
    char params[96];
    int n =
        snprintf(params, sizeof(params), "%lld%c%.17g", (long long)max_tokens, '\0', temperature);
    crypto_hash_sha256_state st;
    unsigned char digest[crypto_hash_sha256_BYTES];
    (void)crypto_hash_sha256_init(&st);
    (void)crypto_hash_sha256_update(&st, (const unsigned char *)KEY_VERSION,
                                    sizeof(KEY_VERSION)); /* with its NUL */
    (void)crypto_hash_sha256_update(&st, (const unsigned char *)model, strlen(model) + 1);
    (void)crypto_hash_sha256_update(&st, (const unsigned char *)params, (size_t)n + 1);
    (void)crypto_hash_sha256_update(&st, (const unsigned char *)messages, messages_len);
    (void)crypto_hash_sha256_final(&st, digest);
    char hex[crypto_hash_sha256_BYTES * 2 + 1];
    (void)sodium_bin2hex(hex, sizeof(hex), digest, sizeof(digest));
    (void)snprintf(key, BG_LLM_CACHE_KEY_SIZE, "%s%s", BG_LLM_CACHE_PREFIX, hex);
}

void bg_llm_cached_dispose(bg_llm_cached_t *v)
{
    if (v == NULL)
        return;
    free(v->text);
    memset(v, 0, sizeof(*v));
}

static bool is_finish_reason(const char *s)
{
    return s != NULL && (strcmp(s, "stop") == 0 || strcmp(s, "length") == 0);
}

static bool is_token_source(const char *s)
{
    return s != NULL && (strcmp(s, "provider") == 0 || strcmp(s, "estimated") == 0);
}

/* Fills out from a value's JSON text; BG_ERR_INVALID when it has the wrong shape. */
static int parse_value(const char *s, size_t len, bg_llm_cached_t *out)
{
    static const bg_json_limits_t limits = {.max_bytes = VALUE_MAX,
                                            .max_depth = 2,
                                            .max_string = BG_LLM_CACHE_TEXT_MAX,
                                            .max_members = 16,
                                            .max_values = 32};
    bg_json_doc_t *doc = NULL;
    if (bg_json_parse(s, len, &limits, &doc, NULL, NULL) != 0)
        return BG_ERR_INVALID;
    const bg_json_t *root = bg_json_root(doc);
    const char *text = NULL, *fr = NULL, *src = NULL;
    size_t text_len = 0;
    int64_t pt = -1, ct = -1;
    int rc = BG_ERR_INVALID;
    if (bg_json_get_strn(root, "text", &text, &text_len) == 0 &&
        bg_json_get_str(root, "finish_reason", &fr) == 0 && is_finish_reason(fr) &&
        bg_json_get_str(root, "token_source", &src) == 0 && is_token_source(src) &&
        bg_json_get_int(root, "prompt_tokens", &pt) == 0 && pt >= 0 &&
        bg_json_get_int(root, "completion_tokens", &ct) == 0 && ct >= 0) {
        out->text = text_len > 0 ? bg_strndup(text, text_len) : NULL;
        out->text_len = text_len;
        (void)bg_strlcpy(out->finish_reason, fr, sizeof(out->finish_reason));
        (void)bg_strlcpy(out->token_source, src, sizeof(out->token_source));
        out->prompt_tokens = pt;
        out->completion_tokens = ct;
        rc = 0;
    }
    bg_json_doc_free(doc);
    return rc;
}

int bg_llm_cache_get(bg_redis_t *r, const char *key, bool *found, bg_llm_cached_t *out)
{
    *found = false;
    memset(out, 0, sizeof(*out));
    redisReply *reply = NULL;
    int rc = bg_redis_command(r, &reply, "GET %s", key);
    if (rc != 0)
        return rc;
    if (reply->type == REDIS_REPLY_STRING) {
        if (parse_value(reply->str, reply->len, out) == 0) {
            *found = true;
        } else {
            /* written by something else, or cut: never serve it, and let the next reply replace
             * it */
            bg_warn("llm cache: dropping a malformed value at %s", key);
            redisReply *del = NULL;
            if (bg_redis_command(r, &del, "DEL %s", key) == 0)
                freeReplyObject(del);
        }
    } else if (reply->type == REDIS_REPLY_ERROR) {
        rc = BG_ERR_PROTOCOL;
    }
    freeReplyObject(reply);
    return rc;
}

int bg_llm_cache_put(bg_redis_t *r, const char *key, const bg_llm_cached_t *v, int ttl_s)
{
    if (ttl_s <= 0 || !is_finish_reason(v->finish_reason) || !is_token_source(v->token_source) ||
        v->prompt_tokens < 0 || v->completion_tokens < 0)
        return BG_ERR_INVALID;
    if (v->text_len > BG_LLM_CACHE_TEXT_MAX)
        return BG_ERR_TOO_LARGE;
    bg_buf_t data;
    bg_buf_init(&data, VALUE_MAX);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &data);
    bg_json_write_begin_object(&w);
    bg_json_write_key(&w, "text");
    bg_json_write_strn(&w, v->text != NULL ? v->text : "", v->text != NULL ? v->text_len : 0);
    bg_json_write_field_str(&w, "finish_reason", v->finish_reason);
    bg_json_write_field_int(&w, "prompt_tokens", v->prompt_tokens);
    bg_json_write_field_int(&w, "completion_tokens", v->completion_tokens);
    bg_json_write_field_str(&w, "token_source", v->token_source);
    bg_json_write_end_object(&w);
    int rc = bg_json_write_finish(&w);
    if (rc == 0) {
        redisReply *reply = NULL;
        rc = bg_redis_command(r, &reply, "SET %s %b EX %d", key, data.base, data.len, ttl_s);
        if (rc == 0) {
            if (reply->type == REDIS_REPLY_ERROR)
                rc = BG_ERR_PROTOCOL;
            freeReplyObject(reply);
        }
    }
    bg_buf_dispose(&data);
    return rc;
}

/* ---- definition cache ---- */

struct bg_llm_prompt {
    char prompt_id[BG_AGENT_ID_SIZE];
    int version;
    char model[BG_AGENT_MODEL_SIZE];
    bg_prompt_t *def;   /* owned */
    atomic_size_t refs; /* the table's (while in it) plus one per holder */
};

typedef struct st_agent_entry {
    bg_agent_t agent;
    char prompt_id[BG_AGENT_ID_SIZE]; /* the resolved version's prompt; "" when none */
    int version;                      /* 0 when the agent has no prompt */
    uint64_t expires_ms;              /* monotonic */
} agent_entry_t;

struct bg_llm_defs {
    pthread_mutex_t mu; /* guards the tables and the counters */
    uint64_t ttl_ms;
    agent_entry_t **agents; /* agent_slots of them; owned */
    size_t agent_slots;
    bg_llm_prompt_t **prompts; /* prompt_slots of them; each holds one reference */
    size_t prompt_slots;
    uint64_t hits, misses;
};

static uint64_t fnv1a(const char *s, int n)
{
    uint64_t h = 1469598103934665603ULL;
    for (; *s != '\0'; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ULL;
    }
    h ^= (uint64_t)(unsigned)n;
    h *= 1099511628211ULL;
    return h;
}

bg_llm_defs_t *bg_llm_defs_new(uint64_t agent_ttl_ms, size_t agent_slots, size_t prompt_slots)
{
    bg_llm_defs_t *d = bg_calloc(1, sizeof(*d));
    (void)pthread_mutex_init(&d->mu, NULL);
    d->ttl_ms = agent_ttl_ms > 0 ? agent_ttl_ms : 1;
    d->agent_slots = agent_slots > 0 ? agent_slots : 1;
    d->prompt_slots = prompt_slots > 0 ? prompt_slots : 1;
    d->agents = bg_calloc(d->agent_slots, sizeof(*d->agents));
    d->prompts = bg_calloc(d->prompt_slots, sizeof(*d->prompts));
    return d;
}

/* Drops one reference; returns the prompt when that was the last (the caller frees it, outside
 * the mutex), else NULL. */
static bg_llm_prompt_t *prompt_unref(bg_llm_prompt_t *p)
{
    if (p == NULL)
        return NULL;
    return atomic_fetch_sub(&p->refs, 1) == 1 ? p : NULL;
}

static void prompt_destroy(bg_llm_prompt_t *p)
{
    if (p == NULL)
        return;
    bg_prompt_free(p->def);
    free(p);
}

/* Empties the tables; returns (in *dead, *ndead) the prompts to destroy after unlocking. */
static void clear_locked(bg_llm_defs_t *d, bg_llm_prompt_t **dead, size_t *ndead)
{
    *ndead = 0;
    for (size_t i = 0; i < d->agent_slots; i++) {
        free(d->agents[i]);
        d->agents[i] = NULL;
    }
    for (size_t i = 0; i < d->prompt_slots; i++) {
        bg_llm_prompt_t *p = prompt_unref(d->prompts[i]);
        d->prompts[i] = NULL;
        if (p != NULL)
            dead[(*ndead)++] = p;
    }
}

void bg_llm_defs_clear(bg_llm_defs_t *d)
{
    bg_llm_prompt_t **dead = bg_calloc(d->prompt_slots, sizeof(*dead));
    size_t ndead = 0;
    (void)pthread_mutex_lock(&d->mu);
    clear_locked(d, dead, &ndead);
    (void)pthread_mutex_unlock(&d->mu);
    for (size_t i = 0; i < ndead; i++)
        prompt_destroy(dead[i]);
    free(dead);
}

void bg_llm_defs_free(bg_llm_defs_t *d)
{
    if (d == NULL)
        return;
    bg_llm_defs_clear(d);
    free(d->agents);
    free(d->prompts);
    (void)pthread_mutex_destroy(&d->mu);
    free(d);
}

void bg_llm_defs_stats(bg_llm_defs_t *d, bg_llm_defs_stats_t *out)
{
    (void)pthread_mutex_lock(&d->mu);
    out->hits = d->hits;
    out->misses = d->misses;
    (void)pthread_mutex_unlock(&d->mu);
}

static size_t agent_slot(const bg_llm_defs_t *d, const char *agent_id)
{
    return (size_t)(fnv1a(agent_id, 0) % d->agent_slots);
}

static size_t prompt_slot(const bg_llm_defs_t *d, const char *prompt_id, int version)
{
    return (size_t)(fnv1a(prompt_id, version) % d->prompt_slots);
}

/* The cached prompt version, referenced for the caller, or NULL. Mutex held. */
static bg_llm_prompt_t *find_prompt_locked(bg_llm_defs_t *d, const char *prompt_id, int version)
{
    bg_llm_prompt_t *p = d->prompts[prompt_slot(d, prompt_id, version)];
    if (p == NULL || p->version != version || strcmp(p->prompt_id, prompt_id) != 0)
        return NULL;
    atomic_fetch_add(&p->refs, 1);
    return p;
}

/* Tries the cache: 0 with *agent and *prompt filled on a hit, BG_ERR_NOT_FOUND on a miss. */
static int load_cached(bg_llm_defs_t *d, const char *agent_id, bg_agent_t *agent,
                       bg_llm_prompt_t **prompt)
{
    int rc = BG_ERR_NOT_FOUND;
    uint64_t now = bg_timeutil_mono_ms();
    (void)pthread_mutex_lock(&d->mu);
    const agent_entry_t *e = d->agents[agent_slot(d, agent_id)];
    if (e != NULL && now < e->expires_ms && strcmp(e->agent.id, agent_id) == 0) {
        bg_llm_prompt_t *p = NULL;
        if (e->version > 0)
            p = find_prompt_locked(d, e->prompt_id, e->version);
        /* a version pushed out of its slot: read both again, as on a miss */
        if (e->version == 0 || p != NULL) {
            memcpy(agent, &e->agent, sizeof(*agent));
            *prompt = p;
            rc = 0;
        }
    }
    if (rc == 0)
        d->hits++;
    else
        d->misses++;
    (void)pthread_mutex_unlock(&d->mu);
    return rc;
}

/* Reads the agent and its prompt version from Postgres; *version_out is disposed by the caller. */
static int load_db(PGconn *c, const char *agent_id, bg_agent_t *agent,
                   bg_prompt_version_t *version_out, bool *has_prompt)
{
    *has_prompt = false;
    int rc = bg_agents_get(c, agent_id, agent);
    if (rc != 0)
        return rc;
    rc = bg_agents_resolve_prompt(c, agent_id, version_out);
    if (rc == BG_ERR_NOT_FOUND)
        return 0; /* no prompt: the caller decides what that means */
    if (rc != 0)
        return rc;
    *has_prompt = true;
    return 0;
}

int bg_llm_defs_load(bg_llm_defs_t *d, PGconn *c, const char *agent_id, bg_agent_t *agent,
                     bg_llm_prompt_t **prompt)
{
    *prompt = NULL;
    if (agent_id == NULL)
        return BG_ERR_NOT_FOUND;
    if (load_cached(d, agent_id, agent, prompt) == 0)
        return 0;

    bg_prompt_version_t v = {0};
    bool has_prompt = false;
    int rc = load_db(c, agent_id, agent, &v, &has_prompt);
    if (rc != 0)
        goto out;

    bg_llm_prompt_t *fresh = NULL;
    if (has_prompt) {
        fresh = bg_calloc(1, sizeof(*fresh));
        bg_prompt_err_t perr = {0};
        if (v.definition == NULL ||
            bg_prompt_parse(v.definition, strlen(v.definition), &fresh->def, &perr) != 0) {
            free(fresh);
            rc = BG_ERR_INVALID;
            goto out;
        }
        (void)bg_strlcpy(fresh->prompt_id, v.prompt_id, sizeof(fresh->prompt_id));
        (void)bg_strlcpy(fresh->model, v.model, sizeof(fresh->model));
        fresh->version = v.version;
    }
    agent_entry_t *entry = bg_malloc(sizeof(*entry));
    memcpy(&entry->agent, agent, sizeof(*agent));
    (void)bg_strlcpy(entry->prompt_id, has_prompt ? v.prompt_id : "", sizeof(entry->prompt_id));
    entry->version = has_prompt ? v.version : 0;
    entry->expires_ms = bg_timeutil_mono_ms() + d->ttl_ms;

    bg_llm_prompt_t *dead[2] = {NULL, NULL};
    (void)pthread_mutex_lock(&d->mu);
    size_t as = agent_slot(d, agent_id);
    agent_entry_t *old_agent = d->agents[as];
    d->agents[as] = entry;
    if (fresh != NULL) {
        /* another thread may have stored the same version meanwhile: share that one */
        bg_llm_prompt_t *same = find_prompt_locked(d, fresh->prompt_id, fresh->version);
        if (same != NULL) {
            dead[0] = fresh;
            *prompt = same;
        } else {
            size_t ps = prompt_slot(d, fresh->prompt_id, fresh->version);
            dead[1] = prompt_unref(d->prompts[ps]);
            atomic_init(&fresh->refs, 2); /* the table's and the caller's */
            d->prompts[ps] = fresh;
            *prompt = fresh;
        }
    }
    (void)pthread_mutex_unlock(&d->mu);
    free(old_agent);
    prompt_destroy(dead[0]); /* never published */
    prompt_destroy(dead[1]);
out:
    bg_prompt_version_dispose(&v);
    return rc;
}

const bg_prompt_t *bg_llm_prompt_def(const bg_llm_prompt_t *p)
{
    return p->def;
}

const char *bg_llm_prompt_model(const bg_llm_prompt_t *p)
{
    return p->model;
}

int bg_llm_prompt_version(const bg_llm_prompt_t *p)
{
    return p->version;
}

const char *bg_llm_prompt_id(const bg_llm_prompt_t *p)
{
    return p->prompt_id;
}

void bg_llm_prompt_release(bg_llm_prompt_t *p)
{
    if (p == NULL)
        return;
    prompt_destroy(prompt_unref(p));
}
