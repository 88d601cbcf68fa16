"""Specification of constrained decoding (app/engines/embedded/grammar.py) with the real tiny model."""

from __future__ import annotations

import asyncio
import json
import random
import re

import jsonschema
import pytest
import torch

from app.engines.embedded.grammar import GrammarCompiler
from app.protocol import JSON_OBJECT_GRAMMAR
from app.engines.embedded.sampling import SequenceSampler, sample_next_tokens
from app.errors import APIError, PayloadTooLargeError, ValidationError
from app.protocol import SamplingParams

torch.set_num_threads(1)

PERSON_SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name", "age"],
    }
)


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.engines.tiny_model import ensure_tiny_model

    path = ensure_tiny_model(progress=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def eos_ids(tiny):
    tokenizer, _ = tiny
    return [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]


@pytest.fixture()
def compiler(tiny, eos_ids) -> GrammarCompiler:
    tokenizer, model = tiny
    return GrammarCompiler(
        tokenizer, model.config.vocab_size, 65536, 10.0, stop_token_ids=eos_ids
    )


def compile_(compiler: GrammarCompiler, kind: str, spec: str):
    return asyncio.run(compiler.compile(kind, spec))


def constrained_generate(tiny, compiler, eos_ids, kind, spec, *, max_new_tokens, params) -> str:
    """Decode with the tiny model under a grammar, exactly as an engine would step it."""
    tokenizer, model = tiny
    matcher = compiler.new_matcher(compile_(compiler, kind, spec), max_new_tokens)
    prompt = tokenizer.encode("Answer in JSON: ", add_special_tokens=True)
    sampler = SequenceSampler(params, prompt, model.config.vocab_size, eos_ids)
    input_ids = torch.tensor([prompt])
    past = None
    output: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            result = model(input_ids=input_ids, past_key_values=past, use_cache=True)
            past = result.past_key_values
            logits = result.logits[:, -1, :]
            allowed = matcher.allowed_token_mask().unsqueeze(0)
            token = sample_next_tokens(logits, [sampler], allowed, [0]).token_ids[0]
            assert matcher.accept_token(token), f"sampled token {token} rejected by the grammar"
            # The steering invariant: a known completion always fits in the tokens left.
            cost = matcher.witness_cost
            assert cost is not None and cost <= matcher.remaining_tokens, (
                f"witness cost {cost} > {matcher.remaining_tokens} tokens left after "
                f"{tokenizer.decode(output + [token])!r}"
            )
            sampler.observe(token)
            output.append(token)
            if matcher.is_terminated():
                break
            input_ids = torch.tensor([[token]])
    return tokenizer.decode(output, skip_special_tokens=True)


# --- compiling: errors, limits, cache -------------------------------------------------------


@pytest.mark.parametrize(
    "kind, spec, reason",
    [
        ("json_schema", '{"type": "object", ', "not valid JSON"),
        ("json_schema", '{"type": "bogus"}', "not a valid schema"),
        ("json_schema", '{"type": "object", "properties": {"a": {"type": 3}}}', "properties/a/type"),
        ("json_schema", "[1, 2]", "must be a JSON object"),
        ("regex", "(ab", "parenthesis is not closed"),
        ("ebnf", "root ::= foo", 'Rule "foo" is not defined'),
        ("xml", "<a/>", "unknown grammar kind"),
    ],
)
def test_invalid_specs_raise_422_with_the_reason(compiler, kind, spec, reason):
    with pytest.raises(ValidationError) as info:
        compile_(compiler, kind, spec)
    assert info.value.status_code == 422
    assert reason in info.value.message
    assert "/project/cpp" not in info.value.message  # no xgrammar source locations


def test_spec_over_the_size_limit_is_413(tiny, eos_ids):
    tokenizer, model = tiny
    small = GrammarCompiler(tokenizer, model.config.vocab_size, 64, 10.0, stop_token_ids=eos_ids)
    with pytest.raises(PayloadTooLargeError) as info:
        compile_(small, "regex", "a" * 65)
    assert info.value.status_code == 413 and "65 bytes" in info.value.message
    assert isinstance(info.value, APIError)


def test_compile_timeout_is_422_and_remembered(tiny, eos_ids):
    tokenizer, model = tiny
    hasty = GrammarCompiler(tokenizer, model.config.vocab_size, 65536, 1e-6, stop_token_ids=eos_ids)
    with pytest.raises(ValidationError, match="grammar compile exceeded"):
        compile_(hasty, "json_schema", PERSON_SCHEMA)
    with pytest.raises(ValidationError, match="grammar compile exceeded"):
        compile_(hasty, "json_schema", PERSON_SCHEMA)
    assert hasty.cache_hits == 1


def test_compiled_grammars_are_cached_by_kind_and_spec(compiler):
    first = compile_(compiler, "regex", r"\d+")
    assert compile_(compiler, "regex", r"\d+") is first
    assert compile_(compiler, "ebnf", 'root ::= [0-9]+') is not first
    assert (compiler.cache_hits, compiler.cache_misses) == (1, 2)


def test_typical_openai_tool_schemas_compile(compiler):
    weather = {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "City and country, e.g. Paris, FR"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
            "details": {"type": ["boolean", "null"]},
        },
        "required": ["location"],
        "additionalProperties": False,
    }
    search = {
        "type": "object",
        "properties": {
            "query": {"type": "string"},
            "filters": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"field": {"type": "string"}, "value": {"type": "string"}},
                    "required": ["field", "value"],
                },
            },
        },
        "required": ["query"],
    }
    for schema in (weather, search, {"type": "object", "properties": {}}):
        assert compile_(compiler, "json_schema", json.dumps(schema)).compile_time_s >= 0


