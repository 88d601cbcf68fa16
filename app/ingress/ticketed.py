"""One sequence's token stream, straight from the replica its ticket names, with failover.

admit (the scheduler's queue and routing decision; batched with the Ingress's other admits,
app/ingress/admits.py) -> ModelReplica.generate on the ticket's replica (one streaming handle
call, routed by `target_replica`) -> release, batched.

Replica failures (Ray's actor errors, or any error whose cause says `retryable = True`, such as
an engine that died under a live replica) are handled here, where the stream is:
- before the first token: the scheduler places the same ticket on another replica, at most
  `scheduler.max_retries` times, with a growing backoff;
- after it (the stream has started): the stream migrates, continuing on another replica from
  the prompt + the tokens already sent (app/ingress/migration.py), at most
  `scheduler.max_stream_migrations` times. The client sees one stream: no error, no repeat.
Anything else (a bad request, an engine error) goes to the client as it is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from app.autoscaling import first_item_within
from app.canary import version_handles
from app.config import AppSettings
from app.engines.base import Tokenizer
from app.errors import APIError, EngineError, EngineUnavailableError, unwrap_error
from app.ingress.admits import AdmitBatcher
from app.ingress.migration import Progress, Splice, length_finish, plan_continuation
from app.ingress.releases import ReleaseBatcher
from app.protocol import GenerateOutput, GenerateRequest
from app.scheduler.ray_router import TARGET_REPLICA_KWARG
from app.scheduler.tickets import Outcome, Ticket

logger = logging.getLogger("sglserve.ingress")

RAY_REPLICA_FAILURES = (RayActorError, ActorDiedError, ActorUnavailableError)
BACKOFF_BASE_S = 0.05
BACKOFF_MAX_S = 1.0


def is_replica_failure(exc: BaseException) -> bool:
    """A failure of the replica (or its engine) rather than of the request: worth another replica."""
    if isinstance(exc, RAY_REPLICA_FAILURES):
        return True
    cause = unwrap_error(exc)
    return isinstance(cause, RAY_REPLICA_FAILURES) or getattr(cause, "retryable", False) is True


class TicketedStreams:
    def __init__(
        self,
        settings: AppSettings,
        scheduler: Any,
        replicas: Any,
        tokenizer: Tokenizer,
    ) -> None:
        self.settings = settings
        self.scheduler = scheduler
        # Made once (a fresh `.options()` handle per request re-initialises routing state).
        # One per model version (app/canary.py); a single-model app's one handle is version None.
        self.version_streams = {v: h.options(stream=True) for v, h in version_handles(replicas).items()}
        self.replica_streams = next(iter(self.version_streams.values()))
        self.releases = ReleaseBatcher(scheduler, settings.scheduler.ticket_lease_s)
        self.admits: AdmitBatcher | None = None
        if settings.scheduler.batch_admits:
            follow_streams = scheduler.options(stream=True)
            self.admits = AdmitBatcher(
                lambda batch: scheduler.admit_many.remote(batch),
                lambda keys: follow_streams.follow_admits.remote(keys),
                cancel=self.releases.cancel_admit,
                orphan=lambda ticket: self.releases.release(Outcome(ticket.ticket_id, "client_disconnect")),
            )
        self.tokenizer = tokenizer
        self.retries_total = 0
        self.migrations_total = 0

    async def stream(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        if self.admits is not None:
            # Batched (app/ingress/admits.py): a caller that goes away is taken out of the queue there.
            ticket = await self.admits.admit(request)
        else:
            admitting = self.scheduler.admit.remote(request)
            try:
                ticket = await admitting
            except asyncio.CancelledError:
                # The caller is gone (a client disconnect, a cancelled job) while the request waited
                # for admission: take it out of the scheduler's queue too, so it never runs.
                admitting.cancel()
                raise
        self.releases.track(ticket)
        progress = Progress()
        status = "error"
        try:
            async for out in self._with_failover(request, ticket, progress):
                yield out
            status = "aborted" if progress.finish is not None and progress.finish.type == "abort" else "finished"
        except (GeneratorExit, asyncio.CancelledError):
            status = "client_disconnect"
            raise
        finally:
            self.releases.release(Outcome(
                ticket.ticket_id, status, served_by=progress.served_by or ticket.replica_id,
                prompt_tokens=progress.prompt_tokens, completion_tokens=progress.completion_tokens,
                first_token_time=progress.first_token_time,
            ))

    async def _with_failover(self, request: GenerateRequest, ticket: Ticket, progress: Progress) -> AsyncIterator[GenerateOutput]:
        cfg = self.settings.scheduler
        retries = migrations = 0
        splice: Splice | None = None
        while True:
            current = request if splice is None else splice.request
            if splice is not None and current.sampling.max_new_tokens == 0:
                final = length_finish(request, progress)  # every token had been sent already
                progress.add(final)
                yield final
                return
            target = {TARGET_REPLICA_KWARG: ticket.replica_id} if ticket.replica_id else {}
            # No live replica when admitted (scaled to zero): Serve's router holds the call while one
            # starts; the first item must come within max_queue_wait_s, else 503 queue_timeout.
            cold_wait_s = None if ticket.replica_id else cfg.max_queue_wait_s
            try:
                stream = self.version_streams.get(ticket.version, self.replica_streams).generate.remote(current, **target)
                async for out in first_item_within(stream, cold_wait_s, request.rid):
                    if splice is not None:
                        out = splice.apply(out)
                        if out is None:
                            continue
                    progress.add(out)
                    yield out
                return
            except Exception as exc:  # noqa: BLE001 - classified below
                if not is_replica_failure(exc):
                    raise
                started = progress.started
                if started:
                    migrations += 1
                    limit, what = cfg.max_stream_migrations, "stream migrations"
                else:
                    retries += 1
                    limit, what = cfg.max_retries, "retries"
                cause = unwrap_error(exc)
                if (migrations if started else retries) > limit:
                    logger.warning("request %s failed on its replica after %d %s: %r", request.rid, limit, what, exc)
                    if isinstance(cause, APIError):  # the replica's own 503 (e.g. engine_unavailable)
                        raise cause from None
                    raise EngineUnavailableError(  # 503 + Retry-After: the fault is not the request's
                        f"the model replica failed while serving this request: {type(cause).__name__}",
                        code="replica_failure",
                    ) from None
                await asyncio.sleep(min(BACKOFF_BASE_S * 2 ** (retries + migrations), BACKOFF_MAX_S))
                failed = ticket.replica_id
                if started:
                    splice = self._continuation(request, progress)
                    self.migrations_total += 1
                else:
                    self.retries_total += 1
                current = request if splice is None else splice.request
                new_ticket: Ticket = await self.scheduler.reroute.remote(ticket.ticket_id, current, failed, started)
                logger.info("request %s: replica %s failed (%s); %s on %s", request.rid, failed,
                            type(cause).__name__, "migrating" if started else "retrying", new_ticket.replica_id)
                if new_ticket.ticket_id != ticket.ticket_id:  # the old lease had lapsed
                    self.releases.release(Outcome(ticket.ticket_id, "replica_failure"))
                    self.releases.track(new_ticket)
                ticket.ticket_id, ticket.replica_id, ticket.attempt, ticket.version = (
                    new_ticket.ticket_id, new_ticket.replica_id, new_ticket.attempt, new_ticket.version)


    def _continuation(self, request: GenerateRequest, progress: Progress) -> Splice:
        prompt = request.input_ids if request.input_ids is not None else self.tokenizer.encode(request.text or "")
        skip = request.sampling.skip_special_tokens
        return plan_continuation(request, progress, prompt, lambda ids: self.tokenizer.decode(ids, skip_special_tokens=skip))


def as_api_error(exc: BaseException) -> APIError:
    cause = unwrap_error(exc)
    if isinstance(cause, APIError):
        return cause
    if isinstance(exc, RAY_REPLICA_FAILURES) or isinstance(cause, RAY_REPLICA_FAILURES):
        # A serving process died (a Scheduler or replica actor): Serve restarts it, so the
        # request is worth sending again shortly; never a 500 for a fault that is not the request's.
        return EngineUnavailableError(
            f"a serving process is unavailable ({type(cause).__name__}); retry shortly", code="service_unavailable")
    return EngineError(f"generation failed: {type(cause).__name__}: {cause}")
