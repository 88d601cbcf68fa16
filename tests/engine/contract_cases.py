"""The engine contract (app/engines/base.py) as engine-agnostic test cases.

Every `test_*` coroutine here takes an `engine` fixture: a started `Engine`. To run the SAME
cases against another engine, import them into a test module that provides the fixture:

    import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "engine"))
    from contract_cases import *  # noqa: F401,F403  (pytest collects the imported tests)

    @pytest.fixture(scope="module")
    async def engine(): ...  # start it, yield it, shut it down

Outputs are compared engine against itself (batched vs alone, streamed vs merged), never against
hard-coded text, so the cases hold for any model.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from app.engines.base import Engine, generate_all
from app.errors import APIError, InvalidRequestError
from app.protocol import GenerateOutput, GenerateRequest, SamplingParams

PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a kingdom by the sea, there lived",
    "def fibonacci(n):",
    "今天天气很好，我们",
    "A" * 3,
    "Here is a long story about engines, caches and schedulers. " * 6,
    '{"name": "sglserve", "kind":',
    "1, 2, 3, 4, 5,",
]


def greedy(max_new_tokens: int = 24, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True, **kw)


async def run(engine: Engine, text: str, sampling: SamplingParams, **kw) -> GenerateOutput:
    return await generate_all(engine, GenerateRequest(text=text, sampling=sampling, **kw))


async def wait_until(predicate, timeout_s: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


async def test_concurrent_greedy_requests_match_their_sequential_outputs(engine: Engine):
    lengths = [8, 30, 12, 25, 5, 20, 16, 28]
    alone = [await run(engine, p, greedy(n)) for p, n in zip(PROMPTS, lengths)]
    together = await asyncio.gather(*(run(engine, p, greedy(n)) for p, n in zip(PROMPTS, lengths)))
    for a, b, n in zip(alone, together, lengths):
        assert len(a.token_ids) == n
        assert b.token_ids == a.token_ids
        assert b.text == a.text


async def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(engine: Engine):
    seeded = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = await run(engine, PROMPTS[1], seeded)
    others = [run(engine, p, SamplingParams(max_new_tokens=20, temperature=1.0)) for p in PROMPTS[2:6]]
    in_batch, *_ = await asyncio.gather(run(engine, PROMPTS[1], seeded), *others)
    assert in_batch.token_ids == alone.token_ids
    other_seed = await run(engine, PROMPTS[1], seeded.model_copy(update={"seed": 99}))
    assert other_seed.token_ids != alone.token_ids  # the seed matters (20 tokens: no coincidence)


async def _reference_text(engine: Engine) -> tuple[str, list[int]]:
    ref = await run(engine, PROMPTS[1], greedy(40))
    return ref.text, ref.token_ids


async def test_stop_string_ends_generation_and_is_trimmed(engine: Engine):
    text, _ = await _reference_text(engine)
    # A stop string from the middle of the reference text, first occurring there.
    start = next(i for i in range(len(text) // 3, len(text) - 2) if text[i:i + 2].strip() and
                 text.find(text[i:i + 2]) == i)
    stop = text[start:start + 2]
    trimmed = await run(engine, PROMPTS[1], greedy(40, stop=[stop]))
    assert trimmed.finish_reason is not None
    assert trimmed.finish_reason.type == "stop" and trimmed.finish_reason.matched == stop
    assert trimmed.text == text[:start]
    kept = await run(engine, PROMPTS[1], greedy(40, stop=[stop], no_stop_trim=True))
    assert kept.text.startswith(text[:start + 2])
    # Streamed: no increment ever shows part of the stop string that later matched.
    streamed: list[str] = []
    async for out in engine.generate(GenerateRequest(text=PROMPTS[1], sampling=greedy(40, stop=[stop]),
                                                     stream=True)):
        streamed.append(out.text)
    assert "".join(streamed) == text[:start]


async def test_stop_token_ids_end_generation(engine: Engine):
    _, ids = await _reference_text(engine)
    k = next(i for i in range(5, len(ids)) if ids.index(ids[i]) == i)  # first occurrence, not at 0
    out = await run(engine, PROMPTS[1], greedy(40, stop_token_ids=[ids[k]]))
    assert out.token_ids == ids[:k + 1]
    assert out.finish_reason is not None and out.finish_reason.type == "stop"
    assert out.finish_reason.matched == ids[k]
    assert out.text == engine.tokenizer.decode(ids[:k])  # the stop token's text is trimmed


async def test_max_new_tokens_ends_with_length(engine: Engine):
    out = await run(engine, PROMPTS[0], greedy(7))
    assert out.completion_tokens == 7 and len(out.token_ids) == 7
    assert out.finish_reason is not None
    assert out.finish_reason.type == "length" and out.finish_reason.length == 7
    assert out.prompt_tokens == len(engine.tokenizer.encode(PROMPTS[0]))


async def test_zero_new_tokens_only_reads_the_prompt(engine: Engine):
    out = await run(engine, PROMPTS[2], greedy(0))
    assert out.token_ids == [] and out.completion_tokens == 0
    assert out.prompt_tokens == len(engine.tokenizer.encode(PROMPTS[2]))
    assert out.finish_reason is not None and out.finish_reason.type == "length"


async def test_abort_mid_stream_ends_the_stream_and_frees_the_request(engine: Engine):
    request = GenerateRequest(text=PROMPTS[0], sampling=greedy(1500), stream=True)
    last: GenerateOutput | None = None
    tokens = 0
    async for out in engine.generate(request):
        tokens += len(out.token_ids)
        if last is None:
            assert await engine.abort(request.rid)
        last = out
    assert last is not None and last.finished
    assert last.finish_reason is not None and last.finish_reason.type == "abort"
    assert tokens < 1500
    assert await wait_until(lambda: engine.stats().num_running == 0 and engine.stats().num_waiting == 0)
    assert not await engine.abort(request.rid)  # no longer known


async def test_closing_the_stream_aborts_the_request(engine: Engine):
    before = engine.stats().requests_aborted_total
    stream = engine.generate(GenerateRequest(text=PROMPTS[3], sampling=greedy(1500), stream=True))
    seen = 0
    async for out in stream:
        seen += len(out.token_ids)
        if seen >= 2:
            break
    await stream.aclose()
    assert await wait_until(lambda: engine.stats().num_running == 0 and engine.stats().num_waiting == 0)
    assert await wait_until(lambda: engine.stats().requests_aborted_total == before + 1)


async def test_prompt_longer_than_the_context_is_rejected_with_both_numbers(engine: Engine):
    context = engine.model_info().context_length
    n = context + 10
    with pytest.raises(InvalidRequestError) as info:
        await generate_all(engine, GenerateRequest(input_ids=[5] * n, sampling=greedy(4)))
    assert info.value.status_code == 400
    assert str(n) in info.value.message and str(context) in info.value.message


async def test_output_logprobs_are_consistent(engine: Engine):
    out = await run(engine, PROMPTS[2], greedy(6), return_logprob=True, top_logprobs_num=3)
    assert out.output_token_logprobs is not None and out.output_top_logprobs is not None
    assert len(out.output_token_logprobs) == len(out.output_top_logprobs) == 6
    for (lp, tid, _), top, token in zip(out.output_token_logprobs, out.output_top_logprobs,
                                        out.token_ids):
        assert tid == token
        assert len(top) == 3
        values = [v for v, _, _ in top]
        assert values == sorted(values, reverse=True)
        assert lp <= 0.0
        assert top[0][1] == token and lp == pytest.approx(top[0][0], abs=1e-5)  # greedy = top-1


async def test_input_logprobs_cover_the_prompt_from_logprob_start_len(engine: Engine):
    ids = engine.tokenizer.encode(PROMPTS[5])
    for start in (0, 3):
        out = await run(engine, PROMPTS[5], greedy(2), return_logprob=True, logprob_start_len=start,
                        top_logprobs_num=2, return_text_in_logprobs=True)
        assert out.input_token_logprobs is not None and out.input_top_logprobs is not None
        assert len(out.input_token_logprobs) == len(ids) - start
        assert len(out.input_top_logprobs) == len(ids) - start
        assert [tid for _, tid, _ in out.input_token_logprobs] == ids[start:]
        assert all(isinstance(text, str) for _, _, text in out.input_token_logprobs)
        # SGLang's shape: the first entry has no logprob (its context's logits are not computed).
        assert out.input_token_logprobs[0][0] is None and out.input_top_logprobs[0] is None
        assert all(lp <= 0.0 for lp, _, _ in out.input_token_logprobs[1:])
        assert all(len(top) == 2 for top in out.input_top_logprobs[1:])


async def test_input_logprob_of_a_token_equals_its_output_logprob(engine: Engine):
    ids = engine.tokenizer.encode(PROMPTS[6])
    gen = await generate_all(engine, GenerateRequest(input_ids=ids, sampling=greedy(1),
                                                     return_logprob=True))
    assert gen.output_token_logprobs is not None
    out_lp, token, _ = gen.output_token_logprobs[0]
    score = await generate_all(engine, GenerateRequest(
        input_ids=ids + [token], sampling=greedy(0), return_logprob=True,
        logprob_start_len=len(ids) - 1))
    assert score.input_token_logprobs is not None and len(score.input_token_logprobs) == 2
    in_lp, in_token, _ = score.input_token_logprobs[1]
    assert in_token == token and in_lp == pytest.approx(out_lp, abs=1e-4)


async def test_streamed_increments_add_up_to_the_whole(engine: Engine):
    whole = await run(engine, PROMPTS[4], greedy(20))
    texts, ids = [], []
    async for out in engine.generate(GenerateRequest(text=PROMPTS[4], sampling=greedy(20), stream=True)):
        texts.append(out.text)
        ids.extend(out.token_ids)
        assert out.completion_tokens == len(ids)
    assert "".join(texts) == whole.text and ids == whole.token_ids


async def test_health_check_generates(engine: Engine):
    await engine.health_check(timeout_s=30)
    stats = engine.stats()
    assert stats.max_total_tokens > 0 and stats.requests_finished_total > 0


async def test_bad_input_ids_are_rejected(engine: Engine):
    vocab = engine.model_info().vocab_size
    with pytest.raises(APIError) as info:
        await generate_all(engine, GenerateRequest(input_ids=[1, vocab + 5], sampling=greedy(2)))
    assert info.value.status_code == 400
