// A small Markdown renderer for replies: paragraphs, headings, lists, block quotes, fenced and
// inline code, emphasis and links. It is safe by construction: the text is HTML-escaped first and
// only this file's own tags are added afterwards, so a reply can never inject markup or script
// (the page's Content Security Policy forbids inline script anyway). Links keep only http(s) and
// mailto targets and open in a new tab without an opener.
//
// Rendering runs again on every delta of a streaming reply, so an unfinished code fence is shown
// as a code block that is still growing rather than as raw backticks.

export function escapeHtml(s) {
    return String(s)
        .replace(/&/g, '&amp;')
        .replace(/</g, '&lt;')
        .replace(/>/g, '&gt;')
        .replace(/"/g, '&quot;')
        .replace(/'/g, '&#39;');
}

function inline(text) {
    // code spans first: their contents are not formatted further
    const parts = text.split(/(`[^`\n]+`)/);
    return parts
        .map((part, i) => {
            if (i % 2 === 1) return `<code>${escapeHtml(part.slice(1, -1))}</code>`;
            let s = escapeHtml(part);
            s = s.replace(/\[([^\]\n]+)\]\(((?:https?:\/\/|mailto:)[^\s)]+)\)/g,
                (_, label, href) => `<a href="${href}" target="_blank" rel="noopener noreferrer">${label}</a>`);
            s = s.replace(/\*\*([^*\n]+)\*\*/g, '<strong>$1</strong>');
            s = s.replace(/__([^_\n]+)__/g, '<strong>$1</strong>');
            s = s.replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, '$1<em>$2</em>');
            s = s.replace(/(^|[^_\w])_([^_\n]+)_(?!\w)/g, '$1<em>$2</em>');
            s = s.replace(/~~([^~\n]+)~~/g, '<del>$1</del>');
            return s;
        })
        .join('');
}

/** Renders Markdown text into an HTML string (every piece of the input escaped). */
export function renderMarkdown(src) {
    const lines = String(src).replace(/\r\n?/g, '\n').split('\n');
    const out = [];
    let para = [];
    let list = null; // { type: 'ul'|'ol', items: [] }
    let quote = [];

    const flushPara = () => {
        if (para.length) out.push(`<p>${para.map(inline).join('<br>')}</p>`);
        para = [];
    };
    const flushList = () => {
        if (list) out.push(`<${list.type}>${list.items.map((i) => `<li>${inline(i)}</li>`).join('')}</${list.type}>`);
        list = null;
    };
    const flushQuote = () => {
        if (quote.length) out.push(`<blockquote>${renderMarkdown(quote.join('\n'))}</blockquote>`);
        quote = [];
    };
    const flushAll = () => {
        flushPara();
        flushList();
        flushQuote();
    };

    for (let i = 0; i < lines.length; i++) {
        const line = lines[i];
        const fence = /^\s*(```|~~~)\s*([\w+#.-]*)\s*$/.exec(line);
        if (fence) {
            flushAll();
            const code = [];
            i++;
            while (i < lines.length && !new RegExp(`^\\s*${fence[1]}\\s*$`).test(lines[i])) {
                code.push(lines[i]);
                i++;
            }
            const lang = fence[2] ? ` class="language-${escapeHtml(fence[2])}" data-lang="${escapeHtml(fence[2])}"` : '';
            out.push(`<pre><code${lang}>${escapeHtml(code.join('\n'))}</code></pre>`);
            continue;
        }
        const heading = /^(#{1,6})\s+(.*)$/.exec(line);
        if (heading) {
            flushAll();
            const level = Math.min(heading[1].length + 2, 6); // the page owns h1 and h2
            out.push(`<h${level}>${inline(heading[2])}</h${level}>`);
            continue;
        }
        const q = /^>\s?(.*)$/.exec(line);
        if (q) {
            flushPara();
            flushList();
            quote.push(q[1]);
            continue;
        }
        flushQuote();
        const ul = /^\s*[-*+]\s+(.*)$/.exec(line);
        const ol = /^\s*\d+[.)]\s+(.*)$/.exec(line);
        if (ul || ol) {
            flushPara();
            const type = ul ? 'ul' : 'ol';
            if (list && list.type !== type) flushList();
            if (!list) list = { type, items: [] };
            list.items.push((ul || ol)[1]);
            continue;
        }
        if (/^\s*$/.test(line)) {
            flushAll();
            continue;
        }
        if (/^\s*([-*_])\s*\1\s*\1[\s\-*_]*$/.test(line)) {
            flushAll();
            out.push('<hr>');
            continue;
        }
        flushList();
        para.push(line);
    }
    flushAll();
    return out.join('');
}
