"""Tests of the proxy benchmark suite (bench.proxy): its wrk parser on real wrk output, the
proxies' configurations, and real short runs of every scenario and proxy.

The samples in wrk_samples/ were captured from wrk 4.1.0 on this project's machine: through
the nginx reverse proxy (latencies in us and ms, note wrk's "0.86ms"), against a
deliberately slow and faulty upstream (ms and s, non-2xx responses, read and timeout
errors), both before the suite ran wrk with bench/wrk.lua, and 64 KiB responses through
nginx with the script, whose last line gives p99.9 and the exact counts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import bench.wrk
from bench.errors import BenchError, ToolMissingError, WrkParseError
from bench.idle import IdleConnectionError, _response_complete, open_idle, raise_nofile_limit
from bench.procfs import session_cpu_seconds, session_memory
from bench.proxy import (
    BODY_64K,
    REPO_ROOT,
    TLS_CIPHERS,
    VHOST,
    Tools,
    answer_problems,
    estimated_seconds,
    find_tools,
    haproxy_proxy_conf,
    nginx_proxy_conf,
    nginx_tls_proxy_conf,
    run_benchmark,
    upstream_conf,
    write_results,
)
from bench.report import Report, format_summary, render_markdown
from bench.scenarios import KIB, MIB, SCENARIOS, BenchConfig, default_edge_cmd
from bench.wrk import WRK_SCRIPT, WrkResult, parse_wrk_output, time_to_ms, wrk_argv
from edge.store.db import connect

SAMPLES = Path(__file__).parent / "wrk_samples"
# What bench/wrk.lua adds to a report; the samples captured before it lack the line.
SCRIPT_LINE = "zeitwork-bench: p99.9 2500 us; requests {requests}; bytes 1000\n"


def smoke_config(
    *scenarios: str, proxies: tuple[str, ...] | None = None, **kwargs: Any
) -> BenchConfig:
    """The shortest real run: one round of 1 s with 4 connections and no warm-up."""
    config = BenchConfig(
        scenarios=scenarios,
        proxies=proxies,
        duration=1,
        connections=4,
        rounds=1,
        warmup=0,
        idle_connections=200,
    )
    return dataclasses.replace(config, **kwargs)


def _sample(name: str) -> str:
    return (SAMPLES / name).read_text()


# --- parser ---------------------------------------------------------------------------------


def test_parse_microseconds_and_milliseconds() -> None:
    result = parse_wrk_output(
        _sample("nginx_proxy_us_ms.txt") + SCRIPT_LINE.format(requests=129098)
    )

    assert result.requests == 129098
    assert result.duration_s == pytest.approx(2.10)
    assert result.requests_per_sec == pytest.approx(61475.71)
    assert result.latency_ms == {
        50: pytest.approx(0.696),
        75: pytest.approx(0.86),
        90: pytest.approx(0.97),
        99: pytest.approx(1.65),
        99.9: pytest.approx(2.5),
    }
    assert result.p50_ms == pytest.approx(0.696)
    assert result.p99_ms == pytest.approx(1.65)
    assert result.errors == 0
    assert result.socket_errors == {"connect": 0, "read": 0, "write": 0, "timeout": 0}


def test_parse_milliseconds_seconds_and_errors() -> None:
    result = parse_wrk_output(
        _sample("slow_upstream_ms_s_errors.txt") + SCRIPT_LINE.format(requests=335)
    )

    assert result.requests == 335
    assert result.duration_s == pytest.approx(5.01)
    assert result.requests_per_sec == pytest.approx(66.87)
    # wrk pads the 99% line with a trailing space.
    assert result.p99_ms == pytest.approx(1200.0)
    assert result.non_2xx_3xx == 48
    assert result.socket_errors == {"connect": 0, "read": 7, "write": 0, "timeout": 2}
    assert result.errors == 57
    assert "non-2xx/3xx 48" in result.describe_errors()
    assert "read 7" in result.describe_errors()


def test_parse_the_scripts_line() -> None:
    result = parse_wrk_output(_sample("nginx_proxy_64k_script.txt"))

    assert result.requests == 11210
    assert result.p999_ms == pytest.approx(24.685)
    assert result.p99_ms == pytest.approx(15.84)
    # Heads and 64 KiB bodies: more than the bodies alone.
    assert result.bytes_read == 737576394
    assert result.bytes_read >= result.requests * 64 * KIB
    assert answer_problems(SCENARIOS["64k"], result) == []


def test_parse_rejects_output_without_latency_or_script() -> None:
    sample = _sample("nginx_proxy_64k_script.txt")
    without_latency = "\n".join(line for line in sample.splitlines() if "%  " not in line)
    with pytest.raises(WrkParseError, match="50% latency"):
        parse_wrk_output(without_latency)
    with pytest.raises(WrkParseError, match=r"the line of wrk.lua \(was -s wrk.lua given\?\)"):
        parse_wrk_output(_sample("nginx_proxy_us_ms.txt"))
    with pytest.raises(WrkParseError, match=r"wrk counted 11210 requests, wrk\.lua 11209"):
        parse_wrk_output(sample.replace("requests 11210;", "requests 11209;"))


@pytest.mark.parametrize(
    ("value", "unit", "ms"),
    [("250.5", "us", 0.2505), ("0.86", "ms", 0.86), ("1.20", "s", 1200.0), ("1.5", "m", 90e3)],
)
def test_time_to_ms(value: str, unit: str, ms: float) -> None:
    assert time_to_ms(value, unit) == pytest.approx(ms)


def test_wrk_command_lines_follow_the_scenario() -> None:
    def argv(name: str) -> list[str]:
        return wrk_argv(
            "wrk", "127.0.0.1", 8080, SCENARIOS[name], vhost=VHOST, duration=5, connections=50
        )

    upload = argv("upload")
    assert upload[upload.index("-s") + 1] == str(WRK_SCRIPT) and WRK_SCRIPT.is_file()
    assert upload[-4:] == ["http://127.0.0.1:8080/upload", "--", "POST", str(MIB)]
    assert argv("64k")[-4:] == ["http://127.0.0.1:8080/64k", "--", "GET", "0"]
    close = argv("close")
    assert close[close.index("Connection: close") - 1] == "-H"
    assert "Connection: close" not in argv("keepalive")
    handshake = argv("handshake")
    assert "Connection: close" in handshake and "https://127.0.0.1:8080/" in handshake
    assert "Connection: close" not in argv("tls") and "https://127.0.0.1:8080/" in argv("tls")
    assert f"Host: {VHOST}" in argv("limited")


def _wrk(requests: int, bytes_read: int, non_2xx: int = 0) -> WrkResult:
    return WrkResult(
        requests=requests,
        duration_s=1.0,
        requests_per_sec=float(requests),
        latency_ms={50: 1.0, 99: 2.0, 99.9: 3.0},
        bytes_read=bytes_read,
        non_2xx_3xx=non_2xx,
    )


def test_answer_problems_catch_short_bodies_and_uploads() -> None:
    short_bodies = answer_problems(SCENARIOS["64k"], _wrk(10, 10 * 64 * KIB - 1))
    assert short_bodies == [
        "wrk read 655,359 bytes for 10 responses, less than their 65,536-byte bodies"
    ]
    upload = SCENARIOS["upload"]
    whole = [MIB + 150] * 3
    assert answer_problems(upload, _wrk(3, 600), whole) == []
    assert answer_problems(upload, _wrk(3, 600), [MIB + 150, 4096, MIB + 150]) == [
        "the upstream got 1 upload(s) shorter than 1,048,576 bytes"
    ]
    assert answer_problems(upload, _wrk(3, 600), whole[:2]) == [
        "the upstream answered 2 uploads, wrk got 3 answers"
    ]
    # Answers the proxy gave itself (502 ...) never reached the upstream.
    assert answer_problems(upload, _wrk(3, 600, non_2xx=1), whole[:2]) == []


def test_the_default_suite_fits_in_a_quarter_hour() -> None:
    config = BenchConfig(edge_cmd=("zeitwork",))
    assert len(config.scenarios) == len(SCENARIOS) == 8
    assert estimated_seconds(config) < 15 * 60


# --- configurations -------------------------------------------------------------------------


def test_upstream_serves_64k_and_reads_uploads(tmp_path: Path) -> None:
    conf = upstream_conf(tmp_path, 9000, "/usr/lib/nginx/modules/ngx_http_echo_module.so")
    assert conf.startswith("load_module /usr/lib/nginx/modules/ngx_http_echo_module.so;\n")
    assert "echo_read_request_body;" in conf and "client_max_body_size 2m;" in conf
    assert f"access_log {tmp_path / 'upload.log'} request_length;" in conf
    assert f"root {tmp_path / 'files'};" in conf
    plain = upstream_conf(tmp_path, 9000)
    assert "load_module" not in plain and "/upload" not in plain
    assert len(BODY_64K) == 64 * KIB


def test_nginx_streams_uploads_and_holds_idle_connections(tmp_path: Path) -> None:
    conf = nginx_proxy_conf(tmp_path, 8080, 9000)
    assert "proxy_request_buffering off;" in conf and "client_max_body_size 2m;" in conf
    assert "worker_connections 4096;" in conf and "keepalive_timeout 75s;" in conf
    assert "worker_rlimit_nofile" not in conf
    idle = nginx_proxy_conf(tmp_path, 8080, 9000, idle_connections=10_000)
    assert "worker_connections 11024;" in idle and "worker_rlimit_nofile 12048;" in idle
    assert "keepalive_timeout 300s;" in idle


def test_tls_reference(tmp_path: Path) -> None:
    conf = nginx_tls_proxy_conf(
        tmp_path, 8443, 9000, tmp_path / "bench.crt", tmp_path / "bench.key"
    )
    assert conf.count("listen 127.0.0.1:8443 ssl") == 2
    assert f"ssl_ciphers {TLS_CIPHERS};" in conf and "ssl_protocols TLSv1.2 TLSv1.3;" in conf
    assert session_cpu_seconds(os.getsid(0)) > 0


def test_haproxy_reference(tmp_path: Path) -> None:
    plain = haproxy_proxy_conf(8080, 9000)
    assert "nbthread 1" in plain and "http-reuse always" in plain
    assert "bind 127.0.0.1:8080\n" in plain and "server upstream 127.0.0.1:9000" in plain
    assert "timeout http-keep-alive 75s" in plain and "maxconn 4096" in plain
    assert "ssl" not in plain and "\n    log" not in plain and "strict-limits" not in plain
    tls = haproxy_proxy_conf(8443, 9000, tmp_path / "bench.pem")
    assert f"bind 127.0.0.1:8443 ssl crt {tmp_path / 'bench.pem'}" in tls
    assert "ssl-min-ver TLSv1.2" in tls and f"ssl-default-bind-ciphers {TLS_CIPHERS}" in tls
    idle = haproxy_proxy_conf(8080, 9000, idle_connections=10_000)
    assert "maxconn 11024" in idle and "no strict-limits" in idle
    assert "timeout client 300s" in idle and "timeout http-keep-alive 300s" in idle


# --- tools ----------------------------------------------------------------------------------


def test_missing_tools_are_named_with_their_debian_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("bench.proxy.which", lambda name: None)

    with pytest.raises(ToolMissingError) as info:
        find_tools()
    assert "nginx not found (Debian package nginx-light" in str(info.value)
    assert "wrk not found (Debian package wrk" in str(info.value)
    # haproxy is only needed, and named, when a HAProxy cell is asked for.
    assert "haproxy" not in str(info.value)
    with pytest.raises(ToolMissingError, match=r"haproxy not found \(Debian package haproxy"):
        find_tools(smoke_config("keepalive", proxies=("edge", "haproxy")))


def test_missing_haproxy_or_echo_module_alone_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bench.proxy.which", lambda name: None if name == "haproxy" else name)
    monkeypatch.setattr("bench.proxy.find_echo_module", lambda nginx: None)

    assert find_tools() == Tools(nginx="nginx", wrk="wrk")
    with pytest.raises(ToolMissingError, match=r"^haproxy not found \(Debian package haproxy"):
        run_benchmark(smoke_config("tls", proxies=("haproxy",)), find_tools())
    with pytest.raises(
        ToolMissingError,
        match=r"^nginx echo module not found \(Debian package libnginx-mod-http-echo",
    ):
        find_tools(smoke_config("upload", proxies=("nginx",)))


def test_open_file_limit_that_cannot_be_raised_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(resource: int, limits: tuple[int, int]) -> None:
        raise ValueError("not allowed")

    monkeypatch.setattr("bench.idle.resource.getrlimit", lambda resource: (1024, 4096))
    monkeypatch.setattr("bench.idle.resource.setrlimit", refuse)
    assert raise_nofile_limit(512) == 1024
    with pytest.raises(BenchError, match="hard limit is 4096 and this process may not raise"):
        raise_nofile_limit(10_000)


# --- idle connections -----------------------------------------------------------------------


def test_response_completeness() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n"
    assert _response_complete(head + b"hello world\n") is True
    assert _response_complete(head + b"hello") is False
    assert _response_complete(b"HTTP/1.1 200 OK\r\nContent-") is False
    assert _response_complete(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n") is None


def test_idle_connections_refused_is_a_clear_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        # Bound, not listening: every connect is refused.
        with pytest.raises(IdleConnectionError, match=r"connect failed: ECONNREFUSED after 0 of"):
            open_idle("127.0.0.1", port, 10, b"GET / HTTP/1.1\r\n\r\n", timeout=5)


# --- real runs ------------------------------------------------------------------------------


def _tools(config: BenchConfig) -> Tools:
    try:
        return find_tools(config)
    except ToolMissingError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{exc}; CI must install them")
        pytest.skip(str(exc))


def _edge_unavailable() -> str | None:
    """Why the edge cannot be benchmarked here, or None if ``zeitwork edge`` is there."""
    if not (REPO_ROOT / "edge" / "cli.py").exists():
        return "edge/cli.py does not exist yet"
    cmd = default_edge_cmd()
    if not Path(cmd[0]).exists():
        return f"{cmd[0]} is not installed (pip install -e '.[dev]')"
    done = subprocess.run(
        [*cmd, "edge", "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0:
        return f"`zeitwork edge --help` exited {done.returncode}: {done.stderr.strip()[-300:]}"
    return None


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(args)
    return found


@dataclasses.dataclass
class SuiteRun:
    report: Report
    output: str
    tmp: Path


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, postgres_server: str) -> Iterator[SuiteRun]:
    """One short real run of the whole suite, every scenario with its proxies (the edge
    routing from PostgreSQL too), 200 idle connections; shared by the tests below."""
    if reason := _edge_unavailable():
        pytest.skip(reason)
    config = smoke_config(*SCENARIOS)
    tools = _tools(config)
    tmp = tmp_path_factory.mktemp("suite")
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        # The benchmark's temp dir lands in tmp, so what it leaves behind can be checked.
        patch.setattr(tempfile, "tempdir", str(tmp))
        patch.setenv("DATABASE_URL", postgres_server)
        report = run_benchmark(config, tools, out=out)
    yield SuiteRun(report, out.getvalue(), tmp)


@pytest.mark.needs_tool("nginx")
@pytest.mark.needs_tool("wrk")
@pytest.mark.needs_tool("haproxy")
def test_every_cell_is_measured_without_errors(suite: SuiteRun) -> None:
    report = suite.report
    assert [(m.scenario, m.proxy) for m in report.measurements] == report.wrk_cells()
    for m in report.measurements:
        where = f"{m.scenario} {m.proxy}\n{suite.output}"
        assert not m.failed, f"{m.describe_problems()}: {where}"
        assert m.result.requests > 0, where
        assert 0 < m.result.p50_ms <= m.result.p99_ms <= m.result.p999_ms < 1000, where
        assert m.per_core is not None and m.per_core > 0, where
        assert m.others_cores is not None and m.others_cores >= 0, where
    rows = [line.split()[:2] for line in format_summary(report).splitlines()]
    assert ["keepalive", "edge-pg"] in rows and ["limited", "edge"] in rows
    assert not report.failed


@pytest.mark.needs_tool("nginx")
@pytest.mark.needs_tool("wrk")
@pytest.mark.needs_tool("haproxy")
def test_64k_bodies_arrive_whole(suite: SuiteRun) -> None:
    runs = suite.report.runs("64k")
    assert {m.proxy for m in runs} == {"edge", "nginx", "haproxy"}
    for m in runs:
        # wrk's count of bytes read: the heads and at least 64 KiB per response.
        assert m.result.bytes_read >= m.result.requests * 64 * KIB, m.proxy
        assert m.result.bytes_read < m.result.requests * (64 * KIB + 1024) + 4 * 64 * KIB


@pytest.mark.needs_tool("nginx")
@pytest.mark.needs_tool("wrk")
@pytest.mark.needs_tool("haproxy")
def test_uploads_reach_the_upstream_whole(suite: SuiteRun) -> None:
    runs = suite.report.runs("upload")
    assert {m.proxy for m in runs} == {"edge", "nginx", "haproxy"}
    for m in runs:
        assert m.upstream_requests is not None and m.upstream_bytes is not None
        # Every upload wrk got an answer to, the upstream read whole (head and 1 MiB body).
        assert m.upstream_requests >= m.result.requests > 0, m.proxy
        assert m.upstream_bytes >= m.upstream_requests * MIB, m.proxy


@pytest.mark.needs_tool("nginx")
@pytest.mark.needs_tool("wrk")
@pytest.mark.needs_tool("haproxy")
def test_idle_connections_cost_memory(suite: SuiteRun) -> None:
    runs = suite.report.idle
    assert [m.proxy for m in runs] == ["edge", "nginx", "haproxy"]
    for m in runs:
        assert m.after is not None, m.error
        assert m.connections == 200 and m.closed_by_peer == 0, m.proxy
        # nginx's master and worker, the edge's master and worker; HAProxy is one process.
        assert m.after.processes >= (1 if m.proxy == "haproxy" else 2), m.proxy
        assert m.after.pss > 0, m.proxy
        assert m.after.rss >= m.after.pss, m.proxy
        # One process's Rss: at most the sum, and more than an even share of it.
        assert m.after.rss >= m.after.largest_rss >= m.after.rss / m.after.processes, m.proxy


@pytest.mark.needs_tool("nginx")
@pytest.mark.needs_tool("wrk")
@pytest.mark.needs_tool("haproxy")
def test_results_written_and_everything_stopped(
    suite: SuiteRun, tmp_path: Path, postgres_server: str
) -> None:
    chart = write_results(suite.report, tmp_path / "suite.md")

    markdown = (tmp_path / "suite.md").read_text()
    for name in SCENARIOS:
        assert f"- **{name}**:" in markdown
    assert "| 200 idle connections | edge | nginx | haproxy | goal |" in markdown
    assert "HAProxy 2." in markdown and "wrk " in markdown
    assert chart == tmp_path / "suite.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(suite.tmp.iterdir()) == [], "temp dir not removed"
    assert not _processes_mentioning(str(suite.tmp)), "processes left running"
    databases = asyncio.run(_databases(postgres_server))
    assert not [name for name in databases if name.startswith("zeitwork_bench_")]


async def _databases(server: str) -> list[str]:
    conn = await connect(server)
    try:
        return [row["datname"] for row in await conn.fetch("SELECT datname FROM pg_database")]
    finally:
        await conn.close()


@pytest.mark.needs_tool("nginx")
@pytest.mark.needs_tool("wrk")
def test_a_busy_neighbour_disturbs_the_run() -> None:
    """A process the benchmark did not start keeps a core busy during the run: the run is
    flagged, and the Markdown says so."""
    config = smoke_config("keepalive", proxies=("nginx",), duration=2)
    tools = _tools(config)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    try:
        time.sleep(0.2)
        report = run_benchmark(config, tools, out=io.StringIO())
    finally:
        os.kill(busy.pid, signal.SIGKILL)
        busy.wait()

    [m] = report.measurements
    assert m.others_cores is not None and m.others_cores > config.disturbed_cores
    assert m.disturbed
    assert report.disturbed_rounds("keepalive") == [1]
    assert "keepalive: round(s) 1 disturbed, kept (no undisturbed round)" in render_markdown(report)


@pytest.mark.needs_tool("nginx")
@pytest.mark.needs_tool("wrk")
def test_errors_are_counted_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    config = smoke_config("keepalive", proxies=("nginx",))
    tools = _tools(config)
    real_argv = bench.wrk.wrk_argv

    def unknown_host(*args: Any, **kwargs: Any) -> list[str]:
        # The reference proxy answers 404 to any Host but bench.local.
        return [a.replace(VHOST, "unknown.local") for a in real_argv(*args, **kwargs)]

    monkeypatch.setattr("bench.proxy.wrk_argv", unknown_host)
    out = io.StringIO()

    report = run_benchmark(config, tools, out=out)

    [result] = report.results("keepalive", "nginx")
    assert result.requests > 0
    assert result.non_2xx_3xx == result.requests
    assert f"!! {result.errors} errors: non-2xx/3xx" in out.getvalue()
    assert [m.proxy for m in report.runs_failed] == ["nginx"]
    assert "**Warning: 1 measured run(s) failed:**" in render_markdown(report)


@pytest.mark.needs_tool("nginx")
@pytest.mark.needs_tool("wrk")
def test_proxy_that_does_not_start_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    crashing = (sys.executable, "-c", "import sys; print('no edge here'); sys.exit(3)")
    config = smoke_config("keepalive", proxies=("edge",), edge_cmd=crashing)
    tools = _tools(config)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    with pytest.raises(
        BenchError, match=r"edge \(plain\) exited with code 3 .*\n(.|\n)*no edge here"
    ):
        run_benchmark(config, tools)

    # The upstream nginx started before the failure is gone, and so is the temp dir.
    assert list(tmp_path.iterdir()) == []
    assert not _processes_mentioning(str(tmp_path))


def test_session_memory_of_this_process() -> None:
    memory = session_memory(os.getsid(0))
    assert memory.processes >= 1 and memory.rss >= memory.pss > 0
    assert memory.rss >= memory.largest_rss > 0
