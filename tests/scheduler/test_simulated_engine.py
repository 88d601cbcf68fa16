"""The simulated engine (a simulator, for benchmarks): costs, batching, prefix cache, contract."""

from __future__ import annotations

import asyncio

import pytest

from app.engines.base import generate_all
from app.engines.simulated import SimulatedCosts, SimulatedEngine
from app.errors import InvalidRequestError
from app.protocol import GenerateRequest, SamplingParams
from bench.virtual_clock import run_virtual

COSTS = SimulatedCosts(prefill_s_per_token=1e-4, decode_step_base_s=0.01,
                       decode_step_per_request_s=0.001, cache_capacity_tokens=10_000)


def req(prompt: list[int], max_new: int = 8) -> GenerateRequest:
    return GenerateRequest(input_ids=prompt, sampling=SamplingParams(max_new_tokens=max_new))


async def timed(engine: SimulatedEngine, request: GenerateRequest) -> tuple[float, float, object]:
    loop = asyncio.get_running_loop()
    start, first = loop.time(), None
    merged = None
    async for out in engine.generate(request):
        if first is None and out.token_ids:
            first = loop.time()
        merged = out if merged is None else merged.merge(out)
    return first - start, loop.time() - start, merged


def test_a_cached_prefix_skips_its_prefill_cost() -> None:
    async def main():
        engine = SimulatedEngine(COSTS)
        await engine.start()
        system = list(range(1, 1001))
        cold_ttft, _, cold = await timed(engine, req(system + [5, 6]))
        warm_ttft, _, warm = await timed(engine, req(system + [7, 8]))
        await engine.shutdown()
        return cold_ttft, cold, warm_ttft, warm, engine.stats()

    cold_ttft, cold, warm_ttft, warm, stats = run_virtual(main())
    assert cold.cached_tokens == 0 and warm.cached_tokens == 1000
    assert cold_ttft == pytest.approx(1002 * 1e-4)
    assert warm_ttft == pytest.approx(2 * 1e-4)
    assert len(cold.token_ids) == 8 and cold.finish_reason.type == "length"
    assert stats.cache_hit_tokens == 1000 and stats.requests_finished_total == 2


def test_decode_steps_slow_down_as_the_batch_grows() -> None:
    async def main(n: int) -> float:
        engine = SimulatedEngine(COSTS)
        await engine.start()
        results = await asyncio.gather(*(timed(engine, req([i + 1], max_new=50)) for i in range(n)))
        await engine.shutdown()
        return max(total - ttft for ttft, total, _ in results) / 49

    itl_1, itl_32 = run_virtual(main(1)), run_virtual(main(32))
    assert itl_1 == pytest.approx(0.011, rel=0.01)
    assert itl_32 == pytest.approx(0.010 + 0.032, rel=0.05)


def test_batch_is_capped_and_the_rest_waits() -> None:
    async def main():
        engine = SimulatedEngine(SimulatedCosts(max_running_requests=2, decode_step_base_s=0.01,
                                                decode_step_per_request_s=0.0))
        await engine.start()
        tasks = [asyncio.create_task(generate_all(engine, req([i + 1], 10))) for i in range(4)]
        await asyncio.sleep(0.005)
        mid = engine.stats()
        await asyncio.gather(*tasks)
        end = engine.stats()
        await engine.shutdown()
        return mid, end

    mid, end = run_virtual(main())
    assert mid.num_running == 2 and mid.num_waiting == 2
    # 2 waiting (1 prompt + 10 new tokens each) + 2 running (prefilled, first token out at
    # ~40 us, now inside a 10 ms decode step: 9 tokens left each)
    assert mid.outstanding_tokens == 2 * 11 + 2 * 9
    assert end.outstanding_tokens == 0 and end.num_running == 0


def test_abort_and_bad_input() -> None:
    async def main():
        engine = SimulatedEngine(COSTS)
        await engine.start()
        with pytest.raises(InvalidRequestError, match="context length"):
            await generate_all(engine, req([1] * 40_000))
        stream = engine.generate(req([1, 2, 3], 1000))
        first = await stream.__anext__()
        assert await engine.abort(first.rid)
        rest = [out async for out in stream]
        await engine.shutdown()
        return rest, engine.stats()

    rest, stats = run_virtual(main())
    assert rest[-1].finished and rest[-1].finish_reason.type == "abort"
    assert stats.requests_aborted_total == 1 and stats.num_running == 0
