"""Specification of the radix prefix cache and the KV pool (no model needed)."""

from __future__ import annotations

import torch

from app.engines.embedded.kv_pool import KVPool
from app.engines.embedded.radix_cache import RadixCache


def make(capacity: int = 64, disabled: bool = False) -> tuple[KVPool, RadixCache]:
    pool = KVPool(num_layers=1, kv_heads=1, head_dim=2, capacity=capacity, dtype=torch.float32,
                  device=torch.device("cpu"))
    return pool, RadixCache(pool, disabled=disabled)


def cache_ids(pool: KVPool, cache: RadixCache, ids: list[int]) -> torch.Tensor:
    slots = pool.alloc(len(ids))
    assert slots is not None
    present = cache.insert(ids, slots)
    pool.free(slots[:present])  # our duplicates of what the tree already held
    return slots


def test_pool_hands_out_each_slot_once_and_never_slot_zero():
    pool, _ = make(capacity=10)
    a, b = pool.alloc(6), pool.alloc(4)
    assert a is not None and b is not None
    assert sorted(torch.cat([a, b]).tolist()) == list(range(1, 11))
    assert pool.alloc(1) is None and pool.num_free == 0
    pool.free(a)
    assert pool.num_free == 6 and pool.num_used == 4


def test_match_returns_the_longest_cached_prefix_and_its_slots():
    pool, cache = make()
    slots = cache_ids(pool, cache, [1, 2, 3, 4, 5])
    m = cache.match_prefix([1, 2, 3, 9, 9])
    assert m.length == 3 and m.slots.tolist() == slots[:3].tolist()
    assert cache.match_prefix([7, 8]).length == 0
    assert cache.hit_tokens == 3 and cache.query_tokens == 7
    cache.check_invariants()


def test_insert_shares_the_common_prefix_and_reports_what_was_present():
    pool, cache = make()
    first = cache_ids(pool, cache, [1, 2, 3, 4])
    used = pool.num_used
    second = pool.alloc(5)
    assert second is not None
    present = cache.insert([1, 2, 3, 7, 8], second)
    assert present == 3  # the caller frees its 3 duplicate slots; the tree keeps [7, 8]
    pool.free(second[:3])
    assert pool.num_used == used + 2
    m = cache.match_prefix([1, 2, 3, 7, 8])
    assert m.slots.tolist() == first[:3].tolist() + second[3:].tolist()
    assert cache.total_size == 6
    cache.check_invariants()


def test_locked_prefixes_survive_eviction_and_unlocked_leaves_go_lru_first():
    pool, cache = make(capacity=12)
    cache_ids(pool, cache, [1, 2, 3, 4])  # oldest
    cache_ids(pool, cache, [5, 6, 7, 8])
    cache_ids(pool, cache, [9, 10, 11, 12])
    locked = cache.match_prefix([5, 6, 7, 8])
    cache.lock(locked.node)
    cache.match_prefix([9, 10])  # touch: now more recent than [1, 2, 3, 4]
    assert cache.protected_size == 4 and cache.evictable_size == 8
    freed = cache.evict(3)
    assert freed == 4 and pool.num_free == 4
    assert cache.match_prefix([1, 2, 3, 4]).length == 0  # the least recently used went
    assert cache.match_prefix([9, 10, 11, 12]).length == 4
    assert cache.flush() == 4  # everything unlocked goes; the locked path stays
    assert cache.match_prefix([5, 6, 7, 8]).length == 4
    cache.unlock(locked.node)
    assert cache.evictable_size == 4 and cache.protected_size == 0
    cache.check_invariants()


def test_splitting_an_edge_keeps_locks_and_counters_consistent():
    pool, cache = make()
    cache_ids(pool, cache, [1, 2, 3, 4, 5, 6])
    m = cache.match_prefix([1, 2, 3, 4, 5, 6])
    cache.lock(m.node)
    cache.match_prefix([1, 2, 3])  # splits the locked edge after 3 tokens
    cache.check_invariants()
    assert cache.evict(10) == 0  # all of it is locked
    cache.unlock(m.node)
    cache.check_invariants()
    assert cache.evict(10) == 6


def test_disabled_cache_matches_nothing_and_takes_nothing():
    pool, cache = make(disabled=True)
    slots = pool.alloc(3)
    assert slots is not None
    assert cache.insert([1, 2, 3], slots) == 3  # "all present": the caller frees them all
    assert cache.match_prefix([1, 2, 3]).length == 0
    assert cache.total_size == 0
