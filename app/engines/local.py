"""Build an engine that runs in the calling process (what the replica or the engine process hosts).

`app.engines.factory` picks between this and the engine process; the engine process
(`app.engines.process`) builds its engine here. Neither imports the other, so there is no cycle.
Heavy engines are imported only when chosen.
"""

from __future__ import annotations

from app.config import AppSettings
from app.engines.base import Engine
from app.errors import EngineError


def make_local_engine(settings: AppSettings) -> Engine:
    kind = settings.engine.kind
    if kind == "embedded":
        from app.engines.embedded import EmbeddedEngine

        return EmbeddedEngine(settings.model, settings.engine)
    if kind == "sglang":
        from app.engines.sglang_engine import SGLangEngine

        return SGLangEngine(settings.model, settings.engine)
    if kind == "simulated":
        from app.engines.simulated import SimulatedCosts, SimulatedEngine

        return SimulatedEngine(SimulatedCosts(**settings.engine.simulated_costs), name=settings.model.name)
    raise EngineError(f"unknown engine kind {kind!r}: expected embedded, sglang or simulated")
