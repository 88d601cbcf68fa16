"""Metric arithmetic, settings, the scheduler's admission accounting and the JSON log format, without
a cluster. (The Ray -> Prometheus pipeline itself is tested against a real Prometheus in
test_obs_prometheus.py.)"""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest
from pydantic import ValidationError

from app.config import AppSettings
from app.errors import OverloadedError
from app.logs import JsonFormatter, RequestLogPolicy, sampled
from app.metrics import (
    CATALOGUE,
    NullMetric,
    ObservabilitySettings,
    SchedulerMetrics,
    SequenceRecord,
    exported_names,
)
from app.protocol import FinishReason, GenerateOutput
from app.scheduler.admission import AdmissionQueue, RequestMeta


class RecordingMetric:
    """Keeps what was recorded in memory so a unit test can read it back. Ray's real metric
    objects are exercised end to end (through a real Prometheus) in test_obs_prometheus.py."""

    def __init__(self) -> None:
        self.values: list[tuple[float, dict[str, str]]] = []
        self.default_tags: dict[str, str] = {}

    def set_default_tags(self, tags: dict[str, str]) -> None:
        self.default_tags = dict(tags)

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self.values.append((value, {**self.default_tags, **(tags or {})}))

    set = observe = inc


def recording_factory(created: dict[str, RecordingMetric]):
    def make(spec, buckets):
        created[spec.name] = RecordingMetric()
        return created[spec.name]

    return make


def output(tokens: int, completion: int, finished: bool = False, **kw) -> GenerateOutput:
    return GenerateOutput(
        rid="r",
        token_ids=list(range(tokens)),
        completion_tokens=completion,
        prompt_tokens=10,
        cached_tokens=4,
        finished=finished,
        finish_reason=FinishReason(type="length") if finished else None,
        **kw,
    )


def test_sequence_record_derives_ttft_itl_tpot_and_overhead_split():
    seq = SequenceRecord(received_s=100.0)
    first = output(1, 1, engine_arrival_time=100.02, first_token_time=100.05)
    assert seq.on_output(first, now_s=100.06) is None  # the first token has no gap before it
    assert seq.on_output(output(4, 5), now_s=100.10) == pytest.approx(0.01)  # 40 ms over 4 tokens
    assert seq.on_output(output(0, 5, finished=True), now_s=100.11) is None  # no tokens, no ITL
    assert seq.ttft_s == pytest.approx(0.06)
    assert seq.e2e_s == pytest.approx(0.10)  # to the last token
    assert seq.tpot_s == pytest.approx(0.04 / 4)
    assert seq.engine_ttft_s == pytest.approx(0.03)
    assert seq.ingress_to_engine_s == pytest.approx(0.02)
    assert seq.engine_to_ingress_s == pytest.approx(0.01)
    # The split adds up to the TTFT the client saw.
    assert seq.ingress_to_engine_s + seq.engine_ttft_s + seq.engine_to_ingress_s == pytest.approx(seq.ttft_s)
    assert (seq.prompt_tokens, seq.completion_tokens, seq.cached_tokens) == (10, 5, 4)
    assert seq.finish_reason == "length"


def test_tpot_needs_two_tokens():
    seq = SequenceRecord(received_s=0.0)
    seq.on_output(output(1, 1, finished=True), now_s=1.0)
    assert seq.tpot_s is None and seq.ttft_s == 1.0


def test_catalogue_names_follow_the_export_rules():
    names = exported_names()
    assert "ray_sglserve_time_to_first_token_seconds_bucket" in names
    assert "ray_sglserve_prompt_tokens_total" in names
    assert "ray_sglserve_num_running_reqs" in names
    for spec in CATALOGUE:
        assert ":" not in spec.source_name, "Ray drops metric names with a colon"
        assert (spec.kind == "histogram") == (spec.buckets is not None)
    assert len({s.name for s in CATALOGUE}) == len(CATALOGUE)


