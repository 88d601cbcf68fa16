"""Scale from zero (`min_replicas: 0`): the first request waits in the scheduler while a replica
starts, then is served; it gets a 503 `queue_timeout` only if the start takes longer than
scheduler.max_queue_wait_s. Real Ray Serve (this session's cluster), real HTTP, the simulated
engine (a simulator) with a modelled start-up time, app.autoscaling's policy.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import CACHE_DIR, SMALL

ZERO_TO_ONE = {
    "min_replicas": 0,
    "initial_replicas": 0,
    "max_replicas": 1,
    "target_ongoing_requests": 4,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 2.0,
    "upscale_delay_s": 0.0,
    "downscale_delay_s": 1.0,
    "downscale_to_zero_delay_s": 1.0,
    "policy": {"policy_function": "app.autoscaling:ReplicaAutoscalingPolicy",
               "policy_kwargs": {"ttft_slo_ms": 2000, "startup_time_s": 5}},
}


def args(startup_s: float, max_queue_wait_s: float) -> dict:
    return {
        "model": {"model_path": "sglserve/tiny-llama", "cache_dir": CACHE_DIR, "served_model_name": "sim"},
        "engine": {"kind": "simulated", "simulated_costs": {"startup_s": startup_s}},
        "scheduler": {"max_queue_wait_s": max_queue_wait_s},
        "ingress": {"default_max_tokens": 8, "ready_timeout_s": 120},
    }


def run_app(ray_cluster, name: str, startup_s: float, max_queue_wait_s: float) -> str:
    from ray import serve

    from app.config import AppSettings
    from app.deployments import build

    options = {"Ingress": SMALL, "Scheduler": SMALL,
               "ModelReplica": {"autoscaling_config": ZERO_TO_ONE, "ray_actor_options": {"num_cpus": 0.1}}}
    serve.run(build(AppSettings.from_args(args(startup_s, max_queue_wait_s)), options),
              name=name, route_prefix=f"/{name}", blocking=False)
    base = f"http://127.0.0.1:{ray_cluster.http_port}/{name}"
    poll(lambda: httpx.get(f"{base}/health", timeout=10).status_code == 200, "the ingress to answer")
    return base


def replicas(name: str) -> int:
    from ray import serve

    states = serve.status().applications[name].deployments["ModelReplica"].replica_states
    return sum(n for state, n in states.items() if state != "STOPPING")


def poll(condition, what: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (httpx.HTTPError, KeyError):
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def complete(base: str, timeout_s: float = 120.0) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", json={"model": "sim", "prompt": "hello", "max_tokens": 4},
                      timeout=timeout_s)


@pytest.fixture
def cleanup_apps():
    names: list[str] = []
    yield names
    from ray import serve

    for name in names:
        serve.delete(name, _blocking=False)


def test_first_request_waits_for_a_replica_to_start_then_is_served(ray_cluster, tiny_model_path, cleanup_apps):
    cleanup_apps.append("zero")
    base = run_app(ray_cluster, "zero", startup_s=2.0, max_queue_wait_s=120.0)
    assert replicas("zero") == 0  # initial_replicas 0: nothing runs before a request comes

    for attempt in range(2):  # the very first start, then again after scaling back to zero
        sent = time.monotonic()
        response = complete(base)
        cold_start_s = time.monotonic() - sent
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"]
        assert cold_start_s >= 2.0  # it waited for the replica's (modelled) 2 s start-up
        print(f"cold start {attempt}: {cold_start_s:.1f} s to a served request")
        poll(lambda: replicas("zero") == 0, "scale back to zero when idle")


def test_a_start_longer_than_max_queue_wait_is_a_503_queue_timeout(ray_cluster, tiny_model_path, cleanup_apps):
    cleanup_apps.append("zeroslow")
    base = run_app(ray_cluster, "zeroslow", startup_s=600.0, max_queue_wait_s=2.0)
    sent = time.monotonic()
    response = complete(base)
    waited_s = time.monotonic() - sent
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "queue_timeout" and "start" in error["message"], error
    assert int(response.headers["Retry-After"]) >= 1
    assert 2.0 <= waited_s < 60.0  # refused at the bound, not after the 600 s start
    assert replicas("zeroslow") == 1  # the request did make Serve start a replica
