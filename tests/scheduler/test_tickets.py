"""The ticket protocol's scheduler side (app/scheduler/office.py, tickets.py, dispatch.py), without
Ray: admission through tickets, placement by the policy from the routers' snapshot, release,
reroute after a replica failure, and leases that expire."""

from __future__ import annotations

import asyncio

import pytest

from app.config import AppSettings
from app.errors import OverloadedError
from app.protocol import GenerateRequest, SamplingParams
from app.scheduler.office import TicketOffice
from app.scheduler.ray_router import RoutingSnapshot
from app.scheduler.tickets import Outcome, TicketDesk

SYSTEM = list(range(100, 400))


def office(replicas=("a", "b", "c"), **scheduler) -> tuple[TicketOffice, dict]:
    settings = AppSettings.from_args({
        "scheduler": {"routing_policy": "cache_aware", "max_concurrent": 2, "max_queue": 1, "max_queue_wait_s": 5,
                      "adaptive_concurrency": False, **scheduler},
        "observability": {"metrics_enabled": False},
    })
    view = {"snap": RoutingSnapshot({r: {"outstanding_tokens": 0} for r in replicas}, 1)}
    return TicketOffice(settings, snapshot=lambda name: view["snap"]), view


def request(suffix: int, rid: str | None = None) -> GenerateRequest:
    extra = {"rid": rid} if rid else {}
    return GenerateRequest(input_ids=SYSTEM + [suffix], sampling=SamplingParams(max_new_tokens=4), **extra)


async def test_a_ticket_holds_a_slot_until_released_and_a_full_queue_refuses_with_retry_after():
    desk, _ = office()
    first = await desk.admit(request(1))
    second = await desk.admit(request(2))
    assert desk.admission.in_flight == 2
    waiting = asyncio.create_task(desk.admit(request(3)))  # no slot: it queues (max_queue 1)
    await asyncio.sleep(0)
    with pytest.raises(OverloadedError) as refused:
        await desk.admit(request(4))
    assert refused.value.headers["Retry-After"]
    desk.release([Outcome(first.ticket_id, "finished")])
    third = await asyncio.wait_for(waiting, 5)
    assert third.replica_id is not None and desk.admission.in_flight == 2
    desk.release([Outcome(second.ticket_id, "finished"), Outcome(third.ticket_id, "client_disconnect")])
    assert desk.admission.in_flight == 0 and desk.stats()["tickets"]["live"] == 0


async def test_the_policy_places_a_shared_prefix_where_it_was_placed_before():
    desk, _ = office(max_concurrent=16)
    first = await desk.admit(request(1))
    again = await desk.admit(request(2))  # same 300-token prefix: the cache-aware policy follows it
    assert again.replica_id == first.replica_id
    assert desk.dispatcher.decisions_total == 2


async def test_reroute_keeps_the_slot_and_avoids_the_failed_replica():
    desk, _ = office(max_concurrent=16)
    ticket = await desk.admit(request(1))
    failed = ticket.replica_id
    moved = await desk.reroute(ticket.ticket_id, request(1), failed, started=True)
    assert moved.ticket_id == ticket.ticket_id and moved.replica_id != failed and moved.attempt == 1
    assert desk.admission.in_flight == 1
    assert desk.retries_total == 1 and desk.migrations_total == 1
    # The failed replica is set aside for new requests too, while others are live.
    assert (await desk.admit(request(2))).replica_id != failed


async def test_reroute_of_an_expired_ticket_admits_afresh():
    desk, _ = office(max_concurrent=16)
    moved = await desk.reroute("no-such-ticket", request(1), "a", started=False)
    assert moved.ticket_id != "no-such-ticket" and desk.admission.in_flight == 1


async def test_no_live_replica_known_gives_a_ticket_without_a_replica():
    desk, view = office(replicas=())
    ticket = await desk.admit(request(1))
    assert ticket.replica_id is None


def test_a_lease_not_renewed_expires_and_renewal_keeps_it():
    now = [0.0]
    desk = TicketDesk(lease_s=10.0, clock=lambda: now[0])
    from app.scheduler.admission import RequestMeta

    kept = desk.issue(RequestMeta(rid="kept"), "a", None)
    lost = desk.issue(RequestMeta(rid="lost"), "a", None)
    now[0] = 8.0
    desk.renew([kept.ticket_id])
    now[0] = 12.0
    assert [t.ticket.ticket_id for t in desk.expire()] == [lost.ticket_id]
    assert desk.get(kept.ticket_id) is not None and desk.stats()["expired_total"] == 1
    assert [t.meta.rid for t in desk.matching("kept")] == ["kept"]


async def test_expired_leases_give_their_slots_back():
    desk, _ = office(ticket_lease_s=0.2)
    await desk.admit(request(1))
    await desk.admit(request(2))
    assert desk.admission.in_flight == 2

    async def drained() -> None:
        while desk.admission.in_flight:
            await asyncio.sleep(0.05)

    await asyncio.wait_for(drained(), 30)
    assert desk.stats()["tickets"]["expired_total"] == 2
