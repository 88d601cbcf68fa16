"""The SDK's decisions without a model: retry timing, Retry-After parsing, SSE framing, and the
jobs flow against a scripted local server (a simulator of issue 17's jobs API, whose real tests
are in test_jobs_live.py)."""

from __future__ import annotations

from email.utils import format_datetime
from datetime import datetime, timedelta, timezone

import pytest

from tests.client.flaky_server import Action, FlakyServer
from tests.client.stacks import CLIENT_DIR  # noqa: F401 - puts the SDK on the path

from sglserve.client import Client, JobFailedError, RetryPolicy, ScriptSyntaxError
from sglserve.client._core import event_json, sse_data
from sglserve.client.errors import parse_retry_after

UNUSED = "http://127.0.0.1:9"  # never reached: every answer is scripted


def test_backoff_grows_with_full_jitter_and_stops_after_max_retries():
    policy = RetryPolicy(max_retries=3, backoff_s=0.5, max_backoff_s=1.5)
    for attempt, ceiling in enumerate([0.5, 1.0, 1.5]):
        delays = [policy.delay_s(attempt, None) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays) and len(set(delays)) > 100  # jittered
    assert policy.delay_s(3, None) is None


def test_retry_after_is_a_floor_and_too_long_is_refused():
    policy = RetryPolicy(max_retries=3, backoff_s=0.5, max_retry_after_s=10)
    assert all(2.0 <= policy.delay_s(0, 2.0) <= 2.5 for _ in range(100))
    assert policy.delay_s(0, 11.0) is None


def test_retry_after_takes_seconds_or_an_http_date():
    assert parse_retry_after("3") == 3.0 and parse_retry_after(None) is None
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 <= parse_retry_after(later) <= 30
    assert parse_retry_after("soon") is None


def test_sse_framing_joins_lines_and_stops_at_done():
    lines = ["data: {\"a\":", "data: 1}", "", ": comment", "data: [DONE]", "", "data: {\"late\": 1}", ""]
    assert list(sse_data(lines)) == ['{"a":\n1}']


def test_an_error_event_mid_stream_is_typed():
    with pytest.raises(ScriptSyntaxError) as caught:
        event_json('{"error": {"message": "line 1, column 2: x", "type": "invalid_request_error", '
                   '"param": "program", "code": "syntax_error", "line": 1, "column": 2}}')
    assert caught.value.status_code == 422 and (caught.value.line, caught.value.column) == (1, 2)


CHAT = {"id": "chatcmpl-1", "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "late answer"}, "finish_reason": "stop"}]}


def test_a_request_turned_into_a_job_is_waited_for():
    answers = [
        Action("json", 202, {"location": "/v1/jobs/job_1"}, {"id": "job_1", "object": "job", "status": "queued"}),
        Action("json", 200, body={"id": "job_1", "object": "job", "status": "running"}),
        Action("json", 200, body={"id": "job_1", "object": "job", "status": "succeeded", "result": CHAT}),
    ]
    with FlakyServer(UNUSED, answers) as server:
        answer = Client(server.base_url, model="m").chat("hi")
    assert answer.text == "late answer"
    assert [path for _, _, path in server.seen] == ["/v1/chat/completions", "/v1/jobs/job_1", "/v1/jobs/job_1"]


def test_submit_wait_and_a_failed_job():
    answers = [
        Action("json", 200, body={"id": "job_2", "object": "job", "status": "queued"}),
        Action("json", 200, body={"id": "job_2", "object": "job", "status": "failed", "error": {"message": "boom"}}),
        Action("json", 202, body={"id": "job_3", "object": "job", "status": "queued"}),
        Action("json", 200, body={"id": "job_3", "object": "job", "status": "cancelled"}),
    ]
    with FlakyServer(UNUSED, answers) as server:
        client = Client(server.base_url, model="m")
        job = client.submit("/v1/chat/completions", {"model": "m", "messages": []}, callback_url="https://x.test/h")
        polled = []
        assert job.status == "queued" and client.wait(job.id, timeout=30, on_poll=polled.append).status == "failed"
        assert [j.status for j in polled] == ["failed"]
        with pytest.raises(JobFailedError) as caught:
            client.chat("hi")
    assert caught.value.job.status == "cancelled"
    assert [(m, p) for _, m, p in server.seen][:2] == [("POST", "/v1/jobs"), ("GET", "/v1/jobs/job_2")]
