"""POST /run over HTTP, end to end: the session's Ray Serve app (ingress -> scheduler -> replica ->
embedded engine with the tiny model), real HTTP clients, the real sglang frontend.

What a client of /run can rely on: programs with every primitive run and return text, variables
and meta counters; the JSON ops form is the same program; streaming is SSE ending in [DONE];
bad programs are refused with 413/422 naming the problem and its place; server-side functions
run when (and only when) the operator registered them; and a program gives the same greedy
result through /run as through the sglang frontend making its round trips to our native API.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import deploy, serve_args
from tests.serve.test_sglang_frontend import import_sglang_frontend

pytestmark = pytest.mark.serve

sgl = import_sglang_frontend()

TIMEOUT_S = 60


def post_run(base_url: str, program: str | list, **body: Any) -> httpx.Response:
    body.setdefault("sampling", {"temperature": 0})
    return httpx.post(f"{base_url}/run", json={"program": program, **body}, timeout=TIMEOUT_S)


def run_ok(base_url: str, program: str | list, **body: Any) -> dict[str, Any]:
    resp = post_run(base_url, program, **body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def run_error(base_url: str, program: str | list, status: int, **body: Any) -> dict[str, Any]:
    resp = post_run(base_url, program, **body)
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


def run_stream(base_url: str, program: str, **body: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """The SSE events of a streamed run (parsed), and the raw `data:` payloads in order."""
    body.setdefault("sampling", {"temperature": 0})
    raw: list[str] = []
    with httpx.stream("POST", f"{base_url}/run", json={"program": program, "stream": True, **body},
                      timeout=TIMEOUT_S) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                raw.append(line[len("data: "):])
    events = [json.loads(payload) for payload in raw if payload != "[DONE]"]
    return events, raw


def direct_generate(base_url: str, text: str, **sampling: Any) -> dict[str, Any]:
    """One greedy call to the native API: what a gen over `text` must produce."""
    resp = httpx.post(f"{base_url}/generate", json={
        "text": text, "sampling_params": {"temperature": 0, **sampling}}, timeout=TIMEOUT_S)
    resp.raise_for_status()
    return resp.json()


# ----------------------------------------------------------------------------- programs

ROLES_PROGRAM = (
    '{system}You answer briefly.{/system}\n'
    '{user}What colour is the sky?{/user}\n'
    '{assistant}{gen("answer", max_tokens=8)}{/assistant}\n'
    'Verdict: {select("verdict", options=["right", "wrong", "unsure"])}\n'
    '{fork(2)}\n'
    'Tip {fork_index}:{gen("tip", max_tokens=5, stop="\\n")}\n'
    '{join}\n'
    'Done.'
)


def test_a_program_with_roles_gen_select_fork_and_join_runs_whole(stack):
    result = run_ok(stack.base_url, ROLES_PROGRAM)
    variables, text = result["variables"], result["text"]
    assert variables["verdict"] in ("right", "wrong", "unsure")
    assert isinstance(variables["tip"], list) and len(variables["tip"]) == 2
    # gather-join leaves the parent's text alone: the branches' tips are not in it.
    assert text.endswith(f"Verdict: {variables['verdict']}\nDone.")
    # The roles wrap their contents with the model's chat template (ChatML-like for the tiny model).
    assert text.startswith("<|im_start|>system\nYou answer briefly.<|im_end|>\n")
    assert f"<|im_start|>assistant\n{variables['answer']}<|im_end|>\n" in text
    # The gen produced what the native API produces for the same prompt, greedily.
    prompt = text[: text.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")]
    direct = direct_generate(stack.base_url, prompt, max_new_tokens=8, stop=["<|im_end|>"])
    assert variables["answer"] == direct["text"]
    meta = result["meta"]
    # 1 gen + select (1 length probe + 3 options) + fork prefix commit + 2 branch gens.
    assert meta["engine_calls"] == 1 + 4 + 1 + 2
    assert meta["completion_tokens"] > 0 and meta["prompt_tokens"] > 0
    assert set(meta["select_scores"]) == {"verdict"} and len(meta["select_scores"]["verdict"]) == 3


def test_chinese_text_and_literals_round_trip(stack):
    result = run_ok(stack.base_url,
                    '今天天气很好,{let x = "适合外出"}{x}。{"「引号」"}\n{gen("more", max_tokens=6)}')
    assert result["text"] == "今天天气很好,适合外出。「引号」\n" + result["variables"]["more"]
    assert result["variables"]["x"] == "适合外出"
    # Variable names are ASCII identifiers; a Chinese one is refused where it stands.
    error = run_error(stack.base_url, '今天{gen("续写", max_tokens=6)}', 422)
    assert (error["line"], error["column"]) == (1, 8) and "'续写'" in error["message"]


def test_arguments_are_variables_and_if_branches_on_them(stack):
    program = ('{if city == "北京"}Capital {city}.{elif city in ["上海"]}Port.{else}Other.{/if}'
               '{cities[1]}')
    first = run_ok(stack.base_url, program, arguments={"city": "北京", "cities": ["a", "b"]})
    second = run_ok(stack.base_url, program, arguments={"city": "上海", "cities": ["a", "b"]})
    assert (first["text"], second["text"]) == ("Capital 北京.b", "Port.b")
    assert first["meta"]["engine_calls"] == 0


def test_the_json_ops_form_is_the_same_program(stack):
    script = ('Q: name a colour.\n'
              '{gen("colour", max_tokens=6, stop="\\n")}\n'
              'Sure? {select("sure", options=["yes", "no"])}'
              '{fork(2)}#{fork_index}:{gen("more", max_tokens=4)}{join("concat")}')
    ops = ["Q: name a colour.\n",
           {"gen": "colour", "max_tokens": 6, "stop": "\n"},
           "\nSure? ",
           {"select": "sure", "options": ["yes", "no"]},
           {"fork": 2, "join": "concat",
            "body": ["#", {"var": "fork_index"}, ":", {"gen": "more", "max_tokens": 4}]}]
    from_script, from_ops = run_ok(stack.base_url, script), run_ok(stack.base_url, ops)
    assert from_ops["text"] == from_script["text"]
    assert from_ops["variables"] == from_script["variables"]
    # concat-join appends each branch's text in order.
    more = from_ops["variables"]["more"]
    assert from_ops["text"].endswith(f"#0:{more[0]}#1:{more[1]}")


def test_a_fork_reuses_the_cached_prefix(stack):
    shared = "A long shared preamble about the weather in many cities. " * 6
    result = run_ok(stack.base_url,
                    shared + '{fork(3)}Option {fork_index}:{gen("opt", max_tokens=4)}{join}')
    meta = result["meta"]
    assert meta["engine_calls"] == 1 + 3  # the prefix commit, then one gen per branch
    prefix_tokens = len(shared) // 4  # the byte-level BPE gives far fewer tokens than characters
    assert meta["cached_tokens"] >= 3 * prefix_tokens, meta  # every branch hit the prefix
    # engine_s sums the engine calls, which overlap across branches: it may exceed total_s.
    assert meta["timings"]["total_s"] > 0 and meta["timings"]["engine_s"] > 0


# ----------------------------------------------------------------------------- streaming

def test_streaming_sends_text_and_variable_events_then_the_result_then_done(stack):
    program = ('Story:{gen("story", max_tokens=12)}\n'
               'Mood: {select("mood", options=["happy", "sad"])}'
               '{fork(2)}[{fork_index}]{gen("end", max_tokens=3)}{join}')
    events, raw = run_stream(stack.base_url, program)
    assert raw[-1] == "[DONE]"
    assert [e["type"] for e in events].count("done") == 1 and events[-1]["type"] == "done"
    result = events[-1]["result"]
    main_text = "".join(e["text"] for e in events if e["type"] == "text" and e["branch"] == [])
    assert main_text == result["text"]
    story_done = next(i for i, e in enumerate(events) if e.get("name") == "story")
    story_pieces = [e["text"] for e in events[1:story_done]]  # after the literal "Story:"
    assert events[0] == {"type": "text", "branch": [], "text": "Story:"}
    assert len(story_pieces) >= 2, "a gen's tokens arrive as several text events"
    assert "".join(story_pieces) == result["variables"]["story"]
    variables = {e["name"]: e["value"] for e in events
                 if e["type"] == "variable" and e["branch"] == []}
    assert variables == result["variables"]
    branch_ends = {tuple(e["branch"]): e["value"] for e in events
                   if e["type"] == "variable" and e["branch"] != []}
    assert branch_ends == {(0,): result["variables"]["end"][0], (1,): result["variables"]["end"][1]}
    # The same program, not streamed, gives the same greedy result.
    unary = run_ok(stack.base_url, program)
    assert (unary["text"], unary["variables"]) == (result["text"], result["variables"])


def test_a_streamed_program_with_a_syntax_error_is_refused_before_the_stream_starts(stack):
    resp = httpx.post(f"{stack.base_url}/run", json={"program": "x {gen(}", "stream": True},
                      timeout=TIMEOUT_S)
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "syntax_error"


def test_a_stream_that_fails_midway_ends_with_an_error_event_and_done(stack):
    events, raw = run_stream(stack.base_url, "今天天气如何?{sys.query_weather()}")
    assert raw[-1] == "[DONE]"
    assert events[0] == {"type": "text", "branch": [], "text": "今天天气如何?"}
    assert events[-1]["error"]["code"] == "function_not_registered"
    assert "'sys.query_weather' is not registered" in events[-1]["error"]["message"]


# ----------------------------------------------------------------------------- errors

def test_the_issue_script_names_the_unregistered_function(stack):
    error = run_error(stack.base_url, '今天{get_current_weather("北京")},适合外出。', 422)
    assert error["code"] == "function_not_registered"
    assert "function 'get_current_weather' is not registered" in error["message"]
    assert (error["line"], error["column"]) == (1, 4)


def test_a_syntax_error_gives_line_column_and_a_caret(stack):
    error = run_error(stack.base_url, 'Hello\n今天{gen("x", max_tokens=4}', 422)
    assert error["code"] == "syntax_error"
    assert (error["line"], error["column"]) == (2, 3 + len('gen("x", max_tokens=4') + 1)
    message_lines = error["message"].splitlines()
    assert message_lines[0].startswith(f"line 2, column {error['column']}: ")
    assert message_lines[1].endswith('| 今天{gen("x", max_tokens=4}')
    # The caret sits under the '}' (CJK characters are two columns wide on a terminal).
    caret_line = message_lines[2]
    code_start = message_lines[1].index("今")
    assert caret_line.index("^") == code_start + 4 + len('{gen("x", max_tokens=4')


def test_an_unknown_variable_is_refused_before_anything_runs(stack):
    error = run_error(stack.base_url, '{gen("a", max_tokens=2)}\n{missing}', 422,
                      arguments={"city": "x"})
    assert (error["line"], error["column"]) == (2, 2)
    assert "unknown variable 'missing'" in error["message"] and "city" in error["message"]


def test_an_oversized_program_is_413(stack):
    program = "x" * (64 * 1024 + 1)
    error = run_error(stack.base_url, program, 413)
    assert "max_script_bytes" in error["message"] and str(len(program)) in error["message"]


@pytest.mark.parametrize("program, limit", [
    ('{fork(17)}{gen("a", max_tokens=1)}{join}', "max_fork_width"),
    ('{fork(16)}{gen("a", max_tokens=600)}{join}', "max_total_tokens"),
    ('{select("s", options=[' + ",".join(f'"o{i}"' for i in range(65)) + '])}',
     "max_select_options"),
])
def test_limits_are_422_naming_the_limit(stack, program, limit):
    error = run_error(stack.base_url, program, 422)
    assert f"limit {limit} exceeded" in error["message"]


def test_bad_builtin_arguments_and_bad_request_bodies_are_422(stack):
    error = run_error(stack.base_url, '{gen("a", temperature="hot")}', 422)
    assert "temperature" in error["message"] and "hot" in error["message"]
    resp = httpx.post(f"{stack.base_url}/run", json={"program": "x", "surprise": 1},
                      timeout=TIMEOUT_S)
    assert resp.status_code == 422 and "surprise" in resp.text
    error = run_error(stack.base_url, [{"gen": "a", "select": "b"}], 422)
    assert "program[0]" in error["message"]


# ----------------------------------------------------------------------------- functions

@pytest.fixture(scope="module")
def functions_app(ray_cluster, stack):
    """A second app whose operator registered the shipped examples and this suite's functions."""
    from ray import serve

    args = serve_args(run={"function_modules": ["app.lang.examples",
                                                "tests.serve.run_api_functions"],
                           "function_timeout_s": 2.0, "max_total_tokens": 256})
    app = deploy(ray_cluster, "run-functions", "/fn", args)
    yield app
    serve.delete(app.app_name)


