// The web chat as a browser uses it, over HTTP/2 (h2c) against the whole real service: two
// bg-edge processes, a bg-worker (llm and usage roles) and the demo provider, on a private Redis
// and a fresh migrated database (lib/stack.mjs). Nothing is played or mocked on our side: the
// replies are the demo provider's, streamed by the worker through Redis and relayed by the edge.
//
// What a user would notice: the reply arrives as delta events and ends with done (usage and the
// quota left); the conversation shows the same reply after a reload; a dropped connection in the
// middle of a reply loses nothing — resuming with Last-Event-ID (on another edge too) completes
// the text exactly once; and when the plan's requests are used up the next message is refused
// with 429 quota_exceeded in the user's own language.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import {
    catalogue,
    createPolicy,
    expectStatus,
    registerUser,
    skipReason,
    startStack,
    timeScale,
} from './lib/stack.mjs';

const T = (ms) => Math.round(ms * timeScale);

/** GET /agents, then POST /chat/conversations with the first agent; returns the conversation. */
async function startConversation(client, token) {
    const agents = expectStatus(await client.get('/agents', { token }), 200, 'GET /agents');
    assert.ok(Array.isArray(agents.json.data) && agents.json.data.length > 0, agents.text);
    const agent = agents.json.data[0];
    for (const k of ['id', 'name', 'description', 'model']) {
        assert.equal(typeof agent[k], 'string', `agent.${k} in ${agents.text}`);
    }
    const res = await client.post('/chat/conversations', { agent_id: agent.id, title: 'Node' }, { token });
    expectStatus(res, 201, 'create a conversation');
    assert.equal(typeof res.json.id, 'string', res.text);
    return res.json;
}

const messagesPath = (conv) => `/chat/conversations/${conv.id}/messages`;

/** The conversation's messages, oldest first. */
async function messages(client, token, conv) {
    const res = await client.get(`${messagesPath(conv)}?order=asc&limit=100`, { token });
    expectStatus(res, 200, 'list messages');
    return res.json.data;
}

/** Posts a message and reads its event stream to the end; returns { res, events, text, done }. */
async function turn(client, token, conv, content) {
    const es = await client.stream('POST', messagesPath(conv), { token, json: { content } });
    const events = await es.all();
    const res = { status: es.status, headers: es.headers, text: es.text };
    const deltas = events.filter((e) => e.event === 'delta');
    const text = deltas.map((e) => JSON.parse(e.data).text).join('');
    const last = events.at(-1);
    const done = last?.event === 'done' ? JSON.parse(last.data) : null;
    return { res, events, text, done, incomplete: es.incomplete };
}

/** Compares two event ids of a Redis stream ("ms-seq"): <0, 0, >0. */
function compareIds(a, b) {
    const [am, as] = a.split('-').map(BigInt);
    const [bm, bs] = b.split('-').map(BigInt);
    if (am !== bm) return am < bm ? -1 : 1;
    if (as !== bs) return as < bs ? -1 : 1;
    return 0;
}

function assertAscendingIds(events) {
    for (const e of events) assert.match(e.id, /^[0-9]+-[0-9]+$/, `event id ${e.id}`);
    for (let i = 1; i < events.length; i++) {
        assert.ok(compareIds(events[i - 1].id, events[i].id) < 0, `ids not ascending at ${i}`);
    }
}

