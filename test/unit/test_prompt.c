/*
 * Prompt definitions: validation errors name the field, templates may only use declared variables
 * and built-ins, rendering is strict (missing, unknown, wrongly typed and out-of-enum values are
 * refused by name), defaults and built-ins fill in, messages come out in the documented order, the
 * output is capped, and both memory policies keep the right newest messages.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "bg/err.h"
#include "bg/json.h"
#include "bg/prompt.h"

/* Parses a definition that must be refused with rc; returns the error (field, name, reason). */
static bg_prompt_err_t refused(const char *json, int want_rc)
{
    bg_prompt_t *p = (bg_prompt_t *)1;
    bg_prompt_err_t err;
    memset(&err, 0, sizeof(err));
    int rc = bg_prompt_parse(json, strlen(json), &p, &err);
    cr_assert_eq(rc, want_rc, "%s: got %s", json, bg_strerror(rc));
    cr_assert_null(p);
    cr_assert_not_null(err.reason, "every refusal says why: %s", json);
    return err;
}

static bg_prompt_t *parsed(const char *json)
{
    bg_prompt_t *p = NULL;
    bg_prompt_err_t err;
    memset(&err, 0, sizeof(err));
    int rc = bg_prompt_parse(json, strlen(json), &p, &err);
    cr_assert_eq(rc, 0, "%s: %s %s %s", json, err.field, err.name, err.reason ? err.reason : "");
    cr_assert_not_null(p);
    return p;
}

/* Parses JSON text into a document (for variable values). */
static bg_json_doc_t *doc_of(const char *json)
{
    bg_json_doc_t *doc;
    const char *desc;
    cr_assert_eq(bg_json_parse(json, strlen(json), NULL, &doc, &desc, NULL), 0, "%s", json);
    return doc;
}

static const bg_prompt_builtins_t fixed_builtins = {
    .user_name = "Ada", .locale = "ru", .channel = "telegram", .date = "2024-05-01"};

/*
 * Renders p with vars (JSON text or NULL), history and message; returns rc and, on success, the
 * output in *out (new string) and the error in *err.
 */
static int render(const bg_prompt_t *p, const char *vars, const bg_prompt_msg_t *hist, size_t nhist,
                  const char *message, char **out, bg_prompt_err_t *err)
{
    bg_json_doc_t *doc = vars != NULL ? doc_of(vars) : NULL;
    bg_buf_t buf;
    bg_buf_init(&buf, 4 * 1024 * 1024);
    bg_prompt_err_t e;
    memset(&e, 0, sizeof(e));
    int rc = bg_prompt_render(p, doc != NULL ? bg_json_root(doc) : NULL, &fixed_builtins, hist,
                              nhist, message, message != NULL ? strlen(message) : 0, &buf, &e);
    if (rc != 0)
        cr_assert_eq(buf.len, 0, "a failed render leaves the output as it was");
    *out = strdup(buf.base != NULL ? buf.base : "");
    if (err != NULL)
        *err = e;
    bg_buf_dispose(&buf);
    bg_json_doc_free(doc);
    return rc;
}

/* Renders and returns the messages array as a document (must succeed). */
static bg_json_doc_t *render_ok(const bg_prompt_t *p, const char *vars, const bg_prompt_msg_t *hist,
                                size_t nhist, const char *message)
{
    char *out;
    bg_prompt_err_t err;
    int rc = render(p, vars, hist, nhist, message, &out, &err);
    cr_assert_eq(rc, 0, "render: %s (%s: %s)", bg_strerror(rc), err.field,
                 err.reason ? err.reason : "");
    bg_json_doc_t *doc = doc_of(out);
    free(out);
    cr_assert(bg_json_is_array(bg_json_root(doc)));
    return doc;
}

