/*
 * The Telegram channel's shared pieces; see bg/telegram.h for who uses what and docs/telegram.md
 * for the channel as a whole.
 *
 * Parsing reads only what the bot acts on and tolerates everything else: Telegram adds fields and
 * update kinds with every Bot API version, and an update we cannot use must still be acknowledged,
 * never refused (a refused webhook is redelivered for a day). Ids are int64: chat ids of
 * supergroups pass 32 bits.
 *
 * The Bot API client is a blocking libcurl easy handle per client, reused across calls so the
 * connection stays open: the telegram worker holds one per handler thread and bot. It makes one
 * attempt per call; pacing, 429 and 5xx retries are the caller's, which knows whether it may wait
 * (a worker) or must not (bgctl prints the error).
 *
 * Provisioning a Telegram user mirrors bg_acct_register (personal organization, billing account,
 * trial) without an email or password, which the users table allows for accounts made on another
 * channel; a transaction-level advisory lock on the Telegram user id makes two first messages
 * arriving at once produce one account.
 */
#include <curl/curl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "bg/accounts.h"
#include "bg/buf.h"
#include "bg/chat.h"
#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/i18n.h"
#include "bg/json.h"
#include "bg/log.h"
#include "bg/pg.h"
#include "bg/telegram.h"

/* An answer of the Bot API bigger than this is not one (results of the methods we call are small).
 */
#define RESPONSE_MAX (1024 * 1024)

/* ---- parsing ---- */

static void copy_str(const bg_json_t *obj, const char *key, char *out, size_t outlen)
{
    const bg_json_t *v = obj != NULL ? bg_json_find(obj, key) : NULL;
    size_t len = 0;
    const char *s = v != NULL && bg_json_type(v) == BG_JSON_STRING ? bg_json_str(v, &len) : NULL;
    out[0] = '\0';
    if (s == NULL || outlen == 0)
        return;
    if (len >= outlen) {
        /* cut at a character boundary */
        len = outlen - 1;
        while (len > 0 && ((unsigned char)s[len] & 0xC0) == 0x80)
            len--;
    }
    memcpy(out, s, len);
    out[len] = '\0';
}

static bool get_i64(const bg_json_t *obj, const char *key, int64_t *out)
{
    const bg_json_t *v = obj != NULL ? bg_json_find(obj, key) : NULL;
    return v != NULL && bg_json_type(v) == BG_JSON_NUMBER && bg_json_int(v, out);
}

static const bg_json_t *get_obj(const bg_json_t *obj, const char *key)
{
    const bg_json_t *v = obj != NULL ? bg_json_find(obj, key) : NULL;
    return v != NULL && bg_json_type(v) == BG_JSON_OBJECT ? v : NULL;
}

static void read_from(const bg_json_t *from, bg_tg_update_t *u)
{
    if (from == NULL || !get_i64(from, "id", &u->from_id))
        return;
    u->has_from = true;
    const bg_json_t *b = bg_json_find(from, "is_bot");
    bool is_bot = false;
    u->from_is_bot = b != NULL && bg_json_bool(b, &is_bot) && is_bot;
    copy_str(from, "first_name", u->first_name, sizeof(u->first_name));
    copy_str(from, "username", u->username, sizeof(u->username));
    copy_str(from, "language_code", u->language_code, sizeof(u->language_code));
}

static void read_chat(const bg_json_t *msg, bg_tg_update_t *u)
{
    const bg_json_t *chat = get_obj(msg, "chat");
    if (chat != NULL && get_i64(chat, "id", &u->chat_id)) {
        u->has_chat = true;
        copy_str(chat, "type", u->chat_type, sizeof(u->chat_type));
    }
    (void)get_i64(msg, "message_id", &u->message_id);
}

