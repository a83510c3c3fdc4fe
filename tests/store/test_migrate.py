"""Migrations: from empty, re-applied, recorded, concurrent, refused when newer, atomic."""

from __future__ import annotations

import asyncio

import pytest

from edge.store import SchemaTooNew, StoreError
from edge.store.db import connect
from edge.store.migrate import Migration, load_migrations, migrate


def test_files_are_ordered_by_version() -> None:
    migrations = load_migrations()
    assert migrations[0].name == "0001_platform"
    assert [m.version for m in migrations] == sorted({m.version for m in migrations})


@pytest.mark.asyncio
async def test_from_empty_then_reapplied(empty_database_url: str) -> None:
    conn = await connect(empty_database_url)
    try:
        names = [m.name for m in load_migrations()]
        assert await migrate(conn) == names
        rows = await conn.fetch("SELECT version, name, applied_at FROM schema_migrations")
        assert [(r["version"], r["name"]) for r in rows] == [
            (m.version, m.name) for m in load_migrations()
        ]
        assert all(r["applied_at"] is not None for r in rows)
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
        assert {"regions", "nodes", "deployments", "instances", "audit_log"} <= tables

        assert await migrate(conn) == []
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(names)
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_concurrent_edges_apply_once(empty_database_url: str) -> None:
    conns = [await connect(empty_database_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        applied = [r for r in results if r]
        assert len(applied) == 1
        assert applied[0] == [m.name for m in load_migrations()]
    finally:
        for conn in conns:
            await conn.close()


@pytest.mark.asyncio
async def test_newer_schema_is_refused(empty_database_url: str) -> None:
    conn = await connect(empty_database_url)
    try:
        await migrate(conn)
        await conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES (9999, '9999_future')"
        )
        with pytest.raises(SchemaTooNew, match="9999_future"):
            await migrate(conn)
        # The refusal released the lock: another migrate is refused the same way, not hung.
        with pytest.raises(SchemaTooNew):
            await asyncio.wait_for(migrate(conn), 5)
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_failing_file_leaves_no_trace(empty_database_url: str) -> None:
    conn = await connect(empty_database_url)
    bad = [
        Migration(1, "0001_ok", "CREATE TABLE ok (x int)"),
        Migration(2, "0002_bad", "CREATE TABLE half (x int); SELECT no_such_function()"),
    ]
    try:
        with pytest.raises(StoreError, match="migration 0002_bad failed"):
            await migrate(conn, bad)
        assert await conn.fetchval("SELECT to_regclass('half')") is None
        assert await conn.fetchval("SELECT to_regclass('ok')") == "ok"
        assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == 1
    finally:
        await conn.close()
