// The whole service on this machine for one test file, the way test/support/bgtest.c sets it up
// for the C end-to-end tests: a private redis-server on a free port in a temporary directory, a
// fresh database on the suite's PostgreSQL server (BG_TEST_DATABASE_URL, from
// scripts/test-stack.sh) migrated by the real `bgctl migrate`, the demo LLM provider
// (bg-demo-llm), one or more bg-edge processes and a bg-worker — all real binaries from the build
// tree (BGT_BIN_DIR, set by ctest; build/bin by default), each logging to a file of its own.
//
// Everything started here is stopped here: `stop()` sends SIGTERM and waits (SIGKILL after a
// grace period), drops the database and removes the directory, and reports which process did not
// exit cleanly, so a sanitizer report or a crash at shutdown fails the test instead of going
// unseen. If the test process itself ends early (an exception, Ctrl-C, the runner's timeout), an
// exit hook SIGKILLs whatever is still running, so no server outlives its test.
//
// Helpers below speak the public API as a client would (register, log in, API keys) and use the
// operator's tools where an operator would (bgctl plan grant, an admin for roles and policies).
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { H2Client, HttpError, expectStatus } from './h2.mjs';

export { H2Client, HttpError, expectStatus };
export { SseParser, parseSse } from './sse.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
/** The repository's root (for locales/, migrations/ and the default build tree). */
export const sourceDir = path.resolve(here, '..', '..', '..');

/** Where the binaries are: BGT_BIN_DIR (ctest sets it), else build/bin. */
export function binDir() {
    return process.env.BGT_BIN_DIR || path.join(sourceDir, 'build', 'bin');
}

/** The path of a built binary. */
export function bin(name) {
    return path.join(binDir(), name);
}

/**
 * Why the stack cannot run here, or false when it can: a test file passes this as its `skip`
 * option, as the C tests skip without BG_TEST_DATABASE_URL. (Not null: node:test treats a skip
 * option of null as "skip".)
 */
export function skipReason() {
    if (!process.env.BG_TEST_DATABASE_URL) {
        return 'BG_TEST_DATABASE_URL is not set (run through scripts/test-stack.sh or make test)';
    }
    return false;
}

/**
 * A scale for waits: the sanitizer build is several times slower, and a test must not fail for
 * being slow there. BGT_TIME_SCALE overrides; ASan (ASAN_OPTIONS set by make test) gets 4.
 */
export const timeScale = Number(process.env.BGT_TIME_SCALE) || (process.env.ASAN_OPTIONS ? 4 : 1);

export function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
}

/* ---- processes ---------------------------------------------------------------------------- */

const live = new Set(); // every child still running, for the exit hook

function killAll() {
    for (const child of live) {
        try {
            child.kill('SIGKILL');
        } catch {
            // already gone
        }
    }
    live.clear();
}

let hooksInstalled = false;
const tempDirs = new Set();

function installHooks() {
    if (hooksInstalled) return;
    hooksInstalled = true;
    // 'exit' handlers run synchronously: kill() and rmSync() are, so nothing is left behind.
    process.on('exit', () => {
        killAll();
        if (process.env.BGT_KEEP_LOGS !== '1') {
            for (const d of tempDirs) fs.rmSync(d, { recursive: true, force: true });
        }
    });
    for (const [sig, code] of [
        ['SIGINT', 130],
        ['SIGTERM', 143],
        ['SIGHUP', 129],
    ]) {
        process.once(sig, () => {
            process.stderr.write(`stack: ${sig}: stopping the servers\n`);
            process.exit(code);
        });
    }
}

/* Tries to listen on port (0: one the kernel picks); resolves with the port, or 0 when taken. */
function probePort(port) {
    return new Promise((resolve) => {
        const srv = net.createServer();
        srv.unref();
        srv.on('error', () => resolve(0));
        srv.listen(port, '127.0.0.1', () => {
            const got = srv.address().port;
            srv.close(() => resolve(got));
        });
    });
}

let nextPort = 0;

/**
 * A TCP port on 127.0.0.1 that nothing listened on a moment ago, below Linux's ephemeral range
 * (32768–60999) so the outgoing connections of everything else running cannot land on it before
 * our server binds it. Each process takes its ports in turn from a block of 32 of its own (by its
 * pid, one of 399 blocks from 20000, as test/support/bgtest.c does), so two tests picking at the
 * same moment do not pick the same port; the kernel picks when the block is full.
 */
