/*
 * OpenAI-compatible wire formats (see openai.h and ../shared/PROTOCOLS.md §3).
 *
 * The request parser is strict where being lenient would mislead a client: a parameter we do not
 * know is refused as OpenAI refuses it, and one we know but cannot honour (tools, several choices,
 * images, JSON output) is refused as unsupported instead of being dropped, since a client relying
 * on it would otherwise get a different answer than it asked for without knowing. Sampling knobs
 * that only tune the provider (top_p, stop, penalties, seed, …) are accepted and not forwarded.
 *
 * Message contents come as a string or as an array of text parts; both become one string (parts
 * joined by a newline), so the worker forwards plain {"role","content"} messages.
 */
#include "openai.h"

#include <stdio.h>
#include <string.h>

#include "bg/err.h"
#include "bg/json.h"

/* ---- request ---- */

static int fail(edge_oai_error_t *err, int rc, const char *param, const char *reason)
{
    err->rc = rc;
    err->reason = reason;
    snprintf(err->param, sizeof(err->param), "%s", param != NULL ? param : "");
    return rc;
}

static int fail_range(edge_oai_error_t *err, const char *param, int64_t min, int64_t max)
{
    err->min = min;
    err->max = max;
    return fail(err, BG_ERR_INVALID, param, "out_of_range");
}

static bool is_null(const bg_json_t *v)
{
    return v == NULL || bg_json_type(v) == BG_JSON_NULL;
}

/* Parameters OpenAI documents; anything else is refused as unknown. */
static const char *const known_params[] = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "user",
    "n",
    "top_p",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "safety_identifier",
    "prompt_cache_key",
    "store",
    "metadata",
    "service_tier",
    "parallel_tool_calls",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "modalities",
    "audio",
    "prediction",
    "reasoning_effort",
    "verbosity",
    "web_search_options",
};

static bool is_known(const char *key)
{
    for (size_t i = 0; i < BG_ARRAY_SIZE(known_params); i++) {
        if (strcmp(key, known_params[i]) == 0)
            return true;
    }
    return false;
}

/* A choice parameter ("auto"/"none"/null) that is harmless without tools. */
static bool is_harmless_choice(const bg_json_t *v)
{
    if (is_null(v))
        return true;
    size_t len = 0;
    const char *s = bg_json_str(v, &len);
    return s != NULL && (strcmp(s, "none") == 0 || strcmp(s, "auto") == 0);
}

static bool is_empty_array(const bg_json_t *v)
{
    return is_null(v) || (bg_json_is_array(v) && bg_json_len(v) == 0);
}

/* Refuses, as unsupported, the parameters whose effect we cannot give. */
static int check_unsupported(const bg_json_t *root, edge_oai_error_t *err)
{
    const bg_json_t *v;
    if (!is_empty_array(bg_json_find(root, "tools")))
        return fail(err, BG_ERR_INVALID, "tools", "unsupported");
    if (!is_empty_array(bg_json_find(root, "functions")))
        return fail(err, BG_ERR_INVALID, "functions", "unsupported");
    if (!is_harmless_choice(bg_json_find(root, "tool_choice")))
        return fail(err, BG_ERR_INVALID, "tool_choice", "unsupported");
    if (!is_harmless_choice(bg_json_find(root, "function_call")))
        return fail(err, BG_ERR_INVALID, "function_call", "unsupported");
    v = bg_json_find(root, "n");
    if (!is_null(v)) {
        int64_t n = 0;
        if (!bg_json_int(v, &n))
            return fail(err, BG_ERR_INVALID, "n", "wrong_type");
        if (n != 1)
            return fail_range(err, "n", 1, 1);
    }
    v = bg_json_find(root, "logprobs");
    bool b = false;
    if (!is_null(v) && (!bg_json_bool(v, &b) || b))
        return fail(err, BG_ERR_INVALID, "logprobs", "unsupported");
    v = bg_json_find(root, "response_format");
    if (!is_null(v)) {
        const bg_json_t *t = bg_json_is_object(v) ? bg_json_find(v, "type") : NULL;
        size_t len = 0;
        const char *s = t != NULL ? bg_json_str(t, &len) : NULL;
        if (s == NULL || strcmp(s, "text") != 0)
            return fail(err, BG_ERR_INVALID, "response_format", "unsupported");
    }
    v = bg_json_find(root, "modalities");
    if (!is_null(v)) {
        size_t len = 0;
        const char *s =
            bg_json_is_array(v) && bg_json_len(v) == 1 ? bg_json_str(bg_json_at(v, 0), &len) : NULL;
        if (s == NULL || strcmp(s, "text") != 0)
            return fail(err, BG_ERR_INVALID, "modalities", "unsupported");
    }
    static const char *const absent[] = {"audio", "prediction", "web_search_options"};
    for (size_t i = 0; i < BG_ARRAY_SIZE(absent); i++) {
        if (!is_null(bg_json_find(root, absent[i])))
            return fail(err, BG_ERR_INVALID, absent[i], "unsupported");
    }
    return 0;
}

