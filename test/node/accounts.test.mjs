// Accounts as the stack helpers (lib/stack.mjs) set them up for other tests, checked from the
// user's side over HTTP/2: a plan granted by the operator (bgctl plan grant) is the one the
// account shows and the one a chat turn is counted against; a user made admin (PUT
// /admin/users/{id}) must sign in again and then reaches the admin API; an API key is shown once
// and listed without its secret.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import {
    createApiKey,
    expectStatus,
    grantPlan,
    login,
    registerUser,
    setRole,
    skipReason,
    startStack,
    timeScale,
} from './lib/stack.mjs';

const T = (ms) => Math.round(ms * timeScale);

describe('accounts through the stack helpers', { skip: skipReason(), timeout: T(200000) }, () => {
    let stack;
    let client;

    before(
        async () => {
            stack = await startStack();
            client = stack.client(0);
        },
        { timeout: T(120000) },
    );

    after(
        async () => {
            if (!stack) return;
            const problems = await stack.stop();
            assert.deepEqual(problems, [], 'every service exits cleanly on SIGTERM');
        },
        { timeout: T(120000) },
    );

    it('a granted plan replaces the trial, in the account and in a chat turn', async () => {
        const u = await registerUser(client);
        const before = expectStatus(
            await client.get('/billing/account', { token: u.token }),
            200,
            'account',
        );
        assert.equal(before.json.plan, 'trial', before.text);
        assert.equal(before.json.quota.limit, 50, before.text);

        await grantPlan(stack, { email: u.email }, 'monthly', 30);
        const account = expectStatus(
            await client.get('/billing/account', { token: u.token }),
            200,
            'account',
        );
        assert.equal(account.json.plan, 'monthly', account.text);
        assert.equal(account.json.quota.limit, 10000, account.text);

        const agents = expectStatus(await client.get('/agents', { token: u.token }), 200, 'agents');
        const conv = expectStatus(
            await client.post('/chat/conversations', { agent_id: agents.json.data[0].id }, { token: u.token }),
            201,
            'conversation',
        ).json;
        const es = await client.stream('POST', `/chat/conversations/${conv.id}/messages`, {
            token: u.token,
            json: { content: 'On the monthly plan' },
        });
        assert.equal(es.status, 200, es.text);
        const events = await es.all();
        assert.equal(events.at(-1)?.event, 'done', es.text);
        const done = JSON.parse(events.at(-1).data);
        assert.equal(done.quota.limit, 10000, JSON.stringify(done));
        assert.equal(done.quota.remaining, 9999, JSON.stringify(done));
    });

    it('a user made admin signs in again and reaches the admin API', async () => {
        const u = await registerUser(client);
        const refused = await client.get('/admin/users', { token: u.token });
        assert.equal(refused.status, 403, refused.text);

        await setRole(stack, u.user.id, 'admin');
        // the role change ended the user's sessions: the old token is refused
        const old = await client.get('/auth/profile', { token: u.token });
        assert.equal(old.status, 401, old.text);

        const again = await login(client, u.email);
        assert.equal(again.user.role, 'admin');
        const users = await client.get('/admin/users', { token: again.token });
        assert.equal(users.status, 200, users.text);
        assert.ok(Array.isArray(users.json.data), users.text);
    });

    it('an API key is shown once and listed without its secret', async () => {
        const u = await registerUser(client);
        const key = await createApiKey(client, u.token, 'ci key');
        assert.equal(key.name, 'ci key');
        assert.equal(typeof key.key, 'string');
        assert.ok(key.key.length >= 20, 'a key long enough to be a secret');
        const list = expectStatus(
            await client.get('/auth/api-keys', { token: u.token }),
            200,
            'list keys',
        );
        const listed = list.json.data.find((k) => k.id === key.id);
        assert.ok(listed, list.text);
        assert.equal(listed.name, 'ci key');
        assert.ok(!list.text.includes(key.key), 'the list shows the secret');
    });
});
