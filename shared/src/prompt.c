/*
 * Prompt definitions. See bg/prompt.h for the JSON schema and the rules of rendering.
 *
 * A definition is validated once, when it is parsed, and every template is checked there against
 * the declared variables: rendering can then trust that each placeholder it meets resolves, and its
 * only failures are about the values a caller passed (and the size cap). Templates are kept as
 * text and scanned again at render time by the same scanner that validated them, so the two can
 * never disagree about what a placeholder is.
 *
 * Rendering resolves every variable to text first (the value given, its default or ""), then
 * expands the templates into a scratch buffer and writes the messages array with the JSON writer
 * into a buffer of its own capped at BG_PROMPT_OUTPUT_MAX. Only a complete array is appended to
 * the caller's buffer, so a failure never leaves half a prompt behind.
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/err.h"
#include "bg/i18n.h"
#include "bg/prompt.h"
#include "bg/timeutil.h"

/* Longest placeholder name: "builtin." plus a variable name. */
#define PH_NAME_MAX (BG_PROMPT_NAME_MAX + 16)
/* Room for a number in its shortest round-trip text. */
#define NUM_TEXT_SIZE 40

typedef struct st_example {
    char *user;      /**< owned */
    char *assistant; /**< owned */
} st_example_t;

typedef struct st_var {
    bg_prompt_var_t pub; /**< its pointers point at the owned members below */
    char *name;
    char *default_text;
    char *description;
    char **values; /**< owned array of owned strings */
} st_var_t;

struct bg_prompt {
    char *system; /**< owned */
    char *user;   /**< owned; NULL when the definition has none */
    st_example_t *examples;
    size_t nexamples;
    st_var_t *vars;
    size_t nvars;
};

static const char *const builtin_names[] = {"builtin.user_name", "builtin.locale",
                                            "builtin.channel", "builtin.date"};
enum { BI_USER_NAME, BI_LOCALE, BI_CHANNEL, BI_DATE, BI_COUNT };

static const char *const type_names[] = {"", "string", "number", "boolean", "enum"};

/* ---- errors ---- */

/* Fills err (when not NULL) with a field formatted from fmt and a reason; returns rc. */
static int ferr(bg_prompt_err_t *err, int rc, const char *reason, const char *fmt, ...)
    BG_PRINTF(4, 5);

static int ferr(bg_prompt_err_t *err, int rc, const char *reason, const char *fmt, ...)
{
    if (err != NULL) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(err->field, sizeof(err->field), fmt, ap);
        va_end(ap);
        if (n < 0)
            err->field[0] = '\0';
        err->name[0] = '\0';
        err->reason = reason;
    }
    return rc;
}

static void set_name(bg_prompt_err_t *err, const char *name, size_t len)
{
    if (err == NULL)
        return;
    if (len >= sizeof(err->name))
        len = sizeof(err->name) - 1;
    memcpy(err->name, name, len);
    err->name[len] = '\0';
}

/* ---- placeholders ---- */

static bool is_name_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
           c == '.';
}

static bool is_blank(char c)
{
    return c == ' ' || c == '\t';
}

typedef struct st_ph {
    size_t start;     /**< offset of "{{" */
    size_t end;       /**< offset just past "}}" */
    const char *name; /**< borrowed from the template */
    size_t name_len;
} st_ph_t;

/*
 * Finds the first placeholder of t[pos..len). Returns 1 with *ph filled, 0 when there is none, or
 * -1 when a "{{" opens no well-formed placeholder (ph->start is where).
 */
static int next_placeholder(const char *t, size_t len, size_t pos, st_ph_t *ph)
{
    if (pos >= len)
        return 0;
    const char *open = memmem(t + pos, len - pos, "{{", 2);
    if (open == NULL)
        return 0;
    size_t i = (size_t)(open - t);
    ph->start = i;
    i += 2;
    while (i < len && is_blank(t[i]))
        i++;
    size_t name_start = i;
    while (i < len && is_name_char(t[i]))
        i++;
    size_t name_len = i - name_start;
    while (i < len && is_blank(t[i]))
        i++;
    if (name_len == 0 || name_len > PH_NAME_MAX || len - i < 2 || t[i] != '}' || t[i + 1] != '}')
        return -1;
    ph->name = t + name_start;
    ph->name_len = name_len;
    ph->end = i + 2;
    return 1;
}

static bool name_is(const char *name, size_t len, const char *s)
{
    return strlen(s) == len && memcmp(name, s, len) == 0;
}

static int builtin_index(const char *name, size_t len)
{
    for (int i = 0; i < BI_COUNT; i++) {
        if (name_is(name, len, builtin_names[i]))
            return i;
    }
    return -1;
}

static const st_var_t *find_var(const bg_prompt_t *p, const char *name, size_t len)
{
    for (size_t i = 0; i < p->nvars; i++) {
        if (name_is(name, len, p->vars[i].name))
            return &p->vars[i];
    }
    return NULL;
}

