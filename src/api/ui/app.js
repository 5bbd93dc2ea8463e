// tunegate review page: a queue of logged completions to approve, reject or correct.
// Plain JS, no build step, no third-party code; every API call goes to this origin with the
// admin key as a bearer token. Record text is only ever set with textContent.
'use strict';

const KEY_NAME = 'tunegate.adminKey';
const REVIEWER_NAME = 'tunegate.reviewer';
const PAGE = 50;
const LONG_SYSTEM_CHARS = 280;

const S = {
  key: null,
  reviewer: '',
  open: false, // the server accepted a request without a key
  locked: false, // the last call was refused for want of a (valid) key
  filters: { task: '', state: 'pending', q: '', order: 'newest_first' },
  records: [],
  cursor: null,
  hasMore: false,
  sel: -1,
  editing: false,
  tasks: [],
  listSeq: 0,
  loading: false,
  showSystem: null, // null: open when short; true/false: the reviewer's choice, kept across records
};

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// ---- small DOM helpers -------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c == null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function kbd(...keys) {
  return keys.map((k) => h('kbd', { text: k }));
}

function fmtDuration(ms) {
  if (ms == null) return '—';
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
}

function fmtTime(ms) {
  if (!ms) return '—';
  const d = new Date(ms);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString() : d.toLocaleString();
}

