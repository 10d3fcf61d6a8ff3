// A small Markdown renderer for model text, safe by construction: the whole text is
// HTML-escaped first (& < > " '), and only then are the few tags below put in, around text
// that is already escaped. Link targets must start with http:// or https://, and since quotes
// are escaped they cannot leave the href attribute. Model text never reaches the page as HTML.
//
// Covers what chat models write: ``` fenced code (an unclosed fence, mid-stream, runs to the
// end), `inline code`, **bold**, *italic*, # headings, - and 1. lists, [links](https://...),
// --- rules and paragraphs. Anything else stays text.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

// Code spans and links are set aside as \u0000N\u0000 while emphasis is applied, so that
// neither their text nor a URL is touched by it (the input's own \u0000s are dropped first).
function inline(text) {
  const held = [];
  const hold = (html) => `\u0000${held.push(html) - 1}\u0000`;
  text = text.replace(/`([^`]+)`/g, (_, code) => hold(`<code>${code}</code>`));
  text = text.replace(/\[([^\]]+)\]\((https?:\/\/[^\s()\u0000]+)\)/g, (_, label, url) =>
    hold(`<a href="${url}" target="_blank" rel="noopener noreferrer">${emphasis(label)}</a>`));
  text = emphasis(text);
  for (let i = 0; i < 2 && text.includes("\u0000"); i++) {  // a link's label may hold code
    text = text.replace(/\u0000(\d+)\u0000/g, (_, n) => held[Number(n)]);
  }
  return text;
}

function emphasis(text) {
  return text
    .replace(/\*\*(?=\S)(.*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^\w])__(?=\S)(.*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
    .replace(/(^|[^*\w])\*(?=[^\s*])(.*?[^\s*])\*(?![*\w])/g, "$1<em>$2</em>")
    .replace(/(^|[^\w])_(?=[^\s_])(.*?[^\s_])_(?!\w)/g, "$1<em>$2</em>");
}

const FENCE = /^\s*(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*(\d{1,9})[.)]\s+(.*)$/;
const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;

/** The HTML for `source` (Markdown): safe to assign to innerHTML. */
export function renderMarkdown(source) {
  const lines = escapeHtml(source.replace(/\u0000/g, "").replace(/\r\n?/g, "\n")).split("\n");
  const out = [];
  let paragraph = [];
  let list = null; // {tag: "ul" | "ol", start, items: [text]}

  const endParagraph = () => {
    if (paragraph.length) out.push(`<p>${paragraph.map(inline).join("<br>")}</p>`);
    paragraph = [];
  };
  const endList = () => {
    if (!list) return;
    const start = list.tag === "ol" && list.start !== 1 ? ` start="${list.start}"` : "";
    const items = list.items.map((item) => `<li>${item.map(inline).join("<br>")}</li>`).join("");
    out.push(`<${list.tag}${start}>${items}</${list.tag}>`);
    list = null;
  };
  const addItem = (tag, text, start) => {
    endParagraph();
    if (list && list.tag !== tag) endList();
    if (!list) list = { tag, start, items: [] };
    list.items.push([text]);
  };

  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    let m;
    if ((m = line.match(FENCE))) {
      endParagraph();
      endList();
      const body = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(m[1]); i++) body.push(lines[i]);
      const lang = m[2] ? ` class="language-${m[2]}"` : "";
      out.push(`<pre><code${lang}>${body.join("\n")}</code></pre>`);
    } else if ((m = line.match(HEADING))) {
      endParagraph();
      endList();
      out.push(`<h${m[1].length}>${inline(m[2])}</h${m[1].length}>`);
    } else if (RULE.test(line)) {
      endParagraph();
      endList();
      out.push("<hr>");
    } else if ((m = line.match(BULLET))) {
      addItem("ul", m[1]);
    } else if ((m = line.match(NUMBERED))) {
      addItem("ol", m[2], Number(m[1]));
    } else if (!line.trim()) {
      endParagraph();
      // A blank line ends a list unless the list goes on after it.
      const next = lines.slice(i + 1).find((l) => l.trim());
      if (list && !(next && (BULLET.test(next) || NUMBERED.test(next)))) endList();
    } else if (list && /^\s/.test(line)) {
      list.items[list.items.length - 1].push(line.trim()); // a continued item
    } else {
      endList();
      paragraph.push(line);
    }
  }
  endParagraph();
  endList();
  return out.join("");
}
