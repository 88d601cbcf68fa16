"""The canary split on the real stack: two versions of the tiny model side by side, each its own
ModelReplica deployment (`ModelReplica-v1`, `ModelReplica-v2`), deployed the way `serve deploy`
deploys a config (the controller's apply_config, import_path `app.deployments:build_app`).

- 2,000 real requests (max_tokens=1, 16 at a time) of 2,000 sessions split within +-3% of the
  weights; the version is in the `x-sglserve-model-version` header; the Scheduler placed exactly
  that many tickets among each version's replicas, and each version's engine served them.
- Stickiness: all 2,000 sessions asked again (the decision alone: a 400 right after it), and API
  keys without a session, always get the same version.
- `model: name@version` and `X-Model-Version` pick a version (weight 0 too); an unknown one -> 404
  naming `model`; /v1/models lists the served name and each name@version.
- Weights moved 10% -> 50% -> 100% by redeploying the config with a new Ingress `user_config`
  (Serve's lightweight update, `reconfigure`), while closed-loop clients keep sending: 0 failed
  requests, every request after the move to 100% on v2, and no replica of any deployment restarted.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

import httpx
import pytest

from app.security import hash_key
from tests.conftest import serve_args, wait_ready

pytestmark = [pytest.mark.serve, pytest.mark.timeout(1200)]

APP = "canary"
PREFIX = "/canary"
SERVED = "acme/chat"
HEADER = "x-sglserve-model-version"
KEYS = {f"team-{i}": f"sk-team-{i}-{uuid.uuid4().hex[:10]}" for i in range(12)}
CONCURRENCY = 16


def app_config(weights: dict[str, float]) -> dict:
    args = serve_args(
        model={"served_model_name": SERVED},
        security={"api_keys": [{"id": k, "key_sha256": hash_key(v)} for k, v in KEYS.items()]},
    )
    # The weights the app starts with; they move through the Ingress's user_config (a lightweight
    # update), never through `args` (any change of args restarts every deployment of the app).
    args["models"] = [{"name": "v1", "weight": 90}, {"name": "v2", "weight": 10}]
    small = {"ray_actor_options": {"num_cpus": 0.1}}
    replica = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}
    return {
        "name": APP, "route_prefix": PREFIX, "import_path": "app.deployments:build_app", "args": args,
        "deployments": [
            {"name": "Ingress", "user_config": {"weights": weights}, **small},
            {"name": "Scheduler", **small},
            {"name": "ModelReplica-v1", **replica},
            {"name": "ModelReplica-v2", **replica},
        ],
    }


def apply(weights: dict[str, float]) -> None:
    """What `serve deploy serve_config.yaml` does: hand the config to the controller."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema(applications=[app_config(weights)]))


def serve_actors() -> set[str]:
    """The names of this app's replica actors (a restarted replica has a new name)."""
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"{APP}#" in a["name"]}


@pytest.fixture(scope="module")
def canary(ray_cluster, tiny_model_path):
    from ray import serve

    apply({"v1": 90, "v2": 10})
    stack = wait_ready(f"http://127.0.0.1:{ray_cluster.http_port}{PREFIX}", APP, timeout_s=300)
    yield stack
    serve.delete(APP)


def auth(key: str = "team-0") -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[key]}"}


def body(model: str = SERVED) -> dict:
    return {"model": model, "prompt": "hi", "max_tokens": 1, "temperature": 0}


async def send_all(base: str, requests: list[tuple[dict, dict]]) -> list[httpx.Response]:
    """Send (headers, body) pairs, CONCURRENCY at a time; responses in order."""
    results: list[httpx.Response | None] = [None] * len(requests)
    queue: asyncio.Queue = asyncio.Queue()
    for item in enumerate(requests):
        queue.put_nowait(item)
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=CONCURRENCY)) as client:
        async def worker() -> None:
            while not queue.empty():
                i, (headers, payload) = queue.get_nowait()
                results[i] = await client.post(f"{base}/v1/completions", headers=headers, json=payload)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return results  # type: ignore[return-value]


