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
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

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
