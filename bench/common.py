"""What the benchmarks share: the machine's description, percentiles, a local Ray Serve stack,
a streaming HTTP client that times the first token, and writing results.

Benchmarks run on loopback only, with bounded request counts, and stop what they start.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
MODEL = "sglserve/tiny-llama"


def machine() -> str:
    """One line about the machine and the versions that matter, for every results file."""
    import torch

    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()[0]
    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = "n/a"
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM{gpu}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, Ray {ray_version}; "
        f"load average at start {load:.1f}"
    )


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_result(name: str, markdown: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(markdown)
    return path


# -- a local Ray Serve stack -------------------------------------------------------------------------

# Ray Serve's throughput mode, and a short drain so that a benchmark's shutdown does not wait the
# default 30 s for the direct-ingress drain.
THROUGHPUT_MODE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def start_ray_serve(throughput_optimized: bool = False, ingress_ports: int = 2, **ray_kwargs: Any) -> int:
    """Start a private local Ray cluster and Serve's HTTP proxy on a free loopback port; returns
    the port that serves HTTP.

    `throughput_optimized` turns on Ray Serve's own throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED:
    the ingress replica serves HTTP itself, with no proxy hop; handles talk gRPC; user code and the
    router run on the replica's main loop). The Ingress then listens on the returned port (one
    ingress replica per node), set through Serve's direct-ingress port range, which holds
    `ingress_ports` ports: each application's ingress takes the next free one (see deploy_app)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A request whose Ingress died gets a JSON 503 from Serve's proxy (app/proxy_errors.py).
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "app.proxy_errors.proxy_middlewares")
    port = free_port()
    if throughput_optimized:
        os.environ.update(THROUGHPUT_MODE_ENV)
        os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(port)
        os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(port + ingress_ports - 1)
    import ray
    from ray import serve

    for attempt in range(6):  # a busy shared machine can miss Ray's fixed 30 s node start-up window
        try:
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                     configure_logging=False, **ray_kwargs)
            break
        except Exception:  # noqa: BLE001
            ray.shutdown()
            if attempt == 5:
                raise
            time.sleep(10)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port() if throughput_optimized else port})
    return port


def stop_ray_serve() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def deploy_app(port: int, name: str, args: dict, replica_options: dict | None = None,
               timeout_s: float = 300, ingress_ports: int = 1) -> str:
    """Deploy sglserve under /<name> and wait for /ready; returns its base URL."""
    from ray import serve

    from app.config import AppSettings
    from app.deployments import build

    small = {"ray_actor_options": {"num_cpus": 0.1}}
    options = {"Ingress": small, "Scheduler": small,
               "ModelReplica": replica_options or {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}}
    serve.run(build(AppSettings.from_args(args), options), name=name, route_prefix=f"/{name}", blocking=False)
    return wait_ready(port, name, timeout_s, ingress_ports)


def wait_ready(port: int, name: str, timeout_s: float = 300, ingress_ports: int = 1) -> str:
    """Wait until the application under /<name> answers GET /ready with 200; returns its base URL.
    In throughput mode each application's ingress has a port of its own in the range starting at
    `port`, so each of the `ingress_ports` ports is tried."""
    import httpx

    bases = [f"http://127.0.0.1:{p}/{name}" for p in range(port, port + ingress_ports)]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for base in bases:
            try:
                if httpx.get(f"{base}/ready", timeout=60).status_code == 200:
                    return base
            except httpx.HTTPError:
                pass
        time.sleep(1)
    raise RuntimeError(f"{name} did not become ready in {timeout_s:.0f}s")


# -- timing one streamed request ---------------------------------------------------------------------


@dataclass
class StreamTiming:
    ttft_s: float
    total_s: float
    tokens: int


async def stream_completion(session, base: str, body: dict) -> StreamTiming:
    """POST a streaming /v1/completions with an aiohttp session; time the first text and the end.

    aiohttp because the client shares the machine with what it measures: it costs about half the
    CPU of httpx per streamed event here."""
    started = time.perf_counter()
    ttft = None
    tokens = 0
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with session.post(f"{base}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            event = json.loads(line[6:])
            if ttft is None and event.get("choices") and event["choices"][0].get("text"):
                ttft = time.perf_counter() - started
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    total = time.perf_counter() - started
    return StreamTiming(ttft if ttft is not None else total, total, tokens)


async def closed_loop(run_one, concurrency: int, total_requests: int) -> tuple[list[Any], float]:
    """Run `total_requests` calls of `run_one(i)` with `concurrency` workers; (results, wall_s)."""
    results: list[Any] = []
    counter = iter(range(total_requests))
    started = time.perf_counter()

    async def worker() -> None:
        for i in counter:
            results.append(await run_one(i))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - started
