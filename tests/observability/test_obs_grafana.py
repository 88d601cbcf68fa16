"""The Grafana dashboard only queries metrics the application really exports: every metric name in
every panel must show up in a live scrape of the test cluster's Ray metrics endpoint (after real
traffic), except counters whose event never happens in this test (retries, autoscaling...), which
must at least be in our catalogue, whose naming rule the live scrape confirms for the others."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

from app.metrics import CATALOGUE

pytestmark = pytest.mark.serve

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "sglserve.json"
# A metric name directly followed by a label selector or a range: `name{...}` / `name[5m]`.
SELECTED_METRIC = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[{\[]")
LABEL_VALUES_METRIC = re.compile(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)")


def dashboard_queries() -> dict[str, list[str]]:
    board = json.loads(DASHBOARD.read_text())
    queries = {
        f"panel '{p['title']}'": [t["expr"] for t in p.get("targets", [])]
        for p in board["panels"]
        if p["type"] != "row"
    }
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            queries[f"variable '{var['name']}'"] = [var["query"]]
    return queries


def names_in(expr: str) -> set[str]:
    return set(SELECTED_METRIC.findall(expr)) | set(LABEL_VALUES_METRIC.findall(expr))


def test_every_panel_has_queries_that_name_metrics():
    for where, exprs in dashboard_queries().items():
        assert exprs, f"{where} has no query"
        for expr in exprs:
            assert names_in(expr), f"{where}: no metric name found in {expr!r}"


def test_every_catalogue_metric_is_on_the_dashboard():
    used = {name for exprs in dashboard_queries().values() for e in exprs for name in names_in(e)}
    for spec in CATALOGUE:
        assert set(spec.exported_names) & used, f"{spec.source_name} is on no panel"


def test_every_dashboard_metric_is_exported(stack, exported_metric_names):
    # A streamed completion long enough to arrive in several chunks (inter-token latency).
    with httpx.stream(
        "POST",
        f"{stack.base_url}/v1/completions",
        json={"model": "sglserve/tiny-llama", "prompt": "Grafana", "max_tokens": 48, "temperature": 0,
              "ignore_eos": True, "stream": True},
        timeout=120,
    ) as resp:
        resp.raise_for_status()
        chunks = sum(1 for line in resp.iter_lines() if line.startswith("data: "))
    assert chunks > 2
    event_only = {n for spec in CATALOGUE if spec.on_event_only for n in spec.exported_names}
    always = {n for spec in CATALOGUE if not spec.on_event_only for n in spec.exported_names}
    wanted = {name for exprs in dashboard_queries().values() for e in exprs for name in names_in(e)}

    deadline = time.monotonic() + 45
    while True:
        live = exported_metric_names()
        missing = sorted((wanted - event_only - live) | (always - live))
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    serve_names = sorted(n for n in live if n.startswith("ray_serve_"))
    assert not missing, f"queried or catalogued but not exported: {missing}; Ray Serve exports {serve_names}"
    assert wanted - live <= event_only
