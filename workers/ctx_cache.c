/*
 * The llm worker's conversation cache (see ctx_cache.h).
 */
#include "ctx_cache.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "bg/common.h"
#include "bg/timeutil.h"

typedef struct st_entry {
    bool used;
    char conversation_id[BG_CHAT_ID_SIZE];
    char user_id[BG_CHAT_ID_SIZE];
    int64_t seq;
    uint64_t expires_ms; /* monotonic */
    size_t bytes;        /* of message text */
    bg_chat_context_t ctx;
} entry_t;

struct wk_ctx_cache {
    pthread_mutex_t mu;
    entry_t *slots;
    size_t nslots;
    size_t bytes, bytes_max;
    uint64_t ttl_ms;
};

wk_ctx_cache_t *wk_ctx_cache_new(size_t slots, size_t bytes_max, uint64_t ttl_ms)
{
    wk_ctx_cache_t *cc = bg_calloc(1, sizeof(*cc));
    pthread_mutex_init(&cc->mu, NULL);
    cc->nslots = slots > 0 ? slots : 1;
    cc->slots = bg_calloc(cc->nslots, sizeof(*cc->slots));
    cc->bytes_max = bytes_max;
    cc->ttl_ms = ttl_ms;
    return cc;
}

/* Empties a slot (the caller holds cc->mu); its context goes to *dead, to be disposed of outside
 * the lock. */
static void entry_take_locked(wk_ctx_cache_t *cc, entry_t *e, bg_chat_context_t *dead)
{
    memset(dead, 0, sizeof(*dead));
    if (!e->used)
        return;
    cc->bytes -= e->bytes;
    *dead = e->ctx;
    memset(e, 0, sizeof(*e));
}

void wk_ctx_cache_free(wk_ctx_cache_t *cc)
{
    if (cc == NULL)
        return;
    for (size_t i = 0; i < cc->nslots; i++) {
        bg_chat_context_t dead;
        entry_take_locked(cc, &cc->slots[i], &dead);
        bg_chat_context_dispose(&dead);
    }
    free(cc->slots);
    pthread_mutex_destroy(&cc->mu);
    free(cc);
}

static entry_t *slot_of(wk_ctx_cache_t *cc, const char *conversation_id)
{
    uint32_t h = 2166136261u;
    for (const char *p = conversation_id; *p != '\0'; p++) {
        h ^= (uint8_t)*p;
        h *= 16777619u;
    }
    return &cc->slots[h % cc->nslots];
}

void wk_ctx_history_push(bg_chat_message_list_t *h, int64_t id, const char *role,
                         const char *content, size_t content_len)
{
    h->items = bg_realloc(h->items, (h->count + 1) * sizeof(*h->items));
    bg_chat_message_t *m = &h->items[h->count++];
    memset(m, 0, sizeof(*m));
    m->id = id;
    (void)bg_strlcpy(m->role, role, sizeof(m->role));
    (void)bg_strlcpy(m->status, "complete", sizeof(m->status));
    m->content = bg_malloc(content_len + 1);
    memcpy(m->content, content, content_len);
    m->content[content_len] = '\0';
    m->content_len = content_len;
    m->prompt_tokens = -1;
    m->completion_tokens = -1;
}

void wk_ctx_history_trim(bg_chat_message_list_t *h, size_t max_messages, size_t max_bytes)
{
    /* keep = the newest messages that fit both bounds, counted from the end */
    size_t keep = 0, bytes = 0;
    while (keep < h->count && keep < max_messages) {
        size_t len = h->items[h->count - 1 - keep].content_len;
        if (max_bytes != 0 && bytes + len > max_bytes)
            break;
        bytes += len;
        keep++;
    }
    size_t drop = h->count - keep;
    if (drop == 0)
        return;
    for (size_t i = 0; i < drop; i++)
        free(h->items[i].content);
    memmove(h->items, h->items + drop, keep * sizeof(*h->items));
    h->count = keep;
}

/* Copies src into dst (empty), its history's texts included; returns their bytes. */
static size_t context_copy(bg_chat_context_t *dst, const bg_chat_context_t *src)
{
    memset(dst, 0, sizeof(*dst));
    (void)bg_strlcpy(dst->agent_id, src->agent_id, sizeof(dst->agent_id));
    (void)bg_strlcpy(dst->user_name, src->user_name, sizeof(dst->user_name));
    size_t bytes = 0;
    if (src->history.count == 0)
        return 0;
    dst->history.items = bg_calloc(src->history.count, sizeof(*dst->history.items));
    for (size_t i = 0; i < src->history.count; i++) {
        const bg_chat_message_t *m = &src->history.items[i];
        bg_chat_message_t *c = &dst->history.items[i];
        *c = *m;
        c->content = bg_malloc(m->content_len + 1);
        memcpy(c->content, m->content, m->content_len);
        c->content[m->content_len] = '\0';
        bytes += m->content_len;
    }
    dst->history.count = src->history.count;
    return bytes;
}

bool wk_ctx_cache_get(wk_ctx_cache_t *cc, const char *conversation_id, const char *user_id,
                      int64_t seq, bg_chat_context_t *out)
{
    memset(out, 0, sizeof(*out));
    uint64_t now = bg_timeutil_mono_ms();
    bool hit = false;
    pthread_mutex_lock(&cc->mu);
    entry_t *e = slot_of(cc, conversation_id);
    if (e->used && e->seq == seq && now < e->expires_ms &&
        strcmp(e->conversation_id, conversation_id) == 0 && strcmp(e->user_id, user_id) == 0) {
        (void)context_copy(out, &e->ctx);
        e->expires_ms = now + cc->ttl_ms;
        hit = true;
    }
    pthread_mutex_unlock(&cc->mu);
    return hit;
}

void wk_ctx_cache_put(wk_ctx_cache_t *cc, const char *conversation_id, const char *user_id,
                      int64_t seq, const bg_chat_context_t *ctx)
{
    /* the copy is made outside the lock */
    entry_t fresh = {.used = true, .seq = seq};
    (void)bg_strlcpy(fresh.conversation_id, conversation_id, sizeof(fresh.conversation_id));
    (void)bg_strlcpy(fresh.user_id, user_id, sizeof(fresh.user_id));
    fresh.bytes = context_copy(&fresh.ctx, ctx);
    fresh.expires_ms = bg_timeutil_mono_ms() + cc->ttl_ms;
    bg_chat_context_t dead;
    pthread_mutex_lock(&cc->mu);
    entry_t *e = slot_of(cc, conversation_id);
    entry_take_locked(cc, e, &dead);
    bool fits = cc->bytes + fresh.bytes <= cc->bytes_max;
    if (fits) {
        *e = fresh;
        cc->bytes += fresh.bytes;
    }
    pthread_mutex_unlock(&cc->mu);
    bg_chat_context_dispose(&dead);
    if (!fits)
        bg_chat_context_dispose(&fresh.ctx);
}

void wk_ctx_cache_drop(wk_ctx_cache_t *cc, const char *conversation_id)
{
    bg_chat_context_t dead = {0};
    pthread_mutex_lock(&cc->mu);
    entry_t *e = slot_of(cc, conversation_id);
    if (strcmp(e->conversation_id, conversation_id) == 0)
        entry_take_locked(cc, e, &dead);
    pthread_mutex_unlock(&cc->mu);
    bg_chat_context_dispose(&dead);
}
