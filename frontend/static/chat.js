// The chat page's code: conversations in localStorage, answers streamed from
// /v1/chat/completions (fetch + ReadableStream, OpenAI's SSE chunks), Stop through an
// AbortController (the server then aborts the request down to the scheduler).
// Plain ES modules, no framework and no build step: see docs/ARCHITECTURE.md, "API".

import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const KEYS = { conversations: "pagoda.conversations", current: "pagoda.current", settings: "pagoda.settings", apiKey: "pagoda.apiKey" };
const DEFAULT_SETTINGS = { system: "", temperature: 0.7, maxTokens: 512 };

function load(key, fallback) {
  try {
    const value = localStorage.getItem(key);
    return value === null ? fallback : JSON.parse(value);
  } catch {
    return fallback;
  }
}

function save(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch (e) {
    console.warn("could not save to localStorage", e);
  }
}

// ---- state ----------------------------------------------------------------------------------

const state = {
  conversations: load(KEYS.conversations, []), // [{id, title, updated, messages: [{role, content, ...}]}]
  currentId: load(KEYS.current, null),
  settings: { ...DEFAULT_SETTINGS, ...load(KEYS.settings, {}) },
  apiKey: load(KEYS.apiKey, ""),
  model: null,
  running: null, // {controller, conversation, answer} while an answer streams
};
const elements = new WeakMap(); // message -> its element, while shown

function current() {
  let conv = state.conversations.find((c) => c.id === state.currentId);
  if (!conv) {
    conv = state.conversations[0] || newConversation();
    state.currentId = conv.id;
  }
  return conv;
}

function newConversation() {
  const conv = { id: crypto.randomUUID ? crypto.randomUUID() : String(Date.now() + Math.random()), title: "", updated: Date.now(), messages: [] };
  state.conversations.unshift(conv);
  return conv;
}

function persist() {
  // Empty conversations are not kept, except the one on screen.
  const kept = state.conversations.filter((c) => c.messages.length || c.id === state.currentId);
  save(KEYS.conversations, kept);
  save(KEYS.current, state.currentId);
}

// ---- rendering ------------------------------------------------------------------------------

function renderList() {
  const list = $("conversation-list");
  list.replaceChildren();
  for (const conv of state.conversations) {
    if (!conv.messages.length && conv.id !== state.currentId) continue;
    const item = document.createElement("li");
    item.classList.toggle("current", conv.id === state.currentId);
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = conv.title || "New chat";
    open.title = open.textContent;
    open.addEventListener("click", () => switchTo(conv.id));
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.textContent = "\u00d7";
    del.setAttribute("aria-label", `Delete "${open.textContent}"`);
    del.addEventListener("click", () => deleteConversation(conv.id));
    item.append(open, del);
    list.append(item);
  }
}

function renderConversation() {
  const box = $("messages");
  box.replaceChildren();
  const conv = current();
  if (!conv.messages.length) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "Ask something to start.";
    box.append(empty);
  }
  for (const message of conv.messages) box.append(messageElement(message));
  updateRegenerate();
  box.scrollTop = box.scrollHeight;
}

function messageElement(message) {
  const el = document.createElement("div");
  el.className = `message ${message.role}`;
  const content = document.createElement("div");
  content.className = "content";
  const stats = document.createElement("div");
  stats.className = "stats";
  el.append(content, stats);
  elements.set(message, el);
  fillMessage(message);
  return el;
}

function fillMessage(message) {
  const el = elements.get(message);
  if (!el) return;
  const content = el.querySelector(".content");
  if (message.role === "assistant") {
    content.innerHTML = renderMarkdown(message.content); // escaped first: see markdown.js
  } else {
    content.textContent = message.content; // the user's text and errors, as plain text
  }
  el.classList.toggle("streaming", state.running?.answer === message);
  const stats = el.querySelector(".stats");
  stats.replaceChildren();
  const parts = [];
  if (message.stopped) parts.push(["stopped", "stopped"]);
  if (message.stats) {
    const { tokens, ttftMs, tokPerS } = message.stats;
    parts.push(["", `${tokens} token${tokens === 1 ? "" : "s"}`]);
    if (tokPerS !== null) parts.push(["", `${tokPerS.toFixed(1)} tok/s`]);
    if (ttftMs !== null) parts.push(["", `TTFT ${Math.round(ttftMs)} ms`]);
  }
  for (const [cls, text] of parts) {
    const span = document.createElement("span");
    if (cls) span.className = cls;
    span.textContent = text;
    stats.append(span);
  }
  if (message.stats) {
    stats.title = "tok/s: tokens after the first over the time after the first; TTFT: sending to the first text";
  }
}

