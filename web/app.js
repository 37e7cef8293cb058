// The bot-generic web client: one page, plain JavaScript modules, no framework and no build step.
//
// Everything on screen is rendered from `state` by render(): a view function per route builds its
// DOM with h() (text always goes in as text nodes, never as HTML, except replies, which pass
// through the escaping Markdown renderer). Changing the language therefore only loads the other
// catalogue and calls render(): every string on the page changes at once.
//
// Routes use the History API (/chat?c=<conversation>, /login, /profile, /plans, /keys, /admin);
// the edge answers each of them with this page, so a reload lands on the same view and the same
// conversation.

import * as api from './api.js';
import { renderMarkdown } from './markdown.js';
import { LOCALES, formatDate, formatMoney, formatNumber, has, locale, negotiate, setLocale, t } from './i18n.js';

const state = {
    user: null, // the profile, when signed in
    notice: null, // { kind: 'info'|'error', text } shown on the sign-in page
    banner: null, // { key, text } across the top (offline, session expired, …)
    agents: [],
    conversations: [],
    current: null, // the open conversation
    messages: [],
    streaming: null, // { jobId, text, status } of the reply being received
    chatError: null, // { code, message, retryUntil, plans } shown under the messages
    draft: '',
    account: null,
    plans: null,
    history: null, // 'unavailable' or the list
    invoices: null, // GET /billing/invoices: 'unavailable' or { data, next_cursor }
    usage: null, // GET /billing/usage of the current window, when it could be read
    plansNotice: null,
    keys: null,
    newKey: null,
    admin: { users: null, query: '', policies: null, stats: null, logs: null, logsAction: '' }, // logs: GET /admin/logs, 'unavailable' or { data, next_cursor }
    // GET /notifications: available is null until asked, false while the route does not exist
    notifications: { available: null, unread: 0, open: false, items: null, next_cursor: null },
    telegramLink: null, // POST /auth/telegram/link-code: 'unavailable', 'error' or the answer
    loading: false,
};

const main = document.getElementById('main');
const top = document.getElementById('top');
const bannerEl = document.getElementById('banner');

/* ---- DOM helpers ---------------------------------------------------------------------------- */

/** Creates an element: attrs (on* are listeners, class, for, …), children (strings become text). */
function h(tag, attrs = {}, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs ?? {})) {
        if (v === undefined || v === null || v === false) continue;
        if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
        else if (k === 'class') el.className = v;
        else if (k === 'html') el.innerHTML = v; // only for renderMarkdown() output
        else if (k === 'value') el.value = v;
        else el.setAttribute(k, v === true ? '' : v);
    }
    for (const c of children.flat()) {
        if (c === null || c === undefined || c === false) continue;
        el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
}

function link(path, label, attrs = {}) {
    return h('a', {
        href: path,
        ...attrs,
        onclick: (e) => {
            if (e.ctrlKey || e.metaKey || e.shiftKey || e.button !== 0) return;
            e.preventDefault();
            navigate(path);
        },
    }, label);
}

function field(id, label, input, hint) {
    return h('div', { class: 'field' }, h('label', { for: id }, label), input, hint ? h('p', { class: 'hint', id: `${id}-hint` }, hint) : null);
}

/* ---- routing -------------------------------------------------------------------------------- */

const routes = {
    '/': () => (state.user ? viewChat() : viewLogin()),
    '/login': () => viewLogin(),
    '/register': () => viewRegister(),
    '/chat': () => viewChat(),
    '/profile': () => viewProfile(),
    '/plans': () => viewPlans(),
    '/keys': () => viewKeys(),
    '/admin': () => viewAdmin(),
};
const publicPaths = new Set(['/login', '/register']);

function path() {
    return location.pathname.replace(/\/+$/, '') || '/';
}

export function navigate(to, { replace = false } = {}) {
    if (replace) history.replaceState(null, '', to);
    else history.pushState(null, '', to);
    route();
}

async function route() {
    let p = path();
    if (!state.user && !publicPaths.has(p)) p = '/login';
    if (state.user && publicPaths.has(p)) p = '/chat';
    if (p !== path()) history.replaceState(null, '', p);
    render();
    pollNotifications();
    const load = { '/': loadChat, '/chat': loadChat, '/plans': loadPlans, '/keys': loadKeys, '/admin': loadAdmin }[p];
    if (load && state.user) {
        try {
            await load();
        } catch (err) {
            showError(err);
        }
        render();
    }
}

/* ---- rendering ------------------------------------------------------------------------------ */

function render() {
    document.title = `${t('app.title')}`;
    const skip = document.getElementById('skip-link');
    if (skip) skip.textContent = t('app.skip');
    renderTop();
    renderBanner();
    const p = state.user ? path() : publicPaths.has(path()) ? path() : '/login';
    const view = (routes[p] ?? routes['/'])();
    const keepFocus = document.activeElement?.id;
    main.replaceChildren(view);
    if (keepFocus) document.getElementById(keepFocus)?.focus();
}

function renderTop() {
    const nav = [];
    if (state.user) {
        const items = [
            ['/chat', t('nav.chat')],
            ['/plans', t('nav.plans')],
            ['/keys', t('nav.keys')],
            ['/profile', t('nav.profile')],
        ];
        if (state.user.role === 'admin') items.push(['/admin', t('nav.admin')]);
        for (const [p, label] of items) {
            const current = path() === p || (p === '/chat' && path() === '/');
            nav.push(h('li', {}, link(p, label, { 'aria-current': current ? 'page' : null })));
        }
        if (state.notifications.available) nav.push(h('li', {}, bellButton()));
        nav.push(h('li', {}, h('button', { type: 'button', class: 'link', id: 'logout', onclick: logout }, t('nav.logout'))));
    } else {
        nav.push(h('li', {}, link('/login', t('nav.login'))));
        nav.push(h('li', {}, link('/register', t('nav.register'))));
    }
    const picker = h('select', { id: 'top-locale', 'aria-label': t('profile.language'), onchange: (e) => changeLocale(e.target.value) },
        LOCALES.map((l) => h('option', { value: l.id, selected: l.id === locale() }, l.name)));
    const parts = [
        h('div', { class: 'brand' }, link(state.user ? '/chat' : '/login', t('app.title'))),
        h('nav', { 'aria-label': t('nav.label') }, h('ul', {}, nav)),
    ];
    if (!state.user) parts.push(picker); // signed in, the profile has the picker
    if (state.user && state.notifications.available && state.notifications.open) parts.push(notificationsPanel());
    top.replaceChildren(...parts);
}

/* ---- notifications -------------------------------------------------------------------------- */

// The bell's count comes from GET /notifications?unread=1, asked when the page starts, on every
// navigation and every NOTIFY_POLL_MS while the page is open (a modest pace: a notification is
// never urgent, and every open tab asks). While the route does not exist (404/405), the bell is
// not shown and nobody asks again until the next sign-in.
const NOTIFY_POLL_MS = 30000;
let notifyTimer = 0;
let notifyLast = 0;

function bellLabel() {
    const n = state.notifications.unread;
    return n > 0 ? t('notifications.unread_count', { count: formatNumber(n) }) : t('notifications.title');
}

/* The bell as inline SVG (no font has to carry an emoji; the CSP allows DOM-made SVG). */
function bellIcon() {
    const NS = 'http://www.w3.org/2000/svg';
    const svg = document.createElementNS(NS, 'svg');
    svg.setAttribute('viewBox', '0 0 24 24');
    svg.setAttribute('width', '20');
    svg.setAttribute('height', '20');
    svg.setAttribute('aria-hidden', 'true');
    svg.setAttribute('focusable', 'false');
    svg.setAttribute('class', 'bell-icon');
    const p = document.createElementNS(NS, 'path');
    p.setAttribute('fill', 'currentColor');
    p.setAttribute('d', 'M12 22a2.5 2.5 0 0 0 2.45-2h-4.9A2.5 2.5 0 0 0 12 22zm7-6v-5a7 7 0 0 0-5.5-6.84V3a1.5 1.5 0 0 0-3 0v1.16A7 7 0 0 0 5 11v5l-2 2v1h18v-1z');
    svg.append(p);
    return svg;
}

