/*
 * The SSE parser against a recorded OpenAI stream split at every byte, the three line ends, the
 * WHATWG field rules, its caps, and the writer read back by the parser.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "bg/err.h"
#include "bg/sse.h"

/* A recorded OpenAI stream (PROTOCOLS.md 3.3: first two and last four events, keep-alive added). */
static const char recorded[] =
    "data: "
    "{\"id\":\"chatcmpl-ABfw031mOJeYCSHe4yI2ZjOA6kMJL\",\"object\":\"chat.completion.chunk\","
    "\"created\":1727346168,\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_"
    "5050236cbd\","
    "\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null}"
    ","
    "\"logprobs\":null,\"finish_reason\":null}]}\n\n"
    ": keep-alive\n\n"
    "data: "
    "{\"id\":\"chatcmpl-ABfw031mOJeYCSHe4yI2ZjOA6kMJL\",\"object\":\"chat.completion.chunk\","
    "\"created\":1727346168,\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_"
    "5050236cbd\","
    "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"I'm\"},\"logprobs\":null,\"finish_reason\":"
    "null}]}\n\n"
    "data: "
    "{\"id\":\"chatcmpl-ABfw031mOJeYCSHe4yI2ZjOA6kMJL\",\"object\":\"chat.completion.chunk\","
    "\"created\":1727346168,\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_"
    "5050236cbd\","
    "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"é€😀.\"},\"logprobs\":null,"
    "\"finish_reason\":null}]}\n\n"
    "data: "
    "{\"id\":\"chatcmpl-ABfw031mOJeYCSHe4yI2ZjOA6kMJL\",\"object\":\"chat.completion.chunk\","
    "\"created\":1727346168,\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_"
    "5050236cbd\","
    "\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}]}\n\n"
    "data: "
    "{\"id\":\"chatcmpl-ABfw031mOJeYCSHe4yI2ZjOA6kMJL\",\"object\":\"chat.completion.chunk\","
    "\"created\":1727346168,\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_"
    "5050236cbd\","
    "\"choices\":[],\"usage\":{\"prompt_tokens\":14,\"completion_tokens\":30,\"total_tokens\":44,"
    "\"completion_tokens_details\":{\"reasoning_tokens\":0}}}\n\n"
    "data: [DONE]\n\n";

/* Events collected as "event|id|retry|data" lines, so a whole run compares as one string. */
typedef struct collected {
    char text[16384];
    size_t len;
    int count;
    int stop_at; /* return 7 from this event (1-based); 0: never */
} collected_t;

static int collect(void *ud, const bg_sse_event_t *ev)
{
    collected_t *c = ud;
    cr_assert_eq(strlen(ev->data), ev->data_len, "data is NUL-terminated at its length");
    int n = snprintf(c->text + c->len, sizeof(c->text) - c->len, "%s|%s|%ld|%s\n", ev->event,
                     ev->id, ev->retry_ms, ev->data);
    cr_assert(n > 0 && (size_t)n < sizeof(c->text) - c->len, "collector full");
    c->len += (size_t)n;
    c->count++;
    return c->count == c->stop_at ? 7 : 0;
}

/* Parses the whole input fed in pieces of the given sizes (cycled); returns the collected text. */
static void parse_split(const char *in, size_t len, const size_t *cuts, size_t ncuts,
                        collected_t *out, const bg_sse_limits_t *lim)
{
    memset(out, 0, sizeof(*out));
    bg_sse_parser_t p;
    bg_sse_parser_init(&p, lim, collect, out);
    size_t prev = 0;
    for (size_t i = 0; i <= ncuts; i++) {
        size_t at = i < ncuts ? cuts[i] : len;
        cr_assert_eq(bg_sse_feed(&p, in + prev, at - prev), 0);
        prev = at;
    }
    cr_assert_not(bg_sse_finish(&p), "nothing left pending");
    bg_sse_parser_dispose(&p);
}

static void parse_whole(const char *in, collected_t *out)
{
    parse_split(in, strlen(in), NULL, 0, out, NULL);
}

Test(sse, recorded_stream_gives_its_events)
{
    collected_t c;
    parse_whole(recorded, &c);
    cr_assert_eq(c.count, 6, "six events (the comment dispatches nothing), got %d", c.count);
    cr_assert(strstr(c.text, "\"content\":\"I'm\"") != NULL);
    cr_assert(strstr(c.text, "||-1|[DONE]\n") != NULL);
}