/* "/Start@MyBot args" → "start"; returns false when text does not start with a command. */
static bool read_command(const char *text, char *out, size_t outlen)
{
    if (text[0] != '/')
        return false;
    size_t i = 1, n = 0;
    while (text[i] != '\0' && text[i] != ' ' && text[i] != '@' && text[i] != '\n') {
        char ch = text[i++];
        if (ch >= 'A' && ch <= 'Z')
            ch = (char)(ch - 'A' + 'a');
        bool ok = (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_';
        if (!ok || n + 1 >= outlen)
            return false;
        out[n++] = ch;
    }
    out[n] = '\0';
    return n > 0;
}

/* The file of a media field: a photo is an array of sizes, smallest first (take the largest). */
static void read_file(const bg_json_t *m, bg_tg_content_t content, bg_tg_update_t *u)
{
    if (bg_json_is_array(m)) {
        size_t n = bg_json_len(m);
        m = n > 0 ? bg_json_at(m, n - 1) : NULL;
    }
    if (m == NULL || bg_json_type(m) != BG_JSON_OBJECT)
        return;
    copy_str(m, "file_id", u->file_id, sizeof(u->file_id));
    if (!get_i64(m, "file_size", &u->file_size) || u->file_size < 0)
        u->file_size = 0;
    copy_str(m, "mime_type", u->mime_type, sizeof(u->mime_type));
    if (content == BG_TG_DOCUMENT)
        copy_str(m, "file_name", u->file_name, sizeof(u->file_name));
    /* Telegram re-encodes every photo as JPEG and gives no mime_type for it */
    if (content == BG_TG_PHOTO && u->mime_type[0] == '\0')
        bg_strlcpy(u->mime_type, "image/jpeg", sizeof(u->mime_type));
}

static void read_message(const bg_json_t *msg, bg_tg_update_t *u)
{
    read_chat(msg, u);
    read_from(get_obj(msg, "from"), u);
    (void)get_i64(msg, "message_thread_id", &u->thread_id);
    const bg_json_t *t = bg_json_find(msg, "text");
    if (t == NULL || bg_json_type(t) != BG_JSON_STRING)
        t = bg_json_find(msg, "caption");
    if (t != NULL && bg_json_type(t) == BG_JSON_STRING) {
        size_t len = 0;
        const char *s = bg_json_str(t, &len);
        if (len > BG_TG_IN_TEXT_MAX)
            len = bg_tg_split(s, len, BG_TG_IN_TEXT_MAX);
        u->text = bg_strndup(s, len);
    }
    static const struct {
        const char *key;
        bg_tg_content_t content;
    } media[] = {{"photo", BG_TG_PHOTO}, {"document", BG_TG_DOCUMENT}, {"voice", BG_TG_VOICE},
                 {"audio", BG_TG_AUDIO}, {"video", BG_TG_VIDEO},       {"video_note", BG_TG_VIDEO}};
    for (size_t i = 0; i < BG_ARRAY_SIZE(media); i++) {
        const bg_json_t *m = bg_json_find(msg, media[i].key);
        if (m != NULL) {
            u->content = media[i].content;
            read_file(m, media[i].content, u);
            return;
        }
    }
    const bg_json_t *text = bg_json_find(msg, "text");
    if (text != NULL && u->text != NULL && u->text[0] != '\0') {
        u->content =
            read_command(u->text, u->command, sizeof(u->command)) ? BG_TG_COMMAND : BG_TG_TEXT;
    }
}

static void read_callback(const bg_json_t *cq, bg_tg_update_t *u)
{
    copy_str(cq, "id", u->callback_id, sizeof(u->callback_id));
    copy_str(cq, "data", u->callback_data, sizeof(u->callback_data));
    read_from(get_obj(cq, "from"), u);
    const bg_json_t *msg = get_obj(cq, "message");
    if (msg != NULL) {
        read_chat(msg, u);
        int64_t date = 0;
        u->message_inaccessible = !get_i64(msg, "date", &date) || date == 0;
    }
}

int bg_tg_update_parse(const char *json, size_t len, bg_tg_update_t *out, const char **err_desc)
{
    memset(out, 0, sizeof(*out));
    bg_json_doc_t *doc = NULL;
    const char *desc = NULL;
    int rc = bg_json_parse(json, len, NULL, &doc, &desc, NULL);
    if (rc != 0) {
        *err_desc = desc;
        return rc;
    }
    const bg_json_t *root = bg_json_root(doc);
    if (bg_json_type(root) != BG_JSON_OBJECT) {
        *err_desc = "an update is a JSON object";
        rc = BG_ERR_INVALID;
        goto done;
    }
    if (!get_i64(root, "update_id", &out->update_id) || out->update_id < 0) {
        *err_desc = "update_id: missing or not a non-negative integer";
        rc = BG_ERR_INVALID;
        goto done;
    }
    const bg_json_t *v;
    if ((v = get_obj(root, "message")) != NULL) {
        out->kind = BG_TG_MESSAGE;
        read_message(v, out);
    } else if ((v = get_obj(root, "edited_message")) != NULL) {
        out->kind = BG_TG_EDITED;
        read_message(v, out);
    } else if ((v = get_obj(root, "callback_query")) != NULL) {
        out->kind = BG_TG_CALLBACK;
        read_callback(v, out);
    } else if ((v = get_obj(root, "channel_post")) != NULL ||
               (v = get_obj(root, "edited_channel_post")) != NULL) {
        out->kind = BG_TG_CHANNEL_POST;
        read_chat(v, out);
    }
done:
    bg_json_doc_free(doc);
    if (rc != 0)
        bg_tg_update_dispose(out);
    return rc;
}

void bg_tg_update_dispose(bg_tg_update_t *u)
{
    free(u->text);
    u->text = NULL;
}

/* ---- tokens, secrets, text ---- */

bool bg_tg_slug_is_valid(const char *s, size_t len)
{
    if (len == 0 || len >= BG_TG_SLUG_SIZE - 3)
        return false;
    for (size_t i = 0; i < len; i++)
        if (s[i] < '0' || s[i] > '9')
            return false;
    return true;
}

int bg_tg_token_slug(const char *token, char out[BG_TG_SLUG_SIZE])
{
    out[0] = '\0';
    if (token == NULL)
        return BG_ERR_INVALID;
    const char *colon = strchr(token, ':');
    if (colon == NULL || colon[1] == '\0' || strlen(token) >= BG_TG_TOKEN_SIZE)
        return BG_ERR_INVALID;
    size_t n = (size_t)(colon - token);
    if (!bg_tg_slug_is_valid(token, n))
        return BG_ERR_INVALID;
    for (const char *p = colon + 1; *p != '\0'; p++) {
        bool ok = (*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') ||
                  (*p >= '0' && *p <= '9') || *p == '_' || *p == '-';
        if (!ok)
            return BG_ERR_INVALID;
    }
    memcpy(out, token, n);
    out[n] = '\0';
    return 0;
}

bool bg_tg_secret_is_valid(const char *s)
{
    size_t n = s != NULL ? strlen(s) : 0;
    if (n < 1 || n > 256)
        return false;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        bool ok = (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') ||
                  (ch >= '0' && ch <= '9') || ch == '_' || ch == '-';
        if (!ok)
            return false;
    }
    return true;
}

bool bg_tg_secret_matches(const char *secret, size_t len, const char *secret_hash)
{
    if (secret == NULL || secret_hash == NULL || strlen(secret_hash) != 64)
        return false;
    /* hashing first makes the comparison's length fixed, whatever was presented */
    char got[BG_CRYPTO_SHA256_HEX_LEN];
    bg_crypto_sha256_hex(secret, len, got);
    return bg_crypto_equal(got, secret_hash, 64);
}

/* Bytes of the UTF-8 sequence starting with lead (1 for a stray continuation byte). */
static size_t seq_len(unsigned char lead)
{
    if (lead >= 0xF0)
        return 4;
    if (lead >= 0xE0)
        return 3;
    if (lead >= 0xC0)
        return 2;
    return 1;
}

size_t bg_tg_utf16_len(const char *text, size_t len)
{
    size_t units = 0;
    for (size_t i = 0; i < len;) {
        size_t n = seq_len((unsigned char)text[i]);
        units += n == 4 ? 2 : 1;
        i += n;
    }
    return units;
}

size_t bg_tg_split(const char *text, size_t len, size_t max_units)
{
    /* how many bytes fit */
    size_t fit = 0, units = 0;
    while (fit < len) {
        size_t n = seq_len((unsigned char)text[fit]);
        size_t u = n == 4 ? 2 : 1;
        if (units + u > max_units || fit + n > len)
            break;
        units += u;
        fit += n;
    }
    if (fit >= len)
        return len;
    if (fit == 0) /* max_units below one character: send one anyway */
        return seq_len((unsigned char)text[0]) <= len ? seq_len((unsigned char)text[0]) : len;
    /* the best boundary in the second half of what fits */
    size_t half = fit / 2;
    static const char *const seps[] = {"\n\n", "\n", ". ", "! ", "? ", " "};
    for (size_t s = 0; s < BG_ARRAY_SIZE(seps); s++) {
        size_t sl = strlen(seps[s]);
        for (size_t i = fit; i >= half + sl && i >= sl; i--) {
            if (memcmp(text + i - sl, seps[s], sl) == 0)
                return i;
        }
    }
    return fit;
}

/* ---- the Bot API client ---- */

struct bg_tg_client {
    CURL *easy;
    char *base; /* owned: <api_url>/bot<token>/ (secret: wiped on free) */
    size_t base_len;
    char *file_base; /* owned: <api_url>/file/bot<token>/ (secret: wiped on free) */
    size_t file_base_len;
    int64_t timeout_ms;
};

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *ud)
{
    bg_buf_t *b = ud;
    size_t n = size * nmemb;
    return bg_buf_append(b, ptr, n) == 0 ? n : 0;
}

int bg_tg_client_new(const char *api_url, const char *token, int64_t timeout_ms,
                     bg_tg_client_t **out)
{
    *out = NULL;
    char slug[BG_TG_SLUG_SIZE];
    if (api_url == NULL || api_url[0] == '\0' || bg_tg_token_slug(token, slug) != 0)
        return BG_ERR_INVALID;
    static bool curl_ready;
    if (!curl_ready) {
        /* thread-safe since curl 7.84 (Debian 12 has 7.88) */
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
            return BG_ERR_UNAVAILABLE;
        curl_ready = true;
    }
    bg_tg_client_t *c = bg_calloc(1, sizeof(*c));
    size_t ul = strlen(api_url);
    while (ul > 0 && api_url[ul - 1] == '/')
        ul--;
    c->base = bg_asprintf("%.*s/bot%s/", (int)ul, api_url, token);
    c->base_len = strlen(c->base);
    c->file_base = bg_asprintf("%.*s/file/bot%s/", (int)ul, api_url, token);
    c->file_base_len = strlen(c->file_base);
    c->timeout_ms = timeout_ms > 0 ? timeout_ms : 30000;
    c->easy = curl_easy_init();
    if (c->easy == NULL) {
        bg_tg_client_free(c);
        return BG_ERR_UNAVAILABLE;
    }
    *out = c;
    return 0;
}

void bg_tg_client_free(bg_tg_client_t *c)
{
    if (c == NULL)
        return;
    if (c->easy != NULL)
        curl_easy_cleanup(c->easy);
    if (c->base != NULL) {
        bg_crypto_wipe(c->base, c->base_len);
        free(c->base);
    }
    if (c->file_base != NULL) {
        bg_crypto_wipe(c->file_base, c->file_base_len);
        free(c->file_base);
    }
    free(c);
}

static void read_result(const char *body, size_t len, bg_tg_result_t *out, int *rc,
                        bg_buf_t *result_json)
{
    bg_json_doc_t *doc = NULL;
    const char *desc = NULL;
    if (bg_json_parse(body, len, NULL, &doc, &desc, NULL) != 0) {
        *rc = BG_ERR_PROTOCOL;
        return;
    }
    const bg_json_t *root = bg_json_root(doc);
    const bg_json_t *okv = bg_json_type(root) == BG_JSON_OBJECT ? bg_json_find(root, "ok") : NULL;
    bool ok = false;
    if (okv == NULL || !bg_json_bool(okv, &ok)) {
        *rc = BG_ERR_PROTOCOL;
        goto done;
    }
    out->ok = ok;
    if (ok) {
        const bg_json_t *any = bg_json_find(root, "result");
        if (any != NULL && result_json != NULL) {
            bg_json_writer_t w;
            bg_json_writer_init(&w, result_json);
            bg_json_write_value(&w, any);
            if (bg_json_write_finish(&w) != 0)
                *rc = BG_ERR_TOO_LARGE;
        }
        const bg_json_t *res = get_obj(root, "result");
        if (res != NULL) {
            (void)get_i64(res, "message_id", &out->message_id);
            const bg_json_t *chat = get_obj(res, "chat");
            (void)get_i64(chat, "id", &out->chat_id);
        }
    } else {
        if (!get_i64(root, "error_code", &out->error_code))
            out->error_code = out->http_status;
        copy_str(root, "description", out->description, sizeof(out->description));
        (void)get_i64(get_obj(root, "parameters"), "retry_after", &out->retry_after_s);
        if (out->retry_after_s < 0)
            out->retry_after_s = 0;
    }
done:
    bg_json_doc_free(doc);
}

int bg_tg_client_call(bg_tg_client_t *c, const char *method, const char *body, bg_tg_result_t *out)
{
    return bg_tg_client_call_ex(c, method, body, out, NULL);
}

int bg_tg_client_call_ex(bg_tg_client_t *c, const char *method, const char *body,
                         bg_tg_result_t *out, bg_buf_t *result_json)
{
    memset(out, 0, sizeof(*out));
    bg_buf_t url, resp;
    bg_buf_init(&url, 4096);
    bg_buf_init(&resp, RESPONSE_MAX);
    int rc = 0;
    if (bg_buf_append(&url, c->base, c->base_len) != 0 || bg_buf_puts(&url, method) != 0) {
        rc = BG_ERR_TOO_LARGE;
        goto done;
    }
    struct curl_slist *headers = curl_slist_append(NULL, "Content-Type: application/json");
    curl_easy_reset(c->easy);
    (void)curl_easy_setopt(c->easy, CURLOPT_URL, url.base);
    (void)curl_easy_setopt(c->easy, CURLOPT_POST, 1L);
    (void)curl_easy_setopt(c->easy, CURLOPT_POSTFIELDS, body);
    (void)curl_easy_setopt(c->easy, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
    (void)curl_easy_setopt(c->easy, CURLOPT_HTTPHEADER, headers);
    (void)curl_easy_setopt(c->easy, CURLOPT_WRITEFUNCTION, on_body);
    (void)curl_easy_setopt(c->easy, CURLOPT_WRITEDATA, &resp);
    (void)curl_easy_setopt(c->easy, CURLOPT_TIMEOUT_MS, (long)c->timeout_ms);
    (void)curl_easy_setopt(c->easy, CURLOPT_CONNECTTIMEOUT_MS, 5000L);
    (void)curl_easy_setopt(c->easy, CURLOPT_NOSIGNAL, 1L);
    CURLcode cc = curl_easy_perform(c->easy);
    curl_slist_free_all(headers);
    if (cc != CURLE_OK) {
        /* the URL holds the token: name the method only */
        bg_debug("telegram %s: %s", method, curl_easy_strerror(cc));
        rc = cc == CURLE_OPERATION_TIMEDOUT ? BG_ERR_TIMEOUT : BG_ERR_UNAVAILABLE;
        goto done;
    }
    (void)curl_easy_getinfo(c->easy, CURLINFO_RESPONSE_CODE, &out->http_status);
    read_result(resp.base != NULL ? resp.base : "", resp.len, out, &rc, result_json);
    if (rc != 0 && out->http_status >= 500) {
        /* a proxy's 502 page: a server error like any other */
        out->ok = false;
        out->error_code = out->http_status;
        rc = 0;
    }
done:
    bg_crypto_wipe(url.base, url.len);
    bg_buf_dispose(&url);
    bg_buf_dispose(&resp);
    return rc;
}

bool bg_tg_is_not_modified(const bg_tg_result_t *r)
{
    return !r->ok && r->error_code == 400 &&
           strstr(r->description, "message is not modified") != NULL;
}

/* ---- files ---- */

/* A file_path as Telegram gives it ("photos/file_0.jpg"): nothing that could leave the path. */
static bool file_path_ok(const char *p)
{
    if (p[0] == '\0' || p[0] == '/' || strstr(p, "..") != NULL)
        return false;
    for (; *p != '\0'; p++) {
        char ch = *p;
        bool ok = (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') ||
                  (ch >= '0' && ch <= '9') || ch == '_' || ch == '-' || ch == '.' || ch == '/';
        if (!ok)
            return false;
    }
    return true;
}

int bg_tg_client_get_file(bg_tg_client_t *c, bg_tg_file_t *f, int64_t max, bg_tg_result_t *res)
{
    f->file_path[0] = '\0';
    if (f->file_size > max)
        return BG_ERR_TOO_LARGE;
    bg_buf_t body, result;
    bg_buf_init(&body, 1024);
    bg_buf_init(&result, 8192);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &body);
    bg_json_write_begin_object(&w);
    bg_json_write_field_str(&w, "file_id", f->file_id);
    bg_json_write_end_object(&w);
    int rc = bg_json_write_finish(&w);
    if (rc == 0)
        rc = bg_tg_client_call_ex(c, "getFile", body.base, res, &result);
    if (rc == 0 && !res->ok)
        rc = BG_ERR_INVALID;
    bg_json_doc_t *doc = NULL;
    const char *desc = NULL;
    if (rc == 0 && bg_json_parse(result.base != NULL ? result.base : "", result.len, NULL, &doc,
                                 &desc, NULL) != 0)
        rc = BG_ERR_PROTOCOL;
    if (rc == 0) {
        const bg_json_t *root = bg_json_root(doc);
        int64_t size = 0;
        if (get_i64(root, "file_size", &size) && size > 0)
            f->file_size = size;
        copy_str(root, "file_path", f->file_path, sizeof(f->file_path));
        if (f->file_size > max)
            rc = BG_ERR_TOO_LARGE;
        else if (!file_path_ok(f->file_path))
            rc = BG_ERR_PROTOCOL; /* no path: Telegram cannot serve it (or it is not a path) */
    }
    bg_json_doc_free(doc);
    bg_buf_dispose(&body);
    bg_buf_dispose(&result);
    return rc;
}

typedef struct st_sink {
    bg_buf_t *out;
    size_t start;
    int64_t max;
    bool over;
} sink_t;

static size_t on_file(char *ptr, size_t size, size_t nmemb, void *ud)
{
    sink_t *k = ud;
    size_t n = size * nmemb;
    /* the body, not only the Content-Length, is held to the limit */
    if ((int64_t)(k->out->len - k->start + n) > k->max || bg_buf_append(k->out, ptr, n) != 0) {
        k->over = true;
        return 0;
    }
    return n;
}

int bg_tg_client_download(bg_tg_client_t *c, const bg_tg_file_t *f, int64_t max, bg_buf_t *out)
{
    if (!file_path_ok(f->file_path))
        return BG_ERR_INVALID;
    bg_buf_t url;
    bg_buf_init(&url, 4096);
    int rc = 0;
    if (bg_buf_append(&url, c->file_base, c->file_base_len) != 0 ||
        bg_buf_puts(&url, f->file_path) != 0) {
        rc = BG_ERR_TOO_LARGE;
        goto done;
    }
    sink_t k = {.out = out, .start = out->len, .max = max};
    curl_easy_reset(c->easy);
    (void)curl_easy_setopt(c->easy, CURLOPT_URL, url.base);
    (void)curl_easy_setopt(c->easy, CURLOPT_HTTPGET, 1L);
    (void)curl_easy_setopt(c->easy, CURLOPT_WRITEFUNCTION, on_file);
    (void)curl_easy_setopt(c->easy, CURLOPT_WRITEDATA, &k);
    (void)curl_easy_setopt(c->easy, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)max);
    (void)curl_easy_setopt(c->easy, CURLOPT_FAILONERROR, 1L);
    (void)curl_easy_setopt(c->easy, CURLOPT_TIMEOUT_MS, (long)c->timeout_ms);
    (void)curl_easy_setopt(c->easy, CURLOPT_CONNECTTIMEOUT_MS, 5000L);
    (void)curl_easy_setopt(c->easy, CURLOPT_NOSIGNAL, 1L);
    CURLcode cc = curl_easy_perform(c->easy);
    long status = 0;
    (void)curl_easy_getinfo(c->easy, CURLINFO_RESPONSE_CODE, &status);
    if (cc == CURLE_FILESIZE_EXCEEDED || k.over)
        rc = BG_ERR_TOO_LARGE;
    else if (cc == CURLE_HTTP_RETURNED_ERROR && status == 404)
        rc = BG_ERR_NOT_FOUND;
    else if (cc == CURLE_OPERATION_TIMEDOUT)
        rc = BG_ERR_TIMEOUT;
    else if (cc != CURLE_OK)
        rc = BG_ERR_UNAVAILABLE;
    if (rc != 0) {
        /* the URL holds the token: say what failed without it */
        bg_debug("telegram file download: %s (HTTP %ld)", curl_easy_strerror(cc), status);
        out->len = k.start;
        if (out->base != NULL)
            out->base[out->len] = '\0';
    }
done:
    bg_crypto_wipe(url.base, url.len);
    bg_buf_dispose(&url);
    return rc;
}

int bg_tg_data_url(const char *mime, const void *data, size_t len, bg_buf_t *out)
{
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    if (bg_buf_printf(out, "data:%s;base64,", mime) != 0)
        return BG_ERR_TOO_LARGE;
    const unsigned char *p = data;
    char quad[4];
    for (size_t i = 0; i < len; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16;
        if (i + 1 < len)
            v |= (uint32_t)p[i + 1] << 8;
        if (i + 2 < len)
            v |= p[i + 2];
        quad[0] = b64[(v >> 18) & 63];
        quad[1] = b64[(v >> 12) & 63];
        quad[2] = i + 1 < len ? b64[(v >> 6) & 63] : '=';
        quad[3] = i + 2 < len ? b64[v & 63] : '=';
        if (bg_buf_append(out, quad, 4) != 0)
            return BG_ERR_TOO_LARGE;
    }
    return 0;
}

/* ---- text files ---- */

bool bg_tg_is_text_file(const char *mime_type, const char *file_name)
{
    static const char *const mimes[] = {
        "application/json",         "application/ld+json", "application/x-ndjson",
        "application/xml",          "application/yaml",    "application/x-yaml",
        "application/toml",         "application/sql",     "application/javascript",
        "application/x-javascript", "application/x-sh",    "application/x-shellscript",
        "application/x-python",     "application/x-tex",   "application/x-subrip"};
    static const char *const exts[] = {
        "txt",  "text",  "md",   "markdown", "rst",  "csv",  "tsv", "json", "jsonl", "ndjson",
        "yaml", "yml",   "toml", "ini",      "cfg",  "conf", "env", "log",  "xml",   "html",
        "htm",  "css",   "scss", "js",       "mjs",  "cjs",  "ts",  "tsx",  "jsx",   "py",
        "rb",   "go",    "rs",   "c",        "h",    "cc",   "cpp", "hpp",  "cs",    "java",
        "kt",   "swift", "php",  "pl",       "lua",  "r",    "sh",  "bash", "zsh",   "ps1",
        "sql",  "tex",   "srt",  "vtt",      "diff", "patch"};
    const char *m = mime_type != NULL ? mime_type : "";
    if (strncasecmp(m, "text/", 5) == 0)
        return true;
    for (size_t i = 0; i < BG_ARRAY_SIZE(mimes); i++)
        if (strcasecmp(m, mimes[i]) == 0)
            return true;
    size_t mlen = strlen(m);
    if (mlen > 5 &&
        (strcasecmp(m + mlen - 5, "+json") == 0 || strcasecmp(m + mlen - 4, "+xml") == 0))
        return true;
    /* a mime_type that names something else is believed; only a silent one defers to the name */
    if (m[0] != '\0' && strcasecmp(m, "application/octet-stream") != 0)
        return false;
    const char *dot = file_name != NULL ? strrchr(file_name, '.') : NULL;
    if (dot == NULL || dot == file_name)
        return false;
    for (size_t i = 0; i < BG_ARRAY_SIZE(exts); i++)
        if (strcasecmp(dot + 1, exts[i]) == 0)
            return true;
    return false;
}

/* Returns true when len bytes of UTF-8 hold no control character but tab, LF, CR and FF. */
static bool is_text(const unsigned char *p, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = p[i];
        if ((ch < 0x20 && ch != '\t' && ch != '\n' && ch != '\r' && ch != '\f') || ch == 0x7F)
            return false;
    }
    return true;
}