function bellButton() {
    const N = state.notifications;
    return h('button', {
        type: 'button', class: 'bell', id: 'notifications-button',
        'aria-expanded': N.open ? 'true' : 'false', 'aria-controls': 'notifications-panel', 'aria-label': bellLabel(),
        title: bellLabel(), onclick: guard(toggleNotifications),
    }, bellIcon(),
    h('span', { class: 'count', id: 'notifications-count', hidden: N.unread === 0, 'aria-hidden': 'true' }, formatNumber(N.unread)));
}

/** Updates the bell in place (the rest of the page and the focus stay as they are). */
function updateBell() {
    const button = document.getElementById('notifications-button');
    if (!button !== !state.notifications.available) {
        renderTop();
        return;
    }
    if (!button) return;
    button.setAttribute('aria-label', bellLabel());
    button.title = bellLabel();
    const count = document.getElementById('notifications-count');
    count.textContent = formatNumber(state.notifications.unread);
    count.hidden = state.notifications.unread === 0;
}

async function pollNotifications({ force = false } = {}) {
    const N = state.notifications;
    if (!state.user || N.available === false || !navigator.onLine) return;
    if (!force && Date.now() - notifyLast < 5000) return;
    notifyLast = Date.now();
    try {
        const res = await api.get('/notifications?unread=1&limit=1');
        N.available = true;
        N.unread = Number(res?.unread) || 0;
    } catch (err) {
        if (err.status === 404 || err.status === 405 || err.status === 501) N.available = false;
        else return; // offline or a passing failure: the next poll asks again
    }
    updateBell();
}

function startNotifications() {
    stopNotifications();
    state.notifications = { available: null, unread: 0, open: false, items: null, next_cursor: null };
    notifyTimer = setInterval(() => pollNotifications({ force: true }), NOTIFY_POLL_MS);
    pollNotifications({ force: true });
}

function stopNotifications() {
    if (notifyTimer) clearInterval(notifyTimer);
    notifyTimer = 0;
}

async function loadNotifications() {
    const N = state.notifications;
    const res = await api.get('/notifications?limit=20');
    N.items = res?.data ?? [];
    N.next_cursor = res?.next_cursor ?? null;
    if (typeof res?.unread === 'number') N.unread = res.unread;
}

async function toggleNotifications() {
    const N = state.notifications;
    N.open = !N.open;
    if (N.open) {
        N.items = null;
        renderTop();
        await loadNotifications();
        renderTop();
        document.getElementById('notifications-h')?.focus();
    } else {
        renderTop();
        document.getElementById('notifications-button')?.focus();
    }
}

async function markRead(body) {
    await api.post('/notifications/read', body);
    await loadNotifications();
    renderTop();
    document.getElementById('notifications-h')?.focus();
}

function notificationsPanel() {
    const N = state.notifications;
    const items = N.items;
    const close = () => {
        N.open = false;
        renderTop();
        document.getElementById('notifications-button')?.focus();
    };
    return h('section', {
        class: 'notifications card', id: 'notifications-panel', 'aria-labelledby': 'notifications-h',
        onkeydown: (e) => {
            if (e.key === 'Escape') close();
        },
    },
    h('div', { class: 'panel-head' },
        h('h2', { id: 'notifications-h', tabindex: -1 }, t('notifications.title')),
        items?.some((n) => !n.read_at) ? h('button', { type: 'button', class: 'small', id: 'notifications-read-all', onclick: guard(() => markRead({ all: true })) }, t('notifications.mark_all')) : null,
        h('button', { type: 'button', class: 'icon', 'aria-label': t('notifications.close'), title: t('notifications.close'), onclick: close }, '×')),
    items === null ? h('p', { class: 'muted' }, t('app.loading'))
        : items.length === 0 ? h('p', { class: 'muted', id: 'notifications-empty' }, t('notifications.empty'))
            : h('ul', { class: 'notification-list', id: 'notifications-list' }, items.map((n) => h('li', { class: n.read_at ? 'read' : 'unread', 'data-id': n.id },
                h('div', {},
                    h('strong', {}, n.title || n.kind), n.read_at ? null : h('span', { class: 'tag' }, t('notifications.unread_tag')),
                    n.body ? h('p', {}, n.body) : null,
                    h('span', { class: 'meta muted' }, formatDate(n.created_at))),
                n.read_at ? null : h('button', {
                    type: 'button', class: 'small', 'aria-label': t('notifications.mark_read_named', { title: n.title || n.kind }),
                    onclick: guard(() => markRead({ ids: [n.id] })),
                }, t('notifications.mark_read'))))));
}

function renderBanner() {
    const b = state.banner;
    if (!b) {
        bannerEl.hidden = true;
        bannerEl.replaceChildren();
        return;
    }
    bannerEl.hidden = false;
    bannerEl.dataset.kind = b.key;
    bannerEl.replaceChildren(h('span', {}, b.key ? t(b.key) : b.text));
}

function setBanner(key) {
    state.banner = key ? { key } : null;
    renderBanner();
}

/** An error message for an ApiError (the server's message is already in the user's language). */
function errorText(err) {
    if (!err) return '';
    if (err.code === 'offline') return t('error.offline');
    if (err.code === 'session_expired') return t('error.session_expired');
    if (err.message && err.message !== err.code) return err.message;
    return t('error.generic');
}

function showError(err) {
    if (err?.code === 'offline') setBanner('error.offline');
    else if (err?.code !== 'session_expired') {
        state.banner = { text: errorText(err) };
        renderBanner();
    }
}

/* ---- session -------------------------------------------------------------------------------- */

async function changeLocale(id) {
    const chosen = negotiate(id);
    localStorage.setItem('bg_locale', chosen);
    if (state.user) {
        try {
            state.user = { ...state.user, ...(await api.put('/auth/locale', { locale: chosen })) };
        } catch (err) {
            showError(err);
            return;
        }
    }
    await setLocale(chosen);
    render();
}

async function signedIn(user) {
    state.user = user;
    startNotifications();
    state.notice = null;
    if (state.banner?.key === 'error.session_expired') state.banner = null;
    if (user.locale) {
        localStorage.setItem('bg_locale', user.locale);
        await setLocale(user.locale);
    }
}

function sessionExpired() {
    if (!state.user) return;
    state.user = null;
    state.streaming = null;
    stopNotifications();
    state.notice = { kind: 'error', key: 'error.session_expired' };
    history.replaceState(null, '', '/login');
    render();
}

async function logout() {
    try {
        await api.post('/auth/logout', {});
    } catch {
        // the cookies are cleared by the answer; a failure leaves nothing to do
    }
    stopNotifications();
    Object.assign(state, { user: null, conversations: [], current: null, messages: [], account: null, keys: null, invoices: null, telegramLink: null });
    state.notice = { kind: 'info', key: 'auth.signed_out' };
    navigate('/login', { replace: true });
}

/* ---- sign in and register ------------------------------------------------------------------- */