function fmtAgo(ms) {
  if (!ms) return 'no records';
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function shortId(id) {
  return id.length > 18 ? `${id.slice(0, 10)}…${id.slice(-6)}` : id;
}

// ---- records -----------------------------------------------------------------------------

function contentText(content) {
  if (content == null) return '';
  if (typeof content === 'string') return content;
  if (!Array.isArray(content)) return JSON.stringify(content);
  return content
    .map((p) => {
      if (p.type === 'text' || typeof p.text === 'string') return p.text;
      if (typeof p.refusal === 'string') return p.refusal;
      return `[${p.type || 'part'}]`;
    })
    .join('\n');
}

function messageText(m) {
  let text = contentText(m.content);
  for (const call of m.tool_calls || []) {
    const fn = call.function || {};
    text += `${text ? '\n' : ''}[tool call] ${fn.name || '?'}(${fn.arguments || ''})`;
  }
  return text;
}

function messages(rec) {
  const all = (rec.request && Array.isArray(rec.request.messages) && rec.request.messages) || [];
  const isSystem = (m) => m.role === 'system' || m.role === 'developer';
  return {
    system: all.filter(isSystem).map(messageText).join('\n\n'),
    turns: all.filter((m) => !isSystem(m)),
  };
}

function firstUserText(rec) {
  const u = messages(rec).turns.find((m) => m.role === 'user');
  return u ? messageText(u) : rec.response;
}

// ---- API ---------------------------------------------------------------------------------

async function api(path, { method = 'GET', body } = {}) {
  const headers = { Accept: 'application/json' };
  if (S.key) headers.Authorization = `Bearer ${S.key}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let res;
  try {
    res = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
    });
  } catch (e) {
    setConn('offline', 'offline');
    throw new ApiError(0, 'network_error', `Cannot reach the gateway (${e.message}).`);
  }
  const text = await res.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    /* not JSON: reported below */
  }
  if (!res.ok) {
    const e = (json && json.error) || {};
    const err = new ApiError(res.status, e.code || `http_${res.status}`, e.message || text || res.statusText);
    if (res.status === 401 || res.status === 403) {
      S.locked = true;
      setConn('locked', 'key needed');
      askKey(S.key ? err.message : '');
    }
    throw err;
  }
  if (json === null) throw new ApiError(res.status, 'invalid_response', 'The gateway sent no JSON.');
  if (!S.key) S.open = true;
  S.locked = false;
  setConn('ok', S.key ? 'connected' : 'connected · open server');
  return json;
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v != null && v !== '') q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : '';
}

// ---- key ---------------------------------------------------------------------------------

function loadKey() {
  S.key = localStorage.getItem(KEY_NAME) || sessionStorage.getItem(KEY_NAME) || null;
  S.reviewer = localStorage.getItem(REVIEWER_NAME) || '';
}

function askKey(message) {
  const dlg = $('dlg-key');
  const err = $('key-error');
  err.hidden = !message;
  err.textContent = message ? `The gateway refused the key: ${message}` : '';
  $('key-input').value = S.key || '';
  $('key-reviewer').value = S.reviewer;
  $('key-remember').checked = !!localStorage.getItem(KEY_NAME);
  if (!dlg.open) dlg.showModal();
  $('key-input').focus();
}

function saveKey(ev) {
  ev.preventDefault();
  const key = $('key-input').value.trim();
  if (!key) return;
  const remember = $('key-remember').checked;
  localStorage.removeItem(KEY_NAME);
  sessionStorage.removeItem(KEY_NAME);
  (remember ? localStorage : sessionStorage).setItem(KEY_NAME, key);
  S.key = key;
  S.reviewer = $('key-reviewer').value.trim();
  if (S.reviewer) localStorage.setItem(REVIEWER_NAME, S.reviewer);
  else localStorage.removeItem(REVIEWER_NAME);
  $('dlg-key').close();
  refreshAll();
}

function forgetKey() {
  localStorage.removeItem(KEY_NAME);
  sessionStorage.removeItem(KEY_NAME);
  S.key = null;
  $('key-input').value = '';
  toast('info', 'The key is forgotten in this browser.');
}

function setConn(kind, text) {
  const el = $('conn');
  el.className = `conn conn-${kind}`;
  el.textContent = text;
}

// ---- toasts ------------------------------------------------------------------------------

function toast(kind, text, title) {
  const close = h('button', { class: 'toast-close', type: 'button', 'aria-label': 'Dismiss', text: '×' });
  const el = h(
    'div',
    { class: `toast toast-${kind}`, role: kind === 'error' || kind === 'conflict' ? 'alert' : 'status' },
    h('div', { class: 'toast-body' }, title ? h('strong', { text: title }) : null, h('span', { text })),
    close,
  );
  const remove = () => el.remove();
  close.addEventListener('click', remove);
  $('toasts').append(el);
  setTimeout(remove, kind === 'error' || kind === 'conflict' ? 9000 : 3500);
}

function apiErrorToast(e, what) {
  if (e.status === 401 || e.status === 403) return; // the key dialog says it
  if (e.status === 409) toast('conflict', e.message, `Conflict: ${what} was refused`);
  else toast('error', e.message, `${what[0].toUpperCase()}${what.slice(1)} failed${e.status ? ` (${e.status})` : ''}`);
}

// ---- tasks -------------------------------------------------------------------------------

async function loadTasks() {
  try {
    const body = await api('/admin/tasks');
    S.tasks = body.data || [];
  } catch (e) {
    apiErrorToast(e, 'loading tasks');
  }
  renderTasks();
}

let tasksTimer = 0;
function reloadTasksSoon() {
  clearTimeout(tasksTimer);
  tasksTimer = setTimeout(loadTasks, 600);
}

function bumpCounts(task, from, to) {
  const t = S.tasks.find((x) => x.task === task);
  if (!t || from === to) return;
  t[from] = Math.max(0, (t[from] || 0) - 1);
  t[to] = (t[to] || 0) + 1;
  if (t.readiness) {
    t.readiness.approved = t.approved;
    t.readiness.ratio = Math.min(1, t.approved / Math.max(1, t.readiness.threshold));
  }
  renderTasks();
}

function countBar(t) {
  const bar = h('div', { class: 'bar', 'aria-hidden': 'true' });
  for (const k of ['approved', 'rejected', 'pending']) {
    const seg = h('span', { class: `bar-${k}` });
    seg.style.flexGrow = String(t[k] || 0);
    bar.append(seg);
  }
  return bar;
}

function fmtNum(n) {
  n = Number(n) || 0;
  if (n >= 1e9) return `${(n / 1e9).toFixed(1)}B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
  if (n >= 1e4) return `${(n / 1e3).toFixed(0)}k`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}k`;
  return String(Math.round(n * 10) / 10);
}

function pct(x) {
  return `${Math.round((Number(x) || 0) * 100)}%`;
}

// The per-task overview under the counts: adapter, last job, tokens saved and the
// fine-tuning readiness (GET /admin/tasks computes it; see the README).
function taskOverview(t) {
  const r = t.readiness;
  if (!r) return [];
  const progress = h('span', { class: 'ready-bar', 'aria-hidden': 'true' }, h('span', { class: r.ready ? 'ready-fill ok' : 'ready-fill' }));
  progress.firstChild.style.width = pct(r.ratio);
  const a = t.adapter;
  const score = a && a.eval && a.eval.token_f1 != null ? ` · F1 ${Number(a.eval.token_f1).toFixed(2)}` : '';
  const adapter = a ? `${a.alias} gen ${a.generation}${a.version ? ` (${a.version})` : ''}${score}` : 'base model + prompt';
  const j = t.last_job;
  const job = j ? `${j.status}${j.finished_at ? ` ${fmtAgo(j.finished_at * 1000)}` : ''}` : 'none';
  const f = r.format;
  return [
    h(
      'span',
      { class: 'task-ready', title: `Approved examples against the fine-tuning threshold (${r.threshold})` },
      h('span', { class: 'ready-count' }, h('b', { text: r.approved }), ` of ${r.threshold} approved`),
      progress,
    ),
    h(
      'span',
      { class: 'task-facts' },
      h('span', { title: f ? `dominant: ${f.dominant}` : 'nothing approved yet', text: f ? `format ${f.kind} ${pct(f.consistency)}` : 'format –' }),
      h('span', { text: `${fmtNum(r.requests_per_day)} req/day` }),
      h('span', { title: `system prompt: ${r.system_prompt_tokens} tokens on ${pct(r.system_prompt_share)} of requests`, text: `~${fmtNum(r.projected_prompt_tokens_saved_per_month)} tok/mo saveable` }),
      h('span', { text: `${fmtNum(r.prompt_tokens_saved)} tok saved` }),
    ),
    h('span', { class: 'task-facts' }, h('span', { title: 'serving adapter', text: adapter }), h('span', { title: 'last training job', text: `job ${job}` })),
    h('span', { class: `task-advice${r.ready ? ' ok' : ''}`, text: r.recommendation }),
  ];
}

function taskCard(t, label, value) {
  const current = S.filters.task === value;
  return h(
    'li',
    {},
    h(
      'button',
      {
        type: 'button',
        class: `task-card${current ? ' current' : ''}`,
        'aria-pressed': current ? 'true' : 'false',
        onclick: () => setFilter({ task: value }),
      },
      h('span', { class: 'task-name', text: label }),
      h(
        'span',
        { class: 'task-counts' },
        h('span', { class: 'n n-pending', title: 'pending' }, h('b', { text: t.pending }), ' pending'),
        h('span', { class: 'n n-approved', title: 'approved' }, h('b', { text: t.approved }), ' approved'),
        h('span', { class: 'n n-rejected', title: 'rejected' }, h('b', { text: t.rejected }), ' rejected'),
      ),
      countBar(t),
      h('span', { class: 'task-newest', text: t.newest_ms ? `newest ${fmtAgo(t.newest_ms)}` : 'no records' }),
      ...taskOverview(t),
    ),
  );
}

function taskTotals() {
  const all = { pending: 0, approved: 0, rejected: 0, total: 0, newest_ms: 0 };
  for (const t of S.tasks) {
    for (const k of ['pending', 'approved', 'rejected', 'total']) all[k] += t[k] || 0;
    all.newest_ms = Math.max(all.newest_ms, t.newest_ms || 0);
  }
  return all;
}

function renderStrip() {
  $('tasks').replaceChildren(taskCard(taskTotals(), 'All tasks', ''), ...S.tasks.map((t) => taskCard(t, t.task, t.task)));
}

function renderTasks() {
  renderStrip();
  const sel = $('f-task');
  const names = S.tasks.map((t) => t.task);
  if (S.filters.task && !names.includes(S.filters.task)) names.push(S.filters.task);
  sel.replaceChildren(
    h('option', { value: '', text: `All tasks (${taskTotals().pending} pending)` }),
    ...names.map((n) => {
      const t = S.tasks.find((x) => x.task === n);
      return h('option', { value: n, text: t ? `${n} (${t.pending} pending)` : n });
    }),
  );
  sel.value = S.filters.task;
}

// ---- the queue ---------------------------------------------------------------------------

async function loadRecords(reset) {
  const seq = ++S.listSeq;
  const f = S.filters;
  S.loading = true;
  renderQueueHead();
  try {
    const body = await api(
      `/admin/logs${query({
        task: f.task,
        state: f.state,
        q: f.q,
        order: f.order,
        limit: PAGE,
        cursor: reset ? null : S.cursor,
      })}`,
    );
    if (seq !== S.listSeq) return false;
    const keep = reset ? [] : S.records;
    const seen = new Set(keep.map((r) => r.id));
    S.records = keep.concat((body.data || []).filter((r) => !seen.has(r.id)));
    S.cursor = body.next_cursor || null;
    S.hasMore = !!body.has_more && !!S.cursor;
    if (reset) {
      S.sel = S.records.length ? 0 : -1;
      S.editing = false;
    }
    return true;
  } catch (e) {
    if (seq === S.listSeq) apiErrorToast(e, 'loading records');
    return false;
  } finally {
    if (seq === S.listSeq) {
      S.loading = false;
      renderList();
      renderDetail();
    }
  }
}

function refreshAll() {
  return Promise.all([loadTasks(), loadRecords(true)]);
}

function renderQueueHead() {
  const f = S.filters;
  const state = f.state ? f.state[0].toUpperCase() + f.state.slice(1) : 'All';
  $('queue-title').textContent = `${state}${f.task ? ` · ${f.task}` : ''}`;
  const n = S.records.length;
  $('queue-count').textContent = S.loading ? 'loading…' : `${n}${S.hasMore ? '+' : ''} shown`;
}

function listItem(rec, i) {
  const st = rec.review.state;
  return h(
    'li',
    {
      id: `rec-${i}`,
      role: 'option',
      class: `item${i === S.sel ? ' sel' : ''}${rec.status !== 'ok' ? ' failed' : ''}`,
      'aria-selected': i === S.sel ? 'true' : 'false',
      'data-id': rec.id,
      onclick: () => select(i, true),
    },
    h(
      'div',
      { class: 'item-top' },
      h('span', { class: `badge badge-${st}`, text: st }),
      rec.review.corrected_response ? h('span', { class: 'badge badge-edit', text: 'corrected' }) : null,
      rec.status !== 'ok' ? h('span', { class: 'badge badge-failed', text: rec.status }) : null,
      h('span', { class: 'item-task', text: rec.task }),
      h('time', { class: 'item-time', datetime: new Date(rec.created_ms).toISOString(), text: fmtTime(rec.created_ms) }),
    ),
    h('div', { class: 'item-text', text: firstUserText(rec) || '(empty)' }),
    h(
      'div',
      { class: 'item-meta' },
      `${rec.adapter ? rec.adapter.alias : rec.model} · ${fmtDuration(rec.latency_ms)} · ${rec.prompt_tokens}→${rec.completion_tokens} tok`,
    ),
  );
}

function renderList() {
  const list = $('list');
  if (!S.records.length) {
    const what = S.filters.state ? `${S.filters.state} ` : '';
    let text = `No ${what}records${S.filters.task ? ` for ${S.filters.task}` : ''}${S.filters.q ? ' matching the search' : ''}.`;
    if (S.loading) text = 'Loading…';
    else if (S.locked) text = 'The admin key is needed to list records.';
    list.replaceChildren(h('li', { class: 'list-empty' }, text));
    list.removeAttribute('aria-activedescendant');
  } else {
    list.replaceChildren(...S.records.map(listItem));
    if (S.sel >= 0) list.setAttribute('aria-activedescendant', `rec-${S.sel}`);
  }
  $('btn-more').hidden = !S.hasMore;
  renderQueueHead();
  const cur = $(`rec-${S.sel}`);
  if (cur) cur.scrollIntoView({ block: 'nearest' });
}

function select(i, fromClick) {
  if (!S.records.length) return;
  S.sel = Math.max(0, Math.min(S.records.length - 1, i));
  S.editing = false;
  renderList();
  renderDetail();
  if (fromClick) $('list').focus();
}

async function move(delta) {
  if (S.editing) return;
  if (delta > 0 && S.sel >= S.records.length - 1 && S.hasMore && !S.loading) {
    if (await loadRecords(false)) select(S.sel + 1);
    return;
  }
  select(S.sel + delta);
}

// ---- detail ------------------------------------------------------------------------------

function meta(label, value, title) {
  return h('div', { class: 'meta-item', title }, h('dt', { text: label }), h('dd', { text: value }));
}

function turn(role, text, extraClass) {
  return h(
    'div',
    { class: `turn turn-${role}${extraClass ? ` ${extraClass}` : ''}` },
    h('div', { class: 'turn-role', text: role }),
    h('pre', { class: 'turn-text', text: text || '(empty)' }),
  );
}

// The request's tools (name, parameters, description), its tool_choice and response_format.
function toolsBlock(rec) {
  const p = (rec.request && rec.request.params) || {};
  const tools = Array.isArray(p.tools) ? p.tools : [];
  const format = p.response_format && p.response_format.type !== 'text' ? p.response_format : null;
  if (!tools.length && !format) return null;
  const lines = tools.map((t) => {
    const f = t.function || t;
    const params = Object.keys((f.parameters && f.parameters.properties) || {}).join(', ');
    return `${f.name || '?'}(${params})${f.description ? ` · ${f.description}` : ''}`;
  });
  const choice = p.tool_choice == null ? null : typeof p.tool_choice === 'string' ? p.tool_choice : (p.tool_choice.function || {}).name;
  if (choice) lines.push(`tool_choice: ${choice}`);
  if (format) {
    const name = format.json_schema && format.json_schema.name;
    lines.push(`response_format: ${format.type}${name ? ` (${name})` : ''}`);
  }
  const summary = tools.length ? `${tools.length} tool${tools.length > 1 ? 's' : ''}` : 'response format';
  return h(
    'details',
    { class: 'tools' },
    h('summary', {}, h('span', { class: 'turn-role', text: summary })),
    h('pre', { class: 'turn-text', text: lines.join('\n') }),
  );
}

function renderDetail() {
  const box = $('detail');
  const rec = S.records[S.sel];
  if (!rec) {
    let title = 'Queue is empty';
    let text = 'Nothing here for these filters. Change the task or state, or wait for traffic.';
    if (S.loading) [title, text] = ['Loading…', ''];
    else if (S.locked) [title, text] = ['Admin key needed', 'Enter a key from auth.admin_keys with “Change key”.'];
    box.replaceChildren(
      h('div', { class: 'empty' }, h('p', { class: 'empty-title', text: title }), text ? h('p', { class: 'muted', text }) : null),
    );
    return;
  }
  const { system, turns } = messages(rec);
  const st = rec.review.state;
  const failed = rec.status !== 'ok';
  const tokens = `${rec.prompt_tokens} → ${rec.completion_tokens}${rec.prompt_tokens_saved ? ` · ${rec.prompt_tokens_saved} saved` : ''}`;

  const metaList = h(
    'dl',
    { class: 'meta' },
    meta('Model', rec.model, rec.base_model && rec.base_model !== rec.model ? `base ${rec.base_model}` : rec.base_model),
    meta('Adapter', rec.adapter ? `${rec.adapter.alias} · gen ${rec.adapter.generation}` : 'base model'),
    meta('Latency', fmtDuration(rec.latency_ms), 'total request time'),
    meta('First token', fmtDuration(rec.ttft_ms)),
    meta('Tokens', tokens, 'prompt → completion'),
    meta('Finish', rec.finish_reason || '—'),
    meta('Status', rec.status + (rec.client_disconnected ? ' · client left' : '')),
    meta('Key', rec.api_key_id || '—'),
  );
  const md = Object.entries(rec.metadata || {});

  let systemBlock = null;
  if (system) {
    const long = system.length > LONG_SYSTEM_CHARS || system.split('\n').length > 5;
    const open = S.showSystem ?? !long;
    systemBlock = h(
      'details',
      { class: 'system', open },
      h(
        'summary',
        { onclick: (e) => (S.showSystem = !e.currentTarget.parentElement.open) },
        h('span', { class: 'turn-role', text: 'system prompt' }),
        h('span', { class: 'muted', text: ` ${system.length.toLocaleString()} chars` }),
        long && !open ? h('span', { class: 'system-preview', text: system.slice(0, 120) }) : null,
      ),
      h('pre', { class: 'turn-text', text: system }),
    );
  }

  const toolBlock = toolsBlock(rec);

  const corrected = rec.review.corrected_response;
  let responseBlock;
  if (S.editing) {
    const area = h('textarea', {
      id: 'edit-box',
      class: 'edit-box',
      'aria-label': 'Corrected response',
      spellcheck: 'true',
      rows: '8',
    });
    area.value = corrected ?? rec.response;
    responseBlock = h(
      'div',
      { class: 'turn turn-assistant editing' },
      h('label', { class: 'turn-role', for: 'edit-box', text: 'corrected response' }),
      area,
      h('div', { class: 'edit-hint muted' }, ...kbd('Ctrl', 'Enter'), ' approve with this response · ', ...kbd('Esc'), ' cancel'),
    );
  } else if (corrected) {
    responseBlock = h(
      'div',
      {},
      turn('assistant', corrected, 'corrected'),
      h(
        'details',
        { class: 'original' },
        h('summary', { text: 'Original response' }),
        h('pre', { class: 'turn-text', text: rec.response || '(empty)' }),
      ),
    );
  } else {
    responseBlock = turn('assistant', rec.response, 'response');
  }

  const actions = S.editing
    ? h(
        'div',
        { class: 'actions' },
        h('button', { class: 'btn btn-approve', type: 'button', onclick: saveEdit }, 'Approve edit ', ...kbd('Ctrl', '↵')),
        h('button', { class: 'btn', type: 'button', onclick: cancelEdit }, 'Cancel ', ...kbd('Esc')),
      )
    : h(
        'div',
        { class: 'actions' },
        h('button', { class: 'btn btn-approve', type: 'button', disabled: failed, onclick: () => approve() }, 'Approve ', ...kbd('a')),
        h('button', { class: 'btn btn-reject', type: 'button', disabled: failed, onclick: () => reject() }, 'Reject ', ...kbd('r')),
        h('button', { class: 'btn', type: 'button', disabled: failed, onclick: startEdit }, 'Edit ', ...kbd('e')),
      );

  const reviewed = rec.review.reviewed_at_ms
    ? h(
        'p',
        { class: 'reviewed muted' },
        `${st[0].toUpperCase()}${st.slice(1)} ${fmtTime(rec.review.reviewed_at_ms)}${rec.review.reviewer ? ` by ${rec.review.reviewer}` : ''}`,
      )
    : null;

  box.replaceChildren(
    h(
      'article',
      { class: 'record', 'aria-label': `Record ${rec.id}` },
      h(
        'header',
        { class: 'record-head' },
        h('span', { class: `badge badge-${st}`, text: st }),
        h('h2', { class: 'record-id', title: rec.id, text: rec.id }),
        h('span', { class: 'record-task', text: rec.task }),
        h('time', { class: 'muted', datetime: new Date(rec.created_ms).toISOString(), text: fmtTime(rec.created_ms) }),
      ),
      metaList,
      md.length ? h('div', { class: 'tags' }, md.map(([k, v]) => h('span', { class: 'tag', text: `${k}=${v}` }))) : null,
      failed
        ? h('p', { class: 'warn', role: 'note', text: `This request failed (${rec.status}); there is nothing to train on, so it cannot be reviewed.` })
        : null,
      h('div', { class: 'conversation' }, systemBlock, toolBlock, turns.map((m) => turn(m.role || 'user', messageText(m))), responseBlock),
      reviewed,
      actions,
    ),
  );
  if (S.editing) {
    const area = $('edit-box');
    area.focus();
    area.setSelectionRange(area.value.length, area.value.length);
  }
}

// ---- review actions ----------------------------------------------------------------------

function startEdit() {
  const rec = S.records[S.sel];
  if (!rec) return;
  if (rec.status !== 'ok') {
    toast('error', `The request failed (${rec.status}) and cannot be reviewed.`, 'Not reviewable');
    return;
  }
  S.editing = true;
  renderDetail();
}

function cancelEdit() {
  S.editing = false;
  renderDetail();
  $('list').focus();
}

function saveEdit() {
  const rec = S.records[S.sel];
  if (!rec) return;
  const text = $('edit-box').value;
  if (!text.trim()) {
    toast('error', 'The corrected response is empty. Reject the record instead, or cancel with Esc.', 'Nothing to approve');
    return;
  }
  // An unchanged response is a plain approval, not a correction.
  review(S.sel, 'approved', text === rec.response ? null : text);
}

function approve() {
  review(S.sel, 'approved', null);
}

function reject() {
  review(S.sel, 'rejected', null);
}

async function review(i, state, corrected) {
  const rec = S.records[i];
  if (!rec) return;
  if (rec.status !== 'ok') {
    toast('error', `The request failed (${rec.status}) and cannot be reviewed.`, 'Not reviewable');
    return;
  }
  const before = rec.review;
  const body = { state, expected_state: before.state };
  if (corrected != null) body.corrected_response = corrected;
  if (S.reviewer) body.reviewer = S.reviewer;

  // Optimistic: show the outcome now, put it back if the gateway says no.
  rec.review = { state, corrected_response: corrected, reviewer: S.reviewer || null, reviewed_at_ms: Date.now() };
  bumpCounts(rec.task, before.state, state);
  const leaves = !!S.filters.state && S.filters.state !== state;
  if (leaves) {
    S.records.splice(i, 1);
    S.sel = Math.min(i, S.records.length - 1);
  }
  S.editing = false;
  renderList();
  renderDetail();
  $('list').focus();

  const verb = state === 'approved' ? (corrected != null ? 'Approved with correction' : 'Approved') : 'Rejected';
  try {
    const updated = await api(`/admin/logs/${encodeURIComponent(rec.id)}/review`, { method: 'POST', body });
    replaceRecord(updated);
    toast(state === 'approved' ? 'ok' : 'info', shortId(rec.id), verb);
  } catch (e) {
    rec.review = before;
    bumpCounts(rec.task, state, before.state);
    if (leaves && !S.records.includes(rec)) {
      S.records.splice(Math.min(i, S.records.length), 0, rec);
      S.sel = S.records.indexOf(rec);
    }
    renderList();
    renderDetail();
    const doing = state === 'approved' ? 'approving' : 'rejecting';
    apiErrorToast(e, `${doing} ${shortId(rec.id)}`);
    if (e.status === 409) refetch(rec.id);
  }
  reloadTasksSoon();
}

// Puts the gateway's copy of a record in the list, or drops it if it left the filter.
function replaceRecord(updated) {
  const i = S.records.findIndex((r) => r.id === updated.id);
  if (i < 0) return;
  const selectedId = S.records[S.sel] && S.records[S.sel].id;
  if (S.filters.state && updated.review.state !== S.filters.state) S.records.splice(i, 1);
  else S.records[i] = updated;
  const j = S.records.findIndex((r) => r.id === selectedId);
  S.sel = j >= 0 ? j : Math.min(S.sel, S.records.length - 1);
  if (!S.editing) renderDetail();
  renderList();
}

async function refetch(id) {
  try {
    replaceRecord(await api(`/admin/logs/${encodeURIComponent(id)}`));
  } catch (e) {
    apiErrorToast(e, 'reloading the record');
  }
}

// ---- filters -----------------------------------------------------------------------------

function readHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  for (const k of Object.keys(S.filters)) if (p.has(k)) S.filters[k] = p.get(k);
}

function writeHash() {
  const q = query(S.filters).slice(1);
  history.replaceState(null, '', q ? `#${q}` : location.pathname);
}

