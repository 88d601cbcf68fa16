"""Replica autoscaling on queue depth and TTFT: a Ray Serve custom autoscaling policy for ModelReplica.

Configure it on the ModelReplica deployment (serve_config.yaml; docs/autoscaling.md has the whole
story and the measured timeline):

    autoscaling_config:
      min_replicas: 0                  # 0: scale to zero when idle (the first request waits)
      max_replicas: 8
      target_ongoing_requests: 16      # requests one replica should hold (running + waiting)
      upscale_delay_s: 5               # Serve applies these two around the policy
      downscale_delay_s: 60
      policy:
        policy_function: app.autoscaling:ReplicaAutoscalingPolicy
        policy_kwargs: {ttft_slo_ms: 2000, startup_time_s: 60}

Signals, all pushed (no Prometheus round trip): Serve's own count of requests at the replicas and
queued in front of them (`ctx.total_num_requests`, `ctx.total_queued_requests`), and what each
replica reports through `record_autoscaling_stats` (`replica_signals`): its engine's running and
waiting requests, the p95 of its recent TTFTs and its recent completions per second.

Control law, evaluated every control-loop tick (R = target replicas, including those starting;
S = the replicas' start-up time, learned from observed raise -> running times, seeded by
startup_time_s):

    demand       N  = max(Serve's ongoing at replicas, engines' running + waiting) + Serve's queued
    trend        N' = dN/dt over >= 1 s, smoothed
    projected    P  = max(0, N + min(0, N') * S)   a draining backlog asks for no replica that
                                                   would arrive after it is gone
    queue law    R_q = ceil(P / target_ongoing_requests)
    rate law     when requests wait in the engines (saturated): mu = the best completions/s of a
                 replica (its capacity), arrivals = all completions/s + max(0, N');
                 R_q is capped at ceil(arrivals / mu + waiting / (mu * S)): replicas for the rate,
                 plus what drains today's backlog within one start-up time (0 if it already
                 drains), not one replica per
                 target_ongoing_requests of backlog (which over-scales after every load step)
    TTFT law     R_t = R + 1      if the worst replica's p95 TTFT > ttft_slo_ms, requests wait and
                                  the backlog is not draining (N' >= 0: a draining backlog's TTFT
                                  is its history, not a shortage)
    up           to max(R_q, R_t) if that is > R, unless replicas are starting (R > running):
                 then hold, counting them as capacity (no over-scaling on the backlog that builds
                 up while they start)
    down         to ceil(max(N, P) / (target_ongoing_requests * downscale_utilization)) if that
                 is < R and p95 TTFT <= ttft_slo_ms (the band between the two laws is hysteresis)

Serve then applies upscale_delay_s / downscale_delay_s (a wish must last that long), the
up/down-scaling factors and min/max_replicas; it also scales 0 -> 1 at once when a request arrives
for a deployment at zero (the "cold start fast path"), so `min_replicas: 0` works. On a cluster,
replicas that do not fit (num_gpus: 1) make Ray's autoscaler add GPU nodes; idle nodes are removed
after the cluster's idle timeout.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

DEFAULT_TARGET_ONGOING = 16.0
WINDOW_S = 10.0  # a replica's TTFT p95 and completion rate are over its last 10 s
STARTUP_EWMA_ALPHA = 0.5  # weight of the newest observed start-up time
_STATE_KEYS = ("raised_at", "raised_to", "startup_s", "mark", "slope", "demand", "projected", "by_rate", "ttft_p95_s",
               "law")


# -- what replicas push ---------------------------------------------------------------------------


class RecentRequests:
    """What a replica saw over the last `window_s`: its first tokens' latencies (TTFT) and its
    completions. Pushed with the replica's other autoscaling stats (`replica_signals`)."""

    def __init__(self, window_s: float = WINDOW_S, clock=time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._ttfts: deque[tuple[float, float]] = deque()
        self._finished: deque[float] = deque()
        self._since = clock()

    def first_token(self, ttft_s: float) -> None:
        self._ttfts.append((self._clock(), max(0.0, ttft_s)))

    def finished(self) -> None:
        self._finished.append(self._clock())

    def _trim(self) -> float:
        now = self._clock()
        horizon = now - self.window_s
        while self._ttfts and self._ttfts[0][0] < horizon:
            self._ttfts.popleft()
        while self._finished and self._finished[0] < horizon:
            self._finished.popleft()
        return now

    def ttft_p95_s(self) -> float:
        """0.0 when no first token came in the window (nothing to say about latency)."""
        self._trim()
        if not self._ttfts:
            return 0.0
        ordered = sorted(s for _, s in self._ttfts)
        return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]

    def ttft_samples(self) -> int:
        self._trim()
        return len(self._ttfts)

    def completions_per_s(self) -> float:
        now = self._trim()
        return len(self._finished) / max(1e-9, min(self.window_s, now - self._since))


