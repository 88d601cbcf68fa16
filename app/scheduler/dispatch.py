"""The scheduler's replica choice for a ticket, made with the request's token ids.

The policy (`app.scheduler.routing`, e.g. cache_aware) ranks the live replicas from what the Ray
request router in this process last saw of them (`routing_snapshot`: membership from Serve's own
updates, each replica's published load) plus what this scheduler placed since
(`ReplicaLoads`). The Ingress's request router then only honours the ticket's replica
(`target_replica`), so the decision is made once, here, where the prefix tree lives.

A replica that just failed a request is set aside for `suspect_s` (Serve may take seconds to
drop a dead one from the membership, and an engine that is restarting answers nothing useful),
unless no other replica is left.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from app.protocol import GenerateRequest
from app.scheduler.loads import ReplicaLoads, Routed
from app.scheduler.ray_router import RoutingSnapshot, routing_snapshot
from app.scheduler.routing import ReplicaState, RoutingPolicy

SUSPECT_S = 10.0


def routing_key(request: GenerateRequest) -> list[int]:
    """The tokens the policy matches prefixes on (the UTF-8 bytes of a text prompt)."""
    if request.input_ids is not None:
        return request.input_ids
    return list((request.text or "").encode("utf-8"))


class Dispatcher:
    def __init__(
        self,
        policy: RoutingPolicy,
        deployment: str = "ModelReplica",
        *,
        snapshot: Callable[[str], RoutingSnapshot] = routing_snapshot,
        clock: Callable[[], float] = time.monotonic,
        suspect_s: float = SUSPECT_S,
    ) -> None:
        self.loads = ReplicaLoads(policy)
        self.deployment = deployment
        self._snapshot = snapshot
        self._clock = clock
        self._suspect_s = suspect_s
        self._seen_live: frozenset[str] = frozenset()
        self._snap: RoutingSnapshot | None = None
        self._states: dict[str, ReplicaState] = {}
        self._state_list: list[ReplicaState] = []
        self._suspects: dict[str, float] = {}  # replica -> until (monotonic)
        self.decisions_total = 0

    def live(self) -> set[str]:
        return self._snapshot(self.deployment).live

    def choose(self, request: GenerateRequest, exclude: frozenset[str] = frozenset()) -> tuple[str | None, Routed | None]:
        """The replica for this request, recorded in the load estimate; (None, None) when no live
        replica is known yet (the Ingress's router then picks one by load)."""
        states = self._current_states()
        avoid = exclude | self._current_suspects() | self._unavailable()
        candidates = states
        if avoid:
            candidates = [s for s in states if s.replica_id not in avoid] or [s for s in states if s.replica_id not in exclude]
        if not candidates:
            return None, None
        tokens = routing_key(request)
        replica = self.loads.policy.choose(tokens, candidates, request.session_id)[0]
        self.decisions_total += 1
        routed = self.loads.routed(replica, tokens, request.session_id, request.sampling.max_new_tokens)
        self._refresh(replica)
        return replica, routed

    def completed(self, routed: Routed | None) -> None:
        if routed is not None:
            self.loads.completed(routed)
            self._refresh(routed.replica_id)

    def _current_states(self) -> list[ReplicaState]:
        """The replicas' states, rebuilt only when a new snapshot arrived (at 64 replicas, building
        64 states per decision was half the cost of a decision); between snapshots only the
        replica a decision touched is refreshed."""
        snap = self._snapshot(self.deployment)
        if snap is not self._snap:
            live = frozenset(snap.stats)
            if live != self._seen_live:
                self.loads.replicas_changed(set(live))
                self._seen_live = live
            self._snap = snap
            self._states = {rid: self.loads.state(rid, stats) for rid, stats in snap.stats.items()}
            self._state_list = list(self._states.values())
        return self._state_list

    def _unavailable(self) -> frozenset[str]:
        """Replicas that say they cannot serve now (engine restarting, draining: app/replica.py's
        `available` routing stat); chosen only when no other replica is left."""
        stats = self._snap.stats if self._snap is not None else {}
        return frozenset(rid for rid, st in stats.items() if st and st.get("available") is False)

    def _refresh(self, replica_id: str) -> None:
        state = self._states.get(replica_id)
        if state is not None and self._snap is not None:
            state.outstanding_tokens = self.loads.load(replica_id, self._snap.stats.get(replica_id))

    def suspect(self, replica_id: str | None) -> None:
        if replica_id is not None:
            self._suspects[replica_id] = self._clock() + self._suspect_s

    def _current_suspects(self) -> frozenset[str]:
        if not self._suspects:
            return frozenset()
        now = self._clock()
        for rid in [r for r, until in self._suspects.items() if until <= now]:
            del self._suspects[rid]
        return frozenset(self._suspects)

    def stats(self) -> dict:
        return {**self.loads.stats(), "decisions_total": self.decisions_total, "suspects": sorted(self._suspects)}
