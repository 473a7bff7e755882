// server_test.mjs: g3n serve driven by the official `openai` npm package (and by
// raw sockets where a client library would not misbehave on purpose). Run by
// tests/cli_server.sh, which starts two servers on the tiny fixture model:
//   G3N_URL       --parallel 4 --api-key sk-test (API, equality, errors, load)
//   G3N_URL_SLOW  --parallel 2 --queue 1 --step-delay 20 (disconnects, 503)
// Prints "ok NAME" / "FAIL NAME" per test, "# ..." notes (the load test's
// numbers), and the summary line "N passed, N failed".
import { createRequire } from 'node:module';
import net from 'node:net';
import path from 'node:path';

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const require = createRequire(path.join(root, 'build/npm-openai/'));
const OpenAI = require('openai');

const URL_ = process.env.G3N_URL, URL_SLOW = process.env.G3N_URL_SLOW, KEY = 'sk-test';
const client = new OpenAI({ baseURL: URL_ + '/v1', apiKey: KEY, maxRetries: 0, timeout: 60000 });
const slow = new OpenAI({ baseURL: URL_SLOW + '/v1', apiKey: 'unused', maxRetries: 0, timeout: 60000 });
const MODEL = 'conditional';

let pass = 0, fail = 0;
function ok(name) { pass++; console.log('ok   ' + name); }
function bad(name, why) { fail++; console.log('FAIL ' + name); if (why) console.log('     ' + String(why).slice(0, 500)); }
function check(name, cond, why) { cond ? ok(name) : bad(name, why); }
async function test(name, fn) {
    try { await fn(); } catch (e) { bad(name, e && e.stack ? e.stack : e); }
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const json = (o) => JSON.stringify(o);

async function health(url) { return (await fetch(url + '/health')).json(); }

/* a raw HTTP exchange: write chunks (with delays), collect what comes back until close or timeout */
function raw(url, chunks, { delay = 0, timeout = 3000 } = {}) {
    const u = new URL(url);
    return new Promise((resolve) => {
        const s = net.connect(Number(u.port), u.hostname);
        let got = '', closed = false;
        s.on('data', (d) => { got += d.toString('latin1'); });
        s.on('error', () => {});
        s.on('close', () => { closed = true; clearTimeout(t); resolve({ got, closed }); });
        const t = setTimeout(() => { s.destroy(); resolve({ got, closed }); }, timeout);
        (async () => {
            for (const c of chunks) {
                if (s.destroyed) return;
                s.write(c);
                if (delay) await sleep(delay);
            }
        })();
    });
}

async function chat(msg, extra = {}, c = client) {
    return c.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: msg }], ...extra });
}

async function chatStream(msg, extra = {}, c = client) {
    const st = await c.chat.completions.create({
        model: MODEL, messages: [{ role: 'user', content: msg }], stream: true,
        stream_options: { include_usage: true }, ...extra,
    });
    let text = '', finish = null, usage = null, roles = 0;
    for await (const ch of st) {
        if (ch.usage) usage = ch.usage;
        for (const c0 of ch.choices) {
            if (c0.delta.role) roles++;
            if (c0.delta.content) text += c0.delta.content;
            if (c0.finish_reason) finish = c0.finish_reason;
        }
    }
    return { text, finish, usage, roles };
}

async function complete(prompt, extra = {}, stream = false) {
    if (!stream) {
        const r = await client.completions.create({ model: MODEL, prompt, ...extra });
        return { text: r.choices[0].text, finish: r.choices[0].finish_reason, usage: r.usage };
    }
    const st = await client.completions.create({ model: MODEL, prompt, stream: true, ...extra });
    let text = '', finish = null;
    for await (const ch of st) for (const c0 of ch.choices) { text += c0.text; if (c0.finish_reason) finish = c0.finish_reason; }
    return { text, finish };
}

/* the error a call fails with: {status, error (OpenAI's error object)} */
async function errorOf(p) {
    try { await p; return null; } catch (e) { return e; }
}

async function post(url, route, body, headers = {}) {
    const r = await fetch(url + route, {
        method: 'POST', body,
        headers: { 'Content-Type': 'application/json', Authorization: 'Bearer ' + KEY, ...headers },
    });
    const text = await r.text();
    let j = null;
    try { j = JSON.parse(text); } catch { /* not JSON */ }
    return { status: r.status, j, text };
}

function isErrorShape(j) {
    return j && j.error && typeof j.error.message === 'string' && typeof j.error.type === 'string' &&
        'param' in j.error && 'code' in j.error;
}

// ---- the API ------------------------------------------------------------------------------