/*
 * Checks every placeholder of template t (field names it in errors) against p's variables.
 * allow_message: {{message}} may appear (the user template). Sets *has_message when it does.
 */
static int check_template(const bg_prompt_t *p, const char *t, size_t len, bool allow_message,
                          bool *has_message, bg_prompt_err_t *err, const char *field)
{
    size_t pos = 0;
    st_ph_t ph;
    int r;
    while ((r = next_placeholder(t, len, pos, &ph)) != 0) {
        if (r < 0)
            return ferr(err, BG_ERR_INVALID,
                        "has a \"{{\" that does not open a placeholder such as {{name}}", "%s",
                        field);
        if (name_is(ph.name, ph.name_len, "message")) {
            if (!allow_message) {
                ferr(err, BG_ERR_INVALID, "may not use {{message}}: only the user template can",
                     "%s", field);
                set_name(err, ph.name, ph.name_len);
                return BG_ERR_INVALID;
            }
            if (has_message != NULL)
                *has_message = true;
        } else if (builtin_index(ph.name, ph.name_len) < 0 &&
                   find_var(p, ph.name, ph.name_len) == NULL) {
            ferr(err, BG_ERR_INVALID,
                 "uses a placeholder that is neither a declared variable nor "
                 "a built-in",
                 "%s", field);
            set_name(err, ph.name, ph.name_len);
            return BG_ERR_INVALID;
        }
        pos = ph.end;
    }
    return 0;
}

/* ---- parsing ---- */

/* A variable name: [a-z_][a-z0-9_]{0,63}. */
static bool var_name_ok(const char *s, size_t len)
{
    if (len == 0 || len > BG_PROMPT_NAME_MAX || (s[0] >= '0' && s[0] <= '9'))
        return false;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'))
            return false;
    }
    return true;
}

static size_t utf8_chars(const char *s, size_t len)
{
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        if (((unsigned char)s[i] & 0xC0) != 0x80)
            n++;
    }
    return n;
}

/* Writes the shortest text of d that reads back as d ("3", "0.1", "1e+300"). */
static void number_text(double d, char out[NUM_TEXT_SIZE])
{
    if (d >= -9007199254740992.0 && d <= 9007199254740992.0 && d == (double)(int64_t)d) {
        (void)snprintf(out, NUM_TEXT_SIZE, "%" PRId64, (int64_t)d);
        return;
    }
    for (int prec = 1; prec <= 17; prec++) {
        (void)snprintf(out, NUM_TEXT_SIZE, "%.*g", prec, d);
        if (strtod(out, NULL) == d)
            return;
    }
}

/* A template member key of obj (path names it): required or not; *out borrowed or NULL. */
static int get_template(const bg_json_t *obj, const char *key, bool required, const char **out,
                        size_t *len, bg_prompt_err_t *err, const char *path)
{
    int rc = bg_json_get_strn(obj, key, out, len);
    if (rc == BG_ERR_NOT_FOUND) {
        *out = NULL;
        *len = 0;
        if (required)
            return ferr(err, BG_ERR_INVALID, "is required", "%s", path);
        return 0;
    }
    if (rc != 0)
        return ferr(err, BG_ERR_INVALID, "must be a string", "%s", path);
    if (*len == 0)
        return ferr(err, BG_ERR_INVALID, "must not be empty", "%s", path);
    if (*len > BG_PROMPT_TEMPLATE_MAX)
        return ferr(err, BG_ERR_TOO_LARGE, "is longer than 100000 bytes", "%s", path);
    return 0;
}

static int check_fields(const bg_json_t *obj, const char *const allowed[], bg_prompt_err_t *err,
                        const char *prefix)
{
    const char *unknown = NULL;
    if (bg_json_check_fields(obj, allowed, &unknown) != 0)
        return ferr(err, BG_ERR_INVALID, "is not a known field", "%s%s", prefix,
                    unknown != NULL ? unknown : "");
    return 0;
}

