"""Bad scripts fail with 422 (413 for size) naming what is wrong, where, with a caret excerpt."""

from __future__ import annotations

import pickle

import pytest

from app.errors import PayloadTooLargeError, ValidationError
from app.lang import RunSettings, parse
from app.lang.errors import ScriptError, ScriptSyntaxError


def error_of(script, **kw) -> ScriptError:
    with pytest.raises(ValidationError) as info:
        parse(script, **kw)
    assert info.value.status_code == 422
    return info.value  # type: ignore[return-value]


@pytest.mark.parametrize("script, line, column, fragment", [
    ('a {gen("x", max_tokens=3', 1, 3, "unclosed '{'"),
    ("x }", 1, 3, "single '}'"),
    ("ok\n{user}hi{/assistant}", 2, 9, "{/assistant} does not match"),
    ("{user}never closed", 1, 1, "expected {/user}"),
    ("{fork(2)}x", 1, 1, "expected {join}"),
    ("{join}", 1, 1, "{join} does not match the open block: no block is open"),
    ("{else}", 1, 1, "{else} without an open {if}"),
    ('{if x}a{else}b{else}c{/if}', 1, 15, "a second {else}"),
    ("{user}{assistant}x{/assistant}{/user}", 1, 7, "roles cannot nest"),
    ('今天{get("北京"}', 1, 12, "expected ',' or ')'"),
    ('{f("abc)}', 1, 4, "unterminated string"),
    ('{f("\\q")}', 1, 5, "unknown escape"),
    ("{f(1 2)}", 1, 6, "expected ',' or ')'"),
    ("{f(a=1, 2)}", 1, 9, "positional argument after a keyword"),
    ("{}", 1, 1, "empty tag"),
    ("{a @ b}", 1, 4, "unexpected character '@'"),
    ("{fork(x)}{join}", 1, 7, "integer literal"),
    ("{/foo}", 1, 3, "unknown closing tag"),
    ('{gen(max_tokens=3)}', 1, 2, "needs a variable name"),
    ('{gen("a b")}', 1, 6, "must be a name"),
    ('{gen("x", stop=[1])}', 1, 16, "must be a string or a list of strings"),
    ('{gen("x", max_tokens=n)}', 1, 22, "must be a literal"),
    ('{gen("x", json_schema="{")}', 1, 23, "not valid JSON"),
    ('{select("x", options=[])}', 1, 22, "non-empty list of strings"),
    ('{select("x", options=["a"], temperature=0.5)}', 1, 41, "only temperature=0"),
    ('{a == 1}', 1, 4, "a condition can only be used in {if"),
    ('{gen}', 1, 2, "'gen' is a builtin"),
    ('{a.b}', 1, 2, "dotted names are only for calling"),
    ('{let user = 1}', 1, 6, "reserved"),
    ("line one\n  {missing}", 2, 4, "unknown variable 'missing'"),
    ('{f(gen("x"))}', 1, 4, "gen() cannot be used inside an expression"),
])
def test_errors_carry_line_column_and_a_caret(script, line, column, fragment):
    err = error_of(script)
    assert fragment in err.message
    assert (err.line, err.column) == (line, column), err.message
    caret_line = err.excerpt.splitlines()[-1]
    assert caret_line.endswith("^")
    assert err.to_body()["error"]["line"] == line


def test_the_caret_lines_up_under_wide_characters():
    err = error_of('今天{get("北京"}')
    source_line, caret_line = err.excerpt.splitlines()
    # Everything before the error is 今天{get("北京" = 2 + 2 + 5 + 4 + 1 display cells... the
    # caret sits under the '}' that should have been ')'.
    gutter = source_line.index("|") + 2
    cells_before = sum(2 if ord(ch) > 0x2E7F else 1 for ch in source_line[gutter:].split("}")[0])
    assert caret_line.index("^") - gutter == cells_before


def test_syntax_errors_are_their_own_class_and_survive_pickling():
    err = error_of("{user}")
    assert isinstance(err, ScriptSyntaxError) and err.code == "syntax_error"
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is ScriptSyntaxError
    assert (copy.line, copy.column, copy.message) == (err.line, err.column, err.message)


