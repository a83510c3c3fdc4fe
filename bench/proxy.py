"""Throughput and latency of the Zeitwork edge against nginx (and HAProxy) as reverse proxies.

What it measures: requests/s and p50/p99 latency of keep-alive HTTP/1.1 ``GET /`` requests
proxied to one fast upstream, for the edge (``zeitwork edge --workers 1``) and for a reference
nginx reverse proxy (``worker_processes 1``, pooled upstream connections), both in front of the
same upstream: an nginx with one worker answering every request with a 12-byte body.

How: every process listens on a free 127.0.0.1 port. Each target is driven in turn by
``wrk -t1 -c50 -d10s --latency -H 'Host: bench.local'`` after an uncounted warm-up, for several
rounds interleaved (edge, nginx, edge, nginx, ...) so that drift of the machine hits both
alike. The summary gives per-target medians and the median of the per-round edge/nginx ratios;
it is printed and written as Markdown to bench/results/proxy.md. A run in which wrk saw
non-2xx/3xx responses or socket errors is reported and makes the exit status non-zero.

TLS (targets ``edge-tls``/``nginx-tls`` and ``edge-handshake``/``nginx-handshake``): the
same proxies terminating TLS on one core each with the same certificate (ECDSA P-256, made
for the run), TLS 1.2 and 1.3 with the same AEAD suites; wrk over ``https://``, either on
kept-alive connections (requests/s) or with ``Connection: close`` so that every request is a
new connection and a full handshake (wrk resumes no sessions): new handshakes/s per core.
Each pair's ratio is taken within a round, like edge/nginx.

HAProxy (targets ``haproxy``, ``haproxy-tls``, ``haproxy-handshake``): a second reference, one
process with one thread (``nbthread 1``) in HTTP mode in front of the same upstream, reusing
upstream connections (``http-reuse always``), keep-alive on both sides, nginx's timeouts, no
logging, and the same host check and X-Forwarded headers. Every target's requests/s (and per
core) is also given as a ratio to the nginx target of its kind (plain, ``-tls``,
``-handshake``) from the same round.

Run from the repository root: ``.venv/bin/python -m bench.proxy [--rounds 3 --duration 10]``
(``--targets edge-tls,nginx-tls,edge-handshake,nginx-handshake`` for TLS,
``--targets edge,nginx,haproxy`` with HAProxy).
Needs nginx (Debian package nginx-light) and wrk (Debian package wrk); the HAProxy targets
need haproxy (Debian package haproxy).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TextIO

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results" / "proxy.md"
HOST = "127.0.0.1"
VHOST = "bench.local"
UPSTREAM_BODY = b"hello world\n"
# "edge-pg" is the edge routing from PostgreSQL (a scratch database on $DATABASE_URL's server,
# or the local one) instead of a routes file: the same request path, so the same figures.
# "edge-limited" is the routes-file edge with per-client rate limiting on, at a limit no
# client reaches: every request pays for the check, none is refused.
TARGETS = (
    "edge",
    "edge-pg",
    "edge-limited",
    "nginx",
    "edge-tls",
    "nginx-tls",
    "edge-handshake",
    "nginx-handshake",
    "haproxy",
    "haproxy-tls",
    "haproxy-handshake",
)
# Targets over https://, and those where every request is a new connection (a handshake).
TLS_TARGETS = frozenset(
    {
        "edge-tls",
        "nginx-tls",
        "haproxy-tls",
        "edge-handshake",
        "nginx-handshake",
        "haproxy-handshake",
    }
)
HANDSHAKE_TARGETS = frozenset({"edge-handshake", "nginx-handshake", "haproxy-handshake"})
HAPROXY_TARGETS = frozenset({"haproxy", "haproxy-tls", "haproxy-handshake"})
# The TLS suites of both proxies for TLS 1.2 (TLS 1.3's are OpenSSL's AEAD defaults).
TLS_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
UNREACHED_LIMIT = "1000000000/1000000000"
DEFAULT_TARGETS = ("edge", "nginx")
WRK_THREADS = 1
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
# wrk stops on its own after -d; this only bounds a wrk that hangs.
WRK_GRACE_S = 30.0
# Debian package that provides each external tool; haproxy is needed only by its targets.
TOOL_PACKAGES = {"nginx": "nginx-light", "wrk": "wrk", "haproxy": "haproxy"}


def nginx_reference(target: str) -> str:
    """The nginx target that ``target``'s ratio is taken to: same transport, same round."""
    for kind in ("-tls", "-handshake"):
        if target.endswith(kind):
            return "nginx" + kind
    return "nginx"


