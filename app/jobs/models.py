"""The records the job system stores, and the JSON the API shows for them.

Every record has an id, an owner (the API key id, or "anonymous"), a creation time and a version
(bumped by every write; writes are compare-and-swap on it). `index()` gives what the store keeps
beside the document so it can answer its queries: status, group, when the runner should look at
the record next (`due_at`), and when it finished (retention).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL = ("succeeded", "failed", "cancelled")
JOB_PATHS = ("/v1/chat/completions", "/v1/completions", "/generate", "/run")
BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class Index(BaseModel):
    status: str = ""
    group: str = ""
    due_at: float | None = None
    finished_at: float | None = None


class Record(BaseModel):
    id: str
    owner: str = "anonymous"
    created_at: float = Field(default_factory=time.time)
    version: int = 0

    def index(self) -> Index:
        return Index()


class Identity(BaseModel):
    """Who submitted the work, as the Ingress's auth recorded it (replayed when it runs)."""

    tenant: str = "anonymous"
    key_id: str | None = None
    priority: int = 0
    max_priority: int | None = None

    def request_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"tenant": self.tenant, "priority": self.priority,
                                 "max_priority": self.max_priority}
        if self.key_id is not None:
            state["key_id"] = self.key_id
        return state


class Callback(BaseModel):
    url: str
    status: Literal["pending", "delivered", "failed"] = "pending"
    attempts: int = 0
    next_at: float = 0.0
    last_error: str | None = None
    delivered_at: float | None = None


class Job(Record):
    """One request run asynchronously: an auto-converted request, a POST /v1/jobs, or a batch line."""

    path: str
    body: dict[str, Any]
    identity: Identity = Field(default_factory=Identity)
    status: JobStatus = "queued"
    priority: int = 0
    batch_id: str | None = None
    custom_id: str | None = None
    line: int | None = None  # 1-based line of the batch input file
    started_at: float | None = None
    finished_at: float | None = None
    not_before: float = 0.0  # a job sent back to the queue (overload) waits until then
    attempts: int = 0  # executions started (a lease taken over starts another)
    lease_owner: str | None = None
    lease_until: float = 0.0
    status_code: int | None = None  # of the response the job produced
    result: dict[str, Any] | None = None  # the response body, as the endpoint would have sent it
    error: dict[str, Any] | None = None  # OpenAI-shaped error body, for failed jobs
    callback: Callback | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def leased(self, now: float) -> bool:
        return self.lease_owner is not None and self.lease_until > now

    def index(self) -> Index:
        if self.status == "queued":
            due = self.not_before
        elif self.status == "running":
            due = self.lease_until
        elif self.callback is not None and self.callback.status == "pending":
            due = max(self.callback.next_at, self.lease_until if self.lease_owner else 0.0)
        else:
            due = None
        return Index(status=self.status, group=self.batch_id or "", due_at=due,
                     finished_at=self.finished_at)

    def public(self) -> dict[str, Any]:
        usage = (self.result or {}).get("usage") if isinstance(self.result, dict) else None
        timings = {
            "queued_s": None if self.started_at is None else round(self.started_at - self.created_at, 6),
            "running_s": None if self.started_at is None or self.finished_at is None
            else round(self.finished_at - self.started_at, 6),
        }
        callback = None
        if self.callback is not None:
            callback = {"url": self.callback.url, "status": self.callback.status,
                        "attempts": self.callback.attempts, "last_error": self.callback.last_error}
        return {
            "id": self.id,
            "object": "job",
            "status": self.status,
            "path": self.path,
            "created_at": int(self.created_at),
            "started_at": None if self.started_at is None else int(self.started_at),
            "finished_at": None if self.finished_at is None else int(self.finished_at),
            "attempts": self.attempts,
            "status_code": self.status_code,
            "result": self.result,
            "error": self.error,
            "usage": usage,
            "timings": timings,
            "callback": callback,
        }


BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired",
                      "cancelling", "cancelled"]


class Batch(Record):
    endpoint: str
    input_file_id: str
    completion_window: str = "24h"
    status: BatchStatus = "in_progress"
    metadata: dict[str, str] | None = None
    total: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None
    finished_at: float | None = None
    request_counts: dict[str, int] = Field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})
    check_at: float = 0.0  # when the runner looks at its lines next
    # The runner that finalizes the batch (writes its files) or delivers its callback holds a lease,
    # taken by compare-and-swap: with several runners, one does it; if it dies, another takes over.
    lease_owner: str | None = None
    lease_until: float = 0.0
    callback: Callback | None = None  # POSTed the batch object when it ends

    @property
    def terminal(self) -> bool:
        return self.status in ("completed", "cancelled", "failed", "expired")

    def leased(self, now: float) -> bool:
        return self.lease_owner is not None and self.lease_until > now

    def index(self) -> Index:
        if not self.terminal:
            due = self.lease_until if self.status == "finalizing" else self.check_at
        elif self.callback is not None and self.callback.status == "pending":
            due = max(self.callback.next_at, self.lease_until if self.lease_owner else 0.0)
        else:
            due = None
        return Index(status=self.status, due_at=due, finished_at=self.finished_at)

    def public(self) -> dict[str, Any]:
        def ts(value: float | None) -> int | None:
            return None if value is None else int(value)

        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": int(self.created_at),
            "in_progress_at": ts(self.in_progress_at),
            "expires_at": int(self.created_at + 24 * 3600),
            "finalizing_at": ts(self.finalizing_at),
            "completed_at": ts(self.completed_at),
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": ts(self.cancelling_at),
            "cancelled_at": ts(self.cancelled_at),
            "request_counts": dict(self.request_counts),
            "metadata": self.metadata,
        }


class FileObject(Record):
    filename: str
    purpose: str
    bytes: int
    finished_at: float = Field(default_factory=time.time)  # retention counts from upload

    def index(self) -> Index:
        return Index(status="processed", finished_at=self.finished_at)

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": int(self.created_at),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }
