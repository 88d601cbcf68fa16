"""verify_callback against the reference implementation (the `standardwebhooks` package)."""

from __future__ import annotations

import base64
import json
import time
from datetime import datetime, timezone

import pytest
from standardwebhooks.webhooks import Webhook

from tests.client.stacks import CLIENT_DIR  # noqa: F401 - puts the SDK on the path

from sglserve.client import WebhookVerificationError, verify_callback
from sglserve.client.webhooks import sign

SECRET = "whsec_" + base64.b64encode(b"a shared secret of 32 bytes!!!!!").decode()
BODY = json.dumps({"id": "job_1", "object": "job", "status": "succeeded"})


def reference_headers(msg_id: str, body: str, secret: str = SECRET, at: float | None = None) -> dict[str, str]:
    when = datetime.fromtimestamp(at if at is not None else time.time(), tz=timezone.utc)
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(when.timestamp())),
            "webhook-signature": Webhook(secret).sign(msg_id, when, body)}


def test_accepts_what_the_reference_signs():
    assert verify_callback(reference_headers("msg_1", BODY), BODY, SECRET)["status"] == "succeeded"
    headers = {k.title(): v for k, v in reference_headers("msg_1", BODY).items()}  # header case does not matter
    assert verify_callback(headers, BODY.encode(), SECRET.removeprefix("whsec_"))["id"] == "job_1"


def test_the_reference_accepts_what_we_sign():
    now = int(time.time())
    headers = {"webhook-id": "msg_2", "webhook-timestamp": str(now), "webhook-signature": sign("msg_2", now, BODY, SECRET)}
    assert Webhook(SECRET).verify(BODY, headers)["object"] == "job"


def test_one_matching_signature_among_several_is_enough():
    headers = reference_headers("msg_3", BODY)
    headers["webhook-signature"] = "v1,bm90IGl0 " + headers["webhook-signature"]
    assert verify_callback(headers, BODY, SECRET)["id"] == "job_1"


@pytest.mark.parametrize("change", ["wrong secret", "tampered body", "old", "future", "no signature", "v2 only"])
def test_rejects(change):
    headers, body, secret = reference_headers("msg_4", BODY), BODY, SECRET
    if change == "wrong secret":
        secret = "whsec_" + base64.b64encode(b"another secret").decode()
    elif change == "tampered body":
        body = BODY.replace("succeeded", "failed")
    elif change in ("old", "future"):
        headers = reference_headers("msg_4", BODY, at=time.time() + (-600 if change == "old" else 600))
    elif change == "no signature":
        del headers["webhook-signature"]
    else:
        headers["webhook-signature"] = headers["webhook-signature"].replace("v1,", "v2,")
    with pytest.raises(WebhookVerificationError):
        verify_callback(headers, body, secret)
