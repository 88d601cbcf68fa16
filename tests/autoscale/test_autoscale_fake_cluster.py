"""Autoscaling end to end on a fake multi-node Ray cluster (the short run of bench/autoscale.py).

The cluster is NOT this pytest session's: `python -m bench.autoscale --ci` runs in a subprocess of
its own, which starts its own private Ray cluster (bench/fake_cluster.py: a head, and GPU worker
nodes that Ray's autoscaler adds and removes) and offers a load step over HTTP. Whatever happens,
this test then kills, by PID, everything that subprocess and its cluster started (nothing else:
never `ray stop`). Bounded in time: the run has TIMEOUT_S.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bench.fake_cluster import kill_leftovers, kill_started

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 540  # ~3 min on a quiet machine; 5 on this shared 2-core one (Ray's start-ups stretch)


def run_ci_step(tmp_path: Path) -> tuple[int, str, dict | None]:
    temp_dir = tempfile.mkdtemp(prefix="sgl-ci-", dir="/tmp")  # short: Ray's unix sockets live in it
    out, log = tmp_path / "timeline.json", tmp_path / "bench.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.autoscale", "--ci", "--temp-dir", temp_dir, "--json", str(out)],
            cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # the bench stops its cluster in `finally`
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            rc = -1
        finally:
            left = kill_started(proc.pid, temp_dir) + kill_leftovers(temp_dir)
    text = log.read_text(errors="replace")
    assert not left, f"processes survived the cleanup: {left}"
    return rc, text, json.loads(out.read_text()) if out.exists() else None


@pytest.mark.timeout(TIMEOUT_S + 120)  # the suite's 300 s default would cut the run short
def test_replicas_and_nodes_follow_a_load_step_with_no_failed_request(tmp_path):
    rc, log, result = run_ci_step(tmp_path)
    assert rc == 0 and result is not None, log[-4000:]
    summary, rows = result["summary"], result["rows"]
    assert summary["failed"] == 0, summary
    assert summary["completed"] + summary["refused"] == summary["requests"], summary

    start, peak, end = summary["replicas_min_max_end"]
    assert peak >= 2, f"the load step did not scale replicas up: {summary}"
    assert end == 1, f"replicas did not come back down: {summary}"
    nodes_start, nodes_max, nodes_end = summary["nodes_start_max_end"]
    assert nodes_max >= 2 and nodes_max > nodes_start, f"Ray's autoscaler added no node: {summary}"
    assert nodes_end <= 1, f"idle nodes were not removed: {summary}"
    # One way up, then one way down: no oscillation.
    assert summary["direction_reversals"] == 1, summary["target_changes"]
    assert any(r["nodes"] and r["nodes"] >= 2 for r in rows)