int bg_tg_text_file_message(const char *caption, const char *file_name, const void *data,
                            size_t len, bg_buf_t *out)
{
    const unsigned char *p = data;
    if (len >= 3 && p[0] == 0xEF && p[1] == 0xBB && p[2] == 0xBF) {
        p += 3; /* the byte order mark some editors write */
        len -= 3;
    }
    if (!bg_json_utf8_is_valid((const char *)p, len) || !is_text(p, len))
        return BG_ERR_INVALID;
    /* the fence: one backtick longer than the longest run of them in the text, at least three */
    size_t run = 0, longest = 0;
    for (size_t i = 0; i < len; i++) {
        run = p[i] == '`' ? run + 1 : 0;
        if (run > longest)
            longest = run;
    }
    char fence[64];
    size_t flen = longest + 1 < 3 ? 3 : longest + 1;
    if (flen >= sizeof(fence))
        return BG_ERR_INVALID; /* 63 backticks in a row: not a text to quote */
    memset(fence, '`', flen);
    fence[flen] = '\0';
    if (caption != NULL && caption[0] != '\0' && bg_buf_printf(out, "%s\n\n", caption) != 0)
        return BG_ERR_TOO_LARGE;
    /* the name on a line of its own: no control character may break the line or the fence */
    char name[256];
    bg_strlcpy(name, file_name != NULL && file_name[0] != '\0' ? file_name : "file", sizeof(name));
    for (char *c = name; *c != '\0'; c++)
        if ((unsigned char)*c < 0x20 || *c == 0x7F)
            *c = '_';
    if (bg_buf_printf(out, "%s:\n%s\n", name, fence) != 0)
        return BG_ERR_TOO_LARGE;
    size_t start = 0;
    for (size_t i = 0; i < len; i++) {
        if (p[i] == '\r' && i + 1 < len && p[i + 1] == '\n') {
            if (bg_buf_append(out, p + start, i - start) != 0)
                return BG_ERR_TOO_LARGE;
            start = i + 1; /* the LF is kept */
        }
    }
    if (bg_buf_append(out, p + start, len - start) != 0)
        return BG_ERR_TOO_LARGE;
    bool ends_line = len == 0 || p[len - 1] == '\n';
    if (bg_buf_printf(out, "%s%s", ends_line ? "" : "\n", fence) != 0)
        return BG_ERR_TOO_LARGE;
    return 0;
}

