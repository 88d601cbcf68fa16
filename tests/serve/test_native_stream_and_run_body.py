"""Native API details the peer suites rely on, against the real (tiny-model) stack:
streamed logprobs per chunk as in SGLang 0.5.23, no broken UTF-8 at a chunk's end, and /run's
`script` body (the reference client's) next to `program`."""

from __future__ import annotations

import json

import httpx
import pytest

from app.streaming import stable_text

pytestmark = pytest.mark.serve
TIMEOUT_S = 120


def stream_events(base_url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{base_url}/generate", json={**body, "stream": True},
                      timeout=TIMEOUT_S) as resp:
        assert resp.status_code == 200, resp.read()
        return [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]


def test_streamed_logprobs_come_per_chunk_with_the_running_length(stack):
    body = {"text": "Once upon a time", "return_logprob": True,
            "sampling_params": {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}}
    events = stream_events(stack.base_url, body)
    assert len(events) >= 2
    seen: list = []
    previous_tokens = 0
    for event in events:
        meta = event["meta_info"]
        chunk = meta["output_token_logprobs"]
        assert len(chunk) == meta["completion_tokens"] - previous_tokens  # only the new ones
        assert meta["output_token_logprobs_length"] == meta["completion_tokens"]
        assert [entry[1] for entry in chunk] == event["output_ids"][previous_tokens:]
        seen += chunk
        previous_tokens = meta["completion_tokens"]
    whole = httpx.post(f"{stack.base_url}/generate", json=body, timeout=TIMEOUT_S).json()
    assert whole["meta_info"]["output_token_logprobs_length"] == 24
    assert [e[1] for e in seen] == [e[1] for e in whole["meta_info"]["output_token_logprobs"]]
    assert all(abs(a[0] - b[0]) < 1e-4
               for a, b in zip(seen, whole["meta_info"]["output_token_logprobs"]))


def test_stream_chunks_never_end_in_a_broken_character(stack):
    # The tiny model's vocabulary has Chinese; characters split across tokens are common.
    for prompt in ["中文的句子，", "数据和代码", "你好"]:
        events = stream_events(stack.base_url, {"text": prompt, "sampling_params": {
            "max_new_tokens": 40, "temperature": 1.0, "seed": 7, "ignore_eos": True}})
        for event in events[:-1]:
            assert not event["text"].endswith("\ufffd"), event["text"]
        texts = [e["text"] for e in events]
        assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))


def test_stable_text_holds_a_replacement_tail_until_the_end():
    assert stable_text("ab\ufffd\ufffd", finished=False) == "ab"
    assert stable_text("ab\ufffd", finished=True) == "ab\ufffd"
    assert stable_text("a\ufffdb", finished=False) == "a\ufffdb"  # only a tail is pending


def test_run_accepts_script_as_well_as_program(stack):
    program = 'Q: 1+1?\nA:{gen("a", max_tokens=4, temperature=0)}'
    by_program = httpx.post(f"{stack.base_url}/run", json={"program": program},
                            timeout=TIMEOUT_S)
    by_script = httpx.post(f"{stack.base_url}/run", json={"script": program}, timeout=TIMEOUT_S)
    assert by_program.status_code == by_script.status_code == 200, by_script.text
    assert by_script.json()["variables"] == by_program.json()["variables"]


@pytest.mark.parametrize("body", [{"script": "a", "program": "b"}, {"arguments": {}}])
def test_run_needs_exactly_one_of_script_and_program(stack, body):
    resp = httpx.post(f"{stack.base_url}/run", json=body, timeout=TIMEOUT_S)
    assert resp.status_code == 422
    error = resp.json()["error"]
    assert "program" in error["message"] and "script" in error["message"]


def test_openapi_schema_lists_script_and_program(stack):
    schema = httpx.get(f"{stack.base_url}/openapi.json", timeout=TIMEOUT_S).json()
    operation = schema["paths"]["/run"]["post"]
    ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    properties = schema["components"]["schemas"][ref.rsplit("/", 1)[-1]]["properties"]
    assert {"script", "program"} <= set(properties)
