"""The autoscaling policy (app/autoscaling.py), driven with Ray Serve's own AutoscalingContext.

`serve_wrapped` composes the policy exactly as Ray Serve 2.60 does for every custom policy
(`_apply_autoscaling_config`: cold-start fast path, scaling factors, delays); the delays asserted
here are Serve's, applied around our control law.
"""

from __future__ import annotations

import asyncio

import pytest

from ray.serve._private.common import DeploymentID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from app.autoscaling import (
    PolicyParams,
    RecentRequests,
    ReplicaAutoscalingPolicy,
    decide,
    first_item_within,
    demand_of,
    queue_depth_policy,
    rate_law,
    replica_signals,
    wanted_replicas,
)
from app.errors import OverloadedError

CONFIG = AutoscalingConfig(
    min_replicas=0, max_replicas=8, target_ongoing_requests=10, upscale_delay_s=5, downscale_delay_s=30
)
PARAMS = PolicyParams(ttft_slo_ms=1000, startup_time_s=10)


def context(now: float, target: int, running: int | None = None, handle_requests: float = 0.0,
            queued: float = 0.0, engines: dict | None = None, state: dict | None = None,
            config: AutoscalingConfig = CONFIG) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=DeploymentID(name="ModelReplica", app_name="sglserve"),
        deployment_name="ModelReplica",
        app_name="sglserve",
        current_num_replicas=target if running is None else running,
        target_num_replicas=target,
        running_replicas=[],
        total_num_requests=handle_requests,
        total_queued_requests=queued,
        aggregated_metrics=engines,
        raw_metrics=None,
        capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas,
        policy_state=state or {},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=now,
        config=config,
    )


def engines(running: dict, waiting: dict, ttft: dict | None = None) -> dict:
    metrics = {"engine_running": running, "engine_waiting": waiting}
    if ttft is not None:
        metrics["ttft_p95_s"] = ttft
        metrics["ttft_samples"] = {rid: 5.0 for rid in ttft}
    return metrics


class FakeTime:
    """Serve's delay logic reads time.time(); the tests set it to the context's time."""

    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def serve_wrapped(monkeypatch):
    import ray.serve.autoscaling_policy as serve_policy

    clock = FakeTime()
    monkeypatch.setattr(serve_policy, "time", clock)
    wrapped = _apply_autoscaling_config(ReplicaAutoscalingPolicy(ttft_slo_ms=1000, startup_time_s=10))

    def call(ctx: AutoscalingContext):
        clock.now = ctx.current_time
        return wrapped(ctx)

    return call


# -- the laws, one tick ---------------------------------------------------------------------------------


def test_wanted_replicas_is_demand_over_target_clipped():
    assert wanted_replicas(0, 10, 1, 8) == 1
    assert wanted_replicas(25, 10, 1, 8) == 3
    assert wanted_replicas(500, 10, 1, 8) == 8


def test_demand_counts_engine_queues_and_requests_queued_in_handles():
    ctx = context(0.0, 1, handle_requests=12.0, queued=4.0, engines=engines({"a": 8.0}, {"a": 30.0}))
    assert demand_of(ctx) == 8 + 30 + 4  # the engines' 38 beat Serve's 8 at the replica; + 4 queued


def test_queue_law_scales_up_to_demand_over_target():
    replicas, state = decide(context(0.0, 1, engines=engines({"a": 10.0}, {"a": 25.0})), PARAMS)
    assert replicas == 4 and state["law"] == "up: queue"  # 35 requests / 10 per replica


def test_ttft_over_slo_adds_one_replica_even_when_the_queue_law_is_content():
    busy = engines({"a": 6.0, "b": 6.0}, {"a": 1.0, "b": 0.0}, ttft={"a": 2.5, "b": 0.4})
    replicas, state = decide(context(0.0, 2, engines=busy), PARAMS)
    assert replicas == 3 and state["law"] == "up: ttft"  # 13 requests fit 2 replicas; p95 2.5 s > 1 s


def test_ttft_over_slo_while_the_backlog_drains_adds_no_replica():
    state: dict = {}
    for t, waiting in ((0.0, 40.0), (1.0, 30.0), (2.0, 20.0)):  # draining 10/s: capacity > arrivals
        busy = engines({"a": 6.0, "b": 6.0}, {"a": waiting / 2, "b": waiting / 2}, ttft={"a": 4.0, "b": 4.0})
        replicas, state = decide(context(t, 4, engines=busy, state=state), PARAMS)
    assert replicas == 4 and state["slope"] < 0


