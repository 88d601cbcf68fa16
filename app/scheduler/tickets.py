"""The ticket protocol between the Ingress and the Scheduler: the scheduler decides, the Ingress streams.

    Ingress                                   Scheduler
      | admit(request) ---------------------->  waits in the AdmissionQueue (or 503 + Retry-After),
      |                                         picks the replica (routing policy, token ids)
      | <------------------------------ Ticket  (replica, priority, deadline, lease)
      | ModelReplica.generate(request, target_replica=ticket.replica_id)   <- the only token hop
      | release([Outcome, ...], renew=[...]) ->  frees the slots, feeds the in-flight limits;
      |                                          batched, sent off the request's critical path
      | reroute(ticket, request, failed) ----->  a replica failed: same slot, another replica

A ticket holds one admission slot until it is released. A release that never comes (an Ingress
that died) expires with the lease: the Ingress renews the leases of the streams it still serves
with each release batch, so only an Ingress that is gone lets them lapse.

`TicketDesk` is the scheduler's book of live tickets; plain Python, no Ray.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from app.scheduler.admission import RequestMeta
from app.scheduler.loads import Routed

# admit_many's answer for a request that waits in the queue: follow_admits brings its ticket later.
QUEUED = "queued"

OutcomeStatus = Literal["finished", "aborted", "client_disconnect", "error", "replica_failure"]


@dataclass
class Ticket:
    ticket_id: str
    rid: str
    replica_id: str | None  # None: no replica known yet; the Ingress's router picks by load
    priority: int
    deadline: float | None  # absolute unix time, the request's own
    lease_s: float  # renew within this, or the slot is taken back
    attempt: int = 0  # 0: first placement; n: the n-th placement after a replica failure
    version: str | None = None  # the model version whose replicas serve it (app/canary.py); None: one model


@dataclass
class Outcome:
    """How a ticket's stream ended, as the Ingress saw it."""

    ticket_id: str
    status: OutcomeStatus
    served_by: str | None = None  # the replica that produced the last output
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_time: float | None = None  # engine's wall clock (time.time())
    finished_at: float = field(default_factory=time.time)


@dataclass
class LiveTicket:
    ticket: Ticket
    meta: RequestMeta
    routed: Routed | None  # what the placement added to the replica's load estimate
    granted_at: float  # monotonic: the slot's hold time
    admitted_at: float  # wall clock: TTFT seen by the in-flight limits
    expires_at: float  # monotonic


def rid_matches(rid: str, candidate: str) -> bool:
    """Whether an abort of `rid` covers the request `candidate`: itself or its fan-out `rid-<i>`."""
    return candidate == rid or candidate.startswith(f"{rid}-")


class TicketDesk:
    """Live tickets by id, with their leases. Single event loop, no locks."""

    def __init__(self, lease_s: float, *, clock: Callable[[], float] = time.monotonic, prefix: str = "") -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        self.lease_s = lease_s
        self._clock = clock
        self._ids = itertools.count(1)
        self._prefix = prefix  # tells apart tickets of several scheduler replicas
        self._live: dict[str, LiveTicket] = {}
        self.issued_total = 0
        self.released_total = 0
        self.expired_total = 0
        self.rerouted_total = 0

    def issue(self, meta: RequestMeta, replica_id: str | None, routed: Routed | None,
              version: str | None = None) -> Ticket:
        now = self._clock()
        ticket = Ticket(
            ticket_id=f"{self._prefix}{next(self._ids)}", rid=meta.rid, replica_id=replica_id,
            priority=meta.priority, deadline=meta.deadline, lease_s=self.lease_s, version=version,
        )
        self._live[ticket.ticket_id] = LiveTicket(ticket, meta, routed, now, time.time(), now + self.lease_s)
        self.issued_total += 1
        return ticket

    def replace(self, live: LiveTicket, replica_id: str | None, routed: Routed | None) -> Ticket:
        """The same slot and ticket id, placed on another replica."""
        live.ticket.replica_id = replica_id
        live.ticket.attempt += 1
        live.routed = routed
        live.expires_at = self._clock() + self.lease_s
        self.rerouted_total += 1
        return live.ticket

    def get(self, ticket_id: str) -> LiveTicket | None:
        return self._live.get(ticket_id)

    def pop(self, ticket_id: str) -> LiveTicket | None:
        live = self._live.pop(ticket_id, None)
        if live is not None:
            self.released_total += 1
        return live

    def renew(self, ticket_ids: Iterable[str]) -> None:
        expires = self._clock() + self.lease_s
        for ticket_id in ticket_ids:
            live = self._live.get(ticket_id)
            if live is not None:
                live.expires_at = expires

    def expire(self) -> list[LiveTicket]:
        """Remove and return the tickets whose lease ran out."""
        now = self._clock()
        gone = [t for t in self._live.values() if t.expires_at <= now]
        for live in gone:
            del self._live[live.ticket.ticket_id]
        self.expired_total += len(gone)
        return gone

    def matching(self, rid: str | None) -> list[LiveTicket]:
        """Live tickets of a request id (and of its fan-out `rid-<i>`); all of them for None."""
        if rid is None:
            return list(self._live.values())
        return [t for t in self._live.values() if rid_matches(rid, t.meta.rid)]

    def hold_s(self, live: LiveTicket) -> float:
        return self._clock() - live.granted_at

    def __len__(self) -> int:
        return len(self._live)

    def stats(self) -> dict[str, Any]:
        return {
            "live": len(self._live),
            "issued_total": self.issued_total,
            "released_total": self.released_total,
            "expired_total": self.expired_total,
            "rerouted_total": self.rerouted_total,
            "lease_s": self.lease_s,
        }
