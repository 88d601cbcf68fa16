"""The SGLang adapter against the real `sglang.Engine` on a GPU (tiny model).

These are the behaviours specific to the adapter (SGLang's cumulative stream turned into
increments, aborts, logprobs, cache control, SGLang's own counters, settings pass-through, error
mapping); the engine-agnostic contract runs in `test_contract_sglang.py`.
"""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import pytest

from app.engines.base import generate_all
from app.errors import EngineError, InvalidRequestError, ValidationError
from app.protocol import GenerateRequest, SamplingParams

# The session engine lives on the session event loop; tests must run there too.
pytestmark = [pytest.mark.gpu, pytest.mark.asyncio(loop_scope="session")]


def greedy(max_new_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True, **kw)


def random_prompt(engine, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    vocab = engine.model_info().vocab_size
    return [rng.randrange(10, vocab) for _ in range(n)]


async def collect(engine, request: GenerateRequest):
    return [out async for out in engine.generate(request)]


async def merged(engine, request: GenerateRequest) -> SimpleNamespace:
    """The whole output, concatenated by hand: GenerateOutput.merge re-validates and rejects the
    None logprob SGLang gives the first prompt token (see the report to the lead)."""
    outs = await collect(engine, request)
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])

    def cat(name):
        parts = [getattr(o, name) for o in outs if getattr(o, name) is not None]
        return [x for part in parts for x in part]

    return SimpleNamespace(
        token_ids=cat("token_ids"),
        output_token_logprobs=cat("output_token_logprobs"),
        output_top_logprobs=cat("output_top_logprobs"),
        input_token_logprobs=next((o.input_token_logprobs for o in outs if o.input_token_logprobs), None),
        input_top_logprobs=next((o.input_top_logprobs for o in outs if o.input_top_logprobs), None),
    )


async def test_text_prompt_is_tokenized_and_output_text_matches_the_tokens(sglang_engine):
    tok = sglang_engine.tokenizer
    out = await generate_all(
        sglang_engine, GenerateRequest(text="The quick brown fox", sampling=greedy(16))
    )
    assert out.prompt_tokens == len(tok.encode("The quick brown fox"))
    assert len(out.token_ids) == out.completion_tokens == 16
    assert out.finish_reason is not None and out.finish_reason.type == "length"
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)


async def test_stream_increments_add_up_to_the_whole_output(sglang_engine):
    prompt = random_prompt(sglang_engine, 40, seed=1)
    increments = await collect(
        sglang_engine, GenerateRequest(input_ids=prompt, sampling=greedy(48), stream=True)
    )
    whole = await generate_all(sglang_engine, GenerateRequest(input_ids=prompt, sampling=greedy(48)))
    assert len(increments) > 1, "SGLang streams token by token; the adapter must pass increments on"
    assert [t for inc in increments for t in inc.token_ids] == whole.token_ids
    assert "".join(inc.text for inc in increments) == whole.text
    assert [inc.finished for inc in increments] == [False] * (len(increments) - 1) + [True]
    counts = [inc.completion_tokens for inc in increments]
    assert counts == sorted(counts) and counts[-1] == 48
    assert all(inc.prompt_tokens == 40 for inc in increments)
    assert increments[0].first_token_time >= increments[0].engine_arrival_time


async def test_concurrent_requests_each_get_their_own_greedy_output(sglang_engine):
    prompts = [random_prompt(sglang_engine, 16 + 7 * i, seed=100 + i) for i in range(8)]
    alone = [
        await generate_all(sglang_engine, GenerateRequest(input_ids=p, sampling=greedy(24)))
        for p in prompts
    ]
    together = await asyncio.gather(
        *(
            generate_all(sglang_engine, GenerateRequest(input_ids=p, sampling=greedy(24)))
            for p in prompts
        )
    )
    for a, b in zip(alone, together):
        assert b.token_ids == a.token_ids
        assert b.rid != a.rid


