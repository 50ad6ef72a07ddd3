// The textmill playground: pick a model, write, and stream a continuation over the WebSocket /v1/stream/{model}.
// Protocol (docs/serving.md): send one JSON request; receive {"type":"update","text","tokens"} messages, then
// {"type":"done","text","finish_reason","usage","version","seed"}, or {"error":{message,type,code,status}}. Stop closes
// the socket, which cancels the generation on the server. No framework, no build step, nothing from another origin.
"use strict";

const KEY_STORE = "textmill.apiKey";        // sessionStorage only: the key never outlives the tab
const PAUSE_MS = 900;                        // "suggest as I pause": quiet time before asking
const MODELS_RETRY_MS = 2000;                // while no model is loaded yet, or the node answered 503
const SUBPROTOCOL = "textmill.v1";
const BEARER_PREFIX = "textmill.bearer.";   // browsers cannot set Authorization on a WebSocket (serving/playground.py)

const $ = (id) => document.getElementById(id);

const state = {
  keysRequired: false,
  socket: null,          // open WebSocket, reused for the next request on the same model
  socketModel: null,
  busy: false,           // a request is streaming
  stopping: false,
  suggestion: "",
  updates: 0,
  tokens: 0,
  lastRequest: null,     // {model, body}: what Retry sends again
  pauseTimer: null,
  modelsTimer: null,
};

// ---- API key -------------------------------------------------------------------------------------------------------

function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: "Bearer " + key } : {};
}

function base64url(text) {
  const bytes = new TextEncoder().encode(text);
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function showKeyRow(show) {
  $("key-row").hidden = !show;
  if (show && !$("api-key").value) $("api-key").value = apiKey();
}

function saveKey() {
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
  closeSocket();
  loadModels();
}

async function detectKeys() {
  // The server writes whether it wants a key into the page (/info itself needs the key when keys are set).
  state.keysRequired = document.body.dataset.keysRequired === "true";
  showKeyRow(state.keysRequired || Boolean(apiKey()));
}

// ---- errors --------------------------------------------------------------------------------------------------------

// Turn a server error ({message, type, code, status}) into a title and an action a writer understands.
function describe(err) {
  const status = err.status || 0;
  const message = err.message || "unknown error";
  if ((status === 401 || err.code === "invalid_api_key") && !apiKey()) {
    return { title: "API key needed.", message: "This server requires an API key: enter it above.", key: true };
  }
  if (status === 401 || err.code === "invalid_api_key") {
    return { title: "API key refused.", message: message + " Enter a valid key above.", key: true };
  }
  if (status === 429) {
    return { title: "Server busy.", message: "Its queue is full (" + message + "). Retry in a moment.", retry: true };
  }
  if (status === 503 && err.code === "draining") {
    return { title: "Server shutting down.", message: "This node is draining (" + message + "); reload the page to "
             + "reach another node.", retry: true };
  }
  if (status === 503 && err.code === "out_of_memory") {
    return { title: "Out of memory.", message: message + " Try a shorter length, then retry.", retry: true };
  }
  if (status === 503) {
    return { title: "Model loading.", message: message + " Retry in a moment.", retry: true };
  }
  if (err.code === "context_length_exceeded") {
    return { title: "Prompt too long.", message: message };
  }
  if (status === 404) {
    return { title: "Model not available.", message: message };
  }
  return { title: "Error" + (status ? " " + status : "") + ".", message: message };
}

function showError(info, kind) {
  $("error").hidden = false;
  $("error").className = kind === "info" ? "error info" : "error";
  $("error").dataset.status = String(info.status || "");
  $("error-title").textContent = info.title;
  $("error-message").textContent = info.message;
  $("retry").hidden = !info.retry || !state.lastRequest;
  if (info.key) showKeyRow(true);
}

function showApiError(err) {
  showError({ ...describe(err), status: err.status });
}

function clearError() {
  $("error").hidden = true;
}

async function errorFromResponse(r) {
  let err = { status: r.status, message: r.statusText || "HTTP " + r.status };
  try {
    const body = await r.json();
    if (body && body.error) err = { ...body.error, status: r.status };
  } catch (e) {
    // not JSON: keep the status line
  }
  return err;
}

// ---- models --------------------------------------------------------------------------------------------------------

async function loadModels() {
  clearTimeout(state.modelsTimer);
  if (state.keysRequired && !apiKey()) {
    fillModels([]);
    showError({ title: "API key needed.", message: "This server requires an API key: enter it above.", key: true });
    return;
  }
  let r;
  try {
    r = await fetch("v1/models", { headers: authHeaders(), cache: "no-store" });
  } catch (e) {
    showError({ title: "Server unreachable.", message: "Could not reach " + location.host + "; retrying." });
    state.modelsTimer = setTimeout(loadModels, MODELS_RETRY_MS);
    return;
  }
  if (!r.ok) {
    const err = await errorFromResponse(r);
    fillModels([]);
    showApiError(err);
    if (r.status === 503 && err.code !== "draining") state.modelsTimer = setTimeout(loadModels, MODELS_RETRY_MS);
    return;
  }
  const models = (await r.json()).data || [];
  fillModels(models);
  if (!models.length) {
    showError({ title: "No model loaded yet.", message: "The node is still loading its models; retrying." }, "info");
    state.modelsTimer = setTimeout(loadModels, MODELS_RETRY_MS);
    return;
  }
  clearError();
}

function fillModels(models) {
  const select = $("model");
  const previous = select.value;
  select.replaceChildren();
  for (const m of models) {
    const option = document.createElement("option");
    option.value = m.id;
    option.dataset.version = m.version || "";
    option.textContent = m.id + " · " + (m.version || "?");
    select.append(option);
  }
  if (models.some((m) => m.id === previous)) select.value = previous;
  select.disabled = !models.length;
  showVersion();
  setBusy(state.busy);
}

function showVersion(version) {
  const option = $("model").selectedOptions[0];
  if (option && version && option.dataset.version !== version) {  // a hot swap happened: the answer names the new one
    option.dataset.version = version;
    option.textContent = option.value + " · " + version;
  }
  $("model-version").textContent = option && option.dataset.version ? "live version " + option.dataset.version : "";
}

// ---- the socket ----------------------------------------------------------------------------------------------------

function openSocket(model) {
  const url = new URL("v1/stream/" + encodeURIComponent(model), location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const protocols = [SUBPROTOCOL];
  if (apiKey()) protocols.push(BEARER_PREFIX + base64url(apiKey()));
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, protocols);
    ws.onopen = () => resolve(ws);
    ws.onclose = () => reject(new Error("the stream socket was refused"));
  });
}

