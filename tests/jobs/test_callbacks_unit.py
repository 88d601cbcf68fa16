"""Callback signing (checked by the `standardwebhooks` package) and callback URL checks (SSRF)."""

from __future__ import annotations

import json

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from app.errors import ValidationError
from app.jobs.callbacks import signed_request
from app.jobs.models import Job
from app.jobs.settings import JobsSettings
from app.jobs.ssrf import check_callback_url
from tests.jobs.conftest import SECRET, WRONG_SECRET


def test_signature_verifies_with_the_secret_only():
    job = Job(id="job_1", path="/v1/completions", body={}, status="succeeded", result={"x": 1})
    body, headers = signed_request(job, SECRET)
    assert json.loads(body)["id"] == "job_1" and headers["webhook-id"] == "msg_job_1"
    assert Webhook(SECRET).verify(body, headers)["result"] == {"x": 1}
    with pytest.raises(WebhookVerificationError):
        Webhook(WRONG_SECRET).verify(body, headers)
    tampered = body.replace(b'"x":1', b'"x":2')
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(tampered, headers)


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/x", "http://localhost/x", "http://[::1]/x",
                                 "http://169.254.169.254/latest/meta-data", "http://10.1.2.3/",
                                 "http://[::ffff:127.0.0.1]/", "ftp://example.com/", "http:///nohost"])
async def test_private_and_odd_callback_urls_are_refused(url):
    with pytest.raises(ValidationError) as caught:
        await check_callback_url(url, JobsSettings())
    assert caught.value.status_code == 422 and caught.value.param == "callback_url"


async def test_allowed_networks_and_hosts():
    settings = JobsSettings(callback_allowed_networks=["127.0.0.2/32"])
    assert await check_callback_url("http://127.0.0.2:8080/hook", settings)
    with pytest.raises(ValidationError):
        await check_callback_url("http://127.0.0.1:8080/hook", settings)
    listed = JobsSettings(callback_allowed_hosts=["*.example.com"], callback_allowed_networks=["0.0.0.0/0"])
    with pytest.raises(ValidationError, match="allowlist"):
        await check_callback_url("http://127.0.0.1/", listed)
