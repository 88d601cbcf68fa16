"""`EmbeddedEngine`: continuous batching on PyTorch + Hugging Face weights, in-process.

Threads. The step loop runs in ONE dedicated background thread (torch releases the GIL inside its
kernels, so the asyncio side stays responsive). Everything the loop owns (scheduler, KV pool, radix
cache, request states) is touched only by that thread. The asyncio side talks to it through an
inbox (a deque + an Event to wake it) and receives outputs through `loop.call_soon_threadsafe`,
one callback per event loop per step carrying every request's increment of that step.

A step: take new requests/aborts from the inbox -> `BatchScheduler.schedule()` (decodes + prefill
chunks, eviction, retraction) -> `ModelRunner.forward()` -> sample the rows that need a token ->
stop checks, detokenization, logprobs -> deliver increments -> free finished requests' KV into the
radix cache. An exception inside a step fails the requests of that step with `EngineError` and the
loop goes on.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
import traceback
from collections.abc import AsyncIterator
from concurrent.futures import Future
from typing import Any

import torch

from app.config import EngineSettings, ModelSettings
from app.engines.base import Engine, Tokenizer, generate_all
from app.engines.embedded.batch_scheduler import BatchScheduler
from app.engines.embedded.kv_pool import (
    KVPool,
    ReqToTokenPool,
    default_capacity_tokens,
    kv_bytes_per_token,
)
from app.engines.embedded.model_runner import ModelRunner
from app.engines.embedded.radix_cache import RadixCache
from app.engines.embedded.request import Req, TextStream
from app.errors import EngineError, EngineOutOfMemoryError, InvalidRequestError
from app.protocol import (
    EngineStats,
    FinishReason,
    GenerateOutput,
    GenerateRequest,
    LogprobEntry,
    ModelInfo,
    SamplingParams,
    merged_text_lens,
)

logger = logging.getLogger(__name__)

THROUGHPUT_WINDOW_S = 5.0
IDLE_WAIT_S = 0.5


def available_cores() -> int:
    """Threads for torch when engine.torch_threads is unset: the cores this process may run on.

    Not torch's own default: inside Ray, torch reads OMP_NUM_THREADS, which Ray sets to the
    actor's num_cpus (1 for a replica with `num_cpus: 1`, and for any fraction), so a replica
    left one core idle and decoded at half speed (issue 13: 24 tok/s vs HF's 100 on 2 cores).
    The engine is the replica's compute; cap it with engine.torch_threads when several replicas
    share a host."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class EmbeddedEngine(Engine):
    def __init__(self, model: ModelSettings, engine: EngineSettings) -> None:
        self.model_settings = model
        self.settings = engine
        self._load_lock = threading.Lock()
        self._started = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._inbox: collections.deque[tuple[str, Any]] = collections.deque()
        self._wakeup = threading.Event()
        self._live: set[str] = set()  # rids with a consumer (asyncio side)
        self._reqs: dict[str, Req] = {}  # engine thread only
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Req, Any]]] = {}
        self._stats = EngineStats()
        self._totals = collections.Counter()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._token_text_cache: dict[int, str] = {}
        self._inflight: list[Req] = []  # requests of the step being run (engine thread)

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        if not self._started:
            await asyncio.to_thread(self._load)

    def _load(self) -> None:
        with self._load_lock:
            if self._started:
                return
            from app.engines.hf_tokenizer import HFTokenizer
            from app.engines.tiny_model import resolve_model_path, resolve_tokenizer_path

            torch.set_num_threads(self.settings.torch_threads or available_cores())
            s = self.settings
            device = torch.device(
                "cuda" if s.device != "cpu" and torch.cuda.is_available() else "cpu"
            )
            if s.device == "cuda" and device.type != "cuda":
                raise EngineError("engine.device is 'cuda' but no CUDA device is available")
            self.model_path = resolve_model_path(self.model_settings)
            self._tokenizer = HFTokenizer(resolve_tokenizer_path(self.model_settings),
                                          trust_remote_code=self.model_settings.trust_remote_code)
            self._hf = self._tokenizer_backend(self._tokenizer)
            self.runner = ModelRunner(
                self.model_path, dtype=self.model_settings.dtype, device=device,
                trust_remote_code=self.model_settings.trust_remote_code,
            )
            r = self.runner
            self.context_len = self.model_settings.context_length or r.context_len
            capacity = s.max_total_tokens or default_capacity_tokens(
                bytes_per_token=kv_bytes_per_token(r.num_layers, r.kv_heads, r.head_dim, r.dtype),
                device=device, weight_bytes=r.weight_bytes,
                mem_fraction_static=s.mem_fraction_static,
                max_running_requests=s.max_running_requests, context_len=self.context_len,
            )
            self.kv = KVPool(num_layers=r.num_layers, kv_heads=r.kv_heads, head_dim=r.head_dim,
                             capacity=capacity, dtype=r.dtype, device=device)
            self.req_to_token = ReqToTokenPool(max_requests=s.max_running_requests,
                                               context_len=self.context_len + 1, device=device)
            self.cache = RadixCache(self.kv, disabled=s.disable_radix_cache)
            self.scheduler = BatchScheduler(
                kv=self.kv, req_to_token=self.req_to_token, cache=self.cache,
                max_running_requests=s.max_running_requests,
                max_prefill_tokens=s.max_prefill_tokens,
                chunked_prefill_size=s.chunked_prefill_size, policy=s.schedule_policy,
                priority_scheduling=s.priority_scheduling,
            )
            self.eos_token_ids = list(self._tokenizer.eos_token_ids)
            self.grammar = None
            if s.grammar_backend != "none":
                from app.engines.embedded.grammar import GrammarCompiler

                self.grammar = GrammarCompiler(self._hf, r.vocab_size, s.max_grammar_bytes,
                                               s.grammar_compile_timeout_s)
            self._thread = threading.Thread(target=self._run_loop, name="embedded-engine",
                                            daemon=True)
            self._thread.start()
            self._started = True
            self._publish_stats()

    def _tokenizer_backend(self, tokenizer: Any) -> Any:
        """The Hugging Face tokenizer inside the wrapper (fast decoding, grammar compilation);
        loaded here if the wrapper does not expose it."""
        for name in ("hf_tokenizer", "hf", "tokenizer", "_tokenizer", "_hf"):
            inner = getattr(tokenizer, name, None)
            if inner is not None and hasattr(inner, "convert_ids_to_tokens"):
                return inner
        from transformers import AutoTokenizer
        from app.engines.tiny_model import resolve_tokenizer_path

        return AutoTokenizer.from_pretrained(resolve_tokenizer_path(self.model_settings),
                                             trust_remote_code=self.model_settings.trust_remote_code)

    async def shutdown(self) -> None:
        if not self._started or self._thread is None:
            return
        self._stopping = True
        self._wakeup.set()
        await asyncio.to_thread(self._thread.join)
        self._started = False

    # ---- the async API ------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        await self.start()
        if request.rid in self._live:
            raise InvalidRequestError(f"request id {request.rid!r} is already in use", param="rid")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        req = await self._make_req(request, loop, queue)
        self._live.add(request.rid)
        self._submit("add", req)
        done = False
        try:
            while True:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                merged: GenerateOutput | None = None
                for item in items:
                    if isinstance(item, BaseException):
                        done = True
                        if merged is not None:
                            yield merged
                        raise item
                    merged = item if merged is None else _merge(merged, item)
                assert merged is not None
                done = merged.finished
                yield merged
                if done:
                    return
        finally:
            self._live.discard(request.rid)
            if not done and not self._stopping:
                self._submit("abort", (request.rid, None))

    async def abort(self, rid: str) -> bool:
        if rid not in self._live:
            return False
        self._submit("abort", (rid, "aborted by request"))
        return True

    async def flush_cache(self) -> bool:
        await self.start()
        future: Future[bool] = Future()
        self._submit("flush", future)
        return await asyncio.wrap_future(future)

    async def health_check(self, timeout_s: float = 10.0) -> None:
        await self.start()
        token = self.eos_token_ids[0] if self.eos_token_ids else 0
        probe = GenerateRequest(
            rid=f"health-{time.monotonic_ns()}", input_ids=[token],
            sampling=SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True),
        )
        try:
            out = await asyncio.wait_for(generate_all(self, probe), timeout_s)
        except asyncio.TimeoutError as e:
            raise EngineError(f"health check: no token within {timeout_s} s") from e
        if out.completion_tokens != 1:
            raise EngineError(f"health check produced {out.completion_tokens} tokens, not 1")

    def stats(self) -> EngineStats:
        return self._stats

    def model_info(self) -> ModelInfo:
        self._require_started()
        return ModelInfo(
            model_path=self.model_settings.model_path,
            served_model_name=self.model_settings.name,
            context_length=self.context_len,
            vocab_size=self.runner.vocab_size,
            eos_token_ids=self.eos_token_ids,
        )

    @property
    def tokenizer(self) -> Tokenizer:
        self._require_started()
        return self._tokenizer

    def server_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"engine": "embedded", **self.settings.model_dump(),
                                **{f"model_{k}": v for k, v in self.model_settings.model_dump().items()}}
        if self._started:
            args.update(
                resolved_model_path=self.model_path, device=str(self.runner.device),
                dtype=str(self.runner.dtype).removeprefix("torch."),
                context_length=self.context_len, max_total_tokens=self.kv.capacity,
                torch_threads=torch.get_num_threads(),
            )
        return args

    def _require_started(self) -> None:
        if not self._started:
            raise EngineError("the engine is not started (await engine.start() first)")

    # ---- request construction (asyncio side) --------------------------------------------------
    async def _make_req(self, request: GenerateRequest, loop: asyncio.AbstractEventLoop,
                        queue: asyncio.Queue[Any]) -> Req:
        params = request.sampling
        if request.input_ids is not None:
            prompt = list(request.input_ids)
            vocab = self.runner.vocab_size
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(
                    f"input_ids contains token ids outside the vocabulary [0, {vocab}): {bad[:5]}",
                    param="input_ids")
        else:
            prompt = self._tokenizer.encode(request.text or "")
        n = len(prompt)
        if n == 0:
            raise InvalidRequestError("the prompt is empty (0 tokens)", param="text")
        if n >= self.context_len:
            raise InvalidRequestError(
                f"prompt has {n} tokens, context length is {self.context_len}: the input "
                f"({n} tokens) is longer than the model's context length ({self.context_len} tokens).",
                param="prompt", code="context_length_exceeded")
        if n + params.max_new_tokens >= self.context_len:
            total = n + params.max_new_tokens
            raise InvalidRequestError(
                f"Requested token count exceeds the model's maximum context length of "
                f"{self.context_len} tokens. You requested a total of {total} tokens: {n} tokens "
                f"from the input messages and {params.max_new_tokens} tokens for the completion. "
                f"Please reduce the number of tokens in the input messages or the completion to "
                f"fit within the limit.", param="max_new_tokens", code="context_length_exceeded")
        if n + 1 > self.kv.capacity:
            raise InvalidRequestError(
                f"prompt has {n} tokens but the KV cache holds only {self.kv.capacity} tokens "
                f"(max_total_tokens): this request can never fit", param="prompt")
        if request.return_logprob and request.logprob_start_len >= n:
            raise InvalidRequestError(
                f"logprob_start_len ({request.logprob_start_len}) must be smaller than the prompt "
                f"length ({n} tokens)", param="logprob_start_len")
        # Like SGLang's scheduler: never ask for more tokens than the KV pool can ever hold.
        max_new = min(params.max_new_tokens, self.kv.capacity - n)
        matcher = None
        if params.constraint is not None:
            if self.grammar is None:
                raise InvalidRequestError("constrained decoding is disabled (grammar_backend=none)",
                                          param=params.constraint[0])
            compiled = await self.grammar.compile(*params.constraint)
            matcher = self.grammar.new_matcher(compiled, max_new)
        from app.engines.embedded.sampling import SequenceSampler

        sampler = SequenceSampler(params, prompt, self.runner.vocab_size, self.eos_token_ids)
        req = Req(
            request=request, prompt_ids=prompt, max_new_tokens=max_new, sampler=sampler,
            matcher=matcher,
            text=TextStream(self._decode, skip_special_tokens=params.skip_special_tokens,
                            stop=list(params.stop)),
            deliver=queue.put_nowait, loop=loop,
        )
        return req

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def _token_text(self, token_id: int) -> str:
        text = self._token_text_cache.get(token_id)
        if text is None:
            text = self._hf.decode([token_id], skip_special_tokens=False)
            self._token_text_cache[token_id] = text
        return text

    def _submit(self, kind: str, payload: Any) -> None:
        if self._stopping or self._thread is None or not self._thread.is_alive():
            raise EngineError("the engine is not running (shut down or not started)")
        self._inbox.append((kind, payload))
        self._wakeup.set()

    # ---- the engine thread --------------------------------------------------------------------
    def _run_loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopping:
            try:
                self._wakeup.clear()
                self._drain_inbox()
                if not self.scheduler.has_work:
                    self._publish_stats()
                    self._wakeup.wait(IDLE_WAIT_S)
                    continue
                try:
                    with torch.inference_mode():
                        self._step()
                except Exception as exc:  # one bad step must not kill the loop or hang callers
                    logger.error("embedded engine step failed:\n%s", traceback.format_exc())
                    self._fail_active(exc)
                self._publish_stats()  # before delivering, so a caller that saw its end sees it
                self._flush_outbox()
            except Exception as exc:  # bookkeeping itself failed: fail everyone, keep serving
                logger.error("embedded engine loop error:\n%s", traceback.format_exc())
                self._fail_everything(EngineError(f"the engine failed: {exc!r}"))
        self._drain_inbox()
        self._fail_everything(EngineError("the engine shut down"))

    def _fail_everything(self, error: EngineError) -> None:
        for req in list(self._reqs.values()):
            try:
                self._fail(req, error)
            except Exception:
                logger.error("failing %s:\n%s", req.rid, traceback.format_exc())
                self._reqs.pop(req.rid, None)
                self._outbox.setdefault(req.loop, []).append((req, error))
        try:
            self._flush_outbox()
        except Exception:
            logger.error("delivering errors:\n%s", traceback.format_exc())

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, payload = self._inbox.popleft()
            if kind == "add":
                self._reqs[payload.rid] = payload
                self.scheduler.add(payload)
            elif kind == "abort":
                rid, message = payload
                req = self._reqs.pop(rid, None)
                if req is None:
                    continue
                self.scheduler.remove(req)
                self._totals["aborted"] += 1
                self._publish_stats()
                if message is not None:  # someone still listens: tell them
                    req.finish_reason = FinishReason(type="abort", message=message)
                    self._emit(req)
            elif kind == "flush":
                try:
                    self.cache.flush()
                    self._publish_stats()
                    payload.set_result(True)
                except Exception as exc:
                    payload.set_exception(exc)
        if self._outbox:
            self._flush_outbox()

    def _step(self) -> None:
        self._inflight = []
        batch = self.scheduler.schedule()
        if batch is None:
            self._unblock_waiting()
            return
        self._inflight = batch.decode_reqs + [w.req for w in batch.prefills]
        logits = self.runner.forward(batch.forward, self.kv, self.req_to_token)
        self.scheduler.commit(batch)
        self._totals["prompt"] += sum(w.length for w in batch.prefills)
        sample_rows: list[int] = list(range(len(batch.decode_reqs)))
        sample_reqs: list[Req] = list(batch.decode_reqs)
        for work in batch.prefills:
            req = work.req
            if req.wants_input_logprobs and req.input_logprobs is None:  # (re)started prefill
                _reset_input_logprobs(req, self._token_text if req.request.return_text_in_logprobs
                                      else None)
            if work.input_lp_rows:
                self._add_input_logprobs(req, logits[work.input_lp_rows], work.input_lp_targets or [])
            if not work.completes:
                continue
            req.input_logprobs_done = True
            if req.remaining_decode == 0:  # max_new_tokens == 0: a prefill-only request
                self._finish(req, FinishReason(type="length", length=req.max_new_tokens))
                continue
            sample_rows.append(work.sample_row)
            sample_reqs.append(req)
            self.scheduler.start_decoding(req)
        if sample_reqs:
            self._sample_and_append(logits[sample_rows], sample_reqs)
        self._record_throughput(len(sample_reqs))

    def _sample_and_append(self, logits: torch.Tensor, reqs: list[Req]) -> None:
        from app.engines.embedded.sampling import sample_next_tokens

        allowed = None
        if any(r.matcher is not None for r in reqs):
            allowed = torch.ones(logits.shape, dtype=torch.bool)
            for i, r in enumerate(reqs):
                if r.matcher is not None:
                    mask = r.matcher.allowed_token_mask()
                    allowed[i, :mask.numel()] = mask[:logits.shape[1]]
        top_nums = [r.request.top_logprobs_num if r.request.return_logprob else 0 for r in reqs]
        result = sample_next_tokens(logits, [r.sampler for r in reqs], allowed, top_nums)
        for i, req in enumerate(reqs):
            self._append_token(req, result.token_ids[i], result.logprobs[i], result.top_logprobs[i])

    def _append_token(self, req: Req, token: int, logprob: float,
                      top: list[tuple[float, int]]) -> None:
        req.output_ids.append(token)
        req.sampler.observe(token)
        if req.first_token_time is None:
            req.first_token_time = time.time()
        req.pending_ids.append(token)
        if req.request.return_logprob:
            text_of = self._token_text if req.request.return_text_in_logprobs else None
            req.pending_logprobs.append(_entry(logprob, token, text_of))
            if req.request.top_logprobs_num:
                req.pending_top.append([_entry(lp, tid, text_of) for lp, tid in top])
        if req.matcher is not None:
            req.matcher.accept_token(token)
        reason = self._check_finished(req, token)
        if reason is not None:
            self._finish(req, reason)
        else:
            self._emit(req)

    def _check_finished(self, req: Req, token: int) -> FinishReason | None:
        params = req.params
        n = len(req.output_ids)
        is_stop_token = token in params.stop_token_ids or (
            not params.ignore_eos and token in self.eos_token_ids)
        may_stop = n >= params.min_new_tokens
        if may_stop and is_stop_token:
            if params.no_stop_trim:
                req.text.add(token)
            return FinishReason(type="stop", matched=token)
        req.text.add(token)
        if n >= req.max_new_tokens:
            return FinishReason(type="length", length=req.max_new_tokens)
        if req.matcher is not None and req.matcher.is_terminated():
            return FinishReason(type="stop", matched=None)
        if may_stop and params.stop:
            hit = req.text.find_stop()
            if hit is not None:
                index, matched = hit
                if not params.no_stop_trim:
                    req.text.truncate(index)
                return FinishReason(type="stop", matched=matched)
        return None

    def _finish(self, req: Req, reason: FinishReason) -> None:
        req.finish_reason = reason
        if not (reason.type == "stop" and isinstance(reason.matched, str)):
            req.text.flush_pending()
        self.scheduler.remove(req)
        self._reqs.pop(req.rid, None)
        self._totals["finished"] += 1
        self._emit(req)

    def _add_input_logprobs(self, req: Req, logits: torch.Tensor, targets: list[int]) -> None:
        from app.engines.embedded.sampling import token_logprobs

        top_n = req.request.top_logprobs_num
        values, tops = token_logprobs(logits, torch.tensor(targets), top_n)
        text_of = self._token_text if req.request.return_text_in_logprobs else None
        assert req.input_logprobs is not None and req.input_top_logprobs is not None
        for lp, tid, top in zip(values, targets, tops):
            req.input_logprobs.append(_entry(lp, tid, text_of))
            req.input_top_logprobs.append([_entry(v, i, text_of) for v, i in top] if top_n else None)

    def _unblock_waiting(self) -> None:
        """Nothing could be scheduled. With nothing running this cannot resolve by waiting:
        fail the head of the queue instead of spinning forever."""
        s = self.scheduler
        if s.running or s.chunked or not s.waiting:
            time.sleep(0.001)
            return
        req = s.waiting[0]
        self._fail(req, EngineError(
            f"request {req.rid} ({len(req.fill_ids)} tokens) cannot be scheduled: KV cache "
            f"capacity {self.kv.capacity} tokens, {self.kv.num_free} free"))

    # ---- outputs ------------------------------------------------------------------------------
    def _emit(self, req: Req) -> None:
        final = req.finished
        logprobs = req.request.return_logprob
        send_input = logprobs and req.input_logprobs_done and not req.input_logprobs_sent \
            and req.input_logprobs is not None
        out = GenerateOutput.model_construct(
            rid=req.rid,
            text=req.text.take(final),
            token_ids=req.pending_ids,
            finished=final,
            finish_reason=req.finish_reason,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens,
            output_token_logprobs=req.pending_logprobs if logprobs else None,
            output_top_logprobs=req.pending_top if logprobs and req.request.top_logprobs_num else None,
            input_token_logprobs=req.input_logprobs if send_input else None,
            input_top_logprobs=req.input_top_logprobs if send_input else None,
            engine_arrival_time=req.arrival_time,
            first_token_time=req.first_token_time,
        )
        if send_input:
            req.input_logprobs_sent = True
        req.pending_ids, req.pending_logprobs, req.pending_top = [], [], []
        self._outbox.setdefault(req.loop, []).append((req, out))

    def _fail(self, req: Req, error: Exception) -> None:
        self.scheduler.remove(req)
        self._reqs.pop(req.rid, None)
        req.finish_reason = FinishReason(type="abort", message=str(error))
        self._outbox.setdefault(req.loop, []).append((req, error))

    def _fail_active(self, exc: Exception) -> None:
        s = self.scheduler
        error = _step_error(exc)
        affected = {id(r): r for r in [*self._inflight, *s.running, *([s.chunked] if s.chunked else [])]}
        self._inflight = []
        for req in affected.values():
            if req.finished and req.rid not in self._reqs:
                continue
            try:
                self._fail(req, error)
            except Exception:
                logger.error("releasing %s after a failed step:\n%s", req.rid, traceback.format_exc())

    def _flush_outbox(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, items)
            except RuntimeError:  # the consumer's event loop is closed: nobody listens any more
                for req, _ in items:
                    if not req.finished:
                        self._inbox.append(("abort", (req.rid, None)))

    # ---- stats --------------------------------------------------------------------------------
    def _record_throughput(self, tokens: int) -> None:
        now = time.monotonic()
        self._totals["generated"] += tokens
        self._recent.append((now, tokens))
        while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
            self._recent.popleft()

    def _publish_stats(self) -> None:
        s = self.scheduler
        now = time.monotonic()
        recent = [(t, n) for t, n in self._recent if t >= now - THROUGHPUT_WINDOW_S]
        span = (now - recent[0][0]) if recent else 0.0
        throughput = sum(n for _, n in recent) / span if span > 0.05 else 0.0
        self._stats = EngineStats(
            num_running=len(s.running) + (1 if s.chunked else 0),
            num_waiting=len(s.waiting),
            num_used_tokens=self.kv.num_used,
            max_total_tokens=self.kv.capacity,
            cache_hit_tokens=self.cache.hit_tokens,
            cache_query_tokens=self.cache.query_tokens,
            prompt_tokens_total=self._totals["prompt"],
            generation_tokens_total=self._totals["generated"],
            requests_finished_total=self._totals["finished"],
            requests_aborted_total=self._totals["aborted"],
            gen_throughput_tok_s=throughput,
            outstanding_tokens=s.outstanding_tokens(),
        )


