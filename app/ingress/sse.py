"""Server-sent events framing: `data: {json}` events, an error event on failure, `data: [DONE]`.

The HTTP status goes out with the headers, before the first event. So a streaming route first
awaits its source's first item (`opened`): a failure before it (the queue is full, no replica can
serve, the engine refuses the request) is still a proper status (503 + Retry-After, 4xx) with
OpenAI's error body, raised to the app's error handler. Only an error after the stream has started
becomes an error event inside the 200 stream (`sse_stream`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from app.errors import APIError, EngineError, unwrap_error

logger = logging.getLogger("sglserve.ingress")

T = TypeVar("T")


def sse_event(payload: dict[str, Any] | list[Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def opened(source: AsyncIterator[T]) -> AsyncIterator[T]:
    """`source` with its first item already awaited: an error before that item raises here, while
    the route can still answer with a status; the iterator returned yields that item, then the rest.
    The wait is as long as the source's own (scale-from-zero's first item is bounded by
    scheduler.max_queue_wait_s, app/ingress/ticketed.py). A cancelled wait (the client left)
    closes the source, as an abandoned stream would."""
    iterator = source.__aiter__()
    try:
        first = await iterator.__anext__()
    except StopAsyncIteration:
        return _chain((), iterator)
    return _chain((first,), iterator)


async def _chain(head: tuple, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    try:
        for item in head:
            yield item
        async for item in rest:
            yield item
    finally:
        aclose = getattr(rest, "aclose", None)
        if aclose is not None:
            await aclose()


async def sse_stream(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Frame a stream of events. An error after the stream started cannot change the HTTP status
    any more, so it becomes a final `data: {"error": ...}` event (OpenAI's shape) before [DONE]."""
    try:
        async for event in events:
            yield event
    except Exception as exc:  # noqa: BLE001 - rendered to the client
        cause = unwrap_error(exc)
        error = cause if isinstance(cause, APIError) else EngineError(f"stream failed: {cause!r}")
        if not isinstance(cause, APIError):
            logger.exception("stream failed")
        yield sse_event(error.to_body())
    yield "data: [DONE]\n\n"
