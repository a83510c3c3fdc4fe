"""Tests of the benchmark suite's arithmetic and output, on made-up measurements: ratios to
nginx within a round, medians without the disturbed rounds, the disturbance calculation
from /proc figures, memory from smaps_rollup, the Markdown and the PNG chart."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any

import pytest

from bench.chart import DPI, HEIGHT_IN, WIDTH_IN, render_chart
from bench.errors import BenchError
from bench.procfs import (
    CpuSnapshot,
    Memory,
    _rollup_bytes,
    is_disturbed,
    machine_busy_seconds,
    others_cores,
    others_cores_between,
)
from bench.report import (
    IdleMeasurement,
    Measurement,
    Report,
    format_round_table,
    format_summary,
    render_markdown,
)
from bench.scenarios import SCENARIOS, BenchConfig
from bench.wrk import WrkResult

MB = 1_000_000


def _result(rps: float, p50: float = 1.0, p99: float = 2.0, non_2xx: int = 0) -> WrkResult:
    return WrkResult(
        requests=int(rps),
        duration_s=1.0,
        requests_per_sec=rps,
        latency_ms={50: p50, 99: p99, 99.9: p99 * 2},
        bytes_read=int(rps) * 100,
        non_2xx_3xx=non_2xx,
    )


def _config(**kwargs: Any) -> BenchConfig:
    return dataclasses.replace(BenchConfig(edge_cmd=("zeitwork",)), **kwargs)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# --- disturbance ----------------------------------------------------------------------------


def test_others_cores_is_busy_time_not_ours_per_second() -> None:
    # 10 s in which the machine was busy 14 CPU-s, 11 of them ours: 0.3 of a core.
    assert others_cores(14.0, 11.0, 10.0) == pytest.approx(0.3)
    assert is_disturbed(0.3)
    assert not is_disturbed(0.25)
    assert not is_disturbed(0.2)
    assert is_disturbed(0.2, threshold=0.1)
    # Tick sampling may put ours above the machine's: never negative.
    assert others_cores(10.0, 10.05, 5.0) == 0.0
    with pytest.raises(ValueError, match="wall time"):
        others_cores(1.0, 1.0, 0.0)


def test_others_cores_between_snapshots() -> None:
    before = CpuSnapshot(wall_s=100.0, machine_busy_s=50.0, sessions_s={1: 5.0}, bench_s=1.0)
    after = CpuSnapshot(wall_s=102.0, machine_busy_s=54.0, sessions_s={1: 6.5}, bench_s=2.0)
    # Machine 4 CPU-s, ours 1.5 + 1.0 = 2.5: 1.5 CPU-s of others in 2 s.
    assert others_cores_between(before, after) == pytest.approx(0.75)


def test_machine_busy_seconds_from_proc_stat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bench.procfs._ticks_per_second", lambda: 100)
    stat = "cpu  1000 50 300 9000 70 10 40 5 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n"
    # user + nice + system + irq + softirq; not idle, iowait or steal.
    assert machine_busy_seconds(stat) == pytest.approx(14.0)
    with pytest.raises(ValueError, match="unexpected first line"):
        machine_busy_seconds("intr 1 2 3\n")


def test_smaps_rollup_fields() -> None:
    text = "00400000-7fff [rollup]\nRss:      2048 kB\nPss:      1024 kB\nPss_Anon:  512 kB\n"
    assert _rollup_bytes(text) == (1024 * 1024, 2048 * 1024)


# --- report ---------------------------------------------------------------------------------


def _report_with_rounds(disturbed: set[int]) -> Report:
    """keepalive with edge and nginx over 3 rounds; edge/nginx 0.5, 0.9, 0.75."""
    report = Report(config=_config(rounds=3, scenarios=("keepalive",), proxies=("edge", "nginx")))
    for round_no, edge, nginx in [(1, 100.0, 200.0), (2, 90.0, 100.0), (3, 120.0, 160.0)]:
        flag = round_no in disturbed
        report.measurements += [
            # The edge used twice nginx's CPU in every round.
            Measurement(round_no, "keepalive", "edge", _result(edge), cpu_s=2.0, disturbed=flag),
            Measurement(round_no, "keepalive", "nginx", _result(nginx), cpu_s=1.0),
        ]
    return report


def test_ratios_pair_runs_of_the_same_round() -> None:
    report = _report_with_rounds(disturbed=set())

    assert report.ratios_by_round("keepalive", "edge") == pytest.approx({1: 0.5, 2: 0.9, 3: 0.75})
    summary = report.summary("keepalive", "edge")
    assert summary is not None
    # The median of the ratios, not 100/160.
    assert summary.ratio == pytest.approx(0.75)
    assert summary.core_ratio == pytest.approx(0.375)
    assert summary.requests_per_sec == 100.0
    assert summary.rounds == (1, 2, 3)
    assert report.summary("keepalive", "haproxy") is None


def test_disturbed_rounds_are_left_out_of_the_medians() -> None:
    report = _report_with_rounds(disturbed={1, 3})

    assert report.disturbed_rounds("keepalive") == [1, 3]
    assert report.rounds_used("keepalive") == [2]
    edge = report.summary("keepalive", "edge")
    nginx = report.summary("keepalive", "nginx")
    assert edge is not None and nginx is not None
    assert (edge.requests_per_sec, edge.rounds) == (90.0, (2,))
    assert edge.ratio == pytest.approx(0.9)
    # nginx's runs were not disturbed, but its round was: left out alike.
    assert nginx.requests_per_sec == 100.0
    assert "keepalive: disturbed round(s) 1, 3, left out" in format_summary(report)
    markdown = render_markdown(report)
    assert "keepalive: round(s) 1, 3 disturbed, left out" in markdown
    assert "| 1 | keepalive | edge | 100 |" in markdown
    assert markdown.count("| **yes** |") == 2


def test_every_round_disturbed_keeps_them_all_and_says_so() -> None:
    report = _report_with_rounds(disturbed={1, 2, 3})

    assert report.rounds_used("keepalive") == [1, 2, 3]
    summary = report.summary("keepalive", "edge")
    assert summary is not None and summary.ratio == pytest.approx(0.75)
    assert "kept (no undisturbed round)" in format_summary(report)
    assert "round(s) 1, 2, 3 disturbed, kept (no undisturbed round)" in render_markdown(report)


def test_undisturbed_run_says_so() -> None:
    markdown = render_markdown(_report_with_rounds(disturbed=set()))
    assert "No run was disturbed." in markdown
    assert "| **yes** |" not in markdown


def test_failed_runs_are_reported() -> None:
    report = Report(config=_config(rounds=1, scenarios=("64k",), proxies=("edge", "nginx")))
    report.measurements += [
        Measurement(1, "64k", "edge", _result(50.0), problems=("wrk read 10 bytes",)),
        Measurement(1, "64k", "nginx", _result(100.0, non_2xx=3)),
    ]

    assert [m.proxy for m in report.runs_failed] == ["edge", "nginx"]
    assert report.failed
    summary = format_summary(report)
    assert "round 1, 64k edge: wrk read 10 bytes" in summary
    assert "round 1, 64k nginx: 3 errors: non-2xx/3xx 3" in summary
    assert "**Warning: 2 measured run(s) failed:**" in render_markdown(report)


def _idle(round_no: int, proxy: str, before: int, after: int, closed: int = 0) -> IdleMeasurement:
    return IdleMeasurement(
        round_no,
        proxy,
        1000,
        # The worker: the larger of the two processes, most of the Pss.
        Memory(pss=before, rss=before * 2, processes=2, largest_rss=before * 3 // 2),
        Memory(pss=after, rss=after * 2, processes=2, largest_rss=after * 3 // 2),
        open_s=0.5,
        closed_by_peer=closed,
    )


def test_idle_memory_summary_and_goal() -> None:
    report = Report(config=_config(rounds=2, scenarios=("idle",)))
    report.idle += [
        _idle(1, "edge", 60 * MB, 90 * MB),
        _idle(2, "edge", 60 * MB, 94 * MB),
        _idle(1, "nginx", 5 * MB, 8 * MB, closed=3),
        IdleMeasurement(
            2, "nginx", 1000, Memory(5 * MB, 10 * MB, 2), error="connect failed: ECONNREFUSED"
        ),
    ]

    edge = report.idle_summary("edge")
    assert edge is not None
    assert edge.after_pss == 92 * MB
    # (30 + 34) / 2 MB over 1,000 connections.
    assert edge.per_connection_bytes == pytest.approx(32_000)
    nginx = report.idle_summary("nginx")
    assert nginx is not None and (nginx.runs, nginx.runs_failed) == (2, 2)
    assert report.idle_summary("haproxy") is None
    markdown = render_markdown(report)
    assert (
        "| Rss of the worker holding them | 138.0 MB | 12.0 MB | - | edge worker < 150 MB: met |"
        in markdown
    )
    assert "| all processes (Pss) | 92.0 MB | 8.0 MB | - | |" in markdown
    assert "| per connection | 32.0 kB | 3.0 kB | - | |" in markdown
    assert "round 1 nginx: the proxy closed 3 of the 1,000 connections" in markdown
    assert "round 2 nginx: connect failed: ECONNREFUSED" in markdown
    assert "| 2 | nginx | 5.0 MB | failed |" in markdown
    rows = [line.split() for line in format_round_table(report, 1).splitlines()]
    assert ["idle", "edge", "1,000", "conns", "90.0", "MB", "+30.0", "kB/conn", "0"] in rows

    assert (
        "Pss 60.0 MB -> 92.0 MB (32.0 kB per connection), Rss 184.0 MB, largest process "
        "Rss 138.0 MB; goal: worker Rss < 150.0 MB: met" in (format_summary(report))
    )

    # Worker Rss 150 and 105 MB: the median, 127.5 MB, meets the goal; 210 and 150 do not.
    report.idle[:2] = [_idle(1, "edge", 60 * MB, 100 * MB), _idle(2, "edge", 60 * MB, 70 * MB)]
    assert "edge worker < 150 MB: met" in render_markdown(report)
    report.idle[:2] = [_idle(1, "edge", 60 * MB, 140 * MB), _idle(2, "edge", 60 * MB, 100 * MB)]
    assert "edge worker < 150 MB: **not met**" in render_markdown(report)
    assert "goal: worker Rss < 150.0 MB: NOT met" in format_summary(report)


def _full_report() -> Report:
    """One round of every scenario with its own proxies, made up."""
    config = _config(rounds=1)
    report = Report(config=config, environment={"commit": "abc1234"})
    for scenario, proxy in config.cells():
        if scenario.kind == "idle":
            report.idle.append(_idle(1, proxy, 10 * MB, 30 * MB))
            continue
        rps = {"edge": 600.0, "edge-pg": 590.0, "nginx": 1000.0, "haproxy": 950.0}[proxy]
        report.measurements.append(
            Measurement(1, scenario.name, proxy, _result(rps), cpu_s=1.0, others_cores=0.01)
        )
    return report


def test_markdown_names_every_scenario_with_its_headline() -> None:
    markdown = render_markdown(_full_report(), chart="suite.png")

    for scenario in SCENARIOS.values():
        assert f"- **{scenario.name}**:" in markdown
        if scenario.kind == "wrk":
            assert f"| {scenario.title} |" in markdown
            assert f"| {scenario.name} | edge |" in markdown
    assert "| keep-alive, 12 B | 600 | 600 | 1,000 | 1,000 | 950 | 950 | 0.60 | 0.95 |" in markdown
    # The limited scenario runs no HAProxy.
    assert "| rate limited | 600 | 600 | 1,000 | 1,000 | - | - | 0.60 | - |" in markdown
    assert "| keepalive | edge-pg |" in markdown
    assert "| 10,000 idle connections | edge | nginx | haproxy | goal |" not in markdown
    assert "| 1,000 idle connections | edge | nginx | haproxy | goal |" in markdown
    assert "proxy_request_buffering off" in markdown
    assert "![requests per CPU-second and idle memory](suite.png)" in markdown
    assert "commit abc1234" in markdown


def test_chart_is_a_png_of_the_expected_size(tmp_path: Path) -> None:
    path = tmp_path / "suite.png"

    render_chart(_full_report(), path)

    assert _png_size(path) == (int(WIDTH_IN * DPI), int(HEIGHT_IN * DPI))
    assert path.stat().st_size > 10_000


def test_chart_of_one_kind_only(tmp_path: Path) -> None:
    report = _full_report()
    idle_only = Report(config=_config(rounds=1, scenarios=("idle",)), idle=report.idle)
    wrk_only = Report(
        config=_config(rounds=1, scenarios=("keepalive", "tls")),
        measurements=[m for m in report.measurements if m.scenario in ("keepalive", "tls")],
    )
    for name, part in (("idle", idle_only), ("wrk", wrk_only)):
        render_chart(part, tmp_path / f"{name}.png")
        assert _png_size(tmp_path / f"{name}.png") == (1200, 500)
    with pytest.raises(ValueError, match="no measurement"):
        render_chart(Report(config=_config(rounds=1)), tmp_path / "empty.png")


# --- configuration --------------------------------------------------------------------------


def test_config_cells_follow_each_scenario_or_the_proxies_given() -> None:
    cells = [(s.name, p) for s, p in _config().cells()]
    assert cells[:4] == [
        ("keepalive", "edge"),
        ("keepalive", "edge-pg"),
        ("keepalive", "nginx"),
        ("keepalive", "haproxy"),
    ]
    assert ("limited", "haproxy") not in cells
    assert ("idle", "edge") in cells and ("tls", "edge-pg") not in cells
    given = _config(scenarios=("tls", "limited"), proxies=("nginx", "edge"))
    assert [(s.name, p) for s, p in given.cells()] == [
        ("tls", "edge"),
        ("tls", "nginx"),
        ("limited", "edge"),
        ("limited", "nginx"),
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scenarios": ("keepalive", "bogus")}, "scenarios must be distinct names among"),
        ({"scenarios": ("tls", "tls")}, "scenarios must be distinct"),
        ({"proxies": ("envoy",)}, "proxies must be distinct names among"),
        ({"duration": 0}, "duration and rounds must be >= 1"),
        ({"idle_connections": 0}, "idle connections must be >= 1"),
        ({"disturbed_cores": 0.0}, "disturbance threshold"),
    ],
)
def test_config_rejects(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(BenchError, match=message):
        _config(**kwargs)
