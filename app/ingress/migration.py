"""Continuing a started stream on another replica, so that the client sees one uninterrupted stream.

When a replica fails mid-stream, the request goes on elsewhere from its prompt + the output
tokens already received, with max_new_tokens (and min_new_tokens) reduced by as many. With greedy
sampling the continuation produces exactly the tokens the first replica would have produced.

The text the client has seen may lag the token ids: an engine holds back the bytes of an
incomplete character and text that could begin a stop string. So the continuation restarts from
the last token boundary `k` whose decoded text is a prefix of the text already sent (and not a
half character); the continuation then regenerates tokens k.. and their text, and `Splice` drops
what the client already has (the first `len(ids) - k` tokens, and the overlap of text), so nothing
is repeated or lost. Counters are made the client's: prompt tokens of the original request,
completion tokens counted from the original start. This holds for byte-level tokenizers (decoding
is concatenative at character boundaries), the kind the tiny model and SmolLM2 use; a
SentencePiece tokenizer that drops a leading space when decoding from a token boundary could
differ by that space.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from app.protocol import FinishReason, GenerateOutput, GenerateRequest

Decode = Callable[[list[int]], str]


@dataclass
class Progress:
    """What the client has been sent of one sequence so far."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    first_token_time: float | None = None
    served_by: str | None = None
    finish: FinishReason | None = None
    finished: bool = False

    @property
    def started(self) -> bool:
        return bool(self.token_ids or self.text)

    def add(self, out: GenerateOutput) -> None:
        self.token_ids += out.token_ids
        self.text += out.text
        self.prompt_tokens = self.prompt_tokens or out.prompt_tokens
        self.cached_tokens = self.cached_tokens or out.cached_tokens
        self.completion_tokens = max(self.completion_tokens, out.completion_tokens)
        self.first_token_time = self.first_token_time or out.first_token_time
        self.served_by = out.served_by or self.served_by
        if out.finished:
            self.finished, self.finish = True, out.finish_reason


def resume_point(token_ids: list[int], sent_text: str, decode: Decode) -> tuple[int, int]:
    """(k, overlap_chars): the largest k whose tokens decode to a prefix of `sent_text` ending on a
    whole character, and how many characters of `sent_text` lie beyond that prefix."""
    for k in range(len(token_ids), -1, -1):
        text = decode(token_ids[:k]) if k else ""
        if sent_text.startswith(text) and not text.endswith("\ufffd"):
            return k, len(sent_text) - len(text)
    return 0, len(sent_text)  # not reached: k = 0 always qualifies


@dataclass
class Splice:
    """Maps a continuation's outputs onto the original stream (see the module docstring)."""

    request: GenerateRequest  # the continuation to send
    resumed_at: int  # k: original output tokens the continuation's prompt includes
    skip_tokens: int  # continuation tokens the client already has
    skip_chars: int  # continuation text the client already has
    prompt_tokens: int
    cached_tokens: int
    first_token_time: float | None

    def apply(self, out: GenerateOutput) -> GenerateOutput | None:
        """The part of a continuation output the client has not seen; None if nothing is new."""
        drop = min(self.skip_tokens, len(out.token_ids))
        self.skip_tokens -= drop
        cut = min(self.skip_chars, len(out.text))
        self.skip_chars -= cut
        token_ids, text = out.token_ids[drop:], out.text[cut:]
        if not token_ids and not text and not out.finished:
            return None
        pieces = out.token_texts() if (drop or cut) else None
        lens = [len(p) for p in pieces[drop:]] if pieces is not None else None
        return out.model_copy(update={
            "token_ids": token_ids,
            "text": text,
            "text_lens": lens if lens is not None and sum(lens) == len(text) else None,
            "output_token_logprobs": out.output_token_logprobs[drop:] if out.output_token_logprobs else out.output_token_logprobs,
            "output_top_logprobs": out.output_top_logprobs[drop:] if out.output_top_logprobs else out.output_top_logprobs,
            "input_token_logprobs": None,
            "input_top_logprobs": None,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.resumed_at + out.completion_tokens,
            "first_token_time": self.first_token_time,
        })


def plan_continuation(request: GenerateRequest, progress: Progress, prompt_ids: list[int], decode: Decode) -> Splice:
    """The request that continues `request` after `progress`, and how to splice its outputs."""
    k, overlap_chars = resume_point(progress.token_ids, progress.text, decode)
    sampling = request.sampling.model_copy(update={
        "max_new_tokens": max(0, request.sampling.max_new_tokens - k),
        "min_new_tokens": max(0, request.sampling.min_new_tokens - k),
    })
    continuation = request.model_copy(update={
        "text": None,
        "input_ids": list(prompt_ids) + progress.token_ids[:k],
        "sampling": sampling,
        "logprob_start_len": -1,  # input logprobs, if asked for, went out with the first output
    })
    return Splice(
        request=continuation, resumed_at=k, skip_tokens=len(progress.token_ids) - k, skip_chars=overlap_chars,
        prompt_tokens=progress.prompt_tokens or len(prompt_ids), cached_tokens=progress.cached_tokens,
        first_token_time=progress.first_token_time,
    )


def length_finish(request: GenerateRequest, progress: Progress) -> GenerateOutput:
    """The final output of a stream whose every token was sent before its replica failed."""
    return GenerateOutput(
        rid=request.rid, finished=True,
        finish_reason=FinishReason(type="length", length=request.sampling.max_new_tokens),
        prompt_tokens=progress.prompt_tokens, cached_tokens=progress.cached_tokens,
        completion_tokens=len(progress.token_ids), first_token_time=progress.first_token_time,
        served_by=progress.served_by,
    )
