"""The whole sglserve application on a GPU, over HTTP: Ray Serve (Ingress -> Scheduler ->
ModelReplica) with `engine.kind: sglang`, started by `serve run deploy/serve_config.gpu.bench.yaml`
on the GPU machine (scripts/gpu/bench_vs_launch_server.sh starts it, benchmarks it, then runs this
module against it with SGLSERVE_GPU_BASE_URL set). Real clients only: the `openai` package, raw
HTTP for the native API, SSE and /run, a Prometheus scrape of Ray's metrics endpoint.

Skipped unless SGLSERVE_GPU_BASE_URL names a running application (so: skipped on CPU machines and
in CI). The model has dummy (random) weights, so these tests assert shapes, counts, statuses and
error bodies, never the text itself.
"""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest

BASE_URL = os.environ.get("SGLSERVE_GPU_BASE_URL", "")
MODEL = os.environ.get("SGLSERVE_GPU_MODEL", "llama8b-shape")
METRICS_URL = os.environ.get("SGLSERVE_GPU_METRICS_URL", "http://127.0.0.1:8080/metrics")
CONTEXT_LENGTH = int(os.environ.get("SGLSERVE_GPU_CONTEXT_LENGTH", "8192"))

pytestmark = pytest.mark.skipif(not BASE_URL, reason="no GPU application: SGLSERVE_GPU_BASE_URL is unset")


@pytest.fixture(scope="module")
def http():
    with httpx.Client(base_url=BASE_URL, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def client():
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{BASE_URL}/v1", api_key="unused", max_retries=0, timeout=120)


def engine_states(http: httpx.Client) -> list[dict]:
    resp = http.get("/server_info")
    assert resp.status_code == 200, resp.text
    return resp.json()["internal_states"]


def wait_until(predicate, timeout_s: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


# ----------------------------------------------------------------------------- OpenAI API
def test_the_model_is_listed(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_returns_the_tokens_asked_for(client):
    out = client.completions.create(model=MODEL, prompt="The GPU says", max_tokens=24, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 24 and out.usage.prompt_tokens > 0
    assert out.choices[0].finish_reason == "length"


def test_chat_stream_carries_every_token_and_ends_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to ten."}], max_tokens=40,
        temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 40
    assert text  # random weights still decode to some text


def test_n_and_batched_prompts(client):
    out = client.completions.create(model=MODEL, prompt=["a", "b"], n=3, max_tokens=4, temperature=0.8,
                                    extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == list(range(6))
    assert out.usage.completion_tokens == 6 * 4


def test_json_schema_output_parses(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "json please"}], max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})
    if out.choices[0].finish_reason == "stop":  # random weights may run out of tokens first
        assert isinstance(json.loads(out.choices[0].message.content)["ok"], bool)


# ----------------------------------------------------------------------------- native API
def test_native_generate_streams_cumulative_text(http):
    body = {"text": "Once upon a time", "stream": True,
            "sampling_params": {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True}}
    events = []
    with http.stream("POST", "/generate", json=body) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
    counts = [e["meta_info"]["completion_tokens"] for e in events]
    assert counts == sorted(counts) and counts[-1] == 32
    texts = [e["text"] for e in events]
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_native_generate_with_input_ids_and_logprobs(http):
    resp = http.post("/generate", json={
        "input_ids": [10, 11, 12, 13], "return_logprob": True,
        "sampling_params": {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}})
    assert resp.status_code == 200, resp.text
    meta = resp.json()["meta_info"]
    assert meta["prompt_tokens"] == 4 and meta["completion_tokens"] == 5
    assert len(meta["output_token_logprobs"]) == 5
    assert all(lp <= 0 for lp, _tok, *_ in meta["output_token_logprobs"])


def test_a_repeated_prompt_is_served_from_the_prefix_cache(http):
    prompt = "shared prefix " * 200
    body = {"text": prompt, "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
    first = http.post("/generate", json=body).json()["meta_info"]
    second = http.post("/generate", json=body).json()["meta_info"]
    assert second["cached_tokens"] >= first["prompt_tokens"] - 2 > 0


# ----------------------------------------------------------------------------- abort, /run, metrics
def test_closing_a_stream_aborts_the_request_in_the_engine(http):
    before = sum(s["requests_aborted_total"] for s in engine_states(http))
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6000, "ignore_eos": True,
            "stream": True, "temperature": 0}
    with httpx.Client(base_url=BASE_URL, timeout=60) as own:
        with own.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            seen = 0
            for line in resp.iter_lines():
                seen += line.startswith("data: ")
                if seen >= 3:
                    break
            assert sum(s["num_running"] for s in engine_states(http)) >= 1
    freed = wait_until(lambda: sum(s["num_running"] for s in engine_states(http)) == 0, timeout_s=10)
    assert freed is not None, "the engine kept decoding for a client that left"
    assert freed < 2.0, f"request freed only after {freed:.2f}s"
    assert sum(s["requests_aborted_total"] for s in engine_states(http)) == before + 1


def test_run_executes_a_program_on_the_gpu_replica(http):
    program = '{user}Name a colour.{/user}{assistant}{gen("c", max_tokens=6)}{/assistant}' \
              'Sure? {select("v", options=["yes", "no"])}'
    resp = http.post("/run", json={"program": program, "sampling": {"temperature": 0}})
    assert resp.status_code == 200, resp.text
    result = resp.json()
    assert result["variables"]["v"] in ("yes", "no")
    assert isinstance(result["variables"]["c"], str)
    assert result["meta"]["engine_calls"] >= 2 and result["meta"]["completion_tokens"] > 0


def test_prometheus_metrics_count_the_generated_tokens(http):
    def generated() -> float:
        try:
            text = httpx.get(METRICS_URL, timeout=10).text
        except httpx.HTTPError:
            return -1.0
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("ray_sglserve_generation_tokens_total"))

    before = generated()
    http.post("/generate", json={"text": "count me", "sampling_params": {"max_new_tokens": 16, "ignore_eos": True}})
    assert wait_until(lambda: generated() >= before + 16, timeout_s=30) is not None, before


# ----------------------------------------------------------------------------- bad input on the GPU
def test_prompt_over_the_context_is_400_context_length_exceeded(http):
    prompt = list(range(10, 20)) * (CONTEXT_LENGTH // 10 + 100)
    resp = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 4})
    error = assert_openai_error(resp, 400, param="prompt")
    assert error["code"] == "context_length_exceeded"
    assert str(len(prompt)) in error["message"] and str(CONTEXT_LENGTH) in error["message"]


def test_invalid_json_schema_is_422(http):
    resp = http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}})
    assert_openai_error(resp, 422)


def test_invalid_regex_is_an_error_not_a_crash(http):
    resp = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "regex": "(unclosed", "max_tokens": 4})
    assert_openai_error(resp, resp.status_code)
    assert 400 <= resp.status_code < 500


def test_n_beyond_the_limit_is_422_naming_n(http):
    resp = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "n": 1000, "max_tokens": 1})
    assert_openai_error(resp, 422, param="n")


def test_a_token_id_outside_the_vocabulary_is_refused_and_the_engine_survives(http):
    resp = http.post("/generate", json={"input_ids": [1, 10**7], "sampling_params": {"max_new_tokens": 2}})
    assert 400 <= resp.status_code < 500, resp.text
    assert http.get("/ready").status_code == 200


def test_the_application_is_still_ready_after_everything(http):
    assert http.get("/ready").status_code == 200
    assert sum(s["num_running"] for s in engine_states(http)) == 0