function authForm(kind) {
    const isRegister = kind === 'register';
    const status = h('p', { class: 'form-error', id: 'auth-error', role: 'alert' });
    const notice = state.notice ? h('p', { class: `notice ${state.notice.kind}`, id: 'auth-notice', role: 'status' }, t(state.notice.key)) : null;
    const form = h('form', {
        class: 'card auth',
        novalidate: true,
        onsubmit: async (e) => {
            e.preventDefault();
            const fd = new FormData(form);
            const body = { email: fd.get('email'), password: fd.get('password'), mode: 'cookie' };
            if (isRegister) {
                if (fd.get('name')) body.name = fd.get('name');
                body.locale = locale();
            }
            const button = form.querySelector('button[type=submit]');
            button.disabled = true;
            status.textContent = '';
            try {
                const res = await api.post(isRegister ? '/auth/register' : '/auth/login', body);
                await signedIn(res.user);
                try {
                    state.user = await api.get('/auth/profile');
                } catch {
                    // the sign-in answer's user is enough to go on
                }
                navigate('/chat', { replace: true });
            } catch (err) {
                button.disabled = false;
                status.textContent = errorText(err);
            }
        },
    },
    h('h1', {}, isRegister ? t('auth.register_title') : t('auth.login_title')),
    notice,
    isRegister ? field('name', t('auth.name'), h('input', { id: 'name', name: 'name', autocomplete: 'name', maxlength: 100 })) : null,
    field('email', t('auth.email'), h('input', { id: 'email', name: 'email', type: 'email', autocomplete: 'email', required: true })),
    field('password', t('auth.password'), h('input', {
        id: 'password', name: 'password', type: 'password', required: true,
        autocomplete: isRegister ? 'new-password' : 'current-password', minlength: isRegister ? 10 : null,
        'aria-describedby': isRegister ? 'password-hint' : null,
    }), isRegister ? t('auth.password_hint') : null),
    status,
    h('button', { type: 'submit', class: 'primary', id: 'auth-submit' }, isRegister ? t('auth.register') : t('auth.login')),
    h('p', {}, isRegister ? t('auth.have_account') : t('auth.no_account'), ' ',
        link(isRegister ? '/login' : '/register', isRegister ? t('auth.login') : t('auth.register'))));
    return h('section', { class: 'narrow' }, form);
}

const viewLogin = () => authForm('login');
const viewRegister = () => authForm('register');

/* ---- chat ----------------------------------------------------------------------------------- */

function conversationFromUrl() {
    return new URLSearchParams(location.search).get('c');
}

async function loadChat() {
    const [agents, convs] = await Promise.all([api.get('/agents'), api.get('/chat/conversations?limit=100')]);
    state.agents = agents.data ?? [];
    state.conversations = convs.data ?? [];
    const id = conversationFromUrl();
    const conv = state.conversations.find((c) => c.id === id) ?? null;
    if (conv && state.current?.id !== conv.id) await openConversation(conv, { push: false });
    else if (!conv) {
        state.current = null;
        state.messages = [];
    }
}

async function openConversation(conv, { push = true } = {}) {
    state.current = conv;
    state.chatError = null;
    if (push) history.pushState(null, '', `/chat?c=${encodeURIComponent(conv.id)}`);
    const res = await api.get(`/chat/conversations/${encodeURIComponent(conv.id)}/messages?order=asc&limit=100`);
    if (state.current?.id === conv.id) state.messages = res.data ?? [];
    render();
    document.getElementById('composer-input')?.focus();
}

async function newConversation(agentId) {
    const conv = await api.post('/chat/conversations', { agent_id: agentId });
    state.conversations = [conv, ...state.conversations];
    state.messages = [];
    await openConversation(conv);
}

async function renameConversation(conv) {
    const title = window.prompt(t('chat.rename_prompt'), conv.title ?? '');
    if (title === null || !title.trim()) return;
    const updated = await api.patch(`/chat/conversations/${encodeURIComponent(conv.id)}`, { title: title.trim() });
    state.conversations = state.conversations.map((c) => (c.id === conv.id ? { ...c, ...updated } : c));
    if (state.current?.id === conv.id) state.current = { ...state.current, ...updated };
    render();
}

async function deleteConversation(conv) {
    if (!window.confirm(t('chat.delete_confirm', { title: conv.title || t('chat.untitled') }))) return;
    await api.del(`/chat/conversations/${encodeURIComponent(conv.id)}`);
    state.conversations = state.conversations.filter((c) => c.id !== conv.id);
    if (state.current?.id === conv.id) {
        state.current = null;
        state.messages = [];
        history.pushState(null, '', '/chat');
    }
    render();
}

function guard(fn) {
    return async (...args) => {
        try {
            await fn(...args);
        } catch (err) {
            showError(err);
        }
    };
}

async function loadPlansQuietly() {
    if (state.plans) return;
    try {
        state.plans = (await api.get('/billing/plans')).data ?? [];
    } catch {
        state.plans = [];
    }
}

async function send(content) {
    const conv = state.current;
    if (!conv || state.streaming || !content.trim()) return;
    if (!conv.title && state.messages.length === 0) {
        // a conversation is named after its first message until the user renames it
        const title = content.replace(/\s+/g, ' ').trim().slice(0, 60);
        api.patch(`/chat/conversations/${encodeURIComponent(conv.id)}`, { title }).then((updated) => {
            state.conversations = state.conversations.map((c) => (c.id === conv.id ? { ...c, ...updated } : c));
            if (state.current?.id === conv.id) state.current = { ...state.current, ...updated };
            if (!state.streaming) render();
        }, () => {});
    }
    state.chatError = null;
    state.draft = '';
    state.messages = [...state.messages, { id: `local-${Date.now()}`, role: 'user', content }];
    state.streaming = { jobId: null, text: '', status: 'waiting' };
    render();
    const s = state.streaming;
    let frame = 0;
    const paint = () => {
        if (frame) return;
        frame = requestAnimationFrame(() => {
            frame = 0;
            const el = document.getElementById('streaming-text');
            if (el) el.innerHTML = renderMarkdown(s.text);
            const st = document.getElementById('streaming-status');
            if (st) st.textContent = streamStatus(s);
            scrollMessages();
        });
    };
    try {
        await api.streamReply(conv.id, content, {
            start: (jobId) => {
                s.jobId = jobId;
                s.status = 'streaming';
                render();
            },
            delta: (text) => {
                s.text += text;
                paint();
            },
            reset: () => {
                s.text = '';
                paint();
            },
            connection: (st) => {
                if (s.status === 'stopping') return;
                s.status = st === 'lost' ? 'lost' : 'streaming';
                if (st === 'lost' && !navigator.onLine) setBanner('error.offline');
                paint();
            },
            done: (d) => {
                s.done = d;
            },
            error: (err) => {
                s.error = err;
            },
        });
        if (s.error) state.chatError = { code: s.error.code, message: errorText(s.error) };
        state.messages = [...state.messages, {
            id: s.done?.message_id ?? `local-${Date.now()}`,
            role: 'assistant',
            content: s.text,
            finish_reason: s.done?.finish_reason,
        }];
        if (s.done?.quota && state.account) state.account.quota = { ...state.account.quota, ...s.done.quota };
    } catch (err) {
        // refused before any reply: the user's message is not kept by the page
        state.messages = state.messages.slice(0, -1);
        state.draft = content;
        state.chatError = { code: err.code, message: errorText(err) };
        if (err.code === 'rate_limited' && err.retryAfter > 0) {
            state.chatError.retryUntil = Date.now() + err.retryAfter * 1000;
            tickRateLimit();
        }
        if (err.code === 'quota_exceeded' || err.code === 'payment_required' || err.code === 'feature_not_in_plan') {
            await loadPlansQuietly();
            state.chatError.plans = true;
        }
        if (err.code === 'offline') setBanner('error.offline');
    } finally {
        if (state.streaming === s) state.streaming = null;
        if (state.banner?.key === 'error.offline' && navigator.onLine) setBanner(null);
        render();
        scrollMessages();
    }
}

/* The reply's state under it: reconnecting, or stopping (the reply ends once the worker has read
   the provider's usage of what was generated, which can take a few seconds). */
