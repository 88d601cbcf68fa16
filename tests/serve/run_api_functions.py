"""Server-side functions registered by the /run HTTP tests (`run.function_modules`).

The replica imports this module by name ("tests.serve.run_api_functions"): Ray puts the driver's
working directory (the repository root under pytest) on its workers' path. The weather table is a
local stand-in for a station database, the way an operator's module would wrap one; the other two
exist to fail in known ways (a timeout, an exception).
"""

from __future__ import annotations

import time

from app.lang import function

WEATHER = {"北京": "晴", "上海": "多云"}


@function(name="get_current_weather")
def get_current_weather(city: str) -> str:
    """Today's weather for a city, from a fixed local table."""
    return WEATHER.get(city, "未知")


@function(name="slow.sleep", timeout_s=0.3)
def sleep_for(seconds: float) -> str:
    """Sleeps: past 0.3 s it is cut off by its timeout."""
    time.sleep(seconds)
    return "awake"


@function(name="bad.divide")
def divide(a: int, b: int) -> str:
    """Integer division; b=0 raises ZeroDivisionError."""
    return str(a // b)
