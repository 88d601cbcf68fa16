"""Framework overhead: the same engine and workload, called in process vs through the whole stack.

Side A ("engine"): an EmbeddedEngine in this process, requests submitted with asyncio.
Side B ("stack"): the same engine settings inside sglserve on Ray Serve, driven over HTTP
(streaming /v1/completions) through the ingress (a ticket from the scheduler, then tokens straight from the replica).
Both sides live in this process and alternate round by round at each level.
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
    RESULTS,
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
# With --device cuda, the replicas of all applications deployed share the one GPU.
GPU_SHARE = 0.25


def make_prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(300, 1400) for _ in range(length)] for _ in range(n)]


def engine_side(engine, max_tokens: int):
    """One request to the in-process engine: (TTFT s, completion tokens)."""
    from app.protocol import GenerateRequest, SamplingParams

    async def one(ids: list[int]) -> tuple[float, int]:
        started = time.perf_counter()
        ttft, tokens = None, 0
        request = GenerateRequest(input_ids=ids, stream=True, sampling=SamplingParams(
            max_new_tokens=max_tokens, temperature=0, ignore_eos=True))
        async for out in engine.generate(request):
            if ttft is None and out.text:  # as the stack side: the first text a user sees
                ttft = time.perf_counter() - started
            tokens = out.completion_tokens
        return ttft, tokens

    return one


def stack_side(session, base: str, max_tokens: int):
    """One streamed /v1/completions through the whole stack: (TTFT s, completion tokens)."""

    async def one(ids: list[int]) -> tuple[float, int]:
        t = await stream_completion(session, base, {"model": MODEL, "prompt": ids, "max_tokens": max_tokens,
                                                    "temperature": 0, "ignore_eos": True})
        return t.ttft_s, t.tokens

    return one


async def run_interleaved(bases: dict[str, str], levels, prompts, max_tokens: int, rounds: int,
                          device: str = "cpu") -> dict[str, dict]:
    """The in-process engine ("engine") and one HTTP side per entry of `bases` (name -> base URL),
    all in this process, alternating round by round at each level (the order rotates each round),
    so that all see the same machine (a shared 2-core VM drifts by tens of percent over minutes).
    Each round of a level uses its own prompts, the same on every side. Returns, per side, a
    summary per level."""
    import aiohttp

    from app.config import EngineSettings, ModelSettings
    from app.engines.embedded import EmbeddedEngine

    engine = EmbeddedEngine(ModelSettings(cache_dir=CACHE_DIR), EngineSettings(**{**ENGINE, "device": device}))
    await engine.start()
    connector = aiohttp.TCPConnector(limit=64)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
            sides = {"engine": engine_side(engine, max_tokens)}
            sides.update({name: stack_side(session, base, max_tokens) for name, base in bases.items()})
            names = list(sides)
            warm = make_prompts(WARMUP[1], len(next(iter(prompts.values()))[0]), seed=999)
            for one in sides.values():
                await closed_loop(lambda i, one=one: one(warm[i]), WARMUP[0], WARMUP[1])
            results: dict[str, dict[int, dict]] = {name: {} for name in names}
            steps = [(level, count, r) for level, count in levels for r in range(rounds)]
            for level, count, r in tqdm(steps, desc=f"rounds ({', '.join(names)})"):
                per_round = max(level, count // rounds)
                batch = prompts[level][r * per_round:(r + 1) * per_round] or prompts[level][:per_round]
                for side in names[r % len(names):] + names[:r % len(names)]:
                    outs, wall = await closed_loop(lambda i, b=batch, one=sides[side]: one(b[i]), level, len(batch))
                    acc = results[side].setdefault(level, {"outs": [], "wall": 0.0, "round_tok_s": []})
                    acc["outs"] += outs
                    acc["wall"] += wall
                    acc["round_tok_s"].append(sum(n for _, n in outs) / wall)
            return {name: {lv: summarize(a) for lv, a in per_level.items()} for name, per_level in results.items()}
    finally:
        await engine.shutdown()


def replica_options(device: str) -> dict:
    gpus = {"num_gpus": GPU_SHARE} if device == "cuda" else {}
    return {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5, **gpus}}


def summarize(acc: dict) -> dict:
    outs = acc["outs"]
    ttfts = [t for t, _ in outs]
    tokens = sum(n for _, n in outs)
    return {"ttft_p50_ms": percentile(ttfts, 50) * 1000, "ttft_p99_ms": percentile(ttfts, 99) * 1000,
            "tok_s": tokens / acc["wall"], "requests": len(outs), "tokens": tokens,
            "round_tok_s": acc["round_tok_s"]}


def report(engine: dict, stack: dict, args: argparse.Namespace, scheduler: dict) -> str:
    path = ("HTTP -> Ingress (serving HTTP itself: Ray Serve's throughput mode, direct ingress)"
            if args.ray_mode == "throughput" else "HTTP -> Serve proxy -> Ingress")
    lines = [
        "# Framework overhead: in-process engine vs the whole stack over HTTP",
        "",
        f"Machine: {machine()}",
        "",
        f"Workload: prompts of {args.prompt_len} random token ids, {args.max_tokens} output tokens each "
        f"(ignore_eos, greedy), closed loop; the engine runs on {args.device} with 1 torch thread on both sides.",
        f"Stack = {path} (ticket from the Scheduler) -> ModelReplica -> engine, streaming SSE; Ray mode `{args.ray_mode}`; "
        f"scheduler settings: {scheduler}.",
        f"Both sides run in one process, alternating in {args.rounds} rounds per level (engine first in even "
        "rounds, stack first in odd ones), so drift of the shared machine hits both alike.",
        "",
        "| concurrency | engine TTFT p50 | stack TTFT p50 | added TTFT p50 | engine TTFT p99 | stack TTFT p99 "
        "| engine tok/s | stack tok/s | throughput ratio | ratio per round |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level in engine:
        e, s = engine[level], stack[level]
        per_round = " ".join(f"{a / b:.2f}" for a, b in zip(s["round_tok_s"], e["round_tok_s"]))
        lines.append(
            f"| {level} | {e['ttft_p50_ms']:.1f} ms | {s['ttft_p50_ms']:.1f} ms | "
            f"{s['ttft_p50_ms'] - e['ttft_p50_ms']:+.1f} ms | {e['ttft_p99_ms']:.1f} ms | {s['ttft_p99_ms']:.1f} ms | "
            f"{e['tok_s']:.0f} | {s['tok_s']:.0f} | {s['tok_s'] / e['tok_s']:.3f} | {per_round} |"
        )
    lines += ["", "Targets (issue 2): added TTFT p50 <= 5 ms at c=1; throughput ratio >= 0.95 at c=32.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (smoke run)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4, help="alternations per level")
    parser.add_argument("--stream-interval-ms", type=float, default=None, help="override the setting")
    parser.add_argument("--max-stream-interval-ms", type=float, default=None, help="override the setting")
    parser.add_argument("--name", default="overhead", help="results file name")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the engine runs (both sides)")
    parser.add_argument("--ray-mode", choices=["default", "throughput"], default="throughput",
                        help="Ray Serve's default mode (HTTP proxy) or its throughput mode (direct ingress)")
    args = parser.parse_args()
    scale = 0.25 if args.quick else 1.0
    levels = [(1, max(4, int(24 * scale))), (8, max(32, int(96 * scale))), (32, max(128, int(384 * scale)))]
    prompts = {level: make_prompts(count, args.prompt_len, seed=level) for level, count in levels}

    port = start_ray_serve(throughput_optimized=args.ray_mode == "throughput")
    try:
        scheduler = {"max_concurrent": 256, "max_queue": 1024}
        if args.stream_interval_ms is not None:
            scheduler["stream_interval_ms"] = args.stream_interval_ms
        if args.max_stream_interval_ms is not None:
            scheduler["max_stream_interval_ms"] = args.max_stream_interval_ms
        args_app = {"model": {"cache_dir": CACHE_DIR}, "engine": {**ENGINE, "device": args.device}, "scheduler": scheduler}
        base = deploy_app(port, "overhead", args_app, replica_options=replica_options(args.device))
        results = asyncio.run(run_interleaved({"stack": base}, levels, prompts, args.max_tokens, args.rounds,
                                              args.device))
        engine, stack = results["engine"], results["stack"]
    finally:
        stop_ray_serve()
    text = report(engine, stack, args, scheduler)
    print(text)
    write_result(args.name, text)
    plot(engine, stack, args)


def plot(engine: dict, stack: dict, args: argparse.Namespace) -> None:
    """Tokens/s side by side and the ratio, per concurrency: bench/results/<name>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(engine)
    x = range(len(levels))
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.bar([i - 0.2 for i in x], [engine[lv]["tok_s"] for lv in levels], 0.4, label="engine in process")
    left.bar([i + 0.2 for i in x], [stack[lv]["tok_s"] for lv in levels], 0.4, label="whole stack over HTTP")
    left.set_xticks(list(x), [str(lv) for lv in levels])
    left.set_xlabel("concurrent requests")
    left.set_ylabel("output tokens/s")
    left.legend(fontsize=8)
    ratios = [stack[lv]["tok_s"] / engine[lv]["tok_s"] for lv in levels]
    right.bar(list(x), ratios, 0.5, color="tab:green")
    right.axhline(0.95, color="tab:red", linestyle="--", label="target at c=32")
    right.set_xticks(list(x), [str(lv) for lv in levels])
    right.set_ylim(0, 1.1)
    right.set_xlabel("concurrent requests")
    right.set_ylabel("throughput ratio (stack / engine)")
    right.legend(fontsize=8)
    fig.suptitle(f"Framework overhead ({args.max_tokens} output tokens, Ray mode {args.ray_mode}, 2-core CPU)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.name}.png", dpi=110)


if __name__ == "__main__":
    main()
