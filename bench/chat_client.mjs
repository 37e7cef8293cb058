// The load generator of bench/chat.sh: chat turns over HTTP/2 (h2c) with node:http2 only, no npm
// packages. bench/chat.sh starts the stores, bg-edge, the workers and the demo provider, and runs
// this script once per part; each run prints one line of key=value figures on stdout (progress and
// failures go to stderr) and exits non-zero when a request failed.
//
//   node bench/chat_client.mjs setup  --base URL --users N --convs N --out FILE
//   node bench/chat_client.mjs direct --url DEMO_URL --streams N --conns N --requests N --warmup N
//   node bench/chat_client.mjs turns  --base URL --users FILE --streams N --conns N --requests N
//                                     --warmup N [--content TEXT]
//   node bench/chat_client.mjs hold   --base URL --users FILE --streams N --conns N --edge-pid PID
//                                     --hold-s S [--content TEXT]
//
// Why the figures are taken where they are:
// - direct: time from sending the request to the demo provider's first chunk with content (the
//   role chunk comes first and carries none), N requests in flight at all times;
// - turns: the same for the product, from sending POST /chat/conversations/{id}/messages to the
//   first "event: delta"; also when the response head came (the edge stored the message and
//   admitted the turn), and the first delta's SSE id, which is the Redis entry id of its append to
//   the job's output stream, i.e. the wall-clock millisecond the worker wrote it. Those split the
//   time into edge (request → head), worker (head → append: pickup, prompt and history, provider,
//   batching) and relay (append → client). Turns end at "event: done"; turns/s counts those.
// - hold: M jobs are created with Prefer: respond-async, then GET /chat/jobs/{id}/stream is opened
//   for each over K connections (at most 100 streams on one connection, h2o's limit) and kept
//   open; the edge's VmRSS is read before, with the K connections open (one request done on
//   each) and with all streams open: the last two give the memory per stream.
// Percentiles are nearest-rank, like bench/lib.sh's.
import http2 from 'node:http2';
import fs from 'node:fs';
import { performance } from 'node:perf_hooks';

const {
    HTTP2_HEADER_METHOD: METHOD,
    HTTP2_HEADER_PATH: PATH,
    HTTP2_HEADER_STATUS: STATUS,
} = http2.constants;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function log(msg) {
    process.stderr.write(`chat_client: ${msg}\n`);
}

function die(msg) {
    log(msg);
    process.exit(1);
}

function parseArgs(argv) {
    const opts = {};
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        if (!a.startsWith('--') || i + 1 >= argv.length)
            die(`bad argument ${a}`);
        opts[a.slice(2)] = argv[++i];
    }
    return opts;
}

function num(opts, name, def) {
    const v = opts[name] === undefined ? def : Number(opts[name]);
    if (!Number.isFinite(v))
        die(`--${name} wants a number`);
    return v;
}

// Wall-clock milliseconds with a fraction (comparable with Redis entry ids on the same host).
function wallMs() {
    return performance.timeOrigin + performance.now();
}

function pct(values, p) {
    if (values.length === 0)
        return NaN;
    const s = Float64Array.from(values).sort();
    let i = Math.ceil(s.length * p);
    if (i < 1)
        i = 1;
    return s[i - 1];
}

function fmt(v) {
    return Number.isFinite(v) ? v.toFixed(3) : 'nan';
}

// A pool of HTTP/2 connections: each stream goes to the next one, round robin; a connection that
// closed (GOAWAY, error) is replaced on next use.
class Pool {
    constructor(base, n) {
        this.base = base;
        this.sessions = [];
        this.next = 0;
        for (let i = 0; i < n; i++)
            this.sessions.push(this.open());
    }

    open() {
        const s = http2.connect(this.base, { settings: { enablePush: false } });
        s.on('error', (e) => log(`connection error: ${e.message}`));
        return s;
    }

    session(i) {
        const k = i === undefined ? this.next++ % this.sessions.length : i % this.sessions.length;
        if (this.sessions[k].closed || this.sessions[k].destroyed)
            this.sessions[k] = this.open();
        return this.sessions[k];
    }

    close() {
        for (const s of this.sessions)
            s.close();
    }

    destroy() {
        for (const s of this.sessions)
            s.destroy();
    }
}