/* Asserts message i of a rendered array has role and content. */
static void msg_is(const bg_json_doc_t *doc, size_t i, const char *role, const char *content)
{
    const bg_json_t *m = bg_json_at(bg_json_root(doc), i);
    cr_assert_not_null(m, "message %zu exists", i);
    const char *r, *c;
    cr_assert_eq(bg_json_get_str(m, "role", &r), 0);
    cr_assert_eq(bg_json_get_str(m, "content", &c), 0);
    cr_assert_str_eq(r, role, "message %zu", i);
    cr_assert_str_eq(c, content, "message %zu", i);
}

/* Renders, expecting a refusal; returns the error. */
static bg_prompt_err_t render_refused(const bg_prompt_t *p, const char *vars, int want)
{
    char *out;
    bg_prompt_err_t err;
    int rc = render(p, vars, NULL, 0, "hi", &out, &err);
    cr_assert_eq(rc, want, "%s: got %s", vars ? vars : "(none)", bg_strerror(rc));
    cr_assert_str_eq(out, "");
    cr_assert_not_null(err.reason);
    free(out);
    return err;
}

/* ---- validation ---- */

Test(prompt, definition_errors_name_the_field)
{
    bg_prompt_err_t e;
    e = refused("[]", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "definition");
    e = refused("{\"system\":", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "definition", "malformed JSON is named too");
    e = refused("{}", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "system");
    cr_assert_str_eq(e.reason, "is required");
    e = refused("{\"system\":42}", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "system");
    e = refused("{\"system\":\"\"}", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "system");
    e = refused("{\"system\":\"x\",\"colour\":1}", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "colour");
    e = refused("{\"system\":\"x\",\"examples\":[{\"user\":\"q\"}]}", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "examples[0].assistant");
    e = refused("{\"system\":\"x\",\"examples\":[{\"user\":\"q\",\"assistant\":\"a\",\"x\":1}]}",
                BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "examples[0].x");
    e = refused("{\"system\":\"x\",\"variables\":[{\"name\":\"a\",\"type\":\"string\"},"
                "{\"name\":\"b\",\"type\":\"date\"}]}",
                BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "variables[1].type");
    e = refused("{\"system\":\"x\",\"variables\":[{\"type\":\"string\"}]}", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "variables[0].name");
    e = refused("{\"system\":\"x\",\"variables\":[{\"name\":\"Bad Name\",\"type\":\"string\"}]}",
                BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "variables[0].name");
    e = refused("{\"system\":\"x\",\"variables\":[{\"name\":\"a\",\"type\":\"string\"},"
                "{\"name\":\"a\",\"type\":\"number\"}]}",
                BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "variables[1].name");
    cr_assert_str_eq(e.reason, "is declared twice");
    e = refused("{\"system\":\"x\",\"variables\":[{\"name\":\"message\",\"type\":\"string\"}]}",
                BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "variables[0].name");
    cr_assert_str_eq(e.reason, "is reserved");
    e = refused("{\"system\":\"x\",\"variables\":[{\"name\":\"t\",\"type\":\"enum\"}]}",
                BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "variables[0].values");
    e = refused("{\"system\":\"x\",\"variables\":[{\"name\":\"t\",\"type\":\"enum\","
                "\"values\":[\"a\",\"a\"]}]}",
                BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "variables[0].values[1]");
    e = refused("{\"system\":\"x\",\"variables\":[{\"name\":\"t\",\"type\":\"string\","
                "\"values\":[\"a\"]}]}",
                BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "variables[0].values");
    e = refused("{\"system\":\"x\",\"variables\":[{\"name\":\"t\",\"type\":\"enum\","
                "\"values\":[\"a\",\"b\"],\"default\":\"c\"}]}",
                BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "variables[0].default");
    e = refused("{\"system\":\"x\",\"variables\":[{\"name\":\"n\",\"type\":\"number\","
                "\"default\":\"3\"}]}",
                BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "variables[0].default");
    e = refused("{\"system\":\"x\",\"variables\":[{\"name\":\"n\",\"type\":\"string\","
                "\"required\":true,\"default\":\"a\"}]}",
                BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "variables[0].default");
    e = refused("{\"system\":\"x\",\"variables\":[{\"name\":\"n\",\"type\":\"number\","
                "\"max_length\":3}]}",
                BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "variables[0].max_length");
    e = refused("{\"system\":\"x\",\"variables\":[{\"name\":\"s\",\"type\":\"string\","
                "\"max_length\":3,\"default\":\"abcd\"}]}",
                BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "variables[0].default");
    e = refused("{\"system\":\"x\",\"variables\":[{\"name\":\"s\",\"type\":\"string\","
                "\"required\":\"yes\"}]}",
                BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "variables[0].required");
}

Test(prompt, undeclared_placeholders_are_refused)
{
    bg_prompt_err_t e;
    e = refused("{\"system\":\"Talk about {{topic}}.\"}", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "system");
    cr_assert_str_eq(e.name, "topic");
    e = refused("{\"system\":\"Now: {{builtin.time}}\"}", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "system");
    cr_assert_str_eq(e.name, "builtin.time", "only the four built-ins exist");
    e = refused("{\"system\":\"x\",\"examples\":[{\"user\":\"q\",\"assistant\":\"{{who}}\"}]}",
                BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "examples[0].assistant");
    cr_assert_str_eq(e.name, "who");
    e = refused("{\"system\":\"x\",\"user\":\"{{message}} in {{lang}}\"}", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "user");
    cr_assert_str_eq(e.name, "lang");
    /* {{message}} only in the user template, and the user template must carry it */
    e = refused("{\"system\":\"Echo {{message}}\"}", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "system");
    cr_assert_str_eq(e.name, "message");
    e = refused("{\"system\":\"x\",\"user\":\"Please answer.\"}", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "user");
    /* a "{{" that opens no placeholder is a typo, not text */
    e = refused("{\"system\":\"Hello {{user name}}\"}", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "system");
    e = refused("{\"system\":\"Hello {{name\"}", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "system");

    /* declared variables, built-ins and spaces inside the braces are fine */
    bg_prompt_t *p = parsed("{\"system\":\"{{ builtin.user_name }} {{builtin.locale}} "
                            "{{builtin.channel}} {{builtin.date}} {{tone}}\","
                            "\"variables\":[{\"name\":\"tone\",\"type\":\"string\"}],"
                            "\"user\":\"{{message}}\"}");
    cr_assert_eq(bg_prompt_var_count(p), 1);
    cr_assert_str_eq(bg_prompt_var(p, 0)->name, "tone");
    cr_assert_null(bg_prompt_var(p, 1));
    bg_prompt_free(p);
}

Test(prompt, canonical_json_round_trips)
{
    bg_prompt_t *p =
        parsed("{\"variables\":[{\"name\":\"n\",\"type\":\"number\",\"default\":2.5},"
               "{\"name\":\"t\",\"type\":\"enum\",\"values\":[\"a\",\"b\"],\"default\":\"b\","
               "\"description\":\"which\"},{\"name\":\"s\",\"type\":\"string\",\"required\":true,"
               "\"max_length\":5},{\"name\":\"f\",\"type\":\"boolean\",\"default\":false}],"
               "\"system\":\"{{n}} {{t}} {{s}} "
               "{{f}}\",\"examples\":[{\"user\":\"u\",\"assistant\":\"a\"}],"
               "\"user\":\"[{{message}}]\"}");
    bg_buf_t buf;
    bg_buf_init(&buf, 1 << 20);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &buf);
    bg_prompt_write_json(p, &w);
    cr_assert_eq(bg_json_write_finish(&w), 0);
    bg_prompt_t *q = parsed(buf.base);
    bg_buf_t buf2;
    bg_buf_init(&buf2, 1 << 20);
    bg_json_writer_init(&w, &buf2);
    bg_prompt_write_json(q, &w);
    cr_assert_eq(bg_json_write_finish(&w), 0);
    cr_assert_str_eq(buf.base, buf2.base, "what is stored reads back as the same definition");

    bg_buf_reset(&buf);
    bg_json_writer_init(&w, &buf);
    bg_prompt_write_defaults(p, &w);
    cr_assert_eq(bg_json_write_finish(&w), 0);
    cr_assert_str_eq(buf.base, "{\"n\":2.5,\"t\":\"b\",\"f\":false}");
    bg_buf_dispose(&buf);
    bg_buf_dispose(&buf2);
    bg_prompt_free(q);
    bg_prompt_free(p);
}

/* ---- rendering ---- */

static const char *typed_def =
    "{\"system\":\"Topic {{topic}}; level {{level}}; n {{n}}; strict {{strict}}; note '{{note}}'\","
    "\"user\":\"Q: {{message}}\","
    "\"variables\":["
    "{\"name\":\"topic\",\"type\":\"string\",\"required\":true,\"max_length\":10},"
    "{\"name\":\"level\",\"type\":\"enum\",\"values\":[\"easy\",\"hard\"],\"default\":\"easy\"},"
    "{\"name\":\"n\",\"type\":\"number\",\"default\":3},"
    "{\"name\":\"strict\",\"type\":\"boolean\",\"default\":true},"
    "{\"name\":\"note\",\"type\":\"string\"}]}";

Test(prompt, missing_required_variable_is_named)
{
    bg_prompt_t *p = parsed(typed_def);
    bg_prompt_err_t e = render_refused(p, NULL, BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "topic");
    cr_assert_str_eq(e.reason, "is required");
    e = render_refused(p, "{\"topic\":null}", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "topic", "null is not a value");
    e = render_refused(p, "{\"level\":\"hard\"}", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "topic");
    bg_prompt_free(p);
}

Test(prompt, unknown_variable_is_named)
{
    bg_prompt_t *p = parsed(typed_def);
    bg_prompt_err_t e =
        render_refused(p, "{\"topic\":\"cats\",\"colour\":\"red\"}", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "colour");
    cr_assert_str_eq(e.reason, "is not a declared variable");
    e = render_refused(p, "{\"topic\":\"cats\",\"message\":\"sneaky\"}", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "message", "the message is not a variable value");
    e = render_refused(p, "[\"topic\"]", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "variables");
    bg_prompt_free(p);
}

Test(prompt, wrong_type_and_bad_enum_are_named)
{
    bg_prompt_t *p = parsed(typed_def);
    bg_prompt_err_t e = render_refused(p, "{\"topic\":42}", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "topic");
    cr_assert_str_eq(e.reason, "must be a string");
    e = render_refused(p, "{\"topic\":\"cats\",\"n\":\"3\"}", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "n");
    cr_assert_str_eq(e.reason, "must be a number");
    e = render_refused(p, "{\"topic\":\"cats\",\"strict\":1}", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "strict");
    cr_assert_str_eq(e.reason, "must be a boolean");
    e = render_refused(p, "{\"topic\":\"cats\",\"level\":\"medium\"}", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "level");
    cr_assert_str_eq(e.reason, "must be one of the declared values");
    e = render_refused(p, "{\"topic\":\"cats\",\"level\":\"EASY\"}", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "level", "enum values match exactly");
    /* max_length counts characters, not bytes: ten Cyrillic letters fit, eleven do not */
    e = render_refused(p, "{\"topic\":\"абвгдеёжзий\"}", BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "topic");
    bg_json_doc_t *ok = render_ok(p, "{\"topic\":\"абвгдеёжзи\"}", NULL, 0, "hi");
    bg_json_doc_free(ok);
    bg_prompt_free(p);
}

Test(prompt, defaults_fill_in_and_values_override)
{
    bg_prompt_t *p = parsed(typed_def);
    bg_json_doc_t *doc = render_ok(p, "{\"topic\":\"cats\"}", NULL, 0, "why?");
    cr_assert_eq(bg_json_len(bg_json_root(doc)), 2);
    msg_is(doc, 0, "system", "Topic cats; level easy; n 3; strict true; note ''");
    msg_is(doc, 1, "user", "Q: why?");
    bg_json_doc_free(doc);

    doc = render_ok(p,
                    "{\"topic\":\"dogs\",\"level\":\"hard\",\"n\":0.25,\"strict\":false,"
                    "\"note\":\"{{topic}} stays text\"}",
                    NULL, 0, "how?");
    /* a value is inserted as it is: placeholders in values are not expanded again */
    msg_is(doc, 0, "system",
           "Topic dogs; level hard; n 0.25; strict false; note '{{topic}} stays "
           "text'");
    msg_is(doc, 1, "user", "Q: how?");
    bg_json_doc_free(doc);
    bg_prompt_free(p);
}

Test(prompt, builtins_render)
{
    bg_prompt_t *p = parsed("{\"system\":\"{{builtin.user_name}}|{{builtin.locale}}|"
                            "{{builtin.channel}}|{{builtin.date}}\"}");
    bg_json_doc_t *doc = render_ok(p, NULL, NULL, 0, "hello");
    msg_is(doc, 0, "system", "Ada|ru|telegram|2024-05-01");
    msg_is(doc, 1, "user", "hello");
    bg_json_doc_free(doc);

    /* without built-ins: no name, the default locale, web, and today's date in UTC */
    bg_buf_t buf;
    bg_buf_init(&buf, 1 << 20);
    cr_assert_eq(bg_prompt_render(p, NULL, NULL, NULL, 0, "x", 1, &buf, NULL), 0);
    doc = doc_of(buf.base);
    const char *c;
    cr_assert_eq(bg_json_get_str(bg_json_at(bg_json_root(doc), 0), "content", &c), 0);
    cr_assert_eq(strncmp(c, "|en|web|20", 10), 0, "%s", c);
    cr_assert_eq(strlen(c), strlen("|en|web|") + 10, "%s", c);
    bg_json_doc_free(doc);
    bg_buf_dispose(&buf);
    bg_prompt_free(p);
}

Test(prompt, examples_then_history_then_user_turn)
{
    bg_prompt_t *p = parsed("{\"system\":\"S\",\"examples\":["
                            "{\"user\":\"u1\",\"assistant\":\"a1\"},"
                            "{\"user\":\"u2 {{builtin.user_name}}\",\"assistant\":\"a2\"}]}");
    cr_assert_eq(bg_prompt_example_count(p), 2);
    bg_prompt_msg_t hist[] = {
        {"user", "h1", 2},
        {"assistant", "h2", 2},
        {"user", "h3 with \"quotes\"\n", 17},
    };
    bg_json_doc_t *doc = render_ok(p, NULL, hist, 3, "now");
    cr_assert_eq(bg_json_len(bg_json_root(doc)), 1 + 4 + 3 + 1);
    msg_is(doc, 0, "system", "S");
    msg_is(doc, 1, "user", "u1");
    msg_is(doc, 2, "assistant", "a1");
    msg_is(doc, 3, "user", "u2 Ada");
    msg_is(doc, 4, "assistant", "a2");
    msg_is(doc, 5, "user", "h1");
    msg_is(doc, 6, "assistant", "h2");
    msg_is(doc, 7, "user", "h3 with \"quotes\"\n");
    /* without a user template the message is the user turn */
    msg_is(doc, 8, "user", "now");
    bg_json_doc_free(doc);

    /* only user, assistant and system messages may be replayed */
    bg_prompt_msg_t bad[] = {{"user", "a", 1}, {"tool", "b", 1}};
    char *out;
    bg_prompt_err_t e;
    cr_assert_eq(render(p, NULL, bad, 2, "x", &out, &e), BG_ERR_INVALID);
    cr_assert_str_eq(e.field, "history[1].role");
    free(out);
    bg_prompt_free(p);
}

