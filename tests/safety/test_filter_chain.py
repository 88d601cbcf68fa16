"""Filters named as `module:callable` run off the event loop within a time budget; a filter that
raises or overruns is a FilterFailure (the guard then fails closed or open)."""

from __future__ import annotations

import threading

import pytest

from app.safety.filters import FilterChain, FilterFailure, FilterSpec


def chain(*specs: tuple[str, dict], timeout_ms: float = 300) -> FilterChain:
    return FilterChain([FilterSpec(callable=c, settings=s) for c, s in specs], timeout_ms=timeout_ms)


async def test_the_first_flagging_verdict_names_its_filter():
    c = chain(("tests.safety.filters:chaos", {}), ("tests.safety.filters:banned_word", {"word": "zebra"}))
    assert await c.check(["hello"]) is None
    verdict = await c.check(["a ZEBRA here"])
    assert verdict.flagged and verdict.filter == "tests.safety.filters:banned_word"


async def test_checks_run_in_the_pool_not_on_the_event_loop():
    c = chain(("tests.safety.filters:chaos", {}))
    await c.check(["x", "y"])
    threads = c.filters[0].check.threads
    assert threads and threading.current_thread().name not in threads
    assert all(name.startswith("sglserve-filter") for name in threads)


async def test_a_raising_filter_is_a_failure():
    from tests.safety.filters import RAISE_MARK

    with pytest.raises(FilterFailure, match="failed"):
        await chain(("tests.safety.filters:chaos", {})).check([RAISE_MARK])


async def test_a_slow_filter_is_a_failure_after_its_budget():
    from tests.safety.filters import SLOW_MARK

    with pytest.raises(FilterFailure, match="budget"):
        await chain(("tests.safety.filters:chaos", {"sleep_s": 2.0}), timeout_ms=50).check([SLOW_MARK])


def test_a_bad_callable_name_is_refused_at_start():
    with pytest.raises(ValueError):
        FilterSpec(callable="no-colon-here")
    with pytest.raises(ModuleNotFoundError):
        chain(("tests.safety.nowhere:f", {}))


async def test_an_output_filter_ends_one_sequence_and_sends_nothing_it_flags():
    """guard.filter_stream over a synthetic stream of two sequences (index 0 long, index 1 short):
    index 0 ends with finish_reason content_filter before any text past the limit goes out; index 1
    is not affected and ends normally."""
    from starlette.requests import Request

    from app.config import AppSettings
    from app.ingress import guard
    from app.protocol import FinishReason, GenerateOutput

    settings = AppSettings.from_args({"safety": {"output_filters": [
        {"callable": "tests.safety.filters:long_output", "settings": {"max_chars": 100}}]}})
    guard.configure(settings)
    try:
        async def upstream():
            for step in range(10):
                yield 0, GenerateOutput(rid="r-0", text="x" * 30)
                if step < 2:
                    yield 1, GenerateOutput(rid="r-1", text="y" * 10, finished=step == 1,
                                            finish_reason=FinishReason(type="stop") if step == 1 else None)
            raise AssertionError("the filtered stream should have been closed before the end")

        request = Request({"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "state": {}})
        items = [item async for item in guard.filter_stream(request, upstream(), count=2)]
    finally:
        guard._guard = None
    sent = "".join(out.text for index, out in items if index == 0)
    assert len(sent) == 90  # 3 chunks of 30; the 4th (120 > 100) withheld
    last0 = [out for index, out in items if index == 0][-1]
    assert last0.finished and last0.finish_reason.type == "content_filter"
    assert last0.finish_reason.to_openai() == "content_filter"
    last1 = [out for index, out in items if index == 1][-1]
    assert last1.finished and last1.finish_reason.type == "stop"
