"""A batch's end, safe with several runners: count its lines, finalize it once, call back once.

    in_progress | cancelling --all lines ended, claim (CAS)--> finalizing (lease) --files, CAS-->
        completed | cancelled --callback claim (CAS, lease)--> delivered | retried | failed

Every runner looks at due batches. Finalization starts with a compare-and-swap of the batch
record into `finalizing` with the runner's lease: of several runners that saw the batch ready at
once, exactly one wins and writes the files; the others see the CAS fail and leave it. If the
winner dies, its lease runs out, the batch is due again and another runner finalizes it; the
file ids follow from the batch id, so the redo rewrites the same files, never adds a second pair.
The completion callback is claimed the same way as a job's (app.jobs.ledger), one delivery at a
time, with the same `webhook-id` on every attempt.
"""

from __future__ import annotations

import logging
import time

import httpx

from app.jobs.batches import result_files
from app.jobs.callbacks import deliver
from app.jobs.ledger import Ledger
from app.jobs.models import Batch, FileObject, Job
from app.jobs.store import JobStore

logger = logging.getLogger("sglserve.jobs")

BATCH_CHECK_S = 0.5  # how often an unfinished batch's lines are counted


class BatchFinalizer:
    def __init__(self, store: JobStore, ledger: Ledger, worker: str, http: httpx.AsyncClient):
        self.store = store
        self.ledger = ledger
        self.worker = worker
        self.http = http
        self.finalized_total = 0  # batches this runner finalized (wrote the files of)

    async def step(self, batch: Batch) -> None:
        """What a due batch needs next: its lines counted, its finalization or its callback."""
        try:
            if not batch.terminal:
                await self.check(batch)
            elif batch.callback is not None and batch.callback.status == "pending":
                await self.call_back(batch)
        except Exception:  # noqa: BLE001 - a store hiccup: the batch stays due and is looked at again
            logger.exception("batch %s: step failed", batch.id)

    async def check(self, batch: Batch) -> Batch | None:
        """Count the lines; when all have ended, finalize (if this runner wins the claim)."""
        now = time.time()
        if batch.status == "finalizing" and batch.leased(now):
            return None  # another runner is writing the files
        if batch.status == "cancelling":
            for line in await self.store.group("line", batch.id, Job):
                if not line.terminal:
                    await self.ledger.cancel("line", line)
        counts = await self.store.group_counts("line", batch.id)
        ended = sum(counts.get(s, 0) for s in ("succeeded", "failed", "cancelled"))
        batch.request_counts = {"total": batch.total, "completed": counts.get("succeeded", 0),
                                "failed": counts.get("failed", 0) + counts.get("cancelled", 0)}
        if ended < batch.total:
            batch.check_at = now + BATCH_CHECK_S
            await self.store.replace("batch", batch)  # a lost race only delays the next check
            return None
        batch.status, batch.finalizing_at = "finalizing", batch.finalizing_at or now
        batch.lease_owner, batch.lease_until = self.worker, now + self.ledger.settings.lease_s
        if not await self.store.replace("batch", batch):
            return None  # another runner claimed it (or changed it) first
        return await self._finalize(batch)

    async def _finalize(self, batch: Batch) -> Batch | None:
        lines = await self.store.group("line", batch.id, Job)
        output, errors = result_files(batch, lines)
        for made in (output, errors):
            if made is not None:
                await self.store.put_blob(made[0].id, made[1])
                await self._insert_once(made[0])
        now = time.time()
        batch.output_file_id = output[0].id if output else None
        batch.error_file_id = errors[0].id if errors else None
        if batch.cancelling_at is not None:
            batch.status, batch.cancelled_at = "cancelled", now
        else:
            batch.status, batch.completed_at = "completed", now
        batch.finished_at = now
        batch.lease_owner, batch.lease_until = None, 0.0
        if batch.callback is not None:
            batch.callback.next_at = now
        if not await self.store.replace("batch", batch):
            logger.warning("batch %s: finalization lost its lease to another runner", batch.id)
            return None
        self.finalized_total += 1
        return batch

    async def _insert_once(self, meta: FileObject) -> None:
        if await self.store.get("file", meta.id, FileObject) is not None:
            return  # a finalization before ours (whose runner died) made it: same id, same lines
        try:
            await self.store.insert("file", [meta])
        except Exception:  # noqa: BLE001 - a late finalizer inserted it meanwhile
            if await self.store.get("file", meta.id, FileObject) is None:
                raise

    async def call_back(self, batch: Batch) -> None:
        claimed = await self.ledger.claim_callback(batch, self.worker, kind="batch")
        if claimed is None:
            return  # not due yet, or another runner delivers it
        error = await deliver(self.http, claimed, self.ledger.settings)
        if error is not None:
            logger.info("callback of batch %s failed: %s", batch.id, error)
        await self.ledger.callback_attempted(claimed, self.worker, error, kind="batch")
