"""What the sync and async clients share: request specs, the retry rule, SSE decoding.

The two clients only do I/O and sleep; everything that decides something lives here, once.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx

from .errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    JobFailedError,
    JobTimeoutError,
    error_from_body,
    parse_retry_after,
)
from .types import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    GenerateChunk,
    GenerateResult,
    Job,
    Model,
    RunEvent,
    RunResult,
)

T = TypeVar("T")
DEFAULT_BASE_URL = "http://localhost:8000"
API_KEY_ENV = "SGLSERVE_API_KEY"
BASE_URL_ENV = "SGLSERVE_BASE_URL"
RETRY_STATUSES = (429, 503)  # refused before any work was done: safe to send again
# Errors raised before a single byte of the request left: the server cannot have executed it.
NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries with exponential backoff and full jitter; a server's Retry-After is a floor."""

    max_retries: int = 3
    backoff_s: float = 0.5  # first backoff ceiling; doubles per attempt
    max_backoff_s: float = 20.0
    max_retry_after_s: float = 60.0  # a longer Retry-After is not waited for: the error is raised

    def delay_s(self, attempt: int, retry_after_s: float | None) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None to give up."""
        if attempt >= self.max_retries:
            return None
        if retry_after_s is not None:
            if retry_after_s > self.max_retry_after_s:
                return None
            # Honour the server's time, plus a little jitter so that clients do not come back
            # in one wave.
            return retry_after_s + random.uniform(0, min(self.backoff_s, retry_after_s * 0.1 + 0.05))
        return random.uniform(0, min(self.max_backoff_s, self.backoff_s * (2**attempt)))


@dataclass
class Call(Generic[T]):
    """One API call: how to send it, whether it may be repeated, how to read the answer."""

    method: str
    path: str
    parse: Callable[[Any], T]
    body: dict[str, Any] | None = None
    stream: bool = False
    # Idempotent calls may be resent after the connection broke mid-request; others only when
    # the server provably did not execute them (not sent, or refused with 429/503).
    idempotent: bool = False
    decoder: Callable[[], Callable[[dict[str, Any]], Any]] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # The answer IS a job (POST /v1/jobs): a 202 is the result, not a request turned into a job.
    returns_job: bool = False

    @property
    def needs_model(self) -> bool:
        """No model was named: the client fills in the server's first one before sending."""
        return self.body is not None and "model" in self.body and self.body["model"] is None


def poll_delays(first_s: float, max_s: float = 5.0) -> Iterator[float]:
    """Seconds between polls of a job: growing by half each time, up to `max_s`."""
    delay = first_s
    while True:
        yield delay
        delay = min(delay * 1.5, max_s)


def past_deadline(job: Job, deadline: float | None, now: float, next_delay_s: float, timeout: float | None) -> None:
    """Raise JobTimeoutError when the next poll would land past the caller's deadline."""
    if deadline is not None and now + next_delay_s > deadline:
        raise JobTimeoutError(f"job {job.id} is still {job.status} after {timeout}s", job)


def job_result(call: Call, job: Job) -> Any:
    """The answer of a request that the server turned into a job, once the job ended."""
    if job.status != "succeeded":
        raise JobFailedError(f"job {job.id} ended {job.status}: {job.error}", job)
    return call.parse(job.result)


def retry_delay_for_status(policy: RetryPolicy, attempt: int, response: httpx.Response) -> float | None:
    if response.status_code not in RETRY_STATUSES:
        return None
    return policy.delay_s(attempt, parse_retry_after(response.headers.get("retry-after")))


def retry_delay_for_error(policy: RetryPolicy, attempt: int, call: Call, exc: Exception) -> float | None:
    if isinstance(exc, NOT_SENT_ERRORS) or (call.idempotent and isinstance(exc, httpx.TransportError)):
        return policy.delay_s(attempt, None)
    return None


def resolve_api_key(api_key: str | None) -> str | None:
    return api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None


