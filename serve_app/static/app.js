// ChatStream web page. Talks only to its own origin through relative URLs (docs/http-api.md);
// the HttpOnly session cookie, sent with every request, keeps the conversation on the server.
"use strict";

const MAX_BUSY_RETRIES = 10; // automatic retries after 429 before giving up

const el = (id) => document.getElementById(id);
const ui = {
  main: document.querySelector("main"),
  messages: el("messages"),
  empty: el("empty"),
  form: el("chat-form"),
  input: el("input"),
  send: el("send"),
  stop: el("stop"),
  regenerate: el("regenerate"),
  clear: el("clear"),
  status: el("status"),
  settingsForm: el("settings-form"),
  settingsStatus: el("settings-status"),
};
const PARAMS = ["temperature", "top_k", "top_p", "max_new_tokens"];
const API_KEY_STORAGE = "chatstream_api_key"; // localStorage entry of the user's API key

let inFlight = null; // AbortController of the running /chat_stream request, if any

// ---- HTTP helpers ---------------------------------------------------------------------------

// The API key saved under Settings ("" if none, or if the browser keeps no storage).
function apiKey() {
  try {
    return localStorage.getItem(API_KEY_STORAGE) || "";
  } catch {
    return "";
  }
}

function request(path, method = "GET", body = undefined, signal = undefined) {
  const options = { method, credentials: "same-origin", signal, headers: {} };
  const key = apiKey();
  if (key) options.headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  return fetch(path, options);
}

// The server's explanation of a 4xx/5xx answer: {"error": code, "message": text}.
async function errorText(resp) {
  try {
    const data = await resp.json();
    return data.message || data.error || `HTTP ${resp.status}`;
  } catch {
    return `HTTP ${resp.status} ${resp.statusText}`.trim();
  }
}

function retryAfterSeconds(resp) {
  const header = resp.headers.get("Retry-After") || "";
  let seconds = Number.parseInt(header, 10);
  if (Number.isNaN(seconds)) {
    const date = Date.parse(header);
    seconds = Number.isNaN(date) ? 1 : Math.ceil((date - Date.now()) / 1000);
  }
  return Math.min(Math.max(seconds, 1), 60);
}

// ---- rendering ------------------------------------------------------------------------------

function showStatus(text, kind = "info") {
  ui.status.textContent = text;
  ui.status.dataset.kind = kind; // the region stays in the page so screen readers hear changes
}

function nearBottom() {
  return ui.main.scrollHeight - ui.main.scrollTop - ui.main.clientHeight < 80;
}

function scrollToEnd(force = false) {
  if (force || nearBottom()) ui.main.scrollTop = ui.main.scrollHeight;
}

function addMessage(role, content, messageId = "", state = "done") {
  const item = document.createElement("li");
  item.className = `msg ${role}`;
  item.dataset.role = role;
  item.dataset.state = state;
  if (messageId) item.dataset.messageId = messageId;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const text = document.createElement("div");
  text.className = "content";
  text.textContent = content;
  item.append(who, text);
  ui.messages.append(item);
  refreshControls();
  scrollToEnd(true);
  return item;
}

function contentOf(item) {
  return item.querySelector(".content");
}

function lastMessage() {
  return ui.messages.lastElementChild;
}

function refreshControls() {
  const busy = inFlight !== null;
  const last = lastMessage();
  ui.empty.hidden = ui.messages.childElementCount > 0;
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
  ui.clear.disabled = busy;
  ui.regenerate.disabled = busy || !last || last.dataset.role !== "assistant";
  ui.messages.setAttribute("aria-busy", String(busy));
}

async function loadHistory() {
  const resp = await request("history");
  if (!resp.ok) {
    showStatus(`Could not load the conversation: ${await errorText(resp)}`, "error");
    return;
  }
  const data = await resp.json();
  ui.messages.replaceChildren();
  for (const m of data.messages) addMessage(m.role, m.content, m.message_id || "");
  refreshControls();
}

