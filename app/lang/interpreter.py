"""Runs a checked program against an engine, step by step, mirroring the sglang frontend.

The frontend (sglang/lang/interpreter.py + backend/runtime_endpoint.py) keeps the program's text
in the client and sends one HTTP request per primitive. Here the same requests go straight to the
engine on the replica, which keeps every step on one prefix cache:

- text, variables, function results: appended to the branch's text.
- gen: one generate call with the whole text so far as the prompt and sampling = the request's
  defaults overridden by the gen's arguments, plus the role template's stop strings (and, for
  dtype=..., the frontend's regex). The completion is appended and bound to the name.
- select: a `max_new_tokens=0` call for the prompt length, then one call per option with
  `text + option`, `logprob_start_len = max(prompt_len - 2, 0)` and input logprobs; each option
  is scored by the mean of its input logprobs, dropping the first token when the text already
  ends with it ("token healing"), and the best (first on ties) wins. greedy_token_selection
  compares the options token by token instead.
- role blocks: prefix, body, suffix of the role template; the body (left-stripped) is recorded
  as a chat message. A non-system first role gets the template's default system prompt.
- fork(n): for n > 1 the text so far is committed (a `max_new_tokens=0` call caching it), then n
  branches copy the state and run concurrently; their requests share that cached prefix.
  join ("gather", the frontend's default) turns each variable a branch created into a list,
  in branch order, and leaves the parent's text alone; join("concat") also appends the
  branches' new text in order.
- if/elif/else: Python truthiness of the condition's value.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.engines.base import Engine
from app.errors import APIError
from app.lang import ast
from app.lang.errors import ScriptError, SourceMap
from app.lang.functions import FunctionRegistry
from app.lang.request import RunDefaults, RunEvent, RunMeta, RunResult
from app.lang.templates import RoleTemplate
from app.protocol import GenerateOutput, GenerateRequest, SamplingParams

Emitter = Callable[[RunEvent], None]


@dataclass
class Branch:
    """The state one line of execution owns (the frontend's StreamExecutor fields)."""

    text: str
    variables: dict[str, Any]
    path: tuple[int, ...] = ()
    messages: list[dict[str, str]] = field(default_factory=list)
    role: str | None = None
    role_begin: int = 0
    fork_index: int | None = None
    fork_start: int = 0

    def copy_for_fork(self, index: int) -> "Branch":
        return Branch(self.text, dict(self.variables), self.path + (index,), list(self.messages),
                      self.role, self.role_begin, index, len(self.text))


@dataclass
class Counters:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    engine_calls: int = 0
    function_calls: int = 0
    engine_s: float = 0.0
    functions_s: float = 0.0
    first_token_at: float | None = None


class Interpreter:
    def __init__(
        self,
        program: ast.Program,
        *,
        engine: Engine,
        registry: FunctionRegistry,
        template: RoleTemplate,
        defaults: RunDefaults,
        session_id: str,
        deadline: float | None = None,
        emit: Emitter | None = None,
    ):
        self.program = program
        self.engine = engine
        self.registry = registry
        self.template = template
        self.defaults = defaults
        self.session_id = session_id
        self.deadline = deadline
        self.emit = emit
        self.map = SourceMap(program.source) if program.source is not None else None
        self.counters = Counters()
        # select name (name@branch.path inside forks) -> normalized logprob of each option
        self.select_scores: dict[str, list[float]] = {}
        self.started = 0.0

    async def run(self, arguments: dict[str, Any]) -> RunResult:
        self.started = time.perf_counter()
        main = Branch("", dict(arguments))
        await self._body(main, self.program.body)
        c = self.counters
        return RunResult(
            text=main.text,
            variables=main.variables,
            meta=RunMeta(
                prompt_tokens=c.prompt_tokens,
                completion_tokens=c.completion_tokens,
                cached_tokens=c.cached_tokens,
                engine_calls=c.engine_calls,
                function_calls=c.function_calls,
                select_scores=self.select_scores,
                timings={
                    "total_s": time.perf_counter() - self.started,
                    "first_token_s": None if c.first_token_at is None
                    else c.first_token_at - self.started,
                    "engine_s": c.engine_s,
                    "functions_s": c.functions_s,
                },
            ),
        )

    # ------------------------------------------------------------ statements
    async def _body(self, branch: Branch, body: tuple[ast.Stmt, ...]) -> None:
        for stmt in body:
            await self._stmt(branch, stmt)

    async def _stmt(self, branch: Branch, stmt: ast.Stmt) -> None:
        if isinstance(stmt, ast.Text):
            self._fill(branch, stmt.value)
        elif isinstance(stmt, ast.Emit):
            self._fill(branch, render(await self._eval(branch, stmt.expr)))
        elif isinstance(stmt, ast.Let):
            self._set(branch, stmt.name, await self._eval(branch, stmt.expr))
        elif isinstance(stmt, ast.Gen):
            await self._gen(branch, stmt)
        elif isinstance(stmt, ast.Select):
            await self._select(branch, stmt)
        elif isinstance(stmt, ast.Role):
            await self._role(branch, stmt)
        elif isinstance(stmt, ast.Fork):
            await self._fork(branch, stmt)
        elif isinstance(stmt, ast.If):
            for condition, body in stmt.branches:
                if truthy(await self._eval(branch, condition)):
                    await self._body(branch, body)
                    return
            await self._body(branch, stmt.orelse)
        else:
            raise AssertionError(f"unknown statement {stmt!r}")

    def _fill(self, branch: Branch, text: str) -> None:
        if text:
            branch.text += text
            self._emit(RunEvent(type="text", branch=list(branch.path), text=text))

    def _set(self, branch: Branch, name: str, value: Any) -> None:
        branch.variables[name] = value
        self._emit(RunEvent(type="variable", branch=list(branch.path), name=name, value=value))

    def _emit(self, event: RunEvent) -> None:
        if self.emit is not None:
            self.emit(event)

    async def _gen(self, branch: Branch, stmt: ast.Gen) -> None:
        sampling = self.defaults.sampling_for(stmt, list(self.template.stop), self.map)
        completion = ""

        def on_text(delta: str) -> None:
            nonlocal completion
            completion += delta
            self._fill(branch, delta)

        await self._generate(branch.text, sampling, on_text=on_text)
        self._set(branch, stmt.name, completion)

    async def _select(self, branch: Branch, stmt: ast.Select) -> None:
        options = await self._eval(branch, stmt.options)
        if not (isinstance(options, list) and options and all(isinstance(o, str) for o in options)):
            raise self._error(stmt.options.at or stmt.at, f"select({stmt.name!r}) options must "
                              f"be a non-empty list of strings, got {render_short(options)}")
        prefix = branch.text
        prompt = await self._generate(prefix, SamplingParams(max_new_tokens=0))
        start = max(prompt.prompt_tokens - 2, 0)
        scored = await asyncio.gather(*(
            self._generate(prefix + option, SamplingParams(max_new_tokens=0, temperature=0.0),
                           return_logprob=True, logprob_start_len=start)
            for option in options))
        token_logprobs = [list(out.input_token_logprobs or []) for out in scored]
        scores = [mean_logprob(lps) for lps in token_logprobs]
        for i, lps in enumerate(token_logprobs):
            # Token healing: the first scored token may be the prefix's own last token.
            # SGLang reports None for the first scored position (never counted in the mean);
            # the frontend's formula would raise on it, so a None is simply dropped.
            healed_text = lps[0][2] if lps else None
            if healed_text is not None and prefix.endswith(healed_text) and len(lps) > 1:
                first = lps[0][0]
                if first is not None:
                    scores[i] = (scores[i] * len(lps) - first) / (len(lps) - 1)
                token_logprobs[i] = lps[1:]
        if stmt.method == "greedy_token_selection":
            best = greedy_choice(token_logprobs)
        else:
            best = max(range(len(options)), key=lambda i: (scores[i], -i))
        decision = options[best]
        key = stmt.name if not branch.path else f"{stmt.name}@{'.'.join(map(str, branch.path))}"
        self.select_scores[key] = scores
        self._set(branch, stmt.name, decision)
        self._fill(branch, decision)

    async def _role(self, branch: Branch, stmt: ast.Role) -> None:
        if branch.role is not None:
            raise self._error(stmt.at, f"{{{stmt.role}}} inside {{{branch.role}}}: roles "
                              "cannot nest")
        if not branch.messages and stmt.role != "system" and self.template.default_system_prompt:
            await self._role(branch, ast.Role("system", (
                ast.Text(self.template.default_system_prompt),)))
        branch.role = stmt.role
        self._fill(branch, self.template.prefix(stmt.role))
        branch.role_begin = len(branch.text)
        await self._body(branch, stmt.body)
        content = branch.text[branch.role_begin:].lstrip()
        self._fill(branch, self.template.suffix(stmt.role))
        branch.messages.append({"role": stmt.role, "content": content})
        branch.role = None

    async def _fork(self, branch: Branch, stmt: ast.Fork) -> None:
        if stmt.width > 1 and branch.text:
            await self._generate(branch.text, SamplingParams(max_new_tokens=0))  # cache prefix
        children = [branch.copy_for_fork(i) for i in range(stmt.width)]
        tasks = [asyncio.create_task(self._body(child, stmt.body)) for child in children]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if stmt.join_mode == "concat":
            self._fill(branch, "".join(c.text[c.fork_start:] for c in children))
        existing = set(branch.variables)
        gathered: dict[str, list[Any]] = {}
        for child in children:
            for name, value in child.variables.items():
                if name not in existing:
                    gathered.setdefault(name, []).append(value)
        for name, values in gathered.items():
            self._set(branch, name, values)

    # ------------------------------------------------------------ engine
    async def _generate(self, text: str, sampling: SamplingParams, *,
                        on_text: Callable[[str], None] | None = None,
                        return_logprob: bool = False, logprob_start_len: int = -1
                        ) -> GenerateOutput:
        request = GenerateRequest(
            text=text,
            sampling=sampling,
            stream=on_text is not None,
            return_logprob=return_logprob,
            logprob_start_len=logprob_start_len,
            return_text_in_logprobs=return_logprob,
            session_id=self.session_id,
            deadline=self.deadline,
        )
        started = time.perf_counter()
        merged: GenerateOutput | None = None
        try:
            async for out in self.engine.generate(request):
                merged = out if merged is None else merged.merge(out)
                if out.text:
                    if self.counters.first_token_at is None:
                        self.counters.first_token_at = time.perf_counter()
                    if on_text is not None:
                        on_text(out.text)
        finally:
            self.counters.engine_s += time.perf_counter() - started
            self.counters.engine_calls += 1
        if merged is None or not merged.finished:
            raise APIError(f"the engine ended request {request.rid} without a final output")
        if merged.finish_reason is not None and merged.finish_reason.type == "abort":
            raise APIError(f"the engine aborted a step of the program: "
                           f"{merged.finish_reason.message or 'no reason given'}")
        self.counters.prompt_tokens += merged.prompt_tokens
        self.counters.completion_tokens += merged.completion_tokens
        self.counters.cached_tokens += merged.cached_tokens
        return merged

    # ------------------------------------------------------------ expressions
    def _error(self, at: int | None, message: str, cls: type[ScriptError] = ScriptError,
               **kwargs) -> ScriptError:
        return cls.at(self.map, at, message, **kwargs)

    async def _eval(self, branch: Branch, expr: ast.Expr) -> Any:
        if isinstance(expr, ast.Literal):
            return expr.value
        if isinstance(expr, ast.ListExpr):
            return [await self._eval(branch, item) for item in expr.items]
        if isinstance(expr, ast.VarRef):
            if expr.name == "fork_index" and branch.fork_index is not None:
                return branch.fork_index
            if expr.name not in branch.variables:
                raise self._error(expr.at, f"variable {expr.name!r} is not set at this point "
                                  "(it is only set in a branch that did not run)")
            return branch.variables[expr.name]
        if isinstance(expr, ast.Index):
            return self._index(await self._eval(branch, expr.target),
                               await self._eval(branch, expr.index), expr.at)
        if isinstance(expr, ast.Call):
            return await self._call(branch, expr)
        if isinstance(expr, ast.Compare):
            return self._compare(expr, await self._eval(branch, expr.left),
                                 await self._eval(branch, expr.right))
        if isinstance(expr, ast.BoolOp):
            if expr.op == "and":
                for operand in expr.operands:
                    if not truthy(await self._eval(branch, operand)):
                        return False
                return True
            for operand in expr.operands:
                if truthy(await self._eval(branch, operand)):
                    return True
            return False
        if isinstance(expr, ast.Not):
            return not truthy(await self._eval(branch, expr.operand))
        raise AssertionError(f"unknown expression {expr!r}")

    async def _call(self, branch: Branch, call: ast.Call) -> Any:
        args = [await self._eval(branch, a) for a in call.args]
        kwargs = {k: await self._eval(branch, v) for k, v in call.kwargs}
        started = time.perf_counter()
        try:
            return await self.registry.call(call.function, args, kwargs)
        except ScriptError as exc:
            # Add the call's position to errors raised without one.
            if exc.line is None and self.map is not None and call.at is not None:
                raise self._error(call.at, exc.reason, type(exc), code=exc.code) from None
            raise
        finally:
            self.counters.function_calls += 1
            self.counters.functions_s += time.perf_counter() - started

    def _index(self, target: Any, key: Any, at: int | None) -> Any:
        if isinstance(target, (list, str)) and type(key) is int:
            if -len(target) <= key < len(target):
                return target[key]
            raise self._error(at, f"index {key} is out of range for a value of length "
                              f"{len(target)}")
        if isinstance(target, dict) and isinstance(key, str):
            if key in target:
                return target[key]
            raise self._error(at, f"key {key!r} not found (keys: {', '.join(map(str, target))})")
        raise self._error(at, f"cannot index {type_name(target)} with {type_name(key)} "
                          f"{render_short(key)}")

    def _compare(self, expr: ast.Compare, left: Any, right: Any) -> bool:
        op = expr.op
        if op == "==":
            return left == right
        if op == "!=":
            return left != right
        if op == "in":
            if isinstance(right, str) and isinstance(left, str):
                return left in right
            if isinstance(right, (list, dict)):
                return left in right
            raise self._error(expr.at, f"'in' needs a list, string or object on the right, got "
                              f"{type_name(right)}")
        numbers = all(type(v) in (int, float) for v in (left, right))
        strings = all(isinstance(v, str) for v in (left, right))
        if not (numbers or strings):
            raise self._error(expr.at, f"cannot compare {type_name(left)} {op} "
                              f"{type_name(right)}: both sides must be numbers or both strings")
        return {"<": left < right, "<=": left <= right, ">": left > right,
                ">=": left >= right}[op]


def truthy(value: Any) -> bool:
    return bool(value)


def render(value: Any) -> str:
    """How a value becomes text: strings as they are, None as nothing, lists/objects as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def render_short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            dict: "object", type(None): "none"}.get(type(value), type(value).__name__)


def mean_logprob(token_logprobs: list[tuple[float, int, str | None]]) -> float:
    """The frontend's normalization: the mean of the logprobs that are present and non-zero."""
    values = [lp for lp, _, _ in token_logprobs if lp]
    return sum(values) / len(values) if values else 0.0


def greedy_choice(token_logprobs: list[list[tuple[float, int, str | None]]]) -> int:
    """Compare options token by token: keep those with the best logprob at each position until
    one remains. A shorter option is padded with its own mean logprob."""
    rows = []
    width = max(len(lps) for lps in token_logprobs)
    for lps in token_logprobs:
        values = [lp or 0.0 for lp, _, _ in lps]
        pad = sum(values) / len(values) if values else 0.0
        rows.append(values + [pad] * (width - len(values)))
    remaining = list(range(len(rows)))
    for column in range(width):
        best = max(rows[i][column] for i in remaining)
        remaining = [i for i in remaining if rows[i][column] == best]
        if len(remaining) == 1:
            break
    return remaining[0]
