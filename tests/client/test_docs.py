"""docs/client.md's examples, executed against the live test stack: `>>>` blocks as doctests,
`$` lines of console blocks in a shell with the `sglserve` command on the PATH."""

from __future__ import annotations

import doctest
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.client.stacks import CLIENT_DIR

pytestmark = pytest.mark.serve

DOC = Path(__file__).resolve().parents[2] / "docs" / "client.md"
DOC_URL = "http://localhost:8000"


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_python_examples_run(stack):
    text = "\n".join(blocks("pycon")).replace(DOC_URL, stack.base_url)
    test = doctest.DocTestParser().get_doctest(text, {}, "docs/client.md", str(DOC), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 20 and result.failed == 0


def test_console_examples_run(stack, tmp_path):
    shim = tmp_path / "bin" / "sglserve"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m sglserve.client.cli "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}", "SGLSERVE_BASE_URL": stack.base_url,
           "PYTHONPATH": str(CLIENT_DIR)}
    commands = [line[2:] for block in blocks("console") for line in block.splitlines() if line.startswith("$ ")]
    assert any(c.startswith("sglserve bench") for c in commands)
    for command in commands:
        done = subprocess.run(["bash", "-euc", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"{command}: {done.stderr[-1500:]}"
