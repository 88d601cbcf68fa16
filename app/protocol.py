"""The request and output types every layer shares (ingress -> scheduler -> replica -> engine).

Field names follow SGLang's native API (`sampling_params`, `meta_info`, `rid`, ...) so that the
native HTTP surface and the `sglang.Engine` adapter are thin. This module imports nothing from the
rest of the package: it is the vocabulary, not a layer.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# OpenAI's `response_format: json_object` (any JSON object), as an EBNF constraint. A JSON schema
# `{"type": "object"}` is not the same: strict schema compilation forbids unnamed properties.
JSON_OBJECT_GRAMMAR = r"""
root ::= object
value ::= object | array | string | number | "true" | "false" | "null"
object ::= "{" ws ( member ( "," ws member )* )? "}"
member ::= string ":" ws value ws
array ::= "[" ws ( value ws ( "," ws value ws )* )? "]"
string ::= "\"" ( [^"\\\x00-\x1f] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] ) )* "\""
number ::= "-"? ( "0" | [1-9] [0-9]* ) ( "." [0-9]+ )? ( [eE] [-+]? [0-9]+ )?
ws ::= [ ]?
"""

# One (logprob, token_id, token_text_or_None) triple, exactly as SGLang's meta_info carries it.
LogprobEntry = tuple[float | None, int, str | None]  # the first prompt token has no logprob


class SamplingParams(BaseModel):
    """Sampling parameters with SGLang's names and defaults. Validated on construction."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(128, ge=0)
    min_new_tokens: int = Field(0, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)  # -1 (or 0) = no top-k cut
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    stop_regex: list[str] = Field(default_factory=list)  # stop when the output matches any of these
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = Field(1, ge=1, le=64)
    seed: int | None = None
    # Constrained decoding: at most one of these three.
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None

    @field_validator("stop", "stop_regex", "stop_token_ids", mode="before")
    @classmethod
    def _as_list(cls, value):
        # SGLang's clients send None, a tuple, a single value or a list for these.
        if value is None:
            return []
        if isinstance(value, (str, int)):
            return [value]
        return list(value)

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> "SamplingParams":
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) > max_new_tokens ({self.max_new_tokens})"
            )
        constraints = [c for c in (self.json_schema, self.regex, self.ebnf) if c is not None]
        if len(constraints) > 1:
            raise ValueError("only one of json_schema, regex and ebnf may be set")
        return self

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def constraint(self) -> tuple[str, str] | None:
        """(kind, spec) of the grammar constraint, if any: kind in json_schema|regex|ebnf."""
        for kind in ("json_schema", "regex", "ebnf"):
            spec = getattr(self, kind)
            if spec is not None:
                return kind, spec
        return None


def new_request_id() -> str:
    return uuid.uuid4().hex


class GenerateRequest(BaseModel):
    """One sequence to generate. Batches and `n > 1` are fanned out above the engine."""

    model_config = ConfigDict(extra="forbid")

    rid: str = Field(default_factory=new_request_id)
    # Exactly one of text / input_ids. The ingress tokenizes, so below it input_ids is the norm.
    text: str | None = None
    input_ids: list[int] | None = None
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: output logprobs only; k >= 0: input logprobs from token k
    top_logprobs_num: int = Field(0, ge=0, le=20)
    return_text_in_logprobs: bool = False
    # Scheduling metadata (used by the scheduler, ignored by engines).
    priority: int = 0  # higher is served first
    tenant: str = "default"  # fairness key (API key id or user)
    arrival_time: float = Field(default_factory=time.time)
    deadline: float | None = None  # absolute unix time; past it the request is dropped
    # Set by the /run interpreter to keep a program on one replica.
    session_id: str | None = None
    # Canary (app/canary.py): the model version the Ingress chose; None in a single-model app.
    model_version: str | None = None

    @model_validator(mode="after")
    def _one_input(self) -> "GenerateRequest":
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("exactly one of text and input_ids must be given")
        return self


FinishType = Literal["stop", "length", "abort", "content_filter"]  # content_filter: an output filter stopped it


class FinishReason(BaseModel):
    """SGLang's finish_reason: {"type": "stop", "matched": <str|int|None>} / length / abort."""

    type: FinishType
    matched: str | int | None = None  # stop string or stop token id that ended generation
    length: int | None = None  # for type == "length"
    message: str | None = None  # for type == "abort"

    def to_openai(self) -> str:
        if self.type in ("length", "content_filter"):
            return self.type
        return "stop"


