// kith's chat window. Plain JavaScript, no framework, no build step: the daemon serves this
// file as it is. It talks to the daemon's /v1 API with the session cookie (never the bearer
// token) and follows /v1/events with EventSource. Every piece of data reaches the page through
// textContent or attributes, never as HTML.
'use strict';

const PAGE = 50;
const TYPING_SHOWN_MS = 6000;
const TYPING_SENT_EVERY_MS = 3000;
const PRESENCE_EVERY_MS = 20000;
const STATES = ['pending', 'failed', 'sent', 'delivered', 'read'];
// The timers offered for disappearing messages, in seconds (the node's shortest comes first
// when it allows a shorter one).
const TIMER_PRESETS = [30, 5 * 60, 3600, 8 * 3600, 24 * 3600, 7 * 24 * 3600, 4 * 7 * 24 * 3600, 90 * 24 * 3600];

const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;

// Builds an element: h('div', {class: 'x', onclick: f}, 'text', child, ...).
function h(tag, props, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function call(method, path, body) {
  const init = { method, credentials: 'same-origin', headers: { 'x-kith-csrf': '1' } };
  if (body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, 'the daemon does not answer (is it running?)');
  }
  const text = await response.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (e) { json = null; }
  if (!response.ok) {
    if (response.status === 401) signedOut();
    throw new ApiError(response.status, (json && json.error) || `the daemon answered ${response.status}`);
  }
  return json;
}
const get = (path) => call('GET', path);
const post = (path, body) => call('POST', path, body || {});

// ---- state ------------------------------------------------------------------------------

const state = {
  me: null,
  contacts: new Map(), // peer id -> name
  trust: new Map(), // peer id -> {verified, identity_changed}
  convs: [], // from /v1/conversations
  open: null, // the open conversation (an entry of convs)
  messages: [], // the open conversation's loaded messages, oldest first
  hasMore: false,
  loadingOlder: false,
  typing: new Map(), // peer id -> until (ms)
  presence: new Map(), // peer id -> {online, last_seen_ms}
  progress: new Map(), // message id -> {direction, done, total}
  receipts: new Map(), // message id -> the latest state a receipt event told (it may beat the send's answer)
  failed: new Map(), // message id -> reason
  timers: new Map(), // conversation id -> its disappearing-message timer in seconds (null: off)
  requests: [], // from /v1/requests: strangers who wrote, waiting to be accepted or blocked
  invitations: [], // from /v1/invitations: groups strangers added us to, waiting to be joined or declined
  localSeq: 0,
  lastTypingSent: 0,
  events: null,
};
// Read by the browser tests: when the list and each opened conversation were on screen, and
// anything the Content-Security-Policy blocked (there should be nothing).
// `log` holds the last events the stream brought (type, id, conversation, time), which a test
// prints when the page did not show what it waited for.
window.kith = { timings: {}, state, violations: [], log: [] };
function logEvent(entry) {
  window.kith.log.push(entry);
  if (window.kith.log.length > 40) window.kith.log.shift();
}
document.addEventListener('securitypolicyviolation', (e) => {
  window.kith.violations.push(`${e.violatedDirective} ${e.blockedURI}`);
});

function nameOf(peer) {
  if (!peer) return '';
  if (state.me && peer === state.me.peer_id) return 'you';
  return state.contacts.get(peer) || `${peer.slice(0, 10)}…`;
}

// Whether `conv` is the open conversation. By id: a refreshed list replaces the objects, and an
// answer that comes back after that is still for the open conversation.
function isOpen(conv) {
  return !!state.open && !!conv && state.open.id === conv.id;
}

function convById(id) {
  return state.convs.find((c) => c.id === id);
}

// ---- formatting -------------------------------------------------------------------------

function time(ms) {
  return new Date(ms).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

function dayLabel(ms) {
  const d = new Date(ms);
  const today = new Date();
  const yesterday = new Date(Date.now() - 86400000);
  if (d.toDateString() === today.toDateString()) return 'Today';
  if (d.toDateString() === yesterday.toDateString()) return 'Yesterday';
  return d.toLocaleDateString([], { weekday: 'long', day: 'numeric', month: 'long', year: 'numeric' });
}

function shortTime(ms) {
  if (!ms) return '';
  const d = new Date(ms);
  return d.toDateString() === new Date().toDateString() ? time(ms) : d.toLocaleDateString();
}

// A small clock (the disappearing-message mark): drawn, as system fonts may lack the emoji.
function clockIcon() {
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('aria-hidden', 'true');
  svg.setAttribute('class', 'icon clock');
  const circle = document.createElementNS(ns, 'circle');
  for (const [k, v] of [['cx', '12'], ['cy', '13'], ['r', '8']]) circle.setAttribute(k, v);
  const hands = document.createElementNS(ns, 'path');
  hands.setAttribute('d', 'M12 9v4l2.5 2.5M9.5 2.5h5');
  svg.append(circle, hands);
  return svg;
}

// A timer as a person says it: '30 seconds', '1 hour', '4 weeks'.
function timerLabel(secs) {
  if (!secs) return 'off';
  for (const [len, unit] of [[7 * 24 * 3600, 'week'], [24 * 3600, 'day'], [3600, 'hour'], [60, 'minute'], [1, 'second']]) {
    if (secs % len === 0) {
      const n = secs / len;
      return `${n} ${unit}${n === 1 ? '' : 's'}`;
    }
  }
  return `${secs} seconds`;
}

function size(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1048576) return `${(bytes / 1024).toFixed(1)} KiB`;
  if (bytes < 1073741824) return `${(bytes / 1048576).toFixed(1)} MiB`;
  return `${(bytes / 1073741824).toFixed(2)} GiB`;
}

function lastSeen(p) {
  if (!p) return '';
  if (p.online) return 'online';
  if (p.last_seen_ms) return `last seen ${shortTime(p.last_seen_ms)}${shortTime(p.last_seen_ms).includes(':') ? '' : ' ' + time(p.last_seen_ms)}`;
  return 'last seen unknown';
}

function later(state1, state2) {
  return STATES.indexOf(state2) > STATES.indexOf(state1) ? state2 : state1;
}

// ---- banner, sign-in --------------------------------------------------------------------

function banner(text) {
  const b = $('banner');
  b.textContent = text || '';
  b.hidden = !text;
}

