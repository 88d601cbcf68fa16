"""Continuous-batching scheduler: which tokens go into the next forward pass, and KV bookkeeping.

Each step builds ONE batch:
1. every running (decoding) request contributes one token; it needs one new KV slot. If the pool
   is full, unlocked cached prefixes are evicted (LRU); if that is not enough, the newest request is
   *retracted*: its KV goes back (into the radix cache, so a later re-prefill can reuse what
   survives) and it returns to the waiting queue with its generated tokens, to be re-prefilled later.
   Nothing crashes and nothing is lost.
2. prefill work is added up to `min(max_prefill_tokens, chunked_prefill_size)` tokens: first the
   partially prefilled ("chunked") request, then waiting requests in policy order (`fcfs`, or `lpm`:
   longest cached prefix first). A prompt longer than the remaining budget is cut into chunks that
   run over several steps, interleaved with the decodes, so long prompts do not stall streams.
   With `priority_scheduling`, waiting requests go by priority first (higher first), then policy.
3. a waiting request is admitted only if its remaining prompt plus a reservation for future
   decode tokens fits in free + evictable KV (`new_token_ratio`, SGLang's idea: start cautious,
   relax every step, tighten again after a retraction). Otherwise it waits.

4. with `priority_scheduling`, while a request of higher priority waits or runs, running requests
   of lower priority (batch lines) pause: they keep their KV and are left out of the step, so a
   step serving an interactive request is as short as if they were not there. When nothing of
   higher priority can make progress (it cannot be admitted yet), everything decodes as usual.

The scheduler runs only on the engine thread; nothing here is thread-safe by design.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from app.engines.embedded.kv_pool import KVPool, ReqToTokenPool
from app.engines.embedded.model_runner import ForwardBatch, PrefillSpan
from app.engines.embedded.radix_cache import RadixCache
from app.engines.embedded.request import Req

INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.15
NEW_TOKEN_RATIO_DECAY = 0.002
LPM_MAX_QUEUE = 128  # beyond this many waiting requests, lpm sorting costs more than it saves


@dataclass
class PrefillWork:
    req: Req
    start: int  # first position of this chunk in req.fill_ids
    length: int
    completes: bool  # this chunk finishes the request's prefill
    # Rows of the step's logits tensor: the chunk's last token (when it completes) and the rows
    # whose logits give input-token logprobs, with the prompt tokens they predict.
    sample_row: int = -1
    input_lp_rows: list[int] | None = None
    input_lp_targets: list[int] | None = None


@dataclass
class ScheduledBatch:
    forward: ForwardBatch
    decode_reqs: list[Req]
    prefills: list[PrefillWork]


class BatchScheduler:
    def __init__(
        self,
        *,
        kv: KVPool,
        req_to_token: ReqToTokenPool,
        cache: RadixCache,
        max_running_requests: int,
        max_prefill_tokens: int,
        chunked_prefill_size: int,
        policy: str,
        priority_scheduling: bool = True,
    ) -> None:
        self.kv = kv
        self.req_to_token = req_to_token
        self.cache = cache
        self.max_running_requests = max_running_requests
        self.prefill_budget = min(max_prefill_tokens, chunked_prefill_size)
        self.policy = policy
        self.priority_scheduling = priority_scheduling
        self.paused_steps_total = 0  # request-steps left out for a higher priority
        self.waiting: list[Req] = []
        self.running: list[Req] = []  # prefill done, decoding
        self.chunked: Req | None = None  # partially prefilled
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
        self.num_retractions = 0
        self._admit_counter = itertools.count(1)

    # ---- queue --------------------------------------------------------------------------------
    def add(self, req: Req) -> None:
        req.fill_ids = list(req.prompt_ids)
        self.waiting.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked)

    def remove(self, req: Req) -> None:
        """Take a request out wherever it is and give back its KV (abort or finish)."""
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        if self.chunked is req:
            self.chunked = None
        self._release(req)

    # ---- one step -----------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        self.new_token_ratio = max(MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)
        decode_reqs = self._prepare_decodes(self._stepping())
        prefills = self._schedule_prefills()
        if not prefills and len(decode_reqs) < len(self.running) and not self._top_is_running():
            # What the pause was for cannot start yet (no room): the paused ones go on meanwhile.
            decode_reqs += self._prepare_decodes([r for r in self.running if r not in decode_reqs])
        self.paused_steps_total += len(self.running) - len(decode_reqs)
        if not decode_reqs and not prefills:
            return None
        return self._build_batch(decode_reqs, prefills)

    def _stepping(self) -> list[Req]:
        """The running requests decoded this step: all of them, or with priority scheduling those
        of the highest priority among the running, chunked and waiting ones."""
        if not self.priority_scheduling or not self.running:
            return list(self.running)
        top = self._top_priority()
        return [r for r in self.running if r.priority >= top]

    def _top_priority(self) -> int:
        reqs = [*self.running, *self.waiting, *([self.chunked] if self.chunked else [])]
        return max(r.priority for r in reqs)

    def _top_is_running(self) -> bool:
        top = self._top_priority()
        return any(r.priority >= top for r in self.running)

    def _prepare_decodes(self, reqs: list[Req]) -> list[Req]:
        """KV slots for one decode token of each of `reqs`; when the pool is full, running requests
        are retracted, the lowest priority and then the newest first."""
        while reqs and not self._ensure_free(len(reqs)):
            victims = self.running + ([self.chunked] if self.chunked else [])
            victim = max(victims, key=lambda r: (-r.priority, r.admit_seq))
            self.retract(victim)
            reqs = [r for r in reqs if r is not victim]
        if not reqs:
            return []
        slots = self.kv.alloc(len(reqs))
        assert slots is not None, "decode slots were ensured free just above"
        rows = torch.tensor([r.row for r in reqs])
        cols = torch.tensor([r.kv_len for r in reqs])
        self.req_to_token.table[rows, cols] = slots
        return list(reqs)

    def _schedule_prefills(self) -> list[PrefillWork]:
        budget = self.prefill_budget
        works: list[PrefillWork] = []
        if self.chunked is not None:
            req = self.chunked
            n = min(req.remaining_fill, budget)
            if self._ensure_free(n):
                works.append(self._alloc_chunk(req, n))
                budget -= n
            if self.chunked is not None:
                return works  # one partially prefilled request at a time
        num_active = len(self.running) + (1 if self.chunked else 0)
        for req in self._ordered_waiting():
            if budget <= 0 or num_active >= self.max_running_requests:
                break
            if not self._admit(req):
                break  # head-of-line: later requests wait too (keeps fcfs fair)
            self.waiting.remove(req)
            num_active += 1
            n = min(req.remaining_fill, budget)
            works.append(self._alloc_chunk(req, n))
            budget -= n
        return works

    def _ordered_waiting(self) -> list[Req]:
        by_priority = (lambda r: -r.priority) if self.priority_scheduling else (lambda r: 0)
        if self.policy != "lpm" or len(self.waiting) > LPM_MAX_QUEUE or self.cache.disabled:
            return sorted(self.waiting, key=by_priority)  # stable: fcfs among equals
        lengths = {id(r): self.cache.match_prefix(self._match_key(r), count=False).length
                   for r in self.waiting}
        return sorted(self.waiting, key=lambda r: (by_priority(r), -lengths[id(r)]))

    def _match_key(self, req: Req) -> list[int]:
        """What may be served from the cache: never the last token (its logits are needed), and
        no position from `logprob_start_len` on (their logits give the input logprobs)."""
        limit = len(req.fill_ids) - 1
        if req.wants_input_logprobs and not req.input_logprobs_done:
            limit = min(limit, req.request.logprob_start_len)
        return req.fill_ids[:max(limit, 0)]

    def _admit(self, req: Req) -> bool:
        row = self.req_to_token.alloc()
        if row is None:
            return False
        count = not req.counted_cache_query
        match = self.cache.match_prefix(self._match_key(req), count=count)
        if count:
            req.counted_cache_query = True
            req.cached_tokens = match.length
        self.cache.lock(match.node)
        reserve = self._decode_reservation() + math.ceil(req.remaining_decode * self.new_token_ratio)
        need = len(req.fill_ids) - match.length + reserve
        if need > self.kv.num_free + self.cache.evictable_size:
            self.cache.unlock(match.node)
            self.req_to_token.free(row)
            return False
        req.row = row
        req.last_node = match.node
        req.kv_len = req.cached_len = match.length
        if match.length:
            self.req_to_token.table[row, :match.length] = match.slots
        req.admit_seq = next(self._admit_counter)
        return True

    def _decode_reservation(self) -> int:
        active = self.running + ([self.chunked] if self.chunked else [])
        return sum(math.ceil(r.remaining_decode * self.new_token_ratio) for r in active)

    def _alloc_chunk(self, req: Req, n: int) -> PrefillWork:
        ok = self._ensure_free(n)
        assert ok, f"admission promised {n} free KV slots"
        slots = self.kv.alloc(n)
        assert slots is not None
        self.req_to_token.table[req.row, req.kv_len:req.kv_len + n] = slots
        completes = n == req.remaining_fill
        self.chunked = None if completes else req
        return PrefillWork(req=req, start=req.kv_len, length=n, completes=completes)

    def _ensure_free(self, n: int) -> bool:
        if self.kv.num_free < n:
            self.cache.evict(n - self.kv.num_free)
        return self.kv.num_free >= n

    def _build_batch(self, decode_reqs: list[Req], prefills: list[PrefillWork]) -> ScheduledBatch:
        ids: list[int] = [r.output_ids[-1] for r in decode_reqs]
        positions: list[int] = [r.kv_len for r in decode_reqs]
        slot_parts: list[torch.Tensor] = []
        if decode_reqs:
            rows = torch.tensor([r.row for r in decode_reqs])
            slot_parts.append(self.req_to_token.table[rows, torch.tensor(positions)])
        logit_rows: list[int] = list(range(len(decode_reqs)))
        spans: list[PrefillSpan] = []
        offset = len(decode_reqs)
        for work in prefills:
            req = work.req
            ids.extend(req.fill_ids[work.start:work.start + work.length])
            positions.extend(range(work.start, work.start + work.length))
            slot_parts.append(self.req_to_token.table[req.row, work.start:work.start + work.length])
            spans.append(PrefillSpan(offset, work.length, req.row, work.start))
            if req.wants_input_logprobs and not req.input_logprobs_done:
                # Position p's logits predict token p + 1. Like SGLang, the entry of token
                # `logprob_start_len` itself is None, so positions [start_len, prompt_len - 1).
                first = max(req.request.logprob_start_len, work.start)
                last = min(work.start + work.length, len(req.prompt_ids) - 1)
                if last > first:
                    work.input_lp_rows = list(range(len(logit_rows), len(logit_rows) + last - first))
                    work.input_lp_targets = req.prompt_ids[first + 1:last + 1]
                    logit_rows.extend(offset + p - work.start for p in range(first, last))
            if work.completes:
                work.sample_row = len(logit_rows)
                logit_rows.append(offset + work.length - 1)
            offset += work.length
        forward = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64),
            positions=torch.tensor(positions, dtype=torch.int64),
            out_slots=torch.cat(slot_parts),
            decode_rows=torch.tensor([r.row for r in decode_reqs], dtype=torch.int64),
            decode_kv_lens=torch.tensor([r.kv_len + 1 for r in decode_reqs], dtype=torch.int64),
            prefills=spans,
            logit_indices=torch.tensor(logit_rows, dtype=torch.int64),
        )
        return ScheduledBatch(forward=forward, decode_reqs=decode_reqs, prefills=prefills)

    # ---- after the forward pass ---------------------------------------------------------------
    def commit(self, batch: ScheduledBatch) -> None:
        """The step's K/V are written: advance lengths and share finished chunks via the cache."""
        for req in batch.decode_reqs:
            req.kv_len += 1
        for work in batch.prefills:
            work.req.kv_len += work.length
            self._cache_unfinished(work.req)

    def start_decoding(self, req: Req) -> None:
        self.running.append(req)

    # ---- KV release ---------------------------------------------------------------------------
    def _cache_unfinished(self, req: Req) -> None:
        """Insert the request's KV so far into the tree, and use the tree's slots from now on."""
        if self.cache.disabled or req.row is None:
            return
        ids = req.all_ids[:req.kv_len]  # fill_ids is always a prefix of all_ids
        slots = self.req_to_token.table[req.row, :req.kv_len]
        present = self.cache.insert(ids, slots.clone())
        if present > req.cached_len:
            self.kv.free(self.req_to_token.table[req.row, req.cached_len:present].clone())
        match = self.cache.match_prefix(ids, count=False)
        assert match.length == req.kv_len, (
            f"the tree must now hold all {req.kv_len} tokens of {req.rid}, found {match.length}"
        )
        self.req_to_token.table[req.row, :match.length] = match.slots
        self.cache.lock(match.node)
        if req.last_node is not None:
            self.cache.unlock(req.last_node)
        req.last_node = match.node
        req.cached_len = match.length

    def _release(self, req: Req) -> None:
        """Hand the request's KV to the cache (or free it) and give back its row."""
        if req.row is None:
            return
        ids = req.all_ids[:req.kv_len]
        slots = self.req_to_token.table[req.row, :req.kv_len].clone()
        present = self.cache.insert(ids, slots)
        if present > req.cached_len:
            self.kv.free(slots[req.cached_len:present])
        if req.last_node is not None:
            self.cache.unlock(req.last_node)
        self.req_to_token.free(req.row)
        req.row = None
        req.last_node = None
        req.kv_len = req.cached_len = 0

    def retract(self, req: Req) -> None:
        """Send a running request back to the waiting queue, keeping what it generated."""
        if req in self.running:
            self.running.remove(req)
        if self.chunked is req:
            self.chunked = None
        self._release(req)
        req.fill_ids = req.all_ids
        req.num_retractions += 1
        if not req.input_logprobs_done:
            req.input_logprobs, req.input_top_logprobs = None, None
        self.waiting.insert(0, req)
        self.num_retractions += 1
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO

    # ---- accounting ---------------------------------------------------------------------------
    def outstanding_tokens(self) -> int:
        reqs = self.waiting + self.running + ([self.chunked] if self.chunked else [])
        return sum(r.remaining_fill + r.remaining_decode for r in reqs)
