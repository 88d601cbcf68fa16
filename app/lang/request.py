"""What a `/run` call carries in and out: `RunRequest`, `RunResult`, `RunEvent`.

`RunDefaults` plays the part of the keyword arguments of the frontend's `program.run(...)`:
sampling values every `gen` starts from before its own arguments override them. The defaults
are the frontend's (max_new_tokens=128, temperature=1.0, ...), so the same program with the
same defaults builds the same requests in both places.
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from app.lang import ast
from app.lang.errors import ScriptError, SourceMap
from app.protocol import SamplingParams

# Constraints the frontend's typed gens (dtype=int/float/str/bool) send as regexes.
DTYPE_REGEX = {
    "int": r"[-+]?[0-9]+[ \n]*",
    "float": r"[-+]?[0-9]*\.?[0-9]+[ \n]*",
    "str": r"\"[\w\d\s]*\"",
    "bool": r"(True|False)",
}
DTYPE_STOPS = {"int": [" ", "\n"], "float": [" ", "\n"]}
GEN_TO_SAMPLING = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens"}


class RunDefaults(BaseModel):
    """Sampling defaults for every gen of a program (the frontend's `run()` keyword arguments)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(128, ge=0)
    stop: list[str] | str = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    ignore_eos: bool = False

    def sampling_for(self, gen: ast.Gen, template_stop: list[str],
                     source: SourceMap | None = None) -> SamplingParams:
        """The SamplingParams of one gen: defaults, then the gen's arguments, then the role
        template's stop strings and the dtype constraint (in the frontend's order)."""
        values: dict[str, Any] = self.model_dump()
        for key, value in gen.params:
            if key != "dtype":
                values[GEN_TO_SAMPLING.get(key, key)] = value
        stop = values["stop"]
        stop = [stop] if isinstance(stop, str) else list(stop)
        stop += template_stop
        dtype = gen.param("dtype")
        if dtype is not None:
            values["regex"] = DTYPE_REGEX[dtype]
            stop += DTYPE_STOPS.get(dtype, [])
        values["stop"] = stop
        try:
            return SamplingParams(**values)
        except pydantic.ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'sampling'}: {e['msg']}"
                                 for e in exc.errors())
            raise ScriptError.at(source, gen.at, f"gen({gen.name!r}) has invalid sampling "
                                 f"parameters: {problems}") from None


class RunRequest(BaseModel):
    """The body of POST /run."""

    model_config = ConfigDict(extra="forbid")

    program: str | list[Any]  # the script text, or the JSON list of ops
    arguments: dict[str, Any] = Field(default_factory=dict)  # variables bound before the start
    sampling: RunDefaults = Field(default_factory=RunDefaults)
    stream: bool = False


class RunMeta(BaseModel):
    prompt_tokens: int = 0  # summed over every engine call of the program
    completion_tokens: int = 0
    cached_tokens: int = 0
    engine_calls: int = 0
    function_calls: int = 0
    # select name -> normalized logprob per option (the frontend's normalized_prompt_logprobs);
    # inside forks the key is "name@branch.path", e.g. "pick@1".
    select_scores: dict[str, list[float]] = Field(default_factory=dict)
    # total_s, first_token_s (None when nothing was generated), engine_s, functions_s
    timings: dict[str, float | None] = Field(default_factory=dict)


class RunResult(BaseModel):
    text: str
    variables: dict[str, Any]
    meta: RunMeta


class RunEvent(BaseModel):
    """One streamed event. `branch` is the path of fork branch indices ([] = the main program).

    - text: `text` was appended (a literal, a token delta of a gen, a select's choice, a
      function's result) to the branch's text.
    - variable: `name` got its final `value` (gen/select/let, or a gathered list after a join).
    - done: the program finished; `result` is what the non-streaming call returns.
    """

    type: Literal["text", "variable", "done"]
    branch: list[int] = Field(default_factory=list)
    text: str | None = None
    name: str | None = None
    value: Any = None
    result: RunResult | None = None
