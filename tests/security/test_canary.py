"""The canary traffic split: weights over 2,000 sessions within +-3%, 100% stickiness, weight moves
that move only the sessions they must, explicit versions, and the `models:` config shape."""

from __future__ import annotations

from collections import Counter

import pytest

from app.canary import TrafficSplit, deployment_name, split_from_settings, version_settings
from app.config import AppSettings
from app.errors import NotFoundError

SERVED = "acme/chat"
SESSIONS = [f"session-{i}" for i in range(2000)]


def split(**weights: float) -> TrafficSplit:
    return TrafficSplit(SERVED, AppSettings.from_args(
        {"models": [{"name": n, "weight": w} for n, w in weights.items()]}).models)


def assignment(s: TrafficSplit, sessions=SESSIONS) -> dict[str, str]:
    return {sid: s.choose(SERVED, {"X-Session-Id": sid}, key_id="team-a") for sid in sessions}


@pytest.mark.parametrize("weights", [
    {"stable": 90, "canary": 10},
    {"stable": 50, "canary": 50},
    {"stable": 70, "canary": 20, "shadow": 10},
])
def test_split_over_2000_sessions_is_within_3_percent_of_the_weights(weights):
    counts = Counter(assignment(split(**weights)).values())
    total = sum(weights.values())
    for name, weight in weights.items():
        assert abs(counts[name] / len(SESSIONS) - weight / total) <= 0.03, (name, counts)


def test_split_over_2000_requests_of_many_api_keys_without_sessions():
    s = split(stable=90, canary=10)
    counts = Counter(s.choose(SERVED, {}, key_id=f"key-{i}") for i in range(2000))
    assert abs(counts["canary"] / 2000 - 0.10) <= 0.03


def test_a_session_always_gets_the_same_version():
    s = split(stable=50, canary=50)
    first = assignment(s)
    for _ in range(3):
        assert assignment(s) == first  # 100% sticky
    # Another splitter built from the same config (another Ingress replica) agrees.
    assert assignment(split(stable=50, canary=50)) == first


def test_without_a_session_the_api_key_is_sticky():
    s = split(stable=50, canary=50)
    chosen = {s.choose(SERVED, {}, key_id="team-b") for _ in range(50)}
    assert len(chosen) == 1
    # A session header wins over the key.
    by_session = {s.choose(SERVED, {"x-session-id": sid}, key_id="team-b") for sid in SESSIONS[:200]}
    assert by_session == {"stable", "canary"}


def test_moving_weights_10_50_100_moves_only_the_sessions_it_must():
    at10 = assignment(split(stable=90, canary=10))
    at50 = assignment(split(stable=50, canary=50))
    at100 = assignment(split(stable=0, canary=100))
    # Nobody leaves the canary while its share grows ...
    assert all(at50[sid] == "canary" for sid, v in at10.items() if v == "canary")
    assert all(v == "canary" for v in at100.values())
    # ... and about the weight's change moves (40% of sessions from 10 to 50), not more.
    moved = sum(at10[sid] != at50[sid] for sid in SESSIONS) / len(SESSIONS)
    assert abs(moved - 0.40) <= 0.03


def test_three_versions_a_growing_one_takes_only_from_the_others():
    before = assignment(split(a=60, b=30, c=10))
    grown = assignment(split(a=60, b=30, c=30))
    changed = [(before[s], grown[s]) for s in SESSIONS if before[s] != grown[s]]
    assert changed and all(new == "c" for _old, new in changed)  # no a<->b shuffling
    shrunk = assignment(split(a=60, b=10, c=10))
    changed = [(before[s], shrunk[s]) for s in SESSIONS if before[s] != shrunk[s]]
    assert changed and all(old == "b" for old, _new in changed)  # only b's sessions leave


def test_an_explicit_version_by_model_suffix_or_header():
    s = split(stable=100, canary=0)
    assert s.choose(f"{SERVED}@canary", {"X-Session-Id": "x"}, None) == "canary"  # weight 0 is fine
    assert s.choose(SERVED, {"X-Model-Version": "canary"}, None) == "canary"
    assert s.base_model(f"{SERVED}@canary") == SERVED
    with pytest.raises(NotFoundError) as err:
        s.choose(f"{SERVED}@v9", {}, None)
    assert err.value.code == "model_not_found" and err.value.status_code == 404


def test_weight_zero_versions_get_no_traffic_by_weight():
    s = split(stable=100, canary=0)
    assert set(assignment(s).values()) == {"stable"}