await test('models and health', async () => {
    const ms = await client.models.list();
    const ids = ms.data.map((m) => m.id);
    const h = await health(URL_);
    check('models and health', ids.includes(MODEL) && h.status === 'ok' && h.slots_total === 4, json({ ids, h }));
});

let greedy;
await test('chat, non-streaming', async () => {
    const r = await chat('Hello there', { temperature: 0, max_tokens: 12 });
    const c = r.choices[0], u = r.usage;
    greedy = c.message.content;
    check('chat, non-streaming', r.object === 'chat.completion' && c.message.role === 'assistant' &&
        typeof greedy === 'string' && ['stop', 'length'].includes(c.finish_reason) &&
        u.completion_tokens >= 1 && u.completion_tokens <= 12 && u.total_tokens === u.prompt_tokens + u.completion_tokens,
        json(r));
});

await test('chat, streaming equals non-streaming', async () => {
    const s = await chatStream('Hello there', { temperature: 0, max_tokens: 12 });
    check('chat, streaming equals non-streaming', s.text === greedy && s.roles === 1 && s.usage &&
        s.usage.completion_tokens >= 1 && ['stop', 'length'].includes(s.finish), json({ s, greedy }));
});

await test('completions, streaming equals non-streaming', async () => {
    const a = await complete('The capital of France', { temperature: 0, max_tokens: 16 });
    const b = await complete('The capital of France', { temperature: 0, max_tokens: 16 }, true);
    check('completions, streaming equals non-streaming', a.text === b.text && a.finish === b.finish &&
        a.usage.prompt_tokens > 1, json({ a, b }));
});

await test('max_tokens gives finish_reason length', async () => {
    const a = await complete('Once', { temperature: 0, max_tokens: 7, ignore_eos: true });
    check('max_tokens gives finish_reason length', a.finish === 'length' && a.usage.completion_tokens === 7, json(a));
});

await test('prompt as token ids', async () => {
    const a = await complete([2, 17, 300, 45], { temperature: 0, max_tokens: 5 });
    check('prompt as token ids', a.usage.prompt_tokens === 4 && typeof a.text === 'string', json(a));
});

await test('seed reproduces a sampled answer', async () => {
    const p = { temperature: 1.0, top_p: 0.9, top_k: 40, min_p: 0.01, presence_penalty: 0.5, frequency_penalty: 0.3,
        max_tokens: 16, seed: 1234, ignore_eos: true };
    const a = await chat('Tell me a story', p), b = await chat('Tell me a story', p);
    check('seed reproduces a sampled answer', a.choices[0].message.content === b.choices[0].message.content, json([a, b]));
});

await test('stop strings (across tokens, never sent in part)', async () => {
    const base = await complete('Stop test prompt', { temperature: 0, max_tokens: 24, ignore_eos: true });
    const t = base.text;
    if (t.length < 8) { bad('stop strings', 'greedy text too short: ' + json(t)); return; }
    const stop = t.slice(3, 7); /* several characters: usually spans tokens */
    const want = t.slice(0, t.indexOf(stop));
    const a = await complete('Stop test prompt', { temperature: 0, max_tokens: 24, ignore_eos: true, stop });
    const b = await complete('Stop test prompt', { temperature: 0, max_tokens: 24, ignore_eos: true, stop: ['zzzzqq', stop] }, true);
    const c = await complete('Stop test prompt', { temperature: 0, max_tokens: 24, ignore_eos: true, stop: ['\u2603never'] }, true);
    check('stop strings (across tokens, never sent in part)', a.text === want && a.finish === 'stop' && b.text === want &&
        b.finish === 'stop' && c.text === t && c.finish === 'length', json({ t, stop, a, b, c }));
});

await test('prefix reuse of a shared system prompt', async () => {
    const sys = 'You are a helpful assistant. '.repeat(4);
    const msgs = (u) => [{ role: 'system', content: sys }, { role: 'user', content: u }];
    await client.chat.completions.create({ model: MODEL, messages: msgs('first question'), temperature: 0, max_tokens: 4 });
    const r = await client.chat.completions.create({ model: MODEL, messages: msgs('second one'), temperature: 0, max_tokens: 4 });
    const cached = r.usage.prompt_tokens_details && r.usage.prompt_tokens_details.cached_tokens;
    check('prefix reuse of a shared system prompt', cached > 10 && cached < r.usage.prompt_tokens, json(r.usage));
});

// ---- continuous batching: greedy output alone == among others ------------------------------------

