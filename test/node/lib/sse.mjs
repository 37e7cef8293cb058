// Server-Sent Events parsing, as the WHATWG HTML standard defines it ("Interpreting an event
// stream"): UTF-8 text cut into lines at CRLF, LF or CR; "field: value" lines; comments (":…")
// ignored; an event dispatched at a blank line, and only when it has data. The parser is
// incremental because network chunks end anywhere, also between the CR and LF of one line end and
// inside a multi-byte character (TextDecoder with stream: true keeps those bytes for the next
// chunk). A client that remembers `lastEventId` can resume with Last-Event-ID, which is why the id
// persists across events as the standard says.

/**
 * One parsed event: { event, data, id, retry }. `event` is "message" when the stream named none,
 * `id` is the last event id seen so far (it persists), `retry` is the last retry hint or null.
 */
export class SseParser {
    constructor() {
        this.decoder = new TextDecoder('utf-8');
        this.buffer = '';
        this.pendingCR = false; // the previous chunk ended with CR: a following LF belongs to it
        this.firstChunk = true;
        this.lastEventId = '';
        this.retry = null;
        this.resetEvent();
    }

    resetEvent() {
        this.eventType = '';
        this.dataLines = [];
        this.hasData = false;
    }

    /** Feeds bytes (Buffer/Uint8Array) or text; returns the events completed by them. */
    feed(chunk) {
        let text = typeof chunk === 'string' ? chunk : this.decoder.decode(chunk, { stream: true });
        if (this.firstChunk && text.length > 0) {
            if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
            this.firstChunk = false;
        }
        if (this.pendingCR && text.startsWith('\n')) text = text.slice(1);
        this.pendingCR = false;
        this.buffer += text;
        const events = [];
        for (;;) {
            const m = /\r\n|\n|\r/.exec(this.buffer);
            if (m === null) break;
            if (m[0] === '\r' && m.index === this.buffer.length - 1) {
                // a CR at the very end: the LF of a CRLF may still come
                this.pendingCR = true;
            }
            const line = this.buffer.slice(0, m.index);
            this.buffer = this.buffer.slice(m.index + m[0].length);
            const ev = this.line(line);
            if (ev !== null) events.push(ev);
        }
        return events;
    }

    /**
     * Ends the stream. Returns true when it ended inside an event (bytes or fields not yet
     * dispatched), which the standard says to discard: a client sees that as a cut stream.
     */
    finish() {
        const rest = this.decoder.decode();
        if (rest.length > 0) this.buffer += rest;
        const incomplete = this.buffer.length > 0 || this.hasData || this.eventType !== '';
        this.buffer = '';
        this.resetEvent();
        return incomplete;
    }

    line(line) {
        if (line === '') {
            if (!this.hasData) {
                this.resetEvent();
                return null;
            }
            const ev = {
                event: this.eventType === '' ? 'message' : this.eventType,
                data: this.dataLines.join('\n'),
                id: this.lastEventId,
                retry: this.retry,
            };
            this.resetEvent();
            return ev;
        }
        if (line.startsWith(':')) return null;
        const colon = line.indexOf(':');
        let field = line;
        let value = '';
        if (colon >= 0) {
            field = line.slice(0, colon);
            value = line.slice(colon + 1);
            if (value.startsWith(' ')) value = value.slice(1);
        }
        switch (field) {
            case 'event':
                this.eventType = value;
                break;
            case 'data':
                this.dataLines.push(value);
                this.hasData = true;
                break;
            case 'id':
                if (!value.includes('\0')) this.lastEventId = value;
                break;
            case 'retry':
                if (/^[0-9]+$/.test(value)) this.retry = Number(value);
                break;
            default:
                break; // unknown fields are ignored
        }
        return null;
    }
}

/** Parses a whole event-stream body; returns { events, incomplete }. */
export function parseSse(text) {
    const p = new SseParser();
    const events = p.feed(text);
    const incomplete = p.finish();
    return { events, incomplete };
}
