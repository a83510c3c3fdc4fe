"""Typed configuration and the command line that builds it."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
from pathlib import Path
from typing import Any, cast

import pytest

from edge.cli import build_parser, edge_config, main, seconds, size
from edge.config import ConfigError, EdgeConfig, ProxyLimits, parse_networks

# -- ProxyLimits / EdgeConfig ----------------------------------------------------------


def test_defaults_follow_the_issue() -> None:
    limits = ProxyLimits()
    assert limits.max_header_size == 64 * 1024
    assert limits.max_body_size == 100 * 1024 * 1024
    assert limits.retries == 1


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_header_size", 0),
        ("max_body_size", -1),
        ("upstream_max_idle", 0),
        ("write_high_water", 0),
        ("retries", -1),
        ("header_timeout", 0),
        ("body_timeout", -1.0),
        ("keepalive_timeout", 0.0),
        ("upstream_connect_timeout", 0),
        ("upstream_response_timeout", -5),
        ("upstream_idle_timeout", 0),
        ("tunnel_idle_timeout", 0),
        ("shutdown_timeout", 0),
        ("header_timeout", float("nan")),
    ],
)
def test_invalid_limit_names_the_option(option: str, value: float) -> None:
    with pytest.raises(ConfigError, match=option):
        ProxyLimits(**cast(Any, {option: value}))


def test_misspelled_limit_is_an_error() -> None:
    with pytest.raises(TypeError):
        ProxyLimits(max_header_sise=1024)  # type: ignore[call-arg]


def test_config_is_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ProxyLimits().retries = 3  # type: ignore[misc]


def test_tick_follows_the_shortest_timeout() -> None:
    assert ProxyLimits().tick == pytest.approx(0.2)  # the 1 s ejection is the shortest
    assert ProxyLimits(ejection_time=10.0).tick == 1.0  # ceiling
    assert ProxyLimits(header_timeout=0.5).tick == pytest.approx(0.1)
    assert ProxyLimits(upstream_connect_timeout=0.01).tick == 0.02  # floor


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"http_port": 0}, "port"),
        ({"http_port": 65536}, "port"),
        ({"workers": 0}, "workers"),
        ({"backlog": 0}, "backlog"),
    ],
)
def test_invalid_edge_config(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        EdgeConfig(routes_path=Path("r.json"), **kwargs)


def test_edge_config_defaults() -> None:
    config = EdgeConfig(routes_path=Path("r.json"))
    assert config.workers >= 1
    assert config.http_port == 8000
    assert config.trusted_proxies == ()


def test_parse_networks() -> None:
    nets = parse_networks(["10.0.0.0/8", "192.168.1.7", " ::1 ", "10.1.2.3/16"])
    assert nets == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.7/32"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("10.1.0.0/16"),
    )


@pytest.mark.parametrize("value", ["nope", "10.0.0.0/33", "", "1.2.3"])
def test_parse_networks_rejects(value: str) -> None:
    with pytest.raises(ConfigError, match="trusted proxy"):
        parse_networks([value])


# -- cli value parsers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("65536", 65536),
        ("0", 0),
        ("64k", 64 * 1024),
        ("64K", 64 * 1024),
        ("64kb", 64 * 1024),
        ("64KiB", 64 * 1024),
        ("100m", 100 * 1024**2),
        ("100MB", 100 * 1024**2),
        ("2g", 2 * 1024**3),
        (" 8k ", 8 * 1024),
    ],
)
def test_size(text: str, expected: int) -> None:
    assert size(text) == expected


@pytest.mark.parametrize("text", ["", "k", "1.5m", "-1", "10x", "ten", "1 k", "0x10"])
def test_size_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        size(text)


@pytest.mark.parametrize(("text", "expected"), [("1", 1.0), ("0.25", 0.25), ("30", 30.0)])
def test_seconds(text: str, expected: float) -> None:
    assert seconds(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "abc", "", "nan"])
def test_seconds_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        seconds(text)


# -- the command line ------------------------------------------------------------------------


def test_flags_become_config(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [
            "edge",
            "--routes",
            str(tmp_path / "r.json"),
            "--http-port",
            "8088",
            "--workers",
            "3",
            "--trusted-proxy",
            "10.0.0.0/8",
            "--max-header-size",
            "16k",
            "--max-body-size",
            "1m",
            "--header-timeout",
            "2.5",
            "--upstream-timeout",
            "7",
            "--retries",
            "0",
            "--shutdown-timeout",
            "3",
        ]
    )
    config = edge_config(args)
    assert config.routes_path == tmp_path / "r.json"
    assert (config.http_port, config.workers) == (8088, 3)
    assert config.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"),)
    limits = config.limits
    assert (limits.max_header_size, limits.max_body_size) == (16 * 1024, 1024**2)
    assert limits.header_timeout == 2.5
    assert limits.upstream_response_timeout == 7.0
    assert limits.retries == 0
    assert limits.shutdown_timeout == 3.0


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    code = info.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


def test_invalid_routes_file_exits_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "routes.json"
    path.write_text('{"routes": {"a.example.com": ["127.0.0.1:9001"]')
    code, err = run_main(["edge", "--routes", str(path)], capsys)
    assert code == 2
    assert str(path) in err
    assert "Traceback" not in err


def test_invalid_route_exits_2_naming_file_and_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"routes": {"a.example.com": ["127.0.0.1"]}}))
    code, err = run_main(["edge", "--routes", str(path)], capsys)
    assert code == 2
    assert str(path) in err
    assert "a.example.com" in err


def test_missing_routes_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "missing.json"
    code, err = run_main(["edge", "--routes", str(path)], capsys)
    assert code == 2
    assert str(path) in err


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--http-port", "0"], "port"),
        (["--workers", "0"], "workers"),
        (["--trusted-proxy", "not-an-ip"], "trusted proxy"),
        (["--max-header-size", "lots"], "max-header-size"),
        (["--header-timeout", "-1"], "header-timeout"),
        (["--retries", "-1"], "retries"),
        (["--max-header-sise", "1k"], "unrecognized"),
    ],
)
def test_bad_flags_exit_2_naming_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], words: str
) -> None:
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"routes": {}}))
    code, err = run_main(["edge", "--routes", str(path), *flags], capsys)
    assert code == 2
    assert words in err
    assert "Traceback" not in err


def test_routes_file_and_database_url_together_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # One source of routes: without --routes the edge routes from the database (never run
    # `edge` bare here: it would start serving from $DATABASE_URL or an embedded server).
    code, err = run_main(
        ["edge", "--routes", "r.json", "--database-url", "postgresql://x/y"], capsys
    )
    assert code == 2
    assert "not both" in err


def test_rate_limit_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    parser = build_parser()
    base = ["edge", "--routes", "r.json"]
    config = edge_config(parser.parse_args([*base, "--rate-limit", "50/100"]))
    assert config.client_rate_limit is not None
    assert (config.client_rate_limit.rate, config.client_rate_limit.burst) == (50.0, 100)
    # Without a burst, a second's worth.
    only_rate = edge_config(parser.parse_args([*base, "--rate-limit", "2.5"]))
    assert only_rate.client_rate_limit is not None and only_rate.client_rate_limit.burst == 3
    assert edge_config(parser.parse_args(base)).client_rate_limit is None


@pytest.mark.parametrize("value", ["fast", "0", "-1/5", "10/0", "10/x", "inf"])
def test_bad_rate_limit_names_the_option(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["edge", "--routes", "r.json", f"--rate-limit={value}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--rate-limit" in err and "is not a rate limit like 50 or 50/100" in err
