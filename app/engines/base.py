"""The engine contract: what a model replica needs from any engine.

Shaped after `sglang.Engine`'s async API (`async_generate`, `abort_request`, `flush_cache`,
`get_server_info`) so that the SGLang adapter stays thin, and implemented for real on CPU by the
embedded engine. One engine serves many concurrent `generate` calls (continuous batching).

Rules every engine follows:
- `generate` is an async generator of `GenerateOutput` increments. The first increment carrying
  tokens is yielded as soon as it exists; when the consumer falls behind, increments queued in the
  meantime are merged into one (tokens are never held back on purpose).
- The last increment has `finished=True` and a `finish_reason`.
- If the consumer stops iterating (client gone, task cancelled, `aclose()`), the engine aborts the
  request and frees its resources promptly.
- Bad requests raise `app.errors.APIError` subclasses (e.g. a prompt longer than the context:
  `InvalidRequestError` naming both numbers; a grammar that does not compile:
  `ValidationError`), before any output.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from typing import Any

from app.protocol import EngineStats, GenerateOutput, GenerateRequest, ModelInfo


class Tokenizer(abc.ABC):
    """The tokenizer side of an engine: used by the ingress (chat templates, prompt lengths) and
    by the /run interpreter. Thin over a Hugging Face tokenizer."""

    @abc.abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...

    @abc.abstractmethod
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str: ...

    @property
    @abc.abstractmethod
    def eos_token_ids(self) -> list[int]: ...


class Engine(abc.ABC):
    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model and start serving. Idempotent."""

    @abc.abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """Generate for one sequence; see the module docstring for the streaming rules."""

    @abc.abstractmethod
    async def abort(self, rid: str) -> bool:
        """Abort a running or waiting request. True if it was known."""

    @abc.abstractmethod
    async def flush_cache(self) -> bool:
        """Drop every cached prefix not used by a running request. True on success."""

    @abc.abstractmethod
    async def health_check(self, timeout_s: float = 10.0) -> None:
        """Prove the engine can generate: a real 1-token generation. Raises on failure."""

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """Cheap, non-blocking snapshot of load and counters."""

    @abc.abstractmethod
    def model_info(self) -> ModelInfo: ...

    @property
    @abc.abstractmethod
    def tokenizer(self) -> Tokenizer: ...

    def server_args(self) -> dict[str, Any]:
        """The engine's effective settings, echoed at /server_info."""
        return {}

    async def shutdown(self) -> None:
        """Release the model and background threads/processes."""


async def generate_all(engine: Engine, request: GenerateRequest) -> GenerateOutput:
    """Run a request to completion and return every increment merged into one output."""
    merged: GenerateOutput | None = None
    async for out in engine.generate(request):
        merged = out if merged is None else merged.merge(out)
    assert merged is not None and merged.finished, f"engine ended {request.rid} without a final output"
    return merged
