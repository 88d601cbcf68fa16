"""GPU placement of model replicas, proven on LOGICAL GPUs (the session cluster declares 4; this
machine has none). The simulated engine with `engine.device: cuda` asks for GPUs exactly as the
SGLang engine does, without needing CUDA; what Ray reserves and what each replica process sees
(CUDA_VISIBLE_DEVICES, the multi-GPU env flags) is real. docs/gpu-placement.md says what a real
multi-GPU run must still show.

Specification:
- engines on CPU ask for nothing; a GPU engine with tp_size 1 asks for one GPU per replica; with
  tp_size N, for a STRICT_PACK placement group of N one-GPU bundles, the actor in bundle 0;
- explicit options win over these defaults, merged key by key, and stay valid for Ray;
- two single-GPU replicas get two different GPUs, each visible in its own CUDA_VISIBLE_DEVICES;
- a tp_size 2 replica gets a 2-bundle STRICT_PACK group and sees both of its GPUs, none of them
  shared with another replica; every GPU replica process carries the env flags.
"""

from __future__ import annotations

import os

import httpx
import pytest
import ray

from app.config import AppSettings
from app.placement import GPU_PROCESS_ENV, merge_replica_options, replica_placement
from app.replica import ModelReplicaDeployment
from tests.conftest import SMALL, ServeStack, serve_args, wait_ready

pytestmark = pytest.mark.serve

PAIR_APP, TP_APP = "gpu-pair", "gpu-tp"


def settings(**engine) -> AppSettings:
    return AppSettings.from_args({"engine": engine})


# --- the options (no cluster) ---------------------------------------------------------------------


def test_engines_on_cpu_ask_for_no_gpu():
    assert replica_placement(settings(kind="embedded")) == {}
    assert replica_placement(settings(kind="embedded", device="cpu")) == {}
    assert replica_placement(settings(kind="simulated")) == {}
    assert replica_placement(settings(kind="sglang", device="cpu")) == {}


def test_one_gpu_per_replica_when_tp_size_is_1():
    options = replica_placement(settings(kind="sglang"))
    assert options == {"ray_actor_options": {"num_gpus": 1, "runtime_env": {"env_vars": GPU_PROCESS_ENV}}}
    assert GPU_PROCESS_ENV == {
        "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"
    }
    assert replica_placement(settings(kind="simulated", device="cuda")) == options


def test_tensor_parallel_replica_asks_for_a_strict_pack_group_of_one_gpu_bundles():
    options = replica_placement(settings(kind="sglang", tp_size=4))
    assert options["placement_group_bundles"] == [{"CPU": 1.0, "GPU": 1}] * 4
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["ray_actor_options"]["num_gpus"] == 1  # the actor holds bundle 0's GPU
    ModelReplicaDeployment.options(**options)  # Ray's own validation: the actor fits bundle 0


def test_explicit_options_win_and_are_merged_key_by_key():
    defaults = replica_placement(settings(kind="sglang"))
    merged = merge_replica_options(defaults, {
        "num_replicas": 2,
        "ray_actor_options": {"num_cpus": 2, "num_gpus": 0.5,
                              "runtime_env": {"env_vars": {"NCCL_NVLS_ENABLE": "1", "HF_TOKEN": "x"}}},
    })
    assert merged["num_replicas"] == 2
    actor = merged["ray_actor_options"]
    assert (actor["num_cpus"], actor["num_gpus"]) == (2, 0.5)
    assert actor["runtime_env"]["env_vars"] == {**GPU_PROCESS_ENV, "NCCL_NVLS_ENABLE": "1", "HF_TOKEN": "x"}
    assert defaults["ray_actor_options"]["runtime_env"]["env_vars"] == GPU_PROCESS_ENV  # not mutated


