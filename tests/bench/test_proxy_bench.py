"""Tests of bench.proxy: its wrk parser on real wrk output, and a short real benchmark run.

The samples in wrk_samples/ were captured from wrk 4.1.0 on this project's machine: one
through the nginx reverse proxy (latencies in us and ms, note wrk's "0.86ms"), one against a
deliberately slow and faulty upstream (ms and s, non-2xx responses, read and timeout errors).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

import bench.proxy
from bench.proxy import (
    REPO_ROOT,
    TLS_CIPHERS,
    VHOST,
    BenchConfig,
    BenchError,
    Measurement,
    Report,
    ToolMissingError,
    Tools,
    WrkParseError,
    WrkResult,
    default_edge_cmd,
    find_tools,
    format_summary,
    haproxy_proxy_conf,
    nginx_tls_proxy_conf,
    parse_wrk_output,
    render_markdown,
    run_benchmark,
    session_cpu_seconds,
    time_to_ms,
    wrk_argv,
)
from edge.store.db import connect

SAMPLES = Path(__file__).parent / "wrk_samples"


# One short round per target keeps the two smoke runs within a few seconds.
def smoke_config(*targets: str, edge_cmd: tuple[str, ...] | None = None) -> BenchConfig:
    """The shortest real run: one round of 1 s with 4 connections and no warm-up."""
    config = BenchConfig(targets=targets, duration=1, connections=4, rounds=1, warmup=0)
    return config if edge_cmd is None else dataclasses.replace(config, edge_cmd=edge_cmd)


def _sample(name: str) -> str:
    return (SAMPLES / name).read_text()


# --- parser ---------------------------------------------------------------------------------


def test_parse_microseconds_and_milliseconds() -> None:
    result = parse_wrk_output(_sample("nginx_proxy_us_ms.txt"))

    assert result.requests == 129098
    assert result.duration_s == pytest.approx(2.10)
    assert result.requests_per_sec == pytest.approx(61475.71)
    assert result.latency_ms == {
        50: pytest.approx(0.696),
        75: pytest.approx(0.86),
        90: pytest.approx(0.97),
        99: pytest.approx(1.65),
    }
    assert result.p50_ms == pytest.approx(0.696)
    assert result.p99_ms == pytest.approx(1.65)
    assert result.errors == 0
    assert result.socket_errors == {"connect": 0, "read": 0, "write": 0, "timeout": 0}


def test_parse_milliseconds_seconds_and_errors() -> None:
    result = parse_wrk_output(_sample("slow_upstream_ms_s_errors.txt"))

    assert result.requests == 335
    assert result.duration_s == pytest.approx(5.01)
    assert result.requests_per_sec == pytest.approx(66.87)
    assert result.latency_ms == {
        50: pytest.approx(5.48),
        75: pytest.approx(589.32),
        90: pytest.approx(956.73),
        # wrk pads this line with a trailing space.
        99: pytest.approx(1200.0),
    }
    assert result.non_2xx_3xx == 48
    assert result.socket_errors == {"connect": 0, "read": 7, "write": 0, "timeout": 2}
    assert result.errors == 57
    assert "non-2xx/3xx 48" in result.describe_errors()
    assert "read 7" in result.describe_errors()


def test_parse_rejects_output_without_latency_distribution() -> None:
    lines = _sample("nginx_proxy_us_ms.txt").splitlines()
    without = "\n".join(line for line in lines if "%  " not in line)

    with pytest.raises(WrkParseError, match="50% latency"):
        parse_wrk_output(without)


@pytest.mark.parametrize(
    ("value", "unit", "ms"),
    [("250.5", "us", 0.2505), ("0.86", "ms", 0.86), ("1.20", "s", 1200.0), ("1.5", "m", 90e3)],
)
def test_time_to_ms(value: str, unit: str, ms: float) -> None:
    assert time_to_ms(value, unit) == pytest.approx(ms)


# --- report ---------------------------------------------------------------------------------


def _result(rps: float, p50: float = 1.0, p99: float = 2.0, non_2xx: int = 0) -> WrkResult:
    return WrkResult(
        requests=int(rps),
        duration_s=1.0,
        requests_per_sec=rps,
        latency_ms={50: p50, 99: p99},
        non_2xx_3xx=non_2xx,
    )


def test_report_medians_and_same_round_ratios() -> None:
    report = Report(config=BenchConfig(rounds=3, edge_cmd=("zeitwork",)))
    figures = [(1, 100.0, 200.0), (2, 90.0, 100.0), (3, 120.0, 160.0)]
    for round_no, edge, nginx in figures:
        report.measurements.append(Measurement(round_no, "edge", _result(edge, p99=edge / 10)))
        report.measurements.append(
            Measurement(round_no, "nginx", _result(nginx, non_2xx=1 if round_no == 2 else 0))
        )

    # Ratios pair runs of the same round: 0.5, 0.9, 0.75; their median is not 100/160.
    assert report.ratios() == pytest.approx([0.5, 0.9, 0.75])
    edge_summary = report.summary("edge")
    assert (edge_summary.requests_per_sec, edge_summary.p99_ms) == (100.0, 10.0)
    assert edge_summary.runs_with_errors == 0
    assert report.summary("nginx").runs_with_errors == 1
    assert [(m.round, m.target) for m in report.runs_with_errors] == [(2, "nginx")]
    summary = format_summary(report)
    assert "edge/nginx req/s: 0.75" in summary
    assert "round 2, nginx: 1 error: non-2xx/3xx 1" in summary
    assert "**0.75**" in render_markdown(report)


def test_tls_pairs_and_per_core_ratios() -> None:
    report = Report(config=BenchConfig(rounds=2, targets=("edge-tls", "nginx-tls")))
    for round_no, (edge, nginx) in enumerate([(60.0, 100.0), (80.0, 100.0)], start=1):
        # The edge used twice the CPU of nginx in round 2.
        report.measurements.append(
            Measurement(round_no, "edge-tls", _result(edge), cpu_s=1.0 * round_no)
        )
        report.measurements.append(Measurement(round_no, "nginx-tls", _result(nginx), cpu_s=1.0))
    assert report.pairs() == [("edge-tls", "nginx-tls")]
    assert report.ratios("edge-tls", "nginx-tls") == pytest.approx([0.6, 0.8])
    assert report.core_ratios("edge-tls", "nginx-tls") == pytest.approx([0.6, 0.4])
    summary = format_summary(report)
    assert "edge-tls/nginx-tls req/s: 0.70" in summary
    assert "edge-tls/nginx-tls per core: 0.50" in summary
    assert "edge/nginx" not in summary
    assert "per CPU core: **0.50**" in render_markdown(report)


def test_tls_reference_and_wrk_modes(tmp_path: Path) -> None:
    conf = nginx_tls_proxy_conf(
        tmp_path, 8443, 9000, tmp_path / "bench.crt", tmp_path / "bench.key"
    )
    assert conf.count("listen 127.0.0.1:8443 ssl") == 2
    assert f"ssl_ciphers {TLS_CIPHERS};" in conf and "ssl_protocols TLSv1.2 TLSv1.3;" in conf
    argv = wrk_argv("wrk", 8443, duration=1, connections=4, scheme="https", close=True)
    assert argv[-1] == "https://127.0.0.1:8443/"
    assert argv[argv.index("Connection: close") - 1] == "-H"
    assert "Connection: close" not in wrk_argv("wrk", 1, duration=1, connections=4)
    assert session_cpu_seconds(os.getsid(0)) > 0


def test_haproxy_reference_and_ratios_to_nginx_of_the_same_kind(tmp_path: Path) -> None:
    plain = haproxy_proxy_conf(8080, 9000)
    assert "nbthread 1" in plain and "http-reuse always" in plain
    assert "bind 127.0.0.1:8080\n" in plain and "server upstream 127.0.0.1:9000" in plain
    assert "timeout http-keep-alive 75s" in plain
    assert "ssl" not in plain and "\n    log" not in plain
    tls = haproxy_proxy_conf(8443, 9000, tmp_path / "bench.pem")
    assert f"bind 127.0.0.1:8443 ssl crt {tmp_path / 'bench.pem'}" in tls
    assert "ssl-min-ver TLSv1.2" in tls and f"ssl-default-bind-ciphers {TLS_CIPHERS}" in tls

    targets = ("edge", "haproxy", "nginx", "haproxy-tls", "nginx-tls", "haproxy-handshake")
    pairs = Report(config=BenchConfig(rounds=1, targets=targets)).pairs()
    assert pairs == [("edge", "nginx"), ("haproxy", "nginx"), ("haproxy-tls", "nginx-tls")]
    report = Report(config=BenchConfig(rounds=1, targets=("edge", "haproxy", "nginx")))
    for target, rps in [("edge", 60.0), ("haproxy", 120.0), ("nginx", 100.0)]:
        report.measurements.append(Measurement(1, target, _result(rps), cpu_s=1.0))
    summary = format_summary(report)
    assert "edge/nginx req/s: 0.60" in summary
    assert "haproxy/nginx req/s: 1.20" in summary
    assert "haproxy/nginx per core: 1.20" in summary


def test_missing_tools_are_named_with_their_debian_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("bench.proxy.which", lambda name: None)

    with pytest.raises(ToolMissingError) as info:
        find_tools()
    assert "nginx not found (Debian package nginx-light" in str(info.value)
    assert "wrk not found (Debian package wrk" in str(info.value)
    # haproxy is only needed, and named, when a HAProxy target is asked for.
    assert "haproxy" not in str(info.value)
    with pytest.raises(ToolMissingError, match=r"haproxy not found \(Debian package haproxy"):
        find_tools(("edge", "haproxy"))


def test_missing_haproxy_alone_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bench.proxy.which", lambda name: None if name == "haproxy" else name)

    assert find_tools() == Tools(nginx="nginx", wrk="wrk", haproxy=None)
    with pytest.raises(ToolMissingError, match=r"^haproxy not found \(Debian package haproxy"):
        run_benchmark(smoke_config("haproxy-tls"), find_tools())


# --- real runs ------------------------------------------------------------------------------


def _tools(*targets: str) -> Tools:
    try:
        return find_tools(targets or ("nginx",))
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


def _run_and_check(target: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tools = _tools(target)
    # The benchmark's temp dir lands in tmp_path, so what it leaves behind can be checked.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = io.StringIO()

    report = run_benchmark(smoke_config(target), tools, out=out)

    [result] = report.results(target)
    assert result.errors == 0, f"{result.describe_errors()}\n{out.getvalue()}"
    assert result.requests > 0
    assert result.requests_per_sec > 0
    assert 0 < result.p50_ms <= result.p99_ms < 1000
    assert f"| {target} |" in render_markdown(report)
    assert list(tmp_path.iterdir()) == [], "temp dir not removed"
    assert not _processes_mentioning(str(tmp_path)), "processes left running"


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


@pytest.mark.needs_tool("nginx")
@pytest.mark.needs_tool("wrk")
def test_smoke_nginx(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _run_and_check("nginx", monkeypatch, tmp_path)


@pytest.mark.needs_tool("nginx")
@pytest.mark.needs_tool("wrk")
@pytest.mark.needs_tool("haproxy")
def test_smoke_haproxy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _run_and_check("haproxy", monkeypatch, tmp_path)


@pytest.mark.needs_tool("nginx")
@pytest.mark.needs_tool("wrk")
@pytest.mark.needs_tool("haproxy")
def test_smoke_haproxy_tls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """HAProxy terminating TLS with the benchmark's certificate, kept-alive and with a new
    handshake per request; its ratio to nginx-tls from the same round."""
    targets = ("haproxy-tls", "nginx-tls", "haproxy-handshake")
    tools = _tools(*targets)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = io.StringIO()

    report = run_benchmark(smoke_config(*targets), tools, out=out)

    for target in targets:
        [measurement] = [m for m in report.measurements if m.target == target]
        assert measurement.result.errors == 0, f"{target}\n{out.getvalue()}"
        assert measurement.per_core is not None and measurement.per_core > 0
    assert "haproxy-tls/nginx-tls per core: " in format_summary(report)
    assert "HAProxy 2." in render_markdown(report)
    assert list(tmp_path.iterdir()) == [], "temp dir not removed"
    assert not _processes_mentioning(str(tmp_path)), "processes left running"


@pytest.mark.needs_tool("nginx")
@pytest.mark.needs_tool("wrk")
def test_smoke_edge(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if reason := _edge_unavailable():
        pytest.skip(reason)
    _run_and_check("edge", monkeypatch, tmp_path)


@pytest.mark.needs_tool("nginx")
@pytest.mark.needs_tool("wrk")
def test_smoke_edge_routing_from_postgres(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, postgres_server: str
) -> None:
    """The edge-pg target: a scratch database seeded through the store layer, the edge
    following it, wrk through it; the database is gone afterwards."""
    if reason := _edge_unavailable():
        pytest.skip(reason)
    monkeypatch.setenv("DATABASE_URL", postgres_server)
    _run_and_check("edge-pg", monkeypatch, tmp_path)
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
def test_smoke_tls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The TLS targets: the edge and nginx with the same certificate, kept-alive and with a
    new handshake per request, each pair's ratio (and per core) from the same round."""
    if reason := _edge_unavailable():
        pytest.skip(reason)
    tools = _tools()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    targets = ("edge-tls", "nginx-tls", "edge-handshake", "nginx-handshake")
    out = io.StringIO()

    report = run_benchmark(smoke_config(*targets), tools, out=out)

    for target in targets:
        [measurement] = [m for m in report.measurements if m.target == target]
        assert measurement.result.errors == 0, f"{target}\n{out.getvalue()}"
        assert measurement.result.requests > 0
        assert measurement.per_core is not None and measurement.per_core > 0
    summary = format_summary(report)
    assert "edge-tls/nginx-tls per core: " in summary
    assert "edge-handshake/nginx-handshake per core: " in summary
    assert list(tmp_path.iterdir()) == [], "temp dir not removed"
    assert not _processes_mentioning(str(tmp_path)), "processes left running"