function signedOut(why) {
  $('app').hidden = true;
  $('signin').hidden = false;
  if (why) $('signin-why').textContent = why;
  if (state.events) {
    state.events.close();
    state.events = null;
  }
}

// ---- the conversation list ---------------------------------------------------------------

let listTimer = null;
function refreshListSoon() {
  clearTimeout(listTimer);
  listTimer = setTimeout(() => refreshList().catch(() => {}), 150);
}

async function refreshList() {
  const [convs, contacts, requests, invitations] = await Promise.all([
    get('/v1/conversations'), get('/v1/contacts'), get('/v1/requests').catch(() => []), get('/v1/invitations').catch(() => []),
  ]);
  state.requests = requests || [];
  state.invitations = invitations || [];
  renderRequests();
  applyList([convs, contacts]);
}

// Strangers who wrote: above the conversations, each with its last message, to accept (it
// becomes a contact, under the name given) or block. Until then they get no read receipt.
// Groups strangers added us to wait below them, to join or decline (and block the inviter).
function renderRequests() {
  const box = $('requests');
  box.hidden = !state.requests.length && !state.invitations.length;
  if (box.hidden) {
    box.replaceChildren();
    return;
  }
  const invitations = !state.invitations.length ? [] : [
    h('h2', { class: 'requests-title' }, `Group invitations (${state.invitations.length})`),
    ...state.invitations.map((g) => {
      const row = h(
        'div',
        { class: 'request invitation', 'data-group': g.group_id, role: 'group', 'aria-label': `invitation to ${g.name}` },
        h('div', { class: 'grow' },
          h('strong', { title: g.group_id }, g.name),
          h('div', { class: 'muted small preview' },
            `from ${g.inviter.slice(0, 12)}…, ${g.members} members, ${g.messages} message${g.messages === 1 ? '' : 's'} waiting`)),
        h('div', { class: 'row' },
          h('button', { type: 'button', class: 'accept', onclick: () => answerInvitation(g, 'accept', row) }, 'Join'),
          h('button', { type: 'button', class: 'link decline', onclick: () => answerInvitation(g, 'decline', row) }, 'Decline'),
          h('button', { type: 'button', class: 'link block', onclick: () => answerInvitation(g, 'decline', row, true) }, 'Decline and block')),
      );
      return row;
    }),
  ];
  box.replaceChildren(
    ...invitations,
    ...(!state.requests.length ? [] : [h('h2', { class: 'requests-title' }, `Message requests (${state.requests.length})`)]),
    ...state.requests.map((r) => {
      const name = h('input', { type: 'text', class: 'request-name', placeholder: 'name', 'aria-label': `a name for ${r.peer_id}`, maxlength: '64' });
      const row = h(
        'div',
        { class: 'request', 'data-peer': r.peer_id, role: 'group', 'aria-label': `message request from ${r.name || r.peer_id}` },
        h('div', { class: 'grow' },
          h('strong', { title: r.peer_id }, r.name || `${r.peer_id.slice(0, 12)}…`),
          h('div', { class: 'muted small preview' }, `${r.messages} message${r.messages === 1 ? '' : 's'}: ${r.preview}`)),
        h('div', { class: 'row' },
          name,
          h('button', { type: 'button', class: 'accept', onclick: () => answerRequest(r, 'accept', row, name.value.trim()) }, 'Accept'),
          h('button', { type: 'button', class: 'link block', onclick: () => answerRequest(r, 'block', row) }, 'Block')),
      );
      return row;
    }),
  );
}

async function answerInvitation(g, how, row, block) {
  try {
    await post(`/v1/groups/${enc(g.group_id)}/${how}`, how === 'decline' ? { block: !!block } : {});
    await refreshList();
    if (how === 'accept') openConversation(g.group_id);
  } catch (e) {
    formError(row, e);
  }
}

async function answerRequest(r, how, row, name) {
  try {
    await post(`/v1/requests/${enc(r.peer_id)}/${how}`, how === 'accept' && name ? { name } : {});
    await refreshList();
    if (how === 'accept') openConversation(r.peer_id);
  } catch (e) {
    formError(row, e);
  }
}

function applyList([convs, contacts]) {
  state.contacts = new Map(contacts.map((c) => [c.peer_id, c.name]));
  state.trust = new Map(contacts.map((c) => [c.peer_id, { verified: !!c.verified, identity_changed: !!c.identity_changed }]));
  state.convs = convs;
  if (state.open) {
    const fresh = convById(state.open.id);
    if (fresh) state.open = fresh;
  }
  renderList();
  renderHead();
}

// The ✓ of a verified contact, or the warning of one whose identity key changed.
function trustMark(peer) {
  const t = state.trust.get(peer);
  if (t && t.identity_changed) return h('span', { class: 'warn', title: 'safety number changed', 'aria-label': 'safety number changed' }, '⚠');
  if (t && t.verified) return h('span', { class: 'verified', title: 'verified', 'aria-label': 'verified' }, '✓');
  return null;
}

function preview(conv) {
  const typing = conv.kind === 'contact' && (state.typing.get(conv.id) || 0) > Date.now();
  if (typing) return h('span', { class: 'typing' }, 'typing…');
  const m = conv.last;
  if (!m) return h('span', { class: 'muted' }, conv.kind === 'group' ? 'group' : 'no messages yet');
  const who = conv.kind === 'group' && m.direction === 'in' ? `${nameOf(m.from)}: ` : '';
  if (m.text && m.text.startsWith('⏱')) return h('span', { class: 'muted' }, clockIcon(), m.text.slice(1).trim());
  const body = m.attachment ? `[file] ${m.attachment.name}${m.text ? ' ' + m.text : ''}` : m.text;
  return h('span', {}, m.direction === 'out' ? tick(m.state, m.id) : null, who + body);
}