// ---- streaming ------------------------------------------------------------------------------

// Waits `seconds`, counting down in the status line; rejects at once if `signal` aborts.
function busyCountdown(seconds, signal) {
  return new Promise((resolve, reject) => {
    let left = seconds;
    const tick = () => {
      if (left <= 0) return finish(resolve);
      showStatus(`Service busy, retrying in ${left} s… (Stop cancels)`, "busy");
      left -= 1;
    };
    const onAbort = () => finish(() => reject(new DOMException("Aborted", "AbortError")));
    const timer = setInterval(tick, 1000);
    function finish(done) {
      clearInterval(timer);
      signal.removeEventListener("abort", onAbort);
      done();
    }
    signal.addEventListener("abort", onAbort, { once: true });
    tick();
  });
}

async function readStream(resp, item) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  const text = contentOf(item);
  item.dataset.state = "streaming";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    const chunk = decoder.decode(value, { stream: true });
    if (chunk) {
      text.append(chunk);
      scrollToEnd();
    }
  }
  text.append(decoder.decode());
  text.normalize();
}

// POSTs /chat_stream and streams the answer into `item`. Retries after 429.
// Returns "done", "stopped" (Stop pressed), "rejected" (4xx/5xx answer) or "cut" (stream broke).
async function streamAnswer(body, item) {
  const controller = new AbortController();
  inFlight = controller;
  item.dataset.state = "waiting";
  refreshControls();
  try {
    for (let attempt = 0; ; attempt += 1) {
      const resp = await request("chat_stream", "POST", body, controller.signal);
      if (resp.status === 429 && attempt < MAX_BUSY_RETRIES) {
        await busyCountdown(retryAfterSeconds(resp), controller.signal);
        continue;
      }
      if (resp.status === 401) {
        showStatus("This server needs an API key: enter yours under Settings.", "error");
        el("settings").open = true;
        return "rejected";
      }
      if (!resp.ok) {
        const reason = resp.status === 429 ? "Service busy; try again later." : "";
        showStatus(reason || (await errorText(resp)), "error");
        return "rejected";
      }
      showStatus("");
      item.dataset.messageId = resp.headers.get("X-ChatStream-Last-Generated-Message-Id") || "";
      await readStream(resp, item);
      item.dataset.state = "done";
      return "done";
    }
  } catch (err) {
    if (controller.signal.aborted) {
      item.dataset.state = "stopped";
      showStatus("Stopped.", "info");
      return "stopped";
    }
    // A stream cut by the server loses the chunks the page had not read yet (Streams spec).
    const what = item.dataset.state === "streaming" ? "The answer was cut off" : "The request failed";
    item.dataset.state = "error";
    showStatus(`${what} (${err.message}). Please try again.`, "error");
    return "cut";
  } finally {
    inFlight = null;
    refreshControls();
    if (document.activeElement === document.body || document.activeElement === ui.stop) {
      ui.input.focus();
    }
  }
}

async function sendMessage() {
  const text = ui.input.value;
  if (inFlight || !text.trim()) return;
  ui.input.value = "";
  const question = addMessage("user", text);
  const answer = addMessage("assistant", "", "", "waiting");
  const outcome = await streamAnswer({ user_input: text }, answer);
  if (outcome === "rejected") {
    // Nothing was admitted: take the turn back out of the view and give the text back.
    question.remove();
    answer.remove();
    if (!ui.input.value) ui.input.value = text;
    refreshControls();
  } else if (outcome === "cut" || (outcome === "stopped" && !contentOf(answer).textContent)) {
    // The server keeps a turn only once chunks reached us: show what it kept and, if it
    // dropped this turn, give the text back.
    await loadHistory();
    const kept = [...ui.messages.querySelectorAll("li.user")].pop();
    if (!ui.input.value && (!kept || contentOf(kept).textContent !== text)) ui.input.value = text;
  }
}

