"""Turning SGLang's per-request output dicts into our `GenerateOutput` increments and errors.

SGLang's default stream is cumulative: every chunk holds the whole output so far (`output_ids`,
`text`, `meta_info` with logprob lists), and when the consumer lags SGLang hands over only the
latest chunk. `StreamCursor` remembers how much has been passed on, so each chunk becomes an
increment of what is new. This runs once per chunk per request, so it avoids validation (see
`new_output`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from app.errors import APIError, EngineError, InvalidRequestError, OverloadedError, ValidationError
from app.protocol import FinishReason, GenerateOutput


@dataclasses.dataclass
class StreamCursor:
    """How much of SGLang's cumulative output has already been passed on."""

    arrival_time: float = 0.0
    first_token_time: float | None = None
    ids: int = 0
    output_logprobs: int = 0
    output_top_logprobs: int = 0
    input_logprobs_sent: bool = False
    text: "TextEmitter" = dataclasses.field(default_factory=lambda: TextEmitter(()))


class TextEmitter:
    """Turns SGLang's growing output text into deltas, holding back a tail that could still become
    a stop string: SGLang streams text as decoded and trims a matched stop string only in the final
    output, so without this a client would see the first characters of a stop string that later
    matched."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.sent = 0  # characters of the full text passed on so far
        self.full = ""  # the full text so far (kept only for incremental chunks)

    def delta(self, full_text: str, finished: bool) -> str:
        if finished:
            end = len(full_text)
        else:
            end = len(full_text) - self._holdback(full_text)
        if end <= self.sent:
            return ""
        new = full_text[self.sent : end]
        self.sent = end
        return new

    def _holdback(self, text: str) -> int:
        hold = 0
        for stop in self.stops:
            found = text.find(stop, self.sent)
            if found != -1:  # SGLang finishes on it in this or the next chunk: show nothing of it
                hold = max(hold, len(text) - found)
                continue
            for k in range(min(len(stop) - 1, len(text) - self.sent), 0, -1):
                if text.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        return hold


_OUTPUT_FIELDS = frozenset(GenerateOutput.model_fields)


def new_output(**fields: Any) -> GenerateOutput:
    """A GenerateOutput without validation, built once per streamed chunk (the hot path).

    `model_construct` costs ~5 us here (it resolves defaults field by field); every field is given,
    so this sets the instance state directly, as `model_construct` does, in ~1.4 us. Skipping
    validation also lets SGLang's None logprob of the first prompt token through. A CPU test
    checks that the result equals a validated GenerateOutput."""
    assert fields.keys() == _OUTPUT_FIELDS
    out = GenerateOutput.__new__(GenerateOutput)
    object.__setattr__(out, "__dict__", fields)
    object.__setattr__(out, "__pydantic_fields_set__", set(_OUTPUT_FIELDS))
    object.__setattr__(out, "__pydantic_extra__", None)
    object.__setattr__(out, "__pydantic_private__", None)
    return out


def finish_reason_from_sglang(raw: Any) -> FinishReason | None:
    if not raw:
        return None
    if isinstance(raw, str):  # older SGLang versions sent a bare string
        return FinishReason.model_construct(type=raw, matched=None, length=None, message=None)
    matched = raw.get("matched")
    if isinstance(matched, list):  # a multi-token stop sequence; keep the last id
        matched = matched[-1] if matched else None
    return FinishReason.model_construct(
        type=raw.get("type", "stop"),
        matched=matched,
        length=raw.get("length"),
        message=raw.get("message"),
    )


def error_for_sglang_abort(raw: dict[str, Any], constraint: tuple[str, str] | None) -> APIError:
    """Map an abort that SGLang attached a status code to (its request errors) onto ours."""
    status = int(raw.get("status_code") or 500)
    message = str(raw.get("message") or "request aborted by SGLang")
    if status == 400:
        if constraint is not None and looks_like_grammar_error(message):
            return ValidationError(message, param=f"sampling_params.{constraint[0]}")
        return InvalidRequestError(message)
    if status in (429, 503):
        return OverloadedError(message)
    return EngineError(message, status_code=status if status >= 500 else 500)


def looks_like_grammar_error(message: str) -> bool:
    lowered = message.lower()
    return any(w in lowered for w in ("grammar", "regex", "json", "schema", "ebnf", "compile"))