/* Checks a value v against variable var (type, enum values, max_length); field names it. */
static int check_value(const st_var_t *var, const bg_json_t *v, bg_prompt_err_t *err,
                       const char *field)
{
    const bg_prompt_var_t *pv = &var->pub;
    switch (pv->type) {
    case BG_PROMPT_STRING: {
        size_t len;
        const char *s = bg_json_str(v, &len);
        if (s == NULL)
            return ferr(err, BG_ERR_INVALID, "must be a string", "%s", field);
        if (pv->max_length > 0 && utf8_chars(s, len) > (size_t)pv->max_length)
            return ferr(err, BG_ERR_INVALID, "is longer than the variable's max_length", "%s",
                        field);
        return 0;
    }
    case BG_PROMPT_NUMBER: {
        double d;
        if (!bg_json_double(v, &d))
            return ferr(err, BG_ERR_INVALID, "must be a number", "%s", field);
        return 0;
    }
    case BG_PROMPT_BOOLEAN: {
        bool b;
        if (!bg_json_bool(v, &b))
            return ferr(err, BG_ERR_INVALID, "must be a boolean", "%s", field);
        return 0;
    }
    case BG_PROMPT_ENUM: {
        size_t len;
        const char *s = bg_json_str(v, &len);
        if (s == NULL)
            return ferr(err, BG_ERR_INVALID, "must be a string", "%s", field);
        for (size_t i = 0; i < pv->nvalues; i++) {
            if (name_is(s, len, pv->values[i]))
                return 0;
        }
        return ferr(err, BG_ERR_INVALID, "must be one of the declared values", "%s", field);
    }
    }
    return ferr(err, BG_ERR_INVALID, "has an unknown type", "%s", field);
}

/* Parses variables[i] (obj) into var; earlier variables are p->vars[0..i). */
static int parse_var(bg_prompt_t *p, size_t i, const bg_json_t *obj, st_var_t *var,
                     bg_prompt_err_t *err)
{
    static const char *const fields[] = {"name",   "type",        "required",   "default",
                                         "values", "description", "max_length", NULL};
    char prefix[32];
    (void)snprintf(prefix, sizeof(prefix), "variables[%zu].", i);
    if (!bg_json_is_object(obj))
        return ferr(err, BG_ERR_INVALID, "must be an object", "variables[%zu]", i);
    int rc = check_fields(obj, fields, err, prefix);
    if (rc != 0)
        return rc;

    const char *name;
    size_t name_len;
    rc = bg_json_get_strn(obj, "name", &name, &name_len);
    if (rc == BG_ERR_NOT_FOUND)
        return ferr(err, BG_ERR_INVALID, "is required", "%sname", prefix);
    if (rc != 0 || !var_name_ok(name, name_len))
        return ferr(err, BG_ERR_INVALID, "must match [a-z_][a-z0-9_]{0,63}", "%sname", prefix);
    if (strcmp(name, "message") == 0 || strcmp(name, "builtin") == 0)
        return ferr(err, BG_ERR_INVALID, "is reserved", "%sname", prefix);
    if (find_var(p, name, name_len) != NULL)
        return ferr(err, BG_ERR_INVALID, "is declared twice", "%sname", prefix);

    const char *type;
    rc = bg_json_get_str(obj, "type", &type);
    if (rc == BG_ERR_NOT_FOUND)
        return ferr(err, BG_ERR_INVALID, "is required", "%stype", prefix);
    bg_prompt_type_t t = 0;
    for (size_t k = 1; rc == 0 && k < BG_ARRAY_SIZE(type_names); k++) {
        if (strcmp(type, type_names[k]) == 0)
            t = (bg_prompt_type_t)k;
    }
    if (t == 0)
        return ferr(err, BG_ERR_INVALID, "must be string, number, boolean or enum", "%stype",
                    prefix);

    bool required = false;
    rc = bg_json_get_bool(obj, "required", &required);
    if (rc != 0 && rc != BG_ERR_NOT_FOUND)
        return ferr(err, BG_ERR_INVALID, "must be a boolean", "%srequired", prefix);

    const char *desc = "";
    rc = bg_json_get_str(obj, "description", &desc);
    if (rc == BG_ERR_NOT_FOUND)
        desc = "";
    else if (rc != 0)
        return ferr(err, BG_ERR_INVALID, "must be a string", "%sdescription", prefix);
    if (strlen(desc) > BG_PROMPT_DESCRIPTION_MAX)
        return ferr(err, BG_ERR_INVALID, "is longer than 1000 bytes", "%sdescription", prefix);

    int64_t max_length = 0;
    rc = bg_json_get_int(obj, "max_length", &max_length);
    if (rc == 0 && t != BG_PROMPT_STRING)
        return ferr(err, BG_ERR_INVALID, "is for string variables only", "%smax_length", prefix);
    if (rc == BG_ERR_NOT_FOUND)
        max_length = 0;
    else if (rc != 0 || max_length < 1 || max_length > BG_PROMPT_MAX_LENGTH_MAX)
        return ferr(err, BG_ERR_INVALID, "must be an integer from 1 to 100000", "%smax_length",
                    prefix);

    const bg_json_t *values = bg_json_find(obj, "values");
    if (values != NULL && bg_json_type(values) == BG_JSON_NULL)
        values = NULL;
    if (t == BG_PROMPT_ENUM && values == NULL)
        return ferr(err, BG_ERR_INVALID, "is required for an enum", "%svalues", prefix);
    if (t != BG_PROMPT_ENUM && values != NULL)
        return ferr(err, BG_ERR_INVALID, "is for enum variables only", "%svalues", prefix);

    var->name = bg_strndup(name, name_len);
    var->description = bg_strdup(desc);
    var->pub.name = var->name;
    var->pub.description = var->description;
    var->pub.type = t;
    var->pub.required = required;
    var->pub.max_length = max_length;

    if (values != NULL) {
        size_t n = bg_json_len(values);
        if (!bg_json_is_array(values) || n == 0 || n > BG_PROMPT_ENUM_MAX)
            return ferr(err, BG_ERR_INVALID, "must be an array of 1 to 64 strings", "%svalues",
                        prefix);
        var->values = bg_calloc(n, sizeof(*var->values));
        var->pub.values = (const char *const *)var->values;
        for (size_t k = 0; k < n; k++) {
            size_t len;
            const char *s = bg_json_str(bg_json_at(values, k), &len);
            if (s == NULL || len == 0 || len > BG_PROMPT_ENUM_VALUE_MAX)
                return ferr(err, BG_ERR_INVALID, "must be a string of 1 to 200 bytes",
                            "%svalues[%zu]", prefix, k);
            for (size_t j = 0; j < k; j++) {
                if (name_is(s, len, var->values[j]))
                    return ferr(err, BG_ERR_INVALID, "is listed twice", "%svalues[%zu]", prefix, k);
            }
            var->values[k] = bg_strndup(s, len);
            var->pub.nvalues = k + 1;
        }
    }

    const bg_json_t *def = bg_json_find(obj, "default");
    if (def != NULL && bg_json_type(def) != BG_JSON_NULL) {
        char field[48];
        (void)snprintf(field, sizeof(field), "%sdefault", prefix);
        if (required)
            return ferr(err, BG_ERR_INVALID, "is not allowed for a required variable", "%s", field);
        rc = check_value(var, def, err, field);
        if (rc != 0)
            return rc;
        var->pub.has_default = true;
        if (t == BG_PROMPT_STRING || t == BG_PROMPT_ENUM) {
            size_t len;
            const char *s = bg_json_str(def, &len);
            if (len > BG_PROMPT_TEMPLATE_MAX)
                return ferr(err, BG_ERR_TOO_LARGE, "is longer than 100000 bytes", "%s", field);
            var->default_text = bg_strndup(s, len);
        } else if (t == BG_PROMPT_NUMBER) {
            char num[NUM_TEXT_SIZE];
            (void)bg_json_double(def, &var->pub.default_number);
            number_text(var->pub.default_number, num);
            var->default_text = bg_strdup(num);
        } else {
            (void)bg_json_bool(def, &var->pub.default_bool);
            var->default_text = bg_strdup(var->pub.default_bool ? "true" : "false");
        }
    } else {
        var->default_text = bg_strdup("");
    }
    var->pub.default_text = var->default_text;
    return 0;
}

