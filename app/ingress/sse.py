"""Server-sent events framing: `data: {json}` events, an error event on failure, `data: [DONE]`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from app.errors import APIError, EngineError, unwrap_error

logger = logging.getLogger("sglserve.ingress")


def sse_event(payload: dict[str, Any] | list[Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


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
