"""SGLang's native HTTP API, field-compatible with SGLang's own server, so the unmodified `sglang`
frontend (`sgl.RuntimeEndpoint`) and other SGLang clients run against sglserve.

POST /generate (text or input_ids, single or batched, streaming with CUMULATIVE text and, as in
SGLang 0.5.23, per-chunk output logprobs plus `output_token_logprobs_length`), GET
/get_model_info, GET /server_info (+ /get_server_info), POST /flush_cache, GET /health_generate,
POST /abort_request.
"""

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError as PydanticValidationError

from app.errors import InvalidRequestError, ValidationError
from app.ingress import guard
from app.ingress.gateway import Gateway
from app.ingress.sse import opened, sse_event, sse_stream
from app.protocol import GenerateOutput, GenerateRequest, SamplingParams
from app.streaming import stable_text

DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's default when sampling_params gives none


class NativeGenerateBody(BaseModel):
    """The body of SGLang's POST /generate. Per-item fields may be single values or lists."""

    model_config = ConfigDict(extra="ignore")

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool = False
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] = -1
    top_logprobs_num: int | list[int] = 0
    return_text_in_logprobs: bool = False
    rid: str | list[str] | None = None
    priority: int | None = None


class AbortBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    rid: str = ""
    abort_all: bool = False


def _per_item(value, index: int, count: int, field: str):
    if isinstance(value, list):
        if len(value) != count:
            raise InvalidRequestError(
                f"{field} has {len(value)} entries but the batch has {count} prompts", param=field
            )
        return value[index]
    return value


