"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/models.

Each handler turns the OpenAI body into one `GenerateRequest` per sequence (prompts x n), sends them
through the gateway, and renders either one JSON response or an SSE stream of OpenAI chunks ending
with `data: [DONE]`.
"""

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.errors import InvalidRequestError, NotFoundError
from app.ingress import guard
from app.ingress.gateway import Gateway
from app.ingress.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponseFormat,
    Tool,
)
from app.ingress.sse import opened, sse_event, sse_stream
from app.protocol import JSON_OBJECT_GRAMMAR, GenerateOutput, GenerateRequest, LogprobEntry, SamplingParams
from app.streaming import per_token



def openai_router(gateway_of) -> APIRouter:
    """`gateway_of(request)` returns the Gateway (and checks auth) for a Starlette request."""
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        gateway: Gateway = gateway_of(request)
        entry = {
            "object": "model",
            "created": int(_START_TIME),
            "owned_by": "sglserve",
            "root": gateway.limits.model_path,
            "max_model_len": gateway.limits.context_length,
        }
        data = [{"id": gateway.limits.name, **entry}]
        if gateway.split is not None:  # canary: each version can be asked for by name@version
            data += [{"id": f"{gateway.limits.name}@{name}", **entry, "parent": gateway.limits.name,
                      "root": version.model_path or gateway.limits.model_path, "weight": version.weight}
                     for name, version in gateway.split.versions.items()]
        return JSONResponse({"object": "list", "data": data})

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        gateway: Gateway = gateway_of(request)
        return await _chat(gateway, body, request)

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        gateway: Gateway = gateway_of(request)
        return await _completions(gateway, body, request)

    return router


_START_TIME = time.time()


# -- shared pieces ---------------------------------------------------------------------------------


def _check_model(gateway: Gateway, model: str) -> None:
    model = gateway.base_model(model)  # `name@version` names the served model too (canary)
    if model not in (gateway.limits.name, gateway.limits.model_path):
        raise NotFoundError(
            f"the model '{model}' does not exist; this server serves '{gateway.limits.name}'",
            param="model",
            code="model_not_found",
        )


def _constraint_from_format(fmt: ResponseFormat | None) -> dict[str, str]:
    if fmt is None or fmt.type == "text":
        return {}
    if fmt.type == "json_object":
        return {"ebnf": JSON_OBJECT_GRAMMAR}
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise InvalidRequestError(
            "response_format.json_schema.schema is required when type is 'json_schema'",
            param="response_format.json_schema",
        )
    return {"json_schema": json.dumps(fmt.json_schema.schema_)}


def _sampling(body, max_new_tokens: int, seed_offset: int, constraint: dict[str, str]) -> SamplingParams:
    grammar = dict(constraint)
    if body.regex is not None:
        grammar["regex"] = body.regex
    if body.ebnf is not None:
        grammar["ebnf"] = body.ebnf
    if len(grammar) > 1:
        raise InvalidRequestError(
            f"only one output constraint may be given, got {sorted(grammar)}", param="response_format"
        )
    try:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min(body.min_tokens, max_new_tokens),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            frequency_penalty=body.frequency_penalty,
            presence_penalty=body.presence_penalty,
            repetition_penalty=body.repetition_penalty,
            stop=body.stop,
            stop_token_ids=body.stop_token_ids,
            ignore_eos=body.ignore_eos,
            skip_special_tokens=body.skip_special_tokens,
            seed=None if body.seed is None else body.seed + seed_offset,
            **grammar,
        )
    except ValueError as exc:  # pydantic's: a combination of fields is inconsistent
        raise InvalidRequestError(str(exc)) from None


def _usage(outputs: list[GenerateOutput], prompt_tokens: int) -> dict[str, Any]:
    completion = sum(o.completion_tokens for o in outputs)
    cached = max((o.cached_tokens for o in outputs), default=0)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _priority(body, request: Request) -> int:
    ceiling = getattr(request.state, "max_priority", None)
    wanted = body.priority if body.priority is not None else getattr(request.state, "priority", 0)
    return min(wanted, ceiling) if ceiling is not None else wanted


def _tenant(request: Request, body) -> str:
    return getattr(request.state, "tenant", None) or body.user or "anonymous"


def _chunker(gateway: Gateway) -> Callable[[GenerateOutput], list[GenerateOutput]]:
    """How a streamed increment becomes chunks: one per token (SGLang's default), or as it came
    from the replica, several tokens at once (`ingress.stream_chunk_per_token: false`). Either way
    the chunks of one increment go out in one write: a client still parses one SSE event per token,
    while the HTTP stack (and Ray Serve's proxy hop) carries one message per increment."""
    return per_token if gateway.settings.ingress.stream_chunk_per_token else (lambda out: [out])


def _token_bytes(text: str | None) -> list[int] | None:
    return None if text is None else list(text.encode("utf-8"))


def _chat_logprobs(out: GenerateOutput) -> dict[str, Any] | None:
    if out.output_token_logprobs is None:
        return None
    tops = out.output_top_logprobs or [[] for _ in out.output_token_logprobs]
    content = []
    for (logprob, _tid, text), top in zip(out.output_token_logprobs, tops):
        content.append(
            {
                "token": text or "",
                "logprob": logprob,
                "bytes": _token_bytes(text),
                "top_logprobs": [
                    {"token": t or "", "logprob": lp, "bytes": _token_bytes(t)} for lp, _i, t in (top or [])
                ],
            }
        )
    return {"content": content}


# -- chat completions ------------------------------------------------------------------------------


def _tool_constraint(body: ChatCompletionRequest) -> tuple[dict[str, str], str | None]:
    """(constraint, forced tool name) for tool_choice 'required' or a named tool."""
    if not body.tools or body.tool_choice in (None, "none", "auto"):
        return {}, None
    tools: list[Tool] = body.tools
    if body.tool_choice == "required":
        schema = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "name": {"const": t.function.name},
                        "arguments": t.function.parameters,
                    },
                    "required": ["name", "arguments"],
                }
                for t in tools
            ]
        }
        return {"json_schema": json.dumps(schema)}, None
    name = body.tool_choice.function.get("name")
    match = next((t for t in tools if t.function.name == name), None)
    if match is None:
        raise InvalidRequestError(
            f"tool_choice names '{name}', which is not among the tools given", param="tool_choice"
        )
    return {"json_schema": json.dumps(match.function.parameters)}, name


