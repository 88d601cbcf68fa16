"""Cold start from zero replicas: the time from a request arriving at a deployment scaled to zero to
its response, per engine (the simulated engine with no modelled load time = Ray Serve's own replica
start; the embedded engine with the tiny model). Private local Ray cluster, real HTTP.

    .venv/bin/python -m bench.cold_start        # writes bench/results/cold_start.md
"""

from __future__ import annotations

import time

import httpx

from bench.common import machine, percentile, start_ray_serve, stop_ray_serve, write_result

ZERO = {
    "min_replicas": 0, "initial_replicas": 0, "max_replicas": 1, "target_ongoing_requests": 4,
    "metrics_interval_s": 0.5, "look_back_period_s": 2.0, "upscale_delay_s": 0.0,
    "downscale_delay_s": 1.0, "downscale_to_zero_delay_s": 1.0,
    "policy": {"policy_function": "app.autoscaling:ReplicaAutoscalingPolicy",
               "policy_kwargs": {"ttft_slo_ms": 2000, "startup_time_s": 10}},
}
ENGINES = {
    "simulated (no modelled load time: Serve's replica start alone)": {"kind": "simulated"},
    "embedded, tiny model (3.6M parameters, CPU)": {"kind": "embedded", "torch_threads": 1},
}
ROUNDS = 3


def replicas(name: str) -> int:
    from ray import serve

    states = serve.status().applications[name].deployments["ModelReplica"].replica_states
    return sum(n for state, n in states.items() if state != "STOPPING")


def wait(condition, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (httpx.HTTPError, KeyError):
            pass
        time.sleep(0.25)
    raise RuntimeError("timed out")


def measure(port: int, name: str, engine: dict) -> list[float]:
    from ray import serve

    from app.config import AppSettings
    from app.deployments import build

    args = {"model": {"served_model_name": "m"}, "engine": engine,
            "scheduler": {"max_queue_wait_s": 300}, "ingress": {"default_max_tokens": 8, "ready_timeout_s": 300}}
    small = {"ray_actor_options": {"num_cpus": 0.1}}
    options = {"Ingress": small, "Scheduler": small,
               "ModelReplica": {"autoscaling_config": ZERO, "ray_actor_options": {"num_cpus": 1}}}
    serve.run(build(AppSettings.from_args(args), options), name=name, route_prefix=f"/{name}", blocking=False)
    base = f"http://127.0.0.1:{port}/{name}"
    wait(lambda: httpx.get(f"{base}/health", timeout=10).status_code == 200)
    times = []
    for _ in range(ROUNDS):
        wait(lambda: replicas(name) == 0)
        sent = time.monotonic()
        response = httpx.post(f"{base}/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 4},
                              timeout=600)
        response.raise_for_status()
        times.append(time.monotonic() - sent)
    serve.delete(name)
    return times


def main() -> None:
    port = start_ray_serve()
    rows = []
    try:
        for i, (label, engine) in enumerate(ENGINES.items()):
            times = measure(port, f"cold{i}", engine)
            rows.append((label, times))
            print(label, [f"{t:.1f}" for t in times])
    finally:
        stop_ray_serve()
    lines = [
        "# Cold start from zero replicas", "",
        f"Machine: {machine()} (shared by 8 developers: these times carry their load).",
        "Command: `.venv/bin/python -m bench.cold_start`. A deployment with `min_replicas: 0` and no",
        "replica; the time from sending one /v1/completions (4 tokens) to its 200 response: Serve",
        "notices the waiting request, starts a replica actor, the engine starts, the request is served.",
        f"{ROUNDS} rounds per engine, each after the deployment went back to zero.", "",
        "| engine | cold starts (s) | median (s) |", "|---|---|---|",
    ]
    for label, times in rows:
        lines.append(f"| {label} | {', '.join(f'{t:.1f}' for t in times)} | {percentile(times, 50):.1f} |")
    lines += ["", "SGLang on an H100 (Llama-3.1-8B shape, dummy weights, CUDA graphs): the engine alone started in",
              "113 s (bench/gpu/results.md); a replica's cold start adds Serve's replica start (the first row)",
              "and, on a cloud, the GPU node's boot and the weights' download.", ""]
    print(write_result("cold_start", "\n".join(lines)))


if __name__ == "__main__":
    main()
