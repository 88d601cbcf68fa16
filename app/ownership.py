"""Which API key sent which in-flight request id, so a key can abort only its own requests.

The ingress records every sequence's rid when it hands a request on and forgets it when the
response ends. `owns(rid, key)` mirrors the scheduler's abort, which cancels `rid` and every
`rid-*`: it is true only if at least one such rid is in flight and ALL of them are the key's.

`LocalOwners` lives in one Ingress replica (an abort that lands on another replica cannot see the
request: use it with one Ingress replica); `RedisOwners` keeps one Redis hash that every replica
shares (the rate limits' Redis, when configured). An entry whose ingress died stays in the hash
(no per-field TTL in Redis 7.0); it only ever lets its own key abort a finished request, a no-op.
"""

from __future__ import annotations

from typing import Any, Protocol


class OwnerRegistry(Protocol):
    async def add(self, rids: list[str], key_id: str) -> None: ...

    async def remove(self, rids: list[str]) -> None: ...

    async def owns(self, rid: str, key_id: str) -> bool: ...


def _covered(rid: str, candidate: str) -> bool:
    return candidate == rid or candidate.startswith(f"{rid}-")


class LocalOwners:
    def __init__(self) -> None:
        self._owner: dict[str, str] = {}

    async def add(self, rids: list[str], key_id: str) -> None:
        for rid in rids:
            self._owner[rid] = key_id

    async def remove(self, rids: list[str]) -> None:
        for rid in rids:
            self._owner.pop(rid, None)

    async def owns(self, rid: str, key_id: str) -> bool:
        owners = [k for r, k in self._owner.items() if _covered(rid, r)]
        return bool(owners) and all(k == key_id for k in owners)


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


class RedisOwners:
    def __init__(self, client: Any, prefix: str = "sglserve:"):
        self.client = client
        self.hash = f"{prefix}owners"

    async def add(self, rids: list[str], key_id: str) -> None:
        if rids:
            await self.client.hset(self.hash, mapping={rid: key_id for rid in rids})

    async def remove(self, rids: list[str]) -> None:
        if rids:
            await self.client.hdel(self.hash, *rids)

    async def owns(self, rid: str, key_id: str) -> bool:
        owners = []
        exact = await self.client.hget(self.hash, rid)
        if exact is not None:
            owners.append(exact.decode() if isinstance(exact, bytes) else exact)
        async for field, value in self.client.hscan_iter(self.hash, match=f"{_glob_escape(rid)}-*", count=500):
            owners.append(value.decode() if isinstance(value, bytes) else value)
        return bool(owners) and all(k == key_id for k in owners)
