"""The embedded PostgreSQL: starts in a directory, keeps its data across restarts, stops."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest

from edge.store import DatabaseUnavailable
from edge.store.db import connect, open_database
from edge.store.embedded import EmbeddedPostgres, default_data_dir
from edge.store.migrate import migrate


def test_default_data_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / "zeitwork" / "postgres"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert default_data_dir() == Path.home() / ".local" / "share" / "zeitwork" / "postgres"
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # a service running as root
    assert default_data_dir() == Path("/var/lib/zeitwork/postgres")


@pytest.mark.asyncio
async def test_data_persists_across_restarts(tmp_path: Path) -> None:
    data_dir = tmp_path / "pg"
    db = await open_database(None, data_dir=data_dir)
    dsn = db.dsn
    try:
        assert await migrate(db.pool) != []
        await db.pool.execute("INSERT INTO regions VALUES ('eu', 'Europe', 'DE')")
    finally:
        await db.close()
    assert db.embedded is not None and not db.embedded.running
    # Stopped: nothing answers on its socket any more.
    with pytest.raises(DatabaseUnavailable):
        await connect(dsn)

    db = await open_database(None, data_dir=data_dir)
    try:
        assert await migrate(db.pool) == []
        assert await db.pool.fetchval("SELECT name FROM regions WHERE code = 'eu'") == "Europe"
    finally:
        await db.close()


def test_context_manager_and_repeated_stop(tmp_path: Path) -> None:
    with EmbeddedPostgres(tmp_path / "pg") as pg:
        assert pg.dsn.startswith("postgresql://")
    assert not pg.running
    pg.stop()  # a second stop is harmless


@pytest.mark.asyncio
async def test_unusable_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DatabaseUnavailable, match="cannot start the embedded PostgreSQL"):
        await asyncio.to_thread(EmbeddedPostgres(blocker / "pg").start)


def test_a_dead_user_does_not_keep_the_server_running(tmp_path: Path) -> None:
    """A process killed while using the server stays in pgserver's list of users; without
    pruning, the next user's stop would leave the server running."""
    data_dir = tmp_path / "pg"
    with EmbeddedPostgres(data_dir):
        pass
    dead = subprocess.Popen(["true"])
    dead.wait()
    (data_dir / ".handle_pids.json").write_text(json.dumps([dead.pid]))
    with EmbeddedPostgres(data_dir):
        assert (data_dir / "postmaster.pid").exists()
    # pg_ctl stop removes the pid file once the server is down.
    assert not (data_dir / "postmaster.pid").exists()
