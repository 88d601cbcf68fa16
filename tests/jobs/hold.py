"""A /run function that holds a program until the test says go (a file appears): a job that is
deterministically still running, with no assumption about machine speed."""

import asyncio
import os

from app.lang import function


@function(name="test.hold", timeout_s=900)
async def hold(path: str) -> str:
    while not os.path.exists(path):
        await asyncio.sleep(0.05)
    return "go"