await test('concurrent greedy output equals alone', async () => {
    const prompts = ['Hello there', 'What is the time', 'a b c d e f', 'Tell me about Paris', 'One two', 'x', 'Why?', 'Count: 1 2 3'];
    const opts = (i) => ({ temperature: 0, max_tokens: 10 + 3 * i, ignore_eos: i % 2 === 0 });
    const alone = [];
    for (let i = 0; i < prompts.length; i++) alone.push((await chat(prompts[i], opts(i))).choices[0].message.content);
    const together = await Promise.all(prompts.map((p, i) =>
        i % 2 ? chat(p, opts(i)).then((r) => r.choices[0].message.content) : chatStream(p, opts(i)).then((s) => s.text)));
    const diff = together.map((t, i) => (t === alone[i] ? null : { i, t, a: alone[i] })).filter(Boolean);
    check('concurrent greedy output equals alone (8 requests, 4 slots)', diff.length === 0, json(diff));
});

// ---- errors ---------------------------------------------------------------------------------------

await test('401 wrong key', async () => {
    const c = new OpenAI({ baseURL: URL_ + '/v1', apiKey: 'wrong', maxRetries: 0 });
    const e = await errorOf(c.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'hi' }] }));
    const nokey = await fetch(URL_ + '/v1/models');
    check('401 wrong or missing key', e && e.status === 401 && e.error && e.error.type === 'authentication_error' &&
        nokey.status === 401, e && json({ status: e.status, error: e.error }));
});

await test('404 and 405', async () => {
    const a = await post(URL_, '/v1/nothing', '{}');
    const b = await fetch(URL_ + '/v1/chat/completions', { headers: { Authorization: 'Bearer ' + KEY } });
    const bj = await b.json();
    check('404 unknown route, 405 wrong method', a.status === 404 && isErrorShape(a.j) && b.status === 405 && isErrorShape(bj),
        json([a, bj]));
});

const badBodies = [
    ['not JSON', '{"messages": [', null],
    ['not an object', '[1, 2]', null],
    ['deeply nested', '['.repeat(100000) + ']'.repeat(100000), null],
    ['temperature out of range', { temperature: 5 }, 'temperature'],
    ['temperature wrong type', { temperature: 'hot' }, 'temperature'],
    ['top_p zero', { top_p: 0 }, 'top_p'],
    ['top_k fraction', { top_k: 2.5 }, 'top_k'],
    ['min_p > 1', { min_p: 3 }, 'min_p'],
    ['presence_penalty huge', { presence_penalty: 1e308 }, 'presence_penalty'],
    ['negative max_tokens', { max_tokens: -3 }, 'max_tokens'],
    ['zero max_tokens', { max_tokens: 0 }, 'max_tokens'],
    ['huge max_tokens', { max_tokens: 1e300 }, 'max_tokens'],
    ['seed not a number', { seed: 'x' }, 'seed'],
    ['seed too large', { seed: 1e300 }, 'seed'],
    ['n = 2', { n: 2 }, 'n'],
    ['logprobs', { logprobs: true }, 'logprobs'],
    ['stream not boolean', { stream: 'yes' }, 'stream'],
    ['stop not strings', { stop: [1] }, 'stop'],
    ['five stop strings', { stop: ['a', 'b', 'c', 'd', 'e'] }, 'stop'],
    ['empty stop string', { stop: '' }, 'stop'],
    ['model not a string', { model: 5 }, 'model'],
    ['messages missing', { messages: undefined }, 'messages'],
    ['messages empty', { messages: [] }, 'messages'],
    ['messages a string', { messages: 'hi' }, 'messages'],
    ['unknown role', { messages: [{ role: 'robot', content: 'x' }] }, 'messages'],
    ['content a number', { messages: [{ role: 'user', content: 5 }] }, 'messages'],
    ['content part not text', { messages: [{ role: 'user', content: [{ type: 'image_url', image_url: {} }] }] }, 'messages'],
    ['roles do not alternate', { messages: [{ role: 'user', content: 'a' }, { role: 'user', content: 'b' }] }, 'messages'],
    ['message not an object', { messages: [3] }, 'messages'],
];

await test('400 bad JSON and parameters', async () => {
    const wrong = [];
    for (const [name, body, param] of badBodies) {
        const b = typeof body === 'string' ? body
            : json({ model: MODEL, messages: [{ role: 'user', content: 'hi' }], max_tokens: 2, ...body });
        const r = await post(URL_, '/v1/chat/completions', b);
        if (r.status !== 400 || !isErrorShape(r.j) || (param && r.j.error.param !== param)) wrong.push({ name, r });
    }
    check(`400 bad JSON and parameters (${badBodies.length} kinds)`, wrong.length === 0, json(wrong));
});

