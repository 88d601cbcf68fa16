"""`RunSettings`: the limits and server-side functions of `/run` (AppSettings.run).

Every limit has a unit in its name and an error when hit: the script size is a 413, the others
are 422s that name the limit. Functions are opt-in: only modules listed in `function_modules`
are imported, and only their `@function`-decorated callables become callable from scripts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RoleTemplateSettings(BaseModel):
    """An explicit role template: text put before and after each role's content."""

    model_config = ConfigDict(extra="forbid")

    system: tuple[str, str] = ("", "")
    user: tuple[str, str] = ("", "")
    assistant: tuple[str, str] = ("", "")
    default_system_prompt: str | None = None
    stop: list[str] = Field(default_factory=list)  # added to every gen's stop strings


class RunSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Limits on a program (checked before it runs).
    max_script_bytes: int = Field(64 * 1024, gt=0)  # 413 beyond
    max_gens: int = Field(64, gt=0)  # gen + select steps, counting every fork branch
    max_total_tokens: int = Field(8192, gt=0)  # sum of max_tokens over all gens and branches
    max_nesting_depth: int = Field(16, gt=0)  # blocks and expressions together
    max_fork_width: int = Field(16, gt=0)
    max_select_options: int = Field(64, gt=0)
    max_function_calls: int = Field(64, gt=0)  # calls written in the script, per branch
    max_program_s: float = Field(300.0, gt=0)  # wall time of one program run
    # Server-side functions.
    function_modules: list[str] = Field(default_factory=list)  # "pkg.mod" or "pkg.mod:func"
    function_timeout_s: float = Field(5.0, gt=0)  # default per call; @function may lower it
    function_workers: int = Field(4, gt=0)  # threads for synchronous functions
    # Roles: "model" derives prefixes/suffixes from the tokenizer's chat template; "default" is
    # the sglang frontend's fallback template ("USER:" ... "\n"), what the frontend uses for
    # model paths it does not recognise; "chatml" is <|im_start|>role ... <|im_end|>; or give
    # the strings explicitly.
    role_template: Literal["model", "default", "chatml"] | RoleTemplateSettings = "model"
