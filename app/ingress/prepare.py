"""Tokenization and chat-template rendering, kept off the Ingress's event loop when they are long.

The Ingress tokenizes every prompt (the scheduler routes on token ids; prompts that cannot fit are
refused before they queue). Done on the event loop, a long prompt stalls every other stream this
Ingress serves for as long as it takes (a profile on the GPU saw ~15% of the Ingress's samples in
tokenization). So work on more than `ingress.tokenize_inline_max_chars` characters runs in a small
thread pool: Hugging Face's fast tokenizers encode in Rust with the GIL released, so the loop keeps
serving meanwhile. Short prompts stay inline, where the hop to a thread would cost more than the
work itself (bench/ingress_tokenize.py measures both sides). Chat-template rendering (Jinja, pure
Python) holds the GIL; in a thread it is at least interleaved with the loop instead of blocking it.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

POOL_THREADS = 2  # tokenizers parallelise inside one call as well; more threads buy nothing here

_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:  # one pool per process, made on first use (the event loop's thread only)
        _pool = ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="sglserve-tokenize")
    return _pool


class OffLoop:
    """Runs `fn(*args)` inline when the work is small (`chars` at most `inline_max_chars`), else
    in the tokenizer pool. A negative `inline_max_chars` sends everything to the pool."""

    def __init__(self, inline_max_chars: int):
        self.inline_max_chars = inline_max_chars

    async def call(self, chars: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if chars <= self.inline_max_chars:
            return fn(*args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_executor(), functools.partial(fn, *args, **kwargs))


def message_chars(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    """A cheap size of a chat request's text (what rendering and tokenizing it will cost)."""
    size = sum(len(m.get("content") or "") for m in messages)
    return size + (sum(len(str(t)) for t in tools) if tools else 0)
