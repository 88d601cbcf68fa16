// The chat panel: model picker, sampling settings, a streamed answer, Stop, TTFT and tokens/s.
import { describe, getJSON, postSSE } from "./api.js";

const $ = (id) => document.getElementById(id);

function showError(message) {
  $("chat-error").hidden = !message;
  $("chat-error").textContent = message || "";
}

async function loadModels() {
  const select = $("model");
  try {
    const { data } = await getJSON("/v1/models");
    select.replaceChildren(...data.map((m) => new Option(m.id, m.id)));
    showError("");
  } catch (error) {
    showError(`could not list models: ${describe(error)}`);
  }
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push({ role: "user", content: $("prompt").value });
  return {
    model: $("model").value,
    messages,
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    ignore_eos: $("ignore-eos").checked,
    stream: true,
    stream_options: { include_usage: true },
  };
}

function formatStats(started, firstAt, endedAt, usage, stopped) {
  const parts = [];
  if (firstAt) parts.push(`TTFT ${Math.round(firstAt - started)} ms`);
  if (usage && firstAt && endedAt > firstAt) {
    const rate = usage.completion_tokens / ((endedAt - firstAt) / 1000);
    parts.push(`${usage.completion_tokens} tokens`, `${rate.toFixed(1)} tokens/s`);
  }
  if (stopped) parts.push("stopped");
  return parts.join(" · ");
}

async function send(state) {
  const answer = $("answer");
  answer.textContent = "";
  showError("");
  $("stats").textContent = "";
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const started = performance.now();
  let firstAt = 0;
  let usage = null;
  let stopped = false;
  try {
    for await (const chunk of postSSE("/v1/chat/completions", requestBody(), state.controller.signal)) {
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const text = choice.delta && choice.delta.content;
        if (!text) continue;
        if (!firstAt) firstAt = performance.now();
        answer.append(text);  // rendered as it arrives, one increment at a time
      }
    }
  } catch (error) {
    if (error.name === "AbortError") stopped = true;
    else showError(describe(error));
  } finally {
    $("stats").textContent = formatStats(started, firstAt, performance.now(), usage, stopped);
    $("send").disabled = false;
    $("stop").disabled = true;
    state.controller = null;
  }
}

export function initChat() {
  const state = { controller: null };
  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (!state.controller) send(state);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("chat-form").requestSubmit();
  });
  // Aborting the fetch closes the connection; the server then aborts the request in the engine.
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  loadModels();
  return { loadModels };
}
