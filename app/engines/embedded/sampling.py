"""Next-token sampling for the embedded engine, with SGLang's semantics and parameter names.

One `SequenceSampler` per running sequence holds what sampling needs to remember about it: its
`SamplingParams`, the tokens seen so far (for penalties), how many tokens it has produced (for
`min_new_tokens`) and its own random generator. `sample_next_tokens` turns one batch of raw logits
into one token per row.

Per row, in this order (SGLang's order):
1. penalties: `repetition_penalty` (HF/SGLang style: a seen token's logit is divided by it when
   positive, multiplied when negative; "seen" = in the prompt or the output), then OpenAI-style
   `frequency_penalty` (minus penalty * count in the output) and `presence_penalty` (minus penalty
   if it occurred in the output at all);
2. `min_new_tokens`: EOS and `stop_token_ids` get -inf until that many tokens were produced;
3. the grammar mask (`allowed`, True = allowed) sets every other token to -inf. The grammar wins a
   conflict: if the grammar allows only stop tokens that `min_new_tokens` forbids, the
   `min_new_tokens` mask is dropped for that row (a constrained output cannot go on anyway);
4. greedy rows (`temperature == 0` or `top_k == 1`) take the argmax of those logits;
5. other rows: divide by temperature, softmax, keep the `top_k` most likely tokens (-1/0 = all),
   then the smallest prefix of them whose mass reaches `top_p`, then drop tokens with probability
   below `min_p` times the most likely one's, and draw from what is left.

Reproducibility. A seeded request must produce the same tokens whatever else is in the batch, so
each row draws from its own `torch.Generator` (seeded from `params.seed`; an unseeded request gets
a random seed). The draw is an exponential race: with E_i ~ Exp(1) from the row's generator,
argmax_i p_i / E_i is distributed exactly as Categorical(p). It consumes exactly `vocab_size`
numbers per step whatever the probabilities are, so a row's random stream depends on nothing but
its own seed and step count.

Logprobs. `SampleResult.logprobs` and `top_logprobs` are `log_softmax` of the RAW logits (before
penalties, grammar masks, temperature and top-k/top-p), which is what SGLang returns by default:
they describe the model, not the sampler.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from app.protocol import SamplingParams

NEG_INF = float("-inf")


class SequenceSampler:
    """Sampling state of one sequence: parameters, penalty history, output count, generator."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: list[int],
        vocab_size: int,
        eos_token_ids: list[int],
    ) -> None:
        self.params = params
        self.vocab_size = vocab_size
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.num_output_tokens = 0
        # Tokens that min_new_tokens holds back: EOS ids and the request's own stop ids.
        self.stop_token_ids = sorted(
            {t for t in [*eos_token_ids, *params.stop_token_ids] if 0 <= t < vocab_size}
        )
        self._generators: dict[torch.device, torch.Generator] = {}
        # Dense per-token state, allocated only for the penalties a request actually uses.
        self._output_counts: torch.Tensor | None = None  # float32 [V]: occurrences in the output
        self._seen: torch.Tensor | None = None  # bool [V]: in prompt or output
        if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
            self._output_counts = torch.zeros(vocab_size, dtype=torch.float32)
        if params.repetition_penalty != 1.0:
            self._seen = torch.zeros(vocab_size, dtype=torch.bool)
            ids = torch.tensor([t for t in prompt_ids if 0 <= t < vocab_size], dtype=torch.long)
            self._seen[ids] = True

    @property
    def is_greedy(self) -> bool:
        return self.params.is_greedy

    @property
    def has_output_penalties(self) -> bool:
        return self._output_counts is not None

    @property
    def has_repetition_penalty(self) -> bool:
        return self._seen is not None

    @property
    def holds_back_stop_tokens(self) -> bool:
        return self.num_output_tokens < self.params.min_new_tokens and bool(self.stop_token_ids)

    def observe(self, token_id: int) -> None:
        """Record an accepted output token."""
        self.num_output_tokens += 1
        if not 0 <= token_id < self.vocab_size:
            return
        if self._output_counts is not None:
            self._output_counts[token_id] += 1.0
        if self._seen is not None:
            self._seen[token_id] = True

    def generator(self, device: torch.device) -> torch.Generator:
        """This sequence's generator on `device` (created and seeded on first use)."""
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[device] = gen
        return gen

    def output_counts(self) -> torch.Tensor:
        assert self._output_counts is not None, "no frequency/presence penalty on this sequence"
        return self._output_counts

    def seen_mask(self) -> torch.Tensor:
        assert self._seen is not None, "no repetition penalty on this sequence"
        return self._seen