await test('400 bad completion prompts', async () => {
    const wrong = [];
    for (const prompt of [undefined, {}, [], [1, 2, 99999], [1.5], ['a', 'b'], [-1], 7]) {
        const r = await post(URL_, '/v1/completions', json({ model: MODEL, prompt, max_tokens: 2 }));
        if (r.status !== 400 || !isErrorShape(r.j) || r.j.error.param !== 'prompt') wrong.push({ prompt, r });
    }
    check('400 bad completion prompts (8 kinds)', wrong.length === 0, json(wrong));
});

await test('the openai client sees 400 as BadRequestError', async () => {
    const e = await errorOf(chat('hi', { temperature: -1 }));
    check('the openai client sees 400 as BadRequestError', e instanceof OpenAI.BadRequestError && e.status === 400 &&
        e.error && e.error.param === 'temperature', e && json(e.error));
});

await test('unknown fields are ignored', async () => {
    const r = await post(URL_, '/v1/chat/completions',
        json({ model: 'anything', messages: [{ role: 'user', content: 'hi', name: 'bob' }], max_tokens: 2, user: 'u1',
            foo: { bar: [1, 2] }, tools: null, response_format: { type: 'text' }, n: 1, stream: false, stop: null }));
    check('unknown fields are ignored', r.status === 200 && r.j.choices.length === 1, r.text);
});

await test('prompt longer than the context is a 400', async () => {
    const e = await errorOf(chat('word '.repeat(400), { max_tokens: 2 }));
    const r = await post(URL_, '/v1/completions', json({ prompt: Array(300).fill(5), max_tokens: 1 }));
    check('prompt longer than the context is a 400', e && e.status === 400 && e.error.code === 'context_length_exceeded' &&
        r.status === 400 && /context/.test(r.j.error.message), e && json(e.error));
});

await test('413 oversized body', async () => {
    const big = json({ model: MODEL, messages: [{ role: 'user', content: 'x'.repeat(2 << 20) }] });
    const r = await post(URL_, '/v1/chat/completions', big);
    check('413 oversized body', r.status === 413 && isErrorShape(r.j), r.status + ' ' + r.text.slice(0, 200));
});

await test('non-UTF-8 bytes', async () => {
    /* inside a string: read as U+FFFD, answered; outside one: bad JSON */
    const inStr = Buffer.concat([Buffer.from('{"messages":[{"role":"user","content":"ab'), Buffer.from([0xff, 0xc3, 0x28, 0xe2]),
        Buffer.from('"}],"max_tokens":3}')]);
    const a = await post(URL_, '/v1/chat/completions', inStr);
    const b = await post(URL_, '/v1/chat/completions', Buffer.from([0x7b, 0xff, 0xfe, 0x7d]));
    check('non-UTF-8 bytes', a.status === 200 && a.j && b.status === 400 && isErrorShape(b.j), a.text + ' | ' + b.text);
});

// ---- HTTP abuse -------------------------------------------------------------------------------------

await test('malformed HTTP does not stop the server', async () => {
    const cases = [
        ['GARBAGE\r\n\r\n'],
        ['GET / HTTP/9.9\r\n\r\n'],
        ['POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n'],
        ['POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nbad\r\n'],
        ['GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ' + 'a'.repeat(200000) + '\r\n\r\n'],
        ['POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{"prompt":'], /* cut off */
        [Buffer.from([0, 1, 2, 255, 254, 13, 10, 13, 10])],
    ];
    const replies = [];
    for (const c of cases) replies.push((await raw(URL_, c, { timeout: 1500 })).got.split('\r\n')[0]);
    const h = await health(URL_);
    check('malformed HTTP does not stop the server', h.status === 'ok' && replies.filter((r) => /^HTTP\/1.1 4|^HTTP\/1.1 5/.test(r)).length >= 4,
        json(replies));
});

await test('a slow client does not hold up others; idle connections time out', async () => {
    /* headers one byte every 100 ms (about 4 s), and one connection that sends nothing */
    const head = 'GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: yes\r\n\r\n';
    const t0 = Date.now();
    const slowDone = raw(URL_, head.split(''), { delay: 70, timeout: 10000 }).then((r) => ({ ...r, t: Date.now() - t0 }));
    const idle = raw(URL_, [], { timeout: 10000 }).then((r) => ({ ...r, t: Date.now() - t0 }));
    await sleep(200);
    const rs = await Promise.all([1, 2, 3].map(() => chat('quick', { temperature: 0, max_tokens: 4 })));
    const tOthers = Date.now() - t0;
    const s = await slowDone, i = await idle;
    check('a slow client does not hold up others; idle connections time out',
        rs.length === 3 && tOthers < s.t && /200 OK/.test(s.got) && i.closed && i.t < 9000,
        json({ tOthers, slow: s.t, slowGot: s.got.slice(0, 40), idle: i }));
});

