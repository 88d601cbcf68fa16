"""Build the engine named by the settings: the embedded engine in a process of its own when
`engine.separate_process` is set, otherwise in this process (`app.engines.local`)."""

from __future__ import annotations

from app.config import AppSettings
from app.engines.base import Engine
from app.engines.local import make_local_engine


def make_engine(settings: AppSettings) -> Engine:
    if settings.engine.kind == "embedded" and settings.engine.separate_process:
        from app.engines.process import ProcessEngine

        return ProcessEngine(settings)
    return make_local_engine(settings)
