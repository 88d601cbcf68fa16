"""`AsyncClient`: the same calls as `Client`, awaited; streams are async iterators."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

import httpx

from . import _core
from ._core import Call, RetryPolicy
from ._methods import ClientMethods
from .errors import APIConnectionError, APITimeoutError
from .types import Job

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


class AsyncClient(ClientMethods):
    """An asyncio client for one sglserve server: `Client`'s calls (from `ClientMethods`), each
    answering an awaitable; streamed ones an `AsyncStream`."""

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
        super().__init__(base_url, api_key, model, retry, max_retries, job_wait_timeout_s)
        self._http = httpx.AsyncClient(**self._http_options(timeout_s, connect_timeout_s, headers, transport))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    # -- jobs --------------------------------------------------------------------------------

    async def wait(self, job_id: str, timeout: float | None = None, *, poll_interval_s: float = 0.5,
                   on_poll: Callable[[Job], None] | None = None) -> Job:
        """Poll a job until it ends. Raises JobTimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for delay in _core.poll_delays(poll_interval_s):
            job = await self.job(job_id)
            if on_poll is not None:
                on_poll(job)
            if job.done:
                return job
            _core.past_deadline(job, deadline, time.monotonic(), delay, timeout)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover - poll_delays never ends

    # -- plumbing ----------------------------------------------------------------------------

    async def _default_model(self) -> str:
        if self.model is None:
            self.model = (await self.models())[0].id
        return self.model

    async def _call(self, call: Call) -> Any:
        if call.needs_model:
            call.body["model"] = await self._default_model()  # type: ignore[index]
        response = await self._send(call)
        if call.stream:
            return AsyncStream(response, call)
        if _core.is_job_answer(call, response):
            return _core.job_result(call, await self.wait(response.json()["id"], self.job_wait_timeout_s))
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