// Regenerate sits under the conversation's last message when it is an answer or an error.
function updateRegenerate() {
  for (const old of document.querySelectorAll(".regenerate")) old.remove();
  const conv = current();
  const last = conv.messages[conv.messages.length - 1];
  if (state.running || !last || last.role === "user") return;
  const el = elements.get(last);
  if (!el) return;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "regenerate";
  button.textContent = "Regenerate";
  button.addEventListener("click", regenerate);
  el.querySelector(".stats").append(button);
}

function setRunning(running) {
  state.running = running;
  document.body.dataset.state = running ? "streaming" : "idle";
  $("send").hidden = Boolean(running);
  $("stop").hidden = !running;
}

function scrollToEnd(force) {
  const box = $("messages");
  if (force || box.scrollHeight - box.scrollTop - box.clientHeight < 80) box.scrollTop = box.scrollHeight;
}

// ---- the API ------------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.apiKey) h.Authorization = `Bearer ${state.apiKey}`;
  return h;
}

class ApiError extends Error {}

// An error answer as one line: OpenAI's error.message, and when to retry for a 503.
async function describeError(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body?.error?.message) message = body.error.message;
  } catch {
    // not JSON: the status says it
  }
  if (response.status === 401) showKeyBox(message);
  let text = `Error ${response.status}: ${message}`;
  const retry = response.headers.get("Retry-After");
  if (response.status === 503 && retry) {
    text += /^\d+$/.test(retry) ? ` Retry in ${retry} s.` : ` Retry after ${retry}.`;
  }
  return new ApiError(text);
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) {
      const error = await describeError(response);
      $("model-name").textContent = response.status === 401 ? "needs an API key" : error.message;
      return;
    }
    const body = await response.json();
    state.model = body.data?.[0]?.id ?? null;
    $("model-name").textContent = state.model ?? "no model";
    hideKeyBox();
  } catch (e) {
    $("model-name").textContent = `cannot reach the server (${e.message})`;
  }
}

// Reads OpenAI's SSE: `data: {chunk}` events, `data: [DONE]` last (yielded as DONE); an error
// after the stream began comes as one `data: {"error": ...}` event.
const DONE = Symbol("[DONE]");
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    const events = buffer.split("\n\n");
    buffer = events.pop();
    const batch = [];
    for (const event of events) {
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data) batch.push(data === "[DONE]" ? DONE : JSON.parse(data));
    }
    yield batch; // all the events of one read, so the page renders once per read
  }
}

async function generate(conv) {
  const settings = state.settings;
  const messages = [];
  if (settings.system.trim()) messages.push({ role: "system", content: settings.system });
  for (const m of conv.messages) {
    if (m.role === "user" || (m.role === "assistant" && m.content)) messages.push({ role: m.role, content: m.content });
  }
  const request = { messages, stream: true, stream_options: { include_usage: true } };
  if (state.model) request.model = state.model;
  if (settings.temperature !== null && settings.temperature !== "") request.temperature = Number(settings.temperature);
  if (settings.maxTokens) request.max_tokens = Number(settings.maxTokens);

  const answer = { role: "assistant", content: "" };
  conv.messages.push(answer);
  conv.updated = Date.now();
  const controller = new AbortController();
  setRunning({ controller, conversation: conv, answer });
  if (conv.id === state.currentId) {
    renderConversation();
    scrollToEnd(true);
  }

  const sent = performance.now();
  let first = null;
  let deltas = 0;
  let usage = null;
  let failure = null;
  let finished = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: controller.signal,
    });
    if (!response.ok) throw await describeError(response);
    for await (const batch of sseEvents(response.body)) {
      for (const chunk of batch) {
        if (chunk === DONE) {
          finished = true;
          continue;
        }
        if (chunk.error) throw new ApiError(`Error: ${chunk.error.message}`);
        if (chunk.usage) usage = chunk.usage;
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) {
          first ??= performance.now();
          deltas += 1;
          answer.content += delta;
        }
      }
      fillMessage(answer);
      scrollToEnd(false);
    }
    if (!finished) throw new ApiError("Error: the stream ended before its end ([DONE]): the server may have stopped.");
  } catch (e) {
    if (e.name === "AbortError") answer.stopped = true;
    else failure = e instanceof ApiError ? e.message : `Error: could not reach the server (${e.message}).`;
  }
  const end = performance.now();
  if (first !== null) {
    const tokens = usage?.completion_tokens ?? deltas;
    const seconds = (end - first) / 1000;
    answer.stats = { tokens, ttftMs: first - sent, tokPerS: tokens > 1 && seconds > 0 ? (tokens - 1) / seconds : null };
  }
  setRunning(null);
  if (!answer.content && !answer.stopped) conv.messages.pop();
  if (failure) conv.messages.push({ role: "error", content: failure });
  persist();
  if (conv.id === state.currentId) {
    renderConversation();
    scrollToEnd(true);
  }
}

