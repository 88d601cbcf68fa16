"""A real Prometheus server for the observability tests.

`prometheus` (module scope) installs Debian's `prometheus` package if the binary is missing
(as root, with apt-get; the test is skipped, saying why, only if that fails), starts it on a free
loopback port with a generated config that scrapes the test Ray cluster's metrics export port,
and stops it by PID at the end.

Why the scrape interval is not 1 s: Ray's metrics agent keeps the series of every application a
session deployed (Serve's controller and proxy go on reporting them), so its exposition grows over
the suite: measured 0.3 MB at the start, 8 MB (18,000 lines) and 1.1-1.4 s to serve after 12
minutes of tests on this 2-core machine. Prometheus's scrape timeout cannot exceed its interval;
at 1 s the scrapes began to time out, every series went stale, and baselines read as 0. Tests
therefore read values only from a successful scrape (`Prometheus.at_one_scrape`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

T = TypeVar("T")

SCRAPE_INTERVAL_S = 5  # also the scrape timeout: see the module docstring
EXPORT_LAG_S = 2.0  # RAY_metrics_report_interval_ms (1 s, tests/conftest.py) twice: worker -> agent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _install_prometheus() -> str | None:
    """Debian's package, the way .ci/run installs it. Returns why it failed, or None."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "the prometheus binary is missing and apt-get cannot be run as root here"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "prometheus"]
    for commands in ([install], [["apt-get", "update", "-qq"], install]):
        try:
            for command in commands:
                subprocess.run(command, env=env, check=True, capture_output=True, timeout=600)
            return None
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            error = exc
    return f"`apt-get install -y prometheus` failed: {error}"


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        problem = _install_prometheus()
        found = shutil.which("prometheus")
        if found is None:
            pytest.skip(f"no Prometheus server: {problem}")
    return found


def ray_metrics_port() -> int:
    """The metrics export port of the session's Ray node (tests/conftest.py fixes it)."""
    import ray

    return ray._private.worker._global_node.metrics_export_port


@dataclass
class Prometheus:
    url: str
    scrape_target: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        resp = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        resp.raise_for_status()
        body = resp.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> float:
        """The single value of a scalar-like query (`sum(...)`); 0 when no series exists yet."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr} returned {len(result)} series; wrap it in sum()"
        return float(result[0]["value"][1]) if result else 0.0

    def series(self, selector: str) -> dict[tuple, float]:
        """Each series' value of a selector (no aggregation), keyed by its labels."""
        return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in self.query(selector)}

    def increase(self, selector: str, before: dict[tuple, float]) -> float:
        """How much the series of `selector` grew since `before` (a `series` snapshot). Summed per
        series, so a series that went away meanwhile (an earlier test's replica, once Ray stops
        exporting it) does not read as a drop, and a new series counts from zero."""
        return sum(value - before.get(key, 0.0) for key, value in self.series(selector).items())

    def last_scrape(self) -> tuple[float, bool]:
        """(timestamp, succeeded) of the latest scrape of Ray's metrics port; (0, False) if none."""
        stamp = self.query('timestamp(up{job="ray"})')
        up = self.query('up{job="ray"}')
        return (float(stamp[0]["value"][1]) if stamp else 0.0), bool(up) and float(up[0]["value"][1]) == 1.0

    def scrape_health(self) -> dict[str, float]:
        """What to print when a wait fails: how the recent scrapes of Ray's port went."""
        window = f"[{SCRAPE_INTERVAL_S * 12}s]"
        return {
            "up": self.value('sum(up{job="ray"})'),
            "scrapes_ok_recently": self.value(f'sum(sum_over_time(up{{job="ray"}}{window}))'),
            "scrapes_recently": self.value(f'sum(count_over_time(up{{job="ray"}}{window}))'),
            "scrape_duration_s": self.value('sum(scrape_duration_seconds{job="ray"})'),
            "samples_scraped": self.value('sum(scrape_samples_scraped{job="ray"})'),
        }

    def at_one_scrape(self, read: Callable[[], T], after: float, timeout_s: float = 90.0) -> tuple[float, T]:
        """`read()` taken while the latest scrape is a successful one made at or after `after`
        (wall-clock seconds), and still the latest once read: a failed scrape marks every series
        stale, and a snapshot taken then would miss them. Returns (that scrape's time, the value)."""
        deadline = time.monotonic() + timeout_s
        while True:
            stamp, ok = self.last_scrape()
            if ok and stamp >= after:
                value = read()
                if self.last_scrape() == (stamp, True):
                    return stamp, value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no successful scrape of Ray's metrics port after {after:.1f} in {timeout_s:g} s: "
                    f"{self.scrape_health()}"
                )
            time.sleep(0.3)

    def settled(self, read: Callable[[], T], timeout_s: float = 120.0) -> T:
        """A baseline: what `read()` gives at two successive successful scrapes, the first made
        after earlier traffic can have reached Ray's agent. Equal twice means nothing was still
        landing."""
        deadline = time.monotonic() + timeout_s
        stamp, last = self.at_one_scrape(read, after=time.time() + EXPORT_LAG_S)
        while True:
            stamp, now = self.at_one_scrape(read, after=stamp + 0.001)
            if now == last:
                return now
            if time.monotonic() > deadline:
                raise AssertionError(f"metrics kept changing for {timeout_s:g} s: {now}")
            last = now

    def settled_values(self, exprs: list[str]) -> dict[str, float]:
        return self.settled(lambda: {e: self.value(e) for e in exprs})

    def wait_for(self, check: Callable[[], bool], timeout_s: float = 90.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"Prometheus did not show {what or 'the expected values'} in {timeout_s:g} s "
                    f"(scrapes: {self.scrape_health()})"
                )
            time.sleep(0.5)


