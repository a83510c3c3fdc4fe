"""Fixtures of the live routing table tests: the session's database (a real PostgreSQL, see
tests/conftest.py) with the platform schema, a connection per test on emptied tables, and
helpers that write the rows routes come from."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import asyncpg  # type: ignore[import-untyped, unused-ignore]
import pytest
import pytest_asyncio
import uvloop

from tests.live_routes.seed import Seed


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """uvloop only: what the edge workers run on (the proxy's own suite covers asyncio)."""
    return {"uvloop": uvloop.new_event_loop}


@pytest_asyncio.fixture
async def db(migrated_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test database, whose route tables start empty."""
    conn = await asyncpg.connect(migrated_url)
    await conn.execute("TRUNCATE regions, projects CASCADE")
    try:
        yield conn
    finally:
        await conn.close()


@pytest_asyncio.fixture
async def seed(db: asyncpg.Connection) -> Seed:
    return await Seed.create(db)
