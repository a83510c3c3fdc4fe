"""Connecting to PostgreSQL: a pool for the platform, a single connection for listeners.

:func:`open_database` is the one entry point of a process: the ``DATABASE_URL`` when one is
given, else the embedded server (:mod:`edge.store.embedded`), then a pool. Every connection
made here decodes ``jsonb`` into Python objects, which the store functions rely on.
Connection failures become :class:`DatabaseUnavailable` with a message that names the server
(never the password), so the CLI prints one line instead of a traceback.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from edge.store.embedded import EmbeddedPostgres
from edge.store.errors import TRANSLATED, DatabaseUnavailable

# Longest a statement may run before the store gives up on it; the platform's queries are
# small, so a longer one means a lock or a sick server.
COMMAND_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0
# asyncpg raises ValueError on a malformed DSN.
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (*TRANSLATED, ValueError)


def describe_dsn(dsn: str) -> str:
    """``user@host:port/db`` of a DSN, without the password, for messages."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or ""
        if not host and "host=" in parts.query:
            host = parts.query.partition("host=")[2].partition("&")[0]
        port = f":{parts.port}" if parts.port else ""
        user = f"{parts.username}@" if parts.username else ""
        return f"{user}{host or 'localhost'}{port}{parts.path or '/'}"
    except ValueError:
        return "the given database URL"


async def _init_connection(conn: Any) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


def _unavailable(dsn: str, exc: BaseException) -> DatabaseUnavailable:
    if isinstance(exc, asyncio.TimeoutError):
        reason = f"no answer within {CONNECT_TIMEOUT:g} s"
    elif isinstance(exc, ConnectionRefusedError):
        reason = "connection refused (is PostgreSQL running there?)"
    else:
        reason = str(exc) or type(exc).__name__
    return DatabaseUnavailable(f"cannot connect to PostgreSQL at {describe_dsn(dsn)}: {reason}")


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> Any:
    """An ``asyncpg.Pool`` to ``dsn``; raises :class:`DatabaseUnavailable` if unreachable."""
    try:
        return await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            command_timeout=COMMAND_TIMEOUT,
            timeout=CONNECT_TIMEOUT,
            # Idle connections are recycled so a failover or restart of the server does not
            # leave a pool of dead sockets behind.
            max_inactive_connection_lifetime=300.0,
            init=_init_connection,
        )
    except _CONNECT_ERRORS as exc:
        raise _unavailable(dsn, exc) from exc


async def connect(dsn: str) -> Any:
    """One ``asyncpg.Connection`` (for LISTEN, or a lock held for the process's life)."""
    try:
        conn = await asyncpg.connect(dsn, command_timeout=COMMAND_TIMEOUT, timeout=CONNECT_TIMEOUT)
        await _init_connection(conn)
    except _CONNECT_ERRORS as exc:
        raise _unavailable(dsn, exc) from exc
    return conn


@dataclass
class Database:
    """The process's database: the pool, its DSN, and the embedded server if one was started."""

    pool: Any
    dsn: str
    embedded: EmbeddedPostgres | None = None

    async def close(self) -> None:
        try:
            await self.pool.close()
        finally:
            if self.embedded is not None:
                await asyncio.to_thread(self.embedded.stop)


async def open_database(
    database_url: str | None,
    *,
    data_dir: Path | None = None,
    min_size: int = 1,
    max_size: int = 10,
) -> Database:
    """The database at ``database_url``, or the embedded one in ``data_dir`` without a URL."""
    embedded = None
    dsn = database_url
    if not dsn:
        embedded = EmbeddedPostgres(data_dir)
        dsn = await asyncio.to_thread(embedded.start)
    try:
        pool = await create_pool(dsn, min_size=min_size, max_size=max_size)
    except BaseException:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
        raise
    return Database(pool=pool, dsn=dsn, embedded=embedded)
