"""The deployment files are valid for the tools that read them (fast: no Ray cluster, no Docker).

- every YAML file parses;
- every Serve config (serve_config.yaml, deploy/serve_config.gpu.yaml, the RayService's
  serveConfigV2) passes Ray Serve's own `ServeDeploySchema`, has no key that schema would silently
  ignore, and its `args` pass sglserve's `AppSettings`;
- cluster.yaml passes the Ray cluster launcher's own checks (`prepare_config` + `validate_config`,
  i.e. what `ray up` runs), has a GPU worker type, and keeps Ray's token authentication on;
- the GPU capacity that cluster.yaml and the RayService allow covers ModelReplica's max_replicas;
- the Dockerfiles pin torch before installing the package (text checks: Docker does not run here).
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

from app.config import AppSettings
from app.deployments import DEPLOYMENT_NAMES

REPO = Path(__file__).resolve().parent.parent
CLUSTER_YAML = REPO / "cluster.yaml"
CPU_SERVE_CONFIG = REPO / "serve_config.yaml"
GPU_SERVE_CONFIG = REPO / "deploy" / "serve_config.gpu.yaml"
RAYSERVICE = REPO / "deploy" / "kuberay" / "rayservice.yaml"
REQUIREMENTS_GPU = REPO / "deploy" / "requirements-gpu.txt"
DOCKERFILE_CPU = REPO / "deploy" / "docker" / "Dockerfile"
DOCKERFILE_GPU = REPO / "deploy" / "docker" / "Dockerfile.gpu"

# What sglang 0.5.17 pins for itself (its wheel's METADATA): the GPU install takes these from
# sglang instead of pyproject.toml's CPU pins.
SGLANG_VERSION = "0.5.17"
SGLANG_TORCH = "2.11.0"
PINNED_BY_SGLANG = {"torch", "transformers", "tokenizers", "xgrammar"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rayservice_serve_config() -> dict[str, Any]:
    return yaml.safe_load(load_yaml(RAYSERVICE)["spec"]["serveConfigV2"])


SERVE_CONFIGS = {
    "serve_config.yaml": lambda: load_yaml(CPU_SERVE_CONFIG),
    "deploy/serve_config.gpu.yaml": lambda: load_yaml(GPU_SERVE_CONFIG),
    "rayservice serveConfigV2": rayservice_serve_config,
}


def deployment(config: dict[str, Any], name: str) -> dict[str, Any]:
    (app,) = config["applications"]
    return next(d for d in app["deployments"] if d["name"] == name)


def gpus_needed_at_most(serve_config: dict[str, Any]) -> int:
    replica = deployment(serve_config, "ModelReplica")
    return replica["autoscaling_config"]["max_replicas"] * replica["ray_actor_options"]["num_gpus"]


def schema_keys(model: type) -> set[str]:
    """A pydantic model's accepted keys: field names and their aliases."""
    return {key for name, f in model.model_fields.items() for key in (name, f.alias) if key}


# -- every YAML parses ------------------------------------------------------------------------------

YAML_FILES = sorted(
    [CLUSTER_YAML, CPU_SERVE_CONFIG, *REPO.joinpath("deploy").rglob("*.yaml"), *REPO.joinpath("deploy").rglob("*.yml")]
)


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_file_parses_to_a_mapping(path: Path) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents, f"{path} is empty"
    assert all(isinstance(d, dict) for d in documents), f"{path}: every document should be a mapping"


def test_the_deploy_files_this_suite_checks_exist() -> None:
    for path in (CLUSTER_YAML, GPU_SERVE_CONFIG, RAYSERVICE, REQUIREMENTS_GPU, DOCKERFILE_CPU, DOCKERFILE_GPU):
        assert path.is_file(), f"missing {path.relative_to(REPO)}"
    assert {CLUSTER_YAML, GPU_SERVE_CONFIG, RAYSERVICE} <= set(YAML_FILES)


# -- Serve configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_serve_config_passes_ray_serve_schema(name: str) -> None:
    config = SERVE_CONFIGS[name]()
    schema = ServeDeploySchema.model_validate(config)
    assert [app.import_path for app in schema.applications] == ["app.deployments:build_app"]


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_serve_config_has_no_key_ray_would_silently_ignore(name: str) -> None:
    # ServeDeploySchema accepts unknown keys (forward compatibility), so a typo such as
    # `max_ongoing_request` would be dropped without a word; this catches it.
    config = SERVE_CONFIGS[name]()
    assert set(config) <= schema_keys(ServeDeploySchema), set(config) - schema_keys(ServeDeploySchema)
    for app in config["applications"]:
        assert set(app) <= schema_keys(ServeApplicationSchema), set(app) - schema_keys(ServeApplicationSchema)
        for dep in app.get("deployments", []):
            unknown = set(dep) - schema_keys(DeploymentSchema)
            assert not unknown, f"deployment {dep['name']}: unknown keys {unknown}"


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_serve_config_names_only_sglserve_deployments(name: str) -> None:
    (app,) = SERVE_CONFIGS[name]()["applications"]
    names = [d["name"] for d in app["deployments"]]
    assert sorted(names) == sorted(DEPLOYMENT_NAMES)


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_serve_config_args_pass_app_settings(name: str) -> None:
    (app,) = SERVE_CONFIGS[name]()["applications"]
    settings = AppSettings.from_args(app["args"])  # extra="forbid": a typo raises here
    assert settings.model.model_path


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_serve_config_autoscaling_configs_pass_ray_serve(name: str) -> None:
    (app,) = SERVE_CONFIGS[name]()["applications"]
    for dep in app["deployments"]:
        if isinstance(dep.get("autoscaling_config"), dict):  # the schema leaves dicts unchecked
            AutoscalingConfig(**dep["autoscaling_config"])
            assert "num_replicas" not in dep, f"{dep['name']}: num_replicas and autoscaling_config conflict"


