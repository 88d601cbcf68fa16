"""Job state transitions on top of a JobStore, each a compare-and-swap that retries on conflict.

    queued --claim--> running --finish--> succeeded | failed
       ^                 |  \--requeue (overloaded)--> queued
       |                 \--lease runs out (holder died)--> claimed again (attempts + 1)
    cancel: queued | running --> cancelled

Whoever runs a job (an Ingress that converted a slow request, or a runner) holds its lease and
renews it; the first finish wins and a late one is dropped, so a job re-run after a takeover
produces one stored result. Ended jobs with a callback stay due until it is delivered.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from app.jobs.models import Batch, Callback, Job
from app.jobs.settings import JobsSettings
from app.jobs.store import JobStore

CAS_RETRIES = 8


class Ledger:
    def __init__(self, store: JobStore, settings: JobsSettings):
        self.store = store
        self.settings = settings

    async def _change(self, kind: str, job: Job, change: Callable[[Job], bool]) -> Job | None:
        """Apply `change` (returns False to give up) to the freshest copy until the write wins."""
        current: Job | None = job
        for _ in range(CAS_RETRIES):
            if current is None or not change(current):
                return None
            if await self.store.replace(kind, current):
                return current
            current = await self.store.get(kind, job.id, type(job))
        return None

    async def claim(self, kind: str, job: Job, worker: str) -> Job | None:
        """Take a queued job, or a running one whose lease ran out, to execute it."""
        def take(j: Job) -> bool:
            now = time.time()
            runnable = (j.status == "queued" and j.not_before <= now) or (j.status == "running" and not j.leased(now))
            if not runnable:
                return False
            j.status, j.lease_owner, j.lease_until = "running", worker, now + self.settings.lease_s
            j.attempts += 1
            j.started_at = j.started_at or now
            return True

        return await self._change(kind, job, take)

    async def renew(self, kind: str, job: Job, worker: str) -> Job | None:
        """Extend the lease; None when the job was cancelled, finished or taken over meanwhile."""
        def extend(j: Job) -> bool:
            if j.status != "running" or j.lease_owner != worker:
                return False
            j.lease_until = time.time() + self.settings.lease_s
            return True

        return await self._change(kind, job, extend)

    async def finish(self, kind: str, job: Job, status_code: int, body: dict | None) -> Job | None:
        def end(j: Job) -> bool:
            if j.status != "running":
                return False  # cancelled, or another executor finished first
            now = time.time()
            ok = 200 <= status_code < 300
            j.status = "succeeded" if ok else "failed"
            j.status_code = status_code
            j.result, j.error = (body, None) if ok else (None, body)
            j.finished_at, j.lease_owner, j.lease_until = now, None, 0.0
            if j.callback is not None:
                j.callback.next_at = now
            return True

        return await self._change(kind, job, end)

    async def requeue(self, kind: str, job: Job, delay_s: float) -> Job | None:
        """Back to the queue (the scheduler was full): not a failure, and run again later."""
        def back(j: Job) -> bool:
            if j.status != "running":
                return False
            j.status, j.lease_owner, j.lease_until = "queued", None, 0.0
            j.not_before = time.time() + delay_s
            return True

        return await self._change(kind, job, back)

    async def cancel(self, kind: str, job: Job) -> Job | None:
        def stop(j: Job) -> bool:
            if j.terminal:
                return False
            now = time.time()
            j.status, j.finished_at, j.lease_owner, j.lease_until = "cancelled", now, None, 0.0
            if j.callback is not None:
                j.callback.next_at = now
            return True

        return await self._change(kind, job, stop)

    # -- callbacks ---------------------------------------------------------------------------------

    async def claim_callback(self, job: Job | Batch, worker: str, kind: str = "job") -> Job | Batch | None:
        def take(j: Job) -> bool:
            now = time.time()
            if not j.terminal or j.callback is None or j.callback.status != "pending":
                return False
            if j.callback.next_at > now or j.leased(now):
                return False
            j.lease_owner, j.lease_until = worker, now + self.settings.lease_s
            return True

        return await self._change(kind, job, take)

    async def callback_attempted(self, job: Job | Batch, worker: str, error: str | None,
                                 kind: str = "job") -> Job | Batch | None:
        """Record one delivery attempt: delivered, retried later (backoff + jitter) or given up."""
        cfg = self.settings

        def record(j: Job) -> bool:
            if j.callback is None or j.lease_owner != worker:
                return False
            now = time.time()
            cb: Callback = j.callback
            cb.attempts += 1
            j.lease_owner, j.lease_until = None, 0.0
            if error is None:
                cb.status, cb.delivered_at, cb.last_error = "delivered", now, None
            elif cb.attempts >= cfg.callback_max_attempts:
                cb.status, cb.last_error = "failed", error
            else:
                cb.last_error = error
                cb.next_at = now + backoff_s(cb.attempts, cfg.callback_backoff_s, cfg.callback_max_backoff_s)
            return True

        return await self._change(kind, job, record)


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """Exponential backoff with "equal jitter": half the delay fixed, half random."""
    delay = min(cap_s, base_s * 2 ** (attempt - 1))
    return delay / 2 + random.uniform(0, delay / 2)