Test(sse, split_at_every_byte_gives_the_same_events)
{
    collected_t whole, part;
    parse_whole(recorded, &whole);
    size_t len = strlen(recorded);
    for (size_t i = 0; i <= len; i++) {
        size_t cut[1] = {i};
        parse_split(recorded, len, cut, 1, &part, NULL);
        cr_assert_str_eq(part.text, whole.text, "split at %zu", i);
        for (size_t j = i; j <= len; j += 97) {
            size_t cuts[2] = {i, j};
            parse_split(recorded, len, cuts, 2, &part, NULL);
            cr_assert_str_eq(part.text, whole.text, "split at %zu and %zu", i, j);
        }
    }
    /* one byte at a time: every CR/LF, every UTF-8 sequence, split */
    bg_sse_parser_t p;
    collected_t bytes;
    memset(&bytes, 0, sizeof(bytes));
    bg_sse_parser_init(&p, NULL, collect, &bytes);
    for (size_t i = 0; i < len; i++)
        cr_assert_eq(bg_sse_feed(&p, recorded + i, 1), 0);
    bg_sse_parser_dispose(&p);
    cr_assert_str_eq(bytes.text, whole.text);
}

/* Replaces each LF of in by eol. */
static void convert_eol(const char *in, const char *eol, char *out, size_t outlen)
{
    size_t o = 0, el = strlen(eol);
    for (const char *s = in; *s != '\0'; s++) {
        cr_assert(o + el + 1 < outlen);
        if (*s == '\n') {
            memcpy(out + o, eol, el);
            o += el;
        } else {
            out[o++] = *s;
        }
    }
    out[o] = '\0';
}

Test(sse, crlf_and_cr_line_ends_split_anywhere)
{
    static char conv[sizeof(recorded) * 2];
    collected_t whole, part;
    parse_whole(recorded, &whole);
    const char *eols[] = {"\r\n", "\r"};
    for (size_t e = 0; e < 2; e++) {
        convert_eol(recorded, eols[e], conv, sizeof(conv));
        size_t len = strlen(conv);
        for (size_t i = 0; i <= len; i++) {
            size_t cut[1] = {i};
            parse_split(conv, len, cut, 1, &part, NULL);
            cr_assert_str_eq(part.text, whole.text, "eol %zu split at %zu", e, i);
        }
    }
    /* a CR ending one chunk and an LF starting the next is one line end, not two */
    collected_t c;
    const char in[] = "data: a\r\ndata: b\r\n\r\n";
    size_t cut[1] = {8};
    parse_split(in, strlen(in), cut, 1, &c, NULL);
    cr_assert_str_eq(c.text, "||-1|a\nb\n");
    /* mixed ends in one stream */
    parse_whole("data: 1\rdata: 2\ndata: 3\r\n\ndata: 4\r\r", &c);
    cr_assert_str_eq(c.text, "||-1|1\n2\n3\n||-1|4\n");
}

Test(sse, multi_line_data_is_joined_with_lf)
{
    collected_t c;
    parse_whole("data: first\ndata:second\ndata\ndata:  spaced\n\n", &c);
    cr_assert_str_eq(c.text, "||-1|first\nsecond\n\n spaced\n");
    parse_whole("data\n\n", &c);
    cr_assert_eq(c.count, 1, "one empty data line dispatches an empty event");
    cr_assert_str_eq(c.text, "||-1|\n");
}

Test(sse, comments_fields_and_empty_events)
{
    collected_t c;
    parse_whole(": keep-alive\n\n:\n\nevent: ping\n\nid: 1\n\n", &c);
    cr_assert_eq(c.count, 0, "comments and events without data dispatch nothing");

    parse_whole("event: delta\nid: 7\nretry: 1500\ndata: x\n\ndata: y\n\n"
                "retry: soon\nid\nevent: done\nunknown: z\ndata: w\n\n",
                &c);
    cr_assert_str_eq(c.text, "delta|7|1500|x\n"
                             "|7|1500|y\n"      /* id persists; event type does not */
                             "done||1500|w\n"); /* a bad retry is ignored; an empty id resets */

    static const char nul_id[] = "id: 1\n\nid: x\0y\ndata: q\n\n";
    parse_split(nul_id, sizeof(nul_id) - 1, NULL, 0, &c, NULL);
    cr_assert_str_eq(c.text, "|1|-1|q\n", "an id holding a NUL is ignored");
}

Test(sse, bom_at_start_is_dropped_split_anywhere)
{
    static const char in[] = "\xEF\xBB\xBF"
                             "data: a\n\n\xEF\xBB\xBF"
                             "data: b\n\n";
    size_t len = strlen(in);
    for (size_t i = 0; i <= len; i++) {
        collected_t c;
        size_t cut[1] = {i};
        parse_split(in, len, cut, 1, &c, NULL);
        /* only the first BOM is dropped; the second makes an unknown field name */
        cr_assert_str_eq(c.text, "||-1|a\n", "split at %zu", i);
    }
    collected_t c;
    parse_whole("\xEF\xBB"
                "data: a\n\n",
                &c);
    cr_assert_eq(c.count, 0, "half a BOM is part of the first line");
}

