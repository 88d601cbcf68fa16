"""Routing policies and the shared prefix tree, on crafted prefixes."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from app.prefix_tree import PrefixTree
from app.scheduler.routing import CacheAwarePolicy, ReplicaState, make_policy

SYSTEM_A = list(range(1000, 1400))  # two 400-token "system prompts" sharing nothing
SYSTEM_B = list(range(5000, 5400))


def replicas(*loads: int) -> list[ReplicaState]:
    return [ReplicaState(f"r{i}", outstanding_tokens=load) for i, load in enumerate(loads)]


# --- prefix tree ---------------------------------------------------------------------------------


def test_tree_reports_the_longest_match_per_replica() -> None:
    tree = PrefixTree()
    tree.insert("r0", [1, 2, 3, 4, 5, 6])
    tree.insert("r1", [1, 2, 3, 9, 9])
    tree.insert("r2", [7, 7])
    assert tree.match([1, 2, 3, 4, 5, 6, 7]) == {"r0": 6, "r1": 3}
    assert tree.match([1, 2, 3, 9]) == {"r0": 3, "r1": 4}
    assert tree.match([1, 2, 8]) == {"r0": 2, "r1": 2}
    assert tree.match([8]) == {}
    assert tree.match([]) == {}
    tree.check_invariants()


def test_tree_evicts_least_recently_used_prefixes_within_the_budget() -> None:
    tree = PrefixTree(max_tokens_per_replica=100)
    tree.insert("r0", [1] + list(range(10, 70)))  # 61 tokens
    tree.insert("r0", [2] + list(range(10, 40)))  # 31 tokens: 92 in all
    tree.insert("r0", [1] + list(range(10, 20)))  # touch the first path's head
    tree.insert("r0", [3] + list(range(10, 30)))  # 21 more: over budget, evict the LRU leaf
    assert tree.tokens_of("r0") <= 100
    match = tree.match([1] + list(range(10, 70)))["r0"]
    assert 11 <= match < 61, "the old tail of path 1 went first, its recently used head stayed"
    assert tree.match([3] + list(range(10, 30))) == {"r0": 21}
    tree.check_invariants()


def test_tree_invariants_hold_under_random_inserts_and_removals() -> None:
    rng = random.Random(7)
    tree = PrefixTree(max_tokens_per_replica=500)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 120))] for _ in range(30)]
    for step in range(600):
        replica = f"r{rng.randrange(6)}"
        base = rng.choice(prefixes)
        tree.insert(replica, base[: rng.randrange(1, len(base) + 1)] + [rng.randrange(50)])
        if step % 97 == 0:
            tree.remove_replica(f"r{rng.randrange(6)}")
        if step % 50 == 0:
            tree.check_invariants()
    tree.check_invariants()


def test_removing_a_replica_forgets_it_and_keeps_the_others() -> None:
    tree = PrefixTree()
    tree.insert("r0", SYSTEM_A)
    tree.insert("r1", SYSTEM_A[:200])
    tree.remove_replica("r0")
    assert tree.match(SYSTEM_A) == {"r1": 200}
    assert tree.replicas() == {"r1"}
    tree.check_invariants()


# --- policies ------------------------------------------------------------------------------------


def test_cache_aware_follows_the_replica_that_holds_the_prefix() -> None:
    policy = make_policy("cache_aware")
    policy.on_routed("r2", SYSTEM_A + [1, 2, 3])
    policy.on_routed("r0", SYSTEM_B + [4])
    assert policy.choose(SYSTEM_A + [9, 9], replicas(0, 0, 0, 0))[0] == "r2"
    assert policy.choose(SYSTEM_B + [8], replicas(0, 0, 0, 0))[0] == "r0"


def test_cache_aware_spills_when_the_backlog_outweighs_the_saved_prefill() -> None:
    policy = make_policy("cache_aware", prefill_weight=1.0)
    policy.on_routed("r1", SYSTEM_A)
    prompt = SYSTEM_A + [7] * 10  # 410 tokens, 400 cached on r1
    # r1 is 300 tokens busier than r0: still cheaper than prefilling 400 tokens elsewhere.
    assert policy.choose(prompt, replicas(100, 400))[0] == "r1"
    # 1000 tokens busier: the idle replica wins and gets warmed.
    assert policy.choose(prompt, replicas(100, 1100))[0] == "r0"


def test_cache_aware_without_a_useful_match_picks_the_least_loaded() -> None:
    policy = make_policy("cache_aware", min_match_ratio=0.5)
    policy.on_routed("r0", SYSTEM_A[:50])
    ranking = policy.choose(SYSTEM_A, replicas(500, 10, 300))  # r0 holds 50/400 < 50%
    assert ranking == ["r1", "r2", "r0"]


def test_cold_prefixes_spread_over_idle_replicas_then_stick() -> None:
    policy = make_policy("cache_aware", seed=1)
    states = replicas(0, 0, 0, 0)
    owners = {}
    for k in range(8):
        prompt = [k * 10_000 + i for i in range(300)]
        chosen = policy.choose(prompt, states)[0]
        policy.on_routed(chosen, prompt)
        owners[k] = chosen
        next(s for s in states if s.replica_id == chosen).outstanding_tokens += 300
    assert Counter(owners.values()) == Counter({"r0": 2, "r1": 2, "r2": 2, "r3": 2})
    for s in states:
        s.outstanding_tokens = 0
    for k, owner in owners.items():
        assert policy.choose([k * 10_000 + i for i in range(300)] + [1], states)[0] == owner


def test_sessions_stick_to_their_replica_until_it_is_gone() -> None:
    for name in ("round_robin", "least_loaded", "power_of_two", "cache_aware"):
        policy = make_policy(name)
        policy.on_routed("r3", [1, 2], session_id="prog-1")
        for _ in range(5):
            assert policy.choose([5, 6], replicas(0, 0, 0, 9999), session_id="prog-1")[0] == "r3", name
        policy.on_replicas_changed({"r0", "r1", "r2"})
        ranking = policy.choose([5, 6], replicas(0, 0, 0), session_id="prog-1")
        assert "r3" not in ranking and len(ranking) == 3, name


def test_replica_join_and_leave_are_reflected_at_once() -> None:
    policy = make_policy("cache_aware")
    policy.on_routed("r0", SYSTEM_A)
    policy.on_replicas_changed({"r1", "r2"})  # r0 died
    assert policy.tree.match(SYSTEM_A) == {}
    ranking = policy.choose(SYSTEM_A, [ReplicaState("r1", 50), ReplicaState("r2", 0)])
    assert ranking == ["r2", "r1"]
    joined = [ReplicaState("r1", 50), ReplicaState("r2", 40), ReplicaState("r9", 0)]
    assert policy.choose(SYSTEM_B, joined)[0] == "r9"  # a new replica takes work at once


def test_round_robin_rotates_over_every_replica() -> None:
    policy = make_policy("round_robin")
    firsts = [policy.choose([1], replicas(0, 0, 0))[0] for _ in range(6)]
    assert firsts == ["r0", "r1", "r2", "r0", "r1", "r2"]


def test_least_loaded_ranks_by_outstanding_tokens() -> None:
    policy = make_policy("least_loaded")
    assert policy.choose([1], replicas(30, 10, 20)) == ["r1", "r2", "r0"]


def test_power_of_two_never_ranks_the_busier_of_its_pair_first() -> None:
    policy = make_policy("power_of_two", seed=3)
    states = replicas(0, 1000, 1000, 1000)
    firsts = Counter(policy.choose([1], states)[0] for _ in range(400))
    # r0 wins whenever it is sampled (~half the time); never is a busy replica preferred over it.
    assert 150 <= firsts["r0"] <= 250
    assert all(len(policy.choose([1], states)) == 4 for _ in range(10))


def test_every_policy_ranks_all_replicas_and_none_on_empty() -> None:
    for name in ("round_robin", "least_loaded", "power_of_two", "cache_aware"):
        policy = make_policy(name)
        assert sorted(policy.choose([1, 2, 3], replicas(5, 1, 3))) == ["r0", "r1", "r2"]
        assert policy.choose([1, 2, 3], []) == []


def test_unknown_policy_or_option_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown routing policy 'fastest'"):
        make_policy("fastest")
    with pytest.raises(ValueError, match="bad options"):
        make_policy("round_robin", threshold=3)
    with pytest.raises(ValueError, match="min_match_ratio"):
        CacheAwarePolicy(min_match_ratio=2.0)
