"""The proxy benchmark suite: the Zeitwork edge beside nginx and HAProxy, scenario by scenario.

What it measures: for each scenario of :mod:`bench.scenarios` (small keep-alive requests,
64 KiB responses, 1 MiB uploads, a new connection per request, TLS kept-alive and new
handshakes, rate limiting on, idle connections) and each proxy it runs (the edge with
``--workers 1``, nginx with ``worker_processes 1``, HAProxy with ``nbthread 1``, the edge
routing from PostgreSQL), requests/s and latency (p50/p99/p99.9) from wrk, the CPU time the
proxy's processes used (so requests per CPU-second: what one core would serve), and for
the idle connections the proxy's memory before and after opening them.

How: one upstream (an nginx worker: 12 bytes on ``/``, a 64 KiB file on ``/64k``, and
``/upload`` that reads the whole body before answering with its length) sits behind every
proxy. Each proxy runs in processes of its own for each way a scenario configures it
(plain HTTP, TLS, the edge rate limiting, sized for idle connections), each listening on a
free 127.0.0.1 port; everything is started first and checked with one request of each
scenario. Then, for several rounds, every (scenario, proxy) cell is driven in turn by wrk
after an uncounted warm-up, so that drift of the machine hits all alike, and ratios are
taken to nginx in the same scenario and round. During each run the benchmark also reads
how much CPU other processes used: a run they disturbed is flagged, and medians leave
disturbed rounds out where undisturbed ones exist (:mod:`bench.report`). The results go
to bench/results/suite.md and a chart to bench/results/suite.png. A run with errors (wrk's
non-2xx/3xx or socket errors, short bodies, uploads the upstream did not get whole) is
reported and makes the exit status 1.

Run from the repository root: ``.venv/bin/python -m bench`` (the whole suite, defaults: 3
rounds of 8 s) or e.g. ``--scenarios keepalive,tls --proxies edge,nginx``. Needs nginx and
its echo module (Debian packages nginx-light, libnginx-mod-http-echo), wrk (wrk) and
haproxy (haproxy); each only where a chosen scenario or proxy needs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import http.client
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

from bench.errors import BenchError, ToolMissingError
from bench.idle import FD_MARGIN, IdleConnectionError, open_idle, raise_nofile_limit
from bench.procfs import (
    Memory,
    cpu_snapshot,
    is_disturbed,
    others_cores_between,
    session_memory,
)
from bench.report import (
    IdleMeasurement,
    Measurement,
    Report,
    format_kb,
    format_mb,
    format_ms,
    format_per_core,
    format_round_table,
    format_summary,
    render_markdown,
)
from bench.scenarios import (
    EDGE_PROXIES,
    PROXIES,
    SCENARIOS,
    BenchConfig,
    Scenario,
    default_edge_cmd,
    setup_of,
)
from bench.wrk import WRK_THREADS, WrkResult, parse_wrk_output, wrk_argv

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results" / "suite.md"
HOST = "127.0.0.1"
VHOST = "bench.local"
UPSTREAM_BODY = b"hello world\n"
# The upstream's /64k: a fixed pattern, so that a body can be checked byte for byte.
BODY_64K = (b"zeitwork-bench-64k-" * 3500)[: SCENARIOS["64k"].response_bytes]
# The edge's limit in the rate-limited scenario: a rate no client reaches.
UNREACHED_LIMIT = "1000000000/1000000000"
# The TLS suites of all proxies for TLS 1.2 (TLS 1.3's are OpenSSL's AEAD defaults).
TLS_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
# Keep-alive timeout of every proxy in the idle scenario: long past the measurement.
IDLE_KEEPALIVE_S = 300
# Let the proxy settle after the last idle connection before its memory is read: up to a
# second for 10,000 connections.
IDLE_SETTLE_S_PER_CONNECTION = 1e-4
IDLE_OPEN_TIMEOUT_S = 120.0
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
# wrk stops on its own after -d; this only bounds a wrk that hangs.
WRK_GRACE_S = 30.0
# Debian package that provides each external tool.
TOOL_PACKAGES = {
    "nginx": "nginx-light",
    "wrk": "wrk",
    "haproxy": "haproxy",
    "nginx echo module": "libnginx-mod-http-echo",
}
ECHO_MODULE = "ngx_http_echo_module.so"


# --- external tools ------------------------------------------------------------------------


@dataclass(frozen=True)
class Tools:
    nginx: str
    wrk: str
    # None: not installed, which only HAProxy cells mind.
    haproxy: str | None = None
    # The dynamic module the upstream's /upload needs; None: not installed or not looked for.
    echo_module: str | None = None


def which(name: str) -> str | None:
    # Debian installs nginx in /usr/sbin, which is not on a normal user's PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


def tools_missing(names: Sequence[str]) -> ToolMissingError:
    return ToolMissingError(
        "; ".join(
            f"{name} not found (Debian package {TOOL_PACKAGES[name]}: "
            f"apt-get install {TOOL_PACKAGES[name]})"
            for name in names
        )
    )


def find_echo_module(nginx: str) -> str | None:
    """The echo module's file in nginx's modules directory (from ``nginx -V``)."""
    modules = Path("/usr/lib/nginx/modules")
    if match := re.search(r"--modules-path=(\S+)", _output([nginx, "-V"])):
        modules = Path(match.group(1))
    path = modules / ECHO_MODULE
    return str(path) if path.is_file() else None


def find_tools(config: BenchConfig | None = None) -> Tools:
    """Locate the tools, naming every missing one that ``config`` needs and its Debian
    package: nginx and wrk always, haproxy for HAProxy cells, nginx's echo module for the
    upload scenario."""
    config = config or BenchConfig(scenarios=("keepalive",), proxies=("nginx",))
    found = {name: which(name) for name in ("nginx", "wrk", "haproxy")}
    needed = ["nginx", "wrk", *(["haproxy"] if "haproxy" in config.proxies_used() else [])]
    missing = [name for name in needed if found[name] is None]
    echo = None
    if found["nginx"] is not None and "upload" in config.scenarios:
        echo = find_echo_module(found["nginx"])
        if echo is None:
            missing.append("nginx echo module")
    if missing:
        raise tools_missing(missing)
    nginx, wrk = found["nginx"], found["wrk"]
    assert nginx is not None and wrk is not None
    return Tools(nginx=nginx, wrk=wrk, haproxy=found["haproxy"], echo_module=echo)


# --- processes -----------------------------------------------------------------------------


def free_port() -> int:
    # The port is released before the server binds it; a collision in that instant fails the
    # start loudly rather than measuring the wrong process.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _pdeathsig_setter() -> Callable[[], None] | None:
    """A preexec_fn by which the kernel sends SIGTERM to the child when the benchmark dies.

    It covers what no finally block can: the benchmark itself killed with SIGKILL.
    """
    if sys.platform != "linux":
        return None
    try:
        # Looked up here, before any fork: the child should only make the call.
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def set_pdeathsig() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return set_pdeathsig


_PREEXEC = _pdeathsig_setter()


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM meanwhile, so a second Ctrl-C cannot abandon the cleanup."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in saved:
        signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    logs: tuple[Path, ...]

    def log_tail(self, lines: int = 20) -> str:
        parts = []
        for log in self.logs:
            with contextlib.suppress(OSError):
                text = log.read_text(errors="replace").splitlines()[-lines:]
                if text:
                    parts.append(f"--- last lines of {log.name} ---\n" + "\n".join(text))
        return "\n".join(parts) if parts else "(no log output)"

    def check_alive(self, when: str) -> None:
        code = self.proc.poll()
        if code is not None:
            raise BenchError(f"{self.name} exited with code {code} {when}\n{self.log_tail()}")


class ProcessSet:
    """Servers started by the benchmark, stopped together on exit whatever happened.

    Each runs in a session of its own: Ctrl-C on the terminal then reaches only the benchmark,
    which stops them all, and signalling the process group also reaches the workers that nginx
    or the edge forked.
    """

    def __init__(self) -> None:
        self._servers: list[Server] = []

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(
        self, name: str, argv: Sequence[str], port: int, log: Path, extra_logs: Sequence[Path] = ()
    ) -> Server:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_PREEXEC,
            )
        server = Server(name=name, port=port, proc=proc, logs=(log, *extra_logs))
        self._servers.append(server)
        return server

    def stop_all(self, timeout: float = STOP_TIMEOUT_S) -> None:
        with _signals_deferred():
            servers, self._servers = self._servers, []
            for server in servers:
                _signal_group(server.proc, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for server in servers:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.proc.wait(max(0.0, deadline - time.monotonic()))
            for server in servers:
                # Also after a clean exit of the leader: kills any worker it left behind.
                _signal_group(server.proc, signal.SIGKILL)
                server.proc.wait()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def run_wrk(argv: Sequence[str], duration: int) -> str:
    """Run wrk and return its report; a failing wrk is a BenchError."""
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            preexec_fn=_PREEXEC,
            capture_output=True,
            text=True,
            timeout=duration + WRK_GRACE_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(
            f"wrk did not finish within {duration + WRK_GRACE_S:.0f} s: {shlex.join(argv)}"
        ) from None
    if done.returncode != 0:
        raise BenchError(
            f"wrk failed (exit {done.returncode}): {shlex.join(argv)}\n{done.stdout}{done.stderr}"
        )
    return done.stdout


def http_request(
    port: int,
    *,
    scheme: str = "http",
    method: str = "GET",
    path: str = "/",
    body: bytes | None = None,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    conn: http.client.HTTPConnection
    if scheme == "https":
        # The benchmark's own certificate: what is checked here is the answer, not the name.
        conn = http.client.HTTPSConnection(
            HOST, port, timeout=timeout, context=ssl._create_unverified_context()
        )
    else:
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Host": VHOST})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_ready(server: Server, scheme: str = "http", timeout: float = START_TIMEOUT_S) -> None:
    """Wait until ``GET /`` through ``server`` returns 200 with the upstream's body."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        server.check_alive("before answering GET /")
        try:
            status, body = http_request(server.port, scheme=scheme, timeout=2.0)
        except (OSError, http.client.HTTPException) as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if status == 200 and body == UPSTREAM_BODY:
                return
            last = f"HTTP {status} with body {body[:100]!r}"
        time.sleep(0.05)
    raise BenchError(
        f"{server.name} did not answer GET / on {HOST}:{server.port} with 200 "
        f"within {timeout:.0f} s (last attempt: {last})\n{server.log_tail()}"
    )


