"""Ray Serve adapter: a `RequestRouter` that routes model-replica calls by a `RoutingPolicy`.

Configured on the MODEL REPLICA deployment, so every handle that calls it (the scheduler's) routes
through the policy:

    @serve.deployment(request_router_config=RequestRouterConfig(
        request_router_class="app.scheduler.ray_router:PolicyRequestRouter",
        request_router_kwargs={"policy": "cache_aware", "max_tree_tokens_per_replica": 1 << 20},
        request_routing_stats_period_s=1.0,
    ))
    class ModelReplica:
        def record_routing_stats(self) -> dict:
            return {"outstanding_tokens": ..., "running": ..., "waiting": ...}

The request is read from the call's first positional argument (or a `request=` keyword), an
`app.protocol.GenerateRequest`: its `input_ids` (or, failing that, the UTF-8 bytes of `text`) and
`session_id`. Calls without one (health checks, stats) are routed by load only.

Load seen by the policy = the replica's last published `outstanding_tokens` + the tokens this
router sent it since that snapshot (uncached prompt + max_new_tokens per request, removed when the
request completes before the next snapshot). Published stats lag by the stats period; the local
term keeps a burst from herding onto the replica that looked idle a second ago.

Ranking: the policy's top choices are offered one per rank (Ray picks the least-queued replica
inside a rank, so single-replica ranks keep the policy's order), then the remaining replicas as
one last rank. A full replica (max_ongoing_requests) is skipped by Ray and the next rank tried.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from app.protocol import GenerateRequest
from app.scheduler.routing import ReplicaState, RoutingPolicy, make_policy

logger = logging.getLogger(__name__)

SINGLE_RANKS = 3  # the policy's top choices offered one by one, before the rest as one rank
TARGET_REPLICA_KWARG = "target_replica"  # a call with this keyword goes to that replica only

# deployment name -> ids of its live replicas, as the routers in this process last saw them.
_LIVE_REPLICAS: dict[str, set[str]] = {}


def live_replica_ids(deployment_name: str) -> set[str]:
    """The replicas a router in this process knows to be live (empty before its first call)."""
    return set(_LIVE_REPLICAS.get(deployment_name, ()))


@dataclass
class _Routed:
    replica_id: str
    cost_tokens: int
    snapshot: object  # the routing_stats object current when the request was routed


@dataclass
class _Extracted:
    token_ids: list[int]
    session_id: str | None
    max_new_tokens: int


def extract_request(pending_request: PendingRequest | None) -> _Extracted | None:
    """The routing-relevant parts of a call whose first argument is a GenerateRequest."""
    if pending_request is None:
        return None
    candidates = list(pending_request.args[:1]) + [pending_request.kwargs.get("request")]
    for arg in candidates:
        if isinstance(arg, GenerateRequest):
            if arg.input_ids is not None:
                token_ids = arg.input_ids
            else:
                token_ids = list((arg.text or "").encode("utf-8"))
            return _Extracted(token_ids, arg.session_id, arg.sampling.max_new_tokens)
    return None


def _available(replicas: list[RunningReplica]) -> list[RunningReplica]:
    """Replicas whose routing stats do not say `available: False` (engine restarting, draining).
    If none is available, all of them: the request then gets the replica's fast, retryable 503
    instead of waiting in Ray's routing loop, which has no deadline."""
    up = [r for r in replicas if (r.routing_stats or {}).get("available", True)]
    return up or replicas


