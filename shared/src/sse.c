/*
 * Server-Sent Events parser and writer. See bg/sse.h for the contract.
 *
 * Design. Input is cut into lines as it arrives; a line that is whole inside one chunk is handled
 * straight from the caller's bytes, and only a line split across chunks is copied into p->line, so
 * the common case (an OpenAI chunk arriving in one read) copies each byte once, into the event's
 * data. A CR may be the first half of a CRLF whose LF comes in the next chunk: after_cr remembers
 * it so that the LF is not taken for a second (blank) line, which would dispatch an event early.
 * The BOM is matched byte by byte for the same reason: its three bytes may arrive in three chunks.
 */
#include <string.h>

#include "bg/err.h"
#include "bg/sse.h"

#define DEFAULT_MAX_LINE (256u * 1024u)
#define DEFAULT_MAX_DATA (1024u * 1024u)

static const unsigned char bom[3] = {0xEF, 0xBB, 0xBF};

void bg_sse_parser_init(bg_sse_parser_t *p, const bg_sse_limits_t *limits, bg_sse_event_cb cb,
                        void *ud)
{
    memset(p, 0, sizeof(*p));
    p->cb = cb;
    p->ud = ud;
    if (limits != NULL)
        p->limits = *limits;
    if (p->limits.max_line == 0)
        p->limits.max_line = DEFAULT_MAX_LINE;
    if (p->limits.max_data == 0)
        p->limits.max_data = DEFAULT_MAX_DATA;
    bg_buf_init(&p->line, p->limits.max_line);
    bg_buf_init(&p->data, p->limits.max_data);
    /* event and id come from one line each, so the line cap bounds them too */
    bg_buf_init(&p->event, p->limits.max_line);
    bg_buf_init(&p->id, p->limits.max_line);
    p->retry_ms = -1;
}

void bg_sse_parser_dispose(bg_sse_parser_t *p)
{
    bg_buf_dispose(&p->line);
    bg_buf_dispose(&p->data);
    bg_buf_dispose(&p->event);
    bg_buf_dispose(&p->id);
}

/* Dispatches the event being built (WHATWG "dispatch the event"); returns the callback's value. */
static int dispatch(bg_sse_parser_t *p)
{
    int rc = 0;
    if (p->has_data) {
        bg_sse_event_t ev = {
            .event = p->event.base != NULL ? p->event.base : "",
            .event_len = p->event.len,
            .data = p->data.base != NULL ? p->data.base : "",
            .data_len = p->data.len,
            .id = p->id.base != NULL ? p->id.base : "",
            .id_len = p->id.len,
            .retry_ms = p->retry_ms,
        };
        rc = p->cb(p->ud, &ev);
    }
    bg_buf_reset(&p->data);
    bg_buf_reset(&p->event);
    p->has_data = false;
    return rc;
}

static bool field_is(const char *name, size_t len, const char *want)
{
    return len == strlen(want) && memcmp(name, want, len) == 0;
}

/* Handles one complete line (terminator removed). Returns 0, BG_ERR_TOO_LARGE or the callback's
 * stop value. */
static int process_line(bg_sse_parser_t *p, const char *line, size_t len)
{
    if (len == 0)
        return dispatch(p);
    if (line[0] == ':')
        return 0;
    const char *colon = memchr(line, ':', len);
    size_t name_len = colon != NULL ? (size_t)(colon - line) : len;
    const char *value = colon != NULL ? colon + 1 : line + len;
    size_t value_len = (size_t)(line + len - value);
    if (value_len > 0 && value[0] == ' ') {
        value++;
        value_len--;
    }

    if (field_is(line, name_len, "data")) {
        /* data lines are joined with LF; the LF goes before every line but the first, which is
         * the same as WHATWG's "append LF to each, drop the last one" without a final trim */
        size_t need = value_len + (p->has_data ? 1 : 0);
        if (p->data.len + need > p->limits.max_data)
            return BG_ERR_TOO_LARGE;
        if (p->has_data && bg_buf_putc(&p->data, '\n') != 0)
            return BG_ERR_TOO_LARGE;
        if (bg_buf_append(&p->data, value, value_len) != 0)
            return BG_ERR_TOO_LARGE;
        p->has_data = true;
    } else if (field_is(line, name_len, "event")) {
        bg_buf_reset(&p->event);
        if (bg_buf_append(&p->event, value, value_len) != 0)
            return BG_ERR_TOO_LARGE;
    } else if (field_is(line, name_len, "id")) {
        if (memchr(value, '\0', value_len) == NULL) {
            bg_buf_reset(&p->id);
            if (bg_buf_append(&p->id, value, value_len) != 0)
                return BG_ERR_TOO_LARGE;
        }
    } else if (field_is(line, name_len, "retry")) {
        long ms = 0;
        bool ok = value_len > 0;
        for (size_t i = 0; ok && i < value_len; i++) {
            /* a value out of range is ignored like any other bad one */
            ok = value[i] >= '0' && value[i] <= '9' && ms <= (2147483647L - 9) / 10;
            if (ok)
                ms = ms * 10 + (value[i] - '0');
        }
        if (ok)
            p->retry_ms = ms;
    }
    return 0;
}

