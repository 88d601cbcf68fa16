"""SGLang's native HTTP API, field by field, against the real stack."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def http(stack) -> httpx.Client:
    with httpx.Client(base_url=stack.base_url, timeout=120) as client:
        yield client


def test_generate_single_text(http):
    body = http.post("/generate", json={"text": "Hello", "sampling_params": {"max_new_tokens": 5, "temperature": 0}}).json()
    assert set(body) == {"text", "output_ids", "meta_info"}
    meta = body["meta_info"]
    assert meta["completion_tokens"] == len(body["output_ids"]) <= 5
    assert meta["prompt_tokens"] > 0 and meta["finish_reason"]["type"] in ("stop", "length")
    assert isinstance(meta["id"], str) and meta["e2e_latency"] > 0


def test_generate_batch_of_ids_and_texts(http):
    texts = http.post("/generate", json={"text": ["a b", "c d e"], "sampling_params": {"max_new_tokens": 3, "temperature": 0}}).json()
    assert [item["index"] for item in texts] == [0, 1]
    ids = [[0, 500, 600], [0, 700]]
    by_ids = http.post("/generate", json={"input_ids": ids, "sampling_params": [{"max_new_tokens": 2}, {"max_new_tokens": 4}]}).json()
    assert [item["meta_info"]["prompt_tokens"] for item in by_ids] == [3, 2]
    assert by_ids[0]["meta_info"]["completion_tokens"] <= 2 and by_ids[1]["meta_info"]["completion_tokens"] <= 4


def test_stream_sends_cumulative_text(http):
    with http.stream("POST", "/generate", json={"text": "Once", "stream": True,
                                                "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}}) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    texts = [e["text"] for e in events]
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    final = http.post("/generate", json={"text": "Once", "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}}).json()
    assert texts[-1] == final["text"]
    assert events[-1]["meta_info"]["completion_tokens"] == 12


def test_logprobs_fields(http):
    meta = http.post("/generate", json={
        "text": "The sky is", "sampling_params": {"max_new_tokens": 3, "temperature": 0},
        "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2, "return_text_in_logprobs": True,
    }).json()["meta_info"]
    assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"]
    assert meta["input_token_logprobs"][0][0] is None  # the first token has no logprob
    assert len(meta["output_token_logprobs"]) == meta["completion_tokens"]
    assert all(len(top) == 2 for top in meta["output_top_logprobs"])


def test_bad_sampling_params_are_422_naming_the_field(http):
    resp = http.post("/generate", json={"text": "x", "sampling_params": {"temperature": -1}})
    assert resp.status_code == 422
    assert resp.json()["error"]["param"] == "sampling_params.temperature"
    unknown = http.post("/generate", json={"text": "x", "sampling_params": {"tempurature": 1}})
    assert unknown.status_code == 422 and "tempurature" in unknown.json()["error"]["param"]


def test_model_info_server_info_health_generate_flush(http):
    info = http.get("/get_model_info").json()
    assert info["model_path"] == "sglserve/tiny-llama" and info["is_generation"] is True
    server = http.get("/server_info").json()
    assert http.get("/get_server_info").json().keys() == server.keys()  # SGLang's alias
    assert server["engine"]["kind"] == "embedded" and len(server["internal_states"]) == 1
    assert http.get("/health_generate").status_code == 200
    flushed = http.post("/flush_cache")
    assert flushed.status_code == 200 and "1 replica" in flushed.text


def test_abort_request_ends_a_running_generation(stack, http):
    rid = "abort-me-1"
    result: dict = {}

    def run() -> None:
        result["body"] = httpx.post(f"{stack.base_url}/generate", timeout=120, json={
            "text": "Tell me everything", "rid": rid,
            "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True},
        }).json()

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 20
    while stack.replica_stats().num_running == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert http.post("/abort_request", json={"rid": rid}).json() == {"aborted": 1}
    worker.join(timeout=30)
    assert result["body"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert result["body"]["meta_info"]["completion_tokens"] < 3000
