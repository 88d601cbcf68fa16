"""Where the CPU goes per streamed token: each Serve process's CPU seconds per 1,000 tokens.

One sglserve application (embedded engine, one replica, Ray Serve throughput mode) under a closed
loop of streaming /v1/completions at one concurrency. Before and after the load, the CPU time of
the Ingress, Scheduler and ModelReplica processes (and the replica's engine process) is read from
/proc (psutil), so each gets CPU seconds per 1,000 streamed tokens. Messages: the SSE events the
client received (each crossed every hop of the token path once), and the scheduler's own count of
the calls it served when it reports one (`token_path` in its stats).

    python -m bench.token_path [--concurrency 32] [--requests 192] [--label after] [--json runs.jsonl]
    python -m bench.token_path --report runs.jsonl      # runs side by side -> bench/results/token_path.md + png

A "before" run needs the code before the change on PYTHONPATH (e.g. a `git archive` of it), since
the Ray workers import `app` from there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import psutil

from bench.common import MODEL, deploy_app, machine, start_ray_serve, stop_ray_serve
from bench.overhead import CACHE_DIR, ENGINE, make_prompts

ROLES = ("Ingress", "Scheduler", "ModelReplica")


def serve_processes(app: str) -> dict[str, list[psutil.Process]]:
    """The worker processes of the app's deployments (Ray names them `ray::ServeReplica:app:Name`),
    and the replica's engine process (its child running app.engines.process)."""
    found: dict[str, list[psutil.Process]] = {role: [] for role in (*ROLES, "engine process")}
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        for role in ROLES:
            if f"ServeReplica:{app}:{role}" in cmd:
                found[role].append(proc)
                if role == "ModelReplica":
                    found["engine process"] += [c for c in proc.children(recursive=True)
                                                if "app.engines.process" in " ".join(c.cmdline())]
    return found


def cpu_seconds(procs: dict[str, list[psutil.Process]]) -> dict[str, float]:
    out = {}
    for role, ps in procs.items():
        total = 0.0
        for p in ps:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        out[role] = total
    return out


