"""One job in execution: renew its lease while it runs, stop it when it is cancelled, store its end.

Used both by the Ingress (a slow request it converted keeps running there) and by the runner.
Cancellation aborts the generation in the engine through the scheduler's abort (by the request
id the route recorded in its state), then cancels the local task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from app.jobs.execute import Outcome
from app.jobs.ledger import Ledger
from app.jobs.models import Job

logger = logging.getLogger("sglserve.jobs")

Abort = Callable[[str], Awaitable[Any]]


def retry_after_s(outcome: Outcome) -> float | None:
    """For an overloaded scheduler (503), how long to wait before the job runs again."""
    if outcome.status_code != 503:
        return None
    try:
        return max(0.5, float(outcome.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


async def supervise(ledger: Ledger, kind: str, job: Job, worker: str, task: asyncio.Task,
                    state: dict[str, Any], abort: Abort) -> Job | None:
    """Wait for `task` (an Outcome) while holding the job's lease; store the result. Returns the
    stored job, or None if the job was cancelled or taken over meanwhile."""
    renew_every = max(0.05, ledger.settings.lease_s / 3)
    while True:
        done, _ = await asyncio.wait({task}, timeout=renew_every)
        if done:
            break
        current = await ledger.renew(kind, job, worker)
        if current is None:
            await _stop(task, state, abort, job.id)
            return None
        job = current
    try:
        outcome: Outcome = task.result()
    except Exception as exc:  # noqa: BLE001 - stored as the job's error
        logger.warning("job %s raised %r", job.id, exc)
        outcome = Outcome(500, {"error": {"message": f"{type(exc).__name__}: {exc}"[:500],
                                          "type": "internal_error", "param": None, "code": 500}}, {})
    delay = retry_after_s(outcome)
    if delay is not None:
        return await ledger.requeue(kind, job, delay)
    return await ledger.finish(kind, job, outcome.status_code, outcome.body)


async def _stop(task: asyncio.Task, state: dict[str, Any], abort: Abort, job_id: str) -> None:
    rid = state.get("rid")
    if rid:
        try:
            await abort(rid)
        except Exception as exc:  # noqa: BLE001 - the task is cancelled anyway
            logger.info("abort of job %s (rid %s) failed: %r", job_id, rid, exc)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