async function socketFor(model) {
  if (state.socket && state.socketModel === model && state.socket.readyState === WebSocket.OPEN) return state.socket;
  closeSocket();
  const ws = await openSocket(model);
  ws.onmessage = (event) => onMessage(ws, event);
  ws.onclose = () => onClose(ws);
  state.socket = ws;
  state.socketModel = model;
  return ws;
}

function closeSocket() {
  if (state.socket) {
    const ws = state.socket;
    state.socket = null;
    ws.onclose = null;
    ws.close();
  }
}

// The handshake was refused: a bad key is the usual cause, and only an HTTP request can tell it apart.
async function diagnoseRefusal() {
  try {
    const r = await fetch("v1/models", { headers: authHeaders(), cache: "no-store" });
    if (!r.ok) {
      showApiError(await errorFromResponse(r));
      return;
    }
  } catch (e) {
    // fall through
  }
  showError({ title: "Stream refused.", message: "The server did not open the stream socket; retry, or reload the page.",
              retry: true });
}

// ---- a request -----------------------------------------------------------------------------------------------------

// The request the controls describe, or null (and a message) when the seed field holds no usable seed.
function requestBody() {
  const pinned = $("seed").value.trim();
  const seed = pinned === "" ? crypto.getRandomValues(new Uint32Array(1))[0] : Number(pinned);
  if (!Number.isSafeInteger(seed) || seed < 0) {  // larger ones would be rounded by JSON numbers in the browser
    showError({ title: "Seed not usable.", message: "The seed must be a whole number from 0 to "
                + Number.MAX_SAFE_INTEGER + ", or empty for a random one." });
    return null;
  }
  return {
    prompt: $("text").value,
    max_tokens: Math.max(1, Math.floor(Number($("length").value) || 1)),
    temperature: Number($("temperature").value),
    seed: seed,
  };
}

async function generate(model, body) {
  if (state.busy || !model || !body) return;
  state.lastRequest = { model, body };
  clearError();
  setSuggestion("");
  state.updates = 0;
  state.tokens = 0;
  state.stopping = false;
  setBusy(true);
  setStatus("Connecting…");
  let ws;
  try {
    ws = await socketFor(model);
  } catch (e) {
    setBusy(false);
    setStatus("");
    await diagnoseRefusal();
    return;
  }
  if (state.stopping) return;  // Stop was pressed while the socket was opening
  setStatus("Writing… (seed " + body.seed + ")");
  ws.send(JSON.stringify(body));
}

