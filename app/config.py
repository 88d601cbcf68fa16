"""Typed settings for the whole application, read from `serve_config.yaml` `args`.

One `AppSettings` object, validated at start (a typo is an error, not a silent default), passed to
every deployment and echoed at `/server_info`. Every limit has a unit in its name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.lang.settings import RunSettings
from app.security import SecuritySettings
from app.canary import ModelVersion
from app.ratelimit import RateLimitSettings
from app.safety import SafetySettings

from app.metrics import ObservabilitySettings
from app.jobs.settings import JobsSettings

TINY_MODEL = "sglserve/tiny-llama"  # built locally by app.engines.tiny_model; the default


def default_cache_dir() -> str:
    return os.environ.get("SGLSERVE_CACHE_DIR", str(Path.home() / ".cache" / "sglserve"))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Section):
    # A Hugging Face id, a local directory, or TINY_MODEL (random weights, real tokenizer).
    model_path: str = TINY_MODEL
    served_model_name: str | None = None  # the name clients use; defaults to model_path
    tokenizer_path: str | None = None  # defaults to model_path
    context_length: int | None = Field(None, gt=0)  # defaults to the model config's
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    cache_dir: str = Field(default_factory=default_cache_dir)  # where the tiny model is built

    @property
    def name(self) -> str:
        return self.served_model_name or self.model_path


class EngineSettings(_Section):
    kind: Literal["embedded", "sglang", "simulated"] = "embedded"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Budgets (SGLang's names).
    max_running_requests: int = Field(64, gt=0)
    max_total_tokens: int | None = Field(None, gt=0)  # KV capacity; None: derived from memory
    mem_fraction_static: float | None = Field(None, gt=0.0, lt=1.0)
    chunked_prefill_size: int = Field(512, gt=0)  # -1 in SGLang disables; here: a huge value
    max_prefill_tokens: int = Field(4096, gt=0)
    schedule_policy: Literal["fcfs", "lpm"] = "lpm"
    # Embedded engine: requests of higher priority prefill first, and while one waits or runs,
    # running requests of lower priority (batch lines) pause: they keep their KV and resume when
    # it has gone, so they never slow an interactive request's steps.
    priority_scheduling: bool = True
    disable_radix_cache: bool = False
    torch_threads: int | None = Field(None, gt=0)  # embedded engine; None: torch's default
    # Embedded engine: run it in a child process of the replica, with a GIL of its own, so that Ray
    # Serve's streaming work in the replica does not slow its Python step loop (sglang.Engine
    # already runs its scheduler in processes of its own).
    separate_process: bool = True
    # When that child process dies, the replica restarts it itself (docs/fault-tolerance.md): up
    # to this many attempts in a row, waiting restart_backoff_s, then twice that, ... between them;
    # if all fail, the replica's health check fails and Ray Serve replaces the replica.
    restart_max_attempts: int = Field(3, ge=0)
    restart_backoff_s: float = Field(0.5, ge=0)
    # Keep a second child waiting with the engine's libraries imported, so that a restart only
    # builds the engine (costs that child's host memory, ~0.3-0.5 GiB; no GPU memory).
    warm_spare_process: bool = True
    # Constrained decoding.
    grammar_backend: Literal["xgrammar", "none"] = "xgrammar"
    max_grammar_bytes: int = Field(65536, gt=0)
    grammar_compile_timeout_s: float = Field(10.0, gt=0)
    # Passed to sglang.Engine / ServerArgs only.
    tp_size: int = Field(1, gt=0)
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    load_format: str = "auto"
    attention_backend: str | None = None
    sampling_backend: str | None = None
    enable_metrics: bool = True
    disable_cuda_graph: bool = False
    sglang_extra_args: dict[str, Any] = Field(default_factory=dict)  # any other ServerArgs field
    # kind "simulated" only (a simulator, for benchmarks): app.engines.simulated.SimulatedCosts fields.
    simulated_costs: dict[str, float] = Field(default_factory=dict)


class SchedulerSettings(_Section):
    max_queue: int = Field(1024, ge=0)  # requests waiting for admission; beyond: 503
    max_concurrent: int = Field(256, gt=0)  # requests in flight across all replicas
    max_queue_wait_s: float = Field(30.0, gt=0)
    routing_policy: Literal["round_robin", "least_loaded", "power_of_two", "cache_aware"] = (
        "cache_aware"
    )
    routing_policy_kwargs: dict[str, Any] = Field(default_factory=dict)  # e.g. prefill_weight
    # Fairness: weight per tenant (API key id or user); unnamed tenants weigh 1.
    tenant_weights: dict[str, float] = Field(default_factory=dict)
    # Adaptive batching: per replica, the requests in flight follow a feedback controller aiming at
    # these p95 SLOs (app.scheduler.control), between the two bounds.
    adaptive_concurrency: bool = True
    slo_ttft_ms: float = Field(2000.0, gt=0)
    slo_itl_ms: float = Field(200.0, gt=0)
    min_in_flight_per_replica: int = Field(8, gt=0)
    max_in_flight_per_replica: int = Field(256, gt=0)
    decoding_chunk_size: int = Field(16, gt=0)  # max tokens coalesced into one streamed chunk
    stream_interval_ms: float = Field(50.0, ge=0)  # after the first token, send at most this often
    max_stream_interval_ms: float = Field(500.0, ge=0)  # ... stretched up to this with many streams
    max_retries: int = Field(2, ge=0)
    # Ticket protocol (app/scheduler/tickets.py): a started stream whose replica fails continues on
    # another replica from the prompt + the tokens already sent, at most this many times.
    max_stream_migrations: int = Field(2, ge=0)
    ticket_lease_s: float = Field(30.0, gt=0)  # a ticket the Ingress stops renewing frees its slot
    # Each Ingress coalesces the admits that arrive while one is being sent into one
    # Scheduler.admit_many call (app/ingress/admits.py); false: one admit call per request.
    batch_admits: bool = True


class IngressSettings(_Section):
    max_request_bytes: int = Field(4 * 1024 * 1024, gt=0)
    ready_timeout_s: float = Field(10.0, gt=0)
    default_max_tokens: int = Field(256, gt=0)
    access_log: bool = False
    # Prompts longer than this (characters) are tokenized / chat-rendered in a thread, off the event
    # loop; shorter ones inline (a thread hop costs more than they do). -1: always in a thread.
    tokenize_inline_max_chars: int = Field(2048, ge=-1)
    # OpenAI streams send one chunk per token, as SGLang does (stream_interval 1), whatever the
    # replica coalesced for the hop; false: one chunk per coalesced increment (fewer, larger ones).
    stream_chunk_per_token: bool = True


class PlaygroundSettings(_Section):
    """The browser playground at `/` and its `GET /stream` (EventSource) route."""

    enabled: bool = True
    stream_token_ttl_s: float = Field(300.0, gt=0)  # lifetime of a POST /v1/stream_tokens token
    # Environment variable holding the HMAC secret that signs stream tokens; set it when there
    # are several Ingress replicas. None: a random secret per Ingress process.
    stream_token_secret_env: str | None = None


class AppSettings(_Section):
    model: ModelSettings = Field(default_factory=ModelSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    ingress: IngressSettings = Field(default_factory=IngressSettings)
    run: RunSettings = Field(default_factory=RunSettings)  # /run: limits and registered functions
    security: SecuritySettings = Field(default_factory=SecuritySettings)  # API keys
    observability: ObservabilitySettings = Field(default_factory=ObservabilitySettings)
    playground: PlaygroundSettings = Field(default_factory=PlaygroundSettings)  # browser page, /stream
    rate_limits: RateLimitSettings = Field(default_factory=RateLimitSettings)  # per API key (app.ratelimit)
    safety: SafetySettings = Field(default_factory=SafetySettings)  # content filters (app.safety)
    # Canary: several versions of the served model, split by weight (app.canary); empty: one model.
    models: list[ModelVersion] = Field(default_factory=list)
    jobs: JobsSettings = Field(default_factory=JobsSettings)  # async jobs, callbacks, Batch API

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> "AppSettings":
        return cls.model_validate(args or {})


def settings_reference() -> str:
    """Markdown tables of every setting (section, name, default), for the README."""
    lines: list[str] = []
    for section, field in AppSettings.model_fields.items():
        model = field.annotation
        prefix = section
        if getattr(model, "__origin__", None) is list:  # a list section (`models`): its items' fields
            model, prefix = model.__args__[0], f"{section}[]"
        lines += [f"#### `{section}`", "", "| setting | default |", "|---|---|"]
        for name, sub in model.model_fields.items():  # type: ignore[union-attr]
            if sub.default_factory is not None:
                default = sub.default_factory()
                if isinstance(default, BaseModel):
                    default = "{...}"
            else:
                default = sub.default
            if section == "model" and name == "cache_dir":
                default = "$SGLSERVE_CACHE_DIR or ~/.cache/sglserve"
            lines.append(f"| `{prefix}.{name}` | {'required' if sub.is_required() else f'`{default!r}`'} |")
        lines.append("")
    return "\n".join(lines)


README_BEGIN, README_END = "<!-- settings:begin -->", "<!-- settings:end -->"


def readme_with_settings(readme: str) -> str:
    """README text with the settings reference between its markers replaced by the current one."""
    head, _, rest = readme.partition(README_BEGIN)
    _, _, tail = rest.partition(README_END)
    return f"{head}{README_BEGIN}\n{settings_reference()}{README_END}{tail}"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--update-readme"]:  # keeps README.md's settings table true
        path = Path(__file__).resolve().parent.parent / "README.md"
        path.write_text(readme_with_settings(path.read_text()))
    else:
        print(settings_reference())
