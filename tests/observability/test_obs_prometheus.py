"""A real Prometheus scrapes the test cluster's Ray metrics port while real requests go through the
session's application; its HTTP API must show our series, with the labels we promise and counts
equal to what was sent."""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.serve

MODEL = "sglserve/tiny-llama"
APP = 'application="sglserve"'


def _chat(base: str, content: str, max_tokens: int) -> dict:
    resp = httpx.post(
        f"{base}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": content}],
              "max_tokens": max_tokens, "temperature": 0},
        timeout=120,
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["usage"]


def _streamed_completion(base: str, prompt: str, max_tokens: int) -> dict:
    usage = None
    with httpx.stream(
        "POST",
        f"{base}/v1/completions",
        json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
              "stream": True, "stream_options": {"include_usage": True}},
        timeout=120,
    ) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[len("data: "):])
                usage = chunk.get("usage") or usage
    assert usage is not None
    return usage


def _native_generate(base: str, text: str, max_new_tokens: int) -> dict:
    resp = httpx.post(
        f"{base}/generate",
        json={"text": text, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}},
        timeout=120,
    )
    assert resp.status_code == 200, resp.text
    meta = resp.json()["meta_info"]
    return {"prompt_tokens": meta["prompt_tokens"], "completion_tokens": meta["completion_tokens"]}


COUNTS = {
    "sequences": f"sum(ray_sglserve_num_requests_total{{{APP}}})",
    "prompt": f"sum(ray_sglserve_prompt_tokens_total{{{APP}}})",
    "generated": f"sum(ray_sglserve_generation_tokens_total{{{APP}}})",
    "ttft": f"sum(ray_sglserve_time_to_first_token_seconds_count{{{APP}}})",
    "e2e": f"sum(ray_sglserve_e2e_request_latency_seconds_count{{{APP}}})",
    "to_engine": f'sum(ray_sglserve_framework_overhead_seconds_count{{{APP},stage="ingress_to_engine"}})',
    "from_engine": f'sum(ray_sglserve_framework_overhead_seconds_count{{{APP},stage="engine_to_ingress"}})',
    "queue": f"sum(ray_sglserve_queue_time_seconds_count{{{APP}}})",
    "chat_200": f'sum(ray_sglserve_http_requests_total{{{APP},endpoint="/v1/chat/completions",status_code="200"}})',
    "chat_404": f'sum(ray_sglserve_http_requests_total{{{APP},endpoint="/v1/chat/completions",status_code="404"}})',
}


def _selector(summed: str) -> str:
    """`sum(metric{...})` -> `metric{...}`."""
    assert summed.startswith("sum(") and summed.endswith(")")
    return summed[len("sum("):-1]


def test_prometheus_sees_our_series_with_counts_matching_the_traffic(stack, prometheus):
    # Per-series snapshots, once earlier traffic has landed: a sum over all series drops when an
    # earlier stack's series go away.
    before = prometheus.settled(lambda: {k: prometheus.series(_selector(COUNTS[k])) for k in COUNTS})

    usages = [_chat(stack.base_url, f"Tell me about the number {i}", 6 + i) for i in range(3)]
    usages += [_streamed_completion(stack.base_url, f"Once upon a time {i}", 12) for i in range(2)]
    usages.append(_native_generate(stack.base_url, "The capital of France is", 5))
    missing_model = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )
    assert missing_model.status_code == 404
    sent = len(usages)
    expected = {
        "sequences": sent,
        "prompt": sum(u["prompt_tokens"] for u in usages),
        "generated": sum(u["completion_tokens"] for u in usages),
        "ttft": sent,
        "e2e": sent,
        "to_engine": sent,
        "from_engine": sent,
        "chat_200": 3,
        "chat_404": 1,
    }

    def deltas() -> dict[str, float]:
        return {k: prometheus.increase(_selector(COUNTS[k]), before[k]) for k in COUNTS}

    seen: dict[str, float] = {}

    def matches() -> bool:
        seen.update(deltas())
        # Readiness probes are admitted (and timed) too, so the queue-time count may be higher.
        return all(seen[k] == v for k, v in expected.items()) and seen["queue"] >= sent

    try:
        prometheus.wait_for(matches, what=f"the deltas {expected}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {seen}") from None
    _, final = prometheus.at_one_scrape(deltas, after=0)  # and nothing more arrives
    assert {k: final[k] for k in expected} == expected

    # Labels: our model label plus the ones Ray Serve adds, on every deployment's metrics.
    metrics = {
        "ray_sglserve_num_requests_total": "Ingress",
        "ray_sglserve_queue_time_seconds_count": "Scheduler",
        "ray_sglserve_token_usage": "ModelReplica",
    }
    _, found = prometheus.at_one_scrape(lambda: {m: prometheus.query(f"{m}{{{APP}}}") for m in metrics}, after=0)
    for metric, deployment in metrics.items():
        assert found[metric], f"no {metric} series"
        labels = found[metric][0]["metric"]
        assert labels["model_name"] == MODEL
        assert labels["deployment"] == deployment
        assert labels["replica"]
    reasons = {s["metric"]["finish_reason"] for s in found["ray_sglserve_num_requests_total"]}
    assert reasons <= {"stop", "length", "abort", "error", "client_disconnect"} and reasons & {"stop", "length"}


def test_gauges_show_engine_and_scheduler_limits(stack, prometheus):
    """The gauges carry what the scheduler and the engine report about themselves."""
    kv_capacity = stack.replica_stats().max_total_tokens
    seen: dict[str, float] = {}

    def limits_match() -> bool:
        # Adaptive in-flight control may move the limit: compare with the scheduler's current one.
        seen["limit"] = prometheus.value(f"max(ray_sglserve_scheduler_max_in_flight{{{APP}}})")
        seen["scheduler"] = stack.handle("Scheduler").stats.remote().result()["admission"]["max_concurrent"]
        seen["kv"] = prometheus.value(f"max(ray_sglserve_max_total_tokens{{{APP}}})")
        return seen["limit"] == seen["scheduler"] and seen["kv"] == kv_capacity > 0

    try:
        prometheus.wait_for(limits_match, what="the in-flight limit and the KV capacity")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {seen}, KV capacity {kv_capacity}") from None
    gauges = ("num_running_reqs", "num_queue_reqs", "num_used_tokens", "cache_hit_rate",
              "gen_throughput", "scheduler_queued_requests", "scheduler_in_flight_requests")

    def read_gauges() -> tuple[float, dict[str, list]]:
        usage = prometheus.value(f"max(ray_sglserve_token_usage{{{APP}}})")
        return usage, {g: prometheus.query(f"ray_sglserve_{g}{{{APP}}}") for g in gauges}

    _, (usage, found) = prometheus.at_one_scrape(read_gauges, after=0)
    assert 0.0 <= usage <= 1.0
    for gauge in gauges:
        assert found[gauge], f"no series for {gauge}"


def test_a_closed_stream_counts_as_a_client_disconnect(stack, prometheus):
    expr = f'sum(ray_sglserve_aborted_requests_total{{{APP},reason="client_disconnect"}})'
    before = prometheus.settled_values([expr])[expr]
    with httpx.stream(
        "POST",
        f"{stack.base_url}/v1/completions",
        json={"model": MODEL, "prompt": "Count forever:", "max_tokens": 400, "temperature": 0,
              "ignore_eos": True, "stream": True},
        timeout=60,
    ) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
    prometheus.wait_for(lambda: prometheus.value(expr) - before == 1, what="one client_disconnect abort")
