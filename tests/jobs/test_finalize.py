"""Batch finalization with several runners, on both stores (SQLite file, real Redis): runners
racing on the same ready batch write one output file and send one completion callback; a runner
that dies while finalizing is taken over, and the redo adds no second file."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import pytest
import pytest_asyncio
from standardwebhooks import Webhook

from app.jobs.finalize import BatchFinalizer
from app.jobs.ledger import Ledger
from app.jobs.models import Batch, Callback, FileObject, Job
from app.jobs.settings import JobsSettings
from app.jobs.store import make_store
from tests.jobs.conftest import SECRET

RUNNERS = 4


@pytest_asyncio.fixture(params=["sqlite", "redis"], loop_scope="function")
async def store(request, tmp_path):
    common = {"lease_s": 0.5, "callback_secret": SECRET, "callback_allowed_networks": ["127.0.0.2/32"]}
    if request.param == "sqlite":
        settings = JobsSettings(store="sqlite", sqlite_path=str(tmp_path / "jobs.sqlite3"), **common)
    else:
        settings = JobsSettings(store="redis", redis_url=request.getfixturevalue("redis_url"),
                                redis_prefix=f"t{uuid.uuid4().hex[:8]}:", **common)
    made = make_store(settings)
    made.settings = settings
    yield made
    await made.close()


async def ready_batch(store, callback_url: str, owner: str) -> Batch:
    """A batch whose 3 lines have all ended (2 succeeded, 1 failed): ready to finalize."""
    batch = Batch(id=f"batch_{uuid.uuid4().hex}", owner=owner, endpoint="/v1/completions", input_file_id="file_x",
                  total=3, check_at=time.time(), callback=Callback(url=callback_url))
    lines = []
    for number, status in enumerate(["succeeded", "failed", "succeeded"], start=1):
        line = Job(id=f"batch_req_{uuid.uuid4().hex}", owner=owner, path="/v1/completions", body={"prompt": "x"},
                   batch_id=batch.id, custom_id=f"c{number}", line=number, status=status, finished_at=time.time(),
                   status_code=200 if status == "succeeded" else 400)
        line.result, line.error = ({"n": number}, None) if status == "succeeded" else (None, {"error": "bad"})
        lines.append(line)
    await store.insert("line", lines)
    await store.insert("batch", [batch])
    return batch


def runners(store, http) -> list[BatchFinalizer]:
    ledger = Ledger(store, store.settings)
    return [BatchFinalizer(store, ledger, f"runner-{i}", http) for i in range(RUNNERS)]


async def due_steps(store, finalizers: list[BatchFinalizer]) -> None:
    """Every runner, at once, steps every due batch from its own read (as each runner's tick does)."""
    seen = [await store.due("batch", time.time(), 16, Batch) for _ in finalizers]
    await asyncio.gather(*(f.step(b) for f, batches in zip(finalizers, seen) for b in batches))


async def test_racing_runners_finalize_once_and_call_back_once(store, receiver):
    owner = f"o{uuid.uuid4().hex[:6]}"
    batch = await ready_batch(store, receiver.url, owner)
    async with httpx.AsyncClient() as http:
        finalizers = runners(store, http)
        copies = [await store.get("batch", batch.id, Batch) for _ in finalizers]  # all read the same version
        results = await asyncio.gather(*(f.check(c) for f, c in zip(finalizers, copies)))
        assert sum(r is not None for r in results) == 1  # one claim won
        assert sum(f.finalized_total for f in finalizers) == 1
        done = await store.get("batch", batch.id, Batch)
        assert done.status == "completed" and done.request_counts == {"total": 3, "completed": 2, "failed": 1}
        files = await store.owned("file", owner, None, 100, FileObject)
        assert sorted(f.id for f in files) == sorted([done.output_file_id, done.error_file_id])
        output = [json.loads(x) for x in (await store.get_blob(done.output_file_id)).decode().splitlines()]
        assert [o["custom_id"] for o in output] == ["c1", "c3"]

        for _ in range(3):  # the callback is due: every runner tries to deliver it, more than once
            await due_steps(store, finalizers)
    deliveries = receiver.for_job(batch.id)
    assert len(deliveries) == 1
    sent = Webhook(SECRET).verify(deliveries[0].body, deliveries[0].headers)
    assert sent["id"] == batch.id and sent["status"] == "completed" and sent["output_file_id"] == done.output_file_id
    final = await store.get("batch", batch.id, Batch)
    assert final.callback.status == "delivered" and final.callback.attempts == 1
    assert await store.due("batch", time.time() + 3600, 16, Batch) == []  # nothing left to do


async def test_a_finalizer_that_died_is_taken_over_without_a_second_file(store, receiver):
    owner = f"o{uuid.uuid4().hex[:6]}"
    batch = await ready_batch(store, receiver.url, owner)
    async with httpx.AsyncClient() as http:
        dead, alive = runners(store, http)[:2]
        # The first runner claims the batch and writes its files, then dies before recording the end.
        claimed = await store.get("batch", batch.id, Batch)
        claimed.status, claimed.lease_owner, claimed.lease_until = "finalizing", dead.worker, time.time() + 0.5
        assert await store.replace("batch", claimed)
        from app.jobs.batches import result_files

        for meta, data in filter(None, result_files(claimed, await store.group("line", batch.id, Job))):
            await store.put_blob(meta.id, data)
            await store.insert("file", [meta])
        assert await alive.check(await store.get("batch", batch.id, Batch)) is None  # leased: left alone
        await asyncio.sleep(0.6)  # the dead runner's lease runs out (lease_s = 0.5)
        assert [b.id for b in await store.due("batch", time.time(), 16, Batch)] == [batch.id]
        done = await alive.check(await store.get("batch", batch.id, Batch))
    assert done is not None and done.status == "completed"
    files = await store.owned("file", owner, None, 100, FileObject)
    assert sorted(f.id for f in files) == sorted([done.output_file_id, done.error_file_id])
