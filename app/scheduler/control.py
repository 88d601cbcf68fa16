"""Adaptive in-flight limit per replica: a feedback controller that aims at the latency SLOs.

More requests in flight on a replica mean bigger batches: more throughput, but slower decode
steps (ITL) and longer waits for prefill (TTFT). The controller finds the largest limit that keeps
p95 TTFT and p95 ITL within their SLOs, and follows it when the workload changes.

Control law (evaluated once per window of `window` completed requests):

    pressure p = max(p95(TTFT) / slo_ttft_ms, p95(ITL) / slo_itl_ms)

    p > 1               (SLO broken)   L <- max(min_limit, floor(L * max(beta, 1 / p)))
    p < 1 - band        (headroom)     L <- min(max_limit, L + max(1, round(alpha * L * (1 - p))))
                                       only if the window saw in-flight >= L - 1 (the limit bound)
    otherwise           (in the band)  L unchanged

Multiplicative decrease proportional to the violation (at most by `beta`, default halving) backs
off at once when an SLO breaks; the increase is proportional to the remaining headroom, so steps
shrink as p approaches 1 and the limit settles inside the band [1 - band, 1] instead of
oscillating around the SLO like plain AIMD. The limit only grows when it is actually the bound on
concurrency, so a lightly loaded replica does not accumulate a huge limit it never tested.
Each window uses only its own samples: a decision reflects the latency the current limit caused.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.config import AppSettings
    from app.protocol import GenerateOutput
    from app.scheduler.admission import AdmissionQueue


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


class AdaptiveConcurrency:
    def __init__(
        self,
        slo_ttft_ms: float,
        slo_itl_ms: float,
        min_limit: int = 1,
        max_limit: int = 256,
        initial: int = 8,
        *,
        window: int = 32,
        band: float = 0.1,
        alpha: float = 0.5,
        beta: float = 0.5,
    ) -> None:
        if slo_ttft_ms <= 0 or slo_itl_ms <= 0:
            raise ValueError(f"SLOs must be > 0 ms, got ttft={slo_ttft_ms} itl={slo_itl_ms}")
        if not 1 <= min_limit <= max_limit:
            raise ValueError(f"need 1 <= min_limit <= max_limit, got {min_limit}, {max_limit}")
        if not 0 < band < 1 or not 0 < alpha or not 0 < beta < 1 or window < 1:
            raise ValueError("need 0 < band < 1, alpha > 0, 0 < beta < 1, window >= 1")
        self.slo_ttft_ms = slo_ttft_ms
        self.slo_itl_ms = slo_itl_ms
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.window = window
        self.band = band
        self.alpha = alpha
        self.beta = beta
        self._limit = min(max_limit, max(min_limit, initial))
        self._ttft: list[float] = []
        self._itl: list[float] = []
        self._samples = 0
        self._peak_in_flight = 0
        self.last_pressure: float | None = None
        self.history: list[tuple[int, float]] = []  # (limit after, pressure) per window

    @property
    def limit(self) -> int:
        return self._limit

    def observe(self, ttft_ms: float | None, itl_ms: float | None, in_flight: int | None = None) -> None:
        """One completed request: its TTFT and mean ITL (None when unknown, e.g. 1 token), and
        optionally the replica's in-flight count when it finished (None: assume saturated)."""
        if ttft_ms is not None:
            self._ttft.append(ttft_ms)
        if itl_ms is not None:
            self._itl.append(itl_ms)
        self._peak_in_flight = max(self._peak_in_flight, self._limit if in_flight is None else in_flight)
        self._samples += 1
        if self._samples >= self.window:
            self._adjust()

    def _adjust(self) -> None:
        pressure = 0.0
        if self._ttft:
            pressure = max(pressure, _p95(self._ttft) / self.slo_ttft_ms)
        if self._itl:
            pressure = max(pressure, _p95(self._itl) / self.slo_itl_ms)
        limit = self._limit
        if pressure > 1.0:
            limit = max(self.min_limit, math.floor(limit * max(self.beta, 1.0 / pressure)))
        elif pressure < 1.0 - self.band and self._peak_in_flight >= limit - 1:
            step = max(1, round(self.alpha * limit * (1.0 - pressure)))
            limit = min(self.max_limit, limit + step)
        self._limit = limit
        self.last_pressure = pressure
        self.history.append((limit, pressure))
        del self.history[:-1000]
        self._ttft.clear()
        self._itl.clear()
        self._samples = 0
        self._peak_in_flight = 0

    def stats(self) -> dict[str, Any]:
        return {"limit": self._limit, "pressure": self.last_pressure}


class InFlightLimits:
    """Adaptive batching: one feedback controller per replica (app.scheduler.control) sets how many
    requests that replica should have in flight to hold the p95 TTFT/ITL SLOs; the admission queue's
    concurrency is the sum over replicas seen recently. A replica is known once it has served a
    request; one silent for `forget_after_s` (gone, or scaled down) no longer counts.

    A new controller starts at the engine's batch capacity (`engine.max_running_requests`, within
    the min/max limits): the engine is built to run that many at once, and the controller backs
    off at once if the SLOs break. Starting low instead throttled every cold start: at 32 clients
    and a start of 16, half of them queued here until 64 requests had completed."""

    forget_after_s = 60.0

    def __init__(self, admission: AdmissionQueue, settings: AppSettings):
        self.admission = admission
        self.cfg = settings.scheduler
        self.max_limit = max(self.cfg.min_in_flight_per_replica, self.cfg.max_in_flight_per_replica)
        self.initial_limit = min(max(self.cfg.min_in_flight_per_replica, settings.engine.max_running_requests),
                                 self.max_limit)
        self.controllers: dict[str, AdaptiveConcurrency] = {}
        self.last_seen: dict[str, float] = {}

    def observe(self, out: GenerateOutput, admitted_at: float, finished_at: float | None = None) -> None:
        """One finished request: the final output (replica, first token time, tokens), when its
        slot was granted and when it finished (now if not given; releases arrive batched)."""
        self.observe_finished(out.served_by, out.first_token_time, out.completion_tokens, admitted_at, finished_at)

    def observe_finished(self, replica: str | None, first_token_time: float | None, completion_tokens: int,
                         admitted_at: float, finished_at: float | None = None) -> None:
        """`observe` from plain values (the scheduler's release path: no output object to build)."""
        if replica is None or first_token_time is None or completion_tokens == 0:
            return
        now = time.time() if finished_at is None else finished_at
        ttft_ms = max(0.0, first_token_time - admitted_at) * 1000
        decoded = completion_tokens - 1
        itl_ms = (now - first_token_time) * 1000 / decoded if decoded > 0 else None
        controller = self.controllers.get(replica)
        if controller is None:
            controller = self.controllers[replica] = AdaptiveConcurrency(
                self.cfg.slo_ttft_ms,
                self.cfg.slo_itl_ms,
                min_limit=self.cfg.min_in_flight_per_replica,
                max_limit=self.max_limit,
                initial=self.initial_limit,
            )
        per_replica = self.admission.in_flight // max(1, len(self.controllers))  # an estimate
        controller.observe(ttft_ms, itl_ms, in_flight=per_replica)
        self.last_seen[replica] = now
        for gone in [r for r, t in self.last_seen.items() if now - t > self.forget_after_s]:
            del self.last_seen[gone], self.controllers[gone]
        total = sum(c.limit for c in self.controllers.values())
        self.admission.set_max_concurrent(max(1, min(self.cfg.max_concurrent, total)))

    def stats(self) -> dict[str, Any]:
        return {replica: c.limit for replica, c in self.controllers.items()}
