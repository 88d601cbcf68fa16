"""POST /v1/moderations in OpenAI's shape, answered by the same input filters that guard prompts.

`input` is a string or a list of strings; each gets one result with `flagged`, `categories` (bool)
and `category_scores` (0..1). OpenAI's own category names are always present (false / 0 unless a
filter reports them) so OpenAI clients parse the answer; our filters add theirs
(`prompt_injection`, `jailbreak`, `pii`, ...). A filter that fails or overruns its budget gives
503 + Retry-After here whatever `safety.on_error` says: "not flagged" would be a false answer.
"""


import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from app.errors import APIError, OverloadedError
from app.ingress import guard as guard_module
from app.safety.filters import FilterFailure

OPENAI_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
    "self-harm", "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence",
    "violence/graphic",
)
MAX_INPUTS = 64


class ModerationBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | list[str] = Field(...)
    model: str | None = None


def moderation_router() -> APIRouter:
    router = APIRouter()

    @router.post("/v1/moderations")
    async def moderations(body: ModerationBody, request: Request) -> JSONResponse:
        guard = guard_module.current()
        if guard is None:
            raise APIError("the server is still starting", status_code=503, code="starting")
        inputs = [body.input] if isinstance(body.input, str) else body.input
        if not inputs or len(inputs) > MAX_INPUTS:
            raise APIError(f"'input' must hold 1 to {MAX_INPUTS} strings", status_code=400, param="input",
                           code="invalid_value")
        results = [await _moderate(guard, text) for text in inputs]
        return JSONResponse({"id": f"modr-{uuid.uuid4().hex}", "model": body.model or "sglserve-filters",
                             "results": results})

    return router


async def _moderate(guard: Any, text: str) -> dict[str, Any]:
    try:
        verdicts = await guard.inputs.scores(text)
    except FilterFailure as exc:
        raise OverloadedError(f"{exc}; moderation unavailable", code="content_filter_unavailable",
                              retry_after_s=guard.settings.safety.retry_after_s) from None
    flags = {c: False for c in OPENAI_CATEGORIES}
    scores = {c: 0.0 for c in OPENAI_CATEGORIES}
    for verdict in verdicts:
        per_category = verdict.categories or {verdict.category: verdict.score}
        for category, score in per_category.items():
            normalized = min(1.0, max(0.0, float(score)))
            scores[category] = max(scores.get(category, 0.0), normalized)
            flags.setdefault(category, False)
        if verdict.flagged:
            flags[verdict.category] = True
            scores[verdict.category] = max(scores.get(verdict.category, 0.0), verdict.score)
    return {"flagged": any(flags.values()), "categories": flags, "category_scores": scores,
            "category_applied_input_types": {c: ["text"] for c in flags}}