export async function freePort() {
    const base = 20000 + (process.pid % 399) * 32;
    for (let i = 0; i < 32; i++) {
        const port = await probePort(base + (nextPort++ % 32));
        if (port) return port;
    }
    const port = await probePort(0);
    if (!port) throw new Error('no free port');
    return port;
}

/** The last lines of a log file, for a failure message. */
export function tail(file, lines = 30) {
    try {
        const text = fs.readFileSync(file, 'utf8');
        return text.split('\n').slice(-lines).join('\n');
    } catch {
        return '(no log)';
    }
}

/**
 * A child process with its output appended to a log file. `exited` resolves to
 * { code, signal } when it ends.
 */
class Proc {
    constructor(name, argv, env, log) {
        this.name = name;
        this.argv = argv;
        this.log = log;
        const fd = fs.openSync(log, 'a');
        try {
            this.child = spawn(argv[0], argv.slice(1), {
                env,
                stdio: ['ignore', fd, fd],
            });
        } finally {
            fs.closeSync(fd);
        }
        this.exitInfo = null;
        live.add(this.child);
        this.exited = new Promise((resolve) => {
            this.child.once('exit', (code, signal) => {
                live.delete(this.child);
                this.exitInfo = { code, signal };
                resolve(this.exitInfo);
            });
            this.child.once('error', (err) => {
                live.delete(this.child);
                this.exitInfo = { code: 127, signal: null, error: err };
                resolve(this.exitInfo);
            });
        });
    }

    get pid() {
        return this.child.pid;
    }

    get running() {
        return this.exitInfo === null;
    }

    /**
     * Sends sig and waits up to graceMs; SIGKILLs after that. Returns { code, signal, killed }.
     */
    async stop(sig = 'SIGTERM', graceMs = 10000) {
        if (this.running) {
            try {
                this.child.kill(sig);
            } catch {
                // gone meanwhile
            }
        }
        let timer;
        const timeout = new Promise((resolve) => {
            timer = setTimeout(() => resolve(null), graceMs);
        });
        let info = await Promise.race([this.exited, timeout]);
        clearTimeout(timer);
        let killed = false;
        if (info === null) {
            killed = true;
            this.child.kill('SIGKILL');
            info = await this.exited;
        }
        return { ...info, killed };
    }
}

/**
 * Runs a command to completion: { code, stdout, stderr }. input is written to its stdin.
 */
export function run(argv, { env = process.env, input, timeoutMs = 60000 } = {}) {
    return new Promise((resolve, reject) => {
        const child = spawn(argv[0], argv.slice(1), { env, stdio: ['pipe', 'pipe', 'pipe'] });
        live.add(child);
        const out = [];
        const err = [];
        child.stdout.on('data', (c) => out.push(c));
        child.stderr.on('data', (c) => err.push(c));
        const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
        child.once('error', (e) => {
            clearTimeout(timer);
            live.delete(child);
            reject(new Error(`${argv[0]}: ${e.message}`));
        });
        child.once('close', (code, signal) => {
            clearTimeout(timer);
            live.delete(child);
            resolve({
                code: code ?? (signal ? 128 : -1),
                signal,
                stdout: Buffer.concat(out).toString('utf8'),
                stderr: Buffer.concat(err).toString('utf8'),
            });
        });
        child.stdin.on('error', () => {}); // a command that does not read its input
        child.stdin.end(input ?? '');
    });
}

/** GETs url over HTTP/1.1 until it answers want (or any status when want is 0). */
export async function waitHttp(url, { want = 200, timeoutMs = 30000, proc = null } = {}) {
    const deadline = Date.now() + timeoutMs;
    let last = 'no answer';
    while (Date.now() < deadline) {
        if (proc && !proc.running) {
            throw new Error(
                `${proc.name} exited (${JSON.stringify(proc.exitInfo)}) before ${url} answered;` +
                    ` last lines of ${proc.log}:\n${tail(proc.log)}`,
            );
        }
        const status = await new Promise((resolve) => {
            const req = http.get(url, { timeout: 2000 }, (res) => {
                res.resume();
                resolve(res.statusCode);
            });
            req.on('timeout', () => req.destroy(new Error('timeout')));
            req.on('error', (e) => resolve(e.message));
        });
        if (status === want || (want === 0 && typeof status === 'number')) return;
        last = String(status);
        await sleep(50);
    }
    throw new Error(`${url} did not answer ${want} in ${timeoutMs} ms (last: ${last})`);
}

