"""Role templates: the text a role block puts before and after its content.

The frontend runs roles as plain text: `{user}Hi{/user}` appends the user prefix, "Hi" and the
user suffix to the program text, and every gen adds the template's stop strings. We do the same,
so the model sees exactly the text the frontend would send. The prefixes and suffixes come from:

- "model": the tokenizer's own chat template, taken apart by rendering conversations with
  sentinel contents and cutting around them. A template that does not decompose into
  per-role prefix + content + suffix (one that rewrites content or reorders messages) is
  refused with a message naming the alternatives.
- "default": the sglang frontend's fallback (`SYSTEM:`/`USER:`/`ASSISTANT:` + newline) — what
  the frontend uses for any model path it does not recognise, so the same program gives the
  same text through both.
- "chatml": `<|im_start|>{role}\\n` ... `<|im_end|>\\n`, stop at `<|im_end|>`.
- explicit strings (`RoleTemplateSettings`).
"""

from __future__ import annotations

from dataclasses import dataclass

from app.engines.base import Tokenizer
from app.lang.settings import RoleTemplateSettings

SENTINELS = {"system": "\x01SYS\x02", "user": "\x01USR\x02", "assistant": "\x01AST\x02"}


@dataclass(frozen=True)
class RoleTemplate:
    name: str
    prefixes: dict[str, str]
    suffixes: dict[str, str]
    default_system_prompt: str | None = None
    stop: tuple[str, ...] = ()

    def prefix(self, role: str) -> str:
        return self.prefixes.get(role, "")

    def suffix(self, role: str) -> str:
        return self.suffixes.get(role, "")


DEFAULT_TEMPLATE = RoleTemplate(
    name="default",
    prefixes={"system": "SYSTEM:", "user": "USER:", "assistant": "ASSISTANT:"},
    suffixes={"system": "\n", "user": "\n", "assistant": "\n"},
)
CHATML_TEMPLATE = RoleTemplate(
    name="chatml",
    prefixes={r: f"<|im_start|>{r}\n" for r in ("system", "user", "assistant")},
    suffixes={r: "<|im_end|>\n" for r in ("system", "user", "assistant")},
    stop=("<|im_end|>",),
)


class TemplateError(ValueError):
    """The model's chat template cannot be used for role blocks (an operator/config error)."""


def role_template_from_settings(setting: str | RoleTemplateSettings,
                                tokenizer: Tokenizer | None) -> RoleTemplate:
    if isinstance(setting, RoleTemplateSettings):
        roles = ("system", "user", "assistant")
        return RoleTemplate("custom", {r: getattr(setting, r)[0] for r in roles},
                            {r: getattr(setting, r)[1] for r in roles},
                            setting.default_system_prompt, tuple(setting.stop))
    if setting == "default":
        return DEFAULT_TEMPLATE
    if setting == "chatml":
        return CHATML_TEMPLATE
    if tokenizer is None:
        raise TemplateError("role_template 'model' needs the engine's tokenizer")
    return derive_role_template(tokenizer)


def derive_role_template(tokenizer: Tokenizer) -> RoleTemplate:
    """Take the tokenizer's chat template apart into per-role prefixes and suffixes."""
    S, U, A = SENTINELS["system"], SENTINELS["user"], SENTINELS["assistant"]

    def render(messages: list[tuple[str, str]], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                [{"role": r, "content": c} for r, c in messages],
                add_generation_prompt=generation_prompt)
        except Exception as exc:
            raise TemplateError(f"the model's chat template failed to render: {exc}") from exc

    lead = _leading_special_text(tokenizer)
    full = _strip_lead(render([("system", S), ("user", U), ("assistant", A)], False), lead)
    try:
        s_at, u_at, a_at = full.index(S), full.index(U), full.index(A)
    except ValueError:
        raise TemplateError("the model's chat template does not keep message contents "
                            "verbatim; set run.role_template to 'default', 'chatml' or explicit "
                            "strings") from None
    # The generation prompt is the assistant prefix (what add_generation_prompt appends).
    user_only = _strip_lead(render([("system", S), ("user", U)], False), lead)
    with_prompt = _strip_lead(render([("system", S), ("user", U)], True), lead)
    if not with_prompt.startswith(user_only):
        raise TemplateError("the model's chat template is not append-only; set "
                            "run.role_template explicitly")
    assistant_prefix = with_prompt[len(user_only):]
    system_prefix = full[:s_at]
    between_su = full[s_at + len(S):u_at]  # system suffix + user prefix
    between_ua = full[u_at + len(U):a_at]  # user suffix + assistant prefix
    if not between_ua.endswith(assistant_prefix):
        raise TemplateError("cannot find the assistant prefix in the model's chat template; "
                            "set run.role_template explicitly")
    user_suffix = between_ua[: len(between_ua) - len(assistant_prefix)]
    # Split system suffix / user prefix by assuming the user suffix pattern repeats for system
    # (true for ChatML, Llama-3, Zephyr-style templates).
    if not between_su.startswith(user_suffix):
        raise TemplateError("the system and user roles of the model's chat template end "
                            "differently; set run.role_template explicitly")
    system_suffix = user_suffix
    user_prefix = between_su[len(user_suffix):]
    assistant_suffix = full[a_at + len(A):]
    template = RoleTemplate(
        name="model",
        prefixes={"system": system_prefix, "user": user_prefix, "assistant": assistant_prefix},
        suffixes={"system": system_suffix, "user": user_suffix, "assistant": assistant_suffix},
        stop=tuple(s for s in [assistant_suffix.strip()] if s),
    )
    # Check: the pieces must rebuild what the template renders.
    rebuilt = "".join(template.prefix(r) + c + template.suffix(r)
                      for r, c in (("system", S), ("user", U), ("assistant", A)))
    if rebuilt != full:
        raise TemplateError("the model's chat template does not decompose into role prefixes "
                            "and suffixes; set run.role_template explicitly")
    return template


def _leading_special_text(tokenizer: Tokenizer) -> str:
    """Text of the tokens `encode("")` adds (e.g. BOS): the engine adds those itself when it
    tokenizes, so a template that renders them would double them."""
    ids = tokenizer.encode("", add_special_tokens=True)
    return tokenizer.decode(ids, skip_special_tokens=False) if ids else ""


def _strip_lead(text: str, lead: str) -> str:
    return text[len(lead):] if lead and text.startswith(lead) else text
