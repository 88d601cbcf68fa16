"""The engine contract (contract_cases.py) run against the embedded engine on the tiny model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from contract_cases import *  # noqa: E402,F401,F403  (pytest collects the imported cases)

from app.config import EngineSettings, ModelSettings  # noqa: E402
from app.engines.embedded import EmbeddedEngine  # noqa: E402

CACHE_DIR = os.environ.get("SGLSERVE_TEST_CACHE", str(Path(__file__).parents[2] / ".cache" / "models"))
torch.set_num_threads(1)


@pytest.fixture(scope="module")
async def engine(tiny_model_path):
    eng = EmbeddedEngine(
        ModelSettings(cache_dir=CACHE_DIR),
        EngineSettings(max_total_tokens=16384, torch_threads=1, chunked_prefill_size=64),
    )
    await eng.start()
    yield eng
    await eng.shutdown()
