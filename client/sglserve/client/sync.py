"""`Client`: the blocking SDK. `AsyncClient` (aio.py) has the same methods, awaited."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import httpx

from . import _core
from ._core import Call, RetryPolicy
from ._methods import ClientMethods
from .errors import APIConnectionError, APITimeoutError
from .types import Job

T = TypeVar("T")


class Stream(Generic[T]):
    """Typed increments of one streamed answer. Closing it (or leaving its `with` block, or
    breaking out and dropping it) closes the connection, and the server aborts the request."""

    def __init__(self, response: httpx.Response, call: Call):
        self.response = response
        self._decode = call.decoder() if call.decoder else (lambda e: e)

    def __iter__(self) -> Iterator[T]:
        try:
            for payload in _core.sse_data(self.response.iter_lines()):
                item = self._decode(_core.event_json(payload))
                if item is not None:
                    yield item
        except httpx.TimeoutException as exc:
            raise APITimeoutError(f"the stream timed out: {exc}") from exc
        except httpx.TransportError as exc:
            raise APIConnectionError(f"the stream broke: {exc}") from exc
        finally:
            self.close()

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> "Stream[T]":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.response.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class Client(ClientMethods):
    """A blocking client for one sglserve server. Its calls (chat, complete, generate, run,
    models, health, ready, server_info, stream_token, submit, job, cancel_job) are in
    `ClientMethods`; streamed ones answer a `Stream`.

    >>> client = Client("http://localhost:8000")          # doctest: +SKIP
    >>> client.chat("Hello!", max_tokens=8).text           # doctest: +SKIP
    """

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
        transport: httpx.BaseTransport | None = None,
    ):
        super().__init__(base_url, api_key, model, retry, max_retries, job_wait_timeout_s)
        self._http = httpx.Client(**self._http_options(timeout_s, connect_timeout_s, headers, transport))

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- jobs --------------------------------------------------------------------------------

    def wait(self, job_id: str, timeout: float | None = None, *, poll_interval_s: float = 0.5,
             on_poll: Callable[[Job], None] | None = None) -> Job:
        """Poll a job until it ends. Raises JobTimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for delay in _core.poll_delays(poll_interval_s):
            job = self.job(job_id)
            if on_poll is not None:
                on_poll(job)
            if job.done:
                return job
            _core.past_deadline(job, deadline, time.monotonic(), delay, timeout)
            time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover - poll_delays never ends

    # -- plumbing ----------------------------------------------------------------------------

    def _default_model(self) -> str:
        if self.model is None:
            self.model = self.models()[0].id
        return self.model

    def _call(self, call: Call) -> Any:
        if call.needs_model:
            call.body["model"] = self._default_model()  # type: ignore[index]
        response = self._send(call)
        if call.stream:
            return Stream(response, call)
        if _core.is_job_answer(call, response):
            return _core.job_result(call, self.wait(response.json()["id"], self.job_wait_timeout_s))
        return call.parse(response.json())

    def _send(self, call: Call) -> httpx.Response:
        """Send with retries; returns a successful response (streamed ones still open)."""
        request = self._http.build_request(call.method, call.path, json=call.body, headers=call.headers)
        attempt = 0
        while True:
            try:
                response = self._http.send(request, stream=True)
                if not call.stream or response.status_code >= 400:
                    try:
                        response.read()
                    finally:
                        response.close()
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
            time.sleep(delay)
            attempt += 1