async def drive(base: str, concurrency: int, prompts: list[list[int]], max_tokens: int) -> tuple[int, int, float]:
    """Closed loop; returns (completion tokens, SSE events, wall seconds)."""
    import aiohttp

    tokens = events = 0
    queue = iter(prompts)
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def worker() -> None:
            nonlocal tokens, events
            for ids in queue:
                body = {"model": MODEL, "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                async with session.post(f"{base}/v1/completions", json=body) as resp:
                    resp.raise_for_status()
                    async for line in resp.content:
                        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                            continue
                        event = json.loads(line[6:])
                        if event.get("usage"):
                            tokens += event["usage"]["completion_tokens"]
                        elif event.get("choices"):
                            events += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return tokens, events, time.perf_counter() - started


def report(path: str, name: str = "token_path") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.common import RESULTS, write_result

    runs = [json.loads(line) for line in open(path) if line.strip()]
    roles = ("Ingress", "Scheduler", "ModelReplica", "engine process")
    lines = [
        "# CPU per streamed token in each process, before and after the ticket protocol",
        "",
        f"Machine: {runs[-1]['machine']}",
        "",
        "One sglserve application (embedded engine, one replica, Ray Serve throughput mode), a closed loop of "
        "streaming /v1/completions (prompts of 64 token ids, 64 output tokens, greedy); CPU seconds of each "
        "Serve process per 1,000 streamed tokens (psutil, user + system), over the measured load only. "
        "Short runs: the machine is shared by 8 developers (see the load average per run).",
        "",
        "CPU seconds per 1,000 streamed tokens, total (above the process's own idle burn, measured for "
        "a few seconds with no traffic just before):",
        "",
        "| run | c | load avg | tok/s | SSE events/s | " + " | ".join(f"{r}" for r in roles)
        + " | scheduler calls per request |",
        "|---|---|---|---|---|" + "---|" * len(roles) + "---|",
    ]
    for run in runs:
        calls = (run.get("scheduler") or {}).get("calls")
        per_request = f"{sum(calls.values()) / run['requests']:.2f}" if calls else "proxies every chunk"
        cpu = run["cpu_s_per_1k_tokens"]
        above = run.get("cpu_s_per_1k_tokens_above_idle", {})
        cells = [f"{cpu.get(r, 0):.3f} ({above[r]:.3f})" if r in above else f"{cpu.get(r, 0):.3f}" for r in roles]
        lines.append(f"| {run['label']} | {run['concurrency']} | {run['load_avg_1m']:.1f} | {run['tok_s']:.0f} | "
                     f"{run['events_per_s']:.0f} | " + " | ".join(cells) + f" | {per_request} |")
    lines += [
        "",
        "Per message instead of per token: the number of streamed chunks per token depends on the machine's "
        "speed (the replica coalesces by time), so CPU per SSE event (each crossed every hop of the token "
        "path once) compares runs on a drifting machine; the Scheduler's cost is per request now.",
        "",
        "| run | SSE events | Ingress ms CPU / event | Scheduler ms CPU / event | ModelReplica ms CPU / event "
        "| Scheduler ms CPU / request (above idle) | Scheduler share of the three processes' CPU (above idle) |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        total = {r: v * run["tokens"] / 1000 for r, v in run["cpu_s_per_1k_tokens"].items()}
        above = run.get("cpu_s_per_1k_tokens_above_idle", run["cpu_s_per_1k_tokens"])
        framework = sum(above[r] for r in ("Ingress", "Scheduler", "ModelReplica"))
        per_event = {r: total[r] * 1000 / max(1, run["sse_events"]) for r in total}
        lines.append(f"| {run['label']} | {run['sse_events']} | {per_event['Ingress']:.2f} | {per_event['Scheduler']:.2f} | "
                     f"{per_event['ModelReplica']:.2f} | {above['Scheduler'] * run['tokens'] / run['requests']:.2f} | "
                     f"{above['Scheduler'] / framework:.0%} |")
    lines += ["", "Idle burn (cores) per process: " + "; ".join(
        f"{run['label']}: " + ", ".join(f"{r} {run['idle_cores'][r]:.3f}" for r in roles)
        for run in runs if "idle_cores" in run) + "."]
    lines += ["", f"![CPU per 1,000 tokens]({name}.png)", ""]
    write_result(name, "\n".join(lines))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(runs)
    for k, run in enumerate(runs):
        per_token = run.get("cpu_s_per_1k_tokens_above_idle") or run["cpu_s_per_1k_tokens"]
        ax.bar([i + k * width for i in range(len(roles))], [per_token.get(r, 0) for r in roles],
               width, label=run["label"])
    ax.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(len(roles))], roles)
    ax.set_ylabel("CPU s per 1,000 streamed tokens (above idle)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", help="write bench/results/token_path.md from this JSON-lines file")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--label", default="run")
    parser.add_argument("--idle-s", type=float, default=8.0, help="seconds of no traffic measured first")
    parser.add_argument("--json", help="append the result as one JSON line to this file")
    args = parser.parse_args()
    if args.report:
        report(args.report)
        return
    port = start_ray_serve(throughput_optimized=True)
    try:
        settings = {"model": {"cache_dir": CACHE_DIR}, "engine": ENGINE,
                    "scheduler": {"max_concurrent": 256, "max_queue": 1024}}
        base = deploy_app(port, "tp", settings)
        procs = serve_processes("tp")
        asyncio.run(drive(base, 8, make_prompts(16, 64, seed=999), args.max_tokens))  # warm-up
        load = psutil.getloadavg()[0]
        # Idle first: each process burns some CPU with no traffic at all (Ray's core worker, long
        # polls, metrics export, health checks), which a per-token figure must not count.
        idle_from, idle_started = cpu_seconds(procs), time.perf_counter()
        time.sleep(args.idle_s)
        idle_to, idle_wall = cpu_seconds(procs), time.perf_counter() - idle_started
        idle_cores = {role: (idle_to[role] - idle_from[role]) / idle_wall for role in idle_to}
        before = cpu_seconds(procs)
        tokens, events, wall = asyncio.run(
            drive(base, args.concurrency, make_prompts(args.requests, 64, seed=1), args.max_tokens))
        after = cpu_seconds(procs)
        import httpx

        stats = httpx.get(f"{base}/server_info", timeout=60).json()["scheduler"]
    finally:
        stop_ray_serve()
    result = {
        "label": args.label, "machine": machine(), "load_avg_1m": load, "concurrency": args.concurrency,
        "requests": args.requests, "tokens": tokens, "sse_events": events, "wall_s": wall,
        "tok_s": tokens / wall, "events_per_s": events / wall,
        "cpu_s_per_1k_tokens": {role: (after[role] - before[role]) * 1000 / max(1, tokens) for role in after},
        "cpu_cores": {role: (after[role] - before[role]) / wall for role in after},
        "idle_cores": idle_cores,
        "cpu_s_per_1k_tokens_above_idle": {
            role: max(0.0, after[role] - before[role] - idle_cores[role] * wall) * 1000 / max(1, tokens) for role in after},
        "scheduler": {k: stats.get(k) for k in ("retries_total", "tickets", "calls")},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
