"""Typed errors for each 4xx, retries (503/429 with Retry-After, connection errors), never a
retried POST that the server may have executed, and cancellation that aborts in the engine."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.client.flaky_server import Action, FlakyServer
from tests.client.stacks import API_KEY, keyed_stack
from tests.conftest import free_port

from sglserve.client import (
    APIConnectionError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    RateLimitError,
    RetryPolicy,
    ScriptSyntaxError,
    UnprocessableEntityError,
)

pytestmark = pytest.mark.serve

MODEL = "sglserve/tiny-llama"
FAST_RETRY = RetryPolicy(max_retries=2, backoff_s=0.01)


@pytest.fixture()
def client(stack):
    with Client(stack.base_url, model=MODEL) as c:
        yield c


# -- a typed error for each 4xx --------------------------------------------------------------------


def test_400_is_bad_request(client):
    with pytest.raises(BadRequestError) as caught:
        client.complete("hi", suffix="!")
    assert caught.value.status_code == 400 and caught.value.param == "suffix"


def test_401_is_authentication_error(ray_cluster, tiny_model_path, monkeypatch):
    monkeypatch.delenv("SGLSERVE_API_KEY", raising=False)
    keyed = keyed_stack(ray_cluster)
    with pytest.raises(AuthenticationError) as missing:
        Client(keyed.base_url, model=MODEL).chat("hi", max_tokens=2)
    assert missing.value.code == "missing_api_key"
    with pytest.raises(AuthenticationError) as wrong:
        Client(keyed.base_url, "sk-wrong", model=MODEL).models()
    assert wrong.value.code == "invalid_api_key" and wrong.value.request_id
    assert Client(keyed.base_url, API_KEY).chat("hi", max_tokens=2).text is not None


def test_404_is_not_found_with_param(client):
    with pytest.raises(NotFoundError) as caught:
        client.chat("hi", model="no-such-model")
    assert caught.value.param == "model" and caught.value.code == "model_not_found"


def test_413_is_payload_too_large(client):
    with pytest.raises(PayloadTooLargeError):
        client.complete("x" * (5 * 1024 * 1024))


def test_422_names_the_field(client):
    with pytest.raises(UnprocessableEntityError) as caught:
        client.chat("hi", temperature=-1)
    assert caught.value.param == "temperature" and caught.value.type == "invalid_request_error"


def test_422_script_syntax_error_carries_line_and_column(client):
    with pytest.raises(ScriptSyntaxError) as caught:
        client.run('Hello\nQ: {gen("a", max_tokens=2}')
    assert caught.value.line == 2 and caught.value.column > 1
    assert caught.value.code == "syntax_error" and caught.value.param == "program"


def test_422_mid_stream_is_raised_from_the_iterator_or_at_once(client):
    with pytest.raises(ScriptSyntaxError):
        list(client.run("{gen(", stream=True))


# -- retries ---------------------------------------------------------------------------------------


def test_503_with_retry_after_is_retried_after_that_time(stack):
    with FlakyServer(stack.base_url, [Action("status", 503, {"retry-after": "1"})]) as flaky:
        answer = Client(flaky.base_url, model=MODEL).chat("hi", max_tokens=3, temperature=0)
    assert answer.text is not None
    assert [path for _, _, path in flaky.seen] == ["/v1/chat/completions"] * 2
    assert flaky.seen[1][0] - flaky.seen[0][0] >= 1.0  # Retry-After honoured


def test_429_retries_then_raises_a_typed_error(stack):
    always = Action("status", 429, {"retry-after": "0"})
    with FlakyServer(stack.base_url, [], default=always) as flaky:
        with pytest.raises(RateLimitError) as caught:
            Client(flaky.base_url, model=MODEL, retry=FAST_RETRY).chat("hi", max_tokens=2)
    assert len(flaky.seen) == 3 and caught.value.retry_after_s == 0


def test_a_retry_after_beyond_the_policy_is_raised_not_waited(stack):
    with FlakyServer(stack.base_url, [Action("status", 503, {"retry-after": "3600"})]) as flaky:
        started = time.monotonic()
        with pytest.raises(OverloadedError) as caught:
            Client(flaky.base_url, model=MODEL).chat("hi", max_tokens=2)
    assert time.monotonic() - started < 30 and len(flaky.seen) == 1
    assert caught.value.retry_after_s == 3600


def test_a_post_the_server_may_have_executed_is_not_retried(stack):
    with FlakyServer(stack.base_url, [], default=Action("drop")) as flaky:
        with pytest.raises(APIConnectionError):
            Client(flaky.base_url, model=MODEL, retry=FAST_RETRY).chat("hi", max_tokens=2)
        assert len(flaky.seen) == 1  # sent once: the server may have run it
        with pytest.raises(APIConnectionError):
            Client(flaky.base_url, retry=FAST_RETRY).models()  # a GET is idempotent
        assert len(flaky.seen) == 1 + 3


def test_a_post_that_never_left_is_retried():
    attempts = []

    class Counting(httpx.HTTPTransport):
        def handle_request(self, request):
            attempts.append(request.url.path)
            return super().handle_request(request)

    closed_port = free_port()  # nothing listens: the connection is refused before sending
    client = Client(f"http://127.0.0.1:{closed_port}", model=MODEL, retry=FAST_RETRY, transport=Counting())
    with pytest.raises(APIConnectionError):
        client.chat("hi")
    assert attempts == ["/v1/chat/completions"] * 3


# -- cancellation ----------------------------------------------------------------------------------


def _wait_until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


LONG = {"max_tokens": 3000, "ignore_eos": True, "temperature": 0}


def _idle_stats(stack):
    """The replica's counters once nothing runs or waits: a stream an earlier test closed may
    still be winding down, and its abort must not be counted as this test's."""
    idle = lambda: (s := stack.replica_stats()).num_running == 0 and s.num_waiting == 0  # noqa: E731
    assert _wait_until(idle, 60), "an earlier test left the engine busy"
    return stack.replica_stats()


def test_closing_a_stream_aborts_the_request_in_the_engine(stack, client):
    before = _idle_stats(stack)
    stream = client.complete("Once upon a time", stream=True, **LONG)
    pieces = iter(stream)
    for _ in range(3):
        next(pieces)
    assert stack.replica_stats().num_running >= 1
    stream.close()
    assert _wait_until(lambda: stack.replica_stats().num_running == 0, 30), "the engine kept decoding"
    after = stack.replica_stats()
    assert after.requests_aborted_total == before.requests_aborted_total + 1
    assert after.generation_tokens_total - before.generation_tokens_total < 3000


def test_cancelling_an_async_stream_aborts_the_request(stack):
    before = _idle_stats(stack)

    async def consume(started: asyncio.Event):
        async with AsyncClient(stack.base_url, model=MODEL) as c:
            async for chunk in await c.chat("Tell a story", stream=True, **LONG):
                if chunk.text:  # the first chunk (the role) leaves before the engine starts
                    started.set()

    async def scenario():
        started = asyncio.Event()
        task = asyncio.create_task(consume(started))
        await asyncio.wait_for(started.wait(), 60)
        stats = await asyncio.to_thread(stack.replica_stats)  # Ray's .result() refuses an event loop
        assert stats.num_running >= 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert _wait_until(lambda: stack.replica_stats().num_running == 0, 30)
    assert stack.replica_stats().requests_aborted_total == before.requests_aborted_total + 1