def test_ttft_over_slo_without_waiting_requests_is_not_a_capacity_problem():
    slow_prefill = engines({"a": 3.0}, {"a": 0.0}, ttft={"a": 2.5})
    replicas, _ = decide(context(0.0, 1, engines=slow_prefill), PARAMS)
    assert replicas == 1


def test_holds_while_replicas_are_starting_however_deep_the_backlog():
    backlog = engines({"a": 10.0}, {"a": 90.0}, ttft={"a": 9.0})
    replicas, state = decide(context(0.0, 3, running=1, engines=backlog), PARAMS)
    assert replicas == 3 and state["law"] == "hold: replicas starting"


def test_a_draining_backlog_does_not_ask_for_more_replicas():
    state: dict = {}
    # The backlog falls from 60 to 40 in 2 s: -10/s; projected over the 10 s start-up: < 0.
    for t, queued in ((0.0, 60.0), (1.0, 50.0), (2.0, 40.0)):
        replicas, state = decide(context(t, 3, engines=engines({"a": 10.0}, {"a": queued}), state=state), PARAMS)
    assert replicas == 3 and state["slope"] < 0 and state["projected"] == 0


def test_scales_down_only_below_the_hysteresis_band_and_under_the_slo():
    at_band = engines({"a": 7.0, "b": 7.0}, {"a": 0.0, "b": 0.0})  # 14: fits 2 at 70% of 10, not 1
    assert decide(context(0.0, 3, engines=at_band), PARAMS)[0] == 2
    quiet = engines({"a": 1.0}, {"a": 0.0}, ttft={"a": 1.5})
    assert decide(context(0.0, 3, engines=quiet), PARAMS)[0] == 3  # TTFT over SLO: no scale-down


def test_start_up_time_is_learned_from_raise_to_running():
    _, state = decide(context(0.0, 1, engines=engines({"a": 10.0}, {"a": 25.0})), PARAMS)
    assert state["raised_to"] == 4
    _, state = decide(context(4.0, 4, running=4, engines=engines({"a": 10.0}, {"a": 0.0}), state=state), PARAMS)
    assert state["startup_s"] == 10 + 0.5 * (4.0 - 10)  # EWMA toward the observed 4 s


def test_the_plain_function_is_the_policy_with_default_parameters():
    replicas, _ = queue_depth_policy(context(0.0, 1, engines=engines({"a": 10.0}, {"a": 50.0})))
    assert replicas == 6  # 60 requests / the config's 10 per replica


# -- composed by Serve: delays, cold start -----------------------------------------------------------


def test_serve_applies_the_upscale_delay_around_the_policy(serve_wrapped):
    policy = serve_wrapped
    state: dict = {}
    replicas = 1
    decisions = []
    for t in range(0, 8):
        replicas, state = policy(context(float(t), replicas, engines=engines({"a": 10.0}, {"a": 25.0}), state=state))
        decisions.append(replicas)
    assert decisions[:5] == [1] * 5  # t = 0..4: wants 4, waits out the 5 s delay
    assert decisions[5:] == [4, 4, 4]


def test_serve_applies_the_downscale_delay_and_a_burst_restarts_its_clock(serve_wrapped):
    policy = serve_wrapped
    quiet, burst = engines({"a": 1.0}, {"a": 0.0}), engines({"a": 10.0}, {"a": 30.0})
    state: dict = {}
    replicas = 4
    replicas, state = policy(context(0.0, replicas, engines=quiet, state=state))
    replicas, state = policy(context(20.0, replicas, engines=quiet, state=state))
    assert replicas == 4  # wants 1 but waits 30 s
    replicas, state = policy(context(25.0, replicas, engines=burst, state=state))
    replicas, state = policy(context(40.0, replicas, engines=quiet, state=state))
    assert replicas == 4  # the quiet clock restarted at t=40
    replicas, state = policy(context(71.0, replicas, engines=quiet, state=state))
    assert replicas == 1


def test_scale_from_zero_is_immediate_when_a_request_waits_in_a_handle(serve_wrapped):
    policy = serve_wrapped
    replicas, _ = policy(context(0.0, 0, handle_requests=1.0, queued=1.0))
    assert replicas == 1  # Serve's cold-start fast path, no upscale delay
    replicas, _ = policy(context(0.0, 0))
    assert replicas == 0  # nothing waits: stays at zero


