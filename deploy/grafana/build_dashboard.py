"""Writes deploy/grafana/sglserve.json, the Grafana dashboard for sglserve, from the panel list below.

Run `python deploy/grafana/build_dashboard.py` after changing a panel; the JSON is committed so
operators can import it without Python (Grafana: Dashboards -> New -> Import). Every metric name a
query uses must be one the application exports (tests/observability/test_obs_grafana.py checks
them against a live scrape).
"""

from __future__ import annotations

import json
from pathlib import Path

OURS = '{application=~"$application", model_name=~"$model"}'
SERVE = '{application=~"$application"}'
RATE = "[$__rate_interval]"


def q(expr: str, legend: str) -> dict:
    return {"expr": expr, "legendFormat": legend}


def quantiles(metric: str, by: str = "", selector: str = OURS) -> list[dict]:
    group = f"le{', ' + by if by else ''}"
    suffix = f" {{{{{by}}}}}" if by else ""
    return [
        q(f"histogram_quantile({p}, sum by ({group}) (rate({metric}_bucket{selector}{RATE})))", f"p{int(p * 100)}{suffix}")
        for p in (0.5, 0.9, 0.99)
    ]


# (row title, [(panel title, unit, targets)])
ROWS: list[tuple[str, list[tuple[str, str, list[dict]]]]] = [
    ("Traffic", [
        ("HTTP requests by status", "reqps", [
            q(f"sum by (status_code) (rate(ray_sglserve_http_requests_total{OURS}{RATE}))", "{{status_code}}")]),
        ("Sequences by finish reason", "reqps", [
            q(f"sum by (finish_reason) (rate(ray_sglserve_num_requests_total{OURS}{RATE}))", "{{finish_reason}}")]),
        ("Tokens per second", "short", [
            q(f"sum(rate(ray_sglserve_prompt_tokens_total{OURS}{RATE}))", "prompt"),
            q(f"sum(rate(ray_sglserve_generation_tokens_total{OURS}{RATE}))", "generated"),
            q(f"sum(rate(ray_sglserve_cached_tokens_total{OURS}{RATE}))", "prompt, from cache")]),
        ("Refusals, aborts, retries", "reqps", [
            q(f"sum by (status_code) (rate(ray_sglserve_refused_requests_total{OURS}{RATE}))", "refused {{status_code}}"),
            q(f"sum by (reason) (rate(ray_sglserve_admission_rejections_total{OURS}{RATE}))", "admission: {{reason}}"),
            q(f"sum by (reason) (rate(ray_sglserve_aborted_requests_total{OURS}{RATE}))", "aborted: {{reason}}"),
            q(f"sum(rate(ray_sglserve_retries_total{OURS}{RATE}))", "retries")]),
    ]),
    ("Latency", [
        ("Time to first token", "s", quantiles("ray_sglserve_time_to_first_token_seconds")),
        ("Inter-token latency", "s", quantiles("ray_sglserve_inter_token_latency_seconds")),
        ("Time per output token", "s", quantiles("ray_sglserve_time_per_output_token_seconds")),
        ("End-to-end latency", "s", quantiles("ray_sglserve_e2e_request_latency_seconds")),
        ("Queue time (scheduler admission)", "s", quantiles("ray_sglserve_queue_time_seconds")),
        ("Framework overhead vs engine TTFT (p50)", "s", [
            q(f"histogram_quantile(0.5, sum by (le, stage) (rate(ray_sglserve_framework_overhead_seconds_bucket{OURS}{RATE})))", "overhead {{stage}}"),
            q(f"histogram_quantile(0.5, sum by (le) (rate(ray_sglserve_engine_time_to_first_token_seconds_bucket{OURS}{RATE})))", "engine TTFT")]),
    ]),
    ("Engine and scheduler load", [
        ("Requests running / queued", "short", [
            q(f"sum(ray_sglserve_num_running_reqs{OURS})", "engine running"),
            q(f"sum(ray_sglserve_num_queue_reqs{OURS})", "engine queued"),
            q(f"sum(ray_sglserve_scheduler_queued_requests{OURS})", "admission queue"),
            q(f"sum(ray_sglserve_scheduler_in_flight_requests{OURS})", "in flight"),
            q(f"sum(ray_sglserve_scheduler_max_in_flight{OURS})", "in-flight limit")]),
        ("KV cache usage", "percentunit", [
            q(f"ray_sglserve_token_usage{OURS}", "{{replica}}")]),
        ("KV cache tokens", "short", [
            q(f"sum(ray_sglserve_num_used_tokens{OURS})", "used"),
            q(f"sum(ray_sglserve_max_total_tokens{OURS})", "capacity")]),
        ("Prefix cache hit rate", "percentunit", [
            q(f"ray_sglserve_cache_hit_rate{OURS}", "{{replica}}")]),
        ("Generation throughput per replica", "short", [
            q(f"ray_sglserve_gen_throughput{OURS}", "{{replica}} tok/s")]),
    ]),
    ("Replicas and autoscaling", [
        ("Healthy replicas", "short", [
            q(f"sum by (deployment) (ray_serve_deployment_replica_healthy{SERVE})", "{{deployment}}"),
            q(f"sum by (deployment) (ray_serve_autoscaling_target_replicas{SERVE})", "{{deployment}} target (Serve)"),
            q(f"max(ray_sglserve_autoscaling_target_replicas{{model_name=~\"$model\"}})", "target (sglserve policy)")]),
        ("Autoscaling decisions", "short", [
            q(f"sum by (direction) (increase(ray_sglserve_autoscaling_decisions_total{{model_name=~\"$model\"}}[5m]))", "{{direction}}")]),
    ]),
    ("Ray Serve", [
        ("Serve HTTP requests by status", "reqps", [
            q(f"sum by (status_code) (rate(ray_serve_num_http_requests_total{SERVE}{RATE}))", "{{status_code}}")]),
        ("Serve HTTP latency (proxy)", "ms", quantiles("ray_serve_http_request_latency_ms", selector=SERVE)),
        ("Processing latency by deployment (p50)", "ms", [
            q(f"histogram_quantile(0.5, sum by (le, deployment) (rate(ray_serve_deployment_processing_latency_ms_bucket{SERVE}{RATE})))", "{{deployment}}")]),
        ("Ongoing and queued requests by deployment", "short", [
            q(f"sum by (deployment) (ray_serve_replica_processing_queries{SERVE})", "{{deployment}} processing"),
            q(f"sum by (deployment) (ray_serve_deployment_queued_queries{SERVE})", "{{deployment}} queued at handles")]),
    ]),
]