// One request with a whole (small) answer: resolves {status, body}.
function request(session, method, path, headers, body) {
    return new Promise((resolve, reject) => {
        const req = session.request({ [METHOD]: method, [PATH]: path, ...headers });
        let status = 0;
        const chunks = [];
        req.on('response', (h) => {
            status = h[STATUS];
        });
        req.on('data', (c) => chunks.push(c));
        req.on('end', () => resolve({ status, body: Buffer.concat(chunks).toString('utf8') }));
        req.on('error', reject);
        req.end(body === undefined ? undefined : body);
    });
}

async function json(session, method, path, token, body, want) {
    const headers = { 'content-type': 'application/json' };
    if (token)
        headers.authorization = `Bearer ${token}`;
    const r = await request(session, method, path, headers,
        body === undefined ? undefined : JSON.stringify(body));
    if (r.status !== want)
        throw new Error(`${method} ${path}: ${r.status} ${r.body.slice(0, 300)}`);
    return JSON.parse(r.body);
}

// Incremental SSE parser: feeds text, calls onEvent({event, id, data}) per complete event.
class SseParser {
    constructor(onEvent) {
        this.buf = '';
        this.onEvent = onEvent;
    }

    feed(text) {
        this.buf += text;
        let end;
        while ((end = this.buf.search(/\r?\n\r?\n/)) >= 0) {
            const block = this.buf.slice(0, end);
            this.buf = this.buf.slice(end).replace(/^\r?\n\r?\n/, '');
            const ev = { event: 'message', id: '', data: '' };
            let any = false;
            for (const line of block.split(/\r?\n/)) {
                if (line === '' || line.startsWith(':'))
                    continue;
                const colon = line.indexOf(':');
                const field = colon < 0 ? line : line.slice(0, colon);
                let value = colon < 0 ? '' : line.slice(colon + 1);
                if (value.startsWith(' '))
                    value = value.slice(1);
                if (field === 'event')
                    ev.event = value;
                else if (field === 'id')
                    ev.id = value;
                else if (field === 'data')
                    ev.data += (ev.data ? '\n' : '') + value;
                else
                    continue;
                any = true;
            }
            if (any)
                this.onEvent(ev);
        }
    }
}

// Runs `total` tasks with `width` in flight at all times; task(i) returns a promise. The lanes
// start rampMs / width apart (0: all at once).
async function closedLoop(width, total, task, rampMs = 0) {
    let next = 0;
    async function lane(l) {
        if (rampMs > 0)
            await sleep((rampMs * l) / width);
        while (next < total) {
            const i = next++;
            await task(i);
        }
    }
    const lanes = [];
    for (let l = 0; l < Math.min(width, total); l++)
        lanes.push(lane(l));
    await Promise.all(lanes);
}

// ---- setup: users, conversations, a first turn each (compiles the user's admission state) ----

async function setup(opts) {
    const pool = new Pool(opts.base, 1);
    const s = pool.session();
    const nusers = num(opts, 'users', 10);
    const nconvs = num(opts, 'convs', 10);
    const agents = [];
    const users = [];
    for (let u = 0; u < nusers; u++) {
        const email = `bench-chat-${process.pid}-${u}@bench.example`;
        const reg = await json(s, 'POST', '/auth/register', null,
            { email, password: `Bench-Horse-Battery-${process.pid}` }, 201);
        if (agents.length === 0) {
            const a = await json(s, 'GET', '/agents', reg.access_token, undefined, 200);
            if (!a.data || a.data.length === 0)
                throw new Error('GET /agents: no agent');
            agents.push(a.data[0].id);
        }
        const convs = [];
        for (let c = 0; c < nconvs; c++) {
            const conv = await json(s, 'POST', '/chat/conversations', reg.access_token,
                { agent_id: agents[0], title: `bench ${c}` }, 201);
            convs.push(conv.id);
        }
        users.push({ email, user_id: reg.user.id, token: reg.access_token, convs });
    }
    fs.writeFileSync(opts.out, JSON.stringify(users));
    pool.close();
    console.log(`users=${users.length} conversations=${nusers * nconvs}`);
}

// ---- direct: the demo provider's own time to first token ----