def resolve_base_url(base_url: str | None) -> str:
    return (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")


def default_headers(api_key: str | None, extra: dict[str, str] | None) -> dict[str, str]:
    headers = {"user-agent": "sglserve-client/0.1"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    headers.update(extra or {})
    return headers


def error_from_response(response: httpx.Response) -> APIError:
    """The typed error for an error response whose body has been read."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return error_from_body(response.status_code, body, dict(response.headers))


def connection_error(call: Call, exc: Exception) -> APIConnectionError:
    kind = APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
    return kind(f"{call.method} {call.path}: {type(exc).__name__}: {exc}")


def is_job_answer(call: Call, response: httpx.Response) -> bool:
    """A long request the server turned into a job (issue 17): 202 with a job object."""
    if call.returns_job or response.status_code != 202:
        return False
    try:
        return response.json().get("object") == "job"
    except (ValueError, AttributeError):
        return False


# -- SSE -------------------------------------------------------------------------------------------

_ERROR_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "not_found_error": 404,
    "rate_limit_error": 429,
    "overloaded_error": 503,
    "timeout_error": 504,
}


DONE = object()  # the end of a stream: `data: [DONE]`


class SSEParser:
    """Line by line: `feed` returns an event's data when a blank line ends it, DONE at
    `data: [DONE]`, else None. Multi-line data is joined by newlines, as browsers do."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> Any:
        if line.startswith("data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(" ") else value)
            return None
        if line or not self._data:
            return None  # comments, other fields, or an empty event
        payload, self._data = "\n".join(self._data), []
        return DONE if payload == "[DONE]" else payload

    def end(self) -> Any:
        return self.feed("")


def sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The `data` of each server-sent event, up to [DONE]."""
    parser = SSEParser()
    for line in lines:
        payload = parser.feed(line)
        if payload is DONE:
            return
        if payload is not None:
            yield payload
    payload = parser.end()
    if payload is not None and payload is not DONE:
        yield payload


def event_json(payload: str) -> dict[str, Any]:
    """Parse one event; an error event mid-stream raises the typed error it describes."""
    event = json.loads(payload)
    if isinstance(event, dict) and isinstance(event.get("error"), dict):
        detail = event["error"]
        code = detail.get("code")
        status = code if isinstance(code, int) else _ERROR_TYPE_STATUS.get(detail.get("type"), 500)
        if "line" in detail:  # a script error found while the program ran: the server's 422
            status = 422
        raise error_from_body(status, event)
    return event


def parse_with(model: type[T]) -> Callable[[dict[str, Any]], T]:
    def decode(event: dict[str, Any]) -> T:
        return model.model_validate(event)  # type: ignore[attr-defined]

    return decode


def generate_decoder() -> Callable[[dict[str, Any]], GenerateChunk | None]:
    """/generate streams cumulative text per prompt index; hand out only the new piece."""
    seen: dict[int, int] = {}

    def decode(event: dict[str, Any]) -> GenerateChunk | None:
        index = int(event.get("index", 0))
        total = event.get("text", "")
        start = seen.get(index, 0)
        seen[index] = len(total)
        meta = event.get("meta_info") or {}
        if len(total) == start and not meta.get("finish_reason"):
            return None
        return GenerateChunk(text=total[start:], total_text=total, index=index, meta_info=meta)

    return decode


# -- the calls -------------------------------------------------------------------------------------


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def chat_call(model: str | None, messages: Any, stream: bool, system: str | None, extra: dict[str, Any]) -> Call:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    messages = list(messages)
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    body = {"model": model, "messages": messages, "stream": stream, **_drop_none(extra)}
    return Call("POST", "/v1/chat/completions", parse_with(ChatCompletion), body, stream,
                decoder=lambda: parse_with(ChatCompletionChunk))


def complete_call(model: str | None, prompt: Any, stream: bool, extra: dict[str, Any]) -> Call:
    body = {"model": model, "prompt": prompt, "stream": stream, **_drop_none(extra)}
    return Call("POST", "/v1/completions", parse_with(Completion), body, stream,
                decoder=lambda: parse_with(Completion))


def _parse_generate(answer: Any) -> GenerateResult | list[GenerateResult]:
    if isinstance(answer, list):
        return [GenerateResult.model_validate(item) for item in answer]
    return GenerateResult.model_validate(answer)


def generate_call(text: Any, stream: bool, sampling_params: dict[str, Any] | None, extra: dict[str, Any]) -> Call:
    body = {"text": text, "sampling_params": sampling_params or {}, "stream": stream, **_drop_none(extra)}
    return Call("POST", "/generate", _parse_generate, body, stream, decoder=generate_decoder)


def run_call(script: Any, stream: bool, variables: dict[str, Any], sampling: dict[str, Any] | None) -> Call:
    # The body field is `program` (the server also accepts it under that name only, today).
    body: dict[str, Any] = {"program": script, "arguments": variables, "stream": stream}
    if sampling:
        body["sampling"] = sampling
    return Call("POST", "/run", RunResult.model_validate, body, stream, decoder=lambda: parse_with(RunEvent))


def models_call() -> Call:
    return Call("GET", "/v1/models", lambda a: [Model.model_validate(m) for m in a["data"]], idempotent=True)


def get_call(path: str) -> Call:
    return Call("GET", path, lambda a: a, idempotent=True)


def submit_call(path: str, body: dict[str, Any], callback_url: str | None, max_wait_s: float | None) -> Call:
    payload = _drop_none({"path": path, "body": body, "callback_url": callback_url})
    headers = {} if max_wait_s is None else {"x-max-wait-s": str(max_wait_s)}
    return Call("POST", "/v1/jobs", Job.model_validate, payload, headers=headers, returns_job=True)


def job_call(job_id: str) -> Call:
    return Call("GET", f"/v1/jobs/{job_id}", Job.model_validate, idempotent=True)


def cancel_job_call(job_id: str) -> Call:
    # Cancelling twice is harmless: safe to resend.
    return Call("POST", f"/v1/jobs/{job_id}/cancel", Job.model_validate, {}, idempotent=True)


def stream_token_call() -> Call:
    # A token is only a signature; minting a second one changes nothing on the server.
    return Call("POST", "/v1/stream_tokens", lambda a: a, {}, idempotent=True)
