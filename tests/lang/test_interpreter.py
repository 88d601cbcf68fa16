"""The interpreter against the real embedded engine and the tiny model (greedy, few tokens).

Each primitive is checked against what the sglang frontend would send: the interpreter must
build the same engine requests (text so far + resolved sampling), so a gen's completion equals a
direct engine call with that prompt, and the program's text is the concatenation the frontend
would have built.
"""

from __future__ import annotations

import asyncio

import pytest

from app.engines.base import generate_all
from app.lang import FunctionRegistry, ProgramRunner, RunSettings, function
from app.protocol import GenerateRequest, SamplingParams

GREEDY = {"temperature": 0.0, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def runner(engine_loop):
    engine, _ = engine_loop
    registry = FunctionRegistry()

    @function(name="sys.city")
    def city() -> str:
        return "北京"

    registry.register(city)
    return ProgramRunner(engine, RunSettings(), registry)


def run(engine_loop, runner, program, **kw):
    _, loop = engine_loop
    return loop.run_until_complete(runner.run({"program": program, "sampling": GREEDY, **kw}))


def direct_output(engine_loop, text: str, **sampling):
    engine, loop = engine_loop
    params = SamplingParams(**{**GREEDY, **sampling})
    return loop.run_until_complete(generate_all(engine, GenerateRequest(text=text,
                                                                        sampling=params)))


def direct(engine_loop, text: str, **sampling) -> str:
    return direct_output(engine_loop, text, **sampling).text


def test_gen_completes_the_text_so_far_like_a_direct_call(engine_loop, runner):
    result = run(engine_loop, runner, 'The capital of France is{gen("answer", max_tokens=6)}!')
    answer = result.variables["answer"]
    expected = direct_output(engine_loop, "The capital of France is", max_new_tokens=6)
    assert answer == expected.text
    assert result.text == f"The capital of France is{answer}!"
    assert result.meta.engine_calls == 1
    assert (result.meta.prompt_tokens, result.meta.completion_tokens) == (
        expected.prompt_tokens, expected.completion_tokens)


def test_chinese_text_and_function_results_feed_the_next_gen(engine_loop, runner):
    result = run(engine_loop, runner, '今天{sys.city()}的天气{gen("w", max_tokens=5)}。')
    assert result.text.startswith("今天北京的天气")
    assert result.variables["w"] == direct(engine_loop, "今天北京的天气", max_new_tokens=5)
    assert result.text.endswith(result.variables["w"] + "。")


def test_stop_strings_cut_the_completion(engine_loop, runner):
    free = direct(engine_loop, "Count: 1, 2,", max_new_tokens=12)
    candidates = [ch for ch in free if ch.strip() and ch not in '"\\']
    assert candidates, f"the tiny model produced no usable stop character: {free!r}"
    stop = candidates[0]
    result = run(engine_loop, runner, f'Count: 1, 2,{{gen("n", max_tokens=12, stop="{stop}")}}')
    assert result.variables["n"] == free[: free.index(stop)]


def test_roles_use_the_model_chat_template_and_its_stop_string(engine_loop, runner):
    engine, _ = engine_loop
    result = run(engine_loop, runner, '{system}Be brief.{/system}\n{user}Hi!{/user}\n'
                 '{assistant}{gen("reply", max_tokens=8)}{/assistant}')
    rendered = engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
        add_generation_prompt=True)
    reply = result.variables["reply"]
    assert reply == direct(engine_loop, rendered, max_new_tokens=8,
                           stop=list(runner.role_template.stop))
    assert result.text == rendered + reply + runner.role_template.suffix("assistant")


def test_select_scores_every_option_on_the_shared_prefix(engine_loop, runner):
    options = ["red", "green", "blue"]
    script = 'My favourite colour is {select("c", options=%s)}.'
    first = run(engine_loop, runner, script % str(options).replace("'", '"'))
    reverse = run(engine_loop, runner, script % str(options[::-1]).replace("'", '"'))
    choice = first.variables["c"]
    assert choice in options and reverse.variables["c"] == choice  # order does not matter
    assert first.text == f"My favourite colour is {choice}."
    # One prompt-length call, then one scoring call per option, all on the cached prefix.
    assert first.meta.engine_calls == 1 + len(options)
    assert first.meta.cached_tokens > 0


