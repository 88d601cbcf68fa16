"""What metrics and request logs cost: throughput with observability on vs off, in one run.

Two identical sglserve applications run side by side in one Ray cluster (the tiny model, one
replica each): `/on` with metrics and one JSON log line per request (sample rate 1.0), `/off` with
`observability.metrics_enabled=false, request_log=false`. Each round loads BOTH at the same time
with the same number of closed-loop clients sending non-streaming completions (fixed length,
ignore_eos), so drift from other work on a shared machine hits both sides alike, and CPU spent on
observability shows as lower throughput of the `on` side. Reported: requests/s and tokens/s per
side, the on/off throughput ratio per round (mean and 95% interval), CPU per request of each
application's replica processes, and the CPU of the per-request observability calls in-process.

    .venv/bin/python bench/metrics_overhead.py [--rounds 8] [--round-s 12] [--concurrency 8]

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


def app_cpu_s(app_name: str) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each Serve replica process of one application,
    by deployment: Ray titles them `ray::ServeReplica:<app>:<deployment>`. The shared HTTP proxy
    is not counted (observability adds nothing there)."""
    import psutil

    prefix = f"ray::ServeReplica:{app_name}:"
    by_deployment: dict[str, float] = {}
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith(prefix):
            deployment = cmdline[len(prefix):].split()[0].split(".")[0]
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            by_deployment[deployment] = by_deployment.get(deployment, 0.0) + times.user + times.system
    return by_deployment


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
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--round-s", type=float, default=12.0)
    parser.add_argument("--concurrency", type=int, default=8, help="clients per side")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--a-a", action="store_true",
                        help="control run: both sides with observability OFF (measures the set-up's own asymmetry)")
    args = parser.parse_args()
    if args.a_a:
        SIDES["on"] = dict(SIDES["off"])

    import ray
    from ray import serve

    port = start_cluster()
    try:
        for side in SIDES:  # warm both (tokenizer caches, first batches)
            asyncio.run(load_round(f"http://127.0.0.1:{port}/{side}", args.concurrency, 3.0, args.max_tokens, -1))
        runs: dict[str, list[tuple[int, int, list[float]]]] = {side: [] for side in SIDES}
        cpu_ms_per_request: dict[str, list[float]] = {side: [] for side in SIDES}
        cpu_by_deployment: dict[str, dict[str, float]] = {side: {} for side in SIDES}  # ms, summed

        async def both(n: int) -> list[tuple[int, int, list[float]]]:
            return await asyncio.gather(*(
                load_round(f"http://127.0.0.1:{port}/{side}", args.concurrency, args.round_s, args.max_tokens, n)
                for side in SIDES))

        for n in tqdm(range(args.rounds), desc="rounds (on and off side by side)"):
            cpu_before = {side: app_cpu_s(f"bench_{side}") for side in SIDES}
            for side, run in zip(SIDES, asyncio.run(both(n))):
                runs[side].append(run)
                after = app_cpu_s(f"bench_{side}")
                used = {d: after[d] - cpu_before[side].get(d, 0.0) for d in after}
                cpu_ms_per_request[side].append(sum(used.values()) / run[0] * 1000)
                for d, seconds in used.items():
                    cpu_by_deployment[side][d] = cpu_by_deployment[side].get(d, 0.0) + seconds * 1000
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
    pairs = [a / b for a, b in zip(summary["on"]["req_s"], summary["off"]["req_s"])]
    ratio = statistics.mean(pairs)
    spread = 1.96 * statistics.stdev(pairs) / len(pairs) ** 0.5 if len(pairs) > 1 else float("nan")

    lines = [
        "# Observability overhead: metrics + request logs on vs off",
        "",
        f"Generated by `bench/metrics_overhead.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Machine: {os.cpu_count()} CPU cores (shared with other work), {platform.machine()}, Python "
        f"{platform.python_version()}, Ray {ray.__version__}, no GPU. Tiny model, embedded engine, one replica per app.",
        f"Load: {args.concurrency} closed-loop clients PER SIDE, both sides at the same time (so drift "
        f"from other work on the machine hits both alike), non-streaming /v1/completions, {args.max_tokens} "
        f"tokens (ignore_eos), {args.rounds} rounds of {args.round_s:g} s.",
        "",
        "| side | req/s per round | median req/s | median tok/s | p50 latency ms | p99 latency ms | CPU ms per request (app's replicas), median |",
        "|---|---|---|---|---|---|---|",
    ]
    for side, s in summary.items():
        lines.append(
            f"| {side} | {', '.join(f'{x:.1f}' for x in s['req_s'])} | {statistics.median(s['req_s']):.1f} | "
            f"{statistics.median(s['tok_s']):.0f} | {s['p50_ms']:.0f} | {s['p99_ms']:.0f} | "
            f"{statistics.median(cpu_ms_per_request[side]):.2f} |"
        )
    cpu_on, cpu_off = (statistics.median(cpu_ms_per_request[side]) for side in ("on", "off"))
    requests = {side: sum(r[0] for r in runs[side]) for side in SIDES}
    lines += ["", "CPU ms per request by deployment (all rounds):", "",
              "| side | " + " | ".join(sorted(cpu_by_deployment["on"])) + " |",
              "|---|" + "---|" * len(cpu_by_deployment["on"])]
    for side in SIDES:
        lines.append(f"| {side} | " + " | ".join(
            f"{cpu_by_deployment[side].get(d, 0.0) / requests[side]:.2f}" for d in sorted(cpu_by_deployment["on"])) + " |")
    lines += [
        "",
        f"**Throughput with observability on / off: {ratio:.3f} ± {spread:.3f}** (mean over rounds ± 95% "
        f"interval; cost {100 * (1 - ratio):+.1f}%; per round: {', '.join(f'{p:.3f}' for p in pairs)}).",
        "",
        f"CPU per request in the application's own replica processes (Ingress + Scheduler + ModelReplica, "
        f"measured with psutil around each round): **{cpu_on:.2f} ms on vs {cpu_off:.2f} ms off, ratio "
        f"{cpu_on / cpu_off:.3f}** (per round, on: {', '.join(f'{x:.2f}' for x in cpu_ms_per_request['on'])}; "
        f"off: {', '.join(f'{x:.2f}' for x in cpu_ms_per_request['off'])}).",
        "",
        f"CPU per request of the observability calls in the ingress alone (one sequence, 4 chunks, JSON log "
        f"line formatted and written to /dev/null; in-process, Ray's real metric objects): **{cpu['on']:.0f} us** "
        f"on vs {cpu['off']:.0f} us off, i.e. {100 * (cpu['on'] - cpu['off']) / 1000 / cpu_off:.2f}% of the "
        f"CPU a request costs here.",
        "",
        "Reading: the two applications share the machine's cores, so CPU that observability costs shows as "
        "lower throughput of the `on` side in the same round; the CPU accounting is the steadier measure.",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