def _tool_calls(text: str, forced_name: str | None, required: bool) -> list[dict[str, Any]] | None:
    """Tool calls in the model's output: forced/required ones are constrained JSON; otherwise a
    `<tool_call>{"name":..., "arguments":...}</tool_call>` block, as the chat template asks for."""
    calls: list[tuple[str, Any]] = []
    if forced_name is not None:
        calls.append((forced_name, text))
    elif required:
        try:
            obj = json.loads(text)
            calls.append((obj["name"], json.dumps(obj["arguments"])))
        except (ValueError, KeyError, TypeError):
            return None
    else:
        start = 0
        while (i := text.find("<tool_call>", start)) >= 0:
            j = text.find("</tool_call>", i)
            if j < 0:
                break
            try:
                obj = json.loads(text[i + len("<tool_call>") : j])
                calls.append((obj["name"], json.dumps(obj.get("arguments", {}))))
            except (ValueError, KeyError, TypeError):
                pass
            start = j + 1
    if not calls:
        return None
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": name, "arguments": args},
        }
        for name, args in calls
    ]


def _messages_for_template(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    messages = []
    for m in body.messages:
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        messages.append(msg)
    return messages


async def _chat(gateway: Gateway, body: ChatCompletionRequest, request: Request):
    _check_model(gateway, body.model)
    version = gateway.choose_version(request, body.model)
    if body.tools and body.response_format and body.response_format.type != "text":
        raise InvalidRequestError("tools and response_format cannot be combined", param="response_format")
    tool_constraint, forced_tool = _tool_constraint(body)
    constraint = tool_constraint or _constraint_from_format(body.response_format)
    tools = [t.model_dump() for t in body.tools] if body.tools and body.tool_choice != "none" else None
    input_ids = await gateway.chat_prompt_ids(_messages_for_template(body), tools)
    wanted = body.max_completion_tokens or body.max_tokens or gateway.settings.ingress.default_max_tokens
    max_new = gateway.check_prompt(input_ids, wanted, param="messages")
    rid = uuid.uuid4().hex
    requests = [
        GenerateRequest(
            rid=f"{rid}-{i}",
            input_ids=input_ids,
            sampling=_sampling(body, max_new, i, constraint),
            stream=body.stream,
            return_logprob=body.logprobs,
            top_logprobs_num=(body.top_logprobs or 0) if body.logprobs else 0,
            return_text_in_logprobs=True,
            priority=_priority(body, request),
            tenant=_tenant(request, body),
            model_version=version,
        )
        for i in range(body.n)
    ]
    request.state.rid = rid
    await guard.remember(request, requests)  # the key may abort these rids
    created = int(time.time())
    base = {"id": f"chatcmpl-{rid}", "created": created, "model": gateway.limits.name}
    required = body.tool_choice == "required" and bool(body.tools)
    auto_tools = bool(body.tools) and body.tool_choice in (None, "auto")

    if not body.stream:
        outputs = await guard.filter_outputs(request, await gateway.complete_many(requests))
        choices = []
        for i, out in enumerate(outputs):
            calls = _tool_calls(out.text, forced_tool, required) if (forced_tool or required or auto_tools) else None
            message: dict[str, Any] = {"role": "assistant", "content": None if calls and not auto_tools else out.text}
            if calls:
                message["tool_calls"] = calls
            finish = "tool_calls" if calls else out.finish_reason.to_openai() if out.finish_reason else "stop"
            choices.append(
                {"index": i, "message": message, "logprobs": _chat_logprobs(out), "finish_reason": finish}
            )
        request.state.usage = _usage(outputs, len(input_ids))
        return JSONResponse(
            {**base, "object": "chat.completion", "choices": choices, "usage": request.state.usage}
        )

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    # The first increment (or the error before it) is awaited here, so such an error still gets
    # its status (app/ingress/sse.py).
    source = await opened(guard.filter_stream(request, gateway.stream_many(requests), len(requests)))
    chunks_of = _chunker(gateway)

    async def events() -> AsyncIterator[str]:
        chunk = {**base, "object": "chat.completion.chunk"}
        finals: dict[int, GenerateOutput] = {}
        for i in range(body.n):
            yield sse_event(
                {**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}]}
            )
        call_ids = {i: f"call_{uuid.uuid4().hex[:24]}" for i in range(body.n)}
        named: set[int] = set()  # choices whose tool call has been introduced (id, name)
        async for index, whole in source:
            finals[index] = whole if index not in finals else finals[index].merge(whole)
            written: list[str] = []  # this increment's events, one per token, leave in one write
            for out in chunks_of(whole):
                if out.text or out.output_token_logprobs:
                    if forced_tool is not None:
                        call = {"index": 0, "function": {"arguments": out.text}}
                        if index not in named:
                            named.add(index)
                            call.update(id=call_ids[index], type="function")
                            call["function"]["name"] = forced_tool
                        delta: dict[str, Any] = {"tool_calls": [call]}
                    else:
                        delta = {"content": out.text}
                    written.append(sse_event(
                        {**chunk, "choices": [{"index": index, "delta": delta,
                                               "logprobs": _chat_logprobs(out), "finish_reason": None}]}
                    ))
                if out.finished:
                    reason = out.finish_reason.to_openai() if out.finish_reason else "stop"
                    if forced_tool is not None:
                        reason = "tool_calls"
                    written.append(sse_event(
                        {**chunk, "choices": [{"index": index, "delta": {}, "logprobs": None,
                                               "finish_reason": reason}]}
                    ))
            if written:
                yield "".join(written)
        request.state.usage = _usage(list(finals.values()), len(input_ids))
        if include_usage:
            yield sse_event({**chunk, "choices": [], "usage": request.state.usage})

    return StreamingResponse(sse_stream(events()), media_type="text/event-stream")