class BenchError(Exception):
    """A failure that deserves one clear message rather than a traceback."""


class ToolMissingError(BenchError):
    """nginx, wrk or (for its targets) haproxy is not installed."""


class WrkParseError(BenchError):
    """wrk printed something this module does not understand."""


# --- external tools ------------------------------------------------------------------------


@dataclass(frozen=True)
class Tools:
    nginx: str
    wrk: str
    # None: not installed, which only the HAProxy targets mind.
    haproxy: str | None = None


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


def find_tools(targets: Sequence[str] = DEFAULT_TARGETS) -> Tools:
    """Locate nginx, wrk and haproxy, naming every missing one that ``targets`` need and its
    Debian package (haproxy is needed only by the HAProxy targets)."""
    found = {name: which(name) for name in TOOL_PACKAGES}
    needed = ["nginx", "wrk", *(["haproxy"] if HAPROXY_TARGETS & set(targets) else [])]
    if missing := [name for name in needed if found[name] is None]:
        raise tools_missing(missing)
    nginx, wrk = found["nginx"], found["wrk"]
    assert nginx is not None and wrk is not None
    return Tools(nginx=nginx, wrk=wrk, haproxy=found["haproxy"])


def default_edge_cmd() -> tuple[str, ...]:
    """The ``zeitwork`` script next to the running interpreter, i.e. the venv's."""
    return (str(Path(sys.executable).parent / "zeitwork"),)


# --- wrk output ----------------------------------------------------------------------------

# wrk prints times with the largest unit that keeps the number >= 1: us, ms, s, then m and h.
_TIME_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_TIME = r"(\d+(?:\.\d+)?)(us|ms|s|m|h)"
_PERCENTILE_RE = re.compile(rf"^\s*(\d+(?:\.\d+)?)%\s+{_TIME}\s*$", re.MULTILINE)
_REQUESTS_RE = re.compile(rf"^\s*(\d+) requests in {_TIME},", re.MULTILINE)
_RPS_RE = re.compile(r"^Requests/sec:\s+(\d+(?:\.\d+)?)\s*$", re.MULTILINE)
_SOCKET_ERRORS_RE = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)
_NON_2XX_RE = re.compile(r"Non-2xx or 3xx responses: (\d+)")
SOCKET_ERROR_KINDS = ("connect", "read", "write", "timeout")


