"""The demo stack for browser tests: ``python -m portal_backoffice`` (mfa-service, the demo
inbox, the portal, the backoffice) on free ports of localhost, and readers for what it sent."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.config import REPO

START_TIMEOUT = 60.0
EXAMPLE = REPO / "examples" / "portal_backoffice"
CODE_RE = re.compile(r"\b(\d{6})\b")
SPOKEN_CODE_RE = re.compile(r"\b(\d(?:, \d){5})\b")  # a voice call reads "1, 2, 3, 4, 5, 6"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def code_in(text: str) -> str | None:
    spoken = SPOKEN_CODE_RE.search(text)
    if spoken:
        return spoken.group(1).replace(", ", "")
    match = CODE_RE.search(text)
    return match.group(1) if match else None


@dataclass
class Stack:
    portal: str  # http://localhost:PORT, no trailing slash
    backoffice: str
    webhook: str  # the demo inbox's HTTP side (messages.json)
    grpc: str  # mfa-service's gRPC address, HOST:PORT (to check what changed, or not)
    process: subprocess.Popen[bytes]
    log_path: Path

    def messages(self) -> list[dict[str, Any]]:
        resp = httpx.get(f"{self.webhook}/messages.json", timeout=5)
        resp.raise_for_status()
        data: list[dict[str, Any]] = resp.json()
        return data

    def last_id(self) -> int:
        return max((m["id"] for m in self.messages()), default=0)

    def code_for(self, to: str, after: int, channel: str | None = None,
                 timeout: float = 10.0) -> str:
        """The code in the first message to ``to`` newer than message id ``after``."""
        deadline = time.monotonic() + timeout
        while True:
            for m in self.messages():
                if m["id"] > after and m["to"] == to and (channel is None
                                                         or m["channel"] == channel):
                    code = code_in(m["text"])
                    if code:
                        return code
            assert time.monotonic() < deadline, f"no code reached {to} in {timeout} s"
            time.sleep(0.05)


def _wait_http(url: str, process: subprocess.Popen[bytes], deadline: float) -> None:
    while True:
        assert process.poll() is None, f"the demo exited with status {process.returncode}"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer in {START_TIMEOUT} s"
        time.sleep(0.1)


def run_stack(log_dir: Path, *extra_args: str) -> Generator[Stack, None, None]:
    """Start the demo (temporary SQLite, removed at exit), yield it, stop it."""
    portal_port, backoffice_port, webhook_port = free_port(), free_port(), free_port()
    grpc_port = free_port()
    # MFA_TEST_SERVICE_COMMAND: run the browser tests against another server build.
    mfa = os.environ.get("MFA_TEST_SERVICE_COMMAND") or Path(sys.executable).parent / "mfa-service"
    log_path = log_dir / "demo.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MFA_", "DEMO_"))}
    # The demo apps from this checkout, whether or not they were pip-installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXAMPLE), env.get("PYTHONPATH")]))
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "portal_backoffice", "--temp",
             "--portal-port", str(portal_port), "--backoffice-port", str(backoffice_port),
             "--webhook-port", str(webhook_port), "--grpc-port", str(grpc_port),
             "--mfa-command", str(mfa),
             "--service-log-level", "WARNING", *extra_args],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=log_dir,
            # Its own process group: a launcher that hangs is killed with its service.
            start_new_session=True)
    stack = Stack(f"http://localhost:{portal_port}", f"http://localhost:{backoffice_port}",
                  f"http://127.0.0.1:{webhook_port}", f"127.0.0.1:{grpc_port}", process,
                  log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        _wait_http(f"http://127.0.0.1:{portal_port}/healthz", process, deadline)
        _wait_http(f"http://127.0.0.1:{backoffice_port}/healthz", process, deadline)
        yield stack
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
