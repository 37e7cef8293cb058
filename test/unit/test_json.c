/*
 * JSON: the limits a hostile body runs into (each with its own error), the typed getters handlers
 * rely on, the unknown-field report and the writer's escaping and misuse detection.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "bg/err.h"
#include "bg/json.h"

static int parse(const char *text, const bg_json_limits_t *lim, bg_json_doc_t **doc,
                 const char **desc, size_t *off)
{
    return bg_json_parse(text, strlen(text), lim, doc, desc, off);
}

/* Parses text that must be refused; returns the error and checks nothing was handed out. */
static int refused(const char *text, size_t len, const bg_json_limits_t *lim, const char **desc)
{
    bg_json_doc_t *doc = (bg_json_doc_t *)1;
    size_t off = 0;
    const char *d = NULL;
    int r = bg_json_parse(text, len, lim, &doc, &d, &off);
    cr_assert_null(doc);
    cr_assert_not_null(d, "every refusal says why");
    if (desc != NULL)
        *desc = d;
    return r;
}

static char *repeat(char c, size_t n)
{
    char *s = malloc(n + 1);
    memset(s, c, n);
    s[n] = '\0';
    return s;
}

Test(json, getters_return_typed_values)
{
    bg_json_doc_t *doc;
    const char *desc;
    const char *text = "{\"email\":\"a@b.example\",\"age\":30,\"admin\":false,\"ratio\":1.5,"
                       "\"profile\":{\"x\":1},\"tags\":[\"a\",\"b\"],\"nothing\":null}";
    cr_assert_eq(parse(text, NULL, &doc, &desc, NULL), 0);
    const bg_json_t *root = bg_json_root(doc);
    const char *s;
    size_t len;
    int64_t i;
    bool b = true;
    double d;
    const bg_json_t *o, *a;
    cr_assert_eq(bg_json_get_str(root, "email", &s), 0);
    cr_assert_str_eq(s, "a@b.example");
    cr_assert_eq(bg_json_get_strn(root, "email", &s, &len), 0);
    cr_assert_eq(len, 11);
    cr_assert_eq(bg_json_get_int(root, "age", &i), 0);
    cr_assert_eq(i, 30);
    cr_assert_eq(bg_json_get_bool(root, "admin", &b), 0);
    cr_assert_eq(b, false);
    cr_assert_eq(bg_json_get_double(root, "ratio", &d), 0);
    cr_assert_eq(d, 1.5);
    cr_assert_eq(bg_json_get_double(root, "age", &d), 0);
    cr_assert_eq(d, 30.0);
    cr_assert_eq(bg_json_get_object(root, "profile", &o), 0);
    cr_assert_eq(bg_json_get_int(o, "x", &i), 0);
    cr_assert_eq(i, 1);
    cr_assert_eq(bg_json_get_array(root, "tags", &a), 0);
    cr_assert_eq(bg_json_len(a), 2);
    cr_assert_str_eq(bg_json_str(bg_json_at(a, 1), NULL), "b");
    cr_assert_null(bg_json_at(a, 2));
    const char *key;
    cr_assert_not_null(bg_json_member(root, 0, &key));
    cr_assert_str_eq(key, "email", "members keep the order of the text");
    bg_json_doc_free(doc);
}

Test(json, getters_distinguish_missing_from_wrong_type)
{
    bg_json_doc_t *doc;
    const char *desc;
    cr_assert_eq(parse("{\"age\":\"30\",\"n\":null,\"f\":2.5,\"big\":99999999999999999999}", NULL,
                       &doc, &desc, NULL),
                 0);
    const bg_json_t *root = bg_json_root(doc);
    const char *s = "untouched";
    int64_t i = 7;
    bool b;
    const bg_json_t *v;
    cr_assert_eq(bg_json_get_str(root, "email", &s), BG_ERR_NOT_FOUND);
    cr_assert_eq(bg_json_get_str(root, "n", &s), BG_ERR_NOT_FOUND, "null counts as not given");
    cr_assert_str_eq(s, "untouched");
    cr_assert_eq(bg_json_get_int(root, "age", &i), BG_ERR_INVALID, "a string is no integer");
    cr_assert_eq(bg_json_get_int(root, "f", &i), BG_ERR_INVALID, "a fraction is no integer");
    cr_assert_eq(bg_json_get_int(root, "big", &i), BG_ERR_INVALID, "past int64_t");
    cr_assert_eq(i, 7);
    cr_assert_eq(bg_json_get_bool(root, "age", &b), BG_ERR_INVALID);
    cr_assert_eq(bg_json_get_object(root, "age", &v), BG_ERR_INVALID);
    cr_assert_eq(bg_json_get_array(root, "age", &v), BG_ERR_INVALID);
    cr_assert_eq(bg_json_get_str(bg_json_find(root, "f"), "x", &s), BG_ERR_INVALID,
                 "looking into a non-object is a type error");
    bg_json_doc_free(doc);
}

