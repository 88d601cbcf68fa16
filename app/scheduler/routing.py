"""Routing policies: which model replica serves a request.

Every policy ranks ALL live replicas, best first, so the caller can fall back down the list when
the first choice is full or fails. Policies are plain Python (no Ray): the Ray adapter
(`ray_router.py`) and the scheduler deployment feed them `ReplicaState`s and report decisions.

Policies (config `scheduler.routing_policy`):
- round_robin:   rotate; ignores load and cache.
- least_loaded:  fewest outstanding tokens (prompt tokens still to prefill + tokens still to decode),
                 ties shared out in turn.
- power_of_two:  two random replicas, the less loaded first (cheap, no herding on stale loads).
- cache_aware:   approximate radix tree of what was routed where (`PrefixTree`), scored by cost.

The cache-aware policy (learnt from SGLang's model gateway and Ray's PrefixCacheAffinityRouter,
which both switch between "follow the cache" and "balance load" with two thresholds) ranks
replicas by one estimated cost, in tokens of work ahead of the request's first token:

    cost(r) = outstanding_tokens(r) + prefill_weight * (len(prompt) - cached_prefix(r))

A cache hit is worth the prefill it saves, and a backlog costs what it delays. So a
request follows its cached prefix while that replica's extra backlog is smaller than the prefill
it saves, and spills to a cold replica (warming it) once the backlog is larger: hot prefixes
replicate themselves across as many replicas as their load needs, with no imbalance threshold to
tune. When no replica holds at least `min_match_ratio` of the prompt, the cache is ignored and the
least-loaded replica wins, ties going to the replica with the smallest tree (most free cache).

`prefill_weight` (default 4) prices a prefill token above a queued token: outstanding decode
tokens drain a whole batch per step, and a spill also costs the evictions it causes in the cold
replica's cache. In bench/routing.py (4 saturated replicas) weight 1 spilled often: hit rate 76%
and 1.83x round_robin's throughput, against 90% and 2.85x with weight 4 (bench/results/routing.md);
in a sweep on the same workload, weights 4 to 64 performed alike. Set
`max_tree_tokens_per_replica` to about the replica's KV cache size (max_total_tokens).

Sessions: a request with `session_id` goes first to the replica that served that session before,
in every policy, unless that replica is gone (the /run interpreter keeps one program's KV state
on one replica). Session entries are bounded (LRU).
"""

from __future__ import annotations

import itertools
import operator
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from app.prefix_tree import PrefixTree


@dataclass
class ReplicaState:
    """What the router knows about one live replica's load (from its published stats plus what
    the router sent it since)."""

    replica_id: str
    outstanding_tokens: int = 0  # prompt tokens not yet prefilled + tokens still to decode
    running: int = 0
    waiting: int = 0


@runtime_checkable
class RoutingPolicy(Protocol):
    name: str

    def choose(
        self, token_ids: list[int], replicas: list[ReplicaState], session_id: str | None = None
    ) -> list[str]:
        """Rank the given live replicas, best first. Empty only when `replicas` is empty."""
        ...

    def on_routed(self, replica_id: str, token_ids: list[int], session_id: str | None = None) -> None:
        """The request was sent to `replica_id` (the one actually used, after any fallback)."""
        ...

    def on_replicas_changed(self, live_ids: set[str]) -> None:
        """The set of live replicas changed: forget the state of those that are gone."""
        ...

    def stats(self) -> dict[str, Any]: ...

    def uncached_tokens(self, replica_id: str, token_ids: list[int]) -> int:
        """Prompt tokens the replica would prefill, as far as the policy knows."""
        ...


def _load_key(replica: ReplicaState) -> tuple[int, int]:
    return (replica.outstanding_tokens, replica.running + replica.waiting)


_outstanding = operator.attrgetter("outstanding_tokens")


