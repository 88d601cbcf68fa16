"""Admission queue: bounds, 503 + Retry-After, timeouts, deadlines, priorities, fairness."""

from __future__ import annotations

import asyncio
import time

import pytest

from app.errors import OverloadedError, RequestAbortedError
from app.scheduler.admission import AdmissionQueue, RequestMeta

pytestmark = pytest.mark.asyncio


def meta(rid: str, tenant: str = "t", priority: int = 0, cost: int = 100, deadline=None) -> RequestMeta:
    return RequestMeta(rid=rid, tenant=tenant, priority=priority, deadline=deadline, cost_tokens=cost)


async def hold(queue: AdmissionQueue, m: RequestMeta, release: asyncio.Event, order: list[str]) -> None:
    async with queue.admit(m):
        order.append(m.rid)
        await release.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_free_slot_is_granted_at_once_and_released_after() -> None:
    queue = AdmissionQueue(max_queue=4, max_concurrent=2, max_queue_wait_s=1.0)
    async with queue.admit(meta("a")):
        assert queue.in_flight == 1
    assert queue.in_flight == 0
    assert queue.stats()["admitted_total"] == 1


async def test_full_queue_answers_503_with_retry_after_at_once() -> None:
    queue = AdmissionQueue(max_queue=2, max_concurrent=1, max_queue_wait_s=5.0)
    release, order = asyncio.Event(), []
    tasks = [asyncio.create_task(hold(queue, meta(f"r{i}"), release, order)) for i in range(3)]
    await settle()
    assert queue.in_flight == 1 and queue.depth == 2
    started = time.perf_counter()
    with pytest.raises(OverloadedError) as info:
        async with queue.admit(meta("late")):
            pass
    assert time.perf_counter() - started < 0.01
    assert info.value.status_code == 503
    assert info.value.code == "overloaded"
    assert int(info.value.headers["Retry-After"]) >= 1
    release.set()
    await asyncio.gather(*tasks)
    assert order == ["r0", "r1", "r2"]
    assert queue.stats()["rejected_full_total"] == 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_retry_after_follows_the_drain_rate() -> None:
    clock = FakeClock()
    queue = AdmissionQueue(max_queue=100, max_concurrent=2, max_queue_wait_s=30.0, clock=clock)
    for i in range(20):  # each request holds its slot 0.1 s: 2 slots drain 20 requests/s
        async with queue.admit(meta(f"warm{i}")):
            clock.now += 0.1
    assert queue.drain_rate() == pytest.approx(20.0)
    release, order = asyncio.Event(), []
    tasks = [asyncio.create_task(hold(queue, meta(f"r{i}"), release, order)) for i in range(62)]
    await settle()
    assert queue.depth == 60
    # 61 requests ahead at 20/s: about 3 s, not the 30 s fallback and not the 1 s floor.
    assert queue.retry_after_s() == pytest.approx(61 / 20)
    release.set()
    await asyncio.gather(*tasks)


async def test_a_request_that_would_time_out_is_refused_at_once() -> None:
    clock = FakeClock()
    queue = AdmissionQueue(max_queue=1000, max_concurrent=1, max_queue_wait_s=1.0, clock=clock)
    for i in range(20):  # 1 slot, 0.1 s per request: 10 requests/s
        async with queue.admit(meta(f"warm{i}")):
            clock.now += 0.1
    release, order = asyncio.Event(), []
    tasks = [asyncio.create_task(hold(queue, meta(f"r{i}"), release, order)) for i in range(11)]
    await settle()
    assert queue.depth == 10  # the 10th saw 9 ahead: (9 + 1) / 10 per s = 1 s, within the limit
    started = time.perf_counter()
    with pytest.raises(OverloadedError) as info:
        async with queue.admit(meta("one-too-many")):  # (10 + 1) / 10 per s = 1.1 s > 1 s
            pass
    assert time.perf_counter() - started < 0.01
    assert info.value.code == "overloaded" and "wait limit" in info.value.message
    assert queue.stats()["rejected_predicted_total"] == 1
    # A higher priority has nobody ahead of it: it is queued, not refused.
    urgent = asyncio.create_task(hold(queue, meta("urgent", priority=9), release, order))
    await settle()
    assert queue.depth == 11 and not urgent.done()
    tasks.append(urgent)
    release.set()
    await asyncio.gather(*tasks)


