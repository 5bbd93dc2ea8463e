// A browser app on another origin calling the gateway, for tests/api/cors.rs: pages served
// from two loopback origins (ports of their own) call `/v1/*` with fetch as the SDKs do
// (bearer key, JSON, `x-stainless-*` headers, so a preflight). The listed origin reads the
// answers and `x-request-id`; the other one is stopped by the browser.
//
// Env: TUNEGATE_URL (gateway base URL), TUNEGATE_KEY, TUNEGATE_MODEL, TUNEGATE_ALLOWED_PORT,
// TUNEGATE_OTHER_PORT, TUNEGATE_CHROMIUM (default /usr/bin/chromium).
// Prints one JSON line with what each page saw; exits non-zero on a failed check.
import http from 'node:http';

import { chromium } from 'playwright-core';

function env(name, fallback) {
  const v = process.env[name] ?? fallback;
  if (v === undefined || v === '') throw new Error(`${name} is not set`);
  return v;
}

function check(cond, message) {
  if (!cond) throw new Error(`check failed: ${message}`);
}

const gateway = env('TUNEGATE_URL');
const key = env('TUNEGATE_KEY');
const model = env('TUNEGATE_MODEL');
const ports = [Number(env('TUNEGATE_ALLOWED_PORT')), Number(env('TUNEGATE_OTHER_PORT'))];

// A blank page per origin; the calls run in it through page.evaluate.
const servers = await Promise.all(
  ports.map(
    (port) =>
      new Promise((resolve) => {
        const s = http.createServer((_, res) => {
          res.writeHead(200, { 'content-type': 'text/html' });
          res.end('<!doctype html><title>app</title><p>app');
        });
        s.listen(port, '127.0.0.1', () => resolve(s));
      }),
  ),
);

async function calls({ gw, key, model }) {
  const headers = {
    authorization: `Bearer ${key}`,
    'content-type': 'application/json',
    'x-stainless-lang': 'js',
    'x-stainless-os': 'Linux',
    'x-stainless-retry-count': '0',
  };
  const out = {};
  try {
    const r = await fetch(`${gw}/v1/chat/completions`, {
      method: 'POST',
      headers,
      body: JSON.stringify({ model, messages: [{ role: 'user', content: 'hi' }], max_tokens: 3 }),
    });
    const body = await r.json();
    out.chat = { status: r.status, object: body.object, requestId: r.headers.get('x-request-id'), id: body.id };
    const s = await fetch(`${gw}/v1/responses`, {
      method: 'POST',
      headers,
      body: JSON.stringify({ model, input: 'hi', max_output_tokens: 3, stream: true }),
    });
    const text = await s.text();
    out.stream = { status: s.status, completed: text.includes('event: response.completed') || text.includes('event: response.incomplete') };
    const m = await fetch(`${gw}/v1/models`, { headers: { authorization: `Bearer ${key}` } });
    out.models = { status: m.status };
  } catch (e) {
    out.error = String(e);
  }
  return out;
}

const browser = await chromium.launch({
  executablePath: env('TUNEGATE_CHROMIUM', '/usr/bin/chromium'),
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const seen = {};
try {
  const context = await browser.newContext();
  context.setDefaultTimeout(30000);
  for (const [name, port] of [['allowed', ports[0]], ['other', ports[1]]]) {
    const page = await context.newPage();
    await page.goto(`http://127.0.0.1:${port}/`);
    seen[name] = await page.evaluate(calls, { gw: gateway, key, model });
    await page.close();
  }
  const a = seen.allowed;
  check(!a.error, `the listed origin's calls failed: ${a.error}`);
  check(a.chat.status === 200 && a.chat.object === 'chat.completion', JSON.stringify(a));
  check(a.chat.requestId && a.chat.requestId === a.chat.id, `x-request-id readable: ${JSON.stringify(a)}`);
  check(a.stream.status === 200 && a.stream.completed, JSON.stringify(a));
  check(a.models.status === 200, JSON.stringify(a));
  check(seen.other.error && /Failed to fetch/.test(seen.other.error), `the other origin was not stopped: ${JSON.stringify(seen.other)}`);
} finally {
  await browser.close();
  servers.forEach((s) => s.close());
}
console.log(JSON.stringify(seen));
