"""JobStore on SQLite: one file in WAL mode, shared by the processes of one node.

All statements run on one dedicated thread per process (sqlite3 connections are not shared across
threads); WAL lets readers in other processes proceed while one writes, and busy_timeout makes
concurrent writers wait for each other instead of failing.
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from app.jobs.models import Record
from app.jobs.store import JobStore, R

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    kind TEXT NOT NULL, id TEXT NOT NULL, owner TEXT NOT NULL, grp TEXT NOT NULL,
    status TEXT NOT NULL, due_at REAL, finished_at REAL, created_at REAL NOT NULL,
    version INTEGER NOT NULL, doc TEXT NOT NULL, PRIMARY KEY (kind, id));
CREATE INDEX IF NOT EXISTS records_due ON records (kind, due_at) WHERE due_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS records_owner ON records (kind, owner, created_at);
CREATE INDEX IF NOT EXISTS records_group ON records (kind, grp, status);
CREATE INDEX IF NOT EXISTS records_finished ON records (finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS blobs (id TEXT PRIMARY KEY, data BLOB NOT NULL);
"""


class SQLiteJobStore(JobStore):
    def __init__(self, path: str):
        self.path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobs-sqlite")
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
            conn.execute("PRAGMA busy_timeout=30000")
            conn.executescript(SCHEMA)
            self._conn = conn
        return self._conn

    async def _run(self, fn, *args) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    @staticmethod
    def _row(kind: str, record: Record) -> tuple:
        index = record.index()
        return (kind, record.id, record.owner, index.group, index.status, index.due_at, index.finished_at,
                record.created_at, record.version, record.model_dump_json())

    async def insert(self, kind: str, records: list[Record]) -> None:
        for record in records:
            record.version = 1
        rows = [self._row(kind, r) for r in records]

        def write() -> None:
            conn = self._connection()
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?)", rows)

        await self._run(write)

    async def get(self, kind: str, record_id: str, cls: type[R]) -> R | None:
        def read():
            return self._connection().execute(
                "SELECT doc FROM records WHERE kind=? AND id=?", (kind, record_id)).fetchone()

        row = await self._run(read)
        return None if row is None else cls.model_validate_json(row[0])

    async def replace(self, kind: str, record: Record) -> bool:
        expected = record.version
        record.version = expected + 1
        row = self._row(kind, record)

        def write() -> int:
            cursor = self._connection().execute(
                "UPDATE records SET owner=?, grp=?, status=?, due_at=?, finished_at=?, version=?, doc=? "
                "WHERE kind=? AND id=? AND version=?",
                (row[2], row[3], row[4], row[5], row[6], row[8], row[9], kind, record.id, expected))
            return cursor.rowcount

        if await self._run(write) == 1:
            return True
        record.version = expected
        return False

    async def due(self, kind: str, now: float, limit: int, cls: type[R]) -> list[R]:
        def read():
            return self._connection().execute(
                "SELECT doc FROM records WHERE kind=? AND due_at IS NOT NULL AND due_at<=? "
                "ORDER BY due_at LIMIT ?", (kind, now, limit)).fetchall()

        return [cls.model_validate_json(r[0]) for r in await self._run(read)]

    async def owned(self, kind: str, owner: str, after: str | None, limit: int, cls: type[R]) -> list[R]:
        def read():
            conn = self._connection()
            if after is None:
                return conn.execute(
                    "SELECT doc FROM records WHERE kind=? AND owner=? ORDER BY created_at DESC, id DESC "
                    "LIMIT ?", (kind, owner, limit)).fetchall()
            anchor = conn.execute("SELECT created_at FROM records WHERE kind=? AND id=? AND owner=?",
                                  (kind, after, owner)).fetchone()
            if anchor is None:
                return []
            return conn.execute(
                "SELECT doc FROM records WHERE kind=? AND owner=? AND (created_at<? OR "
                "(created_at=? AND id<?)) ORDER BY created_at DESC, id DESC LIMIT ?",
                (kind, owner, anchor[0], anchor[0], after, limit)).fetchall()

        return [cls.model_validate_json(r[0]) for r in await self._run(read)]

    async def group(self, kind: str, group: str, cls: type[R]) -> list[R]:
        def read():
            return self._connection().execute(
                "SELECT doc FROM records WHERE kind=? AND grp=?", (kind, group)).fetchall()

        return [cls.model_validate_json(r[0]) for r in await self._run(read)]

    async def group_counts(self, kind: str, group: str) -> dict[str, int]:
        def read():
            return self._connection().execute(
                "SELECT status, COUNT(*) FROM records WHERE kind=? AND grp=? GROUP BY status",
                (kind, group)).fetchall()

        return {status: count for status, count in await self._run(read)}

    async def put_blob(self, blob_id: str, data: bytes) -> None:
        def write() -> None:
            self._connection().execute("INSERT OR REPLACE INTO blobs VALUES (?, ?)", (blob_id, data))

        await self._run(write)

    async def get_blob(self, blob_id: str) -> bytes | None:
        def read():
            return self._connection().execute("SELECT data FROM blobs WHERE id=?", (blob_id,)).fetchone()

        row = await self._run(read)
        return None if row is None else bytes(row[0])

    async def purge(self, finished_before: float) -> int:
        def write() -> int:
            conn = self._connection()
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("DELETE FROM blobs WHERE id IN (SELECT id FROM records WHERE kind='file' "
                             "AND finished_at IS NOT NULL AND finished_at<?)", (finished_before,))
                return conn.execute("DELETE FROM records WHERE finished_at IS NOT NULL AND finished_at<?",
                                    (finished_before,)).rowcount

        return await self._run(write)

    async def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._run(shut)
        self._thread.shutdown(wait=False)
