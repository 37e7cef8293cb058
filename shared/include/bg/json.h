/*
 * JSON: a parser with limits for request bodies, typed getters for request parsing, and a writer
 * for responses.
 *
 * Parsing runs yajl's event parser and builds a read-only tree while it goes, checking every limit
 * at the event that would break it: a body bigger than max_bytes is refused before the first byte
 * is read, a container one level deeper than max_depth stops the parse at its opening bracket, a
 * string is measured when yajl hands it over. A 1 MB depth bomb therefore costs max_depth frames,
 * not a tree.
 *
 * What the parser refuses besides bad syntax, and why:
 * - invalid UTF-8, including overlong forms, surrogates (raw or from a lone \u escape) and code
 * points past U+10FFFF: yajl's own check lets those through;
 * - U+0000 in a string or key: every consumer is C, and a NUL would silently cut "a@b.c\u0000x";
 * - duplicate keys in one object: parsers disagree on which one wins
 * ({"role":"user","role":"admin"}), so a body that could mean two things is refused instead of
 * guessed at;
 * - numbers that do not fit a double (1e999), and number literals longer than 64 bytes.
 *
 * All values of a document live in one arena owned by the bg_json_doc_t; pointers into it (values,
 * strings, keys) are borrowed and die with bg_json_doc_free().
 */
#ifndef BG_JSON_H
#define BG_JSON_H

#include "bg/buf.h"
#include "bg/common.h"

/** Limits applied while parsing. A zero field takes the default of bg_json_default_limits. */
typedef struct bg_json_limits {
    size_t max_bytes;   /**< input size */
    size_t max_depth;   /**< nested objects and arrays; a scalar root has depth 0, "[]" depth 1 */
    size_t max_string;  /**< bytes of one string or key, after unescaping */
    size_t max_members; /**< members of one object or items of one array */
    size_t max_values;  /**< values in the whole document (bounds the tree's memory) */
} bg_json_limits_t;

/** 1 MiB, depth 32, strings 256 KiB, 10,000 members per container, 100,000 values. */
extern const bg_json_limits_t bg_json_default_limits;

typedef enum bg_json_type {
    BG_JSON_NULL = 0,
    BG_JSON_BOOL,
    BG_JSON_NUMBER,
    BG_JSON_STRING,
    BG_JSON_ARRAY,
    BG_JSON_OBJECT
} bg_json_type_t;

/** A parsed document: owns every value in it. */
typedef struct bg_json_doc bg_json_doc_t;
/** A value inside a document (borrowed from the document). */
typedef struct bg_json bg_json_t;

/**
 * Parses len bytes of text (need not be NUL-terminated) under limits (NULL: the defaults). On
 * success returns 0 and sets *out to a document the caller owns (bg_json_doc_free). On failure sets
 * *out to NULL, *err_desc to a static description and *err_offset (when not NULL) to the byte
 * offset where the problem was found, and returns:
 * - BG_ERR_TOO_LARGE: the body, a string, a number literal, a container or the value count is over
 *   its limit (answer 413);
 * - BG_ERR_DEPTH: nesting deeper than max_depth;
 * - BG_ERR_INVALID: empty body, bad syntax, invalid UTF-8, U+0000, duplicate key, number out of
 *   range, or data after the value.
 */
BG_MUSTCHECK int bg_json_parse(const char *text, size_t len, const bg_json_limits_t *limits,
                               bg_json_doc_t **out, const char **err_desc, size_t *err_offset);

/** Frees a document and every value in it; accepts NULL. */
void bg_json_doc_free(bg_json_doc_t *doc);

/** Returns the top-level value of a document (borrowed). */
const bg_json_t *bg_json_root(const bg_json_doc_t *doc);

/** Returns the type of a value. */
bg_json_type_t bg_json_type(const bg_json_t *v);
/** Returns "null", "boolean", "number", "string", "array" or "object". */
const char *bg_json_type_name(bg_json_type_t type);

static inline bool bg_json_is_object(const bg_json_t *v)
{
    return v != NULL && bg_json_type(v) == BG_JSON_OBJECT;
}

static inline bool bg_json_is_array(const bg_json_t *v)
{
    return v != NULL && bg_json_type(v) == BG_JSON_ARRAY;
}

/** Returns the number of members of an object or items of an array, 0 for any other value. */
size_t bg_json_len(const bg_json_t *v);

/** Returns item i of an array (borrowed), or NULL when v is no array or i is out of range. */
const bg_json_t *bg_json_at(const bg_json_t *v, size_t i);

/**
 * Returns the value of member i of an object (borrowed) and its key through *key (NUL-terminated,
 * borrowed; key may be NULL), or NULL when v is no object or i is out of range. Members keep the
 * order of the text.
 */
const bg_json_t *bg_json_member(const bg_json_t *v, size_t i, const char **key);

/** Returns the value of member key of an object (borrowed), or NULL when absent or v is no object.
 */
const bg_json_t *bg_json_find(const bg_json_t *obj, const char *key);

/** Returns the text of a string value (NUL-terminated, borrowed) and its length, or NULL. */
const char *bg_json_str(const bg_json_t *v, size_t *len);
/** Returns true and sets *out when v is a number without fraction or exponent that fits int64_t. */
bool bg_json_int(const bg_json_t *v, int64_t *out);
/** Returns true and sets *out when v is a number. */
bool bg_json_double(const bg_json_t *v, double *out);
/** Returns true and sets *out when v is a boolean. */
bool bg_json_bool(const bg_json_t *v, bool *out);

