// The web client in a real browser: headless Chromium (Debian's `chromium`, driven by
// playwright-core) against the whole service of lib/stack.mjs — bg-edge serving the client and the
// API, a bg-worker, the demo provider, a private Redis and a fresh database. Nothing is mocked.
//
// What a user would notice: the page and its assets arrive with the right caching and a strict
// Content Security Policy; one can register, sign out and sign in; a message gets a reply that
// streams in and is rendered as Markdown with HTML escaped; a reload finds the conversation; a
// connection dropped in the middle of a reply resumes and ends with the whole reply exactly once;
// switching to Russian changes the page's strings at once and the choice survives a reload; when
// the quota is spent the refusal is shown in Russian with the plans; and the page loads over HTTP/2
// from the TLS listener with no console errors. The tests take the screenshots of the README on the
// way (written to docs/screenshots/ by `make screenshots`).
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';

import {
    catalogue,
    createPolicy,
    freePort,
    skipReason,
    sourceDir,
    startStack,
    timeScale,
} from '../node/lib/stack.mjs';
import { browserSkipReason, launch } from './lib/browser.mjs';

const T = (ms) => Math.round(ms * timeScale);
// `make screenshots` (BGT_SCREENSHOTS=1) refreshes the README's screenshots in docs/screenshots/;
// other runs write theirs to a temporary directory, so a test run never changes the source tree
const shots =
    process.env.BGT_SCREENSHOTS === '1'
        ? path.join(sourceDir, 'docs', 'screenshots')
        : path.join(os.tmpdir(), `bg-screenshots-${process.pid}`);
const PASSWORD = 'Browser-Horse-Battery-42';

/** A plain HTTP/1.1 GET (the browser is not needed to check headers). */
function get(url, headers = {}) {
    return new Promise((resolve, reject) => {
        const req = http.get(url, { headers }, (res) => {
            const chunks = [];
            res.on('data', (c) => chunks.push(c));
            res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, text: Buffer.concat(chunks).toString('utf8') }));
        });
        req.on('error', reject);
    });
}

/**
 * A TCP proxy in front of the edge, so that a test can cut the browser's connections the way a
 * network drop does (the sockets die mid-response) while the service goes on.
 */
async function startProxy(targetPort) {
    const port = await freePort();
    const sockets = new Set();
    const server = net.createServer((client) => {
        const upstream = net.connect(targetPort, '127.0.0.1');
        sockets.add(client);
        sockets.add(upstream);
        const forget = () => {
            sockets.delete(client);
            sockets.delete(upstream);
            client.destroy();
            upstream.destroy();
        };
        client.on('error', forget).on('close', forget);
        upstream.on('error', forget).on('close', forget);
        client.pipe(upstream);
        upstream.pipe(client);
    });
    await new Promise((resolve) => server.listen(port, '127.0.0.1', resolve));
    return {
        url: `http://127.0.0.1:${port}`,
        /** Cuts every open connection. */
        drop() {
            const n = sockets.size;
            for (const s of sockets) s.destroy();
            sockets.clear();
            return n;
        },
        close() {
            for (const s of sockets) s.destroy();
            return new Promise((resolve) => server.close(resolve));
        },
    };
}

async function shot(page, name) {
    fs.mkdirSync(shots, { recursive: true });
    await page.screenshot({ path: path.join(shots, `${name}.png`) });
}

const skip = skipReason() || browserSkipReason();

