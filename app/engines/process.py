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
dies, the child reads EOF and exits; if the child dies, every open stream fails with EngineError
and the health check fails, so Serve replaces the replica.
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
from app.errors import EngineError, InvalidRequestError
from app.protocol import EngineStats, GenerateOutput, GenerateRequest, ModelInfo

logger = logging.getLogger(__name__)

STATS_PERIOD_S = 0.05  # how fresh the replica's view of the engine's stats is while nothing streams
STOP_TIMEOUT_S = 30.0
NOT_STARTED = "the engine is not started (await engine.start() first)"


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

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._conn is None:
            await asyncio.to_thread(self._start)

    def _start(self) -> None:
        with self._start_lock:
            if self._conn is not None:
                return
            parent_sock, child_sock = socket.socketpair()
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "app.engines.process", str(child_sock.fileno())],
                pass_fds=[child_sock.fileno()], env=env,
            )
            child_sock.close()
            conn = Connection(parent_sock.detach())
            child_settings = self.settings.model_copy(deep=True)
            child_settings.engine.separate_process = False
            try:
                conn.send(("init", child_settings.model_dump(mode="json")))
                _, self._model_info, self._server_args, self._stats = self._wait_ready(conn)
                from app.engines.hf_tokenizer import HFTokenizer

                self._tokenizer = HFTokenizer.from_settings(self.settings.model)
            except BaseException:
                conn.close()
                self._reap()
                raise
            self._conn = conn
            self._reader = threading.Thread(target=self._read_forever, name="engine-process-reader",
                                            daemon=True)
            self._reader.start()

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
        if message[0] == "fatal":
            raise message[1]
        return message

    def _reap(self) -> None:
        if self._proc is None:
            return
        try:
            self._proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("engine process %s did not stop in %.0f s: killing it", self._proc.pid, STOP_TIMEOUT_S)
            self._proc.kill()
            self._proc.wait()

    async def shutdown(self) -> None:
        if self._conn is None or self._gone is not None:
            return
        try:
            self._send(("stop",))
        except EngineError:
            pass
        await asyncio.to_thread(self._reap)
        self._child_gone("the engine was shut down")

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
        if self._gone is not None:
            raise EngineError(f"health check: {self._gone}")
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
        return {**self._server_args, "separate_process": True, "engine_pid": pid}

    # ---- plumbing -----------------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        if self._gone is not None:
            raise EngineError(self._gone)
        if self._conn is None:
            raise EngineError(NOT_STARTED)
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError as e:
            self._child_gone(f"the engine process is gone ({e!r})")
            raise EngineError(self._gone or "the engine process is gone") from e

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

    def _read_forever(self) -> None:
        conn = self._conn
        assert conn is not None
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError, TypeError):  # TypeError: we closed it ourselves meanwhile
                code = self._proc.poll() if self._proc is not None else None
                self._child_gone(f"the engine process exited (code {code}); see the replica's log")
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

    def _child_gone(self, reason: str) -> None:
        if self._gone is not None:
            return
        self._gone = reason
        if self._conn is not None:
            self._conn.close()
        error = EngineError(reason)
        for loop, queue in list(self._streams.values()):
            _call_soon(loop, _deliver, [(queue, error)])
        for loop, future in list(self._calls.values()):
            _call_soon(loop, _settle, future, False, error)


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


async def _serve(conn: Connection) -> None:
    from app.engines.local import make_local_engine as make_engine

    try:
        _, settings = conn.recv()
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
