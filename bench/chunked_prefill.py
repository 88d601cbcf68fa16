"""Chunked prefill: inter-token latency of running decode streams while a long prompt arrives,
with chunked prefill (small chunks interleaved with the decodes) vs one big prefill.

    .venv/bin/python -m bench.chunked_prefill [--threads 2] [--streams 8] [--long-tokens 3000]

Writes bench/results/chunked_prefill.md and .png.
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
from bench.engine_batching import machine, make_prompts

RESULTS = Path(__file__).parent / "results"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(chunk: int, args: argparse.Namespace) -> dict[str, float]:
    engine = EmbeddedEngine(ModelSettings(), EngineSettings(
        torch_threads=args.threads, chunked_prefill_size=chunk, max_prefill_tokens=8192,
        disable_radix_cache=True))
    await engine.start()
    vocab = engine.model_info().vocab_size
    shorts = make_prompts(args.streams, 32, vocab, seed=1)
    long_prompt = make_prompts(1, args.long_tokens, vocab, seed=2)[0]
    arrivals: list[list[float]] = [[] for _ in shorts]
    decode = SamplingParams(max_new_tokens=600, temperature=0.0, ignore_eos=True)
    long_done = asyncio.Event()

    async def stream(i: int) -> None:
        async for _ in engine.generate(GenerateRequest(input_ids=shorts[i], sampling=decode)):
            arrivals[i].append(time.perf_counter())
            if long_done.is_set():
                break

    tasks = [asyncio.create_task(stream(i)) for i in range(len(shorts))]
    await asyncio.sleep(1.0)  # the streams are decoding steadily
    t_arrive = time.perf_counter()
    first = None
    async for _ in engine.generate(GenerateRequest(
            input_ids=long_prompt, sampling=SamplingParams(max_new_tokens=1, temperature=0.0))):
        first = time.perf_counter()
    await asyncio.sleep(0.3)
    long_done.set()
    await asyncio.gather(*tasks)
    await engine.shutdown()
    assert first is not None
    gaps = [b - a for times in arrivals for a, b in zip(times, times[1:])
            if a >= t_arrive - 0.05 and b <= first + 0.3]
    return {
        "itl_p50_ms": statistics.median(gaps) * 1000,
        "itl_p99_ms": percentile(gaps, 0.99) * 1000,
        "itl_max_ms": max(gaps) * 1000,
        "long_ttft_ms": (first - t_arrive) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)  # 2 threads thrash on a shared, loaded 2-core host
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--long-tokens", type=int, default=3000)
    parser.add_argument("--chunk", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    described = machine()
    configs = {f"chunked ({args.chunk}-token chunks)": args.chunk, "not chunked": 8192}
    results = {name: asyncio.run(measure(chunk, args))
               for name, chunk in tqdm(configs.items(), desc="configurations")}
    chunked, whole = results[f"chunked ({args.chunk}-token chunks)"], results["not chunked"]
    md = "\n".join([
        "# Embedded engine: chunked prefill",
        "",
        f"Machine: {described}. torch threads: {args.threads}.",
        f"Workload: {args.streams} streams decoding (32-token prompts, greedy); then a "
        f"{args.long_tokens}-token prompt arrives. ITL = gap between consecutive streamed "
        "increments of the running streams, from the long prompt's arrival until 0.3 s after "
        "its first token. Radix cache off.",
        "",
        "| setup | ITL p50 (ms) | ITL p99 (ms) | ITL max (ms) | long prompt TTFT (ms) |",
        "|---|---:|---:|---:|---:|",
        *[f"| {k} | {v['itl_p50_ms']:.1f} | {v['itl_p99_ms']:.1f} | {v['itl_max_ms']:.1f} | "
          f"{v['long_ttft_ms']:.0f} |" for k, v in results.items()],
        "",
        f"ITL p99 is {whole['itl_p99_ms'] / chunked['itl_p99_ms']:.1f}x lower with chunking; the "
        f"long prompt's TTFT changes {chunked['long_ttft_ms'] / whole['long_ttft_ms']:.2f}x.",
        "Reproduce: `.venv/bin/python -m bench.chunked_prefill`.",
        "",
    ])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "chunked_prefill.md").write_text(md)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(results)
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [results[n]["itl_p50_ms"] for n in names], 0.4, label="ITL p50")
    ax.bar([i + 0.2 for i in x], [results[n]["itl_p99_ms"] for n in names], 0.4, label="ITL p99")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("ms")
    ax.set_title(f"Decode ITL while a {args.long_tokens}-token prompt arrives")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "chunked_prefill.png", dpi=120)
    print(md)


if __name__ == "__main__":
    main()