static int parse_def(bg_prompt_t *p, const bg_json_t *def, bg_prompt_err_t *err)
{
    static const char *const fields[] = {"system", "examples", "user", "variables", NULL};
    if (!bg_json_is_object(def))
        return ferr(err, BG_ERR_INVALID, "must be a JSON object", "definition");
    int rc = check_fields(def, fields, err, "");
    if (rc != 0)
        return rc;

    /* Variables first: the templates are checked against them. */
    const bg_json_t *vars = bg_json_find(def, "variables");
    if (vars != NULL && bg_json_type(vars) != BG_JSON_NULL) {
        size_t n = bg_json_len(vars);
        if (!bg_json_is_array(vars))
            return ferr(err, BG_ERR_INVALID, "must be an array", "variables");
        if (n > BG_PROMPT_VARS_MAX)
            return ferr(err, BG_ERR_TOO_LARGE, "holds more than 64 variables", "variables");
        p->vars = bg_calloc(n > 0 ? n : 1, sizeof(*p->vars));
        for (size_t i = 0; i < n; i++) {
            /*
             * find_var() must not see the variable being parsed (its name is not set yet), but
             * bg_prompt_free must free what a failed parse left in it: count it only afterwards.
             */
            p->nvars = i;
            rc = parse_var(p, i, bg_json_at(vars, i), &p->vars[i], err);
            p->nvars = i + 1;
            if (rc != 0)
                return rc;
        }
    }

    const char *s;
    size_t len;
    rc = get_template(def, "system", true, &s, &len, err, "system");
    if (rc != 0)
        return rc;
    rc = check_template(p, s, len, false, NULL, err, "system");
    if (rc != 0)
        return rc;
    p->system = bg_strndup(s, len);

    rc = get_template(def, "user", false, &s, &len, err, "user");
    if (rc != 0)
        return rc;
    if (s != NULL) {
        bool has_message = false;
        rc = check_template(p, s, len, true, &has_message, err, "user");
        if (rc != 0)
            return rc;
        if (!has_message)
            return ferr(err, BG_ERR_INVALID,
                        "must contain {{message}}, where the user's message "
                        "goes",
                        "user");
        p->user = bg_strndup(s, len);
    }

    const bg_json_t *ex = bg_json_find(def, "examples");
    if (ex != NULL && bg_json_type(ex) != BG_JSON_NULL) {
        static const char *const ex_fields[] = {"user", "assistant", NULL};
        size_t n = bg_json_len(ex);
        if (!bg_json_is_array(ex))
            return ferr(err, BG_ERR_INVALID, "must be an array", "examples");
        if (n > BG_PROMPT_EXAMPLES_MAX)
            return ferr(err, BG_ERR_TOO_LARGE, "holds more than 32 examples", "examples");
        p->examples = bg_calloc(n > 0 ? n : 1, sizeof(*p->examples));
        for (size_t i = 0; i < n; i++) {
            const bg_json_t *e = bg_json_at(ex, i);
            char prefix[32], path[48];
            (void)snprintf(prefix, sizeof(prefix), "examples[%zu].", i);
            if (!bg_json_is_object(e))
                return ferr(err, BG_ERR_INVALID, "must be an object", "examples[%zu]", i);
            rc = check_fields(e, ex_fields, err, prefix);
            if (rc != 0)
                return rc;
            p->nexamples = i + 1;
            for (int k = 0; k < 2; k++) {
                const char *key = k == 0 ? "user" : "assistant";
                (void)snprintf(path, sizeof(path), "%s%s", prefix, key);
                rc = get_template(e, key, true, &s, &len, err, path);
                if (rc == 0)
                    rc = check_template(p, s, len, false, NULL, err, path);
                if (rc != 0)
                    return rc;
                if (k == 0)
                    p->examples[i].user = bg_strndup(s, len);
                else
                    p->examples[i].assistant = bg_strndup(s, len);
            }
        }
    }
    return 0;
}

