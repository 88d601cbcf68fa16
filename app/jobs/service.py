"""What the Ingress's job routes and the conversion middleware share, one per process."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from app.errors import ValidationError
from app.jobs.ledger import Ledger
from app.jobs.models import Callback, Identity, Job, new_id
from app.jobs.settings import JobsSettings
from app.jobs.ssrf import check_callback_url
from app.jobs.store import JobStore, make_store
from app.jobs.supervise import Abort, supervise

logger = logging.getLogger("sglserve.jobs")


class JobService:
    def __init__(self, settings: JobsSettings, abort: Abort, store: JobStore | None = None):
        self.settings = settings
        self.store = store or make_store(settings)
        self.ledger = Ledger(self.store, settings)
        self.abort = abort
        self.worker = f"ingress-{uuid.uuid4().hex[:12]}"
        self._held: set[asyncio.Task] = set()  # supervisions of converted requests

    # -- what a submission carries -------------------------------------------------------------------

    def max_wait_s(self, header: str | None) -> float:
        if header is None:
            return self.settings.max_wait_s
        limit = self.settings.max_wait_limit_s
        try:
            value = float(header)
        except ValueError:
            value = -1.0
        if not 0 < value <= limit:
            raise ValidationError(f"X-Max-Wait-S must be a number of seconds in (0, {limit}], got {header!r}",
                                  param="X-Max-Wait-S", code="invalid_max_wait")
        return value

    async def callback(self, body: dict[str, Any], header: str | None) -> Callback | None:
        """The callback a submission asks for (body field wins over the header), checked."""
        url = body.pop("callback_url", None) or header
        if url is None:
            return None
        if not isinstance(url, str):
            raise ValidationError("callback_url must be a string", param="callback_url")
        if self.settings.webhook_secret() is None:
            raise ValidationError("callbacks are not enabled on this server (no jobs.callback_secret)",
                                  param="callback_url", code="callbacks_disabled")
        await check_callback_url(url, self.settings)
        return Callback(url=url)

    @staticmethod
    def prepare_body(path: str, body: dict[str, Any], rid: str, state: dict[str, Any]) -> dict[str, Any]:
        """The body to send: a native /generate request gets a request id we know, so a cancel can
        abort it in the engine (OpenAI routes record theirs in the request state themselves). The
        id is per attempt: a re-run must not share an id with its orphaned first run."""
        if path == "/generate" and body.get("rid") is None and not isinstance(body.get("text"), list) \
                and not (body.get("input_ids") and isinstance(body["input_ids"][0], list)):
            state["rid"] = rid
            return {**body, "rid": rid}
        return body

    # -- auto-conversion: a request that outlived its wait becomes a job -------------------------------

    async def adopt(self, path: str, body: dict[str, Any], identity: Identity, callback: Callback | None,
                    task: asyncio.Task, state: dict[str, Any], job_id: str) -> Job:
        """Persist the still-running request as a job this process holds the lease of, and keep
        supervising it; if this process dies, the lease runs out and a runner re-runs the job."""
        now = time.time()
        job = Job(id=job_id, owner=identity.key_id or "anonymous", path=path, body=body, identity=identity,
                  status="running", priority=identity.priority, started_at=now, attempts=1,
                  lease_owner=self.worker, lease_until=now + self.settings.lease_s, callback=callback)
        await self.store.insert("job", [job])
        watch = asyncio.create_task(self._watch(job, task, state))
        self._held.add(watch)
        watch.add_done_callback(self._held.discard)
        return job

    async def _watch(self, job: Job, task: asyncio.Task, state: dict[str, Any]) -> None:
        try:
            await supervise(self.ledger, "job", job, self.worker, task, state, self.abort)
        except Exception:  # noqa: BLE001 - the lease runs out and a runner takes the job over
            logger.exception("supervising job %s failed; the runner will take it over", job.id)

    def new_job(self, path: str, body: dict[str, Any], identity: Identity, callback: Callback | None) -> Job:
        return Job(id=new_id("job"), owner=identity.key_id or "anonymous", path=path, body=body,
                   identity=identity, priority=identity.priority, callback=callback)


def identity_of(state: dict[str, Any]) -> Identity:
    return Identity(tenant=state.get("tenant") or "anonymous", key_id=state.get("key_id"),
                    priority=state.get("priority") or 0, max_priority=state.get("max_priority"))


def body_bytes(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()
