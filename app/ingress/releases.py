"""Ticket releases and lease renewals, sent to the scheduler in batches off the request path.

One call in flight at a time: an outcome that arrives while the scheduler is idle leaves at
once (no added hold time at low load), and outcomes that arrive while a call is in flight go
together in the next one (so under load the calls per second stay bounded by one per round
trip, whatever the request rate). Every `renew_every_s` the ids of the tickets still streaming
ride along, renewing their leases; an Ingress that dies stops renewing, and the scheduler takes
the slots back when the leases run out. A failed call is logged, not retried: its tickets
expire by lease. Batched admits whose clients went away while they waited in the scheduler's queue
(app/ingress/admits.py) ride along too, so that they leave the queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from app.scheduler.tickets import Outcome, Ticket

logger = logging.getLogger("sglserve.ingress")


class ReleaseBatcher:
    def __init__(self, scheduler: Any, lease_s: float) -> None:
        self._scheduler = scheduler
        self.renew_every_s = max(0.01, lease_s / 3)
        self._pending: list[Outcome] = []
        self._cancels: list[str] = []
        self._live: dict[str, Ticket] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._renewed_at = time.monotonic()
        self.calls_total = 0
        self.released_total = 0

    def track(self, ticket: Ticket) -> None:
        """A ticket now streaming: renew its lease until it is released."""
        self._live[ticket.ticket_id] = ticket
        self._ensure_running()

    def release(self, outcome: Outcome) -> None:
        self._live.pop(outcome.ticket_id, None)
        self._pending.append(outcome)
        self._ensure_running()
        assert self._wake is not None
        self._wake.set()

    def cancel_admit(self, key: str) -> None:
        """A batched admit nobody waits for any more: the scheduler takes it out of its queue."""
        self._cancels.append(key)
        self._ensure_running()
        assert self._wake is not None
        self._wake.set()

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.renew_every_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self._send()

    async def _send(self) -> None:
        batch, self._pending = self._pending, []
        cancels, self._cancels = self._cancels, []
        now = time.monotonic()
        renew = list(self._live) if self._live and now - self._renewed_at >= self.renew_every_s else []
        if not batch and not renew and not cancels:
            return
        if renew:
            self._renewed_at = now
        self.calls_total += 1
        self.released_total += len(batch)
        try:
            if cancels:
                await self._scheduler.release.remote(batch, renew, cancels)
            else:
                await self._scheduler.release.remote(batch, renew)
        except Exception as exc:  # noqa: BLE001 - the scheduler may be restarting; leases expire
            logger.warning("releasing %d tickets failed (they expire by lease): %r", len(batch), exc)

    def stats(self) -> dict[str, Any]:
        return {"live": len(self._live), "pending": len(self._pending), "calls_total": self.calls_total,
                "released_total": self.released_total}
