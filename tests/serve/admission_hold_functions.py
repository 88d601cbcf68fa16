"""A server-side /run function that holds its request (and so its admission slot) until the test
releases it, so tests/serve/test_admission_http.py fills the scheduler deterministically, whatever
the machine's speed. Registered through `run.function_modules` by that test only."""

from __future__ import annotations

import asyncio
import os

from app.lang import function

HOLD_LIMIT_S = 300.0  # a forgotten release must not hold a test app forever


@function(name="hold.until_released", timeout_s=HOLD_LIMIT_S)
async def until_released(path: str) -> str:
    """Returns once the file at `path` exists (the test creates it to release the request)."""
    while not os.path.exists(path):
        await asyncio.sleep(0.02)
    return "released"