async function regenerate() {
  const last = lastMessage();
  if (inFlight || !last || last.dataset.role !== "assistant") return;
  const before = { text: contentOf(last).textContent, id: last.dataset.messageId || "" };
  contentOf(last).textContent = "";
  const outcome = await streamAnswer({ regenerate: true }, last);
  if (outcome === "rejected") {
    contentOf(last).textContent = before.text;
    last.dataset.messageId = before.id;
    last.dataset.state = "done";
  } else if (outcome === "cut" || (outcome === "stopped" && !contentOf(last).textContent)) {
    await loadHistory(); // the server still has the previous answer
  }
}

async function clearConversation() {
  if (inFlight) return;
  const resp = await request("clear_context", "POST");
  if (!resp.ok) {
    showStatus(`Could not clear: ${await errorText(resp)}`, "error");
    return;
  }
  ui.messages.replaceChildren();
  showStatus("");
  refreshControls();
  ui.input.focus();
}

// ---- settings -------------------------------------------------------------------------------

function fillSettings(params) {
  for (const name of PARAMS) {
    if (params[name] !== undefined) ui.settingsForm.elements[name].value = params[name];
  }
}

async function loadSettings() {
  const resp = await request("generation_params");
  if (resp.ok) {
    fillSettings(await resp.json());
  } else {
    ui.settingsStatus.dataset.kind = "error";
    ui.settingsStatus.textContent = `Could not load: ${await errorText(resp)}`;
  }
}

async function saveSettings() {
  const update = {};
  for (const name of PARAMS) {
    const raw = ui.settingsForm.elements[name].value.trim();
    if (raw !== "") update[name] = Number(raw);
  }
  ui.settingsStatus.dataset.kind = "info";
  ui.settingsStatus.textContent = "Saving…";
  const resp = await request("generation_params", "PUT", update);
  if (resp.ok) {
    fillSettings(await resp.json());
    ui.settingsStatus.textContent = "Saved.";
  } else {
    ui.settingsStatus.dataset.kind = "error";
    ui.settingsStatus.textContent = await errorText(resp);
  }
}

// ---- wiring ---------------------------------------------------------------------------------

// Runs an async handler; a network failure becomes a visible message, not a silent rejection.
const guarded = (handler) => (event) =>
  handler(event).catch((err) => showStatus(`Cannot reach the service (${err.message}).`, "error"));

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  guarded(sendMessage)();
});
ui.input.addEventListener("keydown", (event) => {
  // Enter sends, Shift+Enter inserts a newline; never send while an IME is composing.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
    event.preventDefault();
    guarded(sendMessage)();
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && inFlight) inFlight.abort();
});
ui.stop.addEventListener("click", () => inFlight && inFlight.abort());
ui.regenerate.addEventListener("click", guarded(regenerate));
ui.clear.addEventListener("click", guarded(clearConversation));
ui.settingsForm.addEventListener("submit", (event) => {
  event.preventDefault();
  guarded(saveSettings)();
});

function storeApiKey(key) {
  try {
    if (key) localStorage.setItem(API_KEY_STORAGE, key);
    else localStorage.removeItem(API_KEY_STORAGE);
    el("key-status").textContent = key ? "Key saved in this browser." : "Key forgotten.";
  } catch {
    el("key-status").textContent = "This browser does not keep the key (storage is off).";
  }
}
el("api-key").value = apiKey();
el("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  storeApiKey(el("api-key").value.trim());
});
el("forget-key").addEventListener("click", () => {
  el("api-key").value = "";
  storeApiKey("");
});

(async () => {
  refreshControls();
  // One request after the other: the first answer sets the session cookie the second one uses.
  try {
    await loadHistory();
    await loadSettings();
  } catch (err) {
    showStatus(`Cannot reach the service (${err.message}). Reload to try again.`, "error");
  }
  document.body.dataset.ready = "true";
})();