function streamStatus(s) {
    if (s.status === 'lost') return t('chat.reconnecting');
    if (s.status === 'stopping') return t('chat.stopping');
    return '';
}

async function stopReply(s) {
    s.status = 'stopping';
    render();
    try {
        await api.cancelJob(s.jobId);
    } catch (err) {
        s.status = 'streaming';
        render();
        throw err;
    }
}

function tickRateLimit() {
    const e = state.chatError;
    if (!e?.retryUntil) return;
    const left = Math.ceil((e.retryUntil - Date.now()) / 1000);
    const el = document.getElementById('rate-wait');
    if (left <= 0) {
        state.chatError = null;
        render();
        return;
    }
    if (el) el.textContent = t('chat.rate_wait', { seconds: left });
    setTimeout(tickRateLimit, 1000);
}

function scrollMessages() {
    const list = document.getElementById('messages');
    if (list) list.scrollTop = list.scrollHeight;
}

function messageView(m) {
    const mine = m.role === 'user';
    return h('li', { class: `msg ${mine ? 'user' : 'assistant'}`, 'data-message-id': m.id },
        h('span', { class: 'who' }, mine ? t('chat.you') : state.current?.agent_name ?? t('chat.assistant')),
        mine ? h('div', { class: 'body plain' }, m.content) : h('div', { class: 'body md', html: renderMarkdown(m.content) }),
        // finish_reason: the turn just read; status: a stored message
        m.finish_reason === 'canceled' || m.status === 'canceled' ? h('span', { class: 'meta' }, t('chat.stopped')) : null);
}

function chatErrorView() {
    const e = state.chatError;
    if (!e) return null;
    const parts = [h('p', { class: 'error-text' }, e.message)];
    if (e.retryUntil) {
        parts.push(h('p', { id: 'rate-wait' }, t('chat.rate_wait', { seconds: Math.max(1, Math.ceil((e.retryUntil - Date.now()) / 1000)) })));
    }
    if (e.plans) {
        const plans = (state.plans ?? []).filter((p) => p.price?.amount > 0 || p.requests);
        parts.push(h('h3', {}, t('chat.plans_heading')));
        parts.push(h('ul', { class: 'plan-list' }, plans.map((p) => h('li', {},
            h('strong', {}, planName(p.id)), ' — ', formatMoney(p.price?.amount ?? 0, p.price?.currency),
            ' · ', t('plans.requests_per', { count: formatNumber(p.requests), period: t(`plans.period_${p.period}`) })))));
        parts.push(link('/plans', t('chat.see_plans'), { class: 'button' }));
    }
    return h('div', { class: `chat-error ${e.code}`, id: 'chat-error', role: 'alert', 'data-code': e.code }, parts);
}

function viewChat() {
    const agentSelect = h('select', { id: 'agent', 'aria-label': t('chat.agent') },
        state.agents.map((a) => h('option', { value: a.id }, a.name)));
    const side = h('aside', { class: 'sidebar', 'aria-label': t('chat.conversations') },
        h('div', { class: 'new-conv' },
            field('agent', t('chat.agent'), agentSelect),
            h('button', {
                type: 'button', class: 'primary', id: 'new-conversation', disabled: state.agents.length === 0,
                onclick: guard(() => newConversation(agentSelect.value)),
            }, t('chat.new'))),
        h('h2', {}, t('chat.conversations')),
        state.conversations.length === 0 ? h('p', { class: 'muted' }, t('chat.no_conversations')) : null,
        h('ul', { class: 'conv-list', id: 'conversations' }, state.conversations.map((c) => h('li', { class: state.current?.id === c.id ? 'current' : '' },
            link(`/chat?c=${encodeURIComponent(c.id)}`, c.title || t('chat.untitled'), {
                'aria-current': state.current?.id === c.id ? 'true' : null,
            }),
            h('span', { class: 'conv-actions' },
                h('button', { type: 'button', class: 'icon', 'aria-label': t('chat.rename_named', { title: c.title || t('chat.untitled') }), title: t('chat.rename'), onclick: guard(() => renameConversation(c)) }, '✎'),
                h('button', { type: 'button', class: 'icon', 'aria-label': t('chat.delete_named', { title: c.title || t('chat.untitled') }), title: t('chat.delete'), onclick: guard(() => deleteConversation(c)) }, '×'))))));
    let panel;
    if (!state.current) {
        panel = h('section', { class: 'chat empty' }, h('h1', {}, t('chat.welcome')), h('p', {}, t('chat.welcome_hint')));
    } else {
        const s = state.streaming;
        const items = state.messages.map(messageView);
        if (s) {
            items.push(h('li', { class: 'msg assistant streaming', 'aria-busy': 'true' },
                h('span', { class: 'who' }, state.current.agent_name ?? t('chat.assistant')),
                h('div', { class: 'body md', id: 'streaming-text', html: renderMarkdown(s.text) }),
                h('span', { class: 'meta', id: 'streaming-status', role: 'status' }, streamStatus(s))));
        }
        const input = h('textarea', {
            id: 'composer-input', name: 'content', rows: 3, required: true, placeholder: t('chat.placeholder'),
            'aria-label': t('chat.message'),
            oninput: (e) => {
                state.draft = e.target.value;
            },
            onkeydown: (e) => {
                if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
                    e.preventDefault();
                    form.requestSubmit();
                }
            },
        });
        input.value = state.draft;
        const blocked = Boolean(state.chatError?.retryUntil);
        const form = h('form', {
            class: 'composer',
            onsubmit: (e) => {
                e.preventDefault();
                send(input.value);
            },
        }, input,
        s ? h('button', { type: 'button', id: 'stop', class: 'danger', disabled: !s.jobId || s.status === 'stopping', onclick: guard(() => stopReply(s)) }, t('chat.stop'))
            : h('button', { type: 'submit', id: 'send', class: 'primary', disabled: blocked }, t('chat.send')));
        panel = h('section', { class: 'chat', 'aria-label': state.current.title || t('chat.untitled') },
            h('header', { class: 'chat-head' },
                h('h1', { id: 'conversation-title' }, state.current.title || t('chat.untitled')),
                h('span', { class: 'muted' }, state.current.agent_name ?? '')),
            h('ol', { class: 'messages', id: 'messages', 'aria-live': 'polite' }, items),
            chatErrorView(),
            form);
    }
    setTimeout(scrollMessages, 0);
    return h('div', { class: 'chat-layout' }, side, panel);
}

/* ---- profile -------------------------------------------------------------------------------- */

function viewProfile() {
    const u = state.user;
    const select = h('select', { id: 'locale', name: 'locale', onchange: (e) => changeLocale(e.target.value) },
        LOCALES.map((l) => h('option', { value: l.id, selected: l.id === locale(), lang: l.id }, l.name)));
    return h('section', { class: 'narrow' },
        h('h1', {}, t('profile.title')),
        h('div', { class: 'card' },
            h('dl', { class: 'facts' },
                h('dt', {}, t('profile.name')), h('dd', { id: 'profile-name' }, u.name || '—'),
                h('dt', {}, t('auth.email')), h('dd', { id: 'profile-email' }, u.email),
                h('dt', {}, t('profile.plan')), h('dd', {}, planName(typeof u.plan === 'object' ? u.plan?.id : u.plan) ?? '—'),
                h('dt', {}, t('profile.role')), h('dd', {}, t(`profile.role_${u.role === 'admin' ? 'admin' : 'user'}`))),
            field('locale', t('profile.language'), select, t('profile.language_hint'))),
        telegramCard());
}

/* POST /auth/telegram/link-code: the command to send to the bot, and until when it works. */
async function linkTelegram() {
    try {
        state.telegramLink = await api.post('/auth/telegram/link-code', {});
    } catch (err) {
        state.telegramLink = missing(err) ? 'unavailable' : { error: errorText(err) };
    }
    render();
    document.getElementById('telegram-result')?.focus();
}