def test_registered_functions_run_and_their_results_become_text(functions_app):
    result = run_ok(functions_app.base_url,
                    '今天{get_current_weather("北京")},适合外出。6*7={math.calc("6*7")}; '
                    '{let y = time.now("Asia/Shanghai", format="%Y")}{y}')
    year = result["variables"]["y"]
    assert result["text"] == f"今天晴,适合外出。6*7=42; {year}"
    assert year.isdigit() and len(year) == 4
    assert result["meta"]["function_calls"] == 3
    assert result["meta"]["engine_calls"] == 0


def test_a_function_result_feeds_the_next_gen(functions_app):
    result = run_ok(functions_app.base_url,
                    'Weather: {get_current_weather(city)}.{gen("x", max_tokens=4)}',
                    arguments={"city": "上海"})
    assert result["text"].startswith("Weather: 多云.")
    assert result["variables"]["x"] == direct_generate(functions_app.base_url, "Weather: 多云.",
                                                       max_new_tokens=4)["text"]


def test_a_slow_function_is_cut_off_with_504(functions_app):
    error = run_error(functions_app.base_url, 'a{slow.sleep(2.0)}b', 504)
    assert error["code"] == "function_timeout"
    assert "slow.sleep() did not finish within its timeout of 0.3 s" in error["message"]


