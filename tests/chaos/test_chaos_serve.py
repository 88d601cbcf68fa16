"""Chaos under closed-loop load, through real HTTP, real Ray Serve and the real tiny model.

One application ("chaos"); the tests run in order on it, each fault recovered before the next:
kill -9 of the engine child with 1 replica, a `serve.run` of a changed config under load (a rolling
redeploy to 2 replicas), kill -9 of an engine child with 2 replicas, then kills of a ModelReplica,
the Scheduler and the Ingress actor. Each test counts what the clients saw (bench/fault_load.py):
lost requests, 5xx, HTTP 500s (never acceptable), time to recover; and prints the counts.

No fixed sleeps: the load runs until the test has seen what it waits for (bounded polls with a
generous deadline), so a slow machine makes it slower, not red.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time

import httpx
import pytest

from bench import fault_load
from tests.conftest import SMALL, serve_args, wait_ready

pytestmark = pytest.mark.serve

APP = "chaos"
PREFIX = "/chaos"
CLIENTS = 6  # closed-loop workers: half stream, half do not
DEADLINE_S = 180.0
SUMMARIES: dict[str, dict] = {}


def chaos_args(**ingress) -> dict:
    # The /run function that holds a request until the test releases it (the SIGTERM drain test).
    return serve_args(scheduler={"max_queue": 64, "max_concurrent": 32, "max_queue_wait_s": 60},
                      engine={"restart_backoff_s": 0.0}, ingress=ingress,
                      run={"function_modules": ["tests.serve.admission_hold_functions"]})


def replica_options(num_replicas: int) -> dict:
    return {"num_replicas": num_replicas, "ray_actor_options": {"num_cpus": 0.5}}


# A rolling redeploy stops the old Ingress and Scheduler once their requests are done, but kills them
# after graceful_shutdown_timeout_s (Serve's default: 20 s) whatever they still hold. On a busy
# shared machine the new replicas took longer than that to take over (3 requests lost in one run),
# so the test gives them a generous bound, as its polls have: it tests the drain, not the speed.
GRACEFUL = {"graceful_shutdown_timeout_s": DEADLINE_S}


def options(num_replicas: int) -> dict:
    return {"Ingress": {**SMALL, **GRACEFUL}, "Scheduler": {**SMALL, **GRACEFUL},
            "ModelReplica": {**replica_options(num_replicas), **GRACEFUL}}


def run_app(args: dict, num_replicas: int) -> None:
    from ray import serve

    from app.config import AppSettings
    from app.deployments import build

    serve.run(build(AppSettings.from_args(args), options(num_replicas)), name=APP, route_prefix=PREFIX,
              blocking=False)


@pytest.fixture(scope="module")
def chaos(ray_cluster, tiny_model_path):
    run_app(chaos_args(), num_replicas=1)
    stack = wait_ready(f"http://127.0.0.1:{ray_cluster.http_port}{PREFIX}", APP)
    yield stack
    from ray import serve

    serve.delete(APP)


# ---- helpers ---------------------------------------------------------------------------------------


def actor_names(deployment: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def replica_ids() -> list[str]:
    return [name.rsplit("#", 1)[1] for name in actor_names("ModelReplica")]


def server_args_of(stack, replica_id: str) -> dict:
    return stack.handle("ModelReplica").server_args.remote(target_replica=replica_id).result(timeout_s=60)


def wait_for_warm_spare(stack, replica_id: str) -> None:
    """An engine kill measures the restart the warm spare is for: wait until it is prepared."""
    deadline = time.monotonic() + DEADLINE_S
    while not server_args_of(stack, replica_id)["warm_spare_ready"]:
        assert time.monotonic() < deadline, "the warm spare never got ready"
        time.sleep(0.2)


def run_fault(stack, name: str, inject, recovered) -> dict:
    """Load, fault, recovery (bench/fault_load.py); the summary is printed and kept in SUMMARIES."""
    summary = fault_load.run_fault(stack.base_url, name, inject, recovered, clients=CLIENTS,
                                   deadline_s=DEADLINE_S).summary
    SUMMARIES[name] = summary
    print(f"\n{name}: {summary}")
    return summary


def assert_no_internal_errors(summary: dict) -> None:
    assert summary["internal_500"] == 0, summary
    assert summary["503_without_retry_after"] == 0, summary
    assert summary["badly_shaped"] == 0, summary
    assert summary["error_events_before_first_token"] == 0, summary  # a status instead


def routed_calls_succeed(stack) -> bool:
    try:
        return httpx.get(f"{stack.base_url}/ready", timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


# ---- the faults, in order ----------------------------------------------------------------------------


def test_engine_kill_with_one_replica_is_503_then_restarts(chaos):
    [victim] = replica_ids()
    wait_for_warm_spare(chaos, victim)
    pid = server_args_of(chaos, victim)["engine_pid"]
    summary = run_fault(
        chaos, "engine_kill_1_replica",
        inject=lambda: os.kill(pid, signal.SIGKILL),
        recovered=lambda: server_args_of(chaos, victim)["engine_restarts"] >= 1,
    )
    assert_no_internal_errors(summary)
    assert summary["transport_errors"] == 0, summary
    assert set(summary["error_codes"]) <= {"engine_unavailable"}, summary
    assert summary["recovery_s"] is not None
    assert replica_ids() == [victim], "Serve replaced the replica: the engine should have restarted in it"


def test_redeploy_of_a_changed_config_under_load_loses_nothing(chaos):
    from ray import serve

    old = set(replica_ids())
    changed = chaos_args(default_max_tokens=31)  # new args: every deployment rolls to new replicas

    def redeploy() -> None:
        run_app(changed, num_replicas=2)

    def rolled() -> bool:
        now = set(replica_ids())
        status = serve.status().applications[APP].status
        return len(now) == 2 and not (now & old) and status == "RUNNING"

    summary = run_fault(chaos, "redeploy_under_load", inject=redeploy, recovered=rolled)
    assert_no_internal_errors(summary)
    assert summary["lost"] == 0, summary


def test_engine_kill_with_two_replicas_never_500s(chaos):
    victim, _ = replica_ids()
    wait_for_warm_spare(chaos, victim)
    pid = server_args_of(chaos, victim)["engine_pid"]
    summary = run_fault(
        chaos, "engine_kill_2_replicas",
        inject=lambda: os.kill(pid, signal.SIGKILL),
        recovered=lambda: server_args_of(chaos, victim)["engine_restarts"] >= 1,
    )
    assert_no_internal_errors(summary)
    assert summary["transport_errors"] == 0, summary
    assert set(summary["error_codes"]) <= {"engine_unavailable"}, summary
    assert victim in replica_ids()


def test_engine_kill_with_two_replicas_loses_no_unstreamed_request(chaos):
    summary = SUMMARIES.get("engine_kill_2_replicas")
    assert summary is not None, "runs after test_engine_kill_with_two_replicas_never_500s"
    assert summary["lost_completion"] == 0, summary


def kill_actor(name: str) -> None:
    import ray

    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)  # Serve starts a new replica


def test_model_replica_actor_kill_is_recovered_by_serve(chaos):
    victim = actor_names("ModelReplica")[0]
    summary = run_fault(
        chaos, "replica_actor_kill",
        inject=lambda: kill_actor(victim),
        recovered=lambda: victim not in actor_names("ModelReplica") and len(replica_ids()) == 2,
    )
    assert summary["http_5xx"] - summary["http_503"] == 0, summary  # no HTTP 500 status
    assert summary["badly_shaped"] == 0, summary
    assert summary["lost"] <= CLIENTS, summary  # at most what was in flight on it


def test_sigterm_to_a_model_replica_drains_it_and_loses_nothing(chaos, tmp_path):
    """SIGTERM sent straight to a ModelReplica's process (not Serve's stop path) while it holds
    streamed requests: it stops taking work (new requests go to the other replica), the held
    streams finish on it once the test releases them, then it exits and Serve replaces it. The
    requests are held by a /run function until released: no assumption about generation speed."""
    import psutil

    release = tmp_path / "release-sigterm"
    held = {"program": f'held: {{hold.until_released("{release}")}}', "stream": True}
    # Two replicas that serve, known to the Scheduler (the previous test's replacement may still be
    # starting): the one that is not drained must be able to take the new requests.
    deadline = time.monotonic() + DEADLINE_S
    while (live := sorted(chaos.handle("Scheduler").stats.remote().result(timeout_s=60)["replicas"])) != replica_ids() \
            or len(live) != 2 or not all(server_args_of(chaos, rid)["available"] for rid in live):
        assert time.monotonic() < deadline, f"two serving replicas never appeared: {live}"
        time.sleep(0.2)
    before = {rid: server_args_of(chaos, rid) for rid in live}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        streams = [pool.submit(read_sse, f"{chaos.base_url}/run", held) for _ in range(2)]
        try:
            deadline = time.monotonic() + DEADLINE_S
            while sum((busy := {rid: server_args_of(chaos, rid)["requests_in_progress"]
                                for rid in before}).values()) < 2:
                assert time.monotonic() < deadline, f"the held streams never reached the replicas: {busy}"
                assert not any(f.done() for f in streams), [f.result() for f in streams if f.done()]
                time.sleep(0.05)
            victim = max(busy, key=busy.get)  # holds at least one of the streams
            pid = before[victim]["replica_pid"]
            migrations = chaos.handle("Scheduler").stats.remote().result(timeout_s=60)["migrations_total"]
            summary = run_fault(
                chaos, "replica_sigterm",
                inject=lambda: os.kill(pid, signal.SIGTERM),
                # Draining: it says unavailable and still holds its streams (they wait for the release).
                recovered=lambda: (a := server_args_of(chaos, victim))["draining_since_sigterm"]
                and not a["available"] and a["requests_in_progress"] == busy[victim],
            )
            assert not any(f.done() for f in streams)  # still held on the draining replica
        finally:
            release.touch()
        results = [f.result() for f in streams]
    assert all(r == (200, "held: released", []) for r in results), results
    assert_no_internal_errors(summary)
    assert summary["lost"] == 0, summary  # new requests during the drain were served elsewhere
    deadline = time.monotonic() + DEADLINE_S
    while psutil.pid_exists(pid) or victim in replica_ids() or len(replica_ids()) != 2:
        assert time.monotonic() < deadline, "the drained replica did not exit, or Serve did not replace it"
        time.sleep(0.2)
    after = chaos.handle("Scheduler").stats.remote().result(timeout_s=60)["migrations_total"]
    assert after == migrations, "a stream was migrated: the replica died instead of draining"


def read_sse(url: str, body: dict) -> tuple[int, str, list]:
    """POST a streamed /run request; (status, its text, its error events) once it ends."""
    text, errors = "", []
    with httpx.Client(timeout=DEADLINE_S * 2) as client, client.stream("POST", url, json=body) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    errors.append(event["error"])
                elif event.get("type") == "text" and not event.get("branch"):
                    text += event.get("text") or ""
    return resp.status_code, text, errors


@pytest.mark.parametrize("deployment", ["Scheduler", "Ingress"])
def test_scheduler_and_ingress_actor_kills_lose_only_what_was_in_flight(chaos, deployment):
    [victim] = actor_names(deployment)
    summary = run_fault(
        chaos, f"{deployment.lower()}_actor_kill",
        inject=lambda: kill_actor(victim),
        recovered=lambda: actor_names(deployment) not in ([], [victim]) and routed_calls_succeed(chaos),
    )
    # Requests in flight through the dead actor are lost to their clients; requests sent after the
    # kill wait in Serve (the proxy's / the Ingress's handle) for the new replica, and succeed.
    assert summary["lost_in_flight_at_fault"] <= CLIENTS, summary
    assert summary["lost_sent_after_fault"] == 0, summary
    # Our Ingress answers a dead Scheduler's requests; a dead Ingress's unanswered requests get a
    # JSON 503 from the proxy's middleware (app/proxy_errors.py), not the proxy's plain-text 500.
    # Streams it had started are cut off (counted as lost, never as a 500).
    assert summary["badly_shaped"] == 0, summary
    assert summary["internal_500"] == 0, summary
    assert summary["503_without_retry_after"] == 0, summary


def test_scheduler_kill_is_never_a_500(chaos):
    summary = SUMMARIES.get("scheduler_actor_kill")
    assert summary is not None, "runs after test_scheduler_and_ingress_actor_kills_lose_only_what_was_in_flight"
    assert summary["internal_500"] == 0, summary


@pytest.mark.parametrize("deployment, code", [("Ingress", "ingress_draining"), ("Scheduler", "scheduler_draining")])
def test_sigterm_to_the_ingress_or_scheduler_drains_it(chaos, tmp_path, deployment, code):
    """SIGTERM straight to the Ingress's or the Scheduler's process while it holds a streamed /run
    program (the Ingress serves its HTTP stream; the Scheduler relays it): new requests get a
    retryable 503 naming the drain, the held stream finishes whole once the test releases it, then
    the process exits and Serve replaces it. Held by a /run function, not by timing."""
    import psutil

    handle = chaos.handle(deployment)
    info = lambda: handle.process_info.remote().result(timeout_s=60)  # noqa: E731
    assert routed_calls_succeed(chaos)  # the previous test's replacements serve
    pid = info()["pid"]
    release = tmp_path / f"release-{deployment}"
    held = {"program": f'held: {{hold.until_released("{release}")}}', "stream": True}
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        stream = pool.submit(read_sse, f"{chaos.base_url}/run", held)
        try:
            deadline = time.monotonic() + DEADLINE_S
            while info()["busy"] < 1:
                assert time.monotonic() < deadline, f"the held stream never reached the {deployment}"
                assert not stream.done(), stream.result()
                time.sleep(0.05)
            os.kill(pid, signal.SIGTERM)
            while not info()["draining"]:
                assert time.monotonic() < deadline, f"the {deployment} did not start draining"
                time.sleep(0.05)
            refused = httpx.post(f"{chaos.base_url}/v1/completions", timeout=60,
                                 json={"model": fault_load.MODEL, "prompt": "hello", "max_tokens": 2})
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["code"] == code, refused.text
            assert not stream.done() and psutil.pid_exists(pid)  # still holding the stream
        finally:
            release.touch()
        assert stream.result(timeout=DEADLINE_S) == (200, "held: released", [])
    deadline = time.monotonic() + DEADLINE_S
    while psutil.pid_exists(pid) or not routed_calls_succeed(chaos):
        assert time.monotonic() < deadline, f"the drained {deployment} did not exit, or was not replaced"
        time.sleep(0.2)
    assert info()["pid"] != pid and not info()["draining"]
