"""The builtin primitives `gen(...)` and `select(...)`: their arguments, checked once at parse time.

Arguments mirror `sglang.gen` / `sglang.select` (names, meaning, defaults) so that a program
reads the same here and in the frontend. Sampling arguments must be literals: the checker can
then bound a program's total tokens before it runs, and a typo fails before any model call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from app.lang import ast
from app.lang.errors import ScriptError, SourceMap

BUILTIN_NAMES = frozenset({"gen", "select", "fork", "join"})
RESERVED_VARIABLES = frozenset({"fork_index"})  # bound by the interpreter inside fork bodies
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
KEYWORDS = frozenset({"if", "elif", "else", "let", "and", "or", "not", "in", "true", "false",
                      "True", "False", "none", "None"})
SELECT_METHODS = ("token_length_normalized", "greedy_token_selection")
DTYPES = ("int", "float", "str", "bool")


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_number(v: Any) -> bool:
    return type(v) in (int, float)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


# name -> (accepts(value), what the value must be)
GEN_PARAMS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_tokens": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "min_tokens": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "stop": (lambda v: isinstance(v, str) or _is_str_list(v), "a string or a list of strings"),
    "stop_token_ids": (lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
                       "a list of integers"),
    "temperature": (_is_number, "a number"),
    "top_p": (_is_number, "a number"),
    "top_k": (_is_int, "an integer"),
    "min_p": (_is_number, "a number"),
    "frequency_penalty": (_is_number, "a number"),
    "presence_penalty": (_is_number, "a number"),
    "ignore_eos": (lambda v: type(v) is bool, "true or false"),
    "regex": (lambda v: isinstance(v, str), "a string"),
    "json_schema": (lambda v: isinstance(v, str), "a string holding a JSON schema"),
    "dtype": (lambda v: v in DTYPES, "one of " + ", ".join(repr(d) for d in DTYPES)),
}


def literal_value(expr: ast.Expr) -> Any:
    """The Python value of a literal or a list of literals; raises ValueError otherwise."""
    if isinstance(expr, ast.Literal):
        return expr.value
    if isinstance(expr, ast.ListExpr):
        return [literal_value(item) for item in expr.items]
    raise ValueError("not a literal")


def check_variable_name(name: Any, source: SourceMap | None, at: int | None, what: str) -> str:
    if not isinstance(name, str) or not IDENTIFIER.match(name):
        raise ScriptError.at(source, at, f"{what} must be a name like \"answer\" (letters, digits, "
                             f"underscores; not starting with a digit), got {name!r}")
    if name in BUILTIN_NAMES or name in RESERVED_VARIABLES or name in KEYWORDS \
            or name in ast.ROLES:
        raise ScriptError.at(source, at, f"{name!r} is reserved and cannot name a variable")
    return name


def _name_argument(call: ast.Call, source: SourceMap | None) -> tuple[str, list[ast.Expr]]:
    """Split off the variable name (first positional or name=) from the other positionals."""
    args = list(call.args)
    kw = dict(call.kwargs)
    if "name" in kw:
        name_expr = kw["name"]
    elif args:
        name_expr = args.pop(0)
    else:
        raise ScriptError.at(source, call.at, f"{call.function}() needs a variable name as its "
                             f"first argument, e.g. {call.function}(\"answer\", ...)")
    if not (isinstance(name_expr, ast.Literal) and isinstance(name_expr.value, str)):
        raise ScriptError.at(source, name_expr.at or call.at, f"the name given to "
                             f"{call.function}() must be a string literal, e.g. \"answer\"")
    return check_variable_name(name_expr.value, source, name_expr.at or call.at,
                               f"the name given to {call.function}()"), args


def build_gen(call: ast.Call, source: SourceMap | None) -> ast.Stmt:
    """gen(name, max_tokens=..., ...) -> Gen; with choices=[...] it is a select, as in SGLang."""
    if any(k == "choices" for k, _ in call.kwargs):
        return build_select(call, source)
    name, extra = _name_argument(call, source)
    if extra:
        raise ScriptError.at(source, extra[0].at or call.at, "gen() takes one positional "
                             "argument (the name); give the rest by keyword, e.g. max_tokens=16")
    params: list[tuple[str, Any]] = []
    for key, expr in call.kwargs:
        if key == "name":
            continue
        if key not in GEN_PARAMS:
            raise ScriptError.at(source, expr.at or call.at, f"gen() has no argument {key!r}; "
                                 f"known: {', '.join(GEN_PARAMS)}")
        try:
            value = literal_value(expr)
        except ValueError:
            raise ScriptError.at(source, expr.at or call.at,
                                 f"gen() argument {key!r} must be a literal value") from None
        accepts, expected = GEN_PARAMS[key]
        if not accepts(value):
            raise ScriptError.at(source, expr.at or call.at, f"gen() argument {key!r} must be "
                                 f"{expected}, got {_type_name(value)} {value!r}")
        if key == "json_schema":
            try:
                json.loads(value)
            except ValueError as exc:
                raise ScriptError.at(source, expr.at or call.at,
                                     f"gen() argument 'json_schema' is not valid JSON: {exc}") \
                    from None
        params.append((key, value))
    return ast.Gen(name, tuple(params), call.at)


def build_select(call: ast.Call, source: SourceMap | None) -> ast.Select:
    name, extra = _name_argument(call, source)
    kw = dict(call.kwargs)
    options_expr = kw.get("options", kw.get("choices"))
    if extra:
        if options_expr is not None or len(extra) > 1:
            raise ScriptError.at(source, extra[0].at or call.at, f"{call.function}() takes the "
                                 "name and the options; give other arguments by keyword")
        options_expr = extra[0]
    if options_expr is None:
        raise ScriptError.at(source, call.at, f"{call.function}() needs options, e.g. "
                             f"{call.function}(\"answer\", options=[\"yes\", \"no\"])")
    if isinstance(options_expr, ast.ListExpr):
        try:
            options = literal_value(options_expr)
        except ValueError:
            options = None
        if options is not None and (not options or not _is_str_list(options)):
            raise ScriptError.at(source, options_expr.at or call.at,
                                 "select options must be a non-empty list of strings")
    method = "token_length_normalized"
    for key, expr in call.kwargs:
        if key in ("name", "options", "choices"):
            continue
        value = literal_value(expr) if isinstance(expr, (ast.Literal, ast.ListExpr)) else expr
        if key == "temperature":
            # The frontend only supports greedy selection (it asserts temperature <= 1e-5).
            if not _is_number(value) or value > 1e-5:
                raise ScriptError.at(source, expr.at or call.at, "select() supports only "
                                     "temperature=0 (the option with the best logprob wins)")
        elif key in ("choices_method", "method"):
            if value not in SELECT_METHODS:
                raise ScriptError.at(source, expr.at or call.at, f"select() {key} must be one "
                                     f"of {', '.join(SELECT_METHODS)}, got {value!r}")
            method = str(value)
        else:
            raise ScriptError.at(source, expr.at or call.at, f"select() has no argument {key!r}; "
                                 "known: name, options (or choices), temperature, choices_method")
    return ast.Select(name, options_expr, method, call.at)


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            type(None): "none"}.get(type(value), type(value).__name__)
