"""Server-side functions: registration, typed arguments, timeouts, errors, metrics, and the two
scripts of the issue (unregistered -> 422 naming the function; registered locally -> they run)."""

from __future__ import annotations

import asyncio
import datetime
import re
import threading
import zoneinfo

import pytest

from app.lang import FunctionRegistry, ProgramRunner, RunSettings, function
from app.lang.arithmetic import ArithmeticError_, evaluate
from app.lang.errors import FunctionCallError, FunctionNotRegisteredError, FunctionTimeoutError

TEXT_ONLY = RunSettings(role_template="default", function_timeout_s=2.0)


def run(runner: ProgramRunner, program, **kw):
    return asyncio.run(runner.run({"program": program, **kw}))


def test_issue_scripts_parse_and_fail_at_the_call_naming_the_function(idle_engine):
    runner = ProgramRunner(idle_engine, TEXT_ONLY, FunctionRegistry())
    with pytest.raises(FunctionNotRegisteredError) as info:
        run(runner, '今天{get_current_weather("北京")},适合外出。')
    err = info.value
    assert err.status_code == 422 and err.code == "function_not_registered"
    assert "function 'get_current_weather' is not registered" in err.message
    assert (err.line, err.column) == (1, 4)

    with pytest.raises(FunctionNotRegisteredError, match="'sys.query_weather' is not registered"):
        run(runner, "今天天气如何?{sys.query_weather()}")


def test_the_program_runs_up_to_the_unregistered_call(idle_engine):
    runner = ProgramRunner(idle_engine, TEXT_ONLY, FunctionRegistry())

    async def collect():
        events = []
        with pytest.raises(FunctionNotRegisteredError):
            async for event in runner.run_stream({"program": "今天天气如何?{sys.query_weather()}"}):
                events.append(event)
        return events

    events = asyncio.run(collect())
    assert [(e.type, e.text) for e in events] == [("text", "今天天气如何?")]


def test_registering_local_functions_under_those_names_makes_the_scripts_work(idle_engine):
    registry = FunctionRegistry()

    @function(name="get_current_weather")
    def weather(city: str) -> str:
        return {"北京": "晴"}.get(city, "未知")

    @function(name="sys.query_weather")
    async def query_weather() -> str:
        return "多云"

    registry.register(weather)
    registry.register(query_weather)
    runner = ProgramRunner(idle_engine, TEXT_ONLY, registry)
    assert run(runner, '今天{get_current_weather("北京")},适合外出。').text == "今天晴,适合外出。"
    assert run(runner, "今天天气如何?{sys.query_weather()}").text == "今天天气如何?多云"


def test_arguments_are_bound_and_type_checked_strictly(idle_engine):
    registry = FunctionRegistry()

    @function(name="tools.repeat")
    def repeat(word: str, times: int = 2, sep: str = " ", scale: float = 1.0) -> str:
        return sep.join([word] * times) + ("" if scale == 1.0 else f" x{scale}")

    registry.register(repeat)
    runner = ProgramRunner(idle_engine, TEXT_ONLY, registry)
    assert run(runner, '{tools.repeat("ha", 3, sep="-")}').text == "ha-ha-ha"
    assert run(runner, '{tools.repeat(w, times=n, scale=2)}',
               arguments={"w": "yo", "n": 1}).text == "yo x2.0"  # int accepted for float
    cases = [
        ('{tools.repeat("ha", "3")}', r"argument 'times' got str '3'"),
        ('{tools.repeat("ha", true)}', r"argument 'times' got bool True"),
        ('{tools.repeat(1)}', r"argument 'word' got int 1"),
        ('{tools.repeat()}', r"missing a required argument: 'word'"),
        ('{tools.repeat("a", colour="red")}', r"unexpected keyword argument 'colour'"),
    ]
    for script, message in cases:
        with pytest.raises(FunctionCallError, match=message) as info:
            run(runner, script)
        assert info.value.status_code == 422
        assert "expected tools.repeat(word: str, times: int = 2" in info.value.message
        assert info.value.line == 1


def test_exceptions_become_422_script_errors_with_the_call_position(idle_engine):
    registry = FunctionRegistry()

    @function(name="bad.divide")
    def divide(a: int, b: int) -> float:
        return a / b

    registry.register(divide)
    runner = ProgramRunner(idle_engine, TEXT_ONLY, registry)
    with pytest.raises(FunctionCallError) as info:
        run(runner, "x\n  {bad.divide(1, 0)}")
    err = info.value
    assert err.status_code == 422
    assert "bad.divide() failed: ZeroDivisionError: division by zero" in err.message
    assert (err.line, err.column) == (2, 4)
    assert registry.stats()["bad.divide"]["errors"] == 1


