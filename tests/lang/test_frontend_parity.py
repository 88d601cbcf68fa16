"""The same program through the real sglang frontend and through /run's interpreter gives the
same greedy text and variables.

Both sides run against one real embedded engine (tiny model). The frontend is the installed,
unmodified `sglang.lang` (StreamExecutor + RuntimeEndpoint); only its HTTP transport is replaced
by `InProcessTransport`, which answers its `/generate` calls from the engine the way the native
API does (a stand-in for the network, not for any logic: the HTTP end-to-end version of this test
belongs with the /run route). So what is compared is exactly the requests each side builds.
"""

from __future__ import annotations

import asyncio
import json
import sys
import types
from typing import Any

import pytest

from app.engines.base import generate_all
from app.lang import ProgramRunner, RunSettings
from app.protocol import GenerateRequest, SamplingParams

SAMPLING_KEYS = set(SamplingParams.model_fields)


def import_sglang():
    name = "sglang.srt.utils.hf_transformers_patches"  # see FACTS.md: the frontend needs no GPU utils
    if name not in sys.modules:
        stub = types.ModuleType(name)
        stub.apply_all = lambda *args, **kwargs: None
        sys.modules[name] = stub
    import sglang
    import sglang.lang.backend.runtime_endpoint as runtime_endpoint

    return sglang, runtime_endpoint


class _Response:
    def __init__(self, body: Any = None, lines: list[bytes] | None = None):
        self.status_code = 200
        self._body = body
        self._lines = lines or []

    def json(self) -> Any:
        return self._body

    def iter_lines(self, decode_unicode: bool = False):
        return iter(self._lines)


class InProcessTransport:
    """Answers the frontend's `http_request(url, json=...)` calls from the engine."""

    def __init__(self, engine, loop: asyncio.AbstractEventLoop, model_path: str):
        self.engine = engine
        self.loop = loop
        self.model_path = model_path

    def __call__(self, url: str, json: dict | None = None, stream: bool = False, **_: Any):
        path = url.rsplit("/", 1)[-1]
        if path == "get_model_info":
            return _Response({"model_path": self.model_path})
        assert path == "generate", f"unexpected frontend call {url}"
        texts = json["text"] if isinstance(json.get("text"), list) else [json.get("text")]
        outputs = [self._run(text, json) for text in texts]
        if stream:
            body = {"text": outputs[0]["text"], "meta_info": outputs[0]["meta_info"]}
            return _Response(lines=[b"data: " + _dumps(body), b"data: [DONE]"])
        return _Response(outputs if isinstance(json.get("text"), list) else outputs[0])

    def _run(self, text: str, body: dict) -> dict:
        raw = dict(body.get("sampling_params") or {})
        assert not raw.pop("stop_regex", None), "stop_regex is not supported"
        sampling = {k: (list(v) if isinstance(v, tuple) else v) for k, v in raw.items()
                    if k in SAMPLING_KEYS and v is not None}
        request = GenerateRequest(
            text=text, sampling=SamplingParams(**sampling),
            return_logprob=bool(body.get("return_logprob")),
            logprob_start_len=body.get("logprob_start_len", -1) if body.get("return_logprob")
            else -1,
            return_text_in_logprobs=bool(body.get("return_text_in_logprobs")))
        out = asyncio.run_coroutine_threadsafe(generate_all(self.engine, request),
                                               self.loop).result(120)
        meta = {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                "cached_tokens": out.cached_tokens,
                "input_token_logprobs": [list(e) for e in out.input_token_logprobs or []],
                "output_token_logprobs": [list(e) for e in out.output_token_logprobs or []]}
        return {"text": out.text, "meta_info": meta}


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


@pytest.fixture(scope="module")
def frontend(threaded_engine, tmp_path_factory):
    sgl, runtime_endpoint = import_sglang()
    engine, loop = threaded_engine
    original = runtime_endpoint.http_request
    runtime_endpoint.http_request = InProcessTransport(engine, loop, "sglserve/tiny-llama")
    try:
        backend = runtime_endpoint.RuntimeEndpoint("http://in-process", chat_template_name="chatml")
        yield sgl, backend
    finally:
        runtime_endpoint.http_request = original


def run_here(threaded_engine, program: str, **sampling) -> Any:
    engine, loop = threaded_engine
    runner = ProgramRunner(engine, RunSettings(role_template="chatml"))
    body = {"program": program, "sampling": {"temperature": 0.0, **sampling}}
    return asyncio.run_coroutine_threadsafe(runner.run(body), loop).result(300)


def test_gen_select_roles_and_fork_match_the_frontend(frontend, threaded_engine):
    sgl, backend = frontend

    @sgl.function
    def program(s):
        s += sgl.system("You answer briefly.")
        s += sgl.user("What colour is the sky? 天空")
        s += sgl.assistant(sgl.gen("answer", max_tokens=8))
        s += "Verdict: " + sgl.select("verdict", choices=["right", "wrong", "unsure"])
        s += "\nNumber:" + sgl.gen("number", max_tokens=6, stop="\n")
        forks = s.fork(2)
        forks += lambda i: f"Tip {i}:" + sgl.gen("tip", max_tokens=4)
        forks.join()
        s += "Done."

    state = program.run(backend=backend, temperature=0.0)
    assert state.error() is None
    ours = run_here(
        threaded_engine,
        '{system}You answer briefly.{/system}{user}What colour is the sky? 天空{/user}'
        '{assistant}{gen("answer", max_tokens=8)}{/assistant}'
        'Verdict: {select("verdict", options=["right", "wrong", "unsure"])}'
        '\nNumber:{gen("number", max_tokens=6, stop="\\n")}'
        '{fork(2)}Tip {fork_index}:{gen("tip", max_tokens=4)}{join}Done.')
    assert ours.text == state.text()
    for name in ("answer", "verdict", "number", "tip"):
        assert ours.variables[name] == state[name], name


def test_select_with_token_healing_matches_the_frontend(frontend, threaded_engine):
    sgl, backend = frontend
    options = ["Paris", " Paris", "London", "Par"]

    @sgl.function
    def program(s):
        s += "The capital of France is "
        s += sgl.select("city", choices=options)
        s += "\nand then" + sgl.select("next", choices=["!", "?", " more"])

    state = program.run(backend=backend, temperature=0.0)
    assert state.error() is None
    ours = run_here(threaded_engine, 'The capital of France is {select("city", options='
                    '["Paris", " Paris", "London", "Par"])}\nand then'
                    '{select("next", options=["!", "?", " more"])}')
    assert (ours.variables["city"], ours.variables["next"]) == (state["city"], state["next"])
    for name in ("city", "next"):
        theirs = state.get_meta_info(name)["normalized_prompt_logprobs"]
        assert ours.meta.select_scores[name] == pytest.approx(theirs, rel=1e-5), name  # batch float noise
    assert ours.text == state.text()
