"""The JobStore interface: durable records with compare-and-swap writes, a due index and blobs.

Kinds of record: "job" (API jobs), "line" (batch lines, so they never queue in front of API jobs),
"batch" and "file". Every state change above the store (app.jobs.ledger) is read -> change ->
`replace(record)`, which succeeds only if nobody wrote the record since it was read; so two
processes (an Ingress and a runner, or two runners) can race on a job and exactly one wins.
"""

from __future__ import annotations

import abc
from typing import TypeVar

from app.jobs.models import Record
from app.jobs.settings import JobsSettings

R = TypeVar("R", bound=Record)


class JobStore(abc.ABC):
    @abc.abstractmethod
    async def insert(self, kind: str, records: list[Record]) -> None:
        """Store new records (version 0 -> 1); one round trip for many (a batch's lines)."""

    @abc.abstractmethod
    async def get(self, kind: str, record_id: str, cls: type[R]) -> R | None: ...

    @abc.abstractmethod
    async def replace(self, kind: str, record: Record) -> bool:
        """Write `record` if the stored version is still `record.version`; bumps it on success."""

    @abc.abstractmethod
    async def due(self, kind: str, now: float, limit: int, cls: type[R]) -> list[R]:
        """Records whose index due_at <= now, the earliest first."""

    @abc.abstractmethod
    async def owned(self, kind: str, owner: str, after: str | None, limit: int, cls: type[R]) -> list[R]:
        """The owner's records, newest first, starting after the record `after`."""

    @abc.abstractmethod
    async def group(self, kind: str, group: str, cls: type[R]) -> list[R]:
        """Every record of a group (a batch's lines)."""

    @abc.abstractmethod
    async def group_counts(self, kind: str, group: str) -> dict[str, int]:
        """How many records of the group are in each status."""

    @abc.abstractmethod
    async def put_blob(self, blob_id: str, data: bytes) -> None: ...

    @abc.abstractmethod
    async def get_blob(self, blob_id: str) -> bytes | None: ...

    @abc.abstractmethod
    async def purge(self, finished_before: float) -> int:
        """Delete records (and their blobs) that finished before the given time; return how many."""

    async def close(self) -> None:
        return None


def make_store(settings: JobsSettings) -> JobStore:
    if settings.store == "redis":
        from app.jobs.redis_store import RedisJobStore

        return RedisJobStore(settings.redis_url, settings.redis_prefix)
    from app.jobs.sqlite_store import SQLiteJobStore

    return SQLiteJobStore(settings.sqlite_path)