// ---- actions ----------------------------------------------------------------------------------

function send(text) {
  const conv = current();
  if (!conv.title) {
    conv.title = text.replace(/\s+/g, " ").trim().slice(0, 60);
  }
  conv.messages.push({ role: "user", content: text });
  // The newest conversation first in the list.
  state.conversations = [conv, ...state.conversations.filter((c) => c !== conv)];
  persist();
  renderList();
  return generate(conv);
}

function regenerate() {
  if (state.running) return;
  const conv = current();
  while (conv.messages.length && conv.messages[conv.messages.length - 1].role !== "user") conv.messages.pop();
  if (!conv.messages.length) return;
  generate(conv);
}

function switchTo(id) {
  state.currentId = id;
  persist();
  renderList();
  renderConversation();
  document.body.classList.remove("sidebar-open");
  $("scrim").hidden = true;
}

function deleteConversation(id) {
  if (state.running?.conversation.id === id) state.running.controller.abort();
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (state.currentId === id) state.currentId = state.conversations[0]?.id ?? null;
  current();
  persist();
  renderList();
  renderConversation();
}

function showKeyBox(message) {
  $("key-message").textContent = message || "This server needs an API key.";
  $("key-box").hidden = false;
  $("api-key").value = state.apiKey;
}

function hideKeyBox() {
  $("key-box").hidden = true;
}

function setSidebar(open) {
  document.body.classList.toggle("sidebar-open", open);
  $("scrim").hidden = !open;
}

// ---- wiring ---------------------------------------------------------------------------------

function bindSettings() {
  const fields = [["system-prompt", "system"], ["temperature", "temperature"], ["max-tokens", "maxTokens"]];
  for (const [id, key] of fields) {
    const input = $(id);
    input.value = state.settings[key] ?? "";
    input.addEventListener("input", () => {
      state.settings[key] = input.type === "number" ? (input.value === "" ? "" : Number(input.value)) : input.value;
      save(KEYS.settings, state.settings);
    });
  }
}

function start() {
  bindSettings();
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value;
    if (!text.trim() || state.running) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.running?.controller.abort());
  $("new-chat").addEventListener("click", () => {
    const conv = current().messages.length ? newConversation() : current(); // one empty chat at most
    switchTo(conv.id);
    $("prompt").focus();
  });
  $("settings-toggle").addEventListener("click", () => {
    const open = $("settings").hidden;
    $("settings").hidden = !open;
    $("settings-toggle").setAttribute("aria-expanded", String(open));
  });
  $("show-key").addEventListener("click", () => showKeyBox("The API key, when the server was started with --api-key."));
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.apiKey = $("api-key").value.trim();
    save(KEYS.apiKey, state.apiKey);
    loadModel();
  });
  $("open-sidebar").addEventListener("click", () => setSidebar(true));
  $("close-sidebar").addEventListener("click", () => setSidebar(false));
  $("scrim").addEventListener("click", () => setSidebar(false));

  current();
  renderList();
  renderConversation();
  loadModel();
}

start();
