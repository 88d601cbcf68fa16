"""What the three-deployment design costs by itself, before any of sglserve's own logic.

Part 1, transport: the time to the first of 64 streamed items (one every 3.5 ms, a c=1 decode)
and the items/s at 32 concurrent streams, through 1, 2 and 3 processes in a chain, for three
transports between processes: plain asyncio TCP, Ray actor calls (streaming generators) and Ray
Serve handles (throughput mode, the fastest Serve offers; the first process serves HTTP). Nothing
but the transport runs: no engine, no validation, no coalescing.

Part 2, with the engine: the in-process engine, a *floor* application, and sglserve, all driven
like bench/overhead.py (same prompts, rounds alternating in one process). The floor application
has the same shape as sglserve and nothing else: an Ingress that reads the JSON and writes
OpenAI-shaped SSE chunks -> a pass-through deployment -> sglserve's own ModelReplica (the engine
in its process, coalescing), over Ray Serve handles in throughput mode; and the same with two
deployments (no middle hop, as if the Scheduler were off the token path). No validation,
admission, routing policy, metrics, auth or logging. What a floor loses against the engine is the
cost of the design on this machine; what sglserve loses beyond it is sglserve's own.

    python -m bench.architecture_floor [--quick]
"""


import argparse
import asyncio
import json
import multiprocessing
import sys
import time
from typing import Any

from fastapi import FastAPI, Request
from ray import cloudpickle
from starlette.responses import StreamingResponse
from tqdm import tqdm

from bench.common import (
    RESULTS,
    closed_loop,
    free_port,
    machine,
    percentile,
    start_ray_serve,
    stop_ray_serve,
    wait_ready,
    write_result,
)
from bench.overhead import CACHE_DIR, ENGINE, make_prompts, replica_options, run_interleaved

ITEMS = 64
STEP_S = 0.0035  # one decode step of the embedded engine at c=1 on this machine (~285 tok/s)
INGRESS_PORTS = 8  # direct-ingress ports: one per application; Serve quarantines a released one for 150 s
# Ray Serve deployments defined here are shipped to the workers by value (bench/ is not installed).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# -- Part 1: transports, nothing else -----------------------------------------------------------------


async def paced_items(n: int):
    for i in range(n):
        if i:
            await asyncio.sleep(STEP_S)
        yield i


async def timed_streams(open_stream, concurrency: int, total: int) -> tuple[float, float]:
    """Run `total` streams, `concurrency` at a time: (time-to-first-item p50 in ms, items/s)."""

    async def first_item_s(_: int) -> float:
        started, first, items = time.perf_counter(), None, 0
        async for _item in open_stream():
            items += 1
            if first is None:
                first = time.perf_counter() - started
        assert items == ITEMS, f"a stream gave {items} of {ITEMS} items"
        return first

    firsts, wall = await closed_loop(first_item_s, concurrency, total)
    return percentile(firsts, 50) * 1000, total * ITEMS / wall


# Plain TCP: each process a line-protocol server; a "go" line starts ITEMS lines back, then "end".
def tcp_node(port: int, downstream: int | None) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if downstream is None:
            while await reader.readline():
                async for i in paced_items(ITEMS):
                    writer.write(b"%d\n" % i)
                writer.write(b"end\n")
            return
        down_reader, down_writer = await asyncio.open_connection("127.0.0.1", downstream)
        while line := await reader.readline():
            down_writer.write(line)
            while (item := await down_reader.readline()) != b"end\n":
                writer.write(item)
            writer.write(item)

    async def serve_forever() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        await server.serve_forever()

    asyncio.run(serve_forever())


async def tcp_streams(port: int, concurrency: int, total: int) -> tuple[float, float]:
    pool: asyncio.Queue = asyncio.Queue()
    for _ in range(concurrency):
        pool.put_nowait(await asyncio.open_connection("127.0.0.1", port))

    async def one():
        reader, writer = await pool.get()
        try:
            writer.write(b"go\n")
            while (line := await reader.readline()) != b"end\n":
                yield line
        finally:
            pool.put_nowait((reader, writer))

    try:
        return await timed_streams(one, concurrency, total)
    finally:
        while not pool.empty():
            pool.get_nowait()[1].close()


