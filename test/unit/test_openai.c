/*
 * The OpenAI-compatible wire formats without a server (edge/openai.c): what a client's request
 * becomes, which requests are refused and with which parameter named, and the exact shapes of
 * chunks, completions and errors that OpenAI's clients parse (../shared/PROTOCOLS.md §3).
 */
#include <criterion/criterion.h>
#include <string.h>

#include "bg/err.h"
#include "bg/json.h"
#include "openai.h"

static int parse(const char *body, edge_oai_request_t *r, edge_oai_error_t *e)
{
    return edge_oai_parse_request(body, strlen(body), r, e);
}

Test(openai, a_request_becomes_plain_messages_and_parameters)
{
    edge_oai_request_t r;
    edge_oai_error_t e;
    const char *body =
        "{\"model\":\"assistant\",\"messages\":[{\"role\":\"system\",\"content\":\"S\"},"
        "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},{\"type\":\"text\","
        "\"text\":\"b\"}],\"name\":\"x\"},{\"role\":\"assistant\",\"content\":null,\"refusal\":"
        "null},{\"role\":\"user\",\"content\":\"\\u00e9\"}],\"stream\":true,\"stream_options\":"
        "{\"include_usage\":true},\"max_tokens\":5,\"temperature\":0.5,\"user\":\"me\","
        "\"stop\":[\"x\"],\"seed\":1,\"tool_choice\":\"none\",\"tools\":[]}";
    cr_assert_eq(parse(body, &r, &e), 0, "%s %s", e.param, e.reason);
    cr_expect_str_eq(r.model, "assistant");
    cr_expect(r.stream);
    cr_expect(r.include_usage);
    cr_expect_eq(r.max_tokens, 5);
    cr_expect_float_eq(r.temperature, 0.5, 1e-9);
    cr_expect_str_eq(r.user, "me");
    cr_expect_eq(r.nmessages, 4);
    cr_expect_eq(r.messages.len, strlen("[{\"role\":\"system\",\"content\":\"S\"},"
                                        "{\"role\":\"user\",\"content\":\"a\\nb\"},"
                                        "{\"role\":\"assistant\",\"content\":\"\"},"
                                        "{\"role\":\"user\",\"content\":\"é\"}]"));
    cr_expect(memcmp(r.messages.base,
                     "[{\"role\":\"system\",\"content\":\"S\"},{\"role\":\"user\",\"content\":"
                     "\"a\\nb\"},{\"role\":\"assistant\",\"content\":\"\"},{\"role\":\"user\","
                     "\"content\":\"é\"}]",
                     r.messages.len) == 0,
              "%.*s", (int)r.messages.len, r.messages.base);
    edge_oai_request_dispose(&r);

    cr_assert_eq(parse("{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                       "\"max_tokens\":5,\"max_completion_tokens\":7,\"temperature\":null}",
                       &r, &e),
                 0);
    cr_expect_eq(r.max_tokens, 7, "max_completion_tokens wins");
    cr_expect_lt(r.temperature, 0, "null is not given");
    cr_expect_not(r.stream);
    edge_oai_request_dispose(&r);
}

Test(openai, refusals_name_the_parameter_and_the_problem)
{
    static const struct {
        const char *body;
        const char *param;
        const char *reason;
    } cases[] = {
        {"[]", "", "wrong_type"},
        {"{\"model\":1,\"messages\":[]}", "model", "wrong_type"},
        {"{\"model\":\"\",\"messages\":[]}", "model", "missing"},
        {"{\"model\":\"m\"}", "messages", "missing"},
        {"{\"model\":\"m\",\"messages\":{}}", "messages", "wrong_type"},
        {"{\"model\":\"m\",\"messages\":[]}", "messages", "too_short"},
        {"{\"model\":\"m\",\"messages\":[1]}", "messages[0]", "wrong_type"},
        {"{\"model\":\"m\",\"messages\":[{\"content\":\"x\"}]}", "messages[0].role", "missing"},
        {"{\"model\":\"m\",\"messages\":[{\"role\":\"tool\",\"content\":\"x\"}]}",
         "messages[0].role", "unsupported"},
        {"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":null}]}",
         "messages[0].content", "missing"},
        {"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\"}]}]}",
         "messages[0].content[0]", "missing"},
        {"{\"model\":\"m\",\"messages\":[{\"role\":\"assistant\",\"content\":\"x\",\"tool_calls\":"
         "[{\"id\":\"1\"}]}]}",
         "messages[0].tool_calls", "unsupported"},
        {"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"stream\":"
         "\"yes\"}",
         "stream", "wrong_type"},
        {"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"stream\":true,"
         "\"stream_options\":{\"nope\":1}}",
         "stream_options.nope", "unknown_field"},
        {"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
         "\"max_completion_tokens\":1.5}",
         "max_completion_tokens", "wrong_type"},
        {"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
         "\"temperature\":-0.1}",
         "temperature", "out_of_range"},
        {"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
         "\"response_format\":{\"type\":\"json_object\"}}",
         "response_format", "unsupported"},
        {"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
         "\"logprobs\":true}",
         "logprobs", "unsupported"},
        {"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"user\":5}",
         "user", "wrong_type"},
        {"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"xyz\":5}", "xyz",
         "unknown_field"},
        {"{\"model\":\"m\",", "", "malformed_json"},
    };
    for (size_t i = 0; i < BG_ARRAY_SIZE(cases); i++) {
        edge_oai_request_t r;
        edge_oai_error_t e;
        cr_expect_neq(parse(cases[i].body, &r, &e), 0, "%s", cases[i].body);
        cr_expect_str_eq(e.param, cases[i].param, "%s", cases[i].body);
        cr_expect_str_eq(e.reason, cases[i].reason, "%s", cases[i].body);
        cr_expect_eq(r.messages.base, NULL, "nothing owned after a refusal");
    }
}

