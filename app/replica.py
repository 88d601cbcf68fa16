"""The model replica deployment: one engine, pinned to its device(s), behind a small async API.

The Ingress calls `generate` (streaming) on the replica the scheduler chose for the request's
ticket (`target_replica`, honoured by the request router); Ray Serve runs as many replicas as
`serve_config.yaml` (or the autoscaler) asks for, each with its own `ray_actor_options` (num_gpus
pins a replica to its GPU through CUDA_VISIBLE_DEVICES). The replica publishes its load to the
request router (`record_routing_stats`) and to the autoscaler (`record_autoscaling_stats`), and
proves it can generate in `check_health`.

Faults (docs/fault-tolerance.md): the replica publishes `available` in its routing stats, False
while its engine restarts after a crash (the engine restarts itself, see app/engines/process.py) and
while the replica drains for a scale-down or redeploy; the request router skips such replicas.

SIGTERM sent straight to the replica's process (not through Serve) drains it too (app/sigterm.py):
it says unavailable, refuses new requests with a retryable 503 (the Ingress sends them to another
replica), lets the requests it holds finish within the deployment's graceful_shutdown_timeout_s,
stops its engine and exits; Serve then starts a replacement. Streams still open when that budget
runs out fail over as for any replica death (the Ingress migrates them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from app.autoscaling import RecentRequests, replica_signals
from app.config import AppSettings
from app.engines.base import Engine
from app.errors import EngineUnavailableError
from app.metrics import ReplicaMetrics
from app.placement import device_report, prepare_replica_devices
from app.protocol import EngineStats, FinishReason, GenerateOutput, GenerateRequest, ModelInfo
from app.sigterm import exit_now, on_sigterm
from app.streaming import coalesce

logger = logging.getLogger("sglserve.replica")

GRACEFUL_SHUTDOWN_TIMEOUT_S = 20.0  # how long a stopping replica may finish its requests
STREAMS_PER_INTERVAL = 4  # open streams per base stream interval (see _stream_interval_s)
EARLY_ABORT_S = 10.0  # how long an abort for a request not (yet) here is remembered


class ModelReplica:
    async def __init__(self, settings: dict[str, Any]):
        from app.engines.factory import make_engine  # engines import heavy libraries

        self.settings = AppSettings.from_args(settings)
        self._open_streams = 0
        self._draining = False  # set when Serve stops this replica: no new work, finish what runs
        self._sigterm_at: float | None = None  # when SIGTERM came (a drain of our own, see below)
        self._busy = 0  # generations and programs running here
        self._idle = asyncio.Event()
        self._idle.set()
        self._recent = RecentRequests()  # TTFTs and completions, for the autoscaling policy
        self._early_aborts: dict[str, float] = {}  # rid -> when an abort came before the request
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - constructed outside Serve (tests)
            self.replica_id = "local"
        started = time.monotonic()
        await prepare_replica_devices(self.settings)  # env flags + a placement group's GPUs
        self.engine: Engine = make_engine(self.settings)
        await self.engine.start()
        from app.lang import ProgramRunner

        self.programs = ProgramRunner(self.engine, self.settings.run)
        self.metrics = ReplicaMetrics(self.settings.model.name, self.settings.observability, self.engine.stats)
        self._health_timeout_s = self.settings.ingress.ready_timeout_s
        self._generated_at_last_probe: int | None = None  # engine's generation_tokens_total then
        loop = asyncio.get_running_loop()
        on_sigterm(lambda: loop.call_soon_threadsafe(self._on_sigterm))
        logger.info(
            "replica ready: model=%s engine=%s in %.1fs",
            self.settings.model.model_path,
            self.settings.engine.kind,
            time.monotonic() - started,
        )

    async def generate(self, request: GenerateRequest, target_replica: str | None = None) -> AsyncIterator[GenerateOutput]:
        """Stream one request's increments, coalesced for the hop to the Ingress. `target_replica`
        only steers the request router (the scheduler chose this replica for the ticket)."""
        if self._early_aborts.pop(request.rid, None) is not None:
            yield GenerateOutput(rid=request.rid, finished=True, served_by=self.replica_id,
                                 finish_reason=FinishReason(type="abort", message="aborted by /abort_request"))
            return
        self._refuse_if_stopping()
        stream = coalesce(
            self.engine.generate(request), max_tokens=self.settings.scheduler.decoding_chunk_size,
            interval_s=self._stream_interval_s,
        )
        self._open_streams += 1
        self._enter()
        called_at, first = time.monotonic(), True
        try:
            async for out in stream:
                if first and out.token_ids:
                    self._recent.first_token(time.monotonic() - called_at)
                    first = False
                if out.finished:
                    out.served_by = self.replica_id
                    self._recent.finished()
                yield out
        finally:
            self._open_streams -= 1
            self._leave()

    def _stream_interval_s(self) -> float:
        """How long a stream may hold tokens back, growing with the number of open streams.

        Each streamed message costs CPU on every hop (replica -> scheduler -> ingress -> proxy)
        whatever it carries, and a busy engine gives every stream a token per step. So with many
        streams open, each one sends less often but more per message, keeping the messages per
        second roughly flat; one stream alone sends every `stream_interval_ms`. The first token
        of every stream still leaves at once."""
        cfg = self.settings.scheduler
        scaled = cfg.stream_interval_ms * max(1.0, self._open_streams / STREAMS_PER_INTERVAL)
        return min(scaled, max(cfg.stream_interval_ms, cfg.max_stream_interval_ms)) / 1000.0

    async def run_program(self, route: GenerateRequest, body: dict[str, Any],
                          target_replica: str | None = None) -> dict[str, Any]:
        """Run a whole /run program on this replica's engine. `route` only carries the routing
        key (the program's leading text) for the request router; the body is the program."""
        self._refuse_if_stopping()
        self._enter()
        try:
            result = await self.programs.run(body)
        finally:
            self._leave()
        return result.model_dump(mode="json")

    async def run_program_stream(self, route: GenerateRequest, body: dict[str, Any],
                                 target_replica: str | None = None) -> AsyncIterator[dict[str, Any]]:
        self._refuse_if_stopping()
        self._enter()
        try:
            async for event in self.programs.run_stream(body):
                yield event.model_dump(mode="json", exclude_none=True)
        finally:
            self._leave()

    async def abort(self, rid: str, target_replica: str | None = None) -> bool:
        """Abort a request; one that has not reached this replica yet (its ticket was issued, its
        call is on the way) is aborted on arrival, within EARLY_ABORT_S."""
        if await self.engine.abort(rid):
            return True
        now = time.monotonic()
        self._early_aborts = {r: t for r, t in self._early_aborts.items() if now - t < EARLY_ABORT_S}
        self._early_aborts[rid] = now
        return False

    async def flush_cache(self, target_replica: str | None = None) -> bool:
        # `target_replica` only steers the request router (the scheduler flushes each replica).
        return await self.engine.flush_cache()

    def stats(self, target_replica: str | None = None) -> EngineStats:
        return self.engine.stats()

    def model_info(self) -> ModelInfo:
        return self.engine.model_info()

    def device_report(self, target_replica: str | None = None) -> dict[str, Any]:
        """The GPUs Ray gave this replica, CUDA_VISIBLE_DEVICES, tp_size and the multi-GPU flags
        (`target_replica` only steers the request router, as for `stats`)."""
        return device_report(self.settings)

    def server_args(self, target_replica: str | None = None) -> dict[str, Any]:
        # `target_replica` only steers the request router (tests/chaos ask each replica for its
        # engine's pid and restart count).
        return {**self.engine.server_args(), "available": self.available, "replica_pid": os.getpid(),
                "requests_in_progress": self._busy, "draining_since_sigterm": self._sigterm_at is not None}

    async def check_health(self) -> None:
        """Ray Serve's health probe: a real 1-token generation, bounded in time, unless the engine
        generated tokens since the last probe (progress proves it serves, as SGLang's own
        /health_generate takes recent output for health). A busy engine then gets no probe in its
        batch: no slot taken, and its float32 numerics are not moved by a stranger in the batch."""
        generated = self.engine.stats().generation_tokens_total
        last = self._generated_at_last_probe
        if self.available and last is not None and generated > last:
            self._generated_at_last_probe = generated
            return
        await asyncio.wait_for(
            self.engine.health_check(self._health_timeout_s), self._health_timeout_s + 1.0
        )
        self._generated_at_last_probe = self.engine.stats().generation_tokens_total

    @property
    def available(self) -> bool:
        """Whether new work should come here: the engine serves and the replica is not draining."""
        return not self._draining and getattr(self.engine, "available", True)

    def record_routing_stats(self) -> dict[str, Any]:
        stats = self.engine.stats()
        return {
            "outstanding_tokens": stats.outstanding_tokens,
            "running": stats.num_running,
            "waiting": stats.num_waiting,
            "available": self.available,  # app.scheduler.ray_router skips replicas that say False
        }

    def record_autoscaling_stats(self) -> dict[str, float]:
        stats = self.engine.stats()
        return {
            **replica_signals(stats.num_running, stats.num_waiting, self._recent),  # app/autoscaling.py
            "kv_usage": stats.num_used_tokens / stats.max_total_tokens if stats.max_total_tokens else 0.0,
        }

    # -- SIGTERM from outside Serve: drain, then exit -------------------------------------------

    def _enter(self) -> None:
        self._busy += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._busy -= 1
        if self._busy == 0:
            self._idle.set()

    def _refuse_if_stopping(self) -> None:
        """New work while draining after SIGTERM goes elsewhere: a retryable 503 (the Ingress
        retries it on another replica), sent before anything reached the engine."""
        if self._sigterm_at is not None:
            raise EngineUnavailableError("this model replica is shutting down (SIGTERM); retry",
                                         code="replica_draining")

    def _graceful_budget_s(self) -> float:
        try:  # the deployment's own setting (serve_config.yaml or .options may change it)
            return float(serve.get_replica_context()._deployment_config.graceful_shutdown_timeout_s)
        except Exception:  # noqa: BLE001 - outside Serve, or a Serve without the field
            return GRACEFUL_SHUTDOWN_TIMEOUT_S

    def _on_sigterm(self) -> None:
        """On the replica's event loop, after SIGTERM reached the process (app/sigterm.py)."""
        self._draining, self._sigterm_at = True, time.monotonic()
        self._sigterm_drain = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        budget = self._graceful_budget_s()
        logger.warning("SIGTERM: replica %s drains %d request(s) (up to %.0f s), then exits",
                       self.replica_id, self._busy, budget)
        try:
            await asyncio.wait_for(self._idle.wait(), budget)
        except asyncio.TimeoutError:
            logger.warning("SIGTERM: %d request(s) still running after %.0f s; exiting (they fail over)",
                           self._busy, budget)
        try:
            await self.engine.shutdown()
        finally:
            logger.warning("SIGTERM: replica %s drained in %.1f s; exiting", self.replica_id,
                           time.monotonic() - self._sigterm_at)
            exit_now()

    async def __del__(self):
        """Graceful shutdown (scale-down, redeploy, `serve shutdown`). Ray Serve has already taken
        this replica out of routing, refused new handle calls (the router retries them elsewhere)
        and waited for the ongoing ones, up to graceful_shutdown_timeout_s; then it calls this.
        Say unavailable (stats, health) and stop the engine."""
        self._draining = True
        await self.engine.shutdown()


ModelReplicaDeployment = serve.deployment(
    name="ModelReplica",
    max_ongoing_requests=256,
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_TIMEOUT_S,
)(ModelReplica)
