"""Constrained decoding with the random tiny model: does the output always parse, and at what cost?

Decodes many random JSON schemas, regexes and OpenAI json_object requests with the tiny model
(greedy and sampled), with budget-aware steering on and off, and reports side by side:
the share of outputs that parse/validate, grammar compile times, and the time spent producing
masks per token (free zone vs steering zone). Writes bench/results/grammar.md.

    .venv/bin/python -m bench.grammar [--schemas 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import statistics
import time
from pathlib import Path

import jsonschema
import torch
from tqdm import tqdm

from app.engines.embedded.grammar import JSON_OBJECT_GRAMMAR, GrammarCompiler
from app.engines.embedded.sampling import SequenceSampler, sample_next_tokens
from app.engines.tiny_model import ensure_tiny_model
from app.protocol import SamplingParams

REGEXES = [
    r"\(\d{3}\) \d{3}-\d{4}",
    r"\d{4}-\d{2}-\d{2}",
    r"-?\d+",
    r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)",
    r"(yes|no|maybe)",
    r"[A-Z][a-z]+ [A-Z][a-z]+",
]
MODES = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=1.0)}


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    leaves = [
        {"type": "string"},
        {"type": "integer"},
        {"type": "number"},
        {"type": "boolean"},
        {"enum": ["red", "green", "blue"]},
        {"type": "array", "items": {"type": "integer"}},
        {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        {"type": "string", "minLength": 3},
    ]
    properties = {}
    for i in range(rng.randint(1, 4)):
        if depth < 2 and rng.random() < 0.25:
            properties[f"obj{i}"] = random_schema(rng, depth + 1)
        else:
            properties[f"f{i}"] = rng.choice(leaves)
    required = [k for k in properties if rng.random() < 0.7]
    return {"type": "object", "properties": properties, "required": required}


class Decoder:
    def __init__(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = ensure_tiny_model(progress=False)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()
        self.vocab_size = self.model.config.vocab_size
        self.eos_ids = [self.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        self.compiler = GrammarCompiler(
            self.tokenizer, self.vocab_size, 65536, 10.0, stop_token_ids=self.eos_ids
        )
        self.mask_times = {"free": [], "steered": []}

    def run(self, kind: str, spec: str, budget: int, mode: str, seed: int, steering: bool) -> str:
        compiled = asyncio.run(self.compiler.compile(kind, spec))
        matcher = self.compiler.new_matcher(compiled, budget, steering=steering)
        params = SamplingParams(seed=seed, **MODES[mode])
        prompt = self.tokenizer.encode(f"Example {seed}: ", add_special_tokens=True)
        sampler = SequenceSampler(params, prompt, self.vocab_size, self.eos_ids)
        ids, past, out = torch.tensor([prompt]), None, []
        with torch.no_grad():
            for _ in range(budget):
                result = self.model(input_ids=ids, past_key_values=past, use_cache=True)
                past = result.past_key_values
                steered_before = matcher.steered_steps
                start = time.perf_counter()
                mask = matcher.allowed_token_mask()
                elapsed = time.perf_counter() - start
                token = sample_next_tokens(result.logits[:, -1], [sampler], mask[None], [0]).token_ids[0]
                start = time.perf_counter()
                assert matcher.accept_token(token)
                elapsed += time.perf_counter() - start
                if steering:
                    zone = "steered" if matcher.steered_steps > steered_before else "free"
                    self.mask_times[zone].append(elapsed)
                sampler.observe(token)
                out.append(token)
                if matcher.is_terminated():
                    break
                ids = torch.tensor([[token]])
        return self.tokenizer.decode(out, skip_special_tokens=True)


def json_ok(text: str, schema: dict | None) -> bool:
    try:
        value = json.loads(text)
        if schema is None:
            return isinstance(value, dict)
        jsonschema.validate(value, schema)
        return True
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schemas", type=int, default=40)
    parser.add_argument("--out", default="bench/results/grammar.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    decoder = Decoder()
    rng = random.Random(0)
    schemas = [random_schema(rng) for _ in range(args.schemas)]

    # Compile times (each spec once, uncached).
    compile_ms = {"json_schema": [], "regex": [], "ebnf": []}
    for schema in schemas:
        compile_ms["json_schema"].append(
            asyncio.run(decoder.compiler.compile("json_schema", json.dumps(schema))).compile_time_s * 1e3
        )
    for pattern in REGEXES:
        compile_ms["regex"].append(asyncio.run(decoder.compiler.compile("regex", pattern)).compile_time_s * 1e3)
    compile_ms["ebnf"].append(
        asyncio.run(decoder.compiler.compile("ebnf", JSON_OBJECT_GRAMMAR)).compile_time_s * 1e3
    )

    cases = []  # (family, kind, spec, budget, checker)
    for schema in schemas:
        cases.append(("json_schema, budget 64", "json_schema", json.dumps(schema), 64,
                      lambda t, s=schema: json_ok(t, s)))
    for schema in schemas[: args.schemas // 2]:
        cases.append(("json_schema, budget 32", "json_schema", json.dumps(schema), 32,
                      lambda t, s=schema: json_ok(t, s)))
    for pattern in REGEXES:
        for _ in range(3):
            cases.append(("regex, budget 24", "regex", pattern, 24,
                          lambda t, p=pattern: re.fullmatch(p, t) is not None))
    for _ in range(10):
        cases.append(("json_object, budget 48", "ebnf", JSON_OBJECT_GRAMMAR, 48,
                      lambda t: json_ok(t, None)))

    results: dict[tuple[str, str, bool], list[bool]] = {}
    examples: list[str] = []
    runs = [(c, m, s) for c in cases for m in MODES for s in (True, False)]
    for index, ((family, kind, spec, budget, ok), mode, steering) in enumerate(tqdm(runs)):
        text = decoder.run(kind, spec, budget, mode, seed=index, steering=steering)
        results.setdefault((family, mode, steering), []).append(ok(text))
        if steering and len(examples) < 8 and index % 7 == 0:
            examples.append(f"{family} ({mode}): `{text}`")

    lines = [
        "# Constrained decoding with the random tiny model",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(shared), torch {torch.__version__}, 1 thread; tiny Llama (vocab {decoder.vocab_size}).",
        f"Command: `.venv/bin/python -m bench.grammar --schemas {args.schemas}`",
        "",
        "## Outputs that parse / validate",
        "",
        "| case | mode | runs | steering on | steering off |",
        "|---|---|---|---|---|",
    ]
    for family in dict.fromkeys(c[0] for c in cases):
        for mode in MODES:
            on = results[(family, mode, True)]
            off = results[(family, mode, False)]
            lines.append(
                f"| {family} | {mode} | {len(on)} | {sum(on) / len(on):.0%} | {sum(off) / len(off):.0%} |"
            )

    def stats(values: list[float]) -> str:
        if not values:
            return "n/a"
        q = sorted(values)
        return f"{statistics.mean(q):.3f} / {q[len(q) // 2]:.3f} / {q[int(len(q) * 0.99) - 1]:.3f}"

    lines += ["", "## Grammar compile time (ms: mean / p50 / p99)", "",
              "| kind | specs | ms |", "|---|---|---|"]
    for kind, values in compile_ms.items():
        lines.append(f"| {kind} | {len(values)} | {stats(values)} |")
    free = [t * 1e3 for t in decoder.mask_times["free"]]
    steered = [t * 1e3 for t in decoder.mask_times["steered"]]
    lines += ["", "## Grammar time per token: mask + accept (ms: mean / p50 / p99), steering on", "",
              "| zone | tokens | ms |", "|---|---|---|",
              f"| free (plain grammar mask, witness upkeep) | {len(free)} | {stats(free)} |",
              f"| steering | {len(steered)} | {stats(steered)} |"]
    lines += ["", "## Sample outputs (steering on)", ""] + [f"- {e}" for e in examples]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
