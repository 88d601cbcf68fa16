"""CUDA out of memory in a step, through the whole Serve application on a GPU.

Runs after tests/gpu/test_serve_stack_gpu.py against the same application (SGLSERVE_GPU_BASE_URL,
started by scripts/gpu/bench_vs_launch_server.sh with OOM_TEST=1), because it costs the replica its
engine: the test empties SGLang's cached activation memory (`/flush_cache`), takes every byte the
GPU has left in this process, and sends a long prompt whose prefill needs fresh activation memory.
SGLang's scheduler dies of the CUDA out-of-memory error. What a client must see: an answer, not a
hang; never a 500; a 503 with Retry-After in OpenAI's error shape (or a 200 if the request was
retried on the replacement); and the application serves again once Ray Serve has replaced the
replica (its health check fails the moment the engine is dead).
"""

from __future__ import annotations

import concurrent.futures
import os
import time

import httpx
import pytest

BASE_URL = os.environ.get("SGLSERVE_GPU_BASE_URL", "")
MODEL = os.environ.get("SGLSERVE_GPU_MODEL", "llama8b-shape")
# The replacement replica starts a new SGLang engine: ~80 s with the kernel caches of the first.
RECOVERY_S = float(os.environ.get("SGLSERVE_GPU_RECOVERY_S", "300"))

pytestmark = pytest.mark.skipif(not BASE_URL, reason="no GPU application: SGLSERVE_GPU_BASE_URL is unset")


def test_cuda_oom_in_a_step_is_a_503_and_the_replica_is_replaced():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device in the test process")
    http = httpx.Client(base_url=BASE_URL, timeout=60)
    assert http.get("/ready").status_code == 200
    assert http.post("/flush_cache").status_code == 200  # SGLang empties its torch cache here

    torch.cuda.init()
    free, total = torch.cuda.mem_get_info()
    hog = torch.empty(max(0, free - 32 * 2**20), dtype=torch.uint8, device="cuda")
    held = hog.numel()
    print(f"OOM test: took {held / 2**30:.1f} GiB of {total / 2**30:.1f} GiB; "
          f"{torch.cuda.mem_get_info()[0] / 2**20:.0f} MiB left")

    prompt = [(i * 7919) % 40000 + 100 for i in range(7900)]  # distinct ids: nothing cached
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(httpx.post, f"{BASE_URL}/generate", json=body, timeout=RECOVERY_S)
        # Give the memory back once SGLang's scheduler is gone (its ~68 GiB come free), so the
        # replacement replica can start its engine.
        engine_died_after = None
        while not answer.done() and time.monotonic() - started < RECOVERY_S:
            if torch.cuda.mem_get_info()[0] > 20 * 2**30:
                engine_died_after = time.monotonic() - started
                break
            time.sleep(0.1)
        del hog
        torch.cuda.empty_cache()
        resp = answer.result(timeout=RECOVERY_S)
    answered_after = time.monotonic() - started
    print(f"OOM test: engine died after {engine_died_after}s; answer {resp.status_code} after "
          f"{answered_after:.1f}s: {resp.text[:300]}")
    assert engine_died_after is not None, (
        f"the engine did not die of the out-of-memory prompt (answer {resp.status_code}: {resp.text[:200]}); "
        "the test's premise failed")
    assert resp.status_code != 500 and resp.status_code < 600
    if resp.status_code != 200:
        assert resp.status_code == 503, resp.text
        assert int(resp.headers["retry-after"]) >= 1
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]

    # The application serves again: Ray Serve replaced the replica and its new engine answers.
    deadline = time.monotonic() + RECOVERY_S
    served = None
    while time.monotonic() < deadline:
        try:
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": "back?", "max_tokens": 4})
        except httpx.HTTPError:
            r = None
        if r is not None:
            assert r.status_code != 500, r.text
            if r.status_code == 200:
                served = time.monotonic() - started
                break
        time.sleep(2)
    print(f"OOM test: served again {served}s after the out-of-memory request")
    assert served is not None, f"nothing served within {RECOVERY_S}s after the out-of-memory step"
    assert http.get("/ready").status_code == 200