/* Writes a message's content (a string or text parts) as one JSON string. */
static int write_content(bg_json_writer_t *w, const bg_json_t *content, size_t index,
                         edge_oai_error_t *err)
{
    char param[EDGE_OAI_PARAM_SIZE];
    snprintf(param, sizeof(param), "messages[%zu].content", index);
    size_t len = 0;
    const char *s = bg_json_str(content, &len);
    if (s != NULL) {
        bg_json_write_key(w, "content");
        bg_json_write_strn(w, s, len);
        return 0;
    }
    if (!bg_json_is_array(content))
        return fail(err, BG_ERR_INVALID, param, "wrong_type");
    bg_buf_t text;
    bg_buf_init(&text, 4u * 1024u * 1024u);
    int rc = 0;
    for (size_t i = 0; i < bg_json_len(content) && rc == 0; i++) {
        const bg_json_t *part = bg_json_at(content, i);
        snprintf(param, sizeof(param), "messages[%zu].content[%zu]", index, i);
        const bg_json_t *type = bg_json_is_object(part) ? bg_json_find(part, "type") : NULL;
        size_t tlen = 0;
        const char *t = type != NULL ? bg_json_str(type, &tlen) : NULL;
        if (t == NULL) {
            rc = fail(err, BG_ERR_INVALID, param, "invalid_value");
            break;
        }
        if (strcmp(t, "text") != 0) {
            rc = fail(err, BG_ERR_INVALID, param, "unsupported");
            break;
        }
        size_t plen = 0;
        const bg_json_t *tv = bg_json_find(part, "text");
        const char *p = tv != NULL ? bg_json_str(tv, &plen) : NULL;
        if (p == NULL) {
            rc = fail(err, BG_ERR_INVALID, param, "missing");
            break;
        }
        if ((i > 0 && bg_buf_putc(&text, '\n') != 0) || bg_buf_append(&text, p, plen) != 0)
            rc = fail(err, BG_ERR_TOO_LARGE, param, "too_long");
    }
    if (rc == 0) {
        bg_json_write_key(w, "content");
        bg_json_write_strn(w, text.base != NULL ? text.base : "", text.len);
    }
    bg_buf_dispose(&text);
    return rc;
}

