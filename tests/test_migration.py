"""Splicing a continuation onto a started stream (app/ingress/migration.py), with the real tiny
tokenizer: the client must end with exactly the tokens and text of an uninterrupted stream."""

from __future__ import annotations

import pytest

from app.config import ModelSettings
from app.engines.hf_tokenizer import HFTokenizer
from app.ingress.migration import Progress, length_finish, plan_continuation, resume_point
from app.protocol import FinishReason, GenerateOutput, GenerateRequest, SamplingParams
from tests.conftest import CACHE_DIR

TEXT = "Hi 🙂 there, friend"


@pytest.fixture(scope="module")
def tok(tiny_model_path) -> HFTokenizer:
    return HFTokenizer.from_settings(ModelSettings(cache_dir=CACHE_DIR))


def decoder(tok):
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def test_resume_point_backs_off_to_the_last_whole_character_sent(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    emoji_end = next(k for k in range(len(ids) + 1) if tok.decode(ids[:k]) == "Hi 🙂")
    # The client has the ids up to the middle of the emoji, and only "Hi " of the text (this
    # tokenizer merges the space with the emoji's first byte, so the last whole text is "Hi").
    k, overlap = resume_point(ids[:emoji_end - 1], "Hi ", decoder(tok))
    resumed = tok.decode(ids[:k])
    assert "Hi ".startswith(resumed) and not resumed.endswith("\ufffd")
    assert overlap == len("Hi ") - len(resumed)
    assert all(not "Hi ".startswith(tok.decode(ids[:j])) or tok.decode(ids[:j]).endswith("\ufffd")
               for j in range(k + 1, emoji_end))
    # All text sent: resume after the last token.
    assert resume_point(ids, TEXT, decoder(tok)) == (len(ids), 0)
    # Text held back past a token (a possible stop string): resume where the sent text is whole.
    k, overlap = resume_point(ids, "Hi 🙂 the", decoder(tok))
    assert tok.decode(ids[:k]) + "Hi 🙂 the"[len("Hi 🙂 the") - overlap:] == "Hi 🙂 the"


def shown_text(tok, ids: list[int]) -> str:
    """The text an engine has streamed after these ids: whole characters only."""
    for j in range(len(ids), -1, -1):
        text = tok.decode(ids[:j])
        if not text.endswith("\ufffd"):
            return text
    return ""


def replay(tok, ids: list[int], chunks: list[int], cut: int, sent_text: str, max_new: int):
    """The first replica sent ids[:cut] (and `sent_text`); the continuation regenerates from the
    resume point. Returns what the client ends with."""
    request = GenerateRequest(rid="r", input_ids=[1, 2, 3], sampling=SamplingParams(max_new_tokens=max_new, min_new_tokens=5))
    progress = Progress()
    progress.add(GenerateOutput(rid="r", token_ids=ids[:cut], text=sent_text, prompt_tokens=3, completion_tokens=cut,
                                first_token_time=1.0))
    splice = plan_continuation(request, progress, [1, 2, 3], decoder(tok))
    k = splice.resumed_at
    assert splice.request.input_ids == [1, 2, 3] + ids[:k]
    assert splice.request.sampling.max_new_tokens == max_new - k
    assert splice.request.sampling.min_new_tokens == max(0, 5 - k)
    # The continuation's own stream: tokens k.. in chunks, text decoded from token k on.
    rest, outs, pos, shown = ids[k:], [], 0, ""
    for size in chunks:
        part = rest[pos:pos + size]
        pos = min(pos + size, len(rest))
        whole = shown_text(tok, rest[:pos])
        text, shown = whole[len(shown):], whole
        outs.append(GenerateOutput(rid="r", token_ids=part, text=text, prompt_tokens=3 + k, completion_tokens=pos,
                                   finished=pos >= len(rest), finish_reason=FinishReason(type="length") if pos >= len(rest) else None))
    for out in outs:
        spliced = splice.apply(out)
        if spliced is not None:
            progress.add(spliced)
            last = spliced
    return progress, last


@pytest.mark.parametrize("cut", range(0, 7))
def test_the_client_gets_each_token_and_character_once(tok, cut):
    ids = tok.encode(TEXT, add_special_tokens=False)
    sent_text = shown_text(tok, ids[:cut])  # what an engine would have sent: whole characters
    progress, last = replay(tok, ids, [1, 2, 3, 50], cut, sent_text, max_new=len(ids))
    assert progress.token_ids == ids
    assert progress.text == TEXT
    assert last.finished and last.completion_tokens == len(ids) and last.prompt_tokens == 3
    assert last.first_token_time == 1.0


def test_a_stream_that_had_sent_everything_finishes_by_length(tok):
    request = GenerateRequest(rid="r", input_ids=[1], sampling=SamplingParams(max_new_tokens=2))
    progress = Progress()
    progress.add(GenerateOutput(rid="r", token_ids=[5, 6], text="ab", prompt_tokens=1, completion_tokens=2))
    splice = plan_continuation(request, progress, [1], lambda ids: "ab"[:len(ids)])
    assert splice.request.sampling.max_new_tokens == 0
    final = length_finish(request, progress)
    assert final.finished and final.finish_reason.type == "length" and final.completion_tokens == 2