function directOne(pool, path, body) {
    return new Promise((resolve) => {
        const t0 = performance.now();
        const req = pool.session().request({ [METHOD]: 'POST', [PATH]: path,
            'content-type': 'application/json' });
        let ttft = NaN;
        let status = 0;
        let done = false;
        let text = '';
        req.setEncoding('utf8');
        req.on('response', (h) => {
            status = h[STATUS];
        });
        // the demo provider sends one event per chunk; a chunk may still hold several
        req.on('data', (chunk) => {
            if (!Number.isNaN(ttft))
                return;
            text += chunk;
            for (const line of text.split('\n')) {
                if (!line.startsWith('data: ') || line === 'data: [DONE]')
                    continue;
                let obj;
                try {
                    obj = JSON.parse(line.slice(6));
                } catch {
                    continue; // an event cut in two: the rest comes with the next chunk
                }
                const c = obj.choices && obj.choices[0] && obj.choices[0].delta &&
                    obj.choices[0].delta.content;
                if (c) {
                    ttft = performance.now() - t0;
                    break;
                }
            }
        });
        req.on('end', () => {
            done = true;
            resolve({ ok: status === 200 && !Number.isNaN(ttft), ttft, status });
        });
        req.on('error', (e) => {
            if (!done)
                resolve({ ok: false, ttft, status, error: e.message });
        });
        req.end(body);
    });
}

async function direct(opts) {
    const url = new URL(opts.url);
    const pool = new Pool(url.origin, num(opts, 'conns', 10));
    const path = `${url.pathname.replace(/\/$/, '')}/chat/completions`;
    const body = JSON.stringify({
        model: 'demo-1', stream: true,
        messages: [{ role: 'user', content: opts.content || 'benchmark turn' }],
    });
    const width = num(opts, 'streams', 100);
    const warmup = num(opts, 'warmup', 200);
    const total = num(opts, 'requests', 1000);
    const ramp = num(opts, 'ramp-ms', 0);
    let failed = 0;
    const ttft = [];
    let t0 = NaN;
    let cpuStart = null;
    // the same lanes, spread and warm-up as the product's turns (see turns below)
    await closedLoop(width, warmup + total, async (i) => {
        if (i === warmup) {
            t0 = performance.now();
            cpuStart = process.cpuUsage();
        }
        const r = await directOne(pool, path, body);
        if (!r.ok) {
            if (failed++ < 5)
                log(`direct request failed: status ${r.status} ${r.error || ''}`);
        } else if (i >= warmup) {
            ttft.push(r.ttft);
        }
    }, ramp);
    const secs = (performance.now() - t0) / 1000;
    const cpu = process.cpuUsage(cpuStart);
    pool.close();
    console.log(`requests=${ttft.length} failed=${failed} rps=${(ttft.length / secs).toFixed(1)} ` +
        `ttft_p50_ms=${fmt(pct(ttft, 0.5))} ttft_p99_ms=${fmt(pct(ttft, 0.99))} ` +
        `client_cpu_s=${((cpu.user + cpu.system) / 1e6).toFixed(2)}`);
    if (failed > 0)
        process.exit(1);
}

// ---- turns: chat turns through the product, each to "event: done" ----

function entryMs(id) {
    const dash = id.indexOf('-');
    const ms = Number(dash < 0 ? id : id.slice(0, dash));
    return Number.isFinite(ms) && ms > 0 ? ms : NaN;
}

function turnOne(pool, user, conv, body, extraHeaders) {
    return new Promise((resolve) => {
        const r = { ok: false, status: 0, ttft: NaN, head: NaN, edge: NaN, worker: NaN,
            relay: NaN, total: NaN, error: '' };
        const t0 = performance.now();
        const w0 = wallMs();
        let wHead = NaN;
        const req = pool.session().request({
            [METHOD]: 'POST', [PATH]: `/chat/conversations/${conv}/messages`,
            'content-type': 'application/json', accept: 'text/event-stream',
            authorization: `Bearer ${user.token}`, ...extraHeaders,
        });
        let settled = false;
        let sawDone = false;
        let errBody = '';
        const finish = () => {
            if (settled)
                return;
            settled = true;
            r.total = performance.now() - t0;
            r.ok = r.status === 200 && sawDone && !Number.isNaN(r.ttft);
            if (!r.ok && !r.error)
                r.error = r.status === 200 ? 'stream ended without done' : errBody.slice(0, 200);
            resolve(r);
        };
        const parser = new SseParser((ev) => {
            if (ev.event === 'delta' && Number.isNaN(r.ttft)) {
                r.ttft = performance.now() - t0;
                const wFirst = wallMs();
                const appended = entryMs(ev.id);
                r.worker = appended - wHead;
                r.relay = wFirst - appended;
            } else if (ev.event === 'done') {
                sawDone = true;
            } else if (ev.event === 'error') {
                r.error = `event: error ${ev.data}`;
            }
        });
        req.setEncoding('utf8');
        req.on('response', (h) => {
            r.status = h[STATUS];
            r.head = performance.now() - t0;
            wHead = w0 + r.head;
            r.edge = r.head;
        });
        req.on('data', (chunk) => {
            if (r.status === 200)
                parser.feed(chunk);
            else
                errBody += chunk;
        });
        req.on('end', finish);
        req.on('close', finish);
        req.on('error', (e) => {
            r.error = e.message;
            finish();
        });
        req.end(body);
    });
}

