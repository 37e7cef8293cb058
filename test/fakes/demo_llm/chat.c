/*
 * The Chat Completions request as OpenAI validates it, and the deterministic reply.
 *
 * Validation follows the live API closely enough that a client which passes here passes there:
 * unknown top-level fields are refused ("Unrecognized request argument supplied"), every field has
 * its type checked, and the messages are checked one by one, with the error's `param` naming the
 * exact place ("messages[1].content"). Schema errors (400) come before the model lookup (404), as
 * they do upstream.
 *
 * The reply is a function of the request alone: "Echo: <first 200 characters of the last user
 * message, whitespace collapsed>. " followed by a fixed paragraph, cut to max_tokens tokens. Usage
 * counts words: prompt_tokens is the number of words in every message (85 per image, OpenAI's
 * low-detail price), completion_tokens the number of tokens in the reply, so a test can predict
 * both.
 *
 * Failure directives live in the last user message only, so a conversation whose history holds an
 * old "#fail:500" does not fail again. So does "#echo:messages", which echoes every message
 * received ("<role>: <text>", joined by " | ", up to TRANSCRIPT_CHARS characters) instead of the
 * last user message: a client's tests can see what the provider was sent, in order.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/buf.h"
#include "bg/err.h"
#include "bg/json.h"
#include "demo_llm.h"

/* Characters of the last user message echoed back. */
#define ECHO_CHARS 200
/* Characters of the transcript "#echo:messages" echoes back. */
#define TRANSCRIPT_CHARS 4000
/* Tokens an image part costs in the prompt. */
#define IMAGE_TOKENS 85
/* Bound of the text gathered from the last user message (the body itself is bounded by h2o). */
#define USER_TEXT_MAX (2 * 1024 * 1024)

static const char LOREM[] =
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut "
    "labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco "
    "laboris nisi ut aliquip ex ea commodo consequat. Duis aute irure dolor in reprehenderit in "
    "voluptate velit esse cillum dolore eu fugiat nulla pariatur. Excepteur sint occaecat "
    "cupidatat "
    "non proident, sunt in culpa qui officia deserunt mollit anim id est laborum.";

static const demo_model_t models[] = {
    {"demo-1", false},
    {"demo-vision-1", true},
};

const demo_model_t *demo_models(size_t *count)
{
    *count = BG_ARRAY_SIZE(models);
    return models;
}

const demo_model_t *demo_model_find(const char *id, size_t len)
{
    for (size_t i = 0; i < BG_ARRAY_SIZE(models); i++) {
        if (strlen(models[i].id) == len && memcmp(models[i].id, id, len) == 0)
            return &models[i];
    }
    return NULL;
}

/* Fills *e and returns -1, so a validation step can `return fail(…)`. */
static int fail(demo_error_t *e, int status, const char *param, const char *code, const char *fmt,
                ...) BG_PRINTF(5, 6);
static int fail(demo_error_t *e, int status, const char *param, const char *code, const char *fmt,
                ...)
{
    va_list ap;
    e->status = status;
    e->type = "invalid_request_error";
    e->code = code;
    bg_strlcpy(e->param, param != NULL ? param : "", sizeof(e->param));
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof(e->message), fmt, ap);
    va_end(ap);
    return -1;
}

/* "a string", "an object", …: the way OpenAI's messages name the type it got. */
static const char *got(const bg_json_t *v)
{
    switch (bg_json_type(v)) {
    case BG_JSON_NULL:
        return "null";
    case BG_JSON_BOOL:
        return "a boolean";
    case BG_JSON_NUMBER:
        return "a number";
    case BG_JSON_STRING:
        return "a string";
    case BG_JSON_ARRAY:
        return "an array";
    case BG_JSON_OBJECT:
        return "an object";
    }
    return "a value";
}

static int invalid_type(demo_error_t *e, const char *param, const char *expected,
                        const bg_json_t *v)
{
    return fail(e, 400, param, "invalid_type",
                "Invalid type for '%s': expected %s, but got %s instead.", param, expected, got(v));
}

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

/* Whitespace-separated words in s[0..len). */
static int64_t count_words(const char *s, size_t len)
{
    int64_t n = 0;
    bool in_word = false;
    for (size_t i = 0; i < len; i++) {
        bool sp = is_space(s[i]);
        if (!sp && !in_word)
            n++;
        in_word = !sp;
    }
    return n;
}

