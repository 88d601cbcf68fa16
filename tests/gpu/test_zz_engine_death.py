"""A dying SGLang engine fails its requests and its health check, never the process that hosts it.

Runs last in the GPU suite (it kills the session engine's scheduler). Inside Ray Serve this is what
lets the replica's health check fail so Serve replaces the replica, instead of SGLang's own SIGQUIT
handling killing the whole Ray worker.
"""

from __future__ import annotations

import asyncio
import os
import signal

import psutil
import pytest

from app.errors import EngineError
from app.protocol import GenerateRequest, SamplingParams

# The session engine lives on the session event loop; tests must run there too.
pytestmark = [pytest.mark.gpu, pytest.mark.asyncio(loop_scope="session")]


def scheduler_pid() -> int:
    for child in psutil.Process().children(recursive=True):
        title = " ".join(child.cmdline()) + " " + child.name()
        if "scheduler" in title:
            return child.pid
    raise AssertionError("no SGLang scheduler process among this process's children")


async def test_killing_the_scheduler_fails_requests_and_health_checks_but_not_the_host(sglang_engine):
    request = GenerateRequest(
        input_ids=[11] * 32,
        sampling=SamplingParams(max_new_tokens=1900, temperature=0.0, ignore_eos=True),
        stream=True,
    )
    stream = sglang_engine.generate(request)
    first = await stream.__anext__()
    assert first.token_ids

    os.kill(scheduler_pid(), signal.SIGKILL)

    async def drain():
        async for _ in stream:
            pass

    with pytest.raises(EngineError, match="SGLang"):
        await asyncio.wait_for(drain(), timeout=30)
    with pytest.raises(EngineError, match="dead"):
        await sglang_engine.health_check(timeout_s=5)
    with pytest.raises(EngineError):
        [o async for o in sglang_engine.generate(GenerateRequest(input_ids=[1, 2], sampling=SamplingParams(max_new_tokens=1)))]
    assert sglang_engine.stats().num_running >= 0  # stats still answer
