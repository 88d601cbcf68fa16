"""The Tokenizer contract over a Hugging Face tokenizer, plus text-streaming helpers for engines.

- `HFTokenizer(path)`: `AutoTokenizer.from_pretrained` behind the small `Tokenizer` contract of
  `app.engines.base` (encode / decode / apply_chat_template / eos_token_ids). The raw Hugging Face
  tokenizer stays reachable as `.hf` (grammar compilation, fast paths).
- `IncrementalDetokenizer`: token ids in (one or a few at a time), new text out. The concatenation
  of everything it returns (pushes + `finish()`) equals `decode(all ids)`.
- `find_stop` / `stop_holdback`: stop-string search over streamed text, and how many trailing
  characters to hold back because they might still grow into a stop string.

How incremental detokenization works. Decoding token by token is wrong in two ways: a multi-byte
UTF-8 character may be split over tokens (decoding the first part alone gives U+FFFD), and some
decoders render a token differently at the start of a text (SentencePiece drops the leading space).
So the detokenizer decodes a short window that starts a few tokens back: `context` = the window up
to the last emitted token, `full` = the window including the new tokens, and emits
`full[len(context):]`. While `full` ends in U+FFFD, bytes may still be pending: nothing is emitted
and the window keeps growing, so a partial character is never shown; `finish()` emits whatever is
left (a sequence that never completed comes out as U+FFFD, exactly as a full decode renders it).
This relies on a decoder rendering a window as a stable suffix of the whole text, true for
byte-level BPE (the tiny model, Llama 3, Qwen) and SentencePiece with byte fallback. Decoding uses
`clean_up_tokenization_spaces=False` everywhere so that full and incremental decodes agree.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.engines.base import Tokenizer
from app.errors import InvalidRequestError, ValidationError

if TYPE_CHECKING:
    from app.config import ModelSettings

REPLACEMENT_CHAR = "\ufffd"  # what a decoder renders for incomplete or invalid UTF-8


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer (local directory or hub id) behind the `Tokenizer` contract."""

    def __init__(self, path: str, trust_remote_code: bool = False) -> None:
        from transformers import AutoTokenizer

        self.path = path
        self.hf: Any = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self._eos_token_ids = _eos_token_ids(self.hf, path)

    @classmethod
    def wrap(cls, hf: Any, eos_token_ids: list[int], path: str | None = None) -> HFTokenizer:
        """Our contract over a tokenizer someone else already loaded (e.g. sglang.Engine's)."""
        tokenizer = cls.__new__(cls)
        tokenizer.path = path or getattr(hf, "name_or_path", "")
        tokenizer.hf = hf
        tokenizer._eos_token_ids = list(eos_token_ids)
        return tokenizer

    @classmethod
    def from_settings(cls, settings: ModelSettings) -> HFTokenizer:
        """The tokenizer the settings name (building the tiny model first if it is the one)."""
        from app.engines.tiny_model import resolve_tokenizer_path

        return cls(resolve_tokenizer_path(settings), trust_remote_code=settings.trust_remote_code)

    # -- the contract ------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. With `add_special_tokens`, the tokenizer adds its BOS (if it has
        one); a BOS the text already starts with (a chat template that writes it) is not doubled."""
        if not isinstance(text, str):
            raise ValidationError(f"text to encode must be a string, got {type(text).__name__}")
        ids = list(self.hf.encode(text, add_special_tokens=add_special_tokens))
        bos = self.hf.bos_token_id
        if add_special_tokens and bos is not None and ids[:2] == [bos, bos]:
            if self.hf.bos_token and text.startswith(self.hf.bos_token):
                del ids[0]
        return ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(
            list(token_ids),
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=False,  # keeps full and incremental decodes equal
        )

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text for `messages` (OpenAI shape: role, content, tool_calls, ...).

        Raises `InvalidRequestError` when the model has no chat template or the template rejects
        the conversation (e.g. a role it does not know)."""
        _check_messages(messages)
        if not self.hf.chat_template:
            raise InvalidRequestError(
                f"model {self.path!r} has no chat template; send a plain prompt instead",
                param="messages",
            )
        from jinja2 import TemplateError

        try:
            return self.hf.apply_chat_template(
                messages,
                tools=tools or None,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        except TemplateError as exc:
            raise InvalidRequestError(
                f"the chat template of {self.path!r} rejected the messages: {exc}", param="messages"
            ) from exc

    @property
    def eos_token_ids(self) -> list[int]:
        """The tokenizer's EOS plus every EOS id in the model's generation_config.json."""
        return list(self._eos_token_ids)

    # -- extras ------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (base vocabulary + added tokens)."""
        return len(self.hf)

    @property
    def all_special_ids(self) -> list[int]:
        return list(self.hf.all_special_ids)

    def detokenizer(self, *, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """A fresh incremental detokenizer for one output stream."""
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas (see the module docstring).

    `push(ids)` returns the text that became certain with these ids ("" while bytes of a character
    are pending); `finish()` returns the rest. `"".join(all returns) == decode(token_ids)`.
    Cost per push: two decodes of a window of a few tokens, independent of the output length.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""  # everything emitted so far
        self._window_start = 0  # first token of the decode window (context for the decoder)
        self._emitted_end = 0  # tokens before this index are fully reflected in `text`

    def push(self, token_ids: int | Iterable[int]) -> str:
        """Add generated token ids; return the new text that is safe to show."""
        if isinstance(token_ids, int):
            self.token_ids.append(token_ids)
        else:
            self.token_ids.extend(token_ids)
        return self._advance(final=False)

    def finish(self) -> str:
        """End of stream: return whatever is still pending (incomplete bytes render as U+FFFD)."""
        return self._advance(final=True)

    @property
    def pending_tokens(self) -> int:
        """Tokens pushed whose text is not emitted yet (an incomplete character)."""
        return len(self.token_ids) - self._emitted_end

    def _advance(self, *, final: bool) -> str:
        if self._emitted_end == len(self.token_ids):
            return ""
        context = self._decode(self.token_ids[self._window_start : self._emitted_end])
        full = self._decode(self.token_ids[self._window_start :])
        if not final and (len(full) <= len(context) or full.endswith(REPLACEMENT_CHAR)):
            # Nothing visible yet (e.g. a skipped special token), or a character is incomplete.
            # Keep the window where it is so the pending bytes are decoded together later.
            return ""
        delta = full[len(context) :]
        self._window_start = self._emitted_end
        self._emitted_end = len(self.token_ids)
        self.text += delta
        return delta

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        return self._tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)


def find_stop(text: str, stop: Iterable[str], search_from: int = 0) -> tuple[int, str] | None:
    """The earliest stop string in `text` as `(index, stop_string)`, or None.

    `search_from` is the first index not searched by an earlier call (the start of the new text);
    matches that begin up to `len(s) - 1` characters before it (straddling old and new text) are
    found too, so calling this after every delta finds each match once. When several stop strings
    match at the same index, the longest wins."""
    best: tuple[int, str] | None = None
    for s in stop:
        if not s:
            continue
        index = text.find(s, max(0, search_from - len(s) + 1))
        if index < 0:
            continue
        if best is None or index < best[0] or (index == best[0] and len(s) > len(best[1])):
            best = (index, s)
    return best


def stop_holdback(text: str, stop: Iterable[str], start: int = 0) -> int:
    """How many trailing characters of `text` to hold back while streaming: the length of the
    longest suffix of `text[start:]` that is a proper prefix of a stop string (it may still grow
    into a match). Emit `text[:len(text) - stop_holdback(text, stop)]`; at the end emit all."""
    available = len(text) - start
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, available), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


def _eos_token_ids(hf_tokenizer: Any, path: str) -> list[int]:
    ids: list[int] = []
    if hf_tokenizer.eos_token_id is not None:
        ids.append(int(hf_tokenizer.eos_token_id))
    for token_id in _generation_config_eos(path):
        if token_id not in ids:
            ids.append(token_id)
    return ids


def _generation_config_eos(path: str) -> list[int]:
    """EOS ids from generation_config.json: read directly for a local directory; through the
    Hugging Face cache for a hub id (absent or unreadable: none)."""
    local = Path(path) / "generation_config.json"
    if local.is_file():
        value = json.loads(local.read_text()).get("eos_token_id")
    elif Path(path).is_dir():
        return []
    else:
        try:
            from transformers import GenerationConfig

            value = GenerationConfig.from_pretrained(path).eos_token_id
        except (OSError, ValueError):
            return []
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(
                f"messages[{i}] must be an object, got {type(message).__name__}", param="messages"
            )
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError(
                f"messages[{i}].role must be a non-empty string", param="messages"
            )
