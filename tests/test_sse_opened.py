"""app/ingress/sse.opened: the first item is awaited before a streaming route answers, so an error
before it can still be the HTTP status; the items then come out unchanged and in order."""

from __future__ import annotations

import pytest

from app.errors import OverloadedError
from app.ingress.sse import opened


async def items(*values, fail_at: int | None = None, closed: list | None = None):
    try:
        for i, value in enumerate(values):
            if i == fail_at:
                raise OverloadedError("the queue is full")
            yield value
        if fail_at == len(values):
            raise OverloadedError("late")
    finally:
        if closed is not None:
            closed.append(True)


async def test_an_error_before_the_first_item_raises_when_opened():
    with pytest.raises(OverloadedError):
        await opened(items("a", "b", fail_at=0))


async def test_the_items_come_out_unchanged_after_opening():
    source = await opened(items("a", "b", "c"))
    assert [x async for x in source] == ["a", "b", "c"]


async def test_an_error_after_the_first_item_comes_out_of_the_stream():
    source = await opened(items("a", fail_at=1))
    out = []
    with pytest.raises(OverloadedError):
        async for x in source:
            out.append(x)
    assert out == ["a"]


async def test_an_empty_source_opens_to_an_empty_stream():
    assert [x async for x in await opened(items())] == []


async def test_closing_the_opened_stream_closes_the_source():
    closed: list = []
    source = await opened(items("a", "b", closed=closed))
    assert await source.__anext__() == "a"
    await source.aclose()
    assert closed == [True]
