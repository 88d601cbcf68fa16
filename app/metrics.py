"""Prometheus metrics, exported the Ray way, named after SGLang's.

Design
------
- **Export path.** Every metric is a `ray.serve.metrics` Counter/Gauge/Histogram created inside a
  Serve replica. Ray ships it through the node's metrics agent, which serves Prometheus exposition
  on `metrics_export_port` (`ray start --metrics-export-port`, `ray.init(_metrics_export_port=)`);
  the Ray dashboard and a Prometheus scrape read that same endpoint. Ray adds the labels
  `application`, `deployment`, `replica` (and `Component`, `NodeAddress`, `SessionName`,
  `WorkerId`); we add `model_name` (SGLang's label) to every metric.
- **Names.** SGLang names its metrics `sglang:<name>`; Ray silently drops metric names with a
  colon (measured on Ray 2.60), so ours are `sglserve_<name>` with SGLang's meanings and units,
  and Ray exports them as `ray_sglserve_<name>` (counters with `_total`, histograms as
  `_bucket`/`_sum`/`_count`). `CATALOGUE` lists them all; `exported_names()` gives the names a
  scrape shows; docs/observability.md has the table.
- **Where each number is measured.** Latencies the client feels (TTFT, inter-token latency, TPOT,
  end-to-end, framework overhead) and token/finish counters are measured in the Ingress, per
  sequence, by `observe_sequence` wrapped around the stream coming back from the scheduler.
  Queue time, refusals, retries and the in-flight limit are the Scheduler's (`SchedulerMetrics`);
  engine load (running/queued requests, KV usage, cache hit rate) is each ModelReplica's
  (`ReplicaMetrics`), sampled every `gauge_interval_s` rather than per event.
- **Framework overhead** = time our serving layers add around the engine, split where a token
  crosses them: `stage="ingress_to_engine"` (HTTP request received -> the engine accepted it:
  parsing, tokenizing, admission, routing, two Ray hops) and `stage="engine_to_ingress"` (the
  engine made the first token -> the ingress holds it: coalescing and two Ray hops back). Both
  subtract wall clocks of two processes (`time.time()`), exact on one node and as good as NTP
  across nodes. TTFT = ingress_to_engine + engine TTFT + engine_to_ingress.
- **Cost.** A Ray metric call costs ~6 us (measured), so the hot path makes a fixed, small number
  of calls per sequence (plus one per streamed chunk for inter-token latency), and gauges are
  sampled on a timer. `ObservabilitySettings.metrics_enabled=False` swaps in no-op metrics.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from app.protocol import EngineStats, GenerateOutput, GenerateRequest

PREFIX = "sglserve_"
RAY_PREFIX = "ray_"  # what Ray's exporter puts in front of every application metric
MODEL_LABEL = "model_name"

# Seconds. Latency buckets follow SGLang's TTFT/E2E spread; token buckets are finer (ITL/TPOT).
DEFAULT_LATENCY_BUCKETS_S = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 60.0,
]
DEFAULT_TOKEN_BUCKETS_S = [
    0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
]


class ObservabilitySettings(BaseModel):
    """`AppSettings.observability`: metrics and request logs (see docs/observability.md)."""

    model_config = ConfigDict(extra="forbid")

    metrics_enabled: bool = True
    gauge_interval_s: float = Field(1.0, gt=0)  # how often engine/scheduler gauges are sampled
    latency_buckets_s: list[float] = Field(default_factory=lambda: list(DEFAULT_LATENCY_BUCKETS_S))
    token_latency_buckets_s: list[float] = Field(default_factory=lambda: list(DEFAULT_TOKEN_BUCKETS_S))
    request_log: bool = True  # one JSON line per HTTP request (app.logs)
    request_log_sample_rate: float = Field(1.0, ge=0.0, le=1.0)  # share of successful requests logged
    request_log_errors: bool = True  # log every request with status >= 400, sampled or not

    @field_validator("latency_buckets_s", "token_latency_buckets_s")
    @classmethod
    def _increasing(cls, buckets: list[float]) -> list[float]:
        if not buckets:
            raise ValueError("histogram buckets must not be empty")
        if buckets[0] <= 0 or any(b <= a for a, b in zip(buckets, buckets[1:])):
            raise ValueError(f"histogram buckets must be positive and strictly increasing, got {buckets}")
        return buckets


# -- the catalogue -------------------------------------------------------------------------------

Kind = Literal["counter", "gauge", "histogram"]
Deployment = Literal["Ingress", "Scheduler", "ModelReplica", "any"]


@dataclass(frozen=True)
class MetricSpec:
    name: str  # without PREFIX
    kind: Kind
    description: str
    deployment: Deployment  # which deployment records it
    labels: tuple[str, ...] = ()  # besides model_name and Ray's serve labels
    buckets: Literal["latency", "token", None] = None
    sglang_name: str | None = None  # the SGLang metric with the same meaning, if there is one
    on_event_only: bool = False  # a counter Ray exports only once its event has happened

    @property
    def source_name(self) -> str:
        return PREFIX + self.name

    @property
    def exported_names(self) -> tuple[str, ...]:
        """The names a scrape of Ray's metrics endpoint shows for this metric."""
        base = RAY_PREFIX + self.source_name
        if self.kind == "counter":
            return (base + "_total",)
        if self.kind == "histogram":
            return (base + "_bucket", base + "_sum", base + "_count")
        return (base,)