function renderList() {
  const filter = $('search').value.trim().toLowerCase();
  const list = $('conversations');
  const focused = document.activeElement && document.activeElement.dataset.conv;
  list.replaceChildren();
  let unread = 0;
  for (const conv of state.convs) {
    unread += conv.unread;
    if (filter && !conv.name.toLowerCase().includes(filter)) continue;
    const p = state.presence.get(conv.id);
    const selected = state.open && state.open.id === conv.id;
    const li = h(
      'li',
      {
        role: 'option',
        tabindex: selected || (!state.open && list.children.length === 0) ? '0' : '-1',
        'aria-selected': selected ? 'true' : 'false',
        'data-conv': conv.id,
        'aria-label': `${conv.name}${conv.unread ? `, ${conv.unread} unread` : ''}`,
        onclick: () => openConversation(conv.id),
        onkeydown: listKeys,
      },
      h('span', {
        class: `dot ${conv.kind === 'group' ? 'group' : p && p.online ? 'online' : 'offline'}`,
        title: conv.kind === 'group' ? 'group' : lastSeen(p),
      }),
      h(
        'div',
        { class: 'grow' },
        h('div', { class: 'row' }, h('strong', { class: 'name' }, conv.name, conv.kind === 'contact' ? trustMark(conv.id) : null), h('time', { class: 'muted' }, shortTime(conv.activity_ms))),
        h('div', { class: 'row' }, h('span', { class: 'preview' }, preview(conv)), conv.unread ? h('span', { class: 'badge', 'aria-hidden': 'true' }, conv.unread > 999 ? '999+' : conv.unread) : null),
      ),
    );
    list.append(li);
  }
  if (focused) {
    const again = list.querySelector(`[data-conv="${CSS.escape(focused)}"]`);
    if (again) again.focus();
  }
  document.title = unread ? `(${unread}) kith` : 'kith';
  if (window.kith.timings.list === undefined) window.kith.timings.list = performance.now();
}

function listKeys(e) {
  const items = [...$('conversations').children];
  const at = items.indexOf(e.currentTarget);
  let next = null;
  if (e.key === 'ArrowDown') next = items[at + 1];
  else if (e.key === 'ArrowUp') next = items[at - 1];
  else if (e.key === 'Home') next = items[0];
  else if (e.key === 'End') next = items[items.length - 1];
  else if (e.key === 'Enter' || e.key === ' ') {
    e.preventDefault();
    openConversation(e.currentTarget.dataset.conv).then(() => $('text').focus());
    return;
  }
  if (next) {
    e.preventDefault();
    items.forEach((i) => i.setAttribute('tabindex', '-1'));
    next.setAttribute('tabindex', '0');
    next.focus();
  }
}

// ---- a conversation ----------------------------------------------------------------------

async function openConversation(id) {
  const started = performance.now();
  const conv = convById(id);
  if (!conv) return;
  state.open = conv;
  state.messages = [];
  state.hasMore = false;
  closePanel();
  $('empty').hidden = true;
  $('chat-head').hidden = false;
  $('messages').hidden = false;
  $('composer').hidden = false;
  renderHead();
  renderList();
  refreshTimer(id);
  let page;
  try {
    page = await get(`/v1/messages?with=${enc(id)}&limit=${PAGE}`);
  } catch (e) {
    showMessagesError(e.message);
    return;
  }
  if (!state.open || state.open.id !== id) return;
  state.messages = page;
  state.hasMore = page.length === PAGE;
  renderMessages({ bottom: true });
  window.kith.timings.open = performance.now() - started;
  window.kith.timings.opened = (window.kith.timings.opened || 0) + 1;
  markRead();
  if (conv.kind === 'contact') {
    post('/v1/open', { with: id }).catch(() => {});
    refreshPresence(id);
  } else {
    get(`/v1/groups/${enc(id)}`).then((g) => { state.groupInfo = g; renderHead(); }).catch(() => {});
  }
}

function showMessagesError(text) {
  $('messages').replaceChildren(h('div', { class: 'error', role: 'alert' }, text));
}

function renderHead() {
  const conv = state.open;
  if (!conv) return;
  const sub = $('chat-sub');
  const dot = $('chat-dot');
  const contact = conv.kind === 'contact';
  const timer = state.timers.get(conv.id);
  $('chat-title').replaceChildren(
    conv.name,
    (contact && trustMark(conv.id)) || '',
    timer ? h('span', { class: 'timer-badge', title: `Disappearing messages: ${timerLabel(timer)}`, 'aria-label': `disappearing messages after ${timerLabel(timer)}` }, clockIcon(), timerLabel(timer)) : '',
  );
  const t = contact && state.trust.get(conv.id);
  const warning = $('identity-warning');
  warning.hidden = !(t && t.identity_changed);
  if (!warning.hidden) {
    warning.replaceChildren(
      `${conv.name}'s safety number changed: their identity key is new (a reinstall, or someone in between). Compare the number again before you trust it. `,
      h('button', { type: 'button', class: 'link', onclick: () => contactPanel(conv) }, 'Show safety number'),
    );
  }
  if (conv.kind === 'group') {
    dot.className = 'dot group';
    const g = state.groupInfo && state.groupInfo.group_id === conv.id ? state.groupInfo : null;
    // A group this node left or was removed from stays readable, but nothing can be sent.
    const gone = g && g.member === false;
    sub.textContent = !g ? 'group' : gone ? 'you are no longer a member: read-only' : g.members.map(nameOf).join(', ');
    if (g) $('composer').hidden = gone;
    return;
  }
  const p = state.presence.get(conv.id);
  dot.className = `dot ${p && p.online ? 'online' : 'offline'}`;
  const typing = (state.typing.get(conv.id) || 0) > Date.now();
  sub.textContent = typing ? `${conv.name} is typing…` : lastSeen(p) || 'presence unknown';
}

function tick(s, id) {
  if ((id && state.failed.has(id)) || s === 'failed') return h('span', { class: 'tick failed', 'aria-label': 'not sent' }, '!');
  const shown = { pending: '◷', sent: '✓', delivered: '✓✓', read: '✓✓' }[s] || '';
  return h('span', { class: `tick ${s}`, title: s, 'aria-label': s, 'data-state': s }, shown);
}

function attachmentView(m) {
  const a = m.attachment;
  const box = h('div', { class: 'file' });
  const url = `/v1/files/${enc(m.id)}`;
  if (a.thumbnail) {
    const img = h('img', { class: 'thumb', src: `${url}/thumbnail`, alt: `picture ${a.name}`, width: '64', height: '64' });
    box.append(a.path ? h('a', { href: url, target: '_blank', rel: 'noopener', title: 'open full size' }, img) : img);
  }
  const label = `${a.name} · ${size(a.size)}`;
  if (a.path) {
    box.append(h('a', { class: 'file-name', href: `${url}?download=true`, download: a.name }, label));
  } else if (m.direction === 'in') {
    box.append(h('span', { class: 'file-name' }, label));
    const p = state.progress.get(m.id);
    if (p && p.direction === 'download') {
      box.append(h('progress', { max: String(p.total || 1), value: String(p.done), 'aria-label': `downloading ${a.name}` }));
    } else {
      box.append(h('button', { type: 'button', class: 'link', onclick: (e) => download(m, e.currentTarget) }, 'Download'));
    }
  }
  const up = state.progress.get(m.id);
  if (up && up.direction === 'upload' && up.done < up.total) {
    box.append(h('progress', { max: String(up.total), value: String(up.done), 'aria-label': `uploading ${a.name}` }));
  }
  return box;
}