# Module scope: only test_obs_prometheus.py uses it, and the scrapes cost Ray's agent CPU (a
# second per 8 MB exposition), which the rest of the suite should not pay for.
@pytest.fixture(scope="module")
def prometheus(ray_cluster, tmp_path_factory) -> Iterator[Prometheus]:
    binary = prometheus_binary()
    workdir: Path = tmp_path_factory.mktemp("prometheus")
    target = f"127.0.0.1:{ray_metrics_port()}"
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n"
        f"  scrape_interval: {SCRAPE_INTERVAL_S}s\n"
        f"  scrape_timeout: {SCRAPE_INTERVAL_S}s\n"
        f"  evaluation_interval: {SCRAPE_INTERVAL_S}s\n"
        "scrape_configs:\n"
        "  - job_name: ray\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n"
    )
    port = free_port()
    log = open(workdir / "prometheus.log", "wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {process.returncode}: {(workdir / 'prometheus.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("prometheus did not become ready in 60 s")
            time.sleep(0.3)
        server = Prometheus(url=url, scrape_target=target)
        # Prometheus applies new targets after a few seconds: wait for a first successful scrape,
        # so that baselines taken by the tests are real values, not "no data yet".
        server.wait_for(lambda: server.value('sum(up{job="ray"})') == 1, timeout_s=60, what="a first scrape")
        yield server
    finally:
        process.terminate()  # by PID: only the server this fixture started
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="session")
def scrape_ray_metrics(ray_cluster) -> Callable[[], str]:
    """Returns a function giving the Prometheus exposition Ray's metrics agent serves right now."""

    def scrape() -> str:
        resp = httpx.get(f"http://127.0.0.1:{ray_metrics_port()}/metrics", timeout=10)
        resp.raise_for_status()
        return resp.text

    return scrape


def metric_names(exposition: str) -> set[str]:
    return {
        line.split("{", 1)[0].split(" ", 1)[0]
        for line in exposition.splitlines()
        if line and not line.startswith("#")
    }


@pytest.fixture(scope="session")
def exported_metric_names(scrape_ray_metrics) -> Callable[[], set[str]]:
    """Returns a function giving the metric names a scrape of Ray's endpoint shows right now."""
    return lambda: metric_names(scrape_ray_metrics())