/* ---- Postgres ---- */

static const char *val(PGresult *res, int row, int col)
{
    return PQgetisnull(res, row, col) ? "" : PQgetvalue(res, row, col);
}

int bg_tg_bot_get(PGconn *c, const char *slug, bg_tg_bot_t *out)
{
    memset(out, 0, sizeof(*out));
    const char *p[] = {slug};
    PGresult *res = NULL;
    int rc = bg_pg_exec(c,
                        "SELECT id, slug, agent_id, token, webhook_secret_hash, status = 'active' "
                        "FROM telegram_bots WHERE slug = $1",
                        1, p, &res);
    if (rc != 0)
        return rc;
    if (PQntuples(res) != 1) {
        PQclear(res);
        return BG_ERR_NOT_FOUND;
    }
    bg_strlcpy(out->id, val(res, 0, 0), sizeof(out->id));
    bg_strlcpy(out->slug, val(res, 0, 1), sizeof(out->slug));
    bg_strlcpy(out->agent_id, val(res, 0, 2), sizeof(out->agent_id));
    bg_strlcpy(out->token, val(res, 0, 3), sizeof(out->token));
    bg_strlcpy(out->secret_hash, val(res, 0, 4), sizeof(out->secret_hash));
    out->active = strcmp(val(res, 0, 5), "t") == 0;
    PQclear(res);
    return 0;
}

