// An incremental parser of Server-Sent Events (the WHATWG "event stream" format), fed with text
// as it arrives from a fetch() body reader. EventSource cannot POST or send our headers, so the
// chat reads its streams with fetch and parses them here.
//
// push() takes any slice of the stream (a chunk may end in the middle of a line or of a UTF-8
// sequence: the TextDecoder in stream mode keeps the partial sequence) and returns the events
// completed by it: { event, data, id }. Comment lines (heartbeats) are ignored; `id` is the last
// id seen, which is what a resume sends as Last-Event-ID.

export class SseParser {
    constructor() {
        this.decoder = new TextDecoder('utf-8');
        this.buffer = '';
        this.event = '';
        this.data = [];
        this.lastId = '';
    }

    /** Feeds bytes (Uint8Array) or text; returns the events completed. */
    push(chunk) {
        this.buffer += typeof chunk === 'string' ? chunk : this.decoder.decode(chunk, { stream: true });
        const out = [];
        for (;;) {
            const m = /\r\n|\r|\n/.exec(this.buffer);
            if (m === null) break;
            // a lone \r at the very end may be the first half of \r\n: wait for more
            if (m[0] === '\r' && m.index === this.buffer.length - 1) break;
            const line = this.buffer.slice(0, m.index);
            this.buffer = this.buffer.slice(m.index + m[0].length);
            this.line(line, out);
        }
        return out;
    }

    line(line, out) {
        if (line === '') {
            if (this.data.length > 0) {
                out.push({ event: this.event || 'message', data: this.data.join('\n'), id: this.lastId });
            }
            this.event = '';
            this.data = [];
            return;
        }
        if (line.startsWith(':')) return;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? '' : line.slice(colon + 1);
        if (value.startsWith(' ')) value = value.slice(1);
        if (field === 'event') this.event = value;
        else if (field === 'data') this.data.push(value);
        else if (field === 'id' && !value.includes('\0')) this.lastId = value;
    }
}
