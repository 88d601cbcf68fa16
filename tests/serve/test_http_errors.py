"""Raw HTTP: SSE framing, headers, and the error body and status for each kind of bad input."""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.serve

MODEL = "sglserve/tiny-llama"


@pytest.fixture(scope="module")
def http(stack) -> httpx.Client:
    with httpx.Client(base_url=stack.base_url, timeout=120) as client:
        yield client


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def test_sse_framing_and_done(http):
    with http.stream(
        "POST", "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True},
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers.get("x-request-id")
        raw = resp.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_request_id_is_echoed(http):
    resp = http.get("/v1/models", headers={"X-Request-Id": "abc-123"})
    assert resp.headers["x-request-id"] == "abc-123"


def test_malformed_json_is_400(http):
    resp = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_openai_error(resp, 400)


def test_wrong_type_is_422_naming_the_field(http):
    resp = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"})
    error = assert_openai_error(resp, 422, param="temperature")
    assert "temperature" in error["message"]


def test_missing_field_is_422(http):
    resp = http.post("/v1/chat/completions", json={"model": MODEL})
    assert_openai_error(resp, 422, param="messages")


def test_bad_nested_field_is_named(http):
    resp = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]})
    assert_openai_error(resp, 422, param="messages[0].role")


def test_out_of_range_value_is_422(http):
    resp = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "top_p": 3})
    assert_openai_error(resp, 422, param="top_p")


def test_prompt_longer_than_context_is_400_with_both_numbers(http):
    prompt = list(range(10, 20)) * 500  # 5,000 token ids > 4,096 context
    resp = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 4})
    error = assert_openai_error(resp, 400, param="prompt")
    assert "5000" in error["message"] and "4096" in error["message"]
    assert error["code"] == "context_length_exceeded"


def test_unknown_model_is_404(http):
    resp = http.post("/v1/chat/completions", json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})
    error = assert_openai_error(resp, 404, param="model")
    assert "gpt-9" in error["message"]


def test_unknown_route_is_404_in_openai_shape(http):
    assert_openai_error(http.get("/v1/nothing-here"), 404)


def test_invalid_json_schema_is_422(http):
    resp = http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}},
    })
    assert_openai_error(resp, 422)


def test_a_stream_refused_below_the_ingress_gets_a_status_not_an_error_event(http):
    """The engine refuses the request (input logprobs from token 500 of a 2-token prompt: only the
    engine knows the prompt's length in tokens) before its first token. The client gets the 400 as
    the HTTP status with OpenAI's error body, not a 200 stream holding an error event."""
    body = {"text": "hi", "stream": True, "return_logprob": True, "logprob_start_len": 500,
            "sampling_params": {"max_new_tokens": 4}}
    with http.stream("POST", "/generate", json=body) as resp:
        resp.read()
    assert resp.headers["content-type"].startswith("application/json")
    error = assert_openai_error(resp, 400, param="logprob_start_len")
    assert "500" in error["message"]


def test_a_stream_that_cannot_start_is_a_status_on_every_streaming_route(http):
    """The OpenAI routes too: a grammar that does not compile is refused by the engine's grammar
    compiler, below the Ingress and before any token, so the stream's answer is that 422."""
    body = {"model": MODEL, "prompt": "hi", "stream": True, "max_tokens": 4, "regex": "(unclosed"}
    with http.stream("POST", "/v1/completions", json=body) as resp:
        resp.read()
    assert_openai_error(resp, 422)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 4,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}}
    with http.stream("POST", "/v1/chat/completions", json=chat) as resp:
        resp.read()
    assert_openai_error(resp, 422)


def test_health_and_ready(http):
    assert http.get("/health").json() == {"status": "ok"}
    ready = http.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
