"""Token-granular paged KV storage (page size 1, like SGLang's `token_to_kv_pool`).

Two pools:

- `KVPool`: one tensor `[layers, 2, capacity, kv_heads, head_dim]` holding the keys (index 0) and
  values (index 1) of every cached token of every sequence. A token's KV lives in one *slot*; a
  sequence owns a list of slot indices, not a contiguous range, so any free slot serves any
  sequence (no fragmentation) and two sequences that share a prefix share its slots (no copy).
  Slot 0 is reserved as a harmless padding target for batched gathers and is never handed out.
- `ReqToTokenPool`: a `[max_running_requests, context_len]` table mapping (request row, position)
  to the KV slot. With it, the decode attention of a whole batch gathers its keys with one index
  operation (`kv[slots_table[rows, :max_len]]`) instead of concatenating per-request lists.

Capacity rule when `max_total_tokens` is not set: on CUDA, `mem_fraction_static` (default 0.85) of
the GPU memory minus the weights, divided by the bytes one token's KV needs, capped at
`max_running_requests * context_len` (more could never be used). On CPU, an eighth of the
currently available RAM (from /proc/meminfo), capped at `CPU_MAX_CONTEXTS * context_len`: CPU
replicas share the host's RAM with each other, serve few long sequences, and the pool is zeroed
(committed) up front. Both are floored at one context length.
"""

from __future__ import annotations

import torch


CPU_MAX_CONTEXTS = 16


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    element_size = torch.empty((), dtype=dtype).element_size()
    return num_layers * 2 * kv_heads * head_dim * element_size


def _available_cpu_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 1024**3  # conservative guess where /proc is missing


def default_capacity_tokens(
    *,
    bytes_per_token: int,
    device: torch.device,
    weight_bytes: int,
    mem_fraction_static: float | None,
    max_running_requests: int,
    context_len: int,
) -> int:
    """The KV capacity in tokens when the settings leave `max_total_tokens` unset (rule above)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        budget = int(total * (mem_fraction_static or 0.85)) - weight_bytes
        cap = max_running_requests * context_len
    else:
        budget = _available_cpu_bytes() // 8
        cap = min(max_running_requests, CPU_MAX_CONTEXTS) * context_len
    tokens = max(budget, 0) // bytes_per_token
    return int(max(context_len, min(tokens, cap)))


class KVPool:
    """KV slots for every layer plus a free-list allocator of slot indices."""

    def __init__(
        self,
        *,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        assert capacity > 0, f"KV capacity must be positive, got {capacity}"
        self.capacity = capacity
        self.device = device
        # +1: slot 0 is the padding slot and never allocated.
        self.kv = torch.zeros(
            (num_layers, 2, capacity + 1, kv_heads, head_dim), dtype=dtype, device=device
        )
        self._free = torch.arange(1, capacity + 1, dtype=torch.int64, device=device)

    @property
    def num_free(self) -> int:
        return int(self._free.numel())

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    def alloc(self, n: int) -> torch.Tensor | None:
        """n free slot indices, or None if fewer than n are free (nothing is taken then)."""
        if n > self._free.numel():
            return None
        slots, self._free = self._free[:n], self._free[n:]
        return slots

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self._free = torch.cat((self._free, slots))
        assert self._free.numel() <= self.capacity, (
            f"freed more slots than exist ({self._free.numel()} > {self.capacity}): a double free"
        )

    def keys(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 0]

    def values(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 1]


class ReqToTokenPool:
    """Rows of per-request KV slot indices; a request holds one row while it is running."""

    def __init__(self, *, max_requests: int, context_len: int, device: torch.device) -> None:
        self.table = torch.zeros((max_requests, context_len), dtype=torch.int64, device=device)
        self._free_rows = list(range(max_requests - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def free(self, row: int) -> None:
        assert row not in self._free_rows, f"request row {row} freed twice"
        self._free_rows.append(row)
