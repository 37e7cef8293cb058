// The web client's other pages in a real browser (headless Chromium, see lib/browser.mjs) against
// the whole service of lib/stack.mjs: stopping a reply mid-stream, renaming and deleting a
// conversation, API keys (the key shown once, working against /v1/models, refused once revoked),
// the plans page with a paid plan (switch buttons, invoices), the profile's Telegram link, the
// notifications bell, and the administration (statistics with real numbers, search a user,
// disable them, and that user's next request fails).
//
// Rows the browser cannot make here are written with SQL the way the services write them: a web
// notification (the notify worker's row) and invoices (the billing worker's, from Paddle, which this
// stack does not have). Where a route another part of the service adds is not in this build yet
// (GET /notifications, GET /billing/invoices, POST /auth/telegram/link-code), the test checks that
// the page says so instead of failing.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';

import {
    admin,
    catalogue,
    grantPlan,
    run,
    skipReason,
    sourceDir,
    startStack,
    timeScale,
} from '../node/lib/stack.mjs';
import { browserSkipReason, launch } from './lib/browser.mjs';

const T = (ms) => Math.round(ms * timeScale);
const shots =
    process.env.BGT_SCREENSHOTS === '1'
        ? path.join(sourceDir, 'docs', 'screenshots')
        : path.join(os.tmpdir(), `bg-screenshots-${process.pid}`);
const PASSWORD = 'Browser-Horse-Battery-42';
const en = catalogue('en');
const norm = (s) => s.replace(/\s+/g, ' ').trim();
/** A catalogue string with its {placeholders} filled. */
const fill = (s, params) => s.replace(/\{(\w+)\}/g, (m, k) => (params[k] !== undefined ? String(params[k]) : m));

async function shot(page, name) {
    fs.mkdirSync(shots, { recursive: true });
    await page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });
}

const skip = skipReason() || browserSkipReason();