function syncFilterInputs() {
  $('f-task').value = S.filters.task;
  for (const r of document.querySelectorAll('#f-state input')) r.checked = r.value === S.filters.state;
  $('f-q').value = S.filters.q;
  $('f-order').value = S.filters.order;
}

async function setFilter(change, keepFocus) {
  Object.assign(S.filters, change);
  syncFilterInputs();
  writeHash();
  renderTasks();
  await loadRecords(true);
  if (!keepFocus) $('list').focus();
}

// ---- keyboard ----------------------------------------------------------------------------

function isTyping(el) {
  return !!el && (el.isContentEditable || el.matches('textarea, select, input:not([type=radio]):not([type=checkbox])'));
}

function onKey(e) {
  if (document.querySelector('dialog[open]')) return; // dialogs handle their own keys
  const t = e.target;
  if (t && t.id === 'edit-box') {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      saveEdit();
    } else if (e.key === 'Escape') {
      e.preventDefault();
      cancelEdit();
    }
    return;
  }
  if (isTyping(t)) {
    if (e.key === 'Escape' || (e.key === 'Enter' && t.id === 'f-q')) {
      e.preventDefault();
      $('list').focus();
    }
    return;
  }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const actions = {
    j: () => move(1),
    ArrowDown: () => move(1),
    k: () => move(-1),
    ArrowUp: () => move(-1),
    a: approve,
    r: reject,
    e: startEdit,
    R: () => refreshAll(),
    s: toggleSystem,
    '/': () => $('f-q').focus(),
    '?': () => $('dlg-help').showModal(),
  };
  const act = actions[e.key];
  if (act && S.editing) {
    // An unsaved edit is open: send the keys back to it rather than act on the record.
    e.preventDefault();
    $('edit-box').focus();
  } else if (e.key === 'Escape' && S.editing) {
    cancelEdit();
  } else if (act) {
    e.preventDefault();
    act();
  }
}

