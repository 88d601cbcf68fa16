"""deploy/docker/docker-compose.yml is valid for Compose (checked by the real CLI: `docker compose`
when the plugin is installed, else Debian's `docker-compose`, whose `config` validates against the
Compose Specification schema it ships) and wires what the deployment needs: a GPU service with a
GPU reservation, a model cache volume, the API port and a /ready healthcheck; a CPU service;
Prometheus scraping Ray's metrics port; Grafana provisioned with our dashboard."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "deploy" / "docker" / "docker-compose.yml"
SPEC_SCHEMA = Path("/usr/lib/python3/dist-packages/compose/config/compose_spec.json")  # docker-compose's


def compose_cli() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_config_accepts_the_file():
    cli = compose_cli()
    if cli is None:
        pytest.skip("no Compose CLI here (apt-get install docker-compose; .ci/run does)")
    for profile in ("gpu", "cpu"):
        done = subprocess.run([*cli, "-f", str(COMPOSE), "--profile", profile, "config", "-q"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    rendered = subprocess.run([*cli, "-f", str(COMPOSE), "--profile", "gpu", "config"],
                              capture_output=True, text=True, timeout=120)
    assert "sglserve-gpu" in rendered.stdout


def test_the_cli_refuses_a_broken_file(tmp_path):
    cli = compose_cli()
    if cli is None:
        pytest.skip("no Compose CLI here")
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("    healthcheck:", "    helthcheck:", 1))
    done = subprocess.run([*cli, "-f", str(broken), "config", "-q"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "helthcheck" in (done.stderr + done.stdout)


def test_valid_against_the_compose_spec_json_schema(compose):
    if not SPEC_SCHEMA.exists():
        pytest.skip("the Compose Specification schema ships with Debian's docker-compose package")
    import jsonschema

    jsonschema.validate(compose, json.loads(SPEC_SCHEMA.read_text()))


def test_gpu_service(compose):
    gpu = compose["services"]["sglserve-gpu"]
    assert (COMPOSE.parent / gpu["build"]["context"] / gpu["build"]["dockerfile"]).resolve() == \
        REPO / "deploy" / "docker" / "Dockerfile.gpu"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert any(v.startswith("model-cache:") and v.endswith("/.cache/huggingface") for v in gpu["volumes"])
    assert "model-cache" in compose["volumes"]
    assert any(str(p).endswith(":8000") for p in gpu["ports"])
    assert "/ready" in " ".join(gpu["healthcheck"]["test"])
    assert "--metrics-export-port=8080" in gpu["command"][0]


def test_cpu_service(compose):
    cpu = compose["services"]["sglserve-cpu"]
    assert (COMPOSE.parent / cpu["build"]["context"] / cpu["build"]["dockerfile"]).resolve().exists()
    assert "/ready" in " ".join(cpu["healthcheck"]["test"])
    assert "deploy" not in cpu  # no GPU reservation


def test_prometheus_and_grafana_are_wired_to_the_dashboard(compose):
    prom = compose["services"]["prometheus"]
    mounted = {v.split(":")[0]: v.split(":")[1] for v in prom["volumes"]}
    config = yaml.safe_load((COMPOSE.parent / "prometheus.yml").read_text())
    targets = config["scrape_configs"][0]["static_configs"][0]["targets"]
    assert "./prometheus.yml" in mounted and {"sglserve-gpu:8080", "sglserve-cpu:8080"} <= set(targets)
    grafana = compose["services"]["grafana"]
    mounts = [v.split(":") for v in grafana["volumes"]]
    dashboard = next(src for src, dst, *_ in mounts if dst.endswith("sglserve.json"))
    assert json.loads((COMPOSE.parent / dashboard).resolve().read_text())["uid"] == "sglserve"
    provisioning = COMPOSE.parent / "grafana" / "provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert source["url"] == "http://prometheus:9090" and source["isDefault"]
    provider = yaml.safe_load((provisioning / "dashboards" / "sglserve.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