// A timer change, shown as a line across the conversation rather than as a bubble.
function timerLineView(m) {
  const who = m.direction === 'out' ? 'You' : nameOf(m.from);
  const secs = m.timer.timer_secs;
  const said = secs ? `set disappearing messages to ${timerLabel(secs)}` : 'turned disappearing messages off';
  return h('div', { class: 'timer-line', 'data-id': m.id, role: 'note' }, h('span', {}, clockIcon(), `${who} ${said} · ${shortTime(m.sent_at_ms)}`));
}

function messageView(m) {
  if (m.timer) return timerLineView(m);
  const out = m.direction === 'out';
  const group = state.open && state.open.kind === 'group';
  const failed = state.failed.get(m.id);
  return h(
    'div',
    { class: `msg ${out ? 'out' : 'in'}${failed ? ' has-error' : ''}`, 'data-id': m.id, role: 'article', 'aria-label': `${out ? 'you' : nameOf(m.from)} at ${time(m.sent_at_ms)}` },
    group && !out ? h('div', { class: 'from' }, nameOf(m.from)) : null,
    m.attachment ? attachmentView(m) : null,
    m.text ? h('div', { class: 'text' }, m.text) : null,
    h(
      'div',
      { class: 'meta' },
      m.expires_at_ms ? h('span', { class: 'expires', title: `disappears at ${new Date(m.expires_at_ms).toLocaleString()}`, 'aria-label': 'disappearing message' }, clockIcon()) : null,
      h('time', { datetime: new Date(m.sent_at_ms).toISOString() }, time(m.sent_at_ms)),
      out ? tick(m.state, m.id) : null,
      out && group && !m.local ? h('button', { type: 'button', class: 'link', 'aria-label': 'who got it', onclick: () => messageInfo(m) }, 'info') : null,
    ),
    failed ? h('div', { class: 'error', role: 'alert' }, `Not sent: ${failed} `, h('button', { type: 'button', class: 'link', onclick: () => retry(m) }, 'Retry')) : null,
  );
}

function renderMessages(opts) {
  const box = $('messages');
  const fromBottom = box.scrollHeight - box.scrollTop - box.clientHeight;
  const keepTop = opts && opts.keepOffset;
  const oldHeight = box.scrollHeight;
  const oldTop = box.scrollTop;
  const kids = [];
  if (state.hasMore) kids.push(h('div', { class: 'more muted' }, 'Scroll up for older messages'));
  let day = '';
  for (const m of state.messages) {
    const d = new Date(m.sent_at_ms).toDateString();
    if (d !== day) {
      day = d;
      kids.push(h('div', { class: 'day', role: 'separator' }, h('span', {}, dayLabel(m.sent_at_ms))));
    }
    kids.push(messageView(m));
  }
  if (!state.messages.length) kids.push(h('div', { class: 'muted center' }, 'No messages yet. Say hello!'));
  box.replaceChildren(...kids);
  if (keepTop) box.scrollTop = oldTop + (box.scrollHeight - oldHeight);
  else if ((opts && opts.bottom) || fromBottom < 80) box.scrollTop = box.scrollHeight;
}

async function loadOlder() {
  const conv = state.open;
  const first = state.messages.find((m) => !m.local);
  if (!conv || !first || !state.hasMore || state.loadingOlder) return;
  state.loadingOlder = true;
  try {
    const page = await get(`/v1/messages?with=${enc(conv.id)}&limit=${PAGE}&before=${enc(first.id)}`);
    if (!isOpen(conv)) return;
    state.hasMore = page.length === PAGE;
    state.messages = page.concat(state.messages);
    renderMessages({ keepOffset: true });
  } catch (e) {
    banner(`Could not load older messages: ${e.message}`);
  } finally {
    state.loadingOlder = false;
  }
}

// Fetches the newest page of the open conversation and merges it into what is shown.
async function refreshNewest() {
  const conv = state.open;
  if (!conv) return;
  const page = await get(`/v1/messages?with=${enc(conv.id)}&limit=${PAGE}`);
  if (!isOpen(conv)) return;
  const byId = new Map(state.messages.map((m, i) => [m.id, i]));
  let added = false;
  for (const m of page) {
    const at = byId.get(m.id);
    if (at === undefined) {
      state.messages.push(m);
      added = true;
    } else {
      const old = state.messages[at];
      m.state = later(old.state, m.state);
      state.messages[at] = m;
    }
  }
  // Locally shown messages the daemon now knows under their id are dropped.
  const pageIds = new Set(page.map((m) => m.id));
  state.messages = state.messages.filter((m) => !m.local || !m.realId || !pageIds.has(m.realId));
  if (added) {
    const locals = state.messages.filter((m) => m.local);
    state.messages = state.messages.filter((m) => !m.local).sort((a, b) => a.sent_at_ms - b.sent_at_ms).concat(locals);
  }
  renderMessages();
}

// The open conversation's timer, for its header.
async function refreshTimer(id) {
  try {
    const t = await get(`/v1/chats/${enc(id)}/timer`);
    state.timers.set(id, t.timer_secs);
    if (state.open && state.open.id === id) renderHead();
    return t;
  } catch (e) {
    return null;
  }
}

async function markRead() {
  const conv = state.open;
  if (!conv || document.visibilityState !== 'visible') return;
  const unread = state.messages.some((m) => m.direction === 'in' && m.state !== 'read') || conv.unread;
  if (!unread) return;
  try {
    await post('/v1/read', { with: conv.id });
    for (const m of state.messages) if (m.direction === 'in') m.state = 'read';
    conv.unread = 0;
    renderList();
  } catch (e) {
    banner(`Could not mark the conversation read: ${e.message}`);
  }
}

// ---- sending -----------------------------------------------------------------------------

