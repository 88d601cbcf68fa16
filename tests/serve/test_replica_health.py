"""The model replica's health probe: a real generation when nothing proves the engine serves, none
when the engine generated tokens since the last probe (then a probe would only take a slot in a
busy batch). Built outside Ray Serve, on the simulated engine (a simulator of engine timing)."""

from __future__ import annotations

import pytest

from app.protocol import GenerateRequest, SamplingParams
from app.replica import ModelReplica

pytestmark = [pytest.mark.asyncio,
              pytest.mark.filterwarnings("ignore:coroutine 'ModelReplica.__del__' was never awaited")]


async def make_replica() -> ModelReplica:
    replica = ModelReplica.__new__(ModelReplica)
    await replica.__init__({"engine": {"kind": "simulated"}})
    return replica


async def test_probes_run_only_when_no_tokens_were_generated_since_the_last_one():
    replica = await make_replica()
    probes = []
    real_probe = replica.engine.health_check

    async def counted_probe(timeout_s: float = 10.0) -> None:
        probes.append(timeout_s)
        await real_probe(timeout_s)

    replica.engine.health_check = counted_probe
    try:
        await replica.check_health()
        assert len(probes) == 1  # the first check always generates
        await replica.check_health()
        assert len(probes) == 2  # idle since: nothing but a probe proves it serves

        request = GenerateRequest(input_ids=[5, 6, 7], sampling=SamplingParams(max_new_tokens=4, ignore_eos=True))
        async for _ in replica.engine.generate(request):
            pass
        await replica.check_health()
        assert len(probes) == 2  # tokens came out since the last probe: no probe in the batch
        await replica.check_health()
        assert len(probes) == 3  # and idle again: a probe

        async for _ in replica.engine.generate(request):
            pass
        replica._draining = True  # a replica that says unavailable is probed whatever it generated
        await replica.check_health()
        assert len(probes) == 4
    finally:
        await replica.engine.shutdown()
