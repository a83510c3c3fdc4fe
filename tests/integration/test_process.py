"""The real ``zeitwork edge`` command: worker processes, signals, restarts, startup errors.

Each test starts the console script as a subprocess in its own session on a free port, with
a threaded HTTP/1.1 upstream in the test process. The fixture kills every process of that
session (by pid) afterwards, whatever happened; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import HOST, free_port

STARTUP_TIMEOUT = 20.0


def zeitwork_command() -> list[str]:
    script = Path(sys.executable).parent / "zeitwork"
    return [str(script)] if script.exists() else [sys.executable, "-m", "edge.cli"]


# -- upstream ------------------------------------------------------------------------------


class _UpstreamServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    arrived: threading.Event
    release: threading.Event


class _EchoHandler(BaseHTTPRequestHandler):
    """Answers JSON describing the request; ``/slow?s=1.5`` answers after that long."""

    protocol_version = "HTTP/1.1"
    server: _UpstreamServer

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/slow":
            self.server.arrived.set()
            delay = float(parse_qs(url.query).get("s", ["1"])[0])
            if self.server.release.wait(delay):
                return  # the test is over: drop the connection
        body = json.dumps(
            {
                "path": self.path,
                "host": self.headers.get("Host"),
                "request_id": self.headers.get("X-Request-Id"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class ThreadUpstream:
    server: _UpstreamServer
    thread: threading.Thread

    @property
    def address(self) -> str:
        return f"{HOST}:{self.server.server_address[1]}"

    @property
    def arrived(self) -> threading.Event:
        return self.server.arrived


@pytest.fixture
def upstream() -> Iterator[ThreadUpstream]:
    server = _UpstreamServer((HOST, 0), _EchoHandler)
    server.arrived = threading.Event()
    server.release = threading.Event()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield ThreadUpstream(server, thread)
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


# -- the edge process ----------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The fields after "(comm)": state ppid pgrp ...
    return text.rpartition(")")[2].split()


def _processes() -> Iterator[tuple[int, list[str]]]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                yield int(entry.name), fields


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def wait_gone(pids: set[int], timeout: float) -> None:
    wait_for(lambda: not any(alive(p) for p in pids), timeout, f"processes {sorted(pids)} to exit")


@dataclass
class EdgeProcess:
    proc: subprocess.Popen[bytes]
    port: int
    routes_path: Path
    log_path: Path
    workers: int
    seen: set[int] = field(default_factory=set)  # every worker pid ever observed

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        pids = []
        for pid, fields in _processes():
            if int(fields[1]) == self.pid and fields[0] != "Z":
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"spawn_main" in cmdline:  # not multiprocessing's resource tracker
                    pids.append(pid)
        self.seen.update(pids)
        return sorted(pids)

    def wait_serving(self, count: int | None = None) -> None:
        """Wait until ``count`` 'serving' lines were logged (default: one per worker)."""
        count = self.workers if count is None else count

        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"zeitwork edge exited with {self.proc.returncode}:\n{self.log()}")
            return self.log().count(" serving http://") >= count

        wait_for(ready, STARTUP_TIMEOUT, f"{count} worker(s) serving\n{self.log()}")

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def signal_group(self, signum: int) -> None:
        """As a terminal does (Ctrl-C reaches the whole foreground process group)."""
        os.killpg(self.pid, signum)

    def set_routes(self, routes: dict[str, list[str]]) -> None:
        write_atomically(self.routes_path, json.dumps({"routes": routes}))

    def kill_everything(self) -> None:
        """SIGKILL the master and every process of its session, each by pid."""
        pids = {pid for pid, fields in _processes() if int(fields[2]) == self.pid}
        pids |= {p for p in self.seen if alive(p)}
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


StartEdge = Callable[..., EdgeProcess]


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[StartEdge]:
    """``edge(routes, workers=1, *flags)`` starts ``zeitwork edge`` and waits until it serves."""
    started: list[EdgeProcess] = []

    def start(
        routes: dict[str, list[str]],
        *flags: str,
        workers: int = 1,
        port: int | None = None,
        wait: bool = True,
    ) -> EdgeProcess:
        port = port or free_port()
        routes_path = tmp_path / f"routes-{len(started)}.json"
        write_atomically(routes_path, json.dumps({"routes": routes}))
        log_path = tmp_path / f"edge-{len(started)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    *zeitwork_command(),
                    "edge",
                    "--routes",
                    str(routes_path),
                    "--host",
                    HOST,
                    "--http-port",
                    str(port),
                    "--workers",
                    str(workers),
                    "--admin-port",
                    "0",
                    *flags,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = EdgeProcess(proc, port, routes_path, log_path, workers)
        started.append(process)
        if wait:
            process.wait_serving()
            process.worker_pids()
        return process

    try:
        yield start
    finally:
        for process in started:
            process.kill_everything()


# -- clients -------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, str]:
        return json.loads(self.body)  # type: ignore[no-any-return]


def fetch(
    conn: http.client.HTTPConnection, host: str, path: str = "/", *, close: bool = False
) -> Reply:
    headers = {"Host": host}
    if close:
        headers["Connection"] = "close"
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    body = resp.read()
    return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)


def fetch_new(port: int, host: str, path: str = "/", timeout: float = 5.0) -> Reply:
    """One request on a new connection."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        return fetch(conn, host, path, close=True)
    finally:
        conn.close()


