"""PolicyRequestRouter inside a real (small, local) Ray Serve instance.

Three replicas of a trivial deployment that answers with its own replica id. Crafted prefixes
must land where the cache-aware policy says; a session must stick; a killed replica must be
dropped and its traffic moved to a live one. Uses the suite's Ray cluster (tests/conftest.py);
the app is deleted at the end.
"""

from __future__ import annotations

import time

import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray.serve.config import RequestRouterConfig  # noqa: E402

from app.protocol import GenerateRequest, SamplingParams  # noqa: E402
from app.scheduler.ray_router import PolicyRequestRouter  # noqa: E402

pytestmark = pytest.mark.serve  # uses the session's Ray cluster

SYSTEM_A = list(range(100, 400))
SYSTEM_B = list(range(1000, 1300))


def request(prefix: list[int], suffix: int, session_id: str | None = None) -> GenerateRequest:
    return GenerateRequest(
        input_ids=prefix + [suffix, suffix + 1],
        sampling=SamplingParams(max_new_tokens=4),
        session_id=session_id,
    )


@pytest.fixture(scope="module")
def handle(ray_cluster):

    @serve.deployment(
        num_replicas=3,
        ray_actor_options={"num_cpus": 0.1},
        max_ongoing_requests=16,
        request_router_config=RequestRouterConfig(
            request_router_class=PolicyRequestRouter,
            request_router_kwargs={"policy": "cache_aware", "seed": 0},
            request_routing_stats_period_s=0.5,
        ),
        health_check_period_s=1.0,
    )
    class WhoAmI:
        async def generate(self, req: GenerateRequest):
            yield serve.get_replica_context().replica_id.unique_id

        def record_routing_stats(self) -> dict:
            return {"outstanding_tokens": 0, "running": 0, "waiting": 0}

    try:
        yield serve.run(WhoAmI.bind(), name="router_test", route_prefix=None)
    finally:
        serve.delete("router_test")


def served_by(handle, req: GenerateRequest) -> str:
    return "".join(handle.options(stream=True).generate.remote(req))


def test_routes_by_prefix_sessions_and_drops_a_killed_replica(handle) -> None:
    owner_a = served_by(handle, request(SYSTEM_A, 1))
    for i in range(2, 6):
        assert served_by(handle, request(SYSTEM_A, i * 7)) == owner_a, "shared prefix moved"
    owner_b = served_by(handle, request(SYSTEM_B, 1))
    assert owner_b != owner_a, "a cold prefix goes to a replica with an empty tree"
    assert served_by(handle, request(SYSTEM_B, 50)) == owner_b

    # A session sticks to its replica even with a prompt cached elsewhere.
    sticky = served_by(handle, request([7, 7, 7], 1, session_id="prog"))
    assert served_by(handle, request(SYSTEM_A, 99, session_id="prog")) == sticky

    # Kill the replica that owns prefix A: traffic moves to a live one and sticks there.
    victim = ray.get_actor(f"SERVE_REPLICA::router_test#WhoAmI#{owner_a}", namespace="serve")
    ray.kill(victim, no_restart=True)
    deadline = time.time() + 20
    new_owner = None
    while time.time() < deadline:
        try:
            new_owner = served_by(handle, request(SYSTEM_A, 123))
        except Exception:  # the kill is noticed by the router within a request or two
            time.sleep(0.2)
            continue
        if new_owner != owner_a:
            break
    assert new_owner is not None and new_owner != owner_a, "the dead replica was not dropped"
    for i in range(3):
        assert served_by(handle, request(SYSTEM_A, 300 + i)) == new_owner