def test_bad_sampling_values_after_merging_defaults_are_422():
    err = error_of('{gen("x", temperature=-1)}')
    assert "gen('x') has invalid sampling parameters" in err.message and "temperature" in err.message


def test_bad_argument_names_are_422():
    with pytest.raises(ValidationError, match="arguments"):
        parse("x", arguments={"not a name": 1})


def test_a_program_that_is_neither_text_nor_ops_is_422():
    with pytest.raises(ValidationError):
        parse(42)  # type: ignore[arg-type]


class TestLimits:
    def test_script_bytes_is_413(self):
        with pytest.raises(PayloadTooLargeError, match="max_script_bytes") as info:
            parse("今" * 40, settings=RunSettings(max_script_bytes=100))  # 120 bytes
        assert info.value.status_code == 413
        parse("今" * 33, settings=RunSettings(max_script_bytes=100))

    def test_json_programs_count_bytes_too(self):
        with pytest.raises(PayloadTooLargeError):
            parse(["x" * 200], settings=RunSettings(max_script_bytes=100))

    def test_number_of_gens_counts_fork_branches(self):
        settings = RunSettings(max_gens=8)
        parse('{fork(4)}{gen("a", max_tokens=1)}{gen("b", max_tokens=1)}{join}', settings=settings)
        with pytest.raises(ValidationError, match="max_gens exceeded: the program runs 9"):
            parse('{fork(4)}{gen("a", max_tokens=1)}{select("b", options=["x"])}{join}'
                  '{gen("c", max_tokens=1)}', settings=settings)

    def test_total_max_tokens_uses_defaults_and_the_costlier_if_branch(self):
        settings = RunSettings(max_total_tokens=300)
        # 128 (request default) + max(100, 50) = 228
        parse('{gen("a")}{if a}{gen("b", max_tokens=100)}{else}{gen("c", max_tokens=50)}{/if}',
              settings=settings)
        with pytest.raises(ValidationError, match="max_total_tokens exceeded: .* 328 tokens"):
            parse('{gen("a")}{fork(2)}{gen("b", max_tokens=100)}{join}', settings=settings)

    def test_fork_width(self):
        with pytest.raises(ValidationError, match="max_fork_width exceeded: fork\\(9\\)") as info:
            parse("{fork(9)}{join}", settings=RunSettings(max_fork_width=8))
        assert info.value.line == 1

    def test_nesting_depth_of_blocks_and_expressions(self):
        settings = RunSettings(max_nesting_depth=4)
        parse("{fork(1)}{fork(1)}{fork(1)}x{join}{join}{join}", settings=settings)
        with pytest.raises(ValidationError, match="nest too deeply"):
            parse("{fork(1)}" * 5 + "{join}" * 5, settings=settings)
        with pytest.raises(ValidationError, match="nests too deeply"):
            parse("{f([[[[[1]]]]])}", settings=settings)
        with pytest.raises(ValidationError, match="nesting too deep"):
            parse([{"fork": 1, "body": [{"fork": 1, "body": [{"fork": 1, "body": [
                {"fork": 1, "body": [{"fork": 1, "body": []}]}]}]}]}], settings=settings)

    def test_select_options_and_function_calls(self):
        with pytest.raises(ValidationError, match="max_select_options"):
            parse('{select("s", options=["a", "b", "c"])}',
                  settings=RunSettings(max_select_options=2))
        with pytest.raises(ValidationError, match="max_function_calls exceeded: 6 calls"):
            parse("{fork(3)}{f()}{g()}{join}", settings=RunSettings(max_function_calls=5))

    def test_hostile_nesting_never_overflows_the_stack(self):
        for script in ("{" + "(" * 100_000 + "}", "{" + "[" * 100_000 + "}",
                       "{" + "not " * 50_000 + "x}", "{fork(1)}" * 20_000):
            with pytest.raises(ValidationError):
                parse(script, settings=RunSettings(max_script_bytes=1_000_000))