/* An optional integer field of at least min; *out untouched when absent. */
static int opt_int(const bg_json_t *root, const char *key, int64_t min, int64_t *out,
                   demo_error_t *e)
{
    const bg_json_t *v = bg_json_find(root, key);
    if (v == NULL || bg_json_type(v) == BG_JSON_NULL)
        return 0;
    int64_t n;
    if (!bg_json_int(v, &n))
        return invalid_type(e, key, "an integer", v);
    if (n < min)
        return fail(e, 400, key, "integer_below_min_value",
                    "Invalid '%s': integer below minimum value. Expected a value >= %lld, but got "
                    "%lld instead.",
                    key, (long long)min, (long long)n);
    *out = n;
    return 0;
}

/* An optional number field within [min, max]. */
static int opt_number(const bg_json_t *root, const char *key, double min, double max,
                      demo_error_t *e)
{
    const bg_json_t *v = bg_json_find(root, key);
    if (v == NULL || bg_json_type(v) == BG_JSON_NULL)
        return 0;
    double d;
    if (!bg_json_double(v, &d))
        return invalid_type(e, key, "a decimal", v);
    if (d < min)
        return fail(e, 400, key, "decimal_below_min_value",
                    "Invalid '%s': decimal below minimum value. Expected a value >= %g, but got %g "
                    "instead.",
                    key, min, d);
    if (d > max)
        return fail(e, 400, key, "decimal_above_max_value",
                    "Invalid '%s': decimal above maximum value. Expected a value <= %g, but got %g "
                    "instead.",
                    key, max, d);
    return 0;
}

/*
 * Checks one message's content and counts its prompt tokens into *tokens. When text is not NULL the
 * message's text (parts joined by a space) is appended to it, for the last user message.
 */
static int check_content(const bg_json_t *content, size_t i, const demo_model_t *model,
                         int64_t *tokens, bg_buf_t *text, demo_error_t *e)
{
    char param[96];
    snprintf(param, sizeof(param), "messages[%zu].content", i);
    if (bg_json_type(content) == BG_JSON_STRING) {
        size_t len;
        const char *s = bg_json_str(content, &len);
        *tokens += count_words(s, len);
        if (text != NULL && bg_buf_append(text, s, len) != 0)
            return fail(e, 413, param, NULL, "The message is too long for the demo provider.");
        return 0;
    }
    if (bg_json_type(content) != BG_JSON_ARRAY)
        return invalid_type(e, param, "one of a string or array of objects", content);
    if (bg_json_len(content) == 0)
        return fail(e, 400, param, "empty_array",
                    "Invalid '%s': empty array. Expected an array with minimum length 1, but got "
                    "an empty array instead.",
                    param);
    for (size_t k = 0; k < bg_json_len(content); k++) {
        const bg_json_t *part = bg_json_at(content, k);
        char pparam[128];
        snprintf(pparam, sizeof(pparam), "%s[%zu]", param, k);
        if (!bg_json_is_object(part))
            return invalid_type(e, pparam, "an object", part);
        const char *type;
        if (bg_json_get_str(part, "type", &type) != 0)
            return fail(e, 400, pparam, "missing_required_parameter",
                        "Missing required parameter: '%s.type'.", pparam);
        if (strcmp(type, "text") == 0) {
            const char *s;
            size_t len;
            if (bg_json_get_strn(part, "text", &s, &len) != 0)
                return fail(e, 400, pparam, "missing_required_parameter",
                            "Missing required parameter: '%s.text'.", pparam);
            *tokens += count_words(s, len);
            if (text != NULL && ((text->len > 0 && bg_buf_putc(text, ' ') != 0) ||
                                 bg_buf_append(text, s, len) != 0))
                return fail(e, 413, pparam, NULL, "The message is too long for the demo provider.");
        } else if (strcmp(type, "image_url") == 0) {
            const bg_json_t *img;
            const char *url;
            if (bg_json_get_object(part, "image_url", &img) != 0 ||
                bg_json_get_str(img, "url", &url) != 0)
                return fail(e, 400, pparam, "missing_required_parameter",
                            "Missing required parameter: '%s.image_url.url'.", pparam);
            if (!model->vision)
                return fail(e, 400, pparam, "invalid_value",
                            "Invalid content type. image_url is only supported by certain models.");
            *tokens += IMAGE_TOKENS;
        } else {
            return fail(e, 400, pparam, "invalid_value",
                        "Invalid value: '%.64s'. Supported values are: 'text' and 'image_url'.",
                        type);
        }
    }
    return 0;
}