def replica_signals(num_running: int, num_waiting: int, recent: RecentRequests) -> dict[str, float]:
    """The metrics a ModelReplica returns from `record_autoscaling_stats`."""
    return {
        "engine_running": float(num_running),
        "engine_waiting": float(num_waiting),
        "ttft_p95_s": recent.ttft_p95_s(),
        "ttft_samples": float(recent.ttft_samples()),
        "completions_per_s": recent.completions_per_s(),
    }


# -- reading the context ----------------------------------------------------------------------------


def engine_demand(aggregated_metrics: dict[str, dict[Any, float]] | None) -> float:
    """Running + waiting requests over all replicas, as their engines report them."""
    if not aggregated_metrics:
        return 0.0
    running = aggregated_metrics.get("engine_running", {})
    waiting = aggregated_metrics.get("engine_waiting", {})
    return float(sum(running.values()) + sum(waiting.values()))


def engine_waiting(aggregated_metrics: dict[str, dict[Any, float]] | None) -> float:
    return float(sum((aggregated_metrics or {}).get("engine_waiting", {}).values()))


def worst_ttft_p95_s(aggregated_metrics: dict[str, dict[Any, float]] | None) -> float | None:
    """The highest TTFT p95 among replicas that saw first tokens; None when none did."""
    metrics = aggregated_metrics or {}
    samples = metrics.get("ttft_samples", {})
    values = [p for rid, p in metrics.get("ttft_p95_s", {}).items() if samples.get(rid, 1.0) > 0]
    return max(values) if values else None


def demand_of(ctx) -> float:
    """Requests that need a replica now: at the replicas (Serve's count or the engines' own,
    whichever is larger) plus those queued in handles waiting for one."""
    queued = float(ctx.total_queued_requests or 0.0)
    at_replicas = max(0.0, float(ctx.total_num_requests) - queued)
    return max(at_replicas, engine_demand(ctx.aggregated_metrics)) + queued


def wanted_replicas(demand: float, target_ongoing: float, lower: int, upper: int) -> int:
    wanted = math.ceil(demand / target_ongoing) if demand > 0 else lower
    return max(lower, min(upper, wanted))


# -- the policy ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyParams:
    ttft_slo_ms: float = 2000.0  # keep equal to scheduler.slo_ttft_ms
    startup_time_s: float = 60.0  # first guess of raise -> running (node + weights); then learned
    downscale_utilization: float = 0.7  # scale down only if the rest would be <= 70% of target
    trend_interval_s: float = 1.0  # the demand's slope is measured over at least this long


class ReplicaAutoscalingPolicy:
    """Ray Serve class-callable policy: `policy_kwargs` become PolicyParams (see module docstring)."""

    def __init__(self, **params: float) -> None:
        self.params = PolicyParams(**params)

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        return decide(ctx, self.params)


def decide(ctx, params: PolicyParams) -> tuple[int, dict[str, Any]]:
    """One control-loop tick: (wanted replicas, state for the next tick). Serve applies the
    delays, factors and bounds to the result."""
    config = ctx.config
    target_ongoing = float(getattr(config, "target_ongoing_requests", None) or DEFAULT_TARGET_ONGOING)
    now = ctx.current_time if ctx.current_time is not None else time.time()
    target, running = ctx.target_num_replicas, ctx.current_num_replicas
    lower, upper = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    state = {k: v for k, v in (ctx.policy_state or {}).items() if k in _STATE_KEYS}
    _learn_startup_time(state, running, now, params)

    demand = demand_of(ctx)
    slope = _demand_slope(state, demand, now, params)
    # A backlog that drains (negative slope) is projected one start-up time ahead: it asks for
    # no replica that would arrive after it is gone.
    projected = max(0.0, demand + min(0.0, slope) * state["startup_s"])
    ttft = worst_ttft_p95_s(ctx.aggregated_metrics)
    slo_breached = ttft is not None and ttft > params.ttft_slo_ms / 1000.0
    by_queue = wanted_replicas(projected, target_ongoing, lower, upper)
    by_rate = rate_law(ctx.aggregated_metrics, running, slope, state["startup_s"])
    if by_rate is not None:  # saturated engines: the backlog is not capacity we need to keep
        by_queue = max(lower, min(by_queue, upper, by_rate))
    # A TTFT over the SLO while the backlog drains (slope < 0) is that backlog's history, not a
    # shortage: capacity already exceeds arrivals. Adding a replica then only over-scales.
    draining = slope < 0
    by_ttft = min(upper, target + 1) if slo_breached and not draining and engine_waiting(ctx.aggregated_metrics) > 0 else 0
    up = max(by_queue, by_ttft)
    state.update(demand=demand, projected=projected, ttft_p95_s=ttft, by_rate=by_rate)

    if up > target:
        if target > running:  # replicas on their way count as capacity: wait for them
            state["law"] = "hold: replicas starting"
            return target, state
        state.update(raised_at=now, raised_to=up, law="up: ttft" if by_ttft > by_queue else "up: queue")
        return up, state
    down = wanted_replicas(max(demand, projected), target_ongoing * params.downscale_utilization, lower, upper)
    if down < target and not slo_breached:
        state["law"] = "down"
        return down, state
    state["law"] = "hold"
    return target, state


