"""The scheduler deployment: the control plane. It decides; it carries no tokens.

The Ingress asks for a ticket (`admit`): the request waits in the admission queue (bounded queue,
fairness, priorities, 503 + Retry-After), then the routing policy picks its replica from the token
ids (`app.scheduler.dispatch`). The Ingress streams the tokens straight from that replica, one Ray
Serve handle hop, and reports how the stream ended (`release`, batched). A replica failure sends
the Ingress back for another replica of the same ticket (`reroute`): the slot is kept, the retry
counted, the failed replica set aside for a while. See app/scheduler/tickets.py for the protocol.

Also here: /abort_request (sent to the replica that holds the stream), /flush_cache and
/server_info (broadcast to every replica), readiness (a real 1-token generation), and /run
programs (admitted like one request, run whole on the chosen replica).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from app.config import AppSettings
from app.errors import APIError, EngineError, unwrap_error
from app.metrics import SchedulerMetrics
from app.protocol import GenerateOutput, GenerateRequest, SamplingParams
from app.scheduler.admission import AdmissionQueue, RequestMeta
from app.scheduler.control import AdaptiveConcurrency
from app.scheduler.dispatch import Dispatcher
from app.scheduler.ray_router import TARGET_REPLICA_KWARG, live_replica_ids
from app.scheduler.routing import make_policy
from app.scheduler.tickets import LiveTicket, Outcome, Ticket, TicketDesk

logger = logging.getLogger("sglserve.scheduler")


class Scheduler:
    def __init__(self, replicas: DeploymentHandle, settings: dict[str, Any]):
        from app.deployments import policy_kwargs

        self.settings = AppSettings.from_args(settings)
        cfg = self.settings.scheduler
        # Broadcasts and readiness only; initialised now so that its request router starts
        # following the replicas (membership and load) before the first ticket is asked for.
        self.replicas = replicas
        self.replica_streams = replicas.options(stream=True)
        self.admission = AdmissionQueue(
            max_queue=cfg.max_queue,
            max_concurrent=cfg.max_concurrent,
            max_queue_wait_s=cfg.max_queue_wait_s,
            tenant_weights={**self.settings.security.tenant_weights(), **cfg.tenant_weights} or None,
        )
        self.default_priority = self.settings.security.default_priorities()
        self.concurrency = InFlightLimits(self.admission, self.settings) if cfg.adaptive_concurrency else None
        self.dispatcher = Dispatcher(make_policy(cfg.routing_policy, **policy_kwargs(self.settings)))
        self.desk = TicketDesk(cfg.ticket_lease_s, prefix=f"{uuid.uuid4().hex[:6]}-")
        self.retries_total = 0
        self.migrations_total = 0
        self.calls = {"admit": 0, "reroute": 0, "release": 0}
        self.metrics = SchedulerMetrics(self.settings.model.name, self.settings.observability, self.admission)
        self._sweeper: asyncio.Task | None = None

    # -- the ticket protocol -------------------------------------------------------------------

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
            out = GenerateOutput.model_construct(
                rid=live.meta.rid, completion_tokens=outcome.completion_tokens,
                first_token_time=outcome.first_token_time, served_by=outcome.served_by,
            )
            self.concurrency.observe(out, live.admitted_at, finished_at=outcome.finished_at)

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

    # -- /run programs (admitted like one request, run whole on the chosen replica) ----------

    async def run_program(self, route: GenerateRequest, body: dict[str, Any]) -> dict[str, Any]:
        ticket = await self.admit(route)
        outcome = Outcome(ticket.ticket_id, "error")
        try:
            result = await self.replicas.run_program.remote(route, body, **self._target(ticket))
            outcome.status = "finished"
            return result
        except Exception as exc:  # noqa: BLE001 - APIErrors pass through unwrapped
            raise self._client_error(exc) from None
        finally:
            self.release([outcome])

    async def run_program_stream(self, route: GenerateRequest, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        ticket = await self.admit(route)
        outcome = Outcome(ticket.ticket_id, "error")
        try:
            async for event in self.replica_streams.run_program_stream.remote(route, body, **self._target(ticket)):
                yield event
            outcome.status = "finished"
        except Exception as exc:  # noqa: BLE001
            raise self._client_error(exc) from None
        finally:
            self.release([outcome])

    @staticmethod
    def _target(ticket: Ticket) -> dict[str, str]:
        return {TARGET_REPLICA_KWARG: ticket.replica_id} if ticket.replica_id else {}

    @staticmethod
    def _client_error(exc: Exception) -> Exception:
        cause = unwrap_error(exc)
        if isinstance(cause, APIError):
            return cause
        return EngineError(f"the program failed on its replica: {type(cause).__name__}: {cause}")

    # -- control calls -------------------------------------------------------------------------

    async def abort(self, rid: str, abort_all: bool = False) -> int:
        """Abort streams by rid (or all). The Ingress that serves a stream may be any Ingress
        replica, so the abort goes where the stream is produced: the engine of the ticket's
        replica ends it with finish_reason "abort", and that reaches the client through whichever
        Ingress holds it. A rid this scheduler holds no ticket for (another scheduler replica's)
        is sent to every replica. Returns how many streams were aborted."""
        tickets = self.desk.matching(None if abort_all else rid)
        if not tickets:
            if abort_all:
                return 0
            return sum(1 for ok in await self._broadcast("abort", rid) if ok)
        calls = [self.replicas.abort.remote(t.meta.rid, **self._target(t.ticket)) for t in tickets]
        results = await asyncio.gather(*calls, return_exceptions=True)
        return sum(1 for r in results if not isinstance(r, BaseException))

    async def flush_cache(self) -> int:
        """Flush every replica's prefix cache; returns how many replicas flushed."""
        results = await self._broadcast("flush_cache")
        return sum(1 for r in results if r)

    async def _broadcast(self, method: str, *args: Any) -> list[Any]:
        """Call `method` on every live replica (the request router honours `target_replica`)."""
        targets = live_replica_ids("ModelReplica")
        if not targets:
            return [await getattr(self.replicas, method).remote(*args)]
        calls = [getattr(self.replicas, method).remote(*args, target_replica=t) for t in sorted(targets)]
        return list(await asyncio.gather(*calls))

    async def server_info(self) -> dict[str, Any]:
        states = await self._broadcast("stats")
        args = await self.replicas.server_args.remote()
        return {
            "internal_states": [stats.model_dump() for stats in states],
            "server_args": args,
            "scheduler": self.stats(),
            "version": "sglserve-0.1.0",
        }

    async def check_ready(self, timeout_s: float) -> dict[str, Any]:
        """Readiness: a real 1-token generation through admission and a replica."""
        started = time.monotonic()
        probe = GenerateRequest(
            text="ready?",
            sampling=SamplingParams(max_new_tokens=1, temperature=0.0),
            tenant="__readiness__",
            priority=1_000_000,
        )

        async def run() -> int:
            ticket = await self.admit(probe)
            outcome = Outcome(ticket.ticket_id, "error")
            try:
                tokens = 0
                async for out in self.replica_streams.generate.remote(probe, **self._target(ticket)):
                    tokens = out.completion_tokens
                outcome.status = "finished"
                return tokens
            finally:
                self.release([outcome])

        tokens = await asyncio.wait_for(run(), timeout_s)
        return {"latency_ms": (time.monotonic() - started) * 1000, "tokens": tokens}

    def stats(self) -> dict[str, Any]:
        return {
            "admission": self.admission.stats(),
            "retries_total": self.retries_total,
            "migrations_total": self.migrations_total,
            "replicas": sorted(live_replica_ids("ModelReplica")),
            "in_flight_limits": self.concurrency.stats() if self.concurrency is not None else None,
            "tickets": self.desk.stats(),
            "routing": {"decisions_total": self.dispatcher.decisions_total},
            "calls": dict(self.calls),
        }


class InFlightLimits:
    """Adaptive batching: one feedback controller per replica (app.scheduler.control) sets how many
    requests that replica should have in flight to hold the p95 TTFT/ITL SLOs; the admission queue's
    concurrency is the sum over replicas seen recently. A replica is known once it has served a
    request; one silent for `forget_after_s` (gone, or scaled down) no longer counts.

    A new controller starts at the engine's batch capacity (`engine.max_running_requests`, within
    the min/max limits): the engine is built to run that many at once, and the controller backs
    off at once if the SLOs break. Starting low instead throttled every cold start: at 32 clients
    and a start of 16, half of them queued here until 64 requests had completed."""

    forget_after_s = 60.0

    def __init__(self, admission: AdmissionQueue, settings: AppSettings):
        self.admission = admission
        self.cfg = settings.scheduler
        self.max_limit = max(self.cfg.min_in_flight_per_replica, self.cfg.max_in_flight_per_replica)
        self.initial_limit = min(max(self.cfg.min_in_flight_per_replica, settings.engine.max_running_requests),
                                 self.max_limit)
        self.controllers: dict[str, AdaptiveConcurrency] = {}
        self.last_seen: dict[str, float] = {}

    def observe(self, out: GenerateOutput, admitted_at: float, finished_at: float | None = None) -> None:
        """One finished request: the final output (replica, first token time, tokens), when its
        slot was granted and when it finished (now if not given; releases arrive batched)."""
        replica = out.served_by
        if replica is None or out.first_token_time is None or out.completion_tokens == 0:
            return
        now = time.time() if finished_at is None else finished_at
        ttft_ms = max(0.0, out.first_token_time - admitted_at) * 1000
        decoded = out.completion_tokens - 1
        itl_ms = (now - out.first_token_time) * 1000 / decoded if decoded > 0 else None
        controller = self.controllers.get(replica)
        if controller is None:
            controller = self.controllers[replica] = AdaptiveConcurrency(
                self.cfg.slo_ttft_ms,
                self.cfg.slo_itl_ms,
                min_limit=self.cfg.min_in_flight_per_replica,
                max_limit=self.max_limit,
                initial=self.initial_limit,
            )
        per_replica = self.admission.in_flight // max(1, len(self.controllers))  # an estimate
        controller.observe(ttft_ms, itl_ms, in_flight=per_replica)
        self.last_seen[replica] = now
        for gone in [r for r, t in self.last_seen.items() if now - t > self.forget_after_s]:
            del self.last_seen[gone], self.controllers[gone]
        total = sum(c.limit for c in self.controllers.values())
        self.admission.set_max_concurrent(max(1, min(self.cfg.max_concurrent, total)))

    def stats(self) -> dict[str, Any]:
        return {replica: c.limit for replica, c in self.controllers.items()}


SchedulerDeployment = serve.deployment(name="Scheduler", max_ongoing_requests=4096)(Scheduler)
