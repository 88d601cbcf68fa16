"""Two replicas behind one scheduler, with API keys: authentication, per-replica broadcast,
adaptive in-flight limits, and a replica killed under load that loses nothing."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest
import ray

from app.security import hash_key
from tests.conftest import deploy, serve_args

pytestmark = pytest.mark.serve

MODEL = "sglserve/tiny-llama"
KEY = "sk-test-7f3a9c"
AUTH = {"Authorization": f"Bearer {KEY}"}


def replica_actor_names(app_name: str) -> list[str]:
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{app_name}#ModelReplica#")
    )


@pytest.fixture(scope="module")
def two_replicas(ray_cluster, tiny_model_path):
    args = serve_args(
        scheduler={"routing_policy": "round_robin", "max_retries": 3},
        security={"api_keys": [{"id": "team-a", "key_sha256": hash_key(KEY), "priority": 2,
                                "scopes": ["inference", "admin"]}]},  # flush_cache, server_info internals
    )
    stack = deploy(
        ray_cluster, "multi", "/multi", args,
        replica_options={"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.4}},
    )
    yield stack
    from ray import serve

    serve.delete("multi")


def test_api_key_is_required_and_checked(two_replicas):
    url = f"{two_replicas.base_url}/v1/models"
    missing = httpx.get(url)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    wrong = httpx.get(url, headers={"Authorization": "Bearer sk-wrong"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url, headers={"X-API-Key": KEY}).status_code == 200
    assert httpx.get(url, headers=AUTH).status_code == 200
    assert httpx.get(f"{two_replicas.base_url}/health").status_code == 200  # public


def test_flush_and_server_info_reach_every_replica(two_replicas):
    for i in range(4):  # round robin: both replicas serve and cache something
        r = httpx.post(f"{two_replicas.base_url}/generate", headers=AUTH,
                       json={"text": f"warm {i}", "sampling_params": {"max_new_tokens": 2}}, timeout=60)
        assert r.status_code == 200
    info = httpx.get(f"{two_replicas.base_url}/server_info", headers=AUTH, timeout=60).json()
    assert len(info["internal_states"]) == 2
    assert all(state["num_used_tokens"] > 0 for state in info["internal_states"])
    assert set(info["scheduler"]["in_flight_limits"]) <= {n.split("#")[-1] for n in replica_actor_names("multi")}
    flushed = httpx.post(f"{two_replicas.base_url}/flush_cache", headers=AUTH, timeout=60)
    assert flushed.status_code == 200 and "2 replica" in flushed.text
    after = httpx.get(f"{two_replicas.base_url}/server_info", headers=AUTH, timeout=60).json()
    assert [s["num_used_tokens"] for s in after["internal_states"]] == [0, 0]


def test_killing_a_replica_under_load_loses_no_request(two_replicas):
    names = replica_actor_names("multi")
    assert len(names) == 2
    body = {"model": MODEL, "prompt": "Tell me a story about", "max_tokens": 300, "ignore_eos": True, "temperature": 0}

    def both_busy() -> bool:
        states = httpx.get(f"{two_replicas.base_url}/server_info", headers=AUTH, timeout=30).json()["internal_states"]
        return len(states) == 2 and all(s["num_running"] > 0 for s in states)

    def call(i: int) -> httpx.Response:
        return httpx.post(f"{two_replicas.base_url}/v1/completions", headers=AUTH,
                          json={**body, "prompt": f"{i}: {body['prompt']}"}, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        futures = [pool.submit(call, i) for i in range(12)]
        deadline = time.monotonic() + 30
        while not both_busy():  # kill only once both replicas are decoding
            assert time.monotonic() < deadline, "the load never reached both replicas"
            time.sleep(0.05)
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        responses = [f.result() for f in futures]

    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 12, [r.text for r in responses if r.status_code != 200]
    assert all(r.json()["usage"]["completion_tokens"] == 300 for r in responses)
    info = httpx.get(f"{two_replicas.base_url}/server_info", headers=AUTH, timeout=60).json()
    assert info["scheduler"]["retries_total"] >= 1


def wait_for_two_replicas(stack, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            info = httpx.get(f"{stack.base_url}/server_info", headers=AUTH, timeout=30).json()
            if len(info["internal_states"]) == 2 and len(replica_actor_names("multi")) == 2:
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError("the app did not get back to two replicas")


def test_a_stream_whose_replica_dies_continues_on_the_other_one(two_replicas):
    """Kill the replica serving a started stream: the client's stream goes on, with the same greedy
    text as an uninterrupted run, no error, nothing repeated, and the usage of one request."""
    import openai

    wait_for_two_replicas(two_replicas)
    client = openai.OpenAI(base_url=f"{two_replicas.base_url}/v1", api_key=KEY, max_retries=0, timeout=300)
    params = dict(model=MODEL, prompt="Once upon a time in a migrating land", max_tokens=2500,
                  temperature=0, extra_body={"ignore_eos": True})
    reference = client.completions.create(**params)
    assert reference.usage.completion_tokens == 2500

    migrations_before = httpx.get(f"{two_replicas.base_url}/server_info", headers=AUTH, timeout=30).json()[
        "scheduler"]["migrations_total"]
    stream = client.completions.create(**params, stream=True, stream_options={"include_usage": True})
    chunks = iter(stream)
    first = next(chunks)  # the stream has started: the client holds its first text
    texts = [first.choices[0].text]
    info = httpx.get(f"{two_replicas.base_url}/server_info", headers=AUTH, timeout=30).json()
    busy = [i for i, s in enumerate(info["internal_states"]) if s["num_running"] > 0]
    assert len(busy) == 1, info["internal_states"]  # only our request runs; its replica is the one to kill
    ray.kill(ray.get_actor(serving_replica_name(info, busy[0]), namespace="serve"), no_restart=True)

    usage = None
    for chunk in chunks:
        if chunk.choices:
            texts.append(chunk.choices[0].text)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(texts) == reference.choices[0].text
    assert usage is not None and usage.completion_tokens == 2500
    assert usage.prompt_tokens == reference.usage.prompt_tokens
    info = httpx.get(f"{two_replicas.base_url}/server_info", headers=AUTH, timeout=60).json()
    assert info["scheduler"]["migrations_total"] == migrations_before + 1


def serving_replica_name(info: dict, index: int) -> str:
    """The actor name of the replica behind `internal_states[index]` (the scheduler lists the
    replicas it broadcasts to in sorted id order, the order of internal_states)."""
    replica_id = sorted(info["scheduler"]["replicas"])[index]
    return next(n for n in replica_actor_names("multi") if n.endswith(f"#{replica_id}"))