/* ---- Redis -------------------------------------------------------------------------------- */

/** Sends one inline command to a Redis server; resolves to the first reply line. */
export function redisInline(port, line, timeoutMs = 2000) {
    return new Promise((resolve, reject) => {
        const sock = net.connect({ host: '127.0.0.1', port });
        let data = '';
        const timer = setTimeout(() => {
            sock.destroy();
            reject(new Error(`redis ${port}: no answer to ${line}`));
        }, timeoutMs);
        sock.on('connect', () => sock.write(`${line}\r\n`));
        sock.on('data', (c) => {
            data += c.toString('utf8');
            const end = data.indexOf('\r\n');
            if (end >= 0) {
                clearTimeout(timer);
                sock.destroy();
                resolve(data.slice(0, end));
            }
        });
        sock.on('error', (e) => {
            clearTimeout(timer);
            reject(e);
        });
    });
}

async function startRedis(dir) {
    const redisDir = path.join(dir, 'redis');
    fs.mkdirSync(redisDir);
    for (let attempt = 0; attempt < 5; attempt++) {
        const port = await freePort();
        const argv = [
            'redis-server',
            '--port',
            String(port),
            '--bind',
            '127.0.0.1',
            '--dir',
            redisDir,
            '--save',
            '',
            '--appendonly',
            'no',
            '--protected-mode',
            'no',
            '--loglevel',
            'warning',
        ];
        const proc = new Proc('redis-server', argv, process.env, path.join(dir, 'redis.log'));
        const deadline = Date.now() + 5000 * timeScale;
        while (Date.now() < deadline && proc.running) {
            try {
                if ((await redisInline(port, 'PING')) === '+PONG') {
                    return { proc, port, url: `redis://127.0.0.1:${port}/0` };
                }
            } catch {
                // not listening yet
            }
            await sleep(20);
        }
        await proc.stop('SIGKILL', 1000); // the port was taken, or it is stuck: another port
    }
    throw new Error(`redis-server did not start; see ${path.join(dir, 'redis.log')}`);
}

/* ---- PostgreSQL --------------------------------------------------------------------------- */

/** The URL of database `name` on the server of `base` (query string kept). */
export function urlWithDatabase(base, name) {
    const m = /^([a-z]+:\/\/[^/?]*)(\/[^?]*)?(\?.*)?$/i.exec(base);
    if (!m) throw new Error(`BG_TEST_DATABASE_URL is not a postgresql:// URL: ${base}`);
    return `${m[1]}/${name}${m[3] ?? ''}`;
}

async function psql(sql) {
    const admin = process.env.BG_TEST_DATABASE_URL;
    const r = await run(['psql', admin, '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-c', sql]);
    if (r.code !== 0) throw new Error(`psql: ${sql}: ${r.stderr.trim()}`);
    return r.stdout;
}

let dbCounter = 0;

async function createDatabase(env) {
    const name = `bgn_${process.pid}_${dbCounter++}_${Date.now() % 100000}`;
    await psql(`CREATE DATABASE ${name}`);
    const url = urlWithDatabase(process.env.BG_TEST_DATABASE_URL, name);
    const r = await run([bin('bgctl'), 'migrate'], {
        env: { ...env, BG_DATABASE_URL: url, BG_LOG_LEVEL: 'warn' },
        timeoutMs: 60000 * timeScale,
    });
    if (r.code !== 0) {
        await dropDatabase(name).catch(() => {});
        throw new Error(`bgctl migrate failed (${r.code}): ${r.stdout}${r.stderr}`);
    }
    return { name, url };
}