def test_explicit_options_keep_a_tensor_parallel_replica_valid_for_ray():
    defaults = replica_placement(settings(kind="sglang", tp_size=2))
    # An explicit CPU share sizes every bundle, so the actor still fits bundle 0.
    with_cpus = merge_replica_options(defaults, {"ray_actor_options": {"num_cpus": 4}})
    assert with_cpus["placement_group_bundles"] == [{"CPU": 4.0, "GPU": 1}] * 2
    ModelReplicaDeployment.options(**with_cpus)
    # All GPUs on the actor itself (the single-actor layout): no placement group then.
    single_actor = merge_replica_options(defaults, {"ray_actor_options": {"num_gpus": 2}})
    assert "placement_group_bundles" not in single_actor and "placement_group_strategy" not in single_actor
    ModelReplicaDeployment.options(**single_actor)
    # Explicit bundles and strategy replace ours.
    own = merge_replica_options(defaults, {"placement_group_bundles": [{"CPU": 1, "GPU": 2}],
                                           "placement_group_strategy": "PACK"})
    assert (own["placement_group_bundles"], own["placement_group_strategy"]) == ([{"CPU": 1, "GPU": 2}], "PACK")
    with pytest.raises(ValueError, match="max_replicas_per_node cannot be combined"):
        merge_replica_options(defaults, {"max_replicas_per_node": 1})


# --- on the session cluster's GPUs (logical here) ---------------------------------------------------

# "simulated" here; a real GPU run sets SGLSERVE_PLACEMENT_ENGINE=sglang (docs/gpu-placement.md).
ENGINE_KIND = os.environ.get("SGLSERVE_PLACEMENT_ENGINE", "simulated")
APPS = {  # name -> (route prefix, tp_size, replicas)
    PAIR_APP: ("/gpu-pair", 1, 2),
    TP_APP: ("/gpu-tp", 2, 1),
}


def gpu_args(tp_size: int) -> dict:
    engine = {"kind": ENGINE_KIND, "device": "cuda", "tp_size": tp_size}
    model: dict = {}
    if ENGINE_KIND == "sglang":  # the tiny model as tests/gpu serves it, small KV budget
        model = {"dtype": "float16", "context_length": 2048}
        engine |= {"mem_fraction_static": 0.3, "attention_backend": "triton", "sampling_backend": "pytorch",
                   "grammar_backend": "none", "max_total_tokens": None, "torch_threads": None}
    return serve_args(model=model, engine=engine, scheduler={"routing_policy": "cache_aware"})


def replica_ids(app_name: str) -> list[str]:
    prefix = f"SERVE_REPLICA::{app_name}#ModelReplica#"
    return sorted(
        a["name"].split("#")[-1]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith(prefix)
    )


def device_reports(stack: ServeStack) -> list[dict]:
    handle = stack.handle("ModelReplica")
    return [handle.device_report.remote(target_replica=rid).result(timeout_s=60)
            for rid in replica_ids(stack.app_name)]


