"""GPU placement of model replicas: which Ray resources a replica asks for, and which GPUs it sees.

Two layouts, chosen from `EngineSettings` (docs/gpu-placement.md has the whole story):

- `tp_size == 1`: the replica actor asks Ray for one GPU (`ray_actor_options.num_gpus = 1`). Ray
  sets the actor's CUDA_VISIBLE_DEVICES to the GPU it reserved, so two replicas on a 2-GPU host
  get one GPU each, and the scheduler routes between them.
- `tp_size > 1`: the replica gets a placement group of `tp_size` bundles of one GPU each, packed
  onto one node (STRICT_PACK: tensor parallelism talks over NVLink, never across nodes). Ray
  Serve places the replica actor in bundle 0, so the actor itself holds one GPU;
  `claim_placement_group_gpus` (run in the replica before the engine starts) asks each other
  bundle which GPU it reserved, with a tiny task scheduled into it, and widens the actor's
  CUDA_VISIBLE_DEVICES to all of them, bundle order kept. SGLang then starts its `tp_size`
  worker processes as children of the replica, and they inherit that list.

Every GPU replica also gets the multi-GPU safety flags in `GPU_PROCESS_ENV` (NVLink multicast /
NVLS off in NCCL, torch symmetric memory and NVSHMEM): through the actor's runtime_env, and again
inside the replica process (`apply_gpu_process_env`, which only fills in what is unset) because a
`ray_actor_options` given in serve_config.yaml replaces the application's wholesale.

Precedence (lowest to highest):
  1. `replica_placement(settings)`: these defaults;
  2. the `options["ModelReplica"]` passed to `app.deployments.build` (merged by
     `merge_replica_options`: explicit keys win, `ray_actor_options` and its
     `runtime_env.env_vars` merged key by key);
  3. serve_config.yaml's `deployments: [{name: ModelReplica, ...}]`, applied by Ray Serve itself:
     each option named there replaces ours whole, `ray_actor_options` included (the env flags
     then still reach the replica through `apply_gpu_process_env`; the GPUs only if the YAML's
     `ray_actor_options` asks for them, or through the placement group).

Engines that run on CPU (the embedded engine on "auto"/"cpu", the simulator) get no options: {}.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import os
from typing import Any

from app.config import AppSettings, EngineSettings

logger = logging.getLogger("sglserve.placement")

# Set in every GPU replica process and inherited by SGLang's workers: NVLink SHARP / multicast
# objects fail on hosts (and in containers) that do not grant them; plain NVLink P2P stays on.
GPU_PROCESS_ENV: dict[str, str] = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
TENSOR_PARALLEL_STRATEGY = "STRICT_PACK"
DEFAULT_REPLICA_CPUS = 1.0  # Ray Serve's own default for a replica actor
CLAIM_TIMEOUT_S = 120.0  # a bundle's probe task waits for a worker process to start


def uses_gpus(engine: EngineSettings) -> bool:
    """Whether replicas of this engine run on GPUs: SGLang unless told "cpu", any engine on "cuda"."""
    if engine.device == "cuda":
        return True
    return engine.kind == "sglang" and engine.device != "cpu"


def replica_placement(settings: AppSettings) -> dict[str, Any]:
    """Default Ray Serve deployment options for ModelReplica, derived from the engine settings."""
    engine = settings.engine
    if not uses_gpus(engine):
        return {}
    # With tp_size > 1 the actor sits in bundle 0 and holds its GPU; the other bundles' GPUs are
    # claimed by the replica at start (claim_placement_group_gpus) for SGLang's other tp workers.
    options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": 1, "runtime_env": {"env_vars": dict(GPU_PROCESS_ENV)}}
    }
    if engine.tp_size > 1:
        options["placement_group_bundles"] = tensor_parallel_bundles(engine.tp_size, DEFAULT_REPLICA_CPUS)
        options["placement_group_strategy"] = TENSOR_PARALLEL_STRATEGY
    return options


def tensor_parallel_bundles(tp_size: int, cpus_per_bundle: float) -> list[dict[str, float]]:
    return [{"CPU": cpus_per_bundle, "GPU": 1} for _ in range(tp_size)]


def merge_replica_options(defaults: dict[str, Any], explicit: dict[str, Any]) -> dict[str, Any]:
    """`defaults` (from `replica_placement`) overridden by `explicit` (the caller's options).

    Explicit top-level options replace defaults, except `ray_actor_options`, merged key by key
    (and its `runtime_env.env_vars` too). With default bundles (tp_size > 1), three rules keep
    the result one Ray accepts:
    - explicit `num_gpus` covering every tensor-parallel GPU (the single-actor layout) and no
      explicit bundles: the default placement group is dropped;
    - explicit `max_replicas_per_node`: an error (Ray forbids it next to placement groups);
    - explicit `num_cpus`: every bundle carries that many CPUs, so the actor still fits in
      bundle 0 (Ray requires it).
    """
    merged = copy.deepcopy(defaults)
    explicit = copy.deepcopy(explicit)
    explicit_actor = explicit.pop("ray_actor_options", None)
    if explicit_actor is not None:
        merged["ray_actor_options"] = _merge_actor_options(merged.get("ray_actor_options", {}), explicit_actor)
    explicit_bundles = "placement_group_bundles" in explicit
    merged.update(explicit)
    if explicit_bundles or "placement_group_bundles" not in defaults:
        return merged
    actor = merged.get("ray_actor_options", {})
    tp_size = len(defaults["placement_group_bundles"])
    if (explicit_actor or {}).get("num_gpus", 0) >= tp_size:
        merged.pop("placement_group_bundles")
        if "placement_group_strategy" not in explicit:
            merged.pop("placement_group_strategy", None)
        return merged
    if "max_replicas_per_node" in explicit:
        raise ValueError(
            "ModelReplica: max_replicas_per_node cannot be combined with the placement group that "
            f"engine.tp_size={tp_size} needs (Ray forbids both); drop it, or give "
            f"ray_actor_options.num_gpus={tp_size} to run without a placement group"
        )
    if "num_cpus" in (explicit_actor or {}):
        merged["placement_group_bundles"] = tensor_parallel_bundles(tp_size, float(actor["num_cpus"]))
    return merged


def _merge_actor_options(defaults: dict[str, Any], explicit: dict[str, Any]) -> dict[str, Any]:
    merged = {**defaults, **explicit}
    default_env = defaults.get("runtime_env") or {}
    explicit_env = explicit.get("runtime_env") or {}
    if default_env or explicit_env:
        env_vars = {**default_env.get("env_vars", {}), **explicit_env.get("env_vars", {})}
        merged["runtime_env"] = {**default_env, **explicit_env, "env_vars": env_vars}
    return merged


# --- inside the replica process -------------------------------------------------------------------


def apply_gpu_process_env() -> dict[str, str]:
    """Fill in the GPU_PROCESS_ENV flags this process lacks (a value set by the user stays)."""
    for name, value in GPU_PROCESS_ENV.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in GPU_PROCESS_ENV}


async def claim_placement_group_gpus(tp_size: int, timeout_s: float = CLAIM_TIMEOUT_S) -> list[str]:
    """Make every GPU of this replica's placement group visible to this process (and its children).

    Returns the GPU ids now in CUDA_VISIBLE_DEVICES. No-op when the actor already holds `tp_size`
    GPUs or runs outside a placement group (then SGLang's own check reports too few GPUs). Each
    GPU bundle not held by the actor is asked, by a task scheduled into it, which GPU it reserved:
    Ray reserves a bundle's GPU when the group is created, so the answer stays true after the task.
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    own = [str(gpu) for gpu in ray.get_gpu_ids()]
    if len(own) >= tp_size:
        return own
    group = ray.util.get_current_placement_group()
    if group is None:
        return own
    probes = []
    for index, bundle in enumerate(group.bundle_specs):
        free_gpus = int(bundle.get("GPU", 0)) - (len(own) if index == 0 else 0)  # actor sits in 0
        if free_gpus < 1:
            continue
        strategy = PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=index, placement_group_capture_child_tasks=False
        )
        probes.append(
            _gpu_probe().options(num_cpus=0, num_gpus=free_gpus, scheduling_strategy=strategy).remote()
        )
    answers = await asyncio.wait_for(asyncio.gather(*probes), timeout_s)
    gpu_ids = own + [str(gpu) for ids in answers for gpu in ids]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
    logger.info("replica sees the GPUs of its placement group: CUDA_VISIBLE_DEVICES=%s", gpu_ids)
    return gpu_ids


def _reserved_gpu_ids() -> list[str]:
    import ray

    return [str(gpu) for gpu in ray.get_gpu_ids()]


@functools.cache
def _gpu_probe() -> Any:
    """`_reserved_gpu_ids` as a Ray task, made on first use (importing this module needs no Ray)."""
    import ray

    return ray.remote(_reserved_gpu_ids)


async def prepare_replica_devices(settings: AppSettings) -> None:
    """Run in the replica before its engine starts: env flags, then the placement group's GPUs."""
    if not uses_gpus(settings.engine):
        return
    apply_gpu_process_env()
    if settings.engine.tp_size > 1:
        await claim_placement_group_gpus(settings.engine.tp_size)


def device_report(settings: AppSettings) -> dict[str, Any]:
    """What this process was given: Ray's GPU ids, CUDA_VISIBLE_DEVICES, tp_size, the flags, and
    the placement group it runs in (hex id, or None)."""
    import ray

    group = ray.util.get_current_placement_group()
    return {
        "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
        "placement_group_id": None if group is None else group.id.hex(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "tp_size": settings.engine.tp_size,
        "env": {name: os.environ.get(name) for name in GPU_PROCESS_ENV},
    }
