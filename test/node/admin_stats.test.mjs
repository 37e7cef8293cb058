// GET /admin/stats against the whole service: the figures an admin reads must be the real ones
// after real activity — users who registered, signed in and chatted through the edge, the worker
// and the demo provider (their usage written by the usage worker), plans granted with bgctl, a user
// disabled by the admin, and money in the ledger. Money is posted with SQL the way the billing
// worker posts a Paddle payment (user `payments` +, system `sales` −, one balanced transaction):
// this stack has no Paddle.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import {
    admin,
    expectStatus,
    grantPlan,
    login,
    registerUser,
    run,
    skipReason,
    sleep,
    startStack,
    timeScale,
} from './lib/stack.mjs';

const T = (ms) => Math.round(ms * timeScale);

describe('GET /admin/stats', { skip: skipReason(), timeout: T(180000) }, () => {
    let stack;
    let client;
    let boss;
    const users = [];

    /** Runs SQL on the stack's database; the output of psql -At. */
    async function sql(text) {
        const r = await run(['psql', stack.databaseUrl, '-X', '-q', '-At', '-v', 'ON_ERROR_STOP=1', '-c', text]);
        assert.equal(r.code, 0, `${text}: ${r.stderr}`);
        return r.stdout.trim();
    }

    /** Posts a payment of amount minor units of currency to the ledger, effective daysAgo ago. */
    async function payment(userId, key, amount, currency, daysAgo) {
        await sql(`BEGIN;
            INSERT INTO ledger_accounts (owner_type, owner_id, purpose, unit) VALUES
              ('user', '${userId}', 'payments', '${currency}'), ('system', NULL, 'sales', '${currency}')
              ON CONFLICT DO NOTHING;
            WITH t AS (INSERT INTO ledger_transactions (idempotency_key, kind, user_id, effective_at)
                       VALUES ('${key}', 'payment.paddle', '${userId}', now() - interval '${daysAgo} days') RETURNING id)
            INSERT INTO ledger_entries (transaction_id, account_id, unit, amount)
              SELECT t.id, a.id, a.unit, CASE WHEN a.owner_type = 'user' THEN ${amount} ELSE -${amount} END
                FROM t, ledger_accounts a
               WHERE a.unit = '${currency}' AND ((a.owner_type = 'user' AND a.owner_id = '${userId}')
                     OR (a.owner_type = 'system' AND a.purpose = 'sales'));
            COMMIT;`);
    }

    async function stats(token = boss.token) {
        const res = await client.get('/admin/stats', { token });
        return expectStatus(res, 200, 'GET /admin/stats').json;
    }

    /** A chat turn through the edge, read to its end. */
    async function chat(u, content) {
        const agents = expectStatus(await client.get('/agents', { token: u.token }), 200, 'agents').json.data;
        const conv = expectStatus(
            await client.post('/chat/conversations', { agent_id: agents[0].id }, { token: u.token }),
            201,
            'conversation',
        ).json;
        const es = await client.stream('POST', `/chat/conversations/${conv.id}/messages`, { token: u.token, json: { content } });
        const events = await es.all();
        assert.equal(events.at(-1)?.event, 'done', es.text);
    }

    before(async () => {
        stack = await startStack({ provider: { tokensPerSecond: 0 } });
        client = stack.client(0);
        boss = await admin(stack);
    });

    after(async () => {
        const problems = (await stack?.stop()) ?? [];
        assert.deepEqual(problems, [], problems.join('\n'));
    });

    it('is for admins only', async () => {
        const u = await registerUser(client);
        users.push(u);
        const anon = await client.get('/admin/stats');
        assert.equal(anon.status, 401);
        assert.equal(anon.json.error.code, 'unauthorized');
        const plain = await client.get('/admin/stats', { token: u.token });
        assert.equal(plain.status, 403);
        assert.equal(plain.json.error.code, 'forbidden');
    });

    it('counts users, subscriptions, requests, tokens and revenue as they happen', async () => {
        users.push(await registerUser(client));
        users.push(await registerUser(client));
        const [a, b, c] = users;
        await grantPlan(stack, { email: a.email }, 'monthly', 30);
        await grantPlan(stack, { email: b.email }, 'weekly', 7);
        Object.assign(a, await login(client, a.email));
        Object.assign(b, await login(client, b.email));
        Object.assign(c, await login(client, c.email));
        await chat(a, 'one two three');
        await chat(a, 'four five');
        await chat(b, 'six');

        // the usage worker writes the records after the replies: wait until all three are in
        let s;
        const deadline = Date.now() + T(30000);
        for (;;) {
            s = await stats();
            if (s.usage.today.requests === 3 || Date.now() > deadline) break;
            await sleep(100);
        }
        assert.equal(s.usage.today.requests, 3, JSON.stringify(s.usage.today));
        assert.equal(s.usage.last_30_days.requests, 3);
        assert.equal(s.usage.today.errors, 0);

        // the tokens are the ones each user's own usage page reports
        let tokens = 0;
        for (const u of [a, b]) {
            const mine = expectStatus(await client.get('/billing/usage', { token: u.token }), 200, 'usage').json;
            tokens += mine.totals.prompt_tokens + mine.totals.completion_tokens;
        }
        assert.ok(tokens > 0);
        assert.equal(s.usage.today.tokens, tokens);
        assert.equal(s.usage.last_30_days.tokens, tokens);

        // 30 days, oldest first, ending today (UTC), zero-filled
        assert.equal(s.usage.by_day.length, 30);
        const today = new Date().toISOString().slice(0, 10);
        assert.equal(s.usage.by_day.at(-1).date, today);
        assert.deepEqual(s.usage.by_day.at(-1), { date: today, requests: 3, errors: 0, tokens });
        assert.ok(s.usage.by_day.slice(0, -1).every((d) => d.requests === 0 && d.tokens === 0));
        assert.ok(s.usage.by_day.every((d, i) => i === 0 || d.date > s.usage.by_day[i - 1].date));

        // the admin and three users, all signed in today
        assert.deepEqual(s.users, { total: 4, active_7d: 4, new_7d: 4, disabled: 0 });

        // subscriptions as each user's own account reports them
        const expected = new Map();
        for (const u of users) {
            const acc = expectStatus(await client.get('/billing/account', { token: u.token }), 200, 'account').json;
            if (acc.plan) {
                const k = `${acc.plan}/${acc.status}`;
                expected.set(k, (expected.get(k) ?? 0) + 1);
            }
        }
        assert.equal(expected.get('monthly/active'), 1, JSON.stringify([...expected]));
        assert.equal(expected.get('weekly/active'), 1);
        const live = new Map(s.subscriptions.filter((x) => x.status !== 'canceled').map((x) => [`${x.plan}/${x.status}`, x.count]));
        assert.deepEqual(live, expected);

        assert.deepEqual(s.revenue, []);
        assert.match(s.generated_at, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/);
    });

    it('adds up revenue of the last 30 days per currency, and follows disabled and idle users', async () => {
        const [a, b, c] = users;
        await payment(a.user.id, `stats:a1:${process.pid}`, 1999, 'USD', 0);
        await payment(b.user.id, `stats:b1:${process.pid}`, 499, 'USD', 3);
        await payment(b.user.id, `stats:b2:${process.pid}`, 900, 'EUR', 29);
        await payment(a.user.id, `stats:a0:${process.pid}`, 5000, 'USD', 31); // too old to count

        // an admin disables c, and b has not been seen for 8 days
        expectStatus(await client.put(`/admin/users/${c.user.id}`, { status: 'disabled' }, { token: boss.token }), 200, 'disable');
        await sql(`UPDATE users SET last_login_at = now() - interval '8 days' WHERE id = '${b.user.id}'`);
        await sql(`UPDATE usage_daily SET day = day - 8 WHERE user_id = '${b.user.id}'`);

        const s = await stats();
        assert.deepEqual(s.revenue, [
            { currency: 'EUR', amount_minor: 900, transactions: 1 },
            { currency: 'USD', amount_minor: 2498, transactions: 2 },
        ]);
        assert.equal(s.users.total, 4);
        assert.equal(s.users.disabled, 1);
        assert.equal(s.users.active_7d, 3, JSON.stringify(s.users));
        // b's request moved to eight days ago: still in the 30 days, no longer today
        assert.equal(s.usage.today.requests, 2);
        assert.equal(s.usage.last_30_days.requests, 3);
        assert.equal(s.usage.by_day.at(-9).requests, 1);
    });
});
