"""SimulatedEngine: a SIMULATOR of an LLM engine, for benchmarks and tests only.

It runs no model. It reproduces what scheduling and routing care about: continuous batching, the
cost of prefill (per uncached prompt token, chunked per step) and of decode (a per-step time that
grows with the batch), and a REAL radix prefix cache over token ids with a capacity in tokens
(LRU; cached prefix tokens skip prefill cost). It emits fake tokens: lowercase letters, so that
text and ids round-trip through its trivial byte tokenizer. Selected by EngineSettings.kind ==
"simulated".

Time: every wait is `asyncio.sleep` on the running loop and every timestamp comes from
`loop.time()`, so a benchmark can run 64 simulated replicas under a virtual-time event loop
(bench/virtual_clock.py) and measure simulated seconds, not CPU noise.

Step model (one iteration of the loop):
    admit waiting requests into the batch (up to max_running_requests), looking their prompts up
    in the prefix cache; spend up to max_prefill_tokens_per_step on uncached prompt tokens (FCFS);
    step time = prefill_tokens * prefill_s_per_token
              + (decode_step_base_s + decode_step_per_request_s * decoding)   if any decode
    after the step: a request whose prefill finished emits its first token; decoding ones emit one.
Finished requests insert prompt + output into the cache, so a follow-up turn finds its history.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from app.engines.base import Engine, Tokenizer
from app.errors import EngineError, InvalidRequestError
from app.protocol import EngineStats, FinishReason, GenerateOutput, GenerateRequest, ModelInfo
from app.prefix_tree import PrefixTree

_CACHE_KEY = "self"  # the PrefixTree is per engine here: one "replica"
_EOS = 0


@dataclass
class SimulatedCosts:
    prefill_s_per_token: float = 20e-6  # 2k uncached tokens ~ 40 ms
    decode_step_base_s: float = 8e-3
    decode_step_per_request_s: float = 0.1e-3
    max_running_requests: int = 64
    max_prefill_tokens_per_step: int = 4096
    cache_capacity_tokens: int = 64_000
    context_length: int = 32_768
    startup_s: float = 0.0  # what start() takes: weights loading, warm-up (a cold start)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as token ids (1..256); 0 is EOS. Enough for the simulator's needs."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(t - 1 for t in token_ids if 0 < t <= 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, *, add_generation_prompt=True, tools=None) -> str:
        text = "".join(f"<|{m.get('role', 'user')}|>{m.get('content') or ''}\n" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")

    @property
    def eos_token_ids(self) -> list[int]:
        return [_EOS]


@dataclass
class _SimRequest:
    request: GenerateRequest
    prompt: list[int]
    outputs: asyncio.Queue
    arrival: float
    cached: int = 0
    prefill_left: int = 0
    generated: list[int] = field(default_factory=list)
    first_token_time: float | None = None
    done: bool = False

    @property
    def outstanding_tokens(self) -> int:
        return self.prefill_left + self.request.sampling.max_new_tokens - len(self.generated)


class SimulatedEngine(Engine):
    """A simulator (see the module docstring): real batching and cache logic, fake model."""

    def __init__(self, costs: SimulatedCosts | None = None, name: str = "simulated") -> None:
        self.costs = costs or SimulatedCosts()
        self.name = name
        self._tokenizer = ByteTokenizer()
        self._cache = PrefixTree(self.costs.cache_capacity_tokens)
        self._waiting: deque[_SimRequest] = deque()
        self._running: list[_SimRequest] = []
        self._by_rid: dict[str, _SimRequest] = {}
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._epoch_offset = 0.0
        self._stats = EngineStats(max_total_tokens=self.costs.cache_capacity_tokens)
        self._outstanding = 0  # sum of _SimRequest.outstanding_tokens, kept incrementally
        self._recent_tokens: deque[tuple[float, int]] = deque()

    # --- Engine contract ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._loop_task is not None:
            return
        loop = asyncio.get_running_loop()
        if self.costs.startup_s > 0:
            await asyncio.sleep(self.costs.startup_s)
        self._epoch_offset = time.time() - loop.time()
        self._wakeup = asyncio.Event()
        self._loop_task = loop.create_task(self._step_loop(), name=f"{self.name}-steps")

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        if self._loop_task is None:
            raise EngineError("the simulated engine was not started")
        prompt = request.input_ids if request.input_ids is not None else self._tokenizer.encode(request.text or "")
        if not prompt:
            raise InvalidRequestError("the prompt is empty", param="input_ids")
        limit = self.costs.context_length
        if len(prompt) + request.sampling.max_new_tokens > limit:
            raise InvalidRequestError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({request.sampling.max_new_tokens}) "
                f"exceeds the context length ({limit})",
                param="input_ids",
            )
        if request.rid in self._by_rid:
            raise InvalidRequestError(f"request id {request.rid} is already running", param="rid")
        sim = _SimRequest(request, list(prompt), asyncio.Queue(), self._now(), prefill_left=len(prompt))
        self._outstanding += sim.outstanding_tokens
        self._by_rid[request.rid] = sim
        self._waiting.append(sim)
        self._wake()
        try:
            while True:
                out = await sim.outputs.get()
                while not out.finished and not sim.outputs.empty():  # coalesce a backlog
                    out = out.merge(sim.outputs.get_nowait())
                yield out
                if out.finished:
                    return
        finally:
            if not sim.done:
                self._finish(sim, FinishReason(type="abort", message="client went away"))

    async def abort(self, rid: str) -> bool:
        sim = self._by_rid.get(rid)
        if sim is None:
            return False
        self._finish(sim, FinishReason(type="abort", message="aborted"))
        return True

    async def flush_cache(self) -> bool:
        self._cache = PrefixTree(self.costs.cache_capacity_tokens)
        return True

    async def health_check(self, timeout_s: float = 10.0) -> None:
        probe = GenerateRequest(input_ids=[1], sampling={"max_new_tokens": 1})
        async with asyncio.timeout(timeout_s):
            async for _ in self.generate(probe):
                pass

    def stats(self) -> EngineStats:
        now = self._now()
        while self._recent_tokens and self._recent_tokens[0][0] < now - 5.0:
            self._recent_tokens.popleft()
        stats = self._stats.model_copy()
        stats.num_running = len(self._running)
        stats.num_waiting = len(self._waiting)
        stats.num_used_tokens = self._cache.tokens_of(_CACHE_KEY) + sum(
            len(s.prompt) + len(s.generated) for s in self._running
        )
        stats.outstanding_tokens = self._outstanding
        stats.gen_throughput_tok_s = sum(n for _, n in self._recent_tokens) / 5.0
        return stats

    def load(self) -> tuple[int, int, int]:
        """(outstanding_tokens, running, waiting) without building an EngineStats: for routers
        that poll many simulated replicas per decision."""
        return self._outstanding, len(self._running), len(self._waiting)

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            model_path="simulated",
            served_model_name=self.name,
            context_length=self.costs.context_length,
            vocab_size=257,
            eos_token_ids=[_EOS],
        )

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def server_args(self) -> dict[str, Any]:
        return {"kind": "simulated", **self.costs.__dict__}

    async def shutdown(self) -> None:
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for sim in list(self._by_rid.values()):
            self._finish(sim, FinishReason(type="abort", message="engine shut down"))

    # --- the step loop ---------------------------------------------------------------------------

    def _now(self) -> float:
        # The engine's own loop: Ray Serve calls stats() (record_*_stats) from a worker thread.
        loop = self._loop_task.get_loop() if self._loop_task is not None else asyncio.get_running_loop()
        return loop.time()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def _step_loop(self) -> None:
        costs = self.costs
        while True:
            if not self._running and not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
            while self._waiting and len(self._running) < costs.max_running_requests:
                self._admit(self._waiting.popleft())
            budget = costs.max_prefill_tokens_per_step
            prefill_tokens, finishing_prefill, decoding = 0, [], []
            for sim in self._running:
                if sim.prefill_left > 0:
                    if budget > 0:
                        chunk = min(budget, sim.prefill_left)
                        sim.prefill_left -= chunk
                        self._outstanding -= chunk
                        budget -= chunk
                        prefill_tokens += chunk
                        if sim.prefill_left == 0:
                            finishing_prefill.append(sim)
                            self._cache.insert(_CACHE_KEY, sim.prompt)  # shareable from now on
                else:
                    decoding.append(sim)
            step_s = prefill_tokens * costs.prefill_s_per_token
            if decoding:
                step_s += costs.decode_step_base_s + costs.decode_step_per_request_s * len(decoding)
            await asyncio.sleep(step_s)
            now = self._now()
            emitted = 0
            for sim in finishing_prefill + decoding:
                if sim.done:  # aborted during the step
                    continue
                emitted += self._emit_token(sim, now)
            self._stats.generation_tokens_total += emitted
            self._recent_tokens.append((now, emitted))

    def _admit(self, sim: _SimRequest) -> None:
        matched = self._cache.match(sim.prompt).get(_CACHE_KEY, 0)
        sim.cached = min(matched, len(sim.prompt) - 1)  # the last prompt token is always computed
        sim.prefill_left = len(sim.prompt) - sim.cached
        self._outstanding -= sim.cached
        self._stats.cache_query_tokens += len(sim.prompt)
        self._stats.cache_hit_tokens += sim.cached
        self._stats.prompt_tokens_total += len(sim.prompt)
        self._running.append(sim)

    def _emit_token(self, sim: _SimRequest, now: float) -> int:
        max_new = sim.request.sampling.max_new_tokens
        if max_new == 0:
            self._finish(sim, FinishReason(type="length", length=0))
            return 0
        token = 98 + (zlib.crc32(f"{sim.request.rid}:{len(sim.generated)}".encode()) % 26)  # 'a'..'z'
        sim.generated.append(token)
        self._outstanding -= 1
        if sim.first_token_time is None:
            sim.first_token_time = now
        sim.outputs.put_nowait(self._output(sim, [token]))
        if len(sim.generated) >= max_new:
            self._finish(sim, FinishReason(type="length", length=max_new))
        return 1

    def _output(self, sim: _SimRequest, tokens: list[int], finish: FinishReason | None = None) -> GenerateOutput:
        return GenerateOutput(
            rid=sim.request.rid,
            text=self._tokenizer.decode(tokens),
            token_ids=tokens,
            finished=finish is not None,
            finish_reason=finish,
            prompt_tokens=len(sim.prompt),
            completion_tokens=len(sim.generated),
            cached_tokens=sim.cached,
            engine_arrival_time=sim.arrival + self._epoch_offset,
            first_token_time=None if sim.first_token_time is None else sim.first_token_time + self._epoch_offset,
        )

    def _finish(self, sim: _SimRequest, reason: FinishReason) -> None:
        if sim.done:
            return
        sim.done = True
        self._outstanding -= sim.outstanding_tokens  # what it will no longer do
        self._by_rid.pop(sim.request.rid, None)
        if sim in self._running:
            self._running.remove(sim)
        elif sim in self._waiting:
            self._waiting.remove(sim)
        if reason.type == "abort":
            self._stats.requests_aborted_total += 1
        else:
            self._stats.requests_finished_total += 1
            self._cache.insert(_CACHE_KEY, sim.prompt + sim.generated)
        sim.outputs.put_nowait(self._output(sim, [], reason))
