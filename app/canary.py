"""Canary releases: several versions of the served model, and which one serves a request.

Config (`AppSettings.models`; empty means one model, as before):

    models:
      - {name: stable, model_path: org/model-v1, weight: 90}
      - {name: canary, model_path: org/model-v2, weight: 10, engine: {max_running_requests: 32}}

Each version is its own ModelReplica deployment (own replicas and autoscaling); `version_settings`
gives the settings a version's deployment runs with (the app's, with the version's model path and
engine overrides).

`TrafficSplit.choose` picks a version for a request:
1. an explicit version: `model: "<served name>@<version>"` or the `X-Model-Version` header (for
   testing a version before it gets traffic; weight 0 is fine);
2. else by weight, sticky per `X-Session-Id`, else per API key, so a conversation stays on one
   version and its prefix cache. The choice is weighted rendezvous hashing: each version scores
   `-ln(u) / weight` with `u` a hash of (sticky key, version) in (0, 1), the lowest wins. A version
   wins a share of keys equal to its weight share. Raising one version's weight moves keys only
   TO it, lowering one moves keys only AWAY from it: a canary going 10% -> 50% -> 100% moves 40%
   of the sessions, then the other 50%, and none moves back. (Changing two weights of three at
   once may move a few keys more than the minimum; with two versions every move is minimal.)
A request with neither session nor key gets a random version by weight.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.errors import NotFoundError

VERSION_HEADER = "x-model-version"
SESSION_HEADER = "x-session-id"


class ModelVersion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")  # the version label
    model_path: str | None = None  # None: `model.model_path`
    engine: dict[str, Any] = Field(default_factory=dict)  # overrides of the `engine` section
    weight: float = Field(ge=0)  # relative share of traffic; 0: only explicit requests


def version_settings(settings: Any, version: ModelVersion) -> Any:
    """The AppSettings a version's ModelReplica deployment runs with (validated again, so a bad
    engine override fails at build time)."""
    raw = settings.model_dump(mode="json")
    if version.model_path is not None:
        raw["model"]["model_path"] = version.model_path
    raw["engine"] = {**raw["engine"], **version.engine}
    raw["models"] = []
    return type(settings).model_validate(raw)


def deployment_name(version: str) -> str:
    """The Serve deployment of one version's replicas."""
    return f"ModelReplica-{version}"


def replica_deployment(version: str | None) -> str:
    """The deployment serving a version; version None is a single-model app's `ModelReplica`."""
    return "ModelReplica" if version is None else deployment_name(version)


def version_handles(replicas: Any) -> dict[str | None, Any]:
    """`{version: handle}` from what `app.deployments.build` passes: a dict per version, or one
    ModelReplica handle (a single-model app), which is version None."""
    return dict(replicas) if isinstance(replicas, dict) else {None: replicas}


def _unit_hash(*parts: str) -> float:
    """A uniform number in (0, 1) from the parts (stable across processes and runs)."""
    digest = hashlib.blake2b("\x1f".join(parts).encode("utf-8"), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / 2**64


class TrafficSplit:
    def __init__(self, served_name: str, versions: list[ModelVersion]):
        if not versions:
            raise ValueError("a traffic split needs at least one version")
        names = [v.name for v in versions]
        if len(set(names)) != len(names):
            raise ValueError(f"model version names must be unique, got {names}")
        if not any(v.weight > 0 for v in versions):
            raise ValueError("at least one model version needs a weight above 0")
        self.served_name = served_name
        self.versions = {v.name: v for v in versions}
        self._weighted = [(v.name, v.weight) for v in versions if v.weight > 0]

    def reweighted(self, weights: Mapping[str, float]) -> "TrafficSplit":
        """The same versions with new weights (a promotion or rollback). Meant for the Ingress's
        `reconfigure(user_config)`: Serve applies a changed user_config to live replicas, so
        weights move without restarting the Ingress, and no ModelReplica is touched at all."""
        unknown = set(weights) - set(self.versions)
        if unknown:
            raise ValueError(f"weights for unknown model versions {sorted(unknown)}; versions: {sorted(self.versions)}")
        versions = [v.model_copy(update={"weight": float(weights.get(v.name, v.weight))})
                    for v in self.versions.values()]
        return TrafficSplit(self.served_name, versions)

    def explicit_version(self, model: str | None, headers: Mapping[str, str]) -> str | None:
        """The version a request names itself, if any; 404 for one that does not exist."""
        wanted = None
        if model and "@" in model:
            name, _, wanted = model.rpartition("@")
            if name != self.served_name:
                return None  # not our model; the model check answers that
        wanted = wanted or _header(headers, VERSION_HEADER)
        if wanted is None:
            return None
        if wanted not in self.versions:
            raise NotFoundError(
                f"model version '{wanted}' does not exist; versions: {sorted(self.versions)}",
                param="model", code="model_not_found")
        return wanted

    def sticky_key(self, headers: Mapping[str, str], key_id: str | None) -> str | None:
        session = _header(headers, SESSION_HEADER)
        if session:
            return f"session:{session}"
        return f"key:{key_id}" if key_id else None

    def by_weight(self, sticky: str | None) -> str:
        if sticky is None:
            names, weights = zip(*self._weighted)
            return random.choices(names, weights=weights)[0]
        return min(self._weighted, key=lambda nw: -math.log(_unit_hash(sticky, nw[0])) / nw[1])[0]

    def choose(self, model: str | None, headers: Mapping[str, str], key_id: str | None) -> str:
        """The version that serves this request."""
        return self.explicit_version(model, headers) or self.by_weight(self.sticky_key(headers, key_id))

    def base_model(self, model: str) -> str:
        """`name@version` -> `name` (the model check then sees the served name)."""
        name, at, _ = model.rpartition("@")
        return name if at and name == self.served_name else model


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:  # plain dicts (tests) may use any case
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value.strip() or None if isinstance(value, str) else None


def bind_version_replicas(settings: Any, options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """One bound ModelReplica deployment per version, `{version: Application}`, for
    `app.deployments.build` to hand to the Scheduler/Ingress (Serve turns each into a handle).

    Each is named `ModelReplica-<version>` (so serve_config.yaml's `deployments:` can size and
    autoscale each version apart), runs its version's settings (model path, engine overrides), and
    keeps the application's routing and GPU placement. Its init args hold no weights, so moving
    weights never restarts a replica. `options[deployment_name(v)]` wins over
    `options["ModelReplica"]`, which wins over the placement defaults."""
    from app.deployments import routing_config
    from app.placement import merge_replica_options, replica_placement
    from app.replica import ModelReplicaDeployment

    options = options or {}
    bound = {}
    for version in settings.models:
        vs = version_settings(settings, version)
        name = deployment_name(version.name)
        explicit = dict(options.get(name) or options.get("ModelReplica") or {})
        placed = merge_replica_options(replica_placement(vs), explicit)
        bound[version.name] = ModelReplicaDeployment.options(
            name=name, request_router_config=routing_config(vs), **placed
        ).bind(vs.model_dump(mode="json"))
    return bound


def split_from_settings(settings: Any) -> TrafficSplit | None:
    if not settings.models:
        return None
    return TrafficSplit(settings.model.name, settings.models)
