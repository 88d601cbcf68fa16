"""The JobRunner deployment: owns job execution and callback delivery.

It polls the store for due work: queued jobs and batch lines, jobs whose lease ran out (their
Ingress or runner died: run again, idempotent by job id: the first stored result wins), ended
jobs whose callback is due, and batches to finalize or call back (app.jobs.finalize: safe with several
runners, each step claimed by compare-and-swap). Jobs run through the Ingress's own routes
in-process (app.jobs.execute) and from there through the same Scheduler handle, so a job outlives
the HTTP connection and the Ingress. Batch lines run at `jobs.batch_priority` (the lowest) and at
most `jobs.batch_concurrency` at once per runner, so they use spare capacity.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import httpx
from ray import serve
from ray.serve.handle import DeploymentHandle

from app.config import AppSettings
from app.ingress.gateway import Gateway
from app.jobs.callbacks import deliver
from app.jobs.execute import call_route, routes_app
from app.jobs.finalize import BatchFinalizer
from app.jobs.ledger import Ledger
from app.jobs.models import Batch, Job
from app.jobs.service import JobService, body_bytes
from app.jobs.store import make_store
from app.jobs.supervise import supervise

logger = logging.getLogger("sglserve.jobs")

PURGE_EVERY_S = 60.0


class JobRunner:
    async def __init__(self, scheduler: DeploymentHandle, settings: dict[str, Any], replicas: DeploymentHandle):
        from app.ingress.server import load_model_limits

        self.settings = AppSettings.from_args(settings)
        self.cfg = self.settings.jobs
        limits, tokenizer = load_model_limits(self.settings)
        self.gateway = Gateway(self.settings, scheduler, tokenizer, limits, replicas)
        self.app = routes_app(lambda request: self.gateway)
        self.store = make_store(self.cfg)
        self.ledger = Ledger(self.store, self.cfg)
        self.worker = f"runner-{uuid.uuid4().hex[:12]}"
        self.http = httpx.AsyncClient()
        self.batches = BatchFinalizer(self.store, self.ledger, self.worker, self.http)
        self.tasks: dict[str, asyncio.Task] = {}  # "kind:id" -> its execution, delivery or batch step
        self.executed_total = 0
        self.last_purge = 0.0
        self.loop = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - a store hiccup must not stop the runner
                logger.exception("job runner tick failed")
            await asyncio.sleep(self.cfg.poll_interval_s)

    async def tick(self) -> None:
        now = time.time()
        await self._start_due("job", self.cfg.runner_concurrency, now)
        await self._start_due("line", await self._batch_room(), now)
        for batch in await self.store.due("batch", now, 16, Batch):
            if f"batch:{batch.id}" not in self.tasks:  # finalize or call back (app.jobs.finalize)
                self._spawn(f"batch:{batch.id}", self.batches.step(batch))
        if now - self.last_purge > PURGE_EVERY_S:
            self.last_purge = now
            await self.store.purge(now - self.cfg.retention_s)

    async def _batch_room(self) -> int:
        """How many batch lines may be in flight now: all of `batch_concurrency` when the scheduler
        serves nothing but them, `batch_concurrency_busy` while anything else is in flight or queued."""
        if not self._busy("line") and not await self.store.due("line", time.time(), 1, Job):
            return 0  # no batch work: spare the scheduler the stats call
        try:
            admission = (await self.gateway.call_scheduler("stats"))["admission"]
        except Exception:  # noqa: BLE001 - unknown load: be modest
            return self.cfg.batch_concurrency_busy
        others = admission["in_flight"] + admission["queue_depth"] - self._busy("line")
        return self.cfg.batch_concurrency if others <= 0 else self.cfg.batch_concurrency_busy

    def _busy(self, kind: str) -> int:
        return sum(1 for key in self.tasks if key.startswith(f"{kind}:"))

    async def _start_due(self, kind: str, limit: int, now: float) -> None:
        free = limit - self._busy(kind)
        scan = max(free, 0) * 2 + 32  # due callbacks share the "job" index with runnable jobs
        for job in await self.store.due(kind, now, scan, Job):
            key = f"{kind}:{job.id}"
            if key in self.tasks:
                continue
            if job.terminal:
                if kind == "job" and job.callback is not None:
                    await self._start_callback(job)
                continue
            if free <= 0:
                continue
            claimed = await self.ledger.claim(kind, job, self.worker)
            if claimed is not None:
                free -= 1
                self._spawn(key, self._execute(kind, claimed))

    def _spawn(self, key: str, work) -> None:
        task = asyncio.create_task(work)
        self.tasks[key] = task
        task.add_done_callback(lambda _t, k=key: self.tasks.pop(k, None))

    async def _execute(self, kind: str, job: Job) -> None:
        state = job.identity.request_state()
        if kind == "line":  # batch work goes last in the scheduler's queue
            state["priority"] = state["max_priority"] = self.cfg.batch_priority
        body = JobService.prepare_body(job.path, job.body, f"{job.id.removeprefix('job_')}-{job.attempts}", state)
        task = asyncio.create_task(call_route(self.app, job.path, body_bytes(body), state))
        try:
            await supervise(self.ledger, kind, job, self.worker, task, state, self._abort)
            self.executed_total += 1
        except Exception:  # noqa: BLE001 - the lease runs out and the job runs again
            logger.exception("job %s failed in the runner", job.id)

    async def _abort(self, rid: str) -> Any:
        return await self.gateway.call_scheduler("abort", rid, False)

    async def _start_callback(self, job: Job) -> None:
        claimed = await self.ledger.claim_callback(job, self.worker)
        if claimed is not None:
            self._spawn(f"job:{job.id}", self._deliver(claimed))

    async def _deliver(self, job: Job) -> None:
        error = await deliver(self.http, job, self.cfg)
        if error is not None:
            logger.info("callback of job %s failed: %s", job.id, error)
        await self.ledger.callback_attempted(job, self.worker, error)

    # -- Serve hooks -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {"worker": self.worker, "running": len(self.tasks), "executed_total": self.executed_total,
                "batches_finalized_total": self.batches.finalized_total}

    async def check_health(self) -> None:
        if self.loop.done():
            raise RuntimeError(f"the runner loop stopped: {self.loop.exception()!r}")


JobRunnerDeployment = serve.deployment(
    name="JobRunner", num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.1})(JobRunner)