def finished_by_version(stack) -> dict[str, int]:
    return {v: stack.handle(f"ModelReplica-{v}").stats.remote().result().requests_finished_total for v in ("v1", "v2")}


def decided_only() -> dict:
    """A completion the Ingress refuses (400, `suffix` is unsupported) right AFTER it chose the
    version: the split decision alone, over HTTP, for re-asking many sessions cheaply."""
    return {**body(), "suffix": "x"}


def placed_by_version(stack) -> dict[str, int]:
    """Tickets the Scheduler placed among each version's replicas (Serve's health probes, which
    also generate on the engines, do not pass through it)."""
    routing = stack.handle("Scheduler").stats.remote().result()["routing"]
    return {v: routing[v]["decisions_total"] for v in ("v1", "v2")}


def test_2000_requests_split_by_weight_sticky_per_session_and_per_key(canary):
    # 2,000 real requests (max_tokens=1) of 2,000 sessions, through the whole stack.
    sessions = [f"s-{uuid.uuid4().hex[:8]}-{i}" for i in range(2000)]
    placed, engines = placed_by_version(canary), finished_by_version(canary)
    started = time.monotonic()
    responses = asyncio.run(send_all(canary.base_url, [({**auth(), "x-session-id": s}, body()) for s in sessions]))
    elapsed = time.monotonic() - started
    assert [r.status_code for r in responses] == [200] * len(sessions), next(r.text for r in responses if r.status_code != 200)
    chosen = {s: r.headers[HEADER] for s, r in zip(sessions, responses)}
    counts = Counter(chosen.values())
    print(f"2,000 requests in {elapsed:.1f} s ({2000 / elapsed:.0f} req/s): {dict(counts)}")
    assert abs(counts["v2"] / 2000 - 0.10) <= 0.03, counts
    # Each version's requests were placed on that version's replicas, and its engine served them.
    after_placed, after_engines = placed_by_version(canary), finished_by_version(canary)
    assert {v: after_placed[v] - placed[v] for v in placed} == {"v1": counts["v1"], "v2": counts["v2"]}
    assert all(after_engines[v] - engines[v] >= counts[v] for v in engines), (engines, after_engines, counts)

    # Sticky: all 2,000 sessions asked again (another key: the session wins), and 200 of them
    # generating again.
    responses = asyncio.run(send_all(canary.base_url, [({**auth("team-2"), "x-session-id": s}, decided_only()) for s in sessions]))
    assert {r.status_code for r in responses} == {400}
    assert {s: r.headers[HEADER] for s, r in zip(sessions, responses)} == chosen
    again = sessions[:200]
    responses = asyncio.run(send_all(canary.base_url, [({**auth("team-1"), "x-session-id": s}, body()) for s in again]))
    assert all(r.status_code == 200 for r in responses)
    assert {s: r.headers[HEADER] for s, r in zip(again, responses)} == {s: chosen[s] for s in again}
    # Without a session, per API key.
    per_key = [(key, ({**auth(key)}, body())) for key in KEYS for _ in range(3)]
    responses = asyncio.run(send_all(canary.base_url, [item for _, item in per_key]))
    seen: dict[str, set[str]] = {}
    for (key, _), r in zip(per_key, responses):
        assert r.status_code == 200, r.text
        seen.setdefault(key, set()).add(r.headers[HEADER])
    assert all(len(v) == 1 for v in seen.values()), seen


