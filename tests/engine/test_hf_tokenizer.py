"""HFTokenizer (the Tokenizer contract), the incremental detokenizer and the stop-string helpers,
on the tiny model's real byte-level BPE tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.config import TINY_MODEL, ModelSettings
from app.engines.hf_tokenizer import HFTokenizer, IncrementalDetokenizer, find_stop, stop_holdback
from app.errors import InvalidRequestError, ValidationError

# Any Unicode text that UTF-8 can encode (lone surrogates cannot be).
ANY_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)
SAMPLES = [
    "The weather in Paris is mild, with a light breeze.",
    '今天{get_current_weather("北京")},适合外出。',
    "emoji: 😀🎉🚀 ❤️ 👍🏽 family: 👨‍👩‍👧",
    "bytes: \x00\x01\x7f\x80 \u00ff \uffff \U0010ffff tab\t nl\n cr\r",
    "  leading and trailing spaces  ",
    "",
]


@pytest.fixture(scope="module")
def tok(tiny_model_path) -> HFTokenizer:
    return HFTokenizer(tiny_model_path)


def test_from_settings_builds_and_loads_the_tiny_tokenizer(tiny_model_path):
    settings = ModelSettings(model_path=TINY_MODEL, cache_dir=str(Path(tiny_model_path).parent))
    assert HFTokenizer.from_settings(settings).path == tiny_model_path


# -- encode / decode ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", SAMPLES)
def test_text_round_trips(tok, text):
    ids = tok.encode(text)
    assert ids[0] == tok.hf.bos_token_id
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=ANY_TEXT)
def test_any_text_round_trips(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_chinese_and_code_tokenize_into_sensible_pieces(tok):
    ids = tok.encode('今天{get_current_weather("北京")}', add_special_tokens=False)
    assert len(ids) < len('今天{get_current_weather("北京")}'.encode()) / 2
    assert [tok.decode([i]) for i in ids][:4] == ["今天", "{", "get", "_"]


def test_special_tokens_are_skipped_on_request(tok):
    ids = tok.encode("<|im_start|>assistant\nHi<|im_end|>")
    with_special = "<|startoftext|><|im_start|>assistant\nHi<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=False) == with_special
    assert tok.decode(ids) == "assistant\nHi"


def test_a_bos_written_by_the_prompt_is_not_doubled(tok):
    bos = tok.hf.bos_token_id
    assert tok.encode("<|startoftext|>hello")[:2] == [bos, tok.encode("hello")[1]]
    assert tok.encode("<|startoftext|>hello", add_special_tokens=False)[0] == bos


def test_encoding_a_non_string_is_a_validation_error(tok):
    with pytest.raises(ValidationError, match="must be a string, got list"):
        tok.encode(["not", "text"])  # type: ignore[arg-type]


def test_eos_ids_include_end_of_turn_and_end_of_text(tok):
    assert tok.eos_token_ids == [
        tok.hf.convert_tokens_to_ids("<|im_end|>"),
        tok.hf.convert_tokens_to_ids("<|endoftext|>"),
    ]


# -- chat template ------------------------------------------------------------------------------


def test_chat_template_renders_a_prompt_that_encodes_with_one_bos(tok):
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(prompt)
    assert ids.count(tok.hf.bos_token_id) == 1


def test_chat_template_passes_tools_through(tok):
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {}}}]
    prompt = tok.apply_chat_template([{"role": "user", "content": "time?"}], tools=tools)
    assert '"name": "get_time"' in prompt and prompt.startswith("<|im_start|>system\n")
    no_tools = tok.apply_chat_template([{"role": "user", "content": "time?"}], tools=[])
    assert "<tools>" not in no_tools


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        (["hello"], r"messages\[0\] must be an object"),
        ([{"content": "hi"}], r"messages\[0\].role"),
    ],
)
def test_malformed_messages_are_invalid_requests(tok, messages, message):
    with pytest.raises(InvalidRequestError, match=message) as caught:
        tok.apply_chat_template(messages)
    assert caught.value.param == "messages"


# -- incremental detokenization ------------------------------------------------------------------


def stream(tok: HFTokenizer, ids: list[int], chunks: list[int], skip: bool = True) -> list[str]:
    """Push `ids` in chunks of the given sizes (cycled); return every delta, finish() last."""
    detok = tok.detokenizer(skip_special_tokens=skip)
    deltas, start, i = [], 0, 0
    while start < len(ids):
        size = chunks[i % len(chunks)]
        deltas.append(detok.push(ids[start : start + size]))
        start, i = start + size, i + 1
    deltas.append(detok.finish())
    assert detok.text == "".join(deltas)
    return deltas


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), skip=st.booleans())
def test_incremental_text_equals_the_full_decode_of_any_token_stream(tok, data, skip):
    # Random ids include special tokens and byte tokens that form invalid UTF-8.
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40))
    chunks = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=5))
    assert "".join(stream(tok, ids, chunks, skip)) == tok.decode(ids, skip_special_tokens=skip)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=ANY_TEXT.filter(lambda t: "\ufffd" not in t))
def test_valid_text_streams_without_any_replacement_character(tok, text):
    deltas = stream(tok, tok.encode(text, add_special_tokens=False), [1])
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_a_character_split_over_tokens_appears_once_complete(tok):
    ids = tok.encode("适", add_special_tokens=False)
    assert len(ids) == 3, "this character is three single-byte tokens in the tiny vocabulary"
    detok = tok.detokenizer()
    assert [detok.push(i) for i in ids] == ["", "", "适"]
    assert detok.pending_tokens == 0 and detok.finish() == ""


def test_invalid_bytes_become_one_replacement_character_when_certain(tok):
    lone_continuation = tok.hf.convert_tokens_to_ids("Ģ")  # byte 0x80
    a = tok.encode("a", add_special_tokens=False)
    detok = tok.detokenizer()
    # A lone continuation byte can never complete, but the detokenizer only knows that the text
    # before it is final once another character decodes after it.
    assert detok.push(lone_continuation) == ""
    assert detok.push(a) == "\ufffda"
    assert detok.push(lone_continuation) == ""
    assert detok.finish() == "\ufffd"


def test_skip_special_tokens_is_honoured_while_streaming(tok):
    ids = tok.encode("Hi<|im_end|><|im_start|>there", add_special_tokens=False)
    assert "".join(stream(tok, ids, [1], skip=True)) == "Hithere"
    assert "".join(stream(tok, ids, [1], skip=False)) == "Hi<|im_end|><|im_start|>there"


def test_a_detokenizer_works_over_any_tokenizer_contract(tok):
    detok = IncrementalDetokenizer(tok, skip_special_tokens=True)
    assert detok.push(tok.encode("hello world", add_special_tokens=False)) == "hello world"


# -- stop strings ------------------------------------------------------------------------------


def test_find_stop_returns_the_earliest_match_preferring_the_longest():
    assert find_stop("say hello world", ["world", "hello"]) == (4, "hello")
    assert find_stop("abcdef", ["cd", "cdef"]) == (2, "cdef")
    assert find_stop("abcdef", ["xyz"]) is None
    assert find_stop("abcdef", []) is None


def test_find_stop_sees_matches_straddling_old_and_new_text():
    text = "the end is near"
    assert find_stop(text, ["end"], search_from=6) == (4, "end")  # "en" was old, "d" is new
    assert find_stop(text, ["the"], search_from=6) is None  # fully inside searched text


def test_holdback_covers_a_tail_that_could_become_a_stop_string():
    assert stop_holdback("Hello wor", ["world"]) == 3
    assert stop_holdback("Hello wor", ["world", "or"]) == 3
    assert stop_holdback("Hello", ["world"]) == 0
    assert stop_holdback("ab<", ["</s>", "<|"]) == 1
    # Only a tail within the unsent text (from `start`) can be held back.
    assert stop_holdback("Hello wor", ["world"], start=6) == 3
    assert stop_holdback("Hello wor", ["world"], start=7) == 0  # "w" is already out


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab<>/ ", max_size=30),
    stops=st.lists(st.text(alphabet="ab<>/ ", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(1, 5), min_size=1, max_size=6),
)
def test_streaming_with_holdback_never_shows_part_of_a_matched_stop(text, stops, cuts):
    """The protocol an engine follows: append a delta, look for a stop, send what is safe.
    Generation stops at the first stop string to complete, so the result depends on how the
    text arrives; what must hold is that nothing sent is ever cut off afterwards."""
    full, sent, searched, i = "", "", 0, 0
    hit = None
    while len(full) < len(text) and hit is None:
        step = cuts[i % len(cuts)]
        full, i = text[: len(full) + step], i + 1
        hit = find_stop(full, stops, searched)
        searched = len(full)
        if hit is not None:
            full = full[: hit[0]]
            safe = len(full)
        else:
            safe = len(full) - stop_holdback(full, stops, start=len(sent))
        assert full.startswith(sent), "text already sent was cut off by a stop string"
        sent += full[len(sent) : max(safe, len(sent))]
    output = full  # the final flush sends the rest

    assert output.startswith(sent)
    assert find_stop(output, stops) is None
    if hit is None:
        assert output == text
    else:
        assert text[len(output) :].startswith(hit[1])
