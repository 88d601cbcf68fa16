"""GET /stream (EventSource) and POST /v1/stream_tokens over real HTTP, and the page's public files."""

from __future__ import annotations

import json

import httpx
import pytest

import asyncio

from app.ingress.playground_api import StreamTokens, _plain_text_events, _text_event
from app.errors import AuthenticationError
from tests.client.stacks import API_KEY, keyed_stack

MODEL = "sglserve/tiny-llama"


def event_source(lines) -> list[tuple[str, str]]:
    """(event type, data) per event, parsed the way a browser's EventSource does."""
    events, data, kind = [], [], "message"
    for line in lines:
        if line == "":
            if data:
                events.append((kind, "\n".join(data)))
            data, kind = [], "message"
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
        elif line.startswith("event:"):
            kind = line[6:].strip()
    return events


def test_text_with_newlines_survives_event_source_framing():
    frame = _text_event(7, "a\nb\r\n c\n")
    assert event_source(frame.split("\n")) == [("message", "a\nb\n c\n")]


def test_chat_writes_holding_several_events_become_one_increment_each():
    """The chat route joins the per-token events of one replica increment into one write."""
    def event(payload) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    def delta(text=None, finish=None) -> dict:
        return {"choices": [{"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}]}

    async def writes():
        yield event(delta("Hel")) + event(delta("lo"))
        yield event(delta(" data: [DONE]")) + event(delta(finish="length"))  # the marker as text is text
        yield event({"choices": [], "usage": {"completion_tokens": 3}}) + "data: [DONE]\n\n"
        raise AssertionError("nothing is read past [DONE]")

    async def collect():
        return [frame async for frame in _plain_text_events(writes())]

    frames = asyncio.run(collect())
    events = event_source("".join(frames).split("\n"))
    assert events[:2] == [("message", "Hello"), ("message", " data: [DONE]")]
    assert events[2][0] == "done" and json.loads(events[2][1]) == {"finish_reason": "length",
                                                                    "usage": {"completion_tokens": 3}}
    assert len(events) == 3


def test_stream_tokens_expire_and_cannot_be_forged():
    tokens = StreamTokens(b"secret", ttl_s=60)
    token, expires_at = tokens.mint("tester", now=1000)
    assert expires_at == 1060 and tokens.verify(token, now=1059) == "tester"
    with pytest.raises(AuthenticationError, match="expired"):
        tokens.verify(token, now=1061)
    with pytest.raises(AuthenticationError, match="not valid"):
        StreamTokens(b"other", ttl_s=60).verify(token, now=1000)
    for bad in ("", "x", token + "x", "é.é", token.replace(".", "")):
        with pytest.raises(AuthenticationError):
            tokens.verify(bad, now=1000)


@pytest.mark.serve
def test_stream_sends_plain_text_increments_then_done(stack):
    params = {"prompt": "Hello there", "max_tokens": 12, "temperature": 0}
    with httpx.stream("GET", f"{stack.base_url}/stream", params=params, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = event_source(response.iter_lines())
    text = "".join(data for kind, data in events if kind == "message")
    assert events[-1][0] == "done" and json.loads(events[-1][1])["usage"]["completion_tokens"] > 0
    same = httpx.post(f"{stack.base_url}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 12, "temperature": 0})
    assert text == same.json()["choices"][0]["message"]["content"]


@pytest.mark.serve
@pytest.mark.parametrize("params, status, param", [
    ({"prompt": "hi", "max_tokens": 0}, 422, "max_tokens"),
    ({"prompt": "hi", "temperature": "hot"}, 422, "temperature"),
    ({}, 422, "prompt"),
    ({"prompt": "hi", "model": "nope"}, 404, "model"),
    ({"prompt": "hi", "colour": "red"}, 422, "colour"),
])
def test_stream_validates_like_the_post_routes(stack, params, status, param):
    response = httpx.get(f"{stack.base_url}/stream", params=params, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and set(error) >= {"message", "type", "param", "code"}


@pytest.mark.serve
def test_a_reconnecting_event_source_is_told_to_stop(stack):
    response = httpx.get(f"{stack.base_url}/stream", params={"prompt": "hi"}, headers={"last-event-id": "3"})
    assert response.status_code == 204


@pytest.mark.serve
def test_keyed_server_needs_a_stream_token_never_the_key_in_the_url(ray_cluster, tiny_model_path):
    keyed = keyed_stack(ray_cluster)
    url = f"{keyed.base_url}/stream"
    missing = httpx.get(url, params={"prompt": "hi"})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_stream_token"
    assert httpx.post(f"{keyed.base_url}/v1/stream_tokens").status_code == 401  # minting needs the key
    minted = httpx.post(f"{keyed.base_url}/v1/stream_tokens", headers={"authorization": f"Bearer {API_KEY}"})
    token = minted.json()["token"]
    assert API_KEY not in token
    ok = httpx.get(url, params={"prompt": "hi", "max_tokens": 4, "token": token}, timeout=60)
    assert ok.status_code == 200 and "event: done" in ok.text
    forged = httpx.get(url, params={"prompt": "hi", "token": token[:-2] + "AA"})
    assert forged.status_code == 401 and forged.json()["error"]["code"] == "invalid_stream_token"


@pytest.mark.serve
def test_page_and_static_files_are_public_and_self_contained(ray_cluster, tiny_model_path):
    keyed = keyed_stack(ray_cluster)
    page = httpx.get(f"{keyed.base_url}/")
    assert page.status_code == 200 and "<script type=\"module\"" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    for name in ("app.js", "api.js", "chat.js", "run.js", "style.css"):
        asset = httpx.get(f"{keyed.base_url}/static/{name}")
        assert asset.status_code == 200, name
        assert "http://" not in asset.text and "https://" not in asset.text  # no CDN, no external request
    assert httpx.get(f"{keyed.base_url}/static/..%2Fconfig.py").status_code == 404
    assert httpx.get(f"{keyed.base_url}/static/nope.js").status_code == 404
