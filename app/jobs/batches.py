"""OpenAI's Batch API on the job system: input lines become "line" jobs, ends become two files.

Input: JSONL, one `{"custom_id", "method": "POST", "url", "body"}` per line. A file that is not
JSONL is refused at upload (400 naming the line); a line that is JSON but not a valid request
(wrong url, no custom_id, a duplicate custom_id, `stream: true`, a body its route would refuse)
does not fail the batch: it goes to the error file. Output, as OpenAI writes it: one line per request,
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`; 2xx responses go
to the output file, the rest (and the lines that never ran) to the error file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from app.errors import InvalidRequestError, PayloadTooLargeError
from app.jobs.models import Batch, FileObject, Identity, Job, new_id


def check_jsonl(data: bytes, max_lines: int) -> int:
    """Count the requests of a batch input file; 400 naming the first line that is not a JSON object."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"the file is not UTF-8 text: {exc}", param="file", code="invalid_file") from None
    count = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise InvalidRequestError(f"line {number} of the file is not valid JSON: {exc}", param="file",
                                      code="invalid_jsonl") from None
        if not isinstance(item, dict):
            raise InvalidRequestError(f"line {number} of the file is not a JSON object", param="file",
                                      code="invalid_jsonl")
        count += 1
        if count > max_lines:
            raise PayloadTooLargeError(f"the file has more than {max_lines} requests (jobs.max_batch_lines)",
                                       param="file", code="too_many_lines")
    if count == 0:
        raise InvalidRequestError("the file holds no requests", param="file", code="empty_file")
    return count


def _line_problem(item: dict[str, Any], endpoint: str, seen: set[str]) -> str | None:
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "custom_id must be a non-empty string"
    if custom_id in seen:
        return f"custom_id {custom_id!r} is used by an earlier line"
    if item.get("method", "POST") != "POST":
        return "method must be POST"
    if item.get("url") != endpoint:
        return f"url must be the batch's endpoint {endpoint!r}, got {item.get('url')!r}"
    if not isinstance(item.get("body"), dict):
        return "body must be a JSON object"
    if item["body"].get("stream"):
        return "batch requests cannot stream"
    return None


def batch_lines(data: bytes, batch: Batch, identity: Identity, priority: int,
                check: Callable[[dict[str, Any]], str | None] | None = None) -> list[Job]:
    """One job per input line: queued if it is a valid request, failed at once if not. `check`
    says what the endpoint's route would refuse in a line's body (app.ingress.job_bodies)."""
    jobs, seen = [], set()
    now = time.time()
    for number, raw in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        item = json.loads(raw)
        problem = _line_problem(item, batch.endpoint, seen)
        if problem is None and check is not None:
            problem = check(item["body"])
        custom_id = item.get("custom_id") if isinstance(item.get("custom_id"), str) else None
        job = Job(id=new_id("batch_req"), owner=batch.owner, path=batch.endpoint,
                  body=item.get("body") if problem is None else {}, identity=identity, priority=priority,
                  batch_id=batch.id, custom_id=custom_id, line=number)
        if problem is None:
            seen.add(custom_id)  # type: ignore[arg-type]
        else:
            job.status, job.finished_at = "failed", now
            job.error = {"code": "invalid_request", "message": f"line {number}: {problem}"}
        jobs.append(job)
    return jobs


def output_line(job: Job) -> dict[str, Any]:
    if job.status_code is None:  # never ran: invalid, or cancelled before it ran
        error = job.error if job.status == "failed" else {"code": "batch_cancelled",
                                                          "message": "the batch was cancelled"}
        return {"id": job.id, "custom_id": job.custom_id, "response": None, "error": error}
    body = job.result if job.status == "succeeded" else job.error
    return {"id": job.id, "custom_id": job.custom_id,
            "response": {"status_code": job.status_code, "request_id": job.id.removeprefix("batch_req_"),
                         "body": body},
            "error": None}


def result_files(batch: Batch, lines: list[Job]) -> tuple[tuple[FileObject, bytes] | None,
                                                          tuple[FileObject, bytes] | None]:
    """(output file, error file), each None when it would be empty."""
    ok, bad = [], []
    for job in sorted(lines, key=lambda j: j.line or 0):
        (ok if job.status == "succeeded" else bad).append(json.dumps(output_line(job), separators=(",", ":")))

    def file(rows: list[str], suffix: str) -> tuple[FileObject, bytes] | None:
        if not rows:
            return None
        data = ("\n".join(rows) + "\n").encode()
        # The id follows from the batch's: a finalization taken over after its runner died
        # rewrites the same file, never makes a second one.
        meta = FileObject(id=f"file_{batch.id.removeprefix('batch_')}_{suffix}", owner=batch.owner,
                          filename=f"{batch.id}_{suffix}.jsonl",
                          purpose="batch_output", bytes=len(data))
        return meta, data

    return file(ok, "output"), file(bad, "error")
