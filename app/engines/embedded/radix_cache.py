"""Radix-tree prefix cache over token ids (SGLang's RadixAttention idea, page size 1).

Each edge of the tree carries a run of token ids (`key`) and the KV slots that hold their keys and
values (`value`, same length). A prompt whose beginning is already in the tree reuses those slots
directly (no copy, no recompute): `match_prefix` returns them and the deepest matched node.

Ownership and reference counts:
- Slots inside the tree belong to the tree. A running request that uses a matched prefix `lock`s its
  node (which protects the whole path to the root); `unlock` when done. Only unlocked nodes may be
  evicted.
- Slots a request allocated itself belong to the request until it `insert`s them: `insert` returns
  how many leading tokens were already present; the caller frees its own duplicate slots for those
  positions (the tree keeps its copies) and the tree takes the rest.
- `evictable_size + protected_size` always equals the number of slots the tree holds; both are kept
  as explicit counters and checked with asserts.

Eviction is LRU over unlocked leaves (a leaf's parent becomes a candidate once its last child goes).
When disabled, the cache matches nothing and `insert` reports every token as a duplicate, so callers
run the same code path and simply free everything.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import torch

from app.engines.embedded.kv_pool import KVPool

_clock = itertools.count()  # a logical clock: strictly increasing access stamps (no ties)


@dataclass(eq=False)
class TreeNode:
    key: list[int] = field(default_factory=list)
    value: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    parent: "TreeNode | None" = None
    children: dict[int, "TreeNode"] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = field(default_factory=lambda: next(_clock))

    def touch(self) -> None:
        self.last_access = next(_clock)

    def __lt__(self, other: "TreeNode") -> bool:  # for the eviction heap
        return self.last_access < other.last_access


@dataclass
class MatchResult:
    slots: torch.Tensor  # KV slots of the matched prefix, in order
    node: TreeNode  # the deepest node of the match: lock it while the slots are in use

    @property
    def length(self) -> int:
        return int(self.slots.numel())


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RadixCache:
    def __init__(self, pool: KVPool, *, disabled: bool = False) -> None:
        self.pool = pool
        self.disabled = disabled
        self.root = TreeNode()
        self.root.lock_ref = 1  # the root is never evicted
        self.evictable_size = 0
        self.protected_size = 0
        self.hit_tokens = 0
        self.query_tokens = 0

    # ---- lookup -------------------------------------------------------------------------------
    def match_prefix(self, ids: list[int], *, count: bool = True) -> MatchResult:
        """The longest cached prefix of `ids` (splitting an edge where the match ends inside it)."""
        if count:
            self.query_tokens += len(ids)
        if self.disabled or not ids:
            return MatchResult(torch.empty(0, dtype=torch.int64), self.root)
        node = self.root
        node.touch()
        pieces: list[torch.Tensor] = []
        pos = 0
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None:
                break
            matched = _common_prefix_len(child.key, ids[pos:])
            if matched < len(child.key):
                child = self._split(child, matched)
            child.touch()
            pieces.append(child.value)
            pos += matched
            node = child
        slots = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)
        if count:
            self.hit_tokens += int(slots.numel())
        return MatchResult(slots, node)

    def _split(self, child: TreeNode, at: int) -> TreeNode:
        """Cut `child`'s edge after `at` tokens; return the new upper node."""
        upper = TreeNode(
            key=child.key[:at],
            value=child.value[:at],
            parent=child.parent,
            lock_ref=child.lock_ref,  # every lock through child also runs through upper
        )
        assert child.parent is not None, "the root has no edge to split"
        child.parent.children[upper.key[0]] = upper
        child.key, child.value = child.key[at:], child.value[at:]
        child.parent = upper
        upper.children[child.key[0]] = child
        return upper

    # ---- insertion ----------------------------------------------------------------------------
    def insert(self, ids: list[int], slots: torch.Tensor) -> int:
        """Cache `ids` -> `slots`; return how many leading tokens were already cached.

        The caller still owns its slots for those leading positions (duplicates of the tree's) and
        must free the ones it allocated itself; the tree owns `slots[returned:]` from now on.
        """
        assert len(ids) == slots.numel(), f"{len(ids)} token ids but {slots.numel()} slots"
        if self.disabled:
            return len(ids)
        node = self.root
        node.touch()
        pos = 0
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None:
                new = TreeNode(key=list(ids[pos:]), value=slots[pos:].clone(), parent=node)
                node.children[ids[pos]] = new
                self.evictable_size += len(new.key)
                return pos
            matched = _common_prefix_len(child.key, ids[pos:])
            if matched < len(child.key):
                child = self._split(child, matched)
            child.touch()
            pos += matched
            node = child
        return pos

    # ---- reference counts ---------------------------------------------------------------------
    def lock(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
            node.lock_ref += 1
            assert node.parent is not None
            node = node.parent
        self._check_sizes()

    def unlock(self, node: TreeNode) -> None:
        while node is not self.root:
            assert node.lock_ref > 0, "unlock without a matching lock (reference count below 0)"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable_size += len(node.key)
                self.protected_size -= len(node.key)
            assert node.parent is not None
            node = node.parent
        self._check_sizes()

    def _check_sizes(self) -> None:
        assert self.evictable_size >= 0, f"evictable size went negative ({self.evictable_size})"
        assert self.protected_size >= 0, f"protected size went negative ({self.protected_size})"

    # ---- eviction -----------------------------------------------------------------------------
    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` slots from unlocked leaves, oldest first; return how many."""
        if num_tokens <= 0 or self.evictable_size == 0:
            return 0
        leaves = [n for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_tokens and leaves:
            leaf = heapq.heappop(leaves)
            freed += self._delete_leaf(leaf)
            parent = leaf.parent
            if parent is not None and parent is not self.root and not parent.children \
                    and parent.lock_ref == 0:
                heapq.heappush(leaves, parent)
        return freed

    def _delete_leaf(self, leaf: TreeNode) -> int:
        assert leaf.lock_ref == 0 and not leaf.children, "only unlocked leaves can be evicted"
        assert leaf.parent is not None
        del leaf.parent.children[leaf.key[0]]
        self.pool.free(leaf.value)
        self.evictable_size -= len(leaf.key)
        self._check_sizes()
        return len(leaf.key)

    def flush(self) -> int:
        """Evict every unlocked node (locked paths stay); return how many slots were freed."""
        return self.evict(self.evictable_size)

    def _nodes(self) -> list[TreeNode]:
        out: list[TreeNode] = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.protected_size

    def check_invariants(self) -> None:
        """Recount the tree and compare with the counters (used by tests)."""
        nodes = self._nodes()
        evictable = sum(len(n.key) for n in nodes if n.lock_ref == 0)
        protected = sum(len(n.key) for n in nodes if n.lock_ref > 0)
        assert evictable == self.evictable_size, (
            f"evictable counter {self.evictable_size} != tree's unlocked tokens {evictable}"
        )
        assert protected == self.protected_size, (
            f"protected counter {self.protected_size} != tree's locked tokens {protected}"
        )
        for n in nodes:
            assert len(n.key) == n.value.numel() > 0, "every edge has as many slots as tokens"
            assert n.parent is not None and n.parent.lock_ref >= n.lock_ref or n.parent is self.root, (
                "a node is locked at most as often as its parent"
            )