class _SessionAffinity:
    """session_id -> replica_id, bounded LRU. Shared behaviour of every policy."""

    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self._replica_of: OrderedDict[str, str] = OrderedDict()

    def lookup(self, session_id: str | None, replicas: list[ReplicaState]) -> str | None:
        if session_id is None:
            return None
        replica_id = self._replica_of.get(session_id)
        if replica_id is None or not any(r.replica_id == replica_id for r in replicas):
            return None
        self._replica_of.move_to_end(session_id)
        return replica_id

    def record(self, session_id: str | None, replica_id: str) -> None:
        if session_id is None:
            return
        self._replica_of[session_id] = replica_id
        self._replica_of.move_to_end(session_id)
        while len(self._replica_of) > self.max_sessions:
            self._replica_of.popitem(last=False)

    def forget_replicas_not_in(self, live_ids: set[str]) -> None:
        dead = [s for s, r in self._replica_of.items() if r not in live_ids]
        for session_id in dead:
            del self._replica_of[session_id]

    def __len__(self) -> int:
        return len(self._replica_of)


class _BasePolicy:
    """Session stickiness around a policy-specific `_rank`."""

    name = "base"

    def __init__(self, max_sessions: int = 100_000, seed: int | None = None) -> None:
        self._sessions = _SessionAffinity(max_sessions)
        self._random = random.Random(seed)

    def choose(
        self, token_ids: list[int], replicas: list[ReplicaState], session_id: str | None = None
    ) -> list[str]:
        if not replicas:
            return []
        ranking = self._rank(token_ids, replicas)
        sticky = self._sessions.lookup(session_id, replicas)
        if sticky is not None and ranking[0] != sticky:
            ranking.remove(sticky)
            ranking.insert(0, sticky)
        return ranking

    def on_routed(self, replica_id: str, token_ids: list[int], session_id: str | None = None) -> None:
        self._sessions.record(session_id, replica_id)

    def on_replicas_changed(self, live_ids: set[str]) -> None:
        self._sessions.forget_replicas_not_in(live_ids)

    def stats(self) -> dict[str, Any]:
        return {"policy": self.name, "sessions": len(self._sessions)}

    def uncached_tokens(self, replica_id: str, token_ids: list[int]) -> int:
        """Prompt tokens `replica_id` would have to prefill, as far as the policy knows (call
        before `on_routed`). Used to estimate the load a routed request adds."""
        return len(token_ids)

    def _rank(self, token_ids: list[int], replicas: list[ReplicaState]) -> list[str]:
        raise NotImplementedError


class RoundRobinPolicy(_BasePolicy):
    name = "round_robin"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._counter = itertools.count()

    def _rank(self, token_ids: list[int], replicas: list[ReplicaState]) -> list[str]:
        ids = sorted(r.replica_id for r in replicas)  # a stable order, whatever the caller's
        start = next(self._counter) % len(ids)
        return ids[start:] + ids[:start]


class LeastLoadedPolicy(_BasePolicy):
    name = "least_loaded"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._counter = itertools.count()

    def _rotated(self, replicas: list[ReplicaState]) -> list[ReplicaState]:
        """The replicas from a moving start, so that a stable sort shares ties out in turn."""
        k = next(self._counter) % len(replicas)
        return replicas[k:] + replicas[:k]

    def _rank(self, token_ids: list[int], replicas: list[ReplicaState]) -> list[str]:
        return [r.replica_id for r in sorted(self._rotated(replicas), key=_outstanding)]


class PowerOfTwoPolicy(LeastLoadedPolicy):
    name = "power_of_two"

    def _rank(self, token_ids: list[int], replicas: list[ReplicaState]) -> list[str]:
        if len(replicas) == 1:
            return [replicas[0].replica_id]
        i, j = self._random.sample(range(len(replicas)), 2)
        a, b = replicas[i], replicas[j]
        if _load_key(b) < _load_key(a):
            a, b = b, a
        # Fallbacks in turn (rotated), so that two full picks do not always spill to one replica.
        rest = [r.replica_id for r in self._rotated(replicas) if r is not a and r is not b]
        return [a.replica_id, b.replica_id] + rest