@contextlib.contextmanager
def fetch_in_background(
    port: int, host: str, path: str, *, join_timeout: float
) -> Iterator[list[Reply | BaseException]]:
    """Run ``fetch_new`` (timeout 10 s) in a thread during the block; the list yielded gets
    its reply or exception. Leaving the block waits up to ``join_timeout`` for the thread."""
    result: list[Reply | BaseException] = []

    def run() -> None:
        try:
            result.append(fetch_new(port, host, path, timeout=10))
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield result
    finally:
        thread.join(join_timeout)


def run_edge_command(*args: str) -> subprocess.CompletedProcess[bytes]:
    """``zeitwork edge *args`` to completion (bounded), its output captured."""
    return subprocess.run(
        [*zeitwork_command(), "edge", *args],
        capture_output=True,
        timeout=STARTUP_TIMEOUT,
        check=False,
    )


class KeptAliveLoop:
    """Requests in a loop on one kept-alive connection, in a thread, counting failures."""

    def __init__(self, port: int, host: str) -> None:
        self.conn = http.client.HTTPConnection(HOST, port, timeout=5)
        self.host = host
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> KeptAliveLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.conn.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reply = fetch(self.conn, self.host)
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(repr(exc))
                return  # the connection is gone: that is the failure being counted
            if reply.status == 200:
                self.ok += 1
            else:
                self.failures.append(f"status {reply.status}")
            time.sleep(0.005)


# -- tests ---------------------------------------------------------------------------------


def test_two_workers_serve_one_port(edge: StartEdge, upstream: ThreadUpstream) -> None:
    process = edge({"app.example.com": [upstream.address]}, workers=2)
    workers = process.worker_pids()
    assert len(workers) == 2, process.log()
    assert process.pid not in workers
    prefixes = set()
    for _ in range(60):
        reply = fetch_new(process.port, "app.example.com")
        assert reply.status == 200
        prefixes.add(reply.json()["request_id"][:20])  # the per-worker random part
        if len(prefixes) == 2:
            break
    assert len(prefixes) == 2, "every connection went to the same worker"
    listeners = [
        line
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if line.split()[1].endswith(f":{process.port:04X}") and line.split()[3] == "0A"
    ]
    assert len(listeners) == 2  # two LISTEN sockets on one port: SO_REUSEPORT