def check_scenario(server: Server, scenario: Scenario) -> None:
    """One request of ``scenario`` through ``server``, checked whole before anything is
    measured: the 64 KiB body byte for byte, the upload's length as the upstream received it."""
    if scenario.kind != "wrk" or scenario.path == "/":
        return
    body = b"z" * scenario.body_bytes if scenario.body_bytes else None
    try:
        status, answer = http_request(
            server.port,
            scheme=scenario.scheme,
            method=scenario.method,
            path=scenario.path,
            body=body,
            timeout=10.0,
        )
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(
            f"{server.name}: {scenario.method} {scenario.path} failed: {exc}\n{server.log_tail()}"
        ) from None
    problem = None
    if status != 200:
        problem = f"HTTP {status} with body {answer[:100]!r}"
    elif scenario.name == "64k" and answer != BODY_64K:
        problem = f"a body of {len(answer)} bytes, not the upstream's {len(BODY_64K)}"
    elif body is not None and int(answer or b"0") < len(body):
        # The upstream answers with its $request_length: request head and body.
        problem = f"the upstream received {int(answer or b'0')} bytes of a {len(body)}-byte body"
    if problem:
        raise BenchError(
            f"{server.name}: {scenario.method} {scenario.path} gave {problem}\n{server.log_tail()}"
        )


