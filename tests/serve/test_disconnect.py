"""A client that goes away mid-stream frees its request in the engine: no decoding for nobody."""

from __future__ import annotations

import time

import httpx
import pytest

pytestmark = pytest.mark.serve

MODEL = "sglserve/tiny-llama"


def wait_until(predicate, timeout_s: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def test_closing_a_stream_aborts_the_request_in_the_engine(stack):
    before = stack.replica_stats()
    body = {
        "model": MODEL, "prompt": "Once upon a time", "max_tokens": 3000,
        "ignore_eos": True, "stream": True, "temperature": 0,
    }
    with httpx.Client(base_url=stack.base_url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            seen = 0
            for line in lines:
                if line.startswith("data: "):
                    seen += 1
                if seen >= 3:
                    break
            assert stack.replica_stats().num_running >= 1
        closed_at = time.monotonic()
    gone_after = wait_until(lambda: stack.replica_stats().num_running == 0, timeout_s=5)
    assert gone_after is not None, "the engine kept decoding for a client that left"
    assert time.monotonic() - closed_at < 5
    assert gone_after < 1.0, f"request freed only after {gone_after:.2f}s"
    after = stack.replica_stats()
    assert after.requests_aborted_total == before.requests_aborted_total + 1
    assert after.generation_tokens_total - before.generation_tokens_total < 3000
