"""Constrained decoding for the embedded engine: xgrammar masks plus budget-aware steering.

`GrammarCompiler` (one per engine) compiles `json_schema` / `regex` / `ebnf` specs with xgrammar,
bounded in size (`max_grammar_bytes`, else 413) and time (`compile_timeout_s`, else 422), caches
results by (kind, spec), and turns every failure into `app.errors.ValidationError` naming the
problem. `GrammarMatcher` (one per sequence) yields the allowed-token mask for each step.

Special tokens other than the stop tokens are never allowed: xgrammar would otherwise treat e.g.
`<|pad|>` as the literal text "<|pad|>", and it vanishes on decoding with skip_special_tokens.
Ids beyond the tokenizer (the model's logits may be wider) are never allowed either, nor, for
json_schema, tokens with raw control bytes (xgrammar's JSON strings admit them; JSON does not).

## Steering: finishing within `max_new_tokens`

A grammar mask alone lets a (random) model wander: inside a JSON string it may never emit the
closing quote, and the output is cut off unparsable when the budget runs out. Each matcher keeps a
*witness*: a byte string W such that the tokens so far followed by W form a complete sentence of
the grammar. Its cost c(W) is the fewest tokens spelling W exactly (dynamic programming over the
vocabulary's byte strings): an upper bound on the tokens needed, since xgrammar matches tokens by
bytes. With r tokens of budget left, the invariant is **c(W) <= r**.

Admission establishes it. Each compiled grammar carries the witness of the empty output, W0,
found once at compile time; `new_matcher` refuses (422, naming c(W0)) a budget below c(W0). c(W0)
is the cost of the shortest completion the search finds, not a proven minimum: a budget between
the true minimum and c(W0) is refused too; the search below makes that gap small in practice.

Each step keeps it:
- steering zone (slack r - c(W) below the margin): only tokens t for which we hold a witness for
  the state after t costing at most r - 1: "progress" tokens (t's bytes are a prefix of W and the
  rest of W costs at most r - 1) and "harmless" tokens (t followed by W still completes, checked
  on the matcher with accept + rollback, while c(W) <= r - 1), plus the stop tokens once the
  sentence is complete. The set is never empty while c(W) <= r (the first token of W's cheapest
  spelling is a progress token) and every member keeps the invariant: by induction the output is
  a complete sentence when the budget runs out.
- free zone (slack >= margin): the plain grammar mask. A token t keeps the invariant unless it
  raises the witness cost by more than the slack (a "jump": t commits to a dearer branch, e.g.
  an optional property whose value is a big object). The margin is `max(STEERING_MARGIN_TOKENS,
  2 * J + 2)` where J, per compiled grammar, is the largest jump known: seeded at compile time
  with the "spreads" of the start-witness search (at each choice point on W0's path, how much
  dearer the dearest choice's completion is than the cheapest: the jump a token taking it would
  cause) and raised by every jump observed while decoding. This zone is guarded by that bound,
  not checked token by token: checking every allowed token costs ~30 us each through xgrammar's
  Python API (~40 ms per step inside a JSON string), ~100x the plain mask. A jump past the margin
  (none in bench/results/grammar.md) is counted in `invariant_breaks`; the steering zone then
  takes the shortest path it knows, without a guarantee.

The witness search (`_find_witness`) is a greedy walk over single bytes on a fork of the matcher:
take xgrammar's jump-forward string when there is one, else try the allowed bytes in a fixed
preference order (closers `"` `}` `]` first, then `,`, digits, punctuation, letters, openers),
taking the first that leads to a state signature (allowed single bytes + jump-forward string +
completeness) not visited yet; when all lead back to visited ones (counted repetitions such as
`\\d{3}` or minLength, loops such as `[a-z]+ [A-Z]`) the least visited one. Escapes and non-ASCII
bytes are never preferred. With lookahead (used for every search), a step with 2 to 4 allowed
bytes (property names, enum values, alternatives) completes each choice greedily and keeps the
cheapest, which skips optional properties and long enum values. Witnesses are checked by
construction (the matcher accepted every byte and is complete), so a poor search costs slack or
a refused budget, never validity. After a token the witness is carried over without a search
when the token was a progress or harmless one; otherwise it is searched again (a failed search,
bounded by WITNESS_MAX_BYTES / WITNESS_MAX_NODES, leaves that step unsteered and is retried after
the next token).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import jsonschema
import torch
import xgrammar as xgr

from app.errors import PayloadTooLargeError, ValidationError

GRAMMAR_KINDS = ("json_schema", "regex", "ebnf")
# The cost of a byte string that no sequence of tokens spells (see _Vocabulary.suffix_costs).
UNSPELLABLE = 1 << 40
STEERING_MARGIN_TOKENS = 12
WITNESS_MAX_BYTES = 4096
WITNESS_MAX_NODES = 2000
CACHE_MAX_ENTRIES = 256
LOOKAHEAD_MAX_CHOICES = 4  # lookahead at steps with 2..4 allowed bytes (see _find_witness)

# OpenAI's response_format {"type": "json_object"}: any JSON object. Use with kind "ebnf".
# (A json_schema of {"type": "object"} would not do: xgrammar's strict mode forbids properties
# that the schema does not name.)

# Witness search: which allowed byte to try first (earlier = preferred). Closers end structures,
# separators and openers start new ones, so they come last.
_BYTE_PREFERENCE = (
    b"}])>\"'"
    + b","  # before digits and `.`/`e`: ends a number (`0,` not `0.0e0,`) once `}` is not allowed
    + b"0123456789"
    + b":;!?-_/@#$%&*+=|~^`<"
    + b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    + b". "
    + b"{[(\\"
    + b"\n\t\r"
)
# Bytes the novelty scan skips (they are still taken when nothing else continues).
_NO_NOVELTY_BYTES = frozenset([ord("\\")] + list(range(0x80, 0x100)))
# The novelty scan tries one byte per class (lower, upper, digit): where a choice among letters
# matters (property names, enums) there are few candidates and the lookahead decides instead.
_BYTE_CLASS = {
    **{b: 0 for b in range(ord("a"), ord("z") + 1)},
    **{b: 1 for b in range(ord("A"), ord("Z") + 1)},
    **{b: 2 for b in range(ord("0"), ord("9") + 1)},
}
_XGRAMMAR_LOCATION = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")


@dataclass
class CompiledGrammar:
    kind: str
    spec: str
    compiled: xgr.CompiledGrammar
    compile_time_s: float
    # Tokens this grammar never allows on top of the vocabulary's (see _compile_now).
    banned_tokens: torch.Tensor | None = None
    # The shortest completion of the empty output that the witness search found (None: the
    # search gave up), and its cost in tokens: the least max_new_tokens steering can guarantee.
    start_witness: bytes | None = None
    min_completion_tokens: int | None = None
    # Largest one-token rise of the witness cost seen in the free zone (steering margin input).
    max_witness_jump: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def note_witness_jump(self, jump: int) -> None:
        with self._lock:
            self.max_witness_jump = max(self.max_witness_jump, jump)

    @property
    def steering_margin_tokens(self) -> int:
        return max(STEERING_MARGIN_TOKENS, 2 * self.max_witness_jump + 2)


class _Vocabulary:
    """Byte strings of the tokens, as the grammar sees them, and what is never allowed."""

    def __init__(self, info: xgr.TokenizerInfo, hf_tokenizer, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.stop_token_ids = list(info.stop_token_ids)
        decoded = info.decoded_vocab
        special = set(getattr(hf_tokenizer, "all_special_ids", []))
        for token_id, added in getattr(hf_tokenizer, "added_tokens_decoder", {}).items():
            if getattr(added, "special", False):
                special.add(token_id)
        special -= set(self.stop_token_ids)
        self.never_allowed = torch.zeros(vocab_size, dtype=torch.bool)
        self.never_allowed[len(hf_tokenizer) :] = True
        self.never_allowed[[t for t in special if t < vocab_size]] = True
        self.token_bytes: dict[int, bytes] = {}
        self.id_of_bytes: dict[bytes, int] = {}
        for token_id in range(min(len(decoded), len(hf_tokenizer), vocab_size)):
            data = decoded[token_id]
            if token_id in special or token_id in self.stop_token_ids or not data:
                continue
            self.token_bytes[token_id] = data
            self.id_of_bytes.setdefault(data, token_id)
        self.max_token_bytes = max(len(b) for b in self.id_of_bytes)
        self.control_byte_tokens = torch.zeros(vocab_size, dtype=torch.bool)
        for token_id, data in self.token_bytes.items():
            if any(byte < 0x20 for byte in data):
                self.control_byte_tokens[token_id] = True
        # Byte-level vocabularies need not have every byte: SmolLM2's BPE alphabet lacks 21
        # (a few control bytes, 0xC0/0xC1 and 0xF1-0xFF, never seen in its training text), and
        # no token contains them. The witness search only walks bytes that have a token, and a
        # byte string using a missing byte costs UNSPELLABLE (see suffix_costs).
        self.single_byte_ids = {b[0]: i for b, i in self.id_of_bytes.items() if len(b) == 1}
        order = list(_BYTE_PREFERENCE) + [b for b in range(256) if b not in _BYTE_PREFERENCE]
        order = [b for b in order if b in self.single_byte_ids]
        self.byte_ids_by_preference = torch.tensor(
            [self.single_byte_ids[b] for b in order], dtype=torch.long
        )
        self.bytes_by_preference = order

    def suffix_costs(self, data: bytes) -> list[int]:
        """costs[i] = fewest tokens spelling data[i:] exactly (costs[len(data)] = 0).

        Dynamic programming over the vocabulary's byte strings. An upper bound on the tokens the
        model needs to emit those bytes, since xgrammar matches tokens by their bytes; a suffix no
        tokens spell (a byte missing from the vocabulary) costs at least UNSPELLABLE."""
        size = len(data)
        costs = [0] * (size + 1)
        for start in range(size - 1, -1, -1):
            best = UNSPELLABLE
            if data[start] in self.single_byte_ids:
                best = costs[start + 1] + 1
            for length in range(2, min(self.max_token_bytes, size - start) + 1):
                if data[start : start + length] in self.id_of_bytes:
                    best = min(best, costs[start + length] + 1)
            costs[start] = best
        return costs

    def token_cost(self, data: bytes) -> int:
        """Fewest tokens spelling `data` exactly (see suffix_costs)."""
        return self.suffix_costs(data)[0]

    def prefix_tokens(self, data: bytes) -> list[tuple[int, int]]:
        """(token id, byte length) of every token whose bytes are a prefix of `data`."""
        found = []
        for size in range(1, min(self.max_token_bytes, len(data)) + 1):
            token_id = self.id_of_bytes.get(data[:size])
            if token_id is not None:
                found.append((token_id, size))
        return found


def _bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    shifts = torch.arange(32, dtype=torch.int32)
    bits = (bitmask.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:vocab_size].bool()


class GrammarCompiler:
    """Compiles and caches grammars for one engine (one tokenizer, one logits width)."""

    def __init__(
        self,
        hf_tokenizer,
        vocab_size: int,
        max_grammar_bytes: int,
        compile_timeout_s: float,
        *,
        stop_token_ids: list[int] | None = None,
        max_threads: int = 2,
    ) -> None:
        if stop_token_ids is None:
            stop_token_ids = [hf_tokenizer.eos_token_id]
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            hf_tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids
        )
        self.vocabulary = _Vocabulary(self.tokenizer_info, hf_tokenizer, vocab_size)
        self.vocab_size = vocab_size
        self.max_grammar_bytes = max_grammar_bytes
        self.compile_timeout_s = compile_timeout_s
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_threads)
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar | ValidationError] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0

    async def compile(self, kind: str, spec: str) -> CompiledGrammar:
        """Compile (or fetch from the cache) a grammar; ValidationError (422/413) if it is bad."""
        if kind not in GRAMMAR_KINDS:
            raise ValidationError(f"unknown grammar kind {kind!r}; use one of {GRAMMAR_KINDS}")
        size = len(spec.encode())
        if size > self.max_grammar_bytes:
            raise PayloadTooLargeError(
                f"{kind} is {size} bytes, over the limit of {self.max_grammar_bytes} bytes",
                param=kind,
            )
        key = (kind, spec)
        cached = self._cache.get(key)
        if cached is not None:
            self.cache_hits += 1
            self._cache.move_to_end(key)
            if isinstance(cached, ValidationError):
                raise cached
            return cached
        self.cache_misses += 1
        try:
            compiled = await asyncio.wait_for(
                asyncio.to_thread(self._compile_now, kind, spec), self.compile_timeout_s
            )
        except TimeoutError:
            # The worker thread cannot be killed; it finishes in the background and is ignored.
            error = ValidationError(
                f"{kind} grammar compile exceeded {self.compile_timeout_s} s", param=kind
            )
            self._remember(key, error)  # do not let the same spec burn a thread again
            raise error from None
        except ValidationError as error:
            self._remember(key, error)
            raise
        self._remember(key, compiled)
        return compiled

    def new_matcher(
        self, compiled: CompiledGrammar, max_new_tokens: int, *, steering: bool = True
    ) -> GrammarMatcher:
        """A matcher for one sequence; `steering=False` gives the bare grammar mask (benchmarks).

        ValidationError (422) when steering is on and `max_new_tokens` is below the cost of the
        shortest completion the witness search found (`compiled.min_completion_tokens`): the
        output could not be guaranteed to finish, so the request is refused at admission."""
        needed = compiled.min_completion_tokens
        if steering and needed is not None and max_new_tokens < needed:
            raise ValidationError(
                f"max_new_tokens is {max_new_tokens} but the shortest output this {compiled.kind} "
                f"allows that the server can find takes {needed} tokens; raise max_new_tokens to "
                f"at least {needed}",
                param="max_new_tokens",
            )
        return GrammarMatcher(compiled, self.vocabulary, max_new_tokens, steering=steering)

    def _remember(self, key: tuple[str, str], value: CompiledGrammar | ValidationError) -> None:
        self._cache[key] = value
        while len(self._cache) > CACHE_MAX_ENTRIES:
            self._cache.popitem(last=False)

    def _compile_now(self, kind: str, spec: str) -> CompiledGrammar:
        start = time.perf_counter()
        try:
            if kind == "json_schema":
                compiled = self._compiler.compile_json_schema(
                    _checked_json_schema(spec), any_whitespace=False
                )
            elif kind == "regex":
                compiled = self._compiler.compile_regex(spec)
            else:
                compiled = self._compiler.compile_grammar(spec)
        except (RuntimeError, ValueError, TypeError) as exc:
            reason = _XGRAMMAR_LOCATION.sub("", str(exc).strip())
            raise ValidationError(f"invalid {kind}: {reason}", param=kind) from None
        # xgrammar's JSON strings admit raw control characters, which JSON forbids (json.loads
        # rejects them); compact JSON needs no control byte anywhere, so ban those tokens.
        banned = self.vocabulary.control_byte_tokens if kind == "json_schema" else None
        grammar = CompiledGrammar(kind, spec, compiled, 0.0, banned)
        # The start witness is searched once per grammar, with lookahead (see _find_witness).
        start_state = xgr.GrammarMatcher(
            compiled, override_stop_tokens=self.vocabulary.stop_token_ids or None
        )
        spreads: list[int] = []
        witness = _find_witness(
            start_state,
            self.vocabulary,
            _MaskFunction(self.vocabulary, grammar),
            lookahead=True,
            spreads=spreads,
        )
        # A token taking the dearest choice at one of those steps raises the witness cost by
        # about the spread: seed the steering margin with it (decoding keeps learning).
        grammar.note_witness_jump(max(spreads, default=0) + 1)
        if witness is not None:
            cost = self.vocabulary.token_cost(witness)
            if cost >= UNSPELLABLE:
                # The only completion found goes through a byte that the vocabulary has no token
                # for: the model cannot produce it (e.g. a literal "\xff" for a BPE without it).
                raise ValidationError(
                    f"this {kind} needs bytes ({witness!r}) that the model's vocabulary cannot "
                    "produce",
                    param=kind,
                )
            grammar.start_witness = witness
            grammar.min_completion_tokens = cost
        grammar.compile_time_s = time.perf_counter() - start
        return grammar


def _checked_json_schema(spec: str) -> str:
    """Parse and meta-validate a JSON schema; ValidationError naming the problem."""
    try:
        schema = json.loads(spec)
    except json.JSONDecodeError as exc:
        raise ValidationError(
            f"json_schema is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            param="json_schema",
        ) from None
    if not isinstance(schema, (dict, bool)):
        raise ValidationError(
            f"json_schema must be a JSON object, got {type(schema).__name__}", param="json_schema"
        )
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(root)"
        raise ValidationError(
            f"json_schema is not a valid schema at {where}: {exc.message}", param="json_schema"
        ) from None
    return spec


class _MaskFunction:
    """matcher -> [vocab_size] bool mask of its allowed tokens, minus what is never allowed."""

    def __init__(self, vocabulary: _Vocabulary, compiled: CompiledGrammar) -> None:
        self.vocab_size = vocabulary.vocab_size
        self.never_allowed = vocabulary.never_allowed
        if compiled.banned_tokens is not None:
            self.never_allowed = self.never_allowed | compiled.banned_tokens
        self._bitmask = xgr.allocate_token_bitmask(1, vocabulary.vocab_size)

    def __call__(self, matcher: xgr.GrammarMatcher) -> torch.Tensor:
        matcher.fill_next_token_bitmask(self._bitmask)
        return _bitmask_to_bool(self._bitmask, self.vocab_size) & ~self.never_allowed


class GrammarMatcher:
    """Grammar state of one sequence, with budget-aware steering (see the module docstring)."""

    def __init__(
        self,
        compiled: CompiledGrammar,
        vocabulary: _Vocabulary,
        max_new_tokens: int,
        *,
        steering: bool = True,
    ) -> None:
        self.compiled = compiled
        self.steering = steering
        self.vocabulary = vocabulary
        self.remaining_tokens = max_new_tokens
        self._matcher = xgr.GrammarMatcher(
            compiled.compiled, override_stop_tokens=vocabulary.stop_token_ids or None
        )
        self._grammar_mask = _MaskFunction(vocabulary, compiled)
        # The witness W (None: unknown, search again) and costs[i] = tokens to spell W[i:].
        self._witness: bytes | None = None
        self._costs: list[int] = [0]
        if compiled.start_witness is not None:
            self._set_witness(compiled.start_witness)
        self._searched_this_step = False
        self._harmless: set[int] = set()  # tokens checked to keep the witness this step
        self.steered_steps = 0
        self.witness_searches = 0
        # Steps whose witness cost exceeded the tokens left (the guarantee was lost; see the
        # module docstring for when that can happen). Counted for the benchmark.
        self.invariant_breaks = 0

    # --- the per-step API ---------------------------------------------------------------------

    def allowed_token_mask(self) -> torch.Tensor:
        """[vocab_size] bool: the tokens allowed next (grammar, minus specials, plus steering).

        After termination only the stop tokens are allowed (the engine should have stopped)."""
        if self._matcher.is_terminated():
            mask = torch.zeros(self.vocabulary.vocab_size, dtype=torch.bool)
            mask[self.vocabulary.stop_token_ids] = True
            return mask
        mask = self._grammar_mask(self._matcher)
        self._harmless = set()
        if not self.steering:
            return mask
        witness = self._current_witness()
        if witness is None:
            return mask
        if self.remaining_tokens - self._costs[0] >= self.compiled.steering_margin_tokens:
            return mask
        self.steered_steps += 1
        return mask & self._steering_mask(mask, witness)

    def accept_token(self, token_id: int) -> bool:
        if not self._matcher.accept_token(token_id):
            return False
        self.remaining_tokens -= 1
        self._searched_this_step = False
        if self._matcher.is_terminated():
            self._set_witness(b"")
        elif self.steering:
            self._advance_witness(token_id)
        return True

    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()

    def is_completed(self) -> bool:
        """The output so far is a complete sentence (a stop token would be accepted)."""
        return self._matcher.is_completed()

    @property
    def witness_cost(self) -> int | None:
        """Tokens needed to complete the output along the current witness (None: unknown)."""
        return self._costs[0] if self._witness is not None else None

    # --- internals -----------------------------------------------------------------------------

    def _set_witness(self, witness: bytes | None, costs: list[int] | None = None) -> None:
        if witness is not None:
            costs = costs if costs is not None else self.vocabulary.suffix_costs(witness)
            if costs[0] >= UNSPELLABLE:
                witness = None  # no tokens spell it: as good as no witness (unsteered step)
            else:
                self._costs = costs
        self._witness = witness

    def _steering_mask(self, mask: torch.Tensor, witness: bytes) -> torch.Tensor:
        """Tokens after which a witness costing at most remaining_tokens - 1 is known."""
        budget_after = self.remaining_tokens - 1
        stops = self.vocabulary.stop_token_ids
        prefixes = self.vocabulary.prefix_tokens(witness)
        shortest_path = [t for t, _ in prefixes]
        # Progress: the rest of W completes after it, within the budget.
        keep = [t for t, size in prefixes if self._costs[size] <= budget_after]
        if not witness:
            keep += stops  # complete: stopping is progress
            shortest_path += stops
        if self._costs[0] <= budget_after:
            candidates = mask.clone()
            candidates[keep + stops] = False  # stopping now is not "harmless"
            self._harmless = {
                t for t in torch.nonzero(candidates).flatten().tolist()
                if self._keeps_witness(t, witness)
            }
            keep += self._harmless
        allowed = torch.zeros_like(mask)
        allowed[keep] = True
        if not (allowed & mask).any():
            # The budget is already below the witness cost (the guarantee was lost, see
            # invariant_breaks): take the shortest path we know.
            allowed[shortest_path] = True
        return allowed

    def _keeps_witness(self, token_id: int, witness: bytes) -> bool:
        """Does `token_id` followed by the witness still complete the grammar?"""
        matcher = self._matcher
        if not matcher.accept_token(token_id):
            return False
        if not witness:
            completes = matcher.is_completed()
            matcher.rollback(1)
            return completes
        accepted = matcher.accept_string(witness)
        completes = accepted and matcher.is_completed()
        matcher.rollback(2 if accepted else 1)  # a rejected string leaves no step behind
        return completes

    def _current_witness(self) -> bytes | None:
        # A failed search is retried after the next token (its state differs), not this step.
        if self._witness is None and not self._searched_this_step:
            self._searched_this_step = True
            self.witness_searches += 1
            self._set_witness(
                _find_witness(self._matcher, self.vocabulary, self._grammar_mask, lookahead=True)
            )
        return self._witness

    def _advance_witness(self, token_id: int) -> None:
        witness = self._witness
        if witness is None:
            self._current_witness()
            return
        data = self.vocabulary.token_bytes.get(token_id, b"")
        if data and witness.startswith(data):
            self._set_witness(witness[len(data) :], self._costs[len(data) :])
            return
        if token_id in self._harmless:
            return
        probe = self._matcher.fork()
        if witness:
            keeps = probe.accept_string(witness) and probe.is_completed()
        else:
            keeps = probe.is_completed()
        if keeps:
            return  # an unchecked token (free zone) that happens to keep the witness
        old_cost = self._costs[0]
        self._set_witness(None)
        if self._current_witness() is None:
            return
        new_cost = self._costs[0]
        # How much the slack (remaining_tokens - witness cost) fell beyond the one token spent.
        self.compiled.note_witness_jump(new_cost - old_cost + 1)
        if new_cost > self.remaining_tokens:
            self.invariant_breaks += 1


def _find_witness(
    matcher: xgr.GrammarMatcher,
    vocabulary: _Vocabulary,
    grammar_mask: _MaskFunction,
    *,
    lookahead: bool = False,
    spreads: list[int] | None = None,
) -> bytes | None:
    """A byte string completing `matcher`'s sentence (see the module docstring), or None.

    Greedy: a step prefers the first allowed byte, in preference order, that leads to a state
    signature not visited yet; when every allowed byte leads back to a visited signature (counted
    repetitions such as `\\d{3}`, loops) it takes the least visited one. With `lookahead`, a step
    with a few distinct choices (property names, enum values, alternatives) completes each of
    them greedily and keeps the one whose completion costs the fewest tokens: never worse than
    the greedy walk, and it skips optional properties that sort first.
    Bounded by WITNESS_MAX_BYTES and WITNESS_MAX_NODES evaluations (per greedy walk).
    `spreads` (with lookahead) collects, per such step, how much dearer the dearest choice's
    completion is than the cheapest: the witness jump a token taking that choice would cause.
    """
    probe = matcher.fork()
    pieces: list[bytes] = []
    length = 0
    evaluations = 0

    def signature(state: xgr.GrammarMatcher) -> tuple[bytes, str, bool]:
        # Single bytes only: multi-byte tokens make every step of a counted repetition look new
        # (`[a-z]{1,8}` allows ever shorter tokens), which would walk the repetition to its end.
        return (
            grammar_mask(state)[vocabulary.byte_ids_by_preference].numpy().tobytes(),
            state.find_jump_forward_string(),
            state.is_completed(),
        )

    visits = {signature(probe): 1}  # state signature -> times the walk entered it
    best_completion: bytes | None = None  # the cheapest full completion a lookahead saw
    while not probe.is_completed():
        if length >= WITNESS_MAX_BYTES or evaluations >= WITNESS_MAX_NODES:
            return best_completion
        forced = probe.find_jump_forward_string().encode()
        if forced:
            accepted = probe.accept_string(forced)
            assert accepted, "xgrammar rejected its own jump-forward string"
            pieces.append(forced)
            length += len(forced)
            child = signature(probe)
            visits[child] = visits.get(child, 0) + 1
            continue
        allowed = grammar_mask(probe)[vocabulary.byte_ids_by_preference].tolist()
        candidates = [bytes([b]) for b, ok in zip(vocabulary.bytes_by_preference, allowed) if ok]
        if not candidates:
            return None  # only multi-byte or stop tokens continue from here: give up
        if lookahead and 1 < len(candidates) <= LOOKAHEAD_MAX_CHOICES:
            choice = _best_choice(probe, candidates, b"".join(pieces), vocabulary, grammar_mask)
            if choice is not None:
                piece, completion, spread = choice
                if spreads is not None:
                    spreads.append(spread)
                if best_completion is None or _cheaper(completion, best_completion, vocabulary):
                    best_completion = completion
                accepted = probe.accept_string(piece)
                assert accepted, "a byte the mask allows was rejected"
                child = signature(probe)
                visits[child] = visits.get(child, 0) + 1
                pieces.append(piece)
                length += len(piece)
                continue
        chosen = None
        least_visited: tuple[int, bytes] | None = None
        classes_tried: set[int] = set()
        for piece in candidates:
            if piece[0] in _NO_NOVELTY_BYTES:
                continue  # escapes and multi-byte characters never shorten a completion
            byte_class = _BYTE_CLASS.get(piece[0])
            if byte_class is not None:
                if byte_class in classes_tried:
                    continue  # one letter (digit) stands for the others in the scan
                classes_tried.add(byte_class)
            evaluations += 1
            if not probe.accept_string(piece):
                continue
            child = signature(probe)
            probe.rollback(1)
            if child not in visits:
                chosen = piece
                break
            if least_visited is None or visits[child] < least_visited[0]:
                least_visited = (visits[child], piece)
        if chosen is None:
            # Every choice leads back to a known signature: a counted repetition (`\d{3}`,
            # minLength) or a loop (`[a-z]+ [A-Z]`): the least visited one leaves loops.
            chosen = least_visited[1] if least_visited is not None else candidates[0]
        if not probe.accept_string(chosen):
            return best_completion
        child = signature(probe)
        visits[child] = visits.get(child, 0) + 1
        pieces.append(chosen)
        length += len(chosen)
    found = b"".join(pieces)
    if best_completion is not None and _cheaper(best_completion, found, vocabulary):
        return best_completion
    return found


def _cheaper(a: bytes, b: bytes, vocabulary: _Vocabulary) -> bool:
    return vocabulary.token_cost(a) < vocabulary.token_cost(b)


def _best_choice(
    probe: xgr.GrammarMatcher,
    candidates: list[bytes],
    prefix: bytes,
    vocabulary: _Vocabulary,
    grammar_mask: _MaskFunction,
) -> tuple[bytes, bytes, int] | None:
    """Lookahead: the candidate byte whose greedy completion is cheapest, prefix + it + that
    completion, and the spread (dearest minus cheapest completion cost, in tokens)."""
    costs: list[tuple[int, bytes, bytes]] = []
    for piece in candidates:
        branch = probe.fork()
        if not branch.accept_string(piece):
            continue
        rest = _find_witness(branch, vocabulary, grammar_mask)
        if rest is not None:
            completion = prefix + piece + rest
            costs.append((vocabulary.token_cost(completion), piece, completion))
    if not costs:
        return None
    cheapest = min(costs, key=lambda item: item[0])  # min keeps the first (preferred) of ties
    return cheapest[1], cheapest[2], max(c for c, _, _ in costs) - cheapest[0]
