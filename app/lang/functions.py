"""Server-side functions a script may call: the `@function` decorator and `FunctionRegistry`.

Operators opt in module by module (`RunSettings.function_modules`); a script can only call what
was registered, under the name it was registered with (dotted names such as `sys.query_weather`
are namespaces, not attribute access). Each call:

1. binds the script's arguments to the Python signature (missing / unexpected -> 422),
2. validates each argument against its type annotation with pydantic in strict mode (an `int`
   parameter does not take "3"; a `float` takes 3) -> 422 naming the parameter,
3. runs with a timeout: async functions on the event loop, sync ones on a small dedicated
   thread pool (a hung sync function cannot be killed, so it only ever occupies that pool),
4. turns an exception into a 422 that names the function and the error; a timeout is a 504.

Calls are counted per function (`stats()`), and an optional `on_call` hook lets the replica feed
its metrics (name, outcome, seconds).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import pydantic
from pydantic import ConfigDict, TypeAdapter

from app.errors import APIError
from app.lang.errors import FunctionCallError, FunctionNotRegisteredError, FunctionTimeoutError

FUNCTION_ATTRIBUTE = "__sglserve_function__"
FUNCTION_NAME = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"


@dataclass(frozen=True)
class FunctionSpec:
    """How a decorated callable is exposed: its script name, timeout and description."""

    name: str | None = None  # None: the Python name
    timeout_s: float | None = None  # None: RunSettings.function_timeout_s
    description: str = ""


def function(
    fn: Callable | None = None,
    *,
    name: str | None = None,
    timeout_s: float | None = None,
    description: str = "",
):
    """Mark a callable as callable from scripts (`@function` or `@function(name="sys.x")`).

    The decorator only attaches a `FunctionSpec`; nothing is registered until an operator lists
    the module in `function_modules` (or code calls `FunctionRegistry.register`)."""

    def mark(target: Callable) -> Callable:
        setattr(target, FUNCTION_ATTRIBUTE, FunctionSpec(name, timeout_s, description))
        return target

    return mark(fn) if fn is not None else mark


@dataclass
class FunctionStats:
    calls: int = 0
    errors: int = 0
    timeouts: int = 0
    total_s: float = 0.0


@dataclass
class RegisteredFunction:
    name: str
    fn: Callable
    signature: inspect.Signature
    adapters: dict[str, TypeAdapter]  # parameter name -> validator (annotated ones only)
    timeout_s: float
    description: str
    is_async: bool
    stats: FunctionStats = field(default_factory=FunctionStats)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "signature": f"{self.name}{self.signature}",
                "timeout_s": self.timeout_s, "description": self.description}


class FunctionRegistry:
    def __init__(
        self,
        *,
        default_timeout_s: float = 5.0,
        max_workers: int = 4,
        on_call: Callable[[str, str, float], None] | None = None,
    ):
        self.default_timeout_s = default_timeout_s
        self._functions: dict[str, RegisteredFunction] = {}
        self._max_workers = max_workers
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self.on_call = on_call  # (name, outcome: ok|error|timeout, seconds) -> None

    # ------------------------------------------------------------ registration
    def register(self, fn: Callable, *, name: str | None = None,
                 timeout_s: float | None = None, description: str | None = None) -> str:
        """Register one callable; returns its script name. Names are unique."""
        spec: FunctionSpec = getattr(fn, FUNCTION_ATTRIBUTE, FunctionSpec())
        script_name = name or spec.name or fn.__name__
        if not re.fullmatch(FUNCTION_NAME, script_name):
            raise ValueError(f"invalid function name {script_name!r}: use names like "
                             "'time_now' or 'sys.query_weather'")
        if script_name in ("gen", "select", "fork", "join"):
            raise ValueError(f"{script_name!r} is a builtin and cannot be registered")
        if script_name in self._functions and self._functions[script_name].fn is not fn:
            raise ValueError(f"function {script_name!r} is already registered")
        signature = inspect.signature(fn)
        try:
            hints = get_type_hints(fn)
        except Exception as exc:  # unresolvable annotations are an operator error, said early
            raise ValueError(f"cannot read the type hints of {script_name!r}: {exc}") from exc
        # Resolved annotations, so messages read `times: int`, not `times: 'int'`.
        signature = signature.replace(
            parameters=[p.replace(annotation=hints.get(p.name, p.annotation))
                        for p in signature.parameters.values()],
            return_annotation=hints.get("return", signature.return_annotation))
        adapters = {
            p: TypeAdapter(hints[p], config=ConfigDict(strict=True))
            for p in signature.parameters
            if p in hints
        }
        self._functions[script_name] = RegisteredFunction(
            name=script_name,
            fn=fn,
            signature=signature,
            adapters=adapters,
            timeout_s=timeout_s or spec.timeout_s or self.default_timeout_s,
            description=description if description is not None else (
                spec.description or inspect.getdoc(fn) or ""),
            is_async=inspect.iscoroutinefunction(fn),
        )
        return script_name

    def register_module(self, path: str) -> list[str]:
        """Import "pkg.mod" and register its @function callables, or "pkg.mod:attr" for one."""
        module_path, _, attribute = path.partition(":")
        module = importlib.import_module(module_path)
        if attribute:
            return [self.register(getattr(module, attribute))]
        names = []
        for value in vars(module).values():
            if callable(value) and hasattr(value, FUNCTION_ATTRIBUTE) and \
                    getattr(value, "__module__", None) == module.__name__:
                names.append(self.register(value))
        if not names:
            raise ValueError(f"module {module_path!r} defines no @function callables")
        return names

    @classmethod
    def from_modules(cls, paths: list[str], *, default_timeout_s: float = 5.0,
                     max_workers: int = 4) -> "FunctionRegistry":
        registry = cls(default_timeout_s=default_timeout_s, max_workers=max_workers)
        for path in paths:
            registry.register_module(path)
        return registry

    def names(self) -> list[str]:
        return sorted(self._functions)

    def get(self, name: str) -> RegisteredFunction | None:
        return self._functions.get(name)

    def describe(self) -> list[dict[str, Any]]:
        return [self._functions[n].describe() for n in self.names()]

    def stats(self) -> dict[str, dict[str, float]]:
        return {n: vars(f.stats).copy() for n, f in sorted(self._functions.items())}

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # ------------------------------------------------------------ calling
    def bind(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> tuple[
            RegisteredFunction, inspect.BoundArguments]:
        """Find and type-check a call; raises 422 ScriptErrors without positions (the caller
        adds them)."""
        registered = self._functions.get(name)
        if registered is None:
            known = ", ".join(self.names()) or "none"
            raise FunctionNotRegisteredError(
                f"function {name!r} is not registered on this server (registered: {known})")
        try:
            bound = registered.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise FunctionCallError(f"{name}(): {exc}; expected {name}{registered.signature}") \
                from None
        for param, value in list(bound.arguments.items()):
            adapter = registered.adapters.get(param)
            if adapter is None:
                continue
            try:
                bound.arguments[param] = adapter.validate_python(value)
            except pydantic.ValidationError as exc:
                message = exc.errors()[0]["msg"] if exc.errors() else str(exc)
                raise FunctionCallError(
                    f"{name}(): argument {param!r} got {type(value).__name__} {value!r}: "
                    f"{message}; expected {name}{registered.signature}") from None
        return registered, bound

    async def call(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        registered, bound = self.bind(name, args, kwargs)
        started = time.perf_counter()
        outcome = "ok"
        try:
            if registered.is_async:
                coro = registered.fn(*bound.args, **bound.kwargs)
            else:
                loop = asyncio.get_running_loop()
                coro = loop.run_in_executor(self._pool(), _call_bound, registered.fn, bound)
            return await asyncio.wait_for(coro, registered.timeout_s)
        except asyncio.TimeoutError:
            outcome = "timeout"
            registered.stats.timeouts += 1
            raise FunctionTimeoutError(
                f"{name}() did not finish within its timeout of {registered.timeout_s:g} s") \
                from None
        except Exception as exc:
            outcome = "error"
            registered.stats.errors += 1
            detail = exc.message if isinstance(exc, APIError) else f"{type(exc).__name__}: {exc}"
            raise FunctionCallError(f"{name}() failed: {detail}") from None
        finally:
            elapsed = time.perf_counter() - started
            registered.stats.calls += 1
            registered.stats.total_s += elapsed
            if self.on_call is not None:
                self.on_call(name, outcome, elapsed)

    def _pool(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._max_workers,
                                                    thread_name_prefix="run-function")
            return self._executor


def _call_bound(fn: Callable, bound: inspect.BoundArguments) -> Any:
    return fn(*bound.args, **bound.kwargs)
