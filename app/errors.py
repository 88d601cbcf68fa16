"""Errors that reach the client, in OpenAI's shape.

Any layer (ingress, scheduler, replica, engine) raises an `APIError` subclass; Ray carries it
across deployment hops (it pickles), and the ingress renders it as
`{"error": {"message", "type", "param", "code"}}` with its HTTP status.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    status_code: int = 500
    error_type: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status_code: int | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status_code is not None:
            self.status_code = status_code
        self.headers = dict(headers or {})

    def __reduce__(self):
        # Keyword-only arguments do not survive default exception pickling; Ray needs them.
        return (
            _rebuild_error,
            (type(self), self.message, self.param, self.code, self.status_code, self.headers),
        )

    def to_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code if self.code is not None else self.status_code,
            }
        }


def _rebuild_error(cls, message, param, code, status_code, headers):
    return cls(message, param=param, code=code, status_code=status_code, headers=headers)


class InvalidRequestError(APIError):
    """400: the request is well-formed JSON but asks for something impossible."""

    status_code = 400
    error_type = "invalid_request_error"


class ValidationError(APIError):
    """422 by default: a field has the wrong type or value (or a grammar does not compile)."""

    status_code = 422
    error_type = "invalid_request_error"


class AuthenticationError(APIError):
    status_code = 401
    error_type = "authentication_error"


class PermissionDeniedError(APIError):
    status_code = 403
    error_type = "permission_error"


class NotFoundError(APIError):
    status_code = 404
    error_type = "not_found_error"


class PayloadTooLargeError(APIError):
    status_code = 413
    error_type = "invalid_request_error"


class RateLimitError(APIError):
    status_code = 429
    error_type = "rate_limit_error"


class OverloadedError(APIError):
    """503 with Retry-After: the queue is full or a request waited too long for admission."""

    status_code = 503
    error_type = "overloaded_error"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, code: str = "overloaded", **kw):
        headers = dict(kw.pop("headers", None) or {})
        headers.setdefault("Retry-After", str(max(1, int(round(retry_after_s)))))
        super().__init__(message, code=code, headers=headers, **kw)
        self.retry_after_s = float(headers["Retry-After"])


class EngineError(APIError):
    """500: the engine failed while serving the request."""

    status_code = 500
    error_type = "internal_error"


class RequestAbortedError(APIError):
    status_code = 499
    error_type = "aborted"


def unwrap_error(exc: BaseException) -> BaseException:
    """The original exception behind Ray's wrappers (RayTaskError keeps it as `.cause`)."""
    seen = 0
    while seen < 8 and getattr(exc, "cause", None) is not None and exc is not exc.cause:
        exc = exc.cause  # type: ignore[assignment]
        seen += 1
    return exc


class EngineUnavailableError(OverloadedError, EngineError):
    """503 + Retry-After: this replica's engine cannot serve right now (its process died and is
    restarting, it ran out of memory in a step, or the replica is draining). Nothing is wrong with
    the request: `retryable` tells the layer above to send it again (to this replica later, or to
    another one). Also an EngineError (the engine could not serve), but with 503, not 500."""

    retryable = True
    error_type = "overloaded_error"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, code: str = "engine_unavailable", **kw):
        super().__init__(message, retry_after_s=retry_after_s, code=code, **kw)


class EngineOutOfMemoryError(EngineUnavailableError):
    """503 + Retry-After: a step ran out of device or host memory; the engine freed the step's
    requests and goes on, so the same request may well fit a moment later."""

    def __init__(self, message: str, *, code: str = "engine_out_of_memory", **kw):
        super().__init__(message, code=code, **kw)
