"""A private multi-node Ray cluster on this machine, whose worker nodes Ray's autoscaler adds and
removes: Ray's fake multi-node provider (`fake_multinode`, the one `ray.cluster_utils.
AutoscalingCluster` uses), with GPU worker nodes that have LOGICAL GPUs (none exist here).

Why not `AutoscalingCluster` itself: its `start()` and `shutdown()` run `ray stop --force`, which
kills every Ray process on the machine by name, other people's clusters included; and its config
template (`fake_multi_node/example.yaml`) is missing from the 2.60 wheel. So this module writes the
autoscaling config itself and starts the head with `ray start --head --block` in a session of its
own, on free ports, with a temp dir of its own (so `ray_current_cluster` is written there, not in
/tmp/ray). `stop()` kills exactly the processes this cluster started: those of its session (the
fake worker nodes are started by the head's autoscaler, inside that session) and those whose
command line names its temp dir. Nothing else is ever signalled.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORKER_TYPE = "gpu_worker"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autoscaling_config(head_resources: dict[str, float], worker_resources: dict[str, float],
                       max_workers: int, idle_timeout_s: float, gcs_address: str) -> dict[str, Any]:
    """The cluster launcher's config for the fake provider: a head and one GPU worker type."""
    return {
        "cluster_name": "sglserve-fake",
        "max_workers": max_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60.0,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,  # the provider's default is port 6379: not ours
        },
        "available_node_types": {
            "ray.head.default": {"resources": head_resources, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {"resources": worker_resources, "node_config": {}, "min_workers": 0,
                          "max_workers": max_workers},
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def session_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state ppid pgrp session ...
    return None if fields[0] == "Z" else int(fields[3])  # a zombie is dead already


def cmdline_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_started_by(session_id: int, marker: str) -> list[int]:
    """PIDs in this session, or whose command line names `marker` (our private temp dir)."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        session = session_of(pid)
        if session is not None and (session == session_id or marker in cmdline_of(pid)):
            found.append(pid)
    return found


def ray_processes() -> set[int]:
    """Every Ray process on the machine (to show that stop() left other people's alone)."""
    return {int(e) for e in os.listdir("/proc") if e.isdigit()
            and any(k in cmdline_of(int(e)) for k in ("/raylet ", "/gcs_server "))}


def kill_started(session_id: int, marker: str, grace_s: float = 5.0, signalled: set[int] | None = None) -> list[int]:
    """SIGTERM, then SIGKILL after `grace_s`, every process this cluster started; returns those
    still alive after that (none expected). `signalled` collects every PID signalled."""
    pids = processes_started_by(session_id, marker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            if signalled is not None:
                signalled.add(pid)
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(session_of(p) is not None for p in pids):
            time.sleep(0.2)
        pids = processes_started_by(session_id, marker)
        if not pids:
            break
    return pids


def kill_leftovers(temp_dir: str) -> list[int]:
    """Kill what a FakeCluster with this temp dir started, from another process (a test's cleanup
    after the process that owned the cluster died); nothing to do if it stopped cleanly."""
    pid_file = Path(temp_dir) / "head.pid"
    session = int(pid_file.read_text()) if pid_file.exists() else -1
    left = kill_started(session, temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)
    return left


class FakeCluster:
    """A head (no GPU) and up to `max_workers` worker nodes of `worker_resources`, added and
    removed by Ray's autoscaler as placement demands; see the module docstring."""

    def __init__(self, head_resources: dict[str, float], worker_resources: dict[str, float],
                 max_workers: int, idle_timeout_s: float = 10.0, temp_dir: str | None = None) -> None:
        self.head_resources = dict(head_resources)
        self.worker_resources = dict(worker_resources)
        self.max_workers = max_workers
        self.idle_timeout_s = idle_timeout_s
        # Short: Ray's unix sockets live under it (a path limit of ~107 characters).
        self.temp_dir = temp_dir or tempfile.mkdtemp(prefix="sgl-fc-", dir="/tmp")
        self.process: subprocess.Popen | None = None
        self.address: str | None = None
        self.signalled: set[int] = set()  # every PID stop() signalled: all ours

    def start(self, timeout_s: float = 120.0, attempts: int = 3) -> str:
        """Start the head; retried because Ray gives a starting raylet a fixed 30 s, which a busy
        machine can miss (tests/conftest.py does the same)."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once(timeout_s)
            except RuntimeError:
                self._kill()  # whatever this attempt started
                if attempt == attempts:
                    shutil.rmtree(self.temp_dir, ignore_errors=True)
                    raise
                time.sleep(5)
        raise AssertionError("unreachable")

    def _start_once(self, timeout_s: float) -> str:
        import ray._private.services as services

        Path(self.temp_dir).mkdir(parents=True, exist_ok=True)
        ip = services.get_node_ip_address()
        port = free_port()
        self.address = f"{ip}:{port}"
        config_path = Path(self.temp_dir) / "autoscaling.json"
        config_path.write_text(json.dumps(autoscaling_config(
            self.head_resources, self.worker_resources, self.max_workers, self.idle_timeout_s, self.address)))
        head = {k: v for k, v in self.head_resources.items() if k not in ("CPU", "GPU")}
        cmd = [
            str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
            f"--port={port}", f"--autoscaling-config={config_path}", f"--temp-dir={self.temp_dir}",
            f"--num-cpus={self.head_resources.get('CPU', 1)}", f"--num-gpus={self.head_resources.get('GPU', 0)}",
            "--include-dashboard=false", "--disable-usage-stats",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}", "--object-store-memory=100000000",
        ]
        if head:
            cmd.append(f"--resources={json.dumps(head)}")
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        log = open(Path(self.temp_dir) / "head.log", "wb")
        self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        # Its session id, for a cleaner that outlives this process (tests/autoscale).
        (Path(self.temp_dir) / "head.pid").write_text(str(self.process.pid))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited: {self.head_log()[-2000:]}")
            if b"Ray runtime started" in (Path(self.temp_dir) / "head.log").read_bytes():
                return self.address
            time.sleep(0.5)
        raise RuntimeError(f"the fake cluster's head did not start in {timeout_s:.0f} s")

    def head_log(self) -> str:
        return (Path(self.temp_dir) / "head.log").read_text(errors="replace")

    def pids(self) -> list[int]:
        return processes_started_by(self.process.pid, self.temp_dir) if self.process else []

    def _kill(self) -> list[int]:
        if self.process is None:
            return []
        left = kill_started(self.process.pid, self.temp_dir, signalled=self.signalled)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.process = None
        return left

    def stop(self) -> list[int]:
        """Kill what this cluster started, by PID; returns any that survived (should be none)."""
        left = self._kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left

    def __enter__(self) -> "FakeCluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
