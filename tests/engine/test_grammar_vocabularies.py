"""Grammars on a real byte-level BPE that lacks some bytes (SmolLM2: 235 of 256 single bytes)."""

from __future__ import annotations

import asyncio

import pytest

from app.engines.embedded.grammar import GrammarCompiler
from app.errors import ValidationError


@pytest.fixture(scope="module")
def compiler(smollm2_model_path) -> GrammarCompiler:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_model_path)
    return GrammarCompiler(tokenizer, 49152, 65536, 10.0,
                           stop_token_ids=[tokenizer.eos_token_id])


def test_vocabulary_without_every_byte_still_steers(compiler):
    missing = set(range(256)) - set(compiler.vocabulary.single_byte_ids)
    assert 0x04 in missing and 0xFF in missing  # the reason the old assertion fired
    schema = '{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}'
    grammar = asyncio.run(compiler.compile("json_schema", schema))
    assert grammar.start_witness is not None and grammar.min_completion_tokens is not None
    assert grammar.min_completion_tokens <= 10


def test_grammar_needing_a_byte_the_vocabulary_lacks_is_refused(compiler):
    with pytest.raises(ValidationError) as info:
        asyncio.run(compiler.compile("regex", "a\x04b"))
    assert info.value.status_code == 422 and "vocabulary" in str(info.value)
