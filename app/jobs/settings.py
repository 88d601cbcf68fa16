"""The `jobs:` section of the settings (AppSettings.jobs)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


def default_sqlite_path() -> str:
    root = os.environ.get("SGLSERVE_CACHE_DIR", str(Path.home() / ".cache" / "sglserve"))
    return str(Path(root) / "jobs.sqlite3")


class JobsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # A non-streamed request still running after this long becomes a job (202 + Location).
    max_wait_s: float = Field(90.0, gt=0)
    max_wait_limit_s: float = Field(3600.0, gt=0)  # the largest X-Max-Wait-S a client may ask for
    # Where jobs, batches and files live. SQLite: one file, shared by the processes of one node.
    # Redis: for clusters of several nodes.
    store: Literal["sqlite", "redis"] = "sqlite"
    sqlite_path: str = Field(default_factory=default_sqlite_path)
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "sglserve:"
    retention_s: float = Field(7 * 24 * 3600.0, gt=0)  # finished jobs, batches and files
    # Execution: whoever runs a job holds a lease on it and renews it; a lease that runs out
    # (its holder died) lets the runner take the job over and run it again.
    lease_s: float = Field(15.0, gt=0)
    poll_interval_s: float = Field(0.2, gt=0)  # how often the runner looks for due work
    runner_concurrency: int = Field(16, gt=0)  # jobs one runner executes at once
    batch_concurrency: int = Field(8, gt=0)  # batch lines one runner has in flight at once
    # ... while other requests are in flight or queued in the scheduler: batch lines fill spare
    # capacity, and on a busy engine every extra sequence slows each decode step of the others.
    batch_concurrency_busy: int = Field(1, ge=0)
    batch_priority: int = -1000  # the scheduler priority of batch lines (lowest goes last)
    max_file_bytes: int = Field(4 * 1024 * 1024, gt=0)  # POST /v1/files; beyond: 413
    max_batch_lines: int = Field(50_000, gt=0)
    # Callbacks (Standard Webhooks): the secret is "whsec_<base64>", given here or by env var.
    callback_secret: str | None = None
    callback_secret_env: str = "SGLSERVE_WEBHOOK_SECRET"
    callback_max_attempts: int = Field(8, gt=0)
    callback_backoff_s: float = Field(1.0, gt=0)  # first retry delay; doubles, with jitter
    callback_max_backoff_s: float = Field(300.0, gt=0)
    callback_timeout_s: float = Field(10.0, gt=0)
    # SSRF: when non-empty, a callback host must be one of these (exact, or "*.example.com").
    callback_allowed_hosts: list[str] = Field(default_factory=list)
    # Private, loopback and link-local addresses are refused unless inside one of these networks.
    callback_allowed_networks: list[str] = Field(default_factory=list)

    def webhook_secret(self) -> str | None:
        return self.callback_secret or os.environ.get(self.callback_secret_env) or None