def test_an_explicit_version_is_honoured_and_an_unknown_one_is_404(canary):
    base = canary.base_url
    for _ in range(5):
        r = httpx.post(f"{base}/v1/completions", headers=auth(), json=body(f"{SERVED}@v2"), timeout=60)
        assert r.status_code == 200 and r.headers[HEADER] == "v2" and r.json()["model"] == SERVED
        r = httpx.post(f"{base}/v1/completions", headers={**auth(), "x-model-version": "v1"}, json=body(), timeout=60)
        assert r.status_code == 200 and r.headers[HEADER] == "v1"
    # Chat and the native API too.
    chat = {"model": f"{SERVED}@v2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    r = httpx.post(f"{base}/v1/chat/completions", headers=auth(), json=chat, timeout=60)
    assert r.status_code == 200 and r.headers[HEADER] == "v2"
    r = httpx.post(f"{base}/generate", headers={**auth(), "x-model-version": "v2"}, timeout=60,
                   json={"text": "hi", "sampling_params": {"max_new_tokens": 1}})
    assert r.status_code == 200 and r.headers[HEADER] == "v2"
    r = httpx.post(f"{base}/v1/completions", headers=auth(), json=body(f"{SERVED}@v9"), timeout=60)
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["param"] == "model" and error["code"] == "model_not_found" and "v9" in error["message"]
    models = httpx.get(f"{base}/v1/models", headers=auth(), timeout=60).json()["data"]
    assert [m["id"] for m in models] == [SERVED, f"{SERVED}@v1", f"{SERVED}@v2"]
    # The scheduler placed each version's tickets on that version's replicas only.
    stats = canary.handle("Scheduler").stats.remote().result()
    assert set(stats["versions"]) == {"v1", "v2"} and all(len(r) == 1 for r in stats["versions"].values())


def current_weights(base: str) -> dict[str, float]:
    models = httpx.get(f"{base}/v1/models", headers=auth(), timeout=60).json()["data"]
    return {m["id"].rpartition("@")[2]: m["weight"] for m in models if "@" in m["id"]}


def wait_weights(base: str, wanted: dict[str, float], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while current_weights(base) != wanted:
        assert time.monotonic() < deadline, f"weights never became {wanted}: {current_weights(base)}"
        time.sleep(0.2)


def test_weights_move_10_50_100_under_load_with_no_failed_request_and_no_restart(canary):
    base = canary.base_url
    actors = serve_actors()
    assert {name.split("#")[1] for name in actors} >= {"Ingress", "Scheduler", "ModelReplica-v1", "ModelReplica-v2"}
    log: list[tuple[str, int, str | None]] = []  # (phase at send, status, version)
    phase = {"now": "10"}
    stop = asyncio.Event()

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            sent_in = phase["now"]
            try:
                r = await client.post(f"{base}/v1/completions", headers={**auth(), "x-session-id": uuid.uuid4().hex},
                                      json=body())
                log.append((sent_in, r.status_code, r.headers.get(HEADER)))
            except httpx.HTTPError as exc:  # a dropped connection is a failed request too
                log.append((sent_in, 0, repr(exc)))

    def served_in(p: str) -> int:
        return sum(1 for ph, status, _ in log if ph == p and status == 200)

    async def wait_served(p: str, count: int) -> None:
        while served_in(p) < count:
            await asyncio.sleep(0.1)

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            clients = [asyncio.create_task(client_loop(client)) for _ in range(4)]
            await wait_served("10", 60)
            for weights, name in (({"v1": 50, "v2": 50}, "50"), ({"v1": 0, "v2": 100}, "100")):
                phase["now"] = f"moving-{name}"
                await asyncio.to_thread(apply, weights)
                await asyncio.to_thread(wait_weights, base, weights)
                phase["now"] = name
                await wait_served(name, 80)
            stop.set()
            await asyncio.gather(*clients)

    asyncio.run(scenario())
    failed = [entry for entry in log if entry[1] != 200]
    by_phase = {p: Counter(v for ph, _, v in log if ph == p) for p in ("10", "50", "100")}
    print(f"{len(log)} requests, {len(failed)} failed; versions by phase: {by_phase}")
    assert not failed, failed[:5]
    assert set(by_phase["100"]) == {"v2"}  # after the move to 100%, every request on v2
    assert by_phase["50"]["v1"] > 0 and by_phase["50"]["v2"] > 0
    assert serve_actors() == actors  # nothing restarted: the Ingress was reconfigured in place