int bg_prompt_from_json(const bg_json_t *def, bg_prompt_t **out, bg_prompt_err_t *err)
{
    bg_prompt_t *p = bg_calloc(1, sizeof(*p));
    int rc = parse_def(p, def, err);
    if (rc != 0) {
        bg_prompt_free(p);
        p = NULL;
    }
    *out = p;
    return rc;
}

int bg_prompt_parse(const char *json, size_t len, bg_prompt_t **out, bg_prompt_err_t *err)
{
    bg_json_limits_t lim = bg_json_default_limits;
    lim.max_bytes = BG_PROMPT_DEF_MAX;
    lim.max_depth = 8;
    bg_json_doc_t *doc;
    const char *desc = NULL;
    *out = NULL;
    int rc = bg_json_parse(json, len, &lim, &doc, &desc, NULL);
    if (rc != 0)
        return ferr(err, rc, desc != NULL ? desc : "is not valid JSON", "definition");
    rc = bg_prompt_from_json(bg_json_root(doc), out, err);
    bg_json_doc_free(doc);
    return rc;
}

void bg_prompt_free(bg_prompt_t *p)
{
    if (p == NULL)
        return;
    free(p->system);
    free(p->user);
    for (size_t i = 0; i < p->nexamples; i++) {
        free(p->examples[i].user);
        free(p->examples[i].assistant);
    }
    free(p->examples);
    for (size_t i = 0; i < p->nvars; i++) {
        st_var_t *v = &p->vars[i];
        free(v->name);
        free(v->default_text);
        free(v->description);
        for (size_t k = 0; k < v->pub.nvalues; k++)
            free(v->values[k]);
        free(v->values);
    }
    free(p->vars);
    free(p);
}

const char *bg_prompt_system(const bg_prompt_t *p)
{
    return p->system;
}

const char *bg_prompt_user(const bg_prompt_t *p)
{
    return p->user;
}

size_t bg_prompt_example_count(const bg_prompt_t *p)
{
    return p->nexamples;
}

size_t bg_prompt_var_count(const bg_prompt_t *p)
{
    return p->nvars;
}

const bg_prompt_var_t *bg_prompt_var(const bg_prompt_t *p, size_t i)
{
    return i < p->nvars ? &p->vars[i].pub : NULL;
}

static void write_default(const bg_prompt_var_t *v, bg_json_writer_t *w)
{
    if (v->type == BG_PROMPT_NUMBER)
        bg_json_write_double(w, v->default_number);
    else if (v->type == BG_PROMPT_BOOLEAN)
        bg_json_write_bool(w, v->default_bool);
    else
        bg_json_write_str(w, v->default_text);
}