CATALOGUE: tuple[MetricSpec, ...] = (
    # Ingress: per sequence, as the client sees it.
    MetricSpec("time_to_first_token_seconds", "histogram", "HTTP request received -> first token at the ingress.",
               "Ingress", buckets="latency", sglang_name="sglang:time_to_first_token_seconds"),
    MetricSpec("inter_token_latency_seconds", "histogram",
               "Gap between streamed chunks at the ingress divided by the tokens in the chunk (one observation per chunk).",
               "Ingress", buckets="token", sglang_name="sglang:inter_token_latency_seconds"),
    MetricSpec("time_per_output_token_seconds", "histogram", "(last token - first token) / (completion tokens - 1), per sequence.",
               "Ingress", buckets="token", sglang_name="sglang:time_per_output_token_seconds"),
    MetricSpec("e2e_request_latency_seconds", "histogram", "HTTP request received -> last token at the ingress, per sequence.",
               "Ingress", buckets="latency", sglang_name="sglang:e2e_request_latency_seconds"),
    MetricSpec("engine_time_to_first_token_seconds", "histogram", "Engine accepted the request -> engine made its first token.",
               "Ingress", buckets="latency"),
    MetricSpec("framework_overhead_seconds", "histogram",
               "Time the serving layers add around the engine: stage=ingress_to_engine | engine_to_ingress.",
               "Ingress", labels=("stage",), buckets="latency"),
    MetricSpec("prompt_tokens", "counter", "Prompt tokens of finished sequences.", "Ingress",
               sglang_name="sglang:prompt_tokens_total"),
    MetricSpec("generation_tokens", "counter", "Generated tokens.", "Ingress", sglang_name="sglang:generation_tokens_total"),
    MetricSpec("cached_tokens", "counter", "Prompt tokens served from the prefix cache.", "Ingress",
               sglang_name="sglang:cached_tokens_total"),
    MetricSpec("num_requests", "counter",
               "Sequences ended, by finish_reason (stop | length | abort | error | client_disconnect).",
               "Ingress", labels=("finish_reason",), sglang_name="sglang:num_requests_total"),
    MetricSpec("http_requests", "counter", "HTTP requests by endpoint and status code.", "Ingress",
               labels=("endpoint", "status_code")),
    MetricSpec("refused_requests", "counter", "HTTP requests refused for load (status 429 or 503).", "Ingress",
               labels=("status_code",), on_event_only=True),
    MetricSpec("aborted_requests", "counter",
               "Sequences that ended unfinished: reason=client_disconnect (stream closed) | abort (engine or /abort_request).",
               "Ingress", labels=("reason",), sglang_name="sglang:num_aborted_requests_total", on_event_only=True),
    # Scheduler.
    MetricSpec("queue_time_seconds", "histogram", "Time a request waited in the scheduler's admission queue.",
               "Scheduler", buckets="latency", sglang_name="sglang:queue_time_seconds"),
    MetricSpec("admission_rejections", "counter",
               "Requests the admission queue refused (503), by reason (overloaded | queue_timeout).",
               "Scheduler", labels=("reason",), on_event_only=True),
    MetricSpec("retries", "counter", "Requests retried on another replica after a replica failure.", "Scheduler",
               on_event_only=True),
    MetricSpec("scheduler_queued_requests", "gauge", "Requests waiting for admission.", "Scheduler"),
    MetricSpec("scheduler_in_flight_requests", "gauge", "Requests admitted and not finished.", "Scheduler"),
    MetricSpec("scheduler_max_in_flight", "gauge", "The in-flight limit (max_concurrent; adaptive control may move it).",
               "Scheduler"),
    # ModelReplica: engine load, sampled.
    MetricSpec("num_running_reqs", "gauge", "Requests in the engine's running batch.", "ModelReplica",
               sglang_name="sglang:num_running_reqs"),
    MetricSpec("num_queue_reqs", "gauge", "Requests waiting inside the engine.", "ModelReplica",
               sglang_name="sglang:num_queue_reqs"),
    MetricSpec("num_used_tokens", "gauge", "KV cache slots in use (tokens).", "ModelReplica",
               sglang_name="sglang:num_used_tokens"),
    MetricSpec("max_total_tokens", "gauge", "KV cache capacity (tokens).", "ModelReplica"),
    MetricSpec("token_usage", "gauge", "KV cache usage, 0..1.", "ModelReplica", sglang_name="sglang:token_usage"),
    MetricSpec("cache_hit_rate", "gauge", "Prompt tokens served from the prefix cache / prompt tokens looked up, since start.",
               "ModelReplica", sglang_name="sglang:cache_hit_rate"),
    MetricSpec("gen_throughput", "gauge", "Recent generation throughput (tokens/s).", "ModelReplica",
               sglang_name="sglang:gen_throughput"),
    # Autoscaling policy (runs in the Serve controller).
    MetricSpec("autoscaling_decisions", "counter", "Autoscaling decisions by direction (up | down | hold).", "any",
               labels=("direction",), on_event_only=True),
    MetricSpec("autoscaling_target_replicas", "gauge", "Replicas the autoscaling policy asked for.", "any",
               on_event_only=True),
)

