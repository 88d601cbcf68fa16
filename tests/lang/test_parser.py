"""The script grammar: what each construct parses into (golden trees), and the JSON form."""

from __future__ import annotations

import re

import pytest

from app.lang import ast, parse
from app.errors import ValidationError


def body(script: str, **kw) -> tuple:
    return parse(script, **kw).body


def test_the_two_issue_scripts_parse_into_text_and_function_calls():
    weather = body('今天{get_current_weather("北京")},适合外出。')
    assert [type(s) for s in weather] == [ast.Text, ast.Emit, ast.Text]
    assert weather[0].value == "今天" and weather[2].value == ",适合外出。"
    call = weather[1].expr
    assert call.function == "get_current_weather" and call.args[0].value == "北京"

    query = body("今天天气如何?{sys.query_weather()}")
    assert query[0].value == "今天天气如何?"
    assert query[1].expr == ast.Call("sys.query_weather", (), (), query[1].expr.at)


def test_gen_takes_a_name_and_literal_sampling_arguments():
    (gen,) = body('{gen("answer", max_tokens=16, stop=["\\n", "。"], temperature=0, '
                  'regex="[0-9]+", ignore_eos=false)}')
    assert isinstance(gen, ast.Gen) and gen.name == "answer"
    assert dict(gen.params) == {"max_tokens": 16, "stop": ["\n", "。"], "temperature": 0,
                                "regex": "[0-9]+", "ignore_eos": False}


def test_gen_with_choices_is_a_select_as_in_sglang():
    (sel,) = body('{gen("pick", choices=["a", "b"])}')
    assert isinstance(sel, ast.Select) and sel.name == "pick"


def test_select_accepts_options_choices_or_a_second_positional():
    for script in ('{select("x", options=["yes", "no"])}', '{select("x", choices=["yes", "no"])}',
                   '{select("x", ["yes", "no"])}'):
        (sel,) = body(script)
        assert isinstance(sel, ast.Select)
        assert [i.value for i in sel.options.items] == ["yes", "no"]
        assert sel.method == "token_length_normalized"
    (sel,) = body('{select("x", options=["a"], choices_method="greedy_token_selection")}')
    assert sel.method == "greedy_token_selection"


def test_role_blocks_fork_join_and_if_nest():
    script = ("{system}Be brief.{/system}\n"
              "{user}Q{/user}\n"
              "{assistant}{fork(2)}{gen(\"a\", max_tokens=2)}{join}{/assistant}\n"
              "{if a[0] == \"x\" and not done}yes{elif a}maybe{else}no{/if}")
    system, user, assistant, cond = body(script, arguments={"done": False})
    assert (system.role, user.role, assistant.role) == ("system", "user", "assistant")
    assert system.body == (ast.Text("Be brief.", system.body[0].at),)
    (fork,) = assistant.body
    assert isinstance(fork, ast.Fork) and fork.width == 2 and fork.join_mode == "gather"
    assert isinstance(fork.body[0], ast.Gen)
    assert isinstance(cond, ast.If) and len(cond.branches) == 2
    first_condition = cond.branches[0][0]
    assert isinstance(first_condition, ast.BoolOp) and first_condition.op == "and"
    assert [s.value for s in cond.orelse] == ["no"]


def test_join_concat_mode():
    (fork,) = body('{fork(3)}x{join("concat")}')
    assert fork.join_mode == "concat" and fork.width == 3


def test_one_newline_after_a_block_tag_is_dropped_but_not_after_values():
    stmts = body('{user}\nhi\n{/user}\n{let x = "v"}\n{x}\nend')
    role, let, emit, tail = stmts
    assert [s.value for s in role.body] == ["hi\n"]
    assert isinstance(let, ast.Let)
    assert isinstance(emit, ast.Emit) and tail.value == "\nend"


def test_double_braces_are_literal_braces():
    (text,) = body("a {{b}} c }}{{")
    assert text.value == "a {b} c }{"


def test_strings_may_contain_braces_and_escapes():
    (emit,) = body('{f("}{", \'it\\\'s\', "\\u4eca\\n")}')
    assert [a.value for a in emit.expr.args] == ["}{", "it's", "今\n"]


def test_literals_keyword_arguments_lists_and_variables():
    (emit,) = body('{tools.f(1, -2.5, true, None, [1, "a", [False]], city, unit="c")}',
                   arguments={"city": "Paris"})
    call = emit.expr
    values = [a.value if isinstance(a, ast.Literal) else a for a in call.args]
    assert values[:4] == [1, -2.5, True, None]
    assert isinstance(values[4], ast.ListExpr) and isinstance(values[5], ast.VarRef)
    assert call.kwargs[0][0] == "unit" and call.kwargs[0][1].value == "c"


def test_variables_defined_by_gen_let_join_and_arguments_are_known_later():
    parse('{gen("a", max_tokens=1)}{let b = a}{fork(2)}{gen("c", max_tokens=1)}'
          '{fork_index}{join}{a}{b}{c[0]}{arg}', arguments={"arg": 1})


def test_a_variable_set_in_only_one_if_branch_is_accepted_statically():
    parse('{if flag}{let x = 1}{/if}{x}', arguments={"flag": True})


def test_json_programs_build_the_same_tree_as_scripts():
    script = parse('Q{user}{gen("a", max_tokens=4, stop="\\n")}{/user}'
                   '{select("s", options=["x", "y"])}{sys.f("北京", n=a)}'
                   '{fork(2)}{gen("t", max_tokens=1)}{join}{if s == "x"}X{else}Y{/if}')
    ops = [
        "Q",
        {"role": "user", "body": [{"gen": "a", "max_tokens": 4, "stop": "\n"}]},
        {"select": "s", "options": ["x", "y"]},
        {"call": "sys.f", "args": ["北京"], "kwargs": {"n": {"var": "a"}}},
        {"fork": 2, "body": [{"gen": "t", "max_tokens": 1}]},
        {"if": {"op": "==", "left": {"var": "s"}, "right": "x"}, "then": ["X"], "else": ["Y"]},
    ]
    assert strip_positions(parse(ops).body) == strip_positions(script.body)


def test_json_gen_accepts_a_schema_object():
    (gen,) = parse([{"gen": "j", "max_tokens": 8, "json_schema": {"type": "object"}}]).body
    assert gen.param("json_schema") == '{"type": "object"}'


@pytest.mark.parametrize("ops, message", [
    ({"text": "x"}, "program must be a script (string) or a list of ops"),
    ([{"fork": 2, "body": "x"}], "program[0].body: expected a list of ops"),
    ([{"gen": "a", "max_tokens": "many"}], "program[0]: gen() argument 'max_tokens'"),
    ([{"text": "a", "var": "b"}], "exactly one of the keys"),
    ([{"fork": 0, "body": []}], "fork must be an integer >= 1"),
    ([{"role": "user", "body": [{"role": "assistant", "body": []}]}], "roles cannot nest"),
    ([{"let": "if", "value": 1}], "reserved"),
])
def test_json_errors_name_the_op_path(ops, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        parse(ops)


def strip_positions(node):
    """The tree without source offsets (JSON programs have none)."""
    import dataclasses

    if isinstance(node, tuple):
        return tuple(strip_positions(n) for n in node)
    if dataclasses.is_dataclass(node):
        return type(node)(**{f.name: (None if f.name == "at" else strip_positions(
            getattr(node, f.name))) for f in dataclasses.fields(node)})
    return node
