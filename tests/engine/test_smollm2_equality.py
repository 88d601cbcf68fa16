"""The embedded engine is correct on a real model: SmolLM2-135M-Instruct against transformers.

Greedy outputs equal `generate` token for token (single requests, 8 at once, prefix-cache hits,
chunked prefill); prompt and output logprobs equal a plain HF forward pass within 1e-4 (float32);
the chat template, EOS and stop strings behave as the model's files say. One engine and one HF
model for the whole module, short outputs: this runs in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from app.config import EngineSettings, ModelSettings
from app.engines.base import generate_all
from app.engines.embedded import EmbeddedEngine
from app.protocol import GenerateOutput, GenerateRequest, SamplingParams

torch.set_num_threads(1)

MAX_NEW_TOKENS = 12
CHUNK_TOKENS = 64  # chat prompts below fit one chunk; LONG_PROMPTS take several
LOGPROB_TOLERANCE = 1e-4

QUESTIONS = [
    "What is the capital of France?",
    "What is the capital of Japan?",
    "Name three primary colors.",
    "What is 2 + 2?",
    "Write a haiku about the sea.",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "Translate 'good morning' into Spanish.",
    "Give me a synonym for happy.",
    "What planet is known as the Red Planet?",
    "How many legs does a spider have?",
    "What is photosynthesis?",
    "Suggest a name for a pet cat.",
    "What is the largest ocean on Earth?",
    "Explain what a CPU does in one sentence.",
    "What language is spoken in Brazil?",
    "List two fruits that are yellow.",
    "What is the square root of 81?",
    "Who painted the Mona Lisa?",
    "What does HTTP stand for?",
    "Describe the color blue to someone who cannot see.",
    "What is the opposite of cold?",
]
SYSTEM = ("You are a concise assistant for a geography quiz. Answer in one short sentence, "
          "never more. Be accurate and friendly.")
LONG_CONTEXT = (
    "The Rhine rises in the Swiss Alps, forms part of the Swiss-Austrian, Swiss-Liechtenstein, "
    "Swiss-German and Franco-German borders, then flows through the German Rhineland and the "
    "Netherlands, where it empties into the North Sea. It is one of the major rivers of Europe "
    "and has been a vital navigable waterway since Roman times, carrying goods deep inland. "
)
LONG_QUESTIONS = ["Where does the Rhine rise?", "Into which sea does the Rhine flow?",
                  "Which countries does the river pass?"]


def chat(tokenizer, question: str, system: str | None = None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages)


def greedy(**kw) -> SamplingParams:
    kw.setdefault("max_new_tokens", MAX_NEW_TOKENS)
    return SamplingParams(temperature=0.0, **kw)


@contextlib.asynccontextmanager
async def smollm2_engine(model_path: str) -> AsyncIterator[EmbeddedEngine]:
    cache = str(Path(model_path).parent)
    engine = EmbeddedEngine(
        ModelSettings(model_path=model_path, cache_dir=cache, dtype="float32"),
        EngineSettings(torch_threads=1, max_total_tokens=16384, chunked_prefill_size=CHUNK_TOKENS,
                       max_prefill_tokens=CHUNK_TOKENS),
    )
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()


@pytest.fixture(scope="module")
async def engine(smollm2_model_path) -> AsyncIterator[EmbeddedEngine]:
    async with smollm2_engine(smollm2_model_path) as eng:
        yield eng


class HFReference:
    """transformers' own answers, computed once per prompt."""

    def __init__(self, tokenizer, model) -> None:
        self.tokenizer, self.model = tokenizer, model
        self._greedy: dict[tuple[int, ...], list[int]] = {}

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    @torch.inference_mode()
    def greedy(self, text: str) -> list[int]:
        ids = tuple(self.ids(text))
        if ids not in self._greedy:
            out = self.model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW_TOKENS,
                                      do_sample=False, top_p=None, top_k=None, temperature=None)
            self._greedy[ids] = out[0, len(ids):].tolist()
        return self._greedy[ids]

    @torch.inference_mode()
    def logprobs(self, ids: list[int]) -> list[float]:
        """logprob of ids[i] given ids[:i], for i >= 1."""
        logits = self.model(torch.tensor([ids])).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        return [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]


@pytest.fixture(scope="module")
def hf(smollm2_hf) -> HFReference:
    return HFReference(*smollm2_hf)


async def run(engine: EmbeddedEngine, text: str, **kw) -> GenerateOutput:
    sampling = kw.pop("sampling", None) or greedy()
    return await generate_all(engine, GenerateRequest(text=text, sampling=sampling, **kw))


# ---- the model's files ----------------------------------------------------------------------------


