"""The `sglang.Engine` adapter: SGLang's real runtime behind our engine contract (GPU replicas).

Design
- One `sglang.Engine` per replica, built from `ModelSettings` + `EngineSettings` (every field our
  config exposes maps onto a `ServerArgs` field; `sglang_extra_args` passes any other one, checked
  against `ServerArgs` so a typo is an error). `sglang` is imported only in `start()`, so a CPU
  deployment never needs it; without it `start()` raises `EngineError` saying how to install it.
- Streamed requests go to SGLang as streams (`async_generate(stream=True)`); SGLang's default
  stream is cumulative (the whole output so far; chunks a slow consumer missed are folded into the
  next), so the adapter yields only what is new as `GenerateOutput` increments (`sglang_stream`).
  With `incremental_streaming_output=True` in `sglang_extra_args` the chunks are deltas and pass
  as is. Non-streamed requests get SGLang's single final output.
- Bad input is rejected before it reaches SGLang (a token id outside the vocabulary can take the
  scheduler down); SGLang's own rejections (`ValueError`, aborts with a status code) map onto
  `app.errors`. A consumer that stops iterating aborts its request.
- Lifecycle inside Ray Serve (`sglang_process`): SGLang's subprocesses report a failure by sending
  SIGQUIT to their parent, and SGLang's handlers answer it (and SIGTERM) by killing the whole
  process tree, i.e. the Ray worker. The adapter replaces those handlers: a failing engine is marked
  dead, requests in flight end with `EngineError`, and `health_check` raises, so Ray Serve replaces
  the replica through its normal path. When the engine is started off the main thread (Ray Serve
  runs user code on its own thread) Python cannot install a handler, so SIGQUIT is set to "ignore"
  at the C level; a watchdog thread notices dead subprocesses in both cases.
- GPU placement: the engine uses the devices in CUDA_VISIBLE_DEVICES (Ray sets it from the
  replica's `num_gpus`); `start()` checks that at least `tp_size` are visible.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from app.config import AppSettings, EngineSettings, ModelSettings
from app.engines.base import Engine, Tokenizer
from app.engines.hf_tokenizer import HFTokenizer
from app.engines.sglang_process import (
    ChildWatchdog,
    child_pids,
    ignore_signal_at_c_level,
    register,
    restore_handlers,
    saved_handlers,
    sigquit_handler,
    unregister,
)
from app.engines.sglang_stream import (
    StreamCursor,
    TextEmitter,
    error_for_sglang_abort,
    finish_reason_from_sglang,
    new_output,
)
from app.errors import (
    APIError,
    EngineError,
    EngineUnavailableError,
    InvalidRequestError,
    RequestAbortedError,
    ValidationError,
)
from app.protocol import EngineStats, GenerateOutput, GenerateRequest, ModelInfo, SamplingParams

logger = logging.getLogger("sglserve.engines.sglang")

INSTALL_HINT = (
    "engine.kind is 'sglang' but the sglang runtime is not importable ({error}). Install it on the "
    "GPU nodes, e.g. `pip install 'sglang[all]'` matching the node's torch/CUDA, or use "
    "engine.kind 'embedded'."
)
# A health-check prompt made of small token ids every vocabulary has.
HEALTH_PROMPT_IDS = [1, 2, 3, 4]


# --------------------------------------------------------------------------------------------
# Settings -> ServerArgs
# --------------------------------------------------------------------------------------------
def server_args_from_settings(model: ModelSettings, engine: EngineSettings) -> dict[str, Any]:
    """The `sglang.Engine(**kwargs)` for our settings. Options left at None keep SGLang's default."""
    kwargs: dict[str, Any] = {
        "model_path": model.model_path,
        "tokenizer_path": model.tokenizer_path or model.model_path,
        "served_model_name": model.name,
        "context_length": model.context_length,
        "dtype": model.dtype,
        "trust_remote_code": model.trust_remote_code,
        "mem_fraction_static": engine.mem_fraction_static,
        "chunked_prefill_size": engine.chunked_prefill_size,
        "max_prefill_tokens": engine.max_prefill_tokens,
        "max_running_requests": engine.max_running_requests,
        "max_total_tokens": engine.max_total_tokens,
        "schedule_policy": engine.schedule_policy,
        "disable_radix_cache": engine.disable_radix_cache,
        "quantization": engine.quantization,
        "kv_cache_dtype": engine.kv_cache_dtype,
        "tp_size": engine.tp_size,
        "load_format": engine.load_format,
        "grammar_backend": engine.grammar_backend,
        "enable_metrics": engine.enable_metrics,
        "attention_backend": engine.attention_backend,
        "sampling_backend": engine.sampling_backend,
        "disable_cuda_graph": engine.disable_cuda_graph,
    }
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs.update(engine.sglang_extra_args)  # the operator's explicit choice wins
    return kwargs


