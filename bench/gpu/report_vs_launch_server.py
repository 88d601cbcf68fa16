"""Turns the side-by-side run (scripts/gpu/bench_vs_launch_server.sh) into
bench/gpu/results_vs_launch_server.md and its PNG plots.

Input: a directory with `bare/` and `sglserve/` (the unpacked $OUT/<step>.tar.gz of the GPU run;
`--ours` names another folder as the main sglserve side, and every further folder is a variant),
each holding `results.jsonl` (SGLang's own `sglang.benchmark.serving` records, one per step, `tag`
= side|dataset|backend|cN), `env.txt` and `command.txt`.

    python bench/gpu/report_vs_launch_server.py --run bench/gpu/vs_launch_server
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Targets of issue 14 (sglserve / bare SGLang server, same run).
TARGET_RATIO, TARGET_RATIO_128 = 0.98, 1.0
TARGET_TTFT_MS = {1: 5.0, 32: 10.0}
TARGET_ITL_MS = 1.0
METRICS = ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms",
           "median_e2e_latency_ms", "completed")


def load(side_dir: Path) -> dict[tuple, dict]:
    """(dataset, backend, point) -> record; the last record wins if a step ran twice."""
    out: dict[tuple, dict] = {}
    path = side_dir / "results.jsonl"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            _side, dataset, backend, point = rec["tag"].split("|")
            out[(dataset, backend, point)] = rec
    return out


def fmt(x, nd=1) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def random_rows(bare: dict, ours: dict) -> list[dict]:
    rows = []
    for key in sorted(set(bare) & set(ours), key=lambda k: (k[1], int(k[2][1:]) if k[2][1:].isdigit() else 0)):
        dataset, backend, point = key
        if dataset != "random":
            continue
        b, s = bare[key], ours[key]
        rows.append({"backend": backend, "c": int(point[1:]), "bare": b, "ours": s,
                     "ratio": s["output_throughput"] / b["output_throughput"],
                     "d_ttft50": s["median_ttft_ms"] - b["median_ttft_ms"],
                     "d_ttft99": s["p99_ttft_ms"] - b["p99_ttft_ms"],
                     "d_itl50": s["median_itl_ms"] - b["median_itl_ms"],
                     "d_itl99": s["p99_itl_ms"] - b["p99_itl_ms"]})
    return rows


def bunched(row: dict) -> bool:
    """The OpenAI backend of `bench_serving` records one ITL per SSE event; where sglserve's replica
    sends several tokens per chunk, the Ingress writes their events back to back and the p50 gap
    reads ~0, which says nothing about per-token latency (the native backend divides a chunk's gap
    by its tokens)."""
    return row["ours"]["median_itl_ms"] < 0.1 <= row["bare"]["median_itl_ms"]


def verdicts(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        c, tag = r["c"], f"{r['backend']} c={r['c']}"
        want = TARGET_RATIO_128 if c == 128 else TARGET_RATIO
        lines.append(f"- {tag}: throughput ratio {r['ratio']:.3f} (target >= {want}): "
                     f"{'met' if r['ratio'] >= want else '**missed**'}")
        if c in TARGET_TTFT_MS:
            ok = r["d_ttft50"] <= TARGET_TTFT_MS[c]
            lines.append(f"- {tag}: TTFT p50 {r['d_ttft50']:+.2f} ms (target <= +{TARGET_TTFT_MS[c]:g} ms): "
                         f"{'met' if ok else '**missed**'}")
        if bunched(r):
            lines.append(f"- {tag}: ITL p50 {r['d_itl50']:+.2f} ms: not comparable (sglserve's tokens came in "
                         f"bursts of SSE events, p50 {r['ours']['median_itl_ms']:.2f} ms is a gap inside a burst; "
                         "the native backend's per-token ITL is the figure to judge)")
            continue
        ok = r["d_itl50"] <= TARGET_ITL_MS
        lines.append(f"- {tag}: ITL p50 {r['d_itl50']:+.2f} ms (target <= +{TARGET_ITL_MS:g} ms): "
                     f"{'met' if ok else '**missed**'}")
    return lines


def gpu_name(env: Path) -> str:
    """The GPU's name from the device's report (env.txt's second line: name, memory, driver)."""
    if env.exists():
        lines = env.read_text().splitlines()
        if len(lines) > 1 and "," in lines[1]:
            return lines[1].split(",")[0].replace("NVIDIA ", "").strip()
    return "GPU"


def answers_section(bare_dir: Path, ours_dir: Path, reference_dir: Path | None = None) -> list[str]:
    """Greedy chat answers of both servers to the same prompts (bench/gpu/same_answers.py), compared
    with each other and, where present, with Hugging Face transformers' own answers
    (bench/gpu/reference_answers.py)."""
    def read(d: Path | None) -> list[dict]:
        path = d / "answers.jsonl" if d is not None else None
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path and path.exists() else []

    def agreeing_words(a: str, b: str) -> int:  # words in common before the first difference
        n = 0
        for x, y in zip(a.split(), b.split()):
            if x != y:
                break
            n += 1
        return n

    bare, ours, ref = read(bare_dir), read(ours_dir), read(reference_dir)
    if not bare or not ours:
        return []
    same = sum(b["text"] == o["text"] for b, o in zip(bare, ours))
    lines = ["## Real text: greedy chat answers of both servers", "",
             f"The same {len(bare)} chat prompts, one at a time, temperature 0, at most 64 tokens, through "
             f"`/v1/chat/completions` of each server (`bench/gpu/same_answers.py`): **{same} of {len(bare)} "
             "answers identical** word for word.", ""]
    if ref:
        ref_by_prompt = {r["prompt"]: r for r in ref}
        match = {name: sum(r["text"] == ref_by_prompt.get(r["prompt"], {}).get("text") for r in rows)
                 for name, rows in (("launch_server", bare), ("sglserve", ours))}
        words = {name: sum(agreeing_words(r["text"], ref_by_prompt.get(r["prompt"], {}).get("text", ""))
                           for r in rows) for name, rows in (("launch_server", bare), ("sglserve", ours))}
        lines += [f"Against the reference, Hugging Face transformers itself answering the same prompts greedily "
                  f"on CPU in {ref[0].get('dtype', 'bfloat16')} from the same GGUF (`bench/gpu/reference_answers.py`): "
                  f"launch_server **{match['launch_server']} of {len(ref)}** identical "
                  f"({words['launch_server']} words agree before the first difference, over all prompts), "
                  f"sglserve **{match['sglserve']} of {len(ref)}** ({words['sglserve']} words). Greedy decoding "
                  "in bf16 is not bit-reproducible across kernels and batch shapes: near-ties between two tokens "
                  "go either way, and an answer that differs at one word then differs after it.", ""]
    header = "| prompt | launch_server | sglserve | same |" + (" HF transformers (reference) |" if ref else "")
    lines += [header, "|---|---|---|---|" + ("---|" if ref else "")]
    ref_text = {r["prompt"]: r["text"] for r in ref}
    for b, o in zip(bare, ours):
        cell = lambda t: t.replace("|", "\\|").replace("\n", " ")[:160]  # noqa: E731
        row = (f"| {b['prompt']} | {cell(b['text'])} | {cell(o['text'])} | "
               f"{'yes' if b['text'] == o['text'] else '**no**'} |")
        if ref:
            row += f" {cell(ref_text.get(b['prompt'], '-'))} |"
        lines.append(row)
    return lines + [""]


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for backend, marker in (("sglang-oai", "o"), ("sglang", "s")):
        sel = [r for r in rows if r["backend"] == backend]
        if not sel:
            continue
        cs = [r["c"] for r in sel]
        axes[0].plot(cs, [r["ratio"] for r in sel], marker=marker, label=backend)
        axes[1].plot(cs, [r["d_ttft50"] for r in sel], marker=marker, label=f"{backend} p50")
        axes[1].plot(cs, [r["d_ttft99"] for r in sel], marker=marker, ls="--", label=f"{backend} p99")
        axes[2].plot(cs, [r["d_itl50"] for r in sel], marker=marker, label=f"{backend} p50")
        axes[2].plot(cs, [r["d_itl99"] for r in sel], marker=marker, ls="--", label=f"{backend} p99")
    axes[0].axhline(TARGET_RATIO, color="grey", ls=":", label="target 0.98")
    axes[0].axhline(1.0, color="black", lw=0.5)
    axes[0].set_title("output tok/s: sglserve / launch_server")
    axes[1].set_title("TTFT difference (ms, sglserve - launch_server)")
    axes[2].set_title("ITL difference (ms, sglserve - launch_server)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("max concurrency")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[1:]:
        ax.axhline(0, color="black", lw=0.5)
        ax.set_yscale("symlog", linthresh=1.0)  # ms differences span 0.01 .. 2000
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


MODEL_8B = ("Llama-3.1-8B shape with dummy weights and SmolLM2's tokenizer (vocab 49,152), bf16 "
            "(`bench/gpu/make_bench_model.py`)")


def report(run: Path, md_path: Path, png_path: Path, ours_name: str = "sglserve", model: str = MODEL_8B) -> str:
    bare, ours = load(run / "bare"), load(run / ours_name)
    rows = random_rows(bare, ours)
    env = (run / ours_name / "env.txt") if (run / ours_name / "env.txt").exists() else run / "bare" / "env.txt"
    gpu = gpu_name(env)
    lines = [f"# sglserve vs `python -m sglang.launch_server`, measured by SGLang's own benchmark ({gpu})", ""]
    lines += ["Both servers ran on the same GPU machine, one after the other in one lease (the order is in the notes), "
              "with the same engine settings, and were driven by the same unmodified "
              "`sglang.benchmark.serving` (`bench/gpu/bench_serving_sweep.py` calls its `cli_main` once per step). "
              "Produced by `scripts/gpu/bench_vs_launch_server.sh` (see docs/gpu-benchmark.md); raw records: "
              f"`{run.name}/{{bare,{ours_name}}}/results.jsonl`.", ""]
    if env.exists():
        lines += ["**Machine and versions** (the device's own report):", "", "```", env.read_text().strip(), "```", ""]
    for side in ("bare", ours_name):
        cmd = run / side / "command.txt"
        if cmd.exists():
            lines += [f"**{side} command**: `{cmd.read_text().strip()}`", ""]
    lines += ["**Workload**: random-ids dataset, 1024 input / 256 output tokens (exact, `--random-range-ratio 1`), "
              "`ignore_eos`, greedy, `--request-rate inf` with `--max-concurrency` c; prompts per step: "
              f"8 (c=1), 32 (c=8), 128 (c=32), 384 (c=128); 2 warm-up requests per step. Model: {model}. "
              "The runs are short (GPU time is scarce: 30 device-minutes for the whole session), so "
              "differences of a few percent at c=1/8 are within run-to-run noise.", ""]
    if rows:
        lines += ["## Random 1024/256: per backend and concurrency", "",
                  "| backend | c | launch_server out tok/s | sglserve out tok/s | **ratio** | TTFT p50 bare / ours (ms) | "
                  "ΔTTFT p50 | ΔTTFT p99 | ITL p50 bare / ours (ms) | ΔITL p50 | ΔITL p99 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            b, s = r["bare"], r["ours"]
            lines.append(
                f"| {r['backend']} | {r['c']} | {fmt(b['output_throughput'])} | {fmt(s['output_throughput'])} | "
                f"**{r['ratio']:.3f}** | {fmt(b['median_ttft_ms'], 2)} / {fmt(s['median_ttft_ms'], 2)} | "
                f"{r['d_ttft50']:+.2f} | {r['d_ttft99']:+.2f} | {fmt(b['median_itl_ms'], 2)} / "
                f"{fmt(s['median_itl_ms'], 2)} | {r['d_itl50']:+.2f} | {r['d_itl99']:+.2f} |")
        lines += ["", f"![ratios and differences]({png_path.name})", "", "## Targets", ""] + verdicts(rows) + [""]
    lines += answers_section(run / "bare", run / ours_name, run / "hf_reference")
    gsp = [(bare.get(("gsp", "sglang", "c32")), ours.get(("gsp", "sglang", "c32")))]
    if all(gsp[0]):
        b, s = gsp[0]
        lines += ["## Generated shared prefix (native backend, c=32, --cache-report)", "",
                  "8 groups x 16 prompts, 2,048-token system prompt per group, 128-token question, 64 out.", "",
                  "| server | cache hit rate | cached / prompt tokens | out tok/s | TTFT p50 (ms) |", "|---|---|---|---|---|"]
        for name, rec in (("launch_server", b), ("sglserve", s)):
            cr = rec.get("cache_report") or {}
            lines.append(f"| {name} | {cr.get('cache_hit_rate_pct', '-')}% | {cr.get('total_cached_tokens', '-')} / "
                         f"{cr.get('total_prompt_tokens', '-')} | {fmt(rec['output_throughput'])} | "
                         f"{fmt(rec['median_ttft_ms'], 2)} |")
        lines.append("")
    rates = sorted({k[2] for k in set(bare) & set(ours) if k[0] == "rate"}, key=lambda p: float(p[1:]))
    if rates:
        lines += ["## Request-rate sweep (OpenAI backend, Poisson arrivals)", "",
                  "| rate (req/s) | out tok/s bare / ours | TTFT p50 bare / ours | ITL p50 bare / ours |", "|---|---|---|---|"]
        for p in rates:
            b, s = bare[("rate", "sglang-oai", p)], ours[("rate", "sglang-oai", p)]
            lines.append(f"| {p[1:]} | {fmt(b['output_throughput'])} / {fmt(s['output_throughput'])} | "
                         f"{fmt(b['median_ttft_ms'], 2)} / {fmt(s['median_ttft_ms'], 2)} | "
                         f"{fmt(b['median_itl_ms'], 2)} / {fmt(s['median_itl_ms'], 2)} |")
        lines.append("")
    for variant in sorted(d for d in run.iterdir() if d.is_dir() and d.name not in ("bare", ours_name, "hf_reference")):
        vrows = random_rows(bare, load(variant))
        if not vrows:
            continue
        lines += [f"## Variant `{variant.name}` vs launch_server (same machine, same lease, run after the main pair)", "",
                  "| backend | c | launch_server out tok/s | variant out tok/s | ratio | ΔTTFT p50 | ITL p50 bare / variant (ms) | ΔITL p99 |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in vrows:
            b, s = r["bare"], r["ours"]
            lines.append(f"| {r['backend']} | {r['c']} | {fmt(b['output_throughput'])} | {fmt(s['output_throughput'])} | "
                         f"{r['ratio']:.3f} | {r['d_ttft50']:+.2f} | {fmt(b['median_itl_ms'], 2)} / "
                         f"{fmt(s['median_itl_ms'], 2)} | {r['d_itl99']:+.2f} |")
        lines.append("")
    missing = sorted((set(bare) ^ set(ours)))
    if missing:
        lines += [f"Steps measured on one side only (not compared): {', '.join('|'.join(k) for k in missing)}", ""]
    if rows:
        plot(rows, png_path, f"sglserve (Ray Serve + sglang.Engine) vs python -m sglang.launch_server, same {gpu}, "
                             "sglang.benchmark.serving random-ids 1024/256")
    md_path.write_text("\n".join(lines) + "\n")
    return md_path.read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).parent
    parser.add_argument("--run", type=Path, default=here / "vs_launch_server")
    parser.add_argument("--md", type=Path, default=here / "results_vs_launch_server.md")
    parser.add_argument("--png", type=Path, default=here / "results_vs_launch_server.png")
    parser.add_argument("--ours", default="sglserve", help="the folder of the main sglserve side")
    parser.add_argument("--model", default=MODEL_8B, help="the model, as the report should describe it")
    parser.add_argument("--notes", type=Path, help="Markdown appended as is (analysis written after the run)")
    args = parser.parse_args()
    text = report(args.run, args.md, args.png, args.ours, args.model)
    if args.notes and args.notes.exists():
        args.md.write_text(text + "\n" + args.notes.read_text())
    print(args.md.read_text())


if __name__ == "__main__":
    main()
