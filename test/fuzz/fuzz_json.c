/*
 * libFuzzer target for the limited JSON parser, the getters and the writer.
 *
 * Every input goes through bg_json_parse under small limits (so the fuzzer reaches them quickly).
 * When it parses, the getters are exercised on whatever the root is, and the tree is written back
 * and must parse again to the same text: the writer's output is always valid JSON and the parser
 * keeps everything it accepted. A refusal must come with one of the three documented errors and a
 * description. Any difference aborts, which libFuzzer reports as a crash.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bg/err.h"
#include "bg/json.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void exercise_getters(const bg_json_t *obj)
{
    static const char *const keys[] = {"email", "password", "name", "locale", "", "a", NULL};
    static const char *const allowed[] = {"email", "password", "name", NULL};
    for (size_t i = 0; keys[i] != NULL; i++) {
        const char *s;
        size_t len;
        int64_t n;
        double d;
        bool b;
        const bg_json_t *v;
        int r = bg_json_get_strn(obj, keys[i], &s, &len);
        if (r == 0 && (strlen(s) != len || !bg_json_utf8_is_valid(s, len)))
            abort();
        if (bg_json_get_int(obj, keys[i], &n) == 0 && bg_json_get_double(obj, keys[i], &d) != 0)
            abort();
        (void)bg_json_get_bool(obj, keys[i], &b);
        (void)bg_json_get_object(obj, keys[i], &v);
        (void)bg_json_get_array(obj, keys[i], &v);
    }
    const char *unknown;
    if (bg_json_check_fields(obj, allowed, &unknown) == BG_ERR_INVALID && bg_json_is_object(obj) &&
        unknown == NULL)
        abort();
    for (size_t i = 0; i < bg_json_len(obj); i++) {
        const char *key = NULL;
        const bg_json_t *v = bg_json_member(obj, i, &key);
        if (v != NULL && bg_json_find(obj, key) != v)
            abort(); /* keys are unique, so lookup finds this very member */
        if (bg_json_is_array(obj) && bg_json_at(obj, i) == NULL)
            abort();
    }
}

/* Writes v; returns the text (owned) or NULL when the writer refused. */
static char *write_back(const bg_json_t *v, size_t *len)
{
    bg_buf_t b;
    bg_buf_init(&b, 8 * 1024 * 1024);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &b);
    bg_json_write_value(&w, v);
    if (bg_json_write_finish(&w) != 0) {
        bg_buf_dispose(&b);
        return NULL;
    }
    return bg_buf_steal(&b, len);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const bg_json_limits_t limits = {
        .max_bytes = 64 * 1024,
        .max_depth = 16,
        .max_string = 1024,
        .max_members = 64,
        .max_values = 4096,
    };
    bg_json_doc_t *doc = NULL;
    const char *desc = NULL;
    size_t offset = 0;
    int r = bg_json_parse((const char *)data, size, &limits, &doc, &desc, &offset);
    if (r != 0) {
        if (doc != NULL || desc == NULL || offset > size ||
            (r != BG_ERR_INVALID && r != BG_ERR_TOO_LARGE && r != BG_ERR_DEPTH))
            abort();
        return 0;
    }
    const bg_json_t *root = bg_json_root(doc);
    exercise_getters(root);

    size_t len1 = 0, len2 = 0;
    char *text1 = write_back(root, &len1);
    if (text1 == NULL)
        abort(); /* depth 16 is far below the writer's limit */
    bg_json_doc_t *again = NULL;
    /* Written text can be longer than the input (escapes), so reparse without the size limits. */
    if (bg_json_parse(text1, len1, NULL, &again, &desc, &offset) != 0)
        abort();
    char *text2 = write_back(bg_json_root(again), &len2);
    if (text2 == NULL || len1 != len2 || memcmp(text1, text2, len1) != 0)
        abort();
    free(text2);
    free(text1);
    bg_json_doc_free(again);
    bg_json_doc_free(doc);
    return 0;
}
