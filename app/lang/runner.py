"""`ProgramRunner`: the one object a model replica needs to serve `/run`.

    runner = ProgramRunner(engine, settings.run)        # once, at replica start
    result = await runner.run(body)                      # body: RunRequest or its dict
    async for event in runner.run_stream(body): ...      # RunEvent per token / variable / done

`prepare(body)` parses and checks without running (413/422 before any model call); `run` and
`run_stream` accept a prepared program too, so a streaming route can fail with a plain 422
before it starts an SSE response. Every engine request of one program carries the same
`session_id`, and the whole program runs on the engine it was given: one replica, one prefix
cache.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import pydantic

from app.engines.base import Engine
from app.errors import APIError, PayloadTooLargeError, ValidationError
from app.lang import ast
from app.lang.builtins import check_variable_name
from app.lang.checker import ProgramChecker
from app.lang.errors import ProgramTimeoutError, ScriptError
from app.lang.functions import FunctionRegistry
from app.lang.interpreter import Interpreter
from app.lang.json_program import parse_json_program
from app.lang.parser import parse_script
from app.lang.request import RunDefaults, RunEvent, RunRequest, RunResult
from app.lang.settings import RunSettings
from app.lang.templates import RoleTemplate, TemplateError, role_template_from_settings


def parse(
    program: str | list[Any],
    *,
    settings: RunSettings | None = None,
    arguments: Mapping[str, Any] | None = None,
    defaults: RunDefaults | None = None,
    template_stop: list[str] | None = None,
) -> ast.Program:
    """Parse and statically check a program (script text or JSON ops).

    Raises PayloadTooLargeError (413) past max_script_bytes, and ValidationError subclasses
    (422) for syntax errors (with line, column and caret excerpt), unknown variables, bad
    builtin arguments and exceeded limits. Never runs anything."""
    settings = settings or RunSettings()
    if isinstance(program, str):
        size = len(program.encode("utf-8", "surrogatepass"))
        _check_size(size, settings)
        parsed = parse_script(program, max_nesting_depth=settings.max_nesting_depth)
    elif isinstance(program, list):
        parsed = parse_json_program(program, max_nesting_depth=settings.max_nesting_depth)
        _check_size(len(json.dumps(program, ensure_ascii=False).encode("utf-8",
                                                                        "surrogatepass")),
                    settings)
    else:
        raise ValidationError("program must be a script (string) or a list of ops",
                              param="program")
    names = set()
    for name in (arguments or {}):
        try:
            names.add(check_variable_name(name, None, None, "an argument name"))
        except ScriptError as exc:
            raise ValidationError(f"arguments: {exc.reason}", param="arguments") from None
    ProgramChecker(parsed, settings, defaults or RunDefaults(), names,
                   template_stop or []).check()
    return parsed


def _check_size(size: int, settings: RunSettings) -> None:
    if size > settings.max_script_bytes:
        raise PayloadTooLargeError(f"limit max_script_bytes exceeded: the program is {size} "
                                   f"bytes, the limit is {settings.max_script_bytes}",
                                   param="program", code="limit_exceeded")


@dataclass(frozen=True)
class PreparedProgram:
    request: RunRequest
    program: ast.Program


class ProgramRunner:
    def __init__(self, engine: Engine, settings: RunSettings | None = None,
                 registry: FunctionRegistry | None = None):
        self.engine = engine
        self.settings = settings or RunSettings()
        self.registry = registry if registry is not None else FunctionRegistry.from_modules(
            self.settings.function_modules,
            default_timeout_s=self.settings.function_timeout_s,
            max_workers=self.settings.function_workers,
        )
        self._template: RoleTemplate | None = None

    @property
    def role_template(self) -> RoleTemplate:
        """Resolved on first use (the engine's tokenizer may need the engine started)."""
        if self._template is None:
            tokenizer = self.engine.tokenizer if self.settings.role_template == "model" else None
            try:
                self._template = role_template_from_settings(self.settings.role_template,
                                                             tokenizer)
            except TemplateError as exc:
                raise APIError(f"/run role templates are misconfigured: {exc}") from exc
        return self._template

    def describe(self) -> dict[str, Any]:
        """For /server_info: limits, the role template and the callable functions."""
        return {"settings": self.settings.model_dump(mode="json"),
                "role_template": self.role_template.name,
                "functions": self.registry.describe(),
                "function_stats": self.registry.stats()}

    def prepare(self, request: RunRequest | Mapping[str, Any]) -> PreparedProgram:
        if not isinstance(request, RunRequest):
            try:
                request = RunRequest.model_validate(request)
            except pydantic.ValidationError as exc:
                problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                                     for e in exc.errors()[:5])
                raise ValidationError(f"invalid /run request: {problems}") from None
        program = parse(request.program, settings=self.settings, arguments=request.arguments,
                        defaults=request.sampling, template_stop=list(self.role_template.stop))
        return PreparedProgram(request, program)

    async def run(self, request: RunRequest | Mapping[str, Any] | PreparedProgram) -> RunResult:
        prepared = request if isinstance(request, PreparedProgram) else self.prepare(request)
        return await self._execute(prepared, emit=None)

    async def run_stream(self, request: RunRequest | Mapping[str, Any] | PreparedProgram
                         ) -> AsyncIterator[RunEvent]:
        """Events as they happen, ending with a `done` event; errors raise (after the events
        emitted so far). Stopping the iteration cancels the program and its engine requests."""
        prepared = request if isinstance(request, PreparedProgram) else self.prepare(request)
        queue: asyncio.Queue[RunEvent | None] = asyncio.Queue()
        task = asyncio.create_task(self._execute(prepared, emit=queue.put_nowait))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while True:
                event = await queue.get()
                if event is None:
                    break
                yield event
            result = task.result()  # raises the program's error, if any
            yield RunEvent(type="done", result=result)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _execute(self, prepared: PreparedProgram, emit) -> RunResult:
        timeout_s = self.settings.max_program_s
        interpreter = Interpreter(
            prepared.program,
            engine=self.engine,
            registry=self.registry,
            template=self.role_template,
            defaults=prepared.request.sampling,
            session_id=uuid.uuid4().hex,
            deadline=time.time() + timeout_s,
            emit=emit,
        )
        try:
            return await asyncio.wait_for(interpreter.run(dict(prepared.request.arguments)),
                                          timeout_s)
        except asyncio.TimeoutError:
            raise ProgramTimeoutError(f"the program ran longer than max_program_s="
                                      f"{timeout_s:g} s") from None
