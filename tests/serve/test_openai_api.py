"""The OpenAI-compatible API, exercised with the official `openai` client against the real stack."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.serve

MODEL = "sglserve/tiny-llama"


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_completion(client):
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        max_tokens=12,
        temperature=0,
    )
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 5
    assert 1 <= resp.usage.completion_tokens <= 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_chat_stream_equals_non_stream_greedy(client):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens


@pytest.fixture(scope="module")
def coalescing_client(ray_cluster, tiny_model_path):
    """An app whose replica holds every token after the first text until the stream ends (the
    coalescing interval is 10 minutes): whatever the machine's speed, the Ingress receives a
    stream as two increments, the second holding all but the first token (app/streaming.py)."""
    from ray import serve

    from tests.conftest import deploy, serve_args

    args = serve_args(scheduler={"stream_interval_ms": 600_000, "max_stream_interval_ms": 600_000,
                                 "decoding_chunk_size": 10_000})
    app = deploy(ray_cluster, "coalesced", "/coalesced", args,
                 replica_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.2}})
    yield openai.OpenAI(base_url=f"{app.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    serve.delete(app.app_name)


def test_a_stream_of_n_tokens_sends_n_chunks(coalescing_client):
    # The replica coalesces tokens for the hop to the Ingress; the client still gets one chunk per
    # token, as from SGLang's own server (what bench_serving's ITL counts). With logprobs every
    # token's chunk carries its one logprob entry, even a token whose text is still incomplete.
    client, n = coalescing_client, 24
    messages = [{"role": "user", "content": "Count the waves."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=n, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert full.usage.completion_tokens == n
    chunks = [c for c in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=n, temperature=0, stream=True, logprobs=True,
        extra_body={"ignore_eos": True}) if c.choices and c.choices[0].logprobs]
    assert len(chunks) == n
    assert all(len(c.choices[0].logprobs.content) == 1 for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    # /v1/completions too; without logprobs, a chunk for each token that brings text.
    with_logprobs = [c.choices[0] for c in client.completions.create(
        model=MODEL, prompt="Count the waves.", max_tokens=n, temperature=0, stream=True, logprobs=0,
        extra_body={"ignore_eos": True}) if c.choices and c.choices[0].logprobs]
    assert len(with_logprobs) == n and all(len(c.logprobs.tokens) == 1 for c in with_logprobs)
    bare = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Count the waves.", max_tokens=n, temperature=0, stream=True,
        extra_body={"ignore_eos": True}) if c.choices and c.choices[0].text]
    assert bare == [c.text for c in with_logprobs if c.text] and len(bare) >= n // 2


def test_completion_and_stream(client):
    full = client.completions.create(model=MODEL, prompt="The river", max_tokens=10, temperature=0)
    assert full.choices[0].text and full.usage.completion_tokens <= 10
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=MODEL, prompt="The river", max_tokens=10, temperature=0, stream=True)
        if c.choices
    )
    assert streamed == full.choices[0].text


def test_completion_batch_prompts_and_n(client):
    resp = client.completions.create(
        model=MODEL, prompt=["one", "two"], max_tokens=4, n=2, temperature=0.8, seed=7
    )
    assert sorted(c.index for c in resp.choices) == [0, 1, 2, 3]
    again = client.completions.create(
        model=MODEL, prompt=["one", "two"], max_tokens=4, n=2, temperature=0.8, seed=7
    )
    assert [c.text for c in resp.choices] == [c.text for c in again.choices]  # seeded: reproducible


def test_completion_echo_and_logprobs(client):
    resp = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0, logprobs=2, echo=True)
    choice = resp.choices[0]
    assert choice.text.startswith("Hello")
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset)
    assert all(v is None or v <= 0 for v in lp.token_logprobs)


def test_chat_logprobs(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=3,
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-4)


def test_response_format_json_schema_validates(client):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give me a person as JSON."}],
        max_tokens=64,
        temperature=0.7,
        seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )
    jsonschema.validate(json.loads(resp.choices[0].message.content), schema)


def test_named_tool_call_arguments_follow_the_schema(client):
    params = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 16}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    }
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris for 3 days?"}],
        tools=[{"type": "function", "function": {"name": "forecast", "parameters": params}}],
        tool_choice={"type": "function", "function": {"name": "forecast"}},
        max_tokens=64,
        temperature=0,
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "forecast"
    jsonschema.validate(json.loads(call.function.arguments), params)
