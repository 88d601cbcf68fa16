"""A PII redactor for logs: e-mail addresses, phone numbers, card numbers (Luhn-checked), IBANs,
US social security numbers, IPv4 addresses and secret-looking tokens become `[EMAIL]`, `[PHONE]`,
... so request logs can be kept and shared.

It is pattern-based: names, street addresses and free-form identifiers are not found. Also usable
as an output filter (`app.safety.pii:PiiDetector`), which flags a text holding any of these.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from app.safety.filters import Verdict


def _luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return total % 10 == 0


def _card(match: re.Match) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    return "[CARD]" if 13 <= len(digits) <= 19 and _luhn_ok(digits) else match.group(0)


# Order matters: secrets and cards before phone numbers (a card number looks like a long phone).
_RULES: tuple[tuple[str, re.Pattern, Any], ...] = (
    ("SECRET", re.compile(r"\b(sk|pk|rk|api|key|token|ghp|xox[bap])[-_][A-Za-z0-9_\-]{12,}\b"), "[SECRET]"),
    ("EMAIL", re.compile(r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}\b"), "[EMAIL]"),
    ("IBAN", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b"), "[IBAN]"),
    ("CARD", re.compile(r"\b\d(?:[ \-]?\d){12,18}\b"), _card),
    ("SSN", re.compile(r"\b\d{3}-\d{2}-\d{4}\b"), "[SSN]"),
    ("PHONE", re.compile(r"(?<![\w+])\+?\d{1,3}?[ .\-]?\(?\d{2,4}\)?[ .\-]?\d{3,4}[ .\-]?\d{3,4}\b"), "[PHONE]"),
    ("IPV4", re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b"), "[IP]"),
)


def redact(text: str) -> str:
    for _name, pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text


def found(text: str) -> list[str]:
    """The kinds of PII in a text (for the detector)."""
    return [name for name, pattern, replacement in _RULES if pattern.sub(replacement, text) != text]


# Fields of a request log line that are ours (ids we made or configured), never redacted: a
# request id's digit runs would otherwise read as phone numbers and break log correlation.
OWN_FIELDS = frozenset({"request_id", "key_id", "method", "endpoint"})


def redact_fields(fields: Mapping[str, Any], keep: frozenset[str] = OWN_FIELDS) -> dict[str, Any]:
    """A log record's fields with every other string value redacted (numbers pass unchanged)."""
    return {k: redact(v) if isinstance(v, str) and k not in keep else v for k, v in fields.items()}


class PiiDetector:
    """`check(text) -> Verdict`: flags text holding PII (an output filter for, e.g., a model that
    must not echo customer data)."""

    def __init__(self, kinds: list[str] | None = None):
        self.kinds = set(kinds or [name for name, _, _ in _RULES])

    def __call__(self, text: str) -> Verdict:
        kinds = [k for k in found(text) if k in self.kinds]
        return Verdict(flagged=bool(kinds), category="pii", score=1.0 if kinds else 0.0,
                       reason=f"contains {', '.join(kinds)}" if kinds else "")