# -- completions ---------------------------------------------------------------------------------


async def _prompts(gateway: Gateway, prompt, echo: bool) -> list[tuple[list[int], str]]:
    """(token ids, text) per prompt for every shape OpenAI allows. The text of a prompt given as
    token ids is only needed for `echo`."""
    if isinstance(prompt, str):
        return [(await gateway.tokenize_async(prompt), prompt)]
    if prompt and all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    texts = [p for p in prompt if isinstance(p, str)]
    encoded = iter(await gateway.tokenize_many(texts) if texts else [])
    result = []
    for p in prompt:
        if isinstance(p, str):
            result.append((next(encoded), p))
        else:
            result.append((list(p), await gateway.decode_async(list(p)) if echo else ""))
    return result


def _completion_logprobs(out: GenerateOutput, echo_offset: int, echo: bool) -> dict[str, Any] | None:
    if out.output_token_logprobs is None:
        return None
    entries: list[LogprobEntry] = []
    tops: list[list[LogprobEntry] | None] = []
    if echo and out.input_token_logprobs is not None:
        entries += out.input_token_logprobs
        tops += out.input_top_logprobs or [None] * len(out.input_token_logprobs)
    entries += out.output_token_logprobs
    tops += out.output_top_logprobs or [None] * len(out.output_token_logprobs)
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = 0 if echo else echo_offset
    for (logprob, _tid, text), top in zip(entries, tops):
        tokens.append(text or "")
        token_logprobs.append(logprob)
        top_logprobs.append({t or "": lp for lp, _i, t in top} if top else None)
        offsets.append(offset)
        offset += len(text or "")
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


