"""JobStore on Redis, for clusters of several nodes.

Keys (under a prefix): `r:{kind}:{id}` a hash (version, status, owner, group, doc); `due:{kind}` a
sorted set by due time; `own:{kind}:{owner}` by creation time; `grp:{kind}:{group}` the group's ids
and `cnt:{kind}:{group}` its counts per status; `fin` finished records by time; `blob:{id}`.
A write is one Lua script, so the compare-and-swap and its index updates are atomic.
"""

from __future__ import annotations

import redis.asyncio as redis

from app.jobs.models import Record
from app.jobs.store import JobStore, R

# KEYS: record, due, owner, counts, group, finished
# ARGV: expected version ('' = insert), new version, status, group, created_at, finished_at or '',
#       due_at or '', doc, id, owner, kind
WRITE = """
local current = redis.call('HGET', KEYS[1], 'version')
if ARGV[1] == '' then
  if current then return 0 end
elseif current ~= ARGV[1] then
  return 0
end
local old_status = redis.call('HGET', KEYS[1], 'status')
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'status', ARGV[3], 'doc', ARGV[8], 'owner', ARGV[10],
           'group', ARGV[4])
if ARGV[7] == '' then redis.call('ZREM', KEYS[2], ARGV[9]) else redis.call('ZADD', KEYS[2], ARGV[7], ARGV[9]) end
if not current then redis.call('ZADD', KEYS[3], ARGV[5], ARGV[9]) end
if ARGV[4] ~= '' then
  if old_status then redis.call('HINCRBY', KEYS[4], old_status, -1) end
  redis.call('HINCRBY', KEYS[4], ARGV[3], 1)
  if not current then redis.call('SADD', KEYS[5], ARGV[9]) end
end
if ARGV[6] ~= '' then redis.call('ZADD', KEYS[6], ARGV[6], ARGV[11] .. ':' .. ARGV[9]) end
return 1
"""


class RedisJobStore(JobStore):
    def __init__(self, url: str, prefix: str = "sglserve:"):
        self.client = redis.Redis.from_url(url)
        self.p = prefix
        self._write = self.client.register_script(WRITE)

    def _keys(self, kind: str, record: Record) -> list[str]:
        group = record.index().group
        return [f"{self.p}r:{kind}:{record.id}", f"{self.p}due:{kind}", f"{self.p}own:{kind}:{record.owner}",
                f"{self.p}cnt:{kind}:{group}", f"{self.p}grp:{kind}:{group}", f"{self.p}fin"]

    @staticmethod
    def _args(kind: str, record: Record, expected: int | None) -> list[str]:
        index = record.index()
        return ["" if expected is None else str(expected), str(record.version), index.status, index.group,
                repr(record.created_at), "" if index.finished_at is None else repr(index.finished_at),
                "" if index.due_at is None else repr(index.due_at), record.model_dump_json(), record.id,
                record.owner, kind]

    async def insert(self, kind: str, records: list[Record]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for record in records:
                record.version = 1
                await self._write(keys=self._keys(kind, record), args=self._args(kind, record, None), client=pipe)
            results = await pipe.execute()
        if not all(int(r) == 1 for r in results):
            raise RuntimeError("a record with the same id already exists")

    async def get(self, kind: str, record_id: str, cls: type[R]) -> R | None:
        doc = await self.client.hget(f"{self.p}r:{kind}:{record_id}", "doc")
        return None if doc is None else cls.model_validate_json(doc)

    async def replace(self, kind: str, record: Record) -> bool:
        expected = record.version
        record.version = expected + 1
        ok = await self._write(keys=self._keys(kind, record), args=self._args(kind, record, expected))
        if int(ok) == 1:
            return True
        record.version = expected
        return False

    async def _docs(self, kind: str, ids: list, cls: type[R]) -> list[R]:
        if not ids:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for record_id in ids:
                pipe.hget(f"{self.p}r:{kind}:{_text(record_id)}", "doc")
            docs = await pipe.execute()
        return [cls.model_validate_json(d) for d in docs if d is not None]

    async def due(self, kind: str, now: float, limit: int, cls: type[R]) -> list[R]:
        ids = await self.client.zrangebyscore(f"{self.p}due:{kind}", "-inf", now, start=0, num=limit)
        return await self._docs(kind, ids, cls)

    async def owned(self, kind: str, owner: str, after: str | None, limit: int, cls: type[R]) -> list[R]:
        key = f"{self.p}own:{kind}:{owner}"
        start = 0
        if after is not None:
            rank = await self.client.zrevrank(key, after)
            if rank is None:
                return []
            start = rank + 1
        ids = await self.client.zrevrange(key, start, start + limit - 1)
        return await self._docs(kind, ids, cls)

    async def group(self, kind: str, group: str, cls: type[R]) -> list[R]:
        ids = await self.client.smembers(f"{self.p}grp:{kind}:{group}")
        return await self._docs(kind, sorted(ids), cls)

    async def group_counts(self, kind: str, group: str) -> dict[str, int]:
        counts = await self.client.hgetall(f"{self.p}cnt:{kind}:{group}")
        return {_text(k): int(v) for k, v in counts.items() if int(v)}

    async def put_blob(self, blob_id: str, data: bytes) -> None:
        await self.client.set(f"{self.p}blob:{blob_id}", data)

    async def get_blob(self, blob_id: str) -> bytes | None:
        return await self.client.get(f"{self.p}blob:{blob_id}")

    async def purge(self, finished_before: float) -> int:
        members = await self.client.zrangebyscore(f"{self.p}fin", "-inf", finished_before)
        for member in members:
            kind, _, record_id = _text(member).partition(":")
            key = f"{self.p}r:{kind}:{record_id}"
            owner, group, status = await self.client.hmget(key, "owner", "group", "status")
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.zrem(f"{self.p}due:{kind}", record_id)
                pipe.zrem(f"{self.p}fin", member)
                if owner is not None:
                    pipe.zrem(f"{self.p}own:{kind}:{_text(owner)}", record_id)
                if group:
                    pipe.srem(f"{self.p}grp:{kind}:{_text(group)}", record_id)
                    pipe.hincrby(f"{self.p}cnt:{kind}:{_text(group)}", _text(status or b""), -1)
                if kind == "file":
                    pipe.delete(f"{self.p}blob:{record_id}")
                await pipe.execute()
        return len(members)

    async def close(self) -> None:
        await self.client.aclose()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
