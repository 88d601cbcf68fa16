"""Capacity planning SIMULATOR: how many replicas (and GPU nodes) a model needs for an arrival rate
and a TTFT SLO, and what the autoscaler does about it, at up to 64 replicas / 16 nodes.

Everything runs in VIRTUAL time (bench/virtual_clock.py): replicas are `SimulatedEngine`s (a
simulator: continuous batching and chunked prefill with modelled costs), routed least-loaded
(app.scheduler.routing), and the autoscaler is sglserve's own policy (app.autoscaling), composed
exactly as Ray Serve composes it (`_apply_autoscaling_config`: delays, factors, cold start) and fed
the same signals the real replicas push. Nodes (GPUs_PER_NODE GPUs each) are added when replicas
do not fit and take node_boot_s to join; a replica then takes startup_s to load; an idle node is
removed after idle_timeout_s. No CPU noise: the numbers are the model's, not this machine's.

Two questions, two outputs:
  1. sizing: for each arrival rate, the fewest replicas whose TTFT p95 meets the SLO, and the
     goodput there (requests/s finished with TTFT <= SLO). Found by simulating ONE replica at a
     range of per-replica rates (N replicas behind least-loaded routing do at least as well as one
     replica at rate/N), then checked by simulating the whole cluster at the answer.
  2. autoscaling: the load step of bench/autoscale.py scaled to the cluster (low -> high -> low),
     with the policy choosing replicas: replicas and nodes over time vs the sizing answer.

Run it with your model's measured costs (docs/autoscaling.md, "Capacity planning"):

    .venv/bin/python -m bench.capacity                                  # defaults: 8B-class on one H100
    .venv/bin/python -m bench.capacity --prefill-us-per-token 120 --decode-step-ms 22 \\
        --decode-per-request-ms 0.25 --max-batch 128 --prompt-tokens 1500 --output-tokens 300 \\
        --slo-ttft-ms 1000 --rates 50,100,200,400 --startup-s 120 --out my_model
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from app.autoscaling import RecentRequests, ReplicaAutoscalingPolicy, replica_signals
from app.engines.simulated import SimulatedCosts, SimulatedEngine
from app.protocol import GenerateRequest, SamplingParams
from app.scheduler.routing import ReplicaState, make_policy
from bench.sim_cluster import machine, percentile
from bench.virtual_clock import run_virtual

RESULTS = Path(__file__).parent / "results"
GPUS_PER_NODE = 4
MAX_NODES = 16
MAX_REPLICAS = GPUS_PER_NODE * MAX_NODES  # 64
LOOK_BACK_ALPHA = 0.3  # per 1 s tick: ~Serve's averaging of pushed metrics over a few seconds


@dataclass
class Workload:
    prompt_tokens: int = 1000
    output_tokens: int = 64
    slo_ttft_ms: float = 1000.0


@dataclass
class ClusterModel:
    node_boot_s: float = 60.0  # a GPU VM/pod joining the Ray cluster
    startup_s: float = 30.0  # a replica loading its weights (SimulatedCosts.startup_s)
    idle_timeout_s: float = 120.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0


# -- one run: Poisson arrivals into N (or autoscaled) replicas ------------------------------------------


@dataclass
class Replica:
    engine: SimulatedEngine
    recent: RecentRequests
    ready_at: float
    node: int


@dataclass
class Run:
    ttfts: list[tuple[float, float]] = field(default_factory=list)  # (arrival, ttft)
    timeline: list[dict] = field(default_factory=list)


class SimCluster:
    """Replicas on nodes, routed least-loaded, with an optional autoscaler (see module docstring)."""

    def __init__(self, costs: SimulatedCosts, model: ClusterModel, workload: Workload) -> None:
        self.costs, self.model, self.workload = costs, model, workload
        self.replicas: dict[str, Replica] = {}
        self.nodes: dict[int, float] = {}  # node -> time it joins (or joined)
        self.idle_since: dict[int, float] = {}
        self.router = make_policy("least_loaded")
        self.waiting: list[asyncio.Future] = []  # requests with no running replica yet
        self._next = 0
        self.loop = asyncio.get_running_loop()

    def now(self) -> float:
        return self.loop.time()

    def running(self) -> list[str]:
        return [rid for rid, r in self.replicas.items() if r.ready_at <= self.now()]

    async def set_target(self, n: int, warm: bool = False) -> None:
        """Add or remove replicas; `warm`: added ones are running at once (a cluster already up)."""
        while len(self.replicas) < n:
            await self._add_replica(warm)
        while len(self.replicas) > n:  # newest first: those may not even be running yet
            rid = max(self.replicas, key=lambda r: self.replicas[r].ready_at)
            replica = self.replicas.pop(rid)
            self.loop.create_task(self._drain(replica))

    async def _drain(self, replica: Replica) -> None:
        while replica.engine.load()[1] or replica.engine.load()[2]:
            await asyncio.sleep(0.5)
        await replica.engine.shutdown()

    async def _add_replica(self, warm: bool) -> None:
        used = {}
        for r in self.replicas.values():
            used[r.node] = used.get(r.node, 0) + 1
        node = next((n for n in self.nodes if used.get(n, 0) < GPUS_PER_NODE), None)
        if node is None:
            if len(self.nodes) >= MAX_NODES:
                return
            node = len(self.nodes) and max(self.nodes) + 1
            self.nodes[node] = self.now() + self.model.node_boot_s
        engine = SimulatedEngine(replace(self.costs, startup_s=0.0), name=f"r{self._next}")
        await engine.start()
        ready_at = self.now() if warm else max(self.now(), self.nodes[node]) + self.model.startup_s
        self.replicas[f"r{self._next:03d}"] = Replica(engine, RecentRequests(clock=self.now), ready_at, node)
        self._next += 1
        self.idle_since.pop(node, None)
        self.loop.call_at(ready_at, self._wake_waiting)

    def _wake_waiting(self) -> None:
        for future in self.waiting:
            if not future.done():
                future.set_result(None)
        self.waiting.clear()

    def remove_idle_nodes(self) -> None:
        used = {r.node for r in self.replicas.values()}
        for node in list(self.nodes):
            if node in used:
                self.idle_since.pop(node, None)
            elif self.now() - self.idle_since.setdefault(node, self.now()) >= self.model.idle_timeout_s:
                del self.nodes[node], self.idle_since[node]

    async def request(self, run: Run, rng: random.Random) -> None:
        arrival = self.now()
        while not self.running():  # scale from zero: wait for a replica
            future = self.loop.create_future()
            self.waiting.append(future)
            await future
        live = {rid: self.replicas[rid] for rid in self.running()}
        states = [ReplicaState(rid, *r.engine.load()) for rid, r in live.items()]
        prompt = [rng.randrange(300, 30_000) for _ in range(self.workload.prompt_tokens)]
        rid = self.router.choose(prompt, states)[0]
        replica = live[rid]
        request = GenerateRequest(input_ids=prompt, sampling=SamplingParams(max_new_tokens=self.workload.output_tokens))
        sent = self.now()
        first = None
        async for out in replica.engine.generate(request):
            if first is None and out.token_ids:
                first = self.now()
                replica.recent.first_token(first - sent)
                run.ttfts.append((arrival, first - arrival))
        replica.recent.finished()


async def offer(cluster: SimCluster, run: Run, phases: list[tuple[float, float]], seed: int = 0) -> None:
    """Poisson arrivals: (rate, seconds) per phase; waits for every request to finish."""
    rng = random.Random(seed)
    tasks = []
    for rate, duration in phases:
        end = cluster.now() + duration
        while True:
            await asyncio.sleep(rng.expovariate(rate))
            if cluster.now() >= end:
                break
            tasks.append(asyncio.create_task(cluster.request(run, rng)))
    await asyncio.gather(*tasks)


# -- the autoscaler, as Serve composes it ---------------------------------------------------------------


def serve_composed_policy(params: dict, clock):
    """app.autoscaling's policy wrapped by Ray Serve's own delays/factors, on the virtual clock."""
    import ray.serve.autoscaling_policy as serve_policy
    from ray.serve.autoscaling_policy import _apply_autoscaling_config

    class VirtualTime:  # Serve's delay logic reads time.time()
        @staticmethod
        def time() -> float:
            return clock()

    serve_policy.time = VirtualTime  # this process is the simulator: nothing else reads it
    return _apply_autoscaling_config(ReplicaAutoscalingPolicy(**params))


async def autoscale(cluster: SimCluster, run: Run, policy, config, stop: asyncio.Event) -> None:
    from ray.serve._private.common import DeploymentID
    from ray.serve.config import AutoscalingContext

    state: dict = {}
    smoothed: dict[tuple[str, str], float] = {}
    target = config.min_replicas
    while not stop.is_set():
        running = cluster.running()
        metrics: dict[str, dict] = {}
        for rid in running:
            replica = cluster.replicas[rid]
            _, n_running, n_waiting = replica.engine.load()
            for key, value in replica_signals(n_running, n_waiting, replica.recent).items():
                # Serve averages pushed metrics over look_back_period_s; here: an exponential average.
                old = smoothed.get((rid, key), value)
                metrics.setdefault(key, {})[rid] = smoothed[(rid, key)] = old + LOOK_BACK_ALPHA * (value - old)
        queued = float(len(cluster.waiting))
        ctx = AutoscalingContext(
            deployment_id=DeploymentID(name="ModelReplica", app_name="sim"), deployment_name="ModelReplica",
            app_name="sim", current_num_replicas=len(running), target_num_replicas=target, running_replicas=[],
            total_num_requests=queued + sum(metrics.get("engine_running", {}).values())
            + sum(metrics.get("engine_waiting", {}).values()),
            total_queued_requests=queued, aggregated_metrics=metrics, raw_metrics=None,
            capacity_adjusted_min_replicas=config.min_replicas, capacity_adjusted_max_replicas=config.max_replicas,
            policy_state=state, last_scale_up_time=None, last_scale_down_time=None,
            current_time=cluster.now(), config=config,
        )
        decision, state = policy(ctx)
        target = max(config.min_replicas, min(config.max_replicas, math.ceil(decision)))
        await cluster.set_target(target)
        cluster.remove_idle_nodes()
        run.timeline.append({"t": cluster.now(), "target": target, "running": len(running),
                             "nodes": len(cluster.nodes), "queued": queued, "law": state.get("law"),
                             "demand": state.get("demand"), "by_rate": state.get("by_rate")})
        await asyncio.sleep(1.0)


# -- question 1: sizing ------------------------------------------------------------------------------------


def goodput(run: Run, slo_s: float, start: float, end: float) -> tuple[float, float]:
    """(requests/s whose first token came within the SLO, TTFT p95 in s) over arrivals in [start, end)."""
    window = [ttft for arrival, ttft in run.ttfts if start <= arrival < end]
    good = sum(1 for ttft in window if ttft <= slo_s)
    return good / (end - start), percentile(window, 95)


MEASURE_S = [30.0]  # --measure-s


async def steady_state(costs: SimulatedCosts, workload: Workload, replicas: int, rate: float,
                       warm_s: float = 5.0, measure_s: float | None = None) -> dict:
    measure_s = measure_s or MEASURE_S[0]
    model = ClusterModel(node_boot_s=0.0, startup_s=0.0)
    cluster = SimCluster(costs, model, workload)
    for node in range(math.ceil(replicas / GPUS_PER_NODE)):
        cluster.nodes[node] = 0.0
    await cluster.set_target(replicas, warm=True)
    run = Run()
    await offer(cluster, run, [(rate, warm_s + measure_s)])
    good, p95 = goodput(run, workload.slo_ttft_ms / 1000, warm_s, warm_s + measure_s)
    await cluster.set_target(0)
    await asyncio.sleep(1.0)  # let the drained replicas shut down (virtual time: free)
    return {"replicas": replicas, "rate_rps": rate, "goodput_rps": good, "ttft_p95_ms": 1000 * p95}


def per_replica_capacity(costs: SimulatedCosts, workload: Workload) -> tuple[float, list[dict]]:
    """The highest per-replica rate whose TTFT p95 meets the SLO (bisection on one replica)."""
    probe = run_virtual(steady_state(costs, workload, 1, 1.0))
    lo, hi, curve = 0.0, None, [probe]
    rate = 1.0
    while hi is None:  # grow until the SLO breaks
        row = run_virtual(steady_state(costs, workload, 1, rate))
        curve.append(row)
        if row["ttft_p95_ms"] <= workload.slo_ttft_ms:
            lo, rate = rate, rate * 2
        else:
            hi = rate
    for _ in range(6):
        mid = (lo + hi) / 2
        row = run_virtual(steady_state(costs, workload, 1, mid))
        curve.append(row)
        lo, hi = (mid, hi) if row["ttft_p95_ms"] <= workload.slo_ttft_ms else (lo, mid)
    return lo, sorted(curve, key=lambda r: r["rate_rps"])


def size_for(costs: SimulatedCosts, workload: Workload, rate: float, per_replica: float) -> dict:
    """The fewest replicas whose WHOLE-cluster simulation meets the SLO at `rate`: from
    ceil(rate / per-replica capacity) up (a replica at its knee has no headroom for imbalance)."""
    need = max(1, math.ceil(rate / per_replica)) if per_replica > 0 else MAX_REPLICAS + 1
    while need <= MAX_REPLICAS:
        check = run_virtual(steady_state(costs, workload, need, rate))
        if check["ttft_p95_ms"] <= workload.slo_ttft_ms:
            return {"rate_rps": rate, "replicas": need, "nodes": math.ceil(need / GPUS_PER_NODE), "fits": True,
                    "first_guess": max(1, math.ceil(rate / per_replica)), "utilization": rate / (need * per_replica),
                    "checked_goodput_rps": check["goodput_rps"], "checked_ttft_p95_ms": check["ttft_p95_ms"]}
        need += 1
    return {"rate_rps": rate, "replicas": need, "nodes": math.ceil(need / GPUS_PER_NODE), "fits": False,
            "first_guess": math.ceil(rate / per_replica) if per_replica else None, "utilization": float("nan"),
            "checked_goodput_rps": float("nan"), "checked_ttft_p95_ms": float("nan")}


# -- output -----------------------------------------------------------------------------------------------


def plot(curve: list[dict], sizing: list[dict], timeline: list[dict], phases, workload: Workload, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    axes[0].plot([r["rate_rps"] for r in curve], [r["ttft_p95_ms"] for r in curve], marker="o")
    axes[0].axhline(workload.slo_ttft_ms, color="tab:red", linestyle=":", label="SLO")
    axes[0].set(xlabel="requests/s into ONE replica", ylabel="TTFT p95 (ms)", yscale="log",
                title="one replica: TTFT p95 vs rate")
    axes[0].legend()
    rates = [r["rate_rps"] for r in sizing]
    axes[1].plot(rates, [r["replicas"] for r in sizing], marker="o", label="replicas needed")
    axes[1].set(xlabel="arrival rate (req/s)", ylabel="replicas", title=f"sizing for TTFT p95 <= {workload.slo_ttft_ms:.0f} ms")
    goodput_axis = axes[1].twinx()
    goodput_axis.plot(rates, [r["checked_goodput_rps"] for r in sizing], marker="x", color="tab:green",
                      label="goodput at that size (req/s)")
    goodput_axis.set_ylabel("goodput (req/s)")
    axes[1].legend(loc="upper left")
    goodput_axis.legend(loc="lower right")
    t = [p["t"] for p in timeline]
    axes[2].step(t, [p["target"] for p in timeline], where="post", label="replicas: target")
    axes[2].step(t, [p["running"] for p in timeline], where="post", label="replicas: running")
    axes[2].step(t, [p["nodes"] for p in timeline], where="post", label=f"nodes ({GPUS_PER_NODE} GPUs each)")
    edge = 0.0
    for rate, duration in phases:
        axes[2].axvline(edge, color="grey", linewidth=0.5)
        axes[2].text(edge + 2, 1, f"{rate:g}/s", fontsize=8)
        edge += duration
    axes[2].set(xlabel="simulated seconds", title="autoscaled load step (policy as Serve composes it)")
    axes[2].legend(fontsize=8)
    fig.suptitle("Capacity planning SIMULATOR (virtual time, simulated replicas)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill-us-per-token", type=float, default=40.0)
    parser.add_argument("--decode-step-ms", type=float, default=8.0)
    parser.add_argument("--decode-per-request-ms", type=float, default=0.1)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-prefill-tokens", type=int, default=8192)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    parser.add_argument("--rates", default="25,50,100,200", help="arrival rates (req/s) to size for")
    parser.add_argument("--startup-s", type=float, default=30.0, help="a replica's load time")
    parser.add_argument("--node-boot-s", type=float, default=60.0, help="a GPU node joining the cluster")
    parser.add_argument("--step", default="40,160,40", help="the autoscaled load step: low,high,low req/s")
    parser.add_argument("--step-s", default="60,180,240", help="the three phases' durations, seconds")
    parser.add_argument("--measure-s", type=float, default=30.0, help="measured seconds of each sizing run")
    parser.add_argument("--out", default="capacity", help="results name (bench/results/<out>.md/.png)")
    args = parser.parse_args()

    costs = SimulatedCosts(
        prefill_s_per_token=args.prefill_us_per_token * 1e-6, decode_step_base_s=args.decode_step_ms / 1000,
        decode_step_per_request_s=args.decode_per_request_ms / 1000, max_running_requests=args.max_batch,
        max_prefill_tokens_per_step=args.max_prefill_tokens, cache_capacity_tokens=1 << 20,
    )
    workload = Workload(args.prompt_tokens, args.output_tokens, args.slo_ttft_ms)
    MEASURE_S[0] = args.measure_s
    wall = time.perf_counter()
    per_replica, curve = per_replica_capacity(costs, workload)
    print(f"one replica meets TTFT p95 <= {args.slo_ttft_ms:.0f} ms up to {per_replica:.1f} req/s")

    sizing = []
    for rate in [float(r) for r in args.rates.split(",")]:
        sizing.append(size_for(costs, workload, rate, per_replica))
        print(sizing[-1])

    low, high, low2 = (float(x) for x in args.step.split(","))
    phases = list(zip((low, high, low2), (float(x) for x in args.step_s.split(","))))
    model = ClusterModel(node_boot_s=args.node_boot_s, startup_s=args.startup_s)
    timeline, step_good = run_virtual(autoscaled_step(costs, model, workload, phases, per_replica))
    print(f"simulated in {time.perf_counter() - wall:.0f} s of wall time")
    write_report(args, costs, workload, model, per_replica, curve, sizing, timeline, phases, step_good)


async def autoscaled_step(costs, model: ClusterModel, workload: Workload, phases, per_replica: float):
    from ray.serve.config import AutoscalingConfig

    cluster = SimCluster(costs, model, workload)
    # target_ongoing_requests: what one replica holds in flight at its SLO rate (Little's law).
    in_flight = max(1.0, per_replica * (workload.output_tokens * costs.decode_step_base_s * 1.5))
    config = AutoscalingConfig(min_replicas=1, max_replicas=MAX_REPLICAS, target_ongoing_requests=in_flight,
                               upscale_delay_s=model.upscale_delay_s, downscale_delay_s=model.downscale_delay_s)
    policy = serve_composed_policy({"ttft_slo_ms": workload.slo_ttft_ms, "startup_time_s": model.startup_s}, cluster.now)
    cluster.nodes[0] = 0.0
    await cluster.set_target(1, warm=True)
    run, stop = Run(), asyncio.Event()
    scaler = asyncio.create_task(autoscale(cluster, run, policy, config, stop))
    await offer(cluster, run, phases)
    stop.set()
    await scaler
    end = sum(d for _, d in phases)
    edges = [0.0]
    for _, d in phases:
        edges.append(edges[-1] + d)
    good = [goodput(run, workload.slo_ttft_ms / 1000, a, b) for a, b in zip(edges, edges[1:])]
    await cluster.set_target(0)
    await asyncio.sleep(1.0)
    return run.timeline, {"per_phase": good, "end": end}


def write_report(args, costs, workload, model, per_replica, curve, sizing, timeline, phases, step_good) -> None:
    lines = [
        "# Capacity planning SIMULATOR: replicas and goodput for an arrival rate and a TTFT SLO",
        "",
        f"Machine: {machine()}; but every number below is SIMULATED time (bench/virtual_clock.py), so it",
        "does not depend on this machine. Replicas are `SimulatedEngine`s (a simulator) with the costs below;",
        f"command: `.venv/bin/python -m bench.capacity` (defaults; docs/autoscaling.md shows how to pass your",
        "own model's measured costs).",
        "",
        f"Replica model: {args.prefill_us_per_token:g} us per prompt token (prefill), decode step "
        f"{args.decode_step_ms:g} ms + {args.decode_per_request_ms:g} ms per running request, batch <= "
        f"{args.max_batch}, prefill <= {args.max_prefill_tokens} tokens per step. Requests: {workload.prompt_tokens} "
        f"prompt tokens (no shared prefixes), {workload.output_tokens} output tokens, Poisson arrivals, "
        f"least-loaded routing. SLO: TTFT p95 <= {workload.slo_ttft_ms:.0f} ms. Cluster: up to {MAX_NODES} nodes "
        f"x {GPUS_PER_NODE} GPUs = {MAX_REPLICAS} replicas.",
        "",
        f"**One replica meets the SLO up to {per_replica:.1f} req/s.**",
        "",
        "## Sizing",
        "",
        f"Replicas = the fewest whose whole-cluster simulation ({args.measure_s:g} s measured after 5 s) meets the",
        "SLO, searched upward from ceil(rate / one replica's capacity) (the first guess: a replica at its knee",
        "has no headroom for routing imbalance). Goodput = requests/s whose first token came within the SLO;",
        "utilization = rate / (replicas x one replica's capacity).",
        "",
        "| arrival rate (req/s) | replicas | first guess | nodes | fits 64 replicas / 16 nodes | utilization | goodput (req/s) | TTFT p95 (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sizing:
        lines.append(f"| {r['rate_rps']:g} | {r['replicas']} | {r['first_guess']} | {r['nodes']} | "
                     f"{'yes' if r['fits'] else 'NO'} | {r['utilization']:.2f} | "
                     f"{r['checked_goodput_rps']:.1f} | {r['checked_ttft_p95_ms']:.0f} |")
    lines += ["", "## One replica: TTFT p95 against its arrival rate", "",
              "| rate (req/s) | goodput (req/s) | TTFT p95 (ms) |", "|---|---|---|"]
    lines += [f"| {r['rate_rps']:.1f} | {r['goodput_rps']:.1f} | {r['ttft_p95_ms']:.0f} |" for r in curve]
    peak = max(p["target"] for p in timeline)
    lines += [
        "", "## Autoscaled load step", "",
        f"Load: " + ", then ".join(f"{rate:g} req/s for {d:g} s" for rate, d in phases) + f". Node boot "
        f"{model.node_boot_s:g} s, replica start-up {model.startup_s:g} s, upscale delay {model.upscale_delay_s:g} s, "
        f"downscale delay {model.downscale_delay_s:g} s, node idle timeout {model.idle_timeout_s:g} s.",
        f"Peak target: {peak} replicas (first guess for {phases[1][0]:g} req/s: "
        f"{math.ceil(phases[1][0] / per_replica)}). Goodput per phase (req/s, TTFT p95 ms): "
        + ", ".join(f"{g:.1f} ({1000 * p:.0f})" for g, p in step_good["per_phase"]) + ".",
        "", f"![capacity]({args.out}.png)", "",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    plot(curve, sizing, timeline, phases, workload, RESULTS / f"{args.out}.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
