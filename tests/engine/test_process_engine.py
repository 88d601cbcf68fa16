"""The embedded engine in a child process (ProcessEngine): the whole engine contract, the same
outputs as in process, and what happens when either side of the process boundary dies."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from contract_cases import *  # noqa: E402,F401,F403  (pytest collects the imported cases)

from app.config import AppSettings  # noqa: E402
from app.engines.base import generate_all  # noqa: E402
from app.engines.factory import make_engine  # noqa: E402
from app.engines.process import ProcessEngine  # noqa: E402
from app.errors import EngineError  # noqa: E402
from app.protocol import GenerateRequest, SamplingParams  # noqa: E402

CACHE_DIR = os.environ.get("SGLSERVE_TEST_CACHE", str(Path(__file__).parents[2] / ".cache" / "models"))
ENGINE = {"max_total_tokens": 16384, "torch_threads": 1, "chunked_prefill_size": 64,
          "warm_spare_process": False}  # restarts: tests/chaos


def settings(**engine) -> AppSettings:
    return AppSettings.from_args({"model": {"cache_dir": CACHE_DIR}, "engine": {**ENGINE, **engine}})


@pytest.fixture(scope="module")
async def engine(tiny_model_path):
    eng = make_engine(settings())
    assert isinstance(eng, ProcessEngine)  # the default for the embedded engine
    await eng.start()
    yield eng
    await eng.shutdown()


async def test_outputs_equal_the_in_process_engine(engine):
    in_process = make_engine(settings(separate_process=False))
    assert not isinstance(in_process, ProcessEngine)
    await in_process.start()
    try:
        for prompt in ["Once upon a time", "The capital of", "1 2 3"]:
            request = dict(text=prompt, sampling=SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True))
            a = await generate_all(engine, GenerateRequest(**request))
            b = await generate_all(in_process, GenerateRequest(**request))
            assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason)
    finally:
        await in_process.shutdown()


async def test_stats_and_settings_come_from_the_child(engine):
    before = engine.stats().requests_finished_total
    await generate_all(engine, GenerateRequest(text="hi", sampling=SamplingParams(max_new_tokens=3)))
    assert engine.stats().requests_finished_total == before + 1  # fresh when the caller sees its end
    args = engine.server_args()
    assert args["separate_process"] is True and args["engine_pid"] != os.getpid()
    assert args["max_total_tokens"] == ENGINE["max_total_tokens"]
    assert engine.tokenizer.decode(engine.tokenizer.encode("hello world")) == "hello world"
    assert await engine.flush_cache() is True


async def test_a_killed_engine_process_fails_streams_and_health(tiny_model_path):
    # With restarts off, the replica's health check fails and Serve replaces the replica
    # (restarts: tests/chaos/test_engine_restart.py).
    eng = make_engine(settings(restart_max_attempts=0))
    await eng.start()
    try:
        stream = eng.generate(GenerateRequest(text="x", sampling=SamplingParams(max_new_tokens=400, ignore_eos=True)))
        await stream.__anext__()
        os.kill(eng.server_args()["engine_pid"], signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(EngineError, match="engine process exited"):
            async for _ in stream:
                pass
        assert time.monotonic() - started < 5
        with pytest.raises(EngineError):
            await eng.health_check(timeout_s=2)
        with pytest.raises(EngineError):
            await generate_all(eng, GenerateRequest(text="x", sampling=SamplingParams(max_new_tokens=2)))
    finally:
        await eng.shutdown()


async def test_the_engine_process_exits_when_the_replica_side_goes_away(tiny_model_path):
    eng = make_engine(settings(restart_max_attempts=0))
    await eng.start()
    proc = eng._proc
    eng._child_gone("simulated: the replica process died")  # closes our end of the socket, as death does
    deadline = time.monotonic() + 20
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert proc.returncode is not None, "the orphaned engine process kept running"


async def test_a_start_failure_is_raised_in_the_replica(tmp_path):
    eng = make_engine(AppSettings.from_args({"model": {"model_path": str(tmp_path / "no-such-model")}}))
    with pytest.raises(Exception) as info:
        await eng.start()
    assert "no-such-model" in str(info.value)
    assert eng._proc is not None and eng._proc.poll() is not None  # the child did not linger


async def test_stats_are_fresh_when_a_flush_returns(engine):
    await generate_all(engine, GenerateRequest(text="fill the cache a little",
                                               sampling=SamplingParams(max_new_tokens=4)))
    assert engine.stats().num_used_tokens > 0
    assert await engine.flush_cache() is True
    assert engine.stats().num_used_tokens == 0  # no wait for the periodic stats message
