"""A real ``zeitwork edge`` process with its admin API, for the process-level tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness import HOST, free_port
from tests.integration.test_process import zeitwork_command

STARTUP_TIMEOUT = 30.0


@dataclass
class EdgeProcess:
    proc: subprocess.Popen[bytes]
    http_port: int
    admin_port: int
    data_dir: Path
    log_path: Path

    @property
    def admin_url(self) -> str:
        return f"http://{HOST}:{self.admin_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, token: str | None = None) -> tuple[int, Any]:
        """GET on the admin port: status and parsed JSON (text for non-JSON answers)."""
        req = urllib.request.Request(self.admin_url + path)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as answer:
                status, body, kind = answer.status, answer.read(), answer.headers["content-type"]
        except urllib.error.HTTPError as exc:
            status, body, kind = exc.code, exc.read(), exc.headers["content-type"]
        return status, json.loads(body) if kind == "application/json" else body.decode()

    def wait_for(self, text: str, count: int = 1, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if self.proc.poll() is not None:
                raise AssertionError(f"edge exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the edge's log:\n{self.log()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode


@contextlib.contextmanager
def running_edge(
    database_url: str,
    tmp_path: Path,
    *flags: str,
    env: dict[str, str] | None = None,
    name: str = "edge",
    wait: bool = True,
) -> Iterator[EdgeProcess]:
    """``zeitwork edge`` on free ports, one worker, routing from ``database_url``; waits
    until the worker serves and the admin API listens, and stops it (SIGTERM) afterwards."""
    http_port, admin_port = free_port(), free_port()
    data_dir = tmp_path / f"{name}-data"
    log_path = tmp_path / f"{name}.log"
    environment = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL",)}
    environment.pop("ZEITWORK_ADMIN_TOKEN", None)
    environment.update(env or {})
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [
                *zeitwork_command(),
                "edge",
                "--database-url",
                database_url,
                "--host",
                HOST,
                "--http-port",
                str(http_port),
                "--admin-host",
                HOST,
                "--admin-port",
                str(admin_port),
                "--data-dir",
                str(data_dir),
                "--workers",
                "1",
                *flags,
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=environment,
        )
    edge = EdgeProcess(proc, http_port, admin_port, data_dir, log_path)
    try:
        if wait:
            edge.wait_for("admin API on http://")
            edge.wait_for(" serving http://")
        yield edge
    finally:
        edge.stop()