def time_to_ms(value: str, unit: str) -> float:
    """Convert a wrk time (``"520.12"``, ``"us"``) to milliseconds."""
    try:
        return float(value) * _TIME_UNIT_MS[unit]
    except KeyError:
        raise WrkParseError(f"unknown wrk time unit {unit!r}") from None


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run measured; latencies in milliseconds."""

    requests: int
    duration_s: float
    requests_per_sec: float
    latency_ms: Mapping[int, float]
    non_2xx_3xx: int = 0
    socket_errors: Mapping[str, int] = field(
        default_factory=lambda: dict.fromkeys(SOCKET_ERROR_KINDS, 0)
    )

    @property
    def p50_ms(self) -> float:
        return self.latency_ms[50]

    @property
    def p99_ms(self) -> float:
        return self.latency_ms[99]

    @property
    def errors(self) -> int:
        return self.non_2xx_3xx + sum(self.socket_errors.values())

    def describe_errors(self) -> str:
        sockets = ", ".join(f"{kind} {self.socket_errors[kind]}" for kind in SOCKET_ERROR_KINDS)
        plural = "" if self.errors == 1 else "s"
        return (
            f"{self.errors} error{plural}: non-2xx/3xx {self.non_2xx_3xx}; socket errors {sockets}"
        )


def parse_wrk_output(text: str) -> WrkResult:
    """Parse the report of ``wrk --latency``.

    wrk prints the "Socket errors" and "Non-2xx or 3xx" lines only when they are non-zero, so
    their absence means zero; anything else missing is an error.
    """
    rps = _RPS_RE.search(text)
    requests = _REQUESTS_RE.search(text)
    latency = {
        int(float(pct)): time_to_ms(value, unit)
        for pct, value, unit in _PERCENTILE_RE.findall(text)
    }
    missing = [
        what
        for what, ok in (
            ("Requests/sec", rps is not None),
            ("'N requests in T' line", requests is not None),
            ("50% latency (was --latency given?)", 50 in latency),
            ("99% latency (was --latency given?)", 99 in latency),
        )
        if not ok
    ]
    if missing or rps is None or requests is None:
        raise WrkParseError(f"wrk output lacks {', '.join(missing)}:\n{text}")
    socket_errors = dict.fromkeys(SOCKET_ERROR_KINDS, 0)
    if match := _SOCKET_ERRORS_RE.search(text):
        socket_errors = dict(zip(SOCKET_ERROR_KINDS, map(int, match.groups()), strict=True))
    non_2xx = _NON_2XX_RE.search(text)
    return WrkResult(
        requests=int(requests.group(1)),
        duration_s=time_to_ms(requests.group(2), requests.group(3)) / 1000,
        requests_per_sec=float(rps.group(1)),
        latency_ms=latency,
        non_2xx_3xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=socket_errors,
    )


def wrk_argv(
    wrk: str,
    port: int,
    *,
    duration: int,
    connections: int,
    scheme: str = "http",
    close: bool = False,
) -> list[str]:
    """wrk's command line; ``close``: every request on a new connection."""
    return [
        wrk,
        f"-t{WRK_THREADS}",
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
        "-H",
        f"Host: {VHOST}",
        *(["-H", "Connection: close"] if close else []),
        f"{scheme}://{HOST}:{port}/",
    ]


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


def run_wrk(
    wrk: str,
    port: int,
    *,
    duration: int,
    connections: int,
    scheme: str = "http",
    close: bool = False,
) -> str:
    """Run wrk against ``port`` and return its report; a failing wrk is a BenchError."""
    argv = wrk_argv(
        wrk, port, duration=duration, connections=connections, scheme=scheme, close=close
    )
    try:
        done = subprocess.run(
            argv,
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


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    logs: tuple[Path, ...]
    # How wrk drives it: over https://, and with a new connection per request.
    scheme: str = "http"
    close: bool = False

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


def session_cpu_seconds(session: int) -> float:
    """User and system CPU time of the live processes of ``session`` (a server started in a
    session of its own: the master and its workers)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rpartition(")")[2].split()
            # After "(comm)": state ppid pgrp session ... utime (11) stime (12).
            if int(fields[3]) == session:
                ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def http_get(
    port: int, host_header: str, timeout: float = 2.0, scheme: str = "http"
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
        conn.request("GET", "/", headers={"Host": host_header})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_ready(server: Server, timeout: float = START_TIMEOUT_S) -> None:
    """Wait until ``GET /`` through ``server`` returns 200 with the upstream's body."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        server.check_alive("before answering GET /")
        try:
            status, body = http_get(server.port, VHOST, scheme=server.scheme)
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


# --- nginx and edge ------------------------------------------------------------------------


def _nginx_conf(prefix: Path, http_block: str) -> str:
    # Temp paths are set explicitly because Debian's compiled-in ones live in /var/lib/nginx.
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
worker_processes 1;
daemon off;
master_process on;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
{temp}
    # Clients keep their connections for the whole run, as wrk expects.
    keepalive_requests 1000000;
    keepalive_timeout 75s;
{http_block}}}
"""


def upstream_conf(prefix: Path, port: int) -> str:
    body = UPSTREAM_BODY.decode().replace("\n", "\\n")
    return _nginx_conf(
        prefix,
        f"""\
    server {{
        listen {HOST}:{port};
        location / {{
            default_type text/plain;
            return 200 "{body}";
        }}
    }}