describe('web client in Chromium', { skip, timeout: T(600000) }, () => {
    let stack;
    let proxy;
    let browser;
    let page;
    const email = `browser-${process.pid}-${Date.now() % 100000}@web.example`;
    let userId;
    let conversationUrl;

    before(async () => {
        // the demo provider at a pace where a reply visibly streams
        stack = await startStack({ provider: { tokensPerSecond: 40 } });
        proxy = await startProxy(stack.edges[0].port);
        browser = await launch();
        page = await browser.newPage();
    });

    after(async () => {
        await browser?.close();
        await proxy?.close();
        const problems = (await stack?.stop()) ?? [];
        assert.deepEqual(problems, [], problems.join('\n'));
    });

    it('serves the page and its assets with caching headers and a strict CSP', async () => {
        const res = await get(`${stack.url}/`);
        assert.equal(res.status, 200);
        assert.match(res.headers['content-type'], /^text\/html/);
        assert.equal(res.headers['cache-control'], 'no-cache');
        assert.equal(res.headers['x-content-type-options'], 'nosniff');
        const csp = res.headers['content-security-policy'];
        for (const d of ["default-src 'self'", "script-src 'self'", "style-src 'self'", "connect-src 'self'", "frame-ancestors 'none'", "base-uri 'none'"]) {
            assert.ok(csp.includes(d), `CSP has ${d}: ${csp}`);
        }
        assert.ok(!/unsafe-inline|unsafe-eval|https?:/.test(csp), `no inline code, no other origin: ${csp}`);
        const etag = res.headers.etag;
        assert.match(etag, /^"[0-9a-f]+"$/);
        const again = await get(`${stack.url}/`, { 'if-none-match': etag });
        assert.equal(again.status, 304);
        assert.equal(again.text, '');

        // a client route is the same page; an API route is still the API
        const chat = await get(`${stack.url}/chat?c=x`);
        assert.equal(chat.status, 200);
        assert.equal(chat.headers.etag, etag);
        const api = await get(`${stack.url}/auth/profile`);
        assert.equal(api.status, 401);
        assert.match(api.headers['content-type'], /json/);

        // every asset the page names is immutable under a content hash, with a validator
        const assets = [...res.text.matchAll(/(?:href|src)="(\/assets\/[0-9a-f]+\/[^"]+)"/g)].map((m) => m[1]);
        assert.ok(assets.some((a) => a.endsWith('/app.js')) && assets.some((a) => a.endsWith('/app.css')), res.text);
        for (const a of assets) {
            const r = await get(`${stack.url}${a}`);
            assert.equal(r.status, 200, a);
            assert.equal(r.headers['cache-control'], 'public, max-age=31536000, immutable', a);
            assert.ok(r.headers.etag, a);
            if (a.endsWith('.js')) assert.match(r.headers['content-type'], /^text\/javascript/, a);
            if (a.endsWith('.css')) assert.match(r.headers['content-type'], /^text\/css/, a);
            const r304 = await get(`${stack.url}${a}`, { 'if-none-match': r.headers.etag });
            assert.equal(r304.status, 304, a);
        }
        const build = assets[0].split('/')[2];
        assert.equal((await get(`${stack.url}/assets/${build}/nope.js`)).status, 404);
        assert.equal((await get(`${stack.url}/assets/0000000000000000/app.js`)).status, 404);
        const ru = await get(`${stack.url}/assets/${build}/i18n.ru.json`);
        assert.equal(ru.status, 200);
        assert.equal(JSON.parse(ru.text)['web.nav.chat'], catalogue('ru')['web.nav.chat']);
    });

    it('registers, signs out and signs in again', async () => {
        await page.goto(`${proxy.url}/`);
        await page.waitForURL(/\/login$/);
        await page.getByRole('link', { name: 'Create account' }).first().click();
        await page.waitForURL(/\/register$/);
        await page.getByLabel('Name (optional)').fill('Ada');
        await page.getByLabel('Email').fill(email);
        await page.getByLabel('Password').fill(PASSWORD);
        await page.locator('#auth-submit').click();
        await page.waitForURL(/\/chat$/);
        await page.getByRole('heading', { name: 'Start a conversation' }).waitFor();

        await page.getByRole('button', { name: 'Sign out' }).click();
        await page.waitForURL(/\/login$/);
        await page.locator('#auth-notice').getByText('You have signed out.').waitFor();
        // signed out for real: the profile is refused without a fresh sign-in
        await page.goto(`${proxy.url}/profile`);
        await page.waitForURL(/\/login$/);

        await page.getByLabel('Email').fill(email);
        await page.getByLabel('Password').fill('wrong-password-123');
        await page.locator('#auth-submit').click();
        await page.locator('#auth-error').getByText(catalogue('en')['error.invalid_credentials']).waitFor();
        await page.getByLabel('Password').fill(PASSWORD);
        await page.locator('#auth-submit').click();
        await page.waitForURL(/\/chat$/);
        const profile = await page.evaluate(() => fetch('/auth/profile').then((r) => r.json()));
        assert.equal(profile.email, email);
        userId = profile.id;
    });

    it('streams a reply and renders it as Markdown with HTML escaped', async () => {
        await page.locator('#new-conversation').click();
        await page.waitForURL(/\/chat\?c=/);
        conversationUrl = page.url();
        const input = page.getByLabel('Message');
        await input.fill('Hello **world** and `code` <img src=x id=injected>');
        await input.press('Enter');
        // the reply arrives in pieces: partial text is on screen before it is complete
        const streaming = page.locator('#streaming-text');
        await streaming.getByText('Echo:').waitFor({ timeout: T(20000) });
        const partial = await streaming.innerText();
        await page.locator('#stop').waitFor();
        await page.locator('#send').waitFor({ timeout: T(30000) });
        const reply = page.locator('.msg.assistant').last();
        const full = await reply.locator('.body').innerText();
        assert.ok(full.startsWith(partial.trim().slice(0, 10)), `${partial} / ${full}`);
        assert.ok(full.length > partial.length, 'the reply grew after the first delta');
        assert.match(full, /laborum/);
        // Markdown: bold and code rendered; the HTML of the message shown as text, not markup
        assert.equal(await reply.locator('strong').first().innerText(), 'world');
        assert.equal(await reply.locator('code').first().innerText(), 'code');
        assert.equal(await page.locator('#injected').count(), 0);
        assert.match(full, /<img src=x id=injected>/);
        await shot(page, 'chat-en');
    });

    it('finds the conversation after a reload', async () => {
        await page.reload();
        assert.equal(page.url(), conversationUrl);
        await page.locator('.msg.assistant').first().waitFor();
        assert.equal(await page.locator('.msg.user').count(), 1);
        assert.match(await page.locator('.msg.user').first().innerText(), /Hello \*\*world\*\*/);
        assert.match(await page.locator('.msg.assistant .body').first().innerText(), /laborum/);
        assert.equal(await page.locator('#conversations li').count(), 1);
        // the conversation took its name from the first message
        assert.match(await page.locator('#conversation-title').innerText(), /^Hello \*\*world\*\*/);
    });

    it('resumes a reply after the network drops, without losing or repeating text', async () => {
        const input = page.getByLabel('Message');
        await input.fill('Keep going #fail:slow=200');
        await input.press('Enter');
        const streaming = page.locator('#streaming-text');
        await streaming.getByText('Lorem').waitFor({ timeout: T(20000) });
        // the network goes away in the middle of the reply, and comes back
        await browser.context.setOffline(true);
        assert.ok(proxy.drop() > 0, 'there were connections to cut');
        await page.locator('#banner').getByText(catalogue('en')['web.error.offline']).waitFor();
        await page.waitForTimeout(T(1500));
        await browser.context.setOffline(false);
        await page.locator('#send').waitFor({ timeout: T(60000) });

        const conv = new URL(page.url()).searchParams.get('c');
        const stored = await page.evaluate(
            (id) => fetch(`/chat/conversations/${id}/messages?order=asc&limit=100`).then((r) => r.json()),
            conv,
        );
        const last = stored.data.at(-1);
        assert.equal(last.role, 'assistant');
        const shown = await page.locator('.msg.assistant .body').last().innerText();
        const norm = (s) => s.replace(/\s+/g, ' ').trim();
        assert.equal(norm(shown), norm(last.content));
        assert.equal(shown.split('Echo:').length - 1, 1, 'the echo appears once');
        assert.equal(shown.split('laborum').length - 1, 1, 'the end appears once');
        assert.equal(await page.locator('#banner').isVisible(), false);
    });

    it('shows the plans page and the profile', async () => {
        await page.getByRole('link', { name: 'Plans and billing' }).click();
        await page.waitForURL(/\/plans$/);
        await page.locator('#plans-table').waitFor();
        assert.equal(await page.locator('#plans-table tbody tr').count() >= 4, true);
        await page.locator('#quota-remaining').waitFor();
        assert.match(await page.locator('#quota-remaining').innerText(), /\d+ of \d+/);
        // this stack has no Paddle account configured: subscribing shows the server's own
        // localized reason (503 billing_unavailable) instead of failing silently
        await page.locator('tr[data-plan="monthly"] button').click();
        await page.locator('#plans-notice').getByText(catalogue('en')['error.billing_unavailable']).waitFor();
        // the turns of the chat tests above show up in the usage by day (GET /billing/usage)
        await page.locator('#usage-by-day .days li').first().waitFor();
        assert.match(await page.locator('#usage-by-day figcaption').innerText(), /Web: \d+/);
        // the payment history comes from GET /billing/history (the ledger): a new user has none
        await page.getByText(catalogue('en')['web.plans.history_empty']).waitFor();
        await shot(page, 'plans-en');
        await page.getByRole('link', { name: 'Profile' }).click();
        await page.locator('#profile-email').getByText(email).waitFor();
        await shot(page, 'profile-en');
    });

    it('switches the whole page to Russian and keeps the choice', async () => {
        const ru = catalogue('ru');
        await page.getByLabel('Language', { exact: true }).selectOption('ru');
        await page.getByRole('heading', { name: ru['web.profile.title'] }).waitFor();
        // every visible string changed at once: navigation, labels, the document language
        assert.equal(await page.getByRole('link', { name: ru['web.nav.chat'] }).count(), 1);
        assert.equal(await page.getByRole('link', { name: ru['web.nav.plans'] }).count(), 1);
        assert.equal(await page.getByRole('button', { name: ru['web.nav.logout'] }).count(), 1);
        assert.equal(await page.locator('html').getAttribute('lang'), 'ru');
        assert.equal(await page.getByText('Profile', { exact: true }).count(), 0);
        await shot(page, 'profile-ru');

        await page.reload();
        await page.getByRole('heading', { name: ru['web.profile.title'] }).waitFor();
        const profile = await page.evaluate(() => fetch('/auth/profile').then((r) => r.json()));
        assert.equal(profile.locale, 'ru');

        await page.getByRole('link', { name: ru['web.nav.plans'] }).click();
        await page.locator('#plans-table').waitFor();
        await page.getByRole('heading', { name: ru['web.plans.available'], exact: true }).waitFor();
        await shot(page, 'plans-ru');
        await page.goto(conversationUrl);
        await page.locator('.msg.assistant').first().waitFor();
        assert.equal(await page.getByRole('button', { name: ru['web.chat.send'] }).count(), 1);
        await shot(page, 'chat-ru');
    });

    it('shows the spent quota in Russian with the plans', async () => {
        const ru = catalogue('ru');
        await createPolicy(stack, {
            type: 'quota',
            scope: 'user',
            scope_id: userId,
            priority: 0,
            body: { requests: 1, concurrency: 10 },
        });
        const input = page.getByLabel(ru['web.chat.message']);
        await input.fill('Ещё один вопрос');
        await input.press('Enter');
        const box = page.locator('#chat-error');
        await box.waitFor({ timeout: T(20000) });
        assert.equal(await box.getAttribute('data-code'), 'quota_exceeded');
        await box.getByText(ru['error.quota_exceeded']).waitFor();
        await box.getByText(ru['web.plans.name_monthly']).waitFor();
        await box.getByRole('link', { name: ru['web.chat.see_plans'] }).waitFor();
        // the refused message stays in the box to send later, and no reply was added
        assert.equal(await input.inputValue(), 'Ещё один вопрос');
        assert.equal(await page.locator('.msg.user').count(), 2);
        await shot(page, 'quota-ru');
    });

    it('refreshes an expired session silently, and asks to sign in when it is over', async () => {
        // the access token's cookie goes away (as when it expires): the page refreshes it unseen
        await browser.context.clearCookies({ name: 'bg_at' });
        await page.goto(`${proxy.url}/plans`);
        await page.locator('#plans-table').waitFor();
        assert.equal(new URL(page.url()).pathname, '/plans');
        const cookies = await browser.context.cookies();
        assert.ok(cookies.some((c) => c.name === 'bg_at'), 'a new access token was set');

        // the session itself ends (both tokens gone): the next request leads to the sign-in page
        await browser.context.clearCookies({ name: 'bg_at' });
        await browser.context.clearCookies({ name: 'bg_rt' });
        await page.getByRole('link', { name: catalogue('ru')['web.nav.chat'] }).click();
        await page.waitForURL(/\/login$/);
        await page.locator('#auth-notice').getByText(catalogue('ru')['web.error.session_expired']).waitFor();
    });

    it('loads over HTTP/2 from the TLS listener with no console errors', async () => {
        const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bgb-tls.'));
        try {
            execFileSync('openssl', [
                'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
                '-days', '2', '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
                '-keyout', path.join(dir, 'key.pem'), '-out', path.join(dir, 'cert.pem'),
            ], { stdio: 'ignore' });
            const tlsPort = await freePort();
            await stack.startEdge({
                BG_HTTPS_PORT: String(tlsPort),
                BG_TLS_CERT: path.join(dir, 'cert.pem'),
                BG_TLS_KEY: path.join(dir, 'key.pem'),
            });
            const tls = await launch({ ignoreHTTPSErrors: true });
            try {
                const p = await tls.newPage();
                const base = `https://127.0.0.1:${tlsPort}`;
                await p.goto(`${base}/`);
                await p.waitForURL(/\/login$/);
                await p.locator('body[data-ready="true"]').waitFor();
                const proto = await p.evaluate(() => performance.getEntriesByType('navigation')[0].nextHopProtocol);
                assert.equal(proto, 'h2');
                const assetProtos = await p.evaluate(() =>
                    performance.getEntriesByType('resource').map((e) => `${e.name} ${e.nextHopProtocol}`));
                assert.ok(assetProtos.length >= 3, assetProtos.join('\n'));
                for (const a of assetProtos) assert.match(a, / h2$/);
                // signed in, the chat loads over the same connection without errors too
                await p.getByLabel('Email').fill(email);
                await p.getByLabel('Password').fill(PASSWORD);
                await p.locator('#auth-submit').click();
                await p.waitForURL(/\/chat$/);
                await p.locator('#conversations li').first().waitFor();
                assert.deepEqual(p.errors, []);
            } finally {
                await tls.close();
            }
        } finally {
            fs.rmSync(dir, { recursive: true, force: true });
        }
    });
});
