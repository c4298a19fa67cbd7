// The /ui page of `mpm serve --ui`: chat with images and paint from prompts through this server's own OpenAI API.
// No framework, no build step, no network beyond this server: every URL below is relative to the page (/ui).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { messages: [], image: null, controller: null, health: {} };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (e) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

function setStatus(id, text, isError = false) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function fill(select, names, preferred) {
  const keep = select.value;
  select.replaceChildren(...names.map((n) => new Option(n, n)));
  if (names.includes(keep)) select.value = keep;
  else if (names.includes(preferred)) select.value = preferred;
}

// --- models: /health tells which model chats and which paints; /v1/models lists them (it needs the key, if any)
async function loadModels() {
  try {
    state.health = await (await fetch("health")).json();
  } catch (e) {
    setStatus("chat-status", "the server does not answer: " + e, true);
    return;
  }
  const response = await fetch("v1/models", { headers: headers() });
  if (!response.ok) {
    const why = response.status === 401 ? "this server needs an API key: type it in Settings" : await errorOf(response);
    setStatus("chat-status", why, true);
    setStatus("paint-status", why, true);
    return;
  }
  const ids = (await response.json()).data.map((m) => m.id);
  const { model, paint_model: paint } = state.health;
  fill($("chat-model"), ids.filter((n) => n !== paint), model);
  fill($("paint-model"), ids.filter((n) => n !== model), paint);
  setStatus("chat-status", model ? "" : "this server has no chat model (start it with --model)", !model);
  setStatus("paint-status", paint ? "" : "this server has no paint model (start it with --paint-model)", !paint);
  $("send").disabled = !model;
  $("paint").disabled = !paint;
}

// --- tabs
function selectTab(tab) {
  for (const t of document.querySelectorAll('[role="tab"]')) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !on;
  }
}

// --- the image to send: previewed, sent as a data URL
function readImage(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function onImage() {
  const file = $("image-input").files[0];
  if (!file) return clearImage();
  state.image = await readImage(file);
  $("image-preview").src = state.image;
  $("image-preview").alt = "the image to send: " + file.name;
  $("image-preview").hidden = false;
  $("image-remove").hidden = false;
}

function clearImage() {
  state.image = null;
  $("image-input").value = "";
  $("image-preview").hidden = true;
  $("image-preview").removeAttribute("src");
  $("image-remove").hidden = true;
}

// --- the conversation
function addTurn(role, text, image) {
  const turn = document.createElement("div");
  turn.className = "turn " + role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Model";
  turn.append(who);
  if (image) {
    const img = document.createElement("img");
    img.src = image;
    img.alt = "the image you sent";
    turn.append(img);
  }
  const body = document.createElement("p");
  body.className = "text";
  body.textContent = text;
  turn.append(body);
  $("conversation").append(turn);
  turn.scrollIntoView({ block: "end" });
  return body;
}

function number(id, fallback) {
  const v = parseFloat($(id).value);
  return Number.isFinite(v) ? v : fallback;
}

// Server-sent events from fetch: calls onData(parsed JSON) for each `data:` line until [DONE].
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(event) {
  if (event) event.preventDefault();
  const text = $("question").value.trim();
  if ((!text && !state.image) || state.controller || $("send").disabled) return;
  const image = state.image;
  const content = image
    ? [{ type: "image_url", image_url: { url: image } }, { type: "text", text }]
    : text;
  state.messages.push({ role: "user", content });
  addTurn("user", text, image);
  $("question").value = "";
  clearImage();

  const previous = $("answer");
  if (previous) previous.removeAttribute("id");
  const answer = addTurn("assistant", "");
  answer.id = "answer";
  answer.setAttribute("aria-busy", "true");

  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  setStatus("chat-status", "answering…");
  let reply = "";
  let finish = null;
  let chunks = 0;
  try {
    const request = {
      model: $("chat-model").value,
      messages: state.messages,
      temperature: number("temperature", 0),
      max_tokens: Math.round(number("max-tokens", 256)),
      stream: true,
    };
    const seed = parseInt($("seed").value, 10);
    if (Number.isFinite(seed)) request.seed = seed;
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), signal: state.controller.signal, body: JSON.stringify(request),
    });
    if (!response.ok) throw new Error(await errorOf(response));
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (choice.delta && choice.delta.content) {
        reply += choice.delta.content;
        answer.textContent = reply;
        answer.dataset.chunks = String(++chunks);
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    reply = reply.trim();
    answer.textContent = reply;
    state.messages.push({ role: "assistant", content: reply });
    setStatus("chat-status", finish === "length" ? "the answer reached the token limit (Settings)" : "");
  } catch (e) {
    if (e.name === "AbortError") {  // stopped: the partial answer stays in the conversation
      reply = reply.trim();
      state.messages.push({ role: "assistant", content: reply });
      setStatus("chat-status", "stopped");
    } else {
      state.messages.pop();  // the question failed: it does not stay in the conversation sent next time
      answer.parentElement.classList.add("failed");
      answer.textContent = "(no answer)";
      setStatus("chat-status", "error: " + e.message, true);
    }
  } finally {
    answer.removeAttribute("aria-busy");
    answer.dataset.done = "true";
    state.controller = null;
    $("send").disabled = !state.health.model;
    $("stop").disabled = true;
  }
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("conversation").replaceChildren();
  setStatus("chat-status", "");
}

// --- painting
async function paint(event) {
  if (event) event.preventDefault();
  const prompt = $("paint-prompt").value.trim();
  if (!prompt || $("paint").disabled) return;
  const body = { model: $("paint-model").value, prompt, n: Math.round(number("paint-n", 1)), response_format: "b64_json" };
  const size = $("paint-size").value.trim();
  if (size) body.size = size;
  $("paint").disabled = true;
  $("paint-images").setAttribute("aria-busy", "true");
  setStatus("paint-status", "painting…");
  try {
    const response = await fetch("v1/images/generations", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!response.ok) throw new Error(await errorOf(response));
    const figures = (await response.json()).data.map((item, i) => {
      const url = "data:image/png;base64," + item.b64_json;
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = url;
      img.alt = `painted from: ${prompt} (${i + 1})`;
      const caption = document.createElement("figcaption");
      const link = document.createElement("a");
      link.href = url;
      link.download = `paint-${Date.now()}-${i + 1}.png`;
      link.textContent = "save";
      caption.append(prompt + " ", link);
      figure.append(img, caption);
      return figure;
    });
    $("paint-images").prepend(...figures);  // the newest first
    setStatus("paint-status", "");
  } catch (e) {
    setStatus("paint-status", "error: " + e.message, true);
  } finally {
    $("paint-images").removeAttribute("aria-busy");
    $("paint").disabled = !state.health.paint_model;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (e) => {
      if (e.key !== "ArrowLeft" && e.key !== "ArrowRight") return;
      const other = tab.id === "tab-chat" ? $("tab-paint") : $("tab-chat");
      selectTab(other);
      other.focus();
    });
  }
  $("image-input").addEventListener("change", () => onImage().catch((e) => setStatus("chat-status", "cannot read the image: " + e, true)));
  $("image-remove").addEventListener("click", clearImage);
  $("chat-form").addEventListener("submit", send);
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", newChat);
  $("paint-form").addEventListener("submit", paint);
  $("api-key").addEventListener("change", loadModels);
  loadModels().then(() => document.body.dataset.ready = "true");
});
