/* Helpers of the Telegram e2e tests (bgtest_telegram.h). */
#include "bgtest_telegram.h"

#include <criterion/criterion.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bg/err.h"
#include "bg/json.h"
#include "bg/pg.h"
#include "bgtest.h"

static void pause_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

void bgt_tg_text_update(char *out, size_t outlen, long long update_id, long long user,
                        const char *lang, const char *text)
{
    snprintf(out, outlen,
             "{\"update_id\":%lld,\"message\":{\"message_id\":%lld,\"from\":{\"id\":%lld,"
             "\"is_bot\":false,\"first_name\":\"Tester\",\"language_code\":\"%s\"},\"chat\":{"
             "\"id\":%lld,\"first_name\":\"Tester\",\"type\":\"private\"},\"date\":1700000000,"
             "\"text\":\"%s\"}}",
             update_id, update_id, user, lang, user, text);
}

size_t bgt_tg_read_calls(const bgt_tg_watch_t *w, bgt_tg_call_t *out, size_t max)
{
    FILE *f = fopen(w->calls_path, "r");
    if (f == NULL)
        return 0;
    static char line[1 << 20];
    size_t n = 0;
    while (n < max && fgets(line, sizeof(line), f) != NULL) {
        bg_json_doc_t *doc = NULL;
        const char *desc = NULL;
        if (bg_json_parse(line, strlen(line), NULL, &doc, &desc, NULL) != 0)
            continue;
        const bg_json_t *root = bg_json_root(doc);
        bgt_tg_call_t *c = &out[n++];
        memset(c, 0, sizeof(*c));
        int64_t v = 0;
        if (bg_json_get_int(root, "t", &v) == 0)
            c->t = v;
        if (bg_json_get_int(root, "status", &v) == 0)
            c->status = v;
        const char *s = NULL;
        if (bg_json_get_str(root, "method", &s) == 0)
            snprintf(c->method, sizeof(c->method), "%s", s);
        const bg_json_t *body = bg_json_find(root, "body");
        c->text = strdup("");
        if (body != NULL && bg_json_type(body) == BG_JSON_OBJECT) {
            if (bg_json_get_int(body, "chat_id", &v) == 0)
                c->chat_id = v;
            if (bg_json_get_str(body, "text", &s) == 0) {
                free(c->text);
                c->text = strdup(s);
            }
            if (bg_json_get_str(body, "callback_query_id", &s) == 0)
                snprintf(c->callback_id, sizeof(c->callback_id), "%s", s);
        }
        bg_json_doc_free(doc);
    }
    fclose(f);
    return n;
}

void bgt_tg_free_calls(bgt_tg_call_t *c, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(c[i].text);
}

size_t bgt_tg_count(const bgt_tg_call_t *c, size_t n, const char *method, long long chat,
                    long status)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        bool m = method != NULL ? strcmp(c[i].method, method) == 0
                                : strcmp(c[i].method, "sendMessage") == 0 ||
                                      strcmp(c[i].method, "editMessageText") == 0;
        if (m && c[i].chat_id == chat && (status == 0 || c[i].status == status))
            k++;
    }
    return k;
}

const char *bgt_tg_last_text(const bgt_tg_call_t *c, size_t n, long long chat)
{
    const char *t = NULL;
    for (size_t i = 0; i < n; i++)
        if (c[i].chat_id == chat && c[i].status == 200 &&
            (strcmp(c[i].method, "sendMessage") == 0 ||
             strcmp(c[i].method, "editMessageText") == 0))
            t = c[i].text;
    return t;
}

void bgt_tg_stored_reply(const bgt_tg_watch_t *w, long long update_id, char *out, size_t outlen)
{
    char job[128];
    snprintf(job, sizeof(job), "tg-%s-%lld", w->slug, update_id);
    const char *p[] = {job};
    PGresult *res = NULL;
    int rc = bg_pg_exec(w->pg,
                        "SELECT content FROM messages WHERE job_id = $1 AND role = 'assistant' "
                        "AND status = 'complete'",
                        1, p, &res);
    cr_assert_eq(rc, 0, "%s", bg_strerror(rc));
    snprintf(out, outlen, "%s", PQntuples(res) == 1 ? PQgetvalue(res, 0, 0) : "");
    PQclear(res);
}

size_t bgt_tg_wait_reply(const bgt_tg_watch_t *w, long long update_id, long long chat, char *reply,
                         size_t replylen, int timeout_ms)
{
    long long until = bgt_now_ms() + timeout_ms;
    size_t n = 0;
    for (;;) {
        bgt_tg_stored_reply(w, update_id, reply, replylen);
        bgt_tg_free_calls(w->calls, n);
        n = bgt_tg_read_calls(w, w->calls, w->max);
        const char *t = bgt_tg_last_text(w->calls, n, chat);
        if (reply[0] != '\0' && t != NULL && strcmp(t, reply) == 0)
            return n;
        if (bgt_now_ms() > until) {
            cr_assert_fail("update %lld: the chat shows \"%.120s\", the reply is \"%.120s\"",
                           update_id, t != NULL ? t : "(nothing)", reply);
        }
        pause_ms(100);
    }
}

size_t bgt_tg_wait_calls(const bgt_tg_watch_t *w, const char *method, long long chat, size_t want,
                         int timeout_ms)
{
    long long until = bgt_now_ms() + timeout_ms;
    size_t n = 0;
    for (;;) {
        bgt_tg_free_calls(w->calls, n);
        n = bgt_tg_read_calls(w, w->calls, w->max);
        if (bgt_tg_count(w->calls, n, method, chat, 200) >= want)
            return n;
        if (bgt_now_ms() > until)
            cr_assert_fail("%zu %s to chat %lld after %d ms (want %zu)",
                           bgt_tg_count(w->calls, n, method, chat, 200),
                           method != NULL ? method : "messages", chat, timeout_ms, want);
        pause_ms(100);
    }
}
