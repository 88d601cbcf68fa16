"""The engine contract (tests/engine/contract_cases.py) run against the real sglang.Engine.

The `engine` fixture (conftest.py) is the session's SGLangEngine on the tiny model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
from contract_cases import *  # noqa: E402,F401,F403  (pytest collects the imported cases)

# The session engine lives on the session event loop; tests must run there too.
pytestmark = [pytest.mark.gpu, pytest.mark.asyncio(loop_scope="session")]


@pytest.mark.skip(
    reason="SGLang honours per-request seeds only with enable_deterministic_inference "
    "(batch-invariant kernels, slower); this suite's engine runs SGLang's default kernels"
)
async def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(engine):  # noqa: F811
    """Replaces the imported case of the same name for this engine (see the skip reason)."""
