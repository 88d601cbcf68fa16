"""Ray Serve adapter: a `RequestRouter` that routes model-replica calls by a `RoutingPolicy`.

Configured on the MODEL REPLICA deployment, so every handle that calls it routes through it. Two
kinds of calls arrive: a call with `target_replica=<id>` (the Ingress streaming a ticket's request
to the replica the scheduler chose, or the scheduler's per-replica broadcasts) goes to that replica
only, with no policy work; any other call is ranked by the policy:

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

Load seen by the policy: `app.scheduler.loads.ReplicaLoads` (published stats + what was sent since).

The router in each process also publishes what it sees (live replica ids and their last routing
stats) in a module registry, `routing_snapshot(name)`: the scheduler decides on tickets from it
without routing a call itself.

Ranking: the policy's top choices are offered one per rank (Ray picks the least-queued replica
inside a rank, so single-replica ranks keep the policy's order), then the remaining replicas as
one last rank. A full replica (max_ongoing_requests) is skipped by Ray and the next rank tried.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from app.protocol import GenerateRequest
from app.scheduler.loads import ReplicaLoads, Routed
from app.scheduler.routing import RoutingPolicy, make_policy

logger = logging.getLogger(__name__)

SINGLE_RANKS = 3  # the policy's top choices offered one by one, before the rest as one rank
TARGET_REPLICA_KWARG = "target_replica"  # a call with this keyword goes to that replica only



@dataclass(frozen=True)
class RoutingSnapshot:
    """What a router last saw of a deployment: replica id -> its published routing stats (the
    objects themselves, so a reader can tell a fresh snapshot by identity)."""

    stats: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    version: int = 0

    @property
    def live(self) -> set[str]:
        return set(self.stats)


# deployment name -> what the routers in this process last saw. Replaced whole on each update (one
# assignment), so a reader on another thread (Serve may run routers on their own loop) sees either
# the old or the new snapshot, never half of one.
_SNAPSHOTS: dict[str, RoutingSnapshot] = {}


def routing_snapshot(deployment_name: str) -> RoutingSnapshot:
    return _SNAPSHOTS.get(deployment_name) or RoutingSnapshot()


def live_replica_ids(deployment_name: str) -> set[str]:
    """The replicas a router in this process knows to be live (empty before it first heard)."""
    return routing_snapshot(deployment_name).live


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
        self._loads = ReplicaLoads(self._policy)
        self._in_flight: dict[str, Routed] = {}  # internal_request_id -> what was sent where
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
        if target in by_id:  # a ticket's replica, or a call meant for each (e.g. a cache flush)
            return [[by_id[target]]]
        candidate_replicas = _available(candidate_replicas)  # not restarting its engine or draining
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        states = [self._loads.state(rid, r.routing_stats) for rid, r in by_id.items()]
        request = extract_request(pending_request)
        if request is None:
            ranking = sorted(by_id, key=lambda rid: self._loads.load(rid, by_id[rid].routing_stats))
        else:
            ranking = self._policy.choose(request.token_ids, states, request.session_id)
        ranks = [[by_id[rid]] for rid in ranking[:SINGLE_RANKS]]
        rest = [by_id[rid] for rid in ranking[SINGLE_RANKS:]]
        return ranks + ([rest] if rest else [])

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        if pending_request.kwargs.get(TARGET_REPLICA_KWARG) is not None:
            return  # decided (and accounted) by the scheduler that issued the ticket
        request = extract_request(pending_request)
        if request is None:
            return
        routed = self._loads.routed(replica_id.unique_id, request.token_ids, request.session_id, request.max_new_tokens)
        self._in_flight[pending_request.metadata.internal_request_id] = routed

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        routed = self._in_flight.pop(internal_request_id, None)
        if routed is not None:
            self._loads.completed(routed)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._replicas_changed()

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._replicas_changed()

    # --- internals ---------------------------------------------------------------------------

    def _replicas_changed(self) -> None:
        stats = {r.replica_id.unique_id: r.routing_stats for r in self.curr_replicas.values()}
        # Through the imported module: Ray may rebuild this class from a cloudpickle copy whose
        # globals are not the module's, and the scheduler reads the module's registry.
        import app.scheduler.ray_router as registry

        name = self._deployment_id.name
        previous = registry._SNAPSHOTS.get(name)
        registry._SNAPSHOTS[name] = RoutingSnapshot(stats, (previous.version + 1) if previous else 1)
        if not hasattr(self, "_loads"):  # replicas may arrive before initialize_state
            return
        self._loads.replicas_changed(set(stats))

    def stats(self) -> dict[str, Any]:
        return {**self._loads.stats(), "in_flight": len(self._in_flight)}