# Every Ingress metric (per sequence or per HTTP request) also carries the model version that served
# it (app/canary.py); "default" in a single-model application.
VERSION_LABEL = "version"
SINGLE_MODEL_VERSION = "default"
CATALOGUE = tuple(replace(s, labels=(VERSION_LABEL, *s.labels)) if s.deployment == "Ingress" else s
                  for s in CATALOGUE)

SPECS: dict[str, MetricSpec] = {spec.name: spec for spec in CATALOGUE}


def exported_names(specs: Iterable[MetricSpec] = CATALOGUE) -> set[str]:
    return {name for spec in specs for name in spec.exported_names}


# -- metric objects ------------------------------------------------------------------------------


class Metric(Protocol):
    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None: ...
    def set(self, value: float, tags: dict[str, str] | None = None) -> None: ...
    def observe(self, value: float, tags: dict[str, str] | None = None) -> None: ...


class NullMetric:
    """Stands in for every metric when metrics are off: each call is a no-op."""

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        pass

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        pass

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        pass


MetricFactory = Callable[[MetricSpec, list[float] | None], Metric]


def ray_metric(spec: MetricSpec, buckets: list[float] | None) -> Metric:
    """A `ray.serve.metrics` object for `spec` (Serve adds application/deployment/replica tags)."""
    from ray.serve import metrics as serve_metrics

    tag_keys = (MODEL_LABEL, *spec.labels)
    if spec.kind == "counter":
        return serve_metrics.Counter(spec.source_name, description=spec.description, tag_keys=tag_keys)
    if spec.kind == "gauge":
        return serve_metrics.Gauge(spec.source_name, description=spec.description, tag_keys=tag_keys)
    assert buckets, f"histogram {spec.name} needs buckets"
    return serve_metrics.Histogram(
        spec.source_name, description=spec.description, boundaries=buckets, tag_keys=tag_keys
    )