def test_slow_functions_time_out_with_504_sync_and_async(idle_engine):
    release = threading.Event()
    registry = FunctionRegistry(max_workers=2)

    @function(name="slow.sync", timeout_s=0.2)
    def slow_sync() -> str:
        release.wait(5)
        return "late"

    @function(name="slow.async", timeout_s=0.2)
    async def slow_async() -> str:
        await asyncio.sleep(5)
        return "late"

    registry.register(slow_sync)
    registry.register(slow_async)
    runner = ProgramRunner(idle_engine, TEXT_ONLY, registry)
    try:
        for name in ("slow.sync", "slow.async"):
            with pytest.raises(FunctionTimeoutError,
                               match=re.escape(f"{name}() did not finish within its timeout of "
                                               "0.2 s")) as info:
                run(runner, f"{{{name}()}}")
            assert info.value.status_code == 504
            assert registry.stats()[name]["timeouts"] == 1
    finally:
        release.set()
        registry.close()


def test_calls_are_counted_and_reported_to_a_metrics_hook(idle_engine):
    seen: list[tuple[str, str]] = []
    registry = FunctionRegistry(on_call=lambda name, outcome, seconds: seen.append((name, outcome)))

    @function
    def echo(text: str) -> str:
        return text

    registry.register(echo)
    runner = ProgramRunner(idle_engine, TEXT_ONLY, registry)
    # A fork at the very start commits no prefix, so no model call is made.
    result = run(runner, '{fork(2)}{echo("c")}{join}{echo("a")}{echo("b")}')
    assert result.text == "ab"
    assert result.meta.function_calls == 4
    assert registry.stats()["echo"]["calls"] == 4
    assert seen == [("echo", "ok")] * 4


def test_results_are_rendered_as_text_and_can_be_bound_with_let(idle_engine):
    registry = FunctionRegistry()

    @function(name="data.info")
    def info() -> dict:
        return {"temp": 21, "tags": ["晴", "风"]}

    registry.register(info)
    runner = ProgramRunner(idle_engine, TEXT_ONLY, registry)
    result = run(runner, '{let d = data.info()}{d["temp"]}° {d["tags"][0]} {data.info()}'
                         '{if d["temp"] > 20} warm{/if}')
    assert result.text == '21° 晴 {"temp": 21, "tags": ["晴", "风"]} warm'
    assert result.variables["d"]["temp"] == 21


def test_modules_are_registered_by_import_path():
    registry = FunctionRegistry.from_modules(["app.lang.examples"])
    assert registry.names() == ["math.calc", "time.now"]
    single = FunctionRegistry()
    assert single.register_module("app.lang.examples:calculate") == ["math.calc"]
    with pytest.raises(ValueError, match="no @function callables"):
        FunctionRegistry().register_module("app.lang.arithmetic")
    with pytest.raises(ModuleNotFoundError):
        FunctionRegistry().register_module("app.lang.no_such_module")


def test_registration_rejects_bad_or_duplicate_names():
    registry = FunctionRegistry()
    with pytest.raises(ValueError, match="invalid function name"):
        registry.register(lambda: 1, name="bad name")
    with pytest.raises(ValueError, match="builtin"):
        registry.register(lambda: 1, name="gen")
    registry.register(lambda: 1, name="one")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(lambda: 2, name="one")


def test_example_functions_through_a_script(idle_engine):
    runner = ProgramRunner(idle_engine, RunSettings(role_template="default",
                                                    function_modules=["app.lang.examples"]))
    result = run(runner, '{math.calc("2*(3+4) - 2**3")} {time.now("Asia/Shanghai", format="%Y")}')
    year = datetime.datetime.now(zoneinfo.ZoneInfo("Asia/Shanghai")).year
    assert result.text in (f"6 {year}", f"6 {year + 1}")
    with pytest.raises(FunctionCallError, match="unknown time zone 'Mars/Base'"):
        run(runner, '{time.now("Mars/Base")}')
    with pytest.raises(FunctionCallError, match=r"math.calc\(\) failed: .*division by zero"):
        run(runner, '{math.calc("1/0")}')


class TestArithmetic:
    @pytest.mark.parametrize("expression, value", [
        ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("2 ** 3 ** 2", 512), ("-2 ** 2", -4),
        ("7 // 2 + 7 % 2", 4), ("1 / 4", 0.25), ("sqrt(16) + abs(-1)", 5.0),
        ("max(1, 5, 3) - min(4, 2)", 3), ("1.5e2", 150.0), ("round(2.6)", 3),
    ])
    def test_values(self, expression, value):
        assert evaluate(expression) == value

    @pytest.mark.parametrize("expression, message", [
        ("9 ** 9 ** 9", "exponent"), ("1 / 0", "division by zero"), ("(1", "end of expression"),
        ("1 +", "end of expression"), ("__import__('os')", "unexpected"), ("2 3", "unexpected '3'"),
        ("(" * 60 + "1" + ")" * 60, "nests deeper"), ("x" * 600, "longer than"),
        ("10 ** 999 * 10 ** 999 * 10 ** 999", "too large"), ("sqrt(-1)", "math domain"),
        ("", "empty"),
    ])
    def test_errors(self, expression, message):
        with pytest.raises(ArithmeticError_, match=message):
            evaluate(expression)
