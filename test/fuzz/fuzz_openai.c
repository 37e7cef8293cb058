/*
 * libFuzzer target for the OpenAI-compatible request parser (edge/openai.c), which faces API
 * clients directly.
 *
 * A request that parses must hold what the job relies on: a non-empty model, at least one and at
 * most EDGE_OAI_MESSAGES_MAX messages written as a JSON array that parses again, each with a known
 * role and a string content, and parameters inside their documented bounds. A refusal must name a
 * reason and own nothing. Any breach aborts, which libFuzzer reports as a crash; ASan and UBSan
 * catch the rest.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bg/json.h"
#include "openai.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_messages(const edge_oai_request_t *r)
{
    bg_json_doc_t *doc = NULL;
    const char *desc;
    size_t off;
    if (bg_json_parse(r->messages.base, r->messages.len, NULL, &doc, &desc, &off) != 0)
        abort();
    const bg_json_t *root = bg_json_root(doc);
    if (!bg_json_is_array(root) || bg_json_len(root) != r->nmessages || r->nmessages == 0 ||
        r->nmessages > EDGE_OAI_MESSAGES_MAX)
        abort();
    for (size_t i = 0; i < r->nmessages; i++) {
        const bg_json_t *m = bg_json_at(root, i);
        size_t len = 0;
        const char *role = bg_json_str(bg_json_find(m, "role"), &len);
        const char *content = bg_json_str(bg_json_find(m, "content"), &len);
        if (role == NULL || content == NULL || bg_json_len(m) != 2)
            abort();
        if (strcmp(role, "system") != 0 && strcmp(role, "developer") != 0 &&
            strcmp(role, "user") != 0 && strcmp(role, "assistant") != 0)
            abort();
    }
    bg_json_doc_free(doc);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    edge_oai_request_t r;
    edge_oai_error_t e;
    if (edge_oai_parse_request((const char *)data, size, &r, &e) != 0) {
        if (e.reason == NULL || r.messages.base != NULL)
            abort();
        return 0;
    }
    if (r.model[0] == '\0' || strlen(r.model) >= sizeof(r.model))
        abort();
    if (r.max_tokens < 0 || r.max_tokens > EDGE_OAI_MAX_TOKENS)
        abort();
    if (r.temperature > 2 || (r.temperature < 0 && r.temperature != -1))
        abort();
    if (r.include_usage && !r.stream)
        abort();
    check_messages(&r);
    edge_oai_request_dispose(&r);
    return 0;
}