function toggleSystem() {
  const d = document.querySelector('#detail details.system');
  if (!d) return;
  d.open = !d.open;
  S.showSystem = d.open;
}

// ---- start -------------------------------------------------------------------------------

function bind() {
  document.addEventListener('keydown', onKey);
  $('btn-key').addEventListener('click', () => askKey(''));
  $('btn-help').addEventListener('click', () => $('dlg-help').showModal());
  $('key-form').addEventListener('submit', saveKey);
  $('key-forget').addEventListener('click', forgetKey);
  $('btn-refresh').addEventListener('click', () => refreshAll());
  $('btn-more').addEventListener('click', () => loadRecords(false));
  $('filters').addEventListener('submit', (e) => e.preventDefault());
  $('f-task').addEventListener('change', (e) => setFilter({ task: e.target.value }));
  $('f-order').addEventListener('change', (e) => setFilter({ order: e.target.value }));
  for (const r of document.querySelectorAll('#f-state input')) {
    r.addEventListener('change', (e) => setFilter({ state: e.target.value }));
  }
  let searchTimer = 0;
  $('f-q').addEventListener('input', (e) => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => setFilter({ q: e.target.value.trim() }, true), 250);
  });
  setInterval(() => {
    if (!document.hidden) renderStrip(); // keeps the "newest … ago" labels fresh
  }, 30000);
}

function boot() {
  loadKey();
  readHash();
  syncFilterInputs();
  bind();
  renderTasks();
  renderList();
  renderDetail();
  refreshAll();
}

boot();
