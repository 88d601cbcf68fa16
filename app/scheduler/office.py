"""The scheduler's decisions, without Ray: admission, placement, tickets, in-flight limits.

`TicketOffice` is what the Scheduler deployment serves (app/scheduler/deployment.py) and what
bench/scheduler_capacity.py measures: `admit` waits in the AdmissionQueue and places the request
with the Dispatcher (routing policy over the replicas' snapshot), `reroute` places a ticket again
after a replica failure, `release` frees slots and feeds the adaptive in-flight limits, and a
sweeper takes back the slots of tickets whose lease ran out. Single event loop, no locks.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any

from app.config import AppSettings
from app.metrics import SchedulerMetrics
from app.protocol import GenerateRequest
from app.scheduler.admission import AdmissionQueue, RequestMeta
from app.scheduler.control import InFlightLimits
from app.scheduler.dispatch import Dispatcher
from app.scheduler.ray_router import RoutingSnapshot, routing_snapshot
from app.scheduler.routing import make_policy
from app.scheduler.tickets import LiveTicket, Outcome, Ticket, TicketDesk, rid_matches

logger = logging.getLogger("sglserve.scheduler")


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
        snapshot: Callable[[str], RoutingSnapshot] = routing_snapshot,
    ) -> None:
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
        policy = make_policy(cfg.routing_policy, **policy_kwargs(settings))
        self.dispatcher = Dispatcher(policy, deployment, snapshot=snapshot)
        self.desk = TicketDesk(cfg.ticket_lease_s, prefix=f"{uuid.uuid4().hex[:6]}-")
        self.retries_total = 0
        self.migrations_total = 0
        self.calls = {"admit": 0, "reroute": 0, "release": 0}
        self.metrics = SchedulerMetrics(settings.model.name, settings.observability, self.admission)
        self._sweeper: asyncio.Task | None = None

    async def admit(self, request: GenerateRequest) -> Ticket:
        """Wait for a slot (or raise OverloadedError), then place the request on a replica."""
        self.calls["admit"] += 1
        self._start_sweeper()
        meta = RequestMeta.from_request(request, self.default_priority)
        await self.metrics.acquire(meta)
        try:
            replica, routed = self.dispatcher.choose(request)
        except BaseException:
            self.admission.release(0.0)
            raise
        return self.desk.issue(meta, replica, routed)

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
        self.dispatcher.suspect(failed_replica)
        live = self.desk.get(ticket_id)
        if live is None:
            return await self.admit(request)
        self.dispatcher.completed(live.routed)
        exclude = frozenset([failed_replica]) if failed_replica else frozenset()
        replica, routed = self.dispatcher.choose(request, exclude)
        logger.info("request %s: replica %s failed; placed on %s", request.rid, failed_replica, replica)
        return self.desk.replace(live, replica, routed)

    def abort_queued(self, rid: str | None) -> int:
        """Take a request (and its fan-out; every request for None) out of the admission queue
        before it was admitted: its admit raises RequestAbortedError and it never reaches a replica."""
        return self.admission.abort(lambda candidate: rid is None or rid_matches(rid, candidate))

    def release(self, outcomes: list[Outcome], renew: list[str] | None = None) -> None:
        """Streams that ended (their slots come free) and streams still running (leases renewed)."""
        self.calls["release"] += 1
        for outcome in outcomes:
            live = self.desk.pop(outcome.ticket_id)
            if live is not None:
                self._free(live, outcome)
        self.desk.renew(renew or ())

    def _free(self, live: LiveTicket, outcome: Outcome | None) -> None:
        self.admission.release(self.desk.hold_s(live))
        self.dispatcher.completed(live.routed)
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

    def stats(self) -> dict[str, Any]:
        return {
            "admission": self.admission.stats(),
            "retries_total": self.retries_total,
            "migrations_total": self.migrations_total,
            "in_flight_limits": self.concurrency.stats() if self.concurrency is not None else None,
            "tickets": self.desk.stats(),
            "routing": self.dispatcher.stats(),
            "calls": dict(self.calls),
        }