int bg_tg_bot_bind(PGconn *c, const char *token, const char *secret, const char *agent_id,
                   bg_tg_bot_t *out)
{
    char slug[BG_TG_SLUG_SIZE];
    if (bg_tg_token_slug(token, slug) != 0 || !bg_tg_secret_is_valid(secret) || agent_id == NULL)
        return BG_ERR_INVALID;
    char hash[BG_CRYPTO_SHA256_HEX_LEN];
    bg_crypto_sha256_hex(secret, strlen(secret), hash);
    const char *p[] = {slug, agent_id, token, hash};
    PGresult *res = NULL;
    int rc =
        bg_pg_exec(c,
                   "INSERT INTO telegram_bots (slug, telegram_bot_id, agent_id, token, "
                   "webhook_secret_hash) "
                   "SELECT $1::text, $1::text::bigint, a.id, $3, $4 FROM agents a "
                   "WHERE a.id = $2::uuid AND a.deleted_at IS NULL "
                   "ON CONFLICT (slug) DO UPDATE SET agent_id = EXCLUDED.agent_id, "
                   "token = EXCLUDED.token, webhook_secret_hash = EXCLUDED.webhook_secret_hash, "
                   "status = 'active' RETURNING id",
                   4, p, &res);
    if (rc != 0)
        return rc;
    int n = PQntuples(res);
    PQclear(res);
    if (n != 1)
        return BG_ERR_NOT_FOUND;
    return out != NULL ? bg_tg_bot_get(c, slug, out) : 0;
}