// ---- disconnects and the queue (server with a delay per step) ---------------------------------------

async function waitIdle(url, ms) {
    const t0 = Date.now();
    for (;;) {
        const h = await health(url);
        if (h.slots_busy === 0 && h.queued === 0) return Date.now() - t0;
        if (Date.now() - t0 > ms) return -1;
        await sleep(25);
    }
}

await test('a client that disconnects mid-stream frees its slot', async () => {
    const st = await slow.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'long' }],
        stream: true, max_tokens: 200, ignore_eos: true });
    let n = 0;
    for await (const ch of st) { if (++n === 3) break; } /* break aborts the request */
    const busy = (await health(URL_SLOW)).slots_busy;
    const t = await waitIdle(URL_SLOW, 2000);
    /* and a non-streaming request whose client gives up */
    const ac = new AbortController();
    const p = fetch(URL_SLOW + '/v1/completions', { method: 'POST', signal: ac.signal,
        body: json({ prompt: 'x', max_tokens: 200, ignore_eos: true }) }).catch(() => null);
    await sleep(300);
    const busy2 = (await health(URL_SLOW)).slots_busy;
    ac.abort();
    await p;
    const t2 = await waitIdle(URL_SLOW, 2000);
    check('a client that disconnects mid-stream (or mid-wait) frees its slot', n === 3 && t >= 0 && t2 >= 0 && busy2 === 1,
        json({ n, busy, t, busy2, t2 }));
});

await test('503 when every slot and queue place is taken', async () => {
    /* 2 slots + 1 queue place: two running streams, one waiting, the fourth refused */
    const open = async () => {
        const st = await slow.completions.create({ model: MODEL, prompt: 'q', stream: true, max_tokens: 200, ignore_eos: true });
        const it = st[Symbol.asyncIterator]();
        await it.next();
        return st;
    };
    const a = await open(), b = await open();
    const ac = new AbortController();
    const waiting = fetch(URL_SLOW + '/v1/completions', { method: 'POST', signal: ac.signal,
        body: json({ prompt: 'w', max_tokens: 200, ignore_eos: true }) }).catch(() => null);
    await sleep(200);
    const h = await health(URL_SLOW);
    const e = await errorOf(slow.completions.create({ model: MODEL, prompt: 'r', max_tokens: 2 }));
    a.controller.abort();
    b.controller.abort();
    ac.abort();
    await waiting;
    const t = await waitIdle(URL_SLOW, 3000);
    check('503 when every slot and queue place is taken', e && e.status === 503 && e.error && h.queued === 1 && t >= 0,
        json({ h, status: e && e.status, error: e && e.error, t }));
});

// ---- bounded load test --------------------------------------------------------------------------

await test('load test', async () => {
    const N = Number(process.env.G3N_LOAD_N || 48), C = Number(process.env.G3N_LOAD_C || 8);
    const lat = [];
    let next = 0, tokens = 0, errors = 0;
    const t0 = performance.now();
    await Promise.all(Array.from({ length: C }, async (_, w) => {
        while (next < N) {
            const i = next++;
            const s = performance.now();
            try {
                const r = await chat(`load ${i} from ${w}`, { max_tokens: 16, temperature: 0.7, seed: i, ignore_eos: true });
                tokens += r.usage.completion_tokens;
            } catch { errors++; }
            lat.push(performance.now() - s);
        }
    }));
    const secs = (performance.now() - t0) / 1000;
    lat.sort((x, y) => x - y);
    const q = (p) => lat[Math.min(lat.length - 1, Math.floor(p * lat.length))];
    console.log(`# load: ${N} requests, ${C} concurrent, 16 tokens each: ${(N / secs).toFixed(1)} req/s, ` +
        `${(tokens / secs).toFixed(0)} tok/s, latency p50 ${q(0.5).toFixed(1)} ms, p99 ${q(0.99).toFixed(1)} ms`);
    check(`load test (${N} requests, ${C} concurrent)`, errors === 0 && tokens === 16 * N, json({ errors, tokens }));
});

const idleAfter = await waitIdle(URL_, 1000), h = await health(URL_);
check('server healthy and idle at the end', h.status === 'ok' && idleAfter >= 0, json(h));

console.log(`${pass} passed, ${fail} failed`);
process.exit(fail ? 1 : 0);