static int parse_messages(const bg_json_t *root, edge_oai_request_t *out, edge_oai_error_t *err)
{
    const bg_json_t *msgs = bg_json_find(root, "messages");
    if (is_null(msgs))
        return fail(err, BG_ERR_INVALID, "messages", "missing");
    if (!bg_json_is_array(msgs))
        return fail(err, BG_ERR_INVALID, "messages", "wrong_type");
    size_t n = bg_json_len(msgs);
    if (n == 0) {
        err->min = 1;
        return fail(err, BG_ERR_INVALID, "messages", "too_short");
    }
    if (n > EDGE_OAI_MESSAGES_MAX) {
        err->max = EDGE_OAI_MESSAGES_MAX;
        return fail(err, BG_ERR_INVALID, "messages", "too_long");
    }
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out->messages);
    bg_json_write_begin_array(&w);
    for (size_t i = 0; i < n; i++) {
        const bg_json_t *m = bg_json_at(msgs, i);
        char param[EDGE_OAI_PARAM_SIZE];
        snprintf(param, sizeof(param), "messages[%zu]", i);
        if (!bg_json_is_object(m))
            return fail(err, BG_ERR_INVALID, param, "wrong_type");
        snprintf(param, sizeof(param), "messages[%zu].role", i);
        const bg_json_t *rv = bg_json_find(m, "role");
        size_t rlen = 0;
        const char *role = rv != NULL ? bg_json_str(rv, &rlen) : NULL;
        if (rv == NULL)
            return fail(err, BG_ERR_INVALID, param, "missing");
        if (role == NULL)
            return fail(err, BG_ERR_INVALID, param, "wrong_type");
        bool assistant = strcmp(role, "assistant") == 0;
        if (strcmp(role, "tool") == 0 || strcmp(role, "function") == 0)
            return fail(err, BG_ERR_INVALID, param, "unsupported");
        if (!assistant && strcmp(role, "user") != 0 && strcmp(role, "system") != 0 &&
            strcmp(role, "developer") != 0)
            return fail(err, BG_ERR_INVALID, param, "invalid_value");
        if (!is_empty_array(bg_json_find(m, "tool_calls")) ||
            !is_null(bg_json_find(m, "function_call"))) {
            snprintf(param, sizeof(param), "messages[%zu].tool_calls", i);
            return fail(err, BG_ERR_INVALID, param, "unsupported");
        }
        const bg_json_t *content = bg_json_find(m, "content");
        bg_json_write_begin_object(&w);
        bg_json_write_field_str(&w, "role", role);
        if (is_null(content)) {
            snprintf(param, sizeof(param), "messages[%zu].content", i);
            if (!assistant)
                return fail(err, BG_ERR_INVALID, param, "missing");
            bg_json_write_field_str(&w, "content", "");
        } else {
            int rc = write_content(&w, content, i, err);
            if (rc != 0)
                return rc;
        }
        bg_json_write_end_object(&w);
    }
    bg_json_write_end_array(&w);
    if (bg_json_write_finish(&w) != 0)
        return fail(err, BG_ERR_TOO_LARGE, "messages", "too_long");
    out->nmessages = n;
    return 0;
}

/* An optional positive integer parameter within [1, EDGE_OAI_MAX_TOKENS]; 0 when absent. */
static int parse_tokens(const bg_json_t *root, const char *name, int64_t *out,
                        edge_oai_error_t *err)
{
    const bg_json_t *v = bg_json_find(root, name);
    *out = 0;
    if (is_null(v))
        return 0;
    int64_t n = 0;
    if (!bg_json_int(v, &n))
        return fail(err, BG_ERR_INVALID, name, "wrong_type");
    if (n < 1 || n > EDGE_OAI_MAX_TOKENS)
        return fail_range(err, name, 1, EDGE_OAI_MAX_TOKENS);
    *out = n;
    return 0;
}

static int parse_stream(const bg_json_t *root, edge_oai_request_t *out, edge_oai_error_t *err)
{
    const bg_json_t *v = bg_json_find(root, "stream");
    if (!is_null(v) && !bg_json_bool(v, &out->stream))
        return fail(err, BG_ERR_INVALID, "stream", "wrong_type");
    const bg_json_t *opts = bg_json_find(root, "stream_options");
    if (is_null(opts))
        return 0;
    if (!out->stream) /* as OpenAI: only allowed when streaming */
        return fail(err, BG_ERR_INVALID, "stream_options", "invalid_value");
    if (!bg_json_is_object(opts))
        return fail(err, BG_ERR_INVALID, "stream_options", "wrong_type");
    for (size_t i = 0; i < bg_json_len(opts); i++) {
        const char *key = NULL;
        const bg_json_t *o = bg_json_member(opts, i, &key);
        char param[EDGE_OAI_PARAM_SIZE];
        snprintf(param, sizeof(param), "stream_options.%.40s", key);
        bool b = false;
        if (strcmp(key, "include_usage") == 0) {
            if (!is_null(o) && !bg_json_bool(o, &out->include_usage))
                return fail(err, BG_ERR_INVALID, param, "wrong_type");
        } else if (strcmp(key, "include_obfuscation") == 0) {
            if (!is_null(o) && !bg_json_bool(o, &b))
                return fail(err, BG_ERR_INVALID, param, "wrong_type");
        } else {
            return fail(err, BG_ERR_INVALID, param, "unknown_field");
        }
    }
    return 0;
}