function telegramCard() {
    const L = state.telegramLink;
    let result = null;
    if (L === 'unavailable') result = h('p', { class: 'muted', id: 'telegram-result', tabindex: -1 }, t('profile.telegram_unavailable'));
    else if (L?.error) result = h('p', { class: 'error-text', id: 'telegram-result', tabindex: -1, role: 'alert' }, L.error);
    else if (L) {
        result = h('div', { class: 'notice info', id: 'telegram-result', tabindex: -1, role: 'status' },
            h('p', {}, t('profile.telegram_command')),
            h('code', { class: 'secret', id: 'telegram-command' }, L.command || `/link ${L.code}`),
            L.expires_at ? h('p', { class: 'hint' }, t('profile.telegram_expires', { date: formatDate(L.expires_at) })) : null);
    }
    return h('section', { class: 'card', 'aria-labelledby': 'telegram-h' },
        h('h2', { id: 'telegram-h' }, t('profile.telegram')),
        h('p', { class: 'hint' }, t('profile.telegram_hint')),
        h('button', { type: 'button', id: 'telegram-link', onclick: guard(linkTelegram) }, t('profile.telegram_link')),
        result);
}

/* ---- plans and billing ---------------------------------------------------------------------- */

async function loadPlans() {
    const [account, plans] = await Promise.all([
        api.get('/billing/account'),
        api.get('/billing/plans').catch(() => ({ data: [] })),
    ]);
    state.account = account;
    state.plans = plans.data ?? [];
    state.usage = await api.get('/billing/usage').catch(() => null);
    try {
        state.history = (await api.get('/billing/history')).data ?? [];
    } catch (err) {
        if (err.status === 404 || err.status === 501) state.history = 'unavailable';
        else throw err;
    }
    try {
        state.invoices = await api.get('/billing/invoices?limit=20');
    } catch (err) {
        if (missing(err)) state.invoices = 'unavailable';
        else throw err;
    }
}

/** True when err says the route does not exist (yet) on this server. */
function missing(err) {
    return err?.status === 404 || err?.status === 405 || err?.status === 501;
}

async function moreInvoices() {
    const cur = state.invoices;
    if (!cur?.next_cursor) return;
    const next = await api.get(`/billing/invoices?limit=20&cursor=${encodeURIComponent(cur.next_cursor)}`);
    state.invoices = { data: [...(cur.data ?? []), ...(next.data ?? [])], next_cursor: next.next_cursor ?? null };
    render();
}

/** A subscription Paddle bills: its plan can be switched with POST /billing/change. */
function paidSubscription(a) {
    return Boolean(a?.plan) && (a.status === 'active' || a.status === 'past_due');
}

/* POST /billing/change: the plan now (an upgrade) or from the period's end (a downgrade). */
async function changePlan(planId) {
    state.plansNotice = null;
    try {
        const res = await api.post('/billing/change', { plan: planId });
        if (res?.effective === 'period_end') {
            state.plansNotice = { kind: 'info', key: 'plans.switched_later', params: { plan: planName(planId), date: formatDate(res.effective_at, false) } };
        } else {
            state.plansNotice = { kind: 'info', key: 'plans.switched_now', params: { plan: planName(planId) } };
        }
        await loadPlans();
    } catch (err) {
        if (err.status === 409 && err.details?.reason === 'no_paddle_subscription') {
            // a granted plan is not Paddle's to change: buying the other plan replaces it
            await subscribe(planId, 'subscribe');
            return;
        }
        state.plansNotice = missing(err) ? { kind: 'error', key: 'plans.not_available' } : { kind: 'error', text: errorText(err) };
    }
    render();
    document.getElementById('plans-notice')?.focus();
}

/* POST /billing/payment: a checkout for the overdue bill. */
async function payNow() {
    state.plansNotice = null;
    try {
        const res = await api.post('/billing/payment', {});
        state.plansNotice = res?.checkout_url ? { kind: 'info', key: 'plans.checkout_ready', url: res.checkout_url } : { kind: 'info', key: 'plans.paid' };
        if (!res?.checkout_url) await loadPlans();
    } catch (err) {
        state.plansNotice = missing(err) ? { kind: 'error', key: 'plans.not_available' } : { kind: 'error', text: errorText(err) };
    }
    render();
    (document.getElementById('checkout-link') ?? document.getElementById('plans-notice'))?.focus();
}

async function subscribe(planId, action) {
    state.plansNotice = null;
    try {
        const path = { cancel: '/billing/cancel', resume: '/billing/resume' }[action] ?? '/billing/subscribe';
        const res = await api.post(path, action === 'cancel' || action === 'resume' ? {} : { plan: planId });
        if (res?.checkout_url) {
            state.plansNotice = { kind: 'info', key: 'plans.checkout_ready', url: res.checkout_url };
        } else {
            state.plansNotice = { kind: 'info', key: { cancel: 'plans.canceled', resume: 'plans.resumed' }[action] ?? 'plans.changed' };
            await loadPlans();
        }
    } catch (err) {
        if (err.status === 404 || err.status === 501 || err.status === 405) {
            state.plansNotice = { kind: 'error', key: 'plans.not_available' };
        } else {
            state.plansNotice = { kind: 'error', text: errorText(err) };
        }
    }
    render();
    (document.getElementById('checkout-link') ?? document.getElementById('plans-notice'))?.focus();
}

/* A history entry's amount: money in minor units of its currency, or request credits. */
function historyAmount(x) {
    if (typeof x.amount !== 'number') return null;
    if (/^[A-Z]{3}$/.test(x.unit ?? '')) return [' ', formatMoney(Math.abs(x.amount), x.unit)];
    return [' ', formatNumber(Math.abs(x.amount)), ' ', t('plans.requests').toLowerCase()];
}

/* Bars of requests per day ({date, requests, …}), each labelled by label(day). */
function dayBars(days, label, caption) {
    const max = Math.max(1, ...days.map((d) => Number(d.requests) || 0));
    const bars = days.map((d) => {
        const fill = h('span', { class: 'fill' });
        fill.style.height = `${Math.round(((Number(d.requests) || 0) / max) * 100)}%`; // CSSOM (CSP)
        const text = label(d);
        return h('li', { title: text, 'aria-label': text }, fill);
    });
    return h('ol', { class: 'days', 'aria-label': caption }, bars);
}

const dayDate = (d) => formatDate(`${d.date}T00:00:00Z`, false);

/* Requests per day of the current window (GET /billing/usage), as bars, with the channels. */
function usageByDay(usage) {
    const days = usage?.by_day ?? [];
    if (days.length === 0) return null;
    const bars = dayBars(days, (d) => t('plans.day_requests', { date: dayDate(d), count: formatNumber(d.requests) }), t('plans.usage_by_day'));
    const channels = (usage.by_channel ?? []).map((c) =>
        h('li', {}, `${has(`plans.channel_${c.channel}`) ? t(`plans.channel_${c.channel}`) : c.channel}: ${formatNumber(c.requests)}`));
    return h('figure', { class: 'usage-days', id: 'usage-by-day' },
        bars,
        h('figcaption', {}, t('plans.usage_by_day'), channels.length ? h('ul', { class: 'channels' }, channels) : null));
}

function usageChart(quota) {
    const limit = Number(quota?.limit) || 0;
    const remaining = Math.max(0, Number(quota?.remaining) || 0);
    const used = Math.max(0, limit - remaining);
    const pct = limit > 0 ? Math.min(100, Math.round((used / limit) * 100)) : 0;
    const fill = h('span', { class: `fill ${pct >= 90 ? 'high' : ''}` });
    fill.style.width = `${pct}%`; // CSSOM, which the CSP allows (no inline style attributes)
    return h('figure', { class: 'usage' },
        h('div', {
            class: 'bar', role: 'meter', 'aria-valuemin': 0, 'aria-valuemax': limit, 'aria-valuenow': used,
            'aria-label': t('plans.used_of', { used: formatNumber(used), limit: formatNumber(limit) }),
        }, fill),
        h('figcaption', {}, t('plans.used_of', { used: formatNumber(used), limit: formatNumber(limit) })));
}