static int identity_load(PGconn *c, const char *tg_id, bg_tg_identity_t *out, bool *found)
{
    const char *p[] = {tg_id};
    PGresult *res = NULL;
    int rc = bg_pg_exec(c,
                        "SELECT u.id, u.name, u.locale FROM telegram_accounts t "
                        "JOIN users u ON u.id = t.user_id "
                        "WHERE t.telegram_user_id = $1::bigint AND u.deleted_at IS NULL",
                        1, p, &res);
    if (rc != 0)
        return rc;
    *found = PQntuples(res) == 1;
    if (*found) {
        bg_strlcpy(out->user_id, val(res, 0, 0), sizeof(out->user_id));
        bg_strlcpy(out->name, val(res, 0, 1), sizeof(out->name));
        bg_strlcpy(out->locale, val(res, 0, 2), sizeof(out->locale));
    }
    PQclear(res);
    return 0;
}

/* The supported locale of a Telegram language_code ("pt-br" → "pt" when supported), or NULL. */
static const char *locale_of(const char *code)
{
    if (code == NULL || code[0] == '\0')
        return NULL;
    char base[16];
    size_t n = 0;
    while (code[n] != '\0' && code[n] != '-' && code[n] != '_' && n + 1 < sizeof(base)) {
        base[n] = code[n];
        n++;
    }
    base[n] = '\0';
    if (bg_i18n_is_supported(base))
        return bg_i18n_negotiate(base, NULL);
    return NULL;
}

int bg_tg_identity_resolve(PGconn *c, const bg_tg_update_t *u, const char *default_locale,
                           bg_tg_identity_t *out)
{
    memset(out, 0, sizeof(*out));
    if (!u->has_from)
        return BG_ERR_INVALID;
    char tg_id[24];
    snprintf(tg_id, sizeof(tg_id), "%" PRId64, u->from_id);
    bool found = false;
    int rc = identity_load(c, tg_id, out, &found);
    if (rc != 0 || found)
        return rc;

    const char *loc = locale_of(u->language_code);
    if (loc == NULL)
        loc = default_locale != NULL ? default_locale : "en";
    char days[16];
    snprintf(days, sizeof(days), "%d", BG_ACCT_TRIAL_DAYS);
    PGresult *res = NULL;
    rc = bg_pg_begin(c);
    if (rc != 0)
        return rc;
    /* two first messages at once: the second waits here, then finds the first one's user */
    const char *lp[] = {tg_id};
    rc = bg_pg_run(c, "SELECT pg_advisory_xact_lock(7364, hashtext($1))", 1, lp);
    if (rc != 0)
        goto err_rollback;
    rc = identity_load(c, tg_id, out, &found);
    if (rc != 0)
        goto err_rollback;
    if (found)
        return bg_pg_commit(c);

    const char *name = u->first_name[0] != '\0' ? u->first_name : u->username;
    const char *display = name[0] != '\0' ? name : "Telegram user";
    const char *p[] = {tg_id,  name, loc, days, u->username, u->first_name, u->language_code,
                       display};
    rc = bg_pg_exec(
        c,
        "WITH u AS (INSERT INTO users (name, locale) VALUES (left($2, 200), $3) RETURNING id), "
        "o AS (INSERT INTO organizations (name, personal, owner_id) "
        "  SELECT left($8, 188) || '''s workspace', true, id FROM u RETURNING id, owner_id), "
        "m AS (INSERT INTO memberships (organization_id, user_id, role) "
        "  SELECT id, owner_id, 'owner' FROM o), "
        "b AS (INSERT INTO billing_accounts (user_id, trial_used_at) SELECT id, now() FROM u "
        "  RETURNING id, user_id), "
        "s AS (INSERT INTO subscriptions (billing_account_id, user_id, plan_id, status, "
        "  current_period_start, current_period_end, trial_ends_at) "
        "  SELECT b.id, b.user_id, 'trial', 'trialing', now(), "
        "  now() + make_interval(days => $4::int), now() + make_interval(days => $4::int) FROM b), "
        "t AS (INSERT INTO telegram_accounts (telegram_user_id, user_id, username, first_name, "
        "  language_code) SELECT $1::bigint, id, nullif($5, ''), nullif($6, ''), nullif($7, '') "
        "  FROM u) "
        "SELECT id FROM u",
        8, p, &res);
    if (rc != 0)
        goto err_rollback;
    bg_strlcpy(out->user_id, val(res, 0, 0), sizeof(out->user_id));
    PQclear(res);
    res = NULL;
    bg_strlcpy(out->name, name, sizeof(out->name));
    bg_strlcpy(out->locale, loc, sizeof(out->locale));
    out->created = true;
    bg_actor_t actor = {.kind = "system", .id = NULL, .request_id = NULL, .ip = NULL};
    char details[160];
    snprintf(details, sizeof(details),
             "{\"channel\":\"telegram\",\"locale\":\"%s\",\"plan\":\"trial\"}", loc);
    rc = bg_acct_audit(c, &actor, "user.register", "user", out->user_id, details);
    if (rc != 0)
        goto err_rollback;
    return bg_pg_commit(c);

err_rollback:
    PQclear(res);
    bg_pg_rollback(c);
    return rc;
}

int bg_tg_chat_conversation(PGconn *c, const bg_tg_bot_t *bot, const bg_tg_update_t *u,
                            const char *user_id, bool fresh, char conv_id[37])
{
    conv_id[0] = '\0';
    char chat[24], from[24];
    snprintf(chat, sizeof(chat), "%" PRId64, u->chat_id);
    snprintf(from, sizeof(from), "%" PRId64, u->from_id);
    const char *type = u->chat_type[0] != '\0' ? u->chat_type : "private";
    const char *p[] = {bot->id, chat, type, u->has_from ? from : NULL};
    PGresult *res = NULL;
    /* the chat row, and the conversation it continues when that one is still live */
    int rc = bg_pg_exec(c,
                        "WITH r AS (INSERT INTO telegram_chats (bot_id, chat_id, type, "
                        "  telegram_user_id) VALUES ($1::uuid, $2::bigint, $3, $4::bigint) "
                        "  ON CONFLICT (bot_id, chat_id) DO UPDATE SET blocked_at = NULL, "
                        "  telegram_user_id = coalesce(EXCLUDED.telegram_user_id, "
                        "  telegram_chats.telegram_user_id) RETURNING conversation_id) "
                        "SELECT cv.id FROM r JOIN conversations cv ON cv.id = r.conversation_id "
                        "AND cv.deleted_at IS NULL",
                        4, p, &res);
    if (rc != 0)
        return rc;
    if (!fresh && PQntuples(res) == 1) {
        bg_strlcpy(conv_id, val(res, 0, 0), 37);
        PQclear(res);
        return 0;
    }
    PQclear(res);
    bg_chat_conversation_t conv;
    rc = bg_chat_create(c, user_id, bot->agent_id, "telegram", NULL, NULL, NULL, &conv);
    if (rc != 0)
        return rc;
    const char *q[] = {bot->id, chat, conv.id};
    rc = bg_pg_run(c,
                   "UPDATE telegram_chats SET conversation_id = $3::uuid "
                   "WHERE bot_id = $1::uuid AND chat_id = $2::bigint",
                   3, q);
    if (rc == 0)
        bg_strlcpy(conv_id, conv.id, 37);
    return rc;
}

