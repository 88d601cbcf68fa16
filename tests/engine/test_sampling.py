"""Specification of next-token sampling (app/engines/embedded/sampling.py) on crafted logits."""

from __future__ import annotations

import math

import pytest
import torch

from app.engines.embedded.sampling import (
    SequenceSampler,
    sample_next_tokens,
    token_logprobs,
)
from app.protocol import SamplingParams

torch.set_num_threads(1)

VOCAB = 16
EOS = 15


def sampler(prompt: list[int] | None = None, **params) -> SequenceSampler:
    return SequenceSampler(SamplingParams(**params), prompt or [], VOCAB, [EOS])


def sample(logits: torch.Tensor, samplers: list[SequenceSampler], allowed=None, nums=None):
    return sample_next_tokens(logits, samplers, allowed, nums or [0] * len(samplers))


def draw_many(logits_row: torch.Tensor, n: int, **params) -> torch.Tensor:
    """Counts per token over n draws: the same row sampled by n differently seeded sequences."""
    counts = torch.zeros(VOCAB)
    samplers = [sampler(seed=1234 + i, **params) for i in range(n)]
    result = sample(logits_row.expand(n, -1).clone(), samplers)
    for t in result.token_ids:
        counts[t] += 1
    return counts


# --- greedy ---------------------------------------------------------------------------------


def test_greedy_is_argmax_of_each_row():
    logits = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(0))
    result = sample(logits, [sampler(temperature=0.0) for _ in range(8)])
    assert result.token_ids == logits.argmax(dim=-1).tolist()


def test_top_k_one_is_greedy_even_with_temperature():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1))
    result = sample(logits, [sampler(temperature=5.0, top_k=1) for _ in range(4)])
    assert result.token_ids == logits.argmax(dim=-1).tolist()


# --- top-k / top-p / min-p ------------------------------------------------------------------


def probs_logits(probs: list[float]) -> torch.Tensor:
    padded = probs + [0.0] * (VOCAB - len(probs))
    return torch.tensor(padded).clamp_min(1e-30).log()


def support(logits_row: torch.Tensor, n: int = 400, **params) -> set[int]:
    counts = draw_many(logits_row, n, **params)
    return {i for i in range(VOCAB) if counts[i] > 0}


def test_top_k_keeps_exactly_the_k_most_likely():
    row = probs_logits([0.3, 0.25, 0.2, 0.15, 0.1])
    assert support(row, top_k=2) == {0, 1}
    assert support(row, top_k=-1) == {0, 1, 2, 3, 4}


def test_top_p_keeps_smallest_prefix_reaching_p():
    row = probs_logits([0.5, 0.3, 0.15, 0.05])
    # Mass before token 1 is 0.5 < 0.6 (kept); before token 2 it is 0.8 > 0.6 (dropped).
    assert support(row, top_p=0.6) == {0, 1}


def test_top_p_boundary_follows_mass_before_token():
    row = probs_logits([0.5, 0.3, 0.15, 0.05])
    assert support(row, top_p=0.49) == {0}
    assert support(row, top_p=0.81) == {0, 1, 2}


def test_min_p_drops_tokens_below_fraction_of_the_best():
    row = probs_logits([0.4, 0.3, 0.21, 0.09])
    # Threshold 0.5 * 0.4 = 0.2: tokens above it stay.
    assert support(row, min_p=0.5) == {0, 1, 2}
    assert support(row, min_p=0.9) == {0}


def test_temperature_zero_to_one_sharpens_distribution():
    row = probs_logits([0.6, 0.4])
    hot = draw_many(row, 2000, temperature=1.0)
    cold = draw_many(row, 2000, temperature=0.25)
    assert cold[0] / 2000 > hot[0] / 2000 + 0.2  # 0.6 -> 0.6^4/(0.6^4+0.4^4) ~ 0.835


def test_sampled_frequencies_match_probabilities():
    probs = [0.5, 0.25, 0.125, 0.0625, 0.0625]
    n = 4000
    counts = draw_many(probs_logits(probs), n)
    chi2 = sum((counts[i].item() - n * p) ** 2 / (n * p) for i, p in enumerate(probs))
    # 4 degrees of freedom: P(chi2 > 18.5) ~ 0.001; the seeds are fixed so this is deterministic.
    assert chi2 < 18.5, f"chi-square {chi2:.1f} for counts {counts[:5].tolist()}"
    assert counts[5:].sum() == 0


# --- penalties ------------------------------------------------------------------------------


def test_frequency_and_presence_penalties_count_output_tokens_only():
    s = sampler(prompt=[3, 3, 3], temperature=0.0, frequency_penalty=0.5, presence_penalty=0.25)
    for t in (1, 1, 2):
        s.observe(t)
    logits = torch.zeros(1, VOCAB)
    logits[0, 1] = 2.0  # 2 - 0.5*2 - 0.25 = 0.75
    logits[0, 2] = 1.5  # 1.5 - 0.5 - 0.25 = 0.75 - eps below
    logits[0, 3] = 0.8  # prompt token: not penalised
    logits[0, 2] -= 0.01
    assert sample(logits, [s]).token_ids == [3]
    logits[0, 3] = 0.7
    assert sample(logits, [s]).token_ids == [1]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    s = sampler(prompt=[1], temperature=0.0, repetition_penalty=2.0)
    s.observe(2)
    logits = torch.full((1, VOCAB), -10.0)
    logits[0, 1] = 3.0  # seen in prompt: 1.5
    logits[0, 4] = 1.6  # unseen
    assert sample(logits, [s]).token_ids == [4]
    logits = torch.full((1, VOCAB), -10.0)
    logits[0, 2] = -1.0  # seen in output: -2.0
    logits[0, 5] = -1.5  # unseen
    assert sample(logits, [s]).token_ids == [5]