async function sendText(text, conv) {
  const local = { id: `local-${++state.localSeq}`, local: true, direction: 'out', from: state.me.peer_id, text, sent_at_ms: Date.now(), state: 'pending', group: conv.kind === 'group' ? conv.id : undefined };
  state.messages.push(local);
  renderMessages({ bottom: true });
  try {
    const sent = await post('/v1/send', { to: conv.id, text });
    local.realId = sent.id;
    sent.state = later(sent.state, state.receipts.get(sent.id) || 'pending');
    if (isOpen(conv)) {
      const known = state.messages.find((m) => m.id === sent.id);
      if (known) state.messages = state.messages.filter((m) => m !== local);
      else Object.assign(local, { id: sent.id, local: false, state: later(local.state, sent.state) });
      renderMessages();
    }
    refreshListSoon();
  } catch (e) {
    state.failed.set(local.id, e.message);
    local.retry = () => sendText(text, conv);
    if (isOpen(conv)) renderMessages();
  }
}

function retry(m) {
  state.failed.delete(m.id);
  state.messages = state.messages.filter((x) => x !== m);
  renderMessages();
  if (m.retry) m.retry();
  else if (state.open) sendText(m.text, state.open);
}

function uploadFile(file, conv) {
  const row = h('div', { class: 'upload' }, h('span', {}, `${file.name} · ${size(file.size)}`));
  const bar = h('progress', { max: '1', value: '0', 'aria-label': `uploading ${file.name}` });
  row.append(bar);
  $('uploads').append(row);
  const xhr = new XMLHttpRequest();
  xhr.open('POST', `/v1/upload?to=${enc(conv.id)}&name=${enc(file.name)}`);
  xhr.setRequestHeader('x-kith-csrf', '1');
  xhr.setRequestHeader('content-type', 'application/octet-stream');
  xhr.upload.onprogress = (e) => {
    if (e.lengthComputable) {
      bar.max = e.total;
      bar.value = e.loaded;
    }
  };
  const failed = (why) => {
    row.replaceChildren(
      h('span', { class: 'error', role: 'alert' }, `${file.name}: ${why} `),
      h('button', { type: 'button', class: 'link', onclick: () => { row.remove(); uploadFile(file, conv); } }, 'Retry'),
      h('button', { type: 'button', class: 'link', onclick: () => row.remove() }, 'Dismiss'),
    );
  };
  xhr.onload = () => {
    if (xhr.status >= 200 && xhr.status < 300) {
      row.remove();
      if (isOpen(conv)) refreshNewest().catch(() => {});
      refreshListSoon();
    } else {
      let why = `the daemon answered ${xhr.status}`;
      try { why = JSON.parse(xhr.responseText).error || why; } catch (e) { /* keep the status */ }
      failed(why);
    }
  };
  xhr.onerror = () => failed('the daemon does not answer');
  xhr.send(file);
}

async function download(m, button) {
  button.disabled = true;
  state.progress.set(m.id, { direction: 'download', done: 0, total: m.attachment.size });
  renderMessages();
  try {
    await post('/v1/download', { id: m.id });
    state.progress.delete(m.id);
    await refreshNewest();
  } catch (e) {
    state.progress.delete(m.id);
    renderMessages();
    banner(`Download of ${m.attachment.name} failed: ${e.message}`);
  }
}

// ---- live events -------------------------------------------------------------------------

function connectEvents() {
  if (state.events) state.events.close();
  const es = new EventSource('/v1/events');
  state.events = es;
  es.onopen = () => {
    logEvent(['stream open', Date.now()]);
    banner('');
    refreshList().catch(() => {});
    refreshNewest().catch(() => {});
  };
  es.onerror = () => {
    logEvent(['stream error', es.readyState, Date.now()]);
    banner('Connection to the daemon lost; reconnecting…');
    if (es.readyState === EventSource.CLOSED) {
      // A refused stream is not retried by the browser: check why, then try again.
      setTimeout(() => {
        get('/v1/id').then(() => connectEvents(), (e) => { if (e.status !== 401) setTimeout(connectEvents, 2000); });
      }, 2000);
    }
  };
  es.onmessage = (e) => {
    let ev;
    try { ev = JSON.parse(e.data); } catch (err) { return; }
    if (ev.type !== 'progress') logEvent([ev.type, ev.id || ev.peer || ev.from, ev.conversation, ev.state, Date.now()]);
    handle(ev);
  };
}

function handle(ev) {
  const open = state.open;
  if (ev.type === 'message') {
    // Newer daemons say which conversation; older ones only the sender (a group message then
    // shows after the refetch).
    const conv = ev.conversation || null;
    state.typing.delete(ev.from);
    if (open && (!conv || conv === open.id || (!ev.group && ev.from === open.id))) {
      refreshNewest().then(markRead).catch(() => {});
      if (ev.timer || (ev.text || '').startsWith('⏱')) refreshTimer(open.id);
    }
    refreshListSoon();
    if (document.hidden && 'Notification' in window && Notification.permission === 'granted') {
      const title = ev.conversation_name || ev.from_name || nameOf(ev.from);
      new Notification(title, { body: ev.text || 'sent a file', tag: conv || ev.from });
    }
  } else if (ev.type === 'receipt') {
    state.receipts.set(ev.id, later(state.receipts.get(ev.id) || 'pending', ev.state));
    if (state.receipts.size > 1000) state.receipts.delete(state.receipts.keys().next().value);
    const m = state.messages.find((x) => x.id === ev.id || x.realId === ev.id);
    if (m) {
      if (m.group) {
        get(`/v1/status/${enc(ev.id)}`).then((s) => { m.state = later(m.state, s.state); updateTick(m); }).catch(() => {});
      } else {
        m.state = later(m.state, ev.state);
        updateTick(m);
      }
    }
    refreshListSoon();
  } else if (ev.type === 'group_invitation') {
    refreshListSoon();
    if (document.hidden && 'Notification' in window && Notification.permission === 'granted') {
      new Notification('Group invitation', { body: `You were added to ${ev.name}`, tag: `invitation-${ev.group_id}` });
    }
  } else if (ev.type === 'request') {
    refreshListSoon();
    if (document.hidden && 'Notification' in window && Notification.permission === 'granted') {
      new Notification('Message request', { body: `${ev.name || ev.peer_id} wrote to you`, tag: `request-${ev.peer_id}` });
    }
  } else if (ev.type === 'expired') {
    // A message of a temporary chat reached its timer: it is gone everywhere, here too.
    const before = state.messages.length;
    state.messages = state.messages.filter((x) => x.id !== ev.id && x.realId !== ev.id);
    state.failed.delete(ev.id);
    state.progress.delete(ev.id);
    if (state.messages.length !== before) renderMessages();
    refreshListSoon();
  } else if (ev.type === 'failed') {
    state.failed.set(ev.id, ev.reason || 'delivery failed');
    if (state.messages.some((x) => x.id === ev.id)) renderMessages();
  } else if (ev.type === 'typing') {
    state.typing.set(ev.from, Date.now() + TYPING_SHOWN_MS);
    renderHead();
    renderList();
    setTimeout(() => { renderHead(); renderList(); }, TYPING_SHOWN_MS + 50);
  } else if (ev.type === 'identity_changed') {
    refreshList()
      .then(() => {
        if (!$('panel').hidden && $('panel').dataset.contact === ev.peer && state.open && state.open.id === ev.peer) contactPanel(state.open);
      })
      .catch(() => {});
  } else if (ev.type === 'progress') {
    state.progress.set(ev.id, { direction: ev.direction, done: ev.done, total: ev.total });
    const shown = state.messages.find((x) => x.id === ev.id);
    if (ev.done >= ev.total) {
      state.progress.delete(ev.id);
      if (shown && ev.direction === 'download') waitForFile(ev.id, 10);
    }
    if (shown) renderSoon();
  }
}