@dataclass
class SampleResult:
    token_ids: list[int]  # one per row
    logprobs: list[float]  # log_softmax of the RAW logits at the chosen token
    top_logprobs: list[list[tuple[float, int]]]  # per row, top-N (N = that row's num; [] if 0)


def sample_next_tokens(
    logits: torch.Tensor,
    samplers: list[SequenceSampler],
    allowed: torch.Tensor | None,
    top_logprobs_nums: list[int],
) -> SampleResult:
    """Choose one token per row of `logits` ([B, V] raw logits; row i belongs to samplers[i]).

    `allowed` is an optional [B, V] bool grammar mask (True = allowed). See the module docstring
    for the order of operations. A row with nothing left to choose (an empty grammar mask) gets
    its first stop token, or token 0 if it has none.
    """
    batch, vocab = logits.shape
    assert len(samplers) == batch, f"{batch} logit rows but {len(samplers)} samplers"
    assert len(top_logprobs_nums) == batch, f"{batch} rows but {len(top_logprobs_nums)} top-N"
    raw = logits.float()
    raw_logprobs = torch.log_softmax(raw, dim=-1)

    scores = _apply_penalties(raw, samplers)
    scores = _apply_constraints(scores, samplers, allowed)

    chosen = torch.argmax(scores, dim=-1)
    random_rows = [i for i, s in enumerate(samplers) if not s.is_greedy]
    if random_rows:
        rows = torch.tensor(random_rows, dtype=torch.long, device=scores.device)
        chosen[rows] = _sample_rows(scores[rows], [samplers[i] for i in random_rows])

    # A row whose every token is -inf has no valid choice: fall back deterministically.
    dead = torch.isneginf(scores).all(dim=-1)
    if bool(dead.any()):
        for i in torch.nonzero(dead).flatten().tolist():
            stops = samplers[i].stop_token_ids
            chosen[i] = stops[0] if stops else 0

    token_logprobs = raw_logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
    return SampleResult(
        token_ids=chosen.tolist(),
        logprobs=token_logprobs.tolist(),
        top_logprobs=_top_n(raw_logprobs, top_logprobs_nums),
    )