Test(json, depth_bomb_is_refused_at_the_limit)
{
    size_t n = 1000 * 1000;
    char *bomb = repeat('[', n);
    const char *desc;
    size_t off = 0;
    bg_json_doc_t *doc;
    cr_assert_eq(bg_json_parse(bomb, n, NULL, &doc, &desc, &off), BG_ERR_DEPTH);
    cr_assert_null(doc);
    cr_assert_leq(off, 40, "stopped right after the 33rd bracket, not at %zu", off);
    free(bomb);

    /* Exactly the limit is fine, one more is not. */
    bg_json_limits_t lim = {.max_depth = 3};
    cr_assert_eq(parse("[[[1]]]", &lim, &doc, &desc, NULL), 0);
    bg_json_doc_free(doc);
    cr_assert_eq(refused("[[[[1]]]]", 9, &lim, NULL), BG_ERR_DEPTH);
    cr_assert_eq(refused("{\"a\":{\"b\":{\"c\":{}}}}", 20, &lim, NULL), BG_ERR_DEPTH);
}

Test(json, oversized_body_and_strings_are_too_large)
{
    bg_json_limits_t lim = {.max_bytes = 16, .max_string = 8};
    const char *desc;
    bg_json_doc_t *doc;
    cr_assert_eq(refused("[\"0123456789012\"]", 17, &lim, &desc), BG_ERR_TOO_LARGE);
    cr_assert(strstr(desc, "body") != NULL, "%s", desc);
    cr_assert_eq(refused("\"012345678\"", 11, &lim, &desc), BG_ERR_TOO_LARGE);
    cr_assert(strstr(desc, "string") != NULL, "%s", desc);
    cr_assert_eq(refused("{\"012345678\":1}", 15, &lim, NULL), BG_ERR_TOO_LARGE, "keys too");
    cr_assert_eq(parse("\"01234567\"", &lim, &doc, &desc, NULL), 0);
    bg_json_doc_free(doc);

    /* The default limits turn away a huge string inside a 1 MB body. */
    size_t n = 300 * 1024;
    char *big = repeat('x', n);
    big[0] = '"';
    big[n - 1] = '"';
    cr_assert_eq(refused(big, n, NULL, NULL), BG_ERR_TOO_LARGE);
    free(big);
    char num[80];
    memset(num, '1', sizeof(num) - 1);
    num[sizeof(num) - 1] = '\0';
    cr_assert_eq(refused(num, strlen(num), NULL, NULL), BG_ERR_TOO_LARGE, "a 79-digit literal");
}

Test(json, too_many_members_is_too_large)
{
    bg_json_limits_t lim = {.max_members = 3, .max_values = 100};
    bg_json_doc_t *doc;
    const char *desc;
    cr_assert_eq(parse("[1,2,3]", &lim, &doc, &desc, NULL), 0);
    bg_json_doc_free(doc);
    cr_assert_eq(refused("[1,2,3,4]", 9, &lim, NULL), BG_ERR_TOO_LARGE);
    cr_assert_eq(refused("{\"a\":1,\"b\":2,\"c\":3,\"d\":4}", 25, &lim, NULL), BG_ERR_TOO_LARGE);
    bg_json_limits_t few = {.max_values = 5};
    cr_assert_eq(refused("[[1,2],[3,4],[5,6]]", 19, &few, NULL), BG_ERR_TOO_LARGE,
                 "the whole document's value count is bounded");
}

