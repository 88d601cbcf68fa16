"""The prompt-injection detector on the labelled sample: precision, recall, false-positive rate,
and the cost of one check.

The sample (tests/safety/data/injection_sample.jsonl) is split by position within each class:
even lines are the development half (the pattern set was revised once after looking at its
misses), odd lines the held-out half (never used to change a pattern). Both are reported; the
held-out numbers are the honest ones.

    python -m bench.content_filter        # a few seconds; writes bench/results/content_filter.md/.png
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.common import RESULTS, machine, percentile, write_result
from app.safety.injection import PATTERNS, PromptInjectionDetector
from app.safety.pii import redact

SAMPLE = Path(__file__).resolve().parent.parent / "tests" / "safety" / "data" / "injection_sample.jsonl"


def load_sample() -> list[dict]:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    seen = {0: 0, 1: 0}
    for row in rows:  # split by position within each class
        row["split"] = "dev" if seen[row["label"]] % 2 == 0 else "held-out"
        seen[row["label"]] += 1
    return rows


def scores(rows: list[dict], detector: PromptInjectionDetector) -> dict[str, float]:
    tp = sum(1 for r in rows if r["label"] and detector(r["text"]).flagged)
    fp = sum(1 for r in rows if not r["label"] and detector(r["text"]).flagged)
    pos = sum(1 for r in rows if r["label"])
    neg = len(rows) - pos
    return {
        "n": len(rows), "attacks": pos, "benign": neg, "tp": tp, "fp": fp,
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / pos if pos else float("nan"),
        "fpr": fp / neg if neg else float("nan"),
    }


def latency_us(fn, texts: list[str], repeats: int = 30) -> tuple[float, float]:
    samples = []
    for _ in range(repeats):
        for text in texts:
            start = time.perf_counter()
            fn(text)
            samples.append((time.perf_counter() - start) * 1e6)
    return percentile(samples, 50), percentile(samples, 99)


def main() -> None:
    detector = PromptInjectionDetector()
    rows = load_sample()
    table = {name: scores([r for r in rows if name == "all" or r["split"] == name], detector)
             for name in ("dev", "held-out", "all")}
    texts = [r["text"] for r in rows]
    long_text = " ".join(texts) * 4  # ~40 KB: a long prompt (cut to head + tail at 32 KiB)
    det_p50, det_p99 = latency_us(detector, texts)
    long_p50, long_p99 = latency_us(detector, [long_text], repeats=20)
    pii_p50, pii_p99 = latency_us(redact, texts)
    misses = [r["text"] for r in rows if r["label"] and not detector(r["text"]).flagged]
    false_pos = [(r["text"], detector(r["text"]).reason) for r in rows if not r["label"] and detector(r["text"]).flagged]

    lines = [
        "# Prompt-injection / jailbreak detector: hit rate on a labelled sample",
        "",
        f"Machine: {machine()}. Run: `python -m bench.content_filter` (a few seconds, CPU only).",
        "",
        f"Detector: `app.safety.injection:PromptInjectionDetector` (threshold 1.0, {len(PATTERNS)} patterns,",
        "listed in docs/security.md). Sample: `tests/safety/data/injection_sample.jsonl`, written for this",
        "project (attacks: instruction overrides, prompt extraction, DAN-style personas, role-play without",
        "rules, template-token injection, exfiltration, encoded/obfuscated and non-English variants;",
        "benign: everyday requests including hard negatives that share words with attacks).",
        "Split by position within each class: even lines = development half (the patterns were revised once",
        "after reading its misses), odd lines = held-out half (never used to change a pattern).",
        "",
        "| split | texts | attacks | benign | precision | recall | false-positive rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in table.items():
        lines.append(f"| {name} | {s['n']} | {s['attacks']} | {s['benign']} | {s['precision']:.2f} | "
                     f"{s['recall']:.2f} | {s['fpr']:.2f} |")
    lines += [
        "",
        "Cost of one check (one thread, microseconds): "
        f"detector on a sample text p50 {det_p50:.0f} / p99 {det_p99:.0f}; on a ~40 KB prompt p50 "
        f"{long_p50:.0f} / p99 {long_p99:.0f}; PII redaction of a sample text p50 {pii_p50:.0f} / p99 {pii_p99:.0f}.",
        "In the server a check also pays a thread-pool hop (it runs off the event loop).",
        "",
        "## Reading, and the limits (plainly)",
        "",
        "- The held-out recall is the number to believe: the development half scores higher because",
        "  the patterns were revised against it. On attacks phrased in ways the patterns do not list it",
        "  does poorly: paraphrases ('set aside your policies'), persona stories (the 'grandmother'",
        "  trick), languages other than English/Spanish/French/German/Italian, and anything encoded",
        "  beyond simple digit-for-letter swaps.",
        "- A sample of ~130 texts written by the same people who wrote the patterns says little about",
        "  real traffic; treat this as a regression test of the pattern set, not as a measured rate.",
        "- Benign texts that quote or discuss attacks are flagged; so are some that share their words",
        "  (see the false positives below). Per-key opt-out (`content_filter: false`) exists for",
        "  trusted tenants such as a red team.",
        "- It reads the prompt only: injections arriving inside retrieved documents or tool results that",
        "  the client puts into messages are checked like any message text, but nothing checks what a",
        "  tool returns after the model called it.",
        "",
        f"### Attacks missed ({len(misses)})",
        "",
        *[f"- {t}" for t in misses],
        "",
        f"### Benign texts flagged ({len(false_pos)})",
        "",
        *[f"- {t} ({reason})" for t, reason in false_pos],
        "",
    ]
    path = write_result("content_filter", "\n".join(lines))
    plot(table)
    print(path.read_text())


def plot(table: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    metrics = ["precision", "recall", "fpr"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.25
    for i, metric in enumerate(metrics):
        ax.bar([x + i * width for x in range(len(names))], [table[n][metric] for n in names], width, label=metric)
    ax.set_xticks([x + width for x in range(len(names))], names)
    ax.set_ylim(0, 1.05)
    ax.set_title("Prompt-injection detector on the labelled sample")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "content_filter.png", dpi=110)


if __name__ == "__main__":
    main()
