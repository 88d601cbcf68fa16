"""The queue-depth autoscaling policy, driven with Ray Serve's own AutoscalingContext objects."""

from __future__ import annotations

from ray.serve._private.common import DeploymentID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from app.autoscaling import queue_depth_policy, wanted_replicas

CONFIG = AutoscalingConfig(
    min_replicas=1, max_replicas=8, target_ongoing_requests=10, upscale_delay_s=5, downscale_delay_s=30
)


def context(now: float, current: int, handle_requests: float, engines: dict | None, state: dict) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=DeploymentID(name="ModelReplica", app_name="sglserve"),
        deployment_name="ModelReplica",
        app_name="sglserve",
        current_num_replicas=current,
        target_num_replicas=current,
        running_replicas=[],
        total_num_requests=handle_requests,
        total_queued_requests=0.0,
        aggregated_metrics=engines,
        raw_metrics=None,
        capacity_adjusted_min_replicas=CONFIG.min_replicas,
        capacity_adjusted_max_replicas=CONFIG.max_replicas,
        policy_state=state,
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=now,
        config=CONFIG,
    )


def test_wanted_replicas_is_demand_over_target_clipped():
    assert wanted_replicas(0, 10, 1, 8) == 1
    assert wanted_replicas(25, 10, 1, 8) == 3
    assert wanted_replicas(500, 10, 1, 8) == 8


def test_scales_up_only_after_the_upscale_delay():
    state: dict = {}
    replicas = 1
    decisions = []
    for t in range(0, 8):
        replicas, state = queue_depth_policy(context(float(t), replicas, 35.0, None, state))
        decisions.append(replicas)
    assert decisions[:5] == [1] * 5  # t = 0..4: wanted 4, waiting out the 5 s delay
    assert decisions[5:] == [4, 4, 4]


def test_engine_reported_queue_counts_as_demand():
    engines = {"engine_running": {"a": 10.0}, "engine_waiting": {"a": 40.0}}
    replicas, state = queue_depth_policy(context(0.0, 1, 2.0, engines, {}))
    replicas, state = queue_depth_policy(context(6.0, replicas, 2.0, engines, state))
    assert replicas == 5  # 50 requests in the engine / 10 per replica


def test_scales_down_after_the_longer_delay_and_a_burst_resets_the_clock():
    state: dict = {}
    replicas = 4
    replicas, state = queue_depth_policy(context(0.0, replicas, 0.0, None, state))
    replicas, state = queue_depth_policy(context(20.0, replicas, 0.0, None, state))
    assert replicas == 4  # wants 1 but waits 30 s
    replicas, state = queue_depth_policy(context(25.0, replicas, 40.0, None, state))  # a burst
    replicas, state = queue_depth_policy(context(40.0, replicas, 0.0, None, state))
    assert replicas == 4  # the quiet clock restarted at t=40
    replicas, state = queue_depth_policy(context(71.0, replicas, 0.0, None, state))
    assert replicas == 1