# --- configurations ------------------------------------------------------------------------


def _nginx_conf(
    prefix: Path,
    http_block: str,
    *,
    worker_connections: int = 4096,
    keepalive_timeout: int = 75,
    main: str = "",
) -> str:
    # Temp paths are set explicitly because Debian's compiled-in ones live in /var/lib/nginx.
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # worker_connections counts client and upstream connections alike, one descriptor each.
    nofile = (
        f"worker_rlimit_nofile {worker_connections + 1024};\n" if worker_connections > 4096 else ""
    )
    # Started by root, nginx would run its workers as nobody, who cannot read what the
    # benchmark wrote (the /64k file) in its private temp dir: they run as root then too.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""\
{main}{user}worker_processes 1;
{nofile}daemon off;
master_process on;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{
    worker_connections {worker_connections};
}}
http {{
    access_log off;
{temp}
    # Clients keep their connections for the whole run, as wrk expects.
    keepalive_requests 1000000;
    keepalive_timeout {keepalive_timeout}s;
{http_block}}}
"""


def upstream_conf(prefix: Path, port: int, echo_module: str | None = None) -> str:
    """The upstream every proxy forwards to: 12 bytes on ``/``, the file ``64k`` (written
    by :func:`start_upstream`) on ``/64k``, and with ``echo_module`` ``/upload``, which reads
    the whole body into memory, then answers with ``$request_length`` (head and body) and
    logs it to ``upload.log``."""
    body = UPSTREAM_BODY.decode().replace("\n", "\\n")
    upload = (
        f"""\
        location = /upload {{
            echo_read_request_body;
            # An internal redirect once the body is in: "return" then answers with a
            # Content-Length, and the log line is written where the answer is made.
            echo_exec /uploaded;
        }}
        location = /uploaded {{
            internal;
            access_log {prefix / "upload.log"} request_length;
            default_type text/plain;
            return 200 "$request_length\\n";
        }}
"""
        if echo_module
        else ""
    )
    return _nginx_conf(
        prefix,
        f"""\
    log_format request_length '$request_length';
    server {{
        listen {HOST}:{port};
        client_max_body_size 2m;
        client_body_buffer_size 2m;
        location = /64k {{
            root {prefix / "files"};
            default_type application/octet-stream;
            open_file_cache max=16;
        }}
{upload}\
        location / {{
            default_type text/plain;
            return 200 "{body}";
        }}
    }}