Test(json, invalid_utf8_is_refused)
{
    static const char *const bad[] = {
        "\"\xff\"",             /* never valid */
        "\"\xc0\xaf\"",         /* overlong '/' */
        "\"\xe0\x80\xaf\"",     /* overlong, three bytes */
        "\"\xed\xa0\x80\"",     /* a surrogate, raw */
        "\"\xf4\x90\x80\x80\"", /* past U+10FFFF */
        "\"\xe2\x82\"",         /* cut short */
        "\"\\udc00\"",          /* a lone low surrogate escape */
        "{\"\xc3\":1}",         /* in a key */
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        const char *desc;
        cr_assert_eq(refused(bad[i], strlen(bad[i]), NULL, &desc), BG_ERR_INVALID, "case %zu", i);
    }
    bg_json_doc_t *doc;
    const char *desc;
    cr_assert_eq(parse("[\"\xe2\x82\xac\",\"\\ud83d\\ude00\",\"\xf0\x9f\x98\x80\"]", NULL, &doc,
                       &desc, NULL),
                 0);
    cr_assert_str_eq(bg_json_str(bg_json_at(bg_json_root(doc), 1), NULL), "\xf0\x9f\x98\x80");
    bg_json_doc_free(doc);
}

Test(json, malformed_bodies_are_invalid_with_a_position)
{
    const char *desc;
    size_t off = 0;
    bg_json_doc_t *doc;
    cr_assert_eq(bg_json_parse("{} x", 4, NULL, &doc, &desc, &off), BG_ERR_INVALID);
    cr_assert(strstr(desc, "after") != NULL, "trailing garbage named: %s", desc);
    cr_assert_geq(off, 3);
    cr_assert_eq(refused("{}{}", 4, NULL, NULL), BG_ERR_INVALID, "one value per body");
    cr_assert_eq(refused("", 0, NULL, &desc), BG_ERR_INVALID);
    cr_assert_str_eq(desc, "empty body");
    cr_assert_eq(refused(" \r\n\t", 4, NULL, &desc), BG_ERR_INVALID);
    cr_assert_str_eq(desc, "empty body");
    cr_assert_eq(bg_json_parse("{\"a\":", 5, NULL, &doc, &desc, &off), BG_ERR_INVALID);
    cr_assert_eq(off, 5, "truncation is found at the end");
    cr_assert_eq(refused("{\"a\":1,}", 8, NULL, NULL), BG_ERR_INVALID);
    cr_assert_eq(refused("/* c */ {}", 10, NULL, NULL), BG_ERR_INVALID, "no comments");
    cr_assert_eq(refused("[1e999]", 7, NULL, &desc), BG_ERR_INVALID);
    cr_assert_str_eq(desc, "number out of range");
    cr_assert_eq(refused("\"a\\u0000b\"", 10, NULL, &desc), BG_ERR_INVALID);
    cr_assert_str_eq(desc, "string contains U+0000");
    cr_assert_eq(refused("[1,\0]", 5, NULL, NULL), BG_ERR_INVALID, "a raw NUL");
    /* Trailing whitespace is fine. */
    cr_assert_eq(parse("{} \n", NULL, &doc, &desc, NULL), 0);
    bg_json_doc_free(doc);
}

Test(json, duplicate_keys_are_refused)
{
    const char *desc;
    cr_assert_eq(refused("{\"role\":\"user\",\"role\":\"admin\"}", 30, NULL, &desc),
                 BG_ERR_INVALID);
    cr_assert_str_eq(desc, "duplicate key");

    /* Large objects (hashed) and siblings reusing the same keys. */
    char text[8192];
    size_t n = 0;
    text[n++] = '[';
    for (int o = 0; o < 3; o++) {
        text[n++] = '{';
        for (int k = 0; k < 100; k++)
            n += (size_t)snprintf(text + n, sizeof(text) - n, "%s\"k%d\":%d", k ? "," : "", k, k);
        text[n++] = '}';
        text[n++] = o < 2 ? ',' : ']';
    }
    bg_json_doc_t *doc;
    cr_assert_eq(bg_json_parse(text, n, NULL, &doc, &desc, NULL), 0, "%s", desc);
    const bg_json_t *last = bg_json_at(bg_json_root(doc), 2);
    int64_t v;
    cr_assert_eq(bg_json_get_int(last, "k99", &v), 0);
    cr_assert_eq(v, 99);
    bg_json_doc_free(doc);
    memcpy(text + n - 2, ",\"k42\":0}]", 10);
    cr_assert_eq(refused(text, n + 8, NULL, &desc), BG_ERR_INVALID);
    cr_assert_str_eq(desc, "duplicate key");
}