function viewPlans() {
    const a = state.account;
    const current = a?.plan;
    const notice = state.plansNotice;
    const parts = [h('h1', {}, t('plans.title'))];
    if (notice) {
        parts.push(h('div', { class: `notice ${notice.kind}`, id: 'plans-notice', tabindex: -1, role: 'status' },
            notice.key ? t(notice.key, notice.params) : notice.text,
            notice.url ? [' ', h('a', { href: notice.url, rel: 'noopener', target: '_blank', id: 'checkout-link' }, t('plans.open_checkout'))] : null));
    }
    if (a?.status === 'past_due') {
        parts.push(h('div', { class: 'notice error pay', id: 'past-due', role: 'status' },
            h('span', {}, t('plans.past_due')), ' ',
            h('button', { type: 'button', class: 'primary', id: 'pay-now', onclick: guard(payNow) }, t('plans.pay_now'))));
    }
    if (a) {
        const q = a.quota ?? {};
        parts.push(h('section', { class: 'card', id: 'account', 'aria-labelledby': 'account-h' },
            h('h2', { id: 'account-h' }, t('plans.current')),
            h('dl', { class: 'facts' },
                h('dt', {}, t('plans.plan')), h('dd', { id: 'current-plan' }, planName(current) ?? t('plans.none')),
                h('dt', {}, t('plans.status')), h('dd', {}, has(`plans.status_${a.status}`) ? t(`plans.status_${a.status}`) : a.status ?? '—'),
                a.trial_ends_at ? [h('dt', {}, t('plans.trial_ends')), h('dd', {}, formatDate(a.trial_ends_at))] : null,
                a.period ? [h('dt', {}, t('plans.period')), h('dd', {}, `${formatDate(a.period.start, false)} – ${formatDate(a.period.end, false)}`)] : null,
                h('dt', {}, t('plans.remaining')), h('dd', { id: 'quota-remaining' },
                    q.limit !== undefined ? t('plans.remaining_of', { remaining: formatNumber(q.remaining ?? 0), limit: formatNumber(q.limit) }) : '—'),
                q.reset_at ? [h('dt', {}, t('plans.resets')), h('dd', { id: 'quota-reset' }, formatDate(q.reset_at))] : null,
                scheduledFact(a.scheduled_change),
                a.next_bill ? [h('dt', {}, t('plans.next_bill')), h('dd', { id: 'next-bill' }, t('plans.next_bill_value', {
                    amount: formatMoney(a.next_bill.amount?.amount ?? 0, a.next_bill.amount?.currency),
                    date: formatDate(a.next_bill.at, false), plan: planName(a.next_bill.plan) ?? '—',
                }))] : null,
                a.payment_method ? [h('dt', {}, t('plans.payment_method')), h('dd', { id: 'payment-method' },
                    a.payment_method.last4
                        ? t('plans.card', { brand: cardBrand(a.payment_method.brand ?? a.payment_method.type), last4: a.payment_method.last4 })
                        : cardBrand(a.payment_method.type))] : null),
            h('h3', {}, t('plans.usage')),
            usageChart(q),
            usageByDay(state.usage),
            a.scheduled_change?.action === 'cancel'
                ? h('button', { type: 'button', class: 'primary', id: 'resume-plan', onclick: () => subscribe(current, 'resume') }, t('plans.resume'))
                : current && a.status !== 'trialing' ? h('button', { type: 'button', class: 'danger', id: 'cancel-plan', onclick: () => subscribe(current, 'cancel') }, t('plans.cancel')) : null));
    }
    const plans = state.plans ?? [];
    parts.push(h('section', { class: 'card', 'aria-labelledby': 'plans-h' },
        h('h2', { id: 'plans-h' }, t('plans.available')),
        plans.length === 0 ? h('p', { class: 'muted' }, state.plans ? t('plans.empty') : t('app.loading')) :
            h('div', { class: 'table-wrap' }, h('table', { class: 'plans', id: 'plans-table' },
                h('thead', {}, h('tr', {},
                    h('th', { scope: 'col' }, t('plans.plan')), h('th', { scope: 'col' }, t('plans.price')),
                    h('th', { scope: 'col' }, t('plans.requests')), h('th', { scope: 'col' }, t('plans.features')),
                    h('th', { scope: 'col' }, h('span', { class: 'sr-only' }, t('plans.action'))))),
                h('tbody', {}, plans.map((p) => h('tr', { class: p.id === current ? 'current' : '', 'data-plan': p.id },
                    h('th', { scope: 'row' }, planName(p.id), p.id === current ? h('span', { class: 'tag' }, t('plans.current_tag')) : null),
                    h('td', {}, formatMoney(p.price?.amount ?? 0, p.price?.currency)),
                    h('td', {}, t('plans.requests_per', { count: formatNumber(p.requests ?? 0), period: t(`plans.period_${p.period}`) })),
                    h('td', {}, (p.features ?? []).map((f) => (has(`plans.feature_${f}`) ? t(`plans.feature_${f}`) : f)).join(', ')),
                    h('td', {}, p.id === current || p.id === 'trial' ? null : planButton(p.id)))))))));
    parts.push(invoicesView());
    parts.push(h('section', { class: 'card', 'aria-labelledby': 'history-h' },
        h('h2', { id: 'history-h' }, t('plans.history')),
        state.history === 'unavailable' || state.history === null ? h('p', { class: 'muted' }, t('plans.history_unavailable'))
            : state.history.length === 0 ? h('p', { class: 'muted' }, t('plans.history_empty'))
                : h('ul', { id: 'history-list' }, state.history.map((x) => h('li', {}, formatDate(x.occurred_at ?? x.created_at), ' — ', x.description || x.type || '',
                    historyAmount(x))))));
    return h('section', { class: 'page' }, parts);
}

/* What happens at the period's end: the subscription ends, or another plan follows. */
/* "visa" → "Visa", "american_express" → "American Express": Paddle's names, shown as words. */
function cardBrand(name) {
    return String(name ?? '').split(/[_\s]+/).filter(Boolean).map((w) => w[0].toUpperCase() + w.slice(1)).join(' ') || '—';
}

function scheduledFact(sc) {
    if (!sc?.action) return null;
    const date = formatDate(sc.effective_at, false);
    const text = sc.action === 'cancel' ? t('plans.ends_on', { date }) : t('plans.switched_later', { plan: planName(sc.plan) ?? '—', date });
    return [h('dt', {}, t('plans.scheduled')), h('dd', { id: 'scheduled-change' }, text)];
}

/* Subscribe (checkout) without a paid subscription; with one, switch (POST /billing/change). */
function planButton(planId) {
    const a = state.account;
    const label = paidSubscription(a) ? t('plans.switch') : a?.plan ? t('plans.change') : t('plans.subscribe');
    return h('button', {
        type: 'button', class: 'primary', 'data-action': paidSubscription(a) ? 'switch' : 'subscribe',
        onclick: () => (paidSubscription(a) ? changePlan(planId) : subscribe(planId, 'subscribe')),
        'aria-label': `${label}: ${planName(planId)}`,
    }, label);
}

