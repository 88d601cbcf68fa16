"""Per-API-key rate limits: requests per minute and tokens per minute, as token buckets.

Each key has two buckets. The request bucket holds up to `burst_requests` and refills at
`requests_per_minute / 60` per second; a request takes 1. The token bucket holds up to
`burst_tokens` and refills at `tokens_per_minute / 60`; a request takes its prompt tokens plus the
most it may generate (`max_tokens` x sequences), and when it finishes the difference to what it
really used is given back (or charged: a bucket may go below zero, a debt paid by waiting). A
request passes only if BOTH buckets hold enough, and then takes from both, atomically.

Backends:
- `LocalBuckets`: in the Ingress replica's memory. With several Ingress replicas each keeps its own
  buckets, so N replicas admit up to N times the limit: use it with one Ingress replica.
- `RedisBuckets`: one hash per key in Redis, read and written by one Lua script (atomic on the
  server), so every Ingress replica on every node shares the same buckets. Time is Redis's own
  clock (`TIME`) unless the caller passes one (tests pass a deterministic clock).

`Decision.headers()` renders OpenAI's headers (`x-ratelimit-limit-requests`,
`-remaining-requests`, `-reset-requests` and the `-tokens` trio); a refusal adds `Retry-After`.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field


class RateLimit(BaseModel):
    """One key's limits. A dimension left out is not limited."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    burst_requests: float | None = Field(None, gt=0)  # bucket size; default: one minute's worth
    burst_tokens: float | None = Field(None, gt=0)

    def request_bucket(self) -> "Bucket | None":
        if self.requests_per_minute is None:
            return None
        return Bucket(self.requests_per_minute / 60.0, self.burst_requests or self.requests_per_minute)

    def token_bucket(self) -> "Bucket | None":
        if self.tokens_per_minute is None:
            return None
        return Bucket(self.tokens_per_minute / 60.0, self.burst_tokens or self.tokens_per_minute)


class RateLimitSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: Literal["local", "redis"] = "local"  # local: per Ingress replica (see module doc)
    redis_url: str | None = None  # e.g. redis://127.0.0.1:6379/0; required by backend "redis"
    key_prefix: str = "sglserve:"
    default: RateLimit | None = None  # for keys without their own (and callers without a key)
    # When the backend cannot be reached: "closed" refuses with 503 + Retry-After, "open" admits.
    on_backend_error: Literal["closed", "open"] = "closed"
    backend_timeout_s: float = Field(0.5, gt=0)


@dataclass(frozen=True)
class Bucket:
    rate_per_s: float
    capacity: float


@dataclass
class Decision:
    """The outcome of one acquire: admitted or not, and what the buckets look like after it."""

    allowed: bool
    requests: Bucket | None
    tokens: Bucket | None
    requests_left: float
    tokens_left: float
    retry_after_s: float = 0.0
    too_large: bool = False  # the request needs more tokens than the bucket can ever hold

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, bucket, left in (("requests", self.requests, self.requests_left),
                                   ("tokens", self.tokens, self.tokens_left)):
            if bucket is None:
                continue
            out[f"x-ratelimit-limit-{name}"] = str(int(round(bucket.capacity)))
            out[f"x-ratelimit-remaining-{name}"] = str(max(0, int(math.floor(left))))
            out[f"x-ratelimit-reset-{name}"] = duration(max(0.0, bucket.capacity - left) / bucket.rate_per_s)
        if not self.allowed:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return out


def duration(seconds: float) -> str:
    """OpenAI's reset format: '20ms', '1.5s', '6m0s'."""
    if seconds < 1.0:
        return f"{int(math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60.0)
    rest = round(rest, 3)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


def refill(level: float | None, stamp: float, now: float, bucket: Bucket) -> float:
    """The bucket's level at `now` (a new bucket starts full)."""
    if level is None:
        return bucket.capacity
    return min(bucket.capacity, level + max(0.0, now - stamp) * bucket.rate_per_s)


def decide(r_level: float, t_level: float, cost_tokens: float, limits: RateLimit) -> tuple[bool, float, bool]:
    """(allowed, retry_after_s, too_large) for levels already refilled to now."""
    rb, tb = limits.request_bucket(), limits.token_bucket()
    if tb is not None and cost_tokens > tb.capacity:
        return False, tb.capacity / tb.rate_per_s, True
    waits = []
    if rb is not None and r_level < 1.0:
        waits.append((1.0 - r_level) / rb.rate_per_s)
    if tb is not None and t_level < cost_tokens:
        waits.append((cost_tokens - t_level) / tb.rate_per_s)
    return (not waits), max(waits, default=0.0), False


class RateLimitBackend(Protocol):
    async def acquire(self, key: str, limits: RateLimit, tokens: float, now: float | None = None) -> Decision: ...

    async def adjust(self, key: str, limits: RateLimit, tokens_back: float, now: float | None = None) -> None: ...


class BackendUnavailable(Exception):
    """The shared rate-limit store could not be reached in time."""


# -- local ------------------------------------------------------------------------------------------


