"""Admission control: one bounded queue in front of the replicas, with priorities and fairness.

A request gets a slot (one of `max_concurrent`) at once when one is free and nobody waits;
otherwise it waits in the queue. The queue is bounded:

- full (`max_queue` waiting): 503 at once, Retry-After = queue depth / drain rate (slots / mean
  time a request holds one); except that a request of higher priority than the lowest-priority
  waiter takes that waiter's place (the waiter gets the 503), so priority holds under overload;
- predicted to time out (waiters ahead of it / drain rate > its wait limit, >= 8 ahead): 503 at
  once too, so that under overload the effective queue is what drains within the wait limit and
  nobody waits only to be refused;
- waited longer than `max_queue_wait_s`, or past the request's own deadline: 503 "queue_timeout";
- a deadline already past on arrival: 503 "queue_timeout" at once.

Order of service: strict priority (higher first), then weighted fair queueing across tenants
within a priority. Fairness uses self-clocked fair queueing (SCFQ): each request gets a virtual
finish tag `max(V, last_tag[tenant]) + cost / weight[tenant]`, where V is the tag of the request
most recently admitted; the smallest tag goes first. A flooding tenant's tags run ahead of V, so
a light tenant's new request (tag ~ V + its own cost) is served after at most about one request of
every other backlogged tenant: its wait is bounded by the number of tenants, not by the flood.
Cost is the request's token cost (prompt + max new tokens), so fairness is in tokens, not calls.

Single event loop, no locks: every method runs on the loop that calls `admit`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from app.errors import OverloadedError, RequestAbortedError
from app.protocol import GenerateRequest

HOLD_EWMA_ALPHA = 0.05  # weight of the newest slot hold time in the running mean
MIN_HOLD_SAMPLES = 16  # completions needed before the drain rate is trusted
MIN_RETRY_AFTER_S = 1.0
MAX_RETRY_AFTER_S = 60.0
MIN_PREDICTED_DEPTH = 8  # below this depth, never reject on a predicted timeout (rate too noisy)


@dataclass
class RequestMeta:
    rid: str
    tenant: str = "default"
    priority: int = 0  # higher is served first
    deadline: float | None = None  # absolute unix time (time.time()), like GenerateRequest's
    cost_tokens: int = 1  # prompt tokens + max new tokens: the fairness currency

    @classmethod
    def from_request(
        cls, request: GenerateRequest, default_priority: dict[str, int] | None = None
    ) -> "RequestMeta":
        """Scheduling metadata of a request. A non-zero `request.priority` wins; otherwise the
        tenant's default priority (per API key) applies. Text prompts are costed at ~4 chars/token."""
        prompt = len(request.input_ids) if request.input_ids is not None else len(request.text or "") // 4 + 1
        priority = request.priority or (default_priority or {}).get(request.tenant, 0)
        return cls(
            rid=request.rid,
            tenant=request.tenant,
            priority=priority,
            deadline=request.deadline,
            cost_tokens=prompt + request.sampling.max_new_tokens,
        )


@dataclass(order=True)
class _Waiter:
    sort_key: tuple[int, float, int]  # (-priority, virtual finish tag, arrival sequence)
    meta: RequestMeta = field(compare=False)
    future: asyncio.Future[None] = field(compare=False)
    enqueued_at: float = field(compare=False)
    cancelled: bool = field(default=False, compare=False)


