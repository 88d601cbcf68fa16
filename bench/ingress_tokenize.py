"""Where the Ingress should tokenize: inline on its event loop, or in a thread (app/ingress/prepare.py).

For prompts of several sizes, both sides in one run:
- `inline_us`: encoding on the loop (what one request pays, and what every other stream waits);
- `thread_us`: the same through the tokenizer pool, as a request sees it (hop there and back);
- `stall_inline_ms` / `stall_thread_ms`: the worst lateness of a 1 ms ticker on the same loop while
  8 such prompts are tokenized concurrently (what the other streams of this Ingress feel).
A chat-template render + encode (SmolLM2's template) is measured the same way.

    python bench/ingress_tokenize.py --tokenizer <model dir> [--repeat 30]

Prints a markdown table. Absolute figures follow the machine's load; read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time

from app.engines.hf_tokenizer import HFTokenizer
from app.ingress.prepare import OffLoop

WORDS = ("the river runs past old stone walls while people talk about weather markets music and "
         "the price of bread in a quiet town near the sea where boats come home at night").split()


def text_of(chars: int, seed: int) -> str:
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:chars]


async def per_request_us(off: OffLoop, fn, arg, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        await off.call(len(arg), fn, arg)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


async def stall_ms(off: OffLoop, fn, args: list) -> float:
    """Worst lateness of a 1 ms ticker while `fn(arg)` runs for every arg, concurrently."""
    worst = 0.0
    running = True

    async def ticker():
        nonlocal worst
        while running:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - before - 0.001)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    await asyncio.gather(*(off.call(len(a), fn, a) for a in args))
    running = False
    await tick
    return worst * 1e3


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    tok = HFTokenizer(args.tokenizer)
    inline, threaded = OffLoop(1 << 30), OffLoop(-1)
    print(f"load average: {os.getloadavg()}  cpus: {os.cpu_count()}")
    print("| work | chars | tokens | inline_us | thread_us | stall_inline_ms (8 at once) | stall_thread_ms |")
    print("|---|---|---|---|---|---|---|")
    for chars in (100, 500, 2000, 8000, 32000):
        text = text_of(chars, chars)
        texts = [text_of(chars, chars + i) for i in range(8)]
        tokens = len(tok.encode(text))
        a = await per_request_us(inline, tok.encode, text, args.repeat)
        b = await per_request_us(threaded, tok.encode, text, args.repeat)
        c = await stall_ms(inline, tok.encode, texts)
        d = await stall_ms(threaded, tok.encode, texts)
        print(f"| encode | {chars} | {tokens} | {a:.0f} | {b:.0f} | {c:.1f} | {d:.1f} |")
    if tok.hf.chat_template:
        def chat(content: str) -> list[int]:
            prompt = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
            return tok.encode(prompt, add_special_tokens=False)

        for chars in (100, 2000, 8000):
            text = text_of(chars, chars)
            texts = [text_of(chars, chars + i) for i in range(8)]
            a = await per_request_us(inline, chat, text, args.repeat)
            b = await per_request_us(threaded, chat, text, args.repeat)
            c = await stall_ms(inline, chat, texts)
            d = await stall_ms(threaded, chat, texts)
            print(f"| chat template + encode | {chars} | {len(chat(text))} | {a:.0f} | {b:.0f} | {c:.1f} | {d:.1f} |")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    asyncio.run(main())
