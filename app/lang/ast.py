"""The program tree both front ends (script text and JSON ops) produce.

Statements run in order against a program state (text so far, variables, role); expressions
compute values (literals, variables, function calls, comparisons). Every node remembers the
character offset it came from (`at`, or None for JSON programs) so that errors found later, at
check time or at run time, can point at the script.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

ROLES = ("system", "user", "assistant")


# ---------------------------------------------------------------- expressions
@dataclass(frozen=True)
class Literal:
    value: Any  # str, int, float, bool or None
    at: int | None = None


@dataclass(frozen=True)
class ListExpr:
    items: tuple["Expr", ...]
    at: int | None = None


@dataclass(frozen=True)
class VarRef:
    name: str
    at: int | None = None


@dataclass(frozen=True)
class Index:
    target: "Expr"
    index: "Expr"
    at: int | None = None


@dataclass(frozen=True)
class Call:
    """A call of a registered function (dotted names allowed: `sys.query_weather`)."""

    function: str
    args: tuple["Expr", ...] = ()
    kwargs: tuple[tuple[str, "Expr"], ...] = ()
    at: int | None = None


@dataclass(frozen=True)
class Compare:
    op: str  # == != < <= > >= in
    left: "Expr"
    right: "Expr"
    at: int | None = None


@dataclass(frozen=True)
class BoolOp:
    op: str  # and | or
    operands: tuple["Expr", ...]
    at: int | None = None


@dataclass(frozen=True)
class Not:
    operand: "Expr"
    at: int | None = None


Expr = Union[Literal, ListExpr, VarRef, Index, Call, Compare, BoolOp, Not]


# ---------------------------------------------------------------- statements
@dataclass(frozen=True)
class Text:
    value: str
    at: int | None = None


@dataclass(frozen=True)
class Emit:
    """Insert the value of an expression (a variable or a function's result) into the text."""

    expr: Expr
    at: int | None = None


@dataclass(frozen=True)
class Let:
    """Bind a variable without inserting anything."""

    name: str
    expr: Expr
    at: int | None = None


@dataclass(frozen=True)
class Gen:
    name: str
    # Script names (max_tokens, stop, ...) -> literal values, already type-checked.
    params: tuple[tuple[str, Any], ...] = ()
    at: int | None = None

    def param(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)


@dataclass(frozen=True)
class Select:
    name: str
    options: Expr  # a list literal of strings, or an expression yielding one at run time
    method: str = "token_length_normalized"
    at: int | None = None


@dataclass(frozen=True)
class Role:
    role: str  # system | user | assistant
    body: tuple["Stmt", ...]
    at: int | None = None


@dataclass(frozen=True)
class Fork:
    width: int
    body: tuple["Stmt", ...]
    join_mode: str = "gather"  # gather | concat
    at: int | None = None


@dataclass(frozen=True)
class If:
    # (condition, body) pairs tried in order; `orelse` runs when none holds.
    branches: tuple[tuple[Expr, tuple["Stmt", ...]], ...]
    orelse: tuple["Stmt", ...] = ()
    at: int | None = None


Stmt = Union[Text, Emit, Let, Gen, Select, Role, Fork, If]


@dataclass
class Program:
    body: tuple[Stmt, ...]
    source: str | None = None  # the script text, for error excerpts; None for JSON programs
    # Filled by the checker:
    gen_count: int = 0
    max_total_tokens: int = 0
    functions_called: set[str] = field(default_factory=set)
