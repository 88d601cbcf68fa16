"""Typed results and streamed increments.

Every model keeps fields it does not know (`extra="allow"`): a newer server may add some, and the
client should pass them through rather than fail. Each type has a `text` property for the one
thing most callers want.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(_Open):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


# -- OpenAI chat and completions -------------------------------------------------------------------


class ChatMessage(_Open):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(_Open):
    index: int = 0
    message: ChatMessage
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletion(_Open):
    id: str
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None

    @property
    def text(self) -> str:
        return self.choices[0].message.content or "" if self.choices else ""


class ChatDelta(_Open):
    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChunkChoice(_Open):
    index: int = 0
    delta: ChatDelta = Field(default_factory=ChatDelta)
    finish_reason: str | None = None


class ChatCompletionChunk(_Open):
    """One streamed increment of a chat completion."""

    id: str
    model: str
    choices: list[ChatChunkChoice] = Field(default_factory=list)
    usage: Usage | None = None

    @property
    def text(self) -> str:
        return "".join(c.delta.content or "" for c in self.choices)

    @property
    def finish_reason(self) -> str | None:
        return next((c.finish_reason for c in self.choices if c.finish_reason), None)


class CompletionChoice(_Open):
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class Completion(_Open):
    """A text completion, or (streamed) one increment of it."""

    id: str
    model: str
    choices: list[CompletionChoice] = Field(default_factory=list)
    usage: Usage | None = None

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.choices)

    @property
    def finish_reason(self) -> str | None:
        return next((c.finish_reason for c in self.choices if c.finish_reason), None)


CompletionChunk = Completion


# -- SGLang native /generate -----------------------------------------------------------------------


class GenerateResult(_Open):
    text: str
    output_ids: list[int] = Field(default_factory=list)
    meta_info: dict[str, Any] = Field(default_factory=dict)

    @property
    def finish_reason(self) -> Any:
        return self.meta_info.get("finish_reason")


class GenerateChunk(_Open):
    """One streamed increment of /generate. The server streams cumulative text (SGLang's
    protocol); the client turns it into the new piece (`text`) and keeps the total (`total_text`)."""

    text: str
    total_text: str
    index: int = 0
    meta_info: dict[str, Any] = Field(default_factory=dict)


# -- /run ------------------------------------------------------------------------------------------


class RunResult(_Open):
    text: str
    variables: dict[str, Any] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.variables[name]


class RunEvent(_Open):
    """One streamed event of /run: `text` appended, a `variable` set, or `done` with the result."""

    type: Literal["text", "variable", "done"]
    branch: list[int] = Field(default_factory=list)
    text: str | None = None
    name: str | None = None
    value: Any = None
    result: RunResult | None = None


# -- models, jobs ----------------------------------------------------------------------------------


class Model(_Open):
    id: str
    object: str = "model"
    owned_by: str | None = None
    max_model_len: int | None = None


JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_JOB_STATUSES = ("succeeded", "failed", "cancelled")


class Job(_Open):
    """An asynchronous job (issue 17's jobs API: POST /v1/jobs, GET /v1/jobs/{id})."""

    id: str
    object: str = "job"
    status: str
    result: Any = None
    error: Any = None
    usage: dict[str, Any] | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_JOB_STATUSES
