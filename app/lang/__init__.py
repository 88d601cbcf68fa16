"""The /run script language: parser, checker, interpreter and server-side functions.

Public API:
    parse(program, settings=..., arguments=..., defaults=...) -> Program   (413 / 422 errors)
    ProgramRunner(engine, settings).run(body) -> RunResult
    ProgramRunner(engine, settings).run_stream(body) -> AsyncIterator[RunEvent]
    function (decorator), FunctionRegistry, RunSettings, RunRequest, RunResult, RunEvent
See docs/run-language.md for the grammar.
"""

from app.lang.functions import FunctionRegistry, function
from app.lang.request import RunDefaults, RunEvent, RunMeta, RunRequest, RunResult
from app.lang.runner import PreparedProgram, ProgramRunner, parse
from app.lang.settings import RoleTemplateSettings, RunSettings

__all__ = [
    "FunctionRegistry", "PreparedProgram", "ProgramRunner", "RoleTemplateSettings", "RunDefaults",
    "RunEvent", "RunMeta", "RunRequest", "RunResult", "RunSettings", "function", "parse",
]
