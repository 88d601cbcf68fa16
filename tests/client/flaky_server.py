"""A tiny local HTTP server that misbehaves on purpose, then forwards to the real stack.

Each request takes the next scripted action: answer a status (503 + Retry-After, 429), drop the
connection after reading the request (the server "may have executed it"), or proxy to the live
application. It records what arrived and when, so a test can count retries.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Action:
    kind: str  # "status" | "json" | "drop" | "proxy"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: object = None  # for "json": the body to answer


class FlakyServer:
    def __init__(self, upstream: str, actions: list[Action], default: Action = Action("proxy")):
        self.upstream = upstream.rstrip("/")
        self.actions = list(actions)
        self.default = default
        self.seen: list[tuple[float, str, str]] = []  # (monotonic time, method, path)
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                owner._handle(self, "GET")

            def do_POST(self):
                owner._handle(self, "POST")

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FlakyServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handle(self, handler: http.server.BaseHTTPRequestHandler, method: str) -> None:
        length = int(handler.headers.get("content-length") or 0)
        body = handler.rfile.read(length) if length else b""
        self.seen.append((time.monotonic(), method, handler.path))
        action = self.actions.pop(0) if self.actions else self.default
        if action.kind == "drop":
            handler.close_connection = True
            handler.connection.shutdown(2)  # the request arrived; no answer ever comes
            return
        if action.kind in ("status", "json"):
            payload = b'{"error": {"message": "scripted", "type": "overloaded_error", "param": null, "code": "scripted"}}'
            if action.kind == "json":
                payload = json.dumps(action.body).encode()
            handler.send_response(action.status)
            for name, value in {"content-type": "application/json", **action.headers}.items():
                handler.send_header(name, value)
            handler.send_header("content-length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
            return
        headers = {k: v for k, v in handler.headers.items() if k.lower() in ("content-type", "authorization")}
        upstream = httpx.request(method, self.upstream + handler.path, content=body, headers=headers, timeout=120)
        handler.send_response(upstream.status_code)
        handler.send_header("content-type", upstream.headers.get("content-type", "application/json"))
        handler.send_header("content-length", str(len(upstream.content)))
        handler.end_headers()
        handler.wfile.write(upstream.content)