def test_chat_template_and_eos_are_the_models(engine, hf, smollm2_model_path):
    messages = [{"role": "user", "content": "Hi there"}]
    expected = hf.tokenizer.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=True)
    assert engine.tokenizer.apply_chat_template(messages) == expected
    assert "You are a helpful AI assistant named SmolLM" in expected  # the template's default
    generation = json.loads((Path(smollm2_model_path) / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert engine.tokenizer.eos_token_ids == (eos if isinstance(eos, list) else [eos])


async def test_eos_ends_the_answer_as_hf_does(engine, hf):
    prompt = chat(engine.tokenizer, "What is the capital of France?")
    out = await run(engine, prompt, sampling=greedy(max_new_tokens=32))
    expected = hf.model.generate(torch.tensor([hf.ids(prompt)]), max_new_tokens=32,
                                 do_sample=False)[0, len(hf.ids(prompt)):].tolist()
    assert out.token_ids == expected
    assert out.token_ids[-1] == hf.tokenizer.eos_token_id
    assert out.finish_reason.type == "stop" and out.finish_reason.matched == out.token_ids[-1]
    assert "Paris" in out.text and "<|im_end|>" not in out.text


# ---- greedy equality --------------------------------------------------------------------------------


async def test_greedy_single_requests_equal_hf(engine, hf):
    await engine.flush_cache()
    # Six alone (one sequence in the batch); the other paths below batch 8 at a time, 25 distinct
    # prompts in all. Each prompt costs a sequential HF `generate` too: the suite's main cost.
    for question in QUESTIONS[:6]:
        prompt = chat(engine.tokenizer, question)
        out = await run(engine, prompt)
        assert out.token_ids == hf.greedy(prompt), question


async def test_greedy_eight_concurrent_requests_equal_hf(engine, hf):
    await engine.flush_cache()
    prompts = [chat(engine.tokenizer, q, SYSTEM) for q in QUESTIONS[:8]]
    outs = await asyncio.gather(*(run(engine, p) for p in prompts))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf.greedy(prompt), prompt


async def test_greedy_with_prefix_cache_hits_equals_hf(engine, hf):
    """A shared system prompt, then the same prompts again: most of each prompt comes from the
    radix cache, and the outputs do not change."""
    await engine.flush_cache()
    prompts = [chat(engine.tokenizer, q, SYSTEM) for q in QUESTIONS[8:16]]
    first = await run(engine, prompts[0])
    assert first.token_ids == hf.greedy(prompts[0])
    outs = await asyncio.gather(*(run(engine, p) for p in prompts[1:]))  # share the system part
    again = await asyncio.gather(*(run(engine, p) for p in prompts))  # whole prompts cached
    for prompt, out in zip(prompts[1:], outs):
        assert out.cached_tokens > 0 and out.token_ids == hf.greedy(prompt), prompt
    for prompt, out in zip(prompts, again):
        assert out.cached_tokens >= len(hf.ids(prompt)) - 1, "the repeat should hit the cache"
        assert out.token_ids == hf.greedy(prompt), prompt


async def test_greedy_with_chunked_prefill_equals_hf(engine, hf):
    await engine.flush_cache()
    prompts = [chat(engine.tokenizer, LONG_CONTEXT + q) for q in LONG_QUESTIONS]
    assert all(len(hf.ids(p)) > CHUNK_TOKENS for p in prompts)  # two chunks or more
    outs = await asyncio.gather(*(run(engine, p) for p in prompts))
    for prompt, out in zip(prompts, outs):
        assert out.prompt_tokens == len(hf.ids(prompt))
        assert out.token_ids == hf.greedy(prompt), prompt


# ---- logprobs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["short", "chunked"])
async def test_prompt_and_output_logprobs_equal_hf(engine, hf, case):
    question = QUESTIONS[0] if case == "short" else LONG_CONTEXT + LONG_QUESTIONS[0]
    prompt = chat(engine.tokenizer, question)
    out = await run(engine, prompt, return_logprob=True, logprob_start_len=0)
    ids = hf.ids(prompt)
    expected = hf.logprobs(ids + out.token_ids)
    got_input = [entry[0] for entry in out.input_token_logprobs]
    assert got_input[0] is None and len(got_input) == len(ids)  # SGLang: no logprob for token 0
    assert [entry[1] for entry in out.input_token_logprobs] == ids
    got_output = [entry[0] for entry in out.output_token_logprobs]
    assert [entry[1] for entry in out.output_token_logprobs] == out.token_ids
    got = got_input[1:] + got_output
    assert len(got) == len(expected)
    worst = max(abs(a - b) for a, b in zip(got, expected))
    assert worst < LOGPROB_TOLERANCE, f"largest logprob difference {worst:.2e}"


# ---- stop strings ------------------------------------------------------------------------------------


async def test_stop_strings_cut_the_greedy_answer_where_hf_text_has_them(engine, hf):
    for question in QUESTIONS[:4]:
        prompt = chat(engine.tokenizer, question)
        full = hf.tokenizer.decode(hf.greedy(prompt), skip_special_tokens=True)
        words = full.split()
        assert len(words) >= 3, full
        stop = " " + words[2]
        out = await run(engine, prompt, sampling=greedy(stop=[stop]))
        assert out.text == full[: full.index(stop)], (full, stop)
        assert out.finish_reason.type == "stop" and out.finish_reason.matched == stop
