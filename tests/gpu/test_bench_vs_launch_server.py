"""CPU checks of the side-by-side GPU benchmark's tooling (bench/gpu): the sweep's steps are the
ones the issue names, and the report compares records, computes ratios/differences and judges the
targets correctly. The GPU run itself is scripts/gpu/bench_vs_launch_server.sh."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.gpu import report_vs_launch_server as report

REPO = Path(__file__).resolve().parents[2]


def record(side: str, point: str, tput: float, ttft: float, itl: float, dataset="random", backend="sglang") -> dict:
    return {"tag": f"{side}|{dataset}|{backend}|{point}", "output_throughput": tput, "median_ttft_ms": ttft,
            "p99_ttft_ms": 2 * ttft, "median_itl_ms": itl, "p99_itl_ms": 2 * itl,
            "median_e2e_latency_ms": 1.0, "completed": 8}


def write(path: Path, records: list[dict]) -> None:
    path.mkdir(parents=True)
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_sweep_covers_both_backends_every_concurrency_and_the_shared_prefix_dataset():
    out = subprocess.run(
        [sys.executable, "bench/gpu/bench_serving_sweep.py", "--side", "bare", "--port", "1", "--model", "/m",
         "--out", "/tmp/x.jsonl", "--rates", "4", "--dry-run"],
        cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()
    tags = [line.split(" :: ")[0] for line in out]
    assert tags == [f"bare|random|{b}|c{c}" for b in ("sglang-oai", "sglang") for c in (1, 8, 32, 128)] + [
        "bare|gsp|sglang|c32", "bare|rate|sglang-oai|r4"]
    assert all("--random-input-len 1024 --random-output-len 256" in line for line in out if "|random|" in line)
    assert "--cache-report" in out[8]


def test_the_report_computes_ratios_differences_and_verdicts(tmp_path):
    write(tmp_path / "bare", [record("bare", "c1", 100.0, 40.0, 6.0), record("bare", "c128", 1000.0, 800.0, 15.0)])
    write(tmp_path / "sglserve", [record("sglserve", "c1", 99.0, 50.0, 6.5),
                                  record("sglserve", "c128", 1010.0, 790.0, 15.2)])
    md = tmp_path / "r.md"
    text = report.report(tmp_path, md, tmp_path / "r.png")
    rows = report.random_rows(report.load(tmp_path / "bare"), report.load(tmp_path / "sglserve"))
    assert [(r["c"], round(r["ratio"], 3), r["d_ttft50"], round(r["d_itl50"], 2)) for r in rows] == [
        (1, 0.99, 10.0, 0.5), (128, 1.01, -10.0, 0.2)]
    assert "c=1: throughput ratio 0.990 (target >= 0.98): met" in text
    assert "c=1: TTFT p50 +10.00 ms (target <= +5 ms): **missed**" in text
    assert "c=128: throughput ratio 1.010 (target >= 1.0): met" in text
    assert (tmp_path / "r.png").stat().st_size > 0


def test_an_itl_read_inside_bursts_of_events_is_not_judged(tmp_path):
    """sglang-oai ITL p50 of ~0 on our side means tokens came several per write: not a 'met'."""
    write(tmp_path / "bare", [record("bare", "c8", 100.0, 40.0, 6.0, backend="sglang-oai")])
    write(tmp_path / "sglserve", [record("sglserve", "c8", 99.0, 41.0, 0.01, backend="sglang-oai")])
    text = report.report(tmp_path, tmp_path / "r.md", tmp_path / "r.png")
    assert "sglang-oai c=8: ITL p50 -5.99 ms: not comparable" in text
    assert "ITL p50 -5.99 ms (target" not in text


def test_greedy_answers_are_compared_with_each_other_and_with_the_reference(tmp_path):
    def answers(folder: str, texts: list[str], **extra) -> None:
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / "answers.jsonl").write_text("".join(
            json.dumps({"prompt": f"q{i}", "text": t, **extra}) + "\n" for i, t in enumerate(texts)))

    answers("bare", ["Paris.", "one two three", "a|b"])
    answers("sglserve", ["Paris.", "one two four", "a|b"])
    answers("hf_reference", ["Paris.", "one two four", "a b"], dtype="bfloat16")
    lines = report.answers_section(tmp_path / "bare", tmp_path / "sglserve", tmp_path / "hf_reference")
    text = "\n".join(lines)
    assert "**2 of 3 answers identical**" in text
    assert "launch_server **1 of 3** identical (3 words agree" in text
    assert "sglserve **2 of 3** (4 words)" in text
    assert "| q2 | a\\|b | a\\|b | yes | a b |" in lines
    no_reference = "\n".join(report.answers_section(tmp_path / "bare", tmp_path / "sglserve", tmp_path / "none"))
    assert "reference" not in no_reference and "**2 of 3 answers identical**" in no_reference
