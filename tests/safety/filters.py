"""Filters for tests, named in test configs as `tests.safety.filters:<factory>` (real filters,
loaded the way any `module:callable` filter is)."""

from __future__ import annotations

import threading
import time

from app.safety.filters import Verdict

RAISE_MARK = "RAISE-FILTER-NOW"
SLOW_MARK = "SLOW-FILTER-NOW"


def chaos(sleep_s: float = 2.0):
    """Raises on texts holding RAISE_MARK, overruns any budget on SLOW_MARK, else passes; records
    the thread it ran on (to show checks run off the event loop)."""

    def check(text: str) -> Verdict | None:
        check.threads.add(threading.current_thread().name)
        if RAISE_MARK in text:
            raise RuntimeError("this filter is broken on purpose")
        if SLOW_MARK in text:
            time.sleep(sleep_s)
        return None

    check.threads = set()
    return check


def long_output(max_chars: int = 100):
    """Flags any text longer than max_chars: a deterministic stand-in for an output classifier."""

    def check(text: str) -> Verdict:
        too_long = len(text) > max_chars
        return Verdict(flagged=too_long, category="test_long_output", score=1.0 if too_long else 0.0,
                       reason=f"{len(text)} chars > {max_chars}" if too_long else "")

    return check


def banned_word(word: str = "forbidden"):
    def check(text: str) -> Verdict:
        hit = word in text.lower()
        return Verdict(flagged=hit, category="banned_word", score=float(hit), reason=word if hit else "")

    return check
