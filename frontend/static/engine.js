// The engine view's code: reads /engine/stream (server-sent events of JSON, four a second)
// with fetch, so the API key the chat page saved goes along as Authorization: Bearer, and
// draws every event by hand on canvases. No framework, no build step: docs/ARCHITECTURE.md,
// "Engine view". Numbers the browser tests read are also data-* attributes.

const $ = (id) => document.getElementById(id);
const KEY = "pagoda.apiKey"; // the chat page's entry: one key for both pages
const HISTORY = 240; // points of the time charts: a minute at four events a second
const MAX_BARS = 180; // steps in the tokens-per-step chart

const css = getComputedStyle(document.documentElement);
const color = (name) => css.getPropertyValue(`--${name}`).trim();

const history = { ttft50: [], ttft90: [], itl50: [], itl90: [], tok: [] };
let steps = [];

function apiKey() {
  try {
    return JSON.parse(localStorage.getItem(KEY) || '""');
  } catch {
    return "";
  }
}

function setStatus(text, status) {
  const el = $("status");
  el.textContent = text;
  el.dataset.status = status;
}

// ---- the stream ------------------------------------------------------------------------------

async function connect() {
  const headers = {};
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch("/engine/stream", { headers });
  if (response.status === 401) {
    $("key-box").hidden = false;
    setStatus("needs an API key", "error");
    return false;
  }
  if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
  setStatus("live", "live");
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data) render(JSON.parse(data));
    }
  }
  return true;
}

async function run() {
  for (let wait = 500; ; wait = Math.min(wait * 2, 5000)) {
    try {
      if (!(await connect())) return; // no key yet: the form starts it again
      wait = 250; // a stream that ended (the server restarted): come back at once
    } catch (e) {
      setStatus(`disconnected (${e.message}); retrying`, "error");
    }
    await new Promise((r) => setTimeout(r, wait));
  }
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  localStorage.setItem(KEY, JSON.stringify($("api-key").value.trim()));
  $("key-box").hidden = true;
  run();
});

// ---- one event -------------------------------------------------------------------------------

