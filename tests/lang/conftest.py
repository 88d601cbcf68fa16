"""Fixtures for the /run language tests: the real embedded engine with the tiny model."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator

import pytest

CACHE_DIR = os.environ.get("SGLSERVE_TEST_CACHE", os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), ".cache",
    "models"))


def make_engine():
    from app.config import EngineSettings, ModelSettings
    from app.engines.embedded.engine import EmbeddedEngine

    return EmbeddedEngine(ModelSettings(cache_dir=CACHE_DIR),
                          EngineSettings(torch_threads=1, max_total_tokens=16384,
                                         max_running_requests=16))


@pytest.fixture
def idle_engine():
    """A real engine that is never started: for programs that make no model call (text and
    functions only), so these tests need no forward pass."""
    return make_engine()


@pytest.fixture(scope="module")
def engine_loop() -> Iterator[tuple]:
    """A started engine and the event loop it serves (module-wide: loading costs ~1 s)."""
    import torch

    torch.set_num_threads(1)
    loop = asyncio.new_event_loop()
    engine = make_engine()
    try:
        loop.run_until_complete(engine.start())
    except ImportError as exc:  # the embedded engine is still being written
        loop.close()
        pytest.skip(f"embedded engine not available yet: {exc}")
    try:
        yield engine, loop
    finally:
        loop.run_until_complete(engine.shutdown())
        loop.close()


@pytest.fixture(scope="module")
def threaded_engine():
    """The real engine on an event loop in a background thread (the frontend is threaded)."""
    import torch

    torch.set_num_threads(1)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    engine = make_engine()
    try:
        asyncio.run_coroutine_threadsafe(engine.start(), loop).result(120)
    except ImportError as exc:
        loop.call_soon_threadsafe(loop.stop)
        pytest.skip(f"embedded engine not available yet: {exc}")
    try:
        yield engine, loop
    finally:
        asyncio.run_coroutine_threadsafe(engine.shutdown(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
