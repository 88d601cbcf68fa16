"""The request router skips replicas whose routing stats say `available: False` (engine restarting,
replica draining), and falls back to all of them when none is available (the request then gets
the replica's fast, retryable 503 rather than waiting in Ray's routing loop without a deadline).

Two replicas of a trivial deployment that answers with its own id and publishes a flag the test
flips; real Ray Serve, the real PolicyRequestRouter."""

from __future__ import annotations

import time

import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray.serve.config import RequestRouterConfig  # noqa: E402

from app.protocol import GenerateRequest, SamplingParams  # noqa: E402
from app.scheduler.ray_router import PolicyRequestRouter, live_replica_ids  # noqa: E402

pytestmark = pytest.mark.serve

PROMPT = list(range(200, 500))  # one shared prefix: cache-aware routing sends it all to one replica
DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def handle(ray_cluster):

    @serve.deployment(
        name="Flagged",
        num_replicas=2,
        ray_actor_options={"num_cpus": 0.1},
        request_router_config=RequestRouterConfig(
            request_router_class=PolicyRequestRouter,
            request_router_kwargs={"policy": "cache_aware", "seed": 0},
            request_routing_stats_period_s=0.2,
        ),
    )
    class Flagged:
        def __init__(self) -> None:
            self.up = True

        async def generate(self, req: GenerateRequest):
            yield serve.get_replica_context().replica_id.unique_id

        def set_available(self, up: bool, target_replica: str | None = None) -> None:
            self.up = up

        def record_routing_stats(self) -> dict:
            return {"outstanding_tokens": 0, "running": 0, "waiting": 0, "available": self.up}

    try:
        yield serve.run(Flagged.bind(), name="availability_test", route_prefix=None)
    finally:
        serve.delete("availability_test")


def served_by(handle, suffix: int) -> str:
    req = GenerateRequest(input_ids=PROMPT + [suffix], sampling=SamplingParams(max_new_tokens=1))
    return "".join(handle.options(stream=True).generate.remote(req))


def set_available(handle, replica: str, up: bool) -> None:
    handle.set_available.remote(up, target_replica=replica).result()


def wait_until_served_by(handle, replica: str) -> None:
    """Bounded poll: routing stats reach the router on their period, so the switch is not instant."""
    deadline = time.monotonic() + DEADLINE_S
    i = 0
    while served_by(handle, i) != replica:
        assert time.monotonic() < deadline, f"traffic never moved to {replica}"
        i += 1
        time.sleep(0.05)


def test_unavailable_replicas_are_skipped_and_all_unavailable_falls_back(handle):
    owner = served_by(handle, 0)
    assert served_by(handle, 1) == owner  # the shared prefix sticks to one replica
    [other] = live_replica_ids("Flagged") - {owner}

    set_available(handle, owner, False)
    wait_until_served_by(handle, other)
    assert {served_by(handle, 100 + i) for i in range(10)} == {other}, "an unavailable replica got work"

    set_available(handle, other, False)  # none available: requests still go somewhere, not hang
    assert {served_by(handle, 200 + i) for i in range(5)} <= {owner, other}
    for replica in (owner, other):
        set_available(handle, replica, True)
