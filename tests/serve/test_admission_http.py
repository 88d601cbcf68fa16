"""Admission over HTTP: a full queue answers 503 with Retry-After at once, without a replica."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from tests.conftest import deploy, serve_args

pytestmark = pytest.mark.serve

MODEL = "sglserve/tiny-llama"


@pytest.fixture(scope="module")
def tiny_queue(ray_cluster, tiny_model_path):
    args = serve_args(scheduler={"max_concurrent": 1, "max_queue": 1, "max_queue_wait_s": 60,
                                 "adaptive_concurrency": False})
    stack = deploy(ray_cluster, "tinyq", "/tinyq", args,
                   replica_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.2}})
    yield stack
    from ray import serve

    serve.delete("tinyq")


def test_full_queue_is_503_with_retry_after(tiny_queue):
    long = {"model": MODEL, "prompt": "go", "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        running = [pool.submit(httpx.post, f"{tiny_queue.base_url}/v1/completions", json=long, timeout=120)
                   for _ in range(2)]  # one in flight, one queued
        time.sleep(1.0)
        started = time.monotonic()
        refused = httpx.post(f"{tiny_queue.base_url}/v1/completions", json={**long, "max_tokens": 1}, timeout=30)
        elapsed = time.monotonic() - started
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        error = refused.json()["error"]
        assert error["type"] == "overloaded_error" and error["message"]
        assert elapsed < 2.0  # answered at once, not after waiting
        assert [f.result().status_code for f in running] == [200, 200]
