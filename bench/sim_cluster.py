"""Shared parts of the scheduler benchmarks: a cluster of simulated replicas behind a policy.

Everything runs under the virtual-time loop (bench/virtual_clock.py): times are simulated
seconds, so results do not depend on how busy this machine's CPUs are. The router sees exact,
fresh replica loads (an idealised stats feed; the Ray adapter adds what it sent since the last
snapshot to approximate the same).
"""

from __future__ import annotations

import asyncio
import math
import os
import platform
from dataclasses import dataclass, field

from app.engines.simulated import SimulatedCosts, SimulatedEngine
from app.protocol import GenerateRequest, SamplingParams
from app.scheduler.routing import ReplicaState, RoutingPolicy


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), Python {platform.python_version()}"


@dataclass
class Outcome:
    ttft_s: float
    itl_s: float | None
    total_s: float
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int


@dataclass
class SimCluster:
    engines: dict[str, SimulatedEngine]
    policy: RoutingPolicy
    in_flight: dict[str, int] = field(default_factory=dict)

    @classmethod
    async def start(cls, n: int, costs: SimulatedCosts, policy: RoutingPolicy) -> "SimCluster":
        engines = {f"r{i:02d}": SimulatedEngine(costs, name=f"r{i:02d}") for i in range(n)}
        for engine in engines.values():
            await engine.start()
        return cls(engines, policy, {rid: 0 for rid in engines})

    def states(self) -> list[ReplicaState]:
        out = []
        for rid, engine in self.engines.items():
            outstanding, running, waiting = engine.load()
            out.append(ReplicaState(rid, outstanding, running, waiting))
        return out

    def route(self, token_ids: list[int], session_id: str | None = None, limits: dict[str, int] | None = None) -> str:
        ranking = self.policy.choose(token_ids, self.states(), session_id)
        chosen = ranking[0]
        if limits is not None:  # first replica under its in-flight limit, in policy order
            chosen = next((r for r in ranking if self.in_flight[r] < limits[r]), ranking[0])
        self.policy.on_routed(chosen, token_ids, session_id)
        return chosen

    async def run(self, replica_id: str, token_ids: list[int], max_new_tokens: int) -> tuple[Outcome, list[int]]:
        loop = asyncio.get_running_loop()
        engine = self.engines[replica_id]
        request = GenerateRequest(input_ids=token_ids, sampling=SamplingParams(max_new_tokens=max_new_tokens))
        self.in_flight[replica_id] += 1
        start = loop.time()
        first = None
        output: list[int] = []
        cached = 0
        try:
            async for out in engine.generate(request):
                if out.token_ids and first is None:
                    first = loop.time()
                output.extend(out.token_ids)
                cached = out.cached_tokens
        finally:
            self.in_flight[replica_id] -= 1
        end = loop.time()
        first = end if first is None else first
        itl = (end - first) / (len(output) - 1) if len(output) > 1 else None
        return Outcome(first - start, itl, end - start, len(token_ids), cached, len(output)), output

    def cache_hit_rate(self) -> float:
        hit = sum(e.stats().cache_hit_tokens for e in self.engines.values())
        query = sum(e.stats().cache_query_tokens for e in self.engines.values())
        return hit / query if query else 0.0

    async def stop(self) -> None:
        for engine in self.engines.values():
            await engine.shutdown()
