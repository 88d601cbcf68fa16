"""A prompt-injection / jailbreak detector: a published pattern set, scored, with a threshold.

Each pattern has an id, a category (`prompt_injection` or `jailbreak`), a weight and a regular
expression over the normalized text (Unicode NFKC, lower case, zero-width characters removed,
whitespace collapsed; matched again with digits read as letters, '1gn0r3' -> 'ignore'). A text's
score is the sum of the weights of the distinct patterns that match it; the text is flagged when
it reaches `threshold` (1.0 by default) and reported under the category with more weight.
Weight-1.0 patterns are strong signals that flag alone; weaker ones (0.5, 0.6) flag only together.

The whole set is `PATTERNS` below, and docs/security.md lists it. Its limits, plainly: it is a
list of phrasings, so paraphrases, other languages, encodings (base64, leetspeak, split words) and
indirect injections hidden in retrieved documents are missed, and a benign text quoting an
attack is flagged. It is a first, cheap line (microseconds per prompt), not a classifier;
bench/results/content_filter.md reports its precision and recall on the sample in
tests/safety/data/.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from app.safety.filters import Verdict

INJECTION, JAILBREAK = "prompt_injection", "jailbreak"

# Filler that may sit between the words of a phrase: a few words, no sentence end.
_GAP = r"[^.?!\n]{0,40}?"


@dataclass(frozen=True)
class Pattern:
    id: str
    category: str
    weight: float
    regex: str
    description: str


PATTERNS: tuple[Pattern, ...] = (
    Pattern("PI01", INJECTION, 1.0,
            rf"\b(ignore|disregard|forget|skip|override|bypass|discard|drop)\b{_GAP}\b(previous|prior|above|earlier|preceding|all|any|your|original|initial|system)\b{_GAP}\b(instructions?|prompts?|rules|directives|guidelines|commands|programming|constraints)\b",
            "override of earlier instructions: 'ignore all previous instructions'"),
    Pattern("PI02", INJECTION, 1.0,
            rf"\b(reveal|show|print|repeat|output|display|tell|leak|dump|give|share|what (is|are|was|were))\b{_GAP}(\b(system|hidden|initial|original|secret|developer|internal)\s+(prompt|instructions?|message|rules|configuration)\b|\bpre-?prompt\b)",
            "system-prompt exfiltration: 'reveal your system prompt'"),
    Pattern("PI03", INJECTION, 1.0,
            rf"\b(repeat|print|output|copy|recite|echo)\b{_GAP}\b(everything|all|the text|the words|verbatim|word for word)\b{_GAP}\b(above|before this|so far|preceding|prior)\b",
            "echo of the context: 'repeat everything above verbatim'"),
    Pattern("PI04", INJECTION, 1.0,
            r"(<\|?(im_start|im_end|system|endoftext|eot_id|start_header_id)\|?>|\[/?(inst|sys)\]|<</?sys>>|#{2,}\s*(system|new instructions?)\s*:?)",
            "chat-template control tokens or headers inside user text"),
    Pattern("PI05", INJECTION, 0.6,
            r"(^|\n)\s*(system|admin|administrator|root|developer)\s*(message|override|note|prompt|command)?\s*:\s",
            "a line posing as a system/admin message"),
    Pattern("PI06", INJECTION, 0.6,
            r"\b(new|updated|real|actual|true|revised)\s+(system\s+)?(instructions?|rules|directives|task)\s*(are|is)?\s*([:\-]|to\b)",
            "announced replacement instructions: 'new instructions:'"),
    Pattern("PI07", INJECTION, 0.5,
            r"\b(i am|i'm|this is)\s+(your|the|an?)\s+(developer|creator|administrator|admin|owner|system administrator|programmer)\b",
            "claimed authority over the model"),
    Pattern("PI08", INJECTION, 1.0,
            rf"\b(send|post|forward|exfiltrate|upload|email)\b{_GAP}\b(conversation|chat history|system prompt|api keys?|passwords?|credentials|secrets?)\b{_GAP}\b(to|at)\s+(https?://|[\w.+-]+@[\w-]+(\.[\w-]+)+|[\w-]+(\.[\w-]+)+)",
            "exfiltration of context or secrets to an address"),
    Pattern("PI09", INJECTION, 1.0,
            rf"\b(decode|base64|rot13|reverse)\b{_GAP}\b(and|then)\s+(follow|execute|obey|do|run)\b",
            "an encoded payload with an order to obey it"),
    Pattern("PI10", INJECTION, 0.6,
            r"\b(instead|rather),?\s+(you (must|will|should)|just|only)\s+(say|output|reply|respond|print|write)\b",
            "redirection of the answer: 'instead, just say ...'"),
    Pattern("PI11", INJECTION, 1.0,
            rf"\b(forget|ignore|disregard|discard)\b{_GAP}\b(everything|all|whatever|what)\b{_GAP}\byou (were|have been|got) (told|given|instructed|taught)\b",
            "'forget everything you were told'"),
    Pattern("PI12", INJECTION, 1.0,
            rf"\b(print|reveal|show|output|list|dump|give|tell)\b{_GAP}\b(secrets?|passwords?|api keys?|credentials|access tokens?)\b{_GAP}\b(stored|in your|configuration|config|environment|memory|system)\b",
            "asks for secrets held by the system"),
    Pattern("PI13", INJECTION, 1.0,
            rf"\b(output|print|show|repeat|dump|display)\b{_GAP}\b(context window|entire conversation|whole conversation|first message|initial message)\b",
            "echo of the raw context window"),
    Pattern("PI14", INJECTION, 1.0,
            rf"\b(ignora|ignorez|ignoriere|ignorieren|vergiss|olvida|oublie|ignorare|dimentica)\b{_GAP}\b(instrucciones|instructions|anweisungen|reglas|r\u00e8gles|regeln|istruzioni|consignes)\b",
            "PI01 in Spanish, French, German, Italian"),
    Pattern("JB01", JAILBREAK, 1.0,
            r"\b(do anything now|dan mode|you are dan|act as dan|as dan,|stan mode|dude mode|aim mode)\b",
            "named jailbreak personas (DAN and kin)"),
    Pattern("JB02", JAILBREAK, 1.0,
            r"\b(enable|enter|activate|switch to|turn on|you are (now )?in)\s+(god|jailbreak|unrestricted|unfiltered|evil|sudo|opposite|chaos)\s+mode\b",
            "switching the model into a 'mode'"),
    Pattern("JB02b", JAILBREAK, 0.5,
            r"\b(enable|enter|activate|switch to|turn on|you are (now )?in)\s+(developer|dev)\s+mode\b",
            "'developer mode' (also a real setting of browsers and phones, so weak alone)"),
    Pattern("JB03", JAILBREAK, 1.0,
            rf"\b(pretend|imagine|act as if|act like|roleplay|role-play|behave|you are)\b{_GAP}\b(no|without|free of|free from|don'?t have|do not have|lack|beyond)\b{_GAP}\b(restrictions|rules|filters|guidelines|limits|limitations|ethics|morals|censorship|policies|boundaries)\b",
            "role-play without rules: 'pretend you have no restrictions'"),
    Pattern("JB04", JAILBREAK, 0.6,
            r"\b(without|no|free (of|from)|ignore|bypass|remove|disable|circumvent)\s+(any\s+|all\s+|your\s+|the\s+|its\s+)?(restrictions|filters?|guidelines|limitations|censorship|(safety|content) (rules|guidelines|measures|filters?)|ethical (guidelines|constraints)|content polic(y|ies)|guardrails)\b",
            "removal of restrictions or filters"),
    Pattern("JB05", JAILBREAK, 1.0,
            r"\b(uncensored|unfiltered|unrestricted|unaligned|jailbroken)\s+(ai|assistant|model|version|response|answer|mode|chatbot|reply)\b",
            "asks for an uncensored / unfiltered model"),
    Pattern("JB06", JAILBREAK, 0.5,
            r"\b(you are (now|no longer)|from now on,? you (will|are|must|shall)|stop being (an? )?(ai|assistant|language model))\b",
            "redefining who the model is"),
    Pattern("JB07", JAILBREAK, 0.5,
            r"\b(stay in character|never break character|do not break character|don'?t break character)\b",
            "demand to hold a persona"),
    Pattern("JB08", JAILBREAK, 0.6,
            r"\b(override|disable|turn off|deactivate|switch off|bypass)\b[^.?!\n]{0,30}?\b(safety|content|moderation|filter|guard|alignment|protocols?)\b",
            "switching safety off"),
    Pattern("JB09", JAILBREAK, 0.5,
            r"\b(never|don'?t|do not|must not|won'?t)\s+(refuse|decline|say no|apologi[sz]e|warn)\b",
            "forbidding refusals"),
    Pattern("JB10", JAILBREAK, 1.0,
            rf"\bif you (had|have|were|was|did not have|didn'?t have)\b{_GAP}\b(no|without|any)\s+(filters?|restrictions|rules|guidelines|limits|censorship|content polic(y|ies))\b",
            "'if you had no filters ...'"),
)

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)
_COMPILED = tuple((p, re.compile(p.regex, re.IGNORECASE | re.MULTILINE)) for p in PATTERNS)


_LEET = str.maketrans("013457@$", "oieastas")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).translate(_ZERO_WIDTH).lower()
    text = text.replace("\u2019", "'")
    return re.sub(r"[ \t\r\f\v]+", " ", text)


def matches(text: str) -> list[Pattern]:
    """Patterns found in the normalized text or in its de-leeted form ('1gn0r3' -> 'ignore')."""
    norm = normalize(text)
    forms = (norm, norm.translate(_LEET)) if any(c in norm for c in "013457@$") else (norm,)
    return [p for p, rx in _COMPILED if any(rx.search(f) for f in forms)]


class PromptInjectionDetector:
    """`check(text) -> Verdict`; a factory for `safety.input_filters`
    (`app.safety.injection:PromptInjectionDetector`, settings: threshold, max_chars)."""

    def __init__(self, threshold: float = 1.0, max_chars: int = 32768):
        self.threshold = threshold
        self.max_chars = max_chars  # longer texts: the head and the tail are checked

    def __call__(self, text: str) -> Verdict:
        if len(text) > self.max_chars:
            half = self.max_chars // 2
            text = text[:half] + "\n" + text[-half:]
        found = matches(text)
        scores = {INJECTION: 0.0, JAILBREAK: 0.0}
        for p in found:
            scores[p.category] += p.weight
        category = max(scores, key=lambda c: scores[c])
        total = sum(scores.values())  # weak signals of either kind add up
        flagged = total >= self.threshold
        reason = ", ".join(p.id for p in found)
        return Verdict(flagged=flagged, category=category, score=min(1.0, total / self.threshold),
                       reason=f"matched {reason}" if reason else "", categories=dict(scores))