""",
    )


def nginx_proxy_conf(prefix: Path, port: int, upstream_port: int) -> str:
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


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """An ECDSA P-256 certificate for VHOST from a throwaway CA (wrk does not verify it); every
    proxy serves this one."""
    # Imported here: only the TLS targets need it.
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    from edge import localca  # noqa: PLC0415

    ca, ca_key = localca.new_ca("zeitwork bench CA", days=2)
    cert, key = localca.issue(ca, ca_key, [VHOST], days=2)
    directory.mkdir(parents=True, exist_ok=True)
    # nginx workers drop privileges when started as root and read the files after that.
    directory.chmod(0o755)
    cert_path, key_path = directory / "bench.crt", directory / "bench.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(localca.key_pem(key))
    return cert_path, key_path


def start_nginx(
    procs: ProcessSet, nginx: str, name: str, prefix: Path, port: int, conf: str
) -> Server:
    prefix.mkdir(parents=True)
    # nginx workers drop privileges when started as root and must still reach the temp dirs.
    prefix.chmod(0o755)
    conf_path = prefix / "nginx.conf"
    conf_path.write_text(conf)
    # -e: startup messages go to our log instead of Debian's /var/log/nginx/error.log.
    argv = [nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf_path)]
    return procs.start(name, argv, port, prefix / "stdout.log", extra_logs=[prefix / "error.log"])


def haproxy_proxy_conf(port: int, upstream_port: int, pem: Path | None = None) -> str:
    """The second reference proxy: HAProxy doing what :func:`nginx_proxy_conf` does, on one
    thread; with ``pem`` (certificate and key in one file) terminating TLS like
    :func:`nginx_tls_proxy_conf`: TLS 1.2 and 1.3, the same suites (TLS 1.3's are OpenSSL's
    defaults), session cache and tickets (HAProxy's defaults)."""
    tls = (
        f"""\
    ssl-default-bind-options ssl-min-ver TLSv1.2
    ssl-default-bind-ciphers {TLS_CIPHERS}
"""
        if pem
        else ""
    )
    bind = f"bind {HOST}:{port}" + (f" ssl crt {pem}" if pem else "")
    # No "log" line anywhere: nothing is logged, like nginx's access_log off.
    return f"""\
global
    nbthread 1
    maxconn 4096
{tls}
defaults
    mode http
    option http-keep-alive
    http-reuse always
    # nginx's: proxy_connect/read/send_timeout and client_header_timeout 60 s,
    # keepalive_timeout 75 s (an idle client connection).
    timeout connect 60s
    timeout client 60s
    timeout server 60s
    timeout http-request 60s
    timeout http-keep-alive 75s

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


def start_haproxy(
    procs: ProcessSet,
    haproxy: str,
    name: str,
    prefix: Path,
    port: int,
    upstream_port: int,
    certificate: tuple[Path, Path] | None = None,
) -> Server:
    prefix.mkdir(parents=True)
    pem = None
    if certificate is not None:
        # HAProxy's "crt" takes the certificate and its key in one PEM file.
        pem = prefix / "bench.pem"
        pem.write_bytes(b"".join(path.read_bytes() for path in certificate))
    conf_path = prefix / "haproxy.cfg"
    conf_path.write_text(haproxy_proxy_conf(port, upstream_port, pem))
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
        *_edge_host_args(edge_cmd),
        *extra,
    ]
    return procs.start(name, argv, port, workdir / "edge.log")


@contextlib.contextmanager
def seeded_database(upstream_port: int) -> Iterator[str]:
    """A scratch platform database in which VHOST is a verified custom domain whose current
    deployment's one running, healthy instance is the upstream; dropped afterwards."""
    # Imported here: the other targets need neither asyncpg nor the store.
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


def _edge_host_args(edge_cmd: Sequence[str]) -> list[str]:
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
    return args


# --- the benchmark -------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    duration: int = 10
    connections: int = 50
    rounds: int = 3
    warmup: int = 2
    targets: tuple[str, ...] = DEFAULT_TARGETS
    edge_cmd: tuple[str, ...] = field(default_factory=default_edge_cmd)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise BenchError(
                f"targets must be distinct names among {', '.join(TARGETS)}, "
                f"got {','.join(self.targets)}"
            )
        if self.duration < 1 or self.rounds < 1 or self.warmup < 0:
            raise BenchError("duration and rounds must be >= 1 and warmup >= 0")
        if self.connections < WRK_THREADS:
            raise BenchError(f"connections must be >= {WRK_THREADS} (the wrk threads)")


@dataclass(frozen=True)
class Measurement:
    round: int
    target: str
    result: WrkResult
    # CPU time (user + system) the target's processes used during the run; None: unknown.
    cpu_s: float | None = None

    @property
    def per_core(self) -> float | None:
        """Requests per CPU-second of the target: what one fully used core would serve."""
        if not self.cpu_s:
            return None
        return self.result.requests / self.cpu_s


@dataclass(frozen=True)
class TargetSummary:
    target: str
    requests_per_sec: float
    p50_ms: float
    p99_ms: float
    runs: int
    runs_with_errors: int
    per_core: float | None = None


@dataclass
class Report:
    config: BenchConfig
    environment: dict[str, str] = field(default_factory=dict)
    measurements: list[Measurement] = field(default_factory=list)

    def results(self, target: str) -> list[WrkResult]:
        return [m.result for m in self.measurements if m.target == target]

    def summary(self, target: str) -> TargetSummary:
        results = self.results(target)
        per_core = [
            m.per_core for m in self.measurements if m.target == target and m.per_core is not None
        ]
        return TargetSummary(
            target=target,
            requests_per_sec=statistics.median(r.requests_per_sec for r in results),
            p50_ms=statistics.median(r.p50_ms for r in results),
            p99_ms=statistics.median(r.p99_ms for r in results),
            runs=len(results),
            runs_with_errors=sum(1 for r in results if r.errors),
            per_core=statistics.median(per_core) if per_core else None,
        )

    def ratios_by_round(self, edge: str = "edge", nginx: str = "nginx") -> dict[int, float]:
        """``edge``/``nginx`` requests/s of each round that measured both."""
        by_round: dict[int, dict[str, float]] = {}
        for m in self.measurements:
            by_round.setdefault(m.round, {})[m.target] = m.result.requests_per_sec
        return {
            round_no: figures[edge] / figures[nginx]
            for round_no, figures in sorted(by_round.items())
            if figures.get(nginx) and edge in figures
        }

    def ratios(self, edge: str = "edge", nginx: str = "nginx") -> list[float]:
        return list(self.ratios_by_round(edge, nginx).values())

    def core_ratios(self, edge: str, nginx: str) -> list[float]:
        """``edge``/``nginx`` requests per CPU-second, of each round that measured both."""
        by_round: dict[int, dict[str, float]] = {}
        for m in self.measurements:
            if m.per_core is not None:
                by_round.setdefault(m.round, {})[m.target] = m.per_core
        return [
            figures[edge] / figures[nginx]
            for _, figures in sorted(by_round.items())
            if figures.get(nginx) and edge in figures
        ]

    def pairs(self) -> list[tuple[str, str]]:
        """The (target, nginx target of its kind) pairs this run measured both of."""
        targets = self.config.targets
        return [
            (target, reference)
            for target in targets
            if (reference := nginx_reference(target)) != target and reference in targets
        ]

    @property
    def runs_with_errors(self) -> list[Measurement]:
        return [m for m in self.measurements if m.result.errors]


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


def run_benchmark(
    config: BenchConfig, tools: Tools | None = None, out: TextIO = sys.stdout
) -> Report:
    """Start the upstream and the targets, drive them with wrk, stop everything."""
    tools = tools or find_tools(config.targets)
    if HAPROXY_TARGETS & set(config.targets) and tools.haproxy is None:
        raise tools_missing(["haproxy"])
    report = Report(config=config, environment=collect_environment(tools))

    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    with contextlib.ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="zeitwork-bench-"))
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        # Entered after the temp dir, so exited first: processes stop before their dir goes.
        procs = stack.enter_context(ProcessSet())

        port = free_port()
        cert = key = None
        if TLS_TARGETS & set(config.targets):
            cert, key = make_certificate(tmp / "certificate")
        prefix = tmp / "upstream"
        upstream = start_nginx(
            procs, tools.nginx, "upstream", prefix, port, upstream_conf(prefix, port)
        )
        wait_ready(upstream)
        servers: list[Server] = []
        for name in config.targets:
            port = free_port()
            if name == "edge":
                server = start_edge(procs, config.edge_cmd, tmp / "edge", port, upstream.port)
            elif name == "edge-limited":
                server = start_edge(
                    procs,
                    config.edge_cmd,
                    tmp / "edge-limited",
                    port,
                    upstream.port,
                    name="edge-limited",
                    extra=("--rate-limit", UNREACHED_LIMIT),
                )
            elif name == "edge-pg":
                dsn = stack.enter_context(seeded_database(upstream.port))
                server = start_edge(
                    procs, config.edge_cmd, tmp / "edge-pg", port, upstream.port, dsn, "edge-pg"
                )
            elif name in ("edge-tls", "edge-handshake"):
                assert cert is not None and key is not None
                https = free_port()
                server = start_edge(
                    procs,
                    config.edge_cmd,
                    tmp / name,
                    port,
                    upstream.port,
                    name=name,
                    extra=(
                        *("--https-port", str(https), "--no-https-redirect"),
                        *("--tls-cert", str(cert), "--tls-key", str(key)),
                    ),
                )
                server.port = https
            elif name in HAPROXY_TARGETS:
                assert tools.haproxy is not None
                tls = None
                if name in TLS_TARGETS:
                    assert cert is not None and key is not None
                    tls = (cert, key)
                server = start_haproxy(
                    procs, tools.haproxy, name, tmp / name, port, upstream.port, tls
                )
            elif name in ("nginx-tls", "nginx-handshake"):
                assert cert is not None and key is not None
                prefix = tmp / name
                conf = nginx_tls_proxy_conf(prefix, port, upstream.port, cert, key)
                server = start_nginx(procs, tools.nginx, name, prefix, port, conf)
            else:
                prefix = tmp / "nginx"
                conf = nginx_proxy_conf(prefix, port, upstream.port)
                server = start_nginx(procs, tools.nginx, "nginx", prefix, port, conf)
            if name in TLS_TARGETS:
                server.scheme = "https"
                server.close = name in HANDSHAKE_TARGETS
            wait_ready(server)
            servers.append(server)
        say(
            f"upstream nginx on :{upstream.port}; "
            + ", ".join(f"{s.name} on :{s.port}" for s in servers)
        )
        say(
            f"wrk -t{WRK_THREADS} -c{config.connections} -d{config.duration}s --latency, "
            f"{config.rounds} round(s), {config.warmup} s warm-up per run"
        )

        for round_no in range(1, config.rounds + 1):
            for server in servers:
                if config.warmup:
                    warmup = run_wrk(
                        tools.wrk,
                        server.port,
                        duration=config.warmup,
                        connections=config.connections,
                        scheme=server.scheme,
                        close=server.close,
                    )
                    # Not counted, but a hint when the measured run then fails too.
                    if (warm := parse_wrk_output(warmup)).errors:
                        say(f"(warm-up of {server.name}: {warm.describe_errors()})")
                cpu_before = session_cpu_seconds(server.proc.pid)
                output = run_wrk(
                    tools.wrk,
                    server.port,
                    duration=config.duration,
                    connections=config.connections,
                    scheme=server.scheme,
                    close=server.close,
                )
                cpu_s = session_cpu_seconds(server.proc.pid) - cpu_before
                # A target that crashed mid-run would otherwise show up as mere socket errors.
                for proc in (server, upstream):
                    proc.check_alive(f"during round {round_no} of {server.name}")
                result = parse_wrk_output(output)
                report.measurements.append(Measurement(round_no, server.name, result, cpu_s))
                if result.errors:
                    say(f"!! round {round_no}, {server.name}: {result.describe_errors()}")
                    say(output.rstrip())
            say()
            say(format_round_table(report, round_no))
        return report


