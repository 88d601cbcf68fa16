"""Admission over HTTP: a full queue answers 503 with Retry-After at once, without a replica.

The scheduler admits one request and queues one (max_concurrent=1, max_queue=1). The test fills
both places with /run programs that call a server-side function holding them until the test
releases them (tests/serve/admission_hold_functions.py), and waits until the scheduler reports
them admitted and queued: no timing assumption about how long a generation takes."""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import deploy, serve_args

pytestmark = pytest.mark.serve

MODEL = "sglserve/tiny-llama"
DEADLINE_S = 120.0


@pytest.fixture(scope="module")
def tiny_queue(ray_cluster, tiny_model_path):
    args = serve_args(scheduler={"max_concurrent": 1, "max_queue": 1, "max_queue_wait_s": 120,
                                 "adaptive_concurrency": False},
                      run={"function_modules": ["tests.serve.admission_hold_functions"]})
    stack = deploy(ray_cluster, "tinyq", "/tinyq", args,
                   replica_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.2}})
    yield stack
    from ray import serve

    serve.delete("tinyq")


def admission(stack) -> dict:
    return stack.handle("Scheduler").stats.remote().result(timeout_s=60)["admission"]


def test_full_queue_is_503_with_retry_after(tiny_queue, tmp_path: Path):
    release = tmp_path / f"release-{uuid.uuid4().hex}"
    held = {"program": f'held: {{hold.until_released("{release}")}}'}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        running = [pool.submit(httpx.post, f"{tiny_queue.base_url}/run", json=held, timeout=DEADLINE_S)
                   for _ in range(2)]  # one admitted, one queued
        try:
            deadline = time.monotonic() + DEADLINE_S
            while (a := admission(tiny_queue))["in_flight"] < 1 or a["queue_depth"] < 1:
                assert time.monotonic() < deadline, f"the held requests never filled the scheduler: {a}"
                assert not any(f.done() for f in running), [f.result().text for f in running if f.done()]
                time.sleep(0.05)
            refused = httpx.post(f"{tiny_queue.base_url}/v1/completions",
                                 json={"model": MODEL, "prompt": "go", "max_tokens": 1}, timeout=60)
            refused_streams = [httpx.post(f"{tiny_queue.base_url}{path}", json=body, timeout=60) for path, body in (
                ("/v1/completions", {"model": MODEL, "prompt": "go", "max_tokens": 1, "stream": True}),
                ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "go"}],
                                          "max_tokens": 1, "stream": True}),
                ("/generate", {"text": "go", "sampling_params": {"max_new_tokens": 1}, "stream": True}),
            )]
            # Answered while both places are still held: refused at once, it did not wait for one.
            assert not any(f.done() for f in running)
        finally:
            release.touch()
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        error = refused.json()["error"]
        assert error["type"] == "overloaded_error" and error["message"]
        for stream in refused_streams:  # refused before a first token: the status, not a 200 stream
            assert stream.status_code == 503, stream.text
            assert int(stream.headers["retry-after"]) >= 1
            assert stream.json()["error"]["type"] == "overloaded_error"
        assert [f.result().status_code for f in running] == [200, 200]
        assert [f.result().json()["text"] for f in running] == ["held: released"] * 2


def test_batched_admits_answer_each_request_on_its_own(tiny_queue, tmp_path: Path):
    """Through the Ingress's batched admits (Scheduler.admit_many): with the one slot held, three
    concurrent completions get one place in the queue and two 503s, each its own answer; the
    queued one is served once the slot comes free."""
    release = tmp_path / f"release-{uuid.uuid4().hex}"
    held = {"program": f'held: {{hold.until_released("{release}")}}'}
    body = {"model": MODEL, "prompt": "go", "max_tokens": 1}
    calls_before = tiny_queue.handle("Scheduler").stats.remote().result(timeout_s=60)["calls"]["admit_many"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        holder = pool.submit(httpx.post, f"{tiny_queue.base_url}/run", json=held, timeout=DEADLINE_S)
        try:
            deadline = time.monotonic() + DEADLINE_S
            while admission(tiny_queue)["in_flight"] < 1:
                assert time.monotonic() < deadline and not holder.done()
                time.sleep(0.05)
            completions = [pool.submit(httpx.post, f"{tiny_queue.base_url}/v1/completions", json=body, timeout=DEADLINE_S)
                           for _ in range(3)]
            while sum(f.done() for f in completions) < 2 or admission(tiny_queue)["queue_depth"] < 1:
                assert time.monotonic() < deadline, admission(tiny_queue)
                time.sleep(0.05)
            refused = [f.result() for f in completions if f.done()]
            assert not holder.done()  # both refusals came while the slot was still held
        finally:
            release.touch()
        assert [r.status_code for r in refused] == [503, 503], [r.text for r in refused]
        assert all(r.json()["error"]["type"] == "overloaded_error" and int(r.headers["retry-after"]) >= 1
                   for r in refused)
        served = [f.result() for f in completions if f.result().status_code == 200]
        assert len(served) == 1 and served[0].json()["choices"][0]["text"] is not None
        assert holder.result().status_code == 200
    stats = tiny_queue.handle("Scheduler").stats.remote().result(timeout_s=60)
    assert stats["calls"]["admit_many"] > calls_before and stats["admitting"] == 0
