"""`Client`: the blocking SDK. `AsyncClient` (aio.py) has the same methods, awaited."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import httpx

from . import _core
from ._core import Call, RetryPolicy
from .errors import APIConnectionError, APITimeoutError, JobFailedError, JobTimeoutError
from .types import Job, Model

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


class Client:
    """A blocking client for one sglserve server.

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
        self.base_url = _core.resolve_base_url(base_url)
        self.api_key = _core.resolve_api_key(api_key)
        self.model = model
        self.retry = retry or RetryPolicy(max_retries=max_retries)
        self.job_wait_timeout_s = job_wait_timeout_s
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=_core.default_headers(self.api_key, headers),
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            transport=transport,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- generation --------------------------------------------------------------------------

    def chat(self, messages: Any, *, model: str | None = None, stream: bool = False,
             system: str | None = None, **params: Any) -> Any:
        """Chat completion. `messages`: a string (one user turn) or OpenAI's message list;
        `params`: any OpenAI/SGLang field (max_tokens, temperature, stop, ...)."""
        return self._call(_core.chat_call(self._model(model), messages, stream, system, params))

    def complete(self, prompt: Any, *, model: str | None = None, stream: bool = False, **params: Any) -> Any:
        """Text completion (OpenAI's /v1/completions)."""
        return self._call(_core.complete_call(self._model(model), prompt, stream, params))

    def generate(self, text: Any, *, stream: bool = False, sampling_params: dict[str, Any] | None = None,
                 **params: Any) -> Any:
        """SGLang's native /generate. Streamed increments carry only the new text."""
        return self._call(_core.generate_call(text, stream, sampling_params, params))

    def run(self, script: Any, *, stream: bool = False, sampling: dict[str, Any] | None = None,
            arguments: dict[str, Any] | None = None, **variables: Any) -> Any:
        """Run a whole program with /run; keyword arguments become its variables (use
        `arguments=` for names that clash with this method's own)."""
        return self._call(_core.run_call(script, stream, {**(arguments or {}), **variables}, sampling))

    # -- information -------------------------------------------------------------------------

    def models(self) -> list[Model]:
        return self._call(_core.models_call())

    def health(self) -> dict[str, Any]:
        return self._call(_core.get_call("/health"))

    def ready(self) -> dict[str, Any]:
        return self._call(_core.get_call("/ready"))

    def server_info(self) -> dict[str, Any]:
        return self._call(_core.get_call("/server_info"))

    def stream_token(self) -> dict[str, Any]:
        """A short-lived signed token for `GET /stream` (browsers' EventSource)."""
        return self._call(_core.stream_token_call())

    # -- jobs --------------------------------------------------------------------------------

    def submit(self, path: str, body: dict[str, Any], *, callback_url: str | None = None,
               max_wait_s: float | None = None) -> Job:
        """Submit a request as an asynchronous job (POST /v1/jobs)."""
        return self._call(_core.submit_call(path, body, callback_url, max_wait_s))

    def job(self, job_id: str) -> Job:
        return self._call(_core.job_call(job_id))

    def cancel_job(self, job_id: str) -> Job:
        return self._call(_core.cancel_job_call(job_id))

    def wait(self, job_id: str, timeout: float | None = None, *, poll_interval_s: float = 0.5,
             on_poll: Callable[[Job], None] | None = None) -> Job:
        """Poll a job until it ends. Raises JobTimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll_interval_s
        while True:
            job = self.job(job_id)
            if on_poll is not None:
                on_poll(job)
            if job.done:
                return job
            if deadline is not None and time.monotonic() + delay > deadline:
                raise JobTimeoutError(f"job {job_id} is still {job.status} after {timeout}s", job)
            time.sleep(delay)
            delay = min(delay * 1.5, 5.0)

    # -- plumbing ----------------------------------------------------------------------------

    def _model(self, model: str | None) -> str:
        if model is None and self.model is None:
            self.model = self.models()[0].id
        return model or self.model  # type: ignore[return-value]

    def _call(self, call: Call) -> Any:
        response = self._send(call)
        if call.stream:
            return Stream(response, call)
        if _core.is_job_answer(call, response):
            return self._job_result(call, response.json()["id"])
        return call.parse(response.json())

    def _job_result(self, call: Call, job_id: str) -> Any:
        job = self.wait(job_id, self.job_wait_timeout_s)
        if job.status != "succeeded":
            raise JobFailedError(f"job {job_id} ended {job.status}: {job.error}", job)
        return call.parse(job.result)

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