def test_models_config_shape_and_per_version_settings():
    settings = AppSettings.from_args({
        "model": {"model_path": "org/base", "served_model_name": SERVED},
        "engine": {"max_running_requests": 64},
        "models": [
            {"name": "stable", "weight": 90},
            {"name": "canary", "model_path": "org/next", "weight": 10, "engine": {"max_running_requests": 8}},
        ],
    })
    s = split_from_settings(settings)
    assert s is not None and set(s.versions) == {"stable", "canary"}
    canary = version_settings(settings, settings.models[1])
    assert canary.model.model_path == "org/next" and canary.engine.max_running_requests == 8
    assert canary.model.name == SERVED  # clients keep using the served name
    stable = version_settings(settings, settings.models[0])
    assert stable.model.model_path == "org/base" and stable.engine.max_running_requests == 64
    assert deployment_name("canary") == "ModelReplica-canary"
    assert split_from_settings(AppSettings()) is None  # no models: one model, as before


@pytest.mark.parametrize("models, message", [
    ([{"name": "a", "weight": 1}, {"name": "a", "weight": 1}], "unique"),
    ([{"name": "a", "weight": 0}], "above 0"),
])
def test_bad_splits_are_refused(models, message):
    with pytest.raises(ValueError, match=message):
        split_from_settings(AppSettings.from_args({"models": models}))


def test_a_bad_engine_override_fails_at_build_time():
    settings = AppSettings.from_args({"models": [{"name": "a", "weight": 1, "engine": {"max_running_requests": 0}}]})
    with pytest.raises(ValueError):
        version_settings(settings, settings.models[0])


def test_reweighting_keeps_versions_and_validates():
    s = split(stable=90, canary=10)
    promoted = s.reweighted({"stable": 0, "canary": 100})
    assert set(assignment(promoted).values()) == {"canary"}
    assert s.versions["stable"].weight == 90  # the old split is unchanged (replaced, not mutated)
    with pytest.raises(ValueError, match="unknown"):
        s.reweighted({"v9": 1})
    with pytest.raises(ValueError, match="above 0"):
        s.reweighted({"stable": 0, "canary": 0})


def test_one_model_replica_deployment_per_version():
    from app.canary import bind_version_replicas

    settings = AppSettings.from_args({
        "model": {"served_model_name": SERVED},
        "models": [{"name": "stable", "weight": 90},
                   {"name": "canary", "model_path": "org/next", "weight": 10, "engine": {"max_running_requests": 8}}],
    })
    bound = bind_version_replicas(settings, {"ModelReplica-canary": {"num_replicas": 3}, "ModelReplica": {"num_replicas": 1}})
    deployments = {v: app._bound_deployment for v, app in bound.items()}
    assert {v: d.name for v, d in deployments.items()} == {"stable": "ModelReplica-stable", "canary": "ModelReplica-canary"}
    assert deployments["canary"].num_replicas == 3 and deployments["stable"].num_replicas == 1
    (canary_args,) = deployments["canary"].init_args
    assert canary_args["model"]["model_path"] == "org/next" and canary_args["engine"]["max_running_requests"] == 8
    assert canary_args["models"] == []  # no weights in a replica's args: moving them restarts none


# -- wiring: the application graph, without Ray ------------------------------------------------------


def _bound(app) -> dict:
    """deployment name -> its bound deployment (walks the init args, dicts included)."""
    found: dict = {}

    def walk(node) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)
        elif hasattr(node, "_bound_deployment"):
            dep = node._bound_deployment
            found[dep.name] = dep
            walk(dep.init_args)

    walk(app)
    return found


def test_the_single_model_config_builds_the_same_three_deployments():
    import yaml

    from app.deployments import build
    from tests.conftest import REPO

    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    args = config["applications"][0]["args"]
    assert "models" not in args  # the shipped config serves one model
    settings = AppSettings.from_args(args)
    deployments = _bound(build(settings))
    assert set(deployments) == {"Ingress", "Scheduler", "ModelReplica", "JobRunner"}
    # The Scheduler, Ingress and JobRunner get the one ModelReplica handle itself, as before (not a dict).
    for name, position in (("Scheduler", 0), ("Ingress", 2), ("JobRunner", 2)):
        assert deployments[name].init_args[position]._bound_deployment.name == "ModelReplica"
    assert deployments["Ingress"].user_config is None


def test_a_models_config_builds_one_replica_deployment_per_version_handed_over_as_a_dict():
    from app.deployments import build

    settings = AppSettings.from_args({
        "model": {"served_model_name": SERVED},
        "models": [{"name": "stable", "weight": 90}, {"name": "canary", "weight": 10}],
        "jobs": {"enabled": True},
    })
    deployments = _bound(build(settings, {"ModelReplica-canary": {"num_replicas": 2}}))
    assert set(deployments) == {"Ingress", "Scheduler", "JobRunner", "ModelReplica-stable", "ModelReplica-canary"}
    assert deployments["ModelReplica-canary"].num_replicas == 2
    for name, position in (("Scheduler", 0), ("Ingress", 2), ("JobRunner", 2)):
        handles = deployments[name].init_args[position]
        assert {v: h._bound_deployment.name for v, h in handles.items()} == {
            "stable": "ModelReplica-stable", "canary": "ModelReplica-canary"}
    with pytest.raises(ValueError, match="unknown deployments"):
        build(settings, {"ModelReplica-v9": {}})