def _sampling_params(raw: dict[str, Any] | None, field: str) -> SamplingParams:
    raw = dict(raw or {})
    raw.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if raw.get("max_new_tokens") is None:
        raw["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
    raw = {k: v for k, v in raw.items() if v is not None or k in ("seed",)}
    try:
        return SamplingParams.model_validate(raw)
    except PydanticValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        param = f"{field}.{where}" if where else field
        raise ValidationError(f"{param}: {err.get('msg')}", param=param) from None


def _meta_info(
    out: GenerateOutput,
    latency_s: float,
    with_logprobs: bool,
    chunk: GenerateOutput | None = None,
) -> dict[str, Any]:
    """SGLang's meta_info for `out` (everything so far). In a stream, `chunk` is the increment
    being sent: like SGLang's tokenizer manager, the output-side logprob lists then hold only
    that chunk's new entries, and `output_token_logprobs_length` counts all of them so far."""
    meta: dict[str, Any] = {
        "id": out.rid,
        "finish_reason": out.finish_reason.model_dump(exclude_none=True) if out.finish_reason else None,
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "cached_tokens": out.cached_tokens,
        "e2e_latency": latency_s,
    }
    if with_logprobs:
        output_side = chunk if chunk is not None else out
        meta["input_token_logprobs"] = [list(e) for e in out.input_token_logprobs or []]
        meta["output_token_logprobs"] = [list(e) for e in output_side.output_token_logprobs or []]
        meta["output_token_logprobs_length"] = len(out.output_token_logprobs or [])
        if out.input_top_logprobs is not None or out.output_top_logprobs is not None:
            meta["input_top_logprobs"] = [
                [list(e) for e in top] if top else None for top in out.input_top_logprobs or []
            ]
            meta["output_top_logprobs"] = [
                [list(e) for e in top] if top else None
                for top in output_side.output_top_logprobs or []
            ]
    return meta


def native_router(gateway_of) -> APIRouter:
    router = APIRouter()

    @router.post("/generate")
    async def generate(body: NativeGenerateBody, request: Request):
        gateway: Gateway = gateway_of(request)
        requests, batched = await _build_requests(gateway, body, request)
        await guard.remember(request, requests)  # the key may abort these rids
        started = time.monotonic()
        with_logprobs = [r.return_logprob for r in requests]

        def render(
            out: GenerateOutput, index: int, text: str, ids: list[int],
            chunk: GenerateOutput | None = None,
        ) -> dict[str, Any]:
            latency = time.monotonic() - started
            item = {
                "text": text,
                "output_ids": ids,
                "meta_info": _meta_info(out, latency, with_logprobs[index], chunk),
            }
            if batched:
                item["index"] = index
            return item

        if not body.stream:
            outputs = await guard.filter_outputs(request, await gateway.complete_many(requests))
            items = [render(o, i, o.text, o.token_ids) for i, o in enumerate(outputs)]
            return JSONResponse(items if batched else items[0])

        # The first increment (or the error before it) is awaited here, so such an error still gets
        # its status (app/ingress/sse.py).
        source = await opened(guard.filter_stream(request, gateway.stream_many(requests), len(requests)))

        async def events() -> AsyncIterator[str]:
            totals: dict[int, GenerateOutput] = {}
            sent: dict[int, str] = {}
            held: dict[int, GenerateOutput] = {}
            async for index, out in source:
                total = totals[index] = out if index not in totals else totals[index].merge(out)
                # Cumulative text (SGLang's default stream), never ending in a broken character.
                text = stable_text(total.text, total.finished)
                chunk = held.pop(index).merge(out) if index in held else out
                if text == sent.get(index, "") and not total.finished:
                    # No new text (a character still incomplete): SGLang's frontend skips such a
                    # chunk, and its logprobs with it, so they ride with the next one instead.
                    held[index] = chunk
                    continue
                sent[index] = text
                yield sse_event(render(total, index, text, total.token_ids, chunk=chunk))

        return StreamingResponse(sse_stream(events()), media_type="text/event-stream")

    @router.get("/get_model_info")
    async def get_model_info(request: Request) -> JSONResponse:
        gateway: Gateway = gateway_of(request)
        return JSONResponse(
            {
                "model_path": gateway.limits.model_path,
                "tokenizer_path": gateway.settings.model.tokenizer_path or gateway.limits.model_path,
                "served_model_name": gateway.limits.name,
                "is_generation": True,
                "context_length": gateway.limits.context_length,
            }
        )

    @router.get("/server_info")
    @router.get("/get_server_info")
    async def server_info(request: Request) -> JSONResponse:
        gateway: Gateway = gateway_of(request)
        info = await gateway.scheduler.server_info.remote()
        return JSONResponse(guard.server_info_view(request,  # internal state: admin keys only
            {
                **gateway.settings.model_dump(mode="json"),
                "model_path": gateway.limits.model_path,
                "context_length": gateway.limits.context_length,
                **info,
            }
        ))

    @router.post("/flush_cache")
    async def flush_cache(request: Request) -> Response:
        gateway: Gateway = gateway_of(request)
        flushed = await gateway.scheduler.flush_cache.remote()
        return PlainTextResponse(
            f"Cache flushed on {flushed} replica(s).\n", status_code=200 if flushed else 503
        )

    @router.api_route("/health_generate", methods=["GET", "POST"])
    async def health_generate(request: Request) -> Response:
        gateway: Gateway = gateway_of(request)
        await gateway.scheduler.check_ready.remote(gateway.settings.ingress.ready_timeout_s)
        return Response(status_code=200)

    @router.post("/abort_request")
    async def abort_request(body: AbortBody, request: Request) -> JSONResponse:
        gateway: Gateway = gateway_of(request)
        aborted = await gateway.scheduler.abort.remote(body.rid, body.abort_all)
        return JSONResponse({"aborted": aborted})

    return router


async def _build_requests(
    gateway: Gateway, body: NativeGenerateBody, request: Request
) -> tuple[list[GenerateRequest], bool]:
    if (body.text is None) == (body.input_ids is None):
        raise InvalidRequestError("exactly one of 'text' and 'input_ids' must be given", param="text")
    if body.text is not None:
        batched = isinstance(body.text, list)
        texts = body.text if batched else [body.text]
        prompts = await gateway.tokenize_many(texts)
        field = "text"
    else:
        batched = bool(body.input_ids) and isinstance(body.input_ids[0], list)
        prompts = [list(p) for p in body.input_ids] if batched else [list(body.input_ids)]
        field = "input_ids"
    if batched and not prompts:
        raise InvalidRequestError(f"'{field}' is an empty batch", param=field)
    count = len(prompts)
    if isinstance(body.sampling_params, list) and not batched:
        raise InvalidRequestError("sampling_params is a list but the prompt is not", param="sampling_params")
    tenant = getattr(request.state, "tenant", None) or "anonymous"
    version = gateway.choose_version(request)  # canary: by weight, or X-Model-Version
    base_rid = uuid.uuid4().hex
    requests: list[GenerateRequest] = []
    for i, ids in enumerate(prompts):
        where = f"{field}[{i}]" if batched else field
        sp_field = f"sampling_params[{i}]" if isinstance(body.sampling_params, list) else "sampling_params"
        sampling = _sampling_params(_per_item(body.sampling_params, i, count, "sampling_params"), sp_field)
        sampling.max_new_tokens = gateway.check_prompt(ids, sampling.max_new_tokens, param=where)
        if sampling.min_new_tokens > sampling.max_new_tokens:
            sampling.min_new_tokens = sampling.max_new_tokens
        given_rid = _per_item(body.rid, i, count, "rid") if body.rid is not None else None
        for j in range(sampling.n):
            rid = given_rid or f"{base_rid}-{i}"
            if sampling.n > 1:
                rid = f"{rid}-{j}"
            seeded = sampling if sampling.seed is None else sampling.model_copy(update={"seed": sampling.seed + j})
            requests.append(
                GenerateRequest(
                    rid=rid,
                    input_ids=ids,
                    sampling=seeded.model_copy(update={"n": 1}),
                    stream=body.stream,
                    return_logprob=bool(_per_item(body.return_logprob, i, count, "return_logprob")),
                    logprob_start_len=_per_item(body.logprob_start_len, i, count, "logprob_start_len"),
                    top_logprobs_num=_per_item(body.top_logprobs_num, i, count, "top_logprobs_num"),
                    return_text_in_logprobs=body.return_text_in_logprobs,
                    priority=body.priority or getattr(request.state, "priority", 0),
                    tenant=tenant,
                    model_version=version,
                )
            )
    return requests, batched or len(requests) > 1
