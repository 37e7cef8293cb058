/*
 * Prompt definitions: their JSON form, validation, strict rendering into the OpenAI "messages"
 * array, and the memory policy that trims a conversation's history.
 *
 * A definition is what one row of prompt_versions stores (column `definition`, jsonb; see
 * migrations/0006_default_agent.sql). Its JSON schema, every unknown field refused:
 *
 *   {
 *     "system":    string, 1..100000 bytes, a template (required);
 *     "examples":  [ {"user": template, "assistant": template}, … ]  (0..32, optional);
 *     "user":      template that must contain {{message}} (optional, see below);
 *     "variables": [ {                                                (0..64, optional)
 *         "name":        [a-z_][a-z0-9_]{0,63}, unique, not "message" nor "builtin";
 *         "type":        "string" | "number" | "boolean" | "enum";
 *         "required"?:   boolean (default false);
 *         "default"?:    a value of the type (for an enum, one of values); not with required;
 *         "values"?:     [string, …] 1..64 distinct, 1..200 bytes each: for, and only for, enum;
 *         "description"?: string, ≤ 1000 bytes;
 *         "max_length"?: integer 1..100000, characters: for strings only
 *     }, … ]
 *   }
 *
 * Templates are text with placeholders "{{name}}" (spaces inside the braces are allowed:
 * "{{ name }}"). A placeholder names a declared variable, the reserved {{message}} (in "user"
 * only), or a built-in: {{builtin.user_name}}, {{builtin.locale}}, {{builtin.channel}},
 * {{builtin.date}} (UTC, YYYY-MM-DD). Validation refuses any other name, and a "{{" that does not
 * open a well-formed placeholder (so a typo such as "{{user name}}" is an error, not text that a
 * model would read literally). Nothing is escaped: the output is text for a model, not markup.
 *
 * How the user's new message enters: without a "user" template the message is the last user turn
 * as it is; with one, the template is rendered and each {{message}} is replaced by the message (a
 * "user" template without {{message}} is refused: the message would silently vanish).
 *
 * Rendering is strict, for a 422 that names the variable: a value for an undeclared variable, a
 * value of the wrong type, an enum value not in values, a string over max_length, or a missing
 * required variable is an error. A variable that is neither given nor required takes its default,
 * or renders as "" when it has none. null counts as "not given". Numbers render in their shortest
 * round-trip form ("3", "0.5"), booleans as "true"/"false".
 *
 * The rendered messages array is: the system message, each example as a user then an assistant
 * message, the conversation history the caller passes (oldest first, already trimmed by the memory
 * policy), then the user turn. Its JSON text is capped at BG_PROMPT_OUTPUT_MAX bytes
 * (BG_ERR_TOO_LARGE past it).
 *
 * Memory policy (agents.memory): {"last_turns": N} keeps the newest N turns, a turn starting at a
 * user message (0..1000); {"token_budget": T} keeps the newest messages whose estimated tokens add
 * up to at most T (1..10,000,000), a message costing ceil(bytes / 4) + 4. Either way what is kept
 * is a contiguous run ending at the newest message.
 *
 * A parsed definition (bg_prompt_t) is immutable and owns copies of its strings: it may be shared
 * between threads that only render.
 */
#ifndef BG_PROMPT_H
#define BG_PROMPT_H

#include "bg/buf.h"
#include "bg/common.h"
#include "bg/json.h"

