"""A replica killed under load loses nothing: requests are retried on the surviving replica."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest
import ray

from tests.conftest import deploy, serve_args

pytestmark = pytest.mark.serve

MODEL = "sglserve/tiny-llama"


def replica_actor_names(app_name: str) -> list[str]:
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{app_name}#ModelReplica#")
    )


@pytest.fixture(scope="module")
def two_replicas(ray_cluster, tiny_model_path):
    stack = deploy(
        ray_cluster, "failover", "/failover", serve_args(scheduler={"routing_policy": "round_robin", "max_retries": 3}),
        replica_options={"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.4}},
    )
    yield stack
    from ray import serve

    serve.delete("failover")


def test_killing_a_replica_under_load_loses_no_request(two_replicas):
    names = replica_actor_names("failover")
    assert len(names) == 2
    body = {"model": MODEL, "prompt": "Tell me a story about", "max_tokens": 40, "ignore_eos": True, "temperature": 0}

    def call(i: int) -> httpx.Response:
        return httpx.post(f"{two_replicas.base_url}/v1/completions", json={**body, "prompt": f"{i}: {body['prompt']}"}, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        futures = [pool.submit(call, i) for i in range(12)]
        time.sleep(0.5)  # requests are in flight on both replicas
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        responses = [f.result() for f in futures]

    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 12, [r.text for r in responses if r.status_code != 200]
    assert all(r.json()["usage"]["completion_tokens"] == 40 for r in responses)
    info = httpx.get(f"{two_replicas.base_url}/server_info", timeout=30).json()
    assert info["scheduler"]["retries_total"] >= 1