def token_logprobs(
    logits: torch.Tensor, target_ids: torch.Tensor, top_n: int
) -> tuple[list[float], list[list[tuple[float, int]]]]:
    """Logprobs of given tokens (e.g. input tokens): row t of `logits` [T, V] scores target_ids[t].

    Returns (logprob of each target, top-`top_n` (logprob, id) pairs per row, or [] when 0).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(1, target_ids.to(logprobs.device).long().view(-1, 1)).squeeze(1)
    return picked.tolist(), _top_n(logprobs, [top_n] * logprobs.shape[0])


def _apply_penalties(raw: torch.Tensor, samplers: list[SequenceSampler]) -> torch.Tensor:
    """Return penalised logits (a copy only if some row is penalised)."""
    rep_rows = [i for i, s in enumerate(samplers) if s.has_repetition_penalty]
    out_rows = [i for i, s in enumerate(samplers) if s.has_output_penalties]
    if not rep_rows and not out_rows:
        return raw
    scores = raw.clone()
    device = scores.device
    if rep_rows:
        idx = torch.tensor(rep_rows, dtype=torch.long, device=device)
        seen = torch.stack([samplers[i].seen_mask() for i in rep_rows]).to(device)
        penalty = torch.tensor(
            [samplers[i].params.repetition_penalty for i in rep_rows], device=device
        ).unsqueeze(1)
        rows = scores[idx]
        penalised = torch.where(rows > 0, rows / penalty, rows * penalty)
        scores[idx] = torch.where(seen, penalised, rows)
    if out_rows:
        idx = torch.tensor(out_rows, dtype=torch.long, device=device)
        counts = torch.stack([samplers[i].output_counts() for i in out_rows]).to(device)
        freq = torch.tensor([samplers[i].params.frequency_penalty for i in out_rows], device=device)
        pres = torch.tensor([samplers[i].params.presence_penalty for i in out_rows], device=device)
        scores[idx] = (
            scores[idx] - freq.unsqueeze(1) * counts - pres.unsqueeze(1) * (counts > 0).float()
        )
    return scores


def _apply_constraints(
    scores: torch.Tensor, samplers: list[SequenceSampler], allowed: torch.Tensor | None
) -> torch.Tensor:
    """Apply the grammar mask and min_new_tokens; the grammar wins where they conflict."""
    held_rows = [i for i, s in enumerate(samplers) if s.holds_back_stop_tokens]
    if allowed is None and not held_rows:
        return scores
    scores = scores.clone()
    if allowed is not None:
        assert allowed.shape == scores.shape, f"mask {tuple(allowed.shape)} vs {tuple(scores.shape)}"
        scores.masked_fill_(~allowed.to(scores.device), NEG_INF)
    for i in held_rows:
        stops = torch.tensor(samplers[i].stop_token_ids, dtype=torch.long, device=scores.device)
        row = scores[i].clone()
        row[stops] = NEG_INF
        if not bool(torch.isneginf(row).all()):  # else: only stop tokens are allowed; let them be
            scores[i] = row
    return scores


def _sample_rows(scores: torch.Tensor, samplers: list[SequenceSampler]) -> torch.Tensor:
    """Draw one token per row from temperature/top-k/top-p/min-p filtered probabilities."""
    device = scores.device
    temperature = torch.tensor([s.params.temperature for s in samplers], device=device)
    probs = torch.softmax(scores / temperature.unsqueeze(1), dim=-1)
    probs = _filter_probs(probs, samplers)
    # Exponential race, one independent stream per row (see the module docstring).
    races = torch.stack(
        [
            torch.empty(scores.shape[1], device=device).exponential_(generator=s.generator(device))
            for s in samplers
        ]
    )
    return torch.argmax(probs / races, dim=-1)


def _filter_probs(probs: torch.Tensor, samplers: list[SequenceSampler]) -> torch.Tensor:
    """Zero the probabilities that top_k, top_p and min_p exclude (no renormalisation needed:
    the exponential race samples proportionally to whatever mass is left)."""
    vocab = probs.shape[1]
    top_k = [s.params.top_k if s.params.top_k > 0 else vocab for s in samplers]
    top_p = [s.params.top_p for s in samplers]
    min_p = [s.params.min_p for s in samplers]
    if all(k >= vocab for k in top_k) and all(p >= 1.0 for p in top_p) and not any(min_p):
        return probs
    device = probs.device
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    rank = torch.arange(vocab, device=device).unsqueeze(0)
    drop = rank >= torch.tensor(top_k, device=device).unsqueeze(1)
    # Keep a token if the mass strictly before it is below top_p (so the first always stays).
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    drop |= mass_before > torch.tensor(top_p, device=device).unsqueeze(1)
    threshold = sorted_probs[:, :1] * torch.tensor(min_p, device=device).unsqueeze(1)
    drop |= sorted_probs < threshold
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)


def _top_n(logprobs: torch.Tensor, nums: list[int]) -> list[list[tuple[float, int]]]:
    """Per row, the `nums[i]` most likely (logprob, token_id) pairs, most likely first."""
    widest = min(max(nums, default=0), logprobs.shape[1])
    if widest <= 0:
        return [[] for _ in nums]
    values, ids = torch.topk(logprobs, widest, dim=-1)
    values_list, ids_list = values.tolist(), ids.tolist()
    return [
        list(zip(values_list[i][:n], ids_list[i][:n])) if n > 0 else []
        for i, n in enumerate(nums)
    ]
