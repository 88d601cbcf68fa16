"""The SDK against the live test stack: every call plain and streamed, sync and async, typed results."""

from __future__ import annotations

import asyncio

import pytest

from tests.client.stacks import API_KEY, keyed_stack  # noqa: F401 - puts the SDK on the path

from sglserve.client import (
    AsyncClient,
    ChatCompletion,
    ChatCompletionChunk,
    Client,
    Completion,
    GenerateChunk,
    GenerateResult,
    RunEvent,
    RunResult,
    SGLangClient,
)

pytestmark = pytest.mark.serve

GREEDY = {"temperature": 0, "max_tokens": 12}
SCRIPT = 'Q: name a colour.\nA:{gen("colour", max_tokens=6, temperature=0)} It is {select("kind", options=["warm", "cold"])}.'


@pytest.fixture()
def client(stack):
    with Client(stack.base_url) as c:
        yield c


def test_chat_plain_and_streamed_agree(client):
    whole = client.chat("Hello there", **GREEDY)
    assert isinstance(whole, ChatCompletion) and whole.text and whole.usage.completion_tokens > 0
    pieces = list(client.chat("Hello there", stream=True, **GREEDY))
    assert all(isinstance(p, ChatCompletionChunk) for p in pieces)
    assert "".join(p.text for p in pieces) == whole.text
    assert pieces[-1].finish_reason in ("length", "stop")


def test_chat_takes_a_system_prompt_and_message_lists(client):
    messages = [{"role": "user", "content": "Hi"}]
    answer = client.chat(messages, system="Be brief.", **GREEDY)
    assert answer.text and answer.model == client.model


def test_complete_plain_and_streamed_agree(client):
    whole = client.complete("Once upon a time", **GREEDY)
    assert isinstance(whole, Completion) and whole.text
    pieces = list(client.complete("Once upon a time", stream=True, **GREEDY))
    assert len(pieces) >= 1 and "".join(p.text for p in pieces) == whole.text


def test_generate_streams_increments_not_cumulative_text(client):
    sampling = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}
    whole = client.generate("The sky is", sampling_params=sampling)
    assert isinstance(whole, GenerateResult) and whole.meta_info["completion_tokens"] == 24
    pieces = list(client.generate("The sky is", sampling_params=sampling, stream=True))
    assert all(isinstance(p, GenerateChunk) for p in pieces)
    assert "".join(p.text for p in pieces) == whole.text == pieces[-1].total_text


def test_run_with_the_briefs_example_shape(stack):
    result = SGLangClient(stack.base_url).run(SCRIPT)
    assert isinstance(result, RunResult)
    assert result["kind"] in ("warm", "cold") and result.variables["colour"] in result.text


def test_run_streams_text_and_variables(client):
    events = list(client.run(SCRIPT, stream=True))
    assert all(isinstance(e, RunEvent) for e in events)
    assert {e.name for e in events if e.type == "variable"} == {"colour", "kind"}
    assert events[-1].type == "done" and events[-1].result.variables["kind"] in ("warm", "cold")
    assert "".join(e.text for e in events if e.type == "text" and not e.branch) == events[-1].result.text


def test_run_binds_keyword_arguments_as_variables(client):
    result = client.run('Say {topic}:{gen("x", max_tokens=2, temperature=0)}', topic="tea")
    assert result.text.startswith("Say tea:")


def test_models_health_server_info(client):
    models = client.models()
    assert [m.id for m in models] == ["sglserve/tiny-llama"] and models[0].max_model_len > 0
    assert client.health() == {"status": "ok"}
    assert client.server_info()["model"]["model_path"] == "sglserve/tiny-llama"


def test_async_client_every_call_plain_and_streamed(stack):
    async def scenario():
        async with AsyncClient(stack.base_url) as c:
            chat = await c.chat("Hello there", **GREEDY)
            streamed = [p.text async for p in await c.chat("Hello there", stream=True, **GREEDY)]
            assert "".join(streamed) == chat.text
            comp = await c.complete("Once upon a time", **GREEDY)
            streamed = [p.text async for p in await c.complete("Once upon a time", stream=True, **GREEDY)]
            assert "".join(streamed) == comp.text
            sampling = {"max_new_tokens": 8, "temperature": 0}
            gen = await c.generate("The sky is", sampling_params=sampling)
            streamed = [p.text async for p in await c.generate("The sky is", sampling_params=sampling, stream=True)]
            assert "".join(streamed) == gen.text
            run = await c.run(SCRIPT)
            events = [e async for e in await c.run(SCRIPT, stream=True)]
            assert events[-1].result.variables == run.variables
            assert (await c.models())[0].id == "sglserve/tiny-llama"
            assert (await c.health())["status"] == "ok"
            assert "scheduler" in await c.server_info()

    asyncio.run(scenario())


def test_api_key_from_the_environment(ray_cluster, tiny_model_path, monkeypatch):
    keyed = keyed_stack(ray_cluster)
    monkeypatch.setenv("SGLSERVE_API_KEY", API_KEY)
    assert Client(keyed.base_url).models()[0].id == "sglserve/tiny-llama"
    token = Client(keyed.base_url).stream_token()
    assert token["token"] and token["expires_in_s"] > 0
