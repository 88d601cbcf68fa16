"""app/sigterm.py inside a real Ray worker process: SIGTERM runs our handler instead of ending the
process, and exit_now() then ends it the way SIGTERM would have. (The replica's drain on top of it
is tested under load in test_chaos_serve.py.)"""

from __future__ import annotations

import os
import signal
import time

import pytest

DEADLINE_S = 120.0


@pytest.fixture(scope="module")
def hooked(ray_cluster):
    import ray

    @ray.remote(num_cpus=0)
    class Hooked:
        async def __init__(self):
            import asyncio

            from app.sigterm import on_sigterm

            self.sigterms = 0
            loop = asyncio.get_running_loop()
            self.installed = on_sigterm(lambda: loop.call_soon_threadsafe(self._count))

        def _count(self):
            self.sigterms += 1

        async def state(self):
            return {"pid": os.getpid(), "installed": self.installed, "sigterms": self.sigterms}

        async def exit_now(self):
            from app.sigterm import exit_now

            exit_now()

    actor = Hooked.remote()
    yield actor
    ray.kill(actor)


def test_sigterm_calls_the_handler_and_the_process_lives_on(hooked):
    import psutil

    state = hooked.state.remote()
    import ray

    state = ray.get(state, timeout=DEADLINE_S)
    assert state["installed"] and state["sigterms"] == 0
    os.kill(state["pid"], signal.SIGTERM)
    deadline = time.monotonic() + DEADLINE_S
    while (now := ray.get(hooked.state.remote(), timeout=DEADLINE_S))["sigterms"] < 1:
        assert time.monotonic() < deadline, "the handler never ran"
        time.sleep(0.05)
    assert now["pid"] == state["pid"] and psutil.pid_exists(state["pid"])

    hooked.exit_now.remote()  # ends the process as Ray's own SIGTERM handling does
    deadline = time.monotonic() + DEADLINE_S
    while psutil.pid_exists(state["pid"]) and psutil.Process(state["pid"]).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "exit_now() did not end the process"
        time.sleep(0.05)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(hooked.state.remote(), timeout=DEADLINE_S)
