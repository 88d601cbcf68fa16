"""Closed-loop HTTP load that records what every client saw, for fault-injection runs.

Used by tests/chaos (in CI) and bench/chaos.py / bench/soak.py (longer runs). Each worker thread
sends one request after another (non-streamed or streamed `/v1/completions`, or a mix) until told
to stop, and records an `Outcome` per request: HTTP status, the error's OpenAI-shaped body, the
Retry-After header, or an error event inside a stream. Summaries count what the issue counts:
lost requests, 5xx seen, 500s (never acceptable), and the time from a fault to the next success.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

MODEL = "sglserve/tiny-llama"


@dataclass
class Outcome:
    kind: str  # "completion" (non-streamed) | "stream" | whatever a custom sender names
    started: float  # time.monotonic()
    ended: float
    status: int | None  # None: the connection failed (no HTTP response)
    error: dict[str, Any] | None = None  # OpenAI's {"message","type","param","code"}, if any
    retry_after: str | None = None
    transport_error: str | None = None
    mid_stream_error: bool = False  # an error event after the stream had started

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.transport_error is None

    @property
    def is_500(self) -> bool:
        """An internal error (HTTP 500-599 other than 503, or an internal_error event in a stream)."""
        if self.status is not None and self.status >= 500 and self.status != 503:
            return True
        return self.error is not None and (self.error.get("type") == "internal_error" or self.error.get("code") == 500)

    @property
    def is_503_without_retry_after(self) -> bool:
        return self.status == 503 and not self.retry_after

    @property
    def well_shaped(self) -> bool:
        """Failures must carry OpenAI's error shape (transport failures have no body at all)."""
        if self.ok or self.transport_error is not None:
            return True
        return self.error is not None and {"message", "type", "param", "code"} <= set(self.error)


def completion_body(max_tokens: int, stream: bool, prompt: str = "Once upon a time") -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}


def send_completion(client: httpx.Client, base: str, body: dict[str, Any]) -> Outcome:
    """One /v1/completions request, streamed or not, and what its client saw."""
    kind = "stream" if body.get("stream") else "completion"
    started = time.monotonic()
    try:
        if not body.get("stream"):
            r = client.post(f"{base}/v1/completions", json=body)
            error = _error_of(r.text) if r.status_code != 200 else None
            return Outcome(kind, started, time.monotonic(), r.status_code, error, r.headers.get("retry-after"))
        with client.stream("POST", f"{base}/v1/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                return Outcome(kind, started, time.monotonic(), r.status_code, _error_of(r.text),
                               r.headers.get("retry-after"))
            error, done, events = None, False, 0
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    error = event["error"]
                else:
                    events += 1
            if error is None and not done:
                error = {"message": "the stream ended without [DONE]", "type": "truncated", "param": None,
                         "code": None}
            return Outcome(kind, started, time.monotonic(), 200, error, mid_stream_error=error is not None and events > 0)
    except httpx.HTTPError as e:
        return Outcome(kind, started, time.monotonic(), None, transport_error=f"{type(e).__name__}: {e}")


def _error_of(text: str) -> dict[str, Any] | None:
    try:
        body = json.loads(text)
    except ValueError:
        return {"message": text[:200], "type": "not_json"}  # not OpenAI's shape: well_shaped is False
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {"message": text[:200], "type": "not_openai_shape"}


Sender = Callable[[httpx.Client, int], Outcome]  # (client, worker index) -> what happened


def mixed_sender(base: str, max_tokens: int = 24, streamed_every: int = 2) -> Sender:
    """Workers whose index is a multiple of `streamed_every` stream; the others do not."""

    def send(client: httpx.Client, worker: int) -> Outcome:
        stream = streamed_every > 0 and worker % streamed_every == 0
        return send_completion(client, base, completion_body(max_tokens, stream))

    return send


