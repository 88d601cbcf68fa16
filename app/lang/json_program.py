"""The JSON form of a program: a list of ops, for clients that build programs in code.

    [{"text": "Q: 1+1=?\\n"},
     {"role": "assistant", "body": [{"gen": "answer", "max_tokens": 8, "stop": "\\n"}]},
     {"select": "verdict", "options": ["right", "wrong"]},
     {"call": "sys.query_weather", "args": ["北京"]},
     {"fork": 2, "body": [...], "join": "gather"},
     {"if": {"op": "==", "left": {"var": "verdict"}, "right": "right"}, "then": [...],
      "elif": [[cond, [...]]], "else": [...]}]

A bare string is a text op. Values inside ops are JSON literals, lists, `{"var": name}`,
`{"call": name, "args": [...], "kwargs": {...}}`, `{"index": [value, key]}`, `{"op": "==",
"left": ..., "right": ...}`, `{"and": [...]}`, `{"or": [...]}`, `{"not": value}`. Both forms build
the same `ast.Program` and share every later check; JSON errors name the op by its path.
"""

from __future__ import annotations

import json
from typing import Any

from app.lang import ast
from app.lang.builtins import RESERVED_VARIABLES, build_gen, build_select, check_variable_name
from app.lang.errors import ScriptError

COMPARISONS = ("==", "!=", "<", "<=", ">", ">=", "in")