int bg_tg_chat_record(PGconn *c, const bg_tg_bot_t *bot, const bg_tg_update_t *u)
{
    char chat[24], from[24];
    snprintf(chat, sizeof(chat), "%" PRId64, u->chat_id);
    snprintf(from, sizeof(from), "%" PRId64, u->from_id);
    const char *type = u->chat_type[0] != '\0' ? u->chat_type : "private";
    const char *p[] = {bot->id, chat, type, u->has_from ? from : NULL};
    return bg_pg_run(c,
                     "INSERT INTO telegram_chats (bot_id, chat_id, type, telegram_user_id) "
                     "VALUES ($1::uuid, $2::bigint, $3, $4::bigint) "
                     "ON CONFLICT (bot_id, chat_id) DO UPDATE SET blocked_at = NULL, "
                     "telegram_user_id = coalesce(EXCLUDED.telegram_user_id, "
                     "telegram_chats.telegram_user_id)",
                     4, p);
}

int bg_tg_chat_block(PGconn *c, const char *bot_id, int64_t chat_id)
{
    char chat[24];
    snprintf(chat, sizeof(chat), "%" PRId64, chat_id);
    const char *p[] = {bot_id, chat};
    return bg_pg_run(c,
                     "UPDATE telegram_chats SET blocked_at = now() "
                     "WHERE bot_id = $1::uuid AND chat_id = $2::bigint",
                     2, p);
}

int bg_tg_chat_is_blocked(PGconn *c, const char *bot_id, int64_t chat_id, bool *blocked)
{
    *blocked = false;
    char chat[24];
    snprintf(chat, sizeof(chat), "%" PRId64, chat_id);
    const char *p[] = {bot_id, chat};
    PGresult *res = NULL;
    int rc = bg_pg_exec(c,
                        "SELECT 1 FROM telegram_chats WHERE bot_id = $1::uuid "
                        "AND chat_id = $2::bigint AND blocked_at IS NOT NULL",
                        2, p, &res);
    if (rc != 0)
        return rc;
    *blocked = PQntuples(res) == 1;
    PQclear(res);
    return 0;
}

int bg_tg_agent_accepts_images(PGconn *c, const char *agent_id, bool *accepts)
{
    *accepts = false;
    const char *p[] = {agent_id};
    PGresult *res = NULL;
    int rc = bg_pg_exec(c, "SELECT accepts_images FROM agents WHERE id = $1::uuid", 1, p, &res);
    if (rc != 0)
        return rc;
    *accepts = PQntuples(res) == 1 && strcmp(val(res, 0, 0), "t") == 0;
    PQclear(res);
    return 0;
}

/* ---- /link ---- */

/* No 0/O, 1/I/L: a code read off a screen and typed on a phone should survive both. */
static const char LINK_ALPHABET[] = "23456789ABCDEFGHJKMNPQRSTUVWXYZ";

bool bg_tg_link_code_normalize(const char *typed, char out[BG_TG_LINK_CODE_SIZE])
{
    size_t n = 0;
    out[0] = '\0';
    for (const char *p = typed != NULL ? typed : ""; *p != '\0'; p++) {
        char ch = *p;
        if (ch == ' ' || ch == '-' || ch == '\t')
            continue;
        if (ch >= 'a' && ch <= 'z')
            ch = (char)(ch - 'a' + 'A');
        if (strchr(LINK_ALPHABET, ch) == NULL || n == BG_TG_LINK_CODE_LEN)
            return false;
        out[n++] = ch;
    }
    out[n] = '\0';
    return n == BG_TG_LINK_CODE_LEN;
}

int bg_tg_link_code_new(PGconn *c, const char *user_id, char code[BG_TG_LINK_CODE_SIZE],
                        int64_t *expires_ms)
{
    char ttl[24];
    snprintf(ttl, sizeof(ttl), "%d", BG_TG_LINK_TTL_MS);
    /* a collision with another user's live code is astronomically rare; draw again then */
    for (int attempt = 0; attempt < 4; attempt++) {
        for (size_t i = 0; i < BG_TG_LINK_CODE_LEN; i++)
            code[i] = LINK_ALPHABET[bg_crypto_random_uniform(sizeof(LINK_ALPHABET) - 1)];
        code[BG_TG_LINK_CODE_LEN] = '\0';
        char hash[BG_CRYPTO_SHA256_HEX_LEN];
        bg_crypto_sha256_hex(code, BG_TG_LINK_CODE_LEN, hash);
        const char *p[] = {user_id, hash, ttl};
        PGresult *res = NULL;
        bg_pg_error_t e;
        int rc = bg_pg_exec_ex(
            c,
            "INSERT INTO telegram_link_codes (user_id, code_hash, expires_at) "
            "SELECT u.id, $2, now() + make_interval(secs => $3::bigint / 1000.0) FROM users u "
            "WHERE u.id = $1::uuid AND u.deleted_at IS NULL "
            "ON CONFLICT (user_id) DO UPDATE SET code_hash = EXCLUDED.code_hash, "
            "expires_at = EXCLUDED.expires_at, used_at = NULL, created_at = now() "
            "RETURNING (extract(epoch FROM expires_at) * 1000)::bigint",
            3, p, &res, &e);
        if (rc == BG_ERR_CONFLICT)
            continue;
        if (rc != 0)
            return rc;
        bool found = PQntuples(res) == 1;
        if (found)
            *expires_ms = strtoll(val(res, 0, 0), NULL, 10);
        PQclear(res);
        if (!found)
            bg_crypto_wipe(code, BG_TG_LINK_CODE_SIZE);
        return found ? 0 : BG_ERR_NOT_FOUND;
    }
    return BG_ERR_CONFLICT;
}

/* Reads the live user user_id's name and locale into out. */
static int link_target(PGconn *c, const char *user_id, bg_tg_link_result_t *out, bool *live)
{
    const char *p[] = {user_id};
    PGresult *res = NULL;
    int rc = bg_pg_exec(c,
                        "SELECT name, locale FROM users WHERE id = $1::uuid AND deleted_at IS NULL "
                        "AND status = 'active' FOR UPDATE",
                        1, p, &res);
    if (rc != 0)
        return rc;
    *live = PQntuples(res) == 1;
    if (*live) {
        bg_strlcpy(out->name, val(res, 0, 0), sizeof(out->name));
        bg_strlcpy(out->locale, val(res, 0, 1), sizeof(out->locale));
    }
    PQclear(res);
    return 0;
}

