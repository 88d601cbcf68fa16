"""Radix prefix cache: a shared system prompt (>= 1k tokens) + 64 short user turns, one after the
other; time to first token with the cache vs without (same engine code, `disable_radix_cache`).

    .venv/bin/python -m bench.prefix_cache [--threads 2] [--system-tokens 1200] [--turns 64]

Writes bench/results/prefix_cache.md and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from app.config import EngineSettings, ModelSettings
from app.engines.embedded import EmbeddedEngine
from app.protocol import GenerateRequest, SamplingParams
from bench.engine_batching import machine

RESULTS = Path(__file__).parent / "results"
SYSTEM_TEXT = ("You are the support assistant of a small bakery. Rules: be polite, be brief, "
               "never invent prices, quote the menu exactly, answer in the customer's language. ")


async def measure(disable_cache: bool, system_ids: list[int], turns: list[list[int]],
                  threads: int) -> tuple[list[float], float]:
    engine = EmbeddedEngine(ModelSettings(), EngineSettings(
        torch_threads=threads, disable_radix_cache=disable_cache, chunked_prefill_size=4096))
    await engine.start()
    sampling = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    ttfts: list[float] = []
    label = "without cache" if disable_cache else "with cache"
    for turn in tqdm(turns, desc=label, leave=False):
        start = time.perf_counter()
        stream = engine.generate(GenerateRequest(input_ids=system_ids + turn, sampling=sampling))
        async for _ in stream:
            ttfts.append(time.perf_counter() - start)
            break
        await stream.aclose()
    stats = engine.stats()
    await engine.shutdown()
    return ttfts, stats.cache_hit_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)  # 2 threads thrash on a shared, loaded 2-core host
    parser.add_argument("--system-tokens", type=int, default=1200)
    parser.add_argument("--turns", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    described = machine()

    async def run() -> dict[str, tuple[list[float], float]]:
        probe = EmbeddedEngine(ModelSettings(), EngineSettings(torch_threads=args.threads))
        await probe.start()
        tok = probe.tokenizer
        system = tok.encode(SYSTEM_TEXT * 40)[:args.system_tokens]
        turns = [tok.encode(f"Customer {i}: do you have bread number {i * 7} today?",
                            add_special_tokens=False) for i in range(args.turns)]
        await probe.shutdown()
        return {
            "with cache": await measure(False, system, turns, args.threads),
            "without cache": await measure(True, system, turns, args.threads),
        }

    results = asyncio.run(run())
    p50 = {k: statistics.median(v[0]) * 1000 for k, v in results.items()}
    p90 = {k: statistics.quantiles(v[0], n=10)[-1] * 1000 for k, v in results.items()}
    ratio = p50["without cache"] / p50["with cache"]
    md = "\n".join([
        "# Embedded engine: radix prefix cache",
        "",
        f"Machine: {described}. torch threads: {args.threads}.",
        f"Workload: a {args.system_tokens}-token system prompt shared by {args.turns} short user "
        "turns (~15 tokens), sent one after the other; 4 new tokens each. TTFT = time from "
        "`generate()` to the first streamed token, in-process (no HTTP).",
        "",
        "| setup | TTFT p50 (ms) | TTFT p90 (ms) | cache hit rate |",
        "|---|---:|---:|---:|",
        *[f"| {k} | {p50[k]:.1f} | {p90[k]:.1f} | {results[k][1]:.1%} |" for k in results],
        "",
        f"TTFT p50 is **{ratio:.1f}x lower** with the cache (target >= 5x).",
        "Reproduce: `.venv/bin/python -m bench.prefix_cache`.",
        "",
    ])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prefix_cache.md").write_text(md)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, (ttfts, _) in results.items():
        ax.plot([t * 1000 for t in ttfts], marker=".", linestyle="-", label=label)
    ax.set_xlabel("user turn")
    ax.set_ylabel("TTFT (ms)")
    ax.set_yscale("log")
    ax.set_title(f"Shared {args.system_tokens}-token system prompt")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "prefix_cache.png", dpi=120)
    print(md)


if __name__ == "__main__":
    main()
