"""Chaos benchmark: faults under closed-loop HTTP load, what the clients saw, time to recover.

Scenarios, each on a fresh fault after the previous one recovered (bench/fault_load.py):
  1. kill -9 of the engine child, 1 replica, warm spare on (the default)   } both sides of the
  2. kill -9 of the engine child, 1 replica, warm spare off (cold restart)  } restart, one run
  3. kill -9 of one engine child, 2 replicas
  4. kill of a ModelReplica actor, 2 replicas (Serve starts a new one)
  5. kill of the Scheduler actor      6. kill of the Ingress actor
Counts: requests, lost (non-streamed / streamed), HTTP 5xx, HTTP 503 (with Retry-After), internal
500s, recovery (fault -> first success of a request sent after it), and for engine kills the
engine's own restart time (death noticed -> new child ready, as the replica measured it).

    .venv/bin/python -m bench.chaos [--clients 8]

Results: bench/results/chaos.md + chaos.png (a timeline of outcomes around each fault).
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from collections import Counter
from typing import Any

import httpx

from bench.common import RESULTS, deploy_app, machine, stop_ray_serve, write_result
from bench.fault_load import FaultRun, run_fault, start_ray_serve_retrying

DEADLINE_S = 300.0
CACHE_DIR = os.environ.get("SGLSERVE_TEST_CACHE", os.path.join(os.getcwd(), ".cache", "models"))


def app_args(warm_spare: bool, default_max_tokens: int = 24) -> dict[str, Any]:
    return {
        "model": {"model_path": "sglserve/tiny-llama", "cache_dir": CACHE_DIR},
        "engine": {"kind": "embedded", "max_total_tokens": 16384, "torch_threads": 1,
                   "restart_backoff_s": 0.0, "warm_spare_process": warm_spare},
        "scheduler": {"max_queue": 256, "max_concurrent": 64, "max_queue_wait_s": 60},
        "ingress": {"default_max_tokens": default_max_tokens},
    }


def replicas(n: int) -> dict[str, Any]:
    return {"num_replicas": n, "ray_actor_options": {"num_cpus": 0.5}}


def actor_names(app: str, deployment: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def server_args_of(app: str, replica_id: str) -> dict[str, Any]:
    from ray import serve

    handle = serve.get_deployment_handle("ModelReplica", app_name=app)
    return handle.server_args.remote(target_replica=replica_id).result(timeout_s=120)


def kill_actor(name: str) -> None:
    import ray

    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def engine_kill(base: str, app: str, label: str, clients: int) -> tuple[FaultRun, float | None]:
    victim = actor_names(app, "ModelReplica")[0].rsplit("#", 1)[1]
    deadline = time.monotonic() + DEADLINE_S
    while server_args_of(app, victim).get("warm_spare_ready") is False and time.monotonic() < deadline:
        time.sleep(0.2)  # measure the restart the spare is for (cold runs report None, not False)
    before = server_args_of(app, victim)
    pid, restarts = before["engine_pid"], before["engine_restarts"]
    run = run_fault(base, label, lambda: os.kill(pid, signal.SIGKILL),
                    lambda: server_args_of(app, victim)["engine_restarts"] > restarts,
                    clients=clients, deadline_s=DEADLINE_S)
    return run, server_args_of(app, victim)["last_engine_restart_s"]


def actor_kill(base: str, app: str, deployment: str, label: str, clients: int) -> FaultRun:
    victim = actor_names(app, deployment)[0]

    def recovered() -> bool:
        if actor_names(app, deployment) in ([], [victim]) or victim in actor_names(app, deployment):
            return False
        try:
            return httpx.get(f"{base}/ready", timeout=60).status_code == 200
        except httpx.HTTPError:
            return False

    return run_fault(base, label, lambda: kill_actor(victim), recovered, clients=clients, deadline_s=DEADLINE_S)


def timeline(run: FaultRun, bin_s: float = 0.5) -> dict[str, list[tuple[float, int]]]:
    """Outcomes per bin of completion time, relative to the fault: ok / 503 / other failures."""
    counts: dict[str, Counter] = {"ok": Counter(), "503": Counter(), "other": Counter()}
    for o in run.outcomes:
        t = round((o.ended - run.fault_at) / bin_s) * bin_s
        key = "ok" if o.ok else "503" if o.status == 503 else "other"
        counts[key][t] += 1
    return {k: sorted(c.items()) for k, c in counts.items()}


def plot(runs: list[FaultRun], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.2 * len(runs)), sharex=True)
    for ax, run in zip(axes, runs):
        for key, color in (("ok", "tab:green"), ("503", "tab:orange"), ("other", "tab:red")):
            points = timeline(run)[key]
            if points:
                xs, ys = zip(*points)
                ax.bar(xs, ys, width=0.45, color=color, alpha=0.8, label=key)
        ax.axvline(0, color="black", lw=1)
        ax.axvline(run.recovered_at - run.fault_at, color="gray", lw=1, ls="--")
        ax.set_ylabel("req / 0.5 s")
        ax.set_title(run.name, fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("seconds from the fault (solid line); dashed: recovery seen")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


ROW_KEYS = ["requests", "ok", "lost", "lost_completion", "lost_stream", "http_503", "internal_500",
            "lost_in_flight_at_fault", "lost_sent_after_fault", "recovery_s"]


def report(runs: list[FaultRun], restart_s: dict[str, float | None], clients: int, wall_s: float) -> str:
    header = "| scenario | " + " | ".join(ROW_KEYS) + " | engine restart s |"
    lines = [
        "# Chaos: faults under closed-loop load",
        "",
        f"Machine: {machine()}.",
        "",
        f"`python -m bench.chaos --clients {clients}`: {clients} closed-loop clients (half streamed, half "
        "not, `/v1/completions`, 24 tokens, greedy, tiny model, embedded engine in its child process), "
        "each fault injected once requests flow and measured until requests succeed again. "
        f"Whole run {wall_s:.0f} s. THE MACHINE IS SHARED by 8 developers (see the load average "
        "above): absolute times are pessimistic; the ratios between the two restart modes are what "
        "carries over.",
        "",
        "Columns: `lost` = requests whose client did not get a complete answer (`lost_completion`: "
        "non-streamed, `lost_stream`: streamed); `http_503` all carried Retry-After (checked: "
        "`503_without_retry_after` below); `internal_500` = HTTP 500 or an internal_error event in a "
        "stream; `recovery_s` = fault -> first success of a request sent after the fault; `engine "
        "restart s` = the replica's own measure (death noticed -> new engine child ready).",
        "",
        header,
        "|" + "---|" * (len(ROW_KEYS) + 2),
    ]
    for run in runs:
        s = run.summary
        restart = restart_s.get(run.name)
        lines.append(f"| {run.name} | " + " | ".join(str(s.get(k)) for k in ROW_KEYS)
                     + f" | {'' if restart is None else f'{restart:.2f}'} |")
    lines += ["", "Other counts per scenario (0 expected, except where the reading below says why):"]
    for run in runs:
        s = run.summary
        lines.append(f"- {run.name}: 503_without_retry_after={s['503_without_retry_after']}, "
                     f"badly_shaped={s['badly_shaped']}, transport_errors={s['transport_errors']}, "
                     f"error codes seen: {', '.join(s['error_codes']) or 'none'}")
    lines += ["", "(Add the reading of this run here: what failed, how, and whose job it is.)", "",
              "![timeline](chaos.png) Outcomes per 0.5 s around each fault (green ok, orange HTTP 503, "
              "red anything else, including retryable error events in streams).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    started = time.monotonic()
    port = start_ray_serve_retrying()
    runs: list[FaultRun] = []
    restart_s: dict[str, float | None] = {}
    try:
        from ray import serve

        base = deploy_app(port, "chaos1", app_args(warm_spare=True), replicas(1))
        for warm, label in ((True, "engine kill, 1 replica, warm spare"),
                            (False, "engine kill, 1 replica, cold restart")):
            if not warm:  # same app, redeployed with the spare off
                base = deploy_app(port, "chaos1", app_args(warm_spare=False), replicas(1))
            run, restart_s[label] = engine_kill(base, "chaos1", label, args.clients)
            runs.append(run)
            print(label, run.summary, flush=True)
        serve.delete("chaos1")
        base = deploy_app(port, "chaos2", app_args(warm_spare=True), replicas(2))
        run, restart_s["engine kill, 2 replicas"] = engine_kill(base, "chaos2", "engine kill, 2 replicas", args.clients)
        runs.append(run)
        for deployment in ("ModelReplica", "Scheduler", "Ingress"):
            label = f"{deployment} actor kill, 2 replicas"
            runs.append(actor_kill(base, "chaos2", deployment, label, args.clients))
            print(label, runs[-1].summary, flush=True)
    finally:
        stop_ray_serve()
    plot(runs, RESULTS / "chaos.png")
    path = write_result("chaos", report(runs, restart_s, args.clients, time.monotonic() - started))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
