"""Callback delivery, signed per Standard Webhooks (https://www.standardwebhooks.com/).

Headers: `webhook-id` (stable per job: a redelivery carries the same id, so receivers can
deduplicate), `webhook-timestamp` (unix seconds) and `webhook-signature`
("v1,<base64 HMAC-SHA256 of '{id}.{timestamp}.{body}'>" with the secret's bytes; the secret is
configured as "whsec_<base64>").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import httpx

from app.jobs.models import Job
from app.jobs.settings import JobsSettings
from app.jobs.ssrf import check_callback_url

SECRET_PREFIX = "whsec_"


def secret_bytes(secret: str) -> bytes:
    return base64.b64decode(secret[len(SECRET_PREFIX):] if secret.startswith(SECRET_PREFIX) else secret)


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    message = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def webhook_id(job: Job) -> str:
    return f"msg_{job.id}"


def signed_request(job: Job, secret: str, now: float | None = None) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(job.public(), separators=(",", ":")).encode()
    timestamp = int(now if now is not None else time.time())
    wid = webhook_id(job)
    headers = {
        "content-type": "application/json",
        "webhook-id": wid,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, wid, timestamp, body),
        "user-agent": "sglserve-jobs",
    }
    return body, headers


async def deliver(client: httpx.AsyncClient, job: Job, settings: JobsSettings) -> str | None:
    """POST the job to its callback URL once; None on a 2xx, else why it failed."""
    assert job.callback is not None
    secret = settings.webhook_secret()
    if secret is None:
        return "no callback secret is configured (jobs.callback_secret or its env var)"
    try:
        await check_callback_url(job.callback.url, settings)
    except Exception as exc:  # noqa: BLE001 - the reason is recorded on the job
        return str(getattr(exc, "message", exc))
    body, headers = signed_request(job, secret)
    try:
        response = await client.post(job.callback.url, content=body, headers=headers,
                                     timeout=settings.callback_timeout_s, follow_redirects=False)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"[:300]
    if 200 <= response.status_code < 300:
        return None
    return f"HTTP {response.status_code}"