Test(json, numbers_keep_integers_exact)
{
    bg_json_doc_t *doc;
    const char *desc;
    cr_assert_eq(parse("[9223372036854775807,-9223372036854775808,9223372036854775808,-0,1e2]",
                       NULL, &doc, &desc, NULL),
                 0);
    const bg_json_t *a = bg_json_root(doc);
    int64_t i;
    double d;
    cr_assert(bg_json_int(bg_json_at(a, 0), &i));
    cr_assert_eq(i, INT64_MAX);
    cr_assert(bg_json_int(bg_json_at(a, 1), &i));
    cr_assert_eq(i, INT64_MIN);
    cr_assert_not(bg_json_int(bg_json_at(a, 2), &i));
    cr_assert(bg_json_double(bg_json_at(a, 2), &d));
    cr_assert(bg_json_int(bg_json_at(a, 3), &i));
    cr_assert_eq(i, 0);
    cr_assert_not(bg_json_int(bg_json_at(a, 4), &i), "1e2 is written as a float");
    bg_json_doc_free(doc);
}

Test(json, unknown_fields_are_reported_by_name)
{
    static const char *const allowed[] = {"email", "password", "name", NULL};
    bg_json_doc_t *doc;
    const char *desc, *unknown = "x";
    cr_assert_eq(parse("{\"email\":\"a\",\"password\":\"b\"}", NULL, &doc, &desc, NULL), 0);
    cr_assert_eq(bg_json_check_fields(bg_json_root(doc), allowed, &unknown), 0);
    cr_assert_null(unknown);
    bg_json_doc_free(doc);
    cr_assert_eq(parse("{\"email\":\"a\",\"pasword\":\"b\",\"role\":1}", NULL, &doc, &desc, NULL),
                 0);
    cr_assert_eq(bg_json_check_fields(bg_json_root(doc), allowed, &unknown), BG_ERR_INVALID);
    cr_assert_str_eq(unknown, "pasword", "the first unknown field in text order");
    bg_json_doc_free(doc);
    cr_assert_eq(parse("[1]", NULL, &doc, &desc, NULL), 0);
    cr_assert_eq(bg_json_check_fields(bg_json_root(doc), allowed, &unknown), BG_ERR_INVALID);
    cr_assert_null(unknown);
    bg_json_doc_free(doc);
}

