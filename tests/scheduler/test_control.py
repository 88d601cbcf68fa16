"""The adaptive concurrency controller converges to the largest limit that holds the SLOs."""

from __future__ import annotations

import random

import pytest

from app.scheduler.control import AdaptiveConcurrency


def run_plant(ctl: AdaptiveConcurrency, itl_ms_at, windows: int, rng: random.Random) -> list[int]:
    """A replica whose ITL grows linearly with its in-flight count (the limit, saturated)."""
    limits = []
    for _ in range(windows):
        for _ in range(ctl.window):
            itl = itl_ms_at(ctl.limit) * rng.uniform(0.9, 1.05)
            ctl.observe(ttft_ms=50.0, itl_ms=itl, in_flight=ctl.limit)
        limits.append(ctl.limit)
    return limits


def test_grows_to_the_slo_and_settles_in_the_band() -> None:
    ctl = AdaptiveConcurrency(slo_ttft_ms=500, slo_itl_ms=20, min_limit=1, max_limit=512, initial=4)
    limits = run_plant(ctl, lambda n: 8 + 0.1 * n, windows=60, rng=random.Random(1))
    # ITL p95 ~ 1.05 * (8 + 0.1 n) <= 20  <=>  n <= ~110; the band keeps it at >= ~90% pressure.
    assert limits[0] > 4, "it grows while the SLO holds"
    settled = limits[-20:]
    assert all(80 <= n <= 115 for n in settled), settled
    assert max(settled) - min(settled) <= 15, f"oscillates: {settled}"


def test_backs_off_when_the_workload_gets_heavier() -> None:
    ctl = AdaptiveConcurrency(slo_ttft_ms=500, slo_itl_ms=20, initial=4, max_limit=512)
    rng = random.Random(2)
    run_plant(ctl, lambda n: 8 + 0.1 * n, windows=60, rng=rng)
    before = ctl.limit
    limits = run_plant(ctl, lambda n: 8 + 0.2 * n, windows=5, rng=rng)  # decode got 2x costlier
    assert limits[0] < before, "the first broken window already backs off"
    assert all(35 <= n <= 58 for n in limits[-2:]), limits


def test_ttft_slo_also_binds() -> None:
    ctl = AdaptiveConcurrency(slo_ttft_ms=200, slo_itl_ms=1000, initial=64, max_limit=512)
    for _ in range(10 * ctl.window):
        ctl.observe(ttft_ms=4.0 * ctl.limit, itl_ms=5.0, in_flight=ctl.limit)  # TTFT = 4 ms * n
    assert 40 <= ctl.limit <= 50


def test_does_not_grow_a_limit_that_is_not_the_bound() -> None:
    ctl = AdaptiveConcurrency(slo_ttft_ms=500, slo_itl_ms=20, initial=16)
    for _ in range(10 * ctl.window):
        ctl.observe(ttft_ms=10, itl_ms=5, in_flight=3)  # light load: only 3 in flight
    assert ctl.limit == 16


def test_never_leaves_its_bounds_and_rejects_bad_settings() -> None:
    ctl = AdaptiveConcurrency(slo_ttft_ms=100, slo_itl_ms=10, min_limit=2, max_limit=8, initial=4)
    for _ in range(5 * ctl.window):
        ctl.observe(ttft_ms=10_000, itl_ms=10_000)
    assert ctl.limit == 2
    for _ in range(20 * ctl.window):
        ctl.observe(ttft_ms=1, itl_ms=1)
    assert ctl.limit == 8
    with pytest.raises(ValueError):
        AdaptiveConcurrency(slo_ttft_ms=0, slo_itl_ms=10, min_limit=1, max_limit=2, initial=1)
    with pytest.raises(ValueError):
        AdaptiveConcurrency(slo_ttft_ms=1, slo_itl_ms=10, min_limit=5, max_limit=2, initial=1)


def test_a_new_replica_starts_at_the_engines_batch_capacity_not_throttled():
    """Cold start: the first completion creates the replica's controller; admission must then allow
    the engine's max_running_requests, not a small fraction of it (which queued half of 32 clients)."""
    import time

    from app.config import AppSettings
    from app.protocol import GenerateOutput
    from app.scheduler.admission import AdmissionQueue
    from app.scheduler.deployment import InFlightLimits

    settings = AppSettings.from_args({"engine": {"max_running_requests": 48},
                                      "scheduler": {"min_in_flight_per_replica": 8, "max_in_flight_per_replica": 256}})
    admission = AdmissionQueue(max_queue=100, max_concurrent=256, max_queue_wait_s=30.0)
    limits = InFlightLimits(admission, settings)
    now = time.time()
    limits.observe(GenerateOutput(rid="a", completion_tokens=4, first_token_time=now - 0.2, served_by="r1"),
                   admitted_at=now - 0.3)
    assert limits.stats() == {"r1": 48}
    assert admission.max_concurrent == 48
    # and the settings still bound it: a capacity above max_in_flight_per_replica is clipped
    settings.scheduler.max_in_flight_per_replica = 32
    assert InFlightLimits(admission, settings).initial_limit == 32
