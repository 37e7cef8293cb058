// The HTTP API as the page uses it, in the browser mode of the accounts API: the access token
// lives in the HttpOnly cookie bg_at, which the page never sees; state-changing requests carry the
// readable bg_csrf cookie back as X-CSRF-Token (double submit), and the browser adds Origin.
//
// A 401 means the access token expired (15 minutes) or the session ended: the first one triggers
// one silent POST /auth/refresh (the bg_rt cookie, path /auth), shared by every request waiting on
// it, and the request is sent again; when the refresh fails too, onSessionExpired() is called and
// the request fails with code "session_expired". A request that does not reach the server fails
// with code "offline".
//
// streamReply() posts a chat message and reads the reply's Server-Sent Events with fetch (an
// EventSource cannot POST). The response names the job (x-job-id); when the connection drops
// before the reply's last event, the reply is resumed from the last event id with GET
// /chat/jobs/{id}/stream and Last-Event-ID, so no text is lost or shown twice.

import { SseParser } from './sse.js';

export class ApiError extends Error {
    constructor(status, code, message, extra = {}) {
        super(message || code);
        this.status = status;
        this.code = code;
        this.details = extra.details ?? null;
        this.retryAfter = extra.retryAfter ?? 0;
        this.requestId = extra.requestId ?? '';
        this.headers = extra.headers ?? null;
    }
}

const hooks = {
    locale: () => 'en',
    onSessionExpired: () => {},
};

/** Sets the callbacks: locale() for Accept-Language, onSessionExpired(). */
export function configure(h) {
    Object.assign(hooks, h);
}

export function csrfToken() {
    const m = /(?:^|;\s*)bg_csrf=([^;]+)/.exec(document.cookie);
    return m ? decodeURIComponent(m[1]) : '';
}

function headersFor(method, extra = {}) {
    const h = { 'Accept-Language': hooks.locale(), ...extra };
    if (method !== 'GET' && method !== 'HEAD') {
        const token = csrfToken();
        if (token) h['X-CSRF-Token'] = token;
    }
    return h;
}

async function errorFrom(res) {
    let body = null;
    try {
        body = await res.json();
    } catch {
        // not JSON (a proxy's page): the status says enough
    }
    const e = body?.error ?? {};
    return new ApiError(res.status, e.code ?? `http_${res.status}`, e.message ?? res.statusText, {
        details: e.details,
        retryAfter: Number(res.headers.get('retry-after')) || 0,
        requestId: e.request_id ?? res.headers.get('x-request-id') ?? '',
        headers: res.headers,
    });
}

let refreshing = null;

/** One POST /auth/refresh for everyone waiting; resolves true when the session goes on. */
function refreshSession() {
    if (!refreshing) {
        refreshing = fetch('/auth/refresh', {
            method: 'POST',
            credentials: 'same-origin',
            headers: headersFor('POST', { 'Content-Type': 'application/json' }),
            body: JSON.stringify({ mode: 'cookie' }),
        })
            .then((r) => r.ok)
            .catch(() => false)
            .finally(() => {
                setTimeout(() => {
                    refreshing = null;
                }, 0);
            });
    }
    return refreshing;
}

const noRefresh = new Set(['/auth/login', '/auth/register', '/auth/refresh', '/auth/logout']);

async function send(method, path, body, extraHeaders, signal) {
    const init = { method, credentials: 'same-origin', headers: headersFor(method, extraHeaders), signal };
    if (body !== undefined) {
        init.headers['Content-Type'] = 'application/json';
        init.body = JSON.stringify(body);
    }
    try {
        return await fetch(path, init);
    } catch (err) {
        if (err?.name === 'AbortError') throw err;
        throw new ApiError(0, 'offline', '');
    }
}

/** Sends a request with the session's credentials; answers the response (refreshing on 401). */
async function request(method, path, body, { headers = {}, signal } = {}) {
    let res = await send(method, path, body, headers, signal);
    if (res.status === 401 && !noRefresh.has(path)) {
        if (await refreshSession()) {
            res = await send(method, path, body, headers, signal);
        }
        if (res.status === 401) {
            hooks.onSessionExpired();
            throw new ApiError(401, 'session_expired', '');
        }
    }
    return res;
}

