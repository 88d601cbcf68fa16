"""The official `openai` client against sglserve serving SmolLM2-135M-Instruct: answers a user
can judge (greedy), and JSON mode that is valid AND meaningful."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

# Generous: the first test also starts Ray and the SmolLM2 app (minutes on a busy machine).
pytestmark = [pytest.mark.serve, pytest.mark.timeout(900)]

CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(smollm2_stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{smollm2_stack.base_url}/v1", api_key="unused",
                         max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def test_chat_answers_the_capital_of_france(client, model):
    resp = client.chat.completions.create(
        model=model, temperature=0, max_tokens=32,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    choice = resp.choices[0]
    assert "Paris" in choice.message.content, choice.message.content
    assert choice.finish_reason == "stop"  # the model's end-of-turn token, not the budget


def test_streamed_chat_is_the_same_answer(client, model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                           max_tokens=32).choices[0].message.content
    pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=32, stream=True)
        if chunk.choices]
    assert "".join(pieces) == whole


def test_json_schema_response_is_valid_and_meaningful(client, model):
    resp = client.chat.completions.create(
        model=model, temperature=0, max_tokens=48,
        messages=[{"role": "user", "content":
                   "Which city is the capital of France, and which country is it in? "
                   "Answer in JSON with the keys city and country."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "capital", "schema": CITY_SCHEMA}},
    )
    data = json.loads(resp.choices[0].message.content)
    jsonschema.validate(data, CITY_SCHEMA)
    for key in ("city", "country"):
        value = data[key].strip()
        assert value and any(c.isalpha() for c in value), data  # words, not filler
    assert "Paris" in data["city"] or "France" in data["country"], data
