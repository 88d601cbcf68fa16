"""Summarises py-spy speedscope profiles (scripts/gpu/bench_vs_launch_server.sh records one per Serve
actor while the c=128 steps run): the functions where the samples are, by self and total share.

    python bench/gpu/pyspy_top.py bench/gpu/vs_launch_server/sglserve/pyspy_*.json
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path


def summarise(path: Path, top: int = 12) -> str:
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    self_c, total_c, n = Counter(), Counter(), 0
    for profile in data["profiles"]:
        for stack, weight in zip(profile["samples"], profile["weights"]):
            n += weight
            if not stack:
                continue
            leaf = frames[stack[-1]]
            self_c[f"{leaf['name']} ({Path(leaf.get('file', '?')).name}:{leaf.get('line', '?')})"] += weight
            for name in {frames[i]["name"] + " (" + Path(frames[i].get("file", "?")).name + ")" for i in stack}:
                total_c[name] += weight
    lines = [f"## {path.name}: {n:.1f} s of samples", "", "| self % | function |", "|---|---|"]
    lines += [f"| {100 * w / n:.1f} | `{name}` |" for name, w in self_c.most_common(top)]
    lines += ["", "| total % | function |", "|---|---|"]
    lines += [f"| {100 * w / n:.1f} | `{name}` |" for name, w in total_c.most_common(top)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(summarise(Path(arg)))
