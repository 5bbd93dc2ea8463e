// Drives the /ui review page in headless Chromium, for tests/api/ui.rs (which starts the
// gateway, creates the records and checks the outcome through the admin API).
//
// Env: TUNEGATE_UI_URL (gateway base URL), TUNEGATE_ADMIN_KEY, TUNEGATE_UI_TASK,
// TUNEGATE_UI_IDS (the task's pending record ids, newest first, comma-separated),
// TUNEGATE_UI_CORRECTION, TUNEGATE_UI_SCREENSHOT (PNG path), TUNEGATE_CHROMIUM (the browser;
// default /usr/bin/chromium, Debian's package).
//
// Prints one JSON line {"approved": id, "corrected": id} at the end; exits non-zero on any
// failed check, page error or console error (a CSP violation is one).
import { chromium } from 'playwright-core';

function env(name, fallback) {
  const v = process.env[name] ?? fallback;
  if (v === undefined || v === '') throw new Error(`${name} is not set`);
  return v;
}

function check(cond, message) {
  if (!cond) throw new Error(`check failed: ${message}`);
}

const base = env('TUNEGATE_UI_URL');
const key = env('TUNEGATE_ADMIN_KEY');
const task = env('TUNEGATE_UI_TASK');
const ids = env('TUNEGATE_UI_IDS').split(',');
const correction = env('TUNEGATE_UI_CORRECTION');
const screenshot = env('TUNEGATE_UI_SCREENSHOT');
const executablePath = env('TUNEGATE_CHROMIUM', '/usr/bin/chromium');

const browser = await chromium.launch({
  executablePath,
  headless: true,
  // Root in a container has no user namespace for the sandbox; the network is closed, so
  // Chromium's own background connections are turned off rather than left to fail.
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-dev-shm-usage',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
});
const problems = [];
try {
  const context = await browser.newContext({ viewport: { width: 1360, height: 860 }, colorScheme: 'light' });
  context.setDefaultTimeout(20000);
  const page = await context.newPage();
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' && !/status of 401/.test(m.text())) problems.push(`console error: ${m.text()}`);
  });

  const reviewed = (id) =>
    page.waitForResponse((r) => r.request().method() === 'POST' && r.url().endsWith(`/admin/logs/${id}/review`));

  // The page asks for the key once.
  await page.goto(`${base}/ui`);
  await page.locator('#dlg-key[open]').waitFor();
  await page.fill('#key-input', key);
  await page.fill('#key-reviewer', 'ui-test');
  await page.press('#key-input', 'Enter');
  await page.locator('#dlg-key').waitFor({ state: 'hidden' });

  await page.selectOption('#f-task', task);
  const items = page.locator('#list .item');
  await page.waitForFunction(
    ([t, n]) => document.querySelectorAll('#list .item').length === n &&
      [...document.querySelectorAll('#list .item .item-task')].every((e) => e.textContent === t),
    [task, ids.length],
  );
  check((await items.first().getAttribute('data-id')) === ids[0], 'the newest pending record is selected first');
  check(await page.locator('#detail details.system').count() === 1, 'the system prompt is shown');
  check(await page.locator('#detail .turn-user').count() >= 1, 'the user turn is shown');
  check(await page.locator('#detail details.tools', { hasText: 'invite_member(email)' }).count() === 1, "the request's tools are shown");
  const approvedCount = () => page.locator('#tasks .task-card.current .n-approved b').textContent();
  const approvedBefore = Number(await approvedCount());

  // Approve the selected record with the keyboard.
  const first = await page.locator('#list .item.sel').getAttribute('data-id');
  let done = reviewed(first);
  await page.keyboard.press('a');
  check((await done).status() === 200, `approving ${first}: ${await (await done).text()}`);
  await page.waitForFunction((id) => !document.querySelector(`#list .item[data-id="${id}"]`), first);

  // Move on, then edit the next one and approve it with the correction.
  await page.keyboard.press('j');
  await page.keyboard.press('k');
  const second = await page.locator('#list .item.sel').getAttribute('data-id');
  check(second === ids[1], `the next record (${ids[1]}) is selected after approving, got ${second}`);
  await page.keyboard.press('e');
  const box = page.locator('#edit-box');
  await box.waitFor();
  check(await box.evaluate((el) => el === document.activeElement), 'the editor has focus');
  await page.keyboard.press('ControlOrMeta+a');
  await page.keyboard.type(correction);
  done = reviewed(second);
  await page.keyboard.press('Control+Enter');
  check((await done).status() === 200, `correcting ${second}: ${await (await done).text()}`);
  await page.waitForFunction((id) => !document.querySelector(`#list .item[data-id="${id}"]`), second);
  await page.locator('.toast-ok', { hasText: 'Approved with correction' }).waitFor();

  // The counts follow, and a reload does not ask for the key again.
  await page.reload();
  await page.waitForFunction((n) => document.querySelectorAll('#list .item').length === n, ids.length - 2);
  check(!(await page.locator('#dlg-key').isVisible()), 'the key is not asked for again');
  const approvedAfter = Number(await approvedCount());
  check(approvedAfter === approvedBefore + 2, `the task card counts ${approvedBefore} + 2 approved, shows ${approvedAfter}`);
  // The overview: readiness against the scheduler's default threshold, and the advice.
  const ready = (await page.locator('#tasks .task-card.current .task-ready').textContent()).replace(/\s+/g, ' ').trim();
  check(ready === `${approvedAfter} of 500 approved`, `the readiness shows ${approvedAfter} of 500 approved, got '${ready}'`);
  const advice = await page.locator('#tasks .task-card.current .task-advice').textContent();
  check(advice === `keep prompting: ${500 - approvedAfter} more approved examples needed`, `the advice, got '${advice}'`);
  check(/req\/day/.test(await page.locator('#tasks .task-card.current').textContent()), 'the card shows requests per day');

  // The reviewed records under the approved filter, the corrected one open.
  await page.locator('#f-state label:has-text("Approved")').click();
  await page.locator(`#list .item[data-id="${second}"]`).waitFor();
  await page.locator(`#list .item[data-id="${second}"]`).click();
  await page.locator('#detail .turn-assistant.corrected', { hasText: correction }).waitFor();
  await page.screenshot({ path: screenshot });

  check(problems.length === 0, problems.join('\n'));
  console.log(JSON.stringify({ approved: first, corrected: second }));
} finally {
  await browser.close();
}