Test(prompt, user_template_wraps_the_message)
{
    bg_prompt_t *p = parsed("{\"system\":\"S\",\"user\":\"<q lang={{builtin.locale}}>"
                            "{{message}}</q> again: {{ message }}\"}");
    bg_json_doc_t *doc = render_ok(p, NULL, NULL, 0, "{{topic}}");
    msg_is(doc, 1, "user", "<q lang=ru>{{topic}}</q> again: {{topic}}");
    bg_json_doc_free(doc);
    bg_prompt_free(p);
}

Test(prompt, output_is_capped)
{
    bg_prompt_t *p = parsed("{\"system\":\"{{a}}{{a}}\",\"variables\":"
                            "[{\"name\":\"a\",\"type\":\"string\"}]}");
    size_t n = 140 * 1024;
    char *vars = malloc(n + 16);
    memcpy(vars, "{\"a\":\"", 6);
    memset(vars + 6, 'x', n);
    memcpy(vars + 6 + n, "\"}", 3);
    bg_prompt_err_t e = render_refused(p, vars, BG_ERR_TOO_LARGE);
    cr_assert_str_eq(e.field, "messages");

    /* half of it fits */
    vars[6 + n / 2] = '"';
    vars[6 + n / 2 + 1] = '}';
    vars[6 + n / 2 + 2] = '\0';
    bg_json_doc_t *doc = render_ok(p, vars, NULL, 0, "x");
    bg_json_doc_free(doc);

    /* history counts too */
    char *big = malloc(BG_PROMPT_OUTPUT_MAX);
    memset(big, 'y', BG_PROMPT_OUTPUT_MAX);
    bg_prompt_msg_t hist[] = {{"user", big, BG_PROMPT_OUTPUT_MAX}};
    char *out;
    cr_assert_eq(render(p, NULL, hist, 1, "x", &out, &e), BG_ERR_TOO_LARGE);
    free(out);
    free(big);

    /* the caller's own cap holds as well, and leaves its buffer untouched */
    bg_buf_t small;
    bg_buf_init(&small, 16);
    cr_assert_eq(bg_buf_puts(&small, "keep"), 0);
    cr_assert_eq(bg_prompt_render(p, NULL, NULL, NULL, 0, "x", 1, &small, NULL), BG_ERR_TOO_LARGE);
    cr_assert_str_eq(small.base, "keep");
    bg_buf_dispose(&small);
    free(vars);
    bg_prompt_free(p);
}

/* ---- memory policy ---- */

static bg_memory_policy_t policy(const char *json)
{
    bg_memory_policy_t pol;
    bg_prompt_err_t e;
    int rc = bg_prompt_memory_parse_text(json, strlen(json), &pol, &e);
    cr_assert_eq(rc, 0, "%s: %s %s", json, e.field, e.reason);
    return pol;
}

Test(prompt, memory_policy_parse)
{
    bg_memory_policy_t pol = policy("{\"last_turns\":20}");
    cr_assert_eq(pol.kind, BG_MEMORY_LAST_TURNS);
    cr_assert_eq(pol.limit, 20);
    pol = policy("{\"token_budget\":4000}");
    cr_assert_eq(pol.kind, BG_MEMORY_TOKEN_BUDGET);
    cr_assert_eq(pol.limit, 4000);

    static const struct {
        const char *json, *field;
    } bad[] = {
        {"{}", "memory"},
        {"{\"last_turns\":1,\"token_budget\":5}", "memory"},
        {"{\"last_turns\":-1}", "memory.last_turns"},
        {"{\"last_turns\":1001}", "memory.last_turns"},
        {"{\"last_turns\":2.5}", "memory.last_turns"},
        {"{\"token_budget\":0}", "memory.token_budget"},
        {"{\"turns\":3}", "memory.turns"},
        {"[1]", "memory"},
    };
    for (size_t i = 0; i < BG_ARRAY_SIZE(bad); i++) {
        bg_prompt_err_t e;
        cr_assert_eq(bg_prompt_memory_parse_text(bad[i].json, strlen(bad[i].json), &pol, &e),
                     BG_ERR_INVALID, "%s", bad[i].json);
        cr_assert_str_eq(e.field, bad[i].field, "%s", bad[i].json);
    }

    bg_buf_t buf;
    bg_buf_init(&buf, 64);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &buf);
    bg_memory_policy_t tb = {BG_MEMORY_TOKEN_BUDGET, 99};
    bg_prompt_memory_write(&tb, &w);
    cr_assert_eq(bg_json_write_finish(&w), 0);
    cr_assert_str_eq(buf.base, "{\"token_budget\":99}");
    bg_buf_dispose(&buf);
}

