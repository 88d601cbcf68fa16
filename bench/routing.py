"""Routing benchmark: multi-tenant shared-prefix chat on simulated replicas, one run per policy.

Workload (seeded): 32 system prompts of 1-2k tokens (scaled with the replica count); users each
pick a system prompt and hold a 4-turn conversation (user turns of 50-150 tokens, replies of
32-64 tokens; each turn's prompt = system + history + new message). A closed loop of concurrent
clients runs the conversations. Measured per policy: throughput (requests/s, simulated time),
TTFT p50/p99, prefix cache hit rate (cached prompt tokens / prompt tokens, over all replicas).
Reference for the hit rate: ONE big replica with the cache capacity and batch of all replicas.

    .venv/bin/python -m bench.routing            # 4 replicas and 64 replicas, writes results
    .venv/bin/python -m bench.routing --quick    # smaller, no files written
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from app.engines.simulated import SimulatedCosts
from app.scheduler.routing import make_policy
from bench.sim_cluster import Outcome, SimCluster, machine, percentile
from bench.virtual_clock import run_virtual

POLICIES = ["round_robin", "least_loaded", "power_of_two", "cache_aware"]
RESULTS = Path(__file__).parent / "results"
STAGGER_S = 2.0  # clients join over the first 2 simulated seconds

# One replica, roughly an 8B model on one H100-class GPU: ~40 us per uncached prompt token, decode
# step 8 ms + 0.1 ms per running request, batch <= 64, and a 32k-token prefix cache (the 32 system
# prompts alone are ~48k tokens: a replica cannot hold them all plus conversations, so where
# requests go decides the hit rate).
COSTS = SimulatedCosts(
    prefill_s_per_token=40e-6,
    decode_step_base_s=8e-3,
    decode_step_per_request_s=0.1e-3,
    max_running_requests=64,
    max_prefill_tokens_per_step=8192,
    cache_capacity_tokens=32_000,
)


@dataclass
class Workload:
    systems: list[list[int]]
    users: list[tuple[int, list[list[int]], list[int]]]  # (system index, user turns, reply lengths)
    concurrency: int


def make_workload(n_replicas: int, users_per_replica: int, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    n_systems = 32 * max(1, n_replicas // 4)
    systems = [[rng.randrange(300, 32_000) for _ in range(rng.randrange(1000, 2001))] for _ in range(n_systems)]
    users = []
    for _ in range(users_per_replica * n_replicas):
        turns = [[rng.randrange(300, 32_000) for _ in range(rng.randrange(50, 151))] for _ in range(4)]
        users.append((rng.randrange(n_systems), turns, [rng.randrange(32, 65) for _ in range(4)]))
    return Workload(systems, users, concurrency=64 * n_replicas)  # saturates batch 64


async def run_policy(name: str, n_replicas: int, costs: SimulatedCosts, workload: Workload, **options) -> dict:
    if name == "cache_aware":
        options.setdefault("max_tree_tokens_per_replica", costs.cache_capacity_tokens)
    cluster = await SimCluster.start(n_replicas, costs, make_policy(name, seed=1, **options))
    loop = asyncio.get_running_loop()
    finished: list[tuple[float, Outcome]] = []  # (completion time, outcome)
    pending = list(workload.users)
    steady_end = math.inf  # when the last conversation was handed out: the tail starts

    async def client(k: int) -> None:
        nonlocal steady_end
        await asyncio.sleep(k * STAGGER_S / workload.concurrency)  # no thundering cold start
        while pending:
            system_index, turns, reply_lengths = pending.pop()
            if not pending:
                steady_end = loop.time()
            history = list(workload.systems[system_index])
            for user_turn, reply_length in zip(turns, reply_lengths):
                history += user_turn
                replica = cluster.route(history)
                outcome, reply = await cluster.run(replica, history, reply_length)
                finished.append((loop.time(), outcome))
                history += reply

    await asyncio.gather(*(client(k) for k in range(workload.concurrency)))
    # Steady state only: after every client has joined, before clients start running out of work.
    steady = [o for t, o in finished if STAGGER_S <= t <= steady_end]
    result = {
        "policy": name,
        "replicas": n_replicas,
        "requests": len(finished),
        "throughput_rps": len(steady) / (steady_end - STAGGER_S),
        "ttft_p50_ms": 1000 * percentile([o.ttft_s for o in steady], 50),
        "ttft_p99_ms": 1000 * percentile([o.ttft_s for o in steady], 99),
        "hit_rate": cluster.cache_hit_rate(),
        "sim_seconds": loop.time(),
    }
    await cluster.stop()
    return result


def one_big_replica(costs: SimulatedCosts, n: int) -> SimulatedCosts:
    return replace(costs, max_running_requests=costs.max_running_requests * n,
                   cache_capacity_tokens=costs.cache_capacity_tokens * n)


def bench(n_replicas: int, users_per_replica: int, progress: tqdm) -> list[dict]:
    workload = make_workload(n_replicas, users_per_replica)
    rows = []
    for name in POLICIES:
        progress.set_description(f"{n_replicas} replicas: {name}")
        wall = time.perf_counter()
        row = run_virtual(run_policy(name, n_replicas, COSTS, workload))
        row["wall_s"] = time.perf_counter() - wall
        rows.append(row)
        progress.update()
    if n_replicas <= 4:
        progress.set_description(f"{n_replicas} replicas: cache_aware, prefill_weight=1")
        row = run_virtual(run_policy("cache_aware", n_replicas, COSTS, workload, prefill_weight=1.0))
        row["policy"] = "cache_aware (prefill_weight=1)"
        rows.append(row)
        progress.update()
    progress.set_description(f"{n_replicas} replicas: one big replica")
    big = run_virtual(run_policy("round_robin", 1, one_big_replica(COSTS, n_replicas), workload))
    big["policy"] = f"one big replica (x{n_replicas} cache+batch)"
    rows.append(big)
    progress.update()
    return rows


def table(rows: list[dict]) -> str:
    rr = next(r for r in rows if r["policy"] == "round_robin")
    big = rows[-1]
    lines = [
        "| policy | replicas | requests | throughput (req/s) | vs round_robin | TTFT p50 (ms) | TTFT p99 (ms) | cache hit rate | vs one big replica |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows[:-1]:
        lines.append(
            f"| {r['policy']} | {r['replicas']} | {r['requests']} | {r['throughput_rps']:.1f} | "
            f"{r['throughput_rps'] / rr['throughput_rps']:.2f}x | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
            f"{100 * r['hit_rate']:.1f}% | {r['hit_rate'] / big['hit_rate']:.2f} |"
        )
    lines.append(
        f"| {big['policy']} | 1 | {big['requests']} | n/a | n/a | n/a | n/a | {100 * big['hit_rate']:.1f}% | 1.00 |"
    )
    return "\n".join(lines)


def plot(all_rows: dict[int, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / len(all_rows)
    for k, (n, rows) in enumerate(sorted(all_rows.items())):
        rows = rows[: len(POLICIES)]  # policies only
        rr = rows[0]["throughput_rps"]
        xs = [i + k * width for i in range(len(rows))]
        axes[0].bar(xs, [r["throughput_rps"] / rr for r in rows], width, label=f"{n} replicas")
        axes[1].bar(xs, [100 * r["hit_rate"] for r in rows], width, label=f"{n} replicas")
        axes[2].bar(xs, [r["ttft_p99_ms"] for r in rows], width, label=f"{n} replicas")
    for ax, title in zip(axes, ["throughput vs round_robin (x)", "prefix cache hit rate (%)", "TTFT p99 (ms)"]):
        ax.set_xticks([i + width * (len(all_rows) - 1) / 2 for i in range(len(POLICIES))], POLICIES, rotation=15)
        ax.set_title(title)
        ax.legend()
    axes[2].set_yscale("log")
    fig.suptitle("Routing policies, shared-prefix multi-turn chat (simulated replicas, simulated time)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 replicas, fewer users, no files")
    args = parser.parse_args()
    sizes = {4: 128} if args.quick else {4: 256, 64: 128}
    all_rows: dict[int, list[dict]] = {}
    with tqdm(total=sum(len(POLICIES) + (2 if n <= 4 else 1) for n in sizes)) as progress:
        for n, users in sizes.items():
            all_rows[n] = bench(n, users, progress)
    report = [
        "# Routing policies: shared-prefix multi-turn chat",
        "",
        f"Machine: {machine()}. Replicas are `SimulatedEngine`s (a simulator: real batching and radix",
        "prefix cache, modelled costs) under a virtual-time loop: all times are SIMULATED seconds, so",
        "CPU contention on this shared machine does not move them. Command: `.venv/bin/python -m bench.routing`.",
        "",
        f"Replica model: {COSTS.prefill_s_per_token * 1e6:.0f} us per uncached prompt token, decode step",
        f"{COSTS.decode_step_base_s * 1e3:.0f} ms + {COSTS.decode_step_per_request_s * 1e3:.1f} ms per running request, "
        f"batch <= {COSTS.max_running_requests}, prefix cache {COSTS.cache_capacity_tokens:,} tokens (LRU).",
        "Workload: 32 system prompts of 1-2k tokens per 4 replicas; users x 4 turns (50-150 token",
        "messages, 32-64 token replies, history carried); 64 closed-loop clients per replica (enough to",
        "fill every batch, so throughput measures capacity). Throughput and TTFT are measured in the",
        "steady state: after all clients joined (2 s) and before the last conversation was handed out. The",
        "router sees exact replica loads. The last row of each table is one replica with the cache and",
        "batch of all of them together: only its hit rate is a reference (its speed is not modelled). The row `cache_aware (prefill_weight=1)`",
        "shows the sensitivity to the one tuned constant (default 4).",
        "",
    ]
    for n, rows in all_rows.items():
        report += [f"## {n} replicas", "", table(rows), ""]
    for n, rows in all_rows.items():
        ca = next(r for r in rows if r["policy"] == "cache_aware")
        rr = next(r for r in rows if r["policy"] == "round_robin")
        report.append(
            f"- {n} replicas: cache_aware / round_robin throughput = "
            f"{ca['throughput_rps'] / rr['throughput_rps']:.2f}x (target >= 1.9x); hit rate "
            f"{100 * ca['hit_rate']:.1f}% = {ca['hit_rate'] / rows[-1]['hit_rate']:.2f} of one big replica's (target >= 0.90)."
        )
    text = "\n".join(report) + "\n"
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "routing.md").write_text(text + "\n![routing](routing.png)\n")
        plot(all_rows, RESULTS / "routing.png")


if __name__ == "__main__":
    main()
