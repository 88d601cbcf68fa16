"""app.streaming.coalesce: what leaves at once and what waits for the interval."""

from __future__ import annotations

import asyncio
import time

from app.protocol import FinishReason, GenerateOutput
from app.streaming import coalesce, per_token


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


async def test_coalesced_increments_still_split_into_one_per_token():
    # What the replica merges for the hop (every increment due at once here: interval 10 s), the
    # Ingress splits again, token by token, with each token's own text and logprob.
    async def source():
        for n, text in enumerate(["", "é", "ab", "", "c"], start=1):  # "" : a character in the making
            yield GenerateOutput(rid="r", text=text, token_ids=[n], completion_tokens=n,
                                 output_token_logprobs=[(-0.1 * n, n, text)], finished=n == 5,
                                 finish_reason=FinishReason(type="length", length=5) if n == 5 else None)

    sent = [out async for out in coalesce(source(), max_tokens=100, interval_s=10.0)]
    assert [out.text for out in sent] == ["", "é", "abc"]  # the last three were merged
    pieces = [p for out in sent for p in per_token(out)]
    assert [p.text for p in pieces] == ["", "é", "ab", "", "c"]
    assert [p.token_ids for p in pieces] == [[1], [2], [3], [4], [5]]
    assert [p.output_token_logprobs[0][1] for p in pieces] == [1, 2, 3, 4, 5]
    assert [p.completion_tokens for p in pieces] == [1, 2, 3, 4, 5]
    assert [p.finished for p in pieces] == [False] * 4 + [True]
    assert pieces[-1].finish_reason.type == "length" and pieces[2].finish_reason is None


def test_text_without_a_token_joins_the_token_before_it_and_unknown_splits_stay_whole():
    first = GenerateOutput(rid="r", text="a", token_ids=[1])
    tail = GenerateOutput(rid="r", text="!?", token_ids=[], finished=True)  # a held-back tail
    merged = first.merge(GenerateOutput(rid="r", text="b", token_ids=[2])).merge(tail)
    assert merged.token_texts() == ["a", "b!?"]
    assert [p.text for p in per_token(merged)] == ["a", "b!?"]
    unknown = GenerateOutput(rid="r", text="xyz", token_ids=[1, 2])  # an engine's own multi-token step
    assert unknown.token_texts() is None and per_token(unknown) == [unknown]
    assert first.merge(unknown).token_texts() is None
