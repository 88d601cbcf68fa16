"""app.streaming.coalesce: what leaves at once and what waits for the interval."""

from __future__ import annotations

import asyncio
import time

from app.protocol import FinishReason, GenerateOutput
from app.streaming import coalesce


def piece(text: str, n: int, finished: bool = False) -> GenerateOutput:
    return GenerateOutput(rid="r", text=text, token_ids=[1], completion_tokens=n, finished=finished,
                          finish_reason=FinishReason(type="length", length=n) if finished else None)


async def timed(source_items, gap_s: float, interval_s: float) -> list[tuple[float, GenerateOutput]]:
    async def source():
        for item in source_items:
            await asyncio.sleep(gap_s)
            yield item

    started = time.monotonic()
    return [(time.monotonic() - started, out)
            async for out in coalesce(source(), max_tokens=100, interval_s=interval_s)]


async def test_increments_leave_at_once_until_text_has_left_then_wait_for_the_interval():
    # Two increments without text (a multi-byte character in the making), then text every 10 ms.
    items = [piece("", 1), piece("", 2), piece("é", 3)] + [piece("x", n) for n in range(4, 12)]
    items.append(piece("!", 12, finished=True))
    sent = await timed(items, gap_s=0.01, interval_s=0.2)
    texts = [out.text for _, out in sent]
    assert texts[:3] == ["", "", "é"]  # none of them held back
    assert sent[2][0] < 0.1
    # after the first text, the rest is coalesced: one message at the end (interval 200 ms > 100 ms)
    assert "".join(texts) == "é" + "x" * 8 + "!"
    assert len(sent) == 4 and sent[-1][1].finished


async def test_held_back_tokens_leave_when_the_interval_runs_out():
    items = [piece("a", 1)] + [piece("b", n) for n in range(2, 6)]
    sent = await timed(items + [piece("c", 6, finished=True)], gap_s=0.04, interval_s=0.1)
    assert "".join(out.text for _, out in sent) == "abbbbc"
    assert 2 < len(sent) < 7  # neither one message per token nor all at the end