def wait_listening(port: int, timeout_s: float = 60.0) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def measure_tcp(levels) -> dict[int, dict[int, tuple[float, float]]]:
    """{processes in the chain: {concurrency: (first item p50 ms, items/s)}}"""
    ctx = multiprocessing.get_context("spawn")
    ports = [free_port() for _ in range(3)]
    nodes = [ctx.Process(target=tcp_node, args=(ports[0], None), daemon=True)]
    nodes += [ctx.Process(target=tcp_node, args=(ports[i], ports[i - 1]), daemon=True) for i in (1, 2)]
    for node in nodes:
        node.start()
    try:
        for port in ports:  # the nodes are ready once they accept connections
            wait_listening(port)
        return {hops + 1: {c: asyncio.run(tcp_streams(ports[hops], c, n)) for c, n in levels} for hops in range(3)}
    finally:
        for node in nodes:
            node.terminate()
            node.join(5)


def measure_ray_actors(levels) -> dict[int, dict[int, tuple[float, float]]]:
    import ray

    @ray.remote(num_cpus=0.1)
    class Leaf:
        async def items(self, n: int):
            async for i in paced_items(n):
                yield i

    @ray.remote(num_cpus=0.1)
    class Relay:
        def __init__(self, downstream):
            self.downstream = downstream

        async def items(self, n: int):
            async for ref in self.downstream.items.options(num_returns="streaming").remote(n):
                yield await ref

    leaf = Leaf.remote()
    chain = [leaf, Relay.remote(leaf)]
    chain.append(Relay.remote(chain[1]))

    def opener(actor):
        async def one():
            async for ref in actor.items.options(num_returns="streaming").remote(ITEMS):
                yield await ref
        return one

    results = {}
    for hops, actor in enumerate(chain):
        asyncio.run(timed_streams(opener(actor), 1, 4))  # warm
        results[hops + 1] = {c: asyncio.run(timed_streams(opener(actor), c, n)) for c, n in levels}
    for actor in chain:
        ray.kill(actor)
    return results


def transport_app():
    """Ray Serve: an HTTP ingress with three endpoints, through 0, 1 or 2 handle hops."""
    from ray import serve

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1000)
    class Leaf:
        async def items(self, n: int):
            async for i in paced_items(n):
                yield i

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1000)
    class Relay:
        def __init__(self, downstream):
            self.downstream = downstream.options(stream=True)

        async def items(self, n: int):
            async for i in self.downstream.items.remote(n):
                yield i

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1000)
    @serve.ingress(api)
    class Front:
        def __init__(self, leaf, relay):
            self.sources = {1: lambda n: paced_items(n), 2: leaf.options(stream=True).items.remote,
                            3: relay.options(stream=True).items.remote}

        @api.get("/ready")
        def ready(self) -> str:
            return "ok"

        @api.get("/items/{processes}")
        async def items(self, processes: int):
            source = self.sources[processes](ITEMS)

            async def body():
                async for i in source:
                    yield b"%d\n" % i

            return StreamingResponse(body(), media_type="text/plain")

    leaf = Leaf.bind()
    return Front.bind(leaf, Relay.bind(leaf))


async def http_streams(url: str, concurrency: int, total: int) -> tuple[float, float]:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
        async def one():
            async with session.get(url) as resp:
                async for line in resp.content:
                    yield line

        await timed_streams(one, 1, 2)  # warm
        return await timed_streams(one, concurrency, total)


