"""Schema migrations: the ordered SQL files of ``edge/store/migrations`` applied once each.

A file is named ``<version>_<name>.sql`` (``0001_platform.sql``) and applied in its own
transaction, together with its row in ``schema_migrations``, so a failing file leaves no
trace. A session advisory lock serialises edges that start at the same time: the second
waits, then finds nothing left to do. A database that records a version this code does not
have was migrated by a newer release; it is refused, since this code would misread it.

Limits: forward only (no down migrations); files are never edited once released.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from edge.store.errors import TRANSLATED, SchemaTooNew, StoreError, translated

# Any fixed 64-bit key; distinct from the scheduler's leader lock.
MIGRATION_LOCK = 0x7A77_6D69_6772_0001

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """The migration files shipped with this code, in version order."""
    found: dict[int, Migration] = {}
    for entry in (resources.files("edge.store") / "migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        name = entry.name.removesuffix(".sql")
        prefix = name.partition("_")[0]
        if not prefix.isdigit():
            raise StoreError(f"migration file {entry.name} does not start with a number")
        version = int(prefix)
        if version in found:
            raise StoreError(
                f"migrations {found[version].name} and {name} have the same version {version}"
            )
        found[version] = Migration(version, name, entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def migrate(db: Any, migrations: list[Migration] | None = None) -> list[str]:
    """Apply the migrations ``db`` (a pool or a connection) lacks; the names applied.

    Raises :class:`SchemaTooNew` when the database has a version unknown here, and
    :class:`DatabaseUnavailable` when the connection fails.
    """
    if migrations is None:
        migrations = load_migrations()
    with translated():
        if isinstance(db, asyncpg.Pool):
            async with db.acquire() as conn:
                return await _migrate(conn, migrations)
        return await _migrate(db, migrations)


async def _migrate(conn: Any, migrations: list[Migration]) -> list[str]:
    # A session lock (not a transaction one): it must span the separate transactions of the
    # files. Released in `finally`; a dropped connection releases it too.
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(_CREATE_TABLE)
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        applied = {row["version"]: row["name"] for row in rows}
        known = {m.version for m in migrations}
        unknown = sorted(set(applied) - known)
        if unknown:
            names = ", ".join(applied[v] for v in unknown)
            raise SchemaTooNew(
                f"the database schema is newer than this zeitwork: it has migration(s) "
                f"{names} that this release does not know; upgrade zeitwork"
            )
        done: list[str] = []
        for migration in migrations:
            if migration.version in applied:
                continue
            try:
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        migration.version,
                        migration.name,
                    )
            except asyncpg.PostgresError as exc:
                raise StoreError(f"migration {migration.name} failed: {exc}") from exc
            done.append(migration.name)
        return done
    finally:
        # A broken connection has released the lock already; its error must not hide the
        # one that got us here.
        with contextlib.suppress(*TRANSLATED):
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