def test_a_raising_function_is_422_naming_the_error(functions_app):
    error = run_error(functions_app.base_url, '{bad.divide(1, 0)}', 422)
    assert "bad.divide() failed: ZeroDivisionError" in error["message"]
    assert (error["line"], error["column"]) == (1, 2)


def test_function_arguments_are_validated_against_the_signature(functions_app):
    error = run_error(functions_app.base_url, '{bad.divide("6", 2)}', 422)
    assert "bad.divide()" in error["message"] and "'a'" in error["message"]
    error = run_error(functions_app.base_url, '{math.calc()}', 422)
    assert "math.calc" in error["message"] and "expression" in error["message"]


def test_the_token_limit_counts_the_requests_sampling_defaults(functions_app):
    """Gens without max_tokens take the request's `sampling.max_new_tokens` (this app allows 256
    tokens per program): 4 x 8 fits, 4 x 100 does not."""
    program = "".join(f'{{gen("g{i}")}}' for i in range(4))
    result = run_ok(functions_app.base_url, program,
                    sampling={"temperature": 0, "max_new_tokens": 8})
    assert 0 < result["meta"]["completion_tokens"] <= 4 * 8
    error = run_error(functions_app.base_url, program, 422,
                      sampling={"temperature": 0, "max_new_tokens": 100})
    assert "limit max_total_tokens exceeded" in error["message"]