def test_scales_to_zero_when_idle_after_the_delay(serve_wrapped):
    policy = serve_wrapped
    idle = engines({"a": 0.0}, {"a": 0.0})
    replicas, state = policy(context(0.0, 1, engines=idle))
    assert replicas == 1
    replicas, state = policy(context(31.0, 1, engines=idle, state=state))
    assert replicas == 0


# -- what a replica pushes ---------------------------------------------------------------------------------


def test_recent_requests_reports_ttft_p95_and_completions_of_the_window_only():
    now = [0.0]
    recent = RecentRequests(window_s=10.0, clock=lambda: now[0])
    now[0] = 10.0
    for i in range(100):
        recent.first_token(0.01 * (i + 1))  # 10 ms .. 1 s
        recent.finished()
    assert recent.ttft_p95_s() == pytest.approx(0.95) and recent.ttft_samples() == 100
    assert recent.completions_per_s() == pytest.approx(10.0)  # 100 in the 10 s window
    now[0] = 21.0
    assert recent.ttft_p95_s() == 0.0 and recent.completions_per_s() == 0.0  # all older than 10 s
    assert replica_signals(3, 2, recent) == {"engine_running": 3.0, "engine_waiting": 2.0, "ttft_p95_s": 0.0,
                                             "ttft_samples": 0.0, "completions_per_s": 0.0}


# -- the rate law: a backlog is not capacity to keep ------------------------------------------------------


def saturated(completions: dict, waiting: dict) -> dict:
    return {**engines({rid: 4.0 for rid in completions}, waiting), "completions_per_s": completions}


def test_rate_law_sizes_for_arrivals_over_per_replica_capacity_plus_draining_the_backlog():
    # 2 replicas complete 3/s each (their capacity: requests wait); demand grows 4/s -> arrivals 10/s;
    # backlog 60 drained in one 10 s start-up needs 60 / (3 * 10) = 2 more.
    metrics = saturated({"a": 3.0, "b": 3.0}, {"a": 30.0, "b": 30.0})
    assert rate_law(metrics, running=2, slope=4.0, startup_s=10.0) == 4 + 2
    # A replica that just started has completed little: the capacity is the best replica's.
    just_started = saturated({"a": 3.0, "b": 3.0, "c": 0.5}, {"a": 30.0, "b": 30.0, "c": 0.0})
    assert rate_law(just_started, running=3, slope=0.0, startup_s=10.0) == 3 + 2
    # A backlog that already drains needs no replica of its own: just the arrival rate's.
    assert rate_law(metrics, running=2, slope=-5.0, startup_s=10.0) == 2
    assert rate_law(engines({"a": 4.0}, {"a": 0.0}), running=1, slope=0.0, startup_s=10.0) is None  # not saturated


def test_the_rate_law_caps_the_queue_law_after_a_load_step():
    # 68 requests in the engines would be 7 replicas at 10 each; the rates say 6 (see above).
    replicas, state = decide(context(0.0, 2, engines=saturated({"a": 3.0, "b": 3.0}, {"a": 30.0, "b": 30.0})), PARAMS)
    assert state["by_rate"] == 2 + 2 and replicas == 4  # no growth measured yet on the first tick


# -- scale from zero: the scheduler's bounded wait ----------------------------------------------------------


class FakeStream:
    """A replica stream: yields `items` after `delay_s`; records a cancel (like Serve's generator)."""

    def __init__(self, items: list, delay_s: float) -> None:
        self.items, self.delay_s, self.cancelled = items, delay_s, False

    def __aiter__(self):
        return self._run()

    async def _run(self):
        await asyncio.sleep(self.delay_s)
        for item in self.items:
            yield item

    def cancel(self) -> None:
        self.cancelled = True


async def collect(stream, wait_s):
    return [item async for item in first_item_within(stream, wait_s, "rid-1")]


def test_a_replica_that_starts_within_the_wait_serves_the_request():
    stream = FakeStream([1, 2, 3], delay_s=0.05)
    assert asyncio.run(collect(stream, 5.0)) == [1, 2, 3]
    assert asyncio.run(collect(FakeStream([1, 2], delay_s=0.0), None)) == [1, 2]  # a replica was live: no bound


def test_no_replica_within_the_wait_is_a_503_queue_timeout_and_the_call_is_cancelled():
    stream = FakeStream([1], delay_s=10.0)
    with pytest.raises(OverloadedError) as refused:
        asyncio.run(collect(stream, 0.05))
    assert refused.value.status_code == 503 and refused.value.code == "queue_timeout"
    assert "start" in str(refused.value) and stream.cancelled
