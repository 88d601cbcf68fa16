"""How our settings become `sglang.Engine` arguments, and what happens where sglang cannot run.

Runs everywhere (no GPU needed): the mapping is plain data. `test_sglang_engine.py` checks on a GPU
that the same values arrive in SGLang's resolved ServerArgs.
"""

from __future__ import annotations

import pytest

from app.config import AppSettings
from app.engines.sglang_engine import SGLangEngine, check_server_arg_names, server_args_from_settings
from app.errors import EngineError


def settings(**engine) -> AppSettings:
    return AppSettings.from_args({"model": {"model_path": "/models/llama"}, "engine": {"kind": "sglang", **engine}})


def test_every_engine_option_maps_to_the_server_arg_of_the_same_name():
    s = settings(
        mem_fraction_static=0.8, chunked_prefill_size=8192, max_running_requests=128,
        max_total_tokens=100000, schedule_policy="fcfs", quantization="fp8", kv_cache_dtype="fp8_e5m2",
        tp_size=2, load_format="dummy", grammar_backend="none", enable_metrics=False,
        attention_backend="triton", sampling_backend="pytorch", disable_cuda_graph=True,
        max_prefill_tokens=16384, disable_radix_cache=True,
    )
    kwargs = server_args_from_settings(s.model, s.engine)
    assert kwargs == {
        "model_path": "/models/llama", "tokenizer_path": "/models/llama",
        "served_model_name": "/models/llama", "dtype": "auto", "trust_remote_code": False,
        "mem_fraction_static": 0.8, "chunked_prefill_size": 8192, "max_running_requests": 128,
        "max_total_tokens": 100000, "schedule_policy": "fcfs", "quantization": "fp8",
        "kv_cache_dtype": "fp8_e5m2", "tp_size": 2, "load_format": "dummy",
        "grammar_backend": "none", "enable_metrics": False, "attention_backend": "triton",
        "sampling_backend": "pytorch", "disable_cuda_graph": True, "max_prefill_tokens": 16384,
        "disable_radix_cache": True,
    }


def test_unset_options_keep_sglangs_defaults_and_extra_args_win():
    s = AppSettings.from_args(
        {
            "model": {"model_path": "m", "context_length": 4096, "served_model_name": "chat"},
            "engine": {"kind": "sglang", "sglang_extra_args": {"chunked_prefill_size": -1, "page_size": 16}},
        }
    )
    kwargs = server_args_from_settings(s.model, s.engine)
    for unset in ("mem_fraction_static", "max_total_tokens", "quantization", "attention_backend", "sampling_backend"):
        assert unset not in kwargs
    assert kwargs["context_length"] == 4096
    assert kwargs["served_model_name"] == "chat"
    assert kwargs["chunked_prefill_size"] == -1 and kwargs["page_size"] == 16


def test_names_that_serverargs_lacks_are_reported():
    import dataclasses

    @dataclasses.dataclass
    class FakeServerArgs:  # stands in for sglang's dataclass where sglang cannot be imported
        model_path: str = ""
        page_size: int = 1

    check_server_arg_names({"model_path": "m", "page_size": 16}, FakeServerArgs)
    with pytest.raises(ValueError, match=r"\['pagesize'\]"):
        check_server_arg_names({"model_path": "m", "pagesize": 16}, FakeServerArgs)


def test_sampling_params_keep_sglang_names_and_seed_becomes_sampling_seed():
    from app.protocol import SamplingParams

    params = SGLangEngine.sampling_params_for_sglang(
        SamplingParams(max_new_tokens=7, temperature=0.5, stop=["\n"], seed=3, regex="[0-9]+")
    )
    assert params["max_new_tokens"] == 7 and params["temperature"] == 0.5
    assert params["stop"] == ["\n"] and params["regex"] == "[0-9]+"
    assert params["sampling_seed"] == 3
    assert "seed" not in params and "n" not in params and "json_schema" not in params
    assert "stop_token_ids" not in params, "empty lists are left to SGLang's defaults"


async def test_start_without_cuda_or_sglang_says_what_is_missing(gpu_status):
    ok, _ = gpu_status
    if ok:
        pytest.skip("this machine can run sglang")
    engine = SGLangEngine.from_settings(settings())
    with pytest.raises(EngineError, match="sglang|CUDA"):
        await engine.start()


def test_the_unvalidated_hot_path_output_equals_a_validated_one():
    from app.engines.sglang_stream import new_output
    from app.protocol import FinishReason, GenerateOutput

    fields = dict(
        rid="r1", text="hi", token_ids=[5, 6], finished=True,
        finish_reason=FinishReason(type="length", length=2), prompt_tokens=3, completion_tokens=2,
        cached_tokens=1, output_token_logprobs=[(-0.5, 5, None), (-0.25, 6, None)],
        output_top_logprobs=None, input_token_logprobs=None, input_top_logprobs=None,
        engine_arrival_time=1.0, first_token_time=2.0, served_by="r1", text_lens=[1, 1],
    )
    fast = new_output(**dict(fields))
    assert fast == GenerateOutput(**fields)
    assert fast.model_dump() == GenerateOutput(**fields).model_dump()
    fast.text = "changed"  # still a normal, mutable model
    assert fast.text == "changed"
