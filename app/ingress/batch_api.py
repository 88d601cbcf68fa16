"""OpenAI's Files and Batch API: POST /v1/files (purpose "batch"), GET /v1/files/{id} and
/content, POST /v1/batches, GET /v1/batches, GET /v1/batches/{id}, POST /v1/batches/{id}/cancel.

The `openai` client works unchanged. Files and batches belong to the API key that made them; the
lines of a batch run as low-priority jobs (app.jobs.batches, app.jobs.runner).
"""


import time

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict

from app.errors import InvalidRequestError, NotFoundError, PayloadTooLargeError, ValidationError
from app.ingress.job_bodies import body_problem
from app.ingress.jobs_api import job_service, owner_of
from app.jobs.batches import batch_lines, check_jsonl
from app.jobs.models import BATCH_ENDPOINTS, Batch, FileObject, new_id
from app.jobs.service import JobService, identity_of


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None
    callback_url: str | None = None  # sglserve's extension (openai: extra_body); or X-Callback-URL


async def owned_file(service: JobService, request: Request, file_id: str) -> FileObject:
    meta = await service.store.get("file", file_id, FileObject)
    if meta is None or meta.owner != owner_of(request):
        raise NotFoundError(f"no file {file_id!r}", param="file_id", code="file_not_found")
    return meta


async def owned_batch(service: JobService, request: Request, batch_id: str) -> Batch:
    batch = await service.store.get("batch", batch_id, Batch)
    if batch is None or batch.owner != owner_of(request):
        raise NotFoundError(f"no batch {batch_id!r}", param="batch_id", code="batch_not_found")
    return batch


def _page(items, limit: int) -> dict:
    page = items[:limit]
    return {"object": "list", "data": [i.public() for i in page], "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None, "has_more": len(items) > limit}


def batch_router(gateway_of) -> APIRouter:
    router = APIRouter()

    def service_for(request: Request) -> JobService:
        service = job_service(gateway_of(request))
        if service is None:
            raise NotFoundError("jobs are disabled on this server", code="jobs_disabled")
        return service

    @router.post("/v1/files")
    async def upload(request: Request) -> JSONResponse:
        service = service_for(request)
        limit = service.settings.max_file_bytes
        form = await request.form(max_part_size=limit + 1)
        purpose, upload_file = form.get("purpose"), form.get("file")
        if purpose != "batch":
            raise InvalidRequestError(f"purpose must be 'batch', got {purpose!r}", param="purpose")
        if upload_file is None or isinstance(upload_file, str):
            raise InvalidRequestError("a file is required (multipart field 'file')", param="file")
        data = await upload_file.read(limit + 1)
        if len(data) > limit:
            raise PayloadTooLargeError(f"the file is larger than {limit} bytes (jobs.max_file_bytes)",
                                       param="file", code="file_too_large")
        check_jsonl(data, service.settings.max_batch_lines)
        meta = FileObject(id=new_id("file"), owner=owner_of(request), filename=upload_file.filename or "batch.jsonl",
                          purpose="batch", bytes=len(data))
        await service.store.put_blob(meta.id, data)
        await service.store.insert("file", [meta])
        return JSONResponse(meta.public())

    @router.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str, request: Request) -> JSONResponse:
        return JSONResponse((await owned_file(service_for(request), request, file_id)).public())

    @router.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str, request: Request) -> Response:
        service = service_for(request)
        meta = await owned_file(service, request, file_id)
        data = await service.store.get_blob(meta.id)
        if data is None:
            raise NotFoundError(f"the content of file {file_id!r} is gone", code="file_not_found")
        return Response(data, media_type="application/jsonl")

    @router.post("/v1/batches")
    async def create_batch(body: BatchCreate, request: Request) -> JSONResponse:
        service = service_for(request)
        if body.endpoint not in BATCH_ENDPOINTS:
            raise ValidationError(f"endpoint must be one of {list(BATCH_ENDPOINTS)}, got {body.endpoint!r}",
                                  param="endpoint", code="invalid_endpoint")
        if body.completion_window != "24h":
            raise ValidationError("completion_window must be '24h'", param="completion_window")
        callback = await service.callback({"callback_url": body.callback_url}, request.headers.get("x-callback-url"))
        meta = await owned_file(service, request, body.input_file_id)
        if meta.purpose != "batch":
            raise InvalidRequestError(f"file {meta.id} has purpose {meta.purpose!r}, not 'batch'",
                                      param="input_file_id")
        data = await service.store.get_blob(meta.id) or b""
        now = time.time()
        batch = Batch(id=new_id("batch"), owner=owner_of(request), endpoint=body.endpoint,
                      input_file_id=meta.id, metadata=body.metadata, in_progress_at=now, check_at=now,
                      callback=callback)
        gateway = gateway_of(request)
        lines = batch_lines(data, batch, identity_of(request.scope.get("state", {})),
                            service.settings.batch_priority,
                            check=lambda line_body: body_problem(gateway, batch.endpoint, line_body))
        batch.total = len(lines)
        batch.request_counts = {"total": batch.total, "completed": 0, "failed": 0}
        await service.store.insert("line", lines)
        await service.store.insert("batch", [batch])
        return JSONResponse(batch.public())

    @router.get("/v1/batches/{batch_id}")
    async def retrieve_batch(batch_id: str, request: Request) -> JSONResponse:
        return JSONResponse((await owned_batch(service_for(request), request, batch_id)).public())

    @router.get("/v1/batches")
    async def list_batches(request: Request, limit: int = Query(20, ge=1, le=100),
                           after: str | None = None) -> JSONResponse:
        service = service_for(request)
        batches = await service.store.owned("batch", owner_of(request), after, limit + 1, Batch)
        return JSONResponse(_page(batches, limit))

    @router.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, request: Request) -> JSONResponse:
        service = service_for(request)
        for _ in range(8):
            batch = await owned_batch(service, request, batch_id)
            if batch.status not in ("validating", "in_progress"):
                return JSONResponse(batch.public())
            batch.status, batch.cancelling_at, batch.check_at = "cancelling", time.time(), time.time()
            if await service.store.replace("batch", batch):
                return JSONResponse(batch.public())
        raise InvalidRequestError("the batch is changing too fast to cancel; try again", code="conflict")

    return router
