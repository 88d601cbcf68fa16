"""The Ingress's side of the ticket protocol, without Ray: which errors count as a replica failure
(app/ingress/ticketed.py), and how releases are batched (app/ingress/releases.py)."""

from __future__ import annotations

import asyncio

from ray.exceptions import ActorDiedError, RayTaskError

from app.errors import EngineError, InvalidRequestError
from app.ingress.releases import ReleaseBatcher
from app.ingress.ticketed import is_replica_failure
from app.scheduler.tickets import Outcome, Ticket


class EngineGone(Exception):
    retryable = True  # what an engine-unavailable error says about itself


def wrapped(cause: BaseException) -> RayTaskError:
    """An error as it comes out of a Ray call: Ray's wrapper, the original as `.cause`."""
    return RayTaskError("generate", "traceback", cause)


def test_ray_actor_errors_and_retryable_causes_are_replica_failures():
    assert is_replica_failure(ActorDiedError())
    assert is_replica_failure(EngineGone("engine process died"))
    assert is_replica_failure(wrapped(EngineGone("engine process died")))


def test_request_errors_are_not_replica_failures():
    assert not is_replica_failure(InvalidRequestError("bad prompt"))
    assert not is_replica_failure(wrapped(InvalidRequestError("bad prompt")))
    assert not is_replica_failure(EngineError("the engine failed"))
    assert not is_replica_failure(wrapped(ValueError("boom")))


class RecordingScheduler:
    """A stand-in for the Scheduler handle (only `release.remote` is called): records each release
    call; the first one is held open until `gate` is set, so batching is seen deterministically."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[str]]] = []
        self.gate = asyncio.Event()
        self.release = self  # so that `scheduler.release.remote(...)` reads as on a handle

    async def remote(self, outcomes: list[Outcome], renew: list[str]) -> None:
        self.calls.append(([o.ticket_id for o in outcomes], renew))
        if len(self.calls) == 1:
            await self.gate.wait()


async def until(check, timeout_s: float = 10.0) -> None:
    async def poll() -> None:
        while not check():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout_s)


async def test_releases_leave_at_once_and_batch_while_a_call_is_in_flight():
    scheduler = RecordingScheduler()
    batcher = ReleaseBatcher(scheduler, lease_s=300.0)
    for i in range(4):
        batcher.track(Ticket(str(i), f"r{i}", "a", 0, None, 300.0))
    batcher.release(Outcome("0", "finished"))
    await until(lambda: len(scheduler.calls) == 1)  # alone: sent at once
    batcher.release(Outcome("1", "finished"))
    batcher.release(Outcome("2", "error"))  # both wait for the call in flight
    await asyncio.sleep(0.05)
    assert len(scheduler.calls) == 1
    scheduler.gate.set()
    await until(lambda: len(scheduler.calls) == 2)
    assert [ids for ids, _ in scheduler.calls] == [["0"], ["1", "2"]]
    assert batcher.stats()["live"] == 1  # ticket 3 still streams


async def test_live_tickets_are_renewed_within_the_lease():
    scheduler = RecordingScheduler()
    scheduler.gate.set()
    batcher = ReleaseBatcher(scheduler, lease_s=0.3)
    batcher.track(Ticket("7", "r7", "a", 0, None, 0.3))
    await until(lambda: any("7" in renew for _, renew in scheduler.calls))
    batcher.release(Outcome("7", "finished"))
    await until(lambda: any("7" in ids for ids, _ in scheduler.calls))
