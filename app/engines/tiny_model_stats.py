"""How decisive the tiny model is: the figures behind its init scales (see `tiny_model`).

`python -m app.engines.tiny_model_stats [--cache-dir DIR]` greedy-decodes a fixed set of prompts
(corpus excerpts and chat prompts), one by one and then as one left-padded batch, and prints:
- the top-1 minus top-2 logit gap over every greedy step (median, 1st percentile, minimum), also
  relative to the logits' standard deviation;
- the largest logit difference between batched and single-sequence runs, and how many greedy
  tokens it flipped (the point of a wide gap: the flips must be zero);
- how long greedy runs last, how many end with EOS, how varied their tokens are;
- lengths of runs sampled at temperature 1.
"""

from __future__ import annotations

import argparse
import random
import statistics
from typing import Any

from app.engines.tiny_model import CORPUS_PATH, ensure_tiny_model


def measure_decisiveness(
    model_dir: str, *, num_prompts: int = 40, max_new_tokens: int = 128, seed: int = 0
) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = _prompts(tokenizer, num_prompts, seed)
    eos_ids = set(model.generation_config.eos_token_id)
    greedy = {"do_sample": False, "max_new_tokens": max_new_tokens, "output_logits": True,
              "return_dict_in_generate": True}

    gaps: list[float] = []
    relative_gaps: list[float] = []
    lengths: list[int] = []
    ended_with_eos = 0
    distinct_ratios: list[float] = []
    single_logits: list[torch.Tensor] = []
    with torch.no_grad():
        for prompt in prompts:
            inputs = tokenizer(prompt, return_tensors="pt")
            out = model.generate(**inputs, **greedy)
            tokens = out.sequences[0, inputs.input_ids.shape[1]:].tolist()
            logits = torch.cat(out.logits)  # (steps, vocab)
            single_logits.append(logits)
            top2 = logits.topk(2, dim=-1).values
            gap = top2[:, 0] - top2[:, 1]
            gaps += gap.tolist()
            relative_gaps += (gap / logits.std(dim=-1)).tolist()
            lengths.append(len(tokens))
            ended_with_eos += tokens[-1] in eos_ids
            distinct_ratios.append(len(set(tokens)) / len(tokens))

        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        batched = torch.stack(model.generate(**batch, **greedy).logits, dim=1)  # (batch, steps, vocab)
        max_difference, flips = 0.0, 0
        for row, logits in zip(batched, single_logits):
            steps = logits.shape[0]
            max_difference = max(max_difference, (row[:steps] - logits).abs().max().item())
            flips += int((row[:steps].argmax(-1) != logits.argmax(-1)).sum())

        torch.manual_seed(seed)
        sampled_lengths = []
        for prompt in prompts[:10]:
            inputs = tokenizer(prompt, return_tensors="pt")
            out = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=2 * max_new_tokens)
            sampled_lengths.append(out.shape[1] - inputs.input_ids.shape[1])

    return {
        "greedy_steps": len(gaps),
        "gap_median": statistics.median(gaps),
        "gap_p1": _percentile(gaps, 0.01),
        "gap_min": min(gaps),
        "relative_gap_median": statistics.median(relative_gaps),
        "relative_gap_p1": _percentile(relative_gaps, 0.01),
        "logit_std_median": statistics.median(float(l.std()) for l in single_logits),
        "batched_vs_single_max_abs_logit_diff": max_difference,
        "batched_vs_single_argmax_flips": flips,
        "greedy_length_median": statistics.median(lengths),
        "greedy_lengths": lengths,
        "greedy_ended_with_eos": f"{ended_with_eos}/{len(prompts)}",
        "greedy_distinct_token_ratio_median": statistics.median(distinct_ratios),
        "sampled_t1_lengths": sampled_lengths,
    }


def _prompts(tokenizer: Any, count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = [line.strip() for line in CORPUS_PATH.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if len(line) > 20]
    chats = count // 10
    prompts = [rng.choice(lines)[: rng.randint(10, 80)] for _ in range(count - chats)]
    prompts += [
        tokenizer.apply_chat_template([{"role": "user", "content": rng.choice(lines)[:60]}],
                                      add_generation_prompt=True, tokenize=False)
        for _ in range(chats)
    ]
    return prompts


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    stats = measure_decisiveness(ensure_tiny_model(args.cache_dir), num_prompts=args.prompts,
                                 max_new_tokens=args.max_new_tokens)
    for key, value in stats.items():
        print(f"{key:40s} {value:.3g}" if isinstance(value, float) else f"{key:40s} {value}")


if __name__ == "__main__":
    main()
