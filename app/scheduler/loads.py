"""What a router believes each replica's load is: its last published stats + what was sent since.

Replicas publish `outstanding_tokens` every stats period (`record_routing_stats`); a burst routed
between two snapshots would all herd onto the replica that looked idle, so the tokens routed to a
replica since its last snapshot are added on top, and removed when the request completes before
the next snapshot (a newer snapshot already counts it). Used by the Ray request router and by the
scheduler's ticket desk alike. Plain Python: no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.scheduler.routing import ReplicaState, RoutingPolicy


@dataclass
class Routed:
    """One request sent to a replica: what it added to the replica's load, against which snapshot."""

    replica_id: str
    cost_tokens: int
    snapshot: object  # the stats object current when the request was routed


class ReplicaLoads:
    def __init__(self, policy: RoutingPolicy) -> None:
        self.policy = policy
        self._since_snapshot: dict[str, int] = {}  # replica -> tokens sent since its stats snapshot
        self._snapshot_seen: dict[str, object] = {}  # replica -> the stats object last seen

    def state(self, replica_id: str, stats: dict[str, Any] | None) -> ReplicaState:
        stats = stats or {}
        return ReplicaState(
            replica_id=replica_id,
            outstanding_tokens=self.load(replica_id, stats),
            running=int(stats.get("running", 0)),
            waiting=int(stats.get("waiting", 0)),
        )

    def load(self, replica_id: str, stats: dict[str, Any] | None) -> int:
        if stats is not None and stats is not self._snapshot_seen.get(replica_id):
            self._snapshot_seen[replica_id] = stats  # a fresh snapshot already counts what we sent
            self._since_snapshot[replica_id] = 0
        published = int((stats or {}).get("outstanding_tokens", 0))
        return published + self._since_snapshot.get(replica_id, 0)

    def routed(self, replica_id: str, token_ids: list[int], session_id: str | None, max_new_tokens: int) -> Routed:
        """Record a request sent to `replica_id`: its uncached prompt tokens (a prefix the replica
        already holds costs nothing) + the tokens it may decode; the policy learns the prefix."""
        cost = self.policy.uncached_tokens(replica_id, token_ids) + max_new_tokens
        self.policy.on_routed(replica_id, token_ids, session_id)
        self._since_snapshot[replica_id] = self._since_snapshot.get(replica_id, 0) + cost
        return Routed(replica_id, cost, self._snapshot_seen.get(replica_id))

    def completed(self, routed: Routed) -> None:
        # Still counted locally only if no newer snapshot (which would include it) arrived since.
        if self._snapshot_seen.get(routed.replica_id) is routed.snapshot:
            left = self._since_snapshot.get(routed.replica_id, 0) - routed.cost_tokens
            self._since_snapshot[routed.replica_id] = max(0, left)

    def replicas_changed(self, live: set[str]) -> None:
        self.policy.on_replicas_changed(live)
        for table in (self._since_snapshot, self._snapshot_seen):
            for rid in [rid for rid in table if rid not in live]:
                del table[rid]

    def stats(self) -> dict[str, Any]:
        return {"policy": self.policy.stats(), "tokens_sent_since_snapshot": dict(self._since_snapshot)}