async function dropDatabase(name) {
    await psql(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
}

/* ---- the stack ---------------------------------------------------------------------------- */

const JWT_SECRET = '0123456789abcdef0123456789abcdef-node-tests';

function baseEnv(extra) {
    // The binaries read only BG_* settings: start from the environment (PATH, ASAN_OPTIONS…)
    // without BG_* variables a developer may have exported, so the stack is the same everywhere.
    const env = {};
    for (const [k, v] of Object.entries(process.env)) {
        if (!k.startsWith('BG_') || k === 'BG_TEST_DATABASE_URL') env[k] = v;
    }
    return {
        ...env,
        BG_ENV_FILE: '/nonexistent',
        BG_LOG_FORMAT: 'text',
        BG_LOG_LEVEL: 'info',
        BG_JWT_SECRET: JWT_SECRET,
        BG_SHARDS: '16',
        BG_REDIS_TIMEOUT_MS: String(2000 * timeScale),
        ...extra,
    };
}

/**
 * A running stack. Fields: url (the first edge's base URL), edges [{ url, port, proc }], llmUrl
 * (the provider's /v1 base), redisUrl, redisPort, databaseUrl, dir (logs), env (what the
 * binaries got). Stop it with stop().
 */
export class Stack {
    constructor(opts) {
        this.opts = opts;
        this.procs = [];
        this.edges = [];
        this.workers = [];
        this.clients = [];
        this.db = null;
        this.redis = null;
        this.stopped = false;
        this.adminSession = null;
    }

    get url() {
        return this.edges[0]?.url;
    }

    log(name) {
        return path.join(this.dir, `${name}.log`);
    }

    track(proc) {
        this.procs.push(proc);
        return proc;
    }

    /** Kills a process that failed to start (a port taken meanwhile) and forgets it. */
    async discard(proc) {
        await proc.stop('SIGKILL', 1000);
        this.procs = this.procs.filter((p) => p !== proc);
    }

    async start() {
        installHooks();
        for (const b of ['bg-edge', 'bg-worker', 'bgctl', 'bg-demo-llm']) {
            if (!fs.existsSync(bin(b))) {
                throw new Error(`${bin(b)} is missing: build first (make build), or set BGT_BIN_DIR`);
            }
        }
        this.dir = fs.mkdtempSync(path.join(process.env.TMPDIR || os.tmpdir(), 'bgn.'));
        tempDirs.add(this.dir);
        this.redis = await startRedis(this.dir);
        this.track(this.redis.proc);
        this.redisUrl = this.redis.url;
        this.redisPort = this.redis.port;
        this.env = baseEnv({ BG_REDIS_URL: this.redisUrl, ...(this.opts.env ?? {}) });
        this.db = await createDatabase(this.env);
        this.databaseUrl = this.db.url;
        this.env.BG_DATABASE_URL = this.databaseUrl;
        await this.startProvider();
        this.env.BG_LLM_BASE_URL = this.llmUrl;
        this.env.BG_LLM_MODEL = this.env.BG_LLM_MODEL ?? 'demo-1';
        for (let i = 0; i < (this.opts.workers ?? 1); i++) await this.startWorker();
        for (let i = 0; i < (this.opts.edges ?? 1); i++) await this.startEdge();
        return this;
    }

    async startProvider() {
        const p = this.opts.provider ?? {};
        for (let attempt = 0; attempt < 3; attempt++) {
            const port = await freePort();
            const argv = [bin('bg-demo-llm'), '--port', String(port)];
            argv.push('--tokens-per-second', String(p.tokensPerSecond ?? 400));
            if (p.delayMs) argv.push('--delay-ms', String(p.delayMs));
            if (p.apiKey) argv.push('--api-key', p.apiKey);
            const proc = this.track(new Proc('bg-demo-llm', argv, this.env, this.log('demo-llm')));
            this.llmUrl = `http://127.0.0.1:${port}/v1`;
            try {
                await waitHttp(`${this.llmUrl}/models`, { timeoutMs: 15000 * timeScale, proc });
                this.provider = { proc, port };
                return;
            } catch (err) {
                if (attempt === 2) throw err;
                await this.discard(proc);
            }
        }
    }

    /** Starts one more bg-worker (roles from opts.roles, "llm,usage" by default). */
    async startWorker(extraEnv = {}) {
        const n = this.workers.length;
        for (let attempt = 0; attempt < 3; attempt++) {
            const port = await freePort();
            const env = {
                ...this.env,
                BG_WORKER_PORT: String(port),
                BG_WORKER_CONCURRENCY: '4',
                BG_SHUTDOWN_GRACE_MS: String(5000 * timeScale),
                ...extraEnv,
            };
            const argv = [bin('bg-worker'), '--roles', this.opts.roles ?? 'llm,usage'];
            const proc = this.track(new Proc(`bg-worker-${n}`, argv, env, this.log(`worker${n}`)));
            try {
                await waitHttp(`http://127.0.0.1:${port}/readyz`, {
                    timeoutMs: 20000 * timeScale,
                    proc,
                });
                const w = { proc, port, url: `http://127.0.0.1:${port}` };
                this.workers.push(w);
                return w;
            } catch (err) {
                if (attempt === 2) throw err;
                await this.discard(proc);
            }
        }
        return null;
    }

    /** Starts one more bg-edge; returns { url, port, proc }. */
    async startEdge(extraEnv = {}) {
        const n = this.edges.length;
        for (let attempt = 0; attempt < 3; attempt++) {
            const port = await freePort();
            const env = {
                ...this.env,
                BG_HTTP_PORT: String(port),
                BG_HTTPS_PORT: '0',
                BG_EDGE_THREADS: '2',
                BG_PUBLIC_URL: `http://127.0.0.1:${port}`,
                BG_SHUTDOWN_GRACE_MS: String(5000 * timeScale),
                ...extraEnv,
            };
            const proc = this.track(new Proc(`bg-edge-${n}`, [bin('bg-edge')], env, this.log(`edge${n}`)));
            const url = `http://127.0.0.1:${port}`;
            try {
                await waitHttp(`${url}/healthz`, { timeoutMs: 20000 * timeScale, proc });
                const e = { url, port, proc };
                this.edges.push(e);
                return e;
            } catch (err) {
                if (attempt === 2) throw err;
                await this.discard(proc);
            }
        }
        return null;
    }

    /** An HTTP/2 client of edge i (closed by stop()). */
    client(i = 0) {
        const c = new H2Client(this.edges[i].url, { timeoutMs: 60000 * timeScale });
        this.clients.push(c);
        return c;
    }

    /** Runs bgctl against this stack's stores: { code, stdout, stderr }. */
    bgctl(args, { input } = {}) {
        return run([bin('bgctl'), ...args], {
            env: { ...this.env, BG_LOG_LEVEL: 'warn' },
            input,
            timeoutMs: 60000 * timeScale,
        });
    }

    /** Sends one inline command to the stack's Redis (for inspection); the first reply line. */
    redisCommand(line) {
        return redisInline(this.redisPort, line, 5000 * timeScale);
    }

    /** The last lines of every log, for a failure message. */
    logs(lines = 20) {
        const files = [...new Set(this.procs.map((p) => p.log))];
        return files.map((f) => `--- ${f} ---\n${tail(f, lines)}`).join('\n');
    }

    /**
     * Stops everything (edges first, then workers, provider, Redis), drops the database and
     * removes the directory (kept when BGT_KEEP_LOGS=1 or a process did not stop cleanly).
     * Returns the problems: a service that did not exit with status 0 after SIGTERM (a crash,
     * a sanitizer report, a hang), each with the end of its log.
     */
    async stop() {
        if (this.stopped) return [];
        this.stopped = true;
        for (const c of this.clients) c.close();
        const problems = [];
        const order = [
            ...this.procs.filter((p) => p.name.startsWith('bg-edge')),
            ...this.procs.filter((p) => p.name.startsWith('bg-worker')),
            ...this.procs.filter((p) => p.name === 'bg-demo-llm'),
        ];
        const stops = [];
        for (const p of order) {
            const wasRunning = p.running;
            stops.push(
                p.stop('SIGTERM', 15000 * timeScale).then((r) => {
                    if (!wasRunning && r.code === 0) return;
                    if (r.killed || r.code !== 0) {
                        const how = r.killed
                            ? 'did not stop within the grace period after SIGTERM'
                            : wasRunning
                              ? `exited with ${r.code ?? r.signal} after SIGTERM`
                              : `had exited on its own (${r.code ?? r.signal})`;
                        problems.push(`${p.name} ${how}; last lines of ${p.log}:\n${tail(p.log)}`);
                    }
                }),
            );
        }
        await Promise.all(stops);
        if (this.redis) await this.redis.proc.stop('SIGTERM', 5000);
        if (this.db) {
            await dropDatabase(this.db.name).catch((e) => problems.push(String(e)));
        }
        if (problems.length === 0 && process.env.BGT_KEEP_LOGS !== '1') {
            fs.rmSync(this.dir, { recursive: true, force: true });
            tempDirs.delete(this.dir);
        } else {
            tempDirs.delete(this.dir);
            process.stderr.write(`stack: logs kept in ${this.dir}\n`);
        }
        return problems;
    }
}

/**
 * Starts a stack. opts: edges (1), workers (1), roles ("llm,usage"), provider { tokensPerSecond
 * (400), delayMs, apiKey }, env (more BG_* settings for every binary). On failure everything
 * started so far is stopped and the error names the log to read.
 */
export async function startStack(opts = {}) {
    const s = new Stack(opts);
    try {
        await s.start();
    } catch (err) {
        const logs = s.dir ? `\n${s.logs()}` : '';
        await s.stop().catch(() => {});
        throw new Error(`stack did not start: ${err.message}${logs}`);
    }
    return s;
}

/* ---- accounts ----------------------------------------------------------------------------- */

let userCounter = 0;

/** A unique e-mail address for a test user. */
export function uniqueEmail(prefix = 'user') {
    userCounter += 1;
    return `${prefix}-${process.pid}-${userCounter}-${Date.now() % 1000000}@node.example`;
}

export const PASSWORD = 'Node-Horse-Battery-42';

/**
 * POST /auth/register. Returns { user, access_token, refresh_token, email, password, token }
 * (token is the access token). opts: email, password, name, locale.
 */
export async function registerUser(client, opts = {}) {
    const email = opts.email ?? uniqueEmail();
    const password = opts.password ?? PASSWORD;
    const body = { email, password };
    if (opts.name !== undefined) body.name = opts.name;
    if (opts.locale !== undefined) body.locale = opts.locale;
    const res = expectStatus(await client.post('/auth/register', body), 201, 'register');
    return { ...res.json, email, password, token: res.json.access_token };
}

/** POST /auth/login; same shape as registerUser. */
export async function login(client, email, password = PASSWORD) {
    const res = expectStatus(await client.post('/auth/login', { email, password }), 200, 'login');
    return { ...res.json, email, password, token: res.json.access_token };
}

/** POST /auth/api-keys: { id, name, key } (the key is shown only here). */
export async function createApiKey(client, token, name = 'node tests') {
    const res = expectStatus(
        await client.post('/auth/api-keys', { name }, { token }),
        201,
        'create an API key',
    );
    return res.json;
}

/**
 * Gives a user a plan with `bgctl plan grant` (as an operator would), which also recompiles the
 * user's admission state in Redis. who: { email } or { userId }; plan: daily|weekly|monthly|yearly.
 */
export async function grantPlan(stack, who, plan = 'monthly', days = 30) {
    const args = ['plan', 'grant', '--plan', plan, '--days', String(days)];
    if (who.email) args.push('--email', who.email);
    else args.push('--user', who.userId);
    const r = await stack.bgctl(args);
    if (r.code !== 0) throw new Error(`bgctl ${args.join(' ')}: ${r.code}: ${r.stdout}${r.stderr}`);
    return r.stdout;
}

/**
 * The stack's platform admin (made once with `bgctl user create --admin`, then logged in):
 * { email, password, token, client }.
 */
export async function admin(stack) {
    if (stack.adminSession) return stack.adminSession;
    const email = uniqueEmail('admin');
    const password = 'Admin-Horse-Battery-42';
    const r = await stack.bgctl(['user', 'create', '--admin', '--email', email, '--password-stdin'], {
        input: `${password}\n`,
    });
    if (r.code !== 0) throw new Error(`bgctl user create --admin: ${r.code}: ${r.stdout}${r.stderr}`);
    const client = stack.client(0);
    const session = await login(client, email, password);
    stack.adminSession = { ...session, client };
    return stack.adminSession;
}

/**
 * Sets a user's platform role ("user" or "admin") through PUT /admin/users/{id}. A role change
 * ends the user's sessions, so their old tokens stop working: log in again afterwards.
 */
export async function setRole(stack, userId, role) {
    const a = await admin(stack);
    const res = await a.client.put(`/admin/users/${userId}`, { role }, { token: a.token });
    expectStatus(res, 200, `set the role of ${userId} to ${role}`);
    return res.json;
}

/**
 * Creates a policy rule through POST /admin/policies (as an admin would), e.g.
 * { type: 'quota', scope: 'user', scope_id, body: { requests: 2 } }. Returns the rule.
 */
export async function createPolicy(stack, rule) {
    const a = await admin(stack);
    const res = await a.client.post('/admin/policies', { name: 'node test', ...rule }, { token: a.token });
    expectStatus(res, 201, 'create a policy');
    return res.json;
}

/** A locale's message catalogue (locales/<locale>.json of the source tree). */
export function catalogue(locale) {
    return JSON.parse(fs.readFileSync(path.join(sourceDir, 'locales', `${locale}.json`), 'utf8'));
}


