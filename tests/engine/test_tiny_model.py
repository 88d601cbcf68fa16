"""The tiny default model: built once, deterministic, race-safe, a real Llama + tokenizer, and
decisive enough that batching cannot flip a greedy token."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.config import TINY_MODEL, ModelSettings
from app.engines import tiny_model
from app.engines.tiny_model import ensure_tiny_model, resolve_model_path, resolve_tokenizer_path

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [
    "The weather in Paris",
    "def fibonacci(n: int) -> int:",
    '今天{get_current_weather("北京")},适合外出。',
    '{"name": "search", "arguments": {"query": ',
    "Once upon a time there was a small robot",
    "Question: What is the capital of France?\nAnswer:",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def model(tiny_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()


# -- building --------------------------------------------------------------------------------


def test_two_builds_are_byte_identical(tiny_model_path, tmp_path):
    fresh = tmp_path / "fresh"
    tiny_model.build_tiny_model(fresh, progress=False)
    built = sorted(p.name for p in fresh.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(built)
    for name in built:
        assert (fresh / name).read_bytes() == (Path(tiny_model_path) / name).read_bytes(), name


def test_a_finished_build_is_reused_without_rebuilding(tiny_model_path, monkeypatch):
    def must_not_build(*args, **kwargs):
        raise AssertionError("rebuilt a model that was already built")

    monkeypatch.setattr(tiny_model, "build_tiny_model", must_not_build)
    cache_dir = str(Path(tiny_model_path).parent)
    assert ensure_tiny_model(cache_dir, progress=False) == tiny_model_path


def test_a_stale_or_unfinished_directory_is_rebuilt_and_replaced(tmp_path):
    target = tmp_path / tiny_model.MODEL_DIR_NAME
    target.mkdir()
    (target / "leftover.txt").write_text("from an old recipe")
    (target / tiny_model.MARKER_FILE).write_text("an-old-fingerprint\n")

    path = ensure_tiny_model(str(tmp_path), progress=False)

    assert path == str(target)
    assert not (target / "leftover.txt").exists()
    marker = (target / tiny_model.MARKER_FILE).read_text().strip()
    assert marker == tiny_model.recipe_fingerprint()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [target.name]


def test_two_processes_racing_get_one_valid_build(tmp_path):
    script = (
        "import sys; from app.engines.tiny_model import ensure_tiny_model; "
        "print(ensure_tiny_model(sys.argv[1], progress=True))"
    )
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(2)
    ]
    results = [racer.communicate(timeout=120) for racer in racers]

    assert [racer.returncode for racer in racers] == [0, 0], [err for _, err in results]
    paths = {out.strip() for out, _ in results}
    assert paths == {str(tmp_path / tiny_model.MODEL_DIR_NAME)}
    builders = [err for _, err in results if "building tiny model" in err]
    assert len(builders) == 1, "exactly one process builds; the other waits and reuses"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != tiny_model.MODEL_DIR_NAME]
    assert leftovers == [f".{tiny_model.MODEL_DIR_NAME}.lock"]
    assert ensure_tiny_model(str(tmp_path), progress=False) == paths.pop()


def test_the_cli_builds_and_prints_the_path(tiny_model_path):
    cache_dir = str(Path(tiny_model_path).parent)
    done = subprocess.run(
        [sys.executable, "-m", "app.engines.tiny_model", "--cache-dir", cache_dir, "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True,
    )
    assert done.stdout.strip() == tiny_model_path


def test_settings_resolve_to_the_built_model_or_pass_through(tiny_model_path):
    cache_dir = str(Path(tiny_model_path).parent)
    tiny = ModelSettings(model_path=TINY_MODEL, cache_dir=cache_dir)
    assert resolve_model_path(tiny) == tiny_model_path
    assert resolve_tokenizer_path(tiny) == tiny_model_path

    other = ModelSettings(model_path="Qwen/Qwen2.5-0.5B-Instruct", tokenizer_path="/models/tok")
    assert resolve_model_path(other) == "Qwen/Qwen2.5-0.5B-Instruct"
    assert resolve_tokenizer_path(other) == "/models/tok"
    mixed = ModelSettings(model_path="/models/llama", tokenizer_path=TINY_MODEL, cache_dir=cache_dir)
    assert resolve_tokenizer_path(mixed) == tiny_model_path


# -- what was built ---------------------------------------------------------------------------


def test_the_model_is_a_small_gqa_llama_sized_to_the_tokenizer(model, tokenizer):
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.hidden_size, config.num_hidden_layers) == (256, 4)
    assert (config.num_attention_heads, config.num_key_value_heads) == (8, 2)
    assert config.max_position_embeddings == 4096
    assert config.vocab_size == len(tokenizer)
    assert model.dtype == torch.float32
    eos_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    assert set(model.generation_config.eos_token_id) == eos_ids
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"


def test_the_tokenizer_covers_every_byte_and_keeps_common_words_whole(tokenizer):
    from tokenizers import pre_tokenizers

    vocab = tokenizer.get_vocab()
    assert all(symbol in vocab for symbol in pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes
    assert 1000 <= len(tokenizer) <= 2000
    words = tokenizer.tokenize(" the weather")
    assert words == ["Ġthe", "Ġweather"]
    assert tokenizer.tokenize("<tool_call>") == ["<tool_call>"]


def test_the_chat_template_renders_every_role_tools_and_the_generation_prompt(tokenizer):
    tools = [{"type": "function", "function": {"name": "get_current_weather", "parameters": {}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Beijing?"}],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "1", "type": "function",
                 "function": {"name": "get_current_weather", "arguments": '{"city": "北京"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "1", "content": '{"temperature": 22}'},
    ]
    prompt = tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=False
    )

    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert '"name": "get_current_weather"' in prompt.split("</tools>")[0]
    assert "<|im_start|>user\nWeather in Beijing?<|im_end|>\n" in prompt
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_current_weather", "arguments": '
        '{"city": "北京"}}\n</tool_call><|im_end|>\n' in prompt
    )
    assert '<|im_start|>tool\n{"temperature": 22}<|im_end|>\n' in prompt
    assert prompt.endswith("<|im_start|>assistant\n")

    plain = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=False, tokenize=False)
    assert plain == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWeather in Beijing?<|im_end|>\n"
    )


def test_greedy_generation_runs_varies_and_is_repeatable(model, tokenizer):
    inputs = tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        second = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    new_tokens = first[0, inputs.input_ids.shape[1]:].tolist()
    assert torch.equal(first, second)
    assert len(new_tokens) == 24, "greedy decoding from this prompt does not hit EOS in 24 tokens"
    assert len(set(new_tokens)) > 12, f"greedy output collapsed: {new_tokens}"


def test_greedy_tokens_do_not_depend_on_batching(model, tokenizer):
    """Padding and batch shape change float rounding; the logit margins are wide enough that the
    greedy choice never changes, and the output depends on the whole context, not the last token."""
    steps = 32
    with torch.no_grad():
        singles = []
        for prompt in PROMPTS:
            inputs = tokenizer(prompt, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
            new_tokens = out.sequences[0, inputs.input_ids.shape[1]:].tolist()
            singles.append((new_tokens, torch.cat(out.logits)))
        batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
        batched = model.generate(**batch, max_new_tokens=steps, do_sample=False)
    pad = tokenizer.pad_token_id
    for (tokens, _), row in zip(singles, batched[:, batch.input_ids.shape[1]:].tolist()):
        assert row[: len(tokens)] == tokens
        assert all(t == pad for t in row[len(tokens):])  # finished early: padded afterwards
    top2 = torch.cat([logits for _, logits in singles]).topk(2, dim=-1).values
    gaps = (top2[:, 0] - top2[:, 1]).sort().values
    assert gaps[len(gaps) // 100] > 1e-3, "1st-percentile top-1/top-2 logit gap"