void bg_prompt_write_json(const bg_prompt_t *p, bg_json_writer_t *w)
{
    bg_json_write_begin_object(w);
    bg_json_write_field_str(w, "system", p->system);
    bg_json_write_key(w, "examples");
    bg_json_write_begin_array(w);
    for (size_t i = 0; i < p->nexamples; i++) {
        bg_json_write_begin_object(w);
        bg_json_write_field_str(w, "user", p->examples[i].user);
        bg_json_write_field_str(w, "assistant", p->examples[i].assistant);
        bg_json_write_end_object(w);
    }
    bg_json_write_end_array(w);
    if (p->user != NULL)
        bg_json_write_field_str(w, "user", p->user);
    bg_json_write_key(w, "variables");
    bg_json_write_begin_array(w);
    for (size_t i = 0; i < p->nvars; i++) {
        const bg_prompt_var_t *v = &p->vars[i].pub;
        bg_json_write_begin_object(w);
        bg_json_write_field_str(w, "name", v->name);
        bg_json_write_field_str(w, "type", type_names[v->type]);
        bg_json_write_field_bool(w, "required", v->required);
        if (v->has_default) {
            bg_json_write_key(w, "default");
            write_default(v, w);
        }
        if (v->type == BG_PROMPT_ENUM) {
            bg_json_write_key(w, "values");
            bg_json_write_begin_array(w);
            for (size_t k = 0; k < v->nvalues; k++)
                bg_json_write_str(w, v->values[k]);
            bg_json_write_end_array(w);
        }
        bg_json_write_field_str(w, "description", v->description);
        if (v->max_length > 0)
            bg_json_write_field_int(w, "max_length", v->max_length);
        bg_json_write_end_object(w);
    }
    bg_json_write_end_array(w);
    bg_json_write_end_object(w);
}

void bg_prompt_write_defaults(const bg_prompt_t *p, bg_json_writer_t *w)
{
    bg_json_write_begin_object(w);
    for (size_t i = 0; i < p->nvars; i++) {
        const bg_prompt_var_t *v = &p->vars[i].pub;
        if (!v->has_default)
            continue;
        bg_json_write_key(w, v->name);
        write_default(v, w);
    }
    bg_json_write_end_object(w);
}

/* ---- rendering ---- */

/* The text each placeholder resolves to. */
typedef struct st_text {
    const char *s; /**< borrowed (from the values, the definition or num) */
    size_t len;
    char num[NUM_TEXT_SIZE];
} st_text_t;

typedef struct st_values {
    st_text_t *vars; /**< one per declared variable; owned */
    st_text_t builtins[BI_COUNT];
    const char *message; /**< borrowed */
    size_t message_len;
} st_values_t;

static void text_set(st_text_t *t, const char *s)
{
    t->s = s;
    t->len = strlen(s);
}

/* Resolves every variable of p from vars (may be NULL) into v->vars. */
static int resolve_vars(const bg_prompt_t *p, const bg_json_t *vars, st_values_t *v,
                        bg_prompt_err_t *err)
{
    bool *given = bg_calloc(p->nvars > 0 ? p->nvars : 1, sizeof(*given));
    int rc = 0;
    if (vars != NULL && !bg_json_is_object(vars)) {
        rc = ferr(err, BG_ERR_INVALID, "must be an object", "variables");
        goto out_free_given;
    }
    for (size_t i = 0; i < bg_json_len(vars); i++) {
        const char *key;
        const bg_json_t *val = bg_json_member(vars, i, &key);
        if (strcmp(key, "message") == 0) {
            rc = ferr(err, BG_ERR_INVALID, "is reserved: the user's message is passed on its own",
                      "%s", key);
            goto out_free_given;
        }
        const st_var_t *var = find_var(p, key, strlen(key));
        if (var == NULL) {
            rc = ferr(err, BG_ERR_INVALID, "is not a declared variable", "%s", key);
            goto out_free_given;
        }
        if (bg_json_type(val) == BG_JSON_NULL)
            continue;
        rc = check_value(var, val, err, key);
        if (rc != 0)
            goto out_free_given;
        size_t idx = (size_t)(var - p->vars);
        st_text_t *t = &v->vars[idx];
        given[idx] = true;
        switch (var->pub.type) {
        case BG_PROMPT_STRING:
        case BG_PROMPT_ENUM:
            t->s = bg_json_str(val, &t->len);
            break;
        case BG_PROMPT_NUMBER: {
            double d = 0;
            (void)bg_json_double(val, &d);
            number_text(d, t->num);
            text_set(t, t->num);
            break;
        }
        case BG_PROMPT_BOOLEAN: {
            bool b = false;
            (void)bg_json_bool(val, &b);
            text_set(t, b ? "true" : "false");
            break;
        }
        }
    }
    for (size_t i = 0; i < p->nvars; i++) {
        if (given[i])
            continue;
        if (p->vars[i].pub.required) {
            rc = ferr(err, BG_ERR_INVALID, "is required", "%s", p->vars[i].name);
            goto out_free_given;
        }
        text_set(&v->vars[i], p->vars[i].default_text);
    }
out_free_given:
    free(given);
    return rc;
}