static int parse_root(const bg_json_t *root, edge_oai_request_t *out, edge_oai_error_t *err)
{
    if (!bg_json_is_object(root))
        return fail(err, BG_ERR_INVALID, "", "wrong_type");
    for (size_t i = 0; i < bg_json_len(root); i++) {
        const char *key = NULL;
        (void)bg_json_member(root, i, &key);
        if (!is_known(key))
            return fail(err, BG_ERR_INVALID, key, "unknown_field");
    }
    const bg_json_t *v = bg_json_find(root, "model");
    size_t len = 0;
    const char *model = v != NULL ? bg_json_str(v, &len) : NULL;
    if (is_null(v))
        return fail(err, BG_ERR_INVALID, "model", "missing");
    if (model == NULL)
        return fail(err, BG_ERR_INVALID, "model", "wrong_type");
    if (len == 0 || len >= sizeof(out->model)) {
        err->max = (int64_t)sizeof(out->model) - 1;
        return fail(err, BG_ERR_INVALID, "model", len == 0 ? "missing" : "too_long");
    }
    memcpy(out->model, model, len + 1);

    int rc = check_unsupported(root, err);
    if (rc == 0)
        rc = parse_messages(root, out, err);
    if (rc == 0)
        rc = parse_stream(root, out, err);
    int64_t legacy = 0, current = 0;
    if (rc == 0)
        rc = parse_tokens(root, "max_tokens", &legacy, err);
    if (rc == 0)
        rc = parse_tokens(root, "max_completion_tokens", &current, err);
    if (rc != 0)
        return rc;
    out->max_tokens = current > 0 ? current : legacy;

    out->temperature = -1;
    v = bg_json_find(root, "temperature");
    if (!is_null(v)) {
        double t = 0;
        if (!bg_json_double(v, &t))
            return fail(err, BG_ERR_INVALID, "temperature", "wrong_type");
        if (!(t >= 0 && t <= 2))
            return fail_range(err, "temperature", 0, 2);
        out->temperature = t;
    }
    v = bg_json_find(root, "user");
    if (!is_null(v)) {
        const char *user = bg_json_str(v, &len);
        if (user == NULL)
            return fail(err, BG_ERR_INVALID, "user", "wrong_type");
        if (len >= sizeof(out->user)) {
            err->max = (int64_t)sizeof(out->user) - 1;
            return fail(err, BG_ERR_INVALID, "user", "too_long");
        }
        memcpy(out->user, user, len + 1);
    }
    return 0;
}

int edge_oai_parse_request(const char *body, size_t len, edge_oai_request_t *out,
                           edge_oai_error_t *err)
{
    memset(out, 0, sizeof(*out));
    memset(err, 0, sizeof(*err));
    bg_buf_init(&out->messages, len + 4096);
    bg_json_doc_t *doc = NULL;
    const char *desc = NULL;
    size_t off = 0;
    int rc = bg_json_parse(body != NULL ? body : "", len, NULL, &doc, &desc, &off);
    if (rc != 0) {
        rc = fail(err, rc == BG_ERR_TOO_LARGE ? BG_ERR_TOO_LARGE : BG_ERR_INVALID, "",
                  "malformed_json");
    } else {
        rc = parse_root(bg_json_root(doc), out, err);
    }
    bg_json_doc_free(doc);
    if (rc != 0)
        edge_oai_request_dispose(out);
    return rc;
}