""",
        main=f"load_module {echo_module};\n" if echo_module else "",
    )


def nginx_proxy_conf(
    prefix: Path, port: int, upstream_port: int, *, idle_connections: int | None = None
) -> str:
    """The reference proxy; with ``idle_connections`` sized and timed for that many idle
    client connections."""
    worker_connections, keepalive_timeout = 4096, 75
    if idle_connections is not None:
        worker_connections = max(4096, idle_connections + 1024)
        keepalive_timeout = IDLE_KEEPALIVE_S
    return _nginx_conf(
        prefix,
        f"""\
    upstream backend {{
        server {HOST}:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {HOST}:{port} default_server;
        return 404;
    }}
    server {{
        # Host routing and forwarding headers: the work the edge does too.
        listen {HOST}:{port};
        server_name {VHOST};
        # Uploads are streamed to the upstream as they arrive, as the edge and HAProxy do;
        # nginx's default would first read each whole body (to a temp file past 16 KiB).
        # Streaming through its default 16 KiB buffer costs nginx about twice the CPU per
        # upload; 256 KiB is what the edge reads at a time (uvloop's read buffer).
        client_max_body_size 2m;
        proxy_request_buffering off;
        client_body_buffer_size 256k;
        # Responses are buffered in memory only, never in a temp file.
        proxy_max_temp_file_size 0;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
""",
        worker_connections=worker_connections,
        keepalive_timeout=keepalive_timeout,
    )


def nginx_tls_proxy_conf(prefix: Path, port: int, upstream_port: int, cert: Path, key: Path) -> str:
    """The reference proxy of :func:`nginx_proxy_conf`, terminating TLS as the edge does:
    TLS 1.2 and 1.3, the same suites, session tickets and a session cache."""
    plain = nginx_proxy_conf(prefix, port, upstream_port)
    tls = f"""\
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ciphers {TLS_CIPHERS};
    ssl_prefer_server_ciphers on;
    ssl_session_cache shared:SSL:10m;
    ssl_session_tickets on;
    upstream backend {{"""
    return plain.replace("    upstream backend {", tls, 1).replace(
        f"listen {HOST}:{port}", f"listen {HOST}:{port} ssl"
    )


def haproxy_proxy_conf(
    port: int,
    upstream_port: int,
    pem: Path | None = None,
    *,
    idle_connections: int | None = None,
) -> str:
    """The second reference proxy: HAProxy doing what :func:`nginx_proxy_conf` does, on one
    thread; with ``pem`` (certificate and key in one file) terminating TLS like
    :func:`nginx_tls_proxy_conf`: TLS 1.2 and 1.3, the same suites (TLS 1.3's are OpenSSL's
    defaults), session cache and tickets (HAProxy's defaults). With ``idle_connections``
    sized and timed for that many idle client connections. Bodies are streamed both ways
    (HAProxy buffers a request body only with ``option http-buffer-request``)."""
    tls = (
        f"""\
    ssl-default-bind-options ssl-min-ver TLSv1.2
    ssl-default-bind-ciphers {TLS_CIPHERS}
"""
        if pem
        else ""
    )
    maxconn = 4096 if idle_connections is None else max(4096, idle_connections + 1024)
    # HAProxy asks for two descriptors per connection (client and server side), more than
    # a hard limit of twice the idle connections may allow. It needs only one per idle
    # client connection (server connections are pooled): so it runs with the limit it gets
    # (a warning) instead of refusing to start.
    nofile = "    no strict-limits\n" if idle_connections is not None else ""
    # nginx's: client_header_timeout 60 s, keepalive_timeout 75 s (an idle client connection).
    client, keepalive = (60, 75) if idle_connections is None else (IDLE_KEEPALIVE_S,) * 2
    bind = f"bind {HOST}:{port}" + (f" ssl crt {pem}" if pem else "")
    # No "log" line anywhere: nothing is logged, like nginx's access_log off.
    return f"""\
global
    nbthread 1
    maxconn {maxconn}
{nofile}{tls}
defaults
    mode http
    option http-keep-alive
    http-reuse always
    # nginx's proxy_connect/read/send_timeout and client_header_timeout 60 s.
    timeout connect 60s
    timeout client {client}s
    timeout server 60s
    timeout http-request 60s
    timeout http-keep-alive {keepalive}s

frontend bench
    {bind}
    # Host routing and forwarding headers: the work the edge and nginx do too.
    http-request deny deny_status 404 unless {{ hdr(host) -i {VHOST} }}
    option forwardfor
    http-request set-header X-Forwarded-Proto {"https" if pem else "http"}
    default_backend upstream

backend upstream
    server upstream {HOST}:{upstream_port}
"""


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """An ECDSA P-256 certificate for VHOST from a throwaway CA (wrk does not verify it); every
    proxy serves this one."""
    # Imported here: only the TLS scenarios need it.
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    from edge import localca  # noqa: PLC0415

    ca, ca_key = localca.new_ca("zeitwork bench CA", days=2)
    cert, key = localca.issue(ca, ca_key, [VHOST], days=2)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "bench.crt", directory / "bench.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(localca.key_pem(key))
    return cert_path, key_path


def start_nginx(
    procs: ProcessSet, nginx: str, name: str, prefix: Path, port: int, conf: str
) -> Server:
    prefix.mkdir(parents=True, exist_ok=True)
    conf_path = prefix / "nginx.conf"
    conf_path.write_text(conf)
    # -e: startup messages go to our log instead of Debian's /var/log/nginx/error.log.
    argv = [nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf_path)]
    return procs.start(name, argv, port, prefix / "stdout.log", extra_logs=[prefix / "error.log"])


def start_upstream(procs: ProcessSet, tools: Tools, prefix: Path, port: int) -> Server:
    (prefix / "files").mkdir(parents=True)
    (prefix / "files" / "64k").write_bytes(BODY_64K)
    conf = upstream_conf(prefix, port, tools.echo_module)
    return start_nginx(procs, tools.nginx, "upstream", prefix, port, conf)


def start_haproxy(
    procs: ProcessSet,
    haproxy: str,
    name: str,
    prefix: Path,
    port: int,
    upstream_port: int,
    certificate: tuple[Path, Path] | None = None,
    idle_connections: int | None = None,
) -> Server:
    prefix.mkdir(parents=True)
    pem = None
    if certificate is not None:
        # HAProxy's "crt" takes the certificate and its key in one PEM file.
        pem = prefix / "bench.pem"
        pem.write_bytes(b"".join(path.read_bytes() for path in certificate))
    conf_path = prefix / "haproxy.cfg"
    conf_path.write_text(
        haproxy_proxy_conf(port, upstream_port, pem, idle_connections=idle_connections)
    )
    # -db: in the foreground, as the leader of the session whose CPU time is counted.
    argv = [haproxy, "-db", "-f", str(conf_path)]
    return procs.start(name, argv, port, prefix / "haproxy.log")


def start_edge(
    procs: ProcessSet,
    edge_cmd: Sequence[str],
    workdir: Path,
    port: int,
    upstream_port: int,
    database_url: str | None = None,
    name: str = "edge",
    extra: Sequence[str] = (),
) -> Server:
    if not edge_cmd or which(edge_cmd[0]) is None:
        raise BenchError(
            f"edge command not found: {shlex.join(edge_cmd)!r}; install the project first "
            "(.venv/bin/pip install -e '.[dev]') or pass --edge-cmd"
        )
    workdir.mkdir(parents=True)
    if database_url is None:
        routes = workdir / "routes.json"
        routes.write_text(json.dumps({"routes": {VHOST: [f"{HOST}:{upstream_port}"]}}))
        source = ["--routes", str(routes)]
    else:
        source = ["--database-url", database_url]
    argv = [
        *edge_cmd,
        "edge",
        *source,
        "--http-port",
        str(port),
        "--workers",
        "1",
        *_edge_host_args(tuple(edge_cmd)),
        *extra,
    ]
    return procs.start(name, argv, port, workdir / "edge.log")


@contextlib.contextmanager
def seeded_database(upstream_port: int) -> Iterator[str]:
    """A scratch platform database in which VHOST is a verified custom domain whose current
    deployment's one running, healthy instance is the upstream; dropped afterwards."""
    # Imported here: the other proxies need neither asyncpg nor the store.
    from bench.propagation import (  # noqa: PLC0415
        admin_url,
        create_scratch_database,
        drop_scratch_database,
    )
    from edge.store import (  # noqa: PLC0415
        deployments,
        domains,
        environments,
        instances,
        projects,
        regions,
    )
    from edge.store.db import connect  # noqa: PLC0415

    server = admin_url(None)

    async def create() -> str:
        dsn = await create_scratch_database(server)
        conn = await connect(dsn)
        try:
            await regions.create(conn, "bench", "Bench", "DE")
            project = await projects.create(conn, "bench", "app")
            env = await environments.create(conn, project.id, "production")
            deployment = await deployments.create(
                conn, project_id=project.id, environment_id=env.id, image="bench"
            )
            for source, target in deployments.PATH_TO_HEALTHY:
                await deployments.transition(conn, deployment.id, source, target)
            row = await instances.create(conn, deployment_id=deployment.id, region="bench")
            await instances.report(conn, row.id, "running", address=HOST, port=upstream_port)
            await instances.set_health(conn, row.id, True)
            await environments.set_current(conn, env.id, deployment.id)
            await deployments.transition(conn, deployment.id, "healthy", "active")
            domain = await domains.create(conn, VHOST, project_id=project.id, environment_id=env.id)
            await domains.record_check(conn, domain.id, verified=True, pointing=True)
        except BaseException:
            await drop_scratch_database(server, dsn)
            raise
        finally:
            await conn.close()
        return dsn

    dsn = asyncio.run(create())
    try:
        yield dsn
    finally:
        asyncio.run(drop_scratch_database(server, dsn))


@functools.cache
def _edge_host_args(edge_cmd: tuple[str, ...]) -> tuple[str, ...]:
    # Keep the edge on loopback like everything else here, where the CLI lets us choose, and
    # without its admin API (measured here is the proxy, and the port may be taken).
    args: list[str] = []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            [*edge_cmd, "edge", "--help"], capture_output=True, text=True, timeout=20, check=False
        )
        for flag in ("--host", "--http-host"):
            if re.search(rf"(?<![\w-]){flag}(?![\w-])", done.stdout):
                args += [flag, HOST]
                break
        if re.search(r"(?<![\w-])--admin-port(?![\w-])", done.stdout):
            args += ["--admin-port", "0"]
    return tuple(args)


# --- the benchmark -------------------------------------------------------------------------


@dataclass
class Cell:
    """One scenario with one proxy, and the proxy's processes."""

    scenario: Scenario
    proxy: str
    server: Server
    # Idle scenario: the proxy's memory as started and checked with one request. Every
    # round's figure is compared to it, since what a process once took it mostly keeps.
    baseline: Memory | None = None


def start_proxy(
    procs: ProcessSet,
    tools: Tools,
    config: BenchConfig,
    workdir: Path,
    scenario: Scenario,
    proxy: str,
    upstream: Server,
    certificate: tuple[Path, Path] | None,
    database_url: str | None,
) -> Server:
    """Start ``proxy`` set up for ``scenario`` in front of ``upstream`` (not waited for)."""
    name = f"{proxy} ({setup_of(scenario, proxy)})"
    port = free_port()
    idle = config.idle_connections if scenario.kind == "idle" else None
    tls = certificate if scenario.scheme == "https" else None
    if scenario.scheme == "https" and certificate is None:
        raise BenchError(f"{name}: a TLS scenario needs the run's certificate")
    if proxy in EDGE_PROXIES:
        extra: list[str] = []
        https = None
        if tls is not None:
            https = free_port()
            extra += ["--https-port", str(https), "--no-https-redirect"]
            extra += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
        if scenario.rate_limited:
            extra += ["--rate-limit", UNREACHED_LIMIT]
        if idle is not None:
            extra += ["--keepalive-timeout", str(IDLE_KEEPALIVE_S)]
        dsn = database_url if proxy == "edge-pg" else None
        if proxy == "edge-pg" and dsn is None:
            raise BenchError(f"{name}: no database to route from")
        server = start_edge(procs, config.edge_cmd, workdir, port, upstream.port, dsn, name, extra)
        if https is not None:
            server.port = https
        return server
    if proxy == "haproxy":
        if tools.haproxy is None:
            raise tools_missing(["haproxy"])
        return start_haproxy(
            procs, tools.haproxy, name, workdir, port, upstream.port, tls, idle_connections=idle
        )
    if tls is not None:
        conf = nginx_tls_proxy_conf(workdir, port, upstream.port, *tls)
    else:
        conf = nginx_proxy_conf(workdir, port, upstream.port, idle_connections=idle)
    return start_nginx(procs, tools.nginx, name, workdir, port, conf)


def _upload_lengths(log: Path, offset: int) -> list[int]:
    """Request lengths the upstream logged for uploads past byte ``offset`` of its log."""
    try:
        with log.open("rb") as f:
            f.seek(offset)
            return [int(line) for line in f.read().split()]
    except FileNotFoundError:
        return []


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def measure_wrk(
    tools: Tools,
    config: BenchConfig,
    cell: Cell,
    round_no: int,
    upstream: Server,
    sessions: Sequence[int],
    say: Callable[[str], None],
) -> Measurement:
    """One measured wrk run of ``cell`` (after its warm-up), with the CPU time of the proxy
    and of everything else, and the checks of what came back."""
    scenario, server = cell.scenario, cell.server

    def argv(duration: int) -> list[str]:
        return wrk_argv(
            tools.wrk,
            HOST,
            server.port,
            scenario,
            vhost=VHOST,
            duration=duration,
            connections=config.connections,
        )

    if config.warmup:
        warm = parse_wrk_output(run_wrk(argv(config.warmup), config.warmup))
        # Not counted, but a hint when the measured run then fails too.
        if warm.errors:
            say(f"(warm-up of {server.name}: {warm.describe_errors()})")
    upload_log = upstream.logs[0].parent / "upload.log"
    offset = _size(upload_log)
    before = cpu_snapshot(sessions)
    output = run_wrk(argv(config.duration), config.duration)
    after = cpu_snapshot(sessions)
    # A proxy that crashed mid-run would otherwise show up as mere socket errors.
    for proc in (server, upstream):
        proc.check_alive(f"during round {round_no} of {server.name}")
    result = parse_wrk_output(output)
    pid = server.proc.pid
    others = others_cores_between(before, after)
    lengths = _upload_lengths(upload_log, offset) if scenario.body_bytes else None
    return Measurement(
        round=round_no,
        scenario=scenario.name,
        proxy=cell.proxy,
        result=result,
        cpu_s=after.sessions_s[pid] - before.sessions_s[pid],
        others_cores=others,
        disturbed=is_disturbed(others, config.disturbed_cores),
        problems=tuple(answer_problems(scenario, result, lengths)),
        upstream_requests=None if lengths is None else len(lengths),
        upstream_bytes=None if lengths is None else sum(lengths),
    )


def answer_problems(
    scenario: Scenario, result: WrkResult, upload_lengths: Sequence[int] | None = None
) -> list[str]:
    """What is wrong with a run's answers: wrk read less than the scenario's bodies, or the
    upstream (``upload_lengths``: the request lengths it logged) got uploads short or not
    at all."""
    problems = []
    if result.bytes_read < result.requests * scenario.response_bytes:
        problems.append(
            f"wrk read {result.bytes_read:,} bytes for {result.requests:,} responses, less "
            f"than their {scenario.response_bytes:,}-byte bodies"
        )
    if scenario.body_bytes and upload_lengths is not None:
        if short := sum(1 for n in upload_lengths if n < scenario.body_bytes):
            problems.append(
                f"the upstream got {short} upload(s) shorter than {scenario.body_bytes:,} bytes"
            )
        if len(upload_lengths) < (answered := result.requests - result.non_2xx_3xx):
            problems.append(
                f"the upstream answered {len(upload_lengths):,} uploads, wrk got "
                f"{answered:,} answers"
            )
    return problems


def measure_idle(config: BenchConfig, cell: Cell, round_no: int) -> IdleMeasurement:
    """Memory of ``cell``'s proxy with ``config.idle_connections`` idle connections, beside
    its baseline; a failure to open them all is recorded, not raised."""
    server = cell.server
    before = cell.baseline or session_memory(server.proc.pid)
    pid = server.proc.pid
    count = config.idle_connections
    request = f"GET / HTTP/1.1\r\nHost: {VHOST}\r\n\r\n".encode()
    try:
        conns = open_idle(HOST, server.port, count, request, timeout=IDLE_OPEN_TIMEOUT_S)
    except IdleConnectionError as exc:
        server.check_alive(f"while opening idle connections in round {round_no}")
        return IdleMeasurement(round_no, cell.proxy, count, before, error=str(exc))
    with conns:
        time.sleep(min(1.0, 0.1 + count * IDLE_SETTLE_S_PER_CONNECTION))
        after = session_memory(pid)
        closed = conns.closed_by_peer()
    server.check_alive(f"with idle connections in round {round_no}")
    return IdleMeasurement(
        round_no, cell.proxy, count, before, after, open_s=conns.open_s, closed_by_peer=closed
    )


def _describe(m: Measurement | IdleMeasurement) -> str:
    if isinstance(m, IdleMeasurement):
        if m.after is None:
            return f"!! {m.error}"
        text = (
            f"{m.connections:,} idle connections opened in {m.open_s:.1f} s: Pss "
            f"{format_mb(m.before.pss)} -> {format_mb(m.after.pss)} "
            f"({format_kb(m.per_connection_bytes)} per connection)"
        )
        return text + (f" !! {m.closed_by_peer} closed by the proxy" if m.failed else "")
    text = (
        f"{m.result.requests_per_sec:,.0f} req/s, {format_per_core(m.per_core)} req/CPU-s, "
        f"p99 {format_ms(m.result.p99_ms)}, others {m.others_cores or 0:.2f} cores"
    )
    if m.disturbed:
        text += " (disturbed)"
    return text + (f" !! {m.describe_problems()}" if m.failed else "")


def estimated_seconds(config: BenchConfig) -> float:
    """Rough wall time of a run: the wrk runs and warm-ups, a few seconds per idle cell, the
    start-up."""
    wrk = sum(1 for s, _ in config.cells() if s.kind == "wrk")
    idle = len(config.cells()) - wrk
    per_round = wrk * (config.duration + config.warmup + 0.3) + idle * (
        2 + config.idle_connections / 2000
    )
    return 10 + config.rounds * per_round


def run_benchmark(
    config: BenchConfig, tools: Tools | None = None, out: TextIO = sys.stdout
) -> Report:
    """Start the upstream and every cell, drive them round after round, stop everything."""
    tools = tools or find_tools(config)
    if "haproxy" in config.proxies_used() and tools.haproxy is None:
        raise tools_missing(["haproxy"])
    if "upload" in config.scenarios and tools.echo_module is None:
        raise tools_missing(["nginx echo module"])
    report = Report(config=config, environment=collect_environment(tools))
    cells_config = config.cells()
    if any(s.kind == "idle" for s, _ in cells_config):
        # The servers started below inherit the limit: each idle connection takes a
        # descriptor here and one in the proxy (whose upstream connections are pooled).
        raise_nofile_limit(config.idle_connections + FD_MARGIN)

    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    with contextlib.ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="zeitwork-bench-"))
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        # Entered after the temp dir, so exited first: processes stop before their dir goes.
        procs = stack.enter_context(ProcessSet())

        certificate = None
        if any(s.scheme == "https" for s, _ in cells_config):
            certificate = make_certificate(tmp / "certificate")
        port = free_port()
        upstream = start_upstream(procs, tools, tmp / "upstream", port)
        wait_ready(upstream)
        dsn = None
        if "edge-pg" in config.proxies_used():
            dsn = stack.enter_context(seeded_database(upstream.port))
        # One set of processes per proxy and setup, shared by the scenarios that use it.
        servers: dict[tuple[str, str], Server] = {}
        cells = []
        for scenario, proxy in cells_config:
            setup = setup_of(scenario, proxy)
            if (proxy, setup) not in servers:
                servers[proxy, setup] = start_proxy(
                    procs,
                    tools,
                    config,
                    tmp / f"{proxy}-{setup}",
                    scenario,
                    proxy,
                    upstream,
                    certificate,
                    dsn,
                )
            cells.append(Cell(scenario, proxy, servers[proxy, setup]))
        ready: set[int] = set()
        for cell in cells:
            if cell.server.port not in ready:
                wait_ready(cell.server, cell.scenario.scheme)
                ready.add(cell.server.port)
            check_scenario(cell.server, cell.scenario)
        sessions = [upstream.proc.pid, *(server.proc.pid for server in servers.values())]
        for cell in cells:
            if cell.scenario.kind == "idle":
                cell.baseline = session_memory(cell.server.proc.pid)
        say(
            f"upstream nginx on :{upstream.port}; "
            + ", ".join(f"{s.name} on :{s.port}" for s in servers.values())
        )
        say(
            f"wrk -t{WRK_THREADS} -c{config.connections} -d{config.duration}s --latency, "
            f"{config.warmup} s warm-up per run, {config.rounds} round(s); about "
            f"{estimated_seconds(config) / 60:.0f} min"
        )
        for round_no in range(1, config.rounds + 1):
            for cell in cells:
                measurement: Measurement | IdleMeasurement
                if cell.scenario.kind == "idle":
                    measurement = measure_idle(config, cell, round_no)
                    report.idle.append(measurement)
                else:
                    measurement = measure_wrk(
                        tools, config, cell, round_no, upstream, sessions, say
                    )
                    report.measurements.append(measurement)
                say(
                    f"round {round_no}, {cell.scenario.name} {cell.proxy}: {_describe(measurement)}"
                )
            say()
            say(format_round_table(report, round_no))
            say()
        return report


def _output(argv: list[str]) -> str:
    """stdout and stderr of a short command, stripped; empty if it cannot run."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return (done.stdout + done.stderr).strip()
    return ""


def collect_environment(tools: Tools) -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    git = ["git", "-C", str(REPO_ROOT)]
    commit = _output([*git, "rev-parse", "--short", "HEAD"])
    commit = commit if re.fullmatch(r"[0-9a-f]{4,40}", commit) else "(none)"
    # Figures taken on an edge with uncommitted changes must not pass for the commit's.
    if _output([*git, "status", "--porcelain", "--", "edge"]):
        commit += " (edge/ modified)"
    nginx = _output([tools.nginx, "-v"]).removeprefix("nginx version: ")
    wrk = _output([tools.wrk, "--version"]).split(" [")[0]
    haproxy = ""
    if tools.haproxy:
        # "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/"
        first = _output([tools.haproxy, "-v"]).partition("\n")[0].split()
        haproxy = f"HAProxy {first[2]}" if first[:2] == ["HAProxy", "version"] else ""
    return {
        "cpu": f"{os.cpu_count()} x {cpu}",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": nginx or "nginx ?",
        "haproxy": haproxy or "HAProxy ?",
        "wrk": wrk or "wrk ?",
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
    }


# --- command line --------------------------------------------------------------------------


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = BenchConfig(edge_cmd=default_edge_cmd())
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="The proxy benchmark suite: the Zeitwork edge beside nginx and HAProxy, "
        "every scenario with every proxy, interleaved rounds of wrk.",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="comma-separated, among " + ",".join(SCENARIOS) + " (default: all)",
    )
    parser.add_argument(
        "--proxies",
        default=None,
        help="comma-separated, among "
        + ",".join(PROXIES)
        + " (default: each scenario's own; edge-pg only in keepalive, haproxy not in limited)",
    )
    parser.add_argument(
        "--duration", type=int, default=defaults.duration, help="seconds per measured run"
    )
    parser.add_argument(
        "--connections", type=int, default=defaults.connections, help="wrk connections"
    )
    parser.add_argument("--rounds", type=int, default=defaults.rounds, help="interleaved rounds")
    parser.add_argument(
        "--warmup", type=int, default=defaults.warmup, help="uncounted seconds before a run"
    )
    parser.add_argument(
        "--idle-connections",
        type=int,
        default=defaults.idle_connections,
        help="connections held open in the idle scenario",
    )
    parser.add_argument(
        "--disturbed-cores",
        type=float,
        default=defaults.disturbed_cores,
        help="a run is disturbed when other processes used more cores than this on average",
    )
    parser.add_argument(
        "--edge-cmd",
        default=shlex.join(default_edge_cmd()),
        help="command that runs the zeitwork CLI (default: the venv's zeitwork)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="Markdown written here, and the chart beside it as .png (default: %(default)s)",
    )
    return parser.parse_args(argv)


def _raise_system_exit(signum: int, _frame: FrameType | None) -> None:
    # Turns SIGTERM/SIGHUP into an exception so the cleanup in finally blocks runs.
    raise SystemExit(128 + signum)


def write_results(report: Report, output: Path) -> Path:
    """Write the Markdown to ``output`` and the chart beside it; the chart's path."""
    # Imported here: matplotlib is slow to import and only this needs it.
    from bench.chart import render_chart  # noqa: PLC0415

    chart = output.with_suffix(".png")
    output.parent.mkdir(parents=True, exist_ok=True)
    render_chart(report, chart)
    output.write_text(render_markdown(report, chart=chart.name))
    return chart


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    handlers: dict[signal.Signals, Callable[[int, FrameType | None], None]] = {
        signal.SIGTERM: _raise_system_exit,
        signal.SIGHUP: _raise_system_exit,
    }
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    started = time.monotonic()
    try:
        config = BenchConfig(
            scenarios=_names(args.scenarios),
            proxies=_names(args.proxies) if args.proxies is not None else None,
            duration=args.duration,
            connections=args.connections,
            rounds=args.rounds,
            warmup=args.warmup,
            idle_connections=args.idle_connections,
            disturbed_cores=args.disturbed_cores,
            edge_cmd=tuple(shlex.split(args.edge_cmd)),
        )
        report = run_benchmark(config, find_tools(config))
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    print(format_summary(report))
    chart = write_results(report, args.output)
    print(f"\nMarkdown written to {args.output}, chart to {chart}")
    print(f"wall time {(time.monotonic() - started) / 60:.1f} min")
    if report.failed:
        print("bench: some runs failed, see above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
