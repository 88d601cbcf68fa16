"""`pip install ./client` alone, in a fresh venv without torch or ray, gives a working SDK and CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.client.stacks import CLIENT_DIR

pytestmark = [pytest.mark.client_install, pytest.mark.serve]


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    python = shutil.which("python3.11") or sys.executable
    root = tmp_path_factory.mktemp("client-venv")
    venv = root / "venv"
    # A copy, so that the build leaves nothing behind in the repository.
    source = shutil.copytree(CLIENT_DIR, root / "client", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(source)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-2000:]
    return venv


def test_import_needs_neither_torch_nor_ray(client_venv):
    code = ("import sys, sglserve.client as c; assert c.Client and c.AsyncClient and c.SGLangClient; "
            "heavy = {'torch', 'ray', 'app', 'transformers'} & set(sys.modules); assert not heavy, heavy; "
            "import importlib.util as u; assert u.find_spec('torch') is None and u.find_spec('ray') is None")
    subprocess.run([str(client_venv / "bin" / "python"), "-c", code], check=True, timeout=120, cwd="/")


def test_the_installed_cli_talks_to_the_server(client_venv, stack, tmp_path):
    env = {**os.environ, "SGLSERVE_BASE_URL": stack.base_url, "PYTHONPATH": ""}
    cli = str(client_venv / "bin" / "sglserve")
    chat = subprocess.run([cli, "chat", "Hello!", "--max-tokens", "8", "--temperature", "0"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
    script = tmp_path / "colour.sgl"
    script.write_text('Q: name a colour.\nA:{gen("colour", max_tokens=4, temperature=0)}\n')
    run = subprocess.run([cli, "run", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and '"colour"' in run.stdout, run.stderr
    script.write_text('{gen("colour", max_tokens=4}')
    bad = subprocess.run([cli, "run", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "line 1, column" in bad.stderr and "^" in bad.stderr
    bench = subprocess.run([cli, "bench", "--requests", "4", "--concurrency", "2", "--max-tokens", "8"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert bench.returncode == 0 and '"ttft_p50_ms"' in bench.stdout and "4/4" in bench.stderr, bench.stderr