// Progress events come many a second: draw at most once a frame.
let renderQueued = false;
function renderSoon() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    renderMessages();
  });
}

// A finished download is recorded just after its last progress event.
function waitForFile(id, tries) {
  refreshNewest()
    .then(() => {
      const m = state.messages.find((x) => x.id === id);
      if (m && m.attachment && !m.attachment.path && tries > 0) setTimeout(() => waitForFile(id, tries - 1), 300);
    })
    .catch(() => {});
}

function updateTick(m) {
  const el = document.querySelector(`.msg[data-id="${CSS.escape(m.id)}"] .tick`);
  if (el) el.replaceWith(tick(m.state, m.id));
}

// ---- presence ----------------------------------------------------------------------------

async function refreshPresence(peer) {
  try {
    const p = await get(`/v1/presence/${enc(peer)}`);
    state.presence.set(peer, p);
  } catch (e) {
    state.presence.delete(peer);
  }
  renderHead();
  renderList();
}

function presenceLoop() {
  const contacts = state.convs.filter((c) => c.kind === 'contact').slice(0, 30);
  for (const c of contacts) refreshPresence(c.id);
}

// ---- side panel: details, groups, contacts, invite, settings -----------------------------

function openPanel(title, ...body) {
  $('panel-title').textContent = title;
  $('panel-body').replaceChildren(...body.filter((b) => b !== null && b !== undefined));
  delete $('panel').dataset.contact;
  $('panel').hidden = false;
  const first = $('panel-body').querySelector('input, select, textarea, button');
  (first || $('panel-close')).focus();
}

function closePanel() {
  $('panel').hidden = true;
  delete $('panel').dataset.contact;
}

function formError(form, e) {
  let out = form.querySelector('.error');
  if (!out) {
    out = h('div', { class: 'error', role: 'alert' });
    form.append(out);
  }
  out.textContent = e.message;
}

function addContactPanel() {
  const form = h(
    'form',
    { class: 'stack' },
    h('label', {}, 'Name', h('input', { name: 'name', required: true, autocomplete: 'off' })),
    h('label', {}, 'Their invite (kith:…) or peer id', h('textarea', { name: 'peer', required: true, rows: '4' })),
    h('button', { type: 'submit' }, 'Add contact'),
  );
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    try {
      const c = await post('/v1/contacts', { name: form.name.value.trim(), peer: form.peer.value.trim() });
      await refreshList();
      closePanel();
      openConversation(c.peer_id);
    } catch (err) {
      formError(form, err);
    }
  });
  openPanel('Add a contact', form);
}

function newGroupPanel() {
  const contacts = [...state.contacts.entries()];
  const form = h(
    'form',
    { class: 'stack' },
    h('label', {}, 'Group name', h('input', { name: 'gname', required: true, autocomplete: 'off' })),
    h('fieldset', {}, h('legend', {}, 'Members'), contacts.length ? contacts.map(([peer, name]) => h('label', { class: 'check' }, h('input', { type: 'checkbox', value: peer }), name)) : h('p', { class: 'muted' }, 'Add contacts first.')),
    h('button', { type: 'submit' }, 'Create group'),
  );
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const members = [...form.querySelectorAll('input[type=checkbox]:checked')].map((i) => i.value);
    try {
      const g = await post('/v1/groups', { name: form.gname.value.trim(), members });
      await refreshList();
      closePanel();
      openConversation(g.group_id);
    } catch (err) {
      formError(form, err);
    }
  });
  openPanel('New group', form);
}

async function invitePanel() {
  const me = await get('/v1/id').catch(() => state.me);
  const text = h('textarea', { readonly: true, rows: '5', 'aria-label': 'your invite' }, me.invite);
  const copy = h('button', { type: 'button', onclick: async () => {
    try { await navigator.clipboard.writeText(me.invite); copy.textContent = 'Copied'; } catch (e) { text.select(); }
  } }, 'Copy');
  openPanel(
    'My invite',
    h('p', { class: 'muted' }, 'Give this to a friend; they add you with it.'),
    h('img', { class: 'qr', src: '/v1/invite.svg', alt: 'QR code of your invite' }),
    text,
    copy,
    h('p', { class: 'muted small' }, `Peer id: ${me.peer_id}`),
  );
}

