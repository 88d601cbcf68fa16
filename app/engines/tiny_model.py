"""The embedded default model (`app.config.TINY_MODEL`), built locally because no weights can be
downloaded here.

What gets built, into `<cache_dir>/tiny-llama-v1/` (a normal Hugging Face checkpoint directory):

- A real byte-level BPE tokenizer trained with `tokenizers` on `app/engines/data/corpus.txt`
  (English prose, code, JSON, Chinese). Byte-level means every byte has a token, so any UTF-8 text
  is encodable. Special tokens: BOS `<|startoftext|>` (added by `encode(add_special_tokens=True)`,
  NOT written by the chat template, so `encode(apply_chat_template(...))` has exactly one BOS),
  end-of-turn `<|im_end|>` (the tokenizer's EOS), end-of-text `<|endoftext|>`, pad `<|pad|>`, chat
  marker `<|im_start|>`. `<tool_call>` / `</tool_call>` are single, non-special tokens (they survive
  `skip_special_tokens`, so tool-call parsers see them). A ChatML-like Jinja chat template handles
  system/user/assistant/tool roles, assistant `tool_calls`, `tools` and `add_generation_prompt`.
- A `LlamaForCausalLM` with random weights from a fixed seed (GQA: 8 query heads, 2 KV heads).
  The init is scaled on purpose: with the usual 0.02 init the logits are nearly uniform and tiny
  float differences (batched vs single-sequence kernels) flip the greedy argmax, which makes engine
  tests flaky. Here the embeddings and layers are initialised at unit scale (so every layer, and so
  the whole context, moves the output) and the LM head so that logits have a standard deviation of
  about 8: the top-1 token usually leads by a wide margin (`python -m app.engines.tiny_model_stats`
  prints the figures). Three touches on the LM head keep generation useful for tests: the
  end-of-turn row is drawn wider, so greedy runs stop now and then (typically after dozens of
  tokens); rows of tokens a real model never emits (BOS, pad, `<|im_start|>`, `<|endoftext|>`) are
  zero; and each row is pushed away from its own token's embedding, so no token follows itself
  forever under greedy decoding.

Building is deterministic (same corpus + recipe -> byte-identical files) and takes ~0.2 s after
the ~4 s it takes to import torch and transformers.
It is safe when many processes race (Ray replicas, the ingress, pytest workers): an `fcntl` lock
serialises builders, each build goes into a temporary directory that is atomically renamed into
place, and a marker file holding the recipe fingerprint says the directory is complete. A directory
with a stale fingerprint (the recipe or corpus changed) is rebuilt and swapped in.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # keep `import app.engines.tiny_model` light: torch loads only when building
    from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from app.config import ModelSettings

from app.engines.model_cache import MARKER_FILE, build_once, transformers_progress_bars_hidden

MODEL_DIR_NAME = "tiny-llama-v1"
# Bump when anything below changes what gets built; the fingerprint also covers the corpus bytes.
RECIPE_VERSION = 2
SEED = 20241125
CORPUS_PATH = Path(__file__).parent / "data" / "corpus.txt"

# Tokenizer.
BPE_VOCAB_SIZE = 1536  # includes the 256 byte tokens and the special tokens
BOS_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|im_end|>"  # end of turn: the tokenizer's eos_token
EOS_TEXT_TOKEN = "<|endoftext|>"  # end of a plain document; also stops generation
PAD_TOKEN = "<|pad|>"
IM_START_TOKEN = "<|im_start|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOT_TOKEN, EOS_TEXT_TOKEN, PAD_TOKEN, IM_START_TOKEN]
TOOL_CALL_TOKENS = ["<tool_call>", "</tool_call>"]  # single tokens, but ordinary text

# Model (Llama architecture).
HIDDEN_SIZE = 256
INTERMEDIATE_SIZE = 768
NUM_LAYERS = 4
NUM_HEADS = 8
NUM_KV_HEADS = 2
MAX_POSITIONS = 4096
ROPE_THETA = 10000.0
# Init scales (see the module docstring for why they are not 0.02).
EMBEDDING_STD = 1.0
LAYER_GAIN = 1.0  # linear layers: std = LAYER_GAIN / sqrt(fan_in)
LM_HEAD_STD = 0.5  # logits std ~= LM_HEAD_STD * sqrt(HIDDEN_SIZE) after the final RMSNorm
# The end-of-turn row is drawn wider than the others so that it wins the argmax now and then
# (greedy runs end after dozens of tokens, not never); rows of tokens a real model never emits
# (BOS, pad, <|im_start|>, <|endoftext|>) are zero, so their logit 0 never beats the top ones.
EOT_ROW_SCALE = 1.3
NEVER_GENERATED_TOKENS = [BOS_TOKEN, PAD_TOKEN, IM_START_TOKEN, EOS_TEXT_TOKEN]
# A random map from "current token" to "next token" has fixed points, and a token that follows
# itself under greedy decoding repeats forever. Pushing each LM-head row away from its own token's
# embedding direction lowers that token's logit right after it, so greedy runs keep varying.
SELF_REPEAT_PENALTY = 3.0

# ChatML-like. Every literal is an expression (`{{ '...' }}`) so that the `-` whitespace control,
# used only to keep this source readable, never eats a newline that belongs to the prompt.
CHAT_TEMPLATE = """\
{#- content: a string, None, or a list of OpenAI content parts ({"type": "text", "text": ...}) -#}
{%- macro render_content(content) -%}
    {%- if content is string -%}{{ content }}
    {%- elif content is iterable and content is not mapping -%}
        {%- for part in content -%}
            {%- if part is string -%}{{ part }}
            {%- elif part.type == 'text' -%}{{ part.text }}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- set has_system = messages | length > 0 and messages[0].role == 'system' -%}
{%- if tools -%}
    {{- '<|im_start|>system\n' -}}
    {%- if has_system -%}{{- render_content(messages[0].content) + '\n\n' -}}{%- endif -%}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n' -}}
    {{- 'The available functions, one JSON signature per line:\n<tools>' -}}
    {%- for tool in tools -%}{{- '\n' + (tool | tojson) -}}{%- endfor -%}
    {{- '\n</tools>\n\nTo call a function, reply with a JSON object holding its name and arguments '
        'between tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
        '</tool_call><|im_end|>\n' -}}
{%- elif has_system -%}
    {{- '<|im_start|>system\n' + render_content(messages[0].content) + '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if not (loop.first and has_system) -%}
        {%- set content = render_content(message.content) -%}
        {{- '<|im_start|>' + message.role + '\n' + content -}}
        {%- if message.role == 'assistant' and message.tool_calls -%}
            {%- for call in message.tool_calls -%}
                {%- set function = call.function if call.function is defined else call -%}
                {%- if content or not loop.first -%}{{- '\n' -}}{%- endif -%}
                {{- '<tool_call>\n{"name": ' + (function.name | tojson) + ', "arguments": ' -}}
                {%- if function.arguments is string -%}{{- function.arguments -}}
                {%- else -%}{{- function.arguments | tojson -}}
                {%- endif -%}
                {{- '}\n</tool_call>' -}}
            {%- endfor -%}
        {%- endif -%}
        {{- '<|im_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""


def recipe_fingerprint() -> str:
    """A hash of everything that determines the built files: a changed corpus or recipe rebuilds."""
    recipe = {
        "version": RECIPE_VERSION,
        "seed": SEED,
        "bpe_vocab_size": BPE_VOCAB_SIZE,
        "special": SPECIAL_TOKENS + TOOL_CALL_TOKENS,
        "model": [HIDDEN_SIZE, INTERMEDIATE_SIZE, NUM_LAYERS, NUM_HEADS, NUM_KV_HEADS, MAX_POSITIONS],
        "init": [
            EMBEDDING_STD, LAYER_GAIN, LM_HEAD_STD, EOT_ROW_SCALE, SELF_REPEAT_PENALTY, ROPE_THETA
        ],
        "never_generated": NEVER_GENERATED_TOKENS,
        "chat_template": CHAT_TEMPLATE,
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    digest.update(CORPUS_PATH.read_bytes())
    return digest.hexdigest()


def default_cache_dir() -> str:
    from app.config import default_cache_dir as configured_default

    return configured_default()


def ensure_tiny_model(cache_dir: str | None = None, *, progress: bool = True) -> str:
    """Return the directory of the tiny model under `cache_dir`, building it first if needed.

    Cheap when already built (reads one marker file). Concurrent callers in any number of
    processes get the same finished directory; only one of them builds (app.engines.model_cache).
    """
    root = cache_dir or default_cache_dir()
    return build_once(
        root, MODEL_DIR_NAME, recipe_fingerprint(),
        lambda staging: build_tiny_model(staging, progress=progress),
    )


def resolve_model_path(settings: ModelSettings) -> str:
    """The path to load the model from: the built directory for `TINY_MODEL`, the dequantized
    directory for a GGUF model (`SMOLLM2_MODEL` or a path to a .gguf file, see
    app.engines.gguf_model), else `settings.model_path` unchanged (a Hugging Face id or a local
    directory)."""
    return _resolve(settings.model_path, settings)


def resolve_tokenizer_path(settings: ModelSettings) -> str:
    """Like `resolve_model_path`, for `settings.tokenizer_path` (defaulting to the model's)."""
    if settings.tokenizer_path is None:
        return resolve_model_path(settings)
    return _resolve(settings.tokenizer_path, settings)


def _resolve(path: str, settings: ModelSettings) -> str:
    from app.config import TINY_MODEL
    from app.engines import gguf_model

    if path == TINY_MODEL:
        return ensure_tiny_model(settings.cache_dir, progress=False)
    if gguf_model.is_gguf_model(path):
        return gguf_model.ensure_gguf_model(path, settings.cache_dir, dtype=settings.dtype)
    return path


def build_tiny_model(out_dir: Path, *, progress: bool = True) -> None:
    """Build the tokenizer and model into `out_dir` (no locking, no marker: see ensure_tiny_model)."""
    from tqdm import tqdm

    with tqdm(total=3, desc="building tiny model", unit="step", disable=not progress) as bar:
        bar.set_postfix_str("train tokenizer")
        tokenizer = _train_tokenizer()
        bar.update()
        bar.set_postfix_str("init model")
        model, generation_config = _init_model(tokenizer)
        bar.update()
        bar.set_postfix_str("save")
        with transformers_progress_bars_hidden():  # our bar already covers saving
            tokenizer.save_pretrained(out_dir)
            model.save_pretrained(out_dir)
            generation_config.save_pretrained(out_dir)
        bar.update()


def _train_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,  # ids 0..4, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte gets a token
        show_progress=False,
    )
    lines = CORPUS_PATH.read_text(encoding="utf-8").splitlines(keepends=True)
    bpe.train_from_iterator(lines, trainer=trainer)
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_CALL_TOKENS])
    bos_id = bpe.token_to_id(BOS_TOKEN)
    bpe.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS_TOKEN,
        eos_token=EOT_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[EOS_TEXT_TOKEN, IM_START_TOKEN],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        padding_side="left",  # decoder-only batching pads on the left
        clean_up_tokenization_spaces=False,  # decode(encode(x)) == x
    )


def _init_model(tokenizer: PreTrainedTokenizerFast) -> tuple[LlamaForCausalLM, GenerationConfig]:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    eot_id = tokenizer.convert_tokens_to_ids(EOT_TOKEN)
    eos_ids = [eot_id, tokenizer.convert_tokens_to_ids(EOS_TEXT_TOKEN)]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HIDDEN_SIZE // NUM_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rope_theta=ROPE_THETA,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    # Our own init, in a fixed parameter order, from a private generator: deterministic and
    # independent of how a given transformers version initialises weights. The LM head goes last
    # because its self-repeat penalty reads the (already initialised) embedding.
    generator = torch.Generator().manual_seed(SEED)
    parameters = sorted(
        model.named_parameters(), key=lambda item: (item[0] == "lm_head.weight", item[0])
    )
    with torch.no_grad():
        for name, param in parameters:
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name == "model.embed_tokens.weight":
                param.normal_(0.0, EMBEDDING_STD, generator=generator)
            elif name == "lm_head.weight":
                param.normal_(0.0, LM_HEAD_STD, generator=generator)
                embedding = model.model.embed_tokens.weight
                param -= SELF_REPEAT_PENALTY * embedding / embedding.norm(dim=1, keepdim=True)
                param[eot_id] *= EOT_ROW_SCALE
                for token in NEVER_GENERATED_TOKENS:
                    param[tokenizer.convert_tokens_to_ids(token)] = 0.0
            elif param.ndim == 2:  # q/k/v/o and MLP projections: unit-gain fan-in scaling
                param.normal_(0.0, LAYER_GAIN / param.shape[1] ** 0.5, generator=generator)
            else:
                raise AssertionError(f"tiny model: no init rule for parameter {name}")
    generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.generation_config = generation_config
    return model, generation_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build (once) the tiny model; print its path.")
    parser.add_argument(
        "--cache-dir", default=None, help="default: $SGLSERVE_CACHE_DIR or ~/.cache/sglserve"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    print(ensure_tiny_model(args.cache_dir, progress=not args.quiet))


if __name__ == "__main__":
    main()