class GpuApps:
    """Starts the placement test apps on demand (side by side when the cluster has GPUs for all)
    and deletes what it started."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.started: list[str] = []

    def start(self, name: str) -> None:
        from ray import serve

        from app.deployments import build

        if name in self.started:
            return
        route_prefix, tp_size, replicas = APPS[name]
        # CPU shares stay small: the session cluster has 4 logical CPUs for every test app.
        replica = {"num_replicas": replicas, "ray_actor_options": {"num_cpus": 0.2}}
        app = build(AppSettings.from_args(gpu_args(tp_size)), {"Ingress": SMALL, "Scheduler": SMALL, "ModelReplica": replica})
        serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
        self.started.append(name)

    def ready(self, name: str, timeout_s: float = 180.0) -> ServeStack:
        if cluster_gpus() < 4:  # too few GPUs for both apps (a 2-GPU host): one at a time
            self.delete_all(keep=name)
        self.start(name)
        return wait_ready(f"http://127.0.0.1:{self.cluster.http_port}{APPS[name][0]}", name, timeout_s)

    def delete_all(self, keep: str | None = None) -> None:
        from ray import serve

        for name in [n for n in self.started if n != keep]:
            serve.delete(name)  # blocks until its replicas (and placement groups) are gone
            self.started.remove(name)


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


@pytest.fixture(scope="module")
def gpu_apps(ray_cluster):
    apps = GpuApps(ray_cluster)
    if cluster_gpus() >= 4:  # room for both apps: start them side by side (startup dominates)
        for name in APPS:
            apps.start(name)
    try:
        yield apps
    finally:
        apps.delete_all()


@pytest.fixture
def pair(gpu_apps) -> ServeStack:
    return gpu_apps.ready(PAIR_APP)


@pytest.fixture
def tp(gpu_apps) -> ServeStack:
    return gpu_apps.ready(TP_APP)


@ray.remote
class GroupMember:
    """A plain actor in bundle 0 of a placement group, as Ray Serve places a replica."""

    async def claim(self, tp_size: int) -> tuple[list[str], str]:
        from app.placement import claim_placement_group_gpus

        ids = await claim_placement_group_gpus(tp_size)
        return ids, os.environ["CUDA_VISIBLE_DEVICES"]


@pytest.mark.parametrize("actor_gpus", [1, 0], ids=["actor-holds-bundle-0-gpu", "actor-holds-no-gpu"])
def test_a_replica_claims_every_gpu_of_its_placement_group(ray_cluster, actor_gpus):
    """Runs before the apps below take the GPUs. `actor-holds-no-gpu` is what a serve_config.yaml
    `ray_actor_options` without num_gpus leads to: bundle 0's GPU is claimed as well."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = placement_group([{"CPU": 0.1, "GPU": 1}] * 2, strategy="STRICT_PACK")
    ray.get(group.ready(), timeout=60)
    try:
        member = GroupMember.options(
            num_cpus=0.1, num_gpus=actor_gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0),
        ).remote()
        ids, visible = ray.get(member.claim.remote(2), timeout=60)
        assert len(ids) == 2 and len(set(ids)) == 2 and visible == ",".join(ids)
        ray.kill(member)
    finally:
        remove_placement_group(group)


def test_two_replicas_get_one_gpu_each(pair):
    reports = device_reports(pair)
    assert len(reports) == 2
    gpus = [r["gpu_ids"] for r in reports]
    assert all(len(ids) == 1 for ids in gpus) and gpus[0] != gpus[1]
    for report in reports:
        assert report["cuda_visible_devices"] == report["gpu_ids"][0]
        assert report["placement_group_id"] is None
        assert report["env"] == GPU_PROCESS_ENV
    for i in range(4):  # both serve through the cache-aware scheduler
        r = httpx.post(f"{pair.base_url}/generate", timeout=60,
                       json={"text": f"prompt {i}", "sampling_params": {"max_new_tokens": 3}})
        assert r.status_code == 200, r.text


def test_tensor_parallel_replica_gets_a_strict_pack_group_and_sees_both_gpus(tp):
    [report] = device_reports(tp)
    table = ray.util.placement_group_table()
    group = table[report["placement_group_id"]]
    assert group["strategy"] == "STRICT_PACK" and group["state"] == "CREATED"
    assert [bundle.get("GPU") for bundle in group["bundles"].values()] == [1.0, 1.0]
    assert len(set(group["bundles_to_node_id"].values())) == 1  # one node
    visible = report["cuda_visible_devices"].split(",")
    assert len(visible) == 2 and len(set(visible)) == 2
    assert visible[0] == report["gpu_ids"][0]  # the actor's own GPU (bundle 0) comes first
    assert report["tp_size"] == 2 and report["env"] == GPU_PROCESS_ENV
    r = httpx.post(f"{tp.base_url}/generate", timeout=60,
                   json={"text": "hello", "sampling_params": {"max_new_tokens": 3}})
    assert r.status_code == 200, r.text


def test_no_gpu_is_given_to_two_replicas(gpu_apps):
    if cluster_gpus() < 4:
        pytest.skip("needs 4 GPUs for both apps at once; with fewer they run one at a time")
    pair, tp = gpu_apps.ready(PAIR_APP), gpu_apps.ready(TP_APP)
    seen = [gpu for r in device_reports(pair) + device_reports(tp) for gpu in r["cuda_visible_devices"].split(",")]
    assert len(seen) == 4 and len(set(seen)) == 4, seen
    assert ray.available_resources().get("GPU", 0) == 0  # the cluster's 4 logical GPUs, all reserved
