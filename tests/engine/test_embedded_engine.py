"""Specification of what is particular to the embedded engine: prefix cache, chunked prefill,
KV pressure (eviction, retraction), scheduling policies, cache control and failure isolation."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from app.config import AppSettings, EngineSettings, ModelSettings
from app.engines.base import generate_all
from app.engines.embedded import EmbeddedEngine
from app.engines.embedded.model_runner import ModelRunner
from app.engines.factory import make_engine
from app.errors import EngineError, InvalidRequestError
from app.protocol import GenerateOutput, GenerateRequest, SamplingParams

CACHE_DIR = os.environ.get("SGLSERVE_TEST_CACHE", str(Path(__file__).parents[2] / ".cache" / "models"))
torch.set_num_threads(1)

SYSTEM = "You are a careful assistant. Answer briefly and cite the rules you follow. " * 4
QUESTIONS = ["What is a cache?", "Why batch requests?", "How long is a token?", "Name a prime.",
             "Explain radix trees.", "What is KV?"]


@contextlib.asynccontextmanager
async def embedded(**settings) -> AsyncIterator[EmbeddedEngine]:
    settings.setdefault("torch_threads", 1)
    eng = EmbeddedEngine(ModelSettings(cache_dir=CACHE_DIR), EngineSettings(**settings))
    await eng.start()
    try:
        yield eng
    finally:
        await eng.shutdown()


def greedy(n: int = 16, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, **kw)


async def run_all(eng: EmbeddedEngine, prompts: list[str], n: int = 16) -> list[GenerateOutput]:
    return list(await asyncio.gather(
        *(generate_all(eng, GenerateRequest(text=p, sampling=greedy(n))) for p in prompts)))


@pytest.fixture(scope="module")
async def reference(tiny_model_path) -> dict[str, list[int]]:
    """Greedy outputs of each test prompt, one request at a time, default settings."""
    prompts = [SYSTEM + q for q in QUESTIONS] + ["long " * 300]
    async with embedded(max_total_tokens=16384) as eng:
        return {p: (await generate_all(eng, GenerateRequest(text=p, sampling=greedy(24)))).token_ids
                for p in prompts}


async def test_prefix_cache_serves_shared_prefixes_without_changing_outputs(reference):
    prompts = [SYSTEM + q for q in QUESTIONS]
    for disabled in (False, True):
        async with embedded(max_total_tokens=16384, disable_radix_cache=disabled) as eng:
            first = await generate_all(eng, GenerateRequest(text=prompts[0], sampling=greedy(24)))
            rest = await run_all(eng, prompts[1:], 24)
            assert [o.token_ids for o in [first, *rest]] == [reference[p] for p in prompts]
            stats = eng.stats()
            if disabled:
                assert all(o.cached_tokens == 0 for o in rest) and stats.cache_hit_tokens == 0
            else:
                system_tokens = len(eng.tokenizer.encode(SYSTEM))
                assert all(o.cached_tokens >= system_tokens - 2 for o in rest)
                assert stats.cache_hit_tokens >= 5 * (system_tokens - 2)
                assert 0 < stats.cache_hit_rate < 1


async def test_chunked_prefill_gives_the_same_outputs_as_one_big_prefill(reference):
    prompts = list(reference)
    for chunk in (16, 4096):
        async with embedded(max_total_tokens=16384, chunked_prefill_size=chunk,
                            disable_radix_cache=True) as eng:
            outs = await run_all(eng, prompts, 24)
            assert [o.token_ids for o in outs] == [reference[p] for p in prompts], f"chunk {chunk}"


async def test_tiny_kv_pool_evicts_and_retracts_but_every_request_finishes(reference):
    prompts = [SYSTEM + q for q in QUESTIONS]
    # ~75 prompt tokens each + 24 new: 6 at once need ~600 slots; the pool has 300.
    async with embedded(max_total_tokens=300, chunked_prefill_size=64) as eng:
        eng.scheduler.new_token_ratio = 0.0  # admit greedily so the running batch must retract
        outs = await run_all(eng, prompts * 2, 24)
        assert [o.token_ids for o in outs] == [reference[p] for p in prompts * 2]
        assert eng.scheduler.num_retractions > 0
        assert all(o.finish_reason is not None and o.finish_reason.type == "length" for o in outs)
        eng.cache.check_invariants()
        assert eng.stats().num_used_tokens == eng.cache.total_size  # only the cache holds slots


async def test_a_request_that_can_never_fit_gets_a_clear_error(tiny_model_path):
    async with embedded(max_total_tokens=64) as eng:
        with pytest.raises(InvalidRequestError) as info:
            await generate_all(eng, GenerateRequest(input_ids=[7] * 100, sampling=greedy(4)))
        assert "100" in info.value.message and "64" in info.value.message
        # max_new_tokens beyond the pool is clipped to what fits, like SGLang.
        out = await generate_all(eng, GenerateRequest(input_ids=[7] * 50, sampling=greedy(40)))
        assert out.finish_reason is not None and out.finish_reason.length == 14


@pytest.mark.parametrize("policy", ["lpm", "fcfs"])
async def test_lpm_serves_the_longest_cached_prefix_first_and_fcfs_the_oldest(policy, tiny_model_path):
    async with embedded(max_total_tokens=16384, max_running_requests=1, schedule_policy=policy) as eng:
        await generate_all(eng, GenerateRequest(text=SYSTEM, sampling=greedy(1)))  # cache SYSTEM
        blocker = asyncio.create_task(generate_all(
            eng, GenerateRequest(text="block", sampling=greedy(300))))
        while eng.stats().num_running == 0:
            await asyncio.sleep(0.005)
        unrelated = asyncio.create_task(generate_all(
            eng, GenerateRequest(text="Something else entirely, unrelated.", sampling=greedy(2))))
        await asyncio.sleep(0.05)
        shared = asyncio.create_task(generate_all(
            eng, GenerateRequest(text=SYSTEM + QUESTIONS[0], sampling=greedy(2))))
        await blocker
        u, s = await unrelated, await shared
        assert u.first_token_time is not None and s.first_token_time is not None
        if policy == "lpm":
            assert s.first_token_time < u.first_token_time
        else:
            assert u.first_token_time < s.first_token_time


@pytest.mark.parametrize("priority_scheduling", [True, False])
async def test_higher_priority_prefills_first_and_lower_priority_pauses_meanwhile(priority_scheduling,
                                                                                   tiny_model_path):
    def request(text: str, n: int, priority: int) -> GenerateRequest:
        return GenerateRequest(text=text, sampling=greedy(n), priority=priority)

    async with embedded(max_total_tokens=16384, priority_scheduling=priority_scheduling) as eng:
        alone = await generate_all(eng, request("batch line", 120, -1000))
        low = asyncio.create_task(generate_all(eng, request("batch line", 120, -1000)))
        while eng.stats().num_running == 0:
            await asyncio.sleep(0.005)
        high = await generate_all(eng, request("interactive", 8, 0))
        assert (await low).token_ids == alone.token_ids  # a pause changes nothing in the output
        paused = eng.scheduler.paused_steps_total
        if priority_scheduling:  # the low one sat out the high one's steps (prefill + 7 decodes) ...
            assert paused >= 8 and high.completion_tokens == 8
        else:
            assert paused == 0

    # ... and with one running slot, the waiting request of higher priority is admitted first.
    async with embedded(max_total_tokens=16384, max_running_requests=1,
                        priority_scheduling=priority_scheduling) as eng:
        blocker = asyncio.create_task(generate_all(eng, request("block", 300, 0)))
        while eng.stats().num_running == 0:
            await asyncio.sleep(0.005)
        first = asyncio.create_task(generate_all(eng, request("batch line", 2, -1000)))
        while eng.stats().num_waiting == 0:
            await asyncio.sleep(0.005)
        second = asyncio.create_task(generate_all(eng, request("interactive", 2, 0)))
        while eng.stats().num_waiting < 2:
            await asyncio.sleep(0.005)
        await blocker
        lo, hi = await first, await second
        assert (hi.first_token_time < lo.first_token_time) == priority_scheduling


async def test_flush_cache_drops_unreferenced_prefixes_only(tiny_model_path):
    async with embedded(max_total_tokens=16384) as eng:
        await generate_all(eng, GenerateRequest(text=SYSTEM, sampling=greedy(4)))
        assert eng.stats().num_used_tokens > 0  # cached
        stream = eng.generate(GenerateRequest(text=SYSTEM + QUESTIONS[1], sampling=greedy(200)))
        first = await stream.__anext__()
        assert await eng.flush_cache()
        held = eng.stats().num_used_tokens
        assert 0 < held  # the running request's KV stays
        rest = [first] + [o async for o in stream]
        assert sum(len(o.token_ids) for o in rest) == 200
        assert await eng.flush_cache()
        assert eng.stats().num_used_tokens == 0
        again = await generate_all(eng, GenerateRequest(text=SYSTEM, sampling=greedy(1)))
        assert again.cached_tokens == 0


async def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(tiny_model_path):
    async with embedded(max_total_tokens=16384) as eng:
        real_forward = eng.runner.forward
        calls = {"n": 0}

        def flaky_forward(*args, **kwargs):  # fault injection: the 3rd forward pass raises
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected failure")
            return real_forward(*args, **kwargs)

        eng.runner.forward = flaky_forward  # type: ignore[method-assign]
        with pytest.raises(EngineError, match="injected failure"):
            await generate_all(eng, GenerateRequest(text="hello", sampling=greedy(10)))
        out = await generate_all(eng, GenerateRequest(text="hello", sampling=greedy(10)))
        assert len(out.token_ids) == 10
        assert eng.stats().num_running == 0


async def test_unsupported_architectures_are_named_in_the_error(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(EngineError, match="gpt2"):
        ModelRunner(str(tmp_path), dtype="auto", device=torch.device("cpu"))


async def test_factory_builds_the_configured_engine_and_rejects_unknown_kinds():
    from app.engines.process import ProcessEngine

    assert isinstance(make_engine(AppSettings()), ProcessEngine)  # embedded, in a process of its own
    in_process = AppSettings.from_args({"engine": {"separate_process": False}})
    assert isinstance(make_engine(in_process), EmbeddedEngine)
    settings = AppSettings()
    settings.engine.kind = "nope"  # type: ignore[assignment]  (bypasses validation on purpose)
    with pytest.raises(EngineError, match="nope"):
        make_engine(settings)


async def test_stats_track_load_and_totals(tiny_model_path):
    async with embedded(max_total_tokens=16384) as eng:
        stream = eng.generate(GenerateRequest(text=QUESTIONS[0], sampling=greedy(300)))
        await stream.__anext__()
        during = eng.stats()
        assert during.num_running == 1 and 0 < during.outstanding_tokens <= 300
        assert during.num_used_tokens > 0
        await stream.aclose()
        t0 = time.monotonic()
        while eng.stats().num_running and time.monotonic() - t0 < 1:
            await asyncio.sleep(0.01)
        after = eng.stats()
        assert after.num_running == 0 and after.requests_aborted_total == 1
        assert after.outstanding_tokens == 0 and after.generation_tokens_total >= 1


def test_a_step_batch_moves_to_the_models_device_whole():
    """The scheduler builds each step's batch on the host; a CUDA model indexes its KV pool with
    it, so every index tensor must follow (a CPU index on a CUDA pool failed the first GPU run).
    The meta device stands in for CUDA here; tests/gpu runs the engine on a real GPU."""
    from app.engines.embedded.model_runner import ForwardBatch, PrefillSpan

    host = ForwardBatch(input_ids=torch.tensor([5, 6, 7]), positions=torch.tensor([3, 0, 1]),
                        out_slots=torch.tensor([10, 11, 12]), decode_rows=torch.tensor([0]),
                        decode_kv_lens=torch.tensor([4]), prefills=[PrefillSpan(1, 2, 1, 0)],
                        logit_indices=torch.tensor([0, 2]))
    assert host.to(torch.device("cpu")) is host  # nothing to copy on CPU
    moved = host.to(torch.device("meta"))
    tensors = ("input_ids", "positions", "out_slots", "decode_rows", "decode_kv_lens", "logit_indices")
    assert all(getattr(moved, name).device.type == "meta" for name in tensors)
    assert all(getattr(moved, name).shape == getattr(host, name).shape for name in tensors)
    assert moved.prefills == host.prefills and moved.num_decode == 1