/* Appends "<role>: <text>" of one message to the transcript (" | " before all but the first). */
static void append_transcript(bg_buf_t *tr, const char *role, const bg_json_t *content)
{
    int r = tr->len > 0 ? bg_buf_puts(tr, " | ") : 0;
    r |= bg_buf_puts(tr, role);
    r |= bg_buf_puts(tr, ": ");
    size_t len;
    const char *s = bg_json_str(content, &len);
    if (s != NULL) {
        r |= bg_buf_append(tr, s, len);
    } else {
        for (size_t k = 0; k < bg_json_len(content); k++) {
            const char *text;
            if (bg_json_get_strn(bg_json_at(content, k), "text", &text, &len) == 0)
                r |= (k > 0 ? bg_buf_putc(tr, ' ') : 0) | bg_buf_append(tr, text, len);
        }
    }
    (void)r; /* past its cap the transcript is only shorter */
}

static int check_messages(const bg_json_t *messages, const demo_model_t *model, int64_t *tokens,
                          bg_buf_t *last_user, bg_buf_t *transcript, demo_error_t *e)
{
    static const char *const roles[] = {"system",    "developer", "user",
                                        "assistant", "tool",      "function"};
    static const char *const fields[] = {"role",       "content",      "name",
                                         "tool_calls", "tool_call_id", "function_call",
                                         "refusal",    "audio",        NULL};
    size_t n = bg_json_len(messages);
    if (n == 0)
        return fail(e, 400, "messages", "empty_array",
                    "Invalid 'messages': empty array. Expected an array with minimum length 1, but "
                    "got an empty array instead.");
    size_t last = SIZE_MAX;
    for (size_t i = 0; i < n; i++) {
        const bg_json_t *m = bg_json_at(messages, i);
        char param[96];
        snprintf(param, sizeof(param), "messages[%zu]", i);
        if (!bg_json_is_object(m))
            return invalid_type(e, param, "an object", m);
        const char *unknown;
        if (bg_json_check_fields(m, fields, &unknown) != 0)
            return fail(e, 400, param, NULL,
                        "Additional properties are not allowed ('%.64s' was unexpected) - '%s'",
                        unknown, param);
        const bg_json_t *role = bg_json_find(m, "role");
        snprintf(param, sizeof(param), "messages[%zu].role", i);
        if (role == NULL)
            return fail(e, 400, param, "missing_required_parameter",
                        "Missing required parameter: '%s'.", param);
        const char *r = bg_json_str(role, NULL);
        if (r == NULL)
            return invalid_type(e, param, "a string", role);
        bool known = false;
        for (size_t k = 0; k < BG_ARRAY_SIZE(roles); k++)
            known = known || strcmp(r, roles[k]) == 0;
        if (!known)
            return fail(e, 400, param, "invalid_value",
                        "Invalid value: '%.64s'. Supported values are: 'system', 'assistant', "
                        "'user', 'function', 'tool', and 'developer'.",
                        r);
        if (strcmp(r, "user") == 0)
            last = i;
    }
    for (size_t i = 0; i < n; i++) {
        const bg_json_t *m = bg_json_at(messages, i);
        const bg_json_t *content = bg_json_find(m, "content");
        const char *r = bg_json_str(bg_json_find(m, "role"), NULL);
        if (content == NULL || bg_json_type(content) == BG_JSON_NULL) {
            /* An assistant turn that only called tools has no content. */
            if (strcmp(r, "assistant") == 0)
                continue;
            char param[96];
            snprintf(param, sizeof(param), "messages[%zu].content", i);
            return fail(e, 400, param, "missing_required_parameter",
                        "Missing required parameter: '%s'.", param);
        }
        if (check_content(content, i, model, tokens, i == last ? last_user : NULL, e) != 0)
            return -1;
        append_transcript(transcript, r, content);
    }
    return 0;
}

/* Reads an unsigned count after "name=" in a directive; -1 when it is not one. */
static int64_t directive_num(const char *v, int64_t max)
{
    if (*v < '0' || *v > '9')
        return -1;
    char *end;
    errno = 0;
    long long n = strtoll(v, &end, 10);
    if (errno != 0 || *end != '\0' || n > max)
        return -1;
    return n;
}

/* Applies one directive word (what follows "#fail:"); returns false when it is not one. */
static bool apply_directive(const char *d, demo_fail_t *f)
{
    const int64_t max = 1000000;
    int64_t n;
    if (strcmp(d, "hang") == 0) {
        f->hang = true;
    } else if (strcmp(d, "linger") == 0) {
        f->linger = true;
    } else if (strncmp(d, "cut=", 4) == 0 && (n = directive_num(d + 4, max)) >= 0) {
        f->cut_after = n;
    } else if (strncmp(d, "malformed=", 10) == 0 && (n = directive_num(d + 10, max)) >= 0) {
        f->malformed_after = n;
    } else if (strncmp(d, "stall=", 6) == 0 && (n = directive_num(d + 6, max)) >= 0) {
        f->stall_after = n;
    } else if (strncmp(d, "error=", 6) == 0 && (n = directive_num(d + 6, max)) >= 0) {
        f->error_after = n;
    } else if (strncmp(d, "slow=", 5) == 0 && (n = directive_num(d + 5, 60000)) >= 0) {
        f->slow_ms = n;
    } else if ((n = directive_num(d, 599)) >= 400) {
        f->status = (int)n;
    } else {
        return false;
    }
    return true;
}

static int parse_directives(const char *text, size_t len, demo_fail_t *f, demo_error_t *e)
{
    static const char tag[] = "#fail:";
    const char *p = text;
    const char *end = text + len;
    while ((p = memmem(p, (size_t)(end - p), tag, sizeof(tag) - 1)) != NULL) {
        p += sizeof(tag) - 1;
        char word[32] = {0};
        size_t n = 0;
        while (p < end && n + 1 < sizeof(word) &&
               ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                *p == '=')) {
            word[n++] = *p++;
        }
        word[n] = '\0';
        if (!apply_directive(word, f))
            return fail(
                e, 400, "messages", "invalid_value",
                "Unknown demo directive \"#fail:%s\": expected 429, 500 (any status from "
                "400 to 599), hang, cut=N, malformed=N, stall=N, error=N, slow=MS or linger.",
                word);
    }
    return 0;
}

/*
 * Appends the first max_chars characters of s (valid UTF-8), whitespace runs collapsed to one
 * space, trimmed. Never cuts a character in two.
 */
static int append_snippet(bg_buf_t *out, const char *s, size_t len, size_t max_chars)
{
    size_t chars = 0;
    bool space = false;
    size_t start = out->len;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if ((c & 0xC0) == 0x80) {
            /* a continuation byte of the character just appended */
            if (bg_buf_putc(out, s[i]) != 0)
                return -1;
            continue;
        }
        if (chars == max_chars)
            break;
        if (is_space(s[i])) {
            space = out->len > start;
            continue;
        }
        if (space) {
            if (chars + 2 > max_chars)
                break; /* a space with nothing after it */
            if (bg_buf_putc(out, ' ') != 0)
                return -1;
            chars++;
            space = false;
        }
        if (bg_buf_putc(out, s[i]) != 0)
            return -1;
        chars++;
    }
    return 0;
}

static int build_reply(demo_chat_t *chat, const bg_buf_t *user, size_t max_chars, demo_error_t *e)
{
    bg_buf_t t;
    bg_buf_init(&t, USER_TEXT_MAX);
    int r = 0;
    if (user->base != NULL && user->len > 0) {
        r |= bg_buf_puts(&t, "Echo: ");
        size_t before = t.len;
        r |= append_snippet(&t, user->base, user->len, max_chars);
        if (t.len == before) {
            bg_buf_reset(&t); /* only whitespace: nothing to echo */
        } else {
            char lastc = t.base[t.len - 1];
            r |= bg_buf_puts(&t, lastc == '.' || lastc == '!' || lastc == '?' ? " " : ". ");
        }
    }
    r |= bg_buf_puts(&t, LOREM);
    if (r != 0) {
        bg_buf_dispose(&t);
        return fail(e, 413, "messages", NULL, "The message is too long for the demo provider.");
    }

    /* Every token is a word plus the whitespace after it (one space; the last has none). */
    size_t n = (size_t)count_words(t.base, t.len);
    chat->token_end = bg_calloc(n > 0 ? n : 1, sizeof(size_t));
    size_t k = 0;
    for (size_t i = 0; i < t.len && k < n; i++) {
        if (!is_space(t.base[i]) && (i + 1 == t.len || is_space(t.base[i + 1]))) {
            size_t j = i + 1;
            while (j < t.len && is_space(t.base[j]))
                j++;
            chat->token_end[k++] = j;
        }
    }
    chat->ntokens = k;
    chat->finish_reason = "stop";
    if (chat->max_tokens > 0 && (size_t)chat->max_tokens < chat->ntokens) {
        chat->ntokens = (size_t)chat->max_tokens;
        chat->finish_reason = "length";
    }
    size_t len = chat->ntokens > 0 ? chat->token_end[chat->ntokens - 1] : 0;
    chat->text = bg_strndup(t.base, len);
    chat->text_len = len;
    bg_buf_dispose(&t);
    return 0;
}

int demo_chat_parse(const char *body, size_t len, demo_chat_t *chat, demo_error_t *e)
{
    static const char *const fields[] = {"model",
                                         "messages",
                                         "stream",
                                         "stream_options",
                                         "max_tokens",
                                         "max_completion_tokens",
                                         "temperature",
                                         "top_p",
                                         "n",
                                         "stop",
                                         "presence_penalty",
                                         "frequency_penalty",
                                         "seed",
                                         "tools",
                                         "tool_choice",
                                         "response_format",
                                         "user",
                                         "safety_identifier",
                                         "prompt_cache_key",
                                         "logprobs",
                                         "top_logprobs",
                                         "logit_bias",
                                         "parallel_tool_calls",
                                         "metadata",
                                         "store",
                                         "service_tier",
                                         "reasoning_effort",
                                         "modalities",
                                         "audio",
                                         "prediction",
                                         "verbosity",
                                         "web_search_options",
                                         "functions",
                                         "function_call",
                                         NULL};
    bg_json_doc_t *doc = NULL;
    bg_buf_t user, transcript;
    const char *desc = NULL;
    int r;

    memset(chat, 0, sizeof(*chat));
    chat->fail = (demo_fail_t){0, false, -1, -1, -1, -1, -1};
    bg_buf_init(&user, USER_TEXT_MAX);
    bg_buf_init(&transcript, USER_TEXT_MAX);
    r = bg_json_parse(body, len, NULL, &doc, &desc, NULL);
    if (r == BG_ERR_TOO_LARGE) {
        fail(e, 413, NULL, NULL, "The request body is too large for the demo provider (%s).", desc);
        goto err;
    }
    if (r != 0) {
        fail(e, 400, NULL, NULL,
             "We could not parse the JSON body of your request (%s). The OpenAI API expects a JSON "
             "payload.",
             desc);
        goto err;
    }
    const bg_json_t *root = bg_json_root(doc);
    if (!bg_json_is_object(root)) {
        fail(e, 400, NULL, "invalid_type", "Invalid body: expected an object, but got %s instead.",
             got(root));
        goto err;
    }
    const char *unknown;
    if (bg_json_check_fields(root, fields, &unknown) != 0) {
        fail(e, 400, NULL, NULL, "Unrecognized request argument supplied: %.64s", unknown);
        goto err;
    }

    const bg_json_t *model = bg_json_find(root, "model");
    if (model == NULL || bg_json_type(model) == BG_JSON_NULL) {
        fail(e, 400, NULL, NULL, "you must provide a model parameter");
        goto err;
    }
    size_t model_len;
    const char *model_id = bg_json_str(model, &model_len);
    if (model_id == NULL) {
        invalid_type(e, "model", "a string", model);
        goto err;
    }
    const demo_model_t *m = demo_model_find(model_id, model_len);
    /* The lookup comes after the schema checks, but content checks need the model's abilities. */
    static const demo_model_t no_model = {"", false};

    const bg_json_t *messages = bg_json_find(root, "messages");
    if (messages == NULL || bg_json_type(messages) == BG_JSON_NULL) {
        fail(e, 400, "messages", "missing_required_parameter",
             "Missing required parameter: 'messages'.");
        goto err;
    }
    if (!bg_json_is_array(messages)) {
        invalid_type(e, "messages", "an array", messages);
        goto err;
    }
    if (check_messages(messages, m != NULL ? m : &no_model, &chat->prompt_tokens, &user,
                       &transcript, e) != 0)
        goto err;

    bool stream = false;
    r = bg_json_get_bool(root, "stream", &stream);
    if (r == BG_ERR_INVALID) {
        invalid_type(e, "stream", "a boolean", bg_json_find(root, "stream"));
        goto err;
    }
    chat->stream = stream;
    const bg_json_t *so = bg_json_find(root, "stream_options");
    if (so != NULL && bg_json_type(so) != BG_JSON_NULL) {
        if (!stream) {
            fail(e, 400, "stream_options", "invalid_value",
                 "The 'stream_options' parameter is only allowed when 'stream' is enabled.");
            goto err;
        }
        if (!bg_json_is_object(so)) {
            invalid_type(e, "stream_options", "an object", so);
            goto err;
        }
        bool inc = false;
        if (bg_json_get_bool(so, "include_usage", &inc) == BG_ERR_INVALID) {
            invalid_type(e, "stream_options.include_usage", "a boolean",
                         bg_json_find(so, "include_usage"));
            goto err;
        }
        chat->include_usage = inc;
    }

    int64_t max_tokens = 0, max_completion = 0, n = 1;
    if (opt_int(root, "max_tokens", 1, &max_tokens, e) != 0 ||
        opt_int(root, "max_completion_tokens", 1, &max_completion, e) != 0 ||
        opt_int(root, "n", 1, &n, e) != 0 || opt_number(root, "temperature", 0, 2, e) != 0 ||
        opt_number(root, "top_p", 0, 1, e) != 0 ||
        opt_number(root, "presence_penalty", -2, 2, e) != 0 ||
        opt_number(root, "frequency_penalty", -2, 2, e) != 0)
        goto err;
    if (n != 1) {
        fail(e, 400, "n", "invalid_value", "The demo provider answers with one choice only (n=1).");
        goto err;
    }
    chat->max_tokens = max_tokens;
    if (max_completion > 0 && (max_tokens == 0 || max_completion < max_tokens))
        chat->max_tokens = max_completion;
    const bg_json_t *user_field = bg_json_find(root, "user");
    if (user_field != NULL && bg_json_type(user_field) != BG_JSON_STRING &&
        bg_json_type(user_field) != BG_JSON_NULL) {
        invalid_type(e, "user", "a string", user_field);
        goto err;
    }

    if (m == NULL) {
        fail(e, 404, NULL, "model_not_found",
             "The model `%.100s` does not exist or you do not have access to it.", model_id);
        goto err;
    }
    chat->model = bg_strndup(model_id, model_len);
    if (parse_directives(user.base != NULL ? user.base : "", user.len, &chat->fail, e) != 0)
        goto err;
    static const char echo_all[] = "#echo:messages";
    bool all =
        user.base != NULL && memmem(user.base, user.len, echo_all, sizeof(echo_all) - 1) != NULL;
    if (build_reply(chat, all ? &transcript : &user, all ? TRANSCRIPT_CHARS : ECHO_CHARS, e) != 0)
        goto err;
    bg_buf_dispose(&transcript);
    bg_buf_dispose(&user);
    bg_json_doc_free(doc);
    return 0;

err:
    demo_chat_dispose(chat);
    bg_buf_dispose(&transcript);
    bg_buf_dispose(&user);
    bg_json_doc_free(doc);
    return -1;
}

void demo_chat_dispose(demo_chat_t *chat)
{
    free(chat->model);
    free(chat->text);
    free(chat->token_end);
    memset(chat, 0, sizeof(*chat));
}

void demo_error_for_status(int status, const char *model, demo_error_t *e)
{
    e->status = status;
    e->param[0] = '\0';
    e->code = NULL;
    e->type = status >= 500 ? "server_error" : "invalid_request_error";
    switch (status) {
    case 429:
        e->type = "requests";
        e->code = "rate_limit_exceeded";
        snprintf(
            e->message, sizeof(e->message),
            "Rate limit reached for %.100s in organization org-demo on requests per min (RPM): "
            "Limit 3, Used 3, Requested 1. Please try again in 1s.",
            model);
        break;
    case 500:
        snprintf(e->message, sizeof(e->message),
                 "The server had an error while processing your request. Sorry about that!");
        break;
    case 503:
        snprintf(e->message, sizeof(e->message),
                 "The engine is currently overloaded, please try again later.");
        break;
    default:
        snprintf(e->message, sizeof(e->message),
                 "The demo provider answers %d because the request asked for it (#fail:%d).",
                 status, status);
        break;
    }
}