# --- masks ----------------------------------------------------------------------------------


def test_mask_allows_exactly_the_valid_continuations(tiny, compiler):
    tokenizer, model = tiny
    matcher = compiler.new_matcher(compile_(compiler, "regex", r"[0-9]{2}x"), 1000)
    mask = matcher.allowed_token_mask()
    assert mask.shape == (model.config.vocab_size,)
    allowed_text = {tokenizer.decode([t]) for t in torch.nonzero(mask).flatten().tolist()}
    assert allowed_text and all(re.fullmatch(r"[0-9]{1,2}|[0-9]{2}x", s) for s in allowed_text)
    assert "7" in allowed_text
    assert matcher.accept_token(tokenizer.convert_tokens_to_ids("7"))
    assert not matcher.accept_token(tokenizer.convert_tokens_to_ids("x"))


def test_special_tokens_and_ids_beyond_the_tokenizer_are_never_allowed(tiny, eos_ids):
    tokenizer, model = tiny
    wide = GrammarCompiler(tokenizer, model.config.vocab_size + 64, 65536, 10.0,
                           stop_token_ids=eos_ids)
    matcher = wide.new_matcher(compile_(wide, "regex", r"[^x]*"), 1000)
    mask = matcher.allowed_token_mask()
    assert mask.shape == (model.config.vocab_size + 64,)
    assert not mask[len(tokenizer):].any()
    for special in ("<|startoftext|>", "<|pad|>", "<|im_start|>"):
        assert not mask[tokenizer.convert_tokens_to_ids(special)]


def test_stop_token_ends_a_complete_sentence(tiny, compiler, eos_ids):
    tokenizer, _ = tiny
    matcher = compiler.new_matcher(compile_(compiler, "regex", "ab"), 1000)
    for token in tokenizer.encode("ab", add_special_tokens=False):
        assert not matcher.is_terminated()
        assert matcher.accept_token(token)
    assert matcher.allowed_token_mask()[eos_ids].all()
    assert matcher.accept_token(eos_ids[0]) and matcher.is_terminated()


def test_steering_forces_completion_when_the_budget_is_tight(tiny, compiler):
    tokenizer, _ = tiny
    matcher = compiler.new_matcher(compile_(compiler, "json_schema", PERSON_SCHEMA), 1000)
    for token in tokenizer.encode('{"name": "abc', add_special_tokens=False):
        assert matcher.accept_token(token)
    free = matcher.allowed_token_mask().sum()
    matcher.remaining_tokens = 12  # e.g. `", "age": 0}` still fits, nothing much longer
    steered = matcher.allowed_token_mask().sum()
    assert 0 < steered < free