/* GET /billing/invoices: each links to its printable page (html_url), opened in a new tab. */
function invoicesView() {
    const inv = state.invoices;
    let body;
    if (inv === null) body = h('p', { class: 'muted' }, t('app.loading'));
    else if (inv === 'unavailable') body = h('p', { class: 'muted', id: 'invoices-unavailable' }, t('plans.invoices_unavailable'));
    else if ((inv.data ?? []).length === 0) body = h('p', { class: 'muted', id: 'invoices-empty' }, t('plans.invoices_empty'));
    else {
        body = [h('div', { class: 'table-wrap' }, h('table', { id: 'invoices-table' },
            h('thead', {}, h('tr', {},
                h('th', { scope: 'col' }, t('plans.invoice_number')), h('th', { scope: 'col' }, t('plans.invoice_date')),
                h('th', { scope: 'col' }, t('plans.invoice_period')), h('th', { scope: 'col' }, t('plans.plan')),
                h('th', { scope: 'col' }, t('plans.status')), h('th', { scope: 'col' }, t('plans.invoice_total')),
                h('th', { scope: 'col' }, h('span', { class: 'sr-only' }, t('plans.action'))))),
            h('tbody', {}, inv.data.map((x) => {
                const number = x.number || x.id;
                return h('tr', { 'data-invoice': x.id },
                    h('th', { scope: 'row' }, number),
                    h('td', {}, formatDate(x.issued_at ?? x.paid_at, false)),
                    h('td', {}, x.period_start ? `${formatDate(x.period_start, false)} – ${formatDate(x.period_end, false)}` : '—'),
                    h('td', {}, planName(x.plan) ?? '—'),
                    h('td', {}, has(`plans.invoice_status_${x.status}`) ? t(`plans.invoice_status_${x.status}`) : x.status),
                    h('td', { class: 'num' }, formatMoney(Number(x.total_minor) || 0, x.currency)),
                    h('td', {}, x.html_url ? h('a', {
                        href: x.html_url, target: '_blank', rel: 'noopener', 'aria-label': t('plans.invoice_view_named', { number }),
                    }, t('plans.invoice_view')) : null));
            })))),
        inv.next_cursor ? h('button', { type: 'button', id: 'invoices-more', onclick: guard(moreInvoices) }, t('plans.more')) : null];
    }
    return h('section', { class: 'card', id: 'invoices', 'aria-labelledby': 'invoices-h' }, h('h2', { id: 'invoices-h' }, t('plans.invoices')), body);
}

/** A plan's name in the user's language (the catalogue's, else the server's). */
function planName(id) {
    if (!id) return null;
    if (has(`plans.name_${id}`)) return t(`plans.name_${id}`);
    return (state.plans ?? []).find((p) => p.id === id)?.name ?? id;
}

/* ---- API keys ------------------------------------------------------------------------------- */

async function loadKeys() {
    if (!state.account) state.account = await api.get('/billing/account');
    if (!(state.account.features ?? []).includes('api_access')) {
        state.keys = 'no_access';
        await loadPlansQuietly();
        return;
    }
    state.keys = (await api.get('/auth/api-keys')).data ?? [];
}

function viewKeys() {
    const parts = [h('h1', {}, t('keys.title'))];
    if (state.keys === 'no_access') {
        const withApi = (state.plans ?? []).filter((p) => p.api_access || (p.features ?? []).includes('api_access')).map((p) => planName(p.id));
        parts.push(h('div', { class: 'card' }, h('p', { id: 'keys-no-access' }, t('keys.no_access', { plans: withApi.join(', ') || '—' })),
            link('/plans', t('chat.see_plans'), { class: 'button' })));
        return h('section', { class: 'narrow' }, parts);
    }
    const name = h('input', { id: 'key-name', name: 'name', required: true, maxlength: 100 });
    parts.push(h('form', {
        class: 'card',
        onsubmit: guard(async (e) => {
            e.preventDefault();
            const k = await api.post('/auth/api-keys', { name: name.value || 'key' });
            state.newKey = k;
            await loadKeys();
            render();
        }),
    }, field('key-name', t('keys.name'), name), h('button', { type: 'submit', class: 'primary' }, t('keys.create'))));
    if (state.newKey) {
        parts.push(h('div', { class: 'notice info', role: 'status' }, h('p', {}, t('keys.created_once')), h('code', { class: 'secret', id: 'new-key' }, state.newKey.key)));
    }
    const keys = Array.isArray(state.keys) ? state.keys : [];
    parts.push(h('div', { class: 'card' }, keys.length === 0 ? h('p', { class: 'muted' }, t('keys.empty')) :
        h('ul', { class: 'keys' }, keys.map((k) => h('li', {},
            h('strong', {}, k.name), ' ', h('code', {}, `${k.prefix ?? ''}…`), ' ',
            h('span', { class: 'muted' }, t('keys.created', { date: formatDate(k.created_at) })),
            h('button', {
                type: 'button', class: 'danger small', 'aria-label': t('keys.revoke_named', { name: k.name }),
                onclick: guard(async () => {
                    if (!window.confirm(t('keys.revoke_confirm', { name: k.name }))) return;
                    await api.del(`/auth/api-keys/${encodeURIComponent(k.id)}`);
                    await loadKeys();
                    render();
                }),
            }, t('keys.revoke')))))));
    return h('section', { class: 'narrow' }, parts);
}

/* ---- administration ------------------------------------------------------------------------- */

async function loadAdmin() {
    if (state.user?.role !== 'admin') return;
    const q = state.admin.query ? `&q=${encodeURIComponent(state.admin.query)}` : '';
    const [users, policies] = await Promise.all([
        api.get(`/admin/users?limit=50${q}`),
        api.get('/admin/policies').catch(() => ({ data: [] })),
    ]);
    state.admin.users = users.data ?? [];
    state.admin.policies = policies.data ?? [];
    try {
        state.admin.stats = await api.get('/admin/stats');
    } catch {
        state.admin.stats = 'unavailable';
    }
    await loadLogs().catch(() => {
        state.admin.logs = 'unavailable';
    });
}

/* GET /admin/logs, the audit kind: the newest 20 rows, with the action filter; cursor: the next page. */
function logsPath(cursor) {
    let p = '/admin/logs?limit=20';
    if (state.admin.logsAction) p += `&action=${encodeURIComponent(state.admin.logsAction)}`;
    if (cursor) p += `&cursor=${encodeURIComponent(cursor)}`;
    return p;
}

/* A refused filter (422) is the caller's to show; anything else leaves the section unavailable. */
async function loadLogs() {
    try {
        const res = await api.get(logsPath());
        state.admin.logs = { data: res.data ?? [], next_cursor: res.next_cursor ?? null };
    } catch (err) {
        if (err?.status === 422) throw err;
        state.admin.logs = 'unavailable';
    }
}

async function moreLogs() {
    const cur = state.admin.logs;
    if (!cur?.next_cursor) return;
    const next = await api.get(logsPath(cur.next_cursor));
    state.admin.logs = { data: [...cur.data, ...(next.data ?? [])], next_cursor: next.next_cursor ?? null };
    render();
}

