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
