/*
 * Error codes of the shared library and the one error body of the HTTP API.
 *
 * Internal functions return 0 or a negative bg_err_t. At the HTTP boundary an error becomes an API
 * error: a stable machine code ("quota_exceeded"), an HTTP status and a message key of the locale
 * catalogues. The table in err.c is the one place where these three are tied together, so the edge,
 * the workers and the tests agree on them.
 */
#ifndef BG_ERR_H
#define BG_ERR_H

#include "bg/common.h"

typedef enum bg_err {
    BG_OK = 0,
    BG_ERR_INVALID = -1,     /**< malformed input or argument */
    BG_ERR_TOO_LARGE = -2,   /**< a size cap was exceeded (→ 413) */
    BG_ERR_DEPTH = -3,       /**< nesting deeper than allowed */
    BG_ERR_IO = -4,          /**< an operating-system call failed */
    BG_ERR_TIMEOUT = -5,     /**< a deadline passed */
    BG_ERR_UNAVAILABLE = -6, /**< a dependency (Redis, Postgres, a provider) cannot answer */
    BG_ERR_NOT_FOUND = -7,
    BG_ERR_CONFLICT = -8,
    BG_ERR_PROTOCOL = -9, /**< a peer broke its protocol */
    BG_ERR_DENIED = -10,  /**< not allowed */
    BG_ERR_RETRY = -11,   /**< transient failure: try again later */
    BG_ERR_CLOSED = -12,  /**< the object is shutting down or closed */
    BG_ERR_NOSCRIPT = -13,
    BG_ERR_CHECKSUM = -14, /**< stored and expected checksums differ */
    BG_ERR_CONFIG = -15,
    BG_ERR__LAST = -16
} bg_err_t;

/** Returns a short static description of a bg_err_t (or "unknown error"). */
const char *bg_strerror(int err);

/** An error of the HTTP API: stable code, status, catalogue key of its message. */
typedef struct bg_api_error {
    const char *code;    /**< machine code in the error body, e.g. "quota_exceeded" */
    int status;          /**< HTTP status */
    const char *msg_key; /**< key in locales/<lang>.json */
} bg_api_error_t;

/**
 * Finds the API error with the given code. Returns NULL for an unknown code (a programmer error:
 * every code used must be in the table, which a unit test checks against the catalogues).
 */
const bg_api_error_t *bg_api_error_find(const char *code);

/** Returns the whole table of API errors and its length through *count. */
const bg_api_error_t *bg_api_error_table(size_t *count);

/** Maps an internal error to the API error code that fits it best ("internal" when none does). */
const char *bg_api_error_code_for(int err);

#endif