def test_every_steered_token_keeps_a_completion_within_budget(tiny, compiler):
    tokenizer, _ = tiny
    compiled = compile_(compiler, "json_schema", PERSON_SCHEMA)
    prefix = tokenizer.encode('{"name": "abc', add_special_tokens=False)

    def matcher_at_prefix(budget: int):
        matcher = compiler.new_matcher(compiled, 1000)
        for token in prefix:
            assert matcher.accept_token(token)
        matcher.remaining_tokens = budget
        return matcher

    allowed = torch.nonzero(matcher_at_prefix(12).allowed_token_mask()).flatten().tolist()
    assert allowed
    # A spread of them, to stay fast; the mask itself must leave the matcher's state untouched.
    for token in allowed[:: max(1, len(allowed) // 12)]:
        matcher = matcher_at_prefix(12)
        matcher.allowed_token_mask()
        assert matcher.accept_token(token), tokenizer.decode([token])
        for _ in range(11):
            if matcher.is_completed():
                break
            step = torch.nonzero(matcher.allowed_token_mask()).flatten()[0].item()
            assert matcher.accept_token(step)
        assert matcher.is_completed(), tokenizer.decode(prefix + [token])


# --- the property: always parses with the random tiny model ---------------------------------


def random_schema(rng: random.Random, depth: int = 0, max_depth: int = 1) -> dict:
    leaf_types = [
        {"type": "string"},
        {"type": "integer"},
        {"type": "number"},
        {"type": "boolean"},
        {"enum": ["red", "green", "blue"]},
        {"type": "string", "enum": ["yes", "no"]},
        {"type": "array", "items": {"type": "integer"}},
        {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        {"type": "string", "minLength": 3},
    ]
    properties = {}
    for i in range(rng.randint(1, 3 + (max_depth > 1))):
        if depth < max_depth and rng.random() < 0.3:
            properties[f"obj{i}"] = random_schema(rng, depth + 1, max_depth)
        else:
            properties[f"f{i}"] = rng.choice(leaf_types)
    required = [k for k in properties if rng.random() < 0.7]
    return {"type": "object", "properties": properties, "required": required}


REGEXES = [
    r"\(\d{3}\) \d{3}-\d{4}",
    r"\d{4}-\d{2}-\d{2}",
    r"-?\d+",
    r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)",
    r"(yes|no|maybe)",
]
SAMPLING = {
    "greedy": SamplingParams(temperature=0.0),
    "sampled": SamplingParams(temperature=1.0, seed=7),
}


@pytest.mark.parametrize("mode", list(SAMPLING))
@pytest.mark.parametrize("seed", range(6))
def test_random_schemas_always_validate_with_the_tiny_model(tiny, compiler, eos_ids, seed, mode):
    schema = random_schema(random.Random(seed))
    text = constrained_generate(
        tiny, compiler, eos_ids, "json_schema", json.dumps(schema),
        max_new_tokens=64, params=SAMPLING[mode],
    )
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("mode", list(SAMPLING))
@pytest.mark.parametrize("pattern", REGEXES)
def test_regexes_always_match_with_the_tiny_model(tiny, compiler, eos_ids, pattern, mode):
    text = constrained_generate(
        tiny, compiler, eos_ids, "regex", pattern, max_new_tokens=32, params=SAMPLING[mode]
    )
    assert re.fullmatch(pattern, text), f"{text!r} does not match {pattern!r}"


@pytest.mark.parametrize("mode", list(SAMPLING))
def test_json_object_grammar_gives_a_json_object(tiny, compiler, eos_ids, mode):
    text = constrained_generate(
        tiny, compiler, eos_ids, "ebnf", JSON_OBJECT_GRAMMAR, max_new_tokens=48,
        params=SAMPLING[mode],
    )
    assert isinstance(json.loads(text), dict)


def test_json_strings_never_get_raw_control_characters(tiny, compiler):
    tokenizer, _ = tiny
    matcher = compiler.new_matcher(compile_(compiler, "json_schema", PERSON_SCHEMA), 1000)
    for token in tokenizer.encode('{"name": "a', add_special_tokens=False):
        assert matcher.accept_token(token)
    allowed = torch.nonzero(matcher.allowed_token_mask()).flatten().tolist()
    assert len(allowed) > 100  # free string content
    assert not any(
        any(ch < " " for ch in tokenizer.decode([t])) for t in allowed
    ), "a control character inside a JSON string would not parse"


# --- budgets: refused when too small, always complete when enough -------------------------


def test_budget_below_the_shortest_completion_is_refused_with_422(compiler):
    compiled = compile_(compiler, "json_schema", PERSON_SCHEMA)
    needed = compiled.min_completion_tokens
    assert needed is not None and needed > 1
    with pytest.raises(ValidationError) as info:
        compiler.new_matcher(compiled, needed - 1)
    assert info.value.status_code == 422 and info.value.param == "max_new_tokens"
    assert f"at least {needed}" in info.value.message
    assert compiler.new_matcher(compiled, needed).remaining_tokens == needed
    compiler.new_matcher(compiled, 1, steering=False)  # bare masks promise nothing: admitted


def test_shortest_completion_skips_optional_properties_and_ends_numbers_early(compiler):
    schema = {
        "type": "object",
        "properties": {
            "a_optional": {
                "type": "object",
                "properties": {"x": {"type": "string"}, "y": {"type": "number"}},
                "required": ["x", "y"],
            },
            "z": {"type": "number"},
            "w": {"enum": ["an extremely long and wordy enumerated value", "short"]},
        },
        "required": ["z", "w"],
    }
    compiled = compile_(compiler, "json_schema", json.dumps(schema))
    assert compiled.start_witness == b'{"z": 0, "w": "short"}'
    assert compiled.min_completion_tokens == compiler.vocabulary.token_cost(compiled.start_witness)


@pytest.mark.parametrize(
    "pattern, shortest",
    [(r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)", b"a@a.com"), (r"[A-Z][a-z]+ [A-Z][a-z]+", b"Aa Aa")],
)
def test_shortest_completion_leaves_repetitions_early(compiler, pattern, shortest):
    compiled = compile_(compiler, "regex", pattern)
    assert len(compiled.start_witness) <= len(shortest) + 1, compiled.start_witness


def test_witness_cost_is_the_fewest_tokens_spelling_it(tiny, compiler):
    tokenizer, _ = tiny
    vocabulary = compiler.vocabulary
    for text in ['{"name": "abc", "age": 10}', '", "tags": []}', "hello world"]:
        data = text.encode()
        cost = vocabulary.token_cost(data)
        assert cost <= len(tokenizer.encode(text, add_special_tokens=False))
        assert cost >= -(-len(data) // vocabulary.max_token_bytes)
        # It is a spelling: some token is a prefix whose remainder costs one less.
        assert any(
            vocabulary.token_cost(data[size:]) == cost - 1
            for _, size in vocabulary.prefix_tokens(data)
        )


@pytest.mark.parametrize("slack", [0, 10])
@pytest.mark.parametrize("mode", list(SAMPLING))
@pytest.mark.parametrize("seed", range(5))
def test_deeper_random_schemas_validate_at_the_tightest_budgets(
    tiny, compiler, eos_ids, seed, mode, slack
):
    schema = random_schema(random.Random(1000 + seed), max_depth=2)
    compiled = compile_(compiler, "json_schema", json.dumps(schema))
    text = constrained_generate(
        tiny, compiler, eos_ids, "json_schema", json.dumps(schema),
        max_new_tokens=compiled.min_completion_tokens + slack, params=SAMPLING[mode],
    )
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("pattern", REGEXES)
def test_regexes_match_at_the_tightest_budget(tiny, compiler, eos_ids, pattern):
    compiled = compile_(compiler, "regex", pattern)
    text = constrained_generate(
        tiny, compiler, eos_ids, "regex", pattern,
        max_new_tokens=compiled.min_completion_tokens, params=SAMPLING["sampled"],
    )
    assert re.fullmatch(pattern, text), f"{text!r} does not match {pattern!r}"
