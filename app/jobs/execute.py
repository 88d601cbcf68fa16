"""Run a job's body through the very routes the Ingress serves, in-process (ASGI, no network).

A job is "this body, POSTed to this path, by this caller". Rather than a second copy of the
body -> GenerateRequests -> response logic, the runner builds a FastAPI app with the Ingress's own
routers and error handlers and calls it directly; the caller's identity (tenant, priority) is put
in the request state exactly where the Ingress's auth middleware would put it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI


@dataclass
class Outcome:
    status_code: int
    body: dict[str, Any] | list[Any] | None
    headers: dict[str, str]

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 300


def routes_app(gateway_of) -> FastAPI:
    """The Ingress's job-capable routes and error rendering, without its middleware (auth, limits,
    request logs: the job was authenticated and checked when it was submitted)."""
    from app.ingress import server
    from app.ingress.native_api import native_router
    from app.ingress.openai_api import openai_router
    from app.ingress.run_api import run_router

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(openai_router(gateway_of))
    app.include_router(native_router(gateway_of))
    app.include_router(run_router(gateway_of))
    for exc_class, handler in server.api.exception_handlers.items():
        app.add_exception_handler(exc_class, handler)
    return app


class CapturedResponse:
    """An ASGI `send` that keeps the response instead of writing it to a socket."""

    def __init__(self) -> None:
        self.status_code = 500
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status_code = message["status"]
            self.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            self.chunks.append(message.get("body", b""))

    def outcome(self) -> Outcome:
        raw = b"".join(self.chunks)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = {"error": {"message": raw.decode("utf-8", "replace")[:1000], "type": "internal_error",
                              "param": None, "code": self.status_code}}
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self.headers}
        return Outcome(self.status_code, body, headers)


def replay(body: bytes, then=None):
    """An ASGI `receive` that hands over an already-read body once, then passes on to the client's
    own `receive` (which tells of a disconnect), or, for a job that has no client, waits forever:
    a route that listens for a disconnect must not see one just because the body was read."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if then is not None:
            return await then()
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    return receive


async def call_route(app: Any, path: str, body: bytes, state: dict[str, Any]) -> Outcome:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 0), "server": ("sglserve-jobs", 0), "state": state,
    }
    captured = CapturedResponse()
    await app(scope, replay(body), captured.send)
    return captured.outcome()
