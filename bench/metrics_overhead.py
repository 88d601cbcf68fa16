"""What metrics and request logs cost: throughput with observability on vs off, in one run.

Two identical sglserve applications run side by side in one Ray cluster (the tiny model, one
replica each): `/on` with metrics and one JSON log line per request (sample rate 1.0), `/off` with
`observability.metrics_enabled=false, request_log=false`. Load alternates between them in short
rounds (on, off, on, off, ...) so drift on a shared machine hits both alike; each round runs a
fixed number of concurrent clients sending non-streaming completions (fixed length, ignore_eos)
for a fixed time. Reported: requests/s and tokens/s per side (median over rounds), their ratio, and
the CPU cost of the per-request observability calls measured in-process.

    .venv/bin/python bench/metrics_overhead.py [--rounds 4] [--round-s 15] [--concurrency 16]

Writes bench/results/metrics_overhead.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local benchmark cluster
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
from tqdm import tqdm  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results" / "metrics_overhead.md"
MODEL = "sglserve/tiny-llama"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_args(observability: dict) -> dict:
    return {
        "model": {"model_path": MODEL, "cache_dir": str(REPO / ".cache" / "models")},
        "engine": {"kind": "embedded", "max_total_tokens": 32768, "torch_threads": 1},
        "scheduler": {"max_queue": 256, "max_concurrent": 64},
        "ingress": {"default_max_tokens": 32},
        "observability": observability,
    }


SIDES = {
    "on": {"metrics_enabled": True, "request_log": True, "request_log_sample_rate": 1.0},
    "off": {"metrics_enabled": False, "request_log": False},
}


def start_cluster() -> int:
    import ray
    from ray import serve

    from app.config import AppSettings
    from app.deployments import build

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _metrics_export_port=free_port())
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    small = {"ray_actor_options": {"num_cpus": 0.1}}
    for side, observability in SIDES.items():
        options = {"Ingress": small, "Scheduler": small,
                   "ModelReplica": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}}
        app = build(AppSettings.from_args(app_args(observability)), options)
        serve.run(app, name=f"bench_{side}", route_prefix=f"/{side}", blocking=False)
    for side in SIDES:
        deadline = time.monotonic() + 240
        while httpx.get(f"http://127.0.0.1:{port}/{side}/ready", timeout=60).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{side} did not become ready")
            time.sleep(1)
    return port


async def load_round(base: str, concurrency: int, seconds: float, max_tokens: int, seed: int) -> tuple[int, int, list[float]]:
    """(requests, completion tokens, latencies) from `concurrency` closed-loop clients."""
    done = tokens = 0
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def worker(w: int) -> None:
            nonlocal done, tokens
            i = 0
            while time.monotonic() < stop_at:
                started = time.monotonic()
                resp = await client.post(
                    f"{base}/v1/completions",
                    json={"model": MODEL, "prompt": f"Request {seed}-{w}-{i}: tell me a story",
                          "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
                )
                resp.raise_for_status()
                latencies.append(time.monotonic() - started)
                done += 1
                tokens += resp.json()["usage"]["completion_tokens"]
                i += 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return done, tokens, latencies


def per_request_cpu_us(iterations: int = 3000) -> dict[str, float]:
    """CPU time of the per-request observability calls (one sequence of 4 chunks), in-process,
    with Ray's real metric objects vs the no-op ones."""
    from app.logs import RequestLogPolicy, RequestTrace
    from app.metrics import IngressMetrics, ObservabilitySettings, SequenceRecord
    from app.protocol import FinishReason, GenerateOutput

    from app.logs import configure_json_logging

    configure_json_logging(stream=open(os.devnull, "w"))  # JSON formatting and a write, not a terminal
    results = {}
    for label, settings in (("on", ObservabilitySettings()), ("off", ObservabilitySettings(metrics_enabled=False, request_log=False))):
        metrics = IngressMetrics(MODEL, settings)
        policy = RequestLogPolicy.from_settings(settings)
        outs = [GenerateOutput(rid="r", token_ids=[1] * 4, prompt_tokens=12, completion_tokens=4 * (k + 1),
                               engine_arrival_time=time.time(), first_token_time=time.time(),
                               finished=k == 3, finish_reason=FinishReason(type="length") if k == 3 else None)
                for k in range(4)]
        started = time.process_time()
        for _ in range(iterations):
            trace = RequestTrace("id", "POST", "/v1/completions", time.time(), metrics, policy)
            seq = SequenceRecord(received_s=trace.received_s)
            for out in outs:
                itl = seq.on_output(out, time.time())
                if itl is not None:
                    metrics.observe_inter_token_latency(itl)
            metrics.record_sequence(seq)
            trace.add_sequence(seq)
            trace._complete(200, disconnected=False)
        results[label] = (time.process_time() - started) / iterations * 1e6
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds per side")
    parser.add_argument("--round-s", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    import ray
    from ray import serve

    port = start_cluster()
    try:
        for side in SIDES:  # warm both (tokenizer caches, first batches)
            asyncio.run(load_round(f"http://127.0.0.1:{port}/{side}", args.concurrency, 3.0, args.max_tokens, -1))
        runs: dict[str, list[tuple[int, int, list[float]]]] = {side: [] for side in SIDES}
        order = [side for r in range(args.rounds) for side in (("on", "off") if r % 2 == 0 else ("off", "on"))]
        for n, side in enumerate(tqdm(order, desc="rounds (on/off alternating)")):
            runs[side].append(asyncio.run(load_round(
                f"http://127.0.0.1:{port}/{side}", args.concurrency, args.round_s, args.max_tokens, n)))
        cpu = per_request_cpu_us()
    finally:
        serve.shutdown()
        ray.shutdown()

    def rate(run, index):
        return run[index] / args.round_s

    summary = {}
    for side, side_runs in runs.items():
        lat = sorted(x for r in side_runs for x in r[2])
        summary[side] = {
            "req_s": [rate(r, 0) for r in side_runs],
            "tok_s": [rate(r, 1) for r in side_runs],
            "p50_ms": lat[len(lat) // 2] * 1000,
            "p99_ms": lat[int(len(lat) * 0.99)] * 1000,
        }
    med = {side: statistics.median(s["req_s"]) for side, s in summary.items()}
    ratio = med["on"] / med["off"]
    pairs = [a / b for a, b in zip(summary["on"]["req_s"], summary["off"]["req_s"])]

    lines = [
        "# Observability overhead: metrics + request logs on vs off",
        "",
        f"Generated by `bench/metrics_overhead.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Machine: {os.cpu_count()} CPU cores (shared with other work), {platform.machine()}, Python "
        f"{platform.python_version()}, Ray {ray.__version__}, no GPU. Tiny model, embedded engine, one replica per app.",
        f"Load: {args.concurrency} closed-loop clients, non-streaming /v1/completions, {args.max_tokens} tokens "
        f"(ignore_eos), {args.rounds} rounds of {args.round_s:g} s per side, alternating on/off.",
        "",
        "| side | req/s per round | median req/s | median tok/s | p50 latency ms | p99 latency ms |",
        "|---|---|---|---|---|---|",
    ]
    for side, s in summary.items():
        lines.append(
            f"| {side} | {', '.join(f'{x:.1f}' for x in s['req_s'])} | {statistics.median(s['req_s']):.1f} | "
            f"{statistics.median(s['tok_s']):.0f} | {s['p50_ms']:.0f} | {s['p99_ms']:.0f} |"
        )
    lines += [
        "",
        f"**Throughput with observability on / off: {ratio:.3f}** (cost {100 * (1 - ratio):+.1f}%; "
        f"per adjacent round pair: {', '.join(f'{p:.3f}' for p in pairs)}).",
        "",
        f"CPU per request of the observability calls in the ingress (one sequence, 4 chunks; in-process, "
        f"Ray's real metric objects): **{cpu['on']:.0f} us** on vs {cpu['off']:.0f} us off.",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
