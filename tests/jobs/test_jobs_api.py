"""Auto-conversion, the jobs API, callbacks, the OpenAI Batch API and bad input, on a real
application (Ray Serve, the tiny model, the SQLite store), through real HTTP and the `openai` client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from tests.conftest import deploy
from tests.jobs.apps import (ALICE, BOB, KEY_ALICE, MODEL, chat_body, get_job, held_program, jobs_app_args,
                             wait_status)
from tests.jobs.conftest import SECRET, WRONG_SECRET, wait_until

pytestmark = [pytest.mark.serve, pytest.mark.timeout(900)]  # generous: the machine is shared


@pytest.fixture
def go(tmp_path):
    """The file that releases held programs; created at teardown too, so that a failed test never
    leaves the application's only admission slot held for the next one."""
    path = tmp_path / "go"
    yield path
    path.touch()


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_model_path, tmp_path_factory):
    from ray import serve

    stack = deploy(ray_cluster, "jobs-sqlite", "/jobs-sqlite", jobs_app_args(tmp_path_factory.mktemp("jobs")))
    yield stack
    serve.delete("jobs-sqlite")


def assert_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_slow_request_becomes_a_job_and_its_signed_callback_arrives(app, receiver, go):
    response = httpx.post(f"{app.base_url}/run", json=held_program(go), timeout=60,
                          headers={**ALICE, "X-Max-Wait-S": "0.5", "X-Callback-URL": receiver.url})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["object"] == "job" and job["status"] == "running"
    assert response.headers["location"] == f"/jobs-sqlite/v1/jobs/{job['id']}"
    assert get_job(app.base_url, job["id"])["status"] == "running"  # held: cannot have finished

    go.touch()
    done = wait_status(app.base_url, job["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded" and done["status_code"] == 200
    assert done["result"]["text"].startswith("Wait: go. Then: ")
    assert done["result"]["variables"]["tail"] == done["result"]["text"].removeprefix("Wait: go. Then: ")

    delivery = receiver.wait_for(job["id"])
    assert Webhook(SECRET).verify(delivery.body, delivery.headers)["status"] == "succeeded"
    with pytest.raises(WebhookVerificationError):
        Webhook(WRONG_SECRET).verify(delivery.body, delivery.headers)
    polled = wait_status(app.base_url, job["id"], ("succeeded",))
    assert polled["result"] == delivery.job["result"]


def test_queued_chat_and_native_requests_convert_and_a_fast_one_does_not(app, receiver, go):
    fast = httpx.post(f"{app.base_url}/v1/chat/completions", json=chat_body("hi"), headers=ALICE, timeout=120)
    assert fast.status_code == 200 and fast.json()["object"] == "chat.completion"

    scheduler = app.handle("Scheduler")
    admitted = scheduler.stats.remote().result()["admission"]["admitted_total"]
    holder = httpx.post(f"{app.base_url}/v1/jobs", json={"path": "/run", "body": held_program(go)},
                        headers=ALICE, timeout=60)
    assert holder.status_code == 202, holder.text
    wait_status(app.base_url, holder.json()["id"], ("running",))
    # "running" means a runner claimed it; wait until the program holds the scheduler's only slot.
    wait_until(lambda: scheduler.stats.remote().result()["admission"]["admitted_total"] > admitted,
               what="the program admitted")
    # The only admission slot is held by the program above, so this one waits past its 0.5 s.
    slow = httpx.post(f"{app.base_url}/v1/chat/completions",
                      json={**chat_body("hi"), "callback_url": receiver.url},
                      headers={**ALICE, "X-Max-Wait-S": "0.5"}, timeout=60)
    assert slow.status_code == 202, slow.text
    native = httpx.post(f"{app.base_url}/generate", timeout=60, headers={**ALICE, "X-Max-Wait-S": "0.5"},
                        json={"text": "hi", "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
    assert native.status_code == 202, native.text
    go.touch()
    native_done = wait_status(app.base_url, native.json()["id"], ("succeeded", "failed"))
    assert native_done["status"] == "succeeded" and native_done["result"]["meta_info"]["completion_tokens"] == 4
    done = wait_status(app.base_url, slow.json()["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded"
    assert done["result"]["choices"][0]["message"]["content"] == fast.json()["choices"][0]["message"]["content"]
    assert done["usage"]["completion_tokens"] == fast.json()["usage"]["completion_tokens"]
    assert wait_status(app.base_url, holder.json()["id"], ("succeeded",))["result"]["text"].startswith("Wait: go.")
    assert Webhook(SECRET).verify(receiver.wait_for(done["id"]).body, receiver.wait_for(done["id"]).headers)


def test_direct_jobs_list_and_cancel(app, go):
    holder = httpx.post(f"{app.base_url}/v1/jobs", json={"path": "/run", "body": held_program(go)},
                        headers=ALICE, timeout=60).json()
    wait_status(app.base_url, holder["id"], ("running",))
    queued = [httpx.post(f"{app.base_url}/v1/jobs", json={"path": "/v1/completions",
                         "body": {"model": MODEL, "prompt": f"p{i}", "max_tokens": 4, "temperature": 0}},
                         headers=ALICE, timeout=60).json() for i in range(3)]
    page = httpx.get(f"{app.base_url}/v1/jobs?limit=2", headers=ALICE, timeout=30).json()
    assert page["object"] == "list" and page["has_more"] and [j["id"] for j in page["data"]] == [
        queued[2]["id"], queued[1]["id"]]
    rest = httpx.get(f"{app.base_url}/v1/jobs?limit=2&after={page['last_id']}", headers=ALICE, timeout=30).json()
    assert rest["data"][0]["id"] == queued[0]["id"]
    assert all(j["id"] not in {q["id"] for q in queued} for j in
               httpx.get(f"{app.base_url}/v1/jobs", headers=BOB, timeout=30).json()["data"])

    cancelled = httpx.post(f"{app.base_url}/v1/jobs/{queued[0]['id']}/cancel", headers=ALICE, timeout=30).json()
    assert cancelled["status"] == "cancelled"
    go.touch()
    for job in queued[1:]:
        assert wait_status(app.base_url, job["id"], ("succeeded", "failed"))["status"] == "succeeded"
    assert get_job(app.base_url, queued[0]["id"])["status"] == "cancelled"  # the late result is dropped


def test_a_cancelled_job_still_waiting_for_admission_never_reaches_the_engine(app, go):
    scheduler, replica = app.handle("Scheduler"), app.handle("ModelReplica")
    holder = httpx.post(f"{app.base_url}/v1/jobs", json={"path": "/run", "body": held_program(go)},
                        headers=ALICE, timeout=60).json()
    wait_status(app.base_url, holder["id"], ("running",))
    long_prompt = " ".join(f"w{i}" for i in range(700))  # >= 700 prompt tokens: visible in the counters
    before_engine = replica.stats.remote().result()
    before = scheduler.stats.remote().result()["admission"]
    doomed, other = (httpx.post(f"{app.base_url}/v1/jobs", json={"path": "/v1/completions", "body": {
        "model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0}}, headers=ALICE, timeout=60).json()
        for prompt in (long_prompt, "short"))
    doomed_run = httpx.post(f"{app.base_url}/v1/jobs", headers=ALICE, timeout=60, json={"path": "/run", "body": {
        "program": long_prompt + ' {gen("x", max_tokens=4, temperature=0)}'}}).json()
    # Held state: the program holds the only admission slot, so the three jobs wait in the scheduler's queue.
    wait_until(lambda: scheduler.stats.remote().result()["admission"]["queue_depth"] == before["queue_depth"] + 3,
               what="the jobs queued for admission")

    for job in (doomed, doomed_run):
        assert httpx.post(f"{app.base_url}/v1/jobs/{job['id']}/cancel", headers=ALICE,
                          timeout=30).json()["status"] == "cancelled"
    # The runner's abort takes them out of the admission queue: they were never admitted.
    admission = wait_until(lambda: (a := scheduler.stats.remote().result()["admission"])["aborted_total"]
                           >= before["aborted_total"] + 2 and a, what="the queued requests aborted")
    assert admission["aborted_total"] == before["aborted_total"] + 2
    assert admission["queue_depth"] == before["queue_depth"] + 1  # the other job still waits

    go.touch()
    assert wait_status(app.base_url, other["id"], ("succeeded", "failed"))["status"] == "succeeded"
    assert wait_status(app.base_url, holder["id"], ("succeeded", "failed"))["status"] == "succeeded"
    after_engine = replica.stats.remote().result()
    after = scheduler.stats.remote().result()["admission"]
    assert [get_job(app.base_url, j["id"])["status"] for j in (doomed, doomed_run)] == ["cancelled"] * 2
    assert after["admitted_total"] - before["admitted_total"] == 1  # the other job only
    # The engine saw the holder's tail, the short job and health probes, never a 700-token prompt.
    assert after_engine.prompt_tokens_total - before_engine.prompt_tokens_total < 200
    assert after_engine.requests_aborted_total == before_engine.requests_aborted_total


def test_direct_job_bodies_are_checked_at_submission_as_their_route_would(app):
    def submit(path: str, body: dict) -> httpx.Response:
        return httpx.post(f"{app.base_url}/v1/jobs", json={"path": path, "body": body}, headers=ALICE, timeout=30)

    newest = httpx.get(f"{app.base_url}/v1/jobs?limit=1", headers=ALICE, timeout=30).json()["first_id"]
    refused = [
        ("/v1/chat/completions", {"model": MODEL}, 422, "body.messages"),
        ("/v1/chat/completions", {**chat_body("x"), "temperature": "hot"}, 422, "body.temperature"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -3}, 422, "body.max_tokens"),
        ("/v1/completions", {"model": "no-such-model", "prompt": "x"}, 404, "body.model"),
        ("/generate", {"text": "x", "sampling_params": {"temperature": -1}}, 422, "body.sampling_params.temperature"),
        ("/generate", {"sampling_params": {}}, 400, "body.text"),
        ("/run", {"program": "Hi {gen("}, 422, "body.program"),
    ]
    for path, body, status, param in refused:
        response = submit(path, body)
        assert response.status_code == status, (path, body, response.text)
        error = response.json()["error"]  # OpenAI's shape (/run's also gives the line and column)
        assert {"message", "type", "param", "code"} <= set(error) and error["message"]
        assert error["param"] == param, (path, body, error)
    # Nothing was stored for them; a valid body still becomes a job.
    assert httpx.get(f"{app.base_url}/v1/jobs?limit=1", headers=ALICE, timeout=30).json()["first_id"] == newest
    ok = submit("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 2, "temperature": 0}})
    assert ok.status_code == 202, ok.text
    assert wait_status(app.base_url, ok.json()["id"], ("succeeded", "failed"))["status"] == "succeeded"


def test_batch_of_50_with_the_openai_client_matches_one_by_one_runs(app):
    client = openai.OpenAI(base_url=f"{app.base_url}/v1", api_key=KEY_ALICE, max_retries=0, timeout=120)
    bodies = {f"req-{i}": chat_body(f"Tell me about the number {i}.", max_tokens=6) for i in range(50)}
    lines = [{"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}
             for cid, body in bodies.items()]
    lines.append({"custom_id": "bad", "method": "POST", "url": "/v1/embeddings", "body": {}})  # 51st: bad
    lines.append({"custom_id": "bad-body", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": MODEL}})  # 52nd: its route would refuse it (no messages)
    data = "\n".join(json.dumps(line) for line in lines).encode()
    uploaded = client.files.create(file=("batch.jsonl", data), purpose="batch")
    assert uploaded.bytes == len(data) and client.files.retrieve(uploaded.id).purpose == "batch"
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"run": "test"})
    assert batch.status == "in_progress" and batch.request_counts.total == 52

    import time
    deadline = time.monotonic() + 600
    while batch.status not in ("completed", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.completed, batch.request_counts.failed) == (50, 2)
    assert batch.id in [b.id for b in client.batches.list()]

    output = [json.loads(l) for l in client.files.content(batch.output_file_id).text.splitlines()]
    errors = [json.loads(l) for l in client.files.content(batch.error_file_id).text.splitlines()]
    assert [e["custom_id"] for e in errors] == ["bad", "bad-body"] and errors[0]["response"] is None
    assert "url must be" in errors[0]["error"]["message"]
    assert errors[1]["response"] is None and "body.messages" in errors[1]["error"]["message"]
    by_id = {o["custom_id"]: o for o in output}
    assert set(by_id) == set(bodies)
    for cid, body in bodies.items():
        direct = client.chat.completions.create(**body)
        line = by_id[cid]
        assert line["error"] is None and line["response"]["status_code"] == 200
        batched = line["response"]["body"]["choices"][0]["message"]["content"]
        assert batched == direct.choices[0].message.content, cid


def test_bad_input_gets_openai_shaped_errors(app):
    base = app.base_url
    for path in ("/v1/jobs/job_nope", "/v1/batches/batch_nope", "/v1/files/file_nope", "/v1/files/file_nope/content"):
        assert_error(httpx.get(f"{base}{path}", headers=ALICE, timeout=30), 404)
    mine = httpx.post(f"{base}/v1/jobs", json={"path": "/v1/completions", "body": {
        "model": MODEL, "prompt": "x", "max_tokens": 1}}, headers=ALICE, timeout=30).json()
    assert_error(httpx.get(f"{base}/v1/jobs/{mine['id']}", headers=BOB, timeout=30), 404)
    assert_error(httpx.post(f"{base}/v1/jobs/{mine['id']}/cancel", headers=BOB, timeout=30), 404)

    for url in ("http://127.0.0.1:9/hook", "http://localhost:9/hook", "http://169.254.169.254/"):
        error = assert_error(httpx.post(f"{base}/v1/chat/completions", json={**chat_body("x"), "callback_url": url},
                                        headers=ALICE, timeout=30), 422)
        assert error["param"] == "callback_url"
    assert_error(httpx.post(f"{base}/v1/jobs", json={"path": "/v1/completions", "body": {},
                            "callback_url": "http://127.0.0.1:9/"}, headers=ALICE, timeout=30), 422)
    assert_error(httpx.post(f"{base}/v1/chat/completions", json=chat_body("x"),
                            headers={**ALICE, "X-Max-Wait-S": "-1"}, timeout=30), 422)
    assert_error(httpx.post(f"{base}/v1/jobs", json={"path": "/v1/nope", "body": {}}, headers=ALICE, timeout=30), 422)

    big = b'{"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {"prompt": "' + b"a" * (300 * 1024) + b'"}}\n'
    error = assert_error(httpx.post(f"{base}/v1/files", files={"file": ("big.jsonl", big)},
                                    data={"purpose": "batch"}, headers=ALICE, timeout=30), 413)
    assert "max_file_bytes" in error["message"]
    broken = b'{"custom_id": "a"}\n{"custom_id": "b", oops}\n'
    error = assert_error(httpx.post(f"{base}/v1/files", files={"file": ("b.jsonl", broken)},
                                    data={"purpose": "batch"}, headers=ALICE, timeout=30), 400)
    assert "line 2" in error["message"]
    ok = httpx.post(f"{base}/v1/files", files={"file": ("a.jsonl", b'{"custom_id": "a"}\n')},
                    data={"purpose": "batch"}, headers=ALICE, timeout=30).json()
    assert_error(httpx.get(f"{base}/v1/files/{ok['id']}", headers=BOB, timeout=30), 404)
    assert_error(httpx.post(f"{base}/v1/batches", json={"input_file_id": ok["id"], "endpoint": "/v1/chat/completions",
                            "completion_window": "24h"}, headers=BOB, timeout=30), 404)
