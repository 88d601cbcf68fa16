"""Engine faults below the serving layer, on the real tiny model: the engine's child process killed
(kill -9) and restarted by the replica side, a restart that keeps failing (give up -> the health
check fails, so Serve replaces the replica), and out-of-memory inside a step (a simulated OOM: the
test makes one forward pass raise torch.OutOfMemoryError / MemoryError)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from app.config import AppSettings
from app.engines.base import generate_all
from app.engines.factory import make_engine
from app.engines.process import ProcessEngine
from app.errors import EngineError, EngineOutOfMemoryError, EngineUnavailableError, InvalidRequestError
from app.protocol import GenerateRequest, SamplingParams

CACHE_DIR = os.environ.get("SGLSERVE_TEST_CACHE", str(Path(__file__).parents[2] / ".cache" / "models"))
DEADLINE_S = 120.0  # generous bound for polls on a busy shared machine (never a speed assumption)


def settings(**engine) -> AppSettings:
    base = {"max_total_tokens": 4096, "torch_threads": 1, "restart_backoff_s": 0.0}
    return AppSettings.from_args({"model": {"cache_dir": CACHE_DIR}, "engine": {**base, **engine}})


def long_request() -> GenerateRequest:
    return GenerateRequest(text="go", sampling=SamplingParams(max_new_tokens=2000, ignore_eos=True))


def short_request() -> GenerateRequest:
    return GenerateRequest(text="hello", sampling=SamplingParams(max_new_tokens=3, temperature=0.0))


async def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.05)


async def test_a_killed_engine_fails_its_streams_as_retryable_and_restarts(tiny_model_path):
    eng = make_engine(settings())
    assert isinstance(eng, ProcessEngine)
    await eng.start()
    try:
        await wait_until(eng.spare_ready, "the warm spare has imported the engine's libraries")
        stream = eng.generate(long_request())
        await stream.__anext__()
        old_pid = eng.server_args()["engine_pid"]
        eng._start_lock.acquire()  # holds the supervisor before it starts a new child
        try:
            os.kill(old_pid, signal.SIGKILL)
            with pytest.raises(EngineUnavailableError) as info:
                async for _ in stream:
                    pass
            error = info.value
            assert error.retryable and error.status_code == 503 and int(error.headers["Retry-After"]) >= 1
            assert "engine process exited" in error.message
            assert not eng.available
            assert eng.stats().num_running == 0  # no zombie requests in what the router sees
            with pytest.raises(EngineUnavailableError):  # refused at once while restarting, not queued
                await generate_all(eng, short_request())
        finally:
            eng._start_lock.release()
        await eng.health_check(timeout_s=DEADLINE_S)  # waits for the restart, then generates
        assert eng.available and eng.restarts == 1
        args = eng.server_args()
        assert args["engine_pid"] != old_pid and args["last_engine_restart_s"] > 0
        out = await generate_all(eng, short_request())
        assert out.completion_tokens == 3
        await wait_until(eng.spare_ready, "a new spare is ready for the next death")
        spare_pid = eng._spare[0].pid
    finally:
        await eng.shutdown()
    assert not eng.available
    with pytest.raises(ProcessLookupError):  # shutdown stopped the spare too
        os.kill(spare_pid, 0)


async def test_when_restarts_keep_failing_the_health_check_fails(tiny_model_path, tmp_path):
    eng = make_engine(settings(restart_max_attempts=2))
    await eng.start()
    try:
        eng.settings.model.model_path = str(tmp_path / "gone")  # every new child now fails to load
        os.kill(eng.server_args()["engine_pid"], signal.SIGKILL)
        await wait_until(lambda: eng._gave_up is not None, "the supervisor gives up")
        assert not eng.available and eng.restarts == 0
        with pytest.raises(EngineError, match="restart attempt"):
            await eng.health_check(timeout_s=5)
        with pytest.raises(EngineUnavailableError):
            await generate_all(eng, short_request())
    finally:
        await eng.shutdown()


@pytest.fixture(scope="module")
async def in_process_engine(tiny_model_path):
    eng = make_engine(settings(separate_process=False, max_total_tokens=256))
    await eng.start()
    yield eng
    await eng.shutdown()


@pytest.mark.parametrize("oom", [torch.OutOfMemoryError, MemoryError], ids=["device", "host"])
async def test_out_of_memory_in_a_step_is_a_retryable_503_and_the_engine_stays_up(in_process_engine, oom):
    eng = in_process_engine
    forward = eng.runner.forward
    calls = {"n": 0}

    def forward_that_runs_out_of_memory_once(*args, **kw):  # the simulated OOM
        calls["n"] += 1
        if calls["n"] == 1:
            raise oom("simulated: out of memory")
        return forward(*args, **kw)

    eng.runner.forward = forward_that_runs_out_of_memory_once
    try:
        with pytest.raises(EngineOutOfMemoryError) as info:
            await generate_all(eng, short_request())
        assert info.value.retryable and info.value.status_code == 503 and info.value.headers["Retry-After"]
        stats = eng.stats()
        assert stats.num_running == 0 and stats.num_waiting == 0  # its KV was freed
        out = await generate_all(eng, short_request())  # the engine stays up: the retry is served
        assert out.completion_tokens == 3
    finally:
        eng.runner.forward = forward


async def test_a_request_that_can_never_fit_is_a_clear_400(in_process_engine):
    too_long = GenerateRequest(input_ids=[5] * 300, sampling=SamplingParams(max_new_tokens=1))
    with pytest.raises(InvalidRequestError, match="can never fit") as info:
        await generate_all(in_process_engine, too_long)
    assert info.value.status_code == 400
