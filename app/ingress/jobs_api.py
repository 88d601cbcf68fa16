"""The jobs API: POST /v1/jobs, GET /v1/jobs/{id}, GET /v1/jobs, POST /v1/jobs/{id}/cancel.

A job belongs to the API key that submitted it (or "anonymous" without keys); another key gets
404 for it, as for a job that does not exist. Results stay for `jobs.retention_s`.
"""


from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from app.errors import APIError, NotFoundError, ValidationError
from app.ingress.gateway import Gateway
from app.ingress.job_bodies import check_job_body
from app.jobs.models import JOB_PATHS, Job
from app.jobs.service import JobService, identity_of


class _Holder:
    """The process's JobService (made on first use, from the Gateway's settings)."""

    service: JobService | None = None


def job_service(gateway: Gateway | None) -> JobService | None:
    if gateway is None or not gateway.settings.jobs.enabled:
        return None
    if _Holder.service is None or _Holder.service.settings is not gateway.settings.jobs:
        async def abort(rid: str) -> Any:
            return await gateway.call_scheduler("abort", rid, False)

        _Holder.service = JobService(gateway.settings.jobs, abort)
    return _Holder.service


class JobSubmission(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="the endpoint the body is for, e.g. /v1/chat/completions")
    body: dict[str, Any]
    callback_url: str | None = None


def owner_of(request: Request) -> str:
    return getattr(request.state, "key_id", None) or "anonymous"


def location(request: Request, job_id: str) -> str:
    return f"{request.scope.get('root_path', '')}/v1/jobs/{job_id}"


async def owned_job(service: JobService, request: Request, job_id: str) -> Job:
    job = await service.store.get("job", job_id, Job)
    if job is None or job.owner != owner_of(request):  # someone else's job is as good as absent
        raise NotFoundError(f"no job {job_id!r}", param="job_id", code="job_not_found")
    return job


def jobs_router(gateway_of) -> APIRouter:
    router = APIRouter()

    def service_for(request: Request) -> JobService:
        service = job_service(gateway_of(request))
        if service is None:
            raise APIError("jobs are disabled on this server", status_code=404, code="jobs_disabled")
        return service

    @router.post("/v1/jobs")
    async def submit(submission: JobSubmission, request: Request) -> JSONResponse:
        service = service_for(request)
        if submission.path not in JOB_PATHS:
            raise ValidationError(f"path must be one of {list(JOB_PATHS)}, got {submission.path!r}", param="path")
        body = dict(submission.body)
        if body.get("stream"):
            raise ValidationError("a job cannot stream; leave 'stream' unset", param="body.stream")
        if submission.callback_url is not None:
            body["callback_url"] = submission.callback_url
        callback = await service.callback(body, request.headers.get("x-callback-url"))
        check_job_body(gateway_of(request), submission.path, body)  # 4xx now, as the route would answer
        job = service.new_job(submission.path, body, identity_of(request.scope.get("state", {})), callback)
        await service.store.insert("job", [job])
        return JSONResponse(job.public(), status_code=202, headers={"Location": location(request, job.id)})

    @router.get("/v1/jobs/{job_id}")
    async def retrieve(job_id: str, request: Request) -> JSONResponse:
        return JSONResponse((await owned_job(service_for(request), request, job_id)).public())

    @router.get("/v1/jobs")
    async def list_jobs(request: Request, limit: int = Query(20, ge=1, le=100),
                        after: str | None = None) -> JSONResponse:
        service = service_for(request)
        jobs = await service.store.owned("job", owner_of(request), after, limit + 1, Job)
        page = jobs[:limit]
        return JSONResponse({
            "object": "list",
            "data": [j.public() for j in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(jobs) > limit,
        })

    @router.post("/v1/jobs/{job_id}/cancel")
    async def cancel(job_id: str, request: Request) -> JSONResponse:
        service = service_for(request)
        job = await owned_job(service, request, job_id)
        cancelled = await service.ledger.cancel("job", job)
        if cancelled is None:  # it had ended already: show how
            cancelled = await owned_job(service, request, job_id)
        return JSONResponse(cancelled.public())

    return router
