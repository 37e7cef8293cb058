// The event-stream reader the end-to-end tests rely on (lib/sse.mjs): if it merged, split or lost
// events, the chat tests would judge the service by a wrong picture. A stream cut into chunks at
// every possible byte (inside CRLF, inside a multi-byte character) must read the same as whole.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { SseParser, parseSse } from './lib/sse.mjs';

const STREAM =
    '\ufeffretry: 3000\r\n' +
    ': a comment\r\n\r\n' +
    'id: 1-0\r\nevent: delta\r\ndata: {"text":"Привет, "}\r\n\r\n' +
    'id: 1-1\nevent: delta\ndata: {"text":"мир ✓"}\n\n' +
    'id: 2-0\revent: done\rdata: line one\rdata:line two\r\r' +
    'data: no type, id kept\n\n';

const WANT = [
    { event: 'delta', data: '{"text":"Привет, "}', id: '1-0', retry: 3000 },
    { event: 'delta', data: '{"text":"мир ✓"}', id: '1-1', retry: 3000 },
    { event: 'done', data: 'line one\nline two', id: '2-0', retry: 3000 },
    { event: 'message', data: 'no type, id kept', id: '2-0', retry: 3000 },
];

describe('SSE reader', () => {
    it('reads a whole stream with every line ending and field form', () => {
        const { events, incomplete } = parseSse(STREAM);
        assert.deepEqual(events, WANT);
        assert.equal(incomplete, false);
    });

    it('reads the same when the bytes arrive split at any point', () => {
        const bytes = Buffer.from(STREAM, 'utf8');
        for (let cut = 1; cut < bytes.length; cut++) {
            const p = new SseParser();
            const events = [...p.feed(bytes.subarray(0, cut)), ...p.feed(bytes.subarray(cut))];
            assert.equal(p.finish(), false, `cut at ${cut}`);
            assert.deepEqual(events, WANT, `cut at ${cut}`);
        }
        const p = new SseParser();
        const events = [];
        for (const b of bytes) events.push(...p.feed(Buffer.from([b])));
        assert.deepEqual(events, WANT, 'one byte at a time');
    });

    it('reports a stream cut inside an event and does not dispatch it', () => {
        const { events, incomplete } = parseSse('event: delta\ndata: {"text":"a"}\n\nevent: done\ndata: {');
        assert.equal(events.length, 1);
        assert.equal(incomplete, true);
    });
});
