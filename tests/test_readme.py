"""README.md stays true: its settings reference is the code's, and its commands are what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from app.config import readme_with_settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_settings_reference_matches_the_code():
    text = README.read_text()
    assert text == readme_with_settings(text), "run: .venv/bin/python -m app.config --update-readme"


def test_ci_runs_the_readme_commands():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "readme_block setup" in ci and "readme_block test" in ci
    text = README.read_text()
    for block in ("setup", "test"):
        assert re.search(rf"<!-- ci:{block} -->\n```bash\n.+?\n```\n<!-- /ci:{block} -->", text, re.S)


def test_start_command_uses_the_shipped_config():
    assert "serve run serve_config.yaml" in README.read_text()
    assert (README.parent / "serve_config.yaml").exists()
