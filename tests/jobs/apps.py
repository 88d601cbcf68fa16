"""The job tests' applications: API keys for two callers, one admission slot (so a held /run
program keeps every other request waiting, deterministically), short leases, callbacks allowed
to the local receiver's address only."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx

from tests.conftest import serve_args
from tests.jobs.conftest import SECRET

KEY_ALICE, KEY_BOB = "alice-test-key-1", "bob-test-key-2"
ALICE = {"Authorization": f"Bearer {KEY_ALICE}"}
BOB = {"Authorization": f"Bearer {KEY_BOB}"}
MODEL = "sglserve/tiny-llama"


def jobs_app_args(tmp: Path, store: str = "sqlite", redis_url: str | None = None, prefix: str = "t:") -> dict:
    jobs = {"store": store, "sqlite_path": str(tmp / "jobs.sqlite3"), "lease_s": 3.0, "poll_interval_s": 0.1,
            "callback_secret": SECRET, "callback_allowed_networks": ["127.0.0.2/32"],
            "callback_backoff_s": 0.2, "max_file_bytes": 256 * 1024}
    if redis_url is not None:
        jobs.update(redis_url=redis_url, redis_prefix=prefix)
    digest = lambda key: hashlib.sha256(key.encode()).hexdigest()  # noqa: E731
    return serve_args(
        security={"api_keys": [{"id": "alice", "key_sha256": digest(KEY_ALICE)},
                               {"id": "bob", "key_sha256": digest(KEY_BOB)}]},
        scheduler={"max_concurrent": 1, "adaptive_concurrency": False, "max_queue_wait_s": 600, "max_queue": 256},
        run={"function_modules": ["tests.jobs.hold"], "function_timeout_s": 900},
        jobs=jobs,
    )


def held_program(go_file: Path) -> dict:
    """A /run body that waits for `go_file`, then generates a few greedy tokens."""
    return {"program": 'Wait: {test.hold(path)}. Then: {gen("tail", max_tokens=4, temperature=0)}',
            "arguments": {"path": str(go_file)}}


def chat_body(content: str, max_tokens: int = 8) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0}


def get_job(base: str, job_id: str, headers=ALICE) -> dict:
    response = httpx.get(f"{base}/v1/jobs/{job_id}", headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()


def wait_status(base: str, job_id: str, statuses: tuple[str, ...], timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = get_job(base, job_id)
            if last["status"] in statuses:
                return last
        except httpx.HTTPError as exc:  # a restarting Ingress
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach {statuses}; last: {last!r}")