Test(prompt, memory_last_turns_keeps_whole_turns)
{
    bg_prompt_msg_t h[] = {
        {"user", "u1", 2},      {"assistant", "a1", 2}, {"user", "u2", 2},
        {"assistant", "a2", 2}, {"user", "u3", 2},      {"assistant", "a3", 2},
    };
    bg_memory_policy_t pol = {BG_MEMORY_LAST_TURNS, 1};
    cr_assert_eq(bg_prompt_memory_keep(&pol, h, 6), 2, "u3 a3");
    pol.limit = 2;
    cr_assert_eq(bg_prompt_memory_keep(&pol, h, 6), 4, "u2 a2 u3 a3");
    pol.limit = 3;
    cr_assert_eq(bg_prompt_memory_keep(&pol, h, 6), 6);
    pol.limit = 20;
    cr_assert_eq(bg_prompt_memory_keep(&pol, h, 6), 6, "fewer turns than allowed: all");
    pol.limit = 0;
    cr_assert_eq(bg_prompt_memory_keep(&pol, h, 6), 0);
    pol.limit = 1;
    cr_assert_eq(bg_prompt_memory_keep(&pol, h, 5), 1, "the newest turn may lack its reply");
    cr_assert_eq(bg_prompt_memory_keep(&pol, h, 0), 0);
    /* a trailing assistant message belongs to the turn before it */
    bg_prompt_msg_t t[] = {{"user", "u1", 2}, {"assistant", "a1", 2}, {"assistant", "a1b", 3}};
    cr_assert_eq(bg_prompt_memory_keep(&pol, t, 3), 3);
}

Test(prompt, memory_token_budget_counts_bytes)
{
    cr_assert_eq(bg_prompt_estimate_tokens(0), 4);
    cr_assert_eq(bg_prompt_estimate_tokens(1), 5);
    cr_assert_eq(bg_prompt_estimate_tokens(4), 5);
    cr_assert_eq(bg_prompt_estimate_tokens(5), 6);
    cr_assert_eq(bg_prompt_estimate_tokens(400), 104);

    char c400[400];
    memset(c400, 'z', sizeof(c400));
    /* costs, oldest first: 104, 5, 104, 6 */
    bg_prompt_msg_t h[] = {
        {"user", c400, 400},
        {"assistant", "abcd", 4},
        {"user", c400, 400},
        {"assistant", "abcde", 5},
    };
    bg_memory_policy_t pol = {BG_MEMORY_TOKEN_BUDGET, 6};
    cr_assert_eq(bg_prompt_memory_keep(&pol, h, 4), 1);
    pol.limit = 5;
    cr_assert_eq(bg_prompt_memory_keep(&pol, h, 4), 0, "the newest does not fit: nothing");
    pol.limit = 110;
    cr_assert_eq(bg_prompt_memory_keep(&pol, h, 4), 2);
    pol.limit = 114;
    cr_assert_eq(bg_prompt_memory_keep(&pol, h, 4), 2, "one token short of the third");
    pol.limit = 115;
    cr_assert_eq(bg_prompt_memory_keep(&pol, h, 4), 3);
    pol.limit = 219;
    cr_assert_eq(bg_prompt_memory_keep(&pol, h, 4), 4);
    pol.limit = 218;
    cr_assert_eq(bg_prompt_memory_keep(&pol, h, 4), 3);
}