/* Expands template t into out (emptied first). */
static int expand(const bg_prompt_t *p, const char *t, const st_values_t *v, bg_buf_t *out)
{
    bg_buf_reset(out);
    size_t len = strlen(t), pos = 0;
    st_ph_t ph;
    int rc;
    /* The definition was validated: every placeholder is well-formed and resolves. */
    while (next_placeholder(t, len, pos, &ph) > 0) {
        rc = bg_buf_append(out, t + pos, ph.start - pos);
        if (rc != 0)
            return rc;
        const char *s = "";
        size_t n = 0;
        int bi = builtin_index(ph.name, ph.name_len);
        if (bi >= 0) {
            s = v->builtins[bi].s;
            n = v->builtins[bi].len;
        } else if (name_is(ph.name, ph.name_len, "message")) {
            s = v->message;
            n = v->message_len;
        } else {
            const st_var_t *var = find_var(p, ph.name, ph.name_len);
            if (var != NULL) {
                s = v->vars[var - p->vars].s;
                n = v->vars[var - p->vars].len;
            }
        }
        rc = bg_buf_append(out, s, n);
        if (rc != 0)
            return rc;
        pos = ph.end;
    }
    return bg_buf_append(out, t + pos, len - pos);
}

/* Writes {"role": role, "content": template t expanded} with w, using scratch. */
static int write_rendered(bg_json_writer_t *w, const char *role, const bg_prompt_t *p,
                          const char *t, const st_values_t *v, bg_buf_t *scratch)
{
    int rc = expand(p, t, v, scratch);
    if (rc != 0)
        return rc;
    bg_json_write_begin_object(w);
    bg_json_write_field_str(w, "role", role);
    bg_json_write_key(w, "content");
    bg_json_write_strn(w, scratch->base != NULL ? scratch->base : "", scratch->len);
    bg_json_write_end_object(w);
    return w->err;
}

static bool history_role_ok(const char *role)
{
    return role != NULL && (strcmp(role, "user") == 0 || strcmp(role, "assistant") == 0 ||
                            strcmp(role, "system") == 0);
}

int bg_prompt_render(const bg_prompt_t *p, const bg_json_t *vars, const bg_prompt_builtins_t *b,
                     const bg_prompt_msg_t *history, size_t nhistory, const char *message,
                     size_t message_len, bg_buf_t *out, bg_prompt_err_t *err)
{
    for (size_t i = 0; i < nhistory; i++) {
        if (!history_role_ok(history[i].role))
            return ferr(err, BG_ERR_INVALID, "must be user, assistant or system",
                        "history[%zu].role", i);
    }

    st_values_t v;
    memset(&v, 0, sizeof(v));
    v.vars = bg_calloc(p->nvars > 0 ? p->nvars : 1, sizeof(*v.vars));
    v.message = message != NULL ? message : "";
    v.message_len = message != NULL ? message_len : 0;
    bg_prompt_builtins_t none = {0};
    if (b == NULL)
        b = &none;
    text_set(&v.builtins[BI_USER_NAME], b->user_name != NULL ? b->user_name : "");
    text_set(&v.builtins[BI_LOCALE], b->locale != NULL ? b->locale : bg_i18n_default());
    text_set(&v.builtins[BI_CHANNEL], b->channel != NULL ? b->channel : "web");
    char date[BG_RFC3339_BUFSIZE] = "";
    if (b->date != NULL) {
        text_set(&v.builtins[BI_DATE], b->date);
    } else {
        if (bg_timeutil_format_rfc3339(date, sizeof(date), bg_timeutil_wall_ms(), false) == 0)
            date[10] = '\0'; /* "YYYY-MM-DD" of "YYYY-MM-DDTHH:MM:SSZ" */
        text_set(&v.builtins[BI_DATE], date);
    }

    int rc = resolve_vars(p, vars, &v, err);
    if (rc != 0)
        goto out_free_values;

    bg_buf_t scratch, msgs;
    bg_buf_init(&scratch, BG_PROMPT_OUTPUT_MAX);
    bg_buf_init(&msgs, BG_PROMPT_OUTPUT_MAX);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &msgs);
    bg_json_write_begin_array(&w);
    rc = write_rendered(&w, "system", p, p->system, &v, &scratch);
    for (size_t i = 0; rc == 0 && i < p->nexamples; i++) {
        rc = write_rendered(&w, "user", p, p->examples[i].user, &v, &scratch);
        if (rc == 0)
            rc = write_rendered(&w, "assistant", p, p->examples[i].assistant, &v, &scratch);
    }
    for (size_t i = 0; rc == 0 && i < nhistory; i++) {
        bg_json_write_begin_object(&w);
        bg_json_write_field_str(&w, "role", history[i].role);
        bg_json_write_key(&w, "content");
        bg_json_write_strn(&w, history[i].content != NULL ? history[i].content : "",
                           history[i].content != NULL ? history[i].content_len : 0);
        bg_json_write_end_object(&w);
        rc = w.err;
    }
    if (rc == 0 && p->user != NULL) {
        rc = write_rendered(&w, "user", p, p->user, &v, &scratch);
    } else if (rc == 0) {
        bg_json_write_begin_object(&w);
        bg_json_write_field_str(&w, "role", "user");
        bg_json_write_key(&w, "content");
        bg_json_write_strn(&w, v.message, v.message_len);
        bg_json_write_end_object(&w);
    }
    bg_json_write_end_array(&w);
    int frc = bg_json_write_finish(&w);
    if (rc == 0)
        rc = frc;
    if (rc == 0)
        rc = bg_buf_append(out, msgs.base, msgs.len);
    if (rc == BG_ERR_TOO_LARGE)
        ferr(err, rc, "the rendered prompt is larger than the cap", "messages");
    else if (rc != 0)
        ferr(err, rc, "could not be written", "messages");
    bg_buf_dispose(&msgs);
    bg_buf_dispose(&scratch);
