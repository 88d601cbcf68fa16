"""Kill the job runner and the Ingress mid-job, on both stores: every job still ends succeeded, and
every callback a job sends carries that job's one webhook-id (redeliveries are recognisable).

Held state, not timing: a /run program that waits for a file holds the application's only
admission slot, so at the moment of the kill the runner's job is provably running and the
auto-converted request provably unfinished; the file is created only after the kill."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
import ray
from standardwebhooks import Webhook

from tests.conftest import deploy
from tests.jobs.apps import ALICE, chat_body, held_program, jobs_app_args, wait_status
from tests.jobs.conftest import SECRET

pytestmark = [pytest.mark.serve, pytest.mark.timeout(1200)]  # generous: the machine is shared


def kill_replicas(app_name: str, deployment: str) -> list[str]:
    from ray.util import list_named_actors

    names = [a["name"] for a in list_named_actors(all_namespaces=True)
             if a.get("namespace") == "serve" and f"{app_name}#{deployment}#" in a["name"]]
    for name in names:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return names


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_jobs_survive_killing_the_runner_and_the_ingress(store, ray_cluster, tiny_model_path, receiver,
                                                         tmp_path, request):
    from ray import serve

    name = f"jobs-recovery-{store}"
    redis_url = request.getfixturevalue("redis_url") if store == "redis" else None
    args = jobs_app_args(tmp_path, store, redis_url, prefix=f"{uuid.uuid4().hex[:8]}:")
    app = deploy(ray_cluster, name, f"/{name}", args)
    try:
        base, go = app.base_url, tmp_path / "go"
        held = httpx.post(f"{base}/v1/jobs", json={"path": "/run", "body": held_program(go),
                                                   "callback_url": receiver.url}, headers=ALICE, timeout=60)
        assert held.status_code == 202, held.text
        held_id = held.json()["id"]
        wait_status(base, held_id, ("running",))  # the runner has it; it cannot finish before `go`
        converted = httpx.post(f"{base}/v1/chat/completions", json=chat_body("recover me"), timeout=60,
                               headers={**ALICE, "X-Max-Wait-S": "0.5", "X-Callback-URL": receiver.url})
        assert converted.status_code == 202, converted.text  # now held by the Ingress
        queued = httpx.post(f"{base}/v1/jobs", json={"path": "/v1/completions", "callback_url": receiver.url,
                            "body": {"model": "sglserve/tiny-llama", "prompt": "queued", "max_tokens": 4}},
                            headers=ALICE, timeout=60).json()
        ids = [held_id, converted.json()["id"], queued["id"]]

        assert kill_replicas(name, "JobRunner") and kill_replicas(name, "Ingress")
        go.touch()

        finals = {job_id: wait_status(base, job_id, ("succeeded", "failed", "cancelled"), timeout_s=420)
                  for job_id in ids}
        assert {j["status"] for j in finals.values()} == {"succeeded"}, finals
        assert finals[held_id]["attempts"] >= 2  # its first run died with the runner
        assert finals[ids[1]]["attempts"] >= 2  # its first run died with the Ingress
        assert finals[held_id]["result"]["text"].startswith("Wait: go.")

        for job_id in ids:
            receiver.wait_for(job_id, timeout_s=240)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and any(
                httpx.get(f"{base}/v1/jobs/{j}", headers=ALICE, timeout=30).json()["callback"]["status"] == "pending"
                for j in ids):
            time.sleep(0.2)
        for job_id in ids:
            deliveries = receiver.for_job(job_id)
            assert len({d.headers["webhook-id"] for d in deliveries}) == 1, deliveries  # duplicates share it
            for delivery in deliveries:
                assert Webhook(SECRET).verify(delivery.body, delivery.headers)["status"] == "succeeded"
    finally:
        (tmp_path / "go").touch()
        serve.delete(name)
