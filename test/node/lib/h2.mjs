// A small HTTP/2 client for the tests, on Node's built-in node:http2: cleartext HTTP/2 with prior
// knowledge (h2c), which is what http2.connect does for an http: URL. One session per client is
// reused by every request, so several requests (and event streams) share one connection the way a
// browser's do. Responses come back whole (`request`) or as a live event stream (`stream`) that
// the caller reads event by event and may drop in the middle (RST_STREAM CANCEL), as a browser
// does when a tab closes.
import http2 from 'node:http2';

import { SseParser } from './sse.mjs';

const { HTTP2_HEADER_METHOD, HTTP2_HEADER_PATH, HTTP2_HEADER_STATUS } = http2.constants;

/** An HTTP error the caller did not expect; carries the response. */
export class HttpError extends Error {
    constructor(what, res) {
        super(`${what}: HTTP ${res.status} ${res.text.slice(0, 500)}`);
        this.res = res;
    }
}

function buildHeaders(method, path, opts) {
    const h = { [HTTP2_HEADER_METHOD]: method, [HTTP2_HEADER_PATH]: path };
    if (opts.token) h.authorization = `Bearer ${opts.token}`;
    if (opts.json !== undefined) h['content-type'] = 'application/json';
    for (const [k, v] of Object.entries(opts.headers ?? {})) {
        if (v !== undefined && v !== null) h[k.toLowerCase()] = String(v);
    }
    return h;
}

function bodyOf(opts) {
    if (opts.json !== undefined) return Buffer.from(JSON.stringify(opts.json));
    if (opts.body !== undefined) return Buffer.from(opts.body);
    return null;
}

function plainHeaders(raw) {
    const out = {};
    for (const [k, v] of Object.entries(raw)) {
        if (!k.startsWith(':')) out[k] = Array.isArray(v) ? v.join(', ') : String(v);
    }
    return out;
}

/**
 * A live event-stream response. `status` and `headers` are known once `ready` resolved. Read it
 * with `next()` (one event, or null at the end) or `for await`; `events` keeps every event read.
 */
export class EventStream {
    constructor(req, timeoutMs) {
        this.req = req;
        this.parser = new SseParser();
        this.queue = [];
        this.events = [];
        this.waiters = [];
        this.ended = false;
        this.incomplete = false;
        this.error = null;
        this.text = '';
        this.status = 0;
        this.headers = {};
        this.ready = new Promise((resolve, reject) => {
            req.once('response', (h) => {
                this.status = Number(h[HTTP2_HEADER_STATUS]);
                this.headers = plainHeaders(h);
                resolve(this);
            });
            req.once('error', reject);
        });
        this.ready.catch(() => {}); // reported through next() or the awaiting caller
        req.on('data', (chunk) => {
            this.text += chunk.toString('utf8');
            for (const ev of this.parser.feed(chunk)) this.push(ev);
        });
        req.on('end', () => this.end(null));
        req.on('close', () => this.end(null));
        req.on('error', (err) => this.end(err));
        if (timeoutMs > 0) {
            req.setTimeout(timeoutMs, () => {
                this.end(new Error(`event stream: nothing for ${timeoutMs} ms`));
                req.close(http2.constants.NGHTTP2_CANCEL);
            });
        }
    }

    push(ev) {
        this.events.push(ev);
        const w = this.waiters.shift();
        if (w) w.resolve(ev);
        else this.queue.push(ev);
    }

    end(err) {
        if (this.ended) return;
        this.ended = true;
        this.error = err;
        this.incomplete = this.parser.finish();
        for (const w of this.waiters.splice(0)) {
            if (err) w.reject(err);
            else w.resolve(null);
        }
    }

    /** The next event, or null once the response ended. Rejects on a transport error. */
    next() {
        if (this.queue.length > 0) return Promise.resolve(this.queue.shift());
        if (this.ended) return this.error ? Promise.reject(this.error) : Promise.resolve(null);
        return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
    }