#define BG_PROMPT_DEF_MAX (512 * 1024)      /**< bytes of a definition's JSON text */
#define BG_PROMPT_TEMPLATE_MAX 100000       /**< bytes of one template */
#define BG_PROMPT_EXAMPLES_MAX 32           /**< examples in a definition */
#define BG_PROMPT_VARS_MAX 64               /**< variables in a definition */
#define BG_PROMPT_NAME_MAX 64               /**< bytes of a variable name */
#define BG_PROMPT_ENUM_MAX 64               /**< values of an enum variable */
#define BG_PROMPT_ENUM_VALUE_MAX 200        /**< bytes of one enum value */
#define BG_PROMPT_DESCRIPTION_MAX 1000      /**< bytes of a variable's description */
#define BG_PROMPT_MAX_LENGTH_MAX 100000     /**< largest max_length of a string variable */
#define BG_PROMPT_OUTPUT_MAX (256 * 1024)   /**< bytes of a rendered messages array */
#define BG_PROMPT_LAST_TURNS_MAX 1000       /**< largest last_turns of a memory policy */
#define BG_PROMPT_TOKEN_BUDGET_MAX 10000000 /**< largest token_budget of a memory policy */

/** A validation or rendering error, for a 422 that names what is wrong. */
typedef struct bg_prompt_err {
    /**
     * What is wrong. For a definition, the JSON path of the field ("system", "examples[1].user",
     * "variables[0].type"); for rendering, the variable's name ("topic") or "history[3].role"; for
     * a memory policy, "memory" or its member.
     */
    char field[96];
    /** The placeholder at fault for a template error ("topic", "builtin.time"), else "". */
    char name[96];
    /** Static English text: "is required", "must be one of the declared values", … */
    const char *reason;
} bg_prompt_err_t;

typedef enum bg_prompt_type {
    BG_PROMPT_STRING = 1,
    BG_PROMPT_NUMBER,
    BG_PROMPT_BOOLEAN,
    BG_PROMPT_ENUM
} bg_prompt_type_t;

/** One declared variable (borrowed from its bg_prompt_t). */
typedef struct bg_prompt_var {
    const char *name;
    bg_prompt_type_t type;
    bool required;
    bool has_default;
    const char *default_text;  /**< the default as it renders ("" without one) */
    bool default_bool;         /**< for a boolean default */
    double default_number;     /**< for a number default */
    const char *const *values; /**< enum values (nvalues of them), else NULL */
    size_t nvalues;
    const char *description; /**< "" when none */
    int64_t max_length;      /**< characters for strings; 0 = no limit */
} bg_prompt_var_t;

/** A parsed, valid definition (opaque; immutable once made). */
typedef struct bg_prompt bg_prompt_t;

/**
 * Parses and validates a definition from len bytes of JSON text. Returns 0 with *out owned by the
 * caller (bg_prompt_free), or sets *out to NULL and returns BG_ERR_INVALID (err says which field
 * and why; field "definition" when the text is no JSON object), BG_ERR_TOO_LARGE (text, a template
 * or a list over its cap; err names it) or BG_ERR_DEPTH. err may be NULL.
 */
BG_MUSTCHECK int bg_prompt_parse(const char *json, size_t len, bg_prompt_t **out,
                                 bg_prompt_err_t *err);

/** bg_prompt_parse() on an already parsed value (borrowed; nothing of it is kept). */
BG_MUSTCHECK int bg_prompt_from_json(const bg_json_t *def, bg_prompt_t **out, bg_prompt_err_t *err);

/** Frees a definition; accepts NULL. */
void bg_prompt_free(bg_prompt_t *p);

/** Returns the system template (borrowed). */
const char *bg_prompt_system(const bg_prompt_t *p);
/** Returns the user template (borrowed), or NULL when the definition has none. */
const char *bg_prompt_user(const bg_prompt_t *p);
/** Returns the number of examples. */
size_t bg_prompt_example_count(const bg_prompt_t *p);
/** Returns the number of declared variables. */
size_t bg_prompt_var_count(const bg_prompt_t *p);
/** Returns variable i (borrowed), or NULL when i is out of range. */
const bg_prompt_var_t *bg_prompt_var(const bg_prompt_t *p, size_t i);

/**
 * Writes the definition as canonical JSON (every field explicit, in the order of the schema) to w:
 * what is stored, and what the API shows. Errors stick in the writer (see json.h).
 */
void bg_prompt_write_json(const bg_prompt_t *p, bg_json_writer_t *w);

