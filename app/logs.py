"""Structured logs: JSON lines, and one line per HTTP request.

- `JsonFormatter` renders any log record as one JSON object per line (`ts`, `level`, `logger`,
  `message`, then the record's `fields`). `configure_json_logging()` puts it on the `sglserve`
  logger of the process (stderr, which Ray keeps in the worker's log file under
  `/tmp/ray/session_latest/logs/`), so every `sglserve.*` logger writes JSON lines.
- `RequestTrace` follows one HTTP request through the ingress: the middleware starts it
  (`start_request_trace`), every sequence the request generates adds its numbers
  (`app.metrics.observe_sequence`), and when the response body has been sent (or the client went
  away) it counts the request in the metrics and writes ONE line to the `sglserve.requests`
  logger: request id (X-Request-Id, accepted and returned by the middleware), key id (the id the
  auth layer puts in `request.state.key_id`, never the key), tenant, method, endpoint, status,
  tokens, finish reasons and timings.
- PII: with `safety.redact_pii_in_logs` (on by default) a request line's free-text fields (the
  tenant, which may be a client's `user` field) pass through `app.safety.pii.redact`: e-mail
  addresses, phone and card numbers, ... become `[EMAIL]`, `[PHONE]`, `[CARD]`.
- Sampling: `request_log_sample_rate` of successful requests are logged, chosen by a hash of the
  request id (so a given id is always in or always out, across processes); with
  `request_log_errors` every request with status >= 400 is logged regardless.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from app.metrics import IngressMetrics, ObservabilitySettings, SequenceRecord, current_trace
from app.safety.pii import redact_fields

REQUEST_LOGGER = "sglserve.requests"
MAX_ID_CHARS = 128  # client-chosen ids are cut to this length in logs


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


def configure_json_logging(level: int = logging.INFO, stream: Any = None) -> logging.Logger:
    """Make every `sglserve.*` logger of this process write JSON lines (idempotent)."""
    logger = logging.getLogger("sglserve")
    if not any(getattr(h, "_sglserve_json", False) for h in logger.handlers):
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler._sglserve_json = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # Ray's root handler would print each line a second time
    return logger


def sampled(request_id: str, rate: float) -> bool:
    """Deterministic per request id: the same id is in (or out) everywhere."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    return zlib.crc32(request_id.encode("utf-8", "replace")) / 2**32 < rate


@dataclass
class RequestLogPolicy:
    enabled: bool = True
    sample_rate: float = 1.0
    always_log_errors: bool = True

    @classmethod
    def from_settings(cls, settings: ObservabilitySettings) -> "RequestLogPolicy":
        return cls(settings.request_log, settings.request_log_sample_rate, settings.request_log_errors)

    def should_log(self, request_id: str, status: int) -> bool:
        if not self.enabled:
            return False
        if status >= 400 and self.always_log_errors:
            return True
        return sampled(request_id, self.sample_rate)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


@dataclass
class RequestTrace:
    request_id: str
    method: str
    path: str
    received_s: float  # wall clock (time.time()), comparable with the engine's timestamps
    metrics: IngressMetrics | None
    policy: RequestLogPolicy
    state: Any = None  # the Starlette request.state (key_id / tenant are read at the end)
    scope: dict[str, Any] = field(default_factory=dict)
    sequences: list[SequenceRecord] = field(default_factory=list)
    done: bool = False

    def add_sequence(self, seq: SequenceRecord) -> None:
        self.sequences.append(seq)

    def finish(self, response: Any) -> Any:
        """Count and log the request once its body has gone out; returns the response."""
        body = getattr(response, "body_iterator", None)
        if body is None:
            self.complete(response.status_code, disconnected=False)
            return response
        response.body_iterator = self._watch(body, response.status_code)
        return response

    async def _watch(self, body: AsyncIterator[bytes], status: int) -> AsyncIterator[bytes]:
        sent_all = False
        try:
            async for chunk in body:
                yield chunk
            sent_all = True
        finally:
            self.complete(status, disconnected=not sent_all)

    def endpoint(self, status: int) -> str:
        route = self.scope.get("route")
        path = getattr(route, "path", None)
        if path:
            return path
        return "unmatched" if status == 404 else self.path  # unknown paths: one label, not one each

    def complete(self, status: int, disconnected: bool) -> None:
        """Count and log the request, once (a middleware that watches `send` calls this itself)."""
        if self.done:
            return
        self.done = True
        if self.metrics is not None:
            self.metrics.record_http(self.endpoint(status), status, getattr(self.state, "model_version", None))
        if self.policy.should_log(self.request_id, status):
            fields = self.log_fields(status, disconnected)
            if _redact_pii:
                fields = redact_fields(fields)
            logging.getLogger(REQUEST_LOGGER).info("request", extra={"fields": fields})

    def log_fields(self, status: int, disconnected: bool) -> dict[str, Any]:
        seqs = self.sequences
        first = min(seqs, key=lambda s: s.first_output_s or float("inf")) if seqs else None
        reasons: dict[str, int] = {}
        for s in seqs:
            reasons[s.finish_reason or "error"] = reasons.get(s.finish_reason or "error", 0) + 1
        return {
            "request_id": self.request_id[:MAX_ID_CHARS],
            "key_id": getattr(self.state, "key_id", None),
            "tenant": getattr(self.state, "tenant", None),
            "model_version": getattr(self.state, "model_version", None),  # canary (app/canary.py)
            "method": self.method,
            "endpoint": self.endpoint(status),
            "status": status,
            "client_disconnected": disconnected,
            "sequences": len(seqs),
            "prompt_tokens": sum(s.prompt_tokens for s in seqs),
            "completion_tokens": sum(s.completion_tokens for s in seqs),
            "cached_tokens": sum(s.cached_tokens for s in seqs),
            "finish_reasons": reasons,
            "ttft_ms": _ms(first.ttft_s) if first else None,
            "engine_ttft_ms": _ms(first.engine_ttft_s) if first else None,
            "ingress_to_engine_ms": _ms(first.ingress_to_engine_s) if first else None,
            "engine_to_ingress_ms": _ms(first.engine_to_ingress_s) if first else None,
            "duration_ms": _ms(time.time() - self.received_s),
        }


# The ingress process's policy and metrics, set by `configure_ingress_observability`.
_policy = RequestLogPolicy(enabled=False)
_metrics: IngressMetrics | None = None
_redact_pii = True


def configure_log_redaction(enabled: bool) -> None:
    """`safety.redact_pii_in_logs`: redact PII in request log lines (called by the ingress guard)."""
    global _redact_pii
    _redact_pii = enabled


def configure_ingress_observability(model_name: str, settings: ObservabilitySettings) -> None:
    """Call once in the Ingress constructor: metrics, JSON logging and the request-log policy."""
    from app.metrics import configure_ingress_metrics

    global _policy, _metrics
    _metrics = configure_ingress_metrics(model_name, settings)
    _policy = RequestLogPolicy.from_settings(settings)
    configure_json_logging()


def start_request_trace(request: Any) -> RequestTrace:
    """Call first in the HTTP middleware; `trace.finish(response)` on the way out."""
    trace = RequestTrace(
        request_id=request.state.request_id,
        method=request.method,
        path=request.url.path,
        received_s=time.time(),
        metrics=_metrics,
        policy=_policy,
        state=request.state,
        scope=request.scope,
    )
    current_trace.set(trace)
    return trace


__all__ = [
    "JsonFormatter",
    "RequestLogPolicy",
    "RequestTrace",
    "configure_ingress_observability",
    "configure_json_logging",
    "sampled",
    "start_request_trace",
]