Test(json, writer_escapes_and_places_commas)
{
    bg_buf_t b;
    bg_buf_init(&b, 4096);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &b);
    bg_json_write_begin_object(&w);
    bg_json_write_field_str(&w, "q\"k", "line\n\ttab \x01 \"quoted\" back\\slash");
    bg_json_write_field_str(&w, "bad",
                            "a\xff"
                            "b\xc0\xaf"
                            "c");
    bg_json_write_field_str(&w, "utf8", "\xd0\x9f\xe2\x82\xac");
    bg_json_write_key(&w, "list");
    bg_json_write_begin_array(&w);
    bg_json_write_int(&w, -42);
    bg_json_write_double(&w, 0.1);
    bg_json_write_double(&w, 1.0 / 0.0);
    bg_json_write_double(&w, -0.0); /* as 0: "-0" would read back as an integer and lose it */
    bg_json_write_bool(&w, true);
    bg_json_write_null(&w);
    bg_json_write_begin_object(&w);
    bg_json_write_end_object(&w);
    bg_json_write_end_array(&w);
    bg_json_write_field_int(&w, "n", 7);
    bg_json_write_field_bool(&w, "f", false);
    bg_json_write_field_null(&w, "z");
    bg_json_write_end_object(&w);
    cr_assert_eq(bg_json_write_finish(&w), 0);
    cr_assert_str_eq(b.base,
                     "{\"q\\\"k\":\"line\\n\\ttab \\u0001 \\\"quoted\\\" back\\\\slash\","
                     "\"bad\":\"a\xef\xbf\xbd"
                     "b\xef\xbf\xbd\xef\xbf\xbd"
                     "c\","
                     "\"utf8\":\"\xd0\x9f\xe2\x82\xac\","
                     "\"list\":[-42,0.1,null,0,true,null,{}],\"n\":7,\"f\":false,\"z\":null}");
    /* What the writer produces, the parser accepts. */
    bg_json_doc_t *doc;
    const char *desc;
    cr_assert_eq(bg_json_parse(b.base, b.len, NULL, &doc, &desc, NULL), 0, "%s", desc);
    const char *s;
    cr_assert_eq(bg_json_get_str(bg_json_root(doc), "q\"k", &s), 0);
    cr_assert_str_eq(s, "line\n\ttab \x01 \"quoted\" back\\slash");
    bg_json_doc_free(doc);
    bg_buf_dispose(&b);
}

Test(json, writer_refuses_misuse_and_leaves_no_partial_output)
{
    bg_buf_t b;
    bg_buf_init(&b, 4096);
    cr_assert_eq(bg_buf_puts(&b, "prefix"), 0);
    bg_json_writer_t w;

    bg_json_writer_init(&w, &b);
    bg_json_write_begin_object(&w);
    bg_json_write_str(&w, "value where a key is due");
    bg_json_write_end_object(&w);
    cr_assert_eq(bg_json_write_finish(&w), BG_ERR_INVALID);
    cr_assert_str_eq(b.base, "prefix");

    bg_json_writer_init(&w, &b);
    bg_json_write_begin_array(&w);
    bg_json_write_key(&w, "k");
    cr_assert_eq(bg_json_write_finish(&w), BG_ERR_INVALID, "a key in an array");

    bg_json_writer_init(&w, &b);
    bg_json_write_begin_array(&w);
    bg_json_write_end_object(&w);
    cr_assert_eq(bg_json_write_finish(&w), BG_ERR_INVALID, "mismatched end");

    bg_json_writer_init(&w, &b);
    bg_json_write_begin_object(&w);
    cr_assert_eq(bg_json_write_finish(&w), BG_ERR_INVALID, "unclosed object");

    bg_json_writer_init(&w, &b);
    bg_json_write_int(&w, 1);
    bg_json_write_int(&w, 2);
    cr_assert_eq(bg_json_write_finish(&w), BG_ERR_INVALID, "two top-level values");

    bg_json_writer_init(&w, &b);
    cr_assert_eq(bg_json_write_finish(&w), BG_ERR_INVALID, "nothing written");
    cr_assert_str_eq(b.base, "prefix");
    bg_buf_dispose(&b);

    bg_buf_init(&b, 16);
    bg_json_writer_init(&w, &b);
    bg_json_write_begin_array(&w);
    bg_json_write_str(&w, "this does not fit in sixteen bytes");
    bg_json_write_end_array(&w);
    cr_assert_eq(bg_json_write_finish(&w), BG_ERR_TOO_LARGE);
    cr_assert_eq(b.len, 0);
    bg_buf_dispose(&b);
}

Test(json, parsed_documents_write_back_unchanged)
{
    const char *text = "{\"a\":[1,-2.5,\"x\\\"y\",true,false,null,{\"b\":{}}],\"c\":\"\xc3\xa9\"}";
    bg_json_doc_t *doc;
    const char *desc;
    cr_assert_eq(parse(text, NULL, &doc, &desc, NULL), 0);
    bg_buf_t b;
    bg_buf_init(&b, 1024);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &b);
    bg_json_write_value(&w, bg_json_root(doc));
    cr_assert_eq(bg_json_write_finish(&w), 0);
    cr_assert_str_eq(b.base, text);
    bg_buf_dispose(&b);
    bg_json_doc_free(doc);
}