def test_gpu_config_runs_sglang_one_gpu_per_tensor_parallel_rank() -> None:
    config = load_yaml(GPU_SERVE_CONFIG)
    (app,) = config["applications"]
    settings = AppSettings.from_args(app["args"])
    replica = deployment(config, "ModelReplica")
    assert settings.engine.kind == "sglang"
    assert replica["ray_actor_options"]["num_gpus"] >= 1
    assert replica["ray_actor_options"]["num_gpus"] == settings.engine.tp_size


def test_gpu_config_autoscales_model_replicas_on_queue_depth() -> None:
    config = load_yaml(GPU_SERVE_CONFIG)
    settings = AppSettings.from_args(config["applications"][0]["args"])
    replica = deployment(config, "ModelReplica")
    scaling = replica["autoscaling_config"]
    for key in ("min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s"):
        assert key in scaling, f"autoscaling_config lacks {key}"
    assert 1 <= scaling["min_replicas"] < scaling["max_replicas"]
    assert scaling["upscale_delay_s"] < scaling["downscale_delay_s"], "scale up faster than down"
    assert scaling["policy"]["policy_function"] == "app.autoscaling:ReplicaAutoscalingPolicy"
    # The policy's TTFT SLO is the scheduler's (docs/autoscaling.md).
    assert scaling["policy"]["policy_kwargs"]["ttft_slo_ms"] == settings.scheduler.slo_ttft_ms
    # The scheduler never lets a replica hold more than its in-flight limit and queues the rest
    # itself; for a full replica to read as over target, even the limit's floor must exceed it.
    assert settings.scheduler.min_in_flight_per_replica > scaling["target_ongoing_requests"]
    # ...and Serve must not queue in front of a replica below that limit.
    assert replica["max_ongoing_requests"] >= settings.scheduler.max_in_flight_per_replica
    # The scheduler owns one admission queue: it does not scale.
    assert deployment(config, "Scheduler")["num_replicas"] == 1


# -- cluster.yaml (Ray cluster launcher) ------------------------------------------------------------


def test_cluster_yaml_passes_the_ray_cluster_launchers_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(load_yaml(CLUSTER_YAML)))  # what `ray up` does first
    validate_config(prepared)  # Ray's ray-schema.json and its cross-field checks


