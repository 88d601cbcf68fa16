"""The scheduler deployment: admission, routing and failover between the ingress and the replicas.

It proxies each token stream (ingress -> scheduler -> replica and back). The choice of replica is
made by the routing policy that runs inside this process as the replica handle's Ray Serve request
router (`app.scheduler.ray_router`), so replicas that join or die are seen through Serve's own
membership updates. Admission (bounded queue, fairness, priorities, 503s) happens here, before any
replica is touched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle

from app.autoscaling import first_item_within
from app.config import AppSettings
from app.errors import APIError, EngineError, unwrap_error
from app.metrics import SchedulerMetrics
from app.protocol import FinishReason, GenerateOutput, GenerateRequest, SamplingParams
from app.scheduler.admission import AdmissionQueue, RequestMeta
from app.scheduler.control import AdaptiveConcurrency
from app.scheduler.ray_router import live_replica_ids

logger = logging.getLogger("sglserve.scheduler")

# Errors that mean "this replica is gone or unreachable", as opposed to "this request is bad".
REPLICA_FAILURES = (RayActorError, ActorDiedError, ActorUnavailableError)


class Scheduler:
    def __init__(self, replicas: DeploymentHandle, settings: dict[str, Any]):
        self.settings = AppSettings.from_args(settings)
        cfg = self.settings.scheduler
        self.replicas = replicas
        self.replica_streams = replicas.options(stream=True)  # made once (see Gateway.streaming)
        self.admission = AdmissionQueue(
            max_queue=cfg.max_queue,
            max_concurrent=cfg.max_concurrent,
            max_queue_wait_s=cfg.max_queue_wait_s,
            tenant_weights={**self.settings.security.tenant_weights(), **cfg.tenant_weights} or None,
        )
        self.default_priority = self.settings.security.default_priorities()
        self.concurrency = InFlightLimits(self.admission, self.settings) if cfg.adaptive_concurrency else None
        self.retries_total = 0
        self.metrics = SchedulerMetrics(self.settings.model.name, self.settings.observability, self.admission)
        # rid -> the replica stream serving it, so /abort_request can cancel it from here.
        self._active: dict[str, Any] = {}
        self._aborted: set[str] = set()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        meta = RequestMeta.from_request(request, self.default_priority)
        async with self.metrics.admitted(meta):  # = self.admission.admit(meta), timed and counted
            admitted_at = time.time()
            async for out in self._stream_with_failover(request):
                if out.finished and self.concurrency is not None:
                    self.concurrency.observe(out, admitted_at)
                yield out

    async def _stream_with_failover(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """Retry on another replica while the client has seen nothing; after that, fail loudly.

        A client that streams sees increments as they come, so only a failure before the first one
        is retried. A non-streaming client sees nothing until the end, so its increments are
        gathered here and the whole request is retried from scratch on a replica failure.
        """
        max_retries = self.settings.scheduler.max_retries
        attempt = 0
        while True:
            streamed = False
            gathered: GenerateOutput | None = None
            stream = self.replica_streams.generate.remote(request)
            self._active[request.rid] = stream
            # No replica known live (scaled to zero): wait for one at most max_queue_wait_s.
            cold = None if live_replica_ids("ModelReplica") else self.settings.scheduler.max_queue_wait_s
            try:
                async for out in first_item_within(stream, cold, request.rid):
                    if request.stream:
                        streamed = True
                        yield out
                    else:
                        gathered = out if gathered is None else gathered.merge(out)
                if gathered is not None:
                    yield gathered
                return
            except Exception as exc:  # noqa: BLE001 - classified below
                if request.rid in self._aborted:
                    yield GenerateOutput(
                        rid=request.rid,
                        finished=True,
                        finish_reason=FinishReason(type="abort", message="aborted by /abort_request"),
                    )
                    return
                cause = unwrap_error(exc)
                if isinstance(cause, APIError):
                    raise cause from None
                if streamed or attempt >= max_retries or not isinstance(exc, REPLICA_FAILURES):
                    logger.warning("request %s failed on its replica: %r", request.rid, exc)
                    raise EngineError(
                        f"the model replica failed while serving this request: {type(cause).__name__}",
                        code="replica_failure",
                    ) from None
                attempt += 1
                self.retries_total += 1
                self.metrics.record_retry()
                backoff_s = min(0.05 * 2**attempt, 1.0)
                logger.info("replica failure for %s; retry %d in %.2fs", request.rid, attempt, backoff_s)
                await asyncio.sleep(backoff_s)
            finally:
                self._active.pop(request.rid, None)
                self._aborted.discard(request.rid)

    async def run_program(self, route: GenerateRequest, body: dict[str, Any]) -> dict[str, Any]:
        """A /run program: admitted like one request, then run whole on one replica."""
        async with self.metrics.admitted(self._program_meta(route, body)):
            try:
                return await self.replicas.run_program.remote(route, body)
            except Exception as exc:  # noqa: BLE001 - APIErrors pass through unwrapped
                raise self._client_error(exc) from None

    async def run_program_stream(self, route: GenerateRequest, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async with self.metrics.admitted(self._program_meta(route, body)):
            try:
                async for event in self.replica_streams.run_program_stream.remote(route, body):
                    yield event
            except Exception as exc:  # noqa: BLE001
                raise self._client_error(exc) from None

    @staticmethod
    def _program_meta(route: GenerateRequest, body: dict[str, Any]) -> RequestMeta:
        return RequestMeta(
            rid=route.rid,
            tenant=route.tenant,
            priority=route.priority,
            deadline=route.deadline,
            cost_tokens=len(route.input_ids or ()) + route.sampling.max_new_tokens,
        )

    @staticmethod
    def _client_error(exc: Exception) -> Exception:
        cause = unwrap_error(exc)
        if isinstance(cause, APIError):
            return cause
        return EngineError(f"the program failed on its replica: {type(cause).__name__}: {cause}")

    def abort(self, rid: str, abort_all: bool = False) -> int:
        """Cancel streams by rid (or all); the engine sees the cancellation and frees them."""
        rids = list(self._active) if abort_all else [r for r in self._active if r == rid or r.startswith(f"{rid}-")]
        for r in rids:
            self._aborted.add(r)
            self._active[r].cancel()
        return len(rids)

    async def flush_cache(self) -> int:
        """Flush every replica's prefix cache; returns how many replicas flushed."""
        results = await self._broadcast("flush_cache")
        return sum(1 for r in results if r)

    async def _broadcast(self, method: str) -> list[Any]:
        """Call `method` on every live replica (the request router honours `target_replica`)."""
        targets = live_replica_ids("ModelReplica")
        if not targets:
            return [await getattr(self.replicas, method).remote()]
        calls = [getattr(self.replicas, method).remote(target_replica=t) for t in sorted(targets)]
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

        async def run() -> GenerateOutput:
            merged: GenerateOutput | None = None
            async for out in self.generate(probe):
                merged = out if merged is None else merged.merge(out)
            assert merged is not None
            return merged

        out = await asyncio.wait_for(run(), timeout_s)
        return {"latency_ms": (time.monotonic() - started) * 1000, "tokens": out.completion_tokens}

    def stats(self) -> dict[str, Any]:
        return {
            "admission": self.admission.stats(),
            "retries_total": self.retries_total,
            "replicas": sorted(live_replica_ids("ModelReplica")),
            "in_flight_limits": self.concurrency.stats() if self.concurrency is not None else None,
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

    def observe(self, out: GenerateOutput, admitted_at: float) -> None:
        replica = out.served_by
        if replica is None or out.first_token_time is None or out.completion_tokens == 0:
            return
        now = time.time()
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
