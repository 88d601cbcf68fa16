"""Token-stream coalescing for the hops between deployments.

Every message through a Ray Serve streaming hop costs CPU (FACTS.md: ~1,100 one-token messages/s
per stream across two hops), while an engine on a GPU makes a token every few milliseconds per
stream. So increments are merged before they cross a hop, with one rule that keeps latency honest:
the first increment of a stream leaves at once; later ones leave when `max_tokens` have gathered,
when `interval_s` has passed since the last send, or when the stream finishes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from app.protocol import GenerateOutput


async def coalesce(
    source: AsyncIterator[GenerateOutput], *, max_tokens: int, interval_s: float
) -> AsyncIterator[GenerateOutput]:
    iterator = source.__aiter__()
    pending: GenerateOutput | None = None
    last_sent = 0.0  # the first increment is always due
    next_item: asyncio.Task | None = None
    try:
        while True:
            if next_item is None:
                next_item = asyncio.ensure_future(iterator.__anext__())
            if pending is None:
                timeout = None
            else:
                timeout = max(0.0, interval_s - (time.monotonic() - last_sent))
            done, _ = await asyncio.wait({next_item}, timeout=timeout)
            if done:
                try:
                    item = next_item.result()
                except StopAsyncIteration:
                    next_item = None
                    if pending is not None:
                        yield pending
                    return
                next_item = None
                pending = item if pending is None else pending.merge(item)
                due = (
                    pending.finished
                    or len(pending.token_ids) >= max_tokens
                    or time.monotonic() - last_sent >= interval_s
                )
                if not due:
                    continue
            # Either due now, or the interval ran out while waiting for more.
            assert pending is not None
            out, pending = pending, None
            last_sent = time.monotonic()
            yield out
            if out.finished:
                return
    finally:
        if next_item is not None and not next_item.done():
            next_item.cancel()
            try:
                await next_item
            except (asyncio.CancelledError, StopAsyncIteration, Exception):
                pass
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