/** A JSON API call: resolves the parsed body (null for 204), rejects with ApiError. */
export async function api(method, path, body, opts) {
    const res = await request(method, path, body, opts);
    if (!res.ok) throw await errorFrom(res);
    if (res.status === 204) return null;
    const text = await res.text();
    return text ? JSON.parse(text) : null;
}

export const get = (path, opts) => api('GET', path, undefined, opts);
export const post = (path, body, opts) => api('POST', path, body ?? {}, opts);
export const put = (path, body, opts) => api('PUT', path, body, opts);
export const patch = (path, body, opts) => api('PATCH', path, body, opts);
export const del = (path, opts) => api('DELETE', path, undefined, opts);

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function waitOnline() {
    if (navigator.onLine) return Promise.resolve();
    return new Promise((resolve) => window.addEventListener('online', () => resolve(), { once: true }));
}

/**
 * Posts content to conversation convId and follows the reply. on: { start(jobId), delta(text),
 * reset(), done(data), error(ApiError), connection(state: 'lost'|'resumed') }. Resolves when the
 * reply ended (done or error); rejects with ApiError when the message was refused. Returns a
 * handle with cancel() through on.start's second argument.
 */
export async function streamReply(convId, content, on) {
    const res = await request('POST', `/chat/conversations/${encodeURIComponent(convId)}/messages`, { content }, {
        headers: { Accept: 'text/event-stream' },
    });
    if (!res.ok) throw await errorFrom(res);
    const jobId = res.headers.get('x-job-id');
    const quota = {
        limit: res.headers.get('x-quota-limit'),
        remaining: res.headers.get('x-quota-remaining'),
        reset: res.headers.get('x-quota-reset'),
    };
    on.start?.(jobId, quota);

    let lastId = '';
    let finished = false;
    let response = res;
    for (let attempt = 0; ; attempt++) {
        try {
            finished = await readEvents(response, on, (id) => {
                lastId = id;
            });
        } catch (err) {
            if (err?.name === 'AbortError') throw err;
            finished = false; // the connection dropped mid-stream
        }
        if (finished) return;
        if (!jobId || attempt >= 30) {
            throw new ApiError(0, 'offline', '');
        }
        on.connection?.('lost');
        await waitOnline();
        await sleep(Math.min(250 * 2 ** Math.min(attempt, 4), 4000));
        try {
            const headers = { Accept: 'text/event-stream' };
            if (lastId) headers['Last-Event-ID'] = lastId;
            response = await request('GET', `/chat/jobs/${encodeURIComponent(jobId)}/stream`, undefined, { headers });
            if (!response.ok) {
                const e = await errorFrom(response);
                if (e.status >= 400 && e.status < 500) throw e;
                response = null;
            }
        } catch (err) {
            if (err instanceof ApiError && err.code !== 'offline') throw err;
            response = null;
        }
        if (response === null) {
            // nothing to read: try again
            response = { body: null };
        } else {
            on.connection?.('resumed');
        }
    }
}

/* Reads one response's events; true when the reply ended (done or error). */
async function readEvents(res, on, setId) {
    if (!res.body) return false;
    const reader = res.body.getReader();
    const parser = new SseParser();
    for (;;) {
        const { value, done } = await reader.read();
        if (done) return false;
        for (const ev of parser.push(value)) {
            if (ev.id) setId(ev.id);
            let data = null;
            try {
                data = JSON.parse(ev.data);
            } catch {
                data = null;
            }
            if (ev.event === 'delta') on.delta?.(data?.text ?? '');
            else if (ev.event === 'reset') on.reset?.();
            else if (ev.event === 'done') {
                on.done?.(data ?? {});
                return true;
            } else if (ev.event === 'error') {
                const e = data?.error ?? {};
                on.error?.(new ApiError(200, e.code ?? 'internal', e.message ?? '', { details: e.details }));
                return true;
            }
        }
    }
}

/** Asks the worker to stop the job's reply (what was generated is kept). */
export function cancelJob(jobId) {
    return post(`/chat/jobs/${encodeURIComponent(jobId)}/cancel`, {});
}
