"""Takes docs/img/ray_dashboard_serve.png: the Ray dashboard's Serve page with sglserve running.

Starts a local Ray cluster WITH the dashboard, deploys the tiny-model application, sends a little
traffic, and screenshots http://127.0.0.1:<dashboard port>/#/serve with headless Chromium
(`apt-get install chromium`). Everything it started is shut down at the end.

    .venv/bin/python docs/img/capture_ray_dashboard.py [--page serve|overview|metrics]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import httpx  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--page", default="serve")
    parser.add_argument("--out", default=str(Path(__file__).with_name("ray_dashboard_serve.png")))
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Chromium: apt-get install -y chromium")

    import ray
    from ray import serve

    from app.config import AppSettings
    from app.deployments import build

    dashboard_port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=dashboard_port, log_to_driver=False, configure_logging=False)
    try:
        http_port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        settings = AppSettings.from_args({
            "model": {"cache_dir": str(REPO / ".cache" / "models")},
            "engine": {"max_total_tokens": 16384, "torch_threads": 1},
        })
        small = {"ray_actor_options": {"num_cpus": 0.1}}
        app = build(settings, {"Ingress": small, "Scheduler": small,
                               "ModelReplica": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}})
        serve.run(app, name="sglserve", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"{base}/ready", timeout=60).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the application did not become ready")
            time.sleep(1)
        for i in range(8):
            httpx.post(f"{base}/v1/completions", json={"model": settings.model.name, "prompt": f"Hello {i}",
                                                       "max_tokens": 16}, timeout=120)
        time.sleep(5)  # let the dashboard poll the Serve controller
        url = f"http://127.0.0.1:{dashboard_port}/#/{args.page}"
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--window-size=1600,1000", "--virtual-time-budget=20000", f"--screenshot={args.out}", url],
            check=True, timeout=120, capture_output=True,
        )
        print(f"wrote {args.out} from {url}")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