class CacheAwarePolicy(_BasePolicy):
    """Cost-ranked cache affinity; see the module docstring for the rule."""

    name = "cache_aware"

    def __init__(
        self,
        *,
        max_tree_tokens_per_replica: int = 1 << 20,
        min_match_ratio: float = 0.1,
        prefill_weight: float = 4.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= min_match_ratio <= 1.0:
            raise ValueError(f"min_match_ratio must be in [0, 1], got {min_match_ratio}")
        if prefill_weight < 0:
            raise ValueError(f"prefill_weight must be >= 0, got {prefill_weight}")
        self.tree = PrefixTree(max_tree_tokens_per_replica)
        self.min_match_ratio = min_match_ratio
        self.prefill_weight = prefill_weight
        self._counter = itertools.count()
        self.cache_routed = 0  # decisions where the cache term was used
        self.load_routed = 0  # decisions that fell back to pure load
        # The last prompt's match lengths, until the tree changes: a decision ranks the replicas
        # (`choose`) and then prices the chosen one (`uncached_tokens`) from the same walk.
        self._memo: tuple[list[int], int, dict[str, int]] | None = None
        self._tree_changes = 0

    def _match(self, token_ids: list[int]) -> dict[str, int]:
        memo = self._memo
        if memo is not None and memo[0] is token_ids and memo[1] == self._tree_changes:
            return memo[2]
        matches = self.tree.match(token_ids) if token_ids else {}
        self._memo = (token_ids, self._tree_changes, matches)
        return matches

    def _rank(self, token_ids: list[int], replicas: list[ReplicaState]) -> list[str]:
        # Hot path (<= 50 us at 64 replicas): one comprehension and a C-level sort.
        n = len(token_ids)
        matches = self._match(token_ids)
        best = max(matches.values()) if matches else 0
        if best == 0 or best < self.min_match_ratio * n:
            # No useful cache anywhere: least loaded, ties to the smallest tree (most free cache),
            # then in turn (rotated start, stable sort) so that idle replicas share cold work.
            self.load_routed += 1
            tokens_of = self.tree.tokens_of
            ordered = self._rotated(replicas)
            ordered.sort(key=lambda r: (r.outstanding_tokens, tokens_of(r.replica_id)))
            return [r.replica_id for r in ordered]
        # cost = load + weight * (n - match); the constant weight * n does not change the order.
        self.cache_routed += 1
        weight = self.prefill_weight
        get = matches.get
        scores = [r.outstanding_tokens - weight * get(r.replica_id, 0) for r in replicas]
        order = sorted(range(len(replicas)), key=scores.__getitem__)
        return [replicas[k].replica_id for k in order]

    def _rotated(self, replicas: list[ReplicaState]) -> list[ReplicaState]:
        k = next(self._counter) % len(replicas)
        return replicas[k:] + replicas[:k]

    def on_routed(self, replica_id: str, token_ids: list[int], session_id: str | None = None) -> None:
        super().on_routed(replica_id, token_ids, session_id)
        self.tree.insert(replica_id, token_ids)
        self._tree_changes += 1

    def uncached_tokens(self, replica_id: str, token_ids: list[int]) -> int:
        return len(token_ids) - self._match(token_ids).get(replica_id, 0)

    def on_replicas_changed(self, live_ids: set[str]) -> None:
        super().on_replicas_changed(live_ids)
        for replica_id in self.tree.replicas() - live_ids:
            self.tree.remove_replica(replica_id)
        self._tree_changes += 1

    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "cache_routed": self.cache_routed,
            "load_routed": self.load_routed,
            "tree": self.tree.stats(),
        }


POLICIES: dict[str, type[_BasePolicy]] = {
    cls.name: cls for cls in (RoundRobinPolicy, LeastLoadedPolicy, PowerOfTwoPolicy, CacheAwarePolicy)
}


def make_policy(name: str, **kwargs: Any) -> RoutingPolicy:
    """Build a policy by its config name; unknown names and bad kwargs raise ValueError."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {sorted(POLICIES)}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"bad options for routing policy {name!r}: {exc}") from exc