class MetricSet:
    """The metrics one deployment records, created once, with `model_name` bound."""

    def __init__(
        self,
        names: Iterable[str],
        model_name: str,
        settings: ObservabilitySettings,
        factory: MetricFactory | None = None,
    ):
        self.enabled = settings.metrics_enabled
        self._metrics: dict[str, Metric] = {}
        factory = factory or ray_metric
        for name in names:
            spec = SPECS[name]
            if not self.enabled:
                self._metrics[name] = NullMetric()
                continue
            buckets = {
                "latency": settings.latency_buckets_s,
                "token": settings.token_latency_buckets_s,
                None: None,
            }[spec.buckets]
            metric = factory(spec, buckets)
            set_default = getattr(metric, "set_default_tags", None)
            if set_default is not None:
                defaults = {MODEL_LABEL: model_name}
                if VERSION_LABEL in spec.labels:
                    defaults[VERSION_LABEL] = SINGLE_MODEL_VERSION
                set_default(defaults)
            self._metrics[name] = metric

    def __getitem__(self, name: str) -> Metric:
        return self._metrics[name]


class PeriodicSampler:
    """Calls `sample()` every `interval_s` on the running event loop (or a daemon thread when
    created outside one), so gauges cost nothing per request."""

    def __init__(self, sample: Callable[[], None], interval_s: float):
        self._sample = sample
        self._interval_s = interval_s
        self._stopped = threading.Event()
        self._task: asyncio.Task[None] | None = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            threading.Thread(target=self._run_thread, name="sglserve-gauges", daemon=True).start()
        else:
            self._task = loop.create_task(self._run_task())

    def stop(self) -> None:
        self._stopped.set()
        if self._task is not None:
            self._task.cancel()

    def _sample_safely(self) -> None:
        try:
            self._sample()
        except Exception:  # noqa: BLE001 - a failed sample must never hurt serving
            pass

    async def _run_task(self) -> None:
        while not self._stopped.is_set():
            self._sample_safely()
            await asyncio.sleep(self._interval_s)

    def _run_thread(self) -> None:
        while not self._stopped.is_set():
            self._sample_safely()
            self._stopped.wait(self._interval_s)


# -- Ingress: per-sequence latencies and counters ----------------------------------------------------


@dataclass
class SequenceRecord:
    """What the ingress saw of one sequence; also summed into the request's log line."""

    received_s: float  # wall clock: HTTP request received (or the request's arrival_time)
    first_output_s: float | None = None  # wall clock: first token reached the ingress
    last_output_s: float | None = None
    engine_arrival_s: float | None = None
    engine_first_token_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None  # stop | length | abort | error | client_disconnect
    version: str = "default"  # the model version that served it (app/canary.py)

    def on_output(self, out: "GenerateOutput", now_s: float) -> float | None:
        """Take one increment; returns the inter-token latency it shows (gap / tokens), if any."""
        tokens = len(out.token_ids)
        itl_s = None
        if tokens:
            if self.first_output_s is None:
                self.first_output_s = now_s
            elif self.last_output_s is not None:
                itl_s = (now_s - self.last_output_s) / tokens
            self.last_output_s = now_s
        self.engine_arrival_s = self.engine_arrival_s or out.engine_arrival_time
        self.engine_first_token_s = self.engine_first_token_s or out.first_token_time
        self.prompt_tokens = out.prompt_tokens or self.prompt_tokens
        self.completion_tokens = out.completion_tokens or self.completion_tokens
        self.cached_tokens = out.cached_tokens or self.cached_tokens
        if out.finished:
            self.finish_reason = out.finish_reason.type if out.finish_reason else "stop"
        return itl_s

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_output_s is None else self.first_output_s - self.received_s

    @property
    def e2e_s(self) -> float | None:
        end = self.last_output_s
        return None if end is None else end - self.received_s

    @property
    def tpot_s(self) -> float | None:
        if self.completion_tokens < 2 or self.first_output_s is None or self.last_output_s is None:
            return None
        return (self.last_output_s - self.first_output_s) / (self.completion_tokens - 1)

    @property
    def engine_ttft_s(self) -> float | None:
        if self.engine_arrival_s is None or self.engine_first_token_s is None:
            return None
        return self.engine_first_token_s - self.engine_arrival_s

    @property
    def ingress_to_engine_s(self) -> float | None:
        return None if self.engine_arrival_s is None else self.engine_arrival_s - self.received_s

    @property
    def engine_to_ingress_s(self) -> float | None:
        if self.engine_first_token_s is None or self.first_output_s is None:
            return None
        return self.first_output_s - self.engine_first_token_s


INGRESS_METRICS = tuple(s.name for s in CATALOGUE if s.deployment == "Ingress")