/**
 * Writes the object {name: default, …} of the variables that have a default (the legacy
 * prompt_versions.variables column) to w.
 */
void bg_prompt_write_defaults(const bg_prompt_t *p, bg_json_writer_t *w);

/** The values of the built-in placeholders; NULL members take the defaults noted. */
typedef struct bg_prompt_builtins {
    const char *user_name; /**< borrowed; NULL: "" */
    const char *locale;    /**< borrowed; NULL: the default locale (bg_i18n_default) */
    const char *channel;   /**< borrowed; "web", "telegram", "api"; NULL: "web" */
    const char *date;      /**< borrowed; "YYYY-MM-DD"; NULL: today in UTC */
} bg_prompt_builtins_t;

/** One message of a conversation's history. */
typedef struct bg_prompt_msg {
    const char *role;    /**< borrowed: "user", "assistant" or "system" */
    const char *content; /**< borrowed; content_len bytes, need not be NUL-terminated */
    size_t content_len;
} bg_prompt_msg_t;

/**
 * Renders p into the OpenAI messages array and appends its JSON text to out.
 *
 * vars (borrowed; may be NULL for "no values") is an object of variable values; b (may be NULL:
 * all defaults) gives the built-ins; history holds nhistory messages, oldest first; message
 * (message_len bytes; NULL is "") is the user's new message.
 *
 * Returns 0, or (out unchanged, err filled when not NULL):
 * - BG_ERR_INVALID: vars is no object; a value for an undeclared variable or for "message"
 *   (field = its name, "is not a declared variable" / "is reserved"), of the wrong type ("must be
 *   a string", …), not among an enum's values, over max_length; a required variable without a
 *   value ("is required"); a history message with another role (field "history[i].role");
 * - BG_ERR_TOO_LARGE: the messages array would exceed BG_PROMPT_OUTPUT_MAX bytes, or out's cap.
 */
BG_MUSTCHECK int bg_prompt_render(const bg_prompt_t *p, const bg_json_t *vars,
                                  const bg_prompt_builtins_t *b, const bg_prompt_msg_t *history,
                                  size_t nhistory, const char *message, size_t message_len,
                                  bg_buf_t *out, bg_prompt_err_t *err);

/** Kinds of memory policy. */
typedef enum bg_memory_kind { BG_MEMORY_LAST_TURNS = 1, BG_MEMORY_TOKEN_BUDGET } bg_memory_kind_t;

/** A memory policy: how much history a prompt carries. */
typedef struct bg_memory_policy {
    bg_memory_kind_t kind;
    int64_t limit; /**< turns or tokens */
} bg_memory_policy_t;

/**
 * Parses a memory policy object, {"last_turns": N} or {"token_budget": T} (exactly one member).
 * Returns 0 with *out set, or BG_ERR_INVALID with err naming the field ("memory" for a wrong shape,
 * "memory.last_turns" for a bad value, "memory.<key>" for an unknown member).
 */
BG_MUSTCHECK int bg_prompt_memory_parse(const bg_json_t *obj, bg_memory_policy_t *out,
                                        bg_prompt_err_t *err);

/** bg_prompt_memory_parse() on len bytes of JSON text. */
BG_MUSTCHECK int bg_prompt_memory_parse_text(const char *json, size_t len, bg_memory_policy_t *out,
                                             bg_prompt_err_t *err);

/** Writes a memory policy as its JSON object to w. */
void bg_prompt_memory_write(const bg_memory_policy_t *pol, bg_json_writer_t *w);

/** Returns the estimated tokens of a message of bytes bytes: ceil(bytes / 4) + 4. */
size_t bg_prompt_estimate_tokens(size_t bytes);

/**
 * Returns how many of the newest messages of history (n of them, oldest first) the policy keeps:
 * the caller sends history[n - result .. n).
 */
size_t bg_prompt_memory_keep(const bg_memory_policy_t *pol, const bg_prompt_msg_t *history,
                             size_t n);

#endif