def test_penalties_apply_only_to_their_own_row():
    penalised = sampler(temperature=0.0, presence_penalty=2.0)
    plain = sampler(temperature=0.0)
    penalised.observe(0)
    plain.observe(0)
    logits = torch.zeros(2, VOCAB)
    logits[:, 0] = 1.0
    assert sample(logits, [penalised, plain]).token_ids[1] == 0
    assert sample(logits, [penalised, plain]).token_ids[0] != 0


# --- min_new_tokens and grammar masks -------------------------------------------------------


def test_min_new_tokens_masks_eos_and_stop_ids_until_reached():
    s = SequenceSampler(
        SamplingParams(temperature=0.0, min_new_tokens=2, stop_token_ids=[7]), [], VOCAB, [EOS]
    )
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 10.0
    logits[0, 7] = 9.0
    logits[0, 4] = 1.0
    assert sample(logits, [s]).token_ids == [4]
    s.observe(4)
    assert sample(logits, [s]).token_ids == [4]
    s.observe(4)
    assert sample(logits, [s]).token_ids == [EOS]


def test_grammar_mask_restricts_choice_for_greedy_and_sampled_rows():
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(3))
    allowed = torch.zeros(2, VOCAB, dtype=torch.bool)
    allowed[:, [2, 9]] = True
    for _ in range(20):
        result = sample(logits, [sampler(temperature=0.0), sampler(temperature=2.0)], allowed)
        assert set(result.token_ids) <= {2, 9}
    greedy = sample(logits, [sampler(temperature=0.0)] * 2, allowed).token_ids[0]
    assert greedy == (2 if logits[0, 2] > logits[0, 9] else 9)


def test_grammar_wins_over_min_new_tokens_when_only_stop_is_allowed():
    s = sampler(temperature=0.0, min_new_tokens=5)
    allowed = torch.zeros(1, VOCAB, dtype=torch.bool)
    allowed[0, EOS] = True
    assert sample(torch.zeros(1, VOCAB), [s], allowed).token_ids == [EOS]


# --- reproducibility ------------------------------------------------------------------------


def test_seeded_draws_do_not_depend_on_batch_composition():
    gen = torch.Generator().manual_seed(5)
    steps = [torch.randn(VOCAB, generator=gen) for _ in range(30)]

    def run(batch_size: int, position: int) -> list[int]:
        target = sampler(seed=42, temperature=1.3, top_p=0.9)
        others = [sampler(temperature=1.0) for _ in range(batch_size - 1)]
        tokens = []
        for row in steps:
            logits = torch.randn(batch_size, VOCAB)  # neighbours' logits vary freely
            logits[position] = row
            batch = others[:position] + [target] + others[position:]
            token = sample(logits, batch).token_ids[position]
            target.observe(token)
            tokens.append(token)
        return tokens

    alone = run(1, 0)
    assert run(5, 3) == alone
    assert run(3, 0) == alone
    assert len(set(alone)) > 3  # it really sampled


def test_unseeded_sequences_get_different_streams():
    row = torch.zeros(1, VOCAB)
    a = [sample(row, [s]).token_ids[0] for s in [sampler()] for _ in range(20)]
    b = [sample(row, [s]).token_ids[0] for s in [sampler()] for _ in range(20)]
    assert a != b


# --- logprobs -------------------------------------------------------------------------------


def test_logprobs_are_log_softmax_of_raw_logits_despite_temperature_and_penalties():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(7))
    s = [sampler(temperature=0.0), sampler(temperature=0.3, seed=1), sampler(
        temperature=0.0, frequency_penalty=1.0)]
    s[2].observe(4)
    result = sample(logits, s, nums=[3, 0, 5])
    expected = torch.log_softmax(logits, dim=-1)
    for i, token in enumerate(result.token_ids):
        assert result.logprobs[i] == pytest.approx(expected[i, token].item(), abs=1e-6)
    assert [len(t) for t in result.top_logprobs] == [3, 0, 5]
    for i, top in enumerate(result.top_logprobs):
        values = [v for v, _ in top]
        assert values == sorted(values, reverse=True)
        best = torch.topk(expected[i], len(top))
        assert [tid for _, tid in top] == best.indices.tolist()


def test_token_logprobs_scores_given_targets():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(8))
    targets = torch.tensor([0, 5, 9, 15])
    values, tops = token_logprobs(logits, targets, top_n=2)
    expected = torch.log_softmax(logits, dim=-1)
    for t in range(4):
        assert values[t] == pytest.approx(expected[t, targets[t]].item(), abs=1e-6)
        assert tops[t][0][1] == int(expected[t].argmax())
        assert tops[t][0][0] >= tops[t][1][0]
    assert token_logprobs(logits, targets, top_n=0)[1] == [[], [], [], []]
    assert all(math.isfinite(v) for v in values)
