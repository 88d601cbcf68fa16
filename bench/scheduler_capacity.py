"""How many admission decisions per second one Scheduler replica can make, at 64 replicas.

Part 1, the decisions alone (no Ray): sglserve's `TicketOffice` (admission queue, cache-aware
routing over 64 replicas, tickets, in-flight limits) in this process. 64 simulated engines
(app/engines/simulated.py) serve the placed requests, and their published load reaches the
office as Serve would deliver it (a fresh stats snapshot per replica every second). A closed loop
of clients asks for tickets (multi-tenant shared-prefix prompts: 128 system prompts of 1-2k
tokens + a user message), streams from the chosen simulated engine and releases. Measured: the
CPU time spent inside `admit` + `release` per decision (so the simulated engines' own cost is
not counted), hence decisions/s per core.

Part 2, through Ray Serve (throughput mode): one Scheduler replica of a deployed sglserve app
(simulated engine, 2 replicas), admissions asked through its DeploymentHandle by 64 concurrent
callers for a few seconds, releases batched as the Ingress batches them; both ways of asking, in
turns in the same app and minute: one unary `admit` call per request (before), and the Ingress's
batched admits (app/ingress/admits.py: one unary `admit_many` call carries the admits that
arrived while the previous one was in flight). Measured: decisions/s, and the Scheduler
process's CPU seconds per decision (psutil), hence the decisions/s one scheduler replica sustains
when it has a core.

    python -m bench.scheduler_capacity [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

from bench.common import machine, write_result

REPLICAS = 64
STATS_PERIOD_S = 1.0


def make_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    systems = [[rng.randrange(300, 32_000) for _ in range(rng.randrange(1000, 2001))] for _ in range(128)]
    return [rng.choice(systems) + [rng.randrange(300, 32_000) for _ in range(rng.randrange(50, 150))] for _ in range(n)]


# -- part 1 -----------------------------------------------------------------------------------------


async def decisions_in_process(requests: int, concurrency: int) -> dict:
    from app.config import AppSettings
    from app.engines.simulated import SimulatedCosts, SimulatedEngine
    from app.protocol import GenerateRequest, SamplingParams
    from app.scheduler.office import TicketOffice
    from app.scheduler.ray_router import RoutingSnapshot
    from app.scheduler.tickets import Outcome

    settings = AppSettings.from_args({
        "engine": {"kind": "simulated", "max_total_tokens": 65536},
        "scheduler": {"routing_policy": "cache_aware", "max_concurrent": 4096, "max_queue": 65536},
        "observability": {"metrics_enabled": False},
    })
    engines = {f"replica-{i:02d}": SimulatedEngine(SimulatedCosts(), name=f"r{i}") for i in range(REPLICAS)}
    for engine in engines.values():
        await engine.start()
    snapshot = {"value": RoutingSnapshot({rid: {"outstanding_tokens": 0} for rid in engines}, 1)}

    def publish() -> None:  # what Serve's long poll hands the router: a new dict per replica
        stats = {}
        for rid, engine in engines.items():
            s = engine.stats()
            stats[rid] = {"outstanding_tokens": s.outstanding_tokens, "running": s.num_running, "waiting": s.num_waiting}
        snapshot["value"] = RoutingSnapshot(stats, snapshot["value"].version + 1)

    office = TicketOffice(settings, snapshot=lambda name: snapshot["value"])
    prompts = make_prompts(requests, seed=1)
    spent = {"admit": 0.0, "release": 0.0}
    queue = iter(range(requests))

    async def publisher() -> None:
        while True:
            await asyncio.sleep(STATS_PERIOD_S)
            publish()

    async def client() -> None:
        for i in queue:
            request = GenerateRequest(input_ids=prompts[i], sampling=SamplingParams(max_new_tokens=16), tenant=f"t{i % 8}")
            started = time.process_time()
            ticket = await office.admit(request)  # never waits here: max_concurrent is above the load
            spent["admit"] += time.process_time() - started
            tokens = 0
            async for out in engines[ticket.replica_id].generate(request):
                tokens = out.completion_tokens
            started = time.process_time()
            office.release([Outcome(ticket.ticket_id, "finished", served_by=ticket.replica_id, completion_tokens=tokens,
                                    first_token_time=time.time())])
            spent["release"] += time.process_time() - started

    feeder = asyncio.get_running_loop().create_task(publisher())
    wall = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - wall
    feeder.cancel()
    hit = sum(e.stats().cache_hit_tokens for e in engines.values())
    query = sum(e.stats().cache_query_tokens for e in engines.values())
    per_decision_s = (spent["admit"] + spent["release"]) / requests
    return {"requests": requests, "concurrency": concurrency, "wall_s": wall,
            "admit_us": spent["admit"] / requests * 1e6, "release_us": spent["release"] / requests * 1e6,
            "decisions_per_cpu_s": 1.0 / per_decision_s, "hit_rate": hit / query if query else 0.0,
            "replicas_used": len({rid for rid, e in engines.items() if e.stats().requests_finished_total})}


# -- part 2 -----------------------------------------------------------------------------------------


async def drive_handle(handle, prompts: list[list[int]], concurrency: int, duration_s: float,
                       batched: bool = False) -> tuple[int, float, dict]:
    from app.ingress.admits import AdmitBatcher
    from app.ingress.releases import ReleaseBatcher
    from app.protocol import GenerateRequest, SamplingParams
    from app.scheduler.tickets import Outcome

    releases = ReleaseBatcher(handle, lease_s=30.0)  # batched, as the Ingress sends them
    streams = handle.options(stream=True)
    admits = AdmitBatcher(lambda batch: handle.admit_many.remote(batch),
                          lambda keys: streams.follow_admits.remote(keys), cancel=releases.cancel_admit,
                          orphan=lambda t: releases.release(Outcome(t.ticket_id, "client_disconnect")))
    count = 0
    stop_at = time.monotonic() + duration_s

    async def caller(k: int) -> None:
        nonlocal count
        i = k
        while time.monotonic() < stop_at:
            request = GenerateRequest(input_ids=prompts[i % len(prompts)], sampling=SamplingParams(max_new_tokens=16))
            ticket = await (admits.admit(request) if batched else handle.admit.remote(request))
            releases.release(Outcome(ticket.ticket_id, "finished"))
            count += 1
            i += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(concurrency)))
    return count, time.perf_counter() - started, admits.stats()


def decisions_through_serve(duration_s: float, concurrency: int, rounds: int = 2, hops: int = 0) -> tuple[list[dict], dict | None]:
    """Part 2 (and, with `hops`, bench/first_token_hops.py's c=1 measurement on the same app, so
    that one Ray start serves both on a busy machine)."""
    import psutil
    from ray import serve

    from bench.common import deploy_app, start_ray_serve, stop_ray_serve
    from bench.token_path import cpu_seconds, serve_processes

    port = start_ray_serve(throughput_optimized=True)
    try:
        settings = {"engine": {"kind": "simulated"}, "scheduler": {"max_concurrent": 4096, "max_queue": 65536}}
        deploy_app(port, "cap", settings, replica_options={"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.1}})
        procs = {"Scheduler": serve_processes("cap")["Scheduler"]}
        prompts = make_prompts(512, seed=2)

        async def run() -> list[dict]:
            handle = serve.get_deployment_handle("Scheduler", app_name="cap")
            await drive_handle(handle, prompts, 8, 2.0)  # warm-up, both ways
            await drive_handle(handle, prompts, 8, 2.0, batched=True)
            runs = []
            for turn in range(rounds):  # alternate, so that both ways see the same load
                for batched in (False, True):
                    load = psutil.getloadavg()[0]
                    before = cpu_seconds(procs)
                    count, wall, stats = await drive_handle(handle, prompts, concurrency, duration_s, batched)
                    cpu = cpu_seconds(procs)["Scheduler"] - before["Scheduler"]
                    runs.append({"mode": "batched admit_many" if batched else "one admit per request",
                                 "turn": turn, "decisions": count, "wall_s": wall, "per_s": count / wall,
                                 "scheduler_cpu_s": cpu, "scheduler_cpu_ms_per_decision": cpu / count * 1000,
                                 "decisions_per_scheduler_cpu_s": count / cpu, "load_avg": load,
                                 "concurrency": concurrency,
                                 "mean_batch": stats["admits_total"] / stats["calls_total"] if batched else 1.0})
                    print(runs[-1], flush=True)
            hop_times = None
            if hops:
                from bench.first_token_hops import measure_hops

                hop_times = {"load_avg": psutil.getloadavg()[0], "times": await measure_hops("cap", hops)}
            return runs, hop_times

        return asyncio.run(run())
    finally:
        stop_ray_serve()


def report(part1: dict, part2: list[dict] | None, quick: bool) -> str:
    lines = [
        "# Scheduler capacity: admission decisions per second on one Scheduler replica",
        "",
        f"Machine: {machine()}",
        "",
        "Short runs (the machine is shared by 8 developers)" + (", --quick" if quick else "") + ".",
        "",
        "## The decisions alone (no Ray), 64 simulated replicas",
        "",
        f"`TicketOffice` in one process: admission, cache-aware routing over {REPLICAS} replicas (stats snapshot "
        f"every {STATS_PERIOD_S:g} s), tickets, in-flight limits; {part1['requests']} requests from "
        f"{part1['concurrency']} concurrent clients, prompts of 128 shared system prompts (1-2k tokens) + 50-150 "
        "tokens, each streamed from a simulated engine and released.",
        "",
        "| admit | release | decisions per CPU second | prefix cache hit rate | replicas used |",
        "|---|---|---|---|---|",
        f"| {part1['admit_us']:.0f} us | {part1['release_us']:.0f} us | {part1['decisions_per_cpu_s']:,.0f} | "
        f"{part1['hit_rate']:.2f} | {part1['replicas_used']} |",
        "",
    ]
    if part2:
        first = part2[0]
        lines += [
            "## Through Ray Serve: one Scheduler replica, admissions + releases over its handle",
            "",
            f"{first['concurrency']} concurrent callers in one process, {first['wall_s']:.1f} s a turn, the two ways "
            "alternating in the same app, Ray Serve throughput mode. Releases batched in both.",
            "",
            "| turn | admits asked by | load average | decisions/s achieved | admits per call | Scheduler CPU per decision "
            "| decisions per Scheduler CPU second |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in part2:
            lines.append(f"| {r['turn']} | {r['mode']} | {r['load_avg']:.1f} | {r['per_s']:,.0f} | {r['mean_batch']:.1f} | "
                         f"{r['scheduler_cpu_ms_per_decision']:.2f} ms | {r['decisions_per_scheduler_cpu_s']:,.0f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-serve", action="store_true", help="part 1 only")
    parser.add_argument("--name", default="scheduler_capacity")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--hops", type=int, default=0, help="also time the c=1 hops (bench/first_token_hops.py), N requests")
    args = parser.parse_args()
    part1 = asyncio.run(decisions_in_process(2000 if args.quick else 8000, 256))
    print(part1)
    part2, hops = (None, None) if args.no_serve else decisions_through_serve(
        5.0 if args.quick else 10.0, args.concurrency, hops=args.hops)
    print(part2)
    if hops is not None:
        from bench.first_token_hops import table

        text = "\n".join(["# c=1: the two hops before the first token", "", f"Machine: {machine()}", "",
                          f"{args.hops} requests one at a time (64-token prompts, 1 output token, simulated engine, "
                          f"the app of bench/scheduler_capacity.py), load average {hops['load_avg']:.1f} at the start.",
                          "", *table(hops["times"]), ""])
        print(text)
        write_result("first_token_hops", text)
    path = write_result(args.name, report(part1, part2, args.quick))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
