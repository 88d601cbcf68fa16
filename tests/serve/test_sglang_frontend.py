"""The unmodified `sglang` frontend (RuntimeEndpoint) runs programs against sglserve's native API."""

from __future__ import annotations

import re
import sys
import types

import httpx
import pytest

pytestmark = pytest.mark.serve


def import_sglang_frontend():
    """`import sglang` pulls the GPU runtime's utils through one patch module; the frontend does not
    need it, so register an empty stand-in for that one module (FACTS.md) and import the real rest."""
    name = "sglang.srt.utils.hf_transformers_patches"
    if name not in sys.modules:
        stub = types.ModuleType(name)
        stub.apply_all = lambda *args, **kwargs: None
        sys.modules[name] = stub
    import sglang

    return sglang


sgl = import_sglang_frontend()


@pytest.fixture(scope="module")
def backend(stack):
    endpoint = sgl.RuntimeEndpoint(stack.base_url)
    sgl.set_default_backend(endpoint)
    return endpoint


def direct_generate(stack, text: str, max_new_tokens: int) -> str:
    resp = httpx.post(
        f"{stack.base_url}/generate",
        json={"text": text, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}},
        timeout=60,
    )
    resp.raise_for_status()
    return resp.json()["text"]


@sgl.function
def question_answer(s, question):
    s += "Q: " + question + "\n"
    s += "A:" + sgl.gen("answer", max_tokens=8, temperature=0)
    s += "\nVerdict: " + sgl.select("verdict", choices=["good", "bad", "unclear"])
    s += "\nScore: " + sgl.gen("score", regex=r"[0-9]{1,3}", max_tokens=6, temperature=0)


def test_gen_select_regex(stack, backend):
    state = question_answer.run(question="What is the capital of France?")
    answer = state["answer"]
    assert answer == direct_generate(stack, "Q: What is the capital of France?\nA:", 8)
    assert state["verdict"] in ("good", "bad", "unclear")
    assert re.fullmatch(r"[0-9]{1,3}", state["score"]), state["score"]


def test_select_picks_the_highest_normalized_logprob(stack, backend):
    prefix = "The weather today is"
    choices = ["sunny", "rainy and cold", "unknown"]

    @sgl.function
    def pick(s):
        s += prefix + sgl.select("choice", choices=choices)

    chosen = pick.run()["choice"]
    # Recompute the frontend's criterion from our native API directly.
    prompt_len = httpx.post(f"{stack.base_url}/generate", json={"text": prefix, "sampling_params": {"max_new_tokens": 0}}).json()["meta_info"]["prompt_tokens"]
    scores = []
    for c in choices:
        meta = httpx.post(f"{stack.base_url}/generate", json={
            "text": prefix + c, "sampling_params": {"max_new_tokens": 0, "temperature": 0},
            "return_logprob": True, "return_text_in_logprobs": True,
            "logprob_start_len": max(prompt_len - 2, 0),
        }).json()["meta_info"]
        values = [x[0] for x in meta["input_token_logprobs"] if x[0]]
        scores.append(sum(values) / len(values))
    assert chosen == choices[max(range(len(choices)), key=scores.__getitem__)]


def test_fork_join(backend):
    @sgl.function
    def branches(s):
        s += "Two ideas:\n"
        forks = s.fork(2)
        for i, f in enumerate(forks):
            f += f"Idea {i}:" + sgl.gen("idea", max_tokens=6, temperature=0)
        forks.join()
        s += "Chosen:" + sgl.gen("chosen", max_tokens=4, temperature=0)

    state = branches.run()
    assert "Chosen:" in state.text()
    assert isinstance(state["chosen"], str)


def test_streaming(backend):
    @sgl.function
    def story(s):
        s += "A short story:" + sgl.gen("story", max_tokens=16, temperature=0)

    state = story.run(stream=True)
    pieces = list(state.text_iter(var_name="story"))
    assert "".join(pieces) == state["story"]
    assert len(state["story"]) > 0