# FIFOMixin: with the base class alone (match the routed replica to the exact request), Ray Serve
# 2.60 left one of several concurrent requests unrouted for 10-20 s (seen with 4 identical prompts
# at once). FIFO hands the chosen replica to the oldest waiting request; when replicas accept at once
# (the normal case) that is the request the choice was made for.
class PolicyRequestRouter(FIFOMixin, RequestRouter):
    """Routes by an `app.scheduler.routing` policy; see the module docstring."""

    def initialize_state(self, policy: str = "cache_aware", **policy_kwargs: Any) -> None:
        self._policy: RoutingPolicy = make_policy(policy, **policy_kwargs)
        self._in_flight: dict[str, _Routed] = {}  # internal_request_id -> what was sent where
        self._since_snapshot: dict[str, int] = {}  # replica -> tokens sent since its stats snapshot
        self._snapshot_seen: dict[str, object] = {}  # replica -> the routing_stats object last seen
        logger.info("PolicyRequestRouter routing by %s %s", policy, policy_kwargs)

    @property
    def policy(self) -> RoutingPolicy:
        return self._policy

    # --- RequestRouter hooks ---------------------------------------------------------------------

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # The policy ranks every replica at once, so a failed round (all full) must back off:
            # left False, Ray re-asks at once in a loop that never yields the event loop.
            pending_request.routing_context.should_backoff = True
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        target = pending_request.kwargs.get(TARGET_REPLICA_KWARG) if pending_request is not None else None
        if target in by_id:  # a call meant for one replica (e.g. a cache flush sent to each)
            return [[by_id[target]]]
        candidate_replicas = _available(candidate_replicas)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        states = [self._state_of(r) for r in candidate_replicas]
        request = extract_request(pending_request)
        if request is None:
            ranking = sorted(by_id, key=lambda rid: self._load_of(by_id[rid]))
        else:
            ranking = self._policy.choose(request.token_ids, states, request.session_id)
        ranks = [[by_id[rid]] for rid in ranking[:SINGLE_RANKS]]
        rest = [by_id[rid] for rid in ranking[SINGLE_RANKS:]]
        return ranks + ([rest] if rest else [])

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        request = extract_request(pending_request)
        if request is None:
            return
        rid = replica_id.unique_id
        # The work this request adds: its uncached prompt tokens (a prefix the replica already
        # holds costs nothing) + the tokens it may decode.
        cost = self._policy.uncached_tokens(rid, request.token_ids) + request.max_new_tokens
        self._policy.on_routed(rid, request.token_ids, request.session_id)
        self._in_flight[pending_request.metadata.internal_request_id] = _Routed(
            rid, cost, self._snapshot_seen.get(rid)
        )
        self._since_snapshot[rid] = self._since_snapshot.get(rid, 0) + cost

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        routed = self._in_flight.pop(internal_request_id, None)
        if routed is None:
            return
        # Still counted locally only if no newer snapshot (which would include it) arrived since.
        if self._snapshot_seen.get(routed.replica_id) is routed.snapshot:
            left = self._since_snapshot.get(routed.replica_id, 0) - routed.cost_tokens
            self._since_snapshot[routed.replica_id] = max(0, left)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._replicas_changed()

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._replicas_changed()

    # --- internals ---------------------------------------------------------------------------

    def _replicas_changed(self) -> None:
        live = {replica_id.unique_id for replica_id in self.curr_replicas}
        # Through the imported module: Ray may rebuild this class from a cloudpickle copy whose
        # globals are not the module's, and the scheduler reads the module's registry.
        import app.scheduler.ray_router as registry

        registry._LIVE_REPLICAS[self._deployment_id.name] = live
        if not hasattr(self, "_policy"):  # replicas may arrive before initialize_state
            return
        self._policy.on_replicas_changed(live)
        for table in (self._since_snapshot, self._snapshot_seen):
            for rid in [rid for rid in table if rid not in live]:
                del table[rid]

    def _state_of(self, replica: RunningReplica) -> ReplicaState:
        stats = replica.routing_stats or {}
        return ReplicaState(
            replica_id=replica.replica_id.unique_id,
            outstanding_tokens=self._load_of(replica),
            running=int(stats.get("running", 0)),
            waiting=int(stats.get("waiting", 0)),
        )

    def _load_of(self, replica: RunningReplica) -> int:
        rid = replica.replica_id.unique_id
        stats = replica.routing_stats
        if stats is not None and stats is not self._snapshot_seen.get(rid):
            self._snapshot_seen[rid] = stats  # a fresh snapshot already counts what we sent
            self._since_snapshot[rid] = 0
        published = int((stats or {}).get("outstanding_tokens", 0))
        return published + self._since_snapshot.get(rid, 0)

    def stats(self) -> dict[str, Any]:
        return {
            "policy": self._policy.stats(),
            "in_flight": len(self._in_flight),
            "tokens_sent_since_snapshot": dict(self._since_snapshot),
        }