def test_cluster_yaml_has_a_cpu_head_and_an_autoscaled_gpu_worker_type() -> None:
    cluster = load_yaml(CLUSTER_YAML)
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in cluster, f"cluster.yaml lacks {key}"
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head.get("resources", {}).get("GPU", 0) == 0, "the head is the CPU node"
    gpu_types = {name: t for name, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu_types, "no node type offers GPU >= 1"
    for name, node_type in gpu_types.items():
        assert node_type["min_workers"] == 0, f"{name}: GPU nodes come only when replicas need them"
        assert node_type["max_workers"] >= 1


def test_cluster_gpu_capacity_covers_model_replica_max_replicas() -> None:
    cluster = load_yaml(CLUSTER_YAML)
    gpus = sum(
        t["resources"].get("GPU", 0) * min(t["max_workers"], cluster["max_workers"])
        for name, t in cluster["available_node_types"].items()
        if name != cluster["head_node_type"]
    )
    assert gpus >= gpus_needed_at_most(load_yaml(GPU_SERVE_CONFIG))


def test_cluster_keeps_ray_token_authentication_on() -> None:
    cluster = load_yaml(CLUSTER_YAML)
    text = CLUSTER_YAML.read_text()
    assert "RAY_AUTH_MODE=disabled" not in text
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cluster[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    # Every node gets the same token: the one `ray get-auth-token --generate` wrote locally.
    assert cluster["file_mounts"].get("/home/ubuntu/.ray/auth_token") == "~/.ray/auth_token"


def test_cluster_head_exports_metrics_and_runs_the_dashboard() -> None:
    head_start = " ".join(load_yaml(CLUSTER_YAML)["head_start_ray_commands"])
    assert re.search(r"--metrics-export-port=\d+", head_start)
    assert "--include-dashboard=true" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start


def test_cluster_setup_installs_sglang_then_sglserve() -> None:
    setup = load_yaml(CLUSTER_YAML)["setup_commands"]
    joined = "\n".join(setup)
    torch_at = joined.index(f"torch=={SGLANG_TORCH}")
    sglang_at = joined.index(f"sglang=={SGLANG_VERSION}")
    requirements_at = joined.index("deploy/requirements-gpu.txt")
    package_at = joined.index("--no-deps -e ~/sglserve")
    assert torch_at < sglang_at < requirements_at < package_at


# -- deploy/requirements-gpu.txt --------------------------------------------------------------------


def test_gpu_requirements_are_pyprojects_minus_what_sglang_pins() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    expected = {str(Requirement(r)) for r in project if Requirement(r).name not in PINNED_BY_SGLANG}
    lines = [line.strip() for line in REQUIREMENTS_GPU.read_text().splitlines()]
    listed = {str(Requirement(line)) for line in lines if line and not line.startswith("#")}
    assert listed == expected


# -- the RayService ---------------------------------------------------------------------------------


def test_rayservice_embeds_exactly_the_gpu_serve_config() -> None:
    assert rayservice_serve_config() == load_yaml(GPU_SERVE_CONFIG)


def test_rayservice_autoscales_gpu_workers_with_token_auth() -> None:
    import ray

    service = load_yaml(RAYSERVICE)
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["authOptions"]["mode"] == "token"
    (gpu_group,) = [
        g for g in cluster["workerGroupSpecs"]
        if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])
    ]
    (container,) = gpu_group["template"]["spec"]["containers"]
    gpus_per_pod = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus_per_pod >= 1
    assert gpu_group["minReplicas"] == 0 <= gpu_group["replicas"] <= gpu_group["maxReplicas"]
    assert gpus_per_pod * gpu_group["maxReplicas"] >= gpus_needed_at_most(rayservice_serve_config())


def test_rayservice_containers_have_probes_and_one_image() -> None:
    cluster = load_yaml(RAYSERVICE)["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    containers = [c for pod in pods for c in pod["spec"]["containers"]]
    for c in containers:
        assert "readinessProbe" in c and "livenessProbe" in c, f"{c['name']} lacks a probe"
    assert len({c["image"] for c in containers}) == 1, "head and workers must run the same image"


# -- Dockerfiles (text checks) ----------------------------------------------------------------------


def instructions(path: Path) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def index_of(lines: list[str], pattern: str) -> int:
    matches = [i for i, line in enumerate(lines) if re.search(pattern, line)]
    assert matches, f"no instruction matches {pattern!r}"
    return matches[0]


def test_cpu_dockerfile_pins_cpu_torch_before_the_package() -> None:
    lines = instructions(DOCKERFILE_CPU)
    assert lines[index_of(lines, r"^FROM ")] == "FROM python:3.11-slim"
    torch_at = index_of(lines, r"^RUN pip install .*torch==2\.13\.0")
    assert "download.pytorch.org/whl/cpu" in lines[torch_at]
    assert torch_at < index_of(lines, r"^RUN pip install \.( |$)")


def test_gpu_dockerfile_pins_sglangs_torch_before_sglang_and_the_package() -> None:
    lines = instructions(DOCKERFILE_GPU)
    assert re.search(r"nvidia/cuda:\S+", DOCKERFILE_GPU.read_text())
    torch_at = index_of(lines, rf"^RUN pip install .*torch=={re.escape(SGLANG_TORCH)}")
    sglang_at = index_of(lines, rf"^RUN pip install sglang=={re.escape(SGLANG_VERSION)}")
    requirements_at = index_of(lines, r"^RUN pip install -r .*requirements-gpu\.txt")
    package_at = index_of(lines, r"^RUN pip install --no-deps \.")
    assert torch_at < sglang_at < requirements_at < package_at


@pytest.mark.parametrize(
    ("dockerfile", "config"), [(DOCKERFILE_CPU, "serve_config.yaml"), (DOCKERFILE_GPU, "serve_config.gpu.yaml")]
)
def test_dockerfile_runs_serve_as_a_non_root_user_with_a_health_check(dockerfile: Path, config: str) -> None:
    lines = instructions(dockerfile)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert index_of(lines, r"^USER ") < index_of(lines, r"^CMD ")
    assert "/health" in lines[index_of(lines, r"^HEALTHCHECK ")]
    assert lines[index_of(lines, r"^CMD ")] == f'CMD ["serve", "run", "{config}"]'


@pytest.mark.parametrize("dockerfile", [DOCKERFILE_CPU, DOCKERFILE_GPU], ids=lambda p: p.name)
def test_dockerfile_copies_only_files_that_exist_and_its_dockerignore_keeps(dockerfile: Path) -> None:
    kept = {
        line[1:].strip() for line in dockerfile.with_name(dockerfile.name + ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for line in instructions(dockerfile):
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}: no such file"
                assert source.rstrip("/") in kept, f"{dockerfile.name}: {source} is excluded by its .dockerignore"
