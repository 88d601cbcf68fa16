"""Greedy chat answers of a real model to fixed prompts, one request at a time, written as JSON lines,
so that two servers of the same model (`sglang.launch_server` and sglserve) can be compared word
for word: same weights, same engine, same greedy decoding should give the same text.

    python bench/gpu/same_answers.py --port 30000 --model smollm2 --out answers.jsonl

Standard library only (it runs on the GPU machine beside whatever server is up).
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences what a GPU is.",
    "List three fruits that are red.",
    "What is 12 times 12?",
    "Translate 'good morning' into Spanish.",
    "Give one tip for writing clear code.",
    "Why is the sky blue? Answer briefly.",
)


def ask(port: int, model: str, prompt: str, max_tokens: int) -> dict:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                       "temperature": 0, "max_tokens": max_tokens}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"content-type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.load(response)
    choice = answer["choices"][0]
    return {"prompt": prompt, "text": choice["message"]["content"], "finish_reason": choice["finish_reason"],
            "completion_tokens": answer["usage"]["completion_tokens"],
            "seconds": round(time.perf_counter() - started, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True, help="the served model name")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    with open(args.out, "w") as out:
        for prompt in PROMPTS:
            record = ask(args.port, args.model, prompt, args.max_tokens)
            out.write(json.dumps(record) + "\n")
            print(f"{prompt!r} -> {record['text'][:100]!r} ({record['completion_tokens']} tokens)")


if __name__ == "__main__":
    main()
