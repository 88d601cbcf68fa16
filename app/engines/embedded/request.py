"""The state of one request inside the embedded engine, and its streamed text.

`Req` is touched only by the engine thread (after construction). Its KV bookkeeping:

- `fill_ids`: the tokens whose KV must be in the pool before the request can decode: the prompt on
  first admission; prompt + generated tokens when it is re-admitted after a retraction.
- `kv_len`: how many leading tokens of `prompt_ids + output_ids` have KV in the pool; their slots
  are `req_to_token.table[row, :kv_len]`.
- `cached_len`: how many of those slots belong to the radix tree (locked through `last_node`); the
  slots in `[cached_len, kv_len)` belong to the request and are freed or handed to the tree when it
  leaves.
While decoding, `kv_len == len(prompt_ids) + len(output_ids) - 1`: the newest token is the input of
the next step.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from app.engines.embedded.radix_cache import TreeNode
from app.protocol import FinishReason, GenerateRequest, LogprobEntry, SamplingParams


class TextStream:
    """Incremental detokenization plus stop-string handling for one request's output.

    Multi-byte characters split across tokens are held back until complete (a trailing U+FFFD
    means "bytes pending"). While not finished, text that could be the beginning of a stop string
    is held back too, so a client never sees part of a stop string that then matches.
    """

    def __init__(self, decode: Any, *, skip_special_tokens: bool, stop: list[str]) -> None:
        self._decode = decode  # (ids, skip_special_tokens) -> str
        self._skip = skip_special_tokens
        self.stop = stop
        self._max_stop = max((len(s) for s in stop), default=0)
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""  # all decoded output text so far
        self.sent = 0  # characters of `text` already streamed
        self._searched = 0  # stop strings cannot start before this index

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self._prefix_offset:self._read_offset], self._skip)
        full = self._decode(self.ids[self._prefix_offset:], self._skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)

    def flush_pending(self) -> None:
        """At the end: whatever bytes are pending become text (with replacement characters)."""
        full = self._decode(self.ids[self._prefix_offset:], self._skip)
        prefix = self._decode(self.ids[self._prefix_offset:self._read_offset], self._skip)
        if len(full) > len(prefix):
            self.text += full[len(prefix):]
        self._prefix_offset = self._read_offset = len(self.ids)

    def find_stop(self) -> tuple[int, str] | None:
        """(index, stop string) of the earliest stop string in the new text, if any."""
        if not self.stop:
            return None
        start = max(0, self._searched - self._max_stop + 1)
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        self._searched = len(self.text)
        return best

    def truncate(self, length: int) -> None:
        self.text = self.text[:length]
        self.sent = min(self.sent, length)

    def take(self, final: bool) -> str:
        """The text not yet streamed that is safe to stream now."""
        end = len(self.text) if final else len(self.text) - self._holdback()
        if end <= self.sent:
            return ""
        out = self.text[self.sent:end]
        self.sent = end
        return out

    def _holdback(self) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best


@dataclass(eq=False)
class Req:
    request: GenerateRequest
    prompt_ids: list[int]
    max_new_tokens: int
    sampler: Any  # SequenceSampler
    matcher: Any | None  # GrammarMatcher
    text: TextStream
    deliver: Any  # callable(GenerateOutput | BaseException) -> None, thread-safe
    loop: asyncio.AbstractEventLoop
    arrival_time: float = field(default_factory=time.time)
    admit_seq: int = 0  # order of (latest) admission: the newest is retracted first

    output_ids: list[int] = field(default_factory=list)
    fill_ids: list[int] = field(default_factory=list)
    row: int | None = None
    kv_len: int = 0
    cached_len: int = 0
    last_node: TreeNode | None = None
    cached_tokens: int = 0  # prompt tokens served by the prefix cache (first admission)
    counted_cache_query: bool = False
    finish_reason: FinishReason | None = None
    first_token_time: float | None = None
    num_retractions: int = 0

    # Logprobs not yet streamed.
    input_logprobs: list[LogprobEntry] | None = None
    input_top_logprobs: list[Any] | None = None
    input_logprobs_done: bool = False
    input_logprobs_sent: bool = False
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[LogprobEntry] = field(default_factory=list)
    pending_top: list[list[LogprobEntry]] = field(default_factory=list)

    @property
    def priority(self) -> int:
        return self.request.priority or 0

    @property
    def rid(self) -> str:
        return self.request.rid

    @property
    def params(self) -> SamplingParams:
        return self.request.sampling

    @property
    def wants_input_logprobs(self) -> bool:
        return self.request.return_logprob and self.request.logprob_start_len >= 0

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def remaining_fill(self) -> int:
        return max(len(self.fill_ids) - self.kv_len, 0)

    @property
    def remaining_decode(self) -> int:
        return max(self.max_new_tokens - len(self.output_ids), 0)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