describe('web chat over HTTP/2', { skip: skipReason(), timeout: T(200000) }, () => {
    let stack;

    before(
        async () => {
            stack = await startStack({ edges: 2 });
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

    it('streams a reply as delta events ending with done, and stores it', async () => {
        const client = stack.client(0);
        const u = await registerUser(client, { name: 'Ada' });
        assert.equal(u.token_type, 'Bearer');
        assert.equal(u.user.email, u.email);
        const conv = await startConversation(client, u.token);

        const content = 'Hello from Node over HTTP/2';
        const t = await turn(client, u.token, conv, content);
        assert.equal(t.res.status, 200, t.res.text);
        assert.match(t.res.headers['content-type'], /^text\/event-stream/);
        assert.ok(t.res.headers['x-request-id'], 'x-request-id');
        assert.ok(t.res.headers['x-quota-remaining'] !== undefined, 'x-quota-remaining header');
        assert.equal(t.incomplete, false, `the stream ended inside an event: ${t.res.text}`);

        assert.ok(t.events.length >= 2, t.res.text);
        assert.deepEqual(
            [...new Set(t.events.slice(0, -1).map((e) => e.event))],
            ['delta'],
            'only deltas before the end',
        );
        assert.ok(t.done, `the last event is done: ${t.res.text}`);
        assertAscendingIds(t.events);

        // the demo provider's reply, whole: "Echo: <message>. Lorem ipsum …"
        assert.ok(t.text.startsWith(`Echo: ${content}. Lorem ipsum`), t.text);
        assert.match(t.text, /laborum\.\s*$/);
        assert.equal(t.done.finish_reason, 'stop');
        assert.ok(/^[0-9]+$/.test(t.done.message_id), `message_id ${t.done.message_id}`);
        assert.ok(t.done.usage.prompt_tokens > 0, JSON.stringify(t.done));
        assert.equal(
            t.done.usage.completion_tokens,
            t.text.trim().split(/\s+/).length,
            'one completion token per word',
        );
        // a new user is on the trial: 50 requests a day, one of them used by this turn
        assert.equal(t.done.quota.limit, 50, JSON.stringify(t.done));
        assert.equal(t.done.quota.remaining, 49, JSON.stringify(t.done));
        assert.ok(Date.parse(t.done.quota.reset_at) > Date.now(), t.done.quota.reset_at);

        // a reload shows the turn, on either edge
        for (const c of [client, stack.client(1)]) {
            const list = await messages(c, u.token, conv);
            assert.equal(list.length, 2, JSON.stringify(list));
            assert.equal(list[0].role, 'user');
            assert.equal(list[0].content, content);
            assert.equal(list[1].role, 'assistant');
            assert.equal(list[1].id, t.done.message_id);
            assert.equal(list[1].content, t.text);
            assert.equal(list[1].usage.completion_tokens, t.done.usage.completion_tokens);
        }
    });

    it('resumes a dropped stream with Last-Event-ID and assembles the reply exactly once', async () => {
        const client = stack.client(0);
        const u = await registerUser(client);
        const conv = await startConversation(client, u.token);

        // a slow reply (the provider sends a token every 80 ms), taken asynchronously
        const content = 'Tell me slowly #fail:slow=80';
        const posted = await client.post(
            messagesPath(conv),
            { content },
            { token: u.token, headers: { prefer: 'respond-async' } },
        );
        expectStatus(posted, 202, 'POST with Prefer: respond-async');
        const { job_id: jobId, stream_url: streamUrl } = posted.json;
        assert.equal(streamUrl, `/chat/jobs/${jobId}/stream`);

        // read a few deltas, then drop the connection's stream like a closed tab
        const first = await client.stream('GET', streamUrl, { token: u.token });
        assert.equal(first.status, 200, first.text);
        const seen = [];
        while (seen.length < 3) {
            const ev = await first.next();
            assert.ok(ev, `the stream ended after ${seen.length} events: ${first.text}`);
            assert.equal(ev.event, 'delta', `early event ${ev.event}: ${ev.data}`);
            seen.push(ev);
        }
        first.cancel();
        const lastId = seen.at(-1).id;

        // resume on the other edge from the last event shown
        const other = stack.client(1);
        const second = await other.stream('GET', streamUrl, {
            token: u.token,
            headers: { 'last-event-id': lastId },
        });
        assert.equal(second.status, 200, second.text);
        const rest = await second.all();
        assert.equal(second.incomplete, false, second.text);
        assert.ok(rest.length > 0, 'nothing after the resume point');
        assert.equal(rest.at(-1).event, 'done', `ends with done: ${second.text}`);
        assertAscendingIds([...seen, ...rest]);
        const seenIds = new Set(seen.map((e) => e.id));
        assert.ok(rest.every((e) => !seenIds.has(e.id)), 'an event came twice');
        const done = JSON.parse(rest.at(-1).data);
        assert.equal(done.finish_reason, 'stop', 'the reply ran to its end after the drop');

        const deltaText = (evs) =>
            evs
                .filter((e) => e.event === 'delta')
                .map((e) => JSON.parse(e.data).text)
                .join('');
        const assembled = deltaText(seen) + deltaText(rest);
        assert.ok(assembled.startsWith(`Echo: ${content}. Lorem ipsum`), assembled);
        assert.equal(assembled.split('Echo:').length - 1, 1, `the text repeats: ${assembled}`);
        assert.equal(assembled.split('Lorem ipsum').length - 1, 1, `the text repeats: ${assembled}`);
        assert.match(assembled, /laborum\.\s*$/);

        // the stored reply is exactly what was assembled, and a full replay gives the same text
        const list = await messages(client, u.token, conv);
        const replies = list.filter((m) => m.role === 'assistant');
        assert.equal(replies.length, 1, JSON.stringify(list));
        assert.equal(replies[0].content, assembled);
        assert.equal(replies[0].id, done.message_id);
        const replay = await client.stream('GET', streamUrl, { token: u.token });
        assert.equal(deltaText(await replay.all()), assembled);
    });

    it('refuses a message past the quota with 429 in the user\'s language', async () => {
        const client = stack.client(0);
        const u = await registerUser(client, { locale: 'ru' });
        assert.equal(u.user.locale, 'ru');
        const conv = await startConversation(client, u.token);
        // an admin limits this user to two requests. The trial's concurrency cap (1) is raised:
        // a turn's slot is freed when the usage worker settles it, a moment after "done", and
        // the next turn must meet the quota, not that moment.
        await createPolicy(stack, {
            type: 'quota',
            scope: 'user',
            scope_id: u.user.id,
            priority: 0,
            body: { requests: 2, concurrency: 10 },
        });

        const remaining = [];
        for (const content of ['Первый вопрос', 'Второй вопрос']) {
            const t = await turn(client, u.token, conv, content);
            assert.equal(t.res.status, 200, t.res.text);
            assert.ok(t.done, `the turn ends with done: ${t.res.text}`);
            assert.equal(t.done.quota.limit, 2, JSON.stringify(t.done));
            remaining.push(t.done.quota.remaining);
        }
        assert.deepEqual(remaining, [1, 0]);

        const denied = await client.post(messagesPath(conv), { content: 'Третий вопрос' }, { token: u.token });
        assert.equal(denied.status, 429, denied.text);
        assert.match(denied.headers['content-type'], /json/);
        assert.equal(denied.json.error.code, 'quota_exceeded');
        assert.equal(denied.json.error.message, catalogue('ru')['error.quota_exceeded']);
        assert.equal(denied.json.error.request_id, denied.headers['x-request-id']);
        assert.ok(Number(denied.headers['retry-after']) > 0, `Retry-After ${denied.headers['retry-after']}`);
        assert.equal(denied.headers['x-quota-limit'], '2');
        assert.equal(denied.headers['x-quota-remaining'], '0');

        // the user switches to Spanish: the same refusal, now in Spanish (on the other edge)
        const loc = await client.put('/auth/locale', { locale: 'es' }, { token: u.token });
        expectStatus(loc, 200, 'PUT /auth/locale');
        const denied2 = await stack
            .client(1)
            .post(messagesPath(conv), { content: 'Otra pregunta' }, { token: u.token });
        assert.equal(denied2.status, 429, denied2.text);
        assert.equal(denied2.json.error.code, 'quota_exceeded');
        assert.equal(denied2.json.error.message, catalogue('es')['error.quota_exceeded']);

        // the two answered turns are in the conversation; the refused ones got no reply
        const list = await messages(client, u.token, conv);
        const replies = list.filter((m) => m.role === 'assistant');
        assert.equal(replies.length, 2, JSON.stringify(list));
        assert.ok(replies.every((m) => m.content.startsWith('Echo: ')), JSON.stringify(replies));
    });
});