def server_arg_names(server_args_class: type) -> set[str]:
    """ServerArgs' field names: a dataclass up to sglang 0.5.17, a msgspec Struct in later releases."""
    if dataclasses.is_dataclass(server_args_class):
        return {f.name for f in dataclasses.fields(server_args_class)}
    return set(getattr(server_args_class, "__struct_fields__", ()))


def check_server_arg_names(kwargs: dict[str, Any], server_args_class: type) -> None:
    """Reject names `ServerArgs` does not have (a typo in sglang_extra_args is an error)."""
    known = server_arg_names(server_args_class)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(
            f"engine.sglang_extra_args: {unknown} are not sglang ServerArgs fields "
            f"(sglang {_sglang_version()})"
        )


def _sglang_version() -> str:
    try:
        import sglang

        return str(sglang.__version__)
    except Exception:  # noqa: BLE001 - only for a message
        return "unknown"


def _import_sglang():
    try:
        import sglang
        from sglang.srt.server_args import ServerArgs
    except Exception as exc:  # ImportError, or a broken CUDA stack underneath
        raise EngineError(INSTALL_HINT.format(error=f"{type(exc).__name__}: {exc}")) from exc
    return sglang, ServerArgs


def resolve_paths(model: ModelSettings) -> tuple[str, str]:
    """(model_path, tokenizer_path): the tiny model is built on first use (random weights, real
    tokenizer); other paths pass through unchanged."""
    from app.engines import tiny_model

    return tiny_model.resolve_model_path(model), tiny_model.resolve_tokenizer_path(model)


# --------------------------------------------------------------------------------------------
# Requests in flight
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Flight:
    """What the adapter tracks of one request in flight (for stats and for failing it)."""

    rid: str
    prompt_tokens: int
    max_new_tokens: int
    completion_tokens: int = 0


