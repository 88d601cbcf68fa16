"""A virtual-time asyncio event loop for simulations (benchmarks only).

`loop.time()` starts at 0 and jumps straight to the next scheduled timer whenever nothing is
ready, so simulated sleeps cost no wall time and measurements are free of CPU noise. Only for
code that does no real I/O (the simulated engine, the scheduler's algorithms): a selector that
never waits cannot see sockets.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class _NoWaitSelector(selectors.DefaultSelector):
    def __init__(self, clock: "VirtualTimeLoop") -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None):
        ready = super().select(0)  # the loop's self-pipe only; never block
        if not ready and timeout:
            self._clock.advance(timeout)
        return ready


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._virtual_now = 0.0
        super().__init__(_NoWaitSelector(self))

    def time(self) -> float:
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        self._virtual_now += seconds


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main)
    finally:
        loop.close()
