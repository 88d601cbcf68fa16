"""The embedded engine on a CUDA device (the default wherever CUDA is present): skipped without one.

Runs on the lent H100 with the other GPU tests. The tiny model has random weights, so these check
mechanics on the GPU (continuous batching of prefill and decode, sampling, stops, aborts, stats),
not text quality.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch

from app.config import EngineSettings, ModelSettings
from app.engines.base import generate_all
from app.engines.embedded import EmbeddedEngine
from app.protocol import GenerateRequest, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CACHE_DIR = os.environ.get("SGLSERVE_TEST_CACHE", str(Path(__file__).resolve().parents[2] / ".cache" / "models"))


async def test_the_embedded_engine_batches_on_the_gpu():
    engine = EmbeddedEngine(ModelSettings(cache_dir=CACHE_DIR, dtype="float32"), EngineSettings(device="auto"))
    await engine.start()
    try:
        assert engine.runner.device.type == "cuda"  # "auto" picks the GPU
        greedy = [GenerateRequest(input_ids=list(range(300, 300 + n)), sampling=SamplingParams(
            max_new_tokens=m, temperature=0, ignore_eos=True)) for n, m in ((5, 12), (40, 3), (130, 20), (9, 7))]
        alone = [await generate_all(engine, r.model_copy(update={"rid": r.rid + "-1"})) for r in greedy]
        together = await asyncio.gather(*(generate_all(engine, r) for r in greedy))
        assert [len(o.token_ids) for o in together] == [12, 3, 20, 7]
        # Same outputs one by one and batched: float32 leaves no room for a different argmax.
        assert [o.token_ids for o in together] == [o.token_ids for o in alone]

        seeded = GenerateRequest(text="hello", sampling=SamplingParams(max_new_tokens=16, temperature=0.9,
                                                                        top_p=0.9, seed=7, ignore_eos=True))
        first = await generate_all(engine, seeded)
        again = await generate_all(engine, seeded.model_copy(update={"rid": "again"}))
        assert first.token_ids == again.token_ids and len(first.token_ids) == 16

        long = GenerateRequest(text="go", sampling=SamplingParams(max_new_tokens=2000, ignore_eos=True), stream=True)
        stream = engine.generate(long)
        await stream.__anext__()
        assert await engine.abort(long.rid)
        await stream.aclose()
        await asyncio.sleep(0.2)
        assert engine.stats().num_running == 0
    finally:
        await engine.shutdown()