class AdmissionQueue:
    def __init__(
        self,
        max_queue: int,
        max_concurrent: int,
        max_queue_wait_s: float,
        tenant_weights: dict[str, float] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if max_concurrent <= 0:
            raise ValueError(f"max_concurrent must be > 0, got {max_concurrent}")
        if max_queue_wait_s <= 0:
            raise ValueError(f"max_queue_wait_s must be > 0, got {max_queue_wait_s}")
        for tenant, weight in (tenant_weights or {}).items():
            if weight <= 0:
                raise ValueError(f"tenant weight of {tenant!r} must be > 0, got {weight}")
        self.max_queue = max_queue
        self.max_concurrent = max_concurrent
        self.max_queue_wait_s = max_queue_wait_s
        self.tenant_weights = dict(tenant_weights or {})
        self._clock = clock  # for the drain rate; simulations pass their loop's virtual time
        self.in_flight = 0
        self._heap: list[_Waiter] = []
        self._depth = 0  # live (not cancelled) waiters in the heap
        self._tenant_depth: dict[str, int] = {}
        self._priority_depth: dict[int, int] = {}
        self._virtual_time = 0.0
        self._last_tag: dict[str, float] = {}
        self._sequence = itertools.count()
        self._mean_hold_s: float | None = None  # EWMA of how long a request holds its slot
        self._hold_samples = 0
        self.admitted_total = 0
        self.rejected_full_total = 0
        self.rejected_timeout_total = 0
        self.displaced_total = 0
        self.rejected_predicted_total = 0  # (part of rejected_full_total) would have timed out
        self.aborted_total = 0  # waiters taken out of the queue by an abort: they never ran

    # --- the API ----------------------------------------------------------------------------

    @asynccontextmanager
    async def admit(self, meta: RequestMeta) -> AsyncIterator[None]:
        """Hold one slot for the body of the `async with`; raises OverloadedError when refused."""
        await self.acquire(meta)
        granted_at = self._clock()
        try:
            yield
        finally:
            self.release(self._clock() - granted_at)

    async def acquire(self, meta: RequestMeta) -> None:
        """Wait for one slot (or raise OverloadedError); the caller must `release` it once."""
        await self._acquire(meta)

    def release(self, hold_s: float) -> None:
        """Give back a slot held for `hold_s` seconds (feeds the drain rate)."""
        self._record_hold(hold_s)
        self._release()

    def abort(self, matches: Callable[[str], bool]) -> int:
        """Take the waiters whose request id `matches` out of the queue: their `acquire` raises
        RequestAbortedError, so an aborted request that had not been admitted never runs. O(queue)."""
        aborted = 0
        for waiter in self._heap:
            if waiter.cancelled or waiter.future.done() or not matches(waiter.meta.rid):
                continue
            waiter.cancelled = True  # left in the heap, skipped when popped (lazy deletion)
            self._leave_queue(waiter)
            waiter.future.set_exception(RequestAbortedError(
                f"request {waiter.meta.rid} was aborted while it waited in the queue", code="aborted_in_queue"))
            aborted += 1
        self.aborted_total += aborted
        return aborted

    def set_max_concurrent(self, n: int) -> None:
        if n <= 0:
            raise ValueError(f"max_concurrent must be > 0, got {n}")
        self.max_concurrent = n
        self._dispatch()

    def retry_after_s(self) -> float:
        """How long the current queue would take to drain at the observed rate."""
        rate = self.drain_rate()
        if rate <= 0:
            return self.max_queue_wait_s
        return min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, (self._depth + 1) / rate))

    def drain_rate(self) -> float:
        """Requests/s the queue drains at when every slot is busy: max_concurrent / mean hold time.
        0 until MIN_HOLD_SAMPLES requests completed. Unlike counting recent completions, this does
        not mistake a quiet past for a slow server when a burst arrives."""
        if self._hold_samples < MIN_HOLD_SAMPLES or not self._mean_hold_s:
            return 0.0
        return self.max_concurrent / self._mean_hold_s

    @property
    def depth(self) -> int:
        return self._depth

    def stats(self) -> dict[str, Any]:
        return {
            "queue_depth": self._depth,
            "in_flight": self.in_flight,
            "max_concurrent": self.max_concurrent,
            "max_queue": self.max_queue,
            "drain_rate_per_s": round(self.drain_rate(), 3),
            "tenant_depth": dict(self._tenant_depth),
            "admitted_total": self.admitted_total,
            "rejected_full_total": self.rejected_full_total,
            "rejected_timeout_total": self.rejected_timeout_total,
            "displaced_total": self.displaced_total,
            "rejected_predicted_total": self.rejected_predicted_total,
            "aborted_total": self.aborted_total,
        }

    # --- internals ----------------------------------------------------------------------------

    async def _acquire(self, meta: RequestMeta) -> None:
        wait_s = self.max_queue_wait_s
        if meta.deadline is not None:
            wait_s = min(wait_s, meta.deadline - time.time())
            if wait_s <= 0:
                self.rejected_timeout_total += 1
                raise OverloadedError(
                    f"request {meta.rid} arrived past its deadline",
                    code="queue_timeout",
                    retry_after_s=self.retry_after_s(),
                )
        if self.in_flight < self.max_concurrent and self._depth == 0:
            self._take_slot(meta)
            return
        if self._depth >= self.max_queue and not self._displace_lower_than(meta.priority):
            self.rejected_full_total += 1
            raise OverloadedError(
                f"server overloaded: {self._depth} requests queued (max_queue={self.max_queue})",
                retry_after_s=self.retry_after_s(),
            )
        rate = self.drain_rate()
        ahead = self._waiting_at_or_above(meta.priority)
        if rate > 0 and (ahead + 1) / rate > wait_s and ahead >= MIN_PREDICTED_DEPTH:
            # It would time out anyway: say so now, not after wait_s, and keep the queue for others.
            self.rejected_full_total += 1
            self.rejected_predicted_total += 1
            raise OverloadedError(
                f"server overloaded: the {ahead} requests queued ahead drain in "
                f"{ahead / rate:.1f} s at {rate:.1f}/s, beyond this request's {wait_s:.1f} s wait limit",
                retry_after_s=self.retry_after_s(),
            )
        waiter = self._enqueue(meta)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), timeout=wait_s)
        except asyncio.TimeoutError:
            if waiter.future.done() and waiter.future.exception() is None:
                return  # granted in the same instant the timer fired: keep the slot
            self._cancel(waiter)
            self.rejected_timeout_total += 1
            why = "its deadline" if wait_s < self.max_queue_wait_s else f"{self.max_queue_wait_s:g} s"
            raise OverloadedError(
                f"request {meta.rid} waited in the queue past {why}",
                code="queue_timeout",
                retry_after_s=self.retry_after_s(),
            ) from None
        except asyncio.CancelledError:
            if waiter.future.done() and waiter.future.exception() is None:
                self._release()  # the slot was granted to a caller that is gone
            else:
                self._cancel(waiter)
            raise
        # Granted, or displaced or aborted (the future carries the error): result() raises then.
        waiter.future.result()

    def _enqueue(self, meta: RequestMeta) -> _Waiter:
        weight = self.tenant_weights.get(meta.tenant, 1.0)
        start = max(self._virtual_time, self._last_tag.get(meta.tenant, 0.0))
        tag = start + max(1, meta.cost_tokens) / weight
        self._last_tag[meta.tenant] = tag
        waiter = _Waiter(
            sort_key=(-meta.priority, tag, next(self._sequence)),
            meta=meta,
            future=asyncio.get_running_loop().create_future(),
            enqueued_at=self._clock(),
        )
        heapq.heappush(self._heap, waiter)
        self._depth += 1
        self._tenant_depth[meta.tenant] = self._tenant_depth.get(meta.tenant, 0) + 1
        self._priority_depth[meta.priority] = self._priority_depth.get(meta.priority, 0) + 1
        return waiter

    def _cancel(self, waiter: _Waiter) -> None:
        if not waiter.cancelled and not waiter.future.done():
            waiter.cancelled = True  # left in the heap, skipped when popped (lazy deletion)
            self._leave_queue(waiter)
            waiter.future.cancel()

    def _waiting_at_or_above(self, priority: int) -> int:
        """Waiters served before a new request of this priority (few distinct priorities)."""
        return sum(n for p, n in self._priority_depth.items() if p >= priority)

    def _leave_queue(self, waiter: _Waiter) -> None:
        self._depth -= 1
        level = waiter.meta.priority
        self._priority_depth[level] -= 1
        if self._priority_depth[level] == 0:
            del self._priority_depth[level]
        tenant = waiter.meta.tenant
        self._tenant_depth[tenant] -= 1
        if self._tenant_depth[tenant] == 0:
            del self._tenant_depth[tenant]

    def _displace_lower_than(self, priority: int) -> bool:
        """Full queue: 503 the newest waiter of the lowest priority below `priority`, if any.
        O(queue) but only on the full-queue path."""
        victim: _Waiter | None = None
        for waiter in self._heap:
            if waiter.cancelled or waiter.future.done() or waiter.meta.priority >= priority:
                continue
            if victim is None or waiter.sort_key > victim.sort_key:
                victim = waiter
        if victim is None:
            return False
        victim.cancelled = True
        self._leave_queue(victim)
        self.displaced_total += 1
        self.rejected_full_total += 1
        victim.future.set_exception(
            OverloadedError(
                f"request {victim.meta.rid} displaced from a full queue by a higher priority",
                retry_after_s=self.retry_after_s(),
            )
        )
        return True

    def _take_slot(self, meta: RequestMeta) -> None:
        self.in_flight += 1
        self.admitted_total += 1

    def _release(self) -> None:
        self.in_flight -= 1
        assert self.in_flight >= 0, "released more slots than were taken"
        self._dispatch()

    def _record_hold(self, hold_s: float) -> None:
        self._hold_samples += 1
        if self._mean_hold_s is None:
            self._mean_hold_s = hold_s
        else:
            self._mean_hold_s += HOLD_EWMA_ALPHA * (hold_s - self._mean_hold_s)

    def _dispatch(self) -> None:
        while self.in_flight < self.max_concurrent and self._heap:
            waiter = heapq.heappop(self._heap)
            if waiter.cancelled or waiter.future.done():
                continue
            self._leave_queue(waiter)
            self._virtual_time = max(self._virtual_time, waiter.sort_key[1])
            if self._tenant_depth.get(waiter.meta.tenant, 0) == 0:
                self._last_tag.pop(waiter.meta.tenant, None)  # idle again: no debt to remember
            self._take_slot(waiter.meta)
            waiter.future.set_result(None)