# --- output --------------------------------------------------------------------------------


def format_ms(value: float) -> str:
    return f"{value * 1000:.0f} µs" if value < 1 else f"{value:.2f} ms"


def _rows(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        indent
        + "  ".join(
            cell.rjust(w) if i else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    ]
    return "\n".join(lines)


def format_per_core(value: float | None) -> str:
    return "?" if value is None else f"{value:,.0f}"


def format_round_table(report: Report, round_no: int) -> str:
    rows = [
        [
            m.target,
            f"{m.result.requests_per_sec:,.0f}",
            format_per_core(m.per_core),
            format_ms(m.result.p50_ms),
            format_ms(m.result.p99_ms),
            str(m.result.errors) + (" !!" if m.result.errors else ""),
        ]
        for m in report.measurements
        if m.round == round_no
    ]
    text = f"round {round_no}/{report.config.rounds}\n" + _rows(
        ["target", "req/s", "req/CPU-s", "p50", "p99", "errors"], rows
    )
    for edge, nginx in report.pairs():
        ratios = report.ratios_by_round(edge, nginx)
        if round_no in ratios:
            text += f"\n  {edge}/{nginx} req/s: {ratios[round_no]:.2f}"
            core = [
                m.per_core
                for name in (edge, nginx)
                for m in report.measurements
                if m.round == round_no and m.target == name
            ]
            if len(core) == 2 and core[0] and core[1]:
                text += f", per core: {core[0] / core[1]:.2f}"
    return text


def format_summary(report: Report) -> str:
    rows = []
    for target in report.config.targets:
        s = report.summary(target)
        rows.append(
            [
                target,
                f"{s.requests_per_sec:,.0f}",
                format_per_core(s.per_core),
                format_ms(s.p50_ms),
                format_ms(s.p99_ms),
                f"{s.runs_with_errors}/{s.runs}",
            ]
        )
    text = "summary (medians over rounds)\n" + _rows(
        ["target", "req/s", "req/CPU-s", "p50", "p99", "runs with errors"], rows
    )
    for edge, nginx in report.pairs():
        if ratios := report.ratios(edge, nginx):
            text += (
                f"\n  {edge}/{nginx} req/s: {statistics.median(ratios):.2f} "
                f"(median of per-round ratios {', '.join(f'{r:.2f}' for r in ratios)})"
            )
        if core := report.core_ratios(edge, nginx):
            text += (
                f"\n  {edge}/{nginx} per core: {statistics.median(core):.2f} "
                f"(median of per-round ratios {', '.join(f'{r:.2f}' for r in core)})"
            )
    if bad := report.runs_with_errors:
        text += f"\n!! {len(bad)} measured run(s) had errors:" + "".join(
            f"\n!!   round {m.round}, {m.target}: {m.result.describe_errors()}" for m in bad
        )
    return text


def render_markdown(report: Report) -> str:
    c, env = report.config, report.environment
    lines = [
        "## Proxy benchmark: edge vs nginx"
        + (" and HAProxy" if HAPROXY_TARGETS & set(c.targets) else ""),
        "",
        f"`wrk -t{WRK_THREADS} -c{c.connections} -d{c.duration}s --latency`, {c.rounds} rounds "
        f"interleaved, {c.warmup} s uncounted warm-up before each run. One worker per proxy; "
        f"the upstream is one nginx worker answering `GET /` with a {len(UPSTREAM_BODY)}-byte "
        "body over keep-alive connections. Figures are medians over the rounds."
        + (
            " TLS targets: https:// with the same ECDSA P-256 certificate; *-handshake sends "
            "`Connection: close`, so each request is a new connection and full handshake."
            if TLS_TARGETS & set(c.targets)
            else ""
        ),
        "",
        "| target | req/s | req/CPU-s | p50 | p99 | runs with errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for target in c.targets:
        s = report.summary(target)
        lines.append(
            f"| {target} | {s.requests_per_sec:,.0f} | {format_per_core(s.per_core)} "
            f"| {format_ms(s.p50_ms)} | {format_ms(s.p99_ms)} | {s.runs_with_errors}/{s.runs} |"
        )
    for edge, nginx in report.pairs():
        if ratios := report.ratios(edge, nginx):
            lines += [
                "",
                f"{edge}/{nginx} requests/s: **{statistics.median(ratios):.2f}** (median of "
                f"the per-round ratios {', '.join(f'{r:.2f}' for r in ratios)})",
            ]
        if core := report.core_ratios(edge, nginx):
            lines[-1] += (
                f"; per CPU core: **{statistics.median(core):.2f}** "
                f"({', '.join(f'{r:.2f}' for r in core)})"
            )
    lines += [
        "",
        "| round | target | req/s | req/CPU-s | p50 | p99 | errors |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {m.round} | {m.target} | {m.result.requests_per_sec:,.0f} "
        f"| {format_per_core(m.per_core)} "
        f"| {format_ms(m.result.p50_ms)} | {format_ms(m.result.p99_ms)} | {m.result.errors} |"
        for m in report.measurements
    ]
    if bad := report.runs_with_errors:
        lines += [
            "",
            f"**Warning: {len(bad)} measured run(s) had errors:** "
            + "; ".join(f"round {m.round} {m.target}: {m.result.describe_errors()}" for m in bad),
        ]
    lines += [
        "",
        f"Machine: {env.get('cpu', '?')}, Linux {env.get('kernel', '?')}; "
        f"Python {env.get('python', '?')}, {env.get('nginx', '?')}, "
        + (f"{env.get('haproxy', '?')}, " if HAPROXY_TARGETS & set(c.targets) else "")
        + f"{env.get('wrk', '?')}; "
        f"commit {env.get('commit', '?')}, {env.get('date', '?')}. "
        "Produced by `python -m bench.proxy`; wrk, the proxies and the upstream share the "
        "machine's CPUs. req/CPU-s: requests per CPU-second used by the proxy's processes "
        "during the run (what one core would serve).",
        "",
    ]
    return "\n".join(lines)


# --- command line --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.proxy",
        description="Benchmark the Zeitwork edge against nginx (and HAProxy) as reverse "
        "proxies with wrk.",
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=2, help="uncounted seconds before a run")
    parser.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help="comma-separated, among " + ",".join(TARGETS),
    )
    parser.add_argument(
        "--edge-cmd",
        default=shlex.join(default_edge_cmd()),
        help="command that runs the zeitwork CLI (default: the venv's zeitwork)",
    )
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help="Markdown summary written here"
    )
    return parser.parse_args(argv)


def _raise_system_exit(signum: int, _frame: FrameType | None) -> None:
    # Turns SIGTERM/SIGHUP into an exception so the cleanup in finally blocks runs.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    handlers: dict[signal.Signals, Callable[[int, FrameType | None], None]] = {
        signal.SIGTERM: _raise_system_exit,
        signal.SIGHUP: _raise_system_exit,
    }
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    try:
        config = BenchConfig(
            duration=args.duration,
            connections=args.connections,
            rounds=args.rounds,
            warmup=args.warmup,
            targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
            edge_cmd=tuple(shlex.split(args.edge_cmd)),
        )
        report = run_benchmark(config, find_tools(config.targets))
    except BenchError as exc:
        print(f"bench.proxy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench.proxy: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    print()
    print(format_summary(report))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render_markdown(report))
    print(f"\nMarkdown summary written to {args.output}")
    if report.runs_with_errors:
        print("bench.proxy: some runs had errors, see above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