async def test_abort_ends_a_running_request_with_an_abort_finish(sglang_engine):
    before = sglang_engine.stats()
    request = GenerateRequest(
        input_ids=random_prompt(sglang_engine, 32, seed=2), sampling=greedy(1500), stream=True
    )
    got: list[int] = []
    final = None
    async for out in sglang_engine.generate(request):
        got += out.token_ids
        if len(got) >= 4 and final is None and not out.finished:
            assert await sglang_engine.abort(request.rid) is True
        if out.finished:
            final = out
    assert final is not None and final.finish_reason.type == "abort"
    assert 4 <= len(got) < 1500
    assert await sglang_engine.abort(request.rid) is False, "a finished request is no longer known"
    after = sglang_engine.stats()
    assert after.requests_aborted_total == before.requests_aborted_total + 1


async def test_a_consumer_that_stops_reading_aborts_its_request(sglang_engine):
    request = GenerateRequest(
        input_ids=random_prompt(sglang_engine, 32, seed=3), sampling=greedy(1500), stream=True
    )
    stream = sglang_engine.generate(request)
    first = await stream.__anext__()
    assert first.token_ids
    await stream.aclose()
    tokenizer_manager = sglang_engine.sgl.tokenizer_manager
    for _ in range(100):  # SGLang drops the request state once the scheduler confirms the abort
        if request.rid not in tokenizer_manager.rid_to_state and sglang_engine.stats().num_running == 0:
            break
        await asyncio.sleep(0.05)
    assert request.rid not in tokenizer_manager.rid_to_state
    assert sglang_engine.stats().num_running == 0


async def test_output_logprobs_and_top_k_describe_the_greedy_choices(sglang_engine):
    prompt = random_prompt(sglang_engine, 24, seed=4)
    out = await merged(
        sglang_engine,
        GenerateRequest(
            input_ids=prompt, sampling=greedy(12), return_logprob=True, top_logprobs_num=3,
            logprob_start_len=0,
        ),
    )
    assert len(out.output_token_logprobs) == len(out.token_ids) == 12
    assert [tid for _, tid, _ in out.output_token_logprobs] == out.token_ids
    assert all(lp <= 0.0 for lp, _, _ in out.output_token_logprobs)
    assert len(out.output_top_logprobs) == 12
    for chosen, top in zip(out.output_token_logprobs, out.output_top_logprobs):
        assert len(top) == 3
        assert [lp for lp, _, _ in top] == sorted((lp for lp, _, _ in top), reverse=True)
        assert top[0][1] == chosen[1], "greedy picks the most likely token"
        assert top[0][0] == pytest.approx(chosen[0], abs=1e-3)
    # Input logprobs: one entry per prompt token from logprob_start_len, ids in prompt order.
    assert [tid for _, tid, _ in out.input_token_logprobs] == prompt
    assert out.input_token_logprobs[0][0] is None, "no logprob for the first prompt token"
    assert all(lp <= 0.0 for lp, _, _ in out.input_token_logprobs[1:])
    assert len(out.input_top_logprobs) == len(prompt)


async def test_logprob_text_is_filled_when_asked(sglang_engine):
    out = await merged(
        sglang_engine,
        GenerateRequest(
            text="Hello", sampling=greedy(4), return_logprob=True, return_text_in_logprobs=True
        ),
    )
    tok = sglang_engine.tokenizer
    assert [text for _, _, text in out.output_token_logprobs] == [
        tok.decode([t], skip_special_tokens=False) for t in out.token_ids
    ]


async def test_prefix_cache_hits_are_counted_and_flush_cache_drops_them(sglang_engine):
    prompt = random_prompt(sglang_engine, 300, seed=5)
    assert await sglang_engine.flush_cache() is True
    before = sglang_engine.stats()
    first = await generate_all(sglang_engine, GenerateRequest(input_ids=prompt, sampling=greedy(1)))
    second = await generate_all(sglang_engine, GenerateRequest(input_ids=prompt, sampling=greedy(1)))
    assert first.cached_tokens == 0
    assert second.cached_tokens >= 256, "the second identical prompt reuses the cached prefix"
    after = sglang_engine.stats()
    assert after.cache_hit_tokens - before.cache_hit_tokens == second.cached_tokens
    assert after.cache_query_tokens - before.cache_query_tokens == 600
    assert await sglang_engine.flush_cache() is True
    third = await generate_all(sglang_engine, GenerateRequest(input_ids=prompt, sampling=greedy(1)))
    assert third.cached_tokens == 0