def test_an_unregistered_function_still_names_what_is_registered(functions_app):
    error = run_error(functions_app.base_url, "今天天气如何?{sys.query_weather()}", 422)
    assert "'sys.query_weather' is not registered" in error["message"]
    assert "math.calc" in error["message"] and "get_current_weather" in error["message"]


# ----------------------------------------------------------------------------- parity

@pytest.fixture(scope="module")
def frontend(stack):
    """The unmodified sglang frontend, pointed at our native API. The tiny model's chat template is
    ChatML, which the frontend does not infer from our model path: name it."""
    return sgl.RuntimeEndpoint(stack.base_url, chat_template_name="chatml")


def test_the_same_program_through_run_and_through_the_frontend_gives_identical_greedy_output(
        stack, frontend):
    @sgl.function
    def program(s, topic):
        s += sgl.system("You answer briefly.")
        s += sgl.user("Tell me about " + topic + ". 请简短。")
        s += sgl.assistant(sgl.gen("answer", max_tokens=10))
        s += "Verdict: " + sgl.select("verdict", choices=["right", "wrong", "unsure"])
        s += "\nNumber:" + sgl.gen("number", max_tokens=6, stop="\n")
        forks = s.fork(3)
        forks += lambda i: f"Tip {i}:" + sgl.gen("tip", max_tokens=5)
        forks.join()
        s += "\nBest: " + sgl.select("best", choices=["first", "second", "third"])

    state = program.run(topic="the sky", backend=frontend, temperature=0.0)
    assert state.error() is None
    ours = run_ok(stack.base_url, (
        '{system}You answer briefly.{/system}'
        '{user}Tell me about {topic}. 请简短。{/user}'
        '{assistant}{gen("answer", max_tokens=10)}{/assistant}'
        'Verdict: {select("verdict", options=["right", "wrong", "unsure"])}'
        '\nNumber:{gen("number", max_tokens=6, stop="\\n")}'
        '{fork(3)}Tip {fork_index}:{gen("tip", max_tokens=5)}{join}'
        '\n\nBest: {select("best", options=["first", "second", "third"])}'),  # {join} eats one \n
        arguments={"topic": "the sky"})
    assert ours["text"] == state.text()
    for name in ("answer", "verdict", "number", "tip", "best"):
        assert ours["variables"][name] == state[name], name
    for name in ("verdict", "best"):
        theirs = state.get_meta_info(name)["normalized_prompt_logprobs"]
        assert ours["meta"]["select_scores"][name] == pytest.approx(theirs, rel=1e-4), name
