"""Verifying job callbacks signed per the Standard Webhooks scheme (standardwebhooks.com).

The server signs `"{webhook-id}.{webhook-timestamp}.{body}"` with HMAC-SHA256 under a shared
secret (base64, optionally prefixed `whsec_`) and sends `webhook-signature: v1,<base64 sig>`
(several space-separated signatures while a secret is being rotated).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

from .errors import WebhookVerificationError

SECRET_PREFIX = "whsec_"
TOLERANCE_S = 5 * 60  # the scheme's window against replays


def _secret_bytes(secret: str | bytes) -> bytes:
    if isinstance(secret, bytes):
        return secret
    if secret.startswith(SECRET_PREFIX):
        secret = secret[len(SECRET_PREFIX):]
    try:
        return base64.b64decode(secret, validate=True)
    except ValueError as exc:
        raise WebhookVerificationError("the webhook secret is not valid base64") from exc


def sign(msg_id: str, timestamp: int, body: str | bytes, secret: str | bytes) -> str:
    """The `webhook-signature` value for a message (`v1,<base64>`)."""
    payload = body.decode("utf-8") if isinstance(body, bytes) else body
    signed = f"{msg_id}.{timestamp}.{payload}".encode("utf-8")
    digest = hmac.new(_secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def verify_callback(headers: Mapping[str, str], body: str | bytes, secret: str | bytes, *,
                    tolerance_s: float = TOLERANCE_S, now: float | None = None) -> Any:
    """Check a callback's signature and timestamp; return its JSON payload.

    Raises WebhookVerificationError if a header is missing, the timestamp is outside
    `tolerance_s` of now, or no `v1` signature matches."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id = lowered["webhook-id"]
        timestamp_text = lowered["webhook-timestamp"]
        signatures = lowered["webhook-signature"]
    except KeyError as exc:
        raise WebhookVerificationError(f"missing header {exc.args[0]}") from None
    try:
        timestamp = int(timestamp_text)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is too old or too new")
    expected = sign(msg_id, timestamp, body, secret).split(",", 1)[1]
    for candidate in signatures.split():
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return json.loads(body)
    raise WebhookVerificationError("no matching signature")