async def test_stats_show_sglang_load_while_requests_run(sglang_engine):
    requests = [
        GenerateRequest(input_ids=random_prompt(sglang_engine, 64, seed=60 + i), sampling=greedy(400))
        for i in range(4)
    ]
    tasks = [asyncio.create_task(generate_all(sglang_engine, r)) for r in requests]
    seen_running = 0
    seen_used = 0
    for _ in range(200):
        stats = sglang_engine.stats()
        seen_running = max(seen_running, stats.num_running)
        seen_used = max(seen_used, stats.num_used_tokens)
        if seen_running == 4:
            break
        await asyncio.sleep(0.02)
    assert stats.outstanding_tokens > 0
    await asyncio.gather(*tasks)
    assert seen_running == 4
    assert seen_used >= 4 * 64
    idle = sglang_engine.stats()
    assert idle.max_total_tokens > 0
    assert idle.outstanding_tokens == 0


async def test_health_check_runs_a_real_generation(sglang_engine):
    before = sglang_engine.stats().requests_finished_total
    await sglang_engine.health_check(timeout_s=30)
    assert sglang_engine.stats().requests_finished_total == before, "health checks are not traffic"


async def test_bad_input_is_rejected_with_a_clear_error_and_the_engine_lives_on(sglang_engine):
    info = sglang_engine.model_info()
    with pytest.raises(InvalidRequestError, match=str(info.vocab_size)):
        await collect(sglang_engine, GenerateRequest(input_ids=[1, info.vocab_size], sampling=greedy(2)))
    too_long = [5] * (info.context_length + 1)
    with pytest.raises(InvalidRequestError, match=str(info.context_length)):
        await collect(sglang_engine, GenerateRequest(input_ids=too_long, sampling=greedy(2)))
    # SGLang's own check: prompt + max_new_tokens over the context.
    with pytest.raises(InvalidRequestError, match="context length"):
        await collect(
            sglang_engine,
            GenerateRequest(input_ids=[5] * 100, sampling=greedy(info.context_length)),
        )
    await sglang_engine.health_check(timeout_s=30)


async def test_json_schema_constraint_is_enforced_and_a_broken_schema_is_a_validation_error(
    sglang_engine,
):
    if sglang_engine.server_args().get("grammar_backend") == "none":
        with pytest.raises(ValidationError):
            await collect(sglang_engine, GenerateRequest(text="x", sampling=greedy(8, regex="[ab]+")))
        return
    constrained = SamplingParams(max_new_tokens=8, temperature=0.0, regex="(yes|no)")
    out = await generate_all(sglang_engine, GenerateRequest(text="Answer:", sampling=constrained))
    assert out.text in ("yes", "no")
    with pytest.raises(ValidationError):
        await collect(
            sglang_engine,
            GenerateRequest(text="x", sampling=greedy(8, json_schema='{"type": "nonsense-type"')),
        )


async def test_every_configured_option_reaches_sglang_server_args(sglang_engine, tiny_engine_args):
    configured = tiny_engine_args["engine"]
    resolved = sglang_engine.sgl.server_args
    for name in (
        "mem_fraction_static", "max_running_requests", "chunked_prefill_size", "max_prefill_tokens",
        "schedule_policy", "attention_backend", "sampling_backend", "grammar_backend",
        "kv_cache_dtype", "enable_metrics",
    ):
        assert getattr(resolved, name) == configured[name], name
    assert resolved.dtype == "float16"
    assert resolved.context_length == 2048
    assert resolved.disable_cuda_graph is False
    assert resolved.tp_size == 1
    assert resolved.random_seed == 0
    echoed = sglang_engine.server_args()
    assert echoed["engine"].startswith("sglang ")
    assert echoed["resolved_max_running_requests"] == 32


async def test_unknown_sglang_extra_args_fail_start_by_name(tiny_engine_args):
    from app.config import AppSettings
    from app.engines.sglang_engine import SGLangEngine

    args = tiny_engine_args
    args["engine"]["sglang_extra_args"] = {"mem_fraction_statik": 0.5}
    engine = SGLangEngine.from_settings(AppSettings.from_args(args))
    with pytest.raises(EngineError, match="mem_fraction_statik"):
        await engine.start()