function loadUsers(file) {
    const users = JSON.parse(fs.readFileSync(file, 'utf8'));
    const slots = [];
    // one conversation per slot, users interleaved, so concurrent turns spread over users
    const nconvs = Math.max(...users.map((u) => u.convs.length));
    for (let c = 0; c < nconvs; c++) {
        for (const u of users) {
            if (c < u.convs.length)
                slots.push({ user: u, conv: u.convs[c] });
        }
    }
    return { users, slots };
}

async function turns(opts) {
    const { slots } = loadUsers(opts.users);
    const pool = new Pool(opts.base, num(opts, 'conns', 10));
    const content = opts.content || 'benchmark turn';
    const width = num(opts, 'streams', 100);
    const warmup = num(opts, 'warmup', 200);
    const total = num(opts, 'requests', 1000);
    const ramp = num(opts, 'ramp-ms', 0);
    // each lane keeps its conversation (one turn at a time per conversation, as a person chats)
    if (width > slots.length)
        die(`--streams ${width} wants at least as many conversations (have ${slots.length})`);
    let failed = 0;
    let next = 0;
    const rs = [];
    let t0 = NaN;
    let cpuStart = null;
    // Turns 0 … warmup-1 are the warm-up; the measured window opens when turn number `warmup`
    // starts, with the warm-up's spread of lanes (see --ramp-ms) and no pause, so the load is even.
    async function lane(l) {
        // Lanes that all start at once stay in step (turns take about the same time), so the
        // product would see bursts of `width` requests: --ramp-ms spreads the starts.
        if (ramp > 0)
            await sleep((ramp * l) / width);
        while (next < warmup + total) {
            const i = next++;
            if (i === warmup) {
                t0 = performance.now();
                cpuStart = process.cpuUsage();
            }
            // every message differs, as people's do: no cache along the way may answer it
            const body = JSON.stringify({ content: `${content} ${process.pid}-${i}` });
            const slot = slots[l];
            const r = await turnOne(pool, slot.user, slot.conv, body, {});
            if (!r.ok) {
                if (failed++ < 5)
                    log(`turn failed: status ${r.status} ${r.error}`);
            } else if (i >= warmup) {
                rs.push(r);
            }
        }
    }
    const lanes = [];
    for (let l = 0; l < width; l++)
        lanes.push(lane(l));
    await Promise.all(lanes);
    const secs = (performance.now() - t0) / 1000;
    const cpu = process.cpuUsage(cpuStart);
    pool.close();
    const col = (k) => rs.map((r) => r[k]).filter((v) => Number.isFinite(v));
    const p = (k) => `${k}_p50_ms=${fmt(pct(col(k), 0.5))} ${k}_p99_ms=${fmt(pct(col(k), 0.99))}`;
    console.log(`turns=${rs.length} failed=${failed} seconds=${secs.toFixed(2)} ` +
        `turns_per_s=${(rs.length / secs).toFixed(1)} ${p('ttft')} ${p('edge')} ${p('worker')} ` +
        `${p('relay')} ${p('total')} ` +
        `client_cpu_s=${((cpu.user + cpu.system) / 1e6).toFixed(2)}`);
    if (failed > 0)
        process.exit(1);
}

// ---- hold: many open SSE streams on one edge, and its memory ----

function rssKib(pid) {
    const m = /^VmRSS:\s+(\d+) kB/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    if (!m)
        die(`no VmRSS for pid ${pid}`);
    return Number(m[1]);
}

async function openGauge(base) {
    const pool = new Pool(base, 1);
    try {
        const r = await request(pool.session(), 'GET', '/metrics', {});
        const m = /^bg_sse_streams_open(?:\{[^}]*\})? (\d+)/m.exec(r.body);
        return m ? Number(m[1]) : NaN;
    } finally {
        pool.close();
    }
}

async function hold(opts) {
    const { users } = loadUsers(opts.users);
    const m = num(opts, 'streams', 5000);
    const conns = num(opts, 'conns', 100);
    const pid = num(opts, 'edge-pid', 0);
    const holdS = num(opts, 'hold-s', 10);
    if (Math.ceil(m / conns) > 100)
        die(`${m} streams over ${conns} connections is more than 100 per connection`);
    const body = JSON.stringify({ content: opts.content || 'benchmark hold #fail:slow=2000' });

    // 1. the jobs (respond-async), spread over the users and their conversations
    const cpool = new Pool(opts.base, 8);
    const jobs = [];
    let failed = 0;
    await closedLoop(64, m, async (i) => {
        const u = users[i % users.length];
        const conv = u.convs[Math.floor(i / users.length) % u.convs.length];
        const r = await request(cpool.session(), 'POST', `/chat/conversations/${conv}/messages`, {
            'content-type': 'application/json', prefer: 'respond-async',
            authorization: `Bearer ${u.token}`,
        }, body);
        if (r.status !== 202) {
            if (failed++ < 5)
                log(`respond-async turn: ${r.status} ${r.body.slice(0, 200)}`);
            return;
        }
        jobs.push({ user: u, job: JSON.parse(r.body).job_id });
    });
    cpool.close();
    if (failed > 0)
        die(`${failed} of ${m} jobs not created`);
    log(`${jobs.length} jobs created`);
    await sleep(2000);
    const rssBefore = rssKib(pid);
    const gaugeBefore = await openGauge(opts.base);

    // 2. the connections first, each with one request done (their own cost, not the streams')
    const pool = new Pool(opts.base, conns);
    await Promise.all(pool.sessions.map((_, i) => request(pool.session(i), 'GET', '/healthz', {})));
    await sleep(1000);
    const rssConns = rssKib(pid);

    // 3. one stream per job, kept open
    let opened = 0;
    let ended = 0;
    let withDelta = 0;
    let bytes = 0;
    const t0 = performance.now();
    const allOpen = new Promise((resolve, reject) => {
        jobs.forEach((j, i) => {
            const req = pool.session(i).request({
                [METHOD]: 'GET', [PATH]: `/chat/jobs/${j.job}/stream`,
                accept: 'text/event-stream', authorization: `Bearer ${j.user.token}`,
            });
            let gotDelta = false;
            req.on('response', (h) => {
                if (h[STATUS] !== 200) {
                    reject(new Error(`GET stream: ${h[STATUS]}`));
                    return;
                }
                if (++opened === jobs.length)
                    resolve();
            });
            req.on('data', (c) => {
                bytes += c.length;
                if (!gotDelta && c.toString('utf8').includes('event: delta')) {
                    gotDelta = true;
                    withDelta++;
                }
            });
            req.on('close', () => {
                ended++;
            });
            req.on('error', () => {});
            req.end();
        });
    });
    await allOpen;
    const openMs = performance.now() - t0;
    log(`${opened} streams open after ${openMs.toFixed(0)} ms; holding ${holdS} s`);
    await sleep(2000);
    const rssOpen = rssKib(pid);
    const gaugeOpen = await openGauge(opts.base);
    let rssMax = rssOpen;
    for (let s = 2; s < holdS; s++) {
        await sleep(1000);
        rssMax = Math.max(rssMax, rssKib(pid));
    }
    const stillOpen = opened - ended;
    pool.destroy();
    await sleep(2000);
    const rssAfter = rssKib(pid);
    const perStream = (rssOpen - rssConns) / m;
    console.log(`streams=${m} conns=${conns} open_ms=${openMs.toFixed(0)} ` +
        `still_open=${stillOpen} gauge_before=${gaugeBefore} gauge_open=${gaugeOpen} ` +
        `streams_with_delta=${withDelta} bytes=${bytes} ` +
        `rss_before_kib=${rssBefore} rss_conns_kib=${rssConns} rss_open_kib=${rssOpen} rss_max_kib=${rssMax} ` +
        `rss_after_kib=${rssAfter} kib_per_stream=${perStream.toFixed(2)}`);
    if (stillOpen !== m)
        die(`${m - stillOpen} streams ended early`);
}

const [mode, ...rest] = process.argv.slice(2);
const opts = parseArgs(rest);
const modes = { setup, direct, turns, hold };
if (!modes[mode])
    die('usage: chat_client.mjs setup|direct|turns|hold --option value …');
modes[mode](opts).catch((e) => die(e.stack || String(e)));