class JsonProgramParser:
    def __init__(self, *, max_nesting_depth: int):
        self.max_depth = max_nesting_depth

    def parse(self, ops: Any) -> ast.Program:
        return ast.Program(body=self._ops(ops, "program", 0), source=None)

    def error(self, where: str, message: str) -> ScriptError:
        return ScriptError(f"{where}: {message}", code="invalid_program")

    def _depth(self, where: str, depth: int) -> None:
        if depth > self.max_depth:
            raise self.error(where, f"nesting too deep (limit {self.max_depth})")

    def _ops(self, ops: Any, where: str, depth: int) -> tuple[ast.Stmt, ...]:
        self._depth(where, depth)
        if not isinstance(ops, list):
            raise self.error(where, f"expected a list of ops, got {type(ops).__name__}")
        return tuple(self._op(op, f"{where}[{i}]", depth) for i, op in enumerate(ops))

    def _op(self, op: Any, where: str, depth: int) -> ast.Stmt:
        if isinstance(op, str):
            return ast.Text(op)
        if not isinstance(op, dict):
            raise self.error(where, f"an op is a string or an object, got {type(op).__name__}")
        kinds = [k for k in ("text", "gen", "select", "call", "var", "let", "role", "fork", "if")
                 if k in op]
        if len(kinds) != 1:
            raise self.error(where, "an op has exactly one of the keys text, gen, select, call, "
                             f"var, let, role, fork, if; got {sorted(op)}")
        kind = kinds[0]
        if kind == "text":
            self._only(op, where, {"text"})
            if not isinstance(op["text"], str):
                raise self.error(where, "text must be a string")
            return ast.Text(op["text"])
        if kind in ("gen", "select"):
            params = {k: v for k, v in op.items() if k != kind}
            if kind == "gen" and isinstance(params.get("json_schema"), (dict, bool)):
                params["json_schema"] = json.dumps(params["json_schema"])
            kwargs = tuple((k, self._expr(v, f"{where}.{k}", depth + 1)) for k, v in params.items())
            call = ast.Call(kind, (ast.Literal(op[kind]),), kwargs)
            try:
                return build_gen(call, None) if kind == "gen" else build_select(call, None)
            except ScriptError as exc:
                raise self.error(where, exc.reason) from None
        if kind == "call":
            return ast.Emit(self._call(op, where, depth))
        if kind == "var":
            return ast.Emit(self._expr({"var": op["var"]}, where, depth))
        if kind == "let":
            self._only(op, where, {"let", "value"})
            name = self._name(op["let"], where)
            return ast.Let(name, self._expr(op.get("value"), f"{where}.value", depth + 1))
        if kind == "role":
            self._only(op, where, {"role", "body"})
            if op["role"] not in ast.ROLES:
                raise self.error(where, f"role must be one of {', '.join(ast.ROLES)}")
            body = self._ops(op.get("body", []), f"{where}.body", depth + 1)
            if _contains_role(body):
                raise self.error(where, "roles cannot nest")
            return ast.Role(op["role"], body)
        if kind == "fork":
            self._only(op, where, {"fork", "body", "join"})
            width = op["fork"]
            if type(width) is not int or width < 1:
                raise self.error(where, "fork must be an integer >= 1 (the number of branches)")
            mode = op.get("join", "gather")
            if mode not in ("gather", "concat"):
                raise self.error(where, "join must be \"gather\" or \"concat\"")
            return ast.Fork(width, self._ops(op.get("body", []), f"{where}.body", depth + 1), mode)
        self._only(op, where, {"if", "then", "elif", "else"})
        branches = [(self._expr(op["if"], f"{where}.if", depth + 1),
                     self._ops(op.get("then", []), f"{where}.then", depth + 1))]
        elifs = op.get("elif", [])
        if not isinstance(elifs, list):
            raise self.error(where, "elif must be a list of [condition, ops] pairs")
        for i, pair in enumerate(elifs):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise self.error(f"{where}.elif[{i}]", "expected a [condition, ops] pair")
            branches.append((self._expr(pair[0], f"{where}.elif[{i}][0]", depth + 1),
                             self._ops(pair[1], f"{where}.elif[{i}][1]", depth + 1)))
        return ast.If(tuple(branches), self._ops(op.get("else", []), f"{where}.else", depth + 1))

    def _only(self, op: dict, where: str, allowed: set[str]) -> None:
        extra = sorted(set(op) - allowed)
        if extra:
            raise self.error(where, f"unknown keys {extra}; allowed: {sorted(allowed)}")

    def _name(self, name: Any, where: str) -> str:
        try:
            return check_variable_name(name, None, None, "a variable name")
        except ScriptError as exc:
            raise self.error(where, exc.reason) from None

    def _call(self, op: dict, where: str, depth: int) -> ast.Call:
        self._only(op, where, {"call", "args", "kwargs"})
        name = op["call"]
        if not isinstance(name, str) or not name:
            raise self.error(where, "call must name a function")
        args, kwargs = op.get("args", []), op.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise self.error(where, "args must be a list and kwargs an object")
        return ast.Call(
            name,
            tuple(self._expr(a, f"{where}.args[{i}]", depth + 1) for i, a in enumerate(args)),
            tuple((str(k), self._expr(v, f"{where}.kwargs.{k}", depth + 1))
                  for k, v in kwargs.items()),
        )

    def _expr(self, value: Any, where: str, depth: int) -> ast.Expr:
        self._depth(where, depth)
        if value is None or isinstance(value, (str, bool, int, float)):
            return ast.Literal(value)
        if isinstance(value, list):
            return ast.ListExpr(tuple(self._expr(v, f"{where}[{i}]", depth + 1)
                                      for i, v in enumerate(value)))
        if not isinstance(value, dict):
            raise self.error(where, f"unsupported value of type {type(value).__name__}")
        if "var" in value:
            self._only(value, where, {"var"})
            if isinstance(value["var"], str) and value["var"] in RESERVED_VARIABLES:  # readable, not assignable
                return ast.VarRef(value["var"])
            return ast.VarRef(self._name(value["var"], where))
        if "call" in value:
            return self._call(value, where, depth)
        if "index" in value:
            self._only(value, where, {"index"})
            pair = value["index"]
            if not (isinstance(pair, list) and len(pair) == 2):
                raise self.error(where, "index must be a [value, key] pair")
            return ast.Index(self._expr(pair[0], where, depth + 1),
                             self._expr(pair[1], where, depth + 1))
        if "op" in value:
            self._only(value, where, {"op", "left", "right"})
            if value["op"] not in COMPARISONS:
                raise self.error(where, f"op must be one of {', '.join(COMPARISONS)}")
            return ast.Compare(value["op"], self._expr(value.get("left"), where, depth + 1),
                               self._expr(value.get("right"), where, depth + 1))
        for key in ("and", "or"):
            if key in value:
                self._only(value, where, {key})
                items = value[key]
                if not isinstance(items, list) or not items:
                    raise self.error(where, f"{key} takes a non-empty list")
                return ast.BoolOp(key, tuple(self._expr(v, where, depth + 1) for v in items))
        if "not" in value:
            self._only(value, where, {"not"})
            return ast.Not(self._expr(value["not"], where, depth + 1))
        raise self.error(where, "an object value must be one of {\"var\"}, {\"call\"}, "
                         "{\"index\"}, {\"op\"}, {\"and\"}, {\"or\"}, {\"not\"}")


def _contains_role(body: tuple[ast.Stmt, ...]) -> bool:
    for stmt in body:
        if isinstance(stmt, ast.Role):
            return True
        if isinstance(stmt, ast.Fork) and _contains_role(stmt.body):
            return True
        if isinstance(stmt, ast.If) and (any(_contains_role(b) for _, b in stmt.branches)
                                         or _contains_role(stmt.orelse)):
            return True
    return False


def parse_json_program(ops: Any, *, max_nesting_depth: int = 16) -> ast.Program:
    return JsonProgramParser(max_nesting_depth=max_nesting_depth).parse(ops)