def _step_error(exc: Exception) -> EngineError:
    """What the requests of a failed step get. Out of memory (device or host) is the load, not the
    request: 503 + Retry-After, retryable; their KV is freed, so a retry may fit."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the allocator's cached blocks back before the next step
        return EngineOutOfMemoryError(f"the engine ran out of memory in a step ({type(exc).__name__}); "
                                      "this request was freed: retry")
    return EngineError(f"the engine failed while serving this request: {exc!r}")


def _entry(logprob: float | None, token: int, text_of: Any) -> LogprobEntry:
    return (logprob, token, text_of(token) if text_of is not None else None)  # type: ignore[return-value]


def _reset_input_logprobs(req: Req, text_of: Any) -> None:
    if not req.wants_input_logprobs:
        return
    # SGLang pads the first entry with None whatever logprob_start_len is (its logits would come
    # from the position before the start, which is not computed); so do we, for the same shapes.
    first = req.prompt_ids[req.request.logprob_start_len]
    req.input_logprobs = [_entry(None, first, text_of)]
    req.input_top_logprobs = [None]


def _deliver_all(items: list[tuple[Req, Any]]) -> None:
    for req, item in items:
        req.deliver(item)


def _merge(a: GenerateOutput, b: GenerateOutput) -> GenerateOutput:
    """Like GenerateOutput.merge, without re-validating (input logprobs may hold a None)."""

    def cat(x: Any, y: Any) -> Any:
        if x is None:
            return y
        if y is None:
            return x
        return x + y

    return GenerateOutput.model_construct(
        rid=a.rid, text=a.text + b.text, token_ids=a.token_ids + b.token_ids,
        finished=b.finished, finish_reason=b.finish_reason, prompt_tokens=b.prompt_tokens,
        completion_tokens=b.completion_tokens, cached_tokens=b.cached_tokens,
        output_token_logprobs=cat(a.output_token_logprobs, b.output_token_logprobs),
        output_top_logprobs=cat(a.output_top_logprobs, b.output_top_logprobs),
        input_token_logprobs=a.input_token_logprobs or b.input_token_logprobs,
        input_top_logprobs=a.input_top_logprobs or b.input_top_logprobs,
        engine_arrival_time=a.engine_arrival_time or b.engine_arrival_time,
        first_token_time=a.first_token_time or b.first_token_time,
        text_lens=merged_text_lens(a, b),
    )
