"""Routing benchmark on the REAL embedded engine, through the whole stack (HTTP -> Ingress ->
Scheduler -> 4 ModelReplicas), one run per routing policy.

bench/routing.py measures the same question on simulated replicas in virtual time; this one runs
real forward passes of the tiny model, scaled down to this 2-core machine:

- Workload (seeded, the same for every policy): 16 system prompts of 900-1100 random token ids;
  users each pick a system prompt and hold a 2-3 turn conversation. Turn k's prompt = system
  prompt + every earlier (user message + reply) + a new user message of 16-32 tokens. The reply
  is the streamed text of the previous turn, re-tokenized with the model's tokenizer (what a chat
  client that re-renders history does). 16 output tokens per turn, ignore_eos, greedy.
- Closed loop: 24 concurrent clients, each running whole conversations (turns in order), until
  the conversations run out or the time cap passes (no new turn starts after it).
- Each replica's KV capacity (`max_total_tokens`) holds about a third of the system prompts
  (with room for the running requests), so where a request goes decides whether its prefix is
  cached: round_robin spreads every prompt over every replica and thrashes the LRU cache.
- Reference for the hit rate: ONE replica with 4x the KV capacity, the same workload.

Measured per policy: requests/s and output tokens/s (completed / wall time of the run), TTFT p50
and p99 (client side, streaming /v1/completions), and the prefix-cache hit rate = delta of
sum(cache_hit_tokens) / delta of sum(cache_query_tokens) over the replicas, read from
GET /server_info before and after the run.

All replicas share this machine's 2 cores (1 torch thread each), so the throughput here measures
prefill work saved by the cache, not 4 devices working in parallel.

    .venv/bin/python -m bench.routing_embedded            # full run, writes results
    .venv/bin/python -m bench.routing_embedded --quick    # tiny smoke run, no files written
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from bench.common import MODEL, RESULTS, deploy_app, machine, percentile, start_ray_serve, stop_ray_serve

POLICIES = ["round_robin", "least_loaded", "cache_aware"]
CACHE_DIR = ".cache/models"
TOKENIZER = f"{CACHE_DIR}/tiny-llama-v1/tokenizer.json"
REPLICAS = 4
# ~16k tokens of system prompts in all; one replica holds ~6k: ~5 prompts, or its quarter of them
# (4 prompts, ~4k) plus the conversations it serves. Four of them together hold everything.
KV_TOKENS_PER_REPLICA = 6144
OUTPUT_TOKENS = 16


@dataclass
class Workload:
    systems: list[list[int]]
    users: list[tuple[int, list[list[int]]]]  # (system prompt index, user messages, one per turn)
    concurrency: int
    time_cap_s: float

    @property
    def requests(self) -> int:
        return sum(len(turns) for _, turns in self.users)


def make_workload(n_systems: int, n_users: int, concurrency: int, time_cap_s: float, seed: int = 0,
                  system_tokens: tuple[int, int] = (900, 1100)) -> Workload:
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(300, 1500) for _ in range(n)]  # clear of the special tokens (0-3)

    systems = [ids(rng.randrange(system_tokens[0], system_tokens[1] + 1)) for _ in range(n_systems)]
    users = [(rng.randrange(n_systems), [ids(rng.randrange(16, 33)) for _ in range(rng.choice((2, 3)))])
             for _ in range(n_users)]
    return Workload(systems, users, concurrency, time_cap_s)


@dataclass
class Turn:
    ttft_s: float
    total_s: float
    tokens: int
    prompt_tokens: int


@dataclass
class PolicyRun:
    policy: str
    replicas: int
    turns: list[Turn] = field(default_factory=list)
    wall_s: float = 0.0
    hit_tokens: int = 0
    query_tokens: int = 0
    per_replica_requests: list[int] = field(default_factory=list)
    per_replica_hit_rate: list[float] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else float("nan")

    @property
    def rps(self) -> float:
        return len(self.turns) / self.wall_s

    @property
    def tok_s(self) -> float:
        return sum(t.tokens for t in self.turns) / self.wall_s

    def ttft_ms(self, q: float) -> float:
        return 1000 * percentile([t.ttft_s for t in self.turns], q)


# -- the client -------------------------------------------------------------------------------------


async def stream_turn(client, base: str, prompt: list[int]) -> tuple[Turn, str]:
    """One streaming /v1/completions with a token-id prompt: its timing and the reply text."""
    started = time.perf_counter()
    ttft: float | None = None
    tokens = 0
    text: list[str] = []
    body = {"model": MODEL, "prompt": prompt, "max_tokens": OUTPUT_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", f"{base}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0].get("text"):
                if ttft is None:
                    ttft = time.perf_counter() - started
                text.append(event["choices"][0]["text"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    total = time.perf_counter() - started
    return Turn(ttft if ttft is not None else total, total, tokens, len(prompt)), "".join(text)


async def run_conversations(base: str, workload: Workload, label: str) -> tuple[list[Turn], float]:
    """Closed loop over whole conversations; returns the turns and the wall time."""
    import httpx
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(TOKENIZER)
    pending = list(reversed(workload.users))
    turns: list[Turn] = []
    started = time.perf_counter()
    deadline = started + workload.time_cap_s
    progress = tqdm(total=workload.requests, desc=label, leave=False)

    async def client_loop(client) -> None:
        while pending and time.perf_counter() < deadline:
            system_index, messages = pending.pop()
            history = list(workload.systems[system_index])
            for message in messages:
                if time.perf_counter() >= deadline:
                    return
                history += message
                turn, reply = await stream_turn(client, base, history)
                turns.append(turn)
                progress.update()
                history += tokenizer.encode(reply, add_special_tokens=False).ids

    limits = httpx.Limits(max_connections=workload.concurrency, max_keepalive_connections=workload.concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(workload.concurrency)))
    progress.close()
    return turns, time.perf_counter() - started


def replica_counters(base: str) -> list[dict[str, int]]:
    import httpx

    states = httpx.get(f"{base}/server_info", timeout=60).json()["internal_states"]
    return [{k: s[k] for k in ("cache_hit_tokens", "cache_query_tokens", "requests_finished_total")}
            for s in states]


def run_policy(port: int, policy: str, replicas: int, kv_tokens: int, workload: Workload, label: str) -> PolicyRun:
    from ray import serve

    name = f"routing_{policy}_{replicas}"
    args = {
        "model": {"cache_dir": CACHE_DIR},
        "engine": {"kind": "embedded", "torch_threads": 1, "max_total_tokens": kv_tokens},
        "scheduler": {"routing_policy": policy},
    }
    base = deploy_app(port, name, args, replica_options={"num_replicas": replicas,
                                                         "ray_actor_options": {"num_cpus": 0.25}})
    try:
        before = replica_counters(base)
        turns, wall = asyncio.run(run_conversations(base, workload, label))
        after = replica_counters(base)
    finally:
        serve.delete(name)
    run = PolicyRun(policy, replicas, turns, wall)
    for b, a in zip(before, after):
        hit = a["cache_hit_tokens"] - b["cache_hit_tokens"]
        query = a["cache_query_tokens"] - b["cache_query_tokens"]
        run.hit_tokens += hit
        run.query_tokens += query
        run.per_replica_requests.append(a["requests_finished_total"] - b["requests_finished_total"])
        run.per_replica_hit_rate.append(hit / query if query else float("nan"))
    return run


# -- the report -------------------------------------------------------------------------------------


def table(runs: list[PolicyRun], big: PolicyRun) -> str:
    rr = runs[0]
    lines = [
        "| policy | replicas | requests | wall (s) | req/s | output tok/s | req/s vs round_robin | TTFT p50 (ms) "
        "| TTFT p99 (ms) | cache hit rate | hit rate vs one big replica | requests per replica | hit rate per replica |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs + [big]:
        label = r.policy if r is not big else f"one big replica ({REPLICAS}x KV)"
        per_hit = " / ".join(f"{100 * h:.0f}%" for h in r.per_replica_hit_rate)
        lines.append(
            f"| {label} | {r.replicas} | {len(r.turns)} | {r.wall_s:.1f} | {r.rps:.2f} | {r.tok_s:.0f} | "
            f"{r.rps / rr.rps:.2f}x | {r.ttft_ms(50):.0f} | {r.ttft_ms(99):.0f} | {100 * r.hit_rate:.1f}% | "
            f"{r.hit_rate / big.hit_rate:.2f} | {' / '.join(map(str, r.per_replica_requests))} | {per_hit} |"
        )
    return "\n".join(lines)


def plot(runs: list[PolicyRun], big: PolicyRun, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.policy for r in runs]
    xs = range(len(runs))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    axes[0].bar(xs, [r.rps / runs[0].rps for r in runs], color="tab:blue")
    axes[0].axhline(1.9, color="tab:red", linestyle="--", label="target for cache_aware (1.9x)")
    axes[0].set_title("throughput vs round_robin (x)")
    axes[1].bar(xs, [100 * r.hit_rate for r in runs], color="tab:green")
    axes[1].axhline(100 * big.hit_rate, color="black", linestyle="--", label="one big replica")
    axes[1].axhline(90 * big.hit_rate, color="tab:red", linestyle=":", label="90% of one big replica")
    axes[1].set_title("prefix cache hit rate (%)")
    width = 0.38
    axes[2].bar([x - width / 2 for x in xs], [r.ttft_ms(50) for r in runs], width, label="p50")
    axes[2].bar([x + width / 2 for x in xs], [r.ttft_ms(99) for r in runs], width, label="p99")
    axes[2].set_title("TTFT (ms)")
    for ax in axes:
        ax.set_xticks(list(xs), names)
        ax.legend(fontsize=8)
    fig.suptitle(f"Routing policies on the embedded engine, {REPLICAS} replicas through the whole stack "
                 "(2 shared CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(runs: list[PolicyRun], big: PolicyRun, workload: Workload, machine_line: str, load_before: str,
           total_s: float) -> str:
    ca = next(r for r in runs if r.policy == "cache_aware")
    rr = runs[0]
    prompt_lens = [t.prompt_tokens for t in rr.turns]
    return "\n".join([
        "# Routing policies on the real embedded engine, through the whole stack",
        "",
        f"Machine: {machine_line}. Load average (1/5/15 min) just before the run: {load_before}.",
        "Command: `.venv/bin/python -m bench.routing_embedded` "
        f"(whole run {total_s / 60:.1f} min, including 4 deployments).",
        "",
        f"Stack: HTTP (Serve proxy) -> Ingress -> Scheduler -> {REPLICAS} ModelReplicas (embedded engine, "
        "tiny Llama, real forward passes, 1 torch thread each, `num_cpus` 0.25 each), streaming "
        "`/v1/completions` with token-id prompts. One Ray cluster; one app per policy, deleted before the next.",
        f"**All {REPLICAS} replicas share this machine's 2 CPU cores** (with the ingress, the scheduler, the "
        "client, and whatever else runs here): the replicas are not 4 parallel devices, so throughput "
        "measures the prefill work the cache saves, not added capacity.",
        "",
        f"Workload (seeded, the same for every policy): {len(workload.systems)} system prompts of 900-1100 "
        f"token ids (~{sum(map(len, workload.systems)) / 1000:.0f}k tokens in all); {len(workload.users)} users, "
        "each on one system prompt, 2-3 turns; a turn's prompt = system + earlier messages and replies "
        "(replies re-tokenized from the streamed text) + a new 16-32 token message; "
        f"prompts {min(prompt_lens)}-{max(prompt_lens)} tokens; {OUTPUT_TOKENS} output tokens (ignore_eos, greedy); "
        f"{workload.concurrency} closed-loop clients, at most {workload.requests} requests or "
        f"{workload.time_cap_s:.0f} s per policy. "
        f"KV capacity per replica `max_total_tokens` = {KV_TOKENS_PER_REPLICA} (about "
        f"{KV_TOKENS_PER_REPLICA / sum(map(len, workload.systems)):.0%} of the system prompts' tokens); the reference is one replica with {REPLICAS * KV_TOKENS_PER_REPLICA} (4x), which "
        "holds them all. Throughput = completed requests (or output tokens) / wall time of the whole run "
        "(cold start and tail included). Hit rate = cached prompt tokens / prompt tokens, summed over "
        "replicas (deltas of `/server_info` `internal_states[]`).",
        "",
        table(runs, big),
        "",
        f"- cache_aware / round_robin throughput: **{ca.rps / rr.rps:.2f}x** (issue 4 target >= 1.9x).",
        f"- cache_aware hit rate {100 * ca.hit_rate:.1f}% = **{ca.hit_rate / big.hit_rate:.2f}** of one big "
        f"replica's {100 * big.hit_rate:.1f}% (target >= 0.90).",
        "- The one-big-replica row's speed is that of one replica on the same 2 cores; only its hit rate "
        "is the reference.",
        "",
        "![routing on the embedded engine](routing_embedded.png)",
        "",
    ])


def main() -> None:
    global KV_TOKENS_PER_REPLICA
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run, no files written")
    parser.add_argument("--systems", type=int, default=16, help="number of system prompts")
    parser.add_argument("--system-tokens", type=int, nargs=2, default=(900, 1100), metavar=("MIN", "MAX"))
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--kv-per-replica", type=int, default=6144)
    parser.add_argument("--name", default="routing_embedded", help="results file name (.md, .png)")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=POLICIES, help="a shorter run: fewer policies")
    args = parser.parse_args()
    KV_TOKENS_PER_REPLICA = args.kv_per_replica
    if args.quick:
        workload = make_workload(n_systems=4, n_users=6, concurrency=4, time_cap_s=20)
        policies = ["cache_aware"]
    else:
        workload = make_workload(n_systems=args.systems, n_users=args.users, concurrency=24, time_cap_s=60,
                                 system_tokens=tuple(args.system_tokens))
        policies = args.policies
    load_before = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    machine_line = machine()  # before the run: its load average is the machine's, not ours
    started = time.perf_counter()
    port = start_ray_serve()
    runs: list[PolicyRun] = []
    try:
        for policy in tqdm(policies + ["one big replica"], desc="policies"):
            if policy == "one big replica":
                big = run_policy(port, "round_robin", 1, REPLICAS * KV_TOKENS_PER_REPLICA, workload, policy)
                big.policy = policy
            else:
                runs.append(run_policy(port, policy, REPLICAS, KV_TOKENS_PER_REPLICA, workload, policy))
    finally:
        stop_ray_serve()
    text = report(runs, big, workload, machine_line, load_before, time.perf_counter() - started)
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.name}.md").write_text(text.replace("routing_embedded.png", f"{args.name}.png"))
        plot(runs, big, RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()