    /** Reads until the end; returns every event of the response (also those read before). */
    async all() {
        while ((await this.next()) !== null);
        return this.events;
    }

    /** Drops the stream (RST_STREAM CANCEL), like a closed browser tab. */
    cancel() {
        if (!this.req.closed) this.req.close(http2.constants.NGHTTP2_CANCEL);
        this.end(null);
    }

    async *[Symbol.asyncIterator]() {
        for (;;) {
            const ev = await this.next();
            if (ev === null) return;
            yield ev;
        }
    }
}

/** An HTTP/2 (h2c) client of one origin. */
export class H2Client {
    /** base: "http://127.0.0.1:PORT". */
    constructor(base, { timeoutMs = 60000 } = {}) {
        this.base = base;
        this.timeoutMs = timeoutMs;
        this.session = null;
    }

    connect() {
        if (this.session && !this.session.closed && !this.session.destroyed) return this.session;
        const s = http2.connect(this.base);
        s.on('error', () => {}); // each request reports its own failure
        s.unref(); // an idle connection does not keep a test process alive
        this.session = s;
        return s;
    }

    open(method, path, opts) {
        const s = this.connect();
        // a request in flight keeps the process alive; an idle connection does not
        s.ref();
        this.active = (this.active ?? 0) + 1;
        const req = s.request(buildHeaders(method, path, opts), { endStream: false });
        req.once('close', () => {
            this.active -= 1;
            if (this.active === 0 && !s.destroyed) s.unref();
        });
        const body = bodyOf(opts);
        if (body !== null) req.end(body);
        else req.end();
        return req;
    }

    /**
     * One request, response read whole: { status, headers, text, json, version: 2 }. opts: token,
     * json (a body to send as JSON), body, headers, timeoutMs. json is the parsed body or null.
     */
    request(method, path, opts = {}) {
        const timeoutMs = opts.timeoutMs ?? this.timeoutMs;
        return new Promise((resolve, reject) => {
            let req;
            try {
                req = this.open(method, path, opts);
            } catch (err) {
                reject(err);
                return;
            }
            const chunks = [];
            let status = 0;
            let headers = {};
            req.setTimeout(timeoutMs, () => {
                req.close(http2.constants.NGHTTP2_CANCEL);
                reject(new Error(`${method} ${path}: no answer in ${timeoutMs} ms`));
            });
            req.on('response', (h) => {
                status = Number(h[HTTP2_HEADER_STATUS]);
                headers = plainHeaders(h);
            });
            req.on('data', (c) => chunks.push(c));
            req.on('error', reject);
            req.on('end', () => {
                const text = Buffer.concat(chunks).toString('utf8');
                let json = null;
                if ((headers['content-type'] ?? '').includes('json') && text.length > 0) {
                    try {
                        json = JSON.parse(text);
                    } catch {
                        json = null;
                    }
                }
                resolve({ status, headers, text, json, version: 2 });
            });
        });
    }

    get(path, opts = {}) {
        return this.request('GET', path, opts);
    }

    post(path, json, opts = {}) {
        return this.request('POST', path, { ...opts, json });
    }

    put(path, json, opts = {}) {
        return this.request('PUT', path, { ...opts, json });
    }

    /**
     * Starts a request whose answer is read as an event stream; resolves once the response head
     * arrived. opts as for request(); idleTimeoutMs bounds the silence between two chunks.
     */
    async stream(method, path, opts = {}) {
        const req = this.open(method, path, opts);
        const es = new EventStream(req, opts.idleTimeoutMs ?? this.timeoutMs);
        await es.ready;
        return es;
    }

    close() {
        if (this.session && !this.session.closed) this.session.close();
        this.session = null;
    }
}

/** Asserts-free helper: throws HttpError unless the response has the wanted status. */
export function expectStatus(res, want, what) {
    if (res.status !== want) throw new HttpError(`${what} (want ${want})`, res);
    return res;
}
