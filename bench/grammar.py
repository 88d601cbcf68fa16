"""Constrained decoding with the random tiny model: does the output always parse, and at what cost?

Decodes many random JSON schemas (plus a few typical tool schemas), regexes and OpenAI json_object
requests with the tiny model (greedy and sampled), with budget-aware steering on and off, and
reports side by side: the share of outputs that parse/validate, how many requests were refused at
admission because max_new_tokens is below the grammar's shortest completion (422), how often the
steering invariant broke, grammar compile times, and the grammar time per token (mask + accept;
free zone vs steering zone). Failed runs are printed with their trace (remaining budget, witness
cost, witness, chosen token per step). Writes bench/results/grammar.md.

    .venv/bin/python -m bench.grammar [--schemas 80]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import torch
from tqdm import tqdm

from app.engines.embedded.grammar import GrammarCompiler
from app.protocol import JSON_OBJECT_GRAMMAR
from bench.common import machine
from app.engines.embedded.sampling import SequenceSampler, sample_next_tokens
from app.engines.tiny_model import ensure_tiny_model
from app.errors import ValidationError
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
TOOL_SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "location": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
        },
        "required": ["location", "unit"],
        "additionalProperties": False,
    },
    {
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
            "limit": {"type": "integer"},
        },
        "required": ["query", "filters"],
    },
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "age": {"type": "integer"},
            "email": {"type": "string"},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city"],
            },
        },
        "required": ["name", "age", "address"],
    },
    {
        "type": "object",
        "properties": {
            "answer": {"type": "boolean"},
            "confidence": {"type": "number"},
            "reasons": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        },
        "required": ["answer", "confidence", "reasons"],
    },
]


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


@dataclass
class Run:
    text: str = ""
    rejected: str | None = None  # the 422 message when admission refused the request
    invariant_breaks: int = 0
    trace: list[tuple[int, int | None, bytes | None, str]] = field(default_factory=list)


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
        self.mask_times: dict[str, list[float]] = {"free": [], "steered": []}

    def run(self, kind: str, spec: str, budget: int, mode: str, seed: int, steering: bool) -> Run:
        compiled = asyncio.run(self.compiler.compile(kind, spec))
        try:
            matcher = self.compiler.new_matcher(compiled, budget, steering=steering)
        except ValidationError as error:
            return Run(rejected=error.message)
        params = SamplingParams(seed=seed, **MODES[mode])
        prompt = self.tokenizer.encode(f"Example {seed}: ", add_special_tokens=True)
        sampler = SequenceSampler(params, prompt, self.vocab_size, self.eos_ids)
        ids, past, out, run = torch.tensor([prompt]), None, [], Run()
        with torch.no_grad():
            for _ in range(budget):
                result = self.model(input_ids=ids, past_key_values=past, use_cache=True)
                past = result.past_key_values
                steered_before = matcher.steered_steps
                start = time.perf_counter()
                mask = matcher.allowed_token_mask()
                elapsed = time.perf_counter() - start
                token = sample_next_tokens(result.logits[:, -1], [sampler], mask[None], [0]).token_ids[0]
                witness = getattr(matcher, "_witness", None)
                run.trace.append((matcher.remaining_tokens, getattr(matcher, "witness_cost", None),
                                  witness, self.tokenizer.decode([token])))
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
        run.text = self.tokenizer.decode(out, skip_special_tokens=True)
        run.invariant_breaks = getattr(matcher, "invariant_breaks", 0)
        return run


def json_ok(text: str, schema: dict | None) -> bool:
    try:
        value = json.loads(text)
        if schema is None:
            return isinstance(value, dict)
        jsonschema.validate(value, schema)
        return True
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False


def quantiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    q = sorted(values)
    pick = lambda f: q[min(len(q) - 1, int(len(q) * f))]  # noqa: E731
    return f"{sum(q) / len(q):.3f} / {pick(0.5):.3f} / {pick(0.99):.3f}"


def describe_failure(family: str, mode: str, spec: str, run: Run) -> list[str]:
    lines = [f"### {family} ({mode})", "", f"spec: `{spec}`", "", f"output: `{run.text}`", "",
             "| tokens left | witness cost | witness | chosen |", "|---|---|---|---|"]
    for left, cost, witness, token in run.trace:
        shown = witness.decode(errors="replace") if witness is not None else "?"
        lines.append(f"| {left} | {cost} | `{shown[:80]}` | `{token}` |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schemas", type=int, default=80)
    parser.add_argument("--out", default="bench/results/grammar.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    machine_line = machine()  # load average at the start, before our own work
    decoder = Decoder()
    rng = random.Random(0)
    schemas = [random_schema(rng) for _ in range(args.schemas)] + TOOL_SCHEMAS

    # Compile times (each spec once, uncached; includes the start-witness search).
    compile_ms: dict[str, list[float]] = {"json_schema": [], "regex": [], "ebnf": []}
    min_tokens: list[int | None] = []
    for schema in schemas:
        compiled = asyncio.run(decoder.compiler.compile("json_schema", json.dumps(schema)))
        compile_ms["json_schema"].append(compiled.compile_time_s * 1e3)
        min_tokens.append(getattr(compiled, "min_completion_tokens", None))
    for pattern in REGEXES:
        compile_ms["regex"].append(asyncio.run(decoder.compiler.compile("regex", pattern)).compile_time_s * 1e3)
    compile_ms["ebnf"].append(
        asyncio.run(decoder.compiler.compile("ebnf", JSON_OBJECT_GRAMMAR)).compile_time_s * 1e3
    )

    cases = []  # (family, kind, spec, budget, checker)
    for schema in schemas:
        cases.append(("json_schema, budget 64", "json_schema", json.dumps(schema), 64,
                      lambda t, s=schema: json_ok(t, s)))
    for schema in schemas[: len(schemas) // 2]:
        cases.append(("json_schema, budget 32", "json_schema", json.dumps(schema), 32,
                      lambda t, s=schema: json_ok(t, s)))
    for pattern in REGEXES:
        for _ in range(3):
            cases.append(("regex, budget 24", "regex", pattern, 24,
                          lambda t, p=pattern: re.fullmatch(p, t) is not None))
    for _ in range(10):
        cases.append(("json_object, budget 48", "ebnf", JSON_OBJECT_GRAMMAR, 48,
                      lambda t: json_ok(t, None)))

    # (family, mode, steering) -> list of (admitted, valid, breaks)
    results: dict[tuple[str, str, bool], list[tuple[bool, bool, int]]] = {}
    examples: list[str] = []
    failures: list[str] = []
    failed_runs = 0
    runs = [(c, m, s) for c in cases for m in MODES for s in (True, False)]
    for index, ((family, kind, spec, budget, ok), mode, steering) in enumerate(tqdm(runs)):
        run = decoder.run(kind, spec, budget, mode, seed=index, steering=steering)
        admitted = run.rejected is None
        valid = admitted and ok(run.text)
        results.setdefault((family, mode, steering), []).append((admitted, valid, run.invariant_breaks))
        if steering and admitted and not valid:
            failed_runs += 1
            print("\n".join(describe_failure(family, mode, spec, run)))
            if failed_runs <= 6:  # the first few, with their traces, go into the results file
                failures += describe_failure(family, mode, spec, run)
        if steering and admitted and len(examples) < 8 and index % 7 == 0:
            examples.append(f"{family} ({mode}): `{run.text}`")

    json_costs = [c for c in min_tokens if c is not None]
    lines = [
        "# Constrained decoding with the random tiny model",
        "",
        f"Machine: {machine_line} (shared with other work); 1 torch thread; tiny Llama "
        f"(vocab {decoder.vocab_size}).",
        f"Command: `.venv/bin/python -m bench.grammar --schemas {args.schemas}` "
        f"({args.schemas} random schemas + {len(TOOL_SCHEMAS)} tool-like schemas).",
        "",
        "Shortest completion found per JSON schema (tokens, = the least max_new_tokens admitted): "
        + (
            f"min {min(json_costs)}, median {sorted(json_costs)[len(json_costs) // 2]}, "
            f"max {max(json_costs)}; over 64: {sum(c > 64 for c in json_costs)}, "
            f"over 32: {sum(c > 32 for c in json_costs)}."
            if json_costs else "not computed by this version."
        ),
        "",
        "## Outputs that parse / validate",
        "",
        "Steering on: requests whose budget is below the shortest completion are refused at "
        "admission (422); valid = share of the admitted ones. Steering off admits everything.",
        "",
        "| case | mode | runs | steering on: refused (422) | on: valid of admitted | "
        "on: invariant breaks | steering off: valid |",
        "|---|---|---|---|---|---|---|",
    ]
    for family in dict.fromkeys(c[0] for c in cases):
        for mode in MODES:
            on = results[(family, mode, True)]
            off = results[(family, mode, False)]
            admitted = [r for r in on if r[0]]
            lines.append(
                f"| {family} | {mode} | {len(on)} | {len(on) - len(admitted)} | "
                f"{sum(r[1] for r in admitted) / max(1, len(admitted)):.0%} "
                f"({sum(r[1] for r in admitted)}/{len(admitted)}) | {sum(r[2] for r in on)} | "
                f"{sum(r[1] for r in off) / len(off):.0%} |"
            )

    lines += ["", "## Grammar compile time (ms: mean / p50 / p99)", "",
              "| kind | specs | ms |", "|---|---|---|"]
    for kind, values in compile_ms.items():
        lines.append(f"| {kind} | {len(values)} | {quantiles(values)} |")
    free = [t * 1e3 for t in decoder.mask_times["free"]]
    steered = [t * 1e3 for t in decoder.mask_times["steered"]]
    lines += ["", "## Grammar time per token: mask + accept (ms: mean / p50 / p99), steering on", "",
              "| zone | tokens | ms |", "|---|---|---|",
              f"| all | {len(free) + len(steered)} | {quantiles(free + steered)} |",
              f"| free (plain grammar mask, witness upkeep) | {len(free)} | {quantiles(free)} |",
              f"| steering | {len(steered)} | {quantiles(steered)} |"]
    lines += ["", "## Sample outputs (steering on)", ""] + [f"- {e}" for e in examples]
    lines += ["", "## Failed runs with steering on (admitted but invalid)", ""]
    lines += failures or ["None."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
