"""Where a c=1 request's time to first token goes: the admit hop, then the stream hop.

Against a deployed sglserve app (simulated engine), one request at a time, each step timed as
the Ingress makes it (app/ingress/ticketed.py), in turns so that every way sees the same load:
- admit, one unary `Scheduler.admit` call (batch_admits false);
- admit, batched (`AdmitBatcher` -> one unary `Scheduler.admit_many` call, alone at c=1);
- the stream: `ModelReplica.generate` on the ticket's replica, to its first item;
- transport baselines: a unary call to the replica (`stats`), and the simulated engine's own
  time to first item for the same request, in this process (no Ray).
So the stream hop's own cost is (stream first item - engine first item), and the admit hop's is
the admit's round trip: the two hops a first token waits for.

    python -m bench.first_token_hops [--requests 100]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench.common import machine, percentile, write_result


async def measure_hops(app_name: str, requests: int, prompt_len: int = 64) -> dict[str, list[float]]:
    from ray import serve

    from app.engines.simulated import SimulatedCosts, SimulatedEngine
    from app.ingress.admits import AdmitBatcher
    from app.ingress.releases import ReleaseBatcher
    from app.protocol import GenerateRequest, SamplingParams
    from app.scheduler.ray_router import TARGET_REPLICA_KWARG
    from app.scheduler.tickets import Outcome

    scheduler = serve.get_deployment_handle("Scheduler", app_name=app_name)
    replicas = serve.get_deployment_handle("ModelReplica", app_name=app_name)
    streams = replicas.options(stream=True)
    admit_streams = scheduler.options(stream=True)
    releases = ReleaseBatcher(scheduler, lease_s=30.0)
    admits = AdmitBatcher(lambda batch: scheduler.admit_many.remote(batch),
                          lambda keys: admit_streams.follow_admits.remote(keys), cancel=releases.cancel_admit,
                          orphan=lambda t: releases.release(Outcome(t.ticket_id, "client_disconnect")))
    engine = SimulatedEngine(SimulatedCosts(), name="local")
    await engine.start()
    times: dict[str, list[float]] = {k: [] for k in ("admit_unary", "admit_batched", "stream_first", "replica_unary",
                                                     "engine_first", "total_unary", "total_batched")}

    def request(i: int) -> GenerateRequest:
        ids = [(i * 7 + k) % 250 + 1 for k in range(prompt_len)]  # distinct prompts: no cache hits
        return GenerateRequest(input_ids=ids, sampling=SamplingParams(max_new_tokens=1, temperature=0.0))

    async def first_item(stream) -> float:
        started = time.perf_counter()
        async for _ in stream:
            return time.perf_counter() - started
        raise RuntimeError("the stream ended without an item")

    for i in range(requests + 5):  # the first 5 are warm-up
        for batched in (False, True):
            req = request(2 * i + batched)
            started = time.perf_counter()
            ticket = await (admits.admit(req) if batched else scheduler.admit.remote(req))
            admit_s = time.perf_counter() - started
            target = {TARGET_REPLICA_KWARG: ticket.replica_id} if ticket.replica_id else {}
            stream_s = await first_item(streams.generate.remote(req, **target))
            total_s = time.perf_counter() - started
            releases.release(Outcome(ticket.ticket_id, "finished"))
            if i >= 5:
                times["admit_batched" if batched else "admit_unary"].append(admit_s)
                times["stream_first"].append(stream_s)
                times["total_batched" if batched else "total_unary"].append(total_s)
        started = time.perf_counter()
        await replicas.stats.remote(**target)
        replica_s = time.perf_counter() - started
        engine_s = await first_item(engine.generate(request(10_000 + i)))
        if i >= 5:
            times["replica_unary"].append(replica_s)
            times["engine_first"].append(engine_s)
    await engine.shutdown()
    return times


def table(times: dict[str, list[float]]) -> list[str]:
    rows = [
        ("admit, one unary call", "admit_unary"),
        ("admit, batched (admit_many, alone)", "admit_batched"),
        ("stream: generate to its first item", "stream_first"),
        ("engine alone (in process): first item", "engine_first"),
        ("transport: a unary call to the replica", "replica_unary"),
        ("total to first token, unary admit", "total_unary"),
        ("total to first token, batched admit", "total_batched"),
    ]
    lines = ["| step | p50 | p90 | mean |", "|---|---|---|---|"]
    for label, key in rows:
        v = times[key]
        lines.append(f"| {label} | {percentile(v, 50) * 1000:.2f} ms | {percentile(v, 90) * 1000:.2f} ms | "
                     f"{sum(v) / len(v) * 1000:.2f} ms |")
    stream_hop = percentile(times["stream_first"], 50) - percentile(times["engine_first"], 50)
    lines += ["", f"Stream hop's own cost (p50 stream first item - p50 engine first item): {stream_hop * 1000:.2f} ms; "
              f"admit hop (p50, unary / batched): {percentile(times['admit_unary'], 50) * 1000:.2f} / "
              f"{percentile(times['admit_batched'], 50) * 1000:.2f} ms."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--name", default="first_token_hops")
    args = parser.parse_args()
    import psutil

    from bench.common import deploy_app, start_ray_serve, stop_ray_serve

    port = start_ray_serve(throughput_optimized=True)
    try:
        deploy_app(port, "hops", {"engine": {"kind": "simulated"}},
                   replica_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}})
        load = psutil.getloadavg()[0]
        times = asyncio.run(measure_hops("hops", args.requests))
    finally:
        stop_ray_serve()
    text = "\n".join(["# c=1: the two hops before the first token", "", f"Machine: {machine()}", "",
                      f"{args.requests} requests one at a time (64-token prompts, 1 output token, simulated engine), "
                      f"load average {load:.1f} at the start.", "", *table(times), ""])
    print(text)
    write_result(args.name, text)


if __name__ == "__main__":
    main()