def rate_law(metrics: dict | None, running: int, slope: float, startup_s: float) -> int | None:
    """Replicas for the arrival rate, when the engines are saturated (requests wait): a replica then
    completes at its capacity mu (the best recent completions/s of a replica: one that just started
    has not shown its capacity yet); arrivals = all completions/s + the demand's growth;
    need = ceil(arrivals / mu + backlog / (mu * startup_s)), the last term draining today's
    backlog within one start-up time. None when not saturated (mu unknown)."""
    per_replica = list((metrics or {}).get("completions_per_s", {}).values())
    completions = sum(per_replica)
    backlog = engine_waiting(metrics)
    if running <= 0 or completions <= 0 or backlog <= 0:
        return None
    mu = max(per_replica)
    arrivals = completions + max(0.0, slope)
    # A backlog that already drains (slope < 0) needs no replica of its own.
    drain = backlog / (mu * max(startup_s, 1.0)) if slope >= 0 else 0.0
    return math.ceil(arrivals / mu + drain)


def _demand_slope(state: dict[str, Any], demand: float, now: float, params: PolicyParams) -> float:
    """d(demand)/dt in requests/s, over at least trend_interval_s, smoothed (EWMA)."""
    mark = state.get("mark")
    if mark is None:
        state["mark"], state["slope"] = (now, demand), 0.0
    elif now - mark[0] >= params.trend_interval_s:
        fresh = (demand - mark[1]) / (now - mark[0])
        state["slope"] = 0.5 * state.get("slope", 0.0) + 0.5 * fresh
        state["mark"] = (now, demand)
    return state["slope"]


def _learn_startup_time(state: dict[str, Any], running: int, now: float, params: PolicyParams) -> None:
    state.setdefault("startup_s", params.startup_time_s)
    raised_to = state.get("raised_to")
    if raised_to is not None and running >= raised_to:
        observed = now - state["raised_at"]
        state["startup_s"] += STARTUP_EWMA_ALPHA * (observed - state["startup_s"])
        state["raised_to"] = None  # learned once per raise


_DEFAULT = ReplicaAutoscalingPolicy()


def queue_depth_policy(ctx) -> tuple[int, dict[str, Any]]:
    """The policy with default parameters, as a plain function (older configs name this)."""
    return _DEFAULT(ctx)


# -- scale from zero: the scheduler's side ----------------------------------------------------------------


async def first_item_within(stream, wait_s: float | None, rid: str):
    """Yield `stream`'s items; when `wait_s` is set (no replica was known live when the request
    was sent: min_replicas 0, all scaled away), its first item must come within `wait_s` while a
    replica starts, else 503 `queue_timeout` (the stream is cancelled). Serve's router holds the
    request meanwhile, and its wait is what makes Serve start a replica (cold-start fast path)."""
    from app.errors import OverloadedError

    iterator = stream.__aiter__()
    if wait_s is not None:
        try:
            first = await asyncio.wait_for(iterator.__anext__(), wait_s)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            cancel = getattr(stream, "cancel", None)
            if cancel is not None:
                cancel()
            raise OverloadedError(
                f"request {rid} waited {wait_s:g} s for a model replica to start (scaling from zero)",
                code="queue_timeout", retry_after_s=wait_s,
            ) from None
        yield first
    async for item in iterator:
        yield item
