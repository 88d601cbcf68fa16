"""The embedded engine: continuous batching on PyTorch with HF weights (see engine.py)."""

from app.engines.embedded.engine import EmbeddedEngine

__all__ = ["EmbeddedEngine"]
