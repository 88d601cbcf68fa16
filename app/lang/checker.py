"""Static checks on a parsed program, before anything runs.

Walks the tree once, carrying how many times a statement will run (fork widths multiply) and
which variables are defined at that point, and enforces the `RunSettings` limits:

- gens (gen + select steps over all branches) <= max_gens,
- the sum of max_new_tokens over all gens and branches <= max_total_tokens (an `if` costs its
  most expensive branch),
- fork width <= max_fork_width, select options <= max_select_options, calls <= max_function_calls,
- every variable is defined before use (by the request's arguments, gen/select/let, a join, or
  `fork_index` inside a fork); a variable defined only in some `if` branch passes here and is
  checked again when read,
- every gen's sampling parameters are valid once merged with the request's defaults.

Function names are deliberately not checked here: a call of an unregistered function runs the
program up to that call and fails there (422 naming the function).
"""

from __future__ import annotations

from dataclasses import dataclass

from app.errors import ValidationError
from app.lang import ast
from app.lang.errors import ScriptError, SourceMap
from app.lang.request import RunDefaults
from app.lang.settings import RunSettings


@dataclass
class Cost:
    gens: int = 0
    tokens: int = 0
    calls: int = 0

    def add(self, other: "Cost") -> None:
        self.gens += other.gens
        self.tokens += other.tokens
        self.calls += other.calls


class ProgramChecker:
    def __init__(self, program: ast.Program, settings: RunSettings, defaults: RunDefaults,
                 argument_names: set[str], template_stop: list[str]):
        self.program = program
        self.settings = settings
        self.defaults = defaults
        self.map = SourceMap(program.source) if program.source is not None else None
        self.arguments = argument_names
        self.template_stop = template_stop

    def error(self, at: int | None, message: str) -> ScriptError:
        return ScriptError.at(self.map, at, message, code="limit_exceeded"
                              if message.startswith("limit") else "script_error")

    def check(self) -> Cost:
        cost = self._body(self.program.body, set(self.arguments), multiplier=1, in_fork=False)
        limits = self.settings
        if cost.gens > limits.max_gens:
            raise ValidationError(f"limit max_gens exceeded: the program runs {cost.gens} gen/"
                                  f"select steps (counting fork branches), the limit is "
                                  f"{limits.max_gens}", code="limit_exceeded", param="program")
        if cost.tokens > limits.max_total_tokens:
            raise ValidationError(f"limit max_total_tokens exceeded: the gens may produce up to "
                                  f"{cost.tokens} tokens (sum of max_tokens over all gens and "
                                  f"branches), the limit is {limits.max_total_tokens}",
                                  code="limit_exceeded", param="program")
        if cost.calls > limits.max_function_calls:
            raise ValidationError(f"limit max_function_calls exceeded: {cost.calls} calls, the "
                                  f"limit is {limits.max_function_calls}", code="limit_exceeded",
                                  param="program")
        self.program.gen_count = cost.gens
        self.program.max_total_tokens = cost.tokens
        return cost

    def _body(self, body: tuple[ast.Stmt, ...], defined: set[str], multiplier: int,
              in_fork: bool) -> Cost:
        cost = Cost()
        for stmt in body:
            cost.add(self._stmt(stmt, defined, multiplier, in_fork))
        return cost

    def _stmt(self, stmt: ast.Stmt, defined: set[str], mult: int, in_fork: bool) -> Cost:
        if isinstance(stmt, ast.Text):
            return Cost()
        if isinstance(stmt, ast.Emit):
            return self._expr(stmt.expr, defined, mult, in_fork)
        if isinstance(stmt, ast.Let):
            cost = self._expr(stmt.expr, defined, mult, in_fork)
            defined.add(stmt.name)
            return cost
        if isinstance(stmt, ast.Gen):
            sampling = self.defaults.sampling_for(stmt, self.template_stop, self.map)
            defined.add(stmt.name)
            return Cost(gens=mult, tokens=sampling.max_new_tokens * mult)
        if isinstance(stmt, ast.Select):
            cost = self._expr(stmt.options, defined, mult, in_fork)
            if isinstance(stmt.options, ast.ListExpr) and \
                    len(stmt.options.items) > self.settings.max_select_options:
                raise self.error(stmt.options.at or stmt.at, f"limit max_select_options "
                                 f"exceeded: {len(stmt.options.items)} options, the limit is "
                                 f"{self.settings.max_select_options}")
            defined.add(stmt.name)
            cost.gens += mult
            return cost
        if isinstance(stmt, ast.Role):
            return self._body(stmt.body, defined, mult, in_fork)
        if isinstance(stmt, ast.Fork):
            if stmt.width > self.settings.max_fork_width:
                raise self.error(stmt.at, f"limit max_fork_width exceeded: fork({stmt.width}), "
                                 f"the limit is {self.settings.max_fork_width}")
            inner = set(defined)
            cost = self._body(stmt.body, inner, mult * stmt.width, in_fork=True)
            defined |= inner  # new variables come back as lists after the join
            return cost
        if isinstance(stmt, ast.If):
            worst = Cost()
            after: set[str] = set(defined)
            for condition, body in stmt.branches:
                cond_cost = self._expr(condition, defined, mult, in_fork)
                inner = set(defined)
                branch = self._body(body, inner, mult, in_fork)
                branch.add(cond_cost)
                worst = _max_cost(worst, branch)
                after |= inner
            inner = set(defined)
            worst = _max_cost(worst, self._body(stmt.orelse, inner, mult, in_fork))
            defined |= after | inner
            return worst
        raise AssertionError(f"unknown statement {stmt!r}")

    def _expr(self, expr: ast.Expr, defined: set[str], mult: int, in_fork: bool) -> Cost:
        if isinstance(expr, ast.Literal):
            return Cost()
        if isinstance(expr, ast.VarRef):
            if expr.name == "fork_index" and in_fork:
                return Cost()
            if expr.name not in defined:
                known = ", ".join(sorted(defined)) or "none"
                raise self.error(expr.at, f"unknown variable {expr.name!r} (defined at this "
                                 f"point: {known})")
            return Cost()
        if isinstance(expr, ast.ListExpr):
            return _sum(self._expr(e, defined, mult, in_fork) for e in expr.items)
        if isinstance(expr, ast.Index):
            return _sum([self._expr(expr.target, defined, mult, in_fork),
                         self._expr(expr.index, defined, mult, in_fork)])
        if isinstance(expr, ast.Call):
            if expr.function in ("gen", "select", "fork", "join"):
                raise self.error(expr.at, f"{expr.function}() cannot be used inside an "
                                 "expression; write it as its own tag")
            cost = _sum([*(self._expr(a, defined, mult, in_fork) for a in expr.args),
                         *(self._expr(v, defined, mult, in_fork) for _, v in expr.kwargs)])
            cost.calls += mult
            return cost
        if isinstance(expr, ast.Compare):
            return _sum([self._expr(expr.left, defined, mult, in_fork),
                         self._expr(expr.right, defined, mult, in_fork)])
        if isinstance(expr, ast.BoolOp):
            return _sum(self._expr(e, defined, mult, in_fork) for e in expr.operands)
        if isinstance(expr, ast.Not):
            return self._expr(expr.operand, defined, mult, in_fork)
        raise AssertionError(f"unknown expression {expr!r}")


def _sum(costs) -> Cost:
    total = Cost()
    for c in costs:
        total.add(c)
    return total


def _max_cost(a: Cost, b: Cost) -> Cost:
    return Cost(max(a.gens, b.gens), max(a.tokens, b.tokens), max(a.calls, b.calls))