async def _completions(gateway: Gateway, body: CompletionRequest, request: Request):
    _check_model(gateway, body.model)
    version = gateway.choose_version(request, body.model)
    if body.suffix is not None:
        raise InvalidRequestError("suffix is not supported", param="suffix", code="unsupported")
    if body.best_of is not None and body.best_of != body.n:
        raise InvalidRequestError("best_of other than n is not supported", param="best_of", code="unsupported")
    if body.echo and body.stream:
        raise InvalidRequestError("echo cannot be combined with stream", param="echo", code="unsupported")
    prompts = await _prompts(gateway, body.prompt, body.echo)
    constraint = _constraint_from_format(body.response_format)
    wanted = 16 if body.max_tokens is None else body.max_tokens
    rid = uuid.uuid4().hex
    requests = []
    for p, (ids, _text) in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{p}]"
        max_new = gateway.check_prompt(ids, wanted, param=param)
        for i in range(body.n):
            requests.append(
                GenerateRequest(
                    rid=f"{rid}-{p}-{i}",
                    input_ids=ids,
                    sampling=_sampling(body, max_new, i, constraint),
                    stream=body.stream,
                    return_logprob=body.logprobs is not None,
                    logprob_start_len=0 if (body.echo and body.logprobs is not None) else -1,
                    top_logprobs_num=body.logprobs or 0,
                    return_text_in_logprobs=True,
                    priority=_priority(body, request),
                    tenant=_tenant(request, body),
                    model_version=version,
                )
            )
    request.state.rid = rid
    await guard.remember(request, requests)  # the key may abort these rids
    base = {"id": f"cmpl-{rid}", "created": int(time.time()), "model": gateway.limits.name}
    prompt_tokens = sum(len(ids) for ids, _ in prompts)

    if not body.stream:
        outputs = await guard.filter_outputs(request, await gateway.complete_many(requests))
        choices = []
        for k, out in enumerate(outputs):
            prompt_text = prompts[k // body.n][1]
            text = (prompt_text if body.echo else "") + out.text
            choices.append(
                {
                    "index": k,
                    "text": text,
                    "logprobs": _completion_logprobs(out, 0, body.echo),
                    "finish_reason": out.finish_reason.to_openai() if out.finish_reason else "stop",
                }
            )
        usage = _usage(outputs, prompt_tokens)
        usage["completion_tokens"] = sum(o.completion_tokens for o in outputs)
        request.state.usage = usage
        return JSONResponse({**base, "object": "text_completion", "choices": choices, "usage": usage})

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    # The first increment (or the error before it) is awaited here, so such an error still gets
    # its status (app/ingress/sse.py).
    source = await opened(guard.filter_stream(request, gateway.stream_many(requests), len(requests)))
    chunks_of = _chunker(gateway)

    async def events() -> AsyncIterator[str]:
        chunk = {**base, "object": "text_completion"}
        finals: dict[int, GenerateOutput] = {}
        offsets: dict[int, int] = {}
        async for index, whole in source:
            finals[index] = whole if index not in finals else finals[index].merge(whole)
            written: list[str] = []  # this increment's events, one per token, leave in one write
            for out in chunks_of(whole):
                reason = None
                if out.finished:
                    reason = out.finish_reason.to_openai() if out.finish_reason else "stop"
                logprobs = _completion_logprobs(out, offsets.get(index, 0), False)
                offsets[index] = offsets.get(index, 0) + len(out.text)
                if out.text or reason or logprobs:
                    written.append(sse_event(
                        {**chunk, "choices": [{"index": index, "text": out.text, "logprobs": logprobs,
                                               "finish_reason": reason}]}
                    ))
            if written:
                yield "".join(written)
        request.state.usage = _usage(list(finals.values()), prompt_tokens)
        if include_usage:
            yield sse_event({**chunk, "choices": [], "usage": request.state.usage})

    return StreamingResponse(sse_stream(events()), media_type="text/event-stream")
