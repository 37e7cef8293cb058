/*
 * Error descriptions and the table of API errors.
 *
 * The API error table is the contract between the edge (which turns failures into responses), the
 * locale catalogues (which hold the messages) and the tests (which check that every code has a
 * message in every shipped locale). Codes are stable: clients match on them.
 */
#include <string.h>

#include "bg/err.h"

const char *bg_strerror(int err)
{
    switch ((bg_err_t)err) {
    case BG_OK:
        return "success";
    case BG_ERR_INVALID:
        return "invalid input";
    case BG_ERR_TOO_LARGE:
        return "too large";
    case BG_ERR_DEPTH:
        return "nested too deeply";
    case BG_ERR_IO:
        return "input/output error";
    case BG_ERR_TIMEOUT:
        return "timed out";
    case BG_ERR_UNAVAILABLE:
        return "dependency unavailable";
    case BG_ERR_NOT_FOUND:
        return "not found";
    case BG_ERR_CONFLICT:
        return "conflict";
    case BG_ERR_PROTOCOL:
        return "protocol error";
    case BG_ERR_DENIED:
        return "denied";
    case BG_ERR_RETRY:
        return "temporary failure";
    case BG_ERR_CLOSED:
        return "closed";
    case BG_ERR_NOSCRIPT:
        return "script not loaded";
    case BG_ERR_CHECKSUM:
        return "checksum mismatch";
    case BG_ERR_CONFIG:
        return "configuration error";
    case BG_ERR__LAST:
        break;
    }
    return "unknown error";
}

static const bg_api_error_t api_errors[] = {
    {"malformed_json", 400, "error.malformed_json"},
    {"bad_request", 400, "error.bad_request"},
    {"invalid_request", 400, "error.invalid_request"},
    {"unauthorized", 401, "error.unauthorized"},
    {"invalid_credentials", 401, "error.invalid_credentials"},
    {"invalid_signature", 401, "error.invalid_signature"},
    {"account_disabled", 403, "error.account_disabled"},
    {"csrf_failed", 403, "error.csrf_failed"},
    {"origin_not_allowed", 403, "error.origin_not_allowed"},
    {"email_taken", 409, "error.email_taken"},
    {"forbidden", 403, "error.forbidden"},
    {"feature_not_in_plan", 403, "error.feature_not_in_plan"},
    {"not_found", 404, "error.not_found"},
    {"method_not_allowed", 405, "error.method_not_allowed"},
    {"conflict", 409, "error.conflict"},
    {"payload_too_large", 413, "error.payload_too_large"},
    {"unsupported_media_type", 415, "error.unsupported_media_type"},
    {"validation_failed", 422, "error.validation_failed"},
    {"plan_not_purchasable", 422, "error.plan_not_purchasable"},
    {"rate_limited", 429, "error.rate_limited"},
    {"quota_exceeded", 429, "error.quota_exceeded"},
    {"payment_required", 402, "error.payment_required"},
    {"service_unavailable", 503, "error.service_unavailable"},
    {"billing_unavailable", 503, "error.billing_unavailable"},
    {"shutting_down", 503, "error.shutting_down"},
    {"timeout", 504, "error.timeout"},
    {"internal", 500, "error.internal"},
};

const bg_api_error_t *bg_api_error_find(const char *code)
{
    for (size_t i = 0; i < BG_ARRAY_SIZE(api_errors); i++) {
        if (strcmp(api_errors[i].code, code) == 0)
            return &api_errors[i];
    }
    return NULL;
}

const bg_api_error_t *bg_api_error_table(size_t *count)
{
    *count = BG_ARRAY_SIZE(api_errors);
    return api_errors;
}

const char *bg_api_error_code_for(int err)
{
    switch ((bg_err_t)err) {
    case BG_ERR_INVALID:
        return "bad_request";
    case BG_ERR_TOO_LARGE:
        return "payload_too_large";
    case BG_ERR_DEPTH:
        return "malformed_json";
    case BG_ERR_NOT_FOUND:
        return "not_found";
    case BG_ERR_CONFLICT:
        return "conflict";
    case BG_ERR_DENIED:
        return "forbidden";
    case BG_ERR_UNAVAILABLE:
    case BG_ERR_RETRY:
    case BG_ERR_CLOSED:
        return "service_unavailable";
    case BG_ERR_TIMEOUT:
        return "timeout";
    default:
        return "internal";
    }
}
