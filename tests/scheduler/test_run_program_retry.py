"""A /run program that its replica turns away before running any of it (the replica drains after
SIGTERM: 503 `replica_draining`) is sent to another replica by the Scheduler, non-streamed and
streamed; any other failure, and a stream that already started, reach the client as they are.

The Scheduler is built without Ray Serve here: its office and the replicas' handles are small
stand-ins that record what was asked of them (the live drain is tested in tests/chaos)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from app.config import AppSettings
from app.errors import EngineError, EngineUnavailableError
from app.protocol import GenerateRequest
from app.scheduler.deployment import Scheduler
from app.scheduler.tickets import Ticket
from app.sigterm import SigtermDrain

pytestmark = pytest.mark.asyncio

DRAINING = EngineUnavailableError("this model replica is shutting down (SIGTERM); retry", code="replica_draining")


class Office:
    def __init__(self):
        self.ticket = Ticket("t1", "r1", "replica-a", 0, None, 30.0)
        self.reroutes: list[str | None] = []
        self.released: list = []

    async def admit(self, request):
        return self.ticket

    async def reroute(self, ticket_id, request, failed_replica, started):
        assert ticket_id == self.ticket.ticket_id and not started
        self.reroutes.append(failed_replica)
        return replace(self.ticket, replica_id=f"replica-{'bcd'[len(self.reroutes) - 1]}", attempt=len(self.reroutes))

    def release(self, outcomes, renew=None, cancel=None):
        self.released.extend(outcomes)


class Replicas:
    """`run_program` / `run_program_stream` handles: each call takes the next scripted result."""

    def __init__(self, results):
        self.results, self.targets = list(results), []

    def remote(self, route, body, target_replica=None):
        self.targets.append(target_replica)
        result = self.results.pop(0)
        if isinstance(result, list):  # a stream: its events, then maybe an error
            async def events():
                for item in result:
                    if isinstance(item, Exception):
                        raise item
                    yield item
            return events()

        async def call():
            if isinstance(result, Exception):
                raise result
            return result
        return call()


def scheduler(program=(), stream=()) -> Scheduler:
    s = Scheduler.__new__(Scheduler)
    s.settings = AppSettings.from_args({"scheduler": {"max_retries": 2}})
    s.office = Office()
    s.drain = SigtermDrain("test")
    s.handles = {None: SimpleNamespace(run_program=Replicas(program))}
    s.streams = {None: SimpleNamespace(run_program_stream=Replicas(stream))}
    return s


ROUTE = GenerateRequest(rid="r1", input_ids=[1, 2, 3])


async def test_a_program_turned_away_by_a_draining_replica_runs_on_another():
    s = scheduler(program=[DRAINING, {"text": "ran"}])
    assert await s.run_program(ROUTE, {"program": "x"}) == {"text": "ran"}
    assert s.handles[None].run_program.targets == ["replica-a", "replica-b"]
    assert s.office.reroutes == ["replica-a"]
    assert [o.status for o in s.office.released] == ["finished"]


async def test_retries_are_bounded_and_other_failures_are_not_retried():
    s = scheduler(program=[DRAINING, DRAINING, DRAINING])
    with pytest.raises(EngineUnavailableError):
        await s.run_program(ROUTE, {"program": "x"})
    assert len(s.handles[None].run_program.targets) == 3  # the first try + max_retries
    s = scheduler(program=[EngineError("the program failed")])
    with pytest.raises(EngineError):
        await s.run_program(ROUTE, {"program": "x"})
    assert s.office.reroutes == []


async def test_a_stream_is_sent_elsewhere_only_before_its_first_event():
    s = scheduler(stream=[[DRAINING], [{"type": "text", "text": "a"}, {"type": "done"}]])
    events = [e async for e in s.run_program_stream(ROUTE, {"program": "x"})]
    assert events == [{"type": "text", "text": "a"}, {"type": "done"}]
    assert s.streams[None].run_program_stream.targets == ["replica-a", "replica-b"]

    s = scheduler(stream=[[{"type": "text", "text": "a"}, DRAINING]])
    seen = []
    with pytest.raises(EngineUnavailableError):
        async for event in s.run_program_stream(ROUTE, {"program": "x"}):
            seen.append(event)
    assert seen == [{"type": "text", "text": "a"}] and s.office.reroutes == []
