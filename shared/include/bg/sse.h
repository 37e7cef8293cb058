/*
 * Server-Sent Events: an incremental parser (WHATWG HTML "event stream interpretation") and a small
 * writer.
 *
 * The parser takes bytes in chunks split anywhere (inside a CRLF, inside a UTF-8 sequence, inside
 * the BOM) and calls back once per dispatched event. It follows the WHATWG rules: lines end with
 * LF, CR or CRLF; a line starting with ':' is a comment; "field: value" loses one leading space of
 * its value; a line without ':' is a field with an empty value; data lines are joined with LF; a
 * blank line dispatches the event unless no data line was seen; "id" persists across events (and
 * is ignored when it holds a NUL); "retry" is taken only when it is all ASCII digits; unknown
 * fields are ignored; one UTF-8 BOM at the very start is dropped. Bytes are passed through as they
 * are: the parser does not check UTF-8, the consumer decides what data means.
 *
 * A peer controls every size here, so a line and an event's data have caps; past either, feeding
 * fails with BG_ERR_TOO_LARGE and the parser stays failed.
 */
#ifndef BG_SSE_H
#define BG_SSE_H

#include "bg/buf.h"
#include "bg/common.h"

/** Limits of one parser; a zero field takes the default. */
typedef struct bg_sse_limits {
    size_t max_line; /**< bytes of one line, terminator excluded (default 256 KiB) */
    size_t max_data; /**< bytes of one event's data, joining LFs included (default 1 MiB) */
} bg_sse_limits_t;

/** One dispatched event. Every pointer is borrowed from the parser and valid during the callback
 * only; each string is NUL-terminated as well as measured. */
typedef struct bg_sse_event {
    const char *event; /**< the "event" field, or "" when none was given (WHATWG: "message") */
    size_t event_len;
    const char *data; /**< data lines joined with LF (no trailing LF) */
    size_t data_len;
    const char *id; /**< the last event id seen on this stream, "" when none */
    size_t id_len;
    long retry_ms; /**< the last valid "retry" value seen on this stream, -1 when none */
} bg_sse_event_t;

/**
 * Called once per dispatched event. Return 0 to go on; any other value stops the parser:
 * bg_sse_feed() returns that value at once, and every later feed returns it again.
 */
typedef int (*bg_sse_event_cb)(void *ud, const bg_sse_event_t *ev);

typedef struct bg_sse_parser {
    bg_sse_event_cb cb;
    void *ud; /**< borrowed, handed to cb */
    bg_sse_limits_t limits;
    bg_buf_t line;  /**< a line split across chunks */
    bg_buf_t data;  /**< data of the event being built */
    bg_buf_t event; /**< event type of the event being built */
    bg_buf_t id;    /**< last event id (persists across events) */
    long retry_ms;
    int err;           /**< sticky: BG_ERR_TOO_LARGE or the callback's stop value */
    unsigned bom_seen; /**< bytes of a leading BOM matched so far */
    bool started;      /**< past the point where a BOM could be */
    bool after_cr;     /**< the last byte fed was CR: an LF right after it ends nothing */
    bool has_data;     /**< a data field was seen in the event being built */
} bg_sse_parser_t;

/** Initialises a parser calling cb(ud, …) per event, under limits (NULL: the defaults). */
void bg_sse_parser_init(bg_sse_parser_t *p, const bg_sse_limits_t *limits, bg_sse_event_cb cb,
                        void *ud);
/** Frees what the parser holds; it may be initialised again. */
void bg_sse_parser_dispose(bg_sse_parser_t *p);

/**
 * Feeds len bytes (any split of the stream). Calls cb for every event completed by them, in order.
 * Returns 0; BG_ERR_TOO_LARGE when a line or an event's data passes its cap; or the non-zero value
 * a callback returned. After a non-zero return the parser is spent: every later call returns the
 * same value without looking at its input.
 */
BG_MUSTCHECK int bg_sse_feed(bg_sse_parser_t *p, const char *bytes, size_t len);

/**
 * Ends the stream. Per WHATWG an event not closed by a blank line is discarded, so this dispatches
 * nothing; it returns true when such an unfinished event (or line) was pending, which a consumer of
 * a stream that must end cleanly may treat as truncation.
 */
bool bg_sse_finish(bg_sse_parser_t *p);

/*
 * Writer. Each function appends whole records to out and returns 0, or leaves out exactly as it was
 * and returns BG_ERR_TOO_LARGE (out's cap) or BG_ERR_INVALID (a name or id that cannot be written).
 */

/**
 * Appends one event: "event: <event>\n" when event is not NULL, "id: <id>\n" when id is not NULL,
 * one "data: <line>\n" per line of data (split on LF, CRLF or CR, so the reader gets the same text
 * back with LF line ends), then the blank line. event and id must not hold CR or LF, and id no NUL
 * (BG_ERR_INVALID). len 0 writes one empty data line, which a reader dispatches as an empty event.
 */
BG_MUSTCHECK int bg_sse_write_event(bg_buf_t *out, const char *event, const char *id,
                                    const char *data, size_t len);

/** Appends a comment line ": <text>\n" (a keep-alive); text must not hold CR or LF. */
BG_MUSTCHECK int bg_sse_write_comment(bg_buf_t *out, const char *text);

/** Appends "retry: <ms>\n\n", telling the reader how long to wait before reconnecting. */
BG_MUSTCHECK int bg_sse_write_retry(bg_buf_t *out, uint32_t ms);

#endif