@pytest.mark.needs_tool("nginx")
@pytest.mark.needs_tool("wrk")
def test_errors_are_counted_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    tools = _tools()
    real_argv = bench.proxy.wrk_argv

    def unknown_host(*args: Any, **kwargs: Any) -> list[str]:
        # The reference proxy answers 404 to any Host but bench.local.
        return [a.replace(VHOST, "unknown.local") for a in real_argv(*args, **kwargs)]

    monkeypatch.setattr(bench.proxy, "wrk_argv", unknown_host)
    out = io.StringIO()

    report = run_benchmark(smoke_config("nginx"), tools, out=out)

    [result] = report.results("nginx")
    assert result.requests > 0
    assert result.non_2xx_3xx == result.requests
    assert f"!! round 1, nginx: {result.errors} errors: non-2xx/3xx" in out.getvalue()
    assert [m.target for m in report.runs_with_errors] == ["nginx"]
    assert "**Warning: 1 measured run(s) had errors:**" in render_markdown(report)


@pytest.mark.needs_tool("nginx")
@pytest.mark.needs_tool("wrk")
def test_target_that_does_not_start_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tools = _tools()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    crashing = (sys.executable, "-c", "import sys; print('no edge here'); sys.exit(3)")

    with pytest.raises(BenchError, match=r"edge exited with code 3 .*\n(.|\n)*no edge here"):
        run_benchmark(smoke_config("edge", edge_cmd=crashing), tools)

    # The upstream nginx started before the failure is gone, and so is the temp dir.
    assert list(tmp_path.iterdir()) == []
    assert not _processes_mentioning(str(tmp_path))
