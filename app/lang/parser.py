"""Parser for the script form of a program: text with `{expressions}` (grammar: docs/run-language.md).

Two levels. The template level walks the text: `{{` and `}}` are literal braces, `{` opens a
tag, a lone `}` is an error. Each tag is lexed by `ExpressionLexer` and parsed by recursive
descent into a statement. Block tags (`{user}`...`{/user}`, `{fork(n)}`...`{join}`,
`{if c}`...`{elif c}`...`{else}`...`{/if}`) are matched with an explicit stack, so a missing or
stray closer is reported at the tag that caused it. One newline directly after a block tag or a
`{let}` is dropped (like Jinja's trim_blocks) so multi-line scripts read naturally.

Nothing here evaluates anything: the output is an `app.lang.ast.Program`. Recursion depth is
bounded by `max_nesting_depth` so hostile input cannot exhaust the stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field


from app.lang import ast
from app.lang.errors import ScriptSyntaxError, SourceMap
from app.lang.lexer import ExpressionLexer, Token
from app.lang.builtins import BUILTIN_NAMES, build_gen, build_select

BLOCK_ENDERS = {"role": "{/%s}", "fork": "{join}", "if": "{/if}"}


@dataclass
class _Block:
    kind: str  # root | role | fork | if
    at: int
    body: list[ast.Stmt] = field(default_factory=list)
    role: str = ""
    width: int = 1
    # if-blocks: finished (condition, body) pairs, the current condition, and the else body.
    branches: list[tuple[ast.Expr, tuple[ast.Stmt, ...]]] = field(default_factory=list)
    condition: ast.Expr | None = None
    in_else: bool = False


class ScriptParser:
    def __init__(self, source: str, *, max_nesting_depth: int):
        self.source = source
        self.map = SourceMap(source)
        self.max_depth = max_nesting_depth
        self.stack: list[_Block] = [_Block("root", 0)]
        # Token stream state for the tag being parsed.
        self._lexer: ExpressionLexer | None = None
        self._peeked: Token | None = None
        self._depth = 0

    # ------------------------------------------------------------ template level
    def parse(self) -> ast.Program:
        src = self.source
        i = 0
        text_start = 0
        chunk: list[str] = []
        while i < len(src):
            ch = src[i]
            if ch == "{" and src.startswith("{{", i):
                chunk.append("{")
                i += 2
            elif ch == "}" and src.startswith("}}", i):
                chunk.append("}")
                i += 2
            elif ch == "}":
                raise self.error(i, "single '}' in text: write '}}' for a literal brace")
            elif ch == "{":
                self._add_text("".join(chunk), text_start)
                chunk = []
                i, is_block = self._parse_tag(i)
                if is_block and src.startswith("\r\n", i):
                    i += 2
                elif is_block and src.startswith("\n", i):
                    i += 1
                text_start = i
            else:
                # Copy a run of ordinary characters at once.
                j = i
                while j < len(src) and src[j] not in "{}":
                    j += 1
                chunk.append(src[i:j])
                i = j
        self._add_text("".join(chunk), text_start)
        if len(self.stack) > 1:
            block = self.stack[-1]
            closer = BLOCK_ENDERS[block.kind].replace("%s", block.role)
            raise self.error(block.at, f"this block is never closed: expected {closer} "
                             "before the end of the script")
        return ast.Program(body=tuple(self.stack[0].body), source=self.source)

    def _add_text(self, text: str, at: int) -> None:
        if text:
            self.stack[-1].body.append(ast.Text(text, at))

    def error(self, offset: int, message: str) -> ScriptSyntaxError:
        return ScriptSyntaxError.at(self.map, offset, message)

    # ------------------------------------------------------------ tags
    def _parse_tag(self, brace: int) -> tuple[int, bool]:
        """Parse the tag opening at `brace`; return (offset after it, whether it is a block tag)."""
        self._lexer = ExpressionLexer(self.source, brace + 1, self.map, brace)
        self._peeked = None
        self._depth = 0  # expression nesting; blocks are bounded separately by the stack
        first = self._peek()
        is_block = True
        if first.kind == "end":
            raise self.error(brace, "empty tag '{}': write '{{}}' for literal braces")
        if first.kind == "op" and first.value == "/":
            self._advance()
            self._close_block(self._expect_kind("name", "keyword"), brace)
        elif first.kind == "keyword" and first.value in ("if", "elif"):
            self._advance()
            condition = self._expression()
            self._expect_end()
            self._open_if(first, condition, brace)
        elif first.kind == "keyword" and first.value == "else":
            self._advance()
            self._expect_end()
            self._open_else(brace)
        elif first.kind == "keyword" and first.value == "let":
            self._advance()
            name_tok = self._expect_kind("name")
            self._check_variable_name(name_tok)
            self._expect_op("=")
            expr = self._expression()
            self._expect_end()
            self.stack[-1].body.append(ast.Let(str(name_tok.value), expr, brace))
        elif first.kind == "name" and first.value in ast.ROLES and self._peek_second_is_end():
            self._advance()
            self._expect_end()
            self._open_role(str(first.value), brace)
        elif first.kind == "name" and first.value == "join":
            self._advance()
            mode = "gather"
            if self._peek().kind == "op" and self._peek().value == "(":
                call = self._call_rest("join", first.at)
                mode = _join_mode(call, self)
            self._expect_end()
            self._close_fork(brace, mode)
        else:
            is_block = False
            expr = self._expression()
            self._expect_end()
            self._add_expression_statement(expr, brace)
            if isinstance(expr, ast.Call) and expr.function == "fork":
                is_block = True
        assert self._lexer is not None
        return self._lexer.pos, is_block

    def _add_expression_statement(self, expr: ast.Expr, brace: int) -> None:
        body = self.stack[-1].body
        if isinstance(expr, ast.Call) and expr.function == "fork":
            self._open_fork(expr, brace)
        elif isinstance(expr, ast.Call) and expr.function == "gen":
            body.append(build_gen(expr, self.map))
        elif isinstance(expr, ast.Call) and expr.function == "select":
            body.append(build_select(expr, self.map))
        elif isinstance(expr, (ast.Compare, ast.BoolOp, ast.Not)):
            raise self.error(expr.at or brace, "a condition can only be used in {if ...} or "
                             "{elif ...}")
        else:
            body.append(ast.Emit(expr, brace))

    # ------------------------------------------------------------ blocks
    def _push(self, block: _Block) -> None:
        if len(self.stack) - 1 >= self.max_depth:
            raise self.error(block.at, f"blocks nest too deeply (limit {self.max_depth})")
        self.stack.append(block)

    def _open_role(self, role: str, brace: int) -> None:
        for block in self.stack:
            if block.kind == "role":
                raise self.error(brace, f"{{{role}}} inside {{{block.role}}} (opened at line "
                                 f"{self.map.position(block.at).line}): roles cannot nest")
        self._push(_Block("role", brace, role=role))

    def _open_fork(self, call: ast.Call, brace: int) -> None:
        if len(call.args) != 1 or call.kwargs:
            raise self.error(call.at or brace, "fork takes exactly one argument: the number of "
                             "branches, e.g. {fork(4)}")
        width = call.args[0]
        if not (isinstance(width, ast.Literal) and type(width.value) is int and width.value >= 1):
            raise self.error(width.at or brace, "the number of fork branches must be an integer "
                             "literal >= 1")
        self._push(_Block("fork", brace, width=width.value))

    def _open_if(self, keyword: Token, condition: ast.Expr, brace: int) -> None:
        if keyword.value == "if":
            self._push(_Block("if", brace, condition=condition))
            return
        block = self.stack[-1]
        if block.kind != "if" or block.in_else:
            raise self.error(brace, "{elif} without an open {if}" if block.kind != "if"
                             else "{elif} after {else}")
        assert block.condition is not None
        block.branches.append((block.condition, tuple(block.body)))
        block.condition, block.body = condition, []

    def _open_else(self, brace: int) -> None:
        block = self.stack[-1]
        if block.kind != "if" or block.in_else:
            raise self.error(brace, "{else} without an open {if}" if block.kind != "if"
                             else "a second {else} in the same {if}")
        assert block.condition is not None
        block.branches.append((block.condition, tuple(block.body)))
        block.condition, block.body, block.in_else = None, [], True

    def _close_block(self, name_tok: Token, brace: int) -> None:
        name = str(name_tok.value)
        self._expect_end()
        block = self.stack[-1]
        expected_kind = "role" if name in ast.ROLES else "if" if name == "if" else None
        if expected_kind is None:
            raise self.error(name_tok.at, f"unknown closing tag {{/{name}}}: closers are "
                             "{/system} {/user} {/assistant} {/if}; forks close with {join}")
        if block.kind != expected_kind or (expected_kind == "role" and block.role != name):
            raise self.error(brace, f"{{/{name}}} does not match the open block: "
                             + self._describe_open(block))
        self.stack.pop()
        if block.kind == "role":
            self.stack[-1].body.append(ast.Role(block.role, tuple(block.body), block.at))
        else:
            if block.in_else:
                branches, orelse = block.branches, tuple(block.body)
            else:
                assert block.condition is not None
                branches = block.branches + [(block.condition, tuple(block.body))]
                orelse = ()
            self.stack[-1].body.append(ast.If(tuple(branches), orelse, block.at))

    def _close_fork(self, brace: int, mode: str) -> None:
        block = self.stack[-1]
        if block.kind != "fork":
            raise self.error(brace, "{join} does not match the open block: "
                             + self._describe_open(block))
        self.stack.pop()
        self.stack[-1].body.append(ast.Fork(block.width, tuple(block.body), mode, block.at))

    def _describe_open(self, block: _Block) -> str:
        if block.kind == "root":
            return "no block is open"
        pos = self.map.position(block.at)
        closer = BLOCK_ENDERS[block.kind].replace("%s", block.role)
        return f"the block opened at line {pos.line}, column {pos.column} needs {closer} first"

    # ------------------------------------------------------------ tokens
    def _peek(self) -> Token:
        if self._peeked is None:
            assert self._lexer is not None
            self._peeked = self._lexer.next()
        return self._peeked

    def _peek_second_is_end(self) -> bool:
        # Roles are bare words: `{user}` opens a role, `{user_name}` is a variable.
        assert self._lexer is not None
        saved_pos, saved_peek = self._lexer.pos, self._peeked
        self._advance()
        is_end = self._peek().kind == "end"
        self._lexer.pos, self._peeked = saved_pos, saved_peek
        return is_end

    def _advance(self) -> Token:
        tok = self._peek()
        self._peeked = None
        return tok

    def _expect_end(self) -> None:
        tok = self._peek()
        if tok.kind != "end":
            raise self.error(tok.at, f"expected '}}' to close the tag, found {_describe(tok)}")
        self._advance()

    def _expect_op(self, op: str) -> Token:
        tok = self._peek()
        if tok.kind != "op" or tok.value != op:
            raise self.error(tok.at, f"expected {op!r}, found {_describe(tok)}")
        return self._advance()

    def _expect_kind(self, *kinds: str) -> Token:
        tok = self._peek()
        if tok.kind not in kinds:
            raise self.error(tok.at, f"expected a name, found {_describe(tok)}")
        return self._advance()

    def _check_variable_name(self, tok: Token) -> None:
        name = str(tok.value)
        if name in BUILTIN_NAMES or name in ast.ROLES:
            raise self.error(tok.at, f"{name!r} is reserved and cannot name a variable")

    # ------------------------------------------------------------ expressions
    def _enter(self, at: int) -> None:
        self._depth += 1
        if self._depth > self.max_depth:
            raise self.error(at, f"expression nests too deeply (limit {self.max_depth})")

    def _expression(self) -> ast.Expr:
        # Every construct that recurses into _expression (parentheses, lists, calls, indexing,
        # `not`) passes through _enter, which bounds the recursion.
        return self._or()

    def _or(self) -> ast.Expr:
        first = self._and()
        operands = [first]
        while self._peek().kind == "keyword" and self._peek().value == "or":
            self._advance()
            operands.append(self._and())
        return first if len(operands) == 1 else ast.BoolOp("or", tuple(operands), _at(first))

    def _and(self) -> ast.Expr:
        first = self._not()
        operands = [first]
        while self._peek().kind == "keyword" and self._peek().value == "and":
            self._advance()
            operands.append(self._not())
        return first if len(operands) == 1 else ast.BoolOp("and", tuple(operands), _at(first))

    def _not(self) -> ast.Expr:
        tok = self._peek()
        if tok.kind == "keyword" and tok.value == "not":
            self._advance()
            self._enter(tok.at)
            try:
                return ast.Not(self._not(), tok.at)
            finally:
                self._depth -= 1
        return self._comparison()

    def _comparison(self) -> ast.Expr:
        left = self._postfix()
        tok = self._peek()
        if (tok.kind == "op" and tok.value in ("==", "!=", "<", "<=", ">", ">=")) or (
            tok.kind == "keyword" and tok.value == "in"
        ):
            self._advance()
            right = self._postfix()
            return ast.Compare(str(tok.value), left, right, tok.at)
        return left

    def _postfix(self) -> ast.Expr:
        expr = self._primary()
        while self._peek().kind == "op" and self._peek().value == "[":
            bracket = self._advance()
            self._enter(bracket.at)
            try:
                index = self._expression()
            finally:
                self._depth -= 1
            self._expect_op("]")
            expr = ast.Index(expr, index, bracket.at)
        return expr

    def _primary(self) -> ast.Expr:
        tok = self._advance()
        if tok.kind == "string":
            return ast.Literal(tok.value, tok.at)
        if tok.kind == "number":
            return ast.Literal(tok.value, tok.at)
        if tok.kind == "op" and tok.value == "-":
            num = self._peek()
            if num.kind != "number":
                raise self.error(tok.at, "'-' is only allowed in front of a number literal")
            self._advance()
            return ast.Literal(-num.value, tok.at)  # type: ignore[operator]
        if tok.kind == "keyword" and tok.value in ("true", "True"):
            return ast.Literal(True, tok.at)
        if tok.kind == "keyword" and tok.value in ("false", "False"):
            return ast.Literal(False, tok.at)
        if tok.kind == "keyword" and tok.value in ("none", "None"):
            return ast.Literal(None, tok.at)
        if tok.kind == "op" and tok.value == "(":
            self._enter(tok.at)
            try:
                inner = self._expression()
            finally:
                self._depth -= 1
            self._expect_op(")")
            return inner
        if tok.kind == "op" and tok.value == "[":
            return self._list_rest(tok)
        if tok.kind == "name":
            return self._name_rest(tok)
        raise self.error(tok.at, f"expected a value, found {_describe(tok)}")

    def _list_rest(self, bracket: Token) -> ast.ListExpr:
        self._enter(bracket.at)
        try:
            items: list[ast.Expr] = []
            while not (self._peek().kind == "op" and self._peek().value == "]"):
                items.append(self._expression())
                if self._peek().kind == "op" and self._peek().value == ",":
                    self._advance()
                elif not (self._peek().kind == "op" and self._peek().value == "]"):
                    raise self.error(self._peek().at, "expected ',' or ']' in the list opened "
                                     f"at column {self.map.position(bracket.at).column}, found "
                                     f"{_describe(self._peek())}")
            self._advance()
            return ast.ListExpr(tuple(items), bracket.at)
        finally:
            self._depth -= 1

    def _name_rest(self, first: Token) -> ast.Expr:
        parts = [str(first.value)]
        while self._peek().kind == "op" and self._peek().value == ".":
            self._advance()
            part = self._peek()
            if part.kind not in ("name", "keyword"):
                raise self.error(part.at, f"expected a name after '.', found {_describe(part)}")
            self._advance()
            parts.append(str(part.value))
        name = ".".join(parts)
        if self._peek().kind == "op" and self._peek().value == "(":
            return self._call_rest(name, first.at)
        if len(parts) > 1:
            raise self.error(first.at, f"{name!r}: dotted names are only for calling registered "
                             f"functions, e.g. {{{name}()}}")
        if name in BUILTIN_NAMES:
            raise self.error(first.at, f"{name!r} is a builtin; call it, e.g. {{{name}(...)}}")
        if name in ast.ROLES:
            raise self.error(first.at, f"role {{{name}}} must stand alone in its tag")
        return ast.VarRef(name, first.at)

    def _call_rest(self, name: str, at: int) -> ast.Call:
        paren = self._expect_op("(")
        self._enter(paren.at)
        try:
            args: list[ast.Expr] = []
            kwargs: list[tuple[str, ast.Expr]] = []
            while not (self._peek().kind == "op" and self._peek().value == ")"):
                tok = self._peek()
                if tok.kind == "name" and self._next_is_assign():
                    self._advance()
                    self._advance()  # the '='
                    if any(k == tok.value for k, _ in kwargs):
                        raise self.error(tok.at, f"argument {tok.value!r} given twice")
                    kwargs.append((str(tok.value), self._expression()))
                else:
                    if kwargs:
                        raise self.error(tok.at, "positional argument after a keyword argument")
                    args.append(self._expression())
                if self._peek().kind == "op" and self._peek().value == ",":
                    self._advance()
                elif not (self._peek().kind == "op" and self._peek().value == ")"):
                    raise self.error(self._peek().at, f"expected ',' or ')' in the call of "
                                     f"{name}() opened at column "
                                     f"{self.map.position(paren.at).column}, found "
                                     f"{_describe(self._peek())}")
            self._advance()
            return ast.Call(name, tuple(args), tuple(kwargs), at)
        finally:
            self._depth -= 1

    def _next_is_assign(self) -> bool:
        assert self._lexer is not None
        saved_pos, saved_peek = self._lexer.pos, self._peeked
        self._advance()
        nxt = self._peek()
        self._lexer.pos, self._peeked = saved_pos, saved_peek
        return nxt.kind == "op" and nxt.value == "="


def _join_mode(call: ast.Call, parser: ScriptParser) -> str:
    values = [*call.args, *(v for k, v in call.kwargs if k == "mode")]
    unknown = [k for k, _ in call.kwargs if k != "mode"]
    if unknown or len(values) != 1 or not isinstance(values[0], ast.Literal) or values[0].value \
            not in ("gather", "concat"):
        raise parser.error(call.at or 0, "join takes one optional mode: {join}, "
                           "{join(\"gather\")} or {join(\"concat\")}")
    return str(values[0].value)


def _at(expr: ast.Expr) -> int | None:
    return expr.at


def _describe(tok: Token) -> str:
    if tok.kind == "end":
        return "'}' (end of tag)"
    if tok.kind == "string":
        return f"string {tok.value!r}"
    return f"{tok.value!r}"


def parse_script(source: str, *, max_nesting_depth: int = 16) -> ast.Program:
    """Syntax only: text -> Program. Raises ScriptSyntaxError (422) with line, column, caret."""
    return ScriptParser(source, max_nesting_depth=max_nesting_depth).parse()
