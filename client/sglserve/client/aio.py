"""`AsyncClient`: the same calls as `Client`, awaited; streams are async iterators."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

import httpx

from . import _core
from ._core import Call, RetryPolicy
from .errors import APIConnectionError, APITimeoutError, JobFailedError, JobTimeoutError
from .types import Job, Model

T = TypeVar("T")


class AsyncStream(Generic[T]):
    """Typed increments of one streamed answer. `aclose()` (or leaving `async with`, or cancelling
    the task that iterates) closes the connection, and the server aborts the request."""

    def __init__(self, response: httpx.Response, call: Call):
        self.response = response
        self._decode = call.decoder() if call.decoder else (lambda e: e)

    async def __aiter__(self) -> AsyncIterator[T]:
        try:
            async for payload in _sse_data(self.response.aiter_lines()):
                item = self._decode(_core.event_json(payload))
                if item is not None:
                    yield item
        except httpx.TimeoutException as exc:
            raise APITimeoutError(f"the stream timed out: {exc}") from exc
        except httpx.TransportError as exc:
            raise APIConnectionError(f"the stream broke: {exc}") from exc
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        await self.response.aclose()

    async def __aenter__(self) -> "AsyncStream[T]":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """`_core.sse_data` for an async line source."""
    parser = _core.SSEParser()
    async for line in lines:
        payload = parser.feed(line)
        if payload is _core.DONE:
            return
        if payload is not None:
            yield payload
    payload = parser.end()
    if payload is not None and payload is not _core.DONE:
        yield payload


class AsyncClient:
    """An asyncio client for one sglserve server; see `Client` for the methods."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        model: str | None = None,
        timeout_s: float = 600.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 3,
        retry: RetryPolicy | None = None,
        job_wait_timeout_s: float | None = None,
        headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.base_url = _core.resolve_base_url(base_url)
        self.api_key = _core.resolve_api_key(api_key)
        self.model = model
        self.retry = retry or RetryPolicy(max_retries=max_retries)
        self.job_wait_timeout_s = job_wait_timeout_s
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=_core.default_headers(self.api_key, headers),
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    # -- generation --------------------------------------------------------------------------

    async def chat(self, messages: Any, *, model: str | None = None, stream: bool = False,
                   system: str | None = None, **params: Any) -> Any:
        return await self._call(_core.chat_call(await self._model(model), messages, stream, system, params))

    async def complete(self, prompt: Any, *, model: str | None = None, stream: bool = False,
                       **params: Any) -> Any:
        return await self._call(_core.complete_call(await self._model(model), prompt, stream, params))

    async def generate(self, text: Any, *, stream: bool = False,
                       sampling_params: dict[str, Any] | None = None, **params: Any) -> Any:
        return await self._call(_core.generate_call(text, stream, sampling_params, params))

    async def run(self, script: Any, *, stream: bool = False, sampling: dict[str, Any] | None = None,
                  arguments: dict[str, Any] | None = None, **variables: Any) -> Any:
        return await self._call(_core.run_call(script, stream, {**(arguments or {}), **variables}, sampling))

    # -- information -------------------------------------------------------------------------

    async def models(self) -> list[Model]:
        return await self._call(_core.models_call())

    async def health(self) -> dict[str, Any]:
        return await self._call(_core.get_call("/health"))

    async def ready(self) -> dict[str, Any]:
        return await self._call(_core.get_call("/ready"))

    async def server_info(self) -> dict[str, Any]:
        return await self._call(_core.get_call("/server_info"))

    async def stream_token(self) -> dict[str, Any]:
        return await self._call(_core.stream_token_call())

    # -- jobs --------------------------------------------------------------------------------

    async def submit(self, path: str, body: dict[str, Any], *, callback_url: str | None = None,
                     max_wait_s: float | None = None) -> Job:
        return await self._call(_core.submit_call(path, body, callback_url, max_wait_s))

    async def job(self, job_id: str) -> Job:
        return await self._call(_core.job_call(job_id))

    async def cancel_job(self, job_id: str) -> Job:
        return await self._call(_core.cancel_job_call(job_id))

    async def wait(self, job_id: str, timeout: float | None = None, *, poll_interval_s: float = 0.5,
                   on_poll: Callable[[Job], None] | None = None) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll_interval_s
        while True:
            job = await self.job(job_id)
            if on_poll is not None:
                on_poll(job)
            if job.done:
                return job
            if deadline is not None and time.monotonic() + delay > deadline:
                raise JobTimeoutError(f"job {job_id} is still {job.status} after {timeout}s", job)
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 5.0)

    # -- plumbing ----------------------------------------------------------------------------

    async def _model(self, model: str | None) -> str:
        if model is None and self.model is None:
            self.model = (await self.models())[0].id
        return model or self.model  # type: ignore[return-value]

    async def _call(self, call: Call) -> Any:
        response = await self._send(call)
        if call.stream:
            return AsyncStream(response, call)
        if _core.is_job_answer(call, response):
            job = await self.wait(response.json()["id"], self.job_wait_timeout_s)
            if job.status != "succeeded":
                raise JobFailedError(f"job {job.id} ended {job.status}: {job.error}", job)
            return call.parse(job.result)
        return call.parse(response.json())

    async def _send(self, call: Call) -> httpx.Response:
        request = self._http.build_request(call.method, call.path, json=call.body, headers=call.headers)
        attempt = 0
        while True:
            try:
                response = await self._http.send(request, stream=True)
                if not call.stream or response.status_code >= 400:
                    try:
                        await response.aread()
                    finally:
                        await response.aclose()
            except httpx.TransportError as exc:
                delay = _core.retry_delay_for_error(self.retry, attempt, call, exc)
                if delay is None:
                    raise _core.connection_error(call, exc) from exc
            else:
                if response.status_code < 400:
                    return response
                delay = _core.retry_delay_for_status(self.retry, attempt, response)
                if delay is None:
                    raise _core.error_from_response(response)
            await asyncio.sleep(delay)
            attempt += 1