class IngressMetrics:
    def __init__(self, model_name: str, settings: ObservabilitySettings, factory: MetricFactory | None = None):
        self.m = MetricSet(INGRESS_METRICS, model_name, settings, factory)
        self.enabled = self.m.enabled

    def record_sequence(self, seq: SequenceRecord) -> None:
        if not self.enabled:
            return
        m = self.m
        v = {VERSION_LABEL: seq.version}
        for name, value in (
            ("time_to_first_token_seconds", seq.ttft_s),
            ("e2e_request_latency_seconds", seq.e2e_s),
            ("time_per_output_token_seconds", seq.tpot_s),
            ("engine_time_to_first_token_seconds", seq.engine_ttft_s),
        ):
            if value is not None:
                m[name].observe(max(0.0, value), tags=v)
        for stage, value in (
            ("ingress_to_engine", seq.ingress_to_engine_s),
            ("engine_to_ingress", seq.engine_to_ingress_s),
        ):
            if value is not None:
                m["framework_overhead_seconds"].observe(max(0.0, value), tags={**v, "stage": stage})
        for name, count in (
            ("prompt_tokens", seq.prompt_tokens),
            ("generation_tokens", seq.completion_tokens),
            ("cached_tokens", seq.cached_tokens),
        ):
            if count > 0:  # Ray refuses inc(0)
                m[name].inc(count, tags=v)
        reason = seq.finish_reason or "error"
        m["num_requests"].inc(1, tags={**v, "finish_reason": reason})
        if reason in ("abort", "client_disconnect"):
            m["aborted_requests"].inc(1, tags={**v, "reason": reason})

    def observe_inter_token_latency(self, itl_s: float, version: str = SINGLE_MODEL_VERSION) -> None:
        if self.enabled:
            self.m["inter_token_latency_seconds"].observe(itl_s, tags={VERSION_LABEL: version})

    def record_http(self, endpoint: str, status_code: int, version: str | None = None) -> None:
        if not self.enabled:
            return
        code = str(status_code)
        v = version or SINGLE_MODEL_VERSION
        self.m["http_requests"].inc(1, tags={VERSION_LABEL: v, "endpoint": endpoint, "status_code": code})
        if status_code in (429, 503):
            self.m["refused_requests"].inc(1, tags={VERSION_LABEL: v, "status_code": code})


# The ingress process's metrics, set by `configure_ingress_metrics` (one Ingress per process).
_ingress_metrics: IngressMetrics | None = None
# The current HTTP request's log record (app.logs.RequestTrace), so sequences can add to it.
current_trace: ContextVar[Any] = ContextVar("sglserve_request_trace", default=None)


def configure_ingress_metrics(model_name: str, settings: ObservabilitySettings) -> IngressMetrics:
    global _ingress_metrics
    _ingress_metrics = IngressMetrics(model_name, settings)
    return _ingress_metrics


def ingress_metrics() -> IngressMetrics | None:
    return _ingress_metrics


async def observe_sequence(
    request: "GenerateRequest", outputs: AsyncIterator["GenerateOutput"]
) -> AsyncIterator["GenerateOutput"]:
    """Pass one sequence's increments through, timing them (the Gateway wraps every stream)."""
    metrics = _ingress_metrics
    trace = current_trace.get()
    if (metrics is None or not metrics.enabled) and trace is None:
        async for out in outputs:
            yield out
        return
    live = metrics if metrics is not None and metrics.enabled else None
    seq = SequenceRecord(received_s=trace.received_s if trace is not None else request.arrival_time,
                         version=request.model_version or SINGLE_MODEL_VERSION)
    try:
        async for out in outputs:
            itl_s = seq.on_output(out, time.time())
            if itl_s is not None and live is not None:
                live.observe_inter_token_latency(itl_s, seq.version)
            yield out
    except GeneratorExit:
        seq.finish_reason = seq.finish_reason or "client_disconnect"
        raise
    except asyncio.CancelledError:
        seq.finish_reason = seq.finish_reason or "client_disconnect"
        raise
    except BaseException:
        seq.finish_reason = seq.finish_reason or "error"
        raise
    finally:
        if seq.finish_reason is None:  # the stream ended without a finished output
            seq.finish_reason = "error"
        if live is not None:
            live.record_sequence(seq)
        if trace is not None:
            trace.add_sequence(seq)


# -- Scheduler ---------------------------------------------------------------------------------------

SCHEDULER_METRICS = tuple(s.name for s in CATALOGUE if s.deployment == "Scheduler")


