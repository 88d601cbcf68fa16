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
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from app.canary import replica_deployment, version_handles
from app.config import AppSettings
from app.errors import APIError, EngineError, OverloadedError, unwrap_error
from app.protocol import GenerateRequest, SamplingParams
from app.scheduler.control import InFlightLimits  # noqa: F401 - its home before the ticket protocol
from app.scheduler.office import TicketOffice
from app.scheduler.ray_router import TARGET_REPLICA_KWARG, live_replica_ids
from app.scheduler.tickets import Outcome, Ticket
from app.sigterm import SigtermDrain

logger = logging.getLogger("sglserve.scheduler")


class Scheduler:
    def __init__(self, replicas: DeploymentHandle | dict[str, DeploymentHandle], settings: dict[str, Any]):
        self.settings = AppSettings.from_args(settings)
        # Canary (app/canary.py): one ModelReplica deployment per model version; tickets carry
        # the version and are placed among that version's replicas only.
        self.handles = version_handles(replicas)
        self.deployments = {v: replica_deployment(v) for v in self.handles}
        self.office = TicketOffice(self.settings, deployments=self.deployments)
        self.admission = self.office.admission  # (read by tests and metrics)
        # Broadcasts, aborts, readiness and /run; made now so that its request router starts
        # following the replicas (membership and load) before the first ticket is asked for.
        self.streams = {v: h.options(stream=True) for v, h in self.handles.items()}
        self.replicas = self.handles[self.office.default_version]
        self.replica_streams = self.streams[self.office.default_version]
        # SIGTERM straight to this process: new admits get a retryable 503, queued admits and
        # relayed /run programs finish, then the process exits and Serve replaces it.
        self.drain = SigtermDrain("Scheduler", on_start=self._refuse_new_work)

    def _refuse_new_work(self) -> None:
        self.office.refusing = OverloadedError("the scheduler is shutting down (SIGTERM); retry",
                                               code="scheduler_draining", retry_after_s=1)

    # -- the ticket protocol (app/scheduler/tickets.py; decisions in app/scheduler/office.py) --

    async def admit(self, request: GenerateRequest) -> Ticket:
        with self.drain.holding():
            return await self.office.admit(request)

    async def admit_many(self, batch: list[tuple[str, GenerateRequest]]) -> list[tuple[str, Any]]:
        """Batched admits (app/ingress/admits.py): each answered on its own; queued ones are
        answered through `follow_admits`."""
        with self.drain.holding():
            return await self.office.admit_many(batch)

    async def follow_admits(self, keys: list[str]) -> AsyncIterator[list[tuple[str, Any]]]:
        with self.drain.holding():
            async for answers in self.office.follow_admits(keys):
                yield answers

    async def reroute(self, ticket_id: str, request: GenerateRequest, failed_replica: str | None,
                      started: bool) -> Ticket:
        return await self.office.reroute(ticket_id, request, failed_replica, started)

    def release(self, outcomes: list[Outcome], renew: list[str] | None = None,
                cancel: list[str] | None = None) -> None:
        self.office.release(outcomes, renew, cancel)

    # -- /run programs (admitted like one request, run whole on the chosen replica) ----------

    async def run_program(self, route: GenerateRequest, body: dict[str, Any]) -> dict[str, Any]:
        with self.drain.holding():
            return await self._run_program(route, body)

    async def _run_program(self, route: GenerateRequest, body: dict[str, Any]) -> dict[str, Any]:
        ticket = await self.admit(route)
        outcome = Outcome(ticket.ticket_id, "error")
        try:
            for attempt in itertools.count():
                try:
                    result = await self.handles[ticket.version].run_program.remote(route, body, **self._target(ticket))
                    break
                except Exception as exc:  # noqa: BLE001 - sent elsewhere, or raised as it is
                    ticket = await self._elsewhere(ticket, route, exc, attempt)
            outcome.status = "finished"
            return result
        except Exception as exc:  # noqa: BLE001 - APIErrors pass through unwrapped
            raise self._client_error(exc) from None
        finally:
            self.release([outcome])

    async def run_program_stream(self, route: GenerateRequest, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        with self.drain.holding():
            async for event in self._run_program_stream(route, body):
                yield event

    async def _run_program_stream(self, route: GenerateRequest, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        ticket = await self.admit(route)
        outcome = Outcome(ticket.ticket_id, "error")
        try:
            for attempt in itertools.count():
                started = False
                try:
                    async for event in self.streams[ticket.version].run_program_stream.remote(
                            route, body, **self._target(ticket)):
                        started = True
                        yield event
                    break
                except Exception as exc:  # noqa: BLE001
                    if started:
                        raise
                    ticket = await self._elsewhere(ticket, route, exc, attempt)
            outcome.status = "finished"
        except Exception as exc:  # noqa: BLE001
            raise self._client_error(exc) from None
        finally:
            self.release([outcome])

    async def _elsewhere(self, ticket: Ticket, route: GenerateRequest, exc: Exception, attempt: int) -> Ticket:
        """The same ticket on another replica, if its replica turned the program away before
        running any of it (draining after SIGTERM) and retries are left; else `exc` is raised.
        Only that refusal is retried: a program that started may have run server-side functions."""
        cause = unwrap_error(exc)
        refused = isinstance(cause, APIError) and cause.code == "replica_draining"
        if not refused or attempt >= self.settings.scheduler.max_retries:
            raise exc
        return await self.office.reroute(ticket.ticket_id, route, ticket.replica_id, started=False)

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
        is sent to every replica. A request still waiting in the admission queue is taken out of
        it and never runs. Returns how many requests were aborted."""
        queued = self.office.abort_queued(None if abort_all else rid)
        tickets = self.office.desk.matching(None if abort_all else rid)
        if not tickets:
            if abort_all or queued:
                return queued
            return sum(1 for ok in await self._broadcast("abort", rid) if ok)
        calls = [self.handles[t.ticket.version].abort.remote(t.meta.rid, **self._target(t.ticket)) for t in tickets]
        results = await asyncio.gather(*calls, return_exceptions=True)
        return queued + sum(1 for r in results if not isinstance(r, BaseException))

    async def flush_cache(self) -> int:
        """Flush every replica's prefix cache; returns how many replicas flushed."""
        results = await self._broadcast("flush_cache")
        return sum(1 for r in results if r)

    async def _broadcast(self, method: str, *args: Any) -> list[Any]:
        """Call `method` on every live replica of every version (the request router honours
        `target_replica`)."""
        calls = []
        for version, handle in self.handles.items():
            targets = live_replica_ids(self.deployments[version])
            if not targets:
                calls.append(getattr(handle, method).remote(*args))
            else:
                calls += [getattr(handle, method).remote(*args, target_replica=t) for t in sorted(targets)]
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
        """Readiness: a real 1-token generation through admission and a replica, of every model
        version (a canary that cannot serve is a deployment that is not ready)."""
        started = time.monotonic()

        async def run(version: str | None) -> int:
            probe = GenerateRequest(
                text="ready?",
                sampling=SamplingParams(max_new_tokens=1, temperature=0.0),
                tenant="__readiness__",
                priority=1_000_000,
                model_version=version,
            )
            ticket = await self.admit(probe)
            outcome = Outcome(ticket.ticket_id, "error")
            try:
                tokens = 0
                async for out in self.streams[ticket.version].generate.remote(probe, **self._target(ticket)):
                    tokens = out.completion_tokens
                outcome.status = "finished"
                return tokens
            finally:
                self.release([outcome])

        tokens = await asyncio.wait_for(asyncio.gather(*(run(v) for v in self.handles)), timeout_s)
        return {"latency_ms": (time.monotonic() - started) * 1000, "tokens": min(tokens)}

    def stats(self) -> dict[str, Any]:
        replicas = sorted(r for name in self.deployments.values() for r in live_replica_ids(name))
        stats = {**self.office.stats(), "replicas": replicas}
        if None not in self.deployments:
            stats["versions"] = {v: sorted(live_replica_ids(name)) for v, name in self.deployments.items()}
        return stats


    def process_info(self) -> dict[str, Any]:
        """This replica's process and its SIGTERM drain (tests/chaos signal the process)."""
        return {"pid": os.getpid(), "draining": self.drain.draining, "busy": self.drain.busy}


SchedulerDeployment = serve.deployment(name="Scheduler", max_ongoing_requests=4096)(Scheduler)
