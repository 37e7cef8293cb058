// The client's strings come from the server's message catalogues (locales/<locale>.json, served as
// /assets/<build>/i18n.<locale>.json): the client's own keys start with "web.", and the error
// messages it shows for states the server never reports (offline, …) live there too. Keeping one
// set of catalogues means the check that every catalogue has the same keys and placeholders
// covers the web client as well.
//
// Switching the language loads the other catalogue and re-renders the whole page from state, so
// every string changes at once; nothing is translated in place.

export const LOCALES = [
    { id: 'en', name: 'English' },
    { id: 'ru', name: 'Русский' },
    { id: 'es', name: 'Español' },
];

const assets = document.getElementById('main')?.dataset.assets ?? '';
const cache = new Map();
let current = 'en';
let strings = {};
let fallback = {};

async function load(locale) {
    if (!cache.has(locale)) {
        cache.set(
            locale,
            fetch(`${assets}/i18n.${locale}.json`).then((r) => {
                if (!r.ok) throw new Error(`catalogue ${locale}: ${r.status}`);
                return r.json();
            }),
        );
    }
    try {
        return await cache.get(locale);
    } catch (err) {
        cache.delete(locale);
        throw err;
    }
}

/** The supported locale closest to a language tag (or list of them), else English. */
export function negotiate(tags) {
    for (const tag of [].concat(tags ?? [])) {
        const base = String(tag).toLowerCase().split(/[-_]/)[0];
        if (LOCALES.some((l) => l.id === base)) return base;
    }
    return 'en';
}

/** Makes locale the current one (loading its catalogue). */
export async function setLocale(locale) {
    const id = negotiate(locale);
    const [s, f] = await Promise.all([load(id), load('en')]);
    strings = s;
    fallback = f;
    current = id;
    document.documentElement.lang = id;
    return id;
}

export function locale() {
    return current;
}

/** The string web.<key> with {name} placeholders filled from params. */
export function t(key, params = {}) {
    const full = `web.${key}`;
    const s = strings[full] ?? fallback[full] ?? full;
    return s.replace(/\{(\w+)\}/g, (m, name) => (params[name] !== undefined ? String(params[name]) : m));
}

/** True when the catalogue has the key. */
export function has(key) {
    const full = `web.${key}`;
    return full in strings || full in fallback;
}

export function formatDate(iso, withTime = true) {
    if (!iso) return '';
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    const opts = withTime ? { dateStyle: 'medium', timeStyle: 'short' } : { dateStyle: 'medium' };
    return new Intl.DateTimeFormat(current, opts).format(d);
}

export function formatNumber(n) {
    return new Intl.NumberFormat(current).format(n);
}

export function formatMoney(minor, currency) {
    try {
        return new Intl.NumberFormat(current, { style: 'currency', currency: currency || 'USD' }).format(minor / 100);
    } catch {
        return `${(minor / 100).toFixed(2)} ${currency}`;
    }
}