const fmt = (x, digits = 0) => (x === null || x === undefined ? "–" : x.toFixed(digits));
const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`);
const ms = (x) => (x === null || x === undefined ? "–" : x < 1 ? `${(1000 * x).toFixed(0)} ms` : `${x.toFixed(2)} s`);

function push(list, value) {
  list.push(value);
  if (list.length > HISTORY) list.shift();
}

function render(ev) {
  $("running").textContent = ev.running;
  $("running").dataset.running = ev.running;
  $("waiting").textContent = ev.waiting;
  $("waiting").dataset.waiting = ev.waiting;
  $("tok-s").textContent = fmt(ev.output_tokens_per_s, ev.output_tokens_per_s < 10 ? 1 : 0);
  $("hit-rate").textContent = pct(ev.prefix_cache.hit_rate);
  $("hit-rate-recent").textContent = `last 5 s: ${pct(ev.prefix_cache.recent_hit_rate)}`;
  $("kv-usage").textContent = pct(ev.kv_usage);
  $("preemptions").textContent = ev.preemptions;

  steps = steps.concat(ev.steps).slice(-MAX_BARS);
  const chart = $("steps-chart");
  chart.dataset.steps = Number(chart.dataset.steps) + ev.steps.length;
  drawSteps(chart, steps);

  drawKV(ev.kv);

  push(history.ttft50, ev.ttft_s.p50);
  push(history.ttft90, ev.ttft_s.p90);
  push(history.itl50, ev.itl_s.p50);
  push(history.itl90, ev.itl_s.p90);
  push(history.tok, ev.output_tokens_per_s);
  $("ttft-now").textContent = `last 5 s: p50 ${ms(ev.ttft_s.p50)}, p90 ${ms(ev.ttft_s.p90)}`;
  $("itl-now").textContent = `last 5 s: p50 ${ms(ev.itl_s.p50)}, p90 ${ms(ev.itl_s.p90)}`;
  drawLines($("ttft-chart"), [[history.ttft50, color("p50")], [history.ttft90, color("p90")]], ms);
  drawLines($("itl-chart"), [[history.itl50, color("p50")], [history.itl90, color("p90")]], ms);
  drawLines($("tok-chart"), [[history.tok, color("decode")]], (x) => fmt(x));

  renderMembers(ev.members);
}

// ---- drawing ---------------------------------------------------------------------------------

function context(canvas) {
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.font = "11px system-ui, sans-serif";
  return ctx;
}

function drawSteps(canvas, bars) {
  const ctx = context(canvas);
  const top = Math.max(1, ...bars.map(([p, d]) => p + d));
  const w = canvas.width / MAX_BARS;
  const h = canvas.height - 14;
  bars.forEach(([prefill, decode], i) => {
    const x = canvas.width - (bars.length - i) * w;
    const hd = (decode / top) * h;
    const hp = (prefill / top) * h;
    ctx.fillStyle = color("decode");
    ctx.fillRect(x, canvas.height - hd, Math.max(1, w - 1), hd);
    ctx.fillStyle = color("prefill");
    ctx.fillRect(x, canvas.height - hd - hp, Math.max(1, w - 1), hp);
  });
  ctx.fillStyle = color("muted");
  ctx.fillText(`${top} tokens`, 2, 10);
}

// Each cell stands for `blocks_per_cell` consecutive blocks; it is filled from the bottom in
// proportion to its blocks in use, then its cached ones, the rest free.
function drawKV(kv) {
  const box = $("kv");
  box.dataset.kvUsed = kv.used_blocks;
  box.dataset.kvCached = kv.cached_blocks;
  box.dataset.kvFree = kv.free_blocks;
  box.dataset.kvBlocks = kv.num_blocks;
  if (!kv.groups.length) {
    $("kv-note").textContent = "waiting for the scheduler's first view";
    return;
  }
  const per = kv.groups[0].blocks_per_cell;
  $("kv-note").textContent = `${kv.num_blocks} blocks: ${kv.used_blocks} in use, ${kv.cached_blocks} cached, ` +
    `${kv.free_blocks} free` + (per > 1 ? `; a cell is ${per} blocks, filled by their share of each state` : "");
  while (box.children.length > 2 * kv.groups.length) box.lastChild.remove();
  kv.groups.forEach((g, k) => {
    if (box.children.length <= 2 * k) {
      const label = document.createElement("div");
      label.className = "group-label";
      const canvas = document.createElement("canvas");
      canvas.width = 720;
      box.append(label, canvas);
    }
    const label = box.children[2 * k];
    const canvas = box.children[2 * k + 1];
    label.textContent = kv.groups.length > 1 ? `group ${g.group}` : "";
    label.hidden = kv.groups.length === 1;
    canvas.dataset.group = g.group;
    canvas.dataset.kvUsed = g.used_blocks;
    canvas.dataset.kvCached = g.cached_blocks;
    drawGrid(canvas, g);
  });
}

function drawGrid(canvas, g) {
  const cells = g.used.length;
  const cols = Math.min(64, cells);
  const size = canvas.width / cols;
  const rows = Math.ceil(cells / cols);
  const height = Math.ceil(rows * size);
  if (canvas.height !== height) canvas.height = height;
  const ctx = context(canvas);
  for (let i = 0; i < cells; i++) {
    const x = (i % cols) * size;
    const y = Math.floor(i / cols) * size;
    const n = Math.min(g.blocks_per_cell, g.num_blocks - i * g.blocks_per_cell);
    const s = size - 1;
    const hu = (g.used[i] / n) * s;
    const hc = (g.cached[i] / n) * s;
    ctx.fillStyle = color("free");
    ctx.fillRect(x, y, s, s);
    ctx.fillStyle = color("cached");
    ctx.fillRect(x, y + s - hu - hc, s, hc);
    ctx.fillStyle = color("used");
    ctx.fillRect(x, y + s - hu, s, hu);
  }
}

function drawLines(canvas, series, label) {
  const ctx = context(canvas);
  const values = series.flatMap(([v]) => v).filter((x) => x !== null && x !== undefined);
  const top = Math.max(1e-9, ...values) * 1.1;
  const h = canvas.height - 2;
  for (const [points, stroke] of series) {
    ctx.strokeStyle = stroke;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let pen = false;
    points.forEach((v, i) => {
      if (v === null || v === undefined) {
        pen = false;
        return;
      }
      const x = canvas.width - (points.length - i) * (canvas.width / HISTORY);
      const y = canvas.height - 1 - (v / top) * h;
      if (pen) ctx.lineTo(x, y);
      else ctx.moveTo(x, y);
      pen = true;
    });
    ctx.stroke();
  }
  ctx.fillStyle = color("muted");
  ctx.fillText(values.length ? label(top / 1.1) : "no data", 2, 10);
}

// ---- members ---------------------------------------------------------------------------------

function fillTable(id, rows) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren(
    ...rows.map(({ key, state, cells }) => {
      const tr = document.createElement("tr");
      tr.dataset.member = key;
      tr.dataset.state = state;
      for (const [text, cls, attr] of cells) {
        const td = document.createElement("td");
        td.textContent = text;
        if (cls) td.className = cls;
        if (attr) tr.dataset[attr] = text;
        tr.append(td);
      }
      return tr;
    }),
  );
}

function renderMembers(members) {
  fillTable("tokenizers", members.tokenizers.map((t) => ({
    key: t.id,
    state: t.state,
    cells: [[t.id], [t.state, "state"], [t.pid || "–"], [t.load, null, "load"], [t.restarts, null, "restarts"]],
  })));
  fillTable("groups", members.worker_groups.map((g) => ({
    key: `group-${g.group}`,
    state: g.state,
    cells: [
      [g.group], [g.state, "state"],
      [`${g.ranks.length}/${g.size}` + (g.ranks.length ? ` (${g.ranks.map((r) => `${r.id} pid ${r.pid}`).join(", ")})` : "")],
      [g.running], [g.waiting], [pct(g.kv_usage)], [g.restarts, null, "restarts"],
    ],
  })));
  $("drafts-box").hidden = !members.drafts.length;
  fillTable("drafts", members.drafts.map((d) => ({
    key: d.id, state: d.state, cells: [[d.id], [d.state, "state"], [d.load], [d.restarts]],
  })));
}

run();
