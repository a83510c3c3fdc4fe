"""``zeitwork migrate``: applies, reports, and fails in one line when it cannot connect."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.cli import main
from edge.store.migrate import load_migrations

# Every migration file, in order, each named once.
ALL_APPLIED = "".join(f"applied {m.name}\n" for m in load_migrations())
assert ALL_APPLIED.startswith("applied 0001_platform\napplied 0002_admin_api\n")


def test_migrate_then_up_to_date(
    empty_database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate", "--database-url", empty_database_url]) == 0
    assert capsys.readouterr().out == ALL_APPLIED
    assert main(["migrate", "--database-url", empty_database_url]) == 0
    assert capsys.readouterr().out == "schema up to date\n"


def test_migrate_reads_database_url_from_env(
    empty_database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", empty_database_url)
    assert main(["migrate"]) == 0
    assert "applied 0001_platform" in capsys.readouterr().out


def test_unreachable_database_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["migrate", "--database-url", "postgresql://postgres:pw@127.0.0.1:1/zeitwork"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("zeitwork migrate: error: cannot connect to PostgreSQL at ")
    assert "127.0.0.1:1/zeitwork" in err and "pw" not in err
    assert "Traceback" not in err


def test_migrate_embedded_without_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main(["migrate", "--data-dir", str(tmp_path / "pg")]) == 0
    assert capsys.readouterr().out == ALL_APPLIED
    assert main(["migrate", "--data-dir", str(tmp_path / "pg")]) == 0
    assert capsys.readouterr().out == "schema up to date\n"