class GenerateOutput(BaseModel):
    """One increment of a generation: new tokens since the previous output of the same rid.

    Engines yield these; layers above may merge consecutive increments (see `merge`). Counters
    (prompt/completion/cached tokens) are totals so far, not deltas.
    """

    rid: str
    text: str = ""  # new text (delta)
    token_ids: list[int] = Field(default_factory=list)  # new token ids (delta)
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    # Logprobs, only when requested. Output ones are deltas aligned with token_ids; input ones
    # arrive once, in the first output.
    output_token_logprobs: list[LogprobEntry] | None = None
    output_top_logprobs: list[list[LogprobEntry]] | None = None
    input_token_logprobs: list[LogprobEntry] | None = None
    input_top_logprobs: list[list[LogprobEntry] | None] | None = None
    # Engine-side timings (seconds since the epoch): when the request entered the engine and
    # when its first token was produced. Used for metrics and framework-overhead accounting.
    engine_arrival_time: float | None = None
    first_token_time: float | None = None
    served_by: str | None = None  # the replica that produced the final output (for the scheduler)
    # Where `text` splits between the tokens of `token_ids` (characters per token), kept when
    # increments merge so that a stream can still send one chunk per token (OpenAI, as SGLang
    # does). None: unknown, or obvious (one token owns all the text). See `token_texts`.
    text_lens: list[int] | None = None

    def token_texts(self) -> list[str] | None:
        """`text` split by token (one piece per token id), or None where that is not known."""
        lens = _text_lens(self)
        if lens is None or len(lens) != len(self.token_ids) or sum(lens) != len(self.text):
            return None
        pieces, at = [], 0
        for n in lens:
            pieces.append(self.text[at : at + n])
            at += n
        return pieces

    def merge(self, later: "GenerateOutput") -> "GenerateOutput":
        """Concatenate a later increment of the same request onto this one."""
        assert later.rid == self.rid, f"cannot merge outputs of {self.rid} and {later.rid}"

        def cat(a, b):
            if a is None:
                return b
            if b is None:
                return a
            return a + b

        # model_construct: both sides are already valid, and this runs once per streamed chunk.
        return GenerateOutput.model_construct(
            rid=self.rid,
            text=self.text + later.text,
            token_ids=self.token_ids + later.token_ids,
            finished=later.finished,
            finish_reason=later.finish_reason,
            prompt_tokens=later.prompt_tokens,
            completion_tokens=later.completion_tokens,
            cached_tokens=later.cached_tokens,
            output_token_logprobs=cat(self.output_token_logprobs, later.output_token_logprobs),
            output_top_logprobs=cat(self.output_top_logprobs, later.output_top_logprobs),
            input_token_logprobs=self.input_token_logprobs or later.input_token_logprobs,
            input_top_logprobs=self.input_top_logprobs or later.input_top_logprobs,
            engine_arrival_time=self.engine_arrival_time or later.engine_arrival_time,
            first_token_time=self.first_token_time or later.first_token_time,
            served_by=later.served_by or self.served_by,
            text_lens=merged_text_lens(self, later),
        )


def _text_lens(out: GenerateOutput) -> list[int] | None:
    if out.text_lens is not None:
        return out.text_lens
    if len(out.token_ids) == 1:
        return [len(out.text)]
    return [] if not out.token_ids else None


def merged_text_lens(first: GenerateOutput, later: GenerateOutput) -> list[int] | None:
    """`text_lens` of `first.merge(later)`. Text that came without a token (a held-back tail
    released at the end) belongs to the token before it, or else to the one after it."""
    a, b = _text_lens(first), _text_lens(later)
    if a is None or b is None:
        return None
    if not later.token_ids and later.text:
        return a[:-1] + [a[-1] + len(later.text)] if a else None
    if not first.token_ids and first.text:
        return [b[0] + len(first.text)] + b[1:] if b else None
    return a + b


class EngineStats(BaseModel):
    """A snapshot of an engine's load and counters (totals are since start)."""

    num_running: int = 0
    num_waiting: int = 0
    num_used_tokens: int = 0  # KV slots in use (running requests and cached prefixes)
    max_total_tokens: int = 0  # KV capacity in tokens
    cache_hit_tokens: int = 0  # prompt tokens served from the prefix cache
    cache_query_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    requests_finished_total: int = 0
    requests_aborted_total: int = 0
    gen_throughput_tok_s: float = 0.0  # recent output tokens per second
    outstanding_tokens: int = 0  # prompt tokens not yet prefilled + tokens still to decode

    @property
    def cache_hit_rate(self) -> float:
        return self.cache_hit_tokens / self.cache_query_tokens if self.cache_query_tokens else 0.0


class ModelInfo(BaseModel):
    model_path: str  # what the config named: a Hugging Face id or a local directory
    served_model_name: str
    context_length: int
    vocab_size: int
    eos_token_ids: list[int]
    is_generation: bool = True
