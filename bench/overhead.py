"""Framework overhead: the same engine and workload, called in process vs through the whole stack.

Side A ("engine"): an EmbeddedEngine in this process, requests submitted with asyncio.
Side B ("stack"): the same engine settings inside sglserve on Ray Serve, driven over HTTP
(streaming /v1/completions) through ingress -> scheduler -> replica.
Same prompts (token ids), same max_tokens with ignore_eos, greedy. Reported per concurrency:
TTFT p50/p99, output tokens/s, and the ratios. The engine runs with one torch thread on both
sides, so that on this 2-core machine the other core is what the framework has, as a GPU engine
leaves the CPU to the framework; the ratio then measures the framework, not CPU contention.

    python -m bench.overhead [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

from tqdm import tqdm

from bench.common import (
    MODEL,
    closed_loop,
    deploy_app,
    machine,
    percentile,
    start_ray_serve,
    stop_ray_serve,
    stream_completion,
    write_result,
)

CACHE_DIR = ".cache/models"
WARMUP = (4, 8)  # (concurrency, requests) run first on each side and not reported
ENGINE = {"kind": "embedded", "max_total_tokens": 32768, "torch_threads": 1, "max_running_requests": 64}


def make_prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(300, 1400) for _ in range(length)] for _ in range(n)]


async def run_engine_side(levels, prompts, max_tokens) -> dict[int, dict]:
    from app.config import EngineSettings, ModelSettings
    from app.engines.embedded import EmbeddedEngine
    from app.protocol import GenerateRequest, SamplingParams

    engine = EmbeddedEngine(ModelSettings(cache_dir=CACHE_DIR), EngineSettings(**ENGINE))
    await engine.start()

    async def one(ids: list[int]) -> tuple[float, int]:
        started = time.perf_counter()
        ttft, tokens = None, 0
        request = GenerateRequest(input_ids=ids, stream=True, sampling=SamplingParams(
            max_new_tokens=max_tokens, temperature=0, ignore_eos=True))
        async for out in engine.generate(request):
            if ttft is None and out.token_ids:
                ttft = time.perf_counter() - started
            tokens = out.completion_tokens
        return ttft, tokens

    try:
        return await run_levels(one, levels, prompts, "engine in process")
    finally:
        await engine.shutdown()


async def run_stack_side(base, levels, prompts, max_tokens) -> dict[int, dict]:
    import httpx

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def one(ids: list[int]) -> tuple[float, int]:
            t = await stream_completion(client, base, {"model": MODEL, "prompt": ids, "max_tokens": max_tokens,
                                                       "temperature": 0, "ignore_eos": True})
            return t.ttft_s, t.tokens

        return await run_levels(one, levels, prompts, "through the stack")


async def run_levels(one, levels, prompts, label: str) -> dict[int, dict]:
    """A warm-up round (not reported), then each (concurrency, requests) level. Each level has its
    own prompts, so the prefix cache does not favour later levels."""
    results = {}
    warm = make_prompts(WARMUP[1], len(next(iter(prompts.values()))[0]), seed=999)
    await closed_loop(lambda i: one(warm[i]), WARMUP[0], WARMUP[1])
    for level, count in tqdm(levels, desc=label):
        batch = prompts[level]
        outs, wall = await closed_loop(lambda i, batch=batch: one(batch[i % len(batch)]), level, count)
        results[level] = summarize(outs, wall)
    return results


def summarize(outs: list[tuple[float, int]], wall_s: float) -> dict:
    ttfts = [t for t, _ in outs]
    tokens = sum(n for _, n in outs)
    return {"ttft_p50_ms": percentile(ttfts, 50) * 1000, "ttft_p99_ms": percentile(ttfts, 99) * 1000,
            "tok_s": tokens / wall_s, "requests": len(outs), "tokens": tokens}


def report(engine: dict, stack: dict, max_tokens: int, prompt_len: int, scheduler: dict) -> str:
    lines = [
        "# Framework overhead: in-process engine vs the whole stack over HTTP",
        "",
        f"Machine: {machine()}",
        "",
        f"Workload: prompts of {prompt_len} random token ids, {max_tokens} output tokens each "
        "(ignore_eos, greedy), closed loop; the engine has 1 torch thread on both sides.",
        "Stack = HTTP (Serve proxy) -> Ingress -> Scheduler -> ModelReplica -> engine, streaming SSE; "
        f"scheduler settings: {scheduler}.",
        "",
        "| concurrency | engine TTFT p50 | stack TTFT p50 | added TTFT p50 | engine TTFT p99 | stack TTFT p99 "
        "| engine tok/s | stack tok/s | throughput ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for level in engine:
        e, s = engine[level], stack[level]
        lines.append(
            f"| {level} | {e['ttft_p50_ms']:.1f} ms | {s['ttft_p50_ms']:.1f} ms | "
            f"{s['ttft_p50_ms'] - e['ttft_p50_ms']:+.1f} ms | {e['ttft_p99_ms']:.1f} ms | {s['ttft_p99_ms']:.1f} ms | "
            f"{e['tok_s']:.0f} | {s['tok_s']:.0f} | {s['tok_s'] / e['tok_s']:.3f} |"
        )
    lines += ["", "Targets (issue 2): added TTFT p50 <= 5 ms at c=1; throughput ratio >= 0.95 at c=32.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (smoke run)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--stream-interval-ms", type=float, default=None, help="override the setting")
    parser.add_argument("--max-stream-interval-ms", type=float, default=None, help="override the setting")
    parser.add_argument("--name", default="overhead", help="results file name")
    args = parser.parse_args()
    scale = 0.25 if args.quick else 1.0
    levels = [(1, max(4, int(24 * scale))), (8, max(8, int(64 * scale))), (32, max(32, int(160 * scale)))]
    prompts = {level: make_prompts(count, args.prompt_len, seed=level) for level, count in levels}

    engine = asyncio.run(run_engine_side(levels, prompts, args.max_tokens))
    port = start_ray_serve()
    try:
        scheduler = {"max_concurrent": 256, "max_queue": 1024}
        if args.stream_interval_ms is not None:
            scheduler["stream_interval_ms"] = args.stream_interval_ms
        if args.max_stream_interval_ms is not None:
            scheduler["max_stream_interval_ms"] = args.max_stream_interval_ms
        args_app = {"model": {"cache_dir": CACHE_DIR}, "engine": ENGINE, "scheduler": scheduler}
        base = deploy_app(port, "overhead", args_app)
        stack = asyncio.run(run_stack_side(base, levels, prompts, args.max_tokens))
    finally:
        stop_ray_serve()
    text = report(engine, stack, args.max_tokens, args.prompt_len, scheduler)
    print(text)
    write_result(args.name, text)


if __name__ == "__main__":
    main()