function viewAdmin() {
    if (state.user?.role !== 'admin') return h('section', { class: 'narrow' }, h('h1', {}, t('admin.title')), h('p', {}, t('error.forbidden')));
    const A = state.admin;
    const search = h('input', { id: 'user-search', type: 'search', name: 'q', value: A.query });
    return h('section', { class: 'page' },
        h('h1', {}, t('admin.title')),
        h('section', { class: 'card', 'aria-labelledby': 'users-h' },
            h('h2', { id: 'users-h' }, t('admin.users')),
            h('form', {
                class: 'inline',
                role: 'search',
                onsubmit: guard(async (e) => {
                    e.preventDefault();
                    A.query = search.value.trim();
                    await loadAdmin();
                    render();
                }),
            }, field('user-search', t('admin.search'), search), h('button', { type: 'submit' }, t('admin.search_button'))),
            h('div', { class: 'table-wrap' }, h('table', {},
                h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, t('auth.email')), h('th', { scope: 'col' }, t('profile.name')),
                    h('th', { scope: 'col' }, t('profile.role')), h('th', { scope: 'col' }, t('plans.status')), h('th', { scope: 'col' }, h('span', { class: 'sr-only' }, t('plans.action'))))),
                h('tbody', {}, (A.users ?? []).map((u) => h('tr', {},
                    h('td', {}, u.email), h('td', {}, u.name ?? ''), h('td', {}, t(`profile.role_${u.role === 'admin' ? 'admin' : 'user'}`)),
                    h('td', { class: `status-${u.status}` }, has(`admin.status_${u.status}`) ? t(`admin.status_${u.status}`) : u.status),
                    h('td', {}, u.id === state.user.id ? null : h('button', {
                        type: 'button', class: u.status === 'disabled' ? 'small' : 'danger small',
                        'aria-label': t(u.status === 'disabled' ? 'admin.enable_named' : 'admin.disable_named', { email: u.email ?? u.id }),
                        onclick: guard(async () => {
                            await api.put(`/admin/users/${encodeURIComponent(u.id)}`, { status: u.status === 'disabled' ? 'active' : 'disabled' });
                            await loadAdmin();
                            render();
                        }),
                    }, u.status === 'disabled' ? t('admin.enable') : t('admin.disable'))))))))),
        h('section', { class: 'card', 'aria-labelledby': 'policies-h' },
            h('h2', { id: 'policies-h' }, t('admin.policies')),
            (A.policies ?? []).length === 0 ? h('p', { class: 'muted' }, t('admin.no_policies')) :
                h('ul', {}, A.policies.map((p) => h('li', {}, h('strong', {}, p.name ?? p.id), ` — ${p.type} · ${p.scope}${p.scope_id ? ` ${p.scope_id}` : ''}`)))),
        h('section', { class: 'card', 'aria-labelledby': 'stats-h' },
            h('h2', { id: 'stats-h' }, t('admin.stats')),
            A.stats === 'unavailable' || !A.stats ? h('p', { class: 'muted' }, t('admin.stats_unavailable')) : statsView(A.stats)),
        logsView());
}

/* The audit log: who did what to what, newest first; filtered by action (exact, or a prefix ending in "."). */
function logsView() {
    const A = state.admin;
    const L = A.logs;
    const action = h('input', { id: 'logs-action', type: 'search', name: 'action', value: A.logsAction, placeholder: 'policy.' });
    let body;
    if (L === null) body = h('p', { class: 'muted' }, t('app.loading'));
    else if (L === 'unavailable') body = h('p', { class: 'muted', id: 'logs-unavailable' }, t('admin.logs_unavailable'));
    else if (L.data.length === 0) body = h('p', { class: 'muted', id: 'logs-empty' }, t('admin.logs_empty'));
    else {
        body = [h('div', { class: 'table-wrap' }, h('table', { id: 'logs-table' },
            h('thead', {}, h('tr', {},
                h('th', { scope: 'col' }, t('admin.logs_time')), h('th', { scope: 'col' }, t('admin.logs_actor')),
                h('th', { scope: 'col' }, t('admin.logs_action_col')), h('th', { scope: 'col' }, t('admin.logs_target')))),
            h('tbody', {}, L.data.map((x) => h('tr', { 'data-id': x.id, 'data-action': x.action },
                h('td', {}, formatDate(x.occurred_at)),
                h('td', {}, x.actor_email ?? (x.actor_kind === 'system' ? t('admin.logs_system') : x.actor_id ?? x.actor_kind)),
                h('td', {}, h('code', {}, x.action)),
                h('td', {}, x.target_type ? `${x.target_type} ${x.target_id ?? ''}`.trim() : '—')))))),
        L.next_cursor ? h('button', { type: 'button', id: 'logs-more', onclick: guard(moreLogs) }, t('admin.logs_more')) : null];
    }
    return h('section', { class: 'card', id: 'logs', 'aria-labelledby': 'logs-h' },
        h('h2', { id: 'logs-h' }, t('admin.logs')),
        h('form', {
            class: 'inline',
            role: 'search',
            onsubmit: guard(async (e) => {
                e.preventDefault();
                A.logsAction = action.value.trim();
                await loadLogs();
                render();
            }),
        }, field('logs-action', t('admin.logs_action'), action), h('button', { type: 'submit' }, t('admin.logs_filter'))),
        body);
}

/* GET /admin/stats: the figures, subscriptions, revenue and a bar per day of the last 30. */
function statsView(st) {
    const n = (v) => formatNumber(Number(v) || 0);
    const u = st.users ?? {};
    const today = st.usage?.today ?? {};
    const month = st.usage?.last_30_days ?? {};
    const fact = (id, label, value) => [h('dt', {}, label), h('dd', { id: `stats-${id}` }, value)];
    const subs = st.subscriptions ?? [];
    const revenue = st.revenue ?? [];
    const days = st.usage?.by_day ?? [];
    return h('div', { id: 'stats' },
        h('dl', { class: 'facts' },
            fact('users', t('admin.stats_users'), n(u.total)),
            fact('active', t('admin.stats_active'), n(u.active_7d)),
            fact('new', t('admin.stats_new'), n(u.new_7d)),
            fact('requests-today', t('admin.stats_requests_today'), n(today.requests)),
            fact('requests-30d', t('admin.stats_requests_30d'), n(month.requests)),
            fact('tokens-today', t('admin.stats_tokens_today'), n(today.tokens)),
            fact('tokens-30d', t('admin.stats_tokens_30d'), n(month.tokens))),
        days.length ? h('figure', { class: 'usage-days', id: 'stats-by-day' },
            dayBars(days, (d) => t('admin.stats_day', { date: dayDate(d), count: n(d.requests), tokens: n(d.tokens) }), t('admin.stats_by_day')),
            h('figcaption', {}, t('admin.stats_by_day'))) : null,
        h('h3', {}, t('admin.stats_subscriptions')),
        subs.length === 0 ? h('p', { class: 'muted' }, t('admin.stats_no_subscriptions')) : h('div', { class: 'table-wrap' }, h('table', { id: 'stats-subscriptions' },
            h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, t('plans.plan')), h('th', { scope: 'col' }, t('plans.status')), h('th', { scope: 'col' }, t('admin.stats_count')))),
            h('tbody', {}, subs.map((x) => h('tr', { 'data-plan': x.plan, 'data-status': x.status },
                h('th', { scope: 'row' }, planName(x.plan)),
                h('td', {}, has(`plans.status_${x.status}`) ? t(`plans.status_${x.status}`) : x.status),
                h('td', { class: 'num' }, n(x.count))))))),
        h('h3', {}, t('admin.stats_revenue')),
        revenue.length === 0 ? h('p', { class: 'muted' }, t('admin.stats_no_revenue'))
            : h('ul', { id: 'stats-revenue' }, revenue.map((r) => h('li', { 'data-currency': r.currency }, formatMoney(Number(r.amount_minor) || 0, r.currency)))));
}

/* ---- start ---------------------------------------------------------------------------------- */

window.addEventListener('popstate', () => route());
window.addEventListener('offline', () => setBanner('error.offline'));
window.addEventListener('online', () => {
    if (state.banner?.key === 'error.offline') setBanner(null);
});

api.configure({ locale, onSessionExpired: sessionExpired });

async function start() {
    const saved = localStorage.getItem('bg_locale');
    await setLocale(saved || negotiate(navigator.languages));
    // bg_csrf lives as long as the refresh token: without it there is no session to ask about
    if (api.csrfToken()) {
        try {
            await signedIn(await api.get('/auth/profile'));
        } catch {
            state.user = null;
        }
    }
    state.notice = state.notice && state.user ? null : state.notice;
    if (!navigator.onLine) state.banner = { key: 'error.offline' };
    await route();
    document.body.dataset.ready = 'true';
}

start();
