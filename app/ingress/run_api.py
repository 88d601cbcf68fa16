"""POST /run: a whole SGLang-style program executed inside sglserve (see docs/run-language.md).

The ingress parses and checks the program first (413/422 with line and column before anything
queues), then hands it to the scheduler, which admits it like one request and runs it whole on one
replica, next to that replica's prefix cache. `stream: true` answers with SSE: one event per text
piece / finished variable, then the final result, then `data: [DONE]`.
"""

import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field, model_validator

from app.ingress import guard
from app.ingress.gateway import Gateway
from app.ingress.sse import opened, sse_event, sse_stream
from app.lang import parse
from app.lang.request import RunRequest
from app.protocol import GenerateRequest, SamplingParams

ROUTING_PREFIX_CHARS = 4096  # the program's leading text used as the routing key


class RunBody(RunRequest):
    """The body of POST /run: the program as `program` or, as the reference client posts it
    (`json={"script": script, **kwargs}`), as `script`. Exactly one of the two (else 422)."""

    program: str | list[Any] | None = Field(
        None, description="The script text, or the JSON list of ops. Alias: `script`."
    )
    script: str | list[Any] | None = Field(None, description="Same as `program`.")

    @model_validator(mode="after")
    def _one_program(self) -> "RunBody":
        if self.program is not None and self.script is not None:
            raise ValueError("give the program as 'program' or as 'script', not both")
        if self.program is None and self.script is None:
            raise ValueError("the body needs 'program' (or its alias 'script')")
        return self

    def to_request(self) -> RunRequest:
        program = self.program if self.program is not None else self.script
        return RunRequest(program=program, arguments=self.arguments, sampling=self.sampling,
                          stream=self.stream)


def _leading_text(program: str | list[Any]) -> str:
    """The literal text a program starts with: what its first engine call will share."""
    if isinstance(program, str):
        end = program.find("{")
        return program[: end if end >= 0 else len(program)][:ROUTING_PREFIX_CHARS]
    first = program[0] if program else None
    if isinstance(first, str):  # a bare string is a text op
        return first[:ROUTING_PREFIX_CHARS]
    if isinstance(first, dict) and isinstance(first.get("text"), str):
        return first["text"][:ROUTING_PREFIX_CHARS]
    return ""


def run_router(gateway_of) -> APIRouter:
    router = APIRouter()

    @router.post("/run")
    async def run(run_body: RunBody, request: Request):
        gateway: Gateway = gateway_of(request)
        body = run_body.to_request()
        # 413/422 now, before anything queues; the request's sampling defaults count towards the
        # token limit exactly as on the replica.
        parse(body.program, settings=gateway.settings.run, arguments=body.arguments,
              defaults=body.sampling)
        lead = _leading_text(body.program)
        route = GenerateRequest(
            rid=uuid.uuid4().hex,
            input_ids=await gateway.tokenize_async(lead) if lead else [0],
            sampling=SamplingParams(max_new_tokens=min(gateway.settings.run.max_total_tokens, 1 << 16)),
            tenant=getattr(request.state, "tenant", None) or "anonymous",
            priority=getattr(request.state, "priority", 0),
            session_id=uuid.uuid4().hex,
            model_version=gateway.choose_version(request),  # canary: the whole program on one version
        )
        payload = body.model_dump(mode="json")
        request.state.rid = route.rid  # an abort (a cancelled job) takes it out of the admission queue
        if not body.stream:
            result = await gateway.call_scheduler("run_program", route, payload)
            return JSONResponse(await guard.filter_run_result(request, result))  # output filters

        # The first event (or the error before it) is awaited here, so a full queue or a program
        # refused below the Ingress still gets its status (app/ingress/sse.py).
        source = await opened(gateway.stream_scheduler("run_program_stream", route, payload))

        async def events() -> AsyncIterator[str]:
            async for event in guard.filter_run_stream(request, source):  # output filters
                yield sse_event(event)

        return StreamingResponse(sse_stream(events()), media_type="text/event-stream")

    return router
