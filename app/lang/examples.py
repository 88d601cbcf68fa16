"""Example server-side functions, ready to list in `run.function_modules`:

    run:
      function_modules: ["app.lang.examples"]

`time.now(timezone="UTC")` and `math.calc("2*(3+4)")`. Functions that would need the internet
(weather, search) are deliberately absent: a script calling them gets "function not registered".
"""

from __future__ import annotations

import datetime
import zoneinfo

from app.lang.arithmetic import evaluate
from app.lang.functions import function


@function(name="time.now", timeout_s=1.0)
def current_time(timezone: str = "UTC", format: str = "%Y-%m-%d %H:%M:%S") -> str:
    """The current local time in an IANA time zone, e.g. time.now("Asia/Shanghai")."""
    try:
        zone = zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {timezone!r} (use IANA names like "
                         "'Europe/Paris')") from None
    if len(format) > 100:
        raise ValueError("format is longer than 100 characters")
    return datetime.datetime.now(zone).strftime(format)


@function(name="math.calc", timeout_s=1.0)
def calculate(expression: str) -> str:
    """Evaluate arithmetic safely: numbers, + - * / // % **, parentheses, sqrt/abs/round/min/max."""
    value = evaluate(expression)
    # Integral floats print as integers (2.0 -> "2"), as a person would write them.
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)
