/*
 * Which user owns a conversation and which agent it talks to, remembered by this edge process so a
 * chat turn's admitted path needs no Postgres (docs/streaming.md, "Order of a turn").
 *
 * Both facts are immutable for a conversation's life: it never changes owner or agent. What can
 * change is its life: a conversation deleted through another edge stays here until its entry
 * lapses (EDGE_CONV_TTL_MS); a turn admitted for it meanwhile fails in the worker, which finds it
 * gone, answers the stream with a not_found error and refunds the request. This edge forgets a
 * conversation it deletes at once.
 *
 * A direct-mapped table of EDGE_CONV_SLOTS entries under one mutex (a lookup is a hash and a
 * compare: far shorter than anything else a turn does); a collision replaces the older entry.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "bg/common.h"
#include "bg/timeutil.h"
#include "edge.h"

#define EDGE_CONV_SLOTS 16384u /* power of two; about 2 MiB */
#define EDGE_CONV_TTL_MS 60000u

typedef struct st_conv_entry {
    char conv_id[EDGE_CONV_ID_SIZE];
    char user_id[EDGE_CONV_ID_SIZE];
    char agent_id[EDGE_CONV_ID_SIZE];
    uint64_t expires_ms;
} conv_entry_t;

static conv_entry_t slots[EDGE_CONV_SLOTS];
static pthread_mutex_t slots_lock = PTHREAD_MUTEX_INITIALIZER;

/* FNV-1a over the id's text */
static size_t slot_of(const char *conv_id)
{
    uint32_t h = 2166136261u;
    for (const unsigned char *p = (const unsigned char *)conv_id; *p != '\0'; p++)
        h = (h ^ *p) * 16777619u;
    return h & (EDGE_CONV_SLOTS - 1);
}

static bool fits(const char *s)
{
    return s != NULL && s[0] != '\0' && strlen(s) < EDGE_CONV_ID_SIZE;
}

edge_conv_t edge_conv_lookup(const char *conv_id, const char *user_id,
                             char agent_id[EDGE_CONV_ID_SIZE])
{
    if (!fits(conv_id) || !fits(user_id))
        return EDGE_CONV_UNKNOWN;
    edge_conv_t r = EDGE_CONV_UNKNOWN;
    uint64_t now = bg_timeutil_mono_ms();
    pthread_mutex_lock(&slots_lock);
    const conv_entry_t *e = &slots[slot_of(conv_id)];
    if (e->expires_ms > now && strcmp(e->conv_id, conv_id) == 0) {
        if (strcmp(e->user_id, user_id) == 0) {
            memcpy(agent_id, e->agent_id, EDGE_CONV_ID_SIZE);
            r = EDGE_CONV_OWNED;
        } else {
            r = EDGE_CONV_FOREIGN;
        }
    }
    pthread_mutex_unlock(&slots_lock);
    return r;
}

void edge_conv_remember(const char *conv_id, const char *user_id, const char *agent_id)
{
    if (!fits(conv_id) || !fits(user_id) || !fits(agent_id))
        return;
    conv_entry_t e = {.expires_ms = bg_timeutil_mono_ms() + EDGE_CONV_TTL_MS};
    (void)bg_strlcpy(e.conv_id, conv_id, sizeof(e.conv_id));
    (void)bg_strlcpy(e.user_id, user_id, sizeof(e.user_id));
    (void)bg_strlcpy(e.agent_id, agent_id, sizeof(e.agent_id));
    pthread_mutex_lock(&slots_lock);
    slots[slot_of(conv_id)] = e;
    pthread_mutex_unlock(&slots_lock);
}

void edge_conv_forget(const char *conv_id)
{
    if (!fits(conv_id))
        return;
    pthread_mutex_lock(&slots_lock);
    conv_entry_t *e = &slots[slot_of(conv_id)];
    if (strcmp(e->conv_id, conv_id) == 0)
        memset(e, 0, sizeof(*e));
    pthread_mutex_unlock(&slots_lock);
}
