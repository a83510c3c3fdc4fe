"""Choosing the routing table's source on the command line and in the configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.cli import build_parser, edge_config, main
from edge.config import ConfigError, EdgeConfig


def config_of(*argv: str) -> EdgeConfig:
    return edge_config(build_parser().parse_args(["edge", *argv]))


def test_database_flags_become_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    config = config_of(
        "--database-url",
        "postgresql://u@db:5432/zw",
        "--apps-domain",
        "Apps.Example.NET.",
        "--region",
        "eu-1",
        "--routes-reload-interval",
        "5",
        "--data-dir",
        "/var/lib/zw",
    )
    assert config.routes_path is None
    assert config.database_url == "postgresql://u@db:5432/zw"
    assert config.apps_domain == "apps.example.net"
    assert config.region == "eu-1"
    assert config.routes_reload_interval == 5.0
    assert config.data_dir == Path("/var/lib/zw")


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    config = config_of()
    # Neither source: the master starts the embedded PostgreSQL.
    assert (config.routes_path, config.database_url) == (None, None)
    assert config.apps_domain == "zeitwork.app"
    assert (config.routes_reload_interval, config.routes_debounce) == (30.0, 0.05)
    assert config.region == ""


def test_database_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://env/zw")
    assert config_of().database_url == "postgresql://env/zw"
    assert config_of("--database-url", "postgresql://flag/zw").database_url == (
        "postgresql://flag/zw"
    )


def test_an_explicit_routes_file_wins_over_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://env/zw")
    config = config_of("--routes", "r.json")
    assert config.routes_path == Path("r.json")
    assert config.database_url is None


def test_a_routes_file_and_a_database_url_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    routes = tmp_path / "routes.json"
    routes.write_text('{"routes": {}}')
    with pytest.raises(SystemExit) as info:
        main(["edge", "--routes", str(routes), "--database-url", "postgresql://x/y"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "not both" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"apps_domain": "Zeitwork.app"}, "apps domain"),
        ({"apps_domain": "zeit work.app"}, "apps domain"),
        ({"apps_domain": ""}, "apps domain"),
        ({"routes_reload_interval": 0}, "reload interval"),
        ({"routes_debounce": -0.1}, "debounce"),
        ({"routes_path": Path("r.json"), "database_url": "postgresql://x/y"}, "not both"),
    ],
)
def test_invalid_routing_config(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        EdgeConfig(**kwargs)  # type: ignore[arg-type]
