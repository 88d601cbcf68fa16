// Talking to sglserve from the page: the API key (session storage only), JSON errors, SSE over fetch.

const KEY_STORAGE = "sglserve.apiKey";
// API paths are relative to the page, so the playground also works under a route prefix.
const BASE = location.pathname.endsWith("/") ? location.pathname : `${location.pathname}/`;
export const apiUrl = (path) => BASE + path.replace(/^\//, "");

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(value) {
  if (value) sessionStorage.setItem(KEY_STORAGE, value);
  else sessionStorage.removeItem(KEY_STORAGE);
}

export function headers(json = true) {
  const h = json ? { "content-type": "application/json" } : {};
  const key = apiKey();
  if (key) h.authorization = `Bearer ${key}`;
  return h;
}

// The server's error body, {"error": {message, type, param, code, line?, column?}}, as an Error.
export class ApiError extends Error {
  constructor(status, detail) {
    super(detail.message || `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

export async function errorFrom(response) {
  let detail = { message: `HTTP ${response.status}` };
  try {
    const body = await response.json();
    if (body && body.error) detail = body.error;
  } catch (_) { /* not JSON */ }
  return new ApiError(response.status, detail);
}

export async function getJSON(path) {
  const response = await fetch(apiUrl(path), { headers: headers(false) });
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}

// POST a JSON body and yield each server-sent event's parsed data until [DONE].
// Aborting `signal` closes the connection, and the server aborts the request in the engine.
export async function* postSSE(path, body, signal) {
  const response = await fetch(apiUrl(path), { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!response.ok) throw await errorFrom(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, "");
      buffer = buffer.slice(newline + 1);
      if (line.startsWith("data:")) {
        data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
      } else if (line === "" && data.length) {
        const payload = data.join("\n");
        data = [];
        if (payload === "[DONE]") return;
        const event = JSON.parse(payload);
        if (event.error) throw new ApiError(500, event.error);
        yield event;
      }
    }
  }
}

export function describe(error) {
  if (error instanceof ApiError) {
    const d = error.detail;
    return `${error.status} ${d.code || d.type || ""}: ${d.message}${d.param ? ` (${d.param})` : ""}`;
  }
  return String(error && error.message ? error.message : error);
}
