"""Token buckets per key, on a deterministic clock: bursts, the served rate at twice the limit
(within 5%), OpenAI's headers, token charges corrected on completion, and the Redis backend (a real
redis-server) shared by several clients as several Ingress replicas share it."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from app.ratelimit import LocalBuckets, RateLimit, RedisBuckets, duration, redis_client

RPM = RateLimit(requests_per_minute=60, burst_requests=10)  # 1 request/s, bursts of 10


def _local():
    return LocalBuckets(clock=lambda: 0.0)


@pytest.fixture
def redis_buckets(redis_url):
    clients = []

    def make(prefix: str | None = None):
        client = redis_client(redis_url, 2.0)  # a client of its own, as each Ingress replica has
        clients.append(client)
        return RedisBuckets(client, prefix=prefix or f"test-{uuid.uuid4().hex[:8]}:")

    yield make


async def _offer(buckets, key: str, limits: RateLimit, rate_per_s: float, seconds: float, tokens: float = 0):
    """Offer requests at a fixed rate on a virtual clock; returns how many were admitted."""
    admitted, step = 0, 1.0 / rate_per_s
    for i in range(int(seconds * rate_per_s)):
        decision = await buckets.acquire(key, limits, tokens, now=1000.0 + i * step)
        admitted += decision.allowed
    return admitted


def _served_rate_error(admitted: int, burst: float, rate_per_s: float, seconds: float) -> float:
    served = (admitted - burst) / seconds  # what passed beyond the initial burst
    return abs(served - rate_per_s) / rate_per_s


@pytest.mark.parametrize("backend", ["local", "redis"])
async def test_at_twice_the_limit_the_served_rate_is_the_limit_within_5_percent(backend, request):
    buckets = _local() if backend == "local" else request.getfixturevalue("redis_buckets")()
    seconds = 300.0
    admitted = await _offer(buckets, "k", RPM, rate_per_s=2.0, seconds=seconds)
    assert _served_rate_error(admitted, 10, 1.0, seconds) <= 0.05, admitted
    # ... and exactly what a bucket allows: the burst plus one per second (minus the tick phase).
    assert 10 + seconds - 2 <= admitted <= 10 + seconds


@pytest.mark.parametrize("backend", ["local", "redis"])
async def test_tokens_per_minute_is_enforced_and_refunds_correct_the_charge(backend, request):
    buckets = _local() if backend == "local" else request.getfixturevalue("redis_buckets")()
    limits = RateLimit(tokens_per_minute=6000, burst_tokens=1000)  # 100 tokens/s
    first = await buckets.acquire("k", limits, 600, now=0.0)
    assert first.allowed and first.tokens_left == pytest.approx(400)
    second = await buckets.acquire("k", limits, 600, now=0.0)
    assert not second.allowed and second.retry_after_s == pytest.approx(2.0)
    # The first request used 100 of its 600: 500 come back, so a second one fits at once.
    await buckets.adjust("k", limits, 500, now=0.0)
    third = await buckets.acquire("k", limits, 600, now=0.0)
    assert third.allowed and third.tokens_left == pytest.approx(300)
    # A request bigger than the bucket can never pass: told so, not asked to wait forever.
    huge = await buckets.acquire("k", limits, 5000, now=100.0)
    assert not huge.allowed and huge.too_large


@pytest.mark.parametrize("backend", ["local", "redis"])
async def test_a_refusal_takes_nothing_from_either_bucket(backend, request):
    buckets = _local() if backend == "local" else request.getfixturevalue("redis_buckets")()
    limits = RateLimit(requests_per_minute=60, burst_requests=5, tokens_per_minute=600, burst_tokens=100)
    assert (await buckets.acquire("k", limits, 90, now=0.0)).allowed
    refused = await buckets.acquire("k", limits, 90, now=0.0)  # tokens short, requests not
    assert not refused.allowed
    assert refused.requests_left == pytest.approx(4) and refused.tokens_left == pytest.approx(10)


async def test_headers_follow_openai_names_and_retry_after_rounds_up():
    buckets = _local()
    limits = RateLimit(requests_per_minute=60, burst_requests=2, tokens_per_minute=600, burst_tokens=100)
    ok = await buckets.acquire("k", limits, 40, now=0.0)
    h = ok.headers()
    assert h["x-ratelimit-limit-requests"] == "2" and h["x-ratelimit-remaining-requests"] == "1"
    assert h["x-ratelimit-reset-requests"] == "1s"  # one request refills in 1 s
    assert h["x-ratelimit-limit-tokens"] == "100" and h["x-ratelimit-remaining-tokens"] == "60"
    assert h["x-ratelimit-reset-tokens"] == "4s"  # 40 tokens at 10/s
    assert "Retry-After" not in h
    await buckets.acquire("k", limits, 1, now=0.0)
    refused = await buckets.acquire("k", limits, 1, now=0.25)
    assert not refused.allowed
    assert refused.headers()["Retry-After"] == "1"  # 0.75 s, rounded up to whole seconds
    assert refused.headers()["x-ratelimit-remaining-requests"] == "0"


def test_duration_format():
    assert [duration(s) for s in (0.02, 1.0, 1.5, 59.0, 360.0, 61.25)] == ["20ms", "1s", "1.5s", "59s", "6m0s", "1m1.25s"]


async def test_keys_have_separate_buckets():
    buckets = _local()
    for _ in range(10):
        assert (await buckets.acquire("a", RPM, 0, now=0.0)).allowed
    assert not (await buckets.acquire("a", RPM, 0, now=0.0)).allowed
    assert (await buckets.acquire("b", RPM, 0, now=0.0)).allowed


async def test_two_redis_clients_share_one_limit_under_concurrency(redis_buckets):
    """Two 'replicas' (two clients) hammering one key at once admit exactly the burst: the Lua
    script makes check-and-take atomic on the server."""
    a = redis_buckets()
    b = redis_buckets(prefix=a.prefix)
    limits = RateLimit(requests_per_minute=1, burst_requests=25)  # no refill to speak of
    decisions = await asyncio.gather(*(c.acquire("shared", limits, 0, now=5.0) for c in [a, b] * 50))
    assert sum(d.allowed for d in decisions) == 25


async def test_redis_clock_is_used_when_no_time_is_given(redis_buckets):
    buckets = redis_buckets()
    limits = RateLimit(requests_per_minute=60, burst_requests=3)
    results = [await buckets.acquire("k", limits, 0) for _ in range(4)]
    assert [d.allowed for d in results] == [True, True, True, False]
    assert 0 < results[-1].retry_after_s <= 1.0
