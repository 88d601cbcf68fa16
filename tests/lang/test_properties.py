"""Property tests: no input crashes the parser. Every script and every JSON value either parses
or raises a 422 (ValidationError) / 413 (PayloadTooLargeError) - i.e. /run answers 200 or 422/413,
never 500."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.errors import PayloadTooLargeError, ValidationError
from app.lang import RunSettings, parse

SMALL_LIMITS = RunSettings(max_script_bytes=2000, max_nesting_depth=6)

# Fragments that make random text look like scripts, so the fuzzer reaches deep into the parser.
FRAGMENTS = ["{", "}", "{{", "}}", "(", ")", "[", "]", ",", "=", "==", ".", "/", "-", '"', "'",
             "\\", "\\n", "\\u4eca", " ", "\n", "gen", "select", "fork", "join", "if", "elif",
             "else", "let", "not", "and", "in", "user", "/user", "system", "assistant",
             "/assistant", "/if", "true", "None", "x", "sys.query_weather", "max_tokens",
             "options", "choices", "stop", "1", "2.5", "1e3", "-3", "今天", "北京", "fork_index",
             "\x00", "\ud800", "٣", "²"]

script_like = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) |
    st.sampled_from(["", "x", "gen", "user", "fork", "{", "a.b", "=="]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["text", "gen", "select", "call", "var", "let", "role", "fork", "if",
                         "body", "then", "else", "elif", "args", "kwargs", "options",
                         "max_tokens", "op", "left", "right", "and", "not", "index", "join",
                         "value", "stop"]), children, max_size=4),
    max_leaves=25,
)


def parses_or_is_rejected_cleanly(program) -> None:
    try:
        parse(program, settings=SMALL_LIMITS, arguments={"x": "v"})
    except (ValidationError, PayloadTooLargeError) as exc:
        assert exc.status_code in (413, 422)
        assert exc.message


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_arbitrary_text_parses_or_is_a_422(text):
    parses_or_is_rejected_cleanly(text)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script_like)
def test_script_like_text_parses_or_is_a_422(text):
    parses_or_is_rejected_cleanly(text)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(json_values, max_size=5))
def test_arbitrary_json_ops_parse_or_are_a_422(ops):
    parses_or_is_rejected_cleanly(ops)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200).filter(lambda t: "{" not in t and "}" not in t))
def test_text_without_braces_is_kept_verbatim(text):
    program = parse(text)
    assert "".join(s.value for s in program.body) == text