def measure_serve(port: int, levels) -> dict[int, dict[int, tuple[float, float]]]:
    from ray import serve

    serve.run(transport_app(), name="transport", route_prefix="/transport", blocking=False)
    base = wait_ready(port, "transport", ingress_ports=INGRESS_PORTS)
    try:
        return {p: {c: asyncio.run(http_streams(f"{base}/items/{p}", c, n)) for c, n in levels} for p in (1, 2, 3)}
    finally:
        serve.delete("transport")


# -- Part 2: the floor application around sglserve's ModelReplica ---------------------------------------


def floor_app(settings: dict[str, Any], deployments: int, device: str):
    """HTTP -> FloorIngress -> PassThrough -> ModelReplica (3 deployments) or HTTP -> FloorIngress
    -> ModelReplica (2), and nothing else."""
    from ray import serve

    from app.protocol import GenerateRequest, SamplingParams
    from app.replica import ModelReplicaDeployment

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1024)
    class PassThrough:
        def __init__(self, replica):
            self.replica = replica.options(stream=True)

        async def generate(self, request):
            async for out in self.replica.generate.remote(request):
                yield out

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1024)
    @serve.ingress(api)
    class FloorIngress:
        def __init__(self, downstream):
            self.downstream = downstream.options(stream=True)

        @api.get("/ready")
        async def ready(self) -> str:
            request = GenerateRequest(text="hi", sampling=SamplingParams(max_new_tokens=1))
            async for _ in self.downstream.generate.remote(request):
                pass
            return "ok"

        @api.post("/v1/completions")
        async def completions(self, http: Request):
            body = json.loads(await http.body())
            request = GenerateRequest(input_ids=body["prompt"], stream=True, sampling=SamplingParams(
                max_new_tokens=body["max_tokens"], temperature=body["temperature"], ignore_eos=body["ignore_eos"]))
            outputs = self.downstream.generate.remote(request)

            async def events():
                created = int(time.time())
                async for out in outputs:
                    chunk = {"id": request.rid, "object": "text_completion", "created": created,
                             "model": body["model"], "choices": [
                                 {"index": 0, "text": out.text,
                                  "finish_reason": out.finish_reason.to_openai() if out.finish_reason else None}]}
                    yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
                    if out.finished:
                        usage = {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                                 "total_tokens": out.prompt_tokens + out.completion_tokens}
                        yield b"data: " + json.dumps({**chunk, "choices": [], "usage": usage}).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

    replica = ModelReplicaDeployment.options(**replica_options(device)).bind(settings)
    return FloorIngress.bind(PassThrough.bind(replica) if deployments == 3 else replica)


# -- report -----------------------------------------------------------------------------------------------


def transport_table(rows: dict[str, dict[int, dict[int, tuple[float, float]]]], levels) -> list[str]:
    c_low, c_high = levels[0][0], levels[-1][0]
    lines = [f"| transport | processes | first item p50, c={c_low} | added per hop | items/s, c={c_high} |",
             "|---|---|---|---|---|"]
    for name, chains in rows.items():
        base = chains[1][c_low][0]
        for processes, by_level in chains.items():
            per_hop = (by_level[c_low][0] - base) / (processes - 1) if processes > 1 else float("nan")
            hop = f"{per_hop:.2f} ms" if processes > 1 else "-"
            lines.append(f"| {name} | {processes} | {by_level[c_low][0]:.2f} ms | {hop} | {by_level[c_high][1]:,.0f} |")
    return lines


def engine_table(results: dict[str, dict[int, dict]]) -> list[str]:
    lines = ["| concurrency | side | TTFT p50 | added TTFT p50 | TTFT p99 | tok/s | ratio to the engine |",
             "|---|---|---|---|---|---|---|"]
    engine = results["engine"]
    for level in engine:
        for side, by_level in results.items():
            r, e = by_level[level], engine[level]
            added = "-" if side == "engine" else f"{r['ttft_p50_ms'] - e['ttft_p50_ms']:+.1f} ms"
            ratio = "-" if side == "engine" else f"{r['tok_s'] / e['tok_s']:.2f}"
            lines.append(f"| {level} | {side} | {r['ttft_p50_ms']:.1f} ms | {added} | {r['ttft_p99_ms']:.1f} ms "
                         f"| {r['tok_s']:.0f} | {ratio} |")
    return lines


