"""Fixtures of the job tests: a real redis-server (Debian's package) on a free loopback port, a
local HTTP receiver for callbacks, and helpers for held /run programs."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import free_port

# Standard Webhooks secret ("whsec_" + base64 of the key bytes) and a wrong one.
SECRET = "whsec_" + "c2dsc2VydmUtdGVzdC13ZWJob29rLXNlY3JldC0xMjM0NTY="
WRONG_SECRET = "whsec_" + "b3RoZXItc2VjcmV0LW5vdC10aGUtc2VydmVycy0xMjM0NTY="
RECEIVER_HOST = "127.0.0.2"  # loopback, but a different address than 127.0.0.1 (SSRF tests)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server; .ci/run does it)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes

    @property
    def job(self) -> dict:
        return json.loads(self.body)


@dataclass
class Receiver:
    url: str
    deliveries: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def for_job(self, job_id: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if d.job["id"] == job_id]

    def wait_for(self, job_id: str, timeout_s: float = 180) -> Delivery:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.for_job(job_id)
            if found:
                return found[0]
            time.sleep(0.1)
        raise AssertionError(f"no callback for {job_id} within {timeout_s} s")


@pytest.fixture(scope="session")
def receiver() -> Iterator[Receiver]:
    """An HTTP server that records every POST (the callback target)."""
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            with state.lock:
                state.deliveries.append(Delivery({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((RECEIVER_HOST, 0), Handler)
    state.url = f"http://{RECEIVER_HOST}:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def wait_until(check, timeout_s: float = 240, what: str = "condition"):
    """Poll `check()` until it returns something truthy (errors count as not yet)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - e.g. a restarting Ingress answers 5xx or resets
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")