Test(sse, line_and_data_caps)
{
    bg_sse_limits_t lim = {.max_line = 16, .max_data = 20};
    collected_t c;
    memset(&c, 0, sizeof(c));
    bg_sse_parser_t p;

    bg_sse_parser_init(&p, &lim, collect, &c);
    cr_assert_eq(bg_sse_feed(&p, BG_STRLIT("data: 0123456789\n\n")), 0, "16 bytes fit");
    cr_assert_eq(bg_sse_feed(&p, BG_STRLIT("data: 01234")), 0);
    cr_assert_eq(bg_sse_feed(&p, BG_STRLIT("567890")), BG_ERR_TOO_LARGE, "17 across chunks");
    cr_assert_eq(bg_sse_feed(&p, BG_STRLIT("\n\n")), BG_ERR_TOO_LARGE, "sticky");
    cr_assert_eq(c.count, 1);
    bg_sse_parser_dispose(&p);

    bg_sse_parser_init(&p, &lim, collect, &c);
    cr_assert_eq(bg_sse_feed(&p, BG_STRLIT("data: 0123456789\ndata: 012345678\n")), 0, "20 fit");
    bg_sse_parser_dispose(&p);
    bg_sse_parser_init(&p, &lim, collect, &c);
    cr_assert_eq(bg_sse_feed(&p, BG_STRLIT("data: 0123456789\ndata: 0123456789\n")),
                 BG_ERR_TOO_LARGE, "21 bytes of data");
    bg_sse_parser_dispose(&p);

    /* a comment line is a line too: a peer cannot stream an endless one */
    bg_sse_parser_init(&p, &lim, collect, &c);
    cr_assert_eq(bg_sse_feed(&p, BG_STRLIT(":0123456789012345")), BG_ERR_TOO_LARGE);
    bg_sse_parser_dispose(&p);
}

Test(sse, callback_stops_the_parser)
{
    collected_t c;
    memset(&c, 0, sizeof(c));
    c.stop_at = 2;
    bg_sse_parser_t p;
    bg_sse_parser_init(&p, NULL, collect, &c);
    cr_assert_eq(bg_sse_feed(&p, BG_STRLIT("data: 1\n\ndata: 2\n\ndata: 3\n\n")), 7);
    cr_assert_eq(bg_sse_feed(&p, BG_STRLIT("data: 4\n\n")), 7);
    cr_assert_eq(c.count, 2);
    bg_sse_parser_dispose(&p);
}

Test(sse, unfinished_event_is_discarded_and_reported)
{
    collected_t c;
    memset(&c, 0, sizeof(c));
    bg_sse_parser_t p;
    bg_sse_parser_init(&p, NULL, collect, &c);
    cr_assert_eq(bg_sse_feed(&p, BG_STRLIT("data: 1\n\ndata: 2\n")), 0);
    cr_assert(bg_sse_finish(&p), "an event without its blank line is pending");
    cr_assert_eq(c.count, 1);
    cr_assert_not(bg_sse_finish(&p));
    bg_sse_parser_dispose(&p);
}

Test(sse, writer_round_trips_through_the_parser)
{
    bg_buf_t b;
    bg_buf_init(&b, 4096);
    const char text[] = "line one\nline two\r\nthree\rfour\n";
    cr_assert_eq(bg_sse_write_event(&b, "delta", "42", text, strlen(text)), 0);
    cr_assert_eq(bg_sse_write_event(&b, NULL, NULL, "", 0), 0);
    cr_assert_eq(bg_sse_write_comment(&b, "keep-alive"), 0);
    cr_assert_eq(bg_sse_write_retry(&b, 2500), 0);
    cr_assert_eq(bg_sse_write_event(&b, NULL, NULL, " lead", 5), 0);
    cr_assert_str_eq(b.base, "event: delta\nid: 42\ndata: line one\ndata: line two\n"
                             "data: three\ndata: four\ndata: \n\n"
                             "data: \n\n"
                             ": keep-alive\n"
                             "retry: 2500\n\n"
                             "data:  lead\n\n");
    collected_t c;
    parse_whole(b.base, &c);
    cr_assert_str_eq(c.text, "delta|42|-1|line one\nline two\nthree\nfour\n\n"
                             "|42|-1|\n"
                             "|42|2500| lead\n");

    size_t before = b.len;
    cr_assert_eq(bg_sse_write_event(&b, "bad\nname", NULL, "x", 1), BG_ERR_INVALID);
    cr_assert_eq(bg_sse_write_event(&b, NULL, "1\r2", "x", 1), BG_ERR_INVALID);
    cr_assert_eq(bg_sse_write_comment(&b, "two\nlines"), BG_ERR_INVALID);
    cr_assert_eq(b.len, before);
    bg_buf_dispose(&b);

    /* past the cap nothing half-written is left behind */
    bg_buf_init(&b, 24);
    cr_assert_eq(bg_sse_write_event(&b, NULL, NULL, "short", 5), 0);
    before = b.len;
    cr_assert_eq(bg_sse_write_event(&b, NULL, NULL, "a\nb\nc\nd", 7), BG_ERR_TOO_LARGE);
    cr_assert_eq(b.len, before);
    cr_assert_str_eq(b.base, "data: short\n\n");
    bg_buf_dispose(&b);
}
