"""Auto-conversion: a non-streamed request still running after its maximum wait becomes a job.

An ASGI middleware inside the Ingress's auth middleware (so the caller is known). For the routes
that can become jobs it reads the body, starts the request as usual in a task of its own and
waits up to `jobs.max_wait_s` (or the request's `X-Max-Wait-S`). Done in time: the response goes
out untouched, nothing is stored. Not done: the job is stored with this process holding its lease,
the client gets `202 Accepted` + `Location: /v1/jobs/{id}` + the job object, and the request runs
on without interruption; its response becomes the job's result. Streaming requests pass through.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from app.errors import APIError
from app.jobs.execute import CapturedResponse, Outcome, replay
from app.jobs.models import JOB_PATHS, new_id
from app.jobs.service import JobService, body_bytes, identity_of

logger = logging.getLogger("sglserve.jobs")


def route_path(scope: dict) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path


async def read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


class JobConversion:
    def __init__(self, app: Any, service_of: Callable[[], JobService | None]) -> None:
        self.app = app
        self.service_of = service_of

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        service = None
        if scope["type"] == "http" and scope.get("method") == "POST" and route_path(scope) in JOB_PATHS:
            service = self.service_of()
        if service is None:
            await self.app(scope, receive, send)
            return
        raw = await read_body(receive)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict) or body.get("stream"):
            await self.app(scope, replay(raw, receive), send)  # a bad body: the route says so; streams never convert
            return
        try:
            await self._convertible(service, scope, body, raw, send)
        except APIError as error:
            await JSONResponse(error.to_body(), status_code=error.status_code,
                               headers=dict(error.headers))(scope, replay(b""), send)

    async def _convertible(self, service: JobService, scope: dict, body: dict, raw: bytes, send: Any) -> None:
        headers = Headers(scope=scope)
        state = scope.setdefault("state", {})
        path = route_path(scope)
        wait_s = service.max_wait_s(headers.get("x-max-wait-s"))
        had_callback = "callback_url" in body
        callback = await service.callback(body, headers.get("x-callback-url"))
        job_id = new_id("job")
        sent = service.prepare_body(path, body, f"{job_id.removeprefix('job_')}-1", state)
        if had_callback or sent is not body:
            raw = body_bytes(sent)
        inner = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k != b"content-length"]
                     + [(b"content-length", str(len(raw)).encode())])
        captured = CapturedResponse()
        task = asyncio.create_task(self._run(inner, raw, captured))
        try:
            done, _ = await asyncio.wait({task}, timeout=wait_s)
        except asyncio.CancelledError:  # the client went away before its wait ended: as before jobs
            task.cancel()
            raise
        if not done:
            try:
                job = await service.adopt(path, body, identity_of(state), callback, task, state, job_id)
            except Exception:  # noqa: BLE001 - the store is down: answer the request the plain way
                logger.exception("could not store job %s; answering synchronously", job_id)
            else:
                location = f"{scope.get('root_path', '')}/v1/jobs/{job.id}"
                response = JSONResponse(job.public(), status_code=202, headers={"Location": location})
                await response(scope, replay(b""), send)
                return
        await task
        # The route ran on a copy of the scope: hand its match back, so the request's metrics and
        # log (app.logs, which read scope["route"]) name the endpoint for every status, 404 too.
        for key in ("route", "endpoint", "path_params"):
            if key in inner:
                scope[key] = inner[key]
        await send({"type": "http.response.start", "status": captured.status_code, "headers": captured.headers})
        await send({"type": "http.response.body", "body": b"".join(captured.chunks), "more_body": False})

    async def _run(self, scope: dict, raw: bytes, captured: CapturedResponse) -> Outcome:
        await self.app(scope, replay(raw), captured.send)
        return captured.outcome()