def floor_table(results: dict[str, dict[int, dict]], floor: str = "floor, 2 deployments") -> list[str]:
    """Each sglserve side against the floor app (per round too: rounds alternate, so the per-round
    ratios show how much the shared machine moved)."""
    if floor not in results:
        return []
    lines = [f"Against *{floor}* (tok/s ratio over the whole level, and per round):", "",
             "| concurrency | side | tok/s ratio to the floor | per round | TTFT p50 vs the floor |", "|---|---|---|---|---|"]
    for level, base in results[floor].items():
        for side, by_level in results.items():
            if not side.startswith("sglserve"):
                continue
            r = by_level[level]
            rounds = ", ".join(f"{a / b:.2f}" for a, b in zip(r["round_tok_s"], base["round_tok_s"]))
            lines.append(f"| {level} | {side} | {r['tok_s'] / base['tok_s']:.3f} | {rounds} | "
                         f"{r['ttft_p50_ms'] - base['ttft_p50_ms']:+.1f} ms |")
    return lines


def plot(transports: dict, results: dict, levels, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    c_low = levels[0][0]
    for transport, chains in transports.items():
        left.plot(list(chains), [chains[p][c_low][0] for p in chains], marker="o", label=transport)
    left.axhline(5.0, color="tab:red", linestyle="--", label="issue 2's added-TTFT target")
    left.set_xticks([1, 2, 3])
    left.set_xlabel("processes in the chain")
    left.set_ylabel(f"time to first item, p50 (ms), c={c_low}")
    left.set_title("transport alone (no engine)", fontsize=10)
    left.legend(fontsize=8)
    conc = list(results["engine"])
    x = range(len(conc))
    others = [side for side in results if side != "engine"]
    width = 0.8 / len(others)
    for k, side in enumerate(others):
        right.bar([i - 0.4 + width * (k + 0.5) for i in x],
                  [results[side][c]["tok_s"] / results["engine"][c]["tok_s"] for c in conc], width, label=side)
    right.axhline(0.95, color="tab:red", linestyle="--", label="target at c=32")
    right.set_xticks(list(x), [str(c) for c in conc])
    right.set_ylim(0, 1.1)
    right.set_xlabel("concurrent requests")
    right.set_ylabel("throughput ratio")
    right.set_title("with the engine", fontsize=10)
    right.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (smoke run)")
    parser.add_argument("--rounds", type=int, default=4, help="alternations per level (part 2)")
    parser.add_argument("--name", default="architecture_floor", help="results file name (.md and .png)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the engine runs (all sides)")
    parser.add_argument("--levels", default="1,8,32", help="concurrency levels of part 2, e.g. 32")
    parser.add_argument("--floors", default="3,2", help="which floor applications (deployments), e.g. 2")
    parser.add_argument("--no-transports", action="store_true", help="skip part 1")
    parser.add_argument("--unbatched", action="store_true",
                        help="add a side: sglserve with one admit call per request (scheduler.batch_admits false)")
    parser.add_argument("--per-chunk", action="store_true",
                        help="add a side: sglserve writing one SSE event per coalesced chunk, as the floor apps do "
                             "(ingress.stream_chunk_per_token false)")
    args = parser.parse_args()
    scale = 0.25 if args.quick else 1.0
    transport_levels = [(1, max(10, int(60 * scale))), (32, max(64, int(320 * scale)))]
    counts = {1: max(4, int(24 * scale)), 8: max(32, int(96 * scale)), 32: max(128, int(384 * scale))}
    levels = [(int(lv), counts.get(int(lv), max(4 * int(lv), int(12 * int(lv) * scale))))
              for lv in args.levels.split(",")]
    prompts = {level: make_prompts(count, 64, seed=level) for level, count in levels}

    with tqdm(total=3, desc="transports") as bar:
        transports = {} if args.no_transports else {"plain TCP (asyncio)": measure_tcp(transport_levels)}
        bar.update()
        port = start_ray_serve(throughput_optimized=True, ingress_ports=INGRESS_PORTS)
        try:
            if not args.no_transports:
                transports["Ray actor calls"] = measure_ray_actors(transport_levels)
                bar.update()
                transports["Ray Serve handles (throughput mode)"] = measure_serve(port, transport_levels)
                bar.update()

            from ray import serve

            from app.config import AppSettings
            from bench.common import deploy_app

            settings = {"model": {"cache_dir": CACHE_DIR}, "engine": {**ENGINE, "device": args.device},
                        "scheduler": {"max_concurrent": 256, "max_queue": 1024}}
            raw = AppSettings.from_args(settings).model_dump(mode="json")
            bases = {}
            for deployments in [int(d) for d in args.floors.split(",")]:
                name = f"floor{deployments}"
                serve.run(floor_app(raw, deployments, args.device), name=name, route_prefix=f"/{name}", blocking=False)
                bases[f"floor, {deployments} deployments"] = wait_ready(port, name, ingress_ports=INGRESS_PORTS)
            bases["sglserve"] = deploy_app(port, "sglserve", settings, replica_options=replica_options(args.device),
                                           ingress_ports=INGRESS_PORTS)
            if args.unbatched:
                unbatched = {**settings, "scheduler": {**settings["scheduler"], "batch_admits": False}}
                bases["sglserve, one admit call per request"] = deploy_app(
                    port, "sglserveu", unbatched, replica_options=replica_options(args.device), ingress_ports=INGRESS_PORTS)
            if args.per_chunk:
                per_chunk = {**settings, "ingress": {"stream_chunk_per_token": False}}
                bases["sglserve, one SSE event per chunk"] = deploy_app(
                    port, "sglservec", per_chunk, replica_options=replica_options(args.device), ingress_ports=INGRESS_PORTS)
            results = asyncio.run(run_interleaved(bases, levels, prompts, 64, args.rounds, args.device))
        finally:
            stop_ray_serve()

    text = "\n".join([
        "# What the three-deployment design costs by itself",
        "",
        f"Machine: {machine()}",
        "",
        "## Transport alone",
        "",
        f"{ITEMS} items per stream, one every {STEP_S * 1000:.1f} ms, through a chain of processes; the first "
        "process is where the client connects (for Ray Serve, the Ingress serving HTTP itself in throughput "
        "mode; for Ray actors, the driver calls the first actor). No engine, no validation, no coalescing: "
        "one message per item per hop.",
        "",
        *(transport_table(transports, transport_levels) if transports else ["(not run: --no-transports)"]),
        "",
        "## With the engine",
        "",
        f"The same workload as bench/overhead.py (prompts of 64 token ids, 64 output tokens, greedy, engine on "
        f"{args.device} with one torch thread), sides alternating in rounds in one process. *floor, 3 deployments*: HTTP -> an Ingress that "
        "only parses JSON and writes SSE -> a pass-through deployment -> sglserve's ModelReplica (engine "
        "process, coalescing), Ray Serve throughput mode. *floor, 2 deployments*: the same without the "
        "pass-through (no Scheduler hop at all). *sglserve*: the whole application, same mode (since issue 16: "
        "the Ingress takes a ticket from the Scheduler, then streams from the ModelReplica in one hop; "
        "its admits are batched, app/ingress/admits.py; *one admit call per request* is the same without that).",
        "",
        *engine_table(results),
        "",
        *floor_table(results),
        "",
        "Targets (issue 2): added TTFT p50 <= 5 ms at c=1; throughput ratio >= 0.95 at c=32.",
        "",
        f"![transport and floor]({args.name}.png)",
        "",
    ])
    print(text)
    write_result(args.name, text)
    plot(transports, results, levels, args.name)


if __name__ == "__main__":
    main()