class SchedulerMetrics:
    """Queue time, refusals and retries per event; queue depth and in-flight limits sampled."""

    def __init__(
        self,
        model_name: str,
        settings: ObservabilitySettings,
        admission: Any,
        factory: MetricFactory | None = None,
    ):
        self.m = MetricSet(SCHEDULER_METRICS, model_name, settings, factory)
        self.admission = admission
        self._sampler = PeriodicSampler(self.sample, settings.gauge_interval_s) if self.m.enabled else None

    @asynccontextmanager
    async def admitted(self, meta: Any) -> AsyncIterator[None]:
        """`async with` the admission queue's slot, timing the wait and counting refusals."""
        from app.errors import OverloadedError

        started = time.monotonic()
        entered = False
        try:
            async with self.admission.admit(meta):
                entered = True
                self.m["queue_time_seconds"].observe(time.monotonic() - started)
                yield
        except OverloadedError as exc:
            if not entered:
                self.m["admission_rejections"].inc(1, tags={"reason": exc.code or "overloaded"})
            raise

    async def acquire(self, meta: Any) -> None:
        """The admission queue's `acquire` (a slot held until released), timed and counted."""
        from app.errors import OverloadedError

        started = time.monotonic()
        try:
            await self.admission.acquire(meta)
        except OverloadedError as exc:
            self.m["admission_rejections"].inc(1, tags={"reason": exc.code or "overloaded"})
            raise
        self.m["queue_time_seconds"].observe(time.monotonic() - started)

    def record_retry(self) -> None:
        self.m["retries"].inc(1)

    def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.stop()

    def sample(self) -> None:
        admission = self.admission
        self.m["scheduler_queued_requests"].set(admission.depth)
        self.m["scheduler_in_flight_requests"].set(admission.in_flight)
        self.m["scheduler_max_in_flight"].set(admission.max_concurrent)


# -- ModelReplica --------------------------------------------------------------------------------------

REPLICA_METRICS = tuple(s.name for s in CATALOGUE if s.deployment == "ModelReplica")


class ReplicaMetrics:
    """Engine load gauges, sampled from `stats()` every `gauge_interval_s`."""

    def __init__(
        self,
        model_name: str,
        settings: ObservabilitySettings,
        stats: Callable[[], "EngineStats"],
        factory: MetricFactory | None = None,
    ):
        self.m = MetricSet(REPLICA_METRICS, model_name, settings, factory)
        self._stats = stats
        self._sampler = PeriodicSampler(self.sample, settings.gauge_interval_s) if self.m.enabled else None

    def sample(self) -> None:
        s = self._stats()
        m = self.m
        m["num_running_reqs"].set(s.num_running)
        m["num_queue_reqs"].set(s.num_waiting)
        m["num_used_tokens"].set(s.num_used_tokens)
        m["max_total_tokens"].set(s.max_total_tokens)
        m["token_usage"].set(s.num_used_tokens / s.max_total_tokens if s.max_total_tokens else 0.0)
        m["cache_hit_rate"].set(s.cache_hit_rate)
        m["gen_throughput"].set(s.gen_throughput_tok_s)

    def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.stop()


# -- Autoscaling -------------------------------------------------------------------------------------------

_autoscaling_metrics: dict[str, MetricSet] = {}


def record_autoscaling_decision(model_name: str, current_replicas: int, target_replicas: int) -> None:
    """Call from an autoscaling policy function (it runs in the Serve controller) per decision."""
    metrics = _autoscaling_metrics.get(model_name)
    if metrics is None:
        metrics = _autoscaling_metrics[model_name] = MetricSet(
            ("autoscaling_decisions", "autoscaling_target_replicas"), model_name, ObservabilitySettings()
        )
    direction = "up" if target_replicas > current_replicas else "down" if target_replicas < current_replicas else "hold"
    metrics["autoscaling_decisions"].inc(1, tags={"direction": direction})
    metrics["autoscaling_target_replicas"].set(target_replicas)


__all__ = [
    "CATALOGUE",
    "IngressMetrics",
    "MetricSpec",
    "ObservabilitySettings",
    "ReplicaMetrics",
    "SchedulerMetrics",
    "SequenceRecord",
    "configure_ingress_metrics",
    "current_trace",
    "exported_names",
    "observe_sequence",
    "record_autoscaling_decision",
]