async def test_queue_wait_over_the_limit_is_a_queue_timeout() -> None:
    queue = AdmissionQueue(max_queue=4, max_concurrent=1, max_queue_wait_s=0.05)
    release, order = asyncio.Event(), []
    holder = asyncio.create_task(hold(queue, meta("holder"), release, order))
    await settle()
    with pytest.raises(OverloadedError) as info:
        async with queue.admit(meta("waiter")):
            pass
    assert info.value.code == "queue_timeout"
    assert queue.depth == 0, "the timed-out waiter must leave the queue"
    release.set()
    await holder
    assert queue.in_flight == 0


async def test_deadline_bounds_the_wait_and_a_past_deadline_is_refused_at_once() -> None:
    queue = AdmissionQueue(max_queue=4, max_concurrent=1, max_queue_wait_s=10.0)
    with pytest.raises(OverloadedError) as info:
        async with queue.admit(meta("late", deadline=time.time() - 1)):
            pass
    assert info.value.code == "queue_timeout"
    release, order = asyncio.Event(), []
    holder = asyncio.create_task(hold(queue, meta("holder"), release, order))
    await settle()
    started = time.perf_counter()
    with pytest.raises(OverloadedError) as info:
        async with queue.admit(meta("soon", deadline=time.time() + 0.05)):
            pass
    assert info.value.code == "queue_timeout"
    assert time.perf_counter() - started < 1.0, "the deadline, not max_queue_wait_s, bounds the wait"
    release.set()
    await holder


async def test_cancelled_waiter_frees_its_place_and_never_leaks_a_slot() -> None:
    queue = AdmissionQueue(max_queue=4, max_concurrent=1, max_queue_wait_s=10.0)
    release, order = asyncio.Event(), []
    holder = asyncio.create_task(hold(queue, meta("holder"), release, order))
    await settle()
    waiter = asyncio.create_task(hold(queue, meta("gone"), release, order))
    await settle()
    assert queue.depth == 1
    waiter.cancel()
    await settle()
    assert queue.depth == 0
    release.set()
    await holder
    assert queue.in_flight == 0 and order == ["holder"]


async def test_an_aborted_waiter_leaves_the_queue_and_never_runs() -> None:
    queue = AdmissionQueue(max_queue=8, max_concurrent=1, max_queue_wait_s=10.0)
    release, order = asyncio.Event(), []
    holder = asyncio.create_task(hold(queue, meta("holder"), release, order))
    await settle()
    waiters = {rid: asyncio.create_task(hold(queue, meta(rid), release, order))
               for rid in ("job-a-0", "job-a-1", "job-ab", "other")}
    await settle()
    assert queue.abort(lambda rid: rid.startswith("job-a-")) == 2  # a fan-out's two sequences
    await settle()
    assert queue.depth == 2 and queue.stats()["aborted_total"] == 2
    for rid in ("job-a-0", "job-a-1"):
        with pytest.raises(RequestAbortedError) as raised:
            await waiters[rid]
        assert raised.value.status_code == 499
    assert queue.abort(lambda rid: rid == "holder") == 0  # admitted already: not the queue's to abort
    release.set()
    await asyncio.gather(holder, waiters["job-ab"], waiters["other"])
    assert order == ["holder", "job-ab", "other"] and queue.in_flight == 0


async def test_higher_priority_is_served_first() -> None:
    queue = AdmissionQueue(max_queue=10, max_concurrent=1, max_queue_wait_s=5.0)
    release, order = asyncio.Event(), []
    tasks = [asyncio.create_task(hold(queue, meta("holder"), release, order))]
    await settle()
    for rid, priority in [("low1", 0), ("high", 5), ("low2", 0), ("mid", 1)]:
        tasks.append(asyncio.create_task(hold(queue, meta(rid, priority=priority), release, order)))
    await settle()
    release.set()
    await asyncio.gather(*tasks)
    assert order == ["holder", "high", "mid", "low1", "low2"]