Test(openai, chunks_have_the_shape_openai_clients_parse)
{
    edge_oai_reply_t r;
    edge_oai_reply_init(&r, "0190a0b0-c0d0-7e00-8f00-0123456789ab", "assistant", 1727346168);
    cr_expect_str_eq(r.id, "chatcmpl-0190a0b0c0d07e008f000123456789ab");
    bg_buf_t out;
    bg_buf_init(&out, 65536);
    cr_assert_eq(edge_oai_write_chunk(&out, &r, true, "Hi \"x\"", 6, NULL), 0);
    cr_assert_eq(edge_oai_write_chunk(&out, &r, false, NULL, 0, "stop"), 0);
    cr_assert_eq(edge_oai_write_usage_chunk(&out, &r, 14, 30), 0);
    cr_assert_eq(bg_buf_putc(&out, '\0'), 0);
    cr_expect_str_eq(
        out.base,
        "data: {\"id\":\"chatcmpl-0190a0b0c0d07e008f000123456789ab\",\"object\":"
        "\"chat.completion.chunk\",\"created\":1727346168,\"model\":\"assistant\",\"choices\":"
        "[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi \\\"x\\\"\"},"
        "\"logprobs\":null,\"finish_reason\":null}]}\n\n"
        "data: {\"id\":\"chatcmpl-0190a0b0c0d07e008f000123456789ab\",\"object\":"
        "\"chat.completion.chunk\",\"created\":1727346168,\"model\":\"assistant\",\"choices\":"
        "[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}]}\n\n"
        "data: {\"id\":\"chatcmpl-0190a0b0c0d07e008f000123456789ab\",\"object\":"
        "\"chat.completion.chunk\",\"created\":1727346168,\"model\":\"assistant\",\"choices\":[],"
        "\"usage\":{\"prompt_tokens\":14,\"completion_tokens\":30,\"total_tokens\":44}}\n\n");
    bg_buf_dispose(&out);
}

Test(openai, a_completion_and_an_error_body)
{
    edge_oai_reply_t r;
    edge_oai_reply_init(&r, "abc", "m", 1);
    bg_buf_t out;
    bg_buf_init(&out, 65536);
    cr_assert_eq(edge_oai_write_completion(&out, &r, "ok", 2, "length", 3, 4), 0);
    cr_assert_eq(bg_buf_putc(&out, '\0'), 0);
    cr_expect_str_eq(out.base,
                     "{\"id\":\"chatcmpl-abc\",\"object\":\"chat.completion\",\"created\":1,"
                     "\"model\":\"m\",\"choices\":[{\"index\":0,\"message\":{\"role\":"
                     "\"assistant\",\"content\":\"ok\",\"refusal\":null},\"logprobs\":null,"
                     "\"finish_reason\":\"length\"}],\"usage\":{\"prompt_tokens\":3,"
                     "\"completion_tokens\":4,\"total_tokens\":7}}");
    bg_buf_reset(&out);
    cr_assert_eq(edge_oai_write_error(&out, "Nope", "invalid_request_error", NULL, "x"), 0);
    cr_assert_eq(bg_buf_putc(&out, '\0'), 0);
    cr_expect_str_eq(out.base, "{\"error\":{\"message\":\"Nope\",\"type\":"
                               "\"invalid_request_error\",\"param\":null,\"code\":\"x\"}}");
    bg_buf_dispose(&out);
}

Test(openai, our_codes_map_to_openais_statuses_and_retry_advice)
{
    edge_oai_error_map_t m = edge_oai_map_error("quota_exceeded");
    cr_expect_eq(m.status, 429);
    cr_expect_str_eq(m.type, "insufficient_quota");
    cr_expect(m.no_retry, "a spent quota is not retried");
    m = edge_oai_map_error("rate_limited");
    cr_expect_eq(m.status, 429);
    cr_expect_str_eq(m.code, "rate_limit_exceeded");
    cr_expect_not(m.no_retry);
    m = edge_oai_map_error("unauthorized");
    cr_expect_eq(m.status, 401);
    cr_expect_str_eq(m.code, "invalid_api_key");
    m = edge_oai_map_error("validation_failed");
    cr_expect_eq(m.status, 400, "OpenAI answers invalid parameters with 400");
    m = edge_oai_map_error("provider_error");
    cr_expect_eq(m.status, 502);
    m = edge_oai_map_error("something we never heard of");
    cr_expect_eq(m.status, 500);
    cr_expect_str_eq(m.type, "server_error");
}