def build() -> dict:
    panels: list[dict] = []
    y = 0
    panel_id = 1
    for row_title, row_panels in ROWS:
        panels.append({"type": "row", "title": row_title, "id": panel_id, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        panel_id += 1
        y += 1
        for i, (title, unit, targets) in enumerate(row_panels):
            panels.append({
                "type": "timeseries",
                "title": title,
                "id": panel_id,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 8, "x": (i % 3) * 8, "y": y + (i // 3) * 8},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [{**t, "refId": chr(ord("A") + k),
                             "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                            for k, t in enumerate(targets)],
            })
            panel_id += 1
        y += 8 * ((len(row_panels) + 2) // 3)
    variable = lambda name, label, query: {  # noqa: E731
        "name": name, "label": label, "type": "query", "query": query, "refresh": 2,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "includeAll": True, "multi": True, "current": {"text": "All", "value": "$__all"},
    }
    return {
        "title": "sglserve",
        "uid": "sglserve",
        "description": "sglserve (SGLang on Ray Serve): latency split, load, tokens, refusals; plus Ray Serve's own metrics.",
        "tags": ["sglserve", "ray-serve", "sglang"],
        "schemaVersion": 39,
        "time": {"from": "now-30m", "to": "now"},
        "refresh": "10s",
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"},
            variable("application", "Application", "label_values(ray_sglserve_http_requests_total, application)"),
            variable("model", "Model", "label_values(ray_sglserve_http_requests_total, model_name)"),
        ]},
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("sglserve.json")
    out.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {out} ({sum(1 for p in build()['panels'] if p['type'] != 'row')} panels)")