async function settingsPanel() {
  let s;
  try {
    s = await get('/v1/settings');
  } catch (e) {
    openPanel('Settings', h('div', { class: 'error', role: 'alert' }, e.message));
    return;
  }
  const form = h(
    'form',
    { class: 'stack' },
    h('label', {}, 'Who sees when I am online and last seen',
      h('select', { name: 'presence' }, ['everyone', 'contacts', 'nobody'].map((v) => h('option', { value: v, selected: s.presence === v }, v)))),
    h('label', { class: 'check' }, h('input', { type: 'checkbox', name: 'receipts', checked: s.read_receipts }), 'Send read receipts'),
    h('button', { type: 'submit' }, 'Save'),
    h('div', { class: 'note', 'aria-live': 'polite' }),
  );
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    try {
      await post('/v1/settings', { presence: form.presence.value, read_receipts: form.receipts.checked });
      form.querySelector('.note').textContent = 'Saved.';
    } catch (err) {
      formError(form, err);
    }
  });
  const notify = 'Notification' in window && Notification.permission === 'default'
    ? h('button', { type: 'button', onclick: () => Notification.requestPermission().then(() => settingsPanel()) }, 'Notify me of new messages')
    : h('p', { class: 'muted' }, 'Notifications: ' + ('Notification' in window ? Notification.permission : 'not available'));
  openPanel('Settings', form, notify);
}

async function groupPanel(conv) {
  let g;
  try {
    g = await get(`/v1/groups/${enc(conv.id)}`);
  } catch (e) {
    openPanel(conv.name, h('div', { class: 'error', role: 'alert' }, e.message));
    return;
  }
  state.groupInfo = g;
  renderHead();
  const me = state.me.peer_id;
  const admin = g.admins.includes(me);
  const act = async (kind, who, form) => {
    try {
      await post(`/v1/groups/${enc(conv.id)}/${kind}`, who ? { who } : {});
      if (kind === 'leave') {
        closePanel();
        state.open = null;
        await refreshList();
        $('chat-head').hidden = true;
        $('messages').hidden = true;
        $('composer').hidden = true;
        $('empty').hidden = false;
      } else {
        groupPanel(conv);
      }
    } catch (err) {
      formError(form, err);
    }
  };
  const box = h('div', { class: 'stack' });
  const members = h('ul', { class: 'members', 'aria-label': 'members' }, g.members.map((peer) => h(
    'li',
    {},
    h('span', { class: 'grow' }, nameOf(peer), g.admins.includes(peer) ? h('span', { class: 'badge admin' }, 'admin') : null),
    admin && peer !== me && !g.admins.includes(peer) ? h('button', { type: 'button', class: 'link', onclick: () => act('promote', peer, box) }, 'Make admin') : null,
    admin && peer !== me ? h('button', { type: 'button', class: 'link', onclick: () => act('remove', peer, box) }, 'Remove') : null,
  )));
  box.append(h('h3', {}, `${g.members.length} members`), members);
  if (admin) {
    const candidates = [...state.contacts.entries()].filter(([peer]) => !g.members.includes(peer));
    if (candidates.length) {
      const pick = h('select', { 'aria-label': 'contact to add' }, candidates.map(([peer, name]) => h('option', { value: peer }, name)));
      box.append(h('div', { class: 'row' }, pick, h('button', { type: 'button', onclick: () => act('add', pick.value, box) }, 'Add')));
    }
  }
  // End-to-end encryption (MLS): each membership change or key refresh moves the epoch on.
  box.append(h('div', { class: 'keys row' },
    h('span', { class: 'grow muted small epoch' }, `End-to-end encrypted · key epoch ${g.epoch}`),
    h('button', { type: 'button', class: 'link rekey', title: 'Refresh your keys in this group now: whoever copied them before reads nothing after', onclick: () => act('rekey', null, box) }, 'Refresh my keys')));
  box.append(await timerSection(conv, admin));
  box.append(h('button', { type: 'button', class: 'danger', onclick: () => act('leave', null, box) }, 'Leave group'));
  openPanel(conv.name, box);
}

async function contactPanel(conv) {
  await refreshPresence(conv.id);
  let v = null;
  let why = null;
  try {
    v = await get(`/v1/contacts/${enc(conv.id)}/verify`);
  } catch (e) {
    why = e.message;
  }
  const timers = await timerSection(conv, false);
  openPanel(conv.name, h('p', {}, lastSeen(state.presence.get(conv.id)) || 'presence unknown'), h('p', { class: 'muted small' }, `Peer id: ${conv.id}`), timers, safetyView(conv, v, why));
  $('panel').dataset.contact = conv.id;
}

// The conversation's disappearing-message timer: a choice that applies at once (a line in the
// history on both sides), and in a group the admins' rule for who may change it.
async function timerSection(conv, admin) {
  const box = h('section', { class: 'stack', 'aria-label': 'disappearing messages' }, h('h3', {}, 'Disappearing messages'));
  const t = await refreshTimer(conv.id);
  if (!t) {
    box.append(h('p', { class: 'muted' }, 'The timer is not known right now.'));
    return box;
  }
  const group = conv.kind === 'group';
  const choices = [...new Set([t.min_secs < TIMER_PRESETS[0] ? t.min_secs : null, ...TIMER_PRESETS, t.timer_secs])]
    .filter((secs) => secs && secs >= t.min_secs)
    .sort((a, b) => a - b);
  const pick = h(
    'select',
    { id: 'timer', 'aria-label': 'disappearing messages', disabled: group && t.admins_only && !admin },
    h('option', { value: 'off', selected: !t.timer_secs }, 'Off'),
    choices.map((secs) => h('option', { value: `${secs}s`, selected: secs === t.timer_secs }, timerLabel(secs))),
  );
  const apply = async (body) => {
    try {
      await post(`/v1/chats/${enc(conv.id)}/timer`, body);
      await refreshTimer(conv.id);
      await refreshNewest();
      const saved = box.querySelector('.saved');
      if (saved) saved.textContent = 'Saved.';
    } catch (err) {
      formError(box, err);
    }
  };
  pick.addEventListener('change', () => apply({ duration: pick.value }));
  box.append(
    h('p', { class: 'muted small' }, 'New messages disappear for everyone in this chat this long after they are sent, from every device and relay that holds them.'),
    h('label', { class: 'row' }, 'Messages disappear after ', pick),
  );
  if (group && admin) {
    const only = h('input', { type: 'checkbox', id: 'timer-admins', checked: t.admins_only });
    only.addEventListener('change', () => apply({ duration: pick.value, admins_only: only.checked }));
    box.append(h('label', { class: 'row' }, only, ' Only admins may change it'));
  } else if (group && t.admins_only) {
    box.append(h('p', { class: 'muted small' }, 'Only admins may change it.'));
  }
  box.append(h('p', { class: 'saved muted small', role: 'status' }));
  return box;
}

