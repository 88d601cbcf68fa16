"""Runs SGLang's own load generator (`sglang.benchmark.serving`, unmodified) over one server for the
whole sweep of the side-by-side comparison, in ONE Python process: each step is the same argument
list `python -m sglang.benchmark.serving ...` would get, handed to its `cli_main()`, so the
benchmark's imports and tokenizer load are paid once instead of per step (GPU time is scarce).

Steps (each appends one JSON line, SGLang's own result record, to --out; `tag` names the step):
- random-ids, 1024 in / 256 out (exact lengths), max concurrency 1, 8, 32, 128, for the OpenAI
  completions backend (`sglang-oai`) and the native backend (`sglang`);
- generated-shared-prefix (native backend, --cache-report): prompts in groups sharing a long system
  prompt, so the prefix cache's hit rate can be compared between servers;
- optionally (--rates) an open-loop request-rate sweep (Poisson arrivals) on the OpenAI backend.

    python bench/gpu/bench_serving_sweep.py --side bare --port 30000 --model <dir> --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

CONCURRENCIES = (1, 8, 32, 128)
BACKENDS = ("sglang-oai", "sglang")
# Prompts per step: enough for several waves at each concurrency, short enough for a GPU budget
# of minutes (~5-25 s per step on an H100 with the 8B shape).
PROMPTS = {1: 8, 8: 32, 32: 128, 128: 384}


def steps(args) -> list[tuple[str, list[str]]]:
    common = ["--host", "127.0.0.1", "--port", str(args.port), "--model", args.served_name,
              "--tokenizer", args.model, "--seed", "1", "--disable-tqdm", "--warmup-requests", "2",
              "--output-file", str(args.out)]
    random = ["--dataset-name", "random-ids", "--random-input-len", str(args.input_len),
              "--random-output-len", str(args.output_len), "--random-range-ratio", "1.0"]
    out = []
    for backend in args.backends:
        for conc in args.concurrencies:
            n = max(args.min_prompts, int(PROMPTS.get(conc, 4 * conc) * args.prompt_scale))
            tag = f"{args.side}|random|{backend}|c{conc}"
            out.append((tag, ["--backend", backend, *random, "--num-prompts", str(n),
                              "--max-concurrency", str(conc), "--request-rate", "inf",
                              "--tag", tag, *common]))
    if args.gsp:
        tag = f"{args.side}|gsp|sglang|c32"
        out.append((tag, ["--backend", "sglang", "--dataset-name", "generated-shared-prefix",
                          "--gsp-num-groups", "8", "--gsp-prompts-per-group", "16",
                          "--gsp-system-prompt-len", "2048", "--gsp-question-len", "128",
                          "--gsp-output-len", "64", "--num-prompts", "128", "--max-concurrency", "32",
                          "--cache-report", "--tag", tag, *common]))
    for rate in args.rates:
        tag = f"{args.side}|rate|sglang-oai|r{rate:g}"
        out.append((tag, ["--backend", "sglang-oai", *random, "--num-prompts", str(args.rate_prompts),
                          "--request-rate", str(rate), "--max-concurrency", "512", "--tag", tag,
                          *common]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", required=True, help="bare | sglserve (recorded in each tag)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True, help="the model directory (its tokenizer is used)")
    parser.add_argument("--served-name", default="llama8b-shape")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS))
    parser.add_argument("--concurrencies", nargs="+", type=int, default=list(CONCURRENCIES))
    parser.add_argument("--prompt-scale", type=float, default=1.0)
    parser.add_argument("--min-prompts", type=int, default=8)
    parser.add_argument("--no-gsp", dest="gsp", action="store_false")
    parser.add_argument("--rates", nargs="*", type=float, default=[])
    parser.add_argument("--rate-prompts", type=int, default=192)
    parser.add_argument("--deadline-s", type=float, default=1e9, help="skip steps once this has passed")
    parser.add_argument("--dry-run", action="store_true", help="print the steps only")
    args = parser.parse_args()

    plan = steps(args)
    if args.dry_run:
        for tag, argv in plan:
            print(tag, "::", "python -m sglang.benchmark.serving", " ".join(argv))
        return 0
    from sglang.benchmark import serving  # imported once for all steps

    started, failures = time.monotonic(), 0
    for tag, argv in plan:
        if time.monotonic() - started > args.deadline_s:
            print(f"[sweep] deadline reached, skipping {tag}", flush=True)
            continue
        print(f"[sweep] {tag}: python -m sglang.benchmark.serving {' '.join(argv)}", flush=True)
        t0 = time.monotonic()
        sys.argv = ["sglang.benchmark.serving", *argv]
        try:
            serving.cli_main()
        except BaseException as exc:  # SystemExit included: one failed step must not end the sweep
            failures += 1
            print(f"[sweep] {tag} FAILED: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
            with open(args.out.with_suffix(".failures"), "a") as f:
                f.write(json.dumps({"tag": tag, "error": f"{type(exc).__name__}: {exc}"}) + "\n")
        print(f"[sweep] {tag} took {time.monotonic() - t0:.1f}s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
