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
