"""app/sigterm.py's SigtermDrain on one event loop, without Ray: once the drain begins it calls
its on_start (the deployment refuses new work), waits for the work it holds, then exits. The
process exit is replaced by a recorder here; the real exit in a Ray worker is tested by
test_sigterm_hook.py, and the Ingress's and Scheduler's drains under Serve by test_chaos_serve.py."""

from __future__ import annotations

import asyncio

import pytest

from app import sigterm

pytestmark = pytest.mark.asyncio


async def test_the_drain_refuses_then_waits_for_held_work_then_exits(monkeypatch):
    exits: list[int] = []
    monkeypatch.setattr(sigterm, "exit_now", lambda: exits.append(drain.busy))
    started: list[bool] = []
    drain = sigterm.SigtermDrain("test", default_budget_s=600, on_start=lambda: started.append(True))
    gate = asyncio.Event()

    async def held_work() -> None:
        with drain.holding():
            await gate.wait()

    work = asyncio.create_task(held_work())
    await asyncio.sleep(0)
    assert drain.busy == 1 and not drain.draining

    drain._start()  # what the SIGTERM hook schedules on the loop
    assert drain.draining and started == [True]
    drain._start()  # a second SIGTERM does not start a second drain
    assert started == [True]
    for _ in range(20):  # the drain task gets the loop many times; it must not exit while work is held
        await asyncio.sleep(0)
    assert exits == []

    gate.set()
    await work
    await asyncio.wait_for(drain._task, 60)
    assert exits == [0]  # exited once, with nothing held