// The safety number with a contact: its 60 digits, their QR code, whether it is verified.
function safetyView(conv, v, why) {
  const box = h('section', { class: 'stack', 'aria-label': 'safety number' }, h('h3', {}, 'Safety number'));
  if (!v) {
    box.append(h('p', { class: 'muted' }, why || 'not known yet'));
    return box;
  }
  if (v.identity_changed) {
    box.append(h('p', { class: 'warning', role: 'alert' }, `⚠ ${conv.name}'s identity key changed since you last compared: this is a new number.`));
  }
  const groups = v.safety_number.split(/\s+/).filter(Boolean);
  box.append(
    h('div', { class: 'safety', role: 'group', 'aria-label': `Safety number with ${conv.name}: ${groups.join(' ')}` }, groups.map((g) => h('span', {}, g))),
    h('img', { class: 'qr', src: `/v1/contacts/${enc(conv.id)}/verify.svg`, alt: `QR code of the safety number with ${conv.name}` }),
  );
  if (v.verified) {
    box.append(h('p', { class: 'trust' }, h('span', { class: 'verified', 'aria-hidden': 'true' }, '✓'), ' Verified: you compared this number with ', conv.name, '.'));
  } else {
    box.append(
      h('p', { class: 'muted' }, `Not verified. Compare these digits with ${conv.name}'s (in person, or on a call), or scan each other's code; if they match, mark them as verified.`),
      h('button', { type: 'button', class: 'mark-verified', onclick: async () => {
        try {
          await post(`/v1/contacts/${enc(conv.id)}/verify`);
          await refreshList();
          contactPanel(conv);
        } catch (err) {
          formError(box, err);
        }
      } }, 'Mark as verified'),
    );
  }
  return box;
}

async function messageInfo(m) {
  let s;
  try {
    s = await get(`/v1/status/${enc(m.id)}`);
  } catch (e) {
    openPanel('Message info', h('div', { class: 'error', role: 'alert' }, e.message));
    return;
  }
  const rows = Object.entries(s.members || {}).sort((a, b) => nameOf(a[0]).localeCompare(nameOf(b[0])));
  openPanel(
    'Message info',
    h('blockquote', {}, m.text || (m.attachment && m.attachment.name) || ''),
    h('ul', { class: 'members', 'aria-label': 'delivery per member' }, rows.map(([peer, st]) => h('li', { 'data-member': peer }, h('span', { class: 'grow' }, nameOf(peer)), tick(st), h('span', { class: 'muted' }, st)))),
    s.reason ? h('p', { class: 'muted' }, `Pending because: ${s.reason}`) : null,
  );
}

// ---- wiring ------------------------------------------------------------------------------

function wire() {
  $('btn-add').onclick = addContactPanel;
  $('btn-group').onclick = newGroupPanel;
  $('btn-invite').onclick = invitePanel;
  $('btn-settings').onclick = settingsPanel;
  $('panel-close').onclick = closePanel;
  $('btn-info').onclick = () => {
    if (!state.open) return;
    if (state.open.kind === 'group') groupPanel(state.open);
    else contactPanel(state.open);
  };
  $('search').addEventListener('input', renderList);
  const text = $('text');
  text.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $('composer').requestSubmit();
    }
  });
  text.addEventListener('input', () => {
    text.style.height = 'auto';
    text.style.height = `${Math.min(text.scrollHeight, 160)}px`;
    text.style.overflowY = text.scrollHeight > 160 ? 'auto' : 'hidden';
    const conv = state.open;
    if (conv && conv.kind === 'contact' && text.value && Date.now() - state.lastTypingSent > TYPING_SENT_EVERY_MS) {
      state.lastTypingSent = Date.now();
      post('/v1/typing', { to: conv.id }).catch(() => {});
    }
  });
  $('composer').addEventListener('submit', (e) => {
    e.preventDefault();
    const value = text.value.trim();
    if (!value || !state.open) return;
    text.value = '';
    text.style.height = 'auto';
    sendText(value, state.open);
  });
  $('file').addEventListener('change', (e) => {
    if (!state.open) return;
    for (const f of e.target.files) uploadFile(f, state.open);
    e.target.value = '';
  });
  const chat = $('chat');
  let depth = 0;
  chat.addEventListener('dragenter', (e) => {
    if (!state.open || !e.dataTransfer.types.includes('Files')) return;
    depth++;
    $('drop').hidden = false;
  });
  chat.addEventListener('dragleave', () => {
    depth = Math.max(0, depth - 1);
    if (!depth) $('drop').hidden = true;
  });
  chat.addEventListener('dragover', (e) => {
    if (state.open) e.preventDefault();
  });
  chat.addEventListener('drop', (e) => {
    e.preventDefault();
    depth = 0;
    $('drop').hidden = true;
    if (!state.open) return;
    for (const f of e.dataTransfer.files) uploadFile(f, state.open);
  });
  $('messages').addEventListener('scroll', () => {
    if ($('messages').scrollTop < 150) loadOlder();
  });
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible') markRead();
  });
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Escape' && !$('panel').hidden) closePanel();
    const typingInField = ['INPUT', 'TEXTAREA', 'SELECT'].includes(document.activeElement.tagName);
    if (e.key === '/' && !typingInField) {
      e.preventDefault();
      $('search').focus();
    }
  });
  setInterval(() => {
    if (state.open && state.open.kind === 'contact') refreshPresence(state.open.id);
  }, PRESENCE_EVERY_MS);
  setInterval(presenceLoop, PRESENCE_EVERY_MS * 3);
}

async function boot() {
  window.kith.timings.script = performance.now();
  const code = location.hash.match(/code=([0-9a-f]+)/);
  if (code) {
    history.replaceState(null, '', location.pathname);
    try {
      await post('/ui/session', { code: code[1] });
    } catch (e) {
      signedOut(e.message);
      return;
    }
  }
  window.kith.timings.session = performance.now();
  let lists;
  try {
    [state.me, lists] = await Promise.all([get('/v1/id'), Promise.all([get('/v1/conversations'), get('/v1/contacts')])]);
  } catch (e) {
    if (e.status !== 401) {
      banner(`${e.message}; retrying…`);
      setTimeout(boot, 3000);
    }
    return;
  }
  $('signin').hidden = true;
  $('app').hidden = false;
  $('me-name').textContent = state.me.name;
  $('me-id').textContent = ` ${state.me.peer_id.slice(0, 10)}…`;
  wire();
  applyList(lists);
  connectEvents();
  presenceLoop();
}

boot();
