"""The package's import graph keeps data flowing one way: engines know nothing of serving, and no
two engine modules import each other (read from the source with `ast`, imports inside functions
included)."""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app"


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("app.")}


def module_name(path: Path) -> str:
    return "app." + ".".join(path.relative_to(APP).with_suffix("").parts)


def test_engines_import_nothing_of_the_serving_layers():
    serving = ("app.scheduler", "app.ingress", "app.replica", "app.deployments")
    for path in (APP / "engines").rglob("*.py"):
        bad = sorted(i for i in imports_of(path) if i.startswith(serving))
        assert not bad, f"{module_name(path)} imports {bad}"


def test_no_two_engine_modules_import_each_other():
    graph = {module_name(p): imports_of(p) for p in (APP / "engines").rglob("*.py")}
    cycles = sorted((a, b) for a, deps in graph.items() for b in deps if a < b and a in graph.get(b, set()))
    assert not cycles, f"engine modules importing each other: {cycles}"
