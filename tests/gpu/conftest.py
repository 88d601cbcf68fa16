"""Fixtures for the GPU suite: one real `sglang.Engine` (through our adapter) per session.

Everything here that needs a GPU is skipped unless CUDA and the sglang runtime are importable; the
settings tests (`test_sglang_settings.py`) run everywhere. Run on the lent H100 with
`scripts/gpu/run_on_device.sh` (one call: unpack sglang, build the tiny model, pytest, benchmark).

The engine serves the tiny model in float16 (random weights, real tokenizer, Llama architecture), so outputs
are meaningless text but every code path of SGLang runs for real: the triton attention backend,
CUDA graphs, the radix cache, xgrammar (when importable), logprobs, aborts.

Every GPU test module marks its tests `asyncio(loop_scope="session")`: the engine's
output loop lives there, and a test on its own loop would wait forever for SGLang's outputs.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GPU_CACHE_DIR = os.environ.get("SGLSERVE_TEST_CACHE", str(REPO / ".cache" / "models"))


def cuda_and_sglang() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if importlib.util.find_spec("sglang") is None:
        return False, "sglang is not installed"
    try:
        import sglang.srt.entrypoints.engine  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: cannot run here
        return False, f"the sglang runtime does not import: {type(exc).__name__}: {exc}"
    return True, ""



_GPU_OK: tuple[bool, str] | None = None


def gpu_available() -> tuple[bool, str]:
    global _GPU_OK
    if _GPU_OK is None:
        _GPU_OK = cuda_and_sglang()
    return _GPU_OK


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here not in Path(str(item.fspath)).parents:
            continue
        if item.get_closest_marker("gpu") is not None:
            ok, why = gpu_available()
            if not ok:
                item.add_marker(pytest.mark.skip(reason=f"GPU suite: {why}"))


def grammar_backend() -> str:
    """xgrammar unless the device run found it not importable (the driver sets this)."""
    return os.environ.get("SGLSERVE_GPU_GRAMMAR_BACKEND", "xgrammar")


def tiny_engine_args() -> dict:
    """Settings of the session engine: the tiny model in bf16 on the triton backends, a small KV
    budget, CUDA graphs on (as in production)."""
    return {
        "model": {
            "model_path": "sglserve/tiny-llama",
            "cache_dir": GPU_CACHE_DIR,
            "dtype": "float16",  # more mantissa than bf16: logprob comparisons stay tight
            "context_length": 2048,
        },
        "engine": {
            "kind": "sglang",
            "mem_fraction_static": 0.3,
            "max_running_requests": 32,
            "chunked_prefill_size": 1024,
            "max_prefill_tokens": 4096,
            "schedule_policy": "lpm",
            "attention_backend": "triton",
            "sampling_backend": "pytorch",
            "grammar_backend": grammar_backend(),
            "kv_cache_dtype": "auto",
            "enable_metrics": True,
            "sglang_extra_args": {"random_seed": 0, "log_level": "warning"},
        },
    }


@pytest.fixture(scope="session")
def gpu_status() -> tuple[bool, str]:
    """(can sglang run here, why not)."""
    return gpu_available()


@pytest.fixture(name="tiny_engine_args")
def tiny_engine_args_fixture() -> dict:
    return tiny_engine_args()


@pytest.fixture(scope="session")
async def sglang_engine() -> AsyncIterator:
    from app.config import AppSettings
    from app.engines.sglang_engine import SGLangEngine

    engine = SGLangEngine.from_settings(AppSettings.from_args(tiny_engine_args()))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()


@pytest.fixture(scope="session")
async def engine(sglang_engine):
    """The name the engine-contract cases use."""
    return sglang_engine
