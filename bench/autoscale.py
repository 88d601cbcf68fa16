"""Autoscaling end to end: a load step (low -> high -> low) against sglserve on a fake multi-node
Ray cluster whose GPU worker nodes Ray's autoscaler adds and removes.

    .venv/bin/python -m bench.autoscale            # the full run: timeline, plot, results file
    .venv/bin/python -m bench.autoscale --ci       # short (the CI test runs this), no files

What runs: bench/fake_cluster.py's private cluster (a head without GPUs, up to --max-nodes worker
nodes of {CPU: 1, GPU: 1} LOGICAL resources, added by Ray's autoscaler with the fake_multinode
provider); sglserve's three deployments, Ingress and Scheduler on the head, ModelReplica asking for
one GPU, so every replica beyond what the nodes hold makes the autoscaler add a node; replicas run
the SIMULATED engine (app/engines/simulated.py: a simulator with modelled prefill/decode times and a
modelled start-up time, no model). ModelReplica autoscales with app.autoscaling's policy.

The load: Poisson arrivals of streaming /v1/completions over real HTTP at the phase's rate. Every
second the timeline records offered load, completions, queue depth (engines' waiting requests +
the scheduler's admission queue), replicas (target = running + starting, and running), worker
nodes alive, TTFT p50/p95 of the first tokens that second, refusals (503/429) and failures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.common import RESULTS, free_port, machine, percentile
from bench.fake_cluster import FakeCluster, ray_processes

APP = "sglserve"
TTFT_SLO_MS = 1500.0

# One replica of the simulator: a mid-size model on one GPU, made slow enough that a few
# requests per second fill it (this machine's 2 cores carry the HTTP side of every request):
# 40 us per prompt token, decode step 30 ms + 2 ms per running request, batch of 4, 3 s to load.
SIM_COSTS = {
    "prefill_s_per_token": 40e-6,
    "decode_step_base_s": 0.030,
    "decode_step_per_request_s": 0.002,
    "max_running_requests": 4,
    "startup_s": 3.0,
}
PROMPT_CHARS = 200
MAX_TOKENS = 32


@dataclass
class Phase:
    name: str
    rate_rps: float
    duration_s: float


@dataclass
class Plan:
    phases: list[Phase]
    max_nodes: int
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 15.0
    idle_timeout_s: float = 10.0
    settle_s: float = 90.0  # after the load: wait (at most) for replicas and nodes to come back down


FULL = Plan([Phase("low", 1.0, 30), Phase("high", 7.0, 90), Phase("low", 1.0, 60)], max_nodes=4, settle_s=120)
CI = Plan([Phase("low", 0.5, 10), Phase("high", 5.0, 35), Phase("low", 0.5, 15)], max_nodes=3,
          downscale_delay_s=10.0, idle_timeout_s=5.0, settle_s=90)


def serve_args() -> dict:
    return {
        # The Ingress tokenizes with the tiny model's tokenizer (built locally); the simulator runs no model.
        "model": {"model_path": "sglserve/tiny-llama", "served_model_name": "simulated-llm"},
        "engine": {"kind": "simulated", "max_running_requests": SIM_COSTS["max_running_requests"],
                   "simulated_costs": SIM_COSTS},
        # No adaptive in-flight limit: requests go on to the replicas' engines, where the policy
        # sees them waiting; the admission queue only bounds overload (docs/autoscaling.md).
        "scheduler": {"max_queue": 512, "max_concurrent": 512, "max_queue_wait_s": 60,
                      "adaptive_concurrency": False, "slo_ttft_ms": TTFT_SLO_MS, "stream_interval_ms": 200},
        "ingress": {"default_max_tokens": MAX_TOKENS, "ready_timeout_s": 60},
    }


def replica_options(plan: Plan) -> dict:
    return {
        "max_ongoing_requests": 64,
        "graceful_shutdown_timeout_s": 5,
        "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 1},
        "autoscaling_config": {
            "min_replicas": 1,
            "initial_replicas": 1,
            "max_replicas": plan.max_nodes,
            "target_ongoing_requests": SIM_COSTS["max_running_requests"],
            "metrics_interval_s": 1.0,
            "look_back_period_s": 3.0,
            "upscale_delay_s": plan.upscale_delay_s,
            "downscale_delay_s": plan.downscale_delay_s,
            "policy": {
                "policy_function": "app.autoscaling:ReplicaAutoscalingPolicy",
                "policy_kwargs": {"ttft_slo_ms": TTFT_SLO_MS, "startup_time_s": 10.0},
            },
        },
    }


# -- the stack on the fake cluster -------------------------------------------------------------------


def deploy(address: str, plan: Plan) -> str:
    import ray
    from ray import serve

    from app.config import AppSettings
    from app.deployments import build

    from app.engines.tiny_model import ensure_tiny_model

    ensure_tiny_model(progress=False)  # the Ingress's tokenizer: build it once, not in each Ingress
    ray.init(address=address, log_to_driver=False, configure_logging=False)
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    small = {"ray_actor_options": {"num_cpus": 0.1}}
    app = build(AppSettings.from_args(serve_args()),
                {"Ingress": small, "Scheduler": small, "ModelReplica": replica_options(plan)})
    serve.run(app, name=APP, route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, timeout_s=600)
    return base


def wait_ready(base: str, timeout_s: float) -> float:
    """Poll /ready (a real 1-token generation through every deployment); returns the seconds waited."""
    import httpx

    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        try:
            if httpx.get(f"{base}/ready", timeout=60).status_code == 200:
                return time.monotonic() - began
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{base} was not ready in {timeout_s:.0f} s")


# -- the load ------------------------------------------------------------------------------------------


@dataclass
class Second:
    t: int
    phase: str = ""
    offered: int = 0
    completed: int = 0
    refused: int = 0
    failed: int = 0
    ttfts: list[float] = field(default_factory=list)
    queue_depth: int | None = None
    replicas_target: int | None = None
    replicas_running: int | None = None
    nodes: int | None = None


class Timeline:
    def __init__(self) -> None:
        self.start = time.monotonic()
        self.seconds: dict[int, Second] = {}
        self.lock = threading.Lock()

    def at(self, when: float | None = None) -> Second:
        t = int((when if when is not None else time.monotonic()) - self.start)
        with self.lock:
            return self.seconds.setdefault(t, Second(t))

    def rows(self) -> list[dict]:
        out = []
        for t in range(0, max(self.seconds) + 1 if self.seconds else 0):
            s = self.seconds.get(t, Second(t))
            row = asdict(s)
            ttfts = row.pop("ttfts")
            row["ttft_p50_ms"] = 1000 * percentile(ttfts, 50) if ttfts else None
            row["ttft_p95_ms"] = 1000 * percentile(ttfts, 95) if ttfts else None
            out.append(row)
        return out


async def one_request(session, base: str, timeline: Timeline, rng: random.Random) -> None:
    import aiohttp

    prompt = "".join(rng.choice("abcdefghij ") for _ in range(PROMPT_CHARS))
    body = {"model": "simulated-llm", "prompt": prompt, "max_tokens": MAX_TOKENS, "stream": True}
    sent = time.monotonic()
    try:
        async with session.post(f"{base}/v1/completions", json=body) as resp:
            if resp.status in (429, 503):
                timeline.at().refused += 1
                return
            if resp.status != 200:
                timeline.at().failed += 1
                return
            first = None
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    timeline.at().failed += 1
                    return
                if first is None and event.get("choices") and event["choices"][0].get("text"):
                    first = time.monotonic()
                    timeline.at(first).ttfts.append(first - sent)
        timeline.at().completed += 1
    except (aiohttp.ClientError, asyncio.TimeoutError):
        timeline.at().failed += 1


async def offer_load(base: str, plan: Plan, timeline: Timeline, seed: int = 0) -> None:
    import aiohttp

    rng = random.Random(seed)
    tasks: set[asyncio.Task] = set()
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        for phase in plan.phases:
            end = time.monotonic() + phase.duration_s
            while True:
                now = time.monotonic()
                if now >= end:
                    break
                second = timeline.at(now)
                second.phase = phase.name
                second.offered += 1
                task = asyncio.create_task(one_request(session, base, timeline, rng))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(min(rng.expovariate(phase.rate_rps), max(0.0, end - time.monotonic())))
        await asyncio.gather(*tasks)


# -- sampling the cluster each second ---------------------------------------------------------------------


def sample_cluster(timeline: Timeline, stop: threading.Event) -> None:
    import ray
    from ray import serve

    scheduler = serve.get_deployment_handle("Scheduler", app_name=APP)
    while not stop.is_set():
        began = time.monotonic()
        second = timeline.at(began)
        try:  # a missed sample is a gap in the plot, not a failure
            status = serve.status().applications[APP].deployments["ModelReplica"].replica_states
            running = int(status.get("RUNNING", 0))
            second.replicas_running = running
            second.replicas_target = running + int(status.get("STARTING", 0)) + int(status.get("UPDATING", 0))
            second.nodes = sum(1 for n in ray.nodes() if n["Alive"]) - 1  # worker nodes (not the head)
        except Exception as exc:  # noqa: BLE001
            print(f"sample at {second.t}s failed: {exc!r}", file=sys.stderr)
        try:
            info = scheduler.server_info.remote().result(timeout_s=3)
            waiting = sum(s["num_waiting"] for s in info["internal_states"])
            second.queue_depth = waiting + info["scheduler"]["admission"]["queue_depth"]
        except Exception as exc:  # noqa: BLE001
            print(f"queue sample at {second.t}s failed: {exc!r}", file=sys.stderr)
        stop.wait(max(0.0, 1.0 - (time.monotonic() - began)))


def wait_settled(timeline: Timeline, plan: Plan) -> None:
    """After the load: keep sampling until one replica and no extra node remain (or settle_s)."""
    deadline = time.monotonic() + plan.settle_s
    while time.monotonic() < deadline:
        rows = timeline.rows()[-3:]
        if rows and all(r["replicas_target"] == 1 and r["nodes"] is not None and r["nodes"] <= 1 for r in rows):
            return
        time.sleep(1)


# -- analysis ------------------------------------------------------------------------------------------


def changes(values: list[int | None]) -> list[tuple[int, int]]:
    """(index, new value) where the series changes (gaps skipped)."""
    out, last = [], None
    for i, v in enumerate(values):
        if v is None:
            continue
        if last is not None and v != last:
            out.append((i, v))
        last = v
    return out


def analyse(rows: list[dict], plan: Plan) -> dict:
    targets = [r["replicas_target"] for r in rows]
    running = [r["replicas_running"] for r in rows]
    target_changes = changes(targets)
    previous = [next(t for t in targets if t is not None)] + [n for _, n in target_changes]
    directions = [1 if n > before else -1 for (_, n), before in zip(target_changes, previous)]
    reversals = sum(1 for a, b in zip(directions, directions[1:]) if a != b)
    # Start-up time of each raise: target reaches n -> running reaches n.
    startups = []
    for i, n in target_changes:
        if n > (targets[i - 1] or 0):
            done = next((j for j in range(i, len(rows)) if (running[j] or 0) >= n), None)
            if done is not None:
                startups.append(done - i)
    high_start = next(i for i, r in enumerate(rows) if r["phase"] == "high")
    high_end = max(i for i, r in enumerate(rows) if r["phase"] == "high")
    peak = max((t or 0) for t in targets[high_start:high_end + 1])
    reached_peak = next(i for i in range(high_start, high_end + 1) if (targets[i] or 0) == peak)
    nodes = [r["nodes"] for r in rows if r["nodes"] is not None]
    return {
        "requests": sum(r["offered"] for r in rows),
        "completed": sum(r["completed"] for r in rows),
        "refused": sum(r["refused"] for r in rows),
        "failed": sum(r["failed"] for r in rows),
        "replicas_min_max_end": (min(t for t in targets if t is not None), peak, targets[-1]),
        "nodes_start_max_end": (nodes[0], max(nodes), nodes[-1]),
        "target_changes": target_changes,
        "direction_reversals": reversals,
        "startup_s": startups,
        "lag_to_peak_s": reached_peak - high_start,
        "upscale_delay_s": plan.upscale_delay_s,
    }


# -- output ----------------------------------------------------------------------------------------------


def plot(rows: list[dict], plan: Plan, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] for r in rows]
    fig, axes = plt.subplots(4, 1, figsize=(11, 10), sharex=True)
    axes[0].plot(t, [r["offered"] for r in rows], label="offered (req/s)", color="tab:blue")
    axes[0].plot(t, [r["completed"] for r in rows], label="completed (req/s)", color="tab:green", alpha=0.7)
    axes[0].bar(t, [r["refused"] + r["failed"] for r in rows], label="refused + failed", color="tab:red")
    axes[1].step(t, [r["replicas_target"] for r in rows], where="post", label="replicas: target (running + starting)")
    axes[1].step(t, [r["replicas_running"] for r in rows], where="post", label="replicas: running")
    axes[1].step(t, [r["nodes"] for r in rows], where="post", label="GPU worker nodes alive", linestyle="--")
    axes[2].plot(t, [r["queue_depth"] for r in rows], label="queue depth (engines waiting + admission)", color="tab:purple")
    axes[3].plot(t, [r["ttft_p50_ms"] for r in rows], label="TTFT p50 (ms)", marker=".", linestyle="")
    axes[3].plot(t, [r["ttft_p95_ms"] for r in rows], label="TTFT p95 (ms)", marker=".", linestyle="")
    axes[3].axhline(TTFT_SLO_MS, color="tab:red", linestyle=":", label=f"TTFT SLO {TTFT_SLO_MS:.0f} ms")
    axes[3].set_yscale("log")
    edge = 0
    for phase in plan.phases:
        for ax in axes:
            ax.axvline(edge, color="grey", linewidth=0.5)
        axes[0].text(edge + 1, axes[0].get_ylim()[1] * 0.9 if edge else 0.5, f"{phase.name} {phase.rate_rps:g}/s", fontsize=8)
        edge += phase.duration_s
    for ax in axes:
        ax.legend(fontsize=8, loc="upper right")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("seconds since the load began")
    fig.suptitle("sglserve autoscaling on a fake multi-node Ray cluster (simulated engine, logical GPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def report(rows: list[dict], summary: dict, plan: Plan, wall: dict) -> str:
    lines = [
        "# Autoscaling timeline: a load step on a fake multi-node cluster",
        "",
        f"Machine: {machine()} (shared by 8 developers: timings carry their load).",
        "Command: `.venv/bin/python -m bench.autoscale` (a few minutes; the CI test `tests/autoscale/` runs "
        "`--ci`, a shorter step).",
        "",
        f"Cluster: bench/fake_cluster.py, a private Ray cluster (head: no GPU; worker nodes {{CPU: 1, GPU: 1}} "
        f"LOGICAL, at most {plan.max_nodes}) whose nodes Ray's autoscaler adds and removes (fake_multinode "
        f"provider, idle timeout {plan.idle_timeout_s:.0f} s). Replicas run the SIMULATED engine (a simulator: "
        f"{json.dumps(SIM_COSTS)}), one logical GPU each. Policy: app.autoscaling.ReplicaAutoscalingPolicy, "
        f"target_ongoing_requests {SIM_COSTS['max_running_requests']}, TTFT SLO {TTFT_SLO_MS:.0f} ms, "
        f"upscale delay {plan.upscale_delay_s:g} s, downscale delay {plan.downscale_delay_s:g} s.",
        "Load: Poisson arrivals of streaming /v1/completions (200-character prompts, 32 tokens): "
        + ", then ".join(f"{p.name} {p.rate_rps:g} req/s for {p.duration_s:g} s" for p in plan.phases) + ".",
        "",
        "## Summary",
        "",
        f"- requests: {summary['requests']}, completed {summary['completed']}, refused {summary['refused']}, "
        f"**failed {summary['failed']}**",
        f"- replicas (target) min / peak / end: {summary['replicas_min_max_end']}; GPU worker nodes start / max / end: "
        f"{summary['nodes_start_max_end']}",
        f"- target changes (second, new target): {summary['target_changes']}; direction reversals: "
        f"**{summary['direction_reversals']}** (1 = one way up, one way down: no oscillation)",
        f"- replica start-up (target raised -> running, node launch included), s: {summary['startup_s']}",
        f"- lag from the load step to the peak target: **{summary['lag_to_peak_s']} s** (upscale delay "
        f"{plan.upscale_delay_s:g} s + metrics look-back, vs one start-up time above)",
        f"- fake cluster head start {wall['head_start_s']:.0f} s, first /ready {wall['ready_s']:.0f} s; "
        f"stopping the cluster signalled {wall.get('signalled', '?')} processes, all its own; raylets/GCS of "
        f"other clusters on the machine at the start: {wall['others_before']}, of them signalled: "
        f"**{wall.get('others_signalled', '?')}**",
        "",
        "![timeline](autoscale.png)",
        "",
        "## Timeline (one row per second)",
        "",
        "| t (s) | phase | offered | completed | refused | failed | queue depth | replicas target | replicas running | nodes | TTFT p50 (ms) | TTFT p95 (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "" if v is None else (f"{v:.0f}" if isinstance(v, float) else str(v))  # noqa: E731
    for r in rows:
        lines.append("| " + " | ".join(fmt(r[k]) for k in (
            "t", "phase", "offered", "completed", "refused", "failed", "queue_depth", "replicas_target",
            "replicas_running", "nodes", "ttft_p50_ms", "ttft_p95_ms")) + " |")
    return "\n".join(lines) + "\n"


# -- main ----------------------------------------------------------------------------------------------------


def run(plan: Plan, temp_dir: str | None) -> tuple[list[dict], dict, dict]:
    others_before = ray_processes()
    cluster = FakeCluster({"CPU": 2}, {"CPU": 1, "GPU": 1}, max_workers=plan.max_nodes,
                          idle_timeout_s=plan.idle_timeout_s, temp_dir=temp_dir)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the cluster
    wall = {}
    try:
        began = time.monotonic()
        address = cluster.start(timeout_s=300)
        wall["head_start_s"] = time.monotonic() - began
        base = deploy(address, plan)
        wall["ready_s"] = time.monotonic() - began
        print(f"ready at {base} after {wall['ready_s']:.0f} s", flush=True)
        timeline = Timeline()
        stop = threading.Event()
        sampler = threading.Thread(target=sample_cluster, args=(timeline, stop), daemon=True)
        sampler.start()
        asyncio.run(offer_load(base, plan, timeline))
        wait_settled(timeline, plan)
        stop.set()
        sampler.join(timeout=10)
        rows = timeline.rows()
    finally:
        import ray

        ray.shutdown()
        left = cluster.stop()
        if left:
            print(f"WARNING: processes left running: {left}", file=sys.stderr)
    wall["others_before"] = len(others_before)
    # Proof that stopping touched nobody else's cluster: no PID it signalled was another's raylet/GCS.
    wall["others_signalled"] = len(others_before & cluster.signalled)
    wall["signalled"] = len(cluster.signalled)
    return rows, analyse(rows, plan), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ci", action="store_true", help="the short step of the CI test; no results files")
    parser.add_argument("--temp-dir", help="the fake cluster's temp dir (the CI test names it, to clean up)")
    parser.add_argument("--json", help="write the timeline and the summary here as JSON")
    args = parser.parse_args()
    plan = CI if args.ci else FULL
    rows, summary, wall = run(plan, args.temp_dir)
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary, "wall": wall}))
    if not args.ci:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "autoscale.md").write_text(report(rows, summary, plan, wall))
        (RESULTS / "autoscale.json").write_text(json.dumps({"rows": rows, "summary": summary, "wall": wall}))
        plot(rows, plan, RESULTS / "autoscale.png")


if __name__ == "__main__":
    main()
