"""Builds the Ray Serve application: Ingress -> Scheduler (tickets) and Ingress -> ModelReplica (tokens).

The Ingress holds a handle to each: it asks the Scheduler for a ticket (admission, replica
choice) and streams the tokens from the ticket's replica itself. The Scheduler holds a replica
handle too, for broadcasts (/flush_cache, /server_info), aborts, readiness and /run programs, and
its request router is how the scheduler learns replica membership and load.

`serve run serve_config.yaml` imports `app.deployments:build_app` and passes the config's `args`;
per-deployment options (replicas, CPUs/GPUs, autoscaling) come from the config's `deployments`
section, which Ray Serve applies by deployment name. Tests and benchmarks call `build` with the
same options as a dict.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from app.canary import bind_version_replicas, deployment_name, split_from_settings
from app.config import AppSettings
from app.ingress.server import IngressDeployment
from app.placement import merge_replica_options, replica_placement
from app.jobs.runner import JobRunnerDeployment
from app.replica import ModelReplicaDeployment
from app.scheduler.deployment import SchedulerDeployment
from app.scheduler.office import policy_kwargs

DEPLOYMENT_NAMES = ("Ingress", "Scheduler", "ModelReplica")
OPTIONAL_DEPLOYMENT_NAMES = ("JobRunner",)  # only with jobs.enabled (app/jobs/runner.py)


def routing_config(settings: AppSettings) -> RequestRouterConfig:
    """Every handle to the replicas routes through our request router: a ticket's call goes to
    the replica the scheduler chose (`target_replica`); any other call by the policy."""
    return RequestRouterConfig(
        request_router_class="app.scheduler.ray_router:PolicyRequestRouter",
        # The routers' own policy serves untargeted calls only; tickets are placed by the scheduler.
        request_router_kwargs={"policy": settings.scheduler.routing_policy, **policy_kwargs(settings)},
        request_routing_stats_period_s=1.0,
        request_routing_stats_timeout_s=5.0,
    )


def build(settings: AppSettings, options: dict[str, dict[str, Any]] | None = None) -> Application:
    """The application. With `models:` (app/canary.py) there is one ModelReplica deployment per
    version, `ModelReplica-<version>`, each with its own options (else `options["ModelReplica"]`),
    and the Scheduler, Ingress and JobRunner get the handles as `{version: handle}`."""
    options = options or {}
    versions = {deployment_name(v.name) for v in settings.models}
    unknown = set(options) - set(DEPLOYMENT_NAMES) - set(OPTIONAL_DEPLOYMENT_NAMES) - versions
    if unknown:
        raise ValueError(f"unknown deployments {sorted(unknown)}; known: {sorted({*DEPLOYMENT_NAMES, *versions})}")
    raw = settings.model_dump(mode="json")
    if settings.models:
        split_from_settings(settings)  # a bad split (duplicate names, no weight) fails here
        replica: Any = bind_version_replicas(settings, options)
    else:
        # GPU placement defaults from the engine settings; explicit options win (app/placement.py).
        placed = merge_replica_options(replica_placement(settings), options.get("ModelReplica", {}))
        replica_options = {"request_router_config": routing_config(settings), **placed}
        replica = ModelReplicaDeployment.options(**replica_options).bind(raw)
    scheduler = SchedulerDeployment.options(**options.get("Scheduler", {})).bind(replica, raw)
    # The job runner executes jobs through the same scheduler and replicas (app/jobs/runner.py).
    runner = (JobRunnerDeployment.options(**options.get("JobRunner", {})).bind(scheduler, raw, replica)
              if settings.jobs.enabled else None)
    return IngressDeployment.options(**options.get("Ingress", {})).bind(scheduler, raw, replica, runner)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The entry point named in serve_config.yaml (`import_path: app.deployments:build_app`)."""
    return build(AppSettings.from_args(args))  # a bad config fails here, before any actor starts
