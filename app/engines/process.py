"""`ProcessEngine`: an engine run in a child process of the replica, behind the same contract.

Why. An engine whose step loop is Python (the embedded engine: a forward pass is hundreds of small
torch calls, each taking the GIL back) shares one GIL with everything else in its process. In a
replica that is Ray Serve's streaming, serialization and asyncio work; measured here, a thread
holding the GIL 30% of the time cut the engine's throughput by 25-37%. SGLang (scheduler and
detokenizer processes) and vLLM (EngineCore process) split their engines off for the same reason.
So the replica keeps the I/O and the engine gets a process, and a GIL, of its own.

How. `python -m app.engines.process FD` over one socketpair (multiprocessing's Connection framing,
pickled tuples). The replica sends `gen` / `cancel` / `abort` / `call` / `stop`; the child sends one
`out` message per burst of outputs (every request's increment of an engine step travels together,
with the engine's stats), `stats` when only the stats changed, and `reply` for calls (with the
stats as the call left them, so that a caller who saw a flush finish sees an empty cache). The child
reads with `loop.add_reader`; the replica with a reader thread that wakes the event loop once per
message (an engine step), not once per token. If the replica
dies, the child reads EOF and exits.

If the child dies (kill -9, a segfault, the OOM killer), the reader sees its end of the socket close
at once: every open stream and call fails with `EngineUnavailableError` (503 + Retry-After,
`retryable`), `available` turns False (the replica tells the request router), and a supervisor
thread starts a new child, with `engine.restart_backoff_s` doubling between attempts and at most
`engine.restart_max_attempts` attempts in a row. Only if they all fail does the health check fail,
so that Serve replaces the replica (docs/fault-tolerance.md).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from typing import Any

from app.config import AppSettings
from app.engines.base import Engine, Tokenizer
from app.errors import EngineError, EngineUnavailableError, InvalidRequestError
from app.protocol import EngineStats, GenerateOutput, GenerateRequest, ModelInfo

logger = logging.getLogger(__name__)

STATS_PERIOD_S = 0.05  # how fresh the replica's view of the engine's stats is while nothing streams
STOP_TIMEOUT_S = 30.0
NOT_STARTED = "the engine is not started (await engine.start() first)"
# A child that served this long before dying counts as healthy: its death starts a fresh series of
# restart attempts, so a rare crash never uses up the budget meant for a crash loop.
RESTART_RESET_AFTER_S = 60.0


class ProcessEngine(Engine):
    """The replica's side: starts the child, forwards calls, fans the child's outputs out to streams.

    A reader thread blocks on the socket and hands each message to the event loop(s) of the
    streams it concerns (Serve uses one loop; tests may use several), one wake-up per message."""

    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None
        self._send_lock = threading.Lock()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]] = {}
        self._call_ids = itertools.count()
        self._stats = EngineStats()
        self._model_info: ModelInfo | None = None
        self._server_args: dict[str, Any] = {}
        self._tokenizer: Tokenizer | None = None
        self._gone: str | None = None  # why the child is no longer there
        self._start_lock = threading.Lock()
        self._state_lock = threading.Lock()  # _conn/_gone change together (reader vs supervisor)
        self._started = False  # the first child came up: later children are the supervisor's job
        self._stopping = False  # shutdown() was called: a dead child is not restarted
        self._up = threading.Event()  # set while a child serves
        self._gave_up: str | None = None  # why restarting failed; the replica then fails its health
        self._consecutive_restarts = 0
        self._child_started_at = 0.0
        self._spare: tuple[subprocess.Popen, Connection] | None = None  # see _prepare_spare
        self._spare_prepared: tuple[subprocess.Popen, Connection] | None = None  # it said so
        self.restarts = 0  # children started after the first
        self.last_restart_s: float | None = None  # death noticed -> new child ready

    @property
    def available(self) -> bool:
        """Whether a child serves now (False while it restarts, after a give-up, and once shut down)."""
        return self._up.is_set()

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        if not self._started:
            await asyncio.to_thread(self._start)

    def _start(self) -> None:
        with self._start_lock:
            if self._started:
                return
            self._spawn()
            self._started = True

    def _launch(self) -> tuple[subprocess.Popen, Connection]:
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.engines.process", str(child_sock.fileno())],
            pass_fds=[child_sock.fileno()], env=env,
        )
        child_sock.close()
        return proc, Connection(parent_sock.detach())

    def _child_settings(self) -> dict[str, Any]:
        child_settings = self.settings.model_copy(deep=True)
        child_settings.engine.separate_process = False
        return child_settings.model_dump(mode="json")

    def _prepare_spare(self) -> None:
        """Start the warm spare (engine.warm_spare_process): a child that imports the engine's
        libraries and loads the tokenizer now, then waits. A restart hands it the engine to build,
        which skips most of a cold start (imports were most of it, measured on 2 CPU cores)."""
        if not self.settings.engine.warm_spare_process or self._stopping or self._spare is not None:
            return
        try:
            proc, conn = self._launch()
            conn.send(("prepare", self._child_settings()))
        except OSError as e:
            logger.warning("engine process: no warm spare (%r)", e)
            return
        self._spare = (proc, conn)

    def spare_ready(self) -> bool:
        """Whether a warm spare has finished preparing (read without blocking; tests and benchmarks
        wait for it so that they measure the restart it is for)."""
        if not self._start_lock.acquire(blocking=False):  # a restart is reading the spare's socket
            return False
        try:
            spare = self._spare
            if spare is None or spare[0].poll() is not None:
                return False
            if self._spare_prepared is not spare and spare[1].poll() and spare[1].recv()[0] == "prepared":
                self._spare_prepared = spare
            return self._spare_prepared is spare
        except (EOFError, OSError):
            return False
        finally:
            self._start_lock.release()

    def _take_spare(self) -> tuple[subprocess.Popen, Connection] | None:
        spare, self._spare = self._spare, None
        if spare is not None and spare[0].poll() is not None:  # it died meanwhile: start cold
            spare[1].close()
            return None
        return spare

    def _drop_spare(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:  # it holds nothing yet: no need to wait for it to finish its imports
            spare[1].close()
            spare[0].kill()
            spare[0].wait()

    def _spawn(self, use_spare: bool = False) -> None:
        """Start a child (or wake the spare) and wait until it serves; raises (and leaves no child
        behind) if it fails."""
        spare = self._take_spare() if use_spare else None
        self._proc, conn = spare or self._launch()
        try:
            conn.send(("init", self._child_settings()))
            _, self._model_info, self._server_args, self._stats = self._wait_ready(conn)
            if self._tokenizer is None:
                from app.engines.hf_tokenizer import HFTokenizer

                self._tokenizer = HFTokenizer.from_settings(self.settings.model)
        except BaseException:
            conn.close()
            self._reap()
            raise
        with self._state_lock:
            self._conn = conn
            self._gone = None
            self._child_started_at = time.monotonic()
            self._up.set()
        self._reader = threading.Thread(target=self._read_forever, args=(conn,),
                                        name="engine-process-reader", daemon=True)
        self._reader.start()
        self._prepare_spare()

    def _wait_ready(self, conn: Connection) -> tuple:
        """Block until the child is ready; its own error if it failed to start."""
        assert self._proc is not None
        while not conn.poll(0.5):
            if self._proc.poll() is not None:
                raise EngineError(f"the engine process exited with code {self._proc.returncode} while "
                                  "starting (its log is the replica's log)")
        try:
            message = conn.recv()
        except (EOFError, OSError) as e:
            raise EngineError(f"the engine process closed its connection while starting: {e!r}") from e
        while message[0] == "prepared":  # a spare's note that its imports are done
            message = conn.recv()
        if message[0] == "fatal":
            raise message[1]
        return message

    def _reap(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        if self._proc is None:
            return
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("engine process %s did not stop in %.0f s: killing it", self._proc.pid, timeout_s)
            self._proc.kill()
            self._proc.wait()

    async def shutdown(self) -> None:
        self._stopping = True  # before anything can notice the child's exit and restart it
        await asyncio.to_thread(self._drop_spare)
        if self._conn is None or self._gone is not None:
            self._up.clear()
            return
        try:
            self._send(("stop",))
        except EngineError:
            pass
        await asyncio.to_thread(self._reap)
        self._child_gone("the engine was shut down")

    def _restart_forever(self) -> None:
        """The supervisor (a thread, after a child died): start a new child with bounded backoff."""
        noticed = time.monotonic()
        self._reap(timeout_s=1.0)  # the dead child (killed if only its socket broke)
        cfg = self.settings.engine
        if noticed - self._child_started_at >= RESTART_RESET_AFTER_S:
            self._consecutive_restarts = 0
        while not self._stopping:
            if self._consecutive_restarts >= cfg.restart_max_attempts:
                self._gave_up = (f"{self._gone}; {self._consecutive_restarts} restart attempt(s) in a row "
                                 f"failed or died (engine.restart_max_attempts={cfg.restart_max_attempts})")
                logger.error("engine process: giving up: %s", self._gave_up)
                self._drop_spare()
                return
            time.sleep(cfg.restart_backoff_s * 2 ** self._consecutive_restarts)
            self._consecutive_restarts += 1
            try:
                with self._start_lock:
                    if self._stopping:
                        return
                    self._spawn(use_spare=True)
            except BaseException as e:  # noqa: BLE001 - counted as a failed attempt; logged
                logger.error("engine process restart %d failed: %r", self._consecutive_restarts, e)
                continue
            self.restarts += 1
            self.last_restart_s = time.monotonic() - noticed
            logger.warning("engine process restarted (pid %s) %.2f s after it died", self._proc.pid,
                           self.last_restart_s)
            return

    # ---- the async API ------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        await self.start()
        rid = request.rid
        if rid in self._streams:
            raise InvalidRequestError(f"request id {rid!r} is already in use", param="rid")
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), queue)
        done = False
        try:
            self._send(("gen", request))
            while True:
                merged: GenerateOutput | None = None
                item = await queue.get()
                while True:  # merge whatever queued up while the consumer was away
                    if isinstance(item, BaseException):
                        done = True
                        if merged is not None:
                            yield merged
                        raise item
                    merged = item if merged is None else merged.merge(item)
                    if queue.empty():
                        break
                    item = queue.get_nowait()
                done = merged.finished
                yield merged
                if done:
                    return
        finally:
            self._streams.pop(rid, None)
            if not done and self._gone is None:
                try:
                    self._send(("cancel", rid))  # the consumer left: the child aborts it in the engine
                except EngineError:
                    pass  # the child is gone, and the request with it

    async def abort(self, rid: str) -> bool:
        if rid not in self._streams:
            return False
        self._send(("abort", rid))
        return True

    async def flush_cache(self) -> bool:
        return await self._call("flush_cache")

    async def health_check(self, timeout_s: float = 10.0) -> None:
        """A real 1-token generation. While the child restarts, wait for it (bounded) instead of
        failing at once: Serve would replace a replica that is about to serve again."""
        if self._gave_up is not None or self._stopping:
            raise EngineError(f"health check: {self._gave_up or 'the engine was shut down'}")
        if not self._up.is_set() and not await asyncio.to_thread(self._up.wait, timeout_s):
            raise EngineUnavailableError(f"health check: the engine is still restarting ({self._gone})")
        await asyncio.wait_for(self._call("health_check", timeout_s), timeout_s + 5.0)

    def stats(self) -> EngineStats:
        return self._stats

    def model_info(self) -> ModelInfo:
        if self._model_info is None:
            raise EngineError(NOT_STARTED)
        return self._model_info

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise EngineError(NOT_STARTED)
        return self._tokenizer

    def server_args(self) -> dict[str, Any]:
        pid = self._proc.pid if self._proc is not None else None
        return {**self._server_args, "separate_process": True, "engine_pid": pid,
                "engine_restarts": self.restarts, "last_engine_restart_s": self.last_restart_s,
                "warm_spare_ready": self.spare_ready() if self.settings.engine.warm_spare_process else None}

    # ---- plumbing -----------------------------------------------------------------------------
    def _unavailable(self) -> EngineUnavailableError:
        why = self._gave_up or self._gone or "the engine process is gone"
        return EngineUnavailableError(f"the engine is unavailable ({why}); retry", retry_after_s=self._retry_after_s())

    def _retry_after_s(self) -> float:
        """About when a restarting engine serves again (a new child took ~2-4 s on 2 CPU cores)."""
        return max(1.0, self.last_restart_s or 2.0)

    def _send(self, message: tuple) -> None:
        conn = self._conn
        if self._gone is not None or (conn is None and self._started):
            raise self._unavailable()
        if conn is None:
            raise EngineError(NOT_STARTED)
        try:
            with self._send_lock:
                conn.send(message)
        except OSError as e:
            self._child_gone(f"the engine process is gone ({e!r})", conn)
            raise self._unavailable() from e

    async def _call(self, name: str, *args: Any) -> Any:
        await self.start()
        call_id = next(self._call_ids)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._calls[call_id] = (loop, future)
        try:
            self._send(("call", call_id, name, args))
            return await future
        finally:
            self._calls.pop(call_id, None)

    def _read_forever(self, conn: Connection) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError, TypeError):  # TypeError: we closed it ourselves meanwhile
                code = self._proc.poll() if self._proc is not None else None
                self._child_gone(f"the engine process exited (code {code}); see the replica's log", conn)
                return
            try:
                self._dispatch(message)
            except Exception:  # noqa: BLE001 - one bad message must not stop the reader
                logger.error("engine process message %r:\n%s", message[0], traceback.format_exc())

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "out":
            _, items, self._stats = message
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}
            for rid, item in items:
                stream = self._streams.get(rid)
                if stream is not None:
                    by_loop.setdefault(stream[0], []).append((stream[1], item))
            for loop, deliveries in by_loop.items():
                _call_soon(loop, _deliver, deliveries)
        elif kind == "stats":
            self._stats = message[1]
        elif kind == "reply":  # with the stats as they are after the call (a flush empties the KV)
            _, call_id, ok, value, self._stats = message
            call = self._calls.get(call_id)
            if call is not None:
                _call_soon(call[0], _settle, call[1], ok, value)

    def _child_gone(self, reason: str, conn: Connection | None = None) -> None:
        """The child is gone (or being stopped): fail what waits on it, then restart it unless the
        engine is shutting down. `conn`: the connection that broke (a previous child's reader
        noticing its own end late must not touch the current child)."""
        with self._state_lock:
            if self._gone is not None or (conn is not None and conn is not self._conn):
                return
            self._gone = reason
            self._up.clear()
            dead, self._conn = self._conn, None
            self._stats = EngineStats()  # nothing runs or holds KV in a dead engine
        if dead is not None:
            dead.close()
        if not self._stopping:
            logger.error("engine process: %s; failing %d stream(s) and restarting it", reason, len(self._streams))
        error = self._unavailable()
        for loop, queue in list(self._streams.values()):
            _call_soon(loop, _deliver, [(queue, error)])
        for loop, future in list(self._calls.values()):
            _call_soon(loop, _settle, future, False, error)
        if self._started and not self._stopping:
            threading.Thread(target=self._restart_forever, name="engine-process-supervisor", daemon=True).start()


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # that loop is closed: nobody waits there any more
        pass


def _deliver(deliveries: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for queue, item in deliveries:
        queue.put_nowait(item)


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


# ---- the child's side ---------------------------------------------------------------------------
class _EngineHost:
    """Runs in the child: one task per request, outputs batched into one message per loop turn."""

    def __init__(self, engine: Engine, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.conn = conn
        self.loop = loop
        self.tasks: dict[str, asyncio.Task] = {}
        self.outbox: list[tuple[str, Any]] = []
        self.flush_scheduled = False
        self.sent_stats: EngineStats | None = None
        self.stopped = loop.create_future()

    def on_readable(self) -> None:
        try:
            while self.conn.poll():
                self.dispatch(self.conn.recv())
        except (EOFError, OSError):  # the replica is gone: nobody to serve
            self.stop()

    def dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "gen":
            request: GenerateRequest = message[1]
            self.tasks[request.rid] = self.loop.create_task(self.run(request))
        elif kind == "cancel":
            task = self.tasks.get(message[1])
            if task is not None:
                task.cancel()  # closing engine.generate aborts the request in the engine
        elif kind == "abort":
            self.loop.create_task(self.engine.abort(message[1]))
        elif kind == "call":
            _, call_id, name, args = message
            self.loop.create_task(self.call(call_id, name, args))
        elif kind == "stop":
            self.stop()

    async def run(self, request: GenerateRequest) -> None:
        try:
            async for out in self.engine.generate(request):
                self.queue(request.rid, out)
        except asyncio.CancelledError:
            pass
        except BaseException as e:  # noqa: BLE001 - delivered to the caller, who raises it
            self.queue(request.rid, _picklable(e))
        finally:
            self.tasks.pop(request.rid, None)

    def queue(self, rid: str, item: Any) -> None:
        self.outbox.append((rid, item))
        if not self.flush_scheduled:  # after the other streams woken by the same engine step
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        items, self.outbox = self.outbox, []
        self.send(("out", items, self.fresh_stats()))

    async def call(self, call_id: int, name: str, args: tuple) -> None:
        try:
            value = await getattr(self.engine, name)(*args)
            self.send(("reply", call_id, True, value, self.fresh_stats()))
        except BaseException as e:  # noqa: BLE001 - the caller raises it
            self.send(("reply", call_id, False, _picklable(e), self.fresh_stats()))

    def fresh_stats(self) -> EngineStats:
        self.sent_stats = self.engine.stats()
        return self.sent_stats

    async def publish_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_PERIOD_S)
            stats = self.engine.stats()
            if stats is not self.sent_stats:
                self.sent_stats = stats
                self.send(("stats", stats))

    def send(self, message: tuple) -> None:
        try:
            self.conn.send(message)
        except OSError:
            self.stop()

    def stop(self) -> None:
        if not self.stopped.done():
            self.stopped.set_result(None)


def _picklable(error: BaseException) -> BaseException:
    try:
        pickle.dumps(error)
        return error
    except Exception:  # noqa: BLE001
        return EngineError(f"{type(error).__name__}: {error}")


def _prepare(settings: dict[str, Any]) -> None:
    """What a warm spare does before it is needed: imports, and the tokenizer (host only; no
    device is touched, so a spare costs host memory only)."""
    try:
        import app.engines.embedded.engine  # noqa: F401 - torch, transformers, the engine
        from app.engines.hf_tokenizer import HFTokenizer

        HFTokenizer.from_settings(AppSettings.from_args(settings).model)
    except Exception:  # noqa: BLE001 - best effort: the real start reports real errors
        logger.warning("warm spare: preparing failed:\n%s", traceback.format_exc())


async def _serve(conn: Connection) -> None:
    from app.engines.local import make_local_engine as make_engine

    try:
        kind, settings = conn.recv()
        if kind == "prepare":  # a warm spare: get the slow imports done, then wait to be needed
            _prepare(settings)
            conn.send(("prepared",))
            kind, settings = conn.recv()
    except (EOFError, OSError):  # the replica went away (or no longer needs this spare)
        return
    try:
        engine = make_engine(AppSettings.from_args(settings))
        await engine.start()
    except BaseException as e:  # noqa: BLE001 - the replica raises it
        logger.error("engine process failed to start:\n%s", traceback.format_exc())
        conn.send(("fatal", _picklable(e)))
        return
    loop = asyncio.get_running_loop()
    host = _EngineHost(engine, conn, loop)
    conn.send(("ready", engine.model_info(), engine.server_args(), engine.stats()))
    loop.add_reader(conn.fileno(), host.on_readable)
    publisher = loop.create_task(host.publish_stats())
    try:
        await host.stopped
    finally:
        loop.remove_reader(conn.fileno())
        publisher.cancel()
        for task in list(host.tasks.values()):
            task.cancel()
        started = time.monotonic()
        await engine.shutdown()
        logger.info("engine process stopped in %.1f s", time.monotonic() - started)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s engine-process: %(message)s")
    conn = Connection(int(sys.argv[1]))
    try:
        asyncio.run(_serve(conn))
    finally:
        conn.close()


if __name__ == "__main__":
    main()