/*
 * Getters for request parsing. Each looks member key up in obj and returns:
 * - 0 with *out set;
 * - BG_ERR_NOT_FOUND when the member is absent or null (for an optional field, null means "not
 *   given"; for a required one both deserve the same "missing" message);
 * - BG_ERR_INVALID when it has the wrong type (or obj is no object). *out is then left untouched.
 * Pointers set through *out are borrowed from the document.
 */

/** A string member. */
BG_MUSTCHECK int bg_json_get_str(const bg_json_t *obj, const char *key, const char **out);
/** A string member and its length in bytes. */
BG_MUSTCHECK int bg_json_get_strn(const bg_json_t *obj, const char *key, const char **out,
                                  size_t *len);
/** An integer member: a number without fraction or exponent within int64_t (else BG_ERR_INVALID).
 */
BG_MUSTCHECK int bg_json_get_int(const bg_json_t *obj, const char *key, int64_t *out);
/** Any number member. */
BG_MUSTCHECK int bg_json_get_double(const bg_json_t *obj, const char *key, double *out);
/** A boolean member. */
BG_MUSTCHECK int bg_json_get_bool(const bg_json_t *obj, const char *key, bool *out);
/** An object member. */
BG_MUSTCHECK int bg_json_get_object(const bg_json_t *obj, const char *key, const bg_json_t **out);
/** An array member. */
BG_MUSTCHECK int bg_json_get_array(const bg_json_t *obj, const char *key, const bg_json_t **out);

/**
 * Checks that every key of obj is in allowed (NULL-terminated). Returns 0, or BG_ERR_INVALID with
 * *unknown set to the first key (in text order) that is not allowed (borrowed from the document),
 * for a 422 "unknown field". Returns BG_ERR_INVALID with *unknown NULL when obj is no object.
 */
BG_MUSTCHECK int bg_json_check_fields(const bg_json_t *obj, const char *const allowed[],
                                      const char **unknown);

/** Returns true when s[0..len) is valid UTF-8 (no overlong forms, surrogates or values > U+10FFFF).
 */
bool bg_json_utf8_is_valid(const char *s, size_t len);

/*
 * Writer: builds JSON text into a bg_buf_t, placing commas and colons itself.
 *
 * The first error (the buffer's cap, or a misuse such as a value where a key is due) sticks: every
 * later call does nothing, and bg_json_write_finish() reports it. Building a response is a straight
 * sequence of calls, so one check at the end is as safe as a check per call and far easier to read.
 * Strings are escaped as RFC 8259 requires; invalid UTF-8 in them is replaced by U+FFFD so the
 * output is always valid JSON, whatever a database or provider handed over.
 */
#define BG_JSON_WRITER_MAX_DEPTH 64

typedef struct bg_json_writer {
    bg_buf_t *out; /**< borrowed */
    int err;       /**< first error, 0 while all went well */
    size_t depth;
    size_t start;       /**< out->len when the writer was initialised */
    bool wrote;         /**< a complete top-level value was written */
    bool after_key;     /**< a key was written and its value is due */
    uint64_t in_object; /**< bit d: the container at depth d + 1 is an object */
    uint64_t has_items; /**< bit d: the container at depth d + 1 has an item already */
} bg_json_writer_t;

/** Starts writing one JSON value at the end of out (borrowed; must outlive the writer). */
void bg_json_writer_init(bg_json_writer_t *w, bg_buf_t *out);
/**
 * Returns 0 when one complete value was written, else the first error: BG_ERR_TOO_LARGE (buffer
 * cap, or nesting past BG_JSON_WRITER_MAX_DEPTH) or BG_ERR_INVALID (misuse, unclosed container). On
 * error the buffer is cut back to where the writer started, so no half-written JSON is ever sent.
 */
BG_MUSTCHECK int bg_json_write_finish(bg_json_writer_t *w);

void bg_json_write_begin_object(bg_json_writer_t *w);
void bg_json_write_end_object(bg_json_writer_t *w);
void bg_json_write_begin_array(bg_json_writer_t *w);
void bg_json_write_end_array(bg_json_writer_t *w);
/** Writes a member name; inside an object only, and only where a key is due. */
void bg_json_write_key(bg_json_writer_t *w, const char *key);
/** Writes a string value (NUL-terminated); NULL writes null. */
void bg_json_write_str(bg_json_writer_t *w, const char *s);
/** Writes a string value of len bytes (may hold NULs, escaped as \u0000). */
void bg_json_write_strn(bg_json_writer_t *w, const char *s, size_t len);
void bg_json_write_int(bg_json_writer_t *w, int64_t v);
/** Writes a number in its shortest round-trip form; NaN and infinities become null. */
void bg_json_write_double(bg_json_writer_t *w, double v);
void bg_json_write_bool(bg_json_writer_t *w, bool v);
void bg_json_write_null(bg_json_writer_t *w);
/** Writes a parsed value (and everything in it). */
void bg_json_write_value(bg_json_writer_t *w, const bg_json_t *v);

/** Key and value in one call, for the common case of building an object member. */
void bg_json_write_field_str(bg_json_writer_t *w, const char *key, const char *s);
void bg_json_write_field_int(bg_json_writer_t *w, const char *key, int64_t v);
void bg_json_write_field_bool(bg_json_writer_t *w, const char *key, bool v);
void bg_json_write_field_null(bg_json_writer_t *w, const char *key);

#endif