/* Feeds bytes that may no longer hold any part of a BOM. */
static int feed_lines(bg_sse_parser_t *p, const char *s, size_t len)
{
    size_t i = 0;
    if (p->after_cr && len > 0) {
        p->after_cr = false;
        if (s[0] == '\n')
            i = 1;
    }
    while (i < len) {
        size_t start = i;
        while (i < len && s[i] != '\n' && s[i] != '\r')
            i++;
        size_t seg = i - start;
        if (i == len) {
            /* no terminator in this chunk: keep the piece for the next one */
            if (p->line.len + seg > p->limits.max_line)
                return BG_ERR_TOO_LARGE;
            if (bg_buf_append(&p->line, s + start, seg) != 0)
                return BG_ERR_TOO_LARGE;
            break;
        }
        bool cr = s[i] == '\r';
        i++;
        if (cr) {
            if (i < len) {
                if (s[i] == '\n')
                    i++;
            } else {
                p->after_cr = true;
            }
        }
        int rc;
        if (p->line.len == 0) {
            if (seg > p->limits.max_line)
                return BG_ERR_TOO_LARGE;
            rc = process_line(p, s + start, seg);
        } else {
            if (p->line.len + seg > p->limits.max_line)
                return BG_ERR_TOO_LARGE;
            if (bg_buf_append(&p->line, s + start, seg) != 0)
                return BG_ERR_TOO_LARGE;
            rc = process_line(p, p->line.base, p->line.len);
            bg_buf_reset(&p->line);
        }
        if (rc != 0)
            return rc;
    }
    return 0;
}

int bg_sse_feed(bg_sse_parser_t *p, const char *bytes, size_t len)
{
    if (p->err != 0)
        return p->err;
    size_t i = 0;
    int rc = 0;
    while (!p->started && i < len) {
        if ((unsigned char)bytes[i] == bom[p->bom_seen]) {
            i++;
            if (++p->bom_seen == sizeof(bom))
                p->started = true;
            continue;
        }
        /* not a BOM after all: the bytes matched so far start the first line (they hold no line
         * end, so they go where the rest of a split line would) */
        p->started = true;
        if (p->bom_seen > p->limits.max_line || bg_buf_append(&p->line, bom, p->bom_seen) != 0)
            rc = BG_ERR_TOO_LARGE;
    }
    if (rc == 0 && i < len)
        rc = feed_lines(p, bytes + i, len - i);
    if (rc != 0)
        p->err = rc;
    return rc;
}

bool bg_sse_finish(bg_sse_parser_t *p)
{
    bool pending = p->line.len > 0 || p->has_data || p->event.len > 0;
    if (!p->started && p->bom_seen > 0 && p->bom_seen < sizeof(bom))
        pending = true;
    bg_buf_reset(&p->line);
    bg_buf_reset(&p->data);
    bg_buf_reset(&p->event);
    p->has_data = false;
    return pending;
}

/* Cuts out back to len after a failed write, so no partial record is ever left in it. */
static int rewind_to(bg_buf_t *out, size_t len, int err)
{
    out->len = len;
    if (out->base != NULL)
        out->base[len] = '\0';
    return err;
}

static bool has_line_break(const char *s)
{
    return strpbrk(s, "\r\n") != NULL;
}

int bg_sse_write_event(bg_buf_t *out, const char *event, const char *id, const char *data,
                       size_t len)
{
    size_t start = out->len;
    if ((event != NULL && has_line_break(event)) || (id != NULL && has_line_break(id)))
        return BG_ERR_INVALID;
    int rc = 0;
    if (event != NULL)
        rc = bg_buf_printf(out, "event: %s\n", event);
    if (rc == 0 && id != NULL)
        rc = bg_buf_printf(out, "id: %s\n", id);
    size_t i = 0;
    do {
        size_t s = i;
        while (i < len && data[i] != '\n' && data[i] != '\r')
            i++;
        if (rc == 0)
            rc = bg_buf_puts(out, "data: ");
        if (rc == 0)
            rc = bg_buf_append(out, data + s, i - s);
        if (rc == 0)
            rc = bg_buf_putc(out, '\n');
        if (i < len) {
            /* one line break: CRLF counts once */
            if (data[i] == '\r' && i + 1 < len && data[i + 1] == '\n')
                i++;
            i++;
            if (i == len && rc == 0) {
                /* a trailing break ends with an empty line, which the reader must get back */
                rc = bg_buf_puts(out, "data: \n");
            }
        }
    } while (rc == 0 && i < len);
    if (rc == 0)
        rc = bg_buf_putc(out, '\n');
    return rc == 0 ? 0 : rewind_to(out, start, rc);
}

int bg_sse_write_comment(bg_buf_t *out, const char *text)
{
    if (has_line_break(text))
        return BG_ERR_INVALID;
    size_t start = out->len;
    int rc = bg_buf_printf(out, ": %s\n", text);
    return rc == 0 ? 0 : rewind_to(out, start, rc);
}

int bg_sse_write_retry(bg_buf_t *out, uint32_t ms)
{
    size_t start = out->len;
    int rc = bg_buf_printf(out, "retry: %u\n\n", (unsigned)ms);
    return rc == 0 ? 0 : rewind_to(out, start, rc);
}
