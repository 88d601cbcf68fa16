"""Batched admits without Ray: the Ingress's AdmitBatcher (app/ingress/admits.py) in front of the
scheduler's real TicketOffice.admit_many and follow_admits (app/scheduler/office.py). What is checked: a lone admit
leaves at once; admits that arrive while a batch is being sent go together in the next one; each
request of a batch gets its own answer (a 503 for one fails none of the others); a request
queued in the scheduler does not hold back the next batch; priorities and the order of service
are those of one call per request; a client that goes away leaves the queue."""

from __future__ import annotations

import asyncio

import pytest

from app.config import AppSettings
from app.errors import OverloadedError
from app.ingress.admits import AdmitBatcher
from app.protocol import GenerateRequest, SamplingParams
from app.scheduler.office import TicketOffice
from app.scheduler.ray_router import RoutingSnapshot
from app.scheduler.tickets import Outcome, Ticket

SYSTEM = list(range(100, 200))


def make_office(**scheduler) -> TicketOffice:
    settings = AppSettings.from_args({
        "scheduler": {"routing_policy": "cache_aware", "max_concurrent": 2, "max_queue": 2, "max_queue_wait_s": 30,
                      "adaptive_concurrency": False, **scheduler},
        "observability": {"metrics_enabled": False},
    })
    snap = RoutingSnapshot({r: {"outstanding_tokens": 0} for r in ("a", "b")}, 1)
    return TicketOffice(settings, snapshot=lambda name: snap)


def request(i: int, priority: int = 0, tenant: str = "default") -> GenerateRequest:
    return GenerateRequest(rid=f"req-{i}", input_ids=SYSTEM + [i], sampling=SamplingParams(max_new_tokens=4),
                           priority=priority, tenant=tenant)


class Link:
    """The office's admit_many / follow_admits as the Ingress sees them through a handle, recording
    each admit_many call's requests;
    while `hold` is clear, a call is held before it reaches the scheduler, so coalescing is seen
    deterministically. Cancels are applied as the release batch would apply them."""

    def __init__(self, office: TicketOffice) -> None:
        self.office = office
        self.batches: list[list[str]] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self.orphans: list[Ticket] = []
        self.batcher = AdmitBatcher(self.send, office.follow_admits, cancel=lambda key: office.cancel_admits([key]),
                                    orphan=self.orphan)

    async def send(self, batch):
        self.batches.append([r.rid for _, r in batch])
        await self.hold.wait()
        return await self.office.admit_many(batch)

    def orphan(self, ticket: Ticket) -> None:
        self.orphans.append(ticket)
        self.office.release([Outcome(ticket.ticket_id, "client_disconnect")])


async def until(check, timeout_s: float = 10.0) -> None:
    async def poll() -> None:
        while not check():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout_s)


async def test_a_lone_admit_leaves_at_once_and_later_ones_coalesce_while_a_batch_is_being_sent():
    office = make_office(max_concurrent=16)
    link = Link(office)
    link.hold.clear()
    first = asyncio.create_task(link.batcher.admit(request(0)))
    await until(lambda: len(link.batches) == 1)
    rest = [asyncio.create_task(link.batcher.admit(request(i))) for i in (1, 2, 3)]
    await asyncio.sleep(0.05)
    assert link.batches == [["req-0"]]  # the others wait for the call in flight
    link.hold.set()
    tickets = await asyncio.wait_for(asyncio.gather(first, *rest), 10)
    assert link.batches == [["req-0"], ["req-1", "req-2", "req-3"]]
    assert [t.rid for t in tickets] == ["req-0", "req-1", "req-2", "req-3"]
    assert len({t.ticket_id for t in tickets}) == 4 and office.admission.in_flight == 4
    assert office.calls["admit_many"] == 2 and link.batcher.stats()["max_batch"] == 3


async def test_each_request_of_a_batch_gets_its_own_answer_and_a_refusal_fails_no_other():
    office = make_office(max_concurrent=2, max_queue=1)
    link = Link(office)
    link.hold.clear()
    calls = [asyncio.create_task(link.batcher.admit(request(i))) for i in range(4)]
    await until(lambda: len(link.batches) == 1)
    link.hold.set()
    await until(lambda: len(link.batches) == 2)
    # Two granted, one queued, one refused (the queue holds one): each answered on its own.
    granted = [await asyncio.wait_for(c, 10) for c in calls[:2]]
    await until(lambda: calls[3].done())
    with pytest.raises(OverloadedError) as refused:
        calls[3].result()
    assert refused.value.status_code == 503 and int(refused.value.headers["Retry-After"]) >= 1
    assert not calls[2].done() and office.admission.depth == 1
    office.release([Outcome(granted[0].ticket_id, "finished")])
    third = await asyncio.wait_for(calls[2], 10)
    assert third.rid == "req-2" and office.admission.in_flight == 2


async def test_a_queued_admit_does_not_hold_back_the_next_batch_and_priority_is_kept():
    office = make_office(max_concurrent=1, max_queue=8)
    link = Link(office)
    holder = await link.batcher.admit(request(0))
    low = asyncio.create_task(link.batcher.admit(request(1, priority=0)))
    await until(lambda: office.admission.depth == 1)  # queued in the scheduler, its batch answered "arrived"
    high = asyncio.create_task(link.batcher.admit(request(2, priority=5)))
    await until(lambda: office.admission.depth == 2)  # a second batch reached the queue meanwhile
    assert len(link.batches) == 3
    office.release([Outcome(holder.ticket_id, "finished")])
    first = await asyncio.wait_for(high, 10)  # the later request of higher priority goes first
    assert not low.done()
    office.release([Outcome(first.ticket_id, "finished")])
    assert (await asyncio.wait_for(low, 10)).rid == "req-1"


