#!/usr/bin/env python3
"""What sglserve's serving path costs on a GPU: bare `sglang.Engine` vs the same engine through
our adapter and the replica's stream coalescing, same process, same run, same workloads.

Paths (all drive ONE running sglang.Engine, in palindromic order A B .. B A so drift cancels;
see `Paths` for the variants measured beside these two):
- bare:  `sglang.Engine.async_generate(input_ids=..., stream=True)`, consumed chunk by chunk,
         as any asyncio user of SGLang would.
- ours:  `GenerateRequest` (validated) -> `SGLangEngine.generate` (increments from SGLang's
         cumulative stream, logprob/offset bookkeeping, abort on close) ->
         `app.streaming.coalesce` with the replica's settings (decoding_chunk_size,
         stream_interval_ms) -> consumer. That is everything a replica does per request except the
         Ray Serve hops, which cannot run on the device (no Ray there; its wheel exceeds the
         transfer budget); FACTS.md and bench/ measure those hops on CPU.

Workloads (Llama-3.1-8B-shaped model, dummy weights, token ids, no tokenizer):
1. offline throughput: N requests x (512 in, 256 out) submitted at once, ignore_eos.
2. single-request latency: 512 in / 128 out, streamed; TTFT and mean ITL per request.
3. shared prefix: 32 requests sharing a 2,048-token prefix (+32 own tokens) after one warm request.

Usage (on a GPU machine with sglang): python bench/gpu/bench_overhead.py --out DIR
Writes DIR/bench_results.json and DIR/results.md.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tqdm import tqdm  # noqa: E402

from app.config import AppSettings  # noqa: E402
from app.protocol import GenerateRequest, SamplingParams  # noqa: E402
from app.streaming import coalesce  # noqa: E402

LLAMA_8B_SHAPE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}
VOCAB_HI = 128000


def write_model_dir(path: Path) -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(LLAMA_8B_SHAPE, indent=1))
    return str(path)


def bench_settings(model_dir: str, max_running: int) -> AppSettings:
    return AppSettings.from_args(
        {
            "model": {"model_path": model_dir, "dtype": "bfloat16"},
            "engine": {
                "kind": "sglang",
                "load_format": "dummy",
                "mem_fraction_static": 0.85,
                "max_running_requests": max_running,
                "chunked_prefill_size": 8192,
                "max_prefill_tokens": 16384,
                "attention_backend": "triton",
                "sampling_backend": "pytorch",
                "grammar_backend": "none",
                # gc_warning_threshold_secs: SGLang logs any garbage collection pause above 50 ms.
                "sglang_extra_args": {"skip_tokenizer_init": True, "random_seed": 0,
                                      "gc_warning_threshold_secs": 0.05},
            },
        }
    )


class Paths:
    """The ways of running one request against the same engine; each returns its timings.

    bare     sglang.Engine.async_generate(stream=True), consumed chunk by chunk
    ours     GenerateRequest -> SGLangEngine.generate -> app.streaming.coalesce (the replica path)
    adapter  GenerateRequest -> SGLangEngine.generate, no coalescing (the adapter's own cost)
    si4      the adapter asking SGLang to coalesce (stream_interval=4: first token at once, then
             every 4) -> app.streaming.coalesce
    """

    VARIANTS = ("bare", "ours", "adapter", "si4")

    def __init__(self, engine: Any, settings: AppSettings):
        self.engine = engine
        self.sgl = engine.sgl
        self.chunk_tokens = settings.scheduler.decoding_chunk_size
        self.interval_s = settings.scheduler.stream_interval_ms / 1000.0
        # Same running sglang.Engine, second adapter object asking SGLang to coalesce.
        self.engine_si4 = copy.copy(engine)
        self.engine_si4.stream_interval = 4

    async def bare(self, ids: list[int], sp: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        first = last = None
        tokens = cached = chunks = 0
        stream = await self.sgl.async_generate(input_ids=ids, sampling_params=sp, stream=True)
        async for chunk in stream:
            now = time.perf_counter()
            n = len(chunk["output_ids"])  # cumulative
            if n and first is None:
                first = now
            if n > tokens:
                last = now
                tokens = n
            chunks += 1
            cached = chunk["meta_info"].get("cached_tokens", 0) or 0
        return {"t0": t0, "first": first, "last": last, "tokens": tokens, "chunks": chunks, "cached": cached}

    async def _consume(self, t0: float, stream: Any) -> dict[str, Any]:
        first = last = None
        tokens = cached = chunks = 0
        async for out in stream:
            now = time.perf_counter()
            if out.token_ids:
                if first is None:
                    first = now
                last = now
                tokens += len(out.token_ids)
            chunks += 1
            cached = out.cached_tokens
        return {"t0": t0, "first": first, "last": last, "tokens": tokens, "chunks": chunks, "cached": cached}

    def _request(self, ids: list[int], sp: dict[str, Any]) -> GenerateRequest:
        return GenerateRequest(input_ids=ids, sampling=SamplingParams(**sp), stream=True)

    async def ours(self, ids: list[int], sp: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        stream = coalesce(self.engine.generate(self._request(ids, sp)),
                          max_tokens=self.chunk_tokens, interval_s=self.interval_s)
        return await self._consume(t0, stream)

    async def adapter(self, ids: list[int], sp: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        return await self._consume(t0, self.engine.generate(self._request(ids, sp)))

    async def si4(self, ids: list[int], sp: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        stream = coalesce(self.engine_si4.generate(self._request(ids, sp)),
                          max_tokens=self.chunk_tokens, interval_s=self.interval_s)
        return await self._consume(t0, stream)


def rand_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, VOCAB_HI) for _ in range(n)]


async def run_batch(fn, prompts: list[list[int]], sp: dict[str, Any]) -> tuple[float, list[dict]]:
    t = time.perf_counter()
    results = await asyncio.gather(*(fn(p, sp) for p in prompts))
    return time.perf_counter() - t, results


def palindrome(names: tuple[str, ...]) -> list[str]:
    """A B C ... C B A: every variant runs twice, symmetric in time, so drift cancels in means."""
    return list(names) + list(reversed(names))


async def offline_throughput(paths: Paths, engine: Any, n: int, lin: int, lout: int) -> dict:
    rng = random.Random(7)
    sp = {"max_new_tokens": lout, "ignore_eos": True, "temperature": 0.0}
    runs: dict[str, list[dict]] = {name: [] for name in Paths.VARIANTS}
    for name in tqdm(palindrome(Paths.VARIANTS), desc="offline throughput", unit="run"):
        prompts = [rand_ids(rng, lin) for _ in range(n)]
        await engine.flush_cache()
        gc.collect()
        wall, results = await run_batch(getattr(paths, name), prompts, sp)
        out_tokens = sum(r["tokens"] for r in results)
        runs[name].append(
            {"wall_s": round(wall, 3), "output_tokens": out_tokens,
             "output_tok_s": round(out_tokens / wall, 1),
             "total_tok_s": round((out_tokens + n * lin) / wall, 1),
             "chunks_per_request": round(sum(r["chunks"] for r in results) / n, 1)}
        )
        tqdm.write(f"  {name}: {runs[name][-1]}")
    mean = {k: statistics.mean(r["output_tok_s"] for r in v) for k, v in runs.items()}
    return {"requests": n, "input_len": lin, "output_len": lout, "runs": runs,
            "mean_output_tok_s": {k: round(v, 1) for k, v in mean.items()},
            "ratio_over_bare": {k: round(v / mean["bare"], 4) for k, v in mean.items()}}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def single_latency(paths: Paths, reps: int, lin: int, lout: int) -> dict:
    rng = random.Random(9)
    sp = {"max_new_tokens": lout, "ignore_eos": True, "temperature": 0.0}
    names = ("bare", "ours", "si4")
    samples: dict[str, list[dict]] = {name: [] for name in names}
    order = [name for rep in range(reps) for name in (names if rep % 2 == 0 else names[::-1])]
    for name in tqdm(order, desc="single-request latency", unit="req"):
        r = await getattr(paths, name)(rand_ids(rng, lin), sp)
        ttft = (r["first"] - r["t0"]) * 1e3
        itl = (r["last"] - r["first"]) / (r["tokens"] - 1) * 1e3
        samples[name].append({"ttft_ms": round(ttft, 3), "mean_itl_ms": round(itl, 4),
                              "e2e_ms": round((r["last"] - r["t0"]) * 1e3, 2), "chunks": r["chunks"]})
    summary = {}
    for name, rows in samples.items():
        ttfts = [r["ttft_ms"] for r in rows]
        summary[name] = {
            "ttft_p50_ms": round(pct(ttfts, 0.5), 3), "ttft_p90_ms": round(pct(ttfts, 0.9), 3),
            "mean_itl_p50_ms": round(pct([r["mean_itl_ms"] for r in rows], 0.5), 4),
            "e2e_p50_ms": round(pct([r["e2e_ms"] for r in rows], 0.5), 2),
            "chunks_p50": pct([r["chunks"] for r in rows], 0.5),
        }
    bare = summary["bare"]
    return {"input_len": lin, "output_len": lout, "reps_per_path": reps, "samples": samples,
            "summary": summary,
            "added_ttft_p50_ms": {k: round(v["ttft_p50_ms"] - bare["ttft_p50_ms"], 3) for k, v in summary.items()},
            "e2e_ratio_over_bare": {k: round(v["e2e_p50_ms"] / bare["e2e_p50_ms"], 4) for k, v in summary.items()}}


async def shared_prefix(paths: Paths, engine: Any, prefix_len: int, n: int) -> dict:
    rng = random.Random(10)
    sp_warm = {"max_new_tokens": 1, "ignore_eos": True, "temperature": 0.0}
    sp = {"max_new_tokens": 16, "ignore_eos": True, "temperature": 0.0}
    runs: dict[str, list[dict]] = {"bare": [], "ours": []}
    for name in tqdm(palindrome(("bare", "ours")), desc="shared prefix", unit="run"):
        await engine.flush_cache()
        prefix = rand_ids(rng, prefix_len)
        fn = getattr(paths, name)
        await fn(prefix + rand_ids(rng, 32), sp_warm)
        wall, results = await run_batch(fn, [prefix + rand_ids(rng, 32) for _ in range(n)], sp)
        runs[name].append({"wall_s": round(wall, 4), "cached_tokens": sum(r["cached"] for r in results),
                           "prompt_tokens": n * (prefix_len + 32)})
    mean = {k: statistics.mean(r["wall_s"] for r in v) for k, v in runs.items()}
    return {"prefix_len": prefix_len, "requests": n, "runs": runs,
            "mean_wall_s": {k: round(v, 4) for k, v in mean.items()},
            "speed_ratio_ours_over_bare": round(mean["bare"] / mean["ours"], 4)}


def sh(cmd: str) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as exc:  # noqa: BLE001 - only for the description
        return f"<{exc}>"


def describe_device() -> dict[str, Any]:
    import torch

    import sglang

    return {
        "gpu": sh("nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader"),
        "cuda_runtime": torch.version.cuda,
        "torch": torch.__version__,
        "sglang": sglang.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
    }


LABELS = {
    "bare": "bare sglang.Engine",
    "ours": "sglserve replica path (adapter + app.streaming.coalesce)",
    "adapter": "adapter alone (no coalescing)",
    "si4": "adapter with SGLang stream_interval=4 + app.streaming.coalesce",
}


def markdown(res: dict[str, Any]) -> str:
    d, tp, lat, pre = res["device"], res["throughput"], res["latency"], res["shared_prefix"]
    lines = [
        "## Run " + res["started_utc"],
        "",
        f"Device: {d['gpu']}; CUDA runtime {d['cuda_runtime']}; torch {d['torch']}; sglang {d['sglang']}; "
        f"Python {d['python']}; {d['cpu_count']} CPU cores ({d['cpu'].strip()}).",
        f"Model: Llama-3.1-8B shape, bf16, dummy weights, token ids (no tokenizer); engine start "
        f"{res['engine_start_s']} s. Replica coalescing: max_tokens={res['coalesce']['max_tokens']}, "
        f"interval_s={res['coalesce']['interval_s']}. Engine settings: `{json.dumps(res['settings'])}`.",
        "",
        f"### Offline throughput: {tp['requests']} requests x ({tp['input_len']} in, {tp['output_len']} out), all at once",
        "",
        "| path | output tok/s (mean of 2, runs A..E E..A) | ratio to bare | chunks per request |",
        "|---|---|---|---|",
    ]
    for name in Paths.VARIANTS:
        runs = tp["runs"][name]
        each = ", ".join(f"{r['output_tok_s']:,}" for r in runs)
        lines.append(
            f"| {LABELS[name]} | {tp['mean_output_tok_s'][name]:,} ({each}) | "
            f"**{tp['ratio_over_bare'][name]:.3f}** | {runs[0]['chunks_per_request']} |"
        )
    lines += [
        "",
        f"### One request at a time: {lat['input_len']} in / {lat['output_len']} out, streamed, "
        f"{lat['reps_per_path']} requests per path (interleaved)",
        "",
        "| path | TTFT p50 (ms) | added TTFT p50 (ms) | TTFT p90 (ms) | mean ITL p50 (ms) | e2e p50 (ms) | chunks |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in lat["summary"].items():
        lines.append(
            f"| {LABELS[name]} | {row['ttft_p50_ms']:.2f} | **{lat['added_ttft_p50_ms'][name]:+.2f}** | "
            f"{row['ttft_p90_ms']:.2f} | {row['mean_itl_p50_ms']:.3f} | {row['e2e_p50_ms']:.1f} | {row['chunks_p50']:.0f} |"
        )
    lines += [
        "",
        f"### Shared prefix: {pre['requests']} requests on one {pre['prefix_len']}-token prefix (+32 own tokens, 16 out), after one warm request",
        "",
        "| path | wall (s, mean of 2) | prompt tokens served from cache |",
        "|---|---|---|",
    ]
    for name in ("bare", "ours"):
        lines.append(
            f"| {LABELS[name]} | {pre['mean_wall_s'][name]:.4f} | "
            f"{pre['runs'][name][0]['cached_tokens']:,} of {pre['runs'][name][0]['prompt_tokens']:,} |"
        )
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from app.engines.sglang_engine import SGLangEngine

    model_dir = write_model_dir(Path(args.model_dir))
    settings = bench_settings(model_dir, max_running=max(256, args.requests))
    engine = SGLangEngine.from_settings(settings)
    t = time.perf_counter()
    await engine.start()
    start_s = round(time.perf_counter() - t, 1)
    print(f"[bench] engine started in {start_s}s", flush=True)
    paths = Paths(engine, settings)
    res: dict[str, Any] = {
        "started_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": describe_device(), "engine_start_s": start_s,
        "settings": {k: v for k, v in engine.server_args().items() if not k.startswith("resolved_") and k != "model_path"},
        "resolved": {k: v for k, v in engine.server_args().items() if k.startswith("resolved_")},
        "coalesce": {"max_tokens": paths.chunk_tokens, "interval_s": paths.interval_s},
    }
    out = Path(args.out)

    def save() -> None:
        (out / "bench_results.json").write_text(json.dumps(res, indent=1, default=str))

    try:
        rng = random.Random(1)
        warm_sp = {"max_new_tokens": 32, "ignore_eos": True, "temperature": 0.0}
        for name in Paths.VARIANTS:  # JIT builds and graph warm-up stay out of the numbers
            await run_batch(getattr(paths, name), [rand_ids(rng, 512) for _ in range(8)], warm_sp)
        await run_batch(paths.bare, [rand_ids(rng, 512) for _ in range(args.requests)], warm_sp)
        res["throughput"] = await offline_throughput(paths, engine, args.requests, 512, 256)
        save()
        res["latency"] = await single_latency(paths, args.latency_reps, 512, 128)
        save()
        res["shared_prefix"] = await shared_prefix(paths, engine, 2048, 32)
        res["stats_after"] = engine.stats().model_dump()
        save()
        (out / "results.md").write_text(markdown(res))
    finally:
        save()
        await engine.shutdown()
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    parser.add_argument("--model-dir", default="/tmp/sglserve_llama8b_shape")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--latency-reps", type=int, default=8, help="requests per path")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    res = asyncio.run(main_async(args))
    print(markdown(res), flush=True)


if __name__ == "__main__":
    main()