void edge_oai_request_dispose(edge_oai_request_t *r)
{
    bg_buf_dispose(&r->messages);
    r->nmessages = 0;
}

/* ---- errors ---- */

static const struct {
    const char *ours;
    edge_oai_error_map_t map;
} error_map[] = {
    {"malformed_json", {400, "invalid_request_error", NULL, true}},
    {"bad_request", {400, "invalid_request_error", NULL, true}},
    {"validation_failed", {400, "invalid_request_error", "invalid_value", true}},
    {"invalid_request", {400, "invalid_request_error", NULL, true}},
    {"unauthorized", {401, "invalid_request_error", "invalid_api_key", true}},
    {"invalid_api_key", {401, "invalid_request_error", "invalid_api_key", true}},
    {"account_disabled", {403, "permission_error", "account_disabled", true}},
    {"forbidden", {403, "permission_error", "model_not_allowed", true}},
    {"origin_not_allowed", {403, "permission_error", NULL, true}},
    {"feature_not_in_plan", {403, "permission_error", "feature_not_in_plan", true}},
    {"model_not_allowed", {403, "permission_error", "model_not_allowed", true}},
    {"not_found", {404, "invalid_request_error", "not_found", true}},
    {"model_not_found", {404, "invalid_request_error", "model_not_found", true}},
    {"method_not_allowed", {405, "invalid_request_error", NULL, true}},
    {"payload_too_large", {413, "invalid_request_error", NULL, true}},
    {"unsupported_media_type", {415, "invalid_request_error", NULL, true}},
    {"payment_required", {402, "insufficient_quota", "insufficient_quota", true}},
    {"quota_exceeded", {429, "insufficient_quota", "insufficient_quota", true}},
    {"rate_limited", {429, "requests", "rate_limit_exceeded", false}},
    {"provider_error", {502, "server_error", "provider_error", false}},
    {"provider_timeout", {504, "server_error", "provider_timeout", false}},
    {"service_unavailable", {503, "server_error", "service_unavailable", false}},
    {"shutting_down", {503, "server_error", "service_unavailable", false}},
    {"timeout", {504, "server_error", "timeout", false}},
    {"internal", {500, "server_error", NULL, false}},
};

edge_oai_error_map_t edge_oai_map_error(const char *code)
{
    size_t internal = 0;
    for (size_t i = 0; i < BG_ARRAY_SIZE(error_map); i++) {
        if (code != NULL && strcmp(code, error_map[i].ours) == 0)
            return error_map[i].map;
        if (strcmp(error_map[i].ours, "internal") == 0)
            internal = i;
    }
    return error_map[internal].map;
}

static int put_str_or_null(bg_buf_t *out, const char *s)
{
    if (s == NULL)
        return bg_buf_puts(out, "null");
    return bg_buf_json_str(out, s, strlen(s));
}

int edge_oai_write_error(bg_buf_t *out, const char *message, const char *type, const char *param,
                         const char *code)
{
    int r = bg_buf_puts(out, "{\"error\":{\"message\":");
    r |= put_str_or_null(out, message != NULL ? message : "");
    r |= bg_buf_puts(out, ",\"type\":");
    r |= put_str_or_null(out, type);
    r |= bg_buf_puts(out, ",\"param\":");
    r |= put_str_or_null(out, param != NULL && param[0] != '\0' ? param : NULL);
    r |= bg_buf_puts(out, ",\"code\":");
    r |= put_str_or_null(out, code);
    r |= bg_buf_puts(out, "}}");
    return r != 0 ? BG_ERR_TOO_LARGE : 0;
}

/* ---- completions ---- */