def test_sighup_reloads_routes_without_dropping_connections(
    edge: StartEdge, upstream: ThreadUpstream
) -> None:
    up = upstream.address
    process = edge({"old.example.com": [up], "both.example.com": [up]}, workers=2)
    kept = http.client.HTTPConnection(HOST, process.port, timeout=5)
    try:
        assert fetch(kept, "old.example.com").status == 200
        with KeptAliveLoop(process.port, "both.example.com") as loop:
            time.sleep(0.1)
            process.set_routes({"new.example.com": [up], "both.example.com": [up]})
            process.signal(signal.SIGHUP)

            def switched() -> bool:
                # Both workers: ten new connections in a row see the new table.
                return all(
                    fetch_new(process.port, "new.example.com").status == 200 for _ in range(10)
                )

            wait_for(switched, 10, "the new routes in every worker")
            time.sleep(0.1)
        assert loop.failures == []
        assert loop.ok > 0
        # The connection opened before the reload is still served, by the new table.
        assert fetch(kept, "new.example.com").status == 200
        assert fetch(kept, "old.example.com").status == 404
        assert fetch_new(process.port, "old.example.com").status == 404
    finally:
        kept.close()


def test_sighup_with_invalid_routes_keeps_the_current_table(
    edge: StartEdge, upstream: ThreadUpstream
) -> None:
    process = edge({"app.example.com": [upstream.address]}, workers=2)
    with KeptAliveLoop(process.port, "app.example.com") as loop:
        time.sleep(0.1)
        write_atomically(process.routes_path, '{"routes": {"app.example.com": [}')
        process.signal(signal.SIGHUP)
        wait_for(lambda: "invalid" in process.log(), 5, "the reload error in the log")
        time.sleep(0.3)
        for _ in range(10):
            assert fetch_new(process.port, "app.example.com").status == 200
    assert loop.failures == []
    assert loop.ok > 0
    log = process.log()
    assert str(process.routes_path) in log
    assert "Traceback" not in log
    assert process.proc.poll() is None


def test_sigterm_finishes_in_flight_request_then_exits_0(
    edge: StartEdge, upstream: ThreadUpstream
) -> None:
    process = edge({"app.example.com": [upstream.address]}, "--shutdown-timeout", "10")
    with fetch_in_background(
        process.port, "app.example.com", "/slow?s=3", join_timeout=10
    ) as result:
        assert upstream.arrived.wait(5), "the slow request never reached the upstream"
        started = time.monotonic()
        process.signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                socket.create_connection((HOST, process.port), timeout=0.5).close()
            except ConnectionRefusedError:
                return True
            return False

        wait_for(refused, 2.0, "new connections to be refused")
        assert result == [], "refusal must come while the in-flight request is still running"
    [reply] = result
    assert isinstance(reply, Reply), reply
    assert reply.status == 200
    assert reply.json()["path"] == "/slow?s=3"
    assert process.proc.wait(10) == 0
    assert time.monotonic() - started < 10
    log = process.log()
    assert "Traceback" not in log
    wait_gone(process.seen, 2)


def test_second_sigint_exits_at_once(edge: StartEdge, upstream: ThreadUpstream) -> None:
    process = edge({"app.example.com": [upstream.address]}, "--shutdown-timeout", "30")
    with fetch_in_background(
        process.port, "app.example.com", "/slow?s=20", join_timeout=12
    ) as result:
        assert upstream.arrived.wait(5)
        process.signal_group(signal.SIGINT)
        time.sleep(0.5)
        assert process.proc.poll() is None, "the first interrupt must wait for in-flight work"
        process.signal_group(signal.SIGINT)
        started = time.monotonic()
        try:
            code = process.proc.wait(3)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 3 s after the second interrupt:\n{process.log()}")
        assert time.monotonic() - started < 1.5
        assert code != 0
        wait_gone(process.seen, 1)
    [outcome] = result
    assert not (isinstance(outcome, Reply) and outcome.status == 200)


