"""Per-key rate limits over real HTTP through TWO Ingress replicas: the served rate against the
limit, with the Redis backend (one shared bucket) and the local backend (a bucket per replica),
both in one run.

A key limited to 600 requests/min (10/s, burst 20) is offered twice that (20/s, paced, 4 client
threads) for `--seconds`; we count the 200s. The enforced rate is (admitted - burst) / seconds.

    python -m bench.ratelimit --seconds 40      # ~4 minutes on 2 shared cores (mostly start-up)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import threading
import time
import uuid

import httpx

from bench.common import RESULTS, free_port, machine, percentile, start_ray_serve, stop_ray_serve, wait_ready, write_result

RPM, BURST = 600, 20
KEY = f"sk-bench-{uuid.uuid4().hex[:12]}"


def start_redis() -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    return proc, f"redis://127.0.0.1:{port}/0", workdir


def app_args(backend: str, redis_url: str) -> dict:
    from app.security import hash_key
    from tests.conftest import serve_args

    return serve_args(
        security={"api_keys": [{"id": "bench", "key_sha256": hash_key(KEY),
                                "rate_limit": {"requests_per_minute": RPM, "burst_requests": BURST}}]},
        rate_limits={"backend": backend, "redis_url": redis_url if backend == "redis" else None,
                     "key_prefix": f"bench-{uuid.uuid4().hex[:6]}:"},
    )


def offer(url: str, rate_per_s: float, seconds: float, threads: int = 4) -> list[tuple[float, int, float]]:
    """Requests at a fixed pace; returns (offset of the send, status, latency) per request."""
    total = int(rate_per_s * seconds)
    start = time.monotonic() + 0.5
    lock, results, next_index = threading.Lock(), [], [0]

    def worker() -> None:
        with httpx.Client(timeout=30) as client:
            while True:
                with lock:
                    i = next_index[0]
                    next_index[0] += 1
                if i >= total:
                    return
                due = start + i / rate_per_s
                time.sleep(max(0.0, due - time.monotonic()))
                sent = time.monotonic()
                status = client.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code
                with lock:
                    results.append((sent - start, status, time.monotonic() - sent))

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sorted(results)


def summarize(name: str, results: list[tuple[float, int, float]]) -> dict:
    admitted = sum(1 for _, s, _ in results if s == 200)
    window = max(t for t, _, _ in results)  # from the first send to the last
    limit = RPM / 60.0
    served = (admitted - BURST) / window
    return {"name": name, "offered": len(results), "offered_rate": len(results) / window, "admitted": admitted,
            "refused": sum(1 for _, s, _ in results if s == 429), "served_rate": served,
            "error": (served - limit) / limit, "window": window,
            "p50_ms": percentile([lat * 1000 for _, s, lat in results if s == 200], 50),
            "curve": [(t, sum(1 for u, s, _ in results if u <= t and s == 200)) for t, _, _ in results]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=40.0)
    opts = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("needs redis-server (apt-get install redis-server)")
    redis_proc, redis_url, workdir = start_redis()
    port = start_ray_serve()
    rows = []
    try:
        from ray import serve

        from app.config import AppSettings
        from app.deployments import build

        two_ingress = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.1}}
        for backend in ("redis", "local"):
            name = f"rl{backend}"
            options = {"Ingress": two_ingress, "Scheduler": {"ray_actor_options": {"num_cpus": 0.1}},
                       "ModelReplica": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}}
            serve.run(build(AppSettings.from_args(app_args(backend, redis_url)), options), name=name,
                      route_prefix=f"/{name}", blocking=False)
            base = wait_ready(port, name)
            results = offer(f"{base}/v1/models", 2 * RPM / 60.0, opts.seconds)
            rows.append(summarize(backend, results))
            serve.delete(name)
    finally:
        stop_ray_serve()
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    report(rows, opts.seconds)


def report(rows: list[dict], seconds: float) -> None:
    lines = [
        "# Rate limits across two Ingress replicas: served rate against the limit",
        "",
        f"Machine: {machine()}.",
        f"Run: `python -m bench.ratelimit --seconds {seconds:.0f}` (kept short: the machine is shared).",
        "",
        f"One key limited to {RPM} requests/min ({RPM / 60:.0f}/s) with a burst of {BURST}, offered twice",
        f"that ({2 * RPM / 60:.0f}/s, paced, 4 client threads, GET /v1/models) through an application",
        "whose Ingress has 2 replicas. Enforced rate = (admitted - burst) / window.",
        "",
        "| backend | offered | offered/s | admitted | 429s | enforced rate /s | error vs limit | p50 ms (200s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['offered']} | {r['offered_rate']:.1f} | {r['admitted']} | {r['refused']} | "
                     f"{r['served_rate']:.2f} | {r['error'] * 100:+.1f}% | {r['p50_ms']:.1f} |")
    lines += [
        "",
        "Reading: with Redis both replicas take from one bucket and the enforced rate is the limit;",
        "the local backend keeps a bucket per replica, so two replicas admit up to twice the limit",
        "(what docs/security.md says: use `backend: redis` whenever the Ingress has several replicas).",
        "The deterministic-clock tests (tests/security/test_ratelimit.py) hold both backends to 5%.",
        "",
    ]
    write_result("ratelimit", "\n".join(lines))
    plot(rows)
    print("\n".join(lines))


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        ts, counts = zip(*r["curve"])
        ax.plot(ts, counts, label=f"{r['name']} backend")
    window = max(r["window"] for r in rows)
    ax.plot([0, window], [BURST, BURST + RPM / 60 * window], "k--", label="burst + limit x t")
    ax.set_xlabel("seconds")
    ax.set_ylabel("requests admitted")
    ax.set_title("One key at 2x its limit, two Ingress replicas")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "ratelimit.png", dpi=110)


if __name__ == "__main__":
    main()
