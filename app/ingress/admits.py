"""Admits to the scheduler, coalesced: the requests that arrive while one call is in flight go together.

One `Scheduler.admit_many` call in flight at a time: a request that arrives while none is leaves
at once, alone (a unary call, as cheap as the one-request `admit`: no added wait at low load),
and the requests that arrive meanwhile go together in the next call, so under load the admit
calls per second stay bounded by one per round trip whatever the request rate, and the
scheduler's cost per admission falls towards the decision's own. The scheduler answers each
request on its own (app/scheduler/office.py): `admit_many` returns at once with every answer
decided without waiting (a ticket, or that request's own 503) and QUEUED for the others, so the
call never waits on the queue and a request queued in the scheduler never holds back the next
batch (a later request of higher priority reaches the queue as it would with one call per
request). The queued ones' answers then come through one `follow_admits` stream per such batch,
each as its slot is granted or refused: a hop only requests that wait anyway pay.

A client that goes away while its admit waits: if the batch has not left, it is dropped from it;
if it has, the scheduler is told to take it out of the queue (with the next release batch), and a
ticket that was granted anyway is released at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from app.errors import EngineUnavailableError
from app.protocol import GenerateRequest
from app.scheduler.tickets import QUEUED, Ticket

logger = logging.getLogger("sglserve.ingress")

Answers = list[tuple[str, Any]]
SendBatch = Callable[[list[tuple[str, GenerateRequest]]], Awaitable[Answers]]
Follow = Callable[[list[str]], AsyncIterator[Answers]]


class AdmitBatcher:
    def __init__(
        self,
        send: SendBatch,
        follow: Follow,
        *,
        cancel: Callable[[str], None],
        orphan: Callable[[Ticket], None],
    ) -> None:
        """`send(batch)` is Scheduler.admit_many, `follow(keys)` Scheduler.follow_admits (a stream);
        `cancel(key)` tells the scheduler an admit is no longer wanted; `orphan(ticket)` gives back
        a ticket granted to a client that went away."""
        self._send = send
        self._follow = follow
        self._cancel = cancel
        self._orphan = orphan
        self._prefix = f"{uuid.uuid4().hex[:8]}-"
        self._keys = itertools.count(1)
        self._pending: list[tuple[str, GenerateRequest]] = []
        self._waiting: dict[str, asyncio.Future[Ticket]] = {}  # sent or pending, not yet answered
        self._sending = False
        self._calls: set[asyncio.Task] = set()
        self.calls_total = 0
        self.admits_total = 0
        self.max_batch = 0

    async def admit(self, request: GenerateRequest) -> Ticket:
        """A ticket for this request, or its own refusal (e.g. OverloadedError) raised here."""
        key = f"{self._prefix}{next(self._keys)}"
        future: asyncio.Future[Ticket] = asyncio.get_running_loop().create_future()
        self._waiting[key] = future
        self._pending.append((key, request))
        self._start_next()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                if future.exception() is None:  # granted just as its client went away
                    self._orphan(future.result())
            elif any(k == key for k, _ in self._pending):
                self._pending = [(k, r) for k, r in self._pending if k != key]
            else:
                self._cancel(key)  # sent: take it out of the scheduler's queue
            raise
        finally:
            self._waiting.pop(key, None)

    def _start_next(self) -> None:
        if self._sending or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._sending = True
        self.calls_total += 1
        self.admits_total += len(batch)
        self.max_batch = max(self.max_batch, len(batch))
        task = asyncio.get_running_loop().create_task(self._call(batch))  # also follows its queued ones
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _call(self, batch: list[tuple[str, GenerateRequest]]) -> None:
        try:
            answers = await self._send(batch)
        except Exception as exc:  # noqa: BLE001 - the call failed as a whole: each admit raises it
            answers = [(key, exc) for key, _ in batch]
        finally:
            self._sending = False
            self._start_next()
        queued = [key for key, answer in answers if answer == QUEUED]
        for key, answer in answers:
            if answer != QUEUED:
                self._deliver(key, answer)
        if queued:
            await self._follow_queued(queued)

    async def _follow_queued(self, keys: list[str]) -> None:
        unanswered = set(keys)
        try:
            async for answers in self._follow(keys):
                for key, answer in answers:
                    unanswered.discard(key)
                    self._deliver(key, answer)
        except Exception as exc:  # noqa: BLE001 - the stream broke (the scheduler died): each raises it
            for key in unanswered:
                self._deliver(key, exc)
            unanswered.clear()
        finally:
            for key in unanswered:  # the stream ended without them (cannot happen unless cancelled)
                self._deliver(key, None)

    def _deliver(self, key: str, answer: Ticket | BaseException | None) -> None:
        future = self._waiting.get(key)
        if future is None or future.done():  # its client went away
            if isinstance(answer, Ticket):
                self._orphan(answer)
            return
        if isinstance(answer, Ticket):
            future.set_result(answer)
        elif isinstance(answer, BaseException):  # its own refusal, or the failed call's error
            future.set_exception(answer)
        else:
            future.set_exception(EngineUnavailableError("the scheduler did not answer this admission",
                                                        code="admit_dropped"))

    def stats(self) -> dict[str, Any]:
        return {"calls_total": self.calls_total, "admits_total": self.admits_total, "max_batch": self.max_batch,
                "waiting": len(self._waiting), "pending": len(self._pending)}