def test_crashed_worker_is_restarted(edge: StartEdge, upstream: ThreadUpstream) -> None:
    process = edge({"app.example.com": [upstream.address]}, workers=2)
    first = process.worker_pids()
    assert len(first) == 2
    os.kill(first[0], signal.SIGKILL)

    def replaced() -> bool:
        pids = process.worker_pids()
        return len(pids) == 2 and first[0] not in pids

    wait_for(replaced, 10, "the killed worker to be replaced")
    process.wait_serving(count=3)
    assert first[1] in process.worker_pids()  # the other worker was left alone
    for _ in range(20):
        assert fetch_new(process.port, "app.example.com").status == 200
    assert process.proc.poll() is None
    assert "exited" in process.log()


def test_port_in_use_exits_with_a_clear_message(edge: StartEdge, upstream: ThreadUpstream) -> None:
    with socket.socket() as blocker:
        blocker.bind((HOST, 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        process = edge({"app.example.com": [upstream.address]}, port=port, wait=False)
        try:
            code = process.proc.wait(STARTUP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"did not exit with the port taken:\n{process.log()}")
    log = process.log()
    assert code != 0
    assert "Address already in use" in log or "in use" in log.lower(), log
    assert str(port) in log
    assert "Traceback" not in log


def test_invalid_routes_file_exits_2_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.write_text('{"routes": {"app.example.com": ["127.0.0.1:99999"]}}')
    proc = run_edge_command("--routes", str(path), "--http-port", str(free_port()))
    err = proc.stderr.decode()
    assert proc.returncode == 2
    assert str(path) in err
    assert "Traceback" not in err


def test_unreadable_json_exits_2_naming_line(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.write_text('{\n  "routes": {\n    "app.example.com": ["127.0.0.1:9001",]\n  }\n}\n')
    proc = run_edge_command("--routes", str(path))
    err = proc.stderr.decode()
    assert proc.returncode == 2
    assert str(path) in err
    assert "line 3" in err


def _requests_counted(admin_port: int) -> tuple[float, set[str]]:
    """http_requests_total{status="200"} in a scrape of the admin port, and the names."""
    with urllib.request.urlopen(f"http://{HOST}:{admin_port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    families = list(text_string_to_metric_families(text))
    count = sum(
        s.value
        for f in families
        for s in f.samples
        if s.name == "http_requests_total" and s.labels.get("status") == "200"
    )
    return count, {f.name for f in families}


def test_one_scrape_counts_every_worker(
    edge: StartEdge, upstream: ThreadUpstream, tmp_path: Path
) -> None:
    admin_port = free_port()
    process = edge(
        {"app.example.com": [upstream.address]},
        "--admin-port",
        str(admin_port),
        "--admin-host",
        HOST,
        "--data-dir",
        str(tmp_path / "data"),
        workers=2,
    )
    prefixes = set()
    for _ in range(40):
        reply = fetch_new(process.port, "app.example.com")
        assert reply.status == 200
        prefixes.add(reply.json()["request_id"][:20])
    assert len(prefixes) == 2, "the requests did not reach both workers"
    # Workers publish their counts once a second.
    wait_for(lambda: _requests_counted(admin_port)[0] == 40, 5, "40 requests in the scrape")
    _, names = _requests_counted(admin_port)
    assert {"http_request_duration_seconds", "zeitwork_upstream_duration_seconds"} <= names
    # A worker dies: what it counted stays in the sum, which never goes back.
    first = process.worker_pids()
    os.kill(first[0], signal.SIGKILL)
    wait_for(
        lambda: len(process.worker_pids()) == 2 and first[0] not in process.worker_pids(),
        10,
        "the killed worker to be replaced",
    )
    process.wait_serving(count=3)
    assert _requests_counted(admin_port)[0] == 40
    for _ in range(10):
        assert fetch_new(process.port, "app.example.com").status == 200
    wait_for(lambda: _requests_counted(admin_port)[0] == 50, 5, "50 requests in the scrape")
