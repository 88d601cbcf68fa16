"""Ray Serve's HTTP proxy: a request whose Ingress replica died gets a JSON 503, not a bare 500.

When the Ingress actor dies while it holds a request (kill -9, OOM, node loss), the proxy's call to
it fails with RayActorError. Ray Serve (2.60, `serve/_private/http_util.py`) answers only 408, 429
and 503 itself; for this 500 it sends nothing, and uvicorn then writes its own `500 Internal Server
Error` in plain text. That is a fault of the server, not of the request, and the request can be sent
again at once: Serve routes it to the new Ingress replica.

Ray Serve loads proxy middlewares from the function named by the environment variable
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` (read by the proxy process when it starts). Point it at
`app.proxy_errors.proxy_middlewares` (docs/fault-tolerance.md says where to set it): an HTTP request
that ends with no response started then gets 503 + Retry-After in OpenAI's error shape. Nothing
else changes: a response already started (a stream cut off mid-way) can only end, and in Ray
Serve's throughput mode (no proxy: the Ingress replica serves HTTP itself) a dead Ingress takes its
connections with it.

Kept free of sglserve's other modules: the proxy process imports only this file and Starlette.
"""

from __future__ import annotations

import json
import logging

logger = logging.getLogger("sglserve.proxy")

RETRY_AFTER_S = 1
BODY = json.dumps({"error": {
    "message": "the server process handling this request failed before answering (it is being "
               "replaced); retry the request",
    "type": "overloaded_error", "param": None, "code": "service_unavailable",
}}).encode()


class ReplicaFailureAs503:
    """Pure ASGI middleware: if the wrapped app returns (or raises) without having started an HTTP
    response, answer 503 + Retry-After with OpenAI's error body instead of the server's bare 500."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            if message.get("type") == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:  # noqa: BLE001 - answered below if nothing was sent; logged
            if started:
                raise
            logger.exception("proxy: the request failed before a response started")
        if started:
            return
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"retry-after", str(RETRY_AFTER_S).encode()),
            (b"content-length", str(len(BODY)).encode()),
        ]})
        await send({"type": "http.response.body", "body": BODY})


def proxy_middlewares() -> list:
    """For RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH: the middlewares Ray Serve's proxy applies."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaFailureAs503)]
