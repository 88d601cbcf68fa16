"""Content filtering: pluggable input/output filters, a prompt-injection detector, a PII redactor.

A filter is named in the config as `module:callable` with settings; the callable is a factory,
called once per Ingress replica as `factory(**settings)`, that returns `check(text) -> Verdict |
None`. Checks run in a thread pool (never on the event loop) within `timeout_ms`; see
`app.safety.filters.FilterChain` and docs/security.md.
"""

from app.safety.filters import FilterChain, FilterFailure, FilterSpec, SafetySettings, Verdict

__all__ = ["FilterChain", "FilterFailure", "FilterSpec", "SafetySettings", "Verdict"]