def test_the_ticket_office_places_each_version_on_its_own_replicas():
    import asyncio

    from app.protocol import GenerateRequest
    from app.scheduler.office import TicketOffice
    from app.scheduler.ray_router import RoutingSnapshot

    snapshots = {"ModelReplica-stable": RoutingSnapshot({"s1": None, "s2": None}),
                 "ModelReplica-canary": RoutingSnapshot({"c1": None})}
    settings = AppSettings.from_args({"models": [{"name": "stable", "weight": 90}, {"name": "canary", "weight": 10}]})
    office = TicketOffice(settings, deployments={"stable": "ModelReplica-stable", "canary": "ModelReplica-canary"},
                          snapshot=lambda name: snapshots[name])

    async def run():
        tickets = [await office.admit(GenerateRequest(input_ids=[i, 2, 3], model_version=v))
                   for i in range(10) for v in ("stable", "canary")]
        for t in tickets:
            assert t.replica_id in ({"c1"} if t.version == "canary" else {"s1", "s2"})
        # A replica failure is rerouted within the same version.
        t = tickets[1]
        again = await office.reroute(t.ticket_id, GenerateRequest(input_ids=[1], model_version="canary"), "c1", False)
        # (its only replica failed: no ticket replica; the canary handle's own router picks one)
        assert again.version == "canary" and again.replica_id is None
        with pytest.raises(NotFoundError):
            await office.admit(GenerateRequest(input_ids=[1], model_version="v9"))
        assert office.admission.stats()["in_flight"] == 20  # the refused one holds no slot

    asyncio.run(run())


def test_request_metrics_and_the_request_log_carry_the_version():
    from app.logs import RequestLogPolicy, RequestTrace
    from app.metrics import IngressMetrics, ObservabilitySettings, SequenceRecord

    created: dict = {}

    class Recording:
        def __init__(self):
            self.values, self.default_tags = [], {}

        def set_default_tags(self, tags):
            self.default_tags = dict(tags)

        def inc(self, value=1.0, tags=None):
            self.values.append((value, {**self.default_tags, **(tags or {})}))

        set = observe = inc

    def factory(spec, buckets):
        created[spec.name] = Recording()
        return created[spec.name]

    metrics = IngressMetrics("m", ObservabilitySettings(), factory)
    seq = SequenceRecord(received_s=1.0, first_output_s=1.1, last_output_s=1.2, completion_tokens=2,
                         prompt_tokens=3, finish_reason="stop", version="canary")
    metrics.record_sequence(seq)
    metrics.record_http("/v1/completions", 200, "canary")
    metrics.record_http("/v1/completions", 200)  # a single-model app
    assert created["num_requests"].values[0][1]["version"] == "canary"
    assert created["time_to_first_token_seconds"].values[0][1]["version"] == "canary"
    assert [t["version"] for _, t in created["http_requests"].values] == ["canary", "default"]

    class State:
        model_version = "canary"

    trace = RequestTrace("r1", "POST", "/v1/completions", 1.0, None, RequestLogPolicy(enabled=True), state=State())
    assert trace.log_fields(200, False)["model_version"] == "canary"


def test_the_ingress_reconfigure_moves_weights_and_a_bad_update_keeps_the_old_ones():
    import types

    from app.ingress import server
    from app.ingress.gateway import Gateway

    gateway = Gateway.__new__(Gateway)  # only its split matters here
    gateway.split = split(stable=90, canary=10)
    previous, server._Current.gateway = server._Current.gateway, gateway
    try:
        replica = types.SimpleNamespace()
        server.Ingress.reconfigure(replica, {"weights": {"stable": 50, "canary": 50}})
        assert {n: v.weight for n, v in gateway.split.versions.items()} == {"stable": 50, "canary": 50}
        # On a live replica a bad update is logged and the current weights stay (no outage) ...
        server.Ingress.reconfigure(replica, {"weights": {"v9": 100}})
        server.Ingress.reconfigure(replica, {"weights": {"stable": 0, "canary": 0}})
        assert {n: v.weight for n, v in gateway.split.versions.items()} == {"stable": 50, "canary": 50}
        # ... while a replica starting with one fails its start (the deploy fails visibly).
        with pytest.raises(ValueError, match="unknown"):
            server.Ingress.reconfigure(types.SimpleNamespace(), {"weights": {"v9": 100}})
        with pytest.raises(ValueError, match="user_config keys"):
            server.Ingress.reconfigure(types.SimpleNamespace(), {"model_weights": {}})
    finally:
        server._Current.gateway = previous
