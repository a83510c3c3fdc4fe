from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest


def require_tool(name: str) -> str:
    """Path of an external tool; skip without it, but fail under CI=true."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: the CI script must install it)")
        pytest.skip(message)
    return path


async def _run_sql(dsn: str, statement: str) -> None:
    from edge.store.db import connect  # noqa: PLC0415

    conn = await connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def database_in(dsn: str, name: str) -> str:
    """``dsn`` with its database replaced by ``name`` (keeps host, user and query)."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


def create_database(server_dsn: str) -> str:
    """Create a fresh, empty database on the server of ``server_dsn``; its DSN."""
    name = f"zeitwork_test_{secrets.token_hex(4)}"
    asyncio.run(_run_sql(server_dsn, f'CREATE DATABASE "{name}"'))
    return database_in(server_dsn, name)


def drop_database(dsn: str, server_dsn: str) -> None:
    name = urlsplit(dsn).path.lstrip("/")
    # FORCE: a test that failed may have left a connection behind.
    asyncio.run(_run_sql(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DSN of a PostgreSQL server the tests may create databases on: ``$DATABASE_URL``
    (CI: the local server) where set, else an embedded server in a temporary directory."""
    from edge.store.embedded import EmbeddedPostgres  # noqa: PLC0415
    from edge.store.errors import StoreError  # noqa: PLC0415

    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    embedded = EmbeddedPostgres(tmp_path_factory.mktemp("postgres") / "data")
    try:
        dsn = embedded.start()
    except StoreError as exc:
        pytest.fail(f"no DATABASE_URL and {exc}")
    try:
        yield dsn
    finally:
        embedded.stop()


@pytest.fixture(scope="session")
def database_url(postgres_server: str) -> Iterator[str]:
    """DSN of a database of the test session's own (``zeitwork_test_<random>``), empty at
    start (not migrated) and dropped at the end."""
    from edge.store.errors import StoreError  # noqa: PLC0415

    try:
        dsn = create_database(postgres_server)
    except StoreError as exc:
        # DATABASE_URL is set but unusable: a broken setup, never a reason to skip.
        pytest.fail(f"cannot create the test database: {exc}")
    try:
        yield dsn
    finally:
        drop_database(dsn, postgres_server)


@pytest.fixture
def empty_database_url(postgres_server: str) -> Iterator[str]:
    """A database of the test's own, with no schema at all."""
    dsn = create_database(postgres_server)
    yield dsn
    drop_database(dsn, postgres_server)


async def _migrate(dsn: str) -> None:
    from edge.store.db import connect  # noqa: PLC0415
    from edge.store.migrate import migrate  # noqa: PLC0415

    conn = await connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def migrated_url(database_url: str) -> str:
    """The session's database with the platform schema."""
    asyncio.run(_migrate(database_url))
    return database_url
