"""An approximate radix tree of the prompt prefixes each replica has recently served.

The router cannot see a replica's KV cache; it remembers what it sent where. One tree over token
ids is shared by all replicas (as in SGLang's model gateway), and every node records the set of
replicas believed to hold the node's whole path. One walk down the tree therefore yields the match
length of every replica at once, which keeps a routing decision cheap at 64 replicas.

Invariants (checked by the tests):
- Subset: a child's replica set is a subset of its parent's (a replica holding a path holds all
  its prefixes). So a walk can stop as soon as a set is empty, and per-replica match lengths come
  from set differences along the path.
- Recency: in each replica's LRU order an ancestor is never older than any of its descendants
  (paths are touched deepest-first, split nodes are appended as newest). So the least recently
  used node of a replica is always a leaf for that replica, and evicting it keeps the subset
  invariant.
- Budget: the tokens a replica holds (the sum of the key lengths of its nodes) never exceed
  `max_tokens_per_replica` after an insert; the excess is evicted LRU-first at once.

Approximate, on purpose: the replica may have evicted a prefix the tree still lists (or kept one
the tree dropped); routing stays correct either way, only the cache hit rate moves.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class _Node:
    __slots__ = ("key", "children", "parent", "replicas")

    def __init__(self, key: list[int], parent: "_Node | None") -> None:
        self.key = key  # the token ids on the edge from the parent to this node
        self.children: dict[int, _Node] = {}  # first token of the child's key -> child
        self.parent = parent
        self.replicas: set[str] = set()  # replicas believed to cache root..this node


def _common_prefix_len(key: list[int], tokens: Sequence[int], start: int) -> int:
    """Length of the common prefix of `key` and `tokens[start:]`, by binary search over slice
    comparisons (C speed) rather than a Python loop over tokens."""
    lo, hi = 0, min(len(key), len(tokens) - start)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if key[:mid] == tokens[start : start + mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixTree:
    """Shared radix tree: which replica recently served which token prefix, bounded per replica."""

    def __init__(self, max_tokens_per_replica: int = 1 << 20) -> None:
        if max_tokens_per_replica <= 0:
            raise ValueError(f"max_tokens_per_replica must be > 0, got {max_tokens_per_replica}")
        self.max_tokens_per_replica = max_tokens_per_replica
        self._root = _Node([], None)
        self._lru: dict[str, OrderedDict[_Node, None]] = {}  # oldest first
        self._tokens: dict[str, int] = {}
        self.evicted_tokens = 0

    # --- queries -----------------------------------------------------------------------------

    def match(self, tokens: Sequence[int]) -> dict[str, int]:
        """Longest cached prefix of `tokens`, per replica that holds any: replica_id -> tokens."""
        if not isinstance(tokens, list):
            tokens = list(tokens)
        path: list[tuple[_Node, int]] = []  # (node, prompt tokens matched up to its end)
        node, i, n = self._root, 0, len(tokens)
        while i < n:
            child = node.children.get(tokens[i])
            if child is None:
                break
            k = len(child.key)
            if tokens[i : i + k] == child.key:
                i += k
                path.append((child, i))
                node = child
                continue
            path.append((child, i + _common_prefix_len(child.key, tokens, i)))
            break
        result: dict[str, int] = {}
        for node, length in reversed(path):  # deepest first: the first time we see r is its best
            for replica in node.replicas:
                if replica not in result:
                    result[replica] = length
        return result

    def tokens_of(self, replica_id: str) -> int:
        return self._tokens.get(replica_id, 0)

    def replicas(self) -> set[str]:
        return set(self._tokens)

    def stats(self) -> dict[str, object]:
        return {
            "tokens_per_replica": dict(self._tokens),
            "total_tokens": sum(self._tokens.values()),
            "evicted_tokens": self.evicted_tokens,
        }

    # --- updates -----------------------------------------------------------------------------

    def insert(self, replica_id: str, tokens: Sequence[int]) -> None:
        """Record that `replica_id` now caches `tokens` (and so all its prefixes)."""
        if not tokens:
            return
        tokens = list(tokens[: self.max_tokens_per_replica])
        lru = self._lru.setdefault(replica_id, OrderedDict())
        self._tokens.setdefault(replica_id, 0)
        path: list[_Node] = []
        node, i, n = self._root, 0, len(tokens)
        while i < n:
            child = node.children.get(tokens[i])
            if child is None:
                child = _Node(tokens[i:], node)
                node.children[tokens[i]] = child
                i = n
            else:
                k = len(child.key)
                if tokens[i : i + k] != child.key:
                    child = self._split(child, _common_prefix_len(child.key, tokens, i))
                i += len(child.key)
            if replica_id not in child.replicas:
                child.replicas.add(replica_id)
                self._tokens[replica_id] += len(child.key)
            path.append(child)
            node = child
        for node in reversed(path):  # deepest first, so ancestors end up newer (recency invariant)
            lru[node] = None
            lru.move_to_end(node)
        self._evict(replica_id)

    def remove_replica(self, replica_id: str) -> None:
        """Forget everything about a replica (it died or was scaled down)."""
        lru = self._lru.pop(replica_id, None)
        self._tokens.pop(replica_id, None)
        if lru is None:
            return
        for node in lru:  # oldest first = descendants before ancestors
            node.replicas.discard(replica_id)
            if not node.replicas:
                self._unlink(node)

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut `node`'s key at `at`; return the new upper node, which inherits the replica set."""
        assert 0 < at < len(node.key), f"split at {at} of a {len(node.key)}-token key"
        parent = node.parent
        assert parent is not None
        upper = _Node(node.key[:at], parent)
        upper.replicas = set(node.replicas)
        parent.children[upper.key[0]] = upper
        node.key = node.key[at:]
        node.parent = upper
        upper.children[node.key[0]] = node
        # Recency invariant: `upper` must be newer than `node` yet older than its own ancestors,
        # so append it and then re-touch its ancestors (approximate recency, exact invariant).
        ancestors: list[_Node] = [upper]
        above = parent
        while above is not None and above is not self._root:
            ancestors.append(above)
            above = above.parent
        for replica in upper.replicas:
            lru = self._lru[replica]
            for each in ancestors:
                lru[each] = None
                lru.move_to_end(each)
        return upper

    def _evict(self, replica_id: str) -> None:
        lru = self._lru[replica_id]
        while self._tokens[replica_id] > self.max_tokens_per_replica and lru:
            node, _ = lru.popitem(last=False)
            node.replicas.discard(replica_id)
            self._tokens[replica_id] -= len(node.key)
            self.evicted_tokens += len(node.key)
            if not node.replicas:
                self._unlink(node)

    def _unlink(self, node: _Node) -> None:
        assert not node.children, "a node with no replicas must have no children (subset invariant)"
        parent = node.parent
        if parent is not None and parent.children.get(node.key[0]) is node:
            del parent.children[node.key[0]]
        node.parent = None

    # --- for tests -----------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Assert the subset, recency and budget invariants (O(tree size); tests only)."""
        counted: dict[str, int] = {}
        stack = [self._root]
        while stack:
            node = stack.pop()
            for child in node.children.values():
                assert child.parent is node, "child's parent link is wrong"
                assert child.replicas, "empty node left in the tree"
                assert child.replicas <= (node.replicas if node is not self._root else child.replicas), (
                    "subset invariant broken"
                )
                for r in child.replicas:
                    counted[r] = counted.get(r, 0) + len(child.key)
                stack.append(child)
        for replica, tokens in self._tokens.items():
            assert counted.get(replica, 0) == tokens, f"token count of {replica} is off"
            assert tokens <= self.max_tokens_per_replica, f"{replica} over budget"
            position = {node: i for i, node in enumerate(self._lru[replica])}
            for node, i in position.items():
                parent = node.parent
                if parent is not None and parent is not self._root:
                    assert position[parent] > i, "an ancestor is older than its descendant"