class LocalBuckets:
    """Buckets in this process's memory (per Ingress replica). A lock keeps check-and-take atomic
    when called from several threads; the event loop alone would not need it."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._state: dict[str, list[float | None]] = {}  # key -> [r_level, r_ts, t_level, t_ts]
        self._lock = threading.Lock()

    def _levels(self, key: str, limits: RateLimit, now: float) -> tuple[float, float]:
        r_level, r_ts, t_level, t_ts = self._state.get(key, [None, now, None, now])
        rb, tb = limits.request_bucket(), limits.token_bucket()
        r = refill(r_level, r_ts or now, now, rb) if rb else math.inf
        t = refill(t_level, t_ts or now, now, tb) if tb else math.inf
        return r, t

    async def acquire(self, key: str, limits: RateLimit, tokens: float, now: float | None = None) -> Decision:
        now = self.clock() if now is None else now
        with self._lock:
            r, t = self._levels(key, limits, now)
            allowed, wait, too_large = decide(r, t, tokens, limits)
            if allowed:
                r, t = r - 1.0, t - tokens
            self._state[key] = [r, now, t, now]
        return Decision(allowed, limits.request_bucket(), limits.token_bucket(), r, t, wait, too_large)

    async def adjust(self, key: str, limits: RateLimit, tokens_back: float, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        with self._lock:
            r, t = self._levels(key, limits, now)
            tb = limits.token_bucket()
            if tb is not None:
                t = min(tb.capacity, t + tokens_back)
            self._state[key] = [r, now, t, now]


# -- redis ------------------------------------------------------------------------------------------

# KEYS[1]: the key's hash. ARGV: now (<0: Redis's clock), r_rate, r_cap, t_rate, t_cap (a cap < 0:
# that dimension unlimited), tokens, mode ("acquire" | "adjust"), ttl_s.
# Returns {allowed, r_level, t_level, retry_after_s, too_large} as strings (Lua numbers would be
# truncated to integers on the way out).
_SCRIPT = """
local now = tonumber(ARGV[1])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local r_rate, r_cap = tonumber(ARGV[2]), tonumber(ARGV[3])
local t_rate, t_cap = tonumber(ARGV[4]), tonumber(ARGV[5])
local cost, mode, ttl = tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8])
local s = redis.call('HMGET', KEYS[1], 'r', 'rts', 't', 'tts')
local function level(v, ts, rate, cap)
  if cap < 0 then return 1e300 end
  if not v then return cap end
  return math.min(cap, tonumber(v) + math.max(0, now - tonumber(ts)) * rate)
end
local r = level(s[1], s[2], r_rate, r_cap)
local t = level(s[3], s[4], t_rate, t_cap)
local allowed, wait, too_large = 0, 0, 0
if mode == 'adjust' then
  if t_cap >= 0 then t = math.min(t_cap, t + cost) end
  allowed = 1
elseif t_cap >= 0 and cost > t_cap then
  too_large = 1
  wait = t_cap / t_rate
else
  if r_cap >= 0 and r < 1 then wait = math.max(wait, (1 - r) / r_rate) end
  if t_cap >= 0 and t < cost then wait = math.max(wait, (cost - t) / t_rate) end
  if wait == 0 then
    allowed = 1
    r = r - 1
    t = t - cost
  end
end
redis.call('HSET', KEYS[1], 'r', tostring(r), 'rts', tostring(now), 't', tostring(t), 'tts', tostring(now))
redis.call('EXPIRE', KEYS[1], ttl)
return {tostring(allowed), tostring(r), tostring(t), tostring(wait), tostring(too_large)}
"""


def redis_client(url: str, timeout_s: float):
    import redis.asyncio as aioredis

    return aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


class RedisBuckets:
    """Buckets in Redis, shared by every Ingress replica; one atomic script call per request."""

    def __init__(self, client: Any, prefix: str = "sglserve:"):
        self.client = client
        self.prefix = prefix
        self._script = client.register_script(_SCRIPT)

    async def _call(self, key: str, limits: RateLimit, tokens: float, mode: str, now: float | None):
        rb, tb = limits.request_bucket(), limits.token_bucket()
        # A bucket left idle refills fully within capacity/rate seconds: keep it no longer.
        ttl = max(60, int(max((b.capacity / b.rate_per_s for b in (rb, tb) if b), default=60)) + 60)
        args = [
            -1.0 if now is None else now,
            rb.rate_per_s if rb else 0, rb.capacity if rb else -1,
            tb.rate_per_s if tb else 0, tb.capacity if tb else -1,
            tokens, mode, ttl,
        ]
        try:
            raw = await self._script(keys=[f"{self.prefix}rl:{key}"], args=args)
        except Exception as exc:  # noqa: BLE001 - any Redis failure is "unavailable"
            raise BackendUnavailable(f"rate-limit store: {type(exc).__name__}: {exc}") from exc
        return [float(x) for x in raw]

    async def acquire(self, key: str, limits: RateLimit, tokens: float, now: float | None = None) -> Decision:
        allowed, r, t, wait, too_large = await self._call(key, limits, tokens, "acquire", now)
        return Decision(bool(allowed), limits.request_bucket(), limits.token_bucket(), r, t, wait, bool(too_large))

    async def adjust(self, key: str, limits: RateLimit, tokens_back: float, now: float | None = None) -> None:
        await self._call(key, limits, tokens_back, "adjust", now)


def make_backend(settings: RateLimitSettings) -> RateLimitBackend:
    if settings.backend == "redis":
        if not settings.redis_url:
            raise ValueError("rate_limits.backend 'redis' needs rate_limits.redis_url")
        return RedisBuckets(redis_client(settings.redis_url, settings.backend_timeout_s), settings.key_prefix)
    return LocalBuckets()
