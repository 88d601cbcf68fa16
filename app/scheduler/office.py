"""The scheduler's decisions, without Ray: admission, placement, tickets, in-flight limits.

`TicketOffice` is what the Scheduler deployment serves (app/scheduler/deployment.py) and what
bench/scheduler_capacity.py measures: `admit` waits in the AdmissionQueue and places the request
with the Dispatcher (routing policy over the replicas' snapshot), `admit_many` does the same for a
batch of requests (each answered on its own, as its slot is granted or refused), `reroute` places a ticket again
after a replica failure, `release` frees slots and feeds the adaptive in-flight limits, and a
sweeper takes back the slots of tickets whose lease ran out. Single event loop, no locks.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

from app.config import AppSettings
from app.errors import APIError, EngineError, NotFoundError
from app.metrics import SchedulerMetrics
from app.protocol import GenerateRequest
from app.scheduler.admission import AdmissionQueue, RequestMeta
from app.scheduler.control import InFlightLimits
from app.scheduler.dispatch import Dispatcher
from app.scheduler.ray_router import RoutingSnapshot, routing_snapshot
from app.scheduler.routing import make_policy
from app.scheduler.tickets import QUEUED, LiveTicket, Outcome, Ticket, TicketDesk, rid_matches

logger = logging.getLogger("sglserve.scheduler")

EARLY_CANCEL_KEEP_S = 60.0  # a cancel that overtook its admit waits this long for it

AdmitAnswer = tuple[str, "Ticket | APIError | str | None"]  # (key, its ticket, its refusal, QUEUED, or None: cancelled)


def policy_kwargs(settings: AppSettings) -> dict[str, Any]:
    """The routing policy's options; cache_aware's tree holds about what a replica's KV holds, so it
    forgets prefixes roughly when the replica evicts them."""
    kwargs = dict(settings.scheduler.routing_policy_kwargs)
    if settings.scheduler.routing_policy == "cache_aware" and settings.engine.max_total_tokens:
        kwargs.setdefault("max_tree_tokens_per_replica", settings.engine.max_total_tokens)
    return kwargs


class TicketOffice:
    def __init__(
        self,
        settings: AppSettings,
        *,
        deployment: str = "ModelReplica",
        deployments: Mapping[str | None, str] | None = None,
        snapshot: Callable[[str], RoutingSnapshot] = routing_snapshot,
    ) -> None:
        """`deployments`: model version -> its ModelReplica deployment (app/canary.py); by default
        one model (version None) served by `deployment`. One admission queue for all versions
        (`max_concurrent` bounds the application); each version's replicas are placed apart."""
        self.settings = settings
        cfg = settings.scheduler
        self.admission = AdmissionQueue(
            max_queue=cfg.max_queue,
            max_concurrent=cfg.max_concurrent,
            max_queue_wait_s=cfg.max_queue_wait_s,
            tenant_weights={**settings.security.tenant_weights(), **cfg.tenant_weights} or None,
        )
        self.default_priority = settings.security.default_priorities()
        self.concurrency = InFlightLimits(self.admission, settings) if cfg.adaptive_concurrency else None
        deployments = dict(deployments or {None: deployment})
        self.dispatchers = {
            version: Dispatcher(make_policy(cfg.routing_policy, **policy_kwargs(settings)), name, snapshot=snapshot)
            for version, name in deployments.items()
        }
        # Requests that name no version (readiness, an untagged call) go to the first version.
        self.default_version = next(iter(deployments))
        self.dispatcher = self.dispatchers[self.default_version]
        self.desk = TicketDesk(cfg.ticket_lease_s, prefix=f"{uuid.uuid4().hex[:6]}-")
        self.refusing: APIError | None = None  # set while the Scheduler drains: every new admit gets it
        self.retries_total = 0
        self.migrations_total = 0
        self.calls = {"admit": 0, "admit_many": 0, "reroute": 0, "release": 0}
        self._admitting: dict[str, tuple[asyncio.Task, float]] = {}  # queued admit_many admits: key -> (task, since)
        self._cancelled_early: dict[str, float] = {}  # key -> when its cancel came (before the admit)
        self.metrics = SchedulerMetrics(settings.model.name, settings.observability, self.admission)
        self._sweeper: asyncio.Task | None = None

    def version_of(self, request: GenerateRequest) -> str | None:
        """The version a request is served by: the one it names (checked), else the default."""
        version = request.model_version
        if version is None or (None in self.dispatchers and len(self.dispatchers) == 1):
            return self.default_version
        if version not in self.dispatchers:
            raise NotFoundError(f"model version '{version}' does not exist; versions: "
                                f"{sorted(v for v in self.dispatchers if v)}", param="model", code="model_not_found")
        return version

    async def admit(self, request: GenerateRequest) -> Ticket:
        """Wait for a slot (or raise OverloadedError), then place the request on a replica."""
        self.calls["admit"] += 1
        if self.refusing is not None:  # this Scheduler replica is shutting down (SIGTERM)
            raise self.refusing
        self._start_sweeper()
        version = self.version_of(request)
        meta = RequestMeta.from_request(request, self.default_priority)
        await self.metrics.acquire(meta)
        try:
            replica, routed = self.dispatchers[version].choose(request)
        except BaseException:
            self.admission.release(0.0)
            raise
        return self.desk.issue(meta, replica, routed, version)

    async def admit_many(self, batch: list[tuple[str, GenerateRequest]]) -> list[AdmitAnswer]:
        """Admit a batch of requests (an Ingress's admits coalesced into one call), each exactly as
        `admit` would, in the batch's order: the same queue, priorities, fairness and refusals.
        Returns at once, with each request's answer decided without waiting (its ticket, or its
        own refusal, an OverloadedError sent as a value: never the batch's), and QUEUED for those
        that wait in the queue; their answers come through `follow_admits`."""
        self.calls["admit_many"] += 1
        loop = asyncio.get_running_loop()
        tasks: list[tuple[str, asyncio.Task]] = []
        for key, request in batch:
            task = loop.create_task(self.admit(request))
            tasks.append((key, task))
            if self._cancelled_early.pop(key, None) is not None:
                task.cancel()
        await asyncio.sleep(0)  # each admit has run to its first wait: granted, refused, or queued
        answers: list[AdmitAnswer] = []
        now = time.monotonic()
        for key, task in tasks:
            if task.done():
                answers.append((key, _answer(task)))
            else:
                self._admitting[key] = (task, now)
                answers.append((key, QUEUED))
        return answers

    async def follow_admits(self, keys: list[str]) -> AsyncIterator[list[AdmitAnswer]]:
        """The answers of queued admits (`admit_many` said QUEUED), each as its slot is granted or
        refused; None for one cancelled or unknown (its Ingress gave up on it, or it was swept).
        The stream closing early (the Ingress went away) takes its admits out of the queue."""
        waiting = {key: entry[0] for key in keys if (entry := self._admitting.get(key)) is not None}
        unknown = [(key, None) for key in keys if key not in waiting]
        try:
            if unknown:
                yield unknown
            while waiting:
                await asyncio.wait(waiting.values(), return_when=asyncio.FIRST_COMPLETED)
                done = [(key, task) for key, task in waiting.items() if task.done()]
                for key, _ in done:
                    del waiting[key]
                    self._admitting.pop(key, None)
                yield [(key, _answer(task)) for key, task in done]
        finally:
            for key, task in waiting.items():
                self._admitting.pop(key, None)
                task.cancel()

    def cancel_admits(self, keys: Iterable[str]) -> None:
        """Admits of `admit_many` whose clients went away: they leave the queue (a slot granted in
        the meantime is given back by the Ingress when the ticket reaches it)."""
        now = time.monotonic()
        for key in keys:
            entry = self._admitting.pop(key, None)
            if entry is not None:
                entry[0].cancel()
            else:  # the cancel overtook its batch (or the answer is on its way): remember it briefly
                self._cancelled_early[key] = now
        if self._cancelled_early:
            for key in [k for k, at in self._cancelled_early.items() if now - at > EARLY_CANCEL_KEEP_S]:
                del self._cancelled_early[key]

    async def reroute(
        self, ticket_id: str, request: GenerateRequest, failed_replica: str | None, started: bool
    ) -> Ticket:
        """Another replica for a ticket whose replica failed (before its first token, or with the
        stream started: then `request` is the continuation). The slot is kept; a ticket this
        scheduler no longer knows (its lease lapsed) is admitted afresh."""
        self.calls["reroute"] += 1
        self.retries_total += 1
        self.migrations_total += int(started)
        self.metrics.record_retry()
        dispatcher = self.dispatchers[self.version_of(request)]
        dispatcher.suspect(failed_replica)
        live = self.desk.get(ticket_id)
        if live is None:
            return await self.admit(request)
        dispatcher.completed(live.routed)
        exclude = frozenset([failed_replica]) if failed_replica else frozenset()
        replica, routed = dispatcher.choose(request, exclude)
        logger.info("request %s: replica %s failed; placed on %s", request.rid, failed_replica, replica)
        return self.desk.replace(live, replica, routed)

    def abort_queued(self, rid: str | None) -> int:
        """Take a request (and its fan-out; every request for None) out of the admission queue
        before it was admitted: its admit raises RequestAbortedError and it never reaches a replica."""
        return self.admission.abort(lambda candidate: rid is None or rid_matches(rid, candidate))

    def release(self, outcomes: list[Outcome], renew: list[str] | None = None, cancel: list[str] | None = None) -> None:
        """Streams that ended (their slots come free), streams still running (leases renewed), and
        batched admits whose clients went away while they waited (`cancel_admits`)."""
        self.calls["release"] += 1
        if cancel:
            self.cancel_admits(cancel)
        for outcome in outcomes:
            live = self.desk.pop(outcome.ticket_id)
            if live is not None:
                self._free(live, outcome)
        self.desk.renew(renew or ())

    def _free(self, live: LiveTicket, outcome: Outcome | None) -> None:
        self.admission.release(self.desk.hold_s(live))
        self.dispatchers.get(live.ticket.version, self.dispatcher).completed(live.routed)
        if outcome is not None and outcome.status == "finished" and self.concurrency is not None:
            self.concurrency.observe_finished(outcome.served_by, outcome.first_token_time, outcome.completion_tokens,
                                              live.admitted_at, outcome.finished_at)

    def _start_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._expire_leases())

    async def _expire_leases(self) -> None:
        """Take back the slots of tickets whose Ingress stopped renewing them (it died)."""
        period_s = max(0.05, self.desk.lease_s / 4)
        while True:
            await asyncio.sleep(period_s)
            for live in self.desk.expire():
                logger.warning("ticket %s (request %s) expired: no release within its lease",
                               live.ticket.ticket_id, live.meta.rid)
                self._free(live, None)
            self._sweep_unfollowed()

    def _sweep_unfollowed(self) -> None:
        """Queued admits whose Ingress never came for their answers (it died between its
        admit_many and follow_admits): dropped once they could no longer be waiting; a ticket
        granted to one expires by its lease."""
        too_old = time.monotonic() - (self.admission.max_queue_wait_s + self.desk.lease_s)
        for key in [k for k, (task, since) in self._admitting.items() if since < too_old]:
            task, _ = self._admitting.pop(key)
            task.cancel()

    def stats(self) -> dict[str, Any]:
        return {
            "admission": self.admission.stats(),
            "retries_total": self.retries_total,
            "migrations_total": self.migrations_total,
            "in_flight_limits": self.concurrency.stats() if self.concurrency is not None else None,
            "tickets": self.desk.stats(),
            "routing": self.dispatcher.stats() if len(self.dispatchers) == 1 else
                       {str(v): d.stats() for v, d in self.dispatchers.items()},
            "calls": dict(self.calls),
            "admitting": len(self._admitting),
        }


def _answer(task: asyncio.Task) -> "Ticket | APIError | None":
    """A finished admit as a value the Ingress can take: its ticket, its refusal, or None (cancelled)."""
    if task.cancelled():
        return None
    exc = task.exception()
    if exc is None:
        return task.result()
    if isinstance(exc, APIError):
        return exc
    logger.exception("admission failed", exc_info=exc)
    return EngineError(f"admission failed: {type(exc).__name__}: {exc}")