async def test_a_high_priority_request_displaces_a_low_one_from_a_full_queue() -> None:
    queue = AdmissionQueue(max_queue=2, max_concurrent=1, max_queue_wait_s=5.0)
    release, order = asyncio.Event(), []
    holder = asyncio.create_task(hold(queue, meta("holder"), release, order))
    await settle()
    low = [asyncio.create_task(hold(queue, meta(f"low{i}"), release, order)) for i in range(2)]
    await settle()
    high = asyncio.create_task(hold(queue, meta("high", priority=3), release, order))
    await settle()
    with pytest.raises(OverloadedError):
        await low[1]  # the newest of the lowest priority gives way
    release.set()
    await asyncio.gather(holder, low[0], high)
    assert order == ["holder", "high", "low0"]
    assert queue.stats()["displaced_total"] == 1


async def test_a_flooding_tenant_cannot_starve_a_light_one() -> None:
    """Fairness: 200 queued requests of one tenant; a light tenant's request arriving after them is
    served within the next couple of slots, not after the flood."""
    queue = AdmissionQueue(max_queue=1000, max_concurrent=2, max_queue_wait_s=30.0)
    order: list[str] = []

    async def work(m: RequestMeta) -> None:
        async with queue.admit(m):
            order.append(m.rid)
            await asyncio.sleep(0.001)

    flood = [asyncio.create_task(work(meta(f"flood{i}", tenant="big"))) for i in range(200)]
    await settle()
    light = []
    for i in range(5):
        light.append(asyncio.create_task(work(meta(f"light{i}", tenant="small"))))
        await asyncio.sleep(0.004)
    await asyncio.gather(*flood, *light)
    for i in range(5):
        position = order.index(f"light{i}")
        served_before = sum(1 for rid in order[:position] if rid.startswith("flood"))
        assert served_before < 200, "the light tenant waited for the whole flood"
    # Light requests are interleaved: each is served within a few slots of arriving.
    first = order.index("light0")
    assert first <= 6, f"light0 was served at position {first}"


async def test_tenant_weights_share_slots_in_proportion() -> None:
    queue = AdmissionQueue(max_queue=1000, max_concurrent=1, max_queue_wait_s=30.0,
                           tenant_weights={"gold": 3.0, "free": 1.0})
    release, order = asyncio.Event(), []
    holder = asyncio.create_task(hold(queue, meta("holder"), release, order))
    await settle()
    tasks = []
    for i in range(40):
        tasks.append(asyncio.create_task(hold(queue, meta(f"gold{i}", tenant="gold"), release, order)))
        tasks.append(asyncio.create_task(hold(queue, meta(f"free{i}", tenant="free"), release, order)))
    await settle()
    release.set()
    await asyncio.gather(holder, *tasks)
    first_40 = order[1:41]
    gold = sum(1 for rid in first_40 if rid.startswith("gold"))
    assert 28 <= gold <= 32, f"gold got {gold} of the first 40 slots, expected ~30 (3:1)"


async def test_set_max_concurrent_admits_waiters_when_raised() -> None:
    queue = AdmissionQueue(max_queue=10, max_concurrent=1, max_queue_wait_s=5.0)
    release, order = asyncio.Event(), []
    tasks = [asyncio.create_task(hold(queue, meta(f"r{i}"), release, order)) for i in range(3)]
    await settle()
    assert queue.in_flight == 1
    queue.set_max_concurrent(3)
    await settle()
    assert queue.in_flight == 3 and queue.depth == 0
    stats = queue.stats()
    assert stats["max_concurrent"] == 3 and stats["queue_depth"] == 0
    release.set()
    await asyncio.gather(*tasks)


async def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_concurrent"):
        AdmissionQueue(max_queue=1, max_concurrent=0, max_queue_wait_s=1.0)
    with pytest.raises(ValueError, match="weight"):
        AdmissionQueue(max_queue=1, max_concurrent=1, max_queue_wait_s=1.0, tenant_weights={"a": 0})


async def test_request_meta_from_a_request_uses_the_tenant_default_priority() -> None:
    from app.protocol import GenerateRequest, SamplingParams

    plain = GenerateRequest(input_ids=[1] * 10, tenant="gold", sampling=SamplingParams(max_new_tokens=5))
    explicit = GenerateRequest(input_ids=[1] * 10, tenant="gold", priority=-1, deadline=123.0)
    defaults = {"gold": 7}
    assert RequestMeta.from_request(plain, defaults).priority == 7
    assert RequestMeta.from_request(plain, defaults).cost_tokens == 15
    assert RequestMeta.from_request(explicit, defaults).priority == -1
    assert RequestMeta.from_request(explicit, defaults).deadline == 123.0
    assert RequestMeta.from_request(plain).priority == 0
