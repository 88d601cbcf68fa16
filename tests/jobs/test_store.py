"""The JobStore contract and the ledger's transitions, on both stores (SQLite file, real Redis)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import pytest_asyncio

from app.jobs.ledger import Ledger, backoff_s
from app.jobs.models import Callback, Job
from app.jobs.settings import JobsSettings


@pytest_asyncio.fixture(params=["sqlite", "redis"], loop_scope="function")
async def store(request, tmp_path):
    if request.param == "sqlite":
        settings = JobsSettings(store="sqlite", sqlite_path=str(tmp_path / "jobs.sqlite3"), lease_s=0.3)
    else:
        url = request.getfixturevalue("redis_url")
        settings = JobsSettings(store="redis", redis_url=url, redis_prefix=f"t{uuid.uuid4().hex[:8]}:",
                                lease_s=0.3)
    from app.jobs.store import make_store

    made = make_store(settings)
    made.settings = settings
    yield made
    await made.close()


def job(owner: str = "alice", **kw) -> Job:
    return Job(id=f"job_{uuid.uuid4().hex}", owner=owner, path="/v1/completions", body={"prompt": "x"}, **kw)


async def test_compare_and_swap_lets_one_writer_win(store):
    j = job()
    await store.insert("job", [j])
    a = await store.get("job", j.id, Job)
    b = await store.get("job", j.id, Job)
    a.status = "running"
    assert await store.replace("job", a)
    b.status = "cancelled"
    assert not await store.replace("job", b)  # b read a version that no longer exists
    assert (await store.get("job", j.id, Job)).status == "running"


async def test_due_owned_group_and_blobs(store):
    mine = [job(created_at=time.time() + i) for i in range(5)]
    await store.insert("job", mine + [job(owner="bob")])
    assert {j.id for j in await store.due("job", time.time() + 1, 100, Job)} >= {j.id for j in mine}
    page1 = await store.owned("job", "alice", None, 2, Job)
    page2 = await store.owned("job", "alice", page1[-1].id, 10, Job)
    assert [j.id for j in page1 + page2] == [j.id for j in reversed(mine)]
    lines = [job(batch_id="batch_1") for _ in range(3)]
    await store.insert("line", lines)
    lines[0].status, lines[0].finished_at = "succeeded", time.time()
    assert await store.replace("line", lines[0])
    assert await store.group_counts("line", "batch_1") == {"queued": 2, "succeeded": 1}
    assert len(await store.group("line", "batch_1", Job)) == 3
    await store.put_blob("file_1", b"a\nb\n")
    assert await store.get_blob("file_1") == b"a\nb\n"
    assert await store.get_blob("file_2") is None


async def test_retention_purges_only_old_finished_records(store):
    old, fresh, open_ = job(), job(), job()
    old.status, old.finished_at = "succeeded", time.time() - 100
    fresh.status, fresh.finished_at = "succeeded", time.time()
    await store.insert("job", [old, fresh, open_])
    assert await store.purge(time.time() - 50) == 1
    assert await store.get("job", old.id, Job) is None
    assert await store.get("job", fresh.id, Job) is not None and await store.get("job", open_.id, Job) is not None


async def test_lease_takeover_and_first_finish_wins(store):
    ledger = Ledger(store, store.settings)
    j = job()
    await store.insert("job", [j])
    first = await ledger.claim("job", j, "runner-1")
    assert first is not None and first.attempts == 1
    assert await ledger.claim("job", await store.get("job", j.id, Job), "runner-2") is None  # leased
    await asyncio.sleep(0.4)  # past the 0.3 s lease (the lease clock is what is tested here)
    second = await ledger.claim("job", await store.get("job", j.id, Job), "runner-2")
    assert second is not None and second.attempts == 2 and second.lease_owner == "runner-2"
    assert await ledger.renew("job", first, "runner-1") is None  # runner-1 lost its lease
    done = await ledger.finish("job", second, 200, {"ok": 1})
    assert done is not None and done.status == "succeeded"
    assert await ledger.finish("job", first, 200, {"ok": 2}) is None  # a late duplicate is dropped
    assert (await store.get("job", j.id, Job)).result == {"ok": 1}


async def test_callback_attempts_back_off_then_give_up(store):
    settings = store.settings.model_copy(update={"callback_max_attempts": 2, "callback_backoff_s": 10})
    ledger = Ledger(store, settings)
    j = job(callback=Callback(url="http://example.com/hook"))
    j.status, j.finished_at = "succeeded", time.time()
    await store.insert("job", [j])
    claimed = await ledger.claim_callback(j, "runner-1")
    after = await ledger.callback_attempted(claimed, "runner-1", "HTTP 500")
    assert after.callback.status == "pending" and after.callback.next_at >= time.time() + 4.9
    assert await ledger.claim_callback(after, "runner-1") is None  # not due yet
    after.callback.next_at = 0
    assert await store.replace("job", after)
    claimed = await ledger.claim_callback(after, "runner-1")
    final = await ledger.callback_attempted(claimed, "runner-1", "HTTP 500")
    assert final.callback.status == "failed" and final.callback.attempts == 2
    assert final.index().due_at is None  # nothing left to do for it


def test_backoff_grows_with_jitter_and_is_capped():
    delays = [backoff_s(n, 1.0, 8.0) for n in (1, 2, 3, 4, 5, 6)]
    for n, d in zip((1, 2, 3, 4, 5, 6), delays):
        cap = min(8.0, 2 ** (n - 1))
        assert cap / 2 <= d <= cap
