// The /run panel: run a script with streamed text and variables; a 422 shows line, column, caret.
import { ApiError, describe, postSSE } from "./api.js";

const $ = (id) => document.getElementById(id);
const WIDE = /[\u1100-\u115f\u2e80-\ua4cf\uac00-\ud7a3\uf900-\ufaff\ufe30-\ufe4f\uff00-\uff60\uffe0-\uffe6]/u;

// Spaces to put a caret under `column` (1-based, in characters) of `line`; CJK counts double.
function caretPad(line, column) {
  let width = 0;
  for (const ch of Array.from(line).slice(0, column - 1)) width += WIDE.test(ch) ? 2 : 1;
  return " ".repeat(width);
}

// The script's line with a caret under the column, in the server's excerpt layout.
export function caretExcerpt(script, line, column) {
  const text = (script.split("\n")[line - 1] || "").replace(/\t/g, " ");
  const gutter = `${String(line).padStart(4)} | `;
  return `${gutter}${text}\n${" ".repeat(gutter.length - 2)}| ${caretPad(text, column)}^`;
}

function showScriptError(script, error) {
  const box = $("run-error");
  box.hidden = false;
  const d = error instanceof ApiError ? error.detail : null;
  if (d && d.line) {
    const header = document.createElement("div");
    header.textContent = d.message.split("\n")[0];  // "line L, column C: reason"
    const excerpt = document.createElement("pre");
    excerpt.className = "caret";
    excerpt.textContent = caretExcerpt(script, d.line, d.column);
    box.replaceChildren(header, excerpt);
    moveCursor(script, d.line, d.column);
  } else {
    box.textContent = describe(error);
  }
}

function moveCursor(script, line, column) {
  const lines = script.split("\n");
  const offset = lines.slice(0, line - 1).reduce((n, l) => n + l.length + 1, 0) + column - 1;
  $("script").focus();
  $("script").setSelectionRange(offset, offset + 1);
}

function setVariable(name, value) {
  const body = $("variables").tBodies[0];
  let row = body.querySelector(`tr[data-name="${CSS.escape(name)}"]`);
  if (!row) {
    row = body.insertRow();
    row.dataset.name = name;
    row.insertCell().textContent = name;
    row.insertCell().className = "value";
  }
  row.cells[1].textContent = typeof value === "string" ? value : JSON.stringify(value);
}

async function run(state) {
  const script = $("script").value;
  $("run-error").hidden = true;
  $("run-output").textContent = "";
  $("variables").tBodies[0].replaceChildren();
  state.controller = new AbortController();
  $("run-button").disabled = true;
  $("run-stop").disabled = false;
  try {
    for await (const event of postSSE("/run", { program: script, stream: true }, state.controller.signal)) {
      if (event.type === "text" && event.branch.length === 0) $("run-output").append(event.text);
      else if (event.type === "variable") setVariable(event.name, event.value);
    }
  } catch (error) {
    if (error.name !== "AbortError") showScriptError(script, error);
  } finally {
    $("run-button").disabled = false;
    $("run-stop").disabled = true;
    state.controller = null;
  }
}

export function initRun() {
  const state = { controller: null };
  $("run-button").addEventListener("click", () => state.controller || run(state));
  $("run-stop").addEventListener("click", () => state.controller && state.controller.abort());
}