@dataclass
class ClosedLoopLoad:
    """`concurrency` threads, each sending `send(client, worker)` back to back until `stop()`."""

    send: Sender
    concurrency: int
    timeout_s: float = 120.0
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._worker, args=(i,), daemon=True)
                         for i in range(self.concurrency)]

    def start(self) -> "ClosedLoopLoad":
        for t in self._threads:
            t.start()
        return self

    def stop(self, join_timeout_s: float = 180.0) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(join_timeout_s)
        assert not any(t.is_alive() for t in self._threads), "a load worker did not finish"
        return self.snapshot()

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def _worker(self, worker: int) -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                outcome = self.send(client, worker)
                with self._lock:
                    self.outcomes.append(outcome)

    def successes_after(self, t: float) -> int:
        return sum(1 for o in self.snapshot() if o.ok and o.started >= t)

    def wait_for_successes_after(self, t: float, count: int, timeout_s: float) -> bool:
        """Bounded poll: True once `count` requests STARTED after `t` have succeeded."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.successes_after(t) >= count:
                return True
            time.sleep(0.05)
        return False


def summarize(outcomes: list[Outcome], fault_at: float | None = None) -> dict[str, Any]:
    """Counts over a run; with `fault_at`, also the time from the fault to the next success started
    after it (how long clients could not be served)."""
    failed = [o for o in outcomes if not o.ok]
    summary: dict[str, Any] = {
        "requests": len(outcomes),
        "ok": len(outcomes) - len(failed),
        "lost": len(failed),
        "lost_completion": sum(1 for o in failed if o.kind == "completion"),
        "lost_stream": sum(1 for o in failed if o.kind == "stream"),
        "http_5xx": sum(1 for o in outcomes if o.status is not None and o.status >= 500),
        "http_503": sum(1 for o in outcomes if o.status == 503),
        "internal_500": sum(1 for o in outcomes if o.is_500),
        "503_without_retry_after": sum(1 for o in outcomes if o.is_503_without_retry_after),
        "mid_stream_errors": sum(1 for o in outcomes if o.mid_stream_error),
        # A stream that failed before its first token must get the error as its HTTP status (503 +
        # Retry-After, 4xx), never a 200 whose only event is the error.
        "error_events_before_first_token": sum(1 for o in outcomes if o.status == 200 and o.error is not None
                                               and not o.mid_stream_error and o.error.get("type") != "truncated"),
        "transport_errors": sum(1 for o in outcomes if o.transport_error),
        "badly_shaped": sum(1 for o in outcomes if not o.well_shaped),
        "error_codes": sorted({str((o.error or {}).get("code")) for o in failed if o.error}),
        "examples": [f"{o.kind} {o.status} {o.transport_error or (o.error or {}).get('message', '')}"[:160]
                     for o in failed[:3]],
    }
    if fault_at is not None:
        after = sorted(o.ended for o in outcomes if o.ok and o.started >= fault_at)
        summary["recovery_s"] = round(after[0] - fault_at, 3) if after else None
        # In flight at the fault vs sent after it (what a dead Ingress may lose vs what it must not).
        summary["lost_in_flight_at_fault"] = sum(1 for o in failed if o.started < fault_at)
        summary["lost_sent_after_fault"] = sum(1 for o in failed if o.started >= fault_at)
    return summary


@dataclass
class FaultRun:
    name: str
    fault_at: float
    recovered_at: float
    outcomes: list[Outcome]
    summary: dict[str, Any]


def run_fault(base: str, name: str, inject: Callable[[], None], recovered: Callable[[], bool], *,
              clients: int, deadline_s: float, after_recovery: int | None = None,
              sender: Sender | None = None) -> FaultRun:
    """Closed-loop load on `base`; once requests flow, `inject()` the fault; poll `recovered()`
    (bounded by `deadline_s`), then wait for `after_recovery` more successes and stop the load."""
    load = ClosedLoopLoad(sender or mixed_sender(base), clients).start()
    try:
        if not load.wait_for_successes_after(0.0, clients, deadline_s):
            raise AssertionError(f"{name}: no request succeeded before the fault")
        fault_at = time.monotonic()
        inject()
        deadline = time.monotonic() + deadline_s
        while not recovered():
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}: no recovery within {deadline_s} s")
            time.sleep(0.1)
        recovered_at = time.monotonic()
        if not load.wait_for_successes_after(recovered_at, after_recovery or 2 * clients, deadline_s):
            raise AssertionError(f"{name}: requests did not succeed again after recovery")
    finally:
        outcomes = load.stop()
    return FaultRun(name, fault_at, recovered_at, outcomes, summarize(outcomes, fault_at))


def start_ray_serve_retrying(attempts: int = 3) -> int:
    """bench.common.start_ray_serve, tried again when Ray's fixed 30 s node start-up is missed (a
    busy shared machine): what tests/conftest.py does for the test cluster."""
    import ray

    from bench.common import start_ray_serve

    for attempt in range(attempts):
        try:
            return start_ray_serve()
        except Exception:
            ray.shutdown()
            if attempt == attempts - 1:
                raise
            time.sleep(5)
    raise AssertionError("unreachable")
