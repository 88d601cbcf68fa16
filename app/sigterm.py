"""SIGTERM sent straight to a Ray Serve replica's process: drain instead of dying mid-request.

Ray Serve's own stop path (scale-down, redeploy, `serve shutdown`) drains a replica: it stops
routing to it, waits for its ongoing requests up to `graceful_shutdown_timeout_s`, then kills it.
A SIGTERM from outside (`kill <pid>`, a node agent, a container runtime) skips all that: a Ray
worker's main thread turns SIGTERM into SystemExit at once, so every request in the process fails.

Python lets only the main thread install a signal handler, and in a Ray worker the main thread runs
Ray's task loop while our code runs on an event loop in another thread. What Ray's handler does is
call `raise_sys_exit_with_custom_error_message`, looked up in `ray._private.worker`'s globals at
the time of the signal; `on_sigterm` puts a function there that calls ours instead (the first
time) and Ray's own otherwise. `exit_now()` then ends the process exactly as SIGTERM would have.
Where a Ray version's handler looks different, nothing is changed and `on_sigterm` says so
(False): SIGTERM then stops the process at once, as before, and Serve replaces it.

The ModelReplica drains with its own steps (app/replica.py: unavailable to the router, engine
stopped last); the Ingress and the Scheduler use `SigtermDrain` below.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

logger = logging.getLogger("sglserve.sigterm")

_HOOK_NAME = "raise_sys_exit_with_custom_error_message"
_state: dict[str, object] = {"handler": None, "exiting": False}
_lock = threading.Lock()


def _ray_worker_module():
    """Ray's worker module, if the SIGTERM handler installed now is its worker's (else None)."""
    try:
        import ray._private.worker as ray_worker
    except ImportError:
        return None
    handler = signal.getsignal(signal.SIGTERM)
    code = getattr(handler, "__code__", None)
    if (getattr(handler, "__globals__", None) is not vars(ray_worker) or code is None
            or _HOOK_NAME not in code.co_names or not callable(getattr(ray_worker, _HOOK_NAME, None))):
        return None
    return ray_worker


def on_sigterm(handler: Callable[[], None]) -> bool:
    """Make this process's next SIGTERM call `handler()` (in the main thread, from a signal
    handler: it must only hand work to another thread, e.g. `loop.call_soon_threadsafe`) instead
    of exiting. True if installed; later SIGTERMs, and `exit_now()`, exit as Ray would."""
    with _lock:
        worker = _ray_worker_module()
        if worker is None:
            logger.warning("SIGTERM cannot be drained here (not a Ray worker, or its handler changed): "
                           "it stops the process at once")
            return False
        original = getattr(worker, _HOOK_NAME)
        original = getattr(original, "__sglserve_original__", original)

        def intercept(*args, **kwargs):
            with _lock:
                drain, _state["handler"] = _state["handler"], None
            if drain is None or _state["exiting"]:
                return original(*args, **kwargs)
            drain()  # (a signal handler: no logging here; the drain logs)
            return None

        intercept.__sglserve_original__ = original
        setattr(worker, _HOOK_NAME, intercept)
        _state["handler"] = handler
        return True


def exit_now() -> None:
    """End the process the way SIGTERM does in a Ray worker (its main thread raises SystemExit)."""
    _state["exiting"] = True
    os.kill(os.getpid(), signal.SIGTERM)


def graceful_budget_s(default_s: float) -> float:
    """This replica's deployment's graceful_shutdown_timeout_s (the default outside Serve)."""
    try:
        from ray import serve

        return float(serve.get_replica_context()._deployment_config.graceful_shutdown_timeout_s)
    except Exception:  # noqa: BLE001 - not in a Serve replica, or Serve's internals moved
        return default_s


class SigtermDrain:
    """SIGTERM for a deployment whose work is requests it holds (the Ingress, the Scheduler):
    from the signal on, `draining` is True (the deployment refuses new work with a retryable 503),
    the work already held runs on until none is left or the deployment's
    graceful_shutdown_timeout_s has passed, then the process exits as SIGTERM would have, and Ray
    Serve starts a replacement. Installed on first use, from the loop that serves the requests
    (a SIGTERM before any request finds nothing to drain and stops the process at once)."""

    def __init__(self, name: str, default_budget_s: float = 20.0, on_start: Callable[[], None] | None = None):
        self.name = name
        self._on_start = on_start  # runs on the loop when the drain begins (e.g. refuse new work)
        self.busy = 0
        self.since: float | None = None  # monotonic time of the SIGTERM
        self._default_budget_s = default_budget_s
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @property
    def draining(self) -> bool:
        return self.since is not None

    def install(self) -> None:
        """Call from the serving event loop; cheap after the first time."""
        if self._idle is not None:
            return
        self._idle = asyncio.Event()
        self._idle.set()
        loop = asyncio.get_running_loop()
        on_sigterm(lambda: loop.call_soon_threadsafe(self._start))

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Around each piece of work the drain must wait for."""
        self.install()
        self.busy += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.busy -= 1
            if self.busy == 0:
                self._idle.set()

    def _start(self) -> None:
        if self.since is None:
            self.since = time.monotonic()
            if self._on_start is not None:
                self._on_start()
            self._task = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        budget = graceful_budget_s(self._default_budget_s)
        logger.warning("SIGTERM: %s refuses new work and drains %d request(s) (up to %.0f s), then exits",
                       self.name, self.busy, budget)
        try:
            await asyncio.wait_for(self._idle.wait(), budget)
        except asyncio.TimeoutError:
            logger.warning("SIGTERM: %s still holds %d request(s) after %.0f s; exiting", self.name, self.busy, budget)
        logger.warning("SIGTERM: %s drained in %.1f s; exiting", self.name, time.monotonic() - self.since)
        exit_now()
