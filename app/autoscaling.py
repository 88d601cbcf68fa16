"""Replica autoscaling on queue depth: a Ray Serve custom autoscaling policy for ModelReplica.

Configure it on the deployment (serve_config.yaml):

    autoscaling_config:
      min_replicas: 1
      max_replicas: 8
      target_ongoing_requests: 16      # requests one replica should hold (running + waiting)
      upscale_delay_s: 5
      downscale_delay_s: 60
      policy:
        policy_function: app.autoscaling:queue_depth_policy

The signal is the demand on the replicas: the larger of what Serve's handles count (ongoing and
queued requests) and what the engines themselves report (`record_autoscaling_stats`: running +
waiting, which also counts work that entered an engine through other paths). Wanted replicas =
ceil(demand / target_ongoing_requests), clipped to the capacity-adjusted bounds. A change is made
only after it has been wanted continuously for upscale_delay_s (up) or downscale_delay_s (down),
so a burst does not flap the replica count. On a cluster, new GPU replicas that do not fit make
Ray's autoscaler add GPU nodes.
"""

from __future__ import annotations

import math
from typing import Any

DEFAULT_TARGET_ONGOING = 16.0


def engine_demand(aggregated_metrics: dict[str, dict[Any, float]] | None) -> float:
    """Running + waiting requests over all replicas, as their engines report them."""
    if not aggregated_metrics:
        return 0.0
    running = aggregated_metrics.get("engine_running", {})
    waiting = aggregated_metrics.get("engine_waiting", {})
    return float(sum(running.values()) + sum(waiting.values()))


def wanted_replicas(demand: float, target_ongoing: float, lower: int, upper: int) -> int:
    wanted = math.ceil(demand / target_ongoing) if demand > 0 else lower
    return max(lower, min(upper, wanted))


def queue_depth_policy(ctx) -> tuple[int, dict[str, Any]]:
    """Ray Serve policy function: (target replicas, state kept for the next call)."""
    config = ctx.config
    target_ongoing = float(getattr(config, "target_ongoing_requests", None) or DEFAULT_TARGET_ONGOING)
    up_delay = float(getattr(config, "upscale_delay_s", 5.0) or 0.0)
    down_delay = float(getattr(config, "downscale_delay_s", 60.0) or 0.0)
    now = ctx.current_time
    state = dict(ctx.policy_state or {})

    demand = max(float(ctx.total_num_requests), engine_demand(ctx.aggregated_metrics))
    wanted = wanted_replicas(
        demand, target_ongoing, ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    )
    current = ctx.target_num_replicas
    direction = "up" if wanted > current else "down" if wanted < current else "hold"
    if direction != state.get("direction"):
        state["direction"], state["since"] = direction, now  # the wish changed: restart its clock
    waited = now - state.get("since", now)
    decision = current
    if direction == "up" and waited >= up_delay:
        decision = wanted
    elif direction == "down" and waited >= down_delay:
        decision = wanted
    state["demand"] = demand
    if decision != current:
        state["direction"], state["since"] = "hold", now
        _record(ctx, current, decision)
    return decision, state


def _record(ctx, current: int, decision: int) -> None:
    try:
        from app.metrics import record_autoscaling_decision

        record_autoscaling_decision(ctx.app_name or ctx.deployment_name, current, decision)
    except Exception:  # noqa: BLE001 - metrics must never break scaling
        pass
