"""A safe arithmetic evaluator: numbers, + - * / // % **, parentheses and a few math functions.

Its own tokenizer and recursive-descent parser; it never calls eval, exec or compile. Work is
bounded: the expression length, the nesting depth, exponents and the size of integer results
are capped, so `9**9**9` is an error, not a frozen server.
"""

from __future__ import annotations

import math
import re

MAX_EXPRESSION_CHARS = 500
MAX_DEPTH = 50
MAX_EXPONENT = 1000
MAX_INT_BITS = 4096

TOKEN = re.compile(r"\s*(?:(\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?|(\*\*|//|[-+*/%(),])|([a-z]+))")
FUNCTIONS = {
    "sqrt": (1, math.sqrt), "abs": (1, abs), "round": (1, round), "floor": (1, math.floor),
    "ceil": (1, math.ceil), "min": (2, min), "max": (2, max), "log": (1, math.log),
    "exp": (1, math.exp),
}
CONSTANTS = {"pi": math.pi, "e": math.e}

Number = int | float


class ArithmeticError_(ValueError):
    """The expression is malformed or its value is out of bounds (message says which)."""


def evaluate(expression: str) -> Number:
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ArithmeticError_(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    return _Evaluator(expression).run()


class _Evaluator:
    def __init__(self, text: str):
        self.tokens: list[tuple[str, str, int]] = []  # (kind, text, column)
        pos = 0
        text = text.rstrip()
        while pos < len(text):
            match = TOKEN.match(text, pos)
            if not match:
                raise ArithmeticError_(f"unexpected {text[pos:].lstrip()[:1]!r} at column "
                                       f"{pos + 1}")
            kind = "num" if match.group(1) else "op" if match.group(2) else "name"
            self.tokens.append((kind, match.group(0).strip(), match.start() + 1))
            pos = match.end()
        self.i = 0
        self.depth = 0

    def run(self) -> Number:
        if not self.tokens:
            raise ArithmeticError_("empty expression")
        value = self.sum()
        if self.i < len(self.tokens):
            raise ArithmeticError_(f"unexpected {self.tokens[self.i][1]!r} at column "
                                   f"{self.tokens[self.i][2]}")
        return value

    def peek(self) -> str | None:
        return self.tokens[self.i][1] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str, int]:
        if self.i >= len(self.tokens):
            raise ArithmeticError_("unexpected end of expression")
        self.i += 1
        return self.tokens[self.i - 1]

    def sum(self) -> Number:
        value = self.product()
        while self.peek() in ("+", "-"):
            op = self.take()[1]
            value = _checked(value + self.product() if op == "+" else value - self.product())
        return value

    def product(self) -> Number:
        value = self.unary()
        while self.peek() in ("*", "/", "//", "%"):
            op = self.take()[1]
            right = self.unary()
            if op != "*" and right == 0:
                raise ArithmeticError_("division by zero")
            value = _checked(value * right if op == "*" else value / right if op == "/"
                             else value // right if op == "//" else value % right)
        return value

    def unary(self) -> Number:
        if self.peek() in ("+", "-"):
            op = self.take()[1]
            self._enter()
            try:
                value = self.unary()
            finally:
                self.depth -= 1
            return -value if op == "-" else value
        return self.power()

    def power(self) -> Number:
        base = self.atom()
        if self.peek() == "**":
            self.take()
            self._enter()
            try:
                exponent = self.unary()  # right-associative, binds tighter than unary minus
            finally:
                self.depth -= 1
            if abs(exponent) > MAX_EXPONENT:
                raise ArithmeticError_(f"exponent {exponent} is larger than {MAX_EXPONENT}")
            if base == 0 and exponent < 0:
                raise ArithmeticError_("division by zero")
            try:
                return _checked(base ** exponent)
            except OverflowError:
                raise ArithmeticError_("result too large") from None
        return base

    def atom(self) -> Number:
        kind, text, column = self.take()
        if kind == "num":
            return float(text) if any(c in text for c in ".eE") else int(text)
        if text == "(":
            self._enter()
            try:
                value = self.sum()
            finally:
                self.depth -= 1
            self._expect(")")
            return value
        if kind == "name" and text in CONSTANTS:
            return CONSTANTS[text]
        if kind == "name" and text in FUNCTIONS:
            arity, fn = FUNCTIONS[text]
            self._expect("(")
            args = [self.sum()]
            while self.peek() == ",":
                self.take()
                args.append(self.sum())
            self._expect(")")
            if (arity == 1 and len(args) != 1) or (arity == 2 and len(args) < 2):
                raise ArithmeticError_(f"{text}() takes {'1 argument' if arity == 1 else '2 or more arguments'}")
            try:
                return _checked(fn(*args))
            except (ValueError, OverflowError) as exc:
                raise ArithmeticError_(f"{text}(): {exc}") from None
        raise ArithmeticError_(f"unexpected {text!r} at column {column}")

    def _expect(self, op: str) -> None:
        kind, text, column = self.take()
        if text != op:
            raise ArithmeticError_(f"expected {op!r} at column {column}, found {text!r}")

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ArithmeticError_(f"expression nests deeper than {MAX_DEPTH}")


def _checked(value: Number) -> Number:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ArithmeticError_("result too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise ArithmeticError_("result is not a finite number")
    return value