async def test_order_of_service_is_that_of_one_call_per_request():
    """The same arrivals (tenants, priorities) through single admits and through one batch are
    granted slots in the same order."""

    async def grant_order(batched: bool) -> list[str]:
        office = make_office(max_concurrent=1, max_queue=64)
        link = Link(office)
        holder = await office.admit(request(0))
        arrivals = [request(i, priority=i % 3, tenant=f"t{i % 4}") for i in range(1, 13)]
        if batched:
            link.hold.clear()
            blocker = asyncio.create_task(link.batcher.admit(request(99, priority=-1)))
            await until(lambda: len(link.batches) == 1)
            waits = [asyncio.create_task(link.batcher.admit(r)) for r in arrivals]
            link.hold.set()
        else:
            blocker = asyncio.create_task(office.admit(request(99, priority=-1)))
            await until(lambda: office.admission.depth == 1)
            waits = [asyncio.create_task(office.admit(r)) for r in arrivals]
        await until(lambda: office.admission.depth == 13)
        order = []
        current = holder
        for _ in range(13):
            office.release([Outcome(current.ticket_id, "finished")])
            waiting = [t for t in (blocker, *waits) if not t.done()]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED, timeout=10)
            ready = [t for t in waiting if t.done()]
            assert len(ready) == 1
            current = ready[0].result()
            order.append(current.rid)
        return order

    single = await grant_order(batched=False)
    assert await grant_order(batched=True) == single
    assert single[-1] == "req-99"  # lowest priority last


async def test_a_client_that_goes_away_leaves_the_scheduler_queue():
    office = make_office(max_concurrent=1, max_queue=4)
    link = Link(office)
    holder = await link.batcher.admit(request(0))
    gone = asyncio.create_task(link.batcher.admit(request(1)))
    await until(lambda: office.admission.depth == 1)
    gone.cancel()
    await until(lambda: office.admission.depth == 0)
    assert office.stats()["admitting"] == 0
    office.release([Outcome(holder.ticket_id, "finished")])
    assert office.admission.in_flight == 0
    assert (await link.batcher.admit(request(2))).rid == "req-2"


async def test_a_cancel_that_overtakes_its_batch_still_takes_the_admit_out():
    office = make_office(max_concurrent=1, max_queue=4)
    office.cancel_admits(["k1"])
    answers = dict(await office.admit_many([("k1", request(1)), ("k2", request(2))]))
    assert answers["k1"] is None and isinstance(answers["k2"], Ticket)
    assert office.admission.in_flight == 1 and office.admission.depth == 0


async def test_admit_many_returns_at_once_and_queued_answers_follow():
    from app.scheduler.office import QUEUED

    office = make_office(max_concurrent=1, max_queue=4)
    answers = dict(await office.admit_many([("k1", request(1)), ("k2", request(2)), ("k3", request(3))]))
    assert isinstance(answers["k1"], Ticket) and answers["k2"] == answers["k3"] == QUEUED
    follow = office.follow_admits(["k2", "k3", "unknown"])
    assert await follow.__anext__() == [("unknown", None)]
    office.release([Outcome(answers["k1"].ticket_id, "finished")])
    [(key, ticket)] = await asyncio.wait_for(follow.__anext__(), 10)
    assert key == "k2" and ticket.rid == "req-2"
    await follow.aclose()  # the Ingress went away: its still-queued admit leaves the queue
    await until(lambda: office.admission.depth == 0)
    assert office.stats()["admitting"] == 0


async def test_a_ticket_granted_to_a_client_gone_is_given_back():
    office = make_office(max_concurrent=4)
    link = Link(office)
    link.hold.clear()
    gone = asyncio.create_task(link.batcher.admit(request(1)))
    await until(lambda: len(link.batches) == 1)
    gone.cancel()  # sent, not answered: the cancel may reach the scheduler after the grant
    link.hold.set()
    await until(lambda: office.admission.in_flight == 0 and office.stats()["admitting"] == 0)
    assert office.stats()["tickets"]["live"] == 0


async def test_a_failed_call_fails_each_of_its_admits_and_the_next_batch_still_leaves():
    office = make_office(max_concurrent=4)
    failing = {"on": True}

    async def send(batch):
        if failing["on"]:
            raise ConnectionError("scheduler gone")
        return await office.admit_many(batch)

    batcher = AdmitBatcher(send, office.follow_admits, cancel=lambda key: None, orphan=lambda ticket: None)
    results = await asyncio.gather(batcher.admit(request(1)), batcher.admit(request(2)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    failing["on"] = False
    assert (await batcher.admit(request(3))).rid == "req-3"


async def test_a_ticket_delivered_in_the_instant_its_client_goes_away_is_given_back():
    """The answer is set on the client's future, and the client is cancelled before it resumes."""
    office = make_office(max_concurrent=4)
    link = Link(office)
    clients: list[asyncio.Task] = []

    async def send(batch):
        answers = await office.admit_many(batch)
        asyncio.get_running_loop().call_soon(clients[0].cancel)  # runs after the delivery below
        return answers

    link.batcher._send = send
    clients.append(asyncio.create_task(link.batcher.admit(request(1))))
    with pytest.raises(asyncio.CancelledError):
        await clients[0]
    await until(lambda: office.admission.in_flight == 0)
    assert [t.rid for t in link.orphans] == ["req-1"] and office.stats()["tickets"]["live"] == 0
