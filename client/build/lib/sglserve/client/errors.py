"""Typed exceptions mirroring the server's errors.

The server answers every error as `{"error": {"message", "type", "param", "code"}}` with its HTTP
status (`/run` script errors add `line` and `column`). `error_from_response` picks the class from
the status and, for 422s about a script, from the code, so callers can catch exactly what they
mean (`except NotFoundError`, `except ScriptSyntaxError as e: e.line`).
"""

from __future__ import annotations

from typing import Any


class SGLServeError(Exception):
    """Base class of every error this package raises."""


class APIConnectionError(SGLServeError):
    """The server could not be reached, or the connection broke before an answer came."""


class APITimeoutError(APIConnectionError):
    """The client's own timeout ran out."""


class APIError(SGLServeError):
    """The server answered with an error (HTTP status >= 400, or an error event mid-stream)."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        type: str | None = None,
        code: str | int | None = None,
        param: str | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.code = code
        self.param = param
        self.body = body
        self.headers = dict(headers or {})

    @property
    def request_id(self) -> str | None:
        return self.headers.get("x-request-id")

    def __str__(self) -> str:
        where = f" (param {self.param})" if self.param else ""
        return f"{self.status_code} {self.code or self.type}: {self.message}{where}"


class BadRequestError(APIError):
    """400: malformed JSON, an impossible request, a prompt longer than the context."""


class AuthenticationError(APIError):
    """401: no API key, or not a valid one."""


class PermissionDeniedError(APIError):
    """403."""


class NotFoundError(APIError):
    """404: unknown model, route or job."""


class PayloadTooLargeError(APIError):
    """413: the body or script is over the server's limit."""


class UnprocessableEntityError(APIError):
    """422: a field has the wrong type or value (`param` names it)."""


class ScriptError(UnprocessableEntityError):
    """422 from /run: the script is wrong at a known place (`line`, `column`, 1-based)."""

    def __init__(self, message: str, *, line: int | None = None, column: int | None = None, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.line = line
        self.column = column


class ScriptSyntaxError(ScriptError):
    """422 from /run: the script does not follow the grammar."""


class RateLimitError(APIError):
    """429: too many requests; `retry_after_s` says when to come back."""

    @property
    def retry_after_s(self) -> float | None:
        return parse_retry_after(self.headers.get("retry-after"))


class InternalServerError(APIError):
    """500 and other 5xx the server could not serve."""


class OverloadedError(InternalServerError):
    """503: the queue is full (or the server is starting); `retry_after_s` says when to retry."""

    @property
    def retry_after_s(self) -> float | None:
        return parse_retry_after(self.headers.get("retry-after"))


class GatewayTimeoutError(InternalServerError):
    """504: a program or function ran past its time limit on the server."""


class JobFailedError(SGLServeError):
    """A job ended failed or cancelled; `job` is its last state."""

    def __init__(self, message: str, job: Any):
        super().__init__(message)
        self.job = job


class JobTimeoutError(SGLServeError, TimeoutError):
    """`wait()` gave up before the job ended; `job` is its last state."""

    def __init__(self, message: str, job: Any):
        super().__init__(message)
        self.job = job


class WebhookVerificationError(SGLServeError):
    """A callback's signature, timestamp or headers are not valid."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: OverloadedError,
    504: GatewayTimeoutError,
}


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds: a number, or an HTTP date (seconds from now)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime
    from datetime import datetime, timezone

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def error_from_body(status_code: int, body: Any, headers: dict[str, str] | None = None) -> APIError:
    """The typed error for a status and an (OpenAI-shaped, or not) body."""
    detail = body.get("error") if isinstance(body, dict) else None
    if not isinstance(detail, dict):
        text = body if isinstance(body, str) else repr(body)
        detail = {"message": (text or f"HTTP {status_code}")[:2000]}
    fields = dict(
        status_code=status_code,
        type=detail.get("type"),
        code=detail.get("code"),
        param=detail.get("param"),
        body=body,
        headers=headers,
    )
    message = str(detail.get("message", ""))
    if status_code == 422 and ("line" in detail or str(detail.get("code", "")).startswith(("script", "syntax"))):
        cls = ScriptSyntaxError if detail.get("code") == "syntax_error" else ScriptError
        return cls(message, line=detail.get("line"), column=detail.get("column"), **fields)
    cls = _BY_STATUS.get(status_code) or (InternalServerError if status_code >= 500 else APIError)
    return cls(message, **fields)
