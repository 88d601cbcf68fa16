"""Loading and running content filters off the event loop, each call within a time budget.

`FilterChain.check(texts)` runs every filter on every text in a small thread pool and returns the
first flagging `Verdict` (or None). A filter that raises or overruns `timeout_ms` makes the chain
raise `FilterFailure`; the caller (app/ingress/guard.py) then fails closed (503 + Retry-After) or
open (lets the text through and logs it), as `on_error` says. A timed-out call keeps running in
its thread (Python cannot stop a thread), so the pool is bounded and a filter should be fast.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger("sglserve.safety")


class FilterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    callable: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # "package.module:factory"
    settings: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of the factory


class SafetySettings(BaseModel):
    """`AppSettings.safety`."""

    model_config = ConfigDict(extra="forbid")

    input_filters: list[FilterSpec] = Field(default_factory=list)  # prompts, before admission
    output_filters: list[FilterSpec] = Field(default_factory=list)  # generated text, as it streams
    timeout_ms: float = Field(200.0, gt=0)  # per check call
    on_error: Literal["closed", "open"] = "closed"  # a filter raised or timed out: 503 or let through
    retry_after_s: float = Field(1.0, gt=0)  # on the 503 when failing closed
    max_workers: int = Field(4, gt=0)  # the filters' thread pool
    # Re-check a stream each time it grew by this many characters; 1: every chunk before it is sent
    # (nothing the filter would flag goes out); larger: fewer checks, and up to that much may leak.
    output_check_chars: int = Field(1, gt=0)
    output_window_chars: int = Field(4096, gt=0)  # an output filter sees the last this many chars
    redact_pii_in_logs: bool = True  # request log lines pass through app.safety.pii.redact


@dataclass
class Verdict:
    flagged: bool
    category: str = "content_filter"
    score: float = 1.0
    reason: str = ""
    filter: str = ""
    categories: dict[str, float] = field(default_factory=dict)  # every category's score, if known


class FilterFailure(Exception):
    """A filter raised or ran past its time budget."""


Check = Callable[[str], "Verdict | None"]


def load_filter(spec: FilterSpec) -> Check:
    module_name, _, attr = spec.callable.partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(**spec.settings)


@dataclass
class _Loaded:
    name: str
    check: Check


class FilterChain:
    def __init__(self, specs: list[FilterSpec], timeout_ms: float, max_workers: int = 4):
        self.filters = [_Loaded(s.callable, load_filter(s)) for s in specs]
        self.timeout_s = timeout_ms / 1000.0
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="sglserve-filter") if specs else None

    def __bool__(self) -> bool:
        return bool(self.filters)

    async def check(self, texts: list[str]) -> Verdict | None:
        """The first flagging verdict over all filters and texts, or None; FilterFailure if a
        filter raised or overran (all run concurrently, so the budget is for the slowest)."""
        if not self.filters:
            return None
        loop = asyncio.get_running_loop()
        calls = [(f, loop.run_in_executor(self._pool, f.check, t)) for f in self.filters for t in texts if t]
        if not calls:
            return None
        try:
            results = await asyncio.wait_for(asyncio.gather(*(c for _, c in calls)), self.timeout_s)
        except asyncio.TimeoutError:
            raise FilterFailure(f"a content filter ran past its {self.timeout_s * 1000:.0f} ms budget") from None
        except Exception as exc:  # noqa: BLE001 - any filter bug becomes a FilterFailure
            logger.warning("content filter failed", exc_info=True)
            raise FilterFailure(f"a content filter failed: {type(exc).__name__}") from exc
        for (f, _), verdict in zip(calls, results):
            if verdict is not None and verdict.flagged:
                verdict.filter = verdict.filter or f.name
                return verdict
        return None

    async def scores(self, text: str) -> list[Verdict]:
        """Every filter's verdict on one text (for /v1/moderations, which reports all scores)."""
        if not self.filters:
            return []
        loop = asyncio.get_running_loop()
        calls = [loop.run_in_executor(self._pool, f.check, text) for f in self.filters]
        try:
            results = await asyncio.wait_for(asyncio.gather(*calls), self.timeout_s)
        except asyncio.TimeoutError:
            raise FilterFailure(f"a content filter ran past its {self.timeout_s * 1000:.0f} ms budget") from None
        except Exception as exc:  # noqa: BLE001
            logger.warning("content filter failed", exc_info=True)
            raise FilterFailure(f"a content filter failed: {type(exc).__name__}") from exc
        out = []
        for f, v in zip(self.filters, results):
            v = v or Verdict(flagged=False, score=0.0)
            v.filter = v.filter or f.name
            out.append(v)
        return out