def test_select_and_if_steer_the_program(engine_loop, runner):
    result = run(engine_loop, runner, 'Answer: {select("yn", options=["yes", "no"])}\n'
                 '{if yn == "yes"}POSITIVE{else}NEGATIVE{/if}')
    expected = "POSITIVE" if result.variables["yn"] == "yes" else "NEGATIVE"
    assert result.text == f"Answer: {result.variables['yn']}\n{expected}"


def test_fork_branches_share_the_prefix_and_join_gathers_lists(engine_loop, runner):
    prefix = "Here are three short tips about sleeping well and staying healthy:\n"
    result = run(engine_loop, runner, prefix + '{fork(3)}Tip {fork_index}:'
                 '{gen("tip", max_tokens=4)}{join}Done.')
    tips = result.variables["tip"]
    assert isinstance(tips, list) and len(tips) == 3
    for i, tip in enumerate(tips):
        assert tip == direct(engine_loop, f"{prefix}Tip {i}:", max_new_tokens=4)
    assert result.text == prefix + "Done."  # gather mode leaves the parent's text alone
    # The prefix was committed once, then each branch reused it from the cache.
    assert result.meta.cached_tokens >= 3 * len(
        runner.engine.tokenizer.encode(prefix, add_special_tokens=False)) - 3


def test_join_concat_appends_branch_texts_in_order(engine_loop, runner):
    result = run(engine_loop, runner, 'List:{fork(2)} item{fork_index}{join("concat")}!')
    assert result.text == "List: item0 item1!"


def test_json_program_gives_the_same_result_as_the_script(engine_loop, runner):
    script = run(engine_loop, runner, 'Q: {sys.city()}?\nA:{gen("a", max_tokens=5)}')
    ops = run(engine_loop, runner, ["Q: ", {"call": "sys.city"}, "?\nA:",
                                    {"gen": "a", "max_tokens": 5}])
    assert (ops.text, ops.variables) == (script.text, script.variables)


def test_streaming_emits_tokens_and_variables_then_done(engine_loop, runner):
    _, loop = engine_loop

    async def collect():
        return [e async for e in runner.run_stream(
            {"program": 'Once upon a time{gen("story", max_tokens=8)}{fork(2)}{gen("b", '
                        'max_tokens=2)}{join}', "sampling": GREEDY})]

    events = loop.run_until_complete(collect())
    assert events[-1].type == "done"
    result = events[-1].result
    main_text = "".join(e.text for e in events if e.type == "text" and e.branch == [])
    assert main_text == result.text
    story_deltas = [e for e in events if e.type == "text" and e.branch == []][1:]
    assert len(story_deltas) >= 1  # token increments, not one final blob
    variables = [(e.name, e.branch) for e in events if e.type == "variable"]
    assert variables[0] == ("story", []) and variables[-1] == ("b", [])
    assert sorted(variables[1:3]) == [("b", [0]), ("b", [1])]
    assert len(result.variables["b"]) == 2


def test_stopping_a_stream_cancels_the_program_and_frees_the_engine(engine_loop, runner):
    engine, loop = engine_loop

    async def stop_early():
        stream = runner.run_stream({"program": 'Go:{gen("long", max_tokens=200, ignore_eos=true)}',
                                    "sampling": GREEDY})
        async for event in stream:
            if event.type == "text" and event.text != "Go:":
                break
        await stream.aclose()
        for _ in range(100):
            if engine.stats().num_running == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    assert loop.run_until_complete(stop_early())


def test_engine_errors_surface_as_api_errors(engine_loop, runner):
    from app.errors import APIError

    with pytest.raises(APIError):
        run(engine_loop, runner, 'x{gen("j", max_tokens=4, regex="(")}')