out_free_values:
    free(v.vars);
    return rc;
}

/* ---- memory policy ---- */

int bg_prompt_memory_parse(const bg_json_t *obj, bg_memory_policy_t *out, bg_prompt_err_t *err)
{
    if (!bg_json_is_object(obj) || bg_json_len(obj) != 1)
        return ferr(err, BG_ERR_INVALID,
                    "must be an object with one member, last_turns or token_budget", "memory");
    const char *key;
    const bg_json_t *v = bg_json_member(obj, 0, &key);
    int64_t n;
    if (strcmp(key, "last_turns") == 0) {
        if (!bg_json_int(v, &n) || n < 0 || n > BG_PROMPT_LAST_TURNS_MAX)
            return ferr(err, BG_ERR_INVALID, "must be an integer from 0 to 1000",
                        "memory.last_turns");
        out->kind = BG_MEMORY_LAST_TURNS;
    } else if (strcmp(key, "token_budget") == 0) {
        if (!bg_json_int(v, &n) || n < 1 || n > BG_PROMPT_TOKEN_BUDGET_MAX)
            return ferr(err, BG_ERR_INVALID, "must be an integer from 1 to 10000000",
                        "memory.token_budget");
        out->kind = BG_MEMORY_TOKEN_BUDGET;
    } else {
        return ferr(err, BG_ERR_INVALID, "is not a memory policy: use last_turns or token_budget",
                    "memory.%.64s", key);
    }
    out->limit = n;
    return 0;
}

int bg_prompt_memory_parse_text(const char *json, size_t len, bg_memory_policy_t *out,
                                bg_prompt_err_t *err)
{
    bg_json_limits_t lim = bg_json_default_limits;
    lim.max_bytes = 4096;
    lim.max_depth = 2;
    bg_json_doc_t *doc;
    const char *desc = NULL;
    int rc = bg_json_parse(json, len, &lim, &doc, &desc, NULL);
    if (rc != 0)
        return ferr(err, BG_ERR_INVALID, desc != NULL ? desc : "is not valid JSON", "memory");
    rc = bg_prompt_memory_parse(bg_json_root(doc), out, err);
    bg_json_doc_free(doc);
    return rc;
}

void bg_prompt_memory_write(const bg_memory_policy_t *pol, bg_json_writer_t *w)
{
    bg_json_write_begin_object(w);
    bg_json_write_field_int(w, pol->kind == BG_MEMORY_TOKEN_BUDGET ? "token_budget" : "last_turns",
                            pol->limit);
    bg_json_write_end_object(w);
}

size_t bg_prompt_estimate_tokens(size_t bytes)
{
    return bytes / 4 + (bytes % 4 != 0) + 4;
}

size_t bg_prompt_memory_keep(const bg_memory_policy_t *pol, const bg_prompt_msg_t *history,
                             size_t n)
{
    if (pol->limit <= 0)
        return 0;
    if (pol->kind == BG_MEMORY_LAST_TURNS) {
        /* A turn starts at a user message; replies after it belong to it. */
        int64_t turns = 0;
        for (size_t i = n; i > 0; i--) {
            const char *role = history[i - 1].role;
            if (role == NULL || strcmp(role, "user") != 0)
                continue;
            turns++;
            if (turns == pol->limit)
                return n - (i - 1);
        }
        return n;
    }
    size_t budget = (size_t)pol->limit, used = 0;
    for (size_t i = n; i > 0; i--) {
        size_t cost = bg_prompt_estimate_tokens(history[i - 1].content_len);
        if (cost > budget - used)
            return n - i;
        used += cost;
    }
    return n;
}
