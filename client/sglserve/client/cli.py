"""The `sglserve` command: chat, run a script, benchmark, list models, wait for a job.

    sglserve chat "Hello!"                       # streams the answer
    sglserve run program.sgl --var topic=tea     # streams the text, then the variables as JSON
    sglserve bench --requests 50 --concurrency 8 # TTFT and throughput, with a progress bar

The server is --base-url or SGLSERVE_BASE_URL (default http://localhost:8000); the key is
--api-key or SGLSERVE_API_KEY.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .errors import ScriptError, SGLServeError
from .sync import Client


class ProgressBar:
    """`[#####.....] 5/10 label` on stderr, redrawn in place; no dependency."""

    def __init__(self, total: int, label: str = "", width: int = 30, stream: Any = None):
        self.total, self.label, self.width = total, label, width
        self.stream = stream or sys.stderr
        self.done = 0
        self._lock = threading.Lock()
        self._draw()

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            self._draw()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()

    def _draw(self) -> None:
        filled = int(self.width * self.done / self.total) if self.total else self.width
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {self.label}")
        self.stream.flush()


def _client(args: argparse.Namespace) -> Client:
    return Client(args.base_url, args.api_key, model=args.model, timeout_s=args.timeout_s)


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    values = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    return {k: v for k, v in values.items() if v is not None}


def cmd_chat(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.no_stream:
            print(client.chat(args.prompt, system=args.system, **_sampling(args)).text)
            return 0
        with client.chat(args.prompt, system=args.system, stream=True, **_sampling(args)) as stream:
            for piece in stream:
                sys.stdout.write(piece.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def _variables(pairs: list[str]) -> dict[str, Any]:
    variables = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--var wants name=value, got {pair!r}")
        try:
            variables[name] = json.loads(value)  # numbers, lists, quoted strings
        except ValueError:
            variables[name] = value
    return variables


def cmd_run(args: argparse.Namespace) -> int:
    with open(args.file, encoding="utf-8") as f:
        script = f.read()
    with _client(args) as client:
        result = None
        with client.run(script, stream=True, arguments=_variables(args.var)) as stream:
            for event in stream:
                if event.type == "text" and not event.branch:
                    sys.stdout.write(event.text or "")
                    sys.stdout.flush()
                elif event.type == "done":
                    result = event.result
        sys.stdout.write("\n")
        if result is not None:
            print(json.dumps(result.variables, ensure_ascii=False, indent=2))
    return 0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def cmd_bench(args: argparse.Namespace) -> int:
    """Closed loop: `concurrency` workers send streamed chats until `requests` are done."""
    with _client(args) as client:
        client.model = args.model or client._default_model()  # resolve the model once, before the clock starts
        bar = ProgressBar(args.requests, "requests")
        ttfts: list[float] = []
        tokens: list[int] = []

        def one(_: int) -> None:
            started = time.perf_counter()
            first = None
            with client.chat(args.prompt, stream=True, max_tokens=args.max_tokens, temperature=args.temperature,
                             ignore_eos=True, stream_options={"include_usage": True}) as stream:
                for chunk in stream:
                    if first is None and chunk.text:
                        first = time.perf_counter() - started
                    if chunk.usage:
                        tokens.append(chunk.usage.completion_tokens)
            ttfts.append(first if first is not None else float("nan"))
            bar.advance()

        wall = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - wall
        bar.close()
    report = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "wall_s": round(wall, 3),
        "requests_per_s": round(args.requests / wall, 3),
        "output_tokens_per_s": round(sum(tokens) / wall, 1),
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
        "ttft_p99_ms": round(1000 * _percentile(ttfts, 0.99), 1),
    }
    print(json.dumps(report, indent=2))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for model in client.models():
            print(model.id)
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    started = time.monotonic()

    def show(job: Any) -> None:  # a one-line status, redrawn while waiting
        sys.stderr.write(f"\rjob {job.id}: {job.status} ({time.monotonic() - started:.0f} s)   ")
        sys.stderr.flush()

    with _client(args) as client:
        job = client.wait(args.job_id, args.wait_timeout_s, on_poll=show)
        sys.stderr.write("\n")
        print(json.dumps(job.model_dump(), indent=2, default=str))
    return 0 if job.status == "succeeded" else 1


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base-url", default=None, help="server URL (default $SGLSERVE_BASE_URL or localhost:8000)")
    common.add_argument("--api-key", default=None, help="API key (default $SGLSERVE_API_KEY)")
    common.add_argument("--model", default=None, help="model name (default: the server's first)")
    common.add_argument("--timeout-s", type=float, default=600.0)
    parser = argparse.ArgumentParser(prog="sglserve", description="Talk to an sglserve server.")
    commands = parser.add_subparsers(dest="command", required=True)

    chat = commands.add_parser("chat", parents=[common], help="ask one question, stream the answer")
    chat.add_argument("prompt")
    chat.add_argument("--system", default=None)
    chat.add_argument("--max-tokens", type=int, default=None)
    chat.add_argument("--temperature", type=float, default=None)
    chat.add_argument("--no-stream", action="store_true")
    chat.set_defaults(handler=cmd_chat)

    run = commands.add_parser("run", parents=[common], help="run a /run script file, stream its text")
    run.add_argument("file")
    run.add_argument("--var", action="append", default=[], metavar="NAME=VALUE")
    run.set_defaults(handler=cmd_run)

    bench = commands.add_parser("bench", parents=[common], help="closed-loop streamed chats: TTFT and throughput")
    bench.add_argument("--requests", type=int, default=32)
    bench.add_argument("--concurrency", type=int, default=4)
    bench.add_argument("--max-tokens", type=int, default=64)
    bench.add_argument("--temperature", type=float, default=0.0)
    bench.add_argument("--prompt", default="Write a short story about a lighthouse.")
    bench.set_defaults(handler=cmd_bench)

    models = commands.add_parser("models", parents=[common], help="list the served models")
    models.set_defaults(handler=cmd_models)

    wait = commands.add_parser("wait", parents=[common], help="wait for a job to end, print it")
    wait.add_argument("job_id")
    wait.add_argument("--wait-timeout-s", type=float, default=None)
    wait.set_defaults(handler=cmd_wait)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ScriptError as error:
        # The server's message already holds the line, column and a caret excerpt.
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    except SGLServeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
