"""Tokens of the expression language inside `{ ... }`.

The lexer is called by the parser at the offset just after an opening brace and produces tokens
until the closing brace. Strings are lexed here too, so a `}` inside a string literal does not
end the tag. Every token keeps its start offset for error messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal as TypingLiteral

from app.lang.errors import ScriptSyntaxError, SourceMap

TokenKind = TypingLiteral["name", "keyword", "string", "number", "op", "end"]

KEYWORDS = frozenset({"if", "elif", "else", "let", "and", "or", "not", "in",
                      "true", "false", "True", "False", "none", "None"})
# Longest first, so "==" wins over "=".
OPERATORS = ("==", "!=", "<=", ">=", "<", ">", "=", "(", ")", "[", "]", ",", ".", "/", "-")
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"', "'": "'",
           "{": "{", "}": "}"}


@dataclass(frozen=True)
class Token:
    kind: TokenKind
    value: str | int | float
    at: int  # offset of the first character


class ExpressionLexer:
    """Lexes one tag body: from `start` up to (and including) the closing `}`."""

    def __init__(self, source: str, start: int, source_map: SourceMap, tag_start: int):
        self.source = source
        self.pos = start
        self.map = source_map
        self.tag_start = tag_start  # offset of the "{" (to report unclosed tags)

    def error(self, offset: int, message: str) -> ScriptSyntaxError:
        return ScriptSyntaxError.at(self.map, offset, message)

    def next(self) -> Token:
        src = self.source
        while self.pos < len(src) and src[self.pos] in " \t\r\n":
            self.pos += 1
        if self.pos >= len(src):
            raise self.error(self.tag_start, "unclosed '{': no matching '}' before the end of the "
                             "script (write '{{' for a literal brace)")
        start = self.pos
        ch = src[start]
        if ch == "}":
            self.pos += 1
            return Token("end", "}", start)
        if ch == "{":
            raise self.error(start, "unexpected '{' inside an expression (tags do not nest; "
                             "close the previous tag with '}' first)")
        if ch in "\"'":
            return self._string(ch)
        if ch.isdigit():
            return self._number()
        if ch == "_" or ch.isalpha():
            end = start + 1
            while end < len(src) and (src[end] == "_" or src[end].isalnum()):
                end += 1
            self.pos = end
            word = src[start:end]
            return Token("keyword" if word in KEYWORDS else "name", word, start)
        for op in OPERATORS:
            if src.startswith(op, start):
                self.pos += len(op)
                return Token("op", op, start)
        raise self.error(start, f"unexpected character {ch!r} in an expression")

    def _string(self, quote: str) -> Token:
        src = self.source
        start = self.pos
        i = start + 1
        chars: list[str] = []
        while True:
            if i >= len(src) or src[i] == "\n":
                raise self.error(start, "unterminated string literal (strings end on the same "
                                 "line; use \\n for a newline)")
            ch = src[i]
            if ch == quote:
                self.pos = i + 1
                return Token("string", "".join(chars), start)
            if ch == "\\":
                if i + 1 >= len(src):
                    raise self.error(i, "unterminated escape sequence")
                esc = src[i + 1]
                if esc == "u":
                    digits = src[i + 2 : i + 6]
                    if len(digits) != 4 or any(c not in "0123456789abcdefABCDEF" for c in digits):
                        raise self.error(i, "\\u must be followed by 4 hex digits")
                    chars.append(chr(int(digits, 16)))
                    i += 6
                    continue
                if esc not in ESCAPES:
                    raise self.error(i, f"unknown escape sequence '\\{esc}' (known: \\n \\t \\r "
                                     "\\0 \\\\ \\\" \\' \\uXXXX)")
                chars.append(ESCAPES[esc])
                i += 2
                continue
            chars.append(ch)
            i += 1

    def _number(self) -> Token:
        src = self.source
        start = self.pos
        end = start
        while end < len(src) and src[end].isdigit():
            end += 1
        is_float = False
        if end < len(src) and src[end] == "." and end + 1 < len(src) and src[end + 1].isdigit():
            is_float = True
            end += 1
            while end < len(src) and src[end].isdigit():
                end += 1
        if end < len(src) and src[end] in "eE":
            exp_end = end + 1
            if exp_end < len(src) and src[exp_end] in "+-":
                exp_end += 1
            if exp_end < len(src) and src[exp_end].isdigit():
                is_float = True
                end = exp_end
                while end < len(src) and src[end].isdigit():
                    end += 1
        text = src[start:end]
        if not text.isascii():
            raise self.error(start, f"{text!r} is not a number (use ASCII digits)")
        if len(text) > 40:
            raise self.error(start, "number literal is too long (at most 40 characters)")
        self.pos = end
        return Token("number", float(text) if is_float else int(text), start)
