"""Script errors that carry a source position.

Every error a script can cause is an `app.errors.APIError` subclass, so the ingress renders it
with its status code like any other bad input. Errors tied to a place in the script carry the
line and column (1-based, counted in characters) and an excerpt with a caret under the spot:

    line 2, column 9: expected ')' to close the call opened at column 4
      2 | 今天{get("北京"}
        |              ^

The caret is placed by display width, so it lines up under CJK text in a monospace terminal.
"""

from __future__ import annotations

import bisect
import unicodedata
from dataclasses import dataclass

from app.errors import APIError, ValidationError


@dataclass(frozen=True)
class SourcePosition:
    """A place in a script: 0-based character offset plus 1-based line and column."""

    offset: int
    line: int
    column: int


class SourceMap:
    """Converts character offsets of one script into positions and caret excerpts."""

    def __init__(self, source: str):
        self.source = source
        self._line_starts = [0] + [i + 1 for i, ch in enumerate(source) if ch == "\n"]

    def position(self, offset: int) -> SourcePosition:
        offset = max(0, min(offset, len(self.source)))
        line_index = bisect.bisect_right(self._line_starts, offset) - 1
        return SourcePosition(offset, line_index + 1, offset - self._line_starts[line_index] + 1)

    def excerpt(self, offset: int) -> str:
        pos = self.position(offset)
        start = self._line_starts[pos.line - 1]
        end = self.source.find("\n", start)
        line_text = self.source[start : end if end != -1 else len(self.source)].rstrip("\r")
        gutter = f"{pos.line:>4} | "
        caret_pad = " " * _display_width(line_text[: pos.column - 1].expandtabs(1))
        return f"{gutter}{line_text.expandtabs(1)}\n{' ' * (len(gutter) - 2)}| {caret_pad}^"


def _display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


class ScriptError(ValidationError):
    """422: the script is wrong at a known place (syntax, unknown name, bad argument)."""

    def __init__(
        self,
        message: str,
        *,
        line: int | None = None,
        column: int | None = None,
        excerpt: str | None = None,
        code: str | None = "script_error",
        **kwargs,
    ):
        self.reason = message
        self.line = line
        self.column = column
        self.excerpt = excerpt
        full = message
        if line is not None:
            full = f"line {line}, column {column}: {message}"
            if excerpt:
                full += "\n" + excerpt
        kwargs.setdefault("param", "program")
        super().__init__(full, code=code, **kwargs)

    @classmethod
    def at(cls, source: SourceMap | None, offset: int | None, message: str, **kwargs) -> "ScriptError":
        if source is None or offset is None:
            return cls(message, **kwargs)
        pos = source.position(offset)
        return cls(message, line=pos.line, column=pos.column, excerpt=source.excerpt(offset), **kwargs)

    def __reduce__(self):
        # Keep the structured position across Ray's pickling (APIError's rebuild drops it).
        return (_rebuild_script_error, (type(self), self.reason, self.line, self.column,
                                        self.excerpt, self.code, self.status_code))

    def to_body(self) -> dict:
        body = super().to_body()
        if self.line is not None:
            body["error"]["line"] = self.line
            body["error"]["column"] = self.column
        return body


def _rebuild_script_error(cls, reason, line, column, excerpt, code, status_code):
    return cls(reason, line=line, column=column, excerpt=excerpt, code=code, status_code=status_code)


class ScriptSyntaxError(ScriptError):
    """422: the script does not follow the grammar."""

    def __init__(self, message: str, **kwargs):
        kwargs.setdefault("code", "syntax_error")
        super().__init__(message, **kwargs)


class FunctionNotRegisteredError(ScriptError):
    def __init__(self, message: str, **kwargs):
        kwargs.setdefault("code", "function_not_registered")
        super().__init__(message, **kwargs)


class FunctionCallError(ScriptError):
    """422: a registered function rejected its arguments or raised."""

    def __init__(self, message: str, **kwargs):
        kwargs.setdefault("code", "function_error")
        super().__init__(message, **kwargs)


class FunctionTimeoutError(ScriptError):
    """504: a registered function ran past its timeout."""

    status_code = 504
    error_type = "timeout_error"

    def __init__(self, message: str, **kwargs):
        kwargs.setdefault("code", "function_timeout")
        super().__init__(message, **kwargs)


class ProgramTimeoutError(APIError):
    """504: the whole program ran past `RunSettings.max_program_s`."""

    status_code = 504
    error_type = "timeout_error"