int bg_tg_link(PGconn *c, int64_t tg_user_id, const char *code, bg_tg_link_result_t *out)
{
    memset(out, 0, sizeof(*out));
    char norm[BG_TG_LINK_CODE_SIZE];
    if (!bg_tg_link_code_normalize(code, norm)) {
        out->outcome = BG_TG_LINK_UNKNOWN;
        return 0;
    }
    char hash[BG_CRYPTO_SHA256_HEX_LEN], tg[24];
    bg_crypto_sha256_hex(norm, BG_TG_LINK_CODE_LEN, hash);
    snprintf(tg, sizeof(tg), "%" PRId64, tg_user_id);
    PGresult *res = NULL;
    int rc = bg_pg_begin(c);
    if (rc != 0)
        return rc;
    /* the code's row is locked: a second /link with it waits here and then finds it used */
    const char *p1[] = {hash};
    rc = bg_pg_exec(c,
                    "SELECT user_id, used_at IS NOT NULL, expires_at <= now() "
                    "FROM telegram_link_codes WHERE code_hash = $1 FOR UPDATE",
                    1, p1, &res);
    if (rc != 0)
        goto err_rollback;
    if (PQntuples(res) != 1) {
        out->outcome = BG_TG_LINK_UNKNOWN;
        goto refused;
    }
    bg_strlcpy(out->user_id, val(res, 0, 0), sizeof(out->user_id));
    bool used = strcmp(val(res, 0, 1), "t") == 0, expired = strcmp(val(res, 0, 2), "t") == 0;
    PQclear(res);
    res = NULL;
    if (used || expired) {
        out->outcome = used ? BG_TG_LINK_USED : BG_TG_LINK_EXPIRED;
        goto refused;
    }
    bool live = false;
    rc = link_target(c, out->user_id, out, &live);
    if (rc != 0)
        goto err_rollback;
    if (!live) {
        out->outcome = BG_TG_LINK_UNKNOWN; /* the account went away since */
        goto refused;
    }
    /* who the Telegram user is now, and whether the web account has a Telegram user already */
    const char *p2[] = {tg, out->user_id};
    rc = bg_pg_exec(c,
                    "SELECT (SELECT user_id FROM telegram_accounts WHERE telegram_user_id = "
                    "$1::bigint FOR UPDATE), (SELECT telegram_user_id FROM telegram_accounts "
                    "WHERE user_id = $2::uuid)",
                    2, p2, &res);
    if (rc != 0)
        goto err_rollback;
    bg_strlcpy(out->old_user_id, val(res, 0, 0), sizeof(out->old_user_id));
    bool taken = !PQgetisnull(res, 0, 1) && strcmp(val(res, 0, 1), tg) != 0;
    PQclear(res);
    res = NULL;
    if (strcmp(out->old_user_id, out->user_id) == 0) {
        out->outcome = BG_TG_LINK_ALREADY;
        out->old_user_id[0] = '\0';
        goto refused;
    }
    if (taken || out->old_user_id[0] == '\0') {
        out->outcome = BG_TG_LINK_TAKEN;
        out->old_user_id[0] = '\0';
        goto refused;
    }
    const char *p3[] = {hash};
    rc = bg_pg_run(c, "UPDATE telegram_link_codes SET used_at = now() WHERE code_hash = $1", 1, p3);
    if (rc != 0)
        goto err_rollback;
    const char *p4[] = {tg, out->user_id};
    rc = bg_pg_run(c,
                   "UPDATE telegram_accounts SET user_id = $2::uuid "
                   "WHERE telegram_user_id = $1::bigint",
                   2, p4);
    if (rc != 0)
        goto err_rollback;
    /* the old user: only a Telegram identity with nothing bought is retired into the account */
    const char *p5[] = {out->old_user_id};
    rc = bg_pg_exec(c,
                    "SELECT u.email IS NULL AND NOT EXISTS (SELECT 1 FROM subscriptions s "
                    "WHERE s.user_id = u.id AND s.plan_id <> 'trial') AND NOT EXISTS (SELECT 1 "
                    "FROM payments p JOIN billing_accounts b ON b.id = p.billing_account_id "
                    "WHERE b.user_id = u.id) FROM users u WHERE u.id = $1::uuid FOR UPDATE",
                    1, p5, &res);
    if (rc != 0)
        goto err_rollback;
    out->retired = PQntuples(res) == 1 && strcmp(val(res, 0, 0), "t") == 0;
    PQclear(res);
    res = NULL;
    const char *p6[] = {out->old_user_id, out->user_id};
    if (out->retired) {
        rc = bg_pg_exec(c,
                        "WITH s AS (UPDATE subscriptions SET status = 'canceled', "
                        "  canceled_at = now() WHERE user_id = $1::uuid AND status <> 'canceled'), "
                        "u AS (UPDATE users SET deleted_at = now(), status = 'disabled' "
                        "  WHERE id = $1::uuid), "
                        "x AS (DELETE FROM telegram_link_codes WHERE user_id = $1::uuid), "
                        "m AS (UPDATE conversations SET user_id = $2::uuid "
                        "  WHERE user_id = $1::uuid RETURNING id) "
                        "SELECT count(*) FROM m",
                        2, p6, &res);
        if (rc == 0) {
            out->moved = strtoll(val(res, 0, 0), NULL, 10);
            PQclear(res);
            res = NULL;
        }
    } else {
        /* the old user keeps its conversations; the chats go on in new ones of the account */
        const char *p7[] = {tg};
        rc = bg_pg_run(c,
                       "UPDATE telegram_chats SET conversation_id = NULL "
                       "WHERE telegram_user_id = $1::bigint",
                       1, p7);
    }
    if (rc != 0)
        goto err_rollback;
    bg_actor_t actor = {.kind = "system", .id = NULL, .request_id = NULL, .ip = NULL};
    char details[256];
    snprintf(details, sizeof(details),
             "{\"channel\":\"telegram\",\"telegram_user_id\":%s,\"previous_user_id\":\"%s\","
             "\"previous_retired\":%s,\"conversations_moved\":%" PRId64 "}",
             tg, out->old_user_id, out->retired ? "true" : "false", out->moved);
    rc = bg_acct_audit(c, &actor, "telegram.link", "user", out->user_id, details);
    if (rc != 0)
        goto err_rollback;
    out->outcome = BG_TG_LINK_DONE;
    return bg_pg_commit(c);

refused:
    PQclear(res);
    bg_pg_rollback(c);
    return 0;

err_rollback:
    PQclear(res);
    bg_pg_rollback(c);
    return rc;
}

int bg_tg_profile_get(PGconn *c, const char *user_id, bg_tg_profile_t *out)
{
    memset(out, 0, sizeof(*out));
    const char *p[] = {user_id};
    PGresult *res = NULL;
    int rc = bg_pg_exec(c,
                        "SELECT name, locale, email IS NOT NULL FROM users "
                        "WHERE id = $1::uuid AND deleted_at IS NULL",
                        1, p, &res);
    if (rc != 0)
        return rc;
    bool found = PQntuples(res) == 1;
    if (found) {
        bg_strlcpy(out->name, val(res, 0, 0), sizeof(out->name));
        bg_strlcpy(out->locale, val(res, 0, 1), sizeof(out->locale));
        out->has_web_login = strcmp(val(res, 0, 2), "t") == 0;
    }
    PQclear(res);
    return found ? 0 : BG_ERR_NOT_FOUND;
}
