"""Process-level care for an in-process `sglang.Engine` inside a Ray Serve replica.

SGLang's scheduler and detokenizer subprocesses report a failure by sending SIGQUIT to their
parent, and SGLang answers SIGQUIT (and, on the main thread, SIGTERM) by killing the whole process
tree, which inside Ray Serve is the replica's worker. This module keeps the worker alive instead:
SIGQUIT marks the engines of this process dead (their requests fail and their health checks
raise, so Ray Serve replaces the replica through its normal path), and a watchdog thread notices
subprocesses that die without a word (SIGKILL, OOM).
"""

from __future__ import annotations

import asyncio
import ctypes
import signal
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol

WATCHDOG_INTERVAL_S = 1.0


def ignore_signal_at_c_level(signum: int) -> None:
    """SIG_IGN for `signum` from any thread (Python's `signal.signal` works on the main thread
    only). Used for SIGQUIT when the engine starts off the main thread: SGLang's children send it
    to their parent on failure, and its default action would kill the Ray worker."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.signal(signum, ctypes.c_void_p(1))  # SIG_IGN == (void (*)(int)) 1


class ChildWatchdog(threading.Thread):
    """Polls the engine's subprocesses; reports the first one that died."""

    def __init__(self, pids: list[int], on_death: Callable[[str], None]):
        super().__init__(name="sglang-child-watchdog", daemon=True)
        self._pids = pids
        self._on_death = on_death
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        import psutil

        procs = []
        for pid in self._pids:
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                self._on_death(f"SGLang subprocess {pid} is gone")
                return
        while not self._stop_event.wait(WATCHDOG_INTERVAL_S):
            for proc in procs:
                try:
                    alive = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
                except psutil.NoSuchProcess:
                    alive = False
                if not alive:
                    self._on_death(f"SGLang subprocess {proc.pid} ({_proc_name(proc)}) died")
                    return


def _proc_name(proc: Any) -> str:
    try:
        return proc.name()
    except Exception:  # noqa: BLE001 - the process is gone; the name is only for the message
        return "?"


def child_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=False)}


class DeathListener(Protocol):
    def mark_dead_threadsafe(self, reason: str) -> None: ...


# The engines of this process that a SIGQUIT concerns (normally one per replica process).
_LIVE_ENGINES: "weakref.WeakSet[Any]" = weakref.WeakSet()


def register(engine: DeathListener) -> None:
    _LIVE_ENGINES.add(engine)


def unregister(engine: DeathListener) -> None:
    _LIVE_ENGINES.discard(engine)


def sigquit_handler(signum: int, frame: Any) -> None:
    """SIGQUIT from an SGLang subprocess means it failed: mark the engines dead, keep the process.
    A module-level function: it is given to SGLang as ServerArgs.custom_sigquit_handler, and
    ServerArgs travels to SGLang's subprocesses by pickle."""
    for engine in list(_LIVE_ENGINES):
        engine.mark_dead_threadsafe("an SGLang subprocess failed (it sent SIGQUIT)")


def saved_handlers() -> dict[int, Any]:
    return {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGQUIT)}


def restore_handlers(loop: asyncio.AbstractEventLoop, saved: dict[int, Any]) -> None:
    """Undo SGLang's main-thread signal handling: SIGTERM/SIGINT go back to what they were before
    the engine started, SIGQUIT to our handler that marks the engine dead."""
    for sig in saved:
        try:
            loop.remove_signal_handler(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    for sig, handler in saved.items():
        if sig == signal.SIGQUIT:
            signal.signal(sig, sigquit_handler)
        elif handler is not None:
            signal.signal(sig, handler)
