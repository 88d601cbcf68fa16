"""Build a model directory once in the cache, safely when many processes race.

Used for the tiny model (built from a recipe) and for GGUF files (dequantized into a plain Hugging
Face directory). An `fcntl` lock serialises builders, each build goes into a temporary directory
that is atomically renamed into place, and a marker file holding a fingerprint says the directory
is complete. A directory with a stale fingerprint is rebuilt and swapped in.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

MARKER_FILE = ".sglserve-complete"


def build_once(root: str | Path, name: str, fingerprint: str, build: Callable[[Path], None]) -> str:
    """Return `<root>/<name>`, calling `build(staging_dir)` first unless a complete directory with
    this fingerprint is there. Cheap when already built (reads one marker file)."""
    root = Path(root).expanduser().resolve()
    target = root / name
    if is_complete(target, fingerprint):
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / f".{name}.lock"):
        if is_complete(target, fingerprint):  # another process built it while we waited
            return str(target)
        remove_orphans(root, name)  # left by a builder that was killed mid-build
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=root))
        try:
            build(staging)
            (staging / MARKER_FILE).write_text(fingerprint + "\n")
            make_world_readable(staging)  # mkdtemp makes it private; the cache may be shared
            swap_into_place(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def is_complete(target: Path, fingerprint: str) -> bool:
    try:
        return (target / MARKER_FILE).read_text().strip() == fingerprint
    except OSError:
        return False


def remove_orphans(root: Path, name: str) -> None:
    """Delete temporary build/stale directories. Only the lock holder creates them, so with the
    lock held any that exist belong to a dead process."""
    for orphan in root.glob(f".{name}.*-*"):
        if orphan.is_dir():
            shutil.rmtree(orphan, ignore_errors=True)


def make_world_readable(directory: Path) -> None:
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, even on a crash
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def swap_into_place(staging: Path, target: Path) -> None:
    """Move a finished build to `target`; a stale `target` is moved aside first, then deleted.
    Called with the build lock held."""
    stale: Path | None = None
    if target.exists():
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        os.rename(target, stale / "old")
    os.rename(staging, target)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def transformers_progress_bars_hidden() -> Iterator[None]:
    """Silence transformers' own bars while ours covers the work."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