void edge_oai_reply_init(edge_oai_reply_t *r, const char *job_id, const char *model,
                         int64_t created)
{
    memset(r, 0, sizeof(*r));
    size_t n = (size_t)snprintf(r->id, sizeof(r->id), "chatcmpl-");
    for (const char *p = job_id; *p != '\0' && n + 1 < sizeof(r->id); p++) {
        if (*p != '-')
            r->id[n++] = *p;
    }
    r->id[n] = '\0';
    r->created = created;
    snprintf(r->model, sizeof(r->model), "%s", model);
}

static int put_head(bg_buf_t *out, const edge_oai_reply_t *r, const char *object)
{
    int rc =
        bg_buf_printf(out, "{\"id\":\"%s\",\"object\":\"%s\",\"created\":%lld,\"model\":", r->id,
                      object, (long long)r->created);
    rc |= bg_buf_json_str(out, r->model, strlen(r->model));
    return rc;
}

static int put_usage(bg_buf_t *out, int64_t prompt_tokens, int64_t completion_tokens)
{
    return bg_buf_printf(out,
                         "\"usage\":{\"prompt_tokens\":%lld,\"completion_tokens\":%lld,"
                         "\"total_tokens\":%lld}",
                         (long long)prompt_tokens, (long long)completion_tokens,
                         (long long)prompt_tokens + (long long)completion_tokens);
}

int edge_oai_write_chunk(bg_buf_t *out, const edge_oai_reply_t *r, bool first, const char *content,
                         size_t len, const char *finish_reason)
{
    size_t mark = out->len;
    int rc = bg_buf_puts(out, "data: ");
    rc |= put_head(out, r, "chat.completion.chunk");
    rc |= bg_buf_puts(out, ",\"choices\":[{\"index\":0,\"delta\":{");
    if (first)
        rc |= bg_buf_puts(out, "\"role\":\"assistant\"");
    if (finish_reason == NULL && (len > 0 || first)) {
        rc |= bg_buf_puts(out, first ? ",\"content\":" : "\"content\":");
        rc |= bg_buf_json_str(out, content != NULL ? content : "", len);
    }
    rc |= bg_buf_puts(out, "},\"logprobs\":null,\"finish_reason\":");
    rc |= put_str_or_null(out, finish_reason);
    rc |= bg_buf_puts(out, "}]}\n\n");
    if (rc != 0) {
        out->len = mark; /* never half an event */
        return BG_ERR_TOO_LARGE;
    }
    return 0;
}

int edge_oai_write_usage_chunk(bg_buf_t *out, const edge_oai_reply_t *r, int64_t prompt_tokens,
                               int64_t completion_tokens)
{
    size_t mark = out->len;
    int rc = bg_buf_puts(out, "data: ");
    rc |= put_head(out, r, "chat.completion.chunk");
    rc |= bg_buf_puts(out, ",\"choices\":[],");
    rc |= put_usage(out, prompt_tokens, completion_tokens);
    rc |= bg_buf_puts(out, "}\n\n");
    if (rc != 0) {
        out->len = mark;
        return BG_ERR_TOO_LARGE;
    }
    return 0;
}

int edge_oai_write_completion(bg_buf_t *out, const edge_oai_reply_t *r, const char *content,
                              size_t len, const char *finish_reason, int64_t prompt_tokens,
                              int64_t completion_tokens)
{
    int rc = put_head(out, r, "chat.completion");
    rc |= bg_buf_puts(out, ",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
                           "\"content\":");
    rc |= bg_buf_json_str(out, content != NULL ? content : "", len);
    rc |= bg_buf_puts(out, ",\"refusal\":null},\"logprobs\":null,\"finish_reason\":");
    rc |= put_str_or_null(out, finish_reason);
    rc |= bg_buf_puts(out, "}],");
    rc |= put_usage(out, prompt_tokens, completion_tokens);
    rc |= bg_buf_puts(out, "}");
    return rc != 0 ? BG_ERR_TOO_LARGE : 0;
}

const char *edge_oai_finish_reason(const char *ours)
{
    return ours != NULL && strcmp(ours, "length") == 0 ? "length" : "stop";
}