def test_settings_reject_bad_buckets_and_rates():
    with pytest.raises(ValidationError, match="strictly increasing"):
        ObservabilitySettings(latency_buckets_s=[0.1, 0.1, 1.0])
    with pytest.raises(ValidationError):
        ObservabilitySettings(request_log_sample_rate=1.5)
    with pytest.raises(ValidationError, match="extra"):
        AppSettings.from_args({"observability": {"metrics_enabeld": False}})
    assert AppSettings.from_args({"observability": {"metrics_enabled": False}}).observability.metrics_enabled is False


async def test_scheduler_metrics_time_the_queue_and_count_refusals_by_reason():
    created: dict[str, RecordingMetric] = {}
    queue = AdmissionQueue(max_queue=1, max_concurrent=1, max_queue_wait_s=0.2)
    metrics = SchedulerMetrics("m", ObservabilitySettings(gauge_interval_s=60), queue, recording_factory(created))

    async def hold(rid: str, seconds: float) -> None:
        async with metrics.admitted(RequestMeta(rid=rid)):
            await asyncio.sleep(seconds)

    first = asyncio.create_task(hold("a", 0.1))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(hold("b", 0.0))  # waits ~0.09 s for the slot
    await asyncio.sleep(0.01)
    with pytest.raises(OverloadedError):  # the queue (1) is full
        await hold("c", 0.0)
    await asyncio.gather(first, second)

    waits = sorted(v for v, _ in created["queue_time_seconds"].values)
    assert len(waits) == 2 and waits[0] < 0.01 and 0.05 < waits[1] < 0.5
    assert created["queue_time_seconds"].values[0][1] == {"model_name": "m"}
    assert [tags["reason"] for _, tags in created["admission_rejections"].values] == ["overloaded"]

    metrics.sample()
    metrics.stop()
    assert created["scheduler_max_in_flight"].values[-1][0] == 1
    assert created["scheduler_in_flight_requests"].values[-1][0] == 0


async def test_an_error_inside_an_admitted_request_is_not_a_refusal():
    created: dict[str, RecordingMetric] = {}
    queue = AdmissionQueue(max_queue=4, max_concurrent=1, max_queue_wait_s=1)
    metrics = SchedulerMetrics("m", ObservabilitySettings(gauge_interval_s=60), queue, recording_factory(created))
    with pytest.raises(OverloadedError):
        async with metrics.admitted(RequestMeta(rid="x")):
            raise OverloadedError("from a replica")
    metrics.stop()
    assert created["admission_rejections"].values == []
    assert queue.in_flight == 0


def test_disabled_metrics_are_no_ops():
    queue = AdmissionQueue(max_queue=1, max_concurrent=1, max_queue_wait_s=1)
    metrics = SchedulerMetrics("m", ObservabilitySettings(metrics_enabled=False), queue)
    assert isinstance(metrics.m["queue_time_seconds"], NullMetric)


def test_json_formatter_writes_one_object_per_line_with_fields():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("sglserve.test_json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("hello %s", "world\nwith newline", extra={"fields": {"request_id": "abc", "status": 200}})
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["message"] == "hello world\nwith newline"
    assert entry["level"] == "WARNING" and entry["request_id"] == "abc" and entry["status"] == 200
    assert entry["ts"].endswith("+00:00")


def test_log_sampling_is_deterministic_and_close_to_the_rate():
    ids = [f"request-{i}" for i in range(4000)]
    kept = [i for i in ids if sampled(i, 0.25)]
    assert 0.22 < len(kept) / len(ids) < 0.28
    assert kept == [i for i in ids if sampled(i, 0.25)]
    assert all(sampled(i, 1.0) for i in ids[:50]) and not any(sampled(i, 0.0) for i in ids[:50])


def test_log_policy_keeps_errors_when_sampling_successes_out():
    policy = RequestLogPolicy(enabled=True, sample_rate=0.0, always_log_errors=True)
    assert not policy.should_log("a", 200)
    assert policy.should_log("a", 503)
    assert not RequestLogPolicy(enabled=True, sample_rate=0.0, always_log_errors=False).should_log("a", 503)
    assert not RequestLogPolicy(enabled=False).should_log("a", 500)


def test_shipped_prometheus_config_is_valid():
    import shutil
    import subprocess
    from pathlib import Path

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    config = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "prometheus.yml"
    result = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
