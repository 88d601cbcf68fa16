"""What the HTTP handlers share: the tokenizer, the model's limits, and the calls below the Ingress.

The ingress tokenizes (so the scheduler can route on token ids and prompts that cannot fit are
refused before they queue) and fans a request out when it asks for several sequences (`n`, batched
prompts); everything below it sees one sequence per request. Each sequence gets a ticket from the
scheduler (admission, replica choice) and streams its tokens straight from that replica
(app/ingress/ticketed.py): the scheduler carries no tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray.serve.handle import DeploymentHandle

from app.canary import TrafficSplit, split_from_settings
from app.config import AppSettings
from app.engines.base import Tokenizer
from app.errors import EngineError, InvalidRequestError
from app.ingress.prepare import OffLoop, message_chars
from app.ingress.ticketed import TicketedStreams, as_api_error
from app.metrics import observe_sequence
from app.protocol import GenerateOutput, GenerateRequest


@dataclass
class ModelLimits:
    name: str
    model_path: str
    context_length: int
    vocab_size: int


class Gateway:
    def __init__(
        self,
        settings: AppSettings,
        scheduler: DeploymentHandle,
        tokenizer: Tokenizer,
        limits: ModelLimits,
        replicas: DeploymentHandle,
    ):
        self.settings = settings
        self.scheduler = scheduler
        # One streaming handle, made once: a fresh `.options()` handle per request re-initialises
        # routing state, and concurrent first calls through new handles were seen to hang.
        self.streaming = scheduler.options(stream=True)
        self.tokenizer = tokenizer
        self.limits = limits
        self.streams = TicketedStreams(settings, scheduler, replicas, tokenizer)
        self.off_loop = OffLoop(settings.ingress.tokenize_inline_max_chars)  # long prompts: a thread
        # Canary (app/canary.py): which model version serves a request; None with one model.
        self.split: TrafficSplit | None = split_from_settings(settings)

    # -- model versions (canary) -----------------------------------------------------------------

    def base_model(self, model: str) -> str:
        """`name@version` -> `name`, for the model check."""
        return self.split.base_model(model) if self.split is not None else model

    def choose_version(self, request: Any, model: str | None = None) -> str | None:
        """The version that serves this HTTP request (explicit `model@version` or X-Model-Version,
        else by weight, sticky per X-Session-Id or API key); recorded on `request.state` for the
        response header, metrics and the request log. None with one model."""
        if self.split is None:
            return None
        version = self.split.choose(model, request.headers, getattr(request.state, "key_id", None))
        request.state.model_version = version
        return version

    def reweight(self, weights: dict[str, float]) -> None:
        """New weights (the Ingress's reconfigure): later requests are split by them."""
        if self.split is None:
            raise ValueError("weights were given, but this application serves one model (no `models:`)")
        self.split = self.split.reweighted(weights)

    # -- request preparation -------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def encode_chat_prompt(self, prompt: str) -> list[int]:
        """Tokenize a rendered chat template, adding BOS only if the template did not write it."""
        bos = getattr(getattr(self.tokenizer, "hf", None), "bos_token", None)
        return self.tokenizer.encode(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))

    def _render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
        return self.encode_chat_prompt(prompt)

    # The async forms below are what request handlers call: long inputs are tokenized off the
    # event loop (app/ingress/prepare.py), short ones inline.

    async def tokenize_async(self, text: str) -> list[int]:
        return await self.off_loop.call(len(text), self.tokenizer.encode, text)

    async def tokenize_many(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, in one trip to the pool when they are long together."""
        return await self.off_loop.call(sum(len(t) for t in texts), lambda: [self.tokenizer.encode(t) for t in texts])

    async def decode_async(self, token_ids: list[int]) -> str:
        """A prompt given as token ids, as text (skip_special_tokens=False), e.g. for `echo`."""
        return await self.off_loop.call(
            len(token_ids) * 4, self.tokenizer.decode, token_ids, skip_special_tokens=False)

    async def chat_prompt_ids(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        """The chat template rendered for `messages` (generation prompt added), tokenized."""
        return await self.off_loop.call(message_chars(messages, tools), self._render_chat, messages, tools)

    def check_prompt(self, input_ids: list[int], max_new_tokens: int, param: str) -> int:
        """Refuse prompts that cannot fit; return max_new_tokens clipped to the context left."""
        context = self.limits.context_length
        if not input_ids:
            raise InvalidRequestError("the prompt is empty", param=param, code="empty_prompt")
        bad = next((t for t in input_ids if not 0 <= t < self.limits.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(
                f"token id {bad} is outside the vocabulary (0..{self.limits.vocab_size - 1})",
                param=param,
                code="invalid_token_id",
            )
        if len(input_ids) >= context:
            raise InvalidRequestError(
                f"the prompt has {len(input_ids)} tokens, but the model's context length is "
                f"{context} tokens (and at least one token must be generated)",
                param=param,
                code="context_length_exceeded",
            )
        return min(max_new_tokens, context - len(input_ids))

    # -- calls below the ingress -----------------------------------------------------------------

    async def stream(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """One sequence's increments, from the replica its ticket names; errors come out as APIError."""
        try:
            response = self.streams.stream(request)
            async for out in observe_sequence(request, response):  # latencies/tokens (app.metrics)
                yield out
        except Exception as exc:  # noqa: BLE001 - mapped to the client's error shape
            raise as_api_error(exc) from None

    async def call_scheduler(self, method: str, *args: Any) -> Any:
        """A unary scheduler call; errors from below come out as APIError. A caller that is
        cancelled (a cancelled job) cancels the call in the scheduler too (e.g. its wait for
        admission: the request never runs)."""
        response = getattr(self.scheduler, method).remote(*args)
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as exc:  # noqa: BLE001
            raise as_api_error(exc) from None

    async def stream_scheduler(self, method: str, *args: Any) -> AsyncIterator[Any]:
        try:
            async for item in getattr(self.streaming, method).remote(*args):
                yield item
        except Exception as exc:  # noqa: BLE001
            raise as_api_error(exc) from None

    async def complete(self, request: GenerateRequest) -> GenerateOutput:
        merged: GenerateOutput | None = None
        async for out in self.stream(request):
            merged = out if merged is None else merged.merge(out)
        if merged is None:
            raise EngineError("the engine returned no output")
        return merged

    async def complete_many(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        return list(await asyncio.gather(*(self.complete(r) for r in requests)))

    async def stream_many(
        self, requests: list[GenerateRequest]
    ) -> AsyncIterator[tuple[int, GenerateOutput]]:
        """Interleave several streams as (index, increment) pairs, in arrival order."""
        if len(requests) == 1:
            async for out in self.stream(requests[0]):
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(index: int, request: GenerateRequest) -> None:
            try:
                async for out in self.stream(request):
                    await queue.put((index, out))
            except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
                await queue.put((index, exc))
            finally:
                await queue.put((index, done))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
        remaining = len(tasks)
        try:
            while remaining:
                index, item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
