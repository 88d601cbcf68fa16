"""A job's body checked when it is submitted, with the request models of its endpoint.

POST /v1/jobs and the lines of a batch carry a body for another route; the route itself runs it
later (app.jobs.execute). A body that route would refuse is refused now instead, as the route
would refuse it (the same pydantic models, the model name, the native sampling parameters, the
/run program's parse), with the field named under the submission's own field: `body.messages`
for POST /v1/jobs. What depends on the tokenizer (prompt length) is still checked when it runs.
"""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError as PydanticValidationError

from app.errors import APIError, InvalidRequestError
from app.ingress.gateway import Gateway
from app.ingress.native_api import NativeGenerateBody, _per_item, _sampling_params
from app.ingress.openai_api import _check_model
from app.ingress.openai_protocol import ChatCompletionRequest, CompletionRequest
from app.ingress.run_api import RunBody
from app.lang import parse

BODY_MODELS: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/generate": NativeGenerateBody,
    "/run": RunBody,
}


def check_job_body(gateway: Gateway, path: str, body: dict[str, Any], field: str = "body") -> None:
    """Raise what the route at `path` would raise for `body` (422 RequestValidationError, or an
    APIError), its field named as `<field>.<the route's field>`."""
    try:
        parsed = BODY_MODELS[path].model_validate(body)
    except PydanticValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", field, *e.get("loc", ()))} for e in exc.errors(include_url=False)]) from None
    try:
        _route_checks(gateway, path, parsed)
    except APIError as exc:
        exc.param = f"{field}.{exc.param}" if exc.param else field
        raise


def body_problem(gateway: Gateway, path: str, body: dict[str, Any]) -> str | None:
    """Why a batch line's body would be refused by its route, in one sentence; None if it would not."""
    try:
        check_job_body(gateway, path, body)
    except RequestValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:])
        return f"invalid value for '{where}': {first.get('msg', 'invalid value')}"
    except APIError as exc:
        named = exc.param and exc.param.removeprefix("body.") in exc.message
        return exc.message if named or not exc.param else f"{exc.param}: {exc.message}"
    return None


def _route_checks(gateway: Gateway, path: str, parsed: BaseModel) -> None:
    if isinstance(parsed, (ChatCompletionRequest, CompletionRequest)):
        _check_model(gateway, parsed.model)
    elif isinstance(parsed, NativeGenerateBody):
        if (parsed.text is None) == (parsed.input_ids is None):
            raise InvalidRequestError("exactly one of 'text' and 'input_ids' must be given", param="text")
        if parsed.text is not None:
            batched, prompts = isinstance(parsed.text, list), parsed.text
        else:
            batched, prompts = bool(parsed.input_ids) and isinstance(parsed.input_ids[0], list), parsed.input_ids
        count = len(prompts) if batched else 1
        if isinstance(parsed.sampling_params, list) and not batched:
            raise InvalidRequestError("sampling_params is a list but the prompt is not", param="sampling_params")
        for i in range(count):
            where = f"sampling_params[{i}]" if isinstance(parsed.sampling_params, list) else "sampling_params"
            _sampling_params(_per_item(parsed.sampling_params, i, count, "sampling_params"), where)
    elif isinstance(parsed, RunBody):
        request = parsed.to_request()
        parse(request.program, settings=gateway.settings.run, arguments=request.arguments, defaults=request.sampling)
