"""Fixtures of the store tests: a migrated session database, emptied before each test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio

from edge.store.db import create_pool

# Every table but schema_migrations; CASCADE follows the foreign keys.
TABLES = (
    "regions, nodes, projects, environments, deployments, instances, domains, certificates,"
    " acme_challenges, acme_accounts, certificate_orders, github_webhooks, github_deliveries,"
    " instance_logs, audit_log"
)


@pytest_asyncio.fixture
async def pool(migrated_url: str) -> AsyncIterator[Any]:
    """A pool on the migrated database, with every table empty."""
    pool = await create_pool(migrated_url, min_size=1, max_size=4)
    await pool.execute(f"TRUNCATE {TABLES} CASCADE")
    yield pool
    await pool.close()