describe('web client pages in Chromium', { skip, timeout: T(600000) }, () => {
    let stack;
    let browser; // the user's
    let page;
    let adminBrowser;
    let adminPage;
    let boss;
    const email = `pages-${process.pid}-${Date.now() % 100000}@web.example`;
    let userId;

    /** Runs SQL on the stack's database: the output of psql -At. */
    async function sql(text) {
        const r = await run(['psql', stack.databaseUrl, '-X', '-q', '-At', '-v', 'ON_ERROR_STOP=1', '-c', text]);
        assert.equal(r.code, 0, `${text}: ${r.stderr}`);
        return r.stdout.trim();
    }

    /** An API call from the page, with its cookies: { status, body }. */
    function pageFetch(p, url, init = {}) {
        return p.evaluate(async ([u, i]) => {
            const csrf = /(?:^|;\s*)bg_csrf=([^;]+)/.exec(document.cookie)?.[1] ?? '';
            const r = await fetch(u, { ...i, headers: { 'content-type': 'application/json', 'x-csrf-token': decodeURIComponent(csrf), ...(i.headers ?? {}) } });
            const text = await r.text();
            let body = null;
            try {
                body = JSON.parse(text);
            } catch {
                body = text;
            }
            return { status: r.status, body };
        }, [url, init]);
    }

    before(async () => {
        stack = await startStack({ provider: { tokensPerSecond: 40 } });
        browser = await launch();
        page = await browser.newPage();
        page.on('dialog', (d) => d.accept(d.type() === 'prompt' ? page.nextPrompt ?? '' : undefined));
        boss = await admin(stack);
    });

    after(async () => {
        await browser?.close();
        await adminBrowser?.close();
        const problems = (await stack?.stop()) ?? [];
        assert.deepEqual(problems, [], problems.join('\n'));
    });

    it('registers a user on a plan with API access', async () => {
        await page.goto(`${stack.url}/register`);
        await page.getByLabel('Name (optional)').fill('Grace');
        await page.getByLabel('Email').fill(email);
        await page.getByLabel('Password').fill(PASSWORD);
        await page.locator('#auth-submit').click();
        await page.waitForURL(/\/chat$/);
        userId = (await pageFetch(page, '/auth/profile')).body.id;
        // bgctl recompiles the user's admission state: the page sees the plan at once
        await grantPlan(stack, { userId }, 'monthly', 30);
    });

    it('stops a reply in the middle and keeps what was generated', async () => {
        await page.locator('#new-conversation').click();
        await page.waitForURL(/\/chat\?c=/);
        const input = page.getByLabel('Message');
        await input.fill('Tell me slowly #fail:slow=150');
        await input.press('Enter');
        await page.locator('#streaming-text').getByText('Lorem').waitFor({ timeout: T(20000) });
        await page.locator('#stop:not([disabled])').click();
        // the reply ends once the worker has the provider's usage: meanwhile the page says so
        await page.locator(`#send, #streaming-status:has-text("${en['web.chat.stopping']}")`).first().waitFor();
        await page.locator('#send').waitFor({ timeout: T(20000) });

        const reply = page.locator('.msg.assistant').last();
        await reply.getByText(en['web.chat.stopped']).waitFor();
        const shown = norm(await reply.locator('.body').innerText());
        assert.match(shown, /^Echo: Tell me slowly/);
        assert.doesNotMatch(shown, /laborum/, 'the reply stopped before its end');

        // what is stored is the same partial reply, marked as stopped, and a reload shows it so
        const conv = new URL(page.url()).searchParams.get('c');
        const stored = (await pageFetch(page, `/chat/conversations/${conv}/messages?order=asc&limit=100`)).body.data;
        const last = stored.at(-1);
        assert.equal(last.role, 'assistant');
        assert.equal(last.status, 'canceled');
        assert.equal(norm(last.content), shown);
        await page.reload();
        const again = page.locator('.msg.assistant').last();
        await again.getByText(en['web.chat.stopped']).waitFor();
        assert.equal(norm(await again.locator('.body').innerText()), shown);
    });

    it('renames and deletes a conversation', async () => {
        const conv = new URL(page.url()).searchParams.get('c');
        const title = await page.locator('#conversation-title').innerText();
        page.nextPrompt = 'Renamed in the browser';
        await page.getByRole('button', { name: fill(en['web.chat.rename_named'], { title }) }).click();
        await page.locator('#conversation-title').getByText('Renamed in the browser').waitFor();
        await page.locator('#conversations').getByRole('link', { name: 'Renamed in the browser' }).waitFor();
        await page.reload();
        await page.locator('#conversation-title').getByText('Renamed in the browser').waitFor();
        assert.equal((await pageFetch(page, `/chat/conversations/${conv}`)).body.title, 'Renamed in the browser');

        await page.getByRole('button', { name: fill(en['web.chat.delete_named'], { title: 'Renamed in the browser' }) }).click();
        await page.getByRole('heading', { name: en['web.chat.welcome'] }).waitFor();
        assert.equal(new URL(page.url()).search, '');
        assert.equal(await page.locator('#conversations li').count(), 0);
        assert.equal((await pageFetch(page, `/chat/conversations/${conv}`)).status, 404);
        await page.reload();
        await page.getByText(en['web.chat.no_conversations']).waitFor();
    });

    it('creates an API key shown once that works against /v1/models, and revokes it', async () => {
        const isKeys = (method) => (r) => new URL(r.url()).pathname === '/auth/api-keys' && r.request().method() === method;
        // the page lists the keys first; typing before that list arrives would be typed into a
        // form the next render replaces
        const listed = page.waitForResponse(isKeys('GET'));
        await page.getByRole('link', { name: en['web.nav.keys'] }).click();
        await page.waitForURL(/\/keys$/);
        await listed;
        await page.getByLabel(en['web.keys.name']).fill('browser key');
        const created = page.waitForResponse(isKeys('POST'));
        await page.getByRole('button', { name: en['web.keys.create'] }).click();
        const answer = await created;
        assert.equal(answer.status(), 201, await answer.text());
        const key = (await page.locator('#new-key').innerText()).trim();
        assert.ok(key.length > 20, key);
        const models = await fetch(`${stack.url}/v1/models`, { headers: { authorization: `Bearer ${key}` } });
        assert.equal(models.status, 200);
        assert.ok((await models.json()).data.length > 0);

        // shown once: after a reload the list has the key's name, never the key
        await page.reload();
        await page.locator('.keys li').getByText('browser key').waitFor();
        assert.equal(await page.locator('#new-key').count(), 0);
        assert.equal((await page.content()).includes(key), false);

        await page.getByRole('button', { name: fill(en['web.keys.revoke_named'], { name: 'browser key' }) }).click();
        await page.getByText(en['web.keys.empty']).waitFor();
        const refused = await fetch(`${stack.url}/v1/models`, { headers: { authorization: `Bearer ${key}` } });
        assert.equal(refused.status, 401);
    });

    it('shows a paid plan with switch buttons and the invoices', async () => {
        const invoicesRoute = (await pageFetch(page, '/billing/invoices')).status;
        if (invoicesRoute === 200) {
            const sub = await sql(`SELECT id FROM subscriptions WHERE user_id = '${userId}' AND status <> 'canceled'`);
            await sql(`INSERT INTO billing_accounts (user_id) VALUES ('${userId}') ON CONFLICT (user_id) DO NOTHING`);
            const acct = await sql(`SELECT id FROM billing_accounts WHERE user_id = '${userId}'`);
            // the payment Paddle reported for the newest invoice: the account shows its card
            await sql(`INSERT INTO webhook_inbox (provider, event_id, event_type, occurred_at, payload, processed_at)
                       VALUES ('paddle', 'evt_pages_1', 'transaction.completed', now() - interval '1 day',
                               '{"data":{"id":"txn_pages_1","status":"completed","payments":[{"status":"captured",
                                 "method_details":{"type":"card","card":{"type":"visa","last4":"4242"}}}]}}', now())`);
            await sql(`INSERT INTO invoices (billing_account_id, subscription_id, number, status, currency,
                         subtotal_minor, tax_minor, total_minor, period_start, period_end, issued_at, paid_at,
                         paddle_transaction_id)
                       VALUES ('${acct}', '${sub}', 'INV-PAGES-1', 'paid', 'USD', 1665, 334, 1999,
                               now() - interval '1 day', now() + interval '29 days', now() - interval '1 day', now() - interval '1 day',
                               'txn_pages_1'),
                              ('${acct}', '${sub}', 'INV-PAGES-0', 'refunded', 'USD', 416, 83, 499,
                               now() - interval '40 days', now() - interval '33 days', now() - interval '40 days', now() - interval '40 days',
                               NULL)`);
        }
        await page.getByRole('link', { name: en['web.nav.plans'] }).click();
        await page.locator('#plans-table').waitFor();
        await page.locator('#current-plan').getByText(en['web.plans.name_monthly']).waitFor();
        // a live plan: the other plans offer a switch, not a new subscription
        const weekly = page.locator('tr[data-plan="weekly"] button');
        assert.equal(await weekly.getAttribute('data-action'), 'switch');
        assert.equal(norm(await weekly.innerText()), en['web.plans.switch']);

        if (invoicesRoute === 200) {
            const rows = page.locator('#invoices-table tbody tr');
            await rows.first().waitFor();
            assert.equal(await rows.count(), 2);
            const first = rows.first();
            assert.equal(norm(await first.locator('th').innerText()), 'INV-PAGES-1');
            assert.match(await first.innerText(), /\$19\.99/);
            assert.match(await first.innerText(), new RegExp(en['web.plans.invoice_status_paid']));
            const view = first.getByRole('link', { name: fill(en['web.plans.invoice_view_named'], { number: 'INV-PAGES-1' }) });
            assert.equal(await view.getAttribute('target'), '_blank');
            const listed = (await pageFetch(page, '/billing/invoices')).body.data;
            assert.equal(await view.getAttribute('href'), listed.find((x) => x.number === 'INV-PAGES-1').html_url);
            assert.match(await rows.nth(1).innerText(), new RegExp(en['web.plans.invoice_status_refunded']));
            assert.equal(norm(await page.locator('#payment-method').innerText()),
                fill(en['web.plans.card'], { brand: 'Visa', last4: '4242' }));
        } else {
            await page.locator('#invoices-unavailable').getByText(en['web.plans.invoices_unavailable']).waitFor();
        }
        await shot(page, 'plans-paid-en');

        // switching a plan that was granted, not bought at Paddle, leads to the checkout, which
        // this stack (no Paddle account) refuses with its own localized reason
        await weekly.click();
        const notice = page.locator('#plans-notice');
        await notice.waitFor();
        const said = norm(await notice.innerText());
        assert.ok([en['error.billing_unavailable'], en['web.plans.not_available']].includes(said), said);

        // a renewal payment failed: the plan is kept and the page offers to pay
        await sql(`UPDATE subscriptions SET status = 'past_due' WHERE user_id = '${userId}' AND status <> 'canceled'`);
        await page.reload();
        const due = page.locator('#past-due');
        await due.waitFor();
        assert.ok(norm(await due.innerText()).includes(en['web.plans.past_due']), await due.innerText());
        await page.locator('#current-plan').getByText(en['web.plans.name_monthly']).waitFor();
        await sql(`UPDATE subscriptions SET status = 'active' WHERE user_id = '${userId}' AND status <> 'canceled'`);
        await page.reload();
        await page.locator('#plans-table').waitFor();
        assert.equal(await page.locator('#past-due').count(), 0);
    });

    it('gives the command that links Telegram on the profile', async () => {
        await page.getByRole('link', { name: en['web.nav.profile'] }).click();
        await page.getByRole('button', { name: en['web.profile.telegram_link'] }).click();
        const result = page.locator('#telegram-result');
        await result.waitFor();
        const route = await pageFetch(page, '/auth/telegram/link-code', { method: 'POST', body: '{}' });
        if (route.status === 201) {
            assert.match(await page.locator('#telegram-command').innerText(), /^\/link \S+$/);
        } else {
            assert.equal(norm(await result.innerText()), en['web.profile.telegram_unavailable']);
        }
    });

    it('shows a new notification on the bell and marks it read', async (t) => {
        const route = await pageFetch(page, '/notifications?unread=1');
        if (route.status === 404 || route.status === 405) {
            assert.equal(await page.locator('#notifications-button').count(), 0, 'no bell without the route');
            t.skip('GET /notifications is not in this build');
            return;
        }
        assert.equal(route.status, 200);
        const before = route.body.unread;
        // a web notification as the notify worker stores it: shown in the app, already "sent"
        const kind = Object.keys(en).map((k) => /^notify\.([a-z0-9_.]+)\.title$/.exec(k)?.[1]).find(Boolean) ?? 'payment_succeeded';
        await sql(`INSERT INTO notifications (user_id, channel, kind, dedupe_key, locale, payload, status, sent_at)
                   VALUES ('${userId}', 'web', '${kind}', 'browser:${process.pid}:${Date.now()}', 'en',
                           '{"plan":"monthly","plan_name":"Monthly","amount":"$19.99","amount_minor":1999,"currency":"USD","date":"2026-12-01","days":3}',
                           'sent', now())`);
        // the page asks when it starts, on navigation and every 30 s: a reload is the quickest
        await page.reload();
        const bell = page.locator('#notifications-button');
        const label = fill(en['web.notifications.unread_count'], { count: before + 1 });
        await page.getByRole('button', { name: label }).waitFor({ timeout: T(10000) });
        assert.equal(norm(await page.locator('#notifications-count').innerText()), String(before + 1));
        await bell.click();
        const item = page.locator('#notifications-list li.unread').first();
        await item.waitFor();
        assert.ok(norm(await item.locator('strong').innerText()).length > 0);
        await shot(page, 'notifications-en');
        await page.locator('#notifications-read-all').click();
        await page.locator('#notifications-list li.unread').first().waitFor({ state: 'detached' });
        await page.keyboard.press('Escape');
        await page.getByRole('button', { name: en['web.notifications.title'], exact: true }).waitFor();
        assert.equal(await page.locator('#notifications-count').isVisible(), false);
        assert.equal((await pageFetch(page, '/notifications?unread=1')).body.unread, 0);
    });

    it('shows the statistics, finds the user and disables them; their next request fails', async () => {
        adminBrowser = await launch();
        adminPage = await adminBrowser.newPage();
        await adminPage.goto(`${stack.url}/login`);
        await adminPage.getByLabel('Email').fill(boss.email);
        await adminPage.getByLabel('Password').fill(boss.password);
        await adminPage.locator('#auth-submit').click();
        await adminPage.waitForURL(/\/chat$/);
        await adminPage.getByRole('link', { name: en['web.nav.admin'] }).click();
        await adminPage.locator('#stats').waitFor();

        // the page shows the API's figures: two users, the one stopped turn of today
        const s = (await pageFetch(adminPage, '/admin/stats')).body;
        assert.equal(s.users.total, 2);
        assert.ok(s.usage.today.requests >= 1, JSON.stringify(s.usage));
        const num = (n) => new Intl.NumberFormat('en').format(n);
        assert.equal(norm(await adminPage.locator('#stats-users').innerText()), '2');
        assert.equal(norm(await adminPage.locator('#stats-requests-today').innerText()), num(s.usage.today.requests));
        assert.equal(norm(await adminPage.locator('#stats-tokens-30d').innerText()), num(s.usage.last_30_days.tokens));
        assert.equal(await adminPage.locator('#stats-by-day .days li').count(), 30);
        await adminPage.locator('#stats-subscriptions tr[data-plan="monthly"][data-status="active"]').waitFor();
        await shot(adminPage, 'admin-en');

        await adminPage.getByLabel(en['web.admin.search']).fill(email);
        await adminPage.getByRole('button', { name: en['web.admin.search_button'] }).click();
        const rows = adminPage.locator('table:not(#stats-subscriptions):not(#logs-table) tbody tr');
        await adminPage.waitForFunction(() => document.querySelectorAll('table:not(#stats-subscriptions):not(#logs-table) tbody tr').length === 1);
        assert.match(await rows.first().innerText(), new RegExp(email.replace(/[.]/g, '\\.')));
        await adminPage.getByRole('button', { name: fill(en['web.admin.disable_named'], { email }) }).click();
        await adminPage.getByRole('button', { name: fill(en['web.admin.enable_named'], { email }) }).waitFor();
        await rows.first().getByText(en['web.admin.status_disabled']).waitFor();
        // the log shows the disabling first, by the admin; the action filter shows what the API does
        const logRows = adminPage.locator('#logs-table tbody tr');
        await adminPage.locator('#logs-table tbody tr[data-action="user.disable"]').waitFor();
        assert.equal(await logRows.first().getAttribute('data-action'), 'user.disable');
        assert.match(await logRows.first().innerText(), new RegExp(boss.email.replace(/[.]/g, '\\.')));
        await adminPage.getByLabel(en['web.admin.logs_action']).fill('user.');
        await adminPage.getByRole('button', { name: en['web.admin.logs_filter'] }).click();
        const want = (await pageFetch(adminPage, '/admin/logs?action=user.&limit=20')).body.data.map((x) => x.id);
        await adminPage.waitForFunction((ids) => [...document.querySelectorAll('#logs-table tbody tr')].map((tr) => tr.dataset.id).join() === ids.join(), want);
        assert.deepEqual(adminPage.errors, []);

        // the user's next request fails: the session is over, the page asks to sign in again
        await page.getByRole('link', { name: en['web.nav.plans'] }).click();
        await page.waitForURL(/\/login$/);
        await page.locator('#auth-notice').getByText(en['web.error.session_expired']).waitFor();
        assert.equal((await pageFetch(page, '/auth/profile')).status, 401);
        // and signing in again is refused
        await page.getByLabel('Email').fill(email);
        await page.getByLabel('Password').fill(PASSWORD);
        await page.locator('#auth-submit').click();
        await page.locator('#auth-error').filter({ hasText: /\S/ }).waitFor();
        assert.equal(new URL(page.url()).pathname, '/login');
    });
});