function continueText() {
  const body = requestBody();
  if (body) generate($("model").value, body);
}

function retry() {
  if (state.lastRequest) generate(state.lastRequest.model, state.lastRequest.body);
}

function onMessage(ws, event) {
  if (ws !== state.socket || !state.busy) return;  // a stopped request's late messages
  let msg;
  try {
    msg = JSON.parse(event.data);
  } catch (e) {
    return;
  }
  if (msg.error) {
    setBusy(false);
    setStatus("");
    showApiError(msg.error);
    if (msg.error.status === 404) loadModels().then(() => showApiError(msg.error));  // the node's models changed
    return;
  }
  if (msg.type === "update") {
    state.updates += 1;
    state.tokens = msg.tokens;
    setSuggestion(state.suggestion + msg.text);
    setStatus("Writing… " + msg.tokens + " tokens (seed " + state.lastRequest.body.seed + ")");
  } else if (msg.type === "done") {
    setSuggestion(msg.text);
    setBusy(false);
    showVersion(msg.version);
    const seed = msg.seed !== undefined ? msg.seed : state.lastRequest.body.seed;
    setStatus(msg.text ? "Suggestion ready: Tab or click to accept." : "The model ended the text here.");
    setMeta("model " + msg.model + " · version " + msg.version + " · seed " + seed + " · temperature "
            + state.lastRequest.body.temperature + " · " + msg.usage.completion_tokens + " tokens ("
            + msg.finish_reason + ")", seed);
  }
}

function onClose(ws) {
  if (ws !== state.socket) return;
  state.socket = null;
  if (state.busy && !state.stopping) {
    setBusy(false);
    showError({ title: "Connection lost.", message: "The server closed the stream; retry.", retry: true });
  }
}

function stop() {
  if (!state.busy) return;
  state.stopping = true;
  closeSocket();  // the server sees the disconnect and cancels the generation
  setBusy(false);
  setStatus("Stopped after " + state.tokens + " tokens (seed " + state.lastRequest.body.seed + ").");
}

// ---- the suggestion ------------------------------------------------------------------------------------------------

function setSuggestion(text) {
  state.suggestion = text;
  $("suggestion-text").textContent = text;
  $("suggestion").dataset.updates = String(state.updates);
  $("suggestion").hidden = !text;
}

function accept() {
  if (!state.suggestion) return;
  if (state.busy) stop();
  const area = $("text");
  area.value += state.suggestion;
  setSuggestion("");
  setStatus("");
  area.focus();
  area.setSelectionRange(area.value.length, area.value.length);
}

function dismiss() {
  if (state.busy) stop();
  setSuggestion("");
  setStatus("");
}

// ---- page state ----------------------------------------------------------------------------------------------------

function setBusy(busy) {
  state.busy = busy;
  $("continue").disabled = busy || !$("model").value;
  $("stop").disabled = !busy;
}

function setStatus(text) {
  $("status").textContent = text;
}

function setMeta(text, seed) {
  $("meta").textContent = text;
  $("meta").dataset.seed = String(seed);
}

function onType() {
  clearTimeout(state.pauseTimer);
  if (state.suggestion || state.busy) dismiss();  // the text changed: the suggestion no longer fits it
  if ($("auto").checked) state.pauseTimer = setTimeout(continueText, PAUSE_MS);
}

function onKey(event) {
  if (event.key === "Tab" && state.suggestion) {
    event.preventDefault();
    accept();
  } else if (event.key === "Escape") {
    dismiss();
  } else if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    continueText();
  }
}

function init() {
  $("continue").addEventListener("click", continueText);
  $("stop").addEventListener("click", stop);
  $("retry").addEventListener("click", retry);
  $("suggestion").addEventListener("click", accept);
  $("save-key").addEventListener("click", saveKey);
  $("api-key").addEventListener("keydown", (e) => { if (e.key === "Enter") saveKey(); });
  $("model").addEventListener("change", () => { closeSocket(); showVersion(); });
  $("text").addEventListener("input", onType);
  $("text").addEventListener("keydown", onKey);
  $("temperature").addEventListener("input", () => {
    $("temperature-value").textContent = Number($("temperature").value).toFixed(2);
  });
  detectKeys().then(loadModels);
}

document.addEventListener("DOMContentLoaded", init);