# --------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------
class SGLangEngine(Engine):
    """`sglang.Engine` behind the engine contract. Build with `from_settings`, then `await start()`."""

    def __init__(
        self,
        model: ModelSettings,
        engine: EngineSettings,
        *,
        stream_interval: int | None = None,
        freeze_gc_after_warmup: bool = True,
    ):
        """`stream_interval`: coalescing inside SGLang for streamed requests (its per-request
        `stream_interval`: the first token is sent at once, then every N tokens), which saves a
        message per token on every hop above; None keeps the server's (1 unless
        `sglang_extra_args` sets `stream_interval`).
        `freeze_gc_after_warmup`: after start, run one real generation (it triggers SGLang's
        first-request kernel builds) and then SGLang's `freeze_gc` (this process, its scheduler
        and detokenizer): the garbage collector stops rescanning the millions of long-lived
        objects torch and SGLang create at start, which otherwise stalls token streams."""
        self.stream_interval = stream_interval
        self._freeze_gc_after_warmup = freeze_gc_after_warmup
        self._model_settings = model
        self._engine_settings = engine
        self._sgl: Any = None  # the sglang.Engine
        self._kwargs: dict[str, Any] = {}
        self._incremental = False
        self._dead_reason: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: ChildWatchdog | None = None
        self._flights: dict[str, _Flight] = {}
        self._tokenizer: HFTokenizer | None = None
        self._model_info: ModelInfo | None = None
        self._start_lock = asyncio.Lock()
        # Totals since start (health checks excluded).
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._cached_tokens_total = 0
        self._finished_total = 0
        self._aborted_total = 0

    @classmethod
    def from_settings(cls, settings: AppSettings, **kwargs: Any) -> "SGLangEngine":
        return cls(settings.model, settings.engine, **kwargs)

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def sgl(self) -> Any:
        """The underlying `sglang.Engine` (benchmarks compare against it directly)."""
        if self._sgl is None:
            raise EngineError("the SGLang engine is not started")
        return self._sgl

    async def start(self) -> None:
        async with self._start_lock:
            if self._sgl is not None:
                return
            sglang, server_args_class = _import_sglang()
            kwargs = server_args_from_settings(self._model_settings, self._engine_settings)
            kwargs["model_path"], kwargs["tokenizer_path"] = resolve_paths(self._model_settings)
            try:
                check_server_arg_names(kwargs, server_args_class)
            except ValueError as exc:
                raise EngineError(str(exc)) from exc
            self._check_visible_gpus(kwargs.get("tp_size", 1) * kwargs.get("dp_size", 1))
            self._kwargs = kwargs
            self._incremental = bool(kwargs.get("incremental_streaming_output", False))
            self._loop = asyncio.get_running_loop()

            on_main = threading.current_thread() is threading.main_thread()
            saved = saved_handlers() if on_main else {}
            register(self)
            if on_main:
                # A module-level function: ServerArgs travels to SGLang's subprocesses by pickle.
                kwargs = {**kwargs, "custom_sigquit_handler": sigquit_handler}
            else:
                ignore_signal_at_c_level(signal.SIGQUIT)
            children_before = child_pids()
            started = time.monotonic()
            try:
                # Blocks this thread while SGLang loads the model and captures CUDA graphs; SGLang
                # binds its tokenizer manager to the running loop, so it must be built on it.
                self._sgl = sglang.Engine(**kwargs)
            except Exception as exc:
                unregister(self)
                raise EngineError(f"SGLang failed to start: {type(exc).__name__}: {exc}") from exc
            tm = self._sgl.tokenizer_manager
            # Start SGLang's output loop now, then take back the signal handlers it installs on
            # the main thread (they kill the whole process tree on SIGTERM/SIGQUIT).
            tm.auto_create_handle_loop()
            if on_main:
                restore_handlers(self._loop, saved)
            self._watchdog = ChildWatchdog(
                sorted(child_pids() - children_before), self.mark_dead_threadsafe
            )
            self._watchdog.start()
            self._build_model_info(tm)
            if self._freeze_gc_after_warmup:
                await self.health_check(timeout_s=300.0)
                await tm.freeze_gc()
            logger.info(
                "sglang %s engine started in %.1fs: %s",
                _sglang_version(),
                time.monotonic() - started,
                {k: v for k, v in self._kwargs.items() if k != "custom_sigquit_handler"},
            )

    @staticmethod
    def _check_visible_gpus(needed: int) -> None:
        try:
            import torch

            visible = torch.cuda.device_count()
        except Exception as exc:  # noqa: BLE001 - torch without CUDA
            raise EngineError(f"engine.kind 'sglang' needs CUDA; torch reports: {exc}") from exc
        if visible < needed:
            raise EngineError(
                f"engine needs {needed} GPU(s) (tp_size x dp_size) but {visible} are visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); give the "
                f"replica num_gpus={needed} in its ray_actor_options"
            )

    def _build_model_info(self, tm: Any) -> None:
        model_config = tm.model_config
        hf_eos = getattr(model_config, "hf_eos_token_id", None) or set()
        eos = sorted(int(t) for t in (hf_eos if isinstance(hf_eos, (set, list, tuple)) else [hf_eos]))
        if tm.tokenizer is not None:
            if not eos and tm.tokenizer.eos_token_id is not None:
                eos = [int(tm.tokenizer.eos_token_id)]
            self._tokenizer = HFTokenizer.wrap(tm.tokenizer, eos)
        self._model_info = ModelInfo(
            model_path=self._model_settings.model_path,
            served_model_name=self._model_settings.name,
            context_length=int(tm.context_len),
            vocab_size=int(model_config.vocab_size),
            eos_token_ids=eos,
        )

    async def shutdown(self) -> None:
        if self._sgl is None:
            return
        if self._watchdog is not None:
            self._watchdog.stop()
        unregister(self)
        sgl, self._sgl = self._sgl, None
        # SGLang's shutdown waits for its scheduler to release the GPU (up to a minute).
        await asyncio.to_thread(sgl.shutdown)

    # ---- death -------------------------------------------------------------------------------
    def mark_dead_threadsafe(self, reason: str) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            self._dead_reason = self._dead_reason or reason
            return
        try:
            loop.call_soon_threadsafe(self._mark_dead, reason)
        except RuntimeError:  # loop closing
            self._dead_reason = self._dead_reason or reason

    def _mark_dead(self, reason: str) -> None:
        """Runs on the loop: fail every request in flight instead of leaving it waiting forever."""
        if self._dead_reason is not None:
            return
        self._dead_reason = reason
        logger.error("SGLang engine is dead: %s", reason)
        if self._sgl is None:
            return
        tm = self._sgl.tokenizer_manager
        try:
            from sglang.srt.managers.io_struct import AbortReq
        except Exception:  # noqa: BLE001
            return
        for rid in list(self._flights):
            try:
                tm._handle_abort_req(
                    AbortReq(
                        rid=rid,
                        finished_reason={"type": "abort", "message": reason, "status_code": 500},
                    )
                )
            except Exception:  # noqa: BLE001 - best effort wake-up; the request errors anyway
                logger.exception("could not fail request %s", rid)

    @property
    def available(self) -> bool:
        """False once the engine died: the replica says so to the request router at once, while
        its failing health check gets Ray Serve to replace it."""
        return self._dead_reason is None

    def _dead_error(self) -> EngineUnavailableError:
        """What requests get once the engine died (a crash, a CUDA out-of-memory in a step):
        503 + Retry-After, retryable, so the Ingress sends them to another replica or holds them
        for the replacement. The request did nothing wrong; a 500 would say it had."""
        return EngineUnavailableError(
            f"the SGLang engine of this replica died ({self._dead_reason}); "
            "the replica is being replaced, retry", retry_after_s=5.0, code="engine_dead")

    def _require_serving(self) -> Any:
        if self._dead_reason is not None:
            raise self._dead_error()
        if self._sgl is None:
            raise EngineError("the SGLang engine is not started")
        return self._sgl

    # ---- requests ----------------------------------------------------------------------------
    def _validate(self, request: GenerateRequest) -> None:
        info = self.model_info()
        sampling = request.sampling
        if sampling.n != 1:
            raise InvalidRequestError(
                f"n={sampling.n}: the engine generates one sequence per request "
                "(n > 1 is fanned out above the engine)",
                param="n",
            )
        if request.text is not None and self._tokenizer is None:
            raise InvalidRequestError(
                "this engine runs without a tokenizer (skip_tokenizer_init); send input_ids",
                param="text",
            )
        if request.input_ids is not None:
            ids = request.input_ids
            if not ids:
                raise InvalidRequestError("input_ids is empty", param="input_ids")
            bad = next((t for t in ids if not 0 <= t < info.vocab_size), None)
            if bad is not None:
                raise InvalidRequestError(
                    f"input_ids contains token id {bad}, outside the vocabulary "
                    f"[0, {info.vocab_size})",
                    param="input_ids",
                )
            if len(ids) >= info.context_length:
                raise InvalidRequestError(
                    f"the prompt has {len(ids)} tokens; the model's context length is "
                    f"{info.context_length} tokens",
                    param="input_ids",
                )
        if sampling.constraint is not None and self._kwargs.get("grammar_backend") == "none":
            kind = sampling.constraint[0]
            raise ValidationError(
                f"{kind} constraints need a grammar backend; this engine runs with "
                "grammar_backend 'none'",
                param=f"sampling_params.{kind}",
            )
        if request.return_logprob and request.logprob_start_len >= 0 and request.input_ids:
            if request.logprob_start_len >= len(request.input_ids):
                raise InvalidRequestError(
                    f"logprob_start_len {request.logprob_start_len} is not inside the "
                    f"{len(request.input_ids)}-token prompt",
                    param="logprob_start_len",
                )

    @staticmethod
    def sampling_params_for_sglang(sampling: SamplingParams) -> dict[str, Any]:
        params = sampling.model_dump(exclude={"n", "seed"}, exclude_none=True)
        if not params.get("stop"):
            params.pop("stop", None)
        if not params.get("stop_token_ids"):
            params.pop("stop_token_ids", None)
        if sampling.seed is not None:
            params["sampling_seed"] = sampling.seed
        return params

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        return self._generate(request, count_in_stats=True)

    async def _generate(
        self, request: GenerateRequest, *, count_in_stats: bool
    ) -> AsyncIterator[GenerateOutput]:
        sgl = self._require_serving()
        self._validate(request)
        rid = request.rid
        if rid in self._flights:
            raise InvalidRequestError(f"request id {rid!r} is already in flight", param="rid")
        arrival = time.time()
        prompt_len = len(request.input_ids) if request.input_ids is not None else 0
        flight = _Flight(rid, prompt_len, request.sampling.max_new_tokens)
        self._flights[rid] = flight
        constraint = request.sampling.constraint
        want_logprob_text = request.return_text_in_logprobs and self._tokenizer is not None
        finished = False
        stream: Any = None
        try:
            sampling_params = self.sampling_params_for_sglang(request.sampling)
            if request.stream and self.stream_interval:
                sampling_params["stream_interval"] = self.stream_interval
            try:
                result = await sgl.async_generate(
                    prompt=request.text,
                    input_ids=request.input_ids,
                    sampling_params=sampling_params,
                    return_logprob=request.return_logprob,
                    logprob_start_len=request.logprob_start_len,
                    top_logprobs_num=request.top_logprobs_num,
                    # Non-streaming requests get one output from SGLang (no per-token messages).
                    stream=request.stream,
                    rid=rid,
                )
            except Exception as exc:
                raise self._map_exception(exc, constraint) from exc
            if request.stream:
                stream = result
                iterator = stream.__aiter__()
            else:
                iterator = _one(result)
            cursor = StreamCursor(arrival_time=arrival)
            stops = tuple(request.sampling.stop)
            if stops and request.stream and not request.sampling.no_stop_trim:
                cursor.text = TextEmitter(stops)
            while True:
                try:
                    chunk = await iterator.__anext__()
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    raise self._map_exception(exc, constraint) from exc
                meta = chunk["meta_info"]
                raw_finish = meta.get("finish_reason")
                if raw_finish and isinstance(raw_finish, dict) and raw_finish.get("type") == "abort":
                    if self._dead_reason is not None:
                        raise self._dead_error()
                    if raw_finish.get("status_code") is not None:
                        raise error_for_sglang_abort(raw_finish, constraint)
                out = self._increment(chunk, meta, cursor, request, want_logprob_text)
                if out is None:
                    continue
                flight.completion_tokens = out.completion_tokens
                if flight.prompt_tokens == 0:
                    flight.prompt_tokens = out.prompt_tokens
                if out.finished:
                    finished = True
                    if count_in_stats:
                        self._count_finished(out)
                yield out
                if finished:
                    return
            if not finished:
                raise EngineError(f"SGLang ended request {rid} without a final output")
        finally:
            self._flights.pop(rid, None)
            if not finished:
                self._abort_quietly(rid)
                if count_in_stats:
                    self._aborted_total += 1
            if stream is not None:
                await stream.aclose()

    def _increment(
        self,
        chunk: dict[str, Any],
        meta: dict[str, Any],
        cursor: StreamCursor,
        request: GenerateRequest,
        want_logprob_text: bool,
    ) -> GenerateOutput | None:
        """The new part of one SGLang chunk as a GenerateOutput (None if nothing is new)."""
        ids = chunk.get("output_ids") or []
        text = chunk.get("text")
        finish = finish_reason_from_sglang(meta.get("finish_reason"))
        finished = finish is not None
        if self._incremental:
            new_ids = list(ids)
            cursor.text.full += text or ""
            new_text = cursor.text.delta(cursor.text.full, finished)
        else:
            new_ids = list(ids[cursor.ids :])
            cursor.ids = max(cursor.ids, len(ids))
            new_text = cursor.text.delta(text, finished) if text is not None else ""
        if new_ids and cursor.first_token_time is None:
            cursor.first_token_time = time.time()
        out = new_output(
            rid=request.rid,
            text=new_text,
            token_ids=new_ids,
            finished=finished,
            finish_reason=finish,
            prompt_tokens=int(meta.get("prompt_tokens") or 0),
            completion_tokens=int(meta.get("completion_tokens") or 0),
            cached_tokens=int(meta.get("cached_tokens") or 0),
            output_token_logprobs=None,
            output_top_logprobs=None,
            input_token_logprobs=None,
            input_top_logprobs=None,
            engine_arrival_time=cursor.arrival_time,
            first_token_time=cursor.first_token_time,
            served_by=None,
            text_lens=None,  # one token per output at SGLang's default stream_interval: obvious
        )
        if request.return_logprob:
            self._attach_logprobs(out, meta, cursor, request, want_logprob_text)
        if not new_ids and not new_text and finish is None and not out.input_token_logprobs:
            return None
        return out

    def _attach_logprobs(
        self,
        out: GenerateOutput,
        meta: dict[str, Any],
        cursor: StreamCursor,
        request: GenerateRequest,
        want_text: bool,
    ) -> None:
        outputs = meta.get("output_token_logprobs") or []
        tops = meta.get("output_top_logprobs") or []
        if self._incremental:
            out.output_token_logprobs = self._entries(outputs, want_text)
            if request.top_logprobs_num:
                out.output_top_logprobs = [self._entries(t, want_text) for t in tops]
        else:
            out.output_token_logprobs = self._entries(outputs[cursor.output_logprobs :], want_text)
            cursor.output_logprobs = max(cursor.output_logprobs, len(outputs))
            if request.top_logprobs_num:
                out.output_top_logprobs = [
                    self._entries(t, want_text) for t in tops[cursor.output_top_logprobs :]
                ]
                cursor.output_top_logprobs = max(cursor.output_top_logprobs, len(tops))
        if not cursor.input_logprobs_sent and request.logprob_start_len >= 0:
            inputs = meta.get("input_token_logprobs")
            if inputs:
                cursor.input_logprobs_sent = True
                out.input_token_logprobs = self._entries(inputs, want_text)
                if request.top_logprobs_num:
                    out.input_top_logprobs = [
                        self._entries(t, want_text) if t else None
                        for t in (meta.get("input_top_logprobs") or [])
                    ]

    def _entries(self, raw: list[Any], want_text: bool) -> list[tuple[Any, int, str | None]]:
        """SGLang's (logprob, token_id, text) triples; text filled in by our tokenizer if asked."""
        if not raw:
            return []
        if not want_text:
            return [(lp, int(tid), None) for lp, tid, *_ in raw]
        assert self._tokenizer is not None
        return [(lp, int(tid), self._tokenizer.decode([int(tid)], False)) for lp, tid, *_ in raw]

    def _count_finished(self, out: GenerateOutput) -> None:
        self._finished_total += 1
        if out.finish_reason is not None and out.finish_reason.type == "abort":
            self._aborted_total += 1
        self._prompt_tokens_total += out.prompt_tokens
        self._generation_tokens_total += out.completion_tokens
        self._cached_tokens_total += out.cached_tokens

    def _map_exception(
        self, exc: BaseException, constraint: tuple[str, str] | None
    ) -> BaseException:
        """SGLang's errors as ours: ValueError is its 'bad request' (400), an HTTPException
        carries the status of an abort it decided on (non-streaming requests)."""
        if isinstance(exc, APIError):
            return exc
        if self._dead_reason is not None:
            return self._dead_error()
        status = getattr(exc, "status_code", None)
        if status == 499:
            return RequestAbortedError(str(exc))
        if isinstance(exc, ValueError):
            return error_for_sglang_abort({"status_code": 400, "message": str(exc)}, constraint)
        detail = getattr(exc, "detail", None)  # fastapi.HTTPException from SGLang
        if status is not None and detail is not None:
            return error_for_sglang_abort({"status_code": status, "message": detail}, constraint)
        return EngineError(f"SGLang failed: {type(exc).__name__}: {exc}")

    def _abort_quietly(self, rid: str) -> None:
        sgl = self._sgl
        if sgl is None or self._dead_reason is not None:
            return
        try:
            sgl.tokenizer_manager.abort_request(rid)
        except Exception:  # noqa: BLE001 - the request is being dropped anyway
            logger.exception("abort of %s failed", rid)

    async def abort(self, rid: str) -> bool:
        if rid not in self._flights:
            return False
        self._abort_quietly(rid)
        return True

    async def flush_cache(self) -> bool:
        sgl = self._require_serving()
        result = await sgl.tokenizer_manager.flush_cache()
        return bool(getattr(result, "success", result))

    async def health_check(self, timeout_s: float = 10.0) -> None:
        self._require_serving()
        request = GenerateRequest(
            rid=f"health-{time.monotonic_ns()}",
            input_ids=HEALTH_PROMPT_IDS,
            sampling=SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True),
        )

        async def one_token() -> int:
            produced = 0
            async for out in self._generate(request, count_in_stats=False):
                produced += len(out.token_ids)
            return produced

        try:
            produced = await asyncio.wait_for(one_token(), timeout_s)
        except asyncio.TimeoutError as exc:
            raise EngineError(f"SGLang health check: no token within {timeout_s:.1f}s") from exc
        if produced != 1:
            raise EngineError(f"SGLang health check produced {produced} tokens instead of 1")

    # ---- introspection -----------------------------------------------------------------------
    def stats(self) -> EngineStats:
        running = waiting = used = capacity = 0
        throughput = 0.0
        snapshots = self._load_snapshots()
        if snapshots:
            running = sum(s.num_running_reqs for s in snapshots)
            waiting = sum(s.num_waiting_reqs for s in snapshots)
            used = sum(s.num_used_tokens for s in snapshots)
            capacity = sum(s.max_total_num_tokens for s in snapshots)
            throughput = float(sum(s.gen_throughput for s in snapshots))
        else:
            running = len(self._flights)
        outstanding = 0
        for flight in self._flights.values():
            if flight.completion_tokens == 0:
                outstanding += flight.prompt_tokens
            outstanding += max(0, flight.max_new_tokens - flight.completion_tokens)
        return EngineStats(
            num_running=running,
            num_waiting=waiting,
            num_used_tokens=used,
            max_total_tokens=capacity,
            cache_hit_tokens=self._cached_tokens_total,
            cache_query_tokens=self._prompt_tokens_total,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            requests_finished_total=self._finished_total,
            requests_aborted_total=self._aborted_total,
            gen_throughput_tok_s=throughput,
            outstanding_tokens=outstanding,
        )

    def _load_snapshots(self) -> list[Any]:
        """SGLang's scheduler publishes its load to shared memory after every batch and when idle;
        reading it costs no round trip to the scheduler."""
        if self._sgl is None:
            return []
        reader = getattr(self._sgl.tokenizer_manager, "load_snapshot_reader", None)
        if reader is None:
            return []
        try:
            return list(reader.read_all())
        except Exception:  # noqa: BLE001 - stats must never raise
            return []

    def model_info(self) -> ModelInfo:
        if self._model_info is None:
            raise EngineError("the SGLang engine is not started")
        return self._model_info

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise EngineError(
                "this SGLang engine has no tokenizer (skip_tokenizer_init, or not started)"
            )
        return self._tokenizer

    def server_args(self) -> dict[str, Any]:
        args = {k: v for k, v in self._kwargs.items() if k != "custom_sigquit_handler"}
        args["engine"] = f"sglang {_sglang_version()}"
        args["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        if self._sgl is not None:
            try:
                resolved = self._sgl.server_args
                for name in ("max_total_tokens", "max_running_requests", "chunked_prefill_size",
                             "attention_backend", "sampling_backend", "mem_fraction_static"):
                    args.setdefault(f"resolved_{name}", getattr(resolved, name, None))
            except Exception:  # noqa: BLE001
                pass
        return args


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
async def _one(item: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    yield item
